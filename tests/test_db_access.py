"""Accounts, groups and visibility against the real embedded server with authentication on.

Every test tries to break in as an attacker would: with the API and with raw pymongo on the databases,
collections and commands a user can name. The server, not mlmd_lab, must refuse.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pymongo
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write
from pymongo.errors import OperationFailure

import mlmd_lab
from mlmd_lab.db import access, server
from mlmd_lab.errors import DatabaseError, MLMDError

pytestmark = pytest.mark.xdist_group("db_access")

PASSWORDS = {"alice": "alice-Secret-pw-1", "bob": "bob-Secret-pw-22", "carol": "carol-Secret-pw-333",
             "dave": "dave-Secret-pw-4444"}
EMT_SETTINGS = {"code": "emt", "xc": "EMT"}
COLLECTIONS = ("frames", "calculations", "signatures", "models", "models.files", "models.chunks", "released")


def emt_file(path: Path, element: str, n: int, seed: int) -> Path:
    """``n`` rattled fcc cells of ``element`` labelled with EMT, as extxyz (eV, Å)."""
    rng = np.random.default_rng(seed)
    a = {"Cu": 3.6, "Al": 4.05, "Ni": 3.52}[element]
    frames = []
    for _ in range(n):
        atoms = bulk(element, "fcc", a=a * rng.uniform(0.98, 1.02), cubic=True)
        atoms.positions += rng.normal(scale=0.08, size=atoms.positions.shape)
        atoms.calc = EMT()
        results = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}
        atoms.calc = SinglePointCalculator(atoms, **results)
        frames.append(atoms)
    path.parent.mkdir(parents=True, exist_ok=True)
    write(path, frames, format="extxyz")
    return path


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A shared database with accounts: alice and bob in group 'lab', carol alone, dave in 'lab' too."""
    data_dir = tmp_path_factory.mktemp("hub")
    handle = server.start(data_dir, auth=True)
    admin = mlmd_lab.connect(handle.uri)
    uris = {"alice": admin.users.create("alice", PASSWORDS["alice"], groups=["lab"]),
            "bob": admin.users.create("bob", PASSWORDS["bob"], groups=["lab"]),
            "carol": admin.users.create("carol", PASSWORDS["carol"]),
            "dave": admin.users.create("dave", PASSWORDS["dave"], groups=["lab"])}
    files = tmp_path_factory.mktemp("hub-files")
    alice = mlmd_lab.connect(uris["alice"])
    alice.ingest(emt_file(files / "cu-private.xyz", "Cu", 6, 1), settings=EMT_SETTINGS, progress=False)
    alice.ingest(emt_file(files / "cu-group.xyz", "Cu", 5, 2), settings=EMT_SETTINGS, progress=False,
                 visibility="group", group="lab")
    yield {"handle": handle, "admin": admin, "uris": uris, "files": files, "data_dir": data_dir}
    handle.stop()


def raw(uri: str) -> pymongo.MongoClient:
    return pymongo.MongoClient(str(uri), serverSelectionTimeoutMS=5000)


def refused(call) -> None:
    """The server refuses ``call`` (not authorised), whatever the client library does."""
    with pytest.raises(OperationFailure) as err:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, dict | str):
            list(result)
    assert err.value.code in (13, 18) or "not authorized" in str(err.value) or "requires authentication" in str(
        err.value), str(err.value)


