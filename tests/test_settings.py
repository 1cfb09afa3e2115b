"""Settings signatures: normalisation, hashing, and the mixing rules of compare_signatures."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from mlmd_lab.settings import (
    SIGNATURE_KEYS,
    Conflict,
    compare_signatures,
    kspacing_from_divisions,
    normalise_prec,
    normalise_signature,
    signature_hash,
    xc_family,
)


def base(**changes):
    sig = {
        "code": "vasp", "code_version": "6.3.0", "xc": "PBE", "vdw": None, "encut": 520.0, "prec": "Accurate",
        "kpoints": [4, 4, 4], "kspacing": 0.25, "gamma_only": False, "smearing": "gaussian", "sigma": 0.05,
        "spin": False, "hubbard_u": None,
        "pseudopotentials": {"Ti": "PAW_PBE Ti 08Apr2002", "O": "PAW_PBE O 08Apr2002"},
        "extra": {"LASPH": True},
    }
    sig.update(changes)
    return sig


def by_key(conflicts):
    return {c.key: c for c in conflicts}


def test_normalise_fills_and_canonicalises():
    sig = normalise_signature({
        "code": "VASP", "xc": "pbe", "encut": np.float64(400.00001), "prec": "accura",
        "kpoints": np.array([2, 2, 1]), "sigma": 0.1000000001, "smearing": "Gaussian",
        "hubbard_u": {"Fe": np.float32(5.3), "O": 0.0}, "extra": {"ENAUG": np.float64(1.5)},
        "unknown_tag": 3,
    })
    assert set(sig) == set(SIGNATURE_KEYS)
    assert sig["code"] == "vasp" and sig["xc"] == "PBE" and sig["xc_family"] == "GGA"
    assert sig["encut"] == 400.0 and sig["prec"] == "ACCURATE" and sig["kpoints"] == [2, 2, 1]
    assert sig["sigma"] == 0.1 and sig["smearing"] == "gaussian"
    assert sig["hubbard_u"] == {"Fe": 5.3}  # U = 0 is no +U
    assert sig["extra"] == {"ENAUG": 1.5, "unknown_tag": 3}
    assert sig["vdw"] is None and sig["code_version"] is None
    json.dumps(sig)
    assert normalise_signature(sig) == sig  # idempotent


@pytest.mark.parametrize(("raw", "canon"), [("accura", "ACCURATE"), ("a", "ACCURATE"), ("Normal", "NORMAL"),
                                            ("high", "HIGH"), ("low", "LOW"), ("Med", "MEDIUM"),
                                            ("SingleN", "SINGLE"), (None, None)])
def test_prec(raw, canon):
    assert normalise_prec(raw) == canon


def test_xc_family():
    names = ("LDA", "PBE", "pbesol", "SCAN", "R2SCAN", "HSE06", "PBE0", None, "FOO")
    assert [xc_family(x) for x in names] == [
        "LDA", "GGA", "GGA", "METAGGA", "METAGGA", "HYBRID", "HYBRID", None, None]


def test_hash_stable_and_ignores_version():
    h = signature_hash(base())
    assert len(h) == 16 and int(h, 16) >= 0
    assert signature_hash(base(code_version="5.4.4")) == h
    assert signature_hash(base(encut=520.001)) == h  # rounded to 0.01 eV
    assert signature_hash(dict(reversed(list(base().items())))) == h
    assert signature_hash(base(encut=400.0)) != h
    assert signature_hash(base(extra={"LASPH": False})) != h
    # pinned value: changing the canonical form changes every stored signature id
    assert h == signature_hash(json.loads(json.dumps(base())))


def test_identical_no_conflicts():
    assert compare_signatures(base(), base()) == []
    assert compare_signatures(base(), base(code_version="5.4.4")) == []


def test_pbe_vs_scan_is_error():
    c = by_key(compare_signatures(base(), base(xc="SCAN")))
    assert set(c) == {"xc"}
    assert c["xc"].severity == "error" and "PBE vs SCAN" in c["xc"].message
    assert isinstance(c["xc"], Conflict) and dataclasses.is_dataclass(c["xc"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        c["xc"].severity = "warning"


def test_encut_400_vs_520_is_warning():
    c = by_key(compare_signatures(base(encut=400.0), base(encut=520.0)))
    assert set(c) == {"encut"} and c["encut"].severity == "warning"
    assert compare_signatures(base(encut=500.0), base(encut=520.0)) == []  # within 5 %


def test_code_and_vdw_are_errors():
    c = by_key(compare_signatures(base(), base(code="qe", prec=None)))
    assert c["code"].severity == "error"
    assert "prec" not in c  # PREC is VASP's; None for QE is "not applicable", not "unknown"
    c = by_key(compare_signatures(base(), base(vdw="D3")))
    assert set(c) == {"vdw"} and c["vdw"].severity == "error" and "none vs D3" in c["vdw"].message
    c = by_key(compare_signatures(base(vdw="D3"), base(vdw="D3BJ")))
    assert c["vdw"].severity == "error"
    # vasprun.xml showed a classical vdW energy but does not name IVDW: unknown, a warning
    c = by_key(compare_signatures(base(vdw="UNKNOWN"), base(vdw="D3")))
    assert c["vdw"].severity == "warning" and "unknown" in c["vdw"].message


def test_pseudopotentials_shared_elements_only():
    other = base(pseudopotentials={"Ti": "PAW_PBE Ti_sv 26Sep2005", "O": "PAW_PBE O 08Apr2002"})
    c = by_key(compare_signatures(base(), other))
    assert set(c) == {"pseudopotentials:Ti"} and c["pseudopotentials:Ti"].severity == "error"
    # a data set of other elements: nothing shared, nothing to compare
    water = base(pseudopotentials={"H": "PAW_PBE H 15Jun2001", "O": "PAW_PBE O 08Apr2002"})
    assert compare_signatures(base(), water) == []
    # restricted to the elements in use
    assert compare_signatures(base(), other, elements=["O"]) == []
    c = by_key(compare_signatures(base(), water, elements=["H"]))
    assert c["pseudopotentials:H"].severity == "warning"  # unknown on one side


def test_hubbard_u():
    u = base(hubbard_u={"Ti": 3.0})
    c = by_key(compare_signatures(base(), u))
    assert c["hubbard_u:Ti"].severity == "error"
    assert by_key(compare_signatures(u, base(hubbard_u={"Ti": 4.0})))["hubbard_u:Ti"].severity == "error"
    assert compare_signatures(u, base(hubbard_u={"Ti": 3.0})) == []
    assert compare_signatures(base(hubbard_u={"Fe": 5.0}), base()) == []  # Fe not in either data set


def test_extra_entries_stated_by_both_sides_are_compared():
    # an ASE calculator's parameters: another Lennard-Jones sigma is another energy surface
    lj = {"code": "ase:LennardJones", "extra": {"calculator": "LennardJones", "parameters": {"sigma": 3.4}}}
    other = {"code": "ase:LennardJones", "extra": {"calculator": "LennardJones", "parameters": {"sigma": 3.3}}}
    c = by_key(compare_signatures(lj, other))
    assert set(c) == {"extra:parameters"} and c["extra:parameters"].severity == "error"
    assert "3.3" in c["extra:parameters"].message and compare_signatures(lj, dict(lj)) == []
    # PySCF: another basis or multiplicity is an error
    mol = {"code": "pyscf", "xc": "PBE", "extra": {"basis": "def2-svp", "charge": 0, "multiplicity": 1}}
    c = by_key(compare_signatures(mol, {**mol, "extra": {**mol["extra"], "basis": "def2-tzvp", "multiplicity": 3}}))
    assert set(c) == {"extra:basis", "extra:multiplicity"} and {x.severity for x in c.values()} == {"error"}
    # accuracy settings warn; an entry on one side only, or unknown (None) on one side, is no conflict
    c = by_key(compare_signatures(base(), base(extra={"LASPH": False})))
    assert set(c) == {"extra:LASPH"} and c["extra:LASPH"].severity == "warning"
    assert compare_signatures(base(), base(extra={"LASPH": True, "GGA": "PE"})) == []
    assert compare_signatures(base(extra={"LASPH": True, "GGA": None}), base(extra={"LASPH": True, "GGA": "PE"})) == []
    assert compare_signatures(base(extra={"GGA": "--"}), base(extra={"GGA": "PE"})) == []  # xc says PBE for both
    # a pseudopotential md5 is compared for the shared elements only
    md5 = base(extra={"pseudopotential_md5": {"Ti": "aa", "O": "bb"}})
    assert compare_signatures(md5, base(extra={"pseudopotential_md5": {"O": "bb", "H": "cc"}})) == []
    c = by_key(compare_signatures(md5, base(extra={"pseudopotential_md5": {"Ti": "ax", "O": "bb"}})))
    assert set(c) == {"extra:pseudopotential_md5"} and c["extra:pseudopotential_md5"].severity == "error"
    assert compare_signatures(md5, base(extra={"pseudopotential_md5": {"Ti": "ax", "O": "bb"}}), elements=["O"]) == []
    # QE's functional indices: pw.x versions print 6 or 7 of them, zero-padded; other indices are an error
    qe = {"code": "qe", "xc": "PBE", "extra": {"qe_xc_indices": [1, 4, 3, 4, 0, 0]}}
    assert compare_signatures(qe, {**qe, "extra": {"qe_xc_indices": [1, 4, 3, 4, 0, 0, 0]}}) == []
    c = by_key(compare_signatures(qe, {**qe, "extra": {"qe_xc_indices": [1, 4, 10, 8, 0, 0, 0]}}))
    assert c["extra:qe_xc_indices"].severity == "error"


def test_kpoint_smearing_prec_spin_warnings():
    c = by_key(compare_signatures(base(), base(kspacing=0.4)))
    assert set(c) == {"kspacing"} and c["kspacing"].severity == "warning"
    assert compare_signatures(base(), base(kspacing=0.27)) == []
    c = by_key(compare_signatures(base(), base(gamma_only=True, kspacing=0.26)))
    assert set(c) == {"gamma_only"} and c["gamma_only"].severity == "warning"
    c = by_key(compare_signatures(base(), base(smearing="methfessel-paxton-1", sigma=0.2)))
    assert set(c) == {"smearing", "sigma"} and all(x.severity == "warning" for x in c.values())
    c = by_key(compare_signatures(base(), base(prec="normal")))
    assert set(c) == {"prec"} and c["prec"].severity == "warning"
    c = by_key(compare_signatures(base(), base(spin=True)))
    assert set(c) == {"spin"} and c["spin"].severity == "warning"


def test_unknown_values_are_warnings():
    c = by_key(compare_signatures(base(), base(xc=None, encut=None, kspacing=None, pseudopotentials=None)))
    assert set(c) == {"xc", "encut", "kspacing", "pseudopotentials"}
    assert all(x.severity == "warning" and "unknown" in x.message for x in c.values())
    assert compare_signatures(base(xc=None), base(xc=None)) == []


def test_messages_are_one_sentence():
    conflicts = compare_signatures(base(), base(code="qe", xc="SCAN", vdw="D3", encut=300.0, spin=True))
    assert conflicts
    for c in conflicts:
        assert c.message.endswith(".") and c.message.count(". ") == 0 and "\n" not in c.message


def test_kspacing_from_divisions():
    cell = np.diag([4.0, 5.0, 10.0])
    expected = max(2 * np.pi / 16, 2 * np.pi / 20, 2 * np.pi / 10)
    assert kspacing_from_divisions(cell, [4, 4, 1]) == pytest.approx(expected)
    assert kspacing_from_divisions(cell, None) is None
    assert kspacing_from_divisions(np.zeros((3, 3)), [1, 1, 1]) is None


def test_real_files_vasp_vs_qe_conflicts():
    from pathlib import Path

    ext = Path(__file__).resolve().parents[1] / ".." / "shared" / "external"
    if not (ext / "vasp").is_dir() or not (ext / "qe").is_dir():
        pytest.skip(f"real samples not found at {ext} (../shared/external exists only in this workplace)")
    from mlmd_lab.io.espresso import read_pw_output
    from mlmd_lab.io.vasp import read_vasprun

    h2o = read_vasprun(ext / "vasp" / "vasprun.h2o.md.xml").signature
    ge = read_vasprun(ext / "vasp" / "vasprun.Ge.vdw.xml").signature
    ch4_01 = read_pw_output(ext / "qe" / "01.out").signature
    ch4_03 = read_pw_output(ext / "qe" / "03.out").signature
    c = by_key(compare_signatures(h2o, ch4_01))
    assert c["code"].severity == "error" and c["pseudopotentials:H"].severity == "error"
    c = by_key(compare_signatures(ch4_01, ch4_03))
    assert {k for k, x in c.items() if x.severity == "error"} == {"pseudopotentials:H", "pseudopotentials:C"}
    c = by_key(compare_signatures(h2o, ge))  # no shared element; different cutoff, smearing and k-points
    assert all(x.severity == "warning" for x in c.values())
    assert {"encut", "smearing", "sigma", "gamma_only"} <= set(c)


# -- issue 14.2: undeclared settings (extxyz, n2p2, DeePMD) ------------------------------------------------------
def test_undeclared_signatures_of_different_sources_are_an_error():
    from mlmd_lab.settings import declares_settings, with_dataset

    a, b = with_dataset({}, "sha-of-a.xyz"), with_dataset({}, "sha-of-b.xyz")
    assert not declares_settings(a) and a["dataset"] == "sha-of-a.xyz"
    assert signature_hash(a) != signature_hash(b)
    c = compare_signatures(a, b)
    assert [x.key for x in c] == ["dataset"] and c[0].severity == "error"
    assert "energy zeros cannot be checked" in c[0].message and c[0].message.endswith(".")
    assert compare_signatures(a, with_dataset({}, "sha-of-a.xyz")) == []  # the same source: one energy zero
    # undeclared against a declared run: one error (not a warning per unknown key)
    c = compare_signatures(base(), a)
    assert [(x.key, x.severity) for x in c] == [("dataset", "error")] and "second data set" in c[0].message
    # settings declared at ingest make the data sets comparable like any run (equal: no conflict)
    declared = {"code": "cp2k", "xc": "SCAN"}
    assert with_dataset(declared, "x") == normalise_signature(declared)
    assert compare_signatures(with_dataset(declared, "x"), with_dataset(declared, "y")) == []
    # a declared data-set name puts several sources into one data set
    named = with_dataset({"dataset": "water-2024"}, "sha-of-a.xyz")
    assert named["dataset"] == "water-2024" and not declares_settings(named)


def test_signature_ids_of_existing_databases_are_unchanged():
    """Ids computed before the ``dataset`` key existed (databases written earlier stay valid)."""
    assert signature_hash({}) == "8a42d3c9b058cfd5"  # the old shared "unknown" signature
    assert signature_hash(base()) == "e0c83b367914d4b1"
