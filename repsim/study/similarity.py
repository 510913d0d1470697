"""The study's CKA: blocks before vs after fine-tuning for every start (Fig 7), the same between two independently
seeded from-scratch models (the null reference: "how different is different"), the stacked classifier before vs
after (Fig A.1) and the last block across backbones (Fig 8). Each matrix is a netCDF file under ``cka/<target>/``,
computed once and reused."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import xarray as xr
from torch import nn

from repsim.files import load_netcdf, save_netcdf
from repsim.train.runs import find_runs, load_run
from repsim.types import STACKED

if TYPE_CHECKING:
    from repsim.study.pipeline import Study


class Renormalised(nn.Module):
    """``backbone`` fed inputs normalised for another model: undoes ``source`` mean/std, applies ``target``'s, so
    models that expect different normalisations read the same loader (Fig 8 across architectures)."""

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self, backbone: nn.Module, source: tuple[list[float], list[float]],
                 target: tuple[tuple[float, ...], tuple[float, ...]]) -> None:
        super().__init__()
        self.backbone = backbone
        mean_s, std_s, mean_t, std_t = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1)
                                        for v in (*source, *target))
        self.register_buffer("scale", std_s / std_t)  # x * std_s + mean_s is the pixel; normalise it for target
        self.register_buffer("shift", (mean_s - mean_t) / std_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x * self.scale + self.shift)

    def layer_names(self) -> list[str]:
        from repsim.compare import default_layers

        return [f"backbone.{n}" for n in default_layers(self.backbone)]  # the backbone's layer_names()


def diagonal(ds: xr.Dataset) -> dict[str, list[float]]:
    """CKA(block k of a, block k of b) with its bootstrap CI: ``{"cka", "lower", "upper"}`` lists over k."""
    return {v: [float(x) for x in np.diagonal(ds[v].values)] for v in ("cka", "lower", "upper") if v in ds}


def cka_summary(ds: xr.Dataset) -> dict[str, Any]:
    """JSON numbers of a CKA result: the matrix, its diagonal with CIs, the mean CI width, the early/late means."""
    out: dict[str, Any] = {"layers_a": [str(x) for x in ds["layer_a"].values],
                           "layers_b": [str(x) for x in ds["layer_b"].values],
                           "cka": np.round(ds["cka"].values, 4).tolist()}
    if "lower" in ds and ds.sizes["layer_a"] == ds.sizes["layer_b"]:
        d = diagonal(ds)
        half = len(d["cka"]) // 2
        out.update(diagonal=d, mean_ci_width=float((ds["upper"] - ds["lower"]).mean()),
                   early_mean=float(np.mean(d["cka"][:max(half, 1)])), late_mean=float(np.mean(d["cka"][half:])))
    return out


def _cached(path: Path, make: Callable[[], xr.Dataset], **attrs: Any) -> xr.Dataset:
    if not path.exists():
        save_netcdf(make().assign_attrs(attrs), path)
    return load_netcdf(path)


def study_cka(study: Study, results: Mapping[str, dict[str, Any]]) -> dict[str, dict[str, xr.Dataset]]:
    """``{target: {name: Dataset}}``; names ``fig7/<start>/seed<k>``, ``null/seed<i>-<j>``,
    ``figA1/<start>/<scenario>`` and ``fig8``."""
    from repsim.compare import Bootstrap
    from repsim.train.utils import pick_device

    device = pick_device(study.device)
    kw: dict[str, Any] = {"device": device, "bootstrap": Bootstrap(study.settings.n_boot), "progress": False}
    targets = list(dict.fromkeys(t for _, t, _ in study.settings.experiments()))
    return {t: _target_matrices(study, results, t, kw) for t in targets}


def _target_matrices(study: Study, results: Mapping[str, dict[str, Any]], target: str,
                     kw: dict[str, Any]) -> dict[str, xr.Dataset]:
    """Every CKA matrix of one target, on its test split (computed once, then read from ``cka/<target>/``)."""
    from repsim.compare import compare, compare_many, default_layers
    from repsim.data import bootstrap_batches, prepare

    s, folder = study.settings, study.out / "cka" / target
    test = prepare(study.data_block(target), study.data_root).datasets["test"]
    loader = torch.utils.data.DataLoader(test, batch_sampler=bootstrap_batches(len(test), s.cka_batch_size))
    scratch = next((st.name for st in s.starts if st.kind == "scratch"), None)

    def runs(start: str, scenario: str) -> list[Path]:
        key = f"finetune/{start}/{target}/{scenario}"
        return find_runs(study.out / "finetune" / start / target / scenario, results[key]["lr"]) if key in results \
            else []

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
            other = study.backbone(model=name, pretrained=True).eval()
            models[name] = other if study.norm is None else Renormalised(
                other, study.norm, (other.input_mean, other.input_std))
        last = {k: [m.layer_names()[-1]] for k, m in models.items()}  # type: ignore[operator]
        return compare_many(models, loader, layers=last, device=kw["device"], progress=False)

    mats: dict[str, xr.Dataset] = {}
    for st in s.starts:
        for seed, run in enumerate(runs(st.name, "unfrozen-linear")[:s.cka_seeds]):
            mats[f"fig7/{st.name}/seed{seed}"] = _cached(
                folder / f"fig7_{st.name}_seed{seed}.nc", functools.partial(before_after, run), run=str(run))
    trained = runs(scratch, "unfrozen-linear") if scratch else []
    for (i, a), (j, b) in itertools.combinations(enumerate(trained), 2):
        mats[f"null/seed{i}-{j}"] = _cached(folder / f"null_seed{i}-{j}.nc", functools.partial(
            between, a, b, (f"scratch seed {i}", f"scratch seed {j}")))
    stacked = next((st.name for st in s.starts if any(runs(st.name, sc) for sc in STACKED)), None)
    for sc in STACKED if stacked else ():
        for run in runs(stacked or "", sc)[:1]:
            mats[f"figA1/{stacked}/{sc}"] = _cached(folder / f"figA1_{stacked}_{sc}.nc",
                                                    functools.partial(before_after, run, "classifier"), run=str(run))
    mats["fig8"] = _cached(folder / "fig8_last_block.nc", fig8)
    return mats
