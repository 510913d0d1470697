"""Sub-commands ``repsim cka`` (layerwise CKA between two models on a dataset), ``repsim heatmap`` (re-render a saved
matrix) and ``repsim demo`` (the reduced transfer study: no network, no arguments, a few minutes on 2 cores)."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from repsim.files import load_netcdf, save_netcdf, save_png

DEMO_HELP = """The reduced transfer study (repsim.study, preset "demo"): pretrain a small ViT on a source task,
fine-tune it on a target task (frozen/unfrozen, linear/stacked head, from-scratch baseline, a freezing curve),
and compare its blocks before vs after fine-tuning with CKA (bootstrap CIs over batches).

The default data is SYNTHETIC: repsim's built-in procedurally generated textured patches (repsim.data.synthetic;
source: 6 texture classes, target: 4 of them), so the demo needs no download and no network; a few minutes on 2
cores. To use real images instead, pass --data-root DIR where DIR/medmnist/ holds the MedMNIST files
pneumoniamnist.npz (source) and retinamnist.npz (target). Writes OUT/cka.nc (netCDF: cka, lower, upper) and
OUT/cka.png (the heatmap), plus the study's tables.md, study.json and figures. The full study:
analyses/transfer_study.py."""


# ---------------------------------------------------------------------------------------------------- helpers
def default_layers(model: nn.Module) -> list[str] | str:
    """The model's block names (``Backbone.layer_names()``), else the pattern ``blocks.*``."""
    names = getattr(model, "layer_names", None)
    return list(names()) if callable(names) else "blocks.*"


def load_data(spec: str, *, img_size: int, split: str = "test", n_samples: int | None = None, seed: int = 0) -> Dataset:
    """``"synthetic"`` (built-in shapes), a MedMNIST ``.npz`` file (its official ``split``) or an image folder
    (``root/<class>/<image>``), as 3-channel tensors of ``img_size``; the first ``n_samples`` when given."""
    from repsim.data.synthetic import SyntheticPatterns

    if spec == "synthetic":
        return SyntheticPatterns(n_samples or 512, img_size=img_size, split=split, seed=seed)
    from repsim.data.datasets import ImageDataset, image_folder, medmnist, with_channels
    from repsim.data.transforms import build_transform

    path = Path(spec).expanduser()
    if path.suffix == ".npz":
        source = medmnist(path.parent, path.stem)
        if source.official is None or split not in source.official:
            raise ValueError(f"{path} has no official {split!r} split")
        indices = source.official[split]
    elif path.is_dir():
        source = image_folder(path)
        indices = range(len(source))
    else:
        raise ValueError(f"--data must be 'synthetic', a MedMNIST .npz file or an image folder, got {spec!r}")
    info = with_channels(source.info, 3)
    transform = build_transform(img_size, info.mean or (0.5,) * 3, info.std or (0.25,) * 3, train=False)
    data: Dataset = ImageDataset(source, list(indices), transform, channels=3)
    if n_samples is not None:
        if n_samples > len(data):  # type: ignore[arg-type]
            raise ValueError(f"--n-samples {n_samples} exceeds the {len(data)} samples of {spec} ({split})")  # type: ignore
        data = Subset(data, range(n_samples))
    return data


# ---------------------------------------------------------------------------------------------------- repsim cka
def cmd_cka(args: argparse.Namespace) -> int:
    """Layerwise CKA between two models (or one model with itself) on a dataset; writes cka.nc and cka.png."""
    from repsim.compare import compare
    from repsim.models import create
    from repsim.plot import heatmap

    torch.manual_seed(args.seed)
    model_a = create(args.model_a, checkpoint=args.checkpoint_a, img_size=args.img_size)
    model_b = None
    if args.model_b is not None:
        torch.manual_seed(args.seed + 1)
        model_b = create(args.model_b, checkpoint=args.checkpoint_b, img_size=args.img_size)
    data = load_data(args.data, img_size=args.img_size, split=args.split, n_samples=args.n_samples, seed=args.seed)
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers)
    layers_a = args.layers or default_layers(model_a)
    layers_b = args.layers_b or (None if model_b is None or args.layers else default_layers(model_b))
    result = compare(
        model_a, model_b, loader, layers_a=layers_a, layers_b=layers_b, pool=args.pool, device=args.device,
        keep_batches=args.boot > 0, n_boot=max(args.boot, 1), estimator=args.estimator,
    )
    result = result.assign_attrs(
        model_a=args.model_a, model_b=args.model_b or args.model_a, checkpoint_a=args.checkpoint_a or "random init",
        checkpoint_b=(args.checkpoint_b or "random init") if args.model_b else (args.checkpoint_a or "random init"),
        data=args.data, split=args.split, img_size=args.img_size, pool=args.pool,
    )
    out = Path(args.out)
    nc = save_netcdf(result, out / "cka.nc")
    png = save_png(heatmap(result, annotate_ci=args.boot > 0 and result.sizes["layer_a"] <= 16), out / "cka.png")
    print(f"wrote {nc} and {png}")
    return 0


