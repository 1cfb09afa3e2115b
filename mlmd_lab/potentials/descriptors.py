"""Symmetry-function values in JAX from a :class:`~mlmd_lab.potentials.neighbours.Graph`.

The functions' parameters are compile-time constants (a potential's symmetry functions never change);
positions, cells and the neighbour arrays are traced. Work is organised so that the expensive per-triplet part
does as little as possible:

- radial functions: per pair block (c, e), one (pairs x functions) array, summed onto central atoms;
- angular functions: per triplet group (c, e1, e2), cos(theta) and r_jk once per triplet, one exp per distinct
  (eta, r_s), one power per distinct (lambda, zeta), one cutoff product per distinct r_c, then one product per
  function, summed onto central atoms.

Everything is a function of the pair vectors d_ij = r_j - r_i + shift . cell, so forces and the virial follow
from one gradient with respect to d (see :mod:`mlmd_lab.potentials.model`).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from mlmd_lab.potentials.cutoff import cutoff as cutoff_fn
from mlmd_lab.potentials.neighbours import Layout
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
    """d_ij (P, 3) for every pair slot; padded slots get a constant vector of length ``far``."""
    R, cells = arrays["positions"], arrays["cells"]
    d = R[arrays["pair_j"]] - R[arrays["pair_i"]]
    d = d + jnp.einsum("pa,pab->pb", arrays["pair_shift"], cells[arrays["pair_struct"]])
    mask = arrays["pair_mask"][:, None]
    return jnp.where(mask, d, jnp.array([far, 0.0, 0.0], dtype=d.dtype))


def symmetry_functions(plan: DescriptorPlan, layout: Layout, arrays, d):
    """Raw (unscaled) symmetry functions.

    Args:
        plan: the model's functions.
        layout: static shapes of the graph.
        arrays: graph arrays (see :class:`~mlmd_lab.potentials.neighbours.Graph`).
        d: pair vectors (P, 3) from :func:`pair_vectors` (or strained versions of them).

    Returns:
        list over elements of arrays (n_atoms, n_features[c]); rows of atoms of other elements are zero.
    """
    E = len(plan.elements)
    N = layout.n_atoms
    r2 = jnp.sum(d * d, axis=1)
    r = jnp.sqrt(r2)
    columns = [[] for _ in range(E)]  # per element: list of (n2p2 indices, (N, K) values)
    for c in range(E):
        for e in range(E):
            entries = plan.radial(c, e)
            if not entries:
                continue
            offset, cap = layout.pair_blocks[c * E + e]
            sl = slice(offset, offset + cap)
            values = _radial_values(plan, [sf for _, sf in entries], r[sl])
            summed = jax.ops.segment_sum(values, arrays["pair_i"][sl], num_segments=N, indices_are_sorted=True)
            columns[c].append(([k for k, _ in entries], summed))
    for (c, e1, e2), offset, cap in layout.triplet_groups:
        entries = plan.angular(c, e1, e2)
        sl = slice(offset, offset + cap)
        values = _angular_values(plan, [sf for _, sf in entries], d, r, arrays["trip_ij"][sl],
                                 arrays["trip_ik"][sl], arrays["trip_mask"][sl])
        summed = jax.ops.segment_sum(values, arrays["trip_i"][sl], num_segments=N, indices_are_sorted=True)
        columns[c].append(([k for k, _ in entries], summed))
    features = []
    for c in range(E):
        n = len(plan.functions[c])
        if not columns[c]:
            features.append(jnp.zeros((N, n), dtype=d.dtype))
            continue
        index = np.concatenate([np.asarray(k) for k, _ in columns[c]])
        stacked = jnp.concatenate([v for _, v in columns[c]], axis=1)
        order = np.argsort(index)
        full = stacked[:, order]
        if len(index) < n:  # functions whose neighbour elements never occur in this layout
            full = jnp.zeros((N, n), dtype=d.dtype).at[:, index[order]].set(full)
        features.append(full)
    return features


def _radial_values(plan: DescriptorPlan, functions, r):
    """(pairs, K) values exp(-eta (r - rs)^2) f_c(r)."""
    fc = {rc: cutoff_fn(r, rc, plan.cutoff_type, plan.cutoff_alpha) for rc in {sf.rc for sf in functions}}
    cols = [jnp.exp(-sf.eta * (r - sf.rs) ** 2) * fc[sf.rc] for sf in functions]
    return jnp.stack(cols, axis=1)


def _angular_values(plan: DescriptorPlan, functions, d, r, ij, ik, mask):
    """(triplets, K) angular values for one (c, e1, e2) group."""
    d_ij, d_ik = d[ij], d[ik]
    # Recomputing |d| here is cheaper than gathering r: each gather costs a scatter in the force pass.
    r_ij = jnp.sqrt(jnp.sum(d_ij * d_ij, axis=1))
    r_ik = jnp.sqrt(jnp.sum(d_ik * d_ik, axis=1))
    cos = jnp.sum(d_ij * d_ik, axis=1) / (r_ij * r_ik)
    narrow = any(sf.type == 3 for sf in functions)
    if narrow:
        d_jk = d_ik - d_ij
        r2_jk = jnp.sum(d_jk * d_jk, axis=1)
        # Padded triplets may repeat a pair (r_jk = 0); keep their sqrt away from 0 so gradients stay finite.
        r_jk = jnp.sqrt(jnp.where(mask, r2_jk, 1.0))
    fc_pair = {}
    for sf in functions:
        key = (sf.rc, sf.type)
        if key not in fc_pair:
            f = cutoff_fn(r_ij, sf.rc, plan.cutoff_type, plan.cutoff_alpha)
            f = f * cutoff_fn(r_ik, sf.rc, plan.cutoff_type, plan.cutoff_alpha)
            if sf.type == 3:
                f = f * cutoff_fn(r_jk, sf.rc, plan.cutoff_type, plan.cutoff_alpha)
            fc_pair[key] = jnp.where(mask, f, 0.0)
    gauss = {}
    for sf in functions:
        key = (sf.eta, sf.rs, sf.type)
        if key not in gauss:
            s = (r_ij - sf.rs) ** 2 + (r_ik - sf.rs) ** 2
            if sf.type == 3:
                s = s + (r_jk - sf.rs) ** 2
            gauss[key] = jnp.exp(-sf.eta * s)
    powers = {}
    for sf in functions:
        key = (sf.lam, sf.zeta)
        if key not in powers:
            powers[key] = _angular_power(1.0 + sf.lam * cos, sf.zeta) * 2.0 ** (1.0 - sf.zeta)
    cols = [powers[(sf.lam, sf.zeta)] * gauss[(sf.eta, sf.rs, sf.type)] * fc_pair[(sf.rc, sf.type)] for sf in functions]
    return jnp.stack(cols, axis=1)


def _angular_power(base, zeta: float):
    """base^zeta, 0 where base <= 0 (as n2p2); integer zeta by repeated multiplication."""
    if float(zeta).is_integer():
        return jax.lax.integer_pow(base, int(zeta))
    positive = base > 0.0
    safe = jnp.where(positive, base, 1.0)
    return jnp.where(positive, safe**zeta, 0.0)
