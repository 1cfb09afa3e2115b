"""JupyterLab integration: settings overrides, the dask dashboard behind jupyter-server-proxy, and ``mlmd-lab lab``.

- :func:`install_overrides` writes JupyterLab's ``overrides.json`` (no news or update pop-ups; notebook windowing
  off, so widgets in cells scrolled out of view stay alive — nglview's WebGL canvas otherwise goes blank).
- :func:`dashboard_link` is the dask dashboard address template: behind JupyterHub the dashboard port is not
  reachable from the user's browser, so it goes through jupyter-server-proxy (``{prefix}proxy/{port}/status``).
- :func:`launch_lab` starts the embedded database (unless a URI is given) and JupyterLab on the tutorials.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from mlmd_lab.files import atomic_write_text

OVERRIDES = Path(__file__).with_name("overrides.json")


def install_overrides(prefix: str | os.PathLike = sys.prefix) -> Path:
    """Merge mlmd_lab's JupyterLab settings into ``<prefix>/share/jupyter/lab/settings/overrides.json``.

    Settings other packages put there are kept; ours win for the keys we set. Returns the file's path.
    """
    target = Path(prefix) / "share" / "jupyter" / "lab" / "settings" / "overrides.json"
    current = {}
    if target.exists():
        try:
            current = json.loads(target.read_text())
        except json.JSONDecodeError:
            current = {}
    for plugin, values in json.loads(OVERRIDES.read_text()).items():
        current.setdefault(plugin, {}).update(values)
    return atomic_write_text(target, json.dumps(current, indent=2) + "\n")


def dashboard_link(environ: dict[str, str] | None = None) -> str:
    """The ``distributed.dashboard.link`` template for this session.

    Under JupyterHub (``JUPYTERHUB_SERVICE_PREFIX`` set, e.g. ``/user/alice/``) the dashboard is proxied by
    jupyter-server-proxy: ``/user/alice/proxy/{port}/status``; elsewhere dask's own ``{scheme}://{host}:{port}/status``.
    """
    environ = os.environ if environ is None else environ
    prefix = environ.get("JUPYTERHUB_SERVICE_PREFIX")
    if prefix:
        return prefix.rstrip("/") + "/proxy/{port}/status"
    return "{scheme}://{host}:{port}/status"


def configure_dask_dashboard() -> str:
    """Under JupyterHub set ``distributed.dashboard.link`` to :func:`dashboard_link` (unless the user configured a
    link in the environment); returns the link template in force."""
    import dask
    import distributed  # noqa: F401 - registers the distributed.* defaults this reads and sets

    if "DASK_DISTRIBUTED__DASHBOARD__LINK" in os.environ or "JUPYTERHUB_SERVICE_PREFIX" not in os.environ:
        return str(dask.config.get("distributed.dashboard.link"))
    link = dashboard_link()
    dask.config.set({"distributed.dashboard.link": link})
    return link


def default_notebooks() -> Path:
    """The source tree's ``notebooks/`` (an editable or source install), else the current folder."""
    here = Path(__file__).resolve().parents[2] / "notebooks"
    return here if here.is_dir() else Path.cwd()


def launch_lab(notebooks: str | os.PathLike | None = None, port: int = 8888, ip: str = "127.0.0.1",
               open_browser: bool = True, uri: str | None = None, data_dir: str | os.PathLike | None = None) -> int:
    """Start the embedded database (kept running for the kernels; ``uri``/``$MLMD_MONGODB_URI`` skip it), install the
    overrides and run JupyterLab on ``notebooks`` until it is stopped. Returns JupyterLab's exit status."""
    from mlmd_lab.db.server import EmbeddedServer

    folder = Path(notebooks) if notebooks else default_notebooks()
    if not folder.is_dir():
        print(f"mlmd-lab lab: {folder} is not a folder; pass --notebooks DIR", file=sys.stderr)
        return 2
    env = dict(os.environ)
    uri = uri or env.get("MLMD_MONGODB_URI")
    if uri:
        env["MLMD_MONGODB_URI"] = uri
    else:
        # This process holds a lease while JupyterLab runs; the server stops after it when no kernel uses it.
        info = EmbeddedServer(data_dir).ensure_running()
        print(f"mlmd-lab lab: embedded database at {info.uri}")
    install_overrides()
    cmd = [sys.executable, "-m", "jupyterlab", f"--ServerApp.root_dir={folder}", f"--ip={ip}", f"--port={port}"]
    if not open_browser:
        cmd.append("--no-browser")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    try:
        return subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        return 0
