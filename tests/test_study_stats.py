"""The study's statistics and reports on synthetic predictions and fake run folders (no model is trained): the
vectorised resampled metrics against repsim.metrics, the hierarchical paired bootstrap against a slow reference
written from its definition, Holm, the comparison families, the still-improving rule, the budget curve and clock
readers, and the tables, figures and study.json they feed."""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from repsim import metrics as m
from repsim.study import Settings, Start
from repsim.study.bootstrap import RESAMPLED, hierarchical, resampled_metric
from repsim.study.clock import budget_curve, stage_clock
from repsim.study.results import Place, Results
from repsim.study.stats import comparisons, families, holm, paired_bootstrap, run_flags, spread
from repsim.train.runs import RunFiles, run_dir


def _reference(metric: str, probs: np.ndarray, targets: np.ndarray) -> float:
    """repsim.metrics' value, as ``compute_metrics`` defines it (NaN where it is undefined, its warning silenced)."""
    binary = probs.shape[1] == 2
    fn = {"auc": m.auc_binary if binary else m.auc_multiclass, "kappa": m.quadratic_kappa, "accuracy": m.accuracy,
          "balanced_accuracy": m.balanced_accuracy, "auc_ovr": lambda y, p: m.auc_multiclass(y, p, "ovr")}[metric]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", m.MetricWarning)
        return fn(targets, probs)


def _probs(rng: np.random.Generator, n: int, k: int, decimals: int | None = None) -> np.ndarray:
    logits = rng.normal(size=(n, k))
    p = np.exp(logits if decimals is None else np.round(logits, decimals))  # rounded: many tied scores
    return p / p.sum(1, keepdims=True)


@pytest.mark.parametrize("classes", [2, 3, 5])
def test_resampled_metrics_match_repsim_metrics_on_random_and_adversarial_draws(classes: int) -> None:
    rng = np.random.default_rng(classes)
    metrics = [m for m in RESAMPLED if classes > 2 or m != "auc_ovr"]
    cases = []
    for trial in range(8):
        n = int(rng.integers(6, 40))
        y = rng.integers(0, classes, n)
        cases.append((_probs(rng, n, classes, decimals=0 if trial % 3 == 0 else None), y))
    y = np.arange(12) % classes
    cases += [(np.full((12, classes), 1.0 / classes), y),  # every score tied
              (np.eye(classes)[y], y),  # perfect
              (np.eye(classes)[(y + 1) % classes], y)]  # always wrong
    undefined = 0
    for probs, y in cases:
        n = len(y)
        draws = rng.integers(0, n, (4, n))
        draws[0] = np.flatnonzero(y == y[0])[0]  # one class only: AUC and κ undefined
        counts = np.stack([np.bincount(d, minlength=n) for d in draws]).astype(float)
        for metric in metrics:
            got = resampled_metric(metric, probs, y, counts)
            want = np.array([_reference(metric, probs[d], y[d]) for d in draws])
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-12, equal_nan=True, err_msg=metric)
            undefined += int(np.isnan(got).sum())
            assert resampled_metric(metric, probs, y, np.ones(n))[0] == pytest.approx(
                _reference(metric, probs, y), abs=1e-12, nan_ok=True)
    assert undefined > 0  # the single-class draws were NaN, as in repsim.metrics


def test_unsupported_metric_is_named() -> None:
    with pytest.raises(ValueError, match="not 'auc_mean5'.*train.metric"):
        resampled_metric("auc_mean5", np.full((4, 2), 0.5), np.array([0, 1, 0, 1]), np.ones(4))


def _groups(rng: np.random.Generator, n: int, classes: int, seeds: int, shift: float = 0.0
            ) -> tuple[np.ndarray, list[list[tuple[np.ndarray, np.ndarray]]]]:
    y = rng.integers(0, classes, n)
    groups = []
    for g in range(2):
        runs = []
        for _ in range(seeds):
            logits = rng.normal(size=(n, classes)) + (2.0 + shift * (g == 0)) * np.eye(classes)[y]
            p = np.exp(logits)
            runs.append((p / p.sum(1, keepdims=True), y))
        groups.append(runs)
    return y, groups


