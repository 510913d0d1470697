"""Self-supervised pretraining of any zoo backbone on the train split of any dataset the trainer reads
(``repsim pretrain``): DINO (Caron et al. 2021), as in the paper's Appendix B, from scratch or from a checkpoint.

Built on lightly: ``DINOProjectionHead``, ``DINOLoss`` (teacher temperature warm-up, centring), ``update_momentum``
with a ``cosine_schedule`` of the teacher momentum. Only TRAIN images are read for training; the validation images
only give the monitoring metric (the effective rank of the teacher's pooled features). Every epoch ends with an
atomic ``checkpoints/last.pt`` (student, teacher, optimiser, loss centre, RNG states, counters); the data order and
the views are functions of (seed, epoch), so ``resume=True`` continues bit-exactly after a kill. A run whose teacher
output goes uniform, whose features lose their rank or whose loss diverges stops with ``Collapsed``, writes
``collapsed.json`` and never a ``backbone_best.pt``: it cannot be used as a start. The run-folder layout is in
``repsim.train.runs``; the finished run loads with ``load_run`` and ``repsim cka --run-a``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import DataLoader

from repsim.backbone import Backbone
from repsim.data import prepare
from repsim.data.datasets import ImageDataset
from repsim.data.named import NAMED
from repsim.files import load_torch, save_torch, write_text
from repsim.metrics import spectrum
from repsim.progress import tqdm
from repsim.train import runs
from repsim.train.config import config_diff
from repsim.train.ssl import Collapsed, MultiCrop, base_lr, build_method, collapse_signal, resolve_config
from repsim.train.utils import param_groups, pick_device, rng_state, seed_everything, set_rng_state


def data_block(data: str, **extra: Any) -> dict[str, Any]:
    """A trainer data block for a dataset name (``breastmnist``), a MedMNIST-layout ``.npz`` or an image folder."""
    if data in NAMED:
        return {**NAMED[data], **extra}
    path = Path(data).expanduser()
    if path.suffix == ".npz":
        return {"dataset": "medmnist", "root": str(path.resolve().parent), "flag": path.stem, **extra}
    if path.is_dir():
        return {"dataset": "image_folder", "root": str(path.resolve()), **extra}
    raise ValueError(f"data {data!r} is neither a known dataset ({', '.join(sorted(NAMED))}), a MedMNIST .npz nor "
                     "an image folder")


@torch.no_grad()
def pooled_features(backbone: Backbone, dataset: Any, *, batch_size: int, device: torch.device) -> torch.Tensor:
    """Pooled features of every image of ``dataset`` (eval mode, the dataset's own transform), on the CPU."""
    was_training = backbone.training
    backbone.eval()
    feats = [backbone.forward_features(x.to(device)).float().cpu()
             for x, _ in DataLoader(dataset, batch_size=batch_size, shuffle=False)]
    backbone.train(was_training)
    return torch.cat(feats)


def pretrain(cfg: Mapping[str, Any], run_dir: str | Path, *, data_root: str | Path | None = None,
             resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Pretrain ``cfg`` (see ``repsim.train.ssl.PRETRAIN_DEFAULTS``) into ``run_dir``; return its summary."""
    from lightly.utils.scheduler import cosine_schedule

    from repsim import models

    cfg = resolve_config(cfg)
    run_dir = Path(run_dir)
    files = runs.RunFiles(run_dir)
    marker = run_dir / runs.COLLAPSED
    if marker.exists():
        raise Collapsed(f"{run_dir} holds a collapsed run ({json.loads(marker.read_text())['reason']}); it cannot "
                        "be resumed: use another --out")
    if files.finished():
        raise FileExistsError(f"{run_dir} already holds a finished run; use another --out")
    if files.checkpoint("last").exists() and not resume:
        raise FileExistsError(f"{run_dir} already holds a run; pass resume=True (--resume) or use another --out")
    if files.config.exists():
        diff = config_diff(files.read_config(), yaml.safe_load(yaml.safe_dump(cfg)))
        if diff:
            raise ValueError(f"{run_dir} holds a run with a different config ({', '.join(diff)}); use another --out")
    tr, co = cfg["train"], cfg["collapse"]
    device, seed = pick_device(tr["device"]), int(tr["seed"])
    seed_everything(seed)

    # --- data: TRAIN images as multi-crop views; VAL images (eval transform) only for the effective rank
    data = prepare(cfg["data"], data_root, seed=seed)
    info = data.info
    view_cfg = {**cfg["views"], "local_crops": cfg["views"]["local_crops"] if cfg["method"] == "dino" else 0}
    views = MultiCrop(cfg["data"]["img_size"], info.mean, info.std, view_cfg, colour=info.channels == 3)
    train_set = ImageDataset(data.source, data.split["train"], views, channels=info.channels, seed=seed)
    n_train, bs = len(train_set), tr["batch_size"]
    if n_train < bs:
        raise ValueError(f"train.batch_size={bs} exceeds the {n_train} train images of {info.name}; lower it")
    steps_per_epoch, total = n_train // bs, tr["epochs"] * (n_train // bs)

    # --- model: the method's networks (DINO: student, EMA teacher, loss with its centre)
    m = cfg["model"]
    kwargs = dict(m["kwargs"] or {})
    backbone = models.create(m["name"], pretrained=bool(m["pretrained"]), checkpoint=m["checkpoint"],
                             img_size=cfg["data"]["img_size"], in_chans=info.channels, **kwargs)
    method = build_method(backbone, cfg, total).to(device)
    record = {"name": m["name"], "kwargs": kwargs, "img_size": cfg["data"]["img_size"], "in_chans": info.channels,
              "scenario": None, "num_classes": None, "classifier": {}, "freeze_blocks": None, "decapitate": None,
              "pretrained": bool(m["pretrained"]), "checkpoint": m["checkpoint"], "kind": "pretrain",
              "method": cfg["method"], "input_mean": [float(v) for v in info.mean or ()],
              "input_std": [float(v) for v in info.std or ()]}  # what CKA must feed it too (repsim.inputs)
    files.checkpoints.mkdir(parents=True, exist_ok=True)
    write_text(files.config, yaml.safe_dump(cfg, sort_keys=False))
    write_text(files.model, json.dumps(record, indent=2))
    data.write_split(files.split, cfg["data"].get("split_seed"))
    if not files.backbone("init").exists():
        save_torch(backbone.state_dict(), files.backbone("init"))

    lr_peak = base_lr(cfg)
    warmup = tr["warmup_epochs"] * steps_per_epoch
    optimizer = torch.optim.AdamW(param_groups(method.student, tr["weight_decay"]), lr=lr_peak)
    state: dict[str, Any] = {"epoch": 0, "iteration": 0, "bad_epochs": 0, "train_seconds": 0.0, "data_seconds": 0.0,
                             "eval_seconds": 0.0}
    if resume and files.checkpoint("last").exists():
        ckpt = load_torch(files.checkpoint("last"), map_location=device)
        method.load_state_dict(ckpt["method"])
        optimizer.load_state_dict(ckpt["optimizer"])
        state = ckpt["state"]
        set_rng_state(ckpt["rng"])
    metrics = files.metrics  # lines after the checkpoint (a crash between the two writes) are redone
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    write_text(metrics, "".join(ln + "\n" for ln in lines[:state["epoch"]]))

    last: dict[str, Any] = {}
    for epoch in range(state["epoch"], tr["epochs"]):
        start = time.perf_counter()
        train_set.set_epoch(epoch)
        order = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        batches = order[:steps_per_epoch * bs].view(steps_per_epoch, bs).tolist()
        loader = DataLoader(train_set, batch_sampler=batches, num_workers=tr["num_workers"])
        method.train()
        sums: dict[str, float] = {}
        waited = time.perf_counter()
        for batch, _ in tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=not progress):
            state["data_seconds"] += time.perf_counter() - waited
            it = state["iteration"]
            lr = lr_peak * (it + 1) / warmup if it < warmup else \
                cosine_schedule(it - warmup, max(1, total - warmup), lr_peak, tr["min_lr"])
            wd = cosine_schedule(it, total, tr["weight_decay"], tr["weight_decay_end"])
            optimizer.param_groups[0].update(lr=lr, weight_decay=wd)
            optimizer.param_groups[1].update(lr=lr)
            loss, stats = method.step([c.to(device) for c in batch], epoch, it)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tr["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(method.student.parameters(), tr["grad_clip"])
            method.after_backward(epoch)
            optimizer.step()
            for key, value in {"loss": float(loss.detach()), **stats}.items():
                sums[key] = sums.get(key, 0.0) + value
            state["iteration"] += 1
            waited = time.perf_counter()
        state["train_seconds"] += time.perf_counter() - start
        evaluated = time.perf_counter()
        rank = spectrum(pooled_features(method.result, data.datasets["val"], batch_size=tr["eval_batch_size"],
                                        device=device).numpy())
        state["eval_seconds"] += time.perf_counter() - evaluated
        last = {"epoch": epoch, "iteration": state["iteration"], "lr": lr, "weight_decay": wd,
                **{k: v / steps_per_epoch for k, v in sums.items()}, "chance_loss": method.chance_loss,
                "val_effective_rank": rank["effective_rank"], "val_top1_share": rank["top1_share"],
                "seconds": time.perf_counter() - start}
        signal = collapse_signal(last, method, co)
        state["bad_epochs"] = state["bad_epochs"] + 1 if signal else 0
        state["epoch"] = epoch + 1
        with open(metrics, "a") as fh:
            fh.write(json.dumps(last) + "\n")
        if signal and state["bad_epochs"] >= co["patience"]:
            reason = f"{cfg['method'].upper()} collapsed at epoch {epoch}: {signal}"
            write_text(marker, json.dumps({"epoch": epoch, "reason": reason, **last}, indent=2))
            files.checkpoint("last").unlink(missing_ok=True)
            raise Collapsed(f"{reason}; the run stopped and wrote no {files.backbone('best').name} "
                            f"(see {metrics.name})")
        save_torch({"method": method.state_dict(), "optimizer": optimizer.state_dict(), "state": state,
                    "rng": rng_state()}, files.checkpoint("last"))

    # --- the method's result backbone (DINO: the teacher's, which DINO evaluates)
    save_torch(method.result.state_dict(), files.backbone("best"))
    final = last or json.loads(metrics.read_text().splitlines()[-1])
    summary = {"method": cfg["method"], "dataset": info.name, "model": m["name"], "pretrained": bool(m["pretrained"]),
               "checkpoint": m["checkpoint"], "img_size": cfg["data"]["img_size"], "lr": lr_peak, "seed": seed,
               "epochs_run": state["epoch"], "iterations": state["iteration"], "train_size": n_train,
               "final_loss": final["loss"], "teacher_entropy": final.get("teacher_entropy"),
               "chance_loss": final["chance_loss"],
               "val_effective_rank": final["val_effective_rank"], "train_seconds": state["train_seconds"],
               "data_seconds": state["data_seconds"], "eval_seconds": state["eval_seconds"],
               "batch_size": bs,
               "device": str(device)}
    write_text(files.summary, json.dumps(summary, indent=2))
    files.checkpoint("last").unlink()
    return summary
