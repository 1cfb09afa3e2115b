"""read_pw_output against the real pw.x CH4 runs of ../shared/external/qe and their reference text files."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase import units
from ase.units import create_units

from mlmd_lab.errors import InputFileError
from mlmd_lab.frames import results_of
from mlmd_lab.io.espresso import find_input, is_pw_output, read_pw_output
from mlmd_lab.settings import signature_hash

EXTERNAL = Path(__file__).resolve().parents[1] / ".." / "shared" / "external"

# pw.x prints forces in Ry/Bohr with 8 decimals, stress in Ry/Bohr³ with 8 decimals and in kbar with 2.
FORCE_PRINT_TOL = 0.5e-8 * units.Ry / units.Bohr  # eV/Å
KBAR = 1e-1 * units.GPa  # eV/Å³ per kbar
# ASE's espresso reader converts with CODATA 2006 constants (as pw.x ≤ 6.x does), not ase.units' CODATA 2014:
# Ry = 13.6056919 eV instead of 13.6056930 eV (relative 8e-8, 1.7e-5 eV on these energies).
RY_2006 = create_units("2006")["Ry"]
BOHR_2006 = create_units("2006")["Bohr"]


def qe_file(name: str) -> Path:
    path = (EXTERNAL / "qe" / name).resolve()
    if not path.is_file():
        pytest.skip(f"real QE sample {path} not found (../shared/external exists only in this workplace)")
    return path


def reference(name: str) -> np.ndarray:
    return np.loadtxt(qe_file(name))


def assert_same_as_ase(calc, images) -> None:
    assert len(calc.frames) == len(images)
    for ours, ref in zip(calc.frames, images, strict=True):
        r, q = results_of(ours), ref.calc.results
        assert ours.get_chemical_symbols() == ref.get_chemical_symbols()
        assert np.array_equal(ours.positions, ref.positions)
        assert np.array_equal(ours.cell.array, ref.cell.array)
        assert r["energy"] == q["energy"] and r["free_energy"] == q["free_energy"]
        assert np.array_equal(r["forces"], q["forces"])
        if q.get("stress") is None:
            assert "stress" not in r
        else:
            assert np.array_equal(r["stress"], q["stress"])


@pytest.mark.parametrize("name", ["01.out", "03.out"])
def test_frames_equal_ase(name):
    path = qe_file(name)
    calc = read_pw_output(path)
    assert calc.code == "qe" and calc.finished and calc.warnings == []
    assert len(calc.frames) == 1 and calc.frames[0].info == {"step": 0, "converged": True}
    assert_same_as_ase(calc, ase.io.read(path, index=":", format="espresso-out"))
    json.dumps(calc.settings)
    json.dumps(calc.signature)


def test_run01_matches_reference_files():
    frame = read_pw_output(qe_file("01.out")).frames[0]
    res = results_of(frame)
    assert np.allclose(frame.positions, reference("ch4_coord"), atol=1e-6)
    assert res["energy"] == pytest.approx(-16.15090531 * RY_2006, abs=1e-7)
    assert np.allclose(res["forces"], reference("ch4_force"), atol=2 * FORCE_PRINT_TOL, rtol=1e-6)
    # virial = -stress × volume (ASE sign: the file's stress is compressive-positive, its P = +0.77 kbar)
    virial = -frame.get_stress(voigt=False) * frame.get_volume()
    ref_virial = reference("ch4_virial").reshape(3, 3)
    # the reference was made from the kbar column (2 decimals); ASE reads the Ry/Bohr³ column (8 decimals)
    tol = 0.005 * KBAR * frame.get_volume() + 0.5e-8 * units.Ry / units.Bohr**3 * frame.get_volume()
    assert np.allclose(virial, ref_virial, atol=tol, rtol=0)
    assert np.all(np.sign(virial[np.abs(ref_virial) > 0.1]) == np.sign(ref_virial[np.abs(ref_virial) > 0.1]))
    # the file's own printed numbers: xx 0.00001341 Ry/Bohr³ = 1.97 kbar (compressive) → ASE stress negative
    assert res["stress"][0] == pytest.approx(-0.00001341 * RY_2006 / BOHR_2006**3, rel=1e-12)
    assert res["stress"][0] == pytest.approx(-1.97 * KBAR, abs=0.005 * KBAR)
    # the pressure is minus a third of the trace of the ASE stress
    assert -np.trace(frame.get_stress(voigt=False)) / 3 / KBAR == pytest.approx(0.77, abs=0.005)


def test_run03_matches_reference_files():
    frame = read_pw_output(qe_file("03.out")).frames[0]
    res = results_of(frame)
    assert np.allclose(frame.positions, reference("ch4_coord"), atol=1e-6)
    assert np.allclose(res["forces"], reference("ch4_force_2"), atol=2 * FORCE_PRINT_TOL, rtol=1e-6)
    assert "stress" not in res  # tstress = .false.
    assert res["energy"] == pytest.approx(-16.14878191 * RY_2006, abs=1e-7)


def test_settings_and_signature_run01():
    calc = read_pw_output(qe_file("01.out"))
    s, sig = calc.settings, calc.signature
    assert Path(s["input_path"]).name == "01.in"
    assert s["input"]["namelists"]["system"]["ecutwfc"] == 110
    assert s["input"]["namelists"]["control"]["tprnfor"] is True
    assert s["input"]["atomic_species"] == [
        {"label": "H", "mass": 1.0, "pseudopotential": "H.tm.pbe.UPF"},
        {"label": "C", "mass": 1.0, "pseudopotential": "C.tm.pbe.UPF"},
    ]
    out = s["output"]
    assert out["version"] == "5.4.0" == calc.code_version
    assert out["xc"] == "PBE" and out["xc_indices"] == [1, 4, 3, 4, 0, 0]
    assert out["ecutwfc_ry"] == 110.0 and out["ecutrho_ry"] == 440.0 and out["nkpoints"] == 1
    assert out["gamma_tricks"] is True and out["lsda"] is False
    assert out["pseudopotentials"][0] == {
        "index": 1, "species": "H", "file": "../pseudo/H.tm.pbe.UPF",
        "md5": "4b614d66af87240b7a5107bfa527a767", "type": "Norm-conserving",
    }
    assert sig == {
        "code": "qe", "code_version": "5.4.0", "xc": "PBE", "xc_family": "GGA", "vdw": None,
        "encut": round(110 * units.Ry, 2), "ecutrho": round(440 * units.Ry, 2), "prec": None,
        "kpoints": [1, 1, 1], "kspacing": round(2 * np.pi / (18.897261 * units.Bohr), 4), "gamma_only": True,
        "smearing": "fixed", "sigma": 0.0, "spin": False, "hubbard_u": None, "dataset": None,
        "pseudopotentials": {"H": "H.tm.pbe.UPF", "C": "C.tm.pbe.UPF"},
        "extra": {"pseudopotential_md5": {"H": "4b614d66af87240b7a5107bfa527a767",
                                          "C": "a4f27fcb9b24331b00ace8e732a7e062"},
                  "qe_xc_indices": [1, 4, 3, 4, 0, 0]},
    }


def test_settings_run03_qe7_header():
    calc = read_pw_output(qe_file("03.out"))
    out, sig = calc.settings["output"], calc.signature
    assert out["version"] == "7.1" and out["xc"] == "PBE" and out["xc_indices"] == [1, 4, 3, 4, 0, 0, 0]
    assert sig["pseudopotentials"] == {"H": "H.pbe-van_ak.UPF", "C": "C.pbe-van_ak.UPF"}
    assert out["pseudopotentials"][1]["type"] == "Ultrasoft"
    assert calc.settings["input"]["namelists"]["control"]["tstress"] is False
    # same functional and cutoff as run 01, different pseudopotentials: different signature
    assert signature_hash(sig) != signature_hash(read_pw_output(qe_file("01.out")).signature)


def test_output_alone_gives_same_signature(tmp_path):
    out = tmp_path / "run.out"
    shutil.copy(qe_file("01.out"), out)
    assert find_input(out) is None
    calc = read_pw_output(out)
    assert calc.settings["input"] is None
    assert any("no pw.x input" in w for w in calc.warnings)
    ref = read_pw_output(qe_file("01.out"))
    assert calc.signature == ref.signature
    assert_same_as_ase(calc, ase.io.read(out, index=":", format="espresso-out"))


def test_explicit_input_path_and_mismatch_warning(tmp_path):
    out = tmp_path / "run.out"
    shutil.copy(qe_file("01.out"), out)
    calc = read_pw_output(out, input_path=qe_file("03.in"))  # the input of another run
    assert any("other pseudopotentials" in w for w in calc.warnings)


def test_is_pw_output():
    assert is_pw_output(qe_file("01.out").read_bytes()[:4096])
    assert not is_pw_output(b"<?xml version='1.0'?><modeling>")


def test_gzip_reads_identically(tmp_path):
    gz = tmp_path / "01.out"
    gz.write_bytes(gzip.compress(qe_file("01.out").read_bytes()))
    shutil.copy(qe_file("01.in"), tmp_path / "01.in")
    a, b = read_pw_output(qe_file("01.out")), read_pw_output(gz)
    assert a.signature == b.signature
    assert_same_as_ase(b, ase.io.read(qe_file("01.out"), index=":", format="espresso-out"))


def test_cut_mid_run(tmp_path):
    text = qe_file("01.out").read_text()
    bad = tmp_path / "01.out"
    bad.write_text(text[: text.index("iteration #  5")])
    with pytest.raises(InputFileError, match="0 complete ionic steps"):
        read_pw_output(bad)
    with pytest.raises(InputFileError, match="0 complete ionic steps"):
        read_pw_output(bad, allow_unfinished=True)
    # cut inside the forces block: still no complete step
    bad.write_text(text[: text.index("atom    3 type  1   force")])
    with pytest.raises(InputFileError, match="0 complete ionic steps"):
        read_pw_output(bad, allow_unfinished=True)


def test_cut_after_complete_step(tmp_path):
    text = qe_file("01.out").read_text()
    bad = tmp_path / "01.out"
    bad.write_text(text[: text.index("init_run     :")])  # forces and stress written, no JOB DONE
    with pytest.raises(InputFileError, match="1 complete ionic steps"):
        read_pw_output(bad)
    calc = read_pw_output(bad, allow_unfinished=True)
    assert calc.finished is False and len(calc.frames) == 1
    assert_same_as_ase(calc, ase.io.read(qe_file("01.out"), index=":", format="espresso-out"))


def test_without_forces_section(tmp_path):
    lines = qe_file("01.out").read_text().splitlines(keepends=True)
    start = next(i for i, ln in enumerate(lines) if "Forces acting on atoms" in ln)
    end = next(i for i, ln in enumerate(lines) if "Total force" in ln)
    bad = tmp_path / "01.out"
    bad.write_text("".join(lines[:start] + lines[end + 1:]))
    with pytest.raises(InputFileError, match="no forces.*tprnfor"):
        read_pw_output(bad)


def test_empty(tmp_path):
    bad = tmp_path / "pw.out"
    bad.write_bytes(b"")
    with pytest.raises(InputFileError, match=r"empty \(0 bytes\)"):
        read_pw_output(bad)


def test_png_and_garbage_and_vasprun(tmp_path):
    bad = tmp_path / "pw.out"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    with pytest.raises(InputFileError, match="PNG image, not a Quantum ESPRESSO pw.x output"):
        read_pw_output(bad)
    bad.write_bytes(np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(InputFileError, match="binary \\(non-text\\) data, not a Quantum ESPRESSO"):
        read_pw_output(bad)
    vasprun = (EXTERNAL / "vasp" / "vasprun.Ge.vdw.xml").resolve()
    if vasprun.is_file():
        bad.write_bytes(vasprun.read_bytes())
        with pytest.raises(InputFileError, match="vasprun.xml.*read_vasprun"):
            read_pw_output(bad)


def test_signature_rules_on_hand_made_input(tmp_path):
    from mlmd_lab.io.espresso import parse_pw_input, qe_signature

    inp = tmp_path / "fe.in"
    inp.write_text(
        "&system\n ibrav=1, a=4, nat=2, ntyp=2, ecutwfc=40, ecutrho=320, nspin=2,\n"
        " occupations='smearing', smearing='mv', degauss=0.02, vdw_corr='grimme-d3', dftd3_version=4,\n"
        " lda_plus_u=.true., Hubbard_U(1)=4.0\n/\n"
        "ATOMIC_SPECIES\nFe1 55.845 Fe.pbe-spn-kjpaw_psl.0.2.1.UPF\nO 15.999 O.pbe-n-kjpaw_psl.0.1.UPF\n"
        "K_POINTS automatic\n 6 6 6 0 0 0\n"
    )
    settings = {"input": parse_pw_input(inp), "output": {"xc": "SLA PW PBX PBC", "version": "6.8"}}
    sig = qe_signature(settings, [[4, 0, 0], [0, 4, 0], [0, 0, 4]])
    assert sig["xc"] == "PBE" and sig["vdw"] == "D3BJ" and sig["spin"] is True
    assert sig["smearing"] == "marzari-vanderbilt" and sig["sigma"] == round(0.02 * units.Ry, 6)
    assert sig["hubbard_u"] == {"Fe": 4.0} and sig["kpoints"] == [6, 6, 6] and sig["gamma_only"] is False
    assert sig["encut"] == round(40 * units.Ry, 2) and sig["ecutrho"] == round(320 * units.Ry, 2)
    assert sig["pseudopotentials"] == {"Fe": "Fe.pbe-spn-kjpaw_psl.0.2.1.UPF",
                                       "O": "O.pbe-n-kjpaw_psl.0.1.UPF"}
    assert sig["kspacing"] == round(2 * np.pi / 4 / 6, 4)


def test_qe_pbe_short_names_and_indices_map_to_pbe():
    """QE 6.7 prints 'SLA PW PBE PBE ( 1 4 3 4 0 0 0)' for Debian's Si.pbe-rrkj.UPF without input_dft."""
    from mlmd_lab.io.espresso import qe_signature

    for output in ({"xc": "SLA PW PBE PBE", "xc_indices": [1, 4, 3, 4, 0, 0, 0]},
                   {"xc": "SLA  PW   PBX  PBC", "xc_indices": [1, 4, 3, 4, 0, 0, 0]},
                   {"xc": "SOMENEWNAME", "xc_indices": [1, 4, 3, 4, 0, 0, 0]}):
        assert qe_signature({"output": output, "input": {}}, None)["xc"] == "PBE"
    hybrid = qe_signature({"output": {"xc": "SOMENEWNAME", "xc_indices": [1, 4, 3, 4, 0, 1, 0]}, "input": {}}, None)
    assert hybrid["xc"] == "SOMENEWNAME"  # extra indices (hybrid, meta-GGA): not guessed


