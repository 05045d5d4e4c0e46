"""Loads the compiled extension once and reports which backends exist.

The package must import and work without the extension (through the scipy / PyTorch reference
paths), so a failed load is turned into a single warning rather than an ImportError.
"""
import functools
import importlib
import importlib.util
import types
import warnings
from typing import Optional

import torch

from group_detr import kernels as _kernels  # triton-free: the attention kernels' status

_C: Optional[types.ModuleType] = None
_LOAD_ERROR: Optional[ImportError] = None

try:
    _C = importlib.import_module("group_detr._C")  # loading it registers torch.ops.group_detr.*
except ImportError as exc:  # pragma: no cover - exercised only on installs without a build
    _LOAD_ERROR = exc
    warnings.warn(
        "group_detr._C is not built, so the batched Hungarian solver falls back to the scipy "
        f"reference path (slower). Build it with `pip install --no-build-isolation -e .` ({exc})",
        RuntimeWarning,
        stacklevel=2,
    )


# Cached: what was built does not change in a process, and linear_sum_assignment asks on
# every call.
@functools.lru_cache(maxsize=None)
def has_lsa_cpu() -> bool:
    return _C is not None and hasattr(torch.ops.group_detr, "batched_lsa")


@functools.lru_cache(maxsize=None)
def has_lsa_cuda() -> bool:
    if not (has_lsa_cpu() and torch.cuda.is_available()):
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("group_detr::batched_lsa", "CUDA")


@functools.lru_cache(maxsize=None)
def has_lsa_warp_emulated() -> bool:
    """The CUDA solver's warp-parallel code with emulated lanes on the CPU (tests)."""
    return _C is not None and hasattr(torch.ops.group_detr, "batched_lsa_warp_emulated")


@functools.lru_cache(maxsize=None)
def has_match_cost_cpu() -> bool:
    """The fused matching-cost op (csrc/cost) is built."""
    return _C is not None and hasattr(torch.ops.group_detr, "match_cost")


@functools.lru_cache(maxsize=None)
def has_group_match_cpu() -> bool:
    """GroupMatcher's one-pass CPU op (cost and assignment, csrc/cost/group_match_cpu.cpp) is
    built (an extension built before it was added has match_cost alone)."""
    return _C is not None and hasattr(torch.ops.group_detr, "group_match")


def lsa_cpu_scan() -> str:
    """The column scan the CPU solver runs here: "avx2", "portable", or "" without the
    extension. GROUP_DETR_CPU_SCAN=portable forces the portable one, and the portable code of the
    fused matching cost too (read at every call)."""
    return torch.ops.group_detr.cpu_scan_level() if has_lsa_cpu() else ""


def match_cost_isa() -> str:
    """The build of the fused cost kernel that runs here: "avx512", "avx2", "portable", or ""
    without it. GROUP_DETR_CPU_SCAN=avx2 or =portable caps it (read at every call)."""
    has_level = has_match_cost_cpu() and hasattr(torch.ops.group_detr, "cost_isa_level")
    return torch.ops.group_detr.cost_isa_level() if has_level else ""


def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def backends() -> dict:
    """What this install can run: {name: bool}.

    lsa_cpu / lsa_cuda: the compiled batched solver; match_cost_cpu: the fused matching cost
    (group_detr.match_cost); group_match_cpu: GroupMatcher's one-pass CPU op (cost and solve);
    scipy: the reference solver;
    triton: the Triton package is importable; triton_cuda: the attention kernel can run on a GPU
    (False after it failed to compile or launch here: see group_detr.kernels.disable).
    """
    return {
        "lsa_cpu": has_lsa_cpu(),
        "lsa_cuda": has_lsa_cuda(),
        "match_cost_cpu": has_match_cost_cpu(),
        "group_match_cpu": has_group_match_cpu(),
        "scipy": importlib.util.find_spec("scipy") is not None,
        "triton": has_triton(),
        "triton_cuda": has_triton() and torch.cuda.is_available() and _kernels.failure() is None,
    }


if _C is not None:

    @torch.library.register_fake("group_detr::batched_lsa")
    def _batched_lsa_fake(cost, num_targets):
        # Shapes only, so torch.compile can trace through the solver without running it.
        num_problems, _, num_cols = cost.shape
        matched = cost.new_empty((num_problems, num_cols), dtype=torch.int64)
        status = cost.new_empty((num_problems,), dtype=torch.int32)
        return matched, status

    if has_match_cost_cpu():

        @torch.library.register_fake("group_detr::match_cost")
        def _match_cost_fake(logits, pred_boxes, labels, target_boxes, cost_class, cost_bbox,
                             cost_giou, class_cost, focal_alpha, focal_gamma,
                             num_targets=None):
            return logits.new_empty((logits.shape[0], logits.shape[1], labels.shape[1]),
                                    dtype=torch.float32)

    if has_group_match_cpu():

        @torch.library.register_fake("group_detr::group_match")
        def _group_match_fake(logits, pred_boxes, labels, target_boxes, num_groups, cost_class,
                              cost_bbox, cost_giou, class_cost, focal_alpha, focal_gamma,
                              validate):
            # Each image's pair count follows from its target count: K * min(N, M_b).
            per_group = logits.shape[1] // num_groups
            query = [logits.new_empty((num_groups * min(per_group, l.shape[0]),),
                                      dtype=torch.int64) for l in labels]
            return (query, [q.clone() for q in query],
                    logits.new_empty((len(labels) * num_groups,), dtype=torch.int32))

    if has_lsa_warp_emulated():

        @torch.library.register_fake("group_detr::batched_lsa_warp_emulated")
        def _batched_lsa_warp_emulated_fake(cost, num_targets, reverse_lanes=False, stage=False):
            num_problems, _, num_cols = cost.shape
            matched = cost.new_empty((num_problems, num_cols), dtype=torch.int64)
            status = cost.new_empty((num_problems,), dtype=torch.int32)
            return matched, status
