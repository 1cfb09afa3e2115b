"""Read VASP ``vasprun.xml`` (plain or gzip) into a :class:`~mlmd_lab.frames.Calculation`.

Frames come from ASE's ``vasp-xml`` reader, so values equal ASE's own reading. ASE's ``energy`` is the energy
extrapolated to zero smearing (σ→0): ``e_fr_energy`` of ``<calculation><energy>`` minus PSTRESS·V plus
``e_0_energy - e_fr_energy`` of the last SCF step; it includes classical vdW corrections (IVDW), which the
``<scstep>`` energies do not. ``free_energy`` is the Mermin free energy (TOTEN, ``e_fr_energy`` − PV).
Forces in eV/Å; stress in eV/Å³ with ASE's sign (VASP's kBar × −0.1 GPa).

The settings are read with :func:`xml.etree.ElementTree.iterparse` from the head of the file only (up to the
first ``<calculation>``); one more streaming pass counts the SCF steps of each ionic step without keeping
them in memory.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
from ase import Atoms
from ase.units import GPa

from mlmd_lab.errors import InputFileError
from mlmd_lab.frames import Calculation, labelled_atoms
from mlmd_lab.io import FIX_RECOPY, describe_content, require_file
from mlmd_lab.settings import UNKNOWN_VDW, kspacing_from_divisions, normalise_prec, normalise_signature

_HEAD = 4096
_VASP_EVTOJ = 1.60217733e-19  # VASP's eV→J (constant.F), as ASE's reader uses for the PV term
_FIX_REWRITE = FIX_RECOPY

#: VASP GGA tag → canonical functional (exchange part for the vdW-DF family).
GGA_TAGS = {
    "PE": "PBE", "PS": "PBESOL", "RP": "RPBE", "RE": "REVPBE", "91": "PW91", "AM": "AM05", "CA": "LDA",
    "PZ": "LDA", "HL": "LDA", "WI": "LDA", "B3": "B3LYP", "BL": "BLYP", "BO": "OPTB88", "OR": "OPTPBE",
    "MK": "OPTB86B", "ML": "PW86R", "CX": "CX", "LIBXC": "LIBXC",
}
#: VASP IVDW → canonical dispersion correction.
IVDW_TAGS = {
    1: "D2", 10: "D2", 11: "D3", 12: "D3BJ", 13: "D4", 2: "TS", 20: "TS", 21: "TS-HI", 202: "MBD",
    263: "MBD-FI", 4: "DDSC",
}
#: VASP ISMEAR → smearing method (ISMEAR > 0: Methfessel-Paxton of that order).
ISMEAR_TAGS = {-5: "tetrahedron", -4: "tetrahedron", -15: "tetrahedron", -14: "tetrahedron",
               -2: "fixed", -1: "fermi-dirac", 0: "gaussian"}


class _LenientGzip(io.RawIOBase):
    """Read a gzip stream; a truncated stream ends quietly (the XML parser then reports the truncation)."""

    def __init__(self, path: Path) -> None:
        self._gz = gzip.open(path, "rb")
        self.damaged = False

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        try:
            data = self._gz.read(len(b))
        except (EOFError, gzip.BadGzipFile, OSError):
            self.damaged = True
            return 0
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._gz.close()
        super().close()


def _opener(path: Path) -> Callable[[], IO[bytes]]:
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if magic == b"\x1f\x8b":
        return lambda: io.BufferedReader(_LenientGzip(path))
    return lambda: open(path, "rb")


# ----------------------------------------------------------------------------------------------------------
# typed values


def _scalar(text: str, typ: str) -> Any:
    text = text.strip()
    if typ == "string":
        return text
    if typ == "logical":
        return text.upper().startswith("T") or text.upper().startswith(".T")
    if typ == "int":
        try:
            return int(text)
        except ValueError:
            return text
    try:
        return float(text)
    except ValueError:
        return text  # e.g. VASP's '*******' overflow


def _typed(elem: ET.Element) -> Any:
    """Value of an ``<i>`` (scalar) or ``<v>`` (list) element, typed by its ``type`` attribute."""
    typ = elem.get("type", "float")
    text = elem.text or ""
    if elem.tag == "v":
        if typ == "string":
            return text.split()
        return [_scalar(t, typ) for t in text.split()]
    return _scalar(text, typ)


def _items(elem: ET.Element) -> dict[str, Any]:
    return {c.get("name"): _typed(c) for c in elem if c.tag in ("i", "v") and c.get("name")}


def _flatten_parameters(elem: ET.Element) -> dict[str, Any]:
    """``<parameters>`` → flat ``{NAME: value}``; a name seen again in a later separator (e.g. NELM of the
    response functions) is stored as ``"separator/NAME"`` so the first (electronic) one stays ``NAME``."""
    out: dict[str, Any] = {}

    def walk(node: ET.Element, sep: str) -> None:
        for child in node:
            if child.tag == "separator":
                walk(child, child.get("name", ""))
            elif child.tag in ("i", "v") and child.get("name"):
                name = child.get("name")
                key = name if name not in out else f"{sep}/{name}"
                out[key] = _typed(child)

    walk(elem, "")
    return out


def _kpoints(elem: ET.Element) -> dict[str, Any]:
    out: dict[str, Any] = {}
    gen = elem.find("generation")
    if gen is not None:
        out["scheme"] = gen.get("param")
        out.update(_items(gen))
    kpts = [[float(x) for x in (v.text or "").split()] for v in elem.findall("varray[@name='kpointlist']/v")]
    weights = [float((v.text or "0").split()[0]) for v in elem.findall("varray[@name='weights']/v")]
    out["nkpoints"] = len(kpts)
    if len(kpts) <= 1000:
        out["kpointlist"] = kpts
        out["weights"] = weights
    out["gamma_only"] = len(kpts) == 1 and all(abs(x) < 1e-10 for x in kpts[0])
    return out


def _atominfo(elem: ET.Element) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for arr in elem.findall("array"):
        fields = [(f.text or "").strip() for f in arr.findall("field")]
        types = [f.get("type", "float") for f in arr.findall("field")]
        rows = []
        for rc in arr.findall("set/rc"):
            row = {}
            for name, typ, c in zip(fields, types, rc.findall("c"), strict=False):
                val = _scalar(c.text or "", typ)
                row[name] = " ".join(val.split()) if isinstance(val, str) else val
            rows.append(row)
        out[arr.get("name", "array")] = rows
    out["elements"] = [r.get("element") for r in out.get("atoms", [])]
    return out


# ----------------------------------------------------------------------------------------------------------
# passes over the file


def _head_element(settings: dict[str, Any], elem: ET.Element) -> None:
    """Store a top-level element that precedes the ionic steps (generator, incar, kpoints, ...)."""
    if elem.tag == "generator":
        settings["generator"] = {k: " ".join(str(v).split()) for k, v in _items(elem).items()}
    elif elem.tag == "incar":
        settings["incar"] = _items(elem)
    elif elem.tag == "kpoints":
        settings["kpoints"] = _kpoints(elem)
    elif elem.tag == "parameters":
        settings["parameters"] = _flatten_parameters(elem)
    elif elem.tag == "atominfo":
        settings["atominfo"] = _atominfo(elem)


def _is_truncation(err: ET.ParseError) -> bool:
    # expat: 3 no element found (EOF inside elements), 5 unclosed token, 6 partial character
    return getattr(err, "code", None) in (3, 5, 6)


def _scan_steps(
    path: Path, open_: Callable[[], IO[bytes]]
) -> tuple[dict[str, Any], list[dict[str, Any]], str | None]:
    """The one streaming pass over the file: the settings of its head (see :func:`_head_element`), then
    the ionic steps. Per ``<calculation>``: SCF-step count, last SCF energies,
    the ``<energy>`` block, cell (``basis``, Å), fractional positions, forces (eV/Å) and stress (kBar, as
    written), and whether it closed; plus an error if the XML ends early (``"truncated"``) or is
    malformed (message). Each step's elements are freed as soon as they are read, so memory stays flat
    for long MD runs."""
    settings: dict[str, Any] = {}
    steps: list[dict[str, Any]] = []
    depth = 0
    cur: dict[str, Any] | None = None
    with _lean_source(open_) as fh:
        try:
            for event, elem in ET.iterparse(fh, events=("start", "end")):
                if event == "start":
                    depth += 1
                    if depth == 1 and elem.tag != "modeling":
                        raise InputFileError(path, f"is XML with root element <{elem.tag}>, not a "
                                             "vasprun.xml", "pass the vasprun.xml written by VASP")
                    if depth == 2 and elem.tag == "calculation":
                        cur = {"n_scf": 0, "forces": None, "stress": None, "energy": None, "last_scf": {},
                               "scf_energy": None, "volume": None, "basis": None, "positions": None,
                               "closed": False}
                        steps.append(cur)
                    continue
                depth -= 1
                if cur is None:
                    if depth == 1:
                        if not steps:
                            _head_element(settings, elem)
                        elem.clear()
                    continue
                if depth == 2:  # a child of <calculation> ended
                    tag = elem.tag
                    if tag == "scstep":
                        cur["n_scf"] += 1
                        energy = elem.find("energy")
                        if energy is not None:
                            cur["last_scf"] = {c.get("name"): _scalar(c.text or "", "float") for c in energy}
                            cur["scf_energy"] = cur["last_scf"].get("e_fr_energy")
                    elif tag == "varray" and elem.get("name") in ("forces", "stress"):
                        cur[elem.get("name")] = _varray(elem) if len(elem) else None
                    elif tag == "energy":
                        cur["energy"] = {c.get("name"): _scalar(c.text or "", "float") for c in elem.iter("i")}
                    elif tag == "structure":
                        vol = elem.find("crystal/i[@name='volume']")
                        cur["volume"] = float(vol.text) if vol is not None and vol.text else None
                        basis = elem.find("crystal/varray[@name='basis']")
                        pos = elem.find("varray[@name='positions']")
                        cur["basis"] = _varray(basis) if basis is not None else None
                        cur["positions"] = _varray(pos) if pos is not None else None
                    elem.clear()
                elif depth == 1 and elem.tag == "calculation":
                    cur["closed"] = True
                    elem.clear()
                    cur = None
        except ET.ParseError as err:
            return settings, steps, ("truncated" if _is_truncation(err) else str(err))
    return settings, steps, None


#: Blocks of a vasprun.xml that mlmd_lab does not use and that are most of its bytes (eigenvalues,
#: densities of states, projections). Removing them before parsing halves the XML work; files above
#: :data:`_STRIP_MAX_BYTES` are streamed unmodified instead, to keep memory flat.
_UNUSED_BLOCKS = re.compile(rb"<(eigenvalues|dos|projected)>.*?</\1>", re.S)
_STRIP_MAX_BYTES = 256 * 2**20


def _lean_source(open_: Callable[[], IO[bytes]]) -> IO[bytes]:
    """The file for parsing: in memory without unused blocks if small enough, else the open file."""
    with open_() as fh:
        data = fh.read(_STRIP_MAX_BYTES + 1)
    if len(data) > _STRIP_MAX_BYTES:
        return open_()
    return io.BytesIO(_UNUSED_BLOCKS.sub(b"", data))


def _varray(elem: ET.Element) -> np.ndarray:
    """``<varray>`` of ``<v>`` rows → float array (rows, columns)."""
    rows = [v.text or "" for v in elem]
    return np.array(" ".join(rows).split(), dtype=float).reshape(len(rows), -1)


def _frame_from_step(symbols: list[str], st: dict[str, Any], pstress: float, step: int) -> Atoms:
    """Labelled frame of one ionic step, with exactly the arithmetic of ASE's ``vasp-xml`` reader
    (``ase.io.vasp.atoms_from_step``): energy = e_fr_energy − PV + (e_0 − e_fr of the last SCF step)."""
    cell = st["basis"]
    atoms = Atoms(symbols, cell=cell, pbc=True)
    atoms.set_scaled_positions(st["positions"])
    free_energy = st["energy"]["e_fr_energy"] - pstress * 1e-22 / _VASP_EVTOJ * np.linalg.det(cell)
    scf = st["last_scf"]
    energy = free_energy + (scf["e_0_energy"] - scf["e_fr_energy"])
    stress = None
    if st["stress"] is not None:
        stress = (st["stress"] * (-0.1 * GPa)).reshape(9)[[0, 4, 8, 5, 2, 1]]
    return labelled_atoms(atoms.get_chemical_symbols(), atoms.positions, cell, True, energy=energy,
                          free_energy=free_energy, forces=st["forces"], stress=stress, info={"step": step})


# ----------------------------------------------------------------------------------------------------------
# signature


def _tag(settings: dict[str, Any], name: str, default: Any = None) -> Any:
    for src in (settings.get("parameters", {}), settings.get("incar", {})):
        if name in src:
            return src[name]
    return default


def _potcar_family(titles: list[str]) -> str | None:
    fams = set()
    for t in titles:
        first = t.split()[0].upper() if t.split() else ""
        if "PBE" in first:
            fams.add("PBE")
        elif "GGA" in first or "PW91" in first:
            fams.add("PW91")
        elif first in ("PAW", "US", "PAW_LDA", "US_LDA", "NC"):
            fams.add("LDA")
    return fams.pop() if len(fams) == 1 else None


def _per_type(value: Any, ntypes: int) -> list[Any] | None:
    if value is None:
        return None
    vals = value if isinstance(value, list) else [value]
    return vals[:ntypes] if len(vals) >= ntypes else None


def vasp_signature(settings: dict[str, Any], cell: Any, code_version: str | None = None,
                   dispersion_detected: bool = False) -> dict[str, Any]:
    """Build the normalised signature (see :mod:`mlmd_lab.settings`) from :func:`read_vasprun` settings.

    Args:
        settings: dict with ``incar``, ``parameters``, ``kpoints``, ``atominfo``.
        cell: (3, 3) cell (Å) of the first frame, for ``kspacing``.
        dispersion_detected: the ionic-step energies contain a classical vdW term (IVDW) that vasprun.xml
            does not name; ``vdw`` becomes ``"UNKNOWN"`` unless IVDW is recorded.
    """
    types = settings.get("atominfo", {}).get("atomtypes", [])
    titles = [str(t.get("pseudopotential", "")) for t in types]
    elements = [str(t.get("element", "")).strip() for t in types]
    extra: dict[str, Any] = {}

    gga_raw = str(_tag(settings, "GGA", "") or "").strip().upper()
    metagga = str(_tag(settings, "METAGGA", "") or "").strip().upper()
    if metagga in ("--", "NONE", "F", ".FALSE."):
        metagga = ""
    if gga_raw in ("--", ""):
        xc = _potcar_family(titles)
    else:
        xc = GGA_TAGS.get(gga_raw, gga_raw)
    if metagga:
        xc = metagga
    if _tag(settings, "LHFCALC", False) is True:
        aexx = float(_tag(settings, "AEXX", 0.25) or 0.0)
        hfscreen = float(_tag(settings, "HFSCREEN", 0.0) or 0.0)
        extra.update({"AEXX": aexx, "HFSCREEN": hfscreen})
        if gga_raw == "B3":
            xc = "B3LYP"
        elif abs(hfscreen - 0.2) < 1e-6 and abs(aexx - 0.25) < 1e-6:
            xc = "HSE06"
        elif abs(hfscreen - 0.3) < 1e-6 and abs(aexx - 0.25) < 1e-6:
            xc = "HSE03"
        elif hfscreen == 0 and abs(aexx - 0.25) < 1e-6 and xc in ("PBE", "SCAN"):
            xc = "PBE0" if xc == "PBE" else "SCAN0"
        else:
            xc = f"HYBRID-{xc}-AEXX{aexx:g}-HFSCREEN{hfscreen:g}"

    vdw = None
    if _tag(settings, "LUSE_VDW", False) is True:
        param2 = _tag(settings, "PARAM2")
        by_gga = {"RE": "VDW-DF", "ML": "VDW-DF2", "BO": "OPTB88-VDW", "OR": "OPTPBE-VDW", "CX": "VDW-DF-CX",
                  "MK": "REV-VDW-DF2" if param2 is not None and abs(float(param2) - 0.711357) < 1e-4
                  else "OPTB86B-VDW"}
        if metagga == "SCAN":
            vdw = "SCAN+RVV10"
        elif metagga:
            vdw = "RVV10"
        else:
            vdw = by_gga.get(gga_raw, f"VDW-DF-GGA-{gga_raw or 'POTCAR'}")
        extra["vdW_DF"] = {k: _tag(settings, k) for k in ("Zab_VDW", "PARAM1", "PARAM2", "PARAM3", "BPARAM",
                                                          "CPARAM", "AGGAC") if _tag(settings, k) is not None}
    ivdw = _tag(settings, "IVDW")
    if ivdw is None and _tag(settings, "LVDW", False) is True:
        ivdw = 1
    if isinstance(ivdw, int) and ivdw != 0:
        name = IVDW_TAGS.get(ivdw, f"IVDW{ivdw}")
        vdw = f"{vdw}+{name}" if vdw else name
    elif dispersion_detected and vdw is None:
        vdw = UNKNOWN_VDW

    hubbard = None
    if _tag(settings, "LDAU", False) is True:
        ntypes = len(types)
        lval = _per_type(_tag(settings, "LDAUL"), ntypes)
        uval = _per_type(_tag(settings, "LDAUU"), ntypes)
        jval = _per_type(_tag(settings, "LDAUJ"), ntypes) or [0.0] * ntypes
        extra["LDAUTYPE"] = _tag(settings, "LDAUTYPE", 2)
        if uval is not None:
            hubbard = {}
            for i, el in enumerate(elements):
                if lval is not None and int(lval[i]) < 0:
                    continue
                ueff = float(uval[i]) - float(jval[i])
                key = el if el not in hubbard or abs(hubbard[el] - ueff) < 1e-9 else f"{el}:{i + 1}"
                hubbard[key] = ueff
            extra["LDAUL"] = lval

    pseudos: dict[str, str] = {}
    for el, title in zip(elements, titles, strict=False):
        title = " ".join(title.split())
        if el in pseudos and title not in pseudos[el].split(" | "):
            pseudos[el] = " | ".join(sorted([*pseudos[el].split(" | "), title]))
        else:
            pseudos.setdefault(el, title)

    ismear = _tag(settings, "ISMEAR")
    smearing = None
    if isinstance(ismear, int):
        smearing = ISMEAR_TAGS.get(ismear, f"methfessel-paxton-{ismear}" if ismear > 0 else f"ismear{ismear}")
    kp = settings.get("kpoints", {})
    divisions = kp.get("divisions")
    gamma_only = bool(kp.get("gamma_only"))
    if gamma_only and divisions is None:
        divisions = [1, 1, 1]
    ispin = _tag(settings, "ISPIN", 1)
    encut = _tag(settings, "ENMAX", _tag(settings, "ENCUT"))

    for key in ("LASPH", "ENAUG", "LREAL", "ADDGRID", "GGA_COMPAT"):
        # LREAL: the INCAR's "A"/"O"/"T"/"F" says more than the parameters' logical
        val = settings.get("incar", {}).get(key, _tag(settings, key))
        if val is not None:
            extra[key] = val
    extra["GGA"] = gga_raw or None
    if metagga:
        extra["METAGGA"] = metagga
    if ivdw is not None:
        extra["IVDW"] = ivdw
    return normalise_signature({
        "code": "vasp",
        "code_version": code_version,
        "xc": xc,
        "vdw": vdw,
        "encut": encut if isinstance(encut, (int, float)) else None,
        "ecutrho": None,
        "prec": normalise_prec(_tag(settings, "PREC")),
        "kpoints": divisions,
        "kspacing": kspacing_from_divisions(cell, divisions) if divisions else None,
        "gamma_only": gamma_only,
        "smearing": smearing,
        "sigma": _tag(settings, "SIGMA"),
        "spin": (ispin == 2) or bool(_tag(settings, "LNONCOLLINEAR", False)),
        "hubbard_u": hubbard,
        "pseudopotentials": pseudos or None,
        "extra": extra,
    })


# ----------------------------------------------------------------------------------------------------------
# public reader


def read_vasprun(
    path: str | os.PathLike, last_only: bool = False, allow_unfinished: bool = False
) -> Calculation:
    """Read a ``vasprun.xml`` (plain or gzip, detected by magic bytes) into a :class:`Calculation`.

    Frames: one per ionic step (``atoms.info["step"]`` = 0-based index, ``atoms.info["converged"]`` =
    SCF finished in fewer than NELM electronic steps), values exactly as ASE's ``vasp-xml`` reader gives them:
    ``energy`` (eV, σ→0, see module docstring), ``free_energy`` (eV), ``forces`` (eV/Å, (N, 3)),
    ``stress`` (eV/Å³, Voigt, ASE sign). ``settings`` holds ``generator``, ``incar``, ``kpoints``,
    ``parameters`` (flattened), ``atominfo``; ``signature`` is built by :func:`vasp_signature`.

    Args:
        path: the file.
        last_only: keep only the last ionic step.
        allow_unfinished: for a truncated file return the complete ionic steps with ``finished=False``
            instead of raising.

    Raises:
        InputFileError: empty, not a vasprun.xml, malformed or truncated XML, no forces.
    """
    p = require_file(path)
    open_ = _opener(p)
    with open_() as fh:
        head = fh.read(_HEAD)
    if not head:
        raise InputFileError(p, "is a gzip file that decompresses to nothing", _FIX_REWRITE)
    if b"<modeling" not in head:
        what = describe_content(head)
        fix = "read it with mlmd_lab.io.espresso.read_pw_output" if "pw.x" in what else "pass a vasprun.xml"
        raise InputFileError(p, f"is {what}, not a VASP vasprun.xml", fix)

    settings, steps, problem = _scan_steps(p, open_)
    if problem is not None and problem != "truncated":
        raise InputFileError(p, f"is not well-formed XML ({problem})", _FIX_REWRITE)
    if not steps:
        if problem == "truncated":
            raise InputFileError(p, "ends before the first ionic step was written "
                                 "(truncated or unfinished run: 0 complete ionic steps)", _FIX_REWRITE)
        raise InputFileError(p, "contains no ionic step (<calculation>)", "pass the vasprun.xml of a finished run")
    complete = [s for s in steps if s["closed"]]
    finished = problem is None
    warnings: list[str] = []
    if not finished:
        msg = (f"ends in the middle of ionic step {len(steps)} (truncated or unfinished run): "
               f"{len(complete)} complete ionic steps were found")
        if not allow_unfinished or not complete:
            raise InputFileError(p, msg, "pass allow_unfinished=True to read the complete steps"
                                 if complete else _FIX_REWRITE)
        warnings.append(msg)
    version = settings.get("generator", {}).get("version") or None
    nelm = _tag(settings, "NELM", 60)
    pstress = float(_tag(settings, "PSTRESS", 0.0) or 0.0)
    symbols = settings.get("atominfo", {}).get("elements") or []
    frames = []
    dispersion = []
    for i, st in enumerate(complete):
        converged = not (isinstance(nelm, int) and st["n_scf"] >= nelm)
        if not converged:
            warnings.append(f"ionic step {i}: SCF not converged "
                            f"({st['n_scf']} electronic steps, NELM = {nelm})")
        e_calc = (st["energy"] or {}).get("e_fr_energy")
        if isinstance(e_calc, float) and isinstance(st["scf_energy"], float):
            pv = pstress * 1e-22 / 1.602176634e-19 * (st["volume"] or 0.0)  # kBar·Å³ → eV
            dispersion.append(e_calc - pv - st["scf_energy"])
        if st["forces"] is None:
            warnings.append(f"ionic step {i}: no forces in the file, step dropped")
            continue
        if st["basis"] is None or st["positions"] is None or not st["energy"] or not st["last_scf"]:
            raise InputFileError(p, f"ionic step {i} lacks its structure or energies", _FIX_REWRITE)
        if len(symbols) != len(st["positions"]):
            raise InputFileError(p, f"ionic step {i} has {len(st['positions'])} positions for "
                                 f"{len(symbols)} atoms in <atominfo>", _FIX_REWRITE)
        frame = _frame_from_step(symbols, st, pstress, i)
        frame.info["converged"] = converged
        frames.append(frame)
    if not frames:
        raise InputFileError(p, f"has no forces in any of its {len(complete)} ionic steps",
                             "use a run that writes forces (vasprun.xml of an SCF/MD/relaxation run)")
    if last_only:
        frames = frames[-1:]
    disp = [d for d in dispersion if abs(d) > 1e-6]
    if disp:
        settings["dispersion_energy_per_step"] = [round(d, 8) for d in dispersion]
    signature = vasp_signature(settings, complete[0]["basis"], version, dispersion_detected=bool(disp))
    if signature["vdw"] == UNKNOWN_VDW:
        warnings.append("the ionic-step energies contain a classical van der Waals term, but vasprun.xml "
                        "does not record IVDW; set signature['vdw'] from the INCAR")
    return Calculation(
        code="vasp", frames=frames, settings=settings, signature=signature, code_version=version,
        source=str(p), finished=finished, warnings=warnings,
    )
