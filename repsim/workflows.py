"""What the command line does, as library calls: ``compare_models`` is ``repsim cka`` (models or run folders in,
``cka.nc`` and ``cka.png`` out), usable from notebooks and scripts as well."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from repsim.compare import Bootstrap, compare
from repsim.files import save_netcdf, save_png
from repsim.types import Estimator, Pool


def compare_models(model_a: str | Path, model_b: str | Path | None, data: str, out: Path | None, *,
                   which: Sequence[str] = ("best", "best"), checkpoints: Sequence[str | None] = (None, None),
                   pretrained: bool = False, labels: Sequence[str] | None = None,
                   layers_a: Sequence[str] | None = None, layers_b: Sequence[str] | None = None,
                   pool: Pool = "flatten", data_root: str | Path | None = None, split: str = "test",
                   img_size: int | None = None, batch_size: int = 64, n_samples: int | None = None,
                   estimator: Estimator = "unbiased", bootstrap: Bootstrap | int | None = None,
                   device: str | None = None, num_workers: int = 0) -> tuple[Path | None, Path | None]:
    """CKA between two backbones given by name or run folder on ``data``; writes ``out/cka.nc`` and ``out/cka.png``
    (on rank 0 under torchrun) and returns their paths (None on other ranks).

    A run folder gives its backbone at ``which`` (init or best), its input size, and its held-out images: with
    ``split`` the run's own split (``split.json``) is used where ``data`` is the data it trained on. Each model is fed
    its own input normalisation (``repsim.inputs``: the run's training normalisation, or what the weights expect).
    Labels default to the names (or run folder names, with "(init)" for the starting weights).
    """
    import torch

    from repsim.data import default_root, loader
    from repsim.plot import heatmap
    from repsim.train.runs import is_run, load_backbone
    from repsim.train.utils import distributed, pick_device

    rank, _ = distributed()
    device = device or str(pick_device("auto"))
    specs = [(model_a, which[0], checkpoints[0])] + ([(model_b, which[1], checkpoints[1])] if model_b else [])
    if img_size is None:
        img_size = next((json.loads((Path(m) / "model.json").read_text())["img_size"] for m, _, _ in specs
                         if is_run(m)), 224)
    backbones = [load_backbone(m, which=w, pretrained=pretrained, checkpoint=c, img_size=img_size)  # type: ignore
                 for m, w, c in specs]
    names = [f"{Path(m).name} ({w})" if is_run(m) else Path(str(m)).name for m, w, _ in specs]
    if len(specs) == 2 and names[0] == names[1] and specs[0][1:] != specs[1][1:]:
        names = [f"{n} [{c or 'random init'}]" for n, (_, _, c) in zip(names, specs)]
    channels = {int(getattr(b, "in_chans", 3)) for b in backbones}
    if len(channels) > 1:
        raise ValueError(f"the models read images of {sorted(channels)} channels; CKA needs one input for both")
    data_loader = loader(data, split=split, img_size=img_size, root=data_root or default_root(),
                         batch_size=batch_size, n_samples=n_samples, like=backbones, channels=channels.pop(),
                         num_workers=num_workers)
    result = compare(backbones[0], backbones[1] if len(backbones) > 1 else None, data_loader, layers_a=layers_a,
                     layers_b=layers_b, labels=labels or (names[0], names[-1]), pool=pool, device=device,
                     estimator=estimator, bootstrap=bootstrap, progress=rank == 0)
    result.attrs.update(sources=json.dumps([{"model": str(m), "weights": w if is_run(m) else c or
                                             ("pretrained" if pretrained else "random init")} for m, w, c in specs]),
                        seed=int(torch.initial_seed()))
    if rank != 0 or out is None:
        return None, None
    return save_netcdf(result, Path(out) / "cka.nc"), save_png(heatmap(result), Path(out) / "cka.png")
