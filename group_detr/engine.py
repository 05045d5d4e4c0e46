"""Training and evaluation: config, builders, train_one_epoch, evaluate (COCOeval), checkpoints.

Everything is callable from Python (`train(config)`, `evaluate_checkpoint(path)`); the command
line in `__main__.py` only fills a `TrainConfig`. DDP-aware: under torchrun every rank trains on
its shard of the data, rank 0 writes logs, checkpoints and pictures.
"""
import contextlib
import dataclasses
import io
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from group_detr import distributed
from group_detr.data.coco import CocoDetection, build_coco_dataset, collate_fn
from group_detr.data.synthetic import synthetic_dataset_exists, write_synthetic_dataset
from group_detr.data.transforms import make_detr_transforms
from group_detr.matcher import GroupMatcher
from group_detr.models.criterion import SetCriterion, default_weight_dict
from group_detr.models.detector import GroupDETR, build_group_detr
from group_detr.models.postprocess import PostProcess

CHECKPOINT_FORMAT = "group-detr-checkpoint-v1"
CHECKPOINT_NAME = "checkpoint.pth"
COCO_STAT_NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
                   "AR_1", "AR_10", "AR_100", "AR_small", "AR_medium", "AR_large")
# Fields that fix the model's parameters: a checkpoint only loads into the same values.
MODEL_FIELDS = ("backbone", "small_widths", "hidden_dim", "nheads", "enc_layers", "dec_layers",
                "dim_feedforward", "num_queries", "num_groups")


@dataclass
class TrainConfig:
    """Everything a run needs. The defaults are the paper's (Conditional DETR R50 + Group DETR,
    12-epoch schedule on COCO); `demo_config()` is the small synthetic-data preset."""

    # data: `data_dir/{split}/` images + `data_dir/annotations/instances_{split}.json`
    data_dir: str = "data/coco"
    train_split: str = "train2017"
    val_split: str = "val2017"
    train_scales: Tuple[int, ...] = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
    max_size: int = 1333
    crop_resize: Tuple[int, ...] = (400, 500, 600)
    crop_size: Tuple[int, int] = (384, 600)
    eval_size: int = 800
    max_train_images: Optional[int] = None  # use only the first n images (quick experiments)
    max_val_images: Optional[int] = None
    # model
    backbone: str = "resnet50"
    backbone_weights: Optional[str] = None  # local torchvision-format checkpoint
    small_widths: Tuple[int, int, int, int] = (32, 64, 128, 256)
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    num_queries: int = 300  # N, queries per group (the number kept at inference)
    num_groups: int = 11  # K
    # matching costs and loss weights (Conditional DETR / Group DETR)
    set_cost_class: float = 2.0
    set_cost_bbox: float = 5.0
    set_cost_giou: float = 2.0
    cls_loss_coef: float = 2.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    focal_alpha: float = 0.25
    # optimisation (AdamW; the lr drops by 10x after lr_drop_fraction of the schedule)
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    weight_decay: float = 1e-4
    epochs: int = 12
    lr_drop_fraction: float = 11 / 12
    batch_size: int = 2
    clip_max_norm: float = 0.1
    # run
    output_dir: str = "runs/train"
    seed: int = 42
    device: str = "auto"
    num_workers: int = 2
    num_threads: int = 0  # torch intra-op threads per process; 0 keeps torch's default
    eval_every: int = 1  # epochs between evaluations (the last epoch is always evaluated)
    print_freq: int = 20
    num_vis_images: int = 4
    resume: bool = False

    def validate(self) -> None:
        positive = ("hidden_dim", "nheads", "dec_layers", "dim_feedforward", "num_queries", "num_groups",
                    "epochs", "batch_size", "eval_size", "max_size", "print_freq", "eval_every")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"config.{name} must be a positive int, got {value!r}")
        if self.enc_layers < 0 or self.num_workers < 0 or self.num_threads < 0:
            raise ValueError("config.enc_layers, config.num_workers and config.num_threads must be >= 0")
        if self.hidden_dim % self.nheads or self.hidden_dim % 2:
            raise ValueError(f"config.hidden_dim={self.hidden_dim} must be even and divisible by nheads={self.nheads}")
        if not 0 < self.lr_drop_fraction <= 1:
            raise ValueError(f"config.lr_drop_fraction must be in (0, 1], got {self.lr_drop_fraction}")
        if self.backbone not in ("small", "resnet50"):
            raise ValueError(f"config.backbone must be 'small' or 'resnet50', got {self.backbone!r}")
        if not self.train_scales:
            raise ValueError("config.train_scales must not be empty")


