"""Layer surgery on a ``repsim.models.Backbone``: freezing, decapitation, and the heads the paper puts on top.

``freeze(model, k)`` freezes the first ``k`` blocks and everything before them (patch embedding, position
embeddings, stem), so sweeping ``k = 0..num_blocks`` is progressive freezing from the input side; frozen sub-modules
also stay in eval mode (no BatchNorm statistics updates, no dropout).  ``decapitate(model, k)`` keeps the first
``k`` blocks only.  ``StackedClassifier`` is the paper's "classifier model": foundation patch tokens -> Linear +
LayerNorm -> a timm DeiT whose patch embedding is bypassed, with its own CLS token and its position embeddings
interpolated to the incoming token grid -> CLS feature. ``adapt_batchnorm(model, loader)`` is AdaBN: the BatchNorm
running statistics re-estimated on another dataset, every weight unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import timm
import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from repsim.backbone import Backbone
from repsim.capture import prepare_input, split_batch

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _backbone_of(model: nn.Module) -> Backbone:
    backbone = model if isinstance(model, Backbone) else getattr(model, "backbone", None)
    if not isinstance(backbone, Backbone):
        raise TypeError(f"expected a repsim Backbone or a module with a .backbone Backbone, got {type(model).__name__}")
    return backbone


def freeze(model: nn.Module, blocks: Literal["all", "none"] | int = "all") -> nn.Module:
    """Set which backbone parameters train: ``"all"`` frozen, ``"none"`` all trainable, or the first ``blocks`` blocks
    and everything before them frozen (the blocks after, and the final norm/projection, train; 0 freezes nothing).

    ``model`` is a Backbone or a module with a ``.backbone``; only the backbone is touched.  Returns ``model``.
    """
    backbone = _backbone_of(model)
    before, per_block, after = backbone.parameter_groups()
    if blocks == "all":
        frozen = set(before) | {n for names in per_block for n in names} | set(after)
    elif blocks == "none":
        frozen = set()
    elif isinstance(blocks, int) and not isinstance(blocks, bool) and 0 <= blocks <= backbone.num_blocks:
        frozen = (set(before) | {n for names in per_block[:blocks] for n in names}) if blocks else set()
    else:
        raise ValueError(
            f"blocks must be 'all', 'none' or an int in 0..{backbone.num_blocks} for {backbone.name}, got {blocks!r}"
        )
    for name, param in backbone.named_parameters():
        param.requires_grad_(name not in frozen)
    backbone.train(backbone.training)  # re-apply the mode so newly frozen sub-modules drop to eval
    return model


def decapitate(model: Backbone, k: int) -> Backbone:
    """Keep the first ``k`` blocks of ``model`` (in place; module names are unchanged).  Returns ``model``."""
    if not isinstance(model, Backbone):
        raise TypeError(f"decapitate works on a repsim Backbone (before a head is built), got {type(model).__name__}")
    model.keep_blocks(k)
    return model


def batchnorm_layers(model: nn.Module) -> list[str]:
    """The names of ``model``'s BatchNorm layers that keep running statistics (what ``adapt_batchnorm`` changes)."""
    return [n for n, m in model.named_modules() if isinstance(m, _BATCHNORMS) and m.track_running_stats]


