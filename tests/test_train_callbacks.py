"""Training callbacks (live metrics, logs, stopping) and training figures."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from matplotlib.figure import Figure

from mlmd_lab.errors import MLMDError
from mlmd_lab.frames import labelled_atoms
from mlmd_lab.train.callbacks import (
    Callback,
    CallbackList,
    ConsoleProgress,
    History,
    JSONLinesLog,
    Metrics,
    Stopper,
    display_unit,
    format_value,
    read_events,
    read_log,
)
from mlmd_lab.train.plots import learning_curve, learning_curves, parity_plot, parity_plots, save_figure

INFO = {"n_train": 90, "n_validation": 10, "n_parameters": 1234, "epochs": 3, "elements": ["Cu"], "member": None}


def make_metrics(epoch: int, member: int | None = None) -> Metrics:
    return Metrics(epoch=epoch, step=10 * epoch, learning_rate=1e-3 / epoch, elapsed=0.5 * epoch,
                   train={"loss": 1.0 / epoch, "energy_rmse": 2e-3 / epoch, "force_rmse": 0.05 / epoch},
                   validation={"energy_rmse": 3e-3 / epoch, "force_rmse": 0.06 / epoch},
                   best=epoch % 2 == 1, member=member)


def run_training(callback: Callback, epochs: int = 3) -> list[Metrics]:
    """Drive a callback like the trainer does; returns the metrics sent."""
    sent = [make_metrics(e) for e in range(1, epochs + 1)]
    callback.on_train_begin(dict(INFO, epochs=epochs))
    for m in sent:
        callback.on_epoch_end(m)
    callback.on_train_end({"reason": "max_epochs", "best_epoch": 3, "final": sent[-1].to_dict(), "elapsed": 1.5})
    return sent


# Metrics and the JSON-lines log --------------------------------------------------------------------------
def test_metrics_dict_round_trip_through_json():
    m = make_metrics(2, member=1)
    assert Metrics.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    assert m.value("force_rmse") == pytest.approx(0.03)
    assert m.value("force_rmse", "train") == pytest.approx(0.025)
    assert m.value("stress_rmse") is None


def test_jsonlines_log_reads_back_metrics_and_events(tmp_path):
    path = tmp_path / "logs" / "train.jsonl"
    sent = run_training(JSONLinesLog(path))
    assert read_log(path) == sent
    events = read_events(path)
    assert [e["event"] for e in events] == ["begin", "epoch", "epoch", "epoch", "end"]
    assert events[0]["n_parameters"] == 1234 and events[0]["elements"] == ["Cu"]
    assert events[-1]["reason"] == "max_epochs" and events[-1]["final"]["epoch"] == 3


def test_read_log_skips_truncated_last_line(tmp_path):
    path = tmp_path / "train.jsonl"
    sent = run_training(JSONLinesLog(path))
    line = json.dumps({"event": "epoch", **make_metrics(4).to_dict()})
    with open(path, "a") as f:
        f.write(line[: len(line) // 2])
    assert read_log(path) == sent
    events = read_events(path)
    assert events[0]["event"] == "begin" and events[-1]["event"] == "end"


def test_append_after_a_killed_run_keeps_both_runs(tmp_path):
    path = tmp_path / "train.jsonl"
    log = JSONLinesLog(path)
    log.on_train_begin(INFO)
    log.on_epoch_end(make_metrics(1))
    log.close()
    with open(path, "a") as f:
        f.write('{"event": "epoch", "epo')  # the writer was killed here
    run_training(JSONLinesLog(path, append=True), epochs=2)
    assert [m.epoch for m in read_log(path)] == [1, 1, 2]


def test_corrupt_middle_line_is_an_error(tmp_path):
    path = tmp_path / "train.jsonl"
    run_training(JSONLinesLog(path))
    lines = path.read_text().splitlines()
    lines[2] = lines[2][:10]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(MLMDError, match="line 3"):
        read_log(path)


def test_log_of_a_killed_run_keeps_its_epochs(tmp_path):
    path = tmp_path / "killed.jsonl"
    n = 4
    code = textwrap.dedent(f"""
        import os, signal
        from mlmd_lab.train.callbacks import JSONLinesLog, Metrics
        log = JSONLinesLog({str(path)!r})
        log.on_train_begin({{"epochs": 100}})
        for epoch in range(1, 101):
            log.on_epoch_end(Metrics(epoch=epoch, step=epoch, learning_rate=1e-3, elapsed=0.1 * epoch,
                                     train={{"force_rmse": 0.1}}, validation={{}}))
            if epoch == {n}:
                os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    metrics = read_log(path)
    assert [m.epoch for m in metrics] == list(range(1, n + 1))
    assert [e["event"] for e in read_events(path)] == ["begin"] + ["epoch"] * n


