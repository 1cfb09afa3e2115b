"""The SLHMC chain: :func:`run` (trials, reference calls, learning phase, workdir, exact resume).

Random numbers of trial k come from ``numpy.random.default_rng([seed, k])``: the chain is a deterministic
function of (seed, settings, starting structure, potential), whichever trial a run resumes at.

Files in ``workdir`` (see :mod:`mlmd_lab.slhmc.store`): ``chain.log`` (a text table, one row per trial),
``states.traj`` (the chain state after each trial, ASE), ``reference.traj`` (every reference result, the cache
that keeps a resumed run from repeating a calculation), ``restart.npz`` (written atomically after each trial),
``settings.json``, and ``model/`` (the retrained potential, n2p2 files). Calling :func:`run` again with the
same workdir continues the chain up to ``n_trials`` (after a kill, or to extend it).
"""

from __future__ import annotations

import json
import uuid
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import BaseCalculator
from ase.constraints import FixAtoms

from mlmd_lab.errors import MLMDError
from mlmd_lab.md.forcefield import LennardJones, forcefield
from mlmd_lab.md.run import resolve_potential
from mlmd_lab.slhmc import kernel
from mlmd_lab.slhmc.reference import Reference
from mlmd_lab.slhmc.result import SLHMCResult
from mlmd_lab.slhmc.store import LOG_COLUMNS, ChainStore, state_atoms, structure_digest

DEFAULT_SKIN = 0.5  # Å
DEFAULT_VOLUME_STEP = 0.02  # ln V half-width of the volume moves


