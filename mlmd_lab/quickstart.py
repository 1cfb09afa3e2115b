"""The quickstart: the whole mlmd_lab loop on the embedded defaults, in a few minutes on 2 cores.

teacher structures → DFT labels (PySCF, the pip-only engine) into the database → a potential trained with the
defaults, saved in the potential database → MD with it (loaded by name) → analysis checked against DFT → an HTML
report.

The system is one water molecule in vacuum. Why: PySCF labels it (PBE/def2-SVP, all-electron) in a fraction of a
second, so the loop fits in minutes on a laptop or a Binder pod, and a molecule has a sharp physical check — its
vibrations. The potential's harmonic frequencies are compared with DFT's own (finite differences on both), and
the MD's vibrational spectrum (from the velocity autocorrelation of an NVE run) with the harmonic frequencies;
the NVE run also checks energy conservation. Each step is a function, so ``notebooks/00_quickstart.ipynb`` runs
the same code cell by cell (with widgets) and ``mlmd-lab demo --quickstart`` runs it headless.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms

#: Tag of the quickstart's teacher data in the database, and the name of its potential.
TAG = "quickstart"
MODEL_NAME = "quickstart-water"


@dataclass
class QuickstartSettings:
    """What the quickstart does (units in the names; defaults fit ~3 minutes on 2 cores).

    n_structures: teacher structures (randomly displaced molecules). amplitude: standard deviation of the
    displacements in Å (0.04 Å spans most of the bond-length and angle range of 300 K vibrations). max_epochs:
    training epochs (4000 take ~15-30 s here); time_limit_s: a safety cap on the training run's wall time
    (symmetry functions and final errors included; training stopped by it early gives a worse potential, and the
    checks say so). hidden: hidden layers of the atomic networks
    (small: 3-atom frames carry few labels).
    temperature (K), timestep_fs: MD; nvt_steps equilibrate with Langevin, nve_steps measure (energy drift, VDOS);
    frame_interval: steps between stored frames (1 fs, Nyquist 16 700 cm⁻¹, enough for O-H stretches).
    """

    n_structures: int = 80
    amplitude: float = 0.04
    seed: int = 0
    time_limit_s: float = 240.0
    max_epochs: int = 4000
    hidden: tuple[int, ...] = (10, 10)
    temperature: float = 300.0
    timestep_fs: float = 0.25
    nvt_steps: int = 2000
    nve_steps: int = 8000
    frame_interval: int = 4


@dataclass
class QuickstartResult:
    """Everything the loop produced; ``report_path`` is the HTML report (None if not written)."""

    settings: QuickstartSettings
    minimum: Atoms
    label_report: Any
    trainer: Any
    record: Any
    nvt: Any
    nve: Any
    frequencies_cm: dict[str, np.ndarray]
    vdos: Any
    drift: Any
    checks: list[tuple[bool, str]]
    timings_s: dict[str, float] = field(default_factory=dict)
    report_path: Path | None = None

    @property
    def passed(self) -> bool:
        return all(ok for ok, _ in self.checks)


def water_recipe():
    """The embedded DFT for the quickstart: PySCF RKS PBE/def2-SVP (:func:`mlmd_lab.dft.default_recipe`)."""
    from ase.build import molecule

    from mlmd_lab.dft import default_recipe

    return default_recipe(molecule("H2O"))


def dft_minimum(recipe=None, fmax: float = 0.005) -> Atoms:
    """The water molecule relaxed with the DFT recipe (BFGS to ``fmax`` eV/Å), centred, no cell."""
    from ase.build import molecule
    from ase.optimize import BFGS

    recipe = recipe or water_recipe()
    atoms = molecule("H2O")
    atoms.calc = recipe.as_calculator()
    BFGS(atoms, logfile=None).run(fmax=fmax, steps=100)
    relaxed = Atoms(atoms.get_chemical_symbols(), atoms.positions - atoms.get_center_of_mass(), pbc=False)
    relaxed.info["name"] = "H2O (DFT minimum)"
    return relaxed


def teacher_structures(minimum: Atoms, settings: QuickstartSettings) -> list[Atoms]:
    """``n_structures`` copies of ``minimum`` with Gaussian displacements (σ = ``amplitude``), provenance attached."""
    from mlmd_lab.dft import rattle

    return rattle(minimum, settings.n_structures, amplitude=settings.amplitude, seed=settings.seed)


def label_structures(db, structures: Sequence[Atoms], recipe=None, workdir: str | Path = "quickstart/labelling",
                     progress: bool = False):
    """Run the DFT recipe on every structure not labelled before and store the frames (tag ``quickstart``)."""
    from mlmd_lab.dft.label import label

    return label(structures, recipe or water_recipe(), db=db, workdir=workdir, tags=[TAG], progress=progress)


def make_trainer(db, settings: QuickstartSettings, callbacks: Sequence[Any] = (), progress: bool = False,
                 workdir: str | Path | None = None):
    """A :class:`~mlmd_lab.train.trainer.Trainer` on the database's quickstart frames (defaults except the
    network size, epoch and time limits)."""
    from mlmd_lab.train.trainer import Trainer, TrainingWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainingWarning)  # few atoms per frame by design; the checks below judge
        return Trainer.from_database(db, ["H", "O"], settings={"code": "pyscf"}, tags=[TAG], hidden=settings.hidden,
                                     time_limit=settings.time_limit_s, max_epochs=settings.max_epochs,
                                     callbacks=callbacks, progress=progress, workdir=workdir)


def save_model(db, trainer):
    """Save the trained potential as the next version of ``quickstart-water``; returns its record."""
    return db.models.save(trainer.model, MODEL_NAME, tags=[TAG],
                          description="quickstart: water molecule, PySCF PBE/def2-SVP labels, defaults")


def harmonic_frequencies(atoms: Atoms, calculator, delta: float = 0.005) -> np.ndarray:
    """The three vibrational frequencies (cm⁻¹, ascending) of a molecule at ``atoms`` by central finite differences
    of the forces (``delta`` Å), rotations and translations projected out by taking the three largest."""
    # ase.vibrations.Vibrations does the same displacements but caches each in a file on disk; this keeps them in
    # memory and hands the Hessian to ASE's VibrationsData for the modes.
    from ase.vibrations import VibrationsData

    atoms = atoms.copy()
    n = len(atoms)
    hessian = np.zeros((3 * n, 3 * n))
    for i in range(n):
        for c in range(3):
            forces = []
            for sign in (1, -1):
                displaced = atoms.copy()
                displaced.positions[i, c] += sign * delta
                displaced.calc = calculator
                forces.append(displaced.get_forces().ravel())
            hessian[3 * i + c] = -(forces[0] - forces[1]) / (2 * delta)
    hessian = 0.5 * (hessian + hessian.T)
    energies = VibrationsData(atoms, hessian.reshape(n, 3, n, 3)).get_frequencies()  # cm⁻¹, complex
    return np.sort(np.abs(energies))[-3:].real


def md_arguments(settings: QuickstartSettings, stage: str, workdir: str | Path = "quickstart/md") -> dict[str, Any]:
    """Keyword arguments of :func:`mlmd_lab.md.run` for the quickstart's ``stage`` ("nvt" or "nve")."""
    args: dict[str, Any] = {"timestep": settings.timestep_fs, "trajectory_interval": settings.frame_interval,
                            "log_interval": settings.frame_interval, "workdir": Path(workdir) / stage}
    if stage == "nvt":
        args.update(temperature=settings.temperature, steps=settings.nvt_steps, thermostat_time=50.0,
                    seed=settings.seed)
    elif stage == "nve":
        args.update(steps=settings.nve_steps)
    else:
        raise ValueError(f"stage must be 'nvt' or 'nve', not {stage!r}")
    return args


