"""DFT calculation recipes: one object per set of settings, running each calculation in its own folder.

A :class:`Recipe` knows its full settings (:meth:`~Recipe.settings`, JSON-serialisable: code, version, functional,
cutoffs, k-points, smearing, pseudopotential files with SHA-256 sums, command) and the part the database compares
(:meth:`~Recipe.signature_settings`, keys of :data:`mlmd_lab.settings.SIGNATURE_KEYS`, eV and Å⁻¹).
:meth:`~Recipe.calculate` runs one structure in a folder and returns the file that ``db.ingest`` reads:

==================  ==========================================  =====================================================
recipe              output (``calculate`` returns)              settings in the database
==================  ==========================================  =====================================================
QuantumEspresso     ``espresso.pwo`` (pw.x output; the input     read by :mod:`mlmd_lab.io.espresso` from the output
                    ``espresso.pwi`` beside it)                  and input: ``db.ingest(path)``
Vasp                ``vasprun.xml``                             read by :mod:`mlmd_lab.io.vasp`: ``db.ingest(path)``
PySCF               ``pyscf.xyz`` (extxyz: energy eV, forces     frames carry ``info["signature"]`` (used per frame by
                    eV/Å, stress eV/Å³, ASE sign)               the ingest); give the calculation's signature with
                                                                ``db.ingest(path, settings=ingest_settings(path))``
==================  ==========================================  =====================================================

So for any recipe: ``out = recipe.calculate(atoms, folder); db.ingest(out, settings=ingest_settings(out))``
(:func:`ingest_settings` returns None where the file itself holds the settings).

Every folder also gets ``mlmd_recipe.json`` (ignored by the ingest): the recipe name, its full settings and
signature, the input structure's content hash and ``info["generator"]`` provenance, the status and wall time.
Calling ``calculate`` again on a folder whose record shows the same structure and settings completed returns the
existing output without running again; a folder holding a different calculation is refused unless
``overwrite=True``.

Units: ASE's (eV, Å, eV/Å, eV/Å³) everywhere, except the parameters named after a code's own unit
(``ecutwfc_ry``, ``degauss`` in Ry; PySCF ``ke_cutoff`` in Hartree, as ``pyscf.pbc.gto.Cell.ke_cutoff``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms, units

from mlmd_lab.cluster.mpi import mpi_command, mpi_flavour
from mlmd_lab.errors import MLMDError
from mlmd_lab.files import atomic_write_text
from mlmd_lab.frames import canonical_json, content_hash
from mlmd_lab.settings import kspacing_from_divisions, normalise_signature

__all__ = [
    "RECORD_NAME",
    "PySCF",
    "QuantumEspresso",
    "Recipe",
    "Vasp",
    "default_recipe",
    "file_sha256",
    "ingest_settings",
    "kpoint_grid",
    "qe_pseudopotentials",
]

#: Name of the JSON record written into every calculation folder.
RECORD_NAME = "mlmd_recipe.json"
#: Default QE pseudopotential folder (Debian's quantum-espresso-data).
QE_PSEUDO_DIR = "/usr/share/espresso/pseudo"

#: QE UPF/header functional strings → canonical name (the UPF header of Si.pbe-rrkj says "SLA PW PBE PBE").
_UPF_XC = {"SLA PW PBE PBE": "PBE", "SLA PW PBX PBC": "PBE", "PBE": "PBE", "SLA PZ NOGX NOGC": "LDA", "PZ": "LDA",
           "SLA PW PSX PSC": "PBESOL", "PBESOL": "PBESOL", "SLA PW NOGX NOGC": "LDA",
           "SLA LYP B88 BLYP": "BLYP", "BLYP": "BLYP", "SLA PW TPSS TPSS": "TPSS"}
#: Canonical functional → QE input_dft.
_QE_INPUT_DFT = {"PBE": "PBE", "LDA": "PZ", "PBESOL": "PBESOL", "BLYP": "BLYP", "REVPBE": "REVPBE",
                 "RPBE": "RPBE", "PW91": "PW91", "SCAN": "SCAN", "TPSS": "TPSS"}
_QE_SMEARING = {"mv": "marzari-vanderbilt", "m-v": "marzari-vanderbilt", "cold": "marzari-vanderbilt",
                "marzari-vanderbilt": "marzari-vanderbilt", "gaussian": "gaussian", "gauss": "gaussian",
                "mp": "methfessel-paxton-1", "m-p": "methfessel-paxton-1", "methfessel-paxton": "methfessel-paxton-1",
                "fd": "fermi-dirac", "f-d": "fermi-dirac", "fermi-dirac": "fermi-dirac"}


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


# -- Quantum ESPRESSO ------------------------------------------------------------------------------------
def _upf_info(path: Path) -> dict[str, Any]:
    """Functional (canonical when known) and type (NC/US/PAW) from a UPF file's header."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            head = fh.read(20000)
    except OSError:
        return {}
    out: dict[str, Any] = {}
    m = re.search(r'functional="([^"]*)"', head) or re.search(r"Functional:\s*(.+)", head) or \
        re.search(r"^\s*(.+?)\s+Exchange-Correlation functional", head, re.M)
    if m:
        raw = " ".join(m.group(1).split()).upper()
        out["functional_raw"] = raw
        out["functional"] = _UPF_XC.get(raw)
    if m := re.search(r'pseudo_type="(\w+)"', head):
        out["type"] = m.group(1).upper()
    elif re.search(r'is_paw="(T|true|\.true\.)"', head, re.I):
        out["type"] = "PAW"
    elif re.search(r'is_ultrasoft="(T|true|\.true\.)"', head, re.I):
        out["type"] = "US"
    elif m := re.search(r"^\s*(NC|US|PAW)\s", head, re.M):
        out["type"] = m.group(1)
    return out


