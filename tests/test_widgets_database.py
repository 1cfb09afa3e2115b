"""DatabaseBrowser and structure_view against the real MongoDB-wire server (Python side), and in a real browser."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write
from pymongo import MongoClient
from test_db_access import PASSWORDS, emt_file

import mlmd_lab
from mlmd_lab.db import server
from mlmd_lab.db.store import Database
from mlmd_lab.demo import bundled_example
from mlmd_lab.errors import MLMDError
from mlmd_lab.frameset import FrameSet
from mlmd_lab.widgets import DatabaseBrowser, structure_view
from mlmd_lab.widgets.structure import MAX_ARROW, force_arrows, show_structure

N_CU_AU = 24  # bundled example: 12 Cu32 + 12 Au8Cu24 frames (EMT), code ase-emt
N_AL = 5  # Al4 frames (EMT) declared as vasp/PBE and tagged "al"


def _al_frames(n: int = N_AL) -> list:
    frames = []
    for i in range(n):
        atoms = bulk("Al", "fcc", a=4.05, cubic=True)
        atoms.rattle(0.05, seed=i)
        atoms.calc = EMT()
        atoms.calc = SinglePointCalculator(atoms, energy=atoms.get_potential_energy(), forces=atoms.get_forces())
        frames.append(atoms)
    return frames


def fill(db: Database, folder: Path) -> None:
    """Two data sets of different settings: Cu/Au (ase-emt, EMT) and Al (vasp, PBE, tag 'al')."""
    db.ingest(bundled_example(folder, n_frames=N_CU_AU), settings={"code": "ase-emt", "xc": "EMT"},
              tags=["example"], progress=False)
    write(folder / "al.extxyz", _al_frames())
    db.ingest(folder / "al.extxyz", settings={"code": "vasp", "xc": "PBE", "encut": 520}, tags=["al"], progress=False)


@pytest.fixture
def filled(db, tmp_path):
    fill(db, tmp_path)
    return db


# -- structure view -------------------------------------------------------------------------------------------
def test_force_arrows_scale_largest_to_max_arrow():
    atoms = _al_frames(1)[0]
    forces = atoms.get_forces()
    arrows = force_arrows(atoms)
    largest = np.linalg.norm(forces, axis=1).max()
    assert arrows.max_force == pytest.approx(largest) and arrows.scale == pytest.approx(MAX_ARROW / largest)
    lengths = np.linalg.norm(arrows.ends - arrows.starts, axis=1)
    assert lengths.max() == pytest.approx(MAX_ARROW)
    np.testing.assert_allclose(arrows.ends - arrows.starts, arrows.scale * forces[: len(arrows)], atol=1e-12)
    assert len(force_arrows(bulk("Al"))) == 0  # no calculator: no arrows
    with pytest.raises(MLMDError, match=r"shape \(2, 3\).*4 atoms"):
        force_arrows(atoms, np.zeros((2, 3)))


def test_arrows_follow_the_pdb_frame_of_a_rotated_cell():
    """nglview gets PDB text, whose writer rotates a periodic cell into standard form: arrows must rotate too."""
    import io

    from ase.io import read

    from mlmd_lab.widgets.structure import pdb_frame

    atoms = bulk("Cu", "hcp", a=2.5, c=4.0).repeat((2, 2, 1))
    atoms.rattle(0.1, seed=3)
    atoms.rotate(30, "z", rotate_cell=True)
    atoms.calc = EMT()
    forces = atoms.get_forces()
    view = structure_view(atoms)
    shown, rotation = pdb_frame(atoms)
    assert not np.allclose(rotation, np.eye(3))
    sent = {c._ngl_msg["methodName"]: c._ngl_msg for c in view._ngl_displayed_callbacks_before_loaded}
    positions = read(io.StringIO(sent["loadFile"]["args"][0]["data"]), format="proteindatabank").positions
    tails = np.array([shape[1] for shape in sent["addShape"]["args"][1]])
    heads = np.array([shape[2] for shape in sent["addShape"]["args"][1]])
    np.testing.assert_allclose(tails, positions, atol=1e-3)  # arrows start on the atoms nglview draws
    np.testing.assert_allclose((heads - tails) / view.mlmd_force_scale, forces @ rotation.T, atol=1e-9)
    assert view.mlmd_force_scale == pytest.approx(MAX_ARROW / np.linalg.norm(forces, axis=1).max())


def test_structure_view_components_and_replace():
    al = _al_frames(1)[0]
    view = structure_view(al)
    assert "mlmd-structure" in view._dom_classes
    assert view._ngl_component_names == ["nglview.adaptor.ASEStructure", "nglview.shape.Shape"]
    assert view.mlmd_force_scale == pytest.approx(force_arrows(al).scale)
    first_ids = list(view._ngl_component_ids)
    molecule = bulk("Cu", "fcc", a=3.6, cubic=True)
    molecule.pbc = False
    arrows = show_structure(view, molecule)  # replaces, in the same widget; no forces, no cell: one component
    assert len(arrows) == 0 and view.mlmd_force_scale == 0.0
    assert len(view._ngl_component_ids) == 1 and view._ngl_component_ids[0] not in first_ids
    messages = [c._ngl_msg for c in view._ngl_displayed_callbacks_before_loaded]  # queued until displayed
    sent = [m["methodName"] for m in messages]
    assert sent.count("removeComponent") == 2 and sent.count("loadFile") == 2 and sent.count("addShape") == 1
    unitcell = [m for m in messages if m["methodName"] == "addRepresentation" and m["args"][0] == "unitcell"]
    assert len(unitcell) == 1  # only the periodic Al cell got one
    show_structure(view, al, forces=False)
    assert len(view._ngl_component_ids) == 1
    with pytest.raises(MLMDError, match="ase.Atoms"):
        show_structure(view, "Al")


# -- database browser (Python side) ----------------------------------------------------------------------------
def test_search_pages_and_table(filled):
    browser = DatabaseBrowser(filled, page_size=10)
    assert sorted(browser.element_buttons) == ["Al", "Au", "Cu"]
    assert [v for _, v in browser.code.options] == ["__any__", "ase-emt", "vasp"]
    assert [v for _, v in browser.xc.options] == ["__any__", "EMT", "PBE"]
    assert "29 labelled frames" in browser.header.value and browser.table.options == ()
    assert "press Search" in browser.status_text

    browser.search_button.click()
    assert browser.count == N_CU_AU + N_AL and browser.n_pages == 3
    assert browser.page_label.value == "page 1 of 3, 29 frames"
    assert len(browser.table.options) == 10 and len(browser.rows) == 10
    assert browser.prev_button.disabled and not browser.next_button.disabled
    row = browser.rows[0]
    assert set(row) >= {"formula", "natoms", "energy_per_atom", "max_force", "code", "xc", "source"}
    assert row["formula"] in ("Cu32", "Au8Cu24") and row["natoms"] == 32 and row["code"] == "ase-emt"
    first_line = browser.table.options[0][0]
    assert row["formula"] in first_line and f"{row['energy_per_atom']:.4f}" in first_line

    browser.next_button.click()
    browser.next_button.click()
    assert browser.page == 2 and len(browser.rows) == 9 and browser.next_button.disabled
    assert browser.page_label.value == "page 3 of 3, 29 frames"
    seen = set()
    for page in range(3):
        browser.go_to_page(page)
        seen.update(r["id"] for r in browser.rows)
    assert len(seen) == 29  # pages do not overlap

    browser.element_buttons["Au"].value = True
    browser.search_button.click()
    assert browser.count == 12 and {r["formula"] for r in browser.rows} == {"Au8Cu24"}
    assert list(browser._formula_bars.x) == ["AuCu3"] and list(browser._formula_bars.y) == [12]
    assert sum(browser._histogram_bars.y) == 12 and "energy/atom" in browser.histogram_chart.title

    browser.element_buttons["Au"].value = False
    browser.element_buttons["Cu"].value = True
    browser.exclusive.value = True
    browser.search_button.click()
    assert browser.count == 12 and {r["formula"] for r in browser.rows} == {"Cu32"}

    browser.element_buttons["Cu"].value = False
    browser.exclusive.value = False
    browser.xc.value = "PBE"
    browser.search_button.click()
    assert browser.count == N_AL and {(r["code"], r["xc"]) for r in browser.rows} == {("vasp", "PBE")}
    browser.histogram_choice.value = "max |F| (eV/Å)"
    assert sum(browser._histogram_bars.y) == N_AL and "max |F|" in browser.histogram_chart.title

    browser.xc.value = "__any__"
    browser.tags.value = "al"
    browser.formula.value = "Al"
    browser.search_button.click()
    assert browser.count == N_AL


def test_row_selection_shows_frame(filled):
    browser = DatabaseBrowser(filled)
    browser.formula.value = "AuCu3"
    browser.search()
    before = len(browser.view._ngl_component_ids)
    browser.table.value = 3
    frame = browser.frame
    assert frame.get_chemical_formula() == "Au8Cu24" and frame.info["frame_id"] == browser.rows[3]["id"]
    assert frame.info["signature"]["code"] == "ase-emt"
    assert before == 0 and len(browser.view._ngl_component_ids) == 2  # structure + force arrows
    details = browser.details.value
    assert "Au8Cu24" in details and "code=ase-emt" in details and "xc=EMT" in details
    assert "cu_au_emt.extxyz" in details and "Å per eV/Å" in details and "example" in details
    expected_scale = MAX_ARROW / np.linalg.norm(frame.get_forces(), axis=1).max()
    assert browser.view.mlmd_force_scale == pytest.approx(expected_scale)
    browser.table.value = 4  # a second row replaces the structure in the same widget
    assert len(browser.view._ngl_component_ids) == 2 and browser.frame.info["frame_id"] == browser.rows[4]["id"]


def test_use_selection_hands_over_frameset(filled):
    browser = DatabaseBrowser(filled, page_size=5)
    browser.element_buttons["Cu"].value = True
    browser.tags.value = "example"
    assert browser.use_button.disabled
    browser.search_button.click()
    assert not browser.use_button.disabled
    browser.element_buttons["Au"].value = True  # changed after the search: the hand-over uses the search
    browser.use_button.click()
    assert isinstance(browser.selection, FrameSet) and len(browser.selection) == N_CU_AU
    assert browser.query == {"elements": ["Cu"], "tags": ["example"]}
    assert "handed 24 frames" in browser.status_text and ".selection" in browser.status_text
    assert sorted(filled.frames(**browser.query).ids) == sorted(browser.selection.ids)


def test_use_selection_without_search_searches_first(filled):
    browser = DatabaseBrowser(filled)
    browser.code.value = "vasp"
    frames = browser.use_selection()
    assert len(frames) == N_AL and browser.query == {"settings": {"code": "vasp"}}
    assert browser.count == N_AL and len(browser.rows) == N_AL


def test_messages_for_empty_result_and_bad_input(filled):
    browser = DatabaseBrowser(filled)
    browser.formula.value = "Cu3Xx"
    browser.search_button.click()
    assert "unknown element symbol(s) Xx" in browser.status_text and "mlmd-status-error" in browser.status.value
    browser.formula.value = "H2O)"
    browser.search_button.click()
    assert "cannot read formula 'H2O)'" in browser.status_text
    browser.formula.value = "H2O"
    browser.search_button.click()
    assert browser.count == 0 and browser.table.options == () and browser.use_button.disabled
    assert "no frames match formula H2O" in browser.status_text and "remove a filter" in browser.status_text
    assert browser.page_label.value == "page 1 of 1, 0 frames"
    assert sum(browser._formula_bars.y) == 0 and list(browser._histogram_bars.y) == []
    with pytest.raises(MLMDError, match="page_size"):
        DatabaseBrowser(filled, page_size=0)


def test_empty_database(db):
    browser = DatabaseBrowser(db)
    assert browser.element_buttons == {} and "ingest" in browser.status_text
    browser.search_button.click()
    assert browser.count == 0 and "no frames match (all frames)" in browser.status_text


def test_unreachable_server_is_a_message():
    client = MongoClient("mongodb://127.0.0.1:9/", serverSelectionTimeoutMS=300, connectTimeoutMS=300)
    db = Database(client, "nowhere", uri="mongodb://user:secret@127.0.0.1:9/")
    try:
        browser = DatabaseBrowser(db)
        assert "cannot reach the database at mongodb://user:***@127.0.0.1:9/" in browser.status_text
        assert "secret" not in browser.status.value and "mlmd-status-error" in browser.status.value
        browser.search_button.click()
        assert browser.status_text.startswith("search failed: cannot reach the database")
    finally:
        client.close()


# -- in a real browser -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_database_browser_in_jupyterlab(run_notebook, filled):
    from conftest import drawn_colours

    nb = run_notebook([
        "import mlmd_lab\nfrom mlmd_lab.widgets import DatabaseBrowser\n"
        f"db = mlmd_lab.connect(database={filled.name!r})\n"
        "browser = DatabaseBrowser(db, page_size=10)\nbrowser",
    ])
    page = nb.page
    page.locator(".mlmd-db-browser").wait_for(timeout=60_000)
    page.locator(".mlmd-db-element-Cu").wait_for(timeout=30_000)
    nb.screenshot("rendered")

    page.locator(".mlmd-db-search").click()
    page.locator(".mlmd-db-page", has_text="page 1 of 3, 29 frames").wait_for(timeout=30_000)
    options = page.locator(".mlmd-db-table select option")
    assert options.count() == 10
    assert "Cu32" in options.first.inner_text() or "Au8Cu24" in options.first.inner_text()
    bars = page.locator(".mlmd-db-formula-chart rect.bar")
    bars.nth(2).wait_for(timeout=30_000)
    assert bars.count() == 3  # Cu, AuCu3, Al
    assert page.locator(".mlmd-db-histogram-chart rect.bar").count() >= 5

    page.locator(".mlmd-db-table select").select_option(index=1)
    page.locator(".mlmd-db-details", has_text="Å per eV/Å").wait_for(timeout=30_000)
    canvas = page.locator(".mlmd-structure canvas").first
    canvas.wait_for(timeout=30_000)
    assert drawn_colours(canvas) > 10, "nglview canvas is blank"
    nb.screenshot("row-selected")
    nb.screenshot("structure", canvas)

    page.locator(".mlmd-db-next").click()
    page.locator(".mlmd-db-page", has_text="page 2 of 3").wait_for(timeout=30_000)
    page.locator(".mlmd-db-use").click()
    page.locator(".mlmd-db-status", has_text="handed 29 frames (788 atoms) to Python").wait_for(timeout=60_000)
    nb.screenshot("selection-handed-over")
    nb.assert_no_console_errors()


# -- with accounts: what the server lets each user read -------------------------------------------------------
@pytest.fixture(scope="module")
def accounts(tmp_path_factory):
    """An embedded server with accounts: alice and bob in group 'lab', carol alone.

    alice's data sets: 'cu-private' (4 Cu frames, private), 'cu-group' (3 Cu, group 'lab'), 'al-public' (5 Al,
    public, CC0-1.0), 'ni-released' (2 Ni, published after an embargo: in her embargo and public databases),
    'ni-later' (2 Ni, embargoed for 30 days). bob's: 'al-bob' (2 Al, private).
    """
    handle = server.start(tmp_path_factory.mktemp("widget-accounts"), auth=True)
    files = tmp_path_factory.mktemp("widget-accounts-files")
    emt = {"settings": {"code": "emt", "xc": "EMT"}, "progress": False}
    try:
        admin = mlmd_lab.connect(handle.uri)
        uris = {name: admin.users.create(name, PASSWORDS[name], groups=groups)
                for name, groups in (("alice", ["lab"]), ("bob", ["lab"]), ("carol", []))}
        alice = mlmd_lab.connect(uris["alice"])
        alice.ingest(emt_file(files / "a.xyz", "Cu", 4, 1), dataset="cu-private", **emt)
        alice.ingest(emt_file(files / "b.xyz", "Cu", 3, 2), dataset="cu-group", visibility="group", **emt)
        alice.ingest(emt_file(files / "c.xyz", "Al", 5, 3), dataset="al-public", visibility="public",
                     licence="CC0-1.0", **emt)
        soon = datetime.now(UTC) + timedelta(seconds=2)
        alice.ingest(emt_file(files / "d.xyz", "Ni", 2, 4), dataset="ni-released", visibility="public",
                     embargo_until=soon, **emt)
        alice.ingest(emt_file(files / "e.xyz", "Ni", 2, 5), dataset="ni-later", visibility="public",
                     embargo_until=datetime.now(UTC) + timedelta(days=30), **emt)
        mlmd_lab.connect(uris["bob"]).ingest(emt_file(files / "f.xyz", "Al", 2, 6), dataset="al-bob", **emt)
        time.sleep(max(0.0, (soon - datetime.now(UTC)).total_seconds()) + 0.3)
        assert admin.release_all_embargoes() == 2
        yield {name: mlmd_lab.connect(uri) for name, uri in uris.items()}
    finally:
        handle.stop()


def _all_rows(browser: DatabaseBrowser) -> list[dict]:
    rows = []
    for page in range(browser.n_pages):
        browser.go_to_page(page)
        rows += browser.rows
    return rows


def _page_with(browser: DatabaseBrowser, dataset: str) -> int:
    """Go to the first page with a row of ``dataset``; returns that row's index on the page."""
    for page in range(browser.n_pages):
        browser.go_to_page(page)
        for i, row in enumerate(browser.rows):
            if row["dataset"] == dataset:
                return i
    raise AssertionError(f"no row of {dataset!r}")


