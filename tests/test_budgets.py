"""Step budgets and what the study reads from runs: ``train.steps`` ends a run part-way through an epoch; the
plateau rule makes a run's first B steps those of a B-step run (so one long run gives the budget curve);
``test_at_best`` records; the saved test predictions; the LR grid extended past an edge; ``channels_last``."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from repsim.data.synthetic import write_image_folder
from repsim.metrics import compute_metrics
from repsim.study.clock import budget_curve, stage_clock, value_at_budget
from repsim.train.config import expand
from repsim.train.loop import train
from repsim.train.runner import grid_step_beyond, run_experiment
from repsim.train.runs import RunFiles, find_runs
from repsim.train.utils import memory_format

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def textures(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("data") / "textures", 120, img_size=16, num_classes=3, seed=0)


def config(root: Path, **train) -> dict:
    """A BatchNorm convnet (timm's test_resnet) on 96 train images at 16 px: 6 steps per epoch of 16."""
    spec = {"name": "budget", "data": {"dataset": "image_folder", "root": str(root), "img_size": 16},
            "model": {"name": "test_resnet", "pretrained": False, "scenario": "unfrozen-linear"},
            "train": {"batch_size": 16, "lr": 3e-3, "warmup_iters": 3, "patience": 2, "max_plateaus": 5,
                      "num_workers": 0, "device": "cpu", **train}}
    ((_, cfg),) = expand(spec)
    return cfg


def test_a_step_budget_stops_part_way_through_an_epoch_and_tests_at_each_best(textures, tmp_path) -> None:
    files = RunFiles(tmp_path / "run")
    s = train(config(textures, steps=15, test_at_best=True), files.path, progress=False)
    records = files.read_metrics()
    assert s["iterations"] == 15 and s["epochs_run"] == 3 and [r["iteration"] for r in records] == [6, 12, 15]
    assert s["steps_budget"] == 15 and s["batch_size"] == 16
    bests = [r for r in records if "best_test" in r]
    assert bests and bests[-1]["epoch"] == s["best_epoch"]  # a record per new best on validation, and only then
    assert all(("best_test" in r) == (r["epoch"] in {b["epoch"] for b in bests}) for r in records)
    # the kept checkpoint's test metric is the last best's: the budget curve's end point is the run's result
    assert value_at_budget(records, s["metric"], 15) == s["test"][s["metric"]]
    assert math.isnan(value_at_budget(records, s["metric"], 5))  # no validation before step 6
    probs, targets = files.read_predictions()
    assert compute_metrics("multiclass", targets, probs, ["0", "1", "2"])[s["metric"]] == s["test"][s["metric"]]
    assert 0 <= s["data_seconds"] <= s["train_seconds"] and s["eval_seconds"] > 0


def test_the_first_b_steps_of_a_long_run_are_a_b_step_run(textures, tmp_path) -> None:
    """The budget curve reads shorter budgets from the main runs: under the plateau rule the LR at a step depends
    only on the steps and validations before it, so a 12-step run is the first 12 steps of a 24-step run."""
    short = RunFiles(tmp_path / "short")
    long = RunFiles(tmp_path / "long")
    s = train(config(textures, steps=12, test_at_best=True), short.path, progress=False)
    train(config(textures, steps=24, test_at_best=True), long.path, progress=False)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in long.read_metrics()[:2]]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in short.read_metrics()]
    assert value_at_budget(long.read_metrics(), s["metric"], 12) == s["test"][s["metric"]]
    curve = budget_curve(tmp_path, s["lr"], s["metric"], [12, 24])
    assert curve[12] == [s["test"][s["metric"]]] * 2  # both runs (found under tmp_path) agree at 12 steps
    clock = stage_clock({"all": [tmp_path]})["all"]
    assert clock["runs"] == 2 and clock["steps"] == 36
    assert math.isclose(clock["data_share"] + clock["step_share"] + clock["eval_share"], 1.0, abs_tol=2e-3)


def test_grid_step_beyond_an_edge() -> None:
    assert grid_step_beyond([1e-4, 3e-4, 1e-3], 1e-3) == pytest.approx(3.33e-3)
    assert grid_step_beyond([1e-4, 3e-4, 1e-3], 1e-4) == pytest.approx(3.33e-5)
    assert grid_step_beyond([1e-4, 3e-4, 1e-3], 3e-4) is None
    assert grid_step_beyond([1e-4], 1e-4) is None  # a single LR is no grid


def test_an_lr_chosen_on_the_grid_edge_extends_the_grid(textures, tmp_path) -> None:
    """A two-value grid always chooses an edge: the search goes on past it (up to two steps) and says so."""
    cfg = config(textures, steps=6, lr_grid=[1e-3, 3e-3], extend_lr_grid=True)
    res = run_experiment(cfg, tmp_path, progress=False)
    assert 1 <= len(res["lr_grid_extended"]) <= 2
    assert set(res["lr_search"]) == {f"{v:g}" for v in [1e-3, 3e-3, *res["lr_grid_extended"]]}
    assert res["lr"] == max((float(k) for k in res["lr_search"]), key=lambda k: res["lr_search"][f"{k:g}"])
    assert res["lr_on_grid_edge"] == (grid_step_beyond(sorted([1e-3, 3e-3, *res["lr_grid_extended"]]), res["lr"])
                                      is not None)
    assert len(find_runs(tmp_path)) == 2 + len(res["lr_grid_extended"])  # one seed: seed 0 of the search is reused


def test_channels_last_is_the_convnet_default_and_changes_numbers_only_within_rounding(textures, tmp_path) -> None:
    from repsim.models import create

    assert memory_format(create("test_resnet"), "auto") == torch.channels_last
    assert memory_format(create("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=1, embed_dim=32,
                                num_heads=2), "auto") == torch.contiguous_format
    runs = {flag: train(config(textures, steps=6, channels_last=flag), tmp_path / str(flag), progress=False)
            for flag in (True, False)}
    assert runs[True]["channels_last"] and not runs[False]["channels_last"]
    assert runs[True]["val"][runs[True]["metric"]] == pytest.approx(runs[False]["val"][runs[False]["metric"]],
                                                                   abs=0.05)
    pa, _ = RunFiles(tmp_path / "True").read_predictions()
    pb, _ = RunFiles(tmp_path / "False").read_predictions()
    assert np.abs(pa - pb).max() < 1e-3  # 6 AdamW steps: NHWC and NCHW kernels round differently, nothing more


def test_the_frozen_cache_is_bit_identical_with_and_without_channels_last(textures, tmp_path) -> None:
    """The cached backbone outputs are computed in NCHW either way, so the head trains bit for bit alike."""
    runs = {}
    for flag in (True, False):
        cfg = config(textures, steps=12, cache_frozen=True, channels_last=flag)
        cfg["model"]["scenario"] = "frozen-linear"
        runs[flag] = train(cfg, tmp_path / str(flag), progress=False)
    assert runs[True]["channels_last"] and runs[True]["val"] == runs[False]["val"]
    wa, wb = (torch.load(tmp_path / n / "checkpoints/best.pt", weights_only=True)["model"] for n in ("True", "False"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_resumed_run_keeps_the_threads_it_started_with(monkeypatch) -> None:
    from repsim.train.utils import resumed_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("REPSIM_THREADS", raising=False)
    assert resumed_threads(None) is None  # nothing to resume
    assert resumed_threads({"state": {"threads": 3}}) == 3
    monkeypatch.setenv("REPSIM_THREADS", "2")
    assert resumed_threads({"state": {"threads": 3}}) is None  # the environment pins them instead
