"""PostProcess: the model's normalised outputs -> scored boxes in original image pixels."""
from typing import Dict, List

import torch
from torch import Tensor, nn

from group_detr.box_ops import box_cxcywh_to_xyxy


class PostProcess(nn.Module):
    """Top-k (query, class) pairs by sigmoid score, as Conditional / Deformable DETR.

    A query may appear with several classes; COCO AP rewards this because each (box, class)
    pair is ranked on its own. forward(outputs, target_sizes `(B, 2)` as (h, w)) -> list of B
    dicts with `scores` `(k,)`, `labels` `(k,)` int64 and `boxes` `(k, 4)` xyxy pixels.
    """

    def __init__(self, num_select: int = 100):
        super().__init__()
        self.num_select = num_select

    @torch.no_grad()
    def forward(self, outputs: Dict, target_sizes: Tensor) -> List[Dict[str, Tensor]]:
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if target_sizes.shape != (logits.shape[0], 2):
            raise ValueError(f"target_sizes must be (B, 2), got {tuple(target_sizes.shape)} for B={logits.shape[0]}")
        batch, num_queries, num_classes = logits.shape
        prob = logits.sigmoid().flatten(1)
        k = min(self.num_select, prob.shape[1])
        scores, flat_idx = prob.topk(k, dim=1)
        query_idx = torch.div(flat_idx, num_classes, rounding_mode="floor")
        labels = flat_idx % num_classes
        boxes = torch.gather(box_cxcywh_to_xyxy(boxes), 1, query_idx.unsqueeze(-1).expand(-1, -1, 4))
        img_h, img_w = target_sizes.to(boxes.dtype).unbind(1)
        boxes = boxes * torch.stack((img_w, img_h, img_w, img_h), dim=1)[:, None, :]
        return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, boxes)]
