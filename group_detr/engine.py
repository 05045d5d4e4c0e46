"""Training: builders, `train_one_epoch`, the whole run `train(config, callbacks=...)`, and
`evaluate_checkpoint`.

Everything is callable from Python; the command line in `__main__.py` only fills a `TrainConfig`
(group_detr/config.py). The datasets and loaders come from group_detr/data/loading.py,
checkpoints live in group_detr/checkpoint.py, COCO evaluation in group_detr/evaluation.py.
DDP-aware: under torchrun every rank trains on its shard of the data, rank 0 writes logs,
checkpoints and pictures.

Callbacks: `train(config, callbacks=[...])` calls, on every rank, `on_train_start(run)` once the
model, data and optimizer exist (after a resume), `on_epoch_end(run, record)` after each epoch's
checkpoint and evaluation (record is the epoch's log line; keys a callback adds to it are written
to log.jsonl too) and `on_train_end(run, result)`. `run` is a `TrainingRun`. This is how the
convergence benchmark measures PD / MD without a training loop of its own.
"""
import dataclasses
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from group_detr import distributed
from group_detr.checkpoint import (CHECKPOINT_FORMAT, CHECKPOINT_NAME, check_checkpoint_matches, check_resume_matches,
                                   load_checkpoint, save_checkpoint)
from group_detr.config import TrainConfig, config_from_dict, config_to_dict
from group_detr.data.coco import CocoDetection
from group_detr.data.loading import build_datasets, build_loader, build_val_dataset, set_loader_epoch
from group_detr.evaluation import evaluate
from group_detr.matcher import GroupMatcher
from group_detr.models.criterion import SetCriterion, default_weight_dict
from group_detr.models.detector import GroupDETR, build_group_detr


# --------------------------------------------------------------------------------------------
# builders


def build_model(config: TrainConfig, num_classes: int) -> GroupDETR:
    return build_group_detr(
        num_classes, num_groups=config.num_groups, num_queries=config.num_queries, backbone=config.backbone,
        backbone_weights=config.backbone_weights, hidden_dim=config.hidden_dim, nheads=config.nheads,
        enc_layers=config.enc_layers, dec_layers=config.dec_layers, dim_feedforward=config.dim_feedforward,
        dropout=config.dropout, small_widths=config.small_widths, small_norm=config.small_norm,
        attention_backend=config.attention_backend, denoising_queries=config.denoising_queries,
        denoising_label_noise=config.denoising_label_noise, denoising_box_noise=config.denoising_box_noise,
        denoising_contrastive=config.denoising_contrastive)


def build_matcher(config: TrainConfig) -> GroupMatcher:
    """The training matcher (focal class cost, L1 and GIoU) over config.num_groups groups."""
    return GroupMatcher(cost_class=config.set_cost_class, cost_bbox=config.set_cost_bbox,
                        cost_giou=config.set_cost_giou, num_groups=config.num_groups,
                        class_cost="focal", focal_alpha=config.focal_alpha)


def build_criterion(config: TrainConfig, num_classes: int) -> SetCriterion:
    denoising = config.denoising_queries > 0
    weights = default_weight_dict(config.dec_layers, config.cls_loss_coef, config.bbox_loss_coef,
                                  config.giou_loss_coef, denoising)
    return SetCriterion(num_classes, build_matcher(config), weights, queries_per_group=config.num_queries,
                        focal_alpha=config.focal_alpha, denoising=denoising)


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with two groups: the backbone at lr_backbone, everything else at lr.

    The fused implementation where every parameter is a float tensor on the CPU or a CUDA GPU:
    the same update as the default for-loop one, in one kernel instead of ~10 small ops per
    parameter (on the CPU: 3 ms instead of 14 ms per step for the demo's 131 tensors, a tenth
    of its step)."""
    backbone = [p for n, p in model.named_parameters() if n.startswith("backbone.") and p.requires_grad]
    rest = [p for n, p in model.named_parameters() if not n.startswith("backbone.") and p.requires_grad]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in backbone + rest)
    return torch.optim.AdamW([{"params": rest, "lr": config.lr},
                              {"params": backbone, "lr": config.lr_backbone}],
                             lr=config.lr, weight_decay=config.weight_decay, fused=fused or None)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig,
                       steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Steps every iteration: a linear warm-up over the first `config.warmup_steps` steps (none
    by default, as in the paper), then the lr drops by 10x after
    `config.lr_drop_step(steps_per_epoch)` steps."""
    drop_step, warmup = config.lr_drop_step(steps_per_epoch), config.warmup_steps

    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup if warmup else 1.0) * (0.1 if step >= drop_step else 1.0)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def resolve_device(name: str, info: distributed.DistInfo) -> torch.device:
    if name == "auto":
        name = f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


