"""Symmetry functions and their derivatives, computed once per training frame.

Symmetry functions do not depend on the network weights, so training never needs positions again: per frame
it needs the raw functions G_i of every atom and, for forces and stress, the derivative of G_i with respect
to each of its pair vectors d_ij = r_j - r_i (+ image shift). With g_p = sum_f dE/dG_{i_p f} dG_{i_p f}/dd_p,

    F_k = sum_{p: i_p = k} g_p - sum_{p: j_p = k} g_p,      W = sum_p d_p (x) g_p  (virial, stress = W / V).

This is what n2p2 stores for its force updates; it makes a training step a small network evaluation plus one
contraction, instead of recomputing the descriptors (and their second derivatives) at every step.

Storage is per pair block (central element c, neighbour element e): a pair of block (c, e) only moves the
radial functions of c with neighbour e and the angular functions of c whose neighbour pair contains e, so each
block keeps just those columns (a third fewer for two elements).

Derivatives come from forward-mode JAX (``jvp``) through the same code that evaluates the potential
(:mod:`mlmd_lab.potentials.descriptors`): radial terms depend on one pair, angular terms on two, so one
tangent per Cartesian component gives every per-pair derivative at once.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from ase import Atoms

from mlmd_lab.potentials.descriptors import _chunks, _radial_values, _triplet_rows, pair_vectors, symmetry_functions
from mlmd_lab.potentials.model import HDNNP
from mlmd_lab.potentials.neighbours import Layout, bucket


@dataclass
class FrameFeatures:
    """Unpadded features of one frame (model length unit; ``dtype`` as computed).

    Attributes:
        species: (n,) element index of each atom.
        G: per element c, (n_c, F_c) raw symmetry functions of the atoms of c, in atom order.
        atoms: per element c, (n_c,) the atom index of each row of ``G[c]``.
        blocks: per pair block b = c * E + e, a dict with ``dG`` (p, K_b, 3) derivatives of the block's columns
            with respect to d, ``row`` (p,) the row of the central atom in ``G[c]``, ``i``, ``j`` (p,) atom
            indices, ``d`` (p, 3) pair vectors. Only the pairs that move a force atom are kept (i or j in
            ``force_atoms``): those atoms' forces are exact, the others' are not computed.
        force_atoms: (n_f,) sorted indices of the atoms whose forces training fits (every atom by default).
    """

    species: np.ndarray
    G: list[np.ndarray]
    atoms: list[np.ndarray]
    blocks: list[dict[str, np.ndarray]]
    force_atoms: np.ndarray

    @property
    def all_forces(self) -> bool:
        """Every atom's force (and so the virial, which needs every pair) is available."""
        return self.force_atoms.size == self.species.size

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.G) + sum(v.nbytes for b in self.blocks for v in b.values())


def block_columns(model: HDNNP) -> list[np.ndarray]:
    """Per pair block (c, e): the n2p2 column indices of element c's functions that depend on (c, e) pairs."""
    plan = model.plan
    E = len(plan.elements)
    columns = []
    for c in range(E):
        for e in range(E):
            cols = [k for k, _ in plan.radial(c, e)]
            for (cc, e1, e2) in plan.angular_groups():
                if cc == c and e in (e1, e2):
                    cols += [k for k, _ in plan.angular(c, e1, e2)]
            columns.append(np.array(sorted(cols), np.int64))
    return columns


@dataclass
class FrameCounts:
    """Sizes of one frame's training arrays, from the counting pass (:func:`plan_features`).

    Attributes:
        n_atoms: atoms of the frame.
        per_element: (E,) atoms of each element.
        kept_pairs: (E * E,) pairs per block (c, e) that move a force atom (all pairs without a force subset).
    """

    n_atoms: int
    per_element: np.ndarray
    kept_pairs: np.ndarray


def plan_features(model: HDNNP, frames: Sequence[Atoms], force_atoms: Sequence[np.ndarray] | None = None,
                  progress=None) -> tuple[Layout | None, list[FrameCounts]]:
    """The counting pass over ``frames``: the layout in which every frame's features are computed (capacities of
    the largest counts, bucketed: one compilation) and each frame's sizes. Pairs come from the neighbour search
    and triplets are only counted (~30 ms for a 192-atom water frame).

    ``progress``: optional callable(n_done) after each frame."""
    builder = model.neighbour_builder()
    E = builder.n_elements
    n_groups = len(builder.group_keys)
    force_atoms = _check_force_atoms(force_atoms, len(frames))
    atoms, pairs, triplets = 0, np.zeros(E * E, np.int64), np.zeros(n_groups, np.int64)
    counts = []
    for k, frame in enumerate(frames):
        structure = model.structure(frame)
        species = np.asarray(structure[3])
        i, j, block, per_group = builder.counts(*structure)
        atoms = max(atoms, species.size)
        pairs = np.maximum(pairs, np.bincount(block, minlength=E * E))
        if n_groups:
            triplets = np.maximum(triplets, per_group)
        kept = np.ones(i.size, bool)
        if force_atoms[k] is not None:
            moves = np.zeros(species.size, bool)
            moves[force_atoms[k]] = True
            kept = moves[i] | moves[j]
        counts.append(FrameCounts(n_atoms=int(species.size), per_element=np.bincount(species, minlength=E),
                                  kept_pairs=np.bincount(block[kept], minlength=E * E)))
        if progress is not None:
            progress(k + 1)
    if not counts:
        return None, counts
    pair_caps = [bucket(n) for n in pairs]
    trip_caps = [bucket(n) for n in triplets]
    pair_offsets = np.r_[0, np.cumsum(pair_caps)[:-1]]
    trip_offsets = np.r_[0, np.cumsum(trip_caps)[:-1]] if trip_caps else []
    layout = Layout(n_atoms=bucket(atoms), n_structures=1, n_elements=E,
                    pair_blocks=tuple((int(o), int(c)) for o, c in zip(pair_offsets, pair_caps, strict=True)),
                    triplet_groups=tuple((key, int(o), int(c)) for key, o, c in
                                         zip(builder.group_keys, trip_offsets, trip_caps, strict=True)))
    return layout, counts


