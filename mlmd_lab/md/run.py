"""Molecular dynamics with mlmd_lab potentials: :func:`run` and :func:`resume`.

The inner loop runs jit-compiled in blocks (``lax.scan``) with the neighbour data fixed. Every step checks, in
JAX, that the neighbour data still hold (skin rule, cell changes included) and that nothing is unsafe (NaN,
runaway temperature, extrapolation, committee spread); a failing step is not taken: the block ends at the last
good state. The host then rebuilds the neighbour lists and continues, or stops with a clear
:class:`MDStoppedError`. So every accepted step used valid neighbours, and a block's length never changes results.
On the device route (``neighbours=``, the default on a GPU) a step that leaves the skin makes the block rebuild the
lists itself, in JAX, at the last good state, and take the step again; the host builds only when a list outgrows
its capacity.

Random numbers for step n come from ``fold_in(PRNGKey(seed), n)``, and a restart stores the neighbour data's
reference positions and capacities, so a resumed run repeats the uninterrupted one exactly.

Files in ``workdir`` (when given): ``md.traj`` (ASE trajectory: unwrapped positions, momenta, cell, energy,
forces, stress; ``info`` has step, time_fs, temperature_K), ``md.log`` (thermodynamics, units in the header; read
with :func:`read_log`), ``restart.npz`` (written atomically), ``settings.json``.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from ase import Atoms, units
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms
from ase.io import Trajectory

from mlmd_lab.errors import MLMDError
from mlmd_lab.files import atomic_path, atomic_write_text
from mlmd_lab.md import integrators as integ
from mlmd_lab.md.forcefield import ForceField, forcefield, neighbours_valid
from mlmd_lab.potentials.device_neighbours import LIST_KEYS, unsuitable
from mlmd_lab.potentials.model import ExtrapolationWarning
from mlmd_lab.potentials.neighbours import Layout

LOG_COLUMNS = ("step", "time_fs", "epot_eV", "ekin_eV", "etot_eV", "conserved_eV", "temperature_K", "pressure_GPa",
               "volume_A3", "pxx_GPa", "pyy_GPa", "pzz_GPa", "pyz_GPa", "pxz_GPa", "pxy_GPa", "max_extrapolation",
               "max_force_std_eV_A")

DEFAULT_SKIN = 0.5  # Å
#: Capacities of lists rebuilt on the device hold this many times the counts of the host build they start from
#: (the counts fluctuate by a few per cent in a liquid; a list that outgrows its capacity costs a host build).
DEVICE_HEADROOM = 1.15
_BY_CALLBACK = "stopped by a callback"

# Why a block ended (0: it ran to its target).
_NEIGHBOURS, _NAN, _HOT, _EXTRAPOLATION, _SPREAD, _JUMP = 1, 2, 3, 4, 5, 6
_REASONS = {
    _NAN: "the energy or forces became NaN/inf",
    _HOT: "the temperature passed max_temperature",
    _EXTRAPOLATION: "atoms left the training range (symmetry functions outside the scaling data)",
    _SPREAD: "the committee force spread passed max_force_spread",
    _JUMP: "an atom moved more than half the neighbour skin in one step",
}
_FIXES = {
    _NAN: "check the structure (overlapping atoms?) and use a smaller timestep",
    _HOT: "use a smaller timestep, start from a relaxed structure, or check that the potential covers it",
    _EXTRAPOLATION: "add such structures to the training data (on_extrapolation='warn' continues)",
    _SPREAD: "label these structures with DFT and retrain (active learning), or raise max_force_spread",
    _JUMP: "the forces are huge (overlapping atoms?) or the timestep is too large for the skin; check the "
           "structure, use a smaller timestep, or a larger skin",
}


class MDStoppedError(MLMDError):
    """MD stopped for safety; ``result`` holds the run up to the last good step (restart written if workdir)."""

    def __init__(self, message: str, result: MDResult) -> None:
        super().__init__(message)
        self.result = result


@dataclass
class MDResult:
    """What a run produced.

    Attributes:
        atoms: final structure (positions Å unwrapped, momenta, cell; energy/forces/stress attached).
        thermo: the log as arrays, keys :data:`LOG_COLUMNS` (units in the names).
        trajectory: frames written (ASE Atoms): a list, or with a workdir a lazy ``ase.io.Trajectory`` reader of
            ``md.traj`` (indexable, ``len()``; frames load when accessed).
        steps: steps taken in this call; wall_s: seconds; rebuilds: neighbour-list rebuilds (all of them: on the
            host and on the device), device_rebuilds: those made on the device, inside the compiled blocks.
        compile_s: seconds spent compiling (included in wall_s): the MD blocks, whose program also gives the
            starting structure's forces (a program loaded from the persistent compilation cache counts its loading).
        compilations: MD block programs compiled (or loaded from that cache) in this call: one per neighbour
            layout the run needed (lists that outgrow their capacities need a new one, see
            :data:`~mlmd_lab.potentials.neighbours.SPARE`).
        atom_steps_per_s: throughput (atoms x steps / (wall_s - compile_s)).
        workdir: output folder or None.
        compute: where the forces were computed and the neighbour lists built, e.g. "cpu: descriptor loops split
            over 2 JAX CPU devices; neighbour lists on the host (the faster route on the CPU)".
    """

    atoms: Atoms
    thermo: dict[str, np.ndarray]
    trajectory: Sequence[Atoms]
    steps: int
    wall_s: float
    rebuilds: int
    compile_s: float
    atom_steps_per_s: float
    workdir: Path | None = None
    stopped: str | None = None
    settings: dict = field(default_factory=dict)
    compute: str = ""
    device_rebuilds: int = 0
    compilations: int = 0

    def __repr__(self) -> str:
        return (f"MDResult({self.steps} steps of {len(self.atoms)} atoms, {self.wall_s:.1f} s, "
                f"{self.atom_steps_per_s:.3g} atom-steps/s, {self.rebuilds} neighbour rebuilds, "
                f"{self.compilations} compiled in {self.compile_s:.1f} s)")


def run(potential, atoms: Atoms, ensemble: str = "nve", temperature: float | None = None,
        pressure: float | None = None, timestep: float = 0.5, steps: int = 1000, *, db=None,
        workdir: str | Path | None = None, thermostat_time: float = 100.0, barostat_time: float = 1000.0,
        compressibility: float = 0.45, barostat: str = "isotropic", fixed: Sequence[int] | None = None,
        velocities: str = "auto", seed: int = 0, skin: float | None = None, dtype: str | None = None,
        trajectory_interval: int = 10, log_interval: int = 10, restart_interval: int = 1000, block: int = 50,
        on_extrapolation: str = "warn", max_force_spread: float | None = None,
        max_temperature: float | None = None, callbacks: Sequence[Callable[[dict], None]] = (),
        progress: bool = False, neighbours: str = "auto") -> MDResult:
    """Run molecular dynamics.

    Args:
        potential: an HDNNP, an Ensemble, a LennardJones, or a model name in ``db.models``.
        atoms: the starting structure (ASE units; its momenta are used when ``velocities="auto"`` and non-zero;
            FixAtoms constraints are honoured).
        ensemble: "nve", "nvt"/"langevin", "nose-hoover", or "npt".
        temperature: target (and initial) temperature in K; required except for NVE with given momenta.
        pressure: target pressure in GPa (NPT only).
        timestep: in fs.
        steps: number of steps.
        db: a :class:`~mlmd_lab.db.store.Database` when ``potential`` is a name.
        workdir: folder for md.traj, md.log, restart.npz; None keeps frames and log in memory only.
        thermostat_time: Langevin 1/friction or Nosé–Hoover period in fs.
        barostat_time: stochastic cell rescaling time constant in fs.
        compressibility: barostat's compressibility guess in 1/GPa (sets the speed, not the result;
            water 0.45, solids ~0.01).
        barostat: "isotropic" or "anisotropic" (the three Cartesian axes scale independently).
        fixed: indices of atoms held fixed (added to the structure's FixAtoms).
        velocities: "auto" (keep non-zero momenta, else draw), "draw" (Maxwell–Boltzmann at temperature,
            zero total momentum, scaled to exactly the temperature), or "keep".
        seed: random seed for velocities and stochastic thermostats/barostats.
        skin: neighbour-list skin in Å (default 0.5: in water at 300 K and 0.5 fs, 0.25-1.0 Å cost the same
            within 10 %, benchmarks/bench_md.py --skin-scan; a larger skin holds more triplets, a smaller one
            rebuilds more often on the host).
        dtype: "float64" or "float32" (the mixed mode: float32 descriptors and networks, float64 sums; see
            :meth:`HDNNP.with_dtype`) potential evaluation (default: the potential's).
        trajectory_interval, log_interval, restart_interval: in steps (0 disables).
        block: steps per compiled block (between host round trips).
        on_extrapolation: "warn", "stop" or "ignore" when symmetry functions leave the training range.
        max_force_spread: stop when the committee force uncertainty of any atom passes this (eV/Å; ensembles):
            the calibrated one (raw spread times the ensemble's fitted per-element ``force_scale``, see
            :mod:`mlmd_lab.train.ensemble`; the raw spread for an uncalibrated ensemble), also the log column
            ``max_force_std_eV_A``.
        max_temperature: stop above this (K; default 10 x target + 1000).
        callbacks: functions called with each log row (a dict of :data:`LOG_COLUMNS`, plus "atoms" when a
            trajectory frame is written). A callback returning True ends the run cleanly at the end of the current
            block (at most ``block`` steps later): the restart is written and the result has
            ``stopped="stopped by a callback"`` (e.g. a Stop button; :func:`resume` continues).
        progress: show a progress bar.
        neighbours: where the neighbour lists are rebuilt during the run: "auto" (on the device, inside the
            compiled block, when JAX computes on a GPU and the cell is at least twice the cutoff plus skin wide;
            else on the host), "host" or "device" (see :meth:`ForceField.neighbour_route`; the choice and its
            reason are in ``MDResult.compute``).
    """
    ensemble = _canonical_ensemble(ensemble)
    atoms = _checked_atoms(atoms)
    _check_units(timestep, temperature, pressure, ensemble, steps)
    potential = resolve_potential(potential, db)
    ff = forcefield(potential, skin=DEFAULT_SKIN if skin is None else skin, dtype=dtype)
    free = _free_mask(atoms, fixed)
    if ensemble == "npt" and not free.all():
        raise MLMDError("fixed atoms are not supported under NPT (the cell rescaling moves every atom); "
                        "use NVT, or free the atoms")
    if ensemble == "npt" and not atoms.pbc.all():
        raise MLMDError("NPT needs a periodic cell in all three directions; use NVT or NVE for molecules and slabs")
    if barostat not in ("isotropic", "anisotropic"):
        raise MLMDError(f"barostat must be 'isotropic' or 'anisotropic', not {barostat!r}")
    settings = {
        "ensemble": ensemble, "temperature_K": temperature, "pressure_GPa": pressure, "timestep_fs": float(timestep),
        "thermostat_time_fs": float(thermostat_time), "barostat_time_fs": float(barostat_time),
        "compressibility_per_GPa": float(compressibility), "barostat": barostat, "seed": int(seed),
        "skin_A": ff.skin, "dtype": ff.dtype, "trajectory_interval": int(trajectory_interval),
        "log_interval": int(log_interval), "restart_interval": int(restart_interval), "block": int(block),
        "on_extrapolation": on_extrapolation, "max_force_spread_eV_A": max_force_spread,
        "max_temperature_K": max_temperature, "potential": _fingerprint(ff), "n_atoms": len(atoms),
        "symbols": atoms.get_chemical_formula(), "pbc": [bool(x) for x in atoms.pbc], "neighbours": neighbours,
    }
    engine = _Engine(ff, atoms, free, settings)
    engine.start_velocities(velocities, temperature)
    return engine.run(int(steps), workdir=workdir, callbacks=callbacks, progress=progress, fresh=True)


def resume(potential, workdir: str | Path, steps: int | None = None, *, db=None,
           callbacks: Sequence[Callable[[dict], None]] = (), progress: bool = False) -> MDResult:
    """Continue the run in ``workdir`` from its restart file, exactly as if it had not stopped.

    ``steps``: further steps (default: the rest of the originally requested steps). The potential must be the
    one the run started with (checked by a fingerprint of its parameters).
    """
    workdir = Path(workdir)
    path = workdir / "restart.npz"
    if not path.exists():
        raise MLMDError(f"no restart file {path}; a run writes one every restart_interval steps when workdir is set")
    saved = np.load(path, allow_pickle=False)
    settings = json.loads(str(saved["settings"]))
    ff = forcefield(resolve_potential(potential, db), skin=settings["skin_A"], dtype=settings["dtype"])
    if _fingerprint(ff) != settings["potential"]:
        raise MLMDError(f"the potential differs from the one the run in {workdir} started with; resume with the "
                        "same potential (or start a new run from the last frame)")
    atoms = Atoms(numbers=saved["numbers"], positions=saved["positions"], cell=saved["cell"], pbc=saved["pbc"])
    engine = _Engine(ff, atoms, saved["free"].astype(bool), settings)
    engine.load(saved)
    remaining = int(settings["requested_until"]) - engine.step if steps is None else int(steps)
    if remaining <= 0:
        raise MLMDError(f"the run in {workdir} already reached step {engine.step}; give steps= to run further")
    return engine.run(remaining, workdir=workdir, callbacks=callbacks, progress=progress, fresh=False)


def read_log(path: str | Path) -> dict[str, np.ndarray]:
    """The thermodynamic log ``md.log`` as {column: array} (units in the column names)."""
    path = Path(path)
    if path.is_dir():
        path = path / "md.log"
    with open(path) as handle:
        header = handle.readline().lstrip("#").split()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a log with its header only
        data = np.loadtxt(path, comments="#", ndmin=2)
    if data.size == 0:
        data = np.zeros((0, len(header)))
    return {name: data[:, k] for k, name in enumerate(header)}


# ---------------------------------------------------------------------------------------------------- helpers
def _canonical_ensemble(name: str) -> str:
    aliases = {"nve": "nve", "nvt": "langevin", "langevin": "langevin", "nose-hoover": "nose-hoover",
               "nosehoover": "nose-hoover", "nhc": "nose-hoover", "npt": "npt"}
    key = str(name).lower().replace("_", "-")
    if key not in aliases:
        raise MLMDError(f"unknown ensemble {name!r}; use one of nve, nvt (langevin), nose-hoover, npt")
    return aliases[key]


def _checked_atoms(atoms: Atoms) -> Atoms:
    if not isinstance(atoms, Atoms) or len(atoms) == 0:
        raise MLMDError("MD needs an ASE Atoms object with at least one atom")
    if atoms.pbc.any() and not atoms.pbc.all():
        raise MLMDError(f"mixed periodicity {atoms.pbc.tolist()} is not supported yet; use a periodic cell with "
                        "vacuum in the non-periodic direction")
    if atoms.pbc.all() and atoms.get_volume() < 1e-6:
        raise MLMDError("periodic structure with a zero-volume cell; set the cell or pbc=False")
    return atoms.copy()


def _check_units(timestep: float, temperature, pressure, ensemble: str, steps: int) -> None:
    if not 0.01 <= timestep <= 10.0:
        raise MLMDError(f"timestep={timestep} is outside 0.01-10 fs; it is in femtoseconds (0.5 fs suits water "
                        "with hydrogen, 1-2 fs heavier atoms)")
    if steps < 0:
        raise MLMDError(f"steps must be >= 0, got {steps}")
    if ensemble != "nve" and temperature is None:
        raise MLMDError(f"ensemble {ensemble!r} needs temperature= (in K)")
    if temperature is not None and not 0 <= temperature < 1e5:
        raise MLMDError(f"temperature={temperature} K is not plausible; it is in kelvin")
    if ensemble == "npt" and pressure is None:
        raise MLMDError("NPT needs pressure= (in GPa; 1 bar = 1e-4 GPa)")
    if pressure is not None and ensemble != "npt":
        raise MLMDError(f"pressure= is only used by NPT, not {ensemble!r}")
    if pressure is not None and abs(pressure) > 1000:
        raise MLMDError(f"pressure={pressure} GPa is not plausible; it is in GPa (1 bar = 1e-4 GPa)")


def resolve_potential(potential, db):
    """``potential`` itself, or the model of that name loaded from ``db.models`` (the potential database);
    shared by md.run and slhmc.run. A name without ``db`` is refused with the fix."""
    if isinstance(potential, str):
        if db is None:
            raise MLMDError(f"potential {potential!r} is a name: give db= (a Database) to load it from the "
                            "potential database")
        return db.models.load(potential)
    return potential


def _free_mask(atoms: Atoms, fixed) -> np.ndarray:
    free = np.ones(len(atoms), bool)
    for constraint in atoms.constraints:
        if isinstance(constraint, FixAtoms):
            free[constraint.index] = False
        else:
            raise MLMDError(f"constraint {type(constraint).__name__} is not supported by mlmd_lab MD (FixAtoms is)")
    if fixed is not None:
        index = np.asarray(list(fixed), int)
        if index.size and (index.min() < -len(atoms) or index.max() >= len(atoms)):
            raise MLMDError(f"fixed atom indices {index.tolist()} out of range for {len(atoms)} atoms")
        free[index] = False
    if not free.any():
        raise MLMDError("every atom is fixed; nothing to simulate")
    return free


def _fingerprint(ff: ForceField) -> str:
    digest = hashlib.sha256(repr((ff.elements, ff.cutoff, ff.length_factor, ff.energy_factor,
                                  type(ff.source).__name__)).encode())
    if type(ff.source).__name__ == "LennardJones":
        digest.update(repr(ff.source).encode())
    for _, params in ff.members:
        for leaf in jax.tree_util.tree_leaves(params):
            digest.update(np.asarray(leaf, np.float64).tobytes())
    if ff.force_scale is not None:  # calibrated ensembles only (the fingerprints of others stay as they were)
        digest.update(np.asarray(ff.force_scale, np.float64).tobytes())
    return digest.hexdigest()[:16]


def _layout_to_json(layout: Layout) -> str:
    return json.dumps([layout.n_atoms, layout.n_structures, layout.n_elements, layout.pair_blocks,
                       layout.triplet_groups])


def _layout_from_json(text: str) -> Layout:
    n_atoms, n_structures, n_elements, pairs, triplets = json.loads(text)
    return Layout(n_atoms, n_structures, n_elements, tuple(tuple(p) for p in pairs),
                  tuple((tuple(k), o, c) for k, o, c in triplets))


def _atomic_save(path: Path, **arrays) -> None:
    """``np.savez`` to ``path`` atomically, flushed to disk (the restart a resumed run starts from)."""
    with atomic_path(path, fsync=True) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)


# ---------------------------------------------------------------------------------------------------- engine
class _Engine:
    """Host side of a run: state, neighbour data, compiled blocks, outputs."""

    def __init__(self, ff: ForceField, atoms: Atoms, free: np.ndarray, settings: dict) -> None:
        self.ff, self.atoms, self.settings = ff, atoms, settings
        self.kind = settings["ensemble"]
        self.species = ff.species(atoms)
        self.free = free
        self.periodic = bool(atoms.pbc.all())
        masses = atoms.get_masses()
        T = settings["temperature_K"]
        conserved_momentum = self.kind in ("nve", "nose-hoover") and free.all()
        self.dof = int(3 * free.sum() - (3 if conserved_momentum and free.sum() > 1 else 0))
        kT = units.kB * (T or 0.0)
        dt = settings["timestep_fs"] * units.fs
        tau = settings["thermostat_time_fs"] * units.fs
        P = settings["pressure_GPa"]
        self.constants = {
            "dt": dt, "masses": masses[:, None], "free": free[:, None].astype(float), "kT": kT,
            "dof": float(self.dof), "friction": 1.0 / tau,
            "chain_masses": integ.chain_masses(max(kT, 1e-12), self.dof, tau),
            "pressure": (P or 0.0) * units.GPa,
            "barostat_rate": (settings["compressibility_per_GPa"] / units.GPa)
            / (settings["barostat_time_fs"] * units.fs),
        }
        self.constants = {k: jnp.asarray(v) for k, v in self.constants.items()}
        # the potential's weights enter the compiled block as an argument (ForceField.parameters)
        self.constants["potential"] = self.ff.parameters()
        limit = settings["max_temperature_K"]
        self.max_temperature = float(limit) if limit is not None else 10.0 * float(T or 0.0) + 1000.0
        self.step = 0
        self.rebuilds = self.device_rebuilds = 0
        self._compiled: dict = {}
        self.momenta = atoms.get_momenta() * free[:, None]
        self.state = None
        self.arrays = self.layout = self.reference = None
        self._warned_extrapolation = False
        self.on_device, self.route = ff.neighbour_route(atoms, settings.get("neighbours", "auto"))
        self._lists = None  # the device rebuild of the current layout (on_device only)

    # -- initial conditions ---------------------------------------------------------------------------
    def start_velocities(self, mode: str, temperature: float | None) -> None:
        if mode not in ("auto", "draw", "keep"):
            raise MLMDError(f"velocities must be 'auto', 'draw' or 'keep', not {mode!r}")
        have = bool(np.any(self.momenta != 0))
        if mode == "draw" or (mode == "auto" and not have):
            if temperature is None:
                raise MLMDError("the structure has no velocities: give temperature= (K) to draw them")
            self.momenta = self._draw_momenta(temperature)
        elif mode == "keep" and not have and self.kind == "nve":
            warnings.warn("NVE starting from zero velocities", stacklevel=3)

    def _draw_momenta(self, temperature: float) -> np.ndarray:
        rng = np.random.default_rng(self.settings["seed"])
        m = self.atoms.get_masses()[:, None]
        p = rng.standard_normal((len(self.atoms), 3)) * np.sqrt(m * units.kB * temperature)
        p *= self.free[:, None]
        if self.free.all() and len(self.atoms) > 1:
            p -= m * (p.sum(axis=0) / m.sum())  # zero total momentum
        kinetic = 0.5 * np.sum(p * p / m)
        if temperature > 0 and kinetic > 0:
            p *= np.sqrt(0.5 * self.dof * units.kB * temperature / kinetic)
        return p

    def _initial_state(self) -> tuple[integ.MDState, float]:
        """(the state at the start: forces, energy and virial of the starting structure, seconds spent compiling).

        The forces come from the MD block's own program, called once with ``initial`` (its force call alone, at the
        starting positions): a separate force program cost a second compilation of the potential (NVE of 192-atom
        water with n2p2's H2O potential, alone: 1.6 s besides the block's 2.4 s; the block compiles no longer for
        it). The block is compiled ahead of this call, so that ``MDResult.compile_s`` holds its
        compilation (counted as run time, it made a short run's throughput look several times lower)."""
        atoms = self.atoms
        self._rebuild(atoms.positions, atoms.cell.array)
        R, h = jnp.asarray(atoms.positions), jnp.asarray(atoms.cell.array)
        shapes = jax.eval_shape(lambda: self.ff.compute(self.arrays, self.layout, R, h, self.constants["potential"]))
        zeros = {k: jnp.zeros(v.shape, v.dtype) for k, v in shapes.items()}
        blank = integ.MDState(
            positions=R, momenta=jnp.asarray(self.momenta), forces=zeros["forces"], energy=zeros["energy"],
            virial=zeros["virial"], cell=h, extrapolation=zeros["extrapolation"], force_std=zeros["force_std"],
            chain_positions=jnp.zeros(integ.CHAIN_LENGTH), chain_velocities=jnp.zeros(integ.CHAIN_LENGTH),
            heat=jnp.zeros(()), step=jnp.asarray(0, jnp.int64))
        args = self._block_args(blank, 1, jax.random.PRNGKey(self.settings["seed"]), initial=True)
        block, compile_s = self._block(self.layout, args)
        out = block(*args)
        if self.on_device:  # nothing is rebuilt, but the lists it returns are the ones to use (donated on a GPU)
            self.arrays.update(out[4])
        return out[0], compile_s

    # -- neighbour data ---------------------------------------------------------------------------------
    def _rebuild(self, positions, cell, like: Layout | None = None) -> None:
        """A host build at (positions, cell) Å; on the device route also the device's build of the same lists, so
        that the lists a run uses always come in the device's order (a resumed run repeats the uninterrupted
        one)."""
        like = like if like is not None else self.layout
        positions, cell = np.array(positions), np.array(cell)
        self.arrays = None  # the old lists go before the new ones are built: the peak holds one set, not two
        lf = self.ff.length_factor
        if self.on_device and (why := unsuitable(self.ff.builder, cell / lf, self.atoms.pbc, len(self.atoms))):
            self.on_device, self.route = False, f"neighbour lists on the host from step {self.step} ({why})"
        headroom = DEVICE_HEADROOM if self.on_device else 1.0
        # Spare room on the host route only: the device route visits every slot (it has no counts, see below).
        arrays, self.layout = self.ff.build(positions, cell, self.atoms.pbc, self.species, like, headroom,
                                            spare=not self.on_device)
        if self.on_device:
            arrays["pair_shift"] = arrays["pair_shift"].astype(np.int32)  # the type the device lists carry
            # The device rebuilds the lists inside a block: the host's counts of real entries would go stale, so
            # the descriptor loops visit every slot there (descriptors._chunks).
            arrays.pop("pair_count", None)
            arrays.pop("trip_count", None)
        self.arrays = self.ff.to_device(arrays, self.layout)  # on the CPU: used in place, once for all devices
        if self.on_device:
            self._lists = self.ff.device_lists(self.layout, self.species, self.atoms.pbc, positions, cell)
            key = ("lists", self.layout, self._lists.sizes)
            if key not in self._compiled:
                self._compiled[key] = jax.jit(self._lists)
            lists, ok = self._compiled[key](jnp.asarray(positions), jnp.asarray(cell))
            if not bool(ok):
                raise MLMDError("internal: the device neighbour lists do not fit the capacities of the host build "
                                "at the same positions; run with neighbours='host' and report this")
            self.arrays.update(self.ff.to_device({k: np.asarray(v) for k, v in lists.items()}, self.layout))
        self.reference = (positions, cell)
        self.rebuilds += 1

    def _block(self, layout: Layout, args: tuple):
        """(the block compiled for ``layout``, seconds spent compiling it now). Compiled ahead of its first call,
        so that compile time is measured alone: the first block's steps count as run time, which
        ``atom_steps_per_s`` divides by (timing the first call counted them as compile time)."""
        key = ("block", layout, self._lists.sizes if self.on_device else None,
               tuple(sorted((k, str(v.dtype)) for k, v in self.arrays.items())))
        if key in self._compiled:
            return self._compiled[key], 0.0
        t0 = time.perf_counter()
        # On a GPU the rebuilt lists may take the place of the old ones (donated); on the CPU the old ones alias
        # host memory (ForceField.to_device), which XLA must not write into.
        donate = (3,) if self.on_device and jax.default_backend() != "cpu" else ()
        self._compiled[key] = jax.jit(self._make_block(layout), donate_argnums=donate).lower(*args).compile()
        seconds = time.perf_counter() - t0
        _return_freed_memory()
        return self._compiled[key], seconds

    def _block_args(self, state: integ.MDState, target: int, key, initial: bool) -> tuple:
        """The arguments of a block call (see :meth:`_make_block`): from ``state`` up to step ``target``, with the
        current neighbour arrays and their reference positions and cell."""
        fixed, lists = self._split_arrays()
        return (state, self.constants, fixed, lists, jnp.asarray(self.reference[0]), jnp.asarray(self.reference[1]),
                jnp.asarray(target), key, jnp.bool_(initial))

    def _split_arrays(self) -> tuple[dict, dict]:
        """(arrays fixed during a block, neighbour lists the block rebuilds: empty off the device route)."""
        if not self.on_device:
            return self.arrays, {}
        lists = {k: v for k, v in self.arrays.items() if k in LIST_KEYS}
        return {k: v for k, v in self.arrays.items() if k not in LIST_KEYS}, lists

    def _make_block(self, layout: Layout):
        ff, kind, periodic = self.ff, self.kind, self.periodic
        length = int(self.settings["block"])
        anisotropic = self.settings["barostat"] == "anisotropic"
        variable_cell = kind == "npt"
        stop_extrapolation = self.settings["on_extrapolation"] == "stop"
        spread_limit = self.settings["max_force_spread_eV_A"]
        spread_limit = math.inf if spread_limit is None else float(spread_limit)
        max_temperature = self.max_temperature
        dof = max(self.dof, 1)

        on_device, rebuild_lists = self.on_device, self._lists

        def block(state, constants, fixed, lists, ref_R, ref_h, target, key, initial):
            """Up to ``length`` steps from ``state`` with the neighbour lists built at (ref_R, ref_h). Off the device
            route ``lists`` is empty (``fixed`` holds every array) and a step leaving the skin ends the block; on it
            the lists are rebuilt here (the step is then taken again) and come back with their reference. With
            ``initial`` true, only the force call at ``state``'s positions, unchecked (the starting state)."""
            params = constants["potential"]
            skipped = jax.eval_shape(
                lambda: ff.compute({**fixed, **lists}, layout, state.positions, state.cell, params))

            def advance(s, lists, ref_R, ref_h):
                def force(R, h):
                    # Every integrator evaluates forces once, at the step's final positions and cell, which the block
                    # checks below; a step that leaves the skin is rejected whatever its forces. So it is not
                    # computed: that saves one force call per neighbour rebuild (1 step in ~8 for water at a 0.5 Å
                    # skin).
                    valid = neighbours_valid(ff, R, h, ref_R, ref_h, variable_cell)
                    zeros = lambda: jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), skipped)  # noqa: E731
                    return jax.lax.cond(valid, lambda: ff.compute({**fixed, **lists}, layout, R, h, params), zeros)

                step_fn = integ.make_step(kind, force, anisotropic)
                return step_fn(s, constants, jax.random.fold_in(key, s.step), initial)

            def rebuilt_lists(R, h, lists):
                new, ok = rebuild_lists(R, h)
                return jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a.astype(b.dtype), b), new, lists), ok

            def body(carry, _):
                s, active, code, (lists, ref_R, ref_h, fresh, count) = carry
                new = jax.lax.cond(active, lambda x: advance(x, lists, ref_R, ref_h), lambda x: x, s)
                kinetic = integ.kinetic_energy(new.momenta, constants["masses"], constants["free"])
                temperature = 2.0 * kinetic / (dof * units.kB)
                finite = jnp.isfinite(new.energy) & jnp.all(jnp.isfinite(new.forces)) & jnp.isfinite(kinetic)
                valid = neighbours_valid(ff, new.positions, new.cell, ref_R, ref_h, variable_cell)
                checks = [~valid, ~finite, temperature > max_temperature,
                          stop_extrapolation & (jnp.max(new.extrapolation) > 0),
                          jnp.max(new.force_std) > spread_limit]
                reasons = [_NEIGHBOURS, _NAN, _HOT, _EXTRAPOLATION, _SPREAD]
                reason = jnp.where(initial, jnp.int32(0), jnp.select(checks, [jnp.int32(r) for r in reasons],
                                                                      jnp.int32(0)))
                accept = active & (reason == 0)
                rebuilt = jnp.bool_(False)
                if on_device:
                    # Rebuilt at the last accepted state, once: a step that leaves fresh lists at once ends the block
                    # (the host then decides, as off the device route). Lists that do not fit also end it.
                    retry = active & (reason == _NEIGHBOURS) & ~fresh
                    lists, ok = jax.lax.cond(retry, lambda: rebuilt_lists(s.positions, s.cell, lists),
                                             lambda: (lists, jnp.bool_(False)))
                    rebuilt = retry & ok
                    ref_R = jnp.where(rebuilt, s.positions, ref_R)
                    ref_h = jnp.where(rebuilt, s.cell, ref_h)
                    fresh = rebuilt | (fresh & ~accept)
                    count = count + rebuilt.astype(count.dtype)
                    reason = jnp.where(rebuilt, jnp.int32(0), reason)
                s = jax.tree_util.tree_map(lambda a, b: jnp.where(accept, a, b), new, s)
                code = jnp.where(active & ~accept & (reason != 0), reason, code)
                active = (accept | rebuilt) & (s.step < target) & ~initial
                row = _thermo_row(kind, s, constants, periodic, dof)
                return (s, active, code, (lists, ref_R, ref_h, fresh, count)), (accept, row)

            neighbours = (lists, ref_R, ref_h, jnp.bool_(False), jnp.int32(0))
            init = (state, state.step < target, jnp.int32(0), neighbours)
            (state, _, code, neighbours), (accepted, rows) = jax.lax.scan(body, init, None, length=length)
            lists, ref_R, ref_h, _, count = neighbours
            return state, code, accepted, rows, lists, ref_R, ref_h, count

        return block

    # -- the loop ----------------------------------------------------------------------------------------
    def run(self, steps: int, workdir, callbacks, progress: bool, fresh: bool) -> MDResult:
        start = time.perf_counter()
        out = _Outputs(workdir, self.settings, fresh=fresh, restart_step=self.step)
        compile_s = 0.0
        compiled_before = len(self._compiled)
        if self.state is None:
            self.state, compile_s = self._initial_state()
        self.settings["requested_until"] = self.step + steps
        until = self.step + steps
        if fresh:
            row = np.asarray(_thermo_row(self.kind, self.state, self.constants, self.periodic, max(self.dof, 1)))
            out.log_rows([row], self._log_interval(), callbacks, frame_atoms=self._frame(row))
            out.trajectory_frame(self._frame(row))
        key = jax.random.PRNGKey(self.settings["seed"])
        bar = _progress(progress, steps)
        taken, stalled = 0, False
        stopped = None
        try:
            while self.step < until and not out.stop_requested:
                target = self._next_target(until)
                args = self._block_args(self.state, target, key, initial=False)
                block, seconds = self._block(self.layout, args)
                compile_s += seconds
                state, code, accepted, rows, lists, ref_R, ref_h, count = block(*args)
                del args  # holds the neighbour arrays: they must be gone before a rebuild builds new ones
                if self.on_device:
                    self.arrays.update(lists)
                    self.reference = (np.asarray(ref_R), np.asarray(ref_h))
                    self.rebuilds += int(count)
                    self.device_rebuilds += int(count)
                del lists
                code = int(code)
                accepted = np.asarray(accepted)
                rows = np.asarray(rows)[accepted]
                done = int(accepted.sum())
                self.state = state
                self.step = int(state.step)
                taken += done
                if bar is not None:
                    bar.update(done)
                self._check_extrapolation(rows)
                frame = self._frame(rows[-1]) if done and self._is_frame_step(self.step) else None
                out.log_rows(rows, self._log_interval(), callbacks, frame_atoms=frame)
                if done:
                    out.trajectory_frame(frame)
                    if self._is_restart_step(self.step) or self.step >= until:
                        out.restart(self)
                if out.stop_requested:
                    break
                if code == _NEIGHBOURS:
                    if done == 0 and stalled:
                        stopped = _JUMP
                        break
                    stalled = done == 0
                    self._rebuild(state.positions, state.cell)
                elif code:
                    stopped = code
                    break
                else:
                    stalled = False
        finally:
            if bar is not None:
                bar.close()
            out.close()
        if (stopped is not None or out.stop_requested) and out.workdir is not None:
            out.restart(self)  # where the run ended, so resume() continues from there
        wall = time.perf_counter() - start
        result = MDResult(
            atoms=self._atoms(), thermo=out.thermo(), trajectory=out.frames(), steps=taken, wall_s=wall,
            rebuilds=self.rebuilds, device_rebuilds=self.device_rebuilds, compile_s=compile_s,
            compilations=sum(1 for key in list(self._compiled)[compiled_before:] if key[0] == "block"),
            atom_steps_per_s=taken * len(self.atoms) / max(wall - compile_s, 1e-9), workdir=out.workdir,
            stopped=_REASONS.get(stopped) if stopped else (_BY_CALLBACK if out.stop_requested else None),
            settings=dict(self.settings), compute=self.ff.describe(self.layout, self.route))
        if stopped is not None:
            where = f"; restart written in {out.workdir}" if out.workdir else ""
            forces = np.linalg.norm(np.asarray(self.state.forces), axis=1)
            detail = f" (largest force {forces.max():.3g} eV/Å on atom {int(forces.argmax())})"
            raise MDStoppedError(f"MD stopped at step {self.step} (t = {self._time_fs():.1f} fs): {_REASONS[stopped]}"
                                 f"{detail}. Fix: {_FIXES[stopped]}{where}. The run up to the last good step is in "
                                 ".result.", result)
        return result

    def _log_interval(self) -> int:
        return int(self.settings["log_interval"])

    def _next_target(self, until: int) -> int:
        targets = [until, self.step + int(self.settings["block"])]
        for key in ("trajectory_interval", "restart_interval"):
            interval = int(self.settings[key])
            if interval > 0:
                targets.append((self.step // interval + 1) * interval)
        return min(targets)

    def _is_frame_step(self, step: int) -> bool:
        interval = int(self.settings["trajectory_interval"])
        return interval > 0 and step % interval == 0

    def _is_restart_step(self, step: int) -> bool:
        interval = int(self.settings["restart_interval"])
        return interval > 0 and step % interval == 0

    def _time_fs(self) -> float:
        return self.step * self.settings["timestep_fs"]

    def _check_extrapolation(self, rows: np.ndarray) -> None:
        if self.settings["on_extrapolation"] != "warn" or self._warned_extrapolation or not len(rows):
            return
        column = LOG_COLUMNS.index("max_extrapolation")
        hits = np.nonzero(rows[:, column] > 0)[0]
        if hits.size:
            self._warned_extrapolation = True
            warnings.warn(f"MD step {int(rows[hits[0], 0])}: atoms have symmetry functions outside the training "
                          "range (extrapolation: forces are unreliable; add such structures to the training data, "
                          "or use on_extrapolation='stop'). Warned once per run.", ExtrapolationWarning, stacklevel=4)

    def _atoms(self, row: np.ndarray | None = None) -> Atoms:
        s = self.state
        atoms = Atoms(numbers=self.atoms.numbers, positions=np.asarray(s.positions), cell=np.asarray(s.cell),
                      pbc=self.atoms.pbc)
        atoms.set_momenta(np.asarray(s.momenta), apply_constraint=False)
        if not self.free.all():
            atoms.set_constraint(FixAtoms(indices=np.nonzero(~self.free)[0]))
        results = {"energy": float(s.energy), "free_energy": float(s.energy), "forces": np.asarray(s.forces)}
        if self.periodic:
            virial = np.asarray(s.virial)
            t = 0.5 * (virial + virial.T) / atoms.get_volume()
            results["stress"] = np.array([t[0, 0], t[1, 1], t[2, 2], t[1, 2], t[0, 2], t[0, 1]])
        atoms.calc = SinglePointCalculator(atoms, **results)
        atoms.info.update(step=self.step, time_fs=self._time_fs())
        if row is not None:
            atoms.info["temperature_K"] = float(row[LOG_COLUMNS.index("temperature_K")])
        return atoms

    def _frame(self, row) -> Atoms | None:
        return self._atoms(np.asarray(row)) if self._is_frame_step(self.step) else None

    # -- restart -------------------------------------------------------------------------------------------
    def restart_arrays(self) -> dict:
        s = self.state
        arrays = {name: np.asarray(getattr(s, name)) for name in integ.MDState._fields}
        arrays.update(numbers=self.atoms.numbers, pbc=self.atoms.pbc, free=self.free,
                      reference_positions=self.reference[0], reference_cell=self.reference[1],
                      layout=np.array(_layout_to_json(self.layout)), settings=np.array(json.dumps(self.settings)))
        return arrays

    def load(self, saved) -> None:
        self._rebuild(saved["reference_positions"], saved["reference_cell"], _layout_from_json(str(saved["layout"])))
        self.rebuilds = 0
        fields = {name: jnp.asarray(saved[name]) for name in integ.MDState._fields}
        self.state = integ.MDState(**fields)
        self.step = int(saved["step"])


@lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, musl)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None


def _return_freed_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim(0)``; nothing elsewhere).

    Why, after compiling an MD block: XLA's compiler frees what it allocated, but the freed pages stay in the
    process (glibc keeps them for reuse), and the block's buffers, allocated next, come on top of them. Measured
    (69,120 atoms of water, float64, 2 devices, compilation cache off, ``ru_maxrss``): peak 43.4 -> 40.1 KB/atom.
    Costs a few milliseconds per compilation."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _thermo_row(kind: str, s: integ.MDState, c: dict, periodic: bool, dof: int):
    """One log row (see LOG_COLUMNS) from a state (JAX)."""
    kinetic = integ.kinetic_energy(s.momenta, c["masses"], c["free"])
    total = s.energy + kinetic
    conserved = total + integ.extended_energy(kind, s, c)
    temperature = 2.0 * kinetic / (dof * units.kB)
    if periodic:
        volume = jnp.abs(jnp.linalg.det(s.cell))
        tensor = (integ.kinetic_tensor(s.momenta, c["masses"], c["free"]) - s.virial) / volume / units.GPa
        voigt = jnp.stack([tensor[0, 0], tensor[1, 1], tensor[2, 2], tensor[1, 2], tensor[0, 2], tensor[0, 1]])
        pressure = jnp.trace(tensor) / 3.0
    else:
        volume = pressure = jnp.array(jnp.nan)
        voigt = jnp.full(6, jnp.nan)
    time_fs = s.step * (c["dt"] / units.fs)
    head = jnp.stack([s.step.astype(jnp.float64), time_fs, s.energy, kinetic, total, conserved, temperature,
                      pressure, volume])
    tail = jnp.stack([jnp.max(s.extrapolation).astype(jnp.float64), jnp.max(s.force_std)])
    return jnp.concatenate([head, voigt, tail])


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="step", desc="MD")


