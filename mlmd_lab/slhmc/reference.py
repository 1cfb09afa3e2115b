"""The reference (first-principles) energy of a proposal: an ASE calculator, or a DFT recipe via the labeller.

A call returns a dict: energy (eV), forces (N, 3) eV/Å, stress (6,) eV/Å³ (periodic cells, where the reference
gives one), failed (bool), error (str), cached (answered from the workdir without calculating). A failure — an
exception, a non-finite energy, a DFT run that did not converge — is returned, never raised: the chain rejects
the trial and records it.
"""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.calculators.calculator import PropertyNotImplementedError

from mlmd_lab.errors import MLMDError


class Reference:
    """Calls ``reference`` (an ASE calculator or an :mod:`mlmd_lab.dft` recipe) and keeps every result."""

    def __init__(self, reference, *, db, cluster, store, run_id: str) -> None:
        from mlmd_lab.dft.recipes import Recipe

        self.is_recipe = isinstance(reference, Recipe)
        if not self.is_recipe and not hasattr(reference, "get_potential_energy"):
            raise MLMDError(f"reference must be an ASE calculator or an mlmd_lab.dft recipe, not "
                            f"{type(reference).__name__}")
        if self.is_recipe and db is None:
            raise MLMDError("a DFT recipe as reference needs db= (every DFT result lands in the teacher-data "
                            "database, whose ledger also keeps a resumed run from repeating a calculation)")
        self.reference, self.db, self.cluster, self.store, self.run_id = reference, db, cluster, store, run_id

    def __call__(self, atoms: Atoms, trial: int) -> dict:
        cached = self.store.cached_reference(trial, atoms)
        if cached is not None:
            return cached
        result = self._label(atoms, trial) if self.is_recipe else _calculate(self.reference, atoms)
        self.store.add_reference(trial, atoms, result)
        return dict(result, cached=False)

    def decided(self, result: dict, accepted: bool) -> None:
        """Tag the database frames of a DFT result "accepted" or "rejected" (recipes only)."""
        if self.is_recipe and result.get("frame_ids"):
            self.db.tag(result["frame_ids"], "accepted" if accepted else "rejected")

    def _label(self, atoms: Atoms, trial: int) -> dict:
        from mlmd_lab.dft.label import LEDGER, label

        structure = atoms.copy()
        structure.set_constraint()
        structure.info["generator"] = {"name": "slhmc", "run_id": self.run_id, "trial": int(trial)}
        tags = ["slhmc", f"slhmc-{self.run_id}", f"trial-{trial}"]
        workdir = (self.store.workdir / "dft") if self.store.workdir is not None else "slhmc-dft"
        try:
            report = label([structure], self.reference, self.cluster, self.db, workdir=workdir, tags=tags,
                           retries=0, progress=False)
        except Exception as exc:  # the labeller itself failed (database, cluster): a failed trial, recorded
            return _failure(exc)
        doc = self.db.mongo[LEDGER].find_one({"_id": report.keys[0]})
        if doc is None or doc.get("status") != "complete":
            return {"energy": float("nan"), "failed": True,
                    "error": (doc or {}).get("error", "the DFT calculation did not complete")}
        return _from_frames(self.db, doc.get("frame_ids", []), len(atoms))


def _failure(exc: BaseException) -> dict:
    return {"energy": float("nan"), "failed": True, "error": f"{type(exc).__name__}: {exc}"[:2000]}


def _calculate(calculator, atoms: Atoms) -> dict:
    work = atoms.copy()
    work.set_constraint()
    work.calc = calculator
    try:
        energy = float(work.get_potential_energy())
        forces = np.array(work.get_forces(), np.float64)
    except Exception as exc:  # any calculator error (SCF not converged, crashed binary) rejects the trial
        return _failure(exc)
    if not np.isfinite(energy) or not np.all(np.isfinite(forces)):
        return {"energy": float("nan"), "failed": True, "error": f"non-finite energy or forces (E = {energy})"}
    out = {"energy": energy, "forces": forces, "failed": False, "error": ""}
    if work.pbc.all() and "stress" in getattr(calculator, "implemented_properties", ()):
        try:
            out["stress"] = np.array(work.get_stress(voigt=True), np.float64)
        except PropertyNotImplementedError:
            pass
    return out


def _from_frames(db, frame_ids, n_atoms: int) -> dict:
    """The energy, forces and stress of the database frame a DFT calculation produced (its last one)."""
    if not frame_ids:
        return {"energy": float("nan"), "failed": True, "error": "the DFT output held no frame"}
    frames = list(db.frames(query={"_id": {"$in": list(frame_ids)}}))
    if not frames:
        return {"energy": float("nan"), "failed": True, "error": "the DFT frame is missing from the database"}
    atoms = frames[-1]
    try:
        energy = float(atoms.get_potential_energy())
        forces = np.array(atoms.get_forces(), np.float64)
    except Exception as exc:
        return _failure(exc)
    out = {"energy": energy, "forces": forces, "failed": not np.isfinite(energy), "error": "",
           "frame_ids": list(frame_ids)}
    try:
        out["stress"] = np.array(atoms.get_stress(voigt=True), np.float64)
    except Exception:  # no stress in the output (molecules, or not requested)
        pass
    return out
