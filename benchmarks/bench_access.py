"""Cost of access control on the query "10,000 of 100,000 frames": one database versus per-user databases.

One run does everything in a temporary folder (removed at the end, with the two embedded servers it starts):

(a) unrestricted: an embedded server without accounts, all frames in one database (as ``bench_ingest.py`` (c));
(b) with accounts: ``mlmd_lab.db.server.start(tmp, auth=True)``, users made with ``admin.users.create``
    (``reader`` and ``mate`` in group ``lab``, ``publisher``, ``stranger``, and ``--idle-users`` more with no
    data), the *same* documents spread over the databases of :mod:`mlmd_lab.db.access`: the Ge8 frames over
    ``mlmd_u_reader`` (own private), ``mlmd_g_lab_mate`` (a group-mate's group data) and ``mlmd_p_publisher``
    (published), the other frames over those three and ``mlmd_u_stranger`` (private: ``reader`` may not read
    it). ``reader`` asks ``db.frames(formula="Ge")`` and must get exactly the Ge8 frames, each owner's share.
    Indexes are those mlmd_lab leaves: the full set in every database (``connect`` makes them in the
    caller's own, ``share``/``publish``/``release_embargoes`` in group and published ones: ``ensure_indexes``);
(b') as (b) with only ``calc_id`` and ``dataset`` indexed in the group and published databases (what
    ``share``/``publish`` left before they made the full set: what the indexes there buy).

Documents come from ``bench_ingest``'s generator (``DocFactory``/``fill_database``: 100,000 frames, the first
10,000 Ge8), inserted by the administrator with pymongo, a whole calculation (100 frames) per database, with
their calculations (status complete), signatures and ``dataset``/``licence``/``owner`` fields, identical in (a)
and (b). Timed repeats alternate (a) and (b) so machine noise hits both; medians; nothing asserts on time.

    python benchmarks/bench_access.py [--frames 100000] [--target-frames 10000] [--repeats 5]
                                      [--idle-users 0] [--profile]

Writes ``benchmarks/results/bench_access.json``.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import hashlib
import io
import pstats
import secrets
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pymongo
from _common import machine_info, median, print_table, shutdown, timed, write_json
from bench_ingest import FRAMES_PER_CALC, fill_database

import mlmd_lab
from mlmd_lab.db import server
from mlmd_lab.db.store import Database, ensure_indexes

RATIO_TARGET = 1.5
GROUP = "lab"
READER, MATE, PUBLISHER, STRANGER = "reader", "mate", "publisher", "stranger"


# -- layout -------------------------------------------------------------------------------------------
@dataclass
class Area:
    """One database of the accounts layout and the sharing fields its documents carry."""

    label: str
    db: str
    owner: str
    fields: dict[str, Any]
    readable: bool  # by READER
    frames: int = 0
    target_frames: int = 0
    calc_ids: list[str] = field(default_factory=list)


def make_areas() -> list[Area]:
    published = datetime(2025, 1, 1, tzinfo=UTC)

    def sharing(owner: str, licence: str, **extra: Any) -> dict[str, Any]:
        return {"dataset": f"bench-{owner}", "licence": licence, "owner": owner, "contributors": [owner], **extra}

    return [
        Area("own private", f"mlmd_u_{READER}", READER, sharing(READER, "CC-BY-4.0"), True),
        Area("group-mate's group", f"mlmd_g_{GROUP}_{MATE}", MATE,
             sharing(MATE, "CC-BY-4.0", visibility="group", group=GROUP), True),
        Area("other user's public", f"mlmd_p_{PUBLISHER}", PUBLISHER,
             sharing(PUBLISHER, "CC0-1.0", visibility="public", published=published), True),
        Area("stranger's private", f"mlmd_u_{STRANGER}", STRANGER, sharing(STRANGER, "CC-BY-NC-4.0"), False),
    ]


def plan(areas: list[Area], n_total: int, n_target: int) -> dict[str, int]:
    """calc_id → index in ``areas``: the target (Ge8) calculations cycle over the three readable areas, the
    others over all four. Ids as ``fill_database`` makes them (``bench-calc-<c>``, ``FRAMES_PER_CALC`` each)."""
    n_calcs = -(-n_total // FRAMES_PER_CALC)
    n_target_calcs = -(-n_target // FRAMES_PER_CALC)
    readable = [i for i, a in enumerate(areas) if a.readable]
    out = {}
    for c in range(n_calcs):
        calc_id = hashlib.sha256(f"bench-calc-{c}".encode()).hexdigest()
        if c < n_target_calcs:
            i = readable[c % len(readable)]
        else:
            i = (c - n_target_calcs) % len(areas)
        out[calc_id] = i
        areas[i].calc_ids.append(calc_id)
        first, last = c * FRAMES_PER_CALC, min((c + 1) * FRAMES_PER_CALC, n_total)
        areas[i].frames += last - first
        areas[i].target_frames += max(0, min(last, n_target) - first)
    return out


class _Routed:
    """A collection stand-in for ``fill_database``: each calculation and its frames go to their area's
    database (in ``targets``), stamped with the area's sharing fields; signatures go to every database."""

    def __init__(self, name: str, targets: list[pymongo.database.Database], areas: list[Area],
                 area_of: dict[str, int]) -> None:
        self.name, self.targets, self.areas, self.area_of = name, targets, areas, area_of

    def _db(self, i: int) -> pymongo.database.Database:
        return self.targets[i if len(self.targets) > 1 else 0]

    def update_one(self, *args: Any, **kwargs: Any) -> None:
        for mdb in {id(t): t for t in self.targets}.values():
            mdb[self.name].update_one(*args, **kwargs)

    def insert_many(self, docs: list[dict[str, Any]], ordered: bool = False) -> None:
        key = "calc_id" if self.name == "frames" else "_id"
        by_area: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for d in docs:
            i = self.area_of[d[key]]
            by_area[i].append({**d, **self.areas[i].fields})
        for i, batch in by_area.items():
            self._db(i)[self.name].insert_many(batch, ordered=ordered)

    def count_documents(self, query: dict[str, Any]) -> int:
        return sum(mdb[self.name].count_documents(query) for mdb in {id(t): t for t in self.targets}.values())


