"""Extended XYZ files: read (via ASE) and write labelled frames with their metadata.

Units are ASE's (eV, Å, eV/Å, eV/Å³; stress Voigt ``xx yy zz yz xz xy``, positive = tensile).

Reading puts the labels into a :class:`~ase.calculators.singlepoint.SinglePointCalculator` whichever of the
common spellings the file uses (:data:`LABEL_SPELLINGS`, compared without regard to case): ASE's own keys
(``energy``, ``free_energy``, ``forces``, ``stress``); the same with a ``REF_`` or ``DFT_`` prefix (MACE and
NequIP reference data, libAtoms/GAP data sets: ``dft_energy``, ``dft_force``, ``dft_virial``); the singular
``force`` and ``virial`` of QUIP/GAP and the plural ``virials`` of MACE; ``total_energy`` (NequIP) and
``TotEnergy`` (the water set of Cheng et al. in the MACE tutorials); ``E`` and ``F`` (sGDML/MD17, exact
case). A ``virial`` (eV; 3×3, 9 or 6 values) becomes ``stress = -virial / volume``. A frame with only a free
energy gets it as its energy too (the energy whose gradient the forces are).

Two columns for the same label (``forces`` and ``REF_forces``, ``stress`` and ``virial``, ...) are fine when
they agree (to 1e-7 relative, 1e-6 absolute in eV, eV/Å, eV/Å³); the duplicates are dropped. When they
differ the file is refused, naming both: choose with ``keys={"forces": "REF_forces"}``. Only the chosen
column then counts; the other columns of that label are dropped.

Writing is ASE-readable extxyz with full float precision (``repr``, the shortest text that reads back
as the same float64; ASE's own writer rounds per-atom columns to 8 decimals). ``atoms.info`` entries that
extxyz cannot hold exactly (dicts, lists, strings that would parse as numbers, strings with newlines) are
stored as a JSON string under ``<key>_json`` and restored on reading; when that JSON has backslashes
(which ASE's parser mangles) it is stored as unpadded URL-safe base64 under ``<key>_json_b64``. Values
that are not JSON-serialisable are left out with a warning.
"""

from __future__ import annotations

import base64
import json
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import all_properties
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read as ase_read
from ase.io.extxyz import key_val_dict_to_str, key_val_str_to_dict, per_atom_properties, per_config_properties
from ase.io.formats import string2index

from mlmd_lab.errors import InputFileError, MLMDError
from mlmd_lab.frames import json_default, labelled_atoms, results_of
from mlmd_lab.io import open_text

__all__ = ["LABEL_SPELLINGS", "label_of", "read_extxyz", "write_extxyz"]

#: The labels read, and the names (lower case; compared without regard to case) that files store them under:
#: the base names below, each also with a ``ref_`` or ``dft_`` prefix, plus :data:`EXACT_SPELLINGS`.
LABEL_SPELLINGS: dict[str, tuple[str, ...]] = {
    "energy": ("energy", "total_energy", "totenergy"),
    "free_energy": ("free_energy",),
    "forces": ("forces", "force"),
    "stress": ("stress",),
    "virial": ("virial", "virials"),
}
LABEL_PREFIXES = ("", "ref_", "dft_")
#: Single-letter names, matched with exact case only (sGDML / MD17 data sets).
EXACT_SPELLINGS: dict[str, tuple[str, ...]] = {"energy": ("E",), "forces": ("F",)}
#: Names accepted in ``keys=`` (``"virial"``: the stress comes from that virial column).
KEY_LABELS = tuple(LABEL_SPELLINGS)
_RTOL, _ATOL = 1e-7, 1e-6
_RESERVED = {"pbc", "Lattice", "Properties", "species", "pos", "Time"}
_JSON_SUFFIX = "_json"
_B64_SUFFIX = "_json_b64"


