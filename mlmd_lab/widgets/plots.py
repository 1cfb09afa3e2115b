"""A live line plot for notebooks: named series, thread-safe appends, throttled redraws (bqplot).

>>> plot = LivePlot(["train", "validation"], x_label="epoch", y_label="force RMSE", y_unit="meV/Å", log_y=True)
>>> plot                                  # display it in a cell              # doctest: +SKIP
>>> plot.append("train", 1, 120.0)        # from any thread, e.g. a training callback

Appending only stores the point; the figure is redrawn at most ``max_rate`` times a second (a timer sends the
last points of a burst), so a callback firing thousands of times a second costs the browser nothing. Points are
kept in Python (``plot.data(series)``); the figure shows at most :data:`MAX_DRAWN_POINTS` of them per series
(evenly thinned, the first and last points always kept), so a 4,000-epoch curve redrawn five times a second
stays a few kilobytes a message. :class:`ThrottledValue` does the same for a text widget (an epoch counter,
an MD status line): the latest value wins, at most ``max_rate`` updates a second.

Why throttle at all: every widget update is a message through the Jupyter server's websocket; a training loop
at 140 epochs a second (or an MD log row per block) floods a busy browser, which then stops reading its socket,
misses the server's pings and is disconnected, and replies in flight at that moment are lost (cells stay
"[*]"). A few updates a second look the same to a person.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence

import bqplot
import ipywidgets as widgets
import numpy as np

from mlmd_lab.errors import MLMDError

#: Most points per series sent to the figure (thinned evenly beyond it; :meth:`LivePlot.data` keeps all).
MAX_DRAWN_POINTS = 1000

#: Colours of the series, in order (matplotlib's tab10).
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf")


def axis_label(label: str, unit: str = "") -> str:
    """``"force RMSE (meV/Å)"`` from a label and a unit; the label alone when there is no unit."""
    return f"{label} ({unit})".strip() if unit else label


class LivePlot(widgets.VBox):
    """A bqplot line figure with named series, fed point by point from any thread.

    Args:
        series: names of the series to create at once (more appear on their first :meth:`append`).
        title: figure title.
        x_label, y_label: axis names; x_unit, y_unit: their units, shown as ``name (unit)``.
        log_y: logarithmic y axis (non-positive values are kept in :meth:`data` but not drawn).
        max_rate: most redraws per second (default 5).
        height: CSS height of the figure, e.g. ``"260px"``.
        markers: draw a marker on every point (useful for few points, e.g. epochs).

    DOM classes: ``mlmd-liveplot`` on the widget, ``mlmd-liveplot-figure`` on the bqplot figure.
    """

    def __init__(self, series: Iterable[str] = (), *, title: str = "", x_label: str = "", y_label: str = "",
                 x_unit: str = "", y_unit: str = "", log_y: bool = False, max_rate: float = 5.0,
                 height: str = "260px", markers: bool = False) -> None:
        if not max_rate > 0:
            raise MLMDError(f"LivePlot max_rate={max_rate} must be > 0 (redraws per second)")
        self.log_y = bool(log_y)
        self.max_rate = float(max_rate)
        self.markers = markers
        self._lock = threading.RLock()
        self._x: dict[str, list[float]] = {}
        self._y: dict[str, list[float]] = {}
        self._dirty: set[str] = set()
        self._limiter = RateLimiter(self._draw, self.max_rate, self._lock)
        self.redraws = 0
        self.x_scale = bqplot.LinearScale()
        self.y_scale = bqplot.LogScale() if self.log_y else bqplot.LinearScale()
        self.x_axis = bqplot.Axis(scale=self.x_scale, label=axis_label(x_label, x_unit), grid_lines="dashed")
        # 7 significant digits: a total energy of -2079.93 eV fluctuating by 0.01 eV needs them
        self.y_axis = bqplot.Axis(scale=self.y_scale, label=axis_label(y_label, y_unit), side="left",
                                  grid_lines="dashed", tick_format=".4~g" if self.log_y else ".7~g",
                                  label_offset="66px")
        self.lines: dict[str, bqplot.Lines] = {}
        self.figure = bqplot.Figure(marks=[], axes=[self.x_axis, self.y_axis], title=title,
                                    fig_margin={"top": 40, "bottom": 45, "left": 78, "right": 15},
                                    legend_location="top-right", animation_duration=0,
                                    layout=widgets.Layout(width="100%", height=height, min_width="280px"))
        self.figure.add_class("mlmd-liveplot-figure")
        super().__init__(children=[self.figure], layout=widgets.Layout(flex="1 1 0%", min_width="280px"))
        self.add_class("mlmd-liveplot")
        for name in series:
            self.add_series(name)

    # ------------------------------------------------------------------ series
    @property
    def series(self) -> list[str]:
        """Names of the series, in order of creation."""
        with self._lock:
            return list(self._x)

    def add_series(self, name: str, color: str | None = None) -> bqplot.Lines:
        """Create an empty series (a no-op if it exists); returns its bqplot ``Lines`` mark."""
        with self._lock:
            if name in self.lines:
                return self.lines[name]
            color = color or COLORS[len(self.lines) % len(COLORS)]
            line = bqplot.Lines(x=np.zeros(0), y=np.zeros(0), scales={"x": self.x_scale, "y": self.y_scale},
                                labels=[str(name)], display_legend=True, colors=[color], stroke_width=2,
                                marker="circle" if self.markers else None, marker_size=16)
            self.lines[name] = line
            self._x[name], self._y[name] = [], []
            self.figure.marks = [*self.figure.marks, line]
            return line

    def append(self, series: str, x: float, y: float) -> None:
        """Add one point (x, y) to ``series`` (created if new). Thread-safe; the redraw is throttled."""
        self.extend(series, [x], [y])

    def extend(self, series: str, xs: Sequence[float], ys: Sequence[float]) -> None:
        """Add several points to ``series``. Thread-safe; the redraw is throttled."""
        if len(xs) != len(ys):
            raise MLMDError(f"LivePlot.extend({series!r}): {len(xs)} x values but {len(ys)} y values")
        with self._lock:
            if series not in self.lines:
                self.add_series(series)
            self._x[series].extend(float(v) for v in xs)
            self._y[series].extend(float(v) for v in ys)
            self._dirty.add(series)
            self._limiter.request()

    def set_data(self, series: str, xs: Sequence[float], ys: Sequence[float]) -> None:
        """Replace the points of ``series`` (created if new) and redraw at once."""
        with self._lock:
            if series not in self.lines:
                self.add_series(series)
            self._x[series], self._y[series] = [], []
        self.extend(series, xs, ys)
        self.flush()

    def clear(self) -> None:
        """Remove every point (series are kept) and redraw."""
        with self._lock:
            for name in self._x:
                self._x[name], self._y[name] = [], []
                self._dirty.add(name)
        self.flush()

    def data(self, series: str) -> tuple[np.ndarray, np.ndarray]:
        """The points of ``series`` as ``(x, y)`` float arrays (all appended points, also undrawn ones)."""
        with self._lock:
            if series not in self._x:
                raise MLMDError(f"LivePlot has no series {series!r}; it has {', '.join(self._x) or 'none'}")
            return np.array(self._x[series], float), np.array(self._y[series], float)

    def n_points(self, series: str | None = None) -> int:
        """Points stored in ``series`` (all series when None)."""
        with self._lock:
            names = [series] if series is not None else list(self._x)
            return sum(len(self._x.get(name, ())) for name in names)

    def drawn_points(self, series: str) -> int:
        """Points currently sent to the figure for ``series`` (after throttling and log-scale filtering)."""
        return int(np.asarray(self.lines[series].x).size)

    # ------------------------------------------------------------------ drawing
    def flush(self) -> None:
        """Send every pending point to the figure now."""
        self._limiter.run()

    def _draw(self) -> None:
        dirty, self._dirty = self._dirty, set()
        if not dirty:
            return
        self.redraws += 1
        for name in dirty:
            x, y = np.array(self._x[name], float), np.array(self._y[name], float)
            keep = np.isfinite(x) & np.isfinite(y)
            if self.log_y:
                keep &= y > 0
            x, y = thin(x[keep], y[keep], MAX_DRAWN_POINTS)
            line = self.lines[name]
            with line.hold_sync():
                line.x, line.y = x, y

    def close(self) -> None:
        """Stop a pending redraw timer and close the widgets."""
        limiter = getattr(self, "_limiter", None)  # also safe on a half-built plot (bad arguments)
        if limiter is not None:
            limiter.cancel()
        if getattr(self, "figure", None) is not None:
            self.figure.close()
        super().close()


def thin(x: np.ndarray, y: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` of the points ``(x, y)``: evenly strided, first and last kept (unchanged if fewer)."""
    n = len(x)
    if n <= max_points:
        return x, y
    index = np.unique(np.linspace(0, n - 1, max_points).round().astype(int))
    return x[index], y[index]


