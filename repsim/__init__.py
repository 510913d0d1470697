"""repsim: representation analysis of vision models (CKA, activation capture, layer surgery).

Data flows model -> activations (``capture``/``extract``, xarray) -> CKA (``MinibatchCKA``/``compare``, an xarray
Dataset with its provenance) -> figure (``heatmap``, ``plot.diagonal``). Everything is imported on first use, so
``import repsim`` and ``repsim --help`` stay quick.

``repsim.cka``, ``repsim.capture`` and ``repsim.compare`` are the functions, also after their same-named modules
are imported (``from repsim.cka import MinibatchCKA`` reads the module; ``import repsim.cka as m`` gives the
function, so use ``from ... import``).
"""

from __future__ import annotations

import importlib
import sys
import types as _stdlib_types  # ``types`` itself is the name of the sub-module repsim.types
from typing import Any

from repsim.lazy import lazy_exports

__version__ = "0.6.1"

if "ipykernel" in sys.modules:  # in Jupyter: silence tqdm's IProgress warning before timm can raise it
    importlib.import_module("repsim.progress")

# public name -> its module
_EXPORTS = {
    "cka": "repsim.cka", "MinibatchCKA": "repsim.minibatch", "gram_vector": "repsim.gram",
    "feature_gram": "repsim.gram", "capture": "repsim.capture", "extract": "repsim.capture",
    "compare": "repsim.compare", "compare_many": "repsim.compare", "cka_matrix": "repsim.compare",
    "Bootstrap": "repsim.compare", "write_cka": "repsim.workflows", "heatmap": "repsim.plot",
    "heatmap_grid": "repsim.plot", "load": "repsim.files",
}
_lazy_getattr, _, _lazy = lazy_exports(__name__, _EXPORTS, deprecated={"compare_models": "repsim.workflows:write_cka"})
# Sub-packages reachable as attributes after a plain ``import repsim`` (imported on first use).
_SUBMODULES = ("models", "surgery", "data", "train", "metrics", "knn", "study", "report", "plot", "files")
_FUNCTIONS_NAMED_AS_MODULES = {"cka", "capture", "compare"}

__all__ = sorted([*_lazy, *_SUBMODULES])


class _Package(_stdlib_types.ModuleType):
    """The package object: keeps ``cka``/``capture``/``compare`` bound to the functions when the import system
    binds the same-named sub-modules onto the package."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _FUNCTIONS_NAMED_AS_MODULES and isinstance(value, _stdlib_types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"repsim.{name}")
    value = _lazy_getattr(name)
    if name in _EXPORTS:
        globals()[name] = value  # bound once: later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))
