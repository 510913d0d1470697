"""Runs a study's experiments as one pool of trainer runs, as soon as what each needs is known.

An experiment is an LR search on seed 0 (one run per LR), then its other seeds at the chosen LR. Every run is its
own task, so two workers stay busy until the last run: a run waits only for what it needs (an in-domain start's
pretraining, the LR chosen by another experiment for a curve point). Runs are handed to the workers one at a time,
depth first: the runs of the experiment submitted first (those marked ``first``, then the longest) go before those
of later ones, so experiments finish one after another and a study stopped after some hours leaves whole
experiments, not a spread of LR searches. Finished runs are reused (``repsim.train.runner.train_or_reuse``), so a
killed study resumes where it stopped.
"""

from __future__ import annotations

import copy
import heapq
import itertools
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from repsim.lazy import lazy_exports
from repsim.progress import tqdm
from repsim.train.runner import MAX_EXTENSIONS, choose_lr, grid_step_beyond

TICK_S = 60.0  # the longest wait between two calls of ``Scheduler.run``'s ``on_tick``


@dataclass
class Experiment:
    """One trainer experiment of a study.

    ``key`` names it (any hashable: the study's ``Place``). ``kind`` "train" (LR search + seeds,
    ``repsim.train.run_experiment``; with ``train.extend_lr_grid`` a chosen LR on the grid's edge adds one grid step
    beyond it, up to ``MAX_EXTENSIONS``), "knn" (one k-NN evaluation) or "pretrain" (one ``repsim pretrain`` run: a
    run that collapses is a result, ``{"collapsed": reason}``, and the experiments after it are skipped with that
    reason).
    ``after``: keys of experiments that must finish first; ``lr_from``: the key whose chosen LR this experiment
    trains at (instead of its own grid). ``cost`` orders submission (larger first) and so each run's priority,
    after ``first`` (experiments marked first go before the others: a study's declared primary comparisons).
    """

    key: Hashable
    cfg: dict[str, Any]
    folder: Path
    kind: str = "train"
    after: tuple[Hashable, ...] = ()
    lr_from: Hashable | None = None
    cost: float = 0.0
    first: bool = False
    # filled while running
    lr: float | None = None
    search: dict[str, float] = field(default_factory=dict)
    extended: list[float] = field(default_factory=list)
    pending: set[Future] = field(default_factory=set)
    queued: int = 0  # runs waiting in the scheduler's queue, not yet handed to a worker
    rank: int = 0  # the experiment's place in submission order: its runs' priority

    @property
    def grid(self) -> list[float]:
        train = self.cfg["train"]
        return sorted([float(v) for v in (train["lr_grid"] or [train["lr"]])] + self.extended)

    def runs(self) -> int:
        """Trainer runs this experiment makes (k-NN: one evaluation)."""
        if self.kind in ("knn", "pretrain"):
            return 1
        seeds = int(self.cfg["train"]["seeds"])
        return seeds if self.lr_from or len(self.grid) == 1 else len(self.grid) + seeds - 1

__getattr__, __dir__, _ = lazy_exports(__name__, {}, deprecated={"Pool": "repsim.study.scheduler:Workers"})


def _init_worker(threads: int) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(threads)


def _train_run(cfg: dict[str, Any], run_dir: str, data_root: str | None) -> dict[str, Any]:
    from repsim.train.runner import train_or_reuse

    return train_or_reuse(cfg, Path(run_dir), data_root)


def _finished(exp_kind: str, folder: str | Path) -> dict[str, Any] | None:
    """What an experiment folder holds when its work is done: a k-NN evaluation's ``knn.json``, a trainer
    experiment's ``results.json``, a self-supervised run's summary or ``{"collapsed": reason}``; else None."""
    from repsim.train.runs import COLLAPSED, ExperimentFiles, RunFiles

    if exp_kind == "pretrain":
        run = RunFiles(folder)
        if run.finished():
            return run.read_summary()
        marker = run.path / COLLAPSED
        return {"collapsed": json.loads(marker.read_text())["reason"]} if marker.exists() else None
    done = ExperimentFiles(folder).knn if exp_kind == "knn" else ExperimentFiles(folder).results
    return json.loads(done.read_text()) if done.exists() else None


def _knn_run(cfg: dict[str, Any], folder: str, data_root: str | None) -> dict[str, Any]:
    from repsim.train.runner import run_knn

    return _finished("knn", folder) or run_knn(cfg, Path(folder), data_root=data_root)


