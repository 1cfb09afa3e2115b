"""Integrators as pure JAX step functions: NVE, Langevin and Nosé–Hoover-chain NVT, stochastic-cell-rescaling NPT.

Units are ASE's throughout: positions Å, momenta amu·Å per ASE time unit, forces eV/Å, energies eV, masses
amu, times in ASE time units (``timestep_fs * ase.units.fs``), pressures eV/Å³.

- ``nve``: velocity Verlet.
- ``langevin``: BAOAB splitting (Leimkuhler & Matthews 2013), friction 1/``tau``; exact Ornstein–Uhlenbeck
  step, so configurational averages are accurate to second order in the time step.
- ``nose-hoover``: a Nosé–Hoover chain of length 3 (Martyna, Tuckerman, Klein 1992) integrated with the
  Trotter factorisation and Suzuki–Yoshida weights of Martyna et al., Mol. Phys. 87, 1117 (1996); masses
  Q1 = g kT tau², Qj = kT tau². Its conserved energy is reported, a check on the integration.
- ``npt``: stochastic cell rescaling (Bernetti & Bussi, J. Chem. Phys. 153, 114107 (2020)) with a Langevin
  thermostat. ``isotropic`` scales the cell uniformly; ``anisotropic`` scales the three Cartesian axes
  independently (each with its own diagonal pressure component; shear stays fixed). It samples the
  isothermal–isobaric ensemble, volume fluctuations included, and needs no barostat mass. Chosen over an
  MTK barostat because it is first order (no barostat oscillations to damp) yet gives correct fluctuations.

Why not jax-md's ``simulate``: it does not import with current JAX (see :mod:`mlmd_lab.md.forcefield`), and it
has no fixed atoms, no degree-of-freedom bookkeeping for them, and no anisotropic barostat.

A step function has the signature ``step(state, constants, key, initial) -> state`` (``initial``: see
:func:`make_step`); ``force(positions, cell)`` returns a
dict with energy, forces, virial, extrapolation and force_std (see :class:`~mlmd_lab.md.forcefield.ForceField`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

ENSEMBLES = ("nve", "langevin", "nose-hoover", "npt")
CHAIN_LENGTH = 3
_W1 = 1.0 / (2.0 - 2.0 ** (1.0 / 3.0))
_YOSHIDA = (_W1, 1.0 - 2.0 * _W1, _W1)


class MDState(NamedTuple):
    """Everything the integrators carry (a JAX pytree).

    positions (N, 3) Å, unwrapped; momenta (N, 3); forces (N, 3) eV/Å; energy () eV (potential);
    virial (3, 3) eV (dE/d strain); cell (3, 3) Å; extrapolation (N,); force_std (N,) eV/Å;
    chain_positions, chain_velocities (CHAIN_LENGTH,) Nosé–Hoover chain; heat () eV put into the system by
    stochastic thermostats and barostats (so that energy - heat is conserved); step () int.
    """

    positions: jax.Array
    momenta: jax.Array
    forces: jax.Array
    energy: jax.Array
    virial: jax.Array
    cell: jax.Array
    extrapolation: jax.Array
    force_std: jax.Array
    chain_positions: jax.Array
    chain_velocities: jax.Array
    heat: jax.Array
    step: jax.Array


def kinetic_energy(momenta, masses, free) -> jax.Array:
    """Kinetic energy (eV) of the free atoms; masses (N, 1) amu, free (N, 1) 0/1."""
    return 0.5 * jnp.sum(free * momenta * momenta / masses)


def kinetic_tensor(momenta, masses, free) -> jax.Array:
    """Sum over atoms of p ⊗ p / m (3, 3), eV."""
    v = free * momenta / masses
    return jnp.einsum("na,nb->ab", v, momenta)


def chain_masses(kT: float, dof: int, tau: float) -> np.ndarray:
    """Nosé–Hoover chain masses (eV · time²): Q1 = g kT tau², Qj = kT tau²."""
    Q = np.full(CHAIN_LENGTH, kT * tau * tau)
    Q[0] *= dof
    return Q


def extended_energy(kind: str, state: MDState, constants: dict) -> jax.Array:
    """What the integrator conserves besides potential + kinetic energy (eV): the chain's energy for
    Nosé–Hoover, minus the heat exchanged for Langevin; NaN for NPT (its scaling step changes the potential
    energy without a force evaluation to measure it)."""
    if kind == "nose-hoover":
        Q, kT, g = constants["chain_masses"], constants["kT"], constants["dof"]
        v, xi = state.chain_velocities, state.chain_positions
        return 0.5 * jnp.sum(Q * v * v) + g * kT * xi[0] + kT * jnp.sum(xi[1:])
    if kind == "npt":
        return jnp.array(jnp.nan)
    return -state.heat


def make_step(kind: str, force: Callable, anisotropic: bool = False) -> Callable:
    """The step function of ``kind`` (one of :data:`ENSEMBLES`) for a force function ``force(R, h)``.

    ``constants`` (a dict of arrays) holds: dt, masses (N, 1), free (N, 1), kT, dof, friction (1/time),
    chain_masses (CHAIN_LENGTH,), pressure (eV/Å³), barostat_rate (compressibility / tau_p, Å³/(eV·time)).
    The returned ``step(state, constants, key, initial)`` takes one step; with ``initial`` (a traced bool) true
    it only calls ``force`` at the state's own positions and cell (nothing moves, the step count stays).
    """

    def kick(state: MDState, c: dict) -> MDState:
        return state._replace(momenta=state.momenta + 0.5 * c["dt"] * state.forces)

    def drift(state: MDState, c: dict, fraction: float) -> MDState:
        velocity = c["free"] * state.momenta / c["masses"]
        return state._replace(positions=state.positions + fraction * c["dt"] * velocity)

    def evaluate(state: MDState, c: dict) -> MDState:
        out = force(state.positions, state.cell)
        return state._replace(forces=out["forces"] * c["free"], energy=out["energy"], virial=out["virial"],
                              extrapolation=out["extrapolation"], force_std=out["force_std"])

    def ornstein_uhlenbeck(state: MDState, c: dict, key) -> MDState:
        c1 = jnp.exp(-c["friction"] * c["dt"])
        c2 = jnp.sqrt(1.0 - c1 * c1)
        noise = jax.random.normal(key, state.momenta.shape, state.momenta.dtype)
        before = kinetic_energy(state.momenta, c["masses"], c["free"])
        momenta = c["free"] * (c1 * state.momenta + c2 * jnp.sqrt(c["masses"] * c["kT"]) * noise)
        after = kinetic_energy(momenta, c["masses"], c["free"])
        return state._replace(momenta=momenta, heat=state.heat + after - before)

    # Each step is (before the force call) -> evaluate -> (after it), so that a step can also be taken as the
    # force call alone (``initial``): the MD block then computes the starting forces with its own force call, and a
    # run compiles one program instead of two (the potential's forces are most of either program's compile time).
    def before_baoab(state: MDState, c: dict, key) -> MDState:
        state = drift(kick(state, c), c, 0.5)
        return drift(ornstein_uhlenbeck(state, c, key), c, 0.5)

    def before_nve(state, c, key):
        return drift(kick(state, c), c, 1.0)

    def before_nose_hoover(state, c, key):
        return drift(kick(_chain_half_step(state, c), c), c, 1.0)

    def after_nose_hoover(state, c):
        return _chain_half_step(kick(state, c), c)

    def before_npt(state, c, key):
        key_cell, key_thermostat = jax.random.split(key)
        return before_baoab(_rescale_cell(state, c, key_cell, anisotropic), c, key_thermostat)

    halves = {"nve": (before_nve, kick), "langevin": (before_baoab, kick),
              "nose-hoover": (before_nose_hoover, after_nose_hoover), "npt": (before_npt, kick)}
    to_force, from_force = halves[kind]

    def step(state: MDState, constants: dict, key, initial) -> MDState:
        moved = jax.lax.cond(initial, lambda s: s, lambda s: to_force(s, constants, key), state)
        new = jax.lax.cond(initial, lambda s: s, lambda s: from_force(s, constants), evaluate(moved, constants))
        return new._replace(step=state.step + jnp.where(initial, 0, 1).astype(state.step.dtype))

    return step


def _chain_half_step(state: MDState, c: dict) -> MDState:
    """exp(iL_NHC dt/2): the chain thermostat acting for half a time step (Suzuki–Yoshida order 3, nc = 1)."""
    Q, kT, g, dt = c["chain_masses"], c["kT"], c["dof"], c["dt"]
    M = CHAIN_LENGTH
    v = [state.chain_velocities[j] for j in range(M)]
    xi = [state.chain_positions[j] for j in range(M)]
    K2 = 2.0 * kinetic_energy(state.momenta, c["masses"], c["free"])
    scale = jnp.ones((), state.momenta.dtype)
    for w in _YOSHIDA:
        delta = w * dt
        G = [(K2 - g * kT) / Q[0]] + [(Q[j - 1] * v[j - 1] ** 2 - kT) / Q[j] for j in range(1, M)]
        v[M - 1] = v[M - 1] + 0.25 * delta * G[M - 1]
        for j in range(M - 2, -1, -1):
            a = jnp.exp(-0.125 * delta * v[j + 1])
            v[j] = (v[j] * a + 0.25 * delta * G[j]) * a
        s = jnp.exp(-0.5 * delta * v[0])
        scale = scale * s
        K2 = K2 * s * s
        xi = [xi[j] + 0.5 * delta * v[j] for j in range(M)]
        G[0] = (K2 - g * kT) / Q[0]
        for j in range(M - 1):
            a = jnp.exp(-0.125 * delta * v[j + 1])
            v[j] = (v[j] * a + 0.25 * delta * G[j]) * a
            G[j + 1] = (Q[j] * v[j] ** 2 - kT) / Q[j + 1]
        v[M - 1] = v[M - 1] + 0.25 * delta * G[M - 1]
    return state._replace(momenta=state.momenta * scale, chain_velocities=jnp.stack(v), chain_positions=jnp.stack(xi))


def _rescale_cell(state: MDState, c: dict, key, anisotropic: bool) -> MDState:
    """One stochastic cell-rescaling step over dt (Euler–Maruyama on eps = ln V, or ln L per axis).

    d eps = -(beta/tau) (P0 - P - kT/V) dt + sqrt(2 kT beta dt / (V tau)) dW, with P the instantaneous pressure
    (kinetic included); positions and cell scale by exp(d eps / 3), momenta by its inverse. Per axis the rate and
    noise variance are a third, so that the volume moves as in the isotropic case.
    """
    kT, dt, P0, rate = c["kT"], c["dt"], c["pressure"], c["barostat_rate"]
    volume = jnp.abs(jnp.linalg.det(state.cell))
    pressure_tensor = (kinetic_tensor(state.momenta, c["masses"], c["free"]) - state.virial) / volume
    if anisotropic:
        p = jnp.diagonal(pressure_tensor)
        noise = jax.random.normal(key, (3,), volume.dtype)
        d_eps = -(rate / 3.0) * (P0 - p - kT / volume) * dt + jnp.sqrt(2.0 * kT * rate * dt / (3.0 * volume)) * noise
    else:
        p = jnp.trace(pressure_tensor) / 3.0
        noise = jax.random.normal(key, (), volume.dtype)
        d_ln_v = -rate * (P0 - p - kT / volume) * dt + jnp.sqrt(2.0 * kT * rate * dt / volume) * noise
        d_eps = jnp.full(3, d_ln_v / 3.0)
    stretch = jnp.exp(d_eps)
    before = kinetic_energy(state.momenta, c["masses"], c["free"])
    momenta = state.momenta / stretch
    after = kinetic_energy(momenta, c["masses"], c["free"])
    return state._replace(positions=state.positions * stretch, cell=state.cell * stretch, momenta=momenta,
                          heat=state.heat + after - before)
