"""The public way of Group DETR matching, kept as the reference for tests and benchmarks.

This is how Conditional DETR's GroupDETR branch, LW-DETR and RF-DETR match: DETR's batch-wide
`(B*K*N, sum M)` cost, one copy to the host, then scipy once per group per image from a Python
loop. GroupMatcher must give the same total cost per group (and the same indices where the
optimum is unique); the benchmarks measure it against this.
"""
import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from group_detr.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from group_detr.match_cost import CLASS_COSTS


class ReferenceGroupMatcher(nn.Module):
    """Same arguments and return format as `GroupMatcher` (its three class costs: "focal" as
    LW-DETR computes it, "focal_logsigmoid" as RF-DETR does, "softmax" as DETR does)."""

    def __init__(self, cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, num_groups=1,
                 class_cost="focal", focal_alpha=0.25, focal_gamma=2.0):
        super().__init__()
        if class_cost not in CLASS_COSTS:
            raise ValueError(f"class_cost must be one of {CLASS_COSTS}, got {class_cost!r}")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.num_groups, self.class_cost = num_groups, class_cost
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    @torch.no_grad()
    def cost_matrix(self, outputs, targets):
        """DETR's batch-wide cost `(B, K*N, sum M)` on the outputs' device."""
        bs, total_queries = outputs["pred_logits"].shape[:2]  # K*N
        logits = outputs["pred_logits"].flatten(0, 1).float()
        out_bbox = outputs["pred_boxes"].flatten(0, 1).float()
        tgt_ids = torch.cat([v["labels"] for v in targets])
        tgt_bbox = torch.cat([v["boxes"] for v in targets]).float()
        if self.class_cost in ("focal", "focal_logsigmoid"):
            out_prob = logits.sigmoid()
            alpha, gamma = self.focal_alpha, self.focal_gamma
            if self.class_cost == "focal":
                log_prob, log_not_prob = (out_prob + 1e-8).log(), (1 - out_prob + 1e-8).log()
            else:
                log_prob, log_not_prob = F.logsigmoid(logits), F.logsigmoid(-logits)
            neg = (1 - alpha) * (out_prob**gamma) * (-log_not_prob)
            pos = alpha * ((1 - out_prob) ** gamma) * (-log_prob)
            cost_class = pos[:, tgt_ids] - neg[:, tgt_ids]
        else:
            cost_class = -logits.softmax(-1)[:, tgt_ids]
        cost_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(out_bbox), box_cxcywh_to_xyxy(tgt_bbox))
        cost = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        return cost.view(bs, total_queries, -1)

    @torch.no_grad()
    def forward(self, outputs, targets, num_groups=None, group_detr=None):
        num_groups = num_groups or group_detr or self.num_groups
        cost = self.cost_matrix(outputs, targets).cpu()
        sizes = [len(v["boxes"]) for v in targets]
        queries_per_group = cost.shape[1] // num_groups
        indices = [(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)) for _ in targets]
        for g, cost_g in enumerate(cost.split(queries_per_group, dim=1)):
            for i, c in enumerate(cost_g.split(sizes, -1)):
                rows, cols = linear_sum_assignment(c[i])
                indices[i] = (
                    np.concatenate([indices[i][0], rows + g * queries_per_group]),
                    np.concatenate([indices[i][1], cols]),
                )
        return [
            (torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64))
            for i, j in indices
        ]
