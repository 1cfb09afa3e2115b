"""The import structure of mlmd_lab, read statically (ast; nothing is imported): no cycles, layers one way.

Every ``import``/``from ... import`` (and ``importlib.import_module("mlmd_lab...")``) of every module under
``mlmd_lab/`` is an edge, classified by where it runs:

- module level (module body, class bodies, module-level ``if``/``try``): runs on import. A cycle through
  these is the real defect: which module is half-initialised depends on which one is imported first, and
  ``from a import name`` then fails. The implicit import of a target's parent packages counts too
  (``import mlmd_lab.db.store`` runs ``mlmd_lab/db/__init__.py`` first).
- function level (inside ``def``/``lambda``): runs when called. These count as well: a lazy import hides a
  cycle from the interpreter, not from the design (the two modules still need each other, cannot be tested
  or moved apart, and hoisting the import — a tidy-up or a type annotation — turns it into an ImportError).
  One kind is left out: a module importing its own parent package (``mlmd_lab.io.vasp`` using helpers of
  ``mlmd_lab.io`` while ``mlmd_lab.io.read`` dispatches to ``mlmd_lab.io.vasp``). A package is initialised
  before its submodules, so this is one module split into files, not two layers leaning on each other.
- ``if TYPE_CHECKING:`` imports never run and are left out.

Layers (lower never imports higher), following the data flow files/DFT -> frames -> database -> training
set -> model -> registry -> MD/SLHMC -> analysis, loops on top, the notebook interface above all. In import
terms the model's *definition* (``mlmd_lab.potentials``) sits below training (``mlmd_lab.train``): the
training set is computed with the model's own descriptors, and the trainer builds models; the trained model
then flows on to the registry and MD. Module-level imports must follow the layers without exception; the few
function-level convenience accessors that reach up are listed in ``UPWARD_ALLOWED`` with their reason.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "mlmd_lab"

#: (layer name, module prefixes), lowest first; a module belongs to the layer of its longest matching prefix.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("mlmd_lab.errors", "mlmd_lab.units", "mlmd_lab.files", "mlmd_lab.frames", "mlmd_lab.settings",
              "mlmd_lab.jaxconfig")),
    ("infrastructure", ("mlmd_lab.cluster",)),
    ("files/DFT", ("mlmd_lab.io", "mlmd_lab.dft")),
    ("frames", ("mlmd_lab.frameset",)),
    ("database", ("mlmd_lab.db",)),
    ("model", ("mlmd_lab.potentials",)),
    ("training", ("mlmd_lab.train",)),
    ("registry", ("mlmd_lab.db.models",)),
    ("md", ("mlmd_lab.md",)),
    ("analysis", ("mlmd_lab.analysis",)),
    ("loops", ("mlmd_lab.slhmc", "mlmd_lab.learn")),
    ("interface", ("mlmd_lab", "mlmd_lab.widgets", "mlmd_lab.jupyter", "mlmd_lab.cli", "mlmd_lab.quickstart",
                   "mlmd_lab.demo", "mlmd_lab.report")),
]

#: Function-level imports allowed to reach a higher layer: (importer, imported) -> why.
UPWARD_ALLOWED = {
    ("mlmd_lab.db.store", "mlmd_lab.db.models"):
        "Database.models: the potential registry is reached from the database connection it lives in",
    ("mlmd_lab.potentials.model", "mlmd_lab.md.lammps"):
        "HDNNP.to_lammps: writing a LAMMPS run folder is offered on the model",
    ("mlmd_lab.dft.generators", "mlmd_lab.md.run"):
        "md_snapshots: candidate structures for DFT from MD with a given potential (an active-learning step)",
    ("mlmd_lab.cluster", "mlmd_lab.jupyter"):
        "mlmd_lab.cluster(): the dask dashboard link through JupyterHub's proxy",
}


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str
    line: int
    level: str  # "module" or "function"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The deepest mlmd_lab module that ``name`` (a module or a name inside one) refers to."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:k]) for k in range(1, len(parts))]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _targets(node: ast.AST, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            package = module if is_package else module.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}" if base else package
        return [f"{base}.{alias.name}" for alias in node.names]
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
            and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        return [node.args[0].value]
    return []


def _edges_of(module: str, path: Path) -> list[Edge]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    edges: list[Edge] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for other in child.orelse:  # the else branch runs
                    visit(ast.Module(body=[other], type_ignores=[]), in_function)
                continue
            for target in _targets(child, module, is_package):
                resolved = _resolve(target) if target.startswith("mlmd_lab") else None
                if resolved is not None and resolved != module:
                    edges.append(Edge(module, resolved, child.lineno, "function" if in_function else "module"))
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            visit(child, inner)

    visit(tree, False)
    return edges


EDGES = [edge for module, path in MODULES.items() for edge in _edges_of(module, path)]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as one cycle through them."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(_one_cycle(graph, set(component)))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return components


def _one_cycle(graph: dict[str, set[str]], members: set[str]) -> list[str]:
    """A concrete cycle inside a strongly connected component (breadth-first back to the start)."""
    start = min(members)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, set()) & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if w not in parents:
                    parents[w] = v
                    nxt.append(w)
        frontier = nxt
    return sorted(members)  # unreachable for a true component


def _describe(cycle: list[str], edges: list[Edge]) -> str:
    where = {(e.importer, e.imported): e for e in edges}
    steps = []
    for a, b in zip(cycle, cycle[1:], strict=False):
        edge = where.get((a, b))
        steps.append(f"{a} -> {b}" + (f" ({MODULES[a].name}:{edge.line}, {edge.level} level)" if edge else ""))
    return "\n  ".join(steps)


def _graph(edges: list[Edge]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for edge in edges:
        graph.setdefault(edge.importer, set()).add(edge.imported)
    return graph


def module_level_edges() -> list[Edge]:
    """Module-level edges plus the implicit imports of each target's parent packages."""
    out = []
    for edge in EDGES:
        if edge.level != "module":
            continue
        out.append(edge)
        own = set(_ancestors(edge.importer))
        out += [Edge(edge.importer, parent, edge.line, "module") for parent in _ancestors(edge.imported)
                if parent not in own and parent != edge.importer]
    return out


