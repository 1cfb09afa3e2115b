"""DFT calculation recipes: one object per set of settings, running each calculation in its own folder.

One module per code on a shared base: :mod:`~mlmd_lab.dft.recipes.base` (:class:`Recipe`, helpers),
:mod:`~mlmd_lab.dft.recipes.espresso`, :mod:`~mlmd_lab.dft.recipes.vasp`, :mod:`~mlmd_lab.dft.recipes.pyscf`,
:mod:`~mlmd_lab.dft.recipes.default`; every name is importable from here as before.

A :class:`Recipe` knows its full settings (:meth:`~Recipe.settings`, JSON-serialisable: code, version, functional,
cutoffs, k-points, smearing, pseudopotential files with SHA-256 sums, command) and the part the database compares
(:meth:`~Recipe.signature_settings`, keys of :data:`mlmd_lab.settings.SIGNATURE_KEYS`, eV and Å⁻¹).
:meth:`~Recipe.calculate` runs one structure in a folder and returns the file that ``db.ingest`` reads:

==================  ==========================================  =====================================================
recipe              output (``calculate`` returns)              settings in the database
==================  ==========================================  =====================================================
QuantumEspresso     ``espresso.pwo`` (pw.x output; the input     read by :mod:`mlmd_lab.io.espresso` from the output
                    ``espresso.pwi`` beside it)                  and input: ``db.ingest(path)``
Vasp                ``vasprun.xml``                             read by :mod:`mlmd_lab.io.vasp`: ``db.ingest(path)``
PySCF               ``pyscf.xyz`` (extxyz: energy eV, forces     frames carry ``info["signature"]`` (used per frame by
                    eV/Å, stress eV/Å³, ASE sign)               the ingest); give the calculation's signature with
                                                                ``db.ingest(path, settings=ingest_settings(path))``
==================  ==========================================  =====================================================

So for any recipe: ``out = recipe.calculate(atoms, folder); db.ingest(out, settings=ingest_settings(out))``
(:func:`ingest_settings` returns None where the file itself holds the settings).

Every folder also gets ``mlmd_recipe.json`` (ignored by the ingest): the recipe name, its full settings and
signature, the input structure's content hash and ``info["generator"]`` provenance, the status and wall time.
Calling ``calculate`` again on a folder whose record shows the same structure and settings completed returns the
existing output without running again; a folder holding a different calculation is refused unless
``overwrite=True``.

Units: ASE's (eV, Å, eV/Å, eV/Å³) everywhere, except the parameters named after a code's own unit
(``ecutwfc_ry``, ``degauss`` in Ry; PySCF ``ke_cutoff`` in Hartree, as ``pyscf.pbc.gto.Cell.ke_cutoff``).
"""

# The private names stay importable from here: mlmd_lab.dft.label and the tests use them.
from mlmd_lab.dft.recipes.base import (
    RECORD_NAME,
    Recipe,
    _linked_mpi,  # noqa: F401
    _settings_hash,  # noqa: F401
    _structure_hash,  # noqa: F401
    file_sha256,
    ingest_settings,
    kpoint_grid,
)
from mlmd_lab.dft.recipes.calculator import CalculatorRecipe
from mlmd_lab.dft.recipes.default import default_recipe
from mlmd_lab.dft.recipes.espresso import QE_PSEUDO_DIR, QuantumEspresso, qe_pseudopotentials  # noqa: F401
from mlmd_lab.dft.recipes.pyscf import PySCF
from mlmd_lab.dft.recipes.vasp import Vasp

__all__ = [
    "RECORD_NAME",
    "CalculatorRecipe",
    "PySCF",
    "QuantumEspresso",
    "Recipe",
    "Vasp",
    "default_recipe",
    "file_sha256",
    "ingest_settings",
    "kpoint_grid",
    "qe_pseudopotentials",
]
