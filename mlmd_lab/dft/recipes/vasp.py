"""VASP recipe (:class:`Vasp`): ASE's ``Vasp`` calculator, POTCARs from ``$VASP_PP_PATH`` with their
SHA-256 recorded; ``vasprun.xml`` is what the database reads. Units: eV and Å (``encut`` in eV).
"""

from __future__ import annotations

import os
import shlex
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from ase import Atoms

from mlmd_lab.dft.recipes.base import Recipe, _tail, file_sha256
from mlmd_lab.errors import MLMDError
from mlmd_lab.settings import normalise_signature


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