class Spread:
    """Stands in for a ``Database`` in ``bench_ingest.fill_database`` (its three collections, routed)."""

    def __init__(self, targets: list[pymongo.database.Database], areas: list[Area], area_of: dict[str, int]):
        self.frames_collection = _Routed("frames", targets, areas, area_of)
        self.calculations_collection = _Routed("calculations", targets, areas, area_of)
        self.signatures_collection = _Routed("signatures", targets, areas, area_of)


# -- measuring ------------------------------------------------------------------------------------------
def frames_ok(fs, n_target: int) -> bool:
    """The checks of ``bench_ingest.bench_query``: every Ge8 frame, each with its forces."""
    return (len(fs) == n_target
            and all("forces" in a.calc.results and a.calc.results["forces"].shape == (len(a), 3) for a in fs)
            and all(a.get_chemical_formula() == "Ge8" for a in fs))


def raw_find(targets: list[tuple[pymongo.collection.Collection, dict[str, Any]]]) -> int:
    """pymongo alone: fetch the matching documents (no Atoms), the lower bound of a query."""
    return sum(len(list(coll.find(q, batch_size=10000))) for coll, q in targets)


def alternate(cases: dict[str, Any], repeats: int) -> dict[str, list[float]]:
    """Time each case ``repeats`` times, the order of cases reversed every other repeat."""
    names = list(cases)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            gc.collect()
            t, _ = timed(cases[name])
            times[name].append(t)
        print(f"  repeat {i + 1}/{repeats}: " + ", ".join(f"{n} {times[n][-1]:.3f} s" for n in names), flush=True)
    return times