def run(reference, potential, atoms: Atoms, *, temperature: float, n_trials: int, md_steps: int = 20,
        timestep: float = 0.5, ensemble: str = "nvt", pressure: float | None = None, seed: int = 0,
        learn_trials: int = 0, retrain_every: int | None = None, workdir: str | Path | None = None, db=None,
        cluster=None, progress: bool = False, volume_step: float = DEFAULT_VOLUME_STEP,
        skin: float = DEFAULT_SKIN, train_config=None, train_frames: Sequence[Atoms] = (),
        delayed_acceptance: bool = False, on_trial: Callable[[dict], bool | None] | None = None) -> SLHMCResult:
    """Self-learning hybrid Monte Carlo: sample the reference's (DFT's) ensemble exactly with ML proposals.

    Each NVE trial draws Maxwell–Boltzmann momenta at ``temperature``, runs ``md_steps`` velocity-Verlet steps
    of ``timestep`` on ``potential`` (float64), computes one reference energy at the end and accepts with
    min(1, exp(-β ΔH)), H = kinetic + reference energy (see :mod:`mlmd_lab.slhmc.kernel`). Under NPT every
    second trial is a ln V move accepted with the reference energy, P ΔV and the Jacobian (N+1) ln(V'/V).

    Args:
        reference: an ASE calculator, or an :mod:`mlmd_lab.dft` recipe (QuantumEspresso, Vasp, PySCF): then
            every call runs through :func:`mlmd_lab.dft.label.label` (``cluster`` or this process) into ``db``,
            tagged "slhmc", "slhmc-<run id>", "trial-<k>" and, once decided, "accepted"/"rejected".
        potential: an HDNNP, an Ensemble, a LennardJones, a model name in ``db.models``, or an ASE calculator
            (numpy loop; analytic surrogates). Only its forces shape the proposals.
        atoms: starting structure (Å; FixAtoms constraints are honoured under NVT).
        temperature: K (> 0).
        n_trials: trials in the chain (>= 1); with a workdir that holds a chain, the total to reach.
        md_steps: velocity-Verlet steps per NVE trial (>= 1).
        timestep: fs, 0 < timestep <= 10.
        ensemble: "nvt" or "npt" (isotropic ln V moves alternating with NVE trials).
        pressure: GPa, NPT only (required there).
        seed: random seed (trial k uses ``default_rng([seed, k])``).
        learn_trials: the first trials form the learning phase: the potential is retrained every
            ``retrain_every`` trials on every reference result so far (accepted or rejected); the remaining
            trials are the production phase with the potential frozen, whose averages are exact.
        retrain_every: trials between retrainings in the learning phase (required with learn_trials > 0).
        workdir: folder for the chain log, states, reference cache, restart and retrained model.
        db: a Database: for a model name, and for DFT recipes (where the results land).
        cluster: a dask cluster or client for DFT recipes (None: this process).
        progress: show a progress bar.
        volume_step: half-width of the uniform ln V step of the volume moves (NPT).
        skin: neighbour-list skin in Å for JAX potentials (any value gives the same chain).
        train_config: a :class:`~mlmd_lab.train.trainer.TrainingConfig` for retraining (default
            :data:`mlmd_lab.slhmc.learning.QUICK`; give max_epochs, so that retraining is deterministic).
        train_frames: labelled frames added to every retraining (e.g. those the starting potential was
            trained on).
        delayed_acceptance: screen each NVE proposal with the ML energy first (exact, see
            :mod:`mlmd_lab.slhmc.kernel`); proposals it rejects cost no reference call (``screened`` in the log).
        on_trial: called after each trial is recorded (and its restart written) with that trial's row (see
            :func:`trial_row`: trial, kind, accepted, failed, screened, E_ref_eV, E_ML_eV, dH_eV, acceptance,
            volume_A3, pressure_GPa, phase "learning"/"production", retrain: the retraining's info when the
            potential was retrained after this trial, else None; and E_ref_proposal_eV: the reference energy
            of the proposal, NaN without one; reference_calls, production_calls: the chain's reference
            calculations so far, all and those of production trials). Returning True stops the chain cleanly after
            that trial: the result holds the trials so far (``stopped=True``) and calling :func:`run` again with
            the same workdir continues the same chain. An exception it raises ends the run (the files stay
            consistent up to the last trial, as after a kill).

    Returns:
        :class:`~mlmd_lab.slhmc.result.SLHMCResult`.
    """
    ensemble = _checked_ensemble(ensemble, pressure)
    _check_numbers(temperature, n_trials, md_steps, timestep, learn_trials, retrain_every, volume_step)
    atoms = _checked_atoms(atoms, ensemble)
    potential = resolve_potential(potential, db)
    if learn_trials and not _trainable(potential):
        raise MLMDError(f"learn_trials={learn_trials} retrains the potential, which needs an HDNNP (here a "
                        f"{type(potential).__name__}); use learn_trials=0 or start from an HDNNP")
    settings = {
        "temperature_K": float(temperature), "md_steps": int(md_steps), "timestep_fs": float(timestep),
        "ensemble": ensemble, "pressure_GPa": None if pressure is None else float(pressure), "seed": int(seed),
        "learn_trials": int(learn_trials), "retrain_every": retrain_every, "volume_step": float(volume_step),
        "skin_A": float(skin), "delayed_acceptance": bool(delayed_acceptance), "n_atoms": len(atoms),
        "symbols": atoms.get_chemical_formula(),
        "structure": structure_digest(atoms), "potential": _describe(potential),
    }
    chain = _Chain(reference, potential, atoms, settings, workdir, db, cluster, (train_config, train_frames))
    return chain.run(int(n_trials), progress, on_trial)


# ---------------------------------------------------------------------------------------------------- checks
def _checked_ensemble(ensemble: str, pressure) -> str:
    key = str(ensemble).lower()
    if key not in ("nvt", "npt"):
        raise MLMDError(f"ensemble={ensemble!r}: SLHMC samples 'nvt' or 'npt'")
    if key == "npt" and pressure is None:
        raise MLMDError("ensemble='npt' needs pressure= (in GPa; 1 bar = 1e-4 GPa)")
    if key == "nvt" and pressure is not None:
        raise MLMDError("pressure= is only used with ensemble='npt'")
    if pressure is not None and abs(pressure) > 1000:
        raise MLMDError(f"pressure={pressure} GPa is not plausible; it is in GPa (1 bar = 1e-4 GPa)")
    return key


