"""The CUDA batched solver: its warp-parallel logic on the CPU (emulated lanes, the very template
the kernel instantiates) and the CUDA tests proper (skipped without a GPU). The nvcc compile and
resource check is tests/test_cuda_build.py."""
import zlib

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment as scipy_lsa

import group_detr
from group_detr import GroupMatcher, linear_sum_assignment
from group_detr.assignment import (STATUS_BAD_NUM_TARGETS, STATUS_INFEASIBLE, STATUS_INVALID_ENTRY,
                                   _linear_sum_assignment_warp_emulated)

from conftest import requires_cuda

has_emulated = pytest.mark.skipif(
    not group_detr._ext.has_lsa_warp_emulated(), reason="group_detr._C is not built"
)


# (a) the kernel compiles with nvcc, within its resource limits: tests/test_cuda_build.py.


# --- (b) the warp-parallel logic on the CPU ----------------------------------------------------

def emulated(cost, num_targets, reverse_lanes=False, stage=False):
    return torch.ops.group_detr.batched_lsa_warp_emulated(cost, num_targets, reverse_lanes, stage)


def scipy_matched(cost: np.ndarray, num_targets):
    matched = np.full((cost.shape[0], cost.shape[2]), -1, dtype=np.int64)
    for p, m in enumerate(num_targets):
        c = cost[p, :, :m]
        if c.size:
            rows, cols = scipy_lsa(c)
            matched[p, cols] = rows
    return matched


def make_batch(kind, shape, rng):
    if kind == "ties":  # small integers: many equal optima, the tie order decides
        return rng.integers(0, 3, size=shape).astype(np.float64)
    if kind == "huge":
        return rng.random(shape) * 1e12
    if kind == "tiny":
        return rng.random(shape) * 1e-12
    if kind == "inf":  # forbidden pairs, kept feasible: one finite entry per row and column
        cost = rng.random(shape)
        cost[rng.random(shape) < 0.4] = np.inf
        for p in range(shape[0]):
            k = min(shape[1], shape[2])
            cost[p, np.arange(k), np.arange(k)] = rng.random(k)
        return cost
    return rng.normal(size=shape)


SHAPES = [(4, 5, 9), (4, 9, 5), (3, 7, 0), (0, 4, 3), (3, 1, 6), (3, 6, 1), (2, 1, 1), (2, 33, 33),
          (2, 40, 70), (3, 300, 7), (2, 900, 26), (2, 300, 100)]
KINDS = ["uniform", "ties", "huge", "tiny", "inf"]


@has_emulated
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_emulated_warp_matches_cpu_and_scipy(shape, kind):
    rng = np.random.default_rng(zlib.crc32(repr((shape, kind)).encode()))
    cost_np = make_batch(kind, shape, rng)
    num_problems, _, num_cols = shape
    counts = [num_cols] + rng.integers(0, num_cols + 1, size=max(num_problems - 1, 0)).tolist()
    counts = counts[:num_problems]
    cost = torch.from_numpy(cost_np)
    num_targets = torch.tensor(counts, dtype=torch.int64)
    cpu_matched, cpu_status = torch.ops.group_detr.batched_lsa(cost, num_targets)
    assert (cpu_status == 0).all()
    expected = scipy_matched(cost_np, counts)
    np.testing.assert_array_equal(cpu_matched.numpy(), expected)
    # float32 as the kernel reads it too
    cost32 = cost.float()
    cpu32, _ = torch.ops.group_detr.batched_lsa(cost32, num_targets)
    for reverse_lanes in (False, True):
        for stage in (False, True):
            matched, status = emulated(cost, num_targets, reverse_lanes, stage)
            assert (status == 0).all()
            np.testing.assert_array_equal(matched.numpy(), expected)
            matched32, status32 = emulated(cost32, num_targets, reverse_lanes, stage)
            torch.testing.assert_close(matched32, cpu32, rtol=0, atol=0)


@has_emulated
def test_emulated_warp_strided_input_and_backend():
    rng = np.random.default_rng(5)
    base = torch.from_numpy(rng.random((4, 40, 60)))
    view = base.transpose(1, 2)[:, ::2, :]  # (4, 30, 40), non-contiguous
    num_targets = torch.tensor([40, 3, 0, 17])
    expected = linear_sum_assignment(view.contiguous(), num_targets, backend="cpu")
    torch.testing.assert_close(emulated(view, num_targets)[0], expected)
    torch.testing.assert_close(
        _linear_sum_assignment_warp_emulated(view, num_targets), expected
    )


