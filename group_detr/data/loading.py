"""The training run's data: the train and validation sets a `TrainConfig` names, and their loaders.

Datasets come from `config.data_dir` and its splits with DETR's transforms; under torchrun each
rank's loader reads its own shard (DistributedSampler), otherwise training batches are shuffled
with `config.seed`.
"""
import random
from typing import Tuple

import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, Sampler, SequentialSampler

from group_detr import distributed
from group_detr.config import TrainConfig
from group_detr.data.coco import CocoDetection, build_coco_dataset, collate_fn
from group_detr.data.transforms import make_detr_transforms


def build_val_dataset(config: TrainConfig) -> CocoDetection:
    transforms = make_detr_transforms(False, config.train_scales, config.max_size, eval_size=config.eval_size)
    return build_coco_dataset(config.data_dir, config.val_split, transforms)


def build_datasets(config: TrainConfig) -> Tuple[CocoDetection, CocoDetection]:
    train_transforms = make_detr_transforms(True, config.train_scales, config.max_size, config.crop_resize,
                                            config.crop_size)
    train_set = build_coco_dataset(config.data_dir, config.train_split, train_transforms)
    val_set = build_val_dataset(config)
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


def build_loader(dataset: CocoDetection, config: TrainConfig, train: bool) -> DataLoader:
    sampler: Sampler[int]
    if distributed.is_distributed():
        sampler = DistributedSampler(dataset, shuffle=train, seed=config.seed)
    elif train:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(config.seed))
    else:
        sampler = SequentialSampler(dataset)
    return DataLoader(dataset, batch_sampler=BatchSampler(sampler, config.batch_size, drop_last=False),
                      collate_fn=collate_fn, num_workers=config.num_workers, worker_init_fn=_seed_worker,
                      persistent_workers=config.num_workers > 0)


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    """A DistributedSampler reshuffles each epoch only when told the epoch; other samplers keep
    their own generator's stream."""
    batch_sampler = loader.batch_sampler
    if isinstance(batch_sampler, BatchSampler) and isinstance(batch_sampler.sampler, DistributedSampler):
        batch_sampler.sampler.set_epoch(epoch)
