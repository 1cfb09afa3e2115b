"""Automatic symmetry-function sets (mlmd_lab.potentials.defaults): counts, published grids, quality, errors."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from mlmd_lab.errors import MLMDError
from mlmd_lab.potentials.defaults import centered_grid, describe, generate_symmetry_functions, shifted_grid
from mlmd_lab.potentials.symfunc import SymmetryFunction, sort_symmetry_functions


def expected_per_element(n_elements: int, n_radial: int = 8, n_angular: int = 4, n_zetas: int = 3) -> int:
    return n_elements * n_radial + n_elements * (n_elements + 1) // 2 * n_angular * n_zetas * 2


@pytest.mark.parametrize(
    "elements", [["Cu"], ["O", "H"], ["Cu", "S"], ["H", "C", "O"], ["Zn", "O", "H"]], ids=lambda e: "".join(e)
)
def test_counts_per_element_and_type(elements):
    functions = generate_symmetry_functions(elements)
    n = len(elements)
    per_element = Counter(sf.element for sf in functions)
    assert per_element == {e: expected_per_element(n) for e in elements}
    for element in elements:
        types = Counter(sf.type for sf in functions if sf.element == element)
        assert types == {2: n * 8, 3: n * (n + 1) // 2 * 4 * 3 * 2}
        # every neighbour element and every unordered neighbour pair is covered equally
        radial = Counter(sf.neighbours for sf in functions if sf.element == element and sf.type == 2)
        assert radial == {(e,): 8 for e in elements}
        pairs = Counter(sf.neighbours for sf in functions if sf.element == element and sf.type == 3)
        assert len(pairs) == n * (n + 1) // 2 and set(pairs.values()) == {24}


def test_counts_follow_the_arguments():
    functions = generate_symmetry_functions(["O", "H"], 5.0, n_radial=3, n_angular=2, zetas=(1, 2, 4, 8))
    assert Counter(sf.element for sf in functions) == {"H": expected_per_element(2, 3, 2, 4)} | {
        "O": expected_per_element(2, 3, 2, 4)
    }


def test_shifted_grid_is_imbalzano_2018():
    # Hand calculation of the published shifted grid for r_c = 6, n = 5: points r_c / n^(k/n), k = 0..5,
    # r_s = points[1:], eta_k = 1 / (points[k-1] - points[k])^2; its innermost centre r_c / n = 1.2 is r_lower.
    points = [6.0, 4.34868, 3.15183, 2.28438, 1.65568, 1.2]
    assert points == pytest.approx([6.0 / 5 ** (k / 5) for k in range(6)], abs=1e-5)
    want = sorted((points[k], 1.0 / (points[k - 1] - points[k]) ** 2) for k in range(1, 6))
    got = shifted_grid(6.0, 5, 1.2)
    assert np.allclose(got, want, rtol=1e-4)
    # the reference values of n2p2's own sfparamgen test (rule imbalzano2018, mode shift, r_c = 6, n = 4)
    got4 = shifted_grid(6.0, 4, 6.0 / 4)
    assert np.allclose([rs for rs, _ in got4], [1.5, 2.1213203, 3.0, 4.2426407])
    assert np.allclose([eta for _, eta in got4], [2.5904121, 1.2952060, 0.6476030, 0.3238015])
    # and the generated set uses exactly these (r_s, eta) for each neighbour element
    functions = generate_symmetry_functions(["Cu"], 6.0, n_radial=5, r_lower=1.2, angular="none")
    assert np.allclose(sorted((sf.rs, sf.eta) for sf in functions), want, rtol=1e-4)


def test_centered_grid_is_imbalzano_2018():
    # Published centred grid: r_s = 0, eta_m = (n'^(m/n') / r_c)^2 with n' = n - 1 intervals.
    # For r_c = 6, n = 5: eta_m = 4^m/4 / 36 = 2^m / 36; it is the case r_lower = r_c / (sqrt(2) (n - 1)).
    want = [(0.0, 2.0**m / 36.0) for m in range(5)]
    got = centered_grid(6.0, 5, 6.0 / (math.sqrt(2.0) * 4))
    assert np.allclose(got, want)
    # n2p2's own sfparamgen test values (rule imbalzano2018, mode center, r_c = 6, n = 4)
    got4 = centered_grid(6.0, 4, 6.0 / (math.sqrt(2.0) * 3))
    assert np.allclose([eta for _, eta in got4], [1 / 36, 0.0577801, 0.1201874, 1 / 4])
    functions = generate_symmetry_functions(
        ["Cu"], 6.0, n_radial=5, r_lower=6.0 / (math.sqrt(2.0) * 4), grid="centered", angular="none"
    )
    assert np.allclose(sorted((sf.rs, sf.eta) for sf in functions), want)


def test_grids_span_r_lower_to_cutoff():
    shifted = shifted_grid(6.0, 8, 0.8)
    assert shifted[0][0] == 0.8 and all(0.8 <= rs < 6.0 for rs, _ in shifted)
    assert np.all(np.diff([rs for rs, _ in shifted]) > 0)
    centered = centered_grid(6.0, 8, 0.8)
    assert centered[0][1] == pytest.approx(1 / 36) and centered[-1][1] == 1 / (2 * 0.8**2)
    assert centered_grid(6.0, 1, 0.8) == [(0.0, 1 / 36)]
    assert shifted_grid(6.0, 1, 0.8) == [(0.8, 1 / 5.2**2)]


@pytest.mark.parametrize("angular", ["narrow", "wide"])
@pytest.mark.parametrize("grid", ["shifted", "centered"])
def test_parameters_valid_distinct_sortable(grid, angular):
    cutoff = 5.5
    functions = generate_symmetry_functions(["S", "Cu", "H"], cutoff, grid=grid, angular=angular)
    assert len(set(functions)) == len(functions)
    grouped = sort_symmetry_functions(functions)  # raises on duplicates
    assert [sf for group in grouped.values() for sf in group] == functions  # already in n2p2 order
    assert list(grouped) == ["H", "S", "Cu"]
    angular_type = {"narrow": 3, "wide": 9}[angular]
    assert {sf.type for sf in functions} == {2, angular_type}
    for sf in functions:
        assert sf.rc == cutoff
        assert math.isfinite(sf.eta) and sf.eta > 0
        assert math.isfinite(sf.rs) and 0 <= sf.rs < cutoff
        if sf.is_angular:
            assert sf.rs == 0 and sf.lam in (-1.0, 1.0) and sf.zeta in (1.0, 4.0, 16.0)
        assert SymmetryFunction.from_n2p2(sf.to_n2p2()) == sf


def test_deterministic_and_independent_of_element_order():
    a = generate_symmetry_functions(["O", "H"], 6.0)
    b = generate_symmetry_functions(["H", "O", "H"], 6.0)
    assert a == b
    assert [sf.to_n2p2() for sf in a] == [sf.to_n2p2() for sf in generate_symmetry_functions(("O", "H"))]


def test_angular_none_gives_radial_only():
    functions = generate_symmetry_functions(["O", "H"], angular="none", n_angular=0, zetas=())
    assert {sf.type for sf in functions} == {2}
    assert len(functions) == 2 * 2 * 8


def _radial_matrix(functions, r):
    rs = np.array([sf.rs for sf in functions])[:, None]
    eta = np.array([sf.eta for sf in functions])[:, None]
    return np.exp(-eta * (r[None, :] - rs) ** 2)


@pytest.mark.parametrize(
    ("cutoff", "n_radial", "r_lower", "grid"),
    [
        (6.0, 8, 0.8, "shifted"),
        (6.0, 8, 0.8, "centered"),
        (6.0, 5, 1.2, "shifted"),
        (12.0, 12, 1.0, "shifted"),
        (4.0, 16, 0.8, "shifted"),
        (8.0, 6, 1.8, "centered"),
    ],
)
def test_radial_functions_resolve_distinct_distances(cutoff, n_radial, r_lower, grid):
    functions = generate_symmetry_functions(
        ["Cu"], cutoff, n_radial=n_radial, r_lower=r_lower, grid=grid, angular="none"
    )
    assert len(functions) == n_radial
    r = np.linspace(r_lower, cutoff, 4001)
    values = _radial_matrix(functions, r)
    corr = np.corrcoef(values)
    np.fill_diagonal(corr, 0.0)
    assert corr.max() < 0.999, f"two radial functions are nearly identical (correlation {corr.max():.5f})"
    # the steepest part of each function (largest |dG/dr|) lies inside [r_lower, cutoff]
    slope_inside = np.abs(np.gradient(values, r, axis=1)).max(axis=1)
    r_all = np.linspace(0.0, 3.0 * cutoff, 30001)
    slope_all = np.abs(np.gradient(_radial_matrix(functions, r_all), r_all, axis=1)).max(axis=1)
    assert np.all(slope_inside >= 0.99 * slope_all)
    for sf in functions:  # analytically: |dG/dr| peaks at r_s +- 1/sqrt(2 eta)
        peaks = [sf.rs + s / math.sqrt(2 * sf.eta) for s in (-1, 1)]
        assert any(r_lower * (1 - 1e-12) <= p <= cutoff for p in peaks)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cutoff": 0.8}, "cutoff .* must be larger than r_lower"),
        ({"cutoff": 3.0, "r_lower": 4.0}, "must be larger than r_lower"),
        ({"cutoff": float("nan")}, "cutoff must be a finite positive length"),
        ({"r_lower": 0.0}, "r_lower must be a finite positive length"),
        ({"r_lower": -1.0}, "r_lower must be a finite positive length"),
        ({"n_radial": 0}, "n_radial must be an integer >= 1"),
        ({"n_radial": 2.5}, "n_radial must be an integer >= 1"),
        ({"n_angular": 0}, "n_angular must be an integer >= 1"),
        ({"grid": "linear"}, "unknown radial grid 'linear'.*'shifted'.*'centered'"),
        ({"angular": "both"}, "unknown angular kind 'both'.*'narrow'.*'wide'.*'none'"),
        ({"zetas": ()}, "zetas is empty"),
        ({"zetas": (1, 0.5)}, "zeta must be a finite number >= 1"),
        ({"zetas": (1, 4, 4)}, "repeated value"),
        ({"zetas": 4}, "zetas must be a sequence"),
        ({"cutoff": 1.5, "r_lower": 1.2, "grid": "centered"}, r"r_lower < cutoff / sqrt\(2\)"),
    ],
)
def test_bad_arguments_raise_helpful_errors(kwargs, message):
    with pytest.raises(MLMDError, match=message):
        generate_symmetry_functions(["O", "H"], **kwargs)


@pytest.mark.parametrize(
    ("elements", "message"),
    [
        (["O", "Xx"], "unknown element symbol 'Xx'"),
        ([], "no elements given"),
        ("CuS", "list of symbols"),
        ([8, 1], "is not a symbol"),
    ],
)
def test_bad_elements_raise_helpful_errors(elements, message):
    with pytest.raises(MLMDError, match=message):
        generate_symmetry_functions(elements)


def test_describe():
    text = describe(generate_symmetry_functions(["Cu", "S"]))
    assert text.splitlines() == [
        "176 symmetry functions for 2 elements (S, Cu), cutoff 6",
        "  S: 88 = 16 radial (type 2), 72 narrow angular (type 3)",
        "  Cu: 88 = 16 radial (type 2), 72 narrow angular (type 3)",
    ]
    assert "24 wide angular (type 9)" in describe(generate_symmetry_functions(["H"], 5.0, angular="wide"))
    assert "1 element (H), cutoff 5" in describe(generate_symmetry_functions(["H"], 5.0, angular="wide"))
    assert describe([]) == "no symmetry functions"
