"""read_vasprun against the real vasprun.xml files of ../shared/external/vasp (and broken copies of them)."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import ase.io
import numpy as np
import pytest

from mlmd_lab.errors import InputFileError
from mlmd_lab.frames import results_of
from mlmd_lab.io.vasp import read_vasprun
from mlmd_lab.settings import signature_hash

EXTERNAL = Path(__file__).resolve().parents[1] / ".." / "shared" / "external"
FILES = {
    "ge": "vasprun.Ge.vdw.xml",
    "tioti": "vasprun.Ti-O-Ti-v6.xml",
    "h2o": "vasprun.h2o.md.xml",
    "h2o_dup": "vasprun.h2o.md.duplicate.xml",
}
NFRAMES = {"ge": 1, "tioti": 1, "h2o": 3, "h2o_dup": 3}


def vasp_file(key: str) -> Path:
    path = (EXTERNAL / "vasp" / FILES[key]).resolve()
    if not path.is_file():
        pytest.skip(f"real VASP sample {path} not found (../shared/external exists only in this workplace)")
    return path


def assert_same_as_ase(calc, images) -> None:
    assert len(calc.frames) == len(images)
    for ours, ref in zip(calc.frames, images, strict=True):
        r, q = results_of(ours), ref.calc.results
        assert ours.get_chemical_symbols() == ref.get_chemical_symbols()
        assert np.array_equal(ours.positions, ref.positions)
        assert np.array_equal(ours.cell.array, ref.cell.array)
        assert r["energy"] == q["energy"]
        assert r["free_energy"] == q["free_energy"]
        assert np.array_equal(r["forces"], q["forces"])
        assert np.array_equal(r["stress"], q["stress"])


@pytest.mark.parametrize("key", list(FILES))
def test_frames_equal_ase(key):
    path = vasp_file(key)
    calc = read_vasprun(path)
    assert calc.code == "vasp" and calc.finished and calc.warnings == []
    assert len(calc.frames) == NFRAMES[key]
    assert_same_as_ase(calc, ase.io.read(path, index=":", format="vasp-xml"))
    assert [a.info["step"] for a in calc.frames] == list(range(NFRAMES[key]))
    assert all(a.info["converged"] is True for a in calc.frames)
    json.dumps(calc.settings)  # JSON-serialisable, no numpy
    json.dumps(calc.signature)


def test_last_only():
    path = vasp_file("h2o")
    calc = read_vasprun(path, last_only=True)
    assert len(calc.frames) == 1 and calc.frames[0].info["step"] == 2
    assert_same_as_ase(calc, ase.io.read(path, index="-1:", format="vasp-xml"))


def test_energy_is_sigma0_and_free_energy_is_toten():
    # the Ge file's last <scstep> and <calculation><energy>: e_0 = -33.36836054, e_fr = -33.36815582
    # (PSTRESS = 0)
    res = results_of(read_vasprun(vasp_file("ge")).frames[0])
    assert res["energy"] == pytest.approx(-33.36836054, abs=1e-8)
    assert res["free_energy"] == pytest.approx(-33.36815582, abs=1e-8)
    # stress: first row of the file is 12.51388141 4.48990833 -0.19443166 kBar; ASE sign is the opposite
    assert res["stress"][0] == pytest.approx(-12.51388141 * 0.1 / 160.21766208, rel=1e-6)


def test_ge_settings_and_signature():
    calc = read_vasprun(vasp_file("ge"))
    s, sig = calc.settings, calc.signature
    assert s["generator"]["program"] == "vasp"
    assert s["generator"]["version"] == "5.4.4.18Apr17-6-g9f103f2a35" == calc.code_version
    assert s["incar"]["ENCUT"] == 226.0 and s["incar"]["PREC"] == "normal" and s["incar"]["GGA"] == "PE"
    assert s["incar"]["ISMEAR"] == 1 and s["incar"]["SIGMA"] == 0.1
    assert s["parameters"]["ENMAX"] == 226.0 and s["parameters"]["ENAUG"] == 385.843
    assert s["parameters"]["NELM"] == 60  # electronic one, not the response-function NELM = 1
    assert s["parameters"]["response functions/NELM"] == 1
    assert s["parameters"]["LUSE_VDW"] is False
    # VASP does not write IVDW to vasprun.xml; the energies show no classical vdW term either
    assert "IVDW" not in s["incar"] and "IVDW" not in s["parameters"]
    assert "dispersion_energy_per_step" not in s
    assert s["kpoints"]["scheme"] == "Auto" and s["kpoints"]["divisions"] == [7, 5, 1]
    assert s["kpoints"]["subdivisionlength"] == 20.0 and s["kpoints"]["nkpoints"] == 18
    assert s["atominfo"]["elements"] == ["Ge"] * 8
    assert s["atominfo"]["atomtypes"][0]["pseudopotential"] == "PAW_PBE Ge 05Jan2001"
    # |b_i| (with 2π) from rec_basis in the file, divided by the divisions 7 5 1
    rec = np.array([[0.35208347, 0.02436163, -0.00554360], [0, 0.23210265, 0.03340677], [0, 0, 0.07143420]])
    kspacing = max(2 * np.pi * np.linalg.norm(rec, axis=1) / [7, 5, 1])
    assert sig == {
        "code": "vasp", "code_version": "5.4.4.18Apr17-6-g9f103f2a35", "xc": "PBE", "xc_family": "GGA",
        "vdw": None, "encut": 226.0, "ecutrho": None, "prec": "NORMAL", "kpoints": [7, 5, 1],
        "kspacing": round(kspacing, 4), "gamma_only": False, "smearing": "methfessel-paxton-1", "sigma": 0.1,
        "spin": False, "hubbard_u": None, "dataset": None, "pseudopotentials": {"Ge": "PAW_PBE Ge 05Jan2001"},
        "extra": {"ADDGRID": False, "ENAUG": 385.843, "GGA": "PE", "GGA_COMPAT": True, "LASPH": False,
                  "LREAL": "A"},
    }


def test_tioti_v6_settings_and_signature():
    calc = read_vasprun(vasp_file("tioti"))
    s, sig = calc.settings, calc.signature
    assert calc.code_version == "6.3.0"
    assert s["incar"]["PREC"] == "Accurate" and s["parameters"]["PREC"] == "accura"
    assert s["incar"]["KSPACING"] == 10.0 and s["incar"]["KGAMMA"] is False
    assert s["parameters"]["NELM"] == 100
    assert s["kpoints"]["divisions"] == [1, 1, 1] and s["kpoints"]["nkpoints"] == 1
    assert [t["atomspertype"] for t in s["atominfo"]["atomtypes"]] == [3, 2, 3]
    assert sig["prec"] == "ACCURATE" and sig["encut"] == 350.0 and sig["xc"] == "PBE"  # GGA = "--": POTCAR
    assert sig["kpoints"] == [1, 1, 1] and sig["gamma_only"] is True
    assert sig["smearing"] == "methfessel-paxton-1" and sig["sigma"] == 0.2
    assert sig["pseudopotentials"] == {"Ti": "PAW_PBE Ti 08Apr2002", "O": "PAW_PBE O 08Apr2002"}
    cell = calc.frames[0].cell.array
    assert sig["kspacing"] == round(max(np.linalg.norm(2 * np.pi * np.linalg.inv(cell).T, axis=1)), 4)
    assert sig["vdw"] is None and sig["hubbard_u"] is None and sig["spin"] is False


def test_h2o_md_settings_and_duplicate_types():
    calc = read_vasprun(vasp_file("h2o"))
    dup = read_vasprun(vasp_file("h2o_dup"))
    sig = calc.signature
    assert calc.settings["incar"]["PREC"] == "a" and sig["prec"] == "ACCURATE"
    assert calc.settings["incar"]["KSPACING"] == 0.8 and calc.settings["incar"]["LASPH"] is True
    assert sig["encut"] == 800.0 and sig["smearing"] == "gaussian" and sig["sigma"] == 0.05
    # near-cubic 10 Å cell with small tilts (basis rows from the file); Γ only: n = 1
    cell = np.array([[10, 0, 0], [-0.011409, 10, 0], [0.1411083, -0.0595569, 10]])
    assert sig["kpoints"] == [1, 1, 1] and sig["gamma_only"] is True
    kspacing = max(np.linalg.norm(2 * np.pi * np.linalg.inv(cell).T, axis=1))
    assert sig["kspacing"] == round(kspacing, 4) == 0.6284
    assert sig["extra"]["LASPH"] is True and sig["extra"]["ENAUG"] == 605.392
    assert sig["pseudopotentials"] == {"O": "PAW_PBE O 08Apr2002", "H": "PAW_PBE H 15Jun2001"}
    # the duplicate file splits H into two POTCAR types: same settings, same signature
    assert len(dup.settings["atominfo"]["atomtypes"]) == 3
    assert dup.signature == sig and signature_hash(dup.signature) == signature_hash(sig)
    assert signature_hash(sig) != signature_hash(read_vasprun(vasp_file("ge")).signature)


def test_gzip_reads_identically(tmp_path):
    path = vasp_file("h2o")
    gz = tmp_path / "vasprun.data"  # no .gz in the name: detected by magic bytes
    gz.write_bytes(gzip.compress(path.read_bytes()))
    a, b = read_vasprun(path), read_vasprun(gz)
    assert a.settings == b.settings and a.signature == b.signature
    assert_same_as_ase(b, ase.io.read(path, index=":", format="vasp-xml"))


def test_truncated_file(tmp_path):
    data = vasp_file("h2o").read_bytes()
    cut = data[: int(len(data) * 0.75)]
    n_complete = cut.count(b"</calculation>")
    assert 0 < n_complete < 3
    bad = tmp_path / "vasprun.xml"
    bad.write_bytes(cut)
    with pytest.raises(InputFileError, match=rf"{n_complete} complete ionic steps"):
        read_vasprun(bad)
    calc = read_vasprun(bad, allow_unfinished=True)
    assert calc.finished is False and len(calc.frames) == n_complete
    assert any("complete ionic steps" in w for w in calc.warnings)
    full = ase.io.read(vasp_file("h2o"), index=":", format="vasp-xml")
    assert_same_as_ase(calc, full[:n_complete])


def test_truncated_before_first_step(tmp_path):
    data = vasp_file("ge").read_bytes()
    bad = tmp_path / "vasprun.xml"
    bad.write_bytes(data[: data.index(b"<calculation>") + 200])
    with pytest.raises(InputFileError, match="0 complete ionic steps"):
        read_vasprun(bad, allow_unfinished=True)
    bad.write_bytes(data[: data.index(b"<atominfo>")])  # cut in the settings
    with pytest.raises(InputFileError, match="0 complete ionic steps"):
        read_vasprun(bad)


def test_empty_file(tmp_path):
    bad = tmp_path / "vasprun.xml"
    bad.write_bytes(b"")
    with pytest.raises(InputFileError, match=r"empty \(0 bytes\)"):
        read_vasprun(bad)


def test_png_named_vasprun(tmp_path):
    bad = tmp_path / "vasprun.xml"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    with pytest.raises(InputFileError, match="is a PNG image, not a VASP vasprun.xml"):
        read_vasprun(bad)


def test_random_non_utf8_bytes(tmp_path):
    rng = np.random.default_rng(0)
    bad = tmp_path / "vasprun.xml"
    bad.write_bytes(b"\xff\xfe\xfa" + rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(InputFileError, match="not a VASP vasprun.xml") as err:
        read_vasprun(bad)
    assert "binary" in str(err.value)


def test_qe_output_named_vasprun(tmp_path):
    qe = (EXTERNAL / "qe" / "01.out").resolve()
    if not qe.is_file():
        pytest.skip(f"real QE sample {qe} not found")
    bad = tmp_path / "vasprun.xml"
    bad.write_bytes(qe.read_bytes())
    with pytest.raises(InputFileError, match="pw.x output.*read_pw_output"):
        read_vasprun(bad)


def test_other_xml(tmp_path):
    bad = tmp_path / "vasprun.xml"
    bad.write_text('<?xml version="1.0"?>\n<html><modeling/></html>\n')
    with pytest.raises(InputFileError, match="root element <html>"):
        read_vasprun(bad)


def test_malformed_xml_in_the_middle(tmp_path):
    data = vasp_file("h2o").read_bytes()
    i = data.index(b"<varray name=\"forces\"")
    bad = tmp_path / "vasprun.xml"
    bad.write_bytes(data[:i] + b"<<broken & >" + data[i:])
    with pytest.raises(InputFileError, match="not well-formed XML"):
        read_vasprun(bad, allow_unfinished=True)


def test_forces_stripped(tmp_path):
    text = vasp_file("h2o").read_bytes().decode("latin-1")
    stripped, n = re.subn(r'<varray name="forces" >.*?</varray>\s*', "", text, flags=re.S)
    assert n == 3
    bad = tmp_path / "vasprun.xml"
    bad.write_bytes(stripped.encode("latin-1"))
    with pytest.raises(InputFileError, match="no forces"):
        read_vasprun(bad)


def test_unconverged_scf_is_flagged(tmp_path):
    # NELM lowered to the number of SCF steps of ionic step 0 → that step counts as not converged
    path = vasp_file("ge")
    text = path.read_bytes().decode("latin-1")
    n_scf = text.count("<scstep>")
    old = '<i type="int" name="NELM">    60</i>'
    text = text.replace(old, f'<i type="int" name="NELM">    {n_scf}</i>', 1)
    bad = tmp_path / "vasprun.xml"
    bad.write_bytes(text.encode("latin-1"))
    calc = read_vasprun(bad)
    assert calc.frames[0].info["converged"] is False
    assert any("SCF not converged" in w for w in calc.warnings)


def test_signature_rules_on_hand_made_settings():
    from mlmd_lab.io.vasp import vasp_signature

    types = [{"element": "Fe", "pseudopotential": "PAW_PBE Fe_pv 06Sep2000"},
             {"element": "O", "pseudopotential": "PAW_PBE O 08Apr2002"}]
    settings = {
        "incar": {"LDAU": True, "LDAUTYPE": 2, "LDAUL": [2, -1], "LDAUU": [5.3, 0.0], "LDAUJ": [0.0, 0.0],
                  "IVDW": 12, "ISPIN": 2, "ISMEAR": -5, "SIGMA": 0.05, "METAGGA": "R2SCAN"},
        "parameters": {"ENMAX": 520.0, "PREC": "accura", "GGA": "--", "LHFCALC": False},
        "kpoints": {"scheme": "Gamma", "divisions": [4, 4, 4], "gamma_only": False},
        "atominfo": {"atomtypes": types},
    }
    sig = vasp_signature(settings, np.eye(3) * 4.0)
    assert sig["xc"] == "R2SCAN" and sig["xc_family"] == "METAGGA" and sig["vdw"] == "D3BJ"
    assert sig["hubbard_u"] == {"Fe": 5.3} and sig["spin"] is True and sig["smearing"] == "tetrahedron"
    assert sig["kspacing"] == round(2 * np.pi / 4.0 / 4, 4)
    settings["incar"] = {"ISMEAR": 0, "SIGMA": 0.05}
    settings["parameters"].update({"LHFCALC": True, "AEXX": 0.25, "HFSCREEN": 0.2, "GGA": "PE"})
    assert vasp_signature(settings, np.eye(3) * 4.0)["xc"] == "HSE06"
    settings["parameters"].update({"LHFCALC": False, "GGA": "BO", "LUSE_VDW": True, "PARAM1": 0.1833333333,
                                   "PARAM2": 0.22, "AGGAC": 0.0})
    sig = vasp_signature(settings, np.eye(3) * 4.0)
    assert sig["xc"] == "OPTB88" and sig["vdw"] == "OPTB88-VDW"
    # a dispersion energy seen in the file without a recorded IVDW: vdW of unknown kind
    settings["parameters"].update({"GGA": "PE", "LUSE_VDW": False})
    assert vasp_signature(settings, np.eye(3) * 4.0, dispersion_detected=True)["vdw"] == "UNKNOWN"


def test_truncated_gzip(tmp_path):
    data = vasp_file("h2o").read_bytes()
    cut = data[: int(len(data) * 0.75)]
    bad = tmp_path / "vasprun.xml.gz"
    bad.write_bytes(gzip.compress(data)[: len(gzip.compress(cut))])  # a gzip stream cut short
    with pytest.raises(InputFileError, match="complete ionic steps"):
        read_vasprun(bad)
