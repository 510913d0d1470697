"""One fine-tuning run, top to bottom: data -> model -> AdamW with warmup and plateau drops -> best checkpoint on
validation -> test metrics of the best checkpoint.

Runs on CPU or CUDA (AMP only on CUDA) and under ``torchrun`` (DDP; NCCL on GPUs, gloo on CPU). Every epoch ends
with an atomic ``checkpoints/last.pt`` holding model, optimizer, scaler, schedule counters and RNG states; the data
order and the augmentation are functions of (seed, epoch), so ``resume=True`` continues exactly where a killed run
stopped. The run directory layout is the trainer contract (see ``repsim.train``).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset, TensorDataset

from repsim.data import prepare
from repsim.files import load_state, load_torch, lock, save_torch, write_text
from repsim.metrics import CHEXPERT_COMPETITION, SELECTABLE, compute_metrics
from repsim.models.classifier import FoundationClassifier
from repsim.progress import tqdm
from repsim.threads import auto_threads
from repsim.train.runs import check_run_paths
from repsim.train.utils import (
    build_model,
    check_same_config,
    distributed,
    param_groups,
    pick_device,
    rng_state,
    seed_everything,
    set_rng_state,
)


# ------------------------------------------------------------------------------------------------ small helpers
def lr_at(iteration: int, *, base_lr: float, warmup: int, plateaus: int) -> float:
    """The learning rate of ``iteration``: linear warmup over ``warmup`` iterations, then ÷10 per plateau so far."""
    return base_lr * min(1.0, (iteration + 1) / max(1, warmup)) * 0.1 ** plateaus


def is_better(value: float, best: float | None) -> bool:
    """Whether a validation value improves on the best so far (the first always does; NaN never beats a number,
    any number beats NaN)."""
    if best is None:
        return True
    return not math.isnan(value) and (math.isnan(best) or value > best)


class HeadOnOutputs(nn.Module):
    """The trainable part of a frozen-backbone classifier, fed cached backbone outputs (``train.cache_frozen``)."""

    def __init__(self, model: FoundationClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, backbone_output: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(backbone_output)


@torch.no_grad()
def backbone_outputs(model: FoundationClassifier, dataset: torch.utils.data.Dataset, *, batch_size: int,
                     device: torch.device, num_workers: int) -> TensorDataset:
    """``(backbone output, target)`` of every sample (eval mode, the dataset's own transform), on the CPU."""
    model.eval()
    outputs, targets = [], []
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers):
        outputs.append(model.backbone_output(x.to(device)).float().cpu())
        targets.append(y)
    return TensorDataset(torch.cat(outputs), torch.cat(targets))


@torch.no_grad()
def predict(model: torch.nn.Module, dataset: torch.utils.data.Dataset, *, batch_size: int, device: torch.device,
            task: str, amp_dtype: torch.dtype | None, num_workers: int, rank: int, world: int,
            desc: str, progress: bool = True) -> tuple[np.ndarray, np.ndarray, float]:
    """Probabilities, targets (dataset order, gathered over processes) and seconds spent in forward passes."""
    model.eval()
    n = len(dataset)  # type: ignore[arg-type]  # torch's Dataset declares no __len__; every dataset here has one
    shard = Subset(dataset, range(rank, n, world))
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    prob_parts: list[np.ndarray] = []
    target_parts: list[np.ndarray] = []
    seconds = 0.0
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not (rank == 0 and progress)):
        x = x.to(device, non_blocking=True)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x).float()
        p = torch.sigmoid(logits) if task == "multilabel" else torch.softmax(logits, dim=1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - start
        prob_parts.append(p.cpu().numpy().astype(np.float64))
        target_parts.append(y.numpy())
    probs, targets = np.concatenate(prob_parts), np.concatenate(target_parts)
    if world > 1:  # shard r holds samples r, r+world, ...; interleave them back into dataset order
        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, (probs, targets, seconds))
        probs, targets = np.empty((n, probs.shape[1])), np.empty((n, *targets.shape[1:]))
        for r, (p, t, _) in enumerate(parts):
            probs[r::world], targets[r::world] = p, t
        seconds = max(part[2] for part in parts)
    return probs, targets, seconds


# ------------------------------------------------------------------------------------------------ the run
def train(cfg: dict[str, Any], run_dir: str | Path, *, data_root: str | Path | None = None, resume: bool = False,
          progress: bool = True) -> dict[str, Any]:
    """Train one resolved config into ``run_dir`` and return its summary (also written to ``summary.json``). The
    main process holds ``run_dir/.lock`` throughout: a second writer of the same run fails at once."""
    run_dir = Path(run_dir)
    check_run_paths(run_dir)
    with lock(run_dir / ".lock", f"run {run_dir}") if distributed()[0] == 0 else contextlib.nullcontext():
        return _train(cfg, run_dir, data_root=data_root, resume=resume, progress=progress)


