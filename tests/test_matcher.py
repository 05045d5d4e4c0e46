"""GroupMatcher against the public per-group, per-image scipy matcher, and DETR's contract."""
import pytest
import torch
from hypothesis import example, given, settings, strategies as st
from scipy.optimize import linear_sum_assignment as scipy_lsa
from workloads import load_workloads, matcher_inputs

from group_detr import GroupMatcher
from group_detr.reference import ReferenceGroupMatcher

WORKLOADS = load_workloads("matcher")


def group_totals(cost, indices, num_groups, queries_per_group):
    """Total matching cost per (image, group) from a `(B, K*N, M)` cost."""
    totals = torch.zeros(len(indices), num_groups, dtype=torch.float64)
    for b, (q, t) in enumerate(indices):
        for g in range(num_groups):
            sel = (q // queries_per_group) == g
            totals[b, g] = cost[b, q[sel], t[sel]].double().sum()
    return totals


@pytest.mark.parametrize("name", sorted(WORKLOADS))
@pytest.mark.parametrize("class_cost", ["focal", "focal_logsigmoid", "softmax"])
def test_equals_reference_matcher_on_workloads(name, class_cost):
    spec = WORKLOADS[name]
    outputs, targets = matcher_inputs(spec)
    kwargs = dict(num_groups=spec["groups"], class_cost=class_cost)
    ours = GroupMatcher(**kwargs)(outputs, targets)
    reference = ReferenceGroupMatcher(**kwargs)(outputs, targets)
    cost, _ = GroupMatcher(**kwargs).cost_matrix(outputs, targets)
    n = spec["queries_per_group"]
    torch.testing.assert_close(
        group_totals(cost, ours, spec["groups"], n),
        group_totals(cost, reference, spec["groups"], n),
    )
    for (q, t), (rq, rt) in zip(ours, reference):  # continuous random costs: unique optimum
        assert q.dtype == t.dtype == torch.int64 and q.device.type == "cpu"
        torch.testing.assert_close(q, rq)
        torch.testing.assert_close(t, rt)


def test_cost_equals_detr_batch_wide_cost():
    outputs, targets = matcher_inputs(WORKLOADS["coco_k11"])
    ours, sizes = GroupMatcher(num_groups=11).cost_matrix(outputs, targets)
    batch_wide = ReferenceGroupMatcher(num_groups=11).cost_matrix(outputs, targets)
    for b, block in enumerate(batch_wide.split(sizes, -1)):
        torch.testing.assert_close(ours[b, :, : sizes[b]], block[b])


def _small_batch(num_images=3, num_groups=4, queries_per_group=10, num_classes=5, seed=0):
    spec = {"batch": num_images, "groups": num_groups, "queries_per_group": queries_per_group,
            "num_classes": num_classes, "targets": "coco", "max_targets": 8, "seed": seed}
    return matcher_inputs(spec)


def test_groups_never_leak():
    num_groups, per_group = 4, 10
    outputs, targets = _small_batch(num_groups=num_groups, queries_per_group=per_group)
    for (q, t), target in zip(GroupMatcher(num_groups=num_groups)(outputs, targets), targets):
        m = len(target["labels"])
        assert len(q) == num_groups * min(m, per_group)
        assert torch.all(q[1:] > q[:-1]), "query indices ascending and distinct"
        for g in range(num_groups):
            sel = (q >= g * per_group) & (q < (g + 1) * per_group)
            # one-to-one inside the group's own range: every target exactly once
            assert sorted(t[sel].tolist()) == list(range(m))


def test_identical_images_give_identical_indices():
    # DETR's own contract (test_hungarian in facebookresearch/detr)
    outputs, targets = _small_batch(num_images=1)
    single = GroupMatcher(num_groups=4)(outputs, targets)
    doubled = {k: torch.cat([v, v]) for k, v in outputs.items()}
    pair = GroupMatcher(num_groups=4)(doubled, targets * 2)
    for q, t in pair:
        torch.testing.assert_close(q, single[0][0])
        torch.testing.assert_close(t, single[0][1])


def test_empty_targets_give_empty_indices():
    outputs, targets = _small_batch()
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 3
    for q, t in GroupMatcher(num_groups=4)(outputs, targets):
        assert q.shape == t.shape == (0,) and q.dtype == t.dtype == torch.int64


def test_more_targets_than_queries_per_group():
    outputs, targets = _small_batch(num_images=1, num_groups=2, queries_per_group=3)
    targets = [{"labels": torch.arange(5), "boxes": torch.rand(5, 4) * 0.5 + 0.1}]
    (q, t), = GroupMatcher(num_groups=2)(outputs, targets)
    ref_q, ref_t = ReferenceGroupMatcher(num_groups=2)(outputs, targets)[0]
    assert len(q) == 6 and len(set(q.tolist())) == 6
    torch.testing.assert_close(q, ref_q)
    torch.testing.assert_close(t, ref_t)


def test_hugging_face_keys_and_aliases():
    outputs, targets = _small_batch()
    expected = GroupMatcher()(outputs, targets, num_groups=4)
    hf_outputs = {"logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]}
    hf_targets = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
    for got in (GroupMatcher()(hf_outputs, hf_targets, group_detr=4),
                GroupMatcher(num_groups=4)(outputs, targets)):
        for (q, t), (eq, et) in zip(got, expected):
            torch.testing.assert_close(q, eq)
            torch.testing.assert_close(t, et)


def test_return_device_and_assign():
    outputs, targets = _small_batch()
    matcher = GroupMatcher(num_groups=4, return_device=True)
    cost, sizes = matcher.cost_matrix(outputs, targets)
    via_assign = matcher.assign(cost, torch.tensor(sizes))
    for (q, t), (eq, et) in zip(via_assign, GroupMatcher(num_groups=4)(outputs, targets)):
        torch.testing.assert_close(q, eq)
        torch.testing.assert_close(t, et)


def test_scipy_backend_agrees():
    outputs, targets = _small_batch()
    for (q, t), (eq, et) in zip(GroupMatcher(num_groups=4, backend="scipy")(outputs, targets),
                                GroupMatcher(num_groups=4)(outputs, targets)):
        torch.testing.assert_close(q, eq)
        torch.testing.assert_close(t, et)


def test_half_precision_outputs():
    outputs, targets = _small_batch()
    half = {k: v.half() for k, v in outputs.items()}
    indices = GroupMatcher(num_groups=4)(half, targets)
    assert all(len(q) == 4 * len(t["labels"]) for (q, _), t in zip(indices, targets))


# --- bad input ---------------------------------------------------------------------------------

def _with_target(targets, **changes):
    targets = [dict(t) for t in targets]
    targets[1].update(changes)
    return targets


def test_queries_not_divisible_by_groups():
    outputs, targets = _small_batch(num_groups=4, queries_per_group=10)
    with pytest.raises(ValueError, match="40 is not divisible by num_groups 3"):
        GroupMatcher(num_groups=3)(outputs, targets)


@pytest.mark.parametrize(
    "change,error,message",
    [
        ({"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, -0.1, 0.2]])}, ValueError, "degenerate box"),
        ({"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, float("nan"), 0.1, 0.2]])}, ValueError, "NaN or infinite"),
        ({"labels": torch.tensor([7]), "boxes": torch.rand(1, 4)}, ValueError, r"target 1 has class id 7 outside \[0, 5\)"),
        ({"labels": torch.tensor([-1]), "boxes": torch.rand(1, 4)}, ValueError, r"target 1 has class id -1 outside \[0, 5\)"),
        ({"labels": torch.tensor([1.0]), "boxes": torch.rand(1, 4)}, TypeError, "integer class ids"),
        ({"labels": torch.tensor([1, 2]), "boxes": torch.rand(1, 4)}, ValueError, r"labels must be \(M,\)"),
    ],
)
def test_bad_targets(change, error, message):
    outputs, targets = _small_batch()
    with pytest.raises(error, match=message):
        GroupMatcher(num_groups=4)(outputs, _with_target(targets, **change))


def test_nan_predictions_name_the_problem():
    outputs, targets = _small_batch(num_images=2, num_groups=4)
    outputs["pred_logits"][1, 25] = float("nan")  # image 1, group 2 -> problem 1*4 + 2
    targets[1] = {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}
    with pytest.raises(ValueError, match="problem 6 contains NaN"):
        GroupMatcher(num_groups=4)(outputs, targets)


@pytest.mark.parametrize(
    "outputs_change,message",
    [
        ({"pred_boxes": torch.rand(3, 40, 3)}, r"pred_boxes \(B, Q, 4\)"),
        ({"pred_boxes": torch.rand(3, 39, 4)}, "disagree"),
        ({"pred_logits": torch.rand(40, 5)}, r"pred_logits \(B, Q, num_classes\)"),
    ],
)
def test_bad_outputs(outputs_change, message):
    outputs, targets = _small_batch()
    outputs.update(outputs_change)
    with pytest.raises(ValueError, match=message):
        GroupMatcher(num_groups=4)(outputs, targets)


def test_bad_arguments():
    outputs, targets = _small_batch()
    with pytest.raises(ValueError, match="got 2 targets for a batch of 3"):
        GroupMatcher(num_groups=4)(outputs, targets[:2])
    with pytest.raises(KeyError, match="predicted boxes not found"):
        GroupMatcher(num_groups=4)({"pred_logits": outputs["pred_logits"]}, targets)
    with pytest.raises(ValueError, match="num_groups must be a positive int"):
        GroupMatcher(num_groups=0)
    with pytest.raises(ValueError, match="class_cost must be one of"):
        GroupMatcher(class_cost="sigmoid")
    with pytest.raises(ValueError, match="class_cost must be one of"):
        ReferenceGroupMatcher(class_cost="sigmoid")
    with pytest.raises(ValueError, match="num_targets has 2 entries for 3 images"):
        GroupMatcher(num_groups=4).assign(torch.rand(3, 40, 2), [1, 2])


# --- non-finite predictions: no index past the end, ever ------------------------------------------

def matcher_backends():
    from group_detr import backends
    yield "cpu"
    yield "scipy"
    if backends()["lsa_cuda"]:
        yield "cuda"


def _scipy_refuses(cost, sizes, num_groups, per_group):
    """Whether scipy raises (NaN / -inf, or infeasible with +inf) on any (image, group) problem."""
    for b, m in enumerate(sizes):
        for g in range(num_groups):
            try:
                scipy_lsa(cost[b, g * per_group:(g + 1) * per_group, :m].double().numpy())
            except ValueError:
                return True
    return False


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1),
       bad=st.sampled_from([float("nan"), float("inf"), float("-inf")]),
       where=st.sampled_from(["pred_logits", "pred_boxes", "both"]),
       fraction=st.floats(0.0, 0.5))
# One box height -inf: only +inf costs, the problem stays feasible, no backend may raise.
@example(seed=194, bad=float("-inf"), where="pred_boxes", fraction=0.001953125)
@pytest.mark.parametrize("backend", list(matcher_backends()))
def test_non_finite_predictions_every_backend(backend, seed, bad, where, fraction):
    num_groups, per_group = 3, 4
    outputs, targets = _small_batch(num_groups=num_groups, queries_per_group=per_group, seed=seed % 1000)
    gen = torch.Generator().manual_seed(seed)
    for key in (["pred_logits", "pred_boxes"] if where == "both" else [where]):
        hit = torch.rand(outputs[key].shape, generator=gen) < fraction
        outputs[key] = outputs[key].masked_fill(hit, bad)
    device = "cuda" if backend == "cuda" else "cpu"
    outputs = {k: v.to(device) for k, v in outputs.items()}
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    cost, sizes = GroupMatcher(num_groups=num_groups).cost_matrix(outputs, targets)
    finite = all(torch.isfinite(cost[b, :, :m]).all() for b, m in enumerate(sizes))
    strict = GroupMatcher(num_groups=num_groups, backend=backend)
    if not _scipy_refuses(cost.cpu(), sizes, num_groups, per_group):
        # Finite, or +inf only where a one-to-one matching can avoid it (a forbidden pair)
        expected = strict(outputs, targets)
    else:
        with pytest.raises(ValueError, match=r"problem \d+ (contains NaN or -inf|is infeasible)"):
            strict(outputs, targets)
    loose = GroupMatcher(num_groups=num_groups, backend=backend, validate=False)(outputs, targets)
    for b, ((q, t), m) in enumerate(zip(loose, sizes)):
        assert q.dtype == t.dtype == torch.int64 and len(q) == len(t) == num_groups * min(m, per_group)
        assert ((q >= 0) & (q < num_groups * per_group)).all(), "a query index past the end"
        assert ((t >= 0) & (t < m)).all()
        assert torch.all(q[1:] > q[:-1]), "query indices ascending and distinct"
        for g in range(num_groups):
            matched_targets = t[(q // per_group) == g].tolist()
            assert len(matched_targets) == min(m, per_group), "each group completely matched"
            assert len(set(matched_targets)) == len(matched_targets), "each group one-to-one"
        if finite:  # nothing to replace: the same answer as validate=True
            torch.testing.assert_close(q, expected[b][0])
            torch.testing.assert_close(t, expected[b][1])


def test_assign_rejects_num_targets_past_the_padding():
    with pytest.raises(ValueError, match=r"must lie in \[0, M_max = 2\]"):
        GroupMatcher(num_groups=4).assign(torch.rand(2, 40, 2), [1, 3])