# CallbackList and stopping ---------------------------------------------------------------------------------
class StopAt(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, metrics: Metrics) -> bool:
        return metrics.epoch >= self.epoch


class Failing(Callback):
    def on_epoch_end(self, metrics: Metrics) -> None:
        raise OSError("disk full")


def test_callback_list_stops_when_any_callback_asks():
    history = History()
    callbacks = CallbackList([history, StopAt(2), Callback()])
    assert not callbacks.on_epoch_end(make_metrics(1))
    assert callbacks.on_epoch_end(make_metrics(2))
    assert len(history) == 2  # every callback still saw the epoch


def test_failing_callback_raises_mlmd_error_naming_it():
    callbacks = CallbackList([History(), Failing()])
    with pytest.raises(MLMDError, match="callback Failing failed.*disk full") as info:
        callbacks.on_epoch_end(make_metrics(1))
    assert isinstance(info.value.__cause__, OSError)


def test_stopper_set_from_another_thread_stops_training():
    stopper = Stopper()
    callbacks = CallbackList([stopper])
    started, epochs = threading.Event(), []

    def train():
        for epoch in range(1, 10_000):
            epochs.append(epoch)
            started.set()
            if callbacks.on_epoch_end(make_metrics(epoch)):
                return
            stopper.event.wait(0.01)

    worker = threading.Thread(target=train)
    worker.start()
    assert started.wait(10)
    stopper.stop()
    worker.join(10)
    assert not worker.is_alive()
    assert stopper.stopped and len(epochs) < 9_999
    stopper.reset()
    assert not stopper.on_epoch_end(make_metrics(1))


# History and console --------------------------------------------------------------------------------------
def test_history_to_arrays():
    history = History()
    sent = run_training(history)
    arrays = history.to_arrays()
    np.testing.assert_array_equal(arrays["epoch"], [1, 2, 3])
    np.testing.assert_allclose(arrays["validation_force_rmse"], [m.validation["force_rmse"] for m in sent])
    np.testing.assert_allclose(arrays["train_loss"], [1.0, 0.5, 1 / 3])
    assert history.info["n_train"] == 90 and history.summary["reason"] == "max_epochs"


def test_console_progress_writes_to_non_tty_stream():
    out = io.StringIO()
    run_training(ConsoleProgress(file=out))
    text = out.getvalue()
    assert "3/3" in text
    assert "F 20.0 meV/Å (val)" in text  # validation force RMSE of epoch 3: 0.02 eV/Å
    assert "E 1.00 meV/atom" in text
    assert text.rstrip().splitlines()[-1].startswith("training ended (max_epochs) after epoch 3")


# Figures ---------------------------------------------------------------------------------------------------
def test_learning_curve_plots_values_in_mev(tmp_path):
    history = History()
    sent = run_training(history)
    fig = learning_curve(history, quantity="force_rmse")
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    np.testing.assert_allclose(lines["train"].get_ydata(), [1e3 * m.train["force_rmse"] for m in sent])
    np.testing.assert_allclose(lines["validation"].get_ydata(), [1e3 * m.validation["force_rmse"] for m in sent])
    np.testing.assert_allclose(lines["validation"].get_xdata(), [1, 2, 3])
    assert ax.get_yscale() == "log" and "meV/Å" in ax.get_ylabel()

    path = tmp_path / "train.jsonl"
    run_training(JSONLinesLog(path))
    energy = learning_curve(path, quantity="energy_rmse").axes[0]
    assert "meV/atom" in energy.get_ylabel()
    np.testing.assert_allclose(energy.get_lines()[0].get_ydata(), [2.0, 1.0, 2 / 3])
    assert len(learning_curves(sent).axes) == 2


