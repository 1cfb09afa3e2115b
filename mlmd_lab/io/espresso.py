"""Read Quantum ESPRESSO pw.x outputs (and the input beside them) into a :class:`Calculation`.

Frames come from ASE's ``espresso-out`` reader, so values equal ASE's own reading: ``energy`` and
``free_energy`` are both the ``!    total energy`` line (pw.x prints no σ→0 extrapolation; with smearing this
is the free energy), forces in eV/Å (from Ry/Bohr), stress in eV/Å³ with ASE's sign (tensile positive:
``stress = -σ_QE``, so the virial is ``-stress × volume``).

Ionic steps are counted as ASE delimits configurations (the program start and the ``ATOMIC_POSITIONS``
blocks that relax/md print between steps), not by ``!`` lines: with ``iprint`` (e.g. ``iprint = 1``) pw.x
marks every SCF iteration's total energy with ``!``. ASE takes a step's first ``!`` line, so the text it is
given keeps only each step's last one, the converged energy.

The settings come from the input file's namelists and cards (ASE's ``read_fortran_namelist``) when the input
is found, and from the output header, which holds what ASE drops: program version, the functional, cutoffs,
k-points, smearing, spin, pseudopotential files and their MD5 sums.
"""

from __future__ import annotations

import gzip
import io
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ase.io
from ase import units
from ase.data import chemical_symbols
from ase.io.espresso import read_fortran_namelist

from mlmd_lab.errors import InputFileError
from mlmd_lab.frames import Calculation, labelled_atoms, results_of
from mlmd_lab.io import FIX_RECOPY, describe_content, require_file
from mlmd_lab.settings import UNKNOWN_VDW, kspacing_from_divisions, normalise_signature

_FIX_REWRITE = FIX_RECOPY
_INPUT_SUFFIXES = (".in", ".pwi", ".inp")

#: QE functional names (short names and the long "SLA PW PBX PBC" form) → (canonical xc, vdW or None).
QE_XC: dict[str, tuple[str, str | None]] = {
    "PBE": ("PBE", None), "SLA PW PBX PBC": ("PBE", None), "SLA+PW+PBX+PBC": ("PBE", None),
    "SLA PW PBE PBE": ("PBE", None),  # QE 6.x prints this for PBE pseudopotentials (indices 1 4 3 4)
    "PBESOL": ("PBESOL", None), "SLA PW PSX PSC": ("PBESOL", None),
    "REVPBE": ("REVPBE", None), "SLA PW REVX PBC": ("REVPBE", None), "SLA PW RPB PBC": ("REVPBE", None),
    "RPBE": ("RPBE", None), "SLA PW HHNX PBC": ("RPBE", None),
    "PW91": ("PW91", None), "SLA PW GGX GGC": ("PW91", None),
    "BLYP": ("BLYP", None), "SLA LYP B88 BLYP": ("BLYP", None),
    "PZ": ("LDA", None), "LDA": ("LDA", None), "SLA PZ": ("LDA", None), "SLA PZ NOGX NOGC": ("LDA", None),
    "SLA PW": ("LDA", None), "SLA PW NOGX NOGC": ("LDA", None),
    "PBE0": ("PBE0", None), "PB0X PW PB0X PBC": ("PBE0", None),
    "HSE": ("HSE06", None), "SLA PW HSE PBC": ("HSE06", None), "B3LYP": ("B3LYP", None),
    "SCAN": ("SCAN", None), "R2SCAN": ("R2SCAN", None), "TPSS": ("TPSS", None),
    "VDW-DF": ("REVPBE", "VDW-DF"), "SLA PW REVX VDW1": ("REVPBE", "VDW-DF"),
    "VDW-DF2": ("PW86R", "VDW-DF2"), "SLA PW RW86 VDW2": ("PW86R", "VDW-DF2"),
    "VDW-DF-CX": ("CX", "VDW-DF-CX"), "VDW-DF-OB86": ("OPTB86B", "OPTB86B-VDW"),
    "VDW-DF-OBK8": ("OPTB88", "OPTB88-VDW"), "RVV10": ("PW86R", "RVV10"),
    "SLA PW RW86 PBC VV10": ("PW86R", "RVV10"), "RVV10-SCAN": ("SCAN", "SCAN+RVV10"),
}
#: QE vdw_corr values → canonical dispersion correction.
QE_VDW_CORR = {
    "grimme-d2": "D2", "dft-d": "D2", "d2": "D2", "grimme-d3": "D3", "dft-d3": "D3", "d3": "D3",
    "ts": "TS", "ts-vdw": "TS", "ts-vdw-dft": "TS", "tkatchenko-scheffler": "TS", "mbd": "MBD",
    "mbd_vdw": "MBD", "many-body dispersion": "MBD", "xdm": "XDM",
}
#: QE's first four functional indices (iexch, icorr, igcx, igcc) → canonical functional, used when the printed
#: name is not in QE_XC (QE versions print different short names for the same functional).
QE_XC_INDICES = {(1, 4, 3, 4): "PBE", (1, 4, 10, 8): "PBESOL", (1, 4, 4, 4): "REVPBE", (1, 4, 2, 2): "PW91",
                 (1, 1, 0, 0): "LDA", (1, 4, 0, 0): "LDA"}
