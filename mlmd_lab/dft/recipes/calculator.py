"""An ASE calculator as a recipe (:class:`CalculatorRecipe`): cheap references (EMT, Lennard-Jones, a
machine-learned potential standing in for DFT) labelled through the same :func:`mlmd_lab.dft.label.label` path
as DFT codes (ledger, database, resumability, failures recorded). Writes extxyz (energy eV, forces eV/Å,
stress eV/Å³ for periodic cells).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms

from mlmd_lab.dft.recipes.base import Recipe, _json_default
from mlmd_lab.errors import MLMDError
from mlmd_lab.settings import normalise_signature


class CalculatorRecipe(Recipe):
    """Label structures with an ASE calculator (``code = "ase:<CalculatorClassName>"``).

    Args:
        calculator: an ASE calculator; it must be picklable to run on a dask cluster. Its class name and
            ``parameters`` (``calc.parameters``, JSON-serialised) are the settings: two calculators of the same
            class and parameters give the same task keys in the labelling ledger.

    Each calculation uses a deep copy of the calculator (no state carried from one structure to the next).
    Non-finite energies or forces fail the task.
    """

    name = "ase"
    output_name = "ase.xyz"
    output_needs_settings = True

    def __init__(self, calculator: Any) -> None:
        if not hasattr(calculator, "get_potential_energy") or not hasattr(calculator, "get_forces"):
            raise MLMDError(f"CalculatorRecipe needs an ASE calculator (with get_potential_energy and get_forces), "
                            f"not {type(calculator).__name__}")
        self.calculator = calculator

    @property
    def code(self) -> str:  # type: ignore[override]
        return f"ase:{type(self.calculator).__name__}"

    def _parameters(self) -> dict[str, Any]:
        params = dict(getattr(self.calculator, "parameters", None) or {})
        return json.loads(json.dumps(params, sort_keys=True, default=_parameter_default))

    def settings(self, atoms: Atoms | None = None) -> dict[str, Any]:
        cls = type(self.calculator)
        return {"code": self.code, "calculator": cls.__name__, "module": cls.__module__,
                "parameters": self._parameters()}

    def signature_settings(self, atoms: Atoms | None = None) -> dict[str, Any]:
        return normalise_signature({"code": self.code, "extra": {"calculator": type(self.calculator).__name__,
                                                                 "parameters": self._parameters()}})

    def check(self, atoms: Atoms | None = None) -> None:
        return None  # the calculator is here; errors of a calculation fail that task (recorded)

    def __repr__(self) -> str:
        return f"CalculatorRecipe({type(self.calculator).__name__}, {self._parameters()})"

    def _run(self, atoms: Atoms, folder: Path) -> Path:
        from mlmd_lab.frames import labelled_atoms
        from mlmd_lab.io.extxyz import write_extxyz

        (folder / self.output_name).unlink(missing_ok=True)
        work = atoms.copy()
        work.set_constraint()
        work.calc = copy.deepcopy(self.calculator)
        energy = float(work.get_potential_energy())
        forces = np.asarray(work.get_forces(), np.float64)
        stress = None
        if work.pbc.all() and "stress" in getattr(work.calc, "implemented_properties", ()):
            stress = np.asarray(work.get_stress(voigt=True), np.float64)
        if not (np.isfinite(energy) and np.all(np.isfinite(forces))):
            raise MLMDError(f"{self.code} gave a non-finite energy or forces for {atoms.get_chemical_formula()} "
                            f"(E = {energy}); check the structure (overlapping atoms?)")
        info = {"step": 0, "converged": True, "recipe": self.name, "signature": self.signature_settings(atoms),
                "dft_settings": json.dumps(self.settings(atoms), sort_keys=True, default=_json_default)}
        gen = atoms.info.get("generator")
        if isinstance(gen, dict):
            info["generator"] = gen
            info["provenance"] = json.dumps(gen, sort_keys=True, default=_json_default)
        frame = labelled_atoms(atoms.get_chemical_symbols(), atoms.positions, cell=atoms.cell.array, pbc=atoms.pbc,
                               energy=energy, free_energy=energy, forces=forces, stress=stress, info=info)
        out = folder / self.output_name
        write_extxyz(out, [frame])
        return out


def _parameter_default(obj: Any) -> Any:
    try:
        return _json_default(obj)
    except TypeError:
        return repr(obj)
