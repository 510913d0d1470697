"""The input each model expects: ImageNet's statistics (one home), the rule that gives a model's input normalisation,
and the change of normalisation that lets models of different normalisations read one loader.

The rule, shared by ``repsim.compare``, ``compare_many`` and ``repsim cka``: a model is fed inputs normalised with its
own ``input_mean`` / ``input_std``. A zoo backbone carries what its weights expect (its pretrained config, ImageNet's
statistics when the config says nothing); a backbone loaded from a trainer run carries the normalisation the run
trained with (``repsim.train.runs.load_run``). A model without these attributes is fed what the loader gives.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the constants and the rule are read by checks that must not wait for torch
    import torch

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

Stats = tuple[tuple[float, ...], tuple[float, ...]]


def model_normalisation(model: Any) -> Stats | None:
    """``(mean, std)`` the model's inputs are normalised with (its ``input_mean``/``input_std``), or None when the
    model does not say."""
    mean, std = getattr(model, "input_mean", None), getattr(model, "input_std", None)
    if mean is None or std is None:
        return None
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def per_channel(values: Sequence[float], channels: int, what: str) -> tuple[float, ...]:
    """``values`` for ``channels`` channels: as given, or the average of three colour statistics for one channel."""
    if len(values) == channels:
        return tuple(values)
    if channels == 1:
        return (sum(values) / len(values),)
    raise ValueError(f"{what} has {len(values)} channel(s) but the images have {channels}")


def renormaliser(source: Stats, target: Stats, channels: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The map from inputs normalised with ``source`` to the same pixels normalised with ``target``
    (``(x * std_s + mean_s - mean_t) / std_t``), or None when the two are the same normalisation."""
    import torch

    mean_s, std_s = (per_channel(v, channels, "the loader's normalisation") for v in source)
    mean_t, std_t = (per_channel(v, channels, "the model's normalisation") for v in target)
    if (mean_s, std_s) == (mean_t, std_t):
        return None
    scale = torch.tensor(std_s, dtype=torch.float64) / torch.tensor(std_t, dtype=torch.float64)
    shift = (torch.tensor(mean_s, dtype=torch.float64) - torch.tensor(mean_t, dtype=torch.float64)) / torch.tensor(
        std_t, dtype=torch.float64)

    def apply(x: torch.Tensor) -> torch.Tensor:
        view = (1, -1) + (1,) * (x.ndim - 2)
        return x * scale.to(x.device, x.dtype).view(view) + shift.to(x.device, x.dtype).view(view)

    return apply
