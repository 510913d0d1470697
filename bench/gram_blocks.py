"""The Gram kernel alone: ``repsim.gram.symmetric_product`` (upper block triangle) against one ``x @ x.T``.

For each (n, d), every block size is timed against the plain matmul in interleaved repeats (medians), so the block
rule in ``repsim.gram.gram_block_rows`` can be re-checked on another machine. Speed > 1 means the block product is
faster; the row marked * is the block size the rule picks (``n`` = one plain matmul).

    python bench/gram_blocks.py [--threads 2] [--repeats 9]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from repsim.gram import gram_block_rows, symmetric_product

SHAPES = [(128, 768), (128, 2048), (128, 3264), (256, 512), (256, 768), (256, 3264), (512, 768), (512, 4096),
          (1024, 3264)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=9, help="interleaved runs per contestant (medians are reported)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads, medians of {args.repeats} interleaved runs; speed = matmul time / block time\n")
    print("n x d        | matmul GFLOP/s | " + " | ".join(f"b={b:<4}" for b in (64, 96, 128, 192, 256)))
    for n, d in SHAPES:
        x = torch.randn(n, d)
        reps = max(3, int(2e9 / (2 * n * n * d)))  # ~2 GFLOP per timing
        sizes = [b for b in (64, 96, 128, 192, 256) if b < n]
        times: dict[int | str, list[float]] = {"mm": [], **{b: [] for b in sizes}}
        for _ in range(args.repeats):
            for key in times:
                t = time.perf_counter()
                for _ in range(reps):
                    x @ x.T if key == "mm" else symmetric_product(x, int(key))
                times[key].append(time.perf_counter() - t)
        mm = float(np.median(times["mm"]))
        chosen = gram_block_rows(n, d)
        cells = [f"{mm / float(np.median(times[b])):.2f}{'*' if b == chosen else ' '}" if b in times else "-     "
                 for b in (64, 96, 128, 192, 256)]
        print(f"{n:>4} x {d:<5} | {2 * n * n * d * reps / mm / 1e9:>8.0f}{'*' if chosen == n else ' '}      | "
              + " | ".join(f"{c:<6}" for c in cells))


if __name__ == "__main__":
    main()
