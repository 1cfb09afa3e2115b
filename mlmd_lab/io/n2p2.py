"""n2p2 / RuNNer ``input.data`` files: read and write labelled structures.

The format (https://compphysvienna.github.io/n2p2/topics/cfg_file.html, "input.data") is a sequence of
blocks, one per structure::

    begin
    comment <free text>                                  (optional, any number)
    lattice <ax> <ay> <az>                               (optional: 0 or 3 lines; none = non-periodic)
    lattice <bx> <by> <bz>
    lattice <cx> <cy> <cz>
    atom <x> <y> <z> <element> <charge> <energy> <fx> <fy> <fz>   (one line per atom)
    energy <E>
    charge <Q>                                           (optional here; n2p2 writes it)
    end

Keywords may be indented; the per-atom ``energy`` column is unused by n2p2 (written as 0). Blank lines
and lines starting with ``#`` are skipped. The file carries no units: the caller names them, and values are
converted to eV, Å and eV/Å on reading (atomic and total charges are in elementary charges, unconverted).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.data import atomic_numbers

from mlmd_lab.errors import InputFileError
from mlmd_lab.frames import labelled_atoms, require_labels
from mlmd_lab.io import open_text
from mlmd_lab.units import energy_factor, length_factor

__all__ = ["iter_input_data", "read_input_data", "write_input_data"]

_FIX_FORMAT = (
    "see the n2p2 input.data format: begin / comment / lattice ×3 / atom ... / energy / charge / end"
)


def _float(token: str) -> float:
    try:
        return float(token)
    except ValueError:
        # Fortran double-precision exponent (1.0D-03), as some RuNNer tools write it.
        return float(token.replace("D", "E").replace("d", "e"))


class _Block:
    """Collected lines of one ``begin ... end`` block (raw values, file units)."""

    def __init__(self, start: int) -> None:
        self.start = start
        self.comments: list[str] = []
        self.lattice: list[list[float]] = []
        self.symbols: list[str] = []
        self.positions: list[list[float]] = []
        self.charges: list[float] = []
        self.forces: list[list[float]] = []
        self.energy: float | None = None
        self.charge: float | None = None


def iter_input_data(path: str | Path, energy_unit: str, length_unit: str) -> Iterator[Atoms]:
    """Yield the structures of an n2p2 ``input.data`` file one at a time (constant memory).

    Args:
        path: the ``input.data`` file.
        energy_unit: energy unit of the file (``"eV"``, ``"Ha"``, ... see :mod:`mlmd_lab.units`).
        length_unit: length unit of the file (``"Angstrom"``, ``"Bohr"``, ...).

    Yields:
        Frames in eV / Å: positions (N, 3) Å, cell (3, 3) Å (rows = lattice vectors; pbc all True with
        ``lattice`` lines, all False without), energy eV, forces (N, 3) eV/Å. ``atoms.info``: ``step``
        (0-based structure index in the file), ``comment`` (comment lines joined by newlines, if any),
        ``charge`` (total charge, e, if given); ``atoms.arrays["initial_charges"]``: atomic charges (e).

    Raises:
        InputFileError: unreadable or malformed file; the message gives the line number.
        UnitsError: unknown unit name.
    """
    e_f = energy_factor(energy_unit)
    l_f = length_factor(length_unit)
    f_f = e_f / l_f
    path = Path(path)
    block: _Block | None = None
    index = 0
    lineno = 0
    with open_text(path) as fh:
        try:
            for lineno, line in enumerate(fh, start=1):
                tokens = line.split()
                if not tokens or tokens[0].startswith("#"):
                    continue
                key = tokens[0]
                if block is None:
                    if key != "begin":
                        raise InputFileError(
                            path, f"line {lineno}: expected 'begin', found {key!r}", _FIX_FORMAT
                        )
                    block = _Block(lineno)
                    continue
                if key == "end":
                    yield _finish(path, block, lineno, index, e_f, l_f, f_f)
                    index += 1
                    block = None
                elif key == "atom":
                    _parse_atom(path, block, tokens, lineno)
                elif key == "lattice":
                    if len(tokens) != 4 or len(block.lattice) >= 3 or block.symbols:
                        raise InputFileError(
                            path,
                            f"line {lineno}: bad 'lattice' line (need 3 lines of 'lattice ax ay az' "
                            "before the atoms)",
                            _FIX_FORMAT,
                        )
                    block.lattice.append([_number(path, t, lineno, "lattice") for t in tokens[1:]])
                elif key == "comment":
                    block.comments.append(line.strip()[len("comment") :].strip())
                elif key == "energy":
                    if len(tokens) != 2:
                        raise InputFileError(path, f"line {lineno}: 'energy' needs one value", _FIX_FORMAT)
                    block.energy = _number(path, tokens[1], lineno, "energy")
                elif key == "charge":
                    if len(tokens) != 2:
                        raise InputFileError(path, f"line {lineno}: 'charge' needs one value", _FIX_FORMAT)
                    block.charge = _number(path, tokens[1], lineno, "charge")
                elif key == "begin":
                    raise InputFileError(
                        path,
                        f"line {lineno}: 'begin' before the 'end' of the structure begun at line "
                        f"{block.start}",
                        "the file is truncated or two files were concatenated badly",
                    )
                else:
                    raise InputFileError(path, f"line {lineno}: unknown keyword {key!r}", _FIX_FORMAT)
        except UnicodeDecodeError as exc:
            raise InputFileError(
                path,
                f"not a text file (byte {exc.start} after line {lineno} is not UTF-8)",
                "give an n2p2 input.data file",
            ) from None
    if block is not None:
        raise InputFileError(
            path,
            f"line {lineno}: file ends inside the structure begun at line {block.start} (no 'end')",
            "the file is truncated: regenerate it or delete the incomplete last structure",
        )


def _number(path: Path, token: str, lineno: int, what: str) -> float:
    try:
        return _float(token)
    except ValueError:
        raise InputFileError(
            path, f"line {lineno}: {what} value {token!r} is not a number", _FIX_FORMAT
        ) from None


def _parse_atom(path: Path, block: _Block, tokens: list[str], lineno: int) -> None:
    if len(tokens) != 10:
        raise InputFileError(
            path,
            f"line {lineno}: malformed atom line ({len(tokens) - 1} values, need 9: "
            "x y z element charge energy fx fy fz)",
            _FIX_FORMAT,
        )
    element = tokens[4]
    if element not in atomic_numbers or element == "X":
        raise InputFileError(
            path, f"line {lineno}: unknown element {element!r}", "use element symbols such as H, O, Cu"
        )
    try:
        values = [_float(t) for i, t in enumerate(tokens[1:]) if i != 3]
    except ValueError:
        raise InputFileError(
            path, f"line {lineno}: malformed atom line (non-numeric value)", _FIX_FORMAT
        ) from None
    if len(block.lattice) not in (0, 3):
        raise InputFileError(
            path, f"line {lineno}: {len(block.lattice)} lattice lines, need 0 or 3", _FIX_FORMAT
        )
    block.symbols.append(element)
    block.positions.append(values[0:3])
    block.charges.append(values[3])
    block.forces.append(values[5:8])


def _finish(path: Path, block: _Block, lineno: int, index: int, e_f: float, l_f: float, f_f: float) -> Atoms:
    if not block.symbols:
        raise InputFileError(
            path, f"line {lineno}: structure begun at line {block.start} has no atoms", _FIX_FORMAT
        )
    if block.energy is None:
        raise InputFileError(
            path,
            f"line {lineno}: structure {index} (begun at line {block.start}) has no 'energy' line",
            "add 'energy <E>' before 'end'",
        )
    if len(block.lattice) not in (0, 3):
        raise InputFileError(
            path, f"line {lineno}: {len(block.lattice)} lattice lines, need 0 or 3", _FIX_FORMAT
        )
    periodic = len(block.lattice) == 3
    cell = np.array(block.lattice) * l_f if periodic else None
    info: dict[str, Any] = {"step": index}
    if block.comments:
        info["comment"] = "\n".join(block.comments)
    if block.charge is not None:
        info["charge"] = block.charge
    atoms = labelled_atoms(
        block.symbols,
        np.array(block.positions) * l_f,
        cell=cell,
        pbc=periodic,
        energy=block.energy * e_f,
        forces=np.array(block.forces) * f_f,
        info=info,
    )
    atoms.set_initial_charges(np.array(block.charges, dtype=float))
    # re-attach the results: the calculator's state must include the charges, or ASE discards them
    atoms.calc = SinglePointCalculator(atoms, **atoms.calc.results)
    return atoms


def read_input_data(path: str | Path, energy_unit: str, length_unit: str) -> list[Atoms]:
    """Read all structures of an n2p2 ``input.data`` file; see :func:`iter_input_data` (units, keys)."""
    return list(iter_input_data(path, energy_unit, length_unit))


def write_input_data(
    path: str | Path,
    frames: Iterable[Atoms],
    energy_unit: str = "eV",
    length_unit: str = "Angstrom",
    comment: str | None = None,
) -> int:
    """Write frames to an n2p2 ``input.data`` file in the given units, at full float precision.

    Every frame needs ``energy`` (eV) and ``forces`` (N, 3, eV/Å) results. Periodic frames (pbc all True)
    get ``lattice`` lines, non-periodic ones (pbc all False) none; mixed pbc is refused (n2p2 has none).
    Atomic charges come from ``atoms.arrays["initial_charges"]`` (0 when absent), the total charge from
    ``atoms.info["charge"]`` (else their sum). The comment line is ``comment`` if given, else
    ``atoms.info["comment"]``. Numbers are written with 17 significant digits, so reading back in the
    same units gives the same floats (to one rounding of the unit conversion).

    Returns:
        The number of structures written.

    Raises:
        InputFileError: a frame lacks energy or forces, or has partial periodicity (names the frame).
    """
    e_f = energy_factor(energy_unit)
    l_f = length_factor(length_unit)
    f_f = e_f / l_f
    path = Path(path)
    lines: list[str] = []
    n = 0
    for i, atoms in enumerate(frames):
        res = require_labels(path, i, atoms, "; n2p2 training data need both")
        pbc = np.asarray(atoms.pbc, dtype=bool)
        if pbc.any() and not pbc.all():
            raise InputFileError(
                path,
                f"frame {i} is periodic in some directions only (pbc={pbc.tolist()})",
                "n2p2 supports fully periodic or non-periodic structures: set pbc to all True or all False",
            )
        lines.append("begin")
        text = comment if comment is not None else atoms.info.get("comment")
        if text:
            lines.extend(f"comment {c.strip()}" for c in str(text).splitlines() if c.strip())
        if pbc.all():
            for vec in atoms.cell.array / l_f:
                lines.append("lattice " + " ".join(_fmt(v) for v in vec))
        charges = atoms.get_initial_charges() if "initial_charges" in atoms.arrays else np.zeros(len(atoms))
        positions = atoms.positions / l_f
        forces = np.asarray(res["forces"], dtype=float) / f_f
        for sym, pos, q, f in zip(atoms.get_chemical_symbols(), positions, charges, forces, strict=True):
            lines.append(
                f"atom {_fmt(pos[0])} {_fmt(pos[1])} {_fmt(pos[2])} {sym:<2s} {_fmt(q)} {_fmt(0.0)} "
                f"{_fmt(f[0])} {_fmt(f[1])} {_fmt(f[2])}"
            )
        lines.append(f"energy {_fmt(float(res['energy']) / e_f)}")
        total = atoms.info.get("charge")
        lines.append(f"charge {_fmt(float(total) if total is not None else float(np.sum(charges)))}")
        lines.append("end")
        n += 1
    path.write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")
    return n


def _fmt(value: float) -> str:
    """17 significant digits: enough for an exact float64 round trip."""
    return f"{float(value): .16E}"
