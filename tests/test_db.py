"""Database: ingest, idempotency, bad input, queries, export round trips — against a real server."""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from ase.build import bulk, molecule
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write
from conftest import ROOT, external, water_frames

from mlmd_lab.errors import DatabaseError, MLMDError


def emt_frames(n: int, symbol: str = "Cu", seed: int = 0):
    """Rattled EMT-labelled cells (energy, forces, stress), distinct per seed."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        atoms = bulk(symbol, "fcc", a=3.6 if symbol == "Cu" else 4.05, cubic=True)
        atoms.rattle(0.05, seed=int(rng.integers(1 << 30)))
        atoms.calc = EMT()
        res = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces(), "stress": atoms.get_stress()}
        atoms.calc = SinglePointCalculator(atoms, **res)
        frames.append(atoms)
    return frames


def write_xyz(path, frames):
    path.parent.mkdir(parents=True, exist_ok=True)
    write(path, frames, format="extxyz")
    return path


# -- connecting -------------------------------------------------------------------------------------
def test_bad_uri_gives_one_line_message():
    from mlmd_lab.db import connect

    with pytest.raises(DatabaseError, match="not a MongoDB URI") as err:
        connect("http://example.org/db")
    assert "\n" not in str(err.value)
    with pytest.raises(DatabaseError, match="invalid MongoDB URI"):
        connect("mongodb://user:secret@host:notaport/")


@pytest.mark.timeout(120)  # a hang guard: connect(timeout=1.0) must give up, not wait for the default 30 s
def test_unreachable_server_names_address_and_fix_and_hides_password():
    from mlmd_lab.db import connect
    from mlmd_lab.db.server import _free_port

    port = _free_port()  # nothing listens there
    with pytest.raises(DatabaseError) as err:
        connect(f"mongodb://alice:s3cret@127.0.0.1:{port}/", timeout=1.0)
    msg = str(err.value)
    assert f"127.0.0.1:{port}" in msg and "s3cret" not in msg and "***" in msg
    assert "check the server is running" in msg and "\n" not in msg


def test_the_uris_own_timeout_is_kept_and_an_explicit_one_wins():
    """A serverSelectionTimeoutMS in the URI is what connect() waits (it passed its own default over it before);
    the timeout argument, when given, wins. The message says how long it waited."""
    from mlmd_lab.db import connect
    from mlmd_lab.db.server import _free_port

    uri = f"mongodb://127.0.0.1:{_free_port()}/?serverSelectionTimeoutMS=300"
    with pytest.raises(DatabaseError, match=r"within 0\.3 s"):
        connect(uri)
    with pytest.raises(DatabaseError, match=r"within 0\.2 s"):
        connect(uri, timeout=0.2)


def test_indexes_exist(db):
    names = {tuple(ix["key"].keys()) for ix in db.frames_collection.list_indexes()}
    assert {("chemsys",), ("formula_reduced",), ("elements",), ("calc_id",), ("signature_id",)} <= names


# -- ingest -----------------------------------------------------------------------------------------
def test_ingest_extxyz_roundtrip_values(db, tmp_path):
    frames = emt_frames(5)
    write_xyz(tmp_path / "cu.xyz", frames)
    report = db.ingest(tmp_path, progress=False)
    assert (report.added, report.skipped, report.failed) == (5, 0, [])
    got = db.frames(elements=["Cu"])
    assert len(got) == 5
    by_energy = {round(a.get_potential_energy(), 9): a for a in got}
    for ref in frames:
        a = by_energy[round(ref.get_potential_energy(), 9)]
        np.testing.assert_allclose(a.get_forces(), ref.get_forces(), atol=1e-12)
        np.testing.assert_allclose(a.get_stress(), ref.get_stress(), atol=1e-12)
        np.testing.assert_allclose(a.positions, ref.positions, atol=1e-8)  # ASE's writer keeps 8 decimals
        assert a.info["source"].endswith("cu.xyz") and a.info["calc_id"] == a.info["file_hash"]


def _renamed_columns(path, frames, **names):
    """Write frames with ASE, then rename label columns/keys as other programs spell them (force, dft_energy)."""
    write_xyz(path, frames)
    text = path.read_text()
    if "forces" in names:
        text = text.replace(":forces:R:3", f":{names['forces']}:R:3")
    if "energy" in names:
        text = text.replace(" energy=", f" {names['energy']}=")
    path.write_text(text)
    return path


def test_ingest_stores_forces_of_a_force_column(db, tmp_path):
    """QUIP/GAP and some public benchmark files name the forces `force` (issue 20.5: they were dropped)."""
    frames = emt_frames(5)
    path = _renamed_columns(tmp_path / "gap.xyz", frames, forces="force", energy="dft_energy")
    assert ":force:R:3" in path.read_text() and " dft_energy=" in path.read_text()
    report = db.ingest(tmp_path, progress=False)
    assert (report.added, report.failed) == (5, [])
    by_energy = {round(a.get_potential_energy(), 9): a for a in db.frames(elements=["Cu"])}
    for ref in frames:
        got = by_energy[round(ref.get_potential_energy(), 9)]
        np.testing.assert_allclose(got.get_forces(), ref.get_forces(), atol=1e-12)


def test_ingest_refuses_two_differing_force_columns_and_keys_chooses(db, tmp_path):
    frames = emt_frames(3)
    path = write_xyz(tmp_path / "two.xyz", frames)
    lines = path.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):  # add a column REF_forces = forces + 0.02 (a reference beside a prediction)
        n = int(lines[i])
        out += [lines[i], lines[i + 1].replace(":forces:R:3", ":forces:R:3:REF_forces:R:3")]
        for row in lines[i + 2:i + 2 + n]:
            parts = row.split()
            out.append(row + " " + " ".join(repr(float(v) + 0.02) for v in parts[4:7]))
        i += 2 + n
    path.write_text("\n".join(out) + "\n")
    report = db.ingest(tmp_path, progress=False)
    assert report.added == 0 and len(report.failed) == 1
    reason = report.failed[0][1]
    assert "two forces columns with different values, forces and REF_forces" in reason
    assert "keys={'forces': 'REF_forces'}" in reason
    report = db.ingest(tmp_path, progress=False, keys={"forces": "REF_forces"})
    assert (report.added, report.failed) == (3, [])
    by_energy = {round(a.get_potential_energy(), 9): a for a in db.frames(elements=["Cu"])}
    for ref in frames:
        got = by_energy[round(ref.get_potential_energy(), 9)]
        np.testing.assert_allclose(got.get_forces(), ref.get_forces() + 0.02, atol=1e-6)


def test_ingest_without_forces_names_the_per_atom_columns(db, tmp_path):
    _renamed_columns(tmp_path / "grad.xyz", emt_frames(2), forces="gradient")
    report = db.ingest(tmp_path, progress=False)
    (path, reason), = report.failed
    assert "2 of 2 frames have no forces" in reason and "keys={'forces': 'gradient'}" in reason


def test_reingest_adds_nothing_and_records_second_path(db, tmp_path):
    path = write_xyz(tmp_path / "a" / "cu.xyz", emt_frames(4))
    first = db.ingest(tmp_path, progress=False)
    assert first.added == 4
    again = db.ingest(tmp_path, progress=False)
    assert (again.added, again.skipped, again.calculations_skipped) == (0, 4, 1)
    copy = tmp_path / "b" / "copy.xyz"
    copy.parent.mkdir()
    shutil.copy(path, copy)
    third = db.ingest(tmp_path, progress=False)
    assert third.added == 0 and db.count() == 4
    calc = db.calculations()[0]
    assert sorted(calc["sources"]) == sorted([str(path), str(copy)])


def test_same_frames_in_other_file_are_skipped(db, tmp_path):
    frames = emt_frames(3)
    write_xyz(tmp_path / "one.xyz", frames)
    write_xyz(tmp_path / "two.xyz", frames[:2] + emt_frames(1, seed=9))
    report = db.ingest(tmp_path, progress=False)
    assert (report.added, report.skipped) == (4, 2)
    assert db.count() == 4


def test_bad_inputs_reported_per_file_batch_continues(db, tmp_path):
    good = write_xyz(tmp_path / "good.xyz", emt_frames(3))
    (tmp_path / "empty.xyz").write_bytes(b"")
    (tmp_path / "vasprun.xml").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))  # not what its name says
    (tmp_path / "garbage.xyz").write_bytes(bytes(range(128, 256)) * 10)  # non-UTF-8
    text = good.read_text()
    (tmp_path / "truncated.xyz").write_text(text[: len(text) // 2])
    energy_only = molecule("H2O")
    energy_only.calc = SinglePointCalculator(energy_only, energy=-14.2)
    write(tmp_path / "noforces.xyz", energy_only, format="extxyz")
    write(tmp_path / "nolabels.xyz", molecule("H2O"), format="extxyz")
    (tmp_path / "input.data").write_text("begin\natom 0 0 0 H 0 0 0 0 0\n")  # n2p2, no units, truncated
    (tmp_path / "notes.txt").write_text("not data")
    report = db.ingest(tmp_path, progress=False)
    failed = {p.split("/")[-1]: reason for p, reason in report.failed}
    assert set(failed) == {"empty.xyz", "vasprun.xml", "garbage.xyz", "truncated.xyz", "noforces.xyz",
                           "nolabels.xyz", "input.data"}
    assert "empty" in failed["empty.xyz"]
    assert "forces" in failed["noforces.xyz"] and "energy" in failed["nolabels.xyz"]
    assert "units" in failed["input.data"]
    assert report.added == 3 and report.ignored == 1
    # nothing half-written: only the good file's calculation and frames exist
    assert [c["sources"] for c in db.calculations()] == [[str(good)]]
    assert db.calculations_collection.count_documents({}) == 1
    assert db.count() == 3


def test_placeholder_labels_are_rejected(db, tmp_path):
    frames = emt_frames(2)
    for a in frames:
        a.calc = SinglePointCalculator(a, energy=0.0, forces=np.zeros((len(a), 3)))
    write_xyz(tmp_path / "predict.xyz", frames)
    report = db.ingest(tmp_path, progress=False)
    assert report.added == 0 and "not teacher data" in report.failed[0][1]


def test_killed_ingest_rerun_ends_with_exact_frames(mongo_uri, tmp_path):
    """SIGKILL an ingest mid-way (calculations left 'writing'), re-run: exactly the right frames."""
    from mlmd_lab.db import connect

    n_files, per_file = 40, 25
    for i in range(n_files):
        write_xyz(tmp_path / "tree" / f"f{i:03d}.xyz", emt_frames(per_file, seed=i))
    name = f"test_kill_{int(time.time() * 1000)}"
    db = connect(mongo_uri, database=name)
    script = textwrap.dedent(f"""
        import mlmd_lab.db.ingest as ing
        from mlmd_lab.db import connect
        ing.BATCH_CALCS = 1          # one calculation per write round: many rounds to kill inside
        real = ing._insert_new
        def slow(collection, docs):  # widen the window between frames and the 'complete' switch
            n = real(collection, docs)
            import time; time.sleep(0.2)
            return n
        ing._insert_new = slow
        db = connect({mongo_uri!r}, database={name!r})
        db.ingest({str(tmp_path / "tree")!r}, progress=False)
    """)
    try:
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
        deadline = time.time() + 120
        while db.frames_collection.estimated_document_count() < 8 * per_file and time.time() < deadline:
            time.sleep(0.05)
        proc.kill()
        proc.wait()
        calcs = db.calculations_collection
        assert calcs.count_documents({"status": "writing"}) >= 1, "kill did not land inside a write"
        partial = db.count()
        assert 0 < partial < n_files * per_file
        assert partial % per_file == 0  # queries never show a half-written calculation
        report = db.ingest(tmp_path / "tree", progress=False)
        assert report.failed == []
        assert db.count() == n_files * per_file
        assert db.frames_collection.count_documents({}) == n_files * per_file
        assert calcs.count_documents({"status": "complete"}) == n_files
        assert calcs.count_documents({"status": {"$ne": "complete"}}) == 0
    finally:
        db.drop()


def test_parallel_ingest_equals_serial(mongo_uri, tmp_path):
    from mlmd_lab.db import connect

    for i in range(6):
        write_xyz(tmp_path / f"f{i}.xyz", emt_frames(3, seed=100 + i))
    results = {}
    for workers in (1, 2):
        db = connect(mongo_uri, database=f"test_par_{workers}_{int(time.time() * 1000)}")
        try:
            report = db.ingest(tmp_path, workers=workers, progress=False)
            assert report.added == 18 and report.failed == []
            results[workers] = sorted(db.frames().ids)
        finally:
            db.drop()
    assert results[1] == results[2]


def test_progress_callback_counts_files(db, tmp_path):
    for i in range(3):
        write_xyz(tmp_path / f"f{i}.xyz", emt_frames(1, seed=i))
    seen = []
    db.ingest(tmp_path, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (3, 3)


def test_gzipped_vasprun_reads_like_plain(db, tmp_path):
    src = external("vasp") / "vasprun.h2o.md.xml"
    with open(src, "rb") as fin, gzip.open(tmp_path / "vasprun.xml.gz", "wb") as fout:
        fout.write(fin.read())
    report = db.ingest(tmp_path / "vasprun.xml.gz", progress=False)
    assert report.added == 3
    plain = db.ingest(src, progress=False)
    assert plain.added == 0 and plain.skipped == 3  # same content hash as the gzipped copy


# -- real sample data ---------------------------------------------------------------------------------
@pytest.fixture
def samples_db(db):
    ext = external()
    db.ingest(ext / "vasp", tags=["vasp"], progress=False)
    db.ingest(ext / "qe", progress=False)
    db.ingest(ext / "deepmd-water", progress=False)
    db.ingest(ext / "n2p2" / "H2O_RPBE-D3" / "input.data.set20", units=("Ha", "Bohr"), progress=False)
    db.ingest(ext / "n2p2" / "Cu2S_PBE", units="eV,Angstrom", progress=False)
    return db


def test_every_vasp_and_qe_file_ingests_with_ase_values(db):
    from ase.io import read

    ext = external()
    report = db.ingest([ext / "vasp", ext / "qe"], progress=False)
    assert report.failed == []
    # h2o.md and its duplicate hold the same 3 frames; Ge 1, Ti-O-Ti 1; QE 01 and 03 one each
    assert report.added == 3 + 1 + 1 + 2 and report.skipped == 3
    for path in sorted((ext / "vasp").glob("*.xml")) + [ext / "qe" / "01.out", ext / "qe" / "03.out"]:
        fmt = "vasp-xml" if path.suffix == ".xml" else "espresso-out"
        for ref in read(path, index=":", format=fmt):
            hits = [a for a in db.frames(formula=ref.get_chemical_formula())
                    if np.allclose(a.positions, ref.positions, atol=1e-9)
                    and abs(a.get_potential_energy() - ref.get_potential_energy()) < 1e-3]
            assert hits, f"{path.name}: frame not stored"
            a = hits[0]
            assert a.get_potential_energy() == pytest.approx(ref.get_potential_energy(), abs=1e-9)
            np.testing.assert_allclose(a.get_forces(), ref.get_forces(), atol=1e-9)
            if "stress" in ref.calc.results:
                np.testing.assert_allclose(a.get_stress(), ref.get_stress(), atol=1e-12)
            else:  # QE run 03 printed no stress
                assert "stress" not in a.calc.results


def test_settings_captured_in_calculation_documents(samples_db):
    vasp = {c["sources"][0].split("/")[-1]: c for c in samples_db.calculations({"code": "vasp"}, settings=True)}
    ti = vasp["vasprun.Ti-O-Ti-v6.xml"]
    assert ti["code_version"].startswith("6.3")
    assert ti["settings"]["incar"]["ENCUT"] == 350.0 and ti["settings"]["incar"]["PREC"] == "Accurate"
    sig = samples_db.signature(ti["signature_id"])
    assert sig["code"] == "vasp" and sig["encut"] == 350.0 and sig["prec"] == "ACCURATE"
    assert sig["pseudopotentials"]["Ti"].startswith("PAW_PBE Ti")
    ge = samples_db.signature(vasp["vasprun.Ge.vdw.xml"]["signature_id"])
    # the dpdata "Ge.vdw" file records no vdW at all (LUSE_VDW F, no IVDW; VASP never writes IVDW to
    # vasprun.xml, and its total energy equals the last SCF energy, so no dispersion term was added)
    assert ge["vdw"] is None and ge["xc"] == "PBE" and ge["smearing"] == "methfessel-paxton-1"
    qe = samples_db.calculations({"code": "qe"}, settings=True)
    assert len(qe) == 2
    qsig = samples_db.signature(qe[0]["signature_id"])
    assert qsig["code"] == "qe" and qsig["xc"] == "PBE"
    assert qsig["encut"] == pytest.approx(110 * 13.605693122994, abs=0.01)  # ecutwfc 110 Ry, kept to 0.01 eV


def test_unit_conversion_n2p2_hartree_bohr(samples_db):
    from ase.units import Bohr, Hartree

    ext = external("n2p2/H2O_RPBE-D3")
    lines = (ext / "input.data.set20").read_text().splitlines()
    energy_ha = float(next(x for x in lines if x.startswith("energy")).split()[1])
    atom = next(x for x in lines if x.startswith("atom")).split()
    water = samples_db.frames(formula="H2O", query={"source_path": {"$regex": "set20$"}})
    assert len(water) == 20
    first = next(a for a in water if a.info["step"] == 0)
    assert first.get_potential_energy() == pytest.approx(energy_ha * Hartree, rel=1e-12)
    np.testing.assert_allclose(first.positions[0], np.array(atom[1:4], float) * Bohr, rtol=1e-12)
    np.testing.assert_allclose(first.get_forces()[0], np.array(atom[7:10], float) * Hartree / Bohr, rtol=1e-12)


def test_deepmd_ingest_counts_and_values(samples_db):
    ext = external("deepmd-water")
    dp = samples_db.frames(formula="H2O", natoms=(192, 192), query={"source_path": {"$regex": "deepmd"}})
    assert len(dp) == 320
    energies = np.concatenate([np.load(p) for p in sorted(ext.glob("data_*/set.*/energy.npy"))])
    np.testing.assert_allclose(sorted(a.get_potential_energy() for a in dp), np.sort(energies.astype(float)))


def test_queries(samples_db):
    db = samples_db
    assert len(db.frames(elements=["Ti"])) == 1
    ti_o = db.frames(elements=["O", "Ti"], exclusive=True)
    assert {a.get_chemical_formula("hill", empirical=True) for a in ti_o} == {"OTi3"}
    assert len(db.frames(elements=["Ge"], exclusive=True)) == 1
    assert len(db.frames(elements=["H", "O"], exclusive=True)) == 3 + 320 + 20  # VASP + DeePMD + n2p2 set20
    assert len(db.frames(elements=["C", "H"], exclusive=True)) == 2  # QE CH4
    assert len(db.frames(elements=["H"])) == 3 + 320 + 20 + 2
    assert len(db.frames(formula="OH2")) == 343
    assert len(db.frames(formula="H2O", settings={"code": "vasp"})) == 3
    assert len(db.frames(settings={"code": "vasp", "xc": "PBE"})) >= 3
    assert len(db.frames(tags=["vasp"])) == 5
    assert len(db.frames(formula="H2O", limit=7)) == 7
    assert len(db.frames(formula="Cu2S")) == 21
    with pytest.raises(MLMDError, match="unknown element"):
        db.frames(elements=["Xx"])
    with pytest.raises(MLMDError, match="formula"):
        db.frames(formula="H2O)")
    with pytest.raises(MLMDError, match="unknown settings key"):
        db.frames(settings={"functional": "PBE"})
    assert len(db.frames(settings={"pseudopotentials.O": "PAW_PBE O 08Apr2002"})) == 4  # water ×3, Ti-O-Ti


def test_summary(samples_db):
    s = samples_db.summary()
    assert s.frames == 3 + 1 + 1 + 2 + 320 + 20 + 21
    assert s.by_code["vasp"] == 5 and s.by_code["qe"] == 2
    assert {"Cu", "S", "H", "O", "C", "Ge", "Ti"} == set(s.elements)
    assert "frames by chemical system" in str(s)


def test_compatible_flags_settings_and_unknowns(samples_db):
    db = samples_db
    vasp_vs_qe = db.compatible({"settings": {"code": "vasp"}}, {"settings": {"code": "qe"}})
    assert not vasp_vs_qe.ok and any(c.key == "code" for c in vasp_vs_qe.conflicts)
    same = db.compatible({"formula": "H2O", "settings": {"code": "vasp"}},
                         {"formula": "H2O", "settings": {"code": "vasp"}})
    assert same.ok and same.conflicts == []
    assert same.shift.method == "shared structures" and same.shift.per_element["per_atom"] == 0.0
    unknown = db.compatible({"formula": "H2O", "settings": {"code": "vasp"}},
                            {"formula": "H2O", "settings": {"code": None}})
    assert "settings not declared" in str(unknown) and "energy zeros cannot be checked" in str(unknown)
    # the second set mixes DeePMD water (about -156 eV/atom) with n2p2 RPBE water (about -694 eV/atom): four
    # sources without declared settings (three DeePMD systems, one n2p2 file), each its own data set
    assert not unknown.ok and unknown.signatures_b == 4
    assert {c.key for c in unknown.conflicts if c.severity == "error"} == {"dataset", "energy_reference"}
    assert sum(c.key == "dataset" for c in unknown.conflicts) == 4 + 6  # vasp vs each, and each pair of the four
    assert unknown.shift.undetermined == ["H", "O"]
    assert unknown.shift.per_composition["H2O"] < -100  # per-atom offset of the shared composition
    one_source = db.compatible({"formula": "H2O", "settings": {"code": "vasp"}},
                               {"formula": "H2O", "query": {"source_path": {"$regex": "deepmd"}}})
    # VASP water and DeePMD water differ by 151 eV/atom: undeclared settings no longer pass as compatible
    assert not one_source.ok and {c.key for c in one_source.conflicts} == {"dataset"}
    assert one_source.shift.per_composition["H2O"] == pytest.approx(-156.0 + 4.73, abs=1.0)


def test_reference_shift_from_shared_structures_and_regression():
    from mlmd_lab.db.compat import reference_shift
    from mlmd_lab.frameset import FrameSet

    a = emt_frames(4)
    b = []
    for atoms in a:
        c = atoms.copy()
        e = atoms.get_potential_energy() + 0.25 * len(c)
        c.calc = SinglePointCalculator(c, energy=e, forces=atoms.get_forces())
        b.append(c)
    shift = reference_shift(FrameSet(a), FrameSet(b))
    assert shift.method == "shared structures" and shift.per_element["Cu"] == pytest.approx(0.25)
    # different structures, two compositions: regression separates the per-element shift
    alloy_a, alloy_b = [], []
    rng = np.random.default_rng(1)
    for k in range(6):
        for target, offset in ((alloy_a, 0.0), (alloy_b, 0.1)):
            atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
            atoms.symbols[: k % 4] = "Au"
            atoms.rattle(0.02, seed=int(rng.integers(1000)))
            n_au = int((atoms.numbers == 79).sum())
            e = -3.0 * (len(atoms) - n_au) - 4.0 * n_au + offset * n_au
            atoms.calc = SinglePointCalculator(atoms, energy=e, forces=np.zeros((len(atoms), 3)))
            target.append(atoms)
    shift = reference_shift(FrameSet(alloy_a), FrameSet(alloy_b))
    assert shift.method == "regression"
    assert shift.per_element["Au"] == pytest.approx(0.1, abs=1e-9)
    assert shift.per_element["Cu"] == pytest.approx(0, abs=1e-9)
    # a single stoichiometry cannot separate the elements
    water = [molecule("H2O") for _ in range(3)]
    for i, w in enumerate(water):
        w.calc = SinglePointCalculator(w, energy=-14.0 + 0.01 * i, forces=np.zeros((3, 3)))
    moved = [w.copy() for w in water]
    for i, w in enumerate(moved):
        w.positions += 0.1
        w.calc = SinglePointCalculator(w, energy=-13.0 + 0.01 * i, forces=np.zeros((3, 3)))
    shift = reference_shift(FrameSet(water), FrameSet(moved))
    assert shift.per_element == {} and shift.undetermined == ["H", "O"]


# -- issue 14.2: sources without declared settings -----------------------------------------------------------
def two_water_files(tmp_path, shift=132.0):
    """a.xyz (12 frames) and b.xyz (8 frames, energies raised by ``shift`` eV/atom): water in two energy zeros."""
    return (write_xyz(tmp_path / "a.xyz", water_frames(12, seed=0)),
            write_xyz(tmp_path / "b.xyz", water_frames(8, seed=1, shift_per_atom=shift)))


def test_undeclared_sources_get_their_own_signatures(db, tmp_path):
    a, b = two_water_files(tmp_path)
    assert db.ingest([a, b], progress=False).added == 20
    water = db.frames(formula="H2O")
    sigs = water.signatures()
    assert len(sigs) == 2  # before issue 14.2 both files shared one "unknown" signature
    by_source = {f.info["source"]: f.info["signature"]["dataset"] for f in water}
    assert by_source == {str(p): c["_id"] for p in (a, b) for c in db.calculations({"sources": str(p)})}
    report = db.compatible({"query": {"source_path": str(a)}}, {"query": {"source_path": str(b)}})
    assert not report.ok and [(c.key, c.severity) for c in report.conflicts] == [("dataset", "error")]
    text = str(report)
    assert "NOT compatible" in text and "energy zeros cannot be checked" in text
    assert str(a) in text and str(b) in text and "settings not declared" in text
    assert report.shift.per_composition["H2O"] == pytest.approx(132.0, abs=0.5)
    # idempotent: re-ingesting is a no-op and keeps the signatures
    again = db.ingest([a, b], progress=False)
    assert (again.added, again.skipped, again.calculations_skipped) == (0, 20, 2)
    assert db.frames(formula="H2O").signatures() == sigs
    # one signature is selected by its data set
    only_a = db.frames(formula="H2O", settings={"dataset": by_source[str(a)]})
    assert len(only_a) == 12 and {f.info["source"] for f in only_a} == {str(a)}
    assert "settings not declared (data set" in str(db.summary())


def test_declared_settings_or_dataset_name_make_sources_one_data_set(db, tmp_path):
    paths = [write_xyz(tmp_path / f"{k}.xyz", water_frames(3, seed=10 + k)) for k in range(4)]
    db.ingest(paths[:2], settings={"code": "cp2k", "xc": "SCAN"}, progress=False)
    db.ingest(paths[2:], settings={"dataset": "water-2024"}, progress=False)
    declared = db.frames(settings={"code": "cp2k"})
    named = db.frames(settings={"dataset": "water-2024"})
    assert len(declared) == 6 and len(declared.signatures()) == 1
    assert len(named) == 6 and len(named.signatures()) == 1
    assert db.compatible({"settings": {"code": "cp2k"}}, {"settings": {"code": "cp2k"}}).ok
    mixed = db.compatible({"settings": {"code": "cp2k"}}, {"settings": {"dataset": "water-2024"}})
    assert not mixed.ok and [c.key for c in mixed.conflicts] == ["dataset"]


def test_database_of_the_old_shared_unknown_signature_is_split_by_source(db, tmp_path, mongo_uri):
    """Frames stored before issue 14.2 under the one all-unknown signature: read apart, then relabelled."""
    from mlmd_lab.db import connect
    from mlmd_lab.settings import normalise_signature, signature_hash

    a, b = two_water_files(tmp_path)
    db.ingest([a, b], progress=False)
    new_ids = {f.info["source"]: f.info["signature_id"] for f in db.frames()}
    legacy = {k: v for k, v in normalise_signature({}).items() if k != "dataset"}  # as older versions wrote it
    legacy_id = signature_hash(legacy)
    db.signatures_collection.delete_many({})
    db.signatures_collection.insert_one({"_id": legacy_id, **legacy})
    db.frames_collection.update_many({}, {"$set": {"signature_id": legacy_id}})
    db.calculations_collection.update_many({}, {"$set": {"signature_id": legacy_id}})
    read = db.frames()
    assert {f.info["source"]: f.info["signature_id"] for f in read} == new_ids  # no crash, sources apart
    assert not db.compatible({"query": {"source_path": str(a)}}, {"query": {"source_path": str(b)}}).ok
    again = connect(mongo_uri, database=db.name)  # connect relabels the stored frames once
    try:
        assert set(again.frames_collection.distinct("signature_id")) == set(new_ids.values())
        assert set(again.calculations_collection.distinct("signature_id")) == set(new_ids.values())
        dataset = again.frames(query={"source_path": str(b)})[0].info["signature"]["dataset"]
        assert len(again.frames(settings={"dataset": dataset})) == 8
        assert again.split_undeclared_signatures() == 0  # idempotent
    finally:
        again.close()


# -- export round trips --------------------------------------------------------------------------------
def test_export_formats_reingest_as_same_frames(db, tmp_path):
    write_xyz(tmp_path / "src" / "cu.xyz", emt_frames(6))
    db.ingest(tmp_path / "src", progress=False)
    frames = db.frames()
    ids = sorted(frames.ids)
    frames.to_extxyz(tmp_path / "out" / "export.xyz")
    frames.to_n2p2(tmp_path / "out" / "input.data", energy_unit="Ha", length_unit="Bohr")
    frames.to_deepmd(tmp_path / "out" / "deepmd")
    for sub, units in (("export.xyz", None), ("input.data", ("Ha", "Bohr")), ("deepmd", None)):
        report = db.ingest(tmp_path / "out" / sub, units=units, progress=False)
        assert report.failed == []
        assert report.added == 0 and report.skipped == 6, sub  # same content hash: nothing new
    assert sorted(db.frames().ids) == ids


def test_extxyz_export_keeps_settings_signature(db, tmp_path, mongo_uri):
    from mlmd_lab.db import connect

    db.ingest(external("vasp") / "vasprun.Ge.vdw.xml", progress=False)
    ge = db.frames(elements=["Ge"])
    ge.to_extxyz(tmp_path / "ge.xyz")
    other = connect(mongo_uri, database=f"{db.name}_other")
    try:
        other.ingest(tmp_path / "ge.xyz", progress=False)
        back = other.frames(elements=["Ge"])
        assert back.ids == ge.ids
        assert back[0].info["signature"] == ge[0].info["signature"]
        assert back[0].info["signature"]["code"] == "vasp"
    finally:
        other.drop()


def test_split_reproducible_and_grouped(samples_db):
    water = samples_db.frames(formula="H2O")
    a = [sorted(p.ids) for p in water.split((0.8, 0.1, 0.1), seed=3)]
    shuffled = water[np.random.default_rng(0).permutation(len(water))]
    b = [sorted(p.ids) for p in shuffled.split((0.8, 0.1, 0.1), seed=3)]
    assert a == b and [len(x) for x in a] == [274, 35, 34]
    assert a != [sorted(p.ids) for p in water.split((0.8, 0.1, 0.1), seed=4)]
    train, valid = water.split((0.5, 0.5), group_by="calc_id")
    assert not {f.info["calc_id"] for f in train} & {f.info["calc_id"] for f in valid}


def test_frameset_summary(samples_db):
    s = samples_db.frames(formula="Cu2S").summary()
    assert s.frames == 21 and s.elements == ["Cu", "S"] and s.compositions == {"Cu2S": 21}
    assert s.energy_per_atom_range[0] < s.energy_per_atom_range[1] < 0


def test_bad_run_files_against_real_server(db, tmp_path):
    """Every bad input of the issue, made from the real VASP/QE files, in one tree with good files."""
    vasp, qe = external("vasp"), external("qe")
    md = (vasp / "vasprun.h2o.md.xml").read_text(encoding="latin-1")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "vasprun.truncated.xml").write_text(md[: len(md) // 3], encoding="latin-1")  # cut inside step 1
    second_end = md.index("</calculation>", md.index("</calculation>") + 1) + len("</calculation>")
    (bad / "vasprun.unfinished.xml").write_text(md[:second_end] + "\n", encoding="latin-1")  # 2 of 3 steps
    (bad / "vasprun.corrupt.xml").write_text(md.replace("<calculation>", "<calculation><<<", 1), encoding="latin-1")
    import re

    (bad / "vasprun.noforces.xml").write_text(re.sub(r'<varray name="forces" >.*?</varray>', "", md, flags=re.S),
                                              encoding="latin-1")
    (bad / "vasprun.empty.xml").write_bytes(b"")
    (bad / "vasprun.binary.xml").write_bytes(bytes(range(128, 256)) * 40)
    shutil.copy(qe / "01.out", bad / "vasprun.isqe.xml")  # not what its name says
    out = (qe / "01.out").read_text()
    (bad / "cut.out").write_text(out[: out.index("Forces acting on atoms")])
    (bad / "noforces.out").write_text(re.sub(r"Forces acting on atoms.*?Total force", "Total force", out, flags=re.S))
    good = tmp_path / "good"
    good.mkdir()
    shutil.copy(vasp / "vasprun.Ge.vdw.xml", good / "vasprun.xml")
    shutil.copy(qe / "01.out", good / "01.out")
    shutil.copy(qe / "01.in", good / "01.in")

    report = db.ingest(tmp_path, progress=False)
    failed = {p.split("/")[-1]: reason for p, reason in report.failed}
    assert set(failed) == {"vasprun.truncated.xml", "vasprun.unfinished.xml", "vasprun.corrupt.xml",
                           "vasprun.noforces.xml", "vasprun.empty.xml", "vasprun.binary.xml",
                           "vasprun.isqe.xml", "cut.out", "noforces.out"}, failed
    assert "2 complete ionic steps" in failed["vasprun.unfinished.xml"]
    assert "forces" in failed["vasprun.noforces.xml"] and "forces" in failed["noforces.out"]
    assert "empty" in failed["vasprun.empty.xml"]
    assert "Quantum ESPRESSO" in failed["vasprun.isqe.xml"]
    assert report.added == 2 and report.calculations_added == 2
    # nothing of a failed file is in the database
    assert db.calculations_collection.count_documents({}) == 2
    assert db.frames_collection.count_documents({}) == 2
    assert all("/bad/" not in c["sources"][0] for c in db.calculations())
    # an unfinished run can be kept on request: its complete steps, marked unfinished
    kept = db.ingest(bad / "vasprun.unfinished.xml", allow_unfinished=True, progress=False)
    assert kept.added == 2 and kept.failed == []
    calc = db.calculations({"sources": str(bad / "vasprun.unfinished.xml")})[0]
    assert calc["finished"] is False and calc["n_frames"] == 2
