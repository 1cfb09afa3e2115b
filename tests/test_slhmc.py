"""SLHMC exactness: the proposal map, known ensembles reproduced within 3σ, and broken variants caught.

Every chain has a fixed seed, so each statistical statement below is deterministic. The exactness check of a
chain is two numbers in units of their block-averaged standard errors: the deviation of ⟨U_ref⟩ (or ⟨V⟩ under
NPT) from its exactly known value, and the detailed-balance diagnostic ``SLHMCResult.balance()`` (zero for an
exact kernel). An exact sampler keeps both within 3σ; each deliberate mutant of the kernel (monkeypatched
seams of :mod:`mlmd_lab.slhmc.kernel`, not copied code) must push one of them beyond 5σ.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase import Atoms, units
from ase.calculators.calculator import Calculator, all_changes

from mlmd_lab import slhmc
from mlmd_lab.errors import MLMDError
from mlmd_lab.md.forcefield import LennardJones, forcefield
from mlmd_lab.slhmc import kernel

T = 300.0
KT = units.kB * T


class Polynomial(Calculator):
    """U = sum over coordinates of a x^4 + k x^2 / 2 (eV, Å): an analytic anharmonic well and its harmonic foil."""

    implemented_properties = ["energy", "forces"]

    def __init__(self, a: float = 0.0, k: float = 0.0, fail_beyond: float | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.a, self.k, self.fail_beyond = a, k, fail_beyond

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        x = self.atoms.positions
        if self.fail_beyond is not None and np.abs(x).max() > self.fail_beyond:
            raise RuntimeError("SCF did not converge")  # what a DFT code does on a bad geometry
        self.results = {"energy": float(np.sum(self.a * x**4 + 0.5 * self.k * x**2)),
                        "forces": -(4.0 * self.a * x**3 + self.k * x)}


class Zero(Calculator):
    """The ideal gas: no energy, no forces, no stress."""

    implemented_properties = ["energy", "forces", "stress"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        self.results = {"energy": 0.0, "forces": np.zeros((len(self.atoms), 3)), "stress": np.zeros(6)}


# The quartic well U = a sum x^4 over 3N = 12 coordinates: U/kT per coordinate is Gamma(1/4), so <U> = 3N kT / 4
# exactly. The harmonic surrogate k = sqrt(6 a kT) has <a x^4> = 3 a (kT/k)^2 = kT/2 per coordinate: twice as much.
QUARTIC = Polynomial(a=1.0)
HARMONIC = Polynomial(k=float(np.sqrt(6.0 * KT)))
EXACT_U = 12 * KT / 4
QUARTIC_RUN = dict(temperature=T, n_trials=1500, md_steps=10, timestep=1.0, seed=1)


def four_hydrogens() -> Atoms:
    return Atoms("H4", positions=np.zeros((4, 3)), pbc=False)


def deviation(average, exact: float) -> float:
    return (average.mean - exact) / average.stderr


def exactness(result, exact_energy: float) -> dict[str, float]:
    """Deviations in σ of ⟨U_ref⟩ from the exact value and of the balance diagnostic from zero."""
    return {"energy": deviation(result.averages()["energy"], exact_energy),
            "balance": deviation(result.balance(), 0.0)}


# ---------------------------------------------------------------------------------------------- the proposal map
def lj_cluster() -> tuple[Atoms, LennardJones]:
    lj = LennardJones()  # argon
    r0 = 2 ** (1 / 6) * lj.sigma
    tetra = np.array([[0, 0, 0], [1, 0, 0], [0.5, np.sqrt(3) / 2, 0], [0.5, np.sqrt(3) / 6, np.sqrt(2 / 3)]])
    rng = np.random.default_rng(3)
    atoms = Atoms("Ar4", positions=r0 * tetra + rng.normal(0, 0.05, (4, 3)), pbc=False)
    return atoms, lj


def test_proposal_map_is_reversible_and_volume_preserving():
    atoms, lj = lj_cluster()
    ff = forcefield(lj, skin=3.0, dtype="float64")
    phi = jax.jit(kernel.proposal_map(ff, atoms, timestep_fs=5.0, md_steps=20))
    rng = np.random.default_rng(0)
    R = jnp.asarray(atoms.positions)
    P = jnp.asarray(rng.standard_normal((4, 3)) * np.sqrt(atoms.get_masses()[:, None] * units.kB * 40.0))
    R1, P1 = phi(R, P)
    assert float(jnp.max(jnp.abs(R1 - R))) > 0.05  # it went somewhere
    R2, P2 = phi(R1, -P1)
    assert float(jnp.max(jnp.abs(R2 - R))) < 1e-10
    assert float(jnp.max(jnp.abs(P2 + P))) < 1e-10

    def flat(x):
        r, p = phi(x[:12].reshape(4, 3), x[12:].reshape(4, 3))
        return jnp.concatenate([r.ravel(), p.ravel()])

    jacobian = jax.jacfwd(flat)(jnp.concatenate([R.ravel(), P.ravel()]))
    assert abs(float(jnp.linalg.det(jacobian)) - 1.0) < 1e-9


def test_neighbour_rebuilds_do_not_change_the_trajectory():
    """The compiled propagator rebuilds its lists whenever the skin rule fails; the map stays Φ(r, p)."""
    atoms, lj = lj_cluster()
    phi = kernel.proposal_map(forcefield(lj, skin=3.0, dtype="float64"), atoms, timestep_fs=5.0, md_steps=20)
    rng = np.random.default_rng(1)
    P = rng.standard_normal((4, 3)) * np.sqrt(atoms.get_masses()[:, None] * units.kB * 40.0)
    thin = kernel.JaxPropagator(forcefield(lj, skin=0.02, dtype="float64"), atoms, np.ones(4, bool),
                                5.0 * units.fs, 20)
    out = thin.run(atoms.positions, P, atoms.cell.array)
    assert thin.rebuilds > 2
    R1, P1 = phi(jnp.asarray(atoms.positions), jnp.asarray(P))
    assert np.max(np.abs(out["positions"] - np.asarray(R1))) < 1e-12
    assert np.max(np.abs(out["momenta"] - np.asarray(P1))) < 1e-12


def test_a_skin_too_small_for_one_step_is_named_once_and_a_working_skin_is_silent():
    """With a skin far below one step's displacement every trial is rejected before the reference; the warning
    says why (the skin, and the fix) once, not per trial. The same chain with a sound skin warns of nothing."""
    import warnings

    atoms, lj = lj_cluster()
    reference = PairLJ(lj.epsilon, lj.sigma)
    run = dict(temperature=120.0, n_trials=4, md_steps=5, timestep=5.0, seed=2)
    with pytest.warns(UserWarning, match="farther than half the neighbour-list skin") as caught:
        thin = slhmc.run(reference, lj, atoms, skin=1e-5, **run)
    assert thin.failed.all() and thin.n_reference_calls == 1  # the start only
    assert sum("skin" in str(w.message) for w in caught) == 1
    assert "skin= (Å)" in str(caught[0].message) and "timestep= (fs)" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sound = slhmc.run(reference, lj, atoms, skin=1.0, **run)
    assert not sound.failed.any()


def _equations(jaxpr) -> int:
    """Equations of a jaxpr, those of its inner jaxprs (loops, branches, calls) included."""
    count = 0
    for eqn in jaxpr.eqns:
        count += 1
        for value in eqn.params.values():
            for inner in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(inner, "jaxpr", inner)
                if hasattr(inner, "eqns"):
                    count += _equations(inner)
    return count


def test_the_compiled_segment_holds_the_potential_once():
    """The segment's starting forces come from its loop's own force call: a second call site would have XLA
    compile the whole potential twice in one program (1,080-atom water: 4.6 -> 3.3 s to the first segment's result)."""
    from conftest import random_cu_s_cell, random_cu_s_model

    atoms = random_cu_s_cell()
    ff = forcefield(random_cu_s_model(), dtype="float64")
    prop = kernel.JaxPropagator(ff, atoms, np.ones(len(atoms), bool), 1.0 * units.fs, 5)
    R, h = atoms.positions, atoms.cell.array
    arrays, layout = ff.build(R, h, atoms.pbc, prop.species, None)
    params = ff.parameters()
    force = jax.make_jaxpr(lambda a, x, c, w: ff.compute(a, layout, x, c, w)["forces"])(arrays, R, h, params)
    segment = jax.make_jaxpr(prop._make_segment(layout))(arrays, R, np.zeros_like(R), h, 5, params)
    assert _equations(force.jaxpr) > 100, "the potential is too small for this count to tell"
    assert _equations(segment.jaxpr) < 1.5 * _equations(force.jaxpr), (
        _equations(segment.jaxpr), _equations(force.jaxpr))


# ---------------------------------------------------------------------------------------------- known ensembles
def test_quartic_well_is_sampled_exactly_while_the_surrogate_ensemble_is_far_off():
    result = slhmc.run(QUARTIC, HARMONIC, four_hydrogens(), **QUARTIC_RUN)
    check = exactness(result, EXACT_U)
    assert abs(check["energy"]) < 3 and abs(check["balance"]) < 3, check
    assert 0.3 < result.acceptance_rate < 0.95
    assert result.n_reference_calls == QUARTIC_RUN["n_trials"] + 1
    # ML-MD's answer: the surrogate's own ensemble (sampled exactly: the surrogate as its own reference),
    # with the reference energy measured on its states.
    surrogate = slhmc.run(HARMONIC, HARMONIC, four_hydrogens(), **QUARTIC_RUN)
    u_ref = np.array([QUARTIC.get_potential_energy(a) for a in surrogate.states])
    from mlmd_lab.analysis import block_average

    off = block_average(u_ref)
    assert abs(off.mean - 2 * EXACT_U) < 3 * off.stderr  # the surrogate's exact <a x^4> = kT/2 per coordinate
    assert (off.mean - EXACT_U) / np.hypot(off.stderr, result.averages()["energy"].stderr) > 10


def _no_refresh(rng, masses, free, kT, previous):
    """Mutant: keep the momenta of the last trial (first trial draws)."""
    if np.any(previous):
        return previous
    return np.random.default_rng(0).standard_normal(previous.shape) * np.sqrt(masses * kT) * free


def _langevin_inside(tau_fs: float):
    """Mutant: a Langevin thermostat (friction 1/tau and its noise) acting inside the trajectory."""
    noise = np.random.default_rng(7)
    masses = four_hydrogens().get_masses()[:, None]

    def hook(momenta, dt):
        c1 = np.exp(-dt / (tau_fs * units.fs))
        return c1 * momenta + np.sqrt(1 - c1 * c1) * np.sqrt(masses * KT) * noise.standard_normal(momenta.shape)

    return hook


#: name -> (seam of mlmd_lab.slhmc.kernel, a factory of its wrong version: fresh noise streams in every test)
MUTANTS = {
    "accept with the ML energy": ("_acceptance_energy", lambda: lambda e_ref, e_ml: e_ml),
    "no kinetic term": ("_hamiltonian", lambda: lambda potential, kinetic: potential),
    "no momentum refresh": ("_refresh_momenta", lambda: _no_refresh),
    "friction inside the trajectory": ("_trajectory_hook",
                                       lambda: lambda momenta, dt: momenta * np.exp(-dt / (20 * units.fs))),
    "Langevin thermostat inside the trajectory": ("_trajectory_hook", lambda: _langevin_inside(5.0)),
}


@pytest.mark.parametrize("name", list(MUTANTS))
def test_mutant_kernels_fail_the_exactness_check(name, monkeypatch):
    seam, make = MUTANTS[name]
    monkeypatch.setattr(kernel, seam, make())
    check = exactness(slhmc.run(QUARTIC, HARMONIC, four_hydrogens(), **QUARTIC_RUN), EXACT_U)
    print(name, check)
    assert max(abs(v) for v in check.values()) > 5, f"{name} passed the exactness check: {check}"


def test_delayed_acceptance_is_exact_and_saves_reference_calls():
    """8 fs steps: the harmonic proposal's own energy error now screens out some proposals before the reference."""
    result = slhmc.run(QUARTIC, HARMONIC, four_hydrogens(), **dict(QUARTIC_RUN, timestep=8.0),
                       delayed_acceptance=True)
    assert abs(deviation(result.averages()["energy"], EXACT_U)) < 3
    screened = int(result.screened.sum())
    assert screened > 50 and not result.accepted[result.screened].any()
    assert result.n_reference_calls == QUARTIC_RUN["n_trials"] + 1 - screened


# ------------------------------------------------------------------------------------------------------- NPT
def ideal_gas(n: int = 2) -> Atoms:
    rng = np.random.default_rng(0)
    return Atoms(f"Ar{n}", positions=rng.uniform(0, 4.6, (n, 3)), cell=[4.6] * 3, pbc=True)


N_GAS = 2
PRESSURE = (N_GAS + 1) * KT / 100.0 / units.GPa  # <V> = (N+1) kT / P = 100 Å3
GAS_RUN = dict(temperature=T, n_trials=4000, md_steps=1, timestep=1.0, ensemble="npt", pressure=PRESSURE,
               volume_step=1.0, seed=0)


def test_npt_ideal_gas_volume_and_pressure_are_exact():
    result = slhmc.run(Zero(), Zero(), ideal_gas(N_GAS), **GAS_RUN)
    averages = result.averages()
    assert abs(deviation(averages["volume"], 100.0)) < 3, averages["volume"]
    # the virial pressure N kT / V averages to P exactly (<1/V> = P / (N kT) for the Gamma(N+1) volumes)
    assert abs(deviation(averages["pressure"], PRESSURE)) < 3, averages["pressure"]
    kinds = result.acceptance_by_kind()
    assert kinds["md"] == 1.0 and 0.3 < kinds["volume"] < 0.9


@pytest.mark.parametrize("factor", ["N", "N+2", "0"])
def test_wrong_volume_jacobians_fail(factor, monkeypatch):
    wrong = {"N": lambda n, v, w: n * np.log(w / v), "N+2": lambda n, v, w: (n + 2) * np.log(w / v),
             "0": lambda n, v, w: 0.0}[factor]
    monkeypatch.setattr(kernel, "_log_jacobian", wrong)
    result = slhmc.run(Zero(), Zero(), ideal_gas(N_GAS), **GAS_RUN)
    dev = deviation(result.averages()["volume"], 100.0)
    print(factor, dev)
    assert abs(dev) > 5, f"Jacobian {factor} passed: {dev:.1f} sigma"


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_input_is_named():
    atoms = four_hydrogens()
    cases = [
        (dict(temperature=0.0, n_trials=1), "temperature"),
        (dict(temperature=-5.0, n_trials=1), "temperature"),
        (dict(temperature=T, n_trials=0), "n_trials"),
        (dict(temperature=T, n_trials=1, timestep=0.0), "timestep"),
        (dict(temperature=T, n_trials=1, timestep=20.0), "timestep"),
        (dict(temperature=T, n_trials=1, ensemble="npt"), "pressure"),
        (dict(temperature=T, n_trials=1, ensemble="nve"), "ensemble"),
        (dict(temperature=T, n_trials=5, learn_trials=2), "retrain"),
    ]
    for kwargs, word in cases:
        with pytest.raises(MLMDError, match=word):
            slhmc.run(QUARTIC, HARMONIC, atoms, **kwargs)
    with pytest.raises(MLMDError, match="periodic"):
        slhmc.run(QUARTIC, HARMONIC, atoms, temperature=T, n_trials=1, ensemble="npt", pressure=1.0)


def test_potential_without_the_structures_elements_is_refused():
    from conftest import random_cu_s_model

    atoms = Atoms("CuO", positions=[[0, 0, 0], [2.0, 0, 0]], pbc=False)
    reference = Counting()
    with pytest.raises(MLMDError, match=r"\['O'\]"):
        slhmc.run(reference, random_cu_s_model(), atoms, temperature=T, n_trials=1)
    assert reference.calls == 0  # refused before the first (DFT) call


def test_a_failing_reference_rejects_and_records_the_trial():
    flaky = Polynomial(a=1.0, fail_beyond=0.45)
    result = slhmc.run(flaky, HARMONIC, four_hydrogens(), temperature=T, n_trials=200, md_steps=10, timestep=1.0)
    assert result.failed.any() and not result.accepted[result.failed].any()
    assert np.all(np.isfinite(result.reference_energies))
    assert result.n_reference_calls == 201


# ------------------------------------------------------------------------------------------------ workdir
class Counting(Polynomial):
    """The quartic reference, counting its calculations."""

    def __init__(self, **kwargs) -> None:
        super().__init__(a=1.0, **kwargs)
        self.calls = 0

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        self.calls += 1
        super().calculate(atoms, properties, system_changes)


def test_workdir_resume_repeats_the_chain_exactly_and_repeats_no_reference_call(tmp_path, monkeypatch):
    from mlmd_lab.slhmc.store import ChainStore

    kw = dict(temperature=T, md_steps=10, timestep=1.0, seed=4)
    whole = slhmc.run(Counting(), HARMONIC, four_hydrogens(), n_trials=20, workdir=tmp_path / "whole", **kw)

    first = slhmc.run(Counting(), HARMONIC, four_hydrogens(), n_trials=10, workdir=tmp_path / "split", **kw)
    assert len(first.accepted) == 10
    # a kill after trial 15's reference call and log row, before its restart: resume must not call again
    original = ChainStore.write_restart

    def killed(self, chain):
        if chain["trial"] == 15:
            raise KeyboardInterrupt("killed")
        original(self, chain)

    monkeypatch.setattr(ChainStore, "write_restart", killed)
    reference = Counting()
    with pytest.raises(KeyboardInterrupt):
        slhmc.run(reference, HARMONIC, four_hydrogens(), n_trials=20, workdir=tmp_path / "split", **kw)
    monkeypatch.setattr(ChainStore, "write_restart", original)
    calls_before = reference.calls
    resumed = slhmc.run(reference, HARMONIC, four_hydrogens(), n_trials=20, workdir=tmp_path / "split", **kw)
    assert reference.calls - calls_before == 5  # trials 16-20; trial 15's result came from reference.traj
    np.testing.assert_array_equal(resumed.accepted, whole.accepted)
    np.testing.assert_array_equal(resumed.reference_energies, whole.reference_energies)
    np.testing.assert_array_equal(resumed.delta_h, whole.delta_h)
    assert resumed.n_reference_calls == whole.n_reference_calls == 21
    assert len(resumed.states) == 20
    np.testing.assert_array_equal(resumed.states[-1].positions, whole.states[-1].positions)
    assert resumed.states[7].get_potential_energy() == whole.reference_energies[7]
    log = (tmp_path / "split" / "chain.log").read_text().splitlines()
    assert log[0].split()[1:] == list(slhmc.LOG_COLUMNS) and len(log) == 21
    with pytest.raises(MLMDError, match="other settings"):
        slhmc.run(Counting(), HARMONIC, four_hydrogens(), n_trials=30, workdir=tmp_path / "split",
                  **dict(kw, seed=5))


def test_on_trial_sees_every_row_and_stops_a_resumable_chain(tmp_path):
    kw = dict(temperature=T, md_steps=10, timestep=1.0, seed=4)
    whole = slhmc.run(Counting(), HARMONIC, four_hydrogens(), n_trials=12, **kw)
    rows: list[dict] = []

    def stop_after_seven(row: dict) -> bool:
        rows.append(row)
        assert (tmp_path / "chain" / "restart.npz").exists()  # the trial's restart is written before the hook
        return row["trial"] == 6

    part = slhmc.run(Counting(), HARMONIC, four_hydrogens(), n_trials=12, workdir=tmp_path / "chain",
                     on_trial=stop_after_seven, **kw)
    assert part.stopped and len(part.accepted) == 7 and part.phases == {"learning": (0, 0), "production": (0, 7)}
    assert [r["trial"] for r in rows] == list(range(7))
    assert [r["accepted"] for r in rows] == list(whole.accepted[:7])
    assert [r["E_ref_eV"] for r in rows] == list(whole.reference_energies[:7])
    np.testing.assert_array_equal([r["dH_eV"] for r in rows], whole.delta_h[:7])
    np.testing.assert_allclose([r["acceptance"] for r in rows], np.cumsum(whole.accepted[:7]) / np.arange(1, 8))
    assert all(r["phase"] == "production" and r["kind"] == "md" and r["retrain"] is None for r in rows)
    assert len((tmp_path / "chain" / "chain.log").read_text().splitlines()) == 8
    reference = Counting()
    resumed = slhmc.run(reference, HARMONIC, four_hydrogens(), n_trials=12, workdir=tmp_path / "chain",
                        on_trial=lambda row: None, **kw)
    assert reference.calls == 5 and not resumed.stopped  # trials 8-12 only
    np.testing.assert_array_equal(resumed.accepted, whole.accepted)
    np.testing.assert_array_equal(resumed.reference_energies, whole.reference_energies)
    np.testing.assert_array_equal(resumed.delta_h, whole.delta_h)
    assert resumed.n_reference_calls == whole.n_reference_calls == 13


def test_on_trial_stops_without_a_workdir_and_trial_row_names_phase_kind_retrain():
    rows: list[dict] = []
    result = slhmc.run(QUARTIC, HARMONIC, four_hydrogens(), temperature=T, n_trials=6, md_steps=5, timestep=1.0,
                       on_trial=lambda row: rows.append(row) or len(rows) == 4)
    assert result.stopped and len(rows) == 4
    from mlmd_lab.slhmc.chain import trial_row

    row = trial_row([3, 1, 0, 1, 0, -1.0, -2.0, float("nan"), 0.25, 8.0, float("nan")], learn_trials=5,
                    retrained={"trial": 4, "frames": 5})
    assert row["phase"] == "learning" and row["kind"] == "volume" and row["failed"] and not row["accepted"]
    assert row["retrain"] == {"trial": 4, "frames": 5} and row["volume_A3"] == 8.0
    assert trial_row([5] + [0] * 10, learn_trials=5)["phase"] == "production"


# ------------------------------------------------------------------------------ Lennard-Jones against Lennard-Jones
class PairLJ(Calculator):
    """The shifted-force Lennard-Jones of :class:`~mlmd_lab.md.forcefield.LennardJones`, in numpy, for clusters."""

    implemented_properties = ["energy", "forces"]

    def __init__(self, epsilon: float, sigma: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.eps, self.sig, self.rc = epsilon, sigma, 2.5 * sigma

    def pair(self, r):
        s6 = (self.sig / r) ** 6
        s6c = (self.sig / self.rc) ** 6
        u = 4 * self.eps * (s6 * s6 - s6)
        uc = 4 * self.eps * (s6c * s6c - s6c)
        du = 4 * self.eps * (-12 * s6 * s6 + 6 * s6) / r
        duc = 4 * self.eps * (-12 * s6c * s6c + 6 * s6c) / self.rc
        inside = r < self.rc
        return np.where(inside, u - uc - (r - self.rc) * duc, 0.0), np.where(inside, du - duc, 0.0)

    def energy(self, x) -> float:
        d = x[:, None, :] - x[None, :, :]
        r = np.sqrt(np.sum(d * d, axis=2) + np.eye(len(x)))
        u, _ = self.pair(r)
        return float(0.5 * np.sum(u * (1 - np.eye(len(x)))))

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        x = self.atoms.positions
        d = x[:, None, :] - x[None, :, :]
        r = np.sqrt(np.sum(d * d, axis=2) + np.eye(len(x)))
        u, du = self.pair(r)
        off = 1 - np.eye(len(x))
        forces = -np.sum((du * off / r)[:, :, None] * d, axis=1)
        self.results = {"energy": float(0.5 * np.sum(u * off)), "forces": forces}


LJ_T = 10.0  # K, kT = 0.083 epsilon: a bound, vibrating Ar4 tetrahedron (LJ4 has no other minimum)


def metropolis(calc: PairLJ, x: np.ndarray, kT: float, sweeps: int, step: float, seed: int):
    """Plain single-atom random-walk Metropolis on the reference: its energy after every sweep, final positions."""
    rng = np.random.default_rng(seed)
    x = x.copy()
    energy = calc.energy(x)
    out = np.empty(sweeps)
    for sweep in range(sweeps):
        for i in range(len(x)):
            trial = x.copy()
            trial[i] += rng.uniform(-step, step, 3)
            e = calc.energy(trial)
            if np.log(rng.uniform()) < -(e - energy) / kT:
                x, energy = trial, e
        out[sweep] = energy
    return out, x


def test_lennard_jones_reference_is_reproduced_with_a_wrong_lennard_jones_proposal():
    from mlmd_lab import md
    from mlmd_lab.analysis import block_average

    kT = units.kB * LJ_T
    reference = PairLJ(0.0104, 3.40)
    surrogate = LennardJones(epsilon=0.0208, sigma=3.42)  # twice as deep, a little longer: a stiffer cluster
    atoms = lj_cluster()[0]
    assert abs(forcefield(LennardJones(), dtype="float64").single_point(atoms)["energy"]
               - reference.get_potential_energy(atoms)) < 1e-12  # the numpy reference is mlmd_lab's LJ

    energies, equilibrated = metropolis(reference, atoms.positions, kT, sweeps=20000, step=0.2, seed=0)
    direct = block_average(energies[500:])
    start = atoms.copy()
    start.positions = equilibrated  # both samplers start in equilibrium
    chain = slhmc.run(reference, surrogate, start, temperature=LJ_T, n_trials=3000, md_steps=20, timestep=10.0,
                      seed=0)
    sampled = chain.averages()["energy"]
    print(f"LJ: SLHMC {sampled.mean:.5f} ± {sampled.stderr:.5f} (acceptance {chain.acceptance_rate:.2f}, tau_int "
          f"{sampled.tau_int:.1f} trials), Metropolis {direct.mean:.5f} ± {direct.stderr:.5f}")
    assert abs(sampled.mean - direct.mean) < 3 * np.hypot(sampled.stderr, direct.stderr), (sampled, direct)
    assert abs(deviation(chain.balance(), 0.0)) < 3
    assert 0.3 < chain.acceptance_rate < 0.95

    mlmd = md.run(surrogate, start, "nvt", temperature=LJ_T, timestep=5.0, steps=12000, trajectory_interval=20,
                  thermostat_time=500.0, seed=0)
    frames = list(mlmd.trajectory)[50:]
    ml_md = block_average(np.array([reference.get_potential_energy(a) for a in frames]))
    print(f"LJ: ML-MD {ml_md.mean:.5f} ± {ml_md.stderr:.5f}")
    assert abs(ml_md.mean - direct.mean) > 10 * np.hypot(ml_md.stderr, direct.stderr), (ml_md, direct)


# ------------------------------------------------------------------------------------------------ self-learning
def emt_copper(n: int, seed: int = 0) -> list[Atoms]:
    """Rattled 8-atom fcc Cu cells labelled by ASE's EMT (energies, forces, stresses)."""
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator

    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 1, 1))
        atoms.positions += rng.normal(scale=0.12, size=atoms.positions.shape)
        atoms.calc = EMT()
        results = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces(), "stress": atoms.get_stress()}
        atoms.calc = SinglePointCalculator(atoms, **results)
        frames.append(atoms)
    return frames


