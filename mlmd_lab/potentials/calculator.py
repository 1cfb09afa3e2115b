"""ASE calculator for :class:`~mlmd_lab.potentials.model.HDNNP` (eV, Å, eV/Å, eV/Å³).

The neighbour data are built with a skin and reused while they still hold every pair and triplet within the
cutoff — :func:`~mlmd_lab.potentials.neighbours.skin_holds`, the rule of the MD engine: no atom moved more
than half the skin, and under a changing periodic cell (cell filters, ASE's NPT) the cell's compression is
accounted for — and the atoms and periodicity are unchanged, so MD steps only re-run the compiled function.
Capacities are reused across rebuilds, so the function compiles once per system size.
"""

from __future__ import annotations

import numpy as np
from ase.calculators.calculator import Calculator, all_changes

from mlmd_lab.potentials.neighbours import Graph, skin_holds


class HDNNPCalculator(Calculator):
    """Energy, per-atom energies, forces and (periodic cells) stress from an HDNNP.

    ``results["extrapolation"]`` counts, per atom, the symmetry functions outside the training range;
    an :class:`~mlmd_lab.potentials.model.ExtrapolationWarning` is issued when any is non-zero.

    Args:
        model: the potential.
        skin: neighbour-list skin in Å (0 rebuilds every call).
        warn: issue extrapolation warnings.
    """

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress"]

    def __init__(self, model, skin: float = 1.0, warn: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.model = model
        self.skin = float(skin)
        self.warn = warn
        self._graph: Graph | None = None
        self._reference: tuple[np.ndarray, np.ndarray] | None = None  # positions, cell (Å) at the last build
        self._key: tuple | None = None
        self.rebuilds = 0

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        graph = self._current_graph(atoms)
        # Forces and virial always: they cost ~2x the energy and one compiled function serves every request.
        out = self.model.evaluate_graph(graph, forces=True)
        self.results = self.model.results(out, [atoms], forces=True, stress=True, warn=self.warn)[0]

    def _current_graph(self, atoms) -> Graph:
        key = (tuple(atoms.numbers), tuple(atoms.pbc))
        positions, cell = atoms.positions, atoms.cell.array
        if self._graph is not None and key == self._key:
            same_cell = np.array_equal(cell, self._reference[1])
            if (same_cell or atoms.pbc.all()) and skin_holds(positions, cell, *self._reference, self.model.cutoff,
                                                              self.skin, variable_cell=not same_cell):
                lf = self.model.length_factor
                self._graph.positions[: len(atoms)] = positions / lf
                self._graph.cells[0] = cell / lf
                return self._graph
        like = self._graph if self._graph is not None and len(atoms) == int(self._graph.n_real.sum()) else None
        self._graph = self.model.graph([atoms], skin=self.skin, like=like)
        self._reference = (positions.copy(), cell.copy())
        self._key = key
        self.rebuilds += 1
        return self._graph
