"""The transfer study: the paper's analyses end to end, on any backbone and any datasets the trainer reads.

Offline (the default), a small timm ViT is *pretrained* on one medical task (PneumoniaMNIST) and that checkpoint
plays the foundation model: it is fine-tuned on the target tasks (RetinaMNIST, scored by quadratic κ; BreastMNIST,
by AUC) in the four scenarios (frozen/unfrozen × linear head/stacked classifier) with the paper's LR search on the
validation split and several seeds, beside a from-scratch baseline of the same architecture. With ``pretrained`` or
``checkpoint`` the same study starts from real foundation weights instead (the paper's study, on a GPU).

Stages, each resumable (finished trainer runs and written CKA files are reused when the study is run again):

1. ``pretrain``: the source task, from scratch (skipped when the start is ``pretrained`` or a ``checkpoint``).
2. ``finetune``: every target × scenario, plus ``scratch`` (unfrozen-linear from random init): LR search on seed 0,
   then ``seeds`` repeats at the chosen LR (``repsim.train.run_experiment``) -> Tables 1 and 2.
3. ``knn``: k-NN of the starting and of randomly initialised frozen features (Fig 2).
4. ``curves``: progressive freezing ``k = 0..depth`` with a linear head (Fig 4) and decapitation ``k = 1..depth``
   with the stacked classifier (Fig 5), at the LR chosen for the matching full model. The end points equal a
   fine-tuning run of stage 2 (freezing 0 blocks; keeping every block) and reuse it.
5. ``cka``: on each target's test split, the backbone's blocks before vs after fine-tuning with bootstrap CIs over
   batches (Fig 7; from-scratch init vs trained beside it), the stacked classifier's blocks before vs after
   (Fig A.1), and last-block CKA across the starting, random, scratch-trained and fine-tuned backbones (Fig 8).

Layout under ``out``: ``pretrain/``, ``finetune/<target>/<scenario|scratch>/``, ``knn/<target>/<start|random>/``,
``freezing/<target>/freeze_blocks<k>/``, ``decapitation/<target>/<scenario>/decapitate<k>/`` (trainer experiment
folders, so ``repsim table`` and ``repsim report`` read them), ``cka/<target>/*.nc``, the figures ``fig*.png``,
``tables.md`` and ``study.json`` (settings, stage timings, every number in the tables and figures).
"""

from __future__ import annotations

import copy
import json
import math
import os
import textwrap
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
import yaml
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from repsim.files import load_netcdf, save_netcdf, save_png, write_text

FIG_DPI = 110  # the study's figures are small multi-panel PNGs

# Data blocks of the datasets a study can use by name (roots are relative to the data root).
DATASETS: dict[str, dict[str, Any]] = {
    "pneumoniamnist": {"dataset": "medmnist", "root": "medmnist", "flag": "pneumoniamnist"},
    "retinamnist": {"dataset": "medmnist", "root": "medmnist", "flag": "retinamnist"},
    "breastmnist": {"dataset": "medmnist", "root": "medmnist", "flag": "breastmnist"},
    "aptos2019": {"dataset": "aptos2019", "root": "APTOS2019"},
    "cbis_ddsm": {"dataset": "cbis_ddsm", "root": "CBIS-DDSM"},
    "isic2019": {"dataset": "isic2019", "root": "ISIC2019"},
    "chexpert": {"dataset": "chexpert", "root": "CheXpert"},
}
# Built-in synthetic tasks (repsim.data.synthetic), written once as image folders under <out>/data (random
# 80/10/10 split): the source has six texture classes, the target four of them drawn with another seed.
SYNTHETIC: dict[str, dict[str, int]] = {
    "synthetic-source": {"num_classes": 6, "seed": 1},
    "synthetic-target": {"num_classes": 4, "seed": 2},
}
PAPER_LR_GRID = [1.0e-5, 5.0e-5, 2.0e-4, 1.0e-3]  # 4 values in [1e-5, 1e-3], as the packaged table specs
STACKED = ("frozen-stacked", "unfrozen-stacked")


