"""SLHMC monitor: a self-learning hybrid Monte Carlo chain live — acceptance, reference vs ML energies, running
production averages with block error bars, the learning curve of the potential, and a Stop button.

>>> monitor = SLHMCMonitor()
>>> monitor                                   # display it first                              # doctest: +SKIP
>>> monitor.run(EMT(), potential, atoms, temperature=600, n_trials=200, learn_trials=60, retrain_every=20,
...             workdir="runs/cu-slhmc")      # slhmc.run's arguments; the chain runs in a background thread
>>> result = monitor.wait()                   # the SLHMCResult (or click Stop: the chain ends after this trial)

How Stop works: :func:`mlmd_lab.slhmc.run` calls ``on_trial`` after each trial is recorded and its restart
written; the monitor's hook returns True once Stop was clicked, so the chain ends cleanly after the current
trial (a running DFT calculation is finished first, never thrown away). ``wait()`` then returns the result of
the trials done (``result.stopped``), and ``run`` with the same workdir continues the same chain (a monitor
resuming a workdir shows the earlier trials of its ``chain.log`` too).

Plots (x: the trial index of the chain log, 0-based; the learning curve: trials done):

- acceptance: the running acceptance rate of the chain, and of the learning and the production phase each;
- energy (eV): the chain state's reference energy after each trial, and each proposal's reference and ML energy
  (a constant offset between them does not matter: only energy differences enter);
- production averages (eV): the running mean of the reference energy over the production trials with its
  block-averaged standard error (mean ± error: the same :func:`~mlmd_lab.slhmc.result.series_average` as
  :meth:`SLHMCResult.averages`), and a table (energy, volume and pressure where defined: mean ± error, τ_int,
  reference calls per independent sample), replaced by ``result.averages()`` and the detailed-balance
  diagnostic ``result.balance()`` when the chain ends;
- learning curve: the acceptance rate of each window of ``window`` trials, a mark at each retraining.

DOM classes: ``mlmd-slhmc`` (the widget), ``mlmd-slhmc-status``, ``mlmd-slhmc-stop``, ``mlmd-slhmc-acceptance``,
``mlmd-slhmc-energy``, ``mlmd-slhmc-averages``, ``mlmd-slhmc-learning``, ``mlmd-slhmc-table``,
``mlmd-slhmc-error``.
"""

from __future__ import annotations

import html
import threading
from pathlib import Path
from typing import Any

import bqplot
import ipywidgets as widgets
import numpy as np

from mlmd_lab.analysis.statistics import MIN_SAMPLES
from mlmd_lab.errors import MLMDError
from mlmd_lab.slhmc.chain import trial_row
from mlmd_lab.slhmc.result import Average, SLHMCResult, series_average
from mlmd_lab.slhmc.store import read_chain_log
from mlmd_lab.widgets.plots import LivePlot

MIN_AVERAGE = MIN_SAMPLES  # production trials before a running average is shown (as SLHMCResult.averages)
#: (key in the rows, name in the table, unit) of the averaged observables.
OBSERVABLES = (("E_ref_eV", "energy", "eV"), ("volume_A3", "volume", "Å³"), ("pressure_GPa", "pressure", "GPa"))


