"""One fine-tuning run, top to bottom: data -> model -> AdamW with warmup and plateau drops -> best checkpoint on
validation -> test metrics of the best checkpoint.

``train`` reads as its steps: prepare the data, build the model and write the run's start, set up the optimisation,
resume, then per epoch train and validate (the plateau rule), then test the best checkpoint and summarise. What a
resume restores besides the weights, optimizer, scaler and RNG states is one ``Progress``.

Runs on CPU or CUDA (AMP only on CUDA) and under ``torchrun`` (DDP; NCCL on GPUs, gloo on CPU). Every epoch ends
with an atomic last checkpoint holding model, optimizer, scaler, ``Progress`` and RNG states; the data order and the
augmentation are functions of (seed, epoch), so ``resume=True`` continues exactly where a killed run stopped. The
run folder's files are ``repsim.train.runs.RunFiles``.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from repsim.data import Data, prepare
from repsim.files import load_state, load_torch, lock, save_npz, save_torch, write_text
from repsim.metrics import CHEXPERT_COMPETITION, SELECTABLE, compute_metrics
from repsim.models.classifier import FoundationClassifier
from repsim.progress import tqdm
from repsim.threads import auto_threads
from repsim.train.evaluation import HeadOnOutputs, backbone_outputs, predict
from repsim.train.runs import RunFiles, check_run_paths
from repsim.train.utils import (
    build_model,
    check_same_config,
    distributed,
    memory_format,
    param_groups,
    pick_device,
    resumed_threads,
    rng_state,
    seed_everything,
    set_rng_state,
)


# ------------------------------------------------------------------------------------------------ small helpers
def lr_at(iteration: int, *, base_lr: float, warmup: int, plateaus: int) -> float:
    """The learning rate of ``iteration``: linear warmup over ``warmup`` iterations, then ÷10 per plateau so far."""
    return base_lr * min(1.0, (iteration + 1) / max(1, warmup)) * 0.1 ** plateaus


def epochs_of(tc: dict[str, Any], steps_per_epoch: int) -> int:
    """Epochs a run goes through: ``train.epochs``, or with a ``train.steps`` budget as many as hold its steps."""
    return math.ceil(tc["steps"] / steps_per_epoch) if tc["steps"] else tc["epochs"]


def is_better(value: float, best: float | None) -> bool:
    """Whether a validation value improves on the best so far (the first always does; NaN never beats a number,
    any number beats NaN)."""
    if best is None:
        return True
    return not math.isnan(value) and (math.isnan(best) or value > best)


# ------------------------------------------------------------------------------------------------ the run state
@dataclass
class Progress:
    """What a resume restores besides the weights, optimizer, scaler and RNG states: where the run is, its best
    validation value so far and the plateau rule's counters (saved as a plain dict in the last checkpoint)."""

    epoch: int = 0
    iteration: int = 0
    best: float | None = None
    best_epoch: int | None = None
    best_iteration: int | None = None
    bad_epochs: int = 0
    plateaus: int = 0
    train_seconds: float = 0.0
    data_seconds: float = 0.0  # of train_seconds: waiting for the next batch (decode, augmentation, collate)
    eval_seconds: float = 0.0  # validation (and test_at_best) forward passes
    threads: int | None = None  # intra-op threads the run started with (a resume keeps them)


@dataclass
class Optimisation:
    """What the epochs use, built once: the network that trains (``net``: DDP-wrapped under torchrun), its data,
    the AdamW optimizer with its AMP scaler, the loss, the warmup length and the evaluation settings."""

    model: FoundationClassifier
    train_net: nn.Module
    net: nn.Module
    train_set: Any
    val_set: Any
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loss_fn: Callable[..., torch.Tensor]
    sampler: DistributedSampler[Any]
    loader: DataLoader
    warmup: int
    amp_dtype: torch.dtype | None
    dropped_last: bool
    eval_kw: dict[str, Any]
    memory_format: torch.memory_format


