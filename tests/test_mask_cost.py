"""Mask costs against Mask2Former's matcher, written here the way Mask2Former computes them."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment as scipy_lsa

from group_detr import GroupMatcher
from group_detr.mask_cost import mask_cost_matrix, num_points_for

pytestmark = pytest.mark.usefixtures("one_thread")


# --- the reference: Mask2Former's matcher (mask2former/modeling/matcher.py) ------------------------

def detectron2_point_sample(input, point_coords, **kwargs):
    add_dim = point_coords.dim() == 3
    if add_dim:
        point_coords = point_coords.unsqueeze(2)
    output = F.grid_sample(input, 2.0 * point_coords - 1.0, **kwargs)
    return output.squeeze(3) if add_dim else output


def batch_dice_loss(inputs, targets):
    inputs = inputs.sigmoid().flatten(1)
    numerator = 2 * torch.einsum("nc,mc->nm", inputs, targets)
    denominator = inputs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def batch_sigmoid_ce_loss(inputs, targets):
    hw = inputs.shape[1]
    pos = F.binary_cross_entropy_with_logits(inputs, torch.ones_like(inputs), reduction="none")
    neg = F.binary_cross_entropy_with_logits(inputs, torch.zeros_like(inputs), reduction="none")
    loss = torch.einsum("nc,mc->nm", pos, targets) + torch.einsum("nc,mc->nm", neg, (1 - targets))
    return loss / hw


def mask2former_mask_cost(pred_masks_b, target_masks_b, point_coords_b, cost_mask, cost_dice):
    """One image, as Mask2Former's memory_efficient_forward: (Q, M) mask cost."""
    out_mask = pred_masks_b[:, None]
    tgt_mask = target_masks_b.to(out_mask)[:, None]
    point_coords = point_coords_b[None]
    tgt_mask = detectron2_point_sample(tgt_mask, point_coords.repeat(tgt_mask.shape[0], 1, 1),
                                       align_corners=False).squeeze(1)
    out_mask = detectron2_point_sample(out_mask, point_coords.repeat(out_mask.shape[0], 1, 1),
                                       align_corners=False).squeeze(1)
    out_mask, tgt_mask = out_mask.float(), tgt_mask.float()
    return cost_mask * batch_sigmoid_ce_loss(out_mask, tgt_mask) + cost_dice * batch_dice_loss(out_mask, tgt_mask)


def mask2former_match(outputs, targets, points, cost_class, cost_mask, cost_dice, num_groups):
    """Mask2Former's matcher (softmax class cost + mask costs), scipy per image and group."""
    indices = []
    for b, target in enumerate(targets):
        m = len(target["labels"])
        if m == 0:
            indices.append((torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)))
            continue
        class_cost = -outputs["pred_logits"][b].softmax(-1)[:, target["labels"]]
        c = cost_class * class_cost + mask2former_mask_cost(outputs["pred_masks"][b], target["masks"], points[b],
                                                            cost_mask, cost_dice)
        n = c.shape[0] // num_groups
        rows, cols = [], []
        for g in range(num_groups):
            r, k = scipy_lsa(c[g * n:(g + 1) * n].numpy())
            rows.append(r + g * n)
            cols.append(k)
        indices.append((torch.as_tensor(np.concatenate(rows)), torch.as_tensor(np.concatenate(cols))))
    return indices


# --- inputs --------------------------------------------------------------------------------------

def segmentation_batch(counts=(3, 0, 6, 1), num_groups=3, queries_per_group=5, num_classes=4,
                       pred_size=(12, 16), target_size=(48, 64), seed=0):
    gen = torch.Generator().manual_seed(seed)
    total = num_groups * queries_per_group
    outputs = {"pred_logits": torch.randn(len(counts), total, num_classes, generator=gen),
               "pred_boxes": torch.rand(len(counts), total, 4, generator=gen) * 0.5 + 0.2,
               "pred_masks": torch.randn(len(counts), total, *pred_size, generator=gen) * 3}
    targets = []
    for m in counts:
        coarse = torch.rand(m, 1, 4, 4, generator=gen) > 0.5  # blobs, upsampled to image size
        masks = F.interpolate(coarse.float(), size=target_size, mode="nearest")[:, 0].bool()
        targets.append({"labels": torch.randint(num_classes, (m,), generator=gen),
                        "boxes": torch.rand(m, 4, generator=gen) * 0.4 + 0.1, "masks": masks})
    return outputs, targets


def without_masks(outputs):
    return {k: v for k, v in outputs.items() if k != "pred_masks"}


