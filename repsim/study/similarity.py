"""The study's CKA: blocks before vs after fine-tuning for every start (Fig 7), the same between two independently
seeded from-scratch models (the null reference: "how different is different"), the stacked classifier before vs
after (Fig A.1) and the last block across backbones (Fig 8). Each matrix is a netCDF file under ``cka/<target>/``,
computed once and reused."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import xarray as xr
from torch import nn

from repsim.files import load_netcdf, save_netcdf
from repsim.inputs import Stats, renormaliser
from repsim.study.results import Comparison, Place
from repsim.study.workspace import Workspace
from repsim.train.runs import find_runs, load_run
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


def _cached(path: Path, make: Callable[[], xr.Dataset], **attrs: Any) -> xr.Dataset:
    if not path.exists():
        save_netcdf(make().assign_attrs(attrs), path)
    return load_netcdf(path)


def study_cka(ws: Workspace, finetune: Mapping[str, Any]) -> dict[str, dict[Comparison, xr.Dataset]]:
    """``{target: {Comparison: Dataset}}`` for every target fine-tuned; ``finetune[start][target][scenario]`` are the
    fine-tuning results (the chosen LR of each)."""
    from repsim.compare import Bootstrap
    from repsim.train.utils import pick_device

    kw: dict[str, Any] = {"device": pick_device(ws.device), "bootstrap": Bootstrap(ws.settings.n_boot),
                          "progress": False}
    targets = list(dict.fromkeys(t for _, t, _ in ws.settings.experiments()))
    return {t: _target_matrices(ws, finetune, t, kw) for t in targets}


def _target_matrices(ws: Workspace, finetune: Mapping[str, Any], target: str,
                     kw: dict[str, Any]) -> dict[Comparison, xr.Dataset]:
    """Every CKA matrix of one target, on its test split (computed once, then read from ``cka/<target>/``)."""
    from repsim.compare import compare, compare_many, default_layers
    from repsim.data import bootstrap_batches, prepare

    s = ws.settings
    test = prepare(ws.data_block(target), ws.data_root).datasets["test"]
    loader = torch.utils.data.DataLoader(test, batch_sampler=bootstrap_batches(len(test), s.cka_batch_size))
    scratch = next((st.name for st in s.starts if st.kind == "scratch"), None)

    def runs(start: str, scenario: str) -> list[Path]:
        res = finetune.get(start, {}).get(target, {}).get(scenario)
        return [] if res is None else find_runs(ws.folder(Place("finetune", start, target, scenario)), res["lr"])

    def before_after(run: Path, part: str = "backbone") -> xr.Dataset:
        before, after = load_run(run, "init", part), load_run(run, "best", part)  # type: ignore[arg-type]
        layers = default_layers(before) if part == "backbone" else [
            n for n, _ in before.named_modules() if n.startswith("classifier.blocks.") and n.count(".") == 2]
        return compare(before, after, loader, layers_a=layers, labels=("before", "after"), **kw)

    def between(a: Path, b: Path, labels: tuple[str, str]) -> xr.Dataset:
        return compare(load_run(a), load_run(b), loader, labels=labels, **kw)

    def fig8() -> xr.Dataset:
        models: dict[str, nn.Module] = {}
        for st in s.starts:
            found = runs(st.name, "unfrozen-linear")
            if found:
                models[f"{st.name} start"] = load_run(found[0], "init")
                models[f"{st.name} fine-tuned"] = load_run(found[0], "best")
        for name in s.fig8_models:
            other = ws.backbone(model=name, pretrained=True).eval()
            models[name] = other if ws.norm is None else Renormalised(other, (tuple(ws.norm[0]), tuple(ws.norm[1])))
        last = {k: [m.layer_names()[-1]] for k, m in models.items()}  # type: ignore[operator]
        return compare_many(models, loader, layers=last, device=kw["device"], progress=False)

    def cached(c: Comparison, make: Callable[[], xr.Dataset], **attrs: Any) -> xr.Dataset:
        return _cached(ws.cka_file(target, c), make, **attrs)

    mats: dict[Comparison, xr.Dataset] = {}
    for st in s.starts:
        for seed, run in enumerate(runs(st.name, "unfrozen-linear")[:s.cka_seeds]):
            c = Comparison("fig7", st.name, seeds=(seed,))
            mats[c] = cached(c, functools.partial(before_after, run), run=str(run))
    trained = runs(scratch, "unfrozen-linear") if scratch else []
    for (i, a), (j, b) in itertools.combinations(enumerate(trained), 2):
        c = Comparison("null", seeds=(i, j))
        mats[c] = cached(c, functools.partial(between, a, b, (f"scratch seed {i}", f"scratch seed {j}")))
    stacked = next((st.name for st in s.starts if any(runs(st.name, sc) for sc in STACKED)), None)
    for sc in STACKED if stacked else ():
        for run in runs(stacked or "", sc)[:1]:
            c = Comparison("figA1", stacked or "", sc)
            mats[c] = cached(c, functools.partial(before_after, run, "classifier"), run=str(run))
    if s.fig8_models or any(runs(st.name, "unfrozen-linear") for st in s.starts):
        mats[Comparison("fig8")] = cached(Comparison("fig8"), fig8)
    return mats
