"""The fused matching-cost op against the torch reference: values, assignments, bad input, contracts."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from workloads import load_workloads, matcher_inputs

import group_detr
from conftest import CPU_BUILDS, cpu_build
from group_detr import GroupMatcher, _ext, linear_sum_assignment
from group_detr.match_cost import match_cost, match_cost_torch

pytestmark = pytest.mark.skipif(
    not group_detr.backends()["match_cost_cpu"], reason="group_detr._C is not built"
)

WORKLOADS = load_workloads("matcher")
# The op's classic focal log and softmax exp are Cephes' (<= 2 ulp), torch's MKL's or Sleef's
# (<= 1 ulp): a few ulp of the largest term (the focal cost's -log(1e-8) = 18.4 times its
# weight) apart. Its sigmoid and log-sigmoid are torch's bit for bit (tests/test_client_compat.py).
ATOL, RTOL = 2e-5, 1e-5


def random_inputs(gen, batch, queries, classes, targets, scale=3.0):
    logits = torch.randn(batch, queries, classes, generator=gen) * scale
    centre = torch.rand(batch, queries + targets, 2, generator=gen) * 0.8 + 0.1
    size = torch.rand(batch, queries + targets, 2, generator=gen) * 0.5
    boxes = torch.cat([centre, size], -1)
    labels = torch.randint(max(classes, 1), (batch, targets), generator=gen)
    return logits, boxes[:, :queries], labels, boxes[:, queries:]


def both(logits, pred_boxes, labels, tgt_boxes, **kwargs):
    fused = match_cost(logits, pred_boxes, labels, tgt_boxes, backend="fused", **kwargs)
    reference = match_cost_torch(logits, pred_boxes, labels, tgt_boxes, **kwargs)
    return fused, reference


@settings(max_examples=60, deadline=None)
@given(
    shape=st.tuples(st.integers(0, 3), st.integers(0, 24), st.integers(1, 20), st.integers(0, 19)),
    seed=st.integers(0, 2**31 - 1),
    class_cost=st.sampled_from(["focal", "focal_logsigmoid", "softmax"]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
    weights=st.sampled_from([(2.0, 5.0, 2.0), (1.0, 0.0, 0.0), (0.0, 5.0, 0.0), (0.0, 0.0, 2.0),
                             (0.0, 1.0, 1.0), (3.5, 0.0, 1.0)]),
    focal=st.sampled_from([(0.25, 2.0), (0.5, 1.5), (0.1, 0.0), (0.25, 3.0)]),
    layout=st.sampled_from(["contiguous", "transposed", "sliced"]),
)
def test_equals_reference_on_random_inputs(shape, seed, class_cost, dtype, weights, focal, layout):
    batch, queries, classes, targets = shape
    gen = torch.Generator().manual_seed(seed)
    logits, pred_boxes, labels, tgt_boxes = random_inputs(gen, batch, queries, classes, targets)
    logits, pred_boxes, tgt_boxes = (t.to(dtype) for t in (logits, pred_boxes, tgt_boxes))
    if layout == "transposed":  # non-unit innermost strides
        logits = logits.transpose(1, 2).contiguous().transpose(1, 2)
        pred_boxes = pred_boxes.transpose(1, 2).contiguous().transpose(1, 2)
        tgt_boxes = tgt_boxes.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "sliced":  # every other query and class of a larger tensor
        logits = torch.repeat_interleave(logits, 2, dim=1)[:, ::2]
        logits = torch.cat([logits, logits], -1)[..., :classes]
        pred_boxes = torch.repeat_interleave(pred_boxes, 2, dim=1)[:, ::2]
    kwargs = dict(cost_class=weights[0], cost_bbox=weights[1], cost_giou=weights[2],
                  class_cost=class_cost, focal_alpha=focal[0], focal_gamma=focal[1])
    for build in CPU_BUILDS:
        with cpu_build(build):
            fused, reference = both(logits, pred_boxes, labels, tgt_boxes, **kwargs)
        assert fused.dtype == torch.float32 and fused.shape == (batch, queries, targets)
        torch.testing.assert_close(fused, reference, atol=ATOL, rtol=RTOL)


def test_every_build_gives_the_same_bits():
    """The portable, AVX2 and AVX-512 builds of the kernel run the same IEEE operations in the
    same order (blocks of 16 queries, 16 partial sums per softmax row at every width)."""
    gen = torch.Generator().manual_seed(0)
    inputs = random_inputs(gen, 2, 50, 91, 23, scale=8.0)
    for class_cost, gamma in (("focal", 2.0), ("focal", 1.5), ("focal_logsigmoid", 2.0),
                              ("softmax", 2.0)):
        kwargs = dict(class_cost=class_cost, focal_gamma=gamma)
        costs = {}
        for build in CPU_BUILDS:
            with cpu_build(build):
                costs[build] = match_cost(*inputs, backend="fused", **kwargs)
        for build in CPU_BUILDS:
            assert torch.equal(costs[build], costs["portable"]), (build, class_cost, gamma)


def test_the_cap_selects_the_build():
    """GROUP_DETR_CPU_SCAN picks the build that runs (else the bitwise test above could compare
    a build with itself)."""
    with cpu_build("best"):
        best = _ext.match_cost_isa()
    assert best in ("avx512", "avx2", "portable")
    with cpu_build("portable"):
        assert _ext.match_cost_isa() == "portable"
    with cpu_build("avx2"):
        assert _ext.match_cost_isa() == ("portable" if best == "portable" else "avx2")


@pytest.mark.parametrize("class_cost", ["focal", "focal_logsigmoid", "softmax"])
def test_extreme_and_non_finite_logits(each_cpu_build, class_cost):
    """Huge, infinite and NaN logits give the reference's values, infinities and NaNs."""
    gen = torch.Generator().manual_seed(1)
    logits, pred_boxes, labels, tgt_boxes = random_inputs(gen, 2, 40, 6, 9)
    specials = torch.tensor([0.0, 1e-30, -17.0, 17.0, 30.0, -30.0, 87.0, -87.0, 88.5, -88.5,
                             100.0, -100.0, 1e30, -1e30, float("inf"), float("-inf"),
                             float("nan")])
    flat = logits.view(-1)
    flat[: 2 * specials.numel()] = specials.repeat(2)
    labels[0, :] = torch.arange(9) % 6  # every class of image 0 is a target
    fused, reference = both(logits, pred_boxes, labels, tgt_boxes, class_cost=class_cost)
    assert torch.equal(fused.isnan(), reference.isnan())
    finite = reference.isfinite()
    assert torch.equal(fused[~finite & ~reference.isnan()], reference[~finite & ~reference.isnan()])
    torch.testing.assert_close(fused[finite], reference[finite], atol=ATOL, rtol=RTOL)