# --- the cost -------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("target_size", [(48, 64), (12, 16), (7, 5)])
def test_mask_cost_equals_mask2former(seed, target_size):
    outputs, targets = segmentation_batch(target_size=target_size, seed=seed)
    points = torch.rand(4, 200, 2, generator=torch.Generator().manual_seed(seed))
    ours = mask_cost_matrix(outputs["pred_masks"], [t["masks"] for t in targets], 6, 5.0, 3.0, 200, points)
    assert ours.shape == (4, 15, 6) and ours.dtype == torch.float32
    for b, t in enumerate(targets):
        m = len(t["labels"])
        assert (ours[b, :, m:] == 0).all(), "padding columns"
        if m:
            expected = mask2former_mask_cost(outputs["pred_masks"][b], t["masks"], points[b], 5.0, 3.0)
            torch.testing.assert_close(ours[b, :, :m], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("num_groups", [1, 3])
def test_group_matcher_with_masks_equals_mask2former_indices(num_groups, seed):
    """Mask2Former's weights (class 2, mask 5, dice 5, no box costs): the same points and the
    same indices; the points are drawn from the global generator, one set per image."""
    outputs, targets = segmentation_batch(num_groups=num_groups, seed=seed)
    matcher = GroupMatcher(cost_class=2.0, cost_bbox=0.0, cost_giou=0.0, class_cost="softmax",
                           cost_mask=5.0, cost_dice=5.0, num_points=300, num_groups=num_groups)
    torch.manual_seed(seed)
    ours = matcher(outputs, targets)
    torch.manual_seed(seed)
    points = torch.rand((4, 300, 2))
    reference = mask2former_match(outputs, targets, points, 2.0, 5.0, 5.0, num_groups)
    for (q, t), (rq, rt) in zip(ours, reference):
        assert torch.equal(q, rq) and torch.equal(t, rt)


def test_masks_change_the_matching_and_boxes_still_count():
    """Box and mask costs together (RF-DETR's segmentation matcher): the box-only cost plus the
    mask cost, in one solve."""
    outputs, targets = segmentation_batch(seed=7)
    boxes_only = GroupMatcher(num_groups=3)
    with_masks = GroupMatcher(num_groups=3, cost_mask=5.0, cost_dice=5.0, num_points=100)
    torch.manual_seed(0)
    cost, sizes = with_masks.cost_matrix(outputs, targets)
    torch.manual_seed(0)
    points = torch.rand((4, 100, 2))
    box_cost, _ = boxes_only.cost_matrix(without_masks(outputs), targets)
    mask_cost = mask_cost_matrix(outputs["pred_masks"], [t["masks"] for t in targets], 6, 5.0, 5.0, 100, points)
    torch.testing.assert_close(cost, box_cost + mask_cost)
    changed = [not torch.equal(a[0], b[0]) for a, b in zip(boxes_only.assign(cost, sizes),
                                                          boxes_only.assign(box_cost, sizes))]
    assert any(changed), "the mask cost must be able to change the assignment"


def test_rf_detr_point_sample_ratio():
    outputs, targets = segmentation_batch(pred_size=(32, 32))
    assert num_points_for(outputs["pred_masks"], 12544, 16) == 64
    assert num_points_for(outputs["pred_masks"], 12544, None) == 12544
    matcher = GroupMatcher(num_groups=3, cost_mask=1.0, cost_dice=1.0, mask_point_sample_ratio=16)
    torch.manual_seed(0)
    cost, _ = matcher.cost_matrix(outputs, targets)
    torch.manual_seed(0)
    points = torch.rand((4, 64, 2))
    expected = GroupMatcher(num_groups=3).cost_matrix(without_masks(outputs), targets)[0] + mask_cost_matrix(
        outputs["pred_masks"], [t["masks"] for t in targets], 6, 1.0, 1.0, 64, points)
    torch.testing.assert_close(cost, expected)


def test_masks_with_zero_weights_warn_once():
    outputs, targets = segmentation_batch()
    matcher = GroupMatcher(num_groups=3)
    with pytest.warns(UserWarning, match="ignores the masks"):
        matcher(outputs, targets)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        matcher(outputs, targets)  # once per matcher


@pytest.mark.parametrize("change,error,message", [
    (lambda o, t: o.update(pred_masks=o["pred_masks"][:, :-1]), ValueError, r"pred_masks must be \(B, K\*N, H, W\)"),
    (lambda o, t: o.update(pred_masks=o["pred_masks"][0]), ValueError, r"pred_masks must be \(B, K\*N, H, W\)"),
    (lambda o, t: t[2].update(masks=t[2]["masks"][:-1]), ValueError, r"target 2: masks must be \(M, H, W\) with M = 6"),
    (lambda o, t: t[0].pop("masks"), KeyError, "target masks not found"),
])
def test_bad_mask_inputs(change, error, message):
    outputs, targets = segmentation_batch()
    change(outputs, targets)
    with pytest.raises(error, match=message):
        GroupMatcher(num_groups=3, cost_mask=1.0)(outputs, targets)


def test_bad_mask_options():
    with pytest.raises(ValueError, match="num_points must be a positive int"):
        GroupMatcher(cost_mask=1.0, num_points=0)
    with pytest.raises(ValueError, match="mask_point_sample_ratio must be a positive int"):
        GroupMatcher(cost_mask=1.0, mask_point_sample_ratio=2.5)
    GroupMatcher(cost_class=0, cost_bbox=0, cost_giou=0, cost_dice=1.0)  # a mask-only matcher is fine
