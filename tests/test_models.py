"""The detector, backbones, criterion and post-processing (group_detr.models)."""
import dataclasses

import pytest
import torch

import group_detr.attention as attention_module
from group_detr.matcher import GroupMatcher
from group_detr.models import (PostProcess, ResNet50, SetCriterion, build_group_detr,
                               default_weight_dict, load_backbone_weights)
from group_detr.models.backbone import FrozenBatchNorm2d, SmallConvBackbone

NUM_CLASSES = 4


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(num_groups=3, num_queries=5, dec_layers=2, seed=0):
    torch.manual_seed(seed)
    return build_group_detr(NUM_CLASSES, num_groups=num_groups, num_queries=num_queries, backbone="small",
                            hidden_dim=32, nheads=4, enc_layers=1, dec_layers=dec_layers, dim_feedforward=64,
                            dropout=0.0, small_widths=(8, 16, 16, 32))


def tiny_criterion(num_queries=5, dec_layers=2):
    matcher = GroupMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0)
    return SetCriterion(NUM_CLASSES, matcher, default_weight_dict(dec_layers), queries_per_group=num_queries)


def batch(num_images=2, size=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(num_images, 3, size, size, generator=generator)
    mask = torch.zeros(num_images, size, size, dtype=torch.bool)
    mask[0, :, size * 3 // 4:] = True  # the first image is padded on the right
    targets = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4]])},
               {"labels": torch.tensor([3]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])}][:num_images]
    return images, mask, targets


# ----------------------------------------------------------------------------------------------
# detector


def test_training_outputs_k_times_n_queries_with_aux_layers():
    model = tiny_model(num_groups=3, num_queries=5, dec_layers=3).train()
    images, mask, _ = batch()
    out = model(images, mask)
    assert out["pred_logits"].shape == (2, 15, NUM_CLASSES)
    assert out["pred_boxes"].shape == (2, 15, 4)
    assert len(out["aux_outputs"]) == 2
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (2, 15, NUM_CLASSES) and aux["pred_boxes"].shape == (2, 15, 4)
    assert ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()


def test_groups_are_independent_in_training():
    # Group DETR: a group's outputs must not depend on another group's queries.
    model = tiny_model(num_groups=3, num_queries=5).train()
    images, mask, _ = batch()
    before = model(images, mask)["pred_boxes"]
    with torch.no_grad():
        model.query_embed.weight[5:10] += 1.0  # perturb group 1 only
    after = model(images, mask)["pred_boxes"]
    torch.testing.assert_close(after[:, :5], before[:, :5])
    torch.testing.assert_close(after[:, 10:], before[:, 10:])
    assert not torch.allclose(after[:, 5:10], before[:, 5:10])


def test_eval_uses_first_group_and_equals_single_group_model():
    grouped = tiny_model(num_groups=4, num_queries=5).eval()
    single = tiny_model(num_groups=1, num_queries=5, seed=1).eval()
    state = grouped.state_dict()
    state["query_embed.weight"] = state["query_embed.weight"][:5]
    single.load_state_dict(state)
    images, mask, _ = batch()
    with torch.no_grad():
        out_grouped, out_single = grouped(images, mask), single(images, mask)
    assert out_grouped["pred_logits"].shape == (2, 5, NUM_CLASSES)
    torch.testing.assert_close(out_grouped["pred_logits"], out_single["pred_logits"])
    torch.testing.assert_close(out_grouped["pred_boxes"], out_single["pred_boxes"])


def test_eval_runs_no_group_code(monkeypatch):
    layouts = []
    original = attention_module.grouped_attention

    def recording(q, k, v, layout, *args, **kwargs):
        layouts.append(layout)
        return original(q, k, v, layout, *args, **kwargs)

    monkeypatch.setattr(attention_module, "grouped_attention", recording)
    model = tiny_model(num_groups=4, num_queries=5, dec_layers=2)
    images, mask, _ = batch()
    model.eval()
    with torch.no_grad():
        model(images, mask)
    assert [(l.num_groups, l.queries_per_group) for l in layouts] == [(1, 5)] * 2
    layouts.clear()
    model.train()
    model(images, mask)
    assert [(l.num_groups, l.queries_per_group) for l in layouts] == [(4, 5)] * 2


