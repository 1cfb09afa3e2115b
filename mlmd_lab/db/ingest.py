"""Recursive ingest of first-principles outputs into the database.

Pipeline: walk the tree → hash every recognised file → skip content already stored → parse the rest
(in worker processes for big trees) → write calculations in batches.

Write protocol (what makes a killed ingest safe and re-ingest idempotent):

1. the batch's calculation documents are inserted with ``status: "writing"`` and an ``owner``;
2. its frames are inserted; a frame ``_id`` is its content hash, so a frame already stored is a
   duplicate-key no-op (counted as *skipped*);
3. the calculations are switched to ``status: "complete"``.

Queries only return frames whose calculation is complete. A calculation left in "writing" by a killed
process is rolled back (its frames deleted) by the next ingest, and its file is read again.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from pymongo import UpdateOne
from pymongo.errors import BulkWriteError

from mlmd_lab.db.documents import frame_document, mongo_safe
from mlmd_lab.errors import InputFileError, MLMDError
from mlmd_lab.io import detect_format, read
from mlmd_lab.settings import normalise_signature, signature_hash, with_dataset

#: Trees larger than this (bytes) are parsed in worker processes when ``workers`` is None.
PARALLEL_THRESHOLD_BYTES = 64 * 2**20
#: Calculations written per round of the write protocol, and the frame-count cap of one round.
BATCH_CALCS = 64
BATCH_FRAMES = 2000


@dataclass
class IngestReport:
    """Outcome of an ingest.

    Attributes:
        added: frames written.
        skipped: frames already present (same content hash), including those of files already ingested.
        failed: ``(path, reason)`` for each file or folder that could not be ingested.
        calculations_added: calculations (files) written.
        calculations_skipped: files whose exact content was already ingested (their path is recorded).
        ignored: files in the tree that are none of the recognised formats.
        warnings: ``(path, warning)`` from readers (unconverged SCF steps, ...).
        seconds: wall time.
        dataset: the data set's name (for ``db.share`` / ``db.publish``).
    """

    added: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    calculations_added: int = 0
    calculations_skipped: int = 0
    ignored: int = 0
    warnings: list[tuple[str, str]] = field(default_factory=list)
    bytes_read: int = 0
    seconds: float = 0.0
    dataset: str | None = None

    def __str__(self) -> str:
        lines = [
            f"ingest: {self.added} frames added, {self.skipped} skipped (already present), "
            f"{len(self.failed)} files failed; {self.calculations_added} calculations added, "
            f"{self.calculations_skipped} already present, {self.ignored} files ignored "
            f"({self.seconds:.1f} s, {self.bytes_read / 2**20:.1f} MB)"
        ]
        lines += [f"  FAILED {path}: {reason}" for path, reason in self.failed]
        lines += [f"  warning {path}: {w}" for path, w in self.warnings[:20]]
        if len(self.warnings) > 20:
            lines.append(f"  ... {len(self.warnings) - 20} more warnings")
        return "\n".join(lines)


@dataclass
class _Parsed:
    """A parsed source, ready to write (built in a worker process, so it must pickle)."""

    path: str
    calc_doc: dict[str, Any]
    frame_docs: list[dict[str, Any]]
    signatures: dict[str, dict[str, Any]]
    warnings: list[str]


@dataclass(frozen=True)
class _Options:
    units: tuple[str, str] | str | None
    last_only: bool
    allow_unfinished: bool
    settings: dict[str, Any] | None
    tags: tuple[str, ...]
    keys: dict[str, str] | None = None
    #: sharing fields stamped on every new calculation and frame (dataset, licence, owner, contributors)
    sharing: tuple[tuple[str, Any], ...] = ()


# -- discovery -----------------------------------------------------------------------------------
def discover(paths: Iterable[str | os.PathLike]) -> tuple[list[tuple[Path, str]], int]:
    """Recognised sources under ``paths`` as ``(path, format)`` in a stable order, and the count of
    other files (ignored). Hidden folders are not entered; a DeePMD folder is one source."""
    found: list[tuple[Path, str]] = []
    ignored = 0
    for root in paths:
        root = Path(root).expanduser()
        if not root.exists():
            raise MLMDError(f"{root}: no such file or folder; check the path")
        if root.is_file():
            fmt = detect_format(root)
            if fmt:
                found.append((root, fmt))
            else:
                ignored += 1
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            if detect_format(here) == "deepmd":
                found.append((here, "deepmd"))
                dirnames[:] = []
                continue
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                fmt = detect_format(here / name)
                if fmt:
                    found.append((here / name, fmt))
                else:
                    ignored += 1
    return found, ignored


def source_hash(path: Path) -> tuple[str, int]:
    """SHA-256 hex of a file's bytes (a folder: of its files' relative names and bytes) and the size."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    size = 0
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
                size += len(chunk)
    return h.hexdigest(), size