@pytest.mark.parametrize("metric,classes,n", [("auc", 2, 30), ("kappa", 5, 40), ("auc", 3, 9)])
def test_hierarchical_bootstrap_matches_a_slow_reference(metric: str, classes: int, n: int) -> None:
    """Same draws, metric per resampled run by repsim.metrics, seed-mean, a - b: the replicates, the interval, the
    p-value and the count of undefined replicates all agree."""
    rng = np.random.default_rng(7)
    y, groups = _groups(rng, n, classes, seeds=3)
    n_boot = 25
    per_run, reps = hierarchical(groups, metric, n_boot, seed=3)

    draws = np.random.default_rng(3)
    seed_idx = draws.integers(0, 3, (n_boot, 3))
    images = draws.integers(0, n, (n_boot, n))
    want = np.array([[np.mean([_reference(metric, groups[g][s][0][images[b]], y[images[b]]) for s in seed_idx[b]])
                      for g in range(2)] for b in range(n_boot)])
    np.testing.assert_allclose(reps, want, rtol=0, atol=1e-12, equal_nan=True)
    np.testing.assert_allclose(per_run, [[_reference(metric, p, y) for p, _ in runs] for runs in groups], atol=1e-12)

    got = paired_bootstrap(dict(enumerate(groups[0])), dict(enumerate(groups[1])), metric, n_boot, seed=3)
    d = want[:, 0] - want[:, 1]
    ok = d[np.isfinite(d)]
    assert got["undefined"] == int(np.isnan(d).sum()) and got["n_boot"] == n_boot
    assert (got["lower"], got["upper"]) == pytest.approx(tuple(np.percentile(ok, [2.5, 97.5])), abs=1e-12)
    tail = min((ok <= 0).sum(), (ok >= 0).sum()) + 1
    assert got["p"] == pytest.approx(min(1.0, 2 * tail / (len(ok) + 1)))
    assert got["differences"] == pytest.approx(list(per_run[0] - per_run[1]))
    assert got["mean"] == pytest.approx(float(np.mean(per_run[0] - per_run[1])))
    assert (got["n_seeds"], got["n_images"]) == (3, n)
    if n == 9:  # 9 images of 3 classes: some replicates miss a class
        assert got["undefined"] > 0


def test_paired_bootstrap_pairs_by_seed_and_refuses_other_test_sets() -> None:
    rng = np.random.default_rng(0)
    y, groups = _groups(rng, 50, 2, seeds=4)
    a, b = dict(enumerate(groups[0])), {s: r for s, r in enumerate(groups[1]) if s != 2}
    got = paired_bootstrap(a, b, "auc", 50)
    assert got["seeds"] == [0, 1, 3] and got["n_seeds"] == 3
    assert got == paired_bootstrap(a, b, "auc", 50)  # deterministic
    other = {s: (p, y[::-1].copy()) for s, (p, _) in b.items()}
    with pytest.raises(ValueError, match="other images"):
        paired_bootstrap(a, other, "auc", 10)
    with pytest.raises(ValueError, match="no seed ran in both"):
        paired_bootstrap({0: a[0]}, {1: b[1]}, "auc", 10)


def test_paired_bootstrap_is_fast() -> None:
    """2000 replicates x 5 seeds x 2 starts on 400 images: the slowest metric (5-class one-vs-one AUC) in seconds."""
    rng = np.random.default_rng(1)
    _, groups = _groups(rng, 400, 5, seeds=5)
    a, b = dict(enumerate(groups[0])), dict(enumerate(groups[1]))
    for metric in ("auc", "kappa"):
        start = time.perf_counter()
        got = paired_bootstrap(a, b, metric, 2000)
        assert time.perf_counter() - start < 8.0, metric
        assert got["undefined"] == 0 and got["lower"] <= got["mean"] <= got["upper"]


def test_holm_matches_its_definition() -> None:
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.4, 0.9]) == [0.8, 0.9] and holm([0.6, 0.7]) == [1.0, 1.0]  # capped at 1
    got = holm([0.02, math.nan, 0.5])  # NaN is no test: m = 2
    assert got[0] == pytest.approx(0.04) and math.isnan(got[1]) and got[2] == pytest.approx(0.5)
    assert holm([]) == []


def _finetune(starts: dict[str, dict[str, list[str]]], metric: dict[str, str]) -> dict[str, Any]:
    return {st: {t: {sc: {"metric": metric[t], "lr": 1e-3} for sc in scs} for t, scs in by_t.items()}
            for st, by_t in starts.items()}


