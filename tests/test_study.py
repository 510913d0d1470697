"""The transfer study (repsim.study, analyses/transfer_study.py) end to end on a few dozen real MedMNIST images."""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from repsim.study import PRESETS, Study, rebuild, resolved_config, run_dirs

REPO = Path(__file__).resolve().parents[1]


def _subset_npz(src: Path, dst: Path, sizes: dict[str, int]) -> None:
    """A MedMNIST-layout copy of ``src`` with ``sizes[split]`` images per split, every class represented."""
    parts = {}
    with np.load(src) as z:
        for split, n in sizes.items():
            y = z[f"{split}_labels"].ravel()
            classes = np.unique(y)
            idx = np.sort(np.concatenate([np.flatnonzero(y == c)[: n // len(classes)] for c in classes]))
            parts[f"{split}_images"], parts[f"{split}_labels"] = z[f"{split}_images"][idx], z[f"{split}_labels"][idx]
    np.savez(dst, **parts)


@pytest.fixture(scope="module")
def tiny_root(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tinydata")
    (root / "medmnist").mkdir()
    for flag in ("pneumoniamnist", "breastmnist"):
        _subset_npz(data_root / "medmnist" / f"{flag}.npz", root / "medmnist" / f"{flag}.npz",
                    {"train": 40, "val": 20, "test": 24})
    return root


@pytest.fixture(scope="module")
def study_dir(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset through the command-line script (one target, every stage)."""
    spec = importlib.util.spec_from_file_location("transfer_study", REPO / "analyses" / "transfer_study.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path_factory.mktemp("study")
    assert cli.main(["--preset", "tiny", "--data-root", str(tiny_root), "--out", str(out), "--targets", "breastmnist",
                     "--threads", "1"]) == 0
    return out


def test_every_stage_writes_its_results(study_dir: Path) -> None:
    summary = json.loads((study_dir / "study.json").read_text())
    assert set(summary["timings_s"]) == {"pretrain", "finetune", "knn", "curves", "cka"}
    ft = summary["finetune"]["breastmnist"]
    assert set(ft) == {"frozen-linear", "frozen-stacked", "unfrozen-linear", "unfrozen-stacked", "scratch"}
    for res in ft.values():
        assert res["lr"] in (1e-3, 1e-4) and set(res["lr_search"]) == {"0.001", "0.0001"}
        assert len(res["test"]["auc"]["values"]) == 2  # two seeds at the chosen LR
    assert set(summary["knn"]["breastmnist"]) == {"start", "random"}
    # depth-2 backbone: freezing 0..2 and decapitation 1..2; the end points reuse the full fine-tuning runs
    assert set(summary["curves"]["freezing"]["breastmnist"]["unfrozen-linear"]) == {f"freeze_blocks{k}" for k in range(3)}
    assert set(summary["curves"]["decapitation"]["breastmnist"]["frozen-stacked"]) == {"decapitate1", "decapitate2"}
    assert not (study_dir / "freezing" / "breastmnist" / "freeze_blocks0").exists()
    full = ft["unfrozen-linear"]["test"]["auc"]["values"][0]
    assert summary["curves"]["freezing"]["breastmnist"]["unfrozen-linear"]["freeze_blocks0"]["test"]["auc"]["values"] == [full]
    # the pretraining run is the start of every pretrained fine-tuning run
    start = summary["start"]["checkpoint"]
    assert start.endswith("backbone_best.pt") and "pretrain" in start
    cfg = yaml.safe_load((run_dirs(study_dir / "finetune" / "breastmnist" / "frozen-linear")[0] / "config.yaml").read_text())
    assert cfg["model"]["checkpoint"] == start and cfg["data"]["channels"] == 3
    tables = (study_dir / "tables.md").read_text()
    for heading in ("Table 1", "Table 2", "LR search", "k-NN", "Fig 4", "Fig 5", "(from scratch)"):
        assert heading in tables
    for name in summary["figures"].values():
        assert (study_dir / name).stat().st_size > 5000


def test_cka_results_have_bootstrap_intervals(study_dir: Path) -> None:
    cka = json.loads((study_dir / "study.json").read_text())["cka"]["breastmnist"]
    fig7 = cka["fig7/unfrozen-linear"]
    assert fig7["layers_a"] == ["model.blocks.0", "model.blocks.1"] and np.shape(fig7["cka"]) == (2, 2)
    d = fig7["diagonal"]
    assert all(lo <= c <= hi for lo, c, hi in zip(d["lower"], d["cka"], d["upper"]))
    assert fig7["mean_ci_width"] > 0
    assert "fig7/scratch" in cka
    assert cka["figA1/frozen-stacked"]["layers_a"] == ["classifier.blocks.0"]
    assert "figA1/unfrozen-stacked" in cka
    fig8 = np.array(cka["fig8"]["cka"])
    assert [n.split("/")[0] for n in cka["fig8"]["layers_a"]] == [
        "start", "random init", "scratch-trained", "unfrozen-linear", "unfrozen-stacked"]
    np.testing.assert_allclose(np.diag(fig8), 1.0, atol=1e-6)


def test_rerun_reuses_everything_and_other_settings_are_refused(study_dir: Path, tiny_root: Path) -> None:
    stamps = {p: p.stat().st_mtime_ns for p in study_dir.rglob("*") if p.suffix in (".pt", ".nc")}
    settings = replace(PRESETS["tiny"], targets=("breastmnist",))
    summary = Study(settings, study_dir, data_root=tiny_root, threads=1).run()
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert summary["timings_s"]["finetune"] < 10
    with pytest.raises(ValueError, match="other settings.*train"):
        Study(replace(settings, train={**settings.train, "epochs": 2}), study_dir, data_root=tiny_root).run()


def test_rebuilt_initial_classifier_matches_the_trainer(tiny_root: Path, tmp_path: Path) -> None:
    """With lr=0 the best checkpoint is the trainer's initial model: ``rebuild(init)`` must reproduce it."""
    from repsim.train import run_experiment

    s = PRESETS["tiny"]
    model = {"name": s.model, "kwargs": s.model_kwargs, "pretrained": False, "scenario": "frozen-stacked",
             "classifier": s.classifier}
    cfg = resolved_config({"dataset": "medmnist", "root": "medmnist", "flag": "breastmnist", "img_size": 28},
                          model, {**s.train, "lr_grid": None, "lr": 0.0, "seeds": 1})
    run_experiment(cfg, tmp_path / "exp", data_root=tiny_root, progress=False)
    (run,) = run_dirs(tmp_path / "exp")
    init, best = rebuild(run, tiny_root, "init"), rebuild(run, tiny_root, "best")
    for (name, a), b in zip(init.state_dict().items(), best.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    os.remove(run / "backbone_init.pt")
    torch.save({k: v + 1 for k, v in init.backbone.state_dict().items()}, run / "backbone_init.pt")
    with pytest.raises(RuntimeError, match="does not reproduce backbone_init.pt"):
        rebuild(run, tiny_root, "init")


def test_inconsistent_settings_are_named() -> None:
    with pytest.raises(ValueError, match="at most one of pretrained and checkpoint"):
        replace(PRESETS["tiny"], pretrained=True, checkpoint="x.pt").check()
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        replace(PRESETS["tiny"], targets=("nope",)).check()
    with pytest.raises(ValueError, match="unfrozen-linear"):
        replace(PRESETS["tiny"], scenarios=("frozen-linear",), decapitate=[]).check()


def test_report_of_a_study_embeds_its_tables_and_figures(study_dir: Path) -> None:
    from repsim.report import build_report

    text = build_report(study_dir)
    assert "Transfer study of" in text and "Table 1" in text and "fig7_cka_before_after.png" in text
    summary = json.loads((study_dir / "study.json").read_text())
    assert text.count("data:image/png;base64,") >= len(summary["figures"]) + 5  # figures + one curve per experiment
