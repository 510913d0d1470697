"""The study's statistics: intervals of each experiment's mean and of the paired differences between starts from
the hierarchical bootstrap over seeds and test images (``repsim.study.bootstrap``), Holm's adjustment within the
declared primary comparisons and within the secondary ones, and the flags that say when a run did not train
properly (best epoch the first, still improving at the end of its budget, chance)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from repsim.study.bootstrap import Run, hierarchical, interval
from repsim.study.settings import Settings
from repsim.train.runs import RunFiles, find_runs

# metrics at or below these values mean a classifier no better than chance (flagged runs)
CHANCE = {"auc": 0.55, "kappa": 0.05, "balanced_accuracy": None, "accuracy": None}
ALPHA = 0.05  # the verdicts' level, on Holm-adjusted p-values
IMPROVING_TARGET = 0.10  # at most this share of the runs at the chosen LRs may still be improving at their end
_LABELS = {"kappa": "quadratic-weighted κ", "auc": "AUC", "auc_ovr": "AUC (one-vs-rest)",
           "balanced_accuracy": "balanced accuracy", "accuracy": "accuracy"}

Loader = Callable[[str, str, str], Mapping[int, Run]]  # (start, target, scenario) -> {seed: run} at its chosen LR


def metric_label(metric: str) -> str:
    """How tables and figures name a metric (``kappa`` is the quadratic-weighted κ)."""
    return _LABELS.get(metric, metric)


def chance_level(metric: str, classes: int | None) -> float | None:
    """The metric of a classifier that ignores its input: AUC 0.5, κ 0, balanced accuracy 1/classes; None where it
    depends on the class frequencies (accuracy), on an unknown number of classes, or the metric is not a
    classification score."""
    if metric == "balanced_accuracy":
        return 1.0 / classes if classes else None
    return {"auc": 0.5, "auc_ovr": 0.5, "kappa": 0.0}.get(metric)


def spread(values: Sequence[float]) -> dict[str, Any]:
    """``{"mean", "std", "values"}`` over seeds (sample std, ddof=1; 0 for one value; NaN propagates)."""
    v = [float(x) for x in values]
    return {"mean": float(np.mean(v)) if v else math.nan,
            "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "values": v}


def load_runs(folder: Path, lr: float) -> dict[int, Run]:
    """``{seed: (probs, targets)}``: the saved test predictions of the finished runs at ``lr`` under ``folder``."""
    out = {}
    for run in find_runs(folder, lr):
        files = RunFiles(run)
        if not files.predictions.is_file():
            raise FileNotFoundError(f"{files.predictions} is missing (the run predates saved test predictions, "
                                    f"which the test-set bootstrap needs): remove {run} and rerun to retrain it")
        out[int(files.read_summary()["seed"])] = files.read_predictions()
    return out


def mean_interval(runs: Mapping[int, Run], metric: str, n_boot: int, seed: int = 0) -> dict[str, Any]:
    """The seed-mean of ``metric`` over ``runs`` (``{seed: run}``) with its 95% bootstrap interval (seeds and test
    images resampled)."""
    seeds = sorted(runs)
    if not seeds:
        raise ValueError("no runs to bootstrap")
    per_run, reps = hierarchical([[runs[s] for s in seeds]], metric, n_boot, seed)
    ci = {k: v for k, v in interval(reps[:, 0]).items() if k != "p"}
    return {"mean": float(per_run[0].mean()), **ci, "n_seeds": len(seeds), "n_images": len(runs[seeds[0]][1])}


def paired_bootstrap(a: Mapping[int, Run], b: Mapping[int, Run], metric: str, n_boot: int, seed: int = 0
                     ) -> dict[str, Any]:
    """Mean over the seeds both ran of ``metric(a) - metric(b)`` on the test set, with the percentile 95% interval
    and two-sided p-value of the hierarchical paired bootstrap (the same seeds and images for both), the
    per-seed differences and the numbers of seeds and test images."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError(f"no seed ran in both groups (seeds {sorted(a)} and {sorted(b)}): nothing to pair")
    per_run, reps = hierarchical([[a[s] for s in seeds], [b[s] for s in seeds]], metric, n_boot, seed)
    d = per_run[0] - per_run[1]
    return {"mean": float(d.mean()), **interval(reps[:, 0] - reps[:, 1]), "n_seeds": len(seeds), "seeds": seeds,
            "n_images": len(a[seeds[0]][1]), "differences": d.tolist()}


