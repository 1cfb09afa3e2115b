"""A learning run in its own process (tests/test_learn.py kills it with SIGKILL during labelling and reruns it).

    python tests/_learn_worker.py URI DATABASE WORKDIR COUNT_FILE

The reference is :class:`CountingEMT`: ASE's EMT that appends the digest of every structure it calculates to
``$LEARN_COUNT_FILE``; with ``$LEARN_KILL_AT`` set, the call that makes the count reach it kills this process
(SIGKILL) before computing. With ``$LEARN_KILL_IN_TRAINING=K`` the process kills itself (SIGKILL) inside the K-th
committee training of the run, at epoch 20 of its second member (the first member's weights exist in memory
only). Prints the result as one JSON line.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import warnings

import numpy as np
from ase.calculators.emt import EMT


class CountingEMT(EMT):
    """EMT that counts its calls in a file (and can kill the process at call ``$LEARN_KILL_AT``). Picklable."""

    def calculate(self, atoms=None, properties=("energy",), system_changes=None):
        path = os.environ.get("LEARN_COUNT_FILE")
        if path and atoms is not None:
            digest = hashlib.sha256(np.round(atoms.positions, 6).tobytes()).hexdigest()[:16]
            with open(path, "a") as handle:
                handle.write(digest + "\n")
            with open(path) as handle:
                count = sum(1 for _ in handle)
            kill_at = os.environ.get("LEARN_KILL_AT")
            if kill_at and count >= int(kill_at):
                os.kill(os.getpid(), signal.SIGKILL)
        if system_changes is None:
            return super().calculate(atoms, properties)
        return super().calculate(atoms, properties, system_changes)


def kill_inside_training(k: int) -> None:
    """Make the k-th call of ``train_ensemble`` in this process SIGKILL it at epoch 20 of member 1."""
    from mlmd_lab.train import trainer as trainer_module
    from mlmd_lab.train.callbacks import Callback

    real, calls = trainer_module.train_ensemble, []

    class Killer(Callback):
        def on_epoch_end(self, metrics):
            if metrics.member == 1 and metrics.epoch >= 20:
                os.kill(os.getpid(), signal.SIGKILL)
            return False

    def train_ensemble(*args, callbacks=(), **kwargs):
        calls.append(1)
        if len(calls) == k:
            callbacks = [*callbacks, Killer()]
        return real(*args, callbacks=callbacks, **kwargs)

    trainer_module.train_ensemble = train_ensemble  # learn's loop imports it from this module when it trains


def main() -> None:
    from ase.build import bulk

    from mlmd_lab import learn
    from mlmd_lab.db import connect

    uri, database, workdir, count_file = sys.argv[1:5]
    os.environ["LEARN_COUNT_FILE"] = count_file
    if os.environ.get("LEARN_KILL_IN_TRAINING"):
        kill_inside_training(int(os.environ["LEARN_KILL_IN_TRAINING"]))
    warnings.simplefilter("ignore")
    db = connect(uri, database=database)
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 1, 1))
    result = learn.run(CountingEMT(), atoms, temperatures=[500.0], db=db, workdir=workdir, committee=2,
                       max_iterations=2, per_iteration=4, md_steps=100, timestep=2.0, seed=3,
                       train_config=dict(hidden=(6, 6), max_epochs=200, cutoff=4.0, n_radial=5, n_angular=1,
                                         zetas=(1.0,)))
    print(json.dumps({"stop_reason": result.stop_reason, "calls": result.n_reference_calls,
                      "iterations": len(result.iterations), "model_name": result.model_name}))


if __name__ == "__main__":
    main()
