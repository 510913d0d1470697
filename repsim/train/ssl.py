"""Settings and parts of self-supervised pretraining (``repsim pretrain``): the config with its defaults and checks,
the multi-crop views for small grey and colour medical images, the DINO student/teacher built on lightly's modules,
and the collapse check.

The defaults are what was measured on BreastMNIST at 48 px with EfficientNet-Lite0 on 2 CPU cores (README,
"In-domain self-supervised pretraining"): fewer prototypes than the paper's DINO (256), BatchNorm in the head of a
CNN, a constant teacher temperature 0.04 (a 0.04 -> 0.07 warm-up drove the teacher towards uniform output), teacher
momentum 0.99 (0.996 barely moves in the few hundred steps of a small dataset), an LR scaled to the batch with a
2-epoch warm-up, weight decay 0.04 -> 0.4. With them ImageNet -> DINO keeps ImageNet's k-NN AUC; DINO and SimCLR
from scratch did NOT beat random init within that budget (24 epochs): treat them as a starting point on a GPU.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import nn
from torchvision import transforms as T

from repsim.backbone import Backbone
from repsim.train.config import config_diff, deep_merge

PRETRAIN_DEFAULTS: dict[str, Any] = {
    "method": "dino",
    "data": {"img_size": 48, "channels": 3, "split_seed": 42},  # + a trainer data block (dataset, root, ...)
    "model": {"name": None, "kwargs": {}, "pretrained": False, "checkpoint": None},
    "train": {
        "epochs": 24,
        "batch_size": 32,  # more updates per epoch on small datasets
        "lr": None,  # default: base_lr (from scratch) or base_lr_continued (from weights) x batch_size / 256
        "base_lr": 8.0e-3,
        "base_lr_continued": 8.0e-4,
        "min_lr": 1.0e-6,
        "warmup_epochs": 2,  # linear LR warm-up, then cosine to min_lr
        "weight_decay": 0.04,  # cosine to weight_decay_end
        "weight_decay_end": 0.4,
        "grad_clip": 3.0,
        "seed": 0,
        "device": "auto",
        "num_workers": 0,
        "eval_batch_size": 256,
    },
    "dino": {
        "out_dim": 256,  # prototypes K
        "hidden_dim": 512,
        "bottleneck_dim": 128,
        "batch_norm": None,  # BatchNorm in the head; default: when the backbone has BatchNorm (CNNs)
        "freeze_last_layer": 1,  # epochs during which the prototypes are not trained
        "warmup_teacher_temp": 0.04,
        "teacher_temp": 0.04,  # 0.04 -> 0.07 flattened the teacher to uniform here
        "warmup_teacher_temp_epochs": 0,
        "student_temp": 0.1,
        "center_momentum": 0.9,
        "momentum": 0.99,  # teacher EMA momentum, cosine to 1 (0.996 barely moves in a few hundred steps)
    },
    "simclr": {"out_dim": 128, "hidden_dim": 512, "batch_norm": None, "temperature": 0.2},
    "views": {
        "global_scale": [0.4, 1.0],
        "local_crops": 2,
        "local_size": None,  # default: img_size // 2
        "local_scale": [0.1, 0.4],
        "vflip": True,  # medical images have no canonical up
        "jitter": 0.4,  # brightness and contrast (and 0.5x saturation, 0.1 hue on colour images)
        "blur": True,
        "solarize": 0.2,  # probability on the second global view
    },
    "collapse": {
        "min_rank": 1.5,  # effective rank of the pooled validation features below this is a collapse
        "max_entropy": 0.98,  # DINO teacher entropy above this share of ln K (a uniform teacher): a collapse
        "patience": 3,  # consecutive epochs the condition must hold
    },
}
METHODS = ("dino", "simclr")


class Collapsed(RuntimeError):
    """A pretraining run collapsed; the message names the epoch and the signal."""


def resolve_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``cfg`` over ``PRETRAIN_DEFAULTS``, checked: one-line ``ValueError`` naming the first bad key."""
    unknown = [k for k in config_diff(deep_merge(PRETRAIN_DEFAULTS, cfg), PRETRAIN_DEFAULTS)
               if k.split(".")[0] not in ("data", "model") and _missing(PRETRAIN_DEFAULTS, k)]
    if unknown:
        raise ValueError(f"unknown pretrain config key {unknown[0]!r}")
    out = deep_merge(PRETRAIN_DEFAULTS, cfg)
    if out["method"] not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {out['method']!r}")
    if not out["model"]["name"]:
        raise ValueError("model.name is required (a zoo or timm name, e.g. efficientnet_lite0)")
    if not out["data"].get("dataset"):
        raise ValueError("data.dataset is required (a dataset name such as breastmnist, or a trainer data block)")
    if out["model"]["pretrained"] and out["model"]["checkpoint"]:
        raise ValueError("give model.pretrained or model.checkpoint, not both")
    tr, dn, vw, co = out["train"], out["dino"], out["views"], out["collapse"]
    for key, ok in (("train.epochs", tr["epochs"] >= 1), ("train.batch_size", tr["batch_size"] >= 2),
                    ("train.lr", tr["lr"] is None or tr["lr"] > 0), ("train.warmup_epochs", tr["warmup_epochs"] >= 0),
                    ("dino.out_dim", dn["out_dim"] >= 2), ("dino.teacher_temp", dn["teacher_temp"] > 0),
                    ("dino.warmup_teacher_temp", dn["warmup_teacher_temp"] > 0),
                    ("dino.student_temp", dn["student_temp"] > 0), ("dino.momentum", 0 <= dn["momentum"] <= 1),
                    ("views.local_crops", vw["local_crops"] >= 0), ("collapse.patience", co["patience"] >= 1),
                    ("collapse.max_entropy", 0 < co["max_entropy"] <= 1)):
        if not ok:
            block, leaf = key.split(".")
            raise ValueError(f"{key} = {out[block][leaf]!r} is out of range")
    return out


