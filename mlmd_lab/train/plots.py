"""Figures of training: learning curves and parity plots.

Uses matplotlib's object-oriented API only (``matplotlib.figure.Figure``): no pyplot global state, no GUI
backend, safe in threads and headless runs. Functions return the ``Figure``; in Jupyter it displays as the
cell's value, elsewhere save it with :func:`save_figure`.

Inputs are in mlmd_lab's units (energies eV/atom, forces eV/Å, stress eV/Å³); figures show meV/atom,
meV/Å and GPa.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms, units
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogFormatter, MaxNLocator

from mlmd_lab.errors import MLMDError
from mlmd_lab.files import atomic_path
from mlmd_lab.frames import results_of
from mlmd_lab.train.callbacks import History, Metrics, display_unit, format_value, read_log

#: Above this many points a parity plot is drawn as a hexbin density instead of a scatter.
HEXBIN_THRESHOLD = 20000

#: Parity quantities: display factor from eV units, unit, axis label.
PARITY_QUANTITIES: dict[str, tuple[float, str, str]] = {
    "energy": (1e3, "meV/atom", "energy per atom"),
    "forces": (1e3, "meV/Å", "force component"),
    "stress": (1.0 / units.GPa, "GPa", "stress component"),
}

_TITLES = {"energy_rmse": "Energy RMSE", "force_rmse": "Force RMSE", "stress_rmse": "Stress RMSE",
           "energy_mae": "Energy MAE", "force_mae": "Force MAE", "stress_mae": "Stress MAE", "loss": "Loss"}


# Learning curves -----------------------------------------------------------------------------------------
def as_metrics(history: History | Iterable[Metrics | dict] | str | os.PathLike) -> list[Metrics]:
    """The epoch reports of a :class:`History`, a list of Metrics (or their dicts) or a JSON-lines log path."""
    if isinstance(history, History):
        return list(history.metrics)
    if isinstance(history, (str, os.PathLike)):
        return read_log(history)
    return [m if isinstance(m, Metrics) else Metrics.from_dict(m) for m in history]


def learning_curve(history: History | Iterable[Metrics] | str | os.PathLike, ax: Axes | None = None,
                   quantity: str = "force_rmse") -> Figure:
    """Training and validation ``quantity`` vs epoch, log y axis, in display units (meV/atom, meV/Å, GPa).

    One pair of curves per ensemble member when the reports come from several. The best validation epoch
    is marked; the title gives the number of epochs and the elapsed time (s).

    Args:
        history: a :class:`History`, a list of :class:`Metrics`, or the path of a JSON-lines log.
        ax: axes to draw into (default: a new figure).
        quantity: a metric key, e.g. ``"force_rmse"``, ``"energy_rmse"``, ``"stress_rmse"``, ``"loss"``.
    """
    ax = ax if ax is not None else _new_axes()
    metrics = as_metrics(history)
    factor, unit = display_unit(quantity)
    members = sorted({m.member for m in metrics}, key=lambda k: -1 if k is None else k)
    for i, member in enumerate(members):
        rows = sorted((m for m in metrics if m.member == member), key=lambda m: m.epoch)
        prefix = "" if member is None else f"member {member} "
        _plot_member(ax, rows, quantity, factor, prefix, f"C{i % 10}")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"{_TITLES.get(quantity, quantity)}" + (f" ({unit})" if unit else ""))
    ax.set_title(_curve_title(metrics, quantity))
    if any(line.get_label()[:1] != "_" for line in ax.get_lines()):
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, f"no {quantity} reported yet", ha="center", va="center", transform=ax.transAxes)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_yscale() == "log":  # plain numbers (20, 0.5) instead of 2×10¹
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    return ax.figure


def _plot_member(ax: Axes, rows: list[Metrics], quantity: str, factor: float, prefix: str, color: str) -> None:
    epochs = np.array([m.epoch for m in rows], dtype=float)
    for split, style in (("train", "--"), ("validation", "-")):
        y = np.array([getattr(m, split).get(quantity, np.nan) for m in rows], dtype=float) * factor
        if np.isfinite(y).any():
            ax.plot(epochs, y, style, color=color, label=f"{prefix}{split}")
            if np.nanmin(y) > 0:
                ax.set_yscale("log")
    best = [m for m in rows if m.best and quantity in m.validation]
    if best:
        m = best[-1]
        ax.plot([m.epoch], [m.validation[quantity] * factor], "o", color=color, mfc="none",
                label=f"{prefix}best (epoch {m.epoch})")


def _curve_title(metrics: list[Metrics], quantity: str) -> str:
    title = _TITLES.get(quantity, quantity)
    if not metrics:
        return title
    epochs = max(m.epoch for m in metrics)
    elapsed = max(m.elapsed for m in metrics)
    return f"{title}: {epochs} epochs, {elapsed:.1f} s"


def learning_curves(history: History | Iterable[Metrics] | str | os.PathLike,
                    quantities: Sequence[str] = ("energy_rmse", "force_rmse")) -> Figure:
    """A figure with one :func:`learning_curve` panel per quantity (default energy and force RMSE)."""
    metrics = as_metrics(history)
    fig = Figure(figsize=(5.0 * len(quantities), 4.0), layout="constrained")
    axes = fig.subplots(1, len(quantities), squeeze=False)[0]
    for ax, quantity in zip(axes, quantities, strict=True):
        learning_curve(metrics, ax=ax, quantity=quantity)
    return fig


# Parity plots --------------------------------------------------------------------------------------------
def error_stats(reference: Any, predicted: Any) -> dict[str, float]:
    """RMSE, MAE and max absolute error of ``predicted - reference`` (flattened; same units as the inputs)."""
    ref, pred = _flat_pair(reference, predicted)
    diff = pred - ref
    if diff.size == 0:
        return {"rmse": float("nan"), "mae": float("nan"), "max": float("nan"), "n": 0}
    return {"rmse": float(np.sqrt(np.mean(diff**2))), "mae": float(np.mean(np.abs(diff))),
            "max": float(np.max(np.abs(diff))), "n": int(diff.size)}


def _flat_pair(reference: Any, predicted: Any) -> tuple[np.ndarray, np.ndarray]:
    ref = np.asarray(reference, dtype=float).ravel()
    pred = np.asarray(predicted, dtype=float).ravel()
    if ref.shape != pred.shape:
        raise ValueError(f"reference has {ref.size} values but predicted has {pred.size}; they must match")
    return ref, pred


def parity_plot(reference: Any, predicted: Any, quantity: str = "forces", ax: Axes | None = None,
                label: str | None = None) -> Figure:
    """Predicted vs reference values with the y = x line, RMSE and MAE (meV/atom, meV/Å, GPa) in legend and title.

    Args:
        reference, predicted: arrays of equal size (any shape; flattened): energies per atom (eV/atom),
            force components (eV/Å) or stress components (eV/Å³).
        quantity: ``"energy"``, ``"forces"`` or ``"stress"``.
        ax: axes to draw into (default: a new figure); draw several sets (train, validation) into one.
        label: name of this data set in the legend and title.

    More than :data:`HEXBIN_THRESHOLD` points are drawn as a hexbin density.
    """
    if quantity not in PARITY_QUANTITIES:
        raise ValueError(f"unknown parity quantity {quantity!r}; use one of {', '.join(PARITY_QUANTITIES)}")
    factor, unit, name = PARITY_QUANTITIES[quantity]
    ref, pred = _flat_pair(reference, predicted)
    ref, pred = ref * factor, pred * factor
    stats = error_stats(ref, pred)
    text = f"RMSE {format_value(stats['rmse'])} {unit}, MAE {format_value(stats['mae'])} {unit}"
    ax = ax if ax is not None else _new_axes(square=True)
    legend = f"{label}: {text}" if label else text
    if ref.size > HEXBIN_THRESHOLD:
        ax.hexbin(ref, pred, gridsize=80, bins="log", mincnt=1, cmap="viridis", label=legend)
    else:
        ax.scatter(ref, pred, s=6, alpha=0.6, label=legend, rasterized=ref.size > 2000)
    _identity_line(ax, ref, pred)
    ax.set_xlabel(f"reference {name} ({unit})")
    ax.set_ylabel(f"predicted {name} ({unit})")
    if not ax.get_title():
        head = quantity.capitalize() + (f" ({label})" if label else "")
        ax.set_title(f"{head}: {text}", fontsize="medium")
    ax.legend(fontsize="small", loc="upper left")
    return ax.figure


def _identity_line(ax: Axes, ref: np.ndarray, pred: np.ndarray) -> None:
    """Draw (or redraw, covering all data sets on ``ax``) the y = x line; equal, shared x and y limits."""
    previous = [ln for ln in ax.get_lines() if ln.get_gid() == "identity"]
    values = np.concatenate([ref, pred, *(np.asarray(ln.get_xdata(), dtype=float) for ln in previous)])
    for line in previous:
        line.remove()
    values = values[np.isfinite(values)]
    lo, hi = (float(values.min()), float(values.max())) if values.size else (-1.0, 1.0)
    pad = 0.05 * (hi - lo) if hi > lo else max(1.0, abs(lo))
    lo, hi = lo - pad, hi + pad
    ax.plot([lo, hi], [lo, hi], "k-", lw=0.8, gid="identity", label="_y=x")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal", adjustable="box")


def parity_plots(frames: Iterable[Atoms], model: Any, label: str | None = None, batch_size: int = 64) -> Figure:
    """Energy-per-atom and force parity panels of ``model`` against the reference results of ``frames``.

    Args:
        frames: labelled ``Atoms`` (reference ``energy`` in eV and ``forces`` in eV/Å in their calculator
            results, see :func:`mlmd_lab.frames.results_of`); frames lacking one are left out of that panel.
        model: anything with ``predict(list_of_atoms) -> list of dicts`` with ``"energy"`` (eV) and
            ``"forces"`` (eV/Å), e.g. :class:`~mlmd_lab.potentials.model.HDNNP` or an ensemble.
        label: name of the data set (e.g. ``"validation"``) for legends and titles.
        batch_size: frames per ``predict`` call.
    """
    frames = list(frames)
    data = _parity_data(frames, model, batch_size)
    if not data["energy"][0] and not data["forces"][0]:
        raise MLMDError("none of the frames has a reference energy or forces; pass labelled frames")
    fig = Figure(figsize=(10.0, 4.8), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, quantity in zip(axes, ("energy", "forces"), strict=True):
        ref, pred = data[quantity]
        if ref:
            parity_plot(np.concatenate(ref), np.concatenate(pred), quantity=quantity, ax=ax, label=label)
        else:
            ax.text(0.5, 0.5, f"no reference {quantity}", ha="center", va="center", transform=ax.transAxes)
    return fig


def _parity_data(frames: list[Atoms], model: Any, batch_size: int) -> dict[str, tuple[list, list]]:
    data: dict[str, tuple[list, list]] = {"energy": ([], []), "forces": ([], [])}
    for start in range(0, len(frames), max(1, batch_size)):
        batch = frames[start:start + max(1, batch_size)]
        predictions = model.predict(batch)
        if len(predictions) != len(batch):
            raise MLMDError(f"model.predict returned {len(predictions)} results for {len(batch)} structures")
        for atoms, pred in zip(batch, predictions, strict=True):
            ref = results_of(atoms)
            if ref.get("energy") is not None and pred.get("energy") is not None:
                data["energy"][0].append(np.atleast_1d(float(ref["energy"]) / len(atoms)))
                data["energy"][1].append(np.atleast_1d(float(pred["energy"]) / len(atoms)))
            if ref.get("forces") is not None and pred.get("forces") is not None:
                data["forces"][0].append(np.asarray(ref["forces"], dtype=float).ravel())
                data["forces"][1].append(np.asarray(pred["forces"], dtype=float).ravel())
    return data


# Output ----------------------------------------------------------------------------------------------------
def _new_axes(square: bool = False) -> Axes:
    fig = Figure(figsize=(5.0, 5.0) if square else (6.0, 4.0), layout="constrained")
    return fig.add_subplot()


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 150) -> Path:
    """Write ``fig`` to ``path`` atomically (:func:`mlmd_lab.files.atomic_path`).

    The format follows the suffix (``.png``, ``.pdf``, ``.svg``, ...). Returns the path written.
    """
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    supported = fig.canvas.get_supported_filetypes()
    if fmt not in supported:
        raise MLMDError(f"{path}: cannot save a figure as {fmt or 'a file without suffix'!r}; "
                        f"use one of .{', .'.join(sorted(supported))}")
    with atomic_path(path, fsync=True) as tmp:
        fig.savefig(tmp, format=fmt, dpi=dpi)
    return path
