"""The main job on embedded defaults: fill the database with sample runs and show what it holds."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

#: Sample folders of ``../shared/external`` and the units of the unit-less ones.
SAMPLE_UNITS = {
    "vasp": None,
    "qe": None,
    "deepmd-water": ("eV", "Angstrom"),
    "n2p2/H2O_RPBE-D3": ("Ha", "Bohr"),
    "n2p2/Cu2S_PBE": ("eV", "Angstrom"),
}


def find_samples() -> Path | None:
    """``$MLMD_SAMPLE_DATA``, else ``../shared/external`` beside the working folder or the source tree."""
    env = os.environ.get("MLMD_SAMPLE_DATA")
    candidates = [Path(env)] if env else []
    candidates += [Path.cwd() / ".." / "shared" / "external",
                   Path(__file__).resolve().parents[2] / "shared" / "external"]
    for c in candidates:
        if (c / "vasp").is_dir() or (c / "qe").is_dir():
            return c.resolve()
    return None


def bundled_example(folder: Path, n_frames: int = 24, seed: int = 0) -> Path:
    """Write a tiny labelled data set (rattled fcc Cu and Cu3Au cells, ASE's EMT potential) as extxyz.

    EMT is a toy potential, not DFT: it exists so a fresh machine without sample runs can exercise the
    whole pipeline. Returns the file path.
    """
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n_frames):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)
        if i % 2:
            atoms.symbols[::4] = "Au"
        atoms.rattle(0.05, seed=int(rng.integers(1 << 30)))
        atoms.set_cell(atoms.cell * (1 + 0.02 * rng.standard_normal()), scale_atoms=True)
        atoms.calc = EMT()
        results = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces(),
                   "stress": atoms.get_stress()}
        atoms.calc = SinglePointCalculator(atoms, **results)
        frames.append(atoms)
    path = folder / "cu_au_emt.extxyz"
    write(path, frames, format="extxyz")
    return path


def run_demo(db, samples: Path | None = None) -> None:
    """Ingest the samples (or the bundled example) into ``db`` and print the report, summary and queries."""
    print(f"database: {db!r}")
    samples = samples or find_samples()
    if samples is None:
        print("no sample runs found (../shared/external): using the bundled EMT example")
        with tempfile.TemporaryDirectory() as tmp:
            path = bundled_example(Path(tmp))
            print(db.ingest(path, settings={"code": "ase-emt"}, tags=["example"], progress=False))
    else:
        print(f"sample runs: {samples}")
        for sub, units in SAMPLE_UNITS.items():
            if (samples / sub).exists():
                print(f"\n== ingest {sub}" + (f" (units {units[0]}, {units[1]})" if units else ""))
                print(db.ingest(samples / sub, units=units, tags=["sample"], progress=False))
    print("\n== what the database holds")
    print(db.summary())
    for formula in ("H2O", "Cu2S", "Cu3Au"):
        n = db.count(formula=formula)
        if n:
            print(f"\n== db.frames(formula={formula!r}): {n} frames")
            print(db.frames(formula=formula, limit=2000).summary())
            break
    if samples is not None and db.count(formula="H2O", settings={"code": "vasp"}) and db.count(formula="H2O"):
        print("\n== can VASP water be mixed with the water sets of unknown settings (DeePMD, n2p2)?")
        print(db.compatible({"formula": "H2O", "settings": {"code": "vasp"}},
                            {"formula": "H2O", "settings": {"code": None}}))
    if samples is not None and (samples / "n2p2" / "Cu2S_PBE").exists() and db.count(formula="Cu2S"):
        show_potential(db, samples / "n2p2" / "Cu2S_PBE")
    trained = train_potential(db)
    if trained is not None:
        run_md(db, *trained)


def train_potential(db, time_limit: float = 240.0):
    """Train a potential with the defaults on the database's 192-atom water frames (DeePMD, DFT) — or on the
    bundled example — save it in the potential database and list what it holds. Returns (name, a frame) or None."""
    import warnings

    from mlmd_lab.train.trainer import Trainer, TrainingWarning

    # One source only: the DeePMD set. Water boxes of other origins (n2p2's RPBE-D3 set) have other DFT
    # settings and energy zeros, and their settings are unknown, so no signature tells them apart.
    deepmd = {"formula": "H2O", "query": {"source_path": {"$regex": "deepmd-water"}}}
    criteria = deepmd if db.count(**deepmd) else {}
    frames = db.frames(**criteria) if criteria else db.frames(tags=["example"])
    if len(frames) < 3:
        return None
    name = "water-demo" if criteria else "cu-au-emt-demo"
    print(f"\n== train a potential with the defaults on {len(frames)} frames ({name}; at most {time_limit:.0f} s)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainingWarning)  # the bundled example is deliberately small
        trainer = Trainer(frames, time_limit=time_limit)
        trainer.fit()
    for split, errors in trainer.errors.items():
        print(f"  {split:<10} {errors['n_frames']:>4} frames: energy RMSE {errors['energy_rmse'] * 1e3:.3f} meV/atom, "
              f"force RMSE {errors['force_rmse'] * 1e3:.1f} meV/Å")
    record = db.models.save(trainer.model, name, description="mlmd-lab demo: defaults")
    print(f"  saved as {record.name} v{record.version}; the potential database holds:")
    for r in db.models.find():
        energy, force = r.rmse("test")
        shown = "-" if force is None else f"{force:.1f}"
        print(f"  - {r.name} v{r.version} ({' '.join(r.elements)}): test force RMSE {shown} meV/Å")
    return name, frames[0]


def run_md(db, name: str, atoms, steps: int = 400) -> None:
    """Load potential ``name`` from the potential database, run Langevin MD at 300 K and show g(r)."""
    import warnings

    import numpy as np

    from mlmd_lab import analysis, md
    from mlmd_lab.potentials.model import ExtrapolationWarning

    print(f"\n== MD with {name} from the potential database: {len(atoms)} atoms, Langevin 300 K, 0.5 fs, "
          f"{steps} steps")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExtrapolationWarning)  # reported below instead
        result = md.run(name, atoms, "nvt", temperature=300, timestep=0.5, steps=steps, db=db,
                        trajectory_interval=10, log_interval=50)
    th = result.thermo
    print(f"  {result!r}")
    print(f"  mean T {np.mean(th['temperature_K'][1:]):.0f} K, E_pot {th['epot_eV'][-1]:.4f} eV, "
          f"atoms beyond the training range at the end: {int(th['max_extrapolation'][-1])}")
    g = analysis.rdf(list(result.trajectory), r_max=min(6.0, 0.49 * min(atoms.cell.lengths())))
    for pair in g.g:
        r, height = g.first_peak(pair)
        print(f"  g(r) {pair[0]}-{pair[1]}: first peak at {r:.2f} Å (height {height:.2f})")


def show_potential(db, folder: Path) -> None:
    """Evaluate an n2p2 potential (JAX, float64) on the database's frames of its system and print the errors."""
    import numpy as np

    from mlmd_lab.potentials import HDNNP

    model = HDNNP.from_n2p2(folder, energy_unit="eV", length_unit="Angstrom")
    frames = db.frames(formula="Cu2S", limit=200)  # the composition this potential was trained on
    results = model.predict(list(frames), warn=False)
    de = [(r["energy"] - a.get_potential_energy()) / len(a) for r, a in zip(results, frames, strict=True)]
    df = np.concatenate([(r["forces"] - a.get_forces()).ravel() for r, a in zip(results, frames, strict=True)])
    print(f"\n== n2p2 potential {folder.name} (read by mlmd_lab, evaluated in JAX) on {len(frames)} database frames")
    print(f"energy RMSE {np.sqrt(np.mean(np.square(de))) * 1e3:.3f} meV/atom, "
          f"force RMSE {np.sqrt(np.mean(np.square(df))) * 1e3:.1f} meV/Å "
              f"(n2p2 over its input.data.set20 alone: 0.979 meV/atom, 42.2 meV/Å)")

