"""The run-folder layout of the trainer, owned here: where a run goes, how to find runs, how to load one back.

    <experiment>/lr<lr>/seed<k>/       one run (``repsim.train.loop.train``)
        config.yaml  model.json  split.json  metrics.jsonl  summary.json
        backbone_init.pt  backbone_best.pt           plain Backbone state dicts
        checkpoints/best.pt                          the whole classifier at its best validation epoch
        checkpoints/init.pt                          its head / stacked classifier before training
        checkpoints/last.pt                          resume state (removed once the run has finished)
    <experiment>/results.json          LR search and mean ± std over seeds (``run_experiment``)

    <pretrain run>/                    one self-supervised run (``repsim.train.pretrain.pretrain``)
        config.yaml  model.json  split.json  metrics.jsonl  summary.json
        backbone_init.pt  backbone_best.pt           the start and the final teacher backbone
        checkpoints/last.pt                          resume state (removed once the run has finished)
        collapsed.json                               instead of backbone_best.pt when the run collapsed

``load_run(run, which, part)`` rebuilds the exact model of a run from ``model.json`` and these files, so
``repsim cka --run-a DIR``, the study and the report all read runs the same way.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

from torch import nn

from repsim.files import load_torch

COLLAPSED = "collapsed.json"  # written by a pretraining run that collapsed: it is never a usable start


def run_dir(exp_dir: str | Path, lr: float, seed: int) -> Path:
    """The folder of the run at ``lr`` and ``seed`` inside an experiment folder."""
    return Path(exp_dir) / f"lr{lr:g}" / f"seed{seed}"


def find_runs(exp_dir: str | Path, lr: float | None = None) -> list[Path]:
    """The finished runs (those with ``summary.json``) under ``exp_dir``, at ``lr`` when given, ordered by
    (lr, seed)."""
    found = []
    for path in Path(exp_dir).rglob("summary.json"):
        s = json.loads(path.read_text())
        if lr is None or math.isclose(s["lr"], lr, rel_tol=1e-9):
            found.append((s["lr"], s["seed"], path.parent))
    return [p for *_, p in sorted(found)]


def is_run(path: str | Path) -> bool:
    """Whether ``path`` is a trainer run folder (it has the files ``load_run`` needs)."""
    path = Path(path)
    return all((path / f).is_file() for f in ("model.json", "backbone_init.pt", "backbone_best.pt"))


def load_run(run: str | Path, which: Literal["init", "best"] = "best",
             part: Literal["backbone", "classifier"] = "backbone") -> nn.Module:
    """A run's backbone (``part="backbone"``) or whole classifier, at initialisation or at its best epoch, in eval
    mode. The architecture comes from ``model.json``; every tensor from the run's files (read ``weights_only``)."""
    from repsim import models

    run = Path(run)
    if which not in ("init", "best"):
        raise ValueError(f"which must be 'init' or 'best', got {which!r}")
    if part not in ("backbone", "classifier"):
        raise ValueError(f"part must be 'backbone' or 'classifier', got {part!r}")
    if (run / COLLAPSED).is_file():
        reason = json.loads((run / COLLAPSED).read_text())["reason"]
        raise ValueError(f"{run} is a collapsed pretraining run ({reason}); it is not usable as a start")
    if not is_run(run):
        raise FileNotFoundError(f"{run} is not a finished trainer run (needs model.json, backbone_init.pt and "
                                "backbone_best.pt)")
    record = json.loads((run / "model.json").read_text())
    if part == "classifier" and record.get("kind") == "pretrain":
        raise ValueError(f"{run} is a self-supervised pretraining run: it has a backbone, no classifier")
    backbone = models.create(record["name"], checkpoint=run / f"backbone_{which}.pt", img_size=record["img_size"],
                             in_chans=record["in_chans"], decapitate=record.get("decapitate"), **record["kwargs"])
    if part == "backbone":
        return backbone.eval()
    model = models.build_classifier(backbone, record["scenario"], record["num_classes"],
                                    freeze_blocks=record.get("freeze_blocks"),
                                    classifier_kwargs=record.get("classifier") or None)
    if which == "best":
        state = load_torch(run / "checkpoints" / "best.pt")["model"]
    else:
        init = run / "checkpoints" / "init.pt"
        if not init.is_file():
            raise FileNotFoundError(f"{init} is missing: the run predates saved initial heads, so its initial "
                                    "classifier cannot be loaded (its initial backbone can: part='backbone')")
        state = {**{f"backbone.{k}": v for k, v in backbone.state_dict().items()}, **load_torch(init)}
    model.load_state_dict(state)
    return model.eval()


def load_backbone(model: str | Path, *, which: Literal["init", "best"] = "best", pretrained: bool = False,
                  checkpoint: str | Path | None = None, img_size: int | None = None) -> nn.Module:
    """A backbone by name (zoo or timm; ``pretrained``/``checkpoint`` as ``repsim.models.create``) or from a trainer
    run folder (its ``which`` weights, at the run's size), in eval mode."""
    from repsim import models

    if is_run(model) or (Path(model) / COLLAPSED).is_file():
        if pretrained or checkpoint is not None:
            raise ValueError(f"{model} is a run folder: its weights come from the run, not pretrained/checkpoint")
        return load_run(model, which)
    if Path(model).exists():
        raise FileNotFoundError(f"{model} is a folder but not a finished trainer run (needs model.json, "
                                "backbone_init.pt and backbone_best.pt)")
    return models.create(str(model), pretrained=pretrained, checkpoint=checkpoint, img_size=img_size or 224).eval()
