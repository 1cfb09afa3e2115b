"""Train an HDNNP from labelled frames with defaults that work on a first try.

>>> trainer = Trainer(db.frames(elements=["H", "O"], exclusive=True))
>>> model = trainer.fit()                      # every step below, with defaults
>>> trainer.errors["test"]                     # held-out RMSEs (eV/atom, eV/Å, eV/Å³)
>>> print(trainer.summary())                   # split, time budget, why training stopped, test errors

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
   decay over a number of epochs planned from the data size or the time limit (:mod:`mlmd_lab.train.budget`),
   early stopping and the kept epoch from the smoothed validation loss, checkpoints every epoch; the trained
   model goes to ``workdir/n2p2``. :meth:`Trainer.summary` says what was held out, how the time was spent and
   why training stopped.

Defaults (:class:`TrainingConfig`) and why are documented field by field.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import pickle
import platform
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import psutil
from ase import Atoms, units

from mlmd_lab.errors import MLMDError
from mlmd_lab.files import atomic_path
from mlmd_lab.frames import results_of
from mlmd_lab.frameset import FrameSet
from mlmd_lab.potentials.model import HDNNP
from mlmd_lab.potentials.neighbours import Layout
from mlmd_lab.potentials.symfunc import sort_elements
from mlmd_lab.train import kalman
from mlmd_lab.train.budget import (
    EPOCH_MARGIN,
    FEW_EPOCHS,
    Selection,
    TrainingBudget,
    final_reserve,
    patience_for,
    plan_epochs,
)
from mlmd_lab.train.callbacks import Callback, CallbackList, ConsoleProgress, Metrics, Stopper
from mlmd_lab.train.data import (
    caps_of_counts,
    combine_statistics,
    frame_record,
    frame_statistics,
    labels_of,
    record_fields,
    reference_energies,
    stress_matrix,
)
from mlmd_lab.train.features import block_columns, force_subset, iter_features, plan_features
from mlmd_lab.train.signatures import (
    EnergyOffsets,
    check_signatures,
    fit_energy_offsets,
    shift_energies,
    signature_groups,
)
from mlmd_lab.train.step import StepConfig, average_step, make_functions
from mlmd_lab.train.store import FeatureSet, FeatureStore, size_buckets

CHECKPOINT = "checkpoint.pkl"
#: Folder of the workdir holding the trained model in n2p2 format (written when training ends, however it ends).
EXPORT = "n2p2"
#: A validation loss this many times that of the untrained model means the optimiser diverged.
DIVERGED = 100.0
#: Thrown-away optimiser steps timed to plan a time-limited run (after one that compiles); their median counts.
PROBE_STEPS = 10
#: Frames per batch of the final error pass.
FINAL_BATCH = 16
#: Epochs of a Kalman-filter run without max_epochs or time_limit: n2p2's filter converges in tens of epochs
#: (its recommended input.nn runs 10; water here was measured in benchmarks/bench_train.py), not hundreds.
KALMAN_EPOCHS = 30
#: feature_storage="auto" keeps the records in memory up to this many bytes and puts larger sets in a file:
#: a notebook on a shared hub should not hold gigabytes for data that the page cache serves as fast (measured
#: in benchmarks/bench_train.py: the epoch time of the 320-frame water set in memory and on disk).
IN_MEMORY = 1 << 30
#: force_fraction=None fits every atom's force while the records of all atoms take at most this share of the
#: memory available when training starts; beyond it, the force subset that fits (disk space follows it too).
FORCE_MEMORY = 0.5
#: The final errors of a larger training split are computed on this many of its frames (seeded draw).
FINAL_TRAIN_FRAMES = 1000
#: Sets of at most this many frames are counted whole to size their records with every force (larger ones from
#: a sample).
SAMPLE_ALL = 200
#: The smallest automatic force fraction (a 192-atom frame still fits ~10 atoms' forces).
MIN_FORCE_FRACTION = 0.05


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
            3 angular widths x zeta (1, 4) x lambda +-1 per element triple: 52 functions per element for two
            elements (n2p2's water example has 27-30). r_lower is taken from the data (shortest distance).
            Measured on the 320 DeePMD water frames, three splits (seeds 0, 1, 2; ``benchmarks/bench_train.py
            --worker cpu --overrides '{"n_angular": 2, "seed": 1}'`` etc.): held-out test RMSEs of 32.0, 33.4 and
            34.0 meV/Å and 0.329, 0.295 and 0.296 meV/atom with 3 widths, against 36.1, 36.7 and 37.0 meV/Å and
            0.380, 0.341 and 0.386 meV/atom with 2 (n2p2's own fit: 36.5 and 0.33). An epoch costs ~40 % more
            (1.9 s against 1.35 s) and the features ~20 % (20.5 s against 17.1 s), but 50 meV/Å on the
            validation frames comes after 12 epochs instead of ~25: at 45 s instead of ~51 s. A wider network
            (35-35) or 5 % more training frames left the energy at 0.38.
        symmetry_functions: explicit functions instead (Å).
        hidden, activations: per-element network, n2p2 codes ("t" tanh, "l" linear output): 2 x 25 tanh.
        scaling: n2p2 scaling type of the network inputs; "scalesigma" standardises each function.
    Loss (eV units):
        energy_weight: weight of (dE per atom)^2 (eV/atom) relative to force components (eV/Å); 30 gives
            comparable terms at ~1 meV/atom and ~40 meV/Å... tuned so energies are learned without slowing forces.
        final_energy_weight: the energy weight at the end of the learning-rate schedule: it moves from
            ``energy_weight`` to this one geometrically as the step size falls (DeePMD-kit's prefactors rise and
            fall with the learning rate in the same spirit: forces first, energies weighed more at the end). The
            validation loss that keeps the best epoch and stops early uses this weight throughout. None (default):
            constant. A trade, not a free gain, so not the default: on the 320 water frames (one run each, the
            default schedule) 300 ended at validation errors of 37.4 meV/Å and 0.34 meV/atom, 3,000 at 38.5 and
            0.30, against 36.9 meV/Å with the constant 30; on the test frames 36.2 and 37.6 meV/Å, 0.384 and
            0.381 meV/atom, against 36.1 and 0.380.
        force_weight: weight of force components.
        stress_weight: weight of (d sigma * V / N)^2 (eV/atom), frames with stress only.
    Optimiser:
        learning_rate, final_learning_rate: Adam step size decaying exponentially between them over the
            planned epochs (3e-3 to 3e-5: a hundredfold, large steps first, fine ones at the end).
        batch_size: frames per step; None: enough frames for ~256 atoms (at least 1).
    Budget and model selection (:mod:`mlmd_lab.train.budget`; ``trainer.budget`` records the plan):
        max_epochs: epochs of the run; the learning-rate schedule spans them. None (default): chosen — with a
            ``time_limit``, the epochs that fill it at the epoch time measured before training; otherwise from
            the data size, ~60,000 optimiser steps within 300-3,000 epochs (small sets take few steps per epoch
            and need more epochs: 300 epochs left ~200-frame sets 30 % above the energy error of 1,400).
            Given, training is fully deterministic; ``max_epochs=trainer.budget.epochs`` repeats a planned run.
        patience: stop when the smoothed validation loss has not improved for this many epochs. None
            (default): a fifth of the planned epochs, at least 40 (a fixed 40 stopped small sets at a third of
            their schedule, while the learning rate was still high).
        validation_smoothing: span (epochs) of the exponential moving average of the validation loss that picks
            the kept epoch and drives early stopping; 1 is the raw loss. 10 (default): with ~20 validation
            frames the raw loss jumps by more from epoch to epoch than it improves over 10 epochs late in a run,
            and its minimum picks a lucky epoch.
        time_limit: seconds for the whole run: symmetry functions, training and the final error pass (None: no
            limit). Training stops when the next epoch and the final pass would not fit.
        clip: gradient-norm clipping (robustness against rare huge forces in the data).
        average_decay: validate, select and export an exponential moving average of the weights over the optimiser
            steps, with this decay per step (TensorFlow's warm-up at the start, see
            :func:`~mlmd_lab.train.step.average_step`); None: the weights themselves. 0.99 (default, as MACE and
            NequIP): Adam's steps make the weights wander around the minimum they approach, and the average sits
            nearer its centre. Measured on the 320 water frames (``benchmarks/bench_train.py --case averaging``, 45
            epochs of the default schedule, one run each): 50 meV/Å validation force error after 25 epochs instead
            of 38, and from epoch 10 on a validation energy error of median 0.40 meV/atom (at most 0.86) instead of
            0.94 (at most 8.5); 0.995 also took 25 epochs, 0.998 took 36. Not used by the Kalman filter.
        optimizer: "adam" (default) or "kalman": n2p2's extended Kalman filter (:mod:`mlmd_lab.train.kalman`;
            one frame per update, learning_rate, batch_size and clip unused; without max_epochs or time_limit
            :data:`KALMAN_EPOCHS` epochs). Measured against each other in benchmarks/bench_train.py.
    Data:
        fractions: train, validation, test fractions. The test split is held out from everything (training and
            model selection); :meth:`Trainer.summary` says how many frames it took.
        group_by: keep frames sharing this info key (e.g. "calc_id": one MD run) on one side of the splits.
        seed: seeds the split, the initial weights and the batch order (fully deterministic).
        energy_offsets: ``"shared"`` (default): the frames must share one DFT energy zero; frames of settings
            signatures that :func:`~mlmd_lab.settings.compare_signatures` reports an error for (other code,
            functional, pseudopotentials, or data sets without declared settings from different sources) are
            refused with a :class:`~mlmd_lab.errors.MixedSettingsError`. ``"per_signature"``: fit one energy
            offset per signature (eV/atom, jointly with the per-element reference energies; see
            :mod:`mlmd_lab.train.signatures`) on all frames and subtract it from the labels, so the model
            predicts in the energy zero of the signature with the most frames; the offsets and that reference
            are recorded in ``model.metadata["energy_offsets"]``.
        dtype: "float32" (default; half the memory, faster) or "float64" for the training arithmetic.
            The exported model is always float64.
    Memory (:mod:`mlmd_lab.train.store`; ``trainer.storage`` says what was chosen and why):
        force_fraction: the share of each frame's atoms whose forces are fitted (a seeded draw per frame, the
            same for every epoch; energies always use every atom). Derivatives are stored only for pairs that
            move those atoms, so memory and epoch time shrink with it (1 - (1 - f)^2 of the pairs). None
            (default): 1 while the set's records fit :data:`FORCE_MEMORY` of the memory, else the largest
            fraction that does (at least :data:`MIN_FORCE_FRACTION`). Frames with a subset do not fit stress.
        feature_storage: "memory", "disk" (a file in the system's temporary folder, read batch by batch: the
            process holds one batch) or "auto" (default): memory while the records take at most
            :data:`IN_MEMORY` bytes, else disk.
    """

    cutoff: float | None = None
    n_radial: int = 8
    n_angular: int = 3
    zetas: tuple[float, ...] = (1.0, 4.0)
    symmetry_functions: list | None = None
    hidden: tuple[int, ...] = (25, 25)
    activations: str = "ttl"
    scaling: str = "scalesigma"
    energy_weight: float = 30.0
    final_energy_weight: float | None = None
    force_weight: float = 1.0
    stress_weight: float = 1.0
    learning_rate: float = 3e-3
    final_learning_rate: float = 3e-5
    batch_size: int | None = None
    max_epochs: int | None = None
    patience: int | None = None
    validation_smoothing: int = 10
    time_limit: float | None = None
    clip: float = 10.0
    average_decay: float | None = 0.99
    optimizer: str = "adam"
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    group_by: str | None = None
    seed: int = 0
    dtype: str = "float32"
    energy_offsets: str = "shared"
    force_fraction: float | None = None
    feature_storage: str = "auto"

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
        clock: seconds since an arbitrary start (default ``time.perf_counter``): the time limit and the
            measurements of :attr:`budget` read it.

    Attributes (after training): model, split, history (:class:`Metrics` per epoch), errors (final RMSEs per
    split), budget (:class:`~mlmd_lab.train.budget.TrainingBudget`: the plan and how the time was spent);
    :meth:`summary` says it in words.
    """

    def __init__(self, frames: Iterable[Atoms], config: TrainingConfig | None = None, *,
                 workdir: str | os.PathLike | None = None, callbacks: Sequence[Callback] = (),
                 progress: bool = True, query: dict | None = None, clock: Callable[[], float] = time.perf_counter,
                 **overrides: Any) -> None:
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
        self.clock = clock
        self.budget: TrainingBudget | None = None
        self._origin: float | None = None  # clock at the start of fit(): the time limit counts from there
        self._rows: dict[str, np.ndarray] = {}  # store rows of the train and validation frames
        self._store: FeatureSet | None = None
        self._state: dict[str, Any] = {}
        self.energy_offsets: EnergyOffsets | None = None
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
        self._check_signatures()
        return elements

    def _check_signatures(self) -> None:
        """Refuse frames of conflicting settings signatures, or fit their energy offsets (``energy_offsets``)."""
        mode = self.config.energy_offsets
        if mode not in ("shared", "per_signature"):
            raise MLMDError(f"energy_offsets={mode!r} is not an option; use 'shared' (one energy zero) or "
                            "'per_signature' (fit one energy offset per settings signature)")
        groups = signature_groups(self.frames)
        signatures = [k for k in groups if k is not None]
        if mode == "per_signature" and len(groups) > 1:
            self.energy_offsets = fit_energy_offsets(self.frames, groups)
        elif len(signatures) > 1:
            check_signatures(groups)  # raises MixedSettingsError on conflicting energy zeros
            warnings.warn(f"the frames come from {len(signatures)} different calculation settings "
                          f"({sorted(signatures)[:4]}...): energies of different DFT settings are not comparable; "
                          "select one with settings={...} or check db.compatible()", TrainingWarning, stacklevel=4)

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
        frames = self.frames if self.energy_offsets is None else FrameSet(shift_energies(self.frames,
                                                                                         self.energy_offsets))
        pool, test = frames.split((1.0 - f_test, f_test), seed=split_seed, group_by=cfg.group_by) \
            if f_test > 0 else (frames, FrameSet([]))
        self._pool = pool
        t0 = self.clock()
        self._store, self._statistics = self._stream_features(pool)
        self._row_of = {fid: k for k, fid in enumerate(pool.ids)}
        self._state["features_s"] = self.clock() - t0
        return self.resplit(seed=cfg.seed, test=test, path=path)

    def _stream_features(self, pool: FrameSet) -> tuple[FeatureSet, list]:
        """The counting pass, the choice of force subset and storage, then every frame's features computed and
        written into its record (a few frames in memory at a time), frames grouped in size buckets
        (:func:`~mlmd_lab.train.store.size_buckets`: records padded within a bucket only); returns the records
        and per-frame function statistics (for :meth:`scaling`)."""
        cfg, model = self.config, self.model
        if cfg.feature_storage not in ("auto", "memory", "disk"):  # before the counting pass, which takes minutes
            raise MLMDError(f"feature_storage must be 'auto', 'memory' or 'disk', not {cfg.feature_storage!r}")
        if cfg.optimizer not in ("adam", "kalman"):
            raise MLMDError(f"optimizer must be 'adam' or 'kalman', not {cfg.optimizer!r}")
        if cfg.average_decay is not None and not 0.0 <= cfg.average_decay < 1.0:
            raise MLMDError(f"average_decay={cfg.average_decay} must be in [0, 1) (0.99: an average over ~100 "
                            "steps), or None for the weights themselves")
        if cfg.final_energy_weight is not None and not (cfg.energy_weight > 0 and cfg.final_energy_weight > 0):
            raise MLMDError(f"energy_weight={cfg.energy_weight} and final_energy_weight={cfg.final_energy_weight} "
                            "must both be > 0 for a schedule between them (or final_energy_weight=None)")
        dtype = np.float32 if cfg.dtype == "float32" else np.float64
        frames = list(pool)
        sizes = np.array([len(a) for a in frames])
        self._row_atoms = sizes  # atoms of the frame of each record row
        symbols = [a.get_chemical_symbols() for a in frames]
        self._row_counts = np.array([[row.count(e) for e in model.elements] for row in symbols], np.float64)
        widths = (tuple(model.plan.n_features), tuple(len(c) for c in block_columns(model)))
        buckets = size_buckets(sizes)
        # Records with every atom's force: counted on every frame of small buckets, else estimated from ~20 frames
        # spread over the bucket and its largest one (the counting pass costs ~30 ms per 192-atom frame).
        full_bytes = 0
        for rows in buckets:
            step = 1 if len(rows) <= SAMPLE_ALL else max(1, len(rows) // 20)
            sample = sorted(set(rows[::step].tolist()) | {int(rows[np.argmax(sizes[rows])])})
            _, counts = plan_features(model, [frames[k] for k in sample])
            full_bytes += _record_bytes(caps_of_counts(counts), widths, dtype) * len(rows)
        fraction = self._force_fraction(full_bytes)
        chosen = force_subset(sizes, fraction, cfg.seed) if fraction < 1.0 else None
        plans = []
        for rows in buckets:
            part = [frames[k] for k in rows]
            part_chosen = None if chosen is None else [chosen[k] for k in rows]
            layout, counts = plan_features(model, part, part_chosen)
            plans.append((rows, part, part_chosen, layout, caps_of_counts(counts)))
        directory = self._storage(sum(_record_bytes(caps, widths, dtype) * len(rows) for rows, *_, caps in plans))
        stores = [FeatureStore(record_fields(caps, widths, dtype), len(rows), directory) for rows, *_, caps in plans]
        labels = labels_of(frames, model.elements)
        statistics: list = [None] * len(frames)
        done = 0
        callbacks = CallbackList([*self.callbacks, *([ConsoleProgress()] if self.progress else [])])
        start = self.clock()
        for (rows, part, part_chosen, layout, caps), store in zip(plans, stores, strict=True):
            for local, fr in enumerate(iter_features(model, part, layout, cfg.dtype, part_chosen)):
                k = int(rows[local])
                store.write(local, frame_record(fr, labels, k, caps, dtype))
                statistics[k] = frame_statistics(fr)
                done += 1
                elapsed = self.clock() - start
                eta = elapsed / done * (len(frames) - done) if done >= 2 else None
                callbacks.on_features({"done": done, "total": len(frames), "elapsed_s": elapsed, "eta_s": eta})
        records = FeatureSet(stores, buckets)
        self._state["storage"] = {
            "force_fraction": fraction, "mode": "disk" if records.on_disk else "memory", "bytes": records.nbytes,
            "bytes_all_forces": full_bytes, "frames": done, "reason": self._state.pop("storage_reason", ""),
            "buckets": [{"atoms": [int(sizes[rows].min()), int(sizes[rows].max())], "frames": len(rows),
                         "atoms_total": int(sizes[rows].sum()), "bytes": store.nbytes}
                        for rows, store in zip(buckets, stores, strict=True)]}
        return records, statistics

    @property
    def storage(self) -> dict[str, Any] | None:
        """How the training records are held (after :meth:`write_data`): force_fraction, mode ("memory" or
        "disk"), bytes, bytes_all_forces (the records with every atom's force), frames and the reason in words."""
        return self._state.get("storage")

    def _force_fraction(self, full_bytes: int) -> float:
        """The share of each frame's atoms whose forces are fitted (``TrainingConfig.force_fraction``), given the
        bytes of the records with every atom's force."""
        fraction = self.config.force_fraction
        if fraction is not None:
            if not 0.0 < float(fraction) <= 1.0:
                raise MLMDError(f"force_fraction must be in (0, 1], not {fraction}; 1 fits every atom's force")
            self._state["storage_reason"] = f"force fraction {fraction:g} as configured"
            self._state["force_fraction"] = float(fraction)
            return float(fraction)
        room = FORCE_MEMORY * psutil.virtual_memory().available
        if full_bytes <= room:
            fraction, why = 1.0, "every atom's force"
        else:
            # Kept pairs are 1 - (1 - f)^2 of all: solve for the fraction whose records fill the room.
            share = room / full_bytes
            fraction = max(MIN_FORCE_FRACTION, 1.0 - math.sqrt(1.0 - share))
            why = (f"force fraction {fraction:.3g}: the records of every atom's force ({full_bytes / 2**30:.1f} GiB) "
                   f"exceed {FORCE_MEMORY:.0%} of the available memory")
        self._state["storage_reason"] = why
        self._state["force_fraction"] = fraction
        return fraction

    def _storage(self, needed: int) -> Path | None:
        """Where the records go: None for memory, else a folder for their file (``TrainingConfig.feature_storage``)."""
        mode = self.config.feature_storage
        if mode == "auto":
            mode = "memory" if needed <= IN_MEMORY else "disk"
        if mode == "memory":
            available = psutil.virtual_memory().available
            if needed > 0.9 * available:
                raise MLMDError(f"the training records need {needed / 2**30:.1f} GiB and {available / 2**30:.1f} GiB "
                                "of memory is available; use feature_storage='disk' (or 'auto')")
            return None
        folder = Path(tempfile.gettempdir())
        free = shutil.disk_usage(folder).free
        if needed > 0.9 * free:
            raise MLMDError(f"the training records need {needed / 2**30:.1f} GiB and {folder} has {free / 2**30:.1f} "
                            "GiB free; set TMPDIR to a larger disk, or a smaller force_fraction")
        return folder


    def hold_out(self, fraction: float) -> FrameSet:
        """Take ``fraction`` of the non-test frames out of training and validation, for this trainer and every
        :meth:`member` made from it afterwards; returns them (an ensemble calibrates its spread on them).

        The frames continue the test split's reproducible order (same seed): test first, then these.
        """
        if not 0.0 <= fraction < 1.0:
            raise MLMDError(f"the held-out fraction must be in [0, 1), not {fraction}")
        if self.split is None:
            self.write_data()
        split_seed = self._state.get("split_seed", self.config.seed)
        pool, held = self._pool.split((1.0 - fraction, fraction), seed=split_seed, group_by=self.config.group_by)
        self._pool = pool  # the held-out frames' records stay in the store, unused
        self.resplit(self.config.seed)
        return held

    def resplit(self, seed: int, test: FrameSet | None = None, path: str | os.PathLike | None = None) -> _Split:
        """A new train/validation split of the non-test frames (features are reused)."""
        cfg = self.config
        f_train, f_valid, _ = cfg.fractions
        share = f_valid / max(f_train + f_valid, 1e-12)
        train, validation = self._pool.split((1.0 - share, share), seed=seed + 1, group_by=cfg.group_by)
        if len(train) == 0 or len(validation) == 0:
            raise MLMDError(f"splitting {len(self.frames)} frames by {cfg.fractions} left an empty train or "
                            "validation set; use more frames or other fractions")
        for name, part in (("train", train), ("validation", validation)):
            self._rows[name] = np.array([self._row_of[fid] for fid in part.ids], np.int64)
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
        self._state["reference_energies"] = dict(offsets)
        self.model.settings.atom_energy = dict(offsets)
        self.model._cache.clear()
        return offsets

    # ------------------------------------------------------------------ step 4: scaling
    def scaling(self, path: str | os.PathLike | None = None) -> None:
        """Symmetry-function statistics (min, max, mean, sigma) of the training and validation frames."""
        if "energy_scale" not in self._state:
            self.normalize()
        rows = np.concatenate([self._rows["train"], self._rows["validation"]])
        stats = combine_statistics([self._statistics[k] for k in rows], len(self.model.elements))
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
        """Run the optimiser (see :class:`TrainingConfig`); returns the trained model (kept epoch: lowest smoothed
        validation loss). ``epochs`` overrides ``max_epochs``; without either, the epochs are planned
        (:mod:`mlmd_lab.train.budget`); :attr:`budget` records the plan and the time.

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
        self._origin = self.clock()
        try:
            if self.workdir is not None:  # fail before the expensive steps when the workdir cannot be made
                self.workdir.mkdir(parents=True, exist_ok=True)
            self.write_nn()
            self.write_data()
            self.normalize()
            self.scaling()
            return self._train(None, True, None)
        finally:
            self._origin = None

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
        other._state = {key: self._state[key] for key in ("force_fraction", "storage", "features_s")
                        if key in self._state}
        other._state["split_seed"] = self._state.get("split_seed", self.config.seed)
        other._rows = {}
        other.history, other.errors, other.budget, other._origin = [], {}, None, None
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
        columns = tuple(tuple(int(k) for k in cols) for cols in block_columns(model))
        step_cfg = StepConfig(n_elements=E, activations=model.settings.activations, columns=columns,
                              energy_scale=self._state["energy_scale"],
                              offsets=tuple(self._reference_energies().get(e, 0.0) for e in model.elements),
                              scale_min=model.settings.scale_min,
                              weights=(cfg.energy_weight, cfg.force_weight, cfg.stress_weight))
        params = model.parameters()
        consts = {"shift": [params["shift"][e].astype(dtype) for e in model.elements],
                  "factor": [params["factor"][e].astype(dtype) for e in model.elements]}
        return step_cfg, consts

    def _batch_sizes(self, parts: list[np.ndarray]) -> tuple[int, ...]:
        """Frames per batch in each size bucket: ``batch_size``, or enough frames for ~256 atoms (at least 1), at
        most the bucket's training frames."""
        if self.config.optimizer == "kalman":  # one frame per filter update
            return tuple(1 for _ in parts)
        out = []
        for rows in parts:
            if self.config.batch_size:
                size = int(self.config.batch_size)
            else:
                mean_atoms = float(np.mean(self._row_atoms[rows])) if rows.size else 1.0
                size = int(max(1, round(256 / mean_atoms)))
            out.append(max(1, min(size, rows.size)))
        return tuple(out)

    def _train(self, epochs: int | None, resume: bool, member: int | None) -> HDNNP:
        cfg, clock = self.config, self.clock
        t_begin = clock()
        features_s = float(self._state.get("features_s", 0.0))
        origin = self._origin if self._origin is not None else t_begin - features_s
        self._state.pop("energy_shift", None)  # an earlier run's; this run's is fitted when it ends
        step_cfg, consts = self._setup()
        records = self._store
        train_parts, valid_parts = records.split(self._rows["train"]), records.split(self._rows["validation"])
        n_train, n_valid = len(self.split.train), len(self.split.validation)
        batch = self._batch_sizes(train_parts)
        steps_per_epoch = sum(-(-part.size // size) for part, size in zip(train_parts, batch, strict=True))
        dt = jnp.float32 if cfg.dtype == "float32" else jnp.float64
        params = [[(jnp.asarray(W, dt), jnp.asarray(b, dt)) for W, b in self.model.networks[e]]
                  for e in self.model.elements]
        if cfg.optimizer == "kalman":
            train_step, evaluate = kalman.make_functions(step_cfg, params, steps_per_epoch)
            opt_state = kalman.init_state(params)
        else:
            optimizer = optax.chain(optax.clip_by_global_norm(cfg.clip), optax.scale_by_adam())
            train_step, evaluate = make_functions(step_cfg, optimizer)
            opt_state = optimizer.init(params)
        state = {"epoch": 0, "step": 0, "params": params, "opt_state": opt_state, "best_params": params,
                 "average": params,
                 "best_epoch": 0, "selection": asdict(Selection(span=cfg.validation_smoothing)), "plan": None,
                 "elapsed": 0.0, "history": []}
        checkpoint = self.workdir / CHECKPOINT if self.workdir is not None else None
        fingerprint = self._fingerprint()
        if resume and checkpoint is not None and checkpoint.exists():
            state = _load_checkpoint(checkpoint, fingerprint, state)
        self.history = [Metrics.from_dict(m) for m in state["history"]]
        selection = Selection(**state["selection"])
        previous = float(state["elapsed"])  # training time of earlier sessions of a resumed run

        def spent() -> float:
            return clock() - origin + previous

        # Loss of the untrained model (zero output: the regression energies): a run far above it has diverged.
        # The validation loss (kept epoch, early stopping, divergence) weighs energies as at the schedule's end.
        select_cfg = replace(step_cfg, weights=(self._energy_weight(1.0), *step_cfg.weights[1:]))
        baseline = _rmse(_evaluate_all(evaluate, params, consts, records, valid_parts, batch), select_cfg)["loss"]
        budget = self._plan(epochs, state, steps_per_epoch, spent,
                            lambda: self._measure_epoch(train_step, evaluate, params, state["opt_state"], consts,
                                                        train_parts, valid_parts, batch, steps_per_epoch))
        budget.features_s = features_s
        self.budget = budget
        max_epochs = budget.epochs
        total_steps = steps_per_epoch * max_epochs
        callbacks = CallbackList(self._callbacks())
        loop_start = clock()
        budget.setup_s = loop_start - origin - features_s
        callbacks.on_train_begin({"n_train": n_train, "n_validation": n_valid, "n_test": len(self.split.test),
                                  "epochs": max_epochs, "patience": budget.patience,
                                  "n_parameters": int(sum(W.size + b.size for net in params for W, b in net)),
                                  "elements": list(self.model.elements), "member": member,
                                  "start_epoch": state["epoch"],
                                  "batch_size": batch[0] if len(batch) == 1 else list(batch),
                                  "time_budget_s": self._training_time_left(budget, spent())})
        averaging = cfg.average_decay is not None and cfg.optimizer != "kalman"
        decay = jnp.asarray(cfg.average_decay or 0.0, dt)
        reason = "max_epochs"
        mark = clock()  # end of the previous epoch, callbacks included
        while state["epoch"] < max_epochs:
            epoch = state["epoch"] + 1
            batches = _epoch_batches(train_parts, batch, np.random.default_rng([cfg.seed, epoch]))
            sums = _zero_sums()
            p, o, a = state["params"], state["opt_state"], state["average"]
            for k, (rows, mask) in enumerate(batches):
                progress = (state["step"] + k) / max(1, total_steps)
                rate = jnp.asarray(self._learning_rate(state["step"] + k, total_steps), dt)
                weight = jnp.asarray(self._energy_weight(progress), dt)
                # The next batch is read while this step computes (JAX returns before the step is done).
                p, o, loss, errors = train_step(p, o, consts, records.device_gather(rows), mask, rate, weight)
                if averaging:
                    a = average_step(a, p, state["step"] + k, decay)
                sums = _add(sums, errors)
            if not averaging:
                a = p
            train_metrics = _rmse(sums, select_cfg)
            valid_metrics = _rmse(_evaluate_all(evaluate, a, consts, records, valid_parts, batch), select_cfg)
            state["step"] += steps_per_epoch
            finite = all(np.isfinite(v) for v in (*train_metrics.values(), *valid_metrics.values()))
            if not finite or valid_metrics["loss"] > DIVERGED * max(baseline, 1e-12):
                self._finish_failed(state, epoch, callbacks, valid_metrics["loss"], baseline)
            state["params"], state["opt_state"], state["average"], state["epoch"] = p, o, a, epoch
            best = selection.update(epoch, valid_metrics["loss"])
            valid_metrics["loss_smoothed"] = selection.ema
            if best:
                state.update(best_params=a, best_epoch=epoch)
            state["selection"] = asdict(selection)
            now = clock()
            state["elapsed"] = previous + now - loop_start
            metrics = Metrics(epoch=epoch, step=state["step"],
                              learning_rate=self._learning_rate(state["step"], total_steps),
                              elapsed=state["elapsed"], train=train_metrics, validation=valid_metrics,
                              best=best, member=member)
            self.history.append(metrics)
            state["history"].append(metrics.to_dict())
            if checkpoint is not None:
                _save_checkpoint(checkpoint, fingerprint, state)
            if callbacks.on_epoch_end(metrics):
                reason = "stopped"
                break
            if selection.bad_epochs >= budget.patience:
                reason = "early_stopping"
                break
            now = clock()
            last_epoch, mark = now - mark, now
            if self._out_of_time(budget, spent(), last_epoch):
                reason = "time_limit"
                break
        budget.training_s = previous + clock() - loop_start
        budget.epochs_run, budget.best_epoch, budget.stop = state["epoch"], state["best_epoch"], reason
        t_final = clock()
        self._state["energy_shift"] = self._energy_shift(evaluate, state["best_params"], consts, records,
                                                         train_parts, valid_parts, batch)
        self._export(state["best_params"])
        self.errors = self._final_errors()
        budget.final_s = clock() - t_final
        self.model.metadata = self.provenance(state)
        self._save_export()
        callbacks.on_train_end({"reason": reason, "best_epoch": state["best_epoch"], "elapsed": state["elapsed"],
                                "final": self.history[-1].to_dict() if self.history else {},
                                "errors": self.errors, "budget": budget.to_dict(), "text": self.summary()})
        self._state["reason"] = reason
        return self.model

    # ------------------------------------------------------------------ the budget (see mlmd_lab.train.budget)
    def _learning_rate(self, step: int, total_steps: int) -> float:
        """Adam step size after ``step`` optimiser steps: exponential decay from ``learning_rate`` to
        ``final_learning_rate`` over the planned ``total_steps``."""
        cfg = self.config
        return float(cfg.learning_rate * (cfg.final_learning_rate / cfg.learning_rate) ** (step / max(1, total_steps)))

    def _energy_weight(self, progress: float) -> float:
        """The loss's energy weight at ``progress`` (0-1) of the planned steps: ``energy_weight`` to
        ``final_energy_weight`` geometrically, as the step size falls (constant when the latter is None)."""
        cfg = self.config
        if cfg.final_energy_weight is None:
            return float(cfg.energy_weight)
        return float(cfg.energy_weight * (cfg.final_energy_weight / cfg.energy_weight) ** min(1.0, progress))

    def _plan(self, epochs: int | None, state: dict, steps_per_epoch: int, spent: Callable[[], float],
              measure_epoch: Callable[[], float]) -> TrainingBudget:
        """The run's epochs and patience (:func:`~mlmd_lab.train.budget.plan_epochs`); a resumed run keeps the
        plan in its checkpoint (same schedule), unless ``epochs`` are given."""
        cfg = self.config
        final_estimate = self._measure_final() if cfg.time_limit is not None else None
        explicit = epochs if epochs is not None else cfg.max_epochs
        if state.get("plan") and explicit is None:
            plan = dict(state["plan"])
            budget = TrainingBudget(**plan)
        else:
            epoch_s = measure_epoch() if explicit is None and cfg.time_limit is not None else None
            now = spent()
            n, rule, why = plan_epochs(steps_per_epoch, max_epochs=explicit, time_limit=cfg.time_limit, spent=now,
                                       epoch_seconds=epoch_s, final_estimate=final_estimate or 0.0,
                                       data_epochs=KALMAN_EPOCHS if cfg.optimizer == "kalman" else None)
            patience = int(cfg.patience) if cfg.patience is not None else patience_for(n)
            budget = TrainingBudget(rule=rule, why=why, epochs=n, patience=patience, steps_per_epoch=steps_per_epoch,
                                    planned_at_s=now, epoch_estimate_s=epoch_s)
            if rule == "time_limit" and n < FEW_EPOCHS:
                needed = now + FEW_EPOCHS * EPOCH_MARGIN * (epoch_s or 0.0) + final_reserve(cfg.time_limit,
                                                                                         final_estimate or 0.0)
                warnings.warn(f"the time limit of {cfg.time_limit:.0f} s leaves room for only {n} epoch(s) after "
                              f"{now:.0f} s of features, compilation and measurements: the potential will be "
                              f"poor; give time_limit >= {needed:.0f} s (for {FEW_EPOCHS} epochs) or max_epochs",
                              TrainingWarning, stacklevel=4)
            state["plan"] = {k: getattr(budget, k) for k in ("rule", "why", "epochs", "patience", "steps_per_epoch",
                                                             "planned_at_s", "epoch_estimate_s")}
        budget.time_limit = cfg.time_limit
        budget.final_estimate_s = final_estimate
        if cfg.time_limit is not None:
            budget.reserve_s = final_reserve(cfg.time_limit, final_estimate or 0.0)
        return budget

    def _measure_epoch(self, train_step, evaluate, params, opt_state, consts, train_parts, valid_parts, batch,
                       steps_per_epoch: int) -> float:
        """Seconds per epoch: the median of :data:`PROBE_STEPS` timed optimiser steps (after one that compiles;
        their results are thrown away) times the steps per epoch, plus one validation batch (compiled by the
        baseline evaluation) times the validation batches."""
        clock, records = self.clock, self._store
        # Timed on the size bucket with the most training steps (one compiled shape); others are assumed alike.
        bucket = int(np.argmax([-(-part.size // size) for part, size in zip(train_parts, batch, strict=True)]))
        rows, mask = _epoch_batches([train_parts[bucket]], (batch[bucket],), None)[0]
        rate = jnp.asarray(self.config.learning_rate, params[0][0][0].dtype)
        data = records.device_gather(rows)
        weight = jnp.asarray(self._energy_weight(0.0), rate.dtype)
        jax.block_until_ready(train_step(params, opt_state, consts, data, mask, rate, weight))
        times, p, o = [], params, opt_state
        for _ in range(PROBE_STEPS):
            t0 = clock()  # the batch is read inside the timing, as in an epoch
            data = records.device_gather(rows)
            p, o, _, _ = jax.block_until_ready(train_step(p, o, consts, data, mask, rate, weight))
            times.append(clock() - t0)
        valid_batches = _epoch_batches(valid_parts, batch, None)
        valid_rows, valid_mask = valid_batches[0]
        t0 = clock()
        jax.block_until_ready(evaluate(params, consts, records.device_gather(valid_rows), valid_mask))
        eval_s = clock() - t0
        return float(np.median(times) * steps_per_epoch + eval_s * len(valid_batches))

    def _final_frames(self, name: str) -> list:
        """The frames of split ``name`` whose final errors are computed: all of them, except a training split of
        more than :data:`FINAL_TRAIN_FRAMES` frames, of which that many are drawn (seeded): its errors are a
        diagnostic, and 8,000 frames of water would take minutes."""
        frames = list(getattr(self.split, name))
        if name != "train" or len(frames) <= FINAL_TRAIN_FRAMES:
            return frames
        keep = np.sort(np.random.default_rng(self.config.seed).choice(len(frames), FINAL_TRAIN_FRAMES, replace=False))
        return [frames[k] for k in keep]

    def _final_plan(self) -> list[tuple[int, Layout, list[Atoms], int]]:
        """Per size bucket of the final frames (:func:`~mlmd_lab.train.store.size_buckets`): (its largest frame's
        atoms, the layout that holds every batch :func:`evaluate_model` forms of it in any split, the frames of
        the first of these batches, the number of batches over the splits). So molecules are not evaluated in the
        padding of the largest cell, and the final pass compiles once per bucket, in :meth:`_measure_final`
        (where the estimate runs it) or in the pass itself."""
        splits = [self._final_frames(name) for name in ("train", "validation", "test")]
        frames = [a for part in splits for a in part]
        starts = np.cumsum([0] + [len(part) for part in splits])
        buckets = size_buckets([len(a) for a in frames])
        largest = [max(len(frames[k]) for k in rows) for rows in buckets]
        out = []
        keys = [_bucket_of(len(a), [(n, None) for n in largest]) for a in frames]
        for rows, atoms in zip(buckets, largest, strict=True):
            size = min(FINAL_BATCH, len(rows))
            batches = []
            for part, start in zip(splits, starts[:-1], strict=True):  # as evaluate_model forms them, per split
                mine = [k for k in range(len(part)) if keys[start + k] == atoms]
                batches += [[start + k for k in b] for b in _batches(_largest_first(mine, part), size)]
            first = [frames[k] for k in batches[0]]  # a batch of the pass (any other mix may not fit the layout)
            out.append((atoms, self.model.batch_layout(frames, batches), first, len(batches)))
        return out

    def _final_graphs(self) -> list[tuple[int, Any]]:
        """Per size bucket of the final frames, (its largest frame's atoms, a graph of one of its batches in the
        layout that holds every batch of the final pass): the ``like`` of :func:`evaluate_model`."""
        return [(atoms, self.model.graph(first, like=layout)) for atoms, layout, first, _ in self._final_plan()]

    def _measure_final(self) -> float:
        """Estimated seconds of the final error pass: its layouts (counted as the pass counts them again), then
        per size bucket one batch's neighbour lists and its evaluation, timed on a second call (the first compiles
        the shapes the whole pass reuses, see :meth:`_final_plan`) and extrapolated to the bucket's batches."""
        clock = self.clock
        t0 = clock()
        plan = self._final_plan()
        total = clock() - t0
        for _, layout, first, n_batches in plan:
            t1 = clock()
            graph = self.model.graph(first, like=layout)
            built = clock() - t1
            self.model.evaluate_graph(graph)  # compiles
            t2 = clock()
            self.model.evaluate_graph(graph)
            total += (built + clock() - t2) * n_batches
        self.model._cache.clear()
        return float(total)

    def _training_time_left(self, budget: TrainingBudget, spent: float) -> float | None:
        """Seconds the epochs may take under the time limit (None: no limit)."""
        if budget.time_limit is None:
            return None
        return max(0.0, budget.time_limit - spent - (budget.reserve_s or 0.0))

    def _out_of_time(self, budget: TrainingBudget, spent: float, last_epoch: float) -> bool:
        """True when another epoch like the last (with margin) and the final pass would pass the time limit."""
        if budget.time_limit is None:
            return False
        return spent + EPOCH_MARGIN * last_epoch + (budget.reserve_s or 0.0) > budget.time_limit

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
        if self.budget is not None:
            self.budget.stop, self.budget.epochs_run, self.budget.best_epoch = "diverged", epoch, state["best_epoch"]
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

    def _reference_energies(self) -> dict[str, float]:
        """Per-element reference energies the networks were trained on (eV/atom, :meth:`normalize`)."""
        return self._state.get("reference_energies") or dict(self.model.settings.atom_energy)

    def _energy_shift(self, evaluate, params, consts, records, train_parts, valid_parts, batch) -> dict[str, float]:
        """Per-element energies (eV/atom) that, added to the reference energies, remove the trained model's mean
        energy error on the training frames (least squares over the frames' element counts, minimum norm where
        the compositions do not fix every element); {} when that does not lower the validation energy RMSE.

        Why: the loss weighs ~40 force components per energy per atom, so Adam's noise leaves the energy zero
        off by a few tenths of meV/atom at the kept epoch (water: +0.17 meV/atom mean error on the training
        frames, +0.20 on the validation and +0.28 on the test frames, against an RMSE of 0.42-0.47). A constant
        per element changes no force and no stress."""
        elements = list(self.model.elements)

        def residuals(parts):  # the compiled evaluation of the epochs, so nothing new is compiled
            counts, errors = [], []
            for rows, mask in _epoch_batches(parts, batch, None):
                error = np.asarray(evaluate(params, consts, records.device_gather(rows), mask)["energy_error"])
                for row, e in zip(rows, error.astype(np.float64), strict=True):
                    if np.isfinite(e):
                        counts.append(self._row_counts[int(row)])
                        errors.append(-e)
            return np.asarray(counts, np.float64).reshape(-1, len(elements)), np.asarray(errors)

        C, r = residuals(train_parts)
        Cv, rv = residuals(valid_parts)
        if r.size == 0 or rv.size == 0:
            return {}
        delta = np.linalg.lstsq(C, r, rcond=None)[0]
        n = Cv.sum(axis=1)
        before, after = np.sqrt(np.mean((rv / n) ** 2)), np.sqrt(np.mean(((rv - Cv @ delta) / n) ** 2))
        if not np.isfinite(after) or after >= before:
            return {}
        return {e: float(d) for e, d in zip(elements, delta, strict=True)}

    def _export(self, params) -> None:
        """Write trained weights into the model, the energy scale folded into the output layer (float64), and the
        reference energies plus the trained model's energy shift (:meth:`_energy_shift`) as its atom energies."""
        shift = self._state.get("energy_shift") or {}
        self.model.settings.atom_energy = {e: v + shift.get(e, 0.0) for e, v in self._reference_energies().items()}
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
        with atomic_path(target, replace_folder=True) as tmp:  # an earlier run's export is replaced whole
            self.model.to_n2p2(tmp)
        return target

    def _final_errors(self) -> dict[str, dict[str, float]]:
        """RMSEs of the exported float64 model (the one users get) on each split (eV/atom, eV/Å, eV/Å³; see
        :func:`evaluate_model`)."""
        like = self._final_graphs()
        out = {}
        for name in ("train", "validation", "test"):
            frames = self._final_frames(name)
            if len(frames):
                out[name] = evaluate_model(self.model, frames, batch=FINAL_BATCH, like=like)
        return out

    def summary(self) -> str:
        """What training did, in words: the split (and the frames held out as a test set), the budget (how the
        time was spent, why it stopped) and the held-out errors (meV/atom, meV/Å, GPa)."""
        lines = []
        if self.split is not None:
            n_all, n_test = len(self.frames), len(self.split.test)
            lines.append(f"Data: {len(self.split.train)} training and {len(self.split.validation)} validation frames; "
                         f"{n_test} of {n_all} frames ({100 * n_test / n_all:.0f} %) held out as a test set, used "
                         "neither for training nor for choosing the kept epoch.")
        storage = self.storage
        if storage:
            lines.append(f"Features: {storage['frames']} frames, {storage['bytes'] / 2**20:.0f} MiB in "
                         f"{'memory' if storage['mode'] == 'memory' else 'a file on disk'} ({storage['reason']}).")
        if self.budget is not None:
            lines.append(self.budget.summary())
        test = self.errors.get("test")
        if test:
            parts = [f"energy {1e3 * test['energy_rmse']:.3g} meV/atom" if "energy_rmse" in test else None,
                     f"forces {1e3 * test['force_rmse']:.3g} meV/Å" if "force_rmse" in test else None,
                     f"stress {test['stress_rmse'] / units.GPa:.3g} GPa" if "stress_rmse" in test else None]
            lines.append(f"Test RMSE ({test['n_frames']} frames): " + ", ".join(p for p in parts if p) + ".")
        return "\n".join(lines)

    def evaluate(self, frames: Iterable[Atoms] | None = None) -> dict[str, float]:
        """RMSEs of the trained model on ``frames`` (default: the held-out test split)."""
        return evaluate_model(self.model, self.split.test if frames is None else frames)

    def _fingerprint(self) -> str:
        # The force fraction as chosen: an automatic one follows the free memory, and a checkpoint must not go on
        # with other atoms' forces.
        text = json.dumps({"config": self.config.to_dict(), "train": self.split.train.ids,
                           "validation": self.split.validation.ids,
                           "force_fraction": self._state.get("force_fraction", 1.0)}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def provenance(self, state: dict | None = None) -> dict[str, Any]:
        """What the potential database stores with the model."""
        import mlmd_lab

        state = state or {}
        return {
            "query": _jsonable(self.query),
            "frame_ids": {name: getattr(self.split, name).ids for name in ("train", "validation", "test")},
            "signatures": self.frames.signatures(),
            "credit": self.frames.credit() if hasattr(self.frames, "credit") else [],
            "energy_offsets": None if self.energy_offsets is None else self.energy_offsets.to_dict(),
            "config": self.config.to_dict(),
            "energy_scale": self._state.get("energy_scale"),
            "reference_energies": self._state.get("reference_energies"),
            "energy_shift": self._state.get("energy_shift") or {},  # eV/atom, see Trainer._energy_shift
            "storage": self.storage,
            "errors": self.errors,
            "best_epoch": state.get("best_epoch"),
            "epochs": state.get("epoch"),
            "training_time": state.get("elapsed"),
            "budget": self.budget.to_dict() if self.budget is not None else None,
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
                   progress: bool = True, query: dict | None = None, calibration_fraction: float = 0.1,
                   **overrides: Any):
    """A committee of ``n_members`` potentials differing in initial weights and train/validation split.

    They share the symmetry functions, the precomputed features and the held-out test split; the committee's
    spread estimates the error (see :class:`~mlmd_lab.train.ensemble.Ensemble`). Members train one after the
    other (``workdir/member_K`` holds each one's checkpoint, log and, once it is trained, its n2p2 files in
    ``workdir/member_K/n2p2``).

    Each member validates on its own share of the frames the others train on, so no member's validation frames
    are new to the committee. ``calibration_fraction`` of the non-test frames are therefore held out from
    every member (training, validation and scaling) as the committee's validation split: the force spread is
    calibrated on them (:meth:`~mlmd_lab.train.ensemble.Ensemble.calibrate`; 0: uncalibrated). The test split
    stays untouched for reporting.
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
    held = base.hold_out(calibration_fraction) if calibration_fraction else FrameSet([])
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
    ensemble.metadata["frame_ids"]["calibration"] = held.ids
    if any(results_of(a).get("forces") is not None for a in held):
        ensemble.calibrate(held, split="calibration")
    elif calibration_fraction:
        warnings.warn(f"no held-out frames with forces to calibrate the committee's force spread on ({len(held)} "
                      "held out): forces_std is the raw spread, which usually underestimates the error; use more "
                      "frames or a larger calibration_fraction", TrainingWarning, stacklevel=2)
    return ensemble


def evaluate_model(model, frames: Iterable[Atoms], batch: int = 16, like=None) -> dict[str, float]:
    """RMSE and MAE of ``model``'s predictions against frames' labels.

    Keys: ``energy_rmse``/``energy_mae`` (eV/atom), ``force_rmse``/``force_mae`` (eV/Å, per component) and, for
    periodic frames with a reference stress, ``stress_rmse``/``stress_mae`` (eV/Å³, over the 9 components of
    the stress tensor as in training; ``x / ase.units.GPa`` gives GPa); ``n_frames``; keys without data are
    left out.

    Frames go in size buckets (:func:`~mlmd_lab.train.store.size_buckets`), largest first within each, in
    batches of ``batch``, the last one of a bucket padded with repeats (their predictions are dropped), all in
    one layout that holds every batch of the bucket (counted first, :meth:`HDNNP.batch_layout`): one compilation
    per bucket instead of one per batch shape, and small frames are not padded to the largest. ``like``: a graph
    of ``model`` whose layout every batch uses (a batch it does not hold gets its own), or a list of (largest
    frame's atoms, graph) per bucket (:meth:`Trainer._final_graphs`): a frame goes to the first bucket that holds
    its size.
    """
    frames = list(frames)
    want_stress = any(results_of(a).get("stress") is not None and a.pbc.all() for a in frames)
    graphs = hasattr(model, "graph") and hasattr(model, "results")
    sizes = [len(a) for a in frames]
    if isinstance(like, list):
        keys = [_bucket_of(n, like) for n in sizes]
        groups = [[k for k in range(len(frames)) if keys[k] == atoms] for atoms, _ in like]
        starts = [graph for _, graph in like]
    else:
        groups = [list(rows) for rows in size_buckets(sizes)] if like is None else [list(range(len(frames)))]
        starts = [like] * len(groups)
    de, df, ds = [], [], []
    for rows, start_like in zip(groups, starts, strict=True):
        order = _largest_first(rows, frames)
        size = max(1, min(batch, len(order))) if start_like is None else start_like.layout.n_structures
        batches = _batches(order, size)
        layout = None
        if graphs and batches:
            # One layout that holds every batch of the group: one compilation (see NeighbourBuilder.holding).
            layout = start_like.layout if start_like is not None else model.batch_layout(frames, batches)
        for start, padded_rows in zip(range(0, len(order), size), batches, strict=True):
            part = [frames[k] for k in order[start:start + size]]
            if graphs:
                padded = [frames[k] for k in padded_rows]
                graph = model.graph(padded, like=layout)
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


def _largest_first(rows: Sequence[int], frames: Sequence[Atoms]) -> list[int]:
    """``rows`` ordered by decreasing atoms of their frames (ties in their order)."""
    return sorted(rows, key=lambda k: -len(frames[k]))


def _batches(order: Sequence[int], size: int) -> list[list[int]]:
    """``order`` in batches of ``size``, the last one padded with repeats of its last entry (their predictions
    are dropped): every batch has the shapes of one layout."""
    out = []
    for start in range(0, len(order), size):
        part = list(order[start:start + size])
        out.append(part + [part[-1]] * (size - len(part)))
    return out


def _bucket_of(n_atoms: int, buckets: list[tuple[int, Any]]) -> int:
    """The largest-frame atoms of the first of ``buckets`` ((atoms, graph), ascending) that holds ``n_atoms``
    (the last one if none does)."""
    for atoms, _ in buckets:
        if n_atoms <= atoms:
            return atoms
    return buckets[-1][0]


# ---------------------------------------------------------------------- helpers
def _record_bytes(caps: tuple, widths: tuple, dtype) -> int:
    return FeatureStore(record_fields(caps, widths, dtype), 0).record_bytes


def _epoch_batches(parts: list[np.ndarray], sizes: tuple[int, ...], rng) -> list[tuple[np.ndarray, np.ndarray]]:
    """Batches (rows, valid mask) of each size bucket's ``parts`` in batches of its size; the last one of a bucket
    is padded with its first row (fixed shapes: one compilation per bucket), the padding masked. With ``rng``
    each bucket's rows are shuffled, and with several buckets the order of the batches too; without, in order."""
    batches = []
    for rows, size in zip(parts, sizes, strict=True):
        if rows.size == 0:
            continue
        order = rows[rng.permutation(rows.size)] if rng is not None else rows
        for start in range(0, order.size, size):
            chunk = order[start:start + size]
            mask = np.ones(size, bool)
            mask[chunk.size:] = False
            batches.append((np.concatenate([chunk, np.full(size - chunk.size, chunk[0])]), mask))
    if rng is not None and sum(rows.size > 0 for rows in parts) > 1:
        batches = [batches[k] for k in rng.permutation(len(batches))]
    return batches


def _evaluate_all(evaluate, params, consts, records, parts: list[np.ndarray], sizes: tuple[int, ...]) -> dict:
    """Error sums over the frames at ``parts`` (rows per size bucket), in batches."""
    sums = _zero_sums()
    for rows, mask in _epoch_batches(parts, sizes, None):
        sums = _add(sums, evaluate(params, consts, records.device_gather(rows), mask))
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


_PARAMETER_KEYS = ("params", "opt_state", "best_params", "average")


def _save_checkpoint(path: Path, fingerprint: str, state: dict) -> None:
    """Atomic write, flushed to disk: a kill during the write leaves the previous checkpoint intact."""
    from mlmd_lab.files import atomic_path

    payload = {"format": 1, "fingerprint": fingerprint,
               **{k: (jax.tree.map(np.asarray, v) if k in _PARAMETER_KEYS else v)
                  for k, v in state.items()}}
    with atomic_path(path, fsync=True) as tmp, open(tmp, "wb") as fh:
        pickle.dump(payload, fh, protocol=pickle.HIGHEST_PROTOCOL)


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
        if key not in payload:
            continue
        value = payload[key]
        if key in _PARAMETER_KEYS:
            value = jax.tree.map(jnp.asarray, value)
            value = jax.tree.unflatten(jax.tree.structure(fresh[key]), jax.tree.leaves(value))
        state[key] = value
    return state


def _jsonable(value: Any) -> Any:
    from mlmd_lab.frames import json_default

    return None if value is None else json.loads(json.dumps(value, default=json_default))


__all__ = ["Trainer", "TrainingConfig", "TrainingRun", "TrainingDivergedError", "TrainingWarning", "evaluate_model",
           "train_ensemble"]