def profile_query(db, query: dict[str, Any], top: int = 25) -> dict[str, Any]:
    """cProfile one ``db.frames(**query)``: where the time goes, by the steps of ``Database.frames``."""
    prof = cProfile.Profile()
    prof.enable()
    t, _fs = timed(lambda: db.frames(**query))
    prof.disable()
    del _fs
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]

    def spent(suffix: str, func: str, caller: tuple[str, str] | None = None) -> float:
        """Cumulative seconds in ``func`` of a file ending ``suffix`` (only its calls from ``caller``, a
        (file suffix, function) pair, if given)."""
        total = 0.0
        for (file, _line, f), (_cc, _n, _tt, cum, callers) in stats.items():
            if not (Path(file).as_posix().endswith(suffix) and f == func):
                continue
            if caller is None:
                total += cum
            else:
                total += sum(v[3] for (cfile, _cl, cfunc), v in callers.items()
                             if Path(cfile).as_posix().endswith(caller[0]) and cfunc == caller[1])
        return total

    def calls(suffix: str, func: str) -> int:
        return sum(v[1] for (file, _l, f), v in stats.items() if Path(file).as_posix().endswith(suffix) and f == func)

    store, coll = "mlmd_lab/db/store.py", "pymongo/synchronous/collection.py"
    breakdown = {
        "whole frames() (profiled)": t,
        "  areas(): visible_areas (directory reads)": spent("mlmd_lab/db/access.py", "visible_areas"),
        "  _each_area: find_one probe of each area": spent(coll, "find_one", (store, "_each_area")),
        "  _frame_query_in (per area)": spent(store, "_frame_query_in"),
        "    of which distinct (unfinished, released)": spent(coll, "distinct", (store, "_frame_query_in")),
        "  fetch frame documents (cursor)": spent("pymongo/synchronous/cursor.py", "__next__", (store, "<listcomp>")),
        "  stamp owner/visibility (_stamp)": spent(store, "_stamp"),
        "  frame_from_document (Atoms)": spent("mlmd_lab/db/documents.py", "frame_from_document"),
    }
    counts = {"find_one": calls(coll, "find_one"), "distinct": calls(coll, "distinct"), "find": calls(coll, "find"),
              "visible_areas": calls("mlmd_lab/db/access.py", "visible_areas")}
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(top)
    return {"seconds": t, "breakdown_s": breakdown, "calls": counts, "text": buf.getvalue()}


