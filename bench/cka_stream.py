"""Forward-dominated CKA bench: two random-init 12-block ViT-Tiny at 64 px on real RetinaMNIST images.

All 12 blocks of each model, tokens flattened (17 x 192 features), batch 128, N = 1,024 images (the RetinaMNIST
train split, upsampled from 28 to 64 px). Measured side by side in one process: the forward passes alone (the floor
for any hook-based tool), repsim.compare, pytorch-cka and torch-cka. Each library's 12 x 12 unbiased minibatch CKA
is checked against a float64 reference computed here from stored activations with the equations (Song et al.'s
unbiased HSIC on Grams of centred features, averaged over batches as in Nguyen et al. 2021). Peak RSS growth is read
from /proc/self/status (VmHWM, reset before each run through /proc/self/clear_refs), for the first run (which
includes one-time costs such as imports) and the later ones. Wall and process CPU times are medians of
``--repeats`` interleaved runs (the range is printed too); the same-run fp32 matmul peak is printed for scale.
Memory against dataset size: bench/cka_scale.py.

    python bench/cka_stream.py [--data ../shared/data/medmnist/retinamnist.npz] [--threads 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import timm
import torch
from peers import pytorch_cka, torch_cka
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import repsim
from repsim.data import default_root

LAYERS = [f"blocks.{i}" for i in range(12)]
DATA_ROOT = default_root() or Path("../shared/data")  # $REPSIM_DATA, else ../shared/data beside the repository
DEFAULT_DATA = DATA_ROOT / "medmnist" / "retinamnist.npz"


# ------------------------------------------------------------------------------------------------ setup
def load_images(path: Path, n: int, size: int) -> torch.Tensor:
    """The first ``n`` RetinaMNIST train images as (n, 3, size, size) float32, normalised and upsampled."""
    with np.load(path) as npz:
        imgs = npz["train_images"][:n]
    if len(imgs) < n:
        raise ValueError(f"{path} has only {len(imgs)} train images, need {n}")
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0
    x = (x - 0.5) / 0.25
    return nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def make_vit(seed: int, img_size: int) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img_size, num_classes=0).eval()


# ------------------------------------------------------------------------------------------------ measurement
def _status(key: str) -> int:
    """A /proc/self/status memory field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def measure(fn: Callable[[], np.ndarray | None]) -> tuple[float, float, float, np.ndarray | None]:
    """(wall seconds, process CPU seconds, peak RSS growth in MB over the RSS at the start, result) of one call."""
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    rss0 = _status("VmRSS")
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    dt, dc = time.perf_counter() - t, time.process_time() - c
    return dt, dc, (_status("VmHWM") - rss0) / 2**20, out


# ------------------------------------------------------------------------------------------------ contestants
def forward_only(ma: nn.Module, mb: nn.Module, loader: DataLoader) -> None:
    with torch.no_grad():
        for x, _ in loader:
            ma(x)
            mb(x)


def run_repsim(ma: nn.Module, mb: nn.Module, loader: DataLoader) -> np.ndarray:
    return repsim.compare(ma, mb, loader, layers_a=LAYERS, pool="flatten", progress=False).cka.values


def block_outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The 12 block outputs, flattened, by running timm's ViT stages by hand (no hooks)."""
    with torch.no_grad():
        h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        outs = []
        for blk in model.blocks:
            h = blk(h)
            outs.append(h.reshape(len(h), -1).clone())
    return outs