class RateLimiter:
    """Run ``action`` at most ``max_rate`` times a second, from any thread, never dropping the last request.

    :meth:`request` runs it at once when the last run is old enough (or ``now``), else makes sure a timer runs
    it once soon after; :meth:`run` runs it now and cancels that timer. ``action`` runs with ``lock`` held (the
    owner's lock, so its state and the runs are serialised). Shared by :class:`LivePlot` and
    :class:`ThrottledValue`.
    """

    def __init__(self, action: Callable[[], object], max_rate: float, lock: threading.RLock) -> None:
        self._action, self.max_rate, self._lock = action, float(max_rate), lock
        self._last = 0.0
        self._timer: threading.Timer | None = None

    def request(self, now: bool = False) -> None:
        """Run now if allowed (or ``now``), else once from a timer when the rate allows."""
        with self._lock:
            wait = self._last + 1.0 / self.max_rate - time.monotonic()
            if now or wait <= 0:
                self.run()
            elif self._timer is None:
                self._timer = threading.Timer(wait, self.run)
                self._timer.daemon = True
                self._timer.start()

    def run(self) -> None:
        """Run ``action`` now and cancel a pending timer."""
        with self._lock:
            self.cancel()
            self._last = time.monotonic()
            self._action()

    def cancel(self) -> None:
        """Drop a pending timer (nothing runs)."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None


class ThrottledValue:
    """Set one trait of a widget (e.g. an HTML's ``value``) at most ``max_rate`` times a second, from any thread.

    :meth:`set` applies the value at once if the last update is old enough, else keeps it as pending and a timer
    applies the latest pending value soon after; ``set(value, now=True)`` (a final status) applies at once and
    drops anything pending, so a late timer never overwrites it. :meth:`flush` applies what is pending.
    """

    def __init__(self, widget: widgets.Widget, name: str = "value", max_rate: float = 5.0) -> None:
        if not max_rate > 0:
            raise MLMDError(f"ThrottledValue max_rate={max_rate} must be > 0 (updates per second)")
        self.widget, self.name, self.max_rate = widget, name, float(max_rate)
        self._lock = threading.RLock()
        self._pending: tuple[object] | None = None
        self._limiter = RateLimiter(self._apply, self.max_rate, self._lock)
        self.updates = 0

    def set(self, value: object, now: bool = False) -> None:
        """Show ``value`` (throttled unless ``now``); the latest value always ends up shown."""
        with self._lock:
            self._pending = (value,)
            self._limiter.request(now)

    def flush(self) -> None:
        """Apply the pending value now (if any) and cancel the timer."""
        with self._lock:
            if self._pending is None:
                self._limiter.cancel()
            else:
                self._limiter.run()

    def _apply(self) -> None:
        if self._pending is not None:
            (value,), self._pending = self._pending, None
            setattr(self.widget, self.name, value)
            self.updates += 1