def adapt_batchnorm(model: nn.Module, loader: Iterable[Any]) -> nn.Module:
    """AdaBN (Li et al. 2016): re-estimate every BatchNorm layer's running mean and variance on ``loader``'s inputs,
    so the model meets another dataset's statistics with all its weights unchanged (it tells a change of BatchNorm
    statistics apart from a change of weights).

    One pass without gradients in which only the BatchNorm layers are in train mode (each batch is normalised with
    its own statistics, as in training; dropout and stochastic depth stay off). Each layer's running mean and
    variance become the per-channel mean and unbiased variance of everything it received in the pass, accumulated
    over samples in float64 (torch's cumulative average, ``momentum=None``, weights batches equally and averages
    within-batch variances: it misses the spread of the batch means). Weights, biases and each module's train/eval
    mode are left as they were; ``num_batches_tracked`` counts the pass's batches. Inputs are fed as the loader gives
    them (give them in the normalisation the model is fed elsewhere). In place; returns ``model``.
    """
    layers = {n: m for n, m in model.named_modules() if isinstance(m, _BATCHNORMS) and m.track_running_stats}
    if not layers:
        raise ValueError(f"{type(model).__name__} has no BatchNorm layer with running statistics: nothing to adapt")
    moments: dict[str, tuple[int, torch.Tensor, torch.Tensor]] = {}  # name -> (count, mean, sum of squared deviations)

    def accumulate(name: str) -> Any:
        def hook(_: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach()
            flat = x.transpose(0, 1).reshape(x.shape[1], -1).to(torch.float64)
            n_b, mean_b = flat.shape[1], flat.mean(1)
            m2_b = (flat - mean_b[:, None]).square().sum(1)
            if name in moments:  # Chan et al.'s pairwise update of (count, mean, M2)
                n, mean, m2 = moments[name]
                delta, total = mean_b - mean, n + n_b
                mean_b, m2_b, n_b = mean + delta * (n_b / total), m2 + m2_b + delta.square() * (n * n_b / total), total
            moments[name] = (n_b, mean_b, m2_b)

        return hook

    modes = {m: m.training for m in model.modules()}
    handles = [m.register_forward_pre_hook(accumulate(n)) for n, m in layers.items()]
    try:
        model.eval()
        for m in layers.values():
            m.train()
        with torch.no_grad():
            for batch in loader:
                x, _ = split_batch(batch)
                model(prepare_input(x, model))
    finally:
        for h in handles:
            h.remove()
        for module, mode in modes.items():
            module.training = mode
    for name, m in layers.items():
        n, mean, m2 = moments.get(name, (0, torch.zeros(()), torch.zeros(())))
        if n < 2:
            raise ValueError(f"BatchNorm layer {name!r} received {n} value(s) per channel in the pass: give the loader "
                             "more samples")
        with torch.no_grad():
            m.running_mean.copy_(mean)  # type: ignore[union-attr]
            m.running_var.copy_(m2 / (n - 1))  # type: ignore[union-attr]
    return model


class LinearHead(nn.Linear):
    """The linear probe: one ``Linear(in_features, num_classes)`` on the pooled feature."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__(in_features, num_classes)


class StackedClassifier(nn.Module):
    """The paper's appended classifier: tokens ``(B, N, C_in)`` -> ``(B, embed_dim)`` CLS feature of a timm DeiT.

    ``model``/``pretrained``/``kwargs`` go to ``timm.create_model`` (the paper: ``deit_base_patch16_224`` with
    ImageNet weights; tests pass e.g. ``depth=1, embed_dim=32, num_heads=2``).  The DeiT's patch embedding is not
    kept; its position embeddings are resampled (bicubic) to the square grid of the ``N`` incoming tokens.
    ``max_grid=g`` average-pools a token grid larger than ``g x g`` down to ``g x g`` first (early CNN stages give
    32x32 grids; attention over 1,024 tokens would cost more than the backbone); None keeps every token (the paper).
    """

    def __init__(
        self, in_features: int, *, model: str = "deit_base_patch16_224", pretrained: bool = False,
        max_grid: int | None = None, **kwargs: Any
    ) -> None:
        super().__init__()
        if max_grid is not None and max_grid < 1:
            raise ValueError(f"max_grid must be a positive grid side or None, got {max_grid}")
        self.max_grid = max_grid
        vit: Any = timm.create_model(model, pretrained=pretrained, num_classes=0, **kwargs)  # a timm VisionTransformer
        if getattr(vit, "num_prefix_tokens", None) != 1 or getattr(vit, "global_pool", None) != "token":
            raise ValueError(f"{model} is not a one-CLS-token ViT, it cannot be the stacked classifier")
        self.embed_dim = self.num_features = int(vit.embed_dim)
        self.proj = nn.Sequential(nn.Linear(in_features, self.embed_dim), nn.LayerNorm(self.embed_dim))
        self.cls_token: nn.Parameter = vit.cls_token
        self.pos_embed: nn.Parameter = vit.pos_embed
        self.pos_drop: nn.Module = vit.pos_drop
        self.blocks: nn.Module = vit.blocks
        self.norm: nn.Module = vit.norm
        self._grid = list(vit.patch_embed.grid_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[1]
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"StackedClassifier needs a square token grid, got {n} tokens")
        if self.max_grid is not None and side > self.max_grid:
            grid = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)
            tokens = torch.nn.functional.adaptive_avg_pool2d(grid, self.max_grid).flatten(2).transpose(1, 2)
            side = self.max_grid
        x = self.proj(tokens)
        pos = resample_abs_pos_embed(self.pos_embed, new_size=[side, side], old_size=self._grid, num_prefix_tokens=1)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + pos
        x = self.blocks(self.pos_drop(x))
        return self.norm(x)[:, 0]
