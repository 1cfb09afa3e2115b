"""Normalised settings signature: the DFT settings that decide whether two data sets can be mixed.

A *signature* is a flat dict with the keys :data:`SIGNATURE_KEYS` (units: eV, Å⁻¹):

- ``code``: ``"vasp"``, ``"qe"``, ...; ``code_version``: program version string (not part of the hash).
- ``xc``: canonical upper-case functional (``"PBE"``, ``"PBESOL"``, ``"RPBE"``, ``"SCAN"``, ``"HSE06"``, ...);
  ``xc_family``: ``"LDA"``, ``"GGA"``, ``"METAGGA"``, ``"HYBRID"`` or None.
- ``vdw``: None (no correction) or ``"D2"``, ``"D3"``, ``"D3BJ"``, ``"TS"``, ``"MBD"``, ``"VDW-DF"``, ...
- ``encut``: plane-wave cutoff (eV); ``ecutrho``: charge-density cutoff (eV; QE) or None.
- ``prec``: VASP PREC (``"NORMAL"``, ``"ACCURATE"``, ...); None for other codes.
- ``kpoints``: Monkhorst-Pack divisions ``[n1, n2, n3]`` or None; ``kspacing``: largest k-point spacing
  ``max_i |b_i| / n_i`` (Å⁻¹, *with* the 2π in ``b_i``, VASP KSPACING convention); ``gamma_only``: the
  Brillouin zone is sampled at Γ only (one k-point at Γ; QE gamma tricks).
- ``smearing``: ``"gaussian"``, ``"fermi-dirac"``, ``"methfessel-paxton-N"``, ``"marzari-vanderbilt"``,
  ``"tetrahedron"``, ``"fixed"``; ``sigma``: smearing width (eV; 0 for fixed occupations).
- ``spin``: spin-polarised (bool); ``hubbard_u``: ``{element: U_eff (eV)}`` or None when no +U.
- ``pseudopotentials``: ``{element: POTCAR title or pseudopotential file name}``.
- ``extra``: other decisive settings (VASP LASPH, GGA tag, ENAUG, LREAL; QE pseudopotential MD5 sums, ...).
- ``dataset``: identity of a data set whose settings are *not declared* (None for one that declares them).

For most keys None means *unknown*; for ``vdw`` and ``hubbard_u`` it means *none* (``vdw = "UNKNOWN"``: the
energies contain a dispersion term whose kind the file does not name, as VASP's IVDW in vasprun.xml).

Undeclared settings. Data-set formats (extxyz, n2p2, DeePMD) carry no run settings. Such a source is not
given the one shared all-unknown signature (which let two DFT energy zeros compare equal and be mixed
silently) but its own: :func:`with_dataset` sets ``dataset`` to the source's identity, which ingest takes
as the SHA-256 of the source's bytes (its calculation id): re-ingesting or moving the file keeps it,
two different files or DeePMD system folders get different ones. Declared-equal data sets compare equal:
settings given at ingest (``db.ingest(path, settings={"code": "vasp", "xc": "PBE"})``) make the signature
declared, and ``settings={"dataset": "NAME"}`` puts several sources into one data set without naming
their settings. :func:`compare_signatures` reports two different signatures of which one declares nothing
as an error (``key="dataset"``): their energy zeros cannot be checked, so they are treated as different.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlmd_lab.frames import canonical_json

SIGNATURE_KEYS: tuple[str, ...] = (
    "code",
    "code_version",
    "xc",
    "xc_family",
    "vdw",
    "encut",
    "ecutrho",
    "prec",
    "kpoints",
    "kspacing",
    "gamma_only",
    "smearing",
    "sigma",
    "spin",
    "hubbard_u",
    "pseudopotentials",
    "extra",
    "dataset",
)

#: Keys left out of :func:`signature_hash` (they do not change the physics).
NON_DECISIVE_KEYS: frozenset[str] = frozenset({"code_version"})
#: Keys that describe settings (not the program version or the data-set identity): a signature with all
#: of them None and an empty ``extra`` declares no settings (see :func:`declares_settings`).
SETTINGS_KEYS: tuple[str, ...] = tuple(k for k in SIGNATURE_KEYS if k not in ("code_version", "extra", "dataset"))

#: Decimal places kept per key by :func:`normalise_signature`.
_ROUND = {"encut": 2, "ecutrho": 2, "kspacing": 4, "sigma": 6}
_HUBBARD_DECIMALS = 4

#: ``vdw`` value of a run whose energies contain a dispersion term of an unnamed kind (VASP IVDW is not
#: written to vasprun.xml); compared as unknown.
UNKNOWN_VDW = "UNKNOWN"
#: Relative encut difference above which :func:`compare_signatures` warns.
ENCUT_REL_TOL = 0.05
#: Absolute k-spacing difference (Å⁻¹) above which :func:`compare_signatures` warns.
KSPACING_TOL = 0.05
#: Absolute smearing-width difference (eV) above which :func:`compare_signatures` warns.
SIGMA_TOL = 1e-4
#: Absolute U_eff difference (eV) above which :func:`compare_signatures` reports an error.
HUBBARD_TOL = 1e-3
#: ``extra`` entries that differ only in numerical accuracy (VASP's real-space projection, augmentation grids),
#: compared as warnings; every other ``extra`` entry that both signatures state (an ASE calculator's parameters,
#: a PySCF basis, charge or multiplicity, QE's total charge or pseudopotential md5, VASP's AEXX or GGA) is part of
#: the energy surface, so a difference is an error.
EXTRA_ACCURACY_KEYS = frozenset({"LREAL", "ADDGRID", "ENAUG", "LASPH", "GGA_COMPAT"})
#: ``extra`` entries whose meaning the canonical keys already carry (``xc``, ``vdw``, compared there): VASP's raw
#: GGA tag is "--" (from the POTCAR) or "PE" for the same PBE, so comparing it would report a false difference.
EXTRA_DERIVED_KEYS = frozenset({"GGA", "METAGGA", "IVDW"})
#: ``extra`` entries keyed by element, compared for the shared elements only.
EXTRA_PER_ELEMENT_KEYS = frozenset({"pseudopotential_md5"})

_XC_FAMILY = {
    "LDA": "LDA",
    "PZ": "LDA",
    "PW": "LDA",
    "PBE": "GGA",
    "PBESOL": "GGA",
    "RPBE": "GGA",
    "REVPBE": "GGA",
    "PW91": "GGA",
    "AM05": "GGA",
    "BLYP": "GGA",
    "PW86R": "GGA",
    "OPTB88": "GGA",
    "OPTB86B": "GGA",
    "OPTPBE": "GGA",
    "CX": "GGA",
    "SCAN": "METAGGA",
    "R2SCAN": "METAGGA",
    "RSCAN": "METAGGA",
    "TPSS": "METAGGA",
    "REVTPSS": "METAGGA",
    "M06L": "METAGGA",
    "MBJ": "METAGGA",
    "MS2": "METAGGA",
    "HSE06": "HYBRID",
    "HSE03": "HYBRID",
    "PBE0": "HYBRID",
    "B3LYP": "HYBRID",
    "SCAN0": "HYBRID",
}

_PREC = {"L": "LOW", "M": "MEDIUM", "H": "HIGH", "N": "NORMAL", "A": "ACCURATE", "S": "SINGLE"}


def xc_family(xc: str | None) -> str | None:
    """Family (``"LDA"``, ``"GGA"``, ``"METAGGA"``, ``"HYBRID"``) of a canonical functional name, or None."""
    if not xc:
        return None
    xc = xc.upper()
    if xc in _XC_FAMILY:
        return _XC_FAMILY[xc]
    if xc.startswith("HYBRID"):
        return "HYBRID"
    return None


def normalise_prec(value: Any) -> str | None:
    """VASP PREC in canonical upper case: ``"accura"``/``"a"`` → ``"ACCURATE"``; ``"SingleN"`` → ``"SINGLE"``.

    VASP decides by the first letter; vasprun's ``<parameters>`` block abbreviates (``"accura"``).
    """
    if value is None:
        return None
    text = str(value).strip().upper()
    if not text:
        return None
    return _PREC.get(text[0], text)


def _round(x: Any, decimals: int) -> float | None:
    if x is None:
        return None
    v = float(x)
    if not math.isfinite(v):
        return None
    return round(v, decimals) + 0.0


def _canonical(value: Any) -> Any:
    """Plain JSON types: numpy → Python, tuples → lists, floats to 10 significant digits, sorted-key dicts."""
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_canonical(v) for v in list(value)]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if not math.isfinite(v):
            return None
        return float(f"{v:.10g}") + 0.0
    return value


def normalise_signature(d: dict[str, Any] | None) -> dict[str, Any]:
    """Return a complete, JSON-canonical signature: every key of :data:`SIGNATURE_KEYS` (missing → None),
    upper-case names (``xc``, ``vdw``, ``prec``), lower-case ``smearing``, cutoffs rounded to 0.01 eV,
    ``kspacing`` to 1e-4 Å⁻¹, ``sigma`` to 1e-6 eV, U values to 1e-4 eV, no numpy types.

    Unknown keys are moved into ``extra``. The input is not modified.
    """
    d = dict(d or {})
    out: dict[str, Any] = {k: None for k in SIGNATURE_KEYS}
    extra = dict(d.pop("extra", None) or {})
    for key, value in d.items():
        if key in out:
            out[key] = value
        else:
            extra[key] = value
    for key in ("code", "smearing"):
        if out[key] is not None:
            out[key] = str(out[key]).strip().lower() or None
    for key in ("code_version", "dataset"):
        if out[key] is not None:
            out[key] = str(out[key]).strip() or None
    for key in ("xc", "vdw"):
        if out[key] is not None:
            out[key] = str(out[key]).strip().upper() or None
    out["xc_family"] = (str(out["xc_family"]).upper() if out["xc_family"] else None) or xc_family(out["xc"])
    out["prec"] = normalise_prec(out["prec"])
    for key, decimals in _ROUND.items():
        out[key] = _round(out[key], decimals)
    if out["kpoints"] is not None:
        out["kpoints"] = [int(n) for n in out["kpoints"]]
    for key in ("gamma_only", "spin"):
        if out[key] is not None:
            out[key] = bool(out[key])
    if out["hubbard_u"]:
        hub = {str(el): _round(u, _HUBBARD_DECIMALS) for el, u in out["hubbard_u"].items()}
        out["hubbard_u"] = {el: u for el, u in hub.items() if u} or None
    else:
        out["hubbard_u"] = None
    if out["pseudopotentials"] is not None:
        pps = out["pseudopotentials"]
        out["pseudopotentials"] = {str(el): " ".join(str(t).split()) for el, t in pps.items()}
    out["extra"] = _canonical(extra)
    # round-trip through JSON so the result is exactly what is hashed and stored
    return json.loads(canonical_json(out))


def signature_hash(sig: dict[str, Any]) -> str:
    """Short (16 hex digits) stable id of a signature: SHA-256 of the canonical JSON of its decisive keys
    (all of :data:`SIGNATURE_KEYS` except ``code_version``), after :func:`normalise_signature`.

    ``dataset`` is hashed only when set, so signatures without one keep the ids they had before the key
    existed (databases written earlier stay valid).
    """
    norm = normalise_signature(sig)
    decisive = {k: v for k, v in norm.items()
                if k not in NON_DECISIVE_KEYS and not (k == "dataset" and v is None)}
    return hashlib.sha256(canonical_json(decisive).encode()).hexdigest()[:16]


def declares_settings(sig: dict[str, Any] | None) -> bool:
    """True if the signature states any setting (a key of :data:`SETTINGS_KEYS` or an ``extra`` entry);
    False for data whose settings nobody declared (extxyz, n2p2, DeePMD ingested without ``settings=``)."""
    norm = normalise_signature(sig)
    return any(norm[k] is not None for k in SETTINGS_KEYS) or bool(norm["extra"])


def with_dataset(sig: dict[str, Any] | None, dataset: str) -> dict[str, Any]:
    """The normalised signature, with ``dataset`` set to ``dataset`` if it declares no settings and has no
    identity yet (a signature that declares settings, or already has one, is returned unchanged).

    Ingest passes the source's calculation id (SHA-256 of its bytes), so every undeclared source gets its
    own signature; see the module docstring.
    """
    norm = normalise_signature(sig)
    if declares_settings(norm) or norm["dataset"]:
        return norm
    return normalise_signature({**norm, "dataset": dataset})


def describe_signature(sig: dict[str, Any] | None) -> str:
    """A few words for messages: ``"vasp PBE D3 520 eV"``, or ``"settings not declared, data set 3fa2c1d4e5f6"``."""
    norm = normalise_signature(sig)
    if not declares_settings(norm):
        return f"settings not declared, data set {norm['dataset'][:12]}" if norm["dataset"] else "settings not declared"
    parts = [str(norm[k]) for k in ("code", "xc", "vdw") if norm[k]]
    if norm["encut"] is not None:
        parts.append(f"{norm['encut']:g} eV")
    return " ".join(parts) or "settings partly declared"


@dataclass(frozen=True)
class Conflict:
    """One reason two signatures should (error) or may (warning) not be mixed.

    Attributes:
        key: the signature key (``"xc"``, ``"pseudopotentials:O"``, ...).
        a, b: the two values.
        severity: ``"error"`` (do not mix) or ``"warning"`` (mix only knowingly).
        message: one sentence: what differs, why it matters, what to do.
    """

    key: str
    a: Any
    b: Any
    severity: str
    message: str


def _unknown(key: str, a: Any, b: Any, what: str) -> Conflict:
    side = "first" if a is None else "second"
    return Conflict(
        key, a, b, "warning",
        f"The {what} of the {side} data set is unknown, so it cannot be checked that both use the same "
        f"{what}; confirm it from the run's input before mixing.",
    )


def compare_signatures(
    a: dict[str, Any], b: dict[str, Any], elements: list[str] | set[str] | None = None
) -> list[Conflict]:
    """List the conflicts between two signatures (empty list: safe to mix).

    Errors: different ``code``, ``xc``, ``vdw``; different pseudopotentials or +U values for the shared
    elements (or for ``elements`` when given); an ``extra`` entry that both state with different values
    (except :data:`EXTRA_ACCURACY_KEYS`, warnings). Warnings: ``encut`` differing by more than 5 %, ``kspacing``
    by more than 0.05 Å⁻¹ or Γ-only vs not, different smearing method or width, ``prec``, ``spin``; and any
    compared value that is unknown (None) on one side only.
    """
    a = normalise_signature(a)
    b = normalise_signature(b)
    undeclared = _undeclared_conflict(a, b)
    if undeclared is not None:
        return [undeclared]
    out: list[Conflict] = []

    def same_or_unknown(key: str, what: str) -> bool | None:
        va, vb = a[key], b[key]
        if va == vb:
            return True
        if va is None or vb is None:
            out.append(_unknown(key, va, vb, what))
            return None
        return False

    if same_or_unknown("code", "DFT code") is False:
        out.append(Conflict("code", a["code"], b["code"], "error",
                            f"The data come from different codes ({a['code']} vs {b['code']}), whose "
                            "pseudopotentials and total-energy zero differ; train on one code's data only."))
    if same_or_unknown("xc", "exchange-correlation functional") is False:
        out.append(Conflict("xc", a["xc"], b["xc"], "error",
                            f"The exchange-correlation functionals differ ({a['xc']} vs {b['xc']}), so "
                            "energies and forces describe different potential-energy surfaces; recompute one "
                            "set with the other's functional."))
    if a["vdw"] != b["vdw"] and UNKNOWN_VDW in (a["vdw"], b["vdw"]):
        out.append(_unknown("vdw", None if a["vdw"] == UNKNOWN_VDW else a["vdw"],
                            None if b["vdw"] == UNKNOWN_VDW else b["vdw"], "van der Waals correction"))
    elif a["vdw"] != b["vdw"]:
        out.append(Conflict("vdw", a["vdw"], b["vdw"], "error",
                            f"The van der Waals corrections differ ({a['vdw'] or 'none'} vs "
                            f"{b['vdw'] or 'none'}), which changes energies and forces; use data with the "
                            "same correction."))

    shared = _shared_elements(a, b, elements)
    out.extend(_compare_pseudopotentials(a, b, shared))
    out.extend(_compare_hubbard(a, b, shared))
    out.extend(_compare_extra(a, b, shared))

    ea, eb = a["encut"], b["encut"]
    if ea is None or eb is None:
        if ea != eb:
            out.append(_unknown("encut", ea, eb, "plane-wave cutoff"))
    elif abs(ea - eb) > ENCUT_REL_TOL * min(ea, eb):
        out.append(Conflict("encut", ea, eb, "warning",
                            f"The plane-wave cutoffs differ by more than {ENCUT_REL_TOL:.0%} ({ea:g} vs "
                            f"{eb:g} eV), which shifts absolute energies and stresses; recompute with one "
                            "cutoff or fit only forces."))
    ra, rb = a["ecutrho"], b["ecutrho"]
    if ra is not None and rb is not None and abs(ra - rb) > ENCUT_REL_TOL * min(ra, rb):
        out.append(Conflict("ecutrho", ra, rb, "warning",
                            f"The charge-density cutoffs differ by more than {ENCUT_REL_TOL:.0%} ({ra:g} vs "
                            f"{rb:g} eV), which shifts energies slightly; recompute with one cutoff."))

    out.extend(_compare_kpoints(a, b))

    if same_or_unknown("smearing", "smearing method") is False:
        out.append(Conflict("smearing", a["smearing"], b["smearing"], "warning",
                            f"The smearing methods differ ({a['smearing']} vs {b['smearing']}), which "
                            "changes energies of metals; use one method or check the data are insulating."))
    sa, sb = a["sigma"], b["sigma"]
    if sa is None or sb is None:
        if sa != sb:
            out.append(_unknown("sigma", sa, sb, "smearing width"))
    elif abs(sa - sb) > SIGMA_TOL:
        out.append(Conflict("sigma", sa, sb, "warning",
                            f"The smearing widths differ ({sa:g} vs {sb:g} eV), which changes energies of "
                            "metals; use one width or check the data are insulating."))
    if a["code"] == b["code"] == "vasp" or (a["prec"] is not None and b["prec"] is not None):
        if same_or_unknown("prec", "VASP PREC") is False:
            out.append(Conflict("prec", a["prec"], b["prec"], "warning",
                                f"VASP PREC differs ({a['prec']} vs {b['prec']}), which changes FFT grids "
                                "and the augmentation cutoff; recompute with one PREC for consistent "
                                "forces."))
    if same_or_unknown("spin", "spin polarisation") is False:
        out.append(Conflict("spin", a["spin"], b["spin"], "warning",
                            f"One run is spin-polarised and the other is not ({a['spin']} vs {b['spin']}); "
                            "they agree only for non-magnetic systems, so check the magnetisation is zero."))
    return out


def _undeclared_conflict(a: dict[str, Any], b: dict[str, Any]) -> Conflict | None:
    """The error for two different signatures of which at least one declares no settings, else None.

    Nothing says such data sets share an energy zero (the 132 eV/atom mix of issue 14.2), so they are
    treated as different; the same undeclared data set compared with itself is no conflict.
    """
    da, db_ = declares_settings(a), declares_settings(b)
    if (da and db_) or signature_hash(a) == signature_hash(b):
        return None
    what_a, what_b = (describe_signature(x) if declares_settings(x) or not x["dataset"]
                      else f"data set {x['dataset'][:12]}" for x in (a, b))
    if not da and not db_:
        head = f"Neither data set declares its DFT settings and they come from different sources ({what_a} vs {what_b})"
    else:
        side = "first" if not da else "second"
        head = (f"The {side} data set declares no DFT settings and comes from another source than the other "
                f"({what_a} vs {what_b})")
    return Conflict(
        "dataset", a["dataset"], b["dataset"], "error",
        f"{head}, so their energy zeros cannot be checked and are treated as different; select one data set, "
        "declare the settings at ingest (db.ingest(path, settings={...}) or --settings KEY=VALUE) if they are "
        "the same, or train with energy_offsets='per_signature' to fit one energy offset per signature.",
    )


def _shared_elements(a: dict[str, Any], b: dict[str, Any], elements: Any) -> set[str] | None:
    if elements is not None:
        return {str(e) for e in elements}
    pa, pb = a["pseudopotentials"], b["pseudopotentials"]
    if pa is not None and pb is not None:
        return set(pa) & set(pb)
    return None


def _compare_pseudopotentials(
    a: dict[str, Any], b: dict[str, Any], shared: set[str] | None
) -> list[Conflict]:
    pa, pb = a["pseudopotentials"], b["pseudopotentials"]
    if pa is None or pb is None:
        if pa != pb:
            return [_unknown("pseudopotentials", pa, pb, "pseudopotentials")]
        return []
    out = []
    for el in sorted(shared or ()):
        ta, tb = pa.get(el), pb.get(el)
        if ta is None or tb is None:
            out.append(_unknown(f"pseudopotentials:{el}", ta, tb, f"pseudopotential of {el}"))
        elif ta != tb:
            out.append(Conflict(f"pseudopotentials:{el}", ta, tb, "error",
                                f"{el} uses different pseudopotentials ({ta!r} vs {tb!r}), which shifts "
                                "energies and forces; recompute one set with the other's pseudopotential."))
    return out


def _compare_hubbard(a: dict[str, Any], b: dict[str, Any], shared: set[str] | None) -> list[Conflict]:
    ha, hb = a["hubbard_u"] or {}, b["hubbard_u"] or {}
    check = set(ha) | set(hb)
    if shared is not None:
        check &= shared
    out = []
    for el in sorted(check):
        ua, ub = ha.get(el, 0.0), hb.get(el, 0.0)
        if abs(ua - ub) > HUBBARD_TOL:
            out.append(Conflict(f"hubbard_u:{el}", ua, ub, "error",
                                f"{el} has different Hubbard U_eff ({ua:g} vs {ub:g} eV), which changes the "
                                "energy surface; use data computed with the same +U."))
    return out


def _compare_extra(a: dict[str, Any], b: dict[str, Any], shared: set[str] | None) -> list[Conflict]:
    """Conflicts for ``extra`` entries that both signatures state with different known values.

    An entry stated on one side only is no conflict: a parsed output records more than a recipe states (QE's
    ``qe_xc_indices``), and ``None`` (not recorded) is unknown, not different; :data:`EXTRA_DERIVED_KEYS` are
    left to the canonical keys. Severity: see
    :data:`EXTRA_ACCURACY_KEYS`; per-element entries (:data:`EXTRA_PER_ELEMENT_KEYS`) are compared for the
    shared elements whose pseudopotential files have the same name (a changed file of the same name).
    """
    xa, xb = a["extra"] or {}, b["extra"] or {}
    out = []
    for key in sorted((set(xa) & set(xb)) - EXTRA_DERIVED_KEYS):
        va, vb = xa[key], xb[key]
        if key in EXTRA_PER_ELEMENT_KEYS and isinstance(va, dict) and isinstance(vb, dict):
            both = set(va) & set(vb) if shared is None else set(va) & set(vb) & shared
            pa, pb = a["pseudopotentials"] or {}, b["pseudopotentials"] or {}
            both = {el for el in both if pa.get(el) == pb.get(el)}  # other files: reported as pseudopotentials
            va, vb = {el: va[el] for el in sorted(both)}, {el: vb[el] for el in sorted(both)}
        if key == "qe_xc_indices" and isinstance(va, list) and isinstance(vb, list):
            va, vb = _strip_zeros(va), _strip_zeros(vb)  # pw.x versions print 6 or 7 indices, zero-padded
        if va is None or vb is None or va == vb:
            continue
        if key in EXTRA_ACCURACY_KEYS:
            out.append(Conflict(f"extra:{key}", va, vb, "warning",
                                f"The runs differ in {key} ({_short(va)} vs {_short(vb)}), a numerical-accuracy "
                                "setting that shifts energies and forces slightly; recompute with one value for "
                                "consistent data."))
        else:
            out.append(Conflict(f"extra:{key}", va, vb, "error",
                                f"The runs differ in {key} ({_short(va)} vs {_short(vb)}), which is part of the "
                                "energy surface they sample; train on data computed with one value."))
    return out


def _strip_zeros(values: list) -> list:
    """``values`` without trailing zeros."""
    out = list(values)
    while out and out[-1] == 0:
        out.pop()
    return out


def _short(value: Any, limit: int = 80) -> str:
    """``repr`` of a setting, cut to ``limit`` characters for a message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _compare_kpoints(a: dict[str, Any], b: dict[str, Any]) -> list[Conflict]:
    ga, gb = a["gamma_only"], b["gamma_only"]
    if ga is not None and gb is not None and ga != gb:
        return [Conflict("gamma_only", ga, gb, "warning",
                         "One run samples only the Γ point and the other a k-point mesh, so their energies "
                         "converge differently with cell size; check both are k-point converged.")]
    ka, kb = a["kspacing"], b["kspacing"]
    if ka is None or kb is None:
        if ka != kb:
            return [_unknown("kspacing", ka, kb, "k-point spacing")]
        return []
    if abs(ka - kb) > KSPACING_TOL:
        return [Conflict("kspacing", ka, kb, "warning",
                         f"The k-point spacings differ by more than {KSPACING_TOL} Å⁻¹ "
                         f"({ka:g} vs {kb:g} Å⁻¹), so energies are converged to different degrees; "
                         "use a common spacing.")]
    return []


def kspacing_from_divisions(cell: Any, divisions: Any) -> float | None:
    """Largest k-point spacing ``max_i |b_i| / n_i`` (Å⁻¹, ``b_i`` including 2π) of a Monkhorst-Pack grid.

    Args:
        cell: (3, 3) lattice vectors in Å (rows).
        divisions: ``[n1, n2, n3]``; ``[1, 1, 1]`` for Γ-only.
    """
    if divisions is None:
        return None
    cell = np.asarray(cell, dtype=float)
    if cell.shape != (3, 3) or abs(np.linalg.det(cell)) < 1e-12:
        return None
    rec = 2.0 * np.pi * np.linalg.inv(cell).T
    n = np.asarray(divisions, dtype=float)
    if n.shape != (3,) or np.any(n <= 0):
        return None
    return float(np.max(np.linalg.norm(rec, axis=1) / n))
