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

    python benchmarks/bench_train.py [--no-ensemble | --ensemble-only] [--gpu]
    python benchmarks/bench_train.py --case optimizers --time-limit 600   # Adam against the Kalman filter
    python benchmarks/bench_train.py --case averaging [--stop-epoch 45]   # weight averaging, 4 runs, ~6 min

Writes ``benchmarks/results/bench_train.json`` (``bench_train_ensemble.json`` with ``--ensemble-only``). The committee
part reports its calibration table: per bin of predicted (calibrated) force uncertainty, mean predicted against
mean actual |force error| on the test frames; the goal is calibrated/actual within 30 % overall.

Case ``elemental`` (``--case elemental [--time-limit 300]``, ~12 min on 2 busy cores): the budget of the
defaults on a ~200-frame elemental set, like the public Ni/Cu/Si/Mo DFT benchmark sets (~200 VASP frames each;
not available here). The set is made with ASE's EMT calculator for Cu (real many-body physics, deterministic):
Langevin MD snapshots of bulk at 300-1200 K, strained bulk cells, a (111) surface slab and a vacancy cell,
8-32 atoms each, with energies, forces and stresses. The old defaults (300 epochs, patience 40, raw validation
loss picks the kept epoch) and the new ones (epochs planned from the time limit, smoothed selection) train with
the same time limit, split and seed; the table gives their held-out test RMSEs side by side, with the time
budget. Writes ``benchmarks/results/bench_train_elemental.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

from _common import RESULTS_DIR, gpu_available, machine_info, median, print_table, run_json_worker, timed, write_json

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


def worker(platform: str, ensemble: int, overrides: dict | None = None) -> dict:
    os.environ["JAX_PLATFORMS"] = platform
    import warnings

    from mlmd_lab.train.callbacks import Callback
    from mlmd_lab.train.trainer import Trainer, train_ensemble

    frames = read_water()
    marks = {}
    overrides = dict(overrides or {})
    stop_epoch = overrides.pop("stop_epoch", None)  # case averaging: the default schedule, cut short

    class Clock(Callback):
        def on_train_begin(self, info):
            marks.setdefault("setup", time.perf_counter() - t0)

        def on_epoch_end(self, metrics):
            return stop_epoch is not None and metrics.epoch >= stop_epoch

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if ensemble:
            return ensemble_worker(frames, ensemble, train_ensemble)
        trainer = Trainer(frames, callbacks=[Clock()], progress=False, **overrides)
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
    return {"platform": platform, "overrides": overrides, "stop_epoch": stop_epoch,
            "force_fraction": trainer._state["force_fraction"],
            "features_s": trainer.budget.features_s, "features_and_setup_s": marks["setup"], "epochs": len(epochs),
            "epoch_s": median(per_epoch), "first_epoch_force_mev": epochs[0].validation["force_rmse"] * 1e3,
            "first_epoch_done_s": marks["setup"] + epochs[0].elapsed, "time_to_100_s": time_to(0.100),
            "time_to_50_s": time_to(0.050), "total_s": total, "test_force_mev": test["force_rmse"] * 1e3,
            "test_energy_mev": test["energy_rmse"] * 1e3, "test_frames": test["n_frames"],
            "peak_memory_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "epoch_to_50": next((m.epoch for m in epochs if m.validation["force_rmse"] <= 0.050), None),
            "curve": [(m.epoch, round(marks["setup"] + m.elapsed, 2), round(m.validation["force_rmse"] * 1e3, 2),
                       round(m.validation["energy_rmse"] * 1e3, 3)) for m in epochs]}


