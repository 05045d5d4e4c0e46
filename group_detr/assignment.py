"""Batched linear assignment: validation, dispatch to the compiled solver, scipy reference path.

All problems of a padded `(P, Q, T)` cost tensor are solved in one call. The compiled solver
(`torch.ops.group_detr.batched_lsa`, csrc/lsa/) runs the same shortest-augmenting-path algorithm
as scipy (Crouse 2016), in float64, with scipy's own scan and tie order, so that assignments are
identical to scipy's, not merely of equal cost.

Non-finite costs, the one rule (`validate`):
  * validate=True: a NaN or -inf among a problem's valid entries, an infeasible problem (no
    complete assignment of finite cost) and num_targets outside [0, T] raise ValueError naming
    the first bad problem, on every backend (scipy raises ValueError too, without the problem).
  * validate=False: every non-finite entry (NaN, -inf, +inf) of problem p is replaced, on the
    device and without synchronisation (`sanitize_cost`), by one finite cost R_p above the
    problem's finite range, so large that the solution uses as few non-finite pairs as possible
    and, among those, has the least finite cost: where a complete assignment avoiding every
    non-finite pair exists, an optimal one of those is returned (on the CPU exactly
    validate=True's; on CUDA the same up to ties). Every problem therefore comes back completely
    matched with indices in range; no row of -1 appears for a bad problem. (transformers'
    matchers replace non-finite costs too, by the dtype's maximum.) Where the status is free to
    read (CPU tensors) it is still checked, so out-of-range num_targets raise there; on CUDA it
    is not read, and a problem with bad num_targets comes back as a row of -1.
"""
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import numpy.typing
import torch
from torch import Tensor

from group_detr import _ext

BACKENDS = ("auto", "cpu", "cuda", "scipy")
# The CUDA solver's warp-parallel code run on the CPU with emulated lanes (csrc/lsa/warp_scan.h):
# for tests on machines without a GPU, slower than "cpu"; reached only through
# `_linear_sum_assignment_warp_emulated`, not a backend users pick.
_WARP_EMULATED = "cpu_warp_emulated"

# Per-problem status codes written by the compiled solver (csrc/lsa/solver.h: LsaStatus).
STATUS_OK = 0
STATUS_INVALID_ENTRY = 1
STATUS_INFEASIBLE = 2
STATUS_BAD_NUM_TARGETS = 3

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_inputs(cost, num_targets):
    if not isinstance(cost, Tensor):
        raise TypeError(f"cost must be a torch.Tensor of shape (P, Q, T), got {type(cost).__name__}")
    if cost.dim() != 3:
        raise ValueError(
            f"cost must have shape (P, Q, T) (problems, queries, targets), got {tuple(cost.shape)}"
        )
    if cost.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"cost must be float16, bfloat16, float32 or float64, got {cost.dtype} "
            "(convert integer costs with .double(): float64 holds integers up to 2**53 exactly)"
        )
    num_problems, _, num_cols = cost.shape
    if num_targets is None:
        return torch.full((num_problems,), num_cols, dtype=torch.int64, device=cost.device)
    if not isinstance(num_targets, Tensor):
        num_targets = _host_to_device(torch.as_tensor(num_targets, dtype=torch.int64), cost.device)
    if num_targets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"num_targets must be int32 or int64, got {num_targets.dtype}")
    if num_targets.shape != (num_problems,):
        raise ValueError(
            f"num_targets must have shape (P,) = ({num_problems},), got {tuple(num_targets.shape)}"
        )
    if num_targets.device != cost.device:
        raise ValueError(
            f"num_targets is on {num_targets.device} but cost is on {cost.device}; "
            "keep both on the same device"
        )
    return num_targets  # int32 or int64: the compiled ops and the scipy path take both


def _host_to_device(tensor: Tensor, device) -> Tensor:
    """Copy a small host tensor to `device` without a host synchronisation (pinned, async)."""
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _resolve_backend(backend, device):
    if backend == "auto":
        if device.type == "cuda" and _ext.has_lsa_cuda():
            return "cuda"
        return "cpu" if _ext.has_lsa_cpu() else "scipy"
    if backend == "cuda":
        if device.type != "cuda":
            raise ValueError("backend='cuda' needs the cost on a CUDA device")
        if not _ext.has_lsa_cuda():
            raise RuntimeError("backend='cuda' requested but group_detr._C was built without CUDA")
    if backend == "cpu" and not _ext.has_lsa_cpu():
        raise RuntimeError("backend='cpu' requested but group_detr._C is not built")
    if backend == _WARP_EMULATED and not _ext.has_lsa_warp_emulated():
        raise RuntimeError("the warp-emulated solver needs group_detr._C built with that op")
    return backend


def _status_on_host(status: Tensor) -> np.ndarray:
    """The solver's status as a host array: a copy (a synchronisation) from CUDA, free on the CPU."""
    return status.cpu().numpy()


