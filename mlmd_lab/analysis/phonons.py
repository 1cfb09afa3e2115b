"""Harmonic phonons of a periodic cell at the wave vectors it is commensurate with, by finite displacements and
the crystal's symmetry (few calculations: one displacement pair for diamond Si).

:func:`displacements` picks the symmetry-irreducible atom displacements (± ``delta`` Å, Cartesian), the caller
computes their forces with any engine (DFT, a potential), and :func:`force_constants` rebuilds the full force
constants of the cell from them with the space group (:mod:`spglib`), as phonopy does: every symmetry image of a
computed displacement is a computed displacement of the image atom. :func:`frequencies` then gives the cell's
Γ-point frequencies, i.e. the bulk frequencies at every wave vector q with exp(iq·L) = 1 for the cell's lattice
vectors L (diamond's 8-atom cubic cell: Γ and the three X points). The 3 lowest are the acoustic modes at Γ (≈ 0).

Units: Å, eV/Å (forces), eV/Å² (force constants), amu (masses), cm⁻¹ and THz (frequencies).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from ase import Atoms

from mlmd_lab.errors import MLMDError

#: cm⁻¹ → THz.
CM1_TO_THZ = 0.0299792458


@dataclass
class Displacement:
    """One displaced structure: ``atom`` moved by ``vector`` (Å, Cartesian) from the ideal positions."""

    atom: int
    vector: np.ndarray
    atoms: Atoms


def _symmetry(atoms: Atoms, symprec: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Cartesian rotations (n, 3, 3), atom permutations (n, N): atom a goes to perm[g, a], equivalent atoms)."""
    import spglib

    cell = (atoms.cell.array, atoms.get_scaled_positions(), atoms.numbers)
    data = spglib.get_symmetry(cell, symprec=symprec)
    if data is None:
        raise MLMDError("spglib found no symmetry for this cell; is it a 3-D periodic crystal?")
    lattice_t = atoms.cell.array.T
    inverse = np.linalg.inv(lattice_t)
    frac = atoms.get_scaled_positions()
    rotations, perms = [], []
    for R, t in zip(data["rotations"], data["translations"], strict=True):
        image = frac @ R.T + t
        diff = image[:, None, :] - frac[None, :, :]
        diff -= np.round(diff)
        dist = np.linalg.norm(diff @ atoms.cell.array, axis=2)
        perm = dist.argmin(axis=1)
        if dist[np.arange(len(atoms)), perm].max() > 10 * symprec or len(set(perm.tolist())) != len(atoms):
            continue  # not a symmetry of these positions within symprec
        rotations.append(lattice_t @ R @ inverse)
        perms.append(perm)
    return np.array(rotations), np.array(perms), np.asarray(data["equivalent_atoms"])


def displacements(atoms: Atoms, delta: float = 0.01, symprec: float = 1e-4) -> list[Displacement]:
    """The symmetry-irreducible displaced structures of ``atoms`` (an ideal crystal), each ± ``delta`` (Å).

    For each set of symmetry-equivalent atoms, one atom is displaced along Cartesian axes until the images of the
    chosen directions under its site symmetry span 3-D (diamond: x only); each direction is used with + and −
    (central differences: the cubic anharmonic term cancels).
    """
    if not atoms.pbc.all() or atoms.cell.rank < 3:
        raise MLMDError("phonon displacements need a 3-D periodic cell")
    if not delta > 0:
        raise MLMDError(f"delta={delta} Å must be > 0 (0.01 Å is usual)")
    rotations, perms, equivalent = _symmetry(atoms, symprec)
    out = []
    for a in sorted(set(equivalent.tolist())):
        site = [R for R, p in zip(rotations, perms, strict=True) if p[a] == a]  # the identity at least

        def rank(directions: list[np.ndarray], site=site) -> int:
            if not directions:
                return 0
            return int(np.linalg.matrix_rank(np.array([R @ d for d in directions for R in site]), tol=1e-6))

        span: list[np.ndarray] = []
        for axis in np.eye(3):
            if rank([*span, axis]) > rank(span):
                span.append(axis)
            if rank(span) == 3:
                break
        for direction in span:
            for sign in (1.0, -1.0):
                moved = atoms.copy()
                moved.calc = None
                vector = sign * delta * direction
                moved.positions[a] += vector
                out.append(Displacement(atom=a, vector=vector, atoms=moved))
    return out


def force_constants(atoms: Atoms, displaced: Sequence[Displacement], forces: Sequence[np.ndarray],
                    symprec: float = 1e-4) -> np.ndarray:
    """Force constants Φ (N, 3, N, 3) in eV/Å² of ``atoms`` from the forces (eV/Å, (N, 3) each) of the
    :func:`displacements`; Φ[b, :, a, :] u = −F_b for atom a displaced by u. Each displacement's symmetry images
    add equations for the image atom; each atom's block column is their least-squares solution. Forces of the
    ideal cell (zero by symmetry for a crystal at its ideal positions; not asked) are not subtracted: pairs of
    ± displacements cancel them. Symmetrised (Φ = Φᵀ) and with the acoustic sum rule imposed on the diagonal."""
    if len(displaced) != len(forces):
        raise MLMDError(f"{len(displaced)} displacements but {len(forces)} force arrays")
    n = len(atoms)
    rotations, perms, _ = _symmetry(atoms, symprec)
    columns: dict[int, tuple[list[np.ndarray], list[np.ndarray]]] = {a: ([], []) for a in range(n)}
    for disp, force in zip(displaced, forces, strict=True):
        force = np.asarray(force, dtype=float)
        if force.shape != (n, 3):
            raise MLMDError(f"forces of shape {force.shape}; expected ({n}, 3)")
        for R, perm in zip(rotations, perms, strict=True):
            image_forces = np.empty_like(force)
            image_forces[perm] = force @ R.T
            vectors, sets = columns[int(perm[disp.atom])]
            vectors.append(R @ disp.vector)
            sets.append(image_forces)
    phi = np.zeros((n, 3, n, 3))
    for a, (vectors, sets) in columns.items():
        if not vectors:
            raise MLMDError(f"no displacement reaches atom {a} by symmetry; give displacements of every orbit")
        U = np.array(vectors).T  # (3, m)
        if np.linalg.matrix_rank(U, tol=1e-8) < 3:
            raise MLMDError(f"the displacements of atom {a} and their images do not span 3-D")
        pinv = np.linalg.pinv(U)  # (m, 3)
        F = np.array(sets)  # (m, N, 3)
        phi[:, :, a, :] = -np.einsum("mbi,mj->bij", F, pinv)
    flat = phi.reshape(3 * n, 3 * n)
    flat = 0.5 * (flat + flat.T)
    phi = flat.reshape(n, 3, n, 3)
    for a in range(n):  # acoustic sum rule: a rigid translation costs nothing
        phi[a, :, a, :] -= phi[a].sum(axis=1)
    return phi


