"""Structure generators for DFT labelling: rattles, strain and volume scans, supercells, point defects,
snapshots of short MD runs, and de-duplication.

Every function takes an ASE ``Atoms`` (Å) and returns a **list** of new ``Atoms`` (no calculator attached,
so nothing carries labels that are not DFT's). Each structure records where it came from in
``atoms.info["generator"]``, a JSON-serialisable dict:

- ``name``: the generator (``"rattle"``, ``"strain_scan"``, ...);
- ``parameters``: what made *this* structure (amplitude, strain, removed indices, temperature, MD step, ...;
  lengths in Å, temperatures in K, times in fs);
- ``parent``: :func:`mlmd_lab.frames.content_hash` of the input structure (geometry and, when it carries
  them, its energy and forces), so a structure can be traced back to the one it was derived from;
- ``history``: the names of the generators that made the parent, oldest first (generators can be chained:
  ``rattle(supercell(si, 2)[0], 10)``).

Database metadata of the input (``frame_id``, ``calc_id``, ``signature``, ``step``, ...) is not copied to the
new structures: they are new geometries without labels. Everything random takes a ``seed`` and is
deterministic for a given seed (NumPy ``default_rng``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from ase import Atoms

from mlmd_lab.errors import MLMDError
from mlmd_lab.frames import content_hash

__all__ = [
    "deduplicate",
    "distance_fingerprint",
    "fingerprint_distance",
    "md_snapshots",
    "rattle",
    "strain_scan",
    "substitutions",
    "supercell",
    "vacancies",
    "volume_scan",
]

#: ``atoms.info`` keys that describe a stored or labelled frame, not a geometry; dropped from derived structures.
_STALE_INFO = ("frame_id", "calc_id", "signature_id", "signature", "source", "file_hash", "step", "converged",
               "time_fs", "temperature_K", "dft_settings", "generator")

_AXES = {"x": 0, "y": 1, "z": 2}


# -- provenance ------------------------------------------------------------------------------------------
def _provenance(parent: Atoms) -> tuple[str, list[str]]:
    gen = parent.info.get("generator")
    history = []
    if isinstance(gen, dict):
        history = [*list(gen.get("history") or []), str(gen.get("name"))]
    return content_hash(parent), history


def _child(parent: Atoms, name: str, parameters: dict[str, Any], prov: tuple[str, list[str]],
           atoms: Atoms | None = None) -> Atoms:
    """A copy of ``atoms`` (default: of ``parent``) without calculator, with stale info removed and the
    generator record added."""
    new = (atoms if atoms is not None else parent).copy()
    new.calc = None
    for key in _STALE_INFO:
        new.info.pop(key, None)
    new.info["generator"] = {"name": name, "parameters": _plain(parameters), "parent": prov[0],
                             "history": list(prov[1])}
    return new


def _plain(value: Any) -> Any:
    """JSON-serialisable copy (numpy → Python, tuples → lists)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in list(value)]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _require_atoms(atoms: Any) -> Atoms:
    if not isinstance(atoms, Atoms):
        raise MLMDError(f"expected an ase.Atoms structure, got {type(atoms).__name__}; pass one structure "
                        "(loop over a list yourself)")
    if len(atoms) == 0:
        raise MLMDError("the structure has no atoms; pass a non-empty ase.Atoms")
    return atoms


def _require_periodic(atoms: Atoms, what: str) -> None:
    if not atoms.pbc.all() or atoms.cell.rank != 3:
        raise MLMDError(f"{what} needs a periodic 3-D cell (pbc all True and a full cell); this structure has "
                        f"pbc={atoms.pbc.tolist()}; set a cell and pbc=True, or use rattle for molecules")


