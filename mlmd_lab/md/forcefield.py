"""The force evaluation the MD engine integrates: neighbour data on the host (or rebuilt in JAX on a GPU),
energy/forces/virial in JAX.

A :class:`ForceField` wraps a potential (an :class:`~mlmd_lab.potentials.model.HDNNP`, an
:class:`~mlmd_lab.train.ensemble.Ensemble`, or the :class:`LennardJones` pair potential used for teaching and
for fast statistical tests of the integrators) behind two calls:

- :meth:`ForceField.build` (host, numpy): padded neighbour data with a skin, in the potential's units;
- :meth:`ForceField.compute` (pure JAX, jit-able): energy (eV), forces (eV/Å), virial (eV) and the safety
  signals (symmetry functions outside the training range per atom; committee force uncertainty per atom in
  eV/Å, calibrated with the ensemble's fitted scale, and the raw spread) for positions and cell in Å, using
  neighbour data built earlier;
- :meth:`ForceField.device_lists` (JAX): the same lists rebuilt inside compiled code, into the capacities of a
  host build (:mod:`mlmd_lab.potentials.device_neighbours`); :meth:`ForceField.neighbour_route` picks the route.

Why not jax-md's ``partition``: jax-md 0.2.8 (the newest release) does not import with JAX 0.10
(``jax.lib.xla_bridge`` is gone), and its neighbour lists have no triplets, which Behler–Parrinello angular
functions need. The neighbour data here are the potential's own (vesin pairs, numba triplets), kept valid
by the engine's skin test (see :func:`neighbours_valid`, the same rule as the ASE calculator's).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from ase import Atoms

from mlmd_lab.errors import MLMDError
from mlmd_lab.potentials.descriptors import accumulator_dtype, cpu_shards, device_arrays
from mlmd_lab.potentials.device_neighbours import DeviceNeighbours, unsuitable
from mlmd_lab.potentials.model import HDNNP, evaluate
from mlmd_lab.potentials.neighbours import Layout, NeighbourBuilder, skin_holds


@dataclass(frozen=True)
class LennardJones:
    """Shifted-force Lennard-Jones pair potential (energy and force go to zero at the cutoff).

    u(r) = 4 eps [(s/r)^12 - (s/r)^6], shifted so that u(rc) = u'(rc) = 0. One (epsilon, sigma) for all
    elements. Defaults are argon (epsilon 0.0104 eV, sigma 3.40 Å, cutoff 2.5 sigma).

    Args:
        epsilon: well depth in eV.
        sigma: length in Å.
        cutoff: cutoff radius in Å (default 2.5 sigma).
    """

    epsilon: float = 0.0104
    sigma: float = 3.40
    cutoff: float | None = None

    @property
    def rc(self) -> float:
        return float(self.cutoff if self.cutoff is not None else 2.5 * self.sigma)


@dataclass
class ForceField:
    """A potential prepared for MD (eV and Å at the boundary; model units inside).

    Built with :func:`forcefield`; see the module docstring.
    """

    elements: tuple[str, ...]
    cutoff: float  # Å, the largest interaction range (without skin)
    skin: float  # Å
    length_factor: float  # model length unit -> Å
    energy_factor: float  # model energy unit -> eV
    dtype: str
    builder: NeighbourBuilder
    members: list = field(default_factory=list)  # [(energy_fn, params)]
    far: float = 0.0
    is_ensemble: bool = False
    single_kind: bool = False  # every element is the same kind (pair potentials such as LennardJones)
    source: object = None
    force_scale: np.ndarray | None = None  # (E,) raw committee spread -> calibrated uncertainty, per element
    _compiled: dict = field(default_factory=dict, repr=False)
    _parameters: dict | None = field(default=None, repr=False)  # parameters(), made on first use

    def species(self, atoms: Atoms) -> np.ndarray:
        """Element index of each atom; a clear error for elements the potential does not know."""
        if self.single_kind:
            return np.zeros(len(atoms), np.int64)
        index = {e: k for k, e in enumerate(self.elements)}
        symbols = atoms.get_chemical_symbols()
        unknown = sorted(set(symbols) - set(index))
        if unknown:
            raise MLMDError(f"the potential knows {list(self.elements)}, the structure also has {unknown}; "
                            "use a potential trained for these elements")
        return np.array([index[s] for s in symbols], np.int64)

    def build(self, positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, species: np.ndarray,
              like: Layout | None = None, headroom: float = 1.0, spare: bool = False) -> tuple[dict, Layout]:
        """Padded neighbour arrays (model units, numpy) and their static layout, within cutoff + skin.

        Args:
            positions: (N, 3) Å, unwrapped positions are fine (image shifts follow them).
            cell: (3, 3) Å, rows are cell vectors.
            pbc: (3,) periodicity.
            species: (N,) element indices.
            like: a previous layout to reuse when the new lists fit (no recompilation).
            headroom: capacities for this many times the counts (for lists later rebuilt on the device).
            spare: a fresh layout gets spare room (:data:`~mlmd_lab.potentials.neighbours.SPARE`): fewer
                compilations, no extra time per step (the descriptor loops stop at the real counts).
        """
        lf = self.length_factor
        graph = self.builder.build_one(np.asarray(positions) / lf, np.asarray(cell) / lf, np.asarray(pbc), species,
                                       like, headroom, spare)
        arrays = graph.arrays()  # lean: no trip_i / trip_mask (the descriptors derive them)
        dt = np.float64 if self.dtype == "float64" else np.float32
        arrays = {k: (v.astype(dt) if v.dtype == np.float64 else v) for k, v in arrays.items()}
        return arrays, graph.layout

    def _with_positions(self, energy_fn, arrays: dict, layout: Layout, positions, cell) -> dict:
        """``arrays`` with positions (padded to the layout) and the cell in model units: float64 for potentials that
        build pair vectors from positions (exact differences also in the mixed mode), else the model's dtype."""
        dt = jnp.float64 if self.dtype == "float64" else jnp.float32
        if hasattr(energy_fn, "at_positions"):
            dt = accumulator_dtype(dt)
        lf = self.length_factor
        R = jnp.zeros((layout.n_atoms, 3), dt).at[: positions.shape[0]].set((positions / lf).astype(dt))
        return dict(arrays, positions=R, cells=(cell / lf).astype(dt)[None])

    def to_device(self, arrays: dict, layout: Layout) -> dict:
        """:meth:`build`'s arrays as JAX arrays for :meth:`compiled`, without copies on the CPU
        (:func:`~mlmd_lab.potentials.descriptors.device_arrays`); ``arrays`` is emptied."""
        if self.single_kind:
            return {key: jax.device_put(arrays.pop(key)) for key in list(arrays)}
        return device_arrays(arrays, layout)

    def parameters(self) -> dict:
        """What :meth:`compute` reads of the potential, as a pytree of JAX arrays: ``members``, the list of the
        members' parameters, and ``force_scale`` (the calibration, or None). Compiled code takes it as an argument
        rather than baking the weights in as constants, so that potentials of one kind (a retrained committee, the
        next version of a model) run the same compiled program, which the persistent compilation cache
        (:mod:`mlmd_lab.jaxconfig`) then loads instead of compiling again (``benchmarks/bench_md.py
        --committee``)."""
        if self._parameters is None:
            scale = None if self.force_scale is None else jnp.asarray(self.force_scale, jnp.float64)
            self._parameters = {"members": [params for _, params in self.members], "force_scale": scale}
        return self._parameters

    def compute(self, arrays: dict, layout: Layout, positions, cell, params: dict | None = None) -> dict:
        """Energy (eV), forces (N, 3) eV/Å, virial (3, 3) eV (= dE/d strain, ASE's convention: stress = virial / V),
        extrapolation (N,) counts, force_std (N,) eV/Å, the calibrated committee force uncertainty (raw spread
        times the ensemble's per-element :attr:`force_scale`), and force_std_raw (N,) eV/Å, the raw spread
        sqrt(mean_m |F_m - F_mean|^2) (both zero for a single potential). Pure JAX. ``params``: :meth:`parameters`
        (the default), passed in by compiled callers."""
        params = self.parameters() if params is None else params
        n = positions.shape[0]
        lf, ef = self.length_factor, self.energy_factor
        outs = self._member_outputs(params["members"], arrays, layout, positions, cell)
        energies = outs["energy"][:, 0].astype(jnp.float64) * ef
        forces = outs["forces"][:, :n].astype(jnp.float64) * (ef / lf)
        virials = outs["virial"][:, 0].astype(jnp.float64) * ef
        mean_forces = jnp.mean(forces, axis=0)
        spread = jnp.sqrt(jnp.mean(jnp.sum((forces - mean_forces) ** 2, axis=2), axis=0))
        calibrated = spread
        if params["force_scale"] is not None:
            calibrated = spread * params["force_scale"][arrays["species"][:n]]
        extrapolation = jnp.max(outs["extrapolation"][:, :n], axis=0)
        return {"energy": jnp.mean(energies), "forces": mean_forces, "virial": jnp.mean(virials, axis=0),
                "extrapolation": extrapolation, "force_std": calibrated, "force_std_raw": spread}

    def _member_outputs(self, members: list, arrays: dict, layout: Layout, positions, cell) -> dict:
        """Every member's :func:`~mlmd_lab.potentials.model.evaluate` results (model units), stacked on a leading
        member axis: ``energy`` (M, 1), ``forces`` (M, N, 3), ``virial`` (M, 1, 3, 3), ``extrapolation`` (M, N).
        ``members``: :meth:`parameters`' ``members``. (Mapping one program over the stacked weights with
        ``jax.vmap`` was measured and is not faster: ``benchmarks/bench_md.py --committee``.)"""
        keys = ("energy", "forces", "virial", "extrapolation")
        outs = [evaluate(fn, self.far, params, self._with_positions(fn, arrays, layout, positions, cell), layout, True)
                for (fn, _), params in zip(self.members, members, strict=True)]
        return {key: jnp.stack([o[key] for o in outs]) for key in keys}

    def compiled(self, layout: Layout):
        """:meth:`compute` jit-compiled for ``layout``: f(arrays, positions, cell), compiled once per layout (the
        parameters are an argument of the compiled program, see :meth:`parameters`)."""
        if layout not in self._compiled:
            jitted = jax.jit(lambda arrays, R, h, params: self.compute(arrays, layout, R, h, params))
            self._compiled[layout] = partial(jitted, params=self.parameters())
        return self._compiled[layout]

    def describe(self, layout: Layout | None, lists: str = "neighbour lists on the host") -> str:
        """Where :meth:`compute` runs for ``layout``: the JAX platform and how many CPU devices share the descriptor
        loops (:func:`~mlmd_lab.potentials.descriptors.cpu_shards`), then ``lists``, where the neighbour lists are
        built (:meth:`neighbour_route`)."""
        platform = jax.default_backend()
        if platform == "cpu" and layout is not None and not self.single_kind:
            n = cpu_shards(layout)
            split = f"descriptor loops split over {n} JAX CPU devices" if n > 1 else "descriptor loops on one device"
            return f"cpu: {split}; {lists}"
        return f"{platform}: {lists}"

    def neighbour_route(self, atoms: Atoms, requested: str = "auto") -> tuple[bool, str]:
        """Where MD rebuilds the neighbour lists: (True for the device, the reason in words).

        ``requested``: "auto" (the device on a GPU when the structure allows it, else the host: on the CPU the
        host build is faster, benchmarks/bench_md.py), "host", or "device" (refused with the reason when the
        structure does not allow it, see :func:`~mlmd_lab.potentials.device_neighbours.unsuitable`)."""
        if requested not in ("auto", "host", "device"):
            raise MLMDError(f"neighbours must be 'auto', 'host' or 'device', not {requested!r}")
        lf = self.length_factor
        why_not = unsuitable(self.builder, atoms.cell.array / lf, atoms.pbc, len(atoms))
        if requested == "device" and why_not:
            raise MLMDError(f"neighbours='device' cannot serve this structure: {why_not}; use neighbours='host' "
                            "(or a larger cell)")
        if requested == "host":
            return False, "neighbour lists on the host (as asked)"
        if requested == "device":
            return True, "neighbour lists rebuilt on the device (JAX, inside the MD block; as asked)"
        if jax.default_backend() == "cpu":
            return False, "neighbour lists on the host (the faster route on the CPU)"
        if why_not:
            return False, f"neighbour lists on the host ({why_not})"
        return True, "neighbour lists rebuilt on the device (JAX, inside the MD block)"

    def device_lists(self, layout: Layout, species: np.ndarray, pbc, positions: np.ndarray, cell: np.ndarray):
        """A jit-able f(positions (N, 3) Å, cell (3, 3) Å) -> (index arrays in ``layout``, ok) that rebuilds the
        lists in JAX (:class:`~mlmd_lab.potentials.device_neighbours.DeviceNeighbours`, sized for ``positions``
        and ``cell``); ``f.sizes`` holds its static sizes."""
        lf = self.length_factor
        lists = DeviceNeighbours(self.builder, layout, species, pbc, np.asarray(positions) / lf,
                                 np.asarray(cell) / lf)

        def build(R, h):
            return lists(R / lf, h / lf)

        build.sizes = lists.sizes
        return build

    def single_point(self, atoms: Atoms) -> dict:
        """:meth:`compute` for one structure (numpy results; for checks and the first step)."""
        arrays, layout = self.build(atoms.positions, atoms.cell.array, atoms.pbc, self.species(atoms))
        arrays = self.to_device(arrays, layout)
        out = self.compiled(layout)(arrays, jnp.asarray(atoms.positions), jnp.asarray(atoms.cell.array))
        return {k: np.asarray(v) for k, v in out.items()}