@dataclass
class Settings:
    """What a study runs. ``train``/``pretrain`` are trainer ``train`` blocks; ``classifier`` configures the
    stacked classifier (``repsim.surgery.StackedClassifier`` kwargs); ``freeze_blocks``/``decapitate`` None mean
    ``0..depth`` / ``1..depth`` and an empty list skips that curve."""

    model: str = "vit_tiny_patch16_224"
    model_kwargs: dict[str, Any] = field(
        default_factory=lambda: {"patch_size": 4, "depth": 6, "embed_dim": 48, "num_heads": 2})
    img_size: int = 28
    pretrained: bool = False  # start from the library's pretrained weights (skips pretraining)
    checkpoint: str | None = None  # start from a local Backbone checkpoint (skips pretraining)
    source: str | None = "pneumoniamnist"  # pretraining task when neither of the above is given
    targets: tuple[str, ...] = ("retinamnist", "breastmnist")
    scenarios: tuple[str, ...] = ("frozen-linear", "frozen-stacked", "unfrozen-linear", "unfrozen-stacked")
    scratch: bool = True
    classifier: dict[str, Any] = field(
        default_factory=lambda: {"model": "deit_tiny_patch16_224", "depth": 2, "embed_dim": 48, "num_heads": 2})
    pretrain: dict[str, Any] = field(default_factory=lambda: {
        "epochs": 6, "batch_size": 64, "lr": 1.0e-3, "warmup_epochs": 1, "patience": 2, "max_plateaus": 1,
        "weight_decay": 0.05, "num_workers": 0})
    train: dict[str, Any] = field(default_factory=lambda: {
        "epochs": 6, "batch_size": 64, "lr_grid": PAPER_LR_GRID, "seeds": 3, "warmup_epochs": 1, "patience": 2,
        "max_plateaus": 2, "num_workers": 0})
    freeze_blocks: list[int] | None = None
    decapitate: list[int] | None = None
    decapitate_scenarios: tuple[str, ...] = ("frozen-stacked",)
    curve_seeds: int = 1
    knn: dict[str, Any] = field(default_factory=lambda: {"k": 200, "temperature": 0.1, "batch_size": 256})
    cka_batch_size: int = 32
    n_boot: int = 1000
    synthetic_samples: int = 2000  # images per built-in synthetic task

    def check(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent setting."""
        from repsim.models import SCENARIOS

        starts = [self.pretrained, self.checkpoint is not None]
        if sum(starts) > 1:
            raise ValueError("give at most one of pretrained and checkpoint")
        if not any(starts) and self.source is None:
            raise ValueError("the study needs a start: a source task to pretrain on, pretrained=True or a checkpoint")
        for name in ([self.source] if self.source and not any(starts) else []) + list(self.targets):
            if name not in DATASETS and name not in SYNTHETIC:
                raise ValueError(f"unknown dataset {name!r}; known: {', '.join([*DATASETS, *SYNTHETIC])}")
        if not self.targets:
            raise ValueError("the study needs at least one target dataset")
        bad = [s for s in (*self.scenarios, *self.decapitate_scenarios) if s not in SCENARIOS]
        if bad:
            raise ValueError(f"unknown scenarios {bad}; expected {', '.join(SCENARIOS)}")
        if self.freeze_blocks != [] and "unfrozen-linear" not in self.scenarios:
            raise ValueError("the freezing curve takes its LR from the unfrozen-linear runs: add that scenario")
        missing = [s for s in self.decapitate_scenarios if s not in self.scenarios]
        if self.decapitate != [] and (missing or not self.decapitate_scenarios):
            raise ValueError(f"the decapitation curve takes its LR from the full {self.decapitate_scenarios} runs: "
                             "add them to scenarios (or set decapitate to [])")
        if not 1 <= self.curve_seeds <= int(self.train.get("seeds", 1)):
            raise ValueError(f"curve_seeds must be in 1..train.seeds, got {self.curve_seeds}")
        if self.cka_batch_size < 4:
            raise ValueError(f"cka_batch_size must be >= 4 (unbiased HSIC), got {self.cka_batch_size}")


PRESETS: dict[str, Settings] = {
    # the offline study on 2 CPU cores (about half an hour)
    "full": Settings(),
    # `repsim demo`: one target, no LR search, one seed, short curves (a few minutes on 2 cores)
    "demo": Settings(
        targets=("retinamnist",), scenarios=("frozen-linear", "unfrozen-linear", "unfrozen-stacked"),
        pretrain={**Settings().pretrain, "epochs": 3},
        train={**Settings().train, "epochs": 4, "lr_grid": None, "lr": 5.0e-4, "seeds": 1},
        freeze_blocks=[0, 3, 6], decapitate=[], n_boot=200),
    # the paper's study on a GPU: real foundation weights (give model=...), the four paper datasets, the DeiT-B
    # classifier with ImageNet weights, 100 epochs, 5 seeds, both stacked scenarios decapitated
    "paper": Settings(
        model="dinov2_vitb14", model_kwargs={}, img_size=224, pretrained=True, source=None,
        targets=("aptos2019", "cbis_ddsm", "isic2019", "chexpert"),
        classifier={"model": "deit_base_patch16_224", "pretrained": True},
        train={"epochs": 100, "batch_size": 64, "lr_grid": PAPER_LR_GRID, "seeds": 5, "num_workers": 8},
        decapitate_scenarios=STACKED, curve_seeds=5, cka_batch_size=64),
    # a smoke test of every stage (the tests run it on a few dozen images per split)
    "tiny": Settings(
        model_kwargs={"patch_size": 7, "depth": 2, "embed_dim": 32, "num_heads": 2},
        classifier={"model": "deit_tiny_patch16_224", "depth": 1, "embed_dim": 32, "num_heads": 2},
        pretrain={**Settings().pretrain, "epochs": 1, "batch_size": 16},
        train={**Settings().train, "epochs": 1, "batch_size": 16, "lr_grid": [1.0e-3, 1.0e-4], "seeds": 2},
        knn={"k": 10, "temperature": 0.1, "batch_size": 64}, cka_batch_size=8, n_boot=20),
}


# ---------------------------------------------------------------------------------------------------- helpers
def _named(ds: xr.Dataset, a: str, b: str, **attrs: Any) -> xr.Dataset:
    """``ds`` with its axes called ``a`` and ``b`` (on the Dataset and every variable, which plots read)."""
    names = {"model_a": a, "model_b": b, **attrs}
    out = ds.assign_attrs(names)
    for v in out.data_vars:
        out[v].attrs.update(names)
    return out


def materialise_synthetic(name: str, root: Path, img_size: int, n: int) -> Path:
    """Write ``n`` images of the built-in synthetic task ``name`` as an image folder
    ``root/<name>-<n>px<img_size>/<class>/<i>.png`` (once), for the trainer's ``image_folder`` reader."""
    from PIL import Image

    from repsim.data.synthetic import SyntheticPatterns

    folder = root / f"{name}-{n}px{img_size}"
    done = folder / ".complete"
    if done.exists():
        return folder
    spec = SYNTHETIC[name]
    data = SyntheticPatterns(n, img_size=img_size, num_classes=spec["num_classes"], seed=spec["seed"])
    for i in tqdm(range(len(data)), desc=f"writing {name}", leave=False):
        x, y = data[i]
        pixels = ((x.numpy() * 0.25 + 0.5).clip(0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0)
        (folder / data.classes[y]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / data.classes[y] / f"{i:05d}.png")
    done.write_text("")
    return folder


def data_block(name: str, settings: Settings, out: Path) -> dict[str, Any]:
    """The trainer ``data`` block of dataset ``name``: 3 channels (so one backbone reads every task), study size."""
    if name in SYNTHETIC:
        folder = materialise_synthetic(name, out / "data", settings.img_size, settings.synthetic_samples)
        block = {"dataset": "image_folder", "root": str(folder)}
    else:
        block = dict(DATASETS[name])
    return {**block, "img_size": settings.img_size, "channels": 3}


def resolved_config(data: Mapping[str, Any], model: Mapping[str, Any], train: Mapping[str, Any],
                    kind: str = "train", knn: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One trainer config with the defaults filled in and validated (``repsim.train.config.expand``)."""
    from repsim.train.config import expand

    spec = {"name": "study", "kind": kind, "data": dict(data), "model": dict(model), "train": dict(train)}
    if knn:
        spec["knn"] = dict(knn)
    ((_, cfg),) = expand(spec)
    return cfg


def run_dirs(exp_dir: Path, lr: float | None = None) -> list[Path]:
    """The trainer run folders of an experiment (at ``lr`` when given), ordered by seed."""
    found = []
    for path in exp_dir.rglob("summary.json"):
        s = json.loads(path.read_text())
        if lr is None or math.isclose(s["lr"], lr, rel_tol=1e-9):
            found.append((s["seed"], path.parent))
    return [p for _, p in sorted(found)]


def _init_worker(threads: int) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(threads)


def _train_task(cfg: dict[str, Any], exp_dir: str, data_root: str | None) -> dict[str, Any]:
    from repsim.train import run_experiment

    return run_experiment(cfg, Path(exp_dir), data_root=data_root, resume=True, progress=False)


def _knn_task(cfg: dict[str, Any], exp_dir: str, data_root: str | None) -> dict[str, Any]:
    from repsim.train.runner import run_knn

    done = Path(exp_dir) / "knn.json"
    return json.loads(done.read_text()) if done.exists() else run_knn(cfg, Path(exp_dir), data_root=data_root)


class _Deferred:
    """A call run on first ``result()`` (the in-process stand-in for a Future)."""

    def __init__(self, fn: Callable[..., dict[str, Any]], args: tuple) -> None:
        self.fn, self.args, self.value = fn, args, None

    def result(self) -> dict[str, Any]:
        if self.value is None:
            self.value = self.fn(*self.args)
        return self.value


class _Pool:
    """Runs independent trainer tasks in ``jobs`` worker processes of ``threads`` torch threads each, or in this
    process when ``jobs == 1``. Tiny models gain little from intra-op threads and lose badly to them on a busy
    machine (one Retina epoch: 6 s on 1 thread, 77 s on 2 while other processes ran), so processes beat threads."""

    def __init__(self, jobs: int, threads: int) -> None:
        if jobs < 1 or threads < 1:
            raise ValueError(f"jobs and threads must be >= 1, got {jobs} and {threads}")
        self.executor = None if jobs == 1 else ProcessPoolExecutor(
            jobs, mp_context=get_context("spawn"), initializer=_init_worker, initargs=(threads,))

    def submit(self, fn: Callable[..., dict[str, Any]], *args: Any) -> Any:
        """Start ``fn(*args)`` in a worker; with ``jobs == 1`` it runs when its ``result()`` is first asked for."""
        return _Deferred(fn, args) if self.executor is None else self.executor.submit(fn, *args)

    @staticmethod
    def gather(futures: Mapping[str, Any], desc: str) -> dict[str, dict]:
        """``{key: result}`` of submitted tasks, in order, with one progress bar."""
        out: dict[str, dict] = {}
        with tqdm(total=len(futures), desc=desc, unit="exp") as bar:
            for key, fut in futures.items():
                bar.set_postfix_str(key)
                out[key] = fut.result()
                bar.update()
        return out

    def map(self, fn: Callable[..., dict[str, Any]], tasks: Mapping[str, tuple], desc: str) -> dict[str, dict]:
        """``{key: fn(*args)}`` over ``tasks = {key: args}``."""
        return self.gather({key: self.submit(fn, *args) for key, args in tasks.items()}, desc)

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown()
            self.executor = None


# ---------------------------------------------------------------------------------------------------- the study
class Study:
    """One study in ``out``: ``run()`` executes every stage and writes the tables, figures and ``study.json``."""

    def __init__(self, settings: Settings, out: str | Path, *, data_root: str | Path | None = None,
                 jobs: int = 1, threads: int | None = None, device: str = "auto") -> None:
        settings.check()
        self.s, self.out = settings, Path(out).resolve()
        self.data_root = None if data_root is None else str(Path(data_root).resolve())
        self.jobs, self.device = jobs, device
        self.threads = threads or max(1, (os.cpu_count() or 1) // jobs)
        self.timings: dict[str, float] = {}
        self.depth = self._backbone().num_blocks

    # ----- configs
    def _backbone(self, checkpoint: str | None = None) -> Any:
        from repsim.models import create

        return create(self.s.model, pretrained=False, checkpoint=checkpoint, img_size=self.s.img_size, in_chans=3,
                      **self.s.model_kwargs)

    def _model(self, scenario: str, start: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
        return {"name": self.s.model, "kwargs": dict(self.s.model_kwargs), **start, "scenario": scenario,
                "classifier": dict(self.s.classifier) if scenario in STACKED else {}, **extra}

    def _train(self, **updates: Any) -> dict[str, Any]:
        return {**self.s.train, "device": self.device, **updates}

    def _label(self) -> str:
        return f"{self.s.model} ← " + ("pretrained" if self.s.pretrained else
                                       Path(self.s.checkpoint).name if self.s.checkpoint else self.s.source)

    # ----- stages
    def submit_pretraining(self, pool: _Pool) -> Any:
        """Start pretraining on the source task (None when the start is given: ``pretrained`` or ``checkpoint``)."""
        if self.s.pretrained or self.s.checkpoint is not None:
            return None
        cfg = resolved_config(data_block(self.s.source, self.s, self.out),
                              self._model("unfrozen-linear", {"pretrained": False, "checkpoint": None}),
                              {**self.s.pretrain, "device": self.device, "seeds": 1, "lr_grid": None})
        return pool.submit(_train_task, cfg, str(self.out / "pretrain" / self.s.source), self.data_root)

    def pretrain(self, pretraining: Any) -> dict[str, Any]:
        """The starting weights (trainer ``model`` fields): the library's, a checkpoint, or pretrained here."""
        if self.s.pretrained:
            return {"pretrained": True, "checkpoint": None}
        if self.s.checkpoint is not None:
            return {"pretrained": False, "checkpoint": str(Path(self.s.checkpoint).resolve())}
        self.pretrain_results = _Pool.gather({self.s.source: pretraining}, "pretrain")[self.s.source]
        return {"pretrained": False,
                "checkpoint": str(run_dirs(self.out / "pretrain" / self.s.source)[0] / "backbone_best.pt")}

    def scratch(self, pool: _Pool) -> dict[str, Any]:
        """Submit the from-scratch baselines (they need no pretraining, so they run beside it)."""
        scratch = self._model("unfrozen-linear", {"pretrained": False, "checkpoint": None})
        return {f"{t}/scratch": pool.submit(_train_task, resolved_config(data_block(t, self.s, self.out), scratch,
                                                                         self._train()),
                                            str(self.out / "finetune" / t / "scratch"), self.data_root)
                for t in (self.s.targets if self.s.scratch else ())}

    def finetune(self, pool: _Pool, start: Mapping[str, Any], scratch: Mapping[str, Any]
                 ) -> dict[str, dict[str, dict]]:
        tasks = {}
        for t in self.s.targets:
            data = data_block(t, self.s, self.out)
            for sc in self.s.scenarios:
                tasks[f"{t}/{sc}"] = (resolved_config(data, self._model(sc, start), self._train()),
                                      str(self.out / "finetune" / t / sc), self.data_root)
        # longest first (fine-tuned backbones, then frozen ones) so parallel workers finish together
        order = sorted(tasks, key=lambda k: k.split("/")[1].startswith("frozen"))
        futures = {**{k: pool.submit(_train_task, *tasks[k]) for k in order}, **scratch}
        return self._nest(pool.gather(futures, "fine-tune"))

    def knn(self, pool: _Pool, start: Mapping[str, Any]) -> dict[str, dict[str, dict]]:
        tasks = {}
        for t in self.s.targets:
            data = data_block(t, self.s, self.out)
            for key, st in (("start", start), ("random", {"pretrained": False, "checkpoint": None})):
                cfg = resolved_config(data, self._model("frozen-linear", st), self._train(), kind="knn", knn=self.s.knn)
                tasks[f"{t}/{key}"] = (cfg, str(self.out / "knn" / t / key), self.data_root)
        return self._nest(pool.map(_knn_task, tasks, "k-NN"))

    def curves(self, pool: _Pool, start: Mapping[str, Any], ft: Mapping[str, Mapping[str, dict]]
               ) -> dict[str, dict[str, dict[str, dict]]]:
        """Progressive freezing and decapitation; the end points equal to a full model reuse its fine-tuning."""
        freeze = list(range(self.depth + 1)) if self.s.freeze_blocks is None else list(self.s.freeze_blocks)
        decap = list(range(1, self.depth + 1)) if self.s.decapitate is None else list(self.s.decapitate)
        seeds = {"seeds": self.s.curve_seeds, "lr_grid": None}
        tasks, reused = {}, {}
        for t in self.s.targets:
            data = data_block(t, self.s, self.out)
            curves = [("freezing", "unfrozen-linear", "freeze_blocks", k, 0) for k in freeze]
            curves += [("decapitation", sc, "decapitate", k, self.depth)
                       for sc in (self.s.decapitate_scenarios if decap else ()) for k in decap]
            for curve, sc, key, k, same_as_full in curves:
                name = f"{curve}/{t}/{sc}/{key}{k}"
                if k == same_as_full:
                    reused[name] = ft[t][sc]
                    continue
                cfg = resolved_config(data, self._model(sc, start, **{key: k}),
                                      self._train(lr=ft[t][sc]["lr"], **seeds))
                tasks[name] = (cfg, str(self.out / curve / t / (sc if curve == "decapitation" else "") / f"{key}{k}"),
                               self.data_root)
        done = pool.map(_train_task, tasks, "curves") if tasks else {}
        out: dict[str, dict[str, dict[str, dict]]] = {}
        for name, res in {**done, **reused}.items():
            curve, t, sc, point = name.split("/")
            out.setdefault(curve, {}).setdefault(t, {}).setdefault(sc, {})[point] = _first_seeds(
                res, self.s.curve_seeds)
        return out

    def cka(self, ft: Mapping[str, Mapping[str, dict]]) -> dict[str, dict[str, Any]]:
        """Fig 7, Fig A.1 and Fig 8 matrices for every target (netCDF under ``cka/<target>``, reused if present)."""
        from repsim.compare import compare, compare_many
        from repsim.data import prepare
        from repsim.train.utils import pick_device

        device = pick_device(self.device)
        out: dict[str, dict[str, Any]] = {}
        for t in self.s.targets:
            folder = self.out / "cka" / t
            data = prepare(data_block(t, self.s, self.out), self.data_root)
            test = data.datasets["test"]  # at least 4 batches, for the bootstrap over batches
            loader = torch.utils.data.DataLoader(test, batch_size=min(self.s.cka_batch_size, max(4, len(test) // 4)))
            runs = {sc: run_dirs(self.out / "finetune" / t / sc, ft[t][sc]["lr"])[0] for sc in ft[t]}
            kw = {"device": device, "keep_batches": True, "n_boot": self.s.n_boot, "progress": False}
            mats: dict[str, Any] = {}
            # Fig 7: backbone blocks before vs after fine-tuning with a linear head (and the scratch reference)
            for sc in ("unfrozen-linear", "scratch"):
                path = folder / f"fig7_{sc}.nc"
                if sc in runs and not path.exists():
                    before, after = (self._backbone(str(runs[sc] / f)) for f in ("backbone_init.pt", "backbone_best.pt"))
                    m = compare(before, after, loader, layers_a=before.layer_names(), **kw)
                    save_netcdf(_named(m, "before", "after", run=str(runs[sc])), path)
                if path.exists():
                    mats[f"fig7/{sc}"] = load_netcdf(path)
            # Fig A.1: the stacked classifier's blocks at initialisation vs fine-tuned
            for sc in STACKED:
                path = folder / f"figA1_{sc}.nc"
                if sc in runs and not path.exists():
                    before, after = rebuild(runs[sc], self.data_root, "init"), rebuild(runs[sc], self.data_root, "best")
                    names = [n for n, _ in before.named_modules() if n.startswith("classifier.blocks.") and n.count(".") == 2]
                    m = compare(before, after, loader, layers_a=names, **kw)
                    save_netcdf(_named(m, "before", "after", run=str(runs[sc])), path)
                if path.exists():
                    mats[f"figA1/{sc}"] = load_netcdf(path)
            # Fig 8: last block across backbones
            path = folder / "fig8_last_block.nc"
            if not path.exists():
                first = next(runs[sc] for sc in runs if sc != "scratch")
                models = {"start": self._backbone(str(first / "backbone_init.pt")), "random init": self._backbone()}
                for sc in ("scratch", "unfrozen-linear", "unfrozen-stacked"):
                    if sc in runs:
                        models["scratch-trained" if sc == "scratch" else sc] = self._backbone(
                            str(runs[sc] / "backbone_best.pt"))
                last = {k: [m.layer_names()[-1]] for k, m in models.items()}
                save_netcdf(compare_many(models, loader, layers=last, device=device, progress=False), path)
            mats["fig8"] = load_netcdf(path)
            out[t] = mats
        return out

    # ----- everything
    def run(self) -> dict[str, Any]:
        """Run (or resume) every stage; write figures, ``tables.md`` and ``study.json``; return the summary."""
        self.out.mkdir(parents=True, exist_ok=True)
        settings = json.loads(json.dumps(asdict(self.s)))
        previous = self.out / "settings.json"
        if previous.exists() and json.loads(previous.read_text()) != settings:
            old = json.loads(previous.read_text())
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise ValueError(f"{self.out} holds a study with other settings ({', '.join(diff)}); use another out")
        write_text(previous, json.dumps(settings, indent=2))
        saved_threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        pool = _Pool(self.jobs, self.threads)
        try:
            pretraining = self.submit_pretraining(pool)  # first: it is the critical path
            scratch = self.scratch(pool)  # beside it
            start = self._timed("pretrain", self.pretrain, pretraining)
            ft = self._timed("finetune", self.finetune, pool, start, scratch)
            knn = self._timed("knn", self.knn, pool, start)
            curves = self._timed("curves", self.curves, pool, start, ft)
            pool.close()
            cka = self._timed("cka", self.cka, ft)
            return self._timed("outputs", self.write_outputs, start, ft, knn, curves, cka)
        finally:
            pool.close()
            torch.set_num_threads(saved_threads)

    def _timed(self, stage: str, fn: Callable[..., Any], *args: Any) -> Any:
        t0 = time.perf_counter()
        value = fn(*args)
        self.timings[stage] = round(time.perf_counter() - t0, 1)
        return value

    @staticmethod
    def _nest(flat: Mapping[str, dict]) -> dict[str, dict[str, dict]]:
        out: dict[str, dict[str, dict]] = {}
        for key, value in flat.items():
            t, variant = key.split("/", 1)
            out.setdefault(t, {})[variant] = value
        return out

    # ----- outputs
    def write_outputs(self, start: Mapping[str, Any], ft: Mapping[str, Mapping[str, dict]],
                      knn: Mapping[str, Mapping[str, dict]], curves: Mapping[str, Any],
                      cka: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        figures = {}
        if any("fig7/unfrozen-linear" in m or "fig7/scratch" in m for m in cka.values()):
            figures["fig7"] = save_png(fig7(cka), self.out / "fig7_cka_before_after.png", dpi=FIG_DPI).name
            figures["fig7_diagonal"] = save_png(fig7_diagonal(cka), self.out / "fig7_diagonal.png", dpi=FIG_DPI).name
        if any(k.startswith("figA1/") for m in cka.values() for k in m):
            figures["figA1"] = save_png(figA1(cka), self.out / "figA1_stacked_classifier.png", dpi=FIG_DPI).name
        figures["fig8"] = save_png(fig8(cka), self.out / "fig8_last_block.png", dpi=FIG_DPI).name
        for curve, fn in (("freezing", "fig4_freezing.png"), ("decapitation", "fig5_decapitation.png")):
            if curve in curves:
                figures[curve] = save_png(curve_figure(curves[curve], ft, curve), self.out / fn, dpi=FIG_DPI).name
        tables = self.tables(ft, knn, curves)
        write_text(self.out / "tables.md", tables)
        summary = {
            "settings": asdict(self.s), "start": dict(start), "label": self._label(), "depth": self.depth,
            "timings_s": self.timings, "figures": figures,
            "pretrain": getattr(self, "pretrain_results", None),
            "finetune": ft, "knn": knn, "curves": curves,
            "cka": {t: {k: cka_summary(v) for k, v in m.items()} for t, m in cka.items()},
        }
        write_text(self.out / "study.json", json.dumps(summary, indent=2, default=float))
        return summary

    def tables(self, ft: Mapping[str, Mapping[str, dict]], knn: Mapping[str, Mapping[str, dict]],
               curves: Mapping[str, Any]) -> str:
        """Tables 1 and 2 (frozen / unfrozen, mean ± std over seeds), the LR search, k-NN and the curves."""
        from repsim.train.table import markdown_table

        label, scratch = self._label(), f"{self.s.model} (from scratch)"

        def rows(variants: Iterable[str]) -> list[dict]:
            return [{**r, "model": scratch if v == "scratch" else label} for t in ft for v, r in ft[t].items()
                    if v in variants]

        parts = [f"# Transfer study: {label}", ""]
        for title, variants in (("Table 1: frozen backbone", ("frozen-linear", "frozen-stacked")),
                                ("Table 2: fine-tuned backbone", ("unfrozen-linear", "unfrozen-stacked", "scratch"))):
            if rows(variants):
                parts += [f"## {title} (test split, mean ± std over seeds at the LR chosen on validation)", "",
                          markdown_table(rows(variants)), ""]
        parts += ["## LR search (validation metric, seed 0)", "", "| Dataset | Variant | " +
                  " | ".join(f"lr {lr:g}" for lr in self._lr_grid()) + " | chosen |", "|---|---|" + "---|" * (len(self._lr_grid()) + 1)]
        for t in ft:
            for v, r in ft[t].items():
                cells = [f"{r['lr_search'][f'{lr:g}']:.3f}" if f"{lr:g}" in r["lr_search"] else "" for lr in self._lr_grid()]
                parts.append(f"| {t} | {v} | " + " | ".join(cells) + f" | {r['lr']:g} |")
        parts += ["", "## k-NN on frozen features (Fig 2; k=%s, T=%s)" % (self.s.knn["k"], self.s.knn["temperature"]), "",
                  markdown_table([{**r, "model": label if k == "start" else f"{self.s.model} (random init)"}
                                  for t in knn for k, r in knn[t].items()]), ""]
        for curve, what in (("freezing", "blocks frozen (linear head)"), ("decapitation", "blocks kept (stacked classifier)")):
            if curve in curves:
                parts += [f"## {'Fig 4' if curve == 'freezing' else 'Fig 5'}: {curve} ({what}; test metric, "
                          f"{self.s.curve_seeds} seed(s))", "", "| Dataset | Scenario | k | metric |", "|---|---|---|---|"]
                for t, by_sc in curves[curve].items():
                    for sc, points in by_sc.items():
                        for point, r in sorted(points.items(), key=lambda kv: point_k(kv[0])):
                            st = r["test"][r["metric"]]
                            parts.append(f"| {t} | {sc} | {point} | {st['mean']:.3f} ± {st['std']:.3f} {r['metric']} |")
                parts.append("")
        return "\n".join(parts)

    def _lr_grid(self) -> list[float]:
        return list(self.s.train.get("lr_grid") or [self.s.train["lr"]])


def point_k(point: str) -> int:
    """``k`` of a curve point name (``freeze_blocks3`` -> 3)."""
    return int("".join(c for c in point if c.isdigit()))


def _first_seeds(res: Mapping[str, Any], n: int) -> dict[str, Any]:
    """``res`` with its test statistics recomputed over its first ``n`` seeds (curve points reusing a full run)."""
    res = copy.deepcopy(dict(res))
    for key, stat in res["test"].items():
        values = stat["values"][:n]
        stat.update(values=values, mean=float(np.mean(values)), std=float(np.std(values, ddof=1)) if n > 1 else 0.0)
    res["seeds"] = res.get("seeds", [0])[:n]
    return res


def rebuild(run_dir: str | Path, data_root: str | Path | None, which: str = "best") -> torch.nn.Module:
    """The whole classifier of a trainer run at its initialisation (``which="init"``) or its best checkpoint.

    The trainer saves the starting backbone but not the starting head/classifier, so ``init`` replays the trainer's
    seeded construction and checks it against ``backbone_init.pt``.
    """
    from repsim.data import prepare
    from repsim.train.utils import build_model, seed_everything

    run_dir = Path(run_dir)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    seed = int(cfg["train"]["seed"])
    seed_everything(seed)
    data = prepare(cfg["data"], data_root, seed=seed)
    model, _ = build_model(cfg, data)
    if which == "init":
        saved = torch.load(run_dir / "backbone_init.pt", map_location="cpu", weights_only=True)
        own = model.backbone.state_dict()
        if saved.keys() != own.keys() or any(not torch.equal(saved[k], own[k]) for k in saved):
            raise RuntimeError(f"{run_dir}: rebuilding the run does not reproduce backbone_init.pt, so its initial "
                               "classifier cannot be recovered either")
    elif which == "best":
        model.load_state_dict(torch.load(run_dir / "checkpoints" / "best.pt", map_location="cpu",
                                         weights_only=False)["model"])
    else:
        raise ValueError(f"which must be 'init' or 'best', got {which!r}")
    return model.eval()


# ---------------------------------------------------------------------------------------------------- numbers
def diagonal(ds: xr.Dataset) -> dict[str, list[float]]:
    """CKA(block k before, block k after) with its bootstrap CI: ``{"cka", "lower", "upper"}`` lists over k."""
    return {v: [float(x) for x in np.diagonal(ds[v].values)] for v in ("cka", "lower", "upper") if v in ds}


def cka_summary(ds: xr.Dataset) -> dict[str, Any]:
    """JSON numbers of a CKA result: the matrix, its diagonal with CIs, the mean CI width, and the early/late split."""
    out: dict[str, Any] = {"layers_a": [str(x) for x in ds["layer_a"].values],
                           "layers_b": [str(x) for x in ds["layer_b"].values],
                           "cka": np.round(ds["cka"].values, 4).tolist()}
    if "lower" in ds:
        d = diagonal(ds)
        half = len(d["cka"]) // 2
        out.update(diagonal=d, mean_ci_width=float((ds["upper"] - ds["lower"]).mean()),
                   early_mean=float(np.mean(d["cka"][:max(half, 1)])), late_mean=float(np.mean(d["cka"][half:])))
    return out


# ---------------------------------------------------------------------------------------------------- figures
def _grid(panels: Sequence[tuple[str, xr.Dataset]], title: str, annotate: bool) -> Figure:
    from repsim.plot import heatmap_grid

    small = all(ds.sizes["layer_a"] <= 12 for _, ds in panels)
    fig = heatmap_grid([ds for _, ds in panels], titles=[t for t, _ in panels], ncols=2 if len(panels) > 1 else 1,
                       annotate_ci=annotate and small and all("lower" in ds for _, ds in panels))
    width_chars = int(fig.get_figwidth() * 12)  # about 12 characters of a 10 pt title per inch
    fig.suptitle(textwrap.fill(title, width_chars), fontsize=10)
    return fig


def fig7(cka: Mapping[str, Mapping[str, xr.Dataset]]) -> Figure:
    """Layerwise CKA before vs after fine-tuning, per target: from the start (linear head) and from scratch."""
    panels = [(f"{t}: {'start → fine-tuned' if k.endswith('unfrozen-linear') else 'random init → trained'}", ds)
              for t, m in cka.items() for k, ds in m.items() if k.startswith("fig7/")]
    return _grid(panels, "Fig 7: backbone blocks before vs after fine-tuning (cells: 95% bootstrap CI width)", True)


def figA1(cka: Mapping[str, Mapping[str, xr.Dataset]]) -> Figure:
    """The stacked classifier's blocks at initialisation vs fine-tuned, frozen and unfrozen backbone."""
    panels = [(f"{t}: {k.split('/')[1]}", ds) for t, m in cka.items() for k, ds in m.items() if k.startswith("figA1/")]
    return _grid(panels, "Fig A.1: stacked classifier blocks before vs after (cells: 95% CI width)", True)


def fig8(cka: Mapping[str, Mapping[str, xr.Dataset]]) -> Figure:
    """Last-block CKA across backbones, one panel per target."""
    panels = []
    for t, m in cka.items():
        ds = m["fig8"]
        models = [str(x) for x in ds["model_a"].values]
        panels.append((t, _named(ds.assign_coords(layer_a=models, layer_b=models).drop_vars(
            ["model_a", "model_b", "module_a", "module_b"]), "backbone", "backbone")))
    return _grid(panels, "Fig 8: CKA of the last block across backbones", False)


def fig7_diagonal(cka: Mapping[str, Mapping[str, xr.Dataset]]) -> Figure:
    """CKA(block k before, block k after) against k with 95% bootstrap CIs: the Fig 7 diagonals in one plot."""
    targets = [t for t, m in cka.items() if any(k.startswith("fig7/") for k in m)]
    fig = Figure(figsize=(4.2 * len(targets), 3.2), layout="constrained")
    axes = fig.subplots(1, len(targets), squeeze=False)[0]
    for ax, t in zip(axes, targets):
        for k, ds in cka[t].items():
            if k.startswith("fig7/"):
                d = diagonal(ds)
                x = np.arange(len(d["cka"]))
                yerr = np.abs(np.array([d["cka"]]) - np.array([d["lower"], d["upper"]]))
                ax.errorbar(x, d["cka"], yerr=yerr, marker="o", capsize=3,
                            label="start → fine-tuned" if k.endswith("unfrozen-linear") else "random init → trained")
        ax.set(title=t, xlabel="block", ylabel="CKA(before, after)", ylim=(0, 1.05))
        ax.legend(fontsize=7)
    fig.suptitle("Same-block CKA before vs after fine-tuning (95% bootstrap CI over batches)", fontsize=10)
    return fig


def curve_figure(curves: Mapping[str, Mapping[str, Mapping[str, dict]]], ft: Mapping[str, Mapping[str, dict]],
                 curve: str) -> Figure:
    """Test metric against blocks frozen (Fig 4) or kept (Fig 5), per target, with the scratch baseline."""
    targets = list(curves)
    fig = Figure(figsize=(4.2 * len(targets), 3.2), layout="constrained")
    axes = fig.subplots(1, len(targets), squeeze=False)[0]
    for ax, t in zip(axes, targets):
        metric = ""
        for sc, points in curves[t].items():
            ks = sorted(points, key=point_k)
            x = [point_k(p) for p in ks]
            metric = points[ks[0]]["metric"]
            ax.errorbar(x, [points[p]["test"][metric]["mean"] for p in ks],
                        yerr=[points[p]["test"][metric]["std"] for p in ks], marker="o", capsize=3, label=sc)
        if "scratch" in ft.get(t, {}):
            st = ft[t]["scratch"]["test"][metric]
            ax.axhline(st["mean"], color="grey", linestyle="--", label="from scratch")
        ax.set(title=t, xlabel="blocks frozen" if curve == "freezing" else "blocks kept", ylabel=f"test {metric}")
        ax.legend(fontsize=7)
    fig.suptitle("Fig 4: progressive freezing (linear head)" if curve == "freezing"
                 else "Fig 5: decapitation (stacked classifier)", fontsize=10)
    return fig


def run_study(settings: Settings | str, out: str | Path, *, data_root: str | Path | None = None, jobs: int = 1,
              threads: int | None = None, device: str = "auto", **overrides: Any) -> dict[str, Any]:
    """Run the study of ``settings`` (or of the preset of that name, with ``overrides`` of its fields) in ``out``."""
    if isinstance(settings, str):
        if settings not in PRESETS:
            raise ValueError(f"unknown preset {settings!r}; known: {', '.join(PRESETS)}")
        settings = PRESETS[settings]
    return Study(replace(settings, **overrides), out, data_root=data_root, jobs=jobs, threads=threads,
                 device=device).run()


def demo(out: str | Path, *, data_root: str | Path | None = None, epochs: int | None = None,
         n_samples: int | None = None, jobs: int = 1) -> dict[str, Any]:
    """``repsim demo``: the ``demo`` preset on the built-in synthetic tasks (no network, no files needed), or with
    ``data_root`` on the real MedMNIST files (PneumoniaMNIST -> RetinaMNIST). Besides the study's outputs it writes
    ``out/cka.nc`` and ``out/cka.png``: the backbone's blocks before vs after fine-tuning (Fig 7 style, bootstrap
    CIs). ``epochs`` sets pretraining and fine-tuning epochs; ``n_samples`` the size of each synthetic task."""
    s = PRESETS["demo"]
    if data_root is None:
        s = replace(s, source="synthetic-source", targets=("synthetic-target",),
                    synthetic_samples=n_samples or s.synthetic_samples)
    elif n_samples is not None:
        raise ValueError("n_samples sizes the synthetic tasks; it does not apply with a data root")
    if epochs is not None:
        s = replace(s, pretrain={**s.pretrain, "epochs": epochs}, train={**s.train, "epochs": epochs})
    summary = Study(s, out, data_root=data_root, jobs=jobs).run()
    out = Path(out)
    (target,) = s.targets
    fig7_nc = out / "cka" / target / "fig7_unfrozen-linear.nc"
    ds = load_netcdf(fig7_nc)
    save_netcdf(ds, out / "cka.nc")
    save_png(fig7({target: {"fig7/unfrozen-linear": ds}}), out / "cka.png", dpi=FIG_DPI)
    return summary
