"""Group DETR's query analysis (paper Sec. 3.3): perturbation distance PD and matching distance MD.

Positions. In Conditional DETR a query's *position* is its reference point
`p = sigmoid(ref_point_head(query_embed))` (normalised (x, y) in [0, 1]); it depends on the learned
query embedding only, not on the image. Group g's queries are the slice [g*N, (g+1)*N).

Matching. For an image with ground-truth objects j = 1..M, group g is matched one-to-one to the
ground truth by the training matcher (`GroupMatcher`, the focal/L1/GIoU costs) applied to the
model's predictions; sigma_g(j) is the query of group g assigned to object j.

What is implemented (notation: ||.|| is the Euclidean distance between normalised positions):

* Matching distance, MD (paper eq. 7): for every gt object j and every *pair of different groups*
  g != h, the distance between the positions of the queries the two groups assign to j,

      MD = mean over images, objects j, ordered pairs (g, h), g != h of
           || p[sigma_g(j)] - p[sigma_h(j)] ||.

  It needs K >= 2 (NaN for K = 1).

* Perturbation distance, PD (paper eq. 6): how far the assigned position moves when a group is
  only *perturbed* instead of replaced by another learned group. The query embeddings of each
  group are perturbed with Gaussian noise, q~ = q + eps * std(q) * n with n ~ N(0, I) (default
  eps = 0.1), the model is run again with the perturbed queries (which moves their reference
  points and their predictions), group g is matched again, giving sigma~_g(j) and positions p~; then

      PD = mean over images, objects j, groups g of || p[sigma_g(j)] - p~[sigma~_g(j)] ||,

  averaged over `num_perturbations` noise draws. PD compares a group with a perturbed copy of
  *itself* (same group), MD compares *different* groups for the same gt object. The paper finds
  MD well above PD: the extra groups are not small perturbations of one another but genuinely
  different query sets (automatically learned query augmentation).

`query_distances(model, images, mask, targets)` returns both (and per-group details);
`plot_reference_points(model, path)` draws every group's reference points (paper Figure 3).
"""
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from group_detr.matcher import GroupMatcher


def reference_points(model, query_embed: Optional[Tensor] = None) -> Tensor:
    """Normalised (x, y) reference points of the queries `(Q, 2)` (all K*N by default)."""
    if query_embed is None:
        query_embed = model.query_embed.weight
    return model.transformer.decoder.ref_point_head(query_embed).sigmoid()


@torch.no_grad()
def forward_all_groups(model, images: Tensor, mask: Tensor, query_embed: Optional[Tensor] = None) -> Dict:
    """The detector's forward with all K groups (separate self-attention per group), no gradients.

    Works in eval mode (dropout off); `query_embed` `(K*N, d)` replaces the learned embeddings
    (used for the perturbation). Returns pred_logits `(B, K*N, C)`, pred_boxes `(B, K*N, 4)` and
    the reference points `(K*N, 2)`.
    """
    if query_embed is None:
        query_embed = model.query_embed.weight
    layout = model.layout if model.num_groups > 1 else None
    features, feat_mask, pos = model.backbone(images, mask)
    hs, reference_unsigmoid = model.transformer(model.input_proj(features), feat_mask, query_embed, pos, layout)
    box_offsets = model.bbox_embed(hs[-1])
    centres = box_offsets[..., :2] + reference_unsigmoid
    boxes = torch.cat((centres, box_offsets[..., 2:]), dim=-1).sigmoid()
    return {"pred_logits": model.class_embed(hs[-1]), "pred_boxes": boxes,
            "reference_points": reference_unsigmoid[0].sigmoid()}


