"""DatabaseBrowser: query the teacher-data database from a notebook, page through frames, look at one, and hand
the query result to Python.

>>> from mlmd_lab.widgets import DatabaseBrowser
>>> browser = DatabaseBrowser(db)           # an ipywidgets VBox: display it (last line of a cell)
>>> # ... pick elements / formula / settings, press Search, page, click rows, press "Use selection" ...
>>> frames = browser.selection              # the FrameSet of the last search
>>> browser.query                           # the db.frames(...) arguments that give the same frames again
>>> frames == db.frames(**browser.query)    # reproducible (same frames)

Paging is done by the server: a page reads only ``page_size`` frame documents with a projection of the table's
columns (no positions or forces); the full frame is read when a row is selected, and all matching frames only
when "Use selection" is pressed. Charts (frames per formula, histogram of energy per atom or max |F|) are computed
by server-side aggregation and a projection of one scalar per frame.

With accounts (``admin.users.create``) the browser shows exactly what the server lets the caller read: every
query runs in each readable database (own private, group-shared, embargoed and published data, the caller's
groups' data, everyone's published data; see :meth:`Database.areas`), own databases first. A search counts the
matches per database; a page is the ``skip``/``limit`` window of the databases' results in that order, and a
selected row is read from the database it came from. Owner, visibility and group come from where a frame lives
(:meth:`Database._stamp`), never from the document. An embargoed data set already released is shown once, from
its published copy (as :meth:`Database.frames` does). Without accounts there is one database and one query each.

Units: energies eV (per atom in the table), forces eV/Å, lengths Å.
"""

from __future__ import annotations

import functools
import html
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets
import numpy as np
from pymongo.errors import OperationFailure, PyMongoError

from mlmd_lab.db.access import is_unauthorized
from mlmd_lab.db.documents import frame_from_document
from mlmd_lab.db.store import Database, redact
from mlmd_lab.errors import MLMDError
from mlmd_lab.frameset import FrameSet
from mlmd_lab.widgets.structure import show_structure, structure_view

if TYPE_CHECKING:
    from pymongo.database import Database as MongoDatabase

    from mlmd_lab.db.access import Area

#: Dropdown value meaning "no filter on this setting".
ANY = "__any__"
#: Dropdown value meaning "setting not recorded" (signature value None).
UNSET = "__unset__"
#: Columns of the results table: (header, width in characters).
COLUMNS = (("formula", 12), ("atoms", 5), ("E/atom eV", 10), ("max|F| eV/Å", 11), ("code", 8), ("xc", 7),
           ("owner", 8), ("data set", 12), ("visibility", 10), ("licence", 10), ("source", 0))
#: Frame-document fields a table page reads (a projection: no per-atom arrays).
ROW_FIELDS = ("formula", "natoms", "energy_per_atom", "max_force", "signature_id", "source_path", "step", "calc_id",
              "owner", "dataset", "visibility", "group", "licence")
#: Histogram quantities: label -> frame-document field.
HISTOGRAMS = {"energy/atom (eV)": "energy_per_atom", "max |F| (eV/Å)": "max_force"}
#: At most this many frames feed a histogram (one float each); the caption says when it was capped.
HISTOGRAM_LIMIT = 200_000
#: Bars of the per-formula chart.
TOP_FORMULAS = 12

_STYLE = """<style>
.mlmd-db-table select, .mlmd-db-table-header, .mlmd-model-table select, .mlmd-model-table-header {
  font-family: var(--jp-code-font-family, monospace); font-size: 11px; }
.mlmd-db-table-header, .mlmd-model-table-header { white-space: pre; font-weight: bold; padding-left: 4px; }
.mlmd-status-error { color: #b00020; }
.mlmd-details .widget-html-content, .mlmd-db-status .widget-html-content, .mlmd-model-status .widget-html-content {
  line-height: 1.4; }
.mlmd-details table { border-collapse: collapse; font-size: 12px; }
.mlmd-details th, .mlmd-details td { text-align: left; vertical-align: top; padding: 1px 12px 1px 0; }
</style>"""


