"""The potential database ("model registry"): trained HDNNPs and ensembles with their provenance.

>>> db = mlmd_lab.connect()
>>> db.models.save(model, "CuS-pbe", description="first try", tags=["test"])   # version 1, 2, ... per name
>>> db.models.find(elements=["Cu", "S"])                                        # latest version of each name
>>> model = db.models.load("CuS-pbe")                                            # an HDNNP or an Ensemble
>>> db.models.export("CuS-pbe", "nnp/")                                          # n2p2 files for LAMMPS/n2p2

An ensemble's force calibration (the per-element factors from raw committee spread to calibrated uncertainty,
:meth:`~mlmd_lab.train.ensemble.Ensemble.calibrate`) is stored in the document (``calibration``) and restored
on load, so MD and active learning use it.

Storage: the n2p2 files (``input.nn``, ``scaling.data``, ``weights.NNN.data``; an ensemble's members in
``member_K/``) go to the GridFS bucket ``models`` (collections ``models.files`` and ``models.chunks``), byte
for byte as :meth:`HDNNP.to_n2p2` wrote them, with their SHA-256 in the model document. Each save adds one
document to the ``models`` collection, inserted only after every file is uploaded, so a reader never sees a
half-written model. Versions are numbered per name; a unique index on (name, version) makes two concurrent
saves of one name get different versions.

GridFS on the embedded SecantusDB server was checked (upload, download, delete, chunk edits) and works, so
no plain-collection fallback is needed.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import html
import json
import os
import platform
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import bson
import gridfs
import numpy as np
from ase import units
from bson import ObjectId
from pymongo import ASCENDING, DESCENDING
from pymongo.errors import DuplicateKeyError, PyMongoError

from mlmd_lab.db.documents import elements_filter
from mlmd_lab.errors import DatabaseError, MLMDError

if TYPE_CHECKING:
    from mlmd_lab.db.store import Database
    from mlmd_lab.potentials.model import HDNNP
    from mlmd_lab.train.ensemble import Ensemble

COLLECTION = "models"
BUCKET = "models"
#: Provenance larger than this (BSON bytes) is kept whole in a GridFS file ``provenance.json`` (MongoDB
#: documents are limited to 16 MiB; a training set's frame ids alone can exceed that); the document then
#: holds only the provenance entries smaller than :data:`ABRIDGED_ENTRY_LIMIT`.
PROVENANCE_INLINE_LIMIT = 4 * 1024 * 1024
ABRIDGED_ENTRY_LIMIT = 64 * 1024
#: Marker of a dict stored as a JSON string (its keys are not valid MongoDB field names, or it is a query).
JSON_MARKER = "__json__"
_MAX_VERSION_RETRIES = 50


@dataclass
class ModelRecord:
    """What the database knows about one saved model version (the ``models`` document).

    Units: ``cutoff`` in Å; ``energy_unit``/``length_unit`` are the potential's own units (n2p2 files carry
    none); errors in ``provenance["errors"]`` are ``energy_rmse`` in eV/atom, ``force_rmse`` in eV/Å and
    ``stress_rmse`` (frames with a stress) in eV/Å³, displayed in GPa.
    """

    name: str
    version: int
    kind: str
    n_members: int
    elements: list[str]
    energy_unit: str
    length_unit: str
    cutoff: float
    architecture: dict[str, Any] = field(default_factory=dict)
    symmetry_functions: dict[str, int] = field(default_factory=dict)
    files: list[dict[str, Any]] = field(default_factory=list)
    description: str = ""
    tags: list[str] = field(default_factory=list)
    created: datetime | None = None
    software: dict[str, str] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    member_provenance: list[dict[str, Any]] = field(default_factory=list)
    calibration: dict[str, Any] | None = None
    chemsys: str = ""
    id: str | None = None
    owner: str | None = None
    visibility: str = "private"
    group: str | None = None
    credit: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_document(cls, doc: dict[str, Any], provenance: dict[str, Any] | None = None) -> ModelRecord:
        """A record from a ``models`` document (``provenance``: the full one when it is kept in a file)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in doc.items() if k in names}
        values["id"] = str(doc["_id"]) if "_id" in doc else None
        values["provenance"] = provenance if provenance is not None else _restore(doc.get("provenance", {}))
        values["member_provenance"] = [_restore(m) for m in doc.get("member_provenance", [])]
        return cls(**values)

    # -- derived ---------------------------------------------------------------------------------------
    @property
    def errors(self) -> dict[str, dict[str, float]]:
        """``provenance["errors"]``: {"train"|"validation"|"test": {"energy_rmse" (eV/atom), "force_rmse"
        (eV/Å), "stress_rmse" (eV/Å³, when the frames had stresses), ...}} (empty when saved without errors)."""
        errors = self.provenance.get("errors")
        return errors if isinstance(errors, dict) else {}

    @property
    def n_frames(self) -> int | None:
        """Training frames: ``provenance["n_frames"]``, else the number of ``provenance["frame_ids"]`` (a list,
        or a dict of lists such as {"train": [...], "validation": [...]}); None if unknown."""
        n = self.provenance.get("n_frames")
        if isinstance(n, int):
            return n
        ids = self.provenance.get("frame_ids")
        if isinstance(ids, list):
            return len(ids)
        if isinstance(ids, dict) and all(isinstance(v, list) for v in ids.values()):
            return sum(len(v) for v in ids.values())
        return None

    def rmse(self, subset: str = "validation") -> tuple[float | None, float | None]:
        """(energy RMSE in meV/atom, force RMSE in meV/Å) of a subset, None where not recorded."""
        errs = self.errors.get(subset) or {}
        e, f = errs.get("energy_rmse"), errs.get("force_rmse")
        return (None if e is None else 1000.0 * float(e), None if f is None else 1000.0 * float(f))

    def stress_rmse(self, subset: str = "validation") -> float | None:
        """Stress RMSE of a subset in GPa (from ``stress_rmse`` in eV/Å³), None where not recorded."""
        value = (self.errors.get(subset) or {}).get("stress_rmse")
        return None if value is None else float(value) / units.GPa

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-compatible values (datetime as ISO 8601, ids as strings)."""
        out = dataclasses.asdict(self)
        out["created"] = self.created.isoformat() if self.created else None
        out["files"] = [{**f, "id": str(f["id"])} for f in self.files]
        return json.loads(json.dumps(out, default=_json_default))

    def credit_text(self) -> str:
        """One line: whose data the potential was trained on, e.g. "trained on alice's data set 'Cu-bulk'
        (40 frames, CC-BY-4.0) and bob's data set 'S8' (30 frames, CC-BY-4.0)"."""
        return credit_text(self.credit)

    # -- display ---------------------------------------------------------------------------------------
    def _summary_rows(self) -> list[tuple[str, str]]:
        created = self.created.strftime("%Y-%m-%d %H:%M UTC") if self.created else "-"
        n = self.n_frames
        rows = [("elements", " ".join(self.elements)),
                ("kind", self.kind + (f" ({self.n_members} members)" if self.kind == "ensemble" else "")),
                ("units", f"{self.energy_unit}, {self.length_unit}; cutoff {self.cutoff:.3g} Å"),
                ("architecture", _architecture_text(self.architecture, self.symmetry_functions)),
                ("training frames", "-" if n is None else str(n)),
                ("created", created)]
        if self.owner:
            shared = self.visibility + (f" ({self.group})" if self.group else "")
            rows.append(("owner", f"{self.owner}, {shared}"))
        if self.credit:
            rows.append(("credit", self.credit_text()))
        if self.calibration:
            scale = ", ".join(f"{e} x{float(v):.3g}" for e, v in self.calibration.get("force_scale", {}).items())
            rows.append(("force calibration", f"{scale} (on {self.calibration.get('n_frames', '?')} "
                                              f"{self.calibration.get('split', '')} frames)"))
        if self.tags:
            rows.append(("tags", ", ".join(self.tags)))
        if self.description:
            rows.append(("description", self.description))
        return rows

    def _error_rows(self) -> list[tuple[str, ...]]:
        """(subset, energy meV/atom, force meV/Å[, stress GPa]) per recorded subset; the stress column only when
        some subset has a stress error."""
        subsets = [s for s in ("train", "validation", "test") if s in self.errors]
        stress = any(self.stress_rmse(s) is not None for s in subsets)
        rows = []
        for subset in subsets:
            e, f = self.rmse(subset)
            rows.append((subset, _fmt(e), _fmt(f)) + ((_fmt(self.stress_rmse(subset)),) if stress else ()))
        return rows

    def __str__(self) -> str:
        lines = [f"model {self.name} v{self.version}"]
        lines += [f"  {k:<16} {v}" for k, v in self._summary_rows()]
        errors = self._error_rows()
        if errors:
            stress = len(errors[0]) > 3
            lines.append(f"  {'RMSE':<16} {'energy meV/atom':>16} {'force meV/Å':>12}"
                         + (f" {'stress GPa':>11}" if stress else ""))
            lines += [f"  {r[0]:<16} {r[1]:>16} {r[2]:>12}" + (f" {r[3]:>11}" if stress else "") for r in errors]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        esc = html.escape
        rows = "".join(f"<tr><th style='text-align:left'>{esc(k)}</th><td style='text-align:left'>{esc(v)}</td>"
                       "</tr>" for k, v in self._summary_rows())
        out = f"<div><b>model {esc(self.name)} v{self.version}</b><table>{rows}</table>"
        errors = self._error_rows()
        if errors:
            body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in errors)
            stress = "<th>stress (GPa)</th>" if len(errors[0]) > 3 else ""
            out += (f"<table><tr><th>RMSE</th><th>energy (meV/atom)</th><th>force (meV/Å)</th>{stress}</tr>"
                    f"{body}</table>")
        return out + "</div>"