# -- geometry perturbations ------------------------------------------------------------------------------
def rattle(atoms: Atoms, n: int, amplitude: float = 0.05, seed: int = 0, cell_amplitude: float = 0.0) -> list[Atoms]:
    """``n`` copies with random atomic displacements (and optionally random cell strains).

    Args:
        atoms: the structure (positions Å).
        n: number of structures.
        amplitude: standard deviation (Å) of the Gaussian displacement of each Cartesian coordinate.
        seed: random seed; the same seed gives the same structures.
        cell_amplitude: standard deviation of the components of a random symmetric strain ε applied to a
            periodic cell (cell → cell·(1+ε), atoms scaled with it); 0 keeps the cell.

    Returns:
        ``n`` structures; ``info["generator"]["parameters"]`` has ``amplitude``, ``cell_amplitude``, ``seed``
        and ``index`` (0..n-1).
    """
    atoms = _require_atoms(atoms)
    if n < 0 or amplitude < 0 or cell_amplitude < 0:
        raise MLMDError(f"rattle needs n >= 0 and amplitudes >= 0 (got n={n}, amplitude={amplitude}, "
                        f"cell_amplitude={cell_amplitude})")
    if cell_amplitude > 0:
        _require_periodic(atoms, "rattle with cell_amplitude > 0")
    prov = _provenance(atoms)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(int(n)):
        new = _child(atoms, "rattle", {"amplitude": float(amplitude), "cell_amplitude": float(cell_amplitude),
                                       "seed": int(seed), "index": i}, prov)
        if cell_amplitude > 0:
            e = rng.normal(0.0, cell_amplitude, (3, 3))
            e = 0.5 * (e + e.T)
            new.set_cell(new.cell.array @ (np.eye(3) + e).T, scale_atoms=True)
        new.positions = new.positions + rng.normal(0.0, amplitude, (len(new), 3))
        out.append(new)
    return out


def _deformation(kind: str, strain: float, axis: str | None) -> np.ndarray:
    """Deformation gradient F (new vector = F · old vector) for a strain of the given kind."""
    if kind == "volume":
        if strain <= -1:
            raise MLMDError(f"a volume strain must be > -1 (the volume would vanish), got {strain}")
        return np.eye(3) * (1.0 + strain) ** (1.0 / 3.0)
    if kind == "uniaxial":
        ax = (axis or "x").lower()
        if ax not in _AXES:
            raise MLMDError(f"uniaxial strain axis must be 'x', 'y' or 'z', not {axis!r}")
        F = np.eye(3)
        F[_AXES[ax], _AXES[ax]] += strain
        return F
    if kind == "shear":
        ax = (axis or "xy").lower()
        if len(ax) != 2 or ax[0] not in _AXES or ax[1] not in _AXES or ax[0] == ax[1]:
            raise MLMDError(f"shear strain axis must be a plane such as 'xy', 'xz' or 'yz', not {axis!r}")
        i, j = _AXES[ax[0]], _AXES[ax[1]]
        F = np.eye(3)
        F[i, j] += strain / 2.0
        F[j, i] += strain / 2.0
        return F
    raise MLMDError(f"strain kind must be 'volume', 'uniaxial' or 'shear', not {kind!r}")


def strain_scan(atoms: Atoms, strains: Sequence[float] = (-0.06, -0.04, -0.02, 0.0, 0.02, 0.04, 0.06),
                kind: str = "volume", axis: str | None = None) -> list[Atoms]:
    """Homogeneously strained copies of a periodic structure (atoms move with the cell).

    Strain conventions (``s`` is one value of ``strains``; the cell's rows are transformed by the
    deformation gradient F, ``cell' = cell · Fᵀ``):

    - ``"volume"``: isotropic, ``s`` is the relative *volume* change: ``V = V0 (1 + s)``
      (lengths scale by ``(1 + s)^(1/3)``);
    - ``"uniaxial"``: linear strain ``s`` along ``axis`` (``"x"``, ``"y"``, ``"z"``; default ``"x"``):
      ``V = V0 (1 + s)``;
    - ``"shear"``: symmetric engineering shear ``γ = s`` in the plane ``axis`` (``"xy"``, ``"xz"``, ``"yz"``;
      default ``"xy"``): ``F = 1 + (s/2)(e_i e_jᵀ + e_j e_iᵀ)``, ``V = V0 (1 - s²/4)``.

    Returns:
        one structure per strain, in order; ``parameters``: ``kind``, ``strain``, ``axis``,
        ``deformation`` (3×3 F).
    """
    atoms = _require_atoms(atoms)
    _require_periodic(atoms, "strain_scan")
    prov = _provenance(atoms)
    out = []
    for s in strains:
        F = _deformation(kind, float(s), axis)
        new = _child(atoms, "strain_scan", {"kind": kind, "strain": float(s), "axis": axis,
                                            "deformation": F.tolist()}, prov)
        new.set_cell(atoms.cell.array @ F.T, scale_atoms=True)
        out.append(new)
    return out