# --------------------------------------------------------------------------------------------
# training


class Progress:
    """A progress bar line every `print_freq` iterations (rank 0 only): losses, lr, speed, eta.

    Whole lines rather than carriage returns, so the output stays readable in log files and CI.
    """

    def __init__(self, total: int, header: str, print_freq: int, stream=None):
        self.total, self.header, self.print_freq = total, header, print_freq
        self.stream = stream or sys.stdout
        self.start = time.time()

    def update(self, step: int, values: Dict[str, float]) -> None:
        done = step + 1
        if not distributed.is_main_process() or (done % self.print_freq and done != self.total):
            return
        elapsed = time.time() - self.start
        eta = elapsed / done * (self.total - done)
        width = len(str(self.total))
        text = "  ".join(f"{k} {v:.4g}" for k, v in values.items())
        filled = done * 20 // self.total
        print(f"{self.header} |{'#' * filled}{'.' * (20 - filled)}| {done:>{width}}/{self.total}  "
              f"{text}  {done / elapsed:.2f} it/s  "
              f"eta {time.strftime('%M:%S', time.gmtime(eta))}", file=self.stream, flush=True)


def _to_device(images, mask, targets, device):
    return (images.to(device, non_blocking=True), mask.to(device, non_blocking=True),
            [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets])


def train_one_epoch(model: nn.Module, criterion: SetCriterion, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    lr_scheduler, device: torch.device, epoch: int, config: TrainConfig) -> Dict[str, float]:
    """One pass over `loader`; the scheduler steps every iteration. Returns mean losses (over ranks)
    and, with denoising, `denoising_layouts`: how many distinct query layouts the epoch ran."""
    model.train()
    criterion.train()
    sums: Dict[str, torch.Tensor] = {}
    progress = Progress(len(loader), f"epoch {epoch + 1}/{config.epochs}", config.print_freq)
    layouts = set()  # (denoising groups, their size): one attention layout each
    for step, (images, mask, targets) in enumerate(loader):
        images, mask, targets = _to_device(images, mask, targets, device)
        outputs = model(images, mask, targets)
        if "dn_meta" in outputs:
            layouts.add((outputs["dn_meta"]["num_groups"], outputs["dn_meta"]["group_size"]))
        losses = criterion(outputs, targets)
        loss = criterion.weighted_sum(losses)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch + 1} step {step}; losses: "
                                     + ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items()))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.clip_max_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_max_norm)
        optimizer.step()
        lr_scheduler.step()
        logged = {"loss": loss.detach(), **{k: v.detach() for k, v in losses.items() if not k[-1].isdigit()}}
        for k, v in logged.items():
            sums[k] = sums.get(k, 0.0) + v
        progress.update(step, {"loss": loss.item(), "lr": optimizer.param_groups[0]["lr"]})
    keys = sorted(sums)
    means = distributed.all_reduce_mean(torch.stack([sums[k] for k in keys]) / max(len(loader), 1))
    result = {k: float(v) for k, v in zip(keys, means)}
    if config.denoising_queries:
        result["denoising_layouts"] = len(layouts)
    return result


# --------------------------------------------------------------------------------------------
# the whole run


