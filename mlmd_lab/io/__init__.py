"""Readers and writers of first-principles outputs and training-data formats.

``detect_format(path)`` recognises a file or folder by name *and* content; ``read(path)`` returns one
:class:`~mlmd_lab.frames.Calculation`. Formats:

=========  ==============================================  ==========================================
format     recognised as                                   units
=========  ==============================================  ==========================================
vasp       ``*vasprun*.xml`` (also ``.gz``)                VASP's, converted by ASE (eV, Å, eV/Å³)
qe         pw.x output (``*.out``, ``*.pwo``, ``*.log``     Ry/Bohr in the file, converted by ASE
           that start like one), input beside it read
extxyz     ``*.xyz``, ``*.extxyz``                         eV/Å unless ``units`` says otherwise
n2p2       ``input.data*``                                 none in the file: ``units`` is required
deepmd     folder with ``type.raw`` and ``set.*/``          eV/Å unless ``units`` says otherwise
=========  ==============================================  ==========================================
"""

from __future__ import annotations

import gzip
import os
import re
from pathlib import Path
from typing import TextIO

from mlmd_lab.errors import InputFileError
from mlmd_lab.frames import Calculation
from mlmd_lab.units import energy_factor, length_factor, parse_units

FORMATS = ("vasp", "qe", "extxyz", "n2p2", "deepmd")
_QE_SUFFIXES = (".out", ".pwo", ".log", ".out.gz", ".pwo.gz")
_HEAD_BYTES = 8192