# -- `!` on every SCF iteration (pw.x with iprint, issue 14.1) ---------------------------------------------
# pw.x marks the total energy of every SCF iteration with "!" when iprint is set (e.g. iprint = 1; seen with
# pw.x 6.7 for scf and relax), not only the converged one. Ionic steps are what ends them, not "!" lines.
_ITERATION_ENERGY = re.compile(r"^     total energy( +=)", flags=re.M)
_CH4_RUN01_ENERGY = "!    total energy              =     -16.15090531 Ry"


def _bang_on_every_iteration(text: str) -> str:
    """A pw.x output as printed with iprint = 1: each SCF iteration's total-energy line starts with '!'."""
    marked, count = _ITERATION_ENERGY.subn(r"!    total energy\1", text)
    assert count > 1
    return marked


def _scf_body_and_tail(text: str) -> tuple[str, str, str]:
    """(header, one ionic step: SCF iterations to the stress block, timings and JOB DONE) of run 01."""
    head, rest = text.split("     Self-consistent Calculation", 1)
    cut = rest.index("     init_run     :")
    return head, "     Self-consistent Calculation" + rest[:cut], rest[cut:]


def _positions_block(positions) -> str:
    rows = "".join(f"{s}  {x:.10f}  {y:.10f}  {z:.10f}\n" for s, (x, y, z) in zip("HHHHC", positions, strict=True))
    return f"\nATOMIC_POSITIONS (angstrom)\n{rows}\n"