@dataclass
class TrainingRun:
    """What `train` hands its callbacks: the run's objects (read them; do not replace them).

    `model` is the bare model (not the DDP wrapper); `steps_per_epoch` counts optimizer steps.
    """

    config: TrainConfig
    info: distributed.DistInfo
    device: torch.device
    model: GroupDETR
    criterion: SetCriterion
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LambdaLR
    train_set: CocoDetection
    val_set: CocoDetection
    train_loader: DataLoader
    val_loader: DataLoader
    start_epoch: int

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_loader)

    @property
    def checkpoint_path(self) -> str:
        return os.path.join(self.config.output_dir, CHECKPOINT_NAME)


class Callback:
    """Hooks of `train()` (see the module docstring); override the ones you need."""

    def on_train_start(self, run: TrainingRun) -> None:
        pass

    def on_epoch_end(self, run: TrainingRun, record: Dict) -> None:
        pass

    def on_train_end(self, run: TrainingRun, result: Dict) -> None:
        pass


def _log_json(path: str, record: Dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def train(config: TrainConfig, log: Callable[[str], None] = print, callbacks: Sequence[Callback] = ()) -> Dict:
    """Train (and resume), evaluate, draw predictions. Returns a summary dict with the final
    `stats`, the AP `table`, `checkpoint` and `png` paths (rank 0), the `log` path and the
    trained `model`."""
    config.validate()
    info = distributed.init_distributed()
    try:
        return _train(config, info, log if info.is_main else (lambda _: None), list(callbacks))
    finally:
        distributed.shutdown_distributed(info)


def _build_run(config: TrainConfig, info: distributed.DistInfo, log: Callable[[str], None]) -> TrainingRun:
    """Seeds, data, model, criterion, optimizer and schedule; resumes from the checkpoint."""
    device = resolve_device(config.device, info)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    random.seed(config.seed + info.rank)  # different augmentations per rank
    train_set, val_set = build_datasets(config)
    num_classes = train_set.num_classes
    model = build_model(config, num_classes).to(device)
    optimizer = build_optimizer(model, config)
    train_loader = build_loader(train_set, config, train=True)
    lr_scheduler = build_lr_scheduler(optimizer, config, len(train_loader))
    run = TrainingRun(config, info, device, model, build_criterion(config, num_classes), optimizer, lr_scheduler,
                      train_set, val_set, train_loader, build_loader(val_set, config, train=False),
                      start_epoch=0)
    os.makedirs(config.output_dir, exist_ok=True)
    checkpoint_path = run.checkpoint_path
    if config.resume and os.path.isfile(checkpoint_path):
        checkpoint = load_checkpoint(checkpoint_path)
        check_resume_matches(checkpoint, config, num_classes, checkpoint_path)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
        run.start_epoch = checkpoint["epoch"]
        log(f"resumed from {checkpoint_path} after epoch {run.start_epoch}")
        saved_epochs = checkpoint["config"].get("epochs")
        if saved_epochs != config.epochs:
            log(f"note: that run was set for {saved_epochs} epochs, this one for {config.epochs}: the lr drop "
                f"is now at step {config.lr_drop_step(len(train_loader))}")
    return run


def _train(config: TrainConfig, info: distributed.DistInfo, log: Callable[[str], None],
           callbacks: Sequence[Callback]) -> Dict:
    run = _build_run(config, info, log)
    device, model_without_ddp, optimizer, lr_scheduler = run.device, run.model, run.optimizer, run.lr_scheduler
    train_loader, val_set = run.train_loader, run.val_set
    num_classes = run.train_set.num_classes
    checkpoint_path = run.checkpoint_path
    log_path = os.path.join(config.output_dir, "log.jsonl")
    model: nn.Module = model_without_ddp
    if info.distributed:
        # a rank whose batch has no target runs no denoising query, so the denoising parameters
        # get no gradient there in that step
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                    find_unused_parameters=config.denoising_queries > 0)
    num_params = sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad)
    log(f"training Group DETR: K={config.num_groups} groups x N={config.num_queries} queries, "
        f"{num_classes} classes, {num_params / 1e6:.2f}M trainable parameters, {len(run.train_set)} train / "
        f"{len(val_set)} val images, {config.epochs} epochs x {len(train_loader)} steps "
        f"(lr drop at step {config.lr_drop_step(len(train_loader))}), {info.world_size} process(es) on {device}")
    for callback in callbacks:
        callback.on_train_start(run)

    stats: Dict[str, float] = {}
    predictions: Dict[int, Dict] = {}
    table = ""
    start_time = time.time()
    for epoch in range(run.start_epoch, config.epochs):
        set_loader_epoch(train_loader, epoch)
        epoch_start = time.time()
        train_stats = train_one_epoch(model, run.criterion, train_loader, optimizer, lr_scheduler, device, epoch,
                                      config)
        record = {"epoch": epoch + 1, "step": (epoch + 1) * len(train_loader),
                  "epoch_time_s": round(time.time() - epoch_start, 2),
                  **{f"train_{k}": round(v, 5) for k, v in train_stats.items()}}
        if info.is_main:
            save_checkpoint({
                "format": CHECKPOINT_FORMAT, "model": model_without_ddp.state_dict(),
                "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                "epoch": epoch + 1, "config": config_to_dict(config), "num_classes": num_classes,
                "class_names": run.train_set.class_names,
            }, checkpoint_path)
        last = epoch + 1 == config.epochs
        if last or (epoch + 1) % config.eval_every == 0:
            stats, table, predictions = evaluate(model_without_ddp, run.val_loader, val_set, device)
            record.update({f"val_{k}": round(v, 5) for k, v in stats.items()})
            log(f"epoch {epoch + 1}: AP {stats.get('AP', float('nan')):.3f}  AP50 {stats.get('AP50', float('nan')):.3f}")
        for callback in callbacks:
            callback.on_epoch_end(run, record)
        if info.is_main:
            _log_json(log_path, record)
        distributed.barrier()
    log(f"training took {time.time() - start_time:.0f} s")

    if not predictions:  # resumed a finished run: evaluate once more
        stats, table, predictions = evaluate(model_without_ddp, run.val_loader, val_set, device)
    png_path = None
    if info.is_main:
        from group_detr.visualize import save_prediction_grid

        png_path = save_prediction_grid(val_set, predictions, os.path.join(config.output_dir, "predictions.png"),
                                        num_images=config.num_vis_images)
        log(table.rstrip())
        log(f"predictions on {min(len(predictions), config.num_vis_images)} validation images: {png_path}")
    result = {"stats": stats, "table": table, "checkpoint": checkpoint_path, "png": png_path,
              "model": model_without_ddp, "log": log_path}
    for callback in callbacks:
        callback.on_train_end(run, result)
    return result


