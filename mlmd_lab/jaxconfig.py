"""JAX settings every mlmd_lab computation relies on, applied once when mlmd_lab.potentials is imported.

- float64 is enabled (``jax_enable_x64``): exact paths (n2p2 agreement, NVE conservation, SLHMC) need it;
  float32 stays available per model (``HDNNP.with_dtype``).
- A persistent compilation cache: compiling a potential's energy/forces (and an MD block around it) takes
  5–25 s on a CPU, often longer than the run itself. XLA's compiled programs are kept on disk and reused by
  every later process that compiles the same program (same potential, same neighbour layout, same JAX
  version and device), e.g. the next MD run of the same model in a notebook. JAX's own cache is used (it keys
  entries on the program, compile options, JAX/XLA version and device); mlmd_lab only picks the folder and
  puts the host CPU's model and instruction-set flags into its name, so a home folder shared between a login
  node and compute nodes of another CPU generation never loads code compiled for the wrong CPU. At most
  :data:`MAX_CACHE_BYTES` are kept (least recently used programs go first).
- One JAX CPU device per usable core (``--xla_force_host_platform_device_count``), set before JAX starts its
  backend: the descriptor loops (:mod:`mlmd_lab.potentials.descriptors`) split their chunks over these devices,
  which run concurrently; XLA runs such loops on one thread otherwise. Computations still run on the first
  device unless they split themselves. Too late when JAX computed something before mlmd_lab was imported (one
  device then, and the loops run serially).
- With one CPU device on several cores (``MLMD_CPU_DEVICES=1``, e.g. each worker of the test suite), XLA's pool
  of helper threads is cut to one (``PJRT_NPROC=1``, read by XLA's CPU client when it starts). Why: XLA sizes
  that pool by the cores and runs independent kernels of a loop body on it concurrently; for the descriptor
  loops' small chunk kernels the hand-offs cost more than they gain. Measured on a 2-core machine, one device,
  NVE MD of the 1,080-atom water with n2p2's H2O potential in float64: 350 µs/atom-step with the pool of two
  threads (using ~1.4 cores in the force call), 285 with one (``benchmarks/bench_md.py --one-device``); the
  largest angular block alone 33 ms against 15 ms. XLA makes the pool at least as large as the device count, so
  several devices are not affected. A ``PJRT_NPROC`` the user set wins; being an environment variable, it is
  inherited by processes started from this one.

Environment:
    MLMD_CPU_DEVICES: how many JAX CPU devices to make (default: the cores this process may use, at most
        :data:`MAX_CPU_DEVICES`); ``1`` keeps JAX's single CPU device. A device count already in ``XLA_FLAGS`` wins.
    PJRT_NPROC: XLA's CPU thread-pool size (XLA's own variable); mlmd_lab sets 1 with one CPU device on several
        cores unless it is set.
    MLMD_JAX_CACHE: the cache folder; ``off`` (or ``0``, ``none``, empty) disables the cache. Default
        ``$XDG_CACHE_HOME/mlmd_lab/jax`` (``~/.cache/mlmd_lab/jax``). A ``JAX_COMPILATION_CACHE_DIR`` the user set
        takes precedence (mlmd_lab then leaves the cache settings alone).
"""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

import jax

#: Only programs whose compilation took at least this long are written (s); small ones compile faster than
#: they load.
MIN_COMPILE_SECONDS = 1.0
#: The cache's size limit (bytes); JAX evicts the least recently used programs beyond it.
MAX_CACHE_BYTES = 2 * 1024**3
_OFF = {"", "0", "off", "none", "false", "no"}
#: At most this many CPU devices by default (more shards than this gain little per step and cost compile time).
MAX_CPU_DEVICES = 16


def cpu_device_count() -> int:
    """The JAX CPU device count mlmd_lab asks for (see the module docstring)."""
    value = os.environ.get("MLMD_CPU_DEVICES", "").strip()
    if value:
        try:
            return max(1, int(value))
        except ValueError:
            raise ValueError(f"MLMD_CPU_DEVICES must be a whole number of devices, got {value!r}") from None
    return max(1, min(MAX_CPU_DEVICES, len(os.sched_getaffinity(0))))


def _ask_for_cpu_devices() -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    count = cpu_device_count()
    try:
        from jax._src import xla_bridge

        started = xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):  # a JAX without this (private) query: leave its devices alone
        return
    if started or "xla_force_host_platform_device_count" in flags:
        return
    if count > 1:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    elif "PJRT_NPROC" not in os.environ:
        os.environ["PJRT_NPROC"] = "1"  # one device: one helper thread (see the module docstring)


def host_tag() -> str:
    """A short tag of this host's CPU (machine type, model name and instruction-set flags)."""
    parts = [platform.machine()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features", "CPU part"):
                    parts.append(line.strip())
                if line.strip() == "":  # the first processor's block is enough
                    break
    except OSError:
        parts.append(platform.processor())
    return f"{platform.machine()}-{hashlib.sha256(chr(10).join(parts).encode()).hexdigest()[:12]}"


def cache_folder() -> Path | None:
    """The persistent compilation cache folder mlmd_lab uses, or None when disabled (see the module docstring)."""
    value = os.environ.get("MLMD_JAX_CACHE")
    if value is not None and value.strip().lower() in _OFF:
        return None
    if value:
        base = Path(value).expanduser()
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlmd_lab" / "jax"
    return base / host_tag()


def configure() -> Path | None:
    """Apply mlmd_lab's JAX settings (idempotent). Returns the compilation cache folder in use, or None."""
    _ask_for_cpu_devices()
    jax.config.update("jax_enable_x64", True)
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
    folder = cache_folder()
    if folder is None:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home: run without the cache rather than fail
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_compilation_cache_max_size", MAX_CACHE_BYTES)
    return folder
