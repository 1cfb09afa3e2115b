"""DFT recipes of mlmd_lab.dft: settings and signatures, availability checks, and real calculations.

Real runs (marked slow, each well under 30 s here): Quantum ESPRESSO pw.x on Si8 (20 Ry, 2x2x2 k-points), forces
checked against finite differences of the energy; PySCF on water (forces vs finite differences) and on a
two-atom Si cell (stress, corrected by the Bohr² factor, vs the finite-difference strain derivative). VASP is
licensed and cannot run here: its test writes inputs only, with a fake VASP_PP_PATH.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule

from mlmd_lab.dft import (
    RECORD_NAME,
    PySCF,
    QuantumEspresso,
    Vasp,
    default_recipe,
    ingest_settings,
    kpoint_grid,
    qe_pseudopotentials,
    rattle,
)
from mlmd_lab.errors import MLMDError
from mlmd_lab.settings import compare_signatures, normalise_signature

QE_PSEUDO = Path("/usr/share/espresso/pseudo")
HAVE_QE = shutil.which("pw.x") is not None and (QE_PSEUDO / "Si.pbe-rrkj.UPF").is_file()
needs_qe = pytest.mark.skipif(not HAVE_QE, reason="pw.x and quantum-espresso-data not installed "
                              "(apt-get install quantum-espresso quantum-espresso-data)")


def si8(rattled: bool = True) -> Atoms:
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    return rattle(atoms, 1, amplitude=0.05, seed=1)[0] if rattled else atoms


def fake_pw(tmp_path: Path) -> str:
    exe = tmp_path / "bin" / "pw.x"
    exe.parent.mkdir(parents=True, exist_ok=True)
    exe.write_text("#!/bin/sh\nexit 1\n")
    exe.chmod(0o755)
    return str(exe)


# -- fast: settings and checks ---------------------------------------------------------------------------
def test_kpoint_grid_follows_vasp_kspacing():
    cell = si8(False)
    assert kpoint_grid(cell, 0.25) == [5, 5, 5]  # 2π/5.43 Å / 0.25 = 4.6
    assert kpoint_grid(cell, 0.6) == [2, 2, 2]
    box = molecule("H2O")
    box.center(vacuum=5.0)
    assert kpoint_grid(box, 0.25) == [1, 1, 1]  # non-periodic directions get one k-point
    with pytest.raises(MLMDError, match="kspacing"):
        kpoint_grid(cell, 0.0)


def test_qe_settings_record_pseudopotential_hashes(tmp_path):
    pseudo = tmp_path / "pseudo"
    pseudo.mkdir()
    upf = pseudo / "Si.test.UPF"
    upf.write_text('<UPF version="2.0.1">\n<PP_HEADER functional="SLA PW PBX PBC" pseudo_type="NC"/>\n</UPF>\n')
    recipe = QuantumEspresso(pseudo_dir=pseudo, pseudopotentials={"Si": "Si.test.UPF"}, ecutwfc_ry=30,
                             kspacing=0.3, smearing=("mv", 0.02), command=fake_pw(tmp_path))
    settings = recipe.settings(si8())
    json.dumps(settings)
    pp = settings["pseudopotentials"]["Si"]
    assert pp["sha256"] == hashlib.sha256(upf.read_bytes()).hexdigest()
    assert pp["md5"] == hashlib.md5(upf.read_bytes()).hexdigest()
    assert (pp["functional"], pp["type"]) == ("PBE", "NC")
    assert settings["kpts"] == [4, 4, 4] and settings["ecutrho_ry"] == 120.0
    assert settings["smearing"] == {"method": "mv", "degauss_ry": 0.02}
    sig = recipe.signature_settings(si8())
    assert sig == normalise_signature(sig)
    assert sig["code"] == "qe" and sig["xc"] == "PBE"
    assert sig["encut"] == pytest.approx(30 * 13.605693, abs=0.01)
    assert sig["smearing"] == "marzari-vanderbilt" and sig["sigma"] == pytest.approx(0.02 * 13.605693, rel=1e-6)
    assert sig["pseudopotentials"] == {"Si": "Si.test.UPF"}
    assert sig["kpoints"] == [4, 4, 4] and sig["kspacing"] <= 0.3


def test_qe_check_errors(tmp_path):
    with pytest.raises(MLMDError, match="pw.x-missing.*not found on PATH"):
        QuantumEspresso(command="pw.x-missing").check()
    pw = fake_pw(tmp_path)
    with pytest.raises(MLMDError, match="Si.missing.UPF for Si not found"):
        QuantumEspresso(pseudo_dir=tmp_path, pseudopotentials={"Si": "Si.missing.UPF"}, command=pw).check()
    with pytest.raises(MLMDError, match="folder .* does not exist"):
        QuantumEspresso(pseudo_dir=tmp_path / "nope", command=pw).check()
    (tmp_path / "Si.x.UPF").write_text("x")
    with pytest.raises(MLMDError, match="no pseudopotential given for Ge"):
        QuantumEspresso(pseudo_dir=tmp_path, pseudopotentials={"Si": "Si.x.UPF"}, command=pw).check(
            bulk("Ge", "diamond", a=5.65))
    # calculate checks before touching the folder
    with pytest.raises(MLMDError, match="not found on PATH"):
        QuantumEspresso(command="pw.x-missing").calculate(si8(), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(MLMDError, match="smearing"):
        QuantumEspresso(smearing=("magic", 0.01))


@pytest.mark.filterwarnings("ignore:Basis may be available")
def test_failed_runs_raise_and_are_recorded(tmp_path):
    exe = tmp_path / "bin" / "pw.x"
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\necho ' Error in routine readpp: file not readable' > CRASH\nexit 3\n")
    exe.chmod(0o755)
    (tmp_path / "Si.x.UPF").write_text("x")
    qe = QuantumEspresso(pseudo_dir=tmp_path, pseudopotentials={"Si": "Si.x.UPF"}, command=str(exe))
    with pytest.raises(MLMDError, match="pw.x failed .*readpp"):
        qe.calculate(si8(), tmp_path / "qe")
    assert json.loads((tmp_path / "qe" / RECORD_NAME).read_text())["status"] == "failed"
    pytest.importorskip("pyscf")
    with pytest.raises(MLMDError, match="basis='no-such-basis'"):
        PySCF(basis="no-such-basis").calculate(molecule("H2O"), tmp_path / "pyscf")


@needs_qe
def test_qe_mpi_launcher_matches_pw_x(monkeypatch):
    venv_bin = Path(os.sys.executable).parent
    monkeypatch.setenv("PATH", f"{venv_bin}{os.pathsep}{os.environ['PATH']}")  # a venv MPICH mpirun comes first
    command = QuantumEspresso(mpi=("mpirun", 2)).settings()["command"]
    assert command[-3:] == ["-n", "2", "pw.x"]
    from mlmd_lab.cluster.mpi import mpi_flavour
    from mlmd_lab.dft.recipes import _linked_mpi

    assert mpi_flavour(command[0]) == _linked_mpi(shutil.which("pw.x"))
    if os.geteuid() == 0 and mpi_flavour(command[0]) == "openmpi":
        assert "--allow-run-as-root" in command
    with pytest.raises(MLMDError, match="not on PATH"):
        QuantumEspresso(mpi=("mpirun-missing", 2)).check()


def test_vasp_writes_inputs_with_fake_potcars(tmp_path, monkeypatch):
    """Input-only: VASP is licensed and not installed; POTCARs are one-line fakes."""
    monkeypatch.delenv("VASP_PP_PATH", raising=False)
    recipe = Vasp(encut=450, kspacing=0.3, setups={"Si": ""}, incar={"ispin": 1})
    with pytest.raises(MLMDError, match="VASP_PP_PATH is not set"):
        recipe.check()
    pp = tmp_path / "pp"
    for el in ("Si", "O"):
        (pp / "potpaw_PBE" / el).mkdir(parents=True)
        (pp / "potpaw_PBE" / el / "POTCAR").write_text(f"  PAW_PBE {el} 08Apr2002\n")
    monkeypatch.setenv("VASP_PP_PATH", str(pp))
    folder = recipe.write_input(si8(), tmp_path / "run")
    incar = {}
    for line in (folder / "INCAR").read_text().splitlines():
        if "=" in line:
            key, value = line.split("=", 1)
            incar[key.strip().upper()] = value.strip()
    assert float(incar["ENCUT"]) == 450 and float(incar["KSPACING"]) == 0.3
    assert incar["GGA"].upper() == "PE" and incar["PREC"].lower() == "accurate"
    assert int(incar["IBRION"]) == -1 and int(incar["NSW"]) == 0 and int(incar["ISIF"]) == 2
    assert int(incar["ISMEAR"]) == 0 and float(incar["SIGMA"]) == 0.05
    assert (folder / "POTCAR").read_text().strip() == "PAW_PBE Si 08Apr2002"
    assert (folder / "POSCAR").is_file()
    settings = recipe.settings(si8())
    assert settings["potcars"] == [{"path": "potpaw_PBE/Si/POTCAR", "title": "PAW_PBE Si 08Apr2002",
                                    "sha256": hashlib.sha256(b"  PAW_PBE Si 08Apr2002\n").hexdigest()}]
    sig = recipe.signature_settings(si8())
    assert (sig["code"], sig["xc"], sig["encut"], sig["prec"]) == ("vasp", "PBE", 450.0, "ACCURATE")
    assert sig["pseudopotentials"] == {"Si": "PAW_PBE Si 08Apr2002"}
    with pytest.raises(MLMDError, match="POTCAR is missing"):
        recipe.check(bulk("Ge", "diamond", a=5.65), need_command=False)
    monkeypatch.delenv("ASE_VASP_COMMAND", raising=False)
    monkeypatch.delenv("VASP_COMMAND", raising=False)
    with pytest.raises(MLMDError, match="no VASP command"):
        recipe.check(si8())
    with pytest.raises(MLMDError, match="vasp_std-missing"):
        Vasp(command="vasp_std-missing").check(si8())


def test_pyscf_settings_and_checks():
    recipe = PySCF()
    water = molecule("H2O")
    s = recipe.settings(water)
    assert (s["basis"], s["pseudo"], s["path"]) == ("def2-svp", None, "mol-RKS")
    cell = si8(False)
    s = recipe.settings(cell)
    assert (s["basis"], s["pseudo"], s["kpts"], s["path"]) == ("gth-dzvp", "gth-pbe", [1, 1, 1],
                                                               "RKS-gamma-multigrid")
    assert PySCF(stress=True).settings(cell)["path"] == "KRKS-fftdf"
    sig = recipe.signature_settings(cell)
    assert sig["code"] == "pyscf" and sig["gamma_only"] is True
    assert sig["ecutrho"] == pytest.approx(40 * 27.211386, abs=0.01)
    assert sig["pseudopotentials"] == {"Si": "gth-pbe"} and sig["extra"]["basis"] == "gth-dzvp"
    assert recipe.signature_settings(water)["pseudopotentials"] == {"H": "all-electron", "O": "all-electron"}
    with pytest.raises(MLMDError, match="no GTH pseudopotential"):
        PySCF(xc="SCAN").check(cell)
    with pytest.raises(MLMDError, match="RKS"):
        PySCF(method="CCSD")
    for threads in (0, -2, 1.5):
        with pytest.raises(MLMDError, match=f"threads={threads!r}"):
            PySCF(threads=threads)
    slab = cell.copy()
    slab.pbc = [True, True, False]
    with pytest.raises(MLMDError, match="slabs"):
        recipe.check(slab)


def test_default_recipe_choice():
    water = molecule("H2O")
    assert isinstance(default_recipe(water), PySCF)
    radical = molecule("OH")
    r = default_recipe(radical)
    assert r.method == "UKS" and r.spin == 1
    chosen = default_recipe(si8(False))
    if HAVE_QE:
        assert isinstance(chosen, QuantumEspresso)
        assert chosen.pseudopotentials["Si"] in os.listdir(QE_PSEUDO)
        assert qe_pseudopotentials(["Si"])["Si"].startswith("Si.")
    else:
        assert isinstance(chosen, PySCF) and chosen.stress


# -- slow: real runs -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qe_run(tmp_path_factory):
    if not HAVE_QE:
        pytest.skip("pw.x and quantum-espresso-data not installed")
    recipe = QuantumEspresso(pseudopotentials={"Si": "Si.pbe-rrkj.UPF"}, ecutwfc_ry=20, kpts=(2, 2, 2))
    atoms = si8()
    folder = tmp_path_factory.mktemp("qe") / "si8"
    out = recipe.calculate(atoms, folder)
    return recipe, atoms, folder, out


@pytest.mark.slow
def test_qe_si8_runs_in_own_folder_and_is_read_by_the_espresso_reader(qe_run, tmp_path):
    from mlmd_lab.io.espresso import read_pw_output

    recipe, atoms, folder, out = qe_run
    assert out == folder / "espresso.pwo" and (folder / "espresso.pwi").is_file()
    assert not (folder / "pwscf.save").exists()  # large scratch removed
    assert not Path("CRASH").exists()
    calc = read_pw_output(out)
    frame = calc.frames[-1]
    res = frame.calc.results
    assert res["energy"] < -800 and res["forces"].shape == (8, 3) and res["stress"].shape == (6,)
    assert np.abs(res["forces"].sum(axis=0)).max() < 1e-3  # no net force
    np.testing.assert_allclose(frame.positions, atoms.positions, atol=1e-5)
    record = json.loads((folder / RECORD_NAME).read_text())
    assert record["status"] == "complete" and record["generator"]["name"] == "rattle"
    sha = hashlib.sha256((QE_PSEUDO / "Si.pbe-rrkj.UPF").read_bytes()).hexdigest()
    assert record["settings"]["pseudopotentials"]["Si"]["sha256"] == sha
    assert record["settings"]["code_version"] == calc.code_version
    # what the recipe declares agrees with what the reader finds in the output
    assert compare_signatures(recipe.signature_settings(atoms), calc.signature) == []
    assert calc.signature["xc"] == "PBE" and calc.signature["kpoints"] == [2, 2, 2]
    assert ingest_settings(out) is None  # the pw.x output carries its settings
    # a second call finds the completed run; a different structure in the same folder is refused
    mtime = out.stat().st_mtime_ns
    assert recipe.calculate(atoms, folder) == out and out.stat().st_mtime_ns == mtime
    with pytest.raises(MLMDError, match="already holds a calculation"):
        recipe.calculate(si8(False), folder)


@pytest.mark.slow
def test_qe_run_that_does_not_converge_is_run_again_with_gentler_mixing(qe_run, tmp_path):
    """pw.x stopping with "convergence NOT achieved" (here: 3 iterations allowed) is run again with half the mixing
    and at least 300 iterations; the result is the converged run's, and the unconverged output is kept."""
    from mlmd_lab.io.espresso import read_pw_output

    recipe, atoms, _, reference = qe_run
    tight = QuantumEspresso(pseudopotentials={"Si": "Si.pbe-rrkj.UPF"}, ecutwfc_ry=20, kpts=(2, 2, 2),
                            input_data={"electrons": {"electron_maxstep": 3}})
    out = tight.calculate(atoms, tmp_path / "qe")
    assert "convergence NOT achieved" in (tmp_path / "qe" / "espresso.unconverged-1.pwo").read_text()
    text = out.read_text()
    assert "mixing beta" in text and "0.350" in text and "convergence has been achieved" in text
    energy = read_pw_output(out).frames[-1].calc.results["energy"]
    assert energy == pytest.approx(read_pw_output(reference).frames[-1].calc.results["energy"], abs=1e-4)
    assert json.loads((tmp_path / "qe" / RECORD_NAME).read_text())["status"] == "complete"


