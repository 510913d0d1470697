"""Layer surgery and the four scenarios: after one backward pass, gradients reach exactly the intended parameters;
AdaBN re-estimates BatchNorm statistics and nothing else."""

from __future__ import annotations

import copy
import functools
from itertools import chain

import pytest
import torch
from torch import nn

from repsim.models import SCENARIOS, Backbone, build_classifier, create
from repsim.surgery import LinearHead, StackedClassifier, adapt_batchnorm, batchnorm_layers, decapitate, freeze

# name -> (create kwargs, input size); two tiny timm models and two real zoo architectures
MODELS = {
    "vit_tiny": (dict(name="vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3), 32),
    "resnet18": (dict(name="resnet18"), 32),
    "deit_b": (dict(name="deit_b", img_size=32), 32),
    "seem_focalt": (dict(name="seem_focalt", img_size=64), 64),
}
TINY_DEIT = dict(depth=1, embed_dim=32, num_heads=2)
# (scenario, freeze_blocks, decapitate)
CASES = [(s, None, None) for s in SCENARIOS] + [
    ("unfrozen-linear", 2, None),
    ("unfrozen-stacked", 1, None),
    ("unfrozen-linear", None, 2),
    ("frozen-stacked", None, 2),
    ("unfrozen-stacked", 1, 3),
]


@functools.cache
def _state(key: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return create(**MODELS[key][0]).state_dict()


def _fresh(key: str) -> Backbone:
    """A new backbone with the cached weights (surgery mutates it)."""
    kwargs = MODELS[key][0]
    with torch.device("meta"):
        bb = create(**kwargs)
    bb = bb.to_empty(device="cpu")
    bb.load_state_dict(_state(key))
    return bb


def _expected(model: torch.nn.Module, scenario: str, freeze_blocks: int | None) -> set[str]:
    """Parameters that must receive a gradient, from the backbone's before/blocks/after split."""
    bb = model.backbone
    mode, kind = scenario.split("-")
    want = {f"head.{n}" for n, _ in model.head.named_parameters()}
    if kind == "stacked":
        want |= {f"classifier.{n}" for n, _ in model.classifier.named_parameters()}
    if mode == "unfrozen":
        before, per_block, after = bb.parameter_groups()
        k = freeze_blocks or 0
        names = set(chain.from_iterable(per_block[k:]))
        if k == 0:
            names |= set(before)
        if kind == "linear":
            names |= set(after) - bb.unused_parameter_names()
        want |= {f"backbone.{n}" for n in names}
    return want


# every case on the tiny models and DeiT-B; on SEEM (per-stage output norms) the two unfrozen ones it can break
RUNS = [(key, case) for key in ("vit_tiny", "resnet18", "deit_b") for case in CASES] + [
    ("seem_focalt", ("unfrozen-linear", None, 3)),
    ("seem_focalt", ("unfrozen-stacked", 1, None)),
]


@pytest.mark.parametrize(("key", "case"), RUNS, ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v)))
def test_gradients_reach_exactly_the_intended_parameters(key: str, case: tuple) -> None:
    scenario, freeze_blocks, cut = case
    bb = _fresh(key)
    model = build_classifier(
        bb, scenario, 3, freeze_blocks=freeze_blocks, decapitate=cut,
        classifier_kwargs=TINY_DEIT if scenario.endswith("stacked") else None,
    ).train()
    size = MODELS[key][1]
    logits = model(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 3)
    logits.square().sum().backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    want = _expected(model, scenario, freeze_blocks)
    assert got == want, f"unexpected grads: {sorted(got - want)[:5]}, missing grads: {sorted(want - got)[:5]}"
    assert {n for n, p in model.named_parameters() if p.requires_grad} == want
    if cut is not None:
        assert model.backbone.num_blocks == cut


def test_frozen_batchnorm_statistics_stay_put() -> None:
    bb = _fresh("resnet18")
    model = build_classifier(bb, "frozen-linear", 2).train()
    before = bb.model.bn1.running_mean.clone()
    model(torch.randn(4, 3, 32, 32))
    assert not bb.training and torch.equal(bb.model.bn1.running_mean, before)
    assert model.head.training

    bb = _fresh("resnet18")
    model = build_classifier(bb, "unfrozen-linear", 2, freeze_blocks=2).train()
    model(torch.randn(4, 3, 32, 32))
    assert not bb.model.bn1.training and torch.equal(bb.model.bn1.running_mean, before)  # stem frozen
    assert bb.model.layer2.training and bb.model.layer4.training


def test_progressive_freezing_sweep() -> None:
    bb = _fresh("vit_tiny")
    before, per_block, after = bb.parameter_groups()
    counts = []
    for k in range(bb.num_blocks + 1):
        freeze(bb, k)
        trainable = {n for n, p in bb.named_parameters() if p.requires_grad}
        expected = set(chain.from_iterable(per_block[k:])) | set(after) | (set(before) if k == 0 else set())
        assert trainable == expected
        counts.append(len(trainable))
    assert counts == sorted(counts, reverse=True) and counts[-1] == len(after)
    freeze(bb, "all")
    assert not any(p.requires_grad for p in bb.parameters())
    freeze(bb, "none")
    assert all(p.requires_grad for p in bb.parameters())
    for bad in (-1, bb.num_blocks + 1, "some", True):
        with pytest.raises(ValueError, match="blocks must be"):
            freeze(bb, bad)


def test_surgery_argument_errors() -> None:
    bb = _fresh("vit_tiny")
    with pytest.raises(ValueError, match="cannot keep 4 blocks"):
        decapitate(bb, 4)
    with pytest.raises(ValueError, match="cannot keep 0 blocks"):
        decapitate(bb, 0)
    with pytest.raises(TypeError, match="repsim Backbone"):
        decapitate(torch.nn.Linear(2, 2), 1)
    with pytest.raises(ValueError, match="unknown scenario"):
        build_classifier(bb, "frozen", 2)
    with pytest.raises(ValueError, match="needs an unfrozen"):
        build_classifier(bb, "frozen-linear", 2, freeze_blocks=1)
    with pytest.raises(ValueError, match="classifier_kwargs are for the stacked"):
        build_classifier(bb, "unfrozen-linear", 2, classifier_kwargs=TINY_DEIT)


def test_stacked_classifier_interpolates_its_position_embeddings() -> None:
    torch.manual_seed(0)
    clf = StackedClassifier(24, img_size=64, patch_size=16, **TINY_DEIT).eval()  # DeiT grid 4x4
    assert clf.blocks is not None and clf.num_features == 32
    with torch.no_grad():
        assert clf(torch.randn(2, 16, 24)).shape == (2, 32)
        assert clf(torch.randn(2, 49, 24)).shape == (2, 32)
    with pytest.raises(ValueError, match="square token grid"):
        clf(torch.randn(2, 10, 24))
    head = LinearHead(32, 4)
    assert isinstance(head, torch.nn.Linear) and head.out_features == 4


def test_adapt_batchnorm_gives_each_layer_the_statistics_of_its_input_over_the_dataset() -> None:
    """AdaBN: each BatchNorm's running mean/var are the per-channel mean and unbiased variance of all it received
    in the pass (a float64 reference of the same pass), not an average over batches; every other tensor is
    bit-identical and each module keeps its mode."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Conv2d(4, 5, 3),
                          nn.BatchNorm2d(5), nn.Flatten(), nn.Linear(80, 6), nn.BatchNorm1d(6)).eval()
    model[3].train()  # a module in train mode stays so
    gen = torch.Generator().manual_seed(1)
    # unequal batches with different means: averaging batch statistics would miss the spread between them
    batches = [torch.randn(n, 3, 8, 8, generator=gen) * 2 + shift for n, shift in ((16, -1.0), (16, 3.0), (19, 0.5))]
    ref = copy.deepcopy(model).double()
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in batchnorm_layers(ref)}
    for name, m in ref.named_modules():
        m.training = name in seen  # the pass: BatchNorm in train mode, everything else in eval mode
        if name in seen:
            m.register_forward_pre_hook(lambda _, args, name=name: seen[name].append(args[0]))
    with torch.no_grad():
        for x in batches:
            ref(x.double())
    before = copy.deepcopy(model.state_dict())
    assert adapt_batchnorm(model, [(x, torch.zeros(len(x))) for x in batches]) is model
    assert list(seen) == ["1", "5", "8"]
    for name, values in seen.items():
        bn = model.get_submodule(name)
        x = torch.cat(values).transpose(0, 1).reshape(bn.num_features, -1)
        torch.testing.assert_close(bn.running_mean.double(), x.mean(1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bn.running_var.double(), x.var(1), rtol=1e-5, atol=1e-5)
    for key, value in model.state_dict().items():
        if not key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(value, before[key]), key
    assert [m.training for m in model.modules()] == [False, False, False, False, True] + [False] * 5
    with pytest.raises(ValueError, match="has no BatchNorm layer with running statistics"):
        adapt_batchnorm(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)), [torch.zeros(4, 2)])