def _missing(tree: Mapping[str, Any], dotted: str) -> bool:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return True
        node = node[part]
    return False


def base_lr(cfg: Mapping[str, Any]) -> float:
    """The peak learning rate: ``train.lr``, else ``train.base_lr`` (from scratch) or ``train.base_lr_continued``
    (from pretrained weights or a checkpoint, which a large LR would wipe out) scaled by ``batch_size / 256``."""
    tr, m = cfg["train"], cfg["model"]
    if tr["lr"] is not None:
        return float(tr["lr"])
    return (tr["base_lr_continued"] if m["pretrained"] or m["checkpoint"] else tr["base_lr"]) * tr["batch_size"] / 256


class MultiCrop:
    """PIL image -> ``[global, global, local, ...]`` normalised tensors (DINO's multi-crop, scaled to small images).

    Flips (vertical too), brightness/contrast jitter (saturation and hue only on colour images), Gaussian blur with
    a kernel sized to the crop, solarisation on the second global view. Every random draw comes from torch's
    default generator, which ``ImageDataset`` seeds per (seed, epoch, sample): runs resume exactly.
    """

    def __init__(self, img_size: int, mean: Any, std: Any, views: Mapping[str, Any], *, colour: bool) -> None:
        local_size = int(views["local_size"] or img_size // 2)
        self.local_crops = int(views["local_crops"])

        def view(size: int, scale: Any, blur_p: float, solarize_p: float) -> T.Compose:
            j = float(views["jitter"])
            steps: list[Any] = [T.RandomResizedCrop(size, scale=tuple(scale)), T.RandomHorizontalFlip()]
            if views["vflip"]:
                steps.append(T.RandomVerticalFlip())
            if j > 0:
                steps.append(T.RandomApply([T.ColorJitter(j, j, j / 2 if colour else 0, 0.1 if colour else 0)], p=0.8))
            if colour:
                steps.append(T.RandomGrayscale(p=0.2))
            if views["blur"] and blur_p > 0:
                kernel = max(3, (size // 10) | 1)
                steps.append(T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0 * size / 224 + 0.1))], p=blur_p))
            if solarize_p > 0:
                steps.append(T.RandomSolarize(128, p=solarize_p))
            return T.Compose([*steps, T.ToTensor(), T.Normalize(list(mean), list(std))])

        self.globals = [view(img_size, views["global_scale"], 1.0, 0.0),
                        view(img_size, views["global_scale"], 0.1, float(views["solarize"]))]
        self.local = view(local_size, views["local_scale"], 0.5, 0.0)

    def __call__(self, img: Any) -> list[torch.Tensor]:
        return [t(img) for t in self.globals] + [self.local(img) for _ in range(self.local_crops)]


