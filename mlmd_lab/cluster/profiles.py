"""Named cluster profiles in a user config file, and validation of cluster options.

The file is TOML, read with the standard library's :mod:`tomllib`. Its location is ``$MLMD_CLUSTER_CONFIG``
when set, else ``clusters.toml`` in the platform's user config folder for ``mlmd_lab``
(Linux: ``~/.config/mlmd_lab/clusters.toml``). One table per profile under ``[profiles]``::

    # ~/.config/mlmd_lab/clusters.toml
    [profiles.wisteria]
    kind = "pjm"                    # local | pbs | slurm | sge | pjm
    description = "Wisteria-O, 1 node per job"
    queue = "regular-o"             # PJM resource group (-L rscgrp=)
    account = "gz00"                # PJM group (-g)
    walltime = "01:00:00"           # HH:MM:SS
    cores = 48
    processes = 1
    memory = "28GB"
    prologue = ["module load python/3.11", "source ~/venvs/mlmd/bin/activate"]

    [profiles.lab-slurm]
    kind = "slurm"
    queue = "cpu"                   # Slurm partition (-p)
    account = "mylab"               # -A
    walltime = "04:00:00"
    cores = 16
    memory = "60GB"
    job_extra_directives = ["--constraint=skylake"]
    prologue = ["module load apptainer"]

Every key of a profile is one of :data:`COMMON_OPTIONS`, one of the kind's own :data:`KIND_OPTIONS`, ``kind``
or ``description``. Unknown keys, a walltime not written ``HH:MM:SS`` or a memory size dask cannot read raise
:class:`~mlmd_lab.errors.MLMDError` naming the file, the profile and the fix.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlmd_lab.errors import MLMDError
from mlmd_lab.files import atomic_write_text

#: Cluster kinds understood by :func:`mlmd_lab.cluster.cluster`.
KINDS: tuple[str, ...] = ("local", "pbs", "slurm", "sge", "pjm")

#: Environment variable naming the profiles file.
CONFIG_ENV = "MLMD_CLUSTER_CONFIG"

#: Options every kind accepts (``local`` accepts only those marked so in :data:`LOCAL_OPTIONS`), with their units.
COMMON_OPTIONS: dict[str, str] = {
    "cores": "int: CPU cores per job (local: cores used in total)",
    "processes": "int: dask worker processes per job (local: number of workers); threads per worker = cores/processes",
    "memory": 'str: memory per job, e.g. "4GB" or "500MiB" (local: in total), split evenly over the processes',
    "walltime": 'str: wall-clock limit per job, "HH:MM:SS" (hours may exceed 24)',
    "queue": "str: queue / partition / resource group (PBS -q, Slurm -p, SGE -q, PJM -L rscgrp=)",
    "account": "str: account / project / group charged (PBS -A, Slurm -A, SGE -P, PJM -g)",
    "prologue": "list[str]: shell lines run before the worker starts (module load, source, container setup)",
    "job_extra_directives": 'list[str]: extra scheduler directives without the prefix, e.g. ["--constraint=x"]',
    "job_directives_skip": "list[str]: generated directive lines containing any of these strings are left out",
    "job_name": 'str: scheduler job name (default "dask-worker")',
    "interface": 'str: network interface of scheduler and workers, e.g. "ib0", "eth0", "lo"',
    "local_directory": "str: worker scratch folder for spilled data (e.g. $TMPDIR or /scratch)",
    "log_directory": "str: folder for the jobs' stdout/stderr files",
    "python": "str: Python interpreter that runs the workers (default: the current one, sys.executable)",
    "death_timeout": "float: seconds a worker waits for an unreachable scheduler before exiting",
    "worker_extra_args": 'list[str]: extra dask-worker arguments, e.g. ["--lifetime", "55m"]',
    "scheduler_options": 'dict: options of the dask scheduler, e.g. {dashboard_address = ":0"}',
    "jobs": "int: jobs to submit right away (default 0; later: cluster.scale(jobs=N) or cluster.adapt())",
    "shebang": 'str: first line of the job script (default "#!/usr/bin/env bash")',
}

#: Options only some kinds accept.
KIND_OPTIONS: dict[str, dict[str, str]] = {
    "local": {
        "n_workers": "int: number of worker processes (same as processes)",
        "threads_per_worker": "int: threads per worker (default 1)",
        "dashboard_address": 'str: dashboard address, e.g. ":8787" or ":0" for a free port',
    },
    "pbs": {
        "resource_spec": 'str: the -l resource list, e.g. "select=1:ncpus=48:mem=180GB" (default from cores/memory)',
    },
    "sge": {
        "resource_spec": 'str: the -l resource list, e.g. "m_mem_free=4G" (site specific; none by default)',
    },
    "slurm": {
        "job_cpu": "int: --cpus-per-task to book (default: cores)",
        "job_mem": 'str: --mem to book in Slurm syntax, e.g. "16G" (default: memory)',
    },
    "pjm": {
        "nodes": "int: nodes per job (-L node=; default 1)",
        "mpi_procs": "int: MPI processes of the job (--mpi proc=), for tasks that launch mpiexec",
        "rscunit": 'str: resource unit (-L rscunit=), e.g. "rscunit_ft01" on Fugaku',
        "node_mem": 'str: memory per node in PJM syntax (-L node-mem=), e.g. "28Gi"',
    },
}

#: Options of the ``local`` kind (no job scheduler: the job-script options have no meaning there).
LOCAL_OPTIONS: frozenset[str] = frozenset(
    {"cores", "processes", "memory", "interface", "local_directory", "scheduler_options"}
    | set(KIND_OPTIONS["local"])
)

#: Keys a profile may hold besides options.
PROFILE_META_KEYS: frozenset[str] = frozenset({"kind", "description"})

_WALLTIME = re.compile(r"^(\d{1,5}):([0-5]\d):([0-5]\d)$")
_INT_KEYS = {"cores", "processes", "jobs", "n_workers", "threads_per_worker", "job_cpu", "nodes", "mpi_procs"}
_STR_KEYS = {
    "queue", "account", "job_name", "interface", "local_directory", "log_directory", "python",
    "shebang", "dashboard_address", "resource_spec", "job_mem", "rscunit", "node_mem",
}
_LIST_KEYS = {"prologue", "job_extra_directives", "job_directives_skip", "worker_extra_args"}


def known_options(kind: str) -> list[str]:
    """Sorted option names ``kind`` accepts."""
    kind = check_kind(kind)
    if kind == "local":
        return sorted(LOCAL_OPTIONS)
    return sorted(set(COMMON_OPTIONS) | set(KIND_OPTIONS.get(kind, {})))


def check_kind(kind: Any) -> str:
    """Return ``kind`` lower-cased, or raise MLMDError naming the kinds there are."""
    if not isinstance(kind, str) or kind.lower() not in KINDS:
        raise MLMDError(
            f"unknown cluster kind {kind!r}: use one of {', '.join(KINDS)} "
            "(or profile='NAME' for a profile from the clusters config file)"
        )
    return kind.lower()


def parse_walltime(value: Any) -> str:
    """Check a walltime written ``HH:MM:SS`` and return it; other forms raise MLMDError."""
    if not isinstance(value, str) or not _WALLTIME.match(value.strip()):
        raise MLMDError(
            f"walltime {value!r} is not HH:MM:SS: write e.g. walltime=\"01:30:00\" for 90 minutes "
            "(hours may exceed 24, e.g. \"48:00:00\")"
        )
    return value.strip()


def walltime_seconds(value: str) -> int:
    """Seconds in a ``HH:MM:SS`` walltime."""
    h, m, s = (int(x) for x in parse_walltime(value).split(":"))
    return 3600 * h + 60 * m + s


def parse_memory(value: Any, key: str = "memory") -> int:
    """Bytes in a memory size such as ``"4GB"`` or ``"500MiB"``; raises MLMDError when unreadable or not > 0."""
    from dask.utils import parse_bytes

    try:
        if isinstance(value, bool):
            raise ValueError
        n = parse_bytes(value) if isinstance(value, str) else int(value)
    except (ValueError, TypeError):
        raise MLMDError(
            f"{key} {value!r} is not a memory size: write it with a unit, e.g. {key}=\"4GB\" or \"500MiB\""
        ) from None
    if n <= 0:
        raise MLMDError(f"{key} {value!r} must be larger than 0: e.g. {key}=\"4GB\"")
    return int(n)


def validate_options(kind: str, options: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """Check option names and values for ``kind``; returns a normalised copy.

    ``where`` names the origin in messages (e.g. ``"profile 'x' in /path/clusters.toml"``). Raises MLMDError for
    unknown keys (listing the known ones), bad types, a walltime not ``HH:MM:SS`` or an unreadable memory size.
    """
    kind = check_kind(kind)
    origin = f" ({where})" if where else ""
    allowed = set(known_options(kind))
    unknown = sorted(set(options) - allowed)
    if unknown:
        hint = ""
        if kind == "local":
            job_only = [k for k in unknown if k in COMMON_OPTIONS or any(k in o for o in KIND_OPTIONS.values())]
            if job_only:
                hint = f"; {', '.join(job_only)} only apply to batch-scheduler kinds (pbs, slurm, sge, pjm)"
        raise MLMDError(
            f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} for cluster kind "
            f"{kind!r}{origin}: known options are {', '.join(sorted(allowed))}{hint}"
        )
    out: dict[str, Any] = {}
    for key, value in options.items():
        if value is None:
            continue
        if key == "walltime":
            try:
                value = parse_walltime(value)
            except MLMDError as err:
                raise MLMDError(f"{err}{origin}") from None
        elif key == "memory":
            try:
                parse_memory(value)
            except MLMDError as err:
                raise MLMDError(f"{err}{origin}") from None
            if not isinstance(value, str):
                raise MLMDError(f"memory={value!r}{origin} needs a unit: write e.g. memory=\"4GB\"")
        elif key in _INT_KEYS:
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "jobs" else 1):
                raise MLMDError(
                    f"option {key}={value!r}{origin} must be a whole number >= {0 if key == 'jobs' else 1}"
                )
        elif key in _STR_KEYS:
            if not isinstance(value, str) or not value.strip():
                raise MLMDError(f"option {key}={value!r}{origin} must be a non-empty string")
        elif key in _LIST_KEYS:
            if isinstance(value, str):
                value = [line for line in value.splitlines() if line.strip()] if key == "prologue" else [value]
            if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                raise MLMDError(f"option {key}={value!r}{origin} must be a list of strings")
            value = list(value)
        elif key == "scheduler_options":
            if not isinstance(value, Mapping):
                raise MLMDError(f"option scheduler_options={value!r}{origin} must be a table / dict")
            value = dict(value)
        elif key == "death_timeout":
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise MLMDError(f"option death_timeout={value!r}{origin} must be a number of seconds > 0")
        out[key] = value
    cores, processes = out.get("cores"), out.get("processes", out.get("n_workers"))
    if cores is not None and processes is not None and processes > cores:
        raise MLMDError(
            f"processes={processes} exceeds cores={cores}{origin}: each worker process needs at least one core; "
            "lower processes or raise cores"
        )
    return out


# --------------------------------------------------------------------------------------------------- the file


def config_path() -> Path:
    """Path of the profiles file: ``$MLMD_CLUSTER_CONFIG`` or ``<user config dir>/mlmd_lab/clusters.toml``."""
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env).expanduser()
    from platformdirs import user_config_dir

    return Path(user_config_dir("mlmd_lab", appauthor=False)) / "clusters.toml"


def load_profiles(path: str | os.PathLike | None = None) -> dict[str, dict[str, Any]]:
    """All profiles in the file (default :func:`config_path`) as ``{name: {kind, description?, options...}}``.

    A missing file gives ``{}``. Every profile is validated (:func:`validate_options`); a profile without
    ``kind`` is ``local``.
    """
    file = Path(path).expanduser() if path is not None else config_path()
    if not file.exists():
        if path is not None:
            raise MLMDError(f"{file}: cluster profiles file not found (create it, see mlmd_lab.cluster.profiles)")
        return {}
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise MLMDError(f"{file}: not valid TOML ({err}); fix the line named or move the file away") from None
    extra_top = sorted(set(data) - {"profiles"})
    if extra_top:
        raise MLMDError(
            f"{file}: unknown top-level key(s) {', '.join(extra_top)}: put each profile under [profiles.NAME]"
        )
    profiles = data.get("profiles", {})
    if not isinstance(profiles, dict):
        raise MLMDError(f"{file}: 'profiles' must be a table: write [profiles.NAME] sections")
    out: dict[str, dict[str, Any]] = {}
    for name, table in profiles.items():
        where = f"profile {name!r} in {file}"
        if not isinstance(table, dict):
            raise MLMDError(f"{where} must be a table: write [profiles.{name}] followed by key = value lines")
        kind = table.get("kind", "local")
        try:
            kind = check_kind(kind)
        except MLMDError as err:
            raise MLMDError(f"{err} ({where})") from None
        options = {k: v for k, v in table.items() if k not in PROFILE_META_KEYS}
        entry: dict[str, Any] = {"kind": kind}
        if "description" in table:
            entry["description"] = str(table["description"])
        entry.update(validate_options(kind, options, where=where))
        out[name] = entry
    return out


def profile(name: str, path: str | os.PathLike | None = None) -> dict[str, Any]:
    """One profile by name (a copy): ``{"kind": ..., "description"?: ..., option: value, ...}``."""
    profiles = load_profiles(path)
    if name not in profiles:
        file = Path(path).expanduser() if path is not None else config_path()
        have = ", ".join(sorted(profiles)) or "none"
        raise MLMDError(
            f"no cluster profile {name!r} in {file} (profiles there: {have}); add a [profiles.{name}] table "
            f"or set ${CONFIG_ENV} to the file that has it"
        )
    return dict(profiles[name])


def save_profile(name: str, kind: str, path: str | os.PathLike | None = None, **options: Any) -> Path:
    """Add or replace profile ``name`` in the file (created if missing); returns the file's path.

    The whole file is rewritten from its parsed content, so comments in it are lost. Options are validated
    first; ``description=`` is kept as is.
    """
    if not re.match(r"^[A-Za-z0-9_-]+$", name or ""):
        raise MLMDError(f"profile name {name!r} must use only letters, digits, '-' and '_'")
    kind = check_kind(kind)
    description = options.pop("description", None)
    checked = validate_options(kind, options, where=f"profile {name!r}")
    file = Path(path).expanduser() if path is not None else config_path()
    profiles = load_profiles(file) if file.exists() else {}
    entry: dict[str, Any] = {"kind": kind}
    if description is not None:
        entry["description"] = str(description)
    entry.update(checked)
    profiles[name] = entry
    return atomic_write_text(file, _dump_profiles(profiles))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
        return f'"{escaped}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise MLMDError(f"cannot write {value!r} to TOML: use strings, numbers, booleans, lists or tables")


def _toml_key(key: str) -> str:
    return key if re.match(r"^[A-Za-z0-9_-]+$", key) else _toml_value(str(key))


def _dump_profiles(profiles: Mapping[str, Mapping[str, Any]]) -> str:
    lines = ["# mlmd_lab cluster profiles (see mlmd_lab.cluster.profiles); written by save_profile()", ""]
    for name, entry in profiles.items():
        lines.append(f"[profiles.{_toml_key(name)}]")
        for key, value in entry.items():
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)
