"""The matching cost: class (focal or softmax) + L1 + GIoU between every query and every target.

One function, `match_cost`, writes the padded `(B, Q, M_max)` cost that GroupMatcher solves. The
torch path below is the reference; it reads only the logits at the target classes, so the
transcendental functions run on B*Q*M entries instead of B*Q*C.
"""
import torch
from torch import Tensor

from group_detr.box_ops import box_cxcywh_to_xyxy, generalized_box_iou

CLASS_COSTS = ("focal", "softmax")


def class_cost_torch(logits: Tensor, labels: Tensor, class_cost: str = "focal",
                     focal_alpha: float = 0.25, focal_gamma: float = 2.0) -> Tensor:
    """logits `(B, Q, C)`, labels `(B, M)` int64 -> class cost `(B, Q, M)`.

    focal: Deformable DETR's focal cost at the target class; softmax: DETR's -prob.
    """
    if class_cost == "softmax":
        prob = logits.softmax(-1)
        return -torch.gather(prob, 2, labels[:, None, :].expand(-1, prob.shape[1], -1))
    picked = torch.gather(logits, 2, labels[:, None, :].expand(-1, logits.shape[1], -1))
    prob = picked.sigmoid()
    neg = (1 - focal_alpha) * (prob**focal_gamma) * (-(1 - prob + 1e-8).log())
    pos = focal_alpha * ((1 - prob) ** focal_gamma) * (-(prob + 1e-8).log())
    return pos - neg


def match_cost_torch(logits: Tensor, pred_boxes: Tensor, labels: Tensor, tgt_boxes: Tensor,
                     cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                     class_cost: str = "focal", focal_alpha: float = 0.25,
                     focal_gamma: float = 2.0) -> Tensor:
    """The reference cost in float32 torch ops; arguments as `match_cost`."""
    pred_boxes = pred_boxes.float()
    tgt_boxes = tgt_boxes.to(pred_boxes.dtype)
    cost = cost_class * class_cost_torch(logits.float(), labels, class_cost, focal_alpha,
                                         focal_gamma)
    if cost_bbox:
        cost = cost + cost_bbox * torch.cdist(pred_boxes, tgt_boxes, p=1)
    if cost_giou:
        giou = generalized_box_iou(box_cxcywh_to_xyxy(pred_boxes), box_cxcywh_to_xyxy(tgt_boxes))
        cost = cost - cost_giou * giou
    return cost


def match_cost(logits: Tensor, pred_boxes: Tensor, labels: Tensor, tgt_boxes: Tensor,
               cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
               class_cost: str = "focal", focal_alpha: float = 0.25,
               focal_gamma: float = 2.0) -> Tensor:
    """Padded matching cost of every query against every target of its image.

    Args:
        logits: `(B, Q, C)` class logits (any float dtype; computed in float32).
        pred_boxes: `(B, Q, 4)` predicted boxes, normalised cxcywh.
        labels: `(B, M_max)` int64 target classes in [0, C) (padding rows hold a valid class).
        tgt_boxes: `(B, M_max, 4)` target boxes, cxcywh (padding rows hold a valid box).
        cost_class, cost_bbox, cost_giou: weights of the class, L1 and GIoU terms.
        class_cost: "focal" or "softmax".
        focal_alpha, focal_gamma: focal cost parameters.

    Returns: float32 `(B, Q, M_max)` cost.
    """
    return match_cost_torch(logits, pred_boxes, labels, tgt_boxes, cost_class, cost_bbox,
                            cost_giou, class_cost, focal_alpha, focal_gamma)
