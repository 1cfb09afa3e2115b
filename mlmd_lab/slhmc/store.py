"""Where an SLHMC chain keeps its record: in memory, or in a workdir that a later run resumes from.

Workdir files:

- ``chain.log``: text table, one row per trial (columns :data:`LOG_COLUMNS`, units in the names; floats written
  so they read back exactly); ``acceptance`` is the running acceptance rate, ``screened`` marks proposals
  that delayed acceptance rejected on the ML energy (no reference call);
- ``states.traj``: ASE trajectory of the chain state after each trial (reference energy, forces, stress);
- ``reference.traj``: every reference result, with its trial and the structure's digest (the cache a resumed
  run answers from instead of recalculating);
- ``restart.npz``: the chain after the last completed trial (written atomically);
- ``model-<k>/``: the potential after the k-th retraining (n2p2 files; the restart names the current one);
- ``settings.json``: the settings and the run id.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import Trajectory

from mlmd_lab.errors import MLMDError
from mlmd_lab.files import atomic_path, atomic_write_text

LOG_COLUMNS = ("trial", "volume_move", "accepted", "failed", "screened", "E_ref_eV", "E_ML_eV", "dH_eV",
               "acceptance", "volume_A3", "pressure_GPa")
#: Settings that must match for a workdir's chain to be continued.
_IDENTITY = ("temperature_K", "md_steps", "timestep_fs", "ensemble", "pressure_GPa", "seed", "learn_trials",
             "retrain_every", "volume_step", "delayed_acceptance", "n_atoms", "symbols", "structure", "potential")


def structure_digest(atoms: Atoms) -> str:
    """SHA-256 (16 hex) of positions, cell and numbers: which structure a reference result belongs to."""
    digest = hashlib.sha256(np.ascontiguousarray(atoms.positions, np.float64).tobytes())
    digest.update(np.ascontiguousarray(atoms.cell.array, np.float64).tobytes())
    digest.update(np.ascontiguousarray(atoms.numbers, np.int64).tobytes())
    return digest.hexdigest()[:16]


def pressure_gpa(state: dict, n_free: int, kT: float) -> float:
    """Virial pressure of a chain state (GPa): n_free kT / V - tr(stress) / 3 (stress from the reference)."""
    stress = state.get("stress")
    if stress is None:
        return float("nan")
    volume = abs(float(np.linalg.det(state["cell"])))
    return float((n_free * kT / volume - np.sum(np.asarray(stress)[:3]) / 3.0) / units.GPa)


def state_atoms(template: Atoms, state: dict, temperature: float) -> Atoms:
    """A chain state as Atoms with its reference results attached (SinglePointCalculator)."""
    atoms = template.copy()
    atoms.set_cell(state["cell"], scale_atoms=False)
    atoms.positions = state["positions"]
    results = {"energy": state["e_ref"], "free_energy": state["e_ref"]}
    if state.get("forces") is not None:
        results["forces"] = np.asarray(state["forces"])
    if state.get("stress") is not None:
        results["stress"] = np.asarray(state["stress"])
    atoms.calc = SinglePointCalculator(atoms, **results)
    return atoms


def read_chain_log(workdir: str | Path) -> list[list[float]]:
    """The rows of ``workdir/chain.log`` (one list of :data:`LOG_COLUMNS` values per trial; [] without a log).

    Rows beyond the restart (a trial logged just before a kill) are included; a resumed run truncates them."""
    path = Path(workdir) / "chain.log"
    if not path.exists():
        return []
    return [[float(v) for v in line.split()] for line in path.read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def _format(value) -> str:
    value = float(value)
    return repr(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


class ChainStore:
    """The chain's rows, states and reference results (memory, or files in ``workdir``)."""

    def __init__(self, workdir, settings: dict) -> None:
        self.workdir = Path(workdir) if workdir is not None else None
        self.settings = settings
        self.rows: list[list[float]] = []
        self._states: list[Atoms] = []
        self.references: list[Atoms] = []
        self._log = self._traj = self._ref = None
        self.run_id = None
        if self.workdir is not None:
            self._open()

    # -- files ------------------------------------------------------------------------------------------
    def _open(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / "settings.json"
        if path.exists():
            saved = json.loads(path.read_text())
            different = [k for k in _IDENTITY if saved.get(k) != self.settings.get(k)]
            if different:
                raise MLMDError(f"{self.workdir} holds an SLHMC chain with other settings ({', '.join(different)}); "
                                "continue it with the same ones, or use another workdir")
            self.run_id = saved.get("run_id")

    def start_files(self, run_id: str, resumed_trial: int | None) -> None:
        """Open the log, the states and the reference cache (fresh, or truncated to ``resumed_trial``)."""
        if self.workdir is None:
            return
        self.run_id = run_id
        log = self.workdir / "chain.log"
        if resumed_trial is None:
            atomic_write_text(self.workdir / "settings.json", json.dumps(dict(self.settings, run_id=run_id),
                                                                        indent=1, sort_keys=True))
            atomic_write_text(log, "# " + " ".join(LOG_COLUMNS) + "\n")
            for name in ("states.traj", "reference.traj"):
                if (self.workdir / name).exists():
                    (self.workdir / name).unlink()
        else:
            self._truncate_log(log, resumed_trial)
            self._truncate_states(resumed_trial)
            self.references = self._read(self.workdir / "reference.traj")
        self._log = open(log, "a")  # noqa: SIM115 (closed in close())

    def _read(self, path: Path) -> list[Atoms]:
        if not path.exists() or path.stat().st_size == 0:
            return []
        from ase.io import read

        return list(read(path, ":"))

    def _truncate_log(self, path: Path, trial: int) -> None:
        lines = path.read_text().splitlines(keepends=True)
        kept = [ln for ln in lines if ln.startswith("#") or (ln.strip() and int(float(ln.split()[0])) < trial)]
        if len(kept) != len(lines):
            atomic_write_text(path, "".join(kept))
        self.rows = [[float(v) for v in ln.split()] for ln in kept if not ln.startswith("#")]
        if len(self.rows) != trial:
            raise MLMDError(f"{path} has {len(self.rows)} rows but the restart is at trial {trial}; the workdir is "
                            "damaged: start a new chain in another workdir")

    def _truncate_states(self, trial: int) -> None:
        path = self.workdir / "states.traj"
        frames = self._read(path)
        if len(frames) != trial:
            with atomic_path(path) as tmp, Trajectory(tmp, "w") as writer:
                for atoms in frames[:trial]:
                    writer.write(atoms)

    def close(self) -> None:
        for name in ("_log", "_traj", "_ref"):
            handle = getattr(self, name)
            if handle is not None:
                handle.close()
                setattr(self, name, None)

    # -- records ----------------------------------------------------------------------------------------
    def record(self, trial: int, outcome: dict, state: dict, atoms: Atoms, kT: float, n_free: int) -> None:
        """One row of the chain log and one chain state, after trial ``trial``."""
        accepted = [r[LOG_COLUMNS.index("accepted")] for r in self.rows] + [float(outcome["accepted"])]
        volume = abs(float(np.linalg.det(state["cell"]))) if atoms.pbc.all() else float("nan")
        row = [trial, float(outcome["kind"] == "volume"), float(outcome["accepted"]), float(outcome["failed"]),
               float(outcome.get("screened", False)), state["e_ref"], outcome["e_ml"], outcome["delta_h"],
               float(np.mean(accepted)), volume,
               pressure_gpa(state, int(n_free), kT) if atoms.pbc.all() else float("nan")]
        self.rows.append([float(v) for v in row])
        atoms.info.update(trial=trial, accepted=bool(outcome["accepted"]))
        if self.workdir is None:
            self._states.append(atoms)
            return
        self._log.write(" ".join(_format(v) for v in row) + "\n")
        self._log.flush()
        if self._traj is None:
            self._traj = Trajectory(self.workdir / "states.traj", "a")
        self._traj.write(atoms)

    def acceptance(self) -> float:
        return self.rows[-1][LOG_COLUMNS.index("acceptance")] if self.rows else 0.0

    def table(self) -> dict[str, np.ndarray]:
        data = np.array(self.rows, np.float64).reshape(-1, len(LOG_COLUMNS))
        return {name: data[:, k] for k, name in enumerate(LOG_COLUMNS)}

    def states(self):
        if self.workdir is None:
            return self._states
        if self._traj is not None:
            self._traj.close()
            self._traj = None
        path = self.workdir / "states.traj"
        return Trajectory(path, "r") if path.exists() and path.stat().st_size else []

    # -- reference results ------------------------------------------------------------------------------
    def cached_reference(self, trial: int, atoms: Atoms) -> dict | None:
        """The stored result of the reference call of ``trial`` on exactly ``atoms`` (resume), or None."""
        digest = structure_digest(atoms)
        for frame in reversed(self.references):
            if frame.info.get("trial") == trial and frame.info.get("digest") == digest:
                return _result_of(frame)
        return None

    def add_reference(self, trial: int, atoms: Atoms, result: dict) -> None:
        """Keep a reference result (a teacher datum; failures too, with their error)."""
        frame = atoms.copy()
        frame.set_constraint()
        frame.info.update(trial=trial, digest=structure_digest(atoms), error=result.get("error", ""),
                          failed=bool(result["failed"]))
        if not result["failed"]:
            spc = {k: result[k] for k in ("energy", "forces", "stress") if result.get(k) is not None}
            frame.calc = SinglePointCalculator(frame, **spc)
        self.references.append(frame)
        if self.workdir is not None:
            if self._ref is None:
                self._ref = Trajectory(self.workdir / "reference.traj", "a")
            self._ref.write(frame)

    def teacher_frames(self) -> list[Atoms]:
        """Every successful reference result so far (for retraining)."""
        return [f for f in self.references if not f.info.get("failed")]

    # -- restart ----------------------------------------------------------------------------------------
    def write_restart(self, chain: dict) -> None:
        if self.workdir is None:
            return
        model_dir = None
        if chain["model"] is not None:
            model_dir = f"model-{len(chain['retrains'])}"
            if not (self.workdir / model_dir).exists():
                with atomic_path(self.workdir / model_dir) as tmp:
                    chain["model"].to_n2p2(tmp)
        state = chain["state"]
        arrays = {k: np.asarray(state[k]) for k in ("positions", "cell", "momenta")}
        for k in ("forces", "stress"):
            if state.get(k) is not None:
                arrays[k] = np.asarray(state[k])
        meta = {"trial": chain["trial"], "retrains": chain["retrains"], "run_id": chain["run_id"],
                "model_dir": model_dir, "e_ref": state["e_ref"], "e_ml": state["e_ml"]}
        with atomic_path(self.workdir / "restart.npz", fsync=True) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, meta=np.array(json.dumps(meta)), **arrays)

    def load_restart(self) -> dict | None:
        if self.workdir is None or not (self.workdir / "restart.npz").exists():
            return None
        saved = np.load(self.workdir / "restart.npz", allow_pickle=False)
        meta = json.loads(str(saved["meta"]))
        state = {k: np.array(saved[k]) for k in ("positions", "cell", "momenta")}
        state.update(e_ref=meta["e_ref"], e_ml=meta["e_ml"],
                     forces=np.array(saved["forces"]) if "forces" in saved else None,
                     stress=np.array(saved["stress"]) if "stress" in saved else None)
        model = None
        if meta["model_dir"] is not None:
            from mlmd_lab.potentials.model import HDNNP

            model = HDNNP.from_n2p2(self.workdir / meta["model_dir"])
        return dict(meta, state=state, model=model)


def _result_of(frame: Atoms) -> dict:
    if frame.info.get("failed"):
        return {"energy": float("nan"), "failed": True, "error": frame.info.get("error", ""), "cached": True}
    calc = frame.calc
    out = {"energy": float(calc.results["energy"]), "failed": False, "error": "", "cached": True}
    for k in ("forces", "stress"):
        if k in calc.results:
            out[k] = np.array(calc.results[k])
    return out