def ensemble_worker(frames, n, train_ensemble) -> dict:
    """A committee of ``n`` (its own calibration split held out of every member), then on the held-out test frames:
    rank correlation of spread and error, and the calibration table (predicted vs actual per bin of predicted
    uncertainty, raw and calibrated)."""
    from mlmd_lab.frameset import FrameSet
    from mlmd_lab.train.ensemble import force_errors, tabulate_force_errors

    t0 = time.perf_counter()
    ensemble = train_ensemble(frames, n, max_epochs=100, progress=False)
    seconds = time.perf_counter() - t0
    test_ids = set(ensemble.metadata["frame_ids"]["test"])
    test = [a for a, fid in zip(frames, FrameSet(frames).ids, strict=True) if fid in test_ids]
    data = force_errors(ensemble, test)
    table = tabulate_force_errors(data, bins=5)
    frames_of = [data.frame == k for k in range(len(test))]
    return {"members": n, "seconds": seconds, "test_frames": len(test), "test_atoms": len(data),
            "calibration_frames": ensemble.calibration["n_frames"],
            "force_scale": dict(zip(ensemble.elements, map(float, ensemble.force_scale_array()), strict=True)),
            "spearman_atoms": spearman(data.predicted, data.actual),
            "spearman_frames": spearman([data.predicted[m].mean() for m in frames_of],
                                        [data.actual[m].mean() for m in frames_of]),
            "mean_spread_mev": float(table.predicted * 1e3), "mean_raw_spread_mev": float(table.raw * 1e3),
            "mean_error_mev": float(table.actual * 1e3), "calibrated_ratio": table.ratio, "raw_ratio": table.raw_ratio,
            "within_30_percent": bool(abs(table.ratio - 1.0) <= 0.3), "calibration_table": table.to_dict(),
            "test": ensemble.metadata["errors"]["test"], "max_abs_bin_deviation": float(max(
                abs(r["predicted"] / r["actual"] - 1.0) for r in table.rows if r["actual"] > 0)),
            "peak_memory_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def print_ensemble(ens: dict) -> None:
    """The committee's two tables: overall figures, and the calibration table per bin."""
    print_table(["members", "train s", "test atoms", "Spearman (atoms)", "Spearman (frames)", "raw spread (meV/Å)",
                 "calibrated (meV/Å)", "actual |error| (meV/Å)", "calibrated/actual", "within 30 %"],
                [(ens["members"], round(ens["seconds"]), ens["test_atoms"], round(ens["spearman_atoms"], 3),
                  round(ens["spearman_frames"], 3), round(ens["mean_raw_spread_mev"], 1),
                  round(ens["mean_spread_mev"], 1), round(ens["mean_error_mev"], 1), round(ens["calibrated_ratio"], 3),
                  "yes" if ens["within_30_percent"] else "NO")],
                title=f"Committee force uncertainty on {ens['test_frames']} held-out test frames (calibrated on "
                      f"{ens['calibration_frames']} frames no member saw; scale {ens['force_scale']})")
    rows = [(f"{r['lo'] * 1e3:.0f}-{r['hi'] * 1e3:.0f}", r["count"], round(r["raw"] * 1e3, 1),
             round(r["predicted"] * 1e3, 1), round(r["actual"] * 1e3, 1),
             round(r["predicted"] / r["actual"], 2) if r["actual"] > 0 else "-")
            for r in ens["calibration_table"]["rows"]]
    print_table(["predicted bin (meV/Å)", "atoms", "raw spread", "calibrated", "actual |error|", "calibrated/actual"],
                rows, title="Calibration table (test frames, bins of equal atom counts, meV/Å)")


def spearman(a, b) -> float:
    import numpy as np

    ra = np.argsort(np.argsort(a))
    rb = np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


# ---------------------------------------------------------------------- case "elemental"
#: The settings compared: the former defaults, and today's (nothing given but the time limit).
ELEMENTAL_SETTINGS = {"old defaults (300 epochs, patience 40, raw selection)":
                      {"max_epochs": 300, "patience": 40, "validation_smoothing": 1},
                      "new defaults (planned budget, smoothed selection)": {}}


def elemental_frames(seed: int = 0) -> list:
    """~200 labelled Cu frames from EMT (eV, Å): MD snapshots, strained cells, a slab and a vacancy cell.

    100 Langevin snapshots of 32-atom bulk (25 each at 300, 600, 900, 1200 K; 2 fs steps, 10 steps apart after
    100 steps of equilibration), 40 rattled cells of 8 and 16 atoms under random strain (+-4 % normal, +-2 %
    shear), 30 snapshots of a 16-atom (111) slab with 6 Å vacuum each side at 600 K and 30 of a 31-atom vacancy
    cell at 900 K. Deterministic for a seed.
    """
    import numpy as np
    from ase import units
    from ase.build import bulk, fcc111
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    rng = np.random.default_rng(seed)
    frames = []

    def label(atoms, source: str) -> None:
        atoms = atoms.copy()
        atoms.calc = EMT()
        results = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces(), "stress": atoms.get_stress()}
        atoms.calc = SinglePointCalculator(atoms, **results)
        atoms.info["source"] = source
        frames.append(atoms)

    def md(atoms, temperature: float, n: int, source: str) -> None:
        atoms.calc = EMT()
        MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
        dyn = Langevin(atoms, 2 * units.fs, temperature_K=temperature, friction=0.02, fixcm=False, rng=rng)
        dyn.run(100)
        for _ in range(n):
            dyn.run(10)
            label(atoms, source)

    for temperature in (300, 600, 900, 1200):
        md(bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2), temperature, 25, f"bulk {temperature} K")
    for k in range(40):
        atoms = bulk("Cu", "fcc", a=3.61).repeat(2) if k % 2 else bulk("Cu", "fcc", a=3.61, cubic=True).repeat(
            (2, 2, 1))
        strain = np.diag(1 + rng.uniform(-0.04, 0.04, 3))
        shear = rng.uniform(-0.02, 0.02, 3)
        strain[0, 1] = strain[1, 0] = shear[0]
        strain[0, 2] = strain[2, 0] = shear[1]
        strain[1, 2] = strain[2, 1] = shear[2]
        atoms.set_cell(atoms.cell.array @ strain, scale_atoms=True)
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        label(atoms, "strained bulk")
    slab = fcc111("Cu", (2, 2, 4), a=3.61, vacuum=6.0, periodic=True)
    md(slab, 600, 30, "slab (111) 600 K")
    vacancy = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
    del vacancy[0]
    md(vacancy, 900, 30, "vacancy 900 K")
    return frames


