"""Predictions and loss on stacked training arrays (see :mod:`mlmd_lab.train.data`), compiled with JAX.

The trainable parameters are the per-element networks; the model is

    E = sum_i [ s * NN_el(i)(x_i) + mu_el(i) ],   x_i = smin + factor * (G_i - shift)

with s the energy scale (eV; from the forces' RMS, so that initial gradients have the size of the forces
whatever the energy spread), mu the regression reference energies (eV) and shift/factor the symmetry-function
scaling. On export s is folded into the output layer, so the n2p2 files need no normalisation keys.

Loss (per batch, eV units):
    w_E * mean((dE / N)^2) + w_F * mean(dF_component^2) + w_S * mean((dsigma_component * V / N)^2)
over the frames (atoms) that carry each label. The stress term is the virial error per atom (eV/atom), so
that its weight means the same for any cell size; the reported stress error (``stress_sse``) is the stress
itself (eV/Å³, virial error / V).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from mlmd_lab.potentials.network import apply


@dataclass(frozen=True)
class StepConfig:
    """Static constants of the compiled functions (hashable)."""

    n_elements: int
    activations: str
    columns: tuple[tuple[int, ...], ...]  # per pair block
    energy_scale: float
    offsets: tuple[float, ...]
    scale_min: float
    weights: tuple[float, float, float]  # energy, force, stress


def frame_predict(cfg: StepConfig, params: dict, consts: dict, fr: dict):
    """(energy (), forces (n_cap, 3), virial (3, 3)) of one padded frame, in eV and eV/Å."""
    n_cap = fr["forces"].shape[0]
    atomic = jnp.zeros(n_cap, fr["forces"].dtype)
    grads = []
    for c in range(cfg.n_elements):
        G = fr[f"G{c}"]

        def energies(G, c=c):
            x = cfg.scale_min + consts["factor"][c] * (G - consts["shift"][c])
            return cfg.energy_scale * apply(params[c], x, cfg.activations) + cfg.offsets[c]

        e, vjp = jax.vjp(energies, G)
        grads.append(vjp(jnp.ones_like(e))[0])
        atomic = atomic.at[fr[f"atom{c}"]].add(e)
    atomic = atomic.at[n_cap - 1].set(0.0)  # the dummy slot collects padded rows
    energy = jnp.sum(atomic)
    forces = jnp.zeros((n_cap, 3), atomic.dtype)
    virial = jnp.zeros((3, 3), atomic.dtype)
    for b, cols in enumerate(cfg.columns):
        c = b // cfg.n_elements
        gE = grads[c][fr[f"row{b}"]][:, np.asarray(cols)]
        g = jnp.einsum("pk,pkx->px", gE, fr[f"dG{b}"])
        forces = forces + jax.ops.segment_sum(g, fr[f"i{b}"], n_cap) - jax.ops.segment_sum(g, fr[f"j{b}"], n_cap)
        virial = virial + jnp.einsum("px,py->xy", fr[f"d{b}"], g)
    return energy, forces, virial


def batch_errors(cfg: StepConfig, params, consts, batch: dict, valid):
    """Per-batch sums of squared errors and counts: energy per atom (eV/atom), force components (eV/Å), stress
    components (``stress_sse``, eV/Å³) and the same as virial per atom (``virial_sse``, eV/atom, for the loss).

    ``batch``: the frames' records with a leading batch axis (B, ...) (:mod:`mlmd_lab.train.data`); ``valid`` (B,)
    False for slots that only pad the last batch.
    """
    return errors_of(batch, valid, batch_predict(cfg, params, consts, batch))


def batch_predict(cfg: StepConfig, params, consts, batch: dict):
    """(energies (B,), forces (B, n_cap, 3), virials (B, 3, 3)) of a batch's frames (:func:`frame_predict`)."""
    fr = {k: v for k, v in batch.items() if not k.startswith("_")}
    return jax.vmap(lambda f: frame_predict(cfg, params, consts, f))(fr)


