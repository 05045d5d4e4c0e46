"""Grouped self-attention for Group DETR decoders.

`grouped_attention(q, k, v, layout)` computes softmax(q k^T * scale + mask) v where the mask is the
block structure of a `QueryLayout` (groups that never see each other, an optional DN-DETR / DINO
denoising prefix). Backends:

  "triton"  the custom op `torch.ops.group_detr.grouped_attention_fwd` (+ `_bwd`): on CUDA the
            Triton kernels of `group_detr.kernels.grouped_attention`, which visit only the
            visible key blocks; on other devices the dense reference math below. Registered with
            `torch.library.custom_op`, so it works under `torch.compile(fullgraph=True)`.
  "masked"  dense (L, L) boolean mask + `F.scaled_dot_product_attention`: what DETR codebases
            do. Computes, and throws away, every masked score.
  "folded"  groups folded into the batch dimension + SDPA. Exact and cheap, but only for equal
            groups without a denoising prefix.
  "auto"    "triton" on CUDA when Triton is installed and supports the input, otherwise the
            cheapest reference ("folded" when possible, else "masked").

This module holds no kernel code; the kernels live in kernels/ (installed as group_detr.kernels)
and are imported lazily, so the package works without Triton.
"""
import importlib.util
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from group_detr.layout import QueryLayout, resolve_layout

BACKENDS = ("auto", "triton", "masked", "folded")
KERNEL_HEAD_DIMS = (16, 32, 64, 128)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ------------------------------------------------------------------------------------------------
# input checks
# ------------------------------------------------------------------------------------------------
def check_attention_inputs(q: Tensor, k: Tensor, v: Tensor, layout: QueryLayout,
                           dropout_p: float = 0.0, scale: Optional[float] = None) -> None:
    """Raise TypeError / ValueError with a clear message for inputs no backend accepts."""
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


def check_kernel_support(q: Tensor) -> None:
    """Raise ValueError / TypeError when the Triton kernel cannot take q `(B, H, L, D)`: its
    head_dim or dtype is not one the kernels are built for."""
    if q.shape[-1] not in KERNEL_HEAD_DIMS:
        raise ValueError(
            f"the Triton kernel supports head_dim in {KERNEL_HEAD_DIMS}, got {q.shape[-1]} "
            "(use backend='masked' or 'folded')")
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(f"the Triton kernel supports dtypes {KERNEL_DTYPES}, got {q.dtype}")


def _default_scale(head_dim: int, scale: Optional[float]) -> float:
    return float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)


# ------------------------------------------------------------------------------------------------
# reference paths (plain PyTorch)
# ------------------------------------------------------------------------------------------------
def masked_attention(q: Tensor, k: Tensor, v: Tensor, layout: QueryLayout, dropout_p: float = 0.0,
                     scale: Optional[float] = None, mask: Optional[Tensor] = None) -> Tensor:
    """Dense boolean mask + SDPA. q, k, v `(B, H, L, D)` -> `(B, H, L, D)`.

    `mask` is `layout.dense_mask()` (True = may attend); pass it to reuse one mask across calls
    (decoder layers), as DETR codebases do.
    """
    if mask is None:
        mask = layout.dense_mask(q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                          scale=scale)


def folded_attention(q: Tensor, k: Tensor, v: Tensor, layout: QueryLayout, dropout_p: float = 0.0,
                     scale: Optional[float] = None) -> Tensor:
    """Groups folded into the batch: `(B, H, K*N, D)` -> SDPA on `(B, H*K, N, D)` -> back.

    Exact for equal groups without a denoising prefix; raises ValueError otherwise.
    """
    if not layout.is_equal_groups:
        raise ValueError(
            "the 'folded' backend needs equal groups without denoising queries; this layout has "
            f"num_denoising={layout.num_denoising} (use backend='masked' or 'triton')")
    batch, heads, length, head_dim = q.shape
    if layout.num_groups == 1:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    fold = (batch, heads * layout.num_groups, layout.queries_per_group, head_dim)
    out = F.scaled_dot_product_attention(q.reshape(fold), k.reshape(fold), v.reshape(fold),
                                         dropout_p=dropout_p, scale=scale)
    return out.reshape(batch, heads, length, head_dim)


