"""Learn monitor: the automatic potential-construction loop (:func:`mlmd_lab.learn.run`) live — per iteration and
condition the accurate / candidate / failed fractions as stacked bars, the reference budget used, the committee's
validation errors, the current phase, the stop reason, and a Stop button.

>>> monitor = LearnMonitor()
>>> monitor                                    # display it first                             # doctest: +SKIP
>>> monitor.run(EMT(), atoms, temperatures=[300, 600], db=db, workdir="runs/cu-learn", reference_budget=60)
>>> result = monitor.wait()                    # the LearnResult (or click Stop)

How Stop works: the button sets the ``threading.Event`` given to :func:`mlmd_lab.learn.run` as ``stop``; the loop
checks it between tasks (a reference calculation, a committee training or an MD run in progress finishes first)
and ends with stop_reason ``"stopped"``, writing nothing that a rerun would not continue from. ``run`` with the
same arguments and workdir continues the same run (the monitor shows the iterations done before, read from the
workdir's ``iteration-KKK.json``), and no reference calculation is repeated.

What is shown (all updates throttled to ``max_rate`` a second; a burst of MD runs or short iterations never floods
the browser's websocket):

- one stacked-bar chart per condition (temperature, pressure): x the iteration, y the fractions of the explored
  frames that were accurate (calibrated max-atom force uncertainty <= lo), candidates (lo..hi or extrapolating)
  and failed (> hi); :meth:`LearnMonitor.bars` gives the drawn values;
- the reference budget: calls so far (sum of the iterations' ``reference_calls``, all sessions of the run) of
  ``reference_budget``, as a progress bar and text;
- the committee's validation errors per iteration (meV/Å): the mean |F_mean - F_ref| per atom on its held-out
  calibration frames, the members' validation force RMSE, and the trust level lo;
- the current phase (labelling N structures, training the committee on N frames, exploring MD at which
  condition), a table of the iterations, and the stop reason with what it means.

Database URIs (with their passwords) never reach the widget's text: errors are shown through
:func:`mlmd_lab.db.store.redact`.

DOM classes: ``mlmd-learn`` (the widget), ``mlmd-learn-status``, ``mlmd-learn-phase``, ``mlmd-learn-stop``,
``mlmd-learn-budget`` (the progress bar), ``mlmd-learn-budget-text``, ``mlmd-learn-fractions`` (the bar charts'
box; each chart ``mlmd-learn-bars``), ``mlmd-learn-validation``, ``mlmd-learn-table``, ``mlmd-learn-stop-reason``,
``mlmd-learn-error``.
"""

from __future__ import annotations

import html
import json
import threading
from pathlib import Path
from typing import Any

import bqplot
import ipywidgets as widgets
import numpy as np

from mlmd_lab.db.store import redact
from mlmd_lab.errors import MLMDError
from mlmd_lab.learn.result import IterationRecord, LearnResult
from mlmd_lab.widgets.plots import LivePlot, RateLimiter, ThrottledValue

#: Colours of the fractions: accurate, candidate, failed.
FRACTION_COLORS = ("#2ca02c", "#ff7f0e", "#d62728")
KINDS = ("accurate", "candidate", "failed")


def _meaning(reason: str) -> str:
    from mlmd_lab.learn.loop import CONVERGED_FRACTION, CONVERGED_ITERATIONS

    return {
        "converged": f"accurate fraction >= {CONVERGED_FRACTION:g} at every condition in {CONVERGED_ITERATIONS} "
                     "consecutive iterations",
        "reference budget": "the reference budget is spent (reference_budget)",
        "max iterations": "reached max_iterations (the last iteration trains and explores, labels nothing)",
        "stopped": "Stop was pressed; run again with the same workdir to continue (nothing is computed twice)",
        "reference failures": "most reference calculations of an iteration failed: see the failed tasks below, "
                              "fix the reference and run again",
    }.get(reason, reason)


def condition_label(condition: dict[str, Any]) -> str:
    """``"300 K"`` or ``"600 K, 1 GPa"`` for an iteration record's condition (temperature_K, pressure_GPa)."""
    p = condition.get("pressure_GPa")
    return f"{float(condition['temperature_K']):g} K" + ("" if p is None else f", {float(p):g} GPa")


