"""Training HDNNPs from labelled frames: trainer, callbacks (live metrics), ensembles, figures.

Entry points: :class:`Trainer` (``fit()`` runs every step with defaults), :class:`Ensemble`,
and the callbacks of :mod:`mlmd_lab.train.callbacks`.
"""

from mlmd_lab.train.ensemble import Ensemble

__all__ = ["Ensemble", "Trainer", "TrainingConfig"]


def __getattr__(name):
    if name in ("Trainer", "TrainingConfig"):
        from mlmd_lab.train import trainer

        return getattr(trainer, name)
    raise AttributeError(name)
