"""The quickstart notebook in a real browser: every widget of the loop renders and works together.

Headless execution (tests/test_notebooks.py) checks the code and the 5-minute budget; this runs the same notebook
in JupyterLab + Chromium, where front ends load: the canvases must not be blank and the console must stay clean.
"""

from __future__ import annotations

import json

import pytest
from conftest import ROOT, distinct_colours

from mlmd_lab.quickstart import QuickstartSettings


def test_quickstart_settings_are_explicit():
    s = QuickstartSettings()
    assert s.timestep_fs * s.frame_interval == pytest.approx(1.0)  # 1 fs frames: Nyquist far above O-H stretches
    assert s.max_epochs > 0 and s.n_structures >= 50


@pytest.mark.slow
def test_quickstart_notebook_in_the_browser(run_notebook):
    cells = json.loads((ROOT / "notebooks" / "00_quickstart.ipynb").read_text())["cells"]
    code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    nb = run_notebook(code, name="quickstart", timeout=600)
    page = nb.page
    status = page.locator(".mlmd-training-status").inner_text()
    assert "finished" in status or "converged" in status, status
    assert page.locator(".mlmd-training-parity").count() == 1
    # the molecule (cell 2) and both MD viewers; the database browser's view stays empty until a row is picked
    canvases = [page.locator(".mlmd-structure canvas").first, page.locator(".mlmd-md-view canvas").nth(0),
                page.locator(".mlmd-md-view canvas").nth(1)]
    for i, canvas in enumerate(canvases):
        canvas.scroll_into_view_if_needed()
        page.wait_for_timeout(1000)
        assert distinct_colours(canvas) > 10, f"nglview canvas {i} is blank"
    assert page.locator(".jp-RenderedImage img").count() >= 1  # the VDOS figure rendered inline (not a repr)
    for hook in ("mlmd-db-browser", "mlmd-training", "mlmd-model-browser", "mlmd-md"):
        widget = page.locator(f".{hook}").first
        widget.scroll_into_view_if_needed()
        nb.screenshot(hook, widget)
    text = "\n".join(page.locator(".jp-OutputArea").all_inner_texts())  # outputs only, not the code
    assert "FAIL" not in text and text.count("PASS") == 4, text[-2000:]
    nb.assert_no_console_errors()
