"""Extended Kalman filter training (n2p2's standard global filter), an alternative to Adam: ``optimizer="kalman"``.

The weights w (all elements' networks, flattened: ~1,700 per element for 40 inputs and 2 x 25 hidden nodes) are
the filter's state, with an error covariance P (n x n, float64). Each update takes one frame: its energy per atom,
its :data:`FORCES_PER_UPDATE` force components of largest error (n2p2's ``force_energy_ratio`` 3, selection by
sorted error) and, where it has a stress, its 6 virial components per atom are the observations, the Jacobian
H (m x n) of those predictions with respect to w comes from JAX, and (n2p2's ``KalmanFilter::update``, standard type):

    X = P H^T,  A = H X + I / eta,  K = X A^-1,  P <- P - K X^T + q I,  w <- w + K xi

with xi the observation errors (reference - prediction), eta growing and q decaying by an order of magnitude per
epoch (n2p2's recommended ``kalman_etatau`` and ``kalman_qtau`` of 2.302). The rows are weighted like the loss:
an observation of weight w_k has its row of H and its error scaled by sqrt(w_k / force_weight), i.e. its noise
divided by w_k / force_weight.

Why one update with all of a frame's observations rather than n2p2's separate energy and force updates: the cost
of an update is reading and writing P (93 MB in float64 for 3,400 weights), nearly the same for 1 or 4
observations, while sequential and joint updates of a linear model give the same result (the test shows it).

The update (:func:`kalman_update`) is a pure function; :func:`make_functions` gives a step with the signature of
:func:`mlmd_lab.train.step.make_functions`' ``train_step``, so the trainer's loop, checkpoints and callbacks serve
both optimisers.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from mlmd_lab.train.step import StepConfig, batch_predict, errors_of, frame_predict, loss_of, make_evaluate

#: P starts as I / epsilon (n2p2's recommendation for tanh networks: 0.01).
EPSILON = 1e-2
#: Process noise q: from Q0, down an order of magnitude per epoch (QTAU = ln 10), not below QMIN.
Q0, QTAU, QMIN = 0.01, 2.302, 1e-6
#: Observation noise 1 / eta: eta from ETA0, up an order of magnitude per epoch, at most ETAMAX.
ETA0, ETATAU, ETAMAX = 0.01, 2.302, 1.0
#: Force components per update, beside the energy (n2p2's recommended force_energy_ratio of 3).
FORCES_PER_UPDATE = 3


def init_state(params) -> dict:
    """The filter's state for ``params`` (a list over elements of weight pytrees): P as one diagonal block per
    element, each I / :data:`EPSILON` (float64), q and eta.

    Why blocks per element (the decoupled filter of Puskorius and Feldkamp; n2p2 decouples by element too): an
    update reads and writes P, so its cost is the sum of the blocks' squares, half of the global filter's for two
    elements (measured for 3,402 weights and 10 observations: 72 ms per update global, see
    benchmarks/bench_train.py --case optimizers for the whole epoch)."""
    blocks = tuple(int(ravel_pytree(element)[0].size) for element in params)
    return {"P": tuple(jnp.eye(n, dtype=jnp.float64) / EPSILON for n in blocks),
            "q": jnp.asarray(Q0, jnp.float64), "eta": jnp.asarray(ETA0, jnp.float64)}


def kalman_update(w, P, H, xi, eta, q):
    """One standard Kalman update (float64), global or decoupled.

    Args:
        w: state (n,). P: error covariance (n, n), or a tuple of diagonal blocks over consecutive parts of w
            (the decoupled filter: the blocks share the innovation covariance A, each gets its own gain).
        H: Jacobian of the m observations (m, n); xi: observation errors (m,), reference minus prediction;
        eta: inverse observation noise; q: process noise added to P's diagonal after the update.

    Returns:
        (w, P) updated, P in the form given.
    """
    blocks = P if isinstance(P, tuple) else (P,)
    edges = np.cumsum([0] + [b.shape[0] for b in blocks])
    Hs = [H[:, a:b] for a, b in zip(edges[:-1], edges[1:], strict=True)]
    Xs = [Pb @ Hb.T for Pb, Hb in zip(blocks, Hs, strict=True)]  # (n_b, m)
    A = sum(Hb @ Xb for Hb, Xb in zip(Hs, Xs, strict=True)) + jnp.eye(H.shape[0], dtype=H.dtype) / eta
    new_w, new_P = [], []
    for Pb, Xb, a, b in zip(blocks, Xs, edges[:-1], edges[1:], strict=True):
        Kb = jnp.linalg.solve(A, Xb.T).T  # X A^-1 (A is symmetric)
        n = Pb.shape[0]
        new_P.append((Pb - Kb @ Xb.T).at[jnp.arange(n), jnp.arange(n)].add(q))
        new_w.append(w[a:b] + Kb @ xi)
    return jnp.concatenate(new_w), tuple(new_P) if isinstance(P, tuple) else new_P[0]


def make_functions(cfg: StepConfig, params, updates_per_epoch: int):
    """(train_step, evaluate) as :func:`mlmd_lab.train.step.make_functions`, with the Kalman filter as the
    optimiser: ``train_step(params, state, consts, batch, valid, learning_rate, energy_weight)`` takes a batch of
    one frame (its leading axis of 1) and ignores ``learning_rate`` and ``energy_weight`` (the filter weighs the
    energy by ``cfg.weights``); ``state`` is :func:`init_state`'s."""
    _, unravel = ravel_pytree(params)
    q_decay = math.exp(-QTAU / max(1, updates_per_epoch))
    eta_growth = math.exp(ETATAU / max(1, updates_per_epoch))
    w_e, w_f, w_s = cfg.weights
    energy_scale = math.sqrt(w_e / w_f) if w_f > 0 else 1.0
    # The loss sums the 9 virial components, so the 3 off-diagonal pairs count twice: weight 2 on 6 components.
    virial_scale = jnp.asarray([1.0, 1.0, 1.0, 2.0, 2.0, 2.0]) ** 0.5 * (math.sqrt(w_s / w_f) if w_f > 0 else 1.0)
    voigt = (jnp.array([0, 1, 2, 1, 0, 0]), jnp.array([0, 1, 2, 2, 2, 1]))

    def virial_per_atom(virial, fr):
        """The 6 independent virial components per atom (eV/atom), weighted as the loss weighs them."""
        return virial[voigt] / fr["n_atoms"] * virial_scale

    def observations(w, consts, fr, idx):
        energy, forces, virial = frame_predict(cfg, unravel(w), consts, fr)
        return jnp.concatenate([(energy / fr["n_atoms"] * energy_scale)[None], forces.ravel()[idx],
                                virial_per_atom(virial, fr)])

    @jax.jit
    def train_step(params, state, consts, batch, valid, learning_rate, energy_weight):
        predictions = batch_predict(cfg, params, consts, batch)  # one forward pass for the errors and the filter
        errors = errors_of(batch, valid, predictions)
        fr = {k: v[0] for k, v in batch.items() if not k.startswith("_")}
        w, _ = ravel_pytree(params)
        energy, forces, virial = (x[0] for x in predictions)
        f_ok = jnp.broadcast_to((fr["force_mask"] & fr["has_forces"] & valid[0])[:, None], forces.shape).ravel()
        d_f = jnp.where(f_ok, (fr["forces"] - forces).ravel(), 0.0)
        _, idx = jax.lax.top_k(jnp.abs(d_f), min(FORCES_PER_UPDATE, d_f.size))
        e_ok = fr["has_energy"] & valid[0]
        d_e = jnp.where(e_ok, (fr["energy"] - energy) / fr["n_atoms"] * energy_scale, 0.0)
        s_ok = fr["has_stress"] & valid[0]
        d_v = jnp.where(s_ok, virial_per_atom(fr["stress"] * fr["volume"], fr) - virial_per_atom(virial, fr), 0.0)
        xi = jnp.concatenate([d_e[None], d_f[idx], d_v]).astype(jnp.float64)
        ok = jnp.concatenate([e_ok[None], f_ok[idx], jnp.broadcast_to(s_ok, (6,))])
        H = jnp.where(ok[:, None], jax.jacrev(observations)(w, consts, fr, idx), 0.0).astype(jnp.float64)
        eta = jnp.minimum(state["eta"] * eta_growth, ETAMAX)
        w_new, P = kalman_update(w.astype(jnp.float64), state["P"], H, xi, eta, state["q"])
        state = {"P": P, "q": jnp.maximum(state["q"] * q_decay, QMIN), "eta": eta}
        return unravel(w_new.astype(w.dtype)), state, loss_of(cfg, errors), errors

    return train_step, make_evaluate(cfg)
