"""The study's statistics: paired differences between starts with a t confidence interval and a plain verdict, and
the flags that say when a run did not train properly (best epoch the first, still improving at the last, chance)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from repsim.train.runs import RunFiles, find_runs

# metrics at or below these values mean a classifier no better than chance
CHANCE = {"auc": 0.55, "kappa": 0.05, "balanced_accuracy": None, "accuracy": None}


def paired_difference(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """Mean of ``a[i] - b[i]`` (runs paired by seed) with a Student-t CI, and a verdict: "helps" when the CI lies
    above 0, "hurts" when below, "no evidence" when it covers 0 (or with fewer than 2 pairs)."""
    from scipy import stats

    if len(a) != len(b):
        raise ValueError(f"paired values need equal lengths, got {len(a)} and {len(b)}")
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    n = len(d)
    mean = float(d.mean()) if n else math.nan
    if n < 2:
        return {"n": n, "mean": mean, "lower": math.nan, "upper": math.nan, "verdict": "no evidence"}
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * d.std(ddof=1) / math.sqrt(n))
    lower, upper = mean - half, mean + half
    verdict = "helps" if lower > 0 else "hurts" if upper < 0 else "no evidence"
    return {"n": n, "mean": mean, "lower": lower, "upper": upper, "verdict": verdict, "differences": d.tolist()}


def comparisons(finetune: Mapping[str, Mapping[str, Mapping[str, dict]]], first: str) -> list[dict[str, Any]]:
    """``first`` start minus every other start, per target and scenario both ran (paired by seed)."""
    rows = []
    for other in finetune:
        if other == first:
            continue
        for target, by_scenario in finetune.get(first, {}).items():
            for scenario, res in by_scenario.items():
                theirs = finetune[other].get(target, {}).get(scenario)
                if theirs is None:
                    continue
                metric = res["metric"]
                a, b = res["test"][metric]["values"], theirs["test"][metric]["values"]
                n = min(len(a), len(b))
                rows.append({"target": target, "scenario": scenario, "a": first, "b": other, "metric": metric,
                             **paired_difference(a[:n], b[:n])})
    return rows


def run_flags(folder: Path) -> list[dict[str, Any]]:
    """Every finished run under an experiment folder whose training looks wrong, with the reasons."""
    flagged = []
    for run in sorted(find_runs(folder)):  # path order
        files = RunFiles(run)
        s, epochs = files.read_summary(), files.read_config()["train"]["epochs"]
        reasons = []
        if s["best_epoch"] == 0 and s["epochs_run"] > 1:
            reasons.append("best validation epoch is the first")
        if s["best_epoch"] == s["epochs_run"] - 1 and s["epochs_run"] == epochs and epochs > 1:
            reasons.append("still improving at the last epoch")
        floor = CHANCE.get(s["metric"])
        if floor is not None and not s["test"][s["metric"]] > floor:
            reasons.append(f"test {s['metric']} {s['test'][s['metric']]:.3f} at chance level")
        if reasons:
            flagged.append({"run": str(run), "lr": s["lr"], "seed": s["seed"], "reasons": reasons})
    return flagged