@pytest.mark.xdist_group("widget_accounts")
def test_other_users_see_public_rows_only(accounts):
    browser = DatabaseBrowser(accounts["carol"], page_size=3)
    assert sorted(browser.element_buttons) == ["Al", "Ni"]  # alice's private and group Cu are not even offered
    assert "7 labelled frames" in browser.header.value and "as carol" in browser.header.value
    browser.search()
    rows = _all_rows(browser)
    assert browser.count == 7 and len(rows) == 7 and len({r["id"] for r in rows}) == 7
    assert {r["id"] for r in rows} == set(accounts["carol"].frames().ids)
    assert {(r["owner"], r["dataset"], r["visibility"]) for r in rows} == {
        ("alice", "al-public", "public"), ("alice", "ni-released", "public")}
    assert {r["licence"] for r in rows if r["dataset"] == "al-public"} == {"CC0-1.0"}
    assert sum(browser._formula_bars.y) == 7 and sum(browser._histogram_bars.y) == 7
    index = _page_with(browser, "al-public")
    line = browser.table.options[index][0]
    assert "alice" in line and "public" in line and "CC0-1.0" in line
    browser.show_row(index)
    assert browser.frame.info["owner"] == "alice" and browser.frame.get_chemical_formula() == "Al4"
    for text in ("<th>owner</th><td>alice", "<td>al-public</td>", "<td>CC0-1.0</td>", "<td>public</td>"):
        assert text in browser.details.value, text
    browser.element_buttons["Al"].value = True
    browser.search()
    assert browser.count == 5 and {r["dataset"] for r in browser.rows} == {"al-public"}