def elemental_worker(setting: str, time_limit: float, path: str) -> dict:
    """Train one setting of :data:`ELEMENTAL_SETTINGS` on the frames in ``path``; test RMSEs and the budget."""
    import warnings

    from ase import units
    from ase.io import read

    from mlmd_lab.train.trainer import Trainer

    frames = read(path, ":")
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(frames, time_limit=time_limit, progress=False, **ELEMENTAL_SETTINGS[setting])
        trainer.fit()
    total = time.perf_counter() - t0
    test, b = trainer.errors["test"], trainer.budget
    return {"setting": setting, "overrides": ELEMENTAL_SETTINGS[setting], "time_limit_s": time_limit,
            "wall_s": total, "epochs_run": b.epochs_run, "epochs_planned": b.epochs, "patience": b.patience,
            "best_epoch": b.best_epoch, "stop": b.stop, "budget": b.to_dict(), "summary": trainer.summary(),
            "test_frames": test["n_frames"], "test_energy_mev": test["energy_rmse"] * 1e3,
            "test_force_mev": test["force_rmse"] * 1e3, "test_stress_gpa": test["stress_rmse"] / units.GPa,
            "validation_frames": len(trainer.split.validation), "train_frames": len(trainer.split.train)}


def run_elemental(time_limit: float) -> None:
    """Case ``elemental``: old against new defaults on the EMT Cu set, same time limit, side by side."""
    import tempfile

    from ase.io import read, write

    cache = RESULTS_DIR / "cu_emt_elemental.extxyz"  # deterministic: made once (EMT MD takes minutes here)
    if cache.exists():
        frames = read(cache, ":")
        print(f"EMT Cu set: {len(frames)} frames read from {cache}", flush=True)
    else:
        seconds, frames = timed(elemental_frames)
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        write(cache, frames)
        print(f"EMT Cu set: {len(frames)} frames made in {seconds:.0f} s (kept in {cache})", flush=True)
    sizes = sorted({len(a) for a in frames})
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "cu_emt.extxyz")
        write(path, frames)
        runs = []
        for setting in ELEMENTAL_SETTINGS:
            cmd = [sys.executable, __file__, "--elemental-worker", setting, "--time-limit", str(time_limit),
                   "--frames", path]
            result = run_json_worker(cmd, setting)
            if result:
                runs.append(result)
                print(result["summary"], flush=True)
    rows = [(r["setting"], r["epochs_run"], r["epochs_planned"], r["best_epoch"], r["stop"],
             round(r["test_energy_mev"], 3), round(r["test_force_mev"], 1), round(r["test_stress_gpa"], 3),
             round(r["budget"]["features_s"]), round(r["budget"]["training_s"]), round(r["budget"]["final_s"]),
             round(r["wall_s"])) for r in runs]
    if len(runs) == 2:
        old, new = runs
        rows.append(("new / old", "-", "-", "-", "-", round(new["test_energy_mev"] / old["test_energy_mev"], 2),
                     round(new["test_force_mev"] / old["test_force_mev"], 2),
                     round(new["test_stress_gpa"] / old["test_stress_gpa"], 2), "-", "-", "-", "-"))
    test_frames = runs[0]["test_frames"] if runs else "?"
    print_table(["defaults", "epochs", "planned", "best epoch", "stop", "test E (meV/atom)", "test F (meV/Å)",
                 "test S (GPa)", "features s", "training s", "final s", "wall s"], rows,
                title=f"Training budget on {len(frames)} EMT Cu frames (held-out test set: {test_frames} frames), "
                      f"time limit {time_limit:.0f} s, 2 CPU cores")
    path = write_json("bench_train_elemental", {"machine": machine_info(), "frames": len(frames), "sizes": sizes,
                                                "time_limit_s": time_limit, "runs": runs})
    print(f"wrote {path}")


