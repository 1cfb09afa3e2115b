"""Dask clusters for training and DFT tasks: on this machine or through a batch scheduler.

>>> import mlmd_lab.cluster
>>> c = mlmd_lab.cluster("local", cores=4, memory="8GB")                 # doctest: +SKIP
>>> c = mlmd_lab.cluster("slurm", queue="cpu", account="lab", cores=16,
...                      memory="60GB", walltime="04:00:00", jobs=2)      # doctest: +SKIP
>>> c = mlmd_lab.cluster(profile="wisteria", walltime="00:30:00")        # doctest: +SKIP
>>> client = mlmd_lab.cluster.client(c)                                  # doctest: +SKIP

(The subpackage itself is callable: ``mlmd_lab.cluster(...)`` is :func:`cluster`.)

Kinds: ``local`` (:class:`distributed.LocalCluster`), ``pbs``, ``slurm``, ``sge`` (dask-jobqueue's
``PBSCluster``, ``SLURMCluster``, ``SGECluster``) and ``pjm`` (:class:`~mlmd_lab.cluster.pjm.PJMCluster`, Fujitsu
``pjsub``). Options, with units (the same names for every kind; see :data:`profiles.COMMON_OPTIONS`):

============================ =======================================================================
``cores``                    int, CPU cores per job (local: cores used in total; default all cores of
                             the current allocation)
``processes``                int, dask worker processes per job (local: workers); each gets
                             ``cores // processes`` threads. Default 1 for batch kinds: one worker owns
                             the job's cores, as MPI DFT tasks and JAX training want (dask-jobqueue's own
                             default would be ≈ √cores); local default: one worker per core
``memory``                   str, memory per job, e.g. ``"4GB"``, ``"500MiB"`` (local: in total), split
                             evenly over the processes (``--memory-limit``)
``walltime``                 str, ``"HH:MM:SS"`` per job (PBS/Slurm/SGE/PJM; default 00:30:00)
``queue``                    str: PBS ``-q``, Slurm ``-p`` partition, SGE ``-q``, PJM ``-L rscgrp=``
``account``                  str: PBS ``-A``, Slurm ``-A``, SGE ``-P`` project, PJM ``-g`` group
``prologue``                 list[str], shell lines before the worker starts (``module load``,
                             ``source venv/bin/activate``, container setup), in order
``job_extra_directives``     list[str], more directives without the prefix (``#SBATCH``, ``#PBS`` ...)
``job_directives_skip``      list[str], generated directive lines containing these are left out
``job_name``                 str, scheduler job name (default ``dask-worker``)
``interface``                str, network interface of scheduler and workers (``ib0``, ``eth0``, ``lo``)
``local_directory``          str, worker scratch folder for spilled data
``log_directory``            str, folder for the jobs' stdout/stderr
``python``                   str, interpreter of the workers (default :data:`sys.executable`)
``death_timeout``            float, seconds a worker waits for a lost scheduler
``worker_extra_args``        list[str], extra ``dask worker`` arguments
``scheduler_options``        dict, dask scheduler options, e.g. ``{"dashboard_address": ":0"}``
``jobs``                     int, jobs submitted at once (default 0: ``cluster.scale(jobs=N)`` later)
``shebang``                  str, first line of the job script
============================ =======================================================================

Kind-specific: PBS/SGE ``resource_spec``; Slurm ``job_cpu``, ``job_mem``; PJM ``nodes``, ``mpi_procs``,
``rscunit``, ``node_mem``; local ``n_workers``, ``threads_per_worker`` (default 1), ``dashboard_address``.

Every worker advertises the dask resource ``cores`` = its threads, so a task that runs MPI on the whole
allocation can ask for it (``client.submit(f, resources={"cores": 16})``) and will not share the worker with
another such task; see :mod:`mlmd_lab.cluster.mpi` for the ``mpirun`` command line.
"""

from __future__ import annotations

import os
import shutil
import sys
import types
from typing import Any

from mlmd_lab.cluster.mpi import Allocation, allocation, allocation_cores, mpi_command, mpi_flavour, run_mpi
from mlmd_lab.cluster.profiles import (
    COMMON_OPTIONS,
    KIND_OPTIONS,
    KINDS,
    check_kind,
    config_path,
    known_options,
    load_profiles,
    parse_memory,
    parse_walltime,
    profile,
    save_profile,
    validate_options,
)
from mlmd_lab.errors import MLMDError