_D3_VERSIONS = {2: "D3", 3: "D3", 4: "D3BJ", 5: "D3M", 6: "D3MBJ"}
_QE_SMEARING = {
    "gaussian": "gaussian", "gauss": "gaussian", "methfessel-paxton": "methfessel-paxton-1",
    "m-p": "methfessel-paxton-1", "mp": "methfessel-paxton-1", "marzari-vanderbilt": "marzari-vanderbilt",
    "cold": "marzari-vanderbilt", "m-v": "marzari-vanderbilt", "mv": "marzari-vanderbilt",
    "fermi-dirac": "fermi-dirac", "f-d": "fermi-dirac", "fd": "fermi-dirac",
}


def is_pw_output(head: bytes) -> bool:
    """True if the first few KB of a file (decompressed) look like a pw.x output ("Program PWSCF")."""
    return b"Program PWSCF" in head[:16384]


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as fh:
        data = fh.read()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (EOFError, OSError):
            d = gzip.GzipFile(fileobj=io.BytesIO(data))
            chunks = []
            try:
                while chunk := d.read(1 << 20):
                    chunks.append(chunk)
            except (EOFError, OSError):
                pass
            data = b"".join(chunks)
    return data


# ----------------------------------------------------------------------------------------------------------
# output header


def _species_symbol(label: str) -> str:
    """Element of a QE species label (``Fe1``, ``O_up`` → ``Fe``, ``O``)."""
    m = re.match(r"([A-Z][a-z]?)", label.strip().capitalize())
    if m and m.group(1) in chemical_symbols:
        return m.group(1)
    m = re.match(r"([A-Z])", label.strip().capitalize())
    return m.group(1) if m and m.group(1) in chemical_symbols else label.strip()


