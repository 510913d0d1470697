"""Trainer overhead: time per training step of ``repsim.train.train`` vs a bare PyTorch loop.

Both loops train the same model (same init) on the same DataLoader batches (same dataset, transform and batch
size) for the same number of epochs; the bare loop does only forward, cross-entropy, backward and AdamW step. The
trainer adds what the paper's recipe needs: per-step LR (warmup/plateau), autocast/GradScaler (no-ops on CPU),
gradient clipping, the distributed sampler, loss bookkeeping and progress bars. Its time is the sum of its
training-loop time (``summary.json: train_seconds``, validation excluded) over its iterations. Runs alternate
(bare, trainer, bare, ...); the overhead is the median over pairs of trainer/bare, so that load from other
processes, which shifts both runs of a pair alike, cancels.

    python bench/train_overhead.py --data-root ../shared/data [--device cuda] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from repsim.data import default_root, prepare  # noqa: E402
from repsim.train.config import DEFAULTS, deep_merge  # noqa: E402
from repsim.train.loop import train  # noqa: E402
from repsim.train.utils import build_model, pick_device  # noqa: E402


def bare_loop(cfg: dict, data_root: str) -> float:
    """Seconds per step of the minimal loop."""
    tc = cfg["train"]
    torch.manual_seed(tc["seed"])
    data = prepare(cfg["data"], data_root, seed=tc["seed"])
    model, _ = build_model(cfg, data)
    device = pick_device(tc["device"])
    model.to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=tc["lr"],
                            weight_decay=tc["weight_decay"])
    loader = torch.utils.data.DataLoader(data.datasets["train"], batch_size=tc["batch_size"], shuffle=True,
                                         num_workers=tc["num_workers"], pin_memory=device.type == "cuda")
    steps, seconds = 0, 0.0
    for epoch in range(tc["epochs"]):
        data.datasets["train"].set_epoch(epoch)
        start = time.perf_counter()
        for x, y in loader:
            loss = F.cross_entropy(model(x.to(device, non_blocking=True)), y.to(device, non_blocking=True))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - start
    return seconds / steps


def trainer_loop(cfg: dict, data_root: str) -> float:
    """Seconds per step of repsim's trainer (training loop only)."""
    with tempfile.TemporaryDirectory() as tmp:
        summary = train(cfg, tmp, data_root=data_root, progress=True)
    return summary["train_seconds"] / summary["iterations"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=str(default_root() or "../shared/data"),
                   help="default: $REPSIM_DATA, else ../shared/data beside the repository")
    p.add_argument("--flag", default="pneumoniamnist", help="MedMNIST dataset under <data-root>/medmnist")
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--img-size", type=int, default=28)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = deep_merge(DEFAULTS, {
        "data": {"dataset": "medmnist", "root": "medmnist", "flag": args.flag, "img_size": args.img_size,
                 "augment": False},
        "model": {"name": args.model, "pretrained": False, "scenario": "unfrozen-linear",
                  "kwargs": {"patch_size": args.patch_size, "depth": args.depth}},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": 1e-4, "warmup_epochs": 1,
                  "patience": 10**6, "num_workers": args.num_workers, "device": args.device}})
    bare, trainer = [], []
    for _ in range(args.repeats):
        bare.append(bare_loop(cfg, args.data_root))
        trainer.append(trainer_loop(cfg, args.data_root))
    ratios = [t / b for b, t in zip(bare, trainer)]
    device = pick_device(args.device)
    print(f"\n{args.model} depth {args.depth}, {args.img_size} px, batch {args.batch_size}, {args.flag}, "
          f"{args.epochs} epoch(s) x {args.repeats} pairs, device {device}, {torch.get_num_threads()} threads")
    print("| loop | ms/step (median) | runs (ms/step) |")
    print("|---|---|---|")
    for name, runs in (("bare torch", bare), ("repsim trainer", trainer)):
        print(f"| {name} | {1e3 * statistics.median(runs):.2f} | {', '.join(f'{1e3 * v:.2f}' for v in runs)} |")
    print(f"\ntrainer overhead (median of per-pair ratios): {100 * (statistics.median(ratios) - 1):+.1f} % "
          f"(pairs: {', '.join(f'{100 * (r - 1):+.1f}' for r in ratios)} %)")


if __name__ == "__main__":
    main()