# ------------------------------------------------------------------------------------------------ the run
def train(cfg: dict[str, Any], run_dir: str | Path, *, data_root: str | Path | None = None, resume: bool = False,
          progress: bool = True) -> dict[str, Any]:
    """Train one resolved config into ``run_dir`` and return its summary (also written to the run's summary file).
    The main process holds ``run_dir/.lock`` throughout: a second writer of the same run fails at once."""
    run_dir = Path(run_dir)
    check_run_paths(run_dir)
    with lock(run_dir / ".lock", f"run {run_dir}") if distributed()[0] == 0 else contextlib.nullcontext():
        return _train(cfg, RunFiles(run_dir), data_root=data_root, resume=resume, progress=progress)


def _train(cfg: dict[str, Any], files: RunFiles, *, data_root: str | Path | None, resume: bool,
           progress: bool) -> dict[str, Any]:
    rank, world = distributed()
    main, tc = rank == 0, cfg["train"]
    device = _check_start(cfg, files, resume, world)
    seed_everything(int(tc["seed"]))
    data, metric_name = prepare_data(cfg, data_root)
    model, model_record = build_model(cfg, data)  # same init on every process: same seed
    model.to(device)
    model.to(memory_format=memory_format(model, tc["channels_last"]))
    last = files.checkpoint("last")
    ckpt = load_torch(last, map_location=device) if resume and last.exists() else None
    if device.type == "cpu":  # a small model on a busy machine: one thread (repsim.threads); a resume: as before
        torch.set_num_threads(resumed_threads(ckpt) or auto_threads(model, data.datasets["val"][0][0][None].to(device)))
    if main:
        write_run_start(files, cfg, model, model_record, data)
    opt = set_up_optimisation(cfg, model, data, device, rank, world, progress)
    state = resume_state(files, opt, ckpt, main)
    state.threads = state.threads or torch.get_num_threads()
    if world > 1:
        opt.net = DistributedDataParallel(opt.train_net, device_ids=[device.index] if device.type == "cuda" else None)

    stop = state.plateaus >= tc["max_plateaus"]
    for epoch in range(state.epoch, epochs_of(tc, len(opt.loader))):
        if stop:
            break
        start = time.perf_counter()
        loss, lr = train_epoch(opt, state, epoch, files, tc, device, main and progress)
        state.train_seconds += time.perf_counter() - start
        val = validate(opt, files, epoch, state, lr, data)
        stop = keep_best(files, opt.model, state, val[metric_name], epoch, metric_name, tc, main)
        record: dict[str, Any] = {"epoch": epoch, "iteration": state.iteration, "lr": lr, "train_loss": loss,
                  "seconds": time.perf_counter() - start, **{f"val_{k}": v for k, v in val.items()}}
        if tc["test_at_best"] and state.best_epoch == epoch:  # never used to choose: read by budget curves
            record["best_test"] = test_metrics(opt, data, state)[0]
        state.epoch = epoch + 1
        if main:
            end_epoch(files, opt, state, record)
        if world > 1:
            dist.barrier()
    return test_and_summarise(cfg, files, opt, state, data, metric_name, model_record, device, world, main)


