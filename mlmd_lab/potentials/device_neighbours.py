"""Neighbour and triplet lists rebuilt inside compiled JAX code: the MD route for a GPU.

Why: the host build (:class:`~mlmd_lab.potentials.neighbours.NeighbourBuilder`: vesin pairs, numba triplets) is
the fastest on the CPU, but on a GPU it means a round trip per rebuild (about 1 step in 8 for water at a 0.5 Å
skin): the device stops, positions go to the host, and the triplet indices (most of the MD memory) come back.
:class:`DeviceNeighbours` rebuilds the same lists in JAX, into the fixed capacities (the :class:`Layout`) of the
last host build, so the MD block (:mod:`mlmd_lab.md.run`) rebuilds them without leaving the device. When a count
outgrows its capacity the build says so (``ok`` False) and the engine makes one host build with larger ones.

Method (all shapes static, so it compiles once per layout):

1. Cell list: atoms binned by their wrapped fractional coordinates into n_a = floor(width_a / r) cells per
   periodic axis (r = cutoff + skin; an axis with fewer than 3 cells is one cell, and a molecule is one cell), at
   most ``cell_capacity`` atoms per cell.
2. Pairs: each atom's candidates are the atoms of its 3 x 3 x 3 (or fewer) neighbouring cells. The image is the
   rounded fractional difference, which is exact when every cell width is at least 2 r: an image within r has
   fractional differences |d . b_a| <= r / width_a < 1/2, so it is the rounded one, and it is the only one.
   Narrower cells (many images of one atom) stay on the host path (:func:`unsuitable` says why).
3. Pairs within r are kept per atom (at most ``neighbour_capacity``), then written block by block, (element of i,
   element of j), in atom order into the layout's padded blocks (a cumulative sum gives each its slot).
4. Triplets: per central atom, every unordered pair {p, q} of its list, kept by the angular group's cutoff (and
   r_jk for narrow functions), written group by group in atom order in chunks of atoms (a scan carries the fill
   counts). j carries the lower element, as on the host.

The lists hold the same pairs and triplets as the host build (tested: as sets, and energies, forces and virials
to 1e-12); their order within a block differs, which changes sums only in the last bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import product

import jax
import jax.numpy as jnp
import numpy as np

from mlmd_lab.potentials.neighbours import Layout, NeighbourBuilder, pair_list

#: The arrays a device build writes (the rest of a lean MD graph does not change when the lists are rebuilt).
LIST_KEYS = ("pair_i", "pair_j", "pair_shift", "pair_mask", "trip_ij", "trip_ik")
#: Entries (atoms x candidate pairs) per triplet chunk: bounds the temporary memory of step 4 (~40 bytes each).
TRIPLET_CHUNK_ENTRIES = 1 << 21
#: Atoms x candidates per pair-search chunk.
PAIR_CHUNK_ENTRIES = 1 << 21
#: Largest molecule (no periodic axis: one cell, every atom a candidate of every other) built on the device.
MAX_MOLECULE_ATOMS = 20_000


def unsuitable(builder: NeighbourBuilder, cell: np.ndarray, pbc: np.ndarray, n_atoms: int) -> str | None:
    """Why the device lists cannot serve this structure (None when they can).

    Args:
        builder: the potential's neighbour builder (its ``cutoff`` includes the skin), model length unit.
        cell: (3, 3) in the model's length unit; pbc: (3,); n_atoms: atoms in the structure.
    """
    pbc = np.asarray(pbc, bool)
    r = builder.cutoff
    if pbc.any() and not pbc.all():
        return "mixed periodicity"
    if pbc.all():
        widths = cell_widths(np.asarray(cell, np.float64))
        if widths.min() < 2.0 * r:
            return (f"the cell is narrower ({widths.min():.3g}) than twice the cutoff plus skin ({2 * r:.3g}, model "
                    "length unit): an atom has several images within the cutoff")
        return None
    if n_atoms > MAX_MOLECULE_ATOMS:
        return f"a non-periodic structure of more than {MAX_MOLECULE_ATOMS} atoms (no cell list without a cell)"
    return None


def cell_widths(cell):
    """Distances between opposite faces (3,) of the cell (rows are cell vectors); numpy or JAX."""
    xp = jnp if isinstance(cell, jax.Array) else np
    volume = xp.abs(xp.linalg.det(cell))
    areas = xp.stack([xp.linalg.norm(xp.cross(cell[(a + 1) % 3], cell[(a + 2) % 3])) for a in range(3)])
    return volume / areas


@dataclass(frozen=True)
class _Sizes:
    """Static sizes of one device build (hashable: part of what the MD block compiles for)."""

    grid: tuple[int, int, int]  # cells per axis (1: the axis is one cell)
    cell_capacity: int  # atoms per cell
    neighbour_capacity: int  # pairs per atom within cutoff + skin


class DeviceNeighbours:
    """Rebuilds a structure's lean MD neighbour arrays in JAX, into ``layout``.

    Args:
        builder: the potential's neighbour builder (cutoffs with skin, angular groups), model length unit.
        layout: capacities to fill (from a host build of the same structure: :meth:`NeighbourBuilder.build_one`).
        species: (N,) element indices of the real atoms.
        pbc: (3,) periodicity (all or none).
        positions, cell: (N, 3), (3, 3) in the model's length unit: the structure the capacities of the cell list
            and per-atom lists are sized for (with ``headroom``).
        headroom: factor on the largest cell occupancy and neighbour count seen at construction.

    Calling it with (positions (N, 3), cell (3, 3)) in the model's length unit (JAX, jit-able) gives
    ``(arrays, ok)``: the index arrays pair_i, pair_j, pair_shift (int32), pair_mask, trip_ij, trip_ik in the
    layout's shapes, and whether everything fitted (False: a capacity overflowed, or the cell became too narrow;
    the arrays are then not to be used).
    """

    def __init__(self, builder: NeighbourBuilder, layout: Layout, species, pbc, positions, cell,
                 headroom: float = 1.25) -> None:
        self.builder, self.layout = builder, layout
        self.species = np.asarray(species, np.int32)
        self.periodic = bool(np.all(pbc))
        reason = unsuitable(builder, np.asarray(cell), np.asarray(pbc), len(self.species))
        if reason is not None or layout.n_structures != 1:
            raise ValueError(f"device neighbour lists do not apply: {reason or 'several structures'}")
        self.sizes = self._sizes(np.asarray(positions, np.float64), np.asarray(cell, np.float64), headroom)
        self._offsets = _neighbour_cell_offsets(self.sizes.grid)
        self._upper = np.triu_indices(self.sizes.neighbour_capacity, 1)

    # -- static sizes ------------------------------------------------------------------------------------------
    def _sizes(self, positions: np.ndarray, cell: np.ndarray, headroom: float) -> _Sizes:
        n = len(positions)
        if not self.periodic:
            grid = (1, 1, 1)
            occupancy = n
        else:
            widths = cell_widths(cell)
            grid = tuple(int(g) if g >= 3 else 1 for g in np.floor(widths / self.builder.cutoff))
            frac = positions @ np.linalg.inv(cell)
            ids = _cell_ids(_cell_coords(frac - np.floor(frac), np.array(grid), np), grid)
            occupancy = int(np.bincount(ids, minlength=int(np.prod(grid))).max())
        pbc = np.full(3, self.periodic)
        i = pair_list(positions, cell, pbc, self.builder.cutoff)[0]
        most = int(np.bincount(i, minlength=n).max()) if i.size else 0
        cell_capacity = min(n, int(math.ceil(occupancy * headroom)) + 2)
        neighbour_capacity = max(2, int(math.ceil(most * headroom)) + 2)
        return _Sizes(grid=grid, cell_capacity=cell_capacity, neighbour_capacity=neighbour_capacity)

    # -- the build (JAX) ---------------------------------------------------------------------------------------
    def __call__(self, positions, cell):
        positions = jnp.asarray(positions, jnp.float64)
        cell = jnp.asarray(cell, jnp.float64)
        ok = jnp.bool_(True)
        if self.periodic:
            widths = cell_widths(cell)
            grid = np.array(self.sizes.grid)
            ok &= jnp.all(widths >= 2.0 * self.builder.cutoff)
            ok &= jnp.all(jnp.where(grid >= 3, widths / grid, np.inf) >= self.builder.cutoff)
        j, shift, d, count, fits = self._pairs(positions, cell)
        ok &= fits
        arrays, slots, fits = self._pair_arrays(j, shift, count)
        ok &= fits
        trip_ij, trip_ik, fits = self._triplets(j, d, count, slots)
        ok &= fits
        arrays.update(trip_ij=trip_ij, trip_ik=trip_ik)
        return arrays, ok

    def _pairs(self, R, h):
        """Per atom, its neighbours within cutoff + skin: j (N, M) (N where empty), image shifts (N, M, 3) int32,
        vectors (N, M, 3), counts (N,), and whether every cell and list fitted."""
        N = len(self.species)
        sizes = self.sizes
        M, K = sizes.neighbour_capacity, sizes.cell_capacity
        grid = np.array(sizes.grid)
        inv = jnp.linalg.inv(h) if self.periodic else jnp.eye(3)
        frac = R @ inv
        if self.periodic:
            cell_of = _cell_coords(frac - jnp.floor(frac), grid, jnp)
        else:
            cell_of = jnp.zeros((N, 3), jnp.int32)
        ids = _cell_ids(cell_of, grid)
        n_cells = int(np.prod(grid))
        order = jnp.argsort(ids, stable=True)
        sorted_ids = ids[order]
        starts = jnp.searchsorted(sorted_ids, jnp.arange(n_cells))
        rank = jnp.arange(N) - starts[sorted_ids]
        table = jnp.full((n_cells, K), N, jnp.int32).at[sorted_ids, rank].set(order.astype(jnp.int32), mode="drop")
        fits = jnp.max(rank) < K
        offsets = jnp.asarray(self._offsets)  # (O, 3)
        r2_max = self.builder.cutoff**2
        Rp = jnp.concatenate([R, jnp.zeros((1, 3))])  # row N: the empty slot
        fp = jnp.concatenate([frac, jnp.zeros((1, 3))])

        def one_atom(i):
            cells = (cell_of[i][None, :] + offsets) % grid[None, :]
            candidates = table[_cell_ids(cells, grid)].reshape(-1)
            df = fp[candidates] - frac[i]
            shift = -jnp.round(df).astype(jnp.int32) if self.periodic else jnp.zeros(df.shape, jnp.int32)
            d = Rp[candidates] - R[i] + shift.astype(R.dtype) @ h
            r2 = jnp.sum(d * d, axis=1)
            keep = (candidates < N) & (candidates != i) & (r2 < r2_max)
            slot = jnp.where(keep, jnp.cumsum(keep) - 1, M)
            j = jnp.full(M, N, jnp.int32).at[slot].set(candidates, mode="drop")
            s = jnp.zeros((M, 3), jnp.int32).at[slot].set(shift, mode="drop")
            v = jnp.zeros((M, 3), R.dtype).at[slot].set(d, mode="drop")
            return j, s, v, jnp.sum(keep)

        per_chunk = max(1, PAIR_CHUNK_ENTRIES // (len(self._offsets) * K))
        j, shift, d, count = jax.lax.map(one_atom, jnp.arange(N), batch_size=min(N, per_chunk))
        fits &= jnp.max(count) <= M
        return j, shift, d, count, fits

    def _pair_arrays(self, j, shift, count):
        """The layout's pair arrays from the per-atom lists, and each entry's pair slot (N, M) (P where empty)."""
        layout, E = self.layout, self.layout.n_elements
        N, M = j.shape
        P = sum(cap for _, cap in layout.pair_blocks)
        species = jnp.asarray(np.append(self.species, -1))
        real = jnp.arange(M)[None, :] < count[:, None]
        block = jnp.where(real, species[:N, None] * E + species[j], -1).reshape(-1)
        slots = jnp.full(N * M, P, jnp.int32)
        fits = jnp.bool_(True)
        for b, (offset, cap) in enumerate(layout.pair_blocks):
            chosen = block == b
            rank = jnp.cumsum(chosen) - 1
            slots = jnp.where(chosen, offset + rank, slots).astype(jnp.int32)
            fits &= jnp.sum(chosen) <= cap
        pad_atom = layout.n_atoms - 1
        i_entries = jnp.broadcast_to(jnp.arange(N, dtype=jnp.int32)[:, None], (N, M)).reshape(-1)
        arrays = {
            "pair_i": jnp.full(P, pad_atom, jnp.int32).at[slots].set(i_entries, mode="drop"),
            "pair_j": jnp.full(P, pad_atom, jnp.int32).at[slots].set(j.reshape(-1), mode="drop"),
            "pair_shift": jnp.zeros((P, 3), jnp.int32).at[slots].set(shift.reshape(-1, 3), mode="drop"),
            "pair_mask": jnp.zeros(P, bool).at[slots].set(True, mode="drop"),
        }
        return arrays, slots.reshape(N, M), fits

    def _triplets(self, j, d, count, slots):
        """trip_ij, trip_ik (T,) in the layout's groups, and whether every group fitted."""
        layout, builder = self.layout, self.builder
        N, M = j.shape
        groups = layout.triplet_groups
        T = sum(cap for _, _, cap in groups)
        if not groups:
            return jnp.zeros(0, jnp.int32), jnp.zeros(0, jnp.int32), jnp.bool_(True)
        index = {key: g for g, key in enumerate(builder.group_keys)}
        # Tables over the builder's groups, indexed by the layout's group order.
        table = np.full(builder._table.shape, -1, np.int32)
        rc = np.zeros(len(groups))
        wide = np.zeros(len(groups), bool)
        for g, (key, _, _) in enumerate(groups):
            b = index[key]
            table[builder._table == b] = g
            rc[g], wide[g] = builder._group_rc[b], builder._group_wide[b]
        offsets = np.array([o for _, o, _ in groups])
        caps = np.array([c for _, _, c in groups])
        p, q = (jnp.asarray(x, jnp.int32) for x in self._upper)
        U = len(self._upper[0])
        A = max(1, min(N, TRIPLET_CHUNK_ENTRIES // max(U, 1)))
        n_chunks = -(-N // A)
        species = jnp.asarray(np.append(self.species, 0))
        table, rc, wide = jnp.asarray(table), jnp.asarray(rc), jnp.asarray(wide)
        pad = n_chunks * A - N
        jj = jnp.pad(j, ((0, pad), (0, 0)), constant_values=N)
        dd = jnp.pad(d, ((0, pad), (0, 0), (0, 0)))
        cc = jnp.pad(count, (0, pad))
        ss = jnp.pad(slots, ((0, pad), (0, 0)))
        centre = jnp.pad(species[:N], (0, pad))

        def chunk(carry, k):
            trip_ij, trip_ik, filled = carry
            atoms = jax.lax.dynamic_slice_in_dim(jnp.arange(n_chunks * A), k * A, A)
            jc, dc, nc, sc, c = jj[atoms], dd[atoms], cc[atoms], ss[atoms], centre[atoms]
            real = q[None, :] < nc[:, None]  # p < q
            e_p, e_q = species[jc[:, p]], species[jc[:, q]]
            group = jnp.where(real, table[c[:, None], e_p, e_q], -1)
            g_safe = jnp.maximum(group, 0)
            cut = rc[g_safe]
            dp, dq = dc[:, p], dc[:, q]
            r_p, r_q = jnp.linalg.norm(dp, axis=2), jnp.linalg.norm(dq, axis=2)
            djk = dq - dp
            near = wide[g_safe] | (jnp.sum(djk * djk, axis=2) < cut * cut)
            keep = (group >= 0) & (r_p < cut) & (r_q < cut) & near
            low_first = e_p <= e_q
            first = jnp.where(low_first, sc[:, p], sc[:, q]).reshape(-1)
            second = jnp.where(low_first, sc[:, q], sc[:, p]).reshape(-1)
            group = jnp.where(keep, group, -1).reshape(-1)
            where = jnp.full(group.shape, T, jnp.int32)
            counts = []
            for g in range(len(groups)):
                chosen = group == g
                rank = jnp.cumsum(chosen) - 1 + filled[g]
                where = jnp.where(chosen & (rank < caps[g]), offsets[g] + rank, where)
                counts.append(jnp.sum(chosen))
            trip_ij = trip_ij.at[where].set(first, mode="drop")
            trip_ik = trip_ik.at[where].set(second, mode="drop")
            return (trip_ij, trip_ik, filled + jnp.stack(counts).astype(filled.dtype)), None

        start = (jnp.zeros(T, jnp.int32), jnp.zeros(T, jnp.int32), jnp.zeros(len(groups), jnp.int32))
        (trip_ij, trip_ik, filled), _ = jax.lax.scan(chunk, start, jnp.arange(n_chunks))
        return trip_ij, trip_ik, jnp.all(filled <= jnp.asarray(caps))


def _neighbour_cell_offsets(grid) -> np.ndarray:
    """(O, 3) cell offsets to visit: -1, 0, 1 along axes of at least 3 cells, 0 along one-cell axes."""
    steps = [(-1, 0, 1) if g >= 3 else (0,) for g in grid]
    return np.array(list(product(*steps)), np.int32)


def _cell_coords(wrapped, grid: np.ndarray, xp):
    """Cell (3,) of each wrapped fractional position (..., 3), in ``xp`` (numpy when sizing, JAX when building)."""
    return xp.clip(xp.floor(wrapped * grid).astype(xp.int32), 0, grid - 1)


def _cell_ids(coords, grid) -> np.ndarray:
    """Linear cell index of cell coordinates (..., 3) (numpy or JAX)."""
    return (coords[..., 0] * grid[1] + coords[..., 1]) * grid[2] + coords[..., 2]
