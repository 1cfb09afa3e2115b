"""The automatic potential-construction loop: :func:`run` (see :mod:`mlmd_lab.learn` and docs/learn.md).

Workdir files (each written atomically, so a kill at any moment leaves only whole files):

- ``settings.json``: what must match for a rerun to continue this run (and the run id);
- ``seed.json``: the decision to label a seed set (written before its first reference call);
- ``model-KKK/``: iteration K's committee (n2p2 files per member, ``calibration.json``, ``metadata.json``);
- ``explore-KKK.json`` and ``candidates-KKK.traj``: the exploration's classification, the filters' rejections,
  the selected candidates (written before any of them reaches the reference);
- ``iteration-KKK.json``: the finished iteration's :class:`~mlmd_lab.learn.result.IterationRecord`;
- ``final.json``: the stop reason and where the model was saved;
- ``reference/``: the calculation folders (:func:`mlmd_lab.dft.label.label`; its ledger in the database
  answers every finished calculation, so no reference task is ever repeated).
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.io import Trajectory

from mlmd_lab.errors import MLMDError
from mlmd_lab.files import atomic_path, atomic_write_text
from mlmd_lab.learn import select
from mlmd_lab.learn.result import IterationRecord, LearnResult, load_committee

#: The stop rule: accurate fraction at least this at every condition ...
CONVERGED_FRACTION = 0.99
#: ... in this many consecutive iterations.
CONVERGED_ITERATIONS = 2
#: An iteration in which more than this share of the reference tasks fail stops the loop.
MAX_FAILED_SHARE = 0.5
#: Fewest labelled frames to train a committee on.
MIN_TRAIN_FRAMES = 6
#: A database with fewer matching frames than this gets a seed set labelled first.
MIN_SEED_FRAMES = 8

#: Training settings per iteration: small and fixed (deterministic, seconds on a laptop CPU).
QUICK_TRAINING = dict(n_radial=6, n_angular=2, zetas=(1.0, 4.0), hidden=(15, 15), max_epochs=1000, patience=1000,
                      validation_smoothing=1, fractions=(0.8, 0.2, 0.0), dtype="float64", seed=0)
#: The exploration MD per condition and iteration (steps, fs, steps between frames, runs): 100 frames per
#: condition, the fewest at which an accurate fraction of 0.99 (the stop rule) can be told from 0.98. With 40
#: (steps=400) a single candidate broke the rule, and few candidates per iteration made progress slow: EMT Cu8 at
#: 300/600 K (benchmarks/bench_learn.py) ran 8 iterations without stopping (0.85-0.95 at 600 K), while with 100
#: frames it converged in iteration 7 after 55 reference calls (force RMSE 2.5 % of the RMS force, docs/learn.md).
EXPLORE = dict(steps=1000, timestep=1.0, interval=10, runs=1)


def run(reference, structures, *, temperatures, pressures=None, db, workdir, committee: int = 4,
        max_iterations: int = 20, reference_budget: int | None = None, cluster=None, stop=None,
        progress: bool = False, trust: tuple[float, float] | None = None, per_iteration: int = 12,
        seed: int = 0, train_config=None, md_steps: int = EXPLORE["steps"], timestep: float = EXPLORE["timestep"],
        frame_interval: int = EXPLORE["interval"], runs_per_condition: int = EXPLORE["runs"],
        md_options: dict | None = None, model_name: str | None = None,
        on_iteration: Callable[[IterationRecord], Any] | None = None,
        on_phase: Callable[[str, dict], Any] | None = None) -> LearnResult:
    """Build a validated committee potential automatically, from one or a few structures.

    Each iteration: reuse every labelled frame the database holds for these elements and this reference's
    settings (a seed set of rattles and strains is labelled first when there are too few); train a committee;
    explore with ML-MD at every condition (temperature x pressure), the committee force uncertainty computed in
    the MD engine; classify frames as accurate / candidate / failed by trust levels (lo, hi); reject unphysical
    candidates; pick the most diverse ones (farthest points) within the budget; label them through
    :func:`mlmd_lab.dft.label.label`. Stops when the accurate fraction is >= 0.99 at every condition in two
    consecutive iterations ("converged"), or by the budget, ``max_iterations``, ``stop``, or when most reference
    tasks of an iteration fail ("reference failures").

    Args:
        reference: an ASE calculator (labelled through :class:`~mlmd_lab.dft.recipes.CalculatorRecipe`) or an
            :mod:`mlmd_lab.dft` recipe (QuantumEspresso, Vasp, PySCF, ...).
        structures: one ``Atoms`` or a list (Å): the MD starts from them, the seed set is made from them.
        temperatures: K, one or several (> 0).
        pressures: GPa, one or several: NPT at each; None: NVT.
        db: the database (labelling ledger, frames, and the saved model).
        workdir: folder of the loop's state; rerunning the same call with it continues after a kill.
        committee: members of the committee (>= 2).
        max_iterations: most iterations (trainings); the last one trains and explores, labels nothing.
        reference_budget: most reference calculations in all (seed set included); None: no limit.
        cluster: a dask cluster or client for the reference calculations (None: this process).
        stop: a ``threading.Event``-like object (``is_set()``) or a callable returning True, checked between
            tasks; the loop then ends with stop_reason "stopped" (rerun to continue).
        progress: print one line per iteration and show the labelling progress bars.
        trust: (lo, hi) in eV/Å for the calibrated max-atom force uncertainty; None: suggested per iteration
            from the RMS force of the explored frames (the committee's forces on the physical ones; lo, the
            accuracy asked) and the committee's validation error (widens hi for a young committee):
            :func:`mlmd_lab.learn.select.suggest_trust`.
        per_iteration: most reference calculations per iteration.
        seed: seeds the seed set, the training and the MD (fixed seed: the same result, resumed or not).
        train_config: a :class:`~mlmd_lab.train.trainer.TrainingConfig` (or dict of its fields) overriding
            :data:`QUICK_TRAINING`; give max_epochs for determinism.
        md_steps, timestep, frame_interval, runs_per_condition: exploration MD per condition and iteration
            (steps, fs, steps between frames, runs with different seeds and starting structures).
        md_options: further keywords of :func:`mlmd_lab.md.run` (e.g. compressibility, thermostat_time).
        model_name: name in ``db.models`` (default ``learn-<elements>``).
        on_iteration: called with each finished :class:`IterationRecord`.
        on_phase: called as ``on_phase(phase, info)`` when a phase starts: ``"training"`` (info: iteration,
            frames, committee; not called when the committee is read back from the workdir), ``"exploring"``
            (each MD run: iteration, temperature_K, pressure_GPa or None, run, runs, steps) and ``"labelling"``
            (iteration, structures: the reference calculations about to run; the seed set too, in iteration 1).

    Returns:
        :class:`~mlmd_lab.learn.result.LearnResult`.
    """
    recipe = _recipe(reference)
    structures = _checked_structures(structures)
    temperatures = _checked_temperatures(temperatures)
    pressures = _checked_pressures(pressures)
    if db is None or not hasattr(db, "frames") or not hasattr(db, "mongo"):
        raise MLMDError("learn.run needs db= (a Database from mlmd_lab.connect()): it keeps the labelling ledger, "
                        "the frames and the saved model")
    if workdir is None:
        raise MLMDError("learn.run needs workdir= (a folder for the loop's state; rerunning with it continues)")
    if int(committee) < 2:
        raise MLMDError(f"committee={committee}: a committee needs at least 2 members (4 is usual)")
    if int(max_iterations) < 1:
        raise MLMDError(f"max_iterations={max_iterations} must be >= 1")
    if reference_budget is not None and int(reference_budget) < 1:
        raise MLMDError(f"reference_budget={reference_budget} must be >= 1 reference calculations, or None")
    if int(per_iteration) < 1:
        raise MLMDError(f"per_iteration={per_iteration} must be >= 1")
    if trust is not None:
        lo, hi = (float(x) for x in trust)
        if not 0 < lo < hi:
            raise MLMDError(f"trust={trust} must be (lo, hi) in eV/Å with 0 < lo < hi")
        trust = (lo, hi)
    loop = _Loop(recipe, structures, temperatures, pressures, db, Path(workdir), dict(
        committee=int(committee), max_iterations=int(max_iterations),
        reference_budget=None if reference_budget is None else int(reference_budget), cluster=cluster, stop=stop,
        progress=bool(progress), trust=trust, per_iteration=int(per_iteration), seed=int(seed),
        train_config=train_config, md=dict(steps=int(md_steps), timestep=float(timestep),
                                           interval=int(frame_interval), runs=int(runs_per_condition),
                                           options=dict(md_options or {})),
        model_name=model_name, on_iteration=on_iteration, on_phase=on_phase))
    return loop.run()


# ---------------------------------------------------------------------------------------------------- checks
def _recipe(reference):
    from mlmd_lab.dft.recipes import CalculatorRecipe, Recipe

    if isinstance(reference, Recipe):
        return reference
    if hasattr(reference, "get_potential_energy") and hasattr(reference, "get_forces"):
        return CalculatorRecipe(reference)
    raise MLMDError(f"reference must be an ASE calculator or an mlmd_lab.dft recipe (QuantumEspresso, Vasp, "
                    f"PySCF, CalculatorRecipe), not {type(reference).__name__}")


def _checked_structures(structures) -> list[Atoms]:
    items = [structures] if isinstance(structures, Atoms) else list(structures or [])
    if not items:
        raise MLMDError("structures is empty: give at least one starting structure (ase.Atoms)")
    for k, atoms in enumerate(items):
        if not isinstance(atoms, Atoms) or len(atoms) == 0:
            raise MLMDError(f"structures[{k}] is not a non-empty ase.Atoms ({type(atoms).__name__})")
        if atoms.pbc.any() and not atoms.pbc.all():
            raise MLMDError(f"structures[{k}] has mixed periodicity {atoms.pbc.tolist()}; use a 3-D periodic cell "
                            "(with vacuum) or a molecule")
    out = []
    for atoms in items:
        copy = atoms.copy()
        copy.calc = None
        copy.set_constraint()
        out.append(copy)
    return out


def _checked_temperatures(temperatures) -> list[float]:
    values = [temperatures] if np.isscalar(temperatures) else list(temperatures if temperatures is not None else [])
    if not values:
        raise MLMDError("temperatures is empty: give one or more temperatures in K, e.g. temperatures=[300, 600]")
    out = []
    for t in values:
        try:
            t = float(t)
        except (TypeError, ValueError):
            raise MLMDError(f"temperature {t!r} is not a number; give temperatures in K") from None
        if not 0 < t < 1e5:
            raise MLMDError(f"temperature {t} K must be > 0 (and plausible); temperatures are in kelvin")
        out.append(t)
    return out


def _checked_pressures(pressures) -> list[float | None]:
    if pressures is None:
        return [None]
    values = [pressures] if np.isscalar(pressures) else list(pressures)
    if not values:
        raise MLMDError("pressures is empty: give pressures in GPa, or None for NVT")
    out = []
    for p in values:
        try:
            p = float(p)
        except (TypeError, ValueError):
            raise MLMDError(f"pressure {p!r} is not a number; give pressures in GPa (1 bar = 1e-4 GPa)") from None
        if abs(p) > 1000:
            raise MLMDError(f"pressure {p} GPa is not plausible; pressures are in GPa (1 bar = 1e-4 GPa)")
        out.append(p)
    return out


def _stop_requested(stop) -> bool:
    if stop is None:
        return False
    if hasattr(stop, "is_set"):
        return bool(stop.is_set())
    return bool(stop())


def _digest(atoms: Atoms) -> str:
    h = hashlib.sha256(np.ascontiguousarray(atoms.positions, np.float64).tobytes())
    h.update(np.ascontiguousarray(atoms.cell.array, np.float64).tobytes())
    h.update(np.ascontiguousarray(atoms.numbers, np.int64).tobytes())
    h.update(np.asarray(atoms.pbc, np.int8).tobytes())
    return h.hexdigest()[:16]


def _json(data: Any) -> str:
    from mlmd_lab.frames import json_default

    return json.dumps(data, indent=1, sort_keys=True, default=json_default)


def recycled_frames(db, recipe, elements: list[str]) -> list[Atoms]:
    """Every frame in ``db`` of exactly these ``elements`` computed with ``recipe``'s settings, sorted by id.

    A stored signature counts as ``recipe``'s settings when :func:`mlmd_lab.settings.compare_signatures` finds
    no conflict at all (error or warning) with the recipe's own signature for that frame's cell (``extra``
    entries included: an ASE calculator's parameters live there, a QE pseudopotential's md5 too). Hash equality
    is too strict: a parsed output records more than a recipe states (QE's ``extra.qe_xc_indices``, read from
    pw.x's header), so no QE frame would ever be recycled.
    """
    from mlmd_lab.settings import compare_signatures

    query = db.frame_query(elements=elements, exclusive=True)
    wanted = []
    for sig_id in db.frames_collection.distinct("signature_id", query):
        stored = db.signature(sig_id)
        one = db.frames(elements=elements, exclusive=True, limit=1, query={"signature_id": sig_id})
        if stored is None or not len(one):
            continue
        if not compare_signatures(recipe.signature_settings(one[0]), stored, elements=elements):
            wanted.append(sig_id)
    if not wanted:
        return []
    frames = db.frames(elements=elements, exclusive=True, query={"signature_id": {"$in": wanted}})
    return sorted(frames, key=lambda a: a.info["frame_id"])


# ---------------------------------------------------------------------------------------------------- the loop
class _Loop:
    """One loop: its settings, state files, and the phases of an iteration."""

    def __init__(self, recipe, structures: list[Atoms], temperatures, pressures, db, workdir: Path,
                 options: dict) -> None:
        from mlmd_lab.dft.label import identity_settings

        self.recipe, self.structures, self.db, self.workdir, self.o = recipe, structures, db, workdir, options
        self.conditions = [(t, p) for t in temperatures for p in pressures]
        self.elements = sorted({s for a in structures for s in a.get_chemical_symbols()})
        self.min_distance = min(select.shortest_distance(a) for a in structures)
        self.reference_settings = identity_settings(recipe, structures[0])
        self.settings = {
            "recipe": type(recipe).__name__, "reference": self.reference_settings,
            "structures": [_digest(a) for a in structures], "temperatures_K": temperatures,
            "pressures_GPa": pressures, "committee": options["committee"], "trust": options["trust"],
            "per_iteration": options["per_iteration"], "seed": options["seed"], "md": options["md"],
            "train_config": self._train_config().to_dict(),
        }
        self.run_id = None
        self._calls_this_iteration = 0
        self.records: list[IterationRecord] = []
        self.model = None

    # -- state ------------------------------------------------------------------------------------------
    def _open(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / "settings.json"
        mine = json.loads(_json(self.settings))
        if path.exists():
            saved = json.loads(path.read_text())
            different = sorted(k for k in mine if saved.get(k) != mine[k])
            if different:
                raise MLMDError(f"{self.workdir} holds a learning run with other settings ({', '.join(different)}); "
                                "rerun with the same ones to continue it, or use another workdir")
            self.run_id = saved["run_id"]
        else:
            self.run_id = uuid.uuid4().hex[:12]
            atomic_write_text(path, _json(dict(mine, run_id=self.run_id)))

    def _phase(self, name: str, **info) -> None:
        if self.o.get("on_phase") is not None:
            self.o["on_phase"](name, info)

    def _path(self, kind: str, k: int) -> Path:
        return self.workdir / f"{kind}-{k:03d}"

    def _load_json(self, path: Path) -> dict | None:
        return json.loads(path.read_text()) if path.exists() else None

    # -- run --------------------------------------------------------------------------------------------
    def run(self) -> LearnResult:
        self._open()
        final = self._load_json(self.workdir / "final.json")
        k = 1
        while True:
            saved = self._load_json(self._path("iteration", k).with_suffix(".json"))
            if saved is None:
                break
            self.records.append(IterationRecord.from_dict(saved))
            k += 1
        if final is not None and self.records:
            self.model = self._load_model(len(self.records))
            return self._result(final)
        if self.records and self.records[-1].stop:
            return self._finish(self.records[-1].stop)
        while True:
            record = self._iteration(k)
            if record is None:  # stopped between tasks: the iteration continues on a rerun
                return self._finish("stopped", write=False)
            self.records.append(record)
            atomic_write_text(self._path("iteration", k).with_suffix(".json"), _json(record.to_dict()))
            if self.o["on_iteration"] is not None:
                self.o["on_iteration"](record)
            if self.o["progress"]:
                print(record.line(), flush=True)
            if record.stop:
                return self._finish(record.stop)
            k += 1

    def _finish(self, reason: str, write: bool = True) -> LearnResult:
        final = {"stop_reason": reason, "converged": reason == "converged", "model_name": None,
                 "model_version": None}
        if write and self.model is None and self.records and self._path("model", len(self.records)).exists():
            self.model = self._load_model(len(self.records))
        if write and self.model is not None:
            name = self.o["model_name"] or f"learn-{'-'.join(self.elements)}"
            provenance = {"learn": {"run_id": self.run_id, "settings": json.loads(_json(self.settings)),
                                    "stop_reason": reason, "converged": reason == "converged",
                                    "n_reference_calls": self._calls(),
                                    "iterations": [r.to_dict() for r in self.records]}}
            record = self.db.models.save(self.model, name, description=f"mlmd_lab.learn run {self.run_id}: "
                                         f"{len(self.records)} iterations, stopped: {reason}",
                                         tags=["learn"], metadata=json.loads(_json(provenance)))
            final.update(model_name=record.name, model_version=record.version)
        if write:
            atomic_write_text(self.workdir / "final.json", _json(final))
        return self._result(final)

    def _result(self, final: dict) -> LearnResult:
        return LearnResult(model=self.model, iterations=list(self.records), n_reference_calls=self._calls(),
                           converged=bool(final["converged"]), stop_reason=final["stop_reason"],
                           model_name=final.get("model_name"), model_version=final.get("model_version"),
                           workdir=str(self.workdir))

    def _calls(self) -> int:
        return int(sum(r.reference_calls for r in self.records))

    def _budget_left(self) -> int | None:
        """Reference calls left in the budget: finished iterations' and this iteration's so far (the seed set)."""
        budget = self.o["reference_budget"]
        return None if budget is None else budget - self._calls() - self._calls_this_iteration

    # -- one iteration ----------------------------------------------------------------------------------
    def _iteration(self, k: int) -> IterationRecord | None:
        t_start = time.perf_counter()
        record = IterationRecord(iteration=k)
        if k == 1:
            seeded = self._seed(record)
            if seeded is None:
                return None
            if seeded == "failed":
                record.stop = "reference failures"
                record.seconds = {"label": time.perf_counter() - t_start, "total": time.perf_counter() - t_start}
                return record
        frames, record.outliers = self._training_frames()
        record.train_frames = len(frames)
        record.reused = sum(f"learn-{self.run_id}" not in (a.info.get("tags") or []) for a in frames)
        if len(frames) < MIN_TRAIN_FRAMES:
            raise MLMDError(f"only {len(frames)} labelled frames of {'-'.join(self.elements)} with this reference's "
                            f"settings; training needs at least {MIN_TRAIN_FRAMES}: check the reference (see the "
                            "ledger's errors) or give more starting structures")
        t0 = time.perf_counter()
        if _stop_requested(self.o["stop"]):
            return None
        self.model, meta = self._committee(k, frames)
        record.validation = meta["validation"]
        t_train = time.perf_counter() - t0
        explored = self._load_json(self._path("explore", k).with_suffix(".json"))
        t0 = time.perf_counter()
        if explored is None:
            self._calls_this_iteration = record.reference_calls  # the seed set's, in iteration 1
            explored = self._explore(k, frames, meta)
            self._calls_this_iteration = 0
            if explored is None:
                return None
        t_explore = float(explored.get("seconds", time.perf_counter() - t0))
        record.trust, record.trust_source = tuple(explored["trust"]), explored["trust_source"]
        record.target_rms_force = explored.get("target_rms_force")
        record.conditions = explored["conditions"]
        record.rejected = explored["rejected"]
        record.stop = explored["stop"]
        t0 = time.perf_counter()
        if record.stop is None:
            candidates = self._read_traj(self._path("candidates", k).with_suffix(".traj"))
            record.selected = len(candidates)
            outcome = self._label(candidates, k, explored["pre"])
            if outcome is None:
                return None
            self._count(record, outcome)
            for c, frame_ok in zip(explored["selected_conditions"], outcome["ok"], strict=True):
                record.conditions[c]["labelled"] += int(frame_ok)
            attempted = outcome["calls"]
            if attempted and len(outcome["failed"]) > MAX_FAILED_SHARE * attempted:
                record.stop = "reference failures"
        seed_s = record.seconds.get("label", 0.0)
        t_label = time.perf_counter() - t0 + seed_s
        record.seconds = {"train": max(t_train, float(meta.get("train_s", 0.0))), "explore": t_explore,
                          "label": t_label, "total": time.perf_counter() - t_start}
        return record

    def _count(self, record: IterationRecord, outcome: dict) -> None:
        record.labelled += outcome["labelled"]
        record.recycled += outcome["recycled"]
        record.reference_calls += outcome["calls"]
        record.failed_tasks += [list(f) for f in outcome["failed"]]

    # -- seed set ---------------------------------------------------------------------------------------
    def _seed(self, record: IterationRecord) -> str | bool | None:
        """Label the seed set when the database has too few frames (decided once, in ``seed.json``).
        Returns True/False (labelled or not), "failed" (most seed tasks failed), None (stop requested)."""
        t0 = time.perf_counter()
        path = self.workdir / "seed.json"
        decision = self._load_json(path)
        if decision is None:
            have = len(self._frames())
            structures = self._seed_structures() if have < MIN_SEED_FRAMES else []
            budget = self._budget_left()
            if budget is not None:
                structures = structures[:budget]
            pre = self._ledger_status(structures)
            with atomic_path(self.workdir / "seed.traj") as tmp:
                self._write_traj(tmp, structures)
            decision = {"frames_in_database": have, "n_structures": len(structures), "pre": pre}
            atomic_write_text(path, _json(decision))
        if not decision["n_structures"]:
            return False
        structures = self._read_traj(self.workdir / "seed.traj")
        outcome = self._label(structures, 1, decision["pre"])
        if outcome is None:
            return None
        self._count(record, outcome)
        record.seconds = {"label": time.perf_counter() - t0}
        attempted = outcome["calls"]
        if attempted and len(outcome["failed"]) > MAX_FAILED_SHARE * attempted:
            return "failed"
        return True

    def _seed_structures(self) -> list[Atoms]:
        """The starting structures, rattles (0.04 and 0.1 Å, small cell strains) and ±4 % volume strains:
        12 per starting structure, at most 16 in all (one per structure at least)."""
        from mlmd_lab.dft.generators import rattle, strain_scan

        per = max(4, 16 // len(self.structures)) if len(self.structures) > 1 else 12
        out = []
        for n, atoms in enumerate(self.structures):
            seed = self.o["seed"] * 1000 + n
            group = [atoms.copy()]
            periodic = bool(atoms.pbc.all())
            group += rattle(atoms, 6, amplitude=0.04, seed=seed, cell_amplitude=0.01 if periodic else 0.0)
            group += rattle(atoms, 3, amplitude=0.1, seed=seed + 1)
            if periodic:
                group += strain_scan(atoms, (-0.04, 0.04))
            out += group[:per]
        return out[:max(16, len(self.structures))]

    # -- data -------------------------------------------------------------------------------------------
    def _frames(self) -> list[Atoms]:
        """Every labelled frame of these elements computed with this reference's settings, sorted by id."""
        return recycled_frames(self.db, self.recipe, self.elements)

    def _training_frames(self) -> tuple[list[Atoms], list[str]]:
        """The labelled frames to train on, and the ids of those left out: frames whose largest reference atomic
        force exceeds :data:`select.MAX_FORCE_FACTOR` x the last exploration's RMS force component (from the
        second iteration on). A young committee's uncertainty can miss such a frame (it underestimates its
        forces); labelled, a few of them dominate the force loss: three frames of 5-8 eV/Å among 48 (explored RMS
        0.5 eV/Å) made every member of a committee fit all frames at 0.2-0.27 eV/Å, and 0.04 without them
        (bench_learn --seed 1, iteration 4). They stay in the database."""
        from mlmd_lab.frames import results_of

        frames = self._frames()
        rms = next((r.target_rms_force for r in reversed(self.records) if r.target_rms_force), None)
        if rms is None:
            return frames, []
        limit = select.MAX_FORCE_FACTOR * rms
        kept, outliers = [], []
        for atoms in frames:
            forces = results_of(atoms).get("forces")
            if forces is not None and float(np.linalg.norm(forces, axis=1).max()) > limit:
                outliers.append(str(atoms.info["frame_id"]))
            else:
                kept.append(atoms)
        return kept, outliers

    # -- training ---------------------------------------------------------------------------------------
    def _train_config(self):
        from mlmd_lab.train.trainer import TrainingConfig

        given = self.o["train_config"]
        if given is None:
            given = {}
        if isinstance(given, TrainingConfig):
            return given if given.max_epochs is not None else replace(given, max_epochs=QUICK_TRAINING["max_epochs"])
        return TrainingConfig(**{**QUICK_TRAINING, **dict(given)})

    def _committee(self, k: int, frames: list[Atoms]):
        """Iteration k's committee: loaded from ``model-k`` when there, else trained, saved and read back (the
        loop always uses the model as read from disk, so a resumed run uses bit for bit the same one)."""
        folder = self._path("model", k)
        if not folder.exists():
            from mlmd_lab.train.trainer import TrainingWarning, train_ensemble

            self._phase("training", iteration=k, frames=len(frames), committee=self.o["committee"])
            t0 = time.perf_counter()
            config = replace(self._train_config(), seed=self.o["seed"] + 100 * k)
            if config.symmetry_functions is None and k > 1:
                config = replace(config, symmetry_functions=self._first_descriptor())
            with warnings.catch_warnings():  # "only N frames": expected in the first iterations
                warnings.simplefilter("ignore", TrainingWarning)
                ensemble = train_ensemble(frames, self.o["committee"], config, progress=False,
                                          calibration_fraction=0.15)
            meta = {"validation": _validation(ensemble), "train_s": time.perf_counter() - t0,
                    "rms_force": _rms_force(frames), "n_frames": len(frames)}
            with atomic_path(folder) as tmp:
                ensemble.to_n2p2(tmp)
                (tmp / "calibration.json").write_text(_json(ensemble.calibration))
                (tmp / "metadata.json").write_text(_json(meta))
        model = self._load_model(k)
        return model, json.loads((folder / "metadata.json").read_text())

    def _first_descriptor(self) -> list:
        """The symmetry functions (Å) of iteration 1's committee, which later iterations keep.

        Generated anew, the set would follow each iteration's data: its innermost functions sit at 0.9 x the
        shortest distance in a sample of the frames, which moved by ~2 % between iterations of one run (the
        main job's Si: 4.97 Å, then 4.96, then 4.97 again), so the committees of two iterations described atoms
        differently and every iteration compiled its MD anew. With one set, the potentials of all iterations are
        of one kind: comparable, and their compiled MD programs are found in the compilation cache."""
        from mlmd_lab.potentials.model import HDNNP

        model = HDNNP.from_n2p2(self._path("model", 1) / "member_0")
        if model.length_unit != "Angstrom":  # trained here: always Å; a foreign folder is refused, not converted
            raise MLMDError(f"{self._path('model', 1)} holds a potential in {model.length_unit}, not Å")
        return [sf for element in model.elements for sf in model.functions[element]]

    def _load_model(self, k: int):
        return load_committee(self._path("model", k), iteration=k)

    def _trust(self, meta: dict, runs: list[list[Atoms]]) -> tuple[tuple[float, float], str, float | None]:
        """(lo, hi), their source and the RMS force (eV/Å) the accuracy target is measured against.

        The RMS force is that of the committee's mean forces on the explored frames that pass the physical
        filters: the distribution the potential is asked to be accurate on. The labelled frames' RMS force is not
        used: once frames from a wild early exploration are labelled (bench_learn --seed 1: iteration 1 at 600 K
        was 59 % failed frames), their large forces doubled it and with it lo, so the target became 10 %
        instead of 5 %. Falls back to the labelled frames' when no explored frame passes the filters."""
        if self.o["trust"] is not None:
            return tuple(self.o["trust"]), "given", None
        squares = [atoms.info["force_sq_mean"] for frames in runs for atoms in frames
                   if atoms.info.get("problem") is None and np.isfinite(atoms.info.get("force_sq_mean", np.nan))]
        rms = float(np.sqrt(np.mean(squares))) if squares else float(meta["rms_force"])
        n_atoms = max(len(atoms) for atoms in self.structures)
        trust = select.suggest_trust(rms, meta["validation"]["force_mean_error"], n_atoms)
        return trust, "suggested", rms

    @staticmethod
    def _reject_force_outliers(runs: list[list[Atoms]], rms: float) -> None:
        """Mark frames whose largest committee atomic force exceeds :data:`select.MAX_FORCE_FACTOR` x the target
        RMS force component (eV/Å) as unphysical: never labelled (why: select.MAX_FORCE_FACTOR)."""
        limit = select.MAX_FORCE_FACTOR * rms
        for frames in runs:
            for atoms in frames:
                largest = atoms.info.get("max_force", 0.0)
                if atoms.info.get("problem") is None and largest > limit:
                    atoms.info["problem"] = (f"largest force {largest:.2f} eV/Å > {select.MAX_FORCE_FACTOR:g} x the "
                                             f"explored RMS force component {rms:.3f} eV/Å")

    # -- exploration ------------------------------------------------------------------------------------
    def _explore(self, k: int, frames: list[Atoms], meta: dict) -> dict | None:
        t0 = time.perf_counter()
        runs: list[list[Atoms]] = []  # per condition: its explored frames (all runs)
        stopped_runs: list[list[str]] = []
        for c, (temperature, pressure) in enumerate(self.conditions):
            runs.append([])
            stopped_runs.append([])
            for r in range(self.o["md"]["runs"]):
                if _stop_requested(self.o["stop"]):
                    return None
                start_index = (k - 1 + r + c) % len(self.structures)
                seed = int(np.random.default_rng([self.o["seed"], k, c, r]).integers(2**31))
                self._phase("exploring", iteration=k, temperature_K=temperature, pressure_GPa=pressure, run=r + 1,
                            runs=self.o["md"]["runs"], steps=self.o["md"]["steps"])
                run_frames, stopped = self._md(start_index, temperature, pressure, seed)
                if stopped:
                    stopped_runs[c].append(stopped)
                for atoms in run_frames:
                    atoms.info.update(condition=c, start=start_index, problem=select.physical_problem(
                        atoms, self.structures[start_index], self.min_distance))
                runs[c] += run_frames
        trust, source, rms = self._trust(meta, runs)
        if rms is not None:
            self._reject_force_outliers(runs, rms)
        explored, conditions = [], []
        for c, (temperature, pressure) in enumerate(self.conditions):
            entry = {"temperature_K": temperature, "pressure_GPa": pressure, "frames": 0, "accurate": 0.0,
                     "candidate": 0.0, "failed": 0.0, "md_stopped": stopped_runs[c], "rejected": 0, "selected": 0,
                     "labelled": 0}
            counts = {select.ACCURATE: 0, select.CANDIDATE: 0, select.FAILED: 0}
            counts[select.FAILED] += len(stopped_runs[c])  # the step the engine refused counts as a failed frame
            for atoms in runs[c]:
                kind = select.classify(atoms.info["uncertainty"], atoms.info["extrapolation"], trust)
                counts[kind] += 1
                if kind != select.ACCURATE:
                    atoms.info.update(kind=kind)
                    explored.append(atoms)
            total = max(1, sum(counts.values()))
            entry.update(frames=int(sum(counts.values())), **{kind: n / total for kind, n in counts.items()},
                         counts=counts)
            conditions.append(entry)
        stop = self._stop_rule(k, conditions)
        rejected, selected = [], []
        if stop is None:
            rejected, selected = self._choose(explored, frames, conditions)
        for atoms in selected:
            conditions[atoms.info["condition"]]["selected"] += 1
        pre = self._ledger_status(selected)
        with atomic_path(self._path("candidates", k).with_suffix(".traj")) as tmp:
            self._write_traj(tmp, selected)
        out = {"trust": list(trust), "trust_source": source, "target_rms_force": rms, "conditions": conditions,
               "rejected": rejected,
               "stop": stop, "selected_conditions": [int(a.info["condition"]) for a in selected], "pre": pre,
               "seconds": time.perf_counter() - t0}
        atomic_write_text(self._path("explore", k).with_suffix(".json"), _json(out))
        return out

    def _md(self, start_index: int, temperature: float, pressure, seed: int) -> tuple[list[Atoms], str | None]:
        """One exploration run; frames carry ``info["uncertainty"]`` (the log's calibrated max-atom committee
        force uncertainty, eV/Å), ``info["extrapolation"]`` at their step and ``info["force_sq_mean"]`` (mean
        squared component of the committee's mean forces, eV²/Å²) and ``info["max_force"]`` (its largest atomic
        force, eV/Å)."""
        from mlmd_lab.md.run import LOG_COLUMNS, MDStoppedError
        from mlmd_lab.md.run import run as md_run

        md = self.o["md"]
        options = dict(md["options"])
        ensemble = "nvt" if pressure is None else "npt"
        if ensemble == "npt":
            options.setdefault("compressibility", 0.02)
        # one temperature guard for every condition: the compiled MD block is then the same program at each
        # temperature (the target temperature is an argument), compiled once (persistent cache) per model
        options.setdefault("max_temperature", 10.0 * max(t for t, _ in self.conditions) + 1000.0)
        start = self.structures[start_index].copy()
        stopped = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                result = md_run(self.model, start, ensemble, temperature=temperature, pressure=pressure,
                                timestep=md["timestep"], steps=md["steps"], seed=seed, velocities="draw",
                                trajectory_interval=md["interval"], log_interval=md["interval"],
                                restart_interval=0, on_extrapolation="ignore", **options)
            except MDStoppedError as err:
                result, stopped = err.result, err.result.stopped
        thermo = result.thermo
        by_step = {int(s): (float(u), float(x)) for s, u, x in zip(
            thermo["step"], thermo[LOG_COLUMNS[-1]], thermo["max_extrapolation"], strict=True)}
        frames = []
        for atoms in result.trajectory:
            step = int(atoms.info.get("step", -1))
            if step <= 0 or step not in by_step:
                continue  # the starting structure is not explored
            frame = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell.array, pbc=atoms.pbc)
            frame.wrap()
            forces = atoms.calc.results.get("forces") if atoms.calc is not None else None
            frame.info.update(step=step, temperature=temperature, pressure=pressure,
                              uncertainty=by_step[step][0], extrapolation=by_step[step][1],
                              force_sq_mean=float(np.mean(np.square(forces))) if forces is not None else float("nan"),
                              max_force=float(np.linalg.norm(forces, axis=1).max()) if forces is not None else 0.0)
            frames.append(frame)
        return frames, stopped

    def _stop_rule(self, k: int, conditions: list[dict]) -> str | None:
        fractions = [c["accurate"] for c in conditions]
        history = [r.accurate_fractions() for r in self.records[-(CONVERGED_ITERATIONS - 1):]] \
            if CONVERGED_ITERATIONS > 1 else []
        window = [*history, fractions]
        if len(window) >= CONVERGED_ITERATIONS and all(min(f) >= CONVERGED_FRACTION for f in window):
            return "converged"
        if _stop_requested(self.o["stop"]):
            return None  # handled by the caller between tasks
        left = self._budget_left()
        if left is not None and left <= 0:
            return "reference budget"
        if k >= self.o["max_iterations"]:
            return "max iterations"
        return None

    def _choose(self, explored: list[Atoms], frames: list[Atoms], conditions: list[dict]):
        """Physical filters, then farthest-point selection within this iteration's budget."""
        rejected, kept = [], []
        for atoms in explored:
            why = atoms.info["problem"]
            if why is None:
                kept.append(atoms)
            else:
                conditions[atoms.info["condition"]]["rejected"] += 1
                rejected.append({"condition": int(atoms.info["condition"]), "step": int(atoms.info["step"]),
                                 "reason": why})
        n = self.o["per_iteration"]
        left = self._budget_left()
        if left is not None:
            n = min(n, left)
        cutoff = float(self.model.cutoff)
        existing = [select.descriptor(a, self.elements, cutoff) for a in frames]
        chosen: list[Atoms] = []
        # candidates first; the budget left goes to failed frames (beyond hi but physical: early iterations)
        for kind in (select.CANDIDATE, select.FAILED):
            pool = [a for a in kept if a.info["kind"] == kind]
            if not pool or len(chosen) >= n:
                continue
            X = np.array([select.descriptor(a, self.elements, cutoff) for a in pool])
            E = np.array(existing + [select.descriptor(a, self.elements, cutoff) for a in chosen])
            order = select.farthest_points(X, n - len(chosen), existing=E,
                                           priority=[-a.info["uncertainty"] for a in pool])
            chosen += [pool[i] for i in order]
        return rejected, chosen

    # -- labelling --------------------------------------------------------------------------------------
    def _ledger_status(self, structures: Sequence[Atoms]) -> dict[str, str | None]:
        from mlmd_lab.dft.label import LEDGER, task_key

        ledger = self.db.mongo[LEDGER]
        out = {}
        for atoms in structures:
            key = task_key(atoms, self.recipe)
            doc = ledger.find_one({"_id": key}, {"status": 1})
            out[key] = None if doc is None else doc.get("status")
        return out

    def _label(self, structures: list[Atoms], k: int, pre: dict) -> dict | None:
        """Label ``structures`` through :func:`~mlmd_lab.dft.label.label` (one task at a time without a cluster,
        so ``stop`` is honoured between tasks). Tasks already complete or failed in the ledger are not run
        again. ``pre``: their ledger status before this iteration (to count calls across resumed sessions).
        Returns labelled, recycled, calls, failed [(key, error)], ok (per structure), or None when stopped."""
        from mlmd_lab.dft.label import LEDGER, label, task_key

        ledger = self.db.mongo[LEDGER]
        keys = [task_key(a, self.recipe) for a in structures]
        tags = ["learn", f"learn-{self.run_id}", f"learn-iteration-{k}"]
        options = dict(workdir=self.workdir / "reference", retries=0, tags=tags,
                       progress=self.o["progress"] and self.o["cluster"] is not None)

        def status(key: str) -> str | None:
            doc = ledger.find_one({"_id": key}, {"status": 1})
            return None if doc is None else doc.get("status")

        todo = [a for a, key in zip(structures, keys, strict=True) if status(key) not in ("complete", "failed")]
        if todo:
            self._phase("labelling", iteration=k, structures=len(todo))
        if self.o["cluster"] is None:
            for atoms in todo:
                if _stop_requested(self.o["stop"]):
                    return None
                label([atoms], self.recipe, None, self.db, **options)
        elif todo:
            if _stop_requested(self.o["stop"]):
                return None
            label(todo, self.recipe, self.o["cluster"], self.db, **options)
        out = {"labelled": 0, "recycled": 0, "calls": 0, "failed": [], "ok": []}
        seen = set()
        for key in keys:
            now = status(key)
            out["ok"].append(now == "complete")
            if key in seen:
                continue
            seen.add(key)
            before = pre.get(key)
            if before == "complete":
                out["recycled"] += 1
            elif before is None and now in ("complete", "failed"):
                out["calls"] += 1
                if now == "complete":
                    out["labelled"] += 1
                else:
                    doc = ledger.find_one({"_id": key}, {"error": 1}) or {}
                    out["failed"].append((key, str(doc.get("error", ""))[:500]))
        return out

    # -- files ------------------------------------------------------------------------------------------
    @staticmethod
    def _write_traj(path: Path, structures: Sequence[Atoms]) -> None:
        with Trajectory(path, "w") as writer:
            for atoms in structures:
                copy = atoms.copy()
                copy.info = {k: v for k, v in atoms.info.items() if k in ("condition", "start", "step",
                                                                           "uncertainty", "kind")}
                writer.write(copy)

    @staticmethod
    def _read_traj(path: Path) -> list[Atoms]:
        if not path.exists() or path.stat().st_size == 0:
            return []
        from ase.io import read

        frames = list(read(path, ":"))
        for atoms in frames:
            atoms.calc = None
        return frames


