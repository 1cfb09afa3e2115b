"""What an SLHMC run returns: :class:`SLHMCResult` and its production-phase :class:`Average` values."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from ase import Atoms, units

from mlmd_lab.analysis.statistics import MIN_SAMPLES, block_average
from mlmd_lab.errors import MLMDError


@dataclass(frozen=True)
class Average:
    """A production-phase average of the chain (exact: the potential was frozen).

    Attributes:
        mean: the average (eV, Å³ or GPa).
        stderr: block-averaged standard error of the mean (same unit).
        tau_int: integrated autocorrelation time in trials, g/2 with g the statistical inefficiency of the
            blocking analysis (g = 1 + 2 sum_t rho(t) = 2 tau_int; uncorrelated samples: 0.5).
        n_samples: production trials.
        n_effective: effective independent samples, n_samples / (2 tau_int).
        reference_calls_per_sample: reference (DFT) calls of the production phase per effective independent
            sample — the cost figure SLHMC is about.
        plateau: False when the blocking curve had no plateau (chain too short; stderr likely too small).
    """

    mean: float
    stderr: float
    tau_int: float
    n_samples: int
    n_effective: float
    reference_calls_per_sample: float
    plateau: bool


@dataclass
class SLHMCResult:
    """An SLHMC chain.

    Attributes (per trial arrays have length ``n_trials``, trial k is the (k+1)-th trial):
        acceptance_rate: accepted / trials (all trials; see ``acceptance_by_kind``).
        reference_energies: (n_trials,) eV, the chain state's reference energy after each trial.
        accepted: (n_trials,) bool.
        volumes: (n_trials,) Å³, the chain state's volume after each trial (NaN without a periodic cell).
        pressures: (n_trials,) GPa, virial pressure of the chain state from the reference stress plus N kT / V
            (NaN where the reference gives no stress).
        ml_energies: (n_trials,) eV, the ML energy of each proposal.
        delta_h: (n_trials,) eV, H' - H of each proposal (kinetic + reference; volume moves: ΔU + PΔV).
        kinds: (n_trials,) "md" (NVE trial) or "volume" (ln V move).
        screened: (n_trials,) bool, rejected by delayed acceptance on the ML energy (no reference call).
        failed: (n_trials,) bool, the proposal was rejected because the reference failed on it (recorded with
            its error in ``reference.traj``) or the ML trajectory failed (no reference call made; a warning names the
            reason the first time it occurs: a trajectory gone non-finite, or a skin too small for one step).
        n_reference_calls: reference calculations made for this chain (the initial state included; calls
            answered from the workdir's cache on resume are not counted twice).
        states: chain states as Atoms (reference energy, forces, stress attached), one per trial; with a
            workdir a lazy reader of ``states.traj``.
        model: the potential at the end (retrained in the learning phase).
        phases: {"learning": (0, learn_trials), "production": (learn_trials, n_trials)}, trial index ranges.
        temperature: K; pressure: GPa or None; workdir: Path or None; run_id: the chain's id.
        production_calls: reference calls made in the production trials.
        retrain_history: one info dict per retraining (trial, frames, errors).
        stopped: True when ``on_trial`` stopped the chain before ``n_trials`` (the arrays then hold the trials
            done; the same workdir continues the chain).
    """

    acceptance_rate: float
    reference_energies: np.ndarray
    accepted: np.ndarray
    volumes: np.ndarray
    pressures: np.ndarray
    ml_energies: np.ndarray
    delta_h: np.ndarray
    kinds: np.ndarray
    failed: np.ndarray
    screened: np.ndarray
    n_reference_calls: int
    states: Sequence[Atoms]
    model: object
    phases: dict[str, tuple[int, int]]
    temperature: float
    pressure: float | None = None
    workdir: Path | None = None
    run_id: str = ""
    production_calls: int = 0
    retrain_history: list[dict] = field(default_factory=list)
    stopped: bool = False

    def __repr__(self) -> str:
        return (f"SLHMCResult({len(self.accepted)} trials, acceptance {self.acceptance_rate:.3f}, "
                f"{self.n_reference_calls} reference calls, phases {self.phases})")

    def acceptance_by_kind(self) -> dict[str, float]:
        """Acceptance rate of each kind of trial ("md", "volume") over the whole chain."""
        return {str(k): float(np.mean(self.accepted[self.kinds == k])) for k in np.unique(self.kinds)}

    def averages(self) -> dict[str, Average]:
        """Production-phase averages of "energy" (eV), and where defined "volume" (Å³) and "pressure" (GPa).

        Only the production phase (frozen potential) is averaged: its chain is an exact Markov chain for the
        reference ensemble. Raises :class:`MLMDError` with fewer than 4 production trials.
        """
        start, stop = self.phases["production"]
        if stop - start < MIN_SAMPLES:
            raise MLMDError(f"the production phase has {stop - start} trials; averages need at least {MIN_SAMPLES}: "
                            "raise n_trials or lower learn_trials")
        series = {"energy": self.reference_energies, "volume": self.volumes, "pressure": self.pressures}
        out = {}
        for name, values in series.items():
            values = np.asarray(values[start:stop], np.float64)
            if not np.all(np.isfinite(values)):
                continue
            out[name] = series_average(values, self.production_calls)
        return out

    def balance(self) -> Average:
        """The detailed-balance diagnostic of the production NVE trials: the mean of
        d = min(1, e^(-βΔH)) - [ΔH < 0] - [ΔH ≤ 0], zero for an exact kernel.

        Why: for x ~ π ∝ e^(-βH) and the measure-preserving involution F = flip ∘ Φ, ΔH(Fx) = -ΔH(x) and the
        density of y = Fx is π(Fy) = π(y) e^(-βΔH(y)); so E[g(ΔH)] = E[g(-ΔH) e^(-βΔH)] for any g (Crooks'
        relation). With g = [a < 0] this gives P(ΔH < 0) = E[e^(-βΔH); ΔH > 0], hence
        E[min(1, e^(-βΔH))] = P(ΔH ≤ 0) + P(ΔH < 0). Unlike ⟨e^(-βΔH)⟩ = 1 the terms are bounded
        (−2 ≤ d ≤ 1), so the error bar is reliable; a thermostat inside the trajectory or a map that is not
        volume preserving shifts it (a contracting map makes ΔH < 0 likely and accepts nearly all of them).
        Failed trials (no ΔH) are left out; under NPT only the NVE trials count. Not meaningful with delayed
        acceptance (the screened proposals have no ΔH).
        """
        start, stop = self.phases["production"]
        kT = units.kB * self.temperature
        keep = (self.kinds[start:stop] == "md") & np.isfinite(self.delta_h[start:stop])
        terms = balance_terms(self.delta_h[start:stop][keep], kT)
        if len(terms) < MIN_SAMPLES:
            raise MLMDError(f"{len(terms)} production NVE trials with a ΔH; the diagnostic needs at least "
                            f"{MIN_SAMPLES}")
        return series_average(terms, self.production_calls)


def balance_terms(delta_h: np.ndarray, kT: float) -> np.ndarray:
    """The terms d = min(1, e^(-βΔH)) - [ΔH < 0] - [ΔH ≤ 0] of :meth:`SLHMCResult.balance` (ΔH in eV, kT in eV)."""
    x = np.asarray(delta_h, np.float64) / kT
    return np.minimum(1.0, np.exp(-np.minimum(x, 700.0))) - (x < 0) - (x <= 0)  # ties (ΔH = 0) count once


def series_average(values: np.ndarray, calls: int) -> Average:
    """Blocking mean, error and autocorrelation time of one production series (at least 4 values; their unit),
    with ``calls`` reference calls spent on it (for the calls per effective independent sample)."""
    if np.ptp(values) == 0:
        return Average(float(values[0]), 0.0, 0.5, len(values), float(len(values)), calls / len(values), True)
    block = block_average(values)
    g = max(block.statistical_inefficiency, 1.0)
    n_eff = len(values) / g
    return Average(mean=block.mean, stderr=block.stderr, tau_int=0.5 * g, n_samples=len(values), n_effective=n_eff,
                   reference_calls_per_sample=calls / n_eff, plateau=block.plateau)
