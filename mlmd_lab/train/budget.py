"""How long a training run is (epochs, patience, how a time limit is spent) and which epoch it keeps.

The number of epochs sets the length of the learning-rate schedule (the exponential decay from
``learning_rate`` to ``final_learning_rate`` spans all planned epochs), so it is decided before the first
step, by one of three rules (:class:`~mlmd_lab.train.trainer.TrainingConfig` ``max_epochs``, ``time_limit``):

- ``max_epochs`` given: that many. Training is then fully deterministic (same data, settings and seed give
  the same weights); a run planned by one of the other rules is repeated exactly by passing its
  ``trainer.budget.epochs`` as ``max_epochs``.
- ``time_limit`` given (s, covering the symmetry functions, the training and the final error pass): the
  epochs that fill the time left once the features are computed, at the epoch time measured on a few
  steps that are thrown away (the weights do not depend on the measurement, only the count does), keeping
  a reserve for the final error pass (measured too); at most :data:`TIME_PLAN_FACTOR` times the data-size
  plan. Training also stops when the next epoch would not fit, whatever the plan.
- neither: from the data size, :func:`epochs_for_data` — about :data:`TARGET_STEPS` optimiser steps, so that
  small sets (few steps per epoch) get more epochs, at least :data:`MIN_EPOCHS`, at most :data:`MAX_EPOCHS`.

The patience of early stopping is a share of the planned epochs (:func:`patience_for`); early stopping and
the kept epoch follow the smoothed validation loss (:class:`Selection`). Times are in seconds; the record of
a run is a :class:`TrainingBudget` (``trainer.budget``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

#: Optimiser steps the data-size rule aims at. Adam with a 100-fold exponential decay needs a number of updates
#: rather than of passes over the data: ~200-frame elemental DFT sets (~40 steps per epoch) trained 30 % lower
#: energy and 16 % lower force errors with 1,400 epochs (56,000 steps) than with 300 (issue 20).
TARGET_STEPS = 60_000
#: Fewest epochs of the data-size rule (the former fixed default; large sets already take many steps per epoch).
MIN_EPOCHS = 300
#: Most epochs of the data-size rule (a tiny set would otherwise get tens of thousands).
MAX_EPOCHS = 3_000
#: A time-filling plan is at most this many times the data-size plan: a generous time limit is a cap, and past a
#: few times the target number of steps the errors improve little.
TIME_PLAN_FACTOR = 4
#: Patience as a share of the planned epochs: over a fifth of the run the learning rate falls 2.5-fold (100^0.2),
#: so no improvement of the smoothed validation loss for that long means training has converged.
PATIENCE_SHARE = 0.2
#: Smallest patience (the former fixed default).
MIN_PATIENCE = 40
#: Margin on the measured epoch time (epochs vary: logging, checkpoints, a busy machine). Small: an epoch longer
#: than planned only ends training by the time limit a little early, while a plan too short leaves time unused.
EPOCH_MARGIN = 1.1
#: A time-limited plan with fewer epochs than this warns (TrainingWarning): the limit went to features and
#: compilation, and the potential will be poor.
FEW_EPOCHS = 20
#: Margin on the measured final-error pass, and the smallest reserve kept for it as a share of the time limit.
FINAL_MARGIN = 1.5
MIN_RESERVE_SHARE = 0.02


def epochs_for_data(steps_per_epoch: int) -> int:
    """Epochs of the data-size rule: ~:data:`TARGET_STEPS` optimiser steps, within [MIN_EPOCHS, MAX_EPOCHS]."""
    steps = max(1, int(steps_per_epoch))
    return int(min(MAX_EPOCHS, max(MIN_EPOCHS, round(TARGET_STEPS / steps))))


def epochs_for_time(seconds_left: float, epoch_seconds: float, most: int) -> int:
    """Epochs of ``epoch_seconds`` (s, margin included) that fit in ``seconds_left`` (s); at least 1, at most
    ``most``."""
    if epoch_seconds <= 0:
        return int(most)
    return int(max(1, min(most, math.floor(max(0.0, seconds_left) / epoch_seconds))))


def patience_for(epochs: int) -> int:
    """Early-stopping patience (epochs) for a run of ``epochs``: :data:`PATIENCE_SHARE` of it, at least
    :data:`MIN_PATIENCE`."""
    return int(max(MIN_PATIENCE, math.ceil(PATIENCE_SHARE * epochs)))


def final_reserve(time_limit: float, final_estimate: float) -> float:
    """Seconds kept for the final error pass: the measured estimate with :data:`FINAL_MARGIN`, at least
    :data:`MIN_RESERVE_SHARE` of the time limit."""
    return float(max(FINAL_MARGIN * max(0.0, final_estimate), MIN_RESERVE_SHARE * time_limit))


def plan_epochs(steps_per_epoch: int, *, max_epochs: int | None = None, time_limit: float | None = None,
                spent: float = 0.0, epoch_seconds: float | None = None,
                final_estimate: float = 0.0, data_epochs: int | None = None) -> tuple[int, str, str]:
    """(epochs, rule, why) by the rules of this module.

    Args:
        steps_per_epoch: optimiser steps per epoch.
        max_epochs: explicit number of epochs (wins).
        time_limit: the whole run's limit (s).
        spent: seconds already used (features, setup, measurements).
        epoch_seconds: measured seconds per epoch (without margin); needed with ``time_limit``.
        final_estimate: measured seconds of the final error pass.
        data_epochs: the data-size rule's epochs when the optimiser has its own (the Kalman filter's).
    """
    data = epochs_for_data(steps_per_epoch) if data_epochs is None else int(data_epochs)
    if max_epochs is not None:
        return int(max_epochs), "max_epochs", f"max_epochs={int(max_epochs)} given"
    if time_limit is not None and epoch_seconds is not None:
        reserve = final_reserve(time_limit, final_estimate)
        per_epoch = EPOCH_MARGIN * epoch_seconds
        most = TIME_PLAN_FACTOR * data
        epochs = epochs_for_time(time_limit - spent - reserve, per_epoch, most)
        why = (f"fills the time limit: {time_limit - spent - reserve:.1f} s left after {spent:.1f} s spent and "
               f"{reserve:.1f} s kept for the final errors, at {epoch_seconds:.3g} s per epoch measured"
               + (f" (capped at {TIME_PLAN_FACTOR} x the data-size plan)" if epochs == most else ""))
        return epochs, "time_limit", why
    if data_epochs is not None:
        return data, "data_size", f"{data} epochs, the optimiser's own default"
    why = (f"data size: ~{TARGET_STEPS:,} optimiser steps at {steps_per_epoch} steps per epoch, within "
           f"{MIN_EPOCHS}-{MAX_EPOCHS} epochs")
    return data, "data_size", why


@dataclass
class TrainingBudget:
    """How a training run was planned and how its time was spent (s).

    Attributes:
        rule: ``"max_epochs"``, ``"time_limit"`` or ``"data_size"`` (see the module docstring); why: the plan
            in words. epochs: planned epochs (the learning-rate schedule spans them); patience: early-stopping
            patience (epochs). steps_per_epoch: optimiser steps per epoch.
        time_limit: the limit for the whole run (None: none). planned_at_s: seconds spent when the epochs were
            planned. epoch_estimate_s: measured seconds per epoch before training; final_estimate_s: measured
            seconds of the final error pass; reserve_s: kept for it.
        features_s: symmetry functions and derivatives (0 for ensemble members after the first: shared).
        setup_s: normalisation, scaling, stacking, compilation and the measurements.
        training_s: the epochs (earlier sessions of a resumed run included). final_s: the final error pass.
        epochs_run: epochs done; best_epoch: the epoch whose weights were kept; stop: why training ended.
    """

    rule: str
    why: str
    epochs: int
    patience: int
    steps_per_epoch: int
    time_limit: float | None = None
    planned_at_s: float | None = None
    epoch_estimate_s: float | None = None
    final_estimate_s: float | None = None
    reserve_s: float | None = None
    features_s: float = 0.0
    setup_s: float = 0.0
    training_s: float = 0.0
    final_s: float = 0.0
    epochs_run: int = 0
    best_epoch: int = 0
    stop: str | None = None

    @property
    def total_s(self) -> float:
        """Seconds of the whole run: features, setup, training and final errors."""
        return self.features_s + self.setup_s + self.training_s + self.final_s

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_s": self.total_s}

    def summary(self) -> str:
        """One line: how the time went and why training stopped."""
        head = f"time limit {self.time_limit:.0f} s" if self.time_limit is not None else "no time limit"
        text = (f"Budget ({head}): features {self.features_s:.1f} s, setup {self.setup_s:.1f} s, training "
                f"{self.training_s:.1f} s over {self.epochs_run} of {self.epochs} planned epochs, final errors "
                f"{self.final_s:.1f} s; total {self.total_s:.1f} s. Epochs: {self.why}; patience {self.patience}.")
        if self.stop is not None:
            text += f" Stopped: {STOP_REASONS.get(self.stop, self.stop)}; best epoch {self.best_epoch}."
        return text


#: Why training ended, in words (the ``reason`` of the training summary).
STOP_REASONS = {
    "max_epochs": "all planned epochs done",
    "early_stopping": "early stopping (the smoothed validation loss stopped improving for the patience)",
    "time_limit": "time limit (the next epoch and the final errors would not fit)",
    "stopped": "stop requested",
    "diverged": "diverged",
}


@dataclass
class Selection:
    """Best-epoch choice and early stopping on the validation loss smoothed over epochs.

    The smoothed loss is an exponential moving average with weight ``2 / (span + 1)`` for the newest epoch
    (``span`` 1: the raw loss). With a small validation split (~20 frames of a 200-frame set) the raw loss
    jumps from epoch to epoch as a few hard frames happen to fit better or worse, and its minimum picks a
    lucky epoch (often early) rather than a good model; the average needs the model to be good for several
    epochs. The kept weights are those of the epoch where the average was lowest.

    Attributes:
        span: epochs of the average. ema: the smoothed loss so far. best: its lowest value, at ``best_epoch``.
        bad_epochs: epochs since it last improved (compared with the patience).
    """

    span: int = 10
    ema: float | None = None
    best: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0

    def update(self, epoch: int, loss: float) -> bool:
        """Add the validation ``loss`` of ``epoch``; True when the smoothed loss reached a new minimum."""
        alpha = 2.0 / (max(1, int(self.span)) + 1.0)
        self.ema = float(loss) if self.ema is None else self.ema + alpha * (float(loss) - self.ema)
        if self.ema < self.best:
            self.best, self.best_epoch, self.bad_epochs = self.ema, int(epoch), 0
            return True
        self.bad_epochs += 1
        return False
