"""The exact SLHMC kernel: momentum refresh, the ML proposal map, the Metropolis tests (NVE trial, ln V move).

Units are ASE's: positions Å, momenta amu·Å/(ASE time), masses amu, energies eV, times in ASE units
(``timestep_fs * ase.units.fs``), volumes Å³, pressures eV/Å³, kT in eV.

**One hybrid Monte Carlo trial** from the chain state (r, U_ref(r)):

1. p ~ exp(-K(p)/kT), K = sum_i |p_i|²/(2 m_i) over the free atoms (fixed atoms keep p = 0);
2. (r', p') = Φ(r, p): ``md_steps`` velocity-Verlet steps with the ML forces. Φ is deterministic, time
   reversible (Φ(r', -p') = (r, -p)) and volume preserving (|det ∂Φ| = 1): each step is a composition of
   shears (kick, drift, kick), each with unit Jacobian;
3. one reference energy U_ref(r');
4. accept with min(1, exp(-β[H' - H])), H = K + U_ref. The ML energy appears nowhere in the test.

Detailed balance: with the involution F(r, p) = (r', -p') (= flip ∘ Φ; K is even in p) and the unit Jacobian,
π(r, p) min(1, π(F(r, p))/π(r, p)) is symmetric, π ∝ exp(-βH), whatever the ML forces are. Neighbour lists
are an implementation detail: every step uses lists that hold all pairs within the cutoff (skin rule), so Φ is
the exact velocity-Verlet map of the ML potential, a function of (r, p) alone.

**ln V move (NPT)**: δ ~ U(-Δ, Δ), V' = V e^δ, positions and cell scaled by e^(δ/3) (fractional coordinates
s fixed). The target in (s, V) is V^N exp(-β[U + PV]) (the Jacobian of r = V^(1/3) s in 3N dimensions); in
(s, ln V) it gains dV = V d(ln V): V^(N+1) exp(-β[U + PV]). The proposal is symmetric in ln V, so

    A = min(1, exp(-β[U_ref(s, V') - U_ref(s, V) + P (V' - V)] + (N + 1) ln(V'/V))).

For an ideal gas (U = 0) the chain's volume density is then V^N e^(-βPV): a Gamma(N+1, kT/P), ⟨V⟩ = (N+1)kT/P.

**Delayed acceptance** (optional; Christen & Fox 2005): first accept with a1 = min(1, exp(-βΔH_ML)) using the
ML energies only; only then call the reference and accept with a2 = min(1, exp(-β[ΔH_ref - ΔH_ML])). With
q ∝ exp(-βH_ML) and y = F(x): π(x) a1 a2 = min(π(x), π(x) q(y)/q(x), ..., π(y)) is symmetric in x <-> y, so the
kernel stays exact; proposals the ML already rejects cost no reference call.

The few functions prefixed with an underscore below are the seams of the method (refresh, Hamiltonian,
acceptance energy, in-trajectory momentum update, Jacobian); the tests replace each by a deliberately wrong
version and check that the exactness test catches it.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import Calculator, all_changes

from mlmd_lab.errors import MLMDError
from mlmd_lab.md.forcefield import ForceField, neighbours_valid

#: Why a trial whose ML trajectory went non-finite was rejected (no reference call is made for it).
BLEW_UP = "the ML trajectory blew up (non-finite energy, positions or momenta)"


# ------------------------------------------------------------------------------------------- the seams
def _refresh_momenta(rng: np.random.Generator, masses: np.ndarray, free: np.ndarray, kT: float,
                     previous: np.ndarray) -> np.ndarray:
    """Fresh Maxwell–Boltzmann momenta (N, 3) at kT (eV), zero for fixed atoms; ``previous`` is unused.

    No centre-of-mass removal and no rescaling: exactly the Gaussian exp(-K/kT) the acceptance test assumes.
    """
    p = rng.standard_normal(masses.shape[:1] + (3,)) * np.sqrt(masses * kT)
    return p * free


def _hamiltonian(potential_energy: float, kinetic_energy: float) -> float:
    """H = U + K (eV)."""
    return potential_energy + kinetic_energy


def _acceptance_energy(reference_energy: float, ml_energy: float) -> float:
    """The potential energy in the Metropolis test (eV): the reference one, never the ML one."""
    return reference_energy


def _trajectory_hook(momenta, dt: float):
    """What happens to the momenta at the end of each velocity-Verlet step: nothing (no thermostat)."""
    return momenta


def _log_jacobian(n_atoms: int, volume: float, new_volume: float) -> float:
    """ln of the target-density factor of a ln V move: (N + 1) ln(V'/V) (see the module docstring)."""
    return (n_atoms + 1) * float(np.log(new_volume / volume))


# ------------------------------------------------------------------------------------------- the tests
def kinetic_energy(momenta: np.ndarray, masses: np.ndarray, free: np.ndarray) -> float:
    """K = sum |p|²/(2m) over free atoms (eV); momenta (N, 3), masses and free (N, 1)."""
    return float(0.5 * np.sum(free * momenta * momenta / masses))


def log_acceptance_nve(kT: float, old: dict, new: dict) -> float:
    """ln of the Metropolis ratio of an NVE trial: -β[H(r', p') - H(r, p)]; ``old``/``new`` hold
    e_ref, e_ml and kinetic (eV). NaN energies (a failed reference, a blown-up trajectory) give -inf."""
    h_old = _hamiltonian(_acceptance_energy(old["e_ref"], old["e_ml"]), old["kinetic"])
    h_new = _hamiltonian(_acceptance_energy(new["e_ref"], new["e_ml"]), new["kinetic"])
    delta = h_new - h_old
    return -delta / kT if np.isfinite(delta) else -np.inf


def log_screen_nve(kT: float, old: dict, new: dict) -> float:
    """ln of the first-stage ratio of delayed acceptance: -β[H_ML(r', p') - H_ML(r, p)] (ML energies)."""
    delta = _hamiltonian(new["e_ml"], new["kinetic"]) - _hamiltonian(old["e_ml"], old["kinetic"])
    return -delta / kT if np.isfinite(delta) else -np.inf


def log_acceptance_volume(kT: float, pressure: float, n_atoms: int, old: dict, new: dict) -> float:
    """ln of the Metropolis ratio of a ln V move: -β[ΔU_ref + P ΔV] + (N+1) ln(V'/V); pressure eV/Å³."""
    du = _acceptance_energy(new["e_ref"], new["e_ml"]) - _acceptance_energy(old["e_ref"], old["e_ml"])
    dv = new["volume"] - old["volume"]
    value = -(du + pressure * dv) / kT + _log_jacobian(n_atoms, old["volume"], new["volume"])
    return value if np.isfinite(value) else -np.inf


def accept(rng: np.random.Generator, log_ratio: float) -> bool:
    """Metropolis: True with probability min(1, exp(log_ratio)) (one uniform drawn always, for a fixed stream)."""
    u = rng.uniform()
    return bool(log_ratio >= 0.0 or (u > 0.0 and np.log(u) < log_ratio))


def scaled(atoms: Atoms, delta_ln_volume: float) -> Atoms:
    """``atoms`` with the cell and positions scaled isotropically so that ln V changes by ``delta_ln_volume``."""
    out = atoms.copy()
    stretch = float(np.exp(delta_ln_volume / 3.0))
    out.set_cell(atoms.cell.array * stretch, scale_atoms=False)
    out.positions = atoms.positions * stretch
    return out


# ------------------------------------------------------------------------------------------- propagators
def _vv_step(force: Callable, R, P, F, masses, free, dt: float):
    """One velocity-Verlet step (kick, drift, force, kick) and the trajectory hook; numpy or JAX arrays.

    Returns (R', P', F', E') with F' the masked forces and E' the ML energy at R'."""
    R_new, P_half = _vv_drift(R, P, F, masses, free, dt)
    F_new, E_new = force(R_new)
    F_new = F_new * free
    return R_new, _vv_kick(P_half, F_new, dt), F_new, E_new


def _vv_drift(R, P, F, masses, free, dt: float):
    """The velocity-Verlet step before its force call: (R', P at the half step)."""
    P_half = P + 0.5 * dt * F
    return R + dt * free * P_half / masses, P_half


def _vv_kick(P_half, F_new, dt: float):
    """The velocity-Verlet step after its force call (``F_new`` masked): P' with the trajectory hook."""
    return _trajectory_hook(P_half + 0.5 * dt * F_new, dt)


class JaxPropagator:
    """The proposal map Φ on a :class:`~mlmd_lab.md.forcefield.ForceField` (float64 JAX, jit-compiled).

    The trajectory runs compiled in segments with fixed neighbour data (``lax.while_loop``); a step whose
    positions leave the skin rule is not taken, the lists are rebuilt at the last good positions and the
    trajectory goes on. Every force therefore comes from lists holding all pairs within the cutoff, and the
    trajectory is the same function of (r, p) however often the lists are rebuilt.
    """

    def __init__(self, ff: ForceField, atoms: Atoms, free: np.ndarray, dt: float, n_steps: int) -> None:
        if ff.dtype != "float64":
            raise MLMDError("SLHMC needs the potential in float64 (time reversibility to rounding); "
                            "prepare it with forcefield(potential, dtype='float64')")
        self.ff, self.dt, self.n_steps = ff, float(dt), int(n_steps)
        self.pbc = atoms.pbc.copy()
        self.species = ff.species(atoms)
        self.masses = atoms.get_masses()[:, None]
        self.free = free[:, None].astype(float)
        self.layout = None
        self._compiled: dict = {}
        self.rebuilds = 0

    def _segment(self, layout):
        if layout not in self._compiled:
            self._compiled[layout] = jax.jit(self._make_segment(layout))
        return self._compiled[layout]

    def _make_segment(self, layout):
        ff, dt = self.ff, self.dt
        masses, free = jnp.asarray(self.masses), jnp.asarray(self.free)

        def segment(arrays, R, P, h, n_left, params):
            # the weights are an argument: a retrained surrogate of the same kind runs the cached program
            # (ForceField.parameters)
            def force(x):
                out = ff.compute(arrays, layout, x, h, params)
                return out["forces"], out["energy"]

            # One force call site: the loop's first pass only evaluates the forces at R (nothing moves, no step
            # counted); every later pass is _vv_step's drift, force call and kick. A second call site would have
            # XLA compile the whole potential twice in this program.
            def cond(c):
                return c[5] & (c[0] < n_left)

            def body(c):
                k, R_, P_, F_, E_, _, first, E0 = c
                R1, P_half = _vv_drift(R_, P_, F_, masses, free, dt)
                R1 = jnp.where(first, R_, R1)
                F1, E1 = force(R1)
                F1 = F1 * free
                P1 = _vv_kick(P_half, F1, dt)
                ok = neighbours_valid(ff, R1, h, R, h, False)
                step, keep = ok & ~first, ok | first  # keep: the forces and energy at R1 are the state's
                pick = lambda a, b: jnp.where(step, a, b)  # noqa: E731
                return (k + step.astype(k.dtype), pick(R1, R_), pick(P1, P_), jnp.where(keep, F1, F_),
                        jnp.where(keep, E1, E_), keep, jnp.asarray(False), jnp.where(first, E1, E0))

            zero = jnp.zeros((), R.dtype)
            init = (jnp.asarray(0), R, P, jnp.zeros_like(R), zero, jnp.asarray(True), jnp.asarray(True), zero)
            k, R, P, F, E, _, _, E0 = jax.lax.while_loop(cond, body, init)
            return k, R, P, E0, E

        return segment

    def run(self, positions: np.ndarray, momenta: np.ndarray, cell: np.ndarray) -> dict:
        """Φ(r, p): positions (N, 3) Å, momenta (N, 3) -> dict positions, momenta, e_ml_start, e_ml_end (eV)."""
        R, P, h = np.asarray(positions, np.float64), np.asarray(momenta, np.float64), np.asarray(cell, np.float64)
        done, e_start, e_end = 0, None, np.nan
        while done < self.n_steps:
            arrays, self.layout = self.ff.build(R, h, self.pbc, self.species, self.layout, spare=True)
            self.rebuilds += 1
            k, R_j, P_j, E0, E = self._segment(self.layout)(arrays, jnp.asarray(R), jnp.asarray(P), jnp.asarray(h),
                                                           jnp.asarray(self.n_steps - done), self.ff.parameters())
            k = int(k)
            e_start = float(E0) if e_start is None else e_start
            if k == 0 or not np.isfinite(float(E)):
                return {"positions": R, "momenta": P, "e_ml_start": e_start, "e_ml_end": np.nan, "failed": True,
                        "error": self._failure(np.isfinite(float(E)))}
            R, P, e_end = np.asarray(R_j), np.asarray(P_j), float(E)
            done += k
        return {"positions": R, "momenta": P, "e_ml_start": e_start, "e_ml_end": e_end, "failed": False}

    def _failure(self, finite: bool) -> str:
        """Why a segment took no step: its first step left the lists just rebuilt (finite energy: a skin too small
        for one step, or a trajectory running away), or the energy went non-finite."""
        if not finite:
            return BLEW_UP
        return (f"one {self.dt / units.fs:g} fs ML step moved an atom farther than half the neighbour-list skin "
                f"({self.ff.skin:g} Å) right after the lists were rebuilt, so no step could be taken (a skin too "
                f"small for the timestep, or a trajectory running away): give a larger skin= (Å) or a shorter "
                f"timestep= (fs)")

    def energy(self, atoms: Atoms) -> float:
        """ML energy (eV) of a structure (for the log after volume moves)."""
        return float(self.ff.single_point(atoms)["energy"])


class CalculatorPropagator:
    """The proposal map Φ with an ASE calculator's forces (a numpy loop; for analytic surrogates)."""

    def __init__(self, calculator, atoms: Atoms, free: np.ndarray, dt: float, n_steps: int) -> None:
        self.calc, self.dt, self.n_steps = calculator, float(dt), int(n_steps)
        self.atoms = atoms.copy()
        self.atoms.set_constraint()
        self.atoms.calc = calculator
        self.masses = atoms.get_masses()[:, None]
        self.free = free[:, None].astype(float)
        self.rebuilds = 0

    def _force(self, R):
        self.atoms.positions = R
        if isinstance(self.calc, Calculator):  # calculate() directly: ASE's state check costs more than an
            self.calc.calculate(self.atoms, ["energy", "forces"], all_changes)  # analytic potential
            results = self.calc.results
            return np.array(results["forces"], np.float64), float(results["energy"])
        energy = float(self.atoms.get_potential_energy())
        return np.array(self.atoms.get_forces(), np.float64), energy

    def run(self, positions: np.ndarray, momenta: np.ndarray, cell: np.ndarray) -> dict:
        """As :meth:`JaxPropagator.run`."""
        self.atoms.cell = cell
        R, P = np.array(positions, np.float64), np.array(momenta, np.float64)
        F, e_start = self._force(R)
        F = F * self.free
        E = e_start
        for _ in range(self.n_steps):
            R, P, F, E = _vv_step(self._force, R, P, F, self.masses, self.free, self.dt)
        failed = not (np.isfinite(E) and np.all(np.isfinite(R)) and np.all(np.isfinite(P)))
        return {"positions": R, "momenta": P, "e_ml_start": e_start, "e_ml_end": E, "failed": failed,
                "error": BLEW_UP if failed else ""}

    def energy(self, atoms: Atoms) -> float:
        self.atoms.cell = atoms.cell
        self.atoms.positions = atoms.positions
        return float(self.atoms.get_potential_energy())


def proposal_map(ff: ForceField, atoms: Atoms, timestep_fs: float, md_steps: int,
                 free: np.ndarray | None = None) -> Callable:
    """Φ as a pure JAX function (R, P) -> (R', P') with neighbour data built once at ``atoms.positions``
    (with ``ff``'s skin; for tests of reversibility and of the Jacobian, where atoms stay within the skin).

    R, P: (N, 3) Å and amu·Å/(ASE time). ``lax.fori_loop`` over ``md_steps`` velocity-Verlet steps.
    """
    from ase import units

    species = ff.species(atoms)
    arrays, layout = ff.build(atoms.positions, atoms.cell.array, atoms.pbc, species)
    arrays = {k: jnp.asarray(v) for k, v in arrays.items()}
    h = jnp.asarray(atoms.cell.array)
    masses = jnp.asarray(atoms.get_masses()[:, None])
    free = jnp.ones((len(atoms), 1)) if free is None else jnp.asarray(free[:, None], jnp.float64)
    dt = float(timestep_fs) * units.fs

    def force(x):
        out = ff.compute(arrays, layout, x, h)
        return out["forces"], out["energy"]

    def phi(R, P):
        F = force(R)[0] * free

        def body(_, c):
            R_, P_, F_ = c
            R1, P1, F1, _ = _vv_step(force, R_, P_, F_, masses, free, dt)
            return R1, P1, F1

        R, P, _ = jax.lax.fori_loop(0, int(md_steps), body, (R, P, F))
        return R, P

    return phi
