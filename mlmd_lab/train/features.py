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

Radial derivatives come from forward-mode JAX (``jvp``) through the same code that evaluates the potential
(:mod:`mlmd_lab.potentials.descriptors`); angular ones from four scalar partials per triplet, written out in
:func:`_triplet_gradients` (2x faster than six Cartesian tangents through the same code).
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

from mlmd_lab.potentials.cutoff import cutoff as cutoff_fn
from mlmd_lab.potentials.descriptors import (
    _chunks,
    _column,
    _power_rows,
    _radial_values,
    _real_count,
    pair_vectors,
    symmetry_functions,
)
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
    """Each frame's :class:`FrameFeatures`, in order, computed in ``layout`` (from :func:`plan_features`) by
    threads (neighbour lists in numba and XLA both release the GIL), at most :data:`AHEAD` frames ahead of the
    consumer: memory holds a few frames, not the set.

    On the CPU, frame k is computed on JAX CPU device k mod n (one device per core, see
    :func:`~mlmd_lab.potentials.descriptors.cpu_shards`), the whole frame on one device, when the frames are
    enough work to pay for compiling the program once more per device (:data:`PARALLEL_SLOTS`); else all on the
    first. Why not every frame split over all devices, as the MD engine does: most of a frame's time is in the
    derivative loops, which are not split, and computations that span the devices run one after the other, so
    two threads got no more done than one (129 against 138 ms per 192-atom water frame). Measured on 64 water
    frames, 2 cores: 53 ms per frame with a device per frame, 67-69 ms with frames in groups of two in one
    ``shard_map`` program (one compilation, but each group built its graphs before the devices started).

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
    devices = _devices_for(layout, len(frames))

    def one(k):
        graph = builder.build([model.structure(frames[k])], layout)
        device = devices[k % len(devices)]
        arrays = {key: jax.device_put(v, device) for key, v in graph.arrays().items()}
        G_all, dG_blocks = fn(arrays, layout=graph.layout)
        return _unpad(graph, [np.asarray(g) for g in G_all], [np.asarray(b) for b in dG_blocks], store,
                      force_atoms[k])

    with ThreadPoolExecutor(max_workers=min(max(2, len(devices)), os.cpu_count() or 1)) as pool:
        pending: deque = deque()
        for k in range(len(frames)):
            pending.append(pool.submit(one, k))
            if len(pending) > AHEAD:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


#: Frames use every CPU device (one frame per device) when frames x (pair + triplet slots of the layout) reach
#: this; below it, all frames go to the first device. Why: each further device compiles the program again (~3 s
#: for the default water potential, measured), and one device computes ~1e7 triplet slots per second (192-atom
#: water: 370,000 slots in ~40 ms), so a second device pays once the work is ~2x the compilation, ~6e7 slots
#: (the 288 training frames of the DeePMD water set: 1.1e8; a 100-frame 8-atom silicon set: ~1e5).
PARALLEL_SLOTS = 6e7


def _devices_for(layout: Layout, n_frames: int) -> list:
    """The JAX devices :func:`iter_features` spreads frames over (see :data:`PARALLEL_SLOTS`)."""
    devices = jax.local_devices()
    slots = sum(cap for _, cap in layout.pair_blocks) + sum(cap for _, _, cap in layout.triplet_groups)
    if jax.default_backend() != "cpu" or n_frames * slots < PARALLEL_SLOTS:
        return devices[:1]
    return devices[:min(len(devices), n_frames)]


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
    G = symmetry_functions(plan, layout, arrays, d, shards=1)
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
    for g, ((c, e1, e2), offset, cap) in enumerate(layout.triplet_groups):
        entries = plan.angular(c, e1, e2)
        targets = [(c * E + e, np.array([where[c * E + e][k] for k, _ in entries])) for e in (e1, e2)]
        sums = _angular_derivatives(plan, layout, arrays, d.T, tuple(sf for _, sf in entries), offset, cap,
                                    tuple(layout.pair_blocks[b] for b, _ in targets),
                                    _real_count(arrays, "angular", g))  # the loops stop after its real triplets
        for (b, cols), total in zip(targets, sums, strict=True):
            blocks[b] = blocks[b].at[:, cols, :].add(total)
    return G, blocks


def _angular_derivatives(plan, layout, arrays, dT, functions, offset, cap, pair_blocks, count=None):
    """One angular group's derivatives summed per pair: ((cap_1, K, 3) with respect to d_ij over the pairs of the
    block of e1, (cap_2, K, 3) with respect to d_ik over the block of e2). dT is (3, P); ``count``: the group's
    real triplets (traced; None visits the whole capacity).

    Why a loop over chunks of triplets (:func:`~mlmd_lab.potentials.descriptors._chunks`, as the MD descriptors):
    the derivatives of a whole group at once are (6, K, triplets) arrays of ~300 MB for a 192-atom water frame,
    and moving them through memory took 4x the time of computing them chunk by chunk in cache (0.58 -> 0.14 s per
    frame, same values to 1e-15)."""
    (o1, cap1), (o2, cap2) = pair_blocks
    K = len(functions)

    def body(start, size, valid, totals):
        at = offset + start
        ij = jax.lax.dynamic_slice_in_dim(arrays["trip_ij"], at, size)
        ik = jax.lax.dynamic_slice_in_dim(arrays["trip_ik"], at, size)
        mask = jax.lax.dynamic_slice_in_dim(arrays["trip_mask"], at, size)
        if valid is not None:  # triplets an overlapping last chunk repeats (see _chunks) add nothing
            mask = mask & valid
        first, second = _triplet_gradients(plan, functions, dT[:, ij], dT[:, ik], mask)
        first = jnp.where(mask[None, None, :], first, 0.0)
        second = jnp.where(mask[None, None, :], second, 0.0)
        return (totals[0].at[ij - o1].add(jnp.transpose(first, (2, 1, 0))),
                totals[1].at[ik - o2].add(jnp.transpose(second, (2, 1, 0))))

    init = (jnp.zeros((cap1, K, 3), dT.dtype), jnp.zeros((cap2, K, 3), dT.dtype))
    return _chunks(cap, body, init, count=count)


def _triplet_gradients(plan, functions, d_ij, d_ik, mask):
    """((3, K, T) dg/dd_ij, (3, K, T) dg/dd_ik) of the angular terms g_k of T triplets (pair vectors (3, T) each).

    Each term is g = P(cos) X(r_ij, r_ik, r_jk) with P = 2^(1-zeta) (1 + lambda cos)^zeta and X = exp(-eta s)
    times the cutoff product (s the sum of (r - r_s)^2 over the triplet's distances; r_jk only for narrow
    functions), so with unit vectors u and d_jk = d_ik - d_ij:

        dg/dd_ij = (g_rij - g_cos cos / r_ij) u_ij + (g_cos / r_ij) u_ik - g_rjk u_jk
        dg/dd_ik = (g_rik - g_cos cos / r_ik) u_ik + (g_cos / r_ik) u_ij + g_rjk u_jk

    from the four scalar partials g_cos, g_rij, g_rik, g_rjk. Why written by hand: forward-mode autodiff with six
    Cartesian tangents carried every tangent through every function (86 ms per 192-atom water frame for the whole
    feature computation, one thread); the partials cost 40 ms, same values to 2e-15 (measured while writing this).
    Cutoff slopes and dP/dcos still come from ``jax.jvp`` of the shared functions (elementwise, cheap), so every
    cutoff type and non-integer zeta are handled as in the values."""
    dt = d_ij.dtype
    r_ij = jnp.sqrt(jnp.sum(d_ij * d_ij, axis=0))
    r_ik = jnp.sqrt(jnp.sum(d_ik * d_ik, axis=0))
    u_ij, u_ik = d_ij / r_ij, d_ik / r_ik
    cos = jnp.sum(u_ij * u_ik, axis=0)
    narrow = np.array([sf.type == 3 for sf in functions])
    eta, rs, lam = (_column([getattr(sf, name) for sf in functions], dt) for name in ("eta", "rs", "lam"))
    x_ij, x_ik = r_ij[None, :] - rs, r_ik[None, :] - rs
    s = x_ij**2 + x_ik**2
    if narrow.any():
        d_jk = d_ik - d_ij
        # Padded triplets may repeat a pair (r_jk = 0): keep the division finite; they are masked out.
        r_jk = jnp.sqrt(jnp.where(mask, jnp.sum(d_jk * d_jk, axis=0), 1.0))
        u_jk = d_jk / r_jk
        x_jk = r_jk[None, :] - rs
        s = s + _column(narrow, dt) * x_jk**2
    C, C_ij, C_ik, C_jk = _cutoff_products(plan, functions, narrow, r_ij, r_ik, r_jk if narrow.any() else None, mask)
    P, dP = jax.jvp(lambda c: _power_rows(1.0 + lam * c[None, :], [sf.zeta for sf in functions]), (cos,),
                    (jnp.ones_like(cos),))
    E = jnp.exp(-eta * s)
    PE = P * E
    g_cos = dP * E * C
    a_ij = PE * (C_ij - 2.0 * eta * x_ij * C) - g_cos * cos / r_ij
    a_ik = PE * (C_ik - 2.0 * eta * x_ik * C) - g_cos * cos / r_ik
    first = a_ij[None] * u_ij[:, None] + (g_cos / r_ij)[None] * u_ik[:, None]
    second = a_ik[None] * u_ik[:, None] + (g_cos / r_ik)[None] * u_ij[:, None]
    if narrow.any():
        g_jk = PE * (C_jk - 2.0 * eta * x_jk * C) * _column(narrow, dt)
        first = first - g_jk[None] * u_jk[:, None]
        second = second + g_jk[None] * u_jk[:, None]
    return first, second


def _cutoff_products(plan, functions, narrow, r_ij, r_ik, r_jk, mask):
    """(K, T) rows of the cutoff product f(r_ij) f(r_ik) [f(r_jk) for narrow functions] and of its partial
    derivatives with respect to r_ij, r_ik and r_jk; zero where not ``mask``. One evaluation per distinct
    (r_c, narrow), broadcast to the functions' rows (as :func:`~mlmd_lab.potentials.descriptors._cutoff_rows`)."""
    def value_and_slope(rc, r):
        return jax.jvp(lambda x: cutoff_fn(x, rc, plan.cutoff_type, plan.cutoff_alpha), (r,), (jnp.ones_like(r),))

    keys = [(sf.rc, bool(n)) for sf, n in zip(functions, narrow, strict=True)]
    distinct = sorted(set(keys))
    parts = []
    for rc, is_narrow in distinct:
        f1, g1 = value_and_slope(rc, r_ij)
        f2, g2 = value_and_slope(rc, r_ik)
        f3, g3 = value_and_slope(rc, r_jk) if is_narrow else (jnp.ones_like(r_ij), jnp.zeros_like(r_ij))
        parts.append((f1 * f2 * f3, g1 * f2 * f3, f1 * g2 * f3, f1 * f2 * g3))
    pick = np.array([distinct.index(k) for k in keys])
    out = []
    for n in range(4):
        rows = parts[0][n][None, :] if len(distinct) == 1 else jnp.stack([p[n] for p in parts])[pick]
        out.append(jnp.where(mask[None, :], rows, 0.0))
    return out