@lru_cache(maxsize=16)
def _pw_version(program: str) -> str | None:
    """pw.x version from the banner it prints when started without input (run in a scratch folder)."""
    with tempfile.TemporaryDirectory(prefix="mlmd-pwx-") as tmp:
        try:
            proc = subprocess.run([program], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
                                  cwd=tmp)
        except (OSError, subprocess.SubprocessError):
            return None
    m = re.search(r"Program PWSCF\s+v\.?\s*(\S+)", proc.stdout)
    return m.group(1) if m else None


class QuantumEspresso(Recipe):
    """Quantum ESPRESSO ``pw.x`` single points through ASE's ``Espresso`` calculator.

    Args:
        pseudo_dir: folder with the UPF files.
        pseudopotentials: ``{element: UPF file name}`` (in ``pseudo_dir``); every element of a structure needs one.
        ecutwfc_ry: wave-function cutoff (Ry).
        ecutrho_ry: charge-density cutoff (Ry); None: pw.x's default 4 × ecutwfc (use 8-12 × for US/PAW).
        kspacing: k-point spacing (Å⁻¹, 2π included, VASP's KSPACING convention): the Monkhorst-Pack grid is
            :func:`kpoint_grid`; ignored when ``kpts`` is given.
        kpts: explicit Monkhorst-Pack divisions ``(n1, n2, n3)`` (Γ-centred, no shift).
        smearing: ``(method, degauss in Ry)`` with a pw.x method (``"mv"``, ``"gaussian"``, ``"mp"``, ``"fd"``),
            or None for fixed occupations (insulators).
        xc: functional written as ``input_dft`` (``"PBE"``, ``"PBESOL"``, ``"LDA"``, ...), so pw.x prints and the
            database records it by name; None: the pseudopotentials' functional.
        command: the pw.x executable (or a wrapper such as ``"apptainer exec qe.sif pw.x"``).
        mpi: None (serial) or ``(launcher, n_processes)``, e.g. ``("mpirun", 4)``; ``--allow-run-as-root`` is
            added for Open MPI when running as root, and a bare launcher name is resolved to one matching the
            MPI pw.x links to.
        input_data: further pw.x namelist entries, e.g. ``{"electrons": {"conv_thr": 1e-10}}``.
        keep_save: keep pw.x's ``pwscf.save`` folder (charge density and wave functions; large) after a
            successful run; by default it is deleted and ``pwscf.xml`` kept.

    ``calculate`` writes ``espresso.pwi`` and runs pw.x in the folder (``tprnfor`` on; ``tstress`` on for
    periodic cells), returning ``espresso.pwo``.
    """

    name = "qe"
    code = "qe"
    output_name = "espresso.pwo"
    output_needs_settings = False

    def __init__(self, pseudo_dir: str | os.PathLike = QE_PSEUDO_DIR,
                 pseudopotentials: dict[str, str] | None = None, ecutwfc_ry: float = 40.0,
                 ecutrho_ry: float | None = None, kspacing: float = 0.25, kpts: Sequence[int] | None = None,
                 smearing: tuple[str, float] | None = ("mv", 0.01), xc: str | None = "PBE", command: str = "pw.x",
                 mpi: tuple[str, int] | None = None, input_data: dict[str, dict[str, Any]] | None = None,
                 keep_save: bool = False) -> None:
        self.pseudo_dir = str(pseudo_dir)
        self.keep_save = bool(keep_save)
        self.pseudopotentials = dict(pseudopotentials if pseudopotentials is not None else {"Si": "Si.pbe-rrkj.UPF"})
        self.ecutwfc_ry = float(ecutwfc_ry)
        self.ecutrho_ry = None if ecutrho_ry is None else float(ecutrho_ry)
        self.kspacing = float(kspacing)
        self.kpts = None if kpts is None else [int(k) for k in kpts]
        if smearing is not None:
            method, width = smearing
            if str(method).lower() not in _QE_SMEARING:
                raise MLMDError(f"unknown pw.x smearing {method!r}; use one of 'mv', 'gaussian', 'mp', 'fd' or None")
            smearing = (str(method).lower(), float(width))
        self.smearing = smearing
        self.xc = None if xc is None else str(xc).upper()
        if self.xc is not None and self.xc not in _QE_INPUT_DFT:
            raise MLMDError(f"xc {xc!r} is not one this recipe can name for pw.x; use one of "
                            f"{sorted(_QE_INPUT_DFT)} or xc=None to take the pseudopotentials' functional")
        self.command = command
        self.mpi = None if mpi is None else (str(mpi[0]), int(mpi[1]))
        self.input_data = {k: dict(v) for k, v in (input_data or {}).items()}

    # -- settings ---------------------------------------------------------------------------------------
    def _program(self) -> str | None:
        parts = shlex.split(self.command)
        return shutil.which(parts[0]) if parts else None

    def _elements(self, atoms: Atoms | None) -> list[str]:
        return sorted(set(atoms.get_chemical_symbols())) if atoms is not None else sorted(self.pseudopotentials)

    def _pseudo_records(self, atoms: Atoms | None) -> dict[str, dict[str, Any]]:
        out = {}
        for el in self._elements(atoms):
            name = self.pseudopotentials.get(el)
            if name is None:
                continue
            path = Path(self.pseudo_dir) / name
            rec: dict[str, Any] = {"file": name}
            if path.is_file():
                rec.update(sha256=file_sha256(path), md5=_file_md5(path), **_upf_info(path))
            out[el] = rec
        return out

    def _grid(self, atoms: Atoms | None) -> list[int] | None:
        if self.kpts is not None:
            return list(self.kpts)
        return kpoint_grid(atoms, self.kspacing) if atoms is not None else None

    def _functional(self, pps: dict[str, dict[str, Any]]) -> str | None:
        if self.xc is not None:
            return self.xc
        found = {rec.get("functional") for rec in pps.values()}
        return found.pop() if len(found) == 1 else None

    def _command_argv(self) -> list[str]:
        return _mpi_argv(self.mpi, shlex.split(self.command), self._program())

    def settings(self, atoms: Atoms | None = None) -> dict[str, Any]:
        pps = self._pseudo_records(atoms)
        program = self._program()
        try:
            argv = self._command_argv()
        except MLMDError:
            argv = shlex.split(self.command)
        return {
            "code": "qe", "program": "pw.x",
            "code_version": _pw_version(program) if program and len(shlex.split(self.command)) == 1 else None,
            "xc": self._functional(pps), "input_dft": _QE_INPUT_DFT.get(self.xc) if self.xc else None,
            "ecutwfc_ry": self.ecutwfc_ry, "ecutrho_ry": self.ecutrho_ry if self.ecutrho_ry else 4 * self.ecutwfc_ry,
            "kspacing": None if self.kpts is not None else self.kspacing, "kpts": self._grid(atoms),
            "smearing": None if self.smearing is None else {"method": self.smearing[0], "degauss_ry": self.smearing[1]},
            "occupations": "fixed" if self.smearing is None else "smearing",
            "pseudo_dir": self.pseudo_dir, "pseudopotentials": pps, "input_data": self.input_data,
            "command": argv, "tprnfor": True, "tstress": atoms is None or bool(atoms.pbc.all()),
        }

    def signature_settings(self, atoms: Atoms | None = None) -> dict[str, Any]:
        pps = self._pseudo_records(atoms)
        grid = self._grid(atoms)
        ecutrho = self.ecutrho_ry if self.ecutrho_ry else 4 * self.ecutwfc_ry
        if atoms is not None and grid is not None:
            kspacing = kspacing_from_divisions(atoms.cell.array, grid)
        else:
            kspacing = self.kspacing if self.kpts is None else None
        smearing, sigma = ("fixed", 0.0) if self.smearing is None else (
            _QE_SMEARING[self.smearing[0]], self.smearing[1] * units.Ry)
        md5 = {el: rec["md5"] for el, rec in pps.items() if rec.get("md5")}
        return normalise_signature({
            "code": "qe", "code_version": self.settings(atoms)["code_version"], "xc": self._functional(pps),
            "vdw": None, "encut": self.ecutwfc_ry * units.Ry, "ecutrho": ecutrho * units.Ry, "kpoints": grid,
            "kspacing": kspacing, "gamma_only": grid == [1, 1, 1] if grid is not None else None,
            "smearing": smearing, "sigma": sigma, "spin": False, "hubbard_u": None,
            "pseudopotentials": {el: rec["file"] for el, rec in pps.items()} or None,
            "extra": {"pseudopotential_md5": md5} if md5 else {},
        })

    def check(self, atoms: Atoms | None = None) -> None:
        parts = shlex.split(self.command)
        if not parts or shutil.which(parts[0]) is None:
            raise MLMDError(f"pw.x command {self.command!r} not found on PATH; install Quantum ESPRESSO (Debian: "
                            "apt-get install quantum-espresso quantum-espresso-data), load its module, or give "
                            "command= (e.g. 'apptainer exec quantum-espresso.sif pw.x')")
        if not Path(self.pseudo_dir).is_dir():
            raise MLMDError(f"pseudopotential folder {self.pseudo_dir} does not exist; give pseudo_dir= (Debian's "
                            f"quantum-espresso-data installs {QE_PSEUDO_DIR})")
        for el in self._elements(atoms):
            name = self.pseudopotentials.get(el)
            if name is None:
                raise MLMDError(f"no pseudopotential given for {el}; add it to pseudopotentials= "
                                f"(UPF files in {self.pseudo_dir})")
            if not (Path(self.pseudo_dir) / name).is_file():
                raise MLMDError(f"pseudopotential {name} for {el} not found in {self.pseudo_dir}; check the file "
                                "name or pseudo_dir=")
        if atoms is not None and atoms.cell.rank < 3:
            raise MLMDError("pw.x needs a 3-D cell; put molecules in a box (atoms.center(vacuum=6.0); "
                            "atoms.pbc = True)")
        if self.mpi is not None:
            _mpi_argv(self.mpi, shlex.split(self.command), self._program())

    def _run(self, atoms: Atoms, folder: Path) -> Path:
        from ase.calculators.calculator import all_changes
        from ase.calculators.espresso import Espresso, EspressoProfile

        for name in ("espresso.pwo", "CRASH"):
            (folder / name).unlink(missing_ok=True)
        periodic = bool(atoms.pbc.all())
        grid = self._grid(atoms)  # 1 along non-periodic directions
        atoms.pbc = True  # pw.x is periodic; a molecule sits in its box
        input_data: dict[str, dict[str, Any]] = {
            "control": {"calculation": "scf", "tprnfor": True, "tstress": periodic, "outdir": ".",
                        "prefix": "pwscf", "disk_io": "low"},
            "system": {"ecutwfc": self.ecutwfc_ry},
            "electrons": {"conv_thr": 1e-8 * len(atoms)},
        }
        if self.ecutrho_ry:
            input_data["system"]["ecutrho"] = self.ecutrho_ry
        if self.xc:
            input_data["system"]["input_dft"] = _QE_INPUT_DFT[self.xc]
        if self.smearing is not None:
            input_data["system"].update(occupations="smearing", smearing=self.smearing[0], degauss=self.smearing[1])
        for section, values in self.input_data.items():
            input_data.setdefault(section, {}).update(values)
        pps = {el: self.pseudopotentials[el] for el in self._elements(atoms)}
        profile = EspressoProfile(command=shlex.join(self._command_argv()), pseudo_dir=self.pseudo_dir)
        calc = Espresso(profile=profile, directory=str(folder), pseudopotentials=pps, input_data=input_data,
                        kpts=tuple(grid))
        atoms.calc = calc
        props = ["energy", "forces", *(["stress"] if periodic else [])]
        try:
            calc.calculate(atoms, props, all_changes)
        except Exception as exc:  # pw.x exit status, or ASE failing to parse a broken output
            detail = _tail(folder / "CRASH") or _tail(folder / "espresso.err") or _tail(folder / "espresso.pwo", 8)
            raise MLMDError(f"pw.x failed in {folder} ({type(exc).__name__}: {exc}); its last words: {detail[:1500]} "
                            "(check the settings, pseudopotentials and the full output there)") from None
        out = folder / self.output_name
        if not out.is_file():
            raise MLMDError(f"pw.x wrote no {out.name} in {folder}; check the command {self.command!r}")
        if not self.keep_save:
            shutil.rmtree(folder / "pwscf.save", ignore_errors=True)
        return out