def test_padding_does_not_change_predictions():
    # The padding mask hides padded pixels from attention, and positions are normalised by the
    # unpadded extent, so padding an image must not change its (normalised) predictions much.
    model = tiny_model().eval()
    image = torch.randn(1, 3, 64, 64)
    padded = torch.zeros(1, 3, 64, 96)
    padded[..., :64] = image
    mask = torch.zeros(1, 64, 96, dtype=torch.bool)
    mask[..., 64:] = True
    with torch.no_grad():
        plain = model(image)
        masked = model(padded, mask)
    # the CNN sees the zero padding at the border (receptive field), so not exactly equal
    assert (plain["pred_boxes"] - masked["pred_boxes"]).abs().max() < 0.05


def test_bad_images_raise():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"images must be \(B, 3, H, W\)"):
        model(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="num_queries and num_groups must be >= 1"):
        tiny_model(num_groups=0)


# ----------------------------------------------------------------------------------------------
# backbones


def torchvision_resnet50_shapes():
    """The state-dict keys and shapes of torchvision.models.resnet50(), written out by hand."""
    shapes = {"conv1.weight": (64, 3, 7, 7)}

    def bn(prefix, channels):
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{name}"] = (channels,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    bn("bn1", 64)
    inplanes = 64
    for layer, (planes, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3)), start=1):
        for block in range(blocks):
            prefix = f"layer{layer}.{block}"
            shapes[f"{prefix}.conv1.weight"] = (planes, inplanes, 1, 1)
            bn(f"{prefix}.bn1", planes)
            shapes[f"{prefix}.conv2.weight"] = (planes, planes, 3, 3)
            bn(f"{prefix}.bn2", planes)
            shapes[f"{prefix}.conv3.weight"] = (planes * 4, planes, 1, 1)
            bn(f"{prefix}.bn3", planes * 4)
            if block == 0:
                shapes[f"{prefix}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                bn(f"{prefix}.downsample.1", planes * 4)
            inplanes = planes * 4
    shapes["fc.weight"] = (1000, 2048)
    shapes["fc.bias"] = (1000,)
    return shapes


@pytest.fixture(scope="module")
def resnet50():
    return ResNet50()


def test_resnet50_loads_a_torchvision_checkpoint(resnet50, tmp_path):
    generator = torch.Generator().manual_seed(0)
    state = {k: (torch.tensor(0) if not shape else torch.rand(shape, generator=generator) + 0.5)
             for k, shape in torchvision_resnet50_shapes().items()}
    path = tmp_path / "resnet50-0676ba61.pth"
    torch.save(state, path)
    load_backbone_weights(resnet50, str(path))
    own = resnet50.state_dict()
    # every torchvision tensor but the classifier and the batch counters has a home
    expected = {k for k in state if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    assert set(own) == expected
    for key in expected:
        torch.testing.assert_close(own[key], state[key])


def test_resnet50_is_c5_with_frozen_batch_norm(resnet50):
    features = resnet50(torch.randn(1, 3, 64, 96))
    assert features.shape == (1, 2048, 2, 3)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in resnet50.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in resnet50.modules()) == 53
    trainable = {n.split(".")[0] for n, p in resnet50.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}  # stem and layer1 frozen, as DETR


def test_backbone_weights_that_do_not_fit_raise(resnet50, tmp_path):
    state = {k: torch.zeros(s) for k, s in torchvision_resnet50_shapes().items()}
    del state["layer4.2.conv3.weight"]
    torch.save(state, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"do not fit ResNet50: missing \['layer4.2.conv3.weight'\]"):
        load_backbone_weights(resnet50, str(tmp_path / "missing.pth"))
    state["layer4.2.conv3.weight"] = torch.zeros(2048, 512, 3, 3)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match="wrong shape for"):
        load_backbone_weights(resnet50, str(tmp_path / "shape.pth"))
    with pytest.raises(FileNotFoundError, match="backbone weights not found"):
        load_backbone_weights(resnet50, str(tmp_path / "nope.pth"))
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot load backbone weights"):
        load_backbone_weights(resnet50, str(tmp_path / "garbage.pth"))


def test_resnet50_detector_forward():
    torch.manual_seed(0)
    model = build_group_detr(NUM_CLASSES, num_groups=2, num_queries=3, backbone="resnet50", hidden_dim=32,
                             nheads=4, enc_layers=1, dec_layers=1, dim_feedforward=32).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out["pred_logits"].shape == (1, 3, NUM_CLASSES) and "aux_outputs" in out


# ----------------------------------------------------------------------------------------------
# criterion


