"""A study's workspace: its settings, output folder, data root and device, and what they build: the data block of
each dataset, the backbones, each start's weights and every experiment's folder (each built here, once).

Layout under ``out``: ``pretrain/<source>/``, ``ssl/<start>/<target>/`` (one ``repsim pretrain`` run),
``finetune/<start>/<target>/<scenario>/``, ``knn/<start>/<target>/``,
``freezing/<start>/<target>/freeze_blocks<k>/``, ``decapitation/<start>/<target>/<scenario>/decapitate<k>/``,
``sizes/<model>/<target>/<scenario|knn>/`` (trainer experiment folders: ``repsim table`` / ``repsim report`` read
them; ``Place.parts`` names them), ``cka/<target>/*.nc``, ``data/`` (the built-in synthetic tasks as image folders),
the figures ``fig*.png``, ``tables.md`` and ``study.json`` (settings, timings, every number in the tables and
figures).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from repsim.models import Backbone, create
from repsim.study.results import Comparison, Place
from repsim.study.settings import DATASETS, SYNTHETIC, Settings, Start
from repsim.train.runs import RunFiles, run_dir


def materialise_synthetic(name: str, root: Path, img_size: int, n: int) -> Path:
    """Write ``n`` images of the built-in synthetic task ``name`` as an image folder
    ``root/<name>-<n>px<img_size>/<class>/<i>.png`` (once), for the trainer's ``image_folder`` reader."""
    from repsim.data.synthetic import write_image_folder

    spec = SYNTHETIC[name]
    return write_image_folder(root / f"{name}-{n}px{img_size}", n, img_size=img_size, num_classes=spec["num_classes"],
                              seed=spec["seed"])


class Workspace:
    """The study's settings, output folder, data root and device, with what they build. ``depth`` (the backbone's
    blocks) and ``norm`` (the backbone's own input normalisation when ``settings.normalise == "model"``) come from
    one probe of the backbone."""

    def __init__(self, settings: Settings, out: str | Path, *, data_root: str | Path | None = None,
                 device: str = "auto") -> None:
        self.settings, self.out = settings, Path(out).resolve()
        self.data_root = None if data_root is None else str(Path(data_root).resolve())
        self.device = device
        self._blocks: dict[str, dict[str, Any]] = {}
        probe = self.backbone()
        self.depth = probe.num_blocks
        self.norm = (list(probe.input_mean), list(probe.input_std)) if settings.normalise == "model" else None

    def backbone(self, checkpoint: str | Path | None = None, model: str | None = None,
                 pretrained: bool = False) -> Backbone:
        """The study's backbone (or ``model``) at the study's input size, from ``checkpoint`` or random init."""
        kwargs = self.settings.model_kwargs if model is None else {}
        return create(model or self.settings.model, pretrained=pretrained, checkpoint=checkpoint,
                      img_size=self.settings.img_size, in_chans=3, **kwargs)

    def model_facts(self) -> dict[str, Any]:
        """What the tables and figures say of the models, measured once here (outputs import no model code):
        ``params`` (backbone parameters of the study's model and of each size variant), ``after_blocks`` (the
        modules after the last block, which still train when every block is frozen) and ``tokens`` (the token grid
        of the last block at the study's input size and how many tokens the stacked classifier sees after its
        ``max_grid`` pooling)."""
        import math

        import torch

        probe = self.backbone()
        params = {name: sum(p.numel() for p in (probe if name == self.settings.model else
                                                 self.backbone(model=name)).parameters())
                  for name in (self.settings.model, *self.settings.sizes)}
        after = list(dict.fromkeys(n.removeprefix("model.").rsplit(".", 1)[0] for n in probe.parameter_groups()[2]))
        with torch.no_grad():
            n = int(probe.eval().forward_tokens(torch.zeros(1, 3, self.settings.img_size, self.settings.img_size)
                                                ).shape[1])
        grid, max_grid = math.isqrt(n), self.settings.classifier.get("max_grid")
        side = min(grid, max_grid) if max_grid else grid
        tokens = {"img_size": self.settings.img_size, "backbone_tokens": n, "grid": grid, "max_grid": max_grid,
                  "side": side, "tokens": side * side}
        return {"params": params, "after_blocks": after, "tokens": tokens if grid * grid == n else None}

    def data_block(self, name: str) -> dict[str, Any]:
        """The trainer ``data`` block of dataset ``name``: 3 channels, the study's size and normalisation (a
        synthetic task is written as an image folder under ``out/data`` the first time)."""
        if name not in self._blocks:
            s = self.settings
            if name in SYNTHETIC:
                folder = materialise_synthetic(name, self.out / "data", s.img_size, s.synthetic_samples)
                block: dict[str, Any] = {"dataset": "image_folder", "root": str(folder)}
            else:
                block = dict(DATASETS[name])
            if self.norm is not None:
                block.update(mean=self.norm[0], std=self.norm[1])
            self._blocks[name] = {**block, "img_size": s.img_size, "channels": 3}
        return dict(self._blocks[name])

    def folder(self, place: Place) -> Path:
        """The experiment folder of ``place``."""
        return self.out.joinpath(*place.parts())

    def start_weights(self, start: Start, target: str) -> dict[str, Any]:
        """The trainer ``model`` fields that give ``start``'s weights on ``target`` (a source start: its
        pretraining's best; an ssl start: the teacher backbone of its pretraining on ``target``)."""
        if start.kind == "ssl":
            return {"pretrained": False, "checkpoint": str(RunFiles(self.ssl_folder(start, target)).backbone("best"))}
        if start.kind == "source":
            pretrain = self.folder(Place("pretrain", start.source or ""))
            run = RunFiles(run_dir(pretrain, float(self.settings.pretrain["lr"]), 0))
            return {"pretrained": False, "checkpoint": str(run.backbone("best"))}
        if start.kind == "checkpoint":
            return {"pretrained": False, "checkpoint": str(Path(start.checkpoint or "").resolve())}
        return {"pretrained": start.kind == "pretrained", "checkpoint": None}

    def ssl_folder(self, start: Start, target: str) -> Path:
        """The run folder of ``start``'s self-supervised pretraining on ``target``'s train split."""
        return self.folder(Place("ssl", start.name, target))

    def cka_file(self, target: str, comparison: Comparison) -> Path:
        """The netCDF file of one CKA matrix of ``target``."""
        return self.out / "cka" / target / f"{comparison.file_stem()}.nc"
