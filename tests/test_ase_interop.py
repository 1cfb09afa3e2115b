"""The HDNNP's ASE calculator with ASE's and phonopy's own tools, on the real n2p2 potentials.

Two small systems, each compiled once: antifluorite Cu2S (the cubic 12-atom cell, a = 5.6 Å, near the
potential's zero-stress lattice constant, with forces zero by symmetry and no extrapolation) and one water
molecule taken from the liquid-water structure of the H2O potential, alone in a periodic 12 Å box (the images
are beyond the 6.35 Å cutoff).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from ase import Atoms, units
from ase.build import bulk
from ase.md import velocitydistribution
from ase.md.velocitydistribution import Stationary
from ase.md.verlet import VelocityVerlet
from ase.optimize import BFGS
from conftest import external

from mlmd_lab.io.n2p2 import read_input_data
from mlmd_lab.potentials import HDNNP

THZ_PER_CM = 0.0299792458  # 1 cm^-1 in THz


@pytest.fixture(scope="module")
def copper_sulfide():
    model = HDNNP.from_n2p2(external("n2p2/Cu2S_PBE"), "eV", "Angstrom")
    return model.calculator(skin=1.0)


@pytest.fixture(scope="module")
def water_molecule():
    """(a water molecule from the liquid, periodic 12 Å box; calculator) — the isolated molecule extrapolates
    the liquid-water potential (intermolecular symmetry functions below their training range)."""
    folder = external("n2p2/H2O_RPBE-D3")
    model = HDNNP.from_n2p2(folder, "Ha", "Bohr")
    liquid = read_input_data(folder / "input.data", "Ha", "Bohr")[0]
    oxygen = liquid.get_chemical_symbols().index("O")
    distances = liquid.get_distances(oxygen, range(len(liquid)), mic=True)
    hydrogens = [i for i in np.argsort(distances) if liquid[i].symbol == "H"][:2]
    bonds = liquid.get_distances(oxygen, hydrogens, mic=True, vector=True)
    molecule = Atoms("OH2", positions=[[0, 0, 0], *bonds], cell=[12.0, 12.0, 12.0], pbc=True)
    molecule.center()
    return molecule, model.calculator(skin=1.0)


def _antifluorite() -> Atoms:
    return bulk("SCu2", "fluorite", a=5.6, cubic=True)  # S on 4a, Cu on 8c: Cu8S4


def _relax(atoms, calc, fmax):
    atoms.calc = calc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = atoms.get_potential_energy()
        optimizer = BFGS(atoms, logfile=None)
        converged = optimizer.run(fmax=fmax, steps=200)
        return start, atoms.get_potential_energy(), converged


# ---------------------------------------------------------------------------------------------- relaxation
def test_bfgs_relaxes_rattled_copper_sulfide(copper_sulfide):
    ideal = _antifluorite()
    ideal.calc = copper_sulfide
    e_ideal = ideal.get_potential_energy()
    assert np.abs(ideal.get_forces()).max() < 1e-10  # every atom on a symmetry site
    atoms = _antifluorite()
    atoms.rattle(0.05, seed=7)
    start, end, converged = _relax(atoms, copper_sulfide, fmax=0.05)
    assert converged
    assert np.linalg.norm(atoms.get_forces(), axis=1).max() < 0.05
    assert end < start - 0.01
    # Back near antifluorite: measured 0.24 meV below it, as in this 12-atom cell the ideal structure is a saddle
    # (X-point modes at 1.2i THz with this potential; its primitive-cell Γ modes are real, see below).
    assert end == pytest.approx(e_ideal, abs=2e-3)
    assert atoms.calc.results["extrapolation"].sum() == 0


def test_bfgs_relaxes_a_water_molecule(water_molecule):
    molecule, calc = water_molecule
    atoms = molecule.copy()
    atoms.rattle(0.05, seed=1)
    start, end, converged = _relax(atoms, calc, fmax=0.05)
    assert converged and end < start
    assert np.linalg.norm(atoms.get_forces(), axis=1).max() < 0.05
    # RPBE-D3 water: O-H 0.97 Å, H-O-H 104° (measured here: 0.968 Å, 104.2°)
    assert atoms.get_distances(0, [1, 2]) == pytest.approx([0.968, 0.968], abs=0.01)
    assert atoms.get_angle(1, 0, 2) == pytest.approx(104.2, abs=1.5)


# ---------------------------------------------------------------------------------------------- dynamics
def test_velocity_verlet_conserves_energy(copper_sulfide):
    atoms = _antifluorite()
    atoms.rattle(0.02, seed=11)
    atoms.calc = copper_sulfide
    # thermalize_momenta replaces MaxwellBoltzmannDistribution in newer ASE (same arguments)
    thermalize = getattr(velocitydistribution, "thermalize_momenta",
                         velocitydistribution.MaxwellBoltzmannDistribution)
    thermalize(atoms, temperature_K=300.0, rng=np.random.default_rng(0))
    Stationary(atoms)
    total, kinetic = [], []

    def record():
        total.append(atoms.get_total_energy())
        kinetic.append(atoms.get_kinetic_energy())

    dynamics = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    dynamics.attach(record, interval=1)
    dynamics.run(50)
    total, kinetic = np.array(total), np.array(kinetic)
    assert len(total) == 51
    # Energy flows between kinetic and potential (std of KE ~0.02 eV here) while the total stays put: measured
    # max |E - E0| / std(KE) = 3e-4 with this seed (0.5 fs, 50 steps); 2e-3 leaves a factor ~6.
    assert kinetic.std() > 5e-3
    assert np.abs(total - total[0]).max() < 2e-3 * kinetic.std()


# ---------------------------------------------------------------------------------------------- phonopy
def _gamma_phonons(atoms: Atoms, calc, primitive: str, supercell=(1, 1, 1)):
    """(raw force constants, symmetrized, Γ frequencies in THz after symmetrization) via phonopy's API."""
    from phonopy import Phonopy
    from phonopy.structure.atoms import PhonopyAtoms

    unitcell = PhonopyAtoms(symbols=atoms.get_chemical_symbols(), cell=atoms.cell.array,
                            scaled_positions=atoms.get_scaled_positions())
    phonon = Phonopy(unitcell, supercell_matrix=np.diag(supercell), primitive_matrix=primitive)
    phonon.generate_displacements(distance=0.01, is_plusminus=True)  # central differences
    forces = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for cell in phonon.supercells_with_displacements:
            displaced = Atoms(cell.symbols, cell=cell.cell, scaled_positions=cell.scaled_positions, pbc=True)
            displaced.calc = calc
            forces.append(displaced.get_forces().copy())
    phonon.forces = np.array(forces)
    phonon.produce_force_constants(show_drift=False)
    raw = phonon.force_constants.copy()
    phonon.symmetrize_force_constants(show_drift=False)
    result = phonon.run_qpoints([[0.0, 0.0, 0.0]])
    # phonopy >= 2.2x returns the result; older versions keep it on the object
    frequencies = result.frequencies[0] if result is not None else phonon.get_qpoints_dict()["frequencies"][0]
    return raw, phonon.force_constants, np.sort(frequencies)