def style_widget() -> widgets.HTML:
    """The CSS of mlmd_lab's tables (monospace rows, error colour), as an invisible HTML widget."""
    return widgets.HTML(_STYLE, layout=widgets.Layout(height="0px", margin="0px"))


def pad(text: str, width: int, right: bool = False) -> str:
    """``text`` cut or padded to ``width`` characters with non-breaking spaces (an <option> collapses spaces)."""
    if width <= 0:
        return text
    text = text if len(text) <= width else text[: width - 1] + "…"
    return (text.rjust(width) if right else text.ljust(width)).replace(" ", "\u00a0")


def status_html(message: str, error: bool = False) -> str:
    """A status message as HTML (escaped; errors in the error colour)."""
    cls = " class='mlmd-status-error'" if error else ""
    return f"<span{cls}>{html.escape(message)}</span>"


def guarded(action: str) -> Callable:
    """Decorator for widget handlers: expected failures become a status message instead of a traceback.

    The instance must have ``_fail(message)``; ``action`` names what was being done ("search", ...).
    """

    def wrap(method: Callable) -> Callable:
        @functools.wraps(method)
        def run(self, *args: Any, **kwargs: Any) -> Any:
            try:
                return method(self, *args, **kwargs)
            except MLMDError as err:
                self._fail(f"{action} failed: {err}")
            except PyMongoError as err:
                self._fail(f"{action} failed: {database_error_text(err, self.db.uri)}")
            return None

        return run

    return wrap


def database_error_text(err: PyMongoError, uri: str) -> str:
    """What a failed database call means for the user: a refused read (access changed) or no server."""
    if isinstance(err, OperationFailure) and is_unauthorized(err):
        return ("the server refused a read: your access changed since the last search (e.g. you left a group): "
                "press Search again")
    return (f"cannot reach the database at {redact(uri)} ({type(err).__name__}): check that the server is "
            "running, then try again")


@dataclass
class _Part:
    """One database a search reads (an area the caller may read): the search's filter there and its matches."""

    area: Area
    mdb: MongoDatabase
    filter: dict[str, Any]
    count: int = 0


