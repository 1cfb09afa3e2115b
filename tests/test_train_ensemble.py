"""Calibrated committee uncertainty: the per-element force scale, its table, the registry and MD using it.

Committees here are random Cu–S potentials (fast, no training); the reference forces of the calibration
frames are built with a known error per atom, so the fitted scale is known exactly. The benchmark
(benchmarks/bench_train.py) calibrates a trained committee on real DFT water.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from conftest import random_cu_s_cell, random_cu_s_model
from test_train import FAST, emt_frames

from mlmd_lab.errors import MLMDError
from mlmd_lab.frameset import FrameSet
from mlmd_lab.md import forcefield, run
from mlmd_lab.md.run import MDStoppedError
from mlmd_lab.potentials import HDNNP
from mlmd_lab.train.ensemble import (
    MIN_CALIBRATION_ATOMS,
    Ensemble,
    calibration_table,
    fit_force_calibration,
    force_errors,
)
from mlmd_lab.train.trainer import Trainer, TrainingWarning, train_ensemble

#: The error/spread ratio built into the synthetic reference forces, per element.
TRUE_SCALE = {"Cu": 3.0, "S": 1.5}


def _member(seed: int) -> HDNNP:
    """A random Cu–S potential; wide random scaling statistics keep the test structures in range."""
    return random_cu_s_model(seed)


@pytest.fixture(scope="module")
def committee() -> Ensemble:
    return Ensemble([_member(0), _member(1), _member(2)])


@pytest.fixture(scope="module")
def labelled(committee) -> list[Atoms]:
    """Frames whose reference force on atom i is off the committee mean by TRUE_SCALE[element] x raw spread_i,
    in a random direction: |error_i| / spread_i is known exactly."""
    rng = np.random.default_rng(5)
    frames = [random_cu_s_cell(seed) for seed in range(6)]
    for atoms, pred in zip(frames, committee.predict(frames, stress=False, warn=False), strict=True):
        direction = rng.normal(size=(len(atoms), 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        factor = np.array([TRUE_SCALE[s] for s in atoms.get_chemical_symbols()])
        forces = pred["forces"] - (factor * pred["forces_std_raw"])[:, None] * direction
        atoms.calc = SinglePointCalculator(atoms, energy=pred["energy"], forces=forces)
    return frames


def _calibrated(committee, labelled) -> Ensemble:
    ensemble = Ensemble(committee.members)
    ensemble.calibrate(labelled, min_atoms=10)
    return ensemble


# ---------------------------------------------------------------------- fitting
def test_fitted_scale_recovers_the_error_to_spread_ratio_per_element(committee, labelled):
    ensemble = _calibrated(committee, labelled)
    assert ensemble.force_scale == pytest.approx(TRUE_SCALE, rel=1e-10)
    cal = ensemble.calibration
    assert cal["rms_scale"] == pytest.approx(TRUE_SCALE, rel=1e-10)
    assert cal["n_atoms"] == {"Cu": 48, "S": 24} and cal["n_frames"] == 6 and cal["n_members"] == 3
    # forces_std is the calibrated uncertainty: the scale times the raw spread, per element
    for atoms, pred in zip(labelled, ensemble.predict(labelled, warn=False), strict=True):
        factor = np.array([TRUE_SCALE[s] for s in atoms.get_chemical_symbols()])
        np.testing.assert_allclose(pred["forces_std"], factor * pred["forces_std_raw"], rtol=1e-10)
        error = np.linalg.norm(pred["forces"] - atoms.get_forces(), axis=1)
        np.testing.assert_allclose(pred["forces_std"], error, rtol=1e-8)
    # the raw spread is what an uncalibrated committee gives, unchanged by calibration
    raw = committee.predict(labelled[0], warn=False)
    np.testing.assert_array_equal(raw["forces_std"], raw["forces_std_raw"])
    np.testing.assert_array_equal(ensemble.predict(labelled[0], warn=False)["forces_std_raw"],
                                  raw["forces_std_raw"])


def test_elements_with_few_calibration_atoms_share_the_overall_scale(committee, labelled):
    cal = fit_force_calibration(committee, labelled, min_atoms=30)  # 48 Cu, 24 S atoms
    data = force_errors(committee, labelled)
    overall = data.actual.sum() / data.raw.sum()
    assert cal["force_scale"]["Cu"] == pytest.approx(TRUE_SCALE["Cu"], rel=1e-10)
    assert cal["force_scale"]["S"] == pytest.approx(overall, rel=1e-12)
    assert TRUE_SCALE["S"] < overall < TRUE_SCALE["Cu"]


def test_calibration_table_compares_predicted_and_actual_per_bin(committee, labelled):
    ensemble = _calibrated(committee, labelled)
    table = calibration_table(ensemble, labelled, bins=4)
    assert sum(r["count"] for r in table.rows) == table.count == 72 and len(table.rows) == 4
    assert [r["lo"] for r in table.rows[1:]] == [r["hi"] for r in table.rows[:-1]]
    for row in table.rows:
        assert row["lo"] <= row["predicted"] <= row["hi"]
        assert row["predicted"] == pytest.approx(row["actual"], rel=1e-8)
    assert table.ratio == pytest.approx(1.0, rel=1e-8)
    assert table.by_element["Cu"]["predicted"] == pytest.approx(table.by_element["Cu"]["actual"], rel=1e-8)
    # the same frames, uncalibrated: the raw spread underestimates the error by the built-in factors
    raw = calibration_table(committee, labelled, bins=4)
    assert raw.ratio == pytest.approx(raw.raw_ratio) and raw.ratio < 1 / 1.5
    assert raw.by_element["Cu"]["actual"] == pytest.approx(3.0 * raw.by_element["Cu"]["predicted"], rel=1e-8)
    edges = calibration_table(ensemble, labelled, bins=[0.0, 1e9])
    assert len(edges.rows) == 1 and edges.rows[0]["count"] == 72
    assert "pred/act" in str(table) and table.to_dict()["ratio"] == table.ratio


def test_bad_calibration_input_is_refused(committee, labelled):
    unlabelled = [random_cu_s_cell(9)]
    with pytest.raises(MLMDError, match="no labelled forces"):
        Ensemble(committee.members).calibrate(unlabelled)
    with pytest.raises(MLMDError, match="identical forces"):
        Ensemble([committee.members[0]] * 2).calibrate(labelled)
    with pytest.raises(MLMDError, match="force_scale of S must be a finite factor > 0"):
        Ensemble(committee.members, calibration={"force_scale": {"S": -1.0}})
    with pytest.raises(MLMDError, match=r"elements \['O'\]"):
        Ensemble(committee.members, calibration={"force_scale": {"O": 2.0}})
    with pytest.raises(MLMDError, match="bins must be"):
        calibration_table(committee, labelled, bins=0)
    with pytest.raises(MLMDError, match="need an Ensemble"):
        calibration_table(committee.members[0], labelled)


# ---------------------------------------------------------------------- the registry and MD use the scale
def test_registry_keeps_the_calibration(db, committee, labelled):
    ensemble = _calibrated(committee, labelled)
    record = db.models.save(ensemble, "CuS-committee")
    assert record.calibration["force_scale"] == pytest.approx(TRUE_SCALE)
    loaded = db.models.load("CuS-committee")
    assert loaded.force_scale == ensemble.force_scale and loaded.calibration == ensemble.calibration
    for a, b in zip(loaded.predict(labelled, warn=False), ensemble.predict(labelled, warn=False), strict=True):
        np.testing.assert_array_equal(a["forces_std"], b["forces_std"])
        np.testing.assert_array_equal(a["forces_std_raw"], b["forces_std_raw"])
    assert loaded.with_dtype("float32").force_scale == ensemble.force_scale
    assert "force calibration" in str(db.models.record("CuS-committee"))
    db.models.save(committee, "CuS-raw")
    assert db.models.load("CuS-raw").calibration is None


def test_md_forcefield_uses_the_calibrated_uncertainty(committee, labelled):
    ensemble = _calibrated(committee, labelled)
    atoms = labelled[0].copy()
    out = forcefield(ensemble).single_point(atoms)
    pred = ensemble.predict(atoms, warn=False)
    np.testing.assert_allclose(out["force_std"], pred["forces_std"], rtol=1e-8)
    np.testing.assert_allclose(out["force_std_raw"], pred["forces_std_raw"], rtol=1e-8)
    factor = np.array([TRUE_SCALE[s] for s in atoms.get_chemical_symbols()])
    np.testing.assert_allclose(out["force_std"], factor * out["force_std_raw"], rtol=1e-12)
    assert forcefield(committee).force_scale is None  # uncalibrated: force_std is the raw spread


_RETRAINED_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from conftest import random_cu_s_cell, random_cu_s_model
from mlmd_lab.jaxconfig import cache_folder
from mlmd_lab.md import run
from mlmd_lab.train.ensemble import Ensemble

atoms = random_cu_s_cell(0)
counts = []
for seeds in ((0, 1, 2), (3, 4, 5)):  # a committee, then a retrained one of the same kind
    run(Ensemble([random_cu_s_model(s) for s in seeds]), atoms.copy(), "langevin", temperature=10.0, timestep=0.05,
        steps=4, block=2)
    counts.append(sum(1 for p in cache_folder().rglob("*") if p.is_file()))
print(counts)
"""


