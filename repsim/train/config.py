"""Experiment specs: defaults, ``key=value`` overrides and grid expansion into one resolved config per run.

A spec is a YAML mapping with the blocks ``data``, ``model``, ``train`` and ``knn`` (see ``DEFAULTS``) and an
optional ``grid`` of dotted keys to lists; every combination of the grid becomes one run. A grid value that is a
mapping is merged into the block it names (``data: [{dataset: aptos2019, root: APTOS2019}, ...]``). Overrides
given on the command line are applied last, replace the value at their key (``model.kwargs={}`` empties it) and
collapse a grid axis of the same key to that one value. ``validate`` checks every resolved config in one pass
(block shapes, known keys, types and ranges); the spec name and the run names become folders, so they must be slugs
(``SLUG_RULE``).
"""

from __future__ import annotations

import copy
import itertools
import math
import numbers
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn

import yaml

from repsim.types import SCENARIOS, check_slug

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
        "steps": None,  # an optimiser-step budget: replaces epochs (the last epoch stops part-way); equal budgets
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
        "test_at_best": False,  # test metric of each new best checkpoint in metrics.jsonl (budget curves)
        "extend_lr_grid": False,  # a chosen LR on an edge of lr_grid: search one more grid step beyond it (twice)
        "channels_last": "auto",  # NHWC memory format; auto: on for a network with 2-d BatchNorm (a convnet)
    },
    "knn": {"k": 200, "temperature": 0.1, "batch_size": 256},
}

KINDS = ("train", "knn")
BLOCKS = ("data", "model", "train", "knn")
_SCIENTIFIC = re.compile(r"[-+]?\d*\.?\d+[eE][-+]?\d+")


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
        if item.startswith("-"):
            raise ValueError(f"{item!r} is not a KEY=VALUE override (an unknown option?)")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} is not key=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ValueError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(err)})") from None
        # YAML 1.1 reads "1e-3" as a string; numbers in scientific notation are what users mean here.
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value):
            value = float(value)
        out[key.strip()] = value
    return out


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error on one line: what is wrong and where (line and column), without the parser's source name."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


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
    """A spec as a dict (from a mapping, a YAML file or a packaged spec name). A file is checked at once (every grid
    point, except for required keys that overrides may still supply), so its errors name it."""
    if isinstance(spec, Mapping):
        return copy.deepcopy(dict(spec))
    path = spec_path(spec)
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {_yaml_problem(err)}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: a spec must be a YAML mapping, got {type(doc).__name__}")
    doc.setdefault("name", path.stem)
    try:
        _points(doc, {}, require=False)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
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


def _points(spec: Mapping[str, Any], overrides: Mapping[str, Any], *,
            require: bool = True) -> list[tuple[dict[str, str], dict[str, Any]]]:
    """``(labels per grid axis, validated config)`` of every grid combination of ``spec`` with ``overrides``."""
    spec = dict(spec)
    grids = _grids(spec.pop("grid", None))
    base = deep_merge(DEFAULTS, spec)
    validate(base, overrides=(), require=False)  # the blocks are mappings before grid values are merged into them
    points = []
    for grid in grids:
        axes = {k: ([overrides[k]] if k in overrides else v) for k, v in grid.items()}
        for combo in itertools.product(*axes.values()):
            cfg = copy.deepcopy(base)
            for key, value in zip(axes, combo):
                set_dotted(cfg, key, value, merge=True)
            for key, value in overrides.items():
                set_dotted(cfg, key, value)
            validate(cfg, overrides=overrides, require=require)
            labels = {k: _label(k, v) for k, v in zip(axes, combo)}
            for key, label in labels.items():
                origin = f"override {key}" if key in overrides else f"grid axis {key}"
                check_slug(label, f"{origin}: run name part")
            points.append((labels, cfg))
    return points


