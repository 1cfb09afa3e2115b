"""The extended Kalman filter optimiser (mlmd_lab.train.kalman): the update against the exact linear answer, and
training with it."""

from __future__ import annotations

import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from test_train import FAST, emt_frames

from mlmd_lab.errors import MLMDError
from mlmd_lab.train.callbacks import Callback
from mlmd_lab.train.kalman import kalman_update
from mlmd_lab.train.trainer import Trainer, TrainingWarning


def _linear_problem(seed=0, n=6, rows=40):
    rng = np.random.default_rng(seed)
    H = rng.normal(size=(rows, n))
    y = H @ rng.normal(size=n) + 0.1 * rng.normal(size=rows)
    return H, y


@pytest.mark.parametrize("rows_per_update", [1, 4, 40])
def test_updates_of_a_linear_model_give_the_ridge_solution_and_its_covariance(rows_per_update):
    """For a linear model y = H w with prior w ~ N(0, I / eps) and noise variance 1 / eta, the filter's updates
    (without process noise) give the exact posterior: mean (H^T H + eps / eta I)^-1 H^T y, covariance
    (eps I + eta H^T H)^-1, whether the rows come one, four or forty at a time."""
    H, y = _linear_problem()
    eps, eta = 1e-2, 0.5
    n = H.shape[1]
    w, P = jnp.zeros(n), jnp.eye(n) / eps
    for start in range(0, len(y), rows_per_update):
        h = jnp.asarray(H[start:start + rows_per_update])
        xi = jnp.asarray(y[start:start + rows_per_update]) - h @ w  # reference minus prediction
        w, P = kalman_update(w, P, h, xi, eta, 0.0)
    mean = np.linalg.solve(H.T @ H + eps / eta * np.eye(n), H.T @ y)
    covariance = np.linalg.inv(eps * np.eye(n) + eta * H.T @ H)
    np.testing.assert_allclose(np.asarray(w), mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.asarray(P), covariance, rtol=1e-8, atol=1e-14)


def test_the_decoupled_filter_keeps_blocks_and_shares_the_innovation():
    """With P in diagonal blocks the update is the global one restricted to them: equal to the global update of
    the block-diagonal P on the blocks (each block's gain uses the innovation covariance of all observations),
    and the weights move where the global filter of that P moves them."""
    H, y = _linear_problem(rows=5)
    rng = np.random.default_rng(3)
    blocks = []
    for n in (2, 4):
        M = rng.normal(size=(n, n))
        blocks.append(jnp.asarray(M @ M.T + n * np.eye(n)))
    full = jnp.zeros((6, 6)).at[:2, :2].set(blocks[0]).at[2:, 2:].set(blocks[1])
    w0 = jnp.asarray(rng.normal(size=6))
    w_g, P_g = kalman_update(w0, full, jnp.asarray(H), jnp.asarray(y), 0.7, 0.1)
    w_d, P_d = kalman_update(w0, tuple(blocks), jnp.asarray(H), jnp.asarray(y), 0.7, 0.1)
    np.testing.assert_allclose(np.asarray(w_d), np.asarray(w_g), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(P_d[0]), np.asarray(P_g[:2, :2]), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(P_d[1]), np.asarray(P_g[2:, 2:]), rtol=1e-12)


def test_process_noise_is_added_to_the_diagonal_after_the_update():
    H, y = _linear_problem(rows=3)
    n = H.shape[1]
    _, P0 = kalman_update(jnp.zeros(n), jnp.eye(n), jnp.asarray(H), jnp.asarray(y), 1.0, 0.0)
    _, P1 = kalman_update(jnp.zeros(n), jnp.eye(n), jnp.asarray(H), jnp.asarray(y), 1.0, 0.25)
    np.testing.assert_allclose(np.asarray(P1 - P0), 0.25 * np.eye(n), atol=1e-14)


def _fit(frames, **overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainingWarning)
        trainer = Trainer(frames, dtype="float64", **dict(FAST, **overrides))
        trainer.fit()
    return trainer


@pytest.mark.slow
def test_kalman_training_learns_faster_per_epoch_than_adam():
    """Three epochs of the filter (one frame per update) against three of Adam on the same data: the filter's
    validation errors keep falling and end far below Adam's (the filter's known strength: few epochs; its cost
    per epoch is measured in benchmarks/bench_train.py). Measured: 166 -> 100 meV/Å against Adam's ~700."""
    frames = emt_frames(40, seed=21)
    kalman = _fit(frames, optimizer="kalman", max_epochs=3)
    adam = _fit(frames, max_epochs=3)
    assert kalman.budget.steps_per_epoch == len(kalman.split.train)
    forces = [m.validation["force_rmse"] for m in kalman.history]
    assert forces[-1] < forces[0]
    assert forces[-1] < 0.5 * adam.history[-1].validation["force_rmse"]
    assert kalman.history[-1].validation["loss"] < adam.history[-1].validation["loss"]
    assert np.isfinite(kalman.errors["test"]["force_rmse"]) and kalman.model.metadata


def test_unknown_optimizer_is_refused_by_name():
    with pytest.raises(MLMDError, match="optimizer must be 'adam' or 'kalman', not 'sgd'"):
        Trainer(emt_frames(4), optimizer="sgd", **FAST).write_data()


class _StopAfter(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, metrics) -> bool:
        return metrics.epoch >= self.epoch


@pytest.mark.slow
def test_a_stopped_kalman_run_resumes_as_if_uninterrupted(tmp_path):
    """The filter's state (P's blocks, q, eta) is in the checkpoint: a run stopped after epoch 2 and resumed
    gives epoch 3 as the run that went straight through."""
    frames = emt_frames(16, seed=22)
    settings = dict(optimizer="kalman", max_epochs=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainingWarning)
        Trainer(frames, workdir=tmp_path, callbacks=[_StopAfter(2)], dtype="float64", **dict(FAST, **settings)).fit()
    resumed = _fit(frames, workdir=tmp_path, **settings)
    straight = _fit(frames, **settings)
    assert [m.epoch for m in resumed.history] == [1, 2, 3]
    for a, b in zip(resumed.history, straight.history, strict=True):
        assert a.validation["force_rmse"] == pytest.approx(b.validation["force_rmse"], rel=1e-10)
    assert resumed.errors["test"] == pytest.approx(straight.errors["test"], rel=1e-10)
