"""DINO's contrastive denoising beside the groups (group_detr.models.denoising, the detector's
denoising prefix, the criterion's denoising losses, the config checks)."""
import dataclasses

import pytest
import torch
from hypothesis import given, settings, strategies as st

from group_detr.box_ops import box_cxcywh_to_xyxy
from group_detr.config import TrainConfig, demo_config
from group_detr.matcher import GroupMatcher
from group_detr.models import SetCriterion, build_group_detr, default_weight_dict
from group_detr.models.criterion import sigmoid_focal_loss
from group_detr.models.denoising import (ContrastiveDenoising, DenoisingQueries, denoising_group_count,
                                         denoising_indices, inverse_sigmoid)

NUM_CLASSES = 4
pytestmark = pytest.mark.usefixtures("one_thread")


def targets_of(counts, seed=0):
    """One target dict per image with `counts[i]` random boxes (well inside the image)."""
    generator = torch.Generator().manual_seed(seed)
    targets = []
    for n in counts:
        centres = 0.3 + 0.4 * torch.rand(n, 2, generator=generator)
        sizes = 0.1 + 0.2 * torch.rand(n, 2, generator=generator)
        targets.append({"labels": torch.randint(0, NUM_CLASSES, (n,), generator=generator),
                        "boxes": torch.cat((centres, sizes), dim=1)})
    return targets


def tiny_model(num_groups=3, num_queries=5, denoising_queries=6, **denoising):
    torch.manual_seed(0)
    return build_group_detr(NUM_CLASSES, num_groups=num_groups, num_queries=num_queries, backbone="small",
                            hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=64,
                            dropout=0.0, small_widths=(8, 16, 16, 32), denoising_queries=denoising_queries,
                            **denoising)


def tiny_criterion(num_queries=5, denoising=True):
    return SetCriterion(NUM_CLASSES, GroupMatcher(), default_weight_dict(2, denoising=denoising),
                        queries_per_group=num_queries, denoising=denoising)


def images_of(num_images, size=64):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(num_images, 3, size, size, generator=generator), torch.zeros(num_images, size, size,
                                                                                    dtype=torch.bool)


# ------------------------------------------------------------------------------------------------
# the queries
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget,max_targets,expected", [(100, 7, 14), (100, 100, 1), (100, 300, 1),
                                                         (12, 3, 4), (12, 5, 2), (1, 1, 1), (12, 0, 0)])
def test_the_group_count_follows_the_largest_target_count(budget, max_targets, expected):
    assert denoising_group_count(budget, max_targets) == expected


@pytest.mark.parametrize("contrastive", [True, False])
def test_every_target_fills_one_positive_and_one_negative_slot_per_group(contrastive):
    counts = [3, 1, 0]
    targets = targets_of(counts)
    denoiser = ContrastiveDenoising(NUM_CLASSES, 16, denoising_queries=6, label_noise_ratio=0.0,
                                    box_noise_scale=0.0, contrastive=contrastive)
    queries = denoiser(targets, len(targets))
    copies = 2 if contrastive else 1
    assert (queries.num_groups, queries.max_targets, queries.group_size) == (2, 3, 3 * copies)
    assert queries.content.shape == (3, 2 * 3 * copies, 16) and queries.query_pos.shape == queries.content.shape
    for image, (target, n) in enumerate(zip(targets, counts)):
        for group in range(2):
            for copy in range(copies):
                start = (group * copies + copy) * 3
                assert torch.equal(queries.labels[image, start:start + n], target["labels"])
                assert torch.equal(queries.boxes[image, start:start + n], target["boxes"])
                # an image with fewer targets leaves the rest of the slots empty (DINO's padding)
                assert (queries.labels[image, start + n:start + 3] == -1).all()
                assert (queries.boxes[image, start + n:start + 3] == 0).all()
                assert (queries.content[image, start + n:start + 3] == 0).all()
                assert torch.equal(queries.content[image, start:start + n],
                                   denoiser.label_embed(target["labels"]))
    assert torch.allclose(queries.reference_unsigmoid, inverse_sigmoid(queries.boxes[..., :2]))


def test_a_batch_without_targets_has_no_denoising_queries():
    denoiser = ContrastiveDenoising(NUM_CLASSES, 16, denoising_queries=6)
    assert denoiser(targets_of([0, 0]), 2) is None
    with pytest.raises(ValueError, match="one target dict per image: 3 images, 2 targets"):
        denoiser(targets_of([1, 0]), 3)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1), scale=st.floats(0.05, 1.0), counts=st.lists(st.integers(0, 5), min_size=1,
                                                                                       max_size=4))
