"""The teacher-data database: one pymongo code path for the embedded server and any MongoDB.

>>> import mlmd_lab
>>> db = mlmd_lab.connect()                     # embedded server under the user's data folder
>>> db.ingest("runs/")                          # every vasprun.xml / pw.x output / ... below runs/
>>> water = db.frames(formula="H2O", settings={"xc": "PBE"})
>>> train, valid, test = water.split()
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pymongo
from pymongo import MongoClient, UpdateMany, UpdateOne
from pymongo.errors import ConfigurationError, InvalidURI, OperationFailure, PyMongoError

from mlmd_lab.db.documents import elements_filter, frame_from_document
from mlmd_lab.db.ingest import Ingestor, IngestReport, _Options
from mlmd_lab.db.server import EmbeddedServer
from mlmd_lab.errors import DatabaseError, MLMDError
from mlmd_lab.frameset import FrameSet

if TYPE_CHECKING:
    from mlmd_lab.db.models import ModelStore

URI_HINT = "expected mongodb://USER:PASSWORD@HOST:PORT/?tls=true (or mongodb+srv://...)"


def connect(
    uri: str | None = None,
    database: str = "mlmd",
    *,
    data_dir: str | os.PathLike | None = None,
    timeout: float = 10.0,
) -> Database:
    """Open the teacher-data database.

    Args:
        uri: a ``mongodb://`` or ``mongodb+srv://`` URI (user, password, TLS options in the URI).
            None: ``$MLMD_MONGODB_URI`` if set, else the embedded server of ``data_dir``, started or reused.
        database: database name on the server.
        data_dir: folder of the embedded server (default ``$MLMD_DATA_DIR`` or the user data folder).
        timeout: seconds to wait for the server before giving up.

    Raises:
        DatabaseError: malformed URI, unreachable server, failed authentication, or the embedded server
            could not start — with a one-line message naming the fix.
    """
    uri = uri or os.environ.get("MLMD_MONGODB_URI") or None
    server = None
    if uri is None:
        server = EmbeddedServer(data_dir)
        uri = server.ensure_running().uri
    _check_uri(uri)
    try:
        client: MongoClient = MongoClient(uri, serverSelectionTimeoutMS=int(timeout * 1000),
                                          connectTimeoutMS=int(timeout * 1000), appname="mlmd_lab",
                                          tz_aware=True)
        client.admin.command("ping")
    except OperationFailure as err:
        raise DatabaseError(f"MongoDB at {redact(uri)} refused the login ({err.details.get('errmsg', err)}): "
                            "check the user name, password and authSource in the URI") from None
    except PyMongoError as err:
        raise DatabaseError(f"cannot reach MongoDB at {redact(uri)} within {timeout:g} s "
                            f"({type(err).__name__}): check the server is running and the host, port and "
                            "TLS options in the URI, or call connect() with no URI for the embedded "
                            "database") from None
    db = Database(client, database, uri=uri, server=server)
    db.ensure_indexes()
    try:
        db.split_undeclared_signatures()
    except OperationFailure:  # a read-only user: frames() still tells the sources apart when reading
        pass
    return db


def redact(uri: str) -> str:
    """The URI with its password replaced by ``***`` (for messages and logs)."""
    return re.sub(r"(mongodb(?:\+srv)?://[^:/@]+:)[^@]*@", r"\1***@", uri)


def _check_uri(uri: str) -> None:
    if not uri.startswith(("mongodb://", "mongodb+srv://")):
        raise DatabaseError(f"not a MongoDB URI: {redact(uri)!r}; {URI_HINT}")
    try:
        pymongo.uri_parser.parse_uri(uri, validate=True, warn=False, connect_timeout=1.0)
    except (InvalidURI, ConfigurationError, ValueError) as err:
        raise DatabaseError(f"invalid MongoDB URI {redact(uri)!r} ({err}); {URI_HINT}") from None


@dataclass
class DatabaseSummary:
    """What the database holds (counts of complete calculations and their frames)."""

    calculations: int
    frames: int
    atoms: int
    by_code: dict[str, int] = field(default_factory=dict)
    by_chemsys: dict[str, int] = field(default_factory=dict)
    by_signature: list[dict[str, Any]] = field(default_factory=list)
    elements: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{self.calculations} calculations, {self.frames} frames, {self.atoms} atoms",
                 "elements: " + (" ".join(self.elements) or "-"),
                 "frames by code: " + (", ".join(f"{k} {v}" for k, v in self.by_code.items()) or "-"),
                 "frames by chemical system:"]
        lines += [f"  {k:<20} {v:>8}" for k, v in self.by_chemsys.items()]
        lines.append("frames by settings signature:")
        for s in self.by_signature:
            desc = ", ".join(f"{k}={s[k]}" for k in ("code", "xc", "vdw", "encut") if s.get(k) is not None)
            if not desc and s.get("dataset"):
                desc = f"settings not declared (data set {s['dataset'][:12]})"
            lines.append(f"  {s['_id'][:12]} {s['frames']:>8}  {desc or 'settings unknown'}")
        return "\n".join(lines)


class Database:
    """The frames, calculations and settings signatures of one MongoDB database (see :func:`connect`)."""

    def __init__(self, client: MongoClient, name: str, *, uri: str, server: EmbeddedServer | None = None):
        self.client = client
        self.name = name
        self.uri = uri
        self.server = server
        self.mongo = client[name]
        self.frames_collection = self.mongo["frames"]
        self.calculations_collection = self.mongo["calculations"]
        self.signatures_collection = self.mongo["signatures"]

    def __repr__(self) -> str:
        where = f"embedded server in {self.server.data_dir}" if self.server else redact(self.uri)
        return f"<mlmd_lab Database {self.name!r} on {where}>"

    def ensure_indexes(self) -> None:
        """Create the indexes that queries and ingest use (idempotent)."""
        f = self.frames_collection
        for keys in ("calc_id", "chemsys", "formula_reduced", "formula", "elements", "signature_id", "tags",
                     "natoms"):
            f.create_index(keys)
        self.calculations_collection.create_index("status")
        self.calculations_collection.create_index("signature_id")

    def split_undeclared_signatures(self) -> int:
        """Give each source stored under the old shared "settings unknown" signature its own signature.

        Before issue 14.2 every extxyz, n2p2 and DeePMD source without declared settings was stored under one
        all-unknown signature, so sources with different DFT energy zeros compared equal. This relabels their
        frames and calculations with the signature a new ingest gives them (``dataset`` = calculation id,
        see :func:`mlmd_lab.settings.with_dataset`). Idempotent (run by :func:`connect`); returns the number
        of calculations relabelled.
        """
        from mlmd_lab.settings import declares_settings, signature_hash, with_dataset

        legacy = [s for s in self.signatures_collection.find({"dataset": None, "code": None, "xc": None})
                  if not declares_settings({k: v for k, v in s.items() if k != "_id"})]
        relabelled = 0
        for old in legacy:
            old_id = old.pop("_id")
            calc_ids = set(self.frames_collection.distinct("calc_id", {"signature_id": old_id}))
            calc_ids |= set(self.calculations_collection.distinct("_id", {"signature_id": old_id}))
            if not calc_ids:
                continue
            sig_ops, frame_ops, calc_ops = [], [], []
            for calc_id in sorted(calc_ids):
                new = with_dataset(old, calc_id)
                new_id = signature_hash(new)
                sig_ops.append(UpdateOne({"_id": new_id}, {"$setOnInsert": new}, upsert=True))
                frame_ops.append(UpdateMany({"signature_id": old_id, "calc_id": calc_id},
                                            {"$set": {"signature_id": new_id}}))
                calc_ops.append(UpdateMany({"_id": calc_id, "signature_id": old_id},
                                           {"$set": {"signature_id": new_id}}))
            self.signatures_collection.bulk_write(sig_ops, ordered=False)
            self.frames_collection.bulk_write(frame_ops, ordered=False)
            self.calculations_collection.bulk_write(calc_ops, ordered=False)
            relabelled += len(calc_ids)
        return relabelled

    # -- ingest -----------------------------------------------------------------------------------
    def ingest(
        self,
        path: str | os.PathLike | Iterable[str | os.PathLike],
        *,
        units: str | tuple[str, str] | None = None,
        settings: dict[str, Any] | None = None,
        tags: Iterable[str] = (),
        last_only: bool = False,
        allow_unfinished: bool = False,
        workers: int | None = None,
        progress: bool | Callable[[int, int], None] = True,
        keys: dict[str, str] | None = None,
    ) -> IngestReport:
        """Ingest every recognised file below ``path`` (see :mod:`mlmd_lab.io` for the formats).

        Args:
            path: a file, a folder (walked recursively) or a list of them.
            units: ``(energy, length)`` of unit-less formats, e.g. ``("Ha", "Bohr")`` for n2p2 files.
            settings: signature values to declare for data without run settings (e.g. DeePMD sets:
                ``{"code": "cp2k", "xc": "SCAN"}``); they override what a reader found.
            tags: user tags stored on every frame and calculation.
            last_only: keep only the last ionic step of each run.
            allow_unfinished: keep the complete steps of runs that stopped early (default: fail them).
            workers: parser processes (None: one for small trees, up to 4 for trees over 64 MB).
            progress: show a progress bar, or a ``callback(done, total)``.
            keys: for extxyz files, which column holds a label, e.g. ``{"forces": "REF_forces"}``, where a
                file has two differing columns of one label (common spellings such as ``force``,
                ``dft_energy`` or ``virial`` are recognised without it; see :mod:`mlmd_lab.io.extxyz`).

        Returns:
            an :class:`IngestReport`; bad files are listed in ``.failed`` and never stop the batch.
        """
        from mlmd_lab.io.extxyz import check_keys

        paths = [path] if isinstance(path, str | os.PathLike) else list(path)
        keys = check_keys(keys)
        options = _Options(units=units, last_only=last_only, allow_unfinished=allow_unfinished,
                           settings=dict(settings) if settings else None, tags=tuple(tags),
                           keys=dict(keys) if keys else None)
        return Ingestor(self).run(paths, options, workers=workers, progress=progress)

    # -- queries ----------------------------------------------------------------------------------
    def frame_query(
        self,
        elements: Iterable[str] | None = None,
        exclusive: bool = False,
        formula: str | None = None,
        settings: dict[str, Any] | None = None,
        tags: Iterable[str] | None = None,
        natoms: tuple[int | None, int | None] | None = None,
        max_force: float | None = None,
        query: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The MongoDB filter :meth:`frames` uses (arguments as there)."""
        q: dict[str, Any] = {}
        if elements:
            q.update(elements_filter(elements, exclusive))
        if formula:
            q["formula_reduced"] = _reduced_formula(formula)
        if tags:
            q.setdefault("$and", []).extend({"tags": t} for t in tags)
        if natoms:
            lo, hi = natoms
            q["natoms"] = {k: v for k, v in (("$gte", lo), ("$lte", hi)) if v is not None}
        if max_force is not None:
            q["max_force"] = {"$lte": float(max_force)}
        if settings:
            q["signature_id"] = {"$in": self._signature_ids(settings)}
        unfinished = self.calculations_collection.distinct("_id", {"status": {"$ne": "complete"}})
        if unfinished:
            q["calc_id"] = {"$nin": unfinished}
        if query:
            q.update(query)
        return q

    def frames(
        self,
        elements: Iterable[str] | None = None,
        exclusive: bool = False,
        formula: str | None = None,
        settings: dict[str, Any] | None = None,
        tags: Iterable[str] | None = None,
        limit: int | None = None,
        *,
        natoms: tuple[int | None, int | None] | None = None,
        max_force: float | None = None,
        query: dict[str, Any] | None = None,
    ) -> FrameSet:
        """Labelled frames matching all given criteria, as a :class:`FrameSet` of ASE ``Atoms``.

        Args:
            elements: with ``exclusive=False``, frames containing all of these elements (and maybe
                others); with ``exclusive=True``, frames made only of these elements — every chemical
                subsystem, e.g. ``["Ti", "O"]`` gives Ti, O and Ti–O frames: a potential's training pool.
            formula: reduced formula in any order (``"H2O"`` matches every water box).
            settings: settings-signature values, e.g. ``{"code": "vasp", "xc": "PBE", "encut": 520}``;
                a value may be a MongoDB operator dict (``{"encut": {"$gte": 400}}``).
            tags: frames carrying all of these tags.
            limit: at most this many frames.
            natoms: ``(min, max)`` atoms per frame (either may be None).
            max_force: only frames whose largest atomic force is at most this (eV/Å).
            query: extra raw MongoDB filter on frame documents.
        """
        q = self.frame_query(elements, exclusive, formula, settings, tags, natoms, max_force, query)
        cursor = self.frames_collection.find(q, batch_size=10000)
        if limit:
            cursor = cursor.limit(int(limit))
        docs = list(cursor)
        sig_ids = {d.get("signature_id") for d in docs}
        sigs = {s.pop("_id"): s for s in self.signatures_collection.find({"_id": {"$in": list(sig_ids)}})}
        _tell_undeclared_sources_apart(docs, sigs)
        frames = [frame_from_document(d, sigs.get(d.get("signature_id"))) for d in docs]
        return FrameSet(frames, query=q)

    def count(self, **criteria: Any) -> int:
        """Number of frames matching the criteria of :meth:`frames` (without materialising them)."""
        return self.frames_collection.count_documents(self.frame_query(**criteria))

    def _signature_ids(self, settings: dict[str, Any]) -> list[str]:
        from mlmd_lab.settings import SIGNATURE_KEYS

        unknown = [k for k in settings if k.split(".")[0] not in SIGNATURE_KEYS]
        if unknown:
            raise MLMDError(f"unknown settings key(s) {', '.join(map(repr, unknown))}: "
                            f"use signature keys {', '.join(SIGNATURE_KEYS)}")
        return self.signatures_collection.distinct("_id", dict(settings))

    def signature(self, signature_id: str) -> dict[str, Any] | None:
        """The normalised settings signature with this id."""
        doc = self.signatures_collection.find_one({"_id": signature_id})
        if doc:
            doc.pop("_id")
        return doc

    def calculations(self, query: dict[str, Any] | None = None, settings: bool = False) -> list[dict[str, Any]]:
        """Calculation documents (complete ones) matching a raw filter; ``settings=True`` includes the
        full settings JSON."""
        projection = None if settings else {"settings": 0}
        return list(self.calculations_collection.find({"status": "complete", **(query or {})}, projection))

    def tag(self, frames: FrameSet | Iterable[str], *tags: str) -> int:
        """Add user tags to frames (a FrameSet or frame ids); returns the number of frames changed."""
        ids = frames.ids if isinstance(frames, FrameSet) else list(frames)
        res = self.frames_collection.update_many({"_id": {"$in": ids}}, {"$addToSet": {"tags": {"$each": list(tags)}}})
        return res.modified_count

    # -- reports ----------------------------------------------------------------------------------
    def summary(self) -> DatabaseSummary:
        """Counts of calculations, frames and atoms, by code, chemical system and settings signature."""
        base = self.frame_query()

        def group(key: str) -> list[dict[str, Any]]:
            pipeline = [{"$match": base},
                        {"$group": {"_id": f"${key}", "n": {"$sum": 1}, "atoms": {"$sum": "$natoms"}}},
                        {"$sort": {"n": -1}}]
            return list(self.frames_collection.aggregate(pipeline))

        by_chemsys = group("chemsys")
        by_sig = group("signature_id")
        sigs = {s["_id"]: s for s in self.signatures_collection.find({"_id": {"$in": [g["_id"] for g in by_sig]}})}
        by_code: dict[str, int] = {}
        signature_rows = []
        for g in by_sig:
            sig = sigs.get(g["_id"], {"_id": g["_id"]})
            code = sig.get("code") or "unknown"
            by_code[code] = by_code.get(code, 0) + g["n"]
            signature_rows.append({**sig, "frames": g["n"]})
        elements = sorted({el for g in by_chemsys for el in (g["_id"] or "").split("-") if el})
        return DatabaseSummary(
            calculations=self.calculations_collection.count_documents({"status": "complete"}),
            frames=sum(g["n"] for g in by_chemsys),
            atoms=sum(g["atoms"] for g in by_chemsys),
            by_code=by_code,
            by_chemsys={g["_id"]: g["n"] for g in by_chemsys},
            by_signature=signature_rows,
            elements=elements,
        )

    def compatible(self, a: FrameSet | dict[str, Any], b: FrameSet | dict[str, Any]):
        """Setting conflicts between two data sets and their per-element reference-energy shift.

        ``a`` and ``b`` are FrameSets or dicts of :meth:`frames` arguments. See
        :func:`mlmd_lab.db.compat.compare_sets`.
        """
        from mlmd_lab.db.compat import compare_sets

        set_a = a if isinstance(a, FrameSet) else self.frames(**a)
        set_b = b if isinstance(b, FrameSet) else self.frames(**b)
        return compare_sets(set_a, set_b)

    # -- potentials ------------------------------------------------------------------------------
    @property
    def models(self) -> ModelStore:
        """The potential database: trained HDNNPs and ensembles with provenance (see :class:`ModelStore`)."""
        from mlmd_lab.db.models import ModelStore

        return ModelStore(self)

    # -- housekeeping ------------------------------------------------------------------------------
    def drop(self) -> None:
        """Delete this database and everything in it (irreversible): frames, calculations, signatures, and
        the saved models with their GridFS files."""
        self.client.drop_database(self.name)

    def close(self) -> None:
        """Close the connection; the embedded server stops when its last client process exits."""
        self.client.close()

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _tell_undeclared_sources_apart(docs: list[dict[str, Any]], sigs: dict[str, dict[str, Any]]) -> None:
    """Frames still under the old shared "settings unknown" signature (written by an older version and not
    yet relabelled by :meth:`Database.split_undeclared_signatures`) get, in ``docs`` and ``sigs``, the
    per-source signature a new ingest gives them, so sources are never mixed as one."""
    from mlmd_lab.settings import declares_settings, signature_hash, with_dataset

    legacy = {k: s for k, s in sigs.items() if not s.get("dataset") and not declares_settings(s)}
    if not legacy:
        return
    for d in docs:
        old = legacy.get(d.get("signature_id"))
        if old is not None:
            new = with_dataset(old, d["calc_id"])
            d["signature_id"] = signature_hash(new)
            sigs.setdefault(d["signature_id"], new)


def _reduced_formula(formula: str) -> str:
    from ase.formula import Formula

    try:
        return Formula(formula).reduce()[0].format("hill")
    except ValueError as err:
        raise MLMDError(f"cannot read formula {formula!r} ({err}); write it like 'H2O' or 'TiO2'") from None
