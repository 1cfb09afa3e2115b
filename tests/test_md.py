"""MD engine: physics of the integrators, neighbour handling, restarts, safety stops, outputs, CLI.

Statistical tests of the thermostats and the barostat run on Lennard-Jones argon (cheap, so thousands of
independent samples); the HDNNP tests use n2p2's water potential on real water frames.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
from ase import Atoms, units
from ase.build import bulk
from ase.constraints import FixAtoms
from ase.io import read
from conftest import ROOT, external

from mlmd_lab.analysis import block_average, energy_drift
from mlmd_lab.errors import MLMDError
from mlmd_lab.md import LennardJones, MDStoppedError, forcefield, read_log, resume, run
from mlmd_lab.md.run import LOG_COLUMNS

ARGON = LennardJones()


def argon(repeat: int = 3, a: float = 5.40, seed: int = 1) -> Atoms:
    atoms = bulk("Ar", "fcc", a=a, cubic=True).repeat(repeat)
    atoms.rattle(0.02, seed=seed)
    return atoms


def water_potential():
    from mlmd_lab.potentials.model import HDNNP

    return HDNNP.from_n2p2(external("n2p2/H2O_RPBE-D3"), energy_unit="Ha", length_unit="Bohr")


#: 192 atoms of water equilibrated at 300 K under water_potential() (positions and momenta; make_water_start.py)
WATER_START = ROOT / "tests" / "data" / "water192_300K.extxyz"


def water_box() -> Atoms:
    from mlmd_lab.io.deepmd import read_deepmd

    return read_deepmd(external("deepmd-water/data_0"))[0]


# ------------------------------------------------------------------------------------------- force field
def test_lj_forces_and_virial_match_finite_differences():
    atoms = argon(2)
    ff = forcefield(ARGON, skin=0.5)
    out = ff.single_point(atoms)
    h = 1e-5
    for i, a in [(0, 0), (5, 1), (17, 2)]:
        plus, minus = atoms.copy(), atoms.copy()
        plus.positions[i, a] += h
        minus.positions[i, a] -= h
        fd = -(ff.single_point(plus)["energy"] - ff.single_point(minus)["energy"]) / (2 * h)
        assert out["forces"][i, a] == pytest.approx(fd, abs=1e-7)
    # virial = dE/d(strain): strain the cell and the positions together
    for a, b in [(0, 0), (1, 2)]:
        eps = np.zeros((3, 3))
        eps[a, b] = h
        strained = [atoms.copy(), atoms.copy()]
        for s, sign in zip(strained, (1, -1), strict=True):
            M = np.eye(3) + sign * eps
            s.set_cell(atoms.cell.array @ M, scale_atoms=False)
            s.positions = atoms.positions @ M
        fd = (ff.single_point(strained[0])["energy"] - ff.single_point(strained[1])["energy"]) / (2 * h)
        assert out["virial"][a, b] == pytest.approx(fd, abs=1e-7)


def test_lj_cutoff_is_smooth_and_total_momentum_is_zero():
    atoms = argon(2)
    out = forcefield(ARGON).single_point(atoms)
    np.testing.assert_allclose(out["forces"].sum(axis=0), 0.0, atol=1e-12)
    pair = Atoms("Ar2", positions=[[0, 0, 0], [ARGON.rc - 1e-9, 0, 0]], pbc=False)
    assert abs(forcefield(ARGON).single_point(pair)["energy"]) < 1e-12


# ------------------------------------------------------------------------------------------- NVE
def test_nve_conserves_energy_and_skin_does_not_change_the_trajectory():
    atoms = argon()
    runs = [run(ARGON, atoms, "nve", temperature=80, timestep=5.0, steps=600, skin=skin, log_interval=10)
            for skin in (0.3, 2.0)]
    np.testing.assert_allclose(runs[0].atoms.positions, runs[1].atoms.positions, rtol=0, atol=1e-9)
    assert runs[0].rebuilds > runs[1].rebuilds  # the small skin did rebuild, and nothing changed
    etot = runs[0].thermo["etot_eV"]
    ekin = runs[0].thermo["ekin_eV"]
    assert np.ptp(etot) < 0.02 * np.ptp(ekin)
    assert runs[0].thermo["temperature_K"][0] == pytest.approx(80.0)


def test_velocities_have_zero_momentum_and_exact_temperature():
    atoms = argon()
    r = run(ARGON, atoms, "nve", temperature=50, steps=0)
    p = r.atoms.get_momenta()
    np.testing.assert_allclose(p.sum(axis=0), 0.0, atol=1e-12)
    dof = 3 * len(atoms) - 3
    assert 2 * r.atoms.get_kinetic_energy() / (dof * units.kB) == pytest.approx(50.0)


# ------------------------------------------------------------------------------------------- thermostats
def _canonical_check(ensemble: str, dof: int, **kw):
    atoms = argon()
    T = 60.0
    r = run(ARGON, atoms, ensemble, temperature=T, timestep=5.0, steps=24000, log_interval=4,
            thermostat_time=250.0, **kw)
    th = {k: v[500:] for k, v in r.thermo.items()}
    temperature = block_average(th["temperature_K"])
    assert abs(temperature.mean - T) < 0.02 * T
    assert abs(temperature.mean - T) < 4 * temperature.stderr + 0.2
    # Canonical kinetic energy: Var(K) = (g / 2) (kT)^2
    K = th["ekin_eV"]
    variance = block_average((K - K.mean()) ** 2)
    expected = 0.5 * dof * (units.kB * T) ** 2
    print(f"{ensemble}: <T> = {temperature.mean:.2f} ± {temperature.stderr:.2f} K (target {T}); Var(K) = "
          f"{variance.mean:.3e} ± {variance.stderr:.1e} eV², canonical {expected:.3e} "
          f"(ratio {variance.mean / expected:.3f})")
    assert abs(variance.mean - expected) < 4 * variance.stderr + 0.05 * expected, (variance.mean, expected)
    return r, th


@pytest.mark.slow
def test_langevin_gives_canonical_temperature_and_kinetic_fluctuations():
    r, _ = _canonical_check("langevin", dof=3 * 108)
    assert r.settings["ensemble"] == "langevin"


@pytest.mark.slow
def test_nose_hoover_chain_is_canonical_and_conserves_its_energy():
    r, th = _canonical_check("nose-hoover", dof=3 * 108 - 3)
    conserved = th["conserved_eV"]
    assert np.ptp(conserved) < 0.02 * np.ptp(th["etot_eV"])  # the extended energy is what is conserved


@pytest.mark.slow
def test_npt_pressure_and_volume_fluctuations():
    """Stochastic cell rescaling: <P> matches the target within its error bar, and the volume fluctuations
    <dV^2> = kT V kappa_T with kappa_T measured independently from NVT pressures at two volumes."""
    T, target = 60.0, 0.05  # K, GPa
    atoms = argon(a=5.45)
    r = run(ARGON, atoms, "npt", temperature=T, pressure=target, timestep=5.0, steps=30000, log_interval=5,
            barostat_time=500.0, compressibility=0.5, thermostat_time=250.0)
    th = {k: v[400:] for k, v in r.thermo.items()}
    pressure = block_average(th["pressure_GPa"])
    assert abs(pressure.mean - target) < 3 * pressure.stderr + 1e-3, (pressure.mean, pressure.stderr)
    V = th["volume_A3"]
    volume = block_average(V)
    variance = block_average((V - V.mean()) ** 2)
    # isothermal compressibility from NVT at +-1 % volume around the NPT mean
    pressures = []
    for scale in (0.99, 1.01):
        box = atoms.copy()
        box.set_cell(atoms.cell * (scale * volume.mean / atoms.get_volume()) ** (1 / 3), scale_atoms=True)
        nvt = run(ARGON, box, "langevin", temperature=T, timestep=5.0, steps=8000, log_interval=5,
                  thermostat_time=250.0)
        pressures.append(block_average(nvt.thermo["pressure_GPa"][200:]))
    dP = (pressures[1].mean - pressures[0].mean) * units.GPa
    kappa = -(0.02) / dP  # 1/(eV/Å^3)
    expected = units.kB * T * volume.mean * kappa
    print(f"NPT: <P> = {pressure.mean:.4f} ± {pressure.stderr:.4f} GPa (target {target}); "
          f"<dV²> = {variance.mean:.1f} ± {variance.stderr:.1f} Å⁶, kT V kappa_T = {expected:.1f} Å⁶ "
          f"(ratio {variance.mean / expected:.3f}; kappa_T from NVT {kappa * units.GPa:.4f} 1/GPa)")
    assert abs(variance.mean - expected) < 0.25 * expected + 3 * variance.stderr, (variance.mean, expected)


def test_anisotropic_barostat_moves_axes_independently():
    atoms = argon()
    atoms.set_cell(atoms.cell.array * [1.03, 1.0, 0.98], scale_atoms=True)  # strained: axes must relax apart
    r = run(ARGON, atoms, "npt", temperature=30, pressure=0.0, timestep=5.0, steps=1500, barostat="anisotropic",
            barostat_time=500.0, compressibility=0.5)
    lengths = r.atoms.cell.lengths()
    assert np.ptp(lengths) < 0.5 * np.ptp(atoms.cell.lengths())  # the strain relaxed
    cell = r.atoms.cell.array
    assert np.allclose(cell - np.diag(np.diag(cell)), 0.0)  # no shear introduced
    assert abs(r.thermo["pxx_GPa"][-50:].mean() - r.thermo["pzz_GPa"][-50:].mean()) < 0.05


def test_fixed_atoms_stay_fixed_and_are_not_counted():
    atoms = argon()
    atoms.set_constraint(FixAtoms(indices=[0, 1, 2]))
    r = run(ARGON, atoms, "langevin", temperature=40, timestep=5.0, steps=200, fixed=[3])
    moved = np.linalg.norm(r.atoms.positions - atoms.positions, axis=1)
    assert np.all(moved[:4] == 0.0) and np.all(moved[4:] > 0)
    assert np.all(r.atoms.get_momenta()[:4] == 0.0)
    assert r.atoms.constraints and list(r.atoms.constraints[0].index) == [0, 1, 2, 3]


def test_free_boundary_cluster():
    from ase.cluster import Icosahedron

    cluster = Icosahedron("Ar", 2, latticeconstant=5.4)
    cluster.pbc = False
    r = run(ARGON, cluster, "nve", temperature=20, timestep=5.0, steps=300)
    assert np.isnan(r.thermo["pressure_GPa"]).all()
    assert np.ptp(r.thermo["etot_eV"]) < 0.05 * np.ptp(r.thermo["ekin_eV"]) + 1e-5


# ------------------------------------------------------------------------------------------- outputs, restart
def test_outputs_are_readable_and_callbacks_stream(tmp_path):
    events = []
    r = run(ARGON, argon(), "langevin", temperature=40, timestep=5.0, steps=100, workdir=tmp_path,
            trajectory_interval=20, log_interval=10, callbacks=[events.append])
    frames = read(tmp_path / "md.traj", ":")
    assert [a.info["step"] for a in frames] == [0, 20, 40, 60, 80, 100]
    assert frames[-1].info["time_fs"] == pytest.approx(500.0)
    np.testing.assert_allclose(frames[-1].positions, r.atoms.positions)
    assert frames[-1].get_potential_energy() == pytest.approx(r.atoms.get_potential_energy())
    log = read_log(tmp_path / "md.log")
    assert list(log) == list(LOG_COLUMNS)
    assert list(log["step"]) == list(range(0, 101, 10))
    assert [e["step"] for e in events] == list(range(0, 101, 10))
    assert sum("atoms" in e for e in events) == 6
    assert json.loads((tmp_path / "settings.json").read_text())["temperature_K"] == 40
    with pytest.raises(MLMDError, match="holds a run already"):
        run(ARGON, argon(), "nve", temperature=40, workdir=tmp_path, steps=5)


def test_resume_repeats_the_uninterrupted_run_exactly(tmp_path):
    kw = dict(temperature=50, timestep=5.0, log_interval=10, trajectory_interval=10, skin=0.3)
    whole = run(ARGON, argon(), "langevin", steps=300, **kw)
    first = run(ARGON, argon(), "langevin", steps=130, workdir=tmp_path, restart_interval=100, **kw)
    assert first.steps == 130
    with pytest.raises(MLMDError, match="already reached step 130"):
        resume(ARGON, tmp_path)
    with pytest.raises(MLMDError, match="potential differs"):
        resume(LennardJones(epsilon=0.011), tmp_path, steps=10)
    rest = resume(ARGON, tmp_path, steps=170)
    assert rest.steps == 170
    np.testing.assert_array_equal(rest.atoms.positions, whole.atoms.positions)
    np.testing.assert_array_equal(rest.atoms.get_momenta(), whole.atoms.get_momenta())
    log = read_log(tmp_path)
    assert list(log["step"]) == list(range(0, 301, 10))
    np.testing.assert_array_equal(log["etot_eV"], whole.thermo["etot_eV"])
    assert [a.info["step"] for a in read(tmp_path / "md.traj", ":")] == list(range(0, 301, 10))


def test_callback_returning_true_stops_cleanly_and_resume_continues_exactly(tmp_path):
    """A Stop button's route: the run ends at the end of its block, writes its restart, returns its result."""
    kw = dict(temperature=50, timestep=5.0, log_interval=10, trajectory_interval=10, skin=0.3, block=40)
    whole = run(ARGON, argon(), "langevin", steps=300, **kw)
    seen = []

    def stop_after_100(row):
        seen.append(int(row["step"]))
        return row["step"] >= 100

    first = run(ARGON, argon(), "langevin", steps=300, workdir=tmp_path, callbacks=[stop_after_100], **kw)
    assert first.stopped == "stopped by a callback"
    assert 100 <= first.steps <= 140 and seen[-1] == first.steps  # within one block of the request
    rest = resume(ARGON, tmp_path)  # continues to the 300 steps asked for at first
    assert first.steps + rest.steps == 300 and rest.stopped is None
    np.testing.assert_array_equal(rest.atoms.positions, whole.atoms.positions)
    assert list(read_log(tmp_path)["step"]) == list(range(0, 301, 10))


