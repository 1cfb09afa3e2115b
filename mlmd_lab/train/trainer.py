"""Train an HDNNP from labelled frames with defaults that work on a first try.

>>> trainer = Trainer(db.frames(elements=["H", "O"], exclusive=True))
>>> model = trainer.fit()                      # every step below, with defaults
>>> trainer.errors["test"]                     # held-out RMSEs (eV/atom, eV/Å, eV/Å³)

The steps (n2p2's workflow names), each usable on its own:

1. :meth:`Trainer.write_nn` — the model: elements and cutoff from the data, symmetry functions generated for
   them (:func:`~mlmd_lab.potentials.defaults.generate_symmetry_functions`), architecture; writes ``input.nn``.
2. :meth:`Trainer.write_data` — reproducible train/validation/test split (test fixed first, so ensemble members
   share it), symmetry functions and their derivatives precomputed once per frame; writes ``input.data``.
3. :meth:`Trainer.normalize` — per-element reference energies by linear regression, and the energy scale of
   the networks from the RMS force (not from the energy spread: data with a tiny energy spread — e.g. liquid
   water, 3.4 meV/atom — would otherwise start with forces ~60x too small, the trap of n2p2's nnp-norm).
4. :meth:`Trainer.scaling` — symmetry-function statistics of the training data; writes ``scaling.data``.
5. :meth:`Trainer.train` — Adam (optax) on energies per atom, forces and stresses, exponential learning-rate
   decay, early stopping on the validation split, checkpoints every epoch, best weights kept.

Defaults (:class:`TrainingConfig`) and why are documented field by field.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import platform
import shutil
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from ase import Atoms

from mlmd_lab.errors import MLMDError
from mlmd_lab.files import atomic_path
from mlmd_lab.frames import results_of
from mlmd_lab.frameset import FrameSet
from mlmd_lab.potentials.model import HDNNP
from mlmd_lab.potentials.symfunc import sort_elements
from mlmd_lab.train.callbacks import Callback, CallbackList, ConsoleProgress, Metrics, Stopper
from mlmd_lab.train.data import (
    capacities,
    labels_of,
    reference_energies,
    scaling_statistics,
    stack,
    stress_matrix,
)
from mlmd_lab.train.features import block_columns, compute_features
from mlmd_lab.train.step import StepConfig, make_functions

CHECKPOINT = "checkpoint.pkl"
#: Folder of the workdir holding the trained model in n2p2 format (written when training ends, however it ends).
EXPORT = "n2p2"
#: A validation loss this many times that of the untrained model means the optimiser diverged.
DIVERGED = 100.0
#: Frames per batch of the final error pass.
FINAL_BATCH = 16


class TrainingWarning(UserWarning):
    """The data or settings may give a poor potential (too few frames, missing forces, mixed settings)."""


class TrainingDivergedError(MLMDError):
    """The loss became NaN/inf or exploded; the last good weights are kept."""


@dataclass
class TrainingConfig:
    """Training settings; every field has a default chosen to work on a first run.

    Model:
        cutoff: symmetry-function cutoff (Å). None: 6 Å, or 2.2x the median nearest-neighbour distance when
            that is larger (open structures, alkali metals), at most 8 Å.
        n_radial, n_angular, zetas: size of the generated symmetry-function set (see
            :func:`~mlmd_lab.potentials.defaults.generate_symmetry_functions`). 8 radial per element pair,
            2 angular widths x zeta (1, 4) x lambda +-1 per element triple: 40 functions per element for two
            elements, the size of n2p2's water example (27-30), measured to reach its accuracy with a third of
            the descriptor cost of the larger default set. r_lower is taken from the data (shortest distance).
        symmetry_functions: explicit functions instead (Å).
        hidden, activations: per-element network, n2p2 codes ("t" tanh, "l" linear output): 2 x 25 tanh.
        scaling: n2p2 scaling type of the network inputs; "scalesigma" standardises each function.
    Loss (eV units):
        energy_weight: weight of (dE per atom)^2 (eV/atom) relative to force components (eV/Å); 30 gives
            comparable terms at ~1 meV/atom and ~40 meV/Å... tuned so energies are learned without slowing forces.
        force_weight: weight of force components.
        stress_weight: weight of (d sigma * V / N)^2 (eV/atom), frames with stress only.
    Optimiser:
        learning_rate, final_learning_rate: Adam step size decaying exponentially between them over
            ``max_epochs``.
        batch_size: frames per step; None: enough frames for ~256 atoms (at least 1).
        max_epochs, patience: stop after ``max_epochs`` or when the validation loss has not improved for
            ``patience`` epochs; the best epoch's weights are kept.
        time_limit: stop after this many seconds (None: no limit).
        clip: gradient-norm clipping (robustness against rare huge forces in the data).
    Data:
        fractions: train, validation, test fractions. The test split is held out from everything.
        group_by: keep frames sharing this info key (e.g. "calc_id": one MD run) on one side of the splits.
        seed: seeds the split, the initial weights and the batch order (fully deterministic).
        dtype: "float32" (default; half the memory, faster) or "float64" for the training arithmetic.
            The exported model is always float64.
    """

    cutoff: float | None = None
    n_radial: int = 8
    n_angular: int = 2
    zetas: tuple[float, ...] = (1.0, 4.0)
    symmetry_functions: list | None = None
    hidden: tuple[int, ...] = (25, 25)
    activations: str = "ttl"
    scaling: str = "scalesigma"
    energy_weight: float = 30.0
    force_weight: float = 1.0
    stress_weight: float = 1.0
    learning_rate: float = 3e-3
    final_learning_rate: float = 3e-5
    batch_size: int | None = None
    max_epochs: int = 300
    patience: int = 40
    time_limit: float | None = None
    clip: float = 10.0
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    group_by: str | None = None
    seed: int = 0
    dtype: str = "float32"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.symmetry_functions is not None:
            d["symmetry_functions"] = [sf.to_n2p2() if hasattr(sf, "to_n2p2") else str(sf)
                                       for sf in self.symmetry_functions]
        return d


@dataclass
class _Split:
    train: FrameSet
    validation: FrameSet
    test: FrameSet


class Trainer:
    """Trains one HDNNP from labelled frames (eV, Å); see the module docstring for the steps.

    Args:
        frames: labelled structures (a :class:`FrameSet` from the database, or any ``Atoms`` with results).
        config: a :class:`TrainingConfig`; keyword arguments override its fields.
        workdir: folder for the checkpoint (resume), the metrics log and, once training ends (finished, early
            stopped, stopped, time limit or diverged), the trained model in n2p2 format in ``workdir/n2p2``
            (best epoch's weights, eV and Å; ``HDNNP.from_n2p2(workdir / "n2p2")`` loads it). None: nothing
            written; no resume.
        callbacks: extra :class:`~mlmd_lab.train.callbacks.Callback` objects (live metrics).
        progress: show a console progress bar.
        query: the database query the frames came from (recorded as provenance).
    """

    def __init__(self, frames: Iterable[Atoms], config: TrainingConfig | None = None, *,
                 workdir: str | os.PathLike | None = None, callbacks: Sequence[Callback] = (),
                 progress: bool = True, query: dict | None = None, **overrides: Any) -> None:
        self.frames = frames if isinstance(frames, FrameSet) else FrameSet(list(frames))
        self.config = replace(config or TrainingConfig(), **overrides)
        self.workdir = Path(workdir) if workdir is not None else None
        self.callbacks = list(callbacks)
        self.progress = progress
        self.query = query if query is not None else getattr(self.frames, "query", None)
        self.stopper = Stopper()
        self.model: HDNNP | None = None
        self.split: _Split | None = None
        self.history: list[Metrics] = []
        self.errors: dict[str, dict[str, float]] = {}
        self._features: dict[str, list] = {}
        self._state: dict[str, Any] = {}
        self.elements = self._check_data()

    @classmethod
    def from_database(cls, db, elements: Sequence[str], *, exclusive: bool = True, **kwargs: Any) -> Trainer:
        """A trainer on the database frames made of ``elements`` (any subsystem, e.g. H, O and H-O frames).

        Query keywords of :meth:`mlmd_lab.db.store.Database.frames` (formula, settings, tags, ...) are passed
        on; the others go to :class:`Trainer`.
        """
        keys = ("formula", "settings", "tags", "limit", "natoms", "max_force", "query")
        query = {k: kwargs.pop(k) for k in keys if k in kwargs}
        frames = db.frames(elements=elements, exclusive=exclusive, **query)
        if len(frames) == 0:
            raise MLMDError(f"no labelled frames of {'-'.join(elements)} in {db!r}; ingest data first "
                            "(mlmd-lab ingest PATH) or check the query")
        return cls(frames, **kwargs)

    # ------------------------------------------------------------------ data checks
    def _check_data(self) -> list[str]:
        frames = self.frames
        if len(frames) < 3:
            raise MLMDError(f"{len(frames)} frames are too few to train and validate a potential; need at least 3 "
                            "(hundreds for a usable one)")
        elements = sort_elements({s for a in frames for s in a.get_chemical_symbols()})
        no_energy = sum(results_of(a).get("energy") is None for a in frames)
        no_forces = sum(results_of(a).get("forces") is None for a in frames)
        if no_energy == len(frames) and no_forces == len(frames):
            raise MLMDError("none of the frames has an energy or forces; label them first (DFT)")
        if no_forces:
            warnings.warn(f"{no_forces} of {len(frames)} frames have no forces: they train energies only, and "
                          "forces carry most of the information (3N values per frame)", TrainingWarning, stacklevel=3)
        atoms = sum(len(a) for a in frames)
        if len(frames) < 50 or atoms < 2000:
            warnings.warn(f"only {len(frames)} frames ({atoms} atoms): expect a potential valid only close to these "
                          "structures; a few hundred diverse frames are typical", TrainingWarning, stacklevel=3)
        signatures = {a.info.get("signature_id") for a in frames} - {None}
        if len(signatures) > 1:
            warnings.warn(f"the frames come from {len(signatures)} different calculation settings "
                          f"({sorted(signatures)[:4]}...): energies of different DFT settings are not comparable; "
                          "select one with settings={...} or check db.compatible()", TrainingWarning, stacklevel=3)
        return elements

    # ------------------------------------------------------------------ step 1: the model
    def write_nn(self, path: str | os.PathLike | None = None) -> HDNNP:
        """Create the untrained model (elements, cutoff, symmetry functions, network); write it in n2p2 format
        into folder ``path`` if given. The workdir gets no untrained files: training writes the trained model
        into ``workdir/n2p2`` when it ends (see :meth:`train`)."""
        cfg = self.config
        functions = cfg.symmetry_functions
        if functions is None:
            from mlmd_lab.potentials.defaults import generate_symmetry_functions

            cutoff, r_min = self._geometry()
            functions = generate_symmetry_functions(self.elements, cutoff, n_radial=cfg.n_radial,
                                                    n_angular=cfg.n_angular, zetas=cfg.zetas,
                                                    r_lower=max(0.5, 0.9 * r_min))
        self.model = HDNNP.create(self.elements, functions, hidden=cfg.hidden, activations=cfg.activations,
                                  scaling=cfg.scaling, seed=cfg.seed)
        if path is not None:
            self.model.to_n2p2(path)
        return self.model

    def _geometry(self) -> tuple[float, float]:
        """(cutoff, shortest distance) in Å from up to 20 frames."""
        from mlmd_lab.potentials.neighbours import pair_list

        nearest, shortest = [], np.inf
        step = max(1, len(self.frames) // 20)
        for atoms in list(self.frames)[::step][:20]:
            i, _, _, D = pair_list(atoms.positions, atoms.cell.array, atoms.pbc, 8.0)
            if i.size == 0:
                continue
            r = np.linalg.norm(D, axis=1)
            per_atom = np.full(len(atoms), np.inf)
            np.minimum.at(per_atom, i, r)
            nearest.extend(per_atom[np.isfinite(per_atom)])
            shortest = min(shortest, float(r.min()))
        if self.config.cutoff is not None:
            cutoff = float(self.config.cutoff)
        else:
            d_nn = float(np.median(nearest)) if nearest else 3.0
            cutoff = float(min(8.0, max(6.0, 2.2 * d_nn)))
        return cutoff, (shortest if np.isfinite(shortest) else 0.8)

    # ------------------------------------------------------------------ step 2: data
    def write_data(self, path: str | os.PathLike | None = None) -> _Split:
        """Split the frames, precompute features; write the training set as n2p2 ``input.data`` if asked.

        The test split is taken first (seeded by ``split_seed``, default ``seed``), then validation from the
        rest (seeded by ``seed``): ensemble members with different seeds share the held-out test frames.
        """
        if self.model is None:
            self.write_nn()
        cfg = self.config
        _, f_valid, f_test = cfg.fractions
        split_seed = self._state.get("split_seed", cfg.seed)
        pool, test = self.frames.split((1.0 - f_test, f_test), seed=split_seed, group_by=cfg.group_by) \
            if f_test > 0 else (self.frames, FrameSet([]))
        self._pool = pool
        self._pool_features = compute_features(self.model, pool, dtype=cfg.dtype)
        return self.resplit(seed=cfg.seed, test=test, path=path)

    def resplit(self, seed: int, test: FrameSet | None = None, path: str | os.PathLike | None = None) -> _Split:
        """A new train/validation split of the non-test frames (features are reused)."""
        cfg = self.config
        f_train, f_valid, _ = cfg.fractions
        share = f_valid / max(f_train + f_valid, 1e-12)
        ids = self._pool.ids
        train, validation = self._pool.split((1.0 - share, share), seed=seed + 1, group_by=cfg.group_by)
        if len(train) == 0 or len(validation) == 0:
            raise MLMDError(f"splitting {len(self.frames)} frames by {cfg.fractions} left an empty train or "
                            "validation set; use more frames or other fractions")
        where = {fid: k for k, fid in enumerate(ids)}
        for name, part in (("train", train), ("validation", validation)):
            self._features[name] = [self._pool_features[where[fid]] for fid in part.ids]
        self.split = _Split(train, validation, test if test is not None else self.split.test)
        if path is not None:
            train.to_n2p2(path)
        return self.split

    # ------------------------------------------------------------------ step 3: normalisation
    def normalize(self) -> dict[str, float]:
        """Per-element reference energies (eV/atom, regression) and the networks' energy scale (eV)."""
        if self.split is None:
            self.write_data()
        labels = labels_of(self.split.train, self.model.elements)
        offsets = reference_energies(labels, self.model.elements)
        forces = [f for f in labels.forces if f is not None]
        if forces:
            scale = float(np.sqrt(np.mean(np.concatenate(forces) ** 2)))  # eV/Å times 1 Å
        else:
            per_atom = labels.energy / labels.n_atoms
            scale = float(np.nanstd(per_atom)) * 10.0
        self._state["energy_scale"] = float(np.clip(scale if np.isfinite(scale) else 1.0, 0.05, 10.0))
        self.model.settings.atom_energy = dict(offsets)
        self.model._cache.clear()
        return offsets

    # ------------------------------------------------------------------ step 4: scaling
    def scaling(self, path: str | os.PathLike | None = None) -> None:
        """Symmetry-function statistics (min, max, mean, sigma) of the training and validation frames."""
        if "energy_scale" not in self._state:
            self.normalize()
        stats = scaling_statistics(self._features["train"] + self._features["validation"], len(self.model.elements))
        for element, s in zip(self.model.elements, stats, strict=True):
            if s is None:
                raise MLMDError(f"no {element} atoms in the training frames; add frames containing {element}")
            self.model.scaling_stats[element] = s
        self.model._cache.clear()
        self._state["scaled"] = True
        if path is not None:
            self.model.to_n2p2(path)

    # ------------------------------------------------------------------ step 5: training
    def train(self, epochs: int | None = None, *, background: bool = False, resume: bool = True,
              member: int | None = None) -> HDNNP | TrainingRun:
        """Run the optimiser (see :class:`TrainingConfig`); returns the trained model (best validation epoch).

        With ``background=True`` training runs in a thread and a :class:`TrainingRun` is returned at once
        (``run.stop()``, ``run.wait()``); metrics still reach the callbacks as they come.
        """
        if not self._state.get("scaled"):
            self.scaling()
        if background:
            return TrainingRun(self, lambda: self._train(epochs, resume, member))
        return self._train(epochs, resume, member)

    def fit(self, *, cluster: Any = None, background: bool = False) -> HDNNP | TrainingRun:
        """All steps with defaults; returns the trained model (``cluster``: a dask Client/cluster to run on).

        ``background=True`` runs every step (symmetry functions included, the slow part of preparing) in a
        thread and returns a :class:`TrainingRun` at once; errors of any step are raised by ``run.wait()``.
        """
        if cluster is not None:
            from mlmd_lab.train.remote import fit_on_cluster

            return fit_on_cluster(self, cluster)
        self.stopper.reset()  # a stop request of an earlier run must not end this one (a later one may)
        if background:
            return TrainingRun(self, self._fit_steps)
        return self._fit_steps()

    def _fit_steps(self) -> HDNNP:
        if self.workdir is not None:  # fail before the expensive steps when the workdir cannot be made
            self.workdir.mkdir(parents=True, exist_ok=True)
        self.write_nn()
        self.write_data()
        self.normalize()
        self.scaling()
        return self._train(None, True, None)

    def member(self, k: int) -> Trainer:
        """A trainer for ensemble member ``k``: seed + k for weights, batches and the train/validation split;
        same functions, features, test split and stop flag."""
        other = copy.copy(self)
        other.config = replace(self.config, seed=self.config.seed + k)
        other.workdir = None if self.workdir is None else self.workdir.parent / f"member_{k}"
        other.model = HDNNP.create(self.model.elements, [sf for e in self.model.elements
                                                         for sf in self.model.functions[e]],
                                   hidden=other.config.hidden, activations=other.config.activations,
                                   scaling=other.config.scaling, seed=other.config.seed)
        other._state = {"split_seed": self._state.get("split_seed", self.config.seed)}
        other._features = {}
        other.history, other.errors = [], {}
        other.resplit(other.config.seed, test=self.split.test)
        return other

    def stop(self) -> None:
        """Ask a running training to stop after the current epoch (from any thread)."""
        self.stopper.stop()

    # ------------------------------------------------------------------ the loop
    def _setup(self):
        cfg, model = self.config, self.model
        dtype = np.float32 if cfg.dtype == "float32" else np.float64
        E = len(model.elements)
        labels = {name: labels_of(getattr(self.split, name), model.elements) for name in ("train", "validation")}
        caps = capacities(self._features["train"] + self._features["validation"], E)
        data = stack(self._features["train"], labels["train"], E, dtype, caps)
        valid = stack(self._features["validation"], labels["validation"], E, dtype, caps)
        columns = tuple(tuple(int(k) for k in cols) for cols in block_columns(model))
        step_cfg = StepConfig(n_elements=E, activations=model.settings.activations, columns=columns,
                              energy_scale=self._state["energy_scale"],
                              offsets=tuple(model.settings.atom_energy.get(e, 0.0) for e in model.elements),
                              scale_min=model.settings.scale_min,
                              weights=(cfg.energy_weight, cfg.force_weight, cfg.stress_weight))
        params = model.parameters()
        consts = {"shift": [params["shift"][e].astype(dtype) for e in model.elements],
                  "factor": [params["factor"][e].astype(dtype) for e in model.elements]}
        return step_cfg, _device(data), _device(valid), consts, labels

    def _batch_size(self) -> int:
        if self.config.batch_size:
            return int(self.config.batch_size)
        mean_atoms = np.mean([len(a) for a in self.split.train])
        return int(max(1, round(256 / mean_atoms)))

    def _train(self, epochs: int | None, resume: bool, member: int | None) -> HDNNP:
        cfg = self.config
        max_epochs = int(epochs or cfg.max_epochs)
        step_cfg, data, valid, consts, labels = self._setup()
        n_train, n_valid = len(self.split.train), len(self.split.validation)
        batch = min(self._batch_size(), n_train)
        steps_per_epoch = -(-n_train // batch)
        schedule = optax.exponential_decay(cfg.learning_rate, steps_per_epoch * max_epochs,
                                           cfg.final_learning_rate / cfg.learning_rate)
        optimizer = optax.chain(optax.clip_by_global_norm(cfg.clip), optax.adam(schedule))
        train_step, evaluate = make_functions(step_cfg, optimizer)
        dt = jnp.float32 if cfg.dtype == "float32" else jnp.float64
        params = [[(jnp.asarray(W, dt), jnp.asarray(b, dt)) for W, b in self.model.networks[e]]
                  for e in self.model.elements]
        state = {"epoch": 0, "step": 0, "params": params, "opt_state": optimizer.init(params), "best_params": params,
                 "best_score": np.inf, "best_epoch": 0, "bad_epochs": 0, "elapsed": 0.0, "history": []}
        checkpoint = self.workdir / CHECKPOINT if self.workdir is not None else None
        fingerprint = self._fingerprint()
        if resume and checkpoint is not None and checkpoint.exists():
            state = _load_checkpoint(checkpoint, fingerprint, state)
        self.history = [Metrics.from_dict(m) for m in state["history"]]
        callbacks = CallbackList(self._callbacks())
        callbacks.on_train_begin({"n_train": n_train, "n_validation": n_valid, "epochs": max_epochs,
                                  "n_parameters": int(sum(W.size + b.size for net in params for W, b in net)),
                                  "elements": list(self.model.elements), "member": member,
                                  "start_epoch": state["epoch"], "batch_size": batch})
        reason = "max_epochs"
        # Loss of the untrained model (zero output: the regression energies): a run far above it has diverged.
        baseline = _rmse(_evaluate_all(evaluate, params, consts, valid, n_valid, batch), step_cfg)["loss"]
        start = time.perf_counter() - state["elapsed"]
        while state["epoch"] < max_epochs:
            epoch = state["epoch"] + 1
            order = np.random.default_rng([cfg.seed, epoch]).permutation(n_train)
            sums = _zero_sums()
            p, o = state["params"], state["opt_state"]
            for k in range(steps_per_epoch):
                index, mask = _batch_indices(order, k, batch)
                p, o, loss, errors = train_step(p, o, consts, data, index, mask)
                sums = _add(sums, errors)
            train_metrics = _rmse(sums, step_cfg)
            valid_metrics = _rmse(_evaluate_all(evaluate, p, consts, valid, n_valid, batch), step_cfg)
            state["step"] += steps_per_epoch
            finite = all(np.isfinite(v) for v in (*train_metrics.values(), *valid_metrics.values()))
            if not finite or valid_metrics["loss"] > DIVERGED * max(baseline, 1e-12):
                self._finish_failed(state, epoch, callbacks, valid_metrics["loss"], baseline)
            state["params"], state["opt_state"], state["epoch"] = p, o, epoch
            score = valid_metrics["loss"]
            best = score < state["best_score"]
            if best:
                state.update(best_score=score, best_params=p, best_epoch=epoch, bad_epochs=0)
            else:
                state["bad_epochs"] += 1
            state["elapsed"] = time.perf_counter() - start
            metrics = Metrics(epoch=epoch, step=state["step"], learning_rate=float(schedule(state["step"])),
                              elapsed=state["elapsed"], train=train_metrics, validation=valid_metrics,
                              best=best, member=member)
            self.history.append(metrics)
            state["history"].append(metrics.to_dict())
            if checkpoint is not None:
                _save_checkpoint(checkpoint, fingerprint, state)
            if callbacks.on_epoch_end(metrics):
                reason = "stopped"
                break
            if state["bad_epochs"] >= cfg.patience:
                reason = "early_stopping"
                break
            if cfg.time_limit is not None and state["elapsed"] >= cfg.time_limit:
                reason = "time_limit"
                break
        self._export(state["best_params"])
        self.errors = self._final_errors()
        self.model.metadata = self.provenance(state)
        self._save_export()
        callbacks.on_train_end({"reason": reason, "best_epoch": state["best_epoch"], "elapsed": state["elapsed"],
                                "final": self.history[-1].to_dict() if self.history else {},
                                "errors": self.errors})
        self._state["reason"] = reason
        return self.model

    def _callbacks(self) -> list[Callback]:
        out = []
        if self.workdir is not None:  # first: an epoch is logged even if a later callback dies
            from mlmd_lab.train.callbacks import JSONLinesLog

            out.append(JSONLinesLog(self.workdir / "metrics.jsonl", append=True))
        out += [self.stopper, *self.callbacks]
        if self.progress:
            out.append(ConsoleProgress())
        return out

    def _finish_failed(self, state, epoch, callbacks, loss, baseline) -> None:
        self._export(state["best_params"])
        self._save_export()
        summary = {"reason": "diverged", "best_epoch": state["best_epoch"], "elapsed": state["elapsed"],
                   "final": self.history[-1].to_dict() if self.history else {}}
        callbacks.on_train_end(summary)
        where = f" and in {self.workdir / CHECKPOINT}" if self.workdir else ""
        raise TrainingDivergedError(
            f"training diverged in epoch {epoch} (validation loss {loss:.3g}, untrained model {baseline:.3g}). "
            f"The weights of the best epoch "
            f"({state['best_epoch']}) are kept in trainer.model{where}. Fix: lower learning_rate (now "
            f"{self.config.learning_rate}), check the data for absurd forces (max_force= in the query), or use "
            "dtype='float64'")

    def _export(self, params) -> None:
        """Write trained weights into the model, the energy scale folded into the output layer (float64)."""
        s = self._state["energy_scale"]
        for e, net in zip(self.model.elements, params, strict=True):
            layers = [(np.asarray(W, np.float64), np.asarray(b, np.float64)) for W, b in net]
            W, b = layers[-1]
            layers[-1] = (W * s, b * s)
            self.model.networks[e] = layers
        self.model._cache.clear()

    def _save_export(self) -> Path | None:
        """Write the trained model (n2p2 files, eV and Å) into ``workdir/n2p2``, replacing what was there whole
        (written to a temporary sibling first: the folder never holds a mix of old and new files)."""
        if self.workdir is None:
            return None
        target = self.workdir / EXPORT
        with atomic_path(target) as tmp:
            self.model.to_n2p2(tmp)
            if target.exists():  # an earlier run's export: move it aside just before the new one moves in
                old = target.with_name(f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
                os.replace(target, old)
                shutil.rmtree(old, ignore_errors=True)
        return target

    def _final_errors(self) -> dict[str, dict[str, float]]:
        """RMSEs of the exported float64 model (the one users get) on each split (eV/atom, eV/Å, eV/Å³; see
        :func:`evaluate_model`)."""
        like = self._final_graph()
        out = {}
        for name in ("train", "validation", "test"):
            frames = getattr(self.split, name)
            if len(frames):
                out[name] = evaluate_model(self.model, frames, batch=like.layout.n_structures, like=like)
        return out

    def _final_graph(self):
        """The padded graph of the largest frames: every batch of the final error pass reuses its shapes."""
        frames = sorted((a for name in ("train", "validation", "test") for a in getattr(self.split, name)),
                        key=len, reverse=True)
        return self.model.graph(frames[:FINAL_BATCH])

    def evaluate(self, frames: Iterable[Atoms] | None = None) -> dict[str, float]:
        """RMSEs of the trained model on ``frames`` (default: the held-out test split)."""
        return evaluate_model(self.model, self.split.test if frames is None else frames)

    def _fingerprint(self) -> str:
        text = json.dumps({"config": self.config.to_dict(), "train": self.split.train.ids,
                           "validation": self.split.validation.ids}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def provenance(self, state: dict | None = None) -> dict[str, Any]:
        """What the potential database stores with the model."""
        import mlmd_lab

        state = state or {}
        return {
            "query": _jsonable(self.query),
            "frame_ids": {name: getattr(self.split, name).ids for name in ("train", "validation", "test")},
            "signatures": self.frames.signatures(),
            "config": self.config.to_dict(),
            "energy_scale": self._state.get("energy_scale"),
            "errors": self.errors,
            "best_epoch": state.get("best_epoch"),
            "epochs": state.get("epoch"),
            "training_time": state.get("elapsed"),
            "software": {"mlmd_lab": getattr(mlmd_lab, "__version__", "dev"), "jax": jax.__version__,
                         "optax": optax.__version__, "numpy": np.__version__, "python": platform.python_version()},
        }


class TrainingRun:
    """Training in a background thread (the notebook stays responsive)."""

    def __init__(self, trainer: Trainer, work: Callable[[], HDNNP]) -> None:
        self.trainer = trainer
        self.error: BaseException | None = None
        self.model: HDNNP | None = None
        self._thread = threading.Thread(target=self._run, args=(work,), daemon=True, name="mlmd-training")
        self._thread.start()

    def _run(self, work: Callable[[], HDNNP]) -> None:
        try:
            self.model = work()
        except BaseException as err:  # reported by wait()
            self.error = err

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def stop(self) -> None:
        """Stop after the current epoch (the best weights so far are kept)."""
        self.trainer.stop()

    def wait(self, timeout: float | None = None) -> HDNNP | None:
        """Block until training ends; re-raises its error; returns the model."""
        self._thread.join(timeout)
        if self.error is not None:
            raise self.error
        return self.model


def train_ensemble(frames: Iterable[Atoms], n_members: int = 4, config: TrainingConfig | None = None, *,
                   workdir: str | os.PathLike | None = None, callbacks: Sequence[Callback] = (),
                   progress: bool = True, query: dict | None = None, **overrides: Any):
    """A committee of ``n_members`` potentials differing in initial weights and train/validation split.

    They share the symmetry functions, the precomputed features and the held-out test split; the committee's
    spread estimates the error (see :class:`~mlmd_lab.train.ensemble.Ensemble`). Members train one after the
    other (``workdir/member_K`` holds each one's checkpoint, log and, once it is trained, its n2p2 files in
    ``workdir/member_K/n2p2``).
    """
    from mlmd_lab.train.ensemble import Ensemble

    if n_members < 2:
        raise MLMDError(f"an ensemble needs at least 2 members, not {n_members}")
    root = Path(workdir) if workdir is not None else None
    base = Trainer(frames, config, workdir=None if root is None else root / "member_0", callbacks=callbacks,
                   progress=progress, query=query, **overrides)
    base.stopper.reset()  # one stop request (shared by the members) ends the whole ensemble
    base.write_nn()
    base.write_data()
    members, trainers = [], []
    for k in range(n_members):
        trainer = base if k == 0 else base.member(k)
        trainer.normalize()
        trainer.scaling()
        members.append(trainer.train(member=k))
        trainers.append(trainer)
    ensemble = Ensemble(members)
    ensemble.metadata = dict(base.provenance())
    ensemble.metadata["errors"] = {"test": evaluate_model(ensemble, base.split.test)} if len(base.split.test) else {}
    ensemble.metadata["members"] = [{"seed": t.config.seed, "errors": t.errors} for t in trainers]
    return ensemble


def evaluate_model(model, frames: Iterable[Atoms], batch: int = 16, like=None) -> dict[str, float]:
    """RMSE and MAE of ``model``'s predictions against frames' labels.

    Keys: ``energy_rmse``/``energy_mae`` (eV/atom), ``force_rmse``/``force_mae`` (eV/Å, per component) and, for
    periodic frames with a reference stress, ``stress_rmse``/``stress_mae`` (eV/Å³, over the 9 components of
    the stress tensor as in training; ``x / ase.units.GPa`` gives GPa); ``n_frames``; keys without data are
    left out.

    Frames go largest first in batches of ``batch``, the last one padded with repeats (their predictions are
    dropped), so that every batch fits the first one's shapes (or those of ``like``, a graph of ``model``):
    one compilation instead of one per batch shape.
    """
    frames = list(frames)
    order = sorted(range(len(frames)), key=lambda k: -len(frames[k]))
    want_stress = any(results_of(a).get("stress") is not None and a.pbc.all() for a in frames)
    graphs = hasattr(model, "graph") and hasattr(model, "results")
    batch = max(1, min(batch, len(frames))) if like is None else like.layout.n_structures
    de, df, ds = [], [], []
    for start in range(0, len(frames), batch):
        part = [frames[k] for k in order[start:start + batch]]
        if graphs:
            padded = part + [part[-1]] * (batch - len(part))
            graph = model.graph(padded, like=like)
            like = graph if like is None else like
            predictions = model.results(model.evaluate_graph(graph, forces=True), padded, stress=want_stress,
                                        warn=False)[:len(part)]
        else:
            predictions = model.predict(part, stress=want_stress, warn=False)
        for atoms, pred in zip(part, predictions, strict=True):
            res = results_of(atoms)
            if res.get("energy") is not None:
                de.append((pred["energy"] - res["energy"]) / len(atoms))
            if res.get("forces") is not None:
                df.append((pred["forces"] - res["forces"]).ravel())
            if res.get("stress") is not None and pred.get("stress") is not None:
                ds.append((stress_matrix(pred["stress"]) - stress_matrix(res["stress"])).ravel())
    out = {"n_frames": len(frames)}
    for name, diffs in (("energy", de), ("force", df), ("stress", ds)):
        if diffs:
            d = np.concatenate([np.atleast_1d(x) for x in diffs])
            out[f"{name}_rmse"] = float(np.sqrt(np.mean(d**2)))
            out[f"{name}_mae"] = float(np.mean(np.abs(d)))
    return out


# ---------------------------------------------------------------------- helpers
def _device(arrays: dict) -> dict:
    return {k: (v if k.startswith("_") else jnp.asarray(v)) for k, v in arrays.items()}


def _batch_indices(order: np.ndarray, k: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    index = order[k * batch:(k + 1) * batch]
    mask = np.ones(batch, bool)
    if index.size < batch:  # pad the last batch (fixed shapes: one compilation)
        mask[index.size:] = False
        index = np.concatenate([index, np.zeros(batch - index.size, index.dtype)])
    return index.astype(np.int32), mask


def _evaluate_all(evaluate, params, consts, data, n: int, batch: int) -> dict:
    sums = _zero_sums()
    order = np.arange(n)
    for k in range(-(-n // batch)):
        index, mask = _batch_indices(order, k, batch)
        sums = _add(sums, evaluate(params, consts, data, index, mask))
    return sums


def _zero_sums() -> dict:
    keys = ("energy_sse", "energy_n", "force_sse", "force_n", "stress_sse", "virial_sse", "stress_n")
    return {k: 0.0 for k in keys}


def _add(sums: dict, errors: dict) -> dict:
    return {k: sums[k] + errors[k] for k in sums}


def _rmse(sums: dict, cfg: StepConfig) -> dict[str, float]:
    """RMSEs (energy eV/atom, force eV/Å, stress eV/Å³) and the loss (its stress term: virial per atom)."""
    sums = {k: float(v) for k, v in sums.items()}
    out = {}
    w_e, w_f, w_s = cfg.weights
    loss = 0.0
    for name, w, loss_key in (("energy", w_e, "energy_sse"), ("force", w_f, "force_sse"),
                              ("stress", w_s, "virial_sse")):
        n = sums[f"{name}_n"]
        if n > 0:
            out[f"{name}_rmse"] = float(np.sqrt(sums[f"{name}_sse"] / n))
            loss += w * sums[loss_key] / n
    out["loss"] = loss
    return out


def _save_checkpoint(path: Path, fingerprint: str, state: dict) -> None:
    """Atomic write (tmp + rename): a kill during the write leaves the previous checkpoint intact."""
    payload = {"format": 1, "fingerprint": fingerprint,
               **{k: (jax.tree.map(np.asarray, v) if k in ("params", "opt_state", "best_params") else v)
                  for k, v in state.items()}}
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        pickle.dump(payload, fh, protocol=pickle.HIGHEST_PROTOCOL)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _load_checkpoint(path: Path, fingerprint: str, fresh: dict) -> dict:
    try:
        with open(path, "rb") as fh:
            payload = pickle.load(fh)
    except Exception as err:
        raise MLMDError(f"{path}: unreadable checkpoint ({err}); delete it to start afresh") from None
    if payload.get("fingerprint") != fingerprint:
        raise MLMDError(f"{path}: the checkpoint belongs to other data or settings; use another workdir or "
                        "delete it to start afresh")
    state = dict(fresh)
    for key in fresh:
        value = payload[key]
        if key in ("params", "opt_state", "best_params"):
            value = jax.tree.map(jnp.asarray, value)
            value = jax.tree.unflatten(jax.tree.structure(fresh[key]), jax.tree.leaves(value))
        state[key] = value
    return state


def _jsonable(value: Any) -> Any:
    from mlmd_lab.frames import json_default

    return None if value is None else json.loads(json.dumps(value, default=json_default))


__all__ = ["Trainer", "TrainingConfig", "TrainingRun", "TrainingDivergedError", "TrainingWarning", "evaluate_model",
           "train_ensemble"]
