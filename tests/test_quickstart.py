"""The quickstart notebook in a real browser: every widget of the loop renders and works together.

Headless execution (tests/test_notebooks.py) runs the notebook as shipped and its physics checks must pass; the
5-minute budget is measured by benchmarks/bench_quickstart.py. This runs the same cells in JupyterLab + Chromium,
where front ends load: the canvases must not be blank and the console must stay clean. What it proves is the
widgets working together, so it runs the loop at the smallest size that still fills every widget
(:data:`BROWSER_SETTINGS`); the checks are printed but their verdict belongs to the headless run.
"""

from __future__ import annotations

import json

import pytest
from conftest import ROOT, distinct_colours

from mlmd_lab.quickstart import QuickstartSettings

#: The loop at the smallest size that fills every widget (training curves, MD trajectories long enough for a VDOS).
BROWSER_SETTINGS = "qs.QuickstartSettings(n_structures=40, max_epochs=600, nvt_steps=400, nve_steps=1600)"


def browser_cells() -> list[str]:
    """The quickstart notebook's code cells with :data:`BROWSER_SETTINGS`; the final ``assert result.passed`` is
    left to the headless run (a small run's physics checks may fail, which is not what this test is about)."""
    cells = json.loads((ROOT / "notebooks" / "00_quickstart.ipynb").read_text())["cells"]
    code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    assert sum("qs.QuickstartSettings()" in c for c in code) == 1, "the notebook's settings line moved"
    assert code[-1].rstrip().splitlines()[-1].startswith("assert result.passed"), "the notebook's last line moved"
    code = [c.replace("qs.QuickstartSettings()", BROWSER_SETTINGS) for c in code]
    code[-1] = "\n".join(code[-1].rstrip().splitlines()[:-1])
    return code


def test_quickstart_settings_are_explicit():
    s = QuickstartSettings()
    assert s.timestep_fs * s.frame_interval == pytest.approx(1.0)  # 1 fs frames: Nyquist far above O-H stretches
    assert s.max_epochs > 0 and s.n_structures >= 50


def test_browser_cells_shrink_only_the_settings():
    code = browser_cells()
    assert sum(BROWSER_SETTINGS in c for c in code) == 1
    assert "assert result.passed" not in code[-1] and "write_report" in code[-1]


@pytest.mark.slow
@pytest.mark.timeout(2400)  # hang guard for a slow machine, not a timing assertion
def test_quickstart_notebook_in_the_browser(run_notebook):
    nb = run_notebook(browser_cells(), name="quickstart", timeout=600)
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
    assert text.count("PASS") + text.count("FAIL") == 4, text[-2000:]  # the four checks ran and were printed
    nb.assert_no_console_errors()