class FractionBars(widgets.VBox):
    """Stacked bars of the accurate / candidate / failed fractions per iteration of one condition (bqplot).

    :meth:`set` stores one iteration's fractions (from any thread); the figure is redrawn at most ``max_rate``
    times a second (:class:`~mlmd_lab.widgets.plots.RateLimiter`), :meth:`flush` draws now.
    """

    def __init__(self, title: str, *, max_rate: float = 5.0, height: str = "220px") -> None:
        self.title = title
        self._lock = threading.RLock()
        self._values: dict[int, tuple[float, float, float]] = {}
        self._limiter = RateLimiter(self._draw, max_rate, self._lock)
        self.x_scale = bqplot.OrdinalScale()
        self.y_scale = bqplot.LinearScale(min=0.0, max=1.0)
        self.mark = bqplot.Bars(x=np.zeros(0, int), y=np.zeros((3, 0)), scales={"x": self.x_scale, "y": self.y_scale},
                                type="stacked", colors=list(FRACTION_COLORS), labels=list(KINDS),
                                display_legend=True, padding=0.2)
        axes = [bqplot.Axis(scale=self.x_scale, label="iteration"),
                bqplot.Axis(scale=self.y_scale, label="fraction of explored frames", side="left",
                            tick_format=".1f", label_offset="40px")]
        self.figure = bqplot.Figure(marks=[self.mark], axes=axes, title=title, animation_duration=0,
                                    legend_location="top-right",
                                    fig_margin={"top": 40, "bottom": 45, "left": 60, "right": 15},
                                    layout=widgets.Layout(width="100%", height=height, min_width="240px"))
        super().__init__(children=[self.figure], layout=widgets.Layout(flex="1 1 0%", min_width="240px"))
        self.add_class("mlmd-learn-bars")

    def set(self, iteration: int, accurate: float, candidate: float, failed: float) -> None:
        """Store iteration's fractions (replacing earlier ones of that iteration); the redraw is throttled."""
        with self._lock:
            self._values[int(iteration)] = (float(accurate), float(candidate), float(failed))
            self._limiter.request()

    def clear(self) -> None:
        with self._lock:
            self._values = {}
        self.flush()

    def data(self) -> tuple[np.ndarray, np.ndarray]:
        """The stored values: iterations (n,) and fractions (3, n): accurate, candidate, failed."""
        with self._lock:
            keys = sorted(self._values)
            return np.array(keys, int), np.array([self._values[k] for k in keys], float).reshape(-1, 3).T

    def drawn(self) -> tuple[np.ndarray, np.ndarray]:
        """What the figure shows now: iterations (n,) and fractions (3, n)."""
        return np.asarray(self.mark.x), np.asarray(self.mark.y, float).reshape(3, -1)

    def flush(self) -> None:
        self._limiter.run()

    def _draw(self) -> None:
        x, y = self.data()
        with self.mark.hold_sync():
            self.mark.x, self.mark.y = x, y

    def close(self) -> None:
        limiter = getattr(self, "_limiter", None)
        if limiter is not None:
            limiter.cancel()
        super().close()


