"""How frame documents should store per-atom arrays: BSON arrays of doubles, raw bytes, or zlib bytes.

For a 192-atom water-like frame (64 H2O) and an 8-atom frame (Ge8 from the VASP sample), the frame document
of :func:`mlmd_lab.db.documents.frame_document` is stored three ways, differing only in the per-atom arrays
(``numbers``, ``positions``, ``forces``, ``magmoms`` if any):

(i)   ``list``:   BSON arrays (nested lists) of doubles / ints;
(ii)  ``binary``: raw little-endian float64 / uint8 bytes as BSON Binary — what mlmd_lab stores;
(iii) ``zlib``:   those bytes zlib-compressed (level 6) as BSON Binary.

Measured: document size; per-document times of packing (numpy → field values), ``bson.encode``,
``bson.decode`` and unpacking (fields → numpy); and a round trip of 2,000 documents through a real embedded
server (``insert_many``, then ``find`` of all of them converted back to numpy). Medians over repeats.

    python benchmarks/bench_storage.py [--docs 2000] [--repeats 5]

Writes ``benchmarks/results/bench_storage.json``.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ase.io
import bson
import numpy as np
from _common import machine_info, median, print_table, shutdown, write_json
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from bson.binary import Binary
from make_tree import SAMPLES

import mlmd_lab
from mlmd_lab.db.documents import frame_document

ARRAYS = {"numbers": "u1", "positions": "<f8", "forces": "<f8", "magmoms": "<f8"}
SHAPES = {"numbers": (-1,), "positions": (-1, 3), "forces": (-1, 3), "magmoms": (-1,)}
VARIANTS = ("list", "binary", "zlib")


# -- frames -----------------------------------------------------------------------------------------
def water_frame(n_molecules: int = 64, seed: int = 1) -> Atoms:
    """A 192-atom liquid-water-like box (1 g/cm³) with DFT-like forces, energy and stress."""
    rng = np.random.default_rng(seed)
    box = (n_molecules * 18.015 / 0.6022) ** (1 / 3)  # Å, at 1 g/cm³
    oh, angle = 0.9572, np.deg2rad(104.52)
    local = np.array([[0, 0, 0], [oh, 0, 0], [oh * np.cos(angle), oh * np.sin(angle), 0]])
    symbols, positions = [], []
    for _ in range(n_molecules):
        q = rng.normal(size=4)
        q /= np.linalg.norm(q)
        w, x, y, z = q
        rot = np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])
        positions += list(local @ rot.T + rng.uniform(0, box, 3))
        symbols += ["O", "H", "H"]
    atoms = Atoms(symbols, positions=positions, cell=[box] * 3, pbc=True)
    atoms.wrap()
    atoms.calc = SinglePointCalculator(atoms, energy=-14.2 * n_molecules + rng.normal(),
                                       forces=rng.normal(0, 1.0, (len(atoms), 3)),
                                       stress=rng.normal(0, 1e-3, 6))
    return atoms


def small_frame() -> Atoms:
    """The 8-atom Ge8 frame of the VASP sample (as ASE reads it)."""
    return ase.io.read(SAMPLES / "vasp" / "vasprun.Ge.vdw.xml", index=-1, format="vasp-xml")


# -- the three storage variants -----------------------------------------------------------------------
def packers() -> dict[str, Callable[[np.ndarray, str], Any]]:
    return {
        "list": lambda a, dt: a.tolist(),
        "binary": lambda a, dt: Binary(np.ascontiguousarray(a, dtype=dt).tobytes()),
        "zlib": lambda a, dt: Binary(zlib.compress(np.ascontiguousarray(a, dtype=dt).tobytes())),
    }


def unpackers() -> dict[str, Callable[[Any, str, tuple[int, ...]], np.ndarray]]:
    return {
        "list": lambda v, dt, shape: np.asarray(v, dtype=dt).reshape(shape),
        "binary": lambda v, dt, shape: np.frombuffer(v, dtype=dt).reshape(shape),
        "zlib": lambda v, dt, shape: np.frombuffer(zlib.decompress(v), dtype=dt).reshape(shape),
    }


def arrays_of(atoms: Atoms) -> dict[str, np.ndarray]:
    res = atoms.calc.results
    out = {"numbers": np.asarray(atoms.numbers), "positions": atoms.positions, "forces": np.asarray(res["forces"])}
    if res.get("magmoms") is not None:
        out["magmoms"] = np.asarray(res["magmoms"])
    return out


def pack(base: dict[str, Any], arrays: dict[str, np.ndarray], variant: str) -> dict[str, Any]:
    p = packers()[variant]
    doc = dict(base)
    for k, a in arrays.items():
        doc[k] = p(a, ARRAYS[k])
    return doc


def unpack(doc: dict[str, Any], variant: str) -> dict[str, np.ndarray]:
    u = unpackers()[variant]
    return {k: u(doc[k], dt, SHAPES[k]) for k, dt in ARRAYS.items() if k in doc}


def per_call_us(fn: Callable[[], Any], repeats: int, min_time: float = 0.05) -> float:
    """Median over ``repeats`` of the mean time of one call (µs), each repeat looping ≥ ``min_time`` s."""
    loops = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(loops):
            fn()
        dt = time.perf_counter() - t0
        if dt >= min_time / 4:
            break
        loops *= 4
    loops = max(1, int(loops * min_time / max(dt, 1e-9)))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(loops):
            fn()
        times.append((time.perf_counter() - t0) / loops * 1e6)
    return median(times)


def measure_codec(name: str, atoms: Atoms, repeats: int) -> list[dict[str, Any]]:
    base = frame_document(atoms, calc_id="c" * 64, signature_id="s" * 64, source_path="runs/x/vasprun.xml",
                          file_hash="c" * 64)
    arrays = arrays_of(atoms)
    scalars_only = {k: v for k, v in base.items() if k not in ARRAYS}
    scalar_bytes = len(bson.encode(scalars_only))
    rows = []
    for v in VARIANTS:
        doc = pack(scalars_only, arrays, v)
        raw = bson.encode(doc)
        decoded = bson.decode(raw)
        back = unpack(decoded, v)
        ok = all(np.array_equal(back[k].reshape(arrays[k].shape), arrays[k]) for k in arrays)
        row = {
            "frame": name, "natoms": len(atoms), "variant": v, "doc_bytes": len(raw),
            "array_bytes": len(raw) - scalar_bytes, "roundtrip_exact": ok,
            "pack_us": per_call_us(lambda d=scalars_only, v=v: pack(d, arrays, v), repeats),
            "encode_us": per_call_us(lambda d=doc: bson.encode(d), repeats),
            "decode_us": per_call_us(lambda r=raw: bson.decode(r), repeats),
            "unpack_us": per_call_us(lambda d=decoded, v=v: unpack(d, v), repeats),
        }
        row["roundtrip_us"] = row["pack_us"] + row["encode_us"] + row["decode_us"] + row["unpack_us"]
        row["decode_unpack_us"] = row["decode_us"] + row["unpack_us"]
        rows.append(row)
    ref = next(r for r in rows if r["variant"] == "binary")
    for r in rows:
        r["size_vs_binary"] = r["doc_bytes"] / ref["doc_bytes"]
        r["roundtrip_vs_binary"] = r["roundtrip_us"] / ref["roundtrip_us"]
        r["decode_unpack_vs_binary"] = r["decode_unpack_us"] / ref["decode_unpack_us"]
    return rows


def measure_server(db, name: str, atoms: Atoms, n_docs: int, repeats: int) -> list[dict[str, Any]]:
    """Insert ``n_docs`` copies (distinct ``_id``) of each variant, find them all back and unpack to numpy."""
    base = frame_document(atoms, calc_id="c" * 64, signature_id="s" * 64, source_path="runs/x/vasprun.xml",
                          file_hash="c" * 64)
    arrays = arrays_of(atoms)
    scalars_only = {k: v for k, v in base.items() if k not in ARRAYS}
    rows = []
    for v in VARIANTS:
        coll = db.mongo[f"storage_{name}_{v}"]
        ins, fnd = [], []
        for _ in range(repeats):
            coll.drop()
            docs = [{**pack(scalars_only, arrays, v), "_id": f"{i:08d}"} for i in range(n_docs)]
            gc.collect()
            t0 = time.perf_counter()
            coll.insert_many(docs, ordered=True)
            t1 = time.perf_counter()
            got = [unpack(d, v) for d in coll.find({}, batch_size=n_docs)]
            t2 = time.perf_counter()
            assert len(got) == n_docs and np.array_equal(got[-1]["forces"], arrays["forces"])
            ins.append(t1 - t0)
            fnd.append(t2 - t1)
        coll.drop()
        rows.append({"frame": name, "variant": v, "docs": n_docs, "insert_s": median(ins), "find_s": median(fnd),
                     "insert_all_s": ins, "find_all_s": fnd})
    ref = next(r for r in rows if r["variant"] == "binary")
    for r in rows:
        r["total_s"] = r["insert_s"] + r["find_s"]
        r["total_vs_binary"] = r["total_s"] / (ref["insert_s"] + ref["find_s"])
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=2000, help="documents per server round trip (default 2000)")
    ap.add_argument("--repeats", type=int, default=5, help="repeats of every timing (default 5; server: 3)")
    args = ap.parse_args(argv)
    machine = machine_info()
    print(f"machine: {machine['cpu_count']} CPUs, load {machine['load_avg_1_5_15']}, python {machine['python']}, "
          f"ase {machine['ase']}, pymongo {machine['pymongo']}", flush=True)
    frames = {"water192": water_frame(), "ge8": small_frame()}
    codec = [r for name, atoms in frames.items() for r in measure_codec(name, atoms, args.repeats)]
    server_rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="mlmd-bench-storage-") as tmp:
        db = None
        try:
            db = mlmd_lab.connect(data_dir=Path(tmp) / "data", database="bench_storage")
            for name, atoms in frames.items():
                server_rows += measure_server(db, name, atoms, args.docs, max(3, args.repeats // 2 + 1))
            db.drop()
        finally:
            shutdown(db)

    srv = {(r["frame"], r["variant"]): r for r in server_rows}
    headers = ("frame", "variant", "doc bytes", "arrays bytes", "size/binary", "pack µs", "encode µs",
               "decode µs", "unpack µs", "round trip µs", "rt/binary", f"insert {args.docs} s", f"find {args.docs} s",
               "server/binary")
    rows = []
    for r in codec:
        s = srv[(r["frame"], r["variant"])]
        rows.append((r["frame"], r["variant"], r["doc_bytes"], r["array_bytes"], r["size_vs_binary"],
                     r["pack_us"], r["encode_us"], r["decode_us"], r["unpack_us"], r["roundtrip_us"],
                     r["roundtrip_vs_binary"], s["insert_s"], s["find_s"], s["total_vs_binary"]))
    print()
    print_table(headers, rows, title="bench_storage (medians; round trip = pack + encode + decode + unpack; "
                                     "server = insert_many + find + unpack to numpy)")
    result = {"machine": machine, "args": vars(args), "codec": codec, "server": server_rows,
              "table": [dict(zip(headers, row, strict=True)) for row in rows],
              "notes": {"list": "BSON arrays (nested lists) of doubles/ints", "binary": "raw <f8/u1 bytes, BSON Binary "
                        "(mlmd_lab)", "zlib": "zlib level 6 of the raw bytes, BSON Binary"}}
    path = write_json("bench_storage", result)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
