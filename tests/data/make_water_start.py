"""Regenerate water192_300K.extxyz: the equilibrated start of tests/test_md.py's water run.

192 atoms (the DeePMD water frame 0 of ../shared/external/deepmd-water) run for 1 ps of NVT at 300 K (Langevin,
0.5 fs steps, 100 fs thermostat time) with the n2p2 RPBE-D3 water potential of ../shared/external/n2p2; the final
positions and momenta are written (extxyz, ASE units: Å and ASE momentum units). Run from the repository root:
``python tests/data/make_water_start.py`` (about 6 minutes on 2 cores).
"""

from pathlib import Path

from ase.io import write

from mlmd_lab.io.deepmd import read_deepmd
from mlmd_lab.md import run
from mlmd_lab.potentials.model import HDNNP

EXTERNAL = Path(__file__).resolve().parents[2].parent / "shared" / "external"


def main() -> None:
    potential = HDNNP.from_n2p2(EXTERNAL / "n2p2" / "H2O_RPBE-D3", energy_unit="Ha", length_unit="Bohr")
    atoms = read_deepmd(EXTERNAL / "deepmd-water" / "data_0")[0]
    r = run(potential, atoms, "nvt", temperature=300.0, timestep=0.5, steps=2000, thermostat_time=100.0, seed=1,
            log_interval=100)
    print(r)
    final = r.atoms.copy()
    final.calc = None
    final.wrap()
    write(Path(__file__).with_name("water192_300K.extxyz"), final, format="extxyz")


if __name__ == "__main__":
    main()
