"""Intra-op threads against model size: img/s of one training step (forward, backward, AdamW) at 1 thread and at
every core, interleaved repeats, medians; the forward GFLOP per sample that ``repsim.threads.auto_threads`` decides
on, and what it picks. Run on a quiet machine: ``python bench/threads.py [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from repsim.models import create
from repsim.threads import SMALL_GFLOP, auto_threads, forward_gflop

CONFIGS = [  # (name, zoo/timm name, create kwargs, image size, batch)
    ("2-block ViT (breastmnist_tiny)", "vit_tiny_patch16_224", {"patch_size": 4, "depth": 2, "embed_dim": 64,
                                                                "num_heads": 2}, 28, 32),
    ("timm test_resnet", "test_resnet", {}, 32, 64),
    ("EfficientNet-Lite0", "efficientnet_lite0", {}, 48, 64),
    ("ViT-Tiny/16", "vit_tiny_patch16_224", {}, 64, 64),
    ("EfficientNet-Lite0", "efficientnet_lite0", {}, 128, 32),
    ("ResNet-18", "resnet18", {}, 224, 16),
]


def step_seconds(model: torch.nn.Module, head: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
                 y: torch.Tensor) -> float:
    start = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(head(model.forward_features(x)), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per repeat (after one warm-up step)")
    args = parser.parse_args()
    os.environ.pop("OMP_NUM_THREADS", None)
    cores = torch.get_num_threads()
    print(f"torch {torch.__version__}, {cores} threads by default; one-thread rule below {SMALL_GFLOP} GFLOP/sample\n")
    print(f"| model | px | batch | fwd GFLOP/sample | img/s 1 thread | img/s {cores} threads | 1 vs {cores} "
          "| auto picks |")
    print("|---|---|---|---|---|---|---|---|")
    for label, name, kwargs, size, batch in CONFIGS:
        torch.manual_seed(0)
        model = create(name, img_size=size, **kwargs).train()
        head = torch.nn.Linear(model.num_features, 2)
        opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=1e-4)
        x, y = torch.randn(batch, 3, size, size), torch.randint(0, 2, (batch,))
        gflop = forward_gflop(model, x[:1])
        torch.set_num_threads(cores)
        picked = auto_threads(model, x[:1])
        rates: dict[int, list[float]] = {1: [], cores: []}
        for _ in range(args.repeats):
            for threads in rates:  # interleaved: 1, N, 1, N, ...
                torch.set_num_threads(threads)
                step_seconds(model, head, opt, x, y)  # warm-up at this thread count
                rates[threads].append(batch * args.steps / sum(step_seconds(model, head, opt, x, y)
                                                                for _ in range(args.steps)))
        one, many = statistics.median(rates[1]), statistics.median(rates[cores])
        print(f"| {label} | {size} | {batch} | {gflop:.3f} | {one:.0f} | {many:.0f} | {one / many:.2f}x | {picked} |")
        torch.set_num_threads(cores)


if __name__ == "__main__":
    main()
