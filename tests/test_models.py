"""The model zoo: every zoo name builds offline with random init and honours the Backbone contract.

Each zoo model is built once (DINOv2-g in its own test), at the smallest input its architecture allows (ViTs with a
2x2 patch grid, SAM 64 px since its 14x14 windows pad small grids anyway), and every per-model check runs on it.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch

import repsim
from repsim.models import SCENARIOS, Backbone, ZooInfo, available, build_classifier, create
from repsim.models.zoo import ZOO

# (smallest img_size used here, tokens at that size, number of blocks)
SMALL = {
    "sam_vitb": (64, 16, 12),
    "seem_focalt": (32, 1, 4),
    "dinov2_vits14": (28, 4, 12),
    "dinov2_vitb14": (28, 4, 12),
    "dinov2_vitl14": (28, 4, 24),
    "dinov2_vitg14": (28, 4, 40),
    "blip_vitb": (32, 4, 12),
    "openclip_vitb16": (32, 4, 12),
    "deit_b": (32, 4, 12),
    "dino_vitb16": (32, 4, 12),
    "resnet152": (32, 1, 5),  # timm taps: stem act1, layer1..layer4
    # EfficientNet-family CNNs: one block per stage (7), stride 32 -> a 1x1 grid at 32 px
    "efficientnet_lite0": (32, 1, 7),
    "efficientnet_lite1": (32, 1, 7),
    "efficientnet_lite2": (32, 1, 7),
    "mobilenetv2_imagenet": (32, 1, 7),
}
LIGHT = [n for n in SMALL if n != "dinov2_vitg14"]  # DINOv2-g (1.1B parameters): test_dinov2_giant
# DINOv2-L shares DINOv2-S/B's code path; its 1.2 GB checkpoint round trips are left out to keep the suite fast
NO_ROUND_TRIP = {"dinov2_vitl14"}


def _x(size: int, batch: int = 2, chans: int = 3) -> torch.Tensor:
    return torch.randn(batch, chans, size, size, generator=torch.Generator().manual_seed(1))


# ---- the official checkpoint formats, written from a model's own weights ------------------------------------------
def _sam_official(bb: Backbone) -> dict[str, torch.Tensor]:
    """A full SAM checkpoint: image_encoder.* (with the neck) plus prompt-encoder keys that must be ignored."""
    state = {"image_encoder." + k: v for k, v in bb.encoder.state_dict().items()}
    state["image_encoder.neck.0.weight"] = torch.zeros(256, 768, 1, 1)
    state["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = torch.zeros(2, 128)
    return state


_BLIP_NAMES = {
    "embeddings.class_embedding": "cls_token", "embeddings.position_embedding": "pos_embed",
    "embeddings.patch_embedding.": "patch_embed.proj.", "post_layernorm.": "norm.", "encoder.layers.": "blocks.",
    "layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.qkv": "attn.qkv", "self_attn.projection": "attn.proj",
}


def _blip_official(bb: Backbone) -> dict[str, object]:
    """BLIP's model_base.pth: {"model": {visual_encoder.blocks.i.attn.qkv ..., text_encoder...}}."""
    state = {}
    for key, value in bb.vision.state_dict().items():
        for a, b in _BLIP_NAMES.items():
            key = key.replace(a, b)
        state["visual_encoder." + key] = value
    state["text_encoder.embeddings.word_embeddings.weight"] = torch.zeros(3, 4)
    return {"model": state}