def raise_for_status(status: Tensor) -> None:
    """Turn the solver's per-problem status `(P,)` into a ValueError naming the first bad problem.

    A CUDA status is copied to the host once (the one synchronisation of validation).
    """
    codes = _status_on_host(status)
    if not np.count_nonzero(codes):  # the usual case, well under 1 us (STATUS_OK is 0)
        return
    bad = np.flatnonzero(codes != STATUS_OK)
    index = int(bad[0])
    code = int(codes[index])
    count = len(bad)
    more = f" ({count - 1} more problems failed too)" if count > 1 else ""
    if code == STATUS_INVALID_ENTRY:
        reason = "contains NaN or -inf (use +inf to forbid a pair)"
    elif code == STATUS_INFEASIBLE:
        reason = "is infeasible: no complete assignment has a finite cost"
    elif code == STATUS_BAD_NUM_TARGETS:
        reason = "has num_targets outside [0, T]"
    else:
        reason = f"failed with status {code}"
    raise ValueError(f"cost of problem {index} {reason}{more}")


def _solve_scipy(cost: Tensor, num_targets: Tensor) -> Tensor:
    from scipy.optimize import linear_sum_assignment as scipy_lsa

    num_problems, _, num_cols = cost.shape
    matched = torch.full((num_problems, num_cols), -1, dtype=torch.int64)
    cost_np = cost.detach().to("cpu", torch.float64).numpy()
    counts = num_targets.tolist()
    for p in range(num_problems):
        m = counts[p]
        if not 0 <= m <= num_cols:
            raise ValueError(f"cost of problem {p} has num_targets outside [0, T]")
        c = cost_np[p, :, :m]
        if np.isnan(c).any() or np.isneginf(c).any():
            raise ValueError(f"cost of problem {p} contains NaN or -inf (use +inf to forbid a pair)")
        if c.size == 0:
            continue
        try:
            rows, cols = scipy_lsa(c)
        except ValueError as exc:
            raise ValueError(
                f"cost of problem {p} is infeasible: no complete assignment has a finite cost"
            ) from exc
        matched[p, torch.from_numpy(cols)] = torch.from_numpy(rows)
    return matched.to(cost.device)


def sanitize_cost(cost: Tensor, num_targets: Tensor) -> Tensor:
    """validate=False's rule: every non-finite entry of problem p becomes one finite cost R_p.

    cost `(P, Q, T)` float32/float64, num_targets `(P,)` on the cost's device -> `(P, Q, T)`,
    finite entries unchanged (bitwise). With lo_p, hi_p the least and largest finite valid
    entries, span_p = hi_p - lo_p and n_p = min(Q, num_targets[p]) pairs to match,
    R_p = hi_p + (n_p + 1) * span_p + max(|lo_p|, |hi_p|, 1): any assignment with one non-finite
    pair fewer is cheaper (R_p - lo_p > n_p * span_p), so non-finite pairs are used only where no
    assignment avoids them. Clamped to the dtype's largest finite value. Only device ops: nothing
    synchronises with the host.
    """
    num_problems, num_queries, num_cols = cost.shape
    if cost.numel() == 0:
        return cost
    finite = torch.isfinite(cost)
    valid = torch.arange(num_cols, device=cost.device) < num_targets[:, None].to(torch.int64)
    usable = finite & valid[:, None, :]
    hi = torch.where(usable, cost, float("-inf")).amax(dim=(1, 2))
    lo = torch.where(usable, cost, float("inf")).amin(dim=(1, 2))
    none_finite = ~torch.isfinite(hi)  # every valid entry non-finite (or no valid column)
    hi = hi.masked_fill(none_finite, 0.0)
    lo = lo.masked_fill(none_finite, 0.0)
    pairs = num_targets.to(cost.dtype).clamp(0, num_queries)
    magnitude = torch.maximum(hi.abs(), lo.abs()).clamp(min=1.0)
    replacement = hi + (pairs + 1) * (hi - lo) + magnitude
    replacement = replacement.clamp(max=torch.finfo(cost.dtype).max)  # inf -> largest finite
    return torch.where(finite, cost, replacement[:, None, None])


