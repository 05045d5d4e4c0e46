"""RF-DETR's and LW-DETR's matchers, taken as they are: RF-DETR's log-sigmoid focal cost, their
constructor keywords, RF-DETR's sparse pred_masks."""
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment as scipy_lsa

from group_detr import GroupMatcher
from group_detr.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from group_detr.match_cost import class_cost_torch, match_cost


def rfdetr_class_cost(flat_logits, tgt_ids, alpha=0.25, gamma=2.0):
    """RF-DETR's (develop, 2025) focal matching cost as it computes it: on the whole
    `(B*Q, C)` logits, then the target columns picked."""
    prob = flat_logits.sigmoid()
    neg = (1 - alpha) * (prob ** gamma) * (-F.logsigmoid(-flat_logits))
    pos = alpha * ((1 - prob) ** gamma) * (-F.logsigmoid(flat_logits))
    return pos[:, tgt_ids] - neg[:, tgt_ids]


def rfdetr_indices(logits, boxes, targets, num_groups, weights=(2.0, 5.0, 2.0)):
    """RF-DETR's matcher: the batch-wide cost, split per group and image, scipy on each."""
    bs, num_queries = logits.shape[:2]
    tgt_ids = torch.cat([t["labels"] for t in targets])
    tgt_boxes = torch.cat([t["boxes"] for t in targets])
    flat_boxes = boxes.flatten(0, 1)
    cost = (weights[1] * torch.cdist(flat_boxes, tgt_boxes, p=1)
            + weights[0] * rfdetr_class_cost(logits.flatten(0, 1), tgt_ids)
            - weights[2] * generalized_box_iou(box_cxcywh_to_xyxy(flat_boxes), box_cxcywh_to_xyxy(tgt_boxes)))
    cost = cost.view(bs, num_queries, -1)
    per_group = num_queries // num_groups
    sizes = [len(t["boxes"]) for t in targets]
    out = []
    for b, c in enumerate(cost.split(sizes, -1)):
        query, target = [], []
        for g in range(num_groups):
            rows, cols = scipy_lsa(c[b, g * per_group:(g + 1) * per_group].numpy())
            query.append(torch.as_tensor(rows) + g * per_group)
            target.append(torch.as_tensor(cols))
        out.append((torch.cat(query), torch.cat(target)))
    return out


def test_focal_logsigmoid_is_rfdetr_cost_bitwise_on_the_whole_logit_range():
    # every float32 step of 1e-3 over [-30, 30], the extremes included, as a (B*Q, C) block
    sweep = torch.linspace(-30, 30, 60001)
    assert sweep[0] == -30 and sweep[-1] == 30
    num_classes = 7
    logits = torch.cat([sweep, sweep.flip(0)[:num_classes - sweep.numel() % num_classes]])
    logits = logits.view(1, -1, num_classes)
    labels = torch.arange(num_classes).repeat(3)[None]
    ours = class_cost_torch(logits, labels, "focal_logsigmoid")
    theirs = rfdetr_class_cost(logits.flatten(0, 1), labels[0])
    assert torch.isfinite(ours).all()
    assert torch.equal(ours[0], theirs)
    # the classic cost (log(p + 1e-8)) is not it: it saturates for wide logits
    classic = class_cost_torch(logits, labels, "focal")
    assert (classic[0] - theirs).abs().max() > 1.0


def test_wide_logits_pick_rfdetr_query():
    # query 0 has the exact box but logit -30, query 1 a box 0.05 off and logit -20. The classic
    # cost floors -log p at -log(1e-8), so the logits differ by 0.09 in cost and the box wins;
    # RF-DETR's cost keeps the difference (0.5 * 10 = 5) and the class wins.
    logits = torch.tensor([[[-30.0], [-20.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.55, 0.5, 0.2, 0.2]]])
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    outputs = {"pred_logits": logits, "pred_boxes": boxes}
    assert rfdetr_indices(logits, boxes, targets, 1)[0][0].tolist() == [1]
    assert GroupMatcher(class_cost="focal_logsigmoid")(outputs, targets)[0][0].tolist() == [1]
    assert GroupMatcher(class_cost="focal")(outputs, targets)[0][0].tolist() == [0]


