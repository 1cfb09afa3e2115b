"""Jupyter widgets: the notebook face of mlmd_lab (ipywidgets + nglview + bqplot; front ends ship in the wheels).

- :class:`DatabaseBrowser` — query the teacher-data database, page through frames, view one in nglview with force
  arrows, hand the selection to Python as a FrameSet.
- :class:`TrainingMonitor` — live train/validation curves, learning rate, ETA and a stop button; parity plots
  at the end.
- :class:`JobMonitor` — a dask / dask-jobqueue cluster: jobs, workers, tasks done/failed, scale buttons, dashboard link.
- :class:`MDViewer` — a trajectory in nglview, live temperature/energy/pressure, g(r).
- :class:`ModelBrowser` — the potential database: errors, provenance, load and export.
- :class:`SLHMCMonitor` — a self-learning hybrid Monte Carlo chain live: acceptance, reference vs ML energy,
  production averages with error bars, the learning curve, Stop.
- :class:`LearnMonitor` — automatic potential construction (:func:`mlmd_lab.learn.run`) live: accurate /
  candidate / failed fractions per iteration and condition, reference budget, validation errors, phase, Stop.

Every widget carries ``mlmd-*`` DOM classes (``_dom_classes``) that the browser tests (and users' CSS) hook into.
Imports are lazy so ``import mlmd_lab`` never pulls in the Jupyter stack.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "DatabaseBrowser": "mlmd_lab.widgets.database",
    "ModelBrowser": "mlmd_lab.widgets.models",
    "TrainingMonitor": "mlmd_lab.widgets.training",
    "JobMonitor": "mlmd_lab.widgets.jobs",
    "MDViewer": "mlmd_lab.widgets.md",
    "SLHMCMonitor": "mlmd_lab.widgets.slhmc",
    "LearnMonitor": "mlmd_lab.widgets.learn",
    "structure_view": "mlmd_lab.widgets.structure",
    "LivePlot": "mlmd_lab.widgets.plots",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mlmd_lab.widgets' has no attribute {name!r}")
