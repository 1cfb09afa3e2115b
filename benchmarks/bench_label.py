"""Labelling throughput: Quantum ESPRESSO on rattled Si8 through label(), with 1 and 2 workers.

Configurations (each on fresh structures, so nothing is skipped):

- ``direct``: ``recipe.calculate`` in a loop in this process (no dask, no database): the reference cost;
- ``label, in process``: label() without a cluster (adds the ledger and the ingest);
- ``local dask``, 1 and 2 worker processes;
- ``Slurm``, 1 and 2 batch jobs of one core (real single-node Slurm, scripts/start_slurm.sh; skipped without it).

Reported: calculations per minute (wall time of the whole label() call, job start included), the median time
inside the worker per calculation, and the per-task overhead of scheduler + dask = wall x workers / n - median
task time (what each calculation costs beyond pw.x itself). Si8: diamond cubic cell, 20 Ry, 2x2x2 k-points,
PBE (Si.pbe-rrkj.UPF), one MPI-less pw.x per task.

    python benchmarks/bench_label.py [--n 8]

Writes ``benchmarks/results/bench_label.json``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from _common import machine_info, print_table, shutdown, write_json

ROOT = Path(__file__).resolve().parents[1]


def structures(n: int, seed: int):
    from ase.build import bulk

    from mlmd_lab.dft import rattle

    return rattle(bulk("Si", "diamond", a=5.43, cubic=True), n, amplitude=0.05, seed=seed)


def recipe():
    from mlmd_lab.dft import QuantumEspresso

    return QuantumEspresso(ecutwfc_ry=20, kpts=(2, 2, 2))


def direct(n: int, seed: int, work: Path) -> dict:
    times = []
    for k, atoms in enumerate(structures(n, seed)):
        t0 = time.perf_counter()
        recipe().calculate(atoms, work / f"direct-{k}")
        times.append(time.perf_counter() - t0)
    return {"config": "direct (no dask, no database)", "workers": 1, "n": n, "wall_s": sum(times),
            "task_median_s": statistics.median(times)}


def labelled(name: str, n: int, seed: int, work: Path, db, cluster_factory=None, workers: int = 1) -> dict:
    from mlmd_lab.dft.label import label

    t0 = time.perf_counter()
    if cluster_factory is None:
        report = label(structures(n, seed), recipe(), db=db, workdir=work / name, progress=False)
    else:
        with cluster_factory() as cluster:
            report = label(structures(n, seed), recipe(), cluster=cluster, db=db, workdir=work / name, jobs=workers,
                           progress=False)
    wall = time.perf_counter() - t0
    if report.failed or report.labelled != n:
        raise RuntimeError(f"{name}: {report}")
    return {"config": name, "workers": workers, "n": n, "wall_s": wall,
            "task_median_s": statistics.median(report.task_s)}


def slurm_available() -> bool:
    if shutil.which("sbatch") is None or os.geteuid() != 0:
        return False
    return subprocess.run(["bash", str(ROOT / "scripts" / "start_slurm.sh")], capture_output=True).returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8, help="calculations per configuration")
    args = parser.parse_args()
    if shutil.which("pw.x") is None:
        raise SystemExit("pw.x not found: install quantum-espresso (scripts/apt-packages.txt)")
    import mlmd_lab
    from mlmd_lab.cluster import cluster

    db = mlmd_lab.connect(database=f"bench_label_{uuid.uuid4().hex[:8]}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        try:
            results.append(direct(args.n, 1, work))
            results.append(labelled("label, in process", args.n, 2, work, db))
            for w in (1, 2):
                results.append(labelled(f"local dask, {w} worker(s)", args.n, 2 + w, work, db,
                                        lambda w=w: cluster("local", n_workers=w), w))
            if slurm_available():
                options = dict(cores=1, memory="1GB", queue="debug", interface="lo", walltime="00:30:00",
                               log_directory=str(work / "logs"), scheduler_options={"dashboard_address": ":0"})
                for w in (1, 2):
                    results.append(labelled(f"Slurm, {w} job(s)", args.n, 10 + w, work, db,
                                            lambda: cluster("slurm", **options), w))
            else:
                print("Slurm: not measured (needs root and scripts/start_slurm.sh)")
        finally:
            db.drop()
            shutdown(db)
    base = results[0]["task_median_s"]
    rows = []
    for r in results:
        r["calcs_per_min"] = 60.0 * r["n"] / r["wall_s"]
        r["overhead_per_task_s"] = r["wall_s"] * r["workers"] / r["n"] - r["task_median_s"]
        rows.append([r["config"], r["n"], r["wall_s"], r["calcs_per_min"], r["task_median_s"],
                     r["overhead_per_task_s"], r["calcs_per_min"] / (60.0 / base)])
    print_table(["config", "calcs", "wall s", "calcs/min", "task median s", "overhead/task s", "vs 1 direct"],
                rows, title="Labelling Si8 with Quantum ESPRESSO (20 Ry, 2x2x2 k), 2 shared CPU cores")
    path = write_json("bench_label", {"machine": machine_info(), "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
