"""Which units an n2p2 potential is in: n2p2's files carry none, so they are given, stated, inferred or refused.

:meth:`HDNNP.from_n2p2 <mlmd_lab.potentials.model.HDNNP.from_n2p2>` decides in this order:

1. **given**: ``units=("Ha", "Bohr")`` (or ``energy_unit=`` and ``length_unit=``);
2. **stated** in ``input.nn`` comments: the ``# units: energy eV, length Angstrom`` line mlmd_lab writes,
   or the ``# Energy unit : Ha`` / ``# Length unit : Bohr`` lines of n2p2's example potentials. Given units
   that contradict stated ones are an error (one of the two is wrong);
3. **inferred** from the reference data beside the potential (``input.data``, ``input.data.*``), among
   :data:`CANDIDATES`, when the evidence singles one out:

   - the length unit from the geometry: the median over atoms of (nearest-neighbour distance) / (sum of the
     two covalent radii, :data:`ase.data.covalent_radii`) is near 1 for real structures (0.94 for n2p2's
     Cu2S, 1.04 for its water, read in their units). A length unit is plausible when this ratio, in Å, lies
     in :data:`PLAUSIBLE_BOND_RATIO`; Å and Bohr differ by a factor 1.89, so at most one is;
   - the energy unit: the candidates with that length unit. Only eV goes with Å; Bohr leaves Ha and Ry,
     which no data can tell apart (the potential and its data share whatever unit they are in), so it is
     refused, naming both;
   - the data must be the potential's: its predicted energies (model and data both in the files' units)
     must match the reference energies to :data:`MATCH_RELATIVE` of their size (a data set converted to other
     units, or of another system, is no evidence);

   the inference is announced with a :class:`UnitsInferredWarning`;
4. otherwise **refused** with a :class:`~mlmd_lab.errors.UnitsError` saying how to pass them.

The decision is recorded in the model's ``metadata["n2p2_units"]`` (``energy``, ``length``, ``source``,
``evidence``).
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.data import covalent_radii
from ase.neighborlist import neighbor_list

from mlmd_lab.errors import InputFileError, UnitsError
from mlmd_lab.units import ENERGY_UNITS, LENGTH_UNITS, energy_factor, length_factor, parse_units

#: Unit systems an inference chooses from: (energy, length). Others must be given.
CANDIDATES: tuple[tuple[str, str], ...] = (("eV", "Angstrom"), ("Ha", "Bohr"), ("Ry", "Bohr"))
#: Range of the median nearest-neighbour distance / covalent-radius sum (in Å) taken as real geometry. Its
#: ends are near the geometric midpoints to the ratios Å-read-as-Bohr and Bohr-read-as-Å give (1.89×).
PLAUSIBLE_BOND_RATIO = (0.75, 1.35)
#: Largest |predicted − reference| / |reference| energy of a structure for the data to count as the potential's.
MATCH_RELATIVE = 1e-3
#: Structures read from a data file for the inference (the file may be a whole training set), and of those
#: the smallest evaluated by the potential.
MAX_STRUCTURES, MAX_EVALUATED = 20, 3
_HOW = "pass them, e.g. HDNNP.from_n2p2(path, units=('Ha', 'Bohr')) or units=('eV', 'Angstrom')"


class UnitsInferredWarning(UserWarning):
    """The units of an n2p2 potential were inferred from the data beside it (check the evidence)."""


@dataclass(frozen=True)
class UnitsDecision:
    """The units of a potential and why: ``source`` is "given", "stated", or "inferred"."""

    energy: str
    length: str
    source: str
    evidence: str

    def record(self) -> dict[str, str]:
        """JSON-serialisable provenance (``metadata["n2p2_units"]``)."""
        return {"energy": self.energy, "length": self.length, "source": self.source, "evidence": self.evidence}


def stated_units(input_nn: str | Path) -> tuple[str, str, str] | None:
    """``(energy, length, where)`` stated in ``input.nn`` comments, or None when it states none.

    Recognised: ``# units: energy <E>, length <L>`` (written by mlmd_lab) and the pair ``# Energy unit : <E>``
    / ``# Length unit : <L>`` (n2p2's example potentials); names as in :mod:`mlmd_lab.units`, any case.

    Raises:
        UnitsError: a statement names a unit mlmd_lab does not know, or states only one of the two.
    """
    path = Path(input_nn)
    energy = length = None
    lines = []
    for lineno, raw in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if m := re.match(r"\s*#\s*units:\s*energy\s+(\S+),\s*length\s+(\S+)\s*$", raw):
            energy, length = m.group(1), m.group(2)
            lines.append(lineno)
        elif m := re.match(r"\s*#\s*energy unit\s*:\s*(\S+)", raw, flags=re.I):
            energy = m.group(1)
            lines.append(lineno)
        elif m := re.match(r"\s*#\s*length unit\s*:\s*(\S+)", raw, flags=re.I):
            length = m.group(1)
            lines.append(lineno)
    if energy is None and length is None:
        return None
    where = f"{path} (comment line{'s' if len(lines) > 1 else ''} {', '.join(map(str, lines))})"
    if energy is None or length is None:
        raise UnitsError(f"{where} states only the {'length' if energy is None else 'energy'} unit; {_HOW}")
    return _known(energy, ENERGY_UNITS, "energy", where), _known(length, LENGTH_UNITS, "length", where), where


def _known(name: str, table: dict[str, float], kind: str, where: str) -> str:
    for known in table:
        if known.lower() == name.lower():
            return known
    raise UnitsError(f"{where} states the {kind} unit {name!r}, which mlmd_lab does not know "
                     f"({', '.join(table)}); {_HOW}")


def _same(a: tuple[str, str], b: tuple[str, str]) -> bool:
    return math.isclose(energy_factor(a[0]), energy_factor(b[0]), rel_tol=1e-9) and math.isclose(
        length_factor(a[1]), length_factor(b[1]), rel_tol=1e-9)


def resolve_units(folder: str | Path, model: Any, units: str | tuple[str, str] | None = None,
                  energy_unit: str | None = None, length_unit: str | None = None) -> UnitsDecision:
    """Decide the units of the n2p2 potential in ``folder`` (see the module docstring for the rules).

    Args:
        folder: the potential's folder (``input.nn`` and possibly ``input.data*``).
        model: the potential read with unit factors 1 (energy unit "eV", length unit "Angstrom"), so that
            it evaluates structures in the files' own units; used only for an inference.
        units, energy_unit, length_unit: what the caller gave (``units`` or both names, or nothing).

    Raises:
        UnitsError: units half given, given units contradict stated ones, or none given, stated or inferable.
    """
    folder = Path(folder)
    given = _given(units, energy_unit, length_unit)
    stated = stated_units(folder / "input.nn") if (folder / "input.nn").is_file() else None
    if given is not None:
        if stated is not None and not _same(given, stated[:2]):
            raise UnitsError(f"units {given} were given, but {stated[2]} states energy {stated[0]}, length "
                             f"{stated[1]}; pass the potential's real units, or correct the comment if it is wrong")
        return UnitsDecision(given[0], given[1], "given", "passed by the caller")
    if stated is not None:
        return UnitsDecision(stated[0], stated[1], "stated", f"stated in {stated[2]}")
    decision = _infer(folder, model)
    warnings.warn(f"{folder}: n2p2 files carry no units; using energy {decision.energy}, length "
                  f"{decision.length}, inferred: {decision.evidence}. Pass units= to say so explicitly.",
                  UnitsInferredWarning, stacklevel=3)
    return decision


def _given(units, energy_unit, length_unit) -> tuple[str, str] | None:
    if units is not None:
        parsed = parse_units(units)
        if energy_unit is not None or length_unit is not None:
            named = parse_units((energy_unit or parsed[0], length_unit or parsed[1]))
            if not _same(parsed, named):
                raise UnitsError(f"units={parsed} and energy_unit={energy_unit!r}, length_unit={length_unit!r} "
                                 "disagree; give units= only")
        return parsed
    if energy_unit is None and length_unit is None:
        return None
    if energy_unit is None or length_unit is None:
        raise UnitsError(f"give both the energy and the length unit (got energy_unit={energy_unit!r}, "
                         f"length_unit={length_unit!r}), e.g. units=('Ha', 'Bohr')")
    return parse_units((energy_unit, length_unit))


def data_files(folder: Path) -> list[Path]:
    """The n2p2 data files beside a potential: ``input.data`` first, then ``input.data.*`` by name."""
    first = [folder / "input.data"] if (folder / "input.data").is_file() else []
    return first + sorted(p for p in folder.glob("input.data.*") if p.is_file())


def _infer(folder: Path, model: Any) -> UnitsDecision:
    from mlmd_lab.io.n2p2 import iter_input_data

    files = data_files(folder)
    if not files:
        raise UnitsError(f"{folder}: n2p2 files carry no units, input.nn states none and there is no input.data "
                         f"beside the potential to infer them from; {_HOW}")
    path, frames, problems = None, [], []
    for candidate in files:
        try:
            frames = []
            for atoms in iter_input_data(candidate, "eV", "Angstrom"):  # factors 1: the file's own numbers
                frames.append(atoms)
                if len(frames) == MAX_STRUCTURES:
                    break
        except InputFileError as err:
            problems.append(str(err))
            continue
        if frames:
            path = candidate
            break
    if path is None:
        raise UnitsError(f"{folder}: n2p2 files carry no units, and the data beside the potential cannot be "
                         f"read to infer them ({'; '.join(problems)}); {_HOW}")
    ratio = bond_ratio(frames)
    lengths = sorted({length for _, length in CANDIDATES},
                     key=lambda name: abs(math.log(ratio * length_factor(name))))
    plausible = [name for name in lengths
                 if PLAUSIBLE_BOND_RATIO[0] <= ratio * length_factor(name) <= PLAUSIBLE_BOND_RATIO[1]]
    geometry = (f"in {path.name} the median nearest-neighbour distance is {ratio:.3g} covalent-radius sums in the "
                "file's length unit")
    if len(plausible) != 1:
        raise UnitsError(f"{folder}: n2p2 files carry no units, and they cannot be inferred: {geometry}, which "
                         f"fits {'none' if not plausible else ' and '.join(plausible)} of {lengths}; {_HOW}")
    length = plausible[0]
    energies = [energy for energy, unit in CANDIDATES if unit == length]
    geometry += f" ({ratio * length_factor(length):.3g} in Å if it is {length})"
    if len(energies) != 1:
        raise UnitsError(f"{folder}: n2p2 files carry no units; the data beside the potential say the length unit "
                         f"is {length} ({geometry}), but no data can tell the energy unit ({' or '.join(energies)}): "
                         f"pass them, e.g. HDNNP.from_n2p2(path, units=({energies[0]!r}, {length!r}))")
    match = _match(model, frames, path)
    return UnitsDecision(energies[0], length, "inferred", f"{geometry}; {match}")


def bond_ratio(frames: list[Atoms]) -> float:
    """Median over all atoms of (nearest-neighbour distance) / (covalent radius sum, Å), distances as stored."""
    ratios = []
    for atoms in frames:
        if len(atoms) < 2:
            continue
        cutoff = 4.0 * float(np.max(covalent_radii[atoms.numbers])) * 2.0
        i, j, d = neighbor_list("ijd", atoms, cutoff)
        while len(set(i)) < len(atoms) and cutoff < 64.0:
            cutoff *= 2.0
            i, j, d = neighbor_list("ijd", atoms, cutoff)
        nearest = np.full(len(atoms), np.inf)
        partner = np.zeros(len(atoms), dtype=int)
        order = np.lexsort((d, i))  # by atom, then distance: the first of each atom is its nearest neighbour
        first = order[np.r_[True, i[order][1:] != i[order][:-1]]] if len(order) else order
        nearest[i[first]] = d[first]
        partner[i[first]] = j[first]
        have = np.isfinite(nearest)
        z = atoms.numbers
        ratios.append(nearest[have] / (covalent_radii[z[have]] + covalent_radii[z[partner[have]]]))
    if not ratios or not sum(len(r) for r in ratios):
        return float("nan")
    return float(np.median(np.concatenate(ratios)))


def _match(model: Any, frames: list[Atoms], path: Path) -> str:
    """Check the potential reproduces the data's reference energies (both in the files' units); describe it."""
    chosen = sorted(frames, key=len)[:MAX_EVALUATED]
    out = model.evaluate_graph(model.graph(chosen), forces=False)
    predicted = np.asarray(out["energy"], dtype=float)[: len(chosen)]
    reference = np.array([a.get_potential_energy() for a in chosen])
    relative = np.abs(predicted - reference) / np.maximum(np.abs(reference), 1e-300)
    worst = float(relative.max())
    if not worst <= MATCH_RELATIVE:
        raise UnitsError(f"{path.parent}: n2p2 files carry no units, and they cannot be inferred: the potential "
                         f"does not reproduce the energies of {path.name} (relative difference up to {worst:.2g} on "
                         f"{len(chosen)} structure(s)), so the data may be in other units or of another system; "
                         f"{_HOW}")
    return (f"the potential reproduces the energies of {len(chosen)} structure(s) of {path.name} to a relative "
            f"{worst:.1g}, so they share its units")