# -- main -----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=100_000, help="frames in all (default 100000)")
    ap.add_argument("--target-frames", type=int, default=10_000, help="Ge8 frames among them (default 10000)")
    ap.add_argument("--repeats", type=int, default=5, help="timed queries per case (default 5)")
    ap.add_argument("--idle-users", type=int, default=0,
                    help="extra users without data (each adds a published database every query looks at)")
    ap.add_argument("--profile", action="store_true", help="cProfile one query with accounts and print the costs")
    args = ap.parse_args(argv)
    query = {"formula": "Ge"}

    result: dict[str, Any] = {"machine": machine_info(), "args": vars(args)}
    print(f"machine: {result['machine']['cpu_count']} CPUs, load {result['machine']['load_avg_1_5_15']}, "
          f"python {result['machine']['python']}, pymongo {result['machine']['pymongo']}, "
          f"secantusdb {result['machine']['secantusdb']}", flush=True)
    areas = make_areas()
    area_of = plan(areas, args.frames, args.target_frames)
    result["layout"] = [{"area": a.label, "database": a.db, "owner": a.owner, "readable_by_reader": a.readable,
                         "frames": a.frames, "target_frames": a.target_frames, "calculations": len(a.calc_ids),
                         "licence": a.fields["licence"]} for a in areas]
    with tempfile.TemporaryDirectory(prefix="mlmd-bench-access-") as tmp:
        open_db = admin = reader = handle = None
        try:
            # (a) one database, no accounts
            t, open_db = timed(lambda: mlmd_lab.connect(data_dir=Path(tmp) / "open", database="bench_access"))
            print(f"(a) embedded server without accounts up in {t:.2f} s; inserting {args.frames} frames ...",
                  flush=True)
            open_db.drop()
            open_db.ensure_indexes()
            result["insert_a"] = fill_database(Spread([open_db.mongo], areas, area_of), args.frames,
                                               args.target_frames)

            # (b) accounts, one database per area
            t, handle = timed(lambda: server.start(Path(tmp) / "hub", auth=True))
            admin = mlmd_lab.connect(handle.uri)
            uris = {READER: admin.users.create(READER, secrets.token_urlsafe(16), groups=[GROUP]),
                    MATE: admin.users.create(MATE, secrets.token_urlsafe(16), groups=[GROUP]),
                    PUBLISHER: admin.users.create(PUBLISHER, secrets.token_urlsafe(16)),
                    STRANGER: admin.users.create(STRANGER, secrets.token_urlsafe(16))}
            for k in range(args.idle_users):
                admin.users.create(f"idle-{k:03d}", secrets.token_urlsafe(16))
            reader = mlmd_lab.connect(uris[READER])  # makes the indexes of mlmd_u_reader, as any first connect
            print(f"(b) embedded server with accounts up in {t:.2f} s, {4 + args.idle_users} users; inserting "
                  f"{args.frames} frames over {len(areas)} databases as the administrator ...", flush=True)
            targets = [admin.client[a.db] for a in areas]
            for mdb in targets:  # what connect() and share()/publish() (Database._move) leave in these databases
                ensure_indexes(mdb)
            Database(admin.client, f"mlmd_u_{STRANGER}", uri=str(handle.uri)).ensure_indexes()  # stranger's connect
            result["insert_b"] = fill_database(Spread(targets, areas, area_of), args.frames, args.target_frames)

            # checks: the caller sees exactly the target frames, each owner's share; the stranger's is refused
            fs_a, fs_b = open_db.frames(**query), reader.frames(**query)  # also the warm-up
            owners = defaultdict(int)
            for a in fs_b:
                owners[a.info["owner"]] += 1
            expected = {a.owner: a.target_frames for a in areas if a.target_frames}
            try:
                pymongo.MongoClient(str(uris[READER]), serverSelectionTimeoutMS=5000)[f"mlmd_u_{STRANGER}"] \
                    .frames.find_one()
                stranger_refused = False
            except pymongo.errors.OperationFailure:
                stranger_refused = True
            result["checks"] = {
                "a_frames_ok": frames_ok(fs_a, args.target_frames), "b_frames_ok": frames_ok(fs_b, args.target_frames),
                "b_frames_by_owner": dict(owners), "b_expected_by_owner": expected,
                "b_owners_ok": dict(owners) == expected, "stranger_refused": stranger_refused,
                "b_areas_listed": len(reader.areas()),
            }
            del fs_a, fs_b
            print(f"checks: {result['checks']}", flush=True)

            base = open_db.frame_query(**query)
            raw_a = [(open_db.frames_collection, base)]
            raw_b = [(reader.client[a.db].frames, {"formula_reduced": base["formula_reduced"]})
                     for a in areas if a.readable]
            print(f"timing, {args.repeats} repeats", flush=True)
            times = alternate({"(a) frames": lambda: open_db.frames(**query),
                               "(b) frames": lambda: reader.frames(**query),
                               "(a) raw find": lambda: raw_find(raw_a),
                               "(b) raw find": lambda: raw_find(raw_b),
                               "(a) empty": lambda: open_db.frames(formula="Xe"),
                               "(b) empty": lambda: reader.frames(formula="Xe")}, args.repeats)
            if args.profile:
                result["profile"] = prof = profile_query(reader, query)
                print(prof["text"], flush=True)
                print_table(("where one (b) query spends its time (cumulative)", "s", "share"),
                            [(k, v, v / prof["seconds"]) for k, v in prof["breakdown_s"].items()])
                print(f"calls: {prof['calls']}", flush=True)

            # (b') the same with only calc_id and dataset indexed in the group and published databases
            for a in areas:
                if a.readable and a.owner != READER:
                    frames = admin.client[a.db].frames
                    frames.drop_indexes()
                    for key in ("calc_id", "dataset"):
                        frames.create_index(key)
            reader.frames(**query)  # warm-up
            times.update(alternate({"(b') frames": lambda: reader.frames(**query)}, args.repeats))
            result["seconds"] = times
            result["median_s"] = {k: median(v) for k, v in times.items()}
        finally:
            for db in (reader, admin):
                if db is not None:
                    db.close()
            if handle is not None:
                handle.stop()
            shutdown(open_db)

    m = result["median_s"]
    result["ratio_b_over_a"] = m["(b) frames"] / m["(a) frames"]
    result["ratio_b_unindexed_over_a"] = m["(b') frames"] / m["(a) frames"]
    rows = table_rows(result)
    result["table"] = [dict(zip(HEADERS, r, strict=True)) for r in rows]
    print()
    print_table(("area", "database", "frames", "Ge8 frames", "reader may read"),
                [(a["area"], a["database"], a["frames"], a["target_frames"], a["readable_by_reader"])
                 for a in result["layout"]], title="layout of (b)")
    print()
    print_table(HEADERS, rows, title=f"bench_access ({result['machine']['cpu_count']} CPUs; medians of "
                                     f"{args.repeats})")
    path = write_json("bench_access", result)
    print(f"\nwrote {path}")
    return 0