def test_primary_and_secondary_families_with_holm_and_verdicts() -> None:
    s = Settings(starts=(Start("a", "pretrained"), Start("b", "scratch"), Start("c", "scratch")),
                 targets=("breastmnist", "retinamnist"), primaries=(("b", "a", "sc1"), ("a", "c", "sc2")),
                 stat_boot=300)
    both = {"breastmnist": ["sc1", "sc2"], "retinamnist": ["sc1", "sc2"]}
    ft = _finetune({"a": both, "b": both, "c": {"breastmnist": ["sc1", "sc2"]}},
                   {"breastmnist": "auc", "retinamnist": "kappa"})
    fam = families(s, ft)
    assert fam[:3] == [("primary", "b", "a", "breastmnist", "sc1"), ("primary", "b", "a", "retinamnist", "sc1"),
                       ("primary", "a", "c", "breastmnist", "sc2")]  # every target both ran
    assert fam[3:] == [("secondary", "a", "b", "breastmnist", "sc2"), ("secondary", "a", "b", "retinamnist", "sc2"),
                       ("secondary", "a", "c", "breastmnist", "sc1")]  # complements of primaries left out

    rng = np.random.default_rng(0)
    data = {t: _groups(rng, 120, k, seeds=5, shift=3.0)[1] for t, k in (("breastmnist", 2), ("retinamnist", 5))}

    def runs(st: str, t: str, sc: str) -> dict[int, Any]:
        return dict(enumerate(data[t][0 if st == "a" else 1]))  # a is much better than b and c

    rows = comparisons(s, ft, runs)
    assert [(r["family"], r["a"], r["b"]) for r in rows] == [f[:3] for f in fam]
    for family in ("primary", "secondary"):
        mine = [r for r in rows if r["family"] == family]
        assert [r["p_holm"] for r in mine] == pytest.approx(holm([r["p"] for r in mine]))
    verdicts = {(r["a"], r["b"], r["target"], r["scenario"]): r["verdict"] for r in rows}
    assert verdicts[("b", "a", "breastmnist", "sc1")] == "hurts"
    assert verdicts[("a", "c", "breastmnist", "sc2")] == "helps"
    assert all(r["p"] <= r["p_holm"] for r in rows)


def _run(exp: Path, seed: int, *, lr: float = 1e-3, steps: int | None = None, iterations: int = 100,
         best_iteration: int = 50, best_epoch: int = 2, epochs_run: int = 5, epochs: int = 5, metric: str = "auc",
         value: float = 0.8, predictions: tuple[np.ndarray, np.ndarray] | None = None,
         records: list[dict[str, Any]] | None = None, seconds: tuple[float, float, float] = (10.0, 2.0, 1.0)
         ) -> Path:
    """A finished run folder written as the trainer writes one (its summary, config, predictions, metrics)."""
    run = run_dir(exp, lr, seed)
    run.mkdir(parents=True)
    files = RunFiles(run)
    files.config.write_text(yaml.safe_dump({"train": {"epochs": epochs, "steps": steps}}))
    files.summary.write_text(json.dumps({
        "lr": lr, "seed": seed, "metric": metric, "test": {metric: value}, "best_epoch": best_epoch,
        "epochs_run": epochs_run, "iterations": iterations, "iterations_to_best": best_iteration, "batch_size": 16,
        "train_seconds": seconds[0], "data_seconds": seconds[1], "eval_seconds": seconds[2]}))
    if predictions is not None:
        np.savez(files.predictions, probs=predictions[0], targets=predictions[1])
    files.metrics.write_text("".join(json.dumps(r) + "\n" for r in records or []))
    return run


def test_still_improving_rule_for_step_and_epoch_budgets(tmp_path: Path) -> None:
    steps = tmp_path / "steps"
    _run(steps, 0, steps=800, iterations=800, best_iteration=790)  # best in the last 10%, ran the whole budget
    _run(steps, 1, steps=800, iterations=800, best_iteration=700)  # best before the last 10%
    _run(steps, 2, steps=800, iterations=790, best_iteration=750)  # late best, but the plateau rule stopped it
    _run(steps, 3, steps=800, iterations=800, best_iteration=800, value=0.5)  # improving and at chance
    _run(steps, 0, lr=1e-4, steps=800, iterations=800, best_iteration=800)  # another LR
    flags = {f["seed"]: f for f in run_flags(steps, 1e-3)}
    assert set(flags) == {0, 3} and flags[0]["still_improving"] and flags[3]["still_improving"]
    assert flags[0]["reasons"] == ["still improving: best validation at step 790 of 800"]
    assert flags[3]["reasons"][1] == "test auc 0.500 at chance level"
    assert len(run_flags(steps)) == 3  # every LR

    epochs = tmp_path / "epochs"
    for seed, (best, ran) in enumerate([(0, 5), (11, 12), (11, 11), (5, 12)]):
        _run(epochs, seed, best_epoch=best, epochs_run=ran, epochs=12)
    flags = {f["seed"]: f["reasons"] for f in run_flags(epochs)}
    assert flags == {0: ["best validation epoch is the first"], 1: ["still improving at the last epoch"]}


