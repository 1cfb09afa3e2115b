"""Training records in memory and on disk (mlmd_lab.train.store), the automatic force subset and storage choice,
and the feature stage's progress events."""

from __future__ import annotations

import gc
import warnings

import numpy as np
import pytest
from test_train import FAST, emt_frames

import mlmd_lab.potentials.model as model_module
import mlmd_lab.train.trainer as trainer_module
from mlmd_lab.errors import MLMDError
from mlmd_lab.train.callbacks import Callback
from mlmd_lab.train.store import FeatureStore
from mlmd_lab.train.trainer import Trainer, TrainingWarning

FIELDS = {"a": ((3, 4), np.float32), "b": ((5,), np.int32), "e": ((), np.float64), "m": ((7,), bool)}


def _record(rng):
    return {"a": rng.normal(size=(3, 4)), "b": rng.integers(-9, 9, 5), "e": rng.normal(), "m": rng.random(7) > 0.5}


@pytest.mark.parametrize("where", ["memory", "disk"])
def test_records_come_back_as_written_in_any_order(where, tmp_path):
    rng = np.random.default_rng(0)
    store = FeatureStore(FIELDS, 6, None if where == "memory" else tmp_path)
    records = [_record(rng) for _ in range(6)]
    for k in (3, 0, 5, 1, 4, 2):
        store.write(k, records[k])
    rows = np.array([4, 4, 0, 2])
    batch = store.gather(rows)
    assert batch["a"].shape == (4, 3, 4) and batch["e"].shape == (4,) and batch["m"].dtype == bool
    for n, k in enumerate(rows):
        np.testing.assert_array_equal(batch["a"][n], records[k]["a"].astype(np.float32))
        np.testing.assert_array_equal(batch["b"][n], records[k]["b"])
        assert batch["e"][n] == records[k]["e"] and batch["m"][n].tolist() == records[k]["m"].tolist()
    assert store.on_disk == (where == "disk") and store.record_bytes % 64 == 0
    with pytest.raises(ValueError, match="field 'a' has shape"):
        store.write(0, dict(records[0], a=np.zeros((4, 3))))



@pytest.mark.parametrize("where", ["memory", "disk"])
def test_large_records_and_gathers_come_back_as_written(where, tmp_path):
    """Records larger than a write piece (written in 64 KB pieces) and gathers above the large-array size (their
    own anonymous mappings) hold the bytes written, in any row order, repeats included."""
    from mlmd_lab.train import store as store_module

    fields = {"dG": ((600, 24, 3), np.float32), "i": ((600,), np.int32), "e": ((), np.float64)}
    rng = np.random.default_rng(1)
    n = 64
    store = FeatureStore(fields, n, None if where == "memory" else tmp_path)
    assert store.record_bytes > 2 * store_module.WRITE_PIECE
    records = [{"dG": rng.normal(size=(600, 24, 3)), "i": rng.integers(0, 99, 600), "e": rng.normal()}
               for _ in range(n)]
    for k in rng.permutation(n):
        store.write(int(k), records[k])
    rows = np.r_[rng.permutation(n), [5, 5]]
    batch = store.gather(rows)
    assert batch["dG"].nbytes >= store_module.LARGE and batch["dG"].flags.writeable
    for m, k in enumerate(rows):
        np.testing.assert_array_equal(batch["dG"][m], records[k]["dG"].astype(np.float32))
        np.testing.assert_array_equal(batch["i"][m], records[k]["i"])
        assert batch["e"][m] == records[k]["e"]

def test_the_disk_file_goes_with_the_store(tmp_path):
    store = FeatureStore(FIELDS, 3, tmp_path)
    path = store.path
    assert path.exists() and path.stat().st_size == store.nbytes
    store.close()
    assert not path.exists()
    again = FeatureStore(FIELDS, 3, tmp_path)
    path = again.path
    del again
    gc.collect()
    assert not path.exists()


def _fit(frames, **overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainingWarning)
        trainer = Trainer(frames, max_epochs=3, dtype="float64", **dict(FAST, **overrides))
        trainer.fit()
    return trainer


def test_training_from_disk_equals_training_from_memory():
    """The same records, read from a file batch by batch, give the same training to the last bit."""
    frames = emt_frames(24, seed=5)
    memory, disk = _fit(frames, feature_storage="memory"), _fit(frames, feature_storage="disk")
    assert memory.storage["mode"] == "memory" and disk.storage["mode"] == "disk"
    assert [m.validation["loss"] for m in memory.history] == [m.validation["loss"] for m in disk.history]
    assert memory.errors["test"] == disk.errors["test"]
    assert "a file on disk" in disk.summary()