def test_callback_stop_at_the_first_row_still_leaves_a_restart(tmp_path):
    kw = dict(temperature=50, timestep=5.0, log_interval=10, trajectory_interval=10, skin=0.3)
    first = run(ARGON, argon(), "langevin", steps=100, workdir=tmp_path, callbacks=[lambda row: True], **kw)
    assert first.stopped == "stopped by a callback" and first.steps == 0
    whole = run(ARGON, argon(), "langevin", steps=100, **kw)
    rest = resume(ARGON, tmp_path)
    np.testing.assert_array_equal(rest.atoms.positions, whole.atoms.positions)


_KILLED_RUN = """
import sys
from ase.build import bulk
from mlmd_lab.md import LennardJones, run
atoms = bulk("Ar", "fcc", a=5.40, cubic=True).repeat(3)
atoms.rattle(0.02, seed=1)
run(LennardJones(), atoms, "nose-hoover", temperature=50, timestep=5.0, steps=10**7, workdir=sys.argv[1],
    restart_interval=200, trajectory_interval=50, log_interval=50, skin=0.3)
"""


@pytest.mark.slow
def test_md_killed_with_sigkill_resumes_exactly(tmp_path):
    work = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, str(work)], cwd=ROOT)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (work / "restart.npz").exists():
            time.sleep(0.2)
        time.sleep(1.5)  # let it write frames and log rows past the restart point
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert (work / "restart.npz").exists(), "the run never wrote a restart file"
    saved_step = int(np.load(work / "restart.npz")["step"])
    rest = resume(ARGON, work, steps=300)
    total = saved_step + 300
    atoms = bulk("Ar", "fcc", a=5.40, cubic=True).repeat(3)
    atoms.rattle(0.02, seed=1)
    whole = run(ARGON, atoms, "nose-hoover", temperature=50, timestep=5.0, steps=total, skin=0.3,
                restart_interval=200, trajectory_interval=50, log_interval=50)
    np.testing.assert_array_equal(rest.atoms.positions, whole.atoms.positions)
    log = read_log(work)
    assert list(log["step"]) == list(range(0, total + 1, 50))  # rows after the restart point were dropped once
    steps = [a.info["step"] for a in read(work / "md.traj", ":")]
    assert steps == list(range(0, total + 1, 50))


