"""repsim: representation analysis of vision models (CKA, activation capture, layer surgery).

Data flows model -> activations (``capture``/``extract``, xarray) -> CKA (``MinibatchCKA``/``compare``, xarray)
-> figure (``heatmap``). Heavy sub-modules are imported on first use so ``import repsim`` stays quick.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Imported eagerly: ``cka``, ``capture`` and ``compare`` are both functions and sub-modules. Binding the functions
# here, after their modules are imported, replaces the sub-module attributes that the import system sets, so
# ``repsim.cka(x, y)`` is the function while ``import repsim.cka`` still works.
from repsim.capture import capture, extract  # noqa: E402
from repsim.cka import MinibatchCKA, cka, gram_vector  # noqa: E402
from repsim.compare import cka_matrix, compare, compare_many  # noqa: E402

_LAZY = {
    "heatmap": "repsim.plot",
    "heatmap_grid": "repsim.plot",
}

# Sub-packages reachable as attributes after a plain ``import repsim`` (imported on first use).
_SUBMODULES = ("models", "surgery", "data", "train", "metrics", "knn", "study", "report")

__all__ = sorted([*_LAZY, *_SUBMODULES, "MinibatchCKA", "capture", "cka", "cka_matrix", "compare", "compare_many",
                  "extract", "gram_vector"])


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"repsim.{name}")
    raise AttributeError(f"module 'repsim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))
