"""A reasonable recipe for a structure on this machine (:func:`default_recipe`)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ase import Atoms

from mlmd_lab.dft.recipes.base import Recipe
from mlmd_lab.dft.recipes.espresso import QE_PSEUDO_DIR, QuantumEspresso, _upf_info, qe_pseudopotentials
from mlmd_lab.dft.recipes.pyscf import PySCF
from mlmd_lab.errors import MLMDError


def default_recipe(atoms: Atoms, pseudo_dir: str | os.PathLike = QE_PSEUDO_DIR) -> Recipe:
    """A reasonable recipe for a structure on this machine (check and adapt the settings for production):

    - molecules (no periodic direction): :class:`PySCF` (RKS PBE/def2-SVP, all-electron; UKS when the electron
      count is odd);
    - periodic cells, when ``pw.x`` is on PATH and ``pseudo_dir`` has a PBE UPF for every element:
      :class:`QuantumEspresso` (40 Ry, 8 × that for the density with ultrasoft/PAW pseudopotentials,
      k-spacing 0.25 Å⁻¹, Marzari-Vanderbilt 0.01 Ry) — plane waves, fast k-points, stress included;
    - other periodic cells: :class:`PySCF` at Γ (GTH-DZVP, GTH-PBE, 40 Ha) with stress (k-point code): only sensible
      for cells large enough for Γ sampling and small enough for PySCF (tens of atoms).
    """
    if not atoms.pbc.any():
        n_electrons = int(atoms.numbers.sum())
        return PySCF(method="UKS" if n_electrons % 2 else "RKS", spin=n_electrons % 2)
    if shutil.which("pw.x"):
        try:
            pps = qe_pseudopotentials(atoms.get_chemical_symbols(), pseudo_dir)
        except MLMDError:
            pps = None
        if pps:
            types = {_upf_info(Path(pseudo_dir) / f).get("type") for f in pps.values()}
            hard = bool(types & {"US", "PAW"})
            return QuantumEspresso(pseudo_dir=pseudo_dir, pseudopotentials=pps, ecutwfc_ry=40.0,
                                   ecutrho_ry=320.0 if hard else None)
    return PySCF(stress=True)
