"""GPU check (run on a machine with CUDA; `bash bench/gpu_check.sh`): four numbers for the README.

1. CUDA vs CPU: the same minibatch CKA (two random-init ViT-Tiny, 12 blocks, 512 synthetic images) on both devices;
   max |difference| (target <= 1e-6).
2. CKA throughput against the device's fp32 matmul peak (TF32 off): the cka_math configuration (48 wide elementwise
   layers x 2 models, n 512, d 4096), GFLOP/s of the CKA work (wall time less a plain forward) as a share of the peak
   (target >= 50 %).
3. One AMP training step through the trainer (``repsim.train.loop.train``, bf16 autocast) on a synthetic image
   folder: it runs and the loss is finite.
4. The stream bench on the GPU: forward only vs repsim.compare vs pytorch-cka, two ViT-Tiny at 64 px, 4,096
   synthetic images, batch 256 (medians of 3 interleaved runs).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from cka_math import make_model  # noqa: E402
from peers import pytorch_cka  # noqa: E402

import repsim  # noqa: E402

LAYERS = [f"blocks.{i}" for i in range(12)]


def sync_time(fn) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def vits(device: str, img_size: int = 64) -> list[torch.nn.Module]:
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        out.append(timm.create_model("vit_tiny_patch16_224", img_size=img_size, num_classes=0).eval().to(device))
    return out


def cuda_vs_cpu() -> float:
    torch.manual_seed(2)
    x = torch.randn(512, 3, 64, 64)
    loader = DataLoader(TensorDataset(x, torch.zeros(512)), batch_size=64)
    got = {d: repsim.compare(*vits(d), loader, layers_a=LAYERS, device=d, progress=False).cka.values
           for d in ("cpu", "cuda")}
    return float(np.abs(got["cpu"] - got["cuda"]).max())


def throughput() -> tuple[float, float]:
    torch.backends.cuda.matmul.allow_tf32 = False
    n, d, layers, batches = 512, 4096, 48, 8
    a = torch.randn(8192, 8192, device="cuda")
    peak = 2 * 8192**3 / min(sync_time(lambda: a @ a) for _ in range(5)) / 1e9
    data = torch.randn(n * batches, d)
    loader = DataLoader(TensorDataset(data, torch.zeros(len(data))), batch_size=n)
    ma, mb = (make_model(layers, d, torch.sin, 0.0, seed=s).cuda() for s in (1, 2))
    names = [str(i) for i in range(layers)]

    def fwd() -> None:
        with torch.no_grad():
            for x, _ in loader:
                ma(x.cuda()), mb(x.cuda())

    fwd()
    t_fwd = min(sync_time(fwd) for _ in range(3))
    t_cka = min(sync_time(lambda: repsim.compare(ma, mb, loader, layers_a=names, progress=False)) for _ in range(3))
    flops = batches * (2 * layers * 2 * n * n * d + layers * layers * 2 * n * n)
    return flops / max(t_cka - t_fwd, 1e-9) / 1e9, peak


def amp_step(tmp: Path) -> float:
    from repsim.study.workspace import materialise_synthetic
    from repsim.train.config import expand
    from repsim.train.loop import train

    folder = materialise_synthetic("synthetic-target", tmp / "data", 32, 256)
    spec = {"name": "amp", "data": {"dataset": "image_folder", "root": str(folder), "img_size": 32},
            "model": {"name": "test_vit", "pretrained": False, "scenario": "unfrozen-linear"},
            "train": {"epochs": 1, "batch_size": 64, "lr": 1e-3, "amp": True, "device": "cuda", "num_workers": 0}}
    ((_, cfg),) = expand(spec)
    train(cfg, tmp / "run", progress=False)
    return json.loads((tmp / "run" / "metrics.jsonl").read_text().splitlines()[0])["train_loss"]


def stream() -> dict[str, float]:
    torch.manual_seed(3)
    x = torch.randn(4096, 3, 64, 64)
    loader = DataLoader(TensorDataset(x, torch.zeros(len(x))), batch_size=256, pin_memory=True)
    ma, mb = vits("cuda")

    def fwd() -> None:
        with torch.no_grad():
            for xb, _ in loader:
                xb = xb.cuda(non_blocking=True)
                ma(xb), mb(xb)

    runs = {"forward only": fwd,
            "repsim.compare": lambda: repsim.compare(ma, mb, loader, layers_a=LAYERS, progress=False),
            "pytorch-cka": lambda: pytorch_cka(ma, mb, loader, LAYERS, device="cuda")}
    fwd()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(3):
        for k, fn in runs.items():
            times[k].append(sync_time(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check needs CUDA")
    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | repsim {repsim.__version__}")
    diff = cuda_vs_cpu()
    print(f"1. CUDA vs CPU, max |CKA difference|: {diff:.1e} ({'ok' if diff <= 1e-6 else 'ABOVE 1e-6'})")
    gf, peak = throughput()
    print(f"2. CKA throughput: {gf:.0f} GFLOP/s = {100 * gf / peak:.0f}% of the fp32 matmul peak ({peak:.0f} GFLOP/s,"
          f" TF32 off)")
    with tempfile.TemporaryDirectory() as tmp:
        loss = amp_step(Path(tmp))
    print(f"3. AMP training step: train loss {loss:.3f} ({'finite' if math.isfinite(loss) else 'NOT FINITE'})")
    t = stream()
    fwd = t["forward only"]
    print("4. stream bench (2 x ViT-Tiny, 64 px, 4,096 images, batch 256): " +
          ", ".join(f"{k} {v:.2f} s ({v / fwd:.2f}x)" for k, v in t.items()))


if __name__ == "__main__":
    main()
