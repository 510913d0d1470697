"""CKA against dataset size: repsim.compare over N = 1k, 10k, 50k images should take time linear in N with flat
peak memory (it keeps one batch of Grams, never the activations).

Two random-init timm ``test_resnet`` models (5 feature taps each) at 32 px on repsim's built-in synthetic images
(drawn per sample on the fly, so the data itself takes no memory), batch 256, one run per N. Peak RSS growth is
read from /proc/self/status (VmHWM, reset before each run).

    python bench/cka_scale.py [--sizes 1000 10000 50000] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import timm
import torch
from torch.utils.data import DataLoader

import repsim
from repsim.data.synthetic import SyntheticPatterns


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = [timm.create_model("test_resnet", num_classes=0).eval() for _ in range(2)]
    warm = DataLoader(SyntheticPatterns(512, img_size=32), batch_size=args.batch_size)
    repsim.compare(*models, warm, progress=False)  # one-time costs (imports, first allocations) out of the table
    rows = []
    for n in args.sizes:
        loader = DataLoader(SyntheticPatterns(n, img_size=32), batch_size=args.batch_size)
        Path("/proc/self/clear_refs").write_text("5")
        rss0 = _status("VmRSS")
        t = time.perf_counter()
        ds = repsim.compare(*models, loader, progress=False)
        dt = time.perf_counter() - t
        rows.append((n, dt, (_status("VmHWM") - rss0) / 2**20, int(ds.attrs["n_batches"])))
    print(f"repsim.compare, 2 x timm test_resnet (random init), 32 px synthetic images, batch {args.batch_size}, "
          f"{args.threads} threads\n")
    print("N | batches | wall s | ms per 1k images | peak RSS growth MB")
    print("---|---|---|---|---")
    for n, dt, grow, nb in rows:
        print(f"{n} | {nb} | {dt:.1f} | {1000 * dt / n * 1000:.0f} | {grow:.0f}")


if __name__ == "__main__":
    main()
