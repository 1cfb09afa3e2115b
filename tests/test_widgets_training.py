"""TrainingMonitor and LivePlot: live curves, Stop, failures, parity plots; in Python and in a real browser.

Training runs are real (tiny EMT CuAl data sets, as in test_train.py); the browser test drives JupyterLab in
Debian's chromium (conftest.run_notebook).
"""

from __future__ import annotations

import threading
import time
import warnings

import numpy as np
import pytest
from conftest import ROOT, wait_until
from test_train import FAST, emt_frames

from mlmd_lab.errors import MLMDError
from mlmd_lab.train.callbacks import Metrics
from mlmd_lab.train.trainer import Trainer, TrainingDivergedError, TrainingWarning
from mlmd_lab.widgets import LivePlot, TrainingMonitor
from mlmd_lab.widgets.plots import MAX_DRAWN_POINTS, ThrottledValue
from mlmd_lab.widgets.training import format_duration

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def frames():
    return emt_frames(16)


def trainer_of(frames, **kw) -> Trainer:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainingWarning)
        return Trainer(frames, **{**FAST, **kw})


def metrics(epoch: int, member: int | None = None, elapsed_per_epoch: float = 2.0) -> Metrics:
    return Metrics(epoch=epoch, step=4 * epoch, learning_rate=1e-3 / epoch, elapsed=elapsed_per_epoch * epoch,
                   train={"loss": 1.0, "energy_rmse": 2e-3 / epoch, "force_rmse": 0.05 / epoch},
                   validation={"energy_rmse": 3e-3 / epoch, "force_rmse": 0.06 / epoch}, member=member)