def _matched_positions(outputs: Dict, targets: Sequence[Dict], matcher: GroupMatcher, num_groups: int,
                       queries_per_group: int) -> List[Tensor]:
    """Per image: `(K, M_i, 2)` position of the query of each group matched to each gt object."""
    indices = matcher({"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]},
                      list(targets), num_groups=num_groups)
    points = outputs["reference_points"]
    result = []
    for (query_idx, target_idx), target in zip(indices, targets):
        num_targets = len(target["labels"])
        positions = torch.full((num_groups, num_targets, 2), float("nan"))
        for q, t in zip(query_idx.tolist(), target_idx.tolist()):
            positions[q // queries_per_group, t] = points[q].cpu()
        result.append(positions)
    return result


def matching_distance(positions: Sequence[Tensor]) -> float:
    """MD (eq. 7) from per-image `(K, M, 2)` matched positions: mean over objects and ordered
    pairs of different groups of the distance between their matched queries' positions."""
    total, count = 0.0, 0
    for pos in positions:
        num_groups = pos.shape[0]
        if num_groups < 2 or pos.shape[1] == 0:
            continue
        dist = torch.cdist(pos.permute(1, 0, 2), pos.permute(1, 0, 2))  # (M, K, K)
        off_diag = ~torch.eye(num_groups, dtype=torch.bool)
        values = dist[:, off_diag]
        values = values[~torch.isnan(values)]
        total += float(values.sum())
        count += values.numel()
    return total / count if count else float("nan")


def perturbation_distance(positions: Sequence[Tensor], perturbed: Sequence[Tensor]) -> float:
    """PD (eq. 6): mean over objects and groups of the distance between the position matched in
    a group and the position matched in the perturbed copy of the same group."""
    total, count = 0.0, 0
    for pos, pert in zip(positions, perturbed):
        values = (pos - pert).norm(dim=-1).flatten()
        values = values[~torch.isnan(values)]
        total += float(values.sum())
        count += values.numel()
    return total / count if count else float("nan")


def make_matcher(num_groups: int, set_cost_class: float = 2.0, set_cost_bbox: float = 5.0,
                 set_cost_giou: float = 2.0, focal_alpha: float = 0.25) -> GroupMatcher:
    return GroupMatcher(cost_class=set_cost_class, cost_bbox=set_cost_bbox, cost_giou=set_cost_giou,
                        num_groups=num_groups, class_cost="focal", focal_alpha=focal_alpha)


@torch.no_grad()
def query_distances(model, images: Tensor, mask: Tensor, targets: Sequence[Dict],
                    matcher: Optional[GroupMatcher] = None, noise: float = 0.1, num_perturbations: int = 1,
                    seed: int = 0) -> Dict[str, float]:
    """PD and MD of `model` on one batch (see the module docstring for the formulas).

    targets: DETR-format dicts (labels, boxes normalised cxcywh). Returns {"PD", "MD",
    "num_objects"}; MD is NaN for K = 1.
    """
    was_training = model.training
    model.eval()
    try:
        num_groups, queries_per_group = model.num_groups, model.num_queries
        matcher = matcher or make_matcher(num_groups)
        device = images.device
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        positions = _matched_positions(forward_all_groups(model, images, mask), targets, matcher,
                                       num_groups, queries_per_group)
        embed = model.query_embed.weight
        scale = embed.view(num_groups, queries_per_group, -1).std(dim=(1, 2), keepdim=True)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        pds = []
        for _ in range(num_perturbations):
            sample = torch.randn(embed.shape, generator=generator).to(embed)
            perturbed_embed = (embed.view(num_groups, queries_per_group, -1)
                               + noise * scale * sample.view(num_groups, queries_per_group, -1)).reshape(embed.shape)
            perturbed = _matched_positions(forward_all_groups(model, images, mask, perturbed_embed), targets,
                                           matcher, num_groups, queries_per_group)
            pds.append(perturbation_distance(positions, perturbed))
        return {"PD": float(sum(pds) / len(pds)), "MD": matching_distance(positions),
                "num_objects": int(sum(len(t["labels"]) for t in targets))}
    finally:
        model.train(was_training)


def plot_reference_points(model, path: str, max_groups: int = 11, title: Optional[str] = None) -> str:
    """Paper Figure 3: the reference points of every group's queries, one panel per group (plus
    all groups overlaid). Returns `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with torch.no_grad():
        points = reference_points(model).cpu().view(model.num_groups, model.num_queries, 2)
    groups = min(model.num_groups, max_groups)
    panels = groups + (1 if groups > 1 else 0)
    cols = min(panels, 6)
    rows = (panels + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.2 * rows), squeeze=False)
    colours = plt.cm.tab20(torch.linspace(0, 1, max(model.num_queries, 2)).numpy())
    for index, ax in enumerate(axes.flat):
        ax.set_xlim(0, 1)
        ax.set_ylim(1, 0)  # image coordinates: y down
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        if index < groups:
            ax.scatter(points[index, :, 0], points[index, :, 1], c=colours[: model.num_queries], s=14)
            ax.set_title(f"group {index + 1}", fontsize=8)
        elif index == groups and groups > 1:
            for g in range(groups):
                ax.scatter(points[g, :, 0], points[g, :, 1], s=5, alpha=0.7)
            ax.set_title("all groups", fontsize=8)
        else:
            ax.axis("off")
    fig.suptitle(title or f"reference points of the queries, K={model.num_groups}, N={model.num_queries}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