# -- authentication -----------------------------------------------------------------------------------
def test_unauthenticated_and_wrong_password_connections_are_refused(hub):
    port = hub["handle"].port
    anonymous = pymongo.MongoClient(f"mongodb://127.0.0.1:{port}/?directConnection=true",
                                    serverSelectionTimeoutMS=5000)
    for db in ("mlmd_u_alice", "mlmd_p_alice", "mlmd_directory", "admin"):
        refused(lambda db=db: anonymous[db].frames.find_one())
    refused(lambda: anonymous.list_database_names())
    with pytest.raises(DatabaseError) as err:
        mlmd_lab.connect(f"mongodb://127.0.0.1:{port}/?directConnection=true")
    assert "requires a login" in str(err.value)
    wrong = str(hub["uris"]["bob"]).replace(PASSWORDS["bob"], "not-bobs-password")
    with pytest.raises(DatabaseError) as err:
        mlmd_lab.connect(wrong)
    assert "not-bobs-password" not in str(err.value) and "refused the login" in str(err.value)
    # connect() without a URI never serves an accounts folder without authentication
    with pytest.raises(DatabaseError, match="accounts"):
        mlmd_lab.connect(data_dir=hub["data_dir"])


# -- private data --------------------------------------------------------------------------------------
def test_other_users_cannot_read_private_data_by_api_or_raw_pymongo(hub):
    alice = mlmd_lab.connect(hub["uris"]["alice"])
    assert len(alice.frames(dataset="cu-private.xyz")) == 6
    carol = mlmd_lab.connect(hub["uris"]["carol"])
    assert len(carol.frames(elements=["Cu"])) == 0
    assert carol.count() == 0 and carol.summary().frames == 0 and carol.datasets() == []
    assert carol.calculations() == [] and carol.models.names() == {}
    client = raw(hub["uris"]["carol"])
    for db in ("mlmd_u_alice", "mlmd_g_lab_alice", "mlmd_e_alice", "mlmd", "admin", "config", "local"):
        for name in COLLECTIONS:
            coll = client[db][name]
            refused(lambda coll=coll: coll.find({}))
            refused(lambda coll=coll: coll.find_one())
            refused(lambda coll=coll: coll.count_documents({}))
            refused(lambda coll=coll: coll.estimated_document_count())
            refused(lambda coll=coll: coll.distinct("_id"))
            refused(lambda coll=coll: coll.aggregate([{"$match": {}}]))
        refused(lambda db=db: client[db].list_collection_names())
    own = client["mlmd_u_carol"]
    own.frames.insert_one({"x": 1})
    # $lookup/$unionWith reach only the caller's own database (or fail outright)
    for stage in ({"$lookup": {"from": {"db": "mlmd_u_alice", "coll": "frames"}, "pipeline": [], "as": "z"}},
                  {"$unionWith": {"db": "mlmd_u_alice", "coll": "frames"}},
                  {"$lookup": {"from": "mlmd_u_alice.frames", "localField": "x", "foreignField": "natoms",
                               "as": "z"}}):
        try:
            rows = list(own.frames.aggregate([stage]))
        except OperationFailure:
            continue
        assert all(not row.get("z") for row in rows) and len(rows) == 1, stage
    refused(lambda: client.list_database_names())
    refused(lambda: client.admin["system.users"].find_one())
    refused(lambda: client.admin["system.roles"].find_one())
    refused(lambda: client.admin.command("usersInfo", "alice"))


def test_other_users_cannot_insert_update_delete_or_drop_data_of_others(hub):
    client = raw(hub["uris"]["bob"])  # bob shares group 'lab' with alice: he may only read her group data
    for db in ("mlmd_u_alice", "mlmd_g_lab_alice", "mlmd_p_alice", "mlmd_e_alice", "mlmd_directory"):
        coll = client[db].frames
        refused(lambda coll=coll: coll.insert_one({"owner": "alice", "dataset": "forged"}))
        refused(lambda coll=coll: coll.update_many({}, {"$set": {"energy": 0.0}}))
        refused(lambda coll=coll: coll.delete_many({}))
        refused(lambda coll=coll: coll.drop())
        refused(lambda db=db: client.drop_database(db))
        refused(lambda db=db: client[db].frames.create_index("energy"))
    refused(lambda: client.admin.command("renameCollection", "mlmd_g_lab_alice.frames", to="mlmd_u_bob.stolen"))
    own = client["mlmd_u_bob"].frames
    own.insert_one({"y": 1})
    for stage in ({"$out": {"db": "mlmd_g_lab_alice", "coll": "frames"}},
                  {"$merge": {"into": {"db": "mlmd_u_alice", "coll": "frames"}}}):
        refused(lambda stage=stage: own.aggregate([stage]))
    alice = mlmd_lab.connect(hub["uris"]["alice"])
    assert len(alice.frames(dataset="cu-group.xyz")) == 5 and len(alice.frames(dataset="cu-private.xyz")) == 6