class DatabaseBrowser(widgets.VBox):
    """Browse the frames of a :class:`~mlmd_lab.db.store.Database` (an ``ipywidgets.VBox``: display it).

    Form widgets (set them from Python as well): ``element_buttons`` {symbol: ToggleButton}, ``exclusive``
    (Checkbox), ``formula`` (Text), ``code`` and ``xc`` (Dropdowns of the signatures present), ``tags`` (Text,
    comma-separated). Buttons: ``search_button``, ``prev_button``, ``next_button``, ``use_button``.
    Results: ``table`` (Select of the rows of the current page; its value is the row index), ``rows`` (dicts of
    those rows, with ``owner``, ``dataset``, ``visibility``, ``group``, ``licence`` and the database ``db`` they
    come from), ``count`` (frames matching), ``page`` (0-based), ``n_pages``. A selected row is shown in ``view``
    (nglview, force arrows) with its settings and provenance in ``details``; ``frame`` is that ASE ``Atoms``.

    After "Use selection": ``selection`` is the :class:`FrameSet` of the last search and ``query`` the
    :meth:`Database.frames` keyword arguments that reproduce it. Messages go to ``status`` (an HTML widget).

    Args:
        db: the database (``mlmd_lab.connect()``).
        page_size: rows per page.
    """

    def __init__(self, db: Database, page_size: int = 20, **kwargs: Any) -> None:
        if int(page_size) < 1:
            raise MLMDError(f"page_size must be a positive number of rows, not {page_size!r}")
        super().__init__(**kwargs)
        self.db = db
        self.page_size = int(page_size)
        self.selection: FrameSet | None = None
        self.query: dict[str, Any] | None = None
        self.frame = None
        self.status_text = ""
        self.rows: list[dict[str, Any]] = []
        self.count = 0
        self.page = 0
        self._criteria: dict[str, Any] | None = None
        self._parts: list[_Part] | None = None
        self._signatures: dict[str, dict[str, Any]] = {}
        self._build()
        self.refresh()

    # -- layout ----------------------------------------------------------------------------------------------
    def _build(self) -> None:
        self.add_class("mlmd-db-browser")
        self.header = _html("", "mlmd-db-header")
        self.element_box = widgets.HBox(layout=widgets.Layout(flex_flow="row wrap", max_width="640px"))
        self.element_box.add_class("mlmd-db-elements")
        self.element_buttons: dict[str, widgets.ToggleButton] = {}
        self.exclusive = widgets.Checkbox(value=False, description="only these elements", indent=False)
        self.exclusive.add_class("mlmd-db-exclusive")
        self.formula = widgets.Text(description="formula", placeholder="e.g. H2O, Cu2S (any order)")
        self.formula.add_class("mlmd-db-formula")
        self.code = widgets.Dropdown(description="code", options=[("any", ANY)], value=ANY)
        self.code.add_class("mlmd-db-code")
        self.xc = widgets.Dropdown(description="functional", options=[("any", ANY)], value=ANY)
        self.xc.add_class("mlmd-db-xc")
        self.tags = widgets.Text(description="tags", placeholder="comma-separated, all required")
        self.tags.add_class("mlmd-db-tags")
        self.search_button = _button("Search", "mlmd-db-search", "search", "primary")
        self.use_button = _button("Use selection", "mlmd-db-use", "share", "success")
        self.use_button.disabled = True
        self.status = _html("", "mlmd-db-status")

        header_text = " ".join(pad(name, width, right=i in (1, 2, 3)) for i, (name, width) in enumerate(COLUMNS))
        self.table_header = _html(html.escape(header_text), "mlmd-db-table-header")
        self.table = widgets.Select(options=[], value=None, rows=self.page_size,
                                    layout=widgets.Layout(width="100%"))
        self.table.add_class("mlmd-db-table")
        self.prev_button = _button("◀ prev", "mlmd-db-prev", "", "")
        self.next_button = _button("next ▶", "mlmd-db-next", "", "")
        self.prev_button.disabled = self.next_button.disabled = True
        self.page_label = widgets.Label("no search yet")
        self.page_label.add_class("mlmd-db-page")

        self.view = structure_view(height="360px")
        self.details = _html("<i>select a row to see its structure, settings and provenance</i>", "mlmd-details")
        self.details.add_class("mlmd-db-details")

        self.histogram_choice = widgets.ToggleButtons(options=list(HISTOGRAMS), value=next(iter(HISTOGRAMS)))
        self.histogram_choice.add_class("mlmd-db-histogram-choice")
        self.formula_chart, self._formula_bars = _bar_figure("frames per formula", "formula", "frames")
        self.formula_chart.add_class("mlmd-db-formula-chart")
        self.histogram_chart, self._histogram_bars = _bar_figure("histogram", "", "frames")
        self.histogram_chart.add_class("mlmd-db-histogram-chart")

        self.search_button.on_click(lambda _: self.search())
        self.prev_button.on_click(lambda _: self.go_to_page(self.page - 1))
        self.next_button.on_click(lambda _: self.go_to_page(self.page + 1))
        self.use_button.on_click(lambda _: self.use_selection())
        self.table.observe(self._on_row, names="value")
        self.histogram_choice.observe(lambda _: self._update_histogram(), names="value")

        form = widgets.VBox([widgets.Label("elements (frames containing all picked ones)"), self.element_box,
                             self.exclusive, self.formula, widgets.HBox([self.code, self.xc]), self.tags,
                             widgets.HBox([self.search_button, self.use_button])])
        form.add_class("mlmd-db-form")
        results = widgets.VBox([self.table_header, self.table,
                                widgets.HBox([self.prev_button, self.next_button, self.page_label]), self.details],
                               layout=widgets.Layout(width="58%"))
        viewer = widgets.VBox([self.view], layout=widgets.Layout(width="42%"))
        charts = widgets.VBox([self.histogram_choice, widgets.HBox([self.formula_chart, self.histogram_chart])])
        self.children = [style_widget(), self.header, form, self.status, widgets.HBox([results, viewer]), charts]

    # -- choices from the database ----------------------------------------------------------------------------
    @guarded("reading the database")
    def refresh(self) -> None:
        """Re-read what the form offers (elements, codes, functionals present) and the header counts."""
        parts = [p for p in self._query_parts({}) if p.count]
        elements = sorted({e for p in parts for e in p.mdb.frames.distinct("elements", p.filter) if e})
        frames = sum(p.count for p in parts)
        signatures = self._present_signatures(parts)
        self._set_elements(elements)
        self._set_choices(self.code, [s.get("code") for s in signatures])
        self._set_choices(self.xc, [s.get("xc") for s in signatures])
        where = f" as {html.escape(self.db.user)}" if self.db.managed else ""
        self.header.value = (f"<b>Database {html.escape(self.db.name)}</b>{where}: {frames} labelled frames, "
                             f"{len(elements)} elements, {len(signatures)} settings signatures")
        if not frames:
            self._say("the database holds no frames yet: ingest some with db.ingest(path)")
        elif not self.rows:
            self._say("pick elements, a formula or settings (or none for all frames) and press Search")

    def _query_parts(self, criteria: dict[str, Any]) -> list[_Part]:
        """Each database the caller may read (own first), with the filter of ``criteria`` there and its count."""
        parts = []
        for area, mdb in self.db._each_area():
            filt = self.db._frame_query_in(mdb, **criteria)  # leaves out released embargoes (read once)
            parts.append(_Part(area, mdb, filt, mdb.frames.count_documents(filt)))
        return parts

    def _present_signatures(self, parts: list[_Part]) -> list[dict[str, Any]]:
        """The settings signatures of the frames matched in ``parts`` (each once), also cached for rows."""
        found: dict[str, dict[str, Any]] = {}
        for p in parts:
            ids = [i for i in p.mdb.frames.distinct("signature_id", p.filter) if i not in found]
            found.update({s["_id"]: s for s in p.mdb.signatures.find({"_id": {"$in": ids}})})
        self._signatures.update(found)
        return list(found.values())

    def _set_elements(self, elements: list[str]) -> None:
        old = {e for e, b in self.element_buttons.items() if b.value}
        self.element_buttons = {}
        for el in elements:
            button = widgets.ToggleButton(value=el in old, description=el, tooltip=f"frames containing {el}",
                                          layout=widgets.Layout(width="46px"))
            button.add_class("mlmd-db-element")
            button.add_class(f"mlmd-db-element-{el}")
            self.element_buttons[el] = button
        self.element_box.children = list(self.element_buttons.values())

    @staticmethod
    def _set_choices(dropdown: widgets.Dropdown, values: list[Any]) -> None:
        present = sorted({str(v) for v in values if v is not None})
        options = [("any", ANY)] + [(v, v) for v in present]
        if any(v is None for v in values):
            options.append(("(not recorded)", UNSET))
        current = dropdown.value
        dropdown.options = options
        dropdown.value = current if current in [v for _, v in options] else ANY

    # -- search and paging ------------------------------------------------------------------------------------
    def criteria(self) -> dict[str, Any]:
        """The :meth:`Database.frames` keyword arguments of the form as it is now (empty = all frames)."""
        out: dict[str, Any] = {}
        elements = [e for e, b in self.element_buttons.items() if b.value]
        if elements:
            out["elements"] = elements
            if self.exclusive.value:
                out["exclusive"] = True
        if self.formula.value.strip():
            out["formula"] = check_formula(self.formula.value.strip())
        settings = {}
        for key, dropdown in (("code", self.code), ("xc", self.xc)):
            if dropdown.value != ANY:
                settings[key] = None if dropdown.value == UNSET else dropdown.value
        if settings:
            out["settings"] = settings
        tags = [t for t in re.split(r"[,\s]+", self.tags.value) if t]
        if tags:
            out["tags"] = tags
        return out

    @guarded("search")
    def search(self) -> None:
        """Run the form's query: count, first page of the table, charts. Bad input shows in ``status``."""
        criteria = self.criteria()
        self._say("searching …")
        parts = self._query_parts(criteria)
        self._criteria, self._parts = criteria, parts
        self.count = sum(p.count for p in parts)
        self.use_button.disabled = self.count == 0
        self._load_page(0)
        self._update_charts()
        if self.count == 0:
            self._say(f"no frames match {describe(criteria)}: remove a filter (e.g. the formula or tags) or pick "
                      "other elements", error=True)
        else:
            self._say(f"{self.count} frames match {describe(criteria)}; click a row to see it, "
                      "'Use selection' hands all of them to Python")

    @property
    def n_pages(self) -> int:
        """Pages of the current result (at least 1)."""
        return max(1, -(-self.count // self.page_size))

    @guarded("paging")
    def go_to_page(self, page: int) -> None:
        """Show page ``page`` (0-based) of the last search."""
        if self._parts is None:
            self._say("press Search first", error=True)
            return
        self._load_page(min(max(int(page), 0), self.n_pages - 1))

    def _load_page(self, page: int) -> None:
        found = self._page_docs(page * self.page_size, self.page_size)
        self._cache_signatures(found)
        self.page = page
        self.rows = [self._row(part, d) for part, d in found]
        self.table.unobserve(self._on_row, names="value")
        self.table.options = [(self._row_text(r), i) for i, r in enumerate(self.rows)]
        self.table.value = None
        self.table.observe(self._on_row, names="value")
        self.page_label.value = f"page {page + 1} of {self.n_pages}, {self.count} frames"
        self.prev_button.disabled = page <= 0
        self.next_button.disabled = page >= self.n_pages - 1

    def _page_docs(self, skip: int, limit: int) -> list[tuple[_Part, dict[str, Any]]]:
        """Rows ``skip`` to ``skip + limit`` of the search: the databases' matches concatenated in area order
        (a database's count decides whether it is read at all), each with the part it came from."""
        projection = dict.fromkeys(ROW_FIELDS, 1)
        out: list[tuple[_Part, dict[str, Any]]] = []
        for part in self._parts or []:
            if len(out) >= limit:
                break
            if skip >= part.count:
                skip -= part.count
                continue
            cursor = part.mdb.frames.find(part.filter, projection).skip(skip).limit(limit - len(out))
            out += [(part, d) for d in cursor]
            skip = 0
        return out

    def _cache_signatures(self, found: list[tuple[_Part, dict[str, Any]]]) -> None:
        """Read the signatures of a page's rows not cached yet, each from the database its row came from."""
        missing: dict[int, tuple[_Part, set[str]]] = {}
        for part, doc in found:
            sig_id = doc.get("signature_id")
            if sig_id and sig_id not in self._signatures:
                missing.setdefault(id(part), (part, set()))[1].add(sig_id)
        for part, ids in missing.values():
            self._signatures.update({s["_id"]: s for s in part.mdb.signatures.find({"_id": {"$in": list(ids)}})})

    def _row(self, part: _Part, doc: dict[str, Any]) -> dict[str, Any]:
        """One table row: the frame's scalars (eV/atom, eV/Å), its settings, and owner, data set, visibility and
        licence as :meth:`Database._stamp` gives them for the database it lives in."""
        doc = self.db._stamp(part.area, doc)
        sig = self._signatures.get(doc.get("signature_id")) or {}
        return {"id": doc["_id"], "formula": doc.get("formula", "?"), "natoms": doc.get("natoms"),
                "energy_per_atom": doc.get("energy_per_atom"), "max_force": doc.get("max_force"),
                "code": sig.get("code"), "xc": sig.get("xc"), "source": doc.get("source_path"),
                "step": doc.get("step", 0), "calc_id": doc.get("calc_id"), "owner": doc.get("owner"),
                "dataset": doc.get("dataset"), "visibility": doc.get("visibility"), "group": doc.get("group"),
                "licence": doc.get("licence"), "embargoed": part.area.embargoed, "db": part.area.db}

    @staticmethod
    def _row_text(row: dict[str, Any]) -> str:
        def num(value: float | None, fmt: str) -> str:
            return "-" if value is None else format(value, fmt)

        source = row["source"] or "-"
        source = f"{source.replace(chr(92), '/').rsplit('/', 1)[-1]}:{row['step']}"
        shared = "embargoed" if row.get("embargoed") else visibility_text(row.get("visibility"), row.get("group"))
        cells = [row["formula"], str(row["natoms"]), num(row["energy_per_atom"], ".4f"), num(row["max_force"], ".3f"),
                 row["code"] or "-", row["xc"] or "-", row.get("owner") or "-", row.get("dataset") or "-", shared,
                 row.get("licence") or "-", source]
        return " ".join(pad(c, w, right=i in (1, 2, 3)) for i, (c, (_, w)) in enumerate(zip(cells, COLUMNS,
                                                                                               strict=True)))

    # -- one frame ------------------------------------------------------------------------------------------
    def _on_row(self, change: dict[str, Any]) -> None:
        if change["new"] is not None:
            self.show_row(change["new"])

    @guarded("showing the frame")
    def show_row(self, index: int) -> None:
        """Show row ``index`` of the current page: structure with force arrows in ``view``, settings and
        provenance in ``details``; ``frame`` becomes that ``Atoms``."""
        row = self.rows[index]
        part = next((p for p in self._parts or [] if p.area.db == row["db"]), None)
        doc = None if part is None else part.mdb.frames.find_one({"_id": row["id"]})
        if doc is None:
            self._say(f"frame {row['id'][:12]} is no longer in the database (deleted or moved since the search): "
                      "press Search again", error=True)
            return
        doc = self.db._stamp(part.area, doc)
        sig = dict(self._signatures.get(doc.get("signature_id")) or {})
        sig.pop("_id", None)
        atoms = frame_from_document(doc, sig)
        arrows = show_structure(self.view, atoms)
        calc = part.mdb.calculations.find_one({"_id": doc.get("calc_id")}, {"settings": 0}) or {}
        self.frame = atoms
        self.details.value = frame_details(doc, sig, calc, arrows.scale, arrows.max_force)

    # -- charts ---------------------------------------------------------------------------------------------
    def _formula_counts(self) -> list[dict[str, Any]]:
        """Frames per reduced formula of the search, summed over the databases, most frequent first."""
        counts: dict[Any, int] = {}
        for part in self._parts or []:
            if not part.count:
                continue
            pipeline = [{"$match": part.filter}, {"$group": {"_id": "$formula_reduced", "n": {"$sum": 1}}}]
            for g in part.mdb.frames.aggregate(pipeline):
                counts[g["_id"]] = counts.get(g["_id"], 0) + g["n"]
        ordered = sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))
        return [{"_id": k, "n": n} for k, n in ordered]

    def _update_charts(self) -> None:
        groups = self._formula_counts()
        top = groups[:TOP_FORMULAS]
        names = [str(g["_id"]) for g in top]
        if len(groups) > TOP_FORMULAS:
            names.append(f"{len(groups) - TOP_FORMULAS} others")
            top = [*top, {"n": sum(g["n"] for g in groups[TOP_FORMULAS:])}]
        _set_bars(self._formula_bars, names, [g["n"] for g in top])
        self.formula_chart.title = f"frames per formula ({len(groups)} formulas)"
        self._update_histogram()

    @guarded("histogram")
    def _update_histogram(self) -> None:
        if self._parts is None:
            return
        label = self.histogram_choice.value
        values = np.array(self._histogram_values(HISTOGRAMS[label]), dtype=float)
        if len(values) == 0:
            _set_bars(self._histogram_bars, [], [])
            self.histogram_chart.title = f"{label}: no values"
            return
        counts, edges = np.histogram(values, bins=min(30, max(5, int(np.sqrt(len(values))))))
        centres = [f"{0.5 * (a + b):.4g}" for a, b in zip(edges[:-1], edges[1:], strict=True)]
        _set_bars(self._histogram_bars, centres, counts.tolist())
        capped = f", first {HISTOGRAM_LIMIT}" if len(values) >= HISTOGRAM_LIMIT else ""
        self.histogram_chart.title = f"{label} ({len(values)} frames{capped})"
        self.histogram_chart.axes[0].label = label

    def _histogram_values(self, key: str) -> list[float]:
        """Field ``key`` (eV/atom or eV/Å) of the search's frames, database after database, at most
        :data:`HISTOGRAM_LIMIT` values."""
        values: list[float] = []
        for part in self._parts or []:
            room = HISTOGRAM_LIMIT - len(values)
            if room <= 0:
                break
            if not part.count:
                continue
            cursor = part.mdb.frames.find({**part.filter, key: {"$exists": True}}, {key: 1, "_id": 0}).limit(room)
            values += [d[key] for d in cursor if d.get(key) is not None]
        return values

    # -- hand over --------------------------------------------------------------------------------------------
    @guarded("loading the selection")
    def use_selection(self) -> FrameSet | None:
        """Load every frame of the last search into ``selection`` (a FrameSet) and its arguments into
        ``query``; returns the FrameSet. Searches first when no search was run yet."""
        if self._criteria is None:
            self.search()
            if self._criteria is None:
                return None
        self._say("loading frames …")
        frames = self.db.frames(**self._criteria)
        self.selection, self.query = frames, dict(self._criteria)
        if not len(frames):
            self._say("the search matches no frames: nothing handed over; change the filters and Search", error=True)
            return frames
        natoms = sum(len(a) for a in frames)
        self._say(f"handed {len(frames)} frames ({natoms} atoms) to Python: .selection is the FrameSet, "
                  f".query = {self.query!r} reproduces it with db.frames(**query); e.g. "
                  "train, valid, test = browser.selection.split()")
        return frames

    # -- messages -------------------------------------------------------------------------------------------
    def _say(self, message: str, error: bool = False) -> None:
        self.status.value = status_html(message, error)
        self.status_text = message

    def _fail(self, message: str) -> None:
        self._say(message, error=True)


