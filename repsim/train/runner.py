"""Experiments from specs: every grid point of a spec, an LR search on seed 0, then ``seeds`` repeats -> mean ± std.

Layout under ``out``::

    <out>/<spec name>/<grid point>/lr<lr>/seed<k>/   one run directory (repsim.train.runs; no grid: no <grid point>)
    <out>/<spec name>/<grid point>/results.json      selected LR, LR search, test metrics mean/std over seeds
    <out>/<spec name>/<grid point>/knn.json          k-NN metrics (kind: knn)

A run directory that already has ``summary.json`` is reused, so an interrupted experiment restarted with
``resume=True`` only redoes what is missing.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from repsim.data import prepare
from repsim.files import write_text
from repsim.knn import knn_evaluate
from repsim.threads import kept_threads
from repsim.train.config import check_slug, expand, load_spec, parse_overrides
from repsim.train.loop import train
from repsim.train.runs import ExperimentFiles, RunFiles, check_run_paths, run_dir
from repsim.train.utils import build_model, check_same_config, describe_weights, distributed, pick_device


def train_or_reuse(cfg: dict[str, Any], run_dir: Path, data_root: str | Path | None, resume: bool = True,
                   progress: bool = False) -> dict[str, Any]:
    """The summary of the run of ``cfg`` in ``run_dir``: read when the run has finished, else trained (resumed)."""
    check_run_paths(run_dir)
    files = RunFiles(run_dir)
    if files.finished():
        check_same_config(cfg, run_dir)
        return files.read_summary()
    with kept_threads():  # train() picks the threads for its model; the caller's count comes back
        return train(cfg, run_dir, data_root=data_root, resume=resume, progress=progress)


def stats(values: list[float]) -> dict[str, Any]:
    """``{"mean", "std", "values"}`` (sample std, ddof=1; 0 for one value; NaN propagates)."""
    values = [float(v) for v in values]
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "values": values}


def aggregate(summaries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{test metric: stats}`` over runs."""
    keys = [k for k in summaries[0]["test"] if all(k in s["test"] for s in summaries)]
    return {key: stats([s["test"][key] for s in summaries]) for key in keys}


def choose_lr(search: Mapping[str, float]) -> float:
    """The LR (keys: ``f"{lr:g}"``, in grid order) with the best validation value; NaN is worst, ties go to the
    first."""
    return float(max(search, key=lambda k: -math.inf if math.isnan(search[k]) else search[k]))


MAX_EXTENSIONS = 2  # grid steps added beyond an edge before the search gives up (and says so)


def grid_step_beyond(grid: list[float], lr: float) -> float | None:
    """The next LR beyond the grid's edge when ``lr`` is its smallest or largest value (one geometric step of the
    grid's adjacent spacing there), else None: ``lr`` lies inside the grid."""
    ordered = sorted(float(v) for v in grid)
    if len(ordered) < 2 or ordered[0] < lr < ordered[-1]:
        return None
    if lr >= ordered[-1]:
        return float(f"{ordered[-1] ** 2 / ordered[-2]:.3g}")
    return float(f"{ordered[0] ** 2 / ordered[1]:.3g}")


