"""The Jupyter stack itself, in a real browser: the pinned front ends load and round-trip with the kernel.

These guard the working set (../shared/guides/browser-testing.md): headless notebook execution never loads a
front end, so a broken widget package (nglview 4.0.1: "Module nglview-js-widgets, version 4.0 is not registered")
only shows here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import drawn_colours


def test_labextensions_installed():
    """The front ends ship inside the pip packages (no Node build): JupyterLab lists them as enabled and OK."""
    out = subprocess.run([sys.executable, "-m", "jupyter", "labextension", "list"], capture_output=True, text=True,
                         timeout=120)
    text = out.stdout + out.stderr
    for name in ("@jupyter-widgets/jupyterlab-manager", "nglview-js-widgets v3.1.4", "bqplot", "dask-labextension",
                 "@jupyterhub/jupyter-server-proxy"):
        assert name in text, f"{name} missing from `jupyter labextension list`:\n{text}"


def test_overrides_turn_off_windowing():
    """Notebook windowing off (cells off screen stay in the DOM) and no news pop-ups."""
    from conftest import ROOT

    overrides = json.loads((ROOT / "mlmd_lab" / "jupyter" / "overrides.json").read_text())
    assert overrides["@jupyterlab/notebook-extension:tracker"]["windowingMode"] == "none"


@pytest.mark.slow
def test_button_click_reaches_python_and_nglview_renders(run_notebook):
    nb = run_notebook([
        "import ipywidgets as w\n"
        "out = w.Label('not clicked'); out.add_class('probe-out')\n"
        "b = w.Button(description='probe'); b.add_class('probe-button')\n"
        "def on_click(_):\n"
        "    out.value = f'clicked, 6*7={6*7}'\n"
        "b.on_click(on_click)\n"
        "w.VBox([b, out])",
        "import nglview\nfrom ase.build import molecule\n"
        "view = nglview.show_ase(molecule('CH3CH2OH')); view.add_class('probe-ngl'); view",
    ])
    page = nb.page
    page.locator(".probe-button").click()
    page.locator(".probe-out", has_text="clicked, 6*7=42").wait_for(timeout=20_000)
    canvas = page.locator(".probe-ngl canvas").first
    canvas.wait_for(timeout=30_000)
    assert drawn_colours(canvas) > 10, "nglview canvas is blank"
    nb.screenshot("probe")
    nb.assert_no_console_errors()


@pytest.mark.slow
def test_a_failing_cell_fails_run_all_at_once_with_its_traceback(run_notebook):
    """JupyterLab leaves the cells after an error unrun; the runner must report the error, not wait for them
    (CI once waited 40 minutes for cells that would never run)."""
    with pytest.raises(AssertionError, match="ValueError: bad input for the probe"):
        run_notebook(["x = 6 * 7", "raise ValueError('bad input for the probe')", "y = x + 1"], timeout=60)


@pytest.mark.slow
def test_dask_dashboard_through_server_proxy(lab):
    """On JupyterHub the dashboard is only reachable through jupyter-server-proxy: <base>/proxy/<port>/status must
    serve dask's dashboard, and binder/jupyter_server_config.py's "dask" entry must be registered."""
    import urllib.request

    from distributed import LocalCluster

    from mlmd_lab.jupyter import dashboard_link

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address="127.0.0.1:0") as cluster:
        port = cluster.scheduler.http_server.port
        url = f"{lab['url']}/proxy/{port}/status?token={lab['token']}"
        with urllib.request.urlopen(url, timeout=30) as response:
            body = response.read().decode()
        assert response.status == 200 and "Dask" in body, body[:500]
    with urllib.request.urlopen(f"{lab['url']}/server-proxy/servers-info?token={lab['token']}", timeout=10) as r:
        servers = json.load(r)["server_processes"]
    assert any(s["name"] == "dask" for s in servers), servers
    assert dashboard_link({"JUPYTERHUB_SERVICE_PREFIX": "/user/alice/"}) == "/user/alice/proxy/{port}/status"
    assert dashboard_link({}) == "{scheme}://{host}:{port}/status"


def test_binder_start_keeps_the_database_running(tmp_path):
    """binder/start starts the embedded server, then runs the command it is given (here: a query)."""
    from conftest import ROOT

    env = {**os.environ, "MLMD_DATA_DIR": str(tmp_path / "data"), "PATH": f"{Path(sys.executable).parent}:"
           + os.environ.get("PATH", "")}
    env.pop("MLMD_MONGODB_URI", None)
    probe = "import mlmd_lab, os; db = mlmd_lab.connect(); print('frames', db.count()); print(os.environ[" \
            "'DASK_DISTRIBUTED__DASHBOARD__LINK'])"
    try:
        out = subprocess.run(["bash", str(ROOT / "binder" / "start"), sys.executable, "-c", probe], env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "frames 0" in out.stdout and "proxy/{port}/status" in out.stdout, out.stdout
    finally:
        subprocess.run([sys.executable, "-m", "mlmd_lab.cli", "server", "stop"], env=env, capture_output=True,
                       timeout=60)


def test_clusters_under_jupyterhub_link_the_dashboard_through_the_proxy(monkeypatch):
    import dask
    from distributed import Client, LocalCluster

    from mlmd_lab.jupyter import configure_dask_dashboard

    monkeypatch.setenv("JUPYTERHUB_SERVICE_PREFIX", "/user/alice/")
    monkeypatch.delenv("DASK_DISTRIBUTED__DASHBOARD__LINK", raising=False)
    with dask.config.set({"distributed.dashboard.link": "{scheme}://{host}:{port}/status"}):
        assert configure_dask_dashboard() == "/user/alice/proxy/{port}/status"
        with LocalCluster(n_workers=1, processes=False, dashboard_address="127.0.0.1:0") as cluster, \
                Client(cluster) as client:
            port = cluster.scheduler.http_server.port
            assert client.dashboard_link == f"/user/alice/proxy/{port}/status"
        monkeypatch.setenv("DASK_DISTRIBUTED__DASHBOARD__LINK", "https://example.org/{port}")  # the user's wins
        assert configure_dask_dashboard() == "/user/alice/proxy/{port}/status"  # unchanged by us


def test_configure_dask_dashboard_in_a_fresh_interpreter():
    """Before anything imported distributed its config keys do not exist; configuring must still work."""
    code = ("from mlmd_lab.jupyter import configure_dask_dashboard; print(configure_dask_dashboard()); "
            "import os; os.environ['JUPYTERHUB_SERVICE_PREFIX'] = '/user/bob/'; print(configure_dask_dashboard())")
    env = {k: v for k, v in os.environ.items() if k not in ("JUPYTERHUB_SERVICE_PREFIX",
                                                             "DASK_DISTRIBUTED__DASHBOARD__LINK")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["{scheme}://{host}:{port}/status", "/user/bob/proxy/{port}/status"]