def linear_sum_assignment(
    cost: Tensor,
    num_targets: Optional[Union[Tensor, Sequence[int]]] = None,
    backend: str = "auto",
    validate: bool = True,
    return_status: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Solve P independent rectangular assignment problems in one call.

    Args:
        cost: `(P, Q, T)` float tensor (float16/bfloat16 are solved in float32 precision or
            better): P problems, Q queries (rows), T padded target columns. `+inf` forbids a pair.
        num_targets: `(P,)` int tensor (or sequence) of valid target columns per problem;
            columns `>= num_targets[p]` are padding. Default: all T columns are valid.
        backend: "auto" (compiled solver of the cost's device, else scipy), "cpu", "cuda" or
            "scipy" (the reference path: one scipy call per problem).
        validate: True: raise ValueError for NaN/-inf costs, infeasible problems and
            out-of-range num_targets. False: non-finite costs are replaced by the module's rule
            (`sanitize_cost`: non-finite pairs are used only where unavoidable) and nothing
            synchronises with the host on CUDA (CUDA-graph capture); on CPU tensors the status
            is still read (it costs nothing there) and bad num_targets still raise.
        return_status: return `(matched, status)` instead, status `(P,)` int32 per problem
            (STATUS_*, None for the scipy backend, which raises itself), unchecked, so that a
            caller can fetch it with its own results in one copy (GroupMatcher does).

    Returns:
        `(P, T)` int64 on the cost's device: the query assigned to each target column, -1 for
        padding columns and for targets left unmatched when a problem has more targets than
        queries. The total cost is minimal and the assignment equals scipy's.

    Raises:
        ValueError / TypeError for bad shapes, dtypes, backends and (validate=True) costs; where
        scipy raises ValueError for an infeasible or NaN cost, so do we, with the problem's index.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return _assign(cost, num_targets, backend, validate, return_status)


def _linear_sum_assignment_warp_emulated(cost: Tensor, num_targets=None, validate: bool = True):
    """`linear_sum_assignment` through the CUDA solver's code with emulated lanes (tests only)."""
    return _assign(cost, num_targets, _WARP_EMULATED, validate, return_status=False)


def _assign(cost, num_targets, backend, validate, return_status):
    num_targets = _check_inputs(cost, num_targets)
    backend = _resolve_backend(backend, cost.device)
    if cost.dtype in (torch.float16, torch.bfloat16):
        cost = cost.float()
    if validate:
        matched, status = _solve(cost, num_targets, backend)
    else:
        matched, status = _solve_sanitized(cost, num_targets, backend)
    if return_status:
        return matched, status
    if status is not None and (validate or status.device.type == "cpu"):
        raise_for_status(status)
    return matched


def _solve_sanitized(cost: Tensor, num_targets: Tensor, backend: str):
    """The solution of `sanitize_cost(cost)` (validate=False), computed where it is cheapest.

    On CUDA every problem is sanitised before the solve, on the device (no synchronisation).
    For the compiled solver on CPU tensors the status is free to read, so the costs are solved
    as they are and only the problems that failed on a non-finite cost are sanitised and solved
    again: no extra pass over the cost in the usual case (sanitising every problem costs more
    than the solve itself there), and a problem that needed nothing gets exactly validate=True's
    answer.
    """
    if cost.device.type != "cpu" or backend == "scipy":
        return _solve(sanitize_cost(cost, num_targets), num_targets, backend)
    matched, status = _solve(cost, num_targets, backend)
    codes = _status_on_host(status)
    redo = np.flatnonzero((codes == STATUS_INVALID_ENTRY) | (codes == STATUS_INFEASIBLE))
    if redo.size:
        rows = torch.from_numpy(redo)
        counts = num_targets[rows]
        matched[rows], status[rows] = _solve(sanitize_cost(cost[rows], counts), counts, backend)
    return matched, status


def _solve(cost: Tensor, num_targets: Tensor, backend: str):
    """`(matched, status)` of checked inputs and a resolved backend, unvalidated; nothing
    synchronises with the host on CUDA."""
    if backend == "scipy":
        return _solve_scipy(cost, num_targets), None
    if backend == _WARP_EMULATED:
        matched, status = torch.ops.group_detr.batched_lsa_warp_emulated(
            cost.cpu(), num_targets.cpu()
        )
        return matched.to(cost.device), status.to(cost.device)
    if backend == "cpu" and cost.device.type != "cpu":
        matched, status = torch.ops.group_detr.batched_lsa(cost.cpu(), num_targets.cpu())
        return matched.to(cost.device), status.to(cost.device)
    return torch.ops.group_detr.batched_lsa(cost, num_targets)


def scipy_compatible(cost_matrix: numpy.typing.ArrayLike,
                     maximize: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Drop-in for `scipy.optimize.linear_sum_assignment` on one 2-D matrix.

    Returns `(row_ind, col_ind)` int64 numpy arrays with row_ind sorted, exactly as scipy does.
    """
    cost = torch.as_tensor(np.asarray(cost_matrix, dtype=np.float64))
    if cost.dim() != 2:
        raise ValueError(f"expected a matrix (2-d array), got a {cost.dim()}-d array")
    if maximize:
        cost = -cost
    matched = linear_sum_assignment(cost[None])[0]
    cols = torch.nonzero(matched >= 0).flatten()
    rows = matched[cols]
    order = torch.argsort(rows)
    return rows[order].numpy(), cols[order].numpy()