def qe_pseudopotentials(elements: Iterable[str], pseudo_dir: str | os.PathLike = QE_PSEUDO_DIR,
                        functional: str = "PBE") -> dict[str, str]:
    """Pick one UPF per element from ``pseudo_dir`` whose header names ``functional`` (scalar-relativistic,
    norm-conserving preferred, then ultrasoft, then PAW; ties by name). Raises MLMDError for an element without one."""
    folder = Path(pseudo_dir)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".upf") if folder.is_dir() else []
    out = {}
    for el in sorted(set(elements)):
        cands = []
        for p in files:
            m = re.match(r"([A-Z][a-z]?)(?=[._-])", p.name)
            if not m or m.group(1) != el or ".rel-" in p.name or "coulomb" in p.name:
                continue
            info = _upf_info(p)
            if info.get("functional") == functional.upper():
                cands.append(({"NC": 0, "US": 1, "PAW": 2}.get(info.get("type", ""), 3), p.name))
        if not cands:
            raise MLMDError(f"no {functional} pseudopotential for {el} in {folder}; download one (e.g. SSSP or "
                            "pslibrary) into pseudo_dir, or give pseudopotentials= explicitly")
        out[el] = min(cands)[1]
    return out


# -- VASP ------------------------------------------------------------------------------------------------
class Vasp(Recipe):
    """VASP single points through ASE's ``Vasp`` calculator (``vasprun.xml`` is what the database reads).

    POTCARs come from ``$VASP_PP_PATH/potpaw_PBE/<element><setup>/POTCAR`` (LDA: ``potpaw``) as ASE looks them
    up; their SHA-256 and title lines are recorded. VASP itself is licensed and not shipped: build it into the
    container of ``containers/vasp.def`` or load your site's module.

    Args:
        xc: ASE's ``xc`` (sets GGA and the POTCAR family): ``"PBE"``, ``"PBEsol"``, ``"LDA"``, ``"SCAN"``, ...
        encut: plane-wave cutoff (eV).
        kspacing: VASP KSPACING (Å⁻¹, 2π included); ``kgamma`` Γ-centred.
        setups: ASE ``setups`` (``{"Fe": "_pv"}``, ``"recommended"``, ...); None: the plain element POTCARs.
        ismear, sigma: smearing (VASP ISMEAR; SIGMA in eV).
        prec, ediff: PREC and EDIFF (eV).
        command: how to run VASP (e.g. ``"mpirun -np 16 vasp_std"``); None: ``$ASE_VASP_COMMAND``.
        incar: further INCAR tags as ASE keywords (``{"ispin": 2, "lreal": "Auto"}``).
    """

    name = "vasp"
    code = "vasp"
    output_name = "vasprun.xml"
    output_needs_settings = False

    def __init__(self, xc: str = "PBE", encut: float = 520.0, kspacing: float = 0.25, kgamma: bool = True,
                 setups: str | dict[str, str] | None = None, ismear: int = 0, sigma: float = 0.05,
                 prec: str = "Accurate", ediff: float = 1e-6, command: str | None = None,
                 incar: dict[str, Any] | None = None) -> None:
        self.xc = xc
        self.encut = float(encut)
        self.kspacing = float(kspacing)
        self.kgamma = bool(kgamma)
        self.setups = setups
        self.ismear = int(ismear)
        self.sigma = float(sigma)
        self.prec = prec
        self.ediff = float(ediff)
        self.command = command
        self.incar = dict(incar or {})

    def _parameters(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "xc": self.xc, "encut": self.encut, "kspacing": self.kspacing, "kgamma": self.kgamma,
            "ismear": self.ismear, "sigma": self.sigma, "prec": self.prec, "ediff": self.ediff,
            "ibrion": -1, "nsw": 0, "isif": 2, "lwave": False, "lcharg": False, "lreal": False,
        }
        if self.setups is not None:
            params["setups"] = self.setups
        params.update(self.incar)
        return params

    def calculator(self, folder: str | os.PathLike):
        """ASE's ``Vasp`` calculator with this recipe's parameters, writing to ``folder``."""
        from ase.calculators.vasp import Vasp as AseVasp

        return AseVasp(directory=str(folder), command=self.command, **self._parameters())

    def _potcars(self, atoms: Atoms) -> list[str]:
        calc = self.calculator(tempfile.gettempdir())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Loaded VASP_PP_PATH from environment"
            calc.initialize(atoms)
        return list(calc.ppp_list)

    def write_input(self, atoms: Atoms, folder: str | os.PathLike) -> Path:
        """Write INCAR, POSCAR, POTCAR (and KPOINTS if any) into ``folder`` without running VASP; returns it."""
        self.check(atoms, need_command=False)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        calc = self.calculator(folder)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            calc.write_input(atoms, ["energy", "forces", "stress"])
        return folder

    def settings(self, atoms: Atoms | None = None) -> dict[str, Any]:
        potcars = []
        if atoms is not None and os.environ.get("VASP_PP_PATH"):
            try:
                for p in self._potcars(atoms):
                    with open(p, "rb") as fh:
                        title = fh.readline().decode("ascii", "replace").strip()
                    potcars.append({"path": os.path.relpath(p, os.environ["VASP_PP_PATH"]), "sha256": file_sha256(p),
                                    "title": title})
            except (RuntimeError, OSError):
                potcars = []
        return {"code": "vasp", "code_version": None, "parameters": self._parameters(), "potcars": potcars,
                "vasp_pp_path": os.environ.get("VASP_PP_PATH"),
                "command": self.command or os.environ.get("ASE_VASP_COMMAND") or os.environ.get("VASP_COMMAND")}

    def signature_settings(self, atoms: Atoms | None = None) -> dict[str, Any]:
        smearing = {-5: "tetrahedron", -1: "fermi-dirac", 0: "gaussian"}.get(
            self.ismear, f"methfessel-paxton-{self.ismear}" if self.ismear > 0 else None)
        pps = None
        if atoms is not None:
            titles = {}
            for rec in self.settings(atoms)["potcars"]:
                el = rec["title"].split()[1].split("_")[0] if len(rec["title"].split()) > 1 else None
                if el:
                    titles[el] = rec["title"]
            pps = titles or None
        return normalise_signature({
            "code": "vasp", "xc": str(self.xc).upper(), "encut": self.encut, "prec": self.prec,
            "kspacing": self.kspacing, "smearing": smearing, "sigma": self.sigma,
            "spin": bool(int(self.incar.get("ispin", 1)) == 2), "pseudopotentials": pps,
        })

    def check(self, atoms: Atoms | None = None, need_command: bool = True) -> None:
        pp = os.environ.get("VASP_PP_PATH")
        if not pp:
            raise MLMDError("VASP_PP_PATH is not set; export it to the folder holding potpaw_PBE/ (your licensed "
                            "VASP POTCARs)")
        if not Path(pp).is_dir():
            raise MLMDError(f"VASP_PP_PATH={pp} is not a folder; point it at the folder holding potpaw_PBE/")
        if atoms is not None:
            try:
                self._potcars(atoms)
            except RuntimeError as exc:
                raise MLMDError(f"a POTCAR is missing under VASP_PP_PATH={pp} ({' '.join(str(exc).split())}); "
                                "check the setups= and the potpaw folder") from None
        if need_command:
            cmd = self.command or os.environ.get("ASE_VASP_COMMAND") or os.environ.get("VASP_COMMAND")
            if not cmd:
                raise MLMDError("no VASP command: give command= (e.g. 'mpirun -np 16 vasp_std') or set "
                                "ASE_VASP_COMMAND")
            exe = shlex.split(cmd)[0]
            if shutil.which(exe) is None:
                raise MLMDError(f"{exe} (from the VASP command {cmd!r}) is not on PATH; load your VASP module or "
                                "use the container of containers/vasp.def")

    def _run(self, atoms: Atoms, folder: Path) -> Path:
        from ase.calculators.calculator import all_changes

        calc = self.calculator(folder)
        atoms.calc = calc
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                calc.calculate(atoms, ["energy", "forces", "stress"], all_changes)
        except Exception as exc:
            raise MLMDError(f"VASP failed in {folder} ({type(exc).__name__}: {exc}); its last words: "
                            f"{_tail(folder / 'vasp.out')[:1500]}") from None
        out = folder / self.output_name
        if not out.is_file():
            raise MLMDError(f"VASP wrote no vasprun.xml in {folder}; check the command and vasp.out")
        return out


