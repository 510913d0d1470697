"""What a transfer study runs: its starts (ways to initialise the backbone), targets, scenarios and protocol, and the
named presets (``natural``, ``full``, ``paper``, ``tiny``; ``repsim demo`` builds its own settings in
``repsim.study.demo``)."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from repsim.data.named import NAMED
from repsim.types import SCENARIOS, check_slug

DATASETS = NAMED  # datasets a study can use by name (trainer data blocks, roots relative to the data root)
# Built-in synthetic tasks (repsim.data.synthetic), written once as image folders under <out>/data (random
# 80/10/10 split): the source has six texture classes, the target four of them drawn with another seed.
SYNTHETIC: dict[str, dict[str, int]] = {
    "synthetic-source": {"num_classes": 6, "seed": 1},
    "synthetic-target": {"num_classes": 4, "seed": 2},
}
PAPER_LR_GRID = [1.0e-5, 5.0e-5, 2.0e-4, 1.0e-3]  # 4 values in [1e-5, 1e-3], as the packaged table specs
START_KINDS = ("pretrained", "source", "ssl", "checkpoint", "scratch")


@dataclass(frozen=True)
class Start:
    """One way to initialise the backbone: the library's ``pretrained`` weights, supervised pretraining here on a
    ``source`` task, self-supervised pretraining (``ssl``, the study's ``ssl`` config) on each target's own train
    split -- from random init, or from the library's weights when ``continued`` -- a local ``checkpoint``, or
    ``scratch`` (random init). ``targets``/``scenarios`` restrict what this start is fine-tuned on (None: the
    study's)."""

    name: str
    kind: str
    source: str | None = None
    checkpoint: str | None = None
    targets: tuple[str, ...] | None = None
    scenarios: tuple[str, ...] | None = None
    continued: bool = False
    method: str | None = None  # an ssl start's method ("dino", "simclr"); None: the study's ssl config


@dataclass(frozen=True)
class Settings:
    """What a study runs.

    ``train``/``pretrain`` are trainer ``train`` blocks; ``frozen_train`` updates ``train`` for the frozen scenarios
    and ``target_train`` per target. ``classifier`` configures the stacked classifier. ``freeze_blocks`` /
    ``decapitate`` None mean ``0..depth`` / ``1..depth``; an empty list skips that curve. ``ssl`` is the
    ``repsim pretrain`` config of the ``ssl`` starts (data and model filled in per target). ``primaries``: the
    declared primary comparisons ``(start a, start b, scenario)``, a - b on every target (Holm-adjusted as one
    family; every other paired comparison is the secondary family). ``budget_points``: optimiser-step budgets at
    which ``budget_starts`` get the validation-selected test metric of their ``budget_scenario`` runs (read from the
    runs' ``test_at_best`` records: the plateau rule makes a run's first B steps those of a B-step run).
    ``sizes``: other models (with ``pretrained=True``) compared frozen (Fig 6). ``fig8_models``: extra pretrained
    models whose last block joins Fig 8. ``normalise="model"`` feeds every dataset with the backbone's own input
    normalisation (what its pretrained weights expect) instead of the dataset's statistics.
    """

    model: str = "vit_tiny_patch16_224"
    model_kwargs: dict[str, Any] = field(
        default_factory=lambda: {"patch_size": 4, "depth": 6, "embed_dim": 48, "num_heads": 2})
    img_size: int = 28
    normalise: str = "dataset"
    starts: tuple[Start, ...] = (Start("in-domain", "source", source="pneumoniamnist"),
                                 Start("scratch", "scratch", scenarios=("unfrozen-linear",)))
    targets: tuple[str, ...] = ("retinamnist", "breastmnist")
    scenarios: tuple[str, ...] = SCENARIOS
    classifier: dict[str, Any] = field(
        default_factory=lambda: {"model": "deit_tiny_patch16_224", "depth": 2, "embed_dim": 48, "num_heads": 2})
    pretrain: dict[str, Any] = field(default_factory=lambda: {
        "epochs": 6, "batch_size": 64, "lr": 1.0e-3, "warmup_epochs": 1, "patience": 2, "max_plateaus": 1,
        "weight_decay": 0.05, "num_workers": 0})
    train: dict[str, Any] = field(default_factory=lambda: {
        "epochs": 6, "batch_size": 64, "lr_grid": PAPER_LR_GRID, "seeds": 3, "warmup_epochs": 1, "patience": 2,
        "max_plateaus": 2, "num_workers": 0})
    frozen_train: dict[str, Any] = field(default_factory=dict)
    target_train: dict[str, dict[str, Any]] = field(default_factory=dict)
    target_scenarios: dict[str, tuple[str, ...]] = field(default_factory=dict)  # per target: only these scenarios
    freeze_blocks: list[int] | None = None
    freezing_starts: tuple[str, ...] | None = None  # starts that get the freezing curve (None: the first)
    decapitate: list[int] | None = None
    decapitation_starts: tuple[str, ...] | None = None  # starts that get the decapitation curve (None: the first)
    decapitate_scenarios: tuple[str, ...] = ("frozen-stacked",)
    curve_seeds: int = 1
    ssl: dict[str, Any] = field(default_factory=lambda: {"method": "dino", "train": {"epochs": 30, "num_workers": 0}})
    primaries: tuple[tuple[str, str, str], ...] = ()
    budget_points: tuple[int, ...] = ()
    budget_starts: tuple[str, ...] = ()
    budget_scenario: str = "unfrozen-linear"
    stat_boot: int = 2000  # bootstrap replicates of the paired intervals (seeds x test images)
    reference_pairs: int = 3  # random-init pairs for the CKA floor
    knn: dict[str, Any] = field(default_factory=lambda: {"k": 200, "temperature": 0.1, "batch_size": 256})
    sizes: tuple[str, ...] = ()
    size_scenarios: tuple[str, ...] = ("frozen-linear", "frozen-stacked")
    fig8_models: tuple[str, ...] = ()
    cka_batch_size: int = 32
    cka_seeds: int = 1  # fine-tuned seeds whose blocks are compared with their start (Fig 7)
    n_boot: int = 1000
    synthetic_samples: int = 2000  # images per built-in synthetic task

    # ----- derived
    def start(self, name: str) -> Start:
        """The start called ``name``."""
        for s in self.starts:
            if s.name == name:
                return s
        raise KeyError(f"no start {name!r}; the study has {[s.name for s in self.starts]}")

    def experiments(self) -> list[tuple[Start, str, str]]:
        """Every (start, target, scenario) the study fine-tunes, in settings order."""
        return [(s, t, sc) for s in self.starts for t in (s.targets or self.targets)
                for sc in (s.scenarios or self.scenarios) if sc in self.target_scenarios.get(t, SCENARIOS)]

    def curve_starts(self, curve: str) -> tuple[str, ...]:
        """The starts that get the ``"freezing"`` or ``"decapitation"`` curve."""
        chosen = self.freezing_starts if curve == "freezing" else self.decapitation_starts
        return chosen if chosen is not None else (self.starts[0].name,)

    def check(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent setting."""
        if not self.starts:
            raise ValueError("the study needs at least one start")
        names = [s.name for s in self.starts]
        if len(set(names)) != len(names):
            raise ValueError(f"start names must be unique, got {names}")
        known = [*DATASETS, *SYNTHETIC]
        for s in self.starts:
            check_slug(s.name, "start name")
            if s.kind not in START_KINDS:
                raise ValueError(f"start {s.name!r}: kind must be one of {START_KINDS}, got {s.kind!r}")
            if (s.kind == "source") != (s.source is not None):
                raise ValueError(f"start {s.name!r}: a source task goes with kind 'source' (and only with it)")
            if (s.kind == "checkpoint") != (s.checkpoint is not None):
                raise ValueError(f"start {s.name!r}: a checkpoint goes with kind 'checkpoint' (and only with it)")
            if s.method is not None and (s.kind != "ssl" or s.method not in ("dino", "simclr")):
                raise ValueError(f"start {s.name!r}: method {s.method!r} needs kind 'ssl' and one of dino, simclr")
            if s.continued and s.kind != "ssl":
                raise ValueError(f"start {s.name!r}: continued goes with kind 'ssl' (pretraining from the weights)")
            for name in ([s.source] if s.source else []) + list(s.targets or ()):
                if name not in known:
                    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(known)}")
            bad = [sc for sc in (s.scenarios or ()) if sc not in SCENARIOS]
            if bad:
                raise ValueError(f"start {s.name!r}: unknown scenarios {bad}; expected {', '.join(SCENARIOS)}")
        if not self.targets:
            raise ValueError("the study needs at least one target dataset")
        for name in self.targets:
            if name not in known:
                raise ValueError(f"unknown dataset {name!r}; known: {', '.join(known)}")
        bad = [s for s in (*self.scenarios, *self.decapitate_scenarios, *self.size_scenarios) if s not in SCENARIOS]
        if bad:
            raise ValueError(f"unknown scenarios {bad}; expected {', '.join(SCENARIOS)}")
        if self.normalise not in ("dataset", "model"):
            raise ValueError(f"normalise must be 'dataset' or 'model', got {self.normalise!r}")
        for curve, needed, points in (("freezing", ("unfrozen-linear",), self.freeze_blocks),
                                      ("decapitation", self.decapitate_scenarios, self.decapitate)):
            if points == []:
                continue
            for name in self.curve_starts(curve):
                if name not in names:
                    raise ValueError(f"{curve}_starts: {name!r} is not a start of the study ({names})")
                start = self.start(name)
                have = {(t, sc) for s, t, sc in self.experiments() if s == start}
                lacking = [(t, sc) for t in self.targets for sc in needed if (t, sc) not in have]
                if lacking or not needed:
                    raise ValueError(f"the {curve} curve of start {name!r} takes its LR from its full {needed} runs, "
                                     f"which the study does not run for {lacking}: add them (or set {curve} to [])")
        if not 1 <= self.curve_seeds <= int(self.train.get("seeds", 1)):
            raise ValueError(f"curve_seeds must be in 1..train.seeds, got {self.curve_seeds}")
        if not 1 <= self.cka_seeds <= int(self.train.get("seeds", 1)):
            raise ValueError(f"cka_seeds must be in 1..train.seeds, got {self.cka_seeds}")
        for a, b, sc in self.primaries:
            if a not in names or b not in names or sc not in SCENARIOS:
                raise ValueError(f"primary comparison {(a, b, sc)}: starts must be in {names}, the scenario in "
                                 f"{SCENARIOS}")
        for name in self.budget_starts:
            if name not in names:
                raise ValueError(f"budget_starts: {name!r} is not a start of the study ({names})")
        if self.budget_points and int(self.train.get("steps") or 0) < max(self.budget_points):
            raise ValueError(f"budget_points {list(self.budget_points)} need train.steps >= {max(self.budget_points)}")
        if self.reference_pairs < 0:
            raise ValueError(f"reference_pairs must be >= 0 (random-init pairs of the CKA floor), got "
                             f"{self.reference_pairs}")
        if self.cka_batch_size < 4:
            raise ValueError(f"cka_batch_size must be >= 4 (unbiased HSIC), got {self.cka_batch_size}")



PRESETS: dict[str, Settings] = {
    # The paper's question (and its Appendix B) on real data, offline on 2 CPU cores: EfficientNet-Lite0 at 48 px
    # from real ImageNet weights (natural domain), from DINO on the target's own train split (in-domain SSL, the
    # paper's method), from SimCLR on it (a second in-domain SSL start, steadier at small batch: natural-short's DINO
    # drifted towards a uniform teacher; same scenarios as DINO, its comparisons secondary -- the primaries were
    # declared with DINO and stay so), and from scratch, transferred to RetinaMNIST and BreastMNIST; every start
    # and scenario of a target gets the same 800 optimiser steps of batch 32 (plateau rule: LR / 10 after ~100 steps
    # without a better validation value), an LR grid one step higher than natural-short's (whose chosen LRs sat on
    # its top edge) and extended past an edge, 5 seeds, test-set bootstrap intervals with declared primaries and
    # Holm, the budget curve (100-800 steps, the points) and CKA references. Batch 32 rather than 64: twice
    # the optimiser steps for the same compute (natural-short's 300 steps of 64 left 34 % of runs still improving).
    # Sized from natural-short's rates (~80 img/s per one-thread job, 2 jobs): at most ~4 h on 2 quiet cores, less
    # where the plateau rule ends runs early. Cuts, in the order (figures/README.md): no ImageNet -> SSL
    # start, unfrozen-stacked only from ImageNet, no freezing curve.
    "natural": Settings(
        model="efficientnet_lite0", model_kwargs={}, img_size=48, normalise="model",
        starts=(Start("imagenet", "pretrained"),
                Start("ssl", "ssl", scenarios=("frozen-linear", "frozen-stacked", "unfrozen-linear")),
                Start("ssl-simclr", "ssl", method="simclr",
                      scenarios=("frozen-linear", "frozen-stacked", "unfrozen-linear")),
                Start("scratch", "scratch", scenarios=("frozen-linear", "frozen-stacked", "unfrozen-linear"))),
        classifier={"model": "deit_tiny_patch16_224", "depth": 2, "embed_dim": 192, "num_heads": 3, "max_grid": 8},
        ssl={"method": "dino", "train": {"epochs": 30, "batch_size": 32, "num_workers": 0}},
        train={"steps": 800, "batch_size": 32, "lr_grid": [3.0e-4, 1.0e-3, 3.0e-3], "seeds": 5, "warmup_iters": 80,
               "patience": 3, "max_plateaus": 3, "num_workers": 0, "cache_frozen": True, "test_at_best": True,
               "extend_lr_grid": True},
        target_train={"breastmnist": {"patience": 6}},  # 17 steps per epoch there, 34 on RetinaMNIST
        primaries=(("imagenet", "scratch", "frozen-linear"), ("imagenet", "scratch", "unfrozen-linear"),
                   ("ssl", "imagenet", "frozen-linear"), ("ssl", "imagenet", "unfrozen-linear")),
        budget_points=(100, 200, 400, 800), budget_starts=("imagenet", "scratch"), freeze_blocks=[],
        decapitation_starts=("imagenet", "ssl", "ssl-simclr", "scratch"), curve_seeds=3,
        sizes=("efficientnet_lite1", "efficientnet_lite2"), fig8_models=("mobilenetv2_imagenet",),
        cka_seeds=5, cka_batch_size=32),
    # What one 3-hour working session on 2 CPU cores (shared with development) could run of the natural preset
    # (figures/README.md): its design on BreastMNIST only, with the cuts in order -- no ImageNet -> SSL start,
    # no stacked scenarios, no curves or sizes -- 300 optimiser steps (35 epochs) and DINO for 15 epochs; SimCLR as
    # a second in-domain SSL start, frozen only (DINO from scratch drifts towards a uniform teacher here). Never cut:
    # the SSL start, equal budgets, 5 seeds.
    "natural-short": Settings(
        model="efficientnet_lite0", model_kwargs={}, img_size=48, normalise="model",
        starts=(Start("imagenet", "pretrained"), Start("ssl", "ssl"),
                Start("ssl-simclr", "ssl", method="simclr", scenarios=("frozen-linear",)), Start("scratch", "scratch")),
        targets=("breastmnist",), scenarios=("frozen-linear", "unfrozen-linear"),
        ssl={"method": "dino", "train": {"epochs": 15, "batch_size": 32, "num_workers": 0}},
        train={"steps": 300, "batch_size": 64, "lr_grid": [1.0e-4, 3.0e-4, 1.0e-3], "seeds": 5, "warmup_iters": 50,
               "patience": 5, "max_plateaus": 3, "num_workers": 0, "cache_frozen": True, "test_at_best": True,
               "extend_lr_grid": True},
        target_train={"breastmnist": {"patience": 10}},
        primaries=(("imagenet", "scratch", "frozen-linear"), ("imagenet", "scratch", "unfrozen-linear"),
                   ("ssl", "imagenet", "frozen-linear"), ("ssl", "imagenet", "unfrozen-linear")),
        budget_points=(50, 100, 200, 300), budget_starts=("imagenet", "scratch"), freeze_blocks=[], decapitate=[],
        fig8_models=("mobilenetv2_imagenet",), cka_seeds=3, cka_batch_size=32),
    # the earlier offline study: a small ViT pretrained on PneumoniaMNIST vs from scratch (about half an hour)
    "full": Settings(),
    # the paper's study on a GPU: real foundation weights (give model=...), the four paper datasets, the DeiT-B
    # classifier with ImageNet weights, 100 epochs, 5 seeds, both stacked scenarios decapitated
    "paper": Settings(
        model="dinov2_vitb14", model_kwargs={}, img_size=224, starts=(Start("pretrained", "pretrained"),),
        targets=("aptos2019", "cbis_ddsm", "isic2019", "chexpert"),
        classifier={"model": "deit_base_patch16_224", "pretrained": True},
        train={"epochs": 100, "batch_size": 64, "lr_grid": PAPER_LR_GRID, "seeds": 5, "num_workers": 8},
        decapitate_scenarios=("frozen-stacked", "unfrozen-stacked"), curve_seeds=5, cka_batch_size=64),
    # a smoke test of every stage (the tests run it on a few dozen images per split)
    "tiny": Settings(
        model_kwargs={"patch_size": 7, "depth": 2, "embed_dim": 32, "num_heads": 2},
        starts=(Start("in-domain", "source", source="pneumoniamnist"), Start("scratch", "scratch")),
        classifier={"model": "deit_tiny_patch16_224", "depth": 1, "embed_dim": 32, "num_heads": 2},
        pretrain={**Settings().pretrain, "epochs": 1, "batch_size": 16},
        train={**Settings().train, "epochs": 1, "batch_size": 16, "lr_grid": [1.0e-3, 1.0e-4], "seeds": 2,
               "cache_frozen": True},
        frozen_train={"epochs": 3}, decapitation_starts=("in-domain", "scratch"), curve_seeds=2, cka_seeds=2,
        knn={"k": 10, "temperature": 0.1, "batch_size": 64}, cka_batch_size=8, n_boot=20),
}


def settings_with(settings: Settings, overrides: Sequence[str] | Mapping[str, Any]) -> Settings:
    """``settings`` with ``overrides`` applied: ``"field=value"`` strings (values parsed as YAML) or a mapping;
    dotted keys (``train.epochs``) update a dict field; lists become tuples where the field is a tuple."""
    from repsim.train.config import parse_overrides, set_dotted

    parsed = dict(overrides) if isinstance(overrides, Mapping) else parse_overrides(overrides)
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    changes: dict[str, Any] = {}
    for key, value in parsed.items():
        top, _, rest = key.partition(".")
        if top not in fields:
            raise ValueError(f"unknown study setting {top!r}; settings: {', '.join(fields)}")
        if top == "starts":
            raise ValueError("starts cannot be overridden as key=value; build Settings(starts=...) in Python")
        current = changes.get(top, getattr(settings, top))
        if rest:
            if not isinstance(current, dict):
                raise ValueError(f"{top} is not a mapping, so {key!r} cannot set a key inside it")
            current = copy.deepcopy(current)
            set_dotted(current, rest, value)
            value = current
        elif isinstance(current, tuple) and isinstance(value, list):
            value = tuple(value)
        changes[top] = value
    return dataclasses.replace(settings, **changes)
