"""Cost of HDNNP energy + forces for n2p2's 1080-atom water structure, against n2p2's 281 µs/atom per core.

Each configuration runs in its own process (so thread settings take effect before JAX starts):
CPU with 1 thread (pinned to one core, XLA's intra-op threading off), CPU with 2 threads, float64 and
float32, and the GPU when JAX sees one. Per configuration it measures, medians over repeats:

- ``build``: neighbour list (vesin) + triplet lists + padding on the host, µs/atom;
- ``compile``: first call of the jit-compiled energy+forces function, s;
- ``E+F``: energy, forces and virial after compilation with prepared neighbour data (as in MD between
  neighbour-list rebuilds), µs/atom;
- ``E``: energy only, µs/atom;
- ``single point``: build + E+F, µs/atom (what one n2p2 prediction does: its 281 µs/atom include its
  neighbour list, 79 ms of 302 ms);
- the energy's relative deviation from n2p2's value.

Reference: n2p2 2.3.0 measured on this kind of machine (../shared/external/README.md): 281 µs/atom of CPU
time on one core, or, where ../shared/tools/n2p2/nnp-predict is present, n2p2's own predictor measured in the same
run on the same core (its whole process, CPU time per atom).

    python benchmarks/bench_hdnnp.py [--repeats 11]

Writes ``benchmarks/results/bench_hdnnp.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from _common import gpu_available, machine_info, median, n2p2_predict_cost, print_table, run_json_worker, write_json

ROOT = Path(__file__).resolve().parents[1]
WATER = ROOT / ".." / "shared" / "external" / "n2p2" / "H2O_RPBE-D3"
N2P2_US_PER_ATOM = 281.0
N2P2_ENERGY = -27564.547347815904


def worker(platform: str, threads: int, dtype: str, repeats: int) -> dict:
    if platform == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
        if threads == 1:
            os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:threads]))
    import jax

    from mlmd_lab.io.n2p2 import read_input_data
    from mlmd_lab.potentials import HDNNP

    model = HDNNP.from_n2p2(WATER, energy_unit="Ha", length_unit="Bohr", dtype=dtype)
    atoms = read_input_data(WATER / "input.data", "Ha", "Bohr")[0]
    n = len(atoms)
    builds = []
    for _ in range(max(3, repeats // 2)):
        t0 = time.perf_counter()
        graph = model.graph([atoms])
        builds.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    out = model.evaluate_graph(graph, forces=True)
    compile_s = time.perf_counter() - t0
    times = {}
    for forces in (True, False):
        model.evaluate_graph(graph, forces=forces)
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model.evaluate_graph(graph, forces=forces)
            samples.append(time.perf_counter() - t0)
        times[forces] = median(samples)
    return {
        "platform": platform,
        "device": str(jax.devices()[0]),
        "threads": threads if platform == "cpu" else None,
        "dtype": dtype,
        "atoms": n,
        "pairs": int(graph.pair_mask.sum()),
        "triplets": int(graph.trip_mask.sum()),
        "build_us_per_atom": median(builds) / n * 1e6,
        "compile_s": compile_s,
        "energy_forces_us_per_atom": times[True] / n * 1e6,
        "energy_us_per_atom": times[False] / n * 1e6,
        "single_point_us_per_atom": (median(builds) + times[True]) / n * 1e6,
        "energy_relative_error": abs(out["energy"][0] - N2P2_ENERGY) / abs(N2P2_ENERGY),
    }


def run_worker(platform: str, threads: int, dtype: str, repeats: int) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", platform, str(threads), dtype, "--repeats", str(repeats)]
    return run_json_worker(cmd, f"{platform}/{threads}/{dtype}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--worker", nargs=3, metavar=("PLATFORM", "THREADS", "DTYPE"))
    args = parser.parse_args()
    if args.worker:
        platform, threads, dtype = args.worker
        print(json.dumps(worker(platform, int(threads), dtype, args.repeats)))
        return
    if not WATER.exists():
        sys.exit(f"n2p2 water potential not found at {WATER} (../shared/external is needed)")
    configs = [("cpu", 1, "float64"), ("cpu", 2, "float64"), ("cpu", 1, "float32"), ("cpu", 2, "float32")]
    gpu = gpu_available()
    if gpu:
        configs += [("gpu", 0, "float64"), ("gpu", 0, "float32")]
    results = [r for r in (run_worker(*c, args.repeats) for c in configs) if r is not None]
    n2p2 = n2p2_predict_cost(WATER)  # n2p2's own predictor on the same core, this run
    reference = n2p2["cpu_us_per_atom"] if n2p2 else N2P2_US_PER_ATOM
    rows = []
    for r in results:
        cores = r["threads"] or 1
        per_core = r["energy_forces_us_per_atom"] * cores if r["platform"] == "cpu" else None
        rows.append([
            f"{r['platform']} {r['threads'] or ''}{'t ' if r['threads'] else ''}{r['dtype']}",
            r["build_us_per_atom"], r["compile_s"], r["energy_us_per_atom"], r["energy_forces_us_per_atom"],
            r["single_point_us_per_atom"], reference / r["energy_forces_us_per_atom"],
            None if per_core is None else reference / per_core, r["energy_relative_error"],
        ])
    print_table(
        ["config", "build µs/at", "compile s", "E µs/at", "E+F µs/at", "single pt µs/at", "n2p2/E+F",
         "n2p2/(E+F·cores)", "|ΔE|/E vs n2p2"],
        rows,
        title=f"HDNNP energy+forces, n2p2 H2O_RPBE-D3, 1080 atoms (n2p2: {reference:.0f} µs/atom/core, "
              + ("nnp-predict's whole process measured in this run)" if n2p2 else "the figure measured earlier)"),
    )
    if not gpu:
        print("GPU: not measured (JAX sees no GPU on this machine)")
    path = write_json("bench_hdnnp", {"machine": machine_info(), "n2p2_us_per_atom_per_core": reference, "n2p2": n2p2,
                                      "gpu_available": gpu, "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