def volume_scan(atoms: Atoms, n: int = 7, max_change: float = 0.06,
                volumes: Sequence[float] | None = None) -> list[Atoms]:
    """Isotropically scaled copies for an equation of state.

    Args:
        atoms: a periodic structure.
        n, max_change: ``n`` relative volume changes evenly spaced in ``[-max_change, +max_change]``
            (``V = V0 (1 + s)``), used when ``volumes`` is None.
        volumes: absolute target volumes (Å³) instead.

    Returns:
        one structure per volume; ``info["generator"]["parameters"]`` has ``volume`` (Å³) and
        ``relative_change``.
    """
    atoms = _require_atoms(atoms)
    _require_periodic(atoms, "volume_scan")
    v0 = atoms.get_volume()
    if volumes is not None:
        changes = [float(v) / v0 - 1.0 for v in volumes]
    else:
        if n < 1:
            raise MLMDError(f"volume_scan needs n >= 1, got {n}")
        changes = [0.0] if n == 1 else list(np.linspace(-max_change, max_change, int(n)))
    prov = _provenance(atoms)
    out = []
    for s in changes:
        F = _deformation("volume", s, None)
        new = _child(atoms, "volume_scan", {"volume": v0 * (1.0 + s), "relative_change": float(s)}, prov)
        new.set_cell(atoms.cell.array @ F.T, scale_atoms=True)
        out.append(new)
    return out


def supercell(atoms: Atoms, P: int | Sequence[int] | Sequence[Sequence[int]]) -> list[Atoms]:
    """The supercell ``P`` of a periodic structure, as a list of one structure.

    Args:
        P: an integer (n×n×n), three repetitions ``(n1, n2, n3)``, or a 3×3 integer matrix (new cell
            vectors = P · old cell vectors, as ``ase.build.make_supercell``).

    Returns:
        ``[supercell]`` (a list, like every generator); ``parameters``: ``P`` as a 3×3 matrix.
    """
    from ase.build import make_supercell

    atoms = _require_atoms(atoms)
    _require_periodic(atoms, "supercell")
    arr = np.asarray(P)
    if arr.ndim == 0:
        mat = np.eye(3, dtype=int) * int(arr)
    elif arr.shape == (3,):
        mat = np.diag(arr.astype(int))
    elif arr.shape == (3, 3):
        mat = arr.astype(int)
    else:
        raise MLMDError(f"supercell P must be an int, three ints or a 3x3 int matrix, got shape {arr.shape}")
    if not np.allclose(arr, np.asarray(arr).round()) or round(abs(np.linalg.det(mat))) < 1:
        raise MLMDError(f"supercell P must be integer with a non-zero determinant, got {arr.tolist()}")
    prov = _provenance(atoms)
    if np.count_nonzero(mat - np.diag(np.diag(mat))) == 0 and (np.diag(mat) > 0).all():
        big = atoms.repeat(tuple(int(x) for x in np.diag(mat)))
    else:
        big = make_supercell(atoms, mat)
    return [_child(atoms, "supercell", {"P": mat.tolist()}, prov, atoms=big)]


# -- point defects ---------------------------------------------------------------------------------------
def _site_sets(candidates: list[int], n: int, max_structures: int | None, seed: int) -> list[tuple[int, ...]]:
    """All ``n``-subsets of ``candidates`` in lexicographic order when there are at most ``max_structures``,
    else ``max_structures`` distinct random ones (sorted tuples, in draw order)."""
    total = math.comb(len(candidates), n)
    if max_structures is None or total <= max_structures:
        return [tuple(c) for c in itertools.combinations(candidates, n)]
    rng = np.random.default_rng(seed)
    seen: set[tuple[int, ...]] = set()
    out = []
    while len(out) < max_structures:
        pick = tuple(sorted(int(x) for x in rng.choice(candidates, size=n, replace=False)))
        if pick not in seen:
            seen.add(pick)
            out.append(pick)
    return out