# The synthetic dataset `python -m group_detr demo` writes when its data_dir has none.
DEMO_SYNTHETIC = {"num_train": 1500, "num_val": 200, "image_size": 128, "max_objects": 6}


def demo_config(**overrides) -> TrainConfig:
    """The synthetic-data preset behind `python -m group_detr demo` (about 8 min on 2 CPU cores).

    Deviations from the paper, and why: a small from-scratch CNN instead of ResNet-50 (no
    pretrained weights and no GPU); 128-px images and a 128-d transformer with 3 decoder layers;
    N=10 queries per group because the images hold at most 6 objects; one intra-op thread,
    because the data-loader worker takes the other core and oversubscribed OpenMP threads make
    CPU training several times slower.

    No encoder layers (enc_layers=0): with a from-scratch backbone, a randomly initialised
    encoder's nearly uniform self-attention mixes every memory token with the image's global
    average, so the values the decoder's cross-attention reads carry image-level statistics
    (background colour) rather than local object evidence, and the gradient that reaches the
    backbone is just as diffuse. The model then predicts one fixed box per query (the mean-box
    plateau) for ~1000 steps. Without the encoder it starts localising after ~300 steps (measured:
    AP50 0.062 after 9 epochs, 7.5 min, against 0.019 with 2 encoder layers). The transformer runs at
    lr 5e-4 (the spatial-attention projections must grow ~10x from their Xavier init, at most
    ~lr per Adam step), the backbone at 2e-4 (1e-3 makes the from-scratch CNN collapse).
    K=11 groups, the focal/L1/GIoU weights, AdamW, weight decay, the lr drop at 11/12 of the
    schedule and gradient clipping are the paper's.
    """
    config = TrainConfig(
        data_dir="data/synthetic", train_split="train", val_split="val",
        train_scales=(96, 112, 128), max_size=160, crop_resize=(96, 112, 128), crop_size=(64, 112),
        eval_size=128, backbone="small", small_widths=(16, 32, 64, 128), hidden_dim=128, nheads=8,
        enc_layers=0, dec_layers=3, dim_feedforward=512, dropout=0.0, num_queries=10, num_groups=11,
        lr=5e-4, lr_backbone=2e-4, epochs=9, batch_size=8, clip_max_norm=0.1,
        output_dir="runs/demo", num_workers=1, num_threads=1, eval_every=100, print_freq=25,
    )
    return dataclasses.replace(config, **overrides)


def config_to_dict(config: TrainConfig) -> Dict:
    """Plain types only (tuples -> lists), so a checkpoint holding it loads with weights_only=True."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def config_from_dict(values: Dict) -> TrainConfig:
    """Inverse of config_to_dict; unknown keys (from another version) are ignored."""
    kwargs = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name in values:
            value = values[f.name]
            kwargs[f.name] = tuple(value) if isinstance(value, list) else value
    return TrainConfig(**kwargs)


# --------------------------------------------------------------------------------------------
# builders


def build_model(config: TrainConfig, num_classes: int) -> GroupDETR:
    return build_group_detr(
        num_classes, num_groups=config.num_groups, num_queries=config.num_queries, backbone=config.backbone,
        backbone_weights=config.backbone_weights, hidden_dim=config.hidden_dim, nheads=config.nheads,
        enc_layers=config.enc_layers, dec_layers=config.dec_layers, dim_feedforward=config.dim_feedforward,
        dropout=config.dropout, small_widths=config.small_widths)


def build_criterion(config: TrainConfig, num_classes: int) -> SetCriterion:
    matcher = GroupMatcher(cost_class=config.set_cost_class, cost_bbox=config.set_cost_bbox,
                           cost_giou=config.set_cost_giou, num_groups=config.num_groups,
                           class_cost="focal", focal_alpha=config.focal_alpha)
    weights = default_weight_dict(config.dec_layers, config.cls_loss_coef, config.bbox_loss_coef,
                                  config.giou_loss_coef)
    return SetCriterion(num_classes, matcher, weights, queries_per_group=config.num_queries,
                        focal_alpha=config.focal_alpha)


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with two groups: the backbone at lr_backbone, everything else at lr."""
    backbone = [p for n, p in model.named_parameters() if n.startswith("backbone.") and p.requires_grad]
    rest = [p for n, p in model.named_parameters() if not n.startswith("backbone.") and p.requires_grad]
    return torch.optim.AdamW([{"params": rest, "lr": config.lr},
                              {"params": backbone, "lr": config.lr_backbone}],
                             lr=config.lr, weight_decay=config.weight_decay)


