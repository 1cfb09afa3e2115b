"""Automatic potential construction (mlmd_lab.learn) against the non-expert baseline, on a reference whose
exact answer is cheap: ASE's EMT for fcc copper (8 atoms, 300 and 600 K).

- learn: ``mlmd_lab.learn.run`` from one structure, until it stops by itself (converged, or the iteration /
  budget limit), its reference calls counted;
- baseline: the same number of reference calls spent on random rattles (0.02-0.25 Å, small cell strains) and
  ±6 % volume strains of the starting structure, a committee trained on them with the same settings.

Both are tested on an independent set: ASE Langevin MD with EMT at 400 and 550 K (inside the explored range),
frames every 20 steps after 100 steps, made separately. The target is a force RMSE <= 5 % of the RMS force.

    python benchmarks/bench_learn.py [--iterations 12] [--committee 4] [--per-iteration 12] [--seed 0]

Writes ``benchmarks/results/bench_learn.json`` (``bench_learn_seedN.json`` with ``--seed N``).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from _common import machine_info, print_table, shutdown, write_json
from ase import units
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

from mlmd_lab.learn.loop import EXPLORE

TEMPERATURES = (300.0, 600.0)  # K, explored
TEST_TEMPERATURES = (400.0, 550.0)  # K, the independent test set


def copper():
    return bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 1, 1))


def reference_md(temperature: float, n_frames: int, seed: int) -> list:
    """ASE Langevin MD on EMT: a frame every 20 steps (2 fs) after 100 steps."""
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    atoms = copper()
    atoms.calc = EMT()
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=np.random.default_rng(seed))
    dyn = Langevin(atoms, 2.0 * units.fs, temperature_K=temperature, friction=0.02, fixcm=False,
                   rng=np.random.default_rng(seed))
    dyn.run(100)
    frames = []
    for _ in range(n_frames):
        dyn.run(20)
        frame = atoms.copy()
        frame.calc = SinglePointCalculator(frame, energy=atoms.get_potential_energy(), forces=atoms.get_forces())
        frames.append(frame)
    return frames


def force_rmse(model, frames) -> float:
    predicted = model.predict(frames, stress=False, warn=False)
    diff = np.concatenate([(p["forces"] - f.get_forces()).ravel() for p, f in zip(predicted, frames, strict=True)])
    return float(np.sqrt(np.mean(diff**2)))


def baseline(n_calls: int, committee: int, config, seed: int = 7):
    """A committee trained on ``n_calls`` EMT labels of random rattles and volume strains."""
    from mlmd_lab.dft.generators import rattle, strain_scan
    from mlmd_lab.train.trainer import train_ensemble

    rng = np.random.default_rng(seed)
    structures = strain_scan(copper(), (-0.06, -0.03, 0.03, 0.06))
    while len(structures) < n_calls:
        structures += rattle(copper(), 1, amplitude=float(rng.uniform(0.02, 0.25)), seed=int(rng.integers(2**31)),
                             cell_amplitude=0.01)
    frames = []
    for atoms in structures[:n_calls]:
        atoms.calc = EMT()
        frame = atoms.copy()
        frame.calc = SinglePointCalculator(frame, energy=atoms.get_potential_energy(), forces=atoms.get_forces(),
                                           stress=atoms.get_stress())
        frames.append(frame)
    return train_ensemble(frames, committee, config, progress=False, calibration_fraction=0.15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--committee", type=int, default=4)
    parser.add_argument("--per-iteration", type=int, default=12)
    parser.add_argument("--md-steps", type=int, default=EXPLORE["steps"])
    parser.add_argument("--budget", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0, help="learn.run's seed (seed set, training, MD)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    from mlmd_lab import learn
    from mlmd_lab.db import connect
    from mlmd_lab.train.trainer import TrainingConfig

    tmp = Path(tempfile.mkdtemp(prefix="bench-learn-"))
    db = connect(data_dir=tmp / "db")
    try:
        train = dict(hidden=(15, 15), max_epochs=1000, cutoff=4.5)
        t0 = time.perf_counter()
        result = learn.run(EMT(), copper(), temperatures=list(TEMPERATURES), db=db, workdir=tmp / "learn",
                           committee=args.committee, max_iterations=args.iterations, per_iteration=args.per_iteration,
                           reference_budget=args.budget, md_steps=args.md_steps, seed=args.seed, timestep=2.0,
                           train_config=train, progress=True)
        learn_s = time.perf_counter() - t0
        print(result.summary(), flush=True)
        test = [f for k, t in enumerate(TEST_TEMPERATURES) for f in reference_md(t, 25, seed=100 + k)]
        rms = float(np.sqrt(np.mean(np.concatenate([f.get_forces().ravel() for f in test]) ** 2)))
        from mlmd_lab.learn.loop import QUICK_TRAINING

        config = TrainingConfig(**{**QUICK_TRAINING, **train})
        t0 = time.perf_counter()
        base = baseline(result.n_reference_calls, args.committee, config)
        base_s = time.perf_counter() - t0
        rows = [("learn (automatic loop)", result.n_reference_calls, force_rmse(result.model, test), learn_s),
                ("seed model (iteration 1)", result.iterations[0].reference_calls, force_rmse(result.model_of(1), test),
                 None),
                ("random rattles/strains", result.n_reference_calls, force_rmse(base, test), base_s)]
        table = print_table(["potential", "reference calls", "force RMSE eV/Å", "% of RMS force", "wall s"],
                            [(n, c, e, 100 * e / rms, s) for n, c, e, s in rows],
                            title=f"EMT Cu8, test: Langevin at {TEST_TEMPERATURES} K, {len(test)} frames, "
                                  f"RMS force {rms:.3f} eV/Å")
        out = {"machine": machine_info(), "args": vars(args), "rms_force": rms, "n_test_frames": len(test),
               "stop_reason": result.stop_reason, "converged": result.converged,
               "iterations": len(result.iterations), "n_reference_calls": result.n_reference_calls,
               "rows": [dict(potential=n, reference_calls=c, force_rmse=e, percent_of_rms_force=100 * e / rms,
                             wall_s=s) for n, c, e, s in rows],
               "target_met": rows[0][2] <= 0.05 * rms, "better_than_baseline": rows[0][2] < rows[2][2],
               "history": result.history(), "table": table}
        print(f"wrote {write_json('bench_learn' if args.seed == 0 else f'bench_learn_seed{args.seed}', out)}")
    finally:
        shutdown(db)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
