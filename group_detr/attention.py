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
  "flex"    torch's FlexAttention (`torch.nn.attention.flex_attention`, compiled) with a block
            mask from the layout's `mask_mod`: PyTorch's own block-sparse attention, the peer of
            our kernel. No dropout; no backward on the CPU (torch 2.13).
  "auto"    picked per device by measurement (see `select_backend`): "triton" on CUDA when
            the kernels take the input, else "folded" for equal groups, else "flex" on the CPU
            when no gradient or dropout is needed, else "masked".

This module holds no kernel code: the input contract is group_detr.kernels (`check_inputs`,
`unsupported`), the Triton launchers group_detr.kernels.grouped_attention, imported on first use
so the package works without Triton. Imports go attention -> kernels -> layout, never back.
"""
import functools
import math
import warnings
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from group_detr import kernels
from group_detr.layout import QueryLayout, resolve_layout

BACKENDS = ("auto", "triton", "flex", "masked", "folded")


def _default_scale(head_dim: int, scale: Optional[float]) -> float:
    return float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)


# ------------------------------------------------------------------------------------------------
# reference paths (plain PyTorch)
# ------------------------------------------------------------------------------------------------
def masked_attention(q: Tensor, k: Tensor, v: Tensor, layout: QueryLayout, dropout_p: float = 0.0,
                     scale: Optional[float] = None, mask: Optional[Tensor] = None) -> Tensor:
    """Dense boolean mask + SDPA. q, k, v `(B, H, L, D)` -> `(B, H, L, D)`.

    `mask` is `layout.dense_mask()` (True = may attend); by default the cached one
    (`dense_mask`), built once per layout and device as DETR codebases build theirs once per step.
    """
    if mask is None:
        mask = dense_mask(layout, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                          scale=scale)


@functools.lru_cache(maxsize=16)
def dense_mask(layout: QueryLayout, device: torch.device) -> Tensor:
    """`layout.dense_mask(device)`, cached per (layout, device): with denoising the layout changes
    from batch to batch (DINO's dynamic groups) but takes few values, and building an (L, L)
    mask for every decoder layer of every step is what the cache saves. 16 entries: L*L bytes
    each (1 MB at L = 1000)."""
    return layout.dense_mask(device)


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


@functools.lru_cache(maxsize=64)
def flex_block_mask(layout: QueryLayout, device: torch.device):
    """FlexAttention `BlockMask` of `layout` on `device` (L = layout.total_queries), from the
    layout's `mask_mod`; cached per (layout, device), since building it evaluates the mask over
    all L*L pairs (11 s for L = 10100 on the 2-core CPU)."""
    from torch.nn.attention.flex_attention import create_block_mask
    length = layout.total_queries
    return create_block_mask(layout.mask_mod(device), None, None, length, length, device=device)


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    """torch.compile(flex_attention), made once: FlexAttention only fuses, and skips masked
    blocks, when compiled (eager it materialises every score)."""
    from torch.nn.attention.flex_attention import flex_attention as flex
    return torch.compile(flex, dynamic=False)


def flex_attention(q: Tensor, k: Tensor, v: Tensor, layout: QueryLayout, dropout_p: float = 0.0,
                   scale: Optional[float] = None) -> Tensor:
    """torch's FlexAttention with the layout's block mask: `(B, H, L, D)` -> `(B, H, L, D)`.

    Compiled (through Triton on CUDA, inductor's C++ on the CPU; the first call of a shape
    compiles: 80 s on the 2-core CPU). FlexAttention has no dropout, so dropout_p must be 0, and
    in torch 2.13 no backward on the CPU (it raises NotImplementedError when a gradient is
    needed there).
    """
    if dropout_p != 0.0:
        raise ValueError(
            f"the 'flex' backend has no attention dropout (FlexAttention has none), got "
            f"dropout_p={dropout_p} (use backend='triton', 'masked' or 'folded')")
    if q.device.type == "cpu" and any(t.requires_grad for t in (q, k, v)):
        if torch.is_grad_enabled():
            # raised before the compiled call: a failed trace leaves dynamo running flex eagerly
            raise NotImplementedError(
                f"the 'flex' backend has no backward on the CPU (FlexAttention in torch "
                f"{torch.__version__} has none): run it under torch.no_grad() or use "
                "backend='masked' or 'folded'")
        q, k, v = q.detach(), k.detach(), v.detach()  # torch refuses them even under no_grad
    block_mask = flex_block_mask(layout, q.device)
    if torch.compiler.is_compiling():  # inside the caller's compiled region: let it fuse
        from torch.nn.attention.flex_attention import flex_attention as flex
        return flex(q, k, v, block_mask=block_mask, scale=scale)
    return _compiled_flex()(q, k, v, block_mask=block_mask, scale=scale)


def dropout_keep_mask_reference(shape, dropout_p: float, seed: int, device) -> Tensor:
    """bool keep-mask `(B, H, L, L)` of the reference op, a function of `seed` only, so that the
    backward regenerates the forward's mask instead of storing it."""
    generator = torch.Generator(device=device).manual_seed(int(seed))
    return torch.rand(shape, generator=generator, device=device) >= dropout_p


def _reference_probs(q, k, layout, scale, lse=None):
    """Masked softmax probabilities in float32 (float64 for float64 inputs), and the row lse."""
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.matmul(q.to(compute_dtype), k.to(compute_dtype).transpose(-2, -1)) * scale
    scores = scores.masked_fill(~dense_mask(layout, q.device), float("-inf"))
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
def _op_args(layout: QueryLayout) -> tuple:
    """The layout as the op's five scalar arguments (custom ops take no dataclasses), in the
    order of QueryLayout's fields: `QueryLayout(*_op_args(layout)) == layout`."""
    return (layout.num_groups, layout.queries_per_group, layout.num_denoising,
            layout.denoising_groups, layout.denoising_sees)


def _triton_kernels():
    """The Triton launchers, imported on first use so the package imports without Triton."""
    from group_detr.kernels import grouped_attention as launchers
    return launchers


def _runs_kernels(q: Tensor) -> bool:
    """Whether the op runs the Triton kernels on q (CUDA, a supported head_dim and dtype, and
    they have not failed in this process) or the reference math (any other input)."""
    return kernels.unsupported(q) is None and kernels.failure() is None


def _kernels_or_reference(q: Tensor, run_kernels, run_reference):
    """run_kernels() where the kernels run, else run_reference(). A kernel that fails to compile
    or launch (never run on a GPU of this kind before) turns the kernels off with one warning and
    the reference answers, so a user's training run goes on. The reference's lse is the kernels'
    (natural-log, float32), so a backward may fall back after a kernel forward; with dropout that
    one step's backward draws another mask."""
    if _runs_kernels(q):
        try:
            return run_kernels()
        except Exception as error:  # noqa: BLE001  (any compile / launch error: see docstring)
            kernels.disable(error)
    return run_reference()


@torch.library.custom_op("group_detr::grouped_attention_fwd", mutates_args=())
def _grouped_attention_fwd(q: Tensor, k: Tensor, v: Tensor, seed: Tensor, num_groups: int,
                           queries_per_group: int, num_denoising: int, denoising_groups: int,
                           denoising_sees: str, dropout_p: float,
                           scale: float) -> Tuple[Tensor, Tensor]:
    layout = QueryLayout(num_groups, queries_per_group, num_denoising, denoising_groups,
                         denoising_sees)
    return _kernels_or_reference(
        q, lambda: _triton_kernels().forward(q, k, v, layout, scale=scale, dropout_p=dropout_p,
                                             seed=int(seed)),
        lambda: reference_forward(q, k, v, layout, dropout_p, scale, int(seed)))


@_grouped_attention_fwd.register_fake
def _(q, k, v, seed, *layout_and_options):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=_lse_dtype(q.dtype))