def test_criterion_losses_have_all_layers_and_are_finite():
    model, criterion = tiny_model(dec_layers=3), tiny_criterion(dec_layers=3)
    images, mask, targets = batch()
    losses = criterion(model(images, mask), targets)
    expected = {"loss_ce", "loss_bbox", "loss_giou"}
    expected |= {f"{k}_{i}" for k in ("loss_ce", "loss_bbox", "loss_giou") for i in range(2)}
    assert set(losses) == expected
    assert all(torch.isfinite(v) for v in losses.values())
    assert set(criterion.weight_dict) == expected
    assert criterion.weight_dict["loss_bbox_1"] == 5.0 and criterion.weight_dict["loss_giou"] == 2.0


def test_criterion_matches_all_layers_in_one_matcher_call(monkeypatch):
    model, criterion = tiny_model(num_groups=3, dec_layers=3), tiny_criterion(dec_layers=3)
    calls = []
    forward = criterion.matcher.forward

    def counting(outputs, targets, **kwargs):
        calls.append((tuple(outputs["pred_logits"].shape[:2]), len(targets), kwargs))
        return forward(outputs, targets, **kwargs)

    monkeypatch.setattr(criterion.matcher, "forward", counting)
    images, mask, targets = batch()
    criterion(model(images, mask), targets)
    # 3 layers x 2 images stacked as 6 images of 3 groups x 5 queries: one call, so one solver
    # call (GroupMatcher solves all B*K problems of a call at once)
    assert calls == [((6, 15), 6, {"num_groups": 3})]


def test_criterion_is_normalised_by_num_boxes_times_groups():
    # K identical copies of one group match identically, so the normalised losses equal K=1's.
    _, _, targets = batch()
    torch.manual_seed(0)
    logits, boxes = torch.randn(2, 5, NUM_CLASSES), torch.rand(2, 5, 4) * 0.5 + 0.25
    criterion = tiny_criterion(dec_layers=1)
    single = criterion({"pred_logits": logits, "pred_boxes": boxes}, targets)
    repeated = criterion({"pred_logits": logits.repeat(1, 4, 1), "pred_boxes": boxes.repeat(1, 4, 1)}, targets)
    for key in single:
        torch.testing.assert_close(repeated[key], single[key])
    # and a sum over boxes divided by their number: 3 boxes here
    matched = criterion.matcher({"pred_logits": logits, "pred_boxes": boxes}, targets)
    l1 = sum((boxes[b, q] - t["boxes"][j]).abs().sum() for b, ((q, j), t) in enumerate(zip(matched, targets)))
    torch.testing.assert_close(single["loss_bbox"], l1 / 3)


def test_criterion_with_empty_targets():
    model, criterion = tiny_model(), tiny_criterion()
    images, mask, targets = batch()
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    for case in ([empty, dict(empty)], [targets[0], empty]):
        outputs = model(images, mask)
        losses = criterion(outputs, case)
        assert all(torch.isfinite(v) for v in losses.values())
        criterion.weighted_sum(losses).backward()
        assert torch.isfinite(model.class_embed.weight.grad).all()
        model.zero_grad()
    all_empty = criterion(model(images, mask), [empty, dict(empty)])
    assert all_empty["loss_bbox"] == 0 and all_empty["loss_giou"] == 0 and all_empty["loss_ce"] > 0


def test_criterion_rejects_class_ids_out_of_range():
    model, criterion = tiny_model(), tiny_criterion()
    images, mask, targets = batch()
    targets[1]["labels"] = torch.tensor([NUM_CLASSES])
    with pytest.raises(ValueError, match=r"target 1 has class id 4 outside \[0, 4\)"):
        criterion(model(images, mask), targets)


def test_overfitting_one_batch_decreases_the_loss():
    model, criterion = tiny_model(num_groups=2, num_queries=4), tiny_criterion(num_queries=4)
    images, mask, targets = batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    history = []
    for _ in range(40):
        loss = criterion.weighted_sum(criterion(model(images, mask), targets))
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert sum(history[-5:]) / 5 < 0.6 * sum(history[:5]) / 5


# ----------------------------------------------------------------------------------------------
# post-processing


