"""The matching cost: class (focal or softmax) + L1 + GIoU between every query and every target.

One function, `match_cost`, writes the padded `(B, Q, M_max)` cost that GroupMatcher solves, by
one of two backends:

- "torch": the reference, torch ops (any device, float32). It reads only the logits at the
  target classes, so the transcendental functions run on B*Q*M entries instead of B*Q*C.
- "fused": the extension's `group_detr::match_cost` op (csrc/cost, CPU): one pass from the
  inputs to the cost, 16 queries per block (AVX-512 or AVX2 where the CPU has it), the class
  term once per (query, distinct target class), blocks of queries over the intra-op threads, no
  temporaries. Its sigmoid and log-sigmoid run the algorithms torch's vectorised CPU kernels run
  (Sleef's exp and log1p), so the sigmoid, the "focal_logsigmoid" cost, L1 and GIoU are torch's
  bits. The "focal" cost's log is its own: torch's `Tensor.log` on x86-64 is MKL's, which no
  other code reproduces (0.5% of the cost entries are then 1 ulp off); so are the softmax
  (another summation order) and p^gamma for a gamma other than 2 (torch: Sleef's powf). README
  "Exact ties" says what that means for indices.

"auto" takes "fused" for CPU tensors when it is built and no gradient is asked for, else "torch".
"""
import torch
import torch.nn.functional as F
from torch import Tensor

from group_detr import _ext
from group_detr.box_ops import box_cxcywh_to_xyxy, generalized_box_iou

CLASS_COSTS = ("focal", "focal_logsigmoid", "softmax")
COST_BACKENDS = ("auto", "torch", "fused")
_VECTOR_LOOP_MULTIPLE = 64  # a multiple of every CPU vector loop's step (2 vectors of 8 or 16)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def class_cost_torch(logits: Tensor, labels: Tensor, class_cost: str = "focal",
                     focal_alpha: float = 0.25, focal_gamma: float = 2.0) -> Tensor:
    """logits `(B, Q, C)`, labels `(B, M)` int64 -> class cost `(B, Q, M)`.

    focal: Deformable DETR's focal cost at the target class, with log(p + 1e-8) (DETR-family
    code up to LW-DETR); focal_logsigmoid: the same cost with log p and log(1 - p) as
    logsigmoid(x) and logsigmoid(-x) (RF-DETR since 2025: finite and exact for wide logits,
    where the 1e-8 floor caps -log p at 18.4 and changes which query is cheapest);
    softmax: DETR's -prob.
    """
    if class_cost == "softmax":
        prob = logits.softmax(-1)
        return -torch.gather(prob, 2, labels[:, None, :].expand(-1, prob.shape[1], -1))
    picked = torch.gather(logits, 2, labels[:, None, :].expand(-1, logits.shape[1], -1))
    shape, count = picked.shape, picked.numel()
    picked = picked.reshape(-1)
    if picked.device.type == "cpu" and count % _VECTOR_LOOP_MULTIPLE:
        # torch's CPU loops take the last count % 16 (AVX2) or 32 (AVX-512) elements through
        # libm's exp rather than Sleef's, other last bits in ~4% of them: padded, every entry
        # gets the vector loop's bits, as the fused op's do and most of a client's (B*Q, C)
        # cost's (for ties: README "Exact ties"). Thread chunks of a large tensor may still end
        # off the multiple.
        picked = torch.cat([picked, picked.new_zeros(_VECTOR_LOOP_MULTIPLE - count % _VECTOR_LOOP_MULTIPLE)])
    prob = picked.sigmoid()
    if class_cost == "focal_logsigmoid":
        log_prob, log_not_prob = F.logsigmoid(picked), F.logsigmoid(-picked)
    else:
        log_prob, log_not_prob = (prob + 1e-8).log(), (1 - prob + 1e-8).log()
    neg = (1 - focal_alpha) * (prob**focal_gamma) * (-log_not_prob)
    pos = focal_alpha * ((1 - prob) ** focal_gamma) * (-log_prob)
    return (pos - neg)[:count].view(shape)


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


def resolve_cost_backend(backend: str, *tensors: Tensor) -> str:
    """"torch" or "fused" for these inputs; ValueError for an unknown or unusable backend."""
    if backend not in COST_BACKENDS:
        raise ValueError(f"cost backend must be one of {COST_BACKENDS}, got {backend!r}")
    fused_ok = (
        _ext.has_match_cost_cpu()
        and all(t.device.type == "cpu" for t in tensors)
        and all(t.dtype in _FLOAT_DTYPES for t in tensors[:2])
    )
    if backend == "fused" and not fused_ok:
        raise ValueError(
            "cost backend 'fused' needs the built extension (group_detr._C) and float CPU "
            f"tensors; extension built: {_ext.has_match_cost_cpu()}, devices: "
            f"{sorted({str(t.device) for t in tensors})}, dtypes: "
            f"{[str(t.dtype) for t in tensors[:2]]}"
        )
    if backend == "auto":
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors[:2])
        return "fused" if fused_ok and not grad else "torch"
    return backend


def match_cost(logits: Tensor, pred_boxes: Tensor, labels: Tensor, tgt_boxes: Tensor,
               cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
               class_cost: str = "focal", focal_alpha: float = 0.25,
               focal_gamma: float = 2.0, num_targets=None, backend: str = "auto") -> Tensor:
    """Padded matching cost of every query against every target of its image.

    Args:
        logits: `(B, Q, C)` class logits (any float dtype; computed in float32).
        pred_boxes: `(B, Q, 4)` predicted boxes, normalised cxcywh.
        labels: `(B, M_max)` int64 target classes in [0, C) (padding rows hold a valid class).
        tgt_boxes: `(B, M_max, 4)` target boxes, cxcywh (padding rows hold a valid box).
        cost_class, cost_bbox, cost_giou: weights of the class, L1 and GIoU terms (a zero L1 or
            GIoU weight skips its term).
        class_cost: "focal" (Deformable DETR, DINO, LW-DETR), "focal_logsigmoid" (RF-DETR)
            or "softmax" (DETR: -prob); see `class_cost_torch`.
        focal_alpha, focal_gamma: focal cost parameters.
        num_targets: optional B ints, the valid targets M_i per image. The fused op then
            computes only image i's first M_i columns and leaves the padding at 0 (the solver
            never reads it); the torch path computes every column.
        backend: "auto", "torch" (the reference) or "fused" (the C++ op, CPU; no gradient).

    Returns: float32 `(B, Q, M_max)` cost.
    """
    if class_cost not in CLASS_COSTS:
        raise ValueError(f"class_cost must be one of {CLASS_COSTS}, got {class_cost!r}")
    if resolve_cost_backend(backend, logits, pred_boxes, labels, tgt_boxes) == "fused":
        return torch.ops.group_detr.match_cost(
            logits, pred_boxes, labels, tgt_boxes, float(cost_class), float(cost_bbox),
            float(cost_giou), class_cost, float(focal_alpha), float(focal_gamma),
            None if num_targets is None else [int(m) for m in num_targets])
    return match_cost_torch(logits, pred_boxes, labels, tgt_boxes, cost_class, cost_bbox,
                            cost_giou, class_cost, focal_alpha, focal_gamma)
