"""Query denoising beside the K matching groups: DINO's contrastive denoising (CDN).

In training, every ground-truth box of a batch is copied into G *denoising groups*; in each
group it appears as a positive query (its box moved by a little noise, to be reconstructed) and,
with `contrastive=True`, as a negative query (moved by more noise, to be rejected as "no
object"). The queries' labels are randomly flipped too. The denoising queries run through the
decoder in front of the K*N matching queries:

    [ dn group 0 | ... | dn group G-1 | matching group 0 | ... | matching group K-1 ]

and each dn group is `group_size` slots: `max_targets` positive slots, then (contrastive)
`max_targets` negative slots, where `max_targets` is the largest target count in the batch;
an image with fewer targets leaves its last slots empty (zero content, zero box), as in DINO.
Dynamic groups (DINO): G = max(1, budget // max_targets) for a budget `denoising_queries`
(DINO's `dn_number`, default 100), so a batch of crowded images gets fewer groups. DINO's
attention mask (`QueryLayout(denoising_sees="all")`): matching queries never see denoising
queries, denoising groups never see each other, denoising queries see every matching query.

Noise (DINO): a label is replaced by a uniformly drawn class with probability
`label_noise_ratio / 2`; a box's corners (x0, y0, x1, y1) each move by `u * box_noise_scale *
(w/2 or h/2)` with a random sign and |u| in [0, 1) for positives, [1, 2) for negatives, and the
box is clipped to the image. With `box_noise_scale <= 1` a positive box stays a box around its
centre (each corner moves less than half the side).

How a denoising query enters a Conditional DETR decoder (which has no anchor boxes): its
content (the decoder's `tgt`, zeros for matching queries) is the embedding of its noised label;
its reference point (where Conditional DETR's box centres are predicted from) is the noised
box's centre; its positional query (a matching query's learned embedding) is an MLP of the sine
encoding of the noised (cx, cy, w, h), DAB-DETR's form. The box head is the matching queries'
own: centre offsets from the reference point, sizes predicted whole.

What is not DINO's: the budget rule above is DINO's only for budgets >= 50 (DINO takes a smaller
`dn_number` as a fixed group count; here the budget rule holds for every budget), and
`contrastive=False` (DN-DETR's positives-only task, with DINO's positive noise) is an option
DINO does not have.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from group_detr.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from group_detr.config import check_denoising_settings
from group_detr.layout import QueryLayout
from group_detr.models.transformer import MLP, sine_embed_of_points

INVERSE_SIGMOID_EPS = 1e-3  # DINO's clamp before the logit of a box coordinate


def inverse_sigmoid(x: Tensor, eps: float = INVERSE_SIGMOID_EPS) -> Tensor:
    """logit(x) with x clipped to [0, 1] and both x and 1 - x to >= eps (DINO's)."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def denoising_group_count(budget: int, max_targets: int) -> int:
    """G = max(1, budget // max_targets): how many denoising groups a batch gets (0 without
    targets)."""
    if max_targets == 0:
        return 0
    return max(1, budget // max_targets)


@dataclass
class DenoisingQueries:
    """One batch's denoising queries, batch-first.

    content `(B, D, d)`, query_pos `(B, D, d)`, reference_unsigmoid `(B, D, 2)`, and the noised
    `labels` `(B, D)` int64 (-1 in empty slots) and `boxes` `(B, D, 4)` cxcywh (zeros in empty
    slots), with D = num_groups * group_size.
    """

    content: Tensor
    query_pos: Tensor
    reference_unsigmoid: Tensor
    labels: Tensor
    boxes: Tensor
    num_groups: int
    max_targets: int
    contrastive: bool

    @property
    def group_size(self) -> int:
        return self.max_targets * (2 if self.contrastive else 1)

    @property
    def num_queries(self) -> int:
        return self.num_groups * self.group_size

    def layout(self, num_groups: int, queries_per_group: int) -> QueryLayout:
        """The decoder's layout: these queries as a prefix before K groups of N (DINO's mask)."""
        return QueryLayout(num_groups=num_groups, queries_per_group=queries_per_group,
                           num_denoising=self.num_queries, denoising_groups=self.num_groups,
                           denoising_sees="all")

    def meta(self) -> Dict[str, int]:
        """What the criterion needs to find the positives (plain ints, DDP-safe)."""
        return {"num_groups": self.num_groups, "max_targets": self.max_targets,
                "group_size": self.group_size}


def positive_slots(meta: Dict[str, int], num_targets: int) -> Tensor:
    """int64 `(G * num_targets,)`: the denoising slots holding an image's positives, group by
    group; target t of group g sits in slot g * group_size + t."""
    starts = torch.arange(meta["num_groups"]) * meta["group_size"]
    return (starts[:, None] + torch.arange(num_targets)[None, :]).flatten()


def denoising_indices(meta: Dict[str, int], targets: Sequence[Dict]) -> List[Tuple[Tensor, Tensor]]:
    """Per image, (denoising slot, target index) of every positive: GroupMatcher's output format,
    so the criterion's losses take them unchanged. Negatives and empty slots are "no object"."""
    indices = []
    for target in targets:
        num_targets = len(target["labels"])
        target_idx = torch.arange(num_targets).repeat(meta["num_groups"])
        indices.append((positive_slots(meta, num_targets), target_idx))
    return indices


class ContrastiveDenoising(nn.Module):
    """Makes a batch's denoising queries from its targets: forward(targets, batch_size)
    -> DenoisingQueries, or None when the batch has no target at all (nothing to denoise).

    Args:
        num_classes: labels are in [0, num_classes).
        hidden_dim: d of the decoder.
        denoising_queries: DINO's `dn_number`, the budget: G = max(1, budget // max targets).
        label_noise_ratio: twice the probability that a label is replaced, in [0, 1] (DINO 0.5).
        box_noise_scale: corner noise in units of half the box side, in [0, 1] (DINO 1.0 in
            its training commands, 0.4 in its config file).
        contrastive: add the negative queries (DINO); False: positives only (DN-DETR's task).
    """

    def __init__(self, num_classes: int, hidden_dim: int, denoising_queries: int = 100,
                 label_noise_ratio: float = 0.5, box_noise_scale: float = 1.0,
                 contrastive: bool = True):
        super().__init__()
        check_denoising_settings(denoising_queries, label_noise_ratio, box_noise_scale, "")
        if denoising_queries < 1:
            raise ValueError(f"denoising_queries must be >= 1 to build denoising, got {denoising_queries}")
        self.num_classes = num_classes
        self.hidden_dim = hidden_dim
        self.denoising_queries = denoising_queries
        self.label_noise_ratio = label_noise_ratio
        self.box_noise_scale = box_noise_scale
        self.contrastive = contrastive
        self.label_embed = nn.Embedding(num_classes, hidden_dim)
        # sine(cx, cy) and sine(w, h), d each -> the positional query (DAB-DETR's ref_point_head)
        self.pos_head = MLP(2 * hidden_dim, hidden_dim, hidden_dim, 2)

    def forward(self, targets: Sequence[Dict], batch_size: int) -> Optional[DenoisingQueries]:
        if len(targets) != batch_size:
            raise ValueError(f"denoising needs one target dict per image: {batch_size} images, "
                             f"{len(targets)} targets")
        counts = [len(t["labels"]) for t in targets]
        max_targets = max(counts, default=0)
        if max_targets == 0:
            return None
        device = self.label_embed.weight.device
        num_groups = denoising_group_count(self.denoising_queries, max_targets)
        copies = 2 if self.contrastive else 1  # positives (and negatives) per group
        # every target once per (group, copy); copy 1 is the negative
        labels = torch.cat([t["labels"] for t in targets]).to(device=device, dtype=torch.long)
        boxes = torch.cat([t["boxes"] for t in targets]).to(device=device, dtype=torch.float32)
        image = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(counts)]).to(device)
        rank = torch.cat([torch.arange(n) for n in counts]).to(device)  # index within its image
        num_copies = num_groups * copies
        copy = torch.arange(num_copies, device=device).repeat_interleave(len(labels))
        labels, boxes = labels.repeat(num_copies), boxes.repeat(num_copies, 1)
        image, rank = image.repeat(num_copies), rank.repeat(num_copies)

        labels = self._noised_labels(labels)
        boxes = self._noised_boxes(boxes, negative=(copy % copies) == 1)
        slot = copy * max_targets + rank  # group g's copy c starts at (g * copies + c) * max_targets

        num_slots = num_groups * copies * max_targets
        slot_labels = torch.full((batch_size, num_slots), -1, dtype=torch.long, device=device)
        slot_boxes = torch.zeros(batch_size, num_slots, 4, device=device)
        slot_labels[image, slot] = labels
        slot_boxes[image, slot] = boxes
        content = torch.zeros(batch_size, num_slots, self.hidden_dim, device=device)
        content[image, slot] = self.label_embed(labels)
        return DenoisingQueries(
            content=content, query_pos=self.positional_query(slot_boxes),
            reference_unsigmoid=inverse_sigmoid(slot_boxes[..., :2]), labels=slot_labels,
            boxes=slot_boxes, num_groups=num_groups, max_targets=max_targets,
            contrastive=self.contrastive)

    def positional_query(self, boxes: Tensor) -> Tensor:
        """`(..., 4)` cxcywh -> `(..., d)`: an MLP of the boxes' sine encoding."""
        sine = torch.cat((sine_embed_of_points(boxes[..., :2], self.hidden_dim),
                          sine_embed_of_points(boxes[..., 2:], self.hidden_dim)), dim=-1)
        return self.pos_head(sine)

    def _noised_labels(self, labels: Tensor) -> Tensor:
        if self.label_noise_ratio == 0:
            return labels
        flip = torch.rand(labels.shape, device=labels.device) < self.label_noise_ratio * 0.5
        random_labels = torch.randint_like(labels, 0, self.num_classes)
        return torch.where(flip, random_labels, labels)

    def _noised_boxes(self, boxes: Tensor, negative: Tensor) -> Tensor:
        """DINO's corner noise: positives |u| < 1, negatives 1 <= |u| < 2, in half sides."""
        if self.box_noise_scale == 0:
            return boxes
        corners = box_cxcywh_to_xyxy(boxes)
        half_sides = boxes[:, 2:].repeat(1, 2) / 2
        sign = torch.randint(0, 2, corners.shape, device=boxes.device).to(corners.dtype) * 2 - 1
        magnitude = torch.rand(corners.shape, device=boxes.device) + negative[:, None].to(corners.dtype)
        corners = (corners + sign * magnitude * half_sides * self.box_noise_scale).clamp(0, 1)
        # a negative's corners may cross: its size is then 0 (DINO clips it there too, in the
        # logit of its box)
        noised = box_xyxy_to_cxcywh(corners)
        return torch.cat((noised[:, :2], noised[:, 2:].clamp(min=0)), dim=1)