def _between_steps(kind: str, step: int, positions, final: bool = False) -> str:
    """What pw.x prints after an ionic step's forces (text shapes as pw.x 6.7 prints them)."""
    if kind == "md":
        return (f"     Entering Dynamics:    iteration =     {step}\n\n{_positions_block(positions)}"
                "     kinetic energy (Ekin) =           0.00000000 Ry\n\n")
    if final:
        return ("     bfgs converged in   2 scf cycles and   1 bfgs steps\n\n     End of BFGS Geometry Optimization\n\n"
                f"Begin final coordinates\n{_positions_block(positions)}End final coordinates\n\n")
    return (f"     BFGS Geometry Optimization\n\n     number of scf cycles    =   {step}\n\n"
            f"{_positions_block(positions)}\n     Writing output data file ./out/water.save/\n\n")


def test_scf_with_bang_on_every_scf_iteration_is_one_ionic_step(tmp_path):
    original = read_pw_output(qe_file("01.out"))
    out = tmp_path / "01.out"
    out.write_text(_bang_on_every_iteration(qe_file("01.out").read_text()))
    shutil.copy(qe_file("01.in"), tmp_path / "01.in")
    assert out.read_text().count("!    total energy") == 8  # one per SCF iteration
    calc = read_pw_output(out)
    assert calc.warnings == [] and calc.signature == original.signature
    assert len(calc.frames) == 1 and calc.frames[0].info == {"step": 0, "converged": True}
    # the converged energy, not the first iteration's (-16.01273774 Ry, which ASE alone would take)
    assert results_of(calc.frames[0])["energy"] == pytest.approx(-16.15090531 * RY_2006, abs=1e-7)
    assert_same_as_ase(calc, ase.io.read(qe_file("01.out"), index=":", format="espresso-out"))