def errors_of(batch: dict, valid, predictions):
    """:func:`batch_errors` of given predictions (:func:`batch_predict`'s)."""
    fr = {k: v for k, v in batch.items() if not k.startswith("_")}
    fr["valid"] = valid
    energy, forces, virial = predictions
    de = (energy - fr["energy"]) / fr["n_atoms"]
    e_mask = fr["has_energy"] & fr["valid"]
    f_mask = (fr["force_mask"] & (fr["has_forces"] & fr["valid"])[:, None])[:, :, None]
    df = jnp.where(f_mask, forces - fr["forces"], 0.0)
    stress = virial / fr["volume"][:, None, None]
    s_mask = (fr["has_stress"] & fr["valid"])[:, None, None]
    ds = jnp.where(s_mask, stress - fr["stress"], 0.0)  # stress error (eV/Å³): what is reported
    # The loss takes it as virial error per atom (eV/atom): comparable with energies for any cell size.
    dv = ds * (fr["volume"] / fr["n_atoms"])[:, None, None]
    return {
        "energy_sse": jnp.sum(jnp.where(e_mask, de, 0.0) ** 2), "energy_n": jnp.sum(e_mask),
        "force_sse": jnp.sum(df**2), "force_n": 3 * jnp.sum(f_mask),
        "stress_sse": jnp.sum(ds**2), "virial_sse": jnp.sum(dv**2), "stress_n": 9 * jnp.sum(s_mask),
        # per frame (B,): predicted minus reference energy (eV), NaN where the frame has none or is padding
        "energy_error": jnp.where(e_mask, energy - fr["energy"], jnp.nan),
    }


def loss_of(cfg: StepConfig, errors: dict, energy_weight=None):
    """The weighted mean squared errors; ``energy_weight`` (a traced scalar) replaces ``cfg.weights[0]`` when
    given (a schedule of it needs no new compilation)."""
    w_e, w_f, w_s = cfg.weights
    if energy_weight is not None:
        w_e = energy_weight
    loss = w_e * errors["energy_sse"] / jnp.maximum(errors["energy_n"], 1)
    loss = loss + w_f * errors["force_sse"] / jnp.maximum(errors["force_n"], 1)
    return loss + w_s * errors["virial_sse"] / jnp.maximum(errors["stress_n"], 1)


def make_functions(cfg: StepConfig, optimizer):
    """(train_step, evaluate): compiled functions over device-resident stacked data.

    ``train_step(params, opt_state, consts, batch, valid, learning_rate, energy_weight) -> (params, opt_state,
    loss, errors)`` moves the parameters by ``-learning_rate`` times the ``optimizer``'s update (e.g. Adam's
    scaled gradient, ``optax.scale_by_adam``) of the loss with this energy weight; both are arguments, so
    schedules of any length need one compilation.
    ``evaluate(params, consts, batch, valid) -> errors`` (sums, see :func:`batch_errors`).
    """

    def loss_fn(params, consts, batch, valid, energy_weight):
        errors = batch_errors(cfg, params, consts, batch, valid)
        return loss_of(cfg, errors, energy_weight), errors

    @jax.jit
    def train_step(params, opt_state, consts, batch, valid, learning_rate, energy_weight):
        (loss, errors), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, consts, batch, valid,
                                                                          energy_weight)
        updates, opt_state = optimizer.update(grads, opt_state, params, value=loss)
        params = jax.tree.map(lambda p, u: p - learning_rate * u, params, updates)
        return params, opt_state, loss, errors

    return train_step, make_evaluate(cfg)


def make_evaluate(cfg: StepConfig):
    """``evaluate(params, consts, batch, valid) -> errors`` compiled (sums, see :func:`batch_errors`); every
    optimiser's validation uses it."""

    @jax.jit
    def evaluate(params, consts, batch, valid):
        return batch_errors(cfg, params, consts, batch, valid)

    return evaluate


@jax.jit
def average_step(average, params, count, decay):
    """The exponential moving average of the parameters after one more optimiser step: ``decay`` per step, with
    TensorFlow's warm-up ``min(decay, (1 + count) / (10 + count))`` (``count``: steps averaged before), so the
    first steps do not keep the untrained weights."""
    rate = jnp.minimum(decay, (1.0 + count) / (10.0 + count)).astype(jax.tree.leaves(params)[0].dtype)
    return jax.tree.map(lambda a, p: rate * a + (1 - rate) * p, average, params)

