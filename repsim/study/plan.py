"""The study as one plan of trainer experiments: each experiment's resolved trainer config, its folder and what it
waits for (``plan(ws)``), for the scheduler to run."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from repsim.study.results import Place
from repsim.study.scheduler import Experiment
from repsim.study.settings import Start
from repsim.study.workspace import Workspace
from repsim.train.config import expand
from repsim.types import STACKED

# training-set sizes, only to submit the longest experiments first
_SIZE_HINT = {"pneumoniamnist": 4708, "retinamnist": 1080, "breastmnist": 546}


def resolved_config(data: Mapping[str, Any], model: Mapping[str, Any], train: Mapping[str, Any],
                    kind: str = "train", knn: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One trainer config with the defaults filled in and validated (``repsim.train.config.expand``)."""
    spec = {"name": "study", "kind": kind, "data": dict(data), "model": dict(model), "train": dict(train)}
    if knn:
        spec["knn"] = dict(knn)
    ((_, cfg),) = expand(spec)
    return cfg


def model_block(ws: Workspace, scenario: str, weights: Mapping[str, Any], model: str | None = None,
                **extra: Any) -> dict[str, Any]:
    """The trainer ``model`` block: the study's backbone (or ``model``) with ``weights`` in ``scenario``."""
    s = ws.settings
    return {"name": model or s.model, "kwargs": dict(s.model_kwargs) if model is None else {}, **weights,
            "scenario": scenario, "classifier": dict(s.classifier) if scenario in STACKED else {}, **extra}


def train_block(ws: Workspace, target: str, scenario: str, **updates: Any) -> dict[str, Any]:
    """The trainer ``train`` block of ``target`` in ``scenario`` (the frozen and per-target updates applied)."""
    s = ws.settings
    frozen = s.frozen_train if scenario.startswith("frozen-") else {}
    return {**s.train, **s.target_train.get(target, {}), **frozen, "device": ws.device, **updates}


def _experiment(ws: Workspace, place: Place, weights: Mapping[str, Any], *, model: str | None = None,
                model_extra: Mapping[str, Any] | None = None, train: Mapping[str, Any] | None = None,
                **kw: Any) -> Experiment:
    target, scenario = place.target, place.scenario
    cfg = resolved_config(ws.data_block(target), model_block(ws, scenario, weights, model, **(model_extra or {})),
                          train_block(ws, target, scenario, **(train or {})))
    tc = cfg["train"]
    cached = scenario.startswith("frozen-") and tc["cache_frozen"]
    runs = len(tc["lr_grid"] or [0]) + int(tc["seeds"])
    images = tc["steps"] * tc["batch_size"] if tc["steps"] else _SIZE_HINT.get(target, 1000) * tc["epochs"]
    cost = images * runs * (0.02 if cached else 1.0)
    return Experiment(place, cfg, ws.folder(place), cost=cost, **kw)


def _knn(ws: Workspace, place: Place, weights: Mapping[str, Any], model: str | None = None,
         after: tuple[Place, ...] = ()) -> Experiment:
    target = place.target
    cfg = resolved_config(ws.data_block(target), model_block(ws, "frozen-linear", weights, model),
                          train_block(ws, target, "frozen-linear"), kind="knn", knn=ws.settings.knn)
    return Experiment(place, cfg, ws.folder(place), kind="knn", after=after, cost=_SIZE_HINT.get(target, 1000) * 0.1)


def _ssl(ws: Workspace, start: Start, target: str) -> Experiment:
    """Self-supervised pretraining of ``start`` on ``target``'s train split (``repsim pretrain``, the study's
    ``ssl`` config; from the library's weights when ``start.continued``)."""
    from repsim.train.ssl import resolve_config

    s = ws.settings
    cfg = copy.deepcopy(dict(s.ssl))
    if start.method:
        cfg["method"] = start.method
    cfg["data"] = {**cfg.get("data", {}), **ws.data_block(target)}
    cfg["model"] = {**cfg.get("model", {}), "name": s.model, "kwargs": dict(s.model_kwargs),
                    "pretrained": start.continued, "checkpoint": None}
    cfg.setdefault("train", {})["device"] = ws.device
    return Experiment(Place("ssl", start.name, target), resolve_config(cfg), ws.ssl_folder(start, target),
                      kind="pretrain", cost=float("inf"), first=True)  # what waits for it is the longest path


