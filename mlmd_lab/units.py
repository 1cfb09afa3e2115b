"""Unit names and conversion factors to mlmd_lab's internal units (ASE's: eV, Å, eV/Å, eV/Å³).

Formats without units (n2p2 ``input.data``, some extxyz and DeePMD sets) are converted at the
boundary with the factors here; the caller names the units, nothing is guessed (an n2p2 potential
without them: :mod:`mlmd_lab.potentials.n2p2_units` uses stated ones, or infers them only from clear evidence).
"""

from __future__ import annotations

from ase import units as _u

from mlmd_lab.errors import UnitsError

#: eV per unit of energy.
ENERGY_UNITS: dict[str, float] = {
    "eV": 1.0,
    "meV": 1e-3,
    "Ha": _u.Hartree,
    "Hartree": _u.Hartree,
    "Ry": _u.Rydberg,
    "Rydberg": _u.Rydberg,
    "kcal/mol": _u.kcal / _u.mol,
    "kJ/mol": _u.kJ / _u.mol,
}

#: Å per unit of length.
LENGTH_UNITS: dict[str, float] = {
    "Angstrom": 1.0,
    "Å": 1.0,
    "A": 1.0,
    "Ang": 1.0,
    "Bohr": _u.Bohr,
    "bohr": _u.Bohr,
    "nm": 10.0,
}


def _lookup(table: dict[str, float], unit: str, kind: str) -> float:
    try:
        return table[unit]
    except (KeyError, TypeError):
        known = ", ".join(sorted(table))
        raise UnitsError(f"unknown {kind} unit {unit!r}: use one of {known}") from None


def energy_factor(unit: str) -> float:
    """Return the number of eV in one ``unit`` (e.g. ``energy_factor("Ha") == 27.211...``)."""
    return _lookup(ENERGY_UNITS, unit, "energy")


def length_factor(unit: str) -> float:
    """Return the number of Å in one ``unit`` (e.g. ``length_factor("Bohr") == 0.529...``)."""
    return _lookup(LENGTH_UNITS, unit, "length")


def parse_units(units: str | tuple[str, str] | None) -> tuple[str, str] | None:
    """Normalise a units spec: ``"Ha,Bohr"``, ``("Ha", "Bohr")`` or None → ``(energy, length)``.

    Both names are validated; raises :class:`UnitsError` naming the accepted names.
    """
    if units is None:
        return None
    if isinstance(units, str):
        parts = [p.strip() for p in units.split(",")] if "," in units else units.split()
    else:
        parts = list(units)
    if len(parts) != 2:
        raise UnitsError(f"units {units!r} must name an energy and a length unit, e.g. 'Ha,Bohr' or 'eV,Angstrom'")
    energy_factor(parts[0])
    length_factor(parts[1])
    return parts[0], parts[1]
