"""The study, one way through: settings -> plan (``plan.py``) -> runs (``scheduler.py``) -> results
(``results.organise``) -> CKA (``similarity.py``) -> tables and figures (``outputs.py``). Each stage takes the values
it needs; the ``Workspace`` (``workspace.py``) builds the paths, data blocks and backbones."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from repsim.files import write_text
from repsim.study.clock import WallLog
from repsim.study.outputs import write_outputs
from repsim.study.plan import curve_ends, plan, resolved_config
from repsim.study.results import Comparison, Results, organise
from repsim.study.scheduler import Scheduler, Workers, collect
from repsim.study.settings import Settings
from repsim.study.similarity import study_cka
from repsim.study.workspace import Workspace

__all__ = ["Study", "resolved_config"]


class Study:
    """One study in ``out``: ``run()`` trains every experiment, computes the CKA, writes tables, figures and
    ``study.json``, and returns the summary."""

    def __init__(self, settings: Settings, out: str | Path, *, data_root: str | Path | None = None,
                 jobs: int = 1, threads: int | None = None, device: str = "auto") -> None:
        settings.check()
        if jobs < 1:
            raise ValueError(f"jobs must be >= 1 (parallel training processes), got {jobs}")
        self.ws = Workspace(settings, out, data_root=data_root, device=device)
        self.settings, self.out, self.data_root, self.depth = settings, self.ws.out, self.ws.data_root, self.ws.depth
        self.jobs = jobs
        self.threads = threads or max(1, (os.cpu_count() or 1) // jobs)
        self.timings: dict[str, float] = {}
        self.cka_results: dict[str, dict[Comparison, Any]] = {}

    def _check_settings_file(self) -> None:
        """Write ``settings.json``; refuse an ``out`` that holds a study with other settings."""
        self.out.mkdir(parents=True, exist_ok=True)
        settings = json.loads(json.dumps(asdict(self.settings)))
        previous = self.out / "settings.json"
        if previous.exists():
            # a setting added to repsim after the study was written is compatible when it holds its default
            old = {**json.loads(json.dumps(asdict(Settings()))), **json.loads(previous.read_text())}
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            if diff:
                raise ValueError(f"{self.out} holds a study with other settings ({', '.join(diff)}); use another out")
        write_text(previous, json.dumps(settings, indent=2))

    def run(self, report: bool = False) -> dict[str, Any]:
        """Run (or resume) every stage; write figures, ``tables.md`` and ``study.json``; return the summary.
        ``report``: train nothing -- tables and figures of the experiments finished so far, the others listed as not
        finished (beside a study still running; its wall-time log is read, not written)."""
        self._check_settings_file()
        self.report = report
        self.wall = WallLog(self.out / "wall.json", record=not report, jobs=self.jobs, threads=self.threads)
        saved_threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        pool = Workers(1 if report else self.jobs, self.threads)  # a report trains nothing: no worker processes
        try:
            results: Results = self._timed("train", self._train, pool)
            pool.close()
            self.cka_results = self._timed("cka", study_cka, self.ws, results.finetune)
            return self._timed("outputs", write_outputs, self.settings, self.out, self.depth, self.timings, results,
                               self.cka_results, self.ws.model_facts(), self.wall.summary)
        finally:
            pool.close()
            torch.set_num_threads(saved_threads)

    def _train(self, pool: Workers) -> Results:
        """Every trainer experiment, run by the scheduler, organised by start, target and scenario."""
        planned = plan(self.ws)
        raw = collect(planned) if self.report else \
            Scheduler(pool, self.data_root).run(planned, "study runs", on_tick=self.wall.tick)
        experiments = [(st.name, t, sc) for st, t, sc in self.settings.experiments()]
        return organise(raw, experiments, curve_ends(self.ws), self.settings.curve_seeds)

    def _timed(self, stage: str, fn: Callable[..., Any], *args: Any) -> Any:
        self.wall.begin(stage)
        value = fn(*args)
        self.timings[stage] = self.wall.tick()
        return value
