"""The potential database (``db.models``) on a real MongoDB-wire server: save, find, load, export, delete."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from bson import Binary
from conftest import random_cu_s_model

from mlmd_lab.cli import main
from mlmd_lab.db import models as models_module
from mlmd_lab.errors import DatabaseError, MLMDError
from mlmd_lab.potentials import HDNNP
from mlmd_lab.train import Ensemble

QUERY = {"$and": [{"elements": "Cu"}, {"elements": "S"}], "chemsys": {"$in": ["Cu", "Cu-S", "S"]},
         "natoms": {"$gte": 4}}
ERRORS = {"train": {"energy_rmse": 0.0012, "force_rmse": 0.045},
          "validation": {"energy_rmse": np.float64(0.0021), "force_rmse": 0.0625}}


def _structures() -> list[Atoms]:
    rng = np.random.default_rng(1)
    cu = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
    cu.rattle(0.05, seed=2)
    grid = np.array([(i, j, k) for i in range(3) for j in range(2) for k in range(2)], float) * 2.3
    cu2s = Atoms("Cu8S4", positions=grid + rng.normal(0, 0.1, grid.shape), cell=[6.9, 4.6, 4.6], pbc=True)
    return [cu, cu2s]


def _model(seed: int = 0) -> HDNNP:
    """A random Cu–S potential with non-trivial weights and scaling statistics.

    The statistics are random rather than from ``fit_scaling`` (which costs ~5 s of eager JAX here); their
    wide min/max keep the test structures inside the "training range", so no extrapolation warnings.
    """
    model = random_cu_s_model(seed)
    model.metadata = {"n_frames": 2, "config": {"epochs": 3, "seed": seed}}
    return model


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """JAX's persistent compilation cache for this module: every loaded model is a new HDNNP whose jitted
    evaluation would otherwise compile again (~3 s each); identical programs now compile once."""
    import jax

    try:
        from jax._src import compilation_cache as cc
    except ImportError:  # private module moved: the tests still pass, only slower
        yield
        return
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    saved = {name: getattr(jax.config, name) for name in names}
    for name, value in zip(names, (str(tmp_path_factory.mktemp("jax-cache")), 0.0, 0), strict=True):
        jax.config.update(name, value)
    cc.reset_cache()
    yield
    for name, value in saved.items():
        jax.config.update(name, value)
    cc.reset_cache()


@pytest.fixture(scope="module")
def frames() -> list[Atoms]:
    return _structures()


@pytest.fixture(scope="module")
def model() -> HDNNP:
    return _model()


def _assert_same_predictions(a, b, frames) -> None:
    for ra, rb in zip(a.predict(frames), b.predict(frames), strict=True):
        np.testing.assert_array_equal(ra["energy"], rb["energy"])
        np.testing.assert_array_equal(ra["forces"], rb["forces"])
        np.testing.assert_array_equal(ra["stress"], rb["stress"])


def test_save_load_identical_predictions_and_record(db, model, frames):
    assert np.ptp([r["energy"] / len(a) for r, a in zip(model.predict(frames), frames, strict=True)]) > 1e-3
    rec = db.models.save(model, "CuS", description="test potential", tags=["demo"],
                         metadata={"query": QUERY, "errors": ERRORS, "frame_ids": ["a" * 64, "b" * 64],
                                   "signatures": {"abc123": {"code": "vasp", "encut": 520}}, "weights": np.ones(3),
                                   "counts": {3: np.int64(7)}})
    assert (rec.name, rec.version, rec.kind, rec.n_members, rec.elements) == ("CuS", 1, "hdnnp", 1, ["Cu", "S"])
    assert rec.cutoff == pytest.approx(4.0) and rec.architecture["hidden"] == [5, 5]
    assert rec.symmetry_functions == {e: len(model.functions[e]) for e in model.elements}
    assert {f["path"] for f in rec.files} == {"input.nn", "scaling.data", "weights.016.data", "weights.029.data"}
    assert all(len(f["sha256"]) == 64 for f in rec.files)

    loaded = db.models.load("CuS")
    assert isinstance(loaded, HDNNP) and loaded.metadata["query"] == QUERY
    _assert_same_predictions(model, loaded, frames)

    stored = db.models.record("CuS")
    prov = stored.provenance
    assert prov["query"] == QUERY and prov["frame_ids"] == ["a" * 64, "b" * 64] and prov["n_frames"] == 2
    assert prov["errors"]["validation"]["energy_rmse"] == 0.0021 and prov["weights"] == [1.0, 1.0, 1.0]
    assert prov["counts"] == {"3": 7} and prov["config"] == {"epochs": 3, "seed": 0}
    assert isinstance(stored.created, datetime) and stored.created.tzinfo is not None
    assert set(stored.software) >= {"mlmd_lab", "jax", "numpy", "ase", "python"}
    raw = db.mongo["models"].find_one({"name": "CuS"})
    assert isinstance(raw["provenance"]["query"]["__json__"], str)  # "$and" keys are stored as JSON text
    text = str(stored)
    assert "CuS v1" in text and "62.5" in text and "2.1" in text and "training frames  2" in text
    html = stored._repr_html_()
    assert "<table>" in html and "CuS" in html and "62.5" in html


def test_versions_increment_and_find(db, model):
    store = db.models
    assert [store.save(model, "CuS").version for _ in range(2)] == [1, 2]
    cu_only = HDNNP.create(["Cu"], cutoff=4.0, hidden=(3,), activations="tl")
    store.save(cu_only, "Cu-only", tags=["pure"])
    with ThreadPoolExecutor(4) as pool:  # concurrent saves never share a version
        versions = sorted(r.version for r in pool.map(lambda _: store.save(cu_only, "race"), range(4)))
    assert versions == [1, 2, 3, 4]

    def names(**kw):
        return [(r.name, r.version) for r in store.find(**kw)]

    assert names() == [("Cu-only", 1), ("CuS", 2), ("race", 4)]
    assert names(elements=["Cu", "S"]) == [("CuS", 2)]
    assert names(elements=["Cu"]) == [("Cu-only", 1), ("CuS", 2), ("race", 4)]
    assert names(elements=["Cu"], exclusive=True) == [("Cu-only", 1), ("race", 4)]
    assert names(elements="Cu S", exclusive=True) == [("Cu-only", 1), ("CuS", 2), ("race", 4)]
    assert names(elements=["S"], exclusive=True) == []
    assert names(tags=["pure"]) == [("Cu-only", 1)]
    assert names(name="CuS", latest_only=False) == [("CuS", 1), ("CuS", 2)]
    assert store.load("CuS", version=1).metadata == model.metadata

    store.delete("CuS", 2)
    assert names(name="CuS") == [("CuS", 1)]
    assert db.mongo["models.files"].count_documents({"metadata.model": "CuS"}) == 4


def test_export_is_byte_identical_and_readable(db, model, frames, tmp_path):
    db.models.save(model, "CuS", metadata={"query": QUERY})
    folder = db.models.export("CuS", tmp_path / "export")
    fresh = model.to_n2p2(tmp_path / "fresh")
    names = sorted(p.name for p in fresh.iterdir())
    assert sorted(p.name for p in folder.iterdir()) == sorted([*names, "provenance.json"])
    for name in names:
        assert (folder / name).read_bytes() == (fresh / name).read_bytes(), name
    _assert_same_predictions(model, HDNNP.from_n2p2(folder, "eV", "Angstrom"), frames)
    info = json.loads((folder / "provenance.json").read_text())
    assert info["name"] == "CuS" and info["version"] == 1 and info["provenance"]["query"] == QUERY
    assert info["energy_unit"] == "eV" and info["length_unit"] == "Angstrom"


def test_ensemble_round_trip(db, model, frames, tmp_path):
    member = _model(seed=1)
    member.metadata = {"seed": 1}
    ensemble = Ensemble([model, member], metadata={"errors": ERRORS})
    rec = db.models.save(ensemble, "committee", metadata={"note": "two seeds"})
    assert (rec.kind, rec.n_members) == ("ensemble", 2)
    assert {f["path"].split("/")[0] for f in rec.files} == {"member_0", "member_1"}
    loaded = db.models.load("committee")
    assert isinstance(loaded, Ensemble) and len(loaded) == 2
    assert loaded.metadata["note"] == "two seeds" and loaded.members[1].metadata == {"seed": 1}
    for ra, rb in zip(ensemble.predict(frames), loaded.predict(frames), strict=True):
        for key in ("energy", "forces", "energy_std", "forces_std"):
            np.testing.assert_array_equal(ra[key], rb[key])
    folder = db.models.export("committee", tmp_path / "c")
    assert (folder / "member_1" / "input.nn").is_file() and (folder / "provenance.json").is_file()


def test_corrupt_file_is_detected(db, model):
    rec = db.models.save(model, "CuS")
    entry = next(f for f in rec.files if f["path"] == "weights.029.data")
    chunks = db.mongo["models.chunks"]
    chunk = chunks.find_one({"files_id": entry["id"], "n": 0})
    data = bytearray(chunk["data"])
    data[-2] = ord("7") if data[-2] != ord("7") else ord("8")  # same length: only the checksum can tell
    chunks.update_one({"_id": chunk["_id"]}, {"$set": {"data": Binary(bytes(data))}})
    with pytest.raises(DatabaseError, match=r"weights\.029\.data.*CuS.*corrupt"):
        db.models.load("CuS")
    chunks.update_one({"_id": chunk["_id"]}, {"$set": {"data": Binary(bytes(data[:-5]))}})  # truncated chunk
    with pytest.raises(DatabaseError, match=r"weights\.029\.data.*corrupt"):
        db.models.load("CuS")


def test_missing_model_and_bad_input(db, model):
    with pytest.raises(MLMDError, match="no model named 'nope'.*none saved yet"):
        db.models.load("nope")
    db.models.save(model, "CuS")
    with pytest.raises(MLMDError, match="no model named 'nope'.*saved models: CuS"):
        db.models.record("nope")
    with pytest.raises(MLMDError, match="has no version 7; saved versions: 1"):
        db.models.load("CuS", version=7)
    with pytest.raises(MLMDError, match="can only save an HDNNP or an Ensemble"):
        db.models.save(object(), "x")
    with pytest.raises(MLMDError, match=r"provenance\.bad is a object"):
        db.models.save(model, "x", metadata={"bad": object()})
    assert db.mongo["models.files"].count_documents({"metadata.model": "x"}) == 0


def test_failed_insert_leaves_no_files(db, model, monkeypatch):
    store = db.models

    def refuse(doc):
        raise DatabaseError("simulated failure at insert")

    monkeypatch.setattr(store, "_insert_next_version", refuse)
    with pytest.raises(DatabaseError, match="simulated"):
        store.save(model, "CuS")
    assert db.mongo["models.files"].count_documents({}) == 0 and db.mongo["models"].count_documents({}) == 0


def test_large_provenance_goes_to_a_file(db, model, monkeypatch):
    monkeypatch.setattr(models_module, "PROVENANCE_INLINE_LIMIT", 10_000)
    monkeypatch.setattr(models_module, "ABRIDGED_ENTRY_LIMIT", 1_000)
    ids = [f"{k:064x}" for k in range(500)]
    db.models.save(model, "big", metadata={"frame_ids": ids, "query": QUERY})
    raw = db.mongo["models"].find_one({"name": "big"})
    assert "frame_ids" not in raw["provenance"] and "query" in raw["provenance"] and raw["provenance_file"]
    rec = db.models.record("big")
    assert rec.provenance["frame_ids"] == ids and rec.provenance["query"] == QUERY and rec.n_frames == 2
    assert db.models.load("big").metadata["frame_ids"] == ids
    db.models.delete("big", 1)
    assert db.mongo["models.files"].count_documents({}) == 0


def test_drop_removes_models(db, model):
    db.models.save(model, "CuS")
    assert {"models", "models.files", "models.chunks"} <= set(db.mongo.list_collection_names())
    db.drop()
    assert db.mongo.list_collection_names() == []
    assert db.models.find() == []


def test_cli_models_list_show_export(db, model, tmp_path, capsys):
    args = ["--uri", db.uri, "--database", db.name]
    assert main([*args, "models"]) == 0
    assert "no saved models" in capsys.readouterr().out
    db.models.save(model, "CuS", metadata={"errors": ERRORS})
    db.models.save(model, "CuS", metadata={"errors": ERRORS})
    assert main([*args, "models"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "val force RMSE (meV/Å)" in out[0] and len(out) == 2
    assert out[1].split()[:8] == ["CuS", "2", "Cu", "S", "hdnnp", "62.5", "2.10", out[1].split()[7]]
    assert main([*args, "models", "list", "--all", "--elements", "S"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3

    assert main([*args, "models", "show", "CuS", "--version", "1"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == 1 and shown["provenance"]["errors"]["validation"]["force_rmse"] == 0.0625

    assert main([*args, "models", "export", "CuS", str(tmp_path / "out")]) == 0
    assert "CuS v2" in capsys.readouterr().out and (tmp_path / "out" / "weights.016.data").is_file()

    assert main([*args, "models", "show", "missing"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mlmd-lab: error: no model named 'missing'") and err.count("\n") == 1


def test_record_shows_stress_errors_in_gpa():
    """stress_rmse (eV/Å³) is listed in GPa next to the energy and force errors; without it, no column."""
    from ase import units

    from mlmd_lab.db.models import ModelRecord

    errors = {"validation": {"energy_rmse": 0.002, "force_rmse": 0.05, "stress_rmse": 0.005},
              "test": {"energy_rmse": 0.003, "force_rmse": 0.06}}
    record = ModelRecord(name="Cu", version=1, kind="hdnnp", n_members=1, elements=["Cu"], energy_unit="eV",
                         length_unit="Angstrom", cutoff=6.0, provenance={"errors": errors})
    assert record.stress_rmse("validation") == pytest.approx(0.005 / units.GPa) and record.stress_rmse("test") is None
    text = str(record)
    assert "stress GPa" in text and f"{0.005 / units.GPa:.3g}" in text  # 0.801 GPa
    assert "<th>stress (GPa)</th>" in record._repr_html_()
    record.provenance = {"errors": {"test": errors["test"]}}
    assert "stress" not in str(record) and "stress" not in record._repr_html_()