#: Frames computed ahead of the consumer of :func:`iter_features`.
AHEAD = 4


def iter_features(model: HDNNP, frames: Sequence[Atoms], layout: Layout, dtype: str = "float32",
                  force_atoms: Sequence[np.ndarray] | None = None) -> Iterator[FrameFeatures]:
    """Each frame's :class:`FrameFeatures`, in order, computed in ``layout`` (from :func:`plan_features`) by two
    threads (neighbour lists in numba and XLA both release the GIL), at most :data:`AHEAD` frames ahead of the
    consumer: memory holds a few frames, not the set.

    Args:
        model: the potential whose symmetry functions (and length unit) are used.
        frames: structures (positions in Å).
        layout: capacities that fit every frame.
        dtype: storage precision of the results ("float32" halves memory; computed in float64).
        force_atoms: per frame, the atoms whose forces will be fitted (None: all). Derivatives are kept only
            for pairs that move them, so memory follows the force atoms (:func:`force_subset`).
    """
    columns = block_columns(model)
    fn = jax.jit(partial(_frame_derivatives, model.plan, model._far(), tuple(tuple(c) for c in columns)),
                 static_argnames="layout")
    builder = model.neighbour_builder()
    store = np.float32 if dtype == "float32" else np.float64
    force_atoms = _check_force_atoms(force_atoms, len(frames))

    def one(k):
        graph = builder.build([model.structure(frames[k])], layout)
        arrays = {key: jnp.asarray(v) for key, v in graph.arrays().items()}
        G_all, dG_blocks = fn(arrays, layout=graph.layout)
        return _unpad(graph, [np.asarray(g) for g in G_all], [np.asarray(b) for b in dG_blocks], store,
                      force_atoms[k])

    with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        pending: deque = deque()
        for k in range(len(frames)):
            pending.append(pool.submit(one, k))
            if len(pending) > AHEAD:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def compute_features(model: HDNNP, frames: Sequence[Atoms], dtype: str = "float32",
                     progress=None, force_atoms: Sequence[np.ndarray] | None = None) -> list[FrameFeatures]:
    """Raw symmetry functions and their pair-vector derivatives of every frame, as a list (:func:`plan_features`
    then :func:`iter_features`; the trainer streams them into a :class:`~mlmd_lab.train.store.FeatureStore`
    instead). ``progress``: optional callable(n_done) called after each frame."""
    frames = list(frames)
    layout, _ = plan_features(model, frames, force_atoms)
    out = []
    for result in iter_features(model, frames, layout, dtype, force_atoms) if frames else ():
        out.append(result)
        if progress is not None:
            progress(len(out))
    return out


def _check_force_atoms(force_atoms, n_frames: int) -> list:
    if force_atoms is None:
        return [None] * n_frames
    if len(force_atoms) != n_frames:
        raise ValueError(f"force_atoms has {len(force_atoms)} entries for {n_frames} frames")
    return list(force_atoms)


