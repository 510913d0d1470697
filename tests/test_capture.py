"""repsim.capture: layer selection, per-call capture, pooling, clean-up after errors, extract and zarr resume."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import xarray as xr
import zarr
from torch import nn

from repsim.capture import capture, extract, open_activations, pool_tensor, resolve_layers


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2,
                             reg_tokens=2, num_classes=0)


class Twice(nn.Module):
    """A shared layer applied twice (weight sharing / recurrence)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 5)
        self.shared = nn.Linear(5, 5)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared(torch.relu(self.shared(self.drop(self.inp(x)))))


def test_exact_names_and_globs(vit: nn.Module) -> None:
    assert resolve_layers(vit, "blocks.*") == ["blocks.0", "blocks.1", "blocks.2"]
    assert resolve_layers(vit, ["blocks.1.attn", "norm"]) == ["blocks.1.attn", "norm"]
    assert resolve_layers(vit, "**.attn.proj") == [f"blocks.{i}.attn.proj" for i in range(3)]
    assert resolve_layers(vit, ["blocks.[02]", "blocks.0"]) == ["blocks.0", "blocks.2"]


@pytest.mark.parametrize("bad, close", [("blocks.0.atn", "blocks.0.attn"), ("block.*", "blocks.0"), ("nrm", "norm")])
def test_no_match_lists_close_matches(vit: nn.Module, bad: str, close: str) -> None:
    with pytest.raises(ValueError, match=rf"{bad!r} matches no module.*close matches: .*{close}"):
        with capture(vit, ["blocks.1", bad]):
            pass


def test_module_called_twice_kept_per_call() -> None:
    torch.manual_seed(0)
    m = Twice()
    x = torch.randn(7, 6)
    with capture(m, ["inp", "shared"]) as acts:
        out = m(x)
        got = dict(acts)
        m(x[:3])  # the next forward replaces, not appends
        assert [v.shape[0] for v in acts.values()] == [3, 3, 3]
    assert list(got) == ["inp", "shared#0", "shared#1"]
    with torch.no_grad():
        first = m.shared(m.inp(x))  # dropout was off while capturing (eval mode)
        torch.testing.assert_close(got["shared#0"], first)
        torch.testing.assert_close(got["shared#1"], m.shared(torch.relu(first)))
    torch.testing.assert_close(got["shared#1"], out.detach())


def test_detached_and_clean_after_exception() -> None:
    m = Twice().train()
    m.drop.eval()  # a per-module flag that must come back as it was
    with pytest.raises(RuntimeError, match="boom"):
        with capture(m, ["inp", "shared"]) as acts:
            assert not m.training and not m.inp.training
            m(torch.randn(4, 6, requires_grad=True))
            assert all(not v.requires_grad for v in acts.values())
            raise RuntimeError("boom")
    assert m.training and m.inp.training and not m.drop.training
    for mod in m.modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks


def test_hooks_removed_after_error_inside_forward() -> None:
    m = nn.Sequential(nn.Linear(4, 3), nn.Linear(5, 2))  # shape mismatch in the second layer
    with pytest.raises(RuntimeError):
        with capture(m, "0"):
            m(torch.randn(4, 4))
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in m.modules())


def test_token_pooling_skips_prefix_and_register_tokens(vit: nn.Module) -> None:
    assert vit.num_prefix_tokens == 3  # class token + 2 registers
    x = torch.randn(5, 3, 32, 32)
    acts = {}
    for pool in ("tokens", "cls", "mean", "flatten"):
        with capture(vit, "blocks.2", pool=pool) as a, torch.no_grad():
            vit(x)
            acts[pool] = a["blocks.2"]
    tokens = acts["tokens"]
    assert tokens.shape == (5, 3 + 16, 32)
    torch.testing.assert_close(acts["cls"], tokens[:, 0])
    torch.testing.assert_close(acts["mean"], tokens[:, 3:].mean(1))
    torch.testing.assert_close(acts["flatten"], tokens.reshape(5, -1))


def test_hf_vit_prefix_tokens_from_its_config() -> None:
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    cfg = Dinov2WithRegistersConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, image_size=16, patch_size=8,
        num_register_tokens=2,
    )
    torch.manual_seed(0)
    m, x = Dinov2WithRegistersModel(cfg), torch.randn(3, 3, 16, 16)
    pooled = {}
    for pool in ("tokens", "mean"):
        with capture(m, "encoder.layer.*", pool=pool) as acts, torch.no_grad():
            m(x)
            pooled[pool] = acts["encoder.layer.1"]
    assert pooled["tokens"].shape == (3, 1 + 2 + 4, 16)  # class, 2 registers, 2 x 2 patches
    torch.testing.assert_close(pooled["mean"], pooled["tokens"][:, 3:].mean(1))


def test_map_pooling_and_errors() -> None:
    nchw = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(pool_tensor(nchw, "gap"), nchw.mean((2, 3)))
    torch.testing.assert_close(pool_tensor(nchw.permute(0, 2, 3, 1), "gap"), nchw.mean((2, 3)))  # NHWC detected
    torch.testing.assert_close(pool_tensor(nchw, "gap", layout="NHWC"), nchw.mean((1, 2)))
    assert pool_tensor(nchw, "flatten").shape == (2, 128)
    with pytest.raises(ValueError, match="'conv'.*use 'gap'"):
        pool_tensor(nchw, "mean", name="conv")
    with pytest.raises(ValueError, match="'blk'.*use 'mean'"):
        pool_tensor(torch.randn(2, 5, 3), "gap", name="blk")
    with pytest.raises(ValueError, match="no class/prefix token"):
        pool_tensor(torch.randn(2, 5, 3), "cls", num_prefix_tokens=0)