def _pretrain_run(cfg: dict[str, Any], folder: str, data_root: str | None) -> dict[str, Any]:
    """The summary of a self-supervised run (read when finished, else trained or resumed), or ``{"collapsed":
    reason}``."""
    from repsim.train.pretrain import pretrain
    from repsim.train.ssl import Collapsed

    done = _finished("pretrain", folder)
    if done is not None:
        return done
    try:
        return pretrain(cfg, folder, data_root=data_root, resume=True, progress=False)
    except Collapsed as err:
        return {"collapsed": str(err)}


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM handler of a process with workers: stop as SIGINT does, so ``Workers.close`` ends the workers."""
    raise KeyboardInterrupt(f"signal {signum}")


class Workers:
    """``jobs`` worker processes of ``threads`` torch threads each, or this process when ``jobs == 1``. Tiny models
    gain little from intra-op threads and lose badly to them on a busy machine, so processes beat threads.

    While workers exist, SIGTERM interrupts this process like SIGINT; ``close`` then terminates the workers and
    waits for them (an interrupted run resumes from its last checkpoint), so none is orphaned."""

    def __init__(self, jobs: int, threads: int) -> None:
        if jobs < 1 or threads < 1:
            raise ValueError(f"jobs and threads must be >= 1, got {jobs} and {threads}")
        self.jobs = jobs
        self.executor = None if jobs == 1 else ProcessPoolExecutor(
            jobs, mp_context=get_context("spawn"), initializer=_init_worker, initargs=(threads,))
        self.previous: Any = None
        if self.executor is not None and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, _interrupt)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Start ``fn(*args)`` in a worker (with one job: run it now) and return its future."""
        if self.executor is not None:
            return self.executor.submit(fn, *args)
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as err:  # delivered through the future, as from a worker
            future.set_exception(err)
        return future

    def close(self) -> None:
        """Cancel queued runs, let idle workers exit, terminate the ones still running (SIGTERM) and wait for them;
        restore SIGTERM's handler. Idle workers are not killed: that would leak the pool's semaphores."""
        if self.executor is not None:
            workers = list(getattr(self.executor, "_processes", {}).values())
            self.executor.shutdown(wait=False, cancel_futures=True)
            deadline = time.monotonic() + 2.0  # an idle worker exits within milliseconds of the shutdown
            for proc in workers:
                proc.join(timeout=max(0.0, deadline - time.monotonic()))
            for proc in workers:
                if proc.is_alive():
                    proc.terminate()
                    proc.join()
            self.executor = None
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
            self.previous = None