HEADERS = ("measurement", "value", "unit", "reference", "ratio/target", "pass?")


def table_rows(r: dict[str, Any]) -> list[tuple[Any, ...]]:
    m, c, n = r["median_s"], r["checks"], r["args"]["target_frames"]
    ok_b = c["b_frames_ok"] and c["b_owners_ok"] and c["stranger_refused"]
    ratio, ratio_i = r["ratio_b_over_a"], r["ratio_b_unindexed_over_a"]
    n_areas = c["b_areas_listed"]
    return [
        (f"insert {r['insert_a']['frames']:,} frames, one database (a)", r["insert_a"]["insert_frames_per_s"],
         "frames/s", None, None, None),
        (f"insert {r['insert_b']['frames']:,} frames, 4 databases (b)", r["insert_b"]["insert_frames_per_s"],
         "frames/s", None, None, None),
        (f"(a) frames(formula='Ge') → {n:,} Atoms, no accounts", m["(a) frames"], "s", None, None, c["a_frames_ok"]),
        ("    raw find, one database", m["(a) raw find"], "s", m["(a) frames"], m["(a) raw find"] / m["(a) frames"],
         None),
        (f"(b) same, with accounts ({n_areas} databases listed)", m["(b) frames"], "s", m["(a) frames"], ratio,
         ratio <= RATIO_TARGET and ok_b),
        ("    raw find, 3 readable databases", m["(b) raw find"], "s", m["(b) frames"],
         m["(b) raw find"] / m["(b) frames"], None),
        ("(b') group/public areas without query indexes", m["(b') frames"], "s", m["(a) frames"], ratio_i, None),
        ("empty query formula='Xe', no accounts", m["(a) empty"], "s", None, None, None),
        ("empty query formula='Xe', with accounts", m["(b) empty"], "s", m["(a) empty"],
         m["(b) empty"] / m["(a) empty"], None),
        ("stranger's private database refused to reader", c["stranger_refused"], "", None, None,
         c["stranger_refused"]),
        ("ratio (b)/(a), target", ratio, "x", RATIO_TARGET, ratio / RATIO_TARGET, ratio <= RATIO_TARGET and ok_b),
    ]


if __name__ == "__main__":
    sys.exit(main())
