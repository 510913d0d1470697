"""The run-folder layout of the trainer, owned here: its file names (``RunFiles``, ``ExperimentFiles``), where a run
goes, how to find runs, how to load one back. No other module spells these names.

    <experiment>/lr<lr>/seed<k>/       one run (``repsim.train.loop.train``; ``RunFiles``)
        config.yaml                                  the resolved config
        model.json                                   {name, kwargs, img_size, in_chans, scenario, num_classes, ...}
        split.json                                   the sample ids of train/val/test
        metrics.jsonl                                one JSON per epoch
        summary.json                                 test metrics of the best checkpoint, best epoch, lr, seed, ...
        test_predictions.npz                         the best checkpoint's test probabilities and targets
        backbone_init.pt  backbone_best.pt           plain Backbone state dicts (``repsim.models.create(checkpoint=)``)
        checkpoints/init.pt                          its head / stacked classifier before training
        checkpoints/best.pt                          the whole classifier at its best validation epoch
        checkpoints/last.pt                          resume state (removed once the run has finished)
    <experiment>/results.json          LR search and mean ± std over seeds (``run_experiment``; ``ExperimentFiles``)
    <experiment>/knn.json              k-NN metrics (kind ``knn``), beside its ``config.yaml``

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
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # torch is imported by the loaders only: checking a run folder stays instant
    from torch import nn

from repsim.files import inside, load_state, load_torch, read_json

COLLAPSED = "collapsed.json"  # written by a pretraining run that collapsed: it is never a usable start

Stage = Literal["init", "best"]


class RunFiles:
    """The files of one run folder ``path`` (the layout above), each named here once, and their readers."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def model(self) -> Path:
        return self.path / "model.json"

    @property
    def split(self) -> Path:
        return self.path / "split.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def predictions(self) -> Path:
        """The best checkpoint's test predictions (``probs``, ``targets``): test-set bootstraps need them."""
        return self.path / "test_predictions.npz"

    @property
    def lock(self) -> Path:
        """The lock file the trainer's main process holds while it writes the run."""
        return self.path / ".lock"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def backbone(self, which: Stage) -> Path:
        """The plain Backbone state dict at initialisation or at the best validation epoch."""
        return self.path / f"backbone_{which}.pt"

    def checkpoint(self, which: Literal["init", "best", "last"]) -> Path:
        """``init``: the head before training; ``best``: the whole classifier; ``last``: the resume state."""
        return self.checkpoints / f"{which}.pt"

    def finished(self) -> bool:
        """Whether the run has finished (it has its summary)."""
        return self.summary.is_file()

    def all_paths(self) -> list[Path]:
        """Every path the run reads or writes (``check_run_paths`` refuses any that leads outside the run)."""
        return [self.lock, self.config, self.model, self.split, self.metrics, self.summary, self.predictions,
                self.backbone("init"),
                self.backbone("best"), self.checkpoints, *(self.checkpoint(w) for w in ("best", "init", "last"))]

    def read_predictions(self) -> tuple[Any, Any]:
        """``(probs, targets)`` of the best checkpoint on the test split (numpy arrays)."""
        import numpy as np

        with np.load(self.predictions) as npz:
            return npz["probs"], npz["targets"]

    def read_summary(self) -> dict[str, Any]:
        return read_json(self.summary)

    def read_model(self) -> dict[str, Any]:
        return read_json(self.model)

    def read_config(self) -> dict[str, Any]:
        """The resolved config (empty when the run has none)."""
        import yaml

        return (yaml.safe_load(self.config.read_text()) or {}) if self.config.is_file() else {}

    def read_metrics(self) -> list[dict[str, Any]]:
        """One dict per finished epoch (empty before the first); a line that is not JSON raises one line naming it."""
        if not self.metrics.is_file():
            return []
        rows = []
        for number, line in enumerate(self.metrics.read_text().splitlines(), 1):
            try:
                if line.strip():
                    rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{self.metrics} line {number} is not valid JSON ({err}; a line cut short by a "
                                 "crash?); resume the run (--resume) to rewrite it, or remove the line") from None
        return rows