def test_phonopy_gamma_phonons_of_copper_sulfide(copper_sulfide):
    raw, symmetrized, frequencies = _gamma_phonons(_antifluorite(), copper_sulfide, primitive="F")
    # Translation invariance holds in the raw force constants (each force set sums to zero), and the force
    # constants are symmetric, Phi_ij^ab = Phi_ji^ba, to the finite-difference error (measured 6e-6 relative).
    assert np.abs(raw.sum(axis=1)).max() < 1e-10
    scale = np.abs(raw).max()
    assert np.abs(raw - raw.transpose(1, 0, 3, 2)).max() < 1e-4 * scale
    assert np.allclose(symmetrized, symmetrized.transpose(1, 0, 3, 2), atol=1e-12 * scale)
    # primitive cell Cu2S: 9 modes; 3 acoustic at 0, the optical T2g/T1u triplets real (measured 3.11, 3.49 THz)
    assert len(frequencies) == 9
    assert np.abs(frequencies[:3]).max() < 0.1
    assert frequencies[3:].min() > 1.0
    assert frequencies[3:6] == pytest.approx([3.113] * 3, abs=0.01)
    assert frequencies[6:] == pytest.approx([3.488] * 3, abs=0.01)


def test_phonopy_vibrations_of_a_relaxed_water_molecule(water_molecule):
    molecule, calc = water_molecule
    atoms = molecule.copy()
    _, _, converged = _relax(atoms, calc, fmax=1e-3)
    assert converged
    raw, _, frequencies = _gamma_phonons(atoms, calc, primitive="P")
    assert np.abs(raw.sum(axis=1)).max() < 1e-10
    assert len(frequencies) == 9
    # 3 translations (zero), 3 free rotations (zero in theory; measured |f| 0.55-1.03 THz from the finite
    # differences and the residual forces), then bend and the two stretches, all real. Gas-phase experiment:
    # 1595, 3657, 3756 cm^-1; this potential (measured): 1553, 3693, 3773 cm^-1.
    translations_and_rotations = frequencies[np.argsort(np.abs(frequencies))[:6]]
    assert np.sort(np.abs(translations_and_rotations))[:3].max() < 0.1
    assert np.abs(translations_and_rotations).max() < 2.0
    vibrations = frequencies[-3:] / THZ_PER_CM
    assert vibrations == pytest.approx([1595, 3657, 3756], rel=0.05)