class ModelStore:
    """Trained potentials of one database (``db.models``): save, find, load, export, delete."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self.collection = database.mongo[COLLECTION]
        self.bucket = gridfs.GridFSBucket(database.mongo, bucket_name=BUCKET)
        self._buckets: dict[str, gridfs.GridFSBucket] = {database.mongo.name: self.bucket}

    def _bucket_of(self, doc: dict[str, Any]) -> gridfs.GridFSBucket:
        name = doc.get("_db") or self.database.mongo.name
        if name not in self._buckets:
            self._buckets[name] = gridfs.GridFSBucket(self.database.client[name], bucket_name=BUCKET)
        return self._buckets[name]

    def _visible(self) -> list[tuple[Any, Any]]:
        """(area, models collection) of every database the caller may read (see ``Database.areas``)."""
        return [(area, mdb[COLLECTION]) for area, mdb in self.database._each_area()]

    def _found(self, area: Any, collection: Any, q: dict[str, Any], projection: Any = None,
               **kwargs: Any) -> list[dict[str, Any]]:
        docs = list(collection.find(q, projection, **kwargs))
        for d in docs:
            d["_db"] = collection.database.name
            if self.database.managed:
                area.stamp(d)
            else:
                d.setdefault("owner", self.database.user)
        return docs

    def __repr__(self) -> str:
        return f"<mlmd_lab ModelStore of {self.database!r}>"

    def ensure_indexes(self) -> None:
        """The unique (name, version) index that numbers versions safely, and query indexes (idempotent)."""
        self.collection.create_index([("name", ASCENDING), ("version", ASCENDING)], unique=True)
        for key in ("elements", "chemsys", "tags"):
            self.collection.create_index(key)

    # -- save --------------------------------------------------------------------------------------------
    def save(self, model: HDNNP | Ensemble, name: str, *, description: str = "", tags: Iterable[str] = (),
             metadata: dict[str, Any] | None = None, visibility: str = "private",
             group: str | None = None) -> ModelRecord:
        """Store a potential or ensemble as the next version of ``name``.

        Args:
            model: an :class:`HDNNP` or an :class:`Ensemble`.
            name: the model's name; versions are numbered 1, 2, ... per name.
            description: free text.
            tags: labels to find the model by.
            metadata: provenance merged over ``model.metadata`` (training query, frame ids, settings
                signatures, errors as {"validation": {"energy_rmse": eV/atom, "force_rmse": eV/Å}}, config).
            visibility: "private" (default), "group" (the members of ``group`` read it) or "public" (everyone
                reads it; nobody changes or deletes it).
            group: the group for ``visibility="group"`` (default: your only group).

        The model records whose data it was trained on (``provenance["credit"]``: owners, data sets,
        licences, frame counts; frame ids in ``provenance["frame_ids"]``). Saving is refused when a data
        set's licence forbids derived works (``-ND``) and the data is not the saver's own; a non-commercial
        licence (``-NC``) is recorded and warned about.

        Returns:
            the :class:`ModelRecord` of the new version.
        """
        from mlmd_lab.db.access import VISIBILITIES

        members, kind = _members_of(model)
        name = _check_name(name)
        if visibility not in VISIBILITIES:
            raise MLMDError(f"visibility {visibility!r} is not one of {', '.join(VISIBILITIES)}")
        provenance = {**dict(getattr(model, "metadata", None) or {}), **dict(metadata or {})}
        credit = _check_licences(provenance.get("credit") or [], self.database.user, name)
        target = self._target(visibility, group)
        doc = _describe(members, kind, name, description, list(tags))
        doc.update(owner=self.database.user, visibility=visibility, credit=_bson_safe(credit, "credit"))
        if visibility == "group" and not self.database.managed:
            doc["group"] = group
        safe = _bson_safe(provenance, "provenance")
        big = _bson_size(safe) > PROVENANCE_INLINE_LIMIT
        doc["provenance"] = _abridged(safe) if big else safe
        doc["member_provenance"] = [_bson_safe(dict(m.metadata or {}), f"member {k} metadata")
                                    for k, m in enumerate(members)] if kind == "ensemble" else []
        calibration = getattr(model, "calibration", None) if kind == "ensemble" else None
        doc["calibration"] = None if calibration is None else _bson_safe(calibration, "calibration")
        _check_bson(doc, name)
        uploaded: list[ObjectId] = []
        store = self if target is None else _TargetStore(self, target)
        try:
            store.ensure_indexes()
            doc["files"] = store._upload_model(members, kind, name, uploaded)
            if big:
                doc["provenance_file"] = store._upload(name, "provenance.json", _provenance_json(safe), uploaded)
            store._insert_next_version(doc)
        except BaseException as err:
            store._delete_files(uploaded)
            if isinstance(err, PyMongoError):
                raise DatabaseError(f"saving model {name!r} failed ({type(err).__name__}: {err}); nothing was "
                                    "stored") from err
            raise
        if self.database.managed:
            doc["_db"] = store.collection.database.name
            from mlmd_lab.db.access import parse_area

            parse_area(doc["_db"], self.database.user).stamp(doc)
        return ModelRecord.from_document(doc, provenance=_restore(safe))

    def _target(self, visibility: str, group: str | None) -> Any:
        """The database a new model goes to (None: this database)."""
        if not self.database.managed or visibility == "private":
            return None
        from mlmd_lab.db.access import group_db, public_db

        if visibility == "group":
            return self.database.client[group_db(self.database._my_group(group), self.database.user)]
        return self.database.client[public_db(self.database.user)]

    def show(self, name: str, version: int | None = None) -> ModelRecord:
        """The record of ``name`` for display (``print`` it, or the notebook shows it as a table), with
        whose data it was trained on."""
        return self.record(name, version)

    def _upload_model(self, members: list[HDNNP], kind: str, name: str, uploaded: list[ObjectId]) -> list[dict]:
        files = []
        with tempfile.TemporaryDirectory(prefix="mlmd-model-") as tmp:
            for k, member in enumerate(members):
                prefix = f"member_{k}/" if kind == "ensemble" else ""
                folder = member.to_n2p2(Path(tmp) / f"m{k}")
                for path in sorted(folder.iterdir()):
                    files.append(self._upload(name, prefix + path.name, path.read_bytes(), uploaded))
        return files

    def _upload(self, name: str, relpath: str, data: bytes, uploaded: list[ObjectId]) -> dict[str, Any]:
        digest = hashlib.sha256(data).hexdigest()
        file_id = self.bucket.upload_from_stream(f"{name}/{relpath}", data,
                                                 metadata={"model": name, "path": relpath, "sha256": digest})
        uploaded.append(file_id)
        return {"path": relpath, "id": file_id, "sha256": digest, "size": len(data)}

    def _insert_next_version(self, doc: dict[str, Any]) -> None:
        """Insert with version = latest + 1; on a clash with a concurrent save, take the next number."""
        for _ in range(_MAX_VERSION_RETRIES):
            latest = self.collection.find_one({"name": doc["name"]}, {"version": 1}, sort=[("version", DESCENDING)])
            doc["version"] = (latest["version"] if latest else 0) + 1
            now = datetime.now(UTC)
            doc["created"] = now.replace(microsecond=now.microsecond // 1000 * 1000)  # BSON keeps milliseconds
            doc.pop("_id", None)
            try:
                self.collection.insert_one(doc)
                return
            except DuplicateKeyError:
                continue
        raise DatabaseError(f"could not number a new version of model {doc['name']!r} after "
                            f"{_MAX_VERSION_RETRIES} tries (too many concurrent saves); save again")

    # -- query -------------------------------------------------------------------------------------------
    def find(self, name: str | None = None, elements: Iterable[str] | str | None = None, exclusive: bool = False,
             tags: Iterable[str] | None = None, latest_only: bool = True) -> list[ModelRecord]:
        """Saved models matching all criteria, sorted by name and version.

        Args:
            name: only this name.
            elements: with ``exclusive=False``, models covering all of these elements (and maybe others);
                with ``exclusive=True``, models whose elements are all among these (a subset).
            tags: models carrying all of these tags.
            latest_only: only the newest version of each name.
        """
        q: dict[str, Any] = {}
        if name is not None:
            q["name"] = name
        if elements:
            q.update(elements_filter(elements, exclusive))
        if tags:
            q.setdefault("$and", []).extend({"tags": t} for t in tags)
        docs = [d for area, coll in self._visible() for d in self._found(area, coll, q)]
        docs.sort(key=lambda d: (d["name"], d["version"]))
        if latest_only:
            newest = {d["name"]: d for d in docs}  # ascending versions: the last one of each name wins
            docs = [newest[n] for n in sorted(newest)]
        return [self._record(d) for d in docs]

    def names(self) -> dict[str, list[int]]:
        """{name: [versions]} of every model the caller may see."""
        out: dict[str, list[int]] = {}
        docs = [d for area, coll in self._visible() for d in self._found(area, coll, {}, {"name": 1, "version": 1})]
        for d in sorted(docs, key=lambda d: (d["name"], d["version"])):
            if d["version"] not in out.setdefault(d["name"], []):
                out[d["name"]].append(d["version"])
        return out

    def record(self, name: str, version: int | None = None) -> ModelRecord:
        """The :class:`ModelRecord` of ``name`` (latest version unless ``version`` is given)."""
        return self._record(self._document(name, version))

    # -- load / export -----------------------------------------------------------------------------------
    def load(self, name: str, version: int | None = None, dtype: str = "float64") -> HDNNP | Ensemble:
        """The saved potential (an :class:`HDNNP`, or an :class:`Ensemble` for a committee).

        The files are checked against their SHA-256; ``.metadata`` is the stored provenance. Evaluation is
        in ``dtype`` ("float64" or "float32"); results are in eV and Å as for any HDNNP.
        """
        from mlmd_lab.potentials.model import HDNNP

        if dtype not in ("float64", "float32"):
            raise MLMDError(f"dtype must be 'float64' or 'float32', not {dtype!r}")
        doc = self._document(name, version)
        record = self._record(doc)
        with tempfile.TemporaryDirectory(prefix="mlmd-model-") as tmp:
            self._write_files(record, Path(tmp))
            folders = [Path(tmp) / f"member_{k}" for k in range(record.n_members)] \
                if record.kind == "ensemble" else [Path(tmp)]
            members = [HDNNP.from_n2p2(f, record.energy_unit, record.length_unit, dtype) for f in folders]
        if record.kind == "hdnnp":
            members[0].metadata = record.provenance
            return members[0]
        from mlmd_lab.train.ensemble import Ensemble

        for member, meta in zip(members, record.member_provenance, strict=False):
            member.metadata = meta
        return Ensemble(members, metadata=record.provenance, calibration=record.calibration)

    def export(self, name: str, folder: str | os.PathLike, version: int | None = None) -> Path:
        """Write the stored n2p2 files (exactly the stored bytes; an ensemble's in ``member_K/``) and
        ``provenance.json`` (the whole record: units, architecture, provenance) into ``folder``; returns it.

        Existing files of the same names are overwritten.
        """
        record = self.record(name, version)
        out = Path(folder)
        self._write_files(record, out)
        text = json.dumps(record.to_dict(), indent=2, ensure_ascii=False, sort_keys=True)
        (out / "provenance.json").write_text(text + "\n", encoding="utf-8")
        return out

    # -- delete ------------------------------------------------------------------------------------------
    def delete(self, name: str, version: int) -> None:
        """Remove one saved version (its document, then its files). Published models cannot be deleted."""
        doc = self._document(name, version)
        if doc.get("_db", self.database.mongo.name) != self.database.mongo.name and doc.get("visibility") == "public":
            raise MLMDError(f"model {name!r} v{version} is published: published models are never deleted (an "
                            "administrator can retract them)")
        coll = self.database.client[doc.get("_db", self.database.mongo.name)][COLLECTION]
        coll.delete_one({"_id": doc["_id"]})
        ids = [f["id"] for f in doc.get("files", [])]
        if doc.get("provenance_file"):
            ids.append(doc["provenance_file"]["id"])
        self._delete_files(ids, self._bucket_of(doc))

    # -- internals ---------------------------------------------------------------------------------------
    def _document(self, name: str, version: int | None) -> dict[str, Any]:
        q: dict[str, Any] = {"name": name}
        if version is not None:
            q["version"] = int(version)
        for area, coll in self._visible():  # own databases first: your own model of a name wins
            docs = self._found(area, coll, q, sort=[("version", DESCENDING)], limit=1)
            if docs:
                return docs[0]
        known = self.names()
        if name in known:
            raise MLMDError(f"model {name!r} has no version {version}; saved versions: "
                            f"{', '.join(map(str, known[name]))}")
        listing = ", ".join(known) if known else "none saved yet"
        raise MLMDError(f"no model named {name!r} in database {self.database.name!r}; saved models: {listing}")

    def _record(self, doc: dict[str, Any]) -> ModelRecord:
        provenance = None
        if doc.get("provenance_file"):
            data = self._download(doc["name"], doc["version"], doc["provenance_file"], self._bucket_of(doc))
            provenance = _restore(json.loads(data))
        record = ModelRecord.from_document(doc, provenance)
        record._db = doc.get("_db")  # type: ignore[attr-defined]
        return record

    def _write_files(self, record: ModelRecord, folder: Path) -> None:
        bucket = self._bucket_of({"_db": getattr(record, "_db", None)})
        for entry in record.files:
            data = self._download(record.name, record.version, entry, bucket)
            target = folder / entry["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)

    def _download(self, name: str, version: int, entry: dict[str, Any], bucket: Any = None) -> bytes:
        where = f"file {entry['path']!r} of model {name!r} v{version}"
        try:
            data = (bucket or self.bucket).open_download_stream(entry["id"]).read()
        except gridfs.errors.NoFile:
            raise DatabaseError(f"{where} is missing from GridFS bucket {BUCKET!r}; the model is damaged: "
                                "delete this version and save it again") from None
        except gridfs.errors.GridFSError as err:
            raise DatabaseError(f"{where} is corrupt in GridFS ({err}); delete this version and save it "
                                "again") from None
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise DatabaseError(f"{where} is corrupt: its SHA-256 differs from the one recorded at save; delete "
                                "this version and save it again")
        return data

    def _delete_files(self, ids: Sequence[ObjectId], bucket: Any = None) -> None:
        for file_id in ids:
            try:
                (bucket or self.bucket).delete(file_id)
            except (gridfs.errors.NoFile, PyMongoError):
                pass  # best effort: an orphaned file is harmless, a masked original error is not


class _TargetStore(ModelStore):
    """The writing half of a :class:`ModelStore` on another database (group-shared or published)."""

    def __init__(self, parent: ModelStore, mongo: Any) -> None:
        self.database = parent.database
        self.collection = mongo[COLLECTION]
        self.bucket = gridfs.GridFSBucket(mongo, bucket_name=BUCKET)
        self._buckets = {mongo.name: self.bucket}


def credit_text(credit: list[dict[str, Any]]) -> str:
    """ "trained on alice's data set 'Cu' (40 frames, CC-BY-4.0) and bob's data set 'S' (30 frames, CC0-1.0)"."""
    if not credit:
        return "no data-set record"
    parts = []
    for c in credit:
        who = f"{c['owner']}'s" if c.get("owner") else "unrecorded"
        what = f"data set {c['dataset']!r}" if c.get("dataset") else "data"
        parts.append(f"{who} {what} ({c.get('frames', '?')} frames, {c.get('licence') or 'licence unknown'})")
    return "trained on " + (", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0])


def _check_licences(credit: list[dict[str, Any]], user: str, name: str) -> list[dict[str, Any]]:
    """Refuse a model derived from someone else's no-derivatives data; warn about non-commercial data."""
    import warnings

    from mlmd_lab.db.access import LICENCES

    forbidden = [c for c in credit if c.get("owner") not in (None, user)
                 and not LICENCES.get(c.get("licence") or "", {}).get("derive", True)]
    if forbidden:
        what = ", ".join(f"{c['owner']}'s {c.get('dataset')!r} ({c['licence']})" for c in forbidden)
        raise MLMDError(f"model {name!r} was trained on {what}: that licence forbids derived works such as a "
                        "potential; train without that data set, or ask its owner for a licence that allows it")
    restricted = [c for c in credit if c.get("owner") not in (None, user)
                  and not LICENCES.get(c.get("licence") or "", {}).get("commercial", True)]
    if restricted:
        what = ", ".join(f"{c['owner']}'s {c.get('dataset')!r} ({c['licence']})" for c in restricted)
        warnings.warn(f"MODEL {name!r} IS FOR NON-COMMERCIAL USE ONLY: it was trained on {what}", stacklevel=3)
    return credit


# -- describing a model -------------------------------------------------------------------------------------
def _members_of(model: Any) -> tuple[list[HDNNP], str]:
    from mlmd_lab.potentials.model import HDNNP
    from mlmd_lab.train.ensemble import Ensemble

    if isinstance(model, HDNNP):
        return [model], "hdnnp"
    if isinstance(model, Ensemble):
        return list(model.members), "ensemble"
    raise MLMDError(f"can only save an HDNNP or an Ensemble, not {type(model).__name__}")


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise MLMDError(f"model name must be a non-empty string without surrounding spaces, not {name!r}")
    return name


def _describe(members: list[HDNNP], kind: str, name: str, description: str, tags: list[str]) -> dict[str, Any]:
    from mlmd_lab.potentials.network import layer_sizes, n_connections

    first = members[0]
    s = first.settings
    elements = sorted(first.elements)
    parameters = sum(n_connections(layer_sizes(len(first.functions[e]), s.hidden)) for e in first.elements)
    return {
        "name": name, "kind": kind, "n_members": len(members), "elements": elements,
        "chemsys": "-".join(elements), "energy_unit": first.energy_unit, "length_unit": first.length_unit,
        "cutoff": float(first.cutoff),
        "architecture": {"hidden": [int(h) for h in s.hidden], "activations": s.activations,
                         "cutoff_type": int(s.cutoff_type), "cutoff_alpha": float(s.cutoff_alpha),
                         "scaling": s.scaling, "normalize_nodes": bool(s.normalize_nodes),
                         "parameters_per_member": int(parameters)},
        "symmetry_functions": {e: len(first.functions[e]) for e in first.elements},
        "description": str(description), "tags": [str(t) for t in tags], "software": _software_versions(),
    }


def _software_versions() -> dict[str, str]:
    import ase
    import jax
    import pymongo

    import mlmd_lab

    return {"mlmd_lab": mlmd_lab.__version__, "jax": jax.__version__, "numpy": np.__version__,
            "ase": ase.__version__, "pymongo": pymongo.version, "python": platform.python_version()}


def _architecture_text(arch: dict[str, Any], functions: dict[str, int]) -> str:
    hidden = "-".join(str(h) for h in arch.get("hidden", []))
    sf = ", ".join(f"{e} {n}" for e, n in functions.items())
    return f"hidden {hidden or '-'} ({arch.get('activations', '?')}); symmetry functions {sf}"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


# -- BSON-safe provenance -----------------------------------------------------------------------------------
def _bson_safe(obj: Any, where: str) -> Any:
    """``obj`` with numpy values as Python ones, tuples/sets as lists, non-string keys as strings, and every
    dict whose keys MongoDB refuses (``$...``, dotted) or that is a query (key ``query`` or ``*_query``)
    stored as ``{JSON_MARKER: json string}`` (see :func:`_restore`)."""
    if isinstance(obj, dict):
        items = {str(k): v for k, v in obj.items()}
        if any(not _valid_key(k) for k in items):
            return _as_json(obj, where)
        return {k: (_as_json(v, f"{where}.{k}") if _is_query_key(k) and isinstance(v, dict)
                    else _bson_safe(v, f"{where}.{k}")) for k, v in items.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [_bson_safe(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, np.ndarray):
        return _bson_safe(obj.tolist(), where)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, str | bool | float | datetime | ObjectId | bytes) or obj is None:
        return obj
    if isinstance(obj, int):
        return obj if -(2**63) <= obj < 2**63 else str(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, enum.Enum):
        return _bson_safe(obj.value, where)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _bson_safe(dataclasses.asdict(obj), where)
    raise MLMDError(f"{where} is a {type(obj).__name__}, which the model database cannot store; give "
                    "provenance as JSON-compatible values (dicts, lists, numbers, strings, numpy arrays)")


def _valid_key(key: str) -> bool:
    return bool(key) and not key.startswith("$") and "." not in key and "\0" not in key and key != JSON_MARKER


def _is_query_key(key: str) -> bool:
    return key == "query" or key.endswith("_query")


def _as_json(obj: Any, where: str) -> dict[str, str]:
    try:
        return {JSON_MARKER: json.dumps(obj, default=_json_default, sort_keys=False)}
    except (TypeError, ValueError) as err:
        raise MLMDError(f"{where} cannot be stored as JSON ({err}); give JSON-compatible values") from None


def _json_default(obj: Any) -> Any:
    from mlmd_lab.frames import json_default

    if isinstance(obj, datetime):
        return obj.isoformat()
    if isinstance(obj, bytes):
        return obj.hex()
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, ObjectId):
        return str(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    return json_default(obj)


def _restore(obj: Any) -> Any:
    """Inverse of :func:`_bson_safe`'s JSON wrapping: ``{JSON_MARKER: text}`` back to the dict."""
    if isinstance(obj, dict):
        if set(obj) == {JSON_MARKER} and isinstance(obj[JSON_MARKER], str):
            return json.loads(obj[JSON_MARKER])
        return {k: _restore(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_restore(v) for v in obj]
    return obj


def _bson_size(value: Any) -> int:
    return len(bson.encode({"v": value}))


def _abridged(provenance: dict[str, Any]) -> dict[str, Any]:
    """The entries of a large provenance small enough to keep in the document (the rest is in the file)."""
    return {k: v for k, v in provenance.items() if _bson_size(v) <= ABRIDGED_ENTRY_LIMIT}


def _provenance_json(safe: dict[str, Any]) -> bytes:
    """A BSON-safe provenance (see :func:`_bson_safe`) as UTF-8 JSON (read back with :func:`_restore`)."""
    return json.dumps(safe, default=_json_default, ensure_ascii=False).encode()


def _check_bson(doc: dict[str, Any], name: str) -> None:
    """Fail before uploading anything if the document cannot be stored."""
    try:
        size = len(bson.encode(doc))
    except (bson.errors.InvalidDocument, OverflowError) as err:
        raise MLMDError(f"model {name!r}: the description cannot be stored ({err})") from None
    if size > 15 * 1024 * 1024:
        raise MLMDError(f"model {name!r}: the model document would be {size / 2**20:.1f} MiB, over MongoDB's "
                        "16 MiB limit; shorten the description, tags or the members' metadata")
