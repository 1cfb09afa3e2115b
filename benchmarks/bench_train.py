"""Training on real DFT water (DeePMD's 320 frames of 192-atom liquid water) with the defaults, against n2p2.

Per configuration (own process, so thread settings and memory peaks are separate):

- features: symmetry functions and their derivatives for every frame, s (part of every time below);
- time per epoch (median), s;
- time to reach 100 and 50 meV/Å force RMSE on the validation split (held out from the gradient steps),
  counted from the start (reading excluded, features included), s;
- final RMSEs of the exported float64 model on the held-out test split (10 %, never seen in training);
- peak resident memory of the process, GiB.

Then a 4-member ensemble (shorter runs) reports the Spearman rank correlation between the committee's
per-atom force spread and the actual per-atom force error on the test split.

Reference (../shared/external/README.md, n2p2 2.3.0 on this machine, 2 MPI ranks, Kalman filter, its water
symmetry functions, force normalisation): 98 meV/Å after its first epoch (39 s), 50 meV/Å at 152 s, and
36.5 meV/Å and 0.33 meV/atom after 30 epochs (9.8 min).

    python benchmarks/bench_train.py [--no-ensemble] [--gpu]

Writes ``benchmarks/results/bench_train.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

from _common import gpu_available, machine_info, median, print_table, run_json_worker, write_json

ROOT = Path(__file__).resolve().parents[1]
WATER = ROOT / ".." / "shared" / "external" / "deepmd-water"
N2P2 = {"first_epoch_s": 39.0, "first_epoch_force_mev": 98.0, "time_to_50_s": 152.0, "final_force_mev": 36.5,
        "final_energy_mev": 0.33, "final_time_s": 9.8 * 60}


def read_water():
    from mlmd_lab.io import read

    frames = []
    for k in range(3):
        frames += read(WATER / f"data_{k}").frames
    return frames


def worker(platform: str, ensemble: int) -> dict:
    os.environ["JAX_PLATFORMS"] = platform
    import warnings

    from mlmd_lab.train.callbacks import Callback
    from mlmd_lab.train.trainer import Trainer, train_ensemble

    frames = read_water()
    marks = {}

    class Clock(Callback):
        def on_train_begin(self, info):
            marks.setdefault("setup", time.perf_counter() - t0)

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if ensemble:
            return ensemble_worker(frames, ensemble, train_ensemble)
        trainer = Trainer(frames, callbacks=[Clock()], progress=False)
        trainer.fit()
    total = time.perf_counter() - t0
    epochs = trainer.history
    per_epoch = [b.elapsed - a.elapsed for a, b in zip(epochs[:-1], epochs[1:], strict=True)]

    def time_to(threshold):
        for m in epochs:
            if m.validation["force_rmse"] <= threshold:
                return marks["setup"] + m.elapsed
        return None

    test = trainer.errors["test"]
    return {"platform": platform, "features_and_setup_s": marks["setup"], "epochs": len(epochs),
            "epoch_s": median(per_epoch), "first_epoch_force_mev": epochs[0].validation["force_rmse"] * 1e3,
            "first_epoch_done_s": marks["setup"] + epochs[0].elapsed, "time_to_100_s": time_to(0.100),
            "time_to_50_s": time_to(0.050), "total_s": total, "test_force_mev": test["force_rmse"] * 1e3,
            "test_energy_mev": test["energy_rmse"] * 1e3, "test_frames": test["n_frames"],
            "peak_memory_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "curve": [(m.epoch, round(marks["setup"] + m.elapsed, 2), round(m.validation["force_rmse"] * 1e3, 2))
                      for m in epochs]}


def ensemble_worker(frames, n, train_ensemble) -> dict:
    import numpy as np

    from mlmd_lab.frames import results_of

    t0 = time.perf_counter()
    ensemble = train_ensemble(frames, n, max_epochs=100, progress=False)
    seconds = time.perf_counter() - t0
    test_ids = set(ensemble.metadata["frame_ids"]["test"])
    from mlmd_lab.frameset import FrameSet

    test = [a for a, fid in zip(frames, FrameSet(frames).ids, strict=True) if fid in test_ids]
    spread, error = [], []
    for atoms, pred in zip(test, ensemble.predict(test, stress=False, warn=False), strict=True):
        spread.append(pred["forces_std"])
        error.append(np.linalg.norm(pred["forces"] - results_of(atoms)["forces"], axis=1))
    spread, error = np.concatenate(spread), np.concatenate(error)
    frame_spread = [s.mean() for s in np.split(spread, len(test))]
    frame_error = [e.mean() for e in np.split(error, len(test))]
    return {"members": n, "seconds": seconds, "test_atoms": int(spread.size),
            "spearman_atoms": spearman(spread, error), "spearman_frames": spearman(frame_spread, frame_error),
            "mean_spread_mev": float(spread.mean() * 1e3), "mean_error_mev": float(error.mean() * 1e3),
            "test": ensemble.metadata["errors"]["test"],
            "peak_memory_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def spearman(a, b) -> float:
    import numpy as np

    ra = np.argsort(np.argsort(a))
    rb = np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def run_worker(platform: str, ensemble: int = 0) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", platform, "--ensemble-members", str(ensemble)]
    return run_json_worker(cmd, f"{platform}, ensemble {ensemble}" if ensemble else platform)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker")
    parser.add_argument("--ensemble-members", type=int, default=0)
    parser.add_argument("--no-ensemble", action="store_true")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.ensemble_members)))
        return
    if not WATER.exists():
        sys.exit(f"benchmark data not found at {WATER} (../shared/external is only in this workplace)")
    results = [r for r in [run_worker("cpu"), run_worker("cuda") if gpu_available() else None] if r]
    rows = [("n2p2 (reference, 2 ranks)", "-", f"{N2P2['first_epoch_s']:.0f}", N2P2["first_epoch_force_mev"], "-",
             N2P2["time_to_50_s"], N2P2["final_force_mev"], N2P2["final_energy_mev"], N2P2["final_time_s"], "-")]
    for r in results:
        rows.append((f"mlmd_lab {r['platform']} (defaults)", f"{r['epoch_s']:.2f}", f"{r['first_epoch_done_s']:.0f}",
                     round(r["first_epoch_force_mev"], 1), r["time_to_100_s"] and round(r["time_to_100_s"]),
                     r["time_to_50_s"] and round(r["time_to_50_s"]), round(r["test_force_mev"], 1),
                     round(r["test_energy_mev"], 3), round(r["total_s"]), round(r["peak_memory_gib"], 2)))
    print_table(["run", "s/epoch", "epoch 1 done (s)", "epoch 1 F (meV/Å)", "to 100 (s)", "to 50 (s)",
                 "final F (meV/Å)", "final E (meV/atom)", "total (s)", "peak GiB"], rows,
                title="Training on DeePMD water (320 x 192 atoms), 2 CPU cores")
    ens = None if args.no_ensemble else run_worker("cpu", 4)
    if ens:
        print_table(["members", "train s", "test atoms", "Spearman (atoms)", "Spearman (frames)",
                     "mean spread (meV/Å)", "mean |error| (meV/Å)"],
                    [(ens["members"], round(ens["seconds"]), ens["test_atoms"], round(ens["spearman_atoms"], 3),
                      round(ens["spearman_frames"], 3), round(ens["mean_spread_mev"], 1),
                      round(ens["mean_error_mev"], 1))],
                    title="Ensemble force spread vs actual force error (held-out test frames)")
    path = write_json("bench_train", {"machine": machine_info(), "reference_n2p2": N2P2, "runs": results,
                                      "ensemble": ens})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