def run_experiment(cfg: dict[str, Any], exp_dir: Path, *, data_root: str | Path | None = None,
                   resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """LR search (seed 0, best validation metric) then ``train.seeds`` repeats of one resolved config."""
    tc = cfg["train"]
    grid = list(tc["lr_grid"] or [tc["lr"]])
    search: dict[str, float] = {}

    def try_lr(lr: float) -> None:
        c = copy.deepcopy(cfg)
        c["train"].update(lr=float(lr), seed=0)
        s = train_or_reuse(c, run_dir(exp_dir, lr, 0), data_root, resume, progress)
        search[f"{lr:g}"] = s["val"][s["metric"]]

    for lr in grid if len(grid) > 1 else []:
        try_lr(lr)
    best_lr = float(grid[0]) if not search else choose_lr(search)
    extended: list[float] = []
    while tc["extend_lr_grid"] and len(grid) > 1 and len(extended) < MAX_EXTENSIONS:
        beyond = grid_step_beyond(grid, best_lr)
        if beyond is None:
            break  # the chosen LR lies inside the grid
        grid = sorted([*grid, beyond])
        extended.append(beyond)
        try_lr(beyond)
        best_lr = choose_lr(search)
    summaries = []
    for seed in range(tc["seeds"]):
        c = copy.deepcopy(cfg)
        c["train"].update(lr=best_lr, seed=seed)
        summaries.append(train_or_reuse(c, run_dir(exp_dir, best_lr, seed), data_root, resume, progress))
    first = summaries[0]
    results = {"dataset": first["dataset"], "model": first["model"], "weights": describe_weights(cfg["model"]),
               "scenario": first["scenario"],
               "freeze_blocks": first["freeze_blocks"], "decapitate": first["decapitate"],
               "img_size": first["img_size"], "metric": first["metric"], "lr": best_lr, "lr_search": search,
               "lr_grid_extended": extended, "lr_on_grid_edge": grid_step_beyond(grid, best_lr) is not None,
               "seeds": list(range(tc["seeds"])), "test": aggregate(summaries),
               "iterations_to_best": stats([s["iterations_to_best"] for s in summaries]),
               "inference_ms_per_image": stats([s["inference_ms_per_image"] for s in summaries])}
    if distributed()[0] == 0:
        _warn_if_replacing(ExperimentFiles(exp_dir).results, results)
        write_text(ExperimentFiles(exp_dir).results, json.dumps(results, indent=2))
    return results


def _warn_if_replacing(path: Path, results: Mapping[str, Any]) -> None:
    """Warn when ``path`` holds results of another LR or LR grid: they are replaced, which should not go unseen."""
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        warnings.warn(f"replacing {path}, which is not valid JSON", UserWarning, stacklevel=3)
        return
    changes = []
    if old.get("lr") != results["lr"]:
        changes.append(f"lr {old.get('lr')} -> {results['lr']:g}")
    if list(old.get("lr_search") or {}) != list(results["lr_search"]):
        changes.append(f"LR search over {list(old.get('lr_search') or {}) or 'none'} -> "
                       f"{list(results['lr_search']) or 'none'}")
    if changes:
        warnings.warn(f"replacing {path} ({'; '.join(changes)})", UserWarning, stacklevel=3)


def run_knn(cfg: dict[str, Any], exp_dir: Path, *, data_root: str | Path | None = None) -> dict[str, Any]:
    """k-NN metrics (test split, train split as the bank) of the frozen backbone of ``cfg``."""
    data = prepare(cfg["data"], data_root, seed=int(cfg["train"]["seed"]))
    torch.manual_seed(int(cfg["train"]["seed"]))
    model, record = build_model(cfg, data)
    kc = cfg["knn"]
    loaders = {s: torch.utils.data.DataLoader(data.datasets[s], batch_size=kc["batch_size"],
                                              num_workers=cfg["train"]["num_workers"]) for s in ("train_eval", "test")}
    metrics = knn_evaluate(model.backbone, loaders["train_eval"], loaders["test"], task=data.info.task,
                           num_classes=data.info.num_classes, k=kc["k"], temperature=kc["temperature"],
                           label_names=data.info.classes, device=pick_device(cfg["train"]["device"]))
    result = {"dataset": data.info.name, "model": cfg["model"]["name"], "weights": describe_weights(cfg["model"]),
              "scenario": "knn",
              "metric": cfg["train"]["metric"] or data.info.metric, "k": kc["k"], "temperature": kc["temperature"],
              "img_size": record["img_size"], "test": {k: stats([v]) for k, v in metrics.items()}}
    exp_dir.mkdir(parents=True, exist_ok=True)
    write_text(ExperimentFiles(exp_dir).config, yaml.safe_dump(cfg, sort_keys=False))
    write_text(ExperimentFiles(exp_dir).knn, json.dumps(result, indent=2))
    return result


def check_inputs(cfg: dict[str, Any], data_root: str | Path | None) -> None:
    """One-line errors, before anything is built or read, for what a resolved config names: its data (dataset,
    keys, root), its model name and its checkpoint file."""
    from repsim.data.preparation import check_data_block
    from repsim.models import check_name

    try:
        check_data_block(cfg["data"], data_root)
    except (ValueError, FileNotFoundError) as err:
        raise type(err)(f"{cfg['name']}: {err}") from None
    check_name(cfg["model"]["name"])
    checkpoint = cfg["model"].get("checkpoint")
    if checkpoint and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"{cfg['name']}: model.checkpoint {checkpoint} does not exist")


def experiment_dir(out: str | Path, spec_name: str, point: str | None) -> Path:
    """``out/<spec_name>/<point>`` (``out/<spec_name>`` for a spec without a grid): both names slugs, the folder
    (symbolic links resolved) inside ``out``."""
    exp_dir = Path(out) / check_slug(spec_name, "spec name")
    if point is not None:
        exp_dir = exp_dir / check_slug(point, "run name")
    if not exp_dir.resolve().is_relative_to(Path(out).resolve()):
        raise ValueError(f"experiment folder {exp_dir} resolves to {exp_dir.resolve()}, outside --out {out}")
    return exp_dir


def run(spec: str | Path | Mapping[str, Any], *, data_root: str | Path | None = None, out: str | Path = "runs",
        overrides: Iterable[str] | Mapping[str, Any] = (), resume: bool = False, kind: str | None = None,
        progress: bool = True) -> dict[str, dict[str, Any]]:
    """Run every experiment of ``spec`` (file, packaged name or dict); returns ``{grid point: results}``.

    ``overrides`` are ``"key=value"`` strings or a ``{dotted key: value}`` mapping; ``kind`` forces train or knn.
    Every experiment folder is ``out/<spec name>/<grid point>`` (``out/<spec name>`` without a grid), checked to lie
    inside ``out``.
    """
    spec = load_spec(spec)
    if kind is not None:
        spec["kind"] = kind
    parsed = dict(overrides) if isinstance(overrides, Mapping) else parse_overrides(overrides)
    grid = bool(spec.get("grid"))  # a spec without a grid is one experiment: out/<name>/lr<lr>/seed<k>
    points = [(name, cfg, experiment_dir(out, cfg["name"], name if grid else None))
              for name, cfg in expand(spec, parsed)]
    for _, cfg, _ in points:  # every experiment is checked before the first one trains
        check_inputs(cfg, data_root)
    results = {}
    for name, cfg, exp_dir in points:
        if cfg["kind"] == "knn":
            results[name] = run_knn(cfg, exp_dir, data_root=data_root)
        else:
            results[name] = run_experiment(cfg, exp_dir, data_root=data_root, resume=resume, progress=progress)
    return results