@pytest.mark.xdist_group("widget_accounts")
def test_group_members_see_group_rows_of_their_owner(accounts):
    bob = accounts["bob"]
    browser = DatabaseBrowser(bob, page_size=4)
    assert sorted(browser.element_buttons) == ["Al", "Cu", "Ni"]
    browser.search()
    rows = _all_rows(browser)  # pages cross from bob's own database into alice's group and public ones
    assert browser.count == 12 and browser.n_pages == 3 and len({r["id"] for r in rows}) == 12
    assert {r["id"] for r in rows} == set(bob.frames().ids)
    assert [r["owner"] for r in rows[:2]] == ["bob", "bob"]  # own data first
    group = [r for r in rows if r["visibility"] == "group"]
    assert len(group) == 3 and {(r["owner"], r["dataset"], r["group"]) for r in group} == {("alice", "cu-group", "lab")}
    assert "cu-private" not in {r["dataset"] for r in rows} and "ni-later" not in {r["dataset"] for r in rows}
    browser.element_buttons["Cu"].value = True
    browser.search()
    assert browser.count == 3 and "group:lab" in browser.table.options[0][0]
    browser.table.value = 0
    assert browser.frame.info["owner"] == "alice" and "<td>group:lab</td>" in browser.details.value


@pytest.mark.xdist_group("widget_accounts")
def test_owner_sees_everything_once_and_embargoed_rows_marked(accounts):
    alice = accounts["alice"]
    browser = DatabaseBrowser(alice, page_size=5)
    browser.search()
    rows = _all_rows(browser)
    assert browser.count == 16 and len({r["id"] for r in rows}) == 16  # the released Ni set only once
    assert {r["id"] for r in rows} == set(alice.frames().ids) and {r["owner"] for r in rows} == {"alice"}
    later = [r for r in rows if r["dataset"] == "ni-later"]
    assert len(later) == 2 and all(r["embargoed"] for r in later)
    browser.formula.value = "Ni"
    browser.search()
    assert browser.count == 4 and sum("embargoed" in text for text, _ in browser.table.options) == 2
    browser.show_row(_page_with(browser, "ni-later"))
    assert ", embargoed until " in browser.details.value