@pytest.mark.slow
def test_a_retrained_committee_runs_md_from_the_compilation_cache(tmp_path):
    """The weights are an argument of the compiled MD program, not constants in it: a committee of the same kind
    (as each iteration of the learning loop trains) finds the first one's programs in the persistent compilation
    cache and adds none (with the weights baked in, every new committee compiled and cached the block again)."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    env = dict(os.environ, MLMD_JAX_CACHE=str(tmp_path / "cache"))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    out = subprocess.run([sys.executable, "-c", _RETRAINED_SCRIPT.format(tests=str(ROOT / "tests"))], env=env,
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    first, second = (int(n) for n in out.stdout.strip().splitlines()[-1].strip("[]").split(","))
    assert first > 0, "nothing was cached: the test no longer sees the compilation cache"
    assert second == first, f"the retrained committee compiled {second - first} new programs"


@pytest.mark.slow
def test_md_thresholds_on_the_calibrated_uncertainty(committee, labelled):
    ensemble = _calibrated(committee, labelled)
    atoms = labelled[0].copy()
    out = forcefield(ensemble).single_point(atoms)
    # a limit between the raw and the calibrated largest uncertainty: only the calibrated committee stops
    limit = 1.2 * float(out["force_std_raw"].max())
    assert float(out["force_std"].max()) > 1.5 * limit
    settings = dict(ensemble="langevin", temperature=10.0, timestep=0.05, steps=4, block=2, max_force_spread=limit)
    run(committee, atoms.copy(), **settings)
    with pytest.raises(MDStoppedError, match="committee force spread") as stop:
        run(ensemble, atoms.copy(), **settings)
    assert stop.value.result.steps == 0


# ---------------------------------------------------------------------- training holds calibration frames out
def test_hold_out_removes_frames_from_every_member():
    frames = emt_frames(30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainingWarning)
        trainer = Trainer(frames, **FAST)
        trainer.write_data()
        test = set(trainer.split.test.ids)
        held = trainer.hold_out(0.2)
        member = trainer.member(1)
    held_ids = set(held.ids)
    assert len(held_ids) == round(0.2 * (30 - len(test))) and not held_ids & test
    for t in (trainer, member):
        train, validation = set(t.split.train.ids), set(t.split.validation.ids)
        assert set(t.split.test.ids) == test
        assert not held_ids & (train | validation)
        assert held_ids | train | validation | test == {fid for fid in trainer.frames.ids}
    assert set(member.split.validation.ids) != set(trainer.split.validation.ids)  # members still re-split
    with pytest.raises(MLMDError, match="held-out fraction"):
        trainer.hold_out(1.0)


@pytest.mark.slow
def test_train_ensemble_calibrates_on_frames_no_member_saw():
    frames = emt_frames(40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainingWarning)
        ensemble = train_ensemble(frames, n_members=2, max_epochs=3, **FAST)
    ids = ensemble.metadata["frame_ids"]
    assert ids["calibration"] and not set(ids["calibration"]) & set(ids["train"] + ids["validation"] + ids["test"])
    cal = ensemble.calibration
    assert cal["split"] == "calibration" and cal["n_frames"] == len(ids["calibration"])
    held = [a for a, fid in zip(frames, FrameSet(frames).ids, strict=True) if fid in set(ids["calibration"])]
    cu = calibration_table(ensemble, held, bins=2).by_element["Cu"]  # 24 Cu per frame: Cu has its own scale
    assert cu["count"] >= MIN_CALIBRATION_ATOMS and cu["predicted"] == pytest.approx(cu["actual"], rel=1e-6)
    assert cal["force_scale"]["Cu"] == pytest.approx(cu["actual"] / cu["raw"], rel=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainingWarning)
        raw = train_ensemble(frames, n_members=2, max_epochs=1, calibration_fraction=0.0, **FAST)
    assert raw.calibration is None and raw.metadata["frame_ids"]["calibration"] == []
