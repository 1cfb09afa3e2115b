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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any

import pymongo
from pymongo import MongoClient, UpdateMany, UpdateOne
from pymongo.errors import ConfigurationError, InvalidURI, OperationFailure, PyMongoError

from mlmd_lab.db.access import redact
from mlmd_lab.db.documents import elements_filter, frame_from_document
from mlmd_lab.db.ingest import Ingestor, IngestReport, _Options
from mlmd_lab.db.server import EmbeddedServer
from mlmd_lab.errors import DatabaseError, MLMDError
from mlmd_lab.frameset import FrameSet

if TYPE_CHECKING:
    from mlmd_lab.db.access import Area, Groups, Users
    from mlmd_lab.db.models import ModelStore

#: Seconds connect() waits for a MongoDB server that does not answer (unless the URI or the call says otherwise).
DEFAULT_TIMEOUT_S = 10.0

URI_HINT = "expected mongodb://USER:PASSWORD@HOST:PORT/?tls=true (or mongodb+srv://...)"


def connect(
    uri: str | None = None,
    database: str = "mlmd",
    *,
    data_dir: str | os.PathLike | None = None,
    timeout: float | None = None,
) -> Database:
    """Open the teacher-data database.

    Args:
        uri: a ``mongodb://`` or ``mongodb+srv://`` URI (user, password, TLS options in the URI).
            None: ``$MLMD_MONGODB_URI`` if set, else the embedded server of ``data_dir``, started or reused.
        database: database name on the server.
        data_dir: folder of the embedded server (default ``$MLMD_DATA_DIR`` or the user data folder).
        timeout: seconds to wait for the server before giving up. None: the URI's ``serverSelectionTimeoutMS``
            if it has one, else :data:`DEFAULT_TIMEOUT_S`.

    Raises:
        DatabaseError: malformed URI, unreachable server, failed authentication, or the embedded server
            could not start — with a one-line message naming the fix.
    """
    uri = uri or os.environ.get("MLMD_MONGODB_URI") or None
    server = None
    if uri is None:
        server = EmbeddedServer(data_dir)
        uri = server.ensure_running().uri
    options = _check_uri(uri)
    if timeout is None:  # keyword arguments override the URI's options in pymongo: pass the URI's own on
        timeout = float(options.get("serverSelectionTimeoutMS", DEFAULT_TIMEOUT_S))
    connect_timeout = float(options.get("connectTimeoutMS", timeout))
    try:
        client: MongoClient = MongoClient(uri, serverSelectionTimeoutMS=int(timeout * 1000),
                                          connectTimeoutMS=int(connect_timeout * 1000), appname="mlmd_lab",
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
    from mlmd_lab.db.access import is_managed_user, login_name, private_db

    user = login_name(client)
    managed = is_managed_user(client, user)
    db = Database(client, private_db(user) if managed else database, uri=uri, server=server,
                  user=user, managed=managed)
    try:
        db.ensure_indexes()
    except OperationFailure as err:
        if "authentication" in str(err):
            raise DatabaseError(f"MongoDB at {redact(uri)} requires a login: put the user name and password in the "
                                "URI (mongodb://USER:PASSWORD@HOST:PORT/?authSource=admin) or in "
                                "MLMD_MONGODB_URI") from None
        if not user:
            raise
    if managed:
        db.release_embargoes()
    try:
        db.split_undeclared_signatures()
    except OperationFailure:  # a read-only user: frames() still tells the sources apart when reading
        pass
    return db


def _check_uri(uri: str) -> dict[str, Any]:
    """The URI's options (pymongo's names; times in seconds), or a DatabaseError naming what is wrong."""
    if not uri.startswith(("mongodb://", "mongodb+srv://")):
        raise DatabaseError(f"not a MongoDB URI: {redact(uri)!r}; {URI_HINT}")
    try:
        return dict(pymongo.uri_parser.parse_uri(uri, validate=True, warn=False, connect_timeout=1.0)["options"])
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

    def __init__(self, client: MongoClient, name: str, *, uri: str, server: EmbeddedServer | None = None,
                 user: str | None = None, managed: bool = False):
        from mlmd_lab.db.access import SecretURI

        self.client = client
        self.name = name
        self.uri = SecretURI(uri)  # shown redacted (a notebook cell's value, logs); str() for a connection
        self.server = server
        #: the login (from the server), or the local user name on a database without accounts
        self.user = user or _local_user()
        #: True for an account made by ``admin.users.create``: visibility is enforced by the server
        self.managed = managed
        self.mongo = client[name]
        self.frames_collection = self.mongo["frames"]
        self.calculations_collection = self.mongo["calculations"]
        self.signatures_collection = self.mongo["signatures"]

    def __repr__(self) -> str:
        where = f"embedded server in {self.server.data_dir}" if self.server else redact(self.uri)
        who = f" as {self.user!r}" if self.managed else ""
        return f"<mlmd_lab Database {self.name!r} on {where}{who}>"

    def ensure_indexes(self) -> None:
        """Create the indexes that queries and ingest use (idempotent)."""
        ensure_indexes(self.mongo)

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
        visibility: str = "private",
        dataset: str | None = None,
        licence: str = "CC-BY-4.0",
        group: str | None = None,
        contributors: Iterable[str] = (),
        embargo_until: str | date | datetime | None = None,
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
            visibility: "private" (default: only you), "group" (the members of ``group``) or "public"
                (everyone; append-only from then on, see :meth:`publish`).
            dataset: the data set's name, by which it is shared, published and credited (default: the name
                of the file or folder ingested).
            licence: the licence under which others may use the data once shared (default CC-BY-4.0; see
                :data:`mlmd_lab.db.access.LICENCES`).
            group: the group for ``visibility="group"`` (default: your only group).
            contributors: people to credit besides the owner (the owner is always the login).
            embargo_until: with ``visibility="public"``, the date from which others see it.

        Returns:
            an :class:`IngestReport`; bad files are listed in ``.failed`` and never stop the batch.
        """
        from mlmd_lab.db.access import VISIBILITIES, check_licence, embargo_date
        from mlmd_lab.io.extxyz import check_keys

        paths = [path] if isinstance(path, str | os.PathLike) else list(path)
        keys = check_keys(keys)
        if visibility not in VISIBILITIES:
            raise MLMDError(f"visibility {visibility!r} is not one of {', '.join(VISIBILITIES)}")
        check_licence(licence)
        embargo_date(embargo_until)  # a bad date fails before anything is written
        if visibility == "group" and self.managed:
            group = self._my_group(group)
        dataset = dataset or _default_dataset(paths)
        sharing = {"dataset": dataset, "licence": licence, "owner": self.user,
                   "contributors": [self.user] + [c for c in contributors if c != self.user]}
        options = _Options(units=units, last_only=last_only, allow_unfinished=allow_unfinished,
                           settings=dict(settings) if settings else None, tags=tuple(tags),
                           keys=dict(keys) if keys else None, sharing=tuple(sharing.items()))
        report = Ingestor(self).run(paths, options, workers=workers, progress=progress)
        report.dataset = dataset
        if visibility == "group" and report.added:
            self.share(dataset, group)
        elif visibility == "public" and report.added:
            self.publish(dataset, embargo_until)
        return report

    # -- what the caller may read -----------------------------------------------------------------
    def areas(self) -> list[tuple[Area, pymongo.database.Database]]:
        """The databases this caller reads, own first, each with its :class:`~mlmd_lab.db.access.Area`.

        Without accounts: this database alone. With an account (``admin.users.create``): own private,
        group-shared, embargoed and published data, the group data of the caller's groups and everyone's
        published data; the server refuses any other database, whatever a client asks.
        """
        from mlmd_lab.db.access import Area, visible_areas

        if not self.managed:
            return [(Area(self.name, self.user, "private", mine=True), self.mongo)]
        return [(a, self.client[a.db]) for a in visible_areas(self.client, self.user)]

    def _each_area(self) -> Iterator[tuple[Area, pymongo.database.Database]]:
        """:meth:`areas`, skipping any database the server refuses (its decision, e.g. a group just left)."""
        from mlmd_lab.db.access import is_unauthorized

        for area, mdb in self.areas():
            try:  # an _id lookup: the server's authorisation answer at the cost of one index probe
                mdb.frames.find_one({"_id": "\x00access-probe"}, {"_id": 1})
            except OperationFailure as err:
                if is_unauthorized(err):
                    continue
                raise
            yield area, mdb

    def _stamp(self, area: Area, doc: dict[str, Any]) -> dict[str, Any]:
        if self.managed:
            return area.stamp(doc)
        doc.setdefault("owner", self.user)
        doc.setdefault("visibility", "private")
        return doc

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
        *,
        dataset: str | None = None,
    ) -> dict[str, Any]:
        """The MongoDB filter :meth:`frames` uses in this (the caller's own) database (arguments as there)."""
        return self._frame_query_in(self.mongo, elements, exclusive, formula, settings, tags, natoms, max_force,
                                    query, dataset)

    def _frame_query_in(self, mdb, elements=None, exclusive=False, formula=None, settings=None, tags=None,
                        natoms=None, max_force=None, query=None, dataset=None) -> dict[str, Any]:
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
        if dataset is not None:
            q["dataset"] = dataset
        if settings:
            q["signature_id"] = {"$in": self._signature_ids(settings, mdb)}
        unfinished = mdb.calculations.distinct("_id", {"status": {"$ne": "complete"}})
        if unfinished:
            q["calc_id"] = {"$nin": unfinished}
        if mdb.name.startswith("mlmd_e_"):  # released data sets are read from the public copy (no duplicates)
            released = mdb.released.distinct("_id")
            if released:
                q.setdefault("$and", []).append({"dataset": {"$nin": released}})
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
        dataset: str | None = None,
        owner: str | None = None,
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
            dataset: only frames of this data set (the name given at ingest).
            owner: only frames owned by this user.

        With accounts, the frames are those the caller may see (own, group-shared with the caller's groups,
        published past any embargo); each carries ``info["owner"]``, ``["dataset"]``, ``["licence"]`` and
        ``["visibility"]``, the owner taken from where the frame lives, never from the document.
        """
        args = (elements, exclusive, formula, settings, tags, natoms, max_force, query, dataset)
        docs: list[dict[str, Any]] = []
        sigs: dict[str, dict[str, Any]] = {}
        seen: set[str] = set()
        home_query = None
        for area, mdb in self._each_area():
            if owner is not None and self.managed and area.owner != owner:
                continue
            q = self._frame_query_in(mdb, *args)
            if owner is not None and not self.managed:
                q["owner"] = owner if owner != self.user else {"$in": [owner, None]}
            home_query = q if home_query is None else home_query
            cursor = mdb.frames.find(q, batch_size=10000)
            if limit:
                cursor = cursor.limit(int(limit) - len(docs))
            found = [self._stamp(area, d) for d in cursor if d["_id"] not in seen]
            seen.update(d["_id"] for d in found)
            docs += found
            wanted = list({d.get("signature_id") for d in found} - set(sigs))
            sigs.update({s.pop("_id"): s for s in mdb.signatures.find({"_id": {"$in": wanted}})})
            if limit and len(docs) >= int(limit):
                break
        _tell_undeclared_sources_apart(docs, sigs)
        frames = [frame_from_document(d, sigs.get(d.get("signature_id"))) for d in docs]
        return FrameSet(frames, query=home_query if home_query is not None else self.frame_query(*args[:-1]))

    def count(self, **criteria: Any) -> int:
        """Number of frames matching the criteria of :meth:`frames` (without materialising them; a frame
        held by two owners counts twice)."""
        dataset = criteria.pop("dataset", None)
        total = 0
        for _area, mdb in self._each_area():
            total += mdb.frames.count_documents(self._frame_query_in(mdb, **criteria, dataset=dataset))
        return total

    def _signature_ids(self, settings: dict[str, Any], mdb=None) -> list[str]:
        from mlmd_lab.settings import SIGNATURE_KEYS

        unknown = [k for k in settings if k.split(".")[0] not in SIGNATURE_KEYS]
        if unknown:
            raise MLMDError(f"unknown settings key(s) {', '.join(map(repr, unknown))}: "
                            f"use signature keys {', '.join(SIGNATURE_KEYS)}")
        return (self.mongo if mdb is None else mdb).signatures.distinct("_id", dict(settings))

    def signature(self, signature_id: str) -> dict[str, Any] | None:
        """The normalised settings signature with this id."""
        for _area, mdb in self._each_area():
            doc = mdb.signatures.find_one({"_id": signature_id})
            if doc:
                doc.pop("_id")
                return doc
        return None

    def calculations(self, query: dict[str, Any] | None = None, settings: bool = False) -> list[dict[str, Any]]:
        """Calculation documents (complete ones) matching a raw filter; ``settings=True`` includes the
        full settings JSON."""
        projection = None if settings else {"settings": 0}
        out, seen = [], set()
        for area, mdb in self._each_area():
            for doc in mdb.calculations.find({"status": "complete", **(query or {})}, projection):
                if doc["_id"] not in seen:
                    seen.add(doc["_id"])
                    out.append(self._stamp(area, doc))
        return out

    def datasets(self) -> list[dict[str, Any]]:
        """The data sets the caller may see: name, owner, visibility, group, licence, frames, embargo."""
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        for area, mdb in self._each_area():
            first = {key: {"$first": f"${key}"} for key in ("licence", "embargo_until", "visibility", "group")}
            pipeline = [{"$match": self._frame_query_in(mdb)},
                        {"$group": {"_id": "$dataset", "frames": {"$sum": 1}, **first}}]
            for g in mdb.frames.aggregate(pipeline):
                row = self._stamp(area, {"dataset": g["_id"], "frames": g["frames"], "licence": g.get("licence"),
                                         "embargo_until": g.get("embargo_until"),
                                         "visibility": g.get("visibility"), "group": g.get("group")})
                key = (row["owner"], row["dataset"] or "")
                if key in rows and rows[key]["visibility"] == row["visibility"]:
                    rows[key]["frames"] += row["frames"]
                else:
                    rows.setdefault(key, row)
        return sorted(rows.values(), key=lambda r: (r["owner"], r["dataset"] or ""))

    def tag(self, frames: FrameSet | Iterable[str], *tags: str) -> int:
        """Add user tags to frames (a FrameSet or frame ids); returns the number of frames changed."""
        ids = frames.ids if isinstance(frames, FrameSet) else list(frames)
        res = self.frames_collection.update_many({"_id": {"$in": ids}}, {"$addToSet": {"tags": {"$each": list(tags)}}})
        return res.modified_count

    # -- reports ----------------------------------------------------------------------------------
    def summary(self) -> DatabaseSummary:
        """Counts of calculations, frames and atoms, by code, chemical system and settings signature (of
        what the caller may see)."""
        chemsys: dict[str, list[int]] = {}
        by_sig: dict[str, list[int]] = {}
        sigs: dict[str, dict[str, Any]] = {}
        calculations = 0
        for _area, mdb in self._each_area():
            base = self._frame_query_in(mdb)

            def group(key: str, mdb=mdb, base=base) -> list[dict[str, Any]]:
                pipeline = [{"$match": base},
                            {"$group": {"_id": f"${key}", "n": {"$sum": 1}, "atoms": {"$sum": "$natoms"}}}]
                return list(mdb.frames.aggregate(pipeline))

            for g in group("chemsys"):
                row = chemsys.setdefault(g["_id"], [0, 0])
                row[0] += g["n"]
                row[1] += g["atoms"]
            found = group("signature_id")
            for g in found:
                by_sig.setdefault(g["_id"], [0, 0])[0] += g["n"]
            wanted = [g["_id"] for g in found if g["_id"] not in sigs]
            sigs.update({s["_id"]: s for s in mdb.signatures.find({"_id": {"$in": wanted}})})
            calculations += mdb.calculations.count_documents({"status": "complete"})
        by_code: dict[str, int] = {}
        signature_rows = []
        for sig_id, (n, _) in sorted(by_sig.items(), key=lambda kv: -kv[1][0]):
            sig = sigs.get(sig_id, {"_id": sig_id})
            code = sig.get("code") or "unknown"
            by_code[code] = by_code.get(code, 0) + n
            signature_rows.append({**sig, "frames": n})
        ordered = sorted(chemsys.items(), key=lambda kv: -kv[1][0])
        elements = sorted({el for k, _ in ordered for el in (k or "").split("-") if el})
        return DatabaseSummary(
            calculations=calculations,
            frames=sum(n for _, (n, _) in ordered),
            atoms=sum(a for _, (_, a) in ordered),
            by_code=by_code,
            by_chemsys={k: n for k, (n, _) in ordered},
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

    # -- sharing ----------------------------------------------------------------------------------
    def share(self, dataset: str, group: str | None = None) -> int:
        """Let the members of ``group`` read the caller's data set ``dataset`` (the caller keeps managing it).

        With accounts the data moves from the private database to ``mlmd_g_<group>_<user>``, which the
        group's members may read (the server enforces it). Returns the number of frames shared.
        """
        if not self.managed:
            return self._set_visibility(dataset, {"visibility": "group", "group": group})
        from mlmd_lab.db.access import group_db

        group = self._my_group(group)
        target = self.client[group_db(group, self.user)]
        return self._move(dataset, [self.mongo], target, {"visibility": "group", "group": group})

    def publish(self, dataset: str, embargo_until: str | date | datetime | None = None) -> int:
        """Publish the caller's data set ``dataset``: everyone may read it, nobody may change or delete it.

        Args:
            dataset: the data set's name (as given at ingest).
            embargo_until: a date up to 36 months ahead: until then only the owner sees the data, from then
                on everyone does (released at the owner's next connection or by the administrator's
                ``admin.release_all_embargoes()``, e.g. a daily cron job ``mlmd-lab users release-embargoes``).

        Returns:
            the number of frames published. Published data is append-only: an administrator can retract it
            (``admin.retract``), which is recorded.
        """
        from mlmd_lab.db.access import embargo_date, embargo_db, public_db

        until = embargo_date(embargo_until)
        fields: dict[str, Any] = {"visibility": "public", "published": datetime.now(UTC)}
        if until is not None:
            fields["embargo_until"] = until
        if not self.managed:
            return self._set_visibility(dataset, fields)
        sources = [mdb for area, mdb in self._each_area() if area.mine and area.visibility != "public"]
        target = self.client[embargo_db(self.user) if until else public_db(self.user)]
        return self._move(dataset, sources, target, fields)

    def release_embargoes(self) -> int:
        """Publish the caller's embargoed data sets whose date has passed; returns frames released."""
        from mlmd_lab.db.access import embargo_db, public_db

        if not self.managed:
            return 0
        return release_due(self.client[embargo_db(self.user)], self.client[public_db(self.user)])

    def _my_group(self, group: str | None) -> str:
        from mlmd_lab.db.access import DIRECTORY_DB

        mine = [g["_id"] for g in self.client[DIRECTORY_DB].groups.find({"members": self.user}, {"_id": 1})]
        if group is None and len(mine) == 1:
            return mine[0]
        if group not in mine:
            raise MLMDError(f"{self.user!r} is not a member of group {group!r}; your groups: "
                            f"{', '.join(mine) or 'none'} (an administrator adds members)")
        return group

    def _set_visibility(self, dataset: str, fields: dict[str, Any]) -> int:
        """Without accounts there is one user: record the visibility (nothing to enforce)."""
        n = self.frames_collection.count_documents({"dataset": dataset})
        if n == 0:
            raise MLMDError(f"no data set {dataset!r} in {self.name!r}; data sets: "
                            f"{', '.join(sorted({d['dataset'] or '-' for d in self.datasets()})) or 'none'}")
        unset = {} if "group" in fields else {"group": ""}
        update = {"$set": fields, **({"$unset": unset} if unset else {})}
        self.calculations_collection.update_many({"dataset": dataset}, update)
        self.frames_collection.update_many({"dataset": dataset}, update)
        return n

    def _move(self, dataset: str, sources: list, target, fields: dict[str, Any]) -> int:
        """Copy a data set's signatures, calculations and frames into ``target``, then delete the originals.

        Copies are idempotent (existing ids are kept), and nothing is deleted before everything is copied, so
        an interruption leaves the data in both places (readers keep one copy) and a rerun completes it.
        """
        moved = 0
        for src in sources:
            calc_ids, copied = copy_dataset(src, target, dataset, fields)
            if not calc_ids:
                continue
            moved += copied
            src.frames.delete_many({"dataset": dataset, "calc_id": {"$in": calc_ids}})
            src.calculations.delete_many({"_id": {"$in": calc_ids}})
        if moved == 0:
            names = sorted({d["dataset"] or "-" for d in self.datasets() if d["owner"] == self.user})
            raise MLMDError(f"you hold no data set {dataset!r} that could move (published data stays published); "
                            f"your data sets: {', '.join(names) or 'none'}")
        return moved

    # -- accounts (administrator) -----------------------------------------------------------------
    @property
    def users(self) -> Users:
        """Accounts on this server (administrator only): ``create``, ``list``, ``add_to_group``,
        ``remove_from_group``, ``delete``."""
        from mlmd_lab.db.access import Users

        return Users(self.client, self.uri)

    @property
    def groups(self) -> Groups:
        """Groups on this server (administrator only): ``create``, ``list``."""
        from mlmd_lab.db.access import Groups

        return Groups(self.client, self.uri)

    def release_all_embargoes(self) -> int:
        """Administrator: publish every user's embargoed data whose date has passed (a daily cron job)."""
        from mlmd_lab.db.access import DIRECTORY_DB, embargo_db, public_db

        self.users._require_admin()
        released = 0
        for name in self.client[DIRECTORY_DB].users.distinct("_id"):  # deleted users' embargoes end too
            released += release_due(self.client[embargo_db(name)], self.client[public_db(name)])
        return released

    def retract(self, owner: str, dataset: str, reason: str) -> int:
        """Administrator: take a published data set back to its owner's private database, with a record.

        Returns the number of frames retracted; the record (who, when, why, how many) is kept in
        ``mlmd_directory.retractions`` and readable by every user.
        """
        from mlmd_lab.db.access import DIRECTORY_DB, embargo_db, private_db, public_db

        if not reason or not reason.strip():
            raise MLMDError("give the reason for the retraction (it is recorded and shown to users)")
        self.users._require_admin()
        sources = [self.client[public_db(owner)], self.client[embargo_db(owner)]]
        n = self._move(dataset, sources, self.client[private_db(owner)], {"visibility": "private"})
        self.client[private_db(owner)].frames.update_many({"dataset": dataset},
                                                          {"$unset": {"published": "", "embargo_until": ""}})
        self.client[embargo_db(owner)].released.delete_one({"_id": dataset})
        self.client[DIRECTORY_DB].retractions.insert_one(
            {"owner": owner, "dataset": dataset, "frames": n, "reason": reason, "by": self.user,
             "at": datetime.now(UTC)})
        return n

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


FRAME_INDEXES = ("calc_id", "chemsys", "formula_reduced", "formula", "elements", "signature_id", "tags", "natoms",
                 "dataset")


def ensure_indexes(mdb) -> None:
    """The indexes queries and ingest use, on one database's ``frames`` and ``calculations`` (idempotent).

    Every database frames live in needs them (private, group, embargoed, published): without them a query
    there scans the whole collection (measured in ``benchmarks/bench_access.py``).
    """
    for keys in FRAME_INDEXES:
        mdb.frames.create_index(keys)
    mdb.calculations.create_index("status")
    mdb.calculations.create_index("signature_id")


def release_due(embargoed, public) -> int:
    """Copy the embargoed data sets whose date has passed from ``embargoed`` to ``public``.

    The embargo database is append-only (nobody deletes there), so a released data set is recorded in its
    ``released`` collection and readers keep the public copy (same ids, public read first).
    """
    from mlmd_lab.db.ingest import _insert_new

    now = datetime.now(UTC)
    try:
        done = set(embargoed.released.distinct("_id"))
        due = [d for d in embargoed.frames.distinct("dataset", {"embargo_until": {"$lte": now}}) if d not in done]
    except OperationFailure:
        return 0
    released = 0
    for dataset in due:
        _, copied = copy_dataset(embargoed, public, dataset, {})
        released += copied
        _insert_new(embargoed.released, [{"_id": dataset, "at": now, "frames": copied}])
    return released


def copy_dataset(src, target, dataset: str, fields: dict[str, Any]) -> tuple[list[str], int]:
    """Copy one data set's signatures, complete calculations and their frames from database ``src`` to
    ``target`` (indexed first), with ``fields`` set on calculations and frames; existing ids are kept, so a
    rerun completes an interrupted copy. Returns the calculation ids and the number of frames copied."""
    from mlmd_lab.db.ingest import _insert_new

    calcs = list(src.calculations.find({"dataset": dataset, "status": "complete"}))
    if not calcs:
        return [], 0
    calc_ids = [c["_id"] for c in calcs]
    sig_ids = set(src.frames.distinct("signature_id", {"dataset": dataset})) | {c.get("signature_id") for c in calcs}
    ensure_indexes(target)
    _insert_new(target.signatures, list(src.signatures.find({"_id": {"$in": list(sig_ids)}})))
    _insert_new(target.calculations, [{**c, **fields} for c in calcs])
    copied, batch = 0, []
    for doc in src.frames.find({"dataset": dataset, "calc_id": {"$in": calc_ids}}, batch_size=2000):
        batch.append({**doc, **fields})
        copied += 1
        if len(batch) >= 2000:
            _insert_new(target.frames, batch)
            batch = []
    _insert_new(target.frames, batch)
    return calc_ids, copied


def _default_dataset(paths: list) -> str:
    """A data set's default name: the file or folder ingested (``"default"`` for several)."""
    from pathlib import Path

    if len(paths) != 1:
        return "default"
    name = Path(os.fspath(paths[0])).expanduser().resolve().name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "default"


def _local_user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "local"


def _reduced_formula(formula: str) -> str:
    from ase.formula import Formula

    try:
        return Formula(formula).reduce()[0].format("hill")
    except ValueError as err:
        raise MLMDError(f"cannot read formula {formula!r} ({err}); write it like 'H2O' or 'TiO2'") from None
