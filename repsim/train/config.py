"""Experiment specs: defaults, ``key=value`` overrides and grid expansion into one resolved config per run.

A spec is a YAML mapping with the blocks ``data``, ``model``, ``train`` and ``knn`` (see ``DEFAULTS``) and an
optional ``grid`` of dotted keys to lists; every combination of the grid becomes one run. A grid value that is a
mapping is merged into the block it names (``data: [{dataset: aptos2019, root: APTOS2019}, ...]``). Overrides
given on the command line are applied last, replace the value at their key (``model.kwargs={}`` empties it) and
collapse a grid axis of the same key to that one value.
"""

from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from repsim.types import SCENARIOS

DEFAULTS: dict[str, Any] = {
    "name": "run",
    "kind": "train",  # train | knn
    "data": {"img_size": 224, "split_seed": 42},
    "model": {
        "name": None,
        "kwargs": {},  # passed to repsim.models.create (timm kwargs for timm names)
        "pretrained": True,
        "checkpoint": None,
        "scenario": "unfrozen-linear",
        "freeze_blocks": None,
        "decapitate": None,
        "classifier": {},  # *-stacked: kwargs of repsim.surgery.StackedClassifier (default: the paper's DeiT-B)
    },
    "train": {
        "epochs": 100,
        "batch_size": 64,  # global batch, split over DDP processes
        "eval_batch_size": None,  # default: batch_size
        "lr": 1.0e-4,
        "lr_grid": None,  # list of base LRs searched with seed 0 on the validation metric
        "seed": 0,
        "seeds": 1,  # repeats (seeds 0..seeds-1) at the selected LR -> mean ± std
        "weight_decay": 1.0e-5,
        "warmup_epochs": None,  # default: the dataset's (paper: 5 epochs APTOS/DDSM, 1000 iterations ISIC/CheXpert)
        "warmup_iters": None,  # overrides warmup_epochs when set
        "patience": 5,  # epochs without a better validation metric that make a plateau
        "max_plateaus": 3,  # LR ÷10 at each plateau; stop at this many
        "grad_clip": 1.0,  # max gradient norm; null disables clipping
        "amp": True,  # only on CUDA
        "num_workers": 2,
        "device": "auto",
        "metric": None,  # model-selection metric; default: the dataset's (repsim.metrics.SELECTABLE)
        "cache_frozen": False,  # frozen-* scenarios: train the head on backbone outputs computed once (no augmentation)
    },
    "knn": {"k": 200, "temperature": 0.1, "batch_size": 256},
}