def _seem_official(bb: Backbone) -> dict[str, object]:
    """X-Decoder FocalNet names: patch_embed, gamma_i, norm1/norm2 post-norms, downsample at the end of a stage,
    Linear f/proj/fc1/fc2, per-stage norm0..norm3; plus SEEM's non-backbone keys."""
    state = {}
    for key, value in bb.state_dict().items():
        if key.startswith("out_norms."):
            _, i, p = key.split(".")
            state[f"backbone.norm{i}.{p}"] = value
            continue
        k = key[len("model."):].replace("stem.", "patch_embed.").replace("_post", "")
        k = re.sub(r"ls(\d)\.gamma", r"gamma_\1", k)
        k = re.sub(r"layers\.(\d+)\.downsample", lambda g: f"layers.{int(g[1]) - 1}.downsample", k)
        if re.search(r"modulation\.(f|proj)\.weight|mlp\.fc\d\.weight", k):
            value = value[:, :, 0, 0]
        state["backbone." + k] = value
    state["sem_seg_head.predictor.class_embed"] = torch.zeros(2)
    return {"model": state}


def _openclip_official(bb: Backbone) -> dict[str, torch.Tensor]:
    """A full open_clip CLIP state dict: visual.* plus the text tower."""
    return {**bb.state_dict(), "text_projection": torch.zeros(512, 512), "logit_scale": torch.zeros(())}


OFFICIAL = {"sam_vitb": _sam_official, "blip_vitb": _blip_official, "seem_focalt": _seem_official,
            "openclip_vitb16": _openclip_official}


def test_zoo_covers_the_paper_models() -> None:
    assert set(ZOO) == set(SMALL)
    rows = available()
    assert [r.name for r in rows] == list(ZOO)
    assert all(isinstance(r, ZooInfo) and r.params > 0 and r.pooled_dim > 0 for r in rows)
    by_name = {r.name: r for r in rows}
    assert by_name["dinov2_vitg14"].params > 1_000_000_000
    assert by_name["sam_vitb"].source == "segment-anything" and by_name["sam_vitb"].native_img_size == 1024
    assert by_name["openclip_vitb16"].pooled_dim == 512
    # the torch-free table of `repsim models` says what the built models say
    from repsim.models.catalogue import CATALOGUE

    assert list(CATALOGUE) == list(ZOO)
    for r in rows:
        row = CATALOGUE[r.name]
        assert (row.source, row.native_img_size, row.pooled_dim, row.pooling) == (
            r.source, r.native_img_size, r.pooled_dim, r.pooling), r.name
        assert round(row.params / 1e5) == round(r.params / 1e5), r.name


def _assert_loads_exactly(bb: Backbone, state: dict, path) -> None:
    """Load ``state`` (saved to ``path``) into a perturbed copy of ``bb``: every tensor must come back."""
    torch.save(state, path)
    other = copy.deepcopy(bb)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    other.load_checkpoint(path)
    theirs = other.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in bb.state_dict().items())


