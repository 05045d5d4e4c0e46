"""Box conversions and pairwise (generalized) IoU.

Every pairwise function accepts leading batch dimensions: boxes1 `(..., N, 4)` and boxes2
`(..., M, 4)` give `(..., N, M)`, so that the matcher can build one padded cost per image and
group instead of DETR's batch-wide `(B*N, sum M)` product.
"""
import torch
from torch import Tensor


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack(((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0), dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """boxes `(..., 4)` xyxy -> `(...)`."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _pairwise_corners(boxes1: Tensor, boxes2: Tensor):
    """Coordinates as `(..., N, 1)` and `(..., 1, M)` columns: pairwise maxima and minima of
    these broadcast straight into contiguous `(..., N, M)` results, where DETR's
    `(..., N, M, 2)` form strides through interleaved x/y pairs."""
    return [c.unsqueeze(-1) for c in boxes1.unbind(-1)], [c.unsqueeze(-2) for c in boxes2.unbind(-1)]


def box_iou(boxes1: Tensor, boxes2: Tensor):
    """Pairwise IoU of xyxy boxes `(..., N, 4)`, `(..., M, 4)` -> (iou, union), each `(..., N, M)`."""
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = _pairwise_corners(boxes1, boxes2)
    inter_w = (torch.minimum(ax1, bx1) - torch.maximum(ax0, bx0)).clamp_(min=0)
    inter_h = (torch.minimum(ay1, by1) - torch.maximum(ay0, by0)).clamp_(min=0)
    inter = inter_w.mul_(inter_h)
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    return inter / union, union


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise generalized IoU (Rezatofighi et al. 2019) of xyxy boxes -> `(..., N, M)`.

    Boxes must be well formed (x1 >= x0, y1 >= y0); callers validate targets once up front
    (`check_boxes`) rather than on every call.
    """
    iou, union = box_iou(boxes1, boxes2)
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = _pairwise_corners(boxes1, boxes2)
    hull_w = (torch.maximum(ax1, bx1) - torch.minimum(ax0, bx0)).clamp_(min=0)
    hull_h = (torch.maximum(ay1, by1) - torch.minimum(ay0, by0)).clamp_(min=0)
    hull = hull_w.mul_(hull_h)
    return iou - (hull - union) / hull


def elementwise_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """GIoU of matched pairs: xyxy `(..., 4)` and `(..., 4)` -> `(...)` (the loss, not the cost)."""
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    lt = torch.max(boxes1[..., :2], boxes2[..., :2])
    rb = torch.min(boxes1[..., 2:], boxes2[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1 + area2 - inter
    iou = inter / union
    lt = torch.min(boxes1[..., :2], boxes2[..., :2])
    rb = torch.max(boxes1[..., 2:], boxes2[..., 2:])
    wh = (rb - lt).clamp(min=0)
    area = wh[..., 0] * wh[..., 1]
    return iou - (area - union) / area


def check_boxes(boxes: Tensor, name: str = "boxes") -> None:
    """Raise ValueError unless `boxes` `(..., 4)` cxcywh are finite with non-negative width/height.

    Degenerate boxes make GIoU divide by zero and silently poison the matching cost.
    """
    if boxes.shape[-1:] != (4,):
        raise ValueError(f"{name} must have shape (..., 4) in cxcywh, got {tuple(boxes.shape)}")
    if boxes.numel() == 0:
        return
    if not torch.isfinite(boxes).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    if (boxes[..., 2:] < 0).any():
        raise ValueError(f"{name} contain a box with negative width or height (degenerate box)")