def forcefield(potential, skin: float = 1.0, dtype: str | None = None) -> ForceField:
    """Prepare ``potential`` (HDNNP, Ensemble or LennardJones) for MD with a neighbour skin in Å.

    ``dtype`` ("float64" or "float32") overrides the potential's own evaluation precision. An ensemble's force
    calibration (:attr:`~mlmd_lab.train.ensemble.Ensemble.force_scale`) is applied to ``force_std``.
    """
    if skin < 0:
        raise MLMDError(f"skin must be >= 0 Å, got {skin}")
    if isinstance(potential, LennardJones):
        return _lennard_jones(potential, skin, dtype or "float64")
    members = getattr(potential, "members", None)
    models: Sequence[HDNNP] = list(members) if members is not None else [potential]
    if not all(isinstance(m, HDNNP) for m in models):
        raise MLMDError(f"cannot run MD with {type(potential).__name__}; give an HDNNP, an Ensemble, a "
                        "LennardJones, or a model name together with db=")
    if dtype is not None:
        models = [m.with_dtype(dtype) for m in models]
    first = models[0]
    return ForceField(
        elements=tuple(first.elements), cutoff=first.cutoff, skin=float(skin), length_factor=first.length_factor,
        energy_factor=first.energy_factor, dtype=first.dtype, builder=first.neighbour_builder(skin),
        members=[(m.energy_function(), m.parameters()) for m in models], far=first.padding_distance,
        is_ensemble=members is not None, source=potential, force_scale=_force_scale(potential))