def force_subset(n_atoms: Sequence[int], fraction: float, seed: int) -> list[np.ndarray]:
    """Per frame, ceil(fraction * n) of its atoms (at least one), drawn without replacement and sorted; frame k's
    draw depends only on (seed, k), so a subset does not change when other frames are added after it."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"the force fraction must be in (0, 1], not {fraction}")
    out = []
    for k, n in enumerate(n_atoms):
        count = max(1, math.ceil(fraction * n - 1e-9))
        if count >= n:
            out.append(np.arange(n))
        else:
            out.append(np.sort(np.random.default_rng([seed, k]).choice(n, count, replace=False)))
    return out


def _unpad(graph, G_all, dG_blocks, store, force_atoms=None) -> FrameFeatures:
    n = int(graph.n_real[0])
    species = graph.species[:n].copy()
    chosen = np.arange(n) if force_atoms is None else np.asarray(force_atoms, np.int64)
    moves = np.zeros(graph.layout.n_atoms, bool)
    moves[chosen] = True
    G, atoms, rows_of = [], [], []
    for c, g in enumerate(G_all):
        idx = np.flatnonzero(species == c)
        G.append(g[idx].astype(store))
        atoms.append(idx)
        row = np.full(graph.layout.n_atoms, -1, np.int64)
        row[idx] = np.arange(idx.size)
        rows_of.append(row)
    E = graph.layout.n_elements
    pos = graph.positions
    blocks = []
    for b, (offset, cap) in enumerate(graph.layout.pair_blocks):
        c = b // E
        sl = slice(offset, offset + cap)
        i, j = graph.pair_i[sl], graph.pair_j[sl]
        mask = graph.pair_mask[sl] & (moves[i] | moves[j])
        i, j = i[mask], j[mask]
        d = pos[j] - pos[i] + graph.pair_shift[sl][mask] @ graph.cells[0]
        blocks.append({"dG": dG_blocks[b][mask].astype(store), "row": rows_of[c][i], "i": i, "j": j,
                       "d": d.astype(store)})
    return FrameFeatures(species=species, G=G, atoms=atoms, blocks=blocks, force_atoms=chosen)


def _frame_derivatives(plan, far, columns, arrays, layout: Layout):
    """(per element (N, F_c) raw functions, per block (cap, K_b, 3) dG/dd) of one padded graph."""
    d = pair_vectors(arrays, far)
    G = symmetry_functions(plan, layout, arrays, d)
    E = len(plan.elements)
    r = jnp.sqrt(jnp.sum(d * d, axis=1))
    unit = d / r[:, None]
    where = [{int(k): n for n, k in enumerate(cols)} for cols in columns]
    blocks = [jnp.zeros((cap, len(columns[b]), 3), d.dtype) for b, (_, cap) in enumerate(layout.pair_blocks)]
    for c in range(E):
        for e in range(E):
            entries = plan.radial(c, e)
            if not entries:
                continue
            b = c * E + e
            offset, cap = layout.pair_blocks[b]
            sl = slice(offset, offset + cap)
            fs = [sf for _, sf in entries]
            _, dv = jax.jvp(lambda rr, fs=fs: _radial_values(plan, fs, rr), (r[sl],), (jnp.ones_like(r[sl]),))
            dv = jnp.where(arrays["pair_mask"][sl, None], dv, 0.0)
            cols = np.array([where[b][k] for k, _ in entries])
            blocks[b] = blocks[b].at[:, cols, :].add(dv[:, :, None] * unit[sl, None, :])
    for (c, e1, e2), offset, cap in layout.triplet_groups:
        entries = plan.angular(c, e1, e2)
        targets = [(c * E + e, np.array([where[c * E + e][k] for k, _ in entries])) for e in (e1, e2)]
        sums = _angular_derivatives(plan, layout, arrays, d.T, tuple(sf for _, sf in entries), offset, cap,
                                    tuple(layout.pair_blocks[b] for b, _ in targets))
        for (b, cols), total in zip(targets, sums, strict=True):
            blocks[b] = blocks[b].at[:, cols, :].add(total)
    return G, blocks


def _angular_derivatives(plan, layout, arrays, dT, functions, offset, cap, pair_blocks):
    """One angular group's derivatives summed per pair: ((cap_1, K, 3) with respect to d_ij over the pairs of the
    block of e1, (cap_2, K, 3) with respect to d_ik over the block of e2). dT is (3, P).

    Why a loop over chunks of triplets (:func:`~mlmd_lab.potentials.descriptors._chunks`, as the MD descriptors):
    the six tangents of a whole group at once are (6, K, triplets) arrays of ~300 MB for a 192-atom water frame,
    and moving them through memory took 4x the time of computing them chunk by chunk in cache (0.58 -> 0.14 s per
    frame, same values to 1e-15)."""
    (o1, cap1), (o2, cap2) = pair_blocks
    K = len(functions)
    eye = np.eye(3)[:, :, None]

    def body(start, size, totals):
        at = offset + start
        ij = jax.lax.dynamic_slice_in_dim(arrays["trip_ij"], at, size)
        ik = jax.lax.dynamic_slice_in_dim(arrays["trip_ik"], at, size)
        mask = jax.lax.dynamic_slice_in_dim(arrays["trip_mask"], at, size)

        def values(a, b):
            return _triplet_rows(plan, functions, a, b, mask)

        unit = jnp.broadcast_to(jnp.asarray(eye, dT.dtype), (3, 3, size))
        zero = jnp.zeros((3, 3, size), dT.dtype)
        tangents = (jnp.concatenate([unit, zero]), jnp.concatenate([zero, unit]))  # d_ij's x, y, z, then d_ik's
        jvps = jax.vmap(lambda u, v: jax.jvp(values, (dT[:, ij], dT[:, ik]), (u, v))[1])(*tangents)  # (6, K, size)
        jvps = jnp.where(mask[None, None, :], jvps, 0.0)
        first = totals[0].at[ij - o1].add(jnp.transpose(jvps[:3], (2, 1, 0)))
        return first, totals[1].at[ik - o2].add(jnp.transpose(jvps[3:], (2, 1, 0)))

    init = (jnp.zeros((cap1, K, 3), dT.dtype), jnp.zeros((cap2, K, 3), dT.dtype))
    return _chunks(cap, body, init)