@pytest.mark.slow
def test_qe_scf_that_stays_unconverged_is_reported_as_such_through_the_ledger(qe_run, db, tmp_path, monkeypatch):
    """After the recipe's runs, an SCF that still stops with "convergence NOT achieved" raises SCFNotConvergedError
    (with the fixed-occupations hint), and label() records it in the ledger under that name: the main job's check
    tells it from a crash by that name (autobuild.dft_failure_check)."""
    from mlmd_lab.autobuild import dft_failure_check
    from mlmd_lab.dft.label import label
    from mlmd_lab.dft.recipes import espresso as espresso_module
    from mlmd_lab.errors import SCFNotConvergedError

    _, atoms, _, _ = qe_run
    monkeypatch.setattr(espresso_module, "SCF_ATTEMPTS", 1)  # one 3-iteration run: seconds, not 400 iterations
    tight = QuantumEspresso(pseudopotentials={"Si": "Si.pbe-rrkj.UPF"}, ecutwfc_ry=20, kpts=(2, 2, 2),
                            smearing=None, input_data={"electrons": {"electron_maxstep": 3}})
    with pytest.raises(SCFNotConvergedError, match="did not converge.*fixed occupations.*smearing"):
        tight.calculate(atoms.copy(), tmp_path / "direct")
    report = label([atoms.copy()], tight, db=db, workdir=tmp_path / "labelling", retries=0, progress=False)
    assert report.labelled == 0 and len(report.failed) == 1
    assert report.failed[0][1].startswith("SCFNotConvergedError: pw.x's SCF did not converge")
    assert dft_failure_check(report.failed, 10)[0]  # 1 of 10 calls <= 10 %
    assert not dft_failure_check(report.failed, 9)[0]


