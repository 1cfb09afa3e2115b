"""The main job's automatic potential construction: a periodic solid from one structure to a checked potential.

:func:`run_autobuild` picks a small solid and a DFT reference this machine runs fast, builds a committee potential
with :func:`mlmd_lab.learn.run` (seed set, committee training, ML-MD exploration, uncertainty-driven labelling),
then checks the result against DFT on data the loop never trained on, and writes one self-contained HTML report:

1. **Held-out errors**: ML-MD snapshots at a temperature inside the explored range, run with the final committee
   and a seed tied to that model's version, labelled with the same DFT recipe *after* the loop finished, through
   :func:`mlmd_lab.dft.label.label` (so they land in the database, tagged ``autobuild-holdout``). Why after: the
   loop trains on every frame in the database with its reference's settings (data recycling), so frames labelled
   before or during the loop would be training data. A later loop in a new workdir does recycle them; that run
   saves a new model version, whose held-out snapshots (another seed) are new structures again.
2. **Phonons**: the cell's harmonic frequencies (diamond's 8-atom cell: Γ and the three X points) by symmetric
   finite displacements (:mod:`mlmd_lab.analysis.phonons`), DFT against the potential. These DFT runs are kept
   *out of* the database (their own folders under ``workdir/phonons``, cached there), so no later loop trains on
   the displaced ideal cells and the check stays independent.
3. The loop's own figures: accurate fraction per condition and iteration, reference calls, the held-out error of
   every iteration's committee (a learning curve on frames none of them saw) and the stop reason as it is.

The reference: Quantum ESPRESSO (pw.x) for diamond Si8 (PBE, Si.pbe-rrkj norm-conserving, 20 Ry, Γ-centred
2×2×2 k, fixed occupations: 3-7 s per calculation on 2 shared cores) when pw.x and the pseudopotential are
installed. Fixed occupations, not smearing: with Marzari-Vanderbilt 0.01 Ry on this k-mesh the single-displacement
forces of the ideal cell do not add up to the frozen Γ phonon (378 against 480 cm⁻¹ for the same mode, measured),
while with fixed occupations both give 526 cm⁻¹; they converged on the most uncertain 900 K frames the loop
explored (9 of 9). Γ-only sampling does not (rattled Si8 closes its gap there). Otherwise PySCF at
Γ for diamond C8 (GTH-DZVP/GTH-PBE; Si8 at Γ has no gap and does not converge without smearing, which the PySCF
recipe lacks); PySCF needs 30-50 s per periodic calculation here, so that fallback runs a smaller plan and still
takes longer than the main job's 10 minutes (it says so).

Layering: this module sits on top (like :mod:`mlmd_lab.quickstart`) and calls down into learn, dft, md, analysis
and report; nothing below imports it. ``mlmd-lab demo`` (the main job, ``scripts/main.sh``) runs it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms

#: Tag of the held-out DFT frames in the database (plus ``autobuild-holdout-<model>-v<version>``).
HOLDOUT_TAG = "autobuild-holdout"
#: Si pseudopotential of Debian's quantum-espresso-data.
SI_PSEUDOPOTENTIAL = "Si.pbe-rrkj.UPF"


@dataclass
class AutobuildSettings:
    """What the automatic construction and its checks do (units in the names; defaults: the main job's plan,
    sized for ~5 minutes of the 10-minute main job on 2 shared cores with Quantum ESPRESSO).

    Loop (:func:`mlmd_lab.learn.run` keywords): temperatures (K) explored by NVT ML-MD; committee members;
    max_iterations (the last trains and explores, labels nothing); per_iteration reference calls at most;
    reference_budget in all, seed set included (learn labels 12 seed structures for one starting cell);
    md_steps of 1 fs per condition and iteration; hidden layers and max_epochs of each member (learn's quick
    training otherwise). trust: (lo, hi) eV/Å, or None for learn's suggestion.

    Checks: n_holdout DFT frames from an NVT ML-MD run at holdout_temperature (K; holdout_spacing_steps of 1 fs
    apart, after as many steps of equilibration); phonon_delta: the finite displacement (Å).
    Pass thresholds: held-out force RMSE at most max_force_share of the held-out frames' RMS force component,
    energy RMSE at most max_energy_rmse_mev (meV/atom); every optical and zone-boundary phonon frequency within
    phonon_tolerance (relative) of DFT's; no DFT calculation failed, except SCFs that did not converge (after the
    recipe's retries) in at most max_unconverged_share of the calls (see :func:`dft_failure_check`). The accuracy
    thresholds are three times learn's 5 % accuracy target, not that target: with
    the ~36 DFT frames this plan affords, committees trained on the same frames with other seeds scatter between
    8 and 10 % force RMSE and 7-15 % on the softest phonon (TA at X) (measured, Si8 with QE); the checks catch a
    broken construction (untrained or mislabelled: the seed committee is at ~17 %), and the report gives the
    figures themselves.
    """

    temperatures: tuple[float, ...] = (300.0, 900.0)
    committee: int = 3
    max_iterations: int = 4
    per_iteration: int = 8
    reference_budget: int = 36
    md_steps: int = 400
    hidden: tuple[int, ...] = (10, 10)
    max_epochs: int = 3000
    trust: tuple[float, float] | None = None
    seed: int = 0
    holdout_temperature: float = 600.0
    n_holdout: int = 6
    holdout_spacing_steps: int = 100
    phonon_delta: float = 0.01
    max_force_share: float = 0.15
    max_energy_rmse_mev: float = 5.0
    phonon_tolerance: float = 0.15
    max_unconverged_share: float = 0.1

    def learn_keywords(self) -> dict[str, Any]:
        """The keywords this plan passes to :func:`mlmd_lab.learn.run`."""
        out: dict[str, Any] = dict(
            temperatures=list(self.temperatures), committee=self.committee, max_iterations=self.max_iterations,
            per_iteration=self.per_iteration, reference_budget=self.reference_budget, md_steps=self.md_steps,
            seed=self.seed, train_config={"hidden": tuple(self.hidden), "max_epochs": self.max_epochs,
                                          "patience": self.max_epochs})
        if self.trust is not None:
            out["trust"] = tuple(self.trust)
        return out

    def digest(self, system: System | None = None) -> str:
        """Short hash of the loop's plan and, given, the system's structure and reference settings (the learn
        workdir's name: another plan or reference starts its own run instead of refusing the old one's folder)."""
        from mlmd_lab.dft.label import identity_settings

        data: dict[str, Any] = {"learn": self.learn_keywords()}
        if system is not None:
            data["reference"] = identity_settings(system.recipe, system.atoms)
            data["structure"] = [system.atoms.numbers.tolist(), np.round(system.atoms.positions, 6).tolist(),
                                 np.round(system.atoms.cell.array, 6).tolist()]
        text = json.dumps(data, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:8]


#: The smaller plan of the PySCF fallback (30-50 s per periodic calculation here).
PYSCF_SETTINGS = AutobuildSettings(committee=3, max_iterations=3, per_iteration=3, reference_budget=16,
                                   n_holdout=3)


@dataclass
class System:
    """The solid and its reference: ``name``, the ideal cell (Å), the DFT recipe and why it was chosen."""

    name: str
    atoms: Atoms
    recipe: Any
    why: str


@dataclass
class AutobuildResult:
    """Everything the run produced; ``passed`` when every check holds. Units: eV, Å, meV/atom, meV/Å, cm⁻¹, K.

    Attributes:
        learn: the :class:`~mlmd_lab.learn.LearnResult` (its ``stop_reason`` is reported as it is).
        holdout: held-out errors of the final committee (``energy_rmse_mev``, ``force_rmse_mev``,
            ``rms_force_mev``, ``force_share``, ``n_frames``) and the labelling report.
        iteration_errors: per iteration, the held-out errors of that iteration's committee, the DFT frames it
            trained on and the reference calls made up to the end of that iteration (the learning curve).
        phonons: ``dft_cm1`` and ``ml_cm1`` (ascending, all 3N), ``groups`` (degenerate DFT modes with both means
            and the relative difference), ``max_rel_diff`` over the non-acoustic modes.
        checks: (passed, text) pairs; timings_s: wall seconds per stage.
    """

    settings: AutobuildSettings
    system: System
    learn: Any
    holdout_frames: list[Atoms]
    holdout: dict[str, Any]
    iteration_errors: list[dict[str, Any]]
    phonons: dict[str, Any]
    checks: list[tuple[bool, str]]
    timings_s: dict[str, float] = field(default_factory=dict)
    report_path: Path | None = None

    @property
    def passed(self) -> bool:
        return all(ok for ok, _ in self.checks)

    def to_dict(self) -> dict[str, Any]:
        """The figures as JSON-serialisable data (what ``workdir/summary.json`` holds)."""
        learn_result = self.learn
        return {
            "system": self.system.name, "recipe": repr(self.system.recipe), "settings": asdict(self.settings),
            "passed": self.passed, "checks": [{"passed": ok, "text": text} for ok, text in self.checks],
            "learn": {"stop_reason": learn_result.stop_reason, "converged": learn_result.converged,
                      "iterations": len(learn_result.iterations), "reference_calls": learn_result.n_reference_calls,
                      "model": f"{learn_result.model_name} v{learn_result.model_version}",
                      "seconds": {k: float(sum(r.seconds.get(k, 0.0) for r in learn_result.iterations))
                                  for k in ("train", "explore", "label")},
                      "history": learn_result.history()},
            "holdout": self.holdout, "iteration_errors": self.iteration_errors,
            "phonons": {k: (np.asarray(v).tolist() if isinstance(v, np.ndarray) else v)
                        for k, v in self.phonons.items()},
            "timings_s": self.timings_s, "total_s": float(sum(self.timings_s.values())),
            "report": None if self.report_path is None else str(self.report_path),
        }


# ---------------------------------------------------------------------------------------------------- system
def diamond_cell(element: str = "Si", a: float = 5.43) -> Atoms:
    """The 8-atom cubic cell of diamond ``element`` with lattice constant ``a`` (Å)."""
    from ase.build import bulk

    atoms = bulk(element, "diamond", a=a, cubic=True)
    atoms.info["name"] = f"diamond {element}8 (a = {a} Å)"
    return atoms


def qe_available(pseudo_dir: str | None = None) -> bool:
    """True when pw.x is on PATH and the Si pseudopotential is installed."""
    from mlmd_lab.dft.recipes.espresso import QE_PSEUDO_DIR

    return shutil.which("pw.x") is not None and (Path(pseudo_dir or QE_PSEUDO_DIR) / SI_PSEUDOPOTENTIAL).is_file()


def choose_system(engine: str = "auto") -> System:
    """The solid and DFT reference for this machine: ``"qe"`` (diamond Si8 with pw.x), ``"pyscf"`` (diamond C8
    at Γ) or ``"auto"`` (QE when installed, else PySCF)."""
    from mlmd_lab.dft import PySCF, QuantumEspresso
    from mlmd_lab.errors import MLMDError

    if engine not in ("auto", "qe", "pyscf"):
        raise MLMDError(f"engine={engine!r}: use 'auto', 'qe' or 'pyscf'")
    if engine == "qe" or (engine == "auto" and qe_available()):
        recipe = QuantumEspresso(pseudopotentials={"Si": SI_PSEUDOPOTENTIAL}, ecutwfc_ry=20.0, kpts=(2, 2, 2),
                                 smearing=None, xc="PBE")
        return System("Si8 (diamond, Quantum ESPRESSO)", diamond_cell("Si", 5.43), recipe,
                      "pw.x is installed: plane waves, 2x2x2 k-points, fixed occupations (a semiconductor), 3-7 s "
                      "per Si8 calculation on 2 shared cores (20 Ry and 2x2x2 k are cheap, not converged: the checks "
                      "compare the potential with this same DFT, not with experiment)")
    recipe = PySCF(ke_cutoff=25.0)
    return System("C8 (diamond, PySCF at Γ)", diamond_cell("C", 3.567), recipe,
                  "pw.x is not installed: PySCF (pip only) at the Γ point, GTH-DZVP/GTH-PBE; diamond C because Si8 "
                  "at Γ has no gap and its SCF does not converge without smearing; 30-50 s per calculation on 2 "
                  "shared cores, so this fallback exceeds the main job's 10 minutes")


# ---------------------------------------------------------------------------------------------------- checks
def errors_on(model, frames: list[Atoms]) -> dict[str, float]:
    """Energy-per-atom and force-component RMSE of ``model`` on labelled ``frames`` (meV/atom, meV/Å), the frames'
    RMS force component (meV/Å) and the force RMSE as a share of it."""
    from mlmd_lab.frames import results_of

    predictions = model.predict(list(frames), stress=False, warn=False)
    de, df, f_ref = [], [], []
    for atoms, pred in zip(frames, predictions, strict=True):
        ref = results_of(atoms)
        de.append((float(pred["energy"]) - float(ref["energy"])) / len(atoms))
        df.append((np.asarray(pred["forces"]) - np.asarray(ref["forces"])).ravel())
        f_ref.append(np.asarray(ref["forces"]).ravel())
    force_rmse = float(np.sqrt(np.mean(np.concatenate(df) ** 2)))
    rms_force = float(np.sqrt(np.mean(np.concatenate(f_ref) ** 2)))
    return {"n_frames": len(frames), "energy_rmse_mev": 1e3 * float(np.sqrt(np.mean(np.square(de)))),
            "force_rmse_mev": 1e3 * force_rmse, "rms_force_mev": 1e3 * rms_force,
            "force_share": force_rmse / rms_force if rms_force > 0 else float("nan")}


def holdout_structures(model, start: Atoms, settings: AutobuildSettings, seed: int) -> list[Atoms]:
    """``n_holdout`` snapshots of an NVT ML-MD run of ``model`` at ``holdout_temperature`` (1 fs steps, Langevin
    100 fs, one every ``holdout_spacing_steps`` after as many steps of equilibration), wrapped, no results."""
    from mlmd_lab.md.run import run as md_run

    interval = int(settings.holdout_spacing_steps)
    steps = interval * (int(settings.n_holdout) + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = md_run(model, start.copy(), "nvt", temperature=settings.holdout_temperature, timestep=1.0,
                        steps=steps, seed=seed, velocities="draw", trajectory_interval=interval,
                        log_interval=interval, restart_interval=0, on_extrapolation="ignore")
    out = []
    for atoms in result.trajectory:
        step = int(atoms.info.get("step", -1))
        if step < interval:
            continue  # the start and the equilibration
        frame = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell.array, pbc=atoms.pbc)
        frame.wrap()
        frame.info["generator"] = {"name": "autobuild-holdout", "temperature_K": settings.holdout_temperature,
                                   "step": step, "seed": seed}
        out.append(frame)
    return out[: settings.n_holdout]


def phonon_comparison(atoms: Atoms, recipe, model, folder: Path, delta: float) -> dict[str, Any]:
    """Γ-point frequencies of ``atoms``'s cell (cm⁻¹, imaginary ones negative) from DFT (``recipe`` run in
    ``folder``, cached there, not in the database) and from ``model``, the same symmetric displacements for both.

    Modes are matched by their displacement pattern, not by order: ``ml_cm1[i]`` is the potential's frequency in
    the subspace of DFT's degenerate mode group holding mode i (:func:`~mlmd_lab.analysis.phonons.
    frequencies_in_subspaces`; ``subspace_leak`` ~ 0 confirms the groups are symmetry subspaces); the two models
    may order their modes differently (``ml_own_cm1``: the potential's own ascending spectrum). Degenerate DFT
    groups carry the mean of each and their relative difference. The 3 DFT frequencies nearest 0 are the
    acoustic translations (left out of the differences)."""
    from mlmd_lab.analysis import phonons as ph
    from mlmd_lab.dft.label import task_key

    displaced = ph.displacements(atoms, delta)
    dft_forces = []
    for disp in displaced:  # one folder per structure and settings (cached: a rerun computes nothing)
        frame = recipe.label(disp.atoms, folder / task_key(disp.atoms, recipe))
        dft_forces.append(frame.get_forces())
    ml_forces = [np.asarray(r["forces"]) for r in model.predict([d.atoms for d in displaced], stress=False,
                                                                warn=False)]
    dft, vectors = ph.modes(atoms, ph.force_constants(atoms, displaced, dft_forces))
    ml_phi = ph.force_constants(atoms, displaced, ml_forces)
    acoustic = set(np.argsort(np.abs(dft))[:3].tolist())  # the Γ translations: the 3 frequencies nearest 0
    groups_idx = ph.degenerate_groups(dft)
    matched, leak = ph.frequencies_in_subspaces(atoms, ml_phi, vectors, groups_idx)
    ml = np.empty_like(dft)  # the potential's frequency of each DFT mode (same subspace), not its n-th lowest
    groups = []
    for indices, values in zip(groups_idx, matched, strict=True):
        ml[indices] = values
        d, m = float(np.mean(dft[indices])), float(np.mean(values))
        is_acoustic = bool(acoustic & set(indices))
        groups.append({"modes": len(indices), "dft_cm1": d, "ml_cm1": m, "dft_THz": d * ph.CM1_TO_THZ,
                       "ml_THz": m * ph.CM1_TO_THZ, "rel_diff": None if is_acoustic else (m - d) / abs(d),
                       "acoustic": is_acoustic})
    others = np.array([i for i in range(len(dft)) if i not in acoustic])
    rel = (ml[others] - dft[others]) / np.abs(dft[others])
    return {"dft_cm1": dft, "ml_cm1": ml, "ml_own_cm1": ph.frequencies(atoms, ml_phi), "groups": groups,
            "subspace_leak": leak, "displacements": len(displaced), "max_rel_diff": float(np.max(np.abs(rel))),
            "mean_abs_rel_diff": float(np.mean(np.abs(rel))), "unstable_dft_modes": int(np.sum(dft[others] < 0)),
            "delta_A": delta}


# ---------------------------------------------------------------------------------------------------- the run
def run_autobuild(db=None, settings: AutobuildSettings | None = None, workdir: str | Path = "autobuild",
                  engine: str = "auto", system: System | None = None, report: bool = True,
                  log: Callable[[str], None] = print) -> AutobuildResult:
    """Build a potential for a periodic solid automatically with real DFT, check it against DFT, write the report.

    Args:
        db: the database (default: :func:`mlmd_lab.connect`); it receives the loop's and the held-out DFT frames
            and the model.
        settings: the plan (default :class:`AutobuildSettings`, or :data:`PYSCF_SETTINGS` for the PySCF fallback).
        workdir: outputs: ``learn-<plan hash>/`` (the loop's resumable state; rerunning continues or reuses it),
            ``holdout/`` and ``phonons/`` (DFT folders), ``report.html``, ``summary.json`` (checks, figures,
            timings).
        engine: ``"auto"``, ``"qe"`` or ``"pyscf"`` (:func:`choose_system`).
        system: another solid and reference (a :class:`System`; ``engine`` is then ignored), e.g. cheaper DFT
            settings for a test.
        report: write ``workdir/report.html``.
        log: where progress lines go.

    Returns:
        :class:`AutobuildResult` (``passed``, ``checks``, figures' data, timings).
    """
    import mlmd_lab
    from mlmd_lab import learn
    from mlmd_lab.dft.label import label

    system = system if system is not None else choose_system(engine)
    if settings is None:
        from mlmd_lab.dft import PySCF

        settings = PYSCF_SETTINGS if isinstance(system.recipe, PySCF) else AutobuildSettings()
    db = db if db is not None else mlmd_lab.connect()
    workdir = Path(workdir)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = now - clock
        clock = now

    keywords = settings.learn_keywords()
    log(f"== autobuild 1/4: automatic construction for {system.name} with {type(system.recipe).__name__}: "
        f"{len(settings.temperatures)} temperatures {list(settings.temperatures)} K, committee "
        f"{settings.committee}, ≤ {settings.max_iterations} iterations, ≤ {settings.reference_budget} DFT calls")
    result = learn.run(system.recipe, system.atoms, db=db, workdir=workdir / f"learn-{settings.digest(system)}",
                       model_name=f"autobuild-{system.atoms.get_chemical_formula()}",
                       on_iteration=lambda record: log("  " + record.line()), **keywords)
    log(f"  {result.n_reference_calls} DFT calls, {len(result.iterations)} iterations, stop reason: "
        f"{result.stop_reason} (converged: {result.converged}); saved as {result.model_name} v{result.model_version}")
    lap("learn")
    if result.model is None:
        from mlmd_lab.errors import MLMDError

        raise MLMDError(f"the loop produced no model (stop reason {result.stop_reason!r}); see {result.workdir} and "
                        f"the failed reference tasks: {result.failed_tasks[:3]}")

    seed = int(hashlib.sha256(f"{result.model_name} v{result.model_version} {settings.seed}".encode())
               .hexdigest()[:8], 16)
    run_tag = f"{HOLDOUT_TAG}-{result.model_name}-v{result.model_version}"
    log(f"== autobuild 2/4: {settings.n_holdout} held-out frames: ML-MD at {settings.holdout_temperature:.0f} K, "
        f"labelled with the same DFT after the loop (tag {run_tag})")
    structures = holdout_structures(result.model, system.atoms, settings, seed)
    labelled = label(structures, system.recipe, db=db, workdir=workdir / "holdout", tags=[HOLDOUT_TAG, run_tag],
                     progress=False, retries=0)
    log(f"  {labelled}".replace("\n", "\n  "))
    holdout_frames = list(db.frames(tags=[run_tag]))
    lap("holdout_dft")
    if not holdout_frames:
        from mlmd_lab.errors import MLMDError

        raise MLMDError(f"no held-out frame could be labelled: {labelled.failed[:3]}")
    holdout = errors_on(result.model, holdout_frames)
    holdout["label_report"] = str(labelled)
    holdout["label_calls"] = labelled.submitted
    holdout["label_failed"] = [list(f) for f in labelled.failed]
    iteration_errors = []
    calls = 0
    for record in result.iterations:
        calls += record.reference_calls
        errors = errors_on(result.model_of(record.iteration), holdout_frames)
        iteration_errors.append({"iteration": record.iteration, "train_frames": record.train_frames,
                                 "calls_total": calls, **errors})
    log(f"  final committee on {holdout['n_frames']} held-out frames: energy RMSE {holdout['energy_rmse_mev']:.2f} "
        f"meV/atom, force RMSE {holdout['force_rmse_mev']:.0f} meV/Å = {100 * holdout['force_share']:.1f} % of the RMS "
        f"force {holdout['rms_force_mev']:.0f} meV/Å")
    lap("holdout_errors")
    log(f"== autobuild 3/4: phonons of the {len(system.atoms)}-atom cell, DFT vs potential "
        f"(symmetric ± {settings.phonon_delta} Å displacements)")
    phonons = phonon_comparison(system.atoms, system.recipe, result.model, (workdir / "phonons").resolve(),
                                settings.phonon_delta)
    log("  " + "; ".join(f"{g['dft_cm1']:.0f}/{g['ml_cm1']:.0f} cm⁻¹ (×{g['modes']})" for g in phonons["groups"]
                         if not g["acoustic"]) + " (DFT/potential)")
    lap("phonons")
    checks = _checks(settings, result, holdout, iteration_errors, phonons)
    for ok, text in checks:
        log(f"  {'PASS' if ok else 'FAIL'} {text}")
    out = AutobuildResult(settings, system, result, holdout_frames, holdout, iteration_errors, phonons, checks,
                          timings)
    if report:
        log("== autobuild 4/4: report")
        out.report_path = write_report(out, workdir / "report.html", db=db)
        lap("report")
        log(f"  report: {out.report_path.resolve()}")
    from mlmd_lab.files import atomic_write_text
    from mlmd_lab.frames import json_default

    atomic_write_text(workdir / "summary.json", json.dumps(out.to_dict(), indent=1, default=json_default))
    log(f"  times: {', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}; total {sum(timings.values()):.0f} s")
    return out


def dft_failure_check(failed: list, calls: int, max_unconverged_share: float = 0.1) -> tuple[bool, str]:
    """The main job's check on its DFT calls: ``(passed, sentence)``.

    failed: ``[task key, error]`` of the failed reference calculations (the ledger's error, ``"Type: message"``);
    calls: reference calculations run (failed ones included). Passes when every failure is an SCF that did not
    converge after the recipe's retries (:class:`~mlmd_lab.errors.SCFNotConvergedError`) and these are at most
    ``max_unconverged_share`` of the calls. Why a share and not none: the main job labels cells from 900 K ML-MD
    with fixed occupations (chosen in :func:`choose_system` for the phonons), and a hot cell whose gap closes has
    no converged fixed-occupation ground state (measured: an Si8 cell with 12 meV between the 16th and 17th bands
    oscillated at 1e-4 Ry for 300 iterations, with Broyden and with local-TF mixing). The loop leaves such a cell
    out of training and keeps going; DP-GEN does the same (frames whose SCF did not converge are dropped, and the
    run stops when their share exceeds its ``ratio_failed``). Any other failure (a crash, a killed task, a missing
    pseudopotential) fails the check.
    """
    from mlmd_lab.errors import SCFNotConvergedError

    def unconverged_scf(error) -> bool:
        return str(error).startswith(SCFNotConvergedError.__name__)

    unconverged = [str(key) for key, error in failed if unconverged_scf(error)]
    other = [(str(key), str(error)) for key, error in failed if not unconverged_scf(error)]
    limit = max_unconverged_share * max(calls, 0)
    passed = not other and len(unconverged) <= limit
    text = (f"no DFT calculation failed ({len(other)} of {calls} failed"
            + (f", first: {other[0][1][:160]}" if other else "")
            + f"); {len(unconverged)} SCF{'s' if len(unconverged) != 1 else ''} did not converge and "
            f"{'were' if len(unconverged) != 1 else 'was'} left out (≤ {100 * max_unconverged_share:.0f} % of the "
            f"calls allowed{': ' + ', '.join(k[:24] for k in unconverged[:4]) if unconverged else ''})")
    return passed, text


def _checks(settings: AutobuildSettings, result, holdout: dict, iteration_errors: list[dict],
            phonons: dict) -> list[tuple[bool, str]]:
    checks = [
        (holdout["force_share"] <= settings.max_force_share,
         f"held-out force RMSE {holdout['force_rmse_mev']:.0f} meV/Å = {100 * holdout['force_share']:.1f} % of the "
         f"held-out RMS force {holdout['rms_force_mev']:.0f} meV/Å (≤ {100 * settings.max_force_share:.0f} %), "
         f"{holdout['n_frames']} DFT frames at {settings.holdout_temperature:.0f} K never trained on"),
        (holdout["energy_rmse_mev"] <= settings.max_energy_rmse_mev,
         f"held-out energy RMSE {holdout['energy_rmse_mev']:.2f} meV/atom (≤ {settings.max_energy_rmse_mev:g})"),
        (phonons["max_rel_diff"] <= settings.phonon_tolerance,
         f"phonon frequencies of the potential within {100 * settings.phonon_tolerance:.0f} % of DFT's: largest "
         f"difference {100 * phonons['max_rel_diff']:.1f} %, mean {100 * phonons['mean_abs_rel_diff']:.1f} % over "
         f"{len(phonons['dft_cm1']) - 3} optical and zone-boundary modes"),
        dft_failure_check(result.failed_tasks + [list(f) for f in holdout.get("label_failed", [])],
                          result.n_reference_calls + int(holdout.get("label_calls", 0)),
                          settings.max_unconverged_share),
    ]
    # A gate only when the first committee knew nothing but this run's seed set. When the database already held
    # frames for these settings (a rerun of the main job recycles the last run's), the first committee is already
    # a trained one, and the difference to the last is within the scatter of committees retrained on nearly the
    # same data (8-10 % force RMSE here): measured on a rerun, 64 -> 82 meV/Å, while the DFT checks above passed.
    # The learning curve in the report shows it either way.
    if len(iteration_errors) > 1 and result.iterations and result.iterations[0].reused == 0:
        first, last = iteration_errors[0], iteration_errors[-1]
        checks.append((last["force_rmse_mev"] < first["force_rmse_mev"],
                       f"the loop improved the potential: held-out force RMSE {first['force_rmse_mev']:.0f} meV/Å "
                       f"(seed committee, {first['train_frames']} DFT frames) → {last['force_rmse_mev']:.0f} meV/Å "
                       f"(iteration {last['iteration']}, {last['train_frames']} frames)"))
    return checks


# ---------------------------------------------------------------------------------------------------- report
def learning_figure(result: AutobuildResult):
    """Accurate fraction per condition, and held-out force RMSE with the reference calls, per iteration."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11.0, 4.2), layout="constrained")
    left, right = fig.subplots(1, 2)
    its = [r.iteration for r in result.learn.iterations]
    for c, cond in enumerate(result.learn.iterations[0].conditions if result.learn.iterations else []):
        values = [r.conditions[c]["accurate"] if c < len(r.conditions) else np.nan for r in result.learn.iterations]
        left.plot(its, values, "o-", label=f"{cond['temperature_K']:g} K")
    left.axhline(0.99, color="k", linestyle=":", linewidth=1, label="stop rule (0.99)")
    left.set_xlabel("iteration")
    left.set_ylabel("accurate fraction of explored frames")
    left.set_ylim(-0.02, 1.05)
    left.legend(fontsize="small")
    left.set_title(f"Exploration (stop reason: {result.learn.stop_reason})", fontsize="medium")
    rows = result.iteration_errors
    right.plot([r["iteration"] for r in rows], [r["force_rmse_mev"] for r in rows], "o-", color="C3",
               label="held-out force RMSE")
    right.set_xlabel("iteration")
    right.set_ylabel("held-out force RMSE (meV/Å)", color="C3")
    right.set_ylim(bottom=0)
    twin = right.twinx()
    twin.plot([r["iteration"] for r in rows], [r["train_frames"] for r in rows], "s--", color="C0")
    twin.set_ylabel("DFT frames the committee trained on", color="C0")
    twin.set_ylim(bottom=0)
    right.set_title("Learning curve on the held-out DFT frames", fontsize="medium")
    return fig


def phonon_figure(result: AutobuildResult):
    """Potential vs DFT frequencies of every mode (cm⁻¹) with the y = x line."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2, 5.0), layout="constrained")
    ax = fig.subplots()
    dft, ml = result.phonons["dft_cm1"], result.phonons["ml_cm1"]
    ax.plot(dft, ml, "o", label="modes of the cell")
    top = 1.05 * max(float(np.max(dft)), float(np.max(ml)))
    bottom = 1.05 * min(0.0, float(np.min(dft)), float(np.min(ml)))  # imaginary modes drawn negative
    ax.plot([bottom, top], [bottom, top], "k-", linewidth=0.8)
    band = result.settings.phonon_tolerance
    ax.fill_between([0, top], [0, top * (1 - band)], [0, top * (1 + band)], color="0.85",
                    label=f"±{100 * band:.0f} %")
    ax.set_xlabel("DFT frequency (cm⁻¹; imaginary < 0)")
    ax.set_ylabel("potential frequency (cm⁻¹)")
    ax.set_xlim(bottom, top)
    ax.set_ylim(bottom, top)
    ax.legend(fontsize="small")
    return fig


def write_report(result: AutobuildResult, path: str | Path, db=None) -> Path:
    """The HTML report: checks, system and reference, the loop (table, learning curve, stop reason), held-out
    errors with parity plots, phonons, timings."""
    from mlmd_lab.report import Report
    from mlmd_lab.train.plots import parity_plots

    s, learn_result = result.settings, result.learn
    rep = Report(f"mlmd_lab automatic construction: {result.system.name}")
    rep.text("One structure → DFT seed set → committee potential → ML-MD exploration → uncertain frames labelled "
             "with DFT → ... (mlmd_lab.learn.run), then checked against DFT on frames and properties the loop never "
             "trained on.")
    rep.heading("Checks")
    for ok, text in result.checks:
        rep.check(ok, text)
    converged = "stopped by itself (converged)" if learn_result.converged else \
        f"did NOT stop by itself: stop reason '{learn_result.stop_reason}'"
    rep.text(f"Loop: {converged} after {len(learn_result.iterations)} iterations and {learn_result.n_reference_calls} "
             f"DFT calls (budget {s.reference_budget}, at most {s.max_iterations} iterations).",
             css_class=None if learn_result.converged else "bad")
    rep.heading("System and reference")
    rep.text(f"{result.system.atoms.info.get('name', result.system.name)}; {result.system.why}.")
    rep.preformatted(repr(result.system.recipe))
    rep.text(f"Plan: {json.dumps(asdict(s), default=str)}")
    rep.heading("Automatic construction")
    rep.preformatted(learn_result.summary())
    rows = []
    errors = {r["iteration"]: r for r in result.iteration_errors}
    for record in learn_result.iterations:
        row: dict[str, Any] = {"iteration": record.iteration, "train frames": record.train_frames,
                               "DFT calls": record.reference_calls,
                               "trust lo-hi (eV/Å)": f"{record.trust[0]:.3f}-{record.trust[1]:.3f}"}
        for cond in record.conditions:
            row[f"accurate {cond['temperature_K']:g} K"] = cond["accurate"]
        e = errors.get(record.iteration, {})
        row["held-out force RMSE (meV/Å)"] = e.get("force_rmse_mev")
        row["held-out energy RMSE (meV/atom)"] = e.get("energy_rmse_mev")
        row["train / explore / label (s)"] = "/".join(f"{record.seconds.get(k, 0.0):.0f}"
                                                      for k in ("train", "explore", "label"))
        rows.append(row)
    rep.table(rows)
    rep.figure(learning_figure(result), "Left: share of explored ML-MD frames the committee trusts, per condition "
               "and iteration. Right: force RMSE of each iteration's committee on the held-out DFT frames, and the "
               "DFT frames it was trained on.")
    rep.heading("Held-out DFT frames")
    h = result.holdout
    rep.text(f"{h['n_frames']} snapshots of an NVT ML-MD run of the final committee at {s.holdout_temperature:.0f} K "
             f"(inside the explored range), one every {s.holdout_spacing_steps} fs, labelled with the same DFT recipe "
             "after the loop finished (the loop trains on every database frame with its settings, so these could "
             f"not have been trained on). Tags {HOLDOUT_TAG!r} and the model version.")
    rep.table([{"frames": h["n_frames"], "energy RMSE (meV/atom)": h["energy_rmse_mev"],
                "force RMSE (meV/Å)": h["force_rmse_mev"], "RMS force (meV/Å)": h["rms_force_mev"],
                "force RMSE / RMS force (%)": 100 * h["force_share"]}])
    rep.text(h["label_report"])
    rep.figure(parity_plots(result.holdout_frames, learn_result.model, label="held-out"),
               "Parity: final committee (mean) vs DFT on the held-out frames")
    rep.heading("Phonons: potential vs DFT")
    p = result.phonons
    rep.text(f"Force constants of the {len(result.system.atoms)}-atom cell from {p['displacements']} DFT calculations "
             f"(± {p['delta_A']} Å; the crystal's symmetry gives the rest), the same displacements for the potential. "
             "The cell's frequencies are the bulk ones at Γ and the three X points. Modes are matched by their "
             "pattern, not their order: the potential's frequencies are those of its dynamical matrix within each "
             f"DFT mode subspace (leak out of them {p['subspace_leak']:.1e}: symmetry subspaces). DFT runs in "
             "phonons/, not in the database (so no later loop trains on them).")
    rep.text("The potential's own spectrum, ascending (cm⁻¹): "
             + ", ".join(f"{v:.0f}" for v in np.unique(np.round(p["ml_own_cm1"]))))
    rep.table([{"modes": g["modes"], "DFT (cm⁻¹)": g["dft_cm1"], "potential (cm⁻¹)": g["ml_cm1"],
                "DFT (THz)": g["dft_THz"], "potential (THz)": g["ml_THz"],
                "difference (%)": None if g["rel_diff"] is None else 100 * g["rel_diff"]} for g in p["groups"]])
    rep.figure(phonon_figure(result), "Every mode of the cell: potential vs DFT frequency")
    if db is not None:
        rep.heading("Database")
        rep.preformatted(str(db.summary()))
    rep.heading("Timings")
    rep.table([{"stage": k, "seconds": v} for k, v in result.timings_s.items()] +
              [{"stage": "total", "seconds": sum(result.timings_s.values())}])
    return rep.write(path)

