"""The batched solver against scipy: property tests, bad input, torch.library contracts."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy.optimize import linear_sum_assignment as scipy_lsa

import group_detr
from group_detr import _ext, linear_sum_assignment, scipy_compatible
from group_detr.assignment import BACKENDS, _linear_sum_assignment_warp_emulated, _solve, sanitize_cost

pytestmark = pytest.mark.skipif(
    not group_detr.backends()["lsa_cpu"], reason="group_detr._C is not built"
)


def scipy_reference(cost: np.ndarray, num_targets):
    """Per problem scipy solve -> (matched (P, T), total cost (P,)) in our output format."""
    num_problems, _, num_cols = cost.shape
    matched = np.full((num_problems, num_cols), -1, dtype=np.int64)
    totals = np.zeros(num_problems)
    for p in range(num_problems):
        c = cost[p, :, : num_targets[p]]
        if c.size:
            rows, cols = scipy_lsa(c)
            matched[p, cols] = rows
            totals[p] = c[rows, cols].sum()
    return matched, totals


def total_cost(cost: np.ndarray, matched: np.ndarray):
    totals = np.zeros(cost.shape[0])
    for p in range(cost.shape[0]):
        cols = np.nonzero(matched[p] >= 0)[0]
        totals[p] = cost[p, matched[p, cols], cols].sum()
    return totals


def check_against_scipy(cost: np.ndarray, num_targets, dtype=torch.float64):
    ours = linear_sum_assignment(
        torch.from_numpy(cost).to(dtype), torch.tensor(num_targets, dtype=torch.int64)
    )
    # scipy sees exactly the values we solve (after any rounding to dtype)
    cost = torch.from_numpy(cost).to(dtype).double().numpy()
    expected, expected_totals = scipy_reference(cost, num_targets)
    ours = ours.numpy()
    assert ours.dtype == np.int64 and ours.shape == expected.shape
    np.testing.assert_array_equal(ours >= 0, expected >= 0)
    np.testing.assert_allclose(total_cost(cost, ours), expected_totals, rtol=1e-12, atol=1e-9)
    # same algorithm, same arithmetic, same tie order: identical, not only equally good
    np.testing.assert_array_equal(ours, expected)


shapes = st.tuples(st.integers(0, 6), st.integers(1, 12), st.integers(0, 12))


@settings(max_examples=150, deadline=None)
@given(shapes, st.integers(0, 2**32 - 1), st.sampled_from(["uniform", "ties", "huge", "tiny"]))
def test_random_problems_match_scipy(shape, seed, kind):
    num_problems, num_queries, num_cols = shape
    rng = np.random.default_rng(seed)
    if kind == "ties":  # small integers: many equal optima, scipy's tie order must be kept
        cost = rng.integers(0, 3, size=shape).astype(np.float64)
    elif kind == "huge":
        cost = rng.random(shape) * 1e12
    elif kind == "tiny":
        cost = rng.random(shape) * 1e-12
    else:
        cost = rng.normal(size=shape)
    num_targets = rng.integers(0, num_cols + 1, size=num_problems).tolist()
    check_against_scipy(cost, num_targets)


@settings(max_examples=60, deadline=None)
@given(shapes, st.integers(0, 2**32 - 1), st.floats(0.0, 0.7))
def test_forbidden_pairs_match_scipy(shape, seed, forbidden_fraction):
    num_problems, num_queries, num_cols = shape
    rng = np.random.default_rng(seed)
    cost = rng.random(shape)
    cost[rng.random(shape) < forbidden_fraction] = np.inf
    num_targets = [num_cols] * num_problems
    feasible = []
    for p in range(num_problems):
        try:
            scipy_lsa(cost[p]) if cost[p].size else None
            feasible.append(True)
        except ValueError:
            feasible.append(False)
    if all(feasible):
        check_against_scipy(cost, num_targets)
    else:
        with pytest.raises(ValueError, match=f"problem {feasible.index(False)} is infeasible"):
            linear_sum_assignment(torch.from_numpy(cost), torch.tensor(num_targets, dtype=torch.int64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype):
    rng = np.random.default_rng(0)
    cost = rng.random((5, 30, 8))
    check_against_scipy(cost, [8, 0, 3, 8, 1], dtype=dtype)


@pytest.mark.parametrize("num_queries,num_cols", [(300, 7), (900, 26), (300, 100), (5, 40), (1, 1), (1, 9)])
def test_detr_shapes_match_scipy(num_queries, num_cols):
    rng = np.random.default_rng(num_queries + num_cols)
    cost = rng.random((3, num_queries, num_cols)).astype(np.float32)
    check_against_scipy(cost, [num_cols, num_cols // 2, 0], dtype=torch.float32)


@pytest.mark.parametrize("num_queries", [3, 301, 900])
def test_detr_layout_float32_every_target_count(num_queries):
    """The float32 (Q, T) layout with the targets as rows is copied in blocks of 4 x 4 and
    checked in blocks of 8 targets: every count of valid targets around those block widths, with
    NaN in the padding next to them (it must be neither read into the cost nor reported)."""
    num_cols = 13
    rng = np.random.default_rng(num_queries)
    counts = list(range(min(num_cols, num_queries - 1) + 1))
    cost = rng.random((len(counts), num_queries, num_cols)).astype(np.float32)
    ours_input = torch.from_numpy(cost.copy())
    for p, m in enumerate(counts):
        ours_input[p, :, m:] = float("nan")
    ours = linear_sum_assignment(ours_input, torch.tensor(counts)).numpy()
    expected, _ = scipy_reference(cost.astype(np.float64), counts)
    np.testing.assert_array_equal(ours, expected)


SCAN_LEVELS = ["auto", "portable"]


def use_scan(level, monkeypatch):
    """Choose the CPU solver's column scan (auto: AVX2 where the CPU has it)."""
    if level == "portable":
        monkeypatch.setenv("GROUP_DETR_CPU_SCAN", "portable")
    assert _ext.lsa_cpu_scan() in (["portable"] if level == "portable" else ["avx2", "portable"])