def _check_numbers(temperature, n_trials, md_steps, timestep, learn_trials, retrain_every, volume_step) -> None:
    if temperature is None or not 0 < temperature < 1e5:
        raise MLMDError(f"temperature={temperature} K must be > 0 (and plausible); it is in kelvin")
    if not 0 < timestep <= 10.0:
        raise MLMDError(f"timestep={timestep} fs must be in (0, 10] fs; it is in femtoseconds (0.5-2 fs is usual)")
    if int(n_trials) < 1:
        raise MLMDError(f"n_trials={n_trials} must be >= 1")
    if int(md_steps) < 1:
        raise MLMDError(f"md_steps={md_steps} must be >= 1 (velocity-Verlet steps per trial)")
    if not 0 <= int(learn_trials) <= int(n_trials):
        raise MLMDError(f"learn_trials={learn_trials} must be between 0 and n_trials={n_trials}")
    if learn_trials and (retrain_every is None or int(retrain_every) < 1):
        raise MLMDError(f"learn_trials={learn_trials} needs retrain_every= (trials between retrainings, >= 1)")
    if not 0 < volume_step < 2:
        raise MLMDError(f"volume_step={volume_step} (the ln V half-width) must be in (0, 2); 0.01-0.1 is usual")


def _checked_atoms(atoms: Atoms, ensemble: str) -> Atoms:
    if not isinstance(atoms, Atoms) or len(atoms) == 0:
        raise MLMDError("SLHMC needs an ASE Atoms object with at least one atom")
    for constraint in atoms.constraints:
        if not isinstance(constraint, FixAtoms):
            raise MLMDError(f"constraint {type(constraint).__name__} is not supported by SLHMC (FixAtoms is); "
                            "remove it with atoms.set_constraint()")
    if ensemble == "npt" and atoms.constraints:
        raise MLMDError("fixed atoms are not supported under NPT (the volume moves scale every atom); use NVT")
    if ensemble == "npt" and not atoms.pbc.all():
        raise MLMDError("NPT needs a periodic cell in all three directions; use NVT for molecules and slabs")
    if atoms.pbc.any() and atoms.get_volume() < 1e-6:
        raise MLMDError("periodic structure with a zero-volume cell; set the cell or pbc=False")
    return atoms.copy()


def _trainable(potential) -> bool:
    from mlmd_lab.potentials.model import HDNNP

    return isinstance(potential, HDNNP)


def _describe(potential) -> str:
    if isinstance(potential, BaseCalculator):
        return f"ASE calculator {type(potential).__name__}"
    if isinstance(potential, LennardJones):
        return repr(potential)
    from mlmd_lab.md.run import _fingerprint

    return f"{type(potential).__name__} {_fingerprint(forcefield(potential))}"


def free_mask(atoms: Atoms) -> np.ndarray:
    """(N,) True for atoms that move (FixAtoms constraints fix the others)."""
    free = np.ones(len(atoms), bool)
    for constraint in atoms.constraints:
        free[constraint.index] = False
    if not free.any():
        raise MLMDError("every atom is fixed; nothing to sample")
    return free


def make_propagator(potential, atoms: Atoms, free: np.ndarray, settings: dict):
    """The proposal map for ``potential``: numpy loop for an ASE calculator, compiled JAX otherwise."""
    dt = settings["timestep_fs"] * units.fs
    if isinstance(potential, BaseCalculator):
        return kernel.CalculatorPropagator(potential, atoms, free, dt, settings["md_steps"])
    ff = forcefield(potential, skin=settings["skin_A"], dtype="float64")
    return kernel.JaxPropagator(ff, atoms, free, dt, settings["md_steps"])