class LearnMonitor(widgets.VBox):
    """Live view of :func:`mlmd_lab.learn.run`, run by :meth:`run` in a background thread.

    Args:
        max_rate: most updates per second of each plot and text (websocket messages stay few).

    Attributes:
        records: the :class:`~mlmd_lab.learn.result.IterationRecord` of every iteration shown (of a resumed run,
            the earlier ones too), in order.
        phase: the current phase, ``(name, info)`` as :func:`mlmd_lab.learn.run` reports it through ``on_phase``
            ("labelling", "training", "exploring"), None before the first.
        phases: every ``(name, info)`` seen in the last run.
        result: the :class:`~mlmd_lab.learn.result.LearnResult` of the last run (None while running or after a
            failure).
        error: the exception the last run raised, if any (re-raised by :meth:`wait`).
        stopped: True when the last run ended with stop_reason "stopped".
    """

    def __init__(self, *, max_rate: float = 5.0) -> None:
        if not max_rate > 0:
            raise MLMDError(f"LearnMonitor max_rate={max_rate} must be > 0 (updates per second)")
        self.max_rate = float(max_rate)
        self.records: list[IterationRecord] = []
        self.phase: tuple[str, dict] | None = None
        self.phases: list[tuple[str, dict]] = []
        self.result: LearnResult | None = None
        self.error: BaseException | None = None
        self.stopped = False
        self.budget: int | None = None
        self._settings: dict[str, Any] = {}
        self._labelling = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.RLock()
        self._bars: dict[str, FractionBars] = {}
        self._earlier_read = False
        self._build()

    # ------------------------------------------------------------------ layout
    def _build(self) -> None:
        rate = self.max_rate
        self.status = widgets.HTML("<b>Learn</b>: not started")
        self.status.add_class("mlmd-learn-status")
        self._status_text = ThrottledValue(self.status, max_rate=rate)
        self.phase_html = widgets.HTML("")
        self.phase_html.add_class("mlmd-learn-phase")
        self._phase_text = ThrottledValue(self.phase_html, max_rate=rate)  # one per MD run: can be many a second
        self.stop_button = widgets.Button(description="Stop", icon="stop", button_style="danger", disabled=True,
                                          tooltip="end the loop at the next task boundary (the workdir resumes)")
        self.stop_button.add_class("mlmd-learn-stop")
        self.stop_button.on_click(lambda _: self.stop())
        self.budget_bar = widgets.IntProgress(value=0, min=0, max=1, description="reference",
                                              layout=widgets.Layout(width="320px"))
        self.budget_bar.add_class("mlmd-learn-budget")
        self._budget_value = ThrottledValue(self.budget_bar, max_rate=rate)
        self.budget_html = widgets.HTML("")
        self.budget_html.add_class("mlmd-learn-budget-text")
        self._budget_text = ThrottledValue(self.budget_html, max_rate=rate)
        self.fractions_box = widgets.HBox([], layout=widgets.Layout(width="100%", flex_flow="row wrap"))
        self.fractions_box.add_class("mlmd-learn-fractions")
        self.validation_plot = LivePlot(["committee mean |ΔF| (held out)", "members' force RMSE (validation)",
                                         "trust lo"], title="Committee validation error", x_label="iteration",
                                        y_label="force error", y_unit="meV/Å", markers=True, max_rate=rate,
                                        height="240px")
        self.validation_plot.add_class("mlmd-learn-validation")
        self.table = widgets.HTML("")
        self.table.add_class("mlmd-learn-table")
        self._table_text = ThrottledValue(self.table, max_rate=rate)
        self.stop_reason_html = widgets.HTML("", layout=widgets.Layout(display="none"))
        self.stop_reason_html.add_class("mlmd-learn-stop-reason")
        self.error_box = widgets.HTML("", layout=widgets.Layout(display="none"))
        self.error_box.add_class("mlmd-learn-error")
        header = widgets.HBox([self.stop_button, widgets.VBox([self.status, self.phase_html])],
                              layout=widgets.Layout(align_items="center"))
        budget = widgets.HBox([self.budget_bar, self.budget_html], layout=widgets.Layout(align_items="center"))
        super().__init__(children=[header, budget, self.stop_reason_html, self.error_box, self.fractions_box,
                                   self.validation_plot, self.table])
        self.add_class("mlmd-learn")

    def _throttled(self) -> list[ThrottledValue]:
        return [self._status_text, self._phase_text, self._budget_value, self._budget_text, self._table_text]

    # ------------------------------------------------------------------ control
    def run(self, reference, structures, **kwargs: Any) -> LearnMonitor:
        """Run :func:`mlmd_lab.learn.run` (same arguments) in a background thread; returns the monitor.

        ``stop`` is the monitor's own event (the Stop button; a ``stop`` given is honoured too), ``progress`` is
        off (this widget shows it); an ``on_iteration`` or ``on_phase`` given is called as well.
        """
        from mlmd_lab import learn

        if self.running:
            raise MLMDError("a learning run is already running in this monitor; stop() it or wait() first")
        user_iteration = kwargs.pop("on_iteration", None)
        user_phase = kwargs.pop("on_phase", None)
        user_stop = kwargs.pop("stop", None)
        kwargs["progress"] = False
        self._reset(kwargs)

        def on_iteration(record: IterationRecord) -> None:
            self._add_record(record)
            if user_iteration is not None:
                user_iteration(record)

        def on_phase(name: str, info: dict) -> None:
            self._set_phase(name, info)
            if user_phase is not None:
                user_phase(name, info)

        stop: Any = self._stop
        if user_stop is not None:
            def stop() -> bool:
                given = user_stop.is_set() if hasattr(user_stop, "is_set") else user_stop()
                return bool(given) or self._stop.is_set()

        def target() -> None:
            try:
                self._finished(learn.run(reference, structures, on_iteration=on_iteration, on_phase=on_phase,
                                         stop=stop, **kwargs))
            except BaseException as err:  # shown in the widget and re-raised by wait()
                self.error = err
                self._show_failure(err)
            finally:
                self.stop_button.disabled = True
                self._flush()

        self._set_status("starting: checking the workdir and the database")
        self.stop_button.disabled = False
        self._thread = threading.Thread(target=target, daemon=True, name="mlmd-learn-monitor")
        self._thread.start()
        return self

    def _reset(self, kwargs: dict) -> None:
        self._stop.clear()
        self.result, self.error, self.stopped = None, None, False
        self.phase, self.phases, self._labelling = None, [], 0
        budget = kwargs.get("reference_budget")
        self.budget = None if budget is None else int(budget)
        self._settings = {"workdir": kwargs.get("workdir")}
        with self._lock:
            self.records = []
            self._earlier_read = False
            for bars in self._bars.values():
                bars.close()
            self._bars = {}
            self.fractions_box.children = []
        self.validation_plot.clear()
        self._table_text.set("", now=True)
        self._phase_text.set("", now=True)
        self.stop_reason_html.value, self.stop_reason_html.layout.display = "", "none"
        self.error_box.value, self.error_box.layout.display = "", "none"
        self._show_budget()

    def stop(self) -> None:
        """End the loop at the next task boundary (thread-safe; the run ends "stopped" and its workdir resumes)."""
        self._stop.set()
        self.stop_button.disabled = True
        if self.running:
            self._set_status("stopping after the current task (a reference calculation, training or MD run "
                             "finishes first)…")

    @property
    def running(self) -> bool:
        """True while :meth:`run`'s thread runs."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def done(self) -> bool:
        """True once the run started by :meth:`run` has ended (finished, stopped or failed)."""
        return self._thread is not None and not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> LearnResult | None:
        """Block until the run ends (at most ``timeout`` s); re-raises its error; returns the LearnResult (None if
        the timeout passed first)."""
        if self._thread is None:
            raise MLMDError("nothing to wait for: call run() first")
        self._thread.join(timeout)
        if self.error is not None:
            raise self.error
        return self.result

    # ------------------------------------------------------------------ what the loop reports
    @property
    def reference_calls(self) -> int:
        """Reference calculations of the iterations shown (all sessions of a resumed run)."""
        with self._lock:
            return int(sum(r.reference_calls for r in self.records))

    @property
    def conditions(self) -> list[str]:
        """The conditions with a bar chart, in order (``"300 K"``, ``"600 K, 1 GPa"``)."""
        with self._lock:
            return list(self._bars)

    def bars(self, condition: str) -> FractionBars:
        """The stacked-bar chart of ``condition`` (a :attr:`conditions` name)."""
        with self._lock:
            if condition not in self._bars:
                raise MLMDError(f"LearnMonitor has no condition {condition!r}; it has "
                                f"{', '.join(self._bars) or 'none yet'}")
            return self._bars[condition]

    def _read_earlier(self) -> None:
        """Iterations finished before this session (a resumed run), from the workdir's iteration-KKK.json; read
        once, at the loop's first report (its settings were accepted then)."""
        with self._lock:
            if self._earlier_read:
                return
            self._earlier_read = True
            workdir = self._settings.get("workdir")
            if workdir is None or self.records:
                return
            k = 1
            while (path := Path(workdir) / f"iteration-{k:03d}.json").exists():
                try:
                    self._append(IterationRecord.from_dict(json.loads(path.read_text())))
                except (OSError, ValueError, TypeError):
                    break
                k += 1

    def _add_record(self, record: IterationRecord) -> None:
        self._read_earlier()
        with self._lock:
            self._labelling = 0
            self._append(record)
        self._set_status(f"running: iteration {record.iteration} done"
                         + (f" ({record.stop})" if record.stop else ""))

    def _append(self, record: IterationRecord) -> None:
        with self._lock:
            shown = [r for r in self.records if r.iteration == record.iteration]
            if shown and shown[0].to_dict() == record.to_dict():
                return  # the result's copy of a record already shown (or one read back from the workdir)
            self.records = [r for r in self.records if r.iteration != record.iteration] + [record]
            self.records.sort(key=lambda r: r.iteration)
            for condition in record.conditions:
                name = condition_label(condition)
                bars = self._bars.get(name)
                if bars is None:
                    bars = self._bars[name] = FractionBars(name, max_rate=self.max_rate)
                    self.fractions_box.children = [*self.fractions_box.children, bars]
                bars.set(record.iteration, *(float(condition.get(kind, 0.0)) for kind in KINDS))
            if shown:  # a changed record (never in practice): redraw the curves from every record
                for series in self.validation_plot.series:
                    self.validation_plot.set_data(series, [], [])
            for r in self.records if shown else [record]:
                for series, value in validation_points(r):
                    self.validation_plot.append(series, r.iteration, value)
            self._table_text.set(iterations_table(self.records))
        self._show_budget()

    def _set_phase(self, name: str, info: dict) -> None:
        self._read_earlier()
        with self._lock:
            self.phase = (name, dict(info))
            self.phases.append(self.phase)
            seed = name == "labelling" and int(info.get("iteration", 0)) == 1 and not self._explored_first()
            self._labelling = int(info.get("structures", 0)) if name == "labelling" else 0
        self._phase_text.set(html.escape(phase_text(name, info, seed=seed)))
        self._show_budget()
        if not self._stop.is_set():
            self._set_status(f"running: iteration {info.get('iteration', '?')}")

    def _explored_first(self) -> bool:
        """Iteration 1 has explored (this session, or an earlier one: its explore-001.json): labelling in it now is
        of candidates, not of the seed set."""
        if any(n == "exploring" and int(i.get("iteration", 0)) == 1 for n, i in self.phases):
            return True
        workdir = self._settings.get("workdir")
        return workdir is not None and (Path(workdir) / "explore-001.json").exists()

    def _show_budget(self) -> None:
        calls = self.reference_calls
        pending = f"; labelling {self._labelling} now" if self._labelling else ""
        if self.budget is None:
            self.budget_bar.layout.display = "none"
            text = f"{calls} reference calls (no budget set){pending}"
        else:
            self.budget_bar.layout.display = None
            if self.budget_bar.max != self.budget:
                self.budget_bar.max = self.budget
            self._budget_value.set(min(calls, self.budget))
            share = 100.0 * calls / self.budget
            text = f"{calls} / {self.budget} reference calls ({share:.0f} % of the budget){pending}"
        self._budget_text.set(html.escape(text))

    # ------------------------------------------------------------------ end
    def _finished(self, result: LearnResult) -> None:
        with self._lock:  # the result is authoritative: every iteration, also of earlier sessions
            for record in result.iterations:
                self._append(record)
            self._labelling = 0
        self.result = result
        self.stopped = result.stop_reason == "stopped"
        self._show_budget()
        n = len(result.iterations)
        text = (f"{'stopped' if self.stopped else 'finished'} after {n} iteration{'s' * (n != 1)}, "
                f"{result.n_reference_calls} reference calls")
        if result.model_name:
            text += f"; model saved as {result.model_name} v{result.model_version}"
        elif self.stopped:
            text += "; run again with the same workdir to continue"
        self._set_status(text, now=True)
        self._phase_text.set("", now=True)
        self.stop_reason_html.value = (f"stop reason: <b>{html.escape(result.stop_reason)}</b> — "
                                       f"{html.escape(_meaning(result.stop_reason))}")
        self.stop_reason_html.layout.display = None
        failed = result.failed_tasks
        if failed:
            items = "".join(f"<li><code>{html.escape(key)}</code>: {html.escape(redact(str(error))[:300])}</li>"
                            for key, error in failed[:10])
            self._table_text.set(iterations_table(self.records) + f"<p>{len(failed)} reference calculations "
                                 f"failed (recorded, not run again):</p><ul>{items}</ul>", now=True)

    def _flush(self) -> None:
        for value in self._throttled():
            value.flush()
        for bars in list(self._bars.values()):
            bars.flush()
        self.validation_plot.flush()

    def _set_status(self, text: str, error: bool = False, now: bool = False) -> None:
        color = "#c62828" if error else "inherit"
        self._status_text.set(f"<b>Learn</b>: <span style='color:{color}'>{html.escape(redact(text))}</span>",
                              now=now)

    def _show_failure(self, err: BaseException) -> None:
        n = len(self.records)
        done = f" after {n} iteration{'s' * (n != 1)}" if n else ""
        self._set_status(f"failed{done}: {type(err).__name__}", error=True, now=True)
        self._phase_text.set("", now=True)
        message = redact(f"{type(err).__name__}: {err}")
        self.error_box.value = f"<pre style='white-space:pre-wrap;color:#c62828'>{html.escape(message)}</pre>"
        self.error_box.layout.display = None

    def close(self) -> None:
        """Cancel pending redraw timers and close the widgets."""
        for bars in list(getattr(self, "_bars", {}).values()):
            bars.close()
        if getattr(self, "validation_plot", None) is not None:
            self.validation_plot.close()
        super().close()