def test_users_cannot_create_views_users_or_roles_or_grant_themselves_roles(hub):
    client = raw(hub["uris"]["bob"])
    refused(lambda: client["mlmd_u_bob"].command("create", "v", viewOn="frames", pipeline=[]))
    refused(lambda: client["mlmd_u_bob"].command("create", "v", viewOn="frames",
                                                  pipeline=[{"$unionWith": "frames"}]))
    refused(lambda: client["mlmd_g_lab_alice"].command("create", "v", viewOn="frames", pipeline=[]))
    refused(lambda: client.admin.command("createUser", "eve", pwd="eve-Secret-pw-5", roles=["root"]))
    refused(lambda: client["mlmd_u_bob"].command("createUser", "eve", pwd="eve-Secret-pw-5", roles=[]))
    refused(lambda: client.admin.command("createRole", "r", privileges=[], roles=[]))
    refused(lambda: client.admin.command("grantRolesToUser", "bob", roles=["root"]))
    refused(lambda: client.admin.command("grantPrivilegesToRole", "mlmd_user_bob", privileges=[
        {"resource": {"db": "mlmd_u_alice", "collection": ""}, "actions": ["find"]}]))
    refused(lambda: client.admin.command("updateUser", "alice", pwd="taken-over-pw-99"))
    bob = mlmd_lab.connect(hub["uris"]["bob"])
    with pytest.raises(DatabaseError, match="administrator"):
        bob.users.create("eve", "eve-Secret-pw-5")
    with pytest.raises(DatabaseError, match="administrator"):
        bob.groups.create("bobs-own")
    with pytest.raises(DatabaseError, match="administrator"):
        bob.users.add_to_group("bob", "admins")


def test_owner_cannot_be_forged(hub, tmp_path):
    bob_raw = raw(hub["uris"]["bob"])
    refused(lambda: bob_raw["mlmd_p_alice"].frames.insert_one({"owner": "alice"}))
    bob = mlmd_lab.connect(hub["uris"]["bob"])
    forged = emt_file(tmp_path / "forged.xyz", "Ni", 2, 9)
    bob.ingest(forged, settings=EMT_SETTINGS, progress=False, dataset="alice-nickel")
    bob.frames_collection.update_many({}, {"$set": {"owner": "alice", "visibility": "public"}})  # his own db
    bob.publish("alice-nickel")
    carol = mlmd_lab.connect(hub["uris"]["carol"])
    nickel = carol.frames(elements=["Ni"])
    assert len(nickel) == 2 and {a.info["owner"] for a in nickel} == {"bob"}
    assert {d["owner"] for d in carol.datasets() if d["dataset"] == "alice-nickel"} == {"bob"}


