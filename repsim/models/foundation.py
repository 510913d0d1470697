"""Zoo backbones from segment-anything (SAM ViT-B), transformers (BLIP ViT-B) and open_clip (ViT-B/16, LAION-2B).

Each one is built for ``img_size``: official weights are loaded through the library's usual path and their position
embeddings (SAM: also the relative-position tables of its global-attention blocks) resampled to the grid.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from functools import partial

import open_clip
import torch
from segment_anything.modeling.image_encoder import ImageEncoderViT
from timm.layers import resample_abs_pos_embed_nhwc
from torch import nn
from transformers import BlipVisionConfig, BlipVisionModel

from repsim.backbone import Backbone, fold_input_conv

SAM_VITB_URL = "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"
BLIP_BASE_URL = "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/model_base.pth"


def _check_patch_multiple(name: str, img_size: int, patch: int) -> None:
    if img_size % patch:
        raise ValueError(f"{name}: img_size={img_size} is not a multiple of its patch size {patch}")


@contextlib.contextmanager
def _logging_disabled(level: int) -> Iterator[None]:
    previous = logging.root.manager.disable
    logging.disable(level)
    try:
        yield
    finally:
        logging.disable(previous)


def _download(url: str) -> dict[str, torch.Tensor]:
    return torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True, check_hash=False)


class SamBackbone(Backbone):
    """SAM ViT-B image encoder (segment-anything), neck dropped; pooled = GAP of the last block's ``(B,H,W,C)``.

    Windowed blocks keep SAM's 14x14 windows; the four global-attention blocks get relative-position tables sized for
    the ``img_size`` grid (linearly resampled from SAM's 64x64 grid when weights are loaded).
    """

    name = "sam_vitb"
    source = "segment-anything"
    native_img_size = 1024
    pooling = "global average pool of the last block (no neck, no norm)"

    def __init__(self, *, img_size: int, in_chans: int, pretrained: bool) -> None:
        super().__init__(img_size=img_size, in_chans=in_chans)
        _check_patch_multiple(self.name, img_size, 16)
        encoder = ImageEncoderViT(
            img_size=img_size, patch_size=16, in_chans=in_chans, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
            out_chans=256, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True,
            global_attn_indexes=(2, 5, 8, 11), window_size=14,
        )
        encoder.neck = nn.Identity()  # SAM's 256-channel neck is not part of the paper's features
        self.encoder = encoder
        self._block_names = [f"encoder.blocks.{i}" for i in range(len(encoder.blocks))]
        self.embed_dim = self.num_features = 768
        if pretrained:
            self.load_state(_download(SAM_VITB_URL), source=SAM_VITB_URL)

    def _run(self, x: torch.Tensor, index: int) -> torch.Tensor:
        x = self.encoder.patch_embed(x)
        pos = self.encoder.pos_embed
        if pos.shape[1:3] != x.shape[1:3]:
            pos = resample_abs_pos_embed_nhwc(pos, new_size=list(x.shape[1:3]))
        x = x + pos
        for block in self.encoder.blocks[: index + 1]:
            x = block(x)
        return x

    def _tokens_after(self, x: torch.Tensor, index: int) -> torch.Tensor:
        return self._run(x, index).flatten(1, 2)

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, self.num_blocks - 1).mean((1, 2))

    def _keep_blocks(self, k: int) -> None:
        self.encoder.blocks = nn.ModuleList(list(self.encoder.blocks)[:k])

    def _resize_rules(self) -> dict[str, str]:
        rules = {"encoder.pos_embed": "nhwc", "encoder.patch_embed.proj.weight": "conv_in"}
        for name, _ in self.named_parameters():
            if name.endswith(("attn.rel_pos_h", "attn.rel_pos_w")):
                rules[name] = "rel"
        return rules

    def _convert_official(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Full SAM checkpoint (``image_encoder.*``, prompt encoder and decoder ignored) or a bare encoder."""
        if any(k.startswith("image_encoder.") for k in state):
            state = {k[len("image_encoder."):]: v for k, v in state.items() if k.startswith("image_encoder.")}
        return {"encoder." + k: v for k, v in state.items() if not k.startswith("neck.")}


_BLIP_RENAMES = (
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
)


class BlipBackbone(Backbone):
    """BLIP ViT-B/16 visual encoder as transformers' ``BlipVisionModel``; pooled = final-norm CLS (token 0).

    Position embeddings are always interpolated (``interpolate_pos_encoding=True``): without it transformers slices
    them and silently mis-positions any grid larger than the one it was built for.
    """

    name = "blip_vitb"
    source = "transformers"
    native_img_size = 224
    num_prefix_tokens = 1
    pooling = "CLS (token 0) after the final norm"

    def __init__(self, *, img_size: int, in_chans: int, pretrained: bool) -> None:
        super().__init__(img_size=img_size, in_chans=in_chans)
        _check_patch_multiple(self.name, img_size, 16)
        config = BlipVisionConfig(
            image_size=img_size, patch_size=16, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, layer_norm_eps=1e-6,  # BLIP's ViT uses eps 1e-6
        )
        self.vision = BlipVisionModel(config)
        if in_chans != 3:
            emb = self.vision.embeddings
            emb.patch_embedding = fold_input_conv(emb.patch_embedding, in_chans)
        self._block_names = [f"vision.encoder.layers.{i}" for i in range(config.num_hidden_layers)]
        self.embed_dim = self.num_features = config.hidden_size
        if pretrained:
            self.load_state(_download(BLIP_BASE_URL), source=BLIP_BASE_URL)

    def _run(self, x: torch.Tensor, index: int) -> torch.Tensor:
        h = self.vision.embeddings(x, interpolate_pos_encoding=True)
        for layer in self.vision.encoder.layers[: index + 1]:
            h = layer(h)
        return h

    def _tokens_after(self, x: torch.Tensor, index: int) -> torch.Tensor:
        return self._run(x, index)[:, self.num_prefix_tokens:]

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self.vision.post_layernorm(self._run(x, self.num_blocks - 1)[:, 0])

    def _keep_blocks(self, k: int) -> None:
        self.vision.encoder.layers = nn.ModuleList(list(self.vision.encoder.layers)[:k])

    def _pooling_prefixes(self) -> tuple[str, ...]:
        return ("vision.post_layernorm.",)

    def _resize_rules(self) -> dict[str, str]:
        return {"vision.embeddings.position_embedding": "abs", "vision.embeddings.patch_embedding.weight": "conv_in"}

    def _convert_official(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Official BLIP checkpoint (``visual_encoder.*``) or a transformers BLIP one (``vision_model.*``)."""
        if any(k.startswith("vision_model.") for k in state):
            return {"vision." + k[len("vision_model."):]: v for k, v in state.items() if k.startswith("vision_model.")}
        if any(k.startswith("visual_encoder.") for k in state):
            state = {k[len("visual_encoder."):]: v for k, v in state.items() if k.startswith("visual_encoder.")}
        out = {}
        for key, value in state.items():
            new = key
            for pattern, repl in _BLIP_RENAMES:
                new = re.sub(pattern, repl, new)
            out["vision." + new] = value
        return out


class OpenClipBackbone(Backbone):
    """open_clip ViT-B/16 image tower (LAION-2B ``laion2b_s34b_b88k``); pooled = ``ln_post(CLS) @ proj`` (512-d).

    Built with ``force_image_size=img_size`` so open_clip resizes the position embeddings when it loads weights.
    """

    name = "openclip_vitb16"
    source = "open_clip"
    native_img_size = 224
    num_prefix_tokens = 1
    pooling = "CLS after ln_post, projected (512-d)"
    arch = "ViT-B-16"
    tag = "laion2b_s34b_b88k"
    _official_shares_names = True  # a full CLIP checkpoint holds visual.* (these names) and the text tower

    def __init__(self, *, img_size: int, in_chans: int, pretrained: bool) -> None:
        super().__init__(img_size=img_size, in_chans=in_chans)
        _check_patch_multiple(self.name, img_size, 16)
        # random init is asked for: silence open_clip's "No pretrained weights loaded" warning for that case only
        quiet = contextlib.nullcontext() if pretrained else _logging_disabled(logging.WARNING)
        with quiet:
            clip = open_clip.create_model(
                self.arch, pretrained=self.tag if pretrained else None, force_image_size=img_size,
                device=torch.get_default_device(),  # open_clip moves the model there (meta when only counting)
            )
        visual = clip.visual
        if in_chans != 3:
            visual.conv1 = fold_input_conv(visual.conv1, in_chans)
        self.visual = visual
        self._block_names = [f"visual.transformer.resblocks.{i}" for i in range(len(visual.transformer.resblocks))]
        self.embed_dim = int(visual.transformer.width)
        self.num_features = int(visual.output_dim)

    def _tokens_after(self, x: torch.Tensor, index: int) -> torch.Tensor:
        out = self.visual.forward_intermediates(
            x, indices=[index], stop_early=True, intermediates_only=True, output_fmt="NLC"
        )
        return out["image_intermediates"][0]

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)

    def _keep_blocks(self, k: int) -> None:
        self.visual.prune_intermediate_layers(indices=[k - 1], prune_norm=False, prune_head=False)

    def _pooling_prefixes(self) -> tuple[str, ...]:
        return ("visual.ln_post.", "visual.proj")

    def _resize_rules(self) -> dict[str, str]:
        return {"visual.positional_embedding": "abs2d", "visual.conv1.weight": "conv_in"}

    def _convert_official(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """An open_clip CLIP checkpoint: its ``visual.*`` keys (the text tower is ignored)."""
        return {k: v for k, v in state.items() if k.startswith("visual.")}