N2P2_WATER = ROOT / ".." / "shared" / "external" / "n2p2" / "H2O_RPBE-D3"


def scale_frames(n: int, rattle: float = 0.05, seed: int = 0):
    """``n`` synthetic water frames of 192 atoms: the DeePMD frames in turn, rattled (Gaussian, ``rattle`` Å per
    component), labelled (energy, forces) by n2p2's H2O potential through mlmd_lab itself, in batches of 32.
    Cached in ``benchmarks/results/water_scale_<n>.npz`` (deterministic for n and seed)."""
    import numpy as np
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    cache = RESULTS_DIR / f"water_scale_{n}.npz"
    if not cache.exists():
        from mlmd_lab.potentials import HDNNP

        model = HDNNP.from_n2p2(N2P2_WATER, energy_unit="Ha", length_unit="Bohr")
        base = read_water()
        rng = np.random.default_rng(seed)
        positions, cells, numbers, energies, forces = [], [], [], [], []
        t0 = time.perf_counter()
        for start in range(0, n, 32):
            batch = []
            for k in range(start, min(n, start + 32)):
                atoms = base[k % len(base)].copy()
                atoms.positions += rng.normal(scale=rattle, size=atoms.positions.shape)
                batch.append(atoms)
            for atoms, result in zip(batch, model.predict(batch, stress=False, warn=False), strict=True):
                positions.append(atoms.positions)
                cells.append(atoms.cell.array)
                numbers.append(atoms.numbers)
                energies.append(result["energy"])
                forces.append(result["forces"])
            if start % 1024 == 0:
                print(f"labelled {start + len(batch)} of {n} frames, {time.perf_counter() - t0:.0f} s", flush=True)
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        np.savez(cache, positions=np.array(positions), cells=np.array(cells), numbers=np.array(numbers),
                 energies=np.array(energies), forces=np.array(forces), label_s=time.perf_counter() - t0)
    with np.load(cache) as archive:  # each archive[key] would read the whole array again
        data = {key: archive[key] for key in archive.files}
    frames = []
    for k in range(len(data["energies"])):
        atoms = Atoms(numbers=data["numbers"][k], positions=data["positions"][k], cell=data["cells"][k], pbc=True)
        atoms.calc = SinglePointCalculator(atoms, energy=float(data["energies"][k]), forces=data["forces"][k])
        frames.append(atoms)
    return frames, float(data["label_s"])


def fit_quietly(frames, **config):
    """(trainer, wall s, peak resident bytes of the process so far) of the defaults plus ``config`` on ``frames``,
    warnings silenced; the peak is read right after training, before any later measurement."""
    import warnings

    from mlmd_lab.train.trainer import Trainer

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(frames, progress=False, **config)
        trainer.fit()
    return trainer, time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def scale_worker(n: int, epochs: int) -> dict:
    """Defaults on ``n`` synthetic water frames for ``epochs`` epochs: what the trainer chose (force subset,
    storage), the feature stage's time, seconds per epoch and the peak memory of the process per atom."""
    frames, label_s = scale_frames(n)
    atoms = sum(len(a) for a in frames)
    trainer, wall, peak = fit_quietly(frames, max_epochs=epochs)
    epochs_done = trainer.history
    per_epoch = [b.elapsed - a.elapsed for a, b in zip(epochs_done[:-1], epochs_done[1:], strict=True)]
    b = trainer.budget
    test = trainer.errors["test"]
    return {"frames": n, "atoms": atoms, "label_s": label_s, "storage": trainer.storage, "features_s": b.features_s,
            "epochs": len(epochs_done), "epoch_s": median(per_epoch) if per_epoch else epochs_done[0].elapsed,
            "training_s": b.training_s, "final_s": b.final_s, "wall_s": wall, "peak_bytes": peak,
            "peak_kb_per_atom": peak / atoms / 1e3, "test_force_mev": test["force_rmse"] * 1e3,
            "test_energy_mev": test["energy_rmse"] * 1e3, "summary": trainer.summary()}