def test_budget_curve_and_clock_read_run_folders(tmp_path: Path) -> None:
    exp = tmp_path / "finetune" / "x"
    records = [{"iteration": 50, "best_test": {"auc": 0.6}}, {"iteration": 100},
               {"iteration": 150, "best_test": {"auc": 0.7}}, {"iteration": 200}]
    _run(exp, 0, records=records, iterations=200, seconds=(10.0, 2.0, 1.0))
    _run(exp, 1, records=records[1:], iterations=200, seconds=(30.0, 3.0, 3.0))
    curve = budget_curve(exp, 1e-3, "auc", [25, 100, 200])
    assert curve[25] == [pytest.approx(math.nan, nan_ok=True)] * 2  # no validation yet: NaN, not hidden
    assert curve[100][0] == 0.6 and math.isnan(curve[100][1]) and curve[200] == [0.7, 0.7]
    clock = stage_clock({"finetune": [tmp_path / "finetune"], "ssl": [tmp_path / "ssl"]})
    assert set(clock) == {"finetune"}  # a stage without runs is left out
    c = clock["finetune"]
    assert (c["runs"], c["run_seconds"], c["steps"]) == (2, 44.0, 400)
    assert c["img_per_s"] == pytest.approx(400 * 16 / 40, abs=0.1)
    assert (c["data_share"], c["step_share"], c["eval_share"]) == pytest.approx((5 / 44, 35 / 44, 4 / 44), abs=1e-3)
    assert spread([0.6, math.nan])["mean"] != spread([0.6, math.nan])["mean"]  # NaN propagates


def test_forest_and_budget_figures_and_kappa_label() -> None:
    from repsim.study import figures

    row = {"family": "primary", "target": "retinamnist", "scenario": "unfrozen-linear", "a": "imagenet",
           "b": "scratch", "metric": "kappa", "mean": 0.1, "lower": 0.02, "upper": 0.2, "p": 0.01, "p_holm": 0.04,
           "verdict": "helps"}
    fig = figures.forest([row, {**row, "family": "secondary", "b": "ssl", "p_holm": 0.3, "verdict": "no evidence"}])
    assert fig is not None
    ax = fig.axes[0]
    assert ax.get_xlabel() == "difference in test quadratic-weighted κ"
    assert [t.get_text() for t in ax.get_yticklabels()] == [  # the first row on top
        "imagenet − ssl, unfrozen-linear\nsecondary: p 0.010, Holm 0.300: no evidence",
        "imagenet − scratch, unfrozen-linear\nprimary: p 0.010, Holm 0.040: helps"]
    points = {"100": spread([0.1, 0.2]), "200": spread([0.3, 0.35])}
    fig = figures.budget({"imagenet": {"retinamnist": {"scenario": "unfrozen-linear", "metric": "kappa",
                                                       "points": points}}}, ["imagenet"], {"retinamnist": 5})
    assert fig is not None
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_ylabel() == "test quadratic-weighted κ"
    assert any(line.get_label() == "chance (0)" and list(line.get_ydata()) == [0, 0] for line in ax.lines)
    assert figures.forest([]) is None and figures.budget({}, [], {}) is None