def song_hsic1(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Song et al. (2012) unbiased HSIC, batched over leading dims of (..., n, n) float64 Grams."""
    n = k.shape[-1]
    kt = k - torch.diag_embed(torch.diagonal(k, dim1=-2, dim2=-1))
    lt = l - torch.diag_embed(torch.diagonal(l, dim1=-2, dim2=-1))
    tr = (kt * lt).sum((-2, -1))
    return (tr + kt.sum((-2, -1)) * lt.sum((-2, -1)) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * (kt.sum(-1) * lt.sum(-1)).sum(-1)) / (n * (n - 3))


def reference(ma: nn.Module, mb: nn.Module, loader: DataLoader) -> np.ndarray:
    """Float64 minibatch CKA from activations stored per batch (Nguyen et al. 2021, Eq. 2)."""
    kl = kk = ll = torch.zeros(())
    for x, _ in loader:
        grams = []
        for model in (ma, mb):
            hs = [h.double() - h.double().mean(0) for h in block_outputs(model, x)]
            grams.append(torch.stack([h @ h.T for h in hs]))
        ga, gb = grams
        kl = kl + song_hsic1(ga[:, None], gb[None, :])
        kk = kk + song_hsic1(ga, ga)
        ll = ll + song_hsic1(gb, gb)
    return (kl / torch.sqrt(kk[:, None] * ll[None, :])).numpy()


# ------------------------------------------------------------------------------------------------ main
def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(" | ".join(c.ljust(w) for c, w in zip(r, widths))
                     for r in [header, ["-" * w for w in widths], *rows])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="retinamnist.npz")
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="interleaved runs per contestant; medians are reported")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    x = load_images(args.data, args.n, args.img_size)
    loader = DataLoader(TensorDataset(x, torch.zeros(len(x))), batch_size=args.batch_size)
    ma, mb = make_vit(0, args.img_size), make_vit(1, args.img_size)
    forward_only(ma, mb, [next(iter(loader))])  # warm-up

    contestants: dict[str, Callable[[], np.ndarray | None]] = {
        "forward only (both models)": lambda: forward_only(ma, mb, loader),
        "repsim.compare": lambda: run_repsim(ma, mb, loader),
        "pytorch-cka 1.1.3": lambda: pytorch_cka(ma, mb, loader, LAYERS),
        "torch-cka 0.21": lambda: torch_cka(ma, mb, loader, LAYERS),
    }
    runs: dict[str, list[tuple[float, float, float]]] = {k: [] for k in contestants}
    results: dict[str, np.ndarray | None] = {}
    for _ in range(args.repeats):
        for name, fn in contestants.items():
            dt, dc, grow, results[name] = measure(fn)
            runs[name].append((dt, dc, grow))
    ref = reference(ma, mb, loader)

    wall_fwd = float(np.median([r[0] for r in runs["forward only (both models)"]]))
    cpu_fwd = float(np.median([r[1] for r in runs["forward only (both models)"]]))
    rows = []
    for name, rs in runs.items():
        out = results[name]
        err = "-" if out is None else (f"{np.abs(out - ref).max():.1e}" if np.isfinite(out).all() else "NaN")
        wall, cpu = float(np.median([r[0] for r in rs])), float(np.median([r[1] for r in rs]))
        first, later = rs[0][2], min(r[2] for r in rs[1:]) if len(rs) > 1 else float("nan")
        rows.append([name, f"{wall:.2f}", f"{min(r[0] for r in rs):.2f}-{max(r[0] for r in rs):.2f}",
                     f"{wall / wall_fwd:.3f}x", f"{cpu:.2f}", f"{cpu / cpu_fwd:.3f}x", f"{first:.0f} / {later:.0f}",
                     err])
    peak = matmul_peak(args.threads)
    print(
        f"ViT-Tiny x2 (random init), {args.img_size} px, {len(LAYERS)} blocks, tokens flattened, "
        f"N={args.n} RetinaMNIST, batch {args.batch_size}, {args.threads} threads, medians of {args.repeats} "
        "interleaved runs; fp32 matmul "
        f"peak in this run: {peak:.0f} GFLOP/s\n"
    )
    header = ["contestant", "wall s", "range s", "vs fwd", "CPU s", "vs fwd", "RSS growth MB 1st/later",
              "max |err| vs fp64"]
    print(table(header, rows))


def matmul_peak(threads: int, n: int = 1024, reps: int = 10) -> float:
    """fp32 GFLOP/s of a square matmul on ``threads`` threads (the same-run reference for the machine's speed)."""
    a = torch.randn(n, n)
    a @ a
    t = time.perf_counter()
    for _ in range(reps):
        a @ a
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


if __name__ == "__main__":
    main()
