"""Quantum ESPRESSO ``pw.x`` recipe (:class:`QuantumEspresso`) and its pseudopotential lookup
(:func:`qe_pseudopotentials`, UPF headers). Units: eV and Å at the interface; ``ecutwfc_ry``, ``degauss`` in Ry.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from ase import Atoms, units

from mlmd_lab.dft.recipes.base import Recipe, _file_md5, _mpi_argv, _tail, file_sha256, kpoint_grid
from mlmd_lab.errors import MLMDError, SCFNotConvergedError
from mlmd_lab.settings import kspacing_from_divisions, normalise_signature

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
        if self.mpi is None:
            # A pw.x linked to Open MPI and started without mpirun initialises as a singleton, which by default
            # starts an orted runtime daemon first: 2.5-3 s per run (Debian's pw.x, Si8: 7.4 s -> 4.6 s wall).
            # An isolated singleton skips it; serial pw.x needs nothing from it. ASE runs the command with
            # os.environ, so it is set there (only when unset; other MPIs ignore it).
            os.environ.setdefault("OMPI_MCA_ess_singleton_isolated", "1")
        profile = EspressoProfile(command=shlex.join(self._command_argv()), pseudo_dir=self.pseudo_dir)
        props = ["energy", "forces", *(["stress"] if periodic else [])]
        for attempt in range(SCF_ATTEMPTS):
            calc = Espresso(profile=profile, directory=str(folder), pseudopotentials=pps, input_data=input_data,
                            kpts=tuple(grid))
            atoms.calc = calc
            try:
                calc.calculate(atoms, props, all_changes)
                break
            except Exception as exc:  # pw.x exit status, or ASE failing to parse a broken output
                unconverged = _scf_not_converged(folder / "espresso.pwo")
                if unconverged and attempt + 1 < SCF_ATTEMPTS:
                    # The same physics, gentler mixing: kept for the record, tried again (see SCF_ATTEMPTS).
                    (folder / "espresso.pwo").replace(folder / f"espresso.unconverged-{attempt + 1}.pwo")
                    input_data = _gentler_scf(input_data)
                    continue
                if unconverged:
                    raise SCFNotConvergedError(self._unconverged_message(folder, input_data)) from None
                detail = (_tail(folder / "CRASH") or _tail(folder / "espresso.err")
                          or _tail(folder / "espresso.pwo", 8))
                raise MLMDError(f"pw.x failed in {folder} ({type(exc).__name__}: {exc}); its last words: "
                                f"{detail[:1500]} (check the settings, pseudopotentials and the full output "
                                "there)") from None
        out = folder / self.output_name
        if not out.is_file():
            raise MLMDError(f"pw.x wrote no {out.name} in {folder}; check the command {self.command!r}")
        if not self.keep_save:
            shutil.rmtree(folder / "pwscf.save", ignore_errors=True)
        return out

    def _unconverged_message(self, folder: Path, input_data: dict) -> str:
        electrons = input_data.get("electrons", {})
        runs = f"{SCF_ATTEMPTS} runs" if SCF_ATTEMPTS > 1 else "1 run"
        hint = ("with fixed occupations (smearing=None) a structure whose gap closes, e.g. a hot or strongly distorted "
                "cell, cannot converge: label it with smearing (e.g. smearing=('mv', 0.01), other settings, so other "
                "frames) or leave it out" if self.smearing is None else
                "try a larger smearing width, a smaller mixing_beta in input_data['electrons'], or check the "
                "structure for overlapping atoms")
        return (f"pw.x's SCF did not converge in {folder} ({runs}, the last with mixing_beta "
                f"{float(electrons.get('mixing_beta', 0.7)):g} and {int(electrons.get('electron_maxstep', 100))} "
                f"iterations); {hint}")


#: pw.x runs per calculation. A run that stops with "convergence NOT achieved" (charge sloshing in a distorted or
#: nearly metallic structure, e.g. a rattled Si8 at 900 K in the main job: 100 iterations at mixing_beta 0.7 went
#: back and forth at 1e-4 Ry) is run again with half the mixing and three times the iterations (at least 300),
#: the remedy of AiiDA-QE's PwBaseWorkChain (which lowers mixing_beta on this error). Mixing changes the path to
#: the ground state, not the ground state: the settings and their signature stay the same.
SCF_ATTEMPTS = 2


def _scf_not_converged(output: Path) -> bool:
    """pw.x's output ends with this message (followed by its timing report) when the SCF ran out of iterations."""
    try:
        with open(output, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 65536))
            return b"convergence NOT achieved" in handle.read()
    except OSError:
        return False


def _gentler_scf(input_data: dict) -> dict:
    """``input_data`` with electrons.mixing_beta halved (QE's default 0.7) and electron_maxstep tripled (QE's
    default 100), at least 300."""
    electrons = dict(input_data.get("electrons", {}))
    electrons["mixing_beta"] = 0.5 * float(electrons.get("mixing_beta", 0.7))
    electrons["electron_maxstep"] = max(300, 3 * int(electrons.get("electron_maxstep", 100)))
    return {**input_data, "electrons": electrons}


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
