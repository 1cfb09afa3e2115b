"""SLHMC against plain MD on the reference: reference calls per effective independent sample of the energy.

The system: liquid argon (32 atoms, 1.25 g/cm³, periodic) at 120 K. The reference is mlmd_lab's shifted-force
Lennard-Jones (epsilon 0.0104 eV, sigma 3.40 Å) behind an ASE calculator, standing in for DFT (one call is one
energy + forces). The proposal potential is a deliberately wrong Lennard-Jones (epsilon +5 %, sigma -1 %),
compiled in JAX like an HDNNP.

- AIMD baseline: Langevin MD on the reference itself (``mlmd_lab.md.run``, one reference call per step), the
  potential energy logged every step; reference calls per independent sample = its statistical inefficiency g
  (steps per independent sample, blocking).
- SLHMC: ``mlmd_lab.slhmc.run`` with the wrong potential proposing, one reference call per trial; calls per
  independent sample = :attr:`~mlmd_lab.slhmc.result.Average.reference_calls_per_sample` of the energy.

The AIMD baseline runs with two Langevin time constants (100 and 500 fs; 20 fs is worse) and the better one
counts. The ratio of the two is the saving (the authors report "several tens of times" for DFT; target >= 10).
Both means are printed with their errors: they must agree (SLHMC is exact for the reference).

    python benchmarks/bench_slhmc.py [--trials 3000] [--md-steps 20 40] [--md-length 60000]

Writes ``benchmarks/results/bench_slhmc.json``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _common import machine_info, print_table, write_json
from ase import Atoms, units
from ase.build import bulk
from ase.calculators.calculator import Calculator, all_changes

TEMPERATURE = 120.0  # K
DENSITY = 1.25  # g/cm³: liquid argon, well away from freezing
TIMESTEP = 5.0  # fs


class ForceFieldCalculator(Calculator):
    """An mlmd_lab ForceField (here the reference Lennard-Jones) as an ASE calculator: the stand-in for DFT."""

    implemented_properties = ["energy", "forces", "stress"]

    def __init__(self, potential, **kwargs) -> None:
        super().__init__(**kwargs)
        from mlmd_lab.md import forcefield

        self.ff = forcefield(potential, skin=0.0, dtype="float64")
        self.calls = 0

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        self.calls += 1
        out = self.ff.single_point(self.atoms)
        virial = out["virial"]
        t = 0.5 * (virial + virial.T) / self.atoms.get_volume()
        self.results = {"energy": float(out["energy"]), "forces": out["forces"],
                        "stress": np.array([t[0, 0], t[1, 1], t[2, 2], t[1, 2], t[0, 2], t[0, 1]])}


def liquid_argon() -> Atoms:
    """32 Ar atoms at DENSITY, melted from fcc and equilibrated at TEMPERATURE by MD with the reference."""
    from mlmd_lab.md import LennardJones, run

    mass = 32 * 39.948 / units.mol  # g
    a = (mass / DENSITY * 1e24 / 8) ** (1 / 3)  # Å, 2x2x2 conventional cells
    atoms = bulk("Ar", "fcc", a=a, cubic=True).repeat(2)
    melted = run(LennardJones(), atoms, "nvt", temperature=300.0, timestep=TIMESTEP, steps=2000, seed=1,
                 trajectory_interval=0, log_interval=0)
    cooled = run(LennardJones(), melted.atoms, "nvt", temperature=TEMPERATURE, timestep=TIMESTEP, steps=6000,
                 seed=2, trajectory_interval=0, log_interval=0)
    out = cooled.atoms.copy()
    out.calc = None
    return out


def aimd(atoms: Atoms, steps: int, thermostat_fs: float) -> dict:
    from mlmd_lab.analysis import block_average
    from mlmd_lab.md import LennardJones, run

    t0 = time.perf_counter()
    md = run(LennardJones(), atoms, "nvt", temperature=TEMPERATURE, timestep=TIMESTEP, steps=steps, seed=3,
             thermostat_time=thermostat_fs, log_interval=1, trajectory_interval=0)
    energy = block_average(md.thermo["epot_eV"][1:])
    g = max(energy.statistical_inefficiency, 1.0)
    return {"method": f"AIMD (Langevin {thermostat_fs:g} fs, reference every step)", "calls": steps,
            "mean_eV": energy.mean, "stderr_eV": energy.stderr, "calls_per_sample": g, "acceptance": None,
            "plateau": energy.plateau,
            "wall_s": time.perf_counter() - t0}


def slhmc_run(atoms: Atoms, trials: int, md_steps: int) -> dict:
    from mlmd_lab import slhmc
    from mlmd_lab.md import LennardJones

    reference = ForceFieldCalculator(LennardJones())
    surrogate = LennardJones(epsilon=0.0104 * 1.05, sigma=3.40 * 0.99)
    t0 = time.perf_counter()
    result = slhmc.run(reference, surrogate, atoms, temperature=TEMPERATURE, n_trials=trials, md_steps=md_steps,
                       timestep=TIMESTEP, seed=0)
    energy = result.averages()["energy"]
    return {"method": f"SLHMC ({md_steps} x {TIMESTEP:g} fs per trial)", "calls": result.n_reference_calls,
            "mean_eV": energy.mean, "stderr_eV": energy.stderr,
            "calls_per_sample": energy.reference_calls_per_sample, "acceptance": result.acceptance_rate,
            "plateau": energy.plateau,
            "wall_s": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3000)
    parser.add_argument("--md-steps", type=int, nargs="+", default=[20, 40])
    parser.add_argument("--md-length", type=int, default=60000, help="steps of the AIMD baseline")
    args = parser.parse_args()
    atoms = liquid_argon()
    baselines = [aimd(atoms, args.md_length, tau) for tau in (100.0, 500.0)]
    baseline = min(baselines, key=lambda r: r["calls_per_sample"])  # the better-tuned thermostat
    results = baselines + [slhmc_run(atoms, args.trials, n) for n in args.md_steps]
    for r in results:
        r["saving"] = baseline["calls_per_sample"] / r["calls_per_sample"]
    rows = [[r["method"], r["calls"], r["acceptance"], r["mean_eV"], r["stderr_eV"], r["calls_per_sample"],
             r["plateau"], r["saving"], r["wall_s"]] for r in results]
    print_table(["method", "reference calls", "acceptance", "<U> eV", "± eV", "calls / indep. sample",
                 "blocking plateau", "saving", "wall s"], rows,
                title=f"Liquid Ar32 ({DENSITY:g} g/cm³) at {TEMPERATURE:g} K: reference calls per independent "
                      "sample of U")
    path = write_json("bench_slhmc", {"machine": machine_info(), "temperature_K": TEMPERATURE, "density": DENSITY,
                                      "timestep_fs": TIMESTEP, "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
