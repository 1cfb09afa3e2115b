"""Training as a task on a dask cluster ("train where the data are"); the trained model comes back.

Any ``distributed`` client or cluster works: a LocalCluster, or the PBS/Slurm/PJM clusters of
:mod:`mlmd_lab.cluster`. Live metrics stay on the worker (its JSON-lines log when a workdir is given);
the returned trainer state has the full history.
"""

from __future__ import annotations

from typing import Any


def fit_on_cluster(trainer, cluster: Any):
    """Run ``trainer.fit()`` on a dask worker; copy the model, errors and history back into ``trainer``."""
    from distributed import Client

    from mlmd_lab.errors import MLMDError

    client = cluster if isinstance(cluster, Client) else Client(cluster)
    try:
        future = client.submit(_fit_remote, type(trainer), list(trainer.frames), trainer.config, trainer.query,
                               None if trainer.workdir is None else str(trainer.workdir), pure=False)
        try:
            model, errors, history, split_ids, budget = future.result()
        except Exception as err:
            raise MLMDError(f"training on the cluster failed: {type(err).__name__}: {err}") from err
    finally:
        if client is not cluster:
            client.close()
    trainer.model, trainer.errors, trainer.history, trainer.budget = model, errors, history, budget
    trainer.remote_split_ids = split_ids
    return model


def _fit_remote(trainer_class, frames, config, query, workdir):
    """On the worker: a fresh ``trainer_class`` (the caller's :class:`~mlmd_lab.train.trainer.Trainer`, sent
    by reference, so that this module needs no import of the trainer: it sits below it) runs ``fit()``."""
    trainer = trainer_class(frames, config, workdir=workdir, progress=False, query=query)
    model = trainer.fit()
    ids = {name: getattr(trainer.split, name).ids for name in ("train", "validation", "test")}
    return model, trainer.errors, trainer.history, ids, trainer.budget
