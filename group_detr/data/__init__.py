"""Detection data: COCO-format datasets through pycocotools, DETR's transforms, synthetic shapes."""
from group_detr.data.coco import CocoDetection, build_coco_dataset, collate_fn, load_coco_annotations
from group_detr.data.synthetic import (CLASS_NAMES, ensure_synthetic_dataset, synthetic_dataset_exists,
                                       write_synthetic_dataset)
from group_detr.data.transforms import make_detr_transforms

__all__ = [
    "CocoDetection", "build_coco_dataset", "collate_fn", "load_coco_annotations",
    "CLASS_NAMES", "ensure_synthetic_dataset", "synthetic_dataset_exists", "write_synthetic_dataset", "make_detr_transforms",
]
