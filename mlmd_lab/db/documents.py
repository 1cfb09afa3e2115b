"""Conversion between frames (ASE ``Atoms``) and MongoDB documents.

Three collections:

``calculations``  one per source (a run file, or a data file/folder without run settings):
    ``_id`` = SHA-256 of the file bytes (folder: of its data files), ``status`` ("writing" → "complete"),
    ``code``, ``code_version``, ``format``, ``settings`` (full settings as JSON), ``signature_id``,
    ``sources`` (every path this content was found at), ``n_frames``, ``finished``, ``warnings``, ``tags``.
``signatures``    one per distinct normalised settings signature (``_id`` = signature id).
``frames``        one per labelled frame: ``_id`` = content hash (see :func:`mlmd_lab.frames.content_hash`),
    ``calc_id``, ``step``, ``signature_id``, ``source_path``, ``file_hash``, species and composition fields
    for queries, ``energy`` (eV), ``energy_per_atom``, ``max_force`` (eV/Å), ``stress`` (eV/Å³, Voigt),
    ``cell`` (Å, 9 floats), ``pbc``, and the per-atom arrays as compact binary.

Per-atom arrays (numbers, positions, forces, magmoms) are stored as BSON binary of little-endian
float64 / uint8 bytes: against BSON arrays of doubles, documents are 1.8× smaller for 192 atoms (1.25× for
8), the array round trip is 12× faster and a server insert+find of 2,000 documents 11× faster; zlib on top
saves only 5 % on full-precision floats and is 9× slower (``benchmarks/bench_storage.py``). Scalars and small
vectors stay plain BSON so they can be queried and read by any MongoDB tool.
"""

from __future__ import annotations

import datetime as _dt
from collections import Counter
from collections.abc import Iterable
from itertools import combinations
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.formula import Formula
from bson.binary import Binary

from mlmd_lab.errors import MLMDError
from mlmd_lab.frames import content_hash, results_of

#: ``atoms.info`` keys that are database metadata, not copied into ``info`` of a stored frame.
META_KEYS = ("frame_id", "calc_id", "signature_id", "signature", "source", "file_hash", "tags", "step", "owner",
             "dataset", "licence", "visibility", "group", "contributors", "embargo_until")
#: Sharing fields of frame and calculation documents (see :mod:`mlmd_lab.db.access`); ``owner``,
#: ``visibility`` and ``group`` are set by the reader from the database a document lives in.
SHARING_KEYS = ("owner", "dataset", "licence", "visibility", "group", "contributors", "embargo_until")


def pack(values: Any, dtype: str = "<f8") -> Binary:
    """Array → BSON binary of raw little-endian bytes (shape is implied by ``natoms``)."""
    return Binary(np.ascontiguousarray(values, dtype=dtype).tobytes())


def composition_fields(numbers: np.ndarray, symbols: list[str]) -> dict[str, Any]:
    """Queryable species fields: sorted unique ``elements``, ``chemsys`` ("H-O"), Hill ``formula``,
    ``formula_reduced`` and ``composition`` {element: count}."""
    counts = Counter(symbols)
    elements = sorted(counts)
    formula = Formula.from_dict(dict(counts))
    return {
        "natoms": int(len(numbers)),
        "elements": elements,
        "nelements": len(elements),
        "chemsys": "-".join(elements),
        "formula": formula.format("hill"),
        "formula_reduced": formula.reduce()[0].format("hill"),
        "composition": {el: int(n) for el, n in sorted(counts.items())},
    }


def frame_document(
    atoms: Atoms,
    *,
    calc_id: str,
    signature_id: str,
    source_path: str | None,
    file_hash: str | None,
    tags: list[str] | None = None,
    now: _dt.datetime | None = None,
) -> dict[str, Any]:
    """Build the ``frames`` document of one labelled frame (ASE units in, ASE units stored)."""
    res = results_of(atoms)
    numbers = np.asarray(atoms.numbers)
    doc: dict[str, Any] = {
        "_id": content_hash(atoms),
        "calc_id": calc_id,
        "step": int(atoms.info.get("step", 0)),
        "signature_id": signature_id,
        "source_path": source_path,
        "file_hash": file_hash,
        **composition_fields(numbers, atoms.get_chemical_symbols()),
        "numbers": pack(numbers, "u1"),
        "positions": pack(atoms.positions),
        "cell": [float(x) for x in atoms.cell.array.ravel()],
        "pbc": [bool(x) for x in atoms.pbc],
        "tags": sorted(set(tags or [])),
        "ingested_at": now or _dt.datetime.now(_dt.UTC),
    }
    if atoms.pbc.all() and atoms.cell.rank == 3:
        doc["volume"] = float(atoms.get_volume())
    energy = res.get("energy")
    if energy is not None:
        doc["energy"] = float(energy)
        doc["energy_per_atom"] = float(energy) / len(numbers)
    if res.get("free_energy") is not None:
        doc["free_energy"] = float(res["free_energy"])
    if res.get("forces") is not None:
        forces = np.asarray(res["forces"], dtype=float)
        doc["forces"] = pack(forces)
        doc["max_force"] = float(np.linalg.norm(forces, axis=1).max()) if len(forces) else 0.0
    if res.get("stress") is not None:
        doc["stress"] = [float(x) for x in np.asarray(res["stress"]).reshape(-1)[:6]]
    if res.get("magmoms") is not None:
        doc["magmoms"] = pack(np.asarray(res["magmoms"], dtype=float).reshape(-1))
    extra = {k: v for k, v in atoms.info.items() if k not in META_KEYS and _is_plain(v)}
    if extra:
        doc["info"] = extra
    return doc