KINDS = ("train", "knn")


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated recursively by ``update`` (mappings merge, everything else replaces); inputs untouched."""
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def set_dotted(cfg: dict[str, Any], key: str, value: Any, *, merge: bool = False) -> None:
    """Set ``cfg["a"]["b"] = value`` for ``key="a.b"``; with ``merge`` a mapping merges into an existing one."""
    *parents, leaf = key.split(".")
    node = cfg
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"cannot set {key!r}: {p!r} is not a mapping")
    if merge and isinstance(value, Mapping) and isinstance(node.get(leaf), Mapping):
        node[leaf] = deep_merge(node[leaf], value)
    else:
        node[leaf] = copy.deepcopy(value)


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["train.lr=1e-3", "model.name=deit_b"]`` -> ``{"train.lr": 0.001, ...}`` (values parsed as YAML)."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not key=value")
        value = yaml.safe_load(raw)
        # YAML 1.1 reads "1e-3" as a string; numbers in scientific notation are what users mean here.
        if isinstance(value, str) and re.fullmatch(r"[-+]?\d*\.?\d+[eE][-+]?\d+", value):
            value = float(value)
        out[key.strip()] = value
    return out


def spec_path(name: str | Path) -> Path:
    """A spec file path, or the name of a packaged spec (``table1`` -> repsim/specs/table1.yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    packaged = resources.files("repsim") / "specs" / f"{Path(name).stem}.yaml"
    if packaged.is_file():
        return Path(str(packaged))
    raise FileNotFoundError(f"spec {str(name)!r} is neither a file nor a packaged spec ({', '.join(packaged_specs())})")


def packaged_specs() -> list[str]:
    return sorted(p.name[:-5] for p in (resources.files("repsim") / "specs").iterdir() if p.name.endswith(".yaml"))


def load_spec(spec: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """A spec as a dict (from a mapping, a YAML file or a packaged spec name)."""
    if isinstance(spec, Mapping):
        return copy.deepcopy(dict(spec))
    path = spec_path(spec)
    doc = yaml.safe_load(path.read_text())
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: a spec must be a YAML mapping")
    doc.setdefault("name", path.stem)
    return doc


def _label(key: str, value: Any) -> str:
    """Short name of a grid value: a mapping by its flag/dataset/name, a number with its key (``decapitate3``)."""
    if isinstance(value, Mapping):
        for k in ("flag", "dataset", "name"):
            if k in value:
                return str(value[k])
        return "-".join(_label(k, v) for k, v in value.items())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{key.rsplit('.', 1)[-1]}{value}"
    return str(value)


def _grids(spec_grid: Any) -> list[dict[str, list]]:
    grids = spec_grid if isinstance(spec_grid, list) else [spec_grid or {}]
    for grid in grids:
        if not isinstance(grid, Mapping):
            raise ValueError(f"grid must map dotted keys to lists, or be a list of such mappings; got {grid!r}")
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"grid axis {key!r} must be a non-empty list")
    return [dict(g) for g in grids]


def expand(spec: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """Resolved ``(run name, config)`` for every grid combination of ``spec`` with ``overrides`` applied.

    ``grid`` may be a list of grids (their union: e.g. baselines with one head, foundation models with two). A run
    is named by its values on all axes of its grid (stable when an override collapses an axis); duplicates are
    dropped.
    """
    spec = dict(spec)
    overrides = dict(overrides or {})
    grids = _grids(spec.pop("grid", None))
    unknown = sorted(set(spec) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown spec keys {unknown}; expected {sorted(DEFAULTS)} and grid")
    base = deep_merge(DEFAULTS, spec)
    points: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for grid in grids:
        axes = {k: ([overrides[k]] if k in overrides else v) for k, v in grid.items()}
        for combo in itertools.product(*axes.values()):
            cfg = copy.deepcopy(base)
            for key, value in zip(axes, combo):
                set_dotted(cfg, key, value, merge=True)
            for key, value in overrides.items():
                set_dotted(cfg, key, value)
            validate(cfg)
            points.append(({k: _label(k, v) for k, v in zip(axes, combo)}, cfg))
    runs: dict[str, dict[str, Any]] = {}
    for labels, cfg in points:
        name = "__".join(labels.values()) or cfg["name"]
        if name in runs and runs[name] != cfg:
            raise ValueError(f"two different runs are both named {name!r}; make their grid values distinguishable")
        runs[name] = cfg
    return list(runs.items())


def config_diff(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two configs."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out += config_diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}")
    return out


def validate(cfg: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the first thing wrong in a resolved config."""
    if cfg["kind"] not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {cfg['kind']!r}")
    if not cfg["model"].get("name"):
        raise ValueError("model.name is required")
    if "dataset" not in cfg["data"]:
        raise ValueError("data.dataset is required")
    if cfg["model"]["scenario"] not in SCENARIOS:
        raise ValueError(f"unknown scenario {cfg['model']['scenario']!r}; expected one of {', '.join(SCENARIOS)}")
    for block in ("model", "train", "knn"):
        unknown = sorted(set(cfg[block]) - set(DEFAULTS[block]))
        if unknown:
            raise ValueError(f"unknown {block} keys {unknown}; expected {sorted(DEFAULTS[block])}")
    t = cfg["train"]
    if t["batch_size"] < 1 or t["epochs"] < 1 or t["seeds"] < 1:
        raise ValueError("train.batch_size, train.epochs and train.seeds must be >= 1")
