"""LearnMonitor: the real learning loop (ASE's EMT copper as the reference, the test database server) shown live;
what the widget shows after the run (bars per iteration and condition = the records' fractions, validation errors,
budget, stop reason), Stop mid-run ending "stopped" and a rerun continuing the same workdir, failures in the
widget (without a database password) and in wait().
"""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT

from mlmd_lab.errors import MLMDError
from mlmd_lab.widgets import LearnMonitor
from mlmd_lab.widgets.learn import condition_label, phase_text

#: A loop small enough for a test (seconds per phase once compiled): 4 Cu atoms, a 2-member committee of 4x4
#: networks trained 30 epochs, 40 MD steps per condition, at most 3 candidates per iteration.
RUN = dict(committee=2, max_iterations=2, per_iteration=3, md_steps=40, timestep=2.0, frame_interval=5,
           train_config=dict(hidden=(4, 4), max_epochs=30, cutoff=4.0, n_radial=4, n_angular=1, zetas=(1.0,)))
SECRET = "mongodb://lab:s3cret-pw@db.example.org:27017/?authSource=admin"


def copper():
    return bulk("Cu", "fcc", a=3.61, cubic=True)  # 4 atoms


class Unreachable(Calculator):
    """A reference whose every calculation fails with a message that carries a database URI and its password."""

    implemented_properties = ["energy", "forces"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        raise RuntimeError(f"cannot store the result at {SECRET}")


def widget_texts(monitor: LearnMonitor) -> str:
    """Every text the widget shows (HTML values) and its repr."""
    parts = [repr(monitor)]
    for w in (monitor.status, monitor.phase_html, monitor.budget_html, monitor.table, monitor.stop_reason_html,
              monitor.error_box):
        parts.append(w.value)
    return "\n".join(parts)


def assert_shows(monitor: LearnMonitor, result) -> None:
    """The bars, validation curve, budget and stop reason shown equal the result's records."""
    records = result.iterations
    names = [condition_label(c) for c in records[0].conditions]
    assert monitor.conditions == names == ["300 K", "600 K"]
    iterations = [r.iteration for r in records]
    for c, name in enumerate(names):
        x, y = monitor.bars(name).drawn()
        expected = np.array([[r.conditions[c][kind] for r in records] for kind in ("accurate", "candidate", "failed")])
        np.testing.assert_array_equal(x, iterations)
        np.testing.assert_allclose(y, expected, rtol=0, atol=1e-12)
        np.testing.assert_allclose(y.sum(axis=0), 1.0)
    x, errors = monitor.validation_plot.data("committee mean |ΔF| (held out)")
    np.testing.assert_array_equal(x, iterations)
    np.testing.assert_allclose(errors, [1000 * r.validation["force_mean_error"] for r in records])
    assert monitor.validation_plot.drawn_points("committee mean |ΔF| (held out)") == len(records)
    calls = result.n_reference_calls
    assert monitor.reference_calls == calls == sum(r.reference_calls for r in records)
    assert f"{calls} / 40 reference calls" in monitor.budget_html.value
    assert monitor.budget_bar.value == calls and monitor.budget_bar.max == 40
    assert f"<b>{result.stop_reason}</b>" in monitor.stop_reason_html.value
    assert monitor.stop_reason_html.layout.display is None
    assert monitor.table.value.count("<tr>") == 1 + len(records)


@pytest.mark.slow
def test_monitor_shows_the_loop_and_stop_then_rerun_continues(db, tmp_path):
    """Stop pressed when iteration 2's training starts: the run ends "stopped" after iteration 1 (the committee
    of iteration 2 is finished and saved first); the same call again explores iteration 2 with that committee and
    ends by max_iterations, shown whole (iteration 1 read back from the workdir)."""
    monitor = LearnMonitor()
    assert "mlmd-learn" in monitor._dom_classes and monitor.stop_button.disabled
    kwargs = dict(temperatures=[300, 600], db=db, workdir=tmp_path / "learn", reference_budget=40, **RUN)
    seen = []

    def press_stop_in_iteration_2(name: str, info: dict) -> None:
        seen.append(name)
        if name == "training" and info["iteration"] == 2:
            monitor.stop_button.click()  # the button's click handler, from the loop's thread

    assert monitor.run(EMT(), copper(), on_phase=press_stop_in_iteration_2, **kwargs) is monitor
    first = monitor.wait(timeout=900)
    assert first is monitor.result and monitor.done and monitor.error is None
    assert first.stop_reason == "stopped" and monitor.stopped and not first.converged
    assert len(first.iterations) == 1 and first.model_name is None
    assert seen == ["labelling", "training", "exploring", "exploring", "labelling", "training"]
    assert [name for name, _ in monitor.phases] == seen  # a user's on_phase is called as well
    assert monitor.phases[2][1] == dict(iteration=1, temperature_K=300.0, pressure_GPa=None, run=1, runs=1, steps=40)
    assert monitor.phases[0][1] == dict(iteration=1, structures=12)  # the seed set
    assert_shows(monitor, first)
    assert "stopped" in monitor.status.value and "same workdir" in monitor.status.value
    assert "Stop was pressed" in monitor.stop_reason_html.value and monitor.stop_button.disabled
    assert monitor.phase_html.value == ""

    # the same call again continues: iteration 1 is not redone, iteration 2's committee is read back, not retrained
    monitor.run(EMT(), copper(), **kwargs)
    result = monitor.wait(timeout=900)
    assert result.stop_reason == "max iterations" and not monitor.stopped
    assert [name for name, _ in monitor.phases] == ["exploring", "exploring"]
    assert len(result.iterations) == 2 and result.iterations[1].reference_calls == 0  # the last one labels nothing
    assert result.iterations[0].accurate_fractions() == first.iterations[0].accurate_fractions()
    assert result.n_reference_calls == first.n_reference_calls == db.mongo["labelling"].count_documents({})
    assert [r.iteration for r in monitor.records] == [1, 2]
    assert_shows(monitor, result)
    assert f"{result.model_name} v{result.model_version}" in monitor.status.value
    assert db.models.record(result.model_name).provenance["learn"]["stop_reason"] == "max iterations"


def test_failed_reference_calculations_are_listed_without_the_database_password(db, tmp_path):
    monitor = LearnMonitor()
    result = monitor.run(Unreachable(), copper(), temperatures=[300], db=db, workdir=tmp_path, **RUN).wait(600)
    assert result.stop_reason == "reference failures" and result.n_reference_calls == 12
    assert len(result.failed_tasks) == 12 and result.model is None
    texts = widget_texts(monitor)
    assert "s3cret" not in texts and "mongodb://lab:***@db.example.org" in monitor.table.value
    assert "12 reference calculations failed" in monitor.table.value
    assert "12 reference calls (no budget set)" in monitor.budget_html.value
    assert monitor.budget_bar.layout.display == "none"
    assert "<b>reference failures</b>" in monitor.stop_reason_html.value
    assert monitor.conditions == []  # nothing was explored


def test_bad_arguments_are_shown_in_the_widget_and_raised_by_wait(db, tmp_path):
    monitor = LearnMonitor()
    monitor.run(EMT(), copper(), temperatures=[-5], db=db, workdir=tmp_path / "w", **RUN)
    with pytest.raises(MLMDError, match="kelvin"):
        monitor.wait(timeout=120)
    assert monitor.result is None and monitor.done and monitor.stop_button.disabled
    assert "failed" in monitor.status.value and "kelvin" in monitor.error_box.value
    assert monitor.error_box.layout.display is None
    # a user's hooks and stop callable go along with the monitor's own
    monitor.run(EMT(), copper(), temperatures=[300], db=None, workdir=tmp_path / "w", **RUN,
                on_iteration=lambda r: None, stop=lambda: False)
    with pytest.raises(MLMDError, match="needs db="):
        monitor.wait(timeout=120)
    with pytest.raises(MLMDError, match="max_rate"):
        LearnMonitor(max_rate=0)
    with pytest.raises(MLMDError, match="run\\(\\) first"):
        LearnMonitor().wait()


def test_error_messages_with_a_uri_are_redacted():
    monitor = LearnMonitor()
    monitor._show_failure(MLMDError(f"cannot reach MongoDB at {SECRET}"))
    monitor._flush()
    assert "s3cret" not in widget_texts(monitor) and "lab:***@" in monitor.error_box.value


def test_phase_lines_name_the_iteration_the_work_and_the_condition():
    assert phase_text("labelling", {"iteration": 1, "structures": 12}, seed=True) == (
        "iteration 1 · labelling 12 structures with the reference (the seed set: the structures, rattles and "
        "strains)")
    assert phase_text("training", {"iteration": 2, "frames": 15, "committee": 4}) == (
        "iteration 2 · training the committee (4 members) on 15 labelled frames")
    line = phase_text("exploring", {"iteration": 3, "temperature_K": 600.0, "pressure_GPa": 1.0, "run": 1,
                                    "runs": 2, "steps": 400})
    assert line == "iteration 3 · exploring: ML-MD at 600 K, 1 GPa (NPT), run 1 of 2, 400 steps"
    assert condition_label({"temperature_K": 300.0, "pressure_GPa": None}) == "300 K"