@pytest.mark.slow
def test_learning_phase_raises_the_acceptance_of_a_potential_trained_on_30_frames():
    """EMT Cu at 600 K from an HDNNP trained on 30 rattled frames; ~60-90 s (four retrainings)."""
    from ase.build import bulk
    from ase.calculators.emt import EMT

    from mlmd_lab.slhmc.learning import QUICK
    from mlmd_lab.train.trainer import Trainer, TrainingConfig

    start_model = Trainer(emt_copper(30), TrainingConfig(**dict(QUICK, cutoff=4.5)), progress=False).fit()
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 1, 1))
    result = slhmc.run(EMT(), start_model, atoms, temperature=600, n_trials=80, md_steps=20, timestep=2.0,
                       learn_trials=40, retrain_every=10)
    curve = [float(result.accepted[k:k + 10].mean()) for k in range(0, 80, 10)]
    print("acceptance per 10 trials:", curve)
    assert result.phases == {"learning": (0, 40), "production": (40, 80)}
    assert [r["trial"] for r in result.retrain_history] == [10, 20, 30, 40]
    assert [r["frames"] for r in result.retrain_history] == [11, 21, 31, 41]  # every result, accepted or not
    assert result.model is not start_model
    assert curve[0] <= 0.2 and np.mean(curve[4:]) >= np.mean(curve[:2]) + 0.4
    assert result.averages()["energy"].n_samples == 40  # production only


