"""RF-DETR's and LW-DETR's matchers, taken as they are: RF-DETR's log-sigmoid focal cost, their
constructor keywords, RF-DETR's sparse pred_masks."""
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment as scipy_lsa

import group_detr
from group_detr import GroupMatcher
from group_detr.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from group_detr.match_cost import class_cost_torch, match_cost, match_cost_torch


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


def sweep_logits(num_classes=8):
    """Every float32 step of 1e-3 over [-30, 30], the extremes included, as `(1, Q, C)` logits
    whose element count is a multiple of 64: torch's vectorised CPU loops then reach every
    element (a remainder would go through its scalar loop, std::exp, with other last bits)."""
    sweep = torch.linspace(-30, 30, 60001)
    assert sweep[0] == -30 and sweep[-1] == 30
    pad = (-sweep.numel()) % (64 * num_classes)
    return torch.cat([sweep, sweep.flip(0)[:pad]]).view(1, -1, num_classes)


@pytest.fixture
def single_thread():
    """One intra-op thread, so that torch's reference runs one chunk (no per-thread remainder)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_focal_logsigmoid_is_rfdetr_cost_bitwise_on_the_whole_logit_range(single_thread):
    logits = sweep_logits()
    num_classes = logits.shape[2]
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


@pytest.mark.parametrize("cost_backend", ["auto", "torch"])
@pytest.mark.parametrize("seed", range(12))
def test_group_matcher_equals_rfdetr_matcher_on_wide_logits(seed, cost_backend):
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
    ours = GroupMatcher(num_groups=num_groups, class_cost="focal_logsigmoid",
                        cost_backend=cost_backend)({"pred_logits": logits, "pred_boxes": boxes}, targets)
    theirs = rfdetr_indices(logits, boxes, targets, num_groups)
    for (q, t), (q_ref, t_ref) in zip(ours, theirs):
        order = torch.argsort(q_ref)
        assert torch.equal(q, q_ref[order]) and torch.equal(t, t_ref[order])


@pytest.mark.skipif(not group_detr.backends()["match_cost_cpu"], reason="group_detr._C is not built")
def test_fused_focal_logsigmoid_is_rfdetr_cost_bitwise(each_cpu_build, single_thread):
    """The fused op's log-sigmoid focal cost (csrc/cost: Sleef's exp and log1p, as torch runs
    them) is RF-DETR's bit for bit over the whole range, also with the box terms added."""
    logits = sweep_logits()
    num_classes, queries = logits.shape[2], logits.shape[1]
    labels = torch.arange(num_classes).repeat(2)[None]
    fused = match_cost(logits, torch.full((1, queries, 4), 0.5), labels,
                       torch.full((1, labels.shape[1], 4), 0.5), 1.0, 0.0, 0.0,
                       class_cost="focal_logsigmoid", backend="fused")
    assert torch.equal(fused[0], rfdetr_class_cost(logits.flatten(0, 1), labels[0]))
    gen = torch.Generator().manual_seed(3)
    boxes = torch.rand(1, queries, 4, generator=gen) * 0.4 + 0.1
    tgt = torch.rand(1, labels.shape[1], 4, generator=gen) * 0.4 + 0.1
    fused = match_cost(logits, boxes, labels, tgt, class_cost="focal_logsigmoid", backend="fused")
    assert torch.equal(fused, match_cost_torch(logits, boxes, labels, tgt,
                                               class_cost="focal_logsigmoid"))