class SLHMCMonitor(widgets.VBox):
    """Live view of an SLHMC chain run by :meth:`run` in a background thread.

    Args:
        window: trials per point of the learning curve (acceptance per window).
        max_rate: most plot redraws per second.

    Attributes:
        rows: one dict per trial (the ``on_trial`` rows of :func:`mlmd_lab.slhmc.run`; trials of an earlier run
            in the same workdir read from its ``chain.log``, without the proposal's reference energy).
        retrains: the info dict of every retraining seen (trial: trials done, frames, errors).
        result: the :class:`SLHMCResult` of the last run (None while running or after a failure).
        error: the exception the last run raised, if any (re-raised by :meth:`wait`).
        stopped: True when the last run was ended with Stop.
    """

    def __init__(self, *, window: int = 10, max_rate: float = 5.0) -> None:
        if int(window) < 1:
            raise MLMDError(f"SLHMCMonitor window={window} must be >= 1 (trials per learning-curve point)")
        self.window = int(window)
        self.rows: list[dict] = []
        self.retrains: list[dict] = []
        self.result: SLHMCResult | None = None
        self.error: BaseException | None = None
        self.stopped = False
        self._settings: dict[str, Any] = {}
        self._phase_counts: dict[str, list[int]] = {"learning": [0, 0], "production": [0, 0]}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.RLock()
        self._build(max_rate)

    # ------------------------------------------------------------------ layout
    def _build(self, max_rate: float) -> None:
        self.status = widgets.HTML("<b>SLHMC</b>: not started")
        self.status.add_class("mlmd-slhmc-status")
        self.stop_button = widgets.Button(description="Stop", icon="stop", button_style="danger", disabled=True,
                                          tooltip="end the chain after the current trial (the workdir resumes)")
        self.stop_button.add_class("mlmd-slhmc-stop")
        self.stop_button.on_click(lambda _: self.stop())
        common = dict(max_rate=max_rate, height="240px")
        self.acceptance_plot = LivePlot(["running", "learning", "production"], title="Acceptance", x_label="trial",
                                        y_label="acceptance rate", **common)
        self.acceptance_plot.add_class("mlmd-slhmc-acceptance")
        self.energy_plot = LivePlot(["reference (chain state)", "reference (proposal)", "ML (proposal)"],
                                    title="Reference vs ML energy", x_label="trial", y_label="energy", y_unit="eV",
                                    **common)
        self.energy_plot.add_class("mlmd-slhmc-energy")
        self.averages_plot = LivePlot(["mean", "mean + error", "mean − error"], title="Production average",
                                      x_label="trial", y_label="⟨E_ref⟩", y_unit="eV", **common)
        self.averages_plot.add_class("mlmd-slhmc-averages")
        self.learning_plot = LivePlot(["acceptance per window"], title="Learning curve", x_label="trials done",
                                      y_label="acceptance rate", markers=True, **common)
        self.learning_plot.add_class("mlmd-slhmc-learning")
        self.retrain_marks = bqplot.Scatter(x=np.zeros(0), y=np.zeros(0), marker="triangle-down", colors=["#d62728"],
                                            scales={"x": self.learning_plot.x_scale, "y": self.learning_plot.y_scale},
                                            labels=["retrained"], display_legend=True, default_size=64)
        self.learning_plot.figure.marks = [*self.learning_plot.figure.marks, self.retrain_marks]
        self.table = widgets.HTML("")
        self.table.add_class("mlmd-slhmc-table")
        self.error_box = widgets.HTML("", layout=widgets.Layout(display="none"))
        self.error_box.add_class("mlmd-slhmc-error")
        header = widgets.HBox([self.stop_button, self.status], layout=widgets.Layout(align_items="center"))
        row1 = widgets.HBox([self.acceptance_plot, self.energy_plot], layout=widgets.Layout(width="100%"))
        row2 = widgets.HBox([self.averages_plot, self.learning_plot], layout=widgets.Layout(width="100%"))
        super().__init__(children=[header, self.error_box, row1, row2, self.table])
        self.add_class("mlmd-slhmc")

    def _plots(self) -> list[LivePlot]:
        return [self.acceptance_plot, self.energy_plot, self.averages_plot, self.learning_plot]

    # ------------------------------------------------------------------ control
    def run(self, reference, potential, atoms, **kwargs) -> SLHMCMonitor:
        """Run :func:`mlmd_lab.slhmc.run` (same arguments) in a background thread; returns the monitor.

        The chain's progress bar is off (this widget shows the progress); an ``on_trial`` given is called too,
        and stops the chain as well when it returns True.
        """
        from mlmd_lab import slhmc

        if self.running:
            raise MLMDError("an SLHMC chain is already running in this monitor; stop() it or wait() first")
        user_hook = kwargs.pop("on_trial", None)
        kwargs["progress"] = False
        self._reset(kwargs)

        def hook(row: dict) -> bool:
            self._add_row(row)
            wanted = user_hook(row) is True if user_hook is not None else False
            return wanted or self._stop.is_set()

        def target() -> None:
            try:
                self._finished(slhmc.run(reference, potential, atoms, on_trial=hook, **kwargs))
            except BaseException as err:  # shown in the widget and re-raised by wait()
                self.error = err
                self._show_failure(err)
            finally:
                self.stop_button.disabled = True
                for plot in self._plots():
                    plot.flush()

        self._set_status(f"starting: the reference on the starting structure, then {kwargs.get('n_trials', '?')} "
                         "trials")
        self.stop_button.disabled = False
        self._thread = threading.Thread(target=target, daemon=True, name="mlmd-slhmc-monitor")
        self._thread.start()
        return self

    def _reset(self, kwargs: dict) -> None:
        self._stop.clear()
        self.result, self.error, self.stopped = None, None, False
        self.rows, self.retrains = [], []
        self._phase_counts: dict[str, list[int]] = {"learning": [0, 0], "production": [0, 0]}
        self._settings = {"n_trials": kwargs.get("n_trials"), "learn_trials": int(kwargs.get("learn_trials") or 0),
                          "workdir": kwargs.get("workdir")}
        for plot in self._plots():
            plot.clear()
        self.retrain_marks.x, self.retrain_marks.y = np.zeros(0), np.zeros(0)
        self.table.value = ""
        self.error_box.value, self.error_box.layout.display = "", "none"

    def stop(self) -> None:
        """End the chain after the current trial (thread-safe; the workdir stays resumable)."""
        self._stop.set()
        self.stop_button.disabled = True
        if self.running:
            self._set_status("stopping after the current trial…")

    @property
    def running(self) -> bool:
        """True while :meth:`run`'s thread runs."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def done(self) -> bool:
        """True once the chain started by :meth:`run` has ended (finished, stopped or failed)."""
        return self._thread is not None and not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> SLHMCResult | None:
        """Block until the chain ends (at most ``timeout`` s); re-raises its error; returns the SLHMCResult
        (None if the timeout passed first)."""
        if self._thread is None:
            raise MLMDError("nothing to wait for: call run() first")
        self._thread.join(timeout)
        if self.error is not None:
            raise self.error
        return self.result

    # ------------------------------------------------------------------ rows
    def _add_row(self, row: dict) -> None:
        with self._lock:
            if not self.rows and row["trial"] > 0:
                self._add_earlier(row["trial"])
            self._append(row)
        self._set_status(self._progress_text(row))

    def _add_earlier(self, first: int) -> None:
        """Trials 0 .. first-1 of a resumed chain, from the workdir's chain.log."""
        workdir = self._settings.get("workdir")
        if workdir is None:
            return
        for values in read_chain_log(Path(workdir)):
            if int(values[0]) < first:
                self._append(dict(trial_row(values, self._settings["learn_trials"]), E_ref_proposal_eV=np.nan))

    def _append(self, row: dict) -> None:
        self.rows.append(row)
        k = row["trial"]
        self.acceptance_plot.append("running", k, row["acceptance"])
        counts = self._phase_counts[row["phase"]]
        counts[0] += int(row["accepted"])
        counts[1] += 1
        self.acceptance_plot.append(row["phase"], k, counts[0] / counts[1])
        proposal = row["E_ref_eV"] if row["accepted"] else row.get("E_ref_proposal_eV", np.nan)
        self.energy_plot.append("reference (chain state)", k, row["E_ref_eV"])
        self.energy_plot.append("reference (proposal)", k, proposal)
        self.energy_plot.append("ML (proposal)", k, row["E_ML_eV"])
        if (k + 1) % self.window == 0:
            recent = [r["accepted"] for r in self.rows if r["trial"] > k - self.window]
            self.learning_plot.append("acceptance per window", k + 1, float(np.mean(recent)))
        if row.get("retrain") is not None:
            self._mark_retrain(row["retrain"])
        if row["phase"] == "production":
            self._update_average(row)

    def _mark_retrain(self, info: dict) -> None:
        self.retrains.append(info)
        xs = np.array([float(r["trial"]) for r in self.retrains])
        with self.retrain_marks.hold_sync():
            self.retrain_marks.x, self.retrain_marks.y = xs, np.ones_like(xs)

    def _update_average(self, row: dict) -> None:
        production = [r for r in self.rows if r["phase"] == "production"]
        if len(production) < MIN_AVERAGE:
            return
        calls = int(row.get("production_calls", len(production)))
        averages = running_averages(production, calls)
        energy = averages.get("energy")
        if energy is not None:
            for name, value in (("mean", energy.mean), ("mean + error", energy.mean + energy.stderr),
                                ("mean − error", energy.mean - energy.stderr)):
                self.averages_plot.append(name, row["trial"], value)
        self.table.value = averages_table(averages, title="production averages so far (running)")

    # ------------------------------------------------------------------ end
    def _finished(self, result: SLHMCResult) -> None:
        if not self.rows and len(result.accepted):  # a workdir whose chain was already complete: no new trial
            with self._lock:
                self._add_earlier(len(result.accepted))
        self.result = result
        self.stopped = bool(result.stopped)
        done = len(result.accepted)
        calls = f"{result.n_reference_calls} reference calls"
        if self.stopped:
            again = ("run again with the same workdir to continue the chain" if result.workdir is not None
                     else "without a workdir the chain cannot be continued")
            text = f"stopped after {done} of {self._settings.get('n_trials')} trials ({calls}); {again}"
        else:
            text = f"finished: {done} trials, acceptance {result.acceptance_rate:.3f}, {calls}"
        self._set_status(text)
        self.table.value = final_table(result)

    def _progress_text(self, row: dict) -> str:
        total = self._settings.get("n_trials") or "?"
        phases = [f"{phase} {accepted / n:.2f}" for phase, (accepted, n) in self._phase_counts.items() if n]
        text = (f"trial {row['trial'] + 1} / {total} ({row['phase']}) · acceptance {row['acceptance']:.2f}"
                f" ({', '.join(phases)}) · {row.get('reference_calls', '?')} reference calls")
        if self.retrains:
            last = self.retrains[-1]
            text += f" · retrained {len(self.retrains)}× (last after trial {last['trial']}, {last['frames']} frames)"
        if self._stop.is_set():
            text += " · stopping after the current trial…"
        return text

    def _set_status(self, text: str, error: bool = False) -> None:
        color = "#c62828" if error else "inherit"
        self.status.value = f"<b>SLHMC</b>: <span style='color:{color}'>{html.escape(text)}</span>"

    def _show_failure(self, err: BaseException) -> None:
        done = f" after {len(self.rows)} trials" if self.rows else ""
        self._set_status(f"failed{done}: {type(err).__name__}", error=True)
        self.error_box.value = (f"<pre style='white-space:pre-wrap;color:#c62828'>"
                                f"{html.escape(f'{type(err).__name__}: {err}')}</pre>")
        self.error_box.layout.display = None


