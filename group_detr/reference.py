"""The public way of Group DETR matching, kept as the reference for tests and benchmarks.

This is how Conditional DETR's GroupDETR branch, LW-DETR and RF-DETR match: DETR's batch-wide
`(B*K*N, sum M)` cost, one copy to the host, then scipy once per group per image from a Python
loop. GroupMatcher must give the same total cost per group (and the same indices where the
optimum is unique); the benchmarks measure it against this.
"""
import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from group_detr.box_ops import box_cxcywh_to_xyxy, generalized_box_iou


class ReferenceGroupMatcher(nn.Module):
    """Same arguments and return format as `GroupMatcher` (focal or softmax class cost)."""

    def __init__(self, cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, num_groups=1,
                 class_cost="focal", focal_alpha=0.25, focal_gamma=2.0):
        super().__init__()
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
        if self.class_cost == "focal":
            out_prob = logits.sigmoid()
            alpha, gamma = self.focal_alpha, self.focal_gamma
            neg = (1 - alpha) * (out_prob**gamma) * (-(1 - out_prob + 1e-8).log())
            pos = alpha * ((1 - out_prob) ** gamma) * (-(out_prob + 1e-8).log())
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