def _check_checkpoints(bb: Backbone, name: str, tmp_path) -> None:
    """A plain state_dict and the official format load back exactly; from the small checkpoint, a model at twice
    the size with one input channel resamples its position embeddings and sums the RGB kernel, so a gray image gives
    the RGB model's output on it repeated to three channels (the dynamic-size RGB model resamples on the fly)."""
    size, n_tokens, _ = SMALL[name]
    _assert_loads_exactly(bb, bb.state_dict(), tmp_path / "repsim.pt")
    if name in OFFICIAL:
        _assert_loads_exactly(bb, OFFICIAL[name](bb), tmp_path / "official.pt")

    gray = create(name, img_size=2 * size, in_chans=1, checkpoint=tmp_path / "repsim.pt").eval()
    rgb = create(name, img_size=2 * size, checkpoint=tmp_path / "repsim.pt") if name == "openclip_vitb16" else bb
    g = _x(2 * size, chans=1)
    with torch.no_grad():
        assert gray.forward_tokens(g).shape == (2, 4 * n_tokens, bb.embed_dim)
        torch.testing.assert_close(gray(g), rgb.eval()(g.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-4)
    del gray, rgb


@pytest.mark.parametrize("name", LIGHT)
def test_zoo_model(name: str, tmp_path) -> None:
    """Per zoo model: shapes, blocks, layer names usable by repsim.capture, decapitation == intermediate, checkpoint
    round trips with resampling and grayscale folding, and the trainable parameter counts of the four scenarios."""
    torch.manual_seed(0)
    size, n_tokens, n_blocks = SMALL[name]
    bb = create(name, img_size=size).eval()
    x = _x(size)

    # shapes, blocks, layer names through repsim.capture
    assert bb.num_blocks == n_blocks == len(bb.blocks) == len(bb.layer_names())
    modules = dict(bb.named_modules())
    assert all(modules[n] is b for n, b in zip(bb.layer_names(), bb.blocks))
    with repsim.capture(bb, bb.layer_names(), pool="flatten") as acts, torch.no_grad():
        pooled = bb(x)
        assert list(acts) == bb.layer_names()
        captured_last = acts[bb.layer_names()[-1]]
    with torch.no_grad():
        tokens = bb.forward_tokens(x)
        second = bb.forward_tokens(x, upto=1)
    assert tokens.shape == (2, n_tokens, bb.embed_dim)
    assert pooled.shape == (2, bb.num_features) and torch.isfinite(pooled).all()
    assert captured_last.shape == (2, (n_tokens + bb.num_prefix_tokens) * bb.embed_dim)
    with pytest.raises(ValueError, match="not a block index"):
        bb.forward_tokens(x, upto=n_blocks)

    # decapitation keeps the first k blocks: its tokens are the full model's block k-1 output
    cut = repsim.surgery.decapitate(copy.deepcopy(bb), 2)
    assert cut.num_blocks == 2 and cut.layer_names() == bb.layer_names()[:2]
    assert len(cut.state_dict()) < len(bb.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(cut.forward_tokens(x), second)
        assert cut(x).shape == (2, cut.num_features)
    del cut

    if name not in NO_ROUND_TRIP:
        _check_checkpoints(bb, name, tmp_path)

    # trainable parameters per scenario
    total = sum(p.numel() for p in bb.parameters())
    _, _, after = bb.parameter_groups()
    after_params = sum(p.numel() for n, p in bb.named_parameters() if n in after)
    unused_linear = sum(p.numel() for n, p in bb.named_parameters() if n in bb.unused_parameter_names())
    counts = {}
    for scenario in SCENARIOS:
        stacked = scenario.endswith("stacked")
        tiny = dict(depth=1, embed_dim=32, num_heads=2) if stacked else None
        model = build_classifier(bb, scenario, 5, classifier_kwargs=tiny)
        counts[scenario] = sum(p.numel() for p in model.backbone.parameters() if p.requires_grad)
        assert all(p.requires_grad for p in model.head.parameters())
        assert sum(p.numel() for p in model.head.parameters()) == (32 if stacked else bb.num_features) * 5 + 5
    assert counts["frozen-linear"] == counts["frozen-stacked"] == 0
    assert counts["unfrozen-linear"] == total - unused_linear
    assert counts["unfrozen-stacked"] == total - after_params


@pytest.mark.slow
def test_dinov2_giant() -> None:
    """Built once, one forward: 40 blocks of width 1536, 2x2 patch grid at 28 px, pooled CLS of width 1536."""
    bb = create("dinov2_vitg14", img_size=28).eval()
    last = bb.layer_names()[-1]
    with repsim.capture(bb, [last], pool="tokens") as acts, torch.no_grad():
        pooled = bb(_x(28, batch=1))
        tokens = acts[last]
    assert bb.num_blocks == 40 and tokens.shape == (1, 1 + 4, 1536) and pooled.shape == (1, 1536)


def test_224_shapes() -> None:
    """The default build at the paper's 224 px: 196 tokens for /16 models, 256 for DINOv2's /14."""
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        for name, n in [("openclip_vitb16", 196), ("sam_vitb", 196), ("dinov2_vits14", 256)]:
            bb = create(name).eval()
            assert bb.forward_tokens(x).shape == (1, n, bb.embed_dim), name


def test_vit_runs_at_other_input_sizes_and_same_size_is_identity() -> None:
    """dynamic_img_size ViTs interpolate on the fly; at the built size the position embedding is used as is."""
    bb = create("dinov2_vits14", img_size=28, depth=2).eval()
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        assert bb.forward_tokens(torch.randn(1, 3, 56, 56)).shape == (1, 16, 384)
        resampled = repsim.backbone.resize_param(bb.model.pos_embed, tuple(bb.model.pos_embed.shape), "abs", 1)
        assert torch.equal(resampled, bb.model.pos_embed)
        before = bb(x)
        bb.model.pos_embed.data.copy_(resampled)
        assert torch.equal(bb(x), before)


def test_dinov2_hub_checkpoint_goes_through_timms_filter(tmp_path) -> None:
    """facebookresearch/dinov2 hub format: a 37x37 (518 px) pos_embed and a mask_token -> timm names at 28 px."""
    bb = create("dinov2_vits14", img_size=28, depth=2).eval()
    hub = {k[len("model."):]: v for k, v in bb.state_dict().items()}
    hub["pos_embed"] = torch.randn(1, 1 + 37 * 37, 384)
    hub["mask_token"] = torch.zeros(1, 384)
    torch.save(hub, tmp_path / "dinov2_vits14_pretrain.pth")
    loaded = create("dinov2_vits14", img_size=28, depth=2, checkpoint=tmp_path / "dinov2_vits14_pretrain.pth")
    assert loaded.model.pos_embed.shape == (1, 5, 384)
    assert torch.equal(loaded.model.blocks[1].ls2.gamma, bb.model.blocks[1].ls2.gamma)


def test_generic_timm_models_and_kwargs() -> None:
    vit = create("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=3)
    assert vit.num_blocks == 3 and vit.forward_tokens(torch.randn(2, 3, 32, 32)).shape == (2, 64, 192)
    cnn = create("resnet18")
    assert cnn.layer_names() == ["model.act1", "model.layer1", "model.layer2", "model.layer3", "model.layer4"]
    assert cnn(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    with pytest.raises(ValueError, match="neither a repsim zoo name .* nor a timm model"):
        create("no_such_model")
    with pytest.raises(TypeError, match="takes no architecture options"):
        create("blip_vitb", depth=2)


def test_resnet_decapitation_pools_the_kept_stage() -> None:
    bb = create("resnet18")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        stage2 = bb.forward_tokens(x, upto=2)
        repsim.surgery.decapitate(bb, 3)
        assert bb.num_features == bb.embed_dim == 128
        torch.testing.assert_close(bb(x), stage2.mean(1))


def test_checkpoint_errors_name_the_keys(tmp_path) -> None:
    bb = create("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
    torch.save({"model.blocks.0.norm1.weight": torch.ones(192), "model.extra": torch.ones(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"missing keys \[.*\], unexpected keys \[model\.extra\]"):
        bb.load_checkpoint(tmp_path / "bad.pt")
    cut = copy.deepcopy(bb)
    repsim.surgery.decapitate(cut, 1)
    torch.save(cut.state_dict(), tmp_path / "cut.pt")
    with pytest.raises(ValueError, match="saved after decapitate"):
        create("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, checkpoint=tmp_path / "cut.pt")
    rebuilt = create(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, decapitate=1, checkpoint=tmp_path / "cut.pt"
    )
    assert rebuilt.num_blocks == 1
    with pytest.raises(ValueError, match="not both"):
        create("resnet18", pretrained=True, checkpoint=tmp_path / "cut.pt")
    with pytest.raises(FileNotFoundError):
        create("resnet18", checkpoint=tmp_path / "missing.pt")


def test_models_cli_prints_the_zoo(capsys) -> None:
    from repsim.cli import main

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ZOO) and "segment-anything" in out
