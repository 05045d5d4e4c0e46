"""group_detr.integrations.transformers against the real transformers package (the `hf` extra):
identical indices and identical losses to transformers' own matchers, K = 1 and K = 13."""
import types

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("scipy")
hf_detection = pytest.importorskip("transformers.loss.loss_for_object_detection")
hf_deformable = pytest.importorskip("transformers.loss.loss_deformable_detr")
hf_lw_detr = pytest.importorskip("transformers.loss.loss_lw_detr")

from group_detr.integrations.transformers import (  # noqa: E402
    DeformableDetrHungarianMatcher, HungarianMatcher, LwDetrHungarianMatcher, use_group_matcher)

pytestmark = pytest.mark.usefixtures("one_thread")

WEIGHTS = dict(class_cost=2.0, bbox_cost=5.0, giou_cost=2.0)
TARGET_COUNTS = (3, 0, 9, 1)  # 9 > N: more targets than queries in a group


def hf_batch(num_groups, queries_per_group=7, num_classes=6, seed=0, extra_class=False):
    """Random transformers-format outputs and targets (extra_class: DETR's no-object logit)."""
    gen = torch.Generator().manual_seed(seed)
    total = num_groups * queries_per_group
    outputs = {"logits": torch.randn(len(TARGET_COUNTS), total, num_classes + extra_class, generator=gen),
               "pred_boxes": torch.rand(len(TARGET_COUNTS), total, 4, generator=gen) * 0.5 + 0.2}
    targets = []
    for m in TARGET_COUNTS:
        centre = torch.rand(m, 2, generator=gen) * 0.6 + 0.2
        size = torch.rand(m, 2, generator=gen) * 0.3 + 0.05
        targets.append({"class_labels": torch.randint(num_classes, (m,), generator=gen),
                        "boxes": torch.cat([centre, size], -1)})
    return outputs, targets


def per_group(hf_matcher, outputs, targets, num_groups):
    """A K=1 transformers matcher applied to each group of queries, indices offset by g*N."""
    n = outputs["logits"].shape[1] // num_groups
    parts = [hf_matcher({k: v[:, g * n:(g + 1) * n] for k, v in outputs.items()}, targets)
             for g in range(num_groups)]
    return [(torch.cat([parts[g][b][0] + g * n for g in range(num_groups)]),
             torch.cat([parts[g][b][1] for g in range(num_groups)])) for b in range(len(targets))]


def assert_same_indices(ours, theirs):
    assert len(ours) == len(theirs)
    for (q, t), (hq, ht) in zip(ours, theirs):
        assert q.dtype == t.dtype == torch.int64 and not q.is_cuda
        assert torch.equal(q, hq) and torch.equal(t, ht)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("num_groups", [1, 13])
def test_detr_matcher_same_indices(num_groups, seed):
    outputs, targets = hf_batch(num_groups, seed=seed, extra_class=True)
    theirs = per_group(hf_detection.HungarianMatcher(**WEIGHTS), outputs, targets, num_groups)
    assert_same_indices(HungarianMatcher(**WEIGHTS, num_groups=num_groups)(outputs, targets), theirs)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("num_groups", [1, 13])
def test_deformable_and_lw_detr_matchers_same_indices(num_groups, seed):
    outputs, targets = hf_batch(num_groups, seed=seed)
    theirs = hf_lw_detr.LwDetrHungarianMatcher(**WEIGHTS)(outputs, targets, num_groups)
    assert_same_indices(LwDetrHungarianMatcher(**WEIGHTS)(outputs, targets, num_groups), theirs)
    if num_groups == 1:
        deformable = hf_deformable.DeformableDetrHungarianMatcher(**WEIGHTS)(outputs, targets)
        assert_same_indices(DeformableDetrHungarianMatcher(**WEIGHTS)(outputs, targets), deformable)


@pytest.mark.parametrize("num_groups", [1, 13])
def test_non_finite_predictions_handled_as_transformers_does(num_groups):
    """NaN logits: transformers replaces the costs and matches on, and so do we. (A non-finite
    box makes transformers' GIoU raise ValueError before its matcher sees a cost.)"""
    outputs, targets = hf_batch(num_groups, seed=5)
    outputs["logits"][0, 2] = float("nan")
    outputs["logits"][2, ::3] = float("nan")
    outputs["logits"][3, 1::2, 0] = float("nan")
    theirs = hf_lw_detr.LwDetrHungarianMatcher(**WEIGHTS)(outputs, targets, num_groups)
    assert_same_indices(LwDetrHungarianMatcher(**WEIGHTS)(outputs, targets, num_groups), theirs)