@pytest.mark.parametrize("kind", ["relax", "md"])
def test_relax_and_md_with_bang_on_every_iteration_give_one_frame_per_ionic_step(tmp_path, kind):
    head, body, tail = _scf_body_and_tail(_bang_on_every_iteration(qe_file("01.out").read_text()))
    first = reference("ch4_coord")
    second = first + [0.01, -0.02, 0.005]
    body2 = body.replace(_CH4_RUN01_ENERGY, _CH4_RUN01_ENERGY.replace("-16.15090531", "-16.15100000"))
    assert body2 != body
    out = tmp_path / f"{kind}.out"
    out.write_text(head + body + _between_steps(kind, 1, second) + body2
                   + _between_steps(kind, 2, second + 0.003, final=True) + tail)
    calc = read_pw_output(out)
    assert [f.info["step"] for f in calc.frames] == [0, 1]  # 2 ionic steps of 8 SCF iterations, 16 "!" lines
    energies = [results_of(f)["energy"] for f in calc.frames]
    assert energies == pytest.approx([-16.15090531 * RY_2006, -16.15100000 * RY_2006], abs=1e-7)
    np.testing.assert_allclose(calc.frames[0].positions, first, atol=1e-6)
    np.testing.assert_allclose(calc.frames[1].positions, second, atol=1e-9)
    ref = results_of(read_pw_output(qe_file("01.out")).frames[0])
    for frame in calc.frames:
        assert np.array_equal(results_of(frame)["forces"], ref["forces"])
        assert np.array_equal(results_of(frame)["stress"], ref["stress"])


