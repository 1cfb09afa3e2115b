"""The main job on embedded defaults: fill the database with sample runs, show what it holds, then build a
potential for a periodic solid automatically with real DFT and check it (:mod:`mlmd_lab.autobuild`); the water
quickstart (:mod:`mlmd_lab.quickstart`) on request."""

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


def run_demo(db, samples: Path | None = None, workdir: str | Path = "quickstart", quickstart: bool = False,
             autobuild: bool = True, autobuild_workdir: str | Path = "autobuild", engine: str = "auto") -> list:
    """The main job: ingest the samples (or the bundled example) into ``db`` and print the report, summary and
    queries; then the automatic construction of a potential for a periodic solid with real DFT and its checks
    (:func:`mlmd_lab.autobuild.run_autobuild`, report in ``autobuild_workdir/report.html``) unless ``autobuild`` is
    False; and the water quickstart (:mod:`mlmd_lab.quickstart`, report in ``workdir``) when ``quickstart``.

    The quickstart is no longer part of the default main job: both together exceed the main job's 10 minutes on 2
    cores; it stays what notebook 00 runs (and its browser test), and ``mlmd-lab demo --quickstart`` adds it.

    Returns:
        the results that carry checks, in order: an :class:`~mlmd_lab.autobuild.AutobuildResult` and/or a
        :class:`~mlmd_lab.quickstart.QuickstartResult` (empty when only ingesting).
    """
    import time

    t0 = time.perf_counter()
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
    print(f"\n== ingest and summary: {time.perf_counter() - t0:.0f} s")
    results = []
    if autobuild:
        from mlmd_lab.autobuild import run_autobuild

        print()
        results.append(run_autobuild(db, workdir=autobuild_workdir, engine=engine))
    if quickstart:
        from mlmd_lab.quickstart import run_quickstart

        print()
        results.append(run_quickstart(db, workdir=workdir))
    return results


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