# ---------------------------------------------------------------------------------------------- LivePlot
def test_liveplot_appends_from_threads_and_throttles_redraws():
    plot = LivePlot(["a"], x_label="epoch", y_label="force RMSE", y_unit="meV/Å", log_y=True, max_rate=5.0)
    assert "mlmd-liveplot" in plot._dom_classes
    assert plot.y_axis.label == "force RMSE (meV/Å)" and plot.x_axis.label == "epoch"

    def feed(series: str) -> None:
        for k in range(500):
            plot.append(series, k, k + 1.0)

    threads = [threading.Thread(target=feed, args=(name,)) for name in ("a", "b", "c")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert plot.series[0] == "a" and sorted(plot.series) == ["a", "b", "c"]  # b, c: in the order their threads ran
    assert plot.n_points() == 1500
    assert plot.redraws < 50  # 1500 appends, but redraws only at most every 0.2 s (plus a few timer flushes)
    wait_until(lambda: all(plot.drawn_points(s) == 500 for s in "abc"), 10, "the timer's final redraw")
    x, y = plot.data("b")
    np.testing.assert_array_equal(x, np.arange(500.0))
    np.testing.assert_array_equal(np.asarray(plot.lines["b"].y), np.arange(500.0) + 1)


def test_liveplot_sends_at_most_max_drawn_points_but_keeps_every_point():
    n = 4 * MAX_DRAWN_POINTS + 3
    plot = LivePlot()
    plot.set_data("s", np.arange(n), np.arange(n) + 0.5)
    assert plot.n_points("s") == n and plot.drawn_points("s") <= MAX_DRAWN_POINTS
    drawn = np.asarray(plot.lines["s"].x)
    assert drawn[0] == 0 and drawn[-1] == n - 1 and np.all(np.diff(drawn) > 0)  # evenly thinned, ends kept
    np.testing.assert_array_equal(np.asarray(plot.lines["s"].y), drawn + 0.5)  # x and y stay paired
    assert len(plot.data("s")[0]) == n


def test_throttled_value_shows_the_latest_value_and_a_final_one_wins():
    import ipywidgets

    html = ipywidgets.HTML("")
    text = ThrottledValue(html, max_rate=5.0)
    for k in range(2000):  # a training loop's epoch line
        text.set(f"epoch {k}")
    assert text.updates <= 2  # the first at once, the rest wait for the timer
    wait_until(lambda: html.value == "epoch 1999", 10, "the timer's update")
    text.set("running: step 10")  # pending (the last update was just now) ...
    text.set("finished", now=True)  # ... and dropped: a late timer must not overwrite the final status
    time.sleep(0.5)
    assert html.value == "finished"
    with pytest.raises(MLMDError, match="max_rate"):
        ThrottledValue(html, max_rate=0)


def test_liveplot_log_scale_hides_non_positive_values_and_set_data_replaces():
    plot = LivePlot(log_y=True)
    plot.set_data("s", [1, 2, 3, 4], [1.0, 0.0, -2.0, np.nan])
    assert plot.n_points("s") == 4 and plot.drawn_points("s") == 1
    plot.set_data("s", [5, 6], [3.0, 4.0])
    assert list(plot.data("s")[0]) == [5.0, 6.0] and plot.drawn_points("s") == 2
    plot.clear()
    assert plot.n_points() == 0 and plot.drawn_points("s") == 0
    with pytest.raises(MLMDError, match="no series 'nope'"):
        plot.data("nope")
    with pytest.raises(MLMDError, match="2 x values but 1 y values"):
        plot.extend("s", [1, 2], [1])
    with pytest.raises(MLMDError, match="max_rate"):
        LivePlot(max_rate=0)


# ------------------------------------------------------------------------------- monitor driven by hand
def test_monitor_callback_draws_curves_in_display_units_and_eta():
    monitor = TrainingMonitor()
    monitor.on_train_begin({"n_train": 12, "n_validation": 2, "n_parameters": 500, "epochs": 10, "member": None})
    assert "12 training and 2 validation frames" in monitor.status.value
    for epoch in (1, 2, 3):
        assert monitor.on_epoch_end(metrics(epoch)) is False
    assert monitor.energy_plot.series == ["train", "validation"]
    x, y = monitor.energy_plot.data("validation")
    np.testing.assert_allclose(x, [1, 2, 3])
    np.testing.assert_allclose(y, [3.0, 1.5, 1.0])  # meV/atom
    np.testing.assert_allclose(monitor.force_plot.data("train")[1], [50.0, 25.0, 50.0 / 3])  # meV/Å
    np.testing.assert_allclose(monitor.lr_plot.data("learning rate")[1], [1e-3, 5e-4, 1e-3 / 3])
    # the epoch line is throttled (at most 5 updates a second): the last epoch's line shows soon after
    wait_until(lambda: "epoch 3 / 10" in monitor.epochs.value, 10, "the throttled epoch line")
    assert monitor._epochs_text.updates <= 3  # epoch 0 at once; epochs 1-3 unthrottled would make 4
    # 2 s per epoch, 7 epochs left: ETA ≤ 14 s
    assert "epoch 3 / 10" in monitor.epochs.value and "ETA ≤ 14 s" in monitor.epochs.value
    assert "F 20.0 meV/Å" in monitor.epochs.value
    monitor.stop()
    assert monitor.on_epoch_end(metrics(4)) is True and monitor.stop_button.disabled
    monitor.on_train_end({"reason": "stopped", "best_epoch": 4, "final": metrics(4).to_dict(), "elapsed": 8.0,
                          "errors": {"test": {"energy_rmse": 1e-3, "force_rmse": 0.02, "n_frames": 2}}})
    assert "stopped after epoch 4 (best epoch 4" in monitor.status.value and monitor.reason == "stopped"
    assert "<td>test</td><td>1.00</td><td>20.0</td>" in monitor.errors.value
    # reused for a new training: the spent stop request does not stop it
    monitor.on_train_begin({"epochs": 5, "member": None})
    assert monitor.on_epoch_end(metrics(1)) is False and not monitor.stop_button.disabled


def test_monitor_shows_stress_errors_in_gpa_and_the_training_summary():
    monitor = TrainingMonitor()
    monitor.on_train_begin({"epochs": 2, "member": None, "time_budget_s": 3.0})
    m = Metrics(epoch=1, step=4, learning_rate=1e-3, elapsed=2.0, validation={"force_rmse": 0.05,
                                                                              "stress_rmse": 0.005})
    monitor.on_epoch_end(m)
    wait_until(lambda: "epoch 1 / 2" in monitor.epochs.value, 10, "the throttled epoch line")
    assert "S 0.801 GPa (valid)" in monitor.epochs.value and "ETA ≤ 1.0 s" in monitor.epochs.value
    monitor.on_train_end({"reason": "max_epochs", "text": "Data: 4 of 40 frames (10 %) held out as a test set",
                          "errors": {"test": {"energy_rmse": 1e-3, "force_rmse": 0.02, "stress_rmse": 0.005,
                                              "n_frames": 4}}})
    assert "<th>stress RMSE (GPa)</th>" in monitor.errors.value and "<td>0.801</td>" in monitor.errors.value
    assert "held out as a test set" in monitor.errors.value


def test_monitor_ensemble_members_get_their_own_curves_and_time_limit_caps_eta(frames):
    trainer = trainer_of(frames, time_limit=5.0)
    monitor = TrainingMonitor(trainer)
    for member in (0, 1):
        monitor.on_train_begin({"epochs": 100, "member": member})
        monitor.on_epoch_end(metrics(1, member=member))
    wait_until(lambda: "member 1" in monitor.epochs.value, 10, "the throttled epoch line")
    assert monitor.force_plot.series == ["train m0", "validation m0", "train m1", "validation m1"]
    assert "member 1" in monitor.epochs.value and "ETA ≤ 3.0 s" in monitor.epochs.value  # 5 s limit - 2 s


def test_format_duration_and_start_without_trainer():
    assert [format_duration(s) for s in (4.25, 45, 200, 3900)] == ["4.2 s", "45 s", "3 min 20 s", "1 h 05 min"]
    with pytest.raises(MLMDError, match="needs a trainer"):
        TrainingMonitor().start()
    with pytest.raises(MLMDError, match="call start"):
        TrainingMonitor().wait()


# ------------------------------------------------------------------------------------- real training
@pytest.mark.slow
def test_start_streams_epochs_and_stop_button_ends_training_early(frames):
    trainer = trainer_of(frames, max_epochs=500, patience=500)
    monitor = TrainingMonitor(trainer)
    assert monitor.start() is monitor and monitor.running
    with pytest.raises(MLMDError, match="already running"):
        monitor.start()
    wait_until(lambda: len(monitor.history) >= 2, what="two epochs")
    seen = monitor.force_plot.n_points("validation")
    wait_until(lambda: monitor.force_plot.n_points("validation") > seen, what="more epochs")  # still gaining
    wait_until(lambda: "ETA" in monitor.epochs.value, 10, "the throttled epoch line")
    assert "epoch" in monitor.epochs.value and "ETA" in monitor.epochs.value
    monitor.stop_button.click()
    model = monitor.wait(timeout=300)
    assert model is trainer.model and monitor.done and monitor.reason == "stopped"
    n = len(monitor.history)
    assert n < 500 and trainer.history[-1].epoch == n
    assert "stopped after epoch" in monitor.status.value and monitor.stop_button.disabled
    assert monitor.energy_plot.drawn_points("train") == n and monitor.lr_plot.n_points() == n
    assert bytes(monitor.parity_image.value).startswith(PNG) and monitor.parity_image.layout.display is None
    assert "<td>test</td>" in monitor.errors.value
    assert monitor in trainer.callbacks and trainer.progress is False


@pytest.mark.slow
def test_divergence_is_shown_in_the_widget(frames):
    trainer = trainer_of(frames, max_epochs=5, learning_rate=1e12, final_learning_rate=1e12, clip=1e30)
    monitor = TrainingMonitor(trainer).start()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TrainingDivergedError):
            monitor.wait(timeout=300)
    assert monitor.reason == "diverged"
    assert "diverged" in monitor.status.value
    assert "lower learning_rate" in monitor.error_box.value and monitor.error_box.layout.display is None
    assert bytes(monitor.parity_image.value) == b""


