"""MPI launch commands for a DFT task that runs inside its own scheduler allocation.

dask-jobqueue cannot run multi-node MPI tasks by itself (its issues #206, #363, #364). A dask worker runs in a
batch job that owns ``cores`` CPUs; a DFT task on that worker starts ``mpirun -n <cores> pw.x ...`` as a
subprocess, inside the same allocation. This module builds that command line and tells how many cores the
allocation has:

>>> from mlmd_lab.cluster.mpi import mpi_command, allocation_cores
>>> mpi_command(["pw.x", "-in", "pw.in"], allocation_cores())    # doctest: +SKIP
['/usr/bin/mpirun', '--allow-run-as-root', '--oversubscribe', '-n', '4', 'pw.x', '-in', 'pw.in']

Facts measured on Debian 12 with Slurm 22.05 (``sbatch -n 1 -c 2``, the shape of a dask-jobqueue job):

- Open MPI refuses to run as root without ``--allow-run-as-root``.
- Open MPI counts Slurm *tasks* as slots, so ``mpirun -n 2`` in a ``-n 1 -c 2`` job fails with "not enough
  slots" unless ``--oversubscribe`` is given; with it, the 2 ranks use the job's 2 CPUs.
- MPICH (Hydra) runs ``-n 2`` there as is.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mlmd_lab.errors import MLMDError

#: MPI flavours :func:`mpi_flavour` tells apart.
FLAVOURS = ("openmpi", "mpich", "intel", "fujitsu", "srun", "unknown")


@dataclass(frozen=True)
class Allocation:
    """Cores available to MPI ranks started from here, and where the number came from.

    ``cores``: CPU cores on this node; ``source``: the environment variable (or ``"sched_getaffinity"`` /
    ``"cpu_count"``); ``scheduler``: ``"slurm"``, ``"pbs"``, ``"sge"``, ``"pjm"`` or None outside a batch job;
    ``job_id``: the scheduler's job id or None.
    """

    cores: int
    source: str
    scheduler: str | None
    job_id: str | None


# (scheduler, job-id variable, cores variable); first match wins. Slurm first: jobs submitted through Slurm's
# PBS wrappers (slurm-wlm-torque) run under Slurm and carry SLURM_* variables.
_ALLOCATION_VARS: tuple[tuple[str, str, str], ...] = (
    ("slurm", "SLURM_JOB_ID", "SLURM_CPUS_ON_NODE"),  # CPUs allocated to the job on this node
    ("pbs", "PBS_JOBID", "PBS_NCPUS"),  # PBS Pro / OpenPBS: ncpus of the chunk
    ("pbs", "PBS_JOBID", "NCPUS"),  # PBS Pro: same, older name
    ("pbs", "PBS_JOBID", "PBS_NUM_PPN"),  # Torque: processors per node
    ("pbs", "PBS_JOBID", "PBS_NP"),  # Torque: processors in total
    ("sge", "JOB_ID", "NSLOTS"),  # Grid Engine: slots granted
    ("pjm", "PJM_JOBID", "PJM_MPI_PROC"),  # Fujitsu PJM: --mpi proc=N of the job
)


def allocation(environ: Mapping[str, str] | None = None) -> Allocation:
    """Describe the current allocation (see :class:`Allocation`).

    Inside a batch job the scheduler's variable is used (Slurm ``SLURM_CPUS_ON_NODE``, PBS ``PBS_NCPUS`` /
    ``NCPUS`` / ``PBS_NUM_PPN`` / ``PBS_NP``, SGE ``NSLOTS``, PJM ``PJM_MPI_PROC``); else the CPUs this process
    may run on (``os.sched_getaffinity``), else ``os.cpu_count()``. ``OMP_NUM_THREADS`` is deliberately not
    used: it is a per-process thread setting, often 1 on purpose, not the size of the allocation.
    """
    env = os.environ if environ is None else environ
    for scheduler, job_var, cores_var in _ALLOCATION_VARS:
        if job_var in env and cores_var in env:
            try:
                cores = int(str(env[cores_var]).strip())
            except ValueError:
                continue
            if cores > 0:
                return Allocation(cores, cores_var, scheduler, env[job_var])
    try:
        return Allocation(len(os.sched_getaffinity(0)), "sched_getaffinity", None, None)
    except (AttributeError, OSError):
        return Allocation(os.cpu_count() or 1, "cpu_count", None, None)


def allocation_cores(environ: Mapping[str, str] | None = None) -> int:
    """Number of cores of the current allocation on this node (see :func:`allocation`)."""
    return allocation(environ).cores


def _resolve(launcher: str) -> str:
    path = shutil.which(launcher)
    if path is None:
        raise MLMDError(
            f"MPI launcher {launcher!r} not found on PATH: install an MPI (e.g. apt-get install openmpi-bin, "
            "or pip install mpich), load its module in the cluster profile's prologue, or pass launcher= "
            "with the full path of mpirun/mpiexec"
        )
    return path


@functools.lru_cache(maxsize=32)
def _flavour_of(path: str) -> str:
    name = Path(path).name
    if name == "srun":
        return "srun"
    try:
        proc = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20)
        text = (proc.stdout or "") + (proc.stderr or "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    lower = text.lower()
    if "intel(r) mpi" in lower or "intel mpi" in lower:
        return "intel"
    if "fujitsu" in lower:
        return "fujitsu"
    if "open mpi" in lower or "open-mpi" in lower or "openrte" in lower:
        return "openmpi"
    if "hydra" in lower or "mpich" in lower:
        return "mpich"
    if lower.startswith("slurm"):
        return "srun"
    return "unknown"


def mpi_flavour(launcher: str = "mpirun") -> str:
    """Which MPI ``launcher`` belongs to, from ``launcher --version``: one of :data:`FLAVOURS` (cached)."""
    return _flavour_of(_resolve(launcher))


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def mpi_command(
    executable: str | Sequence[str],
    n_ranks: int,
    launcher: str = "mpirun",
    extra: Sequence[str] = (),
    *,
    as_root: bool | None = None,
    oversubscribe: bool | None = None,
    flavour: str | None = None,
) -> list[str]:
    """Command line that runs ``executable`` on ``n_ranks`` MPI ranks: ``[launcher, flags..., -n, N, exe...]``.

    - ``executable``: program and its arguments, a string (one program, no arguments) or a sequence.
    - ``n_ranks``: number of MPI processes (>= 1), usually :func:`allocation_cores`.
    - ``launcher``: ``"mpirun"``, ``"mpiexec"``, ``"srun"`` or a full path; resolved on PATH.
    - ``extra``: more launcher arguments, placed before ``-n`` (e.g. ``["--bind-to", "none"]``).
    - ``as_root``: add Open MPI's ``--allow-run-as-root`` (default: when the effective user is root).
    - ``oversubscribe``: add Open MPI's ``--oversubscribe`` (default: when ``n_ranks`` fits in the allocation's
      cores, because Open MPI counts Slurm tasks, not CPUs, as slots in a ``-n 1 -c N`` job).
    - ``flavour``: skip detection (one of :data:`FLAVOURS`); default :func:`mpi_flavour` of the launcher.

    Raises MLMDError when the launcher is not found or ``n_ranks`` is not a positive whole number.
    """
    if isinstance(n_ranks, bool) or not isinstance(n_ranks, int) or n_ranks < 1:
        raise MLMDError(f"n_ranks={n_ranks!r} must be a whole number >= 1, e.g. n_ranks=allocation_cores()")
    if isinstance(executable, str | os.PathLike):
        program = [os.fspath(executable)]
    else:
        program = [os.fspath(part) for part in executable]
    if not program or not program[0]:
        raise MLMDError("executable is empty: pass the program to run, e.g. ['pw.x', '-in', 'pw.in']")
    path = _resolve(launcher)
    kind = flavour if flavour is not None else _flavour_of(path)
    if kind not in FLAVOURS:
        raise MLMDError(f"unknown MPI flavour {flavour!r}: use one of {', '.join(FLAVOURS)}")
    cmd = [path]
    if kind == "openmpi":
        if as_root if as_root is not None else _is_root():
            cmd.append("--allow-run-as-root")
        if oversubscribe if oversubscribe is not None else n_ranks <= allocation_cores():
            cmd.append("--oversubscribe")
    cmd.extend(str(x) for x in extra)
    cmd.extend(["-n", str(n_ranks)])
    cmd.extend(program)
    return cmd


def run_mpi(
    executable: str | Sequence[str],
    n_ranks: int | None = None,
    launcher: str = "mpirun",
    extra: Sequence[str] = (),
    *,
    cwd: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    log: str | os.PathLike | None = None,
) -> subprocess.CompletedProcess:
    """Run ``executable`` under MPI inside the current allocation and wait for it.

    ``n_ranks`` defaults to :func:`allocation_cores`. ``env`` entries are added to the current environment
    (``OMP_NUM_THREADS=1`` is set unless given). Output goes to ``log`` (a file, relative to ``cwd``) when
    given, else it is captured and returned. ``timeout`` is in seconds. A non-zero exit or a timeout raises
    MLMDError with the command and the end of the output.
    """
    n = allocation_cores() if n_ranks is None else n_ranks
    cmd = mpi_command(executable, n, launcher=launcher, extra=extra)
    full_env = dict(os.environ)
    full_env.setdefault("OMP_NUM_THREADS", "1")
    if env:
        full_env.update({str(k): str(v) for k, v in env.items()})
    workdir = Path(cwd) if cwd is not None else Path.cwd()
    try:
        if log is not None:
            log_path = workdir / log
            with open(log_path, "w") as fh:
                proc = subprocess.run(
                    cmd, cwd=workdir, env=full_env, stdout=fh, stderr=subprocess.STDOUT, text=True, timeout=timeout
                )
            tail = log_path.read_text(errors="replace")[-2000:]
        else:
            proc = subprocess.run(cmd, cwd=workdir, env=full_env, capture_output=True, text=True, timeout=timeout)
            tail = ((proc.stdout or "") + (proc.stderr or ""))[-2000:]
    except subprocess.TimeoutExpired:
        raise MLMDError(
            f"MPI run timed out after {timeout} s: {' '.join(cmd)} (raise timeout= or the job's walltime)"
        ) from None
    if proc.returncode != 0:
        raise MLMDError(
            f"MPI run failed with exit code {proc.returncode}: {' '.join(cmd)} (in {workdir}); "
            f"check the program's input and the end of its output:\n{tail}"
        )
    return proc