def read_extxyz(path: str | Path, index: int | str | slice = ":", keys: Mapping[str, str] | None = None) -> list[Atoms]:
    """Read frames of an extxyz file; every frame must carry an energy.

    Args:
        path: the ``.xyz``/``.extxyz`` file (UTF-8).
        index: which frames, as for ``ase.io.read`` (``":"``, ``"-1"``, ``"2:10:2"``, an int or a slice).
        keys: which column holds a label, ``{label: column}`` with labels from :data:`KEY_LABELS`, e.g.
            ``{"forces": "REF_forces"}``; needed only when a file has two differing columns for one label
            (see the module docstring for the spellings recognised without it).

    Returns:
        Frames (eV, Å) with a SinglePointCalculator holding ``energy`` and, where present,
        ``free_energy``, ``forces`` (N, 3), ``stress`` (6,) and other ASE results. ``atoms.info`` keeps the
        file's other keys (numpy scalars turned into Python ones, ``*_json`` keys decoded); ``step`` is set
        to the frame's position in the file when absent.

    Raises:
        InputFileError: unreadable, not UTF-8, malformed, a frame without energy, two differing columns for
            one label, a label column of the wrong shape, or a ``keys`` column the frame lacks.
    """
    path = Path(path)
    chosen_keys = check_keys(keys)
    with open_text(path) as fh:
        try:
            images = ase_read(fh, index=":", format="extxyz")
        except UnicodeDecodeError as exc:
            raise InputFileError(
                path,
                f"not UTF-8 text (byte {exc.start} of a line)",
                "give an extended XYZ text file in UTF-8",
            ) from None
        except Exception as exc:  # ASE raises many types on malformed input
            raise InputFileError(
                path,
                f"malformed extxyz ({type(exc).__name__}: {exc})",
                "check the atom count and comment line of each frame",
            ) from None
    if isinstance(images, Atoms):
        images = [images]
    if not images:
        raise InputFileError(path, "holds no frames", "give a non-empty extxyz file")
    positions = list(range(len(images)))
    sel = string2index(index) if isinstance(index, str) else index
    try:
        chosen = positions[sel] if isinstance(sel, slice) else [positions[sel]]
    except IndexError:
        raise InputFileError(
            path, f"has {len(images)} frames, index {index!r} is out of range", "choose an existing frame"
        ) from None
    return [_normalise(images[i], i, path, chosen_keys) for i in chosen]


def check_keys(keys: Mapping[str, str] | None) -> dict[str, str]:
    """``keys`` as a dict, checked: labels from :data:`KEY_LABELS`, not both stress and virial."""
    keys = dict(keys or {})
    unknown = sorted(set(keys) - set(KEY_LABELS))
    if unknown:
        raise MLMDError(f"keys: unknown label(s) {unknown}; use {list(KEY_LABELS)}, e.g. keys={{'forces': 'force'}}")
    if "stress" in keys and "virial" in keys:
        raise MLMDError("keys: give 'stress' or 'virial', not both (both set the stress)")
    return keys


def label_of(name: str) -> str | None:
    """The label (:data:`KEY_LABELS`) that a column or info key of this name holds, or None."""
    low = name.lower()
    for label, bases in LABEL_SPELLINGS.items():
        if any(low == prefix + base for prefix in LABEL_PREFIXES for base in bases):
            return label
    for label, names in EXACT_SPELLINGS.items():
        if name in names:
            return label
    return None


def _candidates(atoms: Atoms, results: dict[str, Any], keys: dict[str, str], position: int,
                path: Path) -> tuple[dict[str, dict[str, Any]], set[str]]:
    """``{label: {column name: raw value}}`` of the frame's label columns (ASE's parsed results first), and
    the names of all label columns found (to drop from info/arrays).

    With ``keys``, a label's only candidate is the named column; it is an error if the frame lacks it.
    """
    found: dict[str, dict[str, Any]] = {label: {} for label in KEY_LABELS}
    for name in ("energy", "free_energy", "forces", "stress"):
        if name in results:
            found[name][name] = results.pop(name)
    for name, value in atoms.info.items():
        label = label_of(name)
        if label is not None and label != "forces":
            found[label].setdefault(name, value)
    for name, value in atoms.arrays.items():
        if label_of(name) == "forces":
            found["forces"].setdefault(name, value)
    names = {name for group in found.values() for name in group}
    for label, column in keys.items():
        seen = {name: value for group in found.values() for name, value in group.items()}
        value = seen.get(column, atoms.info.get(column, atoms.arrays.get(column)))
        if value is None or column in ("numbers", "positions"):
            columns = sorted((set(atoms.info) | set(atoms.arrays) | set(seen)) - {"numbers", "positions"})
            raise InputFileError(
                path, f"frame {position} has no column or key {column!r} (keys={{{label!r}: {column!r}}}); "
                f"it has {columns}", "name a column of the file in keys=",
            )
        if label in ("stress", "virial"):
            found["stress"], found["virial"] = {}, {}
        found[label] = {column: value}
        names.add(column)
    return found, names


