"""Build a nested tree of unique first-principles run files from the sample VASP and QE outputs.

Each copy ``run_NNN/`` holds the 4 sample ``vasprun.*.xml`` files under ``vasp/`` and the 2 pw.x outputs (with
their ``.in`` inputs beside them) under ``qe/``. Every energy in the text is shifted by a tiny amount unique to
(copy, file), keeping the number format, so no frame of the tree is a duplicate of another (the sample
``vasprun.h2o.md.duplicate.xml`` would otherwise duplicate the frames of ``vasprun.h2o.md.xml``):

- VASP: every ``<i name="e_fr_energy|e_wo_entrp|e_0_energy">`` value, shifted by ``k * 1e-5`` eV;
- QE: the ``!    total energy = ... Ry`` line(s), shifted by ``k * 1e-6`` Ry;

with ``k = copy * 6 + file index + 1`` (≥ 1: no copy equals the original sample).

    python benchmarks/make_tree.py DEST [--copies 40] [--no-verify]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

SAMPLES = Path("/work/shared/external")
VASP_FILES = sorted((SAMPLES / "vasp").glob("vasprun*.xml"))
QE_FILES = [SAMPLES / "qe" / "01.out", SAMPLES / "qe" / "03.out"]
VASP_STEP_EV = 1e-5
QE_STEP_RY = 1e-6

_VASP_ENERGY = re.compile(r'(<i name="(?:e_fr_energy|e_wo_entrp|e_0_energy)">)(\s*-?\d+\.\d+)(\s*</i>)')
_QE_ENERGY = re.compile(r"(!\s+total energy\s+=)(\s*-?\d+\.\d+)(\s+Ry)")


def _shift(pattern: re.Pattern[str], text: str, delta: float) -> tuple[str, int]:
    """Add ``delta`` to the number in group 2 of every match, keeping its decimals and field width."""

    def repl(m: re.Match[str]) -> str:
        field = m.group(2)
        decimals = len(field.split(".")[1])
        new = f"{float(field) + delta:.{decimals}f}".rjust(len(field))
        if not new.startswith((" ", "\t")) and field[:1].isspace():
            new = " " + new  # keep a separator if the number grew a digit
        return m.group(1) + new + m.group(3)

    return pattern.subn(repl, text)


def sources() -> list[tuple[Path, str, str]]:
    """``(sample path, sub-folder, kind)`` of the run files one copy holds, in file-index order."""
    return [(p, "vasp", "vasp") for p in VASP_FILES] + [(p, "qe", "qe") for p in QE_FILES]


def make_tree(dest: str | Path, copies: int = 40, verify: bool = True) -> dict:
    """Write ``copies`` perturbed copies of the samples below ``dest``; return counts and sizes.

    Returns a dict: ``copies``, ``run_files`` (vasprun.xml + pw.x outputs), ``input_files`` (pw.x ``.in``),
    ``run_bytes`` (bytes of the run files), ``total_bytes`` (all files written), ``substitutions``
    (energies changed), ``run_paths`` (list of ``(path, ase_format)``), ``verified`` (bool).
    """
    dest = Path(dest)
    srcs = sources()
    if len(VASP_FILES) != 4 or not all(p.exists() for p, *_ in srcs):
        raise FileNotFoundError(f"sample files missing under {SAMPLES}")
    texts = {p: p.read_text() for p, *_ in srcs}
    inputs = {p: p.with_suffix(".in").read_bytes() for p in QE_FILES}
    run_paths: list[tuple[str, str]] = []
    run_bytes = total_bytes = subs = 0
    for c in range(copies):
        for i, (src, sub, kind) in enumerate(srcs):
            k = c * len(srcs) + i + 1
            folder = dest / f"run_{c:03d}" / sub
            folder.mkdir(parents=True, exist_ok=True)
            if kind == "vasp":
                text, n = _shift(_VASP_ENERGY, texts[src], k * VASP_STEP_EV)
                fmt = "vasp-xml"
            else:
                text, n = _shift(_QE_ENERGY, texts[src], k * QE_STEP_RY)
                fmt = "espresso-out"
                (folder / src.with_suffix(".in").name).write_bytes(inputs[src])
                total_bytes += len(inputs[src])
            if n == 0:
                raise RuntimeError(f"no energy found to perturb in {src}")
            out = folder / src.name
            data = text.encode()
            out.write_bytes(data)
            run_paths.append((str(out), fmt))
            run_bytes += len(data)
            total_bytes += len(data)
            subs += n
    info = {
        "copies": copies,
        "run_files": len(run_paths),
        "input_files": copies * len(QE_FILES),
        "run_bytes": run_bytes,
        "total_bytes": total_bytes,
        "substitutions": subs,
        "run_paths": run_paths,
        "verified": False,
    }
    if verify and copies:
        verify_copy(dest, 0)
        info["verified"] = True
    return info


def verify_copy(dest: str | Path, copy: int) -> None:
    """Check with ASE that every file of one copy parses like its sample and differs only in energy.

    Raises AssertionError otherwise.
    """
    import ase.io
    from ase import units

    srcs = sources()
    for i, (src, sub, kind) in enumerate(srcs):
        k = copy * len(srcs) + i + 1
        fmt = "vasp-xml" if kind == "vasp" else "espresso-out"
        expected = k * VASP_STEP_EV if kind == "vasp" else k * QE_STEP_RY * units.Ry
        orig = ase.io.read(src, index=":", format=fmt)
        new = ase.io.read(Path(dest) / f"run_{copy:03d}" / sub / src.name, index=":", format=fmt)
        assert len(orig) == len(new) > 0, f"{src.name}: {len(new)} frames, expected {len(orig)}"
        for a, b in zip(orig, new, strict=True):
            assert a.get_chemical_symbols() == b.get_chemical_symbols(), src.name
            assert np.array_equal(a.positions, b.positions), src.name
            assert np.array_equal(a.cell.array, b.cell.array), src.name
            assert np.array_equal(a.get_forces(), b.get_forces()), src.name
            if "stress" in a.calc.results:
                assert np.array_equal(a.get_stress(), b.get_stress()), src.name
            de = b.get_potential_energy() - a.get_potential_energy()
            assert abs(de - expected) < 1e-7, f"{src.name}: energy shifted by {de:.3e} eV, expected {expected:.3e}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dest", help="folder to write the tree into (created)")
    ap.add_argument("--copies", type=int, default=40, help="copies of the 6 sample run files (default 40)")
    ap.add_argument("--no-verify", action="store_true", help="skip the ASE check of copy 0")
    args = ap.parse_args(argv)
    info = make_tree(args.dest, args.copies, verify=not args.no_verify)
    info.pop("run_paths")
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