@has_emulated
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_emulated_warp_low_precision(dtype):
    cost = torch.rand(5, 30, 8).to(dtype)
    num_targets = torch.tensor([8, 0, 3, 8, 1])
    torch.testing.assert_close(
        _linear_sum_assignment_warp_emulated(cost, num_targets),
        linear_sum_assignment(cost, num_targets, backend="cpu"),
    )


@has_emulated
@pytest.mark.parametrize("stage", [False, True])
def test_emulated_warp_status_codes(stage):
    cost = torch.rand(6, 5, 3, dtype=torch.float64)
    cost[1, 2, 0] = float("nan")
    cost[2, 0, 1] = float("-inf")
    cost[3, :, 1] = float("inf")             # target 1 can go nowhere
    cost[4] = float("inf")                   # every pair forbidden
    cost[5, :, 2] = float("nan")             # NaN in padding only: fine
    num_targets = torch.tensor([4, 3, 3, 3, 3, 2])   # problem 0: num_targets > T
    matched, status = emulated(cost, num_targets, False, stage)
    cpu_matched, cpu_status = torch.ops.group_detr.batched_lsa(cost, num_targets)
    assert status.tolist() == [STATUS_BAD_NUM_TARGETS, STATUS_INVALID_ENTRY, STATUS_INVALID_ENTRY,
                               STATUS_INFEASIBLE, STATUS_INFEASIBLE, 0]
    torch.testing.assert_close(status, cpu_status)
    torch.testing.assert_close(matched, cpu_matched)
    assert (matched[:5] == -1).all() and (matched[5, :2] >= 0).all()
    negative = emulated(cost[:1], torch.tensor([-1]))[1]
    assert negative.tolist() == [STATUS_BAD_NUM_TARGETS]
    with pytest.raises(ValueError, match="problem 0 contains NaN"):
        _linear_sum_assignment_warp_emulated(cost[1:], num_targets[1:])


@has_emulated
def test_emulated_warp_opcheck():
    cost = torch.rand(5, 9, 4)
    num_targets = torch.tensor([4, 0, 2, 3, 1])
    torch.library.opcheck(torch.ops.group_detr.batched_lsa_warp_emulated.default,
                          (cost, num_targets, False, False))


# --- (c) on a GPU ------------------------------------------------------------------------------

requires_lsa_cuda = pytest.mark.skipif(
    not group_detr.backends()["lsa_cuda"], reason="needs a CUDA device and the CUDA build"
)


