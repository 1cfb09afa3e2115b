"""Ingest throughput of mlmd_lab vs bare ASE reading, and query speed on a 100,000-frame database.

One run does everything in a temporary folder (removed at the end, with the embedded server it started):

(a) bare ASE: ``ase.io.read(f, index=":")`` over every run file of a tree made by ``make_tree.py``;
(b) mlmd_lab: ``db.ingest(tree)`` into a fresh database of a fresh embedded server (database writes
    included), alternating with (a) so machine noise hits both; then a re-ingest of the same tree (adds 0);
(c) queries: 100,000 frame documents (10,000 Ge8 + 90,000 CH4 / Ti6O2 / H4O2, all rattled so every one is
    distinct) inserted with ``insert_many`` in chunks of 5,000, then ``db.frames(formula="Ge")`` → 10,000 Atoms.

Medians over repeats; ratios against the references; nothing here asserts on time.

    python benchmarks/bench_ingest.py [--copies 40] [--repeats 3] [--query-repeats 5] [--profile]

Writes ``benchmarks/results/bench_ingest.json``.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import hashlib
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ase.io
import numpy as np
from _common import machine_info, median, print_table, shutdown, timed, write_json
from make_tree import SAMPLES, make_tree

import mlmd_lab
from mlmd_lab.db.documents import frame_document
from mlmd_lab.io import detect_format, read
from mlmd_lab.settings import normalise_signature, signature_hash

INGEST_RATIO_TARGET = 0.5
QUERY_TARGET_S = 2.0
CHUNK = 5000
FRAMES_PER_CALC = 100


# -- (a) and (b) ----------------------------------------------------------------------------------
def ase_read_all(run_paths: list[tuple[str, str]]) -> int:
    """Read every run file with ASE; the number of frames."""
    n = 0
    for path, fmt in run_paths:
        n += len(ase.io.read(path, index=":", format=fmt))
    return n


def fresh(db) -> None:
    """Drop the database and recreate its indexes (what ``connect`` gives a new database)."""
    db.drop()
    db.ensure_indexes()


def bench_ingest(db, tree: Path, info: dict[str, Any], repeats: int) -> dict[str, Any]:
    run_paths = info["run_paths"]
    mb = info["run_bytes"] / 1e6
    # warm-up (imports, page cache, server first writes), untimed
    n_ase = ase_read_all(run_paths)
    db.ingest(tree, progress=False)
    ase_s, ing_s, reports = [], [], []
    for i in range(repeats):
        fresh(db)
        gc.collect()
        if i % 2 == 0:  # alternate the order so a noisy stretch does not hit one side only
            ase_s.append(timed(lambda: ase_read_all(run_paths))[0])
            t, rep = timed(lambda: db.ingest(tree, progress=False))
        else:
            t, rep = timed(lambda: db.ingest(tree, progress=False))
            ase_s.append(timed(lambda: ase_read_all(run_paths))[0])
        ing_s.append(t)
        reports.append(rep)
        print(f"  repeat {i + 1}/{repeats}: ASE {ase_s[-1]:.2f} s, ingest {t:.2f} s "
              f"({rep.added} added, {len(rep.failed)} failed)", flush=True)
    re_s, re_reports = [], []
    for _ in range(repeats):
        t, rep = timed(lambda: db.ingest(tree, progress=False))
        re_s.append(t)
        re_reports.append(rep)
    last = reports[-1]
    out = {
        "run_files": info["run_files"], "run_bytes": info["run_bytes"], "frames_ase": n_ase,
        "ase_seconds": ase_s, "ingest_seconds": ing_s, "reingest_seconds": re_s,
        "ase_median_s": median(ase_s), "ingest_median_s": median(ing_s), "reingest_median_s": median(re_s),
        "ingest_added": [r.added for r in reports], "ingest_failed": [len(r.failed) for r in reports],
        "ingest_report_seconds": [r.seconds for r in reports],
        "ingest_calculations_added": last.calculations_added, "ingest_ignored": last.ignored,
        "ingest_bytes_read": last.bytes_read,
        "reingest_added": [r.added for r in re_reports], "reingest_skipped": [r.skipped for r in re_reports],
        "failed_examples": last.failed[:5],
    }
    out["ase_frames_per_s"] = n_ase / out["ase_median_s"]
    out["ase_mb_per_s"] = mb / out["ase_median_s"]
    out["ingest_frames_per_s"] = last.added / out["ingest_median_s"]
    out["ingest_mb_per_s"] = mb / out["ingest_median_s"]
    out["ratio"] = out["ingest_frames_per_s"] / out["ase_frames_per_s"]
    # ratio per repeat pair (same stretch of machine time), as a second view on the noise
    out["ratio_per_repeat"] = [(r.added / i) / (n_ase / a) for r, i, a in zip(reports, ing_s, ase_s, strict=True)]
    return out


def profile_ingest(db, tree: Path, top: int = 25) -> dict[str, Any]:
    """cProfile one ingest into a fresh database; the top functions by cumulative and by own time."""
    fresh(db)
    prof = cProfile.Profile()
    prof.enable()
    rep = db.ingest(tree, progress=False)
    prof.disable()
    total = rep.seconds
    stats = pstats.Stats(prof)
    rows = []
    for (file, line, func), (_cc, ncalls, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{Path(file).name}:{line}({func})", "ncalls": ncalls,
                     "tottime_s": tottime, "cumtime_s": cumtime})
    by_cum = sorted(rows, key=lambda r: -r["cumtime_s"])[:top]
    by_own = sorted(rows, key=lambda r: -r["tottime_s"])[:top]
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(top)
    cum = [(Path(file).as_posix(), func, cumtime)
           for (file, _line, func), (_cc, _n, _tt, cumtime, _c) in stats.stats.items()]  # type: ignore[attr-defined]

    def spent(suffix: str, func: str) -> float:
        return sum(t for file, f, t in cum if file.endswith(suffix) and f == func)

    breakdown = {
        "whole ingest (profiled)": total,
        "  parse (mlmd_lab.io.read)": spent("mlmd_lab/io/__init__.py", "read"),
        "    VASP: read_vasprun": spent("mlmd_lab/io/vasp.py", "read_vasprun"),
        "      ase.io.read inside (vasp+qe)": spent("ase/io/formats.py", "read"),
        "      VASP settings head pass (_read_head)": spent("mlmd_lab/io/vasp.py", "_read_head"),
        "      VASP SCF-step pass (_scan_steps)": spent("mlmd_lab/io/vasp.py", "_scan_steps"),
        "    QE: read_pw_output": spent("mlmd_lab/io/espresso.py", "read_pw_output"),
        "  frame_document (incl. content_hash)": spent("mlmd_lab/db/documents.py", "frame_document"),
        "  database writes (_write)": spent("mlmd_lab/db/ingest.py", "_write"),
        "    update_one (signature upserts, one per file)": spent("pymongo/synchronous/collection.py", "update_one"),
        "    insert_many (calculations + frames)": spent("pymongo/synchronous/collection.py", "insert_many"),
        "  hash files + skip known (_skip_known)": spent("mlmd_lab/db/ingest.py", "_skip_known"),
        "  discover (walk + detect_format)": spent("mlmd_lab/db/ingest.py", "discover"),
    }
    return {"seconds": total, "added": rep.added, "breakdown_s": breakdown, "top_cumulative": by_cum,
            "top_own": by_own, "text": buf.getvalue()}


# -- (c) ------------------------------------------------------------------------------------------
def templates() -> list[tuple[Any, str]]:
    """Small real frames from the samples, each with the settings-signature id of its run:
    Ge8 first (the query target), then CH4, Ti6O2 and H4O2."""
    files = [SAMPLES / "vasp" / "vasprun.Ge.vdw.xml", SAMPLES / "qe" / "01.out",
             SAMPLES / "vasp" / "vasprun.Ti-O-Ti-v6.xml", SAMPLES / "vasp" / "vasprun.h2o.md.xml"]
    out = []
    for f in files:
        calc = read(f, detect_format(f))
        sig = dict(calc.signature)
        if sig.get("code"):
            sig.setdefault("code_version", calc.code_version)
        out.append((calc.frames[-1], normalise_signature(sig)))
    return out


class DocFactory:
    """Distinct frame documents made fast: one ``Atoms`` per template, rattled in place for every document."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.templates = []
        self.signatures: dict[str, dict[str, Any]] = {}
        for atoms, sig in templates():
            sig_id = signature_hash(sig)
            self.signatures[sig_id] = sig
            res = atoms.calc.results
            self.templates.append({
                "atoms": atoms, "sig_id": sig_id, "pos": atoms.positions.copy(),
                "energy": float(res["energy"]), "forces": np.array(res["forces"], dtype=float),
                "stress": np.array(res["stress"], dtype=float) if res.get("stress") is not None else None,
            })

    def doc(self, which: int, calc_id: str, step: int) -> dict[str, Any]:
        t = self.templates[which]
        atoms, rng = t["atoms"], self.rng
        atoms.positions[:] = t["pos"] + rng.normal(0.0, 0.02, t["pos"].shape)
        results = {"energy": t["energy"] + rng.normal(0.0, 0.05),
                   "forces": t["forces"] + rng.normal(0.0, 0.05, t["forces"].shape)}
        if t["stress"] is not None:
            results["stress"] = t["stress"] + rng.normal(0.0, 1e-4, 6)
        atoms.calc.results = results
        atoms.info["step"] = step
        return frame_document(atoms, calc_id=calc_id, signature_id=t["sig_id"], source_path=f"bench/{calc_id}",
                              file_hash=calc_id)


