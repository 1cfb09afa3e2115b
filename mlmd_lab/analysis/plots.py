"""Matplotlib figures of the analysis results.

Every function returns a new :class:`matplotlib.figure.Figure` built with the object API (no pyplot state), so it
works headless and in notebooks (the figure displays when it is the cell's last expression) and can be saved with
``fig.savefig("name.png")``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from matplotlib.figure import Figure

from mlmd_lab.analysis.dynamics import A2_PER_FS_TO_CM2_PER_S, MSDResult, VACFResult, VDOSResult
from mlmd_lab.analysis.statistics import BlockResult, DriftResult
from mlmd_lab.analysis.structure import RDFResult
from mlmd_lab.errors import MLMDError

#: thermo-log column → (panel, legend label); energies share one panel, plotted relative to their first value.
THERMO_COLUMNS: dict[str, tuple[str, str]] = {
    "epot_eV": ("energy", "potential"),
    "ekin_eV": ("energy", "kinetic"),
    "etot_eV": ("energy", "total"),
    "temperature_K": ("temperature_K", "T"),
    "pressure_GPa": ("pressure_GPa", "p"),
    "volume_A3": ("volume_A3", "V"),
}
#: panel → y-axis label.
THERMO_LABELS = {
    "energy": "E − E(t₀) (eV)",
    "temperature_K": "temperature (K)",
    "pressure_GPa": "pressure (GPa)",
    "volume_A3": "volume (Å³)",
}


def _pair_label(pair: tuple[str, str]) -> str:
    return f"{pair[0]}–{pair[1]}"


def rdf_figure(result: RDFResult, pairs: Iterable[tuple[str, str]] | None = None,
               coordination: bool = True) -> Figure:
    """g(r) of each pair (solid) and, on a second axis, the running coordination number n(r) (dashed)."""
    selected = list(result.g) if pairs is None else [tuple(p) for p in pairs]
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    ax2 = ax.twinx() if coordination else None
    for k, pair in enumerate(selected):
        color = f"C{k}"
        ax.plot(result.r, result._g(pair), color=color, label=_pair_label(pair))
        if ax2 is not None:
            running = np.interp(result.r, result.edges, result._running(pair))
            ax2.plot(result.r, running, color=color, ls="--", lw=1)
    ax.axhline(1.0, color="0.6", lw=0.8)
    ax.set_xlabel("r (Å)")
    ax.set_ylabel("g(r)")
    ax.set_xlim(0, result.edges[-1])
    ax.legend(title="pair a–b")
    if ax2 is not None:
        ax2.set_ylabel("n(r): b atoms around a (dashed)")
        ax2.set_ylim(bottom=0)
    return fig


def msd_figure(result: MSDResult, elements: Iterable[str] | None = None, fit: bool = True,
               fit_range_fs: tuple[float, float] | None = None) -> Figure:
    """MSD per element against lag time (ps), with the diffusion fit and D (cm²/s) in the legend."""
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    t_ps = result.time_fs / 1000.0
    for k, element in enumerate(result.msd if elements is None else elements):
        label = element
        if fit:
            D, err = result.diffusion(element, fit_range_fs)
            lo, hi = (0.2 * result.time_fs[-1], 0.8 * result.time_fs[-1]) if fit_range_fs is None else fit_range_fs
            mask = (result.time_fs >= lo) & (result.time_fs <= hi)
            intercept = np.mean(result.msd[element][mask] - 6 * D * result.time_fs[mask])
            ax.plot(t_ps[mask], 6 * D * result.time_fs[mask] + intercept, color=f"C{k}", ls="--", lw=1)
            label += f": D = {D * A2_PER_FS_TO_CM2_PER_S:.3g} ± {err * A2_PER_FS_TO_CM2_PER_S:.2g} cm²/s"
        ax.plot(t_ps, result.msd[element], color=f"C{k}", label=label)
    ax.set_xlabel("lag time (ps)")
    ax.set_ylabel("MSD (Å²)")
    ax.legend()
    return fig


def vacf_figure(result: VACFResult, elements: Iterable[str] | None = None) -> Figure:
    """Normalised velocity autocorrelation C(t)/C(0) per element against lag time (fs)."""
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for element in result.c_norm if elements is None else elements:
        ax.plot(result.time_fs, result.c_norm[element], label=element)
    ax.axhline(0.0, color="0.6", lw=0.8)
    ax.set_xlabel("lag time (fs)")
    ax.set_ylabel("C(t) / C(0)")
    ax.legend()
    return fig


def vdos_figure(result: VDOSResult, elements: Iterable[str] | None = None, unit: str = "cm-1",
                total: bool = True, max_frequency: float | None = None) -> Figure:
    """Vibrational DOS per element (and total, 3N-normalised, on its own axis) in cm⁻¹ (default) or THz."""
    if unit not in ("cm-1", "THz"):
        raise MLMDError(f"unit={unit!r}: use 'cm-1' or 'THz'")
    x = result.frequency_cm if unit == "cm-1" else result.frequency_thz
    fig = Figure(figsize=(6.4, 5.2 if total else 4.2), layout="constrained")
    axes = fig.subplots(2 if total else 1, 1, sharex=True, squeeze=False)[:, 0]
    for element in result.dos if elements is None else elements:
        axes[0].plot(x, result._element(element), label=element)
    axes[0].set_ylabel("DOS per element (1/THz, unit area)")
    axes[0].legend()
    if total:
        axes[1].plot(x, result.total, color="k")
        axes[1].set_ylabel("total DOS (1/THz, area 3N)")
    axes[-1].set_xlabel("frequency (cm⁻¹)" if unit == "cm-1" else "frequency (THz)")
    axes[-1].set_xlim(0, x[-1] if max_frequency is None else max_frequency)
    return fig


def _thermo_time(log: Mapping[str, np.ndarray]) -> tuple[np.ndarray | None, str]:
    if "time_fs" in log:
        return np.asarray(log["time_fs"], dtype=float) / 1000.0, "time (ps)"
    if "step" in log:
        return np.asarray(log["step"], dtype=float), "step"
    return None, "sample"


def _thermo_panels(log: Mapping[str, np.ndarray], n: int) -> dict[str, list[tuple[str, np.ndarray]]]:
    """Panel name → [(label, y)], known columns first, then any other numeric column of the right length."""
    panels: dict[str, list[tuple[str, np.ndarray]]] = {}
    for column, values in log.items():
        if column in ("time_fs", "step"):
            continue
        y = np.asarray(values)
        if y.ndim != 1 or len(y) != n or not np.issubdtype(y.dtype, np.number):
            continue
        if not np.isfinite(y).any():  # e.g. pressure and volume of a molecule without a cell: nothing to show
            continue
        panel, label = THERMO_COLUMNS.get(column, (column, column))
        if panel == "energy":
            y = y - y[0]
        panels.setdefault(panel, []).append((label, y.astype(float)))
    order = list(THERMO_LABELS)
    return dict(sorted(panels.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def thermo_figure(log: Mapping[str, np.ndarray]) -> Figure:
    """Thermodynamic time series of an MD run, one panel per quantity present in ``log``.

    ``log`` maps column names to arrays of equal length: ``time_fs`` (x axis, shown in ps; else ``step``),
    ``epot_eV``, ``ekin_eV``, ``etot_eV`` (one panel, each relative to its first value), ``temperature_K``,
    ``pressure_GPa``, ``volume_A3``; other numeric columns get their own panel labelled by the column name.
    """
    if not isinstance(log, Mapping) or not log:
        raise MLMDError("thermo_figure needs a dict of column name → array, e.g. {'time_fs': t, 'etot_eV': e}")
    x, xlabel = _thermo_time(log)
    if x is None:
        x = np.arange(max(len(np.atleast_1d(v)) for v in log.values()))
    panels = _thermo_panels(log, len(x))
    if not panels:
        raise MLMDError(f"no plottable columns in the log (have: {', '.join(log)}): pass 1-D numeric arrays of "
                        "equal length, e.g. etot_eV, temperature_K")
    fig = Figure(figsize=(6.4, 1.9 * len(panels) + 0.8), layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (panel, curves) in zip(axes, panels.items(), strict=True):
        for label, y in curves:
            ax.plot(x, y, lw=1, label=label)
        ax.set_ylabel(THERMO_LABELS.get(panel, panel))
        if len(curves) > 1:
            ax.legend(fontsize="small", ncols=len(curves))
    axes[-1].set_xlabel(xlabel)
    return fig


def drift_figure(result: DriftResult) -> Figure:
    """Total energy per atom relative to the start (meV/atom) against time (ps) with the fitted drift line."""
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    t_ps = result.time_fs / 1000.0
    ax.plot(t_ps, result.energy_mev_atom, lw=1, label="E(t) − E(t₀)")
    ax.plot(t_ps, result.slope_mev_atom_ps * t_ps + result.intercept_mev_atom, "k--", lw=1,
            label=f"drift {result.slope_mev_atom_ps:+.3g} ± {result.slope_err_mev_atom_ps:.2g} meV/atom/ps")
    ax.set_xlabel("time (ps)")
    ax.set_ylabel("ΔE_total per atom (meV/atom)")
    ax.set_title(f"RMS {result.rms_mev_atom:.3g} meV/atom, max |ΔE| {result.max_deviation_mev_atom:.3g} meV/atom",
                 fontsize="medium")
    ax.legend()
    return fig


def blocking_figure(result: BlockResult) -> Figure:
    """Blocking curve: standard-error estimate (with its error) against block size, chosen level marked."""
    if len(result.level_block_size) == 0:
        raise MLMDError("this BlockResult has no blocking curve (computed with fixed n_blocks): use n_blocks=None")
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    ax.errorbar(result.level_block_size, result.level_stderr, yerr=result.level_stderr_err, marker="o", capsize=3)
    ax.axvline(result.block_size, color="0.5", ls="--", label=f"plateau: ±{result.stderr:.3g}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("block size (samples)")
    ax.set_ylabel("standard error of the mean (unit of the data)")
    ax.legend()
    return fig
