"""Sub-commands ``repsim cka`` (layerwise CKA between two models on a dataset), ``repsim heatmap`` (re-render a saved
matrix) and ``repsim demo`` (the built-in end-to-end example: no network, no arguments, about a minute on 2 cores)."""

from __future__ import annotations

import argparse
import copy
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import xarray as xr
from matplotlib.figure import Figure
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

DEMO_HELP = """Train a small ViT briefly and compare it layer by layer with its own initialisation (CKA).

The default data is SYNTHETIC: repsim's built-in procedurally generated textured patches (4 classes, 32 px; see
repsim.data.synthetic), so the demo needs no download and no network. To use real images instead, pass
--data-root DIR where DIR/medmnist/retinamnist.npz exists (e.g. the MedMNIST RetinaMNIST file); for your own
models and data use `repsim cka --data FILE.npz|IMAGE_DIR`. Writes DIR/cka.nc (the block CKA matrix of both
models' blocks, netCDF) and DIR/cka.png (init x init, trained x trained, init x trained heatmaps)."""


# ---------------------------------------------------------------------------------------------------- helpers
def _atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` then rename tmp onto ``path``, so ``path`` is either absent or complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_netcdf(obj: xr.DataArray | xr.Dataset, path: Path) -> Path:
    """Write a CKA matrix (or bootstrap Dataset) to netCDF via h5netcdf, atomically."""
    ds = obj.to_dataset(name=obj.name or "cka") if isinstance(obj, xr.DataArray) else obj
    return _atomic(path, lambda tmp: ds.to_netcdf(tmp, engine="h5netcdf"))


def save_png(fig: Figure, path: Path) -> Path:
    """Save a figure as PNG, atomically."""
    return _atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=150))


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
    with xr.open_dataset(path, engine="h5netcdf") as ds:
        ds = ds.load()
    fig = heatmap(ds, vmin=args.vmin, vmax=args.vmax, cmap=args.cmap, annotate_ci=args.annotate_ci)
    png = save_png(fig, Path(args.out) if args.out else path.with_suffix(".png"))
    print(f"wrote {png}")
    return 0


# ---------------------------------------------------------------------------------------------------- repsim demo
def _demo_data(data_root: str | None, img_size: int, n_train: int, n_test: int) -> tuple[Dataset, Dataset, int, str]:
    """(train, test, num_classes, description): built-in synthetic patterns, or RetinaMNIST under ``data_root``."""
    if data_root is None:
        from repsim.data.synthetic import SyntheticPatterns

        train = SyntheticPatterns(n_train, img_size=img_size, split="train")  # 4 classes
        test = SyntheticPatterns(n_test, img_size=img_size, split="test")
        return train, test, train.num_classes, "synthetic textured patches (built-in)"
    npz = Path(data_root).expanduser() / "medmnist" / "retinamnist.npz"
    if not npz.is_file():
        raise FileNotFoundError(f"--data-root: expected {npz}")
    train = load_data(str(npz), img_size=img_size, split="train")
    train = Subset(train, range(min(n_train, len(train))))  # type: ignore[arg-type]
    test = load_data(str(npz), img_size=img_size, split="test")
    return train, Subset(test, range(min(n_test, len(test)))), 5, f"RetinaMNIST ({npz.name})"  # type: ignore[arg-type]


def _accuracy(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    hits = total = 0
    with torch.no_grad():
        for x, y in loader:
            hits += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return hits / total


def cmd_demo(args: argparse.Namespace) -> int:
    """Briefly train a small ViT on the built-in data and compare its blocks with its initialisation's."""
    import timm

    from repsim.compare import compare_many
    from repsim.plot import heatmap_grid

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    train, test, num_classes, what = _demo_data(args.data_root, args.img_size, args.n_train, args.n_test)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=args.img_size, patch_size=4, embed_dim=64, depth=6,
        num_heads=2, mlp_ratio=2.0, num_classes=num_classes,
    )
    init = copy.deepcopy(model)
    train_loader = DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(args.seed))
    test_loader = DataLoader(test, batch_size=64, shuffle=False)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    steps = args.epochs * len(train_loader)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    model.train()
    with tqdm(total=steps, desc="train", unit="step") as bar:
        for _ in range(args.epochs):
            for x, y in train_loader:
                loss = nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
    acc_init, acc_trained = _accuracy(init, test_loader), _accuracy(model, test_loader)
    result = compare_many({"init": init, "trained": model}, test_loader, layers="blocks.*")
    result = result.assign_attrs(data=what, accuracy_init=acc_init, accuracy_trained=acc_trained, epochs=args.epochs)
    out = Path(args.out)
    nc = save_netcdf(result, out / "cka.nc")

    def block(a: str, b: str) -> xr.DataArray:
        return result.sel(layer_a=result.model_a == a, layer_b=result.model_b == b)

    fig = heatmap_grid(
        [block("init", "init"), block("trained", "trained"), block("init", "trained")],
        titles=["init vs init", f"trained vs trained (test acc {acc_trained:.0%})", "init vs trained"],
    )
    fig.suptitle(f"CKA of a ViT's blocks before and after {args.epochs} epochs on {what}", fontsize=10)
    png = save_png(fig, out / "cka.png")
    diag = block("init", "trained").values.diagonal()
    print(f"data: {what}; test accuracy {acc_init:.1%} at init, {acc_trained:.1%} after training")
    print("CKA(init block k, trained block k): " + " ".join(f"{v:.2f}" for v in diag))
    print(f"wrote {nc} and {png} in {time.perf_counter() - start:.0f} s")
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

    p = subparsers.add_parser("demo", help="built-in example: trained vs initial ViT, no network (synthetic data by default)",
                              description=DEMO_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="repsim-demo", help="output folder (default: ./repsim-demo)")
    p.add_argument("--data-root", help="folder holding medmnist/retinamnist.npz, to use real images instead of synthetic ones")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--n-train", type=int, default=2048, help="training images (default 2048)")
    p.add_argument("--n-test", type=int, default=512, help="held-out images for accuracy and CKA (default 512)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