class ExperimentFiles:
    """The files of one experiment folder ``path``: ``results.json`` (trainer) or ``knn.json`` (k-NN) and the
    k-NN evaluation's ``config.yaml``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    @property
    def results(self) -> Path:
        return self.path / "results.json"

    @property
    def knn(self) -> Path:
        return self.path / "knn.json"

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"


# what ``repsim table`` reads
RESULT_FILES = (ExperimentFiles(".").results.name, ExperimentFiles(".").knn.name)


def run_dir(exp_dir: str | Path, lr: float, seed: int) -> Path:
    """The folder of the run at ``lr`` and ``seed`` inside an experiment folder (symbolic links resolved: a link
    that leads out of the experiment folder is refused)."""
    return inside(Path(exp_dir) / f"lr{lr:g}" / f"seed{seed}", exp_dir)


def check_run_paths(run: str | Path) -> None:
    """Refuse a run folder where any file of the run resolves outside it (a planted symbolic link)."""
    for path in RunFiles(run).all_paths():
        inside(path, run)


def experiment_of(run: str | Path) -> Path | None:
    """The experiment folder of a run laid out as ``<experiment>/lr<lr>/seed<k>`` (``run_dir``), else None."""
    run = Path(run)
    return run.parent.parent if run.name.startswith("seed") and run.parent.name.startswith("lr") else None


def find_runs(exp_dir: str | Path, lr: float | None = None) -> list[Path]:
    """The finished runs (those with ``summary.json``) under ``exp_dir``, at ``lr`` when given, ordered by
    (lr, seed)."""
    found = []
    for path in Path(exp_dir).rglob(RunFiles(".").summary.name):
        s = read_json(path)
        if lr is None or math.isclose(s["lr"], lr, rel_tol=1e-9):
            found.append((s["lr"], s["seed"], path.parent))
    return [p for *_, p in sorted(found)]


def is_run(path: str | Path) -> bool:
    """Whether ``path`` is a trainer run folder (it has the files ``load_run`` needs)."""
    files = RunFiles(Path(path))
    return all(f.is_file() for f in (files.model, files.backbone("init"), files.backbone("best")))


@dataclass
class RunInputs:
    """What a run's backbone reads, from the run's files alone (no model is built): its input size and channels, the
    normalisation it trained with, and its split (``split.json``: the sample ids of train/val/test)."""

    run_dir: str
    img_size: int
    in_chans: int
    input_mean: tuple[float, ...]
    input_std: tuple[float, ...]
    normalisation_source: str
    heldout: dict[str, Any] | None


def check_run(run: str | Path) -> Path:
    """``run`` as a Path when it is a finished trainer run; else a one-line error saying what it is instead."""
    run = Path(run)
    if not run.exists():
        raise FileNotFoundError(f"no run folder {run}")
    if (run / COLLAPSED).is_file():
        reason = read_json(run / COLLAPSED).get("reason", "see its metrics.jsonl")
        raise ValueError(f"{run} is a collapsed pretraining run ({reason}); it is not usable as a start")
    if not is_run(run):
        raise FileNotFoundError(f"{run} is not a trainer run folder (needs model.json, backbone_init.pt and "
                                "backbone_best.pt)")
    if not RunFiles(run).finished():
        raise ValueError(f"{run} has not finished (no summary.json): its best weights may still change; finish it "
                         "with `repsim train ... --resume` first")
    return run


def run_inputs(run: str | Path) -> RunInputs:
    """The inputs of a finished run's backbone (``RunInputs``). The normalisation comes from ``model.json`` (runs
    since repsim 0.4), else the config's fixed ``data.mean``/``data.std``; an older run that used its dataset's
    statistics without recording them gets ImageNet's, with a warning."""
    from repsim.inputs import IMAGENET_MEAN, IMAGENET_STD

    run = check_run(run)
    files = RunFiles(run)
    record = files.read_model()
    data = files.read_config().get("data", {})
    if record.get("input_mean") and record.get("input_std"):
        stats, source = (tuple(record["input_mean"]), tuple(record["input_std"])), f"the training data of run {run}"
    elif data.get("mean") and data.get("std"):
        stats, source = (tuple(data["mean"]), tuple(data["std"])), f"the training data of run {run}"
    else:
        warnings.warn(f"{run} predates recorded input normalisation and its config fixes none: its backbone is fed "
                      "ImageNet statistics, which may not be what it trained with", UserWarning, stacklevel=2)
        stats, source = (IMAGENET_MEAN, IMAGENET_STD), "ImageNet statistics (the run did not record its own)"
    return RunInputs(str(run), int(record["img_size"]), int(record["in_chans"]), *stats, source,
                     read_json(files.split) if files.split.is_file() else None)


def load_run(run: str | Path, which: Literal["init", "best"] = "best",
             part: Literal["backbone", "classifier"] = "backbone") -> nn.Module:
    """A finished run's backbone (``part="backbone"``) or whole classifier, at initialisation or at its best epoch,
    in eval mode. The architecture comes from ``model.json``; every tensor from the run's files (read
    ``weights_only``). The backbone carries the run's ``RunInputs``: ``repsim.compare`` feeds it the normalisation it
    trained with, ``repsim.data.loader(like=...)`` keeps its training images out of a CKA."""
    from repsim import models

    if which not in ("init", "best"):
        raise ValueError(f"which must be 'init' or 'best', got {which!r}")
    if part not in ("backbone", "classifier"):
        raise ValueError(f"part must be 'backbone' or 'classifier', got {part!r}")
    inputs = run_inputs(run)
    files = RunFiles(run)
    record = files.read_model()
    if part == "classifier" and record.get("kind") == "pretrain":
        raise ValueError(f"{run} is a self-supervised pretraining run: it has a backbone, no classifier")
    backbone = models.create(record["name"], checkpoint=files.backbone(which), img_size=record["img_size"],
                             in_chans=record["in_chans"], decapitate=record.get("decapitate"), **record["kwargs"])
    for key in ("input_mean", "input_std", "normalisation_source", "run_dir", "heldout"):
        setattr(backbone, key, getattr(inputs, key))
    if part == "backbone":
        return backbone.eval()
    model = models.build_classifier(backbone, record["scenario"], record["num_classes"],
                                    freeze_blocks=record.get("freeze_blocks"),
                                    classifier_kwargs=record.get("classifier") or None)
    if which == "best":
        state = load_torch(files.checkpoint("best"))["model"]
    else:
        init = files.checkpoint("init")
        if not init.is_file():
            raise FileNotFoundError(f"{init} is missing: the run predates saved initial heads, so its initial "
                                    "classifier cannot be loaded (its initial backbone can: part='backbone')")
        state = {**{f"backbone.{k}": v for k, v in backbone.state_dict().items()}, **load_torch(init)}
    load_state(model, state, files.checkpoint(which))
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