def test_box_noise_moves_positive_corners_less_than_negative_ones(seed, scale, counts):
    """DINO's corner noise, in half box sides: positives |u| < scale, negatives scale <= |u| < 2
    scale, for every corner the image border does not clip."""
    if not any(counts):
        counts = counts + [1]
    targets = targets_of(counts, seed)
    torch.manual_seed(seed)
    denoiser = ContrastiveDenoising(NUM_CLASSES, 8, denoising_queries=5, label_noise_ratio=0.0, box_noise_scale=scale)
    queries = denoiser(targets, len(targets))
    max_targets = queries.max_targets
    for image, (target, n) in enumerate(zip(targets, counts)):
        original = box_cxcywh_to_xyxy(target["boxes"])
        half_sides = target["boxes"][:, 2:].repeat(1, 2) / 2
        for group in range(queries.num_groups):
            for copy, (_low, high) in enumerate(((0.0, scale), (scale, 2 * scale))):
                start = (2 * group + copy) * max_targets
                noised = queries.boxes[image, start:start + n]
                if copy == 0:  # a positive box stays around its centre, so it converts back exactly
                    moved = (box_cxcywh_to_xyxy(noised) - original).abs() / half_sides
                    unclipped = (box_cxcywh_to_xyxy(noised) > 1e-6) & (box_cxcywh_to_xyxy(noised) < 1 - 1e-6)
                    assert (moved[unclipped] < high + 1e-4).all()
                    assert ((noised[:, :2] - target["boxes"][:, :2]).abs()
                            <= scale * target["boxes"][:, 2:] / 2 + 1e-5).all()
                else:
                    assert (noised[:, 2:] >= 0).all() and (noised >= 0).all() and (noised <= 1).all()


