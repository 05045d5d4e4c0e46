"""DETR's detection augmentations in plain PIL + torch (torchvision cannot be imported here).

Every transform takes and returns `(image, target)`. Until `Normalize`, `image` is a PIL image
(then a `(3, H, W)` float tensor) and `target["boxes"]` is `(M, 4)` absolute xyxy pixels; after
`Normalize` the boxes are `(M, 4)` cxcywh normalised by the image size, as the model predicts
them. Geometry follows facebookresearch/detr's datasets/transforms.py; random choices use
Python's `random` module, which the data loader seeds per worker.
"""
import random
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from group_detr.box_ops import box_xyxy_to_cxcywh

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Fields indexed by object, filtered together when a crop removes boxes.
_PER_OBJECT_FIELDS = ("boxes", "labels", "area", "iscrowd")


def crop(image: Image.Image, target: Dict, region: Tuple[int, int, int, int]):
    """Crop to region = (top, left, height, width); boxes outside the crop are dropped."""
    top, left, height, width = region
    image = image.crop((left, top, left + width, top + height))
    target = dict(target)
    target["size"] = torch.tensor([height, width])
    boxes = target["boxes"] - torch.tensor([left, top, left, top], dtype=torch.float32)
    boxes = torch.min(boxes.reshape(-1, 2, 2), torch.tensor([width, height], dtype=torch.float32))
    boxes = boxes.clamp(min=0)
    target["area"] = (boxes[:, 1, :] - boxes[:, 0, :]).prod(dim=1)
    target["boxes"] = boxes.reshape(-1, 4)
    keep = torch.all(boxes[:, 1, :] > boxes[:, 0, :], dim=1)
    for field in _PER_OBJECT_FIELDS:
        if field in target:
            target[field] = target[field][keep]
    return image, target


def hflip(image: Image.Image, target: Dict):
    width = image.width
    image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    target = dict(target)
    boxes = target["boxes"]
    target["boxes"] = boxes[:, [2, 1, 0, 3]] * torch.tensor([-1, 1, -1, 1]) + torch.tensor([width, 0, width, 0])
    return image, target


def _size_with_max(image_size: Tuple[int, int], size: int, max_size: Optional[int]) -> Tuple[int, int]:
    """Output (width, height) with the short side = size, unless the long side would pass max_size."""
    w, h = image_size
    if max_size is not None:
        min_original, max_original = float(min(w, h)), float(max(w, h))
        if max_original / min_original * size > max_size:
            size = int(round(max_size * min_original / max_original))
    if w <= h:
        return size, int(size * h / w)
    return int(size * w / h), size


def resize(image: Image.Image, target: Dict, size: int, max_size: Optional[int] = None):
    new_w, new_h = _size_with_max(image.size, size, max_size)
    ratio_w, ratio_h = new_w / image.width, new_h / image.height
    image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    target = dict(target)
    target["boxes"] = target["boxes"] * torch.tensor([ratio_w, ratio_h, ratio_w, ratio_h])
    if "area" in target:
        target["area"] = target["area"] * (ratio_w * ratio_h)
    target["size"] = torch.tensor([new_h, new_w])
    return image, target


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image, target):
        if random.random() < self.p:
            return hflip(image, target)
        return image, target


class RandomResize:
    """Resize the short side to a size drawn from `sizes`, keeping the long side <= max_size."""

    def __init__(self, sizes: Sequence[int], max_size: Optional[int] = None):
        self.sizes = list(sizes)
        self.max_size = max_size

    def __call__(self, image, target):
        return resize(image, target, random.choice(self.sizes), self.max_size)


class RandomSizeCrop:
    """Crop a random region whose sides lie in [min_size, max_size] (and inside the image)."""

    def __init__(self, min_size: int, max_size: int):
        self.min_size = min_size
        self.max_size = max_size

    def __call__(self, image, target):
        w = random.randint(min(image.width, self.min_size), min(image.width, self.max_size))
        h = random.randint(min(image.height, self.min_size), min(image.height, self.max_size))
        top = random.randint(0, image.height - h)
        left = random.randint(0, image.width - w)
        return crop(image, target, (top, left, h, w))


class RandomSelect:
    """Apply `first` with probability p, otherwise `second`."""

    def __init__(self, first, second, p: float = 0.5):
        self.first, self.second, self.p = first, second, p

    def __call__(self, image, target):
        if random.random() < self.p:
            return self.first(image, target)
        return self.second(image, target)


class ToTensor:
    """PIL RGB image -> `(3, H, W)` float32 tensor in [0, 1]."""

    def __call__(self, image, target):
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
        tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)
        return tensor, target


class Normalize:
    """Normalise pixels with the ImageNet statistics and boxes to cxcywh in [0, 1]."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __call__(self, image: Tensor, target):
        image = (image - self.mean) / self.std
        target = dict(target)
        h, w = image.shape[-2:]
        target["boxes"] = box_xyxy_to_cxcywh(target["boxes"]) / torch.tensor([w, h, w, h], dtype=torch.float32)
        return image, target


class Compose:
    def __init__(self, transforms: List):
        self.transforms = list(transforms)

    def __call__(self, image, target):
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self):
        return "Compose(" + ", ".join(type(t).__name__ for t in self.transforms) + ")"


def make_detr_transforms(train: bool, scales: Sequence[int] = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800),
                         max_size: int = 1333, crop_resize: Sequence[int] = (400, 500, 600),
                         crop_size: Tuple[int, int] = (384, 600), eval_size: Optional[int] = None) -> Compose:
    """DETR's COCO recipe; the defaults are DETR's, smaller values suit the synthetic data.

    Train: flip, then either a multi-scale resize or (p=0.5) resize -> random crop -> multi-scale
    resize. Eval: resize the short side to `eval_size` (default: the largest scale).
    """
    normalize = Compose([ToTensor(), Normalize()])
    if train:
        return Compose([
            RandomHorizontalFlip(),
            RandomSelect(
                RandomResize(scales, max_size=max_size),
                Compose([
                    RandomResize(crop_resize),
                    RandomSizeCrop(*crop_size),
                    RandomResize(scales, max_size=max_size),
                ]),
            ),
            normalize,
        ])
    return Compose([RandomResize([eval_size or max(scales)], max_size=max_size), normalize])