def run_scale(n: int, epochs: int) -> None:
    """Case ``scale``: the synthetic set (made once, labelled in this process, before the worker starts)."""
    _, label_s = scale_frames(n)
    cmd = [sys.executable, __file__, "--scale-worker", str(n), "--scale-epochs", str(epochs)]
    r = run_json_worker(cmd, f"scale {n}")
    if not r:
        return
    s = r["storage"]
    print_table(["frames", "atoms", "force fraction", "records", "features s", "s/epoch", "peak GiB",
                 "peak KB/atom", "target KB/atom"],
                [(r["frames"], r["atoms"], round(s["force_fraction"], 3),
                  f"{s['bytes'] / 2**30:.2f} GiB in {s['mode']}", round(r["features_s"]), round(r["epoch_s"], 1),
                  round(r["peak_bytes"] / 2**30, 2), round(r["peak_kb_per_atom"], 2), 8)],
                title=f"Training at scale: synthetic water labelled by n2p2's H2O potential ({label_s:.0f} s to "
                      f"label), defaults, {epochs} epochs, 2 CPU cores")
    print(r["summary"])
    print(f"wrote {write_json('bench_train_scale', {'machine': machine_info(), 'run': r})}")


N2P2_CU2S = ROOT / ".." / "shared" / "external" / "n2p2" / "Cu2S_PBE"
#: Case ``mixed``: frames of each kind (atoms per frame): bulk Cu2S (144), water boxes (192), water clusters of 8
#: molecules (24), single water molecules (3).
MIXED_KINDS = {"Cu2S bulk": 100, "water box": 100, "water cluster": 200, "water molecule": 400}


def _molecules(atoms):
    """Per water molecule of a periodic water frame, its O and two H indices and its positions unwrapped around O."""
    import numpy as np
    from ase.geometry import get_distances

    symbols = np.array(atoms.get_chemical_symbols())
    oxygens, hydrogens = np.flatnonzero(symbols == "O"), np.flatnonzero(symbols == "H")
    vectors, distances = get_distances(atoms.positions[oxygens], atoms.positions[hydrogens], atoms.cell, atoms.pbc)
    owner = np.argmin(distances, axis=0)  # each H to its nearest O
    molecules = []
    for k, o in enumerate(oxygens):
        hs = np.flatnonzero(owner == k)
        molecules.append((o, atoms.positions[o] + np.vstack([np.zeros(3), vectors[k, hs]])))
    return molecules