# ---------------------------------------------------------------------------------------------- texts
def validation_points(record: IterationRecord) -> list[tuple[str, float]]:
    """(series, meV/Å) of an iteration's validation curve: the committee's mean |F_mean - F_ref| per atom on its
    held-out calibration frames, the members' validation force RMSE, and the trust level lo (where known)."""
    validation = record.validation or {}
    lo = record.trust[0] if record.trust and record.trust[0] else None
    values = (("committee mean |ΔF| (held out)", validation.get("force_mean_error")),
              ("members' force RMSE (validation)", validation.get("members_force_rmse")), ("trust lo", lo))
    return [(series, 1000.0 * float(value)) for series, value in values if value is not None]


def phase_text(name: str, info: dict, seed: bool = False) -> str:
    """One line for a phase reported by :func:`mlmd_lab.learn.run`'s ``on_phase``."""
    k = info.get("iteration", "?")
    if name == "labelling":
        n = int(info.get("structures", 0))
        what = " (the seed set: the structures, rattles and strains)" if seed else ""
        return f"iteration {k} · labelling {n} structure{'s' * (n != 1)} with the reference{what}"
    if name == "training":
        return (f"iteration {k} · training the committee ({info.get('committee', '?')} members) on "
                f"{info.get('frames', '?')} labelled frames")
    if name == "exploring":
        p = info.get("pressure_GPa")
        where = f"{float(info['temperature_K']):g} K" + (" (NVT)" if p is None else f", {float(p):g} GPa (NPT)")
        return (f"iteration {k} · exploring: ML-MD at {where}, run {info.get('run', '?')} of "
                f"{info.get('runs', '?')}, {info.get('steps', '?')} steps")
    return f"iteration {k} · {name}"


