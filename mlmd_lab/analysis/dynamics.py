"""Time-correlation analysis of MD trajectories: MSD and diffusion, velocity autocorrelation, vibrational DOS.

Trajectories are sequences of ASE ``Atoms`` with the same atoms, in the same order, in every frame.
Times come from ``atoms.info["time_fs"]`` (fs) or, for frames without it, from ``timestep_fs`` (the time
between consecutive frames); frames must be evenly spaced in time. Positions are expected unwrapped (mlmd_lab's
MD writes them so); :func:`msd` detects and repairs wrapped positions (see there). Velocities are read with
``atoms.get_velocities()`` (Å per ASE time unit) and converted to Å/fs.

Correlation functions are averaged over all time origins with FFTs, O(N T log T) for N atoms and T frames;
atoms are processed in chunks so memory stays bounded for long trajectories.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from ase import Atoms, units

from mlmd_lab.errors import MLMDError

#: cm⁻¹ per THz (1 / (c in cm/ps)).
THZ_TO_CM1 = 33.35641
#: cm²/s per Å²/fs (1 Å²/fs = 1e-16 cm² / 1e-15 s).
A2_PER_FS_TO_CM2_PER_S = 0.1
#: Atoms processed together in the FFT correlations (bounds memory to ~ 2 T x chunk x 3 complex numbers).
_CHUNK = 256
#: Relative tolerance on the spacing of ``info["time_fs"]`` between frames.
_TIME_RTOL = 1e-6

Frames = Sequence[Atoms] | Iterable[Atoms] | Atoms | str | os.PathLike


# ----------------------------------------------------------------------------------------------- trajectory input
def as_frame_list(frames: Frames, min_frames: int = 1, what: str = "this analysis") -> list[Atoms]:
    """Return ``frames`` as a list of ``Atoms``; a path is read with ``ase.io.read(path, ":")``.

    Raises :class:`MLMDError` if there are fewer than ``min_frames`` frames or an item is not an ``Atoms``.
    """
    if isinstance(frames, str | os.PathLike):
        import ase.io

        try:
            frames = ase.io.read(frames, ":")
        except Exception as err:
            raise MLMDError(f"cannot read trajectory {os.fspath(frames)!r}: {err} (pass a list of ase.Atoms)") from err
    elif isinstance(frames, Atoms):
        frames = [frames]
    if frames is None:
        frames = []
    frame_list = list(frames)
    for index, atoms in enumerate(frame_list):
        if not isinstance(atoms, Atoms):
            raise MLMDError(f"frame {index} is a {type(atoms).__name__}, not ase.Atoms: pass a list of Atoms, "
                            "e.g. ase.io.read('md.traj', ':')")
    if len(frame_list) < min_frames:
        raise MLMDError(f"{what} needs at least {min_frames} frame(s) but got {len(frame_list)}: pass a trajectory, "
                        "e.g. ase.io.read('md.traj', ':')")
    return frame_list


def check_same_atoms(frames: list[Atoms]) -> np.ndarray:
    """Return the atomic numbers, shape ``(N,)``, after checking every frame has the same atoms in the same order."""
    numbers = frames[0].numbers
    for index, atoms in enumerate(frames):
        if len(atoms) != len(numbers):
            raise MLMDError(f"frame {index} has {len(atoms)} atoms but frame 0 has {len(numbers)}: time correlations "
                            "need the same atoms in every frame (analyse one fixed-composition run at a time)")
        if not np.array_equal(atoms.numbers, numbers):
            raise MLMDError(f"frame {index} has its atoms in a different order or of other elements than frame 0: "
                            "time correlations need the same atoms in the same order in every frame")
    if len(numbers) == 0:
        raise MLMDError("the frames contain no atoms: pass a trajectory of a non-empty system")
    return numbers.copy()


def frame_timestep(frames: list[Atoms], timestep_fs: float | None = None) -> float:
    """Return the time between consecutive frames in fs.

    ``timestep_fs``, if given, is used as is (it overrides ``info["time_fs"]``). Otherwise every frame must carry
    ``atoms.info["time_fs"]`` and the spacing must be uniform and positive.
    """
    if timestep_fs is not None:
        if not np.isfinite(timestep_fs) or timestep_fs <= 0:
            raise MLMDError(f"timestep_fs={timestep_fs!r} must be a positive number of fs between frames")
        return float(timestep_fs)
    times = []
    for index, atoms in enumerate(frames):
        if "time_fs" not in atoms.info:
            raise MLMDError(f"frame {index} has no atoms.info['time_fs']: pass timestep_fs=<fs between frames>")
        times.append(float(atoms.info["time_fs"]))
    if len(times) < 2:
        raise MLMDError("one frame has no time spacing: pass at least two frames or timestep_fs=<fs between frames>")
    steps = np.diff(np.asarray(times))
    dt = float(np.median(steps))
    bad = np.flatnonzero(np.abs(steps - dt) > _TIME_RTOL * abs(dt) + 1e-9)
    if dt <= 0 or bad.size:
        first = int(bad[0]) if bad.size else 0
        raise MLMDError(f"inconsistent time spacing: frames {first} and {first + 1} are {steps[first]:g} fs apart but "
                        f"the typical spacing is {dt:g} fs (frames skipped, reordered or runs concatenated?): pass "
                        "evenly spaced frames from one run in time order, e.g. frames[::k]")
    return dt


def _element_groups(symbols: list[str], elements: Iterable[str] | None) -> dict[str, np.ndarray]:
    """Map element symbol → indices of its atoms; ``elements=None`` means all elements present, sorted."""
    present = sorted(set(symbols))
    wanted = present if elements is None else ([elements] if isinstance(elements, str) else list(elements))
    groups = {}
    for element in wanted:
        if element not in present:
            raise MLMDError(f"element {element!r} is not in the frames (present: {', '.join(present)}): "
                            "choose elements from those present")
        groups[element] = np.flatnonzero(np.asarray(symbols) == element)
    if not groups:
        raise MLMDError("no elements selected: pass elements=None or a list of element symbols")
    return groups


def _max_lag(n_frames: int, max_lag: int | None) -> int:
    """Largest lag in frames: default ``n_frames // 2``; must be in ``[1, n_frames - 1]``."""
    lag = n_frames // 2 if max_lag is None else int(max_lag)
    if not 1 <= lag <= n_frames - 1:
        raise MLMDError(f"max_lag={max_lag} frames is outside [1, {n_frames - 1}] for a trajectory of {n_frames} "
                        "frames: pass a smaller max_lag or more frames")
    return lag