def build_datasets(config: TrainConfig) -> Tuple[CocoDetection, CocoDetection]:
    train_transforms = make_detr_transforms(True, config.train_scales, config.max_size, config.crop_resize,
                                            config.crop_size)
    val_transforms = make_detr_transforms(False, config.train_scales, config.max_size, eval_size=config.eval_size)
    train_set = build_coco_dataset(config.data_dir, config.train_split, train_transforms)
    val_set = build_coco_dataset(config.data_dir, config.val_split, val_transforms)
    if train_set.label_to_category_id != val_set.label_to_category_id:
        raise ValueError(f"the {config.train_split} and {config.val_split} annotation files have different "
                         f"categories: {train_set.label_to_category_id} vs {val_set.label_to_category_id}")
    for dataset, limit in ((train_set, config.max_train_images), (val_set, config.max_val_images)):
        if limit is not None:
            dataset.ids = dataset.ids[:limit]
        if len(dataset) == 0:
            raise ValueError(f"dataset {dataset.annotation_file} has no images")
    return train_set, val_set


def _seed_worker(worker_id: int) -> None:
    # Augmentations use Python's `random`; give each worker its own stream derived from torch's.
    random.seed(torch.initial_seed() % 2**32)


def build_loader(dataset, config: TrainConfig, train: bool) -> DataLoader:
    if distributed.is_distributed():
        sampler = DistributedSampler(dataset, shuffle=train, seed=config.seed)
    elif train:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(config.seed))
    else:
        sampler = SequentialSampler(dataset)
    return DataLoader(dataset, batch_sampler=BatchSampler(sampler, config.batch_size, drop_last=False),
                      collate_fn=collate_fn, num_workers=config.num_workers, worker_init_fn=_seed_worker,
                      persistent_workers=config.num_workers > 0)


def resolve_device(name: str, info: distributed.DistInfo) -> torch.device:
    if name == "auto":
        name = f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


# --------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(state: Dict, path: str) -> None:
    """Write atomically: a temporary file in the same directory, fsync, then rename.

    A crash (or an exception in torch.save) leaves the previous checkpoint untouched and no
    partial file under `path`.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp_path = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp_path, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp_path)
        raise


def load_checkpoint(path: str) -> Dict:
    """Load a group-detr checkpoint with weights_only=True; clear errors for anything else."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated files and foreign pickles raise many different types
        raise ValueError(f"cannot read checkpoint {path} (corrupt, or not saved by group-detr): {exc}") from exc
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a group-detr checkpoint (no format tag {CHECKPOINT_FORMAT!r})")
    return checkpoint


def check_checkpoint_matches(checkpoint: Dict, config: TrainConfig, num_classes: int, path: str = "checkpoint") -> None:
    """Raise ValueError naming every model setting that differs between checkpoint and config."""
    saved = checkpoint["config"]
    differences = [f"{name}: checkpoint {saved.get(name)!r}, this run {config_to_dict(config)[name]!r}"
                   for name in MODEL_FIELDS if saved.get(name) != config_to_dict(config)[name]]
    if checkpoint.get("num_classes") != num_classes:
        differences.append(f"num_classes: checkpoint {checkpoint.get('num_classes')!r}, this run {num_classes!r}")
    if differences:
        raise ValueError(f"{path} was saved with another model configuration: " + "; ".join(differences))


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
    """One pass over `loader`; the scheduler steps every iteration. Returns mean losses (over ranks)."""
    model.train()
    criterion.train()
    sums: Dict[str, torch.Tensor] = {}
    progress = Progress(len(loader), f"epoch {epoch + 1}/{config.epochs}", config.print_freq)
    for step, (images, mask, targets) in enumerate(loader):
        images, mask, targets = _to_device(images, mask, targets, device)
        outputs = model(images, mask)
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
    return {k: float(v) for k, v in zip(keys, means)}


# --------------------------------------------------------------------------------------------
# evaluation


