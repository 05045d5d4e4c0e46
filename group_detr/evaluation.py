"""COCO evaluation: predictions of a model on a loader, their COCO result format, COCOeval.

pycocotools is imported only inside `coco_evaluate` (and by the COCO dataset), so the package
imports without it.
"""
import contextlib
import io
from typing import Dict, List, Tuple

import torch
from torch.utils.data import DataLoader

from group_detr import distributed
from group_detr.models.postprocess import PostProcess

COCO_STAT_NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
                   "AR_1", "AR_10", "AR_100", "AR_small", "AR_medium", "AR_large")


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
def predict(model: torch.nn.Module, loader: DataLoader, device: torch.device, num_select: int = 100
            ) -> Dict[int, Dict]:
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


def evaluate(model: torch.nn.Module, loader: DataLoader, dataset, device: torch.device
             ) -> Tuple[Dict[str, float], str, Dict[int, Dict]]:
    """COCO AP of `model` on `dataset` (a `CocoDetection`; every rank predicts its shard, rank 0
    scores all).

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
