"""Symmetry-function values in JAX from a :class:`~mlmd_lab.potentials.neighbours.Graph`.

The functions' parameters are compile-time constants (a potential's symmetry functions never change);
positions, cells and the neighbour arrays are traced. Work is organised so that the expensive per-triplet part
does as little as possible:

- radial functions: per pair block (c, e), one (pairs x functions) array, summed onto central atoms;
- angular functions: per triplet group (c, e1, e2), cos(theta) and r_jk once per triplet, one exp per distinct
  (eta, r_s), one power per distinct (lambda, zeta), one cutoff product per distinct r_c, then one product per
  function, summed onto central atoms.

Everything is a function of the pair vectors d_ij = r_j - r_i + shift . cell, so forces and the virial follow
from one gradient with respect to d (:func:`symmetry_functions`), or, in the form the MD engine uses, from
gradients with respect to positions and cells (:func:`symmetry_functions_at`; see
:mod:`mlmd_lab.potentials.model`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache, partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import shard_map
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mlmd_lab.potentials.cutoff import cutoff as cutoff_fn
from mlmd_lab.potentials.neighbours import Layout, aligned_zeros
from mlmd_lab.potentials.symfunc import SymmetryFunction


@dataclass(frozen=True)
class DescriptorPlan:
    """Static description of a model's symmetry functions, in n2p2's per-element order.

    Attributes:
        elements: model elements (by atomic number).
        functions: per element, its sorted symmetry functions.
        cutoff_type, cutoff_alpha: n2p2 cutoff settings (shared by all functions, as in n2p2).
    """

    elements: tuple[str, ...]
    functions: tuple[tuple[SymmetryFunction, ...], ...]
    cutoff_type: int
    cutoff_alpha: float

    @property
    def n_features(self) -> tuple[int, ...]:
        return tuple(len(f) for f in self.functions)

    @property
    def max_cutoff(self) -> float:
        return max(sf.rc for fs in self.functions for sf in fs)

    def radial(self, c: int, e: int) -> list[tuple[int, SymmetryFunction]]:
        """(n2p2 index, function) of element c's radial functions with neighbour element e."""
        name = self.elements[e]
        return [(k, sf) for k, sf in enumerate(self.functions[c]) if not sf.is_angular and sf.neighbours[0] == name]

    def angular(self, c: int, e1: int, e2: int) -> list[tuple[int, SymmetryFunction]]:
        pair = (self.elements[e1], self.elements[e2])
        return [(k, sf) for k, sf in enumerate(self.functions[c]) if sf.is_angular and sf.neighbours == pair]

    def angular_groups(self) -> dict[tuple[int, int, int], tuple[float, bool]]:
        """{(c, e1, e2): (largest cutoff, has wide functions)} for the neighbour builder."""
        groups = {}
        E = len(self.elements)
        for c in range(E):
            for e1 in range(E):
                for e2 in range(e1, E):
                    fs = [sf for _, sf in self.angular(c, e1, e2)]
                    if fs:
                        groups[(c, e1, e2)] = (max(sf.rc for sf in fs), any(sf.type == 9 for sf in fs))
        return groups


def pair_vectors(arrays, far: float):
    """d_ij (P, 3) for every pair slot; padded slots get a constant vector of length ``far``.

    The image offset shift . cell is one (P, 3) x (3, 3) product for one structure, and three gathered rows for
    several: never a (P, 3, 3) array of per-pair cells (XLA kept one, 72 bytes a pair, in the MD step's memory)."""
    R, cells = arrays["positions"], arrays["cells"]
    shift = arrays["pair_shift"].astype(R.dtype)  # integer image counts in lean MD graphs
    d = R[arrays["pair_j"]] - R[arrays["pair_i"]]
    if cells.shape[0] == 1:
        d = d + shift @ cells[0]
    else:
        struct = arrays["pair_struct"]
        d = d + sum(shift[:, a, None] * cells[:, a, :][struct] for a in range(3))
    mask = arrays["pair_mask"][:, None]
    return jnp.where(mask, d, jnp.array([far, 0.0, 0.0], dtype=d.dtype))


