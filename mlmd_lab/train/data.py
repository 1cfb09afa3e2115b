"""Training arrays: per-frame features and labels as padded records of fixed shape.

All frames of a set are padded to the same capacities (the largest frame's counts, bucketed), so one
compiled step serves every batch. Each frame becomes one record (:func:`frame_record`); the records live in a
:class:`~mlmd_lab.train.store.FeatureStore` (memory or disk) and a batch is the records of its frames stacked
(:func:`stack` for a list of frames). Padding: atom slot ``n_cap - 1`` is a dummy that padded rows and pairs
point to; padded pairs have zero derivatives, padded rows are masked.

Units: eV and Å (labels per frame as read from the frames: energy (eV), forces (eV/Å), stress (eV/Å³)).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from ase import Atoms

from mlmd_lab.errors import MLMDError
from mlmd_lab.frames import results_of
from mlmd_lab.potentials.neighbours import bucket
from mlmd_lab.train.features import FrameFeatures


@dataclass
class Labels:
    """Reference values of frames (eV, eV/Å, eV/Å³); missing values are NaN, with masks."""

    energy: np.ndarray  # (B,)
    n_atoms: np.ndarray  # (B,)
    forces: list[np.ndarray | None]
    stress: np.ndarray  # (B, 3, 3), NaN where missing
    volume: np.ndarray  # (B,), NaN for non-periodic frames
    counts: np.ndarray  # (B, E) atoms per element

    @property
    def has_forces(self) -> np.ndarray:
        return np.array([f is not None for f in self.forces])

    @property
    def has_stress(self) -> np.ndarray:
        return ~np.isnan(self.stress).any(axis=(1, 2))


def labels_of(frames: Sequence[Atoms], elements: Sequence[str]) -> Labels:
    """The reference energies, forces and stresses of frames (ASE units)."""
    energy, forces, stress, volume, counts = [], [], [], [], []
    for atoms in frames:
        res = results_of(atoms)
        e = res.get("energy", res.get("free_energy"))
        energy.append(np.nan if e is None else float(e))
        f = res.get("forces")
        forces.append(None if f is None else np.asarray(f, np.float64).reshape(len(atoms), 3))
        s = res.get("stress")
        stress.append(np.full((3, 3), np.nan) if s is None or not atoms.pbc.all() else stress_matrix(s))
        volume.append(atoms.get_volume() if atoms.pbc.all() else np.nan)
        symbols = atoms.get_chemical_symbols()
        counts.append([symbols.count(e) for e in elements])
    return Labels(energy=np.array(energy), n_atoms=np.array([len(a) for a in frames]), forces=forces,
                  stress=np.array(stress).reshape(-1, 3, 3), volume=np.array(volume),
                  counts=np.array(counts, np.float64).reshape(-1, len(elements)))


def stress_matrix(stress) -> np.ndarray:
    """A stress as a 3x3 matrix (eV/Å³) from Voigt (xx yy zz yz xz xy) or 3x3 input."""
    s = np.asarray(stress, np.float64)
    if s.shape == (3, 3):
        return s
    xx, yy, zz, yz, xz, xy = s.reshape(6)
    return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])


def reference_energies(labels: Labels, elements: Sequence[str]) -> dict[str, float]:
    """Per-element energies (eV/atom) from a least-squares fit E ~ sum_e n_e mu_e over frames with energies.

    With one composition only (e.g. water boxes) the fit is underdetermined; the minimum-norm solution is
    used, which still reproduces every frame's mean energy exactly — the networks learn the rest.
    """
    ok = ~np.isnan(labels.energy)
    if not ok.any():
        return {e: 0.0 for e in elements}
    mu, *_ = np.linalg.lstsq(labels.counts[ok], labels.energy[ok], rcond=None)
    return {e: float(m) for e, m in zip(elements, mu, strict=True)}


def record_fields(caps: tuple, widths: tuple[tuple[int, ...], tuple[int, ...]], dtype=np.float32) -> dict:
    """The per-frame arrays of a training record, ``{name: (shape, dtype)}`` (see module docstring).

    Args:
        caps: (atom slots, per-element rows, per-block pairs), from :func:`capacities` or :func:`caps_of_counts`.
        widths: (functions per element F_c, columns per pair block K_b).
        dtype: float type of the features and labels (energies are always float64).
    """
    n_cap, atom_caps, pair_caps = caps
    n_features, block_widths = widths
    fields = {}
    for c, rows in enumerate(atom_caps):
        fields[f"G{c}"] = ((rows, n_features[c]), dtype)
        fields[f"atom{c}"] = ((rows,), np.int32)
    for b, cap in enumerate(pair_caps):
        fields[f"dG{b}"] = ((cap, block_widths[b], 3), dtype)
        fields[f"d{b}"] = ((cap, 3), dtype)
        for name in ("row", "i", "j"):
            fields[f"{name}{b}"] = ((cap,), np.int32)
    fields.update(energy=((), np.float64), has_energy=((), bool), n_atoms=((), dtype), forces=((n_cap, 3), dtype),
                  force_mask=((n_cap,), bool), has_forces=((), bool), stress=((3, 3), dtype), has_stress=((), bool),
                  volume=((), dtype))
    return fields


def frame_record(fr: FrameFeatures, labels: Labels, k: int, caps: tuple, dtype=np.float32) -> dict[str, np.ndarray]:
    """Frame ``k``'s padded training arrays (the fields of :func:`record_fields`) from its features and labels.

    Padding: atom slot ``n_cap - 1`` is a dummy that padded rows and pairs point to; padded pairs have zero
    derivatives. The virial needs every pair's derivatives, so a frame with a force subset does not fit its
    stress (``has_stress`` False)."""
    n_cap, atom_caps, pair_caps = caps
    dummy = n_cap - 1
    out = {}
    for c, rows in enumerate(atom_caps):
        n = fr.G[c].shape[0]
        G = np.zeros((rows, fr.G[c].shape[1]), dtype)
        G[:n] = fr.G[c]
        index = np.full(rows, dummy, np.int32)
        index[:n] = fr.atoms[c]
        out[f"G{c}"], out[f"atom{c}"] = G, index
    for b, cap in enumerate(pair_caps):
        blk = fr.blocks[b]
        n = blk["i"].size
        if n > cap:
            raise MLMDError(f"internal: frame {k} has {n} pairs in block {b}, more than the {cap} counted for it")
        dG = np.zeros((cap, blk["dG"].shape[1], 3), dtype)
        d = np.zeros((cap, 3), dtype)
        row = np.zeros(cap, np.int32)
        i = np.full(cap, dummy, np.int32)
        j = np.full(cap, dummy, np.int32)
        dG[:n], d[:n], row[:n], i[:n], j[:n] = blk["dG"], blk["d"], blk["row"], blk["i"], blk["j"]
        out[f"dG{b}"], out[f"d{b}"], out[f"row{b}"], out[f"i{b}"], out[f"j{b}"] = dG, d, row, i, j
    forces = np.zeros((n_cap, 3), dtype)
    if labels.forces[k] is not None:
        forces[: labels.n_atoms[k]] = labels.forces[k]
    force_mask = np.zeros(n_cap, bool)
    force_mask[fr.force_atoms] = True
    energy = labels.energy[k]
    out.update(energy=np.float64(0.0 if np.isnan(energy) else energy), has_energy=np.bool_(not np.isnan(energy)),
               n_atoms=np.asarray(labels.n_atoms[k], dtype), forces=forces, force_mask=force_mask,
               has_forces=np.bool_(labels.has_forces[k]), stress=np.nan_to_num(labels.stress[k]).astype(dtype),
               has_stress=np.bool_(labels.has_stress[k] and fr.all_forces),
               volume=np.asarray(np.nan_to_num(labels.volume[k], nan=1.0), dtype))
    return out


def widths_of(fr: FrameFeatures) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(functions per element, columns per pair block) of a frame's features."""
    return tuple(g.shape[1] for g in fr.G), tuple(blk["dG"].shape[1] for blk in fr.blocks)