class ProjectedNet(nn.Module):
    """Backbone pooled feature -> a projection head."""

    def __init__(self, backbone: Backbone, head: nn.Module) -> None:
        super().__init__()
        self.backbone: Backbone = backbone
        self.head: nn.Module = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.forward_features(x))


def _has_batch_norm(backbone: Backbone, setting: bool | None) -> bool:
    """BatchNorm in the head: ``setting``, else when the backbone has BatchNorm (CNNs)."""
    if setting is not None:
        return bool(setting)
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in backbone.modules())


class Dino(nn.Module):
    """DINO: a student, its EMA teacher (cosine momentum to 1) and lightly's ``DINOLoss`` holding the centre; the
    teacher's backbone is the result. Multi-crop: the teacher sees the two global views, the student all views."""

    def __init__(self, backbone: Backbone, dino: Mapping[str, Any], total_steps: int) -> None:
        from lightly.loss import DINOLoss
        from lightly.models.modules import DINOProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        super().__init__()
        self.dino, self.total_steps = dict(dino), total_steps
        batch_norm = _has_batch_norm(backbone, dino["batch_norm"])

        def head() -> nn.Module:
            with warnings.catch_warnings():  # lightly builds the prototype layer with the deprecated weight_norm
                warnings.filterwarnings("ignore", "`torch.nn.utils.weight_norm` is deprecated", FutureWarning)
                return DINOProjectionHead(backbone.num_features, dino["hidden_dim"], dino["bottleneck_dim"],
                                          dino["out_dim"], batch_norm=batch_norm,
                                          freeze_last_layer=dino["freeze_last_layer"])

        self.student = ProjectedNet(backbone, head())
        self.teacher = ProjectedNet(copy.deepcopy(backbone), head())  # weight_norm'd heads cannot be deep-copied
        self.teacher.load_state_dict(self.student.state_dict())
        deactivate_requires_grad(self.teacher)
        self.loss_fn = DINOLoss(dino["out_dim"], warmup_teacher_temp=dino["warmup_teacher_temp"],
                                teacher_temp=dino["teacher_temp"],
                                warmup_teacher_temp_epochs=dino["warmup_teacher_temp_epochs"],
                                student_temp=dino["student_temp"], center_momentum=dino["center_momentum"])
        self.chance_loss = math.log(dino["out_dim"])  # the loss (and teacher entropy) of a uniform teacher

    @property
    def result(self) -> Backbone:
        return self.teacher.backbone

    def step(self, crops: list[torch.Tensor], epoch: int, iteration: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Update the teacher, then the loss of one batch of views and what to monitor."""
        from lightly.models.utils import update_momentum
        from lightly.utils.scheduler import cosine_schedule

        momentum = cosine_schedule(iteration, self.total_steps, self.dino["momentum"], 1.0)
        update_momentum(self.student, self.teacher, m=momentum)
        temp = float(self.loss_fn.teacher_temp_schedule[epoch]) if epoch < self.dino["warmup_teacher_temp_epochs"] \
            else self.dino["teacher_temp"]
        with torch.no_grad():
            t_out = self.teacher(torch.cat(crops[:2])).chunk(2)
            logp = torch.log_softmax((torch.cat(t_out) - self.loss_fn.center.reshape(1, -1)) / temp, dim=-1)
            entropy = -(logp.exp() * logp).sum(-1).mean()  # ln K when the teacher is uniform
        s_out = list(self.student(torch.cat(crops[:2])).chunk(2))
        if len(crops) > 2:
            s_out += list(self.student(torch.cat(crops[2:])).chunk(len(crops) - 2))
        loss = self.loss_fn(list(t_out), s_out, epoch=epoch)
        return loss, {"teacher_entropy": float(entropy), "momentum": momentum, "teacher_temp": temp}

    def after_backward(self, epoch: int) -> None:
        from lightly.models.modules import DINOProjectionHead

        cast(DINOProjectionHead, self.student.head).cancel_last_layer_gradients(epoch)

    def signal(self, record: Mapping[str, Any], max_share: float) -> str | None:
        if record["teacher_entropy"] >= max_share * self.chance_loss:
            return (f"teacher entropy {record['teacher_entropy']:.3f} >= {max_share:g} x ln K "
                    f"({self.chance_loss:.3f}): a uniform teacher output, loss {record['loss']:.3f}")
        return None


class SimCLR(nn.Module):
    """SimCLR (lightly's ``SimCLRProjectionHead`` and ``NTXentLoss``) on the two global views: a steadier
    in-domain SSL method at small batch, reported as SimCLR, never as the paper's DINO."""

    def __init__(self, backbone: Backbone, simclr: Mapping[str, Any], batch_size: int) -> None:
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead

        super().__init__()
        head = SimCLRProjectionHead(backbone.num_features, simclr["hidden_dim"], simclr["out_dim"],
                                    batch_norm=_has_batch_norm(backbone, simclr["batch_norm"]))
        self.student = ProjectedNet(backbone, head)
        self.loss_fn = NTXentLoss(temperature=simclr["temperature"])
        self.chance_loss = math.log(2 * batch_size - 1)  # the loss when all embeddings are equal (reference only)

    @property
    def result(self) -> Backbone:
        return self.student.backbone

    def step(self, crops: list[torch.Tensor], epoch: int, iteration: int) -> tuple[torch.Tensor, dict[str, float]]:
        z0, z1 = self.student(torch.cat(crops[:2])).chunk(2)
        return self.loss_fn(z0, z1), {}

    def after_backward(self, epoch: int) -> None:
        """Nothing to do (DINO freezes its prototypes here)."""

    def signal(self, record: Mapping[str, Any], max_share: float) -> str | None:
        """None: a loss near ln(2B-1) is no collapse signal here (spread random embeddings lie above it, Jensen);
        equal embeddings show as a lost feature rank, which ``collapse_signal`` checks for every method."""
        return None


def build_method(backbone: Backbone, cfg: Mapping[str, Any], total_steps: int) -> Dino | SimCLR:
    """The SSL method of ``cfg["method"]`` around ``backbone``."""
    if cfg["method"] == "dino":
        return Dino(backbone, cfg["dino"], total_steps)
    return SimCLR(backbone, cfg["simclr"], cfg["train"]["batch_size"])


def collapse_signal(record: Mapping[str, Any], method: Dino | SimCLR, collapse: Mapping[str, Any]) -> str | None:
    """Why the epoch ``record`` looks collapsed (or diverged), or None."""
    if not math.isfinite(record["loss"]):
        return f"the loss is {record['loss']} (diverged)"
    signal = method.signal(record, collapse["max_entropy"])
    if signal:
        return signal
    rank = record["val_effective_rank"]
    if not rank >= collapse["min_rank"]:
        return f"effective rank of the validation features {rank:.2f} < {collapse['min_rank']:g}"
    return None
