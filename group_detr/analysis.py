"""Group DETR's query analysis (paper Sec. 3.3): perturbation distance PD, matching distance MD,
and the picture of every group's query positions (Figure 3).

Positions (Sec. 3.3.1). A query's position P(q) is its normalised reference point (Conditional
DETR), `GroupDETR.reference_points()`: (x, y) in [0, 1], a function of the learned query
embedding only, not of the image. Group g's queries are the slice [g*N, (g+1)*N).

PD (eq. 6) is pure geometry between groups: "the average distance between object queries from
one group to the closest object queries from the other group". For two groups,

    PD = 1/(2N) * sum_i ( ||P(q_i^1) - P(NN_2(q_i^1))|| + ||P(q_i^2) - P(NN_1(q_i^2))|| ),

NN_h(q) being the query of group h closest to q. With d(g -> h) = the mean over the N queries of
group g of the distance to the nearest query of group h, that is (d(1 -> 2) + d(2 -> 1)) / 2.
For K > 2 groups: PD = the mean of d(g -> h) over the K(K-1) ordered pairs g != h, and PD_first
the mean over the 2(K-1) ordered pairs that include the first group (the one kept at
inference). Undefined (NaN) for K = 1.

MD (eq. 7): "the average distance between object queries in one group and object queries from
other groups that match with the same gt object". With sigma_g(j) the query of group g that the
training matcher (`GroupMatcher`, the focal/L1/GIoU costs) assigns to gt object j on the model's
predictions, for two groups MD = 1/M sum_j ||P(q_sigma_1(j)) - P(q_sigma_2(j))||; for K > 2
the mean over images, objects and ordered pairs of different groups (MD_first: the pairs that
include the first group). NaN for K = 1.

The paper finds MD well above PD: a gt object is matched to queries from different regions
in different groups, although the groups' positions are spread alike.
"""
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from group_detr.matcher import GroupMatcher


def query_positions(model) -> Tensor:
    """Every group's query positions `(K, N, 2)` (normalised reference points) of a GroupDETR."""
    with torch.no_grad():
        points = model.reference_points()
    return points.detach().view(model.num_groups, model.num_queries, 2)


def _pair_mask(num_groups: int, first_only: bool) -> Tensor:
    """`(K, K)` bool: the ordered pairs (g, h), g != h, to average over."""
    mask = ~torch.eye(num_groups, dtype=torch.bool)
    if first_only:
        first = torch.zeros(num_groups, num_groups, dtype=torch.bool)
        first[0, :] = first[:, 0] = True
        mask &= first
    return mask


def nearest_query_distances(positions: Tensor) -> Tensor:
    """`(K, K)`: entry (g, h) is d(g -> h), the mean over group g's queries of the distance to
    the nearest query of group h (positions `(K, N, 2)`; the diagonal is 0)."""
    if positions.dim() != 3 or positions.shape[-1] != 2:
        raise ValueError(f"positions must be (K, N, 2), got {tuple(positions.shape)}")
    num_groups, num_queries, _ = positions.shape
    flat = positions.reshape(num_groups * num_queries, 2).double()
    dist = torch.cdist(flat, flat).view(num_groups, num_queries, num_groups, num_queries)
    return dist.min(dim=3).values.mean(dim=1)  # (g, i, h) -> min over h's queries -> mean over i


def perturbation_distance(positions: Tensor, first_only: bool = False) -> float:
    """PD (eq. 6) of query positions `(K, N, 2)`: the mean of d(g -> h) over ordered pairs of
    different groups (first_only: the pairs that include group 0). NaN for K = 1."""
    num_groups = positions.shape[0]
    if num_groups < 2:
        return float("nan")
    return float(nearest_query_distances(positions)[_pair_mask(num_groups, first_only)].mean())


