"""Error bars for correlated MD time series (blocking) and the energy-conservation report of NVE runs."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mlmd_lab.errors import MLMDError

#: Fewest samples :func:`block_average` accepts.
MIN_SAMPLES = 4


def _as_series(values: np.ndarray, name: str = "values", min_len: int = MIN_SAMPLES) -> np.ndarray:
    """1-D finite float array of at least ``min_len`` values, else :class:`MLMDError`."""
    x = np.asarray(values, dtype=float)
    if x.ndim != 1:
        raise MLMDError(f"{name} has shape {x.shape}: pass a 1-D time series (one value per frame)")
    if len(x) < min_len:
        raise MLMDError(f"{name} has {len(x)} values, need at least {min_len}: pass a longer time series")
    if not np.all(np.isfinite(x)):
        raise MLMDError(f"{name} contains NaN or infinite values at index {int(np.flatnonzero(~np.isfinite(x))[0])}: "
                        "drop or fix those frames")
    return x


@dataclass
class BlockResult:
    """Mean of a correlated time series with its blocking error bar.

    Attributes:
        mean: mean of the values (their unit).
        stderr: standard error of the mean (their unit), from the plateau of the blocking curve.
        stderr_err: uncertainty of ``stderr`` itself, ``stderr / sqrt(2 (n_blocks − 1))``.
        statistical_inefficiency: g = N σ²_mean / σ², the number of samples per independent sample (≥ 1 for
            positively correlated data; ≈ 2 τ_int in samples).
        n_samples: number of values N.
        block_size: samples per block at the chosen level.
        n_blocks: number of blocks at the chosen level.
        plateau: False if the blocking curve never reached a plateau (series too short for its correlation time:
            ``stderr`` is then the largest estimate with at least 4 blocks and is likely an underestimate).
        level_block_size, level_stderr, level_stderr_err: the blocking curve, shapes ``(K,)``: block size,
            standard-error estimate and its uncertainty at each halving level (empty with fixed ``n_blocks``).
    """

    mean: float
    stderr: float
    stderr_err: float
    statistical_inefficiency: float
    n_samples: int
    block_size: int
    n_blocks: int
    plateau: bool = True
    level_block_size: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))
    level_stderr: np.ndarray = field(default_factory=lambda: np.zeros(0))
    level_stderr_err: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def n_independent(self) -> float:
        """Effective number of independent samples, N / g."""
        return self.n_samples / self.statistical_inefficiency


def _blocking_curve(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flyvbjerg–Petersen levels: (block size, n_blocks, standard-error estimate), each shape ``(K,)``."""
    sizes, counts, errors = [], [], []
    data, size = x, 1
    while len(data) >= 2:
        n = len(data)
        sizes.append(size)
        counts.append(n)
        errors.append(np.sqrt(data.var() / (n - 1)))
        data = data[: n - n % 2]
        data = 0.5 * (data[0::2] + data[1::2])
        size *= 2
    return np.array(sizes), np.array(counts), np.array(errors)


def _plateau_level(n: int, sizes: np.ndarray, counts: np.ndarray, errors: np.ndarray) -> tuple[int, bool]:
    """Smallest level with B³ > 2 N (σ_B / σ_1)⁴ (Lee et al., PRE 83, 066706 (2011)); else the largest estimate."""
    if errors[0] == 0:
        return 0, True
    ratio4 = (errors / errors[0]) ** 4
    ok = np.flatnonzero((sizes.astype(float) ** 3 > 2 * n * ratio4) & (counts >= 4))
    if ok.size:
        return int(ok[0]), True
    usable = np.flatnonzero(counts >= 4)
    return int(usable[np.argmax(errors[usable])]), False


def block_average(values: np.ndarray, n_blocks: int | None = None) -> BlockResult:
    """Mean and standard error of a correlated time series (temperature, pressure, energy, ...) by blocking.

    Args:
        values: the time series, shape ``(N,)``, N ≥ 4, equally spaced samples (any unit).
        n_blocks: None (default): Flyvbjerg–Petersen blocking — the series is halved repeatedly into block
            averages and the standard error is read at the plateau, the first level where the block size B
            satisfies B³ > 2 N (σ_B/σ_1)⁴ (Lee et al. 2011). An integer ≥ 2: split into that many equal
            contiguous blocks (dropping the remainder) and use std(block means) / sqrt(n_blocks).

    Returns:
        :class:`BlockResult` (mean and errors in the unit of ``values``).
    """
    x = _as_series(values)
    if n_blocks is not None:
        return _fixed_blocks(x, int(n_blocks))
    n = len(x)
    variance = x.var()
    sizes, counts, errors = _blocking_curve(x)
    level, plateau = _plateau_level(n, sizes, counts, errors)
    stderr = float(errors[level])
    g = n * stderr**2 / variance if variance > 0 else 1.0
    return BlockResult(
        mean=float(x.mean()), stderr=stderr, stderr_err=stderr / np.sqrt(2 * (counts[level] - 1)),
        statistical_inefficiency=float(g), n_samples=n, block_size=int(sizes[level]), n_blocks=int(counts[level]),
        plateau=plateau, level_block_size=sizes, level_stderr=errors,
        level_stderr_err=errors / np.sqrt(2 * (counts - 1)),
    )