@requires_cuda
@requires_lsa_cuda
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES + [(208, 300, 100), (64, 900, 100), (3, 1500, 1200)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_matches_cpu(shape, kind, dtype):
    rng = np.random.default_rng(zlib.crc32(repr((shape, kind)).encode()))
    cost = torch.from_numpy(make_batch(kind, shape, rng)).to(dtype)
    num_problems, _, num_cols = shape
    num_targets = torch.from_numpy(rng.integers(0, num_cols + 1, size=num_problems))
    expected, expected_status = torch.ops.group_detr.batched_lsa(cost, num_targets)
    matched, status = torch.ops.group_detr.batched_lsa(cost.cuda(), num_targets.cuda())
    torch.testing.assert_close(status.cpu(), expected_status)
    torch.testing.assert_close(matched.cpu(), expected, rtol=0, atol=0)


@requires_cuda
@requires_lsa_cuda
@pytest.mark.parametrize("stage", ["0", "1"])
def test_cuda_staging_modes_agree(stage):
    # The staging choice is read once per process; compare the auto mode here against the CPU.
    rng = np.random.default_rng(11)
    cost = torch.from_numpy(rng.integers(0, 4, size=(40, 300, 30)).astype(np.float32))
    num_targets = torch.from_numpy(rng.integers(0, 31, size=40))
    expected = linear_sum_assignment(cost, num_targets, backend="cpu")
    got = linear_sum_assignment(cost.cuda(), num_targets.cuda(), backend="cuda")
    torch.testing.assert_close(got.cpu(), expected, rtol=0, atol=0)


@requires_cuda
@requires_lsa_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_low_precision(dtype):
    cost = torch.rand(50, 300, 12).to(dtype)
    num_targets = torch.randint(0, 13, (50,))
    torch.testing.assert_close(
        linear_sum_assignment(cost.cuda(), num_targets.cuda()).cpu(),
        linear_sum_assignment(cost, num_targets, backend="cpu"),
    )


@requires_cuda
@requires_lsa_cuda
def test_cuda_graph_capture_and_replay():
    cost = torch.rand(16, 300, 20, device="cuda")
    num_targets = torch.randint(0, 21, (16,), device="cuda")
    linear_sum_assignment(cost, num_targets, validate=False)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        matched = linear_sum_assignment(cost, num_targets, validate=False)
    for _ in range(3):
        cost.copy_(torch.rand_like(cost))
        num_targets.copy_(torch.randint(0, 21, (16,), device="cuda"))
        graph.replay()
        expected = linear_sum_assignment(cost.cpu(), num_targets.cpu(), backend="cpu")
        torch.testing.assert_close(matched.cpu(), expected)


@requires_cuda
@requires_lsa_cuda
def test_cuda_no_sync_without_validation():
    cost = torch.rand(32, 300, 10, device="cuda")
    num_targets = torch.randint(0, 11, (32,), device="cuda")
    linear_sum_assignment(cost, num_targets, validate=False)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        linear_sum_assignment(cost, num_targets, validate=False)
        linear_sum_assignment(cost.half(), None, validate=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@requires_cuda
@requires_lsa_cuda
@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_cuda_bad_inputs_raise(bad):
    cost = torch.rand(4, 6, 3, device="cuda")
    cost[2, 1, 0] = bad
    with pytest.raises(ValueError, match=r"problem 2 contains NaN or -inf"):
        linear_sum_assignment(cost)
    cost = torch.rand(3, 4, 2, device="cuda")
    cost[1, :, 1] = float("inf")
    with pytest.raises(ValueError, match=r"problem 1 is infeasible"):
        linear_sum_assignment(cost)
    with pytest.raises(ValueError, match=r"problem 1 has num_targets outside"):
        linear_sum_assignment(torch.rand(2, 4, 3, device="cuda"),
                              torch.tensor([1, 4], device="cuda"))
    matched = linear_sum_assignment(cost, validate=False)  # +inf replaced: completely matched
    assert (matched >= 0).all().item()


def _detr_batch(device, num_images=4, num_groups=3, queries=30, num_classes=5):
    gen = torch.Generator().manual_seed(0)
    outputs = {
        "pred_logits": torch.randn(num_images, num_groups * queries, num_classes, generator=gen),
        "pred_boxes": torch.rand(num_images, num_groups * queries, 4, generator=gen) * 0.5 + 0.1,
    }
    targets = []
    for m in (3, 0, 7, 1)[:num_images]:
        targets.append({"labels": torch.randint(0, num_classes, (m,), generator=gen),
                        "boxes": torch.rand(m, 4, generator=gen) * 0.5 + 0.1})
    move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
    return move(outputs), [move(t) for t in targets], num_groups


@requires_cuda
@requires_lsa_cuda
def test_group_matcher_cuda_no_sync_with_return_device():
    outputs, targets, k = _detr_batch("cuda")
    matcher = GroupMatcher(num_groups=k, return_device=True, validate=False)
    reference = GroupMatcher(num_groups=k, backend="cpu")(
        {n: t.cpu() for n, t in outputs.items()},
        [{n: t.cpu() for n, t in tgt.items()} for tgt in targets],
    )
    matcher(outputs, targets)  # warm-up (allocator, pinned memory pool)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        indices = matcher(outputs, targets)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for (q, t), (q_ref, t_ref) in zip(indices, reference):
        assert q.is_cuda and t.is_cuda
        torch.testing.assert_close(q.cpu(), q_ref)
        torch.testing.assert_close(t.cpu(), t_ref)


@requires_cuda
@requires_lsa_cuda
def test_group_matcher_cuda_one_sync_for_cpu_indices():
    outputs, targets, k = _detr_batch("cuda")
    matcher = GroupMatcher(num_groups=k, validate=False)
    matcher(outputs, targets)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with pytest.warns(UserWarning) as record:
            indices = matcher(outputs, targets)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in record if "synchroniz" in str(w.message).lower()]
    assert len(syncs) <= 1, [str(w.message) for w in syncs]
    assert all(not q.is_cuda for q, _ in indices)
