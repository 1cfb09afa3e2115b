"""Labelled structures: ASE ``Atoms`` carrying DFT results, grouped by the calculation they came from.

ASE ``Atoms`` is the interchange type. A *frame* is an ``Atoms`` with a
:class:`~ase.calculators.singlepoint.SinglePointCalculator` holding, in ASE units,

- ``energy`` (eV; the energy extrapolated to zero smearing where the code reports it),
- ``free_energy`` (eV, optional), ``forces`` (eV/Å, shape ``(N, 3)``),
- ``stress`` (eV/Å³, Voigt ``xx yy zz yz xz xy``, ASE sign: positive = tensile), ``magmoms`` (μB, optional),

and ``atoms.info`` keys ``step`` (ionic-step index in its calculation) and, after a database query,
``frame_id``, ``calc_id``, ``source``, ``signature``, ``tags``.

A :class:`Calculation` is what a reader returns for one source: one run (vasprun.xml, pw.x output) or
one data file without run settings (extxyz, n2p2, DeePMD).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

#: Precision of the content hash: values are rounded to these before hashing, so a frame read back from a
#: text export (extxyz, input.data) hashes like the original. Å, eV, eV/Å, eV/Å³.
HASH_DECIMALS = {"positions": 6, "cell": 6, "energy": 6, "forces": 5}


@dataclass
class Calculation:
    """One source calculation and its labelled frames.

    Attributes:
        code: ``"vasp"``, ``"qe"``, ``"extxyz"``, ``"n2p2"``, ``"deepmd"``, ...
        frames: labelled ``Atoms`` (see module docstring), in ionic-step order.
        settings: the run's full settings as JSON-serialisable data (INCAR, KPOINTS, parameters,
            POTCAR titles; QE namelists and cards; ...). Empty when the format has none.
        signature: the normalised settings that decide whether data can be mixed
            (see :func:`mlmd_lab.settings.signature_hash`).
        code_version: program version string, if known.
        source: path of the file or folder read.
        finished: False if the run stopped before its normal end (the frames are the complete steps).
        warnings: things the reader noticed (unconverged SCF steps, dropped steps without forces, ...).
    """

    code: str
    frames: list[Atoms]
    settings: dict[str, Any] = field(default_factory=dict)
    signature: dict[str, Any] = field(default_factory=dict)
    code_version: str | None = None
    source: str | None = None
    finished: bool = True
    warnings: list[str] = field(default_factory=list)


def labelled_atoms(
    symbols: Any,
    positions: Any,
    cell: Any = None,
    pbc: Any = False,
    *,
    energy: float | None = None,
    forces: Any = None,
    stress: Any = None,
    free_energy: float | None = None,
    magmoms: Any = None,
    info: dict[str, Any] | None = None,
) -> Atoms:
    """Build a frame: ``Atoms`` plus a single-point calculator with the given results (ASE units).

    ``stress`` may be Voigt (6,) or a 3×3 matrix (eV/Å³, ASE sign). ``None`` results are left out.
    """
    atoms = Atoms(symbols=symbols, positions=positions, cell=cell, pbc=pbc)
    results: dict[str, Any] = {}
    if energy is not None:
        results["energy"] = float(energy)
    if free_energy is not None:
        results["free_energy"] = float(free_energy)
    if forces is not None:
        results["forces"] = np.asarray(forces, dtype=float).reshape(len(atoms), 3)
    if stress is not None:
        s = np.asarray(stress, dtype=float)
        if s.shape == (3, 3):
            s = s.ravel()[[0, 4, 8, 5, 2, 1]]
        results["stress"] = s.reshape(6)
    if magmoms is not None:
        results["magmoms"] = np.asarray(magmoms, dtype=float)
    atoms.calc = SinglePointCalculator(atoms, **results)
    if info:
        atoms.info.update(info)
    return atoms


def results_of(atoms: Atoms) -> dict[str, Any]:
    """Return the stored results of a frame (empty dict when it has none); never triggers a calculation."""
    calc = atoms.calc
    if calc is None:
        return {}
    return dict(getattr(calc, "results", {}))


def require_labels(path: Any, index: int, atoms: Atoms, why: str = "") -> dict[str, Any]:
    """The results of frame ``index`` of a file being written; InputFileError when energy or forces are missing.

    ``why`` is appended to the problem (e.g. "; n2p2 training data need both").
    """
    from mlmd_lab.errors import InputFileError

    results = results_of(atoms)
    missing = [k for k in ("energy", "forces") if results.get(k) is None]
    if missing:
        raise InputFileError(path, f"frame {index} has no {' or '.join(missing)}{why}",
                             "leave unlabelled frames out or label them first")
    return results


def canonical_json(data: Any) -> str:
    """JSON with sorted keys and no whitespace: the byte string that settings hashes are taken of."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=json_default)


def json_default(obj: Any) -> Any:
    """``json.dumps`` default: numpy arrays and scalars as Python values."""
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def content_hash(atoms: Atoms) -> str:
    """SHA-256 (hex) identifying a labelled frame: species, pbc, positions, cell, energy and forces.

    Values are rounded (:data:`HASH_DECIMALS`), so a frame read back from a text export hashes like the
    original. Stress and metadata (settings, source) are deliberately left out: the same geometry with the
    same energy and forces is the same calculation, whether or not a format kept its stress or settings,
    so re-ingesting an export (n2p2 has no stress, none of the data formats has run settings) adds nothing.
    """
    h = hashlib.sha256()
    h.update(np.asarray(atoms.numbers, dtype=np.int64).tobytes())
    h.update(np.asarray(atoms.pbc, dtype=np.int8).tobytes())
    for key, arr in (("positions", atoms.positions), ("cell", atoms.cell.array)):
        h.update(_rounded(arr, HASH_DECIMALS[key]))
    res = results_of(atoms)
    for key in ("energy", "forces"):
        h.update(key.encode())
        if res.get(key) is not None:
            h.update(_rounded(res[key], HASH_DECIMALS[key]))
    return h.hexdigest()


def _rounded(values: Any, decimals: int) -> bytes:
    arr = np.round(np.asarray(values, dtype=np.float64), decimals) + 0.0  # +0.0 turns -0.0 into 0.0
    return arr.tobytes()