def test_non_finite_boxes_give_nan_like_the_reference(each_cpu_build):
    gen = torch.Generator().manual_seed(2)
    logits, pred_boxes, labels, tgt_boxes = random_inputs(gen, 1, 12, 5, 7)
    pred_boxes[0, 3, 0] = float("nan")
    pred_boxes[0, 5, 2] = float("inf")
    fused, reference = both(logits, pred_boxes, labels, tgt_boxes)
    assert torch.equal(fused.isnan(), reference.isnan()) and fused.isnan().any()
    keep = ~reference.isnan()
    torch.testing.assert_close(fused[keep], reference[keep], atol=ATOL, rtol=RTOL)


def problem_totals(cost, matched):
    """Total cost per problem of `(P, T)` matched queries (-1: none) under the cost `(P, N, T)`."""
    picked = torch.gather(cost, 1, matched.clamp(min=0)[:, None, :]).squeeze(1)
    return torch.where(matched >= 0, picked, torch.zeros((), dtype=cost.dtype)).sum(1)


@pytest.mark.parametrize("name", sorted(WORKLOADS))
@pytest.mark.parametrize("class_cost", ["focal", "focal_logsigmoid", "softmax"])
def test_assignment_on_workloads(name, class_cost):
    """The solver on the fused cost finds the reference cost's optimum: equal total cost, and
    the same indices wherever the optimum is unique by more than the costs' difference."""
    spec = WORKLOADS[name]
    outputs, targets = matcher_inputs(spec)
    num_groups, n = spec["groups"], spec["queries_per_group"]
    costs = {}
    for backend in ("fused", "torch"):
        matcher = GroupMatcher(num_groups=num_groups, class_cost=class_cost, cost_backend=backend)
        costs[backend], sizes = matcher.cost_matrix(outputs, targets)
    fused, reference = costs["fused"], costs["torch"]
    valid = torch.arange(fused.shape[-1]) < torch.tensor(sizes)[:, None, None]
    torch.testing.assert_close(fused[valid.expand_as(fused)],
                               reference[valid.expand_as(fused)], atol=ATOL, rtol=RTOL)
    assert not fused[~valid.expand_as(fused)].any()  # the padding the solver never reads: 0
    eps = (fused.double() - reference.double())[valid.expand_as(fused)].abs().max().item()

    counts = torch.tensor(sizes).repeat_interleave(num_groups)
    problems = [c.reshape(-1, n, c.shape[-1]) for c in (fused, reference)]
    matched_fused, matched_ref = (linear_sum_assignment(c, counts) for c in problems)
    ref64 = problems[1].double()
    total_fused = problem_totals(ref64, matched_fused)
    total_ref = problem_totals(ref64, matched_ref)
    # Under the reference cost the fused assignment is within 2*m*eps of the optimum (each
    # assignment's total moves by at most m*eps between the two costs) ...
    slack = 2 * counts.double() * eps + 1e-9
    assert ((total_fused - total_ref).abs() <= slack).all()
    # ... so where the two assignments differ, the reference optimum was not unique by more
    # than that margin: every problem with a larger margin is matched identically.
    differ = (matched_fused != matched_ref).any(1)
    assert ((total_fused - total_ref).abs()[differ] <= slack[differ]).all()
    assert differ.float().mean() <= 0.05, f"{int(differ.sum())} of {len(differ)} problems differ"
    # And the whole matcher gives DETR's index lists from the fused cost.
    ours = GroupMatcher(num_groups=num_groups, class_cost=class_cost)(outputs, targets)
    ref = GroupMatcher(num_groups=num_groups, class_cost=class_cost,
                       cost_backend="torch")(outputs, targets)
    same = sum(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(ours, ref))
    assert same >= len(ours) - int(differ.sum())


