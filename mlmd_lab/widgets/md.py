"""MD viewer: a trajectory in nglview with its thermodynamics and g(r); live while MD runs, with a Stop button.

A finished run (an :class:`~mlmd_lab.md.run.MDResult`, a run's ``workdir``, an ``.traj`` file, or a list of
``Atoms``)::

    MDViewer(result)                       # animation, temperature (K), energies (eV), pressure (GPa), g(r)

Live::

    viewer = MDViewer()
    viewer                                 # display it first                              # doctest: +SKIP
    viewer.run(potential, atoms, "nvt", temperature=300, steps=20000, workdir="run1")
    # MD runs in a background thread (md.run, same arguments); thermo points stream into the plots; Stop ends
    # the run after the current block; the trajectory goes into nglview when the run ends.

How Stop works: ``mlmd_lab.md.run`` has no stop request, so the viewer's callback raises a private exception at
the next log row after Stop was clicked; ``run`` closes its log and trajectory files on the way out (``finally``),
so ``md.log`` and ``md.traj`` stay complete and readable up to that row. The restart file is the last one written
(every ``restart_interval`` steps), so :func:`~mlmd_lab.md.run.resume` continues from there. Without a workdir
the viewer keeps the frames and rows it received.

DOM classes: ``mlmd-md`` (the widget), ``mlmd-md-status``, ``mlmd-md-stop``, ``mlmd-md-temperature``,
``mlmd-md-energy``, ``mlmd-md-pressure``, ``mlmd-md-rdf``, ``mlmd-md-view`` (box of the nglview widget, which
has ``mlmd-md-nglview``), ``mlmd-md-error``.
"""

from __future__ import annotations

import html
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ipywidgets as widgets
import numpy as np
from ase import Atoms

from mlmd_lab.errors import MLMDError
from mlmd_lab.widgets.plots import LivePlot, ThrottledValue

FS_PER_PS = 1000.0


def thermo_from_frames(frames: Sequence[Atoms]) -> dict[str, np.ndarray]:
    """Thermo columns (``step``, ``time_fs``, ``temperature_K``, ``epot_eV``, ``ekin_eV``, ``etot_eV``,
    ``pressure_GPa``) from frames' ``info``, momenta and attached results; missing values are NaN."""
    from ase.calculators.calculator import PropertyNotImplementedError

    rows: dict[str, list[float]] = {k: [] for k in ("step", "time_fs", "temperature_K", "epot_eV", "ekin_eV",
                                                    "etot_eV", "pressure_GPa")}
    for index, atoms in enumerate(frames):
        rows["step"].append(float(atoms.info.get("step", index)))
        rows["time_fs"].append(float(atoms.info.get("time_fs", np.nan)))
        ekin = float(atoms.get_kinetic_energy()) if atoms.has("momenta") else np.nan
        temperature = atoms.info.get("temperature_K")
        if temperature is None and atoms.has("momenta"):
            temperature = atoms.get_temperature()
        rows["temperature_K"].append(np.nan if temperature is None else float(temperature))
        try:
            epot = float(atoms.get_potential_energy()) if atoms.calc is not None else np.nan
        except (PropertyNotImplementedError, RuntimeError):
            epot = np.nan
        rows["epot_eV"].append(epot)
        rows["ekin_eV"].append(ekin)
        rows["etot_eV"].append(epot + ekin)
        rows["pressure_GPa"].append(_pressure_gpa(atoms))
    return {k: np.asarray(v, float) for k, v in rows.items()}


def _pressure_gpa(atoms: Atoms) -> float:
    """Pressure (GPa) from the attached stress plus the kinetic (ideal-gas) term; NaN when not available."""
    from ase import units
    from ase.calculators.calculator import PropertyNotImplementedError

    if atoms.calc is None or not atoms.pbc.all():
        return np.nan
    try:
        stress = atoms.get_stress(voigt=True, include_ideal_gas=atoms.has("momenta"))
    except (PropertyNotImplementedError, RuntimeError):
        return np.nan
    return float(-np.mean(stress[:3]) / units.GPa)


