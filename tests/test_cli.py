"""The ``mlmd-lab`` command: same functions as the API; expected errors are one line, exit 2."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT, external


def cli(*args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "mlmd_lab.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, env=env, timeout=300)


@pytest.fixture
def cli_db(mongo_uri):
    import uuid

    return ["--uri", mongo_uri, "--database", f"test_cli_{uuid.uuid4().hex[:8]}"]


def test_ingest_query_export_summary(cli_db, tmp_path):
    ext = external()
    out = cli(*cli_db, "ingest", str(ext / "vasp"), "--no-progress")
    assert out.returncode == 0, out.stderr
    assert "5 frames added, 3 skipped" in out.stdout
    out = cli(*cli_db, "ingest", str(ext / "n2p2" / "Cu2S_PBE"), "--units", "eV,Angstrom", "--no-progress")
    assert "21 frames added" in out.stdout
    out = cli(*cli_db, "query", "--formula", "H2O", "--settings", "code=vasp", "--export", str(tmp_path / "w.xyz"))
    assert out.returncode == 0 and "3 frames" in out.stdout and (tmp_path / "w.xyz").exists()
    out = cli(*cli_db, "summary")
    assert "7 calculations" not in out.stdout and "frames by chemical system" in out.stdout
    out = cli(*cli_db, "compatible", "--a", "code=vasp", "formula=H2O", "--b", "formula=Cu2S")
    assert "conflict" in out.stdout


def test_n2p2_without_units_fails_with_fix(cli_db):
    out = cli(*cli_db, "ingest", str(external("n2p2/Cu2S_PBE")), "--no-progress")
    assert out.returncode == 1 and "carry no units" in out.stdout and "--units" in out.stdout


def test_expected_errors_are_one_line(tmp_path):
    nowhere = "mongodb://127.0.0.1:1/?serverSelectionTimeoutMS=500"  # nothing listens: half a second, not 10 s
    out = cli("--uri", nowhere, "summary")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "cannot reach MongoDB" in out.stderr
    assert "Traceback" not in out.stderr
    out = cli("--uri", "mysql://x", "summary")
    assert out.returncode == 2 and "not a MongoDB URI" in out.stderr
    out = cli("--uri", nowhere, "ingest", str(tmp_path / "missing"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    out = cli("ingest", "--units", "furlong,Bohr", str(tmp_path), "--uri", nowhere)
    assert out.returncode != 0


def test_ingest_keys_chooses_the_force_column(cli_db, tmp_path):
    (tmp_path / "two.xyz").write_text(
        "2\nLattice=\"4 0 0 0 4 0 0 0 4\" Properties=species:S:1:pos:R:3:forces:R:3:REF_forces:R:3 energy=-7.25 "
        "pbc=\"T T T\"\nCu 0 0 0 0.1 0 0 0.3 0 0\nCu 1.8 1.8 0 -0.1 0 0 -0.3 0 0\n")
    out = cli(*cli_db, "ingest", str(tmp_path), "--no-progress")
    assert out.returncode == 1 and "forces and REF_forces" in out.stdout
    out = cli(*cli_db, "ingest", str(tmp_path), "--keys", "forces=REF_forces", "--no-progress")
    assert out.returncode == 0 and "1 frames added" in out.stdout, out.stdout + out.stderr


def test_md_with_n2p2_potential_without_units_fails_with_fix(tmp_path):
    pot = tmp_path / "pot"
    pot.mkdir()
    for name in ("input.nn", "scaling.data", "weights.001.data", "weights.008.data"):
        text = (external("n2p2/H2O_RPBE-D3") / name).read_text()
        if name == "input.nn":  # the potential's own statement of its units removed: n2p2 needs none
            text = "".join(ln for ln in text.splitlines(keepends=True) if "unit" not in ln.lower())
        (pot / name).write_text(text)
    args = ["md", "--n2p2", str(pot), "--structure", "none.xyz", "--workdir", str(tmp_path / "md")]
    out = cli(*args)
    assert out.returncode == 2 and "n2p2 files carry no units" in out.stderr and "Traceback" not in out.stderr
    out = cli(*args, "--units", "Ha,Bohr")
    assert out.returncode == 2 and "none.xyz" in out.stderr  # the potential loaded; the structure is missing


def test_label_with_the_emt_recipe(cli_db, mongo_uri, tmp_path):
    from ase.build import bulk

    from mlmd_lab.db import connect

    bulk("Cu", "fcc", a=3.61, cubic=True).write(tmp_path / "cu.xyz")
    args = [*cli_db, "label", "--structures", str(tmp_path / "cu.xyz"), "--rattle", "3", "--recipe", "emt",
            "--workdir", str(tmp_path / "calcs")]
    try:
        out = cli(*args)
        assert out.returncode == 0 and "labelled 3, skipped 0" in out.stdout, out.stdout + out.stderr
        with connect(mongo_uri, database=cli_db[-1]) as db:
            frames = db.frames(elements=["Cu"])
            assert len(frames) == 3 and frames[0].info["signature"]["code"] == "ase:emt"
        out = cli(*args)
        assert "labelled 0, skipped 3" in out.stdout
        bad = cli(*args, "--option", "cutoff=3")
        assert bad.returncode == 2 and "bad --option for the emt recipe: cutoff; EMT takes asap_cutoff" in bad.stderr
    finally:
        with connect(mongo_uri, database=cli_db[-1]) as db:
            db.drop()


LEARN_SMALL = ["--committee", "2", "--per-iteration", "3", "--md-steps", "40", "--timestep", "2", "--frame-interval",
               "5", "--config", "hidden=4,4", "max_epochs=30", "cutoff=4.0", "n_radial=4", "n_angular=1", "zetas=1.0"]


@pytest.mark.slow
def test_learn_with_emt_prints_each_iteration_and_the_saved_model(cli_db, mongo_uri, tmp_path):
    from ase.build import bulk

    from mlmd_lab.db import connect

    bulk("Cu", "fcc", a=3.61, cubic=True).write(tmp_path / "cu.xyz")  # 4 atoms
    args = [*cli_db, "learn", str(tmp_path / "cu.xyz"), "--reference", "emt", "--temperatures", "300", "600",
            "--workdir", str(tmp_path / "learn"), "--max-iterations", "1", "--budget", "20", "--model-name", "cu-cli",
            *LEARN_SMALL]
    try:
        out = cli(*args)
        assert out.returncode == 0, out.stderr[-3000:]
        lines = out.stdout.splitlines()
        assert lines[0].startswith("learning a potential for Cu4 (1 starting structure) with the emt reference")
        iteration = [ln for ln in lines if re.match(r"^\s+1\s+12\s", ln)]  # iteration 1, trained on the seed set
        assert len(iteration) == 1 and "300 K: " in iteration[0] and "600 K: " in iteration[0]
        assert iteration[0].endswith("-> max iterations")
        assert "stop reason: max iterations (converged: False) after 1 iterations, 12 reference calls" in lines
        assert "model: cu-cli v1 in the potential database (mlmd-lab models show cu-cli)" in lines
        with connect(mongo_uri, database=cli_db[-1]) as db:
            record = db.models.record("cu-cli")
            assert record.provenance["learn"]["n_reference_calls"] == 12 and db.count() == 12
        again = cli(*args)  # the finished run: the same result, nothing computed or saved again
        assert again.returncode == 0, again.stderr[-3000:]
        assert "model: cu-cli v1 in the potential database (mlmd-lab models show cu-cli)" in again.stdout
        assert "after 1 iterations, 12 reference calls" in again.stdout
    finally:
        with connect(mongo_uri, database=cli_db[-1]) as db:
            db.drop()


def test_learn_bad_input_is_one_line_with_the_fix(cli_db, tmp_path):
    from ase.build import bulk

    bulk("Si", "diamond", a=5.43).write(tmp_path / "si.xyz")
    bulk("Cu", "fcc", a=3.61, cubic=True).write(tmp_path / "cu.xyz")
    base = ["--reference", "emt", "--temperatures", "300", "--workdir", str(tmp_path / "learn")]
    cases = [
        (["learn", str(tmp_path / "missing.xyz"), *base], "missing.xyz does not exist"),
        (["learn", str(tmp_path / "si.xyz"), *base], "EMT has no parameters for Si"),
        (["learn", str(tmp_path / "cu.xyz"), *base, "--config", "hiden=4,4"], "unknown training setting 'hiden'"),
        (["learn", str(tmp_path / "cu.xyz"), "--reference", "emt", "--temperatures", "-5", "--workdir",
          str(tmp_path / "learn")], "temperatures are in kelvin"),
    ]
    for args, message in cases:
        out = cli(*cli_db, *args)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert out.stderr.strip().count("\n") == 0 and message in out.stderr and "Traceback" not in out.stderr
    assert "use a DFT reference (qe, vasp or pyscf)" in cli(*cli_db, *cases[1][0]).stderr
    assert not (tmp_path / "learn").exists()  # refused before anything was written