def fill_database(db, n_total: int, n_target: int) -> dict[str, Any]:
    """Insert ``n_total`` frames (``n_target`` Ge8, the rest cycling CH4 / Ti6O2 / H4O2) with their
    calculations (status complete) and signatures."""
    factory = DocFactory()
    for sig_id, sig in factory.signatures.items():
        db.signatures_collection.update_one({"_id": sig_id}, {"$setOnInsert": sig}, upsert=True)
    gen_s = ins_s = calc_s = 0.0
    calcs: dict[str, dict[str, Any]] = {}
    for start in range(0, n_total, CHUNK):
        t0 = time.perf_counter()
        docs = []
        for i in range(start, min(start + CHUNK, n_total)):
            which = 0 if i < n_target else 1 + (i - n_target) % 3
            c = i // FRAMES_PER_CALC
            calc_id = hashlib.sha256(f"bench-calc-{c}".encode()).hexdigest()
            docs.append(factory.doc(which, calc_id, i % FRAMES_PER_CALC))
            if calc_id not in calcs:
                calcs[calc_id] = {"_id": calc_id, "format": "bench", "code": "bench", "status": "complete",
                                  "signature_id": docs[-1]["signature_id"], "sources": [f"bench/{calc_id}"],
                                  "n_frames": 0, "finished": True, "warnings": [], "tags": []}
            calcs[calc_id]["n_frames"] += 1
        t1 = time.perf_counter()
        db.frames_collection.insert_many(docs, ordered=False)
        t2 = time.perf_counter()
        gen_s += t1 - t0
        ins_s += t2 - t1
    t0 = time.perf_counter()
    db.calculations_collection.insert_many(list(calcs.values()), ordered=False)
    calc_s = time.perf_counter() - t0
    n = db.frames_collection.count_documents({})
    return {"frames": n, "calculations": len(calcs), "signatures": len(factory.signatures),
            "generate_s": gen_s, "insert_s": ins_s, "insert_calcs_s": calc_s,
            "insert_frames_per_s": n_total / ins_s, "generate_docs_per_s": n_total / gen_s}