__all__ = [
    "Allocation",
    "COMMON_OPTIONS",
    "CORES_RESOURCE",
    "KINDS",
    "KIND_OPTIONS",
    "PJMCluster",
    "PJMJob",
    "allocation",
    "allocation_cores",
    "client",
    "cluster",
    "cluster_class",
    "config_path",
    "job_script",
    "known_options",
    "load_profiles",
    "mpi_command",
    "mpi_flavour",
    "parse_memory",
    "parse_walltime",
    "profile",
    "resolve_options",
    "run_mpi",
    "save_profile",
]

#: Name of the dask worker resource every worker advertises (its number of threads).
CORES_RESOURCE = "cores"

_SUBMIT = {"pbs": "qsub", "slurm": "sbatch", "sge": "qsub", "pjm": "pjsub"}
_PLACEHOLDER_SCHEDULER = "tcp://<insert-scheduler-address-here>:8786"


def __getattr__(name: str):  # lazy: importing dask_jobqueue pulls in distributed
    if name in ("PJMCluster", "PJMJob"):
        from mlmd_lab.cluster import pjm

        return getattr(pjm, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def cluster_class(kind: str) -> type:
    """The dask cluster class of ``kind`` (``LocalCluster``, ``PBSCluster``, ``SLURMCluster``, ...)."""
    kind = check_kind(kind)
    if kind == "local":
        from distributed import LocalCluster

        return LocalCluster
    if kind == "pjm":
        from mlmd_lab.cluster.pjm import PJMCluster

        return PJMCluster
    import dask_jobqueue

    return {"pbs": dask_jobqueue.PBSCluster, "slurm": dask_jobqueue.SLURMCluster, "sge": dask_jobqueue.SGECluster}[
        kind
    ]


def resolve_options(
    kind: str | None = None, profile: str | None = None, config_file: str | os.PathLike | None = None, **options
) -> tuple[str, dict[str, Any]]:
    """Merge a profile and explicit options: ``(kind, validated options)``; explicit options win.

    ``kind`` defaults to the profile's kind, else ``"local"``. A ``kind`` that differs from the profile's raises
    MLMDError. Options set to None are dropped (so ``walltime=None`` keeps the profile's value).
    """
    merged: dict[str, Any] = {}
    if profile is not None:
        from mlmd_lab.cluster import profiles as _profiles

        entry = _profiles.profile(profile, config_file)
        pkind = entry.pop("kind")
        entry.pop("description", None)
        if kind is not None and check_kind(kind) != pkind:
            raise MLMDError(
                f"profile {profile!r} is of kind {pkind!r} but kind={kind!r} was given: drop kind= to use the "
                "profile, or use a profile of that kind"
            )
        kind = pkind
        merged.update(entry)
    kind = check_kind(kind if kind is not None else "local")
    merged.update({k: v for k, v in options.items() if v is not None})
    where = f"profile {profile!r} with overrides" if profile is not None else ""
    return kind, validate_options(kind, merged, where=where)


def _threads(opts: dict[str, Any]) -> int:
    return max(1, opts["cores"] // opts.get("processes", 1))


def _jobqueue_kwargs(kind: str, opts: dict[str, Any]) -> dict[str, Any]:
    """dask-jobqueue keyword arguments for validated mlmd_lab options (``jobs`` excluded)."""
    opts = dict(opts)
    opts.pop("jobs", None)
    missing = [k for k in ("cores", "memory") if k not in opts]
    if missing:
        raise MLMDError(
            f"a {kind} cluster needs {' and '.join(missing)} per job: e.g. cluster({kind!r}, cores=8, "
            'memory="16GB") or put them in the profile'
        )
    kw: dict[str, Any] = {}
    rename = {"prologue": "job_script_prologue"}
    if kind == "sge":
        rename["account"] = "project"
    for key, value in opts.items():
        kw[rename.get(key, key)] = value
    kw.setdefault("processes", 1)
    kw.setdefault("python", sys.executable)
    extra = list(kw.get("worker_extra_args") or [])
    if "--resources" not in extra:
        extra += ["--resources", f"{CORES_RESOURCE}={_threads(opts)}"]
    kw["worker_extra_args"] = extra
    return kw


def job_script(kind: str | None = None, profile: str | None = None, **options) -> str:
    """The job script :func:`cluster` would submit for these arguments, without starting anything.

    Same arguments as :func:`cluster`. The scheduler address in the worker command is a placeholder and the
    worker name is ``dummy-name``, as in dask-jobqueue's ``cluster.job_script()``.
    """
    config_file = options.pop("config_file", None)
    kind, opts = resolve_options(kind, profile, config_file, **options)
    if kind == "local":
        raise MLMDError("a local cluster submits no job script: use kind 'pbs', 'slurm', 'sge' or 'pjm'")
    kw = _jobqueue_kwargs(kind, opts)
    kw.pop("scheduler_options", None)
    job_cls = cluster_class(kind).job_cls
    try:
        job = job_cls(_PLACEHOLDER_SCHEDULER, name="dummy-name", config_name=job_cls.config_name, **kw)
    except (TypeError, ValueError) as err:
        raise MLMDError(f"cannot build the {kind} job script: {err}") from None
    return job.job_script()


def cluster(
    kind: str | None = None,
    profile: str | None = None,
    *,
    config_file: str | os.PathLike | None = None,
    **options,
):
    """Start a dask cluster of ``kind`` (``local``, ``pbs``, ``slurm``, ``sge``, ``pjm``) and return it.

    ``profile`` names a profile of the clusters config file (``config_file``, default
    :func:`~mlmd_lab.cluster.profiles.config_path`); explicit ``options`` override its values. ``kind`` defaults
    to the profile's kind, else ``"local"``. Options and units: see the module docstring.

    ``local``: a :class:`distributed.LocalCluster` of worker processes; default one single-threaded worker per
    core of the current allocation (:func:`~mlmd_lab.cluster.mpi.allocation_cores`), memory ``"auto"``.

    Batch kinds: the dask scheduler runs here; ``jobs=N`` submits N jobs at once, else call
    ``cluster.scale(jobs=N)`` or ``cluster.adapt(maximum_jobs=N)``. Close with ``cluster.close()`` (cancels the
    jobs) or use it as a context manager. Expected failures (unknown option, bad walltime, missing submit
    command, bad interface) raise :class:`~mlmd_lab.errors.MLMDError`.

    Under JupyterHub the dashboard link goes through jupyter-server-proxy
    (:func:`mlmd_lab.jupyter.configure_dask_dashboard`), so ``cluster.dashboard_link`` opens in the user's browser.
    """
    from mlmd_lab.jupyter import configure_dask_dashboard

    kind, opts = resolve_options(kind, profile, config_file, **options)
    configure_dask_dashboard()
    if kind == "local":
        return _local_cluster(opts)
    jobs = opts.get("jobs", 0)
    kw = _jobqueue_kwargs(kind, opts)
    if jobs and shutil.which(_SUBMIT[kind]) is None:
        raise MLMDError(
            f"{_SUBMIT[kind]} not found on PATH: a {kind} cluster submits its jobs with it, so run this on a "
            f"login node of a {kind.upper()} system (or load the scheduler's module first)"
        )
    cls = cluster_class(kind)
    try:
        obj = cls(**kw)
    except (TypeError, ValueError) as err:
        raise MLMDError(f"cannot create the {kind} cluster: {err}") from None
    if jobs:
        obj.scale(jobs=jobs)
    return obj


def _local_cluster(opts: dict[str, Any]):
    from distributed import LocalCluster

    cores = opts.get("cores")
    n_workers = opts.get("n_workers") or opts.get("processes") or cores or allocation_cores()
    threads = opts.get("threads_per_worker") or (max(1, cores // n_workers) if cores else 1)
    memory = opts.get("memory")
    kw: dict[str, Any] = {
        "n_workers": n_workers,
        "threads_per_worker": threads,
        "processes": True,
        "memory_limit": parse_memory(memory) // n_workers if memory else "auto",
        "resources": {CORES_RESOURCE: threads},
    }
    if "dashboard_address" in opts:
        kw["dashboard_address"] = opts["dashboard_address"]
    if "interface" in opts:
        kw["interface"] = opts["interface"]
    if "local_directory" in opts:
        kw["local_directory"] = opts["local_directory"]
    if opts.get("scheduler_options"):
        kw["scheduler_kwargs"] = dict(opts["scheduler_options"])
    try:
        return LocalCluster(**kw)
    except (TypeError, ValueError) as err:
        raise MLMDError(f"cannot create the local cluster: {err}") from None


def client(cluster_or_kind=None, /, **options):
    """A :class:`distributed.Client` for a cluster object, or for ``cluster(cluster_or_kind, **options)``."""
    from distributed import Client

    if cluster_or_kind is None or isinstance(cluster_or_kind, str):
        return Client(cluster(cluster_or_kind, **options))
    if options:
        raise MLMDError("options go to cluster(...), not to client(cluster_object): pass either, not both")
    return Client(cluster_or_kind)


class _CallableModule(types.ModuleType):
    """Lets ``mlmd_lab.cluster(...)`` call :func:`cluster` although ``mlmd_lab.cluster`` is this subpackage."""

    def __call__(self, *args, **kwargs):
        return cluster(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
