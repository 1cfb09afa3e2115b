"""SLHMC with real DFT: Quantum ESPRESSO (pw.x) as the reference of Si8 at 1000 K, killed with SIGKILL mid-run and
resumed. The proposal potential is an HDNNP trained on eight QE frames and loaded by name from the potential
database; every DFT result lands in the teacher-data database with the chain's tags, and the resumed run repeats
no finished calculation (the labelling ledger and the workdir's reference cache answer them)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
import warnings

import numpy as np
import pytest
from ase.build import bulk
from conftest import CEILING_SCALE, ROOT

from mlmd_lab import connect, slhmc
from mlmd_lab.dft import QuantumEspresso
from mlmd_lab.dft.generators import rattle
from mlmd_lab.dft.label import LEDGER, label

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("pw.x") is None,
                                 reason="Quantum ESPRESSO pw.x not installed (scripts/apt-packages.txt, as root)")]

MODEL = "si8-slhmc-proposal"
TEACHER = 8  # QE frames the proposal potential is trained on
N_TRIALS = 4
#: The run, as the killed subprocess and the resuming test both call it (same arguments: the chain is a
#: deterministic function of them).
RUN = """
import sys
from ase.build import bulk
from mlmd_lab import connect, slhmc
from mlmd_lab.dft import QuantumEspresso
db = connect({uri!r}, database={database!r})
start = bulk("Si", "diamond", a=5.43, cubic=True)
start.rattle(0.05, seed=1)
recipe = QuantumEspresso(ecutwfc_ry=20, kpts=(2, 2, 2), command={command!r})
slhmc.run(recipe, {model!r}, start, temperature=1000.0, n_trials={n}, md_steps=4, timestep=1.0, seed=3,
          workdir={workdir!r}, db=db)
"""


def _start():
    start = bulk("Si", "diamond", a=5.43, cubic=True)
    start.rattle(0.05, seed=1)
    return start


@pytest.fixture
def dft_db(mongo_uri):
    name = f"test_slhmc_qe_{uuid.uuid4().hex[:8]}"
    database = connect(mongo_uri, database=name)
    yield database
    database.drop()
    database.close()


def _counted_pw(tmp_path) -> tuple[str, object]:
    """A pw.x wrapper that writes "start" before and "end" after each complete run (killed runs: no "end")."""
    calls = tmp_path / "pw-calls.txt"
    wrapper = tmp_path / "bin" / "pw-counted"
    wrapper.parent.mkdir()
    wrapper.write_text(f"#!/bin/sh\necho start >> {calls}\n{shutil.which('pw.x')} \"$@\"\nrc=$?\n"
                       f"[ $rc -eq 0 ] && echo end >> {calls}\nexit $rc\n")
    wrapper.chmod(0o755)

    def completed() -> int:
        return calls.read_text().split().count("end") if calls.exists() else 0

    return str(wrapper), completed


def _proposal_potential(db, tmp_path, command: str) -> None:
    """An HDNNP trained briefly on TEACHER rattled Si8 cells labelled with QE, saved as MODEL."""
    from mlmd_lab.train import Trainer
    from mlmd_lab.train.trainer import TrainingWarning

    recipe = QuantumEspresso(ecutwfc_ry=20, kpts=(2, 2, 2), command=command)
    structures = rattle(bulk("Si", "diamond", a=5.43, cubic=True), TEACHER, amplitude=0.12, seed=5)
    report = label(structures, recipe, db=db, workdir=tmp_path / "teacher", tags=["si-teacher"], progress=False)
    assert report.labelled == TEACHER, str(report)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainingWarning)
        trainer = Trainer(db.frames(tags=["si-teacher"]), max_epochs=80, n_radial=4, n_angular=1, zetas=(1.0,),
                          hidden=(10, 10), cutoff=4.5, progress=False)
        db.models.save(trainer.fit(), MODEL, description=f"SLHMC test proposal: {TEACHER} QE Si8 frames")


def test_qe_reference_run_survives_sigkill_and_repeats_no_dft(dft_db, mongo_uri, tmp_path):
    command, completed = _counted_pw(tmp_path)
    _proposal_potential(dft_db, tmp_path, command)
    assert completed() == TEACHER
    work = tmp_path / "chain"
    code = RUN.format(uri=mongo_uri, database=dft_db.name, model=MODEL, n=N_TRIALS, workdir=str(work),
                      command=command)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = work / "chain.log"
    deadline = time.monotonic() + 900 * CEILING_SCALE  # hang guard, not a timing assertion
    while proc.poll() is None and time.monotonic() < deadline:
        if log.exists() and len(log.read_text().splitlines()) >= 3:  # header + two trials recorded
            break
        time.sleep(0.5)
    assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.communicate()[1][-3000:]}"
    os.killpg(proc.pid, signal.SIGKILL)  # kill -9, pw.x included
    proc.wait()
    killed_at = len(log.read_text().splitlines()) - 1
    assert 2 <= killed_at < N_TRIALS
    ledger = dft_db.mongo[LEDGER]
    finished_before_kill = completed() - TEACHER
    assert finished_before_kill >= killed_at + 1  # the start and the recorded trials' proposals at least

    recipe = QuantumEspresso(ecutwfc_ry=20, kpts=(2, 2, 2), command=command)
    result = slhmc.run(recipe, MODEL, _start(), temperature=1000.0, n_trials=N_TRIALS, md_steps=4, timestep=1.0,
                       seed=3, workdir=work, db=dft_db)
    assert len(result.accepted) == N_TRIALS and not result.failed.any()
    run_tag = f"slhmc-{result.run_id}"
    # every DFT result is in the database once: the starting structure and one proposal per trial
    assert dft_db.count(tags=["slhmc", run_tag]) == N_TRIALS + 1
    for k, accepted in enumerate(result.accepted):
        assert dft_db.count(tags=[run_tag, f"trial-{k}", "accepted" if accepted else "rejected"]) == 1
    # no finished calculation repeated: pw.x completed once per structure (teacher frames, start, N_TRIALS
    # proposals), although the killed run had finished some of them; only a run cut by the kill is redone
    assert completed() == TEACHER + 1 + N_TRIALS
    assert ledger.count_documents({"status": "complete"}) == TEACHER + 1 + N_TRIALS
    sig = dft_db.signature(dft_db.frames_collection.find_one({"tags": run_tag})["signature_id"])
    assert sig["code"] == "qe" and sig["kpoints"] == [2, 2, 2]
    state = result.states[-1]
    assert np.isclose(state.get_potential_energy(), result.reference_energies[-1])
    print(f"SLHMC Si8 1000 K with pw.x: killed after {killed_at} trials ({finished_before_kill} pw.x runs done), "
          f"{N_TRIALS} trials, acceptance "
          f"{result.acceptance_rate:.2f}, reference calls {result.n_reference_calls}")