def plan(ws: Workspace) -> list[Experiment]:
    """Every trainer experiment of the study, with what each waits for."""
    s, exps = ws.settings, []
    for source in dict.fromkeys(st.source for st in s.starts if st.kind == "source"):
        assert source is not None
        place = Place("pretrain", source)
        cfg = resolved_config(ws.data_block(source), model_block(ws, "unfrozen-linear", {
            "pretrained": False, "checkpoint": None}), {**s.pretrain, "device": ws.device, "seeds": 1,
                                                       "lr_grid": None})
        exps.append(Experiment(place, cfg, ws.folder(place), cost=float("inf"), first=True))
    for st in s.starts:
        if st.kind == "ssl":
            exps += [_ssl(ws, st, t) for t in st.targets or s.targets]

    def needs(st: Start, target: str) -> tuple[Place, ...]:
        """The experiment that makes ``st``'s weights for ``target`` (none for weights that exist already)."""
        return ((Place("pretrain", st.source or ""),) if st.kind == "source" else
                (Place("ssl", st.name, target),) if st.kind == "ssl" else ())

    primary = {(name, t, sc) for a, b, sc in s.primaries for name in (a, b) for t in s.targets}
    for st, t, sc in s.experiments():  # the primary comparisons' experiments (and their pretraining) run first
        exps.append(_experiment(ws, Place("finetune", st.name, t, sc), ws.start_weights(st, t), after=needs(st, t),
                                first=(st.name, t, sc) in primary))
    for st in s.starts:
        for t in st.targets or s.targets:
            exps.append(_knn(ws, Place("knn", st.name, t), ws.start_weights(st, t), after=needs(st, t)))
    pretrained = {"pretrained": True, "checkpoint": None}
    for m in s.sizes:
        for t in s.targets:
            exps.append(_knn(ws, Place("sizes", m, t, "knn"), pretrained, m))
            exps += [_experiment(ws, Place("sizes", m, t, sc), pretrained, model=m) for sc in s.size_scenarios]
    curve = {"seeds": s.curve_seeds, "lr_grid": None}
    freeze = range(ws.depth + 1) if s.freeze_blocks is None else s.freeze_blocks
    for name in s.curve_starts("freezing") if s.freeze_blocks != [] else ():
        st = s.start(name)
        for t in s.targets:
            exps += [_experiment(
                ws, Place("freezing", name, t, "unfrozen-linear", k), ws.start_weights(st, t),
                model_extra={"freeze_blocks": k}, train=curve, lr_from=Place("finetune", name, t, "unfrozen-linear"),
                after=needs(st, t)) for k in freeze if k != 0]
    decap = range(1, ws.depth + 1) if s.decapitate is None else s.decapitate
    for name in s.curve_starts("decapitation") if s.decapitate != [] else ():
        st = s.start(name)
        for t in s.targets:
            exps += [_experiment(
                ws, Place("decapitation", name, t, sc, k), ws.start_weights(st, t), model_extra={"decapitate": k},
                train=curve, lr_from=Place("finetune", name, t, sc), after=needs(st, t))
                for sc in s.decapitate_scenarios for k in decap if k != ws.depth]
    return exps


def curve_ends(ws: Workspace) -> dict[str, tuple[tuple[str, ...], tuple[str, ...], int]]:
    """Per curve the study draws: its starts, its scenarios and the k of its end point (a full fine-tuning run)."""
    s = ws.settings
    ends = {"freezing": (("unfrozen-linear",), 0, s.freeze_blocks),
            "decapitation": (s.decapitate_scenarios, ws.depth, s.decapitate)}
    return {curve: (s.curve_starts(curve), scenarios, end) for curve, (scenarios, end, points) in ends.items()
            if points != []}