class Outputs(nn.Module):
    """Submodules returning a tuple, a dict and a HF ModelOutput."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def test_tuple_dict_and_hf_outputs() -> None:
    from transformers.modeling_outputs import BaseModelOutput

    y = torch.randn(2, 4)
    wrappers = {
        "tuple": lambda t: (t, "extra"),
        "dict": lambda t: {"logits": t, "n": 3},
        "hf": lambda t: BaseModelOutput(last_hidden_state=t, hidden_states=(t * 0,)),
    }
    for kind, wrap in wrappers.items():
        m = Outputs()
        m.lin.register_forward_hook(lambda _m, _i, _o, w=wrap: w(y))
        with capture(m, "lin") as acts:
            m(torch.randn(2, 3))
        torch.testing.assert_close(acts["lin"], y, msg=kind)


def _loader(x: torch.Tensor, y: torch.Tensor, bs: int, fail_after: int | None = None):
    for i, start in enumerate(range(0, len(x), bs)):
        if fail_after is not None and i == fail_after:
            raise KeyboardInterrupt("interrupted")
        yield x[start : start + bs], y[start : start + bs]


def test_extract_in_memory(vit: nn.Module) -> None:
    x, y = torch.randn(10, 3, 32, 32), torch.arange(10) % 3
    ds = extract(vit, _loader(x, y, 4), layers="blocks.*", pool="mean", progress=False)
    assert list(ds.data_vars) == ["blocks.0", "blocks.1", "blocks.2"]
    assert ds["blocks.1"].dims == ("sample", "blocks.1:feature") and ds["blocks.1"].shape == (10, 32)
    np.testing.assert_array_equal(ds["sample"].values, np.arange(10))
    np.testing.assert_array_equal(ds["label"].values, y.numpy())
    with capture(vit, "blocks.1", pool="mean") as acts, torch.no_grad():
        vit(x)
        np.testing.assert_allclose(ds["blocks.1"].values, acts["blocks.1"].numpy(), rtol=1e-5, atol=1e-6)


def test_resumed_zarr_extraction_equals_uninterrupted(vit: nn.Module, tmp_path) -> None:
    x, y = torch.randn(22, 3, 32, 32), torch.arange(22) % 4
    kw = dict(layers=["blocks.0", "blocks.2"], pool="tokens", progress=False)
    full = extract(vit, _loader(x, y, 6), **kw).load()
    store = tmp_path / "acts.zarr"
    with pytest.raises(KeyboardInterrupt):
        extract(vit, _loader(x, y, 6, fail_after=2), store=store, **kw)
    assert xr.open_zarr(store, consolidated=False, chunks=None).sizes["sample"] == 12
    # a write cut short between variables: one array got 3 more rows than the others
    arr = zarr.open_group(str(store), mode="r+")["blocks.0"]
    arr.resize((15, *arr.shape[1:]))
    resumed = extract(vit, _loader(x, y, 5), store=store, **kw)  # different batch size: batch 10..15 straddles
    assert resumed.sizes["sample"] == 22
    assert list(resumed.data_vars) == ["blocks.0", "blocks.2"]
    xr.testing.assert_allclose(resumed.load(), full, rtol=1e-5, atol=1e-6)
    again = extract(vit, _loader(x, y, 6), store=store, **kw)  # complete: nothing appended
    assert again.sizes["sample"] == 22
    with pytest.raises(ValueError, match="holds an extraction"):
        extract(vit, _loader(x, y, 6), store=store, layers="blocks.0", pool="mean", progress=False)


def _tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=0).eval()


def _sharded_loader() -> torch.utils.data.DataLoader:
    torch.manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(22, 3, 32, 32), torch.arange(22) % 3)
    return torch.utils.data.DataLoader(data, batch_size=4)  # 6 batches: rank 0 takes 0, 2, 4; rank 1 takes 1, 3, 5


def _extract_worker(rank: int, store: str) -> None:
    kw = dict(layers="blocks.*", pool="mean", progress=False)
    extract(_tiny_vit(), _sharded_loader(), store=store, **kw)
    in_memory = extract(_tiny_vit(), _sharded_loader(), **kw)  # every rank gets the whole Dataset
    assert in_memory.sizes["sample"] == 22


def test_extract_under_two_gloo_processes_equals_one_process(tmp_path, run_gloo) -> None:
    run_gloo(_extract_worker, str(tmp_path / "ddp.zarr"))
    single = extract(_tiny_vit(), _sharded_loader(), layers="blocks.*", pool="mean", progress=False).load()
    sharded = open_activations(tmp_path / "ddp.zarr").load()
    np.testing.assert_array_equal(sharded["sample"].values, np.arange(22))
    np.testing.assert_array_equal(sharded["label"].values, single["label"].values)
    for var in single.data_vars:
        np.testing.assert_allclose(sharded[var].values, single[var].values, rtol=0, atol=1e-6)