@pytest.mark.parametrize("seed", range(12))
def test_group_matcher_equals_rfdetr_matcher_on_wide_logits(seed):
    gen = torch.Generator().manual_seed(seed)
    num_groups, per_group, num_classes = 3, 20, 5
    logits = torch.randn(3, num_groups * per_group, num_classes, generator=gen) * 8 - 6
    boxes = torch.cat([torch.rand(3, num_groups * per_group, 2, generator=gen) * 0.6 + 0.2,
                       torch.rand(3, num_groups * per_group, 2, generator=gen) * 0.3 + 0.05], -1)
    targets = []
    for m in (0, 4, 9):
        targets.append({"labels": torch.randint(num_classes, (m,), generator=gen),
                        "boxes": torch.cat([torch.rand(m, 2, generator=gen) * 0.6 + 0.2,
                                            torch.rand(m, 2, generator=gen) * 0.3 + 0.05], -1)})
    ours = GroupMatcher(num_groups=num_groups, class_cost="focal_logsigmoid")(
        {"pred_logits": logits, "pred_boxes": boxes}, targets)
    theirs = rfdetr_indices(logits, boxes, targets, num_groups)
    for (q, t), (q_ref, t_ref) in zip(ours, theirs):
        order = torch.argsort(q_ref)
        assert torch.equal(q, q_ref[order]) and torch.equal(t, t_ref[order])


def test_focal_logsigmoid_runs_on_the_torch_cost_path():
    logits, boxes = torch.randn(1, 4, 3), torch.full((1, 4, 4), 0.5)
    labels, tgt = torch.zeros(1, 2, dtype=torch.int64), torch.full((1, 2, 4), 0.5)
    auto = match_cost(logits, boxes, labels, tgt, class_cost="focal_logsigmoid")
    torch_path = match_cost(logits, boxes, labels, tgt, class_cost="focal_logsigmoid", backend="torch")
    assert torch.equal(auto, torch_path)
    with pytest.raises(ValueError, match="cost backend 'fused' computes class_cost .* not 'focal_logsigmoid'"):
        match_cost(logits, boxes, labels, tgt, class_cost="focal_logsigmoid", backend="fused")
    with pytest.raises(ValueError, match="not 'focal_logsigmoid'"):
        GroupMatcher(class_cost="focal_logsigmoid", cost_backend="fused")(
            {"pred_logits": logits, "pred_boxes": boxes},
            [{"labels": torch.zeros(2, dtype=torch.int64), "boxes": tgt[0]}])


def test_rfdetr_mask_weight_names():
    matcher = GroupMatcher(cost_mask_ce=3.0, cost_mask_dice=4.0, mask_point_sample_ratio=16)
    assert (matcher.cost_mask, matcher.cost_dice) == (3.0, 4.0)
    with pytest.raises(ValueError, match="give cost_mask or its alias cost_mask_ce, not both"):
        GroupMatcher(cost_mask=1.0, cost_mask_ce=2.0)
    with pytest.raises(ValueError, match="give cost_dice or its alias cost_mask_dice, not both"):
        GroupMatcher(cost_dice=1.0, cost_mask_dice=2.0)


@pytest.mark.parametrize("name", ["use_pos_only", "use_position_modulated_cost"])
def test_lwdetr_reserved_keywords(name):
    assert GroupMatcher(**{name: False}).cost_class == 2.0
    with pytest.raises(ValueError, match=f"{name}=True: LW-DETR's and RF-DETR's matchers take this "
                                         f"keyword but never read it.*pass {name}=False"):
        GroupMatcher(**{name: True})


def test_sparse_pred_masks_get_a_clear_error():
    logits, boxes = torch.randn(1, 4, 3), torch.rand(1, 4, 4) * 0.3 + 0.2
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]),
                "masks": torch.ones(1, 8, 8)}]
    outputs = {"pred_logits": logits, "pred_boxes": boxes, "pred_masks": {"spatial": torch.randn(4, 8, 8)}}
    with pytest.raises(ValueError, match=r"pred_masks must be a dense tensor \(B, K\*N, H, W\).*got dict"
                                         r".*RF-DETR's sparse form"):
        GroupMatcher(cost_mask=5.0, cost_dice=5.0)(outputs, targets)
    # mask weights 0: the masks are ignored (one warning), the boxes are matched
    with pytest.warns(UserWarning, match="ignores the masks"):
        indices = GroupMatcher()(outputs, targets)
    boxes_only = GroupMatcher()({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert torch.equal(indices[0][0], boxes_only[0][0])