#: Pairs or triplets handled per step of the descriptor loops. Why loops over chunks, with the functions as
#: rows (K, chunk) and the Cartesian components as rows (3, P) of the pair vectors: XLA on CPU pays ~4 ns per
#: element to materialise a large fresh intermediate (new buffers are page-faulted on every call) against ~1 ns
#: for a fused exp, and gathers rows of a (P, 3) array at ~13 ns each. Measured on the largest angular group of
#: the 1,080-atom water (1.2 M triplets, 7 functions, one thread, float64): 152 ms for one array operation over
#: all triplets, 200 ms in (chunk, K) loops, 28-37 ms in (K, 1024) loops (measured while writing this; energy and
#: forces of the whole 1,080-atom water went from 817 to 282 µs/atom, see benchmarks/bench_md.py). Chunks also keep
#: the memory of a force evaluation at the index arrays: no (triplets x functions) array is ever stored, in the
#: forward or the backward pass.
CHUNK = 1024
#: The chunk on a GPU: each loop step there is a kernel launch (~10 µs), so chunks are as large as memory allows
#: comfortably (not measured here: no GPU on this machine).
GPU_CHUNK = 1 << 17


#: Pairs or triplets per step of the backward pass's loops on the CPU (their pullback, :func:`_pair_gradient`).
#: Why smaller than :data:`CHUNK`: a step there holds the forward values of the chunk and their cotangents, several
#: times the (K, chunk) arrays of a forward step, and at 1,024 entries they apparently no longer stay in a core's
#: cache (2 MB of L2 here): the time per entry jumps there, as the forward loops' does between 1,024 and 1,536.
#: Measured (``benchmarks/bench_md.py --worker``, 1,080-atom water, n2p2's H2O potential, 60 NVE steps, median of
#: 3, one thread): float64 297 -> 217 µs/atom-step with 512, float32 168 -> 133; whole force calls (one thread):
#: 1,024: 268 ms, 768: 258, 512: 225, 384: 218, 256: 217, 128: 234 in float64; 512: 129 ms, 256: 133, 128: 150 in
#: float32. 512 is the float32 best and within the noise of the float64 best. The forward loops keep
#: :data:`CHUNK` (at 512 they were no faster), and so do the training features' derivative loops
#: (:mod:`mlmd_lab.train.features`: 211 against 217 ms per 192-atom water frame).
GRADIENT_CHUNK = 512


def chunk_size(gradient: bool = False) -> int:
    """Pairs or triplets per loop step on the platform JAX computes on (:data:`CHUNK` on the CPU, or
    :data:`GRADIENT_CHUNK` for the loops of the backward pass)."""
    if jax.default_backend() != "cpu":
        return GPU_CHUNK
    return GRADIENT_CHUNK if gradient else CHUNK


def symmetry_functions(plan: DescriptorPlan, layout: Layout, arrays, d, shards: int | None = None):
    """Raw (unscaled) symmetry functions.

    Args:
        plan: the model's functions.
        layout: static shapes of the graph.
        arrays: graph arrays (see :class:`~mlmd_lab.potentials.neighbours.Graph`); only the integer index
            arrays are read (pair_i, trip_ij, trip_ik, and trip_i, trip_mask where given).
        d: pair vectors (P, 3) from :func:`pair_vectors` (or strained versions of them).
        shards: CPU devices the loops are split over (None: :func:`cpu_shards`; 1 keeps the computation on the
            device of its inputs, so that several computations can run side by side, one per device).

    Returns:
        list over elements of arrays (n_atoms, n_features[c]) in ``d``'s dtype; rows of atoms of other elements
        are zero. Sums over neighbours are accumulated in float64 (also when ``d`` is float32: the mixed mode).

    The derivative with respect to ``d`` is written by hand (:func:`jax.custom_vjp`): the backward pass walks the
    same chunks, recomputing each chunk's values and differentiating them locally, and adds the result onto the
    pairs, instead of autodiff's scatter of whole (triplets x functions) arrays (see :data:`CHUNK`).
    """
    index = {k: arrays[k] for k in _INDEX_NAMES if k in arrays}
    shards = cpu_shards(layout) if shards is None else int(shards)
    return [G.T.astype(d.dtype) for G in _features(plan, layout, shards, index, d.T)]


_INDEX_NAMES = ("pair_i", "trip_ij", "trip_ik", "trip_i", "trip_mask", "pair_count", "trip_count")


def accumulator_dtype(dtype):
    """float64 where JAX allows it (the mixed mode accumulates float32 terms in float64)."""
    return jnp.promote_types(dtype, jnp.float64) if jax.config.jax_enable_x64 else dtype


def _blocks(plan: DescriptorPlan, layout: Layout):
    """Every descriptor block as (element c, n2p2 column indices, kind, offset, capacity, functions, slot), where
    kind is "radial" (pairs of block (c, e), slot c * E + e of ``pair_count``) or "angular" (triplets of group
    (c, e1, e2), slot g of ``trip_count``)."""
    E = len(plan.elements)
    out = []
    for c in range(E):
        for e in range(E):
            entries = plan.radial(c, e)
            if entries:
                offset, cap = layout.pair_blocks[c * E + e]
                out.append((c, tuple(k for k, _ in entries), "radial", offset, cap, tuple(sf for _, sf in entries),
                            c * E + e))
    for g, ((c, e1, e2), offset, cap) in enumerate(layout.triplet_groups):
        entries = plan.angular(c, e1, e2)
        out.append((c, tuple(k for k, _ in entries), "angular", offset, cap, tuple(sf for _, sf in entries), g))
    return out