# -- parsing (runs in workers) ------------------------------------------------------------------
def parse_source(path: Path, fmt: str, file_hash: str, options: _Options) -> _Parsed:
    """Read one source and build its calculation and frame documents. Raises InputFileError."""
    calc = read(path, fmt, units=options.units, last_only=options.last_only,
                allow_unfinished=options.allow_unfinished, keys=options.keys)
    if not calc.frames:
        raise InputFileError(path, "contains no labelled frames", "check the run finished and wrote results")
    missing = [i for i, a in enumerate(calc.frames) if a.calc is None or "forces" not in a.calc.results]
    if missing:
        vectors = _vector_columns(calc.frames[missing[0]])
        fix = (f"if one of its per-atom columns {vectors} holds the forces, choose it with "
               f"keys={{'forces': {vectors[0]!r}}}" if vectors else "training needs forces; re-run with forces on")
        raise InputFileError(path, f"{len(missing)} of {len(calc.frames)} frames have no forces "
                             f"(first: frame {missing[0]})", fix)
    blank = [i for i, a in enumerate(calc.frames) if _unlabelled(a)]
    if blank:
        raise InputFileError(path, f"{len(blank)} of {len(calc.frames)} frames carry energy 0 and all forces 0 "
                             f"(first: frame {blank[0]}): structures for prediction, not teacher data",
                             "ingest only files with reference energies and forces")
    # data-set formats (extxyz, n2p2, DeePMD) know no run settings: unless the reader found some or the user
    # declares them with settings=, the source is its own data set (dataset = its content hash), so two
    # such sources never share a signature (their energy zeros may differ; issue 14.2)
    base = dict(calc.signature)
    if base.get("code"):
        base.setdefault("code_version", calc.code_version)
    if options.settings:
        base.update(options.settings)
    signatures: dict[str, dict[str, Any]] = {}
    calc_sig_id = _register(signatures, with_dataset(base, file_hash))
    now = _dt.datetime.now(_dt.UTC)
    frame_docs = []
    for atoms in calc.frames:
        own = atoms.info.get("signature")  # an export of the database keeps the original's signature
        own_id = _register(signatures, with_dataset(own, file_hash)) if isinstance(own, dict) and own else None
        sig_id = own_id or calc_sig_id
        frame_docs.append(frame_document(atoms, calc_id=file_hash, signature_id=sig_id, source_path=str(path),
                                         file_hash=file_hash, tags=list(options.tags), now=now))
    calc_doc = {
        "_id": file_hash,
        "format": fmt,
        "code": calc.code,
        "code_version": calc.code_version,
        "settings": mongo_safe(calc.settings),
        "signature_id": calc_sig_id,
        "sources": [str(path)],
        "n_frames": len(frame_docs),
        "finished": calc.finished,
        "warnings": list(calc.warnings),
        "tags": sorted(set(options.tags)),
        "ingested_at": now,
    }
    return _Parsed(str(path), calc_doc, frame_docs, signatures, list(calc.warnings))


def _vector_columns(atoms) -> list[str]:
    """Names of a frame's per-atom (N, 3) number columns that are not positions, momenta or velocities."""
    skip = {"numbers", "positions", "momenta", "velocities", "initial_magmoms"}
    return sorted(name for name, arr in atoms.arrays.items()
                  if name not in skip and arr.dtype.kind in "fi" and arr.shape == (len(atoms), 3))


def _unlabelled(atoms) -> bool:
    """True for placeholder labels: energy exactly 0 and every force component exactly 0."""
    res = atoms.calc.results
    return res.get("energy", 0.0) == 0.0 and not np.any(res["forces"])


def _register(signatures: dict[str, dict[str, Any]], signature: dict[str, Any]) -> str:
    sig = normalise_signature(signature)
    sig_id = signature_hash(sig)
    signatures[sig_id] = sig
    return sig_id