def parse_output_header(text: str) -> dict[str, Any]:
    """Settings pw.x prints before its first SCF step (units as printed: Ry for cutoffs and widths).

    Returns keys ``version``, ``xc`` (name as printed), ``xc_indices``, ``ecutwfc_ry``, ``ecutrho_ry``,
    ``nkpoints``, ``kpoints_first`` (first k-point in 2π/alat), ``smearing``, ``degauss_ry``,
    ``gamma_tricks``,
    ``lsda``, ``noncolin``, ``pseudopotentials`` (list of ``{species, file, md5, type}``), ``hubbard``
    (``{species: {"L": l, "U_ev": U}}``), ``vdw_lines``.
    """
    head = text.split("Self-consistent Calculation", 1)[0]
    out: dict[str, Any] = {}
    if m := re.search(r"Program PWSCF\s+v\.?\s*(\S+)", head):
        out["version"] = m.group(1)
    if m := re.search(r"Exchange-correlation\s*=\s*([^(\n]*)\n?\s*\(([\d\s]+)\)", head):
        out["xc"] = " ".join(m.group(1).split())
        out["xc_indices"] = [int(x) for x in m.group(2).split()]
    for key, pat in (("ecutwfc_ry", r"kinetic-energy cutoff\s*=\s*([\d.Ee+-]+)\s*Ry"),
                     ("ecutrho_ry", r"charge density cutoff\s*=\s*([\d.Ee+-]+)\s*Ry")):
        if m := re.search(pat, head):
            out[key] = float(m.group(1))
    if m := re.search(r"number of k points\s*=\s*(\d+)(.*)", head):
        out["nkpoints"] = int(m.group(1))
        rest = m.group(2)
        if sm := re.search(r"([\w-]+)\s+smearing,\s*width \(Ry\)\s*=\s*([\d.Ee+-]+)", rest):
            out["smearing"] = sm.group(1)
            out["degauss_ry"] = float(sm.group(2))
        elif "tetrahedron" in rest.lower():
            out["smearing"] = "tetrahedron"
        if km := re.search(r"k\(\s*1\)\s*=\s*\(\s*([-\d.]+)\s+([-\d.]+)\s+([-\d.]+)\s*\)", head[m.end():]):
            out["kpoints_first"] = [float(km.group(i)) for i in (1, 2, 3)]
    out["gamma_tricks"] = "gamma-point specific algorithms are used" in head
    out["lsda"] = bool(re.search(r"Starting magnetic structure|LSDA|spin-polarized", head))
    out["noncolin"] = "Noncollinear calculation" in head or "noncolinear" in head.lower()
    pps = []
    for m in re.finditer(r"PseudoPot\.\s*#\s*(\d+)\s+for\s+(\S+)\s+read from file:?\s*\n\s*(\S+)"
                         r"(?:\s*\n\s*MD5 check sum:\s*(\S+))?(?:\s*\n\s*Pseudo is ([^,\n]+))?", head):
        pps.append({"index": int(m.group(1)), "species": m.group(2), "file": m.group(3),
                    "md5": m.group(4), "type": (m.group(5) or "").strip() or None})
    out["pseudopotentials"] = pps
    hub_pat = r"LDA\+U calculation.*?\n.*?atomic species\s+L\s+U.*?\n((?:\s+\S+\s+\d+\s+[\d.]+.*\n)+)"
    if m := re.search(hub_pat, head):
        hub = {}
        for line in m.group(1).splitlines():
            parts = line.split()
            if len(parts) >= 3:
                hub[parts[0]] = {"L": int(parts[1]), "U_ev": float(parts[2])}
        out["hubbard"] = hub
    out["vdw_lines"] = [ln.strip() for ln in head.splitlines()
                        if re.search(r"Grimme|DFT-D|Tkatchenko|XDM|Many-body dispersion|MBD", ln)]
    return out


# ----------------------------------------------------------------------------------------------------------
# input file