def _real_count(index, kind: str, slot: int):
    """The block's real entries (a traced int32), or None where the graph does not say (then its whole capacity
    is visited). They fill the block's first slots (:class:`~mlmd_lab.potentials.neighbours.Graph`)."""
    counts = index.get("pair_count" if kind == "radial" else "trip_count")
    return None if counts is None else counts[slot]


def _chunks(total: int, body, carry, shard=None, gradient: bool = False, count=None):
    """carry = body(start, size, valid, carry) over [0, total) in chunks of :func:`chunk_size` entries (one loop).

    ``valid`` is None (every entry of the chunk is new) or a (size,) bool array. A total that is not a multiple of
    the chunk ends with a chunk that overlaps the one before it (it starts at total - size), and ``valid`` marks
    the entries it visits for the first time: the body must add nothing for the others. Why not the last, shorter
    piece as a separate static tail (as before): the body's code then exists twice in the program, once in the
    loop and once in the tail, and XLA compiles both. Measured (one thread, compilation cache off, ``compile_s`` of
    a 40-step :func:`mlmd_lab.md.run`): the MD block of n2p2's Cu2S potential on its 144-atom cell 5.9 -> 4.6 s, of
    its H2O potential on 192-atom water 3.5 -> 3.2 s; single-point energies, forces and stresses of both stayed
    bitwise equal. The price is at most one chunk of repeated, masked work per block and evaluation. A total up to
    one chunk is one static piece, as before.

    ``shard`` = (s, n): only this shard's share of the chunks (s may be traced: the device's index).
    ``gradient``: a loop of the backward pass (chunks of :data:`GRADIENT_CHUNK` on the CPU).
    ``count``: how many of the ``total`` entries are real (traced; they come first, the rest is padding whose body
    adds nothing): the loop stops after the chunk that holds the last real one, so padding costs no time. Those
    chunks are the first chunks of the whole range, unchanged, so the sums are the same. The shards split the
    chunks that are visited (an even share of real work, where a split of the capacity gave the padding to the
    last shard). None: every chunk.

    Why: each new capacity is a new XLA compilation of the MD block or a force call (5-20 s), so capacities are
    rounded up (:func:`~mlmd_lab.potentials.neighbours.bucket`, powers of two for single points) and kept while
    the counts fit; before this, every padded slot cost the time of a real one."""
    if total <= 0:
        return carry
    size = chunk_size(gradient)
    s, n = shard if shard is not None else (0, 1)
    if total <= size:
        def whole(c):
            return body(0, total, None, c)

        return whole(carry) if shard is None else jax.lax.cond(s == n - 1, whole, lambda c: c, carry)
    chunks = -(-total // size)
    if count is not None:
        chunks = jnp.minimum((jnp.asarray(count, jnp.int32) + (size - 1)) // size, chunks)
    ragged = total % size != 0

    def step(k, c):
        first = k * size
        if not ragged:
            return body(first, size, None, c)
        start = jnp.minimum(first, total - size)
        return body(start, size, start + jnp.arange(size) >= first, c)

    return jax.lax.fori_loop(s * chunks // n, (s + 1) * chunks // n, step, carry)


#: Blocks smaller than this many chunks per CPU device are not split across devices.
MIN_CHUNKS_PER_DEVICE = 16


def cpu_shards(layout: Layout | None = None) -> int:
    """How many CPU devices the descriptor loops are split over: JAX's CPU devices when JAX computes on the CPU
    (:func:`mlmd_lab.jaxconfig.configure` makes one per core, ``MLMD_CPU_DEVICES``), else 1 (one GPU runs the
    loops alone). Why devices and not threads: XLA on the CPU runs a loop over cache-sized chunks on one thread
    (two threads were slower than one, measured), while separate devices run their shares concurrently."""
    if jax.default_backend() != "cpu":
        return 1
    n = jax.local_device_count("cpu")
    if layout is not None:
        largest = max([cap for _, cap in layout.pair_blocks] + [cap for _, _, cap in layout.triplet_groups], default=0)
        n = min(n, max(1, largest // (CHUNK * MIN_CHUNKS_PER_DEVICE)))
    return n


@lru_cache
def _mesh(n: int) -> Mesh:
    return Mesh(np.array(jax.local_devices(backend="cpu")[:n]), ("cores",))


def device_arrays(arrays: dict, layout: Layout) -> dict:
    """Neighbour arrays (numpy) placed where the descriptor loops read them, without copies on the CPU.

    With several CPU devices (:func:`cpu_shards`) every device reads every array; left to itself JAX would copy
    each array to each device (measured: +1.6 GiB at 69,120 atoms of water). Here each device's buffer aliases the
    one host array instead (64-byte aligned arrays are used in place, see
    :func:`~mlmd_lab.potentials.neighbours.aligned_zeros`), so the arrays exist once. Elsewhere a plain
    ``device_put``. The numpy arrays must not be changed afterwards; the dict is emptied as it goes, so the host
    copy of an array the device does copy (a GPU) is freed early."""
    n = cpu_shards(layout)
    mesh = _mesh(n) if n > 1 else None
    out = {}
    for key in list(arrays):
        host = np.ascontiguousarray(arrays.pop(key))
        if n == 1 or host.ndim == 0:
            out[key] = jax.device_put(host, may_alias=True)
            continue
        if host.ctypes.data % 64:
            aligned = aligned_zeros(host.size, host.dtype).reshape(host.shape)
            aligned[...] = host
            host = aligned
        buffers = [jax.device_put(host, device, may_alias=True) for device in mesh.devices.flat]
        out[key] = jax.make_array_from_single_device_arrays(host.shape, NamedSharding(mesh, P()), buffers)
    return out


def _on_devices(layout: Layout, function, *args, shards: int | None = None):
    """function(*args, shard=(s, n)) summed over the CPU devices (shard_map + psum; n = ``shards``, by default
    :func:`cpu_shards`); plain function(*args, shard=None) on one device."""
    n = cpu_shards(layout) if shards is None else shards
    if n == 1:
        return function(*args, shard=None)
    mesh = _mesh(n)

    def part(*local):
        out = function(*local, shard=(jax.lax.axis_index("cores"), n))
        return jax.tree_util.tree_map(lambda x: jax.lax.psum(x, "cores"), out)

    replicated = jax.tree_util.tree_map(lambda _: P(), args)
    return shard_map(part, mesh=mesh, in_specs=replicated, out_specs=P(), check_vma=False)(*args)


def _slice(x, start, size):
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=x.ndim - 1)


def _chunk(plan, kind, functions, index, dT, offset, start, size, valid=None, base=0):
    """One chunk of a block: (central atoms (size,), a local function of the chunk's pair vectors giving the values
    (K, size), its arguments ((3, size) each), and where they sit in dT). Values are 0 where ``valid`` (size,) is
    False (entries an earlier chunk already gave, see :func:`_chunks`), and so are their derivatives. dT holds the
    vectors of pair slots [base, base + dT.shape[1]) (:func:`_centre_ranges`)."""
    at = offset + start
    if kind == "radial":
        def radial(dd):
            rows = _radial_rows(plan, functions, jnp.sqrt(jnp.sum(dd * dd, axis=0)))
            return rows if valid is None else jnp.where(valid[None, :], rows, 0.0)

        return _slice(index["pair_i"], at, size), radial, (_slice(dT, at - base, size),), at - base
    ij, ik = _slice(index["trip_ij"], at, size), _slice(index["trip_ik"], at, size)
    # Without trip_mask / trip_i (the MD engine drops them to save 5 bytes per triplet) they follow from the pairs:
    # padded triplets repeat one pair, and a triplet's central atom is its first pair's.
    mask = _slice(index["trip_mask"], at, size) if "trip_mask" in index else ij != ik
    if valid is not None:
        mask = mask & valid
    atoms = _slice(index["trip_i"], at, size) if "trip_i" in index else index["pair_i"][ij]
    if base:
        # A padded triplet's pair (slot 0) may lie before this centre's range: clipped into it, it stays masked
        # (its two pairs stay equal) and adds nothing.
        ij, ik = (jnp.clip(x - base, 0, dT.shape[1] - 1) for x in (ij, ik))

    def angular(a, b):
        return _triplet_rows(plan, functions, a, b, mask)

    return atoms, angular, (dT[:, ij], dT[:, ik]), (ij, ik)


def _block_sums(plan, layout, index, dT, shard=None, centre=None, base=0):
    """Per block, its functions summed on the central atoms (K, N) (this shard's chunks only); dT is (3, P), or
    with ``centre`` the blocks of that central element only and dT the vectors of its pair slots from ``base`` on
    (:func:`_centre_ranges`)."""
    acc = accumulator_dtype(dT.dtype)
    N = layout.n_atoms
    rows = []
    for c, cols, kind, offset, cap, functions, slot in _blocks(plan, layout):
        if centre is not None and c != centre:
            continue

        def body(start, size, valid, total, kind=kind, functions=functions, offset=offset):
            atoms, local, args, _ = _chunk(plan, kind, functions, index, dT, offset, start, size, valid, base)
            return total.at[:, atoms].add(local(*args).astype(acc))

        rows.append(_chunks(cap, body, jnp.zeros((len(cols), N), acc), shard,
                            count=_real_count(index, kind, slot)))
    return rows


def _assemble(plan, layout, sums, acc):
    """Per element (n_features[c], N) in n2p2's order from the per-block sums."""
    N = layout.n_atoms
    rows = [[] for _ in plan.elements]
    for (c, cols, *_), total in zip(_blocks(plan, layout), sums, strict=True):
        rows[c].append((cols, total))
    features = []
    for c, fs in enumerate(plan.functions):
        n = len(fs)
        if not rows[c]:
            features.append(jnp.zeros((n, N), dtype=acc))
            continue
        index_c = np.concatenate([np.asarray(k) for k, _ in rows[c]])
        stacked = jnp.concatenate([v for _, v in rows[c]], axis=0)
        order = np.argsort(index_c)
        full = stacked[order]
        if len(index_c) < n:  # functions whose neighbour elements never occur in this layout
            full = jnp.zeros((n, N), dtype=acc).at[index_c[order]].set(full)
        features.append(full)
    return features


def _pair_gradient(plan, layout, index, dT, cotangents, shard=None, centre=None, base=0):
    """d_bar (3, P) = sum over this shard's chunks of (dG/dd)^T G_bar; with ``centre``, over the blocks of that
    central element only, for the pair slots dT holds (from ``base`` on, as :func:`_block_sums`)."""
    acc = accumulator_dtype(dT.dtype)
    d_bar = jnp.zeros(dT.shape, acc)
    for c, cols, kind, offset, cap, functions, slot in _blocks(plan, layout):
        if centre is not None and c != centre:
            continue
        g_bar = cotangents[c][np.asarray(cols)].astype(dT.dtype)  # (K, N): this block's rows

        def body(start, size, valid, total, kind=kind, functions=functions, offset=offset, g_bar=g_bar):
            atoms, local, args, where = _chunk(plan, kind, functions, index, dT, offset, start, size, valid, base)
            _, pullback = jax.vjp(local, *args)
            grads = pullback(g_bar[:, atoms])
            if kind == "radial":
                part = _slice(total, where, size) + grads[0].astype(acc)
                return jax.lax.dynamic_update_slice_in_dim(total, part, where, axis=1)
            ij, ik = where
            return total.at[:, ij].add(grads[0].astype(acc)).at[:, ik].add(grads[1].astype(acc))

        d_bar = _chunks(cap, body, d_bar, shard, gradient=True, count=_real_count(index, kind, slot))
    return d_bar


def _features_forward(plan, layout, shards, index, dT):
    """Per element (n_features[c], N) raw functions, accumulated in float64; dT is (3, P)."""
    rows = _on_devices(layout, partial(_block_sums, plan, layout), index, dT, shards=shards)
    return _assemble(plan, layout, rows, accumulator_dtype(dT.dtype))


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _features(plan, layout, shards, index, dT):
    return _features_forward(plan, layout, shards, index, dT)


def _features_fwd(plan, layout, shards, index, dT):
    return _features_forward(plan, layout, shards, index, dT), (index, dT)


def _features_bwd(plan, layout, shards, residuals, cotangents):
    index, dT = residuals
    d_bar = _on_devices(layout, partial(_pair_gradient, plan, layout), index, dT, cotangents, shards=shards)
    return None, d_bar.astype(dT.dtype)


_features.defvjp(_features_fwd, _features_bwd)


def symmetry_functions_at(plan: DescriptorPlan, layout: Layout, arrays, positions, cells, dtype, far: float):
    """Raw (unscaled) symmetry functions straight from positions, the same values as :func:`symmetry_functions`
    of :func:`pair_vectors`, with a derivative that goes straight to positions and cells.

    Args:
        plan, layout: as :func:`symmetry_functions`.
        arrays: graph arrays; the index arrays are read (pair_i, pair_j, pair_shift, pair_struct, pair_mask,
            trip_ij, trip_ik, and trip_i, trip_mask where given).
        positions: (N, 3) in the model's length unit, any float dtype (float64 keeps the pair vectors exact in
            the mixed mode: they are differences of positions of a large box).
        cells: (B, 3, 3), rows are cell vectors.
        dtype: the dtype the functions are computed in (float32 for the mixed mode).
        far: length of the vector given to padded pair slots (beyond every cutoff).

    Returns:
        list over elements of (n_atoms, n_features[c]) arrays in ``dtype``, as :func:`symmetry_functions`.

    Why a second entry point (the MD engine's and :meth:`HDNNP.evaluate_graph`'s): every device builds the pair
    vectors (3, P) itself from the positions (in loops over chunks, one central element's pairs at a time, again
    in the backward pass rather than keeping them: :func:`_centre_ranges`), and reduces its share of the pair
    gradient to atoms (3, N) and cells (B, 3, 3) before the sum over devices. So only (3, N) arrays cross between
    devices, and a force call needs two (3, P_c) arrays per device beyond the index arrays (P_c: the pairs of the
    element with the most): 40 KB per atom at 69,120 atoms of water in float64 on 2 devices, against 108 KB/atom
    through :func:`pair_vectors` (benchmarks/bench_md.py).
    """
    index = {k: arrays[k] for k in _POSITION_INDEX if k in arrays}
    features = _features_at(plan, layout, float(far), jnp.dtype(dtype).name, index, positions.T, cells)
    return [G.T.astype(dtype) for G in features]


_POSITION_INDEX = ("pair_i", "pair_j", "pair_shift", "pair_struct", "pair_mask", "trip_ij", "trip_ik", "trip_i",
                   "trip_mask", "pair_count", "trip_count")


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _features_at(plan, layout, far, dtype, index, RT, cells):
    return _features_at_fwd(plan, layout, far, dtype, index, RT, cells)[0]


def _features_at_fwd(plan, layout, far, dtype, index, RT, cells):
    rows = _on_devices(layout, partial(_block_sums_at, plan, layout, far, dtype), index, RT, cells)
    return _assemble(plan, layout, rows, accumulator_dtype(jnp.dtype(dtype))), (index, RT, cells)


def _features_at_bwd(plan, layout, far, dtype, residuals, cotangents):
    index, RT, cells = residuals
    gradient = partial(_position_gradient, plan, layout, far, dtype)
    RT_bar, cells_bar = _on_devices(layout, gradient, index, RT, cells, cotangents)
    return None, RT_bar.astype(RT.dtype), cells_bar.astype(cells.dtype)


def _vectors_t(index, RT, cells, dtype, far, pairs=None):
    """Pair vectors (3, P) in ``dtype`` from positions RT (3, N) and cells (B, 3, 3); padded slots get (far, 0, 0).
    Computed from float64 positions where given (exact differences in a large box also in the mixed mode).
    ``pairs`` = (lo, hi): the vectors of those pair slots only, (3, hi - lo).

    Built in a loop over chunks of pairs: XLA on the CPU does not fuse gathers into their consumers, so one
    expression over all pairs kept every gathered row and converted shift as a (P,) buffer (measured: 9 of them
    beside the result)."""
    lo, hi = pairs if pairs is not None else (0, index["pair_i"].shape[0])

    def body(start, size, valid, dT):  # rewrites what an overlapping chunk wrote with the same values
        at = lo + start
        i, j = (_slice(index[k], at, size) for k in ("pair_i", "pair_j"))
        shift = jax.lax.dynamic_slice_in_dim(index["pair_shift"], at, size, axis=0).T.astype(RT.dtype)
        d = RT[:, j] - RT[:, i] + _image_offsets(index, cells, shift, at, size)
        far_vector = jnp.zeros((3, 1), d.dtype).at[0, 0].set(far)
        d = jnp.where(_slice(index["pair_mask"], at, size)[None, :], d, far_vector)
        return jax.lax.dynamic_update_slice_in_dim(dT, d.astype(dtype), start, axis=1)

    return _chunks(hi - lo, body, jnp.zeros((3, hi - lo), dtype))


def _image_offsets(index, cells, shift, start, size):
    """shift . cell (3, C) of the chunk's pairs, for image counts ``shift`` (3, C)."""
    if cells.shape[0] == 1:
        return cells[0].T @ shift
    h = cells[_slice(index["pair_struct"], start, size)]  # (C, 3, 3), chunk-sized
    return jnp.einsum("cp,pca->ap", shift, h)


def _centre_ranges(layout: Layout) -> list[tuple[int, int, int]]:
    """(central element c, first pair slot, end) of each element's pair blocks (c, 0) ... (c, E - 1), which lie
    one after another; elements without pair slots are left out. Every triplet of a group (c, e1, e2) joins two
    pairs of that range.

    Why the position route works one central element at a time: a force call's largest buffers beside the
    neighbour indices are the pair vectors and their gradient, (3, P) each and one per CPU device; built for one
    element's pairs at a time they take that share of P (water: 2/3, the hydrogens' pairs), the program reusing
    the memory for the next element. The backward pass runs the elements as branches of a loop
    (:func:`_position_gradient`): as straight-line code XLA merged its vector loops with the forward pass's
    identical ones (common subexpressions), which kept every element's vectors alive until the end. Measured
    (69,120 atoms of water, float64, 2 devices): XLA's temporary buffers 487 -> 330 MiB per device, the MD run's
    peak 45.9 -> 41.3 KB/atom (``benchmarks/bench_md.py``), the same forces bit for bit and the same speed."""
    E = layout.n_elements
    out = []
    for c in range(E):
        blocks = layout.pair_blocks[c * E : (c + 1) * E]
        lo, hi = blocks[0][0], blocks[-1][0] + blocks[-1][1]
        if hi > lo:
            out.append((c, lo, hi))
    return out


def _block_sums_at(plan, layout, far, dtype, index, RT, cells, shard=None):
    """:func:`_block_sums` of the pair vectors of positions RT (3, N) (each device builds them for itself, one
    central element's pairs at a time: :func:`_centre_ranges`)."""
    sums = {}
    for c, lo, hi in _centre_ranges(layout):
        dT = _vectors_t(index, RT, cells, dtype, far, (lo, hi))
        keys = [k for k, block in enumerate(_blocks(plan, layout)) if block[0] == c]
        sums.update(zip(keys, _block_sums(plan, layout, index, dT, shard, centre=c, base=lo), strict=True))
    return [sums[k] for k in range(len(_blocks(plan, layout)))]


def _position_gradient(plan, layout, far, dtype, index, RT, cells, cotangents, shard=None):
    """(RT_bar (3, N), cells_bar (B, 3, 3)) of this shard's chunks: the pair gradient d_bar of
    :func:`_pair_gradient`, then d = r_j - r_i + shift . cell gives r_j += d_bar, r_i -= d_bar and
    dE/dh_ca = sum_p shift_pc d_bar_pa. Each device reduces its own d_bar to atoms before the sum over devices, so
    only (3, N) arrays cross between them. One central element's pairs at a time (:func:`_centre_ranges`)."""
    acc = accumulator_dtype(jnp.dtype(dtype))

    def centre(c, lo, hi, carry):
        dT = _vectors_t(index, RT, cells, dtype, far, (lo, hi))
        d_bar = _pair_gradient(plan, layout, index, dT, cotangents, shard, centre=c, base=lo)
        return _to_atoms(index, cells, d_bar, lo, carry)

    branches = [partial(centre, *r) for r in _centre_ranges(layout)]
    carry = (jnp.zeros(RT.shape, acc), jnp.zeros(cells.shape, acc))
    if not branches:
        return carry
    # Branches of a loop, not straight-line code: one element's buffers at a time (see _centre_ranges).
    return jax.lax.fori_loop(0, len(branches), lambda k, carry: jax.lax.switch(k, branches, carry), carry)


def _to_atoms(index, cells, d_bar, lo, carry):
    """carry (RT_bar (3, N), cells_bar (B, 3, 3)) plus the pair gradient d_bar (3, n) of pair slots lo ... lo + n
    reduced to atoms and cells, chunk by chunk (see :func:`_vectors_t`). Padded pair slots join a padding atom to
    itself with no shift: what they add there cancels, so no mask is needed."""
    acc = d_bar.dtype

    def body(start, size, valid, carry):
        RT_bar, cells_bar = carry
        g = _slice(d_bar, start, size)
        if valid is not None:  # an overlapping chunk's repeated pairs add nothing
            g = jnp.where(valid[None, :], g, 0.0)
        at = lo + start
        i, j = (_slice(index[k], at, size) for k in ("pair_i", "pair_j"))
        shift = jax.lax.dynamic_slice_in_dim(index["pair_shift"], at, size, axis=0).astype(acc)  # (C, 3)
        RT_bar = RT_bar.at[:, j].add(g).at[:, i].add(-g)
        if cells.shape[0] == 1:
            return RT_bar, cells_bar + (shift.T @ g.T)[None]
        outer = shift[:, :, None] * g.T[:, None, :]
        return RT_bar, cells_bar.at[_slice(index["pair_struct"], at, size)].add(outer)

    return _chunks(d_bar.shape[1], body, carry)


_features_at.defvjp(_features_at_fwd, _features_at_bwd)


def _radial_values(plan: DescriptorPlan, functions, r):
    """(pairs, K) values exp(-eta (r - rs)^2) f_c(r)."""
    return _radial_rows(plan, functions, r).T


def _radial_rows(plan: DescriptorPlan, functions, r):
    """(K, pairs) values exp(-eta (r - rs)^2) f_c(r) for distances r (pairs,)."""
    eta, rs = (_column([getattr(sf, name) for sf in functions], r.dtype) for name in ("eta", "rs"))
    return jnp.exp(-eta * (r[None, :] - rs) ** 2) * _cutoff_rows(plan, functions, [r])


def _column(values, dtype):
    """A (K, 1) constant column, to broadcast one value per function over a chunk (K, C)."""
    return jnp.asarray(np.asarray(values, np.float64)[:, None], dtype)


def _cutoff_rows(plan: DescriptorPlan, functions, distances, kinds=None):
    """(K, C) products of f_c over ``distances`` [(C,), ...] per function (its r_c; ``kinds[k]`` False drops the
    last distance, for wide angular functions). One cutoff evaluation per distinct (r_c, kind), then broadcast:
    why rows built in one piece: XLA fuses a stack of separately computed rows into one loop that recomputes the
    shared factors for every row (7x slower, measured)."""
    kinds = [True] * len(functions) if kinds is None else kinds
    keys = [(sf.rc, kind) for sf, kind in zip(functions, kinds, strict=True)]
    distinct = sorted(set(keys))
    rows = []
    for rc, kind in distinct:
        f = cutoff_fn(distances[0], rc, plan.cutoff_type, plan.cutoff_alpha)
        for r in distances[1:] if kind else distances[1:-1]:
            f = f * cutoff_fn(r, rc, plan.cutoff_type, plan.cutoff_alpha)
        rows.append(f)
    if len(distinct) == 1:
        return rows[0][None, :]
    return jnp.stack(rows)[np.array([distinct.index(k) for k in keys])]


def _angular_values(plan: DescriptorPlan, functions, d, r, ij, ik, mask):
    """(triplets, K) angular values for one (c, e1, e2) group, from pair vectors d (P, 3) and triplet indices
    (``r`` is unused; kept for callers that pass it)."""
    return _triplet_rows(plan, functions, d[ij].T, d[ik].T, mask).T


def _triplet_rows(plan: DescriptorPlan, functions, d_ij, d_ik, mask):
    """(K, triplets) angular values from the two pair vectors of each triplet, (3, T) each; 0 where not ``mask``.

    Each function's terms are computed as (K, T) arrays in one piece (see :func:`_cutoff_rows` for why).
    """
    r_ij = jnp.sqrt(jnp.sum(d_ij * d_ij, axis=0))
    r_ik = jnp.sqrt(jnp.sum(d_ik * d_ik, axis=0))
    cos = jnp.sum(d_ij * d_ik, axis=0) / (r_ij * r_ik)
    narrow = [sf.type == 3 for sf in functions]
    dt = d_ij.dtype
    eta, rs, lam = (_column([getattr(sf, name) for sf in functions], dt) for name in ("eta", "rs", "lam"))
    s = (r_ij[None, :] - rs) ** 2 + (r_ik[None, :] - rs) ** 2
    distances = [r_ij, r_ik]
    if any(narrow):
        d_jk = d_ik - d_ij
        # Padded triplets may repeat a pair (r_jk = 0); keep their sqrt away from 0 so gradients stay finite.
        r_jk = jnp.sqrt(jnp.where(mask, jnp.sum(d_jk * d_jk, axis=0), 1.0))
        s = s + _column(narrow, dt) * (r_jk[None, :] - rs) ** 2
        distances.append(r_jk)
    else:
        narrow = [False] * len(functions)
        distances.append(r_ik)  # dropped again for wide functions
    fc = jnp.where(mask[None, :], _cutoff_rows(plan, functions, distances, narrow), 0.0)
    base = 1.0 + lam * cos[None, :]
    return _power_rows(base, [sf.zeta for sf in functions]) * jnp.exp(-eta * s) * fc


def _power_rows(base, zetas):
    """2^(1 - zeta_k) base_k^zeta_k for rows k of ``base`` (K, T); 0 where base <= 0 (as n2p2). Integer zeta by
    repeated multiplication (exact), one branch per distinct zeta."""
    zeta = np.asarray(zetas, np.float64)
    scale = _column(2.0 ** (1.0 - zeta), base.dtype)
    out = None
    for z in sorted(set(zetas)):
        power = _angular_power(base, z)
        out = power if out is None else jnp.where(_column(zeta == z, base.dtype) > 0, power, out)
    return out * scale


def _angular_power(base, zeta: float):
    """base^zeta, 0 where base <= 0 (as n2p2); integer zeta by repeated multiplication."""
    if float(zeta).is_integer():
        return jax.lax.integer_pow(base, int(zeta))
    positive = base > 0.0
    safe = jnp.where(positive, base, 1.0)
    return jnp.where(positive, safe**zeta, 0.0)
