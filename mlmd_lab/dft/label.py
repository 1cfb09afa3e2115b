"""Label structures with DFT as tasks on any dask cluster, each result ingested the moment it completes.

:func:`label` submits one task per structure (a :class:`~mlmd_lab.dft.recipes.Recipe` run in its own folder) to
a dask cluster (``mlmd_lab.cluster(...)``: local, Slurm, PBS, SGE, PJM) or runs them in this process, and keeps a
ledger in the database (collection ``labelling``, one document per structure and settings):

- the task key is the structure's hash plus the recipe's settings hash, so re-running skips what is labelled;
- every finished calculation's output files travel back with the task result (no shared file system needed)
  and are ingested by this process, which alone talks to the database (compute nodes often cannot reach it);
- exceptions are retried ``retries`` times by dask, workers that die (killed jobs, node failures) have their
  tasks rescheduled by dask, and what still fails is recorded in the ledger with its error;
- a calculation folder whose record says "complete" is not run again (a re-submitted task after a lost result
  costs nothing), so finished work is never lost.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ase import Atoms

from mlmd_lab.dft.recipes import Recipe, _settings_hash, _structure_hash, ingest_settings
from mlmd_lab.errors import MLMDError
from mlmd_lab.files import atomic_write_bytes

LEDGER = "labelling"
MAX_RETURN_BYTES = 64 * 2**20  # files larger than this stay on the worker (wavefunctions, charge densities)


@dataclass
class LabelReport:
    """What :func:`label` did.

    Attributes:
        submitted: tasks run in this call; skipped: structures already labelled with these settings;
        labelled: tasks that finished and were ingested; failed: (task key, error) of tasks that failed after
        their retries; frames_added: new frames in the database; wall_s: seconds; task_s: per-task run times
        (seconds inside the worker); keys: task key of every input structure, in order.
    """

    submitted: int = 0
    skipped: int = 0
    labelled: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    frames_added: int = 0
    wall_s: float = 0.0
    task_s: list[float] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"labelled {self.labelled}, skipped {self.skipped} (already labelled), failed {len(self.failed)} "
                 f"of {len(self.keys)} structures; {self.frames_added} frames added in {self.wall_s:.1f} s"]
        lines += [f"  failed {key}: {error}" for key, error in self.failed]
        return "\n".join(lines)


def task_key(atoms: Atoms, recipe: Recipe) -> str:
    """``label-<structure hash>-<settings hash>``: the same structure with the same settings is one task.

    How the program is launched (MPI launcher and ranks, the command line) is not part of the key: the same
    calculation run on more ranks is the same label, and the submitting host (a login node, a notebook server)
    need not have ``mpirun`` or the program on its PATH.
    """
    return f"label-{_structure_hash(atoms)[:16]}-{_settings_hash(identity_settings(recipe, atoms))}"


def identity_settings(recipe: Recipe, atoms: Atoms) -> dict:
    """The recipe's settings for ``atoms`` without how the program is launched (see :func:`task_key`)."""
    local = copy.copy(recipe)
    if getattr(local, "mpi", None) is not None:
        local.mpi = None
    settings = dict(local.settings(atoms))
    settings.pop("command", None)
    return settings


def run_task(recipe: Recipe, atoms: Atoms, folder: str) -> dict:
    """Run one calculation (on a worker) and return its output files' contents (name -> bytes) and timing."""
    t0 = time.perf_counter()
    out = recipe.calculate(atoms, folder)
    files = {}
    for path in sorted(Path(folder).iterdir()):
        if path.is_file() and path.stat().st_size <= MAX_RETURN_BYTES:
            files[path.name] = path.read_bytes()
    return {"output": out.name, "files": files, "folder": str(folder), "seconds": time.perf_counter() - t0,
            "host": os.uname().nodename, "pid": os.getpid()}