# -- PySCF -----------------------------------------------------------------------------------------------
_GTH_PSEUDO = {"PBE": "gth-pbe", "LDA": "gth-pade", "PADE": "gth-pade", "BLYP": "gth-blyp", "BP": "gth-bp",
               "HCTH120": "gth-hcth120", "HCTH407": "gth-hcth407"}


class PySCF(Recipe):
    """PySCF Kohn-Sham DFT: Gaussian basis sets, all-electron for molecules, GTH pseudopotentials for cells.

    Molecules (no periodic direction) use ``pyscf.gto``/``pyscf.dft``; periodic cells ``pyscf.pbc``:

    - Γ-point (``kpts=None``) without stress: ``RKS``/``UKS`` with ``multigrid_numint()`` (needed for Γ-point
      forces; on Si8 about 5x faster than the k-point code);
    - with ``stress=True`` or a k-point mesh: the k-point code (``KRKS``/``KUKS``; ``[1, 1, 1]`` for Γ), the only
      one with a stress. PySCF's ``get_stress`` returns Hartree/Bohr³; it is converted here with Hartree/Bohr³
      (PySCF's own ASE calculator multiplies by Hartree/Bohr, a factor Bohr² ≈ 0.28 too small) and has ASE's sign
      ``σ = (1/V) ∂E/∂ε``; tests check it against finite strain differences.

    The SCF runs once per structure; forces and stress come from the same converged density. Results are in eV,
    eV/Å, eV/Å³.

    Args:
        method: ``"RKS"`` (closed shell) or ``"UKS"`` (spin-polarised).
        xc: PySCF/libxc functional name (``"PBE"``, ``"PBE0"``, ``"B3LYP"``, ``"LDA"``...).
        basis: basis set; None: ``"def2-svp"`` for molecules, ``"gth-dzvp"`` for cells (GTH-SZV gives forces
            about 40 % off).
        pseudo: pseudopotential for cells; None: the GTH set of ``xc`` (``"gth-pbe"`` for PBE); molecules are
            all-electron unless given.
        ke_cutoff: kinetic-energy cutoff of the density grid (**Hartree**, ``Cell.ke_cutoff``); PySCF's default
            grid is far finer (and slower) than needed.
        kpts: None (Γ point) or Monkhorst-Pack divisions ``(n1, n2, n3)``.
        stress: compute the stress of periodic cells (k-point code; several times slower).
        charge, spin: total charge and 2S (number of unpaired electrons).
        conv_tol: SCF convergence (Hartree); max_memory: MB; threads: OpenMP threads (None: PySCF's default).
    """

    name = "pyscf"
    code = "pyscf"
    output_name = "pyscf.xyz"
    output_needs_settings = True

    def __init__(self, method: str = "RKS", xc: str = "PBE", basis: str | None = None, pseudo: str | None = None,
                 ke_cutoff: float = 40.0, kpts: Sequence[int] | None = None, stress: bool = False, charge: int = 0,
                 spin: int = 0, conv_tol: float = 1e-9, max_memory: int = 4000, threads: int | None = None) -> None:
        method = str(method).upper()
        if method not in ("RKS", "UKS"):
            raise MLMDError(f"PySCF method must be 'RKS' or 'UKS', not {method!r}")
        self.method = method
        self.xc = str(xc)
        self.basis = basis
        self.pseudo = pseudo
        self.ke_cutoff = float(ke_cutoff)
        self.kpts = None if kpts is None else [int(k) for k in kpts]
        self.stress = bool(stress)
        self.charge = int(charge)
        self.spin = int(spin)
        self.conv_tol = float(conv_tol)
        self.max_memory = int(max_memory)
        self.threads = threads

    @staticmethod
    def _periodic(atoms: Atoms | None) -> bool | None:
        if atoms is None:
            return None
        if atoms.pbc.any() and not atoms.pbc.all():
            raise MLMDError("PySCF recipes handle molecules (pbc all False) or 3-D periodic cells; slabs with "
                            "mixed pbc are not supported: make the cell 3-D periodic with vacuum")
        return bool(atoms.pbc.all())

    def _basis(self, periodic: bool | None) -> str | None:
        if self.basis is not None:
            return self.basis
        return None if periodic is None else ("gth-dzvp" if periodic else "def2-svp")

    def _pseudo(self, periodic: bool | None) -> str | None:
        if self.pseudo is not None or periodic is False:
            return self.pseudo
        return _GTH_PSEUDO.get(self.xc.upper())

    def _path(self, periodic: bool | None) -> str | None:
        if periodic is None:
            return None
        if not periodic:
            return f"mol-{self.method}"
        if self.kpts is None and not self.stress:
            return f"{self.method}-gamma-multigrid"
        return f"K{self.method}-fftdf"

    def settings(self, atoms: Atoms | None = None) -> dict[str, Any]:
        periodic = self._periodic(atoms)
        try:
            import pyscf

            version = pyscf.__version__
        except ImportError:
            version = None
        return {
            "code": "pyscf", "code_version": version, "method": self.method, "xc": self.xc,
            "basis": self._basis(periodic), "pseudo": self._pseudo(periodic),
            "ke_cutoff_ha": self.ke_cutoff if periodic is not False else None,
            "kpts": (self.kpts or [1, 1, 1]) if periodic else None, "stress": self.stress and periodic is not False,
            "charge": self.charge, "spin": self.spin, "conv_tol_ha": self.conv_tol, "path": self._path(periodic),
            "periodic": periodic,
        }

    def signature_settings(self, atoms: Atoms | None = None) -> dict[str, Any]:
        periodic = self._periodic(atoms)
        basis, pseudo = self._basis(periodic), self._pseudo(periodic)
        grid = (self.kpts or [1, 1, 1]) if periodic else None
        elements = sorted(set(atoms.get_chemical_symbols())) if atoms is not None else []
        return normalise_signature({
            "code": "pyscf", "code_version": self.settings(atoms)["code_version"], "xc": self.xc.upper(),
            "vdw": None, "encut": None,
            "ecutrho": self.ke_cutoff * units.Hartree if periodic is not False else None,
            "kpoints": grid, "gamma_only": grid == [1, 1, 1] if grid is not None else None,
            "kspacing": kspacing_from_divisions(atoms.cell.array, grid) if grid is not None else None,
            "smearing": "fixed", "sigma": 0.0, "spin": self.method == "UKS", "hubbard_u": None,
            "pseudopotentials": {el: pseudo or "all-electron" for el in elements} or None,
            "extra": {"basis": basis, "charge": self.charge, "multiplicity": self.spin + 1,
                      "periodic": periodic},
        })

    def check(self, atoms: Atoms | None = None) -> None:
        try:
            import pyscf  # noqa: F401
        except ImportError:
            raise MLMDError("PySCF is not installed; pip install 'pyscf>=2.5' (it is a dependency of mlmd_lab: "
                            "re-run scripts/bootstrap.sh)") from None
        periodic = self._periodic(atoms)
        if periodic and self._pseudo(periodic) is None:
            raise MLMDError(f"no GTH pseudopotential set known for xc={self.xc!r} in periodic PySCF; give "
                            "pseudo= (e.g. 'gth-pbe') and a matching basis=")
        if periodic and atoms.cell.rank < 3:
            raise MLMDError("periodic PySCF needs a 3-D cell; set atoms.cell")

    # -- computing ------------------------------------------------------------------------------------
    def _build(self, atoms: Atoms, stdout: Any = None):
        periodic = self._periodic(atoms)
        geometry = [[s, tuple(p)] for s, p in zip(atoms.get_chemical_symbols(), atoms.positions, strict=True)]
        common = {"atom": geometry, "basis": self._basis(periodic), "charge": self.charge, "spin": self.spin,
                  "unit": "Angstrom", "verbose": 4 if stdout is not None else 0, "max_memory": self.max_memory}
        if stdout is not None:
            common["stdout"] = stdout
        if periodic:
            from pyscf.pbc import gto as pgto

            cell = pgto.Cell()
            for key, value in common.items():
                setattr(cell, key, value)
            cell.a = np.asarray(atoms.cell.array)
            cell.pseudo = self._pseudo(periodic)
            cell.ke_cutoff = self.ke_cutoff
            cell.build()
            return cell
        from pyscf import gto

        mol = gto.Mole()
        for key, value in common.items():
            setattr(mol, key, value)
        if self.pseudo:
            mol.ecp = self.pseudo
        mol.build()
        return mol

    def compute(self, atoms: Atoms, properties: Sequence[str] = ("energy", "forces", "stress"),
                log: str | os.PathLike | None = None, chkfile: str | os.PathLike | None = None) -> dict[str, Any]:
        """Run the SCF and return ``{"energy": eV, "forces": (N, 3) eV/Å, "stress": (6,) eV/Å³ Voigt}`` as asked
        (stress only for periodic cells and with ``stress=True`` or a k-point mesh).

        Args:
            log: file for PySCF's output (verbose 4); None: silent.
            chkfile: PySCF checkpoint file; None: none written.

        Raises MLMDError when the SCF does not converge.
        """
        self.check(atoms)
        from pyscf import lib

        if self.threads:
            lib.num_threads(int(self.threads))
        if log is None:
            return self._compute(atoms, properties, None, chkfile)
        with open(log, "w") as fh:
            return self._compute(atoms, properties, fh, chkfile)

    def _compute(self, atoms: Atoms, properties: Sequence[str], stdout: Any, chkfile: Any) -> dict[str, Any]:
        periodic = self._periodic(atoms)
        want_forces = "forces" in properties
        want_stress = "stress" in properties and periodic and (self.stress or self.kpts is not None)
        system = self._build(atoms, stdout)
        if not periodic:
            from pyscf import dft

            mf = (dft.RKS if self.method == "RKS" else dft.UKS)(system)
        elif self._path(True).startswith("K") or want_stress:
            from pyscf.pbc import dft as pdft

            kpts = system.make_kpts(self.kpts or [1, 1, 1])
            mf = (pdft.KRKS if self.method == "RKS" else pdft.KUKS)(system, kpts=kpts)
        else:
            from pyscf.pbc import dft as pdft

            mf = (pdft.RKS if self.method == "RKS" else pdft.UKS)(system).multigrid_numint()
        mf.xc = self.xc
        mf.chkfile = str(chkfile) if chkfile else None
        mf.conv_tol = self.conv_tol
        mf.max_memory = self.max_memory
        energy = mf.kernel()
        if not mf.converged:
            raise MLMDError(f"PySCF SCF did not converge for {atoms.get_chemical_formula()} ({self._path(periodic)}); "
                            "check the geometry (overlapping atoms?), try conv_tol larger, method='UKS' with spin=, "
                            "or a smaller basis")
        out: dict[str, Any] = {"energy": float(energy) * units.Hartree}
        if want_forces or want_stress:
            import pyscf.grad  # noqa: F401  (registers mf.Gradients for molecules)
            import pyscf.pbc.grad  # noqa: F401

            grad = mf.Gradients()
            if want_forces:
                out["forces"] = -np.asarray(grad.kernel()) * (units.Hartree / units.Bohr)
            if want_stress:
                sigma = np.asarray(grad.get_stress())  # Hartree/Bohr³, (1/V) dE/dε
                sigma = 0.5 * (sigma + sigma.T) * (units.Hartree / units.Bohr**3)
                out["stress"] = sigma.ravel()[[0, 4, 8, 5, 2, 1]]
        return out

    def as_calculator(self):
        """An ASE calculator (energy, forces, stress) evaluating this recipe in memory (no folder); e.g. for
        :func:`mlmd_lab.dft.generators.md_snapshots` or ASE optimisers."""
        from ase.calculators.calculator import Calculator, all_changes

        recipe = self

        class PySCFRecipeCalculator(Calculator):
            implemented_properties = ["energy", "free_energy", "forces", "stress"]

            def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
                super().calculate(atoms, properties, system_changes)
                res = recipe.compute(self.atoms, ("energy", "forces", "stress"))
                res["free_energy"] = res["energy"]
                self.results = res

        return PySCFRecipeCalculator()

    def _run(self, atoms: Atoms, folder: Path) -> Path:
        from mlmd_lab.frames import labelled_atoms
        from mlmd_lab.io.extxyz import write_extxyz

        (folder / self.output_name).unlink(missing_ok=True)
        try:
            res = self.compute(atoms, ("energy", "forces", "stress"), log=folder / "pyscf.log")
        except MLMDError:
            raise
        except Exception as exc:  # PySCF raises plain exceptions (unknown basis, out of memory, ...)
            raise MLMDError(f"PySCF failed for {atoms.get_chemical_formula()} in {folder} ({type(exc).__name__}: "
                            f"{exc}); check that basis={self._basis(self._periodic(atoms))!r} and the pseudopotential "
                            f"exist for every element, and see {folder / 'pyscf.log'}") from None
        info = {"step": 0, "converged": True, "recipe": self.name,
                "signature": self.signature_settings(atoms),
                "dft_settings": json.dumps(self.settings(atoms), sort_keys=True, default=_json_default)}
        gen = atoms.info.get("generator")
        if isinstance(gen, dict):
            info["generator"] = gen
            info["provenance"] = json.dumps(gen, sort_keys=True, default=_json_default)
        frame = labelled_atoms(atoms.get_chemical_symbols(), atoms.positions, cell=atoms.cell.array, pbc=atoms.pbc,
                               energy=res["energy"], free_energy=res["energy"], forces=res["forces"],
                               stress=res.get("stress"), info=info)
        out = folder / self.output_name
        write_extxyz(out, [frame])
        return out


