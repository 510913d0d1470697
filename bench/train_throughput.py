"""Training throughput of the study's real configurations: img/s of optimiser steps, repsim's trainer against a bare
timm + torch loop and against the variants that could make a step cheaper, medians of interleaved repeats.

Every number is ``STEPS`` optimiser steps on RetinaMNIST's train split (the study's 48 px, AdamW) read through the
same DataLoader (PIL decode + augmentation), so data, forward, backward and the optimiser step are all inside it:
- ``bare``: a bare timm + torch loop (forward, cross-entropy, backward, AdamW step) -- the floor;
- ``trainer``: ``repsim.train.train`` (training-loop seconds / iterations from its summary; validation excluded),
  with its defaults (``auto`` threads: one below 1 forward GFLOP per image; ``auto`` memory format: channels_last
  on a convnet), with ``train.channels_last=false``, and pinned to every core (``REPSIM_THREADS``);
- ``channels_last``, ``batch`` 32/128, ``threads`` 1: the bare loop with one thing changed;
- ``2 jobs x 1 thread``: two bare loops in two processes at once (summed img/s: what ``repsim study --jobs 2``
  gets);
- ``compile`` (``--compile``): ``torch.compile`` of the bare loop's model, with its first-compile cost (cold, then
  with inductor's on-disk cache warm in a fresh process);
- ``data only``: the DataLoader alone (PIL decode + augmentation + collate), to see whether the data path matters;
- ``frozen head (cached)`` and ``DINO step``: the trainer's frozen-linear head on cached backbone outputs, and
  ``repsim.train.pretrain``'s DINO step (2 global + local crops).
The same run prints the fp32 matmul peak. Run on quiet cores::

    python bench/train_throughput.py [--repeats 5] [--compile]
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from repsim.data import default_root, prepare  # noqa: E402
from repsim.threads import kept_threads  # noqa: E402
from repsim.train.config import DEFAULTS, deep_merge  # noqa: E402
from repsim.train.loop import train  # noqa: E402
from repsim.train.utils import build_model  # noqa: E402

DATA = {"dataset": "medmnist", "root": "medmnist", "flag": "retinamnist", "img_size": 48, "channels": 3}
STEPS = 20  # optimiser steps per measurement


def config(scenario: str = "unfrozen-linear", batch: int = 64, **train_kw: Any) -> dict[str, Any]:
    """The study's Lite0 run (48 px, ImageNet normalisation) for ``STEPS`` steps."""
    classifier = {"model": "deit_tiny_patch16_224", "depth": 2, "embed_dim": 192, "num_heads": 3, "max_grid": 8}
    return deep_merge(DEFAULTS, {
        "data": {**DATA, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        "model": {"name": "efficientnet_lite0", "pretrained": False, "scenario": scenario,
                  "classifier": classifier if scenario.endswith("stacked") else {}},
        "train": {"steps": STEPS, "batch_size": batch, "lr": 1e-4, "warmup_epochs": 1, "patience": 10**6,
                  "num_workers": 0, "device": "cpu", **train_kw}})


def bare(cfg: dict[str, Any], root: str, *, channels_last: bool = False, compile_model: bool = False,
         data_only: bool = False) -> float:
    """img/s of ``STEPS`` steps of the bare loop (or of the DataLoader alone)."""
    torch.manual_seed(0)
    data = prepare(cfg["data"], root, seed=0)
    model, _ = build_model(cfg, data)
    model.train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    net: Callable[[torch.Tensor], torch.Tensor] = torch.compile(model) if compile_model else model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=1e-5)
    train_set = data.datasets["train"]
    train_set.set_epoch(0)
    loader = torch.utils.data.DataLoader(train_set, batch_size=cfg["train"]["batch_size"], shuffle=True)
    n, start = 0, time.perf_counter()  # every step timed, the first too, as the trainer's train_seconds
    for step, (x, y) in enumerate(loader, 1):
        n += len(y)
        if not data_only:
            loss = F.cross_entropy(net(x.contiguous(memory_format=fmt)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if step == STEPS:
            break
    return n / (time.perf_counter() - start)


def trainer(cfg: dict[str, Any], root: str) -> float:
    """img/s of repsim's training loop (its summary's train_seconds over the images its iterations saw)."""
    with tempfile.TemporaryDirectory() as tmp, kept_threads():  # train() picks its own threads (auto_threads)
        s = train(copy.deepcopy(cfg), tmp, data_root=root, progress=False)
    return s["iterations"] * cfg["train"]["batch_size"] / s["train_seconds"]


def dino(root: str) -> float:
    """img/s (source images, each giving 2 global + 2 local crops) of one epoch of DINO pretraining (BreastMNIST)."""
    from repsim.train.pretrain import pretrain

    cfg = {"data": {**DATA, "flag": "breastmnist"}, "model": {"name": "efficientnet_lite0", "pretrained": False},
           "train": {"epochs": 1, "batch_size": 64, "num_workers": 0, "device": "cpu"}}
    with tempfile.TemporaryDirectory() as tmp, kept_threads():
        s = pretrain(cfg, tmp, data_root=root, progress=False)
    return s["iterations"] * 64 / s["train_seconds"]


def _threaded(threads: int, fn: Callable[..., float], *args: Any, **kw: Any) -> float:
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn(*args, **kw)
    finally:
        torch.set_num_threads(saved)


def _pinned(fn: Callable[..., float], *args: Any) -> float:
    """``fn`` with the trainer's thread rule pinned to every core (``REPSIM_THREADS``)."""
    os.environ["REPSIM_THREADS"] = str(torch.get_num_threads())
    try:
        return fn(*args)
    finally:
        del os.environ["REPSIM_THREADS"]


def _one_job(args: tuple[dict[str, Any], str]) -> tuple[float, float]:
    torch.set_num_threads(1)
    start = time.perf_counter()
    rate = bare(*args)
    return rate, time.perf_counter() - start


def two_jobs(cfg: dict[str, Any], root: str) -> float:
    """Summed img/s of two one-thread bare loops running at once in two processes."""
    with mp.get_context("spawn").Pool(2) as pool:
        res = pool.map(_one_job, [(cfg, root)] * 2)
    return sum(r for r, _ in res)


def matmul_gflops(threads: int, n: int = 1024, repeats: int = 5) -> float:
    """fp32 matmul GFLOP/s (best of ``repeats``) at ``threads`` threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * n ** 3 / (time.perf_counter() - start) / 1e9)
    torch.set_num_threads(saved)
    return best


def compile_cost(root: str) -> dict[str, float]:
    """Seconds to import and run the first compiled steps in a fresh process: inductor cache cold, then warm."""
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        code = ("import time,sys; sys.argv=['x']; t=time.perf_counter(); import bench.train_throughput as b; "
                f"b.bare(b.config(), {root!r}, compile_model=True); print(time.perf_counter()-t)")
        for label in ("cold", "warm"):
            res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            out[label] = float(res.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=str(default_root() or "../shared/data"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also torch.compile (first compile takes minutes)")
    parser.add_argument("--only", nargs="+", default=None, metavar="TEXT",
                        help="run only the variants whose names contain one of these texts (and the baselines)")
    args = parser.parse_args()
    root, cores = args.data_root, torch.get_num_threads()
    lin, stk = config(), config("unfrozen-stacked")
    variants: dict[str, Callable[[], float]] = {
        "bare (timm + torch, NCHW)": lambda: bare(lin, root),
        "trainer (defaults)": lambda: trainer(lin, root),
        "trainer, channels_last off": lambda: trainer(config(channels_last=False), root),
        "trainer, all threads": lambda: _pinned(trainer, lin, root),
        "bare, channels_last": lambda: bare(lin, root, channels_last=True),
        "bare, batch 128": lambda: bare(config(batch=128), root),
        "bare, 1 thread": lambda: _threaded(1, bare, lin, root),
        "bare, channels_last, 1 thread": lambda: _threaded(1, bare, lin, root, channels_last=True),
        "bare, 2 jobs x 1 thread (sum)": lambda: two_jobs(lin, root),
        "bare, channels_last, 2 jobs x 1 thread": lambda: two_jobs(config(channels_last=True), root),
        "data only (DataLoader)": lambda: bare(lin, root, data_only=True),
        "stacked: bare": lambda: bare(stk, root),
        "stacked: bare, channels_last": lambda: bare(stk, root, channels_last=True),
        "frozen-linear head on cached outputs: trainer": lambda: trainer(
            config("frozen-linear", cache_frozen=True), root),
        "DINO pretraining step": lambda: dino(root),
    }
    if args.compile:
        variants["bare, torch.compile"] = lambda: bare(lin, root, compile_model=True)
    if args.only:
        keep = ("bare (timm + torch, NCHW)", "trainer, channels_last off")  # the columns' references
        variants = {k: v for k, v in variants.items() if k in keep or any(t in k for t in args.only)}
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():  # one warm-up each (imports, allocator, compile)
        fn()
    for r in range(args.repeats):
        for name, fn in variants.items():
            rates[name].append(fn())
            print(f"repeat {r + 1}/{args.repeats}: {name}: {rates[name][-1]:.1f} img/s", file=sys.stderr)
    base = statistics.median(rates["bare (timm + torch, NCHW)"])
    trainer_now = statistics.median(rates["trainer, channels_last off"])
    print(f"\nEfficientNet-Lite0, RetinaMNIST train at 48 px, {STEPS} steps, batch 64 unless named, {cores} threads "
          f"unless named; torch {torch.__version__}; medians of {args.repeats} interleaved repeats")
    print(f"fp32 matmul peak (1024^2): {matmul_gflops(1):.0f} GFLOP/s on 1 thread, "
          f"{matmul_gflops(cores):.0f} GFLOP/s on {cores}\n")
    print("| variant | img/s (median) | vs bare | vs trainer before | repeats (img/s) |")
    print("|---|---|---|---|---|")
    for name, vals in rates.items():
        med = statistics.median(vals)
        print(f"| {name} | {med:.1f} | {med / base:.2f}x | {med / trainer_now:.2f}x | "
              f"{', '.join(f'{v:.0f}' for v in vals)} |")
    if args.compile:
        cost = compile_cost(root)
        print(f"\ntorch.compile first epoch in a fresh process: {cost['cold']:.0f} s with inductor's cache cold, "
              f"{cost['warm']:.0f} s with it warm")


if __name__ == "__main__":
    main()