def frame_from_document(doc: dict[str, Any], signature: dict[str, Any] | None = None) -> Atoms:
    """Rebuild the labelled ``Atoms`` of a ``frames`` document (results as a single-point calculator)."""
    n = doc["natoms"]
    atoms = Atoms(
        numbers=np.frombuffer(doc["numbers"], dtype="u1"),
        positions=np.frombuffer(doc["positions"], dtype="<f8").reshape(n, 3),
        cell=np.asarray(doc["cell"], dtype=float).reshape(3, 3),
        pbc=doc["pbc"],
    )
    results: dict[str, Any] = {}
    if "energy" in doc:
        results["energy"] = doc["energy"]
    if "free_energy" in doc:
        results["free_energy"] = doc["free_energy"]
    if "forces" in doc:
        results["forces"] = np.frombuffer(doc["forces"], dtype="<f8").reshape(n, 3).copy()
    if "stress" in doc:
        results["stress"] = np.asarray(doc["stress"], dtype=float)
    if "magmoms" in doc:
        results["magmoms"] = np.frombuffer(doc["magmoms"], dtype="<f8").copy()
    atoms.calc = SinglePointCalculator(atoms, **results)
    atoms.info.update(doc.get("info", {}))
    atoms.info.update(
        frame_id=doc["_id"],
        calc_id=doc["calc_id"],
        step=doc.get("step", 0),
        source=doc.get("source_path"),
        file_hash=doc.get("file_hash"),
        signature_id=doc.get("signature_id"),
        tags=list(doc.get("tags", [])),
    )
    for key in SHARING_KEYS:
        if doc.get(key) is not None:
            atoms.info[key] = list(doc[key]) if key == "contributors" else doc[key]
    if signature is not None:
        atoms.info["signature"] = signature
    return atoms


def mongo_safe(data: Any) -> Any:
    """Copy of JSON-like ``data`` whose keys MongoDB accepts (no '.' and no leading '$'); tuples → lists,
    numpy scalars/arrays → Python values."""
    if isinstance(data, dict):
        return {_safe_key(str(k)): mongo_safe(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [mongo_safe(v) for v in data]
    if isinstance(data, np.ndarray):
        return data.tolist()
    if isinstance(data, np.generic):
        return data.item()
    return data


def _safe_key(key: str) -> str:
    key = key.replace(".", "\uff0e")
    return "\uff04" + key[1:] if key.startswith("$") else key


def _is_plain(value: Any) -> bool:
    return isinstance(value, str | int | float | bool) or (
        isinstance(value, list | tuple) and all(isinstance(v, str | int | float | bool) for v in value)
    )


def element_list(elements: Iterable[str] | str) -> list[str]:
    """Element symbols from a list or a string such as ``"Ti O"`` / ``"Ti,O"``; error for unknown symbols."""
    from ase.data import atomic_numbers

    items = elements.replace(",", " ").split() if isinstance(elements, str) else list(elements)
    bad = [e for e in items if e not in atomic_numbers]
    if bad:
        raise MLMDError(f"unknown element symbol(s) {', '.join(map(repr, bad))}: use symbols like 'Ti', 'O'")
    return items


def elements_filter(elements: Iterable[str] | str, exclusive: bool) -> dict[str, Any]:
    """MongoDB filter on the ``chemsys`` and ``elements`` fields (of frames and of saved models).

    ``exclusive=True``: documents whose elements are all among ``elements`` (any subsystem, e.g. H, O and
    H-O for ["H", "O"]); ``exclusive=False``: documents containing every one of them (and maybe others).
    """
    els = sorted(set(element_list(elements)))
    if exclusive:
        return {"chemsys": {"$in": ["-".join(c) for k in range(1, len(els) + 1) for c in combinations(els, k)]}}
    return {"$and": [{"elements": el} for el in els]}