@pytest.mark.parametrize("num_groups", [1, 13])
def test_lw_detr_loss_identical(num_groups):
    outputs, targets = hf_batch(num_groups, seed=1)
    outputs = {k: v.requires_grad_() for k, v in outputs.items()}
    losses = {}
    for name, matcher in (("theirs", hf_lw_detr.LwDetrHungarianMatcher(**WEIGHTS)),
                          ("ours", LwDetrHungarianMatcher(**WEIGHTS))):
        criterion = hf_lw_detr.LwDetrImageLoss(matcher=matcher, num_classes=6, focal_alpha=0.25,
                                               losses=["labels", "boxes", "cardinality"],
                                               group_detr=num_groups)
        losses[name] = criterion(outputs, targets)
    assert losses["ours"].keys() == losses["theirs"].keys()
    for key in losses["ours"]:
        assert torch.equal(losses["ours"][key], losses["theirs"][key]), key


def test_detr_loss_identical():
    outputs, targets = hf_batch(1, seed=2, extra_class=True)
    losses = {}
    for name, matcher in (("theirs", hf_detection.HungarianMatcher(**WEIGHTS)),
                          ("ours", HungarianMatcher(**WEIGHTS))):
        criterion = hf_detection.ImageLoss(matcher=matcher, num_classes=6, eos_coef=0.1,
                                           losses=["labels", "boxes", "cardinality"])
        losses[name] = criterion(outputs, targets)
    for key in losses["ours"]:
        assert torch.equal(losses["ours"][key], losses["theirs"][key]), key


def lw_detr_config(num_groups, decoder_layers=2):
    return types.SimpleNamespace(class_cost=2.0, bbox_cost=5.0, giou_cost=2.0, num_labels=6, focal_alpha=0.25,
                                 group_detr=num_groups, auxiliary_loss=True, class_loss_coefficient=1.0,
                                 bbox_loss_coefficient=5.0, giou_loss_coefficient=2.0,
                                 decoder_layers=decoder_layers)


@pytest.mark.parametrize("num_groups", [1, 13])
def test_one_liner_in_lw_detr_model_loss(num_groups):
    """use_group_matcher() inside transformers' own LW-DETR / RF-DETR loss: the same loss."""
    layers = []
    for seed in range(3):  # 2 decoder layers (last + 1 auxiliary) and the encoder's proposals
        outputs, targets = hf_batch(num_groups, seed=10 + seed)
        layers.append(outputs)
    arguments = dict(logits=layers[0]["logits"], labels=targets, device="cpu",
                     pred_boxes=layers[0]["pred_boxes"], config=lw_detr_config(num_groups),
                     outputs_class=torch.stack([layers[1]["logits"], layers[0]["logits"]]),
                     outputs_coord=torch.stack([layers[1]["pred_boxes"], layers[0]["pred_boxes"]]),
                     enc_outputs_class=layers[2]["logits"], enc_outputs_coord=layers[2]["pred_boxes"])
    theirs_loss, theirs_dict, _ = hf_lw_detr.LwDetrForObjectDetectionLoss(**arguments)
    original = hf_lw_detr.LwDetrHungarianMatcher
    restore = use_group_matcher()
    try:
        assert hf_lw_detr.LwDetrHungarianMatcher is LwDetrHungarianMatcher
        assert hf_detection.HungarianMatcher is HungarianMatcher
        ours_loss, ours_dict, _ = hf_lw_detr.LwDetrForObjectDetectionLoss(**arguments)
    finally:
        restore()
    assert hf_lw_detr.LwDetrHungarianMatcher is original
    assert ours_dict.keys() == theirs_dict.keys()
    for key in ours_dict:
        assert torch.equal(ours_dict[key], theirs_dict[key]), key
    assert torch.equal(ours_loss, theirs_loss)


def test_transformers_constructor_and_errors():
    matcher = HungarianMatcher(class_cost=1, bbox_cost=5, giou_cost=2)
    assert (matcher.class_cost, matcher.bbox_cost, matcher.giou_cost) == (1, 5, 2)
    with pytest.raises(ValueError, match="all matching cost weights are 0"):
        HungarianMatcher(class_cost=0, bbox_cost=0, giou_cost=0)
    outputs, targets = hf_batch(1)
    targets[0]["class_labels"] = torch.tensor([0, 1, 6])  # transformers: IndexError
    with pytest.raises(ValueError, match=r"target 0 has class id 6 outside \[0, 6\)"):
        HungarianMatcher()(outputs, targets)