# -- groups ----------------------------------------------------------------------------------------------
def test_group_members_see_group_data_and_lose_it_on_the_next_query_after_leaving(hub, tmp_path):
    admin = hub["admin"]
    dave = mlmd_lab.connect(hub["uris"]["dave"])
    dave.ingest(emt_file(tmp_path / "dave-ni.xyz", "Ni", 2, 31), settings=EMT_SETTINGS, progress=False,
                visibility="group")
    bob = mlmd_lab.connect(hub["uris"]["bob"])
    carol = mlmd_lab.connect(hub["uris"]["carol"])
    before = dave.frames(dataset="cu-group.xyz")
    assert len(before) == 5 and {a.info["owner"] for a in before} == {"alice"}
    assert {a.info["visibility"] for a in before} == {"group"} and {a.info["group"] for a in before} == {"lab"}
    assert len(carol.frames(dataset="cu-group.xyz")) == 0  # not a member
    dave_raw = raw(hub["uris"]["dave"])
    assert dave_raw["mlmd_g_lab_alice"].frames.count_documents({}) == 5
    admin.users.remove_from_group("dave", "lab")
    # the same open connections, the very next query
    assert len(dave.frames(dataset="cu-group.xyz")) == 0 and dave.count(elements=["Cu"]) == 0
    refused(lambda: dave_raw["mlmd_g_lab_alice"].frames.find_one())
    # what dave shared stays shared with the group (API and server agree), and stays his
    assert {a.info["owner"] for a in bob.frames(dataset="dave-ni.xyz")} == {"dave"}
    assert raw(hub["uris"]["bob"])["mlmd_g_lab_dave"].frames.count_documents({}) == 2
    assert len(dave.frames(dataset="dave-ni.xyz")) == 2
    admin.users.add_to_group("dave", "lab")
    assert len(dave.frames(dataset="cu-group.xyz")) == 5


def test_deleted_user_loses_everything_in_open_sessions(hub, tmp_path):
    admin = hub["admin"]
    uri = admin.users.create("mallory", "mallory-Secret-pw-1", groups=["lab"])
    mallory = mlmd_lab.connect(uri)
    mallory_raw = raw(uri)
    mallory.ingest(emt_file(tmp_path / "m.xyz", "Cu", 2, 5), settings=EMT_SETTINGS, progress=False)
    assert mallory_raw["mlmd_g_lab_alice"].frames.count_documents({}) == 5
    admin.users.delete("mallory")
    refused(lambda: mallory_raw["mlmd_g_lab_alice"].frames.find_one())
    refused(lambda: mallory_raw["mlmd_u_mallory"].frames.find_one())
    refused(lambda: mallory_raw["mlmd_p_alice"].frames.find_one())
    with pytest.raises(DatabaseError):
        mlmd_lab.connect(uri)
    with pytest.raises(MLMDError, match="deleted account"):  # a new account must not inherit mallory's data
        admin.users.create("mallory", "mallory-Secret-pw-2")


# -- publishing ------------------------------------------------------------------------------------------
def test_embargoed_data_stays_hidden_until_its_date(hub, tmp_path):
    alice = mlmd_lab.connect(hub["uris"]["alice"])
    alice.ingest(emt_file(tmp_path / "cu-embargo.xyz", "Cu", 3, 7), settings=EMT_SETTINGS, progress=False)
    until = datetime.now(UTC) + timedelta(seconds=4)
    assert alice.publish("cu-embargo.xyz", embargo_until=until) == 3
    carol = mlmd_lab.connect(hub["uris"]["carol"])
    carol_raw = raw(hub["uris"]["carol"])
    assert len(carol.frames(dataset="cu-embargo.xyz")) == 0
    refused(lambda: carol_raw["mlmd_e_alice"].frames.find_one())
    assert carol_raw["mlmd_p_alice"].frames.count_documents({"dataset": "cu-embargo.xyz"}) == 0
    mine = alice.frames(dataset="cu-embargo.xyz")
    assert len(mine) == 3 and all(a.info["embargo_until"] > datetime.now(UTC) for a in mine)
    assert hub["admin"].release_all_embargoes() == 0  # not yet
    time.sleep(max(0.0, (until - datetime.now(UTC)).total_seconds()) + 0.5)
    assert len(carol.frames(dataset="cu-embargo.xyz")) == 0  # due, not yet released
    assert hub["admin"].release_all_embargoes() == 3  # the administrator's daily job
    assert len(carol.frames(dataset="cu-embargo.xyz")) == 3
    assert len(alice.frames(dataset="cu-embargo.xyz")) == 3  # no duplicate for the owner
    assert alice.count(dataset="cu-embargo.xyz") == 3
    assert [d["frames"] for d in alice.datasets() if d["dataset"] == "cu-embargo.xyz"] == [3]
    with pytest.raises(MLMDError, match="36 months"):
        alice.publish("cu-private.xyz", embargo_until=datetime.now(UTC) + timedelta(days=4 * 365))


