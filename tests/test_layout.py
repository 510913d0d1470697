"""The code's shape, checked: imports point one way (core never imports up, and no two files import each other in
a circle, inside a package too), no module grows past ~400 lines, and the names of a run folder's files are spelled
in ``repsim/train/runs.py`` only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "repsim"
# Lower layers first; a module may import its own layer and the layers below it, never one above.
LAYERS = [
    {"types", "progress", "files", "shard", "inputs", "threads", "lazy", "matrices", "batches"},
    {"gram", "minibatch", "cka", "store", "backbone", "layer_names"},
    {"capture", "compare", "plot", "surgery"},
    {"data", "models", "metrics", "specs"},
    {"knn", "train", "workflows"},
    {"study", "report", "cli", "__main__", "__init__"},
]
LAYER_OF = {name: i for i, layer in enumerate(LAYERS) for name in layer}
FILES = sorted(PACKAGE.rglob("*.py"))
# The files of a run and of an experiment folder (repsim.train.runs owns them), and the patterns of its folders.
RUN_FILES = {"config.yaml", "model.json", "split.json", "metrics.jsonl", "summary.json", "backbone_init.pt",
             "backbone_best.pt", "checkpoints", "init.pt", "best.pt", "last.pt", "results.json", "knn.json"}
RUN_PATTERNS = {"lr{}", "seed{}", "backbone_{}.pt", "lr*", "seed*", "lr*/seed*", "{}.pt"}


def _module(path: Path) -> str:
    """``repsim/models/zoo.py`` -> ``repsim.models.zoo``; ``repsim/models/__init__.py`` -> ``repsim.models``."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(p): p for p in FILES}


def _unit(path: Path) -> str:
    """The top-level unit of ``repsim`` a file belongs to (``repsim/models/zoo.py`` -> ``models``)."""
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imported_modules(path: Path) -> set[str]:
    """Every ``repsim`` module the file imports, at module level or inside a function (``from repsim.x import y``
    counts ``repsim.x.y`` when that is a module, else ``repsim.x``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                     for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant):
                names = [str(arg.value)]
        found |= {n for n in names if n == "repsim" or n.startswith("repsim.")}
    return found


def _unit_of_module(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


IMPORTS = {mod: {m for m in _imported_modules(path) if m in MODULES and m != mod} for mod, path in MODULES.items()}


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path: Path) -> None:
    unit = _unit(path)
    assert unit in LAYER_OF, f"{unit} has no layer in LAYERS"
    units = {_unit_of_module(m) for m in _imported_modules(path)}
    upward = sorted(u for u in units if LAYER_OF.get(u, -1) > LAYER_OF[unit])
    assert not upward, f"{path.relative_to(PACKAGE)} (layer {LAYER_OF[unit]}) imports up: {upward}"


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (module -> modules it imports), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circle_between_files() -> None:
    """Files import each other one way only, inside a package too (a package's ``__init__`` may re-export its
    modules, so its own modules' imports of the package name are not edges back to it)."""
    graph = {mod: {m for m in deps if not (mod.startswith(m + ".") and MODULES[m].name == "__init__.py")}
             for mod, deps in IMPORTS.items()}
    circle = _cycle(graph)
    assert circle is None, "import circle: " + " -> ".join(circle or [])


def _spelled_run_names(path: Path) -> list[str]:
    """The run-folder file names and folder patterns written as string literals (docstrings aside) in ``path``."""
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
            if text in RUN_PATTERNS or any(text.endswith("/" + name) for name in RUN_FILES):
                found.append(text)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            text = node.value
            if text in RUN_FILES or text in RUN_PATTERNS or any(text.endswith("/" + n) for n in RUN_FILES):
                found.append(text)
    return found


@pytest.mark.parametrize("path", [p for p in FILES if p != PACKAGE / "train" / "runs.py"],
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_run_file_names_are_spelled_in_runs_only(path: Path) -> None:
    spelled = _spelled_run_names(path)
    assert not spelled, f"{path.relative_to(PACKAGE)} spells run-folder names {spelled}: use repsim.train.runs.RunFiles"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_small(path: Path) -> None:
    assert len(path.read_text().splitlines()) <= 400, f"{path.relative_to(PACKAGE)} is over 400 lines: split it"
