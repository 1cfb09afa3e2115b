"""Committees of HDNNPs: mean predictions with their spread as an uncertainty, calibrated on held-out frames.

An :class:`Ensemble` has the model interface the ASE calculator uses (``graph``, ``evaluate_graph``,
``results``, ``predict``, ``calculator``), so it plugs in wherever one potential does. Its members share
the symmetry functions and units (they differ in weights: seeds and data splits), so one neighbour list
serves them all.

Uncertainties (ASE units) in every result:

- ``energy_std``: standard deviation of the members' total energies (eV, raw);
- ``energies_std``: per atom, of the members' atomic energies (eV, raw);
- ``forces_std_raw``: per atom, the committee force spread sigma_i = sqrt(mean over members of
  |F_m,i - F_mean,i|^2) (eV/Å);
- ``forces_std``: per atom, the calibrated force uncertainty s_Z sigma_i (eV/Å), Z the atom's element: the
  expected norm of the error of the committee-mean force, |F_mean,i - F_true,i|. This is what MD
  (:mod:`mlmd_lab.md`, ``max_force_spread``) and active learning threshold on. Uncalibrated, s_Z = 1.

Calibration (:meth:`Ensemble.calibrate`, done by :func:`~mlmd_lab.train.trainer.train_ensemble` on frames held
out from every member). A committee of a few networks trained on overlapping data agrees more than it errs (on
held-out DFT water, the raw spread is about a third of the actual error), so the spread is rescaled by one
factor per element (variance-scaling recalibration: Musil et al., J. Chem. Theory Comput. 15, 906 (2019);
Imbalzano et al., J. Chem. Phys. 154, 074102 (2021)). The criterion is that the mean calibrated uncertainty
equals the mean actual error norm on the calibration frames, per element:

    s_Z = sum_i |F_mean,i - F_ref,i| / sum_i sigma_i      (atoms i of element Z)

so that a table of mean predicted vs mean actual |error| per bin of predicted uncertainty
(:func:`calibration_table`) agrees. Why this form, and not the likelihood fit mean(e^2 / sigma^2):

- mean |e| and RMS |e| differ: for Gaussian errors with standard deviation c per Cartesian component, |e| is
  Maxwell-distributed, mean |e| = 2 sqrt(2/pi) c = 1.596 c and RMS |e| = sqrt(3) c = 1.732 c (ratio
  sqrt(8 / (3 pi)) = 0.921). Variance scaling, s_rms^2 = sum e^2 / sum sigma^2, would predict the RMS error:
  8 % above the mean error for Gaussian errors, more for the heavier tails of real force errors. ``rms_scale``
  is recorded for reference; for an RMS-type uncertainty multiply by rms_scale / force_scale.
- A ratio of sums needs no finite-committee correction: with M members, sigma^2 is a noisy (M-1)/M-biased
  estimate of the members' variance, and the committee mean carries an extra 1/M of it; both are constant
  factors absorbed by s_Z (valid for this committee size), and the noise of sigma averages out in the sum,
  where it would bias a mean of ratios e^2 / sigma^2 (hence the correction terms of Musil et al.).
- Elements with fewer than :data:`MIN_CALIBRATION_ATOMS` calibration atoms get the factor fitted on all atoms.

Per bin of predicted uncertainty a residual slope remains: sigma from a few members is noisy, so the highest
bins hold atoms whose spread came out high by chance (they over-predict) and the lowest under-predict.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from ase import Atoms

from mlmd_lab.errors import MLMDError
from mlmd_lab.frames import results_of
from mlmd_lab.potentials.model import HDNNP
from mlmd_lab.potentials.neighbours import Graph, Layout

#: Elements with fewer calibration atoms than this share the factor fitted on all atoms.
MIN_CALIBRATION_ATOMS = 50
#: What the calibrated uncertainty predicts (stored with every calibration).
CRITERION = "mean |F_mean - F_ref| per atom = mean calibrated spread, per element (ratio of sums)"


class Ensemble:
    """A committee of potentials with the same symmetry functions, elements and units.

    Args:
        members: the potentials (at least one).
        metadata: provenance of the committee as a whole (JSON-serialisable).
        calibration: the force calibration (as :meth:`calibrate` makes it; at least ``{"force_scale":
            {element: factor}}``, factors > 0); None: uncalibrated (factor 1, ``forces_std`` is the raw spread).
    """

    def __init__(self, members: Sequence[HDNNP], metadata: dict | None = None,
                 calibration: Mapping | None = None) -> None:
        members = list(members)
        if not members:
            raise MLMDError("an ensemble needs at least one member potential")
        first = members[0]
        for k, m in enumerate(members[1:], start=1):
            if (m.elements, m.plan, m.energy_unit, m.length_unit) != (first.elements, first.plan, first.energy_unit,
                                                                     first.length_unit):
                raise MLMDError(f"ensemble member {k} differs from member 0 in elements, symmetry functions or "
                                "units; train members with the same settings (they may differ in seed and split)")
        self.members = members
        self.metadata = dict(metadata or {})
        self.calibration = _checked_calibration(calibration, first.elements)

    def __len__(self) -> int:
        return len(self.members)

    def __repr__(self) -> str:
        calibrated = "" if self.calibration is None else ", calibrated"
        return f"Ensemble({len(self.members)} x HDNNP of {'-'.join(self.elements)}{calibrated})"

    # Calibration -------------------------------------------------------------------------------------
    @property
    def force_scale(self) -> dict[str, float]:
        """{element: s_Z}, the factor from raw committee force spread to calibrated uncertainty (1 uncalibrated)."""
        scale = (self.calibration or {}).get("force_scale", {})
        return {e: float(scale.get(e, 1.0)) for e in self.elements}

    def force_scale_array(self) -> np.ndarray:
        """The factors in the order of :attr:`elements` (E,)."""
        scale = self.force_scale
        return np.array([scale[e] for e in self.elements], np.float64)

    def calibrate(self, frames: Iterable[Atoms], *, split: str = "validation",
                  min_atoms: int = MIN_CALIBRATION_ATOMS) -> dict:
        """Fit the per-element force scale on labelled ``frames`` that no member trained on (see the module
        docstring); sets and returns :attr:`calibration`. ``split`` names the frames (recorded)."""
        self.calibration = fit_force_calibration(self, frames, split=split, min_atoms=min_atoms)
        return self.calibration

    # The model interface of HDNNPCalculator ------------------------------------------------------------
    @property
    def elements(self) -> tuple[str, ...]:
        return self.members[0].elements

    @property
    def energy_unit(self) -> str:
        return self.members[0].energy_unit

    @property
    def length_unit(self) -> str:
        return self.members[0].length_unit

    @property
    def length_factor(self) -> float:
        return self.members[0].length_factor

    @property
    def energy_factor(self) -> float:
        return self.members[0].energy_factor

    @property
    def cutoff(self) -> float:
        return self.members[0].cutoff

    def graph(self, atoms_list: Sequence[Atoms], skin: float = 0.0, like: Graph | Layout | None = None) -> Graph:
        return self.members[0].graph(atoms_list, skin=skin, like=like)

    def batch_layout(self, atoms_list: Sequence[Atoms], batches: Sequence[Sequence[int]]) -> Layout:
        return self.members[0].batch_layout(atoms_list, batches)

    def evaluate_graph(self, graph: Graph, forces: bool = True) -> dict:
        """Members' mean of every quantity (model units) plus ``energy_std`` (B,), ``atomic_std`` (N,) and,
        with forces, ``forces_std_raw`` (N,) and the calibrated ``forces_std`` (N,)."""
        outs = [m.evaluate_graph(graph, forces=forces) for m in self.members]
        mean = {k: np.mean([o[k] for o in outs], axis=0) for k in outs[0] if k != "extrapolation"}
        mean["extrapolation"] = np.max([o["extrapolation"] for o in outs], axis=0)
        mean["energy_std"] = np.std([o["energy"] for o in outs], axis=0)
        mean["atomic_std"] = np.std([o["atomic"] for o in outs], axis=0)
        if forces:
            dev = np.array([o["forces"] for o in outs]) - mean["forces"]
            raw = np.sqrt(np.mean(np.sum(dev**2, axis=2), axis=0))
            mean["forces_std_raw"] = raw
            mean["forces_std"] = raw * np.append(self.force_scale_array(), 1.0)[graph.species]  # -1: padding
        return mean

    def results(self, out: dict, atoms_list: Sequence[Atoms], forces: bool = True, stress: bool = True,
                warn: bool = True) -> list[dict]:
        results = self.members[0].results(out, atoms_list, forces=forces, stress=stress, warn=warn)
        ef, lf = self.energy_factor, self.length_factor
        start = 0
        for s, (result, atoms) in enumerate(zip(results, atoms_list, strict=True)):
            sl = slice(start, start + len(atoms))
            start += len(atoms)
            result["energy_std"] = float(out["energy_std"][s]) * ef
            result["energies_std"] = out["atomic_std"][sl] * ef
            if forces and "forces_std" in out:
                result["forces_std"] = out["forces_std"][sl] * ef / lf
                result["forces_std_raw"] = out["forces_std_raw"][sl] * ef / lf
        return results

    def predict(self, atoms_list: Atoms | Sequence[Atoms], forces: bool = True, stress: bool = True,
                warn: bool = True) -> dict | list[dict]:
        """As :meth:`HDNNP.predict` (one result for one ``Atoms``, a list for a list), with the committee mean
        and ``energy_std``, ``energies_std`` (eV), ``forces_std`` (calibrated) and ``forces_std_raw`` (eV/Å),
        see the module docstring."""
        single = isinstance(atoms_list, Atoms)
        atoms_list = [atoms_list] if single else list(atoms_list)
        out = self.evaluate_graph(self.graph(atoms_list), forces=forces or stress)
        results = self.results(out, atoms_list, forces=forces, stress=stress, warn=warn)
        return results[0] if single else results

    def calculator(self, skin: float = 1.0):
        """An ASE calculator giving the committee mean; the spreads are in ``calc.results``."""
        from mlmd_lab.potentials.calculator import HDNNPCalculator

        return HDNNPCalculator(self, skin=skin)

    def with_dtype(self, dtype: str) -> Ensemble:
        return Ensemble([m.with_dtype(dtype) for m in self.members], self.metadata, self.calibration)

    def to_n2p2(self, path) -> list:
        """Write each member in n2p2 format into ``path/member_K`` (n2p2 evaluates one potential per folder)."""
        from pathlib import Path

        return [m.to_n2p2(Path(path) / f"member_{k}") for k, m in enumerate(self.members)]


# -------------------------------------------------------------------------------------------------- calibration
@dataclass
class ForceErrors:
    """Per labelled atom (A,): element symbol, raw committee spread, calibrated uncertainty and actual error
    norm |F_mean - F_ref| (eV/Å), and the index of its frame among those given."""

    element: np.ndarray
    raw: np.ndarray
    predicted: np.ndarray
    actual: np.ndarray
    frame: np.ndarray

    def __len__(self) -> int:
        return int(self.actual.size)


def force_errors(ensemble: Ensemble, frames: Iterable[Atoms], batch: int = 16) -> ForceErrors:
    """Committee force uncertainty and actual error of every atom of the ``frames`` that have reference forces
    (frames without forces are skipped). ``batch``: frames per evaluation."""
    if not isinstance(ensemble, Ensemble):
        raise MLMDError(f"force uncertainties need an Ensemble (a committee), not {type(ensemble).__name__}")
    frames = [a for a in frames if results_of(a).get("forces") is not None]
    parts: dict[str, list] = {"element": [], "raw": [], "predicted": [], "actual": [], "frame": []}
    for start in range(0, len(frames), batch):
        chunk = frames[start:start + batch]
        for k, (atoms, pred) in enumerate(zip(chunk, ensemble.predict(chunk, stress=False, warn=False),
                                              strict=True)):
            reference = np.asarray(results_of(atoms)["forces"], np.float64)
            parts["element"].append(np.array(atoms.get_chemical_symbols()))
            parts["raw"].append(pred["forces_std_raw"])
            parts["predicted"].append(pred["forces_std"])
            parts["actual"].append(np.linalg.norm(pred["forces"] - reference, axis=1))
            parts["frame"].append(np.full(len(atoms), start + k))
    if not frames:
        return ForceErrors(np.array([], str), *(np.zeros(0) for _ in range(3)), np.zeros(0, int))
    return ForceErrors(**{k: np.concatenate(v) for k, v in parts.items()})


def fit_force_calibration(ensemble: Ensemble, frames: Iterable[Atoms], *, split: str = "validation",
                          min_atoms: int = MIN_CALIBRATION_ATOMS) -> dict:
    """The per-element force scale s_Z = sum |error| / sum raw spread on ``frames`` (see the module docstring).

    Returns the calibration dict stored with the ensemble: ``force_scale`` {element: s_Z}, ``rms_scale``
    {element: sqrt(sum e^2 / sum sigma^2)}, ``n_atoms`` and ``n_frames`` used, ``mean_error`` and
    ``mean_spread_raw`` {element: eV/Å}, ``n_members``, ``split`` and the ``criterion``.
    """
    data = force_errors(ensemble, frames)
    if len(data) == 0:
        raise MLMDError(f"no labelled forces in the {split} frames to calibrate the committee on; give frames with "
                        "DFT forces that no member trained on")
    if not data.raw.sum() > 0:
        raise MLMDError(f"the {len(ensemble)} committee members predict identical forces on the {split} frames "
                        "(zero spread), so there is nothing to scale; train members with different seeds/splits")
    overall = _ratio(data.actual, data.raw)
    overall_rms = _ratio(data.actual**2, data.raw**2) ** 0.5
    out = {"force_scale": {}, "rms_scale": {}, "n_atoms": {}, "mean_error": {}, "mean_spread_raw": {}}
    for element in ensemble.elements:
        mine = data.element == element
        n = int(mine.sum())
        own = n >= min_atoms and data.raw[mine].sum() > 0
        out["force_scale"][element] = _ratio(data.actual[mine], data.raw[mine]) if own else overall
        out["rms_scale"][element] = _ratio(data.actual[mine]**2, data.raw[mine]**2) ** 0.5 if own else overall_rms
        out["n_atoms"][element] = n
        out["mean_error"][element] = float(data.actual[mine].mean()) if n else None
        out["mean_spread_raw"][element] = float(data.raw[mine].mean()) if n else None
    out.update(n_frames=int(np.unique(data.frame).size), n_members=len(ensemble), split=str(split),
               criterion=CRITERION, min_atoms=int(min_atoms))
    return out


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> float:
    return float(np.sum(numerator) / np.sum(denominator))


@dataclass
class CalibrationTable:
    """Calibration of a committee's force uncertainty on some frames.

    Attributes:
        rows: per bin of predicted (calibrated) uncertainty: ``lo``, ``hi`` (bin edges, eV/Å), ``count``
            (atoms), ``predicted`` (mean calibrated uncertainty), ``actual`` (mean |F_mean - F_ref|) and ``raw``
            (mean raw spread), eV/Å.
        predicted, actual, raw: the same means over all atoms (eV/Å).
        by_element: {element: {"count", "predicted", "actual", "raw"}}.
        count: atoms; n_frames: frames with forces.
    """

    rows: list[dict]
    predicted: float
    actual: float
    raw: float
    count: int
    n_frames: int
    by_element: dict[str, dict] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """Mean predicted / mean actual |error| over all atoms (1: calibrated; < 1: overconfident)."""
        return self.predicted / self.actual if self.actual > 0 else math.nan

    @property
    def raw_ratio(self) -> float:
        """Mean raw spread / mean actual |error| (what the ratio was before calibration)."""
        return self.raw / self.actual if self.actual > 0 else math.nan

    def to_dict(self) -> dict:
        return {"rows": self.rows, "predicted": self.predicted, "actual": self.actual, "raw": self.raw,
                "ratio": self.ratio, "raw_ratio": self.raw_ratio, "count": self.count, "n_frames": self.n_frames,
                "by_element": self.by_element}

    def __str__(self) -> str:
        lines = [f"{'bin (meV/Å)':>17} {'atoms':>7} {'predicted':>10} {'actual':>9} {'raw':>9} {'pred/act':>9}"]
        for r in [*self.rows, {"lo": None, "count": self.count, "predicted": self.predicted, "actual": self.actual,
                               "raw": self.raw}]:
            where = "all" if r["lo"] is None else f"{r['lo'] * 1e3:.0f}-{r['hi'] * 1e3:.0f}"
            ratio = r["predicted"] / r["actual"] if r["actual"] > 0 else math.nan
            lines.append(f"{where:>17} {r['count']:>7} {r['predicted'] * 1e3:>10.1f} {r['actual'] * 1e3:>9.1f} "
                         f"{r['raw'] * 1e3:>9.1f} {ratio:>9.3f}")
        return "\n".join(lines)


def calibration_table(ensemble: Ensemble, frames: Iterable[Atoms], bins: int | Sequence[float] = 8) -> CalibrationTable:
    """Mean predicted (calibrated) force uncertainty vs mean actual |force error| per bin of predicted uncertainty.

    Args:
        ensemble: the committee.
        frames: labelled frames none of its members trained on (e.g. the test split); frames without forces
            are skipped.
        bins: number of bins of equal atom counts (quantiles of the predicted uncertainty), or bin edges in eV/Å
            (atoms outside them are left out of the rows, not of the overall means).
    """
    return tabulate_force_errors(force_errors(ensemble, frames), bins)


def tabulate_force_errors(data: ForceErrors, bins: int | Sequence[float] = 8) -> CalibrationTable:
    """:func:`calibration_table` of per-atom errors computed before (by :func:`force_errors`)."""
    if len(data) == 0:
        raise MLMDError("no labelled forces in the frames given to calibration_table; give frames with DFT forces")
    if isinstance(bins, int):
        if bins < 1:
            raise MLMDError(f"bins must be a positive number of bins or a sequence of edges (eV/Å), not {bins}")
        edges = np.quantile(data.predicted, np.linspace(0.0, 1.0, bins + 1))
    else:
        edges = np.asarray(bins, np.float64)
        if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0):
            raise MLMDError(f"bin edges must be at least two increasing values in eV/Å, not {list(bins)}")
    which = np.searchsorted(edges, data.predicted, side="right") - 1
    which[data.predicted == edges[-1]] = edges.size - 2  # the top edge belongs to the last bin
    rows = []
    for b in range(edges.size - 1):
        mine = which == b
        if mine.any():
            rows.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), **_means(data, mine)})
    by_element = {e: _means(data, data.element == e) for e in np.unique(data.element)}
    overall = _means(data, np.ones(len(data), bool))
    return CalibrationTable(rows=rows, predicted=overall["predicted"], actual=overall["actual"], raw=overall["raw"],
                            count=overall["count"], n_frames=int(np.unique(data.frame).size), by_element=by_element)


def _means(data: ForceErrors, mask: np.ndarray) -> dict:
    return {"count": int(mask.sum()), "predicted": float(data.predicted[mask].mean()),
            "actual": float(data.actual[mask].mean()), "raw": float(data.raw[mask].mean())}


def _checked_calibration(calibration: Mapping | None, elements: Sequence[str]) -> dict | None:
    """A copy of ``calibration`` with its force scale checked (finite, > 0, known elements)."""
    if calibration is None:
        return None
    if not isinstance(calibration, Mapping) or not isinstance(calibration.get("force_scale"), Mapping):
        raise MLMDError(f"an ensemble calibration is a dict with 'force_scale': {{element: factor}}, not "
                        f"{calibration!r}; fit one with Ensemble.calibrate(frames)")
    scale = dict(calibration["force_scale"])
    unknown = sorted(set(scale) - set(elements))
    if unknown:
        raise MLMDError(f"the calibration scales elements {unknown} that the ensemble ({'-'.join(elements)}) does "
                        "not have; calibrate this ensemble on its own frames")
    for element, value in scale.items():
        try:
            scale[element] = float(value)
        except (TypeError, ValueError):
            scale[element] = math.nan
        if not (math.isfinite(scale[element]) and scale[element] > 0):
            raise MLMDError(f"force_scale of {element} must be a finite factor > 0, not {value!r}; recalibrate "
                            "with Ensemble.calibrate(frames)")
    return {**dict(calibration), "force_scale": scale}