def _value(label: str, name: str, value: Any, atoms: Atoms, position: int, path: Path) -> Any:
    """A candidate's value in the calculator's form (float; (N, 3); Voigt stress, virials turned into it)."""
    if label in ("energy", "free_energy"):
        try:
            arr = np.asarray(value, dtype=float).reshape(-1)
        except (TypeError, ValueError):
            arr = np.zeros(0)
        if arr.size != 1:
            raise InputFileError(path, f"frame {position}: {name} = {value!r} is not one number",
                                 f"write {name} as a single number (eV)")
        return float(arr[0])
    if label == "forces":
        arr = np.asarray(value)
        if arr.dtype.kind not in "fi" or arr.shape != (len(atoms), 3):
            raise InputFileError(path, f"frame {position}: column {name} has shape {arr.shape} ({arr.dtype}), "
                                 f"forces need ({len(atoms)}, 3) numbers",
                                 f"store the forces as {name}:R:3 or choose another column with keys=")
        return np.array(arr, dtype=float)
    voigt = _voigt(value, path, position, name)
    if label == "virial":
        volume = abs(atoms.cell.volume) if atoms.cell.rank == 3 else 0.0
        if volume <= 0.0:
            raise InputFileError(
                path, f"frame {position} has a virial but no 3-D cell", "add a Lattice or drop the virial"
            )
        return -voigt / volume
    return voigt


def _pick(label: str, values: dict[str, Any], position: int, path: Path) -> tuple[str, Any] | None:
    """The one value of a label: the first candidate, after checking the others agree with it."""
    if not values:
        return None
    (first, ref), *others = values.items()
    for name, value in others:
        if not np.allclose(value, ref, rtol=_RTOL, atol=_ATOL):
            diff = float(np.max(np.abs(np.asarray(value) - np.asarray(ref))))
            what = "stress" if label == "stress" else label.replace("_", " ")
            raise InputFileError(
                path, f"frame {position} has two {what} columns with different values, {first} and {name} "
                f"(largest difference {diff:.3g})",
                f"choose one with keys={{{label!r}: {first!r}}} or keys={{{label!r}: {name!r}}} "
                "(read_extxyz, mlmd_lab.io.read, db.ingest), or remove the other from the file",
            )
    return first, ref


def _normalise(atoms: Atoms, position: int, path: Path, keys: dict[str, str]) -> Atoms:
    results = dict(results_of(atoms))
    found, names = _candidates(atoms, results, keys, position, path)
    labels: dict[str, Any] = {}
    for label in ("energy", "free_energy", "forces", "stress"):
        values = {name: _value(label, name, v, atoms, position, path) for name, v in found[label].items()}
        if label == "stress":
            values.update({name: _value("virial", name, v, atoms, position, path)
                           for name, v in found["virial"].items()})
        picked = _pick(label, values, position, path)
        if picked is not None:
            labels[label] = picked[1]
    for name in names:
        atoms.info.pop(name, None)
        if name in atoms.arrays and name not in ("numbers", "positions"):
            del atoms.arrays[name]
    if "energy" not in labels and "free_energy" in labels:
        labels["energy"] = labels["free_energy"]
    if labels.get("energy") is None:
        raise InputFileError(
            path,
            f"frame {position} has no energy (looked for {_spelled('energy')})",
            "label the frames, name the energy key 'energy' or choose it with keys={'energy': ...}",
        )
    info = atoms.info
    new_info = _decode_info(info)
    new_info.setdefault("step", position)
    known = {k: results.pop(k) for k in ("magmoms",) if k in results}
    frame = labelled_atoms(
        atoms.get_chemical_symbols(),
        atoms.positions,
        cell=atoms.cell.array,
        pbc=atoms.pbc,
        info=new_info,
        **labels,
        **known,
    )
    for name, arr in atoms.arrays.items():
        if name not in ("numbers", "positions"):
            frame.new_array(name, arr)
    # (re)attach after setting arrays such as initial_charges, which are part of the calculator's state
    frame.calc = SinglePointCalculator(frame, **frame.calc.results, **results)
    return frame


