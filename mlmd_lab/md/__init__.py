"""Machine-learning molecular dynamics in JAX.

- :func:`run` / :func:`resume`: NVE, Langevin and Nosé–Hoover NVT, stochastic-cell-rescaling NPT, with
  trajectories (ASE), thermodynamic logs, exact restarts, safety stops and streaming callbacks;
- :func:`forcefield`: a potential prepared for MD (HDNNP, Ensemble, or the :class:`LennardJones` pair potential);
- :mod:`mlmd_lab.md.integrators`: the step functions themselves;
- :func:`write_lammps` (also ``HDNNP.to_lammps``): a ready LAMMPS ``pair_style hdnnp`` run for clusters.
"""

from mlmd_lab.md.forcefield import ForceField, LennardJones, forcefield
from mlmd_lab.md.lammps import write_lammps
from mlmd_lab.md.run import LOG_COLUMNS, MDResult, MDStoppedError, read_log, resume, run

__all__ = ["LOG_COLUMNS", "ForceField", "LennardJones", "MDResult", "MDStoppedError", "forcefield", "read_log",
           "resume", "run", "write_lammps"]
