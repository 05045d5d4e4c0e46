"""Triton kernels of group-detr and their input contract.

This package's own module holds the contract of grouped attention: what q, k, v must look like
for every backend (`check_inputs`) and what the Triton kernels support on top of that
(`HEAD_DIMS`, `DTYPES`, `unsupported_reason`). It imports no Triton, so `import group_detr`
never needs it; the kernels themselves are in `group_detr.kernels.grouped_attention`, imported on
first use. Imports go one way: group_detr.attention -> group_detr.kernels -> group_detr.layout.
"""
import importlib.util
import warnings
from typing import Optional

import torch
from torch import Tensor

from group_detr.layout import QueryLayout

HEAD_DIMS = (16, 32, 64, 128)  # the kernels load a whole head (tl.arange needs a power of two)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_inputs(q: Tensor, k: Tensor, v: Tensor, layout: QueryLayout, dropout_p: float = 0.0,
                 scale: Optional[float] = None) -> None:
    """Raise TypeError / ValueError with a clear message for inputs no backend accepts:
    q, k, v `(B, H, L, D)` of one shape, floating dtype and device, `L = layout.total_queries`,
    `0 <= dropout_p < 1`, `scale` positive or None."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, L, D), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if not isinstance(layout, QueryLayout):
        raise TypeError(f"layout must be a QueryLayout, got {type(layout).__name__}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(
            f"q, k and v must have the same shape (B, H, L, D), got {tuple(q.shape)}, "
            f"{tuple(k.shape)} and {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"q, k and v must be on the same device, got {q.device}, {k.device}, {v.device}")
    layout.check_length(q.shape[2], what="q.shape[2] (L)")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"scale must be a positive float or None, got {scale!r}")


def unsupported(q: Tensor) -> Optional[Exception]:
    """The error the Triton kernels raise for q `(B, H, L, D)` (already through `check_inputs`),
    or None when they can take it: a supported head_dim and dtype, a CUDA tensor, Triton."""
    hint = "(use backend='masked', 'folded' or 'flex')"
    if q.shape[-1] not in HEAD_DIMS:
        return ValueError(f"the Triton kernel supports head_dim in {HEAD_DIMS}, got "
                          f"{q.shape[-1]} {hint}")
    if q.dtype not in DTYPES:
        return TypeError(f"the Triton kernel supports dtypes {DTYPES}, got {q.dtype} {hint}")
    if not q.is_cuda:
        return ValueError(f"the Triton kernel needs CUDA tensors, got {q.device} {hint}")
    if importlib.util.find_spec("triton") is None:
        return ValueError(f"the Triton kernel needs the triton package (pip install triton) {hint}")
    return None


def check_supported(q: Tensor) -> None:
    """Raise the error of `unsupported(q)`, if any."""
    error = unsupported(q)
    if error is not None:
        raise error


# ------------------------------------------------------------------------------------------------
# safety while the kernels are unverified on a GPU: one failure turns them off for the process
# ------------------------------------------------------------------------------------------------
_failure: Optional[str] = None


def failure() -> Optional[str]:
    """Why the Triton kernels were turned off in this process (see `disable`), or None."""
    return _failure


def disable(error: BaseException) -> None:
    """Turn the Triton kernels off for the rest of the process after `error` (a compile or launch
    failure on the user's GPU), with one warning: grouped attention then runs the reference math
    instead of ending the training run, and `group_detr.backends()["triton_cuda"]` is False."""
    global _failure
    if _failure is None:
        _failure = f"{type(error).__name__}: {error}"
        warnings.warn(
            f"the Triton grouped-attention kernel failed on this machine ({_failure}); group_detr "
            "falls back to the reference attention (slower) for the rest of this process",
            RuntimeWarning, stacklevel=3)
