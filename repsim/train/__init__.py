"""Fine-tuning and experiment runner (``repsim train``).

``run(spec, data_root=..., out=..., overrides=...)`` runs every experiment of a spec; ``train(cfg, run_dir)`` one
resolved config into a run folder, whose layout ``repsim.train.runs`` documents and owns (``RunFiles``).
"""

from __future__ import annotations

from repsim.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "run": "repsim.train.runner", "run_experiment": "repsim.train.runner", "train": "repsim.train.loop",
    "load_spec": "repsim.train.config", "expand": "repsim.train.config", "RunFiles": "repsim.train.runs"})