def check_formula(formula: str) -> str:
    """``formula`` if it reads as a chemical formula of known elements, else MLMDError naming the problem."""
    from ase.data import atomic_numbers
    from ase.formula import Formula

    try:
        symbols = Formula(formula).count()
    except ValueError:
        symbols = None
    if not symbols:
        raise MLMDError(f"cannot read formula {formula!r}: write element symbols with counts, like 'H2O' or 'TiO2'")
    unknown = [s for s in symbols if s not in atomic_numbers or s == "X"]
    if unknown:
        raise MLMDError(f"formula {formula!r} has unknown element symbol(s) {', '.join(unknown)}: "
                        "write it like 'H2O' or 'Cu3Au'")
    return formula


def describe(criteria: dict[str, Any]) -> str:
    """A query's arguments in words ("elements Cu, Au; formula Cu3Au")."""
    if not criteria:
        return "(all frames)"
    parts = []
    for key, value in criteria.items():
        if key == "exclusive":
            continue
        if key == "elements":
            only = " only" if criteria.get("exclusive") else ""
            parts.append(f"elements {', '.join(value)}{only}")
        elif key == "settings":
            parts.append(", ".join(f"{k}={'(not recorded)' if v is None else v}" for k, v in value.items()))
        elif key == "tags":
            parts.append(f"tags {', '.join(value)}")
        else:
            parts.append(f"{key} {value}")
    return "; ".join(parts)