class _Outputs:
    """Log, trajectory and restart files (or memory when no workdir)."""

    def __init__(self, workdir, settings: dict, fresh: bool, restart_step: int) -> None:
        self.workdir = Path(workdir) if workdir is not None else None
        self.settings = settings
        self.stop_requested = False  # a callback returned True
        self._rows: list[np.ndarray] = []
        self._frames: list[Atoms] = []
        self._log = self._traj = None
        if self.workdir is None:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        log_path, traj_path = self.workdir / "md.log", self.workdir / "md.traj"
        if fresh:
            if (self.workdir / "restart.npz").exists():
                raise MLMDError(f"{self.workdir} holds a run already (restart.npz); use resume() or another workdir")
            with open(log_path, "w") as handle:
                handle.write("# " + " ".join(LOG_COLUMNS) + "\n")
            self._traj = Trajectory(traj_path, "w")
        else:
            _truncate_log(log_path, restart_step)
            _truncate_trajectory(traj_path, restart_step)
            self._traj = Trajectory(traj_path, "a")
        self._log = open(log_path, "a")  # noqa: SIM115 (kept open for the run, closed in close())
        (self.workdir / "settings.json").write_text(json.dumps(settings, indent=1))

    def log_rows(self, rows, interval: int, callbacks, frame_atoms: Atoms | None) -> None:
        """Log ``rows`` every ``interval`` steps and pass each to the callbacks (one returning True asks to stop)."""
        selected = [r for r in rows if interval > 0 and int(r[0]) % interval == 0]
        for k, row in enumerate(selected):
            self._rows.append(np.asarray(row))
            if self._log is not None:
                self._log.write(" ".join(_format(v) for v in row) + "\n")
            if callbacks:
                event = dict(zip(LOG_COLUMNS, (float(v) for v in row), strict=True))
                if frame_atoms is not None and k == len(selected) - 1 and int(row[0]) == frame_atoms.info["step"]:
                    event["atoms"] = frame_atoms
                for callback in callbacks:
                    if callback(event) is True:
                        self.stop_requested = True
        if self._log is not None:
            self._log.flush()

    def trajectory_frame(self, atoms: Atoms | None) -> None:
        if atoms is None:
            return
        if self._traj is not None:
            self._traj.write(atoms)
        else:
            self._frames.append(atoms)

    def restart(self, engine: _Engine) -> None:
        if self.workdir is None:
            return
        self.settings.update(engine.settings)
        _atomic_save(self.workdir / "restart.npz", **engine.restart_arrays())

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._traj is not None:
            self._traj.close()
            self._traj = None

    def thermo(self) -> dict[str, np.ndarray]:
        if self.workdir is not None:
            return read_log(self.workdir / "md.log")
        data = np.array(self._rows) if self._rows else np.zeros((0, len(LOG_COLUMNS)))
        return {name: data[:, k] for k, name in enumerate(LOG_COLUMNS)}

    def frames(self) -> Sequence[Atoms]:
        """In memory, or a lazy reader of md.traj (frames are read when indexed, so long runs fit)."""
        if self.workdir is None:
            return self._frames
        path = self.workdir / "md.traj"
        return Trajectory(path, "r") if path.exists() and path.stat().st_size else []


def _format(value: float) -> str:
    """Shortest text that reads back to the same float (the log loses no precision)."""
    return repr(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(float(value))


def _truncate_log(path: Path, step: int) -> None:
    """Drop log rows after ``step`` (written after the restart file by a run that was killed)."""
    if not path.exists():
        raise MLMDError(f"{path} is missing; cannot resume the log of this run")
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.startswith("#") or (line.strip() and int(float(line.split()[0])) <= step)]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(kept))


def _truncate_trajectory(path: Path, step: int) -> None:
    """Drop trajectory frames after ``step``, rewriting the file only when needed (atomically)."""
    if not path.exists() or path.stat().st_size == 0:
        return
    from ase.io import read

    frames = read(path, ":")
    kept = [a for a in frames if int(a.info.get("step", -1)) <= step]
    if len(kept) != len(frames):
        with atomic_path(path) as tmp, Trajectory(tmp, "w") as writer:
            for atoms in kept:
                writer.write(atoms)
