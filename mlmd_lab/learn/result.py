"""What :func:`mlmd_lab.learn.run` returns: :class:`LearnResult` with one :class:`IterationRecord` per iteration."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


def load_committee(folder: str | Path, iteration: int | None = None):
    """The calibrated committee saved in ``folder`` (``model-KKK`` of a learn workdir: ``member_K/`` n2p2 files,
    ``calibration.json``, ``metadata.json``) as an :class:`~mlmd_lab.train.ensemble.Ensemble`."""
    from mlmd_lab.errors import MLMDError
    from mlmd_lab.potentials.model import HDNNP
    from mlmd_lab.train.ensemble import Ensemble

    folder = Path(folder)
    members = sorted(folder.glob("member_*"), key=lambda p: int(p.name.split("_")[1]))
    if not members:
        raise MLMDError(f"{folder} holds no committee (member_K folders); is it a model-KKK folder of a learn run?")
    calibration = json.loads((folder / "calibration.json").read_text())
    meta = json.loads((folder / "metadata.json").read_text())
    return Ensemble([HDNNP.from_n2p2(m) for m in members], metadata={"learn_iteration": iteration, **meta},
                    calibration=calibration)


@dataclass
class IterationRecord:
    """One iteration of the loop (JSON-serialisable; ``workdir/iteration-KKK.json``).

    Attributes:
        iteration: 1, 2, ...
        conditions: per condition (temperature_K, pressure_GPa or None): ``frames`` explored, ``accurate``,
            ``candidate``, ``failed`` (fractions of the frames), ``md_stopped`` (why MD runs ended early),
            ``rejected`` (candidates refused by the physical filters), ``selected`` and ``labelled``.
        train_frames: labelled frames the committee was trained on; reused: those not labelled by this run (data
            recycling: already in the database before); outliers: ids of labelled frames left out of training
            (largest reference force beyond ``select.MAX_FORCE_FACTOR`` x the explored RMS force).
        validation: the committee's errors on its held-out calibration frames (eV/Å; ``force_mean_error`` is the
            mean |F_mean - F_ref| per atom) and the members' validation RMSEs (eV/atom, eV/Å).
        trust: (lo, hi) eV/Å, the calibrated max-atom force uncertainty separating accurate / candidate / failed;
            trust_source: "suggested" (:func:`~mlmd_lab.learn.select.suggest_trust`) or "given".
        target_rms_force: the RMS force component (eV/Å) the suggested lo is the 5 % target of: the committee's
            mean forces on this iteration's physical explored frames (None with given trust levels).
        rejected: [{"condition", "reason"}] of the candidates the filters refused (before any reference call).
        selected: candidates chosen (farthest points) for the reference; labelled: of those, labelled now;
        recycled: of those, already labelled in the database (the ledger answered; no call).
        reference_calls: reference calculations run in this iteration (seed set included in iteration 1);
        failed_tasks: [(task key, error)] of the reference calculations that failed (recorded, skipped).
        seconds: {"train", "explore", "label", "total"} wall time (s; summed over resumed sessions).
        stop: the stop reason decided in this iteration, or None.
    """

    iteration: int
    conditions: list[dict[str, Any]] = field(default_factory=list)
    train_frames: int = 0
    reused: int = 0
    outliers: list[str] = field(default_factory=list)
    validation: dict[str, Any] = field(default_factory=dict)
    trust: tuple[float, float] = (0.0, 0.0)
    trust_source: str = "suggested"
    target_rms_force: float | None = None
    rejected: list[dict[str, Any]] = field(default_factory=list)
    selected: int = 0
    labelled: int = 0
    recycled: int = 0
    reference_calls: int = 0
    failed_tasks: list[list[str]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    stop: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["trust"] = list(self.trust)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IterationRecord:
        data = dict(data)
        data["trust"] = tuple(data.get("trust") or (0.0, 0.0))
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def accurate_fractions(self) -> list[float]:
        return [float(c["accurate"]) for c in self.conditions]

    def line(self) -> str:
        parts = " ".join(f"{_condition_name(c)}: {c['accurate']:.2f}/{c['candidate']:.2f}/{c['failed']:.2f}"
                         for c in self.conditions)
        err = self.validation.get("force_mean_error")
        err_text = f"{1e3 * err:.0f} meV/Å" if err is not None else "-"
        return (f"{self.iteration:>4}  {self.train_frames:>6}  {err_text:>9}  {self.trust[0]:.3f}-{self.trust[1]:.3f}  "
                f"{parts}  rejected {len(self.rejected)}, labelled {self.labelled}, calls {self.reference_calls}, "
                f"failed {len(self.failed_tasks)}" + (f", outliers {len(self.outliers)}" if self.outliers else "")
                + (f"  -> {self.stop}" if self.stop else ""))


def _condition_name(c: dict[str, Any]) -> str:
    p = c.get("pressure_GPa")
    return f"{c['temperature_K']:g} K" + ("" if p is None else f" {p:g} GPa")


@dataclass
class LearnResult:
    """The outcome of :func:`mlmd_lab.learn.run`.

    Attributes:
        model: the calibrated committee (:class:`~mlmd_lab.train.ensemble.Ensemble`) of the last iteration
            (None when no committee could be trained, e.g. the reference failed on the seed set).
        iterations: one :class:`IterationRecord` per iteration.
        n_reference_calls: reference calculations run by this loop (all sessions of a resumed run).
        converged: True when the stop rule was met (accurate fraction >= the threshold at every condition in
            two consecutive iterations).
        stop_reason: "converged", "reference budget", "max iterations", "stopped" or "reference failures".
        model_name, model_version: where the model was saved in ``db.models`` (None when not saved).
        workdir: the state folder.
    """

    model: Any
    iterations: list[IterationRecord]
    n_reference_calls: int
    converged: bool
    stop_reason: str
    model_name: str | None = None
    model_version: int | None = None
    workdir: str | None = None

    @property
    def failed_tasks(self) -> list[list[str]]:
        """(task key, error) of every failed reference calculation, all iterations."""
        return [f for it in self.iterations for f in it.failed_tasks]

    def model_of(self, iteration: int):
        """The committee trained in ``iteration`` (1-based), read from the workdir (e.g. the seed model: 1)."""
        return load_committee(Path(self.workdir) / f"model-{int(iteration):03d}", iteration=int(iteration))

    def history(self) -> list[dict[str, Any]]:
        """The iteration records as JSON-serialisable dicts (the provenance saved with the model)."""
        return [it.to_dict() for it in self.iterations]

    def summary(self) -> str:
        """The run in words and one line per iteration (accurate/candidate/failed fractions per condition)."""
        where = f", saved as {self.model_name} v{self.model_version}" if self.model_name else ""
        lines = [f"learn: {len(self.iterations)} iterations, {self.n_reference_calls} reference calls, "
                 f"stopped: {self.stop_reason} (converged: {self.converged}){where}",
                 "iter  frames  val |dF|  trust (eV/Å)  accurate/candidate/failed per condition"]
        lines += [it.line() for it in self.iterations]
        failed = self.failed_tasks
        if failed:
            lines.append(f"{len(failed)} reference calculations failed (recorded, skipped):")
            lines += [f"  {key}: {error[:160]}" for key, error in failed[:10]]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"LearnResult({len(self.iterations)} iterations, {self.n_reference_calls} reference calls, "
                f"stop_reason={self.stop_reason!r}, converged={self.converged})")

    def __str__(self) -> str:
        return self.summary()
