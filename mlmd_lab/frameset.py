"""FrameSet: a sequence of labelled ASE ``Atoms`` — what a database query returns and training consumes."""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import numpy as np
from ase import Atoms

from mlmd_lab.files import atomic_path as _atomic_path
from mlmd_lab.frames import content_hash, results_of


@dataclass
class FrameSetSummary:
    """Counts per composition and value ranges of a FrameSet (energies eV/atom, forces eV/Å)."""

    frames: int
    atoms: int
    compositions: dict[str, int]
    elements: list[str]
    natoms_range: tuple[int, int] | None
    energy_per_atom_range: tuple[float, float] | None
    energy_per_atom_std: float | None
    max_force: float | None
    force_rms: float | None
    with_stress: int
    signatures: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        if not self.frames:
            return "empty FrameSet"
        lo, hi = self.energy_per_atom_range or (float("nan"), float("nan"))
        lines = [
            f"{self.frames} frames, {self.atoms} atoms, elements {' '.join(self.elements)}",
            f"atoms per frame {self.natoms_range[0]}–{self.natoms_range[1]}"
            if self.natoms_range else "atoms per frame -",
            f"energy/atom {lo:.4f} … {hi:.4f} eV (std {self.energy_per_atom_std or 0:.4f})",
            f"forces: rms {self.force_rms or 0:.3f} eV/Å, max {self.max_force or 0:.3f} eV/Å; "
            f"{self.with_stress} frames with stress",
            f"settings signatures: {len(self.signatures)}",
            "compositions:",
        ]
        lines += [f"  {formula:<24} {n:>7}" for formula, n in self.compositions.items()]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in self.compositions.items())
        head = str(self).split("compositions:")[0].replace("\n", "<br>")
        return f"<div>{head}</div><table><tr><th>formula</th><th>frames</th></tr>{rows}</table>"