def _fixed_blocks(x: np.ndarray, n_blocks: int) -> BlockResult:
    n = len(x)
    if not 2 <= n_blocks <= n:
        raise MLMDError(f"n_blocks={n_blocks} must be between 2 and the number of values ({n}): pass e.g. 10 or None")
    size = n // n_blocks
    means = x[: size * n_blocks].reshape(n_blocks, size).mean(axis=1)
    stderr = float(means.std(ddof=1) / np.sqrt(n_blocks))
    variance = x.var()
    return BlockResult(
        mean=float(x.mean()), stderr=stderr, stderr_err=stderr / np.sqrt(2 * (n_blocks - 1)),
        statistical_inefficiency=float(n * stderr**2 / variance) if variance > 0 else 1.0,
        n_samples=n, block_size=size, n_blocks=n_blocks,
    )


@dataclass
class DriftResult:
    """Energy conservation of an NVE run.

    Attributes:
        slope_mev_atom_ps: drift of the total energy per atom, meV/atom/ps (least-squares line).
        slope_err_mev_atom_ps: standard error of the slope, meV/atom/ps: the least-squares error scaled by
            √g, g the statistical inefficiency of the residuals (:func:`block_average`), so correlated
            fluctuations do not make it too small.
        rms_mev_atom: RMS fluctuation of the energy per atom about the fitted line, meV/atom.
        max_deviation_mev_atom: largest |E(t) − E(t₀)| / N, meV/atom.
        time_fs: the times, shape ``(T,)``, fs.
        energy_mev_atom: (E(t) − E(t₀)) / N, shape ``(T,)``, meV/atom.
        intercept_mev_atom: value of the fitted line at t = 0 fs, relative to E(t₀), meV/atom.
        n_atoms: number of atoms N.
    """

    slope_mev_atom_ps: float
    slope_err_mev_atom_ps: float
    rms_mev_atom: float
    max_deviation_mev_atom: float
    time_fs: np.ndarray
    energy_mev_atom: np.ndarray
    intercept_mev_atom: float
    n_atoms: int

    def passes(self, limit_meV_atom_ps: float) -> bool:
        """True if |drift| ≤ ``limit_meV_atom_ps`` meV/atom/ps."""
        return bool(abs(self.slope_mev_atom_ps) <= limit_meV_atom_ps)

    def __str__(self) -> str:
        return (f"drift {self.slope_mev_atom_ps:+.4g} ± {self.slope_err_mev_atom_ps:.2g} meV/atom/ps, "
                f"RMS {self.rms_mev_atom:.3g} meV/atom, max |ΔE| {self.max_deviation_mev_atom:.3g} meV/atom")


def energy_drift(time_fs: np.ndarray, total_energy_eV: np.ndarray, n_atoms: int) -> DriftResult:
    """Linear drift and fluctuation of the total energy of an NVE run.

    Args:
        time_fs: times, shape ``(T,)``, fs, strictly increasing, T ≥ 3.
        total_energy_eV: total (potential + kinetic) energy of the system, shape ``(T,)``, eV.
        n_atoms: number of atoms, to report per-atom values.

    Returns:
        :class:`DriftResult` (slope in meV/atom/ps, fluctuations in meV/atom).
    """
    t = _as_series(time_fs, "time_fs", min_len=3)
    e = _as_series(total_energy_eV, "total_energy_eV", min_len=3)
    if len(t) != len(e):
        raise MLMDError(f"time_fs has {len(t)} values but total_energy_eV has {len(e)}: pass one energy per time")
    if np.any(np.diff(t) <= 0):
        raise MLMDError("time_fs is not strictly increasing: pass the frames of one run in time order")
    if not isinstance(n_atoms, int | np.integer) or n_atoms < 1:
        raise MLMDError(f"n_atoms={n_atoms!r} must be a positive integer (the number of atoms in the system)")
    rel = (e - e[0]) / n_atoms * 1000.0  # meV/atom
    t_ps = t / 1000.0
    slope, intercept = np.polyfit(t_ps, rel, 1)
    residuals = rel - (slope * t_ps + intercept)
    dof = max(len(t) - 2, 1)
    sxx = np.sum((t_ps - t_ps.mean()) ** 2)
    err = np.sqrt(np.sum(residuals**2) / dof / sxx)
    if len(t) >= 16 and np.any(residuals):
        err *= np.sqrt(max(1.0, block_average(residuals).statistical_inefficiency))
    return DriftResult(
        slope_mev_atom_ps=float(slope), slope_err_mev_atom_ps=float(err),
        rms_mev_atom=float(np.sqrt(np.mean(residuals**2))), max_deviation_mev_atom=float(np.max(np.abs(rel))),
        time_fs=t, energy_mev_atom=rel, intercept_mev_atom=float(intercept), n_atoms=int(n_atoms),
    )