def _check_start(cfg: dict[str, Any], files: RunFiles, resume: bool, world: int) -> torch.device:
    """The run's device, after refusing what cannot start: a batch not divisible over the processes, a run folder
    holding a run without ``resume``, a run folder of another config."""
    tc = cfg["train"]
    if tc["batch_size"] % world:
        raise ValueError(f"train.batch_size={tc['batch_size']} is not divisible by {world} processes")
    if files.checkpoint("last").exists() and not resume:
        raise FileExistsError(f"{files.path} already holds a run; pass resume=True (--resume) or use another --out")
    check_same_config(cfg, files.path)
    device = pick_device(tc["device"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def prepare_data(cfg: dict[str, Any], data_root: str | Path | None) -> tuple[Data, str]:
    """The datasets (the split is fixed by ``data.split_seed``, the augmentation and order by the training seed) and
    the metric the best checkpoint is chosen on, checked against the task."""
    tc = cfg["train"]
    data = prepare(cfg["data"], data_root, seed=int(tc["seed"]))
    task, metric_name = data.info.task, tc["metric"] or data.info.metric
    if data.info.num_classes < 2:
        raise ValueError(f"dataset {data.info.name!r} has a single class ({data.info.classes}); a classifier needs "
                         "at least 2 (one class folder per class)")
    if metric_name not in SELECTABLE[task] or (metric_name == "auc_mean5" and
                                               not set(CHEXPERT_COMPETITION) <= set(data.info.classes)):
        raise ValueError(f"train.metric={metric_name!r} is not available for {task} dataset {data.info.name!r}; "
                         f"choose from {SELECTABLE[task]}")
    return data, metric_name


def write_run_start(files: RunFiles, cfg: dict[str, Any], model: FoundationClassifier, model_record: dict[str, Any],
                    data: Data) -> None:
    """The run's config, model record and split, and (once) its starting weights for CKA."""
    files.checkpoints.mkdir(parents=True, exist_ok=True)
    write_text(files.config, yaml.safe_dump(cfg, sort_keys=False))
    write_text(files.model, json.dumps(model_record, indent=2))
    data.write_split(files.split, cfg["data"].get("split_seed"))
    if not files.backbone("init").exists():
        save_torch(model.backbone.state_dict(), files.backbone("init"))
        save_torch({k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")},
                   files.checkpoint("init"))


def set_up_optimisation(cfg: dict[str, Any], model: FoundationClassifier, data: Data, device: torch.device,
                        rank: int, world: int, progress: bool) -> Optimisation:
    """AdamW with linear warmup per iteration and ÷10 per plateau; AMP (bf16, else fp16 + scaler) on CUDA; a
    frozen backbone with ``train.cache_frozen`` trains its head on backbone outputs computed once."""
    tc, task = cfg["train"], data.info.task
    train_net: nn.Module = model
    train_set, val_set = data.datasets["train"], data.datasets["val"]
    if tc["cache_frozen"] and cfg["model"]["scenario"].startswith("frozen-"):
        # eval transform, so without augmentation: seconds instead of a forward pass per sample and epoch
        cache_kw = {"batch_size": tc["eval_batch_size"] or tc["batch_size"], "device": device,
                    "num_workers": tc["num_workers"]}
        model.to(memory_format=torch.contiguous_format)  # the cache is the same with or without channels_last
        train_set = backbone_outputs(model, data.datasets["train_eval"], **cache_kw)
        val_set = backbone_outputs(model, val_set, **cache_kw)
        model.to(memory_format=memory_format(model, tc["channels_last"]))
        train_net = HeadOnOutputs(model)
    optimizer = torch.optim.AdamW(param_groups(model, tc["weight_decay"]), lr=tc["lr"])
    amp_dtype = None
    if tc["amp"] and device.type == "cuda":
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    sampler: DistributedSampler[Any] = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True,
                                                          seed=int(tc["seed"]))
    # a last batch of one sample per process cannot train BatchNorm (no batch statistics): it is dropped, and the
    # summary says so (train_dropped)
    per_process = math.ceil(len(train_set) / world)
    drop = per_process % (tc["batch_size"] // world) == 1 and any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in train_net.modules())
    loader = DataLoader(train_set, batch_size=tc["batch_size"] // world, sampler=sampler, drop_last=drop,
                        num_workers=tc["num_workers"], pin_memory=device.type == "cuda")
    if tc["warmup_iters"] is not None or tc["warmup_epochs"] is not None:
        warmup = tc["warmup_iters"] if tc["warmup_iters"] is not None else tc["warmup_epochs"] * len(loader)
    else:
        unit, n = data.info.warmup
        warmup = n if unit == "iters" else n * len(loader)
    fmt = memory_format(model, tc["channels_last"])
    eval_kw = {"batch_size": tc["eval_batch_size"] or tc["batch_size"], "device": device, "task": task,
               "amp_dtype": amp_dtype, "num_workers": tc["num_workers"], "rank": rank, "world": world,
               "progress": progress, "memory_format": fmt}
    loss_fn = F.binary_cross_entropy_with_logits if task == "multilabel" else F.cross_entropy
    return Optimisation(model, train_net, train_net, train_set, val_set, optimizer, scaler, loss_fn, sampler, loader,
                        warmup, amp_dtype, drop, eval_kw, fmt)


def resume_state(files: RunFiles, opt: Optimisation, ckpt: dict[str, Any] | None, main: bool) -> Progress:
    """A fresh ``Progress``, or (resuming: ``ckpt`` is the last checkpoint) the one saved with the weights, optimizer,
    scaler and RNG states it restores. Metrics of epochs after the checkpoint (a crash between the two writes) are
    dropped, to be recomputed."""
    state = Progress()
    if ckpt is not None:
        load_state(opt.model, ckpt["model"], files.checkpoint("last"))
        opt.optimizer.load_state_dict(ckpt["optimizer"])
        opt.scaler.load_state_dict(ckpt["scaler"])
        state = Progress(**ckpt["state"])
        set_rng_state(ckpt["rng"])
    if main:
        lines = files.metrics.read_text().splitlines() if files.metrics.exists() else []
        write_text(files.metrics, "".join(ln + "\n" for ln in lines[:state.epoch]))
    return state


def train_epoch(opt: Optimisation, state: Progress, epoch: int, files: RunFiles, tc: dict[str, Any],
                device: torch.device, show: bool) -> tuple[float, float]:
    """One pass over the training data; returns the mean training loss and the last LR. A non-finite loss stops the
    run in one line."""
    opt.sampler.set_epoch(epoch)
    if hasattr(opt.train_set, "set_epoch"):
        opt.train_set.set_epoch(epoch)
    opt.model.train()
    loss_sum = torch.zeros((), device=device)
    lr, steps, waited = tc["lr"], 0, time.perf_counter()
    for step, (x, y) in enumerate(tqdm(opt.loader, desc=f"epoch {epoch}", leave=False, disable=not show)):
        state.data_seconds += time.perf_counter() - waited
        lr = lr_at(state.iteration, base_lr=tc["lr"], warmup=opt.warmup, plateaus=state.plateaus)
        for group in opt.optimizer.param_groups:
            group["lr"] = lr
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if x.dim() == 4:  # the model's memory format (a no-op for NCHW)
            x = x.contiguous(memory_format=opt.memory_format)
        with torch.autocast(device.type, dtype=opt.amp_dtype, enabled=opt.amp_dtype is not None):
            loss = opt.loss_fn(opt.net(x).float(), y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{files.path}: the training loss is {float(loss.detach())} at epoch {epoch}, "
                                     f"step {step} (iteration {state.iteration}), lr {lr:g}: the run diverged; "
                                     "lower train.lr or set train.grad_clip")
        opt.optimizer.zero_grad(set_to_none=True)
        opt.scaler.scale(loss).backward()
        opt.scaler.unscale_(opt.optimizer)
        if tc["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(opt.model.parameters(), tc["grad_clip"])
        opt.scaler.step(opt.optimizer)
        opt.scaler.update()
        loss_sum += loss.detach()
        state.iteration, steps = state.iteration + 1, steps + 1
        if tc["steps"] and state.iteration >= tc["steps"]:
            break  # the step budget ends part-way through this epoch
        waited = time.perf_counter()
    return float(loss_sum) / max(1, steps), lr


def validate(opt: Optimisation, files: RunFiles, epoch: int, state: Progress, lr: float, data: Data
             ) -> dict[str, float]:
    """The validation metrics; NaN or infinite predictions (diverged weights) stop the run before they can be saved
    as best."""
    start = time.perf_counter()
    probs, targets, _ = predict(opt.train_net, opt.val_set, desc="val", **opt.eval_kw)
    state.eval_seconds += time.perf_counter() - start
    if not np.isfinite(probs).all():
        raise FloatingPointError(f"{files.path}: the validation predictions are NaN or infinite after epoch {epoch} "
                                 f"(iteration {state.iteration}, lr {lr:g}): the run diverged; lower train.lr or set "
                                 "train.grad_clip")
    return compute_metrics(data.info.task, targets, probs, data.info.classes)


def test_metrics(opt: Optimisation, data: Data, state: Progress) -> tuple[dict[str, float], Any, Any, float]:
    """The model's test metrics, probabilities, targets and forward seconds (the time counts as evaluation)."""
    start = time.perf_counter()
    probs, targets, seconds = predict(opt.model, data.datasets["test"], desc="test", **opt.eval_kw)
    state.eval_seconds += time.perf_counter() - start
    return compute_metrics(data.info.task, targets, probs, data.info.classes), probs, targets, seconds


def keep_best(files: RunFiles, model: FoundationClassifier, state: Progress, value: float, epoch: int,
              metric_name: str, tc: dict[str, Any], main: bool) -> bool:
    """The plateau rule: a better value is saved as the best checkpoint; ``patience`` epochs without one divide the
    LR by 10 (one plateau). Returns whether the run stops (``max_plateaus`` reached)."""
    if is_better(value, state.best):
        state.best, state.best_epoch, state.best_iteration, state.bad_epochs = value, epoch, state.iteration, 0
        if main:
            save_torch({"model": model.state_dict(), "epoch": epoch, metric_name: value}, files.checkpoint("best"))
            save_torch(model.backbone.state_dict(), files.backbone("best"))
        return False
    state.bad_epochs += 1
    if state.bad_epochs >= tc["patience"]:
        state.plateaus, state.bad_epochs = state.plateaus + 1, 0
        return state.plateaus >= tc["max_plateaus"]
    return False


def end_epoch(files: RunFiles, opt: Optimisation, state: Progress, record: dict[str, Any]) -> None:
    """Append the epoch's metrics and write the last checkpoint (what a resume starts from)."""
    with open(files.metrics, "a") as fh:
        fh.write(json.dumps(record) + "\n")
    save_torch({"model": opt.model.state_dict(), "optimizer": opt.optimizer.state_dict(),
                "scaler": opt.scaler.state_dict(), "state": asdict(state), "rng": rng_state()},
               files.checkpoint("last"))


def test_and_summarise(cfg: dict[str, Any], files: RunFiles, opt: Optimisation, state: Progress, data: Data,
                       metric_name: str, model_record: dict[str, Any], device: torch.device, world: int,
                       main: bool) -> dict[str, Any]:
    """Test metrics of the best checkpoint and the run's summary (written by the main process, which then removes
    the last checkpoint: a finished run is reused through its summary, never resumed)."""
    tc, task, model = cfg["train"], data.info.task, opt.model
    best = load_torch(files.checkpoint("best"), map_location=device)
    load_state(model, best["model"], files.checkpoint("best"))
    test, probs, targets, seconds = test_metrics(opt, data, state)
    summary = {
        "dataset": data.info.name, "task": task, "metric": metric_name, "model": cfg["model"]["name"],
        "scenario": cfg["model"]["scenario"], "freeze_blocks": cfg["model"]["freeze_blocks"],
        "decapitate": cfg["model"]["decapitate"], "img_size": model_record["img_size"],
        "lr": tc["lr"], "seed": int(tc["seed"]), "epochs_run": state.epoch, "iterations": state.iteration,
        "batch_size": tc["batch_size"],
        "train_size": len(opt.train_set), "train_dropped": world if opt.dropped_last else 0,
        "best_epoch": state.best_epoch, "iterations_to_best": state.best_iteration, "val": {metric_name: state.best},
        "test": test, "inference_ms_per_image": 1000.0 * seconds / len(targets),
        "train_seconds": state.train_seconds, "data_seconds": state.data_seconds, "eval_seconds": state.eval_seconds,
        "steps_budget": tc["steps"], "channels_last": opt.memory_format == torch.channels_last,
        "world_size": world, "device": str(device), "threads": torch.get_num_threads(),
    }
    if main:
        save_npz(files.predictions, probs=probs, targets=targets)
        write_text(files.summary, json.dumps(summary, indent=2))
        files.checkpoint("last").unlink()
    return summary
