"""MD throughput and memory with n2p2's H2O potential (1,080-atom water and its 8x and 64x supercells), the
reference codes measured in the same run, and NVE energy drift.

Throughput: NVE at 300 K, 0.5 fs, with ``mlmd_lab.md.run`` exactly as users call it (neighbour lists with a
skin, rebuilt when atoms move too far: on the host on the CPU, on the device on a GPU; every step checked). Each
configuration runs in its own process (thread settings must be set before JAX starts): CPU with 1 thread and 2
threads (the same number of steps), float64 and float32 (the mixed mode: float32 descriptors and networks, float64
sums of energies and forces), and the GPU when JAX sees one. µs per atom-step is the steady state: the timed run
less its compilation, less a run of 0 steps (the start: first neighbour build and force call), median of 3
(the LAMMPS row's method); the JSON also has the whole-run figure. Reported per configuration: atom-steps/s, µs
per atom-step, µs per atom-step per core (wall time x cores), the ratio to n2p2, neighbour rebuilds, compile
time, peak memory (RSS of the whole process) and peak memory per atom. A second table times one neighbour
rebuild on each route. Thread scaling, 1,080 atoms: 2 threads (two JAX CPU devices sharing each force call) over
1 thread, beside the machine's ceiling, two independent 1-thread runs at once, one per core
(:func:`run_process_pair`, ``--no-pair`` skips it), and the CPU time per atom-step of every thread.

References, measured in the same run on the same core:

- n2p2: ``../shared/tools/n2p2/nnp-predict`` (n2p2 2.3.0's own predictor) on the 1,080-atom structure, its whole
  process (reading, set-up, neighbour list, energy and forces), CPU time per atom, median of 5. The ratio column
  is ours (per core, one MD step with its neighbour updates) over n2p2's. Targets: float64 on one thread <= 0.9,
  float32 <= 0.45.
- LAMMPS: the same water system, NVE 300 K, 0.5 fs, in LAMMPS's ``pair_style hdnnp`` (n2p2's library) on one
  core, from a folder written by ``mlmd_lab.md.write_lammps``: the LAMMPS of ``$MLMD_TEST_LAMMPS`` or
  ../shared/tools/lammps/lmp; a run of 0 steps is subtracted (reading, set-up), median of 3.

Drift (``--drift``): NVE of a 192-atom water box (DeePMD water frame, n2p2 H2O potential), 0.5 fs, 2 ps,
float64 and float32: linear-fit total-energy drift in meV/atom/ps (target <= 0.1).

    python benchmarks/bench_md.py [--steps 60] [--big-steps 6] [--huge-steps 2] [--skin 0.5]
                                  [--skin-scan 0.25 0.5 1.0] [--drift] [--only-drift] [--no-huge]
    python benchmarks/bench_md.py --large float64 100   # 103,680 atoms, 100 steps (bench_md_large.json)
    python benchmarks/bench_md.py --committee            # committee MD: weights as constants or arguments,
                                                         # first and retrained committee (bench_md_committee.json)
    python benchmarks/bench_md.py --one-device           # one JAX CPU device on 2 cores: XLA's thread pool of 2
                                                         # threads against 1 (bench_md_one_device.json)

Writes ``benchmarks/results/bench_md.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time
from pathlib import Path

from _common import RESULTS_DIR as RESULTS
from _common import gpu_available, machine_info, n2p2_predict_cost, print_table, run_json_worker, write_json

ROOT = Path(__file__).resolve().parents[1]
WATER = ROOT / ".." / "shared" / "external" / "n2p2" / "H2O_RPBE-D3"
DEEPMD = ROOT / ".." / "shared" / "external" / "deepmd-water" / "data_0"
LAMMPS = Path(os.environ.get("MLMD_TEST_LAMMPS") or ROOT / ".." / "shared" / "tools" / "lammps" / "lmp")


def _setup(platform: str, threads: int) -> None:
    """JAX's platform and this process's cores (``threads`` of them; ``MLMD_BENCH_CORE``: that one core, for
    :func:`run_process_pair`), set before JAX starts."""
    if platform == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
        if threads == 1:
            os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        cores = sorted(os.sched_getaffinity(0))
        core = os.environ.get("MLMD_BENCH_CORE")
        os.sched_setaffinity(0, {cores[int(core)]} if core is not None else set(cores[:threads]))


#: Timed runs per small-system configuration (the median is reported).
REPEATS = 3


def throughput_worker(platform: str, threads: int, dtype: str, repeat: int, steps: int, skin: float,
                      route: str = "auto") -> dict:
    """NVE throughput of the water box repeated ``repeat`` times per axis. Steady state per step: the run of
    ``steps`` steps less its compilation (``MDResult.compile_s``), less a run of 0 steps likewise (the start: first
    neighbour build and force call), over ``steps`` (the LAMMPS row's method); the whole-run figure keeps the
    start."""
    _setup(platform, threads)
    import statistics

    import jax

    from mlmd_lab.io.n2p2 import read_input_data
    from mlmd_lab.md import run
    from mlmd_lab.potentials import HDNNP

    model = HDNNP.from_n2p2(WATER, energy_unit="Ha", length_unit="Bohr", dtype=dtype)
    atoms = read_input_data(WATER / "input.data", "Ha", "Bohr")[0].repeat(repeat)
    block = max(2, min(50, steps // 2))
    kw = dict(temperature=300, timestep=0.5, skin=skin, block=block, log_interval=block, trajectory_interval=0,
              restart_interval=0, neighbours=route)
    # warm-up run compiles (same shapes as the timed run); the timed run reuses the compiled function
    run(model, atoms, "nve", steps=block, **kw)
    n = len(atoms)
    # The machine is shared and noisy: small systems are timed REPEATS times and the median is reported.
    timings, starts, start_cpu = [], [], []
    for _ in range(REPEATS if n <= 10_000 else 1):
        gc.collect()  # the previous run's neighbour data go before the next run builds its own
        t0, c0 = time.perf_counter(), time.process_time()
        result = run(model, atoms, "nve", steps=steps, **kw)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        timings.append((wall - result.compile_s, wall, result, cpu))
        if n <= 10_000:
            t0, c0 = time.perf_counter(), time.process_time()
            empty = run(model, atoms, "nve", steps=0, **kw)
            starts.append(time.perf_counter() - t0 - empty.compile_s)  # compile_s: the force call's loading
            start_cpu.append(time.process_time() - c0)
    timings.sort(key=lambda t: t[0])
    whole, wall, result, cpu = timings[len(timings) // 2]
    start = statistics.median(starts) if starts else 0.0
    timed = whole - start
    # CPU time of every thread of this process (compilation left in: none here, the warm-up run compiled).
    cpu_timed = cpu - (statistics.median(start_cpu) if start_cpu else 0.0)
    return {
        "platform": platform, "device": str(jax.devices()[0]), "threads": threads if platform == "cpu" else None,
        "dtype": dtype, "atoms": n, "steps": steps, "skin_A": skin, "wall_s": wall, "compile_s": result.compile_s,
        "start_s": start, "rebuilds": result.rebuilds, "device_rebuilds": result.device_rebuilds,
        "atom_steps_per_s": steps * n / timed, "us_per_atom_step": timed / (steps * n) * 1e6,
        "us_per_atom_step_whole_run": whole / (steps * n) * 1e6, "repeats": len(timings),
        "cpu_us_per_atom_step": cpu_timed / (steps * n) * 1e6, "core": os.environ.get("MLMD_BENCH_CORE"),
        "us_per_atom_step_all": [t[0] / (steps * n) * 1e6 for t in timings],
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "peak_kb_per_atom": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1.024 / n,
        "cpu_devices": jax.local_device_count("cpu") if platform == "cpu" else None, "compute": result.compute,
        "route": route,
    }


def rebuild_worker(platform: str, threads: int, repeat: int) -> dict:
    """One neighbour-list rebuild of the water box, skin 0.5 Å, on both routes (median of 7): the host build
    (vesin pairs, numba triplets, placed for JAX) and the device build (JAX, compiled; its compilation apart)."""
    _setup(platform, threads)
    import statistics

    import jax
    import jax.numpy as jnp

    from mlmd_lab.io.n2p2 import read_input_data
    from mlmd_lab.md import forcefield
    from mlmd_lab.potentials import HDNNP

    model = HDNNP.from_n2p2(WATER, energy_unit="Ha", length_unit="Bohr")
    atoms = read_input_data(WATER / "input.data", "Ha", "Bohr")[0].repeat(repeat)
    ff = forcefield(model, skin=0.5)
    species = ff.species(atoms)
    R, h = atoms.positions, atoms.cell.array
    host = []
    for _ in range(7):
        t0 = time.perf_counter()
        arrays, layout = ff.build(R, h, atoms.pbc, species)
        jax.block_until_ready(ff.to_device(arrays, layout))
        host.append(time.perf_counter() - t0)
    build = ff.device_lists(layout, species, atoms.pbc, R, h)
    lists = jax.jit(build)
    t0 = time.perf_counter()
    jax.block_until_ready(lists(jnp.asarray(R), jnp.asarray(h)))
    compile_s = time.perf_counter() - t0
    device = []
    for _ in range(7):
        t0 = time.perf_counter()
        jax.block_until_ready(lists(jnp.asarray(R), jnp.asarray(h)))
        device.append(time.perf_counter() - t0)
    return {"platform": platform, "threads": threads, "atoms": len(atoms), "host_ms": statistics.median(host) * 1e3,
            "device_ms": statistics.median(device) * 1e3, "device_compile_s": compile_s,
            "device": str(jax.devices()[0]), "sizes": repr(build.sizes)}


def large_worker(dtype: str, steps: int) -> dict:
    """``steps`` NVE steps of a 103,680-atom water box (the 1,080-atom structure repeated 4 x 4 x 6) in one run,
    2 threads, compilation included: does it fit and run here, and at what memory per atom."""
    _setup("cpu", 2)
    from mlmd_lab.io.n2p2 import read_input_data
    from mlmd_lab.md import run
    from mlmd_lab.potentials import HDNNP

    model = HDNNP.from_n2p2(WATER, energy_unit="Ha", length_unit="Bohr", dtype=dtype)
    atoms = read_input_data(WATER / "input.data", "Ha", "Bohr")[0].repeat((4, 4, 6))
    t0 = time.perf_counter()
    result = run(model, atoms, "nve", temperature=300, timestep=0.5, steps=steps, block=min(steps, 25),
                 log_interval=min(steps, 25), trajectory_interval=0, restart_interval=0)
    th = result.thermo
    n = len(atoms)
    return {"dtype": dtype, "atoms": n, "steps": result.steps, "wall_s": time.perf_counter() - t0,
            "compile_s": result.compile_s, "rebuilds": result.rebuilds,
            "us_per_atom_step": (result.wall_s - result.compile_s) / (result.steps * n) * 1e6,
            "etot_change_meV_atom": float(th["etot_eV"][-1] - th["etot_eV"][0]) / n * 1e3,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "peak_kb_per_atom": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1.024 / n,
            "compute": result.compute}


def lammps_row(steps: int, repeats: int = 3) -> dict | None:
    """LAMMPS (pair_style hdnnp, serial, one core) on the 1080-atom water: atom-steps/s of ``steps`` NVE steps
    after subtracting a 0-step run (median of ``repeats``); None when no such LAMMPS is here."""
    import statistics
    import subprocess
    import tempfile
    import warnings

    if not LAMMPS.exists():
        print(f"LAMMPS: not measured (no LAMMPS with pair_style hdnnp at {LAMMPS})")
        return None
    from mlmd_lab.io.n2p2 import read_input_data
    from mlmd_lab.md import write_lammps
    from mlmd_lab.potentials import HDNNP

    model = HDNNP.from_n2p2(WATER, energy_unit="Ha", length_unit="Bohr")
    atoms = read_input_data(WATER / "input.data", "Ha", "Bohr")[0]
    core = {sorted(os.sched_getaffinity(0))[0]}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    times: dict[int, list[float]] = {0: [], steps: []}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for n in times:
            folder = write_lammps(model, Path(tmp) / f"run{n}", atoms, steps=n, ensemble="nve", timestep_fs=0.5,
                                  temperature_K=300.0, thermo_every=max(1, n), dump_every=0)
            for _ in range(repeats):
                t0 = time.perf_counter()
                subprocess.run([str(LAMMPS), "-in", "in.lammps", "-log", "none", "-screen", "none"], cwd=folder,
                               env=env, check=True, preexec_fn=lambda: os.sched_setaffinity(0, core))
                times[n].append(time.perf_counter() - t0)
    timed = statistics.median(times[steps]) - statistics.median(times[0])
    n_atoms = len(atoms)
    return {"platform": "lammps", "device": f"LAMMPS pair_style hdnnp ({LAMMPS.name}, serial)", "threads": 1,
            "dtype": "float64", "atoms": n_atoms, "steps": steps, "skin_A": 2.0, "wall_s": sum(times[steps]),
            "compile_s": statistics.median(times[0]), "rebuilds": None,
            "atom_steps_per_s": steps * n_atoms / timed, "us_per_atom_step": timed / (steps * n_atoms) * 1e6,
            "peak_rss_gib": None}


def drift_worker(steps: int, dtype: str = "float64") -> dict:
    _setup("cpu", 2)
    from mlmd_lab.analysis import energy_drift
    from mlmd_lab.io.deepmd import read_deepmd
    from mlmd_lab.md import run
    from mlmd_lab.potentials import HDNNP

    model = HDNNP.from_n2p2(WATER, energy_unit="Ha", length_unit="Bohr", dtype=dtype)
    atoms = read_deepmd(DEEPMD)[0]
    t0 = time.perf_counter()
    result = run(model, atoms, "nve", temperature=300, timestep=0.5, steps=steps, log_interval=10,
                 trajectory_interval=0, restart_interval=0)
    th = result.thermo
    drift = energy_drift(th["time_fs"], th["etot_eV"], len(atoms))
    return {
        "dtype": dtype, "atoms": len(atoms), "steps": steps, "timestep_fs": 0.5, "time_ps": steps * 0.5e-3,
        "drift_meV_atom_ps": drift.slope_mev_atom_ps, "drift_err_meV_atom_ps": drift.slope_err_mev_atom_ps,
        "rms_meV_atom": drift.rms_mev_atom, "max_deviation_meV_atom": drift.max_deviation_mev_atom,
        "mean_temperature_K": float(th["temperature_K"].mean()), "wall_s": time.perf_counter() - t0,
        "rebuilds": result.rebuilds, "atom_steps_per_s": result.atom_steps_per_s,
    }


def committee_worker(mode: str, steps: int) -> dict:
    """MD with a committee of 3 water potentials (the n2p2 H2O potential with each member's weights perturbed by
    1 %), then with a retrained committee of the same kind (other perturbations), in a fresh process with an empty
    compilation cache of its own. ``mode``: "arguments" (mlmd_lab: the weights are an argument of the compiled
    programs, :meth:`~mlmd_lab.md.forcefield.ForceField.parameters`), "constants" (the weights baked into the
    programs as constants, as before: the force call ignores the weights passed in and reads its own) or
    "stacked" (the members mapped over their stacked weights with ``jax.vmap``, tried and measured no faster:
    symmetry functions once, one graph). Per committee: the first run's wall time and compile time (s) and the
    steady state per atom-step (a run of ``steps`` less its compilation, less a run of 0 steps)."""
    import tempfile

    os.environ["MLMD_JAX_CACHE"] = tempfile.mkdtemp(prefix="bench-md-committee-")
    _setup("cpu", 2)
    import importlib

    import numpy as np

    # the module (mlmd_lab.md's attribute "forcefield" is the function of that name)
    forcefield_module = importlib.import_module("mlmd_lab.md.forcefield")
    from mlmd_lab.io.deepmd import read_deepmd
    from mlmd_lab.md import run
    from mlmd_lab.potentials import HDNNP
    from mlmd_lab.train.ensemble import Ensemble

    if mode == "constants":
        compute = forcefield_module.ForceField.compute
        forcefield_module.ForceField.compute = lambda self, a, lay, R, h, params=None: compute(self, a, lay, R, h)
    elif mode == "stacked":
        forcefield_module.ForceField._member_outputs = _stacked_member_outputs
    atoms = read_deepmd(DEEPMD)[0]
    n = len(atoms)
    kw = dict(temperature=300, timestep=0.5, log_interval=10, trajectory_interval=0, restart_interval=0)

    def member(seed: int) -> HDNNP:
        model = HDNNP.from_n2p2(WATER, energy_unit="Ha", length_unit="Bohr")
        rng = np.random.default_rng(seed)
        model.networks = {e: [(W * (1 + 0.01 * rng.standard_normal(np.shape(W))), b) for W, b in layers]
                          for e, layers in model.networks.items()}
        model._cache.clear()
        return model

    rows = []
    for label, seeds in (("first committee", (1, 2, 3)), ("retrained committee", (4, 5, 6))):
        committee = Ensemble([member(s) for s in seeds])
        t0 = time.perf_counter()
        first = run(committee, atoms, "nve", steps=steps, **kw)
        wall = time.perf_counter() - t0
        t0 = time.perf_counter()
        empty = run(committee, atoms, "nve", steps=0, **kw)
        start = time.perf_counter() - t0 - empty.compile_s
        t0 = time.perf_counter()
        again = run(committee, atoms, "nve", steps=steps, **kw)
        steady = (time.perf_counter() - t0 - again.compile_s - start) / (steps * n) * 1e6
        th = first.thermo
        rows.append({"committee": label, "first_run_s": wall, "compile_s": first.compile_s,
                     "us_per_atom_step": steady, "max_force_std_eV_A": float(np.max(th["max_force_std_eV_A"])),
                     "etot_eV": [float(th["etot_eV"][0]), float(th["etot_eV"][-1])]})
    return {"mode": mode, "atoms": n, "members": 3, "steps": steps, "rows": rows,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def _stacked_member_outputs(self, members, arrays, layout, positions, cell):
    """ForceField._member_outputs with the members mapped over their stacked weights (``jax.vmap``; members of one
    kind only): the variant ``committee_worker`` measures as "stacked"."""
    import jax
    import jax.numpy as jnp

    from mlmd_lab.potentials.model import evaluate

    fn = self.members[0][0]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *members)
    data = self._with_positions(fn, arrays, layout, positions, cell)
    out = jax.vmap(lambda params: evaluate(fn, self.far, params, data, layout, True))(stacked)
    return {key: out[key] for key in ("energy", "forces", "virial", "extrapolation")}


def run_committee(steps: int) -> None:
    """``--committee``: the three modes of :func:`committee_worker`, each in its own process, one table."""
    results = [run_json_worker([sys.executable, __file__, "--committee-worker", mode, str(steps)], mode)
               for mode in ("constants", "arguments", "stacked")]
    rows = [[r["mode"], row["committee"], row["first_run_s"], row["compile_s"], row["us_per_atom_step"]]
            for r in results if r for row in r["rows"]]
    print_table(["weights", "run", "first run s", "compile s", "µs/atom-step (steady)"], rows,
                title=f"MD with a committee of 3 (192-atom water, n2p2 H2O potential, float64, {steps} NVE steps, "
                      "2 threads, empty compilation cache per process)")
    print(f"wrote {write_json('bench_md_committee', {'machine': machine_info(), 'results': results})}")


def run_process_pair(dtype: str, steps: int, skin: float) -> list[dict]:
    """The ceiling of thread scaling on this machine: two independent one-thread MD runs of the 1,080-atom water
    at once, one pinned to each core (``MLMD_BENCH_CORE``), as two processes. Their time per atom-step beside one
    run alone says how much two busy cores slow each other down here (shared caches, memory, the host); what is
    left of the gap between that and the two-thread (two JAX CPU devices in one process) row is the in-process
    cost of splitting one force call."""
    import subprocess

    if len(os.sched_getaffinity(0)) < 2:
        print(f"process pair {dtype}: not measured (this process may use one core only)")
        return []
    cmd = [sys.executable, __file__, "--worker", "cpu", "1", dtype, "1", str(steps), str(skin), "auto"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "MLMD_BENCH_CORE": str(core)}) for core in (0, 1)]
    out = []
    for core, proc in enumerate(procs):
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            print(f"[process pair {dtype}, core {core}] failed:\n{stderr[-3000:]}", file=sys.stderr)
            continue
        out.append(dict(json.loads(stdout.strip().splitlines()[-1]), pair=True))
    return out


def run_one_device(steps: int, skin: float) -> None:
    """One JAX CPU device (MLMD_CPU_DEVICES=1, as in each test worker) on 2 cores, 1,080 atoms, float64: XLA's
    thread pool at its default size (the cores: PJRT_NPROC=2) against one thread (what mlmd_lab.jaxconfig sets
    for one device). Alternating pairs, median of each worker's repeats."""
    results = []
    for pair in range(2):
        for pool in ("2", "1"):
            cmd = [sys.executable, __file__, "--worker", "cpu", "2", "float64", "1", str(steps), str(skin), "auto"]
            r = run_json_worker(cmd, f"one device, pool {pool}", env={"MLMD_CPU_DEVICES": "1", "PJRT_NPROC": pool})
            if r is not None:
                results.append(dict(r, xla_pool_threads=int(pool), pair=pair))
    print_table(["XLA pool threads", "pair", "atoms", "steps", "µs/atom-step", "repeats µs/atom-step", "compile s"],
                [[r["xla_pool_threads"], r["pair"], r["atoms"], r["steps"], r["us_per_atom_step"],
                  " ".join(f"{x:.0f}" for x in r["us_per_atom_step_all"]), r["compile_s"]] for r in results],
                title="One JAX CPU device on 2 cores, 1,080-atom water, float64, NVE 0.5 fs (pool 2: XLA's default; "
                      "pool 1: mlmd_lab's for one device)")
    by_pool = {p: sorted(r["us_per_atom_step"] for r in results if r["xla_pool_threads"] == p) for p in (1, 2)}
    if by_pool[1] and by_pool[2]:
        ratio = by_pool[2][len(by_pool[2]) // 2] / by_pool[1][len(by_pool[1]) // 2]
        print(f"pool of 2 threads over pool of 1 (time per atom-step, medians): {ratio:.2f}x")
    print(f"wrote {write_json('bench_md_one_device', {'machine': machine_info(), 'runs': results})}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="timed steps for 1080 atoms")
    parser.add_argument("--big-steps", type=int, default=6, help="timed steps for 8640 atoms")
    parser.add_argument("--huge-steps", type=int, default=2, help="timed steps for 69120 atoms")
    parser.add_argument("--no-huge", action="store_true", help="skip the 69120-atom rows")
    parser.add_argument("--skin", type=float, default=0.5, help="Å (mlmd_lab.md.run's default)")
    parser.add_argument("--skin-scan", type=float, nargs="*", metavar="SKIN",
                        help="also time 1080 atoms, 2 threads, float64 and float32, at these skins (Å)")
    parser.add_argument("--drift", action="store_true", help="also the 2 ps NVE drift runs")
    parser.add_argument("--only-drift", action="store_true")
    parser.add_argument("--drift-steps", type=int, default=4000)
    parser.add_argument("--worker", nargs=7,
                        metavar=("PLATFORM", "THREADS", "DTYPE", "REPEAT", "STEPS", "SKIN", "ROUTE"))
    parser.add_argument("--rebuild-worker", nargs=3, metavar=("PLATFORM", "THREADS", "REPEAT"))
    parser.add_argument("--drift-worker", nargs=2, metavar=("STEPS", "DTYPE"))
    parser.add_argument("--large", nargs=2, metavar=("DTYPE", "STEPS"),
                        help="only the 103,680-atom run (e.g. float64 100); writes bench_md_large.json")
    parser.add_argument("--large-worker", nargs=2, metavar=("DTYPE", "STEPS"))
    parser.add_argument("--committee", action="store_true",
                        help="only the committee case: weights as constants, as arguments, stacked; first and "
                             "retrained committee (bench_md_committee.json)")
    parser.add_argument("--committee-steps", type=int, default=40)
    parser.add_argument("--committee-worker", nargs=2, metavar=("MODE", "STEPS"))
    parser.add_argument("--no-pair", action="store_true",
                        help="skip the two independent 1-thread processes at once (run_process_pair)")
    parser.add_argument("--one-device", action="store_true",
                        help="only one JAX CPU device on 2 cores, XLA's thread pool of 2 threads (PJRT_NPROC=2, "
                             "XLA's default) against 1 (mlmd_lab's); bench_md_one_device.json")
    args = parser.parse_args()
    if args.one_device:
        run_one_device(args.steps, args.skin)
        return
    if args.committee_worker:
        print(json.dumps(committee_worker(args.committee_worker[0], int(args.committee_worker[1]))))
        return
    if args.committee:
        run_committee(args.committee_steps)
        return
    if args.large_worker:
        print(json.dumps(large_worker(args.large_worker[0], int(args.large_worker[1]))))
        return
    if args.large:
        r = run_json_worker([sys.executable, __file__, "--large-worker", *args.large], "large")
        if r:
            print_table(["dtype", "atoms", "steps", "wall s", "compile s", "µs/atom-step", "rebuilds",
                         "ΔE_tot meV/atom", "peak GiB", "peak KB/atom"],
                        [[r["dtype"], r["atoms"], r["steps"], r["wall_s"], r["compile_s"], r["us_per_atom_step"],
                          r["rebuilds"], r["etot_change_meV_atom"], r["peak_rss_gib"], r["peak_kb_per_atom"]]],
                        title=f"Large water box, NVE 300 K, 0.5 fs, 2 threads ({r['compute']})")
            print(f"wrote {write_json('bench_md_large', {'machine': machine_info(), 'large': r})}")
        return
    if args.worker:
        p, t, d, r, s, k, route = args.worker
        print(json.dumps(throughput_worker(p, int(t), d, int(r), int(s), float(k), route)))
        return
    if args.rebuild_worker:
        p, t, r = args.rebuild_worker
        print(json.dumps(rebuild_worker(p, int(t), int(r))))
        return
    if args.drift_worker:
        print(json.dumps(drift_worker(int(args.drift_worker[0]), args.drift_worker[1])))
        return
    if not WATER.exists():
        sys.exit(f"n2p2 water potential not found at {WATER} (../shared/external is needed)")
    gpu = gpu_available()
    results, drift, n2p2 = [], [], None
    if not args.only_drift:
        n2p2 = n2p2_predict_cost(WATER)
        reference = n2p2["cpu_us_per_atom"] if n2p2 else None
        # 1 and 2 threads time the same number of steps (the thread-scaling ratio compares like with like).
        configs = [("cpu", 1, "float64", 1, args.steps, "auto"), ("cpu", 1, "float32", 1, args.steps, "auto"),
                   ("cpu", 2, "float64", 1, args.steps, "auto"), ("cpu", 2, "float32", 1, args.steps, "auto"),
                   ("cpu", 2, "float64", 2, args.big_steps, "auto"), ("cpu", 2, "float32", 2, args.big_steps, "auto")]
        if not args.no_huge:
            configs += [("cpu", 2, "float64", 4, args.huge_steps, "auto")]
        if gpu:  # "auto" is the device route on a GPU; one host-route row beside it
            configs += [("gpu", 0, d, r, s, "auto") for d in ("float64", "float32")
                        for r, s in ((1, 500), (2, 200), (4, 50))]
            configs += [("gpu", 0, "float32", 2, 200, "host")]
        for platform, threads, dtype, repeat, steps, route in configs:
            cmd = [sys.executable, __file__, "--worker", platform, str(threads), dtype, str(repeat), str(steps),
                   str(args.skin), route]
            r = run_json_worker(cmd, f"{platform}/{threads}/{dtype}/x{repeat ** 3}/{route}")
            if r is not None:
                results.append(r)
        pairs = [] if args.no_pair else [r for d in ("float64", "float32")
                                         for r in run_process_pair(d, args.steps, args.skin)]
        rebuilds = []
        places = [("cpu", 2, 1), ("cpu", 2, 2)] + ([("gpu", 0, 1), ("gpu", 0, 2)] if gpu else [])
        for platform, threads, repeat in places:
            r = run_json_worker([sys.executable, __file__, "--rebuild-worker", platform, str(threads), str(repeat)],
                                f"rebuild {platform} x{repeat ** 3}")
            if r is not None:
                rebuilds.append(r)
        lammps = lammps_row(args.steps)
        if lammps is not None:
            results.append(lammps)
        rows = []
        if n2p2:
            rows.append(["n2p2 nnp-predict (whole process)", n2p2["atoms"], 0, 1e6 / n2p2["cpu_us_per_atom"],
                         n2p2["cpu_us_per_atom"], n2p2["cpu_us_per_atom"], 1.0, None, None, None, None])
        for r in results:
            cores = r["threads"] or 1
            per_core = r["us_per_atom_step"] * cores if r["platform"] in ("cpu", "lammps") else None
            r["ratio_to_n2p2_per_core"] = None if per_core is None or reference is None else per_core / reference
            on_device = r.get("route") == "device" or "rebuilt on the device" in r.get("compute", "")
            route = " device lists" if on_device else ""
            rows.append([f"{r['platform']} {r['threads'] or ''}{'t ' if r['threads'] else ''}{r['dtype']}{route}",
                         r["atoms"], r["steps"], r["atom_steps_per_s"], r["us_per_atom_step"], per_core,
                         r["ratio_to_n2p2_per_core"], r["rebuilds"], r["compile_s"], r["peak_rss_gib"],
                         r.get("peak_kb_per_atom")])
        print_table(["config", "atoms", "steps", "atom-steps/s", "µs/atom-step", "µs/atom-step·core",
                     "ours/n2p2 per core", "rebuilds", "compile s", "peak GiB", "peak KB/atom"], rows,
                    title=f"MD, n2p2 H2O_RPBE-D3 water, NVE 300 K, 0.5 fs, skin {args.skin} Å; n2p2 measured in this "
                          "run (targets: 1t float64 <= 0.9, 1t float32 <= 0.45; 69120 atoms <= 50 KB/atom)")
        if rebuilds:
            print_table(["platform", "atoms", "host build ms", "device build ms", "device compile s"],
                        [[f"{r['platform']} {r['threads'] or ''}", r["atoms"], r["host_ms"], r["device_ms"],
                          r["device_compile_s"]] for r in rebuilds],
                        title="One neighbour-list rebuild (pairs + triplets, skin 0.5 Å): host (vesin + numba, placed "
                              "for JAX) vs device (JAX); the MD default is the device route on a GPU only")
        one = {r["dtype"]: r["us_per_atom_step"] for r in results
               if r["platform"] == "cpu" and r["threads"] == 1 and r.get("route") == "auto"}
        two = {r["dtype"]: r["us_per_atom_step"] for r in results
               if r["platform"] == "cpu" and r["threads"] == 2 and r["atoms"] == 1080 and r.get("route") == "auto"}
        scaling = {d: one[d] / two[d] for d in one if d in two}
        for d, x in scaling.items():
            print(f"2 threads over 1 thread, 1080 atoms, {d}: {x:.2f}x (target >= 1.7)")
        if pairs:
            print_table(["dtype", "core", "µs/atom-step", "CPU µs/atom-step", "alone µs/atom-step",
                         "slowdown beside the other"],
                        [[r["dtype"], r["core"], r["us_per_atom_step"], r["cpu_us_per_atom_step"], one.get(r["dtype"]),
                          r["us_per_atom_step"] / one[r["dtype"]] if r["dtype"] in one else None] for r in pairs],
                        title="Two independent 1-thread MD runs at once (two processes, one per core): the "
                              "machine's ceiling for 2 cores")
            for d in sorted({r["dtype"] for r in pairs}):
                both = [r["us_per_atom_step"] for r in pairs if r["dtype"] == d]
                if d in one and len(both) == 2:
                    ceiling = one[d] * sum(1.0 / x for x in both)  # both runs' throughput over one alone
                    scaling[f"{d}_two_processes"] = ceiling
                    print(f"two 1-thread processes at once over one alone (throughput), {d}: {ceiling:.2f}x; "
                          f"2 threads in one process: {scaling.get(d, float('nan')):.2f}x")
        cpu_rows = [r for r in results if r["platform"] == "cpu" and r["atoms"] == 1080 and "cpu_us_per_atom_step" in r]
        if cpu_rows:
            one_cpu = {r["dtype"]: r["cpu_us_per_atom_step"] for r in cpu_rows if r["threads"] == 1}
            print_table(["config", "µs/atom-step", "CPU µs/atom-step (all threads)", "CPU over 1t's"],
                        [[f"{r['threads']}t {r['dtype']}", r["us_per_atom_step"], r["cpu_us_per_atom_step"],
                          r["cpu_us_per_atom_step"] / one_cpu.get(r["dtype"], float("nan"))] for r in cpu_rows],
                        title="CPU time per atom-step, 1,080 atoms (the work two JAX CPU devices add to split one "
                              "force call)")
        results += pairs
        scan = []
        for skin in args.skin_scan or []:
            for dtype in ("float64", "float32"):
                cmd = [sys.executable, __file__, "--worker", "cpu", "2", dtype, "1", str(args.steps), str(skin), "auto"]
                r = run_json_worker(cmd, f"skin {skin} {dtype}")
                if r is not None:
                    scan.append(r)
        if scan:
            print_table(["skin Å", "dtype", "atom-steps/s", "µs/atom-step", "µs/atom-step·core", "rebuilds"],
                        [[r["skin_A"], r["dtype"], r["atom_steps_per_s"], r["us_per_atom_step"],
                          2 * r["us_per_atom_step"], r["rebuilds"]] for r in scan],
                        title="Skin scan: 1080 atoms, CPU 2 threads")
            results += scan
        if not gpu:
            print("GPU: not measured (JAX sees no GPU on this machine)")
    else:
        scaling, rebuilds = {}, None
    if args.drift or args.only_drift:
        for dtype in ("float64", "float32"):
            r = run_json_worker([sys.executable, __file__, "--drift-worker", str(args.drift_steps), dtype],
                                f"drift {dtype}")
            if r:
                drift.append(r)
        if drift:
            print_table(["run", "atoms", "time ps", "drift meV/atom/ps", "± (1σ)", "RMS meV/atom", "mean T K",
                         "wall s"],
                        [[f"NVE {r['dtype']} 0.5 fs", r["atoms"], r["time_ps"], r["drift_meV_atom_ps"],
                          r["drift_err_meV_atom_ps"], r["rms_meV_atom"], r["mean_temperature_K"], r["wall_s"]]
                         for r in drift], title="NVE energy drift (target <= 0.1 meV/atom/ps)")
    data = {"machine": machine_info(), "n2p2": n2p2, "gpu_available": gpu, "throughput": results,
            "thread_scaling": scaling, "drift": drift, "rebuilds": rebuilds}
    previous = RESULTS / "bench_md.json"
    if args.only_drift and previous.exists():  # keep the throughput rows of the last full run beside the new drift
        old = json.loads(previous.read_text())
        data.update({k: old.get(k) for k in ("n2p2", "throughput", "thread_scaling")})
        data["throughput_machine"] = old.get("throughput_machine", old.get("machine"))
    path = write_json("bench_md", data)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