def dropout_keep_mask_reference(shape, dropout_p: float, seed: int, device) -> Tensor:
    """bool keep-mask `(B, H, L, L)` of the reference op, a function of `seed` only, so that the
    backward regenerates the forward's mask instead of storing it."""
    generator = torch.Generator(device=device).manual_seed(int(seed))
    return torch.rand(shape, generator=generator, device=device) >= dropout_p


def _reference_probs(q, k, layout, scale, lse=None):
    """Masked softmax probabilities in float32 (float64 for float64 inputs), and the row lse."""
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.matmul(q.to(compute_dtype), k.to(compute_dtype).transpose(-2, -1)) * scale
    scores = scores.masked_fill(~layout.dense_mask(q.device), float("-inf"))
    if lse is None:
        lse = torch.logsumexp(scores, dim=-1)
    # every segment sees itself, so no row is fully masked and lse is finite
    return torch.exp(scores - lse.to(compute_dtype)[..., None]), lse


def reference_forward(q: Tensor, k: Tensor, v: Tensor, layout: QueryLayout, dropout_p: float,
                      scale: float, seed: int) -> Tuple[Tensor, Tensor]:
    """Dense reference of the kernel forward: returns out `(B, H, L, D)` in q's dtype and the
    log-sum-exp of each row's scaled scores `(B, H, L)` (float32; float64 for float64 input)."""
    probs, lse = _reference_probs(q, k, layout, scale)
    if dropout_p > 0.0:
        keep = dropout_keep_mask_reference(probs.shape, dropout_p, seed, q.device)
        probs = probs * keep / (1.0 - dropout_p)
    out = torch.matmul(probs, v.to(probs.dtype))
    return out.to(q.dtype), lse.to(_lse_dtype(q.dtype))


