"""Settings signatures of training frames: refuse to mix energy zeros, or fit one energy offset per signature.

Frames from the database carry ``info["signature_id"]`` and ``info["signature"]`` (see
:mod:`mlmd_lab.settings`). Two signatures that :func:`~mlmd_lab.settings.compare_signatures` reports an
*error* for (different code, functional or pseudopotentials; or a data set whose settings were never
declared against any other source) may have different DFT energy zeros: the trainer refuses them by default
(:func:`check_signatures`), or, with ``TrainingConfig(energy_offsets="per_signature")``, brings them to one
zero with :func:`fit_energy_offsets` and :func:`shift_energies`.

The offset model is one constant per atom per signature, fitted jointly with shared per-element reference
energies (eV): ``E_i = sum_e n_ie mu_e + N_i c_s(i)``, ``c = 0`` for the *reference* signature (the one with
the most frames; ties: the smallest id). Why per atom and not a per-element set per signature: one
stoichiometry (water from two codes, the case of issue 14.2) determines only the offset per formula unit, not
its split between H and O, and per-element offsets would also absorb the composition dependence (formation
energies) that compositions present in one signature only carry. The per-atom offset is exact when the
signatures share one stoichiometry or the shift is the same for every element; otherwise it is the best
per-atom approximation over the compositions the signatures share. An offset that the data cannot determine
(no composition in common with the others) is an error, not a guess.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from mlmd_lab.errors import MixedSettingsError
from mlmd_lab.frames import content_hash, results_of
from mlmd_lab.settings import Conflict, compare_signatures, describe_signature, with_dataset

#: Sources named per signature in messages.
_SHOW_SOURCES = 2
#: Signatures listed in the refusal message.
_SHOW_SIGNATURES = 4


@dataclass
class SignatureGroup:
    """The frames of one settings signature: its id, the signature, frame count, sources and elements."""

    signature_id: str | None
    signature: dict[str, Any]
    frames: int = 0
    sources: list[str] = field(default_factory=list)
    elements: set[str] = field(default_factory=set)

    def describe(self) -> str:
        shown = ", ".join(self.sources[:_SHOW_SOURCES])
        more = f" and {len(self.sources) - _SHOW_SOURCES} more" if len(self.sources) > _SHOW_SOURCES else ""
        where = f", from {shown}{more}" if shown else ""
        name = (self.signature_id or "none")[:12]
        return f"{name} ({self.frames} frames, {describe_signature(self.signature)}{where})"


def signature_groups(frames: Sequence[Atoms]) -> dict[str | None, SignatureGroup]:
    """Frames grouped by ``info["signature_id"]`` (None: frames without one), in order of first appearance.

    A frame whose signature declares no settings and has no data-set identity (set by hand, or read by an
    older version) is given its signature id as identity, so it is not taken to match any other source.
    """
    groups: dict[str | None, SignatureGroup] = {}
    for atoms in frames:
        sig_id = atoms.info.get("signature_id")
        group = groups.get(sig_id)
        if group is None:
            sig = atoms.info.get("signature") or {}
            group = groups[sig_id] = SignatureGroup(sig_id, with_dataset(sig, sig_id) if sig_id else dict(sig))
        group.frames += 1
        source = atoms.info.get("source") or atoms.info.get("calc_id")
        if source and source not in group.sources:
            group.sources.append(str(source))
        group.elements.update(atoms.get_chemical_symbols())
    return groups


def signature_conflicts(groups: dict[str | None, SignatureGroup]) -> list[tuple[str, str, Conflict]]:
    """``(id_a, id_b, conflict)`` for every pair of signatures (frames without a signature are not compared)."""
    named = [g for k, g in groups.items() if k is not None]
    out = []
    for i, a in enumerate(named):
        for b in named[i + 1:]:
            shared = sorted(a.elements & b.elements) or None
            for c in compare_signatures(a.signature, b.signature, elements=shared):
                out.append((a.signature_id, b.signature_id, c))
    return out


def check_signatures(groups: dict[str | None, SignatureGroup]) -> list[Conflict]:
    """Raise :class:`~mlmd_lab.errors.MixedSettingsError` if two signatures must not be mixed; return the
    warning-level conflicts (settings that differ in ways worth knowing)."""
    conflicts = signature_conflicts(groups)
    errors = [(a, b, c) for a, b, c in conflicts if c.severity == "error"]
    if errors:
        raise MixedSettingsError(_refusal(groups, errors))
    return [c for *_, c in conflicts]


def _refusal(groups: dict[str | None, SignatureGroup], errors: list[tuple[str, str, Conflict]]) -> str:
    involved = [groups[k] for k in groups if k is not None and any(k in (a, b) for a, b, _ in errors)]
    listed = "; ".join(g.describe() for g in involved[:_SHOW_SIGNATURES])
    if len(involved) > _SHOW_SIGNATURES:
        listed += f"; and {len(involved) - _SHOW_SIGNATURES} more"
    first = involved[0]
    pick = (f"settings={{'dataset': {first.signature['dataset']!r}}}" if first.signature.get("dataset")
            else f"query={{'signature_id': {first.signature_id!r}}}")
    _, _, conflict = errors[0]
    reason = conflict.message.split("; ")[0].rstrip(".")
    declare = ("; or, if they share one energy zero, declare it at ingest: their settings "
               "(db.ingest(path, settings={'code': ..., 'xc': ...}), CLI --settings code=... xc=...) or one "
               "data-set name for all of them (settings={'dataset': 'NAME'})" if conflict.key == "dataset" else "")
    return (f"the frames mix {len(involved)} settings signatures whose energies must not be trained together: "
            f"{listed}. [{conflict.key}] {reason}. Fix: train on one signature, e.g. db.frames(..., {pick}); or "
            "fit one energy offset per signature with Trainer(..., energy_offsets='per_signature'), which puts "
            f"every label in the energy zero of the signature with the most frames{declare}.")


@dataclass
class EnergyOffsets:
    """Fitted energy zeros: ``per_atom[sig_id]`` (eV/atom) is signature ``sig_id``'s energy zero minus that of
    ``reference``; labels are corrected by ``E - N * per_atom[sig_id]``."""

    reference: str | None
    per_atom: dict[str | None, float]
    groups: dict[str | None, SignatureGroup]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able provenance (signature ids as keys; ``"none"`` for frames without a signature)."""
        return {
            "mode": "per_signature",
            "unit": "eV/atom",
            "reference": self.reference,
            "signatures": {
                (k or "none"): {"offset_per_atom": self.per_atom[k], "frames": g.frames, "sources": g.sources,
                                "settings": describe_signature(g.signature)}
                for k, g in self.groups.items()
            },
        }


