"""What the study's runs did and where their time went, read back from their run folders (numpy-free, no torch): the
budget curve (the validation-selected test metric after B optimiser steps) and the study's clock per stage (run
seconds, optimiser steps, img/s, and the shares of data loading, forward/backward/step and evaluation)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from repsim.files import write_text
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


class WallLog:
    """The wall time of every invocation of a study, in ``out/wall.json``: a study resumed over several sessions (or
    killed) still reports its whole wall time. The current invocation's entry is rewritten atomically at each
    ``tick`` (the scheduler ticks after every finished run and at least once a minute), so an invocation that is
    killed keeps its time up to its last tick."""

    def __init__(self, path: Path, record: bool = True, **about: Any) -> None:
        self.path, self.record = path, record
        self.entries: list[dict[str, Any]] = json.loads(path.read_text()) if path.exists() else []
        if record:  # else only read: a report beside a running study
            self.entries.append({"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), **about,
                                 "seconds": 0.0, "stages": {}})
        self._t0 = self._stage_t0 = time.perf_counter()
        self.stage = ""

    def begin(self, stage: str) -> None:
        """A new stage starts now."""
        self.stage, self._stage_t0 = stage, time.perf_counter()
        self.tick()

    def tick(self) -> float:
        """Record the time so far (of the invocation and of its current stage); return the current stage's."""
        now = time.perf_counter()
        stage_s = round(now - self._stage_t0, 1)
        if self.record:
            entry = self.entries[-1]
            entry["seconds"] = round(now - self._t0, 1)
            if self.stage:
                entry["stages"][self.stage] = stage_s
            write_text(self.path, json.dumps(self.entries, indent=1))
        return stage_s

    def summary(self) -> dict[str, Any]:
        """Every invocation, the total wall seconds and the seconds per stage summed over invocations."""
        stages: dict[str, float] = {}
        for e in self.entries:
            for k, v in e["stages"].items():
                stages[k] = round(stages.get(k, 0.0) + v, 1)
        return {"invocations": json.loads(json.dumps(self.entries)),
                "total_s": round(sum(e["seconds"] for e in self.entries), 1), "by_stage_s": stages}
