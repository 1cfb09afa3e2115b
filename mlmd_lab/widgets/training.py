"""Training monitor: live learning curves, learning rate, epoch/ETA, a Stop button, parity plots at the end.

>>> trainer = Trainer(db.frames(elements=["H", "O"]), max_epochs=300)
>>> monitor = TrainingMonitor(trainer)
>>> monitor                       # display it                                     # doctest: +SKIP
>>> monitor.start()               # trainer.fit() in a background thread; the notebook stays responsive
>>> model = monitor.wait()        # or click Stop (or monitor.stop()): training ends after the current epoch

The monitor is also a plain training :class:`~mlmd_lab.train.callbacks.Callback`:
``Trainer(frames, callbacks=[monitor]).fit(background=True)`` or ``train_ensemble(..., callbacks=[monitor])``
(one pair of curves per ensemble member). Curves show RMSEs in meV/atom (energy) and meV/Å (forces) per epoch
(stress errors, in GPa, are in the epoch line and the final table),
training (dashed look: first colour) and validation; the learning rate is unitless.

DOM classes: ``mlmd-training`` (the widget), ``mlmd-training-status``, ``mlmd-training-epochs``,
``mlmd-training-stop``, ``mlmd-training-energy``, ``mlmd-training-forces``, ``mlmd-training-lr``,
``mlmd-training-errors``, ``mlmd-training-error`` (a failure's message), ``mlmd-training-parity`` (PNG image).
"""

from __future__ import annotations

import html
import io
import threading
from typing import Any

import ipywidgets as widgets

from mlmd_lab.errors import MLMDError
from mlmd_lab.train.callbacks import Callback, Metrics, display_unit, format_value
from mlmd_lab.widgets.plots import LivePlot, ThrottledValue

_REASONS = {
    "converged": "converged",
    "max_epochs": "finished: reached the maximum number of epochs",
    "early_stopping": "finished: early stopping (validation error stopped improving)",
    "time_limit": "finished: reached the time limit",
    "stopped": "stopped",
    "diverged": "diverged",
}