def vacancies(atoms: Atoms, element: str | None = None, n: int = 1, max_structures: int | None = 10,
              seed: int = 0) -> list[Atoms]:
    """Structures with ``n`` atoms removed (vacancies).

    Every combination of ``n`` sites (of ``element``, or of any element when None) is made when there are
    at most ``max_structures`` combinations, else ``max_structures`` distinct random ones (``seed``).
    Symmetry-equivalent structures are not merged here; :func:`deduplicate` with a tolerance does that.

    Returns:
        structures with ``len(atoms) - n`` atoms; ``parameters``: ``element``, ``n``, ``removed`` (indices into
        the input), ``removed_symbols``.
    """
    atoms = _require_atoms(atoms)
    symbols = atoms.get_chemical_symbols()
    candidates = [i for i, s in enumerate(symbols) if element is None or s == element]
    if n < 1 or n > len(candidates):
        raise MLMDError(f"cannot remove {n} atoms: the structure has {len(candidates)} "
                        f"{element or 'atoms'} (formula {atoms.get_chemical_formula()}); choose 1 <= n <= "
                        f"{len(candidates)}" + ("" if candidates else " or another element"))
    if n >= len(atoms):
        raise MLMDError(f"removing {n} of {len(atoms)} atoms leaves nothing; choose a smaller n")
    prov = _provenance(atoms)
    out = []
    for sites in _site_sets(candidates, n, max_structures, seed):
        new = _child(atoms, "vacancies", {"element": element, "n": n, "removed": list(sites),
                                          "removed_symbols": [symbols[i] for i in sites], "seed": seed}, prov)
        del new[list(sites)]
        out.append(new)
    return out


def substitutions(atoms: Atoms, from_el: str, to_el: str, n: int = 1, max_structures: int | None = 10,
                  seed: int = 0) -> list[Atoms]:
    """Structures with ``n`` atoms of ``from_el`` replaced by ``to_el`` (positions unchanged).

    Combinations as in :func:`vacancies` (all when at most ``max_structures``, else random distinct ones).

    Returns:
        structures; ``parameters``: ``from``, ``to``, ``n``, ``sites`` (indices), ``seed``.
    """
    from ase.data import atomic_numbers

    atoms = _require_atoms(atoms)
    if to_el not in atomic_numbers:
        raise MLMDError(f"unknown element {to_el!r}; give a chemical symbol such as 'Ge'")
    symbols = atoms.get_chemical_symbols()
    candidates = [i for i, s in enumerate(symbols) if s == from_el]
    if n < 1 or n > len(candidates):
        raise MLMDError(f"cannot substitute {n} {from_el} atoms: the structure has {len(candidates)} "
                        f"(formula {atoms.get_chemical_formula()}); choose 1 <= n <= {len(candidates)}"
                        + ("" if candidates else " or an element it contains"))
    prov = _provenance(atoms)
    out = []
    for sites in _site_sets(candidates, n, max_structures, seed):
        new = _child(atoms, "substitutions", {"from": from_el, "to": to_el, "n": n, "sites": list(sites),
                                              "seed": seed}, prov)
        new_symbols = list(symbols)
        for i in sites:
            new_symbols[i] = to_el
        new.set_chemical_symbols(new_symbols)
        out.append(new)
    return out


# -- molecular dynamics ----------------------------------------------------------------------------------
def _is_ase_calculator(obj: Any) -> bool:
    from ase.calculators.calculator import BaseCalculator

    return isinstance(obj, BaseCalculator) or (hasattr(obj, "get_potential_energy") and hasattr(obj, "get_forces")
                                               and hasattr(obj, "calculate"))


