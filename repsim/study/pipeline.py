"""The study as one plan of trainer experiments (``Study.plan``), run by the scheduler, then CKA and outputs.

Layout under ``out``: ``pretrain/<source>/``, ``finetune/<start>/<target>/<scenario>/``, ``knn/<start>/<target>/``,
``freezing/<start>/<target>/freeze_blocks<k>/``, ``decapitation/<start>/<target>/<scenario>/decapitate<k>/``,
``sizes/<model>/<target>/<scenario|knn>/`` (trainer experiment folders: ``repsim table`` / ``repsim report`` read
them), ``cka/<target>/*.nc``, the figures ``fig*.png``, ``tables.md`` and ``study.json`` (settings, timings, every
number in the tables and figures).
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from repsim.files import write_text
from repsim.models import Backbone, create
from repsim.progress import tqdm
from repsim.study.scheduler import Experiment, Pool, Scheduler
from repsim.study.settings import DATASETS, SYNTHETIC, Settings, Start
from repsim.train.config import expand
from repsim.train.runs import run_dir
from repsim.types import STACKED

# training-set sizes, only to submit the longest experiments first
_SIZE_HINT = {"pneumoniamnist": 4708, "retinamnist": 1080, "breastmnist": 546}


def materialise_synthetic(name: str, root: Path, img_size: int, n: int) -> Path:
    """Write ``n`` images of the built-in synthetic task ``name`` as an image folder
    ``root/<name>-<n>px<img_size>/<class>/<i>.png`` (once), for the trainer's ``image_folder`` reader."""
    from PIL import Image

    from repsim.data.synthetic import SyntheticPatterns

    folder = root / f"{name}-{n}px{img_size}"
    if (folder / ".complete").exists():
        return folder
    spec = SYNTHETIC[name]
    data = SyntheticPatterns(n, img_size=img_size, num_classes=spec["num_classes"], seed=spec["seed"])
    for i in tqdm(range(len(data)), desc=f"writing {name}", leave=False):
        x, y = data[i]
        pixels = ((x.numpy() * 0.25 + 0.5).clip(0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0)
        (folder / data.classes[y]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / data.classes[y] / f"{i:05d}.png")
    (folder / ".complete").write_text("")
    return folder


def resolved_config(data: Mapping[str, Any], model: Mapping[str, Any], train: Mapping[str, Any],
                    kind: str = "train", knn: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One trainer config with the defaults filled in and validated (``repsim.train.config.expand``)."""
    spec = {"name": "study", "kind": kind, "data": dict(data), "model": dict(model), "train": dict(train)}
    if knn:
        spec["knn"] = dict(knn)
    ((_, cfg),) = expand(spec)
    return cfg


def point_k(point: str) -> int:
    """``k`` of a curve point name (``freeze_blocks3`` -> 3)."""
    return int("".join(c for c in point if c.isdigit()))


def first_seeds(res: Mapping[str, Any], n: int) -> dict[str, Any]:
    """``res`` with its test statistics recomputed over its first ``n`` seeds (curve points reusing a full run)."""
    out = copy.deepcopy(dict(res))
    for stat in out["test"].values():
        values = stat["values"][:n]
        stat.update(values=values, mean=float(np.mean(values)), std=float(np.std(values, ddof=1)) if n > 1 else 0.0)
    out["seeds"] = out.get("seeds", [0])[:n]
    return out


class Study:
    """One study in ``out``: ``run()`` trains every experiment, computes the CKA, writes tables, figures and
    ``study.json``, and returns the summary."""

    def __init__(self, settings: Settings, out: str | Path, *, data_root: str | Path | None = None,
                 jobs: int = 1, threads: int | None = None, device: str = "auto") -> None:
        settings.check()
        if jobs < 1:
            raise ValueError(f"jobs must be >= 1 (parallel training processes), got {jobs}")
        self.settings, self.out = settings, Path(out).resolve()
        self.data_root = None if data_root is None else str(Path(data_root).resolve())
        self.jobs, self.device = jobs, device
        self.threads = threads or max(1, (os.cpu_count() or 1) // jobs)
        self.timings: dict[str, float] = {}
        self.cka_results: dict[str, dict[str, Any]] = {}
        probe = self.backbone()
        self.depth = probe.num_blocks
        self.norm = (list(probe.input_mean), list(probe.input_std)) if settings.normalise == "model" else None

    # ----- building blocks of the trainer configs
    def backbone(self, checkpoint: str | Path | None = None, model: str | None = None,
                 pretrained: bool = False) -> Backbone:
        """The study's backbone (or ``model``) at the study's input size, from ``checkpoint`` or random init."""
        kwargs = self.settings.model_kwargs if model is None else {}
        return create(model or self.settings.model, pretrained=pretrained, checkpoint=checkpoint,
                      img_size=self.settings.img_size, in_chans=3, **kwargs)

    def data_block(self, name: str) -> dict[str, Any]:
        """The trainer ``data`` block of dataset ``name``: 3 channels, the study's size and normalisation."""
        if name in SYNTHETIC:
            folder = materialise_synthetic(name, self.out / "data", self.settings.img_size,
                                           self.settings.synthetic_samples)
            block: dict[str, Any] = {"dataset": "image_folder", "root": str(folder)}
        else:
            block = dict(DATASETS[name])
        if self.norm is not None:
            block.update(mean=self.norm[0], std=self.norm[1])
        return {**block, "img_size": self.settings.img_size, "channels": 3}

    def pretrain_folder(self, source: str) -> Path:
        return self.out / "pretrain" / source

    def start_weights(self, start: Start) -> dict[str, Any]:
        """The trainer ``model`` fields that give ``start``'s weights."""
        if start.kind == "source":
            lr = float(self.settings.pretrain["lr"])
            return {"pretrained": False,
                    "checkpoint": str(run_dir(self.pretrain_folder(start.source or ""), lr, 0) / "backbone_best.pt")}
        if start.kind == "checkpoint":
            return {"pretrained": False, "checkpoint": str(Path(start.checkpoint or "").resolve())}
        return {"pretrained": start.kind == "pretrained", "checkpoint": None}

    def model_block(self, scenario: str, weights: Mapping[str, Any], model: str | None = None,
                    **extra: Any) -> dict[str, Any]:
        return {"name": model or self.settings.model, "kwargs": dict(self.settings.model_kwargs) if model is None
                else {}, **weights, "scenario": scenario,
                "classifier": dict(self.settings.classifier) if scenario in STACKED else {}, **extra}

    def train_block(self, target: str, scenario: str, **updates: Any) -> dict[str, Any]:
        s = self.settings
        frozen = s.frozen_train if scenario.startswith("frozen-") else {}
        return {**s.train, **s.target_train.get(target, {}), **frozen, "device": self.device, **updates}

    def _experiment(self, key: str, folder: Path, target: str, scenario: str, weights: Mapping[str, Any], *,
                    model: str | None = None, model_extra: Mapping[str, Any] | None = None,
                    train: Mapping[str, Any] | None = None, **kw: Any) -> Experiment:
        tb = self.train_block(target, scenario, **(train or {}))
        cfg = resolved_config(self.data_block(target), self.model_block(scenario, weights, model,
                                                                          **(model_extra or {})), tb)
        cached = scenario.startswith("frozen-") and cfg["train"]["cache_frozen"]
        runs = len(cfg["train"]["lr_grid"] or [0]) + int(cfg["train"]["seeds"])
        cost = _SIZE_HINT.get(target, 1000) * cfg["train"]["epochs"] * runs * (0.02 if cached else 1.0)
        return Experiment(key, cfg, folder, cost=cost, **kw)

    def _knn(self, key: str, folder: Path, target: str, weights: Mapping[str, Any], model: str | None = None,
             after: tuple[str, ...] = ()) -> Experiment:
        cfg = resolved_config(self.data_block(target), self.model_block("frozen-linear", weights, model),
                              self.train_block(target, "frozen-linear"), kind="knn", knn=self.settings.knn)
        return Experiment(key, cfg, folder, kind="knn", after=after, cost=_SIZE_HINT.get(target, 1000) * 0.1)

    # ----- the plan
    def plan(self) -> list[Experiment]:
        """Every trainer experiment of the study, with what each waits for."""
        s, out, exps = self.settings, self.out, []
        for source in dict.fromkeys(st.source for st in s.starts if st.kind == "source"):
            assert source is not None
            cfg = resolved_config(self.data_block(source), self.model_block("unfrozen-linear", {
                "pretrained": False, "checkpoint": None}), {**s.pretrain, "device": self.device, "seeds": 1,
                                                           "lr_grid": None})
            exps.append(Experiment(f"pretrain/{source}", cfg, self.pretrain_folder(source), cost=float("inf")))
        needs = {st.name: ((f"pretrain/{st.source}",) if st.kind == "source" else ()) for st in s.starts}
        for st, t, sc in s.experiments():
            exps.append(self._experiment(f"finetune/{st.name}/{t}/{sc}", out / "finetune" / st.name / t / sc, t, sc,
                                         self.start_weights(st), after=needs[st.name]))
        for st in s.starts:
            for t in st.targets or s.targets:
                exps.append(self._knn(f"knn/{st.name}/{t}", out / "knn" / st.name / t, t, self.start_weights(st),
                                      after=needs[st.name]))
        pretrained = {"pretrained": True, "checkpoint": None}
        for m in s.sizes:
            for t in s.targets:
                exps.append(self._knn(f"sizes/{m}/{t}/knn", out / "sizes" / m / t / "knn", t, pretrained, m))
                exps += [self._experiment(f"sizes/{m}/{t}/{sc}", out / "sizes" / m / t / sc, t, sc, pretrained,
                                          model=m) for sc in s.size_scenarios]
        curve = {"seeds": s.curve_seeds, "lr_grid": None}
        freeze = range(self.depth + 1) if s.freeze_blocks is None else s.freeze_blocks
        for name in s.curve_starts("freezing") if s.freeze_blocks != [] else ():
            st = s.start(name)
            for t in s.targets:
                exps += [self._experiment(
                    f"freezing/{name}/{t}/freeze_blocks{k}", out / "freezing" / name / t / f"freeze_blocks{k}", t,
                    "unfrozen-linear", self.start_weights(st), model_extra={"freeze_blocks": k}, train=curve,
                    lr_from=f"finetune/{name}/{t}/unfrozen-linear", after=needs[name]) for k in freeze if k != 0]
        decap = range(1, self.depth + 1) if s.decapitate is None else s.decapitate
        for name in s.curve_starts("decapitation") if s.decapitate != [] else ():
            st = s.start(name)
            for t in s.targets:
                exps += [self._experiment(
                    f"decapitation/{name}/{t}/{sc}/decapitate{k}",
                    out / "decapitation" / name / t / sc / f"decapitate{k}", t, sc, self.start_weights(st),
                    model_extra={"decapitate": k}, train=curve, lr_from=f"finetune/{name}/{t}/{sc}",
                    after=needs[name]) for sc in s.decapitate_scenarios for k in decap if k != self.depth]
        return exps

    # ----- running
    def run(self) -> dict[str, Any]:
        """Run (or resume) every stage; write figures, ``tables.md`` and ``study.json``; return the summary."""
        from repsim.study.outputs import write_outputs
        from repsim.study.similarity import study_cka

        self.out.mkdir(parents=True, exist_ok=True)
        settings = json.loads(json.dumps(asdict(self.settings)))
        previous = self.out / "settings.json"
        if previous.exists():
            # a setting added to repsim after the study was written is compatible when it holds its default
            old = {**json.loads(json.dumps(asdict(Settings()))), **json.loads(previous.read_text())}
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            if diff:
                raise ValueError(f"{self.out} holds a study with other settings ({', '.join(diff)}); use another out")
        write_text(previous, json.dumps(settings, indent=2))
        saved_threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        pool = Pool(self.jobs, self.threads)
        try:
            results = self._timed("train", Scheduler(pool, self.data_root).run, self.plan(), "study runs")
            pool.close()
            self.cka_results = self._timed("cka", study_cka, self, results)
            return self._timed("outputs", write_outputs, self, results, self.cka_results)
        finally:
            pool.close()
            torch.set_num_threads(saved_threads)

    def _timed(self, stage: str, fn: Callable[..., Any], *args: Any) -> Any:
        t0 = time.perf_counter()
        value = fn(*args)
        self.timings[stage] = round(time.perf_counter() - t0, 1)
        return value