def run_md(db, minimum: Atoms, settings: QuickstartSettings, name: str = MODEL_NAME,
           workdir: str | Path = "quickstart/md", callbacks: Sequence[Callable[[dict], None]] = ()):
    """Langevin NVT at ``temperature`` (K) from the DFT minimum, then NVE from its last state (potential loaded
    from the potential database by ``name``). Returns (nvt, nve) :class:`~mlmd_lab.md.run.MDResult`."""
    from mlmd_lab import md
    from mlmd_lab.potentials.model import ExtrapolationWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExtrapolationWarning)  # counted in the log and reported
        nvt = md.run(name, minimum, "nvt", db=db, callbacks=callbacks, **md_arguments(settings, "nvt", workdir))
        nve = md.run(name, nvt.atoms, "nve", db=db, callbacks=callbacks, **md_arguments(settings, "nve", workdir))
    return nvt, nve


def analyse(minimum: Atoms, model, nve, recipe=None) -> tuple[dict[str, np.ndarray], Any, Any, list]:
    """Harmonic frequencies (DFT and potential), the NVE run's VDOS and energy drift, and the checks."""
    from mlmd_lab import analysis

    dft = harmonic_frequencies(minimum, (recipe or water_recipe()).as_calculator())
    ml = harmonic_frequencies(minimum, model.calculator())
    frames = list(nve.trajectory)
    spectrum = analysis.vdos(frames, max_lag=min(len(frames) // 2, 1000))
    th = nve.thermo
    drift = analysis.energy_drift(th["time_fs"], th["etot_eV"], len(minimum))
    bend = spectrum.band_maximum(1000, 2500)
    stretch = spectrum.band_maximum(2800, 4500)
    checks = [
        (bool(np.all(np.abs(ml - dft) / dft < 0.05)),
         "harmonic frequencies of the potential within 5 % of DFT's: "
         + ", ".join(f"{m:.0f} vs {d:.0f} cm⁻¹" for m, d in zip(ml, dft, strict=True))),
        (abs(bend - ml[0]) < 100.0,
         f"MD bending peak {bend:.0f} cm⁻¹ within 100 cm⁻¹ of the potential's harmonic bend {ml[0]:.0f} cm⁻¹"),
        (abs(stretch - 0.5 * (ml[1] + ml[2])) < 200.0,
         f"MD stretching band {stretch:.0f} cm⁻¹ within 200 cm⁻¹ of the harmonic stretches "
         f"{ml[1]:.0f}/{ml[2]:.0f} cm⁻¹ (classical anharmonic red shift expected)"),
        (abs(drift.slope_mev_atom_ps) < 1.0,
         f"NVE energy drift {drift.slope_mev_atom_ps:+.3f} ± {drift.slope_err_mev_atom_ps:.3f} meV/atom/ps "
         f"(|drift| < 1 meV/atom/ps), fluctuation {drift.rms_mev_atom:.3f} meV/atom"),
    ]
    return {"dft": dft, "potential": ml}, spectrum, drift, checks


def run_quickstart(db=None, settings: QuickstartSettings | None = None, workdir: str | Path = "quickstart",
                   report: bool = True, log: Callable[[str], None] = print) -> QuickstartResult:
    """The whole loop headless (what ``mlmd-lab demo --quickstart`` runs); writes ``workdir/report.html`` when
    ``report``."""
    import mlmd_lab

    settings = settings or QuickstartSettings()
    db = db if db is not None else mlmd_lab.connect()
    workdir = Path(workdir)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = now - clock
        clock = now

    recipe = water_recipe()
    log(f"== quickstart 1/5: DFT minimum of H2O with {recipe!r}")
    minimum = dft_minimum(recipe)
    lap("dft_minimum")
    log(f"== quickstart 2/5: label {settings.n_structures} displaced molecules with DFT into {db!r}")
    labels = label_structures(db, teacher_structures(minimum, settings), recipe, workdir / "labelling")
    log(f"  {labels}")
    lap("labelling")
    log(f"== quickstart 3/5: train a potential (defaults, hidden {settings.hidden}, ≤ {settings.time_limit_s:.0f} s)")
    trainer = make_trainer(db, settings)
    trainer.fit()
    record = save_model(db, trainer)
    for split, errors in trainer.errors.items():
        log(f"  {split:<10} {errors['n_frames']:>3} frames: energy RMSE {errors['energy_rmse'] * 1e3:.2f} meV/atom, "
            f"force RMSE {errors['force_rmse'] * 1e3:.0f} meV/Å")
    for line in trainer.summary().splitlines():  # held-out test frames, time budget, why training stopped
        log(f"  {line}")
    log(f"  saved as {record.name} v{record.version} in the potential database")
    lap("training")
    log(f"== quickstart 4/5: MD with {record.name} v{record.version}: NVT {settings.nvt_steps} + NVE "
        f"{settings.nve_steps} steps of {settings.timestep_fs} fs at {settings.temperature:.0f} K")
    nvt, nve = run_md(db, minimum, settings, workdir=workdir / "md")
    lap("md")
    log("== quickstart 5/5: analysis against DFT")
    frequencies, spectrum, drift, checks = analyse(minimum, trainer.model, nve, recipe)
    lap("analysis")
    for ok, text in checks:
        log(f"  {'PASS' if ok else 'FAIL'} {text}")
    result = QuickstartResult(settings, minimum, labels, trainer, record, nvt, nve, frequencies, spectrum, drift,
                              checks, timings)
    if report:
        result.report_path = write_report(result, workdir / "report.html", db=db)
        lap("report")
        log(f"  report: {result.report_path.resolve()}")
    log(f"  times: {', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}; total {sum(timings.values()):.0f} s")
    return result


def write_report(result: QuickstartResult, path: str | Path, db=None) -> Path:
    """The HTML report of a quickstart run: data, training, MD and analysis with their figures."""
    from mlmd_lab.analysis.plots import drift_figure, thermo_figure, vdos_figure
    from mlmd_lab.report import Report
    from mlmd_lab.train.plots import learning_curves, parity_plots

    s = result.settings
    rep = Report("mlmd_lab quickstart: water from DFT to MD")
    rep.text("The whole loop on the embedded defaults: DFT teacher data (PySCF) → teacher-data database → "
             "Behler–Parrinello potential (JAX) → potential database → MD → analysis checked against DFT.")
    rep.heading("Checks")
    for ok, text in result.checks:
        rep.check(ok, text)
    rep.heading("Teacher data")
    rep.text(f"{result.label_report}. Recipe settings: {result.trainer.frames[0].info.get('signature', {})}")
    if db is not None:
        rep.preformatted(str(db.summary()))
    rep.heading("Training")
    rows = [{"split": k, "frames": v["n_frames"], "energy RMSE (meV/atom)": 1e3 * v["energy_rmse"],
             "force RMSE (meV/Å)": 1e3 * v["force_rmse"]} for k, v in result.trainer.errors.items()]
    rep.table(rows)
    for line in result.trainer.summary().splitlines():  # test frames held out, time budget, why it stopped
        rep.text(line)
    rep.text(f"Saved as {result.record.name} v{result.record.version}.")
    rep.figure(learning_curves(result.trainer.history), "Learning curves (validation and training RMSE per epoch)")
    split = result.trainer.split
    parity_frames = split.test if split is not None and len(split.test) else result.trainer.frames
    rep.figure(parity_plots(parity_frames, result.trainer.model), "Parity: potential vs DFT (held-out frames)")
    rep.heading("Molecular dynamics")
    rep.text(f"Langevin NVT {s.nvt_steps} steps then NVE {s.nve_steps} steps of {s.timestep_fs} fs at "
             f"{s.temperature:.0f} K: {result.nvt!r}; {result.nve!r}")
    rows = [(name, run.thermo["max_extrapolation"]) for name, run in (("NVT", result.nvt), ("NVE", result.nve))]
    rep.text("Logged steps with atoms outside the training range (extrapolation): "
             + ", ".join(f"{name} {int((x > 0).sum())} of {len(x)}" for name, x in rows)
             + ". A few per cent are expected from 80 teacher structures; more data removes them.")
    shown = ("time_fs", "epot_eV", "ekin_eV", "etot_eV", "temperature_K")
    rep.figure(thermo_figure({k: result.nvt.thermo[k] for k in shown}), "NVT: energies and temperature "
               "(3 atoms: the instantaneous temperature fluctuates strongly)")
    rep.figure(drift_figure(result.drift), "NVE: total energy per atom relative to the start")
    rep.heading("Vibrations: potential vs DFT")
    rep.table([{"mode": m, "DFT (cm⁻¹)": d, "potential (cm⁻¹)": p, "difference (%)": 100 * (p - d) / d}
               for m, d, p in zip(("bend", "symmetric stretch", "antisymmetric stretch"),
                                  result.frequencies_cm["dft"], result.frequencies_cm["potential"], strict=True)])
    fig = vdos_figure(result.vdos)
    for nu in result.frequencies_cm["dft"]:
        fig.axes[0].axvline(nu, color="k", linestyle=":", linewidth=1)
    rep.figure(fig, "Vibrational DOS of the NVE run; dotted lines: DFT harmonic frequencies")
    rep.heading("Timings")
    rep.table([{"step": k, "seconds": v} for k, v in result.timings_s.items()])
    return rep.write(path)