@pytest.mark.slow
def test_plain_callback_of_fit_in_background(frames):
    monitor = TrainingMonitor(parity=False)
    trainer = trainer_of(frames, max_epochs=3, callbacks=[monitor])
    run = trainer.fit(background=True)
    assert run.wait(timeout=300) is trainer.model
    assert [m.epoch for m in monitor.history] == [1, 2, 3]
    assert monitor.energy_plot.n_points("validation") == 3
    assert "reached the maximum number of epochs after epoch 3" in monitor.status.value
    assert "epoch 3 / 3" in monitor.epochs.value and bytes(monitor.parity_image.value) == b""


# ------------------------------------------------------------------------------------------ browser
@pytest.mark.slow
def test_training_monitor_in_jupyterlab(run_notebook):
    nb = run_notebook([
        f"import sys, warnings; sys.path.insert(0, {str(ROOT / 'tests')!r})\nwarnings.simplefilter('ignore')\n"
        "from test_train import emt_frames, FAST\nfrom mlmd_lab.train.trainer import Trainer\n"
        "from mlmd_lab.widgets import TrainingMonitor",
        "trainer = Trainer(emt_frames(16), max_epochs=100000, patience=100000, **FAST)\n"
        "monitor = TrainingMonitor(trainer)\nmonitor",
        "monitor.start();",
    ])
    page = nb.page
    page.locator(".mlmd-training").wait_for(timeout=60_000)
    # points of the first force curve (bqplot draws an SVG path "M x,y L x,y ..." per series)
    count_js = """(n) => { const p = document.querySelector('.mlmd-training-forces .mlmd-liveplot-figure path.line');
        const d = p && p.getAttribute('d'); return !!d && (d.match(/L/g) || []).length + 1 >= n; }"""
    page.wait_for_function(count_js, arg=3, timeout=180_000)
    epoch_of = "() => +/epoch (\\d+)/.exec(document.querySelector('.mlmd-training-epochs').textContent)[1]"
    first_epoch = page.evaluate(epoch_of)
    first_points = page.evaluate("() => (document.querySelector('.mlmd-training-forces path.line')"
                                 ".getAttribute('d').match(/L/g) || []).length + 1")
    page.wait_for_function(count_js, arg=first_points + 3, timeout=120_000)  # still gaining points ...
    # ... and epochs: the epoch label is throttled apart from the plot, so wait for it too (under load it lagged:
    # "assert 23 > 23" in a full-suite run of issue 17)
    page.wait_for_function(f"() => ({epoch_of})() > {first_epoch}", timeout=120_000)
    assert page.locator(".mlmd-training-forces .mlmd-liveplot-figure path.line").count() >= 2  # train, validation
    nb.screenshot("training", page.locator(".mlmd-training"))
    page.locator(".mlmd-training-stop").click()
    page.locator(".mlmd-training-status", has_text="stopped after epoch").wait_for(timeout=180_000)
    page.locator(".mlmd-training-parity").wait_for(state="visible", timeout=120_000)
    assert page.locator(".mlmd-training-errors td", has_text="test").count() == 1
    assert page.locator(".mlmd-training-stop").is_disabled()
    nb.screenshot("stopped", page.locator(".mlmd-training"))
    nb.assert_no_console_errors()

