"""SetCriterion: Group DETR's losses (Conditional DETR's focal + L1 + GIoU, per decoder layer).

Every group of N queries is matched one-to-one to the ground truth, so each target has K
positives; the losses of all groups are summed and normalised by num_boxes * K (Group DETR,
Sec. 3.2), with num_boxes averaged over DDP processes so every rank uses the same scale.
The matching of all decoder layers (and all groups) is one GroupMatcher call: the layers are
stacked along the batch dimension, which the matcher treats as independent images.

Denoising (DINO's CDN, `group_detr.models.denoising`): the denoising queries need no matching,
each positive is supervised by the target it was made from (focal + L1 + GIoU), every other
denoising query (the contrastive negatives and the empty slots) by "no object" in the focal
loss, on every decoder layer, normalised by num_boxes * G for G denoising groups (DINO), and
added to the K groups' losses as loss_ce_dn, loss_bbox_dn, loss_giou_dn (and `_{i}`).
"""
import functools
import operator
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from group_detr.box_ops import box_cxcywh_to_xyxy, elementwise_generalized_box_iou
from group_detr.models.denoising import denoising_indices

LOSS_NAMES = ("loss_ce", "loss_bbox", "loss_giou")


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Summed focal loss (RetinaNet) of logits and one-hot targets of the same shape -> `()`."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.sum()


def layer_keys(name: str, num_decoder_layers: int) -> List[str]:
    """`name` for the last layer, then `name_{i}` for auxiliary layer i."""
    return [name] + [f"{name}_{i}" for i in range(num_decoder_layers - 1)]


def default_weight_dict(num_decoder_layers: int, cls: float = 2.0, bbox: float = 5.0,
                        giou: float = 2.0, denoising: bool = False) -> Dict[str, float]:
    """Loss weights of Conditional / Group DETR, repeated for the auxiliary layers; with
    denoising the same weights for the denoising losses (DINO)."""
    suffixes = ("", "_dn") if denoising else ("",)
    return {key: weight for suffix in suffixes for name, weight in zip(LOSS_NAMES, (cls, bbox, giou))
            for key in layer_keys(name + suffix, num_decoder_layers)}


