"""label(): DFT tasks (real Quantum ESPRESSO and PySCF) in process, on dask clusters and on real Slurm/PBS,
each result ingested into the real database server as it completes."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time

import pytest
from ase.build import bulk, molecule
from conftest import ROOT

from mlmd_lab.dft import PySCF, QuantumEspresso, rattle
from mlmd_lab.dft.label import LEDGER, label, task_key
from mlmd_lab.errors import MLMDError

needs_qe = pytest.mark.skipif(shutil.which("pw.x") is None,
                              reason="Quantum ESPRESSO pw.x not installed (scripts/apt-packages.txt, as root)")


def si8_structures(n: int, seed: int = 0):
    return rattle(bulk("Si", "diamond", a=5.43, cubic=True), n, amplitude=0.05, seed=seed)


def qe_recipe(**kw) -> QuantumEspresso:
    return QuantumEspresso(ecutwfc_ry=20, kpts=(2, 2, 2), **kw)


def test_label_needs_a_database_and_a_recipe(tmp_path):
    with pytest.raises(MLMDError, match="needs db="):
        label(si8_structures(1), qe_recipe(), workdir=tmp_path)
    with pytest.raises(MLMDError, match="recipe must be"):
        label(si8_structures(1), "qe", db=object(), workdir=tmp_path)


def test_task_key_depends_on_structure_and_settings():
    a, b = si8_structures(2)
    assert task_key(a, qe_recipe()) == task_key(a.copy(), qe_recipe())
    assert task_key(a, qe_recipe()) != task_key(b, qe_recipe())
    assert task_key(a, qe_recipe()) != task_key(a, QuantumEspresso(ecutwfc_ry=25, kpts=(2, 2, 2)))
    # how pw.x is launched is not part of the label, and the submitting host needs no mpirun
    assert task_key(a, qe_recipe()) == task_key(a, qe_recipe(mpi=("mpirun-not-on-this-host", 4)))


@pytest.mark.slow
@needs_qe
def test_label_in_process_ingests_settings_skips_and_records_failures(db, tmp_path):
    structures = si8_structures(3)
    report = label(structures, qe_recipe(), db=db, workdir=tmp_path, progress=False, tags=["si8"])
    assert (report.labelled, report.submitted, report.frames_added, report.failed) == (3, 3, 3, [])
    frames = db.frames(tags=["si8"])
    assert len(frames) == 3
    signature = db.signature(db.frames_collection.find_one({"tags": "si8"})["signature_id"])
    assert signature["code"] == "qe" and signature["xc"] == "PBE"
    assert signature["encut"] == pytest.approx(20 * 13.605693122994, abs=0.01)  # signatures round to 0.01 eV
    ledger = list(db.mongo[LEDGER].find())
    assert {d["status"] for d in ledger} == {"complete"} and all(len(d["frame_ids"]) == 1 for d in ledger)
    again = label(structures, qe_recipe(), db=db, workdir=tmp_path, progress=False)
    assert (again.submitted, again.skipped, again.frames_added) == (0, 3, 0)
    # a calculation that fails (too few bands) is retried, then recorded with pw.x's error; nothing else is lost
    broken = qe_recipe(input_data={"system": {"nbnd": 2}})
    bad = label(structures[:1], broken, db=db, workdir=tmp_path / "bad", retries=1, progress=False)
    assert bad.labelled == 0 and len(bad.failed) == 1
    doc = db.mongo[LEDGER].find_one({"_id": bad.failed[0][0]})
    assert doc["status"] == "failed" and doc["failures"] == 1 and doc["error"]
    assert len(db.frames(tags=["si8"])) == 3


@pytest.mark.slow
@needs_qe
def test_label_on_a_local_dask_cluster(db, tmp_path):
    from mlmd_lab.cluster import cluster

    with cluster("local", n_workers=2) as local:  # 6 structures: 3 per worker show the distribution
        report = label(si8_structures(6, seed=3), qe_recipe(), cluster=local, db=db, workdir=tmp_path,
                       progress=False)
    assert report.labelled == 6 and report.frames_added == 6 and not report.failed
    assert db.count(tags=["labelled"]) == 6


@pytest.mark.slow
def test_pyscf_molecular_labelling_is_pip_only(db, tmp_path):
    water = rattle(molecule("H2O"), 2, amplitude=0.03, seed=0)
    report = label(water, PySCF(xc="PBE", basis="def2-svp"), db=db, workdir=tmp_path, progress=False)
    assert report.labelled == 2 and report.frames_added == 2
    frames = db.frames(formula="H2O", tags=["labelled"])
    assert len(frames) == 2 and all(abs(a.get_forces()).max() > 0 for a in frames)
    sig = db.signature(db.frames_collection.find_one({"tags": "labelled"})["signature_id"])
    assert sig["code"] == "pyscf" and sig["xc"] == "PBE"


@pytest.mark.slow
@needs_qe
def test_cli_label(mongo_uri, tmp_path):
    structure = tmp_path / "si.extxyz"
    bulk("Si", "diamond", a=5.43, cubic=True).write(structure)
    cmd = [sys.executable, "-m", "mlmd_lab.cli", "--uri", mongo_uri, "--database", "cli_label", "label",
           "--structures", str(structure), "--rattle", "2", "--option", "ecutwfc_ry=20", "kpts=2,2,2",
           "--workdir", str(tmp_path / "calcs")]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "labelled 2" in out.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert "skipped 2" in again.stdout
    bad = subprocess.run(cmd[:-2] + ["--option", "no_such_setting=1"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "bad --option" in bad.stderr
    from mlmd_lab.db import connect

    connect(mongo_uri, database="cli_label").drop()


def _kill_one_job_when(db, count: int, timeout: float = 300) -> threading.Thread:
    """Cancel one running Slurm job once ``count`` frames are labelled (a worker lost mid-run)."""
    def watch():
        deadline = time.time() + timeout
        while time.time() < deadline and db.count(tags=["labelled"]) < count:
            time.sleep(0.3)
        jobs = subprocess.run(["squeue", "-h", "-o", "%i", "-t", "R"], capture_output=True, text=True).stdout.split()
        if jobs:
            subprocess.run(["scancel", "--signal=KILL", jobs[0]], check=False)
            watch.killed = jobs[0]

    watch.killed = None
    thread = threading.Thread(target=watch, daemon=True)
    thread.watch = watch
    thread.start()
    return thread


@pytest.fixture(scope="module")
def slurm():
    """Single-node Slurm started by scripts/start_slurm.sh (root only; idempotent)."""
    import os

    if shutil.which("sbatch") is None or os.geteuid() != 0:
        pytest.skip("real Slurm needs root and Debian's slurmctld/slurmd (scripts/apt-packages.txt)")
    done = subprocess.run(["bash", str(ROOT / "scripts" / "start_slurm.sh")], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"scripts/start_slurm.sh failed:\n{done.stdout}\n{done.stderr}")
    yield
    subprocess.run(["scancel", "--user=root"], check=False)


def _batch_options(tmp_path) -> dict:
    return dict(cores=1, memory="1GB", queue="debug", interface="lo", walltime="00:20:00",
                log_directory=str(tmp_path / "logs"), scheduler_options={"dashboard_address": ":0"})


@pytest.mark.slow
@needs_qe
def test_label_20_si8_through_slurm_survives_a_killed_worker(db, tmp_path, slurm, monkeypatch):
    """Done-when: 20 rattled Si8 through a real SLURMCluster fill the database with 20 frames and their
    settings; a worker job killed mid-run is replaced and its task retried, nothing is lost; a second run
    submits nothing."""
    from mlmd_lab.cluster import cluster

    monkeypatch.chdir(tmp_path)  # job output files land in the submit folder
    structures = si8_structures(20, seed=7)
    with cluster("slurm", **_batch_options(tmp_path)) as jobs:
        killer = _kill_one_job_when(db, 4)
        report = label(structures, qe_recipe(), cluster=jobs, db=db, workdir=tmp_path / "calcs", jobs=2,
                       progress=False)
        killer.join(10)
    assert killer.watch.killed, "no running job was found to kill"
    assert report.labelled == 20 and report.frames_added == 20 and not report.failed, str(report)
    assert db.count(tags=["labelled"]) == 20
    sig = db.signature(db.frames_collection.find_one({"tags": "labelled"})["signature_id"])
    assert sig["code"] == "qe" and sig["xc"] == "PBE" and sig["kpoints"] == [2, 2, 2]
    with cluster("slurm", **_batch_options(tmp_path)) as jobs:
        again = label(structures, qe_recipe(), cluster=jobs, db=db, workdir=tmp_path / "calcs", jobs=2,
                      progress=False)
        assert not jobs.workers and not jobs.worker_spec  # nothing was submitted
    assert (again.submitted, again.skipped) == (0, 20)


@pytest.mark.slow
@needs_qe
def test_label_through_pbs_code_path(db, tmp_path, slurm, monkeypatch):
    """PBSCluster end to end through Slurm's PBS-compatible qsub/qdel/qstat (slurm-wlm-torque): this covers
    mlmd_lab's and dask-jobqueue's PBS code path, not a real PBS server."""
    from mlmd_lab.cluster import cluster

    if shutil.which("qsub") is None:
        pytest.skip("qsub not found (slurm-wlm-torque provides Slurm's PBS wrappers)")
    monkeypatch.chdir(tmp_path)  # Slurm's qsub ignores -o/-e folders: job output files land in the submit folder
    options = _batch_options(tmp_path)
    options.pop("queue")
    with cluster("pbs", **options) as jobs:
        # 6 structures on 2 jobs: the PBS path end to end (the 20-structure run with a killed job is Slurm's test)
        report = label(si8_structures(6, seed=11), qe_recipe(), cluster=jobs, db=db, workdir=tmp_path / "calcs",
                       jobs=2, progress=False)
    assert report.labelled == 6 and report.frames_added == 6 and not report.failed, str(report)
    assert db.count(tags=["labelled"]) == 6