def bench_query(db, n_target: int, repeats: int) -> dict[str, Any]:
    db.frames(formula="Ge")  # warm-up
    q_s, raw_s = [], []
    checks = []
    for _ in range(repeats):
        gc.collect()
        t, fs = timed(lambda: db.frames(formula="Ge"))
        q_s.append(t)
        ok = (len(fs) == n_target
              and all("forces" in a.calc.results and a.calc.results["forces"].shape == (len(a), 3) for a in fs)
              and all(a.get_chemical_formula() == "Ge8" for a in fs))
        checks.append(ok)
        del fs
        query = db.frame_query(formula="Ge")
        raw_s.append(timed(lambda q=query: list(db.frames_collection.find(q, batch_size=10000)))[0])
    return {"seconds": q_s, "median_s": median(q_s), "raw_find_seconds": raw_s, "raw_find_median_s": median(raw_s),
            "checks_ok": all(checks), "frames_per_s": n_target / median(q_s)}


# -- main -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--copies", type=int, default=40, help="copies of the 6 sample run files (default 40 → 240)")
    ap.add_argument("--repeats", type=int, default=3, help="ingest / ASE repeats (default 3)")
    ap.add_argument("--query-repeats", type=int, default=5, help="query repeats (default 5)")
    ap.add_argument("--frames", type=int, default=100_000, help="frames in the query database (default 100000)")
    ap.add_argument("--target-frames", type=int, default=10_000, help="Ge8 frames among them (default 10000)")
    ap.add_argument("--profile", action="store_true", help="also cProfile one ingest and print the top costs")
    ap.add_argument("--skip-query", action="store_true", help="skip part (c)")
    args = ap.parse_args(argv)

    result: dict[str, Any] = {"machine": machine_info(), "args": vars(args)}
    print(f"machine: {result['machine']['cpu_count']} CPUs, load {result['machine']['load_avg_1_5_15']}, "
          f"python {result['machine']['python']}, ase {result['machine']['ase']}, "
          f"pymongo {result['machine']['pymongo']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="mlmd-bench-ingest-") as tmp:
        tree = Path(tmp) / "tree"
        t, info = timed(lambda: make_tree(tree, args.copies))
        print(f"tree: {info['run_files']} run files + {info['input_files']} inputs, "
              f"{info['run_bytes'] / 1e6:.1f} MB of run files, made in {t:.1f} s", flush=True)
        result["tree"] = {k: v for k, v in info.items() if k != "run_paths"}
        db = qdb = None
        try:
            t, db = timed(lambda: mlmd_lab.connect(data_dir=Path(tmp) / "data", database="bench_ingest"))
            result["server_start_s"] = t
            print(f"embedded server up in {t:.2f} s; (a)+(b) ingest, {args.repeats} repeats", flush=True)
            result["ingest"] = bench_ingest(db, tree, info, args.repeats)
            if args.profile:
                result["profile"] = prof = profile_ingest(db, tree)
                print(prof["text"], flush=True)
                print_table(("where one profiled ingest spends its time (cumulative)", "s", "share"),
                            [(k, v, v / prof["seconds"]) for k, v in prof["breakdown_s"].items()])
            if not args.skip_query:
                qdb = mlmd_lab.connect(data_dir=Path(tmp) / "data", database="bench_query")
                qdb.drop()
                qdb.ensure_indexes()
                print(f"(c) inserting {args.frames} frames ...", flush=True)
                result["insert"] = fill_database(qdb, args.frames, args.target_frames)
                print(f"(c) querying, {args.query_repeats} repeats", flush=True)
                result["query"] = bench_query(qdb, args.target_frames, args.query_repeats)
                qdb.drop()
            db.drop()
        finally:
            shutdown(qdb, db)

    rows = table_rows(result)
    result["table"] = [dict(zip(HEADERS, r, strict=True)) for r in rows]
    print()
    print_table(HEADERS, rows, title=f"bench_ingest ({result['machine']['cpu_count']} CPUs; medians)")
    path = write_json("bench_ingest", result)
    print(f"\nwrote {path}")
    return 0


HEADERS = ("measurement", "value", "unit", "reference", "ratio/target", "pass?")


def table_rows(r: dict[str, Any]) -> list[tuple[Any, ...]]:
    g = r["ingest"]
    n = g["ingest_added"][-1]
    rows: list[tuple[Any, ...]] = [
        (f"bare ASE read, {g['run_files']} files / {g['frames_ase']} frames", g["ase_median_s"], "s", None, None,
         None),
        ("bare ASE read throughput", g["ase_frames_per_s"], "frames/s", None, None, None),
        ("bare ASE read throughput", g["ase_mb_per_s"], "MB/s", None, None, None),
        (f"mlmd_lab ingest ({n} frames added)", g["ingest_median_s"], "s", g["ase_median_s"],
         g["ase_median_s"] / g["ingest_median_s"], None),
        ("mlmd_lab ingest throughput", g["ingest_frames_per_s"], "frames/s", g["ase_frames_per_s"], g["ratio"],
         g["ratio"] >= INGEST_RATIO_TARGET and n == g["frames_ase"]),
        ("mlmd_lab ingest throughput", g["ingest_mb_per_s"], "MB/s", g["ase_mb_per_s"], g["ratio"],
         g["ratio"] >= INGEST_RATIO_TARGET),
        (f"re-ingest (adds {g['reingest_added'][-1]}, skips {g['reingest_skipped'][-1]})", g["reingest_median_s"],
         "s", g["ingest_median_s"], g["reingest_median_s"] / g["ingest_median_s"], g["reingest_added"][-1] == 0),
    ]
    if "insert" in r:
        ins, q = r["insert"], r["query"]
        rows += [
            (f"insert {ins['frames']:,} frame docs (chunks of {CHUNK})", ins["insert_frames_per_s"], "frames/s",
             None, None, None),
            ("build frame docs (frame_document)", ins["generate_docs_per_s"], "docs/s", None, None, None),
            (f"frames(formula='Ge') → {r['args']['target_frames']:,} Atoms", q["median_s"], "s", QUERY_TARGET_S,
             q["median_s"] / QUERY_TARGET_S, q["median_s"] < QUERY_TARGET_S and q["checks_ok"]),
            ("  of which raw find (pymongo docs only)", q["raw_find_median_s"], "s", q["median_s"],
             q["raw_find_median_s"] / q["median_s"], None),
        ]
    return rows


if __name__ == "__main__":
    sys.exit(main())
