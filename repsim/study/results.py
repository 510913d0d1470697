"""The study's result structures and their helpers, numpy/xarray only: where each experiment sits (``Place``), which
CKA comparison a matrix is (``Comparison``), the scheduler's results grouped by start/target/scenario (``organise``)
and the numbers read off a CKA matrix (``same_block``, ``cka_summary``, Fig 7's curves ``diagonal_groups``).

This is the leaf of the study: tables and figures read these structures by their fields, never by parsing names.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xarray as xr

from repsim.matrices import diagonal_values
from repsim.types import Pooling

CURVES = ("freezing", "decapitation")
# the name of a curve point (its folder, its key in study.json): ``freeze_blocks<k>`` / ``decapitate<k>``
POINT_PREFIX = {"freezing": "freeze_blocks", "decapitation": "decapitate"}


@dataclass(frozen=True)
class Place:
    """Where an experiment sits in a study: its ``group`` (``pretrain``, ``finetune``, ``knn``, ``sizes``,
    ``freezing``, ``decapitation``), its ``start`` (the source for ``pretrain``, the model for ``sizes``), target,
    scenario (``"knn"`` for a size's k-NN) and curve ``point`` k. ``parts()`` is its folder under the study."""

    group: str
    start: str
    target: str = ""
    scenario: str = ""
    point: int | None = None

    def parts(self) -> tuple[str, ...]:
        """The folder names from the study's folder down to this experiment's."""
        scenario = (self.scenario,) if self.scenario and self.group != "freezing" else ()
        point = () if self.point is None else (f"{POINT_PREFIX[self.group]}{self.point}",)
        return tuple(p for p in (self.group, self.start, self.target) if p) + scenario + point

    def __str__(self) -> str:
        return "/".join(self.parts())


# The study's CKA feature, one definition: each block's output flattened per sample (tokens x channels, or
# channels x height x width), compared with the unbiased minibatch CKA. Every matrix, table heading and caption says it.
CKA_POOL: Pooling = "flatten"
CKA_FEATURE = "flattened stage outputs"


@dataclass(frozen=True)
class Comparison:
    """One CKA matrix of a target (blocks of the study's backbone unless said): ``figure`` ``fig7`` (a start's blocks
    before vs after fine-tuning, one seed), ``adabn`` (the same with the start's BatchNorm statistics re-estimated on
    the target's train images first), ``spread`` (two seeds of a start after fine-tuning: the seed spread), ``floor``
    (two random initialisations of the architecture), ``figA1`` (a start's stacked classifier in ``scenario``) or
    ``fig8`` (the last block across backbones). ``seeds``: the fine-tuning seed(s), or the two init seeds of the
    floor."""

    figure: str
    start: str = ""
    scenario: str = ""
    seeds: tuple[int, ...] = ()

    def __str__(self) -> str:
        if self.figure == "floor":
            return f"floor/init{self.seeds[0]}-{self.seeds[1]}"
        if self.figure in ("fig7", "adabn", "spread"):
            return f"{self.figure}/{self.start}/seed{'-'.join(map(str, self.seeds))}"
        if self.figure == "figA1":
            return f"figA1/{self.start}/{self.scenario}"
        return self.figure

    def file_stem(self) -> str:
        """The name of its netCDF file under ``cka/<target>/``."""
        return "fig8_last_block" if self.figure == "fig8" else str(self).replace("/", "_")


Matrices = Mapping[Comparison, xr.Dataset]


@dataclass
class Results:
    """The study's trainer results: ``finetune[start][target][scenario]``, ``knn[start][target]``,
    ``sizes[model][target][scenario|"knn"]``, ``curves[curve][start][target][scenario][k]`` (curve end points reuse
    the full runs, restricted to the curve's seeds), ``pretrain[source]``, ``ssl[start][target]`` (a
    self-supervised run's summary, or ``{"collapsed": reason}``) and ``skipped[experiment]`` (the reason: its start
    collapsed)."""

    finetune: dict[str, Any] = field(default_factory=dict)
    knn: dict[str, Any] = field(default_factory=dict)
    sizes: dict[str, Any] = field(default_factory=dict)
    curves: dict[str, Any] = field(default_factory=dict)
    pretrain: dict[str, Any] = field(default_factory=dict)
    ssl: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """The results as ``study.json`` holds them (curve points named ``freeze_blocks<k>`` / ``decapitate<k>``)."""
        curves = {curve: {st: {t: {sc: {f"{POINT_PREFIX[curve]}{k}": r for k, r in points.items()}
                                   for sc, points in by_sc.items()} for t, by_sc in by_t.items()}
                          for st, by_t in by_start.items()} for curve, by_start in self.curves.items()}
        return {"finetune": self.finetune, "knn": self.knn, "sizes": self.sizes, "curves": curves,
                "pretrain": self.pretrain, "ssl": self.ssl, "skipped": self.skipped}


def _nest(target: dict, keys: Sequence[Any], value: Any) -> None:
    for k in keys[:-1]:
        target = target.setdefault(k, {})
    target[keys[-1]] = value


def first_seeds(res: Mapping[str, Any], n: int) -> dict[str, Any]:
    """``res`` with its test statistics recomputed over its first ``n`` seeds (curve points reusing a full run)."""
    out = copy.deepcopy(dict(res))
    for stat in out["test"].values():
        values = stat["values"][:n]
        stat.update(values=values, mean=float(np.mean(values)), std=float(np.std(values, ddof=1)) if n > 1 else 0.0)
    out["seeds"] = out.get("seeds", [0])[:n]
    return out


def organise(results: Mapping[Place, dict[str, Any]], experiments: Sequence[tuple[str, str, str]],
             curve_ends: Mapping[str, tuple[Sequence[str], Sequence[str], int]], curve_seeds: int) -> Results:
    """Scheduler results as ``Results``. ``experiments``: the fine-tuned (start, target, scenario) in settings
    order; ``curve_ends[curve]``: (its starts, its scenarios, the k of its end point, a full run), per curve drawn."""
    out = Results()
    targets = list(dict.fromkeys(t for _, t, _ in experiments))
    for place, res in results.items():
        if "skipped" in res:
            out.skipped[str(place)] = res["skipped"]
        elif place.group == "ssl":
            _nest(out.ssl, [place.start, place.target], res)
        elif place.group in CURVES:
            _nest(out.curves, [place.group, place.start, place.target, place.scenario, place.point], res)
        elif place.group == "pretrain":
            out.pretrain[place.start] = res
        elif place.group == "knn":
            _nest(out.knn, [place.start, place.target], res)
        else:
            _nest(getattr(out, place.group), [place.start, place.target, place.scenario], res)
    order = {k: i for i, k in enumerate(experiments)}
    ft = sorted(((st, t, sc, r) for st, by_t in out.finetune.items() for t, by_sc in by_t.items()
                 for sc, r in by_sc.items()), key=lambda x: order.get(x[:3], len(order)))
    out.finetune = {}
    for st, t, sc, r in ft:
        _nest(out.finetune, [st, t, sc], r)
    for curve, (starts, scenarios, end) in curve_ends.items():
        for start in starts:
            for target in targets:
                for sc in scenarios:
                    points = out.curves.setdefault(curve, {}).setdefault(start, {}).setdefault(target, {})
                    full = out.finetune.get(start, {}).get(target, {}).get(sc)
                    if full is None:
                        continue  # skipped: its start collapsed
                    points = points.setdefault(sc, {})
                    points[end] = full
                    for k in points:
                        points[k] = first_seeds(points[k], curve_seeds)
    return out


def same_block(ds: xr.Dataset) -> dict[str, list[float]]:
    """CKA(block k of a, block k of b) with its bootstrap CI: ``{"cka", "lower", "upper"}`` lists over k."""
    return {v: [float(x) for x in diagonal_values(ds, v)] for v in ("cka", "lower", "upper") if v in ds}


def cka_summary(ds: xr.Dataset) -> dict[str, Any]:
    """JSON numbers of a CKA result: its feature (``pool``), the matrix, its diagonal with CIs, the mean CI width, the
    early/late means."""
    out: dict[str, Any] = {"pool": ds.attrs.get("pool"), "layers_a": [str(x) for x in ds["layer_a"].values],
                           "layers_b": [str(x) for x in ds["layer_b"].values],
                           "cka": np.round(ds["cka"].values, 4).tolist()}
    if "lower" in ds and ds.sizes["layer_a"] == ds.sizes["layer_b"]:
        d = same_block(ds)
        half = len(d["cka"]) // 2
        out.update(diagonal=d, mean_ci_width=float((ds["upper"] - ds["lower"]).mean()),
                   early_mean=float(np.mean(d["cka"][:max(half, 1)])), late_mean=float(np.mean(d["cka"][half:])))
    return out


# Fig 7's curves per start, in drawing order: what each compares (the label) and its line style
FIG7_CURVES = {"fig7": "before vs after", "adabn": "AdaBN-before vs after", "spread": "seed spread (after vs after)"}
FLOOR = "floor (random init vs random init)"


@dataclass(frozen=True)
class Curve:
    """One same-block CKA curve of Fig 7 over blocks: ``figure`` (``fig7``, ``adabn``, ``spread`` or ``floor``) of
    ``start`` ("" for the floor), the mean over its ``n`` matrices and a band: the min–max over them when there are
    several, else the one matrix's 95% bootstrap CI over batches; ``band`` says which."""

    figure: str
    start: str
    n: int
    mean: list[float]
    lower: list[float]
    upper: list[float]
    band: str

    @property
    def label(self) -> str:
        """What the curve compares, its count and its band, e.g. ``scratch: before vs after (3 seeds; band: min–max
        over seeds)``."""
        what = FLOOR if self.figure == "floor" else f"{self.start}: {FIG7_CURVES[self.figure]}"
        unit = "pair" if self.figure in ("floor", "spread") else "seed"
        return f"{what} ({self.n} {unit}{'s' * (self.n > 1)}; band: {self.band})"


def diagonal_groups(mats: Matrices) -> list[Curve]:
    """Fig 7's curves of one target: the floor, then per start before vs after, AdaBN-before vs after and the seed
    spread, each the mean over its seeds (or pairs) with its band (``Curve``)."""
    groups: dict[tuple[str, str], list[dict[str, list[float]]]] = {}
    for c, ds in mats.items():
        if c.figure in ("floor", *FIG7_CURVES):
            groups.setdefault((c.figure, c.start), []).append(same_block(ds))
    order = {f: i for i, f in enumerate(("floor", *FIG7_CURVES))}
    starts = list(dict.fromkeys(start for _, start in groups))
    out = []
    for (figure, start), rows in sorted(groups.items(), key=lambda kv: (kv[0][0] != "floor", starts.index(kv[0][1]),
                                                                         order[kv[0][0]])):
        cka = np.array([r["cka"] for r in rows])
        if len(rows) > 1:
            unit = "pairs" if figure in ("floor", "spread") else "seeds"
            lower, upper, band = cka.min(0).tolist(), cka.max(0).tolist(), f"min–max over {unit}"
        else:
            lower, upper, band = rows[0]["lower"], rows[0]["upper"], "95% bootstrap CI over batches"
        out.append(Curve(figure, start, len(rows), cka.mean(0).tolist(), lower, upper, band))
    return out