@pytest.mark.parametrize("class_cost", ["focal", "focal_logsigmoid", "softmax"])
def test_num_targets_computes_only_valid_columns(each_cpu_build, class_cost):
    gen = torch.Generator().manual_seed(7)
    inputs = random_inputs(gen, 4, 30, 7, 19)
    sizes = [0, 19, 3, 8]
    fused = match_cost(*inputs, class_cost=class_cost, num_targets=sizes, backend="fused")
    reference = match_cost_torch(*inputs, class_cost=class_cost)
    for b, m in enumerate(sizes):
        torch.testing.assert_close(fused[b, :, :m], reference[b, :, :m], atol=ATOL, rtol=RTOL)
        assert not fused[b, :, m:].any()
    # padding labels are not read: any value there is fine
    labels = inputs[2].clone()
    labels[2, 3:] = -5
    padded_bad = match_cost(inputs[0], inputs[1], labels, inputs[3], class_cost=class_cost,
                            num_targets=sizes, backend="fused")
    assert torch.equal(padded_bad, fused)


def test_auto_keeps_the_gradient_path():
    gen = torch.Generator().manual_seed(3)
    logits, pred_boxes, labels, tgt_boxes = random_inputs(gen, 1, 5, 4, 3)
    logits.requires_grad_(True)
    cost = match_cost(logits, pred_boxes, labels, tgt_boxes)  # auto: torch, differentiable
    cost.sum().backward()
    assert logits.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(match_cost(logits, pred_boxes, labels, tgt_boxes), cost,
                                   atol=ATOL, rtol=RTOL)


def test_opcheck():
    gen = torch.Generator().manual_seed(4)
    for batch, queries, classes, targets in ((2, 7, 5, 3), (1, 4, 3, 0), (0, 3, 2, 2)):
        inputs = random_inputs(gen, batch, queries, classes, targets)
        for class_cost in ("focal", "focal_logsigmoid", "softmax"):
            for num_targets in (None, [min(targets, 1 + b) for b in range(batch)]):
                torch.library.opcheck(torch.ops.group_detr.match_cost.default,
                                      (*inputs, 2.0, 5.0, 2.0, class_cost, 0.25, 2.0, num_targets))


def test_compiles_with_torch_compile():
    gen = torch.Generator().manual_seed(5)
    inputs = random_inputs(gen, 2, 6, 4, 3)
    compiled = torch.compile(lambda *a: match_cost(*a, backend="fused") * 2, fullgraph=True)
    torch.testing.assert_close(compiled(*inputs), 2 * match_cost(*inputs, backend="fused"))