@pytest.mark.slow
def test_qe_forces_match_finite_differences(qe_run, tmp_path):
    from mlmd_lab.io.espresso import read_pw_output

    recipe, atoms, folder, out = qe_run
    force = read_pw_output(out).frames[-1].calc.results["forces"][0, 0]
    h = 0.01
    energies = []
    for sign in (+1, -1):
        moved = atoms.copy()
        moved.positions[0, 0] += sign * h
        energies.append(recipe.label(moved, tmp_path / f"d{sign:+d}").get_potential_energy())
    fd = -(energies[0] - energies[1]) / (2 * h)
    assert abs(force) > 0.1
    assert fd == pytest.approx(force, rel=0.03, abs=0.01)


@pytest.mark.slow
def test_qe_output_ingests_with_its_signature(qe_run, db):
    recipe, atoms, folder, out = qe_run
    report = db.ingest(out, settings=ingest_settings(out), progress=False)
    assert (report.added, report.failed) == (1, [])
    got = db.frames(settings={"code": "qe", "xc": "PBE"})
    assert len(got) == 1 and got[0].info["signature"]["pseudopotentials"] == {"Si": "Si.pbe-rrkj.UPF"}


@pytest.mark.slow
def test_pyscf_water_energy_forces_and_extxyz_output(tmp_path, db):
    pytest.importorskip("pyscf")
    from mlmd_lab.io import read

    water = rattle(molecule("H2O"), 1, amplitude=0.03, seed=2)[0]
    recipe = PySCF()
    out = recipe.calculate(water, tmp_path / "water")
    assert out.name == "pyscf.xyz" and (tmp_path / "water" / "pyscf.log").stat().st_size > 0
    frame = read(out).frames[0]
    energy, forces = frame.get_potential_energy(), frame.get_forces()
    assert energy == pytest.approx(-76.27 * 27.2114, rel=2e-3)  # PBE/def2-SVP water, Hartree → eV
    assert np.abs(forces.sum(axis=0)).max() < 1e-3
    h = 1e-3
    e = []
    for sign in (+1, -1):
        moved = water.copy()
        moved.positions[0, 2] += sign * h
        e.append(recipe.compute(moved, ("energy",))["energy"])
    assert -(e[0] - e[1]) / (2 * h) == pytest.approx(forces[0, 2], abs=2e-3)
    # the in-memory ASE calculator gives the same labels
    again = water.copy()
    again.calc = recipe.as_calculator()
    np.testing.assert_allclose(again.get_forces(), forces, atol=1e-5)
    sig = frame.info["signature"]
    assert sig == recipe.signature_settings(water) and sig["code"] == "pyscf"
    assert json.loads(frame.info["dft_settings"])["basis"] == "def2-svp"
    assert frame.info["generator"]["name"] == "rattle"
    # the documented ingest call: frames and calculation get the recipe's signature
    report = db.ingest(out, settings=ingest_settings(out), progress=False)
    assert (report.added, report.failed) == (1, [])
    got = db.frames(settings={"code": "pyscf", "xc": "PBE"})
    assert len(got) == 1 and got[0].info["signature"]["extra"]["basis"] == "def2-svp"
    assert db.calculations()[0]["signature_id"] == got[0].info["signature_id"]
    assert json.loads(got[0].info["provenance"])["name"] == "rattle"


