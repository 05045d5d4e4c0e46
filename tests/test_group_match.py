"""GroupMatcher's one-pass CPU op (group_detr::group_match) against its two-step path.

The one-pass op computes each (image, group) problem's cost with the fused cost's kernel and
solves it with the CPU solver, so its pairs must be those of `assign(cost_matrix(...))` with the
fused cost, bit for bit, and its errors the same, on every input: random shapes, more targets
than queries, empty images, ties, non-finite predictions with validate on and off, every dtype.
(GroupMatcher against the torch reference and scipy: tests/test_matcher.py and
tests/test_match_cost.py.)
"""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import CPU_BUILDS, cpu_build
from group_detr import GroupMatcher, _ext

pytestmark = pytest.mark.skipif(not _ext.has_group_match_cpu(), reason="needs the built extension")

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def random_batch(seed, num_images, num_groups, per_group, num_classes, max_targets, dtype,
                 quantise, bad, bad_fraction):
    gen = torch.Generator().manual_seed(seed)
    queries = num_groups * per_group
    logits = torch.randn(num_images, queries, num_classes, generator=gen) * 3
    boxes = torch.rand(num_images, queries, 4, generator=gen) * 0.5 + 0.1
    if quantise:  # few distinct values: many equal costs, so ties must break alike
        logits, boxes = logits.round(), (boxes * 4).round() / 4
    if bad is not None:
        for tensor in (logits, boxes):
            tensor.masked_fill_(torch.rand(tensor.shape, generator=gen) < bad_fraction, bad)
    targets = []
    for _ in range(num_images):
        m = int(torch.randint(0, max_targets + 1, (1,), generator=gen))
        target_boxes = torch.rand(m, 4, generator=gen) * 0.5 + 0.1
        if quantise:
            target_boxes = (target_boxes * 4).round() / 4
        targets.append({"labels": torch.randint(0, num_classes, (m,), generator=gen),
                        "boxes": target_boxes})
    return {"pred_logits": logits.to(dtype), "pred_boxes": boxes.to(dtype)}, targets


def outcome(fn):
    """The pairs of fn(), or the type and message of what it raised."""
    try:
        return [(q.tolist(), t.tolist()) for q, t in fn()]
    except (ValueError, TypeError) as error:
        return type(error), str(error).splitlines()[0]


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), num_images=st.integers(0, 4), num_groups=st.integers(1, 4),
       per_group=st.integers(1, 20), num_classes=st.integers(1, 12), max_targets=st.integers(0, 25),
       dtype=st.sampled_from(DTYPES), class_cost=st.sampled_from(["focal", "focal_logsigmoid", "softmax"]),
       quantise=st.booleans(), validate=st.booleans(),
       bad=st.sampled_from([None, None, float("nan"), float("inf"), float("-inf")]),
       bad_fraction=st.floats(0.0, 0.3))
def test_one_pass_equals_two_steps(one_thread, seed, num_images, num_groups, per_group, num_classes,
                                   max_targets, dtype, class_cost, quantise, validate, bad,
                                   bad_fraction):
    outputs, targets = random_batch(seed, num_images, num_groups, per_group, num_classes,
                                    max_targets, dtype, quantise, bad, bad_fraction)
    matcher = GroupMatcher(num_groups=num_groups, class_cost=class_cost, validate=validate)
    assert matcher._matches_in_one_pass(outputs, outputs["pred_logits"], outputs["pred_boxes"])

    def two_steps():
        cost, sizes = matcher.cost_matrix(outputs, targets)
        return matcher.assign(cost, sizes)

    assert outcome(lambda: matcher(outputs, targets)) == outcome(two_steps)


@pytest.mark.parametrize("threads", [1, 2])
def test_one_pass_equals_two_steps_on_workloads(threads):
    from workloads import load_workloads, matcher_inputs

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for name, spec in load_workloads("matcher").items():
            outputs, targets = matcher_inputs(spec)
            matcher = GroupMatcher(num_groups=spec["groups"])
            cost, sizes = matcher.cost_matrix(outputs, targets)
            expected = matcher.assign(cost, sizes)
            for (q, t), (eq, et) in zip(matcher(outputs, targets), expected):
                assert torch.equal(q, eq) and torch.equal(t, et), name
    finally:
        torch.set_num_threads(previous)


def test_every_cpu_build_agrees():
    outputs, targets = random_batch(3, 3, 3, 17, 6, 9, torch.float32, False, None, 0.0)
    matcher = GroupMatcher(num_groups=3)
    outcomes = []
    for build in CPU_BUILDS:
        with cpu_build(build):
            outcomes.append(outcome(lambda: matcher(outputs, targets)))
    assert all(o == outcomes[0] for o in outcomes)


def test_when_one_pass_is_used():
    outputs, targets = random_batch(0, 2, 2, 5, 4, 3, torch.float32, False, None, 0.0)
    logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
    assert GroupMatcher(num_groups=2)._matches_in_one_pass(outputs, logits, boxes)
    assert GroupMatcher(num_groups=2, backend="cpu")._matches_in_one_pass(outputs, logits, boxes)
    # The reference paths stay selectable: torch cost, scipy solver, and masks go in two steps.
    assert not GroupMatcher(num_groups=2, cost_backend="torch")._matches_in_one_pass(outputs, logits, boxes)
    assert not GroupMatcher(num_groups=2, backend="scipy")._matches_in_one_pass(outputs, logits, boxes)
    with_masks = dict(outputs, pred_masks=torch.zeros(2, 10, 4, 4))
    assert not GroupMatcher(num_groups=2)._matches_in_one_pass(with_masks, logits, boxes)