def _spelled(label: str) -> str:
    names = [prefix + base for prefix in ("", "REF_", "DFT_") for base in LABEL_SPELLINGS[label]]
    return ", ".join(names + list(EXACT_SPELLINGS.get(label, ())))


def _voigt(value: Any, path: Path, position: int, key: str) -> np.ndarray:
    arr = np.asarray(value, dtype=float)
    if arr.size == 9:
        m = arr.reshape(3, 3)
        return m.ravel()[[0, 4, 8, 5, 2, 1]].copy()
    if arr.size == 6:
        return arr.reshape(6)
    raise InputFileError(
        path,
        f"frame {position}: {key} has {arr.size} values, need 6 or 9",
        "write it as 9 values (3×3) or Voigt xx yy zz yz xz xy",
    )


def _python(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return value


def _decode_info(info: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in info.items():
        if isinstance(value, str) and key.endswith(_B64_SUFFIX) and len(key) > len(_B64_SUFFIX):
            try:
                padded = value + "=" * (-len(value) % 4)
                out[key[: -len(_B64_SUFFIX)]] = json.loads(base64.urlsafe_b64decode(padded).decode("utf-8"))
                continue
            except (ValueError, UnicodeDecodeError):
                pass
        elif isinstance(value, str) and key.endswith(_JSON_SUFFIX) and len(key) > len(_JSON_SUFFIX):
            try:
                out[key[: -len(_JSON_SUFFIX)]] = json.loads(value)
                continue
            except ValueError:
                pass
        out[key] = _python(value)
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (bool, np.bool_)):
        return isinstance(b, (bool, np.bool_)) and bool(a) == bool(b)
    if isinstance(a, str):
        return isinstance(b, str) and a == b
    if isinstance(a, (int, np.integer)):
        return isinstance(b, (int, np.integer)) and not isinstance(b, (bool, np.bool_)) and int(a) == int(b)
    if isinstance(a, (float, np.floating)):
        return isinstance(b, (float, np.floating)) and (float(a) == float(b) or (np.isnan(a) and np.isnan(b)))
    if isinstance(a, np.ndarray) and a.ndim == 1 and a.size > 0 and a.dtype.kind in "if":
        return (
            isinstance(b, np.ndarray)
            and b.shape == a.shape
            and b.dtype.kind == a.dtype.kind
            and bool(np.array_equal(a, b))
        )
    return False


def _exact_pair(key: str, value: Any) -> str | None:
    """``key=value`` text if ASE reads it back as exactly this value, else None."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            text = key_val_dict_to_str({key: value})
            # parse it between two other pairs: some values (ending in "=", ...) merge with a neighbour
            back = key_val_str_to_dict(f"_l=0 {text} _r=0")
            if back.pop("_l", None) != 0 or back.pop("_r", None) != 0:
                return None
        except Exception:  # any failure means: not representable directly
            return None
    if "\n" in text or "\r" in text or list(back) != [key] or not _same(value, back[key]):
        return None
    return text


def _encode_info(info: dict[str, Any], skip: set[str]) -> list[str]:
    parts: list[str] = []
    for key, value in info.items():
        if not isinstance(key, str) or key in skip:
            continue
        text = None if isinstance(value, dict) else _exact_pair(key, value)
        if text is None:
            try:
                payload = json.dumps(
                    value.tolist() if isinstance(value, np.ndarray) else value,
                    ensure_ascii=False,
                    default=json_default,
                )
            except (TypeError, ValueError):
                warnings.warn(f"extxyz: info[{key!r}] is not JSON-serialisable; left out", stacklevel=3)
                continue
            text = _exact_pair(key + _JSON_SUFFIX, payload)
            if text is None:
                # no '=' padding: ASE's parser would join "...==" with the next key
                b64 = base64.urlsafe_b64encode(payload.encode("utf-8")).decode("ascii").rstrip("=")
                text = _exact_pair(key + _B64_SUFFIX, b64)
            if text is None:
                warnings.warn(f"extxyz: info key {key!r} cannot be written; left out", stacklevel=3)
                continue
        parts.append(text)
    return parts


def _num(value: Any) -> str:
    return repr(float(value))


def _column(arr: np.ndarray) -> tuple[str, int, list[list[str]]] | None:
    """(type letter, column count, per-atom text values) of a per-atom array; None if unsupported."""
    arr = np.asarray(arr)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        return None
    kind = arr.dtype.kind
    if kind == "f":
        text = [[repr(float(v)) for v in row] for row in arr]
        return "R", arr.shape[1], text
    if kind in "iu":
        return "I", arr.shape[1], [[str(int(v)) for v in row] for row in arr]
    if kind == "b":
        return "L", arr.shape[1], [["T" if v else "F" for v in row] for row in arr]
    return None


def _frame_text(atoms: Atoms) -> str:
    n = len(atoms)
    res = results_of(atoms)
    columns: list[tuple[str, str, int, list[list[str]]]] = [
        ("species", "S", 1, [[s] for s in atoms.get_chemical_symbols()]),
        ("pos", "R", 3, [[_num(v) for v in row] for row in atoms.positions]),
    ]
    header_values: dict[str, Any] = {}
    for key, value in res.items():
        if value is None:
            continue
        if key in per_atom_properties:
            col = _column(np.asarray(value))
            if col is not None and len(col[2]) == n:
                columns.append((key, *col))
        elif key in per_config_properties:
            if key == "stress":
                s = np.asarray(value, dtype=float)
                if s.shape == (6,):
                    xx, yy, zz, yz, xz, xy = s
                    s = np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
                value = s.reshape(3, 3)
            elif np.ndim(value) == 0:
                value = float(value)
            else:
                value = np.asarray(value, dtype=float).reshape(-1)
            header_values[key] = value
    skip = set(_RESERVED) | set(all_properties) | {"numbers", "positions"}
    for name, arr in atoms.arrays.items():
        if name in skip or name in res:
            continue
        col = _column(arr)
        if col is not None and len(col[2]) == n:
            columns.append((name, *col))
    props = ":".join(f"{name}:{letter}:{ncol}" for name, letter, ncol, _ in columns)
    parts = []
    if atoms.cell.any():
        parts.append('Lattice="' + " ".join(_num(v) for v in atoms.cell.array.reshape(-1)) + '"')
    parts.append(f"Properties={props}")
    if header_values:
        parts.append(key_val_dict_to_str(header_values))
    parts.append(key_val_dict_to_str({"pbc": np.asarray(atoms.pbc, dtype=bool)}))
    parts.extend(_encode_info(atoms.info, skip | set(header_values)))
    lines = [str(n), " ".join(parts)]
    for i in range(n):
        lines.append(" ".join(" ".join(col[3][i]) for col in columns))
    return "\n".join(lines) + "\n"


def write_extxyz(path: str | Path, frames: Iterable[Atoms]) -> int:
    """Write frames to an extxyz file that ``ase.io.read`` and :func:`read_extxyz` read back exactly.

    Written: species, positions (Å), cell (``Lattice``), pbc, the calculator results (``energy``,
    ``free_energy`` eV; ``stress`` eV/Å³ as a 3×3 matrix; ``forces`` eV/Å and other per-atom results as
    columns), other numeric per-atom ``atoms.arrays`` (e.g. ``initial_charges``) and ``atoms.info`` (see the
    module docstring for how dicts and lists are stored). Floats are written with ``repr`` (exact).

    Returns:
        The number of frames written.
    """
    path = Path(path)
    texts = [_frame_text(atoms) for atoms in frames]
    path.write_text("".join(texts), encoding="utf-8")
    return len(texts)
