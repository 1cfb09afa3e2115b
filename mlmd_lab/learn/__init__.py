"""Automatic potential construction: from one structure to a validated committee potential (docs/learn.md).

:func:`run` joins the parts of mlmd_lab into one resumable loop: data recycling from the database, committee
training with calibrated force uncertainty, ML-MD exploration at the requested temperatures and pressures
(uncertainty computed inside the MD engine), classification by trust levels suggested from the data's RMS force
and the committee's own validation error, physical filters before any reference call, farthest-point selection
of diverse candidates, and labelling through :func:`mlmd_lab.dft.label.label` (ledger: no reference task ever
repeated). It stops by a declared rule and says which (:class:`LearnResult`).

- :mod:`mlmd_lab.learn.loop`: :func:`run` and the workdir state;
- :mod:`mlmd_lab.learn.select`: classification, filters, descriptors, farthest-point sampling;
- :mod:`mlmd_lab.learn.result`: :class:`LearnResult`, :class:`IterationRecord`.
"""

from mlmd_lab.learn.loop import run
from mlmd_lab.learn.result import IterationRecord, LearnResult

__all__ = ["IterationRecord", "LearnResult", "run"]