# ------------------------------------------------------------------------------ bad input

def good_inputs():
    return random_inputs(torch.Generator().manual_seed(6), 2, 5, 4, 3)


def test_bad_backend_and_class_cost():
    with pytest.raises(ValueError, match="cost backend must be one of"):
        match_cost(*good_inputs(), backend="cuda")
    with pytest.raises(ValueError, match="class_cost must be one of"):
        match_cost(*good_inputs(), class_cost="sigmoid")
    with pytest.raises(ValueError, match="cost_backend must be one of"):
        GroupMatcher(cost_backend="fast")
    with pytest.raises(ValueError, match="class_cost must be 'focal', 'focal_logsigmoid' or 'softmax'"):
        torch.ops.group_detr.match_cost(*good_inputs(), 2.0, 5.0, 2.0, "sigmoid", 0.25, 2.0)


def test_fused_refuses_integer_inputs():
    logits, pred_boxes, labels, tgt_boxes = good_inputs()
    with pytest.raises(ValueError, match="'fused' needs the built extension"):
        match_cost(logits.long(), pred_boxes, labels, tgt_boxes, backend="fused")


@pytest.mark.parametrize("case, error, message", [
    ("logits_2d", ValueError, "logits must be"),
    ("pred_boxes_shape", ValueError, "pred_boxes must be"),
    ("labels_batch", ValueError, "labels must be"),
    ("target_boxes_shape", ValueError, "target_boxes must be"),
    ("labels_int32", TypeError, "labels must be int64"),
    ("labels_float", TypeError, "labels must be int64"),
    ("logits_int", TypeError, "logits and boxes must be"),
    ("boxes_int", TypeError, "logits and boxes must be"),
    ("label_high", ValueError, r"target label 4 \(image 1, target 2\) is not a class id"),
    ("label_negative", ValueError, "target label -1"),
    ("no_classes", ValueError, "logits have no classes"),
    ("num_targets_length", ValueError, "num_targets must have B = 2 entries"),
    ("num_targets_high", ValueError, r"num_targets\[1\] = 4 is outside \[0, M = 3\]"),
    ("num_targets_negative", ValueError, r"num_targets\[0\] = -1"),
])
def test_op_bad_input(case, error, message):
    logits, pred_boxes, labels, tgt_boxes = good_inputs()
    num_targets = None
    if case == "logits_2d":
        logits = logits[0]
    elif case == "pred_boxes_shape":
        pred_boxes = pred_boxes[..., :3]
    elif case == "labels_batch":
        labels = labels[:1]
    elif case == "target_boxes_shape":
        tgt_boxes = tgt_boxes[:, :2]
    elif case == "labels_int32":
        labels = labels.int()
    elif case == "labels_float":
        labels = labels.float()
    elif case == "logits_int":
        logits = logits.long()
    elif case == "boxes_int":
        tgt_boxes = tgt_boxes.long()
    elif case == "label_high":
        labels[1, 2] = 4
    elif case == "label_negative":
        labels[0, 0] = -1
    elif case == "no_classes":
        logits = logits[..., :0]
    elif case == "num_targets_length":
        num_targets = [3]
    elif case == "num_targets_high":
        num_targets = [3, 4]
    elif case == "num_targets_negative":
        num_targets = [-1, 2]
    with pytest.raises(error, match=message):
        torch.ops.group_detr.match_cost(logits, pred_boxes, labels, tgt_boxes, 2.0, 5.0, 2.0,
                                        "focal", 0.25, 2.0, num_targets)


def test_matcher_reports_the_cost_backend_in_use():
    """GroupMatcher on the CPU uses the fused op by default; its cost equals the reference."""
    spec = dict(WORKLOADS["coco_k11"], batch=2)
    outputs, targets = matcher_inputs(spec)
    auto, sizes = GroupMatcher(num_groups=11).cost_matrix(outputs, targets)
    fused, _ = GroupMatcher(num_groups=11, cost_backend="fused").cost_matrix(outputs, targets)
    torch_cost, _ = GroupMatcher(num_groups=11, cost_backend="torch").cost_matrix(outputs, targets)
    assert torch.equal(auto, fused) and not torch.equal(fused, torch_cost)
    for b, m in enumerate(sizes):
        np.testing.assert_allclose(fused[b, :, :m].numpy(), torch_cost[b, :, :m].numpy(),
                                   atol=ATOL, rtol=RTOL)