def test_opcheck():
    outputs, targets = random_batch(1, 3, 2, 6, 5, 4, torch.float32, False, None, 0.0)
    labels = [t["labels"] for t in targets]
    boxes = [t["boxes"] for t in targets]
    for class_cost in ("focal", "focal_logsigmoid", "softmax"):
        for validate in (True, False):
            torch.library.opcheck(
                torch.ops.group_detr.group_match.default,
                (outputs["pred_logits"], outputs["pred_boxes"], labels, boxes, 2, 2.0, 5.0, 2.0,
                 class_cost, 0.25, 2.0, validate))


def op_inputs():
    outputs, targets = random_batch(2, 2, 2, 4, 3, 3, torch.float32, False, None, 0.0)
    targets[0] = {"labels": torch.tensor([0, 2]), "boxes": torch.rand(2, 4) * 0.5 + 0.1}
    return [outputs["pred_logits"], outputs["pred_boxes"], [t["labels"] for t in targets],
            [t["boxes"] for t in targets], 2]


def test_op_returns_each_images_pairs():
    args = op_inputs()
    query, target, status = torch.ops.group_detr.group_match(*args, 2.0, 5.0, 2.0, "focal", 0.25,
                                                             2.0, True)
    assert len(query) == len(target) == 2 and status.shape == (4,) and (status == 0).all()
    for q, t, labels in zip(query, target, args[2]):
        assert len(q) == len(t) == 2 * min(4, len(labels))
        assert q.dtype == t.dtype == torch.int64 and (q.diff() > 0).all()


@pytest.mark.parametrize("case, error, message", [
    ("logits_2d", ValueError, r"logits must be \(B, Q, C\)"),
    ("pred_boxes_shape", ValueError, "pred_boxes must be"),
    ("labels_length", ValueError, "labels and target_boxes must hold B = 2 tensors each"),
    ("boxes_length", ValueError, "labels and target_boxes must hold B = 2 tensors each"),
    ("labels_2d", ValueError, r"labels\[0\] must be \(M,\)"),
    ("boxes_count", ValueError, r"target_boxes\[0\] must be \(M, 4\) = \(2, 4\)"),
    ("boxes_shape", ValueError, r"target_boxes\[1\] must be \(M, 4\)"),
    ("labels_int32", TypeError, "labels must be int64"),
    ("logits_int", TypeError, "logits and boxes must be"),
    ("boxes_int", TypeError, "logits and boxes must be"),
    ("groups", ValueError, "is not divisible by num_groups 3"),
    ("label_high", ValueError, r"target 0 has class id 5 outside \[0, 3\)"),
    ("box_nan", ValueError, "target boxes contain NaN or infinite values"),
    ("box_negative", ValueError, "negative width or height"),
    ("class_cost", ValueError, "class_cost must be 'focal', 'focal_logsigmoid' or 'softmax'"),
])
def test_op_bad_input(case, error, message):
    args = op_inputs()
    labels, boxes = [l.clone() for l in args[2]], [b.clone() for b in args[3]]
    args[2], args[3] = labels, boxes
    class_cost = "focal"
    if case == "logits_2d":
        args[0] = args[0][0]
    elif case == "pred_boxes_shape":
        args[1] = args[1][:, :, :3]
    elif case == "labels_length":
        labels.append(labels[0])
    elif case == "boxes_length":
        boxes.pop()
    elif case == "labels_2d":
        labels[0] = labels[0][:, None]
    elif case == "boxes_count":
        boxes[0] = boxes[0][:1]
    elif case == "boxes_shape":
        boxes[1] = boxes[1][:, :3]
    elif case == "labels_int32":
        labels[1] = labels[1].int()
    elif case == "logits_int":
        args[0] = args[0].long()
    elif case == "boxes_int":
        boxes[0] = boxes[0].long()
    elif case == "groups":
        args[4] = 3
    elif case == "label_high":
        labels[0][1] = 5
    elif case == "box_nan":
        boxes[0][0, 1] = float("nan")
    elif case == "box_negative":
        boxes[0][1, 2] = -0.1
    elif case == "class_cost":
        class_cost = "sigmoid"
    with pytest.raises(error, match=message):
        torch.ops.group_detr.group_match(*args, 2.0, 5.0, 2.0, class_cost, 0.25, 2.0, True)


def test_unvalidated_op_clamps_labels_and_skips_box_checks():
    args = op_inputs()
    args[2] = [l.clone() for l in args[2]]
    args[3] = [b.clone() for b in args[3]]
    args[2][0][0] = 7  # past the 3 classes: clamped to class 2, as pad_targets does
    args[3][0][1, 2] = -0.1
    query, target, status = torch.ops.group_detr.group_match(*args, 2.0, 5.0, 2.0, "focal", 0.25,
                                                             2.0, False)
    assert (status == 0).all()
    pairs = [2 * min(4, len(labels)) for labels in args[2]]
    assert [len(q) for q in query] == [len(t) for t in target] == pairs