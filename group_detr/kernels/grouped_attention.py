"""Triton kernels for grouped (block-diagonal) self-attention, forward and backward.

The attention pattern is a `QueryLayout`: contiguous segments (denoising groups, then matching
groups) and a segment-visibility matrix. Instead of an (L, L) mask the kernels get a schedule:

    tiles  int32 (T, 4): [first_row, end_row, first_range, end_range) for each tile of rows;
                         tiles are cut per segment, so a tile never straddles two groups and
                         every row of a tile sees the same keys;
    ranges int32 (R, 2): [start, end) of the merged visible ranges, indexed by the tiles.

A program walks its tile's ranges in steps of BLOCK_N and masks only the range's tail, so it
visits only visible key blocks: for K equal groups it does 1/K of the dense work.

  forward  (`_fwd_kernel`):  online softmax over the visible keys (exp2 domain), writes out and
                             the natural-log log-sum-exp of each row's scaled scores;
  backward (`_bwd_preprocess`, `_bwd_dkdv_kernel`, `_bwd_dq_kernel`): delta = rowsum(dO * O),
           then dK, dV per tile of keys (walking the queries that see them: the transposed
           schedule) and dQ per tile of queries; no atomics.

Dropout is Philox (`tl.rand`) keyed by (seed, ((b*H + h)*L + row)*L + col): the backward
regenerates the forward's mask instead of storing it, and `dropout_keep_mask` materialises it
for tests.

On CPU tensors the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set before
triton is imported); there `tl.dot` is computed in float32 (the interpreter's bf16 dot is wrong)
with a fixed inner block. On a GPU each kernel runs one committed configuration per head_dim,
dtype, dropout and GPU generation (`launch_config`), compiled ahead of time for sm_80 and sm_90
in tests/test_kernel_aot.py (group_detr.kernels.aot); nothing is autotuned.

The launchers `forward` / `backward` are the kernels' only entry points; autograd, dispatch and
input checks belong to their one caller, the custom op `torch.ops.group_detr.grouped_attention_fwd`
of group_detr.attention.
"""
import functools
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from group_detr.layout import QueryLayout

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * LOG2E): the kernels work in the exp2 domain
_LOG2E = tl.constexpr(LOG2E)  # the same inside kernels (globals used by kernels must be constexpr)
INTERPRETED = triton.knobs.runtime.interpret


def _interpreter_index_of_one_element_arrays():
    """Triton 3.6's interpreter holds every scalar as a shape-(1,) array and turns it into a
    Python int (a dynamic `range` bound) with `int(array)`, which numpy >= 2.5 refuses; Triton
    3.9 squeezes first. Give the older interpreter 3.9's conversion (interpreter only: compiled
    kernels never see it)."""
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "_squeezes_index", False):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched.__dict__["_squeezes_index"] = True  # a marker on the function object: patch once
    interpreter._patch_lang_tensor = patched


if INTERPRETED:
    _interpreter_index_of_one_element_arrays()
TILE = 64  # rows of a query tile (forward, dQ) and of a key tile (dK, dV); the schedule's unit


# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------
@triton.jit
def _keep(seed, bh, rows, cols, seq_len, dropout_p):
    """Dropout keep-mask for the (rows x cols) block of head bh: a pure function of the indices,
    so forward, backward and dropout_keep_mask agree. rows/cols are broadcastable int blocks."""
    offsets = (bh.to(tl.int64) * seq_len + rows.to(tl.int64)) * seq_len + cols.to(tl.int64)
    return tl.rand(seed, offsets) >= dropout_p


@triton.jit
def _program_tile(Tiles, num_heads):
    """This program's (batch * head, batch, head) and its tile of the schedule: the tile's rows
    (or key columns) [start, end) and the range of visible ranges [first_range, end_range)."""
    tile = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # int64 offsets: b * stride_b may pass 2**31
    start = tl.load(Tiles + tile * 4)
    end = tl.load(Tiles + tile * 4 + 1)
    first_range = tl.load(Tiles + tile * 4 + 2)
    end_range = tl.load(Tiles + tile * 4 + 3)
    return bh, bh // num_heads, bh % num_heads, start, end, first_range, end_range


@triton.jit
def _block_ptrs(Base, stride_b, stride_h, stride_l, b, h, rows, dims):
    """Pointers to the `(len(rows), HEAD_DIM)` block of rows of one (batch, head)."""
    return Base + b * stride_b + h * stride_h + rows[:, None] * stride_l + dims[None, :]


@triton.jit(do_not_specialize=["seed"])
def _fwd_kernel(Q, K, V, Out, Lse, Tiles, Ranges,
                stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
                stride_vb, stride_vh, stride_vl, stride_ob, stride_oh, stride_ol,
                num_heads, seq_len, qk_scale_log2, dropout_p, seed,
                HEAD_DIM: tl.constexpr, TILE_M: tl.constexpr, BLOCK_N: tl.constexpr,
                HAS_DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr,
                PRECISION: tl.constexpr):
    bh, b, h, row_start, row_end, first_range, end_range = _program_tile(Tiles, num_heads)
    rows = row_start + tl.arange(0, TILE_M)
    row_ok = rows < row_end
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(_block_ptrs(Q, stride_qb, stride_qh, stride_ql, b, h, rows, dims),
                mask=row_ok[:, None], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh

    m_i = tl.full([TILE_M], float("-inf"), dtype=tl.float32)  # running max, log2 units
    l_i = tl.zeros([TILE_M], dtype=tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([TILE_M, HEAD_DIM], dtype=tl.float32)
    for r in range(first_range, end_range):
        key_start = tl.load(Ranges + r * 2)
        key_end = tl.load(Ranges + r * 2 + 1)
        for block_start in range(key_start, key_end, BLOCK_N):
            cols = block_start + tl.arange(0, BLOCK_N)
            col_ok = cols < key_end
            k_t = tl.load(K + cols[None, :] * stride_kl + dims[:, None], mask=col_ok[None, :],
                          other=0.0)  # (HEAD_DIM, BLOCK_N)
            v = tl.load(V + cols[:, None] * stride_vl + dims[None, :], mask=col_ok[:, None],
                        other=0.0)
            if DOT_FP32:
                k_t = k_t.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, k_t, input_precision=PRECISION) * qk_scale_log2
            s = tl.where(col_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            # the normaliser sums the probabilities before dropout (softmax, then dropout)
            l_i = l_i * alpha + tl.sum(p, 1)
            if HAS_DROPOUT:
                keep = _keep(seed, bh, rows[:, None], cols[None, :], seq_len, dropout_p)
                p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new

    acc = acc / l_i[:, None]
    tl.store(_block_ptrs(Out, stride_ob, stride_oh, stride_ol, b, h, rows, dims),
             acc.to(Out.dtype.element_ty), mask=row_ok[:, None])
    # natural-log lse of the scaled scores: (m + log2 l) / log2(e)
    tl.store(Lse + bh * seq_len + rows, (m_i + tl.math.log2(l_i)) / _LOG2E,
             mask=row_ok)


@triton.jit
def _bwd_preprocess(Out, GradOut, Delta, stride_ob, stride_oh, stride_ol,
                    stride_gb, stride_gh, stride_gl, num_heads, seq_len,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta[b, h, i] = sum_d dO[b, h, i, d] * O[b, h, i, d] (float32)."""
    bh = tl.program_id(1).to(tl.int64)  # int64 offsets: b * stride_b may pass 2**31
    b = bh // num_heads
    h = bh % num_heads
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < seq_len
    dims = tl.arange(0, HEAD_DIM)
    o = tl.load(Out + b * stride_ob + h * stride_oh + rows[:, None] * stride_ol + dims[None, :],
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(_block_ptrs(GradOut, stride_gb, stride_gh, stride_gl, b, h, rows, dims),
                 mask=row_ok[:, None], other=0.0).to(tl.float32)
    tl.store(Delta + bh * seq_len + rows, tl.sum(o * do, 1), mask=row_ok)


@triton.jit(do_not_specialize=["seed"])
def _bwd_dkdv_kernel(Q, K, V, GradOut, Lse, Delta, GradK, GradV, Tiles, Ranges,
                     stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
                     stride_vb, stride_vh, stride_vl, stride_gb, stride_gh, stride_gl,
                     stride_dkb, stride_dkh, stride_dkl, stride_dvb, stride_dvh, stride_dvl,
                     num_heads, seq_len, scale, qk_scale_log2, dropout_p, seed,
                     HEAD_DIM: tl.constexpr, TILE_N: tl.constexpr, BLOCK_M: tl.constexpr,
                     HAS_DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr,
                     PRECISION: tl.constexpr):
    """dK, dV for one tile of keys, walking the query ranges that see it. Works on transposed
    blocks (keys x queries) so that dV = Z^T dO and dK = dS^T Q need no transposes."""
    bh, b, h, col_start, col_end, first_range, end_range = _program_tile(Tiles, num_heads)
    cols = col_start + tl.arange(0, TILE_N)
    col_ok = cols < col_end
    dims = tl.arange(0, HEAD_DIM)
    k = tl.load(_block_ptrs(K, stride_kb, stride_kh, stride_kl, b, h, cols, dims),
                mask=col_ok[:, None], other=0.0)
    v = tl.load(_block_ptrs(V, stride_vb, stride_vh, stride_vl, b, h, cols, dims),
                mask=col_ok[:, None], other=0.0)
    if DOT_FP32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    Q += b * stride_qb + h * stride_qh
    GradOut += b * stride_gb + h * stride_gh
    Lse += bh * seq_len
    Delta += bh * seq_len

    grad_k = tl.zeros([TILE_N, HEAD_DIM], dtype=tl.float32)
    grad_v = tl.zeros([TILE_N, HEAD_DIM], dtype=tl.float32)
    for r in range(first_range, end_range):
        query_start = tl.load(Ranges + r * 2)
        query_end = tl.load(Ranges + r * 2 + 1)
        for block_start in range(query_start, query_end, BLOCK_M):
            rows = block_start + tl.arange(0, BLOCK_M)
            row_ok = rows < query_end
            q_t = tl.load(Q + rows[None, :] * stride_ql + dims[:, None], mask=row_ok[None, :],
                          other=0.0)  # (HEAD_DIM, BLOCK_M)
            do = tl.load(GradOut + rows[:, None] * stride_gl + dims[None, :],
                         mask=row_ok[:, None], other=0.0)  # (BLOCK_M, HEAD_DIM)
            lse_log2 = tl.load(Lse + rows, mask=row_ok, other=0.0) * _LOG2E
            delta = tl.load(Delta + rows, mask=row_ok, other=0.0)
            if DOT_FP32:
                q_t = q_t.to(tl.float32)
                do = do.to(tl.float32)
            s_t = tl.dot(k, q_t, input_precision=PRECISION) * qk_scale_log2  # (TILE_N, BLOCK_M)
            p_t = tl.math.exp2(s_t - lse_log2[None, :])
            p_t = tl.where(col_ok[:, None] & row_ok[None, :], p_t, 0.0)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # dO V^T, transposed
            if HAS_DROPOUT:
                keep = _keep(seed, bh, rows[None, :], cols[:, None], seq_len, dropout_p)
                z_t = tl.where(keep, p_t / (1.0 - dropout_p), 0.0)
                dp_t = tl.where(keep, dp_t / (1.0 - dropout_p), 0.0)
            else:
                z_t = p_t
            grad_v += tl.dot(z_t.to(do.dtype), do, input_precision=PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            grad_k += tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), input_precision=PRECISION)

    grad_k *= scale
    tl.store(_block_ptrs(GradK, stride_dkb, stride_dkh, stride_dkl, b, h, cols, dims),
             grad_k.to(GradK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(_block_ptrs(GradV, stride_dvb, stride_dvh, stride_dvl, b, h, cols, dims),
             grad_v.to(GradV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit(do_not_specialize=["seed"])
def _bwd_dq_kernel(Q, K, V, GradOut, Lse, Delta, GradQ, Tiles, Ranges,
                   stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
                   stride_vb, stride_vh, stride_vl, stride_gb, stride_gh, stride_gl,
                   stride_dqb, stride_dqh, stride_dql,
                   num_heads, seq_len, scale, qk_scale_log2, dropout_p, seed,
                   HEAD_DIM: tl.constexpr, TILE_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   HAS_DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr,
                   PRECISION: tl.constexpr):
    """dQ = scale * dS K for one tile of queries, walking its visible key ranges."""
    bh, b, h, row_start, row_end, first_range, end_range = _program_tile(Tiles, num_heads)
    rows = row_start + tl.arange(0, TILE_M)
    row_ok = rows < row_end
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(_block_ptrs(Q, stride_qb, stride_qh, stride_ql, b, h, rows, dims),
                mask=row_ok[:, None], other=0.0)
    do = tl.load(_block_ptrs(GradOut, stride_gb, stride_gh, stride_gl, b, h, rows, dims),
                 mask=row_ok[:, None], other=0.0)
    lse_log2 = tl.load(Lse + bh * seq_len + rows, mask=row_ok, other=0.0) * _LOG2E
    delta = tl.load(Delta + bh * seq_len + rows, mask=row_ok, other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh

    grad_q = tl.zeros([TILE_M, HEAD_DIM], dtype=tl.float32)
    for r in range(first_range, end_range):
        key_start = tl.load(Ranges + r * 2)
        key_end = tl.load(Ranges + r * 2 + 1)
        for block_start in range(key_start, key_end, BLOCK_N):
            cols = block_start + tl.arange(0, BLOCK_N)
            col_ok = cols < key_end
            k = tl.load(K + cols[:, None] * stride_kl + dims[None, :], mask=col_ok[:, None],
                        other=0.0)  # (BLOCK_N, HEAD_DIM)
            v_t = tl.load(V + cols[None, :] * stride_vl + dims[:, None], mask=col_ok[None, :],
                          other=0.0)  # (HEAD_DIM, BLOCK_N)
            if DOT_FP32:
                k = k.to(tl.float32)
                v_t = v_t.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale_log2
            p = tl.math.exp2(s - lse_log2[:, None])
            p = tl.where(row_ok[:, None] & col_ok[None, :], p, 0.0)
            dp = tl.dot(do, v_t, input_precision=PRECISION)
            if HAS_DROPOUT:
                keep = _keep(seed, bh, rows[:, None], cols[None, :], seq_len, dropout_p)
                dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
            ds = p * (dp - delta[:, None])
            grad_q += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    grad_q *= scale
    tl.store(_block_ptrs(GradQ, stride_dqb, stride_dqh, stride_dql, b, h, rows, dims),
             grad_q.to(GradQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit(do_not_specialize=["seed"])
def _dropout_mask_kernel(Keep, num_heads, seq_len, dropout_p, seed, BLOCK: tl.constexpr):
    bh = tl.program_id(2)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    keep = _keep(seed, bh, rows[:, None], cols[None, :], seq_len, dropout_p)
    ok = (rows[:, None] < seq_len) & (cols[None, :] < seq_len)
    tl.store(Keep + (bh.to(tl.int64) * seq_len + rows[:, None]) * seq_len + cols[None, :],
             keep.to(tl.int8), mask=ok)


# ------------------------------------------------------------------------------------------------
# launch configurations: one committed choice per (kernel, head_dim, dtype, dropout, GPU), no
# autotuning. Autotuning compiled all 12 candidate configurations on a key's first call (9-312 s
# each key on the 2-core CPU's ptxas, up to 760 s for float32) and benchmarked inside that call,
# which breaks a CUDA-graph capture or a first call inside torch.compile. The tile size is fixed
# because the schedule is cut in tiles; the table picks the inner block, warps and stages.
# ------------------------------------------------------------------------------------------------
_KERNELS = {  # name -> (kernel, its inner-loop block argument or None)
    "fwd": (_fwd_kernel, "BLOCK_N"),
    "dkdv": (_bwd_dkdv_kernel, "BLOCK_M"),
    "dq": (_bwd_dq_kernel, "BLOCK_N"),
    "preprocess": (_bwd_preprocess, None),
}
INTERPRETER_BLOCK = 32  # inner block under the interpreter: smaller than TILE, so tails show


@dataclass(frozen=True)
class LaunchConfig:
    """Inner block (BLOCK_N / BLOCK_M; ignored by "preprocess"), warps and pipeline stages."""
    block: int
    num_warps: int
    num_stages: int


def launch_config(name: str, head_dim: int, dtype: torch.dtype, has_dropout: bool,
                  capability: Tuple[int, int]) -> LaunchConfig:
    """The configuration the launcher runs `name` with on a GPU of compute `capability`.

    Read from ptxas's resource reports for sm_80 and sm_90 (group_detr.kernels.aot: the
    former 4-warp choices, then candidates compiled with `compile_all(keys, configs=...)`), not
    yet from a GPU timing (none has run): the configurations that neither spill registers nor
    pass the GPU's shared memory. The launcher's choices are the table
    benchmarks/results/kernel_resources-aot.json (scripts/kernel_resources.py). With 4 warps
    and 64-wide blocks everywhere, half precision spilled in 20 of 96 launches (dkdv up to
    408 B at D=64 with dropout on sm_80). The same choice holds on sm_80 and sm_90.
    tests/test_kernel_aot.py compiles every choice of this function and fails on a
    half-precision spill or a shared-memory overflow.
    """
    if name == "preprocess":
        return LaunchConfig(TILE, 4, 1)
    if dtype != torch.float32:
        # The one choice per kernel that ptxas compiled without a spill on sm_80 and sm_90 in
        # both Triton 3.9 (CI) and 3.6 (the device image), at every head dim and with and
        # without dropout (candidates: blocks 16/32/64, 4/8 warps, 1/2 stages). The previous
        # table ((32, 4, 2) for fwd and dq at D=128, (32, 8, 2) elsewhere) was clean on 3.9 but
        # spilled 16-64 B in 10 sm_80 launches on 3.6 (fwd D=32, dkdv D=64, dq D=64 with
        # dropout, dq D=128). fwd has no clean 32-wide choice on both (D=64 or D=128 spill);
        # at D=128 dropout's extra live values make the 1-stage choices spill (36-96 B), where
        # 2 stages with 8 warps do not (and without dropout dq's 2-stage choice spills on sm_80).
        if name == "fwd":
            return LaunchConfig(16, 4, 2)
        if head_dim == 128 and has_dropout:
            return LaunchConfig(32, 8, 2)
        if name == "dkdv":
            return LaunchConfig(32, 4, 1)
        return LaunchConfig(32, 8, 1)
    # float32 dots are full-precision FMAs on float32 tiles held in registers: 16-wide inner
    # blocks where 32 spill (dkdv at every D tried, fwd and dq at D=128), one stage. It still
    # spills in fwd at D=128 on sm_90 (about 300 B) and costs about twice the inner-loop steps
    # of half precision's 32-wide blocks
    if name == "dkdv" or head_dim == 128:
        return LaunchConfig(16, 8, 1)
    return LaunchConfig(32, 8, 1)


def _launch(name, grid, args, constants, device):
    """One launch: the committed configuration on CUDA (compiled on its first call, never
    benchmarked), a fixed inner block under the interpreter."""
    kernel, inner = _KERNELS[name]
    if device.type == "cuda" and not INTERPRETED:
        config = launch_config(name, constants["HEAD_DIM"], args[0].dtype,
                               constants.get("HAS_DROPOUT", False),
                               torch.cuda.get_device_capability(device))
        blocks = {inner: config.block} if inner else {}
        kernel[grid](*args, **constants, **blocks, num_warps=config.num_warps,
                     num_stages=config.num_stages)
    else:
        kernel[grid](*args, **constants, **({inner: INTERPRETER_BLOCK} if inner else {}))


# ------------------------------------------------------------------------------------------------
# schedule
# ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def schedule(layout: QueryLayout, tile: int, transpose: bool, device: torch.device):
    """(tiles int32 (T, 4), ranges int32 (R, 2)) for the kernels, cached per layout.

    transpose=False: tiles of query rows and the key ranges they see (forward, dQ);
    transpose=True: tiles of keys and the query ranges that see them (dK, dV).
    """
    per_segment = layout.visible_query_ranges() if transpose else layout.visible_key_ranges()
    tiles: List[Tuple[int, int, int, int]] = []
    ranges: List[Tuple[int, int]] = []
    range_index: Dict[Tuple[Tuple[int, int], ...], int] = {}
    for (start, end), seg_ranges in zip(layout.segments, per_segment):
        if seg_ranges not in range_index:  # segments with the same ranges share entries
            range_index[seg_ranges] = len(ranges)
            ranges.extend(seg_ranges)
        first = range_index[seg_ranges]
        for tile_start in range(start, end, tile):
            tiles.append((tile_start, min(tile_start + tile, end), first, first + len(seg_ranges)))
    return (torch.tensor(tiles, dtype=torch.int32, device=device),
            torch.tensor(ranges, dtype=torch.int32, device=device))


# ------------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------------
def _check_device(q: Tensor) -> None:
    if q.device.type != "cuda" and not INTERPRETED:
        raise ValueError(
            f"the Triton kernel needs CUDA tensors, got {q.device} (set TRITON_INTERPRET=1 "
            "before importing triton to run it on CPU tensors)")


def _check_output(name: str, t: Tensor, shape, dtype, device) -> None:
    """A caller-given output buffer must match exactly: the kernels write through its strides
    (lse and the gradients' last dimension must be dense)."""
    if t.shape != shape or t.dtype != dtype or t.device != device or t.stride(-1) != 1:
        raise ValueError(
            f"{name} must be a {dtype} tensor of shape {tuple(shape)} on {device} with a unit "
            f"last stride, got {t.dtype} {tuple(t.shape)} on {t.device} strides {t.stride()}")
    if name == "lse" and not t.is_contiguous():
        raise ValueError("lse must be contiguous: the kernels index it as (B*H, L)")


def _strides(t: Tensor):
    return t.stride(0), t.stride(1), t.stride(2)


def _dense_last_dim(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _precision(dtype):
    # float32 inputs are computed in full precision (no TF32), like the reference
    return "ieee" if dtype == torch.float32 else "tf32"


def forward(q: Tensor, k: Tensor, v: Tensor, layout: QueryLayout, scale: Optional[float] = None,
            dropout_p: float = 0.0, seed: int = 0, out: Optional[Tensor] = None,
            lse: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """q, k, v `(B, H, L, D)` -> out `(B, H, L, D)` (q's dtype), lse `(B, H, L)` float32, the
    natural-log log-sum-exp of each row's scaled, visible scores (what `backward` needs).

    `out` (any strides with a unit last dimension) and `lse` (contiguous) may be given: tests pass
    views into sentinel-filled buffers to catch stray writes. q, k, v are taken as
    `group_detr.kernels.check_inputs` and `check_supported` let them through (the caller, the
    custom op of group_detr.attention, checks them once); only the buffers are checked here.
    """
    _check_device(q)
    batch, heads, length, head_dim = q.shape
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    q, k, v = (_dense_last_dim(t) for t in (q, k, v))
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    _check_output("out", out, q.shape, q.dtype, q.device)
    if lse is None:
        lse = torch.empty((batch, heads, length), dtype=torch.float32, device=q.device)
    _check_output("lse", lse, q.shape[:3], torch.float32, q.device)
    tiles, ranges = schedule(layout, TILE, False, q.device)
    args = (q, k, v, out, lse, tiles, ranges, *_strides(q), *_strides(k), *_strides(v),
            *_strides(out), heads, length, scale * LOG2E, float(dropout_p), int(seed))
    constants = dict(HEAD_DIM=head_dim, TILE_M=TILE, HAS_DROPOUT=dropout_p > 0.0,
                     DOT_FP32=INTERPRETED, PRECISION=_precision(q.dtype))
    _launch("fwd", (tiles.shape[0], batch * heads), args, constants, q.device)
    return out, lse


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
             layout: QueryLayout, scale: Optional[float] = None, dropout_p: float = 0.0,
             seed: int = 0, grad_q: Optional[Tensor] = None, grad_k: Optional[Tensor] = None,
             grad_v: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of `forward` (same layout, scale, dropout_p and seed): dQ, dK, dV, each
    `(B, H, L, D)` in q's dtype. grad_out and out `(B, H, L, D)`, lse `(B, H, L)` from `forward`.
    `grad_q` / `grad_k` / `grad_v` may be given, as `out` in `forward`."""
    _check_device(q)
    for name, t, shape in (("grad_out", grad_out, q.shape), ("out", out, q.shape),
                           ("lse", lse, q.shape[:3])):
        if t.shape != shape or t.device != q.device:
            raise ValueError(f"{name} must have shape {tuple(shape)} on {q.device}, got "
                             f"{tuple(t.shape)} on {t.device}")
    if grad_out.dtype != q.dtype or out.dtype != q.dtype:
        raise TypeError(f"grad_out and out must have q's dtype {q.dtype}, got {grad_out.dtype} "
                        f"and {out.dtype}")
    batch, heads, length, head_dim = q.shape
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    q, k, v, out, grad_out = (_dense_last_dim(t) for t in (q, k, v, out, grad_out))
    lse = lse.float().contiguous()
    grads = []
    for name, given, like in (("grad_q", grad_q, q), ("grad_k", grad_k, k), ("grad_v", grad_v, v)):
        if given is None:
            given = torch.empty_like(like, memory_format=torch.contiguous_format)
        _check_output(name, given, q.shape, q.dtype, q.device)
        grads.append(given)
    grad_q, grad_k, grad_v = grads

    delta = torch.empty((batch, heads, length), dtype=torch.float32, device=q.device)
    _launch("preprocess", (triton.cdiv(length, TILE), batch * heads),
            (out, grad_out, delta, *_strides(out), *_strides(grad_out), heads, length),
            dict(HEAD_DIM=head_dim, BLOCK_M=TILE), q.device)

    common = dict(HEAD_DIM=head_dim, HAS_DROPOUT=dropout_p > 0.0, DOT_FP32=INTERPRETED,
                  PRECISION=_precision(q.dtype))
    options = (heads, length, scale, scale * LOG2E, float(dropout_p), int(seed))
    tiles, ranges = schedule(layout, TILE, True, q.device)
    _launch("dkdv", (tiles.shape[0], batch * heads),
            (q, k, v, grad_out, lse, delta, grad_k, grad_v, tiles, ranges,
             *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out),
             *_strides(grad_k), *_strides(grad_v), *options),
            dict(common, TILE_N=TILE), q.device)
    tiles, ranges = schedule(layout, TILE, False, q.device)
    _launch("dq", (tiles.shape[0], batch * heads),
            (q, k, v, grad_out, lse, delta, grad_q, tiles, ranges,
             *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(grad_q),
             *options),
            dict(common, TILE_M=TILE), q.device)
    return grad_q, grad_k, grad_v


def dropout_keep_mask(batch: int, heads: int, length: int, dropout_p: float, seed: int,
                      device) -> Tensor:
    """bool `(B, H, L, L)`: the keep-mask the kernels apply for this seed (for tests)."""
    keep = torch.empty((batch, heads, length, length), dtype=torch.int8, device=device)
    block = 32
    grid = (triton.cdiv(length, block), triton.cdiv(length, block), batch * heads)
    _dropout_mask_kernel[grid](keep, heads, length, float(dropout_p), int(seed), BLOCK=block)
    return keep.bool()