def read_head(path: str | os.PathLike, size: int = _HEAD_BYTES) -> bytes:
    """The first ``size`` bytes of a file, decompressed if it is gzip (b"" for unreadable files)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(size)
        if head[:2] == b"\x1f\x8b":
            with gzip.open(path, "rb") as fh:
                head = fh.read(size)
        return head
    except (OSError, EOFError):
        return b""


#: The fix named for a file that is empty, truncated or corrupt.
FIX_RECOPY = "re-copy the file from the run directory"


def require_file(path: str | os.PathLike) -> Path:
    """``path`` as a Path; raises InputFileError if it is not an existing, non-empty file."""
    p = Path(path)
    if not p.is_file():
        raise InputFileError(p, "does not exist or is not a file", "check the path")
    if p.stat().st_size == 0:
        raise InputFileError(p, "is empty (0 bytes)", FIX_RECOPY)
    return p


def open_text(path: str | os.PathLike) -> TextIO:
    """``path`` opened as UTF-8 text; InputFileError naming it when it cannot be opened."""
    try:
        return open(path, encoding="utf-8")
    except OSError as exc:
        raise InputFileError(path, f"cannot open: {exc.strerror or exc}", "check the path") from None


def describe_content(head: bytes) -> str:
    """A few words on what bytes look like, for 'this file is not what its name says' messages."""
    if not head:
        return "an empty file"
    for magic, what in ((b"\x89PNG", "a PNG image"), (b"%PDF", "a PDF document"), (b"PK\x03\x04", "a zip archive")):
        if head.startswith(magic):
            return what
    if b"Program PWSCF" in head:
        return "a Quantum ESPRESSO pw.x output"
    if b"<modeling" in head:
        return "a VASP vasprun.xml"
    if re.search(rb"[\x00-\x08\x0e-\x1f]", head[:4096]):
        return "binary (non-text) data"
    xml = head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<")
    try:
        head[:4096].decode("utf-8")
    except UnicodeDecodeError:
        if not xml:
            return "non-UTF-8 binary data"
    return "an XML document of another kind" if xml else "text of another kind"


def detect_format(path: str | os.PathLike) -> str | None:
    """Format name for a file or folder mlmd_lab can ingest, or None if it is not one of :data:`FORMATS`.

    Names decide for specific names (``vasprun*.xml``, ``input.data*``, ``*.xyz``); generic names
    (``*.out``, ``*.log``) count only if the content starts like a pw.x output.
    """
    p = Path(path)
    if p.is_dir():
        from mlmd_lab.io.deepmd import is_deepmd_dir

        return "deepmd" if is_deepmd_dir(p) else None
    name = p.name.lower()
    if "vasprun" in name and (name.endswith(".xml") or name.endswith(".xml.gz")):
        return "vasp"
    if name.startswith("input.data"):
        return "n2p2"
    if name.endswith((".xyz", ".extxyz", ".xyz.gz", ".extxyz.gz")):
        return "extxyz"
    if name.endswith(_QE_SUFFIXES):
        from mlmd_lab.io.espresso import is_pw_output

        return "qe" if is_pw_output(read_head(p)) else None
    return None


def read(
    path: str | os.PathLike,
    format: str | None = None,
    *,
    units: str | tuple[str, str] | None = None,
    last_only: bool = False,
    allow_unfinished: bool = False,
    keys: dict[str, str] | None = None,
) -> Calculation:
    """Read one file or DeePMD folder into a :class:`Calculation` (frames in eV, Å, eV/Å, eV/Å³).

    Args:
        path: the file or folder.
        format: one of :data:`FORMATS`; detected when None.
        units: ``(energy, length)`` unit names of formats without units, e.g. ``("Ha", "Bohr")``;
            required for n2p2, ignored for VASP and QE (their units are known).
        last_only: keep only the last ionic step of a run.
        allow_unfinished: return the complete ionic steps of a run that stopped early (default: error).
        keys: extxyz only (ignored for other formats): which column holds a label, e.g.
            ``{"forces": "REF_forces"}``, for files with two differing columns of one label (see
            :mod:`mlmd_lab.io.extxyz` for the spellings recognised without it).

    Raises:
        InputFileError: the file is empty, corrupt, truncated, has no forces, or is not what its name says.
    """
    p = Path(path)
    fmt = format or detect_format(p)
    if fmt is None:
        raise InputFileError(p, f"not a recognised input ({describe_content(read_head(p))})",
                             f"name it like one of {', '.join(FORMATS)} or pass format=")
    if not p.is_dir():
        require_file(p)
    parsed = parse_units(units)
    if fmt == "vasp":
        from mlmd_lab.io.vasp import read_vasprun

        return read_vasprun(p, last_only=last_only, allow_unfinished=allow_unfinished)
    if fmt == "qe":
        from mlmd_lab.io.espresso import read_pw_output

        return read_pw_output(p, last_only=last_only, allow_unfinished=allow_unfinished)
    frames, code = _read_dataset(p, fmt, parsed, keys)
    if last_only and frames:
        frames = frames[-1:]
    calc = Calculation(code=code, frames=frames, source=str(p))
    if parsed:
        calc.settings["units_in_file"] = {"energy": parsed[0], "length": parsed[1]}
    return calc


def _read_dataset(p: Path, fmt: str, units: tuple[str, str] | None, keys: dict[str, str] | None = None):
    if fmt == "n2p2":
        if units is None:
            raise InputFileError(p, "n2p2 input.data files carry no units",
                                 "state them, e.g. units=('Ha', 'Bohr') or --units Ha,Bohr")
        from mlmd_lab.io.n2p2 import read_input_data

        return read_input_data(p, energy_unit=units[0], length_unit=units[1]), "n2p2"
    energy_unit, length_unit = units or ("eV", "Angstrom")
    if fmt == "deepmd":
        from mlmd_lab.io.deepmd import read_deepmd

        return read_deepmd(p, energy_unit=energy_unit, length_unit=length_unit), "deepmd"
    if fmt == "extxyz":
        from mlmd_lab.io.extxyz import read_extxyz

        frames = read_extxyz(p, keys=keys)
        if units is not None:
            _scale(frames, energy_factor(energy_unit), length_factor(length_unit))
        return frames, "extxyz"
    raise ValueError(f"unknown format {fmt!r}: use one of {FORMATS}")


def _scale(frames, e: float, length: float) -> None:
    """Convert frames read in (energy, length) units to eV/Å in place."""
    for atoms in frames:
        atoms.positions *= length
        atoms.cell.array[:] *= length
        res = atoms.calc.results if atoms.calc is not None else {}
        for key in ("energy", "free_energy"):
            if key in res:
                res[key] = res[key] * e
        if "forces" in res:
            res["forces"] = res["forces"] * (e / length)
        if "stress" in res:
            res["stress"] = res["stress"] * (e / length**3)
