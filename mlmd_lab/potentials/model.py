"""High-dimensional neural-network potential (Behler–Parrinello, second generation), n2p2-compatible.

E = sum_i E_{el(i)}(scaled G_i), with per-element networks. With n2p2's normalisation keys the networks
work in normalised energy units: E_model = (sum_i out_i) / conv_energy + N mean_energy + sum_i offset_el(i),
where E_model is in the potential's own energy unit (the unit of its training data; n2p2 files carry none,
so the caller names it). Forces are -dE/dr by automatic differentiation; the virial and stress come from the
same gradient with respect to the pair vectors.

At the boundaries everything is in ASE units (eV, Å, eV/Å, eV/Å³); inside, the potential's own units.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from ase import Atoms

from mlmd_lab.errors import MLMDError
from mlmd_lab.potentials import n2p2_files
from mlmd_lab.potentials.cutoff import cutoff_code
from mlmd_lab.potentials.descriptors import (
    DescriptorPlan,
    accumulator_dtype,
    pair_vectors,
    symmetry_functions,
    symmetry_functions_at,
)
from mlmd_lab.potentials.n2p2_files import N2P2Settings
from mlmd_lab.potentials.neighbours import Graph, Layout, NeighbourBuilder
from mlmd_lab.potentials.network import apply, flatten, init_layers, layer_sizes, unflatten
from mlmd_lab.potentials.symfunc import SymmetryFunction, sort_elements, sort_symmetry_functions
from mlmd_lab.units import energy_factor, length_factor

jax.config.update("jax_enable_x64", True)


class ExtrapolationWarning(UserWarning):
    """Symmetry functions outside the range seen in training: the prediction is an extrapolation."""


@dataclass
class HDNNP:
    """An n2p2-style HDNNP.

    Attributes:
        elements: elements by atomic number.
        functions: {element: symmetry functions in n2p2 order} (model length unit).
        networks: {element: [(W, b), ...]} float64 numpy arrays.
        scaling_stats: {element: (n_sf, 4) array of [min, max, mean, sigma] of each raw function}.
        settings: the ``input.nn`` settings (cutoff, scaling type, architecture, normalisation, offsets).
        energy_unit, length_unit: the potential's own units (names from :mod:`mlmd_lab.units`).
        dtype: "float64" (exact) or "float32" (faster; symmetry functions and networks in single precision).
        metadata: provenance (JSON-serialisable): training data query and frame ids, settings, errors, versions.
            Filled by :class:`mlmd_lab.train.Trainer`, stored by the potential database.
    """

    elements: tuple[str, ...]
    functions: dict[str, tuple[SymmetryFunction, ...]]
    networks: dict[str, list]
    scaling_stats: dict[str, np.ndarray]
    settings: N2P2Settings
    energy_unit: str = "eV"
    length_unit: str = "Angstrom"
    dtype: str = "float64"
    metadata: dict = field(default_factory=dict, compare=False)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_n2p2(cls, path: str | Path, energy_unit: str | None = None, length_unit: str | None = None,
                  dtype: str = "float64", *, units: str | tuple[str, str] | None = None) -> HDNNP:
        """Read n2p2's ``input.nn``, ``scaling.data`` and ``weights.NNN.data`` from a folder.

        n2p2 files carry no units. Name those the potential was trained in with ``units=("Ha", "Bohr")``
        (or ``energy_unit`` and ``length_unit``; names as in :mod:`mlmd_lab.units`). Without them, the units
        stated in ``input.nn`` comments are used, else inferred from the ``input.data*`` beside the potential
        when the evidence is clear (with a warning), else :class:`~mlmd_lab.errors.UnitsError`; see
        :mod:`mlmd_lab.potentials.n2p2_units`. The decision is in ``metadata["n2p2_units"]``.
        """
        from mlmd_lab.potentials.n2p2_units import resolve_units

        folder = Path(path)
        settings = n2p2_files.read_input_nn(folder / "input.nn")
        functions = sort_symmetry_functions(settings.symmetry_functions)
        for element in settings.elements:
            if element not in functions:
                raise MLMDError(f"{folder / 'input.nn'}: element {element} has no symmetry functions")
        n_sf = [len(functions[e]) for e in settings.elements]
        tables = n2p2_files.read_scaling(folder / "scaling.data", n_sf) if settings.scaling != "none" else [
            np.zeros((n, 4)) for n in n_sf]
        networks = {}
        for element, n in zip(settings.elements, n_sf, strict=True):
            sizes = layer_sizes(n, settings.hidden)
            weights_file = n2p2_files.weights_path(folder, element)
            values = n2p2_files.read_weights(weights_file)
            try:
                networks[element] = unflatten(values, sizes)
            except MLMDError as err:
                raise MLMDError(f"{weights_file}: {err}") from None
        # read with unit factors 1 (the files' own units) until the units are decided
        model = cls(elements=settings.elements, functions=functions, networks=networks,
                    scaling_stats=dict(zip(settings.elements, tables, strict=True)), settings=settings, dtype=dtype)
        decided = resolve_units(folder, model, units, energy_unit, length_unit)
        model = replace(model, energy_unit=decided.energy, length_unit=decided.length, _cache={})
        model.metadata["n2p2_units"] = decided.record()
        return model

    @classmethod
    def create(cls, elements: Sequence[str], functions: Sequence[SymmetryFunction] | None = None, *,
               cutoff: float = 6.0, hidden: Sequence[int] = (25, 25), activations: str = "ttl",
               cutoff_type: int | str = "poly2", cutoff_alpha: float = 0.0, scaling: str = "scalesigma",
               atom_energy: dict[str, float] | None = None, seed: int = 0,
               frames: Sequence[Atoms] | None = None, r_lower: float | None = None) -> HDNNP:
        """A new, untrained potential in eV and Å.

        Without ``functions``, a symmetry-function set is generated from the elements and ``cutoff`` (Å) by
        :func:`mlmd_lab.potentials.defaults.generate_symmetry_functions`, its innermost radial centre at
        ``r_lower`` (Å). ``r_lower`` is, in this order: the value given; taken from ``frames`` (the structures
        the potential is for) as the :class:`~mlmd_lab.train.Trainer` does, 0.9 x the shortest interatomic
        distance, at least 0.5 Å (:func:`~mlmd_lab.potentials.defaults.r_lower_from`); or, with neither,
        0.8 Å — right for molecules with O-H/C-H bonds, but in metals (nearest neighbours 2.5-3.5 Å) the
        innermost functions then see only the far tails of their Gaussians (values ~1e-25 and below, useless
        and below float32's range), so give ``frames`` or ``r_lower`` there. ``frames`` only choose
        ``r_lower``; scaling statistics start neutral (mean 0, sigma 1, range unbounded) until
        :meth:`fit_scaling` sets them from data.
        """
        elements = sort_elements(elements)
        if functions is None:
            from mlmd_lab.potentials.defaults import generate_symmetry_functions, r_lower_from

            if r_lower is None:
                r_lower = r_lower_from(frames, cutoff) if frames is not None else 0.8
            functions = generate_symmetry_functions(elements, cutoff, r_lower=r_lower)
        elif frames is not None or r_lower is not None:
            raise MLMDError("frames= and r_lower= choose the generated symmetry functions; with explicit "
                            "functions give neither (set each function's r_s and eta yourself)")
        by_element = sort_symmetry_functions(functions)
        missing = [e for e in elements if e not in by_element]
        if missing:
            raise MLMDError(f"no symmetry functions for element(s) {missing}")
        if len(activations) != len(hidden) + 1:
            raise MLMDError(f"activations {activations!r} needs {len(hidden) + 1} codes (hidden layers + output)")
        settings = N2P2Settings(elements=elements, symmetry_functions=list(functions),
                                cutoff_type=cutoff_code(cutoff_type), cutoff_alpha=float(cutoff_alpha),
                                scaling=scaling, hidden=tuple(int(h) for h in hidden), activations=activations,
                                atom_energy=dict(atom_energy or {}))
        rng = np.random.default_rng(seed)
        networks = {e: init_layers(layer_sizes(len(by_element[e]), hidden), rng, activations) for e in elements}
        stats = {e: _neutral_stats(len(by_element[e])) for e in elements}
        return cls(elements=elements, functions=by_element, networks=networks, scaling_stats=stats,
                   settings=settings)

    def to_n2p2(self, path: str | Path) -> Path:
        """Write ``input.nn``, ``scaling.data`` and ``weights.NNN.data`` into folder ``path`` (created).

        The files use the potential's own units (n2p2 files carry none; record them with the potential).
        """
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        settings = replace(self.settings, symmetry_functions=[sf for e in self.elements for sf in self.functions[e]])
        header = f"units: energy {self.energy_unit}, length {self.length_unit}"
        n2p2_files.write_input_nn(folder / "input.nn", settings, self.functions, header=header)
        n2p2_files.write_scaling(folder / "scaling.data", [self.scaling_stats[e] for e in self.elements])
        for element in self.elements:
            sizes = layer_sizes(len(self.functions[element]), self.settings.hidden)
            n2p2_files.write_weights(n2p2_files.weights_path(folder, element), flatten(self.networks[element]), sizes)
        return folder

    def to_lammps(self, path: str | Path, atoms: Atoms | None = None, **options) -> Path:
        """Write a ready LAMMPS run (``pair_style hdnnp``, package ML-HDNNP) into folder ``path``; returns it.

        The folder gets the n2p2 files (``hdnnp/``), ``data.lammps`` from ``atoms``, ``in.lammps`` (metal units,
        with the ``cflength``/``cfenergy`` conversion to this potential's units) and ``README.txt``. Options
        (``timestep_fs``, ``temperature_K``, ``steps``, ``ensemble`` = "nve"/"nvt"/"npt", ``thermo_every``,
        ``dump_every``, ``maxew``, ``pressure_bar``, ``seed``, ``vacuum``) are those of
        :func:`mlmd_lab.md.lammps.write_lammps`.
        """
        from mlmd_lab.md.lammps import write_lammps

        return write_lammps(self, path, atoms, **options)

    # ------------------------------------------------------------------ units and plan
    @property
    def energy_factor(self) -> float:
        """eV per model energy unit."""
        return energy_factor(self.energy_unit)

    @property
    def length_factor(self) -> float:
        """Å per model length unit."""
        return length_factor(self.length_unit)

    @property
    def cutoff(self) -> float:
        """Largest cutoff radius in Å."""
        return self.plan.max_cutoff * self.length_factor

    @property
    def plan(self) -> DescriptorPlan:
        if "plan" not in self._cache:
            self._cache["plan"] = DescriptorPlan(
                elements=self.elements, functions=tuple(self.functions[e] for e in self.elements),
                cutoff_type=self.settings.cutoff_type, cutoff_alpha=self.settings.cutoff_alpha)
        return self._cache["plan"]

    def neighbour_builder(self, skin: float = 0.0) -> NeighbourBuilder:
        """Neighbour-list builder for this model; ``skin`` in Å."""
        return NeighbourBuilder(len(self.elements), self.plan.max_cutoff, self.plan.angular_groups(),
                                skin=skin / self.length_factor)

    def species_of(self, atoms: Atoms) -> np.ndarray:
        """Element index of each atom (model order); error for elements the model does not know."""
        index = {e: k for k, e in enumerate(self.elements)}
        symbols = atoms.get_chemical_symbols()
        unknown = sorted(set(symbols) - set(index))
        if unknown:
            raise MLMDError(f"the potential knows {list(self.elements)}, the structure also has {unknown}")
        return np.array([index[s] for s in symbols], np.int64)

    def structure(self, atoms: Atoms) -> tuple:
        """(positions, cell, pbc, species) in model units for the neighbour builder."""
        lf = self.length_factor
        return (atoms.positions / lf, atoms.cell.array / lf, atoms.pbc.copy(), self.species_of(atoms))

    def graph(self, atoms_list: Sequence[Atoms], skin: float = 0.0, like: Graph | Layout | None = None) -> Graph:
        """Padded neighbour data of one or more structures (reuses ``like``'s shapes, a graph's or a layout, when
        they hold the structures)."""
        builder = self.neighbour_builder(skin)
        layout = like.layout if isinstance(like, Graph) else like
        return builder.build([self.structure(a) for a in atoms_list], layout)

    def batch_layout(self, atoms_list: Sequence[Atoms], batches: Sequence[Sequence[int]]) -> Layout:
        """The evaluation layout that holds every batch of structures (lists of indices into ``atoms_list``, all
        of one length): evaluating the batches in it (``graph(batch, like=layout)``) compiles once. See
        :meth:`~mlmd_lab.potentials.neighbours.NeighbourBuilder.holding`."""
        return self.neighbour_builder().holding([self.structure(a) for a in atoms_list], batches)

    # ------------------------------------------------------------------ evaluation
    def parameters(self) -> dict:
        """Trainable parameters and scaling constants as a JAX pytree (model dtype)."""
        dt = jnp.float64 if self.dtype == "float64" else jnp.float32
        s = self.settings
        params = {"networks": {}, "shift": {}, "factor": {}, "min": {}, "max": {}}
        for e in self.elements:
            stats = self.scaling_stats[e]
            shift, factor = _scaling_constants(s.scaling, stats, s.scale_min, s.scale_max)
            params["networks"][e] = [(jnp.asarray(W, dt), jnp.asarray(b, dt)) for W, b in self.networks[e]]
            params["shift"][e] = jnp.asarray(shift, dt)
            params["factor"][e] = jnp.asarray(factor, dt)
            # Tolerance for rounding: the same structure must not "extrapolate" from its own statistics.
            with np.errstate(over="ignore"):  # unfitted models hold +-max float: the range overflows to inf
                tol = 1e-9 * np.abs(stats[:, 1] - stats[:, 0]) + 1e-12 * np.maximum(np.abs(stats[:, 0]), 1.0)
                params["min"][e] = jnp.asarray(stats[:, 0] - tol, dt)
                params["max"][e] = jnp.asarray(stats[:, 1] + tol, dt)
        inv_conv, mean, offsets = self._energy_constants()
        # Energy constants stay float64 in the float32 (mixed) mode: the atom energies (~ -470 eV for O in Ha-based
        # water potentials) would otherwise carry float32 rounding of 3e-5 eV into every atomic energy.
        acc = accumulator_dtype(dt)
        params["energy"] = {"inv_conv": jnp.asarray(inv_conv, acc), "mean": jnp.asarray(mean, acc),
                            "offsets": jnp.asarray(offsets, acc)}
        return params

    def _energy_constants(self) -> tuple[float, float, list[float]]:
        """(1 / conv_energy, mean_energy, per-element offsets): traced, so models differing only in these
        share one compiled function (e.g. ensemble members)."""
        s = self.settings
        norm = s.conv_energy is not None and s.mean_energy is not None
        offsets = [float(s.atom_energy.get(e, 0.0)) for e in self.elements]
        return (1.0 / s.conv_energy if norm else 1.0, s.mean_energy if norm else 0.0, offsets)

    def _static_key(self) -> tuple:
        s = self.settings
        return (self.plan, s.scale_min, s.activations, s.normalize_nodes, self._far())

    def energy_function(self):
        """f(params, arrays, d, layout) -> (per-structure energies, per-atom energies, extrapolation counts).

        Energies in model units; d are pair vectors (P, 3) in model length units. :func:`evaluate` turns it
        into energies, forces and virials of a neighbour graph.
        """
        return _energy_function(*self._static_key())

    def _compiled(self):
        key = self._static_key()
        if key not in _COMPILED:
            _COMPILED[key] = jax.jit(partial(evaluate, self.energy_function(), self._far()),
                                     static_argnames=("layout", "forces"))
        return _COMPILED[key]

    @property
    def padding_distance(self) -> float:
        """Length (model unit) of the pair vector given to padded pair slots: beyond every cutoff (the ``far``
        argument of :func:`evaluate`)."""
        return self._far()

    def _far(self) -> float:
        return 2.0 * self.plan.max_cutoff + 1.0

    def evaluate_graph(self, graph: Graph, forces: bool = True, params: dict | None = None) -> dict:
        """Energies (B,), atomic energies (N,), forces (N, 3), virials (B, 3, 3) and extrapolation counts (N,),
        all in model units, for a padded graph (see :meth:`graph`)."""
        dt = np.float64 if self.dtype == "float64" else np.float32
        arrays = {k: (v.astype(dt, copy=False) if v.dtype == np.float64 else v) for k, v in graph.arrays().items()}
        if params is None:
            if "params" not in self._cache:
                self._cache["params"] = self.parameters()
            params = self._cache["params"]
        out = self._compiled()(params, arrays, layout=graph.layout, forces=forces)
        return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}

    def predict(self, atoms_list: Atoms | Sequence[Atoms], forces: bool = True, stress: bool = True,
                warn: bool = True) -> dict | list[dict]:
        """Energy (eV), free energy, per-atom energies (eV), forces (eV/Å) and stress (eV/Å³, Voigt) per structure.

        One ``Atoms`` gives one result (a dict); a sequence of them gives a list of results, in order (one
        batched evaluation). Each result also has ``extrapolation`` (per atom: number of symmetry functions
        outside the scaling range). An :class:`ExtrapolationWarning` is issued when any atom extrapolates.
        """
        single = isinstance(atoms_list, Atoms)
        atoms_list = [atoms_list] if single else list(atoms_list)
        out = self.evaluate_graph(self.graph(atoms_list), forces=forces or stress)
        results = self.results(out, atoms_list, forces=forces, stress=stress, warn=warn)
        return results[0] if single else results

    def results(self, out: dict, atoms_list: Sequence[Atoms], forces: bool = True, stress: bool = True,
                warn: bool = True) -> list[dict]:
        """Convert :meth:`evaluate_graph` output (model units) into per-structure ASE results (eV, Å)."""
        ef, lf = self.energy_factor, self.length_factor
        results, start = [], 0
        for s, atoms in enumerate(atoms_list):
            n = len(atoms)
            sl = slice(start, start + n)
            start += n
            energy = float(out["energy"][s]) * ef
            result = {"energy": energy, "free_energy": energy, "energies": out["atomic"][sl] * ef,
                      "extrapolation": out["extrapolation"][sl].astype(int)}
            if forces:
                result["forces"] = out["forces"][sl] * ef / lf
            if stress and atoms.pbc.all():
                result["stress"] = _voigt(out["virial"][s] * ef / atoms.get_volume())
            results.append(result)
            count = int((result["extrapolation"] > 0).sum())
            if warn and count:
                warnings.warn(
                    f"{count} of {n} atoms of {atoms.get_chemical_formula()} have symmetry functions outside the "
                    "training range (extrapolation: predictions are unreliable; add such structures to the training "
                    "data)", ExtrapolationWarning, stacklevel=3)
        return results

    def calculator(self, skin: float = 1.0):
        """An ASE calculator (eV, Å) evaluating this potential; ``skin`` (Å) lets MD reuse neighbour lists."""
        from mlmd_lab.potentials.calculator import HDNNPCalculator

        return HDNNPCalculator(self, skin=skin)

    def with_dtype(self, dtype: str) -> HDNNP:
        """A copy evaluating in ``dtype`` ("float64" or "float32").

        "float32" is the mixed mode: symmetry functions and networks in float32, while the sums over neighbours,
        the atomic energies with their offsets, the total energy, forces and virial are accumulated in float64.
        On the 1,080-atom water this gives the float64 energy to 2.5e-4 eV (0.8 eV when everything was float32)
        and forces to 1e-4 eV/Å."""
        if dtype not in ("float64", "float32"):
            raise MLMDError(f"dtype must be 'float64' or 'float32', not {dtype!r}")
        return replace(self, dtype=dtype, metadata=dict(self.metadata), _cache={})

    def fit_scaling(self, atoms_list: Sequence[Atoms]) -> None:
        """Set the scaling statistics (min, max, mean, sigma of every raw symmetry function) from structures."""
        values = self.raw_features(atoms_list)
        for e in self.elements:
            G = values[e]
            if G.shape[0] == 0:
                raise MLMDError(f"no atoms of {e} in the structures given to fit_scaling")
            self.scaling_stats[e] = np.stack([G.min(0), G.max(0), G.mean(0), G.std(0)], axis=1)
        self._cache.pop("params", None)

    def raw_features(self, atoms_list: Sequence[Atoms]) -> dict[str, np.ndarray]:
        """Unscaled symmetry functions {element: (n_atoms_of_element, n_sf)} over the structures."""
        graph = self.graph(list(atoms_list))
        arrays = {k: jnp.asarray(v) for k, v in graph.arrays().items()}
        d = pair_vectors(arrays, self._far())
        features = symmetry_functions(self.plan, graph.layout, arrays, d)
        species = graph.species
        return {e: np.asarray(features[c])[species == c] for c, e in enumerate(self.elements)}


#: Compiled evaluation functions by the model's static description (plan, scaling minimum, activations,
#: node normalisation, far distance): loading a saved potential of a known kind needs no new compilation.
_COMPILED: dict = {}


def _energy_function(plan, smin, acts, normalize, far):
    """f(params, arrays, d, layout) as :meth:`HDNNP.energy_function` describes, with ``f.at_positions(params,
    arrays, positions, cells, layout)``: the same energies from positions (N, 3) and cells (B, 3, 3), whose
    symmetry functions differentiate straight to positions and cells
    (:func:`~mlmd_lab.potentials.descriptors.symmetry_functions_at`; :func:`evaluate` uses it)."""
    elements = plan.elements

    def from_features(params, arrays, features, layout):
        species = arrays["species"]
        acc = accumulator_dtype(features[0].dtype)  # float32 models (the mixed mode) add energies in float64
        atomic = jnp.zeros(layout.n_atoms, dtype=acc)
        extrapolated = jnp.zeros(layout.n_atoms, dtype=jnp.int32)
        inv_conv, mean, offsets = (params["energy"][k] for k in ("inv_conv", "mean", "offsets"))
        for c, element in enumerate(elements):
            G = features[c]
            mine = species == c
            x = smin + params["factor"][element] * (G - params["shift"][element])
            out = apply(params["networks"][element], x, acts, normalize)
            atomic = atomic + jnp.where(mine, out.astype(acc) * inv_conv + mean + offsets[c], 0.0)
            outside = (G < params["min"][element]) | (G > params["max"][element])
            extrapolated = extrapolated + jnp.where(mine, jnp.sum(outside, axis=1), 0)
        per_structure = jax.ops.segment_sum(atomic, arrays["atom_struct"], num_segments=layout.n_structures + 1)
        return per_structure[:-1], atomic, extrapolated

    def energies(params, arrays, d, layout):
        return from_features(params, arrays, symmetry_functions(plan, layout, arrays, d), layout)

    def at_positions(params, arrays, positions, cells, layout):
        dtype = params["shift"][elements[0]].dtype  # the model's precision (float32 in the mixed mode)
        features = symmetry_functions_at(plan, layout, arrays, positions, cells, dtype, far)
        return from_features(params, arrays, features, layout)

    energies.at_positions = at_positions
    return energies


def evaluate(energy_fn, far: float, params, arrays: dict, layout: Layout, forces: bool) -> dict:
    """Energies, and forces and virials from dE/dd (one backward pass), of a padded neighbour graph. Pure JAX:
    jit-able with ``layout`` and ``forces`` static; this is what :meth:`HDNNP.evaluate_graph` compiles and
    what the MD engine (:mod:`mlmd_lab.md.forcefield`) integrates. Everything in the model's own units.

    Args:
        energy_fn: f(params, arrays, d, layout) -> (energies (B,), atomic energies (N,), extrapolation counts
            (N,)), e.g. :meth:`HDNNP.energy_function`; d are the pair vectors (P, 3).
        far: length of the pair vector of padded pair slots, beyond every cutoff (:attr:`HDNNP.padding_distance`).
        params: the parameter pytree (:meth:`HDNNP.parameters`).
        arrays: :meth:`Graph.arrays <mlmd_lab.potentials.neighbours.Graph.arrays>` (positions (N, 3), cells
            (B, 3, 3), pair and triplet indices; N, P padded), as numpy or JAX arrays.
        layout: the graph's :class:`~mlmd_lab.potentials.neighbours.Layout`.
        forces: also return forces and virials.

    Returns:
        ``energy`` (B,), ``atomic`` (N,), ``extrapolation`` (N,) int; with ``forces`` also ``forces`` (N, 3) =
        -dE/dr and ``virial`` (B, 3, 3) = sum over pairs of d (x) dE/dd (ASE's stress is virial / volume).

    Energy functions with an ``at_positions`` form (:meth:`HDNNP.energy_function`) are differentiated with
    respect to positions and cells instead (:func:`_evaluate_at`: the same results, less memory); others (e.g.
    the MD engine's Lennard-Jones) with respect to the pair vectors.
    """
    at_positions = getattr(energy_fn, "at_positions", None)
    if at_positions is not None:
        return _evaluate_at(at_positions, params, arrays, layout, forces)
    d = pair_vectors(arrays, far)
    if not forces:
        energy, atomic, extrapolated = energy_fn(params, arrays, d, layout)
        return {"energy": energy, "atomic": atomic, "extrapolation": extrapolated}

    def total(dd):
        energy, atomic, extrapolated = energy_fn(params, arrays, dd, layout)
        return jnp.sum(energy), (energy, atomic, extrapolated)

    grad, (energy, atomic, extrapolated) = jax.grad(total, has_aux=True)(d)
    grad = jnp.where(arrays["pair_mask"][:, None], grad, 0.0).astype(accumulator_dtype(grad.dtype))
    d = d.astype(grad.dtype)  # forces and virials are summed in float64 (also for float32 models)
    N = layout.n_atoms
    # d_p = r_j - r_i (+ shift): dE/dr_j += g_p, dE/dr_i -= g_p; F = -dE/dr.
    force = jax.ops.segment_sum(grad, arrays["pair_i"], N) - jax.ops.segment_sum(grad, arrays["pair_j"], N)
    # dE/d(strain) = sum_p d_p (x) g_p per structure (ASE's stress convention: sigma = (1/V) dE/d(strain)).
    if layout.n_structures == 1:  # MD: one (3, P) x (P, 3) product instead of a (P, 3, 3) array of outer products
        virial = (d.T @ grad)[None]
    else:
        virial = jax.ops.segment_sum(d[:, :, None] * grad[:, None, :], arrays["pair_struct"], layout.n_structures)
    return {"energy": energy, "atomic": atomic, "extrapolation": extrapolated, "forces": force, "virial": virial}


def _evaluate_at(at_positions, params, arrays: dict, layout: Layout, forces: bool) -> dict:
    """:func:`evaluate` for energy functions with an ``at_positions`` form: forces are -dE/dr and the virial
    sum_p d_p (x) dE/dd_p = sum_i r_i (x) dE/dr_i + cell^T dE/dcell per structure (the same sum, regrouped: the pair
    vectors are r_j - r_i + shift . cell), summed in float64."""
    R, cells = arrays["positions"], arrays["cells"]
    if not forces:
        energy, atomic, extrapolated = at_positions(params, arrays, R, cells, layout)
        return {"energy": energy, "atomic": atomic, "extrapolation": extrapolated}

    def total(R, cells):
        energy, atomic, extrapolated = at_positions(params, arrays, R, cells, layout)
        return jnp.sum(energy), (energy, atomic, extrapolated)

    (g_R, g_cells), (energy, atomic, extrapolated) = jax.grad(total, argnums=(0, 1), has_aux=True)(R, cells)
    acc = accumulator_dtype(g_R.dtype)
    g_R, g_cells, R, cells = g_R.astype(acc), g_cells.astype(acc), R.astype(acc), cells.astype(acc)
    if layout.n_structures == 1:
        virial = (R.T @ g_R)[None]
    else:
        per_atom = R[:, :, None] * g_R[:, None, :]
        virial = jax.ops.segment_sum(per_atom, arrays["atom_struct"], layout.n_structures + 1)[:-1]
    virial = virial + jnp.einsum("sca,scb->sab", cells, g_cells)
    return {"energy": energy, "atomic": atomic, "extrapolation": extrapolated, "forces": -g_R, "virial": virial}


#: Relative spread below which a symmetry function counts as constant in the data: its spread (sigma, or
#: max - min) must exceed SPREAD_FLOOR x max(1, |G_mean|). A single neighbour at a Gaussian's centre
#: contributes 1, so 1 is the natural size of a symmetry function; 1e-12 is far below any real variation
#: (n2p2's example potentials: >= 5e-4) and far above float64 rounding noise (1e-16 relative).
SPREAD_FLOOR = 1e-12


def _scaling_constants(kind: str, stats: np.ndarray, smin: float, smax: float) -> tuple[np.ndarray, np.ndarray]:
    """(reference, factor) so that scaled = smin + factor * (G - reference), as n2p2's SymFnc::scale.

    A function constant in the data (spread at most :data:`SPREAD_FLOOR` relative to its size) gets factor 0,
    i.e. a constant input, where n2p2 divides by the (near-)zero spread: e.g. a Gaussian centred at 0.8 Å
    in a metal has values ~1e-25..1e-58 and a spread to match, whose inverse overflows float32 (inf x 0 = NaN).
    """
    gmin, gmax, gmean, gsigma = stats.T
    n = len(gmin)
    size = np.maximum(1.0, np.abs(gmean))
    with np.errstate(over="ignore"):  # neutral statistics hold +-max float: their range overflows to inf
        if kind == "none":
            return np.zeros(n), np.ones(n)
        if kind == "scale":
            return gmin, _safe_ratio(smax - smin, gmax - gmin, size)
        if kind == "center":
            return gmean, np.ones(n)
        if kind == "scalecenter":
            return gmean, _safe_ratio(smax - smin, gmax - gmin, size)
        if kind == "scalesigma":
            return gmean, _safe_ratio(smax - smin, gsigma, size)
    raise MLMDError(f"unknown scaling type {kind!r}; use one of {n2p2_files.SCALING_TYPES}")


def _safe_ratio(numerator: float, spread: np.ndarray, size: np.ndarray) -> np.ndarray:
    """numerator / spread, 0 where a symmetry function never varied (spread <= SPREAD_FLOOR x size)."""
    out = np.zeros_like(spread, dtype=np.float64)
    ok = spread > SPREAD_FLOOR * size
    out[ok] = numerator / spread[ok]
    return out


def _neutral_stats(n: int) -> np.ndarray:
    big = np.finfo(np.float64).max  # finite, so that n2p2 reads the file; no function counts as extrapolating
    stats = np.zeros((n, 4))
    stats[:, 0], stats[:, 1], stats[:, 3] = -big, big, 1.0
    return stats


def _voigt(tensor: np.ndarray) -> np.ndarray:
    t = 0.5 * (tensor + tensor.T)
    return np.array([t[0, 0], t[1, 1], t[2, 2], t[1, 2], t[0, 2], t[0, 1]])
