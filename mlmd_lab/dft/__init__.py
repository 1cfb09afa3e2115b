"""Structures and first-principles labels for training data.

- :mod:`mlmd_lab.dft.generators`: structure generators (rattle, strain and volume scans, supercells, vacancies,
  substitutions, MD snapshots) that record their provenance in ``atoms.info["generator"]``, and de-duplication;
- :mod:`mlmd_lab.dft.recipes`: calculation recipes (Quantum ESPRESSO, VASP, PySCF) that run each structure in its
  own folder, record their full settings, and return the file ``db.ingest`` reads.

Heavy engines (PySCF, ASE calculators) are imported only when a calculation runs.
"""

from mlmd_lab.dft.generators import (
    deduplicate,
    distance_fingerprint,
    fingerprint_distance,
    md_snapshots,
    rattle,
    strain_scan,
    substitutions,
    supercell,
    vacancies,
    volume_scan,
)
from mlmd_lab.dft.recipes import (
    RECORD_NAME,
    CalculatorRecipe,
    PySCF,
    QuantumEspresso,
    Recipe,
    Vasp,
    default_recipe,
    file_sha256,
    ingest_settings,
    kpoint_grid,
    qe_pseudopotentials,
)

__all__ = [
    "RECORD_NAME",
    "CalculatorRecipe",
    "PySCF",
    "QuantumEspresso",
    "Recipe",
    "Vasp",
    "deduplicate",
    "default_recipe",
    "distance_fingerprint",
    "file_sha256",
    "fingerprint_distance",
    "ingest_settings",
    "kpoint_grid",
    "md_snapshots",
    "qe_pseudopotentials",
    "rattle",
    "strain_scan",
    "substitutions",
    "supercell",
    "vacancies",
    "volume_scan",
]