class Scheduler:
    """Runs experiments in a pool; ``run`` returns ``{key: results}`` (``results.json`` / ``knn.json`` contents)."""

    def __init__(self, pool: Workers, data_root: str | None) -> None:
        self.pool, self.data_root = pool, data_root
        self.owner: dict[Future, tuple[Experiment, float | None]] = {}
        self.queue: list[tuple[int, int, Experiment, float | None, Callable[..., Any], tuple[Any, ...]]] = []
        self.order = itertools.count()

    def _submit(self, exp: Experiment, tag: float | None, fn: Callable[..., Any], *args: Any) -> None:
        """Queue one run of ``exp`` (``tag``: its LR when it reports to the LR search) and hand out what fits."""
        heapq.heappush(self.queue, (exp.rank, next(self.order), exp, tag, fn, args))
        exp.queued += 1
        self._fill()

    def _fill(self) -> None:
        """Hand queued runs to free workers, the earliest-submitted experiment's first."""
        while self.queue and len(self.owner) < self.pool.jobs:
            _, _, exp, tag, fn, args = heapq.heappop(self.queue)
            exp.queued -= 1
            fut = self.pool.submit(fn, *args)
            exp.pending.add(fut)
            self.owner[fut] = (exp, tag)

    def _submit_runs(self, exp: Experiment, lrs: Sequence[float], seeds: Sequence[int], search: bool = False
                     ) -> None:
        """Submit ``exp``'s runs at ``lrs`` x ``seeds``; search runs (several LRs, or ``search``) report their
        validation value to the LR search."""
        from repsim.train.runs import run_dir

        for lr in lrs:
            for seed in seeds:
                cfg = copy.deepcopy(exp.cfg)
                cfg["train"].update(lr=float(lr), seed=seed)
                self._submit(exp, lr if len(lrs) > 1 or search else None, _train_run, cfg,
                             str(run_dir(exp.folder, lr, seed)), self.data_root)

    def _start(self, exp: Experiment, done: Mapping[Hashable, Experiment]) -> None:
        if exp.kind in ("knn", "pretrain"):
            self._submit(exp, None, _knn_run if exp.kind == "knn" else _pretrain_run, exp.cfg, str(exp.folder),
                         self.data_root)
        elif exp.lr_from is not None:
            lr = done[exp.lr_from].lr
            if lr is None:
                raise ValueError(f"experiment {exp.key} takes its LR from {exp.lr_from}, which chose none (not a "
                                 "trainer experiment)")
            exp.lr = lr
            self._submit_runs(exp, [lr], range(int(exp.cfg["train"]["seeds"])))
        elif len(exp.grid) > 1:
            self._submit_runs(exp, exp.grid, [0])
        else:
            exp.lr = exp.grid[0]
            self._submit_runs(exp, [exp.lr], range(int(exp.cfg["train"]["seeds"])))

    def _finish(self, exp: Experiment) -> dict[str, Any]:
        from repsim.train.runner import run_experiment

        if exp.kind in ("knn", "pretrain"):
            return (_knn_run if exp.kind == "knn" else _pretrain_run)(exp.cfg, str(exp.folder), self.data_root)
        cfg = copy.deepcopy(exp.cfg)
        if exp.lr_from is not None:
            cfg["train"].update(lr=exp.lr, lr_grid=None)
        return run_experiment(cfg, exp.folder, data_root=self.data_root, resume=True, progress=False)

    def run(self, experiments: Sequence[Experiment], desc: str = "runs",
            on_tick: Callable[[], Any] | None = None) -> dict[Any, dict[str, Any]]:
        """Run every experiment (each after its dependencies); errors in a run stop the study. ``on_tick`` is called
        after every finished run and at least every ``TICK_S`` seconds (the study's wall-time log)."""
        keys = {e.key for e in experiments}
        unknown = sorted({str(d) for e in experiments for d in (*e.after, *([e.lr_from] if e.lr_from else []))
                          if d not in keys})
        if unknown:
            raise ValueError(f"experiments depend on unknown experiments {unknown}")
        waiting = sorted(experiments, key=lambda e: (not e.first, -e.cost))
        for rank, exp in enumerate(waiting):
            exp.rank = rank
        done: dict[Hashable, Experiment] = {}
        results: dict[Any, dict[str, Any]] = {}
        with tqdm(total=sum(e.runs() for e in experiments), desc=desc, unit="run") as bar:
            while waiting or self.owner or self.queue:
                ready = [e for e in waiting if all(d in done for d in (*e.after, *([e.lr_from] if e.lr_from else [])))]
                for exp in ready:
                    waiting.remove(exp)
                    collapsed = [results[d]["collapsed"] for d in exp.after if "collapsed" in results[d]]
                    if collapsed:  # its start does not exist: a finding, not a run
                        results[exp.key] = {"skipped": collapsed[0]}
                        done[exp.key] = exp
                        bar.update(exp.runs())
                        continue
                    self._start(exp, done)
                self._fill()
                if not self.owner:
                    if waiting:  # nothing runs and nothing can start: a dependency cycle
                        raise ValueError(f"experiments wait on each other: {[str(e.key) for e in waiting]}")
                    break
                finished, _ = wait(list(self.owner), timeout=TICK_S, return_when=FIRST_COMPLETED)
                if on_tick is not None:
                    on_tick()
                for fut in finished:
                    exp, search_lr = self.owner.pop(fut)
                    exp.pending.discard(fut)
                    summary = fut.result()  # re-raises a worker's error
                    bar.update()
                    bar.set_postfix_str(str(exp.key), refresh=False)
                    if search_lr is not None:
                        exp.search[f"{search_lr:g}"] = summary["val"][summary["metric"]]
                    if exp.pending or exp.queued:
                        continue
                    if exp.kind == "train" and exp.lr is None:  # the search is complete: seeds at the chosen LR
                        lr = choose_lr({f"{lr:g}": exp.search[f"{lr:g}"] for lr in exp.grid})
                        beyond = grid_step_beyond(exp.grid, lr) if exp.cfg["train"]["extend_lr_grid"] else None
                        if beyond is not None and len(exp.extended) < MAX_EXTENSIONS:
                            exp.extended.append(beyond)  # on the grid's edge: search one step beyond it first
                            self._submit_runs(exp, [beyond], [0], search=True)
                            bar.total += 1
                            continue
                        exp.lr = lr
                        self._submit_runs(exp, [exp.lr], range(1, int(exp.cfg["train"]["seeds"])))
                        if exp.pending or exp.queued:
                            continue
                    results[exp.key] = self._finish(exp)
                    done[exp.key] = exp
        return results


NOT_FINISHED = "not finished yet (a report of a study still running)"


def collect(experiments: Sequence[Experiment]) -> dict[Any, dict[str, Any]]:
    """What ``Scheduler.run`` would return for the experiments that have finished, reading their folders and
    training nothing: a report beside a running study. An unfinished experiment (or one waiting for it) is
    ``{"skipped": NOT_FINISHED}``; one after a collapsed pretraining is skipped with the collapse's reason."""
    results: dict[Any, dict[str, Any]] = {}
    for exp in experiments:
        results[exp.key] = _finished(exp.kind, exp.folder) or {"skipped": NOT_FINISHED}
    for exp in experiments:
        collapsed = [results[d]["collapsed"] for d in exp.after if "collapsed" in results.get(d, {})]
        if collapsed:
            results[exp.key] = {"skipped": collapsed[0]}
    return results
