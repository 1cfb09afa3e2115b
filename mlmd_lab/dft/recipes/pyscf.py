"""PySCF recipe (:class:`PySCF`): Kohn-Sham DFT with Gaussian basis sets, all-electron for molecules, GTH
pseudopotentials for cells; writes extxyz (energy eV, forces eV/Å, stress eV/Å³). ``ke_cutoff`` in Hartree.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms, units

from mlmd_lab.dft.recipes.base import Recipe, _json_default
from mlmd_lab.errors import MLMDError, SCFNotConvergedError
from mlmd_lab.settings import kspacing_from_divisions, normalise_signature

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
        conv_tol: SCF convergence (Hartree); max_memory: MB.
        threads: OpenMP and BLAS threads of one calculation. None (default): 1 for molecules, PySCF's default (the
            cores) for cells. Molecules get one thread because more were measured slower, on an idle machine too
            (``benchmarks/bench_pyscf_threads.py``, 2 cores, PBE/def2-SVP energy+forces, medians of two runs):
            water 0.32-0.35 s per calculation on one thread, 0.71-0.72 s on two; methanol 1.9-2.0 s against
            2.1-2.9 s. With another process on one of the cores (a shared JupyterHub, the test suite): water 0.32-0.35
            s against 0.70-0.99 s, methanol 1.9-2.0 s against 4.8-5.5 s, and water 3.5-4.9 s on two threads against
            0.33-0.63 s on one during a test-suite run: OpenMP threads spin while they wait for a thread whose
            core is taken. Run calculations side by side for parallelism (:func:`~mlmd_lab.dft.label` with a
            cluster). The limits hold during the calculation only; the caller's settings come back afterwards.
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
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise MLMDError(f"PySCF threads={threads!r}: give a whole number of threads >= 1, or None for the default "
                            "(1 for molecules, PySCF's own for cells)")
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
        with self._thread_limits(atoms):
            if log is None:
                return self._compute(atoms, properties, None, chkfile)
            with open(log, "w") as fh:
                return self._compute(atoms, properties, fh, chkfile)

    def threads_for(self, atoms: Atoms | None) -> int | None:
        """Threads of one calculation of ``atoms`` (see ``threads``); None: PySCF's default."""
        if self.threads is not None:
            return int(self.threads)
        return None if self._periodic(atoms) else 1

    @contextlib.contextmanager
    def _thread_limits(self, atoms: Atoms):
        """Limit PySCF's OpenMP and numpy's BLAS threads to :meth:`threads_for` while the block runs."""
        threads = self.threads_for(atoms)
        if threads is None:
            yield
            return
        from pyscf import lib
        from threadpoolctl import threadpool_limits

        previous = lib.num_threads()
        lib.num_threads(threads)  # PySCF's own count (its log and its block sizes read it)
        try:
            with threadpool_limits(limits=threads):  # every OpenMP and BLAS library loaded (PySCF's, numpy's)
                yield
        finally:
            lib.num_threads(previous)

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
            raise SCFNotConvergedError(
                f"PySCF SCF did not converge for {atoms.get_chemical_formula()} ({self._path(periodic)}); check the "
                "geometry (overlapping atoms?), try conv_tol larger, method='UKS' with spin=, or a smaller basis")
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
