"""Training arrays: per-frame features and labels stacked into padded arrays of fixed shape.

All frames of a set are padded to the same capacities (the largest frame's counts, bucketed), so one
compiled step serves every batch and the whole set can live on the accelerator; a batch is a vector of frame
indices gathered inside the compiled step. Padding: atom slot ``n_cap - 1`` is a dummy that padded rows and
pairs point to; padded pairs have zero derivatives, padded rows are masked.

Units: eV and Å (labels per frame as read from the frames: energy (eV), forces (eV/Å), stress (eV/Å³)).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from ase import Atoms

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


def stack(features: Sequence[FrameFeatures], labels: Labels, n_elements: int, dtype=np.float32,
          caps: tuple | None = None) -> dict[str, np.ndarray]:
    """Padded arrays of many frames (see module docstring); ``caps`` from :func:`capacities` (default: these
    frames') — give the same to training and validation sets so that one compilation serves both."""
    B = len(features)
    caps = capacities(features, n_elements) if caps is None else caps
    n_cap, atom_caps, pair_caps = caps
    dummy = n_cap - 1
    out: dict[str, np.ndarray] = {"_caps": caps}
    for c in range(n_elements):
        F = features[0].G[c].shape[1]
        G = np.zeros((B, atom_caps[c], F), dtype)
        index = np.full((B, atom_caps[c]), dummy, np.int32)
        for k, fr in enumerate(features):
            n = fr.G[c].shape[0]
            G[k, :n] = fr.G[c]
            index[k, :n] = fr.atoms[c]
        out[f"G{c}"], out[f"atom{c}"] = G, index
    for b, cap in enumerate(pair_caps):
        K = features[0].blocks[b]["dG"].shape[1]
        dG = np.zeros((B, cap, K, 3), dtype)
        d = np.zeros((B, cap, 3), dtype)
        row = np.zeros((B, cap), np.int32)
        i = np.full((B, cap), dummy, np.int32)
        j = np.full((B, cap), dummy, np.int32)
        for k, fr in enumerate(features):
            blk = fr.blocks[b]
            n = blk["i"].size
            dG[k, :n], d[k, :n], row[k, :n], i[k, :n], j[k, :n] = blk["dG"], blk["d"], blk["row"], blk["i"], blk["j"]
        out[f"dG{b}"], out[f"d{b}"], out[f"row{b}"], out[f"i{b}"], out[f"j{b}"] = dG, d, row, i, j
    forces = np.zeros((B, n_cap, 3), dtype)
    atom_mask = np.zeros((B, n_cap), bool)
    for k, f in enumerate(labels.forces):
        n = labels.n_atoms[k]
        atom_mask[k, :n] = True
        if f is not None:
            forces[k, :n] = f
    out.update(energy=np.nan_to_num(labels.energy).astype(np.float64), has_energy=~np.isnan(labels.energy),
               n_atoms=labels.n_atoms.astype(dtype), forces=forces, atom_mask=atom_mask,
               has_forces=labels.has_forces, stress=np.nan_to_num(labels.stress).astype(dtype),
               has_stress=labels.has_stress, volume=np.nan_to_num(labels.volume, nan=1.0).astype(dtype))
    return out


def capacities(features: Sequence[FrameFeatures], n_elements: int) -> tuple:
    """(atom slots, per-element rows, per-block pairs) fitting every frame given."""
    n_cap = bucket(max(fr.species.size for fr in features))  # >= n + 1: the last slot is the dummy atom
    atom_caps = tuple(max(1, max(fr.G[c].shape[0] for fr in features)) for c in range(n_elements))
    pair_caps = tuple(max(1, max(fr.blocks[b]["i"].size for fr in features)) for b in range(n_elements**2))
    return n_cap, atom_caps, pair_caps


def scaling_statistics(features: Sequence[FrameFeatures], n_elements: int) -> list[np.ndarray]:
    """Per element (F_c, 4) [min, max, mean, sigma] of the raw symmetry functions over all atoms (float64)."""
    stats = []
    for c in range(n_elements):
        G = np.concatenate([fr.G[c] for fr in features]).astype(np.float64)
        if G.shape[0] == 0:
            stats.append(None)
            continue
        stats.append(np.stack([G.min(0), G.max(0), G.mean(0), G.std(0)], axis=1))
    return stats
