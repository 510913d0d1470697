"""The model zoo: every zoo name builds offline with random init and honours the Backbone contract.

Zoo models are built at the smallest input their architecture allows (ViTs with a 2x2 patch grid, SAM 64 px since
its 14x14 windows pad small grids anyway), each at most a few times per test module.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

import repsim
from repsim.models import SCENARIOS, Backbone, ZooInfo, available, build_classifier, create
from repsim.models.zoo import ZOO

# (smallest img_size used here, tokens at that size, number of blocks)
SMALL = {
    "sam_vitb": (64, 16, 12),
    "seem_focalt": (64, 4, 4),
    "dinov2_vits14": (28, 4, 12),
    "dinov2_vitb14": (28, 4, 12),
    "dinov2_vitl14": (28, 4, 24),
    "dinov2_vitg14": (28, 4, 40),
    "blip_vitb": (32, 4, 12),
    "openclip_vitb16": (32, 4, 12),
    "deit_b": (32, 4, 12),
    "dino_vitb16": (32, 4, 12),
    "resnet152": (32, 1, 5),  # timm taps: stem act1, layer1..layer4
}
# DINOv2-g (1.1B parameters) is built once, in test_dinov2_giant; the round trips skip the large DINOv2s
LIGHT = [n for n in SMALL if n != "dinov2_vitg14"]
ROUND_TRIP = [n for n in LIGHT if n != "dinov2_vitl14"]


@functools.cache
def _built(name: str) -> Backbone:
    torch.manual_seed(0)
    return create(name, img_size=SMALL[name][0]).eval()


def _x(name: str, batch: int = 2, size: int | None = None, chans: int = 3) -> torch.Tensor:
    size = size or SMALL[name][0]
    return torch.randn(batch, chans, size, size, generator=torch.Generator().manual_seed(1))


def test_zoo_covers_the_paper_models() -> None:
    assert set(ZOO) == set(SMALL)
    rows = available()
    assert [r.name for r in rows] == list(ZOO)
    assert all(isinstance(r, ZooInfo) and r.params > 0 and r.pooled_dim > 0 for r in rows)
    by_name = {r.name: r for r in rows}
    assert by_name["dinov2_vitg14"].params > 1_000_000_000
    assert by_name["sam_vitb"].source == "segment-anything" and by_name["sam_vitb"].native_img_size == 1024
    assert by_name["openclip_vitb16"].pooled_dim == 512


@pytest.mark.parametrize("name", LIGHT)
def test_backbone_contract(name: str) -> None:
    """Token/pooled shapes, block count, layer names usable by repsim.capture, decapitation == intermediate."""
    bb = _built(name)
    size, n_tokens, n_blocks = SMALL[name]
    x = _x(name)
    assert bb.num_blocks == n_blocks == len(bb.blocks) == len(bb.layer_names())
    modules = dict(bb.named_modules())
    assert all(modules[n] is b for n, b in zip(bb.layer_names(), bb.blocks))
    with repsim.capture(bb, bb.layer_names(), pool="flatten") as acts, torch.no_grad():
        pooled = bb(x)
        assert list(acts) == bb.layer_names()
        captured_last = acts[bb.layer_names()[-1]]
        tokens = bb.forward_tokens(x)
        second = bb.forward_tokens(x, upto=1)
        assert torch.equal(bb.forward_features(x), pooled)
    assert tokens.shape == (2, n_tokens, bb.embed_dim)
    assert pooled.shape == (2, bb.num_features) and torch.isfinite(pooled).all()
    assert captured_last.shape == (2, (n_tokens + bb.num_prefix_tokens) * bb.embed_dim)
    with pytest.raises(ValueError, match="not a block index"):
        bb.forward_tokens(x, upto=n_blocks)

    cut = repsim.surgery.decapitate(copy.deepcopy(bb), 2)
    assert cut.num_blocks == 2 and cut.layer_names() == bb.layer_names()[:2]
    assert len(cut.state_dict()) < len(bb.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(cut.forward_tokens(x), second)
        assert cut(x).shape == (2, cut.num_features)


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_checkpoint_round_trip_resize_and_grayscale(name: str, tmp_path) -> None:
    """Round trip is exact; at twice the size position embeddings are resampled; in_chans=1 folds the RGB kernel
    so that a gray image gives the RGB model's output on that image repeated to three channels."""
    bb = _built(name)
    size = SMALL[name][0]
    path = tmp_path / "bb.pt"
    torch.save(bb.state_dict(), path)
    x = _x(name)
    same = copy.deepcopy(bb)
    with torch.no_grad():
        for p in same.parameters():
            p.add_(1.0)
    same.load_checkpoint(path)
    with torch.no_grad():
        assert torch.equal(same(x), bb(x))
    del same
    big = create(name, img_size=2 * size, checkpoint=path).eval()
    gray = create(name, img_size=2 * size, in_chans=1, checkpoint=path).eval()
    g = _x(name, size=2 * size, chans=1)
    with torch.no_grad():
        assert big.forward_tokens(g.expand(-1, 3, -1, -1)).shape[1] == 4 * SMALL[name][1]
        torch.testing.assert_close(gray(g), big(g.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", LIGHT)
def test_trainable_parameter_counts_per_scenario(name: str) -> None:
    """frozen-linear trains the head only, frozen-stacked the appended classifier too, unfrozen-* everything the
    scenario uses (the stacked ones read patch tokens, so the final norm/projection does not train)."""
    bb = _built(name)
    total = sum(p.numel() for p in bb.parameters())
    _, _, after = bb.parameter_groups()
    after_params = sum(p.numel() for n, p in bb.named_parameters() if n in after)
    unused_linear = sum(p.numel() for n, p in bb.named_parameters() if n in bb.unused_parameter_names())
    tiny = dict(depth=1, embed_dim=32, num_heads=2)
    counts = {}
    for scenario in SCENARIOS:
        model = build_classifier(bb, scenario, 5, classifier_kwargs=tiny if scenario.endswith("stacked") else None)
        counts[scenario] = sum(p.numel() for p in model.backbone.parameters() if p.requires_grad)
        head = sum(p.numel() for p in model.head.parameters())
        assert all(p.requires_grad for p in model.head.parameters())
        if model.classifier is not None:
            assert all(p.requires_grad for p in model.classifier.parameters())
            assert head == 32 * 5 + 5
        else:
            assert head == bb.num_features * 5 + 5
    assert counts["frozen-linear"] == counts["frozen-stacked"] == 0
    assert counts["unfrozen-linear"] == total - unused_linear
    assert counts["unfrozen-stacked"] == total - after_params
    bb.requires_grad_(True)


def test_dinov2_giant() -> None:
    """Built once: 40 blocks of width 1536, 2x2 patch grid at 28 px."""
    bb = create("dinov2_vitg14", img_size=28).eval()
    with torch.no_grad():
        tokens = bb.forward_tokens(_x("dinov2_vitg14", batch=1))
        pooled = bb(_x("dinov2_vitg14", batch=1))
    assert bb.num_blocks == 40 and tokens.shape == (1, 4, 1536) and pooled.shape == (1, 1536)


def test_224_shapes() -> None:
    """At the paper's 224 px: the default build (OpenCLIP, fixed grid) and the dynamic-size ones at 224 input."""
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert create("openclip_vitb16").forward_tokens(x).shape == (1, 196, 768)
        for name, n in [("sam_vitb", 196), ("blip_vitb", 196), ("dinov2_vits14", 256), ("seem_focalt", 49),
                        ("resnet152", 49)]:
            bb = _built(name)
            assert bb.forward_tokens(x).shape == (1, n, bb.embed_dim), name


def test_vit_runs_at_other_input_sizes_and_same_size_is_identity() -> None:
    """dynamic_img_size ViTs interpolate on the fly; at the built size the position embedding is used as is."""
    bb = create("dinov2_vits14", img_size=28, depth=2).eval()
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        assert bb.forward_tokens(torch.randn(1, 3, 56, 56)).shape == (1, 16, 384)
        resampled = repsim.models.base.resize_param(bb.model.pos_embed, tuple(bb.model.pos_embed.shape), "abs", 1)
        assert torch.equal(resampled, bb.model.pos_embed)
        before = bb(x)
        bb.model.pos_embed.data.copy_(resampled)
        assert torch.equal(bb(x), before)


def test_sam_official_checkpoint_is_mapped_and_resized(tmp_path) -> None:
    """A full SAM checkpoint at a larger grid: image_encoder.* kept, neck and prompt/mask parts dropped, pos_embed
    and the global blocks' rel-pos tables resampled."""
    src = create("sam_vitb", img_size=128)
    state = {"image_encoder." + k: v for k, v in src.encoder.state_dict().items()}
    state["image_encoder.neck.0.weight"] = torch.zeros(256, 768, 1, 1)
    state["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = torch.zeros(2, 128)
    torch.save(state, tmp_path / "sam.pth")
    bb = create("sam_vitb", img_size=64, checkpoint=tmp_path / "sam.pth")
    assert bb.encoder.pos_embed.shape == (1, 4, 4, 768)
    assert bb.encoder.blocks[2].attn.rel_pos_h.shape == (7, 64)  # global block: 2*4-1
    assert torch.equal(bb.encoder.blocks[0].mlp.lin1.weight, src.encoder.blocks[0].mlp.lin1.weight)


def test_blip_official_checkpoint_is_mapped(tmp_path) -> None:
    """BLIP's own ViT names (visual_encoder.blocks.i.attn.qkv ...) map onto transformers' BlipVisionModel."""
    bb = _built("blip_vitb")
    renames = {
        "embeddings.class_embedding": "cls_token", "embeddings.position_embedding": "pos_embed",
        "embeddings.patch_embedding.": "patch_embed.proj.", "post_layernorm.": "norm.", "encoder.layers.": "blocks.",
        "layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.qkv": "attn.qkv", "self_attn.projection": "attn.proj",
    }
    official = {}
    for key, value in bb.vision.state_dict().items():
        for a, b in renames.items():
            key = key.replace(a, b)
        official["visual_encoder." + key] = value
    official["text_encoder.embeddings.word_embeddings.weight"] = torch.zeros(3, 4)
    torch.save({"model": official}, tmp_path / "model_base.pth")
    loaded = create("blip_vitb", img_size=32, checkpoint=tmp_path / "model_base.pth").eval()
    x = _x("blip_vitb")
    with torch.no_grad():
        assert torch.equal(loaded(x), bb(x))


def test_seem_official_checkpoint_is_mapped(tmp_path) -> None:
    """X-Decoder FocalNet names (patch_embed, gamma_1, norm1 post-norms, downsample at stage end, Linear f/proj/mlp,
    norm0..3) map onto the timm-based model."""
    bb = _built("seem_focalt")
    official = {}
    for key, value in bb.state_dict().items():
        if key.startswith("out_norms."):
            _, i, p = key.split(".")
            official[f"backbone.norm{i}.{p}"] = value
            continue
        k = key[len("model."):].replace("stem.", "patch_embed.").replace("_post", "")
        k = k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2")
        if ".downsample." in k:
            stage = int(k.split(".")[1])
            k = k.replace(f"layers.{stage}.", f"layers.{stage - 1}.", 1)
        if value.ndim == 4 and value.shape[2:] == (1, 1) and ("modulation.f" in k or "proj" in k or "mlp" in k):
            if "modulation.h" not in k and "downsample" not in k:
                value = value[:, :, 0, 0]
        official["backbone." + k] = value
    official["sem_seg_head.predictor.class_embed"] = torch.zeros(2)
    torch.save({"model": official}, tmp_path / "seem.pt")
    loaded = create("seem_focalt", img_size=64, checkpoint=tmp_path / "seem.pt").eval()
    x = _x("seem_focalt")
    with torch.no_grad():
        assert torch.equal(loaded(x), bb(x))


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


def test_openclip_full_checkpoint_keeps_the_image_tower(tmp_path) -> None:
    bb = _built("openclip_vitb16")
    state = {k: v for k, v in bb.state_dict().items()}
    state["text_projection"] = torch.zeros(512, 512)
    state["logit_scale"] = torch.zeros(())
    torch.save(state, tmp_path / "clip.pt")
    loaded = create("openclip_vitb16", img_size=32, checkpoint=tmp_path / "clip.pt").eval()
    x = _x("openclip_vitb16")
    with torch.no_grad():
        assert torch.equal(loaded(x), bb(x))


def test_generic_timm_models_and_kwargs() -> None:
    vit = create("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=3)
    assert vit.num_blocks == 3 and vit.forward_tokens(torch.randn(2, 3, 32, 32)).shape == (2, 64, 192)
    cnn = create("resnet18")
    assert cnn.layer_names() == ["model.act1", "model.layer1", "model.layer2", "model.layer3", "model.layer4"]
    assert cnn(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    with pytest.raises(ValueError, match="neither a repsim zoo name nor a timm model"):
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
    rebuilt = create("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, decapitate=1, checkpoint=tmp_path / "cut.pt")
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
