"""Self-learning hybrid Monte Carlo (SLHMC): exact sampling of a reference (DFT) ensemble with ML proposals.

Nagai, Okumura, Kobayashi, Shiga, Phys. Rev. B 102, 041124(R) (2020); NPT: Kobayashi et al., J. Chem. Phys. 155,
034106 (2021). ML molecular dynamics only *proposes* configurations; a Metropolis test on the reference energy
accepts or rejects them, so the chain samples the reference ensemble exactly whatever the potential's errors,
and every reference call is a teacher datum from that ensemble (the learning phase retrains on them).

- :func:`run` → :class:`SLHMCResult` (``.averages()`` → :class:`Average` per observable);
- :mod:`mlmd_lab.slhmc.kernel`: the proposal map and the acceptance tests, with the proofs;
- :mod:`mlmd_lab.slhmc.store`: the workdir files (chain log, states, reference cache, restart).
"""

from mlmd_lab.slhmc.chain import run
from mlmd_lab.slhmc.result import Average, SLHMCResult
from mlmd_lab.slhmc.store import LOG_COLUMNS

__all__ = ["LOG_COLUMNS", "Average", "SLHMCResult", "run"]
