"""PySCF's OpenMP threads on a shared machine: time per molecular calculation, idle and with a busy core.

A JupyterHub node, a laptop running the test suite, a batch node shared with other jobs: the cores the labelling
kernel sees are rarely all free. PySCF runs its integrals and its exchange-correlation grid with OpenMP, and GNU
OpenMP's threads spin while they wait for each other, so a thread whose core is taken by another process holds up
the others. This benchmark measures one energy+forces calculation (:class:`mlmd_lab.dft.PySCF`, RKS PBE/def2-SVP,
the quickstart's recipe) of three molecules, per thread setting, on an idle machine and with one core kept busy
by another process (a pure-Python loop, like another user's kernel):

- ``1 thread``: ``PySCF(threads=1)`` (one OpenMP and one BLAS thread during the calculation);
- ``2 threads, spinning``: ``threads=2`` with GNU OpenMP's default waiting (``OMP_WAIT_POLICY`` unset);
- ``2 threads, passive``: ``threads=2`` with ``OMP_WAIT_POLICY=PASSIVE`` (waiting threads sleep);
- ``default``: ``PySCF()`` as mlmd_lab configures it (what the quickstart and label() use; before 2026-12-06 it was
  PySCF's own default, all cores spinning: the "2 threads, spinning" row with numpy's BLAS on 2 threads too).

Each setting runs in its own process (OpenMP reads its environment once, when PySCF's library loads); medians of
``--repeat`` calculations after one warm-up. Reported: wall and CPU seconds per calculation, and the ratio to
1 thread in the same machine state.

    python benchmarks/bench_pyscf_threads.py [--repeat 3]

Writes ``benchmarks/results/bench_pyscf_threads.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time

from _common import machine_info, median, print_table, run_json_worker, write_json

MOLECULES = ("H2O", "CH3OH")  # 24 and 48 def2-SVP basis functions (ethanol, 81: ~9 s per calculation)
#: setting -> (PySCF threads, None: mlmd_lab's default; OMP_WAIT_POLICY, None: unset)
SETTINGS = {
    "1 thread": (1, None),
    "2 threads, spinning": (2, None),
    "2 threads, passive": (2, "PASSIVE"),
    "default": (None, None),
}


def worker(molecule_name: str, repeat: int, threads: int) -> dict:
    """Time ``repeat`` calculations of rattled copies of one molecule (after a warm-up); JSON on stdout."""
    import numpy as np
    from ase.build import molecule

    import mlmd_lab  # noqa: F401  (its import-time configuration is part of "default")
    from mlmd_lab.dft import PySCF

    recipe = PySCF(threads=threads) if threads else PySCF()
    atoms = molecule(molecule_name)
    rng = np.random.default_rng(0)
    recipe.compute(atoms.copy(), ("energy", "forces"))
    walls, cpus = [], []
    for _ in range(repeat):
        copy = atoms.copy()
        copy.positions += rng.normal(scale=0.03, size=copy.positions.shape)
        w0, c0 = time.perf_counter(), time.process_time()
        recipe.compute(copy, ("energy", "forces"))
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    from pyscf import lib

    configured = recipe.threads_for(atoms)  # None: PySCF's default, read from PySCF (OpenMP only)
    return {"molecule": molecule_name, "wall_s": median(walls), "cpu_s": median(cpus),
            "threads": configured if configured is not None else lib.num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}


def _busy() -> None:
    """Keep one core busy with pure Python until the process is terminated."""
    x = 0
    while True:
        x = (x + 1) % 1_000_003


def run(repeat: int) -> dict:
    rows, results = [], []
    for state in ("idle", "one core busy"):
        for name in MOLECULES:
            base = None
            for setting, (threads, policy) in SETTINGS.items():
                busy = None
                if state != "idle":
                    busy = multiprocessing.Process(target=_busy, daemon=True)
                    busy.start()
                try:
                    cmd = [sys.executable, __file__, "--worker", name, "--repeat", str(repeat),
                           "--threads", str(threads or 0)]
                    out = run_json_worker(cmd, f"{state} {name} {setting}", env={"OMP_WAIT_POLICY": policy})
                finally:
                    if busy is not None:
                        busy.terminate()
                        busy.join()
                if out is None:
                    continue
                base = out["wall_s"] if setting == "1 thread" else base
                out.update(state=state, setting=setting, ratio_to_1_thread=out["wall_s"] / base if base else None)
                results.append(out)
                rows.append([f"{state}: {name}", setting, out["threads"], out["wall_s"], out["cpu_s"],
                             out["ratio_to_1_thread"]])
    print_table(["machine: molecule", "setting", "threads", "wall s/calc", "CPU s/calc", "wall / 1 thread"], rows,
                title="PySCF RKS PBE/def2-SVP energy+forces per calculation (median), 2 shared cores")
    return {"machine": machine_info(), "repeat": repeat, "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="worker: PySCF threads (0: the recipe's default)")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.repeat, args.threads)))
        return
    print("wrote", write_json("bench_pyscf_threads", run(args.repeat)))


if __name__ == "__main__":
    main()