# ------------------------------------------------------------------------------------------- FFT correlations
def _fft_size(n: int) -> int:
    """Smallest power of two ≥ ``2 n`` (no circular wrap-around in the correlations)."""
    return 1 << int(np.ceil(np.log2(max(2 * n, 2))))


def _autocorrelation_sum(x: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Σ over atoms and components of the origin-averaged autocorrelation of ``x`` (T, N, 3) → (T,).

    ``result[m] = Σ_i w_i Σ_k (1/(T-m)) Σ_t x[t,i,k] x[t+m,i,k]``.
    """
    T = x.shape[0]
    nfft = _fft_size(T)
    total = np.zeros(T)
    for start in range(0, x.shape[1], _CHUNK):
        chunk = x[:, start:start + _CHUNK]
        spectrum = np.abs(np.fft.rfft(chunk, n=nfft, axis=0)) ** 2
        power = spectrum.sum(axis=2)
        if weights is not None:
            power = power * weights[start:start + _CHUNK]
        total += np.fft.irfft(power.sum(axis=1), n=nfft)[:T]
    return total / (T - np.arange(T))


def _msd_sum(x: np.ndarray) -> np.ndarray:
    """Σ over atoms of the origin-averaged squared displacement of ``x`` (T, N, 3) → (T,), FFT algorithm.

    MSD(m) = S1(m) − 2 S2(m) with S2 the position autocorrelation and S1(m) = (1/(T−m)) Σ_t (|x_t|² + |x_{t+m}|²)
    (Calandrini et al., Collection SFN 12, 201 (2011)).
    """
    T = x.shape[0]
    x = x - x.mean(axis=0)  # displacements are unchanged by a constant shift per atom; this limits round-off
    sq = (x**2).sum(axis=2).sum(axis=1)  # (T,)
    head = np.concatenate([[0.0], np.cumsum(sq)[:-1]])  # Σ_{t<m} |x_t|²
    tail = np.concatenate([[0.0], np.cumsum(sq[::-1])[:-1]])  # Σ_{t>T-1-m} |x_t|²
    s1 = (2.0 * sq.sum() - head - tail) / (T - np.arange(T))
    result = np.maximum(s1 - 2.0 * _autocorrelation_sum(x), 0.0)
    result[0] = 0.0  # exact; the FFT leaves round-off
    return result


# ---------------------------------------------------------------------------------------------------------- MSD
@dataclass
class MSDResult:
    """Mean squared displacement per element.

    Attributes:
        time_fs: lag times, shape ``(L,)``, fs (``L = max_lag + 1``, starting at 0).
        msd: element → MSD, shape ``(L,)``, Å², averaged over atoms of the element and all time origins.
        block_time_fs: lag times of the block MSDs, shape ``(L_b,)``, fs.
        block_msd: element → MSDs of ``n_blocks`` contiguous, independent segments of the trajectory,
            shape ``(n_blocks, L_b)``, Å²; used for the error of :meth:`diffusion`.
        unwrapped: True if wrapped positions were detected and unwrapped.
        com_removed: True if the centre-of-mass drift of the whole system was removed.
    """

    time_fs: np.ndarray
    msd: dict[str, np.ndarray]
    block_time_fs: np.ndarray
    block_msd: dict[str, np.ndarray] = field(default_factory=dict)
    unwrapped: bool = False
    com_removed: bool = True

    def _fit_mask(self, times: np.ndarray, fit_range_fs: tuple[float, float] | None) -> np.ndarray:
        lo, hi = (0.2 * self.time_fs[-1], 0.8 * self.time_fs[-1]) if fit_range_fs is None else fit_range_fs
        if not lo < hi:
            raise MLMDError(f"fit_range_fs=({lo}, {hi}) is empty: pass (start_fs, end_fs) with start < end")
        return (times >= lo - 1e-9) & (times <= hi + 1e-9)

    def diffusion(self, element: str, fit_range_fs: tuple[float, float] | None = None) -> tuple[float, float]:
        """Self-diffusion coefficient from a straight-line fit MSD(t) = 6 D t + c.

        Args:
            element: element symbol, a key of :attr:`msd`.
            fit_range_fs: (start, end) of the fitted lag times in fs; default 20 % to 80 % of the lag range,
                which skips the ballistic start and the noisy long lags. Choose it on the linear part of the MSD.

        Returns:
            ``(D, D_err)`` in Å²/fs (multiply by :data:`A2_PER_FS_TO_CM2_PER_S` for cm²/s, or use
            :meth:`diffusion_cm2_s`). ``D`` is fitted on the full-trajectory MSD. ``D_err`` is the standard error
            from independent blocks: the same fit on the MSD of each of the ``n_blocks`` contiguous segments
            (fit range clipped to the segment's lag range), ``std(D_block, ddof=1) / sqrt(n_blocks)``;
            NaN if there are fewer than two blocks with at least three points in the range.
        """
        if element not in self.msd:
            raise MLMDError(f"no MSD for element {element!r} (have: {', '.join(self.msd)}): pass one of those")
        mask = self._fit_mask(self.time_fs, fit_range_fs)
        if mask.sum() < 3:
            raise MLMDError(f"fit range {fit_range_fs} fs holds {int(mask.sum())} lag times, need at least 3: "
                            f"choose a range inside 0–{self.time_fs[-1]:g} fs")
        D = np.polyfit(self.time_fs[mask], self.msd[element][mask], 1)[0] / 6.0
        return float(D), self._block_error(element, fit_range_fs)

    def _block_error(self, element: str, fit_range_fs: tuple[float, float] | None) -> float:
        blocks = self.block_msd.get(element)
        if blocks is None or len(blocks) < 2:
            return float("nan")
        if fit_range_fs is None:
            fit_range_fs = (0.2 * self.time_fs[-1], 0.8 * self.time_fs[-1])
        lo, hi = fit_range_fs
        hi = min(hi, self.block_time_fs[-1])
        mask = (self.block_time_fs >= lo - 1e-9) & (self.block_time_fs <= hi + 1e-9)
        if mask.sum() < 3:
            return float("nan")
        slopes = np.polyfit(self.block_time_fs[mask], blocks[:, mask].T, 1)[0] / 6.0
        return float(np.std(slopes, ddof=1) / np.sqrt(len(slopes)))

    def diffusion_cm2_s(self, element: str, fit_range_fs: tuple[float, float] | None = None) -> tuple[float, float]:
        """:meth:`diffusion` converted to cm²/s (1 Å²/fs = 0.1 cm²/s)."""
        D, err = self.diffusion(element, fit_range_fs)
        return D * A2_PER_FS_TO_CM2_PER_S, err * A2_PER_FS_TO_CM2_PER_S


def _fractional_steps(positions: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """Frame-to-frame displacements (T-1, N, 3) in fractional coordinates of the later frame's cell."""
    return np.einsum("tia,tab->tib", np.diff(positions, axis=0), np.linalg.inv(cells[1:]))


def _unwrap(positions: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """Unwrap (T, N, 3) positions: each step's displacement is replaced by its minimum image in the later cell."""
    frac = _fractional_steps(positions, cells)
    steps = np.einsum("tia,tab->tib", frac - np.round(frac), cells[1:])
    return np.concatenate([positions[:1], positions[:1] + np.cumsum(steps, axis=0)])


def _looks_wrapped(positions: np.ndarray, cells: np.ndarray) -> bool:
    """True if any atom moves by more than half a cell vector (fractional) between consecutive frames."""
    return bool(np.any(np.abs(_fractional_steps(positions, cells)) > 0.5))


def _prepared_positions(frames: list[Atoms], unwrap: bool | None, remove_com: bool) -> tuple[np.ndarray, bool]:
    """Positions (T, N, 3) in Å, unwrapped if needed and with the centre-of-mass drift removed if asked."""
    positions = np.stack([atoms.get_positions() for atoms in frames])
    periodic = all(atoms.pbc.all() for atoms in frames)
    did_unwrap = False
    if periodic and unwrap is not False:
        cells = np.stack([atoms.cell.array for atoms in frames])
        if abs(np.linalg.det(cells[0])) < 1e-9:
            raise MLMDError("periodic frames have a zero-volume cell: set atoms.cell, or pbc=False for molecules")
        if unwrap or _looks_wrapped(positions, cells):
            positions = _unwrap(positions, cells)
            did_unwrap = True
    elif unwrap and not periodic:
        raise MLMDError("unwrap=True needs periodic frames (atoms.pbc all True): pass unwrap=None for clusters")
    if remove_com:
        masses = frames[0].get_masses()
        com = np.einsum("tia,i->ta", positions, masses) / masses.sum()
        positions = positions - com[:, None, :]
    return positions, did_unwrap


def msd(
    frames: Frames,
    elements: Iterable[str] | None = None,
    timestep_fs: float | None = None,
    max_lag: int | None = None,
    remove_com: bool = True,
    unwrap: bool | None = None,
    n_blocks: int = 4,
) -> MSDResult:
    """Mean squared displacement per element, averaged over atoms and all time origins (FFT, O(N T log T)).

    Args:
        frames: T ≥ 2 evenly spaced frames with the same atoms (list of ``Atoms`` or a trajectory path).
        elements: element symbols to analyse; default all present.
        timestep_fs: fs between frames, for frames without ``info["time_fs"]`` (overrides it if given).
        max_lag: largest lag in frames; default ``T // 2`` (longer lags have few time origins).
        remove_com: subtract the mass-weighted centre of mass of the whole system from every frame, so a drift
            of the system (e.g. from a thermostat) does not count as diffusion.
        unwrap: None (default) detects wrapped positions — an atom moving by more than half a cell vector between
            consecutive frames — and then unwraps by taking the minimum image of each frame-to-frame displacement;
            True always does, False never. Unwrapping is only valid if no atom really moves by half a cell
            between frames, i.e. frames are closely spaced. mlmd_lab's MD writes unwrapped positions.
        n_blocks: number of contiguous segments whose MSDs give the error of :meth:`MSDResult.diffusion`.

    Returns:
        :class:`MSDResult` with ``time_fs`` (L,) fs and ``msd[element]`` (L,) Å².
    """
    frame_list = as_frame_list(frames, min_frames=2, what="msd")
    check_same_atoms(frame_list)
    dt = frame_timestep(frame_list, timestep_fs)
    lag = _max_lag(len(frame_list), max_lag)
    groups = _element_groups(frame_list[0].get_chemical_symbols(), elements)
    positions, did_unwrap = _prepared_positions(frame_list, unwrap, remove_com)
    T = len(frame_list)
    block_len = T // n_blocks if n_blocks >= 2 else 0
    block_lag = min(lag, block_len - 1) if block_len >= 2 else 0
    result = MSDResult(time_fs=np.arange(lag + 1) * dt, msd={}, block_time_fs=np.arange(block_lag + 1) * dt,
                       unwrapped=did_unwrap, com_removed=remove_com)
    for element, idx in groups.items():
        x = positions[:, idx]
        result.msd[element] = _msd_sum(x)[:lag + 1] / len(idx)
        if block_lag >= 1:
            result.block_msd[element] = np.stack([
                _msd_sum(x[b * block_len:(b + 1) * block_len])[:block_lag + 1] / len(idx) for b in range(n_blocks)
            ])
    return result


# --------------------------------------------------------------------------------------------------------- VACF
@dataclass
class VACFResult:
    """Velocity autocorrelation function per element.

    Attributes:
        time_fs: lag times, shape ``(L,)``, fs.
        c: element → C(t) = ⟨v_i(0)·v_i(t)⟩ averaged over the element's atoms and all time origins, shape ``(L,)``,
            in Å²/fs² (times the atomic mass in amu if ``mass_weighted``, i.e. amu Å²/fs²).
        c_norm: element → C(t) / C(0), shape ``(L,)``, dimensionless.
        n_atoms: element → number of atoms of that element.
        mass_weighted: whether C(t) includes the atomic masses.
    """

    time_fs: np.ndarray
    c: dict[str, np.ndarray]
    c_norm: dict[str, np.ndarray]
    n_atoms: dict[str, int]
    mass_weighted: bool = False


def _velocities_fs(frames: list[Atoms]) -> np.ndarray:
    """Velocities (T, N, 3) in Å/fs; raises if a frame has no momenta."""
    for index, atoms in enumerate(frames):
        if not atoms.has("momenta"):
            raise MLMDError(f"frame {index} has no velocities (atoms.arrays has no 'momenta'): write the trajectory "
                            "with momenta (ase.io.Trajectory and mlmd_lab's MD do) or call atoms.set_velocities()")
    velocities = np.stack([atoms.get_velocities() for atoms in frames]) * units.fs
    if not np.any(velocities):
        raise MLMDError("all velocities are zero: the VACF needs the MD velocities (write frames with momenta)")
    return velocities


def vacf(
    frames: Frames,
    elements: Iterable[str] | None = None,
    timestep_fs: float | None = None,
    max_lag: int | None = None,
    mass_weighted: bool = False,
) -> VACFResult:
    """Velocity autocorrelation function per element, averaged over atoms and all time origins (FFT).

    Args:
        frames: T ≥ 2 evenly spaced frames with the same atoms and momenta set.
        elements: element symbols to analyse; default all present.
        timestep_fs: fs between frames, for frames without ``info["time_fs"]`` (overrides it if given).
        max_lag: largest lag in frames; default ``T // 2``.
        mass_weighted: multiply each atom's C(t) by its mass (amu), e.g. for kinetic-energy-weighted spectra.

    Returns:
        :class:`VACFResult` with ``time_fs`` (L,) fs, ``c`` and ``c_norm`` per element, each (L,).
    """
    frame_list = as_frame_list(frames, min_frames=2, what="vacf")
    check_same_atoms(frame_list)
    dt = frame_timestep(frame_list, timestep_fs)
    lag = _max_lag(len(frame_list), max_lag)
    groups = _element_groups(frame_list[0].get_chemical_symbols(), elements)
    velocities = _velocities_fs(frame_list)
    masses = frame_list[0].get_masses()
    result = VACFResult(time_fs=np.arange(lag + 1) * dt, c={}, c_norm={}, n_atoms={}, mass_weighted=mass_weighted)
    for element, idx in groups.items():
        weights = masses[idx] if mass_weighted else None
        c = _autocorrelation_sum(velocities[:, idx], weights)[:lag + 1] / len(idx)
        if c[0] <= 0:
            raise MLMDError(f"the {element} atoms never move (C(0) = 0): the VACF needs non-zero velocities")
        result.c[element] = c
        result.c_norm[element] = c / c[0]
        result.n_atoms[element] = len(idx)
    return result


# --------------------------------------------------------------------------------------------------------- VDOS
@dataclass
class VDOSResult:
    """Vibrational density of states (power spectrum of the VACF) per element and in total.

    Attributes:
        frequency_thz: frequencies ν, shape ``(F,)``, THz.
        frequency_cm: the same in cm⁻¹ (wavenumbers, ν × 33.35641), shape ``(F,)``.
        dos: element → spectrum, shape ``(F,)``, 1/THz, normalised to unit area ∫ dos dν = 1 (ν in THz).
        total: Σ_element 3 N_element × dos[element], 1/THz, so ∫ total dν = 3N, the number of degrees of freedom.
            Each element's unit-area spectrum is weighted by its degrees of freedom, which equals the
            mass-weighted (physical) DOS for an equilibrated system (equipartition), whether or not the VACF was
            mass weighted.
        window: the window applied to the VACF before the transform.
    """

    frequency_thz: np.ndarray
    frequency_cm: np.ndarray
    dos: dict[str, np.ndarray]
    total: np.ndarray
    window: str = "hann"

    def band_maximum(self, lo_cm: float, hi_cm: float, element: str | None = None) -> float:
        """Frequency (cm⁻¹) of the highest point of the spectrum between ``lo_cm`` and ``hi_cm`` cm⁻¹.

        ``element=None`` uses :attr:`total`. The maximum is refined by a parabola through the top three points.
        """
        spectrum = self.total if element is None else self._element(element)
        inside = np.flatnonzero((self.frequency_cm >= lo_cm) & (self.frequency_cm <= hi_cm))
        if inside.size == 0:
            raise MLMDError(f"no frequencies between {lo_cm} and {hi_cm} cm⁻¹ (spectrum covers "
                            f"0–{self.frequency_cm[-1]:.0f} cm⁻¹ every {self.frequency_cm[1]:.2f}): widen the window")
        k = int(inside[np.argmax(spectrum[inside])])
        if 0 < k < len(spectrum) - 1:
            y0, y1, y2 = spectrum[k - 1:k + 2]
            denom = y0 - 2 * y1 + y2
            shift = 0.5 * (y0 - y2) / denom if denom < 0 else 0.0
            step = self.frequency_cm[1] - self.frequency_cm[0]
            return float(self.frequency_cm[k] + np.clip(shift, -0.5, 0.5) * step)
        return float(self.frequency_cm[k])

    def _element(self, element: str) -> np.ndarray:
        if element not in self.dos:
            raise MLMDError(f"no spectrum for element {element!r} (have: {', '.join(self.dos)}): pass one of those")
        return self.dos[element]


def _window(name: str | None, n: int) -> np.ndarray:
    """Decaying half window of length n: 1 at lag 0, → 0 at the last lag."""
    key = "none" if name is None else str(name).lower()
    lag = np.arange(n) / max(n - 1, 1)
    if key == "hann":
        return 0.5 * (1 + np.cos(np.pi * lag))
    if key == "blackman":
        return 0.42 + 0.5 * np.cos(np.pi * lag) + 0.08 * np.cos(2 * np.pi * lag)
    if key in ("none", "boxcar", "rect"):
        return np.ones(n)
    raise MLMDError(f"unknown window {name!r}: use 'hann', 'blackman' or None")


def _spectrum(c: np.ndarray, dt_fs: float, window: np.ndarray, nfft: int) -> np.ndarray:
    """Cosine transform of the even extension of the windowed C(t): S(ν) = dt [c0 + 2 Σ_m c_m cos(2πνmΔt)]."""
    cw = c * window
    even = np.zeros(nfft)
    even[:len(cw)] = cw
    even[nfft - len(cw) + 1:] = cw[:0:-1]
    return np.fft.rfft(even).real * dt_fs


def _unit_area(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    area = 0.5 * float(np.sum((y[1:] + y[:-1]) * np.diff(x)))
    if not np.isfinite(area) or area <= 0:
        raise MLMDError("the spectrum has no positive area: check the velocities (longer run or other max_lag)")
    return y / area


def vdos(
    source: Frames | VACFResult,
    elements: Iterable[str] | None = None,
    timestep_fs: float | None = None,
    max_lag: int | None = None,
    window: str | None = "hann",
    mass_weighted: bool = False,
    padding: int = 4,
) -> VDOSResult:
    """Vibrational density of states from the Fourier transform of the windowed VACF.

    Args:
        source: frames (as for :func:`vacf`, which is then called with ``elements``, ``timestep_fs``,
            ``max_lag``, ``mass_weighted``) or a :class:`VACFResult`.
        window: "hann" (default), "blackman" or None: decaying window applied to C(t) to suppress truncation
            ripples; the frequency resolution is ~ 1 / (max_lag time) (e.g. 2 THz ≈ 67 cm⁻¹ for 500 fs).
        padding: zero-padding factor of the transform (interpolates the spectrum, does not add resolution).

    Returns:
        :class:`VDOSResult`; frequencies from 0 to the Nyquist frequency 1 / (2 Δt).
    """
    if isinstance(source, VACFResult):
        result = source
        if elements is not None:
            wanted = [elements] if isinstance(elements, str) else list(elements)
            missing = [e for e in wanted if e not in result.c]
            if missing:
                raise MLMDError(f"the VACF has no element(s) {missing} (have: {', '.join(result.c)}): recompute it")
            result = VACFResult(result.time_fs, {e: result.c[e] for e in wanted},
                                {e: result.c_norm[e] for e in wanted}, {e: result.n_atoms[e] for e in wanted},
                                result.mass_weighted)
    else:
        result = vacf(source, elements, timestep_fs, max_lag, mass_weighted)
    n_lags = len(result.time_fs)
    if n_lags < 2:
        raise MLMDError("the VACF has a single lag: compute it with max_lag >= 1")
    dt = float(result.time_fs[1] - result.time_fs[0])
    nfft = _fft_size(n_lags) * max(1, int(padding))
    frequency_thz = np.fft.rfftfreq(nfft, d=dt) * 1000.0  # 1/fs → THz
    win = _window(window, n_lags)
    dos = {element: _unit_area(_spectrum(c, dt, win, nfft), frequency_thz) for element, c in result.c.items()}
    total = sum(3 * result.n_atoms[element] * spectrum for element, spectrum in dos.items())
    return VDOSResult(frequency_thz=frequency_thz, frequency_cm=frequency_thz * THZ_TO_CM1, dos=dos,
                      total=np.asarray(total), window="none" if window is None else str(window))