def reference_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor,
                       layout: QueryLayout, dropout_p: float, scale: float,
                       seed: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Dense reference of the kernel backward (the flash-attention formulas):
    dV = Z^T dO, dP = (dO V^T) * keep / (1-p), dS = P * (dP - rowsum(P * dP)),
    dQ = scale * dS K, dK = scale * dS^T Q, with P the softmax and Z the dropped-out P."""
    probs, _ = _reference_probs(q, k, layout, scale, lse=lse)
    dtype = probs.dtype
    grad_out, qc, kc, vc = (t.to(dtype) for t in (grad_out, q, k, v))
    dropped, grad_probs = probs, torch.matmul(grad_out, vc.transpose(-2, -1))
    if dropout_p > 0.0:
        keep = dropout_keep_mask_reference(probs.shape, dropout_p, seed, q.device)
        dropped = probs * keep / (1.0 - dropout_p)
        grad_probs = grad_probs * keep / (1.0 - dropout_p)
    grad_v = torch.matmul(dropped.transpose(-2, -1), grad_out)
    grad_scores = probs * (grad_probs - (probs * grad_probs).sum(-1, keepdim=True))
    grad_q = torch.matmul(grad_scores, kc) * scale
    grad_k = torch.matmul(grad_scores.transpose(-2, -1), qc) * scale
    return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype)


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------------
# the custom op: reference math as the default implementation, Triton on CUDA
# ------------------------------------------------------------------------------------------------
def _layout_args(layout: QueryLayout):
    return (layout.num_groups, layout.queries_per_group, layout.num_denoising,
            layout.denoising_groups, layout.denoising_sees)


def _kernels():
    """The Triton kernel module, imported on first use so the package imports without Triton."""
    try:
        from group_detr.kernels import grouped_attention as kernels
    except ImportError as exc:
        raise RuntimeError(
            "the 'triton' backend on CUDA needs the triton package and group_detr.kernels "
            f"(pip install triton; install group-detr with pip): {exc}") from exc
    return kernels


@torch.library.custom_op("group_detr::grouped_attention_fwd", mutates_args=())
def _grouped_attention_fwd(q: Tensor, k: Tensor, v: Tensor, seed: Tensor, num_groups: int,
                           queries_per_group: int, num_denoising: int, denoising_groups: int,
                           denoising_sees: str, dropout_p: float,
                           scale: float) -> Tuple[Tensor, Tensor]:
    layout = QueryLayout(num_groups, queries_per_group, num_denoising, denoising_groups,
                         denoising_sees)
    return reference_forward(q, k, v, layout, dropout_p, scale, int(seed))


@_grouped_attention_fwd.register_kernel("cuda")
def _grouped_attention_fwd_cuda(q, k, v, seed, num_groups, queries_per_group, num_denoising,
                                denoising_groups, denoising_sees, dropout_p, scale):
    layout = QueryLayout(num_groups, queries_per_group, num_denoising, denoising_groups,
                         denoising_sees)
    return _kernels().forward(q, k, v, layout, scale=scale, dropout_p=dropout_p, seed=int(seed))


@_grouped_attention_fwd.register_fake
def _(q, k, v, seed, num_groups, queries_per_group, num_denoising, denoising_groups,
      denoising_sees, dropout_p, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=_lse_dtype(q.dtype))


@torch.library.custom_op("group_detr::grouped_attention_bwd", mutates_args=())
def _grouped_attention_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                           lse: Tensor, seed: Tensor, num_groups: int, queries_per_group: int,
                           num_denoising: int, denoising_groups: int, denoising_sees: str,
                           dropout_p: float, scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    layout = QueryLayout(num_groups, queries_per_group, num_denoising, denoising_groups,
                         denoising_sees)
    return reference_backward(grad_out, q, k, v, lse, layout, dropout_p, scale, int(seed))


@_grouped_attention_bwd.register_kernel("cuda")
def _grouped_attention_bwd_cuda(grad_out, q, k, v, out, lse, seed, num_groups, queries_per_group,
                                num_denoising, denoising_groups, denoising_sees, dropout_p, scale):
    layout = QueryLayout(num_groups, queries_per_group, num_denoising, denoising_groups,
                         denoising_sees)
    return _kernels().backward(grad_out, q, k, v, out, lse, layout, scale=scale,
                               dropout_p=dropout_p, seed=int(seed))


@_grouped_attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, seed, *layout_and_options):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, seed, *ctx.options = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, seed)


def _fwd_backward(ctx, grad_out, grad_lse):
    # lse is an auxiliary output for the backward; its gradient is not propagated
    q, k, v, out, lse, seed = ctx.saved_tensors
    grad_q, grad_k, grad_v = _grouped_attention_bwd(grad_out.contiguous(), q, k, v, out, lse,
                                                    seed, *ctx.options)
    return (grad_q, grad_k, grad_v, None) + (None,) * len(ctx.options)


_grouped_attention_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


def _op_attention(q, k, v, layout, dropout_p, scale):
    if dropout_p > 0.0:
        # a fresh seed from torch's CPU generator: torch.manual_seed makes runs reproducible
        seed = torch.randint(0, 2 ** 62, (), dtype=torch.int64)
    else:
        seed = torch.zeros((), dtype=torch.int64)
    out, _ = _grouped_attention_fwd(q, k, v, seed, *_layout_args(layout), float(dropout_p),
                                    float(scale))
    return out


# ------------------------------------------------------------------------------------------------
# dispatch
# ------------------------------------------------------------------------------------------------
def triton_supports(q: Tensor) -> bool:
    """Whether the Triton kernel can run on q `(B, H, L, D)`: CUDA, Triton installed, a supported
    head_dim and dtype."""
    return (q.is_cuda and q.shape[-1] in KERNEL_HEAD_DIMS and q.dtype in KERNEL_DTYPES
            and importlib.util.find_spec("triton") is not None)


def select_backend(q: Tensor, layout: QueryLayout, backend: str = "auto") -> str:
    """The concrete backend `grouped_attention` runs for these inputs."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if triton_supports(q):
        return "triton"
    return "folded" if layout.is_equal_groups else "masked"


def grouped_attention(q: Tensor, k: Tensor, v: Tensor, layout: QueryLayout,
                      dropout_p: float = 0.0, scale: Optional[float] = None,
                      backend: str = "auto") -> Tensor:
    """Self-attention restricted to the visibility of `layout`.

    Args:
        q, k, v: `(B, H, L, D)` with `L = layout.total_queries`; same dtype and device.
        layout: a QueryLayout (groups and optional denoising prefix).
        dropout_p: attention-probability dropout (pass 0.0 in eval, as with SDPA).
        scale: softmax scale, default 1/sqrt(D).
        backend: "auto" | "triton" | "masked" | "folded" (see the module docstring).

    Returns:
        `(B, H, L, D)`, q's dtype.
    """
    check_attention_inputs(q, k, v, layout, dropout_p, scale)
    backend = select_backend(q, layout, backend)
    if backend == "masked":
        return masked_attention(q, k, v, layout, dropout_p, scale)
    if backend == "folded":
        return folded_attention(q, k, v, layout, dropout_p, scale)
    if q.is_cuda:  # the CPU implementation of the op is the reference math: any head_dim
        check_kernel_support(q)
    return _op_attention(q, k, v, layout, dropout_p, _default_scale(q.shape[-1], scale))


