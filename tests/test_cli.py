"""The ``mlmd-lab`` command: same functions as the API; expected errors are one line, exit 2."""

from __future__ import annotations

import os
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
    out = cli("--uri", "mongodb://127.0.0.1:1/", "summary")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "cannot reach MongoDB" in out.stderr
    assert "Traceback" not in out.stderr
    out = cli("--uri", "mysql://x", "summary")
    assert out.returncode == 2 and "not a MongoDB URI" in out.stderr
    out = cli("--uri", "mongodb://127.0.0.1:1/", "ingest", str(tmp_path / "missing"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    out = cli("ingest", "--units", "furlong,Bohr", str(tmp_path), "--uri", "mongodb://127.0.0.1:1/")
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
