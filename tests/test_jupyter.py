"""The Jupyter stack itself, in a real browser: the pinned front ends load and round-trip with the kernel.

These guard the working set (../shared/guides/browser-testing.md): headless notebook execution never loads a
front end, so a broken widget package (nglview 4.0.1: "Module nglview-js-widgets, version 4.0 is not registered")
only shows here.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import distinct_colours


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
    page.wait_for_timeout(2000)  # first frame drawn
    assert distinct_colours(canvas) > 10, "nglview canvas is blank"
    nb.screenshot("probe")
    nb.assert_no_console_errors()