def _parse_job(path: str, fmt: str, file_hash: str, options: _Options) -> _Parsed | tuple[str, str]:
    """Worker entry point: a parsed source, or ``(path, reason)`` on any failure."""
    try:
        return parse_source(Path(path), fmt, file_hash, options)
    except InputFileError as err:
        return (path, f"{err.problem}" + (f" ({err.fix})" if err.fix else ""))
    except MLMDError as err:
        return (path, str(err))
    except MemoryError:
        return (path, "out of memory while reading; ingest this file alone or with last_only=True")
    except Exception as err:  # a reader bug must not stop the batch; report it with its type
        return (path, f"unreadable ({type(err).__name__}: {err})")


# -- orchestration -------------------------------------------------------------------------------
class Ingestor:
    """Runs an ingest against a :class:`~mlmd_lab.db.store.Database` (use ``db.ingest``)."""

    def __init__(self, db: Any) -> None:
        self.db = db
        # the process writing a calculation (for rolling back what a killed process left half-written)
        self.writer = {"host": socket.gethostname(), "pid": os.getpid(),
                       "started": psutil.Process().create_time()}

    def run(
        self,
        paths: Iterable[str | os.PathLike],
        options: _Options,
        workers: int | None = None,
        progress: bool | Callable[[int, int], None] = True,
    ) -> IngestReport:
        t0 = time.perf_counter()
        report = IngestReport()
        self.rollback_abandoned()
        sources, report.ignored = discover(paths)
        todo, copies = self._skip_known(sources, report)
        total_bytes = sum(size for *_, size in todo)
        report.bytes_read = total_bytes
        if workers is None:
            workers = 1 if total_bytes < PARALLEL_THRESHOLD_BYTES else min(4, os.cpu_count() or 1)
        bar = _progress(progress, len(todo))
        pending: list[_Parsed] = []
        sharing = dict(options.sharing)
        for result in self._parse_all(todo, options, workers):
            if isinstance(result, tuple):
                report.failed.append(result)
            else:
                if sharing:
                    result.calc_doc.update(sharing)
                    for doc in result.frame_docs:
                        doc.update(sharing)
                report.warnings += [(result.path, w) for w in result.warnings]
                pending.append(result)
                if len(pending) >= BATCH_CALCS or sum(len(p.frame_docs) for p in pending) >= BATCH_FRAMES:
                    self._write(pending, report)
                    pending = []
            bar(1)
        if pending:
            self._write(pending, report)
        self._record_copies(copies, report)
        bar(0, close=True)
        report.seconds = time.perf_counter() - t0
        return report

    def _skip_known(self, sources: list[tuple[Path, str]], report: IngestReport):
        """Hash sources; return those to parse and the copies (same content and format as another source).

        Sources whose content is already complete in the database are counted as skipped and their path
        is added to the calculation's ``sources``.
        """
        hashed = []
        for path, fmt in sources:
            try:
                digest, size = source_hash(path)
            except OSError as err:
                report.failed.append((str(path), f"cannot read: {err.strerror}"))
                continue
            hashed.append((path, fmt, digest, size))
        ids = [h for *_, h, _ in hashed]
        complete: dict[str, int] = {}
        # with accounts, a calculation the caller already shared or published is known too (not re-added)
        own = [mdb.calculations for area, mdb in self.db._each_area() if area.mine] if self.db.managed \
            else [self.db.calculations_collection]
        for calcs in own:
            for i in range(0, len(ids), 5000):
                for d in calcs.find({"_id": {"$in": ids[i:i + 5000]}, "status": "complete"}, {"n_frames": 1}):
                    complete.setdefault(d["_id"], int(d.get("n_frames", 0)))
        todo, copies, first = [], [], {}
        for path, fmt, digest, size in hashed:
            if digest in complete:
                copies.append((digest, path, None))
            elif (digest, fmt) in first:
                copies.append((digest, path, first[digest, fmt]))
            else:
                first[digest, fmt] = path
                todo.append((path, fmt, digest, size))
        return todo, copies

    def _record_copies(self, copies: list[tuple[str, Path, Path | None]], report: IngestReport) -> None:
        """Account for sources whose content was ingested (now or before) from another path."""
        if not copies:
            return
        failed = dict(report.failed)
        recorded = []
        for digest, path, original in copies:
            if original is not None and str(original) in failed:
                report.failed.append((str(path), f"identical to {original}, which failed: {failed[str(original)]}"))
            else:
                recorded.append((digest, path))
        if not recorded:
            return
        calcs = self.db.calculations_collection
        calcs.bulk_write([UpdateOne({"_id": d, "status": "complete"}, {"$addToSet": {"sources": str(p)}})
                          for d, p in recorded], ordered=False)
        n_frames = {d["_id"]: int(d.get("n_frames", 0)) for d in calcs.find(
            {"_id": {"$in": list({d for d, _ in recorded})}}, {"n_frames": 1})}
        report.calculations_skipped += len(recorded)
        report.skipped += sum(n_frames.get(d, 0) for d, _ in recorded)

    def _parse_all(self, todo, options: _Options, workers: int) -> Iterator[_Parsed | tuple[str, str]]:
        if workers <= 1 or len(todo) <= 1:
            for path, fmt, digest, _ in todo:
                yield _parse_job(str(path), fmt, digest, options)
            return
        # spawn: the parent holds pymongo's monitor threads, which fork would copy in a broken state
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(_parse_job, str(p), fmt, digest, options): p for p, fmt, digest, _ in todo}
            for fut in as_completed(futures):
                try:
                    yield fut.result()
                except Exception as err:  # a worker died (e.g. killed by the OOM killer)
                    yield (str(futures[fut]), f"worker process failed ({type(err).__name__}: {err})")

    def _write(self, batch: list[_Parsed], report: IngestReport) -> None:
        calcs = self.db.calculations_collection
        frames = self.db.frames_collection
        signatures = {sig_id: sig for parsed in batch for sig_id, sig in parsed.signatures.items()}
        self.db.signatures_collection.bulk_write(
            [UpdateOne({"_id": k}, {"$setOnInsert": v}, upsert=True) for k, v in signatures.items()], ordered=False)
        ids = [p.calc_doc["_id"] for p in batch]
        calcs.delete_many({"_id": {"$in": ids}, "status": {"$ne": "complete"}})
        calcs.insert_many([{**p.calc_doc, "status": "writing", "writer": self.writer} for p in batch])
        docs = [d for p in batch for d in p.frame_docs]
        added = 0
        for i in range(0, len(docs), BATCH_FRAMES):
            added += _insert_new(frames, docs[i:i + BATCH_FRAMES])
        calcs.update_many({"_id": {"$in": ids}}, {"$set": {"status": "complete"}, "$unset": {"writer": ""}})
        report.added += added
        report.skipped += len(docs) - added
        report.calculations_added += len(batch)

    def rollback_abandoned(self) -> int:
        """Delete calculations left in "writing" by dead processes on this host, and their frames."""
        calcs = self.db.calculations_collection
        dead = []
        for doc in calcs.find({"status": "writing"}, {"writer": 1, "owner": 1}):
            writer = doc.get("writer") or doc.get("owner") or {}  # "owner": the field's name before issue 17
            if isinstance(writer, dict) and writer.get("host") == self.writer["host"] and not _alive(writer):
                dead.append(doc["_id"])
        if dead:
            self.db.frames_collection.delete_many({"calc_id": {"$in": dead}})
            calcs.delete_many({"_id": {"$in": dead}, "status": "writing"})
        return len(dead)


