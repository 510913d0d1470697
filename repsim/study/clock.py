"""What the study's runs did and where their time went, read back from their run folders (numpy-free, no torch): the
budget curve (the validation-selected test metric after B optimiser steps) and the study's clock per stage (run
seconds, optimiser steps, img/s, and the shares of data loading, forward/backward/step and evaluation)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from repsim.train.runs import RunFiles, find_runs


def value_at_budget(records: Sequence[Mapping[str, Any]], metric: str, budget: int) -> float:
    """The test ``metric`` of the checkpoint a run would have kept after ``budget`` optimiser steps: its last new
    best on validation at or before that step (``train.test_at_best`` records); NaN when it had none yet.

    Under the plateau rule a run's first B steps are those of a run with a budget of B steps (the LR depends only on
    the steps and validations so far), so one long run gives every shorter budget."""
    best = math.nan
    for rec in records:
        if rec["iteration"] > budget:
            break
        if "best_test" in rec:
            best = float(rec["best_test"][metric])
    return best


def budget_curve(exp_dir: Path, lr: float, metric: str, budgets: Iterable[int]) -> dict[int, list[float]]:
    """Per budget, the per-seed test metric of the runs at ``lr`` under ``exp_dir`` (seed order)."""
    runs = [RunFiles(r).read_metrics() for r in find_runs(exp_dir, lr)]
    return {int(b): [value_at_budget(recs, metric, int(b)) for recs in runs] for b in budgets}


def stage_clock(folders: Mapping[str, Sequence[Path]]) -> dict[str, dict[str, float]]:
    """Per stage, summed over its finished runs (trainer and ``repsim pretrain`` runs under its folders): seconds in
    the training loop, optimiser steps, images per second, and the shares of the run time spent waiting for data,
    in forward/backward/optimiser steps and in evaluation (validation, test-at-best; the final test excluded)."""
    out = {}
    for stage, roots in folders.items():
        train = data = evaluation = steps = images = 0.0
        runs = 0
        for root in roots:
            for run in find_runs(root) if root.exists() else []:
                s = RunFiles(run).read_summary()
                runs += 1
                train += s["train_seconds"]
                data += s.get("data_seconds", 0.0)
                evaluation += s.get("eval_seconds", 0.0)
                steps += s["iterations"]
                images += s["iterations"] * s.get("batch_size", 0)
        if not runs:
            continue
        total = train + evaluation
        out[stage] = {"runs": runs, "run_seconds": round(total, 1), "steps": int(steps),
                      "img_per_s": round(images / train, 1) if train else math.nan,
                      "data_share": round(data / total, 3) if total else math.nan,
                      "step_share": round((train - data) / total, 3) if total else math.nan,
                      "eval_share": round(evaluation / total, 3) if total else math.nan}
    return out