def test_auto_storage_and_force_fraction_follow_the_memory(monkeypatch):
    """Small sets stay in memory with every force; when the records would not fit, the trainer picks a force
    subset and a file, and says why; explicit settings win; nonsense is refused by name."""
    frames = emt_frames(24, seed=6)
    small = _fit(frames)
    assert small.storage["mode"] == "memory" and small.storage["force_fraction"] == 1.0
    assert small.storage["bytes"] == small.storage["bytes_all_forces"]
    monkeypatch.setattr(trainer_module, "IN_MEMORY", 0)
    monkeypatch.setattr(trainer_module, "FORCE_MEMORY", 0.3 * small.storage["bytes_all_forces"]
                        / trainer_module.psutil.virtual_memory().available)
    tight = _fit(frames)
    fraction = tight.storage["force_fraction"]
    assert tight.storage["mode"] == "disk" and 0.05 <= fraction < 0.3
    assert tight.storage["bytes"] < 0.6 * small.storage["bytes"]
    assert "exceed" in tight.storage["reason"] and "force fraction" in tight.summary()
    assert tight.model.metadata["storage"]["force_fraction"] == fraction
    chosen = _fit(frames, force_fraction=1.0, feature_storage="memory")
    assert chosen.storage["force_fraction"] == 1.0 and chosen.storage["mode"] == "memory"
    with pytest.raises(MLMDError, match="feature_storage must be"):
        Trainer(frames, feature_storage="ssd", **FAST).write_data()


def test_the_feature_stage_reports_progress_with_time_left():
    events = []

    class Watch(Callback):
        def on_features(self, progress):
            events.append(dict(progress))

    _fit(emt_frames(12, seed=7), callbacks=[Watch()])
    pool = len(events)
    assert [e["done"] for e in events] == list(range(1, pool + 1)) and events[-1]["total"] == pool
    assert events[0]["eta_s"] is None and events[-1]["eta_s"] == 0.0
    assert all(e["eta_s"] >= 0 for e in events[1:]) and events[-1]["elapsed_s"] > 0


def _small_cells(n: int, seed: int):
    """Labelled 4-atom CuAl cells (EMT), to mix with the 32-atom ones."""
    from ase.build import bulk

    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
        atoms.symbols[rng.integers(4)] = "Al"
        atoms.positions += rng.normal(scale=0.08, size=atoms.positions.shape)
        frames.append(_emt_labelled(atoms))
    return frames


def _emt_labelled(atoms):
    """``atoms`` with EMT's energy, forces and stress as fixed labels."""
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator

    atoms.calc = EMT()
    results = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces(), "stress": atoms.get_stress()}
    atoms.calc = SinglePointCalculator(atoms, **results)
    return atoms


def _mixed_frames():
    """12 EMT cells of 32 atoms and 24 small cells of 4 atoms (two size buckets)."""
    return emt_frames(12, seed=8) + _small_cells(24, seed=9)


@pytest.fixture(scope="module")
def mixed_fit():
    """One training on :func:`_mixed_frames`, shared by the two mixed-size tests (grouped on one xdist worker):
    training it once per test cost ~20 s of worker time twice for the same model."""
    return _fit(_mixed_frames())


@pytest.mark.xdist_group("mixed_sizes")
def test_mixed_sizes_are_stored_in_buckets_not_padded_to_the_largest(mixed_fit, monkeypatch):
    """4-atom and 32-atom cells train together; each size keeps records of its own capacities, so memory follows
    the atoms present; padding all to the largest (one bucket) takes over twice as much."""
    from mlmd_lab.train import store as store_module

    frames = _mixed_frames()
    mixed = mixed_fit
    buckets = mixed.storage["buckets"]
    assert [b["atoms"] for b in buckets] == [[4, 4], [32, 32]]
    per_atom = [b["bytes"] / b["atoms_total"] for b in buckets]
    assert max(per_atom) < 2.0 * min(per_atom)
    assert np.isfinite(mixed.errors["test"]["force_rmse"]) and len(mixed.history) == 3
    monkeypatch.setattr(store_module, "BUCKET_RATIO", 100.0)
    monkeypatch.setattr(trainer_module, "size_buckets",
                        lambda sizes: store_module.size_buckets(sizes, ratio=100.0))
    padded = _fit(frames)
    assert len(padded.storage["buckets"]) == 1
    assert padded.storage["bytes"] > 2 * mixed.storage["bytes"]  # 11 x 32 + 21 x 4 atoms padded to 32