def predictions_to_coco(predictions: Dict[int, Dict], label_to_category_id: List[int]) -> List[Dict]:
    """{image_id: postprocessed dict (xyxy pixels)} -> COCO result list (xywh, category ids)."""
    results = []
    for image_id, pred in predictions.items():
        boxes = pred["boxes"].clone()
        boxes[:, 2:] -= boxes[:, :2]
        for score, label, box in zip(pred["scores"].tolist(), pred["labels"].tolist(), boxes.tolist()):
            results.append({"image_id": int(image_id), "category_id": label_to_category_id[label],
                            "bbox": [round(v, 2) for v in box], "score": round(score, 5)})
    return results


def coco_evaluate(coco_gt, results: List[Dict], image_ids: List[int]) -> Tuple[List[float], str]:
    """Run COCOeval (bbox) on `image_ids`; returns the 12 standard stats and the printed table."""
    from pycocotools.cocoeval import COCOeval

    if not results:
        return [0.0] * len(COCO_STAT_NAMES), "no detections: AP is 0\n"
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        coco_dt = coco_gt.loadRes(results)
        coco_eval = COCOeval(coco_gt, coco_dt, "bbox")
        coco_eval.params.imgIds = list(image_ids)
        coco_eval.evaluate()
        coco_eval.accumulate()
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        coco_eval.summarize()
    return [float(s) for s in coco_eval.stats], table.getvalue()


@torch.no_grad()
def predict(model: GroupDETR, loader: DataLoader, device: torch.device, num_select: int = 100) -> Dict[int, Dict]:
    """{image_id: {scores, labels, boxes (xyxy, original-image pixels)}} for this rank's images."""
    model.eval()
    postprocess = PostProcess(num_select)
    predictions = {}
    for images, mask, targets in loader:
        outputs = model(images.to(device), mask.to(device))
        sizes = torch.stack([t["orig_size"] for t in targets]).to(device)
        for target, pred in zip(targets, postprocess(outputs, sizes)):
            predictions[int(target["image_id"])] = {k: v.cpu() for k, v in pred.items()}
    return predictions


def evaluate(model: GroupDETR, loader: DataLoader, dataset: CocoDetection, device: torch.device
             ) -> Tuple[Dict[str, float], str, Dict[int, Dict]]:
    """COCO AP of `model` on `dataset` (every rank predicts its shard, rank 0 scores all).

    Returns (stats by name, the printed AP table, this rank's predictions); on ranks other
    than 0 the stats are empty and the table is "".
    """
    predictions = predict(model, loader, device)
    # DistributedSampler pads the last shard with repeated images: merging by image id keeps
    # each image's detections once (duplicates would count as false positives).
    gathered = distributed.all_gather_object(
        {image_id: predictions_to_coco({image_id: pred}, dataset.label_to_category_id)
         for image_id, pred in predictions.items()})
    if not distributed.is_main_process():
        return {}, "", predictions
    merged: Dict[int, List[Dict]] = {}
    for part in gathered:
        for image_id, results in part.items():
            merged.setdefault(image_id, results)
    results = [r for image_results in merged.values() for r in image_results]
    stats, table = coco_evaluate(dataset.coco, results, dataset.ids)
    return dict(zip(COCO_STAT_NAMES, stats)), table, predictions


# --------------------------------------------------------------------------------------------
# the whole run


