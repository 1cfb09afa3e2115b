"""Neighbour-list padding and MD compilations: what skipping padded slots and spare room buy.

Each block of pairs and group of triplets of a neighbour graph has a capacity (rounded up, so that a small change of
the counts does not need a new XLA compilation) and records its real count (``Graph.pair_count``, ``trip_count``);
the descriptor loops stop after the last real entry. A run's first lists get spare room (``SPARE`` in
``mlmd_lab/potentials/neighbours.py``). Three variants, each in its own process, one thread, on the same machine in
one run:

- ``every slot``: the counts removed from the graphs (the loops visit every slot, as before the counts) and no
  spare room: the reference, the code before this change;
- ``counts``: padding skipped, no spare room;
- ``counts + spare``: what mlmd_lab does.

Cases:

- tutorial 04 (notebooks/04_md_analysis.ipynb, as the test suite runs it): n2p2's Cu2S potential on its 144-atom DFT
  structure, 60 NVT steps at 600 K (2 fs), then 200 NVE steps from where they ended; the persistent compilation
  cache off, so every layout compiles. Reported: MD block compilations and their seconds, run seconds in all.
- water: NVE of the 1,080-atom water with n2p2's H2O potential (``bench_md.py``'s worker, float64, 60 steps, median
  of 3): µs per atom-step of the steady state (compilation and start excluded).

    python benchmarks/bench_layouts.py

Writes ``benchmarks/results/bench_layouts.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from _common import machine_info, print_table, run_json_worker, write_json

ROOT = Path(__file__).resolve().parents[1]
CU2S = ROOT / ".." / "shared" / "external" / "n2p2" / "Cu2S_PBE"
VARIANTS = ("every slot", "counts", "counts + spare")


def _apply(variant: str) -> None:
    """Set up the variant in this process (before any graph is built)."""
    from mlmd_lab.potentials import neighbours

    if variant == "every slot":
        arrays = neighbours.Graph.arrays
        neighbours.Graph.arrays = lambda self: {k: v for k, v in arrays(self).items()
                                                if k not in ("pair_count", "trip_count")}
    if variant in ("every slot", "counts"):
        neighbours.SPARE = 0.0


def tutorial_worker(variant: str) -> dict:
    os.environ["MLMD_JAX_CACHE"] = "off"
    os.environ["MLMD_CPU_DEVICES"] = "1"
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    import warnings

    from mlmd_lab import md
    from mlmd_lab.io.n2p2 import read_input_data
    from mlmd_lab.potentials import HDNNP

    _apply(variant)
    warnings.simplefilter("ignore")
    start = read_input_data(CU2S / "input.data", "eV", "Angstrom")[0]
    pot = HDNNP.from_n2p2(CU2S, energy_unit="eV", length_unit="Angstrom")
    t0 = time.perf_counter()
    nvt = md.run(pot, start, "nvt", temperature=600.0, timestep=2.0, steps=60, trajectory_interval=20, log_interval=5,
                 seed=1)
    nve = md.run(pot, nvt.atoms, "nve", timestep=2.0, steps=200, trajectory_interval=4, log_interval=4)
    wall = time.perf_counter() - t0
    return {"variant": variant, "atoms": len(start), "wall_s": wall,
            "compilations": [nvt.compilations, nve.compilations], "compile_s": [nvt.compile_s, nve.compile_s],
            "rebuilds": [nvt.rebuilds, nve.rebuilds],
            "run_us_per_atom_step": [(r.wall_s - r.compile_s) / (r.steps * len(start)) * 1e6 for r in (nvt, nve)]}


def water_worker(variant: str) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    import bench_md

    bench_md._setup("cpu", 1)
    _apply(variant)
    r = bench_md.throughput_worker("cpu", 1, "float64", 1, 60, 0.5)
    return {"variant": variant, **{k: r[k] for k in ("atoms", "us_per_atom_step", "us_per_atom_step_all",
                                                     "rebuilds", "compute")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tutorial-worker", metavar="VARIANT")
    parser.add_argument("--water-worker", metavar="VARIANT")
    args = parser.parse_args()
    if args.tutorial_worker:
        print(json.dumps(tutorial_worker(args.tutorial_worker)))
        return
    if args.water_worker:
        print(json.dumps(water_worker(args.water_worker)))
        return
    if not CU2S.exists():
        sys.exit(f"n2p2's Cu2S potential not found at {CU2S} (../shared/external is needed)")
    tutorial, water = [], []
    for variant in VARIANTS:
        r = run_json_worker([sys.executable, __file__, "--tutorial-worker", variant], f"tutorial {variant}")
        if r:
            tutorial.append(r)
    for variant in VARIANTS:
        r = run_json_worker([sys.executable, __file__, "--water-worker", variant], f"water {variant}")
        if r:
            water.append(r)
    base = next((r for r in tutorial if r["variant"] == "every slot"), None)
    print_table(["variant", "compilations NVT+NVE", "compile s", "run s in all", "ratio to every slot",
                 "µs/atom-step NVT, NVE"],
                [[r["variant"], f"{r['compilations'][0]}+{r['compilations'][1]}", sum(r["compile_s"]), r["wall_s"],
                  r["wall_s"] / base["wall_s"] if base else None,
                  ", ".join(f"{x:.0f}" for x in r["run_us_per_atom_step"])] for r in tutorial],
                title="Tutorial 04: n2p2 Cu2S, 144 atoms, 60 NVT steps at 600 K + 200 NVE steps, 1 thread, "
                      "compilation cache off")
    ref = next((r for r in water if r["variant"] == "every slot"), None)
    print_table(["variant", "µs/atom-step", "ratio to every slot", "runs", "rebuilds"],
                [[r["variant"], r["us_per_atom_step"], r["us_per_atom_step"] / ref["us_per_atom_step"] if ref else None,
                  ", ".join(f"{x:.0f}" for x in r["us_per_atom_step_all"]), r["rebuilds"]] for r in water],
                title="1,080-atom water, n2p2 H2O, NVE, 1 thread, float64, 60 steps (median of 3)")
    print(f"wrote {write_json('bench_layouts', {'machine': machine_info(), 'tutorial': tutorial, 'water': water})}")


if __name__ == "__main__":
    main()
