"""mlmd_lab.jaxconfig: float64 on, and a persistent compilation cache in a folder per host CPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mlmd_lab import jaxconfig


def test_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MLMD_JAX_CACHE", str(tmp_path / "cache"))
    assert jaxconfig.cache_folder() == tmp_path / "cache" / jaxconfig.host_tag()
    for off in ("off", "0", "none", ""):
        monkeypatch.setenv("MLMD_JAX_CACHE", off)
        assert jaxconfig.cache_folder() is None
    monkeypatch.delenv("MLMD_JAX_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert jaxconfig.cache_folder() == tmp_path / "xdg" / "mlmd_lab" / "jax" / jaxconfig.host_tag()


def test_host_tag_is_stable_and_names_the_machine():
    tag = jaxconfig.host_tag()
    assert tag == jaxconfig.host_tag() and tag.startswith(os.uname().machine + "-")


_PROGRAM = """
import jax, jax.numpy as jnp
import mlmd_lab.potentials  # applies mlmd_lab's JAX settings
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # cache even this small program
f = jax.jit(lambda x: jnp.sum(jnp.sin(x) ** 2 * jnp.exp(-x)))
print(jax.config.jax_enable_x64, jax.config.jax_compilation_cache_dir, repr(float(f(jnp.arange(5.0)))))
"""


def _run(env):
    out = subprocess.run([sys.executable, "-c", _PROGRAM], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_a_second_process_loads_what_the_first_compiled(tmp_path):
    env = {**os.environ, "MLMD_JAX_CACHE": str(tmp_path / "cache")}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    x64, folder, value = _run(env)
    assert x64 == "True" and folder.startswith(str(tmp_path / "cache"))

    def entries():
        # the programs (``*-cache``); with a size limit JAX also keeps ``*-atime`` files, touched on every use
        return {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*-cache") if p.is_file()}

    written = entries()
    assert written, "nothing was written to the compilation cache"
    assert _run(env)[2] == value  # the same number from the cached program
    assert entries() == written  # loaded, not compiled and written again
    off = {**env, "MLMD_JAX_CACHE": "off"}
    assert _run(off)[1] == "None"


def test_cpu_device_count_follows_the_environment(monkeypatch):
    monkeypatch.setenv("MLMD_CPU_DEVICES", "3")
    assert jaxconfig.cpu_device_count() == 3
    monkeypatch.setenv("MLMD_CPU_DEVICES", "0")
    assert jaxconfig.cpu_device_count() == 1
    monkeypatch.delenv("MLMD_CPU_DEVICES")
    assert 1 <= jaxconfig.cpu_device_count() <= min(len(os.sched_getaffinity(0)), jaxconfig.MAX_CPU_DEVICES)
    monkeypatch.setenv("MLMD_CPU_DEVICES", "two")
    with pytest.raises(ValueError, match="MLMD_CPU_DEVICES.*whole number"):
        jaxconfig.cpu_device_count()


def test_one_cpu_device_per_core_in_a_fresh_process():
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "MLMD_CPU_DEVICES")}
    env["JAX_PLATFORMS"] = "cpu"
    program = "import mlmd_lab.potentials, jax, os; print(jax.local_device_count('cpu'), len(os.sched_getaffinity(0)))"
    out = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    devices, cores = map(int, out.stdout.split())
    assert devices == min(cores, 16)


_POOL_PROGRAM = """
import os
import mlmd_lab.potentials, jax
jax.devices()
names = [open(f"/proc/self/task/{t}/comm").read() for t in os.listdir("/proc/self/task")]
print(jax.local_device_count("cpu"), sum("XLAEigen" in n for n in names), os.environ.get("PJRT_NPROC"))
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2 or not os.path.isdir("/proc/self/task"),
                    reason="needs 2 cores (the pool follows the cores) and Linux's /proc thread names")
@pytest.mark.parametrize(("devices", "user_nproc", "pool"), [("1", None, 1), ("1", "2", 2), ("2", None, 2)])
def test_one_device_gets_one_xla_helper_thread(devices, user_nproc, pool):
    """One CPU device on several cores: XLA's thread pool (its threads are named *XLAEigen*) has one thread; a
    PJRT_NPROC the user set wins; several devices keep a pool as large as the device count (XLA's own floor)."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PJRT_NPROC")}
    env.update(JAX_PLATFORMS="cpu", MLMD_CPU_DEVICES=devices, MLMD_JAX_CACHE="off")
    if user_nproc:
        env["PJRT_NPROC"] = user_nproc
    out = subprocess.run([sys.executable, "-c", _POOL_PROGRAM], env=env, capture_output=True, text=True, timeout=300,
                         preexec_fn=lambda: os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:2])))
    assert out.returncode == 0, out.stderr
    count, threads, nproc = out.stdout.split()
    assert (int(count), int(threads)) == (int(devices), pool)
    assert nproc == (user_nproc or ("1" if devices == "1" else "None"))