@pytest.mark.skipif(not group_detr.backends()["match_cost_cpu"], reason="group_detr._C is not built")
def test_fused_classic_focal_differs_only_by_the_log(single_thread):
    """The classic cost's log is torch's Tensor.log, which on x86-64 is MKL's and is not
    reproduced (README "Exact ties"): the fused cost differs from the reference in the last
    bits of the two log terms only, in a few percent of the entries."""
    logits = sweep_logits()
    labels = torch.arange(logits.shape[2])[None]
    queries, targets = logits.shape[1], labels.shape[1]
    fused = match_cost(logits, torch.full((1, queries, 4), 0.5), labels,
                       torch.full((1, targets, 4), 0.5), 1.0, 0.0, 0.0, backend="fused")
    reference = class_cost_torch(logits, labels)
    differ = fused != reference
    assert differ.float().mean() < 0.05
    # one ulp of either log term times its factor below 1: at most 1 ulp of 18.4 (2e-6)
    assert (fused - reference).abs().max() <= 2e-6


@pytest.mark.skipif(not group_detr.backends()["match_cost_cpu"], reason="group_detr._C is not built")
@pytest.mark.parametrize("seed", range(20))
def test_exact_ties_follow_rfdetr_with_the_fused_cost(seed):
    """All query rows identical: every assignment of the targets costs the same, and which one
    is taken depends on the cost's last bits. The fused log-sigmoid cost has RF-DETR's bits,
    so its pairs are RF-DETR's."""
    gen = torch.Generator().manual_seed(seed)
    num_groups, per_group, num_classes = 2, 8, 4
    row_logits = torch.randn(1, 1, num_classes, generator=gen) * 6
    row_box = torch.rand(1, 1, 4, generator=gen) * 0.3 + 0.2
    logits = row_logits.expand(2, num_groups * per_group, -1).contiguous()
    boxes = row_box.expand(2, num_groups * per_group, -1).contiguous()
    targets = [{"labels": torch.randint(num_classes, (m,), generator=gen),
                "boxes": torch.rand(m, 4, generator=gen) * 0.3 + 0.2} for m in (3, 6)]
    outputs = {"pred_logits": logits, "pred_boxes": boxes}
    ours = GroupMatcher(num_groups=num_groups, class_cost="focal_logsigmoid")(outputs, targets)
    theirs = rfdetr_indices(logits, boxes, targets, num_groups)
    for (q, t), (q_ref, t_ref) in zip(ours, theirs):
        order = torch.argsort(q_ref)
        assert torch.equal(q, q_ref[order]) and torch.equal(t, t_ref[order])


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


def focal_cost_from_prob(prob, logits, class_cost):
    """class_cost_torch's focal formula from a given sigmoid."""
    if class_cost == "focal_logsigmoid":
        log_prob, log_not_prob = F.logsigmoid(logits), F.logsigmoid(-logits)
    else:
        log_prob, log_not_prob = (prob + 1e-8).log(), (1 - prob + 1e-8).log()
    return 0.25 * ((1 - prob) ** 2) * (-log_prob) - 0.75 * (prob ** 2) * (-log_not_prob)


@pytest.mark.parametrize("class_cost", ["focal", "focal_logsigmoid"])
def test_torch_cost_of_a_small_tensor_has_the_vector_loops_bits(class_cost):
    """torch's CPU loops compute a remainder of fewer than 16 or 32 elements with libm's exp: the
    torch cost pads, so a small problem's entries get the bits a client's large (B*Q, C) cost
    has for them. 63 logits (a remainder of 15 or 31) whose cost the libm sigmoid changes."""
    sweep = torch.linspace(-12, 12, 64 * 1000)
    libm_sigmoid = torch.stack([sweep, sweep], 1).view(-1)[::2].sigmoid()  # strided: scalar loop
    changed = (focal_cost_from_prob(libm_sigmoid, sweep, class_cost)
               != focal_cost_from_prob(sweep.sigmoid(), sweep, class_cost))
    sensitive = sweep[changed][:63]
    assert sensitive.numel() == 63
    logits = sensitive.view(1, 63, 1)
    labels = torch.zeros(1, 1, dtype=torch.int64)
    small = class_cost_torch(logits, labels, class_cost)
    in_a_large_tensor = class_cost_torch(logits.repeat(1, 64, 1), labels, class_cost)[:, :63]
    assert torch.equal(small, in_a_large_tensor)
