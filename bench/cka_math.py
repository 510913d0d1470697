"""Similarity-dominated CKA bench: many wide, cheap layers, so the time is the CKA itself.

Two models of L elementwise layers of width d (per-feature affine + nonlinearity: almost free), batch n. Each
library computes the full L x L minibatch (unbiased) CKA matrix over the same batches; the error is the max
absolute difference to a float64 reference computed here from the equations (features centred in float64 first,
which HSIC is invariant to, then Song et al.'s unbiased HSIC). Effective GFLOP/s counts the algorithm's nominal
work, 2n^2 d per Gram plus 2n^2 per layer pair, over the whole wall time and over the CKA's own time (wall time
less a plain forward of both models, measured in the same run), against a measured fp32 matmul peak.

    python bench/cka_math.py            # 48 layers x 4096 x n 512 x 2 batches, 24 x 2048 x 256 x 4 (+ torch-cka)
    python bench/cka_math.py --quick    # small shapes, seconds
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import numpy as np
import torch
from peers import pytorch_cka as run_pytorch_cka
from peers import torch_cka as run_torch_cka
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import repsim


class Elementwise(nn.Module):
    """x -> act((x - in_offset) * w + b) + offset: per-feature, so nearly free next to an n^2 d Gram."""

    def __init__(self, d: int, act: Callable, in_offset: float, offset: float, gen: torch.Generator) -> None:
        super().__init__()
        self.w = nn.Parameter(1 + 0.3 * torch.randn(d, generator=gen))
        self.b = nn.Parameter(0.3 * torch.randn(d, generator=gen))
        self.act, self.in_offset, self.offset = act, in_offset, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(torch.addcmul(self.b - self.in_offset * self.w, x, self.w)) + self.offset


def make_model(layers: int, d: int, act: Callable, max_offset: float, seed: int) -> nn.Sequential:
    """``layers`` bounded elementwise layers whose output means grow linearly to ``max_offset`` (as after ReLU/GELU;
    each layer removes its input's offset first, so values stay bounded and no layer saturates)."""
    gen = torch.Generator().manual_seed(seed)
    offsets = [max_offset * (i + 1) / layers for i in range(layers)]
    return nn.Sequential(*[Elementwise(d, act, ([0.0] + offsets)[i], offsets[i], gen) for i in range(layers)]).eval()


def layer_outputs(model: nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    outs = []
    with torch.no_grad():
        for m in model:
            x = m(x)
            outs.append(x)
    return outs


def reference(model_a: nn.Sequential, model_b: nn.Sequential, batches: list[torch.Tensor]) -> np.ndarray:
    """Float64 minibatch CKA (Nguyen et al. Eq. 2) from the equations: Song HSIC1 on centred-feature Grams."""

    def song(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:  # batched over leading dims: (A,1,n,n) x (1,B,n,n)
        n = k.shape[-1]
        kt = k - torch.diag_embed(torch.diagonal(k, dim1=-2, dim2=-1))
        lt = l - torch.diag_embed(torch.diagonal(l, dim1=-2, dim2=-1))
        ks, ls = kt.sum((-2, -1)), lt.sum((-2, -1))
        kr, lr = kt.sum(-1), lt.sum(-1)
        tr = (kt * lt).sum((-2, -1))
        return (tr + ks * ls / ((n - 1) * (n - 2)) - 2 / (n - 2) * (kr * lr).sum(-1)) / (n * (n - 3))

    def grams(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        out = []
        for h in layer_outputs(model, x):
            h = h.double()
            h = h - h.mean(0)
            out.append(h @ h.T)
        return torch.stack(out)

    kl = kk = ll = 0.0
    for x in batches:
        ga, gb = grams(model_a, x), grams(model_b, x)
        kl = kl + torch.stack([song(ga[i], gb) for i in range(len(ga))])
        kk = kk + song(ga, ga)
        ll = ll + song(gb, gb)
    return (kl / torch.sqrt(kk[:, None] * ll[None, :])).numpy()


def matmul_peak(n: int, d: int, reps: int = 10) -> float:
    a = torch.randn(n, d)
    a @ a.T
    t = time.perf_counter()
    for _ in range(reps):
        a @ a.T
    return 2 * n * n * d * reps / (time.perf_counter() - t) / 1e9


def run_repsim(ma, mb, loader, names) -> np.ndarray:
    return repsim.compare(ma, mb, loader, layers_a=names, layers_b=names, pool="flatten", progress=False).cka.values


def forward(ma: nn.Module, mb: nn.Module, loader: DataLoader) -> None:
    with torch.no_grad():
        for x, _ in loader:
            ma(x), mb(x)


def bench(config: str, layers: int, d: int, n: int, n_batches: int, offset: float, peers: dict[str, Callable],
          peak: float, repeats: int) -> list[list[str]]:
    """One configuration: every contestant ``repeats`` times, interleaved; medians of the wall times."""
    torch.manual_seed(0)
    data = torch.randn(n * n_batches, d)
    loader = DataLoader(TensorDataset(data, torch.zeros(len(data))), batch_size=n)
    ma = make_model(layers, d, torch.sin, offset, seed=1)
    mb = make_model(layers, d, lambda t: 1.5 * torch.tanh(t), offset, seed=2)
    names = [str(i) for i in range(layers)]
    ref = reference(ma, mb, [b[0] for b in loader])
    flops = n_batches * (2 * layers * 2 * n * n * d + layers * layers * 2 * n * n)
    contestants: dict[str, Callable] = {"forward only": lambda *_: forward(ma, mb, loader), **peers}
    times: dict[str, list[float]] = {k: [] for k in contestants}
    errors: dict[str, str] = {}
    for _ in range(repeats):
        for name, fn in contestants.items():
            t = time.perf_counter()
            try:
                got = fn(ma, mb, loader, names)
                if got is not None:
                    errors[name] = f"{np.abs(got - ref).max():.1e}" if np.isfinite(got).all() else "NaN"
            except (AssertionError, RuntimeError, ValueError) as exc:  # torch-cka aborts with an assertion on NaN
                errors[name] = f"aborts: {str(exc).splitlines()[0][:40]}"
            times[name].append(time.perf_counter() - t)
    t_fwd = float(np.median(times["forward only"]))
    base = {k: float(np.median(v)) for k, v in times.items()}
    rows = []
    for name in contestants:
        dt = base[name]
        gf_cka = flops / max(dt - t_fwd, 1e-9) / 1e9  # the similarity work alone: wall time less a plain forward
        speed = " / ".join(f"{base[p] / dt:.2f}x" for p in ("pytorch-cka", "torch-cka") if p in base)
        rows.append([config, name, f"{dt:.3f}", f"{min(times[name]):.3f}-{max(times[name]):.3f}", f"{dt / t_fwd:.2f}",
                     "-" if name == "forward only" else f"{gf_cka:.0f} ({100 * gf_cka / peak:.0f}%)",
                     "-" if name == "forward only" else speed, errors.get(name, "-")])
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="interleaved runs per contestant (medians are reported)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    peers = {"repsim": run_repsim, "pytorch-cka": run_pytorch_cka}
    all_peers = {**peers, "torch-cka": run_torch_cka}
    if args.quick:
        configs = [("8x512x128x2", 8, 512, 128, 2, all_peers)]
    else:
        configs = [("48x4096x512x2", 48, 4096, 512, 2, peers), ("24x2048x256x4", 24, 2048, 256, 4, all_peers)]
    peak = matmul_peak(configs[0][3], configs[0][2])
    print(f"fp32 matmul peak (n x d @ d x n, n={configs[0][3]}, d={configs[0][2]}, same run): {peak:.0f} GFLOP/s on "
          f"{args.threads} threads; medians of {args.repeats} interleaved runs\n")
    header = ["config L x d x n x batches", "contestant", "median s", "range s", "x forward", "GFLOP/s CKA (of peak)",
              "speed vs pytorch-cka / torch-cka", "max |err| vs fp64"]
    rows = []
    for offset in (0.0, 50.0):
        for config, layers, d, n, nb, libs in configs:
            rows += bench(f"{config} mean->{offset:g}", layers, d, n, nb, offset, libs, peak, args.repeats)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths], *rows]:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))
    assert math.isfinite(peak)


if __name__ == "__main__":
    main()
