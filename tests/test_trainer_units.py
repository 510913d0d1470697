"""The trainer's pieces on their own, without ../shared/data: the LR schedule (``lr_at``), the plateau rule's
comparison (``is_better``), and a whole run on the built-in synthetic textures (repsim.data.synthetic)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from repsim.data.synthetic import write_image_folder
from repsim.train.config import expand
from repsim.train.loop import is_better, lr_at, train
from repsim.train.runs import RunFiles


def test_lr_at_warms_up_linearly_then_divides_by_ten_per_plateau() -> None:
    assert [lr_at(i, base_lr=1.0, warmup=4, plateaus=0) for i in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_at(10, base_lr=2e-3, warmup=0, plateaus=0) == 2e-3  # no warmup: the base LR from the first step
    assert lr_at(10, base_lr=1.0, warmup=4, plateaus=2) == pytest.approx(0.01)
    assert lr_at(0, base_lr=1.0, warmup=4, plateaus=1) == pytest.approx(0.025)  # warmup and plateaus multiply


def test_is_better_takes_the_first_value_and_never_prefers_nan() -> None:
    assert is_better(0.1, None) and is_better(math.nan, None)
    assert is_better(0.6, 0.5) and not is_better(0.5, 0.5) and not is_better(0.4, 0.5)
    assert not is_better(math.nan, 0.5)  # NaN never beats a number
    assert is_better(0.0, math.nan)  # any number beats NaN


def test_trainer_runs_on_synthetic_data_and_writes_its_run_folder(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "textures", 96, img_size=16, num_classes=3, seed=0)
    spec = {"name": "synthetic", "data": {"dataset": "image_folder", "root": str(root), "img_size": 16},
            "model": {"name": "vit_tiny_patch16_224", "pretrained": False, "scenario": "unfrozen-linear",
                      "kwargs": {"patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}},
            "train": {"epochs": 2, "batch_size": 16, "lr": 1e-3, "warmup_epochs": 1, "num_workers": 0,
                      "device": "cpu"}}
    ((_, cfg),) = expand(spec)
    files = RunFiles(tmp_path / "run")
    summary = train(cfg, files.path, progress=False)
    assert files.finished() and files.read_summary() == summary
    assert summary["epochs_run"] == 2 and len(files.read_metrics()) == 2
    assert all(f.is_file() for f in (files.config, files.model, files.split, files.backbone("init"),
                                     files.backbone("best"), files.checkpoint("best"), files.checkpoint("init")))
    assert not files.checkpoint("last").exists()  # a finished run is reused, never resumed
    assert 0.0 <= summary["test"][summary["metric"]] <= 1.0
