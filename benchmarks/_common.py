"""Helpers shared by the benchmark scripts: machine info, medians, tables, JSON results."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine_info() -> dict[str, Any]:
    """CPU count, load, platform and the versions that matter for these numbers."""

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    for dist in ("ase", "pymongo", "numpy", "secantusdb", "mlmd_lab"):
        info[dist] = version(dist)
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    return info


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """``(seconds, result)`` of one call."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if value == 0:
            return "0"
        a = abs(value)
        if a >= 1000:
            return f"{value:,.0f}"
        if a >= 10:
            return f"{value:.1f}"
        if a >= 0.01:
            return f"{value:.3f}"
        return f"{value:.2e}"
    return str(value)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> str:
    """Print (and return) a plain-text table; the first column is left-aligned, the others right-aligned."""
    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths,
                                                                                               strict=True)))

    out = [title] if title else []
    out += [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    text = "\n".join(out)
    print(text, flush=True)
    return text


def write_json(name: str, data: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/<name>.json`` and return its path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def shutdown(*dbs: Any) -> None:
    """Close mlmd_lab databases and stop the embedded server they started.

    Each ``connect()`` registers a client lease and an ``atexit`` release; releasing here (before a temporary
    data folder is deleted) stops the server once no lease is left and keeps the atexit hook from touching
    the deleted folder again. ``stop()`` then makes sure the server is down even if another lease remained.
    """
    for db in dbs:
        if db is None:
            continue
        db.close()
        if db.server is not None:
            db.server.release()
    for db in dbs:
        if db is not None and db.server is not None:
            db.server.stop()


def gpu_available() -> bool:
    """True when JAX (in a fresh process, so this one's platform choice is untouched) sees a GPU."""
    probe = "import jax, sys; sys.exit(0 if any(d.platform == 'gpu' for d in jax.devices()) else 1)"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


def run_json_worker(cmd: Sequence[str], label: str, env: dict[str, str | None] | None = None) -> dict[str, Any] | None:
    """Run a benchmark worker process (``env``: variables set for it on top of this process's environment, None
    removes one); its last stdout line is its JSON result (None, reported, on failure)."""
    merged = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    proc = subprocess.run(list(cmd), capture_output=True, text=True, env=merged)
    if proc.returncode != 0:
        print(f"[{label}] failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


#: n2p2's own predictor (../shared/tools/README.md); the n2p2 reference of the HDNNP and MD benchmarks.
NNP_PREDICT = Path(os.environ.get("MLMD_NNP_PREDICT")
                   or Path(__file__).resolve().parents[1] / ".." / "shared" / "tools" / "n2p2" / "nnp-predict")


def n2p2_predict_cost(potential: Path, repeats: int = 5) -> dict[str, Any] | None:
    """n2p2's whole ``nnp-predict`` process (reading, set-up, neighbour list, energy and forces) on the structure in
    ``potential``/input.data, pinned to one core: median wall time and CPU time (user + system) per atom, in µs.
    None (reported) where the program is absent."""
    import resource
    import shutil
    import tempfile

    if not NNP_PREDICT.exists():
        print(f"n2p2: not measured (no nnp-predict at {NNP_PREDICT}; see ../shared/tools/README.md)")
        return None
    core = {sorted(os.sched_getaffinity(0))[0]}
    walls, cpus = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for path in potential.iterdir():
            if path.name in ("input.nn", "scaling.data", "input.data") or path.name.startswith("weights."):
                shutil.copy(path, tmp)
        n_atoms = sum(1 for line in (Path(tmp) / "input.data").read_text().splitlines()
                      if line.startswith("atom") and not line.startswith("atoms"))
        for _ in range(repeats):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            subprocess.run([str(NNP_PREDICT), "0"], cwd=tmp, check=True, capture_output=True,
                           preexec_fn=lambda: os.sched_setaffinity(0, core))
            walls.append(time.perf_counter() - t0)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return {"program": str(NNP_PREDICT.name), "atoms": n_atoms, "repeats": repeats,
            "wall_us_per_atom": statistics.median(walls) / n_atoms * 1e6,
            "cpu_us_per_atom": statistics.median(cpus) / n_atoms * 1e6}