# ------------------------------------------------------------------------------------------- safety
def test_overlapping_atoms_stop_with_a_clear_message(tmp_path):
    atoms = argon()
    atoms.positions[1] = atoms.positions[0] + [1.2, 0, 0]  # far inside the repulsive wall
    with pytest.raises(MDStoppedError, match="(temperature passed|more than half the neighbour skin)") as err:
        run(ARGON, atoms, "nve", temperature=40, timestep=5.0, steps=200, workdir=tmp_path)
    result = err.value.result
    assert result.stopped and result.steps < 200
    assert np.isfinite(result.atoms.positions).all()
    assert (tmp_path / "restart.npz").exists()
    assert "restart written" in str(err.value)


def test_bad_input_is_named():
    atoms = argon()
    with pytest.raises(MLMDError, match="femtoseconds"):
        run(ARGON, atoms, "nve", temperature=10, timestep=500)
    with pytest.raises(MLMDError, match="needs pressure"):
        run(ARGON, atoms, "npt", temperature=10)
    with pytest.raises(MLMDError, match="needs temperature"):
        run(ARGON, atoms, "langevin")
    with pytest.raises(MLMDError, match="unknown ensemble"):
        run(ARGON, atoms, "nvx", temperature=10)
    with pytest.raises(MLMDError, match="fixed atoms are not supported under NPT"):
        run(ARGON, atoms, "npt", temperature=10, pressure=0.0, fixed=[0])
    with pytest.raises(MLMDError, match="give db="):
        run("water-v1", atoms, "nve", temperature=10)
    with pytest.raises(MDStoppedError, match="moved more than half the neighbour skin"):
        hot = argon()
        hot.set_momenta(np.random.default_rng(0).normal(size=(len(hot), 3)) * 40)
        run(ARGON, hot, "nve", timestep=5.0, steps=10, skin=0.05, max_temperature=1e9)


