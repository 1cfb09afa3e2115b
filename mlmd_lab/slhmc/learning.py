"""The learning phase: retrain the proposal potential between trials on every reference result so far.

Each retraining is a fresh, deterministic :class:`~mlmd_lab.train.trainer.Trainer` run (fixed epochs and seed)
on the chain's reference results — accepted and rejected proposals alike, all from near the reference
ensemble — plus any ``train_frames`` given (e.g. the frames the starting potential was trained on). The
potential changes only between trials, so each trial's kernel is exact for the potential it used; the chain
of the learning phase as a whole is adaptive and its averages are not reported as exact
(:meth:`~mlmd_lab.slhmc.result.SLHMCResult.averages` uses the production phase only).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import replace

from ase import Atoms

from mlmd_lab.errors import MLMDError

#: Small, quick settings: the learning phase retrains often, on tens to hundreds of frames.
QUICK = dict(n_radial=6, n_angular=1, zetas=(1.0,), hidden=(15, 15), max_epochs=150, patience=150,
             validation_smoothing=1, fractions=(0.8, 0.2, 0.0), dtype="float64", seed=0)


class Learner:
    """Retrains on the store's reference results (see the module docstring)."""

    def __init__(self, settings: dict, store, config=None, train_frames: Sequence[Atoms] = ()) -> None:
        from mlmd_lab.train.trainer import TrainingConfig

        self.settings, self.store = settings, store
        self.config = config if config is not None else TrainingConfig(**QUICK)
        if self.config.max_epochs is None:
            self.config = replace(self.config, max_epochs=QUICK["max_epochs"])  # planned epochs depend on timing
        self.train_frames = list(train_frames)

    def retrain(self, potential, done: int):
        """A potential trained on every reference result up to trial ``done``; returns (model, info)."""
        from mlmd_lab.train.trainer import Trainer, TrainingWarning

        frames = self.train_frames + self.store.teacher_frames()
        if len(frames) < 5:
            raise MLMDError(f"retraining after trial {done} has {len(frames)} reference results; it needs at least "
                            "5: raise retrain_every or give train_frames=")
        config = replace(self.config, cutoff=self.config.cutoff or float(potential.cutoff))
        with warnings.catch_warnings():  # "only N frames": expected early in a learning phase, not news
            warnings.simplefilter("ignore", TrainingWarning)
            trainer = Trainer(frames, config, progress=False)
            model = trainer.fit()
        errors = {split: {k: float(v) for k, v in e.items()} for split, e in trainer.errors.items()}
        return model, {"trial": done, "frames": len(frames), "errors": errors}