@pytest.mark.xdist_group("mixed_sizes")
def test_final_errors_of_mixed_sizes_are_evaluated_per_bucket_and_equal_frame_by_frame(mixed_fit):
    """The final error pass evaluates each size bucket in its own shapes (the 4-atom cells not padded to 32
    atoms), and its RMSEs equal predictions made one frame at a time."""
    from mlmd_lab.frames import results_of
    from mlmd_lab.train.trainer import evaluate_model

    trainer = mixed_fit
    graphs = trainer._final_graphs()
    assert [atoms for atoms, _ in graphs] == [4, 32]
    assert graphs[0][1].layout.n_atoms < graphs[1][1].layout.n_atoms
    test = list(trainer.split.test)
    assert {len(a) for a in test} == {4, 32}
    de, df = [], []
    for atoms in test:
        pred, ref = trainer.model.predict(atoms, warn=False), results_of(atoms)
        de.append((pred["energy"] - ref["energy"]) / len(atoms))
        df.append((pred["forces"] - ref["forces"]).ravel())
    expected = {"energy_rmse": np.sqrt(np.mean(np.square(de))), "force_rmse": np.sqrt(np.mean(np.concatenate(df) ** 2))}
    for errors in (trainer.errors["test"], evaluate_model(trainer.model, test)):
        assert errors["n_frames"] == len(test)
        for key, value in expected.items():
            assert errors[key] == pytest.approx(value, rel=1e-10)


def _al_rich(n: int, seed: int):
    """Labelled 31-atom CuAl cells (EMT) with 24 Al: one atom fewer than :func:`emt_frames`' cells (the same
    size bucket, evaluated after them), another composition."""
    from ase.build import bulk

    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        atoms = bulk("Cu", "fcc", a=3.7, cubic=True).repeat((2, 2, 2))
        del atoms[int(rng.integers(len(atoms)))]
        atoms.symbols[rng.choice(len(atoms), 24, replace=False)] = "Al"
        atoms.positions += rng.normal(scale=0.08, size=atoms.positions.shape)
        frames.append(_emt_labelled(atoms))
    return frames


def test_the_final_pass_compiles_nothing_after_its_estimate(monkeypatch):
    """The estimate of the final error pass compiles the shapes the pass then reuses: one layout per size bucket
    that holds every batch of every split, also when frames of one bucket differ in composition (pure Cu cells
    of 32 atoms, Al-rich ones of 31: a layout sized by the largest frames alone did not hold batches of Al-rich
    ones, and the pass
    compiled again, uncounted by the estimate: 72 s of compiling against a 4.7 s estimate on a four-element
    set of bulk Cu2S, water boxes, clusters and molecules)."""
    frames = emt_frames(20, seed=12, alloy=False) + _al_rich(16, seed=13)
    trainer = _fit(frames)
    monkeypatch.setattr(model_module, "_COMPILED", {})  # forget what the run compiled, its final pass included
    compiled = trainer.model._compiled()  # one jitted function; _cache_size counts its compiled shapes
    trainer._measure_final()
    before = compiled._cache_size()
    layouts = {graph.layout for _, graph in trainer._final_graphs()}
    errors = trainer._final_errors()
    assert compiled._cache_size() == before, "the final pass compiled shapes its estimate did not"
    assert len(layouts) == 1 and errors["test"] == trainer.errors["test"]


def test_size_buckets_hold_frames_within_the_ratio():
    from mlmd_lab.train.store import size_buckets

    sizes = [3, 192, 5, 96, 3, 8, 500, 6, 250]
    buckets = size_buckets(sizes)
    assert sorted(np.concatenate(buckets).tolist()) == list(range(len(sizes)))
    for rows in buckets:
        chosen = np.asarray(sizes)[rows]
        assert chosen.max() <= 2 * chosen.min() and np.all(np.diff(rows) > 0)
    assert [sorted(np.asarray(sizes)[r].tolist()) for r in buckets] == [[3, 3, 5, 6], [8], [96, 192], [250, 500]]


def test_records_that_cannot_fit_in_memory_are_refused_with_the_fix(monkeypatch):
    class Tight:
        available = 4096

    monkeypatch.setattr(trainer_module.psutil, "virtual_memory", lambda: Tight())
    frames = emt_frames(12, seed=10)
    with pytest.raises(MLMDError, match="use feature_storage='disk'"):
        Trainer(frames, force_fraction=1.0, feature_storage="memory", **FAST).write_data()