def evaluate_checkpoint(checkpoint_path: str, data_dir: Optional[str] = None, split: Optional[str] = None,
                        device: str = "auto", batch_size: Optional[int] = None, png_path: Optional[str] = None,
                        num_workers: int = 0, log: Callable[[str], None] = print) -> Dict:
    """Evaluate a saved model; its configuration comes from the checkpoint itself."""
    checkpoint = load_checkpoint(checkpoint_path)
    config = config_from_dict(checkpoint["config"])
    config = dataclasses.replace(config, data_dir=data_dir or config.data_dir, val_split=split or config.val_split,
                                 num_workers=num_workers, batch_size=batch_size or config.batch_size,
                                 backbone_weights=None)  # the checkpoint holds the backbone already
    val_set = build_val_dataset(config)
    check_checkpoint_matches(checkpoint, config, val_set.num_classes, checkpoint_path)
    info = distributed.init_distributed()
    try:
        torch_device = resolve_device(device, info)
        model = build_model(config, val_set.num_classes)
        model.load_state_dict(checkpoint["model"])
        model.to(torch_device)
        loader = build_loader(val_set, config, train=False)
        stats, table, predictions = evaluate(model, loader, val_set, torch_device)
        if info.is_main:
            log(table.rstrip())
            if png_path:
                from group_detr.visualize import save_prediction_grid

                save_prediction_grid(val_set, predictions, png_path, num_images=config.num_vis_images)
                log(f"predictions drawn: {png_path}")
        return {"stats": stats, "table": table, "png": png_path}
    finally:
        distributed.shutdown_distributed(info)
