"""The transfer study: the paper's analyses end to end, on any backbone and any datasets the trainer reads.

A study has *starts* (ways to initialise one backbone architecture: the library's pretrained weights, pretraining
here on a source task, a local checkpoint, from scratch), *targets* and the four *scenarios* (frozen/unfrozen x
linear head/stacked classifier). Every start x target x scenario is an experiment: LR search on validation (seed
0), then seeds at the chosen LR. Around them: k-NN on frozen features (Fig 2), progressive freezing (Fig 4) and
decapitation (Fig 5) curves, other model sizes frozen (Fig 6), CKA on flattened stage outputs before vs after
fine-tuning for every start with its references (Fig 7: the floor of two random initialisations, the seed spread of
the start, AdaBN-before), the stacked classifier before vs after (Fig A.1), last-block CKA across backbones (Fig 8),
paired differences between starts with 95% intervals from a bootstrap over seeds and test images (declared
primaries and the rest as two Holm-adjusted families), the budget curve, the clock per stage and flags for runs
that did not train.

``run_study("natural", out, data_root=...)`` runs a preset (``PRESETS``); ``Study(settings, out).run()`` any
``Settings``. Re-running resumes: finished runs and CKA files are reused. The modules, in the one direction the
study flows: ``settings`` (what runs) -> ``results`` (the result structures, numpy/xarray only) -> ``workspace``
(paths, data blocks, backbones) -> ``scheduler`` (runs in worker processes by dependency) -> ``plan`` (the trainer
experiments) -> ``similarity`` (CKA) -> ``bootstrap``, ``stats``, ``clock`` (intervals, flags, budget, time) ->
``figures``, ``tables``, ``outputs`` (figures, ``tables.md``, ``study.json``) -> ``pipeline`` (the stages in order)
-> ``demo`` (``repsim demo``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from repsim.lazy import lazy_exports
from repsim.study.settings import PAPER_LR_GRID, PRESETS, SYNTHETIC, Settings, Start, settings_with

__getattr__, __dir__, _lazy = lazy_exports(__name__, {
    "Study": "repsim.study.pipeline", "resolved_config": "repsim.study.plan", "Workspace": "repsim.study.workspace",
    "same_block": "repsim.study.results", "run_demo": "repsim.study.demo"},
    deprecated={"diagonal": "repsim.study.results:same_block"})

__all__ = ["PAPER_LR_GRID", "PRESETS", "SYNTHETIC", "Settings", "Start", "run_study", "settings_with", *_lazy]


def run_study(settings: Settings | str, out: str | Path, *, data_root: str | Path | None = None, jobs: int = 1,
              threads: int | None = None, device: str = "auto",
              overrides: Sequence[str] | Mapping[str, Any] = (), report: bool = False) -> dict[str, Any]:
    """Run (or resume) the study of ``settings`` or of the preset of that name, with ``overrides`` of its fields
    (``"train.epochs=3"`` strings or a ``{key: value}`` mapping), in ``out``; return its summary. ``report``: train
    nothing, report what has finished (``Study.run``)."""
    from repsim.study.pipeline import Study

    if isinstance(settings, str):
        if settings not in PRESETS:
            raise ValueError(f"unknown preset {settings!r}; known: {', '.join(PRESETS)}")
        settings = PRESETS[settings]
    return Study(settings_with(settings, overrides), out, data_root=data_root, jobs=jobs, threads=threads,
                 device=device).run(report=report)
