"""SLHMCMonitor: a real SLHMC chain (ASE's EMT copper as the reference, mlmd_lab's Lennard-Jones proposing) shown
live; the data after wait(), Stop with a resumable workdir, failures in the widget and in wait(), the learning
phase's retrain marks.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT
from conftest import wait_until

from mlmd_lab import slhmc
from mlmd_lab.errors import MLMDError
from mlmd_lab.md import LennardJones
from mlmd_lab.widgets import SLHMCMonitor

PROPOSAL = LennardJones(epsilon=0.2, sigma=2.338, cutoff=4.5)  # a poor copper: EMT decides
RUN = dict(temperature=300.0, md_steps=5, timestep=2.0, seed=0)


def copper():
    return bulk("Cu", "fcc", a=3.61, cubic=True)  # 4 atoms


class Broken(Calculator):
    """A reference that raises on every structure (a DFT code that cannot start)."""

    implemented_properties = ["energy", "forces"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        raise RuntimeError("pw.x: cannot open the pseudopotential file")


def running_mean(accepted) -> np.ndarray:
    accepted = np.asarray(accepted, float)
    return np.cumsum(accepted) / np.arange(1, len(accepted) + 1)


def test_monitor_shows_the_chain_and_wait_returns_its_result(tmp_path):
    monitor = SLHMCMonitor(window=10)
    assert "mlmd-slhmc" in monitor._dom_classes and monitor.stop_button.disabled
    assert monitor.run(EMT(), PROPOSAL, copper(), n_trials=30, workdir=tmp_path / "chain", **RUN) is monitor
    result = monitor.wait(timeout=600)
    assert isinstance(result, slhmc.SLHMCResult) and result is monitor.result and monitor.done
    assert not result.stopped and not monitor.stopped and monitor.error is None
    rows = monitor.rows
    assert [r["trial"] for r in rows] == list(range(30)) and all(r["phase"] == "production" for r in rows)
    # acceptance: running (the chain log's column) and per phase (here all production)
    x, running = monitor.acceptance_plot.data("running")
    np.testing.assert_array_equal(x, np.arange(30))
    np.testing.assert_allclose(running, running_mean(result.accepted))
    np.testing.assert_allclose(monitor.acceptance_plot.data("production")[1], running_mean(result.accepted))
    assert monitor.acceptance_plot.n_points("learning") == 0
    # reference vs ML energy per trial: the chain state, and the proposals
    np.testing.assert_array_equal(monitor.energy_plot.data("reference (chain state)")[1], result.reference_energies)
    np.testing.assert_array_equal(monitor.energy_plot.data("ML (proposal)")[1], result.ml_energies)
    proposal = monitor.energy_plot.data("reference (proposal)")[1]
    np.testing.assert_array_equal(proposal[result.accepted], result.reference_energies[result.accepted])
    assert np.all(np.isfinite(proposal))  # every proposal had a reference energy (no failures here)
    states = [s.get_potential_energy() for s in result.states]  # the rejected proposals are not chain states
    assert not np.allclose(proposal[~result.accepted], np.asarray(states)[~result.accepted])
    # the running production average ends at result.averages() (the same function, the same calls)
    energy = result.averages()["energy"]
    x, mean = monitor.averages_plot.data("mean")
    assert x[0] == 3 and len(x) == 27  # from the 4th production trial on
    assert mean[-1] == pytest.approx(energy.mean, abs=1e-12)
    assert monitor.averages_plot.data("mean + error")[1][-1] == pytest.approx(energy.mean + energy.stderr)
    assert f"{energy.mean:.6g} ± {energy.stderr:.2g} eV" in monitor.table.value
    assert "potential frozen: exact" in monitor.table.value and "balance" in monitor.table.value
    assert f"{energy.reference_calls_per_sample:.1f}" in monitor.table.value
    # the learning curve: acceptance per window of 10 trials, no retraining
    x, per_window = monitor.learning_plot.data("acceptance per window")
    np.testing.assert_array_equal(x, [10, 20, 30])
    np.testing.assert_allclose(per_window, [result.accepted[k:k + 10].mean() for k in (0, 10, 20)])
    assert monitor.retrains == [] and len(monitor.retrain_marks.x) == 0
    assert "finished: 30 trials" in monitor.status.value and "31 reference calls" in monitor.status.value
    assert monitor.stop_button.disabled and monitor.error_box.layout.display == "none"


def test_stop_button_ends_the_chain_early_and_the_workdir_resumes(tmp_path):
    work = tmp_path / "chain"
    monitor = SLHMCMonitor()
    monitor.run(EMT(), PROPOSAL, copper(), n_trials=10**6, workdir=work, **RUN)
    with pytest.raises(MLMDError, match="already running"):
        monitor.run(EMT(), PROPOSAL, copper(), n_trials=5, **RUN)
    wait_until(lambda: len(monitor.rows) >= 5, what="five trials")
    assert "trial" in monitor.status.value and "reference calls" in monitor.status.value
    monitor.stop_button.click()
    result = monitor.wait(timeout=600)
    done = len(result.accepted)
    assert result.stopped and monitor.stopped and 5 <= done < 10**6 and len(monitor.rows) == done
    assert result.phases["production"] == (0, done)
    assert f"stopped after {done} of 1000000 trials" in monitor.status.value
    assert "same workdir to continue" in monitor.status.value
    assert len((work / "chain.log").read_text().splitlines()) == done + 1
    # a second monitor continues the same chain: earlier trials come from chain.log, then 4 new ones
    again = SLHMCMonitor()
    resumed = again.run(EMT(), PROPOSAL, copper(), n_trials=done + 4, workdir=work, **RUN).wait(timeout=600)
    whole = slhmc.run(EMT(), PROPOSAL, copper(), n_trials=done + 4, **RUN)
    np.testing.assert_array_equal(resumed.accepted, whole.accepted)
    # the same chain; not bit for bit: the resumed JAX propagator builds its neighbour list at another
    # configuration, so the pair sums run in another order (rounding, ~1e-14 eV)
    np.testing.assert_allclose(resumed.reference_energies, whole.reference_energies, rtol=0, atol=1e-10)
    assert resumed.n_reference_calls == whole.n_reference_calls == done + 5
    assert [r["trial"] for r in again.rows] == list(range(done + 4))
    np.testing.assert_allclose(again.acceptance_plot.data("running")[1], running_mean(whole.accepted))
    earlier = again.energy_plot.data("reference (proposal)")[1][:done]  # chain.log keeps no rejected proposal
    np.testing.assert_array_equal(np.isnan(earlier), ~whole.accepted[:done])
    assert np.all(np.isfinite(again.energy_plot.data("reference (proposal)")[1][done:]))
    # a complete chain: no new trial, the monitor shows the workdir's
    third = SLHMCMonitor()
    complete = third.run(EMT(), PROPOSAL, copper(), n_trials=done + 4, workdir=work, **RUN).wait(timeout=600)
    assert len(complete.accepted) == done + 4
    assert [r["trial"] for r in third.rows] == list(range(done + 4)) and "finished" in third.status.value


def test_a_failing_reference_is_shown_in_the_widget_and_raised_by_wait():
    monitor = SLHMCMonitor()
    monitor.run(Broken(), PROPOSAL, copper(), n_trials=5, **RUN)
    with pytest.raises(MLMDError, match="the reference failed on the starting structure") as info:
        monitor.wait(timeout=600)
    assert "pseudopotential" in str(info.value) and monitor.error is info.value and monitor.result is None
    assert "failed: MLMDError" in monitor.status.value
    assert monitor.error_box.layout.display is None and "pseudopotential" in monitor.error_box.value
    assert monitor.stop_button.disabled and monitor.rows == []


def test_an_error_mid_chain_names_the_trials_done_and_a_user_hook_is_called_too():
    seen: list[int] = []

    def hook(row: dict) -> None:
        seen.append(row["trial"])
        if row["trial"] == 2:
            raise RuntimeError("my hook broke")

    monitor = SLHMCMonitor()
    monitor.run(EMT(), PROPOSAL, copper(), n_trials=10, on_trial=hook, **RUN)
    with pytest.raises(RuntimeError, match="my hook broke"):
        monitor.wait(timeout=600)
    assert seen == [0, 1, 2] and len(monitor.rows) == 3
    assert "failed after 3 trials: RuntimeError" in monitor.status.value


def test_a_user_hook_can_stop_the_chain_and_bad_arguments_are_named():
    monitor = SLHMCMonitor()
    result = monitor.run(EMT(), PROPOSAL, copper(), n_trials=50, on_trial=lambda row: row["trial"] == 3,
                         **RUN).wait(timeout=600)
    assert result.stopped and len(result.accepted) == 4
    assert "without a workdir the chain cannot be continued" in monitor.status.value
    assert "averages need at least 4" not in monitor.table.value and "production averages" in monitor.table.value
    with pytest.raises(MLMDError, match="window"):
        SLHMCMonitor(window=0)
    with pytest.raises(MLMDError, match="call run"):
        SLHMCMonitor().wait()
    bad = SLHMCMonitor().run(EMT(), PROPOSAL, copper(), n_trials=5, **dict(RUN, temperature=-1.0))
    with pytest.raises(MLMDError, match="temperature"):
        bad.wait(timeout=600)
    assert "temperature" in bad.error_box.value


@pytest.mark.slow
def test_learning_phase_shows_retrain_marks_and_both_phases():
    """An HDNNP trained briefly on 12 rattled EMT cells, retrained twice (after trials 5 and 10) on them and the
    chain's EMT results, then frozen for the production phase."""
    from test_slhmc import emt_copper

    from mlmd_lab.slhmc.learning import QUICK
    from mlmd_lab.train.trainer import Trainer, TrainingConfig, TrainingWarning

    config = TrainingConfig(**dict(QUICK, cutoff=4.5, max_epochs=20, patience=20))
    frames = emt_copper(12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainingWarning)  # "only 12 frames": on purpose, a poor potential
        start = Trainer(frames, config, progress=False).fit()
    monitor = SLHMCMonitor(window=5)
    result = monitor.run(EMT(), start, copper(), n_trials=16, learn_trials=10, retrain_every=5, train_frames=frames,
                         train_config=config, **RUN).wait(timeout=900)
    assert [r["trial"] for r in monitor.retrains] == [5, 10] == [r["trial"] for r in result.retrain_history]
    assert [r["frames"] for r in monitor.retrains] == [18, 23]  # 12 given + the start + every trial's result
    np.testing.assert_array_equal(monitor.retrain_marks.x, [5.0, 10.0])
    assert [r["phase"] for r in monitor.rows] == ["learning"] * 10 + ["production"] * 6
    assert [r["trial"] for r in monitor.rows if r["retrain"]] == [4, 9]  # the row of the trial before retraining
    np.testing.assert_allclose(monitor.acceptance_plot.data("learning")[1], running_mean(result.accepted[:10]))
    np.testing.assert_allclose(monitor.acceptance_plot.data("production")[1], running_mean(result.accepted[10:]))
    np.testing.assert_array_equal(monitor.acceptance_plot.data("production")[0], np.arange(10, 16))
    assert monitor.averages_plot.data("mean")[0][0] == 13  # the 4th production trial
    assert result.averages()["energy"].n_samples == 6
    assert "retrained 2×" in monitor._progress_text(monitor.rows[-1])