def stack(features: Sequence[FrameFeatures], labels: Labels, n_elements: int, dtype=np.float32,
          caps: tuple | None = None) -> dict[str, np.ndarray]:
    """Padded arrays of many frames with a leading frame axis (the records of :func:`frame_record` stacked);
    ``caps`` from :func:`capacities` (default: these frames')."""
    caps = capacities(features, n_elements) if caps is None else caps
    records = [frame_record(fr, labels, k, caps, dtype) for k, fr in enumerate(features)]
    out: dict = {name: np.stack([r[name] for r in records]) for name in records[0]}
    out["_caps"] = caps
    return out


def caps_of_counts(counts) -> tuple:
    """(atom slots, per-element rows, per-block pairs) fitting frames of these
    :class:`~mlmd_lab.train.features.FrameCounts` (the counting pass, before any feature exists)."""
    n_cap = bucket(max(c.n_atoms for c in counts))  # >= n + 1: the last slot is the dummy atom
    atom_caps = tuple(int(max(1, n)) for n in np.max([c.per_element for c in counts], axis=0))
    pair_caps = tuple(int(max(1, n)) for n in np.max([c.kept_pairs for c in counts], axis=0))
    return n_cap, atom_caps, pair_caps


def capacities(features: Sequence[FrameFeatures], n_elements: int) -> tuple:
    """(atom slots, per-element rows, per-block pairs) fitting every frame given."""
    n_cap = bucket(max(fr.species.size for fr in features))  # >= n + 1: the last slot is the dummy atom
    atom_caps = tuple(max(1, max(fr.G[c].shape[0] for fr in features)) for c in range(n_elements))
    pair_caps = tuple(max(1, max(fr.blocks[b]["i"].size for fr in features)) for b in range(n_elements**2))
    return n_cap, atom_caps, pair_caps


def frame_statistics(fr: FrameFeatures) -> list[np.ndarray | None]:
    """Per element, (F_c, 5) [min, max, sum, sum of squares, count] of one frame's raw symmetry functions
    (float64; None where the frame has no atom of the element): :func:`combine_statistics` adds frames up, so the
    scaling needs no second pass over the features."""
    out = []
    for G in fr.G:
        if G.shape[0] == 0:
            out.append(None)
            continue
        G = G.astype(np.float64)
        out.append(np.stack([G.min(0), G.max(0), G.sum(0), (G * G).sum(0), np.full(G.shape[1], G.shape[0])], axis=1))
    return out


def combine_statistics(per_frame: Sequence[list[np.ndarray | None]], n_elements: int) -> list[np.ndarray | None]:
    """Per element (F_c, 4) [min, max, mean, sigma] of the raw symmetry functions over the frames given (from
    :func:`frame_statistics`); None for an element none of them has."""
    stats = []
    for c in range(n_elements):
        parts = [f[c] for f in per_frame if f[c] is not None]
        if not parts:
            stats.append(None)
            continue
        p = np.stack(parts)
        n = p[:, :, 4].sum(0)
        mean = p[:, :, 2].sum(0) / n
        # Sum of squares less n mean^2: in float64 its cancellation error is ~1e-16 (mean / sigma)^2 of sigma^2,
        # 1e-12 for a function whose spread is 1 % of its mean.
        var = np.maximum(p[:, :, 3].sum(0) / n - mean * mean, 0.0)
        stats.append(np.stack([p[:, :, 0].min(0), p[:, :, 1].max(0), mean, np.sqrt(var)], axis=1))
    return stats