def test_published_data_is_append_only_and_retraction_is_recorded(hub, tmp_path):
    alice = mlmd_lab.connect(hub["uris"]["alice"])
    alice.ingest(emt_file(tmp_path / "cu-pub.xyz", "Cu", 2, 8), settings=EMT_SETTINGS, progress=False,
                 visibility="public")
    alice_raw = raw(hub["uris"]["alice"])
    assert alice_raw["mlmd_p_alice"].frames.count_documents({"dataset": "cu-pub.xyz"}) == 2
    refused(lambda: alice_raw["mlmd_p_alice"].frames.update_many({}, {"$set": {"energy": 0.0}}))
    refused(lambda: alice_raw["mlmd_p_alice"].frames.delete_many({}))
    with pytest.raises(MLMDError, match="published"):
        alice.share("cu-pub.xyz", "lab")
    admin = hub["admin"]
    with pytest.raises(MLMDError, match="reason"):
        admin.retract("alice", "cu-pub.xyz", "")
    assert admin.retract("alice", "cu-pub.xyz", "wrong cell") == 2
    again = alice.ingest(tmp_path / "cu-pub.xyz", settings=EMT_SETTINGS, progress=False)
    assert again.added == 0 and again.calculations_skipped == 1  # published content is known, not re-added
    record = raw(hub["uris"]["carol"])["mlmd_directory"].retractions.find_one({"dataset": "cu-pub.xyz"})
    assert record["owner"] == "alice" and record["reason"] == "wrong cell" and record["frames"] == 2
    assert len(mlmd_lab.connect(hub["uris"]["carol"]).frames(dataset="cu-pub.xyz")) == 0
    assert {a.info["visibility"] for a in alice.frames(dataset="cu-pub.xyz")} == {"private"}


# -- data recycling ----------------------------------------------------------------------------------------
def test_data_recycling_c_trains_an_ab_potential_on_a_and_b_published_data_with_credit(hub, tmp_path):
    from mlmd_lab.train import Trainer

    alice = mlmd_lab.connect(hub["uris"]["alice"])
    bob = mlmd_lab.connect(hub["uris"]["bob"])
    alice.ingest(emt_file(tmp_path / "a" / "Cu-emt.xyz", "Cu", 12, 11), settings=EMT_SETTINGS, progress=False,
                 dataset="Cu-emt", visibility="public")
    bob.ingest(emt_file(tmp_path / "b" / "Al-emt.xyz", "Al", 12, 12), settings=EMT_SETTINGS, progress=False,
               dataset="Al-emt", visibility="public", licence="CC0-1.0")
    carol = mlmd_lab.connect(hub["uris"]["carol"])
    copper, aluminium = carol.frames(dataset="Cu-emt"), carol.frames(dataset="Al-emt")
    assert len(copper) == 12 and len(aluminium) == 12
    report = carol.compatible(copper, aluminium)
    assert report.ok, str(report)
    frames = carol.frames(elements=["Cu", "Al"], exclusive=True, settings={"code": "emt"})
    assert {a.info["owner"] for a in frames} >= {"alice", "bob"}
    trainer = Trainer(frames, max_epochs=2, n_radial=4, n_angular=1, zetas=(1.0,), hidden=(6, 6), cutoff=4.5,
                      progress=False)
    model = trainer.fit()
    record = carol.models.save(model, "CuAl-recycled", visibility="public")
    shown = carol.models.show("CuAl-recycled")
    credit = {(c["owner"], c["dataset"]): c for c in shown.credit}
    assert credit[("alice", "Cu-emt")]["licence"] == "CC-BY-4.0" and credit[("bob", "Al-emt")]["licence"] == "CC0-1.0"
    assert sum(c["frames"] for c in shown.credit) == len(frames)
    assert "alice's data set 'Cu-emt'" in shown.credit_text() and "bob's data set 'Al-emt'" in shown.credit_text()
    assert "credit" in str(shown) and record.owner == "carol"
    ids = set(shown.provenance["frame_ids"]["train"]) | set(shown.provenance["frame_ids"]["validation"])
    assert ids <= set(frames.ids)
    # the published model is everyone's to read and nobody's to delete
    assert mlmd_lab.connect(hub["uris"]["alice"]).models.record("CuAl-recycled").owner == "carol"
    with pytest.raises(MLMDError, match="published"):
        carol.models.delete("CuAl-recycled", 1)


