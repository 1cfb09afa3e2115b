"""Atom-centred symmetry functions as n2p2 defines them (types 2, 3 and 9).

With f_c the cutoff function (see :mod:`mlmd_lab.potentials.cutoff`), for a central atom i:

- type 2, radial:  G = sum_j exp(-eta (r_ij - r_s)^2) f_c(r_ij)  over neighbours j of the given element;
- type 3, narrow angular:  G = 2^(1-zeta) sum_{j<k} (1 + lambda cos theta_ijk)^zeta
  exp(-eta [(r_ij - r_s)^2 + (r_ik - r_s)^2 + (r_jk - r_s)^2]) f_c(r_ij) f_c(r_ik) f_c(r_jk);
- type 9, wide angular: as type 3 without the r_jk terms.

Angular sums run over unordered neighbour pairs {j, k} whose elements are the SF's two neighbour elements.
eta is in 1/length^2, r_s and r_c in the model's length unit (whatever ``input.nn`` uses). n2p2 orders each
element's symmetry functions by (type, r_c, eta, r_s, zeta, lambda, neighbour elements), elements by atomic
number; :func:`sort_key` reproduces that order, which is also the order of the network inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ase.data import atomic_numbers

from mlmd_lab.errors import MLMDError

RADIAL_TYPES = (2,)
ANGULAR_TYPES = (3, 9)
SUPPORTED_TYPES = RADIAL_TYPES + ANGULAR_TYPES


def atomic_number(symbol: str) -> int:
    """Atomic number of an element symbol, with a clear error for a typo."""
    try:
        return atomic_numbers[symbol]
    except KeyError:
        raise MLMDError(f"unknown element symbol {symbol!r} (use symbols such as 'H', 'Cu')") from None


def sort_elements(symbols) -> tuple[str, ...]:
    """Elements in n2p2's order (by atomic number), duplicates removed."""
    return tuple(sorted(set(symbols), key=atomic_number))


@dataclass(frozen=True)
class SymmetryFunction:
    """One symmetry function of a central element.

    Attributes:
        element: central element symbol.
        type: n2p2 type, 2 (radial), 3 (narrow angular) or 9 (wide angular).
        neighbours: neighbour element(s): one for radial, two (ordered by atomic number) for angular.
        eta: Gaussian width in 1/length^2.
        rc: cutoff radius (length).
        rs: Gaussian centre (length); 0 for the usual angular functions.
        lam: lambda, +1 or -1 (angular only).
        zeta: angular exponent (angular only), any positive real; integer values are evaluated exactly.
    """

    element: str
    type: int
    neighbours: tuple[str, ...]
    eta: float
    rc: float
    rs: float = 0.0
    lam: float = 1.0
    zeta: float = 1.0

    def __post_init__(self) -> None:
        if self.type not in SUPPORTED_TYPES:
            raise MLMDError(
                f"symmetry function type {self.type} is not supported; mlmd_lab evaluates n2p2 types 2 (radial), "
                "3 (narrow angular) and 9 (wide angular)"
            )
        want = 1 if self.type in RADIAL_TYPES else 2
        if len(self.neighbours) != want:
            raise MLMDError(f"type {self.type} symmetry function needs {want} neighbour element(s): {self}")
        for symbol in (self.element, *self.neighbours):
            atomic_number(symbol)
        if self.rc <= 0 or self.eta < 0:
            raise MLMDError(f"symmetry function needs rc > 0 and eta >= 0: {self}")
        if self.is_angular:
            if self.lam not in (1.0, -1.0):
                raise MLMDError(f"angular symmetry function needs lambda = +1 or -1: {self}")
            if self.zeta < 1.0:
                raise MLMDError(f"angular symmetry function needs zeta >= 1: {self}")
            if atomic_number(self.neighbours[0]) > atomic_number(self.neighbours[1]):
                object.__setattr__(self, "neighbours", (self.neighbours[1], self.neighbours[0]))

    @property
    def is_angular(self) -> bool:
        return self.type in ANGULAR_TYPES

    def scaled(self, length_factor: float) -> SymmetryFunction:
        """The same function with lengths multiplied by ``length_factor`` (eta divided by its square)."""
        return replace(self, eta=self.eta / length_factor**2, rc=self.rc * length_factor, rs=self.rs * length_factor)

    def to_n2p2(self) -> str:
        """The ``symfunction_short`` line n2p2 reads (full precision)."""
        e = self.element
        if self.type in RADIAL_TYPES:
            n1 = self.neighbours[0]
            return f"symfunction_short {e:2s} {self.type} {n1:2s} {_f(self.eta)} {_f(self.rs)} {_f(self.rc)}"
        n1, n2 = self.neighbours
        return (
            f"symfunction_short {e:2s} {self.type} {n1:2s} {n2:2s} {_f(self.eta)} {self.lam:+.0f} "
            f"{_f(self.zeta)} {_f(self.rc)} {_f(self.rs)}"
        )

    @classmethod
    def from_n2p2(cls, line: str) -> SymmetryFunction:
        """Parse the arguments of a ``symfunction_short`` line (keyword optional)."""
        words = line.split("#", 1)[0].split()
        if words and words[0] == "symfunction_short":
            words = words[1:]
        try:
            element, sf_type = words[0], int(words[1])
            if sf_type in RADIAL_TYPES:
                eta, rs, rc = (float(w) for w in words[3:6])
                return cls(element, sf_type, (words[2],), eta=eta, rc=rc, rs=rs)
            if sf_type in ANGULAR_TYPES:
                eta, lam, zeta, rc = (float(w) for w in words[4:8])
                rs = float(words[8]) if len(words) > 8 else 0.0
                return cls(element, sf_type, (words[2], words[3]), eta=eta, rc=rc, rs=rs, lam=lam, zeta=zeta)
        except (IndexError, ValueError):
            raise MLMDError(f"cannot read symmetry function line {line.strip()!r}") from None
        raise MLMDError(
            f"symmetry function type {sf_type} in {line.strip()!r} is not supported; mlmd_lab evaluates n2p2 types "
            "2, 3 and 9 (rewrite the others as these, or evaluate that potential with n2p2)"
        )


def sort_key(sf: SymmetryFunction) -> tuple:
    """n2p2's ordering of a central element's symmetry functions (SymFnc::operator<)."""
    neighbours = tuple(atomic_number(e) for e in sf.neighbours)
    if sf.is_angular:
        return (atomic_number(sf.element), sf.type, sf.rc, sf.eta, sf.rs, sf.zeta, sf.lam, neighbours)
    return (atomic_number(sf.element), sf.type, sf.rc, sf.eta, sf.rs, 0.0, 0.0, neighbours)


def sort_symmetry_functions(functions) -> dict[str, tuple[SymmetryFunction, ...]]:
    """Group by central element (elements by atomic number) in n2p2's order; duplicates are an error."""
    by_element: dict[str, list[SymmetryFunction]] = {}
    for sf in functions:
        by_element.setdefault(sf.element, []).append(sf)
    result = {}
    for element in sort_elements(by_element):
        ordered = sorted(by_element[element], key=sort_key)
        for a, b in zip(ordered, ordered[1:], strict=False):
            if a == b:
                raise MLMDError(f"symmetry function given twice: {a.to_n2p2()}")
        result[element] = tuple(ordered)
    return result


def _f(value: float) -> str:
    """Shortest text that reads back to the same float."""
    return repr(float(value))