def find_input(out_path: Path) -> Path | None:
    """The pw.x input beside an output: same stem, ``.in``/``.pwi``/``.inp`` (``01.out`` → ``01.in``)."""
    name = out_path.name
    stem = name[:-3] if name.endswith(".gz") else name
    stem = stem.rsplit(".", 1)[0] if "." in stem else stem
    for suffix in _INPUT_SUFFIXES:
        cand = out_path.with_name(stem + suffix)
        if cand.is_file():
            return cand
    return None


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def parse_pw_input(path: Path) -> dict[str, Any]:
    """Namelists (lower-case keys, as ASE's ``read_fortran_namelist``), ``atomic_species``
    (``[{label, mass, pseudopotential}]``), ``k_points`` (``{mode, divisions, shift}`` or ``{mode, lines}``),
    ``hubbard_card`` (QE ≥ 7.1 HUBBARD card lines) and ``other_cards`` names."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        namelists, cards = read_fortran_namelist(fh)
    out: dict[str, Any] = {"namelists": _plain(namelists)}
    species, kpoints, hubbard, other = [], None, [], []
    i = 0
    while i < len(cards):
        line = cards[i].strip()
        word = line.split()[0].upper() if line.split() else ""
        if word == "ATOMIC_SPECIES":
            i += 1
            while i < len(cards) and len(cards[i].split()) >= 3 and not _is_card(cards[i]):
                label, mass, pp = cards[i].split()[:3]
                species.append({"label": label, "mass": float(mass.lower().replace("d", "e")),
                                "pseudopotential": pp})
                i += 1
            continue
        if word == "K_POINTS":
            mode = (line.split()[1] if len(line.split()) > 1 else "tpiba").strip("{}()").lower()
            kpoints = {"mode": mode}
            if mode == "automatic" and i + 1 < len(cards):
                nums = [int(x) for x in cards[i + 1].split()[:6]]
                kpoints.update({"divisions": nums[:3], "shift": nums[3:6]})
                i += 2
                continue
            if mode not in ("gamma", "automatic"):
                lines = []
                j = i + 1
                while j < len(cards) and not _is_card(cards[j]):
                    lines.append(cards[j].strip())
                    j += 1
                kpoints["lines"] = lines
                i = j
                continue
        elif word == "HUBBARD":
            j = i + 1
            while j < len(cards) and not _is_card(cards[j]):
                hubbard.append(cards[j].strip())
                j += 1
            i = j
            continue
        elif _is_card(line):
            other.append(word)
        i += 1
    out["atomic_species"] = species
    out["k_points"] = kpoints
    if hubbard:
        out["hubbard_card"] = hubbard
    out["other_cards"] = other
    return out


_CARDS = ("ATOMIC_SPECIES", "ATOMIC_POSITIONS", "K_POINTS", "CELL_PARAMETERS", "OCCUPATIONS", "CONSTRAINTS",
          "ATOMIC_FORCES", "ADDITIONAL_K_POINTS", "SOLVENTS", "HUBBARD", "ATOMIC_VELOCITIES")


def _is_card(line: str) -> bool:
    parts = line.split()
    return bool(parts) and parts[0].upper() in _CARDS


# ----------------------------------------------------------------------------------------------------------
# signature


def qe_signature(settings: dict[str, Any], cell: Any) -> dict[str, Any]:
    """Build the normalised signature (see :mod:`mlmd_lab.settings`) from :func:`read_pw_output` settings
    (``settings["output"]`` from the header, ``settings["input"]`` when the input was found).

    Args:
        cell: (3, 3) cell (Å) of the first frame, for ``kspacing``.
    """
    hdr = settings.get("output", {})
    inp = settings.get("input") or {}
    nl = inp.get("namelists", {})
    system = nl.get("system", {})
    extra: dict[str, Any] = {}

    xc, vdw = None, None
    name = hdr.get("xc") or system.get("input_dft")
    if name:
        key = " ".join(str(name).upper().split())
        xc, vdw = QE_XC.get(key, (key, None))
        indices = tuple(hdr.get("xc_indices") or ())[:4]
        if key not in QE_XC and indices in QE_XC_INDICES and not any(hdr.get("xc_indices")[4:]):
            xc = QE_XC_INDICES[indices]
    if hdr.get("xc_indices"):
        extra["qe_xc_indices"] = hdr["xc_indices"]
    vdw_corr = system.get("vdw_corr")
    if system.get("london") is True:
        vdw_corr = "d2"
    if system.get("ts_vdw") is True:
        vdw_corr = "ts"
    if vdw_corr:
        corr = QE_VDW_CORR.get(str(vdw_corr).lower(), str(vdw_corr).upper())
        if corr == "D3":
            corr = _D3_VERSIONS.get(int(system.get("dftd3_version", 3)), "D3")
        vdw = f"{vdw}+{corr}" if vdw else corr
    elif not inp and hdr.get("vdw_lines"):
        vdw = vdw or UNKNOWN_VDW

    encut = hdr.get("ecutwfc_ry", system.get("ecutwfc"))
    ecutrho = hdr.get("ecutrho_ry", system.get("ecutrho", 4 * encut if encut else None))

    kp = inp.get("k_points")
    gamma_only = bool(hdr.get("gamma_tricks"))
    divisions = None
    if kp is not None and kp.get("mode") == "automatic":
        divisions = kp["divisions"]
        gamma_only = gamma_only or (divisions == [1, 1, 1] and kp.get("shift") == [0, 0, 0])
    elif (kp is not None and kp.get("mode") == "gamma") or gamma_only:
        gamma_only = True
    elif hdr.get("nkpoints") == 1 and hdr.get("kpoints_first") is not None and \
            all(abs(k) < 1e-8 for k in hdr["kpoints_first"]):
        gamma_only = True
    if gamma_only and divisions is None:
        divisions = [1, 1, 1]

    smearing, sigma = None, None
    if hdr.get("smearing"):
        smearing = _QE_SMEARING.get(hdr["smearing"].lower(), hdr["smearing"].lower())
        if hdr.get("degauss_ry") is not None:
            sigma = hdr["degauss_ry"] * units.Ry
    else:
        occ = str(system.get("occupations", "fixed")).lower()
        if occ == "smearing":
            name = str(system.get("smearing", "gaussian")).lower()
            smearing = _QE_SMEARING.get(name, name)
            sigma = float(system.get("degauss", 0.0)) * units.Ry
        elif occ.startswith("tetrahedra"):
            smearing, sigma = "tetrahedron", 0.0
        elif "output" in settings:
            smearing, sigma = "fixed", 0.0

    spin = bool(hdr.get("lsda") or hdr.get("noncolin") or int(system.get("nspin", 1)) == 2
                or system.get("noncolin") is True)

    species_el = {s["label"]: _species_symbol(s["label"]) for s in inp.get("atomic_species", [])}
    pseudos: dict[str, str] = {}
    md5: dict[str, str] = {}
    if hdr.get("pseudopotentials"):
        for pp in hdr["pseudopotentials"]:
            el = _species_symbol(pp["species"])
            _add_unique(pseudos, el, os.path.basename(pp["file"]))
            if pp.get("md5"):
                _add_unique(md5, el, pp["md5"])
    else:
        for s in inp.get("atomic_species", []):
            _add_unique(pseudos, species_el[s["label"]], os.path.basename(s["pseudopotential"]))
    if md5:
        extra["pseudopotential_md5"] = md5

    hubbard = None
    if system.get("lda_plus_u") is True:
        hubbard = {}
        labels = [s["label"] for s in inp.get("atomic_species", [])]
        for k, v in system.items():
            if m := re.fullmatch(r"hubbard_u\((\d+)\)", k):
                idx = int(m.group(1)) - 1
                if idx < len(labels):
                    hubbard[species_el[labels[idx]]] = float(v)
        extra["lda_plus_u_kind"] = system.get("lda_plus_u_kind", 0)
    elif inp.get("hubbard_card"):
        hubbard = {}
        for line in inp["hubbard_card"]:
            parts = line.split()
            if len(parts) >= 3 and parts[0].upper() == "U":
                hubbard[_species_symbol(parts[1].split("-")[0])] = float(parts[2])
    elif hdr.get("hubbard"):
        hubbard = {_species_symbol(lab): h["U_ev"] for lab, h in hdr["hubbard"].items()}

    for key in ("tot_charge", "assume_isolated", "lspinorb", "ecutfock", "exxdiv_treatment"):
        if key in system:
            extra[key] = system[key]
    return normalise_signature({
        "code": "qe",
        "code_version": hdr.get("version"),
        "xc": xc,
        "vdw": vdw,
        "encut": float(encut) * units.Ry if encut is not None else None,
        "ecutrho": float(ecutrho) * units.Ry if ecutrho is not None else None,
        "prec": None,
        "kpoints": divisions,
        "kspacing": kspacing_from_divisions(cell, divisions) if divisions else None,
        "gamma_only": gamma_only,
        "smearing": smearing,
        "sigma": sigma,
        "spin": spin,
        "hubbard_u": hubbard or None,
        "pseudopotentials": pseudos or None,
        "extra": extra,
    })


def _add_unique(d: dict[str, str], key: str, value: str) -> None:
    if key in d and value not in d[key].split(" | "):
        d[key] = " | ".join(sorted([*d[key].split(" | "), value]))
    else:
        d.setdefault(key, value)


# ----------------------------------------------------------------------------------------------------------
# steps


#: Lines where ASE's ``espresso-out`` reader starts a new configuration (one per ionic step): the program
#: start and each ``ATOMIC_POSITIONS`` block that relax/md/vc-relax print between ionic steps.
_CONFIG_MARKERS = ("Program PWSCF", "ATOMIC_POSITIONS")
#: The total-energy line as ASE finds it. pw.x marks it with ``!`` at SCF convergence, and with
#: ``iprint`` (some builds and verbosity settings) on every SCF iteration too.
_TOTAL_ENERGY = "!    total energy"


def _scan_steps(lines: list[str], natoms: int | None) -> list[dict[str, Any]]:
    """One record per ionic step, in file order.

    An ionic step is a configuration as ASE's reader delimits them (from one :data:`_CONFIG_MARKERS` line to
    the next) that holds at least one ``!    total energy`` line. Its energy is the *last* such line in it:
    when pw.x prints ``!`` on every SCF iteration, the earlier ones are unconverged iterations.

    Record keys: ``line`` (index of the step's ``!`` line), ``extra_marks`` (indices of the step's other
    ``!`` lines, SCF iterations), ``converged`` (no "convergence NOT achieved"), ``forces``/``stress``
    (blocks complete) and ``end`` (index of the line after the step's last block).
    """
    starts = [i for i, ln in enumerate(lines) if any(m in ln for m in _CONFIG_MARKERS)] or [0]
    bounds = zip(starts, [*starts[1:], len(lines)], strict=True)
    steps: list[dict[str, Any]] = []
    for first, stop in bounds:
        marks = [i for i in range(first, stop) if _TOTAL_ENERGY in lines[i]]
        if not marks:
            continue
        i = marks[-1]
        rec: dict[str, Any] = {"line": i, "extra_marks": marks[:-1], "converged": True, "forces": False,
                               "stress": False, "end": i + 1}
        scf_end = stop
        for j in range(i + 1, stop):
            ln = lines[j]
            if "Forces acting on atoms" in ln:
                scf_end = min(scf_end, j)
                got = 0
                k = j + 1
                while k < stop and got < (natoms or 10**9):
                    if "force =" in lines[k] and lines[k].strip().startswith("atom"):
                        got += 1
                    elif got and not lines[k].strip():
                        break
                    k += 1
                rec["forces"] = natoms is not None and got == natoms
                if rec["forces"]:
                    rec["end"] = k
            elif "total   stress" in ln:
                ok = j + 3 < len(lines) and all(len(lines[j + r].split()) == 6 for r in (1, 2, 3))
                rec["stress"] = ok
                if ok:
                    rec["end"] = j + 4
        rec["converged"] = not any("convergence NOT achieved" in lines[k] for k in range(first, scf_end))
        steps.append(rec)
    return steps


def _for_ase(lines: list[str], steps: list[dict[str, Any]]) -> str:
    """The output text with each step's SCF-iteration ``!`` marks removed (``!`` → space), so that ASE, which
    takes a step's first ``!    total energy`` line, reads the converged one."""
    out = list(lines)
    for step in steps:
        for k in step["extra_marks"]:
            out[k] = out[k].replace("!", " ", 1)
    return "".join(out)


def read_pw_output(
    path: str | os.PathLike,
    last_only: bool = False,
    input_path: str | os.PathLike | None = None,
    allow_unfinished: bool = False,
) -> Calculation:
    """Read a pw.x output (plain or gzip) into a :class:`Calculation`.

    Frames: one per ionic step with a ``!`` total energy and forces, values exactly as ASE's
    ``espresso-out`` reader gives them (``energy`` = ``free_energy`` = the step's last ``!`` total energy in eV,
    the converged one also where pw.x marks every SCF iteration with ``!``;
    ``forces`` (N, 3) eV/Å, ``stress`` Voigt eV/Å³ with ASE's sign when pw.x printed it);
    ``atoms.info["step"]`` (0-based) and ``["converged"]``.
    ``settings``: ``output`` (header, see :func:`parse_output_header`), ``input`` (see :func:`parse_pw_input`;
    None when no input was found), ``input_path``.

    Args:
        path: the pw.x output.
        last_only: keep only the last ionic step.
        input_path: the pw.x input; default: the file beside the output with the same stem and
            ``.in``/``.pwi``/``.inp``.
        allow_unfinished: return the complete steps of a run that stopped early (``finished=False``).

    Raises:
        InputFileError: empty, not a pw.x output, truncated (unless ``allow_unfinished``), no forces.
    """
    p = require_file(path)
    data = _read_bytes(p)
    if not data:
        raise InputFileError(p, "is a gzip file that decompresses to nothing", _FIX_REWRITE)
    if not is_pw_output(data[:16384]):
        what = describe_content(data[:16384])
        fix = "read it with mlmd_lab.io.vasp.read_vasprun" if "vasprun" in what else "pass a pw.x output"
        raise InputFileError(p, f"is {what}, not a Quantum ESPRESSO pw.x output", fix)
    text = data.decode("utf-8", errors="replace")
    lines = text.splitlines(keepends=True)
    header = parse_output_header(text)

    warnings: list[str] = []
    inp_file = Path(input_path) if input_path is not None else find_input(p)
    inp = None
    if inp_file is not None:
        try:
            inp = parse_pw_input(inp_file)
        except Exception as err:  # noqa: BLE001 - any parse failure of the optional input is reported
            if input_path is not None:
                raise InputFileError(inp_file, f"cannot be read as a pw.x input ({err})",
                                     "pass the input of this run or input_path=None") from None
            warnings.append(f"input {inp_file} beside the output could not be read ({err}); settings from "
                            "the output only")
            inp_file = None
    if inp is not None and header.get("pseudopotentials") and inp.get("atomic_species"):
        out_pp = sorted(os.path.basename(x["file"]) for x in header["pseudopotentials"])
        in_pp = sorted(os.path.basename(s["pseudopotential"]) for s in inp["atomic_species"])
        if [x.lower() for x in out_pp] != [x.lower() for x in in_pp]:
            warnings.append(f"input {inp_file} names other pseudopotentials ({in_pp}) than the output "
                            f"({out_pp}); it may belong to another run")

    natoms = None
    if m := re.search(r"number of atoms/cell\s*=\s*(\d+)", text):
        natoms = int(m.group(1))
    steps = _scan_steps(lines, natoms)
    finished = "JOB DONE" in text
    wants_stress = any(s["stress"] for s in steps) or bool(
        (inp or {}).get("namelists", {}).get("control", {}).get("tstress"))
    complete = [s for s in steps if s["forces"] and (s["stress"] or not wants_stress)]
    if not finished:
        # the last step may have been cut inside its forces/stress blocks
        msg = (f"ends before the run finished (no 'JOB DONE', truncated or killed): {len(complete)} complete "
               "ionic steps were found")
        if not allow_unfinished or not complete:
            raise InputFileError(p, msg, "pass allow_unfinished=True to read the complete steps"
                                 if complete else _FIX_REWRITE)
        warnings.append(msg)
        end = complete[-1]["end"]
        steps = [s for s in steps if s["line"] < end]
        lines = lines[:end]
    if not any(s["forces"] for s in steps):
        raise InputFileError(p, f"has no forces in any of its {len(steps)} ionic steps",
                             "rerun pw.x with tprnfor=.true. in &CONTROL")

    images = ase.io.read(io.StringIO(_for_ase(lines, steps)), index=":", format="espresso-out")
    images = [a for a in images if results_of(a).get("energy") is not None]
    if len(images) != len(steps):
        raise InputFileError(p, f"ASE read {len(images)} ionic steps with energies where the file has "
                             f"{len(steps)}", "report this file to the mlmd_lab developers")

    frames = []
    for i, (atoms, st) in enumerate(zip(images, steps, strict=True)):
        res = results_of(atoms)
        if not st["converged"]:
            warnings.append(f"ionic step {i}: SCF not converged ('convergence NOT achieved')")
        if res.get("forces") is None or not st["forces"]:
            warnings.append(f"ionic step {i}: no forces in the file, step dropped")
            continue
        frames.append(labelled_atoms(
            atoms.get_chemical_symbols(), atoms.positions, atoms.cell.array, atoms.pbc,
            energy=res.get("energy"), free_energy=res.get("free_energy"), forces=res["forces"],
            stress=res.get("stress"), magmoms=res.get("magmoms"),
            info={"step": i, "converged": st["converged"]},
        ))
    if last_only:
        frames = frames[-1:]
    settings: dict[str, Any] = {"output": header, "input": inp,
                                "input_path": str(inp_file) if inp_file is not None else None}
    if inp is None:
        warnings.append("no pw.x input found beside the output; settings come from the output header only")
    signature = qe_signature(settings, images[0].cell.array)
    return Calculation(
        code="qe", frames=frames, settings=settings, signature=signature, code_version=header.get("version"),
        source=str(p), finished=finished, warnings=warnings,
    )
