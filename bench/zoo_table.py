"""Zoo table: per zoo model, source library, parameters, pooled dim, tokens at 224 and CPU forward time.

Random init, ``torch.no_grad``, a batch of 8 at 224 px, ``--threads`` CPU threads (default 2); the time is the median
of ``--repeats`` forwards after one warm-up.  Usage: ``python bench/zoo_table.py [--models a b ...] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from repsim.models import ZOO, create  # noqa: E402


def measure(name: str, *, batch: int, img_size: int, repeats: int) -> dict[str, object]:
    """One row of the table for zoo model ``name``."""
    torch.manual_seed(0)
    start = time.perf_counter()
    backbone = create(name, img_size=img_size).eval()
    build_s = time.perf_counter() - start
    x = torch.randn(batch, 3, img_size, img_size)
    with torch.no_grad():
        tokens = backbone.forward_tokens(x[:1])
        backbone(x)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            pooled = backbone(x)
            times.append(time.perf_counter() - start)
    params = sum(p.numel() for p in backbone.parameters())
    row = {
        "name": name, "source": backbone.source, "params_M": round(params / 1e6, 1),
        "pooled_dim": int(pooled.shape[1]), "tokens": int(tokens.shape[1]), "token_dim": int(tokens.shape[2]),
        "blocks": backbone.num_blocks, "forward_s": round(statistics.median(times), 3), "build_s": round(build_s, 1),
    }
    del backbone
    gc.collect()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="*", default=list(ZOO))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(n, batch=args.batch, img_size=args.img_size, repeats=args.repeats) for n in tqdm(args.models)]
    cols = ["name", "source", "params_M", "pooled_dim", "tokens", "token_dim", "blocks", "forward_s", "build_s"]
    print(f"\nbatch {args.batch} at {args.img_size} px, {args.threads} CPU threads, random init, "
          f"median of {args.repeats}")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in cols) + " |")
    if args.out is not None:
        tmp = args.out.with_suffix(args.out.suffix + ".tmp")
        tmp.write_text(json.dumps(rows, indent=1))
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
