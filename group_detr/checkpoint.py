"""Training checkpoints: atomic save, safe load (weights_only=True), configuration checks.

A checkpoint is a plain dict: `format` (CHECKPOINT_FORMAT), `model`, `optimizer`, `lr_scheduler`
state dicts, `epoch` (epochs finished), `config` (`config_to_dict`), `num_classes` and
`class_names`, so it loads with `torch.load(weights_only=True)` and never runs foreign code.
"""
import contextlib
import dataclasses
import os
from typing import Dict

import torch

from group_detr.config import TrainConfig, config_from_dict, config_to_dict

CHECKPOINT_FORMAT = "group-detr-checkpoint-v1"
CHECKPOINT_NAME = "checkpoint.pth"
# Fields that fix the model's parameters: a checkpoint only loads into the same values.
MODEL_FIELDS = ("backbone", "small_widths", "small_norm", "hidden_dim", "nheads", "enc_layers", "dec_layers",
                "dim_feedforward", "num_queries", "num_groups", "denoising_queries")
# Fields a resumed run may change: where the files are, how it runs and reports, and `epochs`
# (extending a run; the lr drop then moves with it). Every other field decides what the run
# learns, so resuming with another value would silently mix two runs.
RESUMABLE_FIELDS = ("data_dir", "val_split", "eval_size", "max_val_images", "output_dir", "device",
                    "num_workers", "num_threads", "eval_every", "print_freq", "num_vis_images", "resume",
                    "epochs", "backbone_weights", "attention_backend")


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
    """Raise ValueError naming every model setting that differs between checkpoint and config.

    Fields a checkpoint from an older version lacks compare as their defaults (a checkpoint saved
    before `denoising_queries` existed has no denoising weights, as the default 0 builds)."""
    saved, current = config_to_dict(config_from_dict(checkpoint["config"])), config_to_dict(config)
    differences = [f"{name}: checkpoint {saved[name]!r}, this run {current[name]!r}"
                   for name in MODEL_FIELDS if saved[name] != current[name]]
    if checkpoint.get("num_classes") != num_classes:
        differences.append(f"num_classes: checkpoint {checkpoint.get('num_classes')!r}, this run {num_classes!r}")
    if differences:
        raise ValueError(f"{path} was saved with another model configuration: " + "; ".join(differences))


def check_resume_matches(checkpoint: Dict, config: TrainConfig, num_classes: int, path: str = "checkpoint") -> None:
    """check_checkpoint_matches, and a ValueError naming every training setting (data, loss,
    matching, optimisation, seed) that differs: resuming continues the same run only.

    Fields a checkpoint from an older version lacks compare as their defaults."""
    check_checkpoint_matches(checkpoint, config, num_classes, path)
    saved, current = config_to_dict(config_from_dict(checkpoint["config"])), config_to_dict(config)
    skip = set(MODEL_FIELDS) | set(RESUMABLE_FIELDS)
    differences = [f"{f.name}: checkpoint {saved[f.name]!r}, this run {current[f.name]!r}"
                   for f in dataclasses.fields(TrainConfig) if f.name not in skip and saved[f.name] != current[f.name]]
    if differences:
        raise ValueError(f"{path} was saved by a run with other training settings: " + "; ".join(differences)
                         + ". Resuming continues the same run only: start afresh with --no-resume or another "
                           "--output-dir")