def format_duration(seconds: float) -> str:
    """``"45 s"``, ``"3 min 20 s"``, ``"1 h 05 min"``."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class TrainingMonitor(widgets.VBox, Callback):
    """Live view of a training run (a Jupyter widget and a training callback).

    Args:
        trainer: the :class:`~mlmd_lab.train.trainer.Trainer` to run with :meth:`start` and to draw parity
            plots of (test split) when training ends. None: a passive callback (no parity plots).
        parity: draw energy and force parity plots at the end (needs ``trainer``).
        max_rate: most plot redraws per second.

    Attributes:
        history: every :class:`Metrics` received. summary: the ``on_train_end`` summary (``reason``, ...).
        model, error: after :meth:`start`: the trained model, or the exception training raised.
    """

    def __init__(self, trainer: Any = None, *, parity: bool = True, max_rate: float = 5.0) -> None:
        self.trainer = trainer
        self.parity = parity
        self.history: list[Metrics] = []
        self.info: dict[str, Any] = {}
        self.summary: dict[str, Any] = {}
        self.model: Any = None
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._phase = "idle"  # idle, preparing, training, ended
        self._thread: threading.Thread | None = None
        self._lock = threading.RLock()

        self.status = widgets.HTML("<b>Training</b>: not started")
        self.status.add_class("mlmd-training-status")
        self.epochs = widgets.HTML("")
        self.epochs.add_class("mlmd-training-epochs")
        self._epochs_text = ThrottledValue(self.epochs, max_rate=max_rate)  # one line per epoch would flood
        self.stop_button = widgets.Button(description="Stop", icon="stop", button_style="danger", disabled=True,
                                          tooltip="stop training after the current epoch (best weights are kept)")
        self.stop_button.add_class("mlmd-training-stop")
        self.stop_button.on_click(lambda _: self.stop())
        energy_unit, force_unit = display_unit("energy_rmse")[1], display_unit("force_rmse")[1]
        self.energy_plot = LivePlot(title="Energy RMSE", x_label="epoch", y_label="energy RMSE",
                                    y_unit=energy_unit, log_y=True, markers=True, max_rate=max_rate)
        self.energy_plot.add_class("mlmd-training-energy")
        self.force_plot = LivePlot(title="Force RMSE", x_label="epoch", y_label="force RMSE", y_unit=force_unit,
                                   log_y=True, markers=True, max_rate=max_rate)
        self.force_plot.add_class("mlmd-training-forces")
        self.lr_plot = LivePlot(title="Learning rate", x_label="epoch", y_label="learning rate", log_y=True,
                                max_rate=max_rate, height="200px")
        self.lr_plot.add_class("mlmd-training-lr")
        self.error_box = widgets.HTML("", layout=widgets.Layout(display="none"))
        self.error_box.add_class("mlmd-training-error")
        self.errors = widgets.HTML("")
        self.errors.add_class("mlmd-training-errors")
        self.parity_image = widgets.Image(format="png", layout=widgets.Layout(display="none", max_width="900px"))
        self.parity_image.add_class("mlmd-training-parity")
        header = widgets.HBox([self.stop_button, widgets.VBox([self.status, self.epochs])],
                              layout=widgets.Layout(align_items="center"))
        plots = widgets.HBox([self.energy_plot, self.force_plot], layout=widgets.Layout(width="100%"))
        super().__init__(children=[header, self.error_box, plots, self.lr_plot, self.errors, self.parity_image])
        self.add_class("mlmd-training")

    # ------------------------------------------------------------------ control
    def start(self, epochs: int | None = None) -> TrainingMonitor:
        """Run ``trainer.fit()`` (or ``trainer.train(epochs)`` when given) in a background thread.

        Every step (features, normalisation, the epochs, parity plots) runs in the thread, so the cell returns
        at once and the Stop button works. The console progress bar is switched off (this widget shows it).
        """
        if self.trainer is None:
            raise MLMDError("TrainingMonitor.start() needs a trainer: TrainingMonitor(trainer).start(), or use the "
                            "monitor as a callback: Trainer(frames, callbacks=[monitor])")
        if self.running:
            raise MLMDError("training is already running in this monitor; stop() it or wait() first")
        if self not in self.trainer.callbacks:
            self.trainer.callbacks.append(self)
        self.trainer.progress = False
        self._stop.clear()
        self.model, self.error = None, None
        self._phase = "preparing"
        self._set_status("preparing data (symmetry functions, normalisation)")
        self.stop_button.disabled = False
        self._thread = threading.Thread(target=self._fit, args=(epochs,), daemon=True, name="mlmd-training-monitor")
        self._thread.start()
        return self

    def _fit(self, epochs: int | None) -> None:
        try:
            if epochs is None:
                self.model = self.trainer.fit()
            else:
                self.model = self.trainer.train(epochs)
        except BaseException as err:  # shown in the widget and re-raised by wait()
            self.error = err
            self._show_failure(err)
        finally:
            self._phase = "ended"
            self.stop_button.disabled = True
            for plot in self._plots():
                plot.flush()

    def stop(self) -> None:
        """Ask training to stop after the current epoch (thread-safe; the best weights are kept)."""
        self._stop.set()
        self.stop_button.disabled = True
        if self._phase != "ended":
            self._set_status("stopping after the current epoch…")

    @property
    def running(self) -> bool:
        """True while :meth:`start`'s thread runs."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def done(self) -> bool:
        """True once training started by :meth:`start` has ended (successfully or not)."""
        return self._thread is not None and not self._thread.is_alive()

    @property
    def reason(self) -> str | None:
        """Why training ended (``"stopped"``, ``"max_epochs"``, ``"early_stopping"``, ``"time_limit"``,
        ``"diverged"``), ``"failed"`` for another error, None while running."""
        if self.summary.get("reason"):
            return str(self.summary["reason"])
        return "failed" if self.error is not None else None

    def wait(self, timeout: float | None = None) -> Any:
        """Block until :meth:`start`'s training ends; re-raises its error; returns the model."""
        if self._thread is None:
            raise MLMDError("nothing to wait for: call start() first")
        self._thread.join(timeout)
        if self.error is not None:
            raise self.error
        return self.model

    # ------------------------------------------------------------------ callback
    def on_train_begin(self, info: dict[str, Any]) -> None:
        with self._lock:
            first_member = info.get("member") in (None, 0)
            if first_member and self._phase in ("ended", "idle"):
                self._stop.clear()  # a new training with a reused monitor; a stop of the last one is spent
            if first_member:
                self.summary = {}
                self.error_box.layout.display = "none"
                self.parity_image.layout.display = "none"
                self.errors.value = ""
            self.info = dict(info)
            self._phase = "training"
            self.stop_button.disabled = self._stop.is_set()
        who = "" if info.get("member") is None else f" member {info['member']}"
        self._set_status(f"training{who}: {info.get('n_train', '?')} training and {info.get('n_validation', '?')} "
                         f"validation frames, {info.get('n_parameters', '?')} parameters")
        self._epochs_text.set(f"epoch {info.get('start_epoch', 0)} / {info.get('epochs', '?')}", now=True)

    def on_epoch_end(self, metrics: Metrics) -> bool:
        with self._lock:
            self.history.append(metrics)
        suffix = "" if metrics.member is None else f" m{metrics.member}"
        for plot, key in ((self.energy_plot, "energy_rmse"), (self.force_plot, "force_rmse")):
            factor = display_unit(key)[0]
            for split in ("train", "validation"):
                value = getattr(metrics, split).get(key)
                if value is not None:
                    plot.append(f"{split}{suffix}", metrics.epoch, value * factor)
        self.lr_plot.append(f"learning rate{suffix}", metrics.epoch, metrics.learning_rate)
        self._epochs_text.set(self._epoch_text(metrics))
        return self._stop.is_set()

    def on_train_end(self, summary: dict[str, Any]) -> None:
        self.summary = dict(summary)
        self._epochs_text.flush()  # the last epoch's line, not a throttled earlier one
        for plot in self._plots():
            plot.flush()
        reason = summary.get("reason", "finished")
        text = _REASONS.get(reason, str(reason))
        final = summary.get("final") or {}
        if final.get("epoch"):
            text += f" after epoch {final['epoch']}"
        if summary.get("best_epoch"):
            text += f" (best epoch {summary['best_epoch']}, weights kept)"
        if summary.get("elapsed") is not None:
            text += f", {format_duration(summary['elapsed'])}"
        self._set_status(text, error=reason == "diverged")
        self.errors.value = _errors_table(summary.get("errors") or {})
        if summary.get("text"):  # held-out test frames, the time budget, why training stopped
            self.errors.value += (f"<pre class='mlmd-training-summary' style='white-space:pre-wrap'>"
                                  f"{html.escape(summary['text'])}</pre>")
        self._phase = "ended"  # an ensemble's next member re-enables Stop in on_train_begin
        self.stop_button.disabled = True
        if reason != "diverged" and self.parity and self.trainer is not None:
            self._draw_parity()

    # ------------------------------------------------------------------ display helpers
    def _plots(self) -> list[LivePlot]:
        return [self.energy_plot, self.force_plot, self.lr_plot]

    def _set_status(self, text: str, error: bool = False) -> None:
        color = "#c62828" if error else "inherit"
        self.status.value = f"<b>Training</b>: <span style='color:{color}'>{html.escape(text)}</span>"

    def _epoch_text(self, m: Metrics) -> str:
        total = self.info.get("epochs")
        parts = [f"epoch {m.epoch} / {total}" if total else f"epoch {m.epoch}", format_duration(m.elapsed)]
        eta = self._eta(m)
        if eta is not None:
            parts.append(f"ETA ≤ {format_duration(eta)}")
        parts.append(f"lr {m.learning_rate:.2e}")
        split = "validation" if m.validation else "train"
        values = getattr(m, split)
        for key, name in (("energy_rmse", "E"), ("force_rmse", "F"), ("stress_rmse", "S")):
            if key in values:
                factor, unit = display_unit(key)
                parts.append(f"{name} {format_value(values[key] * factor)} {unit} ({split[:5]})")
        if m.member is not None:
            parts.insert(0, f"member {m.member}")
        return html.escape(" · ".join(parts))

    def _eta(self, m: Metrics) -> float | None:
        """Upper bound of the remaining time (s): epochs left at the recent pace, capped by the time limit."""
        total = self.info.get("epochs")
        mine = [x for x in self.history if x.member == m.member]
        if len(mine) >= 2 and mine[-1].epoch > mine[0].epoch:
            per_epoch = (mine[-1].elapsed - mine[0].elapsed) / (mine[-1].epoch - mine[0].epoch)
        else:
            per_epoch = m.elapsed / max(1, m.epoch - int(self.info.get("start_epoch", 0) or 0))
        remaining = None if not total else max(0, int(total) - m.epoch) * per_epoch
        limit = self.info.get("time_budget_s")  # what the time limit leaves the epochs (features, final pass out)
        if limit is None:
            limit = getattr(getattr(self.trainer, "config", None), "time_limit", None)
        if limit is not None:
            left = max(0.0, float(limit) - m.elapsed)
            remaining = left if remaining is None else min(remaining, left)
        return remaining

    def _show_failure(self, err: BaseException) -> None:
        kind = "diverged" if type(err).__name__ == "TrainingDivergedError" else "failed"
        self._set_status(f"{kind}: {type(err).__name__}", error=True)
        self.error_box.value = (f"<pre style='white-space:pre-wrap;color:#c62828'>"
                                f"{html.escape(f'{type(err).__name__}: {err}')}</pre>")
        self.error_box.layout.display = None

    def _draw_parity(self) -> None:
        """Energy and force parity plots of the trained model on the test split (validation if none), as PNG."""
        from mlmd_lab.train.plots import parity_plots

        split = getattr(self.trainer, "split", None)
        model = getattr(self.trainer, "model", None)
        if split is None or model is None:
            return
        frames, label = (split.test, "test") if len(split.test) else (split.validation, "validation")
        try:
            fig = parity_plots(frames, model, label=label)
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=80)
        except Exception as err:  # a figure must never turn a finished training into a failure
            self.errors.value += f"<p>parity plots failed: {html.escape(str(err))}</p>"
            return
        self.parity_image.value = buffer.getvalue()
        self.parity_image.layout.display = None


def _errors_table(errors: dict[str, dict[str, float]]) -> str:
    """HTML table of final RMSEs per split in meV/atom and meV/Å, and GPa for stress when any split has it."""
    columns = [("energy_rmse", "energy RMSE"), ("force_rmse", "force RMSE")]
    if any("stress_rmse" in (values or {}) for values in errors.values()):
        columns.append(("stress_rmse", "stress RMSE"))
    rows = []
    for split in ("train", "validation", "test"):
        values = errors.get(split)
        if not values:
            continue
        cells = []
        for key, _ in columns:
            factor, _ = display_unit(key)
            value = values.get(key)
            cells.append("–" if value is None else format_value(value * factor))
        rows.append(f"<tr><td>{split}</td>{''.join(f'<td>{c}</td>' for c in cells)}"
                    f"<td>{values.get('n_frames', '')}</td></tr>")
    if not rows:
        return ""
    head = "".join(f"<th>{name} ({display_unit(key)[1]})</th>" for key, name in columns)
    head = f"<tr><th>split</th>{head}<th>frames</th></tr>"
    return f"<table class='mlmd-training-errors-table'>{head}{''.join(rows)}</table>"
