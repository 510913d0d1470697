"""Does self-supervised pretraining help? A frozen probe of pretraining runs against random init and ImageNet.

For each start (a ``repsim pretrain`` run folder, or ``random:<model>`` / ``imagenet:<model>``): the pooled features
of the train, val and test images (eval transform, dataset normalisation, 3 channels), then on the test split the
weighted k-NN AUC (k=200, cosine, T=0.1: ``repsim.knn``), a logistic-regression AUC (standardised features, C chosen
on val) and the effective rank of the features (``repsim.metrics.spectrum``). Prints a markdown table.

    python analyses/pretrain_probe.py random:efficientnet_lite0 imagenet:efficientnet_lite0 runs/pt/* \
        --data breastmnist --data-root ../shared/data --img-size 48
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from repsim import models
from repsim.data import loader
from repsim.files import load_torch
from repsim.knn import extract_features, knn_predict
from repsim.metrics import compute_metrics, spectrum
from repsim.train.runs import load_run


def backbone_of(start: str, img_size: int) -> torch.nn.Module:
    kind, _, name = start.partition(":")
    if kind in ("random", "imagenet") and name:
        torch.manual_seed(0)
        return models.create(name, pretrained=kind == "imagenet", img_size=img_size)
    run = Path(start)
    if (run / "backbone_best.pt").is_file() or not (run / "checkpoints" / "last.pt").is_file():
        return load_run(run)
    # a run still going (or stopped): the result backbone of its last epoch checkpoint
    record = json.loads((run / "model.json").read_text())
    prefix = "teacher.backbone." if record["method"] == "dino" else "student.backbone."
    state = load_torch(run / "checkpoints" / "last.pt")["method"]
    backbone = models.create(record["name"], img_size=record["img_size"], in_chans=record["in_chans"],
                             **record["kwargs"])
    backbone.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return backbone


def probe(start: str, data: str, data_root: Path, img_size: int) -> dict[str, float]:
    backbone = backbone_of(start, img_size).eval()
    feats = {s: extract_features(backbone, loader(data, split=s, img_size=img_size, root=data_root, channels=3))
             for s in ("train", "val", "test")}
    (bank, bank_y), (val, val_y), (test, test_y) = feats["train"], feats["val"], feats["test"]
    classes = int(bank_y.max()) + 1
    task = "binary" if classes == 2 else "multiclass"
    metric = "auc"
    scores = knn_predict(bank, bank_y, test, k=200, temperature=0.1, num_classes=classes)
    knn = compute_metrics(task, test_y.numpy(), scores.numpy().astype(np.float64))[metric]
    scaler = StandardScaler().fit(bank.numpy())
    best = None
    for c in (1e-3, 1e-2, 1e-1, 1.0):
        clf = LogisticRegression(C=c, max_iter=2000).fit(scaler.transform(bank.numpy()), bank_y.numpy())
        v = compute_metrics(task, val_y.numpy(), clf.predict_proba(scaler.transform(val.numpy())))[metric]
        if best is None or v > best[0]:
            best = (v, clf)
    assert best is not None
    logreg = compute_metrics(task, test_y.numpy(), best[1].predict_proba(scaler.transform(test.numpy())))[metric]
    out = {"knn_auc": knn, "logreg_auc": logreg, "effective_rank": spectrum(test.numpy())["effective_rank"]}
    metrics = Path(start) / "metrics.jsonl"
    if metrics.is_file():  # the last epoch: its loss; wall time summed over epochs
        epochs = [json.loads(ln) for ln in metrics.read_text().splitlines()]
        out.update(final_loss=epochs[-1]["loss"], chance_loss=epochs[-1]["chance_loss"],
                   train_seconds=sum(e["seconds"] for e in epochs), epochs=len(epochs))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("starts", nargs="+", help="run folders, random:<model> or imagenet:<model>")
    p.add_argument("--data", default="breastmnist")
    p.add_argument("--data-root", type=Path, required=True)
    p.add_argument("--img-size", type=int, default=48)
    args = p.parse_args()
    print("| start | test AUC (k-NN) | test AUC (logistic) | effective rank | final loss (chance) | epochs | wall |")
    print("|---|---|---|---|---|---|---|")
    for start in args.starts:
        r = probe(start, args.data, args.data_root, args.img_size)
        loss = f"{r['final_loss']:.3f} ({r['chance_loss']:.3f})" if "final_loss" in r else "-"
        wall = f"{r['train_seconds'] / 60:.1f} min" if "train_seconds" in r else "-"
        print(f"| {start} | {r['knn_auc']:.3f} | {r['logreg_auc']:.3f} | {r['effective_rank']:.1f} | {loss} | "
              f"{r.get('epochs', '-')} | {wall} |", flush=True)


if __name__ == "__main__":
    main()