def mixed_frames(seed: int = 0):
    """The mixed set of :data:`MIXED_KINDS`, labelled (energy, forces) through mlmd_lab by n2p2's potentials: Cu2S
    by its Cu2S potential (rattled copies of its 20-structure set, 0.05 Å), water boxes, clusters and molecules
    by its H2O potential (DeePMD frames rattled by 0.05 Å; clusters: a molecule and its 7 nearest neighbours,
    unwrapped, in vacuum; molecules: one molecule in vacuum). Clusters and molecules are not periodic. Cached in
    ``benchmarks/results/mixed_set.extxyz`` (deterministic for the seed)."""
    import numpy as np
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.geometry import get_distances
    from ase.io import read, write

    cache = RESULTS_DIR / "mixed_set.extxyz"
    if cache.exists():
        return read(cache, ":")
    from mlmd_lab.io import read as read_any
    from mlmd_lab.potentials import HDNNP

    rng = np.random.default_rng(seed)
    water_model = HDNNP.from_n2p2(N2P2_WATER, energy_unit="Ha", length_unit="Bohr")
    cu2s_model = HDNNP.from_n2p2(N2P2_CU2S)
    cu2s = read_any(N2P2_CU2S / "input.data.set20", units=("eV", "Angstrom")).frames
    water = read_water()
    made = {kind: [] for kind in MIXED_KINDS}
    for k in range(MIXED_KINDS["Cu2S bulk"]):
        made["Cu2S bulk"].append(cu2s[k % len(cu2s)].copy())
    for k in range(MIXED_KINDS["water box"]):
        made["water box"].append(water[(7 * k) % len(water)].copy())
    for k in range(MIXED_KINDS["water cluster"]):
        frame = water[(3 * k + 1) % len(water)]
        molecules = _molecules(frame)
        centre = molecules[rng.integers(len(molecules))][1][0]
        oxygens = np.array([m[1][0] for m in molecules])
        vectors, distances = get_distances(centre[None], oxygens, frame.cell, frame.pbc)
        nearest = np.argsort(distances[0])[:8]
        positions = np.vstack([molecules[m][1] + (centre + vectors[0, m] - molecules[m][1][0]) for m in nearest])
        made["water cluster"].append(Atoms("OH2" * 8, positions=positions - positions.mean(0) + 10.0,
                                           cell=[20.0] * 3, pbc=False))
    for k in range(MIXED_KINDS["water molecule"]):
        molecules = _molecules(water[(5 * k + 2) % len(water)])
        positions = molecules[rng.integers(len(molecules))][1]
        made["water molecule"].append(Atoms("OH2", positions=positions - positions.mean(0) + 5.0, cell=[10.0] * 3,
                                            pbc=False))
    frames = []
    for kind, group in made.items():
        model = cu2s_model if kind == "Cu2S bulk" else water_model
        for atoms in group:
            atoms.calc = None
            atoms.info.clear()
            atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        for start in range(0, len(group), 32):
            batch = group[start:start + 32]
            for atoms, result in zip(batch, model.predict(batch, stress=False, warn=False), strict=True):
                atoms.calc = SinglePointCalculator(atoms, energy=result["energy"], forces=result["forces"])
                atoms.info["kind"] = kind
                frames.append(atoms)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    write(cache, frames)
    return frames


def mixed_worker(time_limit: float) -> dict:
    """Defaults on the mixed set with a time limit: the records per size bucket (bytes per atom), the bytes the same
    records would take padded to one layout (the largest frame's), peak memory, and test errors per kind."""
    import warnings

    import numpy as np

    from mlmd_lab.train.data import caps_of_counts
    from mlmd_lab.train.features import block_columns, plan_features
    from mlmd_lab.train.trainer import _record_bytes

    frames = mixed_frames()
    atoms = sum(len(a) for a in frames)
    trainer, wall, peak = fit_quietly(frames, time_limit=time_limit)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = trainer.model
        pool = [*trainer.split.train, *trainer.split.validation]
        _, counts = plan_features(model, pool)  # one layout for every frame: what padding to the largest costs
        widths = (tuple(model.plan.n_features), tuple(len(c) for c in block_columns(model)))
        dtype = np.float32 if trainer.config.dtype == "float32" else np.float64
        one_layout = _record_bytes(caps_of_counts(counts), widths, dtype) * len(pool)
        kinds = {}
        for kind in MIXED_KINDS:
            test = [a for a in trainer.split.test if a.info.get("kind") == kind]
            if test:
                errors = trainer.evaluate(test)
                kinds[kind] = {"test_frames": len(test), "force_mev": errors["force_rmse"] * 1e3,
                               "energy_mev": errors["energy_rmse"] * 1e3}
    test = trainer.errors["test"]
    return {"frames": len(frames), "atoms": atoms, "pool_atoms": sum(len(a) for a in pool), "storage": trainer.storage,
            "one_layout_bytes": one_layout, "peak_bytes": peak, "wall_s": wall, "features_s": trainer.budget.features_s,
            "epochs": trainer.budget.epochs_run, "test_force_mev": test["force_rmse"] * 1e3,
            "test_energy_mev": test["energy_rmse"] * 1e3, "kinds": kinds, "summary": trainer.summary()}


