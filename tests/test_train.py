"""The trainer end to end on real data with tiny models: beats chance, κ, csv and multilabel paths, run-directory
contract, exact resume after SIGKILL, DDP (2 gloo processes) == one process, LR search + seeds + table, bad input."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from repsim import models
from repsim.metrics import MetricWarning
from repsim.train import run
from repsim.train.config import expand, load_spec, packaged_specs
from repsim.train.table import collect, markdown_table

TINY_CNN = {"name": "test_resnet", "kwargs": {}, "pretrained": False}
TINY_VIT = {"name": "vit_tiny_patch16_224", "pretrained": False,
            "kwargs": {"patch_size": 4, "depth": 2, "embed_dim": 64, "num_heads": 2}}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
pytestmark = pytest.mark.usefixtures("one_thread")


def medmnist_spec(flag: str, model: dict = TINY_CNN, img_size: int = 28, **train) -> dict:
    return {"name": flag, "data": {"dataset": "medmnist", "root": "medmnist", "flag": flag, "img_size": img_size},
            "model": model, "train": {"epochs": 2, "batch_size": 32, "lr": 1e-3, "warmup_epochs": 1, "patience": 3,
                                      "num_workers": 0, **train}}


def only_run(out: Path) -> Path:
    (summary,) = out.rglob("summary.json")
    return summary.parent


@pytest.mark.parametrize(("flag", "epochs", "floor"), [("breastmnist", 6, 0.75), ("pneumoniamnist", 1, 0.9)])
def test_beats_chance_and_writes_the_run_contract(data_root, tmp_path, flag, epochs, floor) -> None:
    res = run(medmnist_spec(flag, epochs=epochs), data_root=data_root, out=tmp_path, progress=False)
    auc = res[flag]["test"]["auc"]["mean"]
    print(f"{flag}: test AUC {auc:.3f} after {epochs} epochs")
    assert auc > floor, res
    rd = only_run(tmp_path)
    summary = json.loads((rd / "summary.json").read_text())
    for key in ("best_epoch", "iterations_to_best", "inference_ms_per_image", "lr", "seed", "test", "val"):
        assert key in summary
    lines = (rd / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == summary["epochs_run"] == epochs and "val_auc" in json.loads(lines[0])
    assert yaml.safe_load((rd / "config.yaml").read_text())["train"]["epochs"] == epochs
    split = json.loads((rd / "split.json").read_text())
    assert len(split["train"]) + len(split["val"]) + len(split["test"]) > 0
    for name in ("checkpoints/best.pt", "checkpoints/init.pt", "backbone_init.pt", "backbone_best.pt"):
        assert (rd / name).is_file(), name
    assert not (rd / "checkpoints/last.pt").exists()  # a finished run is reused through summary.json, not resumed
    # CKA hand-off: the contract's rebuild gives the fine-tuned backbone, and it differs from the initial one
    rec = json.loads((rd / "model.json").read_text())
    assert rec["in_chans"] == 1 and rec["num_classes"] == 2
    best = models.create(rec["name"], checkpoint=rd / "backbone_best.pt", img_size=rec["img_size"],
                         in_chans=rec["in_chans"], **rec["kwargs"])
    init = models.create(rec["name"], checkpoint=rd / "backbone_init.pt", img_size=rec["img_size"],
                         in_chans=rec["in_chans"], **rec["kwargs"])
    saved = torch.load(rd / "checkpoints/best.pt", weights_only=True)["model"]
    for k, v in best.state_dict().items():
        torch.testing.assert_close(v, saved[f"backbone.{k}"])
    assert any(not torch.equal(v, init.state_dict()[k]) for k, v in best.state_dict().items())


def test_retinamnist_kappa(data_root, tmp_path) -> None:
    res = run(medmnist_spec("retinamnist", epochs=4), data_root=data_root, out=tmp_path, progress=False)["retinamnist"]
    assert res["metric"] == "kappa"
    kappa = res["test"]["kappa"]["mean"]
    print(f"retinamnist: test quadratic kappa {kappa:.3f} after 4 epochs")
    assert kappa > 0.3, res


def test_ham10000_csv_and_nih_multilabel_paths(data_root, tmp_path) -> None:
    ham = {"name": "ham", "model": TINY_CNN, "train": {"epochs": 1, "batch_size": 16, "num_workers": 0},
           "data": {"dataset": "csv", "root": "ham10000_sample", "csv": "HAM10000_metadata_sample.csv",
                    "image_col": "image_id", "label_col": "dx", "group_col": "lesion_id", "ext": ".jpg",
                    "img_size": 32}}
    res = run(ham, data_root=data_root, out=tmp_path / "ham", progress=False)["ham"]  # no MetricWarning:
    assert res["metric"] == "balanced_accuracy" and 0 <= res["test"]["balanced_accuracy"]["mean"] <= 1
    assert math.isfinite(res["test"]["auc"]["mean"])  # the stratified split puts all 7 classes in val and test
    split = json.loads((only_run(tmp_path / "ham") / "split.json").read_text())
    assert len(split["test"]) >= 7

    # 7 images of 3 patients: split_seed 1 puts the 5 images of patient 13 in train (no BatchNorm: ViT)
    nih = {"name": "nih", "model": TINY_VIT, "train": {"epochs": 1, "batch_size": 4, "num_workers": 0},
           "data": {"dataset": "nih_cxr14", "root": "nih_cxr14_examples", "csv": "labels.csv", "image_dir": ".",
                    "img_size": 32, "split": "random", "fractions": [0.4, 0.3, 0.3], "split_seed": 1}}
    with pytest.warns(MetricWarning, match="no positives or no negatives"):
        res = run(nih, data_root=data_root, out=tmp_path / "nih", progress=False)["nih"]
    assert res["metric"] == "auc" and "auc/Hernia" in res["test"]
    rec = json.loads((only_run(tmp_path / "nih") / "model.json").read_text())
    assert rec["num_classes"] == 14 and rec["in_chans"] == 1


def _spawn(argv: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as fh:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(argv, env=ENV, stdout=fh, stderr=fh)


def _cli(spec: Path, data_root: Path, out: Path, *extra: str) -> subprocess.Popen:
    return _spawn([sys.executable, "-m", "repsim.cli", "train", "--spec", str(spec), "--data-root", str(data_root),
                   "--out", str(out), *extra], out.with_suffix(".log"))


def _finish(proc: subprocess.Popen, out: Path) -> None:
    assert proc.wait(timeout=300) == 0, out.with_suffix(".log").read_text()[-3000:]


@pytest.mark.parametrize(("model", "budget"), [(TINY_VIT, {"epochs": 3}), (TINY_CNN, {"steps": 40})],
                         ids=["vit-epochs", "cnn-channels-last-steps"])
def test_resume_after_sigkill_matches_uninterrupted_run(data_root, tmp_path, model, budget) -> None:
    """Also under the defaults a convnet gets (channels_last) and a step budget that ends part-way through an
    epoch (40 steps of 17 per epoch)."""
    spec = tmp_path / "resume.yaml"
    spec.write_text(yaml.safe_dump(medmnist_spec("breastmnist", model, patience=1, **budget)))
    full, killed = _cli(spec, data_root, tmp_path / "full"), _cli(spec, data_root, tmp_path / "killed")
    metrics = tmp_path / "killed/breastmnist/lr0.001/seed0/metrics.jsonl"  # flat: <out>/<spec name>/lr/seed
    deadline = time.time() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        assert killed.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL
    _finish(_cli(spec, data_root, tmp_path / "killed", "--resume"), tmp_path / "killed")
    _finish(full, tmp_path / "full")
    a, b = only_run(tmp_path / "full"), only_run(tmp_path / "killed")
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sa["test"] == sb["test"] and sa["best_epoch"] == sb["best_epoch"] and sa["epochs_run"] == sb["epochs_run"]
    assert sa["channels_last"] == (model is TINY_CNN) and sa["iterations"] == budget.get("steps", sa["iterations"])
    def epochs(run_dir: Path) -> list[dict]:  # per-epoch records without the wall-clock time
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(ln).items() if k != "seconds"} for ln in lines]

    assert epochs(a) == epochs(b)  # every epoch's train loss and validation metrics, bit for bit
    wa, wb = (torch.load(d / "checkpoints/best.pt", weights_only=True)["model"] for d in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_ddp_two_gloo_processes_equal_one_process(data_root, tmp_path) -> None:
    spec = tmp_path / "ddp.yaml"
    spec.write_text(yaml.safe_dump(medmnist_spec("breastmnist", TINY_VIT, epochs=2, batch_size=42)))  # 546 = 13 x 42
    single = _cli(spec, data_root, tmp_path / "single")
    ddp = _spawn([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                  "-m", "repsim.cli", "train", "--spec", str(spec), "--data-root", str(data_root),
                  "--out", str(tmp_path / "ddp")], tmp_path / "ddp.log")
    _finish(single, tmp_path / "single")
    _finish(ddp, tmp_path / "ddp")
    a, b = only_run(tmp_path / "single"), only_run(tmp_path / "ddp")
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert (sa["world_size"], sb["world_size"]) == (1, 2)
    for k, v in sa["test"].items():
        assert sb["test"][k] == pytest.approx(v, abs=2e-3), k
    wa, wb = (torch.load(d / "checkpoints/best.pt", weights_only=True)["model"] for d in (a, b))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-3, atol=1e-4)


def test_lr_search_seeds_table_and_reuse(data_root, tmp_path, capsys) -> None:
    spec = medmnist_spec("breastmnist", epochs=1, lr_grid=[1e-3, 1e-4], seeds=2)
    res = run(spec, data_root=data_root, out=tmp_path, progress=False)["breastmnist"]
    assert set(res["lr_search"]) == {"0.001", "0.0001"} and res["lr"] in (1e-3, 1e-4)
    assert res["seeds"] == [0, 1] and len(res["test"]["auc"]["values"]) == 2
    assert len(list(tmp_path.rglob("summary.json"))) == 3  # seed 0 of the chosen LR is reused from the search
    stamp = [p.stat().st_mtime for p in sorted(tmp_path.rglob("summary.json"))]
    run(spec, data_root=data_root, out=tmp_path, progress=False)
    assert stamp == [p.stat().st_mtime for p in sorted(tmp_path.rglob("summary.json"))]
    table = markdown_table(collect([tmp_path]))
    assert "| test_resnet | random init | unfrozen-linear |" in table and "±" in table and "breastmnist, auc" in table
    from repsim.cli import main

    assert main(["table", str(tmp_path)]) == 0
    assert "breastmnist, auc" in capsys.readouterr().out


@pytest.mark.parametrize(("scenario", "options", "trained_blocks"),
                         [("frozen-stacked", {"decapitate": 1}, set()), ("unfrozen-linear", {"freeze_blocks": 1}, {1})])
def test_scenarios_freeze_what_they_say(data_root, tmp_path, scenario, options, trained_blocks) -> None:
    model = {**TINY_VIT, "scenario": scenario, "classifier": {"depth": 1, "embed_dim": 32, "num_heads": 2},
             **options}
    run(medmnist_spec("breastmnist", model, epochs=1), data_root=data_root, out=tmp_path, progress=False)
    rd = only_run(tmp_path)
    init, best = (torch.load(rd / n, weights_only=True) for n in ("backbone_init.pt", "backbone_best.pt"))
    changed = {int(k.split(".")[2]) for k in init
               if k.startswith("model.blocks.") and not torch.equal(init[k], best[k])}
    assert changed == trained_blocks
    rec = json.loads((rd / "model.json").read_text())
    assert {k: rec[k] for k in options} == options
    assert rec["classifier"] == (model["classifier"] if scenario.endswith("stacked") else {})
    rebuilt = models.create(rec["name"], checkpoint=rd / "backbone_best.pt", img_size=rec["img_size"],
                            in_chans=rec["in_chans"], decapitate=rec["decapitate"], **rec["kwargs"])
    assert rebuilt.num_blocks == (1 if rec["decapitate"] else 2)


def test_knn_spec(data_root, tmp_path) -> None:
    spec = {**medmnist_spec("breastmnist"), "knn": {"k": 20, "temperature": 0.07, "batch_size": 256}}
    res = run(spec, data_root=data_root, out=tmp_path, kind="knn", progress=False)["breastmnist"]
    assert res["scenario"] == "knn" and 0 <= res["test"]["auc"]["mean"] <= 1
    assert (tmp_path / "breastmnist/knn.json").is_file()


def test_bad_input_gives_clear_errors(data_root, tmp_path) -> None:
    spec = medmnist_spec("breastmnist", epochs=1)
    with pytest.raises(ValueError, match="unknown scenario 'frozen-mlp'"):
        run(spec, data_root=data_root, out=tmp_path, overrides=["model.scenario=frozen-mlp"])
    with pytest.raises(ValueError, match="1-channel images but the model expects in_chans=3"):
        run(spec, data_root=data_root, out=tmp_path, overrides={"model.kwargs": {"in_chans": 3}})
    with pytest.raises(FileNotFoundError, match="MedMNIST dermamnist not found"):
        run(spec, data_root=data_root, out=tmp_path, overrides=["data.flag=dermamnist"])
    ham = {"dataset": "csv", "root": "ham10000_sample", "csv": "HAM10000_metadata_sample.csv",
           "image_col": "image_id", "label_col": "diagnosis"}
    with pytest.raises(ValueError, match=r"missing column\(s\) \['diagnosis'\]"):
        run({**spec, "data": ham}, data_root=data_root, out=tmp_path)
    with pytest.raises(ValueError, match=r"unknown train keys \['epoch'\]"):
        run(spec, data_root=data_root, out=tmp_path, overrides=["train.epoch=3"])
    with pytest.raises(ValueError, match="train.metric='auc_mean5' is not available"):
        run(spec, data_root=data_root, out=tmp_path, overrides=["train.metric=auc_mean5"])
    with pytest.raises(ValueError, match="not key=value"):
        run(spec, data_root=data_root, out=tmp_path, overrides=["train.epochs"])
    run(spec, data_root=data_root, out=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"different config \(train.epochs\)"):
        run(spec, data_root=data_root, out=tmp_path, overrides=["train.epochs=2"])
    rd = only_run(tmp_path)
    (rd / "summary.json").unlink()  # as if the run had been killed after an epoch
    (rd / "checkpoints" / "last.pt").write_bytes(b"")
    with pytest.raises(FileExistsError, match="--resume"):
        run(spec, data_root=data_root, out=tmp_path, progress=False)


def test_packaged_specs_expand(capsys, tmp_path) -> None:
    names = packaged_specs()
    for required in ("table1", "table2", "table3", "fig2_knn", "fig3_timing", "fig4_freezing", "fig5_decapitation",
                     "fig6_dinov2_sizes", "breastmnist_tiny"):
        assert required in names
    counts = {n: len(expand(load_spec(n))) for n in names}
    assert counts["table1"] == counts["table2"] == (3 + 5 * 2) * 4  # baselines linear, foundation linear/stacked
    assert counts["fig4_freezing"] == (5 * 13 + 5) * 4 and counts["fig6_dinov2_sizes"] == 4 * 3
    assert counts["fig2_knn"] == 8 * 4 and counts["table3"] == 5 * 4
    for name in names:
        for _, cfg in expand(load_spec(name)):
            assert cfg["model"]["scenario"] in models.SCENARIOS
    from repsim.cli import main

    (tmp_path / "APTOS2019").mkdir()  # --dry-run checks that the data folder exists
    assert main(["train", "--spec", "fig4_freezing", "--dry-run", "--model", "deit_b", "--freeze-blocks", "3",
                 "--data-root", str(tmp_path), "data={dataset: aptos2019, root: APTOS2019}"]) == 0
    assert capsys.readouterr().out.split() == ["aptos2019__deit_b__freeze_blocks3", "train", "deit_b",
                                               "unfrozen-linear", "aptos2019"]