def test_a_no_derivatives_licence_refuses_the_model_and_non_commercial_warns(hub, tmp_path):
    from mlmd_lab.train import Trainer

    bob = mlmd_lab.connect(hub["uris"]["bob"])
    bob.ingest(emt_file(tmp_path / "nd.xyz", "Ni", 6, 21), settings=EMT_SETTINGS, progress=False,
               dataset="Ni-nd", visibility="public", licence="CC-BY-ND-4.0")
    bob.ingest(emt_file(tmp_path / "nc.xyz", "Ni", 6, 22), settings=EMT_SETTINGS, progress=False,
               dataset="Ni-nc", visibility="public", licence="CC-BY-NC-4.0")
    carol = mlmd_lab.connect(hub["uris"]["carol"])
    fast = dict(max_epochs=1, n_radial=3, n_angular=1, zetas=(1.0,), hidden=(4, 4), cutoff=4.0, progress=False)
    nd = Trainer(carol.frames(dataset="Ni-nd"), **fast)
    with pytest.raises(MLMDError, match="forbids derived works"):
        carol.models.save(nd.fit(), "Ni-nd-model")
    assert "Ni-nd-model" not in carol.models.names()
    nc = Trainer(carol.frames(dataset="Ni-nc"), **fast)
    with pytest.warns(UserWarning, match="NON-COMMERCIAL"):
        carol.models.save(nc.fit(), "Ni-nc-model")
    with pytest.raises(MLMDError, match="licence"):
        bob.ingest(tmp_path / "nd.xyz", licence="all rights reserved", progress=False)


