"""Trainer helpers used by the loop, the experiment runner, the study and the benches: devices and processes, seeds
and RNG state (stored as tensors so checkpoints load with ``weights_only=True``), optimiser groups, the model of a
config, and the config check that guards resuming and reusing a run folder."""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn

from repsim.data import Data
from repsim.train.config import DEFAULTS, config_diff, deep_merge
from repsim.train.runs import RunFiles

if TYPE_CHECKING:
    from repsim.models.classifier import FoundationClassifier


def check_same_config(cfg: dict[str, Any], run_dir: Path) -> None:
    """Refuse to resume or reuse ``run_dir`` when it was written by a different config.

    Keys added to the trainer after the run was written count as equal when the new config holds their default, so a
    newer repsim still reuses older runs whose behaviour it reproduces.
    """
    files = RunFiles(run_dir)
    path = files.config
    held = [f for f in (files.summary, files.checkpoint("last")) if f.exists()]
    if held and not path.exists():
        raise ValueError(f"{run_dir} holds a run ({held[0].relative_to(run_dir)}) but no {path.name}, so its config "
                         f"cannot be checked against this one; restore {path.name} or use another --out")
    if path.exists():
        try:
            old = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ValueError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
        diff = config_diff(deep_merge(DEFAULTS, old), yaml.safe_load(yaml.safe_dump(cfg)))
        if diff:
            raise ValueError(f"{run_dir} holds a run with a different config ({', '.join(diff)}); "
                             "use another --out")


def collective_timeout() -> timedelta:
    """How long a collective waits for the other processes before failing: ``REPSIM_COLLECTIVE_TIMEOUT`` seconds
    (default 300), so a stalled rank ends every rank instead of blocking them for gloo's or NCCL's 30 minutes."""
    text = os.environ.get("REPSIM_COLLECTIVE_TIMEOUT", "300")
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"REPSIM_COLLECTIVE_TIMEOUT must be a positive number of seconds, got {text!r}")
    return timedelta(seconds=seconds)


def distributed() -> tuple[int, int]:
    """(rank, world size), initialising the process group (with ``collective_timeout``) when launched by
    torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=collective_timeout())
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def pick_device(name: str) -> torch.device:
    """``"auto"`` -> this process's CUDA device (``LOCAL_RANK``) when there is one, else the CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def rng_state() -> dict[str, Any]:
    """Every RNG the trainer draws from, as tensors and plain numbers (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` saved."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two AdamW groups: no weight decay on biases and other 1-D parameters (norms)."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_model(cfg: dict[str, Any], data: Data) -> tuple[FoundationClassifier, dict[str, Any]]:
    """The classifier of ``cfg["model"]`` for ``data`` and the ``model.json`` record that rebuilds it."""
    from repsim import models

    model_cfg = cfg["model"]
    kwargs = dict(model_cfg["kwargs"] or {})
    img_size = int(kwargs.pop("img_size", cfg["data"].get("img_size", 224)))
    in_chans = int(kwargs.pop("in_chans", data.info.channels))
    if in_chans != data.info.channels:
        raise ValueError(f"dataset {data.info.name!r} gives {data.info.channels}-channel images but the model expects "
                         f"in_chans={in_chans}; set data.channels={in_chans} to convert the images")
    backbone = models.create(model_cfg["name"], pretrained=bool(model_cfg["pretrained"]),
                             checkpoint=model_cfg["checkpoint"], img_size=img_size, in_chans=in_chans, **kwargs)
    # model.classifier configures the appended classifier of the stacked scenarios; linear heads ignore it, so a
    # spec can set it once for a grid over both heads.
    classifier = dict(model_cfg["classifier"] or {}) if model_cfg["scenario"].endswith("-stacked") else {}
    model = models.build_classifier(backbone, model_cfg["scenario"], data.info.num_classes,
                                    freeze_blocks=model_cfg["freeze_blocks"], decapitate=model_cfg["decapitate"],
                                    classifier_kwargs=classifier or None)
    record = {"name": model_cfg["name"], "kwargs": kwargs, "img_size": img_size, "in_chans": in_chans,
              "scenario": model_cfg["scenario"], "num_classes": data.info.num_classes, "classifier": classifier,
              "freeze_blocks": model_cfg["freeze_blocks"], "decapitate": model_cfg["decapitate"],
              "pretrained": bool(model_cfg["pretrained"]), "checkpoint": model_cfg["checkpoint"],
              "input_mean": [float(v) for v in data.info.mean or ()],
              "input_std": [float(v) for v in data.info.std or ()]}
    return model, record


def describe_weights(model_cfg: dict[str, Any]) -> str:
    """The starting weights of a spec's ``model`` block in words: ``pretrained``, ``checkpoint <path>`` or
    ``random init`` (results of different starts are told apart by it)."""
    if model_cfg.get("checkpoint"):
        return f"checkpoint {model_cfg['checkpoint']}"
    return "pretrained" if model_cfg.get("pretrained") else "random init"


def memory_format(model: nn.Module, setting: bool | str) -> torch.memory_format:
    """NHWC (``channels_last``) for ``True``, or for ``"auto"`` on a network with 2-d BatchNorm (a convnet: its
    convolutions run faster on NHWC, bench/train_throughput.py); NCHW otherwise."""
    if setting == "auto":
        setting = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    return torch.channels_last if setting else torch.contiguous_format


def resumed_threads(ckpt: Mapping[str, Any] | None) -> int | None:
    """The intra-op threads of the run whose last checkpoint ``ckpt`` is being resumed (None for a new run, or when
    the environment pins them): the same count keeps its numbers bit-identical."""
    if ckpt is None or os.environ.get("REPSIM_THREADS") or os.environ.get("OMP_NUM_THREADS"):
        return None
    return ckpt["state"].get("threads")