# ---------------------------------------------------------------------------------------------------- chain
class _Chain:
    """One chain: its state, the propagator, the reference, the store; :meth:`run` adds trials."""

    def __init__(self, reference, potential, atoms: Atoms, settings: dict, workdir, db, cluster,
                 learning: tuple) -> None:
        self.settings, self.atoms, self.potential = settings, atoms, potential
        self.free = free_mask(atoms)
        self.masses = atoms.get_masses()[:, None]
        self.kT = units.kB * settings["temperature_K"]
        self.pressure = (settings["pressure_GPa"] or 0.0) * units.GPa
        self.store = ChainStore(workdir, settings)
        self.run_id = self.store.run_id or uuid.uuid4().hex[:12]
        self.reference = Reference(reference, db=db, cluster=cluster, store=self.store, run_id=self.run_id)
        self.learning = learning  # (TrainingConfig or None, extra training frames)
        self.learner = None
        self.trial = 0
        self.state: dict | None = None
        self.retrains: list[dict] = []
        self._warned: set[str] = set()

    # -- state ------------------------------------------------------------------------------------------
    def _start(self) -> None:
        saved = self.store.load_restart()
        if saved is not None:
            self.trial, self.state = saved["trial"], saved["state"]
            self.retrains = saved["retrains"]
            if saved.get("model") is not None:
                self.potential = saved["model"]
        # before any reference call: a potential that lacks the structure's elements fails here, not after DFT
        self.propagator = make_propagator(self.potential, self.atoms, self.free, self.settings)
        if saved is not None:
            self.store.start_files(self.run_id, self.trial)
        else:  # a workdir with settings but no restart was killed in its first reference call: keep its cache
            self.store.start_files(self.run_id, 0 if self.store.run_id else None)
            result = self._call_reference(self.atoms, -1)
            if result["failed"]:
                raise MLMDError(f"the reference failed on the starting structure ({result['error']}); SLHMC needs "
                                "its energy there: check the reference's settings or the structure")
            self.state = self._new_state(self.atoms.positions, self.atoms.cell.array,
                                         np.zeros_like(self.atoms.positions), result, np.nan)
        if self.settings["learn_trials"]:
            from mlmd_lab.slhmc.learning import Learner

            self.learner = Learner(self.settings, self.store, *self.learning)

    def _new_state(self, positions, cell, momenta, result: dict, e_ml: float) -> dict:
        return {"positions": np.array(positions, np.float64), "cell": np.array(cell, np.float64),
                "momenta": np.array(momenta, np.float64), "e_ref": float(result["energy"]),
                "forces": result.get("forces"), "stress": result.get("stress"), "e_ml": float(e_ml)}

    def _atoms(self, positions, cell) -> Atoms:
        out = self.atoms.copy()
        out.set_cell(cell, scale_atoms=False)
        out.positions = positions
        return out

    def _call_reference(self, atoms: Atoms, trial: int) -> dict:
        return self.reference(atoms, trial)

    def _calls(self, production: bool = False) -> int:
        """Reference calculations made for this chain (each kept once in the store, whatever the resumes)."""
        start = self.settings["learn_trials"] if production else -1
        return sum(1 for f in self.store.references if f.info["trial"] >= start)

    # -- trials -----------------------------------------------------------------------------------------
    def _is_volume_trial(self, trial: int) -> bool:
        return self.settings["ensemble"] == "npt" and trial % 2 == 1

    def _md_trial(self, rng: np.random.Generator, trial: int) -> dict:
        s = self.state
        p = kernel._refresh_momenta(rng, self.masses, self.free[:, None], self.kT, s["momenta"])
        out = self.propagator.run(s["positions"], p, s["cell"])
        old = {"e_ref": s["e_ref"], "e_ml": out["e_ml_start"],
               "kinetic": kernel.kinetic_energy(p, self.masses, self.free[:, None])}
        if out["failed"]:
            self._warn_once(trial, out["error"])
            return self._rejected(rng, trial, np.nan, np.nan, out["error"], p)
        new = {"e_ml": out["e_ml_end"], "kinetic": kernel.kinetic_energy(out["momenta"], self.masses,
                                                                         self.free[:, None])}
        screen = 0.0
        if self.settings["delayed_acceptance"]:
            screen = kernel.log_screen_nve(self.kT, old, new)
            if not kernel.accept(rng, screen):
                self.state = dict(self.state, momenta=np.array(p))
                return {"accepted": False, "e_ml": out["e_ml_end"], "delta_h": np.nan, "failed": False,
                        "error": "", "result": None, "screened": True}
        result = self._call_reference(self._atoms(out["positions"], s["cell"]), trial)
        new["e_ref"] = result["energy"]
        log_ratio = kernel.log_acceptance_nve(self.kT, old, new)
        delta_h = -log_ratio * self.kT if np.isfinite(log_ratio) else np.nan
        if result["failed"]:
            return self._rejected(rng, trial, out["e_ml_end"], delta_h, result["error"], p)
        accepted = kernel.accept(rng, log_ratio - screen)
        proposal = self._new_state(out["positions"], s["cell"], out["momenta"], result, out["e_ml_end"])
        return self._decided(accepted, proposal, p, delta_h, result, trial)

    def _volume_trial(self, rng: np.random.Generator, trial: int) -> dict:
        s = self.state
        delta = rng.uniform(-self.settings["volume_step"], self.settings["volume_step"])
        moved = kernel.scaled(self._atoms(s["positions"], s["cell"]), delta)
        result = self._call_reference(moved, trial)
        e_ml = self.propagator.energy(moved)
        volume = abs(np.linalg.det(s["cell"]))
        old = {"e_ref": s["e_ref"], "e_ml": s["e_ml"], "volume": volume}
        new = {"e_ref": result["energy"], "e_ml": e_ml, "volume": moved.get_volume()}
        if not np.isfinite(old["e_ml"]):
            old["e_ml"] = self.propagator.energy(self._atoms(s["positions"], s["cell"]))
        log_ratio = kernel.log_acceptance_volume(self.kT, self.pressure, len(self.atoms), old, new)
        delta_h = (new["e_ref"] - old["e_ref"]) + self.pressure * (new["volume"] - volume)
        if result["failed"]:
            return self._rejected(rng, trial, e_ml, delta_h, result["error"], s["momenta"])
        accepted = kernel.accept(rng, log_ratio)
        proposal = self._new_state(moved.positions, moved.cell.array, s["momenta"], result, e_ml)
        return self._decided(accepted, proposal, s["momenta"], delta_h, result, trial)

    def _decided(self, accepted: bool, proposal: dict, momenta, delta_h: float, result: dict, trial: int) -> dict:
        self.reference.decided(result, accepted)
        if accepted:
            self.state = proposal
        else:
            self.state = dict(self.state, momenta=np.array(momenta))
        return {"accepted": accepted, "e_ml": proposal["e_ml"], "delta_h": delta_h, "failed": False,
                "error": "", "result": result}

    def _warn_once(self, trial: int, reason: str) -> None:
        """Warn the first time a reason for rejecting a trial without a reference call occurs in this run (a
        chain may reject thousands of trials for one reason)."""
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(f"SLHMC trial {trial} was rejected without a reference call: {reason} (later trials "
                          "rejected for this reason are not reported again)", stacklevel=2)

    def _rejected(self, rng, trial: int, e_ml: float, delta_h: float, error: str, momenta) -> dict:
        rng.uniform()  # the uniform an accept/reject would draw: the stream does not depend on failures
        self.state = dict(self.state, momenta=np.array(momenta))
        return {"accepted": False, "e_ml": e_ml, "delta_h": delta_h, "failed": True, "error": error, "result": None}

    def _one_trial(self, trial: int) -> dict:
        rng = np.random.default_rng([self.settings["seed"], trial])
        if self._is_volume_trial(trial):
            return dict(self._volume_trial(rng, trial), kind="volume")
        return dict(self._md_trial(rng, trial), kind="md")

    # -- learning ---------------------------------------------------------------------------------------
    def _maybe_retrain(self, done: int) -> dict | None:
        """Retrain after trial ``done`` when the learning phase says so; returns the retraining's info or None."""
        learn, every = self.settings["learn_trials"], self.settings["retrain_every"]
        if self.learner is None or done > learn or done % int(every):
            return None
        self.potential, info = self.learner.retrain(self.potential, done)
        self.retrains.append(info)
        self.propagator = make_propagator(self.potential, self.atoms, self.free, self.settings)
        return info

    # -- the loop ---------------------------------------------------------------------------------------
    def run(self, n_trials: int, progress: bool, on_trial=None) -> SLHMCResult:
        self._start()
        bar = _progress(progress, n_trials - self.trial)
        try:
            while self.trial < n_trials:
                outcome = self._one_trial(self.trial)
                self.trial += 1
                self.store.record(self.trial - 1, outcome, self.state, self._chain_atoms(), self.kT,
                                  self.free.sum())
                retrained = self._maybe_retrain(self.trial)
                self.store.write_restart(self._restart())
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(acceptance=f"{self.store.acceptance():.2f}")
                if on_trial is not None and on_trial(self._row(outcome, retrained)) is True:
                    break
        finally:
            if bar is not None:
                bar.close()
            self.store.close()
        return self._result(n_trials)

    def _row(self, outcome: dict, retrained: dict | None) -> dict:
        """The ``on_trial`` row of the trial just recorded (:func:`trial_row` and this run's extras)."""
        row = trial_row(self.store.rows[-1], self.settings["learn_trials"], retrained)
        result = outcome.get("result")
        row["E_ref_proposal_eV"] = float(result["energy"]) if result is not None else float("nan")
        row["reference_calls"] = self._calls()
        row["production_calls"] = self._calls(production=True)
        return row

    def _chain_atoms(self) -> Atoms:
        return state_atoms(self.atoms, self.state, self.settings["temperature_K"])

    def _restart(self) -> dict:
        return {"trial": self.trial, "state": self.state, "retrains": self.retrains, "run_id": self.run_id,
                "model": self.potential if self.retrains else None}

    def _result(self, n_trials: int) -> SLHMCResult:
        table = self.store.table()
        done = self.trial  # n_trials, or fewer when on_trial stopped the chain
        learn = min(self.settings["learn_trials"], done)
        accepted = table["accepted"].astype(bool)
        return SLHMCResult(
            acceptance_rate=float(accepted.mean()), reference_energies=table["E_ref_eV"], accepted=accepted,
            volumes=table["volume_A3"], pressures=table["pressure_GPa"], ml_energies=table["E_ML_eV"],
            delta_h=table["dH_eV"], kinds=np.where(table["volume_move"].astype(bool), "volume", "md"),
            failed=table["failed"].astype(bool), screened=table["screened"].astype(bool),
            n_reference_calls=self._calls(), states=self.store.states(),
            model=self.potential, phases={"learning": (0, learn), "production": (learn, done)},
            temperature=self.settings["temperature_K"], pressure=self.settings["pressure_GPa"],
            workdir=self.store.workdir, run_id=self.run_id, production_calls=self._calls(production=True),
            retrain_history=list(self.retrains), stopped=done < n_trials)


