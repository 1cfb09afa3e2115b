"""ModelBrowser: the potential database (``db.models``) in a notebook: errors, provenance, load and export.

>>> from mlmd_lab.widgets import ModelBrowser
>>> browser = ModelBrowser(db)        # an ipywidgets VBox: display it (last line of a cell)
>>> # ... click a row, press Load ...
>>> model = browser.model             # the HDNNP (or Ensemble) of the selected row, as db.models.load gives it
>>> atoms.calc = model.calculator()

Errors are root-mean-square errors from the saved provenance: energy in meV/atom, forces in meV/Å.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

import ipywidgets as widgets

from mlmd_lab.db.models import ModelRecord
from mlmd_lab.db.store import Database
from mlmd_lab.errors import MLMDError
from mlmd_lab.widgets.database import _button, _html, guarded, pad, status_html, style_widget, visibility_text

#: Columns of the model table: (header, width in characters; 0 = rest of the line).
COLUMNS = (("name", 18), ("ver", 4), ("elements", 12), ("test E meV/at", 13), ("test F meV/Å", 12),
           ("created", 16), ("description", 0))
#: Provenance entries shown as their own sections (the rest is listed under "other").
SECTIONS = ("query", "config", "signatures")
#: Longest JSON text shown for one provenance entry (characters).
MAX_JSON = 2000


class ModelBrowser(widgets.VBox):
    """Browse the saved potentials of a :class:`~mlmd_lab.db.store.Database` (an ``ipywidgets.VBox``).

    Widgets: ``table`` (Select; value = index into ``records``), ``all_versions`` (Checkbox: every version, not
    only the newest of each name), ``refresh_button``, ``details`` (HTML: errors per split and provenance),
    ``load_button``, ``folder`` (Text) and ``export_button``, ``status`` (HTML; ``status_text`` is its plain text).
    After Load, ``model`` is the loaded HDNNP or Ensemble; after Export, ``exported`` is the folder written.

    Args:
        db: the database (``mlmd_lab.connect()``).
    """

    def __init__(self, db: Database, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.db = db
        self.records: list[ModelRecord] = []
        self.record: ModelRecord | None = None
        self.model = None
        self.exported: Path | None = None
        self.status_text = ""
        self._build()
        self.refresh()

    # -- layout ----------------------------------------------------------------------------------------------
    def _build(self) -> None:
        self.add_class("mlmd-model-browser")
        self.header = _html("", "mlmd-model-header")
        self.all_versions = widgets.Checkbox(value=False, description="all versions", indent=False)
        self.all_versions.add_class("mlmd-model-all-versions")
        self.refresh_button = _button("Refresh", "mlmd-model-refresh", "refresh", "")
        header_text = " ".join(pad(name, width, right=i in (1, 3, 4)) for i, (name, width) in enumerate(COLUMNS))
        self.table_header = _html(html.escape(header_text), "mlmd-model-table-header")
        self.table = widgets.Select(options=[], value=None, rows=8, layout=widgets.Layout(width="100%"))
        self.table.add_class("mlmd-model-table")
        self.details = _html("<i>select a model to see its errors and provenance</i>", "mlmd-details")
        self.details.add_class("mlmd-model-details")
        self.load_button = _button("Load", "mlmd-model-load", "download", "primary")
        self.folder = widgets.Text(description="folder", placeholder="export folder (default: NAME-vVERSION)")
        self.folder.add_class("mlmd-model-folder")
        self.export_button = _button("Export n2p2", "mlmd-model-export", "folder-open", "")
        self.load_button.disabled = self.export_button.disabled = True
        self.status = _html("", "mlmd-model-status")

        self.refresh_button.on_click(lambda _: self.refresh())
        self.all_versions.observe(lambda _: self.refresh(), names="value")
        self.table.observe(self._on_row, names="value")
        self.load_button.on_click(lambda _: self.load())
        self.export_button.on_click(lambda _: self.export())

        actions = widgets.HBox([self.load_button, self.folder, self.export_button])
        self.children = [style_widget(), self.header, widgets.HBox([self.all_versions, self.refresh_button]),
                         self.table_header, self.table, actions, self.status, self.details]

    # -- table ---------------------------------------------------------------------------------------------
    @guarded("reading the model database")
    def refresh(self) -> None:
        """Re-read the saved models (newest version of each name, or all versions)."""
        selected = (self.record.name, self.record.version) if self.record else None
        self.records = self.db.models.find(latest_only=not self.all_versions.value)
        self.table.unobserve(self._on_row, names="value")
        self.table.options = [(row_text(r), i) for i, r in enumerate(self.records)]
        self.table.value = None
        self.table.observe(self._on_row, names="value")
        names = {r.name for r in self.records}
        self.header.value = (f"<b>Potentials in database {html.escape(self.db.name)}</b>: {len(names)} names, "
                             f"{len(self.records)} {'versions' if self.all_versions.value else 'latest versions'}")
        keys = [(r.name, r.version) for r in self.records]
        if selected in keys:
            self.table.value = keys.index(selected)
        else:
            self.record = None
            self.load_button.disabled = self.export_button.disabled = True
        if not self.records:
            self._say("no models saved yet: save one with db.models.save(model, 'name')")
        elif self.record is None:
            self._say(f"{len(self.records)} models: click a row to see its errors and provenance")

    def _on_row(self, change: dict[str, Any]) -> None:
        if change["new"] is not None:
            self.select(change["new"])

    def select(self, index: int) -> None:
        """Show record ``index`` of the table: errors per split, provenance; enables Load and Export."""
        self.record = self.records[index]
        self.details.value = record_details(self.record)
        self.load_button.disabled = self.export_button.disabled = False
        self._say(f"{self.record.name} v{self.record.version} selected: Load hands it to Python as .model, "
                  "Export writes its n2p2 files")

    # -- actions -------------------------------------------------------------------------------------------
    @guarded("loading the model")
    def load(self):
        """Load the selected model with ``db.models.load`` into ``model`` and return it."""
        rec = self._selected()
        self._say(f"loading {rec.name} v{rec.version} …")
        self.model = self.db.models.load(rec.name, rec.version)
        kind = "ensemble of " + str(rec.n_members) if rec.kind == "ensemble" else "HDNNP"
        self._say(f"loaded {rec.name} v{rec.version} ({kind}; elements {' '.join(rec.elements)}; cutoff "
                  f"{rec.cutoff:.3g} Å) as .model: e.g. atoms.calc = browser.model.calculator()")
        return self.model

    @guarded("export")
    def export(self) -> Path | None:
        """Write the selected model's n2p2 files and provenance.json into the ``folder`` text (default
        ``NAME-vVERSION`` in the working folder) with ``db.models.export``; returns the folder."""
        rec = self._selected()
        text = self.folder.value.strip()
        folder = Path(os.path.expanduser(text)) if text else Path(f"{rec.name}-v{rec.version}")
        if folder.exists() and not folder.is_dir():
            raise MLMDError(f"{folder} is a file, not a folder: type another folder name")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise MLMDError(f"cannot create folder {folder} ({err.strerror}): type a folder you can write to") from None
        out = self.db.models.export(rec.name, folder, rec.version).resolve()
        self.exported = out
        files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
        self._say(f"exported {rec.name} v{rec.version} to {out}: {', '.join(files)}")
        return out

    def _selected(self) -> ModelRecord:
        if self.record is None:
            raise MLMDError("no model selected: click a row of the table first")
        return self.record

    # -- messages ------------------------------------------------------------------------------------------
    def _say(self, message: str, error: bool = False) -> None:
        self.status.value = status_html(message, error)
        self.status_text = message

    def _fail(self, message: str) -> None:
        self._say(message, error=True)


def row_text(rec: ModelRecord) -> str:
    """One table row: name, version, elements, test RMSEs (meV/atom, meV/Å), creation time, description."""
    energy, force = rec.rmse("test")
    created = rec.created.strftime("%Y-%m-%d %H:%M") if rec.created else "-"
    cells = [rec.name, str(rec.version), " ".join(rec.elements), _num(energy), _num(force), created,
             " ".join(rec.description.split())[:80] or "-"]
    return " ".join(pad(c, w, right=i in (1, 3, 4)) for i, (c, (_, w)) in enumerate(zip(cells, COLUMNS, strict=True)))


def record_details(rec: ModelRecord) -> str:
    """HTML of one saved model: summary with owner, visibility and whose data it was trained on (the credit
    line), RMSE per split, provenance (query, data counts, config, software)."""
    esc = html.escape
    out = [f"<b>{esc(rec.name)} v{rec.version}</b>", credit_line(rec)]
    out.append(_table(sharing_rows(rec) + [(k, v) for k, v in rec._summary_rows() if k not in ("owner", "credit")]))
    errors = [(split, *rec.rmse(split)) for split in ("train", "validation", "test") if split in rec.errors]
    if errors:
        body = "".join(f"<tr><td>{esc(s)}</td><td>{_num(e)}</td><td>{_num(f)}</td></tr>" for s, e, f in errors)
        out.append("<b>RMSE</b><table class='mlmd-model-errors'><tr><th>split</th><th>energy (meV/atom)</th>"
                   f"<th>force (meV/Å)</th></tr>{body}</table>")
    else:
        out.append("<b>RMSE</b>: not recorded (save with metadata={'errors': {...}})")
    prov = rec.provenance
    out.append("<b>data</b>" + _table(data_counts(prov)))
    for key in SECTIONS:
        if key in prov:
            out.append(f"<b>{esc(key)}</b>{_json_block(prov[key])}")
    other = {k: v for k, v in prov.items() if k not in (*SECTIONS, "errors", "frame_ids", "n_frames")}
    if other:
        out.append(f"<b>other provenance</b>{_json_block(other)}")
    out.append("<b>software</b>" + _table(sorted(rec.software.items())))
    return "".join(f"<div>{part}</div>" for part in out)


def credit_line(rec: ModelRecord) -> str:
    """HTML of ``rec.credit_text()``: whose data sets (frames, licence) the model was trained on."""
    return f"<span class='mlmd-model-credit'>{html.escape(rec.credit_text())}</span>"


def sharing_rows(rec: ModelRecord) -> list[tuple[str, str]]:
    """Rows "owner" and "visibility" (private, public or group:<name>) of a saved model."""
    return [("owner", rec.owner or "-"), ("visibility", visibility_text(rec.visibility, rec.group))]


def data_counts(prov: dict[str, Any]) -> list[tuple[str, str]]:
    """Rows of training-data counts: n_frames and the size of each ``frame_ids`` list (per split if a dict)."""
    rows = []
    if "n_frames" in prov:
        rows.append(("frames", str(prov["n_frames"])))
    ids = prov.get("frame_ids")
    if isinstance(ids, list):
        rows.append(("frame ids", str(len(ids))))
    elif isinstance(ids, dict):
        rows += [(f"frame ids ({k})", str(len(v))) for k, v in ids.items() if isinstance(v, list)]
    return rows or [("frames", "not recorded")]


def _json_block(value: Any) -> str:
    text = json.dumps(value, indent=1, sort_keys=True, default=str, ensure_ascii=False)
    if len(text) > MAX_JSON:
        text = text[:MAX_JSON] + f"\n… ({len(text) - MAX_JSON} more characters: see browser.record.provenance)"
    return f"<pre style='margin:2px 0;max-height:200px;overflow:auto'>{html.escape(text)}</pre>"


def _table(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"

