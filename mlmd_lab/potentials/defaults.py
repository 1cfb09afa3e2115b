"""Automatic symmetry-function sets for any element list and cutoff (n2p2 types 2, 3 and 9).

The radial grids follow Imbalzano et al., J. Chem. Phys. 148, 241730 (2018), as n2p2's own
generator implements them (``tools/python/symfunc_paramgen/src/sfparamgen.py`` by F. Buchner,
``generate_radial_params(rule="imbalzano2018", ...)``). With cutoff r_c and n functions:

- "shifted" (mode "shift"): Gaussian centres on a geometric grid that is dense where the energy varies fastest,
  r_k = r_c (r_lower / r_c)^(k/n) for k = 0..n; function k = 1..n has r_s = r_k and
  eta_k = 1 / (r_(k-1) - r_k)^2, i.e. each Gaussian's width is the spacing to its outer neighbour, so
  neighbouring functions overlap by the same amount at every distance. Imbalzano's grid is
  r_lower = r_c / n (``sfparamgen``: r_s = r_c / n^(k/n)); here r_lower is free so that the innermost
  centre sits at the shortest distance that actually occurs (no function wasted on r < r_lower).
- "centered" (mode "center"): r_s = 0 and eta_m = 1 / sigma_m^2 with sigma_m = r_c (sqrt(2) r_lower / r_c)^(m/(n-1)),
  m = 0..n-1, so the widest function has eta = 1 / r_c^2 and the narrowest is most sensitive
  (largest |dG/dr|, at r = 1 / sqrt(2 eta)) exactly at r_lower. Imbalzano's grid, eta_m = (n'^(m/n') / r_c)^2
  with n' = n - 1, is the case r_lower = r_c / (sqrt(2) (n - 1)).

Angular functions (type 3 narrow or type 9 wide) always use the centred grid with ``n_angular`` values of eta
(r_s = 0, as in n2p2's ``input.nn.recommended`` and both n2p2 examples), every zeta given and lambda = -1, +1.
Element combinations are those of ``sfparamgen``: every ordered (central, neighbour) pair gets the radial set,
every central element and unordered neighbour pair {j, k} (j = k included) gets the angular set. Per central
element this makes ``N n_radial + N (N + 1) / 2 * n_angular * len(zetas) * 2`` functions for N elements.

All lengths are in the model's length unit (Å for the defaults), eta in 1/length^2.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from itertools import combinations_with_replacement
from numbers import Integral, Real

import numpy as np

from mlmd_lab.errors import MLMDError
from mlmd_lab.potentials.neighbours import pair_list
from mlmd_lab.potentials.symfunc import SymmetryFunction, sort_elements, sort_symmetry_functions

GRIDS = ("shifted", "centered")
ANGULAR = {"narrow": 3, "wide": 9, "none": None}
DEFAULT_ZETAS = (1.0, 4.0, 16.0)
TYPE_LABELS = {2: "radial", 3: "narrow angular", 9: "wide angular"}


def shifted_grid(cutoff: float, n: int, r_lower: float) -> list[tuple[float, float]]:
    """Imbalzano's shifted radial grid between ``r_lower`` and ``cutoff``.

    Args:
        cutoff: r_c (length), > r_lower.
        n: number of functions, >= 1.
        r_lower: innermost centre (length), > 0; Imbalzano et al. use ``cutoff / n``.

    Returns:
        ``n`` pairs ``(r_s, eta)`` (length, 1/length^2), ascending in r_s: r_s = r_k = r_c (r_lower/r_c)^(k/n)
        and eta = 1 / (r_(k-1) - r_k)^2 for k = n..1.
    """
    _check_lengths(cutoff, r_lower)
    n = _check_count("n", n)
    ratio = r_lower / cutoff
    points = [cutoff * ratio ** (k / n) for k in range(n + 1)]
    points[n] = float(r_lower)  # exact innermost centre, free of rounding
    return [(points[k], 1.0 / (points[k - 1] - points[k]) ** 2) for k in range(n, 0, -1)]


def centered_grid(cutoff: float, n: int, r_lower: float) -> list[tuple[float, float]]:
    """Imbalzano's centred grid (r_s = 0), widths geometric from ``cutoff`` down to ``sqrt(2) r_lower``.

    Args:
        cutoff: r_c (length), > sqrt(2) r_lower when n > 1.
        n: number of functions, >= 1; a single function is the widest, eta = 1 / r_c^2.
        r_lower: where the narrowest function is most sensitive (length), > 0; Imbalzano et al. use
            ``cutoff / (sqrt(2) (n - 1))``.

    Returns:
        ``n`` pairs ``(0.0, eta)`` (length, 1/length^2), ascending in eta:
        eta_m = 1 / (r_c (sqrt(2) r_lower / r_c)^(m/(n-1)))^2 for m = 0..n-1.
    """
    _check_lengths(cutoff, r_lower)
    n = _check_count("n", n)
    if n == 1:
        return [(0.0, 1.0 / cutoff**2)]
    narrowest = math.sqrt(2.0) * r_lower
    if narrowest >= cutoff:
        raise MLMDError(
            f"the centred grid needs r_lower < cutoff / sqrt(2) = {cutoff / math.sqrt(2.0):.4g} (got r_lower = "
            f"{r_lower}): its widest function (eta = 1/cutoff^2) is most sensitive at cutoff / sqrt(2) and its "
            "narrowest at r_lower; use a larger cutoff or a smaller r_lower"
        )
    ratio = narrowest / cutoff
    etas = [1.0 / (cutoff * ratio ** (m / (n - 1))) ** 2 for m in range(n)]
    etas[-1] = 0.5 / r_lower**2  # exact narrowest function, free of rounding
    return [(0.0, eta) for eta in etas]


def generate_symmetry_functions(
    elements: Sequence[str],
    cutoff: float = 6.0,
    *,
    n_radial: int = 8,
    r_lower: float = 0.8,
    grid: str = "shifted",
    angular: str = "narrow",
    n_angular: int = 4,
    zetas: Sequence[float] = DEFAULT_ZETAS,
) -> list[SymmetryFunction]:
    """A complete, n2p2-ordered symmetry-function set for ``elements`` (see the module docstring for the scheme).

    Reference: G. Imbalzano, A. Anelli, D. Giofré, S. Klees, J. Behler, M. Ceriotti, "Automatic selection of
    atomic fingerprints and reference configurations for machine-learning potentials", J. Chem. Phys. 148,
    241730 (2018), as implemented in n2p2's ``tools/python/symfunc_paramgen`` (rule "imbalzano2018").

    Args:
        elements: element symbols, e.g. ``["O", "H"]`` (order and repeats do not matter).
        cutoff: r_c of every function (model length unit, Å by default). 6 Å is n2p2's recommended value and
            covers the second neighbour shell of most solids and liquids.
        n_radial: radial (type 2) functions per (central, neighbour) element pair, >= 1. 8 resolves
            0.8-6 Å with centres 0.23 Å apart at the inner end and 1.34 Å apart at the outer end.
        r_lower: shortest distance resolved (length): the innermost shifted centre, and where the narrowest
            centred function is most sensitive. 0.8 Å is just below the shortest bonds (O-H 0.96 Å, C-H 1.09 Å);
            lower it for H2 (0.74 Å), raise it for metals (e.g. 1.8 Å) to spend the functions where atoms are.
        grid: ``"shifted"`` (default; Gaussians at r_s > 0, distinct and nearly uncorrelated) or
            ``"centered"`` (r_s = 0, widths graded; smoother but more correlated) for the radial functions.
        angular: ``"narrow"`` (type 3, the Behler-Parrinello G3), ``"wide"`` (type 9, no r_jk term; cheaper,
            better for sparse or long-range triplets) or ``"none"`` (radial only).
        n_angular: eta values of the angular functions (centred grid), >= 1 unless ``angular="none"``. 4 covers
            first-shell to cutoff-range triplets.
        zetas: angular exponents, each >= 1 and distinct. The default (1, 4, 16) halves the angular width at
            each step (half maximum of ((1 + cos theta) / 2)^zeta at about 90, 47 and 24 degrees from the
            peak), with lambda = +1 and -1 looking at small and large angles.

    Returns:
        The functions, grouped by central element (by atomic number) in n2p2's input order; all have
        rc = cutoff, eta > 0 (1/length^2), r_s >= 0. Per central element:
        ``N n_radial + N (N + 1) / 2 * n_angular * len(zetas) * 2`` for N elements.

    Raises:
        MLMDError: unknown element, cutoff <= r_lower or not finite, a count < 1, an unknown grid or angular
            kind, or invalid zetas.
    """
    symbols = _check_elements(elements)
    _check_lengths(cutoff, r_lower)
    cutoff, r_lower = float(cutoff), float(r_lower)
    n_radial = _check_count("n_radial", n_radial)
    if grid not in GRIDS:
        raise MLMDError(f"unknown radial grid {grid!r}; use 'shifted' (r_s > 0, the default) or 'centered' (r_s = 0)")
    if angular not in ANGULAR:
        raise MLMDError(
            f"unknown angular kind {angular!r}; use 'narrow' (n2p2 type 3), 'wide' (type 9) or 'none' (radial only)"
        )
    angular_type = ANGULAR[angular]

    radial_params = (shifted_grid if grid == "shifted" else centered_grid)(cutoff, n_radial, r_lower)
    functions = [
        SymmetryFunction(central, 2, (neighbour,), eta=eta, rc=cutoff, rs=rs)
        for central in symbols
        for neighbour in symbols
        for rs, eta in radial_params
    ]
    if angular_type is not None:
        n_angular = _check_count("n_angular", n_angular)
        zeta_values = _check_zetas(zetas)
        angular_params = centered_grid(cutoff, n_angular, r_lower)
        functions += [
            SymmetryFunction(central, angular_type, pair, eta=eta, rc=cutoff, rs=rs, lam=lam, zeta=zeta)
            for central in symbols
            for pair in combinations_with_replacement(symbols, 2)
            for rs, eta in angular_params
            for zeta in zeta_values
            for lam in (-1.0, 1.0)
        ]
    return [sf for group in sort_symmetry_functions(functions).values() for sf in group]


def r_lower_from(structures: Iterable, cutoff: float = 8.0, max_structures: int = 20,
                 default: float = 0.8) -> float:
    """``r_lower`` (Å) for :func:`generate_symmetry_functions` from the structures a potential is for.

    0.9 x the shortest interatomic distance (at least 0.5 Å), the rule of :class:`mlmd_lab.train.Trainer`:
    the innermost functions then sit just inside the closest approach seen, where atoms actually are
    (e.g. 2.3 Å for fcc Cu, not 0.8 Å where a metal's functions would all be ~0).

    Args:
        structures: ASE ``Atoms`` (Å); up to ``max_structures`` of them, evenly spaced, are looked at.
        cutoff: distances beyond this (Å) are not searched.
        max_structures: how many structures to sample (the neighbour search is the cost).
        default: returned when no two atoms are within ``cutoff`` (isolated atoms).

    Returns:
        r_lower in Å.
    """
    structures = list(structures)
    step = max(1, len(structures) // max_structures)
    shortest = math.inf
    for atoms in structures[::step][:max_structures]:
        _, _, _, D = pair_list(atoms.positions, atoms.cell.array, atoms.pbc, cutoff)
        if len(D):
            shortest = min(shortest, float(np.sqrt(np.min(np.einsum("ij,ij->i", D, D)))))
    return max(0.5, 0.9 * shortest) if math.isfinite(shortest) else float(default)


def describe(functions: Iterable[SymmetryFunction]) -> str:
    """A short human summary: total, elements, cutoff(s), and counts per central element and type.

    Example output::

        176 symmetry functions for 2 elements (S, Cu), cutoff 6
          S: 88 = 16 radial (type 2), 72 narrow angular (type 3)
          Cu: 88 = 16 radial (type 2), 72 narrow angular (type 3)

    Args:
        functions: any symmetry functions (duplicates are counted, not rejected).

    Returns:
        Several lines of text, no trailing newline.
    """
    functions = list(functions)
    if not functions:
        return "no symmetry functions"
    counts: dict[str, dict[int, int]] = {}
    for sf in functions:
        per_type = counts.setdefault(sf.element, {})
        per_type[sf.type] = per_type.get(sf.type, 0) + 1
    elements = sort_elements(counts)
    cutoffs = sorted({sf.rc for sf in functions})
    cutoff_text = f"cutoff {cutoffs[0]:g}" if len(cutoffs) == 1 else f"cutoffs {cutoffs[0]:g} to {cutoffs[-1]:g}"
    plural = "s" if len(elements) != 1 else ""
    header = f"{len(functions)} symmetry functions for {len(elements)} element{plural} ({', '.join(elements)})"
    lines = [f"{header}, {cutoff_text}"]
    for element in elements:
        per_type = counts[element]
        parts = ", ".join(f"{per_type[t]} {TYPE_LABELS.get(t, f'type {t}')} (type {t})" for t in sorted(per_type))
        lines.append(f"  {element}: {sum(per_type.values())} = {parts}")
    return "\n".join(lines)


def _check_elements(elements: Sequence[str]) -> tuple[str, ...]:
    if isinstance(elements, str):
        raise MLMDError(f"elements must be a list of symbols such as ['O', 'H'], not the string {elements!r}")
    symbols = list(elements)
    if not symbols:
        raise MLMDError("no elements given; pass the element symbols of the system, e.g. ['Cu', 'S']")
    for symbol in symbols:
        if not isinstance(symbol, str):
            raise MLMDError(f"element {symbol!r} is not a symbol; pass symbols such as 'H', 'Cu'")
    return sort_elements(symbols)  # raises MLMDError for an unknown symbol


def _check_lengths(cutoff: float, r_lower: float) -> None:
    for name, value in (("cutoff", cutoff), ("r_lower", r_lower)):
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
            raise MLMDError(f"{name} must be a finite positive length, got {value!r}")
    if cutoff <= r_lower:
        raise MLMDError(
            f"cutoff ({cutoff}) must be larger than r_lower ({r_lower}): r_lower is the shortest distance resolved "
            "(about the shortest bond, e.g. 0.8 Å), the cutoff the neighbour range (typically 5-7 Å)"
        )


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise MLMDError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _check_zetas(zetas: Sequence[float]) -> tuple[float, ...]:
    if isinstance(zetas, str | Real):
        raise MLMDError(f"zetas must be a sequence of numbers such as (1, 4, 16), got {zetas!r}")
    values = []
    for zeta in zetas:
        if isinstance(zeta, bool) or not isinstance(zeta, Real) or not math.isfinite(zeta) or zeta < 1:
            raise MLMDError(f"every zeta must be a finite number >= 1 (n2p2 needs zeta >= 1), got {zeta!r}")
        values.append(float(zeta))
    if not values:
        raise MLMDError("zetas is empty; give at least one angular exponent, e.g. (1, 4, 16), or use angular='none'")
    if len(set(values)) != len(values):
        raise MLMDError(f"zetas {tuple(zetas)} contain a repeated value; each zeta must appear once")
    return tuple(values)