def md_snapshots(atoms: Atoms, potential: Any, temperatures: Iterable[float] = (300.0,), steps: int = 200,
                 interval: int = 20, timestep_fs: float = 1.0, seed: int = 0, equilibration: int = 0,
                 friction_per_fs: float = 0.01) -> list[Atoms]:
    """Snapshots of short Langevin (NVT) runs at several temperatures.

    Args:
        atoms: starting structure (Å).
        potential: an mlmd_lab potential (HDNNP, Ensemble, :class:`mlmd_lab.md.LennardJones`; run with
            :func:`mlmd_lab.md.run`, ensemble ``"langevin"``, thermostat time ``1/friction_per_fs``) or any ASE
            calculator (run with ASE's ``Langevin``; the calculator is used on a copy of ``atoms``).
        temperatures: thermostat temperatures in K; one run per temperature, each starting from ``atoms``
            with Maxwell-Boltzmann velocities.
        steps: MD steps per run; interval: steps between snapshots; timestep_fs: time step in fs.
        seed: run ``i`` uses ``seed + i`` (velocities and thermostat noise), so results are reproducible.
        equilibration: snapshots are taken at steps ``> equilibration`` only (never at step 0).
        friction_per_fs: Langevin friction in 1/fs.

    Returns:
        ``len(temperatures) × (steps - equilibration) // interval`` structures (about), positions wrapped into
        periodic cells, no calculator (the potential's energies are not DFT labels); ``parameters``:
        ``temperature_K``, ``step``, ``time_fs``, ``timestep_fs``, ``seed``, ``engine`` (``"mlmd_lab.md"`` or
        ``"ase.Langevin"``), ``potential`` (class name).
    """
    atoms = _require_atoms(atoms)
    if steps < 1 or interval < 1 or timestep_fs <= 0:
        raise MLMDError(f"md_snapshots needs steps >= 1, interval >= 1 and timestep_fs > 0 (got {steps}, "
                        f"{interval}, {timestep_fs})")
    prov = _provenance(atoms)
    use_ase = _is_ase_calculator(potential)
    out: list[Atoms] = []
    for k, temperature in enumerate(temperatures):
        run_seed = int(seed) + k
        frames = (_ase_langevin if use_ase else _mlmd_langevin)(
            atoms, potential, float(temperature), int(steps), int(interval), float(timestep_fs), run_seed,
            float(friction_per_fs))
        for step, frame in frames:
            if step <= equilibration or step == 0:
                continue
            params = {"temperature_K": float(temperature), "step": int(step), "time_fs": step * timestep_fs,
                      "timestep_fs": float(timestep_fs), "steps": int(steps), "interval": int(interval),
                      "seed": run_seed, "engine": "ase.Langevin" if use_ase else "mlmd_lab.md",
                      "potential": type(potential).__name__}
            new = _child(atoms, "md_snapshots", params, prov, atoms=frame)
            if new.pbc.any():
                new.wrap()
            out.append(new)
    return out


def _mlmd_langevin(atoms, potential, temperature, steps, interval, timestep_fs, seed, friction):
    from mlmd_lab.md import run

    start = atoms.copy()
    start.calc = None
    result = run(potential, start, "langevin", temperature=temperature, timestep=timestep_fs, steps=steps,
                 trajectory_interval=interval, log_interval=interval, restart_interval=0, seed=seed,
                 thermostat_time=1.0 / friction, velocities="draw")
    return [(int(f.info.get("step", 0)), f) for f in result.trajectory]


def _ase_langevin(atoms, calc, temperature, steps, interval, timestep_fs, seed, friction):
    from ase import units
    from ase.constraints import FixCom
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import Stationary

    try:
        from ase.md.velocitydistribution import thermalize_momenta  # ASE >= 3.29
    except ImportError:  # pragma: no cover - older ASE
        from ase.md.velocitydistribution import MaxwellBoltzmannDistribution as thermalize_momenta  # noqa: N813

    work = atoms.copy()
    work.calc = calc
    if not work.constraints:
        work.set_constraint(FixCom())  # ASE's recommended replacement of Langevin(fixcm=True)
    rng = np.random.default_rng(seed)
    thermalize_momenta(work, temperature_K=temperature, rng=rng)
    Stationary(work)
    dyn = Langevin(work, timestep_fs * units.fs, temperature_K=temperature, friction=friction / units.fs, rng=rng,
                   fixcm=False)
    frames = []

    def grab():
        snap = work.copy()
        snap.calc = None
        snap.set_constraint([c for c in snap.constraints if not isinstance(c, FixCom)])
        frames.append((dyn.nsteps, snap))

    dyn.attach(grab, interval=interval)
    dyn.run(steps)
    return frames


