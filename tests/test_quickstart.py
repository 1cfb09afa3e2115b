"""The quickstart notebook in a real browser: every widget of the loop renders and works together.

This is the one run of the quickstart notebook in the suite: as shipped, in JupyterLab + Chromium, where front
ends load. Every cell must succeed, its final ``assert result.passed`` (the physics checks) included; the canvases
must not be blank and the console must stay clean. (tests/test_notebooks.py executes the other notebooks headless
and leaves this one to this test: running the loop twice cost ~6 minutes of the suite.) The 5-minute budget is
measured by benchmarks/bench_quickstart.py, not asserted here.
"""

from __future__ import annotations

import json

import pytest
from conftest import ROOT, drawn_colours

from mlmd_lab.quickstart import QuickstartSettings


def browser_cells() -> list[str]:
    """The quickstart notebook's code cells, as shipped (default settings, the final physics assertion kept)."""
    cells = json.loads((ROOT / "notebooks" / "00_quickstart.ipynb").read_text())["cells"]
    code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    assert sum("qs.QuickstartSettings()" in c for c in code) == 1, "the notebook's settings line moved"
    assert code[-1].rstrip().splitlines()[-1].startswith("assert result.passed"), "the notebook's last line moved"
    return code


def test_quickstart_settings_are_explicit():
    s = QuickstartSettings()
    assert s.timestep_fs * s.frame_interval == pytest.approx(1.0)  # 1 fs frames: Nyquist far above O-H stretches
    assert s.max_epochs > 0 and s.n_structures >= 50


def test_browser_cells_are_the_notebook_as_shipped():
    code = browser_cells()
    assert "qs.QuickstartSettings()" in "".join(code)
    assert "assert result.passed" in code[-1] and "write_report" in code[-1]


@pytest.mark.slow
@pytest.mark.timeout(2400)  # hang guard for a slow machine, not a timing assertion
def test_quickstart_notebook_in_the_browser(run_notebook):
    nb = run_notebook(browser_cells(), name="quickstart", timeout=600)  # a cell error (the assertion too) fails
    page = nb.page
    status = page.locator(".mlmd-training-status").inner_text()
    assert "finished" in status or "converged" in status, status
    assert page.locator(".mlmd-training-parity").count() == 1
    # the molecule (cell 2) and both MD viewers; the database browser's view stays empty until a row is picked
    canvases = [page.locator(".mlmd-structure canvas").first, page.locator(".mlmd-md-view canvas").nth(0),
                page.locator(".mlmd-md-view canvas").nth(1)]
    for i, canvas in enumerate(canvases):
        canvas.scroll_into_view_if_needed()
        assert drawn_colours(canvas) > 10, f"nglview canvas {i} is blank"
    assert page.locator(".jp-RenderedImage img").count() >= 1  # the VDOS figure rendered inline (not a repr)
    for hook in ("mlmd-db-browser", "mlmd-training", "mlmd-model-browser", "mlmd-md"):
        widget = page.locator(f".{hook}").first
        widget.scroll_into_view_if_needed()
        nb.screenshot(hook, widget)
    text = "\n".join(page.locator(".jp-OutputArea").all_inner_texts())  # outputs only, not the code
    assert text.count("PASS") == 4 and "FAIL" not in text, text[-2000:]  # the four checks ran and passed
    nb.assert_no_console_errors()
