"""Dask workers on Fujitsu's job manager PJM (``pjsub``/``pjdel``; Fugaku, Wisteria and other Fujitsu systems).

dask-jobqueue 0.9 has no PJM class (its issue #573). :class:`PJMJob` follows the pattern of its own
``PBSJob``/``SLURMJob``: class attributes ``submit_command``, ``cancel_command``, ``config_name`` and
``job_id_regexp``, directive lines built in ``__init__`` into ``self.job_header``, generated lines filtered by
``job_directives_skip``, then ``job_extra_directives`` appended with the ``#PJM`` prefix.
:class:`PJMCluster` is the matching ``JobQueueCluster``. Defaults live in the dask config block
``jobqueue.pjm`` (registered on import, so ``~/.config/dask/jobqueue.yaml`` can override them like
dask-jobqueue's own blocks).

Generated header (every line optional except ``node`` and ``elapse``)::

    #PJM -N dask-worker
    #PJM -L "rscunit=rscunit_ft01"       rscunit
    #PJM -L "rscgrp=regular-o"           queue
    #PJM -g gz00                         account
    #PJM -L "node=1"                     nodes
    #PJM -L "elapse=01:00:00"            walltime (HH:MM:SS)
    #PJM -L "node-mem=28Gi"              node_mem
    #PJM --mpi "proc=48"                 mpi_procs
    #PJM -o "LOGDIR/dask-worker.%j.out"  log_directory
    #PJM -e "LOGDIR/dask-worker.%j.err"  log_directory

Directive syntax, as far as it could be checked without a PJM system (public sources, not Fujitsu's manual):

- ``-L "rscgrp=..."``, ``-L "node=N"``, ``-L "elapse=..."``, ``--mpi "proc=N"``, ``-g GROUP``, quoted ``-L``
  values and ``[INFO] PJM 0000 pjsub Job N submitted.``: RIKEN Fugaku user-guide examples as quoted in public
  job scripts (e.g. github.com/giordano/julia-on-fugaku benchmarks, a Fugaku scheduler guide quoting RIKEN's
  "user-guide-use"), and University of Tokyo Wisteria usage in SeisFlows (``seisflows/system/fujitsu.py``:
  ``-L rscgrp=``, ``-g``, ``-N``, ``-o``, ``-e``, ``-j``, ``-L elapse=``, ``-L node=``, ``--mpi proc=``).
- ``-N name``, ``-o file``, ``-j``, the pjsub output line and ``pjdel JOBID``: Nextflow's TCS (Fujitsu Technical
  Computing Suite) executor, ``nextflow/executor/TcsExecutor.groovy``.
- ``%j`` (job id) in ``-o``/``-e`` file names: public Fugaku/Wisteria scripts (``#PJM -o "%n.%j.out"``).
- ``-L "rscunit=..."``, ``-L "node-mem=..."`` (e.g. ``10Gi``): public K computer / Fugaku scripts.
  Which ``-L`` resources exist, and their limits, are site specific (``pjacl --rg NAME`` on the system).

PJM resource groups usually hand out whole nodes, so ``cores`` and ``memory`` only size the dask workers
(``--nthreads``, ``--memory-limit``) and are not requested from PJM; request node memory with ``node_mem`` or
shared-node resources (e.g. ``-L "vnode-core=4"``) with ``job_extra_directives``. PJM does not pass the
submitting shell's environment to the job unless ``-X`` is given: the worker starts with an absolute Python path,
and ``prologue`` lines (``module load ...``) set up the rest.
"""

from __future__ import annotations

import logging

import dask
from dask_jobqueue.core import Job, JobQueueCluster, cluster_parameters, job_parameters

logger = logging.getLogger(__name__)

#: Defaults of the ``jobqueue.pjm`` dask config block (same keys as dask-jobqueue's blocks, plus PJM's own).
PJM_DEFAULTS: dict = {
    "name": "dask-worker",
    # Dask worker options
    "cores": None,
    "memory": None,
    "processes": None,
    "python": None,
    "interface": None,
    "death-timeout": 60,
    "local-directory": None,
    "shared-temp-directory": None,
    "extra": None,
    "worker-command": "distributed.cli.dask_worker",
    "worker-extra-args": [],
    # PJM resource manager options
    "shebang": "#!/usr/bin/env bash",
    "queue": None,
    "account": None,
    "walltime": "00:30:00",
    "nodes": 1,
    "mpi-procs": None,
    "rscunit": None,
    "node-mem": None,
    "env-extra": None,
    "job-script-prologue": [],
    "job-extra": None,
    "job-extra-directives": [],
    "job-directives-skip": [],
    "log-directory": None,
    # Scheduler options
    "scheduler-options": {},
}


