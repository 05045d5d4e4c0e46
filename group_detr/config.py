"""Run settings: `TrainConfig`, the demo preset and the synthetic-data presets.

This module imports nothing from the rest of the package (it is read by the data generator, the
training engine, the command line and the benchmarks), so every default below exists once:

* `TrainConfig()`: the paper's training run (Conditional DETR R50 + Group DETR, 12 epochs, COCO);
* `demo_config()`: `python -m group_detr demo` (small model, synthetic data, CPU);
* `SYNTHETIC_PRESETS`: named settings of the synthetic shapes generator
  (`group_detr.data.synthetic`); `synthetic_preset(name, **overrides)` looks one up.
  `python -m group_detr synth --preset NAME`, the demo (`TrainConfig.synthetic`), the tests and
  the benchmarks all read them here.

Adding a synthetic preset: add an entry to `SYNTHETIC_PRESETS`. Adding a generator knob: add a
field to `SyntheticPreset` whose default is today's behaviour (so every existing preset keeps
its data), read it in `group_detr.data.synthetic`, and set it in the presets that change it.
"""
import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple


@dataclass(frozen=True)
class SyntheticPreset:
    """Settings of the synthetic shapes generator (see `group_detr.data.synthetic`)."""

    description: str
    num_train: int  # training images
    num_val: int  # validation images
    image_size: int  # image height in pixels (widths vary by a factor 0.75 .. 1.25)
    max_objects: int  # most objects per image (a few images are empty)
    min_object_size: int  # smallest shape diameter in pixels (sizes are log-uniform, see max_object_fraction)
    clutter: float = 1.0  # background gradient / texture / noise amplitude (0 = flat)
    min_contrast: float = 0.0  # least colour difference object vs background mean (0-255; 0 = free)
    seed: int = 0
    # Objects per image: 0 draws them uniformly from 1..max_objects; > 0 from a geometric
    # distribution with this mean, clipped to max_objects (COCO's long tail: many images with a
    # few objects, some with many).
    mean_objects: float = 0.0
    max_object_fraction: float = 0.8  # largest shape diameter, as a fraction of the image's short side

    def generator_settings(self) -> Dict:
        """The fields that decide the pixels (everything but the description)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "description"}

    @staticmethod
    def complete_settings(recorded: Dict) -> Dict:
        """`recorded` generator settings (a dataset's "info") with the knobs added after it was
        written filled in with their defaults, which are the behaviour it was written with."""
        defaults = {f.name: f.default for f in dataclasses.fields(SyntheticPreset)
                    if f.default is not dataclasses.MISSING and f.name != "description"}
        return {**defaults, **recorded}


SYNTHETIC_PRESETS: Dict[str, SyntheticPreset] = {
    "hard": SyntheticPreset(
        description="5 shape classes on striped / checkered noisy backgrounds, rotated shaded shapes "
                    "from 8 px to 0.8 of the image, occlusion; headroom for benchmarks",
        num_train=1500, num_val=200, image_size=128, max_objects=6, min_object_size=8),
    "easy": SyntheticPreset(
        description="the same 5 shape classes, 1-3 per image, 24 px to 0.8 of a 64-px image, in colours "
                    "that stand out from nearly flat backgrounds; a small detector learns it in minutes on a CPU",
        num_train=3000, num_val=200, image_size=64, max_objects=3, min_object_size=24, clutter=0.1,
        min_contrast=80.0),
    "crowded": SyntheticPreset(
        description="the easy preset's shapes and colours, COCO-like counts: about 7 annotated objects per image "
                    "(10 drawn on average, long-tailed, up to 20; occlusion hides some), 6 px to 0.45 of a 96-px image",
        num_train=2000, num_val=200, image_size=96, max_objects=20, min_object_size=6, clutter=0.1,
        min_contrast=80.0, mean_objects=10.0, max_object_fraction=0.45),
}

# The synthetic preset behind `python -m group_detr demo` (and the convergence benchmark).
DEMO_SYNTHETIC_PRESET = "easy"


def synthetic_preset(name: str, **overrides) -> SyntheticPreset:
    """The preset `name` of SYNTHETIC_PRESETS with some fields replaced (e.g. num_train=8)."""
    if name not in SYNTHETIC_PRESETS:
        raise ValueError(f"unknown synthetic preset {name!r}; known: {sorted(SYNTHETIC_PRESETS)}")
    return dataclasses.replace(SYNTHETIC_PRESETS[name], **overrides)


@dataclass
class TrainConfig:
    """Everything a run needs. The defaults are the paper's (Conditional DETR R50 + Group DETR,
    12-epoch schedule on COCO); `demo_config()` is the small synthetic-data preset."""

    # data: `data_dir/{split}/` images + `data_dir/annotations/instances_{split}.json`
    data_dir: str = "data/coco"
    # A SYNTHETIC_PRESETS name: the demo and the benchmarks write that dataset into data_dir when
    # it has none. None: data_dir holds a dataset of its own (COCO).
    synthetic: Optional[str] = None
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
    small_widths: Tuple[int, ...] = (32, 64, 128, 256)  # the small CNN's stages; stride 2**len
    small_norm: str = "batch"  # the small CNN's normalisation: "batch" or "group"
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
    # contrastive query denoising beside the groups (DINO's CDN; group_detr.models.denoising).
    # DINO's own values: 100 (its dn_number), 0.5, 1.0 (its training commands; 0.4 in its
    # config file), contrastive. 0 queries: no denoising (the paper's Conditional DETR runs).
    denoising_queries: int = 0  # budget: G = max(1, denoising_queries // most targets in the batch) groups
    denoising_label_noise: float = 0.5  # twice the probability that a denoising label is flipped
    denoising_box_noise: float = 1.0  # corner noise in half box sides (positives < 1x, negatives 1-2x)
    denoising_contrastive: bool = True  # negatives beside the positives (DINO); False: DN-DETR's positives only
    # decoder self-attention backend, one of group_detr.attention.BACKENDS (checked where the
    # model is built); "auto" picks per device
    attention_backend: str = "auto"
    # optimisation (AdamW; the lr drops by 10x after lr_drop_fraction of the schedule)
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    weight_decay: float = 1e-4
    epochs: int = 12
    lr_drop_fraction: float = 11 / 12
    warmup_steps: int = 0  # linear lr warm-up over the first steps (0: none, the paper's)
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
        if self.enc_layers < 0 or self.num_workers < 0 or self.num_threads < 0 or self.warmup_steps < 0:
            raise ValueError("config.enc_layers, config.num_workers, config.num_threads and config.warmup_steps "
                             "must be >= 0")
        if self.hidden_dim % self.nheads or self.hidden_dim % 2:
            raise ValueError(f"config.hidden_dim={self.hidden_dim} must be even and divisible by nheads={self.nheads}")
        if not 0 < self.lr_drop_fraction <= 1:
            raise ValueError(f"config.lr_drop_fraction must be in (0, 1], got {self.lr_drop_fraction}")
        if self.backbone not in ("small", "resnet50"):
            raise ValueError(f"config.backbone must be 'small' or 'resnet50', got {self.backbone!r}")
        if not self.train_scales:
            raise ValueError("config.train_scales must not be empty")
        check_denoising_settings(self.denoising_queries, self.denoising_label_noise, self.denoising_box_noise,
                                 "config.")
        if self.denoising_queries and self.attention_backend == "folded":
            raise ValueError("config.attention_backend='folded' cannot hold the denoising prefix of "
                             f"config.denoising_queries={self.denoising_queries} (folding groups into the batch "
                             "needs equal groups): use 'auto', 'masked', 'triton' or 'flex'")
        if self.synthetic is not None and self.synthetic not in SYNTHETIC_PRESETS:
            raise ValueError(f"config.synthetic must be None or one of {sorted(SYNTHETIC_PRESETS)}, "
                             f"got {self.synthetic!r}")

    def lr_drop_step(self, steps_per_epoch: int) -> int:
        """The optimizer step after which the learning rate drops by 10x."""
        return max(1, int(round(self.epochs * steps_per_epoch * self.lr_drop_fraction)))


def demo_config(**overrides: Any) -> TrainConfig:
    """The synthetic-data preset behind `python -m group_detr demo`.

    Deviations from the paper, and why (issue 13's runs, 2-core CPU, 3000 training images of
    the easy preset; AP after 4 epochs, seed 0 unless said):

    * a small from-scratch CNN instead of ResNet-50 (no pretrained weights, no GPU), with
      BatchNorm and stride 8 (8x8 maps of the 64-px images): the GroupNorm stride-16 CNN kept the
      detector on the default-box plateau ~3x longer;
    * a 96-d transformer, 1 encoder and 2 decoder layers, 4 heads, a 256-wide feed-forward,
      N=10 queries per group (at most 3 objects per image): d=128 learnt slower (0.063 vs
      0.082-0.085 AP after two epochs) in 1.2x the time, d=64 too (0.069 vs 0.091 AP);
      2 decoder layers instead of 3 (one thread: 91 instead of 107 ms per step) learnt as fast
      per epoch: AP 0.337 after 6 epochs against 0.268 after 5 with 3 layers (seed 0);
    * batch 4: with everything else fixed (d=96, the earlier easy data), AP after the same 12000
      images was 0.032 at batch 16, 0.061 at 8, 0.091 at 4 and lower again at 2 (slower too: the
      step is then mostly fixed costs). More updates matter more than larger batches here;
    * the easy preset's objects from 24 px and clutter 0.1 (from 16 px and 0.25): 0.157-0.159
      AP after 4 epochs (seeds 0, 1) against 0.091;
    * lr 5e-4 for the transformer and the backbone alike (from scratch the backbone needs no
      lower rate): 1e-3 left the model on the plateau at batch 8 without warm-up and learnt no
      faster per second with one (0.067 vs 0.085 AP after two epochs);
    * focal alpha 0.5 (loss and matching cost) and class-loss weight 4 instead of 0.25 and 2
      (session 7, 5 epochs, AP at the end): the boxes were learnt, the classes lagged (class-
      agnostic AP 0.29 against 0.18). alpha 0.5 alone: 0.239 / 0.216 (seeds 0 / 42) against
      0.176 / 0.134; with class weight 4: 0.268 / 0.226. alpha 0.75: 0.216; class weight 6:
      0.261; matching class cost 4 as well: 0.247; the lr drop at 0.8: 0.241; (32, 64, 192)
      backbone widths: 0.206 and 1.3x the time; lr 7e-4: behind from epoch 2 (seed 0 each);
    * two intra-op threads and the data loaded in the training process (num_workers=0): a
      loader worker process takes a core from the two threads, which then wait for each other
      (8.3 steps/s with one worker, 11.0 without; 8.4 with one thread);
    * K=3 groups for 10 epochs instead of the paper's K=11 (issue 26): on this data AP
      plateaus from K=3 at 12 epochs (0.580 +- 0.048 against 0.587 +- 0.028 at K=11, the README's
      Table 1), and a K=3 step costs ~0.7x a K=11 one, so the same 10 minutes hold 10 epochs
      instead of 7. K=11 for 7 epochs gave AP 0.305 (AMD EPYC) and 0.291 (Intel Xeon) for seed
      42, under the demo's 0.30 bar on one CPU; K=3 for 10 epochs gives 0.411 / 0.501 (seeds 42 /
      0, Intel Xeon, 240 s of training each, as long as K=11's 7 epochs took there).

    The L1/GIoU weights, AdamW, weight decay, the lr drop at 11/12 of the schedule
    and gradient clipping are the paper's. Every epoch is evaluated (the per-epoch
    "epoch E: AP" line); 200 validation images at 64 px take a couple of seconds.

    The data is the synthetic preset `synthetic` (default DEMO_SYNTHETIC_PRESET), written to
    data/synthetic-<preset> (one directory per preset, so that changing the preset never reuses
    another one's files); images are trained and evaluated at the preset's image size.
    """
    synthetic = overrides.get("synthetic", DEMO_SYNTHETIC_PRESET)
    preset = synthetic_preset(synthetic)
    size = preset.image_size
    # N well above the most objects an image holds (COCO: N=300 for up to ~100): 10 for the
    # easy and hard presets, 30 for the crowded one's 20.
    queries_per_group = max(10, -(-3 * preset.max_objects // 2))
    config = TrainConfig(
        data_dir=f"data/synthetic-{synthetic}", synthetic=synthetic, train_split="train", val_split="val",
        train_scales=(size,), max_size=size * 4 // 3, crop_resize=(size,), crop_size=(size, size),
        eval_size=size, backbone="small", small_widths=(32, 64, 128), small_norm="batch", hidden_dim=96,
        nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=256, dropout=0.0, num_queries=queries_per_group, num_groups=3,
        focal_alpha=0.5, cls_loss_coef=4.0, lr=5e-4, lr_backbone=5e-4, epochs=10, batch_size=4, clip_max_norm=0.1,
        output_dir="runs/demo", num_workers=0, num_threads=2, eval_every=1, print_freq=150,
    )
    return dataclasses.replace(config, **overrides)


def config_to_dict(config: TrainConfig) -> Dict:
    """Plain types only (tuples -> lists), so a checkpoint holding it loads with weights_only=True."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def config_from_dict(values: Dict) -> TrainConfig:
    """Inverse of config_to_dict; unknown keys (from another version) are ignored."""
    kwargs: Dict[str, Any] = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name in values:
            value = values[f.name]
            kwargs[f.name] = tuple(value) if isinstance(value, list) else value
    return TrainConfig(**kwargs)


def check_denoising_settings(denoising_queries, label_noise_ratio, box_noise_scale, prefix: str) -> None:
    """ValueError naming the setting (`prefix` + name) that is out of range."""
    if isinstance(denoising_queries, bool) or not isinstance(denoising_queries, int) or denoising_queries < 0:
        raise ValueError(f"{prefix}denoising_queries must be an int >= 0 (0: no denoising), "
                         f"got {denoising_queries!r}")
    if not 0.0 <= label_noise_ratio <= 1.0:
        raise ValueError(f"{prefix}denoising_label_noise must be in [0, 1] (twice the probability "
                         f"of a flipped label), got {label_noise_ratio!r}")
    if not 0.0 <= box_noise_scale <= 1.0:
        raise ValueError(f"{prefix}denoising_box_noise must be in [0, 1] (above 1 a positive "
                         f"query's box may turn inside out), got {box_noise_scale!r}")
