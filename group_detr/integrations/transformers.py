"""GroupMatcher behind Hugging Face transformers' matcher interface.

transformers' DETR-family losses build their matcher inside the loss function, by class name:

  * `loss_for_object_detection.HungarianMatcher` (softmax class cost): DETR, and every model
    whose loss is `ForObjectDetectionLoss` / `ForSegmentationLoss`;
  * `loss_deformable_detr.DeformableDetrHungarianMatcher` (focal class cost): Deformable DETR,
    Conditional DETR, DAB-DETR;
  * `loss_lw_detr.LwDetrHungarianMatcher` (focal, K = `config.group_detr` passed at call time):
    LW-DETR and RF-DETR's detection models (Group DETR training).

One line makes all of them match with GroupMatcher (same indices, one batched solver call for
all images and groups instead of one scipy call per image and group):

    from group_detr.integrations.transformers import use_group_matcher; use_group_matcher()

or, for one kind only, assign a class of this module to the name in its transformers module, e.g.
`transformers.loss.loss_lw_detr.LwDetrHungarianMatcher = LwDetrHungarianMatcher`.

The classes take transformers' constructor (`class_cost`, `bbox_cost`, `giou_cost`: the cost
weights) plus `num_groups` (K, default 1) and `backend`; their call takes transformers' keys
(`logits`, `pred_boxes`; targets' `class_labels`, `boxes`) and an optional `group_detr` (K for
this call, LW-DETR's argument). Non-finite costs are handled as transformers does: NaN and +-inf
become the float32 maximum and the matching goes on (`hf_nan_to_num`); the cost is computed in
float32 (transformers: in the outputs' dtype, which is the same for float32 outputs).

Differences that remain: bad targets raise ValueError/TypeError (a class id outside the logits,
a degenerate or non-finite box) where transformers raises IndexError or AssertionError or
matches silently.
RF-DETR's instance-segmentation matcher (`RfDetrHungarianMatcher`, with mask costs) is not
replaced: use `GroupMatcher(cost_mask=..., cost_dice=..., mask_point_sample_ratio=...)`.
"""
import importlib

import torch
from torch import Tensor, nn

from group_detr.matcher import GroupMatcher


def hf_nan_to_num(cost: Tensor) -> Tensor:
    """transformers' rule for non-finite matching costs: NaN, +inf and -inf become the dtype's
    largest finite value, so that such pairs are matched only if nothing else can be."""
    largest = torch.finfo(cost.dtype).max
    return torch.nan_to_num(cost, nan=largest, posinf=largest, neginf=largest)


class HungarianMatcher(nn.Module):
    """transformers' `HungarianMatcher` (DETR: class cost -softmax probability) on GroupMatcher.

    Args:
        class_cost, bbox_cost, giou_cost: weights of the class, L1 box and GIoU costs
            (transformers' names and defaults).
        num_groups: K groups of queries matched one-to-one each (Group DETR); 1 = DETR.
        backend: the solver backend (`group_detr.linear_sum_assignment`).

    forward(outputs, targets, group_detr=None) -> list of B `(query_idx, target_idx)` int64 CPU
    tensors, query_idx ascending, as transformers returns them.
    """

    class_cost_type = "softmax"

    def __init__(self, class_cost: float = 1.0, bbox_cost: float = 1.0, giou_cost: float = 1.0,
                 num_groups: int = 1, backend: str = "auto"):
        super().__init__()
        self.group_matcher = GroupMatcher(cost_class=class_cost, cost_bbox=bbox_cost,
                                          cost_giou=giou_cost, num_groups=num_groups,
                                          class_cost=self.class_cost_type, backend=backend)

    @property
    def class_cost(self) -> float:
        return self.group_matcher.cost_class

    @property
    def bbox_cost(self) -> float:
        return self.group_matcher.cost_bbox

    @property
    def giou_cost(self) -> float:
        return self.group_matcher.cost_giou

    @torch.no_grad()
    def forward(self, outputs, targets, group_detr=None):
        cost, sizes = self.group_matcher.cost_matrix(outputs, targets)
        return self.group_matcher.assign(hf_nan_to_num(cost), sizes, group_detr)


class DeformableDetrHungarianMatcher(HungarianMatcher):
    """transformers' `DeformableDetrHungarianMatcher` (focal class cost, alpha 0.25, gamma 2)."""

    class_cost_type = "focal"


# LW-DETR's matcher is Deformable DETR's with K passed at call time: forward(outputs, targets,
# group_detr), which HungarianMatcher.forward already takes.
LwDetrHungarianMatcher = DeformableDetrHungarianMatcher

# (transformers module, class name, replacement) for use_group_matcher.
REPLACEMENTS = (
    ("transformers.loss.loss_for_object_detection", "HungarianMatcher", HungarianMatcher),
    ("transformers.loss.loss_deformable_detr", "DeformableDetrHungarianMatcher", DeformableDetrHungarianMatcher),
    ("transformers.loss.loss_lw_detr", "LwDetrHungarianMatcher", LwDetrHungarianMatcher),
)


def use_group_matcher():
    """Make transformers' DETR-family losses build GroupMatcher-backed matchers (REPLACEMENTS).

    Returns a function that puts transformers' own matchers back. Loss modules missing from the
    installed transformers version are skipped.
    """
    originals = []
    for module_name, name, replacement in REPLACEMENTS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if hasattr(module, name):
            originals.append((module, name, getattr(module, name)))
            setattr(module, name, replacement)

    def restore():
        for module, name, original in originals:
            setattr(module, name, original)

    return restore
