"""COCO-format detection data through pycocotools: dataset, annotation checks and collate.

A dataset item is `(image, target)`: image `(3, H, W)` float (normalised), target a dict with
`boxes` `(M, 4)` cxcywh in [0, 1], `labels` `(M,)` int64 contiguous class indices in
[0, num_classes), `image_id` `()`, `orig_size` / `size` `(2,)` as (h, w), `area` `(M,)`,
`iscrowd` `(M,)`. Category ids in the file may be sparse (COCO's go up to 90); the dataset maps
them to contiguous labels and keeps `label_to_category_id` to map predictions back for COCOeval.
"""
import contextlib
import io
import json
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from group_detr.data.transforms import Compose

REQUIRED_KEYS = ("images", "annotations", "categories")


def load_coco_annotations(path: str):
    """Read and validate a COCO instances file; return a `pycocotools.coco.COCO` object.

    Raises FileNotFoundError when the file is missing and ValueError, naming the file and the
    offending entry, when it is not valid COCO detection json.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"annotation file {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or any(key not in data for key in REQUIRED_KEYS):
        raise ValueError(f"annotation file {path} is not COCO detection json: it needs the keys {REQUIRED_KEYS}")
    if not data["categories"]:
        raise ValueError(f"annotation file {path} has no categories")
    category_ids = set()
    for category in data["categories"]:
        if not isinstance(category, dict) or "id" not in category:
            raise ValueError(f"annotation file {path}: a category has no id: {category!r}")
        category_ids.add(category["id"])
    image_ids = set()
    for image in data["images"]:
        if not isinstance(image, dict) or any(k not in image for k in ("id", "file_name")):
            raise ValueError(f"annotation file {path}: an image entry needs 'id' and 'file_name': {image!r}")
        image_ids.add(image["id"])
    for ann in data["annotations"]:
        if not isinstance(ann, dict) or any(k not in ann for k in ("image_id", "category_id", "bbox")):
            raise ValueError(f"annotation file {path}: an annotation needs 'image_id', 'category_id' and 'bbox': {ann!r}")
        if ann["category_id"] not in category_ids:
            raise ValueError(
                f"annotation file {path}: annotation {ann.get('id')} has category_id {ann['category_id']}, "
                f"which is not among the {len(category_ids)} categories")
        if ann["image_id"] not in image_ids:
            raise ValueError(f"annotation file {path}: annotation {ann.get('id')} refers to unknown image_id {ann['image_id']}")
        bbox = ann["bbox"]
        if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)):
            raise ValueError(f"annotation file {path}: annotation {ann.get('id')} has a malformed bbox {bbox!r} (want 4 finite numbers [x, y, w, h])")
    # Imported here: training needs pycocotools, but importing group_detr (or building a model on
    # a GPU image without it) must not.
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index..."
        coco.createIndex()
    return coco


class CocoDetection(torch.utils.data.Dataset):
    """Images from `image_dir`, boxes from a COCO instances json, DETR-style targets."""

    def __init__(self, image_dir: str, annotation_file: str, transforms: Optional[Compose] = None):
        self.image_dir = image_dir
        self.annotation_file = annotation_file
        self.coco = load_coco_annotations(annotation_file)
        self.ids = sorted(self.coco.imgs.keys())
        self.transforms = transforms
        self.label_to_category_id: List[int] = sorted(self.coco.cats.keys())
        self.category_id_to_label: Dict[int, int] = {c: i for i, c in enumerate(self.label_to_category_id)}
        self.class_names: List[str] = [self.coco.cats[c].get("name", str(c)) for c in self.label_to_category_id]

    @property
    def num_classes(self) -> int:
        return len(self.label_to_category_id)

    def __len__(self) -> int:
        return len(self.ids)

    def load_image(self, image_id: int) -> Image.Image:
        path = os.path.join(self.image_dir, self.coco.imgs[image_id]["file_name"])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image {image_id} of {self.annotation_file} not found: {path}")
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"cannot read image {path} (image id {image_id}): {exc}") from exc

    def load_target(self, image_id: int, width: int, height: int) -> Dict[str, Tensor]:
        """Boxes as absolute xyxy clipped to the image; crowd and empty boxes dropped (as DETR)."""
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2].clamp_(min=0, max=width)
        boxes[:, 1::2].clamp_(min=0, max=height)
        labels = torch.tensor([self.category_id_to_label[a["category_id"]] for a in anns], dtype=torch.int64)
        area = torch.tensor([float(a.get("area", a["bbox"][2] * a["bbox"][3])) for a in anns], dtype=torch.float32)
        keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
        return {
            "boxes": boxes[keep], "labels": labels[keep], "area": area[keep],
            "iscrowd": torch.zeros(int(keep.sum()), dtype=torch.int64),
            "image_id": torch.tensor(image_id), "orig_size": torch.tensor([height, width]),
            "size": torch.tensor([height, width]),
        }

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        image = self.load_image(image_id)
        target = self.load_target(image_id, image.width, image.height)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def collate_fn(batch: Sequence[Tuple[Tensor, Dict]]) -> Tuple[Tensor, Tensor, List[Dict]]:
    """Pad images to the largest in the batch.

    Returns images `(B, 3, H_max, W_max)`, mask `(B, H_max, W_max)` bool (True = padding, which
    attention must ignore) and the list of targets.
    """
    images = [item[0] for item in batch]
    targets = [item[1] for item in batch]
    max_h = max(img.shape[1] for img in images)
    max_w = max(img.shape[2] for img in images)
    padded = images[0].new_zeros((len(images), 3, max_h, max_w))
    mask = torch.ones((len(images), max_h, max_w), dtype=torch.bool)
    for i, img in enumerate(images):
        padded[i, :, : img.shape[1], : img.shape[2]].copy_(img)
        mask[i, : img.shape[1], : img.shape[2]] = False
    return padded, mask, targets


def build_coco_dataset(root: str, split: str, transforms: Optional[Compose] = None) -> CocoDetection:
    """The dataset at `root/{split}/` + `root/annotations/instances_{split}.json`.

    This is COCO's own layout with split = "train2017" / "val2017", and the layout
    `python -m group_detr synth` writes with split = "train" / "val".
    """
    return CocoDetection(os.path.join(root, split),
                         os.path.join(root, "annotations", f"instances_{split}.json"), transforms)
