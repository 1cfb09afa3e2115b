"""Analysis of MD trajectories: structure, dynamics, statistics, and figures.

Input trajectories are sequences of ASE ``Atoms`` (``ase.io.read("md.traj", ":")``, a list, or a path), as
written by mlmd_lab's MD: ``atoms.info["time_fs"]`` (fs), unwrapped positions (Å), momenta, periodic cell.
Frames without ``time_fs`` need ``timestep_fs=`` (fs between frames). Bad input raises
:class:`mlmd_lab.errors.MLMDError` with a message naming the problem and the fix.

- Structure: :func:`rdf` → :class:`RDFResult` (partial g(r), running coordination n(r), first peak/minimum).
- Dynamics: :func:`msd` → :class:`MSDResult` (diffusion coefficient D, Å²/fs or cm²/s); :func:`vacf` →
  :class:`VACFResult`; :func:`vdos` → :class:`VDOSResult` (THz and cm⁻¹, band maxima).
- Statistics: :func:`block_average` → :class:`BlockResult` (blocking error bars of correlated series);
  :func:`energy_drift` → :class:`DriftResult` (NVE drift in meV/atom/ps).
- Figures: :mod:`mlmd_lab.analysis.plots` (imported on first use, it loads matplotlib).

Example::

    from mlmd_lab import analysis
    frames = ase.io.read("md.traj", ":")
    g = analysis.rdf(frames, r_max=6.0)
    print(g.first_peak(("O", "O")), g.coordination_number(("O", "O")))
    D, err = analysis.msd(frames).diffusion_cm2_s("O")
    analysis.plots.vdos_figure(analysis.vdos(frames)).savefig("vdos.png")
"""

from __future__ import annotations

import importlib
from typing import Any

from mlmd_lab.analysis.dynamics import (
    A2_PER_FS_TO_CM2_PER_S,
    THZ_TO_CM1,
    MSDResult,
    VACFResult,
    VDOSResult,
    msd,
    vacf,
    vdos,
)
from mlmd_lab.analysis.statistics import BlockResult, DriftResult, block_average, energy_drift
from mlmd_lab.analysis.structure import RDFResult, rdf

__all__ = [
    "A2_PER_FS_TO_CM2_PER_S",
    "THZ_TO_CM1",
    "BlockResult",
    "DriftResult",
    "MSDResult",
    "RDFResult",
    "VACFResult",
    "VDOSResult",
    "block_average",
    "energy_drift",
    "msd",
    "plots",
    "rdf",
    "vacf",
    "vdos",
]


def __getattr__(name: str) -> Any:
    """Import :mod:`mlmd_lab.analysis.plots` (and so matplotlib) only when it is first used."""
    if name == "plots":
        return importlib.import_module("mlmd_lab.analysis.plots")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