def test_outputs_report_every_statistic_from_run_folders(tmp_path: Path) -> None:
    """A fake two-target study (runs written as the trainer writes them) through write_outputs: bootstrap intervals,
    primary/secondary tables with Holm, LR edge, still improving share, budget curve, clock, tokens and figures."""
    from repsim.study.outputs import write_outputs

    s = Settings(starts=(Start("imagenet", "pretrained"), Start("scratch", "scratch")),
                 targets=("breastmnist", "retinamnist"), scenarios=("frozen-linear", "unfrozen-linear"),
                 primaries=(("imagenet", "scratch", "unfrozen-linear"),), budget_points=(100, 200),
                 budget_starts=("imagenet", "scratch"), train={"steps": 200, "seeds": 3}, stat_boot=200,
                 decapitate=[], freeze_blocks=[])
    rng = np.random.default_rng(0)
    res = Results()
    for t, k, metric in (("breastmnist", 2, "auc"), ("retinamnist", 5, "kappa")):
        _, groups = _groups(rng, 60, k, seeds=3, shift=2.0)
        for g, st in enumerate(("imagenet", "scratch")):
            for sc in s.scenarios:
                exp = tmp_path.joinpath(*Place("finetune", st, t, sc).parts())
                values = []
                for seed, run in enumerate(groups[g]):
                    value = float(resampled_metric(metric, *run, np.ones(60))[0])
                    values.append(value)
                    records = [{"iteration": 100, "best_test": {metric: value - 0.1}},
                               {"iteration": 200, "best_test": {metric: value}}]
                    _run(exp, seed, steps=200, iterations=200, best_iteration=200 if seed == 0 else 100,
                         metric=metric, value=value, predictions=run, records=records)
                res.finetune.setdefault(st, {}).setdefault(t, {})[sc] = {
                    "metric": metric, "lr": 1e-3, "lr_search": {"0.0001": 0.6, "0.001": 0.7, "0.01": 0.8},
                    "lr_grid_extended": [0.01], "lr_on_grid_edge": True, "test": {metric: spread(values)}}
    facts = {"params": {s.model: 1000}, "after_blocks": ["norm"],
             "tokens": {"img_size": 28, "backbone_tokens": 49, "grid": 7, "max_grid": 4, "side": 4, "tokens": 16}}
    summary = write_outputs(s, tmp_path, 6, {"train": 1.0}, res, {}, facts)

    primary = [p for p in summary["paired"] if p["family"] == "primary"]
    assert [(p["target"], p["a"], p["b"]) for p in primary] == [("breastmnist", "imagenet", "scratch"),
                                                                 ("retinamnist", "imagenet", "scratch")]
    assert all(p["verdict"] == "helps" and p["p_holm"] >= p["p"] for p in primary)
    assert [p["scenario"] for p in summary["paired"] if p["family"] == "secondary"] == ["frozen-linear"] * 2
    ci = summary["intervals"]["imagenet/retinamnist/unfrozen-linear"]
    assert ci["lower"] <= ci["mean"] <= ci["upper"] and ci["n_seeds"] == 3 and ci["n_images"] == 60
    assert summary["still_improving"]["runs"] == 24 and summary["still_improving"]["still_improving"] == 8
    curve = summary["budget_curve"]["scratch"]["breastmnist"]
    assert curve["points"][100]["values"] == pytest.approx(
        [v - 0.1 for v in res.finetune["scratch"]["breastmnist"]["unfrozen-linear"]["test"]["auc"]["values"]])
    assert summary["clock"]["finetune"]["runs"] == 24 and summary["classes"] == {"breastmnist": 2, "retinamnist": 5}
    assert summary["models"]["tokens"]["tokens"] == 16
    json.loads((tmp_path / "study.json").read_text())  # every number written
    tables = (tmp_path / "tables.md").read_text()
    for text in ("### Primary comparisons", "### Secondary comparisons", "Holm p", "quadratic-weighted κ",
                 "LR on grid edge", "0.01*: 0.800", "8 of 24 runs (33%; target at most 10%; ABOVE TARGET)",
                 "Budget curve", "Clock per stage", "it sees 16 tokens", "95% CI of the mean"):
        assert text in tables, text
    assert {"fig_forest", "fig_budget", "fig_transfer"} <= set(summary["figures"])
    assert (tmp_path / "fig_forest.png").stat().st_size > 5000 and (tmp_path / "fig_budget.png").is_file()


