"""n2p2's potential files: ``input.nn``, ``scaling.data`` and ``weights.NNN.data``.

Formats follow n2p2's documentation (https://compphysvienna.github.io/n2p2/topics/keywords.html and the
``scaling.data``/``weights`` headers n2p2 writes). Keywords mlmd_lab does not evaluate (training settings and
the like) are kept verbatim and written back, so a potential passes through mlmd_lab unchanged.
Numbers are written with 17 significant digits, which read back to the identical binary float64.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlmd_lab.errors import InputFileError, MLMDError
from mlmd_lab.files import atomic_write_text
from mlmd_lab.potentials.network import ACTIVATIONS
from mlmd_lab.potentials.symfunc import SymmetryFunction, atomic_number, sort_elements

#: n2p2's scaling types: scaled value = smin + factor * (G - reference).
SCALING_TYPES = ("none", "scale", "center", "scalecenter", "scalesigma")

# Keywords read into fields; everything else is kept in ``extra``.
_KNOWN = {
    "number_of_elements",
    "elements",
    "cutoff_type",
    "scale_symmetry_functions",
    "scale_symmetry_functions_sigma",
    "center_symmetry_functions",
    "scale_min_short",
    "scale_max_short",
    "global_hidden_layers_short",
    "global_nodes_short",
    "global_activation_short",
    "normalize_nodes",
    "mean_energy",
    "conv_energy",
    "conv_length",
    "atom_energy",
    "symfunction_short",
}
_UNSUPPORTED = {
    "element_nodes_short": "per-element network sizes",
    "element_activation_short": "per-element activations",
    "symfunction_short_group": "symmetry-function groups",
}


@dataclass
class N2P2Settings:
    """What ``input.nn`` says about the model (values in the file's units)."""

    elements: tuple[str, ...]
    symmetry_functions: list[SymmetryFunction]
    cutoff_type: int = 2
    cutoff_alpha: float = 0.0
    scaling: str = "none"
    scale_min: float = 0.0
    scale_max: float = 1.0
    hidden: tuple[int, ...] = (25, 25)
    activations: str = "ttl"
    normalize_nodes: bool = False
    mean_energy: float | None = None
    conv_energy: float | None = None
    conv_length: float | None = None
    atom_energy: dict[str, float] = field(default_factory=dict)
    extra: list[str] = field(default_factory=list)


def read_input_nn(path: str | Path) -> N2P2Settings:
    """Parse n2p2's ``input.nn``."""
    path = Path(path)
    values: dict[str, list[str]] = {}
    functions, atom_energy, extra = [], {}, []
    for lineno, raw in enumerate(_read_text(path).splitlines(), 1):
        text = raw.split("#", 1)[0].strip()
        if not text:
            continue
        key, *args = text.split()
        if key == "symfunction_short":
            try:
                functions.append(SymmetryFunction.from_n2p2(text))
            except MLMDError as err:
                raise InputFileError(path, f"line {lineno}: {err}") from None
        elif key == "atom_energy":
            atom_energy[args[0]] = float(args[1])
        elif key in _KNOWN:
            values[key] = args
        elif key in _UNSUPPORTED:
            raise InputFileError(path, f"line {lineno}: {_UNSUPPORTED[key]} ({key}) are not supported by mlmd_lab")
        elif key in ("nnp_type", "nnp_generation") and args and args[0] not in ("2", "2G", "HDNNP_2G"):
            raise InputFileError(path, f"line {lineno}: only second-generation HDNNPs (nnp_generation 2) are supported")
        else:
            extra.append(raw.rstrip())
    try:
        return _settings_from(values, functions, atom_energy, extra)
    except (KeyError, IndexError, ValueError) as err:
        raise InputFileError(
            path, f"incomplete or malformed input.nn ({err})", "see n2p2's keyword documentation"
        ) from None
    except MLMDError as err:
        raise InputFileError(path, str(err)) from None


def _settings_from(values, functions, atom_energy, extra) -> N2P2Settings:
    elements = tuple(values["elements"])
    if "number_of_elements" in values and int(values["number_of_elements"][0]) != len(elements):
        raise MLMDError(f"number_of_elements {values['number_of_elements'][0]} but elements lists {len(elements)}")
    for symbol in elements:
        atomic_number(symbol)
    if not functions:
        raise MLMDError("no symfunction_short lines")
    for sf in functions:
        if sf.element not in elements or any(e not in elements for e in sf.neighbours):
            raise MLMDError(f"symmetry function uses an element not in 'elements': {sf.to_n2p2()}")
    scale = "scale_symmetry_functions" in values
    center = "center_symmetry_functions" in values
    if "scale_symmetry_functions_sigma" in values:
        scaling = "scalesigma"
    elif scale and center:
        scaling = "scalecenter"
    elif scale:
        scaling = "scale"
    elif center:
        scaling = "center"
    else:
        scaling = "none"
    n_hidden = int(values["global_hidden_layers_short"][0])
    hidden = tuple(int(v) for v in values["global_nodes_short"][:n_hidden])
    activations = "".join(values["global_activation_short"][: n_hidden + 1])
    if len(hidden) != n_hidden or len(activations) != n_hidden + 1 or any(a not in ACTIVATIONS for a in activations):
        raise MLMDError(
            f"global_nodes_short/global_activation_short do not match {n_hidden} hidden layers "
            f"(activation codes: {''.join(ACTIVATIONS)})"
        )
    cutoff = values.get("cutoff_type", ["1"])
    norm = [values.get(k, [None])[0] for k in ("mean_energy", "conv_energy", "conv_length")]
    return N2P2Settings(
        elements=sort_elements(elements),
        symmetry_functions=functions,
        cutoff_type=int(cutoff[0]),
        cutoff_alpha=float(cutoff[1]) if len(cutoff) > 1 else 0.0,
        scaling=scaling,
        scale_min=float(values.get("scale_min_short", ["0.0"])[0]),
        scale_max=float(values.get("scale_max_short", ["1.0"])[0]),
        hidden=hidden,
        activations=activations,
        normalize_nodes="normalize_nodes" in values,
        mean_energy=None if norm[0] is None else float(norm[0]),
        conv_energy=None if norm[1] is None else float(norm[1]),
        conv_length=None if norm[2] is None else float(norm[2]),
        atom_energy=atom_energy,
        extra=extra,
    )


def write_input_nn(path: str | Path, settings: N2P2Settings, functions_by_element: dict, header: str = "") -> None:
    """Write ``input.nn`` with the model keywords first, then kept keywords, then the symmetry functions."""
    s = settings
    lines = ["#" * 80, "# n2p2 settings file written by mlmd_lab", *(f"# {h}" for h in header.splitlines()), "#" * 80]
    for key in ("mean_energy", "conv_energy", "conv_length"):
        if getattr(s, key) is not None:
            lines.append(f"{key:31s} {_num(getattr(s, key))}")
    lines += [
        f"{'number_of_elements':31s} {len(s.elements)}",
        f"{'elements':31s} {' '.join(s.elements)}",
        f"{'cutoff_type':31s} {s.cutoff_type} {_num(s.cutoff_alpha)}",
    ]
    if s.scaling in ("scale", "scalecenter"):
        lines.append("scale_symmetry_functions")
    if s.scaling in ("center", "scalecenter"):
        lines.append("center_symmetry_functions")
    if s.scaling == "scalesigma":
        lines.append("scale_symmetry_functions_sigma")
    lines += [
        f"{'scale_min_short':31s} {_num(s.scale_min)}",
        f"{'scale_max_short':31s} {_num(s.scale_max)}",
        f"{'global_hidden_layers_short':31s} {len(s.hidden)}",
        f"{'global_nodes_short':31s} {' '.join(str(h) for h in s.hidden)}",
        f"{'global_activation_short':31s} {' '.join(s.activations)}",
    ]
    if s.normalize_nodes:
        lines.append("normalize_nodes")
    for element, energy in sorted(s.atom_energy.items(), key=lambda kv: atomic_number(kv[0])):
        lines.append(f"{'atom_energy':31s} {element:2s} {_num(energy)}")
    if s.extra:
        lines += ["", "# Keywords kept from the source input.nn", *s.extra]
    lines.append("")
    for element in s.elements:
        lines += [sf.to_n2p2() for sf in functions_by_element[element]]
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_scaling(path: str | Path, n_per_element: list[int]) -> list[np.ndarray]:
    """``scaling.data`` as one (n_sf, 4) array [min, max, mean, sigma] per element (n2p2's element order)."""
    path = Path(path)
    rows = []
    for lineno, raw in enumerate(_read_text(path).splitlines(), 1):
        text = raw.split("#", 1)[0].split()
        if not text:
            continue
        try:
            e, i = int(text[0]), int(text[1])
            vals = [float(v) for v in text[2:6]]
        except (ValueError, IndexError):
            raise InputFileError(path, f"line {lineno}: expected 'element sf min max mean [sigma]'") from None
        if len(vals) == 3:
            vals.append(0.0)  # n2p2 files from before sigma was written
        rows.append((e, i, vals))
    tables = [np.full((n, 4), np.nan) for n in n_per_element]
    for e, i, vals in rows:
        if not (1 <= e <= len(tables) and 1 <= i <= len(tables[e - 1])):
            raise InputFileError(path, f"entry for element {e}, function {i} does not exist in input.nn")
        tables[e - 1][i - 1] = vals
    for e, table in enumerate(tables, 1):
        missing = np.flatnonzero(np.isnan(table[:, 0]))
        if missing.size:
            raise InputFileError(
                path, f"element {e} lacks scaling data for symmetry function(s) {list(missing + 1)}",
                "scaling.data must come from the same input.nn (run nnp-scaling again)",
            )
    return tables


def write_scaling(path: str | Path, tables: list[np.ndarray]) -> None:
    header = [
        "#" * 80,
        "# Symmetry function scaling data (written by mlmd_lab).",
        "# Col  Name     Description",
        "# 1    e_index  Element index.",
        "# 2    sf_index Symmetry function index.",
        "# 3    sf_min   Symmetry function minimum.",
        "# 4    sf_max   Symmetry function maximum.",
        "# 5    sf_mean  Symmetry function mean.",
        "# 6    sf_sigma Symmetry function sigma.",
        "#" * 80,
    ]
    lines = header + [
        f"{e:10d} {i:10d} " + " ".join(f"{v:24.16E}" for v in row)
        for e, table in enumerate(tables, 1)
        for i, row in enumerate(table, 1)
    ]
    atomic_write_text(path, "\n".join(lines) + "\n")


def weights_path(folder: str | Path, element: str) -> Path:
    """n2p2 names weight files by atomic number: ``weights.008.data`` for O."""
    return Path(folder) / f"weights.{atomic_number(element):03d}.data"


def read_weights(path: str | Path) -> np.ndarray:
    """The connection values (first column) of a ``weights.NNN.data`` file, in file order."""
    path = Path(path)
    values = []
    for lineno, raw in enumerate(_read_text(path).splitlines(), 1):
        text = raw.split("#", 1)[0].split()
        if not text:
            continue
        try:
            values.append(float(text[0]))
        except ValueError:
            raise InputFileError(path, f"line {lineno}: not a number: {text[0]!r}") from None
    return np.asarray(values)


def write_weights(path: str | Path, values: np.ndarray, sizes: list[int]) -> None:
    """Write connections with n2p2's annotation columns (type, index, start layer/neuron, end layer/neuron)."""
    lines = [
        "#" * 80,
        "# Neural network connection values (weights and biases), written by mlmd_lab.",
        "# Col  Name       Description",
        "# 1    connection Neural network connection value.",
        "# 2    t          Connection type (a = weight, b = bias).",
        "# 3    index      Index enumerating weights.",
        "# 4    l_s        Starting point layer (end point layer for biases).",
        "# 5    n_s        Starting point neuron in starting layer (end point neuron for biases).",
        "# 6    l_e        End point layer.",
        "# 7    n_e        End point neuron in end layer.",
        "#" * 80,
    ]
    index = 0
    for layer, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        for j in range(n_in):
            for k in range(n_out):
                lines.append(f"{values[index]:24.16E} a {index + 1:9d} {layer:5d} {j + 1:5d} {layer + 1:5d} {k + 1:5d}")
                index += 1
        for k in range(n_out):
            lines.append(f"{values[index]:24.16E} b {index + 1:9d} {layer + 1:5d} {k + 1:5d}")
            index += 1
    atomic_write_text(path, "\n".join(lines) + "\n")


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise InputFileError(
            path, "file not found", "give the folder holding input.nn, scaling.data and weights.NNN.data"
        )
    try:
        return path.read_text()
    except UnicodeDecodeError:
        raise InputFileError(path, "not a text file") from None


def _num(value: float) -> str:
    return f"{float(value):.17G}"
