"""What leaves exploration for the reference: classification, physical filters, diverse selection.

- :func:`classify`: accurate / candidate / failed by the calibrated committee max-atom force uncertainty
  (eV/Å, computed in the MD engine) against the trust levels (lo, hi), with extrapolation (symmetry functions
  outside the scaling range) as a second signal that makes an otherwise accurate frame a candidate;
- :func:`physical_problem`: why a frame is unphysical (atoms too close, cell volume or shape changed too much),
  or None; such frames never reach the reference (nor do frames with a committee force beyond
  :data:`MAX_FORCE_FACTOR` x the explored RMS force, checked by the loop);
- :func:`descriptor` and :func:`farthest_points`: per-frame mean radial symmetry-function vectors and
  farthest-point sampling in that space (deterministic), so the candidates labelled are spread out and far
  from the frames already labelled, not picked at random.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from ase import Atoms

from mlmd_lab.errors import MLMDError

ACCURATE, CANDIDATE, FAILED = "accurate", "candidate", "failed"
#: Suggested trust levels (:func:`suggest_trust`): the force RMSE asked of the potential, as a share of the
#: labelled data's RMS force component (the accuracy target of automatic construction) ...
TARGET_FORCE_SHARE = 0.05
#: ... in this share of the frames the largest atomic error of a potential at that RMSE stays below lo, ...
ACCURATE_QUANTILE = 0.99
#: ... hi = this many times lo, ...
HI_FACTOR = 3.0
#: ... or this many times the committee's own mean atomic force error on held-out frames, when that is more.
HI_ERROR_FACTOR = 4.0
#: Frames whose shortest interatomic distance is below this fraction of the starting structures' are rejected.
MIN_DISTANCE_FRACTION = 0.7
#: Frames whose largest committee atomic force exceeds this many times the explored frames' RMS force component
#: are rejected. Thermal forces are near Gaussian per component: the largest atomic force of a 1000-atom frame is
#: ~5 RMS, so 8 RMS is no equilibrium state at the explored conditions. Why it exists: a young committee's MD
#: at 600 K (bench_learn --seed 1) yielded candidates with 6 eV/Å forces (RMS 0.5); labelled, they dominated the
#: force loss and a later committee fitted everything badly (all members 0.2-0.27 eV/Å RMSE, mean |dF| 0.32).
MAX_FORCE_FACTOR = 8.0
#: Largest relative cell volume change |V/V0 - 1| of an explored frame.
MAX_VOLUME_CHANGE = 0.3
#: Largest principal deviatoric (shape) strain of an explored cell against its starting cell.
MAX_SHAPE_STRAIN = 0.2


def classify(uncertainty: float, extrapolation: float, trust: tuple[float, float]) -> str:
    """``"accurate"`` (uncertainty <= lo, no extrapolation), ``"candidate"`` (lo < uncertainty <= hi, or
    extrapolating within hi) or ``"failed"`` (uncertainty > hi, or not finite).

    Args:
        uncertainty: the frame's largest calibrated committee force uncertainty over atoms (eV/Å).
        extrapolation: count of symmetry functions outside the scaling range (0: none).
        trust: (lo, hi) in eV/Å, lo < hi.
    """
    lo, hi = trust
    if not np.isfinite(uncertainty) or uncertainty > hi:
        return FAILED
    if uncertainty > lo or extrapolation > 0:
        return CANDIDATE
    return ACCURATE


def suggest_trust(rms_force: float, validation_error: float, n_atoms: int) -> tuple[float, float]:
    """Trust levels (lo, hi) in eV/Å for the calibrated max-atom force uncertainty, from the data and the committee.

    lo is the accuracy asked of the potential, tied to the data, not to the committee: the largest atomic force
    error that a potential whose force RMSE is :data:`TARGET_FORCE_SHARE` of the data's RMS force component shows
    in :data:`ACCURATE_QUANTILE` of the frames of ``n_atoms`` atoms (errors Gaussian per component, so an atom's
    |error| is chi-distributed with 3 degrees of freedom: lo = sigma * chi_3 quantile of q^(1/N); 8 atoms:
    3.97 sigma, 64 atoms: 4.49 sigma). A calibrated committee then finds >= 99 % of the explored frames
    accurate exactly when it is about that good, which is what the stop rule asks. A lo that follows the
    committee's own error (an earlier rule: min(3 x the validation error, 0.1 x RMS force)) shrinks as the
    model improves, so the accurate fraction stops measuring the model's quality (measured in docs/learn.md).

    hi separates candidates from failed frames (too far from the data to learn from): :data:`HI_FACTOR` x lo, or
    :data:`HI_ERROR_FACTOR` x the committee's validation error (mean atomic |F_mean - F_ref| on frames no member
    trained on) when a young committee's own error is larger, so its exploration still yields candidates.

    Args:
        rms_force: RMS force component (eV/Å, > 0) of the frames the accuracy is asked on (the loop: the committee's
            forces on its physical explored frames).
        validation_error: the committee's mean atomic force error on held-out frames (eV/Å), >= 0.
        n_atoms: atoms per explored frame (the largest starting structure's), >= 1.
    """
    from scipy.stats import chi2

    if not (np.isfinite(rms_force) and rms_force > 0):
        raise MLMDError(f"suggest_trust: rms_force={rms_force} eV/Å must be a positive number")
    if not (np.isfinite(validation_error) and validation_error >= 0):
        raise MLMDError(f"suggest_trust: validation_error={validation_error} eV/Å must be >= 0")
    if int(n_atoms) < 1:
        raise MLMDError(f"suggest_trust: n_atoms={n_atoms} must be >= 1")
    sigma = TARGET_FORCE_SHARE * float(rms_force)
    lo = sigma * float(np.sqrt(chi2(3).ppf(ACCURATE_QUANTILE ** (1.0 / int(n_atoms)))))
    return lo, max(HI_FACTOR * lo, HI_ERROR_FACTOR * float(validation_error))


def shortest_distance(atoms: Atoms) -> float:
    """Shortest interatomic distance (Å, periodic images included); inf for a single isolated atom."""
    from ase.neighborlist import neighbor_list

    cutoff = 4.0
    while True:
        d = neighbor_list("d", atoms, cutoff, self_interaction=False)
        if d.size or cutoff > 20 or not atoms.pbc.any() and len(atoms) < 2:
            return float(d.min()) if d.size else float("inf")
        cutoff *= 2


def physical_problem(atoms: Atoms, start: Atoms, min_distance: float, *,
                     min_fraction: float = MIN_DISTANCE_FRACTION, max_volume_change: float = MAX_VOLUME_CHANGE,
                     max_shape_strain: float = MAX_SHAPE_STRAIN) -> str | None:
    """Why ``atoms`` is unphysical (a sentence), or None when it may go to the reference.

    Args:
        atoms: an explored frame (Å).
        start: the structure its MD started from (the reference cell).
        min_distance: the starting structures' shortest interatomic distance (Å).
        min_fraction: reject distances below ``min_fraction * min_distance``.
        max_volume_change: reject |V / V0 - 1| above this (periodic cells).
        max_shape_strain: reject a cell whose largest principal deviatoric Green-Lagrange strain exceeds this.
    """
    d = shortest_distance(atoms)
    if d < min_fraction * min_distance:
        return (f"atoms too close: shortest distance {d:.3f} Å < {min_fraction:g} x {min_distance:.3f} Å of the "
                "starting structures")
    if atoms.pbc.all() and start.pbc.all():
        ratio = atoms.get_volume() / start.get_volume()
        if abs(ratio - 1.0) > max_volume_change:
            return f"cell volume changed by {100 * (ratio - 1):+.0f} % (limit ±{100 * max_volume_change:.0f} %)"
        F = np.linalg.solve(start.cell.array, atoms.cell.array).T  # new vector = F · old vector
        strain = 0.5 * (F.T @ F - np.eye(3))
        deviatoric = strain - np.trace(strain) / 3.0 * np.eye(3)
        shape = float(np.max(np.abs(np.linalg.eigvalsh(deviatoric))))
        if shape > max_shape_strain:
            return f"cell shape distorted: deviatoric strain {shape:.3f} (limit {max_shape_strain:g})"
    return None


def descriptor(atoms: Atoms, elements: Sequence[str], cutoff: float = 5.0, n_centres: int = 12) -> np.ndarray:
    """Per-frame mean radial symmetry-function vector: for each ordered element pair (a, b) and each of
    ``n_centres`` Gaussian centres r_k in [0.8, cutoff] Å (width the centre spacing), the mean over atoms of
    element a of sum_j exp(-(r_ij - r_k)² / 2w²) fc(r_ij) over neighbours j of element b (cosine cutoff).
    Invariant to translations, rotations and permutations; shape (E² n_centres,)."""
    from ase.neighborlist import neighbor_list

    centres = np.linspace(0.8, cutoff, n_centres)
    width = centres[1] - centres[0]
    i, j, d = neighbor_list("ijd", atoms, cutoff, self_interaction=False)
    index = {e: k for k, e in enumerate(elements)}
    species = np.array([index[s] for s in atoms.get_chemical_symbols()])
    n_el = len(elements)
    fc = 0.5 * (np.cos(np.pi * d / cutoff) + 1.0)
    g = np.exp(-((d[:, None] - centres[None, :]) ** 2) / (2 * width**2)) * fc[:, None]
    out = np.zeros((n_el, n_el, n_centres))
    np.add.at(out, (species[i], species[j]), g)
    counts = np.bincount(species, minlength=n_el).astype(float)
    out /= np.maximum(counts, 1.0)[:, None, None]
    return out.ravel()


def farthest_points(candidates: np.ndarray, n: int, existing: np.ndarray | None = None,
                    priority: Sequence[float] | None = None) -> list[int]:
    """Indices of ``n`` candidates chosen by farthest-point sampling (deterministic).

    Args:
        candidates: (C, D) descriptors.
        n: how many to pick (at most C).
        existing: (K, D) descriptors already labelled: the first pick is the candidate farthest from them,
            every pick maximises the distance to everything chosen or labelled so far.
        priority: (C,) tie-break and first pick without ``existing`` (the largest, e.g. the uncertainty);
            ties left are broken by the lowest index.

    Distances are Euclidean after scaling each descriptor component by its standard deviation over candidates
    and existing frames (components that do not vary are ignored).
    """
    X = np.asarray(candidates, np.float64)
    if X.ndim != 2:
        raise MLMDError(f"candidates must be a (frames, features) array, not shape {X.shape}")
    n = int(min(max(n, 0), len(X)))
    if n == 0:
        return []
    E = np.zeros((0, X.shape[1])) if existing is None else np.asarray(existing, np.float64).reshape(-1, X.shape[1])
    allx = np.concatenate([X, E]) if len(E) else X
    scale = allx.std(axis=0)
    keep = scale > 1e-12 * max(1.0, float(np.abs(allx).max()))
    Xs = X[:, keep] / scale[keep] if keep.any() else np.zeros((len(X), 1))
    Es = E[:, keep] / scale[keep] if keep.any() else np.zeros((len(E), 1))
    prio = np.zeros(len(X)) if priority is None else np.asarray(priority, np.float64)
    if len(Es):
        dist = np.min(np.linalg.norm(Xs[:, None, :] - Es[None, :, :], axis=2), axis=1)
    else:
        dist = np.full(len(X), np.inf)
    chosen: list[int] = []
    for _ in range(n):
        score = np.where(np.isin(np.arange(len(X)), chosen), -np.inf, dist)
        best = np.flatnonzero(score == score.max())
        pick = int(best[np.argmax(prio[best])]) if len(best) > 1 else int(best[0])
        chosen.append(pick)
        dist = np.minimum(dist, np.linalg.norm(Xs - Xs[pick], axis=1))
    return chosen