def _train(cfg: dict[str, Any], run_dir: Path, *, data_root: str | Path | None, resume: bool,
           progress: bool) -> dict[str, Any]:
    ckpt_dir = run_dir / "checkpoints"
    rank, world = distributed()
    main = rank == 0
    tc = cfg["train"]
    if tc["batch_size"] % world:
        raise ValueError(f"train.batch_size={tc['batch_size']} is not divisible by {world} processes")
    if (ckpt_dir / "last.pt").exists() and not resume:
        raise FileExistsError(f"{run_dir} already holds a run; pass resume=True (--resume) or use another --out")
    check_same_config(cfg, run_dir)
    device = pick_device(tc["device"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    seed = int(tc["seed"])
    seed_everything(seed)

    # --- data: the split is fixed by data.split_seed, the augmentation and order by the training seed
    data = prepare(cfg["data"], data_root, seed=seed)
    task, metric_name = data.info.task, tc["metric"] or data.info.metric
    if data.info.num_classes < 2:
        raise ValueError(f"dataset {data.info.name!r} has a single class ({data.info.classes}); a classifier needs "
                         "at least 2 (one class folder per class)")
    if metric_name not in SELECTABLE[task] or (metric_name == "auc_mean5" and
                                               not set(CHEXPERT_COMPETITION) <= set(data.info.classes)):
        raise ValueError(f"train.metric={metric_name!r} is not available for {task} dataset {data.info.name!r}; "
                         f"choose from {SELECTABLE[task]}")
    train_set = data.datasets["train"]

    # --- model (same init on every process: same seed) and its starting weights for CKA
    model, model_record = build_model(cfg, data)
    model.to(device)
    if device.type == "cpu":  # one thread for a small model: many short ops lose to OpenMP waits (repsim.threads)
        torch.set_num_threads(auto_threads(model, data.datasets["val"][0][0][None].to(device)))
    if main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        write_text(run_dir / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
        write_text(run_dir / "model.json", json.dumps(model_record, indent=2))
        data.write_split(run_dir / "split.json", cfg["data"].get("split_seed"))
        if not (run_dir / "backbone_init.pt").exists():
            save_torch(model.backbone.state_dict(), run_dir / "backbone_init.pt")
            save_torch({k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")},
                       ckpt_dir / "init.pt")

    # --- a frozen backbone with train.cache_frozen: the head trains on backbone outputs computed once (eval
    # transform, so without augmentation), which costs seconds instead of a forward pass per sample and epoch
    train_net: nn.Module = model
    val_set = data.datasets["val"]
    if tc["cache_frozen"] and cfg["model"]["scenario"].startswith("frozen-"):
        cache_kw = {"batch_size": tc["eval_batch_size"] or tc["batch_size"], "device": device,
                    "num_workers": tc["num_workers"]}
        train_set = backbone_outputs(model, data.datasets["train_eval"], **cache_kw)
        val_set = backbone_outputs(model, val_set, **cache_kw)
        train_net = HeadOnOutputs(model)

    # --- optimisation: AdamW, linear warmup per iteration, ÷10 per plateau; AMP (bf16, else fp16 + scaler) on CUDA
    optimizer = torch.optim.AdamW(param_groups(model, tc["weight_decay"]), lr=tc["lr"])
    amp_dtype = None
    if tc["amp"] and device.type == "cuda":
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    loss_fn = F.binary_cross_entropy_with_logits if task == "multilabel" else F.cross_entropy
    sampler: DistributedSampler[Any] = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True,
                                                          seed=seed)
    # a last batch of one sample per process cannot train BatchNorm (no batch statistics): it is dropped, and the
    # summary says so (train_dropped)
    per_process = math.ceil(len(train_set) / world)
    drop = per_process % (tc["batch_size"] // world) == 1 and any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in train_net.modules())
    loader = DataLoader(train_set, batch_size=tc["batch_size"] // world, sampler=sampler, drop_last=drop,
                        num_workers=tc["num_workers"], pin_memory=device.type == "cuda")
    steps_per_epoch = len(loader)
    if tc["warmup_iters"] is not None or tc["warmup_epochs"] is not None:
        warmup = tc["warmup_iters"] if tc["warmup_iters"] is not None else tc["warmup_epochs"] * steps_per_epoch
    else:
        unit, n = data.info.warmup
        warmup = n if unit == "iters" else n * steps_per_epoch
    eval_kw = {"batch_size": tc["eval_batch_size"] or tc["batch_size"], "device": device, "task": task,
               "amp_dtype": amp_dtype, "num_workers": tc["num_workers"], "rank": rank, "world": world,
               "progress": progress}

    # --- state that a resume restores
    state: dict[str, Any] = {"epoch": 0, "iteration": 0, "best": None, "best_epoch": None, "best_iteration": None,
                             "bad_epochs": 0, "plateaus": 0, "train_seconds": 0.0}
    if resume and (ckpt_dir / "last.pt").exists():
        ckpt = load_torch(ckpt_dir / "last.pt", map_location=device)
        load_state(model, ckpt["model"], ckpt_dir / "last.pt")
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        state = ckpt["state"]
        set_rng_state(ckpt["rng"])
    if main:  # metrics of epochs after the checkpoint (a crash between the two writes) are recomputed
        lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
        write_text(run_dir / "metrics.jsonl", "".join(ln + "\n" for ln in lines[:state["epoch"]]))
    net = DistributedDataParallel(train_net, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else train_net

    stop = state["plateaus"] >= tc["max_plateaus"]
    for epoch in range(state["epoch"], tc["epochs"]):
        if stop:
            break
        start = time.perf_counter()
        sampler.set_epoch(epoch)
        if hasattr(train_set, "set_epoch"):
            train_set.set_epoch(epoch)
        model.train()
        loss_sum = torch.zeros((), device=device)
        for step, (x, y) in enumerate(tqdm(loader, desc=f"epoch {epoch}", leave=False,
                                           disable=not (main and progress))):
            lr = lr_at(state["iteration"], base_lr=tc["lr"], warmup=warmup, plateaus=state["plateaus"])
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = loss_fn(net(x).float(), y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{run_dir}: the training loss is {float(loss.detach())} at epoch {epoch}, "
                                         f"step {step} (iteration {state['iteration']}), lr {lr:g}: the run "
                                         "diverged; lower train.lr or set train.grad_clip")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            if tc["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc["grad_clip"])
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss.detach()
            state["iteration"] += 1
        state["train_seconds"] += time.perf_counter() - start

        # --- validate; keep the best; a plateau of `patience` epochs divides the LR by 10 or ends the run
        probs, targets, _ = predict(train_net, val_set, desc="val", **eval_kw)
        if not np.isfinite(probs).all():  # NaN or infinite weights: stop before they can be saved as best
            raise FloatingPointError(f"{run_dir}: the validation predictions are NaN or infinite after epoch {epoch} "
                                     f"(iteration {state['iteration']}, lr {lr:g}): the run diverged; lower "
                                     "train.lr or set train.grad_clip")
        val = compute_metrics(task, targets, probs, data.info.classes)
        value = val[metric_name]
        if is_better(value, state["best"]):
            state.update(best=value, best_epoch=epoch, best_iteration=state["iteration"], bad_epochs=0)
            if main:
                save_torch({"model": model.state_dict(), "epoch": epoch, metric_name: value}, ckpt_dir / "best.pt")
                save_torch(model.backbone.state_dict(), run_dir / "backbone_best.pt")
        else:
            state["bad_epochs"] += 1
            if state["bad_epochs"] >= tc["patience"]:
                state.update(plateaus=state["plateaus"] + 1, bad_epochs=0)
                stop = state["plateaus"] >= tc["max_plateaus"]
        state["epoch"] = epoch + 1
        if main:
            record = {"epoch": epoch, "iteration": state["iteration"], "lr": lr,
                      "train_loss": float(loss_sum) / steps_per_epoch,
                      "seconds": time.perf_counter() - start, **{f"val_{k}": v for k, v in val.items()}}
            with open(run_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")
            save_torch({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scaler": scaler.state_dict(), "state": state, "rng": rng_state()}, ckpt_dir / "last.pt")
        if world > 1:
            dist.barrier()

    # --- test the best checkpoint
    best = load_torch(ckpt_dir / "best.pt", map_location=device)
    load_state(model, best["model"], ckpt_dir / "best.pt")
    probs, targets, seconds = predict(model, data.datasets["test"], desc="test", **eval_kw)
    summary = {
        "dataset": data.info.name, "task": task, "metric": metric_name, "model": cfg["model"]["name"],
        "scenario": cfg["model"]["scenario"], "freeze_blocks": cfg["model"]["freeze_blocks"],
        "decapitate": cfg["model"]["decapitate"], "img_size": model_record["img_size"],
        "lr": tc["lr"], "seed": seed, "epochs_run": state["epoch"], "iterations": state["iteration"],
        "train_size": len(train_set), "train_dropped": world if drop else 0, "best_epoch": state["best_epoch"],
        "iterations_to_best": state["best_iteration"], "val": {metric_name: state["best"]},
        "test": compute_metrics(task, targets, probs, data.info.classes),
        "inference_ms_per_image": 1000.0 * seconds / len(targets), "train_seconds": state["train_seconds"],
        "world_size": world, "device": str(device), "threads": torch.get_num_threads(),
    }
    if main:
        write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
        (ckpt_dir / "last.pt").unlink()  # a finished run is reused through summary.json, never resumed
    return summary