def matched_positions(outputs: Dict, targets: Sequence[Dict], matcher: GroupMatcher, num_groups: int,
                      queries_per_group: int) -> List[Tensor]:
    """Per image: `(K, M_i, 2)` position of the query of each group matched to each gt object
    (NaN where a group leaves an object unmatched).

    outputs: pred_logits `(B, K*N, C)`, pred_boxes `(B, K*N, 4)` and reference_points `(K*N, 2)`.
    """
    indices = matcher({"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]},
                      list(targets), num_groups=num_groups)
    points = outputs["reference_points"].detach().cpu()
    result = []
    for (query_idx, target_idx), target in zip(indices, targets):
        positions = torch.full((num_groups, len(target["labels"]), 2), float("nan"), dtype=points.dtype)
        query_idx, target_idx = query_idx.cpu(), target_idx.cpu()
        positions[query_idx // queries_per_group, target_idx] = points[query_idx]
        result.append(positions)
    return result


def matching_distance(positions: Sequence[Tensor], first_only: bool = False) -> float:
    """MD (eq. 7) from per-image `(K, M, 2)` matched positions: mean over objects and ordered
    pairs of different groups (first_only: the pairs that include group 0) of the distance
    between their matched queries' positions. NaN for K = 1 or no objects."""
    total, count = 0.0, 0
    for pos in positions:
        num_groups = pos.shape[0]
        if num_groups < 2 or pos.shape[1] == 0:
            continue
        by_object = pos.permute(1, 0, 2).double()  # (M, K, 2)
        values = torch.cdist(by_object, by_object)[:, _pair_mask(num_groups, first_only)]
        values = values[~torch.isnan(values)]
        total += float(values.sum())
        count += values.numel()
    return total / count if count else float("nan")


@torch.no_grad()
def query_distances(model, images: Tensor, mask: Tensor, targets: Sequence[Dict], matcher: GroupMatcher
                    ) -> Dict[str, float]:
    """PD, PD_first, MD and MD_first of a GroupDETR (see the module docstring).

    images `(B, 3, H, W)`, mask `(B, H, W)`, targets DETR-format dicts (labels, boxes normalised
    cxcywh) for MD; matcher: the training matcher (`group_detr.engine.build_matcher(config)`).
    The model runs in eval mode (dropout off); its mode is restored. Also returns num_objects.
    """
    was_training = model.training
    model.eval()
    try:
        num_groups, queries_per_group = model.num_groups, model.num_queries
        device = images.device
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        outputs = model.forward_all_groups(images, mask)
        outputs["reference_points"] = model.reference_points()
        positions = matched_positions(outputs, targets, matcher, num_groups, queries_per_group)
        queries = query_positions(model)
        return {"PD": perturbation_distance(queries), "PD_first": perturbation_distance(queries, first_only=True),
                "MD": matching_distance(positions), "MD_first": matching_distance(positions, first_only=True),
                "num_objects": int(sum(len(t["labels"]) for t in targets))}
    finally:
        model.train(was_training)


def plot_reference_points(positions: Tensor, path: str, title: Optional[str] = None) -> str:
    """Paper Figure 3: the query positions `(K, N, 2)` of all groups in one panel, one colour per
    group (image coordinates: x right, y down). Returns `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    positions = positions.detach().cpu()
    num_groups, num_queries, _ = positions.shape
    colours = plt.cm.tab20(torch.linspace(0, 1, max(num_groups, 2)).numpy()) if num_groups > 10 \
        else plt.cm.tab10(range(num_groups))
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    for g in range(num_groups):
        ax.scatter(positions[g, :, 0], positions[g, :, 1], s=18, color=colours[g], alpha=0.85,
                   edgecolors="none", label=f"group {g + 1}")
    ax.set_xlim(0, 1)
    ax.set_ylim(1, 0)
    ax.set_aspect("equal")
    ax.set_xlabel("x (normalised)")
    ax.set_ylabel("y (normalised)")
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_title(title or f"query positions (reference points), K={num_groups}, N={num_queries}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