def test_pyscf_molecules_run_on_one_thread_and_the_callers_threads_come_back(tmp_path):
    """One OpenMP and BLAS thread per molecular calculation (PySCF's docstring: more were measured slower, and up
    to 10x slower on a busy machine); an explicit ``threads`` wins; cells keep PySCF's default; the limits end
    with the calculation. PySCF's log header says how many threads it ran on."""
    pytest.importorskip("pyscf")
    from pyscf import lib
    from threadpoolctl import threadpool_info

    def counts() -> list[tuple[str, int]]:
        return sorted((i["filepath"], i["num_threads"]) for i in threadpool_info())

    water = molecule("H2O")
    before, before_pyscf = counts(), lib.num_threads()
    energies = {}
    for threads in (None, 2):
        log = tmp_path / f"threads-{threads}.log"
        energies[threads] = PySCF(threads=threads).compute(water, ("energy",), log=log)["energy"]
        header = next(line for line in log.read_text().splitlines() if "Threads" in line)
        assert header.split()[-1] == str(threads or 1), header
        assert counts() == before and lib.num_threads() == before_pyscf
    assert energies[None] == pytest.approx(energies[2], abs=1e-7)  # same SCF, 1e-9 Ha convergence
    assert (PySCF().threads_for(water), PySCF().threads_for(si8(False)), PySCF(threads=3).threads_for(water)) \
        == (1, None, 3)


