"""MDViewer: live MD streaming and Stop, finished runs (MDResult, workdir, frames), g(r); in Python and a browser.

MD runs are real (mlmd_lab.md.run with the Lennard-Jones potential on a small argon crystal, as in test_md.py).
"""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.io import read
from conftest import wait_until

from mlmd_lab.errors import MLMDError
from mlmd_lab.md import LennardJones, MDStoppedError, read_log, resume
from mlmd_lab.md import run as md_run
from mlmd_lab.widgets import MDViewer
from mlmd_lab.widgets.md import thermo_from_frames

ARGON = LennardJones()
LIVE = dict(temperature=40, timestep=5.0, log_interval=10, trajectory_interval=50)


def argon(repeat: int = 3) -> Atoms:
    atoms = bulk("Ar", "fcc", a=5.40, cubic=True).repeat(repeat)
    atoms.rattle(0.02, seed=1)
    return atoms


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 200-step NVT run of argon with a workdir."""
    workdir = tmp_path_factory.mktemp("md") / "run"
    result = md_run(ARGON, argon(), "langevin", steps=200, workdir=workdir, **LIVE)
    return result, workdir


# ------------------------------------------------------------------------------------------- live runs
def test_live_run_streams_rows_and_stop_ends_it(tmp_path):
    seen = []
    viewer = MDViewer()
    assert "mlmd-md" in viewer._dom_classes and viewer.stop_button.disabled
    viewer.run(ARGON, argon(), "langevin", steps=10**7, callbacks=[seen.append], **LIVE)
    assert viewer.running and not viewer.stop_button.disabled
    with pytest.raises(MLMDError, match="already going"):
        viewer.run(ARGON, argon(), "nve", steps=10)
    wait_until(lambda: len(viewer.rows) >= 12, what="12 log rows")
    assert "running: step" in viewer.status.value and "T = " in viewer.status.value
    viewer.stop_button.click()
    result = viewer.wait(timeout=120)  # md.run ended cleanly at the end of its block
    assert result.stopped == "stopped by a callback" and result is viewer.result
    assert viewer.stopped and viewer.error is None and not viewer.running
    rows = viewer.rows
    assert len(rows) < 10**6 // 10 and [r["step"] for r in rows] == [10.0 * k for k in range(len(rows))]
    assert [r["step"] for r in seen] == [r["step"] for r in rows]  # the user's callback saw the same rows
    assert "stopped: step" in viewer.status.value and viewer.stop_button.disabled
    # thermo plots hold every row (time in ps), frames every 50 steps went into nglview
    t, temperature = viewer.temperature_plot.data("temperature")
    np.testing.assert_allclose(t, [r["time_fs"] / 1000 for r in rows])
    np.testing.assert_allclose(temperature, [r["temperature_K"] for r in rows])
    assert viewer.energy_plot.series == ["potential", "total"] and viewer.pressure_plot.n_points() == len(rows)
    assert len(viewer.frames) == int(rows[-1]["step"]) // 50 + 1
    assert viewer.view is not None and viewer.view.max_frame == len(viewer.frames) - 1
    assert viewer.view_box.children == (viewer.view,)
    assert viewer.rdf_result is not None and viewer.rdf_plot.series == ["Ar–Ar"]


def test_stop_with_workdir_leaves_readable_files_that_resume(tmp_path):
    viewer = MDViewer()
    viewer.run(ARGON, argon(), "langevin", steps=10**7, workdir=tmp_path, restart_interval=100, **LIVE)
    wait_until(lambda: len(viewer.rows) >= 25, what="25 log rows")
    viewer.stop()
    viewer.wait(timeout=120)
    last = int(viewer.rows[-1]["step"])
    log = read_log(tmp_path)
    assert log["step"][-1] == last and len(log["step"]) == len(viewer.rows)
    frames = read(tmp_path / "md.traj", ":")
    assert len(viewer.frames) == len(frames) and frames[0].info["step"] == 0
    # Stop wrote a restart where the run ended: resume continues from there
    more = resume(ARGON, tmp_path, steps=20)
    assert more.steps == 20 and int(read_log(tmp_path)["step"][-1]) == last + 20


def test_live_run_to_the_end_loads_the_result(tmp_path):
    viewer = MDViewer()
    viewer.run(ARGON, argon(), "nve", steps=100, **{**LIVE, "trajectory_interval": 20})
    result = viewer.wait(timeout=120)
    assert result is viewer.result and result.steps == 100 and not viewer.stopped
    assert "finished: step 100 / 100" in viewer.status.value and "6 frames" in viewer.status.value
    assert viewer.view.max_frame == 5 and viewer.temperature_plot.n_points() == 11


def test_safety_stop_and_failures_are_shown():
    atoms = argon(2)
    atoms.positions[1] = atoms.positions[0] + [0.3, 0, 0]  # overlapping atoms
    viewer = MDViewer()
    viewer.run(ARGON, atoms, "nve", temperature=40, steps=200, timestep=5.0)
    with pytest.raises(MDStoppedError):
        viewer.wait(timeout=120)
    assert "stopped for safety" in viewer.status.value and "MDStoppedError" in viewer.error_box.value
    assert viewer.error_box.layout.display is None
    viewer.run(ARGON, argon(), "nve", steps=10, timestep=50.0)  # bad input: fails in the thread, shown
    with pytest.raises(MLMDError, match="timestep=50.0 is outside"):
        viewer.wait(timeout=60)
    assert "failed: MLMDError" in viewer.status.value and "femtoseconds" in viewer.error_box.value
    with pytest.raises(MLMDError, match="needs ase.Atoms"):
        viewer.run(ARGON, "not atoms")


# --------------------------------------------------------------------------------------- finished runs
def test_finished_run_from_result_workdir_file_and_frames(finished):
    result, workdir = finished
    for source in (result, workdir, workdir / "md.traj", list(read(workdir / "md.traj", ":"))):
        viewer = MDViewer(source)
        assert len(viewer.frames) == 5 and viewer.view.max_frame == 4, source
        assert viewer.temperature_plot.n_points("temperature") in (21, 5)  # the log, or one point per frame
        r_peak, _ = viewer.rdf_result.first_peak(("Ar", "Ar"))
        assert 3.6 < r_peak < 4.0  # LJ argon: sigma 2^(1/6) = 3.82 Å
        assert viewer.rdf_shown and viewer.pressure_shown and "5 frames" in viewer.status.value
    x, y = MDViewer(workdir).energy_plot.data("total")
    np.testing.assert_allclose(y, read_log(workdir)["etot_eV"])
    np.testing.assert_allclose(x, read_log(workdir)["time_fs"] / 1000)


def test_frames_without_log_give_thermo_from_info_and_results(finished):
    result, _ = finished
    frames = list(result.trajectory)
    thermo = thermo_from_frames(frames)
    np.testing.assert_allclose(thermo["time_fs"], [0, 250, 500, 750, 1000])
    np.testing.assert_allclose(thermo["temperature_K"], [a.info["temperature_K"] for a in frames])
    np.testing.assert_allclose(thermo["epot_eV"], [a.get_potential_energy() for a in frames])
    log = read_log(result.workdir)
    np.testing.assert_allclose(thermo["pressure_GPa"], log["pressure_GPa"][::5], rtol=1e-6)  # same as md.run's
    molecule = Atoms("Ar2", positions=[[0, 0, 0], [0, 0, 3.8]])  # no cell, no results: no g(r), NaN thermo
    viewer = MDViewer([molecule])
    assert not viewer.rdf_shown and viewer.rdf_result is None
    assert np.isnan(viewer.thermo["epot_eV"]).all() and not viewer.pressure_shown


def test_bad_sources_are_named(tmp_path):
    with pytest.raises(MLMDError, match="does not exist"):
        MDViewer(tmp_path / "nope")
    with pytest.raises(MLMDError, match="has no md.traj"):
        MDViewer(tmp_path)
    with pytest.raises(MLMDError, match="cannot show a int"):
        MDViewer(42)
    with pytest.raises(MLMDError, match="call run"):
        MDViewer().wait()


# ------------------------------------------------------------------------------------------ browser
@pytest.mark.slow
def test_md_viewer_in_jupyterlab(run_notebook):
    from conftest import drawn_colours

    nb = run_notebook([
        "from ase.build import bulk\nfrom mlmd_lab.md import LennardJones\nfrom mlmd_lab.widgets import MDViewer\n"
        "atoms = bulk('Ar', 'fcc', a=5.40, cubic=True).repeat(3)\natoms.rattle(0.02, seed=1)\n"
        "viewer = MDViewer()\nviewer",
        "viewer.run(LennardJones(), atoms, 'langevin', temperature=40, timestep=5.0, steps=10**7, log_interval=10,"
        " trajectory_interval=50);",
    ])
    page = nb.page
    page.locator(".mlmd-md").wait_for(timeout=60_000)
    status = page.locator(".mlmd-md-status")
    status.filter(has_text="running: step").wait_for(timeout=120_000)
    points_js = """(n) => { const p = document.querySelector('.mlmd-md-temperature path.line');
        const d = p && p.getAttribute('d'); return !!d && (d.match(/L/g) || []).length + 1 >= n; }"""
    page.wait_for_function(points_js, arg=5, timeout=120_000)
    nb.screenshot("running", page.locator(".mlmd-md"))
    page.wait_for_function(points_js, arg=15, timeout=120_000)  # the live plot keeps gaining points
    page.locator(".mlmd-md-stop").click()
    status.filter(has_text="stopped: step").wait_for(timeout=120_000)
    canvas = page.locator(".mlmd-md-nglview canvas").first
    canvas.wait_for(timeout=60_000)
    assert drawn_colours(canvas) > 10
    page.locator(".mlmd-md-rdf path.line").first.wait_for(timeout=30_000)
    assert page.locator(".mlmd-md-stop").is_disabled()
    nb.screenshot("stopped", page.locator(".mlmd-md"))
    nb.assert_no_console_errors()
