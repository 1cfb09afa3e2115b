"""Neighbour data for symmetry functions: pair and triplet lists, grouped by element and padded.

Built on the host with numpy. Pairs come from vesin's cell-list neighbour search (O(N), any triclinic
cell, cells smaller than the cutoff with many periodic images, and non-periodic molecules). Triplets (a central
atom i with an unordered neighbour pair {j, k}) are enumerated from each atom's pair list with vectorised numpy.

Layout (what :mod:`mlmd_lab.potentials.descriptors` expects):

- pairs are grouped in blocks by (element of i, element of j), block b = c * n_elements + e, each block padded
  to a capacity; padded entries have ``pair_mask`` False;
- triplets are grouped by (element of i, e1, e2) with e1 <= e2 the neighbour elements (j has e1, k has e2),
  each group padded; they point to pairs by index (``trip_ij``, ``trip_ik``);
- several structures can be packed into one graph (training batches): atoms, pairs and triplets are
  concatenated, each carries its structure index, and padded atoms have species -1.

Capacities are rounded up to a few sizes (steps of at most 12.5 %) so that a jit-compiled function is
reused for structures of similar size and across neighbour-list rebuilds in MD.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numba
import numpy as np
import vesin

from mlmd_lab.errors import MLMDError


def bucket(count: int, minimum: int = 8) -> int:
    """Capacity for ``count`` entries: at least count + 1, rounded up in steps of at most 1/8."""
    need = max(int(count) + 1, minimum)
    step = max(1, 2 ** max(0, need.bit_length() - 4))
    return -(-need // step) * step


#: Evaluation graphs' capacities up to this many entries are powers of two (:func:`graph_capacity`).
SMALL_CAPACITY = 4096

#: An MD list that outgrows the layout it was to reuse (:meth:`NeighbourBuilder.build_one` with ``capacities``)
#: gets room for this many times its new count in the blocks and groups that overflowed: each new layout is a
#: new XLA compilation of the MD block (~6 s for n2p2's Cu2S potential on an idle core, 15-20 s on a busy machine),
#: and a count that rose once (a crystal heating from its DFT structure, a liquid's fluctuations) usually rises
#: again. Without it, 60 NVT steps of the 144-atom Cu2S cell at 600 K from its DFT structure grew the triplet groups
#: in steps of 1/8 and compiled the block four times (34 s), with it twice (23 s); the 200 NVE steps that follow
#: compile three times either way, at the same speed per step (1,115 and 1,126 atom-steps/s). 1/16 gave the same
#: counts. The first build stays tight (no padding where nothing grows); the slots added here are masked and cost at
#: most this fraction more work in the groups that grew. jax-md's neighbour lists reallocate with a capacity
#: multiplier (default 1.25) the same way; 1/8 is one :func:`bucket` step.
REGROW_HEADROOM = 1.125

#: A fresh MD layout built with ``spare`` (:meth:`NeighbourBuilder.build_one`; the MD engine's host route and the
#: SLHMC proposals) holds this fraction more than its counts in every block and group, within
#: :data:`SPARE_BYTES`. Why: padding costs memory but no time (the descriptor loops stop at the real count,
#: ``Graph.pair_count``), while each new layout is a compilation. Measured (n2p2's Cu2S potential, 144 atoms, one
#: thread, tutorial 04's runs: 60 NVT steps at 600 K from the DFT structure, then 200 NVE steps): 5 compilations
#: without spare slots, 2 with them (``benchmarks/bench_layouts.py``). jax-md's neighbour lists allocate 1.25 times
#: their count the same way.
SPARE = 0.125
#: The spare slots' memory limit (bytes, counted as 8 per triplet slot and 64 per pair slot with its pair
#: vectors): systems beyond ~3,000 atoms of water get a smaller fraction (69,120 atoms: ~0.6 %, 0.24 KB/atom),
#: which keeps their memory per atom; their counts fluctuate less and a recompilation is a smaller part of their
#: run.
SPARE_BYTES = 16 * 2**20


def spare_fraction(pair_counts, trip_counts) -> float:
    """The spare fraction a fresh MD layout of these counts gets: :data:`SPARE`, less where the spare slots would
    take more than :data:`SPARE_BYTES`."""
    size = 64 * int(np.sum(pair_counts)) + 8 * int(np.sum(trip_counts))
    return min(SPARE, SPARE_BYTES / max(size, 1))


def graph_capacity(count: int) -> int:
    """Capacity of an evaluation graph's atom, pair or triplet slots (single points, batches, the calculator): a
    power of two up to :data:`SMALL_CAPACITY`, else :func:`bucket`.

    Each new capacity is a new XLA compilation (5-15 s for a potential's energy and forces on a CPU), while
    padding a small graph costs microseconds. With steps of 1/8, rattled copies of one 16-atom cell fell into
    different pair and triplet capacities and each compiled again: on tests/test_potentials_physics.py, 478 s of
    worker time with :func:`bucket`, 439 s with powers of two up to 1,024 entries, 258 s up to 4,096 (2 workers).
    MD graphs (:meth:`NeighbourBuilder.build_one`) and training records keep :func:`bucket`: there the padding is
    paid at every step or in memory, and the shapes are fixed for the whole run anyway."""
    need = max(int(count) + 1, 8)
    if need <= SMALL_CAPACITY:
        return 1 << (need - 1).bit_length()
    return bucket(count)


@dataclass(frozen=True)
class Layout:
    """Static shape information (hashable: a jit static argument).

    Attributes:
        n_atoms: atom slots (padded).
        n_structures: structures in the graph.
        n_elements: elements of the model.
        pair_blocks: (offset, capacity) per (c, e) block, c-major.
        triplet_groups: ((c, e1, e2), offset, capacity) per angular group present in the model.
    """

    n_atoms: int
    n_structures: int
    n_elements: int
    pair_blocks: tuple[tuple[int, int], ...]
    triplet_groups: tuple[tuple[tuple[int, int, int], int, int], ...]


@dataclass
class Graph:
    """Neighbour data of one or more structures (numpy arrays; lengths in the model's length unit).

    Shapes: positions (N, 3), cells (B, 3, 3), species (N,) element index or -1 for padding, atom_struct (N,),
    pair_i/pair_j (P,) atom indices, pair_shift (P, 3) image counts (float; the smallest integer type in lean MD
    graphs), pair_struct (P,), pair_mask (P,), trip_ij/trip_ik (T,) pair indices, trip_i (T,) central atom,
    trip_mask (T,). ``n_real`` holds the real atom count per structure. Atom, pair and triplet indices are int32
    (a 69,120-atom water box has 1.8e8 triplets: 4-byte indices halve their memory). Padded triplets point at pair
    0 twice (trip_ij == trip_ik, which no real triplet has) and are masked. ``pair_count`` (E*E,) and
    ``trip_count`` (G,) (int32) hold how many real entries each pair block and triplet group has: they fill its
    first slots, the rest of its capacity is padding, and the descriptor loops stop there (padding costs memory,
    not time).
    """

    positions: np.ndarray
    cells: np.ndarray
    species: np.ndarray
    atom_struct: np.ndarray
    pair_i: np.ndarray
    pair_j: np.ndarray
    pair_shift: np.ndarray
    pair_struct: np.ndarray
    pair_mask: np.ndarray
    trip_ij: np.ndarray
    trip_ik: np.ndarray
    trip_i: np.ndarray | None  # None in a lean graph (NeighbourBuilder.build_one)
    trip_mask: np.ndarray | None
    layout: Layout
    n_real: np.ndarray
    pair_count: np.ndarray | None = None
    trip_count: np.ndarray | None = None

    def arrays(self) -> dict[str, np.ndarray]:
        """The array fields (what the jit-compiled functions take)."""
        names = ("positions", "cells", "species", "atom_struct", "pair_i", "pair_j", "pair_shift", "pair_struct",
                 "pair_mask", "trip_ij", "trip_ik", "trip_i", "trip_mask", "pair_count", "trip_count")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


@dataclass
class _Raw:
    """Unpadded neighbour data of one structure, pairs sorted by i."""

    i: np.ndarray
    j: np.ndarray
    shift: np.ndarray
    block: np.ndarray
    t_a: np.ndarray  # triplet: index of pair (i, j)
    t_b: np.ndarray  # triplet: index of pair (i, k)
    t_group: np.ndarray


def pair_list(positions, cell, pbc, cutoff: float):
    """Full neighbour list (i, j, image shifts, distance vectors) within ``cutoff``, sorted by i."""
    positions = np.ascontiguousarray(positions, dtype=np.float64)
    cell = np.asarray(cell, dtype=np.float64)
    pbc = np.asarray(pbc, dtype=bool)
    if pbc.any() and abs(np.linalg.det(cell)) < 1e-12:
        raise MLMDError("periodic structure with a degenerate cell (zero volume); give the cell or set pbc=False")
    calculator = vesin.NeighborList(cutoff=float(cutoff), full_list=True, sorted=True)
    box = np.where(pbc[:, None], cell, 0.0) if not pbc.all() else cell
    i, j, S, D = calculator.compute(positions, box, pbc if not pbc.all() else True, "ijSD")
    return i.astype(np.int64), j.astype(np.int64), S.astype(np.int64), D


def skin_holds(positions, cell, reference_positions, reference_cell, cutoff: float, skin: float,
               variable_cell: bool, xp=np):
    """True while neighbour data built with ``skin`` at (reference_positions, reference_cell) still hold every
    pair and triplet within ``cutoff``: the one reuse rule of the ASE calculator and the MD engine.

    Positions are split into the affine map of the cell change M = h0^-1 h and a remainder u_i; a distance
    can shrink at most to sigma_min(M) |d0| - 2 max|u|. Pairs farther than cutoff + skin at build time
    stay beyond the cutoff while (cutoff + skin) sigma_min(M) - 2 max|u| > cutoff. At fixed cell this is the
    usual half-skin rule (2 max|u| < skin); with a changing cell it also covers its compression.

    Args:
        positions, reference_positions: (N, 3), unwrapped (same image of every atom as at build time).
        cell, reference_cell: (3, 3), rows are cell vectors; only read with ``variable_cell``.
        cutoff: the interaction range the lists must cover, without the skin; same length unit throughout.
        skin: the extra distance the lists were built with.
        variable_cell: the cell may differ from the reference one (needs an invertible reference cell);
            False for a fixed cell and for non-periodic structures.
        xp: the array module, ``numpy`` (host, the default) or ``jax.numpy`` (inside a compiled MD step).

    Returns:
        A boolean scalar (numpy or JAX).
    """
    if not variable_cell:
        u = positions - reference_positions
        return 2.0 * xp.sqrt(xp.max(xp.sum(u * u, axis=1))) < skin
    M = xp.linalg.solve(reference_cell, cell)
    u = positions - reference_positions @ M
    largest = xp.sqrt(xp.max(xp.sum(u * u, axis=1)))
    smallest_stretch = xp.min(xp.linalg.svd(M, compute_uv=False))
    return (cutoff + skin) * smallest_stretch - 2.0 * largest > cutoff


@numba.njit(cache=True, nogil=True, inline="always")
def _visit_atom(atom, starts, dist, vec, e, species, table, group_rc, group_wide, cutoff_ang, where, first, room,
                out_a, out_b, counts):
    """Unordered neighbour pairs {j, k} of one central atom by element-triple group, in pair order: counted into
    ``counts`` (G,) and written as pair slots ``where[p]`` into ``out_a``/``out_b`` from ``first[g]`` on (j carries
    the lower element e1), at most ``room[g]`` of them (the counting pass's figure: a disagreement is reported by
    the counts, never written past the atom's slots)."""
    local = np.empty(starts[atom + 1] - starts[atom], np.int64)
    m = 0
    for p in range(starts[atom], starts[atom + 1]):
        if dist[p] < cutoff_ang:
            local[m] = p
            m += 1
    c = species[atom]
    for x in range(m):
        p = local[x]
        for y in range(x + 1, m):
            q = local[y]
            g = table[c, e[p], e[q]]
            if g < 0:
                continue
            rc = group_rc[g]
            if dist[p] >= rc or dist[q] >= rc:
                continue
            if not group_wide[g]:
                dx = vec[q, 0] - vec[p, 0]
                dy = vec[q, 1] - vec[p, 1]
                dz = vec[q, 2] - vec[p, 2]
                if dx * dx + dy * dy + dz * dz >= rc * rc:
                    continue
            if counts[g] < room[g]:
                k = first[g] + counts[g]
                if e[p] > e[q]:
                    out_a[k], out_b[k] = where[q], where[p]
                else:
                    out_a[k], out_b[k] = where[p], where[q]
            counts[g] += 1


@numba.njit(cache=True, nogil=True, inline="always")
def _by_element(atom, starts, dist, vec, e, n_elements, cutoff_ang):
    """One central atom's neighbours inside ``cutoff_ang``, grouped by element (pair order within an element) as
    contiguous arrays: (segment starts (E + 1,), x, y, z, distance (m,) each)."""
    seg = np.zeros(n_elements + 1, np.int64)
    for p in range(starts[atom], starts[atom + 1]):
        if dist[p] < cutoff_ang:
            seg[e[p] + 1] += 1
    for k in range(n_elements):
        seg[k + 1] += seg[k]
    m = seg[n_elements]
    slot = seg[:n_elements].copy()
    lx, ly, lz, ld = np.empty(m), np.empty(m), np.empty(m), np.empty(m)
    for p in range(starts[atom], starts[atom + 1]):
        if dist[p] < cutoff_ang:
            k = slot[e[p]]
            lx[k], ly[k], lz[k], ld[k] = vec[p, 0], vec[p, 1], vec[p, 2], dist[p]
            slot[e[p]] += 1
    return seg, lx, ly, lz, ld


@numba.njit(cache=True, nogil=True, parallel=True)
def _count_triplets(starts, dist, vec, e, species, table, group_rc, group_wide, n_groups, cutoff_ang):
    """Triplets per central atom and group (n_atoms, G), atoms in parallel (numba threads).

    The same rule as :func:`_visit_atom` (and bitwise the same arithmetic: r_jk^2 from the difference of the two
    pair vectors, summed x, y, z; the sign of a difference does not change its square), but visited by element
    pair: each atom's neighbours are first copied, grouped by element, into contiguous arrays, so the innermost
    loop has one group, one cutoff and no branch (a loop the compiler can vectorise). Why not :func:`_visit_atom`:
    measured 53 -> 11 ms for 1,080-atom water (n2p2's H2O potential, skin 0.5 Å, one thread); the counts of both
    are equal (tests/test_neighbours.py). The fill keeps the pair-order visit (it fixes the triplets' order)."""
    n_atoms = starts.size - 1
    n_elements = table.shape[1]
    counts = np.zeros((n_atoms, n_groups), np.int64)
    for atom in numba.prange(n_atoms):
        seg, lx, ly, lz, ld = _by_element(atom, starts, dist, vec, e, n_elements, cutoff_ang)
        c = species[atom]
        for e1 in range(n_elements):
            for e2 in range(e1, n_elements):
                g = table[c, e1, e2]
                if g < 0:
                    continue
                rc = group_rc[g]
                rc2 = rc * rc
                total = 0
                for x in range(seg[e1], seg[e1 + 1]):
                    if ld[x] >= rc:
                        continue
                    first = x + 1 if e1 == e2 else seg[e2]
                    if group_wide[g]:
                        for y in range(first, seg[e2 + 1]):
                            total += ld[y] < rc
                        continue
                    px, py, pz = lx[x], ly[x], lz[x]
                    for y in range(first, seg[e2 + 1]):
                        dx = lx[y] - px
                        dy = ly[y] - py
                        dz = lz[y] - pz
                        total += (ld[y] < rc) & (dx * dx + dy * dy + dz * dz < rc2)
                counts[atom, g] += total
    return counts


@numba.njit(cache=True, nogil=True, parallel=True)
def _fill_triplets(starts, dist, vec, e, species, table, group_rc, group_wide, n_groups, cutoff_ang, where, first,
                   room, out_a, out_b):
    """Writes every atom's triplets from its slots ``first`` (n_atoms, G) on, at most ``room`` (n_atoms, G) of
    them, atoms in parallel; returns the triplets found per atom and group (n_atoms, G)."""
    found = np.zeros((starts.size - 1, n_groups), np.int64)
    for atom in numba.prange(starts.size - 1):
        _visit_atom(atom, starts, dist, vec, e, species, table, group_rc, group_wide, cutoff_ang, where,
                    first[atom], room[atom], out_a, out_b, found[atom])
    return found


class _Triplets:
    """The triplets of one structure's pair list, enumerated in two passes: count per central atom and group, then
    write each atom's triplets into its own slots. Why two passes compiled with numba: a dense liquid has millions
    of candidates, which vectorised numpy visited 10x slower through its temporaries; counting first means no
    growing buffers and no sort (memory is the output alone), and per-atom slots let both passes run over atoms in
    parallel. Order: by group, within a group by central atom, within an atom by pair order.

    Args are the pair list (``i`` sorted), distances, vectors (P, 3), neighbour elements e (P,), species (N,) and
    the builder's group tables."""

    def __init__(self, i, dist, vec, e, species, table, group_rc, group_wide, n_groups, cutoff_ang):
        starts = np.searchsorted(i, np.arange(len(species) + 1))
        self.args = (starts, dist, vec, e, species, table, group_rc, group_wide, n_groups, cutoff_ang)
        with _PARALLEL:
            _use_available_cores()
            self.per_atom = _count_triplets(*self.args)
        self.counts = self.per_atom.sum(axis=0)

    def fill(self, where: np.ndarray, offsets: np.ndarray, out_a: np.ndarray, out_b: np.ndarray) -> None:
        """Write the triplets as pair slots ``where[p]``, group g's from ``offsets[g]`` on."""
        first = np.cumsum(self.per_atom, axis=0) - self.per_atom + np.asarray(offsets, np.int64)[None, :]
        with _PARALLEL:
            found = _fill_triplets(*self.args, where, first, self.per_atom, out_a, out_b)
        if not np.array_equal(found, self.per_atom):  # a defect of the two passes, never expected
            atom = int(np.flatnonzero((found != self.per_atom).any(axis=1))[0])
            raise MLMDError(f"triplet lists: the counting and the writing pass disagree for atom {atom} "
                            f"({self.per_atom[atom].tolist()} against {found[atom].tolist()} per group); this is a "
                            "bug of mlmd_lab.potentials.neighbours, please report it with the structure")


#: One parallel numba region at a time per process: numba's fallback threading layer (workqueue, where neither
#: OpenMP nor TBB is found) aborts the process when two Python threads enter parallel code at once (e.g. training
#: in a notebook's background thread while MD runs).
_PARALLEL = threading.Lock()


def _use_available_cores() -> None:
    """numba's threads follow the cores this process may use (a 1-core benchmark or an xdist worker pinned to
    fewer cores must not oversubscribe them)."""
    wanted = max(1, min(numba.config.NUMBA_NUM_THREADS, len(os.sched_getaffinity(0))))
    if numba.get_num_threads() != wanted:
        numba.set_num_threads(wanted)


def _triplet_kernel(i, dist, vec, e, species, table, group_rc, group_wide, n_groups, cutoff_ang):
    """(a, b, group) of one structure's triplets, unpadded: pair indices of (i, j) and (i, k), grouped by element
    triple and within a group in order of the central atom (int32)."""
    triplets = _Triplets(i, dist, vec, e, species, table, group_rc, group_wide, n_groups, cutoff_ang)
    counts = triplets.counts
    offsets = np.r_[0, np.cumsum(counts)[:-1]].astype(np.int64)
    a = np.empty(int(counts.sum()), np.int32)
    b = np.empty_like(a)
    triplets.fill(np.arange(i.size, dtype=np.int32), offsets, a, b)
    return a, b, np.repeat(np.arange(n_groups, dtype=np.int32), counts)


class NeighbourBuilder:
    """Builds :class:`Graph` objects for a model's elements and cutoffs.

    Args:
        n_elements: number of model elements (species indices 0..n-1).
        cutoff: largest radial cutoff (model length unit).
        angular_groups: {(c, e1, e2): (cutoff, needs_all_jk)} for each angular group of the model;
            ``needs_all_jk`` is True when a wide (type 9) function needs pairs with r_jk beyond the cutoff.
        skin: extra distance kept in the lists (for reuse in MD; 0 for single points).
    """

    def __init__(self, n_elements: int, cutoff: float, angular_groups: dict, skin: float = 0.0) -> None:
        self.n_elements = n_elements
        self.skin = float(skin)
        self.cutoff = float(cutoff) + self.skin
        self.group_keys = tuple(sorted(angular_groups))
        E = n_elements
        self._table = np.full((E, E, E), -1, np.int64)  # (c, e_j, e_k) -> group, symmetric in j, k
        self._group_rc = np.zeros(max(1, len(self.group_keys)))
        self._group_wide = np.zeros(max(1, len(self.group_keys)), np.bool_)
        for index, (c, e1, e2) in enumerate(self.group_keys):
            rc, wide = angular_groups[(c, e1, e2)]
            self._table[c, e1, e2] = self._table[c, e2, e1] = index
            self._group_rc[index] = rc + self.skin
            self._group_wide[index] = wide
        self.cutoff_angular = max((rc for rc, _ in angular_groups.values()), default=0.0) + self.skin
        self.cutoff = max(self.cutoff, self.cutoff_angular)

    def raw(self, positions, cell, pbc, species) -> _Raw:
        """Unpadded pairs and triplets of one structure."""
        species = np.asarray(species, np.int64)
        i, j, S, D = pair_list(positions, cell, pbc, self.cutoff)
        dist = np.sqrt(np.einsum("ij,ij->i", D, D))
        e = species[j]
        block = species[i] * self.n_elements + e
        if self.group_keys:
            t_a, t_b, t_group = _triplet_kernel(i, dist, D, e, species, self._table, self._group_rc,
                                                self._group_wide, len(self.group_keys), self.cutoff_angular)
        else:
            t_a = t_b = t_group = np.zeros(0, np.int64)
        return _Raw(i, j, S.astype(np.float64), block, t_a, t_b, t_group)

    def counts(self, positions, cell, pbc, species) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(i, j, block) of every pair and the triplets per angular group (G,) of one structure, without writing
        the triplets (their counting pass only): what sizing a layout needs."""
        species = np.asarray(species, np.int64)
        i, j, _, D = pair_list(positions, cell, pbc, self.cutoff)
        e = species[j]
        block = species[i] * self.n_elements + e
        if not self.group_keys:
            return i, j, block, np.zeros(0, np.int64)
        dist = np.sqrt(np.einsum("ij,ij->i", D, D))
        triplets = _Triplets(i, dist, D, e, species, self._table, self._group_rc, self._group_wide,
                             len(self.group_keys), self.cutoff_angular)
        return i, j, block, triplets.counts

    def build_one(self, positions, cell, pbc, species, capacities: Layout | None = None,
                  headroom: float = 1.0, spare: bool = False) -> Graph:
        """One structure's graph built lean, for MD: triplets are counted, then written straight into their padded
        slots (no unpadded copy, no sort), and the graph has no ``trip_i``/``trip_mask`` (None: the descriptors
        derive them). Peak memory is the output: 8 bytes per triplet slot. Same pairs and triplets, in the same
        slots, as :meth:`build` of one structure. ``headroom`` multiplies the counts the capacities are sized for
        (lists rebuilt on the device must hold the counts of later positions). ``spare``: a fresh layout (one that
        does not reuse or grow ``capacities``) gets :data:`SPARE` more room."""
        species = np.asarray(species, np.int64)
        i, j, S, D = pair_list(positions, cell, pbc, self.cutoff)
        dist = np.sqrt(np.einsum("ij,ij->i", D, D))
        e = species[j]
        block = species[i] * self.n_elements + e
        none = np.zeros(0, np.int32)
        raw = _Raw(i, j, S, block, none, none, none)  # integer image shifts: pack stores them as int8 or so
        triplets = None
        if self.group_keys:
            triplets = _Triplets(i, dist, D, e, species, self._table, self._group_rc, self._group_wide,
                                 len(self.group_keys), self.cutoff_angular)
        counts = triplets.counts if triplets is not None else np.zeros(0, np.int64)
        del i, j, S
        graph = self.pack([(positions, cell, pbc, species)], [raw], capacities, trip_counts=counts, lean=True,
                          headroom=headroom, spare=spare)
        del raw
        if triplets is not None:
            where = _slots(block, np.array([o for o, _ in graph.layout.pair_blocks], np.int64), self.n_elements)
            # The triplet slots are written (and take memory) now: the pairs' indices, shifts and blocks go
            # first, so that the peak holds the graph and the pair distances and vectors only (69,120 atoms of
            # water: ~40 bytes a pair here instead of ~120).
            del block
            where = where.astype(np.int32)
            offsets = np.array([o for _, o, _ in graph.layout.triplet_groups], np.int64)
            triplets.fill(where, offsets, graph.trip_ij, graph.trip_ik)
        return graph

    def _regrown(self, old: Layout, atom_cap: int, pair_need, trip_need) -> Layout:
        """``old`` grown where the new counts overflow it: those blocks and groups get room for
        :data:`REGROW_HEADROOM` times their count, the others keep their capacity (never shrunk)."""
        def grown(capacity: int, need: int) -> int:
            return capacity if capacity > need else bucket(math.ceil(need * REGROW_HEADROOM))

        return self._layout(max(old.n_atoms, atom_cap), old.n_structures,
                            [grown(c, n) for (_, c), n in zip(old.pair_blocks, pair_need, strict=True)],
                            [grown(c, n) for (_, _, c), n in zip(old.triplet_groups, trip_need, strict=True)])

    def _layout(self, atom_cap: int, n_structures: int, pair_caps, trip_caps) -> Layout:
        """The layout of these capacities: blocks and groups one after another, in the builder's order."""
        pair_offsets = np.r_[0, np.cumsum(pair_caps)[:-1]].astype(np.int64)
        trip_offsets = np.r_[0, np.cumsum(trip_caps)[:-1]].astype(np.int64) if len(trip_caps) else []
        return Layout(
            n_atoms=int(atom_cap),
            n_structures=int(n_structures),
            n_elements=self.n_elements,
            pair_blocks=tuple((int(o), int(c)) for o, c in zip(pair_offsets, pair_caps, strict=True)),
            triplet_groups=tuple(
                (key, int(o), int(c)) for key, o, c in zip(self.group_keys, trip_offsets, trip_caps, strict=True)
            ),
        )

    def holding(self, structures, batches: Sequence[Sequence[int]]) -> Layout:
        """The smallest evaluation layout (:func:`graph_capacity` rounding) that holds every batch: per pair block
        and triplet group, the largest count of any batch. ``structures``: [(positions, cell, pbc, species), ...];
        ``batches``: lists of indices into them, all of one length (a structure may repeat).

        Why: a batch evaluated in a layout that does not hold it gets a layout of its own, and a new layout is a
        new XLA compilation (15-20 s for a four-element potential). A layout sized for the largest structures
        alone did not hold later batches of smaller ones with more triplets of some group (a final error pass
        over bulk Cu2S, water boxes, clusters and molecules compiled 4 times after its estimate had compiled 3
        layouts). Costs one counting pass per structure (pairs and the triplet count, no triplet written)."""
        lengths = {len(b) for b in batches}
        if len(lengths) != 1:
            raise ValueError(f"batches of one layout must have one length, not {sorted(lengths)}")
        E2, G = self.n_elements**2, len(self.group_keys)
        counts = {}
        for k in sorted({k for b in batches for k in b}):
            positions, cell, pbc, species = structures[k]
            _, _, block, trips = self.counts(positions, cell, pbc, species)
            counts[k] = (len(species), np.bincount(block, minlength=E2), np.asarray(trips, np.int64).reshape(G))
        atoms, pairs, trips = 0, np.zeros(E2, np.int64), np.zeros(G, np.int64)
        for b in batches:
            atoms = max(atoms, sum(counts[k][0] for k in b))
            pairs = np.maximum(pairs, sum(counts[k][1] for k in b))
            trips = np.maximum(trips, sum(counts[k][2] for k in b) if G else trips)
        return self._layout(graph_capacity(atoms), lengths.pop(), [graph_capacity(n) for n in pairs],
                            [graph_capacity(n) for n in trips])

    def build(self, structures, capacities: Layout | None = None) -> Graph:
        """Pack structures [(positions, cell, pbc, species), ...] into one padded graph.

        ``capacities``: a previous graph's layout to reuse when everything fits (no recompilation).
        """
        raws = [self.raw(*s) for s in structures]
        return self.pack(structures, raws, capacities)

    def pack(self, structures, raws: list[_Raw], capacities: Layout | None = None, trip_counts=None,
             lean: bool = False, headroom: float = 1.0, spare: bool = False) -> Graph:
        """Pad and concatenate structures' raw neighbour data. ``trip_counts`` (per group) stands in for the raws'
        triplets when they are filled later (:meth:`build_one`); ``lean`` leaves trip_i and trip_mask out (None);
        pair and triplet capacities hold ``headroom`` times the counts; ``spare``: a fresh layout gets
        :func:`spare_fraction` more."""
        E = self.n_elements
        n_real = np.array([len(s[3]) for s in structures], np.int64)
        atom_offsets = np.r_[0, np.cumsum(n_real)[:-1]]
        n_atoms = int(n_real.sum())
        # Pairs, block-major over all structures.
        pair_counts = np.zeros(E * E, np.int64)
        for raw in raws:
            pair_counts += np.bincount(raw.block, minlength=E * E)
        if trip_counts is None:
            trip_counts = np.zeros(len(self.group_keys), np.int64)
            for raw in raws:
                trip_counts += np.bincount(raw.t_group, minlength=len(self.group_keys))
        pair_need = [math.ceil(n * headroom) for n in pair_counts]
        trip_need = [math.ceil(n * headroom) for n in trip_counts]
        capacity = bucket if lean else graph_capacity  # lean graphs are MD's (see graph_capacity)
        extra = 1.0 + (spare_fraction(pair_need, trip_need) if spare else 0.0)
        atom_cap = capacity(n_atoms)
        pair_caps = [capacity(math.ceil(n * extra)) for n in pair_need]
        trip_caps = [capacity(math.ceil(n * extra)) for n in trip_need]
        layout = self._layout(atom_cap, len(structures), pair_caps, trip_caps)
        if capacities is not None and _fits(capacities, n_atoms, pair_need, trip_need, len(structures)):
            layout = capacities
        elif capacities is not None and lean and _same_blocks(capacities, pair_need, trip_need, len(structures)):
            layout = self._regrown(capacities, atom_cap, pair_need, trip_need)
        atom_cap = layout.n_atoms
        pair_offsets = np.array([o for o, _ in layout.pair_blocks], np.int64)
        trip_offsets = np.array([o for _, o, _ in layout.triplet_groups], np.int64)
        n_pairs = int(sum(c for _, c in layout.pair_blocks))
        n_trip = int(sum(c for _, _, c in layout.triplet_groups))
        if max(n_pairs, n_atoms) >= 2**31:
            raise MLMDError(f"{n_pairs} pair slots exceed the int32 indices of the neighbour data; split the structure "
                            "or run it with LAMMPS (mlmd_lab.md.write_lammps)")
        pad_atom = atom_cap - 1  # always a padding slot (bucket gives count + 1)
        # Lean (MD) graphs keep image shifts in the smallest integer type that holds them (int8 nearly always: 3
        # bytes a pair instead of 24); the pair vectors cast them in JAX. Every array is 64-byte aligned, so JAX on
        # the CPU uses it in place (see aligned_zeros).
        shift_type = _shift_dtype(raws) if lean else np.float64
        g = dict(
            pair_i=_aligned_full(n_pairs, pad_atom, np.int32),
            pair_j=_aligned_full(n_pairs, pad_atom, np.int32),
            pair_shift=aligned_zeros(n_pairs * 3, shift_type).reshape(n_pairs, 3),
            pair_struct=aligned_zeros(n_pairs, np.int32),
            pair_mask=aligned_zeros(n_pairs, bool),
            trip_ij=aligned_zeros(n_trip, np.int32),
            trip_ik=aligned_zeros(n_trip, np.int32),
            trip_i=None if lean else np.full(n_trip, pad_atom, np.int32),
            trip_mask=None if lean else np.zeros(n_trip, bool),
        )
        fill_pairs = pair_offsets.copy()
        fill_trip = trip_offsets.copy()
        for s, raw in enumerate(raws):
            where = _slots(raw.block, fill_pairs, E)
            fill_pairs += np.bincount(raw.block, minlength=E * E)
            g["pair_i"][where] = raw.i + atom_offsets[s]
            g["pair_j"][where] = raw.j + atom_offsets[s]
            g["pair_shift"][where] = raw.shift
            g["pair_struct"][where] = s
            g["pair_mask"][where] = True
            if raw.t_group.size:  # already grouped and sorted by central atom
                tg = raw.t_group
                t_starts = np.searchsorted(tg, np.arange(len(self.group_keys)))
                t_where = fill_trip[tg] + (np.arange(tg.size) - t_starts[tg])
                fill_trip += np.bincount(tg, minlength=len(self.group_keys))
                g["trip_ij"][t_where] = where[raw.t_a]
                g["trip_ik"][t_where] = where[raw.t_b]
                g["trip_i"][t_where] = raw.i[raw.t_a] + atom_offsets[s]
                g["trip_mask"][t_where] = True
        positions = np.zeros((atom_cap, 3))
        species = np.full(atom_cap, -1, np.int64)
        atom_struct = np.full(atom_cap, len(structures), np.int64)
        cells = np.zeros((len(structures), 3, 3))
        for s, (pos, cell, _, spec) in enumerate(structures):
            sl = slice(atom_offsets[s], atom_offsets[s] + n_real[s])
            positions[sl] = pos
            species[sl] = spec
            atom_struct[sl] = s
            cells[s] = cell
        # Padded triplets point at a padded pair (masked), so their gathers stay in range.
        return Graph(positions=positions, cells=cells, species=species, atom_struct=atom_struct, layout=layout,
                     n_real=n_real, pair_count=pair_counts.astype(np.int32),
                     trip_count=np.asarray(trip_counts, np.int64).astype(np.int32), **g)


def aligned_zeros(n: int, dtype) -> np.ndarray:
    """A zeroed array whose data start on a 64-byte boundary, XLA's CPU alignment: JAX can then use it in place
    (``jax.device_put(array, may_alias=True)``) instead of copying it, which halves the peak memory of MD
    neighbour data (the triplet indices are most of it)."""
    itemsize = np.dtype(dtype).itemsize
    raw = np.zeros(n * itemsize + 64, np.uint8)
    start = (-raw.ctypes.data) % 64
    return raw[start : start + n * itemsize].view(dtype)


def _aligned_full(n: int, value, dtype) -> np.ndarray:
    out = aligned_zeros(n, dtype)
    out[:] = value
    return out


def _shift_dtype(raws) -> np.dtype:
    """The smallest signed integer type holding every image shift of ``raws`` (unwrapped positions of a long run
    can reach large shifts; the common case is int8)."""
    largest = max((int(np.abs(raw.shift).max()) for raw in raws if raw.shift.size), default=0)
    return np.min_scalar_type(-largest - 1) if largest < 2**31 else np.float64


def _slots(block: np.ndarray, first: np.ndarray, n_elements: int) -> np.ndarray:
    """The padded slot of each pair: pairs of block b go, in their order, to first[b], first[b] + 1, ..."""
    E2 = n_elements * n_elements
    order = np.argsort(block, kind="stable")
    block_sorted = block[order]
    starts = np.searchsorted(block_sorted, np.arange(E2))
    where = np.empty(block.size, np.int64)
    where[order] = first[block_sorted] + (np.arange(block.size) - starts[block_sorted])
    return where


def _same_blocks(layout: Layout, pair_counts, trip_counts, n_structures) -> bool:
    """Whether ``layout`` has the blocks and groups of these counts (then it can be grown, see ``_regrown``)."""
    return (layout.n_structures == n_structures and len(layout.pair_blocks) == len(pair_counts)
            and len(layout.triplet_groups) == len(trip_counts))


def _fits(layout: Layout, n_atoms, pair_counts, trip_counts, n_structures) -> bool:
    """Whether ``layout`` holds these counts, each with its padding slot (the layout may come from either
    rounding, :func:`bucket` or :func:`graph_capacity`: what matters is room, not how it was rounded)."""
    return (
        _same_blocks(layout, pair_counts, trip_counts, n_structures)
        and layout.n_atoms > n_atoms
        and all(old > new for (_, old), new in zip(layout.pair_blocks, pair_counts, strict=True))
        and all(old > new for (_, _, old), new in zip(layout.triplet_groups, trip_counts, strict=True))
    )