def _validation(ensemble) -> dict:
    """The committee's mean |F_mean - F_ref| per atom on its held-out calibration frames (eV/Å), and the
    members' validation RMSEs (means over members; eV/atom, eV/Å)."""
    cal = ensemble.calibration or {}
    n = cal.get("n_atoms", {})
    errors = cal.get("mean_error", {})
    total = sum(n.get(e, 0) for e in errors if errors[e] is not None)
    mean_error = (sum(n[e] * errors[e] for e in errors if errors[e] is not None) / total) if total else None
    members = [m["errors"].get("validation", {}) for m in ensemble.metadata.get("members", [])]

    def mean_of(key: str) -> float | None:
        values = [m[key] for m in members if key in m]
        return float(np.mean(values)) if values else None

    if mean_error is None:
        mean_error = mean_of("force_rmse") * np.sqrt(3.0) if mean_of("force_rmse") is not None else 1.0
    return {"force_mean_error": float(mean_error), "force_scale": cal.get("force_scale"),
            "calibration_frames": cal.get("n_frames"), "members_energy_rmse": mean_of("energy_rmse"),
            "members_force_rmse": mean_of("force_rmse")}


def _rms_force(frames: Sequence[Atoms]) -> float:
    """RMS force component (eV/Å) of labelled frames."""
    from mlmd_lab.frames import results_of

    forces = [np.asarray(results_of(a)["forces"]).ravel() for a in frames if results_of(a).get("forces") is not None]
    return float(np.sqrt(np.mean(np.concatenate(forces) ** 2))) if forces else 1.0
