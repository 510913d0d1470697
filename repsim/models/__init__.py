"""The paper's model zoo behind one ``Backbone`` API, plus the classifiers built on it.

``create(name)`` builds a zoo model (``available()`` lists them) or any timm model; ``build_classifier`` adds a
linear head or the paper's stacked DeiT classifier in one of the four frozen/unfrozen scenarios. Names are imported
on first use, so ``repsim models`` (``repsim.models.catalogue``) prints the zoo without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"Backbone": "repsim.backbone", "SCENARIOS": "repsim.models.classifier",
         "FoundationClassifier": "repsim.models.classifier", "build_classifier": "repsim.models.classifier",
         "ZOO": "repsim.models.zoo", "ZooInfo": "repsim.models.zoo", "available": "repsim.models.zoo",
         "check_name": "repsim.models.catalogue", "create": "repsim.models.zoo"}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'repsim.models' has no attribute {name!r}")
