"""The code's shape, checked: imports point one way (core never imports up) and no module grows past ~400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "repsim"
# Lower layers first; a module may import its own layer and the layers below it, never one above.
LAYERS = [
    {"types", "progress", "files", "shard", "inputs", "threads"},
    {"gram", "minibatch", "cka", "store", "backbone"},
    {"capture", "compare", "plot", "surgery"},
    {"data", "models", "metrics", "specs"},
    {"knn", "train", "workflows"},
    {"study", "report", "cli", "__main__", "__init__"},
]
LAYER_OF = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _unit(path: Path) -> str:
    """The top-level unit of ``repsim`` a file belongs to (``repsim/models/zoo.py`` -> ``models``)."""
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imported_units(path: Path) -> set[str]:
    """Every ``repsim.<unit>`` the file imports, at module level or inside a function."""
    units = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] == "repsim":
                units |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            units |= {a.name.split(".")[1] for a in node.names if a.name.startswith("repsim.")}
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and str(arg.value).startswith("repsim."):
                units.add(str(arg.value).split(".")[1])
    return units


FILES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path: Path) -> None:
    unit = _unit(path)
    assert unit in LAYER_OF, f"{unit} has no layer in LAYERS"
    upward = sorted(u for u in _imported_units(path) if LAYER_OF.get(u, -1) > LAYER_OF[unit])
    assert not upward, f"{path.relative_to(PACKAGE)} (layer {LAYER_OF[unit]}) imports up: {upward}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_small(path: Path) -> None:
    assert len(path.read_text().splitlines()) <= 420, f"{path.relative_to(PACKAGE)} is over ~400 lines: split it"
