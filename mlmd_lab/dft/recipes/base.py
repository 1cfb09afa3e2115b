"""The shared base of the calculation recipes: :class:`Recipe` (settings, signature, resumable
``calculate`` in a folder with its ``mlmd_recipe.json`` record), helpers all codes use (file hashes, k-point
grids, the record, MPI launchers matched to the program), and :func:`ingest_settings`.

Units: ASE's (eV, Å); k-point spacings in Å⁻¹ with 2π included (VASP's KSPACING convention).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import time
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms

from mlmd_lab.cluster.mpi import mpi_command, mpi_flavour
from mlmd_lab.errors import MLMDError
from mlmd_lab.files import atomic_write_text
from mlmd_lab.frames import canonical_json, content_hash

#: Name of the JSON record written into every calculation folder.
RECORD_NAME = "mlmd_recipe.json"


# -- helpers ---------------------------------------------------------------------------------------------
def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _file_md5(path: str | os.PathLike) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def kpoint_grid(atoms: Atoms, kspacing: float) -> list[int]:
    """Monkhorst-Pack divisions for a k-point spacing (Å⁻¹, VASP's KSPACING convention, 2π included):
    ``n_i = max(1, ceil(2π |b_i| / kspacing))`` along periodic directions, 1 along the others."""
    if kspacing <= 0:
        raise MLMDError(f"kspacing must be > 0 Å⁻¹, got {kspacing}")
    recip = atoms.cell.reciprocal()  # rows b_i without 2π (Å⁻¹)
    out = []
    for i in range(3):
        if atoms.pbc[i] and atoms.cell.rank == 3:
            out.append(max(1, math.ceil(2 * math.pi * float(np.linalg.norm(recip[i])) / kspacing - 1e-9)))
        else:
            out.append(1)
    return out


def _structure_hash(atoms: Atoms) -> str:
    bare = atoms.copy()
    bare.calc = None
    return content_hash(bare)


def _settings_hash(settings: dict[str, Any]) -> str:
    s = {k: v for k, v in settings.items() if k not in ("code_version",)}
    return hashlib.sha256(canonical_json(s).encode()).hexdigest()[:16]


def _tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return " | ".join(ln.strip() for ln in lines[-n:] if ln.strip())


def ingest_settings(output: str | os.PathLike) -> dict[str, Any] | None:
    """The ``settings=`` to give ``db.ingest`` for a recipe's output file: the recorded signature when the
    file is a data format without run settings (extxyz from PySCF), None when the file's reader finds the settings
    itself (pw.x output, vasprun.xml) or the folder has no :data:`RECORD_NAME`.

    Example: ``out = recipe.calculate(atoms, folder); db.ingest(out, settings=ingest_settings(out))``.
    """
    record = Path(output).parent / RECORD_NAME
    if not record.is_file():
        return None
    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    return data.get("signature") if data.get("output_needs_settings") else None


# -- base ------------------------------------------------------------------------------------------------
class Recipe:
    """Base of the calculation recipes (see the module docstring).

    Subclasses set ``name``, ``code``, ``output_name`` and ``output_needs_settings`` (True when the output format
    carries no run settings) and implement :meth:`settings`, :meth:`signature_settings`, :meth:`check` and
    :meth:`_run`.
    """

    name: str = "recipe"
    code: str = ""
    output_name: str = ""
    output_needs_settings: bool = False

    def settings(self, atoms: Atoms | None = None) -> dict[str, Any]:
        """Full settings (JSON-serialisable). With ``atoms``, structure-dependent values (k-point grid,
        basis for molecules vs cells, pseudopotentials of its elements) are resolved for that structure."""
        raise NotImplementedError

    def signature_settings(self, atoms: Atoms | None = None) -> dict[str, Any]:
        """The settings signature (:func:`mlmd_lab.settings.normalise_signature` form; eV, Å⁻¹)."""
        raise NotImplementedError

    def check(self, atoms: Atoms | None = None) -> None:
        """Raise :class:`~mlmd_lab.errors.MLMDError` naming what is missing (program, pseudopotentials, ...)."""
        raise NotImplementedError

    def _run(self, atoms: Atoms, folder: Path) -> Path:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"

    # -- running ------------------------------------------------------------------------------------------
    def calculate(self, atoms: Atoms, folder: str | os.PathLike, overwrite: bool = False) -> Path:
        """Run one single-point calculation (energy, forces, and stress for periodic cells) in ``folder``.

        Args:
            atoms: the structure (Å); its ``info["generator"]`` is recorded with the calculation.
            folder: the calculation's own folder (created); codes write scratch files there.
            overwrite: run even if the folder's record shows a different structure or settings.

        Returns:
            the output file to ingest (see the module docstring).

        Raises:
            MLMDError: the code is unavailable (see :meth:`check`), the folder holds another calculation, or
                the run failed (the message quotes the end of the code's error output).
        """
        if not isinstance(atoms, Atoms) or len(atoms) == 0:
            raise MLMDError("calculate needs a non-empty ase.Atoms structure")
        self.check(atoms)
        folder = Path(folder).expanduser().resolve()
        folder.mkdir(parents=True, exist_ok=True)
        settings = self.settings(atoms)
        s_hash, a_hash = _settings_hash(settings), _structure_hash(atoms)
        record_path = folder / RECORD_NAME
        if record_path.is_file():
            try:
                old = json.loads(record_path.read_text())
            except ValueError:
                old = {}
            same = old.get("structure_hash") == a_hash and old.get("settings_hash") == s_hash
            out = folder / str(old.get("output", ""))
            if same and old.get("status") == "complete" and out.is_file():
                return out
            if not same and not overwrite:
                raise MLMDError(f"{folder} already holds a calculation of another structure or with other settings "
                                f"({old.get('recipe')}); use a new folder per calculation, or overwrite=True")
        record = {"recipe": self.name, "code": self.code, "status": "running", "structure_hash": a_hash,
                  "settings_hash": s_hash, "formula": atoms.get_chemical_formula(), "natoms": len(atoms),
                  "generator": atoms.info.get("generator"), "settings": settings,
                  "signature": self.signature_settings(atoms), "output": self.output_name,
                  "output_needs_settings": self.output_needs_settings, "started": time.time()}
        _write_json(record_path, record)
        t0 = time.perf_counter()
        try:
            out = self._run(atoms.copy(), folder)
        except BaseException as exc:  # record the failure (also on Ctrl-C), then let it propagate
            record.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:2000])
            _write_json(record_path, record)
            raise
        record.update(status="complete", wall_s=round(time.perf_counter() - t0, 3),
                      settings=self.settings(atoms), output=out.name)
        _write_json(record_path, record)
        return out

    def label(self, atoms: Atoms, folder: str | os.PathLike, overwrite: bool = False) -> Atoms:
        """:meth:`calculate`, then read the output back with :func:`mlmd_lab.io.read`: the labelled frame (ASE
        units, results in a single-point calculator), with ``info["generator"]`` of the input."""
        from mlmd_lab.io import read

        out = self.calculate(atoms, folder, overwrite=overwrite)
        frame = read(out).frames[-1]
        if "generator" in atoms.info:
            frame.info.setdefault("generator", atoms.info["generator"])
        return frame

    def calculate_many(self, structures: Iterable[Atoms], root: str | os.PathLike) -> list[Path]:
        """:meth:`calculate` each structure in ``root/<index>-<structure hash[:8]>`` (resumable: completed
        folders are not run again); returns the output paths. For clusters, submit ``calculate`` per structure
        as tasks instead (e.g. with dask)."""
        root = Path(root)
        return [self.calculate(a, root / f"{i:05d}-{_structure_hash(a)[:8]}") for i, a in enumerate(structures)]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True, default=_json_default))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


# -- MPI -------------------------------------------------------------------------------------------------
@lru_cache(maxsize=32)
def _linked_mpi(executable: str) -> str | None:
    """The MPI a program is linked to (from ``ldd``): libmpi.so.40 is Open MPI, libmpi.so.12 MPICH."""
    try:
        text = subprocess.run(["ldd", executable], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    if "libmpi.so.40" in text or "openmpi" in text:
        return "openmpi"
    if "libmpi.so.12" in text or "mpich" in text:
        return "mpich"
    return None


def _resolve_launcher(launcher: str, program: str | None) -> str:
    """Absolute path of the MPI launcher; for a bare name, the first on PATH whose MPI matches the one the
    program links to (a virtual environment's MPICH ``mpirun`` must not start an Open MPI ``pw.x``)."""
    if os.sep in launcher:
        if not os.access(launcher, os.X_OK):
            raise MLMDError(f"MPI launcher {launcher} is not an executable file; check mpi=(launcher, n)")
        return launcher
    candidates = []
    for d in os.environ.get("PATH", "").split(os.pathsep):
        p = os.path.join(d, launcher)
        if os.path.isfile(p) and os.access(p, os.X_OK) and p not in candidates:
            candidates.append(p)
    if not candidates:
        raise MLMDError(f"MPI launcher {launcher!r} is not on PATH; install MPI (e.g. apt-get install openmpi-bin), "
                        "load its module, or give mpi=None to run serially")
    wanted = _linked_mpi(program) if program else None
    if wanted is None:
        return candidates[0]
    for p in candidates:
        if mpi_flavour(p) in (wanted, "unknown"):
            return p
    raise MLMDError(f"{program} is linked to {wanted} but every {launcher!r} on PATH ({', '.join(candidates)}) "
                    f"belongs to another MPI; give the matching launcher's full path, e.g. mpi=('/usr/bin/mpirun', n)")


def _mpi_argv(mpi: tuple[str, int] | None, argv: list[str], program: str | None) -> list[str]:
    """``argv`` under ``mpi = (launcher, ranks)`` (:func:`mlmd_lab.cluster.mpi.mpi_command`: root and Slurm-slot
    flags of Open MPI), with the launcher matched to the MPI ``program`` links to; ``argv`` alone for None."""
    if mpi is None:
        return argv
    launcher, n = mpi
    return mpi_command(argv, int(n), launcher=_resolve_launcher(str(launcher), program))