@torch.library.custom_op("group_detr::grouped_attention_bwd", mutates_args=())
def _grouped_attention_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                           lse: Tensor, seed: Tensor, num_groups: int, queries_per_group: int,
                           num_denoising: int, denoising_groups: int, denoising_sees: str,
                           dropout_p: float, scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    layout = QueryLayout(num_groups, queries_per_group, num_denoising, denoising_groups,
                         denoising_sees)
    return _kernels_or_reference(
        q, lambda: _triton_kernels().backward(grad_out, q, k, v, out, lse, layout, scale=scale,
                                              dropout_p=dropout_p, seed=int(seed)),
        lambda: reference_backward(grad_out, q, k, v, lse, layout, dropout_p, scale, int(seed)))


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
    out, _ = _grouped_attention_fwd(q, k, v, seed, *_op_args(layout), float(dropout_p),
                                    float(scale))
    return out


# ------------------------------------------------------------------------------------------------
# dispatch
# ------------------------------------------------------------------------------------------------
_flex_failure: Optional[str] = None  # why "auto" stopped picking flex here (it failed to compile)


def select_backend(q: Tensor, layout: QueryLayout, backend: str = "auto", dropout_p: float = 0.0,
                   needs_grad: Optional[bool] = None) -> str:
    """The concrete backend `grouped_attention` runs for these inputs.

    "auto" picks by measurement (bench_attention.py, benchmarks/results/attention-cpu-2core.json:
    2-core Xeon, float32, B=1, H=8, D=32, torch 2.13, load average 7-9 from other jobs):
      * CUDA, input the kernels take: "triton". Not yet measured on a GPU (none has run it);
        the device command's bench_attention.py run decides it against flex and folded there.
      * equal groups: "folded". On the CPU it beat masked 5.4x / 6.6x (fwd+bwd, cond_detr_k11
        L=3300 / lwdetr_k13 L=3900) and flex 5.3x / 4.5x (fwd: 36 vs 192 ms, 59 vs 268 ms).
      * a denoising prefix on the CPU, no gradient and no dropout: "flex". Its forward beat
        masked 3.9x on dino_k11_dn (L=10100: 1.9 s vs 7.5 s); the first call of a shape compiles
        (10-25 s), repaid by the third call.
      * otherwise "masked": on the CPU FlexAttention has no backward (torch 2.13), so training
        with a denoising prefix has no faster exact path there.
    `needs_grad` defaults to whether autograd will record q (grad mode on and q requires grad).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if _runs_kernels(q):
        return "triton"
    if layout.is_equal_groups:
        return "folded"
    if needs_grad is None:
        needs_grad = torch.is_grad_enabled() and q.requires_grad
    if q.device.type == "cpu" and not needs_grad and dropout_p == 0.0 and _flex_failure is None:
        return "flex"
    return "masked"


def _auto_flex(q, k, v, layout, scale):
    """flex where "auto" picked it, and "masked" with one warning from then on where this
    machine cannot compile it (no C++ compiler for inductor, say): "auto" never fails where a
    reference path works."""
    global _flex_failure
    try:
        return flex_attention(q, k, v, layout, scale=scale)
    except Exception as error:  # noqa: BLE001  (whatever the compiler stack raises)
        first_line = str(error).splitlines()[0] if str(error) else ""
        _flex_failure = f"{type(error).__name__}: {first_line}"
        warnings.warn(f"backend='auto': FlexAttention does not compile here ({_flex_failure}); "
                      "using 'masked' instead from now on", RuntimeWarning, stacklevel=3)
        return masked_attention(q, k, v, layout, scale=scale)


def grouped_attention(q: Tensor, k: Tensor, v: Tensor, layout: QueryLayout,
                      dropout_p: float = 0.0, scale: Optional[float] = None,
                      backend: str = "auto") -> Tensor:
    """Self-attention restricted to the visibility of `layout`.

    Args:
        q, k, v: `(B, H, L, D)` with `L = layout.total_queries`; same dtype and device.
        layout: a QueryLayout (groups and optional denoising prefix).
        dropout_p: attention-probability dropout (pass 0.0 in eval, as with SDPA).
        scale: softmax scale, default 1/sqrt(D).
        backend: "auto" | "triton" | "flex" | "masked" | "folded" (see the module docstring).

    Returns:
        `(B, H, L, D)`, q's dtype.
    """
    kernels.check_inputs(q, k, v, layout, dropout_p, scale)
    chosen = select_backend(q, layout, backend, dropout_p,
                            torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))
    if chosen == "flex" and backend == "auto":
        return _auto_flex(q, k, v, layout, scale)
    backend = chosen
    if backend == "masked":
        return masked_attention(q, k, v, layout, dropout_p, scale)
    if backend == "folded":
        return folded_attention(q, k, v, layout, dropout_p, scale)
    if backend == "flex":
        return flex_attention(q, k, v, layout, dropout_p, scale)
    if q.is_cuda:  # on other devices the op runs the reference math: any head_dim and dtype
        kernels.check_supported(q)
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
                 batch_first: bool = False, backend: str = "auto",
                 device: Optional[Union[str, torch.device]] = None,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads != 0:
            raise ValueError(
                f"embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout, self.batch_first, self.backend = dropout, batch_first, backend
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, device=device,
                                                       dtype=dtype))
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, device=device, dtype=dtype))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, device=device, dtype=dtype)
        self._reset_parameters()

    def _reset_parameters(self):
        # nn.MultiheadAttention's initialisation
        nn.init.xavier_uniform_(self.in_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                layout: Optional[QueryLayout] = None, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = False,
                attn_mask: Optional[Tensor] = None) -> Tuple[Tensor, None]:
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