def all_edges_between_layers() -> list[Edge]:
    """Module- and function-level edges, without a module's imports of its own parent packages."""
    return [e for e in EDGES if e.imported not in _ancestors(e.importer)]


def layer_of(module: str) -> int:
    best, rank = -1, None
    for k, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), k
    assert rank is not None, f"{module} belongs to no layer; add it to LAYERS in {__file__}"
    return rank


# ----------------------------------------------------------------------------------------------- tests
def test_the_walk_sees_the_package():
    assert len(MODULES) > 50 and "mlmd_lab.potentials.model" in MODULES
    levels = {e.level for e in EDGES}
    assert levels == {"module", "function"}
    # both kinds are seen: a known module-level and a known function-level import
    assert any(e.importer == "mlmd_lab.md.run" and e.imported == "mlmd_lab.potentials.model"
               and e.level == "module" for e in EDGES)
    assert any(e.importer == "mlmd_lab.potentials.model" and e.imported == "mlmd_lab.md.lammps"
               and e.level == "function" for e in EDGES)


def test_cycle_finder_finds_and_lists_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_walk_classifies_import_levels(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "import mlmd_lab.units\n"
        "from mlmd_lab.potentials import model\n"
        "if TYPE_CHECKING:\n"
        "    from mlmd_lab.db.store import Database\n"
        "class A:\n"
        "    from mlmd_lab import frames\n"
        "def f():\n"
        "    from mlmd_lab.md.run import run\n"
        "    import importlib\n"
        "    return importlib.import_module('mlmd_lab.analysis')\n")
    found = {(e.imported, e.level) for e in _edges_of("mlmd_lab.probe", source)}
    assert found == {("mlmd_lab.units", "module"), ("mlmd_lab.potentials.model", "module"),
                     ("mlmd_lab.frames", "module"), ("mlmd_lab.md.run", "function"),
                     ("mlmd_lab.analysis", "function")}  # the TYPE_CHECKING import is not an edge


def test_no_import_cycle_at_module_level():
    edges = module_level_edges()
    cycles = _cycles(_graph(edges))
    assert not cycles, "import cycles through module-level imports:\n  " + "\n\n  ".join(
        _describe(c, edges) for c in cycles)


def test_no_import_cycle_counting_function_level_imports():
    edges = all_edges_between_layers()
    cycles = _cycles(_graph(edges))
    assert not cycles, ("import cycles (function-level imports included; break them by moving the shared code "
                        "down a layer or passing it in):\n  " + "\n\n  ".join(_describe(c, edges) for c in cycles))


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_lower_layers_never_import_higher_ones():
    upward = []
    for edge in all_edges_between_layers():
        low, high = layer_of(edge.importer), layer_of(edge.imported)
        if high <= low:
            continue
        if edge.level == "function" and (edge.importer, edge.imported) in UPWARD_ALLOWED:
            continue
        upward.append(f"{edge.importer} ({LAYERS[low][0]}) imports {edge.imported} ({LAYERS[high][0]}) at "
                      f"{MODULES[edge.importer].name}:{edge.line}, {edge.level} level")
    assert not upward, "imports against the layers:\n  " + "\n  ".join(upward)


def test_allowed_upward_imports_still_exist():
    """An exception whose import is gone must leave the list (it would silently allow a later one)."""
    present = {(e.importer, e.imported) for e in EDGES if e.level == "function"}
    assert set(UPWARD_ALLOWED) <= present, sorted(set(UPWARD_ALLOWED) - present)


def test_every_public_name_resolves():
    """Each package's ``__all__`` names exist (a broken re-export once hid ExtrapolationWarning and evaluate)."""
    import importlib

    missing = []
    for init in sorted(PACKAGE_ROOT.rglob("__init__.py")):
        name = ".".join(init.parent.relative_to(PACKAGE_ROOT.parent).parts)
        module = importlib.import_module(name)
        missing += [f"{name}.{item}" for item in getattr(module, "__all__", ()) if not hasattr(module, item)]
    assert not missing, f"names in __all__ that do not exist: {missing}"
