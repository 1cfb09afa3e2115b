"""Radial distribution functions g(r) and running coordination numbers of periodic MD frames.

Distances use ASE's neighbour list (minimum image and periodic images, any triclinic cell), so positions may be
wrapped or unwrapped. Frames may differ in cell (NPT) and even composition; each frame is normalised with its own
volume and atom counts and g(r) is averaged over frames.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import combinations_with_replacement

import numpy as np
from ase import Atoms
from ase.neighborlist import neighbor_list

from mlmd_lab.analysis.dynamics import Frames, as_frame_list
from mlmd_lab.errors import MLMDError

Pair = tuple[str, str]


@dataclass
class RDFResult:
    """Partial radial distribution functions.

    Attributes:
        r: bin centres, shape ``(B,)``, Å.
        edges: bin edges, shape ``(B + 1,)``, Å (``edges[0] = 0``).
        g: pair (a, b) → g_ab(r), shape ``(B,)``, dimensionless, averaged over frames; normalised by the ideal-gas
            density of b, ρ_b = (N_b − δ_ab) / V, so g → 1 at large r in a liquid (exactly 1 for an ideal gas).
        coordination: pair (a, b) → running coordination number n_ab(r) at the bin centres, shape ``(B,)``: the
            mean number of b atoms within r of an a atom, n_ab(r) = 4π ρ_b ∫₀ʳ g_ab(s) s² ds (counted directly).
        coordination_edges: the same at the bin edges, shape ``(B + 1,)``, used for interpolation.
        n_atoms: element → number of atoms (mean over frames).
        n_frames: number of frames averaged.
    """

    r: np.ndarray
    edges: np.ndarray
    g: dict[Pair, np.ndarray]
    coordination: dict[Pair, np.ndarray]
    coordination_edges: dict[Pair, np.ndarray] = field(default_factory=dict)
    n_atoms: dict[str, float] = field(default_factory=dict)
    n_frames: int = 1

    def _g(self, pair: Pair) -> np.ndarray:
        pair = tuple(pair)
        if pair in self.g:
            return self.g[pair]
        if pair[::-1] in self.g:
            return self.g[pair[::-1]]  # g_ab = g_ba
        raise MLMDError(f"no g(r) for pair {pair} (have: {', '.join(map(str, self.g))}): pass one of those "
                        "or recompute with rdf(frames, pairs=[...])")

    def _running(self, pair: Pair) -> np.ndarray:
        """n_ab at the bin edges; for a reversed pair n_ba = n_ab N_a / N_b (same number of a–b pairs)."""
        a, b = pair
        if (a, b) in self.coordination_edges:
            return self.coordination_edges[(a, b)]
        self._g(pair)  # raises if neither order is present
        return self.coordination_edges[(b, a)] * self.n_atoms[b] / self.n_atoms[a]

    def first_peak(self, pair: Pair, min_prominence: float = 0.1) -> tuple[float, float]:
        """``(r_peak, g_peak)`` (Å, dimensionless) of the first peak of g_ab.

        The first local maximum whose prominence is at least ``min_prominence`` × max g, so noise on the rising
        edge is skipped. Raises :class:`MLMDError` if there is none (r_max too small or no structure).
        """
        from scipy.signal import find_peaks

        g = self._g(pair)
        peaks, _ = find_peaks(g, prominence=min_prominence * float(np.max(g)))
        if peaks.size == 0:
            raise MLMDError(f"g(r) of {tuple(pair)} has no peak below r_max={self.edges[-1]:g} Å: use a larger r_max "
                            "or more frames")
        k = int(peaks[0])
        return float(self.r[k]), float(g[k])

    def first_minimum(self, pair: Pair, min_prominence: float = 0.05) -> tuple[float, float]:
        """``(r_min, g_min)`` (Å, dimensionless): the first minimum of g_ab after its first peak.

        The first local minimum beyond the first peak whose depth (prominence) is at least
        ``min_prominence`` × the first-peak height; for a flat zero gap (crystals) its middle.
        """
        from scipy.signal import find_peaks

        g = self._g(pair)
        r_peak, g_peak = self.first_peak(pair)
        k_peak = int(np.argmin(np.abs(self.r - r_peak)))
        minima, _ = find_peaks(-g, prominence=min_prominence * g_peak)
        minima = minima[minima > k_peak]
        if minima.size == 0:
            raise MLMDError(f"g(r) of {tuple(pair)} has no minimum after its first peak at {r_peak:.2f} Å below "
                            f"r_max={self.edges[-1]:g} Å: use a larger r_max or pass r_cut explicitly")
        k = int(minima[0])
        return float(self.r[k]), float(g[k])

    def coordination_number(self, pair: Pair, r_cut: float | None = None) -> float:
        """Mean number of b atoms within ``r_cut`` Å of an a atom; default ``r_cut`` = :meth:`first_minimum`."""
        if r_cut is None:
            r_cut = self.first_minimum(pair)[0]
        if not 0 <= r_cut <= self.edges[-1]:
            raise MLMDError(f"r_cut={r_cut} Å is outside the RDF range 0–{self.edges[-1]:g} Å: "
                            "use a smaller r_cut or recompute with a larger r_max")
        return float(np.interp(r_cut, self.edges, self._running(tuple(pair))))


def perpendicular_widths(cell: np.ndarray) -> np.ndarray:
    """Distances between opposite faces of a cell (rows = cell vectors), shape ``(3,)``, Å."""
    volume = abs(np.linalg.det(cell))
    return np.array([volume / np.linalg.norm(np.cross(cell[(i + 1) % 3], cell[(i + 2) % 3])) for i in range(3)])


def _check_frame(index: int, atoms: Atoms, r_max: float) -> float:
    """Validate a frame for the RDF; returns its volume (Å³)."""
    if not atoms.pbc.all():
        raise MLMDError(f"frame {index} is not periodic in all directions (pbc={atoms.pbc.tolist()}): the RDF is "
                        "normalised by the density, so it needs a periodic cell (set atoms.cell and atoms.pbc=True)")
    volume = abs(atoms.cell.volume)
    if volume < 1e-9:
        raise MLMDError(f"frame {index} has a zero-volume cell: set atoms.cell to the simulation box")
    half = perpendicular_widths(atoms.cell.array).min() / 2
    if r_max > half + 1e-9:
        raise MLMDError(f"r_max={r_max:g} Å is larger than half the smallest perpendicular cell width ({half:.3f} Å) "
                        f"of frame {index}: use r_max <= {half:.3f} Å or a larger cell (atoms.repeat)")
    return volume


def _default_pairs(frames: list[Atoms]) -> list[Pair]:
    """All unordered element pairs (sorted) present, skipping X–X pairs with a single X atom."""
    counts: dict[str, int] = {}
    for symbol in frames[0].get_chemical_symbols():
        counts[symbol] = counts.get(symbol, 0) + 1
    return [(a, b) for a, b in combinations_with_replacement(sorted(counts), 2) if a != b or counts[a] > 1]


def _frame_histograms(atoms: Atoms, pairs: list[Pair], edges: np.ndarray) -> dict[Pair, np.ndarray]:
    """Counts of b atoms around a atoms per distance bin, summed over a atoms, per pair."""
    i, j, d = neighbor_list("ijd", atoms, float(edges[-1]))
    symbols = np.asarray(atoms.get_chemical_symbols())
    si, sj = symbols[i], symbols[j]
    return {(a, b): np.histogram(d[(si == a) & (sj == b)], bins=edges)[0].astype(float) for a, b in pairs}


def rdf(
    frames: Frames,
    pairs: Iterable[Pair] | None = None,
    r_max: float = 6.0,
    bin_width: float = 0.02,
) -> RDFResult:
    """Partial radial distribution functions g_ab(r), averaged over frames.

    Args:
        frames: periodic frames (list of ``Atoms``, one ``Atoms``, or a trajectory path); triclinic cells allowed.
        pairs: element pairs (a, b), e.g. ``[("O", "O"), ("O", "H")]``; default all unordered pairs present
            (alphabetical, like ("H", "O")). The order matters only for the coordination number (b around a).
        r_max: largest distance, Å; at most half the smallest perpendicular cell width of every frame.
        bin_width: histogram bin width, Å (the last bin is shortened or lengthened so bins end at ``r_max``).

    Returns:
        :class:`RDFResult` with ``r`` (B,) Å, ``g`` and ``coordination`` per pair.
    """
    frame_list = as_frame_list(frames, min_frames=1, what="rdf")
    if not (np.isfinite(r_max) and r_max > 0 and np.isfinite(bin_width) and 0 < bin_width < r_max):
        raise MLMDError(f"r_max={r_max} Å and bin_width={bin_width} Å must be positive with bin_width < r_max")
    pair_list = _default_pairs(frame_list) if pairs is None else [tuple(p) for p in pairs]
    if not pair_list:
        raise MLMDError("no element pairs to analyse (a single atom?): pass pairs=[('A', 'B'), ...]")
    n_bins = max(1, int(round(r_max / bin_width)))
    edges = np.linspace(0.0, r_max, n_bins + 1)
    shells = 4.0 / 3.0 * np.pi * np.diff(edges**3)
    g_sum = {p: np.zeros(n_bins) for p in pair_list}
    n_sum = {p: np.zeros(n_bins) for p in pair_list}
    atom_sum: dict[str, float] = {}
    for index, atoms in enumerate(frame_list):
        volume = _check_frame(index, atoms, r_max)
        symbols = atoms.get_chemical_symbols()
        counts = {e: symbols.count(e) for e in {x for p in pair_list for x in p}}
        for (a, b), hist in _frame_histograms(atoms, pair_list, edges).items():
            n_a, n_b = counts[a], counts[b] - (a == b)
            if n_a == 0 or n_b <= 0:
                raise MLMDError(f"frame {index} has {counts[a]} {a} and {counts[b]} {b} atoms: the {a}–{b} RDF needs "
                                "at least one of each (two for a same-element pair); choose pairs present")
            g_sum[(a, b)] += hist / (n_a * n_b / volume * shells)
            n_sum[(a, b)] += hist / n_a
        for element, count in counts.items():
            atom_sum[element] = atom_sum.get(element, 0.0) + count
    n_frames = len(frame_list)
    running = {p: np.concatenate([[0.0], np.cumsum(n_sum[p] / n_frames)]) for p in pair_list}
    return RDFResult(
        r=0.5 * (edges[1:] + edges[:-1]),
        edges=edges,
        g={p: g_sum[p] / n_frames for p in pair_list},
        coordination={p: 0.5 * (running[p][1:] + running[p][:-1]) for p in pair_list},
        coordination_edges=running,
        n_atoms={e: c / n_frames for e, c in atom_sum.items()},
        n_frames=n_frames,
    )