def _force_scale(potential) -> np.ndarray | None:
    """An ensemble's per-element force calibration factors (None when uncalibrated or a single potential)."""
    scale = getattr(potential, "force_scale_array", None)
    if scale is None or getattr(potential, "calibration", None) is None:
        return None
    return np.asarray(scale(), np.float64)


def _lennard_jones(lj: LennardJones, skin: float, dtype: str) -> ForceField:
    rc, eps, sig = lj.rc, lj.epsilon, lj.sigma

    def pair_energy(r):
        def u(x):
            s6 = (sig / x) ** 6
            return 4.0 * eps * (s6 * s6 - s6)

        du = jax.grad(u)
        return u(r) - u(rc) - (r - rc) * du(rc)

    def energy_fn(params, arrays, d, layout):
        r = jnp.sqrt(jnp.sum(d * d, axis=1))
        inside = arrays["pair_mask"] & (r < rc)
        safe = jnp.where(inside, r, rc)
        pair = jnp.where(inside, pair_energy(safe), 0.0)
        atomic = 0.5 * jax.ops.segment_sum(pair, arrays["pair_i"], num_segments=layout.n_atoms)
        per_structure = jax.ops.segment_sum(atomic, arrays["atom_struct"], num_segments=layout.n_structures + 1)
        return per_structure[:-1], atomic, jnp.zeros(layout.n_atoms, jnp.int32)

    builder = NeighbourBuilder(1, rc, {}, skin=skin)
    ff = ForceField(elements=("*",), cutoff=rc, skin=float(skin), length_factor=1.0, energy_factor=1.0, dtype=dtype,
                    builder=builder, members=[(energy_fn, {})], far=2.0 * rc + 1.0, single_kind=True, source=lj)
    return ff


def neighbours_valid(ff: ForceField, positions, cell, reference_positions, reference_cell, variable_cell: bool):
    """True while neighbour data built at (reference_positions, reference_cell) still hold every pair and
    triplet within the cutoff (JAX; Å): :func:`mlmd_lab.potentials.neighbours.skin_holds` with this force
    field's cutoff and skin, the same rule the ASE calculator uses."""
    return skin_holds(positions, cell, reference_positions, reference_cell, ff.cutoff, ff.skin, variable_cell,
                      xp=jnp)