def _log_json(path: str, record: Dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def train(config: TrainConfig, log: Callable[[str], None] = print) -> Dict:
    """Train (and resume), evaluate, draw predictions. Returns a summary dict with the final
    `stats`, the AP `table`, `checkpoint` and `png` paths (rank 0) and the trained `model`."""
    config.validate()
    info = distributed.init_distributed()
    try:
        return _train(config, info, log if info.is_main else (lambda _: None))
    finally:
        distributed.shutdown_distributed(info)


def _train(config: TrainConfig, info: distributed.DistInfo, log: Callable[[str], None]) -> Dict:
    device = resolve_device(config.device, info)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    random.seed(config.seed + info.rank)  # different augmentations per rank
    train_set, val_set = build_datasets(config)
    num_classes = train_set.num_classes
    model = build_model(config, num_classes).to(device)
    criterion = build_criterion(config, num_classes)
    optimizer = build_optimizer(model, config)
    train_loader = build_loader(train_set, config, train=True)
    val_loader = build_loader(val_set, config, train=False)
    total_steps = config.epochs * len(train_loader)
    drop_step = max(1, int(round(total_steps * config.lr_drop_fraction)))
    lr_scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[drop_step], gamma=0.1)

    os.makedirs(config.output_dir, exist_ok=True)
    checkpoint_path = os.path.join(config.output_dir, CHECKPOINT_NAME)
    log_path = os.path.join(config.output_dir, "log.jsonl")
    start_epoch = 0
    if config.resume and os.path.isfile(checkpoint_path):
        checkpoint = load_checkpoint(checkpoint_path)
        check_checkpoint_matches(checkpoint, config, num_classes, checkpoint_path)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
        start_epoch = checkpoint["epoch"]
        log(f"resumed from {checkpoint_path} after epoch {start_epoch}")

    model_without_ddp = model
    if info.distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    num_params = sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad)
    log(f"training Group DETR: K={config.num_groups} groups x N={config.num_queries} queries, "
        f"{num_classes} classes, {num_params / 1e6:.2f}M trainable parameters, {len(train_set)} train / "
        f"{len(val_set)} val images, {config.epochs} epochs x {len(train_loader)} steps "
        f"(lr drop at step {drop_step}), {info.world_size} process(es) on {device}")

    stats, table, predictions = {}, "", {}
    start_time = time.time()
    for epoch in range(start_epoch, config.epochs):
        if isinstance(train_loader.batch_sampler.sampler, DistributedSampler):
            train_loader.batch_sampler.sampler.set_epoch(epoch)
        epoch_start = time.time()
        train_stats = train_one_epoch(model, criterion, train_loader, optimizer, lr_scheduler, device, epoch, config)
        record = {"epoch": epoch + 1, "step": (epoch + 1) * len(train_loader),
                  "epoch_time_s": round(time.time() - epoch_start, 2),
                  **{f"train_{k}": round(v, 5) for k, v in train_stats.items()}}
        if info.is_main:
            save_checkpoint({
                "format": CHECKPOINT_FORMAT, "model": model_without_ddp.state_dict(),
                "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                "epoch": epoch + 1, "config": config_to_dict(config), "num_classes": num_classes,
                "class_names": train_set.class_names,
            }, checkpoint_path)
        last = epoch + 1 == config.epochs
        if last or (epoch + 1) % config.eval_every == 0:
            stats, table, predictions = evaluate(model_without_ddp, val_loader, val_set, device)
            record.update({f"val_{k}": round(v, 5) for k, v in stats.items()})
            log(f"epoch {epoch + 1}: AP {stats.get('AP', float('nan')):.3f}  AP50 {stats.get('AP50', float('nan')):.3f}")
        if info.is_main:
            _log_json(log_path, record)
        distributed.barrier()
    log(f"training took {time.time() - start_time:.0f} s")

    if not predictions:  # resumed a finished run: evaluate once more
        stats, table, predictions = evaluate(model_without_ddp, val_loader, val_set, device)
    png_path = None
    if info.is_main:
        from group_detr.visualize import save_prediction_grid

        png_path = save_prediction_grid(val_set, predictions, os.path.join(config.output_dir, "predictions.png"),
                                        num_images=config.num_vis_images)
        log(table.rstrip())
        log(f"predictions on {min(len(predictions), config.num_vis_images)} validation images: {png_path}")
    return {"stats": stats, "table": table, "checkpoint": checkpoint_path, "png": png_path,
            "model": model_without_ddp, "log": log_path}


def evaluate_checkpoint(checkpoint_path: str, data_dir: Optional[str] = None, split: Optional[str] = None,
                        device: str = "auto", batch_size: Optional[int] = None, png_path: Optional[str] = None,
                        num_workers: int = 0, log: Callable[[str], None] = print) -> Dict:
    """Evaluate a saved model; its configuration comes from the checkpoint itself."""
    checkpoint = load_checkpoint(checkpoint_path)
    config = config_from_dict(checkpoint["config"])
    config = dataclasses.replace(config, data_dir=data_dir or config.data_dir, val_split=split or config.val_split,
                                 num_workers=num_workers, batch_size=batch_size or config.batch_size,
                                 backbone_weights=None)  # the checkpoint holds the backbone already
    val_transforms = make_detr_transforms(False, config.train_scales, config.max_size, eval_size=config.eval_size)
    val_set = build_coco_dataset(config.data_dir, config.val_split, val_transforms)
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


def ensure_synthetic_dataset(data_dir: str, log: Callable[[str], None] = print, **kwargs) -> None:
    """Write the synthetic dataset to `data_dir` unless it is already complete there."""
    if synthetic_dataset_exists(data_dir):
        return
    log(f"writing the synthetic dataset to {data_dir} ...")
    start = time.time()
    write_synthetic_dataset(data_dir, **kwargs)
    log(f"done in {time.time() - start:.1f} s")