def trial_row(row, learn_trials: int, retrained: dict | None = None) -> dict:
    """One chain-log row (:data:`~mlmd_lab.slhmc.store.LOG_COLUMNS` values) as the dict ``on_trial`` receives.

    Keys: trial (int, 0-based), kind ("md" or "volume"), accepted, failed, screened (bool), E_ref_eV (the chain
    state's reference energy after the trial), E_ML_eV (the proposal's ML energy), dH_eV, acceptance (running
    acceptance rate), volume_A3, pressure_GPa (NaN where undefined), phase ("learning" for trials below
    ``learn_trials``, else "production"), retrain (the retraining's info dict — trial, frames, errors — when
    the potential was retrained right after this trial, else None).
    """
    values = dict(zip(LOG_COLUMNS, (float(v) for v in row), strict=True))
    trial = int(values["trial"])
    out: dict = {"trial": trial, "kind": "volume" if values["volume_move"] else "md"}
    out.update({k: bool(values[k]) for k in ("accepted", "failed", "screened")})
    out.update({k: values[k] for k in ("E_ref_eV", "E_ML_eV", "dH_eV", "acceptance", "volume_A3", "pressure_GPa")})
    out["phase"] = "learning" if trial < learn_trials else "production"
    out["retrain"] = None if retrained is None else dict(retrained)
    return out


def _progress(enabled: bool, total: int):
    if not enabled or total <= 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="trial", desc="SLHMC")


def settings_json(settings: dict) -> str:
    return json.dumps(settings, indent=1, sort_keys=True)