# ------------------------------------------------------------------------------------------------------- CLI
def test_cli_slhmc_runs_and_continues_the_chain(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from ase.build import bulk
    from conftest import random_cu_s_model

    random_cu_s_model().to_n2p2(tmp_path / "nnp")
    structure = tmp_path / "cu.extxyz"
    bulk("Cu", "fcc", a=3.61, cubic=True).write(structure)
    work = tmp_path / "chain"
    base = [sys.executable, "-m", "mlmd_lab.cli", "slhmc", "--n2p2", str(tmp_path / "nnp"), "--reference", "emt",
            "--structure", str(structure), "--temperature", "300", "--md-steps", "5", "--timestep", "1.0",
            "--workdir", str(work)]
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(base + ["--trials", "6"], capture_output=True, text=True, cwd=root)
    assert out.returncode == 0, out.stderr
    assert "6 trials" in out.stdout and "energy:" in out.stdout
    out = subprocess.run(base + ["--trials", "10"], capture_output=True, text=True, cwd=root)
    assert out.returncode == 0, out.stderr
    assert "10 trials" in out.stdout
    assert len((work / "chain.log").read_text().splitlines()) == 11
    bad = subprocess.run(base + ["--trials", "10", "--temperature", "-1"], capture_output=True, text=True, cwd=root)
    assert bad.returncode == 2 and "temperature" in bad.stderr


# ------------------------------------------------------------------------------------------ DFT recipe reference
def test_dft_recipe_reference_lands_in_the_database_and_is_never_repeated(db, tmp_path, monkeypatch):
    """PySCF (LDA, STO-3G) on H2 as the reference, through the labelling machinery, with a Morse proposal."""
    pytest.importorskip("pyscf")
    from ase.calculators.morse import MorsePotential

    from mlmd_lab.dft import PySCF
    from mlmd_lab.dft.label import LEDGER

    recipe = PySCF(xc="LDA", basis="sto-3g")
    runs = []
    calculate = PySCF.calculate

    def counted(self, atoms, folder):
        runs.append(folder)
        return calculate(self, atoms, folder)

    monkeypatch.setattr(PySCF, "calculate", counted)
    h2 = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.76]], pbc=False)
    surrogate = MorsePotential(epsilon=4.5, r0=0.74, rho0=1.4)
    kw = dict(temperature=300.0, md_steps=5, timestep=0.5, workdir=tmp_path / "chain", db=db)
    first = slhmc.run(recipe, surrogate, h2, n_trials=3, **kw)
    run_tag = f"slhmc-{first.run_id}"
    frames = db.frames(tags=["slhmc", run_tag])
    assert len(frames) == 4  # the start and three proposals, each with energy and forces
    for k, accepted in enumerate(first.accepted):
        assert db.count(tags=[run_tag, f"trial-{k}"]) == 1
        assert db.count(tags=[run_tag, f"trial-{k}", "accepted" if accepted else "rejected"]) == 1
    assert np.isclose(first.reference_energies[-1], first.states[-1].get_potential_energy())
    ledger = db.mongo[LEDGER]
    assert ledger.count_documents({"status": "complete"}) == 4 and len(runs) == 4
    # the workdir's restart and reference cache lost: the chain restarts from trial 0 and the ledger answers
    # every calculation it already holds (the chain is a function of the seed, so they are the same ones)
    (tmp_path / "chain" / "reference.traj").unlink()
    (tmp_path / "chain" / "restart.npz").unlink()
    more = slhmc.run(recipe, surrogate, h2, n_trials=5, **kw)
    assert ledger.count_documents({"status": "complete"}) == 6
    assert len(runs) == 6  # only trials 3 and 4 were calculated
    assert len(db.frames(tags=[run_tag])) == 6
    assert list(more.accepted[:3]) == list(first.accepted)


