"""Host neighbour lists (mlmd_lab.potentials.neighbours): the two numba passes that enumerate triplets.

The counting pass visits each atom's neighbours by element pair (vectorised), the writing pass in pair order; they
must agree on every atom and group, and both must agree with a direct count. Fast: a 72-atom, three-element
triclinic box.
"""

from __future__ import annotations

import numpy as np
import pytest

from mlmd_lab.errors import MLMDError
from mlmd_lab.potentials.neighbours import NeighbourBuilder, _count_triplets, _Triplets, pair_list

#: (c, e1, e2) -> (cutoff Å, wide): narrow and wide groups, three cutoffs, and triples that are no group at all
#: ((2, 2, 2), (1, 2, 2), ...), so every branch of both passes is taken.
GROUPS = {
    (0, 0, 0): (3.6, False), (0, 0, 1): (4.2, False), (0, 1, 2): (4.2, True), (0, 2, 2): (3.0, False),
    (1, 0, 0): (4.2, True), (1, 0, 1): (3.6, False), (1, 1, 1): (4.2, False), (2, 0, 1): (3.6, False),
    (2, 0, 2): (4.2, True),
}


@pytest.fixture(scope="module")
def box():
    rng = np.random.default_rng(7)
    cell = np.array([[9.0, 0.0, 0.0], [1.5, 8.5, 0.0], [-1.0, 2.0, 8.0]])
    positions = rng.random((72, 3)) @ cell
    species = rng.integers(0, 3, 72)
    builder = NeighbourBuilder(3, 4.0, GROUPS, skin=0.3)
    i, j, _, D = pair_list(positions, cell, [True] * 3, builder.cutoff)
    dist = np.sqrt(np.einsum("ij,ij->i", D, D))
    e = species[j]
    args = (i, dist, D, e, species, builder._table, builder._group_rc, builder._group_wide,
            len(builder.group_keys), builder.cutoff_angular)
    return builder, args


def _direct_counts(builder, i, dist, D, e, species):
    """Triplets per atom and group (N, G) by numpy over every unordered pair of each atom's neighbours."""
    counts = np.zeros((len(species), len(builder.group_keys)), np.int64)
    for atom in range(len(species)):
        mine = np.flatnonzero((i == atom) & (dist < builder.cutoff_angular))
        p, q = np.triu_indices(len(mine), 1)
        p, q = mine[p], mine[q]
        g = builder._table[species[atom], e[p], e[q]]
        keep = g >= 0
        p, q, g = p[keep], q[keep], g[keep]
        rc = builder._group_rc[g]
        r_jk = np.linalg.norm(D[q] - D[p], axis=1)
        keep = (dist[p] < rc) & (dist[q] < rc) & (builder._group_wide[g] | (r_jk < rc))
        np.add.at(counts[atom], g[keep], 1)
    return counts


def test_both_triplet_passes_equal_a_direct_count(box):
    builder, (i, dist, D, e, species, *rest) = box
    direct = _direct_counts(builder, i, dist, D, e, species)
    assert direct.sum() > 1000 and (direct.sum(axis=0) > 0).all()  # every group occurs
    starts = np.searchsorted(i, np.arange(len(species) + 1))
    np.testing.assert_array_equal(_count_triplets(starts, dist, D, e, species, *rest), direct)
    triplets = _Triplets(i, dist, D, e, species, *rest)
    total = int(triplets.counts.sum())
    a, b = np.full(total, -1, np.int32), np.full(total, -1, np.int32)
    offsets = np.r_[0, np.cumsum(triplets.counts)[:-1]]
    triplets.fill(np.arange(i.size, dtype=np.int32), offsets, a, b)  # raises if the passes disagree
    assert (a >= 0).all() and (b >= 0).all() and (a != b).all()
    assert (i[a] == i[b]).all()  # both pairs of a triplet share the central atom


def test_a_count_the_writing_pass_disagrees_with_is_reported_and_not_written_past(box):
    """A deliberately wrong count (one short, for the atom whose triplets fill the arrays' last slots) must not let
    the writing pass write past the arrays (numba does not check bounds): it stops at the counted room, and the
    disagreement is an error."""
    builder, (i, dist, D, e, species, *rest) = box
    triplets = _Triplets(i, dist, D, e, species, *rest)
    atom = int(np.flatnonzero(triplets.per_atom[:, -1] > 0)[-1])
    triplets.per_atom = triplets.per_atom.copy()
    triplets.per_atom[atom, -1] -= 1
    total = int(triplets.per_atom.sum())
    guard = 5
    a, b = np.full(total + guard, -7, np.int32), np.full(total + guard, -7, np.int32)
    offsets = np.r_[0, np.cumsum(triplets.per_atom.sum(axis=0))[:-1]]
    with pytest.raises(MLMDError, match=f"disagree for atom {atom}"):
        triplets.fill(np.arange(i.size, dtype=np.int32), offsets, a[:total], b[:total])
    assert (a[total:] == -7).all() and (b[total:] == -7).all()
    assert (a[:total] >= 0).all()  # every counted slot was written