def expand(spec: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """Resolved ``(run name, config)`` for every grid combination of ``spec`` with ``overrides`` applied.

    ``grid`` may be a list of grids (their union: e.g. baselines with one head, foundation models with two). A run
    is named by its values on all axes of its grid (stable when an override collapses an axis); duplicates are
    dropped. Every name is a slug (``SLUG_RULE``): it becomes a folder under the output folder.
    """
    runs: dict[str, dict[str, Any]] = {}
    for labels, cfg in _points(spec, dict(overrides or {})):
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


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


# dotted key -> (check, what the value must be); None is allowed where the rule says "or null"
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "data.img_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "data.split_seed": (_is_int, "an integer"),
    "model.pretrained": (lambda v: isinstance(v, bool), "true or false"),
    "model.kwargs": (lambda v: v is None or isinstance(v, Mapping), "a mapping"),
    "model.classifier": (lambda v: v is None or isinstance(v, Mapping), "a mapping"),
    "model.checkpoint": (lambda v: v is None or isinstance(v, str), "a file path or null"),
    "model.freeze_blocks": (lambda v: v is None or (_is_int(v) and v >= 0), "an integer >= 0 or null"),
    "model.decapitate": (lambda v: v is None or (_is_int(v) and v >= 1), "an integer >= 1 or null"),
    "train.epochs": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "train.steps": (lambda v: v is None or (_is_int(v) and v >= 1), "an integer >= 1 or null"),
    "train.batch_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "train.eval_batch_size": (lambda v: v is None or (_is_int(v) and v >= 1), "an integer >= 1 or null"),
    "train.lr": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "train.lr_grid": (lambda v: v is None or (isinstance(v, list) and len(v) > 0
                                             and all(_is_number(x) and x > 0 for x in v)),
                      "a non-empty list of numbers > 0, or null"),
    "train.seed": (_is_int, "an integer"),
    "train.seeds": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "train.weight_decay": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "train.warmup_epochs": (lambda v: v is None or (_is_number(v) and v >= 0), "a number >= 0 or null"),
    "train.warmup_iters": (lambda v: v is None or (_is_int(v) and v >= 0), "an integer >= 0 or null"),
    "train.patience": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "train.max_plateaus": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "train.grad_clip": (lambda v: v is None or (_is_number(v) and v >= 0), "a number >= 0 or null"),
    "train.amp": (lambda v: isinstance(v, bool), "true or false"),
    "train.num_workers": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "train.device": (lambda v: isinstance(v, str), "a device name"),
    "train.metric": (lambda v: v is None or isinstance(v, str), "a metric name or null"),
    "train.cache_frozen": (lambda v: isinstance(v, bool), "true or false"),
    "train.test_at_best": (lambda v: isinstance(v, bool), "true or false"),
    "train.extend_lr_grid": (lambda v: isinstance(v, bool), "true or false"),
    "train.channels_last": (lambda v: v in (True, False, "auto"), "true, false or auto"),
    "knn.k": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "knn.temperature": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "knn.batch_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
}


def validate(cfg: Mapping[str, Any], *, overrides: Collection[str] = (), require: bool = True) -> None:
    """Raise a one-line ``ValueError`` naming the key and value of the first thing wrong in a resolved config: block
    shapes, unknown keys, types and ranges, output names. A key set by one of ``overrides`` is reported as that
    override's. ``require=False`` skips the keys a spec may leave to overrides (``model.name``, ``data.dataset``)."""

    def fail(key: str, text: str) -> NoReturn:
        origin = next((k for k in overrides if key == k or key.startswith(k + ".") or k.startswith(key + ".")),
                      None)
        raise ValueError(f"override {origin}: {text}" if origin else text)

    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        fail(unknown[0], f"unknown spec keys {unknown}; expected {sorted(DEFAULTS)} and grid")
    for block in BLOCKS:
        if not isinstance(cfg[block], Mapping):
            fail(block, f"spec key {block!r} must be a mapping, got {type(cfg[block]).__name__}")
    if cfg["kind"] not in KINDS:
        fail("kind", f"kind must be one of {KINDS}, got {cfg['kind']!r}")
    try:
        check_slug(cfg["name"], "spec name")
    except ValueError as err:
        fail("name", str(err))
    for block in ("model", "train", "knn"):
        unknown = sorted(set(cfg[block]) - set(DEFAULTS[block]))
        if unknown:
            fail(f"{block}.{unknown[0]}", f"unknown {block} keys {unknown}; expected {sorted(DEFAULTS[block])}")
    for key, what in (("model.name", "a model name"), ("data.dataset", "a dataset name")):
        block, leaf = key.split(".")
        value = cfg[block].get(leaf)
        if value is None and require:
            fail(key, f"{key} is required")
        if value is not None and not (isinstance(value, str) and value):
            fail(key, f"{key} must be {what}, got {value!r}")
    if cfg["model"]["scenario"] not in SCENARIOS:
        fail("model.scenario",
             f"unknown scenario {cfg['model']['scenario']!r}; expected one of {', '.join(SCENARIOS)}")
    for key, (check, what) in _RULES.items():
        block, leaf = key.split(".")
        if leaf not in cfg[block]:
            continue
        value = cfg[block][leaf]
        if not check(value):
            hint = " (YAML reads 1e-3 as text: write 1.0e-3)" if isinstance(value, str) and \
                _SCIENTIFIC.fullmatch(value) else ""
            fail(key, f"{key} must be {what}, got {value!r}{hint}")