_H2_INPUT = """&control
  calculation='{calculation}', prefix='h2', pseudo_dir='/usr/share/espresso/pseudo', outdir='./out',
  tprnfor=.true., nstep=3, dt=20 {iprint}
/
&system
  ibrav=1, a=6.0, nat=2, ntyp=1, ecutwfc=20
/
&electrons
  conv_thr=1e-8
/
&ions
/
ATOMIC_SPECIES
H 1.008 H.pz-vbc.UPF
ATOMIC_POSITIONS angstrom
H 0.0 0.0 0.0
H 0.0 0.0 0.80
K_POINTS gamma
"""


def _run_pw(folder: Path, calculation: str, iprint: str) -> Path:
    folder.mkdir()
    (folder / "h2.in").write_text(_H2_INPUT.format(calculation=calculation, iprint=iprint))
    with open(folder / "h2.out", "w") as out:
        subprocess.run(["pw.x", "-in", "h2.in"], cwd=folder, stdout=out, stderr=subprocess.STDOUT, check=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return folder / "h2.out"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("pw.x") is None or not Path("/usr/share/espresso/pseudo/H.pz-vbc.UPF").is_file(),
                    reason="pw.x and quantum-espresso-data not installed (scripts/apt-packages.txt, as root)")
@pytest.mark.parametrize("calculation", ["scf", "relax", "md"])
def test_real_pw_x_with_iprint_reads_as_without(tmp_path, calculation):
    """The same real H2 run with iprint = 1 (pw.x marks every SCF iteration with '!') and without."""
    plain = read_pw_output(_run_pw(tmp_path / "plain", calculation, ""))
    marked_path = _run_pw(tmp_path / "iprint", calculation, ", iprint=1")
    marked = read_pw_output(marked_path)
    text = marked_path.read_text()
    steps = text.count("convergence has been achieved")
    assert len(plain.frames) == len(marked.frames) == steps == {"scf": 1, "relax": 2, "md": 3}[calculation]
    if calculation != "md":  # pw.x 6.7 prints the per-iteration marks for scf and relax
        assert text.count("!    total energy") > steps
    assert marked.warnings == plain.warnings == []
    for a, b in zip(plain.frames, marked.frames, strict=True):
        assert a.info == b.info
        assert results_of(a)["energy"] == results_of(b)["energy"]
        assert np.array_equal(a.positions, b.positions)
        assert np.array_equal(results_of(a)["forces"], results_of(b)["forces"])