def brute_force_constants(atoms: Atoms, forces_of: Callable[[list[Atoms]], list[np.ndarray]],
                          delta: float = 0.01) -> np.ndarray:
    """Force constants (N, 3, N, 3) eV/Å² by displacing every atom along x, y, z (± ``delta``), no symmetry:
    6N force evaluations (a check of :func:`force_constants`, or for cells without symmetry)."""
    n = len(atoms)
    structures = []
    for a in range(n):
        for c in range(3):
            for sign in (1.0, -1.0):
                moved = atoms.copy()
                moved.calc = None
                moved.positions[a, c] += sign * delta
                structures.append(moved)
    forces = forces_of(structures)
    phi = np.zeros((n, 3, n, 3))
    k = 0
    for a in range(n):
        for c in range(3):
            phi[:, :, a, c] = -(np.asarray(forces[k]) - np.asarray(forces[k + 1])) / (2 * delta)
            k += 2
    flat = phi.reshape(3 * n, 3 * n)
    return (0.5 * (flat + flat.T)).reshape(n, 3, n, 3)


def _dynamical_matrix(atoms: Atoms, phi: np.ndarray) -> np.ndarray:
    n = len(atoms)
    if phi.shape != (n, 3, n, 3):
        raise MLMDError(f"force constants of shape {phi.shape}; expected ({n}, 3, {n}, 3)")
    inv_sqrt_m = np.repeat(1.0 / np.sqrt(atoms.get_masses()), 3)
    d = phi.reshape(3 * n, 3 * n) * inv_sqrt_m[:, None] * inv_sqrt_m[None, :]
    return 0.5 * (d + d.T)  # eV/(Å² amu)


def _to_cm1(eigenvalues: np.ndarray) -> np.ndarray:
    """Eigenvalues of the dynamical matrix (eV/(Å² amu)) → frequencies in cm⁻¹ (imaginary ones negative)."""
    from ase import units

    omega = np.sqrt(np.abs(eigenvalues) * units._e / units._amu) * 1e10  # rad/s
    return np.sign(eigenvalues) * omega / (2 * np.pi * units._c * 100.0)


def modes(atoms: Atoms, phi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cell's 3N Γ-point frequencies in cm⁻¹, ascending (imaginary ones as negative numbers), and the
    eigenvectors of the mass-weighted dynamical matrix as columns (3N, 3N)."""
    values, vectors = np.linalg.eigh(_dynamical_matrix(atoms, phi))
    return _to_cm1(values), vectors


def frequencies(atoms: Atoms, phi: np.ndarray) -> np.ndarray:
    """The cell's 3N Γ-point frequencies in cm⁻¹, ascending (imaginary ones as negative numbers)."""
    return modes(atoms, phi)[0]


def frequencies_in_subspaces(atoms: Atoms, phi: np.ndarray, vectors: np.ndarray,
                             groups: Sequence[Sequence[int]]) -> tuple[list[np.ndarray], float]:
    """Frequencies (cm⁻¹) of force constants ``phi`` within the mode subspaces of a reference: for each group of
    reference eigenvector columns (a degenerate set, e.g. from :func:`degenerate_groups`), the eigenvalues of
    ``phi``'s dynamical matrix projected onto that subspace. This compares the same modes of two models (by their
    symmetry and displacement pattern), not merely the n-th lowest of each: two models may order modes
    differently. Exact when each group spans an irreducible representation that occurs once (diamond's cell: Γ
    acoustic and optical, X TA, LA/LO and TO); the second value is the largest part of ``phi``'s dynamical matrix
    that maps a subspace out of itself, relative to its norm (0 when the subspaces are invariant, as symmetry
    makes them)."""
    d = _dynamical_matrix(atoms, phi)
    scale = float(np.linalg.norm(d, 2)) or 1.0
    out, leak = [], 0.0
    for indices in groups:
        u = vectors[:, list(indices)]
        du = d @ u
        inside = u.T @ du
        out.append(np.sort(_to_cm1(np.linalg.eigvalsh(0.5 * (inside + inside.T)))))
        leak = max(leak, float(np.linalg.norm(du - u @ inside, 2)) / scale)
    return out, leak


def degenerate_groups(values: np.ndarray, tolerance: float = 0.01, floor: float = 1.0) -> list[list[int]]:
    """Indices of ascending ``values`` grouped where neighbours differ by less than ``tolerance`` (relative) or
    ``floor`` (absolute, same unit): degenerate modes of a crystal."""
    groups: list[list[int]] = []
    for i, v in enumerate(values):
        if groups and abs(v - values[groups[-1][-1]]) <= max(floor, tolerance * abs(v)):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups
