"""mlmd_lab.jaxconfig: float64 on, and a persistent compilation cache in a folder per host CPU."""

from __future__ import annotations

import os
import subprocess
import sys

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