def register_config() -> None:
    """Add the ``jobqueue.pjm`` defaults to dask's config (user settings keep priority); idempotent."""
    dask.config.update_defaults({"jobqueue": {"pjm": dict(PJM_DEFAULTS)}})


register_config()


def _quoted(value: str) -> str:
    return '"' + str(value).replace('"', '\\"') + '"'


class PJMJob(Job):
    """One PJM job running dask worker(s); see the module docstring for the directives."""

    submit_command = "pjsub"
    cancel_command = "pjdel"
    config_name = "pjm"
    # pjsub prints e.g. "[INFO] PJM 0000 pjsub Job 12345 submitted."
    job_id_regexp = r"pjsub Job (?P<job_id>\d+) submitted"

    def __init__(
        self,
        scheduler=None,
        name=None,
        queue=None,
        account=None,
        walltime=None,
        nodes=None,
        mpi_procs=None,
        rscunit=None,
        node_mem=None,
        config_name=None,
        **base_class_kwargs,
    ):
        super().__init__(scheduler=scheduler, name=name, config_name=config_name, **base_class_kwargs)

        def conf(key):
            return dask.config.get(f"jobqueue.{self.config_name}.{key}", None)

        if queue is None:
            queue = conf("queue")
        if account is None:
            account = conf("account")
        if walltime is None:
            walltime = conf("walltime")
        if nodes is None:
            nodes = conf("nodes") or 1
        if mpi_procs is None:
            mpi_procs = conf("mpi-procs")
        if rscunit is None:
            rscunit = conf("rscunit")
        if node_mem is None:
            node_mem = conf("node-mem")

        header_lines = []
        if self.job_name is not None:
            header_lines.append(f"#PJM -N {self.job_name}")
        if rscunit is not None:
            header_lines.append(f'#PJM -L "rscunit={rscunit}"')
        if queue is not None:
            header_lines.append(f'#PJM -L "rscgrp={queue}"')
        if account is not None:
            header_lines.append(f"#PJM -g {account}")
        header_lines.append(f'#PJM -L "node={int(nodes)}"')
        if walltime is not None:
            header_lines.append(f'#PJM -L "elapse={walltime}"')
        if node_mem is not None:
            header_lines.append(f'#PJM -L "node-mem={node_mem}"')
        if mpi_procs is not None:
            header_lines.append(f'#PJM --mpi "proc={int(mpi_procs)}"')
        if self.log_directory is not None:
            stem = f"{self.log_directory}/{self.job_name or 'worker'}.%j"
            header_lines.append(f"#PJM -o {_quoted(stem + '.out')}")
            header_lines.append(f"#PJM -e {_quoted(stem + '.err')}")

        # Skip requested header directives (as dask-jobqueue's own Job classes do)
        header_lines = [
            line for line in header_lines if not any(skip in line for skip in self.job_directives_skip)
        ]
        # Add extra header directives
        header_lines.extend(f"#PJM {arg}" for arg in self.job_extra_directives)

        self.job_header = "\n".join(header_lines)
        logger.debug("Job script: \n %s", self.job_script())


class PJMCluster(JobQueueCluster):
    __doc__ = f"""Launch dask workers on a Fujitsu PJM system (``pjsub``/``pjdel``).

    Parameters
    ----------
    queue : str
        Resource group of each worker job: ``#PJM -L "rscgrp=..."``.
    account : str
        Group charged for each job: ``#PJM -g ...``.
    walltime : str
        Elapsed-time limit of each job, ``HH:MM:SS``: ``#PJM -L "elapse=..."``.
    nodes : int
        Nodes per job: ``#PJM -L "node=N"`` (default 1). The worker runs on the job's first node; more nodes
        are for the MPI ranks that a task launches with ``mpiexec`` inside the job.
    mpi_procs : int
        MPI processes of the job: ``#PJM --mpi "proc=N"`` (for tasks that launch ``mpiexec``).
    rscunit : str
        Resource unit: ``#PJM -L "rscunit=..."``.
    node_mem : str
        Memory per node in PJM syntax, e.g. ``"28Gi"``: ``#PJM -L "node-mem=..."``.
    {job_parameters}
    {cluster_parameters}
    job_extra_directives : list
        Other PJM options, each prefixed with ``#PJM``, e.g. ``['-L "vnode-core=4"', "-j", "-S"]``.

    Examples
    --------
    >>> cluster = PJMCluster(queue="regular-o", account="gz00", cores=48, memory="28GB",
    ...                      walltime="01:00:00", job_script_prologue=["module load python"])
    >>> cluster.scale(jobs=4)
    """
    job_cls = PJMJob