def frame_details(doc: dict[str, Any], signature: dict[str, Any], calc: dict[str, Any], scale: float,
                  max_force: float) -> str:
    """HTML table of one frame: composition, energies, forces and arrow scale, settings signature, provenance."""
    def num(value: Any, fmt: str, unit: str) -> str:
        return "-" if value is None else f"{format(value, fmt)} {unit}"

    cell = np.asarray(doc.get("cell", [0.0] * 9), dtype=float).reshape(3, 3)
    lengths = " × ".join(f"{x:.3f}" for x in np.linalg.norm(cell, axis=1))
    pbc = "".join("xyz"[i] for i, p in enumerate(doc.get("pbc", [])) if p) or "none"
    rows = [("formula", f"{doc.get('formula')} ({doc.get('natoms')} atoms)"),
            ("energy", f"{num(doc.get('energy'), '.6f', 'eV')}; {num(doc.get('energy_per_atom'), '.6f', 'eV/atom')}"),
            ("max |F|", num(doc.get("max_force"), ".4f", "eV/Å")),
            ("arrows", f"{scale:.3g} Å per eV/Å (largest force drawn {scale * max_force:.2f} Å)" if scale else "none"),
            ("stress", "yes" if doc.get("stress") else "no"),
            ("cell", f"{lengths} Å, periodic {pbc}")]
    settings = {k: v for k, v in signature.items() if v not in (None, [], {}, "")}
    rows.append(("settings", ", ".join(f"{k}={v}" for k, v in settings.items()) or "not recorded"))
    rows += [("owner", doc.get("owner") or "-"), ("data set", doc.get("dataset") or "-"),
             ("visibility", visibility_text(doc.get("visibility"), doc.get("group"))
              + _embargo_note(doc.get("embargo_until"))),
             ("licence", doc.get("licence") or "-")]
    rows += [("source", f"{doc.get('source_path') or '-'} (step {doc.get('step', 0)})"),
             ("calculation", f"{str(doc.get('calc_id'))[:16]}… {calc.get('code', '')} "
                             f"{calc.get('code_version') or ''}".strip()),
             ("signature id", str(doc.get("signature_id"))[:16] + "…"),
             ("frame id", str(doc.get("_id"))[:16] + "…"),
             ("tags", ", ".join(doc.get("tags", [])) or "-")]
    if calc.get("warnings"):
        rows.append(("warnings", "; ".join(map(str, calc["warnings"]))[:400]))
    if doc.get("ingested_at"):
        rows.append(("ingested", str(doc["ingested_at"])[:19]))
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def visibility_text(visibility: str | None, group: str | None) -> str:
    """A visibility as the table shows it: private, public, group:<name>, or "-" when not recorded."""
    if visibility == "group" and group:
        return f"group:{group}"
    return visibility or "-"


