"""Fine-tuning and experiment runner (``repsim train``).

``run(spec, data_root=..., out=..., overrides=...)`` runs every experiment of a spec; ``train(cfg, run_dir)`` one
resolved config. A run directory holds ``config.yaml`` (resolved), ``split.json``, ``metrics.jsonl`` (one JSON per
epoch), ``summary.json`` (test metrics of the best checkpoint, best epoch, iterations to best, inference ms/image,
lr, seed), ``checkpoints/last.pt`` (resume) and ``checkpoints/best.pt``, ``backbone_init.pt`` and
``backbone_best.pt`` (plain Backbone state_dicts: ``repsim.models.create(name, checkpoint=...)`` rebuilds them)
and ``model.json`` ({name, kwargs, img_size, in_chans, scenario, num_classes, ...}) to rebuild the classifier.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"run": "repsim.train.runner", "run_experiment": "repsim.train.runner", "train": "repsim.train.loop",
         "load_spec": "repsim.train.config", "expand": "repsim.train.config"}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'repsim.train' has no attribute {name!r}")