def fit_energy_offsets(frames: Sequence[Atoms],
                       groups: dict[str | None, SignatureGroup] | None = None) -> EnergyOffsets:
    """One energy offset per signature (eV/atom) relative to the reference signature; see the module docstring.

    Raises:
        MixedSettingsError: a signature's offset is not determined by the data (it shares no composition with
            the others), or no frame has an energy.
    """
    groups = groups if groups is not None else signature_groups(frames)
    reference = min(groups, key=lambda k: (-groups[k].frames, str(k)))
    others = [k for k in groups if k != reference]
    elements = sorted({e for g in groups.values() for e in g.elements})
    rows, energies = [], []
    for atoms in frames:
        res = results_of(atoms)
        e = res.get("energy", res.get("free_energy"))
        if e is None:
            continue
        symbols = atoms.get_chemical_symbols()
        sig_id = atoms.info.get("signature_id")
        rows.append([symbols.count(el) for el in elements] + [len(atoms) * (sig_id == k) for k in others])
        energies.append(float(e))
    if not rows:
        raise MixedSettingsError("no frame has an energy, so no energy offsets can be fitted; label the frames "
                                 "or train with energy_offsets='shared'")
    X, y = np.asarray(rows, float), np.asarray(energies)
    rank = np.linalg.matrix_rank(X)
    for j, k in enumerate(others):
        if not X[:, len(elements) + j].any():
            continue  # no energies in this signature: nothing to shift (forces do not depend on the offset)
        if np.linalg.matrix_rank(np.delete(X, len(elements) + j, axis=1)) == rank:
            raise MixedSettingsError(
                f"the energy offset of signature {groups[k].describe()} cannot be fitted: its frames share no "
                "composition with the other signatures, so an offset cannot be told apart from per-element "
                "energies; add frames of a composition the signatures share, or train on one signature")
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    per_atom = {reference: 0.0, **{k: float(c) for k, c in zip(others, coef[len(elements):], strict=True)}}
    return EnergyOffsets(reference, per_atom, groups)


def shift_energies(frames: Sequence[Atoms], offsets: EnergyOffsets) -> list[Atoms]:
    """The frames with energies in the reference signature's zero (``E - N * offset``, eV): copies for shifted
    frames (forces and stresses unchanged: the offset does not depend on positions), the originals otherwise.
    Each copy keeps the original's frame id and records ``info["energy_offset_per_atom"]`` (eV/atom)."""
    out = []
    for atoms in frames:
        c = offsets.per_atom.get(atoms.info.get("signature_id"), 0.0)
        if c == 0.0:
            out.append(atoms)
            continue
        res = results_of(atoms)
        new = atoms.copy()
        new.info.setdefault("frame_id", atoms.info.get("frame_id") or content_hash(atoms))
        new.info["energy_offset_per_atom"] = c
        for key in ("energy", "free_energy"):
            if res.get(key) is not None:
                res[key] = float(res[key]) - c * len(atoms)
        new.calc = SinglePointCalculator(new, **res)
        out.append(new)
    return out