def run_mixed(time_limit: float) -> None:
    """Case ``mixed``: bulk Cu2S, water boxes, clusters and molecules in one set; memory per bucket against one
    padded layout, in one run."""
    t0 = time.perf_counter()
    frames = mixed_frames()
    print(f"mixed set: {len(frames)} frames ready in {time.perf_counter() - t0:.0f} s", flush=True)
    r = run_json_worker([sys.executable, __file__, "--mixed-worker", "--time-limit", str(time_limit)], "mixed")
    if not r:
        return
    s = r["storage"]
    rows = [(f"{b['atoms'][0]}-{b['atoms'][1]}", b["frames"], b["atoms_total"], round(b["bytes"] / 2**20, 1),
             round(b["bytes"] / b["atoms_total"] / 1e3, 1)) for b in s["buckets"]]
    rows.append(("all, size buckets (mlmd_lab)", s["frames"], r["pool_atoms"], round(s["bytes"] / 2**20, 1),
                 round(s["bytes"] / r["pool_atoms"] / 1e3, 1)))
    rows.append(("all, one layout padded to the largest", s["frames"], r["pool_atoms"],
                 round(r["one_layout_bytes"] / 2**20, 1), round(r["one_layout_bytes"] / r["pool_atoms"] / 1e3, 1)))
    print_table(["bucket (atoms per frame)", "frames", "atoms", "records MiB", "KB per atom"], rows,
                title=f"Mixed sizes: {len(frames)} frames ({', '.join(f'{n} {k}' for k, n in MIXED_KINDS.items())}), "
                      f"training and validation records, {s['mode']}, force fraction {s['force_fraction']:g}")
    print_table(["kind", "test frames", "test F (meV/Å)", "test E (meV/atom)"],
                [(k, v["test_frames"], round(v["force_mev"], 1), round(v["energy_mev"], 3))
                 for k, v in r["kinds"].items()]
                + [("all", "-", round(r["test_force_mev"], 1), round(r["test_energy_mev"], 3))],
                title=f"Test errors per kind after {r['epochs']} epochs (time limit {time_limit:.0f} s); peak memory "
                      f"{r['peak_bytes'] / 2**30:.2f} GiB, {r['peak_bytes'] / r['atoms'] / 1e3:.1f} KB per atom")
    print(r["summary"])
    print(f"wrote {write_json('bench_train_mixed', {'machine': machine_info(), 'time_limit_s': time_limit, 'run': r})}")


def run_optimizers(time_limit: float) -> None:
    """Case ``optimizers``: Adam (the default) against the extended Kalman filter (``optimizer="kalman"``, n2p2's
    standard filter, one frame per update) on the water set, each with the same time limit (features, training
    and final errors), in one run beside n2p2's own Kalman figures."""
    results = {name: run_worker("cpu", 0, dict(overrides, time_limit=time_limit))
               for name, overrides in (("adam", {}), ("kalman", {"optimizer": "kalman"}))}
    rows = [("n2p2 Kalman (reference, 2 ranks)", "-", N2P2["first_epoch_force_mev"], "-", N2P2["time_to_50_s"],
             N2P2["final_force_mev"], N2P2["final_energy_mev"], N2P2["final_time_s"])]
    for name, r in results.items():
        if r:
            rows.append((f"mlmd_lab {name}", f"{r['epoch_s']:.2f}", round(r["first_epoch_force_mev"], 1),
                         r["epochs"], r["time_to_50_s"] and round(r["time_to_50_s"]), round(r["test_force_mev"], 1),
                         round(r["test_energy_mev"], 3), round(r["total_s"])))
    print_table(["run", "s/epoch", "epoch 1 F (meV/Å)", "epochs", "to 50 (s)", "final F (meV/Å)",
                 "final E (meV/atom)", "total (s)"], rows,
                title=f"Optimisers on DeePMD water (320 x 192 atoms), time limit {time_limit:.0f} s, 2 CPU cores")
    path = write_json("bench_train_optimizers", {"machine": machine_info(), "reference_n2p2": N2P2,
                                                 "time_limit_s": time_limit, "runs": results})
    print(f"wrote {path}")


AVERAGING_DECAYS = (None, 0.99, 0.995, 0.998)


