"""Fuzzing the native ops (batched_lsa, match_cost) over shapes, strides, dtypes, target counts
and NaN/inf patterns: every input gives a well-formed answer or a clean ValueError/TypeError,
never a crash, a hang, an index out of range or a silently wrong match.

The budget is GROUP_DETR_FUZZ_EXAMPLES examples per test (default 100, what CI runs);
scripts/sanitize.sh runs these tests under AddressSanitizer/UBSan with a larger budget.
"""
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from scipy.optimize import linear_sum_assignment as scipy_lsa

import group_detr
from group_detr.match_cost import match_cost_torch

pytestmark = pytest.mark.skipif(
    not group_detr.backends()["lsa_cpu"], reason="group_detr._C is not built"
)

EXAMPLES = int(os.environ.get("GROUP_DETR_FUZZ_EXAMPLES", "100"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SPECIALS = [float("nan"), float("inf"), float("-inf"), 1e38, -1e38, 0.0, -0.0, 1e-40]


def layout(data, tensor):
    """The same values as a contiguous, transposed-in-memory, sliced or expanded tensor."""
    kind = data.draw(st.sampled_from(["contiguous", "transposed", "sliced", "expanded"]))
    if kind == "transposed" and tensor.dim() >= 2:
        return tensor.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "sliced":
        return torch.repeat_interleave(tensor, 2, dim=0)[::2]
    if kind == "expanded" and tensor.shape[0] >= 1:  # stride 0: every item the first one
        return tensor[:1].expand(*tensor.shape)
    return tensor


def sprinkle(data, tensor):
    """Put special values (NaN, infinities, huge, subnormal) at drawn positions."""
    if tensor.numel() == 0 or not data.draw(st.booleans()):
        return tensor
    tensor = tensor.clone()
    flat = tensor.view(-1)
    for _ in range(data.draw(st.integers(1, 4))):
        flat[data.draw(st.integers(0, flat.numel() - 1))] = data.draw(st.sampled_from(SPECIALS))
    return tensor


# ------------------------------------------------------------------------------ batched_lsa

@FUZZ
@given(data=st.data())
def test_fuzz_batched_lsa(data):
    num_problems = data.draw(st.integers(0, 5))
    num_queries = data.draw(st.integers(0, 40))
    num_cols = data.draw(st.integers(0, 40))
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES + [torch.int64]))
    seed = data.draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    values = rng.normal(size=(num_problems, num_queries, num_cols))
    if data.draw(st.booleans()):
        values = np.round(values)  # ties
    cost = sprinkle(data, torch.from_numpy(values)).to(dtype)
    cost = layout(data, cost)
    counts = [data.draw(st.integers(-2, num_cols + 2)) for _ in range(num_problems)]
    counts_dtype = data.draw(st.sampled_from([torch.int64, torch.int32, torch.float32]))
    num_targets = torch.tensor(counts, dtype=counts_dtype)
    if data.draw(st.integers(0, 9)) == 0:  # a wrong-length num_targets
        num_targets = torch.tensor(counts + [1], dtype=counts_dtype)

    contract = (dtype in (torch.float32, torch.float64) and counts_dtype != torch.float32
                and num_targets.numel() == num_problems)
    try:
        matched, status = torch.ops.group_detr.batched_lsa(cost, num_targets)
    except (ValueError, TypeError) as exc:
        # Refused: only for inputs outside the op's contract, with a message saying so.
        assert str(exc).startswith("batched_lsa")
        assert not contract, f"refused a valid input: {exc}"
        return
    assert contract
    assert matched.shape == (num_problems, num_cols) and matched.dtype == torch.int64
    assert status.shape == (num_problems,)
    cost64 = cost.double().numpy()
    for p, m in enumerate(counts):
        row = matched[p].numpy()
        code = int(status[p])
        assert code in (0, 1, 2, 3)
        assert (code == 3) == (not 0 <= m <= num_cols)
        block = cost64[p, :, :m] if code != 3 else cost64[p, :, :0]
        if code:
            assert (row == -1).all()  # a failed problem matches nothing, never a stray index
            if code == 1:
                assert np.isnan(block).any() or np.isneginf(block).any()
            if code == 2:
                assert np.isposinf(block).any()
            continue
        assert (row[m:] == -1).all()
        used = row[:m][row[:m] >= 0]
        assert ((used >= 0) & (used < num_queries)).all() and len(set(used)) == len(used)
        assert len(used) == min(m, num_queries)
        if not block.size:
            continue
        assert not (np.isnan(block).any() or np.isneginf(block).any()), "NaN/-inf solved"
        ours = block[row[:m][row[:m] >= 0], np.nonzero(row[:m] >= 0)[0]].sum()
        assert np.isfinite(ours)  # no forbidden (+inf) pair in the answer
        if np.isfinite(block).all():  # the optimum, as scipy's
            rows, cols = scipy_lsa(block)
            assert np.isclose(ours, block[rows, cols].sum(), rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------- match_cost

needs_match_cost = pytest.mark.skipif(
    not group_detr.backends()["match_cost_cpu"], reason="the match_cost op is not built"
)


@needs_match_cost
@FUZZ
@given(data=st.data())
def test_fuzz_match_cost(data):
    batch = data.draw(st.integers(0, 4))
    queries = data.draw(st.integers(0, 30))
    classes = data.draw(st.integers(0, 12))
    targets = data.draw(st.integers(0, 20))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    dtypes = [data.draw(st.sampled_from(FLOAT_DTYPES + [torch.int64])) for _ in range(3)]
    logits = sprinkle(data, torch.randn(batch, queries, classes, generator=gen) * 4)
    pred_boxes = sprinkle(data, torch.rand(batch, queries, 4, generator=gen) * 0.5 + 0.1)
    tgt_boxes = sprinkle(data, torch.rand(batch, targets, 4, generator=gen) * 0.5 + 0.1)
    low, high = data.draw(st.sampled_from([(0, max(classes, 1)), (-3, classes + 3)]))
    labels = torch.randint(low, high, (batch, targets), generator=gen)
    labels = labels.to(data.draw(st.sampled_from([torch.int64, torch.int64, torch.int32])))
    counts = None
    if data.draw(st.booleans()):
        counts = [data.draw(st.integers(-1, targets + 1)) for _ in range(batch)]
    args = [layout(data, t.to(d)) for t, d in zip((logits, pred_boxes, tgt_boxes), dtypes)]
    logits_in, pred_in, tgt_in = args
    class_cost = data.draw(st.sampled_from(["focal", "focal_logsigmoid", "softmax", "sigmoid"]))
    weights = data.draw(st.sampled_from([(2.0, 5.0, 2.0), (1.0, 0.0, 0.0), (0.0, 1.0, 1.0)]))
    gamma = data.draw(st.sampled_from([2.0, 1.5, 0.0]))

    valid = list(counts) if counts is not None else [targets] * batch
    contract = (
        all(d != torch.int64 for d in dtypes)
        and labels.dtype == torch.int64
        and class_cost in ("focal", "focal_logsigmoid", "softmax")
        and all(0 <= m <= targets for m in valid)
        and (counts is None or len(counts) == batch)
        and (classes > 0 or targets == 0 or queries == 0)
        and all(((labels[b, :m] >= 0) & (labels[b, :m] < classes)).all() for b, m in
                enumerate(valid) if 0 <= m <= targets)
    )
    try:
        cost = torch.ops.group_detr.match_cost(logits_in, pred_in, labels, tgt_in, *weights,
                                               class_cost, 0.25, gamma, counts)
    except (ValueError, TypeError) as exc:
        # an empty output checks nothing further, so it may pass with a bad label
        assert not contract, f"refused a valid input: {exc}"
        assert str(exc).startswith("match_cost")
        return
    assert contract or cost.numel() == 0 or batch * queries == 0
    assert cost.shape == (batch, queries, targets) and cost.dtype == torch.float32
    if not contract:
        return
    reference = match_cost_torch(logits_in, pred_in, labels.clamp(0, max(classes - 1, 0)),
                                 tgt_in, *weights, class_cost, 0.25, gamma)
    for b, m in enumerate(valid):
        got, want = cost[b, :, :m], reference[b, :, :m]
        assert torch.equal(got.isnan(), want.isnan()), "NaN where the reference has none"
        finite = want.isfinite() & got.isfinite()
        torch.testing.assert_close(got[finite], want[finite], atol=1e-4, rtol=1e-4)
        assert torch.equal(got[~finite & ~want.isnan()].isinf(), want[~finite & ~want.isnan()].isinf())
        assert not cost[b, :, m:].any()
