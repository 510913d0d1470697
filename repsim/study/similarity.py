"""The study's CKA, all on flattened stage outputs (``results.CKA_POOL``): blocks before vs after fine-tuning for
every start (Fig 7) with three references per block, the floor (two random initialisations of the backbone), the
seed spread (two seeds of the same start after fine-tuning: "how different is different") and AdaBN-before vs after
(the start with its BatchNorm statistics re-estimated on the target's train images, so a change of weights is told
apart from a change of statistics); the stacked classifier before vs after (Fig A.1) and the last block across
backbones (Fig 8). Each matrix is a netCDF file under ``cka/<target>/`` (its attrs say the comparison and the
feature), computed once and reused."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import xarray as xr
from torch import nn

from repsim.batches import near_equal_batches
from repsim.files import load_netcdf, save_netcdf
from repsim.inputs import Stats, renormaliser
from repsim.study.results import CKA_FEATURE, CKA_POOL, Comparison, Place
from repsim.study.workspace import Workspace
from repsim.train.runs import RunFiles, find_runs, load_run
from repsim.types import STACKED


class Renormalised(nn.Module):
    """``backbone`` fed inputs normalised for another model (``repsim.inputs.renormaliser`` from ``source`` to the
    backbone's own ``input_mean``/``input_std``), so models that expect different normalisations read the same loader
    (Fig 8 across architectures)."""

    def __init__(self, backbone: nn.Module, source: Stats) -> None:
        super().__init__()
        self.backbone = backbone
        target = (tuple(backbone.input_mean), tuple(backbone.input_std))  # type: ignore[arg-type]
        self.renormalise = renormaliser(source, target, len(source[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x if self.renormalise is None else self.renormalise(x))

    def layer_names(self) -> list[str]:
        from repsim.compare import default_layers

        return [f"backbone.{n}" for n in default_layers(self.backbone)]  # the backbone's layer_names()


def _cached(path: Path, make: Callable[[], xr.Dataset], **attrs: str) -> xr.Dataset:
    """The matrix at ``path``, computed by ``make`` when the file is missing or was made from other inputs (its
    ``attrs`` differ: another run, or Fig 8 with fewer backbones than the study now has)."""
    if path.exists():
        ds = load_netcdf(path)
        if all(str(ds.attrs.get(k)) == v for k, v in attrs.items()):
            return ds
    save_netcdf(make().assign_attrs(attrs), path)
    return load_netcdf(path)


def study_cka(ws: Workspace, finetune: Mapping[str, Any]) -> dict[str, dict[Comparison, xr.Dataset]]:
    """``{target: {Comparison: Dataset}}`` for every target fine-tuned; ``finetune[start][target][scenario]`` are the
    fine-tuning results (the chosen LR of each)."""
    from repsim.compare import Bootstrap
    from repsim.train.utils import pick_device

    kw: dict[str, Any] = {"device": pick_device(ws.device), "bootstrap": Bootstrap(ws.settings.n_boot),
                          "pool": CKA_POOL, "progress": False}
    targets = list(dict.fromkeys(t for _, t, _ in ws.settings.experiments()))
    return {t: _target_matrices(ws, finetune, t, kw) for t in targets}


def _target_matrices(ws: Workspace, finetune: Mapping[str, Any], target: str,
                     kw: dict[str, Any]) -> dict[Comparison, xr.Dataset]:
    """Every CKA matrix of one target, on its test split (computed once, then read from ``cka/<target>/``)."""
    from repsim.compare import compare, compare_many, default_layers
    from repsim.data import bootstrap_batches, prepare
    from repsim.surgery import adapt_batchnorm, batchnorm_layers

    s = ws.settings
    splits = prepare(ws.data_block(target), ws.data_root).datasets
    test, train = splits["test"], splits["train_eval"]  # train_eval: the train images with the eval transform
    loader = torch.utils.data.DataLoader(test, batch_sampler=bootstrap_batches(len(test), s.cka_batch_size))
    adabn = bool(batchnorm_layers(ws.backbone()))  # without BatchNorm, AdaBN-before is the start itself

    def runs(start: str, scenario: str) -> list[Path]:
        res = finetune.get(start, {}).get(target, {}).get(scenario)
        return [] if res is None else find_runs(ws.folder(Place("finetune", start, target, scenario)), res["lr"])

    def before_after(run: Path, part: str = "backbone") -> xr.Dataset:
        before, after = load_run(run, "init", part), load_run(run, "best", part)  # type: ignore[arg-type]
        layers = default_layers(before) if part == "backbone" else [
            n for n, _ in before.named_modules() if n.startswith("classifier.blocks.") and n.count(".") == 2]
        return compare(before, after, loader, layers_a=layers, labels=("before", "after"), **kw)

    def adabn_after(run: Path) -> xr.Dataset:
        """The start with BatchNorm statistics re-estimated on the train images (batches of the fine-tuning's size,
        each normalised by its own statistics as in training) vs the fine-tuned model."""
        batches = near_equal_batches(len(train), int(RunFiles(run).read_config()["train"]["batch_size"]))
        before = adapt_batchnorm(load_run(run, "init").to(kw["device"]),
                                 torch.utils.data.DataLoader(train, batch_sampler=batches))
        return compare(before, load_run(run, "best"), loader, labels=("AdaBN-before", "after"), **kw)

    def floor(i: int, j: int) -> xr.Dataset:
        nets = []
        for seed in (i, j):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                nets.append(ws.backbone().eval())
        return compare(nets[0], nets[1], loader, labels=(f"random init {i}", f"random init {j}"), **kw)

    def between(a: Path, b: Path, labels: tuple[str, str]) -> xr.Dataset:
        return compare(load_run(a), load_run(b), loader, labels=labels, **kw)

    fig8_runs = {st.name: found[0] for st in s.starts for found in [runs(st.name, "unfrozen-linear")] if found}

    def fig8() -> xr.Dataset:
        models: dict[str, nn.Module] = {}
        for start, run in fig8_runs.items():
            models[f"{start} start"] = load_run(run, "init")
            models[f"{start} fine-tuned"] = load_run(run, "best")
        for name in s.fig8_models:
            other = ws.backbone(model=name, pretrained=True).eval()
            models[name] = other if ws.norm is None else Renormalised(other, (tuple(ws.norm[0]), tuple(ws.norm[1])))
        last = {k: [m.layer_names()[-1]] for k, m in models.items()}  # type: ignore[operator]
        return compare_many(models, loader, layers=last, pool=CKA_POOL, device=kw["device"], progress=False)

    mats: dict[Comparison, xr.Dataset] = {}

    def cached(c: Comparison, make: Callable[[], xr.Dataset], **attrs: str) -> None:
        mats[c] = _cached(ws.cka_file(target, c), make, comparison=str(c), feature=CKA_FEATURE, **attrs)

    for k in range(s.reference_pairs):  # disjoint pairs: independent draws of the floor
        cached(Comparison("floor", seeds=(2 * k, 2 * k + 1)), functools.partial(floor, 2 * k, 2 * k + 1))
    for st in s.starts:
        found = runs(st.name, "unfrozen-linear")[:s.cka_seeds]
        for seed, run in enumerate(found):
            cached(Comparison("fig7", st.name, seeds=(seed,)), functools.partial(before_after, run), run=str(run))
            if adabn:
                cached(Comparison("adabn", st.name, seeds=(seed,)), functools.partial(adabn_after, run), run=str(run))
        for (i, a), (j, b) in itertools.combinations(enumerate(found), 2):
            cached(Comparison("spread", st.name, seeds=(i, j)),
                   functools.partial(between, a, b, (f"{st.name} seed {i}", f"{st.name} seed {j}")))
    stacked = next((st.name for st in s.starts if any(runs(st.name, sc) for sc in STACKED)), None)
    for sc in STACKED if stacked else ():
        for run in runs(stacked or "", sc)[:1]:
            cached(Comparison("figA1", stacked or "", sc), functools.partial(before_after, run, "classifier"),
                   run=str(run))
    if s.fig8_models or fig8_runs:
        cached(Comparison("fig8"), fig8, members=", ".join([*map(str, fig8_runs.values()), *s.fig8_models]))
    return mats