def test_learning_curve_of_ensemble_members_and_empty_history():
    metrics = [make_metrics(e, member=k) for k in (0, 1) for e in (1, 2)]
    labels = [line.get_label() for line in learning_curve(metrics).axes[0].get_lines()]
    assert {"member 0 train", "member 1 validation"} <= set(labels)
    assert isinstance(learning_curve(History()), Figure)


def test_parity_plot_data_and_rmse_in_title():
    fig = parity_plot([0, 0, 0, 0], [1e-3, -1e-3, 1e-3, -1e-3], quantity="forces")
    ax = fig.axes[0]
    assert "RMSE 1.00 meV/Å" in ax.get_title() and "MAE 1.00 meV/Å" in ax.get_title()
    offsets = ax.collections[0].get_offsets()
    np.testing.assert_allclose(offsets, [[0, 1], [0, -1], [0, 1], [0, -1]])
    assert ax.get_xlim() == ax.get_ylim()


def test_parity_plot_uses_hexbin_for_many_points():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(10_000, 3))
    fig = parity_plot(ref, ref + 1e-3 * rng.normal(size=ref.shape))
    assert type(fig.axes[0].collections[0]).__name__ == "PolyCollection"


class EMTModel:
    """A model with a real ``predict``: ASE's EMT, in the result format of HDNNP.predict (eV, eV/Å)."""

    def predict(self, atoms_list):
        results = []
        for atoms in atoms_list:
            atoms = atoms.copy()
            atoms.calc = EMT()
            results.append({"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()})
        return results


def test_parity_plots_against_emt_with_noise():
    rng = np.random.default_rng(1)
    frames, noise = [], []
    for _ in range(5):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)
        atoms.rattle(0.05, seed=int(rng.integers(1000)))
        atoms.calc = EMT()
        e_noise, f_noise = rng.normal(scale=0.01), rng.normal(scale=0.02, size=(len(atoms), 3))
        noise.append(f_noise)
        frames.append(labelled_atoms(atoms.symbols, atoms.positions, atoms.cell, True,
                                     energy=atoms.get_potential_energy() + e_noise,
                                     forces=atoms.get_forces() + f_noise))
    fig = parity_plots(frames, EMTModel(), label="validation")
    energy_ax, force_ax = fig.axes[:2]
    assert energy_ax.collections[0].get_offsets().shape == (5, 2)
    assert force_ax.collections[0].get_offsets().shape == (5 * 32 * 3, 2)
    rmse = 1e3 * np.sqrt(np.mean(np.concatenate(noise) ** 2))  # meV/Å
    assert f"RMSE {format_value(rmse)} meV/Å" in force_ax.get_title()
    np.testing.assert_allclose(force_ax.collections[0].get_offsets()[:, 1],
                               1e3 * np.concatenate([r["forces"].ravel() for r in EMTModel().predict(frames)]))
    assert "meV/atom" in energy_ax.get_xlabel()


def test_stress_errors_are_shown_in_gpa():
    """stress_rmse is a stress (eV/Å³): the console bar, learning curves and parity plots show GPa."""
    from ase import units

    gpa = 1.0 / units.GPa  # 160.2 GPa per eV/Å³
    m = Metrics(epoch=1, step=1, learning_rate=1e-3, elapsed=1.0, validation={"stress_rmse": 0.005})
    assert display_unit("stress_rmse") == (pytest.approx(gpa), "GPa")
    assert f"S {format_value(0.005 * gpa)} GPa (val)" in ConsoleProgress(file=io.StringIO()).describe(m)
    curve = learning_curve([m], quantity="stress_rmse").axes[0]
    assert "GPa" in curve.get_ylabel()
    np.testing.assert_allclose(curve.get_lines()[0].get_ydata(), [0.005 * gpa])
    parity = parity_plot([0.0, 0.0], [1e-3, -1e-3], quantity="stress").axes[0]
    assert f"RMSE {format_value(1e-3 * gpa)} GPa" in parity.get_title() and "GPa" in parity.get_xlabel()


def test_save_figure_writes_png_atomically(tmp_path):
    fig = parity_plot([0.0, 1.0], [0.1, 0.9])
    path = save_figure(fig, tmp_path / "figs" / "parity.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["parity.png"]
    assert save_figure(fig, tmp_path / "parity.pdf").read_bytes()[:5] == b"%PDF-"
    with pytest.raises(MLMDError, match="cannot save"):
        save_figure(fig, tmp_path / "parity.xyz")