def label(structures: Sequence[Atoms] | Iterable[Atoms], recipe: Recipe, cluster=None, db=None, *,
          workdir: str | os.PathLike = "labelling", retries: int = 2, tags: Sequence[str] = (),
          jobs: int | None = None, progress: bool = True) -> LabelReport:
    """Label ``structures`` with ``recipe`` and ingest every result into ``db`` as it completes.

    Args:
        structures: ASE Atoms (Å); generators' ``info["generator"]`` provenance is kept with the calculation.
        recipe: a :class:`~mlmd_lab.dft.recipes.Recipe` (QuantumEspresso, Vasp, PySCF, ...); must be picklable.
        cluster: a dask cluster (``mlmd_lab.cluster(...)``), a ``distributed.Client``, or None to run here.
        db: the database (required: it holds the ledger and receives the frames).
        workdir: folder of the calculation folders (``workdir/<task key>``); on clusters the worker's copy
            is used where the file system is shared, and the returned files are written here otherwise.
        retries: extra attempts per task after an exception (dask ``retries``).
        jobs: start this many batch jobs (or local workers) on ``cluster`` when there is work, at most one per
            task, kept at that number while tasks remain (jobs that die are replaced); None uses the cluster as
            it is. With nothing left to label, nothing is submitted.
        tags: tags stored on the ingested frames (``"labelled"`` is always added).
        progress: show a progress bar.

    Returns:
        a :class:`LabelReport`.
    """
    if db is None:
        raise MLMDError("label() needs db= (the database keeps the ledger of what is labelled and receives the "
                        "frames); use mlmd_lab.connect()")
    if not isinstance(recipe, Recipe):
        raise MLMDError(f"recipe must be an mlmd_lab.dft recipe (QuantumEspresso, Vasp, PySCF), not "
                        f"{type(recipe).__name__}")
    structures = list(structures)
    if not all(isinstance(a, Atoms) and len(a) for a in structures):
        raise MLMDError("label() needs non-empty ase.Atoms structures")
    t0 = time.perf_counter()
    workdir = Path(workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    ledger = db.mongo[LEDGER]
    report = LabelReport(keys=[task_key(a, recipe) for a in structures])
    todo: dict[str, Atoms] = {}
    for key, atoms in zip(report.keys, structures, strict=True):
        if key in todo:
            continue  # the same structure twice in the input: one task
        doc = ledger.find_one({"_id": key}, {"status": 1})
        if doc is not None and doc.get("status") == "complete":
            report.skipped += 1
            continue
        todo[key] = atoms
    if todo and cluster is None:
        recipe.check(next(iter(todo.values())))  # fail fast for a missing program or pseudopotential
    # (on clusters the program may exist only on the compute nodes: a missing one fails the tasks, recorded)
    report.submitted = len(todo)
    bar = _progress(progress, len(todo))
    tags = list(dict.fromkeys([*tags, "labelled"]))
    try:
        for key, outcome in _execute(todo, recipe, cluster, workdir, retries, jobs):
            if not isinstance(outcome, BaseException):
                try:  # an output the database refuses is a failure of this task, not of the whole run
                    added = _ingest(db, ledger, key, recipe, todo[key], outcome, workdir, tags)
                except MLMDError as exc:
                    outcome = exc
                else:
                    report.frames_added += added
                    report.labelled += 1
                    report.task_s.append(outcome["seconds"])
            if isinstance(outcome, BaseException):
                _record_failure(ledger, key, recipe, todo[key], outcome)
                report.failed.append((key, f"{type(outcome).__name__}: {outcome}"[:500]))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    report.wall_s = time.perf_counter() - t0
    return report


def _keep_workers(cluster, n: int) -> None:
    """Adaptive scaling pinned at ``n`` jobs (dask-jobqueue) or workers (local): dead ones are replaced."""
    if hasattr(cluster, "job_cls"):  # dask-jobqueue (also PJMCluster)
        cluster.adapt(minimum_jobs=n, maximum_jobs=n)
    else:
        cluster.adapt(minimum=n, maximum=n)


def _execute(todo: dict[str, Atoms], recipe: Recipe, cluster, workdir: Path, retries: int, jobs: int | None):
    """Yield (key, result dict or exception) as tasks finish."""
    if cluster is None:
        for key, atoms in todo.items():
            outcome = None
            for _ in range(retries + 1):
                try:
                    outcome = run_task(recipe, atoms, str(workdir / key))
                    break
                except Exception as exc:  # recorded in the ledger, like a failed cluster task
                    outcome = exc
            yield key, outcome
        return
    from distributed import Client, as_completed

    if jobs and not isinstance(cluster, Client):
        _keep_workers(cluster, min(jobs, len(todo)))
    client = cluster if isinstance(cluster, Client) else Client(cluster)
    own_client = client is not cluster
    try:
        futures = {client.submit(run_task, recipe, atoms, str(workdir / key), key=key, pure=False,
                                 retries=retries): key for key, atoms in todo.items()}
        for future in as_completed(futures):
            key = futures[future]
            try:
                yield key, future.result()
            except Exception as exc:  # task error after retries, or KilledWorker after repeated worker deaths
                yield key, exc
            future.release()
    finally:
        if own_client:
            client.close()


def _ingest(db, ledger, key: str, recipe: Recipe, atoms: Atoms, outcome: dict, workdir: Path, tags) -> int:
    folder = workdir / key
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in outcome["files"].items():
        target = folder / name
        if not (target.is_file() and target.stat().st_size == len(data)):
            atomic_write_bytes(target, data)
    output = folder / outcome["output"]
    # one data set per labelling folder (the name it is shared, published and credited by)
    result = db.ingest(output, settings=ingest_settings(output), tags=tags, progress=False,
                       dataset=Path(workdir).resolve().name)
    if result.failed:
        raise MLMDError(f"labelled output {output} could not be ingested: {result.failed}")
    frame_ids = [d["_id"] for d in db.frames_collection.find({"source_path": str(output)}, {"_id": 1})]
    ledger.replace_one({"_id": key}, {
        "_id": key, "status": "complete", "recipe": recipe.name,
        "settings_hash": _settings_hash(identity_settings(recipe, atoms)),
        "structure_hash": _structure_hash(atoms), "formula": atoms.get_chemical_formula(),
        "folder": str(folder), "worker_folder": outcome["folder"], "host": outcome["host"],
        "seconds": outcome["seconds"], "frame_ids": frame_ids, "generator": _jsonable(atoms.info.get("generator")),
        "finished": time.time()}, upsert=True)
    return int(getattr(result, "added", 0) or 0)


def _record_failure(ledger, key: str, recipe: Recipe, atoms: Atoms, error: BaseException) -> None:
    ledger.update_one({"_id": key}, {"$set": {
        "status": "failed", "recipe": recipe.name, "formula": atoms.get_chemical_formula(),
        "error": f"{type(error).__name__}: {error}"[:4000], "finished": time.time()},
        "$inc": {"failures": 1}}, upsert=True)


def _jsonable(value):
    import json

    from mlmd_lab.frames import json_default

    return None if value is None else json.loads(json.dumps(value, default=json_default))


def _progress(enabled: bool, total: int):
    if not enabled or total == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="calc", desc="labelling")
