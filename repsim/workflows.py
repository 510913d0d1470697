"""What the command line does, as library calls: ``write_cka`` is ``repsim cka`` (models or run folders in,
``cka.nc`` and ``cka.png`` out), usable from notebooks and scripts as well."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from repsim.lazy import lazy_exports
from repsim.types import Estimator, Pooling

__getattr__, __dir__, _ = lazy_exports(__name__, {}, deprecated={"compare_models": "repsim.workflows:write_cka"})

if TYPE_CHECKING:  # torch and the models are imported only once the inputs are checked: bad input fails at once
    from repsim.compare import Bootstrap
    from repsim.train.runs import RunInputs


def _check_side(model: str | Path, which: str, checkpoint: str | None, pretrained: bool
                ) -> RunInputs | None:
    """One side of ``write_cka`` checked without building it: a finished run folder (its ``RunInputs``) or a
    known model name (None), with its checkpoint file present."""
    from repsim.train.runs import run_inputs

    if isinstance(model, Path) or Path(model).exists():
        if pretrained or checkpoint is not None:
            raise ValueError(f"{model} is a run folder: its weights come from the run, not pretrained/checkpoint")
        if which not in ("init", "best"):
            raise ValueError(f"which must be 'init' or 'best', got {which!r}")
        return run_inputs(model)
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    return None


def write_cka(model_a: str | Path, model_b: str | Path | None, data: str, out: Path | None, *,
                   which: Sequence[str] = ("best", "best"), checkpoints: Sequence[str | None] = (None, None),
                   pretrained: bool = False, labels: Sequence[str] | None = None,
                   layers_a: Sequence[str] | None = None, layers_b: Sequence[str] | None = None,
                   pool: Pooling = "flatten", data_root: str | Path | None = None, split: str = "test",
                   img_size: int | None = None, batch_size: int = 64, n_samples: int | None = None,
                   estimator: Estimator = "unbiased", bootstrap: Bootstrap | int | None = None,
                   device: str | None = None, num_workers: int = 0, seed: int | None = None
                   ) -> tuple[Path | None, Path | None]:
    """CKA between two backbones given by name or run folder (a ``Path``, or a name that is a folder) on ``data``;
    writes ``out/cka.nc`` and ``out/cka.png`` (on rank 0 under torchrun) and returns their paths (None elsewhere).

    Everything is checked before a model is built: names, runs (existing, finished), checkpoints, the data, the
    split, and whether a bootstrap can have its batches (the batch shrinks to give it 10 where the data allows).
    A run folder gives its backbone at ``which`` (init or best), its input size, and its held-out images: with
    ``split`` the run's own split (``split.json``) is used where ``data`` is the data it trained on. Each model is fed
    its own input normalisation (``repsim.inputs``: the run's training normalisation, or what the weights expect).
    Labels default to the names (or run folder names, with "(init)" for the starting weights); ``seed`` seeds the
    random initialisations.
    """
    from repsim.data import check_data, default_root

    specs = [(model_a, which[0], checkpoints[0])] + ([(model_b, which[1], checkpoints[1])] if model_b else [])
    runs = [_check_side(m, w, c, pretrained) for m, w, c in specs]
    check_data(data, data_root or default_root())
    if n_samples is not None and n_samples < (8 if bootstrap else 4):
        raise ValueError(f"--n-samples {n_samples} is too few: CKA needs batches of at least 4"
                         + (" and a bootstrap at least 2 of them (8 samples)" if bootstrap else ""))
    from repsim.models import check_name  # imports torch and timm: after the checks that need neither

    for (m, _, _), r in zip(specs, runs):
        if r is None:
            check_name(str(m))

    import torch

    from repsim.compare import compare
    from repsim.data import bootstrap_batches, loader
    from repsim.files import save_netcdf, save_png
    from repsim.plot import heatmap
    from repsim.threads import auto_threads, kept_threads
    from repsim.train.runs import load_backbone
    from repsim.train.utils import distributed, pick_device

    rank, _ = distributed()
    found = [r for r in runs if r is not None]
    channels = {r.in_chans for r in found} or {3}
    if len(channels) > 1:
        raise ValueError(f"the models read images of {sorted(channels)} channels; CKA needs one input for both")
    img_size = img_size or next((r.img_size for r in found), 224)

    def data_loader(size: int) -> Any:
        return loader(data, split=split, img_size=img_size, root=data_root or default_root(), batch_size=size,
                      n_samples=n_samples, like=found or None, channels=next(iter(channels)),
                      num_workers=num_workers)

    images = data_loader(batch_size)
    n = len(images.dataset)
    if n < 4:
        raise ValueError(f"{n} images ({data}, {split}) are too few: CKA needs batches of at least 4")
    if bootstrap:
        if n < 8:
            raise ValueError(f"{n} images ({data}, {split}) cannot make the 2 batches of >= 4 a bootstrap needs; "
                             "drop --boot or use more images")
        batches = bootstrap_batches(n, batch_size)
        size = len(batches[0])
        if size < batch_size:
            print(f"--boot: batches of {size} instead of {batch_size}, so the bootstrap resamples "
                  f"{len(batches)} batches of {n} images", file=sys.stderr)
            images = data_loader(size)

    device = device or str(pick_device("auto"))
    if seed is not None:
        torch.manual_seed(seed)
    backbones = [load_backbone(m, which=w, pretrained=pretrained, checkpoint=c, img_size=img_size)  # type: ignore
                 for m, w, c in specs]
    names = [f"{Path(m).name} ({w})" if r is not None else Path(str(m)).name for (m, w, _), r in zip(specs, runs)]
    if len(specs) == 2 and names[0] == names[1] and specs[0][1:] != specs[1][1:]:
        names = [f"{n} [{c or 'random init'}]" for n, (_, _, c) in zip(names, specs)]
    with kept_threads():  # one thread for small models (repsim.threads), the caller's count back afterwards
        if torch.device(device).type == "cpu":
            sample = images.dataset[0][0][None]  # one image: the FLOP count needs no whole batch
            torch.set_num_threads(max(auto_threads(b, sample) for b in backbones))
        result = compare(backbones[0], backbones[1] if len(backbones) > 1 else None, images,
                         layers_a=layers_a, layers_b=layers_b, labels=labels or (names[0], names[-1]), pool=pool,
                         device=device, estimator=estimator, bootstrap=bootstrap, progress=rank == 0)
    result.attrs.update(sources=json.dumps([{"model": str(m), "weights": w if r is not None else c or
                                             ("pretrained" if pretrained else "random init")}
                                            for (m, w, c), r in zip(specs, runs)]),
                        seed=int(torch.initial_seed()))
    if rank != 0 or out is None:
        return None, None
    return save_netcdf(result, Path(out) / "cka.nc"), save_png(heatmap(result), Path(out) / "cka.png")
