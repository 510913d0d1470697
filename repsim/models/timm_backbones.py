"""Backbones built on timm: any timm model by name (generic adapter), the timm-hosted zoo entries and SEEM's FocalNet-T.

Blocks are timm's feature taps (``model.feature_info``): the transformer blocks of a ViT, the stages of a CNN (for a
ResNet the stem activation ``act1`` is tap 0, then ``layer1..layer4``), so block ``i`` is exactly what timm's
``forward_intermediates(indices=[i])`` returns and ``prune_intermediate_layers`` does the decapitation.
"""

from __future__ import annotations

import re
import sys
from functools import partial
from typing import Any

import timm
import torch
from timm.layers import LayerNorm2d
from timm.models.focalnet import FocalNetBlock
from torch import nn

from repsim.backbone import Backbone


def _pool_type(model: nn.Module) -> str | None:
    """The global pooling a timm model's head applies (a string on ViTs, a pooling module on CNNs)."""
    pool = getattr(model, "global_pool", None)
    if isinstance(pool, str):
        return pool
    return getattr(pool, "pool_type", None)


class TimmBackbone(Backbone):
    """A timm model (created with ``num_classes=0``) behind the Backbone interface."""

    source = "timm"

    def __init__(self, model: nn.Module, *, name: str, img_size: int, in_chans: int) -> None:
        super().__init__(img_size=img_size, in_chans=in_chans)
        if not hasattr(model, "forward_intermediates") or not isinstance(getattr(model, "feature_info", None), list):
            raise ValueError(f"timm model {name!r} has no forward_intermediates/feature_info, repsim cannot split it")
        # a timm model: forward_intermediates, feature_info, pretrained_cfg ... are not nn.Module attributes
        timm_model: Any = model
        self.model = timm_model
        self.name = name
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        self.native_img_size = int(timm_model.pretrained_cfg.get("input_size", (3, img_size, img_size))[-1])
        self._taps = [dict(info) for info in timm_model.feature_info]
        self._block_names = ["model." + info["module"] for info in self._taps]
        self._global_pool = _pool_type(model)
        cfg = timm_model.pretrained_cfg
        self.input_mean, self.input_std = tuple(cfg.get("mean", self.input_mean)), tuple(cfg.get("std", self.input_std))
        if "mean" in cfg:
            self.normalisation_source = f"timm's pretrained config of {name}"
        self.pooling = {"token": "CLS after the final norm", "avg": "global average pool"}.get(
            str(self._global_pool), str(self._global_pool)
        )
        self._set_dims()

    def _set_dims(self) -> None:
        self.embed_dim = int(self._taps[-1]["num_chs"])
        self.num_features = int(self.model.num_features)

    def _tokens_after(self, x: torch.Tensor, index: int) -> torch.Tensor:
        (out,) = self.model.forward_intermediates(x, indices=[index], stop_early=True, intermediates_only=True)
        return out.flatten(2).transpose(1, 2) if out.ndim == 4 else out

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def _keep_blocks(self, k: int) -> None:
        self.model.prune_intermediate_layers(indices=[k - 1], prune_norm=False, prune_head=False)
        if _pool_type(self.model) != self._global_pool:  # CNN pruning drops the pooling with the head: restore it
            self.model.reset_classifier(0, self._global_pool)
        self._taps = self._taps[:k]
        self._set_dims()

    def _pooling_prefixes(self) -> tuple[str, ...]:
        return tuple(f"model.{n}." for n in ("norm", "fc_norm", "head", "attn_pool", "head_hidden"))

    def _convert_official(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # timm's own filter turns the upstream format (DINOv2 hub, DeiT, DINO, torchvision ResNet ...) into timm names
        filter_fn = getattr(sys.modules[type(self.model).__module__], "checkpoint_filter_fn", None)
        if filter_fn is not None:
            state = filter_fn(state, self.model)
        head = {"head.weight", "head.bias", "fc.weight", "fc.bias", "head.fc.weight", "head.fc.bias"}
        return {"model." + k: v for k, v in state.items() if k not in head}

    def _resize_rules(self) -> dict[str, str]:
        rules = {"model.pos_embed": "abs"}
        first_conv = self.model.pretrained_cfg.get("first_conv")
        if isinstance(first_conv, str):
            rules[f"model.{first_conv}.weight"] = "conv_in"
        return rules


def create_timm(
    name: str, *, pretrained: bool, img_size: int | None, in_chans: int, **kwargs: Any
) -> TimmBackbone:
    """Any timm model as a Backbone; ``img_size`` is passed on when the architecture takes one (ViTs, not CNNs)."""
    kwargs = {"num_classes": 0, "in_chans": in_chans, **kwargs}
    if img_size is not None and _takes_img_size(name):
        kwargs.setdefault("img_size", img_size)
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except OSError as exc:  # huggingface_hub's "not in the local cache" errors are OSErrors; so are failed downloads
        if not pretrained:
            raise
        raise OSError(f"{name}: its pretrained weights could not be loaded from the hub or its cache ({exc}); "
                      "offline, give local weights (checkpoint=PATH / --checkpoint-a) or a model whose weights ship "
                      "in a pip package (efficientnet_lite0/1/2, mobilenetv2_imagenet)") from exc
    return TimmBackbone(model, name=name, img_size=img_size or 224, in_chans=in_chans)


def _takes_img_size(name: str) -> bool:
    """Whether the timm architecture is built for a fixed input size (position embeddings): ViT-like models."""
    cfg = timm.models.get_pretrained_cfg(name.split(".")[0]) or timm.models.get_pretrained_cfg(name)
    return bool(getattr(cfg, "fixed_input_size", False))


class EfficientNetStages(TimmBackbone):
    """A timm EfficientNet-family CNN (EfficientNet-Lite, MobileNetV2) with each of its stages as one block.

    timm's feature taps skip the stages that keep the previous stride (Lite0: 5 taps over 7 stages); here every stage
    ``model.blocks.i`` is a block, so CKA, freezing and decapitation see all of them. The pooled feature is timm's:
    ``conv_head`` (1x1 to 1280) -> BN+act -> global average pool; decapitated, the GAP of the last kept stage.
    """

    def __init__(self, model: nn.Module, *, name: str, img_size: int, in_chans: int) -> None:
        super().__init__(model, name=name, img_size=img_size, in_chans=in_chans)
        self._block_names = [f"model.blocks.{i}" for i in range(len(self.model.blocks))]
        self._set_dims()

    def _set_dims(self) -> None:
        self.embed_dim = int(self.model.blocks[-1][-1].feature_info("bottleneck")["num_chs"])
        self.num_features = int(self.model.num_features)

    def _tokens_after(self, x: torch.Tensor, index: int) -> torch.Tensor:
        (out,) = self.model.forward_intermediates(x, indices=[index + 1], stop_early=True, intermediates_only=True,
                                                  extra_blocks=True)  # extra_blocks indices: 0 = stem, i+1 = stage i
        return out.flatten(2).transpose(1, 2)

    def _keep_blocks(self, k: int) -> None:
        self.model.prune_intermediate_layers(indices=[k], prune_norm=False, prune_head=False, extra_blocks=True)
        if _pool_type(self.model) != self._global_pool:
            self.model.reset_classifier(0, self._global_pool)
        self._block_names = self._block_names[:k]
        self._set_dims()

    def _pooling_prefixes(self) -> tuple[str, ...]:
        return ("model.conv_head.", "model.bn2.")


# ------------------------------------------------------------------------------------------------------------------
# SEEM FocalNet-T (X-Decoder's "focal_dw" variant) on timm's FocalNet
# ------------------------------------------------------------------------------------------------------------------


class SeemFocalBlock(FocalNetBlock):
    """timm's FocalNet block rearranged as SEEM/X-Decoder's ``focal_dw`` block.

    Differences from timm's block: a residual depthwise 3x3 conv before the modulation (``dw1``) and before the MLP
    (``dw2``), and post-norms applied *after* each residual sum (timm normalises the branch before adding).
    """

    def __init__(self, dim: int, **kwargs: Any) -> None:
        super().__init__(dim, use_post_norm=True, **kwargs)
        self.dw1 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.dw2 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dw1(x)
        x = self.norm1_post(x + self.drop_path1(self.ls1(self.modulation(x))))
        x = x + self.dw2(x)
        return self.norm2_post(x + self.drop_path2(self.ls2(self.mlp(x))))


_seem_norm = partial(LayerNorm2d, eps=1e-5)  # SEEM's nn.LayerNorm (timm's FocalNet uses the same eps)

# on top of focalnet_tiny_srf's embed_dim 96 and depths (2, 2, 6, 2)
_SEEM_CFG = dict(
    focal_levels=(3, 3, 3, 3), focal_windows=(3, 3, 3, 3), use_overlap_down=True,
    use_post_norm=True, normalize_modulator=True, layerscale_value=1e-4, drop_path_rate=0.3,  # SEEM's D2FocalNet
)


class SeemFocalNet(TimmBackbone):
    """SEEM's FocalNet-T backbone: four stages, one output LayerNorm per stage (``out_norms``), GAP of the last.

    The stem is a 7x7/4 conv padded by 3 (X-Decoder's conv embedding; timm pads by 2), and the stage outputs are
    taken before the next stage's downsampling, as SEEM's ``res2..res5``.  Decapitated to ``k`` stages the pooled
    feature is the GAP of ``out_norms[k-1]`` applied to stage ``k-1`` (SEEM's ``res{k+1}``).
    """

    source = "timm (FocalNet, SEEM focal_dw blocks)"
    native_img_size = 224

    def __init__(self, *, img_size: int, in_chans: int, **kwargs: Any) -> None:
        cfg = {**_SEEM_CFG, **kwargs}
        model: Any = timm.create_model("focalnet_tiny_srf", pretrained=False, num_classes=0, in_chans=in_chans, **cfg)
        for i, stage in enumerate(model.layers):
            stage.blocks = nn.ModuleList([
                SeemFocalBlock(
                    block.dim,
                    mlp_ratio=cfg.get("mlp_ratio", 4.0), focal_level=cfg["focal_levels"][i],
                    focal_window=cfg["focal_windows"][i], normalize_modulator=cfg["normalize_modulator"],
                    use_post_norm_in_modulation=cfg.get("use_post_norm_in_modulation", False),
                    layerscale_value=cfg["layerscale_value"], drop_path=getattr(block.drop_path1, "drop_prob", 0.0),
                    norm_layer=_seem_norm,
                )
                for block in stage.blocks
            ])
        model.stem.proj.padding = (3, 3)
        model.norm = nn.Identity()  # replaced by the per-stage output norms below
        super().__init__(model, name="seem_focalt", img_size=img_size, in_chans=in_chans)
        self.native_img_size = 224
        self.out_norms = nn.ModuleList([_seem_norm(int(t["num_chs"])) for t in self._taps])
        self.pooling = "global average pool of the last stage's output norm"

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        last = self.num_blocks - 1
        (out,) = self.model.forward_intermediates(x, indices=[last], stop_early=True, intermediates_only=True)
        return self.out_norms[last](out).mean((2, 3))

    def _keep_blocks(self, k: int) -> None:
        super()._keep_blocks(k)
        for i in range(k, len(self.out_norms)):
            self.out_norms[i] = nn.Identity()

    def _pooling_prefixes(self) -> tuple[str, ...]:
        return ("out_norms.",)

    def unused_parameter_names(self, *, tokens_only: bool = False) -> set[str]:
        """Only the output norm of the last kept stage is used by the pooled feature."""
        last = f"out_norms.{self.num_blocks - 1}."
        after = self.parameter_groups()[2]
        return {n for n in after if tokens_only or not n.startswith(last)}

    def _convert_official(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """SEEM/X-Decoder checkpoint (``[...]backbone.*`` keys, the rest of SEEM ignored) -> these names."""
        if any("backbone." in k for k in state):
            state = {k.split("backbone.", 1)[1]: v for k, v in state.items() if "backbone." in k}
        own = self.state_dict()
        out = {}
        for key, value in state.items():
            m = re.fullmatch(r"norm(\d)\.(weight|bias)", key)
            if m:
                out[f"out_norms.{m[1]}.{m[2]}"] = value
                continue
            k = key.replace("patch_embed.", "stem.")
            k = re.sub(r"layers\.(\d+)\.downsample", lambda g: f"layers.{int(g[1]) + 1}.downsample", k)
            k = re.sub(r"gamma_(\d)", r"ls\1.gamma", k)
            k = re.sub(r"\.norm(\d)\.", r".norm\1_post.", k)
            k = "model." + k
            if k in own and own[k].ndim == 4 and value.ndim == 2:  # Linear in SEEM, 1x1 conv in timm
                value = value[:, :, None, None]
            out[k] = value
        return out
