"""Can two data sets be mixed? Setting conflicts and reference-energy shifts between FrameSets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mlmd_lab.frames import results_of
from mlmd_lab.frameset import FrameSet
from mlmd_lab.settings import Conflict, compare_signatures, describe_signature


@dataclass
class ReferenceShift:
    """Energy offset of set B relative to set A (eV): per element, or per atom on shared structures.

    ``method`` is ``"shared structures"`` (exact: the same geometries computed in both sets) or
    ``"regression"`` (per-element energies fitted by least squares in each set; this includes real
    differences between the sets' structures, so treat it as an estimate).
    """

    per_element: dict[str, float]
    method: str
    n_shared_structures: int = 0
    undetermined: list[str] = field(default_factory=list)
    #: median energy per atom of B minus that of A for each reduced formula present in both (eV/atom)
    per_composition: dict[str, float] = field(default_factory=dict)


@dataclass
class CompatibilityReport:
    """Result of ``db.compatible(a, b)``: ``ok`` is False when any conflict is an error."""

    conflicts: list[Conflict]
    shift: ReferenceShift | None
    signatures_a: int
    signatures_b: int
    #: one line per settings signature of each set: id, frames, settings (or "not declared") and sources
    signature_lines: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(c.severity == "error" for c in self.conflicts)

    def __str__(self) -> str:
        head = "compatible" if self.ok else "NOT compatible"
        lines = [f"{head}: {len(self.conflicts)} conflict(s) between {self.signatures_a} and "
                 f"{self.signatures_b} settings signature(s)"]
        lines += [f"  {line}" for line in self.signature_lines]
        lines += [f"  [{c.severity}] {c.key}: {c.a!r} vs {c.b!r} — {c.message}" for c in self.conflicts]
        if self.shift and self.shift.per_element:
            vals = ", ".join(f"{el} {v:+.4f}" for el, v in self.shift.per_element.items())
            lines.append(f"  reference-energy shift B−A (eV/atom, {self.shift.method}): {vals}")
        if self.shift and self.shift.undetermined:
            lines.append(f"  per-element shift undetermined for: {', '.join(self.shift.undetermined)}")
        if self.shift and self.shift.per_composition:
            vals = ", ".join(f"{f} {v:+.4f}" for f, v in self.shift.per_composition.items())
            lines.append(f"  energy per atom B−A for shared compositions (eV/atom, median): {vals}")
        return "\n".join(lines)


def compare_sets(a: FrameSet, b: FrameSet) -> CompatibilityReport:
    """Compare every settings signature of ``a`` with every one of ``b`` (and each set with itself)."""
    sigs_a, sigs_b = a.signatures(), b.signatures()
    elements = sorted(_species(a) & _species(b))
    conflicts: list[Conflict] = []
    seen: set[tuple[Any, ...]] = set()
    pairs = [(x, y) for x in sigs_a.values() for y in sigs_b.values()]
    pairs += _within(sigs_a) + _within(sigs_b)
    for x, y in pairs:
        for c in compare_signatures(x, y, elements=elements or None):
            key = (c.key, repr(c.a), repr(c.b))
            if key not in seen:
                seen.add(key)
                conflicts.append(c)
    for name, frames in (("first", a), ("second", b)):
        conflicts += _mixed_references(frames, name)
    lines = _signature_lines(a, "first") + _signature_lines(b, "second")
    return CompatibilityReport(conflicts, reference_shift(a, b), len(sigs_a), len(sigs_b), lines)


def _signature_lines(frames: FrameSet, name: str) -> list[str]:
    """``"first set: signature 3fa2c1d4e5f6 (20 frames, settings not declared, ..., from a.xyz)"`` per signature."""
    groups: dict[str, tuple[list[int], list[str], dict[str, Any]]] = {}
    for f in frames:
        sig_id = f.info.get("signature_id")
        if not sig_id:
            continue
        count, sources, _ = groups.setdefault(sig_id, ([0], [], f.info.get("signature") or {}))
        count[0] += 1
        source = f.info.get("source")
        if source and source not in sources:
            sources.append(str(source))
    out = []
    for sig_id, (count, sources, sig) in groups.items():
        where = f", from {', '.join(sources[:2])}{f' and {len(sources) - 2} more' if len(sources) > 2 else ''}" \
            if sources else ""
        out.append(f"{name} set: signature {sig_id[:12]} ({count[0]} frames, {describe_signature(sig)}{where})")
    return out


#: Spread of the median energy per atom between sources of one composition that signals different
#: energy references (eV/atom): far above physical differences between structures of one composition.
REFERENCE_SPREAD = 1.0


def _mixed_references(frames: FrameSet, name: str) -> list[Conflict]:
    """An error for each composition whose sources (calculations) disagree on the energy zero."""
    by_comp: dict[str, dict[str, list[float]]] = {}
    for f in frames:
        e = results_of(f).get("energy")
        if e is not None:
            comp = f.get_chemical_formula("hill", empirical=True)
            by_comp.setdefault(comp, {}).setdefault(f.info.get("calc_id", "?"), []).append(e / len(f))
    out = []
    for comp, sources in by_comp.items():
        medians = {k: float(np.median(v)) for k, v in sources.items()}
        lo, hi = min(medians.values()), max(medians.values())
        if hi - lo > REFERENCE_SPREAD:
            out.append(Conflict("energy_reference", round(lo, 4), round(hi, 4), "error",
                                f"In the {name} set, {comp} frames from {len(medians)} sources differ by "
                                f"{hi - lo:.2f} eV/atom in their median energy: they use different energy "
                                "references (code, pseudopotentials or units); select one source or check units."))
    return out


def _species(frames: FrameSet) -> set[str]:
    return {s for f in frames for s in f.get_chemical_symbols()}


def _within(sigs: dict[str, dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    vals = list(sigs.values())
    return [(vals[i], vals[j]) for i in range(len(vals)) for j in range(i + 1, len(vals))]


def reference_shift(a: FrameSet, b: FrameSet) -> ReferenceShift | None:
    """Per-element energy shift of B relative to A (eV per atom of that element).

    Uses frames with identical structures in both sets when there are any (exact); otherwise fits
    ``E = Σ_el n_el μ_el`` in each set and reports ``μ_B − μ_A`` for shared elements whose μ is
    determined by both sets' compositions (a single stoichiometry, e.g. only water, cannot separate
    μ_H from μ_O: those elements are listed as undetermined).
    """
    shared = _shared_structures(a, b)
    if shared:
        diffs = np.array([(eb - ea) / n for ea, eb, n in shared])
        els = sorted(_species(a))
        # same geometry in both: one per-atom offset; reported per element only if one element
        value = float(np.median(diffs))
        return ReferenceShift({"per_atom" if len(els) > 1 else els[0]: value}, "shared structures", len(shared))
    fit_a, fit_b = _fit_mu(a), _fit_mu(b)
    if fit_a is None or fit_b is None:
        return None
    (mu_a, det_a), (mu_b, det_b) = fit_a, fit_b
    common = sorted(set(mu_a) & set(mu_b))
    per = {el: mu_b[el] - mu_a[el] for el in common if det_a[el] and det_b[el]}
    ea, eb = _per_atom_by_composition(a), _per_atom_by_composition(b)
    per_comp = {c: float(np.median(eb[c]) - np.median(ea[c])) for c in sorted(set(ea) & set(eb))}
    return ReferenceShift(per, "regression", 0, [el for el in common if el not in per], per_comp)


def _per_atom_by_composition(frames: FrameSet) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for f in frames:
        e = results_of(f).get("energy")
        if e is not None:
            out.setdefault(f.get_chemical_formula("hill", empirical=True), []).append(e / len(f))
    return out


def _structure_key(atoms) -> tuple:
    return (tuple(atoms.numbers), np.round(atoms.positions, 4).tobytes(), np.round(atoms.cell.array, 4).tobytes())


def _shared_structures(a: FrameSet, b: FrameSet) -> list[tuple[float, float, int]]:
    index = {}
    for f in a:
        e = results_of(f).get("energy")
        if e is not None:
            index[_structure_key(f)] = e
    out = []
    for f in b:
        e = results_of(f).get("energy")
        key = _structure_key(f)
        if e is not None and key in index:
            out.append((index[key], e, len(f)))
    return out


def _fit_mu(frames: FrameSet) -> tuple[dict[str, float], dict[str, bool]] | None:
    """Least-squares per-element energies and, per element, whether the compositions determine it."""
    rows, energies = [], []
    els = sorted(_species(frames))
    if not els:
        return None
    for f in frames:
        e = results_of(f).get("energy")
        if e is None:
            continue
        symbols = f.get_chemical_symbols()
        rows.append([symbols.count(el) for el in els])
        energies.append(e)
    if not rows:
        return None
    X, y = np.asarray(rows, float), np.asarray(energies)
    mu, *_ = np.linalg.lstsq(X, y, rcond=None)
    # element k is determined iff the unit vector e_k lies in the row space of X
    _, s, vt = np.linalg.svd(X, full_matrices=False)
    basis = vt[s > s.max() * 1e-10]
    determined = {el: bool(np.linalg.norm(basis.T @ basis[:, k]) > 1 - 1e-8) for k, el in enumerate(els)}
    return dict(zip(els, mu.tolist(), strict=True)), determined
