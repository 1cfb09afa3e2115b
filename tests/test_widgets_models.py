"""ModelBrowser against the real MongoDB-wire server (Python side), and in a real browser."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase.build import bulk
from pymongo import MongoClient
from test_db_access import PASSWORDS

import mlmd_lab
from mlmd_lab.db import server
from mlmd_lab.db.store import Database
from mlmd_lab.potentials import HDNNP
from mlmd_lab.widgets import ModelBrowser

QUERY = {"$and": [{"elements": "Cu"}], "chemsys": {"$in": ["Cu"]}}
ERRORS = {"train": {"energy_rmse": 0.0012, "force_rmse": 0.045},
          "validation": {"energy_rmse": 0.0021, "force_rmse": 0.0625},
          "test": {"energy_rmse": 0.0034, "force_rmse": 0.0781}}


def _model(seed: int = 0) -> HDNNP:
    """A small random Cu potential with non-trivial weights (energies differ between structures)."""
    model = HDNNP.create(["Cu"], cutoff=4.0, hidden=(4,), activations="tl", seed=seed)
    rng = np.random.default_rng(seed + 5)
    model.networks = {e: [(W + rng.normal(0, 0.3, np.shape(W)), b + rng.normal(0, 0.1, np.shape(b)))
                          for W, b in layers] for e, layers in model.networks.items()}
    for e, stats in model.scaling_stats.items():  # wide ranges: the test structures are not extrapolations
        n = len(stats)
        model.scaling_stats[e] = np.stack([-1e3 * np.ones(n), 1e3 * np.ones(n), rng.uniform(0, 3, n),
                                           rng.uniform(0.5, 2.0, n)], axis=1)
    model._cache.clear()
    return model


def _structures() -> list:
    frames = []
    for seed in (1, 2):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
        atoms.rattle(0.08, seed=seed)
        frames.append(atoms)
    return frames


@pytest.fixture
def saved(db):
    """Two names: 'cu-emt' (versions 1 and 2, with errors and provenance) and 'cu-plain' (no errors)."""
    model = _model()
    meta = {"query": QUERY, "errors": ERRORS, "frame_ids": {"train": ["a" * 64] * 8, "validation": ["b" * 64] * 2},
            "config": {"epochs": 5, "learning_rate": 0.001}}
    db.models.save(_model(seed=3), "cu-emt", description="first try")
    db.models.save(model, "cu-emt", description="EMT copper, second try", tags=["demo"], metadata=meta)
    db.models.save(_model(seed=4), "cu-plain")
    return model


def test_table_details_and_versions(db, saved):
    browser = ModelBrowser(db)
    assert [(r.name, r.version) for r in browser.records] == [("cu-emt", 2), ("cu-plain", 1)]
    first, second = (text for text, _ in browser.table.options)
    assert first.startswith("cu-emt") and "3.4" in first and "78.1" in first and "EMT copper, second try" in first
    assert "Cu" in first and browser.records[0].created.strftime("%Y-%m-%d") in first
    assert second.startswith("cu-plain") and "-" in second
    assert browser.load_button.disabled and browser.export_button.disabled
    assert "2 models" in browser.status_text

    browser.table.value = 0
    details = browser.details.value
    assert "cu-emt v2" in details and "mlmd-model-errors" in details
    for number in ("1.2", "45", "2.1", "62.5", "3.4", "78.1"):  # meV/atom and meV/Å per split
        assert f"<td>{number}</td>" in details, number
    assert "frame ids (train)</th><td>8" in details and "frame ids (validation)</th><td>2" in details
    assert "&quot;$and&quot;" in details and "learning_rate" in details  # query and config as JSON
    assert "jax" in details and "mlmd_lab" in details  # software versions
    assert not browser.load_button.disabled and "cu-emt v2 selected" in browser.status_text

    browser.all_versions.value = True  # keeps the selection
    assert [(r.name, r.version) for r in browser.records] == [("cu-emt", 1), ("cu-emt", 2), ("cu-plain", 1)]
    assert browser.table.value == 1 and browser.record.version == 2
    browser.table.value = 2
    assert "not recorded" in browser.details.value  # cu-plain has no errors


def test_load_gives_the_saved_model(db, saved):
    browser = ModelBrowser(db)
    browser.table.value = 0
    browser.load_button.click()
    assert isinstance(browser.model, HDNNP) and browser.model.metadata["query"] == QUERY
    assert browser.status_text.startswith("loaded cu-emt v2 (HDNNP; elements Cu; cutoff 4 Å) as .model")
    frames = _structures()
    expected = [r["energy"] for r in saved.predict(frames, stress=False)]
    got = [r["energy"] for r in browser.model.predict(frames, stress=False)]
    assert abs(expected[0] - expected[1]) > 1e-6  # the check can tell structures apart
    np.testing.assert_array_equal(got, expected)


def test_export_writes_n2p2_files(db, saved, tmp_path):
    browser = ModelBrowser(db)
    browser.table.value = 0
    browser.folder.value = str(tmp_path / "nnp")
    browser.export_button.click()
    out = tmp_path / "nnp"
    names = sorted(p.name for p in out.iterdir())
    assert names == ["input.nn", "provenance.json", "scaling.data", "weights.029.data"]
    assert browser.exported == out.resolve() and str(out.resolve()) in browser.status_text
    assert "input.nn" in browser.status_text and "weights.029.data" in browser.status_text
    assert json.loads((out / "provenance.json").read_text())["version"] == 2
    reloaded = HDNNP.from_n2p2(out, "eV", "Angstrom")
    frames = _structures()
    np.testing.assert_array_equal([r["energy"] for r in reloaded.predict(frames, stress=False)],
                                  [r["energy"] for r in saved.predict(frames, stress=False)])

    (tmp_path / "afile").write_text("x")
    browser.folder.value = str(tmp_path / "afile")
    browser.export_button.click()
    assert "is a file, not a folder" in browser.status_text and "mlmd-status-error" in browser.status.value


def test_messages_without_models_or_selection(db):
    browser = ModelBrowser(db)
    assert browser.records == [] and "no models saved yet" in browser.status_text
    browser.load()
    assert "no model selected" in browser.status_text and browser.model is None
    browser.export()
    assert "no model selected" in browser.status_text and browser.exported is None


def test_model_deleted_after_listing_is_a_message(db, saved):
    browser = ModelBrowser(db)
    browser.table.value = 1
    db.models.delete("cu-plain", 1)
    browser.load_button.click()
    assert browser.status_text.startswith("loading the model failed: no model named 'cu-plain'")


def test_unreachable_server_is_a_message():
    client = MongoClient("mongodb://127.0.0.1:9/", serverSelectionTimeoutMS=300, connectTimeoutMS=300)
    try:
        browser = ModelBrowser(Database(client, "nowhere", uri="mongodb://127.0.0.1:9/"))
        assert browser.status_text.startswith("reading the model database failed: cannot reach the database")
        assert browser.records == []
    finally:
        client.close()


# -- in a real browser -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_model_browser_in_jupyterlab(run_notebook, db, saved):
    nb = run_notebook([
        "import mlmd_lab\nfrom mlmd_lab.widgets import ModelBrowser\n"
        f"db = mlmd_lab.connect(database={db.name!r})\n"
        "browser = ModelBrowser(db)\nbrowser",
    ])
    page = nb.page
    page.locator(".mlmd-model-browser").wait_for(timeout=60_000)
    options = page.locator(".mlmd-model-table select option")
    options.nth(1).wait_for(state="attached", timeout=30_000)
    assert options.count() == 2 and options.first.inner_text().startswith("cu-emt")
    nb.screenshot("rendered")

    page.locator(".mlmd-model-table select").select_option(index=0)
    page.locator(".mlmd-model-details", has_text="62.5").wait_for(timeout=30_000)
    page.locator(".mlmd-model-load").click()
    page.locator(".mlmd-model-status", has_text="loaded cu-emt v2 (HDNNP; elements Cu").wait_for(timeout=60_000)
    nb.screenshot("loaded")
    nb.assert_no_console_errors()


# -- with accounts -------------------------------------------------------------------------------------------
CREDIT = [{"owner": "alice", "dataset": "cu-public", "licence": "CC-BY-4.0", "frames": 5}]


@pytest.fixture(scope="module")
def accounts(tmp_path_factory):
    """An embedded server with accounts (alice and bob in group 'lab', carol alone) where alice saved
    'cu-private' (private), 'cu-group' (group 'lab') and 'cu-public' (public, credited to her data set)."""
    handle = server.start(tmp_path_factory.mktemp("model-accounts"), auth=True)
    try:
        admin = mlmd_lab.connect(handle.uri)
        uris = {name: admin.users.create(name, PASSWORDS[name], groups=groups)
                for name, groups in (("alice", ["lab"]), ("bob", ["lab"]), ("carol", []))}
        alice = mlmd_lab.connect(uris["alice"])
        alice.models.save(_model(seed=1), "cu-private")
        alice.models.save(_model(seed=2), "cu-group", visibility="group")
        alice.models.save(_model(seed=3), "cu-public", visibility="public", metadata={"credit": CREDIT})
        yield {name: mlmd_lab.connect(uri) for name, uri in uris.items()}
    finally:
        handle.stop()


@pytest.mark.xdist_group("model_accounts")
def test_details_show_owner_visibility_and_credit(accounts):
    carol = ModelBrowser(accounts["carol"])
    assert [r.name for r in carol.records] == ["cu-public"]  # alice's private and group models are not listed
    carol.table.value = 0
    details = carol.details.value
    assert "trained on alice&#x27;s data set &#x27;cu-public&#x27; (5 frames, CC-BY-4.0)" in details
    assert "<th>owner</th><td>alice</td>" in details and "<th>visibility</th><td>public</td>" in details

    bob = ModelBrowser(accounts["bob"])
    assert [r.name for r in bob.records] == ["cu-group", "cu-public"]
    bob.table.value = 0
    details = bob.details.value
    assert "<th>owner</th><td>alice</td>" in details and "<th>visibility</th><td>group:lab</td>" in details
    assert "no data-set record" in details  # saved without credit: said so, not left out

    alice = ModelBrowser(accounts["alice"])
    assert [r.name for r in alice.records] == ["cu-group", "cu-private", "cu-public"]
    alice.table.value = 1
    assert "<th>owner</th><td>alice</td>" in alice.details.value
    assert "<th>visibility</th><td>private</td>" in alice.details.value