def test_postprocess_returns_top_scores_in_pixels():
    logits = torch.full((1, 3, 2), -10.0)
    logits[0, 1, 1] = 5.0
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.25, 0.5, 0.5, 1.0], [0.5, 0.5, 1.0, 1.0]]])
    result = PostProcess(num_select=2)({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]]))
    assert result[0]["labels"][0] == 1 and result[0]["scores"].shape == (2,)
    torch.testing.assert_close(result[0]["boxes"][0], torch.tensor([0.0, 0.0, 100.0, 100.0]))
    with pytest.raises(ValueError, match=r"target_sizes must be \(B, 2\)"):
        PostProcess()({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([100, 200]))


def test_backbone_starts_from_a_detector_checkpoint(tmp_path):
    """backbone_weights may name one of our own checkpoints: the new detector takes its backbone
    (and nothing else) from it."""
    from group_detr.config import demo_config
    from group_detr.engine import build_model

    config = demo_config(small_widths=(8, 8, 8, 8), hidden_dim=16, nheads=2, dec_layers=1, dim_feedforward=16)
    torch.manual_seed(0)
    trained = build_model(config, num_classes=3)
    torch.save({"model": trained.state_dict(), "epoch": 3}, tmp_path / "checkpoint.pth")
    torch.manual_seed(1)
    fresh = build_model(dataclasses.replace(config, backbone_weights=str(tmp_path / "checkpoint.pth")), 3)
    for (name, a), b in zip(trained.state_dict().items(), fresh.state_dict().values()):
        if name.startswith("backbone.body."):
            torch.testing.assert_close(a, b)
    assert not torch.equal(trained.query_embed.weight, fresh.query_embed.weight)


def test_reference_points_and_forward_over_all_groups():
    """The analysis API of the detector: reference_points() are the queries' box anchors (the
    box head starts at zero offsets) and forward_all_groups() is the training forward."""
    torch.manual_seed(0)
    # GroupNorm: the backbone computes the same in train and eval mode (BatchNorm would not).
    model = build_group_detr(3, num_groups=3, num_queries=4, backbone="small", hidden_dim=32, nheads=2,
                             enc_layers=1, dec_layers=2, dim_feedforward=32, dropout=0.0, small_widths=(8, 8, 8, 8),
                             small_norm="group")
    images = torch.randn(2, 3, 64, 64)
    training = model.train()(images)
    model.eval()
    everything = model.forward_all_groups(images)
    assert everything["pred_boxes"].shape == (2, 12, 4) and model(images)["pred_boxes"].shape == (2, 4, 4)
    torch.testing.assert_close(everything["pred_boxes"], training["pred_boxes"])
    torch.testing.assert_close(everything["pred_logits"], training["pred_logits"])
    points = model.reference_points()
    assert points.shape == (12, 2)
    torch.testing.assert_close(everything["pred_boxes"][..., :2], points.expand(2, -1, -1))
    # other query embeddings move the points and the predictions with them
    other = torch.randn(12, 32)
    moved = model.forward_all_groups(images, query_embed=other)
    torch.testing.assert_close(moved["pred_boxes"][0, :, :2], model.reference_points(other))
    with pytest.raises(ValueError, match=r"query_embed must be \(12, 32\) \(K\*N, d\), got \(4, 32\)"):
        model.forward_all_groups(images, query_embed=other[:4])


@pytest.mark.parametrize("widths", [(8,), (8, 16, 24), (8, 8, 16, 16, 32)])
@pytest.mark.parametrize("norm", ["batch", "group"])
def test_small_backbone_stride_is_two_per_stage(widths, norm):
    backbone = SmallConvBackbone(widths, norm)
    norms = {type(m) for m in backbone.modules() if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm))}
    assert norms == {torch.nn.BatchNorm2d if norm == "batch" else torch.nn.GroupNorm}
    out = backbone(torch.randn(2, 3, 64, 96))
    assert backbone.stride == 2 ** len(widths) and backbone.num_channels == widths[-1]
    assert out.shape == (2, widths[-1], 64 // backbone.stride, 96 // backbone.stride)


@pytest.mark.parametrize("widths, norm, message", [
    ((), "batch", r"1 to 5 widths, each a multiple of 8, got \(\)"),
    ((8, 12), "batch", r"1 to 5 widths, each a multiple of 8, got \(8, 12\)"),
    ((8,) * 6, "batch", "1 to 5 widths"),
    ((8, 16), "layer", r"norm must be one of \('batch', 'group'\), got 'layer'"),
])
def test_small_backbone_rejects_bad_settings(widths, norm, message):
    with pytest.raises(ValueError, match=message):
        SmallConvBackbone(widths, norm)