# -- de-duplication --------------------------------------------------------------------------------------
def distance_fingerprint(atoms: Atoms, cutoff: float = 5.0) -> dict[tuple[str, str], np.ndarray]:
    """Sorted interatomic distances per element pair: a permutation-, translation- and rotation-invariant
    fingerprint.

    For periodic structures all pairs (i, j, image) closer than ``cutoff`` (Å) are included (minimum-image not
    assumed; ``ase.neighborlist``); for molecules all pairs within ``cutoff``. Each unordered pair is counted
    once.

    Returns:
        ``{(el_a, el_b): distances (Å, sorted ascending)}`` with ``el_a <= el_b``.
    """
    from ase.neighborlist import neighbor_list

    if atoms.pbc.any() and atoms.cell.rank < 3:
        raise MLMDError("distance_fingerprint needs a full cell for periodic structures")
    i, j, d = neighbor_list("ijd", atoms, cutoff, self_interaction=False)
    symbols = np.asarray(atoms.get_chemical_symbols())
    a, b = symbols[i], symbols[j]
    lo, hi = np.where(a <= b, a, b), np.where(a <= b, b, a)
    out: dict[tuple[str, str], np.ndarray] = {}
    for key in sorted(set(zip(lo.tolist(), hi.tolist(), strict=True))):
        mask = (lo == key[0]) & (hi == key[1])
        # each unordered pair appears as (i, j) and (j, i); an atom and its own periodic image as +R and -R:
        # keep i < j, and every other one of the sorted self-image distances (they come in equal twins)
        pairs = np.sort(d[mask & (i < j)])
        images = np.sort(d[mask & (i == j)])[::2]
        out[key] = np.sort(np.concatenate([pairs, images]))
    return out


def fingerprint_distance(fa: dict[tuple[str, str], np.ndarray], fb: dict[tuple[str, str], np.ndarray]) -> float:
    """Largest change (Å) of any sorted interatomic distance between two fingerprints.

    Lists of different length (pairs crossing the cutoff) are compared over their common, shorter part; an
    element pair present in only one structure gives ``inf``.
    """
    if set(fa) != set(fb):
        return math.inf
    worst = 0.0
    for key, a in fa.items():
        b = fb[key]
        m = min(len(a), len(b))
        if m == 0:
            if len(a) != len(b):
                return math.inf
            continue
        # more than a few pairs missing is not "pairs at the cutoff": a different structure
        if abs(len(a) - len(b)) > max(2, 0.05 * max(len(a), len(b))):
            return math.inf
        worst = max(worst, float(np.max(np.abs(a[:m] - b[:m]))))
    return worst


def deduplicate(structures: Iterable[Atoms], tolerance: float = 0.01, cutoff: float = 5.0,
                return_indices: bool = False) -> list[Atoms] | tuple[list[Atoms], list[int]]:
    """Remove duplicates, keeping the first of each group (order preserved).

    Two tests:

    1. exact: equal :func:`mlmd_lab.frames.content_hash` (species, pbc, positions and cell to 1e-6 Å, and
       energy/forces when the structures carry them);
    2. near (when ``tolerance > 0``): same species counts, pbc and (for periodic structures) cell volume within
       1 %, and a :func:`fingerprint_distance` of the sorted interatomic distances within ``cutoff`` of at most
       ``tolerance`` Å. This ignores labels and atom order, translations and rotations, so it also merges
       symmetry-equivalent defects (e.g. the 8 single vacancies of cubic Si8). Sorted distances are a
       descriptor, not a proof of identity: rare homometric structures (different, with equal distance lists)
       would be merged too.

    Args:
        structures: ASE Atoms.
        tolerance: largest change (Å) of any sorted interatomic distance for two structures to count as the
            same; 0 keeps everything that is not an exact duplicate.
        cutoff: distance cutoff (Å) of the fingerprint.
        return_indices: also return the indices (into ``structures``) of those kept.

    Returns:
        the kept structures (the same objects, not copies), and their indices if ``return_indices``.
    """
    items = list(structures)
    seen: set[str] = set()
    kept: list[int] = []
    groups: dict[tuple, list[tuple[int, dict, float]]] = {}
    for idx, atoms in enumerate(items):
        h = content_hash(atoms)
        if h in seen:
            continue
        seen.add(h)
        if tolerance and tolerance > 0:
            key = (tuple(sorted(atoms.symbols.formula.count().items())), tuple(bool(x) for x in atoms.pbc))
            vol = float(atoms.get_volume()) if atoms.pbc.all() and atoms.cell.rank == 3 else 0.0
            fp = distance_fingerprint(atoms, cutoff)
            dup = False
            for _, other_fp, other_vol in groups.get(key, []):
                if vol and abs(vol - other_vol) > 0.01 * max(vol, other_vol):
                    continue
                if fingerprint_distance(fp, other_fp) <= tolerance:
                    dup = True
                    break
            if dup:
                continue
            groups.setdefault(key, []).append((idx, fp, vol))
        kept.append(idx)
    result = [items[i] for i in kept]
    return (result, kept) if return_indices else result