# -- default ---------------------------------------------------------------------------------------------
def default_recipe(atoms: Atoms, pseudo_dir: str | os.PathLike = QE_PSEUDO_DIR) -> Recipe:
    """A reasonable recipe for a structure on this machine (check and adapt the settings for production):

    - molecules (no periodic direction): :class:`PySCF` (RKS PBE/def2-SVP, all-electron; UKS when the electron
      count is odd);
    - periodic cells, when ``pw.x`` is on PATH and ``pseudo_dir`` has a PBE UPF for every element:
      :class:`QuantumEspresso` (40 Ry, 8 × that for the density with ultrasoft/PAW pseudopotentials,
      k-spacing 0.25 Å⁻¹, Marzari-Vanderbilt 0.01 Ry) — plane waves, fast k-points, stress included;
    - other periodic cells: :class:`PySCF` at Γ (GTH-DZVP, GTH-PBE, 40 Ha) with stress (k-point code): only sensible
      for cells large enough for Γ sampling and small enough for PySCF (tens of atoms).
    """
    if not atoms.pbc.any():
        n_electrons = int(atoms.numbers.sum())
        return PySCF(method="UKS" if n_electrons % 2 else "RKS", spin=n_electrons % 2)
    if shutil.which("pw.x"):
        try:
            pps = qe_pseudopotentials(atoms.get_chemical_symbols(), pseudo_dir)
        except MLMDError:
            pps = None
        if pps:
            types = {_upf_info(Path(pseudo_dir) / f).get("type") for f in pps.values()}
            hard = bool(types & {"US", "PAW"})
            return QuantumEspresso(pseudo_dir=pseudo_dir, pseudopotentials=pps, ecutwfc_ry=40.0,
                                   ecutrho_ry=320.0 if hard else None)
    return PySCF(stress=True)