# ------------------------------------------------------------------------------------------- HDNNP
@pytest.mark.slow
def test_water_nve_with_n2p2_potential_conserves_energy(tmp_path):
    pot = water_potential()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no extrapolation warnings on real water
        r = run(pot, water_box(), "nve", temperature=300, timestep=0.5, steps=200, workdir=tmp_path,
                log_interval=5, trajectory_interval=50)
    drift = energy_drift(r.thermo["time_fs"], r.thermo["etot_eV"], len(r.atoms))
    assert abs(drift.slope_mev_atom_ps) < 0.5 and drift.rms_mev_atom < 0.1, str(drift)
    # the forces MD used are the potential's own (n2p2-exact) forces
    ref = pot.predict(r.atoms)
    np.testing.assert_allclose(r.atoms.get_forces(), ref["forces"], atol=1e-8)
    assert r.atoms.get_potential_energy() == pytest.approx(ref["energy"], abs=1e-8)


@pytest.mark.slow
def test_ensemble_spread_is_logged_and_can_stop_md():
    from mlmd_lab.train.ensemble import Ensemble

    pot = water_potential()
    other = water_potential()
    element = other.elements[0]
    W, b = other.networks[element][0]
    other.networks[element][0] = (W * 1.05, b)
    committee = Ensemble([pot, other])
    out = forcefield(committee).single_point(water_box())
    ref = committee.predict(water_box())
    np.testing.assert_allclose(out["force_std"], ref["forces_std"], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(out["forces"], ref["forces"], atol=1e-8)
    limit = float(np.max(ref["forces_std"])) * 0.5
    with pytest.raises(MDStoppedError, match="committee force spread"):
        run(committee, water_box(), "langevin", temperature=300, steps=10, max_force_spread=limit)


def test_compile_s_holds_every_compilation_of_the_run():
    """MDResult.compile_s holds every compilation of the run: at least the backend compilations JAX itself records
    during it. The starting structure's force call used to compile inside the timed run, which made a short run's
    throughput several times too low (Cu2S, 144 atoms, 50 steps: 1.8 ms/atom-step reported, 0.5-0.7 ms with its
    compilation counted as such). The starting forces come from the block's own program (its force call alone):
    one compilation of the potential, not two."""
    import jax
    from conftest import random_cu_s_cell, random_cu_s_model

    # An architecture no other test compiles, so the session's compilation cache cannot serve these programs.
    model = random_cu_s_model(hidden=(3, 7))
    recorded = []

    def listener(event: str, duration: float, **_) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            recorded.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        result = run(model, random_cu_s_cell(), "nve", temperature=300, steps=4, block=4)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert recorded, "JAX recorded no compilation during the run"
    # programs holding the potential (the block) against eager one-liners (milliseconds)
    large = [d for d in recorded if d > 0.25 * max(recorded)]
    assert len(large) == 1 and max(recorded) > 0.5, recorded
    assert result.compile_s >= sum(large), (result.compile_s, recorded)
    assert result.atom_steps_per_s == pytest.approx(4 * result.atoms.get_global_number_of_atoms()
                                                    / (result.wall_s - result.compile_s))


@pytest.mark.slow
def test_extrapolation_stops_when_asked():
    pot = water_potential()
    box = water_box()
    box.set_cell(box.cell * 0.8, scale_atoms=True)  # compressed far beyond any training structure
    with pytest.raises(MDStoppedError, match="left the training range"):
        run(pot, box, "nve", temperature=300, steps=10, on_extrapolation="stop")
    with pytest.warns(Warning, match="outside the training range"):
        run(pot, box, "nve", temperature=300, steps=2)


@pytest.mark.slow
def test_cli_md_runs_and_resumes(tmp_path):
    structure = tmp_path / "water.extxyz"
    water_box().write(structure)
    work = tmp_path / "md"
    base = [sys.executable, "-m", "mlmd_lab.cli", "md", "--n2p2", str(external("n2p2/H2O_RPBE-D3")),
            "--energy-unit", "Ha", "--length-unit", "Bohr", "--workdir", str(work)]
    out = subprocess.run(base + ["--structure", str(structure), "--ensemble", "nvt", "--temperature", "300",
                                 "--steps", "20", "--interval", "10"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "20 steps of 192 atoms" in out.stdout
    assert "computed on cpu" in out.stdout and "neighbour lists on the host" in out.stdout
    narrow = subprocess.run(base[:-2] + ["--workdir", str(tmp_path / "y"), "--structure", str(structure),
                                         "--temperature", "300", "--neighbours", "device"],
                            capture_output=True, text=True, cwd=ROOT)
    assert narrow.returncode == 2 and "neighbours='device' cannot serve" in narrow.stderr, narrow.stderr
    out = subprocess.run(base + ["--resume", "--steps", "10"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert list(read_log(work)["step"]) == [0, 10, 20, 30]
    bad = subprocess.run(base[:-2] + ["--workdir", str(tmp_path / "x"), "--structure", str(tmp_path / "none.xyz")],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "does not exist" in bad.stderr


def test_thermo_positions_are_unwrapped_for_diffusion():
    atoms = argon()
    r = run(ARGON, atoms, "langevin", temperature=200, timestep=5.0, steps=400, trajectory_interval=20)
    frames = r.trajectory
    scaled = np.concatenate([f.get_scaled_positions(wrap=False) for f in frames])
    assert np.isfinite(scaled).all()
    steps = np.diff(np.array([f.positions for f in frames]), axis=0)
    assert np.abs(steps).max() < 0.5 * atoms.cell.lengths().min()  # no jumps across the box


@pytest.mark.slow
def test_water_run_gives_sensible_structure_diffusion_and_spectrum():
    """0.4 ps of NVE water (192 atoms, n2p2 RPBE-D3 potential, float32) analysed with mlmd_lab.analysis.

    It starts from an equilibrated state (positions and momenta after 1 ps of NVT at 300 K with the same potential,
    tests/data/make_water_start.py), so the whole run is production: from the DeePMD frame itself the first
    0.5 ps are not yet liquid water under this potential (O-O coordination 2.9 instead of ~4.5)."""
    from mlmd_lab import analysis
    from mlmd_lab.potentials.model import HDNNP

    start = read(WATER_START)
    assert np.abs(start.get_momenta()).max() > 0, "the start file lost its momenta"
    # float32 and 0.4 ps cut this test's time by ~40 %: the structure, diffusion and band positions checked here
    # agree with float64 to 4+ digits over the same run (measured), and NVE conservation in float64 is tested
    # above. Not shorter: at 0.3 ps the RDF's first minimum (the default coordination cut) falls on noise
    # (n_OO 3.48 instead of 5.07)
    pot = HDNNP.from_n2p2(external("n2p2/H2O_RPBE-D3"), energy_unit="Ha", length_unit="Bohr", dtype="float32")
    r = run(pot, start, "nve", timestep=0.5, steps=800, trajectory_interval=4, log_interval=20)
    frames = list(r.trajectory)
    g = analysis.rdf(frames, r_max=6.0)
    r_oo, g_oo = g.first_peak(("O", "O"))
    assert 2.65 < r_oo < 2.95 and g_oo > 2.0, (r_oo, g_oo)
    r_oh, _ = g.first_peak(("H", "O"))
    assert 0.93 < r_oh < 1.03  # covalent O-H
    assert 3.5 < g.coordination_number(("O", "O")) < 6.0  # about four neighbours (tetrahedral)
    D, _ = analysis.msd(frames).diffusion_cm2_s("O")
    assert 0.3e-5 < D < 15e-5, D  # experiment 2.3e-5 cm²/s at 298 K; a 0.4 ps run is only indicative
    spectrum = analysis.vdos(frames)
    stretch = spectrum.band_maximum(2800, 4000, element="H")
    bend = spectrum.band_maximum(1400, 1900, element="H")
    print(f"water 0.4 ps NVE: O-O peak {r_oo:.3f} Å (g={g_oo:.2f}), O-H peak {r_oh:.3f} Å, "
          f"n_OO {g.coordination_number(('O', 'O')):.2f}, D_O {D:.3g} cm²/s, H stretch {stretch:.0f} cm⁻¹, "
          f"bend {bend:.0f} cm⁻¹, mean T {r.thermo['temperature_K'].mean():.0f} K")
    assert 3000 < stretch < 3800 and 1450 < bend < 1800, (stretch, bend)