def cmd_heatmap(args: argparse.Namespace) -> int:
    """Re-render a saved CKA matrix."""
    from repsim.plot import heatmap

    path = Path(args.file)
    fig = heatmap(load_netcdf(path), vmin=args.vmin, vmax=args.vmax, cmap=args.cmap, annotate_ci=args.annotate_ci)
    png = save_png(fig, Path(args.out) if args.out else path.with_suffix(".png"))
    print(f"wrote {png}")
    return 0


# ---------------------------------------------------------------------------------------------------- repsim demo
def cmd_demo(args: argparse.Namespace) -> int:
    """Run the reduced transfer study (``repsim.study.demo``) and write the before/after CKA heatmap."""
    from repsim.study import demo, diagonal

    start = time.perf_counter()
    summary = demo(args.out, data_root=args.data_root, epochs=args.epochs, n_samples=args.n_samples, jobs=args.jobs)
    out = Path(args.out)
    what = ("real MedMNIST: pretrained on PneumoniaMNIST, fine-tuned on RetinaMNIST" if args.data_root else
            "synthetic textured patches (built-in): pretrained on 6 classes, fine-tuned on 4")
    print((out / "tables.md").read_text())
    d = diagonal(load_netcdf(out / "cka.nc"))
    print(f"data: {what}")
    print("CKA(block k before, block k after fine-tuning) [95% CI]: " +
          "  ".join(f"{c:.2f} [{lo:.2f}, {hi:.2f}]" for c, lo, hi in zip(d["cka"], d["lower"], d["upper"])))
    print(f"wrote {out / 'cka.nc'}, {out / 'cka.png'} and the study's tables/figures in "
          f"{time.perf_counter() - start:.0f} s (stages: {summary['timings_s']})")
    return 0


# ---------------------------------------------------------------------------------------------------- register
def register(subparsers: Any) -> None:
    """Add ``cka``, ``heatmap`` and ``demo`` to the ``repsim`` command line."""
    p = subparsers.add_parser("cka", help="layerwise CKA between two models on a dataset", description=cmd_cka.__doc__)
    p.add_argument("--model-a", required=True, help="zoo or timm model name")
    p.add_argument("--model-b", help="second model (default: compare model A with itself)")
    p.add_argument("--checkpoint-a", help="local weights for model A (default: random init)")
    p.add_argument("--checkpoint-b", help="local weights for model B (default: random init)")
    p.add_argument("--layers", nargs="+", help="names or glob patterns, e.g. 'blocks.*' (default: the model's blocks)")
    p.add_argument("--layers-b", nargs="+", help="layers of model B (default: as --layers)")
    p.add_argument("--pool", default="flatten", choices=["flatten", "cls", "mean", "tokens", "gap"])
    p.add_argument(
        "--data", default="synthetic", help="'synthetic', a MedMNIST .npz file or an image folder (root/<class>/<img>)"
    )
    p.add_argument("--split", default="test", help="split of a MedMNIST .npz (train, val, test)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--n-samples", type=int, help="use the first N samples (default: all)")
    p.add_argument("--estimator", default="unbiased", choices=["unbiased", "biased"])
    p.add_argument("--boot", type=int, default=0, help="bootstrap resamples for confidence intervals (0: none)")
    p.add_argument("--device", help="e.g. cuda (default: cpu)")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="seed of random initialisations")
    p.add_argument("--out", default="cka-out", help="output folder for cka.nc and cka.png")
    p.set_defaults(func=cmd_cka)

    p = subparsers.add_parser("heatmap", help="re-render a saved CKA matrix (.nc)", description=cmd_heatmap.__doc__)
    p.add_argument("file", help="a cka.nc written by repsim")
    p.add_argument("--out", help="PNG path (default: FILE with .png)")
    p.add_argument("--vmin", type=float, default=0.0)
    p.add_argument("--vmax", type=float, default=1.0)
    p.add_argument("--cmap", default="magma")
    p.add_argument("--annotate-ci", action="store_true", help="write bootstrap CI widths in the cells")
    p.set_defaults(func=cmd_heatmap)

    p = subparsers.add_parser("demo", help="the reduced transfer study with CKA heatmaps, no network (synthetic data by default)",
                              description=DEMO_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="repsim-demo", help="output folder (default: ./repsim-demo; re-running resumes)")
    p.add_argument("--data-root", help="folder holding medmnist/pneumoniamnist.npz and retinamnist.npz, to use real images")
    p.add_argument("--epochs", type=int, help="pretraining and fine-tuning epochs (default: 3 and 4)")
    p.add_argument("--n-samples", type=int, help="images per synthetic task (default 2000)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel training processes")
    p.set_defaults(func=cmd_demo)