# ---------------------------------------------------------------------------------------------- tables
def running_averages(production: list[dict], calls: int) -> dict[str, Average]:
    """Averages of the production rows so far (energy; volume, pressure where finite), as ``averages()``."""
    out = {}
    for key, name, _ in OBSERVABLES:
        values = np.array([r[key] for r in production], np.float64)
        if len(values) >= MIN_AVERAGE and np.all(np.isfinite(values)):
            out[name] = series_average(values, calls)
    return out


def averages_table(averages: dict[str, Average], title: str = "production averages",
                   balance: Average | None = None) -> str:
    """HTML table: mean ± block error, τ_int (trials), effective samples, reference calls per sample, plateau."""
    if not averages and balance is None:
        return ""
    head = ("<tr><th></th><th>mean ± error</th><th>τ_int (trials)</th><th>independent samples</th>"
            "<th>reference calls / sample</th><th>plateau</th></tr>")
    units = {name: unit for _, name, unit in OBSERVABLES}
    rows = [_table_row(name, a, units[name]) for name, a in averages.items()]
    if balance is not None:
        rows.append(_table_row("balance ⟨d⟩ (0 if exact)", balance, ""))
    return (f"<p><b>{html.escape(title)}</b></p><table class='mlmd-slhmc-averages-table'>{head}{''.join(rows)}"
            "</table>")


def _table_row(name: str, a: Average, unit: str) -> str:
    cells = [f"{a.mean:.6g} ± {a.stderr:.2g} {unit}".strip(), f"{a.tau_int:.1f}", f"{a.n_effective:.1f}",
             f"{a.reference_calls_per_sample:.1f}", "yes" if a.plateau else "no (chain too short)"]
    return f"<tr><td>{html.escape(name)}</td>{''.join(f'<td>{html.escape(c)}</td>' for c in cells)}</tr>"


def final_table(result: SLHMCResult) -> str:
    """The table of ``result.averages()`` and ``result.balance()``, or why there is none."""
    try:
        averages = result.averages()
    except MLMDError as err:
        return f"<p class='mlmd-slhmc-note'>{html.escape(str(err))}</p>"
    try:
        balance = result.balance()
    except MLMDError:
        balance = None
    start, stop = result.phases["production"]
    title = f"production averages (trials {start}–{stop - 1}, potential frozen: exact)"
    return averages_table(averages, title=title, balance=balance)