def _embargo_note(until: Any) -> str:
    """The visibility's suffix: ", embargoed until <date>" while an embargo lasts, ", embargo ended <date>"
    after it (dates UTC), "" without one."""
    if not isinstance(until, datetime):
        return ""
    until = until if until.tzinfo else until.replace(tzinfo=UTC)
    return f", {'embargoed until' if until > datetime.now(UTC) else 'embargo ended'} {until:%Y-%m-%d}"


# -- small widget helpers ------------------------------------------------------------------------------------
def _html(value: str, dom_class: str) -> widgets.HTML:
    w = widgets.HTML(value)
    w.add_class(dom_class)
    return w


def _button(description: str, dom_class: str, icon: str, style: str) -> widgets.Button:
    b = widgets.Button(description=description, icon=icon, button_style=style)
    b.add_class(dom_class)
    return b


def _bar_figure(title: str, x_label: str, y_label: str):
    """A bqplot bar chart (Figure, Bars) with an ordinal x axis."""
    import bqplot

    x, y = bqplot.OrdinalScale(), bqplot.LinearScale(min=0.0)
    bars = bqplot.Bars(x=[], y=[], scales={"x": x, "y": y}, colors=["#4477aa"])
    axes = [bqplot.Axis(scale=x, label=x_label, tick_rotate=-45, tick_style={"font-size": "9px"}),
            bqplot.Axis(scale=y, side="left", label=y_label, tick_format="d")]
    fig = bqplot.Figure(marks=[bars], axes=axes, title=title, padding_y=0,
                        fig_margin={"top": 40, "bottom": 70, "left": 55, "right": 15},
                        layout=widgets.Layout(width="460px", height="300px"))
    return fig, bars


def _set_bars(bars, labels: list[str], values: list[float]) -> None:
    with bars.hold_sync():
        bars.x = list(labels)
        bars.y = [float(v) for v in values]