def _insert_new(collection, docs: list[dict[str, Any]]) -> int:
    """Insert documents, treating duplicate keys as already present; returns the number inserted."""
    if not docs:
        return 0
    try:
        return len(collection.insert_many(docs, ordered=False).inserted_ids)
    except BulkWriteError as err:
        other = [e for e in err.details.get("writeErrors", []) if e.get("code") != 11000]
        if other:
            raise
        return int(err.details.get("nInserted", 0))


def _alive(owner: dict[str, Any]) -> bool:
    try:
        proc = psutil.Process(int(owner.get("pid", -1)))
        return abs(proc.create_time() - float(owner.get("started", 0))) < 0.01
    except (psutil.NoSuchProcess, ValueError):
        return False


def _progress(progress: bool | Callable[[int, int], None], total: int) -> Callable[..., None]:
    """A ``bar(n, close=False)`` callable: tqdm (console/notebook) if True, a user callback, or nothing."""
    if callable(progress):
        done = [0]

        def call(n: int, close: bool = False) -> None:
            done[0] += n
            progress(done[0], total)

        return call
    if not progress or total == 0:
        return lambda n, close=False: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="file", desc="ingest", leave=False)

    def update(n: int, close: bool = False) -> None:
        bar.update(n)
        if close:
            bar.close()

    return update