class SetCriterion(nn.Module):
    """forward(outputs, targets) -> dict of unweighted losses; `weighted_sum` combines them.

    outputs: the detector's dict, `pred_logits` `(B, K*N, C)`, `pred_boxes` `(B, K*N, 4)` and
    optionally `aux_outputs`; K is read from the number of queries (K*N in training, N in eval).
    targets: list of B dicts with `labels` `(M_i,)` int64 and `boxes` `(M_i, 4)` cxcywh.
    Loss keys: loss_ce, loss_bbox, loss_giou for the last layer and loss_*_{i} for aux layer i;
    with `denoising=True` also loss_*_dn (and loss_*_dn_{i}) from `outputs["dn_outputs"]`, zero
    for a batch without targets (which has no denoising queries).

    The targets are validated once, by the matcher before matching (`GroupMatcher.validate`,
    the one knob): the criterion adds no check of its own. With a matcher built with
    validate=False and return_device=True, nothing in the criterion or the matcher
    synchronises with the host on CUDA (tests/test_no_sync.py).
    """

    def __init__(self, num_classes: int, matcher: nn.Module, weight_dict: Dict[str, float],
                 queries_per_group: int, focal_alpha: float = 0.25, focal_gamma: float = 2.0,
                 denoising: bool = False):
        super().__init__()
        self.denoising = denoising
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.queries_per_group = queries_per_group
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def num_groups_of(self, outputs: Dict) -> int:
        """K from the outputs' K*N queries and the criterion's N (`queries_per_group`)."""
        total_queries = outputs["pred_logits"].shape[1]
        if total_queries % self.queries_per_group:
            raise ValueError(f"{total_queries} queries are not a whole number of groups of {self.queries_per_group}")
        return total_queries // self.queries_per_group

    @staticmethod
    def num_boxes(targets: Sequence[Dict], device: Union[str, torch.device]) -> Tensor:
        """The number of target boxes, averaged over processes, at least 1."""
        # torch.full writes on the device; torch.tensor(x, device=cuda) would be a blocking copy.
        num_boxes = torch.full((), float(sum(len(t["labels"]) for t in targets)), device=device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(num_boxes)
            num_boxes = num_boxes / dist.get_world_size()
        return num_boxes.clamp(min=1.0)

    def normaliser(self, targets: Sequence[Dict], num_groups: int,
                   device: Union[str, torch.device]) -> Tensor:
        """num_boxes (averaged over processes, at least 1) * K."""
        return self.num_boxes(targets, device) * num_groups

    def layer_losses(self, outputs: Dict, targets: Sequence[Dict], indices: List[Tuple[Tensor, Tensor]],
                     normaliser: Tensor) -> Dict[str, Tensor]:
        logits, pred_boxes = outputs["pred_logits"], outputs["pred_boxes"]
        batch_idx = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(indices)]).to(logits.device)
        query_idx = torch.cat([q for q, _ in indices]).to(logits.device)
        target_labels = torch.cat([t["labels"][j.to(t["labels"].device)] for t, (_, j) in zip(targets, indices)])
        target_boxes = torch.cat([t["boxes"][j.to(t["boxes"].device)] for t, (_, j) in zip(targets, indices)])

        onehot = torch.zeros_like(logits)
        onehot[batch_idx, query_idx, target_labels.to(logits.device)] = 1.0
        loss_ce = sigmoid_focal_loss(logits, onehot, self.focal_alpha, self.focal_gamma) / normaliser

        matched_boxes = pred_boxes[batch_idx, query_idx]
        target_boxes = target_boxes.to(matched_boxes)
        loss_bbox = F.l1_loss(matched_boxes, target_boxes, reduction="sum") / normaliser
        giou = elementwise_generalized_box_iou(box_cxcywh_to_xyxy(matched_boxes), box_cxcywh_to_xyxy(target_boxes))
        loss_giou = (1 - giou).sum() / normaliser
        return {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def forward(self, outputs: Dict, targets: Sequence[Dict], num_groups: Optional[int] = None) -> Dict[str, Tensor]:
        if num_groups is None:
            num_groups = self.num_groups_of(outputs)
        layers = [outputs] + list(outputs.get("aux_outputs", []))
        # One matcher call for every layer: stack the layers as extra images.
        stacked = {
            "pred_logits": torch.cat([layer["pred_logits"] for layer in layers]).detach(),
            "pred_boxes": torch.cat([layer["pred_boxes"] for layer in layers]).detach(),
        }
        all_indices = self.matcher(stacked, list(targets) * len(layers), num_groups=num_groups)
        num_boxes = self.num_boxes(targets, outputs["pred_logits"].device)
        batch = len(targets)
        losses = self.all_layer_losses(
            layers, targets, [all_indices[i * batch:(i + 1) * batch] for i in range(len(layers))],
            num_boxes * num_groups, "")
        if self.denoising:
            losses.update(self.denoising_losses(outputs, targets, num_boxes, len(layers)))
        return losses

    def all_layer_losses(self, layers: Sequence[Dict], targets: Sequence[Dict],
                         indices: Sequence[List[Tuple[Tensor, Tensor]]], normaliser: Tensor,
                         suffix: str) -> Dict[str, Tensor]:
        """The three losses of every layer (the last first, then aux layer i as `_{i}`)."""
        losses = {}
        for i, (layer, layer_indices) in enumerate(zip(layers, indices)):
            layer_suffix = suffix if i == 0 else f"{suffix}_{i - 1}"
            for k, v in self.layer_losses(layer, targets, layer_indices, normaliser).items():
                losses[k + layer_suffix] = v
        return losses

    def denoising_losses(self, outputs: Dict, targets: Sequence[Dict], num_boxes: Tensor,
                         num_layers: int) -> Dict[str, Tensor]:
        """loss_*_dn of every layer: each positive against the target it was made from."""
        if "dn_outputs" not in outputs:  # a batch without targets has no denoising queries
            zero = outputs["pred_logits"].new_zeros(())
            return {key: zero for name in LOSS_NAMES for key in layer_keys(name + "_dn", num_layers)}
        dn_outputs, meta = outputs["dn_outputs"], outputs["dn_meta"]
        dn_layers = [dn_outputs] + list(dn_outputs.get("aux_outputs", []))
        indices = denoising_indices(meta, targets)
        return self.all_layer_losses(dn_layers, targets, [indices] * len(dn_layers),
                                     num_boxes * meta["num_groups"], "_dn")

    def weighted_sum(self, losses: Dict[str, Tensor]) -> Tensor:
        terms = [losses[k] * self.weight_dict[k] for k in losses if k in self.weight_dict]
        if not terms:
            raise ValueError(f"none of the losses {sorted(losses)} has a weight in weight_dict")
        return functools.reduce(operator.add, terms)