def holm(p: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values of one family: the i-th smallest of the m p-values becomes
    ``max_{j <= i} min(1, (m - j + 1) p_(j))``. A NaN p-value (no defined replicate) is no test: it stays NaN and
    does not count in m."""
    p_arr = np.asarray(p, dtype=np.float64)
    out = np.full(len(p_arr), math.nan)
    tested = np.flatnonzero(np.isfinite(p_arr))
    order = tested[np.argsort(p_arr[tested], kind="stable")]
    m, running = len(order), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * float(p_arr[i])))
        out[i] = running
    return out.tolist()


def verdict(mean: float, p_adjusted: float) -> str:
    """"helps" / "hurts" (the sign of the difference) when the adjusted p is below ``ALPHA``, else "no evidence"."""
    if not p_adjusted < ALPHA:
        return "no evidence"
    return "helps" if mean > 0 else "hurts"


def _ran(finetune: Mapping[str, Mapping[str, Mapping[str, Any]]], st: str, t: str, sc: str) -> bool:
    """Whether start ``st`` has results on target ``t`` in scenario ``sc``."""
    return sc in finetune.get(st, {}).get(t, {})


def families(s: Settings, finetune: Mapping[str, Mapping[str, Mapping[str, Any]]]
             ) -> list[tuple[str, str, str, str, str]]:
    """The paired comparisons ``(family, a, b, target, scenario)`` both starts ran: the primaries (each declared
    ``(a, b, scenario)`` on every target), then the secondary ones, the first start minus every other start, leaving
    out those a primary already makes (in either direction)."""
    def ran(st: str, t: str, sc: str) -> bool:
        return _ran(finetune, st, t, sc)

    rows = [("primary", a, b, t, sc) for a, b, sc in s.primaries for t in s.targets if ran(a, t, sc) and ran(b, t, sc)]
    declared = {(frozenset((a, b)), sc) for a, b, sc in s.primaries}
    names = [st.name for st in s.starts if st.name in finetune]  # a start that never ran (collapsed) is no reference
    first = names[0] if names else ""
    for other in names[1:]:
        for t, by_sc in finetune.get(first, {}).items():
            rows += [("secondary", first, other, t, sc) for sc in by_sc
                     if ran(other, t, sc) and (frozenset((first, other)), sc) not in declared]
    return rows


def unestimated(s: Settings, finetune: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """The declared primaries ``families`` could not make: on a target where a start has no results in the scenario
    (its self-supervised pretraining collapsed, say), named with the starts that are missing."""
    out = []
    for a, b, sc in s.primaries:
        for t in s.targets:
            missing = [st for st in (a, b) if not _ran(finetune, st, t, sc)]
            if missing:
                out.append({"a": a, "b": b, "target": t, "scenario": sc, "missing": missing})
    return out


def comparisons(s: Settings, finetune: Mapping[str, Mapping[str, Mapping[str, Any]]], runs: Loader
                ) -> list[dict[str, Any]]:
    """Every paired comparison of ``families`` with its bootstrap interval (``s.stat_boot`` replicates), raw p,
    Holm-adjusted p within its family and the verdict from the adjusted p."""
    rows = []
    for family, a, b, t, sc in families(s, finetune):
        metric = finetune[a][t][sc]["metric"]
        if finetune[b][t][sc]["metric"] != metric:
            raise ValueError(f"{a} and {b} on {t}/{sc} chose by different metrics: they cannot be paired")
        rows.append({"family": family, "target": t, "scenario": sc, "a": a, "b": b, "metric": metric,
                     **paired_bootstrap(runs(a, t, sc), runs(b, t, sc), metric, s.stat_boot)})
    for family in ("primary", "secondary"):
        members = [r for r in rows if r["family"] == family]
        for r, adjusted in zip(members, holm([r["p"] for r in members])):
            r.update(p_holm=adjusted, verdict=verdict(r["mean"], adjusted))
    return rows


def run_flags(folder: Path, lr: float | None = None) -> list[dict[str, Any]]:
    """Every finished run under an experiment folder (at ``lr`` when given) whose training looks wrong, with the
    reasons. Still improving: with a ``train.steps`` budget, the best validation came in the last 10% of the steps
    of a run the plateau rule did not stop early; with an epoch budget, at the last of all its epochs."""
    flagged = []
    for run in find_runs(folder, lr):
        files = RunFiles(run)
        s, train = files.read_summary(), files.read_config()["train"]
        reasons = []
        if s["best_epoch"] == 0 and s["epochs_run"] > 1:
            reasons.append("best validation epoch is the first")
        steps, epochs = train.get("steps"), train["epochs"]
        if steps:
            improving = s["iterations"] >= steps and s["iterations_to_best"] > 0.9 * steps
            why = f"still improving: best validation at step {s['iterations_to_best']} of {steps}"
        else:
            improving = s["best_epoch"] == s["epochs_run"] - 1 and s["epochs_run"] == epochs and epochs > 1
            why = "still improving at the last epoch"
        if improving:
            reasons.append(why)
        floor = CHANCE.get(s["metric"])
        if floor is not None and not s["test"][s["metric"]] > floor:
            reasons.append(f"test {s['metric']} {s['test'][s['metric']]:.3f} at chance level")
        if reasons:
            flagged.append({"run": str(run), "lr": s["lr"], "seed": s["seed"], "reasons": reasons,
                            "still_improving": improving})
    return flagged