def test_curves_take_their_reference_from_their_scenario_and_name_the_frozen_end() -> None:
    from repsim.study import figures

    def res(metric: str, *values: float) -> dict[str, Any]:
        return {"metric": metric, "test": {metric: spread(values)}}

    ft = {"scratch": {"retinamnist": {"frozen-stacked": res("kappa", 0.2, 0.3),
                                      "unfrozen-linear": res("kappa", 0.5, 0.6)}}}
    curves = {"decapitation": {"imagenet": {"retinamnist": {"frozen-stacked": {1: res("kappa", 0.1, 0.2),
                                                                               7: res("kappa", 0.4, 0.4)}}}},
              "freezing": {"imagenet": {"retinamnist": {"unfrozen-linear": {0: res("kappa", 0.6, 0.6),
                                                                            7: res("kappa", 0.3, 0.4)}}}}}
    classes = {"retinamnist": 5}
    fig = figures.curve(curves, ft, "decapitation", ["imagenet", "scratch"], classes, 7, "scratch")
    assert fig is not None
    ax = fig.axes[0]
    lines = {line.get_label(): line.get_ydata()[0] for line in ax.lines if not line.get_label().startswith("_")}
    assert lines == {"scratch, frozen-stacked (full run)": pytest.approx(0.25), "chance (0)": 0}
    assert ax.get_xlabel() == "k: blocks kept, the first k of 7 (1-based)"
    fig = figures.curve(curves, ft, "freezing", ["imagenet", "scratch"], classes, 7, "scratch", ["conv_head", "bn2"])
    assert fig is not None
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.texts] == ["all 7 blocks frozen (conv_head, bn2 + head train)"]
    assert ax.get_xlabel() == "k: blocks frozen, the first k of 7 (1-based); 0: none"
    assert "scratch, unfrozen-linear (full run)" in ax.get_legend_handles_labels()[1]


def test_fig6_plots_against_parameter_counts_from_chance_to_one() -> None:
    from repsim.study import figures

    def res(*values: float) -> dict[str, Any]:
        return {"metric": "auc", "test": {"auc": spread(values)}}

    s = Settings(model="efficientnet_lite0", starts=(Start("imagenet", "pretrained"),), targets=("breastmnist",),
                 sizes=("efficientnet_lite2",), size_scenarios=("frozen-linear",))
    fig = figures.sizes({"efficientnet_lite2": {"breastmnist": {"frozen-linear": res(0.82, 0.84)}}},
                        {"imagenet": {"breastmnist": {"frozen-linear": res(0.80, 0.81)}}}, s,
                        {"efficientnet_lite0": 3_400_000, "efficientnet_lite2": 4_800_000}, {"breastmnist": 2})
    assert fig is not None
    ax = fig.axes[0]
    (series,) = ax.containers  # the errorbar of frozen-linear: its data line first
    assert series.get_label() == "frozen-linear" and list(series[0].get_xdata()) == [3.4, 4.8]
    assert ax.get_xlabel() == "backbone parameters (millions)"
    low, high = ax.get_ylim()
    assert low <= 0.5 and high >= 1.0  # not zoomed onto the 0.80-0.84 range


def test_ssl_starts_skipped_experiments_and_tokens_are_reported() -> None:
    from repsim.study import tables

    runs = {"ssl": {"breastmnist": {"epochs_run": 30, "final_loss": 4.1, "chance_loss": 11.09, "teacher_entropy": 3.2,
                                    "val_effective_rank": 12.34},
                    "retinamnist": {"collapsed": "teacher entropy uniform at epoch 3"}}}
    skipped = {"finetune/ssl/retinamnist/frozen-linear": "teacher entropy uniform", "knn/ssl/retinamnist":
               "teacher entropy uniform", "finetune/scratch/retinamnist/frozen-linear": "not finished yet"}
    text = "\n".join(tables.ssl(runs, skipped))
    assert "| ssl | breastmnist | 30 | 4.100 (11.090) | 3.200 | 12.3 | ok |" in text
    assert "collapsed: teacher entropy uniform at epoch 3" in text
    assert "- teacher entropy uniform (2): `finetune/ssl/retinamnist/frozen-linear`, `knn/ssl/retinamnist`" in text
    assert "- not finished yet (1): `finetune/scratch/retinamnist/frozen-linear`" in text  # one line per reason
    assert tables.ssl({}, {}) == []
    tok = {"img_size": 224, "backbone_tokens": 49, "grid": 7, "max_grid": 4, "side": 4, "tokens": 16}
    assert "7x7 token grid at 224 px, average-pooled to 4x4 (classifier max_grid 4): it sees 16 tokens" in \
        tables.tokens({"tokens": tok})[0]
    assert tables.tokens({"tokens": None}) == []