# ------------------------------------------------------------------------------------------------
# the module
# ------------------------------------------------------------------------------------------------
class GroupedSelfAttention(nn.Module):
    """Drop-in for the decoder self-attention `nn.MultiheadAttention` of DETR-style models.

    Same parameters and names as `nn.MultiheadAttention(embed_dim, num_heads, dropout, bias)`
    (`in_proj_weight` `(3E, E)`, `in_proj_bias` `(3E,)`, `out_proj.weight`, `out_proj.bias`), so
    its state dict loads unchanged. As in DETR, the caller adds the positional embedding to query
    and key. With `layout=None` (one group of all L queries) it is ordinary attention and matches
    `nn.MultiheadAttention` numerically.

    Not supported (they raise NotImplementedError): `key_padding_mask` and `attn_mask` (decoder
    self-attention in DETR uses neither; the layout replaces the mask) and `need_weights=True`
    (the kernel never materialises the attention weights).
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 batch_first: bool = False, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads != 0:
            raise ValueError(
                f"embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout, self.batch_first, self.backend = dropout, batch_first, backend
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self._reset_parameters()

    def _reset_parameters(self):
        # nn.MultiheadAttention's initialisation
        nn.init.xavier_uniform_(self.in_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                layout: Optional[QueryLayout] = None, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = False, attn_mask: Optional[Tensor] = None):
        """query, key, value: `(L, B, E)` (`(B, L, E)` if batch_first), the same L and B.

        Returns `(out, None)` with out shaped like query, as `nn.MultiheadAttention` does with
        need_weights=False.
        """
        if key_padding_mask is not None:
            raise NotImplementedError(
                "GroupedSelfAttention does not support key_padding_mask: decoder self-attention "
                "over queries has no padding; use nn.MultiheadAttention where one is needed")
        if attn_mask is not None:
            raise NotImplementedError(
                "GroupedSelfAttention takes a QueryLayout (layout=...) instead of attn_mask")
        if need_weights:
            raise NotImplementedError(
                "GroupedSelfAttention never materialises attention weights; pass "
                "need_weights=False")
        self._check_shapes(query, key, value)
        if self.batch_first:  # (B, L, E) -> (L, B, E)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        length, batch, _ = query.shape
        layout = resolve_layout(layout, length)

        q, k, v = self._project(query, key, value)
        # (L, B, E) -> (B, H, L, D)
        q, k, v = (t.reshape(length, batch, self.num_heads, self.head_dim).permute(1, 2, 0, 3)
                   for t in (q, k, v))
        dropout_p = self.dropout if self.training else 0.0
        out = grouped_attention(q, k, v, layout, dropout_p=dropout_p, backend=self.backend)
        out = out.permute(2, 0, 1, 3).reshape(length, batch, self.embed_dim)
        out = self.out_proj(out)
        if self.batch_first:
            out = out.transpose(0, 1)
        return out, None

    def _check_shapes(self, query, key, value):
        for name, t in (("query", query), ("key", key), ("value", value)):
            if t.dim() != 3 or t.shape[-1] != self.embed_dim:
                layout_name = "(B, L, E)" if self.batch_first else "(L, B, E)"
                raise ValueError(
                    f"{name} must have shape {layout_name} with E={self.embed_dim}, got "
                    f"{tuple(t.shape)}")
        if not (query.shape == key.shape == value.shape):
            raise ValueError(
                "self-attention needs query, key and value of the same shape, got "
                f"{tuple(query.shape)}, {tuple(key.shape)} and {tuple(value.shape)}")

    def _project(self, query, key, value):
        weight, bias = self.in_proj_weight, self.in_proj_bias
        e = self.embed_dim
        w_q, w_k, w_v = weight.split(e)
        b_q, b_k, b_v = bias.split(e) if bias is not None else (None, None, None)
        if key is query:  # DETR: q = k = tgt + pos, one matmul for both
            q, k = F.linear(query, weight[:2 * e], None if bias is None else bias[:2 * e]).chunk(2, -1)
        else:
            q, k = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k)
        return q, k, F.linear(value, w_v, b_v)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
                f"batch_first={self.batch_first}, backend={self.backend!r}")