@pytest.mark.slow
def test_pyscf_periodic_stress_is_corrected_and_matches_strain_derivative():
    pytest.importorskip("pyscf")
    cell = bulk("Si", "diamond", a=5.43)
    cell.positions[1] += [0.05, -0.03, 0.02]
    # a small basis keeps this fast; the finite-difference check does not depend on the basis
    recipe = PySCF(basis="gth-szv", ke_cutoff=12, stress=True)
    res = recipe.compute(cell)
    volume = cell.get_volume()
    h = 0.004
    for comp, (i, j) in ((0, (0, 0)), (5, (0, 1))):
        energies = []
        for sign in (+1, -1):
            F = np.eye(3)
            if i == j:
                F[i, i] += sign * h
            else:  # symmetric shear with engineering strain h: dE/dh = V σ_ij
                F[i, j] += sign * h / 2
                F[j, i] += sign * h / 2
            strained = cell.copy()
            strained.set_cell(cell.cell.array @ F.T, scale_atoms=True)
            energies.append(recipe.compute(strained, ("energy",))["energy"])
        fd = (energies[0] - energies[1]) / (2 * h) / volume
        assert res["stress"][comp] == pytest.approx(fd, rel=0.01, abs=2e-4)
    # PySCF's own ASE calculator is off by Bohr² (0.28); the corrected value is not
    assert abs(res["stress"][0]) > 0.01


@pytest.mark.slow
def test_pyscf_gamma_multigrid_forces_match_kpoint_code():
    pytest.importorskip("pyscf")
    cell = bulk("Si", "diamond", a=5.43)
    cell.positions[1] += [0.05, -0.03, 0.02]
    fast = PySCF(basis="gth-szv", ke_cutoff=12).compute(cell, ("energy", "forces"))
    kcode = PySCF(basis="gth-szv", ke_cutoff=12, kpts=(1, 1, 1)).compute(cell, ("energy", "forces"))
    assert "stress" not in fast
    # the two codes integrate the density on different grids: at this coarse cutoff forces agree to ~3 meV/Å
    np.testing.assert_allclose(fast["forces"], kcode["forces"], atol=0.01)
    assert np.abs(fast["forces"]).max() > 1.0
    assert fast["energy"] == pytest.approx(kcode["energy"], abs=0.02)  # 7 meV at 12 Ha, 0.03 meV at 20 Ha