def run_averaging(stop_epoch: int) -> None:
    """Case ``averaging``: the weights themselves against exponential moving averages of them (``average_decay``
    per optimiser step) on the water set: the defaults' schedule, stopped after ``stop_epoch`` epochs, one run
    each in one invocation. Reports the epoch and time at which the validation force error first reaches
    50 meV/Å, the validation energy error's median and spread over the epochs from 10 on, and the test errors of
    the kept epoch."""
    import numpy as np

    results = {str(decay): run_worker("cpu", 0, {"average_decay": decay, "stop_epoch": stop_epoch})
               for decay in AVERAGING_DECAYS}
    rows = []
    for name, r in results.items():
        if r:
            late = np.array([c[3] for c in r["curve"] if c[0] >= 10])
            rows.append((name, r["epoch_to_50"], r["time_to_50_s"] and round(r["time_to_50_s"], 1),
                         round(float(np.median(late)), 3), round(float(late.max()), 3),
                         round(r["test_force_mev"], 1), round(r["test_energy_mev"], 3), f"{r['epoch_s']:.2f}"))
            r["validation_energy_mev_from_epoch_10"] = {"median": float(np.median(late)), "max": float(late.max())}
    print_table(["average_decay", "epoch to 50", "s to 50", "valid E median (meV/atom)", "valid E max",
                 "test F (meV/Å)", "test E (meV/atom)", "s/epoch"], rows,
                title=f"Weight averaging on DeePMD water (320 x 192 atoms), {stop_epoch} epochs of the default "
                      "schedule, 2 CPU cores")
    path = write_json("bench_train_averaging", {"machine": machine_info(), "stop_epoch": stop_epoch,
                                                "runs": results})
    print(f"wrote {path}")


def run_worker(platform: str, ensemble: int = 0, overrides: dict | None = None) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", platform, "--ensemble-members", str(ensemble),
           "--overrides", json.dumps(overrides or {})]
    return run_json_worker(cmd, f"{platform}, ensemble {ensemble}" if ensemble else platform)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker")
    parser.add_argument("--ensemble-members", type=int, default=0)
    parser.add_argument("--no-ensemble", action="store_true")
    parser.add_argument("--ensemble-only", action="store_true", help="only the committee and its calibration table")
    parser.add_argument("--case", default="water",
                        choices=("water", "elemental", "scale", "mixed", "optimizers", "averaging"))
    parser.add_argument("--scale-frames", type=int, default=10000, help="case scale: synthetic water frames")
    parser.add_argument("--scale-epochs", type=int, default=2, help="case scale: epochs timed")
    parser.add_argument("--scale-worker", type=int)
    parser.add_argument("--time-limit", type=float, default=300.0, help="cases elemental, mixed: seconds per run")
    parser.add_argument("--stop-epoch", type=int, default=45, help="case averaging: epochs per run")
    parser.add_argument("--mixed-worker", action="store_true")
    parser.add_argument("--elemental-worker")
    parser.add_argument("--frames")
    parser.add_argument("--overrides", default="{}", help="worker: TrainingConfig fields as JSON")
    args = parser.parse_args()
    if args.elemental_worker:
        print(json.dumps(elemental_worker(args.elemental_worker, args.time_limit, args.frames)))
        return
    if args.scale_worker:
        print(json.dumps(scale_worker(args.scale_worker, args.scale_epochs)))
        return
    if args.mixed_worker:
        print(json.dumps(mixed_worker(args.time_limit)))
        return
    if args.case == "mixed":
        run_mixed(args.time_limit)
        return
    if args.case == "optimizers":
        run_optimizers(args.time_limit)
        return
    if args.case == "averaging":
        run_averaging(args.stop_epoch)
        return
    if args.case == "scale":
        run_scale(args.scale_frames, args.scale_epochs)
        return
    if args.case == "elemental":
        run_elemental(args.time_limit)
        return
    if args.worker:
        print(json.dumps(worker(args.worker, args.ensemble_members, json.loads(args.overrides))))
        return
    if not WATER.exists():
        sys.exit(f"benchmark data not found at {WATER} (../shared/external is only in this workplace)")
    if args.ensemble_only:
        ens = run_worker("cpu", 4)
        if ens:
            print_ensemble(ens)
        print(f"wrote {write_json('bench_train_ensemble', {'machine': machine_info(), 'ensemble': ens})}")
        return
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
        print_ensemble(ens)
    path = write_json("bench_train", {"machine": machine_info(), "reference_n2p2": N2P2, "runs": results,
                                      "ensemble": ens})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