KILLED_RUN = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import numpy as np
from test_slhmc import HARMONIC, Counting, four_hydrogens
from mlmd_lab import slhmc

class Dying(Counting):
    def calculate(self, *args, **kwargs):
        if self.calls == 15:
            os.kill(os.getpid(), signal.SIGKILL)  # kill -9 at the 16th reference call
        super().calculate(*args, **kwargs)

slhmc.run(Dying(), HARMONIC, four_hydrogens(), n_trials=20, workdir={workdir!r}, temperature=300.0, md_steps=10,
          timestep=1.0, seed=4)
"""


def test_sigkill_mid_run_resumes_exactly(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from ase.io import read

    work = tmp_path / "chain"
    code = KILLED_RUN.format(tests=str(Path(__file__).parent), workdir=str(work))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == -9, proc.stderr
    assert len(read(work / "reference.traj", ":")) == 15  # every finished calculation is on disk
    kw = dict(temperature=T, md_steps=10, timestep=1.0, seed=4)
    reference = Counting()
    resumed = slhmc.run(reference, HARMONIC, four_hydrogens(), n_trials=20, workdir=work, **kw)
    assert reference.calls == 6  # trials 15-20 (0-based 14-19): nothing earlier again
    whole = slhmc.run(Counting(), HARMONIC, four_hydrogens(), n_trials=20, **kw)
    np.testing.assert_array_equal(resumed.reference_energies, whole.reference_energies)
    np.testing.assert_array_equal(resumed.accepted, whole.accepted)
    assert resumed.n_reference_calls == 21 and len(resumed.states) == 20


def test_fixed_atoms_stay_and_the_free_ones_are_sampled_exactly():
    from ase.constraints import FixAtoms

    atoms = four_hydrogens()
    atoms.positions[0] = [0.3, 0.0, 0.0]
    atoms.set_constraint(FixAtoms(indices=[0]))
    result = slhmc.run(QUARTIC, HARMONIC, atoms, **QUARTIC_RUN)
    assert all(np.array_equal(s.positions[0], [0.3, 0.0, 0.0]) for s in result.states)
    exact = 9 * KT / 4 + 0.3**4  # nine free coordinates, and the fixed atom's own energy
    check = exactness(result, exact)
    assert abs(check["energy"]) < 3 and abs(check["balance"]) < 3, check


class PeriodicLJ(PairLJ):
    """:class:`PairLJ` in a periodic cell (vesin pair list), with the stress: the NPT reference."""

    implemented_properties = ["energy", "forces", "stress"]

    def evaluate(self, positions, cell):
        from mlmd_lab.potentials.neighbours import pair_list

        i, j, _, d = pair_list(positions, cell, np.ones(3, bool), self.rc)
        r = np.linalg.norm(d, axis=1)
        u, du = self.pair(r)
        energy = 0.5 * float(np.sum(u))
        pair_force = (du / r)[:, None] * d  # dU/dd of each (i, j) entry, full list
        forces = np.zeros_like(positions)
        np.add.at(forces, i, pair_force * 0.5)
        np.add.at(forces, j, -pair_force * 0.5)
        virial = 0.5 * np.einsum("pa,pb->ab", d, pair_force)
        return energy, forces, virial

    def energy(self, x, cell=None) -> float:
        return self.evaluate(x, cell)[0]

    def atom_energy(self, x, cell, k: int) -> float:
        """Energy of atom k with all others and their images (cubic cell wider than the cutoff, wrapped x)."""
        images = np.array(np.meshgrid([-1, 0, 1], [-1, 0, 1], [-1, 0, 1])).reshape(3, -1).T @ cell
        d = (np.delete(x, k, axis=0) - x[k])[:, None, :] + images[None]
        self_images = images[np.any(images != 0, axis=1)]
        r = np.concatenate([np.linalg.norm(d, axis=2).ravel(), np.linalg.norm(self_images, axis=1)])
        u, _ = self.pair(r)
        n_self = len(self_images)
        return float(np.sum(u[:-n_self]) + 0.5 * np.sum(u[-n_self:]))

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        Calculator.calculate(self, atoms, properties, system_changes)
        energy, forces, virial = self.evaluate(self.atoms.positions, self.atoms.cell.array)
        t = virial / self.atoms.get_volume()
        self.results = {"energy": energy, "forces": forces,
                        "stress": np.array([t[0, 0], t[1, 1], t[2, 2], t[1, 2], t[0, 2], t[0, 1]])}


def npt_metropolis(calc: PeriodicLJ, atoms: Atoms, kT: float, pressure: float, sweeps: int, step: float,
                   volume_step: float, seed: int):
    """Plain NPT Metropolis on the reference: single-atom moves, one ln V move per sweep ((N+1) Jacobian);
    energy and volume after every sweep."""
    rng = np.random.default_rng(seed)
    x, h = atoms.get_positions(wrap=True), atoms.cell.array.copy()
    n = len(x)
    energy = calc.energy(x, h)
    out = np.empty((sweeps, 2))
    for sweep in range(sweeps):
        for k in range(n):
            trial = x.copy()
            trial[k] = (trial[k] + rng.uniform(-step, step, 3)) % np.diag(h)
            change = calc.atom_energy(trial, h, k) - calc.atom_energy(x, h, k)
            if np.log(rng.uniform()) < -change / kT:
                x, energy = trial, energy + change
        energy = calc.energy(x, h)  # afresh: no rounding drift from the summed changes
        delta = rng.uniform(-volume_step, volume_step)
        s = np.exp(delta / 3)
        e = calc.energy(x * s, h * s)
        v = abs(np.linalg.det(h))
        if np.log(rng.uniform()) < -(e - energy + pressure * v * (np.exp(delta) - 1)) / kT + (n + 1) * delta:
            x, h, energy = x * s, h * s, e
        out[sweep] = energy, abs(np.linalg.det(h))
    return out


@pytest.mark.slow
def test_npt_lennard_jones_matches_reference_npt_monte_carlo():
    """Solid Ar32 at 40 K and 0.1 GPa: SLHMC NPT with a wrong LJ proposing (JAX) against NPT Metropolis; ~1-2 min."""
    from ase.build import bulk

    from mlmd_lab.analysis import block_average

    temperature, pressure = 40.0, 0.1
    kT, p = units.kB * temperature, pressure * units.GPa
    reference = PeriodicLJ(0.0104, 3.40)
    atoms = bulk("Ar", "fcc", a=5.30, cubic=True).repeat(2)
    direct = npt_metropolis(reference, atoms, kT, p, sweeps=3000, step=0.15, volume_step=0.01, seed=0)[300:]
    u_direct, v_direct = block_average(direct[:, 0]), block_average(direct[:, 1])
    chain = slhmc.run(reference, LennardJones(epsilon=0.0114, sigma=3.37), atoms, temperature=temperature,
                      n_trials=3000, md_steps=20, timestep=5.0, ensemble="npt", pressure=pressure, volume_step=0.01,
                      learn_trials=0, seed=0)
    averages = chain.averages()
    u, v = averages["energy"], averages["volume"]
    print(f"NPT LJ: SLHMC U {u.mean:.5f} ± {u.stderr:.5f}, V {v.mean:.2f} ± {v.stderr:.2f}, acceptance "
          f"{chain.acceptance_by_kind()}; Metropolis U {u_direct.mean:.5f} ± {u_direct.stderr:.5f}, "
          f"V {v_direct.mean:.2f} ± {v_direct.stderr:.2f}")
    assert abs(u.mean - u_direct.mean) < 3 * np.hypot(u.stderr, u_direct.stderr)
    assert abs(v.mean - v_direct.mean) < 3 * np.hypot(v.stderr, v_direct.stderr)
    assert abs(averages["pressure"].mean - pressure) < 3 * averages["pressure"].stderr + 0.01