@pytest.mark.parametrize("scan", SCAN_LEVELS)
@pytest.mark.parametrize("num_queries,num_cols", [(300, 40), (37, 37), (41, 90), (301, 100)])
def test_integer_ties_at_simd_widths(num_queries, num_cols, scan, monkeypatch):
    """Many equal optima over column counts that fill SIMD registers and leave tails; every
    scan a CPU may run (AVX2, portable) must give scipy's very assignments."""
    use_scan(scan, monkeypatch)
    rng = np.random.default_rng(num_queries * num_cols)
    cost = rng.integers(0, 4, size=(4, num_queries, num_cols)).astype(np.float64)
    check_against_scipy(cost, [num_cols, num_cols - 1, num_cols // 3, 1])


@pytest.mark.parametrize("scan", SCAN_LEVELS)
@pytest.mark.parametrize("num_queries,num_cols", [(300, 100), (900, 26), (61, 61)])
def test_every_scan_on_continuous_and_forbidden_costs(num_queries, num_cols, scan, monkeypatch):
    """Long augmenting paths (square and crowded problems) and +inf pairs through each scan."""
    use_scan(scan, monkeypatch)
    rng = np.random.default_rng(num_queries + num_cols)
    cost = rng.random((3, num_queries, num_cols))
    cost[1][rng.random((num_queries, num_cols)) < 0.3] = np.inf
    check_against_scipy(cost.astype(np.float32), [num_cols, num_cols, num_cols // 2], dtype=torch.float32)


def solver(backend):
    """linear_sum_assignment on one backend; "warp_emulated" is the CUDA solver's code with
    emulated lanes on the CPU, reachable only through its private entry point."""
    if backend == "warp_emulated":
        if not _ext.has_lsa_warp_emulated():
            pytest.skip("group_detr._C was built without the warp-emulated op")
        return _linear_sum_assignment_warp_emulated
    if backend == "cpu_sanitized_up_front":  # CUDA's validate=False path, run on the CPU
        def solve(cost, num_targets=None, validate=True):
            if validate:
                return linear_sum_assignment(cost, num_targets)
            cost = cost.float() if cost.dtype in (torch.float16, torch.bfloat16) else cost
            return _solve(sanitize_cost(cost, num_targets), num_targets, "cpu")[0]
        return solve
    if backend == "cuda":
        if not group_detr.backends()["lsa_cuda"]:
            pytest.skip("needs a CUDA device and the CUDA solver")
        return lambda cost, num_targets=None, validate=True: linear_sum_assignment(
            cost.cuda(), None if num_targets is None else num_targets.cuda(), "cuda", validate).cpu()
    return lambda cost, num_targets=None, validate=True: linear_sum_assignment(
        cost, num_targets, backend, validate)


EVERY_BACKEND = ["cpu", "scipy", "warp_emulated", "cuda", "cpu_sanitized_up_front"]


@pytest.mark.parametrize("backend", ["cpu", "scipy", "warp_emulated"])
def test_int32_num_targets(backend):
    rng = np.random.default_rng(3)
    cost = torch.from_numpy(rng.random((3, 20, 6)))
    counts = [6, 2, 0]
    solve = solver(backend)
    expected = solve(cost, torch.tensor(counts, dtype=torch.int64))
    got = solve(cost, torch.tensor(counts, dtype=torch.int32))
    torch.testing.assert_close(got, expected)
    np.testing.assert_array_equal(got.numpy(), scipy_reference(cost.numpy(), counts)[0])


def test_constant_matrix_gives_scipy_identity():
    matched = linear_sum_assignment(torch.zeros(1, 5, 5))
    assert matched.tolist() == [[0, 1, 2, 3, 4]]


def test_empty_batches():
    assert linear_sum_assignment(torch.zeros(0, 4, 3)).shape == (0, 3)
    assert linear_sum_assignment(torch.zeros(2, 4, 0)).shape == (2, 0)
    assert (linear_sum_assignment(torch.zeros(2, 0, 3)) == -1).all()


def test_strided_input():
    rng = np.random.default_rng(1)
    base = torch.from_numpy(rng.random((4, 12, 20)))
    view = base.transpose(1, 2)[:, ::2, :]  # (4, 10, 12), non-contiguous
    expected = linear_sum_assignment(view.contiguous())
    torch.testing.assert_close(linear_sum_assignment(view), expected)


def test_scipy_backend_agrees():
    rng = np.random.default_rng(2)
    cost = torch.from_numpy(rng.random((6, 20, 9)))
    num_targets = torch.tensor([9, 0, 4, 9, 1, 2])
    torch.testing.assert_close(
        linear_sum_assignment(cost, num_targets, backend="scipy"),
        linear_sum_assignment(cost, num_targets, backend="cpu"),
    )


@pytest.mark.parametrize("shape", [(7, 4), (4, 7), (5, 5), (0, 3), (3, 0)])
def test_scipy_compatible(shape):
    rng = np.random.default_rng(3)
    cost = rng.random(shape)
    for maximize in (False, True):
        rows, cols = scipy_compatible(cost, maximize=maximize)
        ref_rows, ref_cols = scipy_lsa(cost, maximize=maximize)
        np.testing.assert_array_equal(rows, ref_rows)
        np.testing.assert_array_equal(cols, ref_cols)


# --- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["cpu", "scipy"])
@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_nan_and_neg_inf_name_the_problem(backend, bad):
    cost = torch.rand(4, 6, 3)
    cost[2, 1, 0] = bad
    with pytest.raises(ValueError, match=r"problem 2 contains NaN or -inf"):
        linear_sum_assignment(cost, backend=backend)


@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
@pytest.mark.parametrize("transposed", [False, True])
def test_bad_value_found_anywhere_in_wide_problems(bad, transposed):
    """Every position of a problem wide enough for the SIMD paths (full blocks and tails, both
    orientations, strided float32 views) is checked."""
    rng = np.random.default_rng(0)
    for _ in range(12):
        cost = torch.rand(3, 37, 300) if transposed else torch.rand(3, 300, 37)
        cost = cost.transpose(1, 2) if transposed else cost
        p, q, t = (int(rng.integers(n)) for n in cost.shape)
        cost[p, q, t] = bad
        with pytest.raises(ValueError, match=rf"problem {p} contains NaN or -inf"):
            linear_sum_assignment(cost)


def test_bad_value_in_padding_is_ignored():
    cost = torch.rand(2, 6, 3)
    cost[1, :, 2] = float("nan")
    linear_sum_assignment(cost, torch.tensor([3, 2]))


@pytest.mark.parametrize("backend", ["cpu", "scipy"])
def test_infeasible_problem_names_the_problem(backend):
    cost = torch.rand(3, 4, 2)
    cost[1, :, 1] = float("inf")  # target 1 of problem 1 can go nowhere
    with pytest.raises(ValueError, match=r"problem 1 is infeasible"):
        linear_sum_assignment(cost, backend=backend)
    cost = torch.full((1, 3, 3), float("inf"))
    with pytest.raises(ValueError, match=r"problem 0 is infeasible"):
        linear_sum_assignment(cost, backend=backend)


# --- non-finite costs: validate=True raises, validate=False follows the documented rule ------------

def expected_failure(cost: np.ndarray, num_targets):
    """The ValueError message validate=True must give (None: no error): the first problem with
    NaN/-inf among its valid entries, or without a complete assignment of finite cost."""
    for p, m in enumerate(num_targets):
        c = cost[p, :, :m]
        if np.isnan(c).any() or np.isneginf(c).any():
            return rf"problem {p} contains NaN or -inf"
        if c.size:
            try:
                scipy_lsa(c)
            except ValueError:
                return rf"problem {p} is infeasible"
    return None


def check_well_formed(matched: np.ndarray, cost: np.ndarray, num_targets):
    """validate=False: every problem completely matched, one-to-one, indices in range; where an
    assignment avoiding every non-finite pair exists, ours avoids them and is optimal."""
    num_problems, num_queries, num_cols = cost.shape
    assert matched.shape == (num_problems, num_cols) and matched.dtype == np.int64
    assert ((matched >= -1) & (matched < num_queries)).all()
    for p, m in enumerate(num_targets):
        assert (matched[p, m:] == -1).all()
        used = matched[p, :m][matched[p, :m] >= 0]
        assert len(used) == min(num_queries, m), "every problem is completely matched"
        assert len(set(used.tolist())) == len(used), "one-to-one"
        forbidden = np.where(np.isfinite(cost[p, :, :m]), cost[p, :, :m], np.inf)
        if not forbidden.size:
            continue
        try:
            rows, cols = scipy_lsa(forbidden)
        except ValueError:
            continue  # no assignment avoids the non-finite pairs: any complete one is accepted
        cols_ours = np.nonzero(matched[p, :m] >= 0)[0]
        ours = forbidden[matched[p, cols_ours], cols_ours]
        assert np.isfinite(ours).all(), "a non-finite pair was used although avoidable"
        np.testing.assert_allclose(ours.sum(), forbidden[rows, cols].sum(), rtol=1e-9, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(shape=st.tuples(st.integers(1, 4), st.integers(1, 7), st.integers(1, 7)),
       seed=st.integers(0, 2**32 - 1),
       bad=st.lists(st.sampled_from(["nan", "-inf", "inf"]), min_size=1, max_size=3),
       fraction=st.floats(0.0, 0.6),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.float16]))
@pytest.mark.parametrize("backend", EVERY_BACKEND)
def test_non_finite_costs_every_backend(backend, shape, seed, bad, fraction, dtype):
    solve = solver(backend)
    rng = np.random.default_rng(seed)
    cost = rng.normal(size=shape)
    where = rng.random(shape) < fraction
    cost[where] = rng.choice([float(b) for b in bad], size=int(where.sum()))
    num_targets = rng.integers(0, shape[2] + 1, size=shape[0]).tolist()
    cost_t = torch.from_numpy(cost).to(dtype)
    cost = cost_t.double().numpy()  # the values solved, after rounding to dtype
    counts = torch.tensor(num_targets)
    message = expected_failure(cost, num_targets)
    if message is None:
        check_well_formed(solve(cost_t, counts).numpy(), cost, num_targets)
    else:
        with pytest.raises(ValueError, match=message):
            solve(cost_t, counts)
    check_well_formed(solve(cost_t, counts, validate=False).numpy(), cost, num_targets)


def test_validate_false_avoids_a_nan_pair():
    cost = torch.rand(3, 4, 2)
    cost[1, 0, 0] = float("nan")
    cost[2, :, 1] = float("inf")  # infeasible: target 1 of problem 2 has only forbidden pairs
    matched = linear_sum_assignment(cost, validate=False)
    assert (matched >= 0).all() and matched[1, 0] != 0
    torch.testing.assert_close(matched[0], linear_sum_assignment(cost[:1])[0])


def test_sanitized_costs_stay_finite_at_the_dtype_limit():
    big = torch.finfo(torch.float32).max
    cost = torch.tensor([[[big, -big], [float("nan"), 0.0]]])
    sanitized = sanitize_cost(cost, torch.tensor([2]))
    assert torch.isfinite(sanitized).all() and sanitized[0, 1, 0] == big
    torch.testing.assert_close(sanitized[0, 0], cost[0, 0], rtol=0, atol=0)


def test_validate_false_still_checks_the_status_on_cpu():
    """On the CPU reading the status costs nothing: bad num_targets raise even unvalidated."""
    with pytest.raises(ValueError, match=r"problem 1 has num_targets outside"):
        linear_sum_assignment(torch.rand(2, 4, 3), torch.tensor([1, 4]), validate=False)


def test_warp_emulated_is_not_a_public_backend():
    assert "cpu_warp_emulated" not in BACKENDS
    with pytest.raises(ValueError, match="backend must be one of"):
        linear_sum_assignment(torch.rand(1, 2, 2), backend="cpu_warp_emulated")


@pytest.mark.parametrize(
    "cost,num_targets,error,message",
    [
        (torch.rand(4, 3), None, ValueError, r"shape \(P, Q, T\)"),
        (torch.rand(1, 4, 3, 2), None, ValueError, r"shape \(P, Q, T\)"),
        (torch.ones(1, 4, 3, dtype=torch.int64), None, TypeError, "float16, bfloat16, float32"),
        ([[[1.0]]], None, TypeError, "must be a torch.Tensor"),
        (torch.rand(2, 4, 3), torch.tensor([1, 2, 3]), ValueError, r"num_targets must have shape"),
        (torch.rand(2, 4, 3), torch.tensor([1.0, 2.0]), TypeError, "num_targets must be int32"),
        (torch.rand(2, 4, 3), torch.tensor([1, 4]), ValueError, r"problem 1 has num_targets outside"),
        (torch.rand(2, 4, 3), torch.tensor([-1, 2]), ValueError, r"problem 0 has num_targets outside"),
    ],
)
def test_bad_input(cost, num_targets, error, message):
    for backend in ("cpu", "scipy"):
        with pytest.raises(error, match=message):
            linear_sum_assignment(cost, num_targets, backend=backend)


def test_bad_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        linear_sum_assignment(torch.rand(1, 2, 2), backend="gpu")
    with pytest.raises(ValueError, match="needs the cost on a CUDA device"):
        linear_sum_assignment(torch.rand(1, 2, 2), backend="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_num_targets_on_another_device():
    with pytest.raises(ValueError, match="num_targets is on"):
        linear_sum_assignment(torch.rand(2, 4, 3, device="cuda"), torch.tensor([1, 2]))


# --- torch.library contracts -------------------------------------------------------------------

def test_opcheck():
    cost = torch.rand(5, 9, 4)
    num_targets = torch.tensor([4, 0, 2, 3, 1])
    torch.library.opcheck(torch.ops.group_detr.batched_lsa.default, (cost, num_targets))
    torch.library.opcheck(torch.ops.group_detr.batched_lsa.default, (cost.double(), num_targets))


def test_torch_compile_fullgraph():
    def solve_and_gather(cost, num_targets):
        matched, status = torch.ops.group_detr.batched_lsa(cost, num_targets)
        return matched.clamp(min=0) * 2, status

    compiled = torch.compile(solve_and_gather, fullgraph=True, backend="aot_eager")
    cost = torch.rand(3, 7, 4)
    num_targets = torch.tensor([4, 2, 0])
    for got, expected in zip(compiled(cost, num_targets), solve_and_gather(cost, num_targets)):
        torch.testing.assert_close(got, expected)