def iterations_table(records: list[IterationRecord]) -> str:
    """HTML table, one row per iteration: frames, validation error (meV/Å), trust levels (eV/Å), the fractions
    accurate / candidate / failed per condition, candidates rejected / selected / labelled, reference calls."""
    if not records:
        return ""
    head = ("<tr><th>iteration</th><th>training frames</th><th>val |ΔF| (meV/Å)</th><th>trust lo–hi (eV/Å)</th>"
            "<th>accurate / candidate / failed</th><th>rejected</th><th>selected</th><th>labelled</th>"
            "<th>reference calls</th><th>stop</th></tr>")
    rows = []
    for r in records:
        err = (r.validation or {}).get("force_mean_error")
        fractions = "; ".join(f"{condition_label(c)}: {c.get('accurate', 0):.2f} / {c.get('candidate', 0):.2f} / "
                              f"{c.get('failed', 0):.2f}" for c in r.conditions)
        cells = [str(r.iteration), str(r.train_frames), "–" if err is None else f"{1000 * err:.0f}",
                 f"{r.trust[0]:.3f}–{r.trust[1]:.3f}" if r.trust and r.trust[1] else "–", fractions or "–",
                 str(len(r.rejected)), str(r.selected), str(r.labelled), str(r.reference_calls), r.stop or ""]
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return f"<table class='mlmd-learn-iterations'>{head}{''.join(rows)}</table>"

