"""Layer surgery on a ``repsim.models.Backbone``: freezing, decapitation, and the heads the paper puts on top.

``freeze(model, k)`` freezes the first ``k`` blocks and everything before them (patch embedding, position
embeddings, stem), so sweeping ``k = 0..num_blocks`` is progressive freezing from the input side; frozen sub-modules
also stay in eval mode (no BatchNorm statistics updates, no dropout).  ``decapitate(model, k)`` keeps the first
``k`` blocks only.  ``StackedClassifier`` is the paper's "classifier model": foundation patch tokens -> Linear +
LayerNorm -> a timm DeiT whose patch embedding is bypassed, with its own CLS token and its position embeddings
interpolated to the incoming token grid -> CLS feature.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import timm
import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from repsim.backbone import Backbone


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