class FrameSet(Sequence[Atoms]):
    """An ordered collection of labelled frames (ASE ``Atoms`` with single-point results).

    Frames from the database carry ``info['frame_id']``, ``calc_id``, ``source``, ``signature`` and
    ``tags``. Indexing with an int gives an ``Atoms``; with a slice or index array, a FrameSet.
    """

    def __init__(self, frames: Iterable[Atoms] = (), query: dict[str, Any] | None = None) -> None:
        self._frames: list[Atoms] = list(frames)
        self.query = query

    def __len__(self) -> int:
        return len(self._frames)

    @overload
    def __getitem__(self, index: int) -> Atoms: ...

    @overload
    def __getitem__(self, index: slice | Sequence[int] | np.ndarray) -> FrameSet: ...

    def __getitem__(self, index):
        if isinstance(index, int | np.integer):
            return self._frames[int(index)]
        if isinstance(index, slice):
            return FrameSet(self._frames[index])
        return FrameSet(self._frames[int(i)] for i in np.asarray(index).ravel())

    def __iter__(self) -> Iterator[Atoms]:
        return iter(self._frames)

    def __add__(self, other: Iterable[Atoms]) -> FrameSet:
        return FrameSet([*self._frames, *other])

    def __repr__(self) -> str:
        comps = Counter(a.get_chemical_formula("hill", empirical=True) for a in self._frames)
        top = ", ".join(f"{k}×{v}" for k, v in comps.most_common(4))
        return f"<FrameSet {len(self)} frames{': ' + top if top else ''}{' …' if len(comps) > 4 else ''}>"

    @property
    def ids(self) -> list[str]:
        """Frame ids (database content hashes; computed for frames that have none)."""
        return [a.info.get("frame_id") or content_hash(a) for a in self._frames]

    # -- splitting ------------------------------------------------------------------------------
    def split(
        self, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0, group_by: str | None = None
    ) -> tuple[FrameSet, ...]:
        """Split reproducibly into parts of the given fractions (e.g. train/validation/test).

        Frames are ordered by a hash of ``(seed, frame id)``, so the split depends only on the frames
        and the seed — not on query order — and adding frames moves few existing ones. With
        ``group_by="calc_id"`` whole calculations (e.g. MD trajectories) stay on one side, so correlated
        neighbouring steps do not leak from training into validation.
        """
        fr = np.asarray(fractions, dtype=float)
        if fr.ndim != 1 or (fr < 0).any() or not np.isclose(fr.sum(), 1.0):
            raise ValueError(f"fractions {list(fractions)} must be non-negative and sum to 1")
        keys = [a.info.get(group_by) or fid for a, fid in zip(self._frames, self.ids, strict=True)] \
            if group_by else self.ids
        unique = sorted(set(keys), key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).digest())
        bounds = np.round(np.cumsum(fr) * len(unique)).astype(int)
        part_of = {k: int(np.searchsorted(bounds, i, side="right")) for i, k in enumerate(unique)}
        parts: list[list[Atoms]] = [[] for _ in fr]
        for atoms, key in zip(self._frames, keys, strict=True):
            parts[min(part_of[key], len(fr) - 1)].append(atoms)
        return tuple(FrameSet(p) for p in parts)

    # -- summaries ------------------------------------------------------------------------------
    def summary(self) -> FrameSetSummary:
        """Counts per reduced composition, species, and ranges of energy per atom and forces."""
        comps: Counter[str] = Counter()
        elements: set[str] = set()
        epa, fmax, f2, nf, natoms, sigs = [], [], 0.0, 0, [], Counter()
        with_stress = 0
        for atoms in self._frames:
            comps[atoms.get_chemical_formula("hill", empirical=True)] += 1
            elements.update(atoms.get_chemical_symbols())
            natoms.append(len(atoms))
            res = results_of(atoms)
            if res.get("energy") is not None:
                epa.append(res["energy"] / len(atoms))
            if res.get("forces") is not None:
                f = np.asarray(res["forces"])
                fmax.append(float(np.linalg.norm(f, axis=1).max()) if len(f) else 0.0)
                f2 += float((f**2).sum())
                nf += f.size
            with_stress += res.get("stress") is not None
            sigs[atoms.info.get("signature_id") or "unknown"] += 1
        return FrameSetSummary(
            frames=len(self),
            atoms=int(sum(natoms)),
            compositions=dict(comps.most_common()),
            elements=sorted(elements),
            natoms_range=(min(natoms), max(natoms)) if natoms else None,
            energy_per_atom_range=(min(epa), max(epa)) if epa else None,
            energy_per_atom_std=float(np.std(epa)) if epa else None,
            max_force=max(fmax) if fmax else None,
            force_rms=float(np.sqrt(f2 / nf)) if nf else None,
            with_stress=with_stress,
            signatures=dict(sigs),
        )

    def signatures(self) -> dict[str, dict[str, Any]]:
        """The distinct settings signatures in this set, by signature id."""
        out: dict[str, dict[str, Any]] = {}
        for atoms in self._frames:
            sig_id = atoms.info.get("signature_id")
            if sig_id and sig_id not in out:
                out[sig_id] = atoms.info.get("signature") or {}
        return out

    def credit(self) -> list[dict[str, Any]]:
        """Whose data this is: one entry per (owner, data set, licence) with its frame count and contributors.

        Frames from the database carry ``info["owner"]`` (from where they live on the server),
        ``["dataset"]`` and ``["licence"]``; frames made in memory count as ``owner=None``. A potential
        trained on the set records this list (``provenance["credit"]``).
        """
        rows: dict[tuple, dict[str, Any]] = {}
        for atoms in self._frames:
            info = atoms.info
            key = (info.get("owner"), info.get("dataset"), info.get("licence"))
            row = rows.setdefault(key, {"owner": key[0], "dataset": key[1], "licence": key[2], "frames": 0,
                                        "contributors": list(info.get("contributors") or []),
                                        "visibility": info.get("visibility")})
            row["frames"] += 1
        return sorted(rows.values(), key=lambda r: (str(r["owner"]), str(r["dataset"])))

    # -- export -----------------------------------------------------------------------------------
    def to_extxyz(self, path: str | os.PathLike) -> None:
        """Write extended XYZ (eV, Å) keeping results and metadata (frame ids, source, signature)."""
        from mlmd_lab.io.extxyz import write_extxyz

        with _atomic_path(path) as tmp:
            write_extxyz(tmp, self._frames)

    def to_n2p2(self, path: str | os.PathLike, energy_unit: str = "eV", length_unit: str = "Angstrom") -> None:
        """Write n2p2 ``input.data`` in the given units (n2p2 itself stores none: remember them)."""
        from mlmd_lab.io.n2p2 import write_input_data

        with _atomic_path(path) as tmp:
            write_input_data(tmp, self._frames, energy_unit=energy_unit, length_unit=length_unit)

    def to_deepmd(self, path: str | os.PathLike, set_size: int = 5000) -> None:
        """Write DeePMD npy folders (eV, Å). DeePMD needs one atom order per system, so a set with
        several species sequences becomes one sub-folder each: ``path/<formula>[_k]/``."""
        from mlmd_lab.io.deepmd import write_deepmd

        groups: dict[tuple[int, ...], list[Atoms]] = {}
        for atoms in self._frames:
            groups.setdefault(tuple(int(z) for z in atoms.numbers), []).append(atoms)
        names: Counter[str] = Counter()
        with _atomic_path(path) as tmp:
            for frames in groups.values():
                formula = frames[0].get_chemical_formula("hill")
                names[formula] += 1
                name = formula if names[formula] == 1 else f"{formula}_{names[formula]}"
                write_deepmd(tmp / name if len(groups) > 1 else tmp, frames, set_size=set_size)
