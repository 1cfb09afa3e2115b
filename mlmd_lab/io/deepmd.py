"""DeePMD-kit ``npy`` systems: read and write labelled frames.

Layout of one system folder (https://docs.deepmodeling.com/projects/deepmd/en/latest/data/system.html)::

    type.raw          atom types, one int per atom (index into type_map), same for every frame
    type_map.raw      element name of each type, one per line (optional in DeePMD; needed here)
    nopbc             empty marker file: the system is not periodic (optional)
    set.000/          frames, split in sets; each set holds, with F frames and N atoms,
        coord.npy     (F, 3N) positions
        box.npy       (F, 9)  cell, rows = lattice vectors (optional with nopbc)
        energy.npy    (F,)    total energy
        force.npy     (F, 3N) forces (optional)
        virial.npy    (F, 9)  virial tensor, energy unit, row-major 3×3 (optional)

DeePMD data are in eV and Å by convention; other units can be named and are converted to eV / Å.

Virial sign: DeePMD's virial is Ξ = -V σ with σ the ASE stress (positive = tensile), i.e. the virial
equals -dE/dε, positive under compression. So ``stress = -virial / volume`` and ``virial = -stress ×
volume``. Evidence: dpdata's ASE converter (``dpdata/plugins/ase.py``) stores
``virials = -atoms.get_volume() * atoms.get_stress(voigt=False)``, and its VASP reader stores
``virial = stress_kBar × V / 1602.18`` with VASP's sign (positive = compressive), which is -σ_ASE × V.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.data import atomic_numbers

from mlmd_lab.errors import InputFileError
from mlmd_lab.frames import labelled_atoms, require_labels, results_of
from mlmd_lab.units import energy_factor, length_factor

__all__ = ["is_deepmd_dir", "read_deepmd", "write_deepmd"]

_SET_RE = re.compile(r"^set\..+$")


def _sets(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and _SET_RE.match(p.name))


def is_deepmd_dir(path: str | Path) -> bool:
    """Return True if ``path`` is a folder with ``type.raw`` and at least one ``set.*`` subfolder."""
    path = Path(path)
    try:
        return path.is_dir() and (path / "type.raw").is_file() and bool(_sets(path))
    except OSError:
        return False


def _load(path: Path, system: Path) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as exc:  # numpy raises ValueError, EOFError, OSError, ... on bad files
        raise InputFileError(
            path,
            f"not a readable .npy array ({type(exc).__name__}: {exc})",
            f"the file is corrupted or truncated: regenerate the DeePMD system {system}",
        ) from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "fiu":
        raise InputFileError(
            path,
            f"holds {getattr(arr, 'dtype', type(arr))} data, expected numbers",
            "regenerate the DeePMD system",
        )
    return arr


def _read_raw(path: Path, what: str) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").split()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputFileError(path, f"cannot read {what}: {exc}", "check the DeePMD system folder") from None


def read_deepmd(
    path: str | Path,
    energy_unit: str = "eV",
    length_unit: str = "Angstrom",
    type_map: Sequence[str] | None = None,
) -> list[Atoms]:
    """Read every frame of a DeePMD ``npy`` system folder (all ``set.*``, in sorted order).

    Args:
        path: the system folder (holding ``type.raw`` and ``set.*``).
        energy_unit, length_unit: units of the data (DeePMD convention: eV, Å).
        type_map: element of each type; overrides ``type_map.raw`` and is required when that is absent.

    Returns:
        Frames in float64, eV / Å: positions (N, 3) Å, cell (3, 3) Å, energy eV, forces (N, 3) eV/Å (if
        ``force.npy``), stress (6,) eV/Å³ Voigt ASE sign = ``-virial / volume`` (if ``virial.npy``; see the
        module docstring). pbc is all True, or all False with the ``nopbc`` marker. ``atoms.info``:
        ``step`` (frame index across all sets), ``set`` (set folder name).

    Raises:
        InputFileError: missing or inconsistent files (path and fix in the message).
    """
    e_f = energy_factor(energy_unit)
    l_f = length_factor(length_unit)
    f_f = e_f / l_f
    path = Path(path)
    if not path.is_dir():
        raise InputFileError(
            path, "is not a folder", "give a DeePMD system folder holding type.raw and set.*"
        )
    if not (path / "type.raw").is_file():
        raise InputFileError(
            path, "has no type.raw", "give a DeePMD system folder holding type.raw and set.*"
        )
    sets = _sets(path)
    if not sets:
        raise InputFileError(
            path, "has no set.* folders", "give a DeePMD system folder holding type.raw and set.*"
        )
    try:
        types = np.array([int(t) for t in _read_raw(path / "type.raw", "atom types")], dtype=int)
    except ValueError:
        raise InputFileError(
            path / "type.raw", "holds non-integer atom types", "one integer per atom"
        ) from None
    natoms = len(types)
    if natoms == 0:
        raise InputFileError(path / "type.raw", "is empty", "one integer type per atom")
    if type_map is None:
        if not (path / "type_map.raw").is_file():
            raise InputFileError(
                path,
                "has no type_map.raw, so the elements are unknown",
                "pass type_map=[...] (element of each type, e.g. ['O', 'H']) or add type_map.raw",
            )
        type_map = _read_raw(path / "type_map.raw", "type map")
    type_map = list(type_map)
    for name in type_map:
        if name not in atomic_numbers or name == "X":
            raise InputFileError(
                path,
                f"type map entry {name!r} is not an element symbol",
                "type_map must list element symbols, e.g. ['O', 'H']",
            )
    if types.min() < 0 or types.max() >= len(type_map):
        raise InputFileError(
            path / "type.raw",
            f"has type {int(types.max())} but the type map has {len(type_map)} entries",
            "make type_map list one element per type",
        )
    symbols = [type_map[t] for t in types]
    nopbc = (path / "nopbc").exists()

    frames: list[Atoms] = []
    for set_dir in sets:
        data = _read_set(set_dir, path, natoms, nopbc)
        for j in range(data["n"]):
            cell = data["box"][j].reshape(3, 3) * l_f if data.get("box") is not None else None
            stress = None
            if data.get("virial") is not None:
                volume = abs(np.linalg.det(cell)) if cell is not None else 0.0
                if volume <= 0.0:
                    raise InputFileError(
                        set_dir / "virial.npy",
                        f"frame {j} has a virial but a zero-volume box",
                        "remove virial.npy for non-periodic data",
                    )
                stress = -data["virial"][j].reshape(3, 3) * e_f / volume
            frames.append(
                labelled_atoms(
                    symbols,
                    data["coord"][j].reshape(natoms, 3) * l_f,
                    cell=cell,
                    pbc=not nopbc,
                    energy=float(data["energy"][j]) * e_f,
                    forces=data["force"][j].reshape(natoms, 3) * f_f
                    if data.get("force") is not None
                    else None,
                    stress=stress,
                    info={"step": len(frames), "set": set_dir.name},
                )
            )
    return frames


def _read_set(set_dir: Path, system: Path, natoms: int, nopbc: bool) -> dict[str, Any]:
    for required in ("coord.npy", "energy.npy") + (() if nopbc else ("box.npy",)):
        if not (set_dir / required).is_file():
            raise InputFileError(
                set_dir,
                f"has no {required}",
                f"every set of a DeePMD system needs {required}"
                + ("" if required != "box.npy" else " (or add a 'nopbc' marker file)"),
            )
    if (set_dir / "real_atom_types.npy").exists():
        raise InputFileError(
            set_dir,
            "is a mixed-type DeePMD set (real_atom_types.npy)",
            "convert it to a standard system with one type.raw (e.g. with dpdata)",
        )
    coord = _load(set_dir / "coord.npy", system).astype(np.float64)
    n = coord.shape[0] if coord.ndim >= 1 else 0
    data: dict[str, Any] = {"n": n}
    expected = {"coord": natoms * 3, "force": natoms * 3, "box": 9, "virial": 9, "energy": 1}
    for key, per_frame in expected.items():
        file = set_dir / f"{key}.npy"
        if key != "coord" and not file.is_file():
            continue
        arr = coord if key == "coord" else _load(file, system).astype(np.float64)
        if arr.ndim == 0 or arr.shape[0] != n or arr.size != n * per_frame:
            raise InputFileError(
                file,
                f"shape {arr.shape} does not match {n} frames × {per_frame} values"
                + (f" ({natoms} atoms in type.raw)" if key in ("coord", "force") else "")
                + f" (coord.npy has {n} frames)",
                "the set is inconsistent: regenerate it",
            )
        data[key] = arr.reshape(n, per_frame)
    data["energy"] = data["energy"].reshape(n)
    return data


def write_deepmd(
    path: str | Path,
    frames: Sequence[Atoms],
    set_size: int = 5000,
    type_map: Sequence[str] | None = None,
    *,
    energy_unit: str = "eV",
    length_unit: str = "Angstrom",
) -> list[str]:
    """Write frames as one DeePMD ``npy`` system (float64; eV / Å unless other units are named) in ``path``.

    All frames must have the same atoms in the same order, ``energy`` and ``forces``, and the same pbc
    (all True, or all False → ``nopbc`` marker). ``virial.npy`` (= ``-stress × volume``, eV) is written
    when every frame has a stress. Frames go to ``set.000``, ``set.001``, ... of ``set_size`` frames each.

    Args:
        path: the system folder to create; must not already hold a DeePMD system.
        frames: labelled frames.
        set_size: frames per set (> 0).
        type_map: element of each type (must cover all elements present; extra entries allowed);
            default: elements in order of first appearance in the first frame.
        energy_unit, length_unit: units to write in (DeePMD convention and default: eV, Å); forces are
            written in energy_unit/length_unit, the virial in energy_unit.

    Returns:
        The names of the set folders written.

    Raises:
        InputFileError: frames that cannot form one DeePMD system (names the frame and the fix).
    """
    e_f = energy_factor(energy_unit)
    l_f = length_factor(length_unit)
    f_f = e_f / l_f
    path = Path(path)
    frames = list(frames)
    if not frames:
        raise InputFileError(path, "no frames to write", "pass at least one frame")
    if set_size < 1:
        raise ValueError("set_size must be at least 1")
    if path.exists() and (not path.is_dir() or (path / "type.raw").exists() or _sets(path)):
        raise InputFileError(path, "already exists and holds data", "write to a new or empty folder")
    symbols = frames[0].get_chemical_symbols()
    if type_map is None:
        type_map = list(dict.fromkeys(symbols))
    type_map = list(type_map)
    missing = sorted(set(symbols) - set(type_map))
    if missing:
        raise InputFileError(path, f"type_map {type_map} lacks {missing}", "list every element in type_map")
    types = np.array([type_map.index(s) for s in symbols], dtype=int)
    pbc0 = np.asarray(frames[0].pbc, dtype=bool)
    if pbc0.any() and not pbc0.all():
        raise InputFileError(
            path,
            f"frame 0 has partial pbc {pbc0.tolist()}",
            "DeePMD supports fully periodic or non-periodic systems",
        )
    has_stress = [results_of(a).get("stress") is not None for a in frames]
    write_virial = all(has_stress)
    natoms = len(symbols)
    coords = np.empty((len(frames), natoms * 3))
    boxes = np.empty((len(frames), 9))
    energies = np.empty(len(frames))
    forces = np.empty((len(frames), natoms * 3))
    virials = np.empty((len(frames), 9)) if write_virial else None
    for i, atoms in enumerate(frames):
        if atoms.get_chemical_symbols() != symbols:
            raise InputFileError(
                path,
                f"frame {i} has other atoms (or order) than frame 0",
                "a DeePMD system holds one composition and atom order: write separate systems",
            )
        if not np.array_equal(np.asarray(atoms.pbc, dtype=bool), pbc0):
            raise InputFileError(
                path,
                f"frame {i} has pbc {list(atoms.pbc)} unlike frame 0",
                "write periodic and non-periodic frames to separate systems",
            )
        res = require_labels(path, i, atoms)
        coords[i] = atoms.positions.reshape(-1) / l_f
        boxes[i] = atoms.cell.array.reshape(-1) / l_f
        energies[i] = float(res["energy"]) / e_f
        forces[i] = np.asarray(res["forces"], dtype=float).reshape(-1) / f_f
        if virials is not None:
            volume = abs(atoms.get_volume()) if atoms.cell.rank == 3 else 0.0
            if volume <= 0.0:
                raise InputFileError(
                    path, f"frame {i} has a stress but no 3-D cell", "drop the stress of non-periodic frames"
                )
            s = np.asarray(res["stress"], dtype=float)
            xx, yy, zz, yz, xz, xy = s if s.shape == (6,) else s.reshape(3, 3).ravel()[[0, 4, 8, 5, 2, 1]]
            virials[i] = -volume / e_f * np.array([xx, xy, xz, xy, yy, yz, xz, yz, zz])
    if any(has_stress) and not write_virial:
        warnings.warn(
            f"{path}: only {sum(has_stress)} of {len(frames)} frames have a stress; no virial.npy written",
            stacklevel=2,
        )
    path.mkdir(parents=True, exist_ok=True)
    (path / "type.raw").write_text("".join(f"{t}\n" for t in types))
    (path / "type_map.raw").write_text("".join(f"{s}\n" for s in type_map))
    if not pbc0.any():
        (path / "nopbc").write_text("")
    names = []
    for k, start in enumerate(range(0, len(frames), set_size)):
        stop = start + set_size
        set_dir = path / f"set.{k:03d}"
        set_dir.mkdir()
        np.save(set_dir / "coord.npy", coords[start:stop])
        np.save(set_dir / "box.npy", boxes[start:stop])
        np.save(set_dir / "energy.npy", energies[start:stop])
        np.save(set_dir / "force.npy", forces[start:stop])
        if virials is not None:
            np.save(set_dir / "virial.npy", virials[start:stop])
        names.append(set_dir.name)
    return names