def test_negatives_are_farther_than_positives():
    """Where nothing is clipped, every negative corner moved at least `scale` half sides and every
    positive corner less (a sample of 2000 boxes)."""
    torch.manual_seed(0)
    scale = 0.4  # small enough that no corner crosses its opposite
    targets = [{"labels": torch.zeros(1000, dtype=torch.long),
                "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]).repeat(1000, 1)}]
    denoiser = ContrastiveDenoising(NUM_CLASSES, 8, denoising_queries=1000, label_noise_ratio=0.0,
                                    box_noise_scale=scale)
    queries = denoiser(targets, 1)
    original = box_cxcywh_to_xyxy(targets[0]["boxes"])
    moved_pos = (box_cxcywh_to_xyxy(queries.boxes[0, :1000]) - original).abs() / 0.1
    moved_neg = (box_cxcywh_to_xyxy(queries.boxes[0, 1000:]) - original).abs() / 0.1
    assert moved_pos.max() < scale + 1e-4
    assert moved_neg.min() > scale - 1e-4 and moved_neg.max() < 2 * scale + 1e-4
    assert moved_pos.mean() == pytest.approx(scale / 2, rel=0.05)
    assert moved_neg.mean() == pytest.approx(1.5 * scale, rel=0.05)


def test_label_noise_flips_half_the_ratio_of_labels_to_a_random_class():
    torch.manual_seed(0)
    targets = [{"labels": torch.zeros(4000, dtype=torch.long), "boxes": torch.full((4000, 4), 0.5)}]
    queries = ContrastiveDenoising(NUM_CLASSES, 8, denoising_queries=4000, label_noise_ratio=0.5)(targets, 1)
    labels = queries.labels[0]
    # flipped with probability 0.25 to a uniform class (which is the old one a quarter of the time)
    changed = (labels != 0).float().mean().item()
    assert changed == pytest.approx(0.25 * (1 - 1 / NUM_CLASSES), abs=0.015)
    assert set(labels.unique().tolist()) == set(range(NUM_CLASSES))
    clean = ContrastiveDenoising(NUM_CLASSES, 8, denoising_queries=4000, label_noise_ratio=0.0)(targets, 1)
    assert (clean.labels == 0).all()


# ------------------------------------------------------------------------------------------------
# the attention mask
# ------------------------------------------------------------------------------------------------
def dino_attn_mask(num_dn_groups, group_size, num_groups, queries_per_group):
    """DINO's attention mask (True = masked out), written out from its rules, with Group DETR's
    block-diagonal matching groups (K = 1 is DINO's mask exactly): matching queries do not see
    the denoising part, denoising group i sees neither the groups before it nor after it."""
    pad = num_dn_groups * group_size
    size = pad + num_groups * queries_per_group
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[pad:, :pad] = True
    for i in range(num_dn_groups):
        rows = slice(group_size * i, group_size * (i + 1))
        mask[rows, group_size * (i + 1):pad] = True
        mask[rows, :group_size * i] = True
    for g in range(num_groups):
        rows = slice(pad + g * queries_per_group, pad + (g + 1) * queries_per_group)
        mask[rows, pad:pad + g * queries_per_group] = True
        mask[rows, pad + (g + 1) * queries_per_group:] = True
    return mask


@pytest.mark.parametrize("counts,budget,num_groups,queries_per_group,contrastive",
                         [([2, 1], 4, 1, 5, True), ([3, 3, 1], 7, 3, 4, True), ([1], 3, 2, 3, False)])
def test_the_layout_is_dinos_mask(counts, budget, num_groups, queries_per_group, contrastive):
    denoiser = ContrastiveDenoising(NUM_CLASSES, 8, denoising_queries=budget, contrastive=contrastive)
    queries = denoiser(targets_of(counts), len(counts))
    layout = queries.layout(num_groups, queries_per_group)
    assert layout.denoising_sees == "all"  # DINO: denoising queries see every matching query
    expected = dino_attn_mask(queries.num_groups, queries.group_size, num_groups, queries_per_group)
    assert torch.equal(layout.mha_attn_mask(), expected)


# ------------------------------------------------------------------------------------------------
# the detector
# ------------------------------------------------------------------------------------------------
def test_training_runs_the_denoising_prefix_and_eval_does_not():
    model = tiny_model(num_groups=3, num_queries=5, denoising_queries=6).train()
    images, mask = images_of(2)
    targets = targets_of([2, 3])
    out = model(images, mask, targets)
    assert out["pred_logits"].shape == (2, 15, NUM_CLASSES)
    assert out["dn_meta"] == {"num_groups": 2, "max_targets": 3, "group_size": 6}
    assert out["dn_outputs"]["pred_logits"].shape == (2, 12, NUM_CLASSES)
    assert out["dn_outputs"]["pred_boxes"].shape == (2, 12, 4)
    assert len(out["dn_outputs"]["aux_outputs"]) == 1
    with pytest.raises(ValueError, match="needs the targets in training"):
        model(images, mask)
    model.eval()
    evaluated = model(images, mask)
    assert evaluated["pred_logits"].shape == (2, 5, NUM_CLASSES)
    assert "dn_outputs" not in evaluated and "dn_meta" not in evaluated
    # eval ignores the targets: only the first matching group runs, as without denoising
    assert torch.equal(model(images, mask, targets)["pred_boxes"], evaluated["pred_boxes"])


def test_denoising_does_not_change_the_matching_queries_outputs():
    """Matching queries never see denoising queries: their outputs are those of the same model
    run without the prefix."""
    model = tiny_model(num_groups=2, num_queries=4, denoising_queries=6).train()
    images, mask = images_of(2)
    with_prefix = model(images, mask, targets_of([2, 1]))
    without = model(images, mask, targets_of([0, 0]))
    assert "dn_outputs" not in without
    torch.testing.assert_close(with_prefix["pred_boxes"], without["pred_boxes"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(with_prefix["pred_logits"], without["pred_logits"], rtol=1e-5, atol=1e-5)


@settings(max_examples=10, deadline=None)
@given(group=st.integers(0, 2), seed=st.integers(0, 1000))
def test_perturbing_one_denoising_group_changes_only_that_group(group, seed):
    """No leak, through the whole decoder: a perturbed denoising group changes no matching
    query's output and no other denoising group's."""
    model = tiny_model(num_groups=2, num_queries=4, denoising_queries=6).train()
    images, mask = images_of(2)
    queries = model.denoising(targets_of([2, 1], seed), 2)
    assert queries.num_groups == 3
    size = queries.group_size
    generator = torch.Generator().manual_seed(seed)
    perturbed = dataclasses.replace(queries, content=queries.content.clone(), query_pos=queries.query_pos.clone())
    perturbed.content[:, group * size:(group + 1) * size] += torch.randn(2, size, 32, generator=generator)
    perturbed.query_pos[:, group * size:(group + 1) * size] += torch.randn(2, size, 32, generator=generator)
    layout = queries.layout(2, 4)
    embed = model.query_embed.weight
    before, after = model._forward(images, mask, embed, layout, queries), model._forward(images, mask, embed, layout,
                                                                                          perturbed)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)
        changed = (after["dn_outputs"][key] - before["dn_outputs"][key]).abs().amax(dim=(0, 2))
        inside = torch.zeros(queries.num_queries, dtype=torch.bool)
        inside[group * size:(group + 1) * size] = True
        assert (changed[~inside] == 0).all()
    assert (after["dn_outputs"]["pred_logits"] != before["dn_outputs"]["pred_logits"]).any()


# ------------------------------------------------------------------------------------------------
# the losses
# ------------------------------------------------------------------------------------------------
def test_denoising_indices_point_at_each_groups_positives():
    meta = {"num_groups": 2, "max_targets": 3, "group_size": 6}
    (q0, t0), (q1, t1), (q2, t2) = denoising_indices(meta, targets_of([3, 1, 0]))
    assert q0.tolist() == [0, 1, 2, 6, 7, 8] and t0.tolist() == [0, 1, 2, 0, 1, 2]
    assert q1.tolist() == [0, 6] and t1.tolist() == [0, 0]
    assert q2.numel() == 0 and t2.numel() == 0


def test_denoising_losses_are_dinos():
    """Focal loss over every denoising query (one-hot at the positives, "no object" elsewhere),
    L1 and GIoU at the positives against their own targets, per layer, / (num_boxes * G)."""
    from group_detr.box_ops import elementwise_generalized_box_iou
    model = tiny_model(num_groups=3, num_queries=5, denoising_queries=6).train()
    images, mask = images_of(2)
    targets = targets_of([2, 3])
    out = model(images, mask, targets)
    losses = tiny_criterion()(out, targets)
    num_groups, group_size = out["dn_meta"]["num_groups"], out["dn_meta"]["group_size"]
    normaliser = 5 * num_groups  # 5 boxes
    for layer, suffix in ((out["dn_outputs"], "_dn"), (out["dn_outputs"]["aux_outputs"][0], "_dn_0")):
        onehot = torch.zeros_like(layer["pred_logits"])
        l1 = giou = 0.0
        for image, target in enumerate(targets):
            for g in range(num_groups):
                for t in range(len(target["labels"])):
                    slot = g * group_size + t
                    onehot[image, slot, target["labels"][t]] = 1
                    pred, gt = layer["pred_boxes"][image, slot], target["boxes"][t]
                    l1 = l1 + (pred - gt).abs().sum()
                    giou = giou + 1 - elementwise_generalized_box_iou(box_cxcywh_to_xyxy(pred[None]),
                                                                      box_cxcywh_to_xyxy(gt[None]))[0]
        expected_ce = sigmoid_focal_loss(layer["pred_logits"], onehot, 0.25, 2.0) / normaliser
        torch.testing.assert_close(losses["loss_ce" + suffix], expected_ce)
        torch.testing.assert_close(losses["loss_bbox" + suffix], l1 / normaliser)
        torch.testing.assert_close(losses["loss_giou" + suffix], giou / normaliser)
    # the matching losses are the ones of a criterion without denoising
    plain = tiny_criterion(denoising=False)(out, targets)
    for key, value in plain.items():
        torch.testing.assert_close(losses[key], value)
    assert set(losses) - set(plain) == {f"{name}_dn{layer}" for name in ("loss_ce", "loss_bbox", "loss_giou")
                                        for layer in ("", "_0")}


def test_a_batch_without_targets_gives_zero_denoising_losses_and_trains():
    model = tiny_model().train()
    criterion = tiny_criterion()
    images, mask = images_of(2)
    targets = targets_of([0, 0])
    losses = criterion(model(images, mask, targets), targets)
    assert all(losses[k] == 0 for k in losses if "_dn" in k) and len([k for k in losses if "_dn" in k]) == 6
    loss = criterion.weighted_sum(losses)
    loss.backward()
    assert torch.isfinite(loss)


def test_weight_dict_gives_denoising_losses_the_matching_weights():
    weights = default_weight_dict(3, cls=4.0, bbox=5.0, giou=2.0, denoising=True)
    assert weights["loss_ce_dn"] == weights["loss_ce_dn_1"] == 4.0 and weights["loss_giou_dn_0"] == 2.0
    assert len(weights) == 18 and len(default_weight_dict(3)) == 9


# ------------------------------------------------------------------------------------------------
# bad settings
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,message", [
    ({"denoising_queries": -1}, "config.denoising_queries must be an int >= 0"),
    ({"denoising_queries": 2.5}, "config.denoising_queries must be an int >= 0"),
    ({"denoising_queries": True}, "config.denoising_queries must be an int >= 0"),
    ({"denoising_label_noise": 1.5}, r"config.denoising_label_noise must be in \[0, 1\]"),
    ({"denoising_label_noise": -0.1}, r"config.denoising_label_noise must be in \[0, 1\]"),
    ({"denoising_box_noise": 1.2}, r"config.denoising_box_noise must be in \[0, 1\]"),
    ({"denoising_box_noise": -0.5}, r"config.denoising_box_noise must be in \[0, 1\]"),
    ({"denoising_queries": 12, "attention_backend": "folded"}, "config.attention_backend='folded' cannot hold"),
])
def test_bad_denoising_settings_raise_at_config_time(overrides, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(demo_config(), **overrides).validate()


def test_denoising_off_by_default_and_folded_fine_without_it():
    assert TrainConfig().denoising_queries == 0 and demo_config().denoising_queries == 0
    dataclasses.replace(demo_config(), attention_backend="folded").validate()


@pytest.mark.parametrize("kwargs,message", [
    ({"denoising_queries": 0}, "denoising_queries must be >= 1"),
    ({"label_noise_ratio": 2.0}, r"denoising_label_noise must be in \[0, 1\]"),
    ({"box_noise_scale": 3.0}, r"denoising_box_noise must be in \[0, 1\]"),
])
def test_bad_denoiser_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ContrastiveDenoising(NUM_CLASSES, 8, **kwargs)


def test_an_unknown_attention_backend_raises_when_the_model_is_built():
    with pytest.raises(ValueError, match="backend must be one of"):
        build_group_detr(NUM_CLASSES, backbone="small", hidden_dim=32, nheads=4, enc_layers=1, dec_layers=1,
                         dim_feedforward=32, small_widths=(8, 16), attention_backend="dense")


def test_denoising_queries_dataclass_sizes():
    queries = DenoisingQueries(*(torch.zeros(1),) * 5, num_groups=3, max_targets=2, contrastive=False)
    assert (queries.group_size, queries.num_queries) == (2, 6)


# ------------------------------------------------------------------------------------------------
# a training run
# ------------------------------------------------------------------------------------------------
def test_a_training_run_with_denoising_logs_its_losses_and_layouts(tmp_path):
    import json

    from group_detr.data import write_synthetic_dataset
    from group_detr.engine import train
    data_dir = str(tmp_path / "synth")
    write_synthetic_dataset(data_dir, num_train=8, num_val=4, image_size=64, seed=1)
    config = TrainConfig(
        data_dir=data_dir, train_split="train", val_split="val", train_scales=(64,), max_size=96,
        crop_resize=(64,), crop_size=(64, 64), eval_size=64, backbone="small", small_widths=(8, 16, 16, 32),
        hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=64, dropout=0.0, num_queries=5,
        num_groups=3, lr=1e-3, lr_backbone=1e-3, epochs=1, batch_size=4, output_dir=str(tmp_path / "run"),
        num_workers=0, print_freq=1, num_vis_images=1, denoising_queries=6)
    pytest.importorskip("pycocotools")
    result = train(config, log=lambda _: None)
    with open(result["log"]) as f:
        record = json.loads(f.readline())
    assert record["train_denoising_layouts"] >= 1
    assert record["train_loss_ce_dn"] > 0 and record["train_loss_giou_dn"] > 0
    assert result["model"].denoising is not None


def test_weighted_sum_with_no_weighted_loss_is_a_value_error():
    criterion = tiny_criterion(denoising=False)
    assert criterion.weighted_sum({"loss_ce": torch.tensor(2.0)}).item() == 2.0 * criterion.weight_dict["loss_ce"]
    with pytest.raises(ValueError, match="has a weight in weight_dict"):
        criterion.weighted_sum({"loss_unknown": torch.tensor(1.0)})