# -- secrets -------------------------------------------------------------------------------------------------
def test_passwords_appear_in_no_repr_message_log_or_file(hub, tmp_path, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    admin, handle = hub["admin"], hub["handle"]
    uri = admin.users.create("erin", "erin-Secret-pw-55", groups=["lab"])
    erin = mlmd_lab.connect(uri)
    texts = [repr(uri), uri._repr_html_(), repr(handle), repr(handle.uri), repr(admin), str(admin.users.list()),
             repr(erin), repr(erin.uri), f"{uri!r}", repr(erin.models), str(erin.datasets())]
    for bad in (lambda: admin.users.create("erin", "erin-Secret-pw-55"),
                lambda: admin.users.create("frank", "short"),
                lambda: admin.users.create("Bad Name", "long-enough-password"),
                lambda: mlmd_lab.connect(str(uri).replace("erin-Secret-pw-55", "erin-Wrong-pw-00"))):
        with pytest.raises((MLMDError, DatabaseError)) as err:
            bad()
        texts.append(str(err.value))
    out = capsys.readouterr()
    texts += [out.out, out.err, caplog.text]
    texts += [p.read_text(errors="replace") for p in hub["data_dir"].glob("*.log")]
    secret_file = hub["data_dir"] / "admin.secret"
    root_password = secret_file.read_text().strip()
    assert secret_file.stat().st_mode & 0o077 == 0  # the administrator's password: owner-only file
    for text in texts:
        for password in [*PASSWORDS.values(), "erin-Secret-pw-55", "erin-Wrong-pw-00", root_password]:
            assert password not in text, text
    assert str(uri).startswith("mongodb://erin:") and "erin-Secret-pw-55" in str(uri)  # usable when asked for
    assert "***" in repr(uri)


def test_names_and_passwords_are_checked_before_anything_is_created(hub):
    admin = hub["admin"]
    for name in ("a", "Alice", "al_ice", "al.ice", "x" * 40, "1abc"):
        with pytest.raises(MLMDError, match="not allowed"):
            admin.users.create(name, "long-enough-password")
    with pytest.raises(MLMDError, match="at least"):
        admin.users.create("shorty", "pw")
    assert "shorty" not in admin.users.list()
    with pytest.raises(MLMDError, match="not a member"):
        mlmd_lab.connect(hub["uris"]["carol"]).share("anything", "lab")
    assert access.user_uri("mongodb://root:x@h:1/?directConnection=true&authSource=admin", "bob", "p@ss") == \
        "mongodb://bob:p%40ss@h:1/?authSource=admin&directConnection=true"


def test_cli_users_add_list_group_delete_never_print_a_password(hub, tmp_path, monkeypatch, capsys):
    from mlmd_lab.cli import main

    monkeypatch.setenv("MLMD_MONGODB_URI", str(hub["handle"].uri))
    secret = tmp_path / "pw"
    secret.write_text("grace-Secret-pw-77\n")
    uri_file = tmp_path / "grace.uri"
    assert main(["users", "add", "grace", "--group", "lab", "--password-file", str(secret),
                 "--uri-file", str(uri_file)]) == 0
    assert uri_file.stat().st_mode & 0o077 == 0
    assert main(["users", "add", "henry", "--generate", "--uri-file", str(tmp_path / "henry.uri")]) == 0
    assert main(["users", "add", "ivy", "--generate"]) == 2  # nowhere to put the password
    assert main(["users", "list"]) == 0
    assert main(["users", "group", "grace", "--remove", "lab"]) == 0
    assert main(["users", "delete", "henry", "--yes"]) == 0
    out = capsys.readouterr()
    henry_uri = (tmp_path / "henry.uri").read_text().strip()
    henry_password = henry_uri.split("//", 1)[1].split("@", 1)[0].split(":", 1)[1]
    for text in (out.out, out.err):
        assert "grace-Secret-pw-77" not in text and henry_password not in text
    listed = hub["admin"].users.list()
    assert listed["grace"] == [] and "henry" not in listed and "ivy" not in listed
    grace = mlmd_lab.connect(uri_file.read_text().strip())
    assert grace.user == "grace" and grace.managed
    monkeypatch.setenv("MLMD_MONGODB_URI", uri_file.read_text().strip())  # how a spawner hands it over
    assert mlmd_lab.connect().user == "grace"
    assert main(["users", "list"]) == 2  # grace is no administrator
    assert "administrator" in capsys.readouterr().err


def test_a_set_up_with_an_intruder_is_detected(tmp_path):
    """Between creating the administrator and restarting with --auth, the server runs for a moment without
    authentication; a local process that made itself a user then would be noticed (and the folder wiped)."""
    from mlmd_lab.db.server import EmbeddedServer, untrusted_setup

    embedded = EmbeddedServer(tmp_path)
    info = embedded.ensure_running(register=False)
    try:
        client = pymongo.MongoClient(info.uri, serverSelectionTimeoutMS=5000)
        client.admin.command("createUser", "root", pwd="root-Secret-pw-1", roles=["root"])
        assert untrusted_setup(client) is None
        client.admin.command("createUser", "intruder", pwd="intruder-pw-1234", roles=["root"])
        assert "intruder" in untrusted_setup(client)
        client.admin.command("dropUser", "intruder")
        client["loot"].x.insert_one({})
        assert "loot" in untrusted_setup(client)
    finally:
        embedded.stop()
