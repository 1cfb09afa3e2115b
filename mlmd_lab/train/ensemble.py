"""Committees of HDNNPs: mean predictions with their spread as an uncertainty.

An :class:`Ensemble` has the model interface the ASE calculator uses (``graph``, ``evaluate_graph``,
``results``, ``predict``, ``calculator``), so it plugs in wherever one potential does. Its members share
the symmetry functions and units (they differ in weights: seeds and data splits), so one neighbour list
serves them all.

Uncertainties (ASE units) in every result:

- ``energy_std``: standard deviation of the members' total energies (eV);
- ``energies_std``: per atom, of the members' atomic energies (eV);
- ``forces_std``: per atom, sqrt(mean over members of |F_m - F_mean|^2) (eV/Å), the usual committee force
  deviation used to pick structures for active learning.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from ase import Atoms

from mlmd_lab.errors import MLMDError
from mlmd_lab.potentials.model import HDNNP
from mlmd_lab.potentials.neighbours import Graph


class Ensemble:
    """A committee of potentials with the same symmetry functions, elements and units.

    Args:
        members: the potentials (at least one).
        metadata: provenance of the committee as a whole (JSON-serialisable).
    """

    def __init__(self, members: Sequence[HDNNP], metadata: dict | None = None) -> None:
        members = list(members)
        if not members:
            raise MLMDError("an ensemble needs at least one member potential")
        first = members[0]
        for k, m in enumerate(members[1:], start=1):
            if (m.elements, m.plan, m.energy_unit, m.length_unit) != (first.elements, first.plan, first.energy_unit,
                                                                     first.length_unit):
                raise MLMDError(f"ensemble member {k} differs from member 0 in elements, symmetry functions or "
                                "units; train members with the same settings (they may differ in seed and split)")
        self.members = members
        self.metadata = dict(metadata or {})

    def __len__(self) -> int:
        return len(self.members)

    def __repr__(self) -> str:
        return f"Ensemble({len(self.members)} x HDNNP of {'-'.join(self.elements)})"

    # The model interface of HDNNPCalculator ------------------------------------------------------------
    @property
    def elements(self) -> tuple[str, ...]:
        return self.members[0].elements

    @property
    def energy_unit(self) -> str:
        return self.members[0].energy_unit

    @property
    def length_unit(self) -> str:
        return self.members[0].length_unit

    @property
    def length_factor(self) -> float:
        return self.members[0].length_factor

    @property
    def energy_factor(self) -> float:
        return self.members[0].energy_factor

    @property
    def cutoff(self) -> float:
        return self.members[0].cutoff

    def graph(self, atoms_list: Sequence[Atoms], skin: float = 0.0, like: Graph | None = None) -> Graph:
        return self.members[0].graph(atoms_list, skin=skin, like=like)

    def evaluate_graph(self, graph: Graph, forces: bool = True) -> dict:
        """Members' mean of every quantity (model units) plus ``energy_std`` (B,), ``atomic_std`` (N,) and,
        with forces, ``forces_std`` (N,)."""
        outs = [m.evaluate_graph(graph, forces=forces) for m in self.members]
        mean = {k: np.mean([o[k] for o in outs], axis=0) for k in outs[0] if k != "extrapolation"}
        mean["extrapolation"] = np.max([o["extrapolation"] for o in outs], axis=0)
        mean["energy_std"] = np.std([o["energy"] for o in outs], axis=0)
        mean["atomic_std"] = np.std([o["atomic"] for o in outs], axis=0)
        if forces:
            dev = np.array([o["forces"] for o in outs]) - mean["forces"]
            mean["forces_std"] = np.sqrt(np.mean(np.sum(dev**2, axis=2), axis=0))
        return mean

    def results(self, out: dict, atoms_list: Sequence[Atoms], forces: bool = True, stress: bool = True,
                warn: bool = True) -> list[dict]:
        results = self.members[0].results(out, atoms_list, forces=forces, stress=stress, warn=warn)
        ef, lf = self.energy_factor, self.length_factor
        start = 0
        for s, (result, atoms) in enumerate(zip(results, atoms_list, strict=True)):
            sl = slice(start, start + len(atoms))
            start += len(atoms)
            result["energy_std"] = float(out["energy_std"][s]) * ef
            result["energies_std"] = out["atomic_std"][sl] * ef
            if forces and "forces_std" in out:
                result["forces_std"] = out["forces_std"][sl] * ef / lf
        return results

    def predict(self, atoms_list: Atoms | Sequence[Atoms], forces: bool = True, stress: bool = True,
                warn: bool = True) -> dict | list[dict]:
        """As :meth:`HDNNP.predict` (one result for one ``Atoms``, a list for a list), with the committee mean
        and ``energy_std``, ``energies_std``, ``forces_std`` (eV, eV, eV/Å)."""
        single = isinstance(atoms_list, Atoms)
        atoms_list = [atoms_list] if single else list(atoms_list)
        out = self.evaluate_graph(self.graph(atoms_list), forces=forces or stress)
        results = self.results(out, atoms_list, forces=forces, stress=stress, warn=warn)
        return results[0] if single else results

    def calculator(self, skin: float = 1.0):
        """An ASE calculator giving the committee mean; the spreads are in ``calc.results``."""
        from mlmd_lab.potentials.calculator import HDNNPCalculator

        return HDNNPCalculator(self, skin=skin)

    def with_dtype(self, dtype: str) -> Ensemble:
        return Ensemble([m.with_dtype(dtype) for m in self.members], self.metadata)

    def to_n2p2(self, path) -> list:
        """Write each member in n2p2 format into ``path/member_K`` (n2p2 evaluates one potential per folder)."""
        from pathlib import Path

        return [m.to_n2p2(Path(path) / f"member_{k}") for k, m in enumerate(self.members)]