class MDViewer(widgets.VBox):
    """Trajectory animation, thermodynamics and g(r) of an MD run; :meth:`run` runs MD live.

    Args:
        source: what to show at once (see :meth:`load`); None for an empty viewer (e.g. before :meth:`run`).
        r_max: g(r) range in Å (default: 6 Å or less, half the smallest cell width).
        rdf_frames: g(r) averages over at most this many frames (the last ones).
        max_rate: most plot redraws per second.

    Attributes:
        frames: the frames shown (a list or a lazy ``ase.io.Trajectory``).
        thermo: thermo columns as arrays (units in the names, see :data:`mlmd_lab.md.LOG_COLUMNS`).
        result: the :class:`MDResult` of the last :meth:`run` (after Stop too: ``result.stopped`` says so; None
            when it failed).
        error: the exception of the last :meth:`run`, if any (MDStoppedError: a safety stop).
        stopped: True when the last run was ended with Stop.
    """

    def __init__(self, source: Any = None, *, r_max: float | None = None, rdf_frames: int = 50,
                 max_rate: float = 5.0) -> None:
        self.r_max = r_max
        self.rdf_frames = int(rdf_frames)
        self.frames: Sequence[Atoms] = []
        self.thermo: dict[str, np.ndarray] = {}
        self.result: Any = None
        self.error: BaseException | None = None
        self.stopped = False
        self.rdf_result: Any = None
        self.view: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rows: list[dict[str, float]] = []
        self._live_frames: list[Atoms] = []
        self._total_steps: int | None = None
        self._workdir: str | os.PathLike | None = None

        self.status = widgets.HTML("<b>MD</b>: nothing loaded")
        self.status.add_class("mlmd-md-status")
        self._status_text = ThrottledValue(self.status, max_rate=max_rate)  # a log row per block would flood
        self.stop_button = widgets.Button(description="Stop", icon="stop", button_style="danger", disabled=True,
                                          tooltip="end the MD run after the current block (files stay readable)")
        self.stop_button.add_class("mlmd-md-stop")
        self.stop_button.on_click(lambda _: self.stop())
        self.temperature_plot = LivePlot(["temperature"], title="Temperature", x_label="time", x_unit="ps",
                                         y_label="temperature", y_unit="K", max_rate=max_rate, height="230px")
        self.temperature_plot.add_class("mlmd-md-temperature")
        self.energy_plot = LivePlot(["potential", "total"], title="Energy", x_label="time", x_unit="ps",
                                    y_label="energy", y_unit="eV", max_rate=max_rate, height="230px")
        self.energy_plot.add_class("mlmd-md-energy")
        self.pressure_plot = LivePlot(["pressure"], title="Pressure", x_label="time", x_unit="ps",
                                      y_label="pressure", y_unit="GPa", max_rate=max_rate, height="230px")
        self.pressure_plot.add_class("mlmd-md-pressure")
        self.rdf_plot = LivePlot(title="Radial distribution function", x_label="r", x_unit="Å", y_label="g(r)",
                                 max_rate=max_rate, height="260px")
        self.rdf_plot.add_class("mlmd-md-rdf")
        self.view_box = widgets.Box(layout=widgets.Layout(width="100%", min_height="0px"))
        self.view_box.add_class("mlmd-md-view")
        self.error_box = widgets.HTML("", layout=widgets.Layout(display="none"))
        self.error_box.add_class("mlmd-md-error")
        header = widgets.HBox([self.stop_button, self.status], layout=widgets.Layout(align_items="center"))
        # Plots without data stay out of the page (a hidden bqplot figure draws negative sizes: console errors)
        self.thermo_box = widgets.HBox([self.temperature_plot, self.energy_plot], layout=widgets.Layout(width="100%"))
        self.rdf_box = widgets.Box(layout=widgets.Layout(width="100%"))
        super().__init__(children=[header, self.error_box, self.view_box, self.thermo_box, self.rdf_box])
        self.add_class("mlmd-md")
        if source is not None:
            self.load(source)

    # ------------------------------------------------------------------ finished runs
    def load(self, source: Any) -> MDViewer:
        """Show a run: an ``MDResult``, a workdir (``md.traj`` + ``md.log``), a ``.traj``/other trajectory file,
        or a list of ``Atoms`` (thermo from their ``info`` and results). Returns the viewer."""
        frames, thermo, label = _read_source(source)
        self.frames, self.thermo = frames, thermo
        self._show_thermo(thermo)
        self._show_structure(frames)
        self._show_rdf(frames)
        self._set_status(f"{label}: {len(frames)} frames" + _last_row_text(thermo))
        return self

    def _show_thermo(self, thermo: dict[str, np.ndarray]) -> None:
        time_ps = np.asarray(thermo.get("time_fs", []), float) / FS_PER_PS
        if time_ps.size and not np.isfinite(time_ps).any():  # frames without time: step number instead
            time_ps = np.asarray(thermo.get("step", np.arange(time_ps.size)), float)
        for plot, series, column in ((self.temperature_plot, "temperature", "temperature_K"),
                                     (self.energy_plot, "potential", "epot_eV"),
                                     (self.energy_plot, "total", "etot_eV"),
                                     (self.pressure_plot, "pressure", "pressure_GPa")):
            values = np.asarray(thermo.get(column, np.full(time_ps.size, np.nan)), float)
            plot.set_data(series, time_ps, values)
        has_pressure = np.isfinite(np.asarray(thermo.get("pressure_GPa", []), float)).any()
        self._show_pressure(bool(has_pressure))

    @property
    def pressure_shown(self) -> bool:
        """True when the pressure plot is on the page (periodic runs)."""
        return self.pressure_plot in self.thermo_box.children

    @property
    def rdf_shown(self) -> bool:
        """True when the g(r) plot is on the page (periodic frames)."""
        return self.rdf_plot in self.rdf_box.children

    def _show_pressure(self, show: bool) -> None:
        if show != self.pressure_shown:
            plots = [self.temperature_plot, self.energy_plot]
            self.thermo_box.children = [*plots, self.pressure_plot] if show else plots

    def _show_structure(self, frames: Sequence[Atoms]) -> None:
        if not len(frames):
            self.view_box.children = []
            self.view = None
            return
        import nglview

        view = nglview.show_asetraj(frames)
        if frames[0].pbc.any():
            view.add_unitcell()
        view.layout = widgets.Layout(width="100%", height="360px")
        view.add_class("mlmd-md-nglview")
        old, self.view = self.view, view
        self.view_box.children = [view]
        if old is not None:
            old.close()

    def _show_rdf(self, frames: Sequence[Atoms]) -> None:
        from mlmd_lab.analysis import rdf
        from mlmd_lab.analysis.structure import perpendicular_widths

        self.rdf_result = None
        if not len(frames) or not frames[0].pbc.all():
            self.rdf_box.children = []
            return
        start = max(0, len(frames) - self.rdf_frames)
        subset = [frames[k] for k in range(start, len(frames))]
        half = min(0.5 * float(perpendicular_widths(a.cell.array).min()) for a in subset)
        r_max = self.r_max if self.r_max is not None else min(6.0, 0.999 * half)
        try:
            self.rdf_result = rdf(subset, r_max=r_max, bin_width=min(0.02, r_max / 50))
        except MLMDError as err:
            self.rdf_box.children = [widgets.HTML(f"g(r) not available: {html.escape(str(err))}")]
            return
        for pair, g in self.rdf_result.g.items():
            self.rdf_plot.set_data("–".join(pair), self.rdf_result.r, g)
        self.rdf_plot.figure.title = f"Radial distribution function ({len(subset)} frames)"
        self.rdf_box.children = [self.rdf_plot]

    # ------------------------------------------------------------------ live runs
    def run(self, potential: Any, atoms: Atoms, *args: Any, callbacks: Sequence[Callable[[dict], None]] = (),
            **kwargs: Any) -> MDViewer:
        """Start :func:`mlmd_lab.md.run` (same arguments) in a background thread and stream it into the viewer.

        The cell returns at once; Stop (or :meth:`stop`) ends the run, :meth:`wait` blocks until it ends. When
        it ends, the trajectory is loaded (nglview, g(r)) and the thermo plots show the whole log.
        """
        if self.running:
            raise MLMDError("an MD run is already going in this viewer; stop() or wait() first")
        if not isinstance(atoms, Atoms):
            raise MLMDError(f"MDViewer.run needs ase.Atoms as the structure, not {type(atoms).__name__}")
        self._stop.clear()
        self.result, self.error, self.stopped = None, None, False
        self._rows, self._live_frames = [], []
        self._total_steps = int(kwargs.get("steps", 1000))
        self._workdir = kwargs.get("workdir")
        self.error_box.layout.display = "none"
        for plot in (self.temperature_plot, self.energy_plot, self.pressure_plot):
            plot.clear()
        self.stop_button.disabled = False
        self._set_status("starting (compiling the potential)…")
        all_callbacks = [*callbacks, self._on_row]  # last: the row that ends a stopped run reaches all
        self._thread = threading.Thread(target=self._run, args=(potential, atoms, args, kwargs, all_callbacks),
                                        daemon=True, name="mlmd-md-viewer")
        self._thread.start()
        return self

    def _run(self, potential, atoms, args, kwargs, callbacks) -> None:
        from mlmd_lab.md import MDStoppedError
        from mlmd_lab.md import run as md_run

        try:
            self.result = md_run(potential, atoms, *args, callbacks=callbacks, **kwargs)
            # After Stop md.run ends cleanly at the end of its block (restart written, result.stopped set)
            self.stopped = bool(self.result.stopped)
            self.load(self.result)
            self._set_status(("stopped: " if self.stopped else "finished: ") + self._status_suffix())
        except MDStoppedError as err:  # a safety stop: show why, and the run up to the last good step
            self.error = err
            self._show_error(err)
            self.load(err.result)
            self._set_status("stopped for safety: " + self._status_suffix(), error=True)
        except BaseException as err:  # noqa: BLE001 (shown in the widget, re-raised by wait())
            self.error = err
            self._show_error(err)
            self._set_status(f"failed: {type(err).__name__}", error=True)
        finally:
            self.stop_button.disabled = True
            for plot in (self.temperature_plot, self.energy_plot, self.pressure_plot, self.rdf_plot):
                plot.flush()

    def _on_row(self, row: dict[str, Any]) -> bool:
        """The MD callback: one log row (units in the keys), with ``atoms`` on trajectory steps; True after Stop
        (md.run then ends at the end of its block)."""
        values = {k: float(v) for k, v in row.items() if k != "atoms"}
        self._rows.append(values)
        if "atoms" in row and self._workdir is None:
            self._live_frames.append(row["atoms"])
        t = values.get("time_fs", np.nan) / FS_PER_PS
        self.temperature_plot.append("temperature", t, values.get("temperature_K", np.nan))
        self.energy_plot.append("potential", t, values.get("epot_eV", np.nan))
        self.energy_plot.append("total", t, values.get("etot_eV", np.nan))
        pressure = values.get("pressure_GPa", np.nan)
        if np.isfinite(pressure):
            self.pressure_plot.append("pressure", t, pressure)
            if not self.pressure_shown:
                self._show_pressure(True)
        if self._stop.is_set():
            return True
        self._set_status("running: " + _row_text(values, self._total_steps), throttled=True)
        return False

    def stop(self) -> None:
        """End a live run at its next log row (thread-safe)."""
        self._stop.set()
        self.stop_button.disabled = True
        if self.running:
            self._set_status("stopping…")

    @property
    def running(self) -> bool:
        """True while a live run's thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> Any:
        """Block until the live run ends; re-raises its error; returns the MDResult (after Stop: the run so far,
        ``result.stopped`` set, restart written so :func:`mlmd_lab.md.resume` continues)."""
        if self._thread is None:
            raise MLMDError("nothing to wait for: call run(...) first")
        self._thread.join(timeout)
        if self.error is not None:
            raise self.error
        return self.result

    @property
    def rows(self) -> list[dict[str, float]]:
        """The log rows received by the live run (units in the keys)."""
        return list(self._rows)

    # ------------------------------------------------------------------ display helpers
    def _status_suffix(self) -> str:
        last = self._rows[-1] if self._rows else {}
        text = _row_text(last, self._total_steps) if last else "no steps"
        return f"{text}; {len(self.frames)} frames"

    def _set_status(self, text: str, error: bool = False, throttled: bool = False) -> None:
        """Show ``text``; ``throttled`` for the per-row line (a few updates a second), else at once (and a pending
        row line is dropped, so it never overwrites a final status)."""
        color = "#c62828" if error else "inherit"
        self._status_text.set(f"<b>MD</b>: <span style='color:{color}'>{html.escape(text)}</span>", now=not throttled)

    def _show_error(self, err: BaseException) -> None:
        self.error_box.value = (f"<pre style='white-space:pre-wrap;color:#c62828'>"
                                f"{html.escape(f'{type(err).__name__}: {err}')}</pre>")
        self.error_box.layout.display = None

    def close(self) -> None:
        """Stop a live run and close the widgets."""
        if hasattr(self, "_stop"):  # not on a half-built viewer (ipywidgets closes it on delete)
            self._stop.set()
            if self.view is not None:
                self.view.close()
        super().close()


def _row_text(row: dict[str, float], total: int | None) -> str:
    step = int(row.get("step", 0))
    parts = [f"step {step}" + (f" / {total}" if total else "")]
    if np.isfinite(row.get("time_fs", np.nan)):
        parts.append(f"t = {row['time_fs'] / FS_PER_PS:.3f} ps")
    if np.isfinite(row.get("temperature_K", np.nan)):
        parts.append(f"T = {row['temperature_K']:.1f} K")
    if np.isfinite(row.get("pressure_GPa", np.nan)):
        parts.append(f"p = {row['pressure_GPa']:.3g} GPa")
    return " · ".join(parts)


def _last_row_text(thermo: dict[str, np.ndarray]) -> str:
    if not thermo or not len(next(iter(thermo.values()))):
        return ""
    return "; last: " + _row_text({k: float(v[-1]) for k, v in thermo.items()}, None)


def _read_source(source: Any) -> tuple[Sequence[Atoms], dict[str, np.ndarray], str]:
    """(frames, thermo, label) of an MDResult, a workdir, a trajectory file or a list of Atoms."""
    from mlmd_lab.md import MDResult, read_log

    if isinstance(source, MDResult):
        frames = source.trajectory
        thermo = source.thermo if len(next(iter(source.thermo.values()), [])) else thermo_from_frames(frames)
        return frames, thermo, f"run of {source.steps} steps"
    if isinstance(source, Atoms):
        source = [source]
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if path.is_dir():
            traj, log = path / "md.traj", path / "md.log"
            if not traj.exists():
                raise MLMDError(f"{path} has no md.traj; pass an MD workdir (run(..., workdir=...)) or a trajectory "
                                "file")
        elif path.exists():
            traj, log = path, path.with_name("md.log")
        else:
            raise MLMDError(f"{path} does not exist; pass an MD workdir, a trajectory file or a list of Atoms")
        frames = _read_frames(traj)
        thermo = read_log(log) if log.exists() else thermo_from_frames(frames)
        return frames, thermo, str(path)
    if isinstance(source, Sequence) and all(isinstance(a, Atoms) for a in source):
        frames = list(source)
        return frames, thermo_from_frames(frames), "trajectory"
    raise MLMDError(f"MDViewer cannot show a {type(source).__name__}: pass an MDResult, an MD workdir, a trajectory "
                    "file or a list of ase.Atoms")


def _read_frames(path: Path) -> Sequence[Atoms]:
    if path.suffix == ".traj":
        from ase.io import Trajectory

        if path.stat().st_size == 0:
            return []
        return Trajectory(path, "r")
    import ase.io

    return ase.io.read(path, ":")
