"""The Triton grouped-attention kernels (group_detr.kernels.grouped_attention).

Without CUDA the kernels run on CPU tensors under the Triton interpreter: TRITON_INTERPRET=1 must
be set before triton is first imported in the process (triton's own jit helpers are built at
import), so this module sets it before importing anything that imports triton. The interpreter
never faults on an out-of-bounds access, so inputs and outputs live inside NaN-filled buffers:
a stray read turns an output NaN, a stray write leaves a finite value in the sentinel region.
Shapes are small and group lengths deliberately not multiples of the tile (64) or of the inner
block (32). With CUDA the same tests run the compiled kernels, plus the GPU-only tests at the end.
"""
import os
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
# the interpreter can only be switched on before triton's first import in this process
CAN_INTERPRET = "triton" not in sys.modules or os.environ.get("TRITON_INTERPRET") == "1"
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")
from group_detr.kernels import grouped_attention as kernels  # noqa: E402  (after the env var)

if not CUDA and not (CAN_INTERPRET and kernels.INTERPRETED):
    pytest.skip("no CUDA, and triton was imported before TRITON_INTERPRET=1 could be set: run "
                "this module in its own process or export TRITON_INTERPRET=1",
                allow_module_level=True)

from conftest import requires_cuda  # noqa: E402
from group_detr import attention  # noqa: E402
from group_detr import kernels as contract  # noqa: E402
from group_detr.attention import grouped_attention, masked_attention  # noqa: E402
from group_detr.layout import QueryLayout  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
PAD = 5  # sentinel rows / columns around every tensor the kernels read or write

EQUAL = QueryLayout(num_groups=2, queries_per_group=37)
TAILS = QueryLayout(num_groups=2, queries_per_group=70)  # a full tile plus a tail per group
ONE_GROUP = QueryLayout(num_groups=1, queries_per_group=70)
DINO = QueryLayout(num_groups=2, queries_per_group=37, num_denoising=12, denoising_groups=3)
DN_FIRST = QueryLayout(2, 37, 12, 3, denoising_sees="first")
DN_NONE = QueryLayout(2, 37, 12, 3, denoising_sees="none")
DN_LONG = QueryLayout(2, 37, 140, 2)  # denoising groups of 70: longer than a tile
LAYOUTS = [EQUAL, TAILS, ONE_GROUP, DINO, DN_FIRST, DN_NONE, DN_LONG]


def layout_id(layout):
    return (f"K{layout.num_groups}xN{layout.queries_per_group}"
            f"-dn{layout.num_denoising}x{layout.denoising_groups}-{layout.denoising_sees}")


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def in_sentinel(shape, dtype=torch.float32, fill=None):
    """A view of `shape` inside a NaN-filled buffer padded by PAD along every dimension after the
    first (so strides are not the dense ones), and the buffer. `fill` is copied into the view."""
    padded = (shape[0],) + tuple(n + 2 * PAD for n in shape[1:])
    buffer = torch.full(padded, float("nan"), dtype=dtype, device=DEVICE)
    view = buffer[(slice(None),) + (slice(PAD, -PAD),) * (len(shape) - 1)]
    if fill is not None:
        view.copy_(fill)
    return view, buffer


def sentinel_intact(view, buffer):
    """True when every element of `buffer` outside `view` is still NaN (no stray write)."""
    outside = torch.ones_like(buffer, dtype=torch.bool)
    outside[(slice(None),) + (slice(PAD, -PAD),) * (buffer.dim() - 1)] = False
    return bool(buffer[outside].isnan().all())


def random_qkv(layout, batch=1, heads=2, head_dim=32, dtype=torch.float32, seed=0):
    """q, k, v `(B, H, L, D)` as views inside NaN sentinel buffers."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, heads, layout.total_queries, head_dim)
    return [in_sentinel(shape, dtype, torch.randn(shape, generator=generator))[0]
            for _ in range(3)]


def kernel_forward_backward(q, k, v, grad_out, layout, **options):
    """Kernel out, lse, dQ, dK, dV, all written into sentinel buffers that must stay intact."""
    out, out_buf = in_sentinel(q.shape, q.dtype)
    lse_buf = torch.full((q.numel() // q.shape[-1] + 2 * PAD,), float("nan"), device=DEVICE)
    lse = lse_buf[PAD:-PAD].view(q.shape[:3])
    kernels.forward(q, k, v, layout, out=out, lse=lse, **options)
    grads = [in_sentinel(q.shape, q.dtype) for _ in range(3)]
    kernels.backward(grad_out, q, k, v, out, lse, layout, grad_q=grads[0][0],
                     grad_k=grads[1][0], grad_v=grads[2][0], **options)
    for view, buffer in [(out, out_buf)] + grads:
        assert sentinel_intact(view, buffer), "a kernel wrote outside its output"
    assert lse_buf[:PAD].isnan().all() and lse_buf[-PAD:].isnan().all(), "stray lse write"
    return (out, lse) + tuple(view for view, _ in grads)


def reference(q, k, v, grad_out, layout, scale=None, keep=None, dropout_p=0.0):
    """Masked reference in float64: out, lse, dQ, dK, dV. `keep` `(B, H, L, L)` applies a given
    dropout keep-mask (the kernel's own), scaled by 1 / (1 - dropout_p)."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = q @ k.transpose(-2, -1) * scale
    scores = scores.masked_fill(~layout.dense_mask(q.device), float("-inf"))
    lse = torch.logsumexp(scores, -1)
    probs = torch.softmax(scores, -1)
    if keep is not None:
        probs = probs * keep / (1 - dropout_p)
    out = probs @ v
    grads = torch.autograd.grad(out, (q, k, v), grad_out.double())
    return (out.detach(), lse.detach()) + grads


TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.float16: dict(atol=4e-3, rtol=4e-3),
             torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def assert_matches(actual, expected, dtype):
    names = ("out", "lse", "dQ", "dK", "dV")
    for name, a, e in zip(names, actual, expected):
        tolerance = TOLERANCE[torch.float32 if name == "lse" else dtype]
        torch.testing.assert_close(a.double(), e, **tolerance, msg=lambda m, name=name: f"{name}: {m}")


# ------------------------------------------------------------------------------------------------
# the schedule
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
@pytest.mark.parametrize("transpose", [False, True])
def test_schedule_covers_exactly_the_visible_pairs(layout, transpose):
    """Tiles x ranges painted into an (L, L) grid give the dense mask (its transpose for the
    dK/dV schedule): the kernels visit every visible pair and no other."""
    tiles, ranges = kernels.schedule(layout, kernels.TILE, transpose, torch.device("cpu"))
    seen = torch.zeros(layout.total_queries, layout.total_queries, dtype=torch.int32)
    for start, end, first, last in tiles.tolist():
        assert 0 < end - start <= kernels.TILE
        assert any(s <= start and end <= e for s, e in layout.segments), "tile straddles groups"
        for other_start, other_end in ranges[first:last].tolist():
            seen[start:end, other_start:other_end] += 1
    mask = layout.dense_mask()
    assert torch.equal(seen, (mask.T if transpose else mask).int())


def test_schedule_work_is_one_kth_for_equal_groups():
    layout = QueryLayout(num_groups=11, queries_per_group=300)
    tiles, ranges = kernels.schedule(layout, kernels.TILE, False, torch.device("cpu"))
    visited = sum((end - start) * sum(e - s for s, e in ranges[first:last].tolist())
                  for start, end, first, last in tiles.tolist())
    assert visited == layout.total_queries ** 2 // layout.num_groups


# ------------------------------------------------------------------------------------------------
# forward and backward against the masked reference
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_matches_masked_reference(layout):
    q, k, v = random_qkv(layout)
    grad_out = torch.randn(q.shape, device=DEVICE)
    actual = kernel_forward_backward(q, k, v, grad_out, layout)
    assert_matches(actual, reference(q, k, v, grad_out, layout), torch.float32)


@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_head_dims(head_dim):
    layout = DINO
    q, k, v = random_qkv(layout, heads=1, head_dim=head_dim, seed=1)
    grad_out = torch.randn(q.shape, device=DEVICE)
    actual = kernel_forward_backward(q, k, v, grad_out, layout, scale=0.1)
    assert_matches(actual, reference(q, k, v, grad_out, layout, scale=0.1), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    """Half inputs and outputs; the interpreter computes its dots in float32."""
    layout = DINO
    q, k, v = random_qkv(layout, dtype=dtype, seed=2)
    grad_out = torch.randn(q.shape, device=DEVICE).to(dtype)
    actual = kernel_forward_backward(q, k, v, grad_out, layout)
    assert actual[0].dtype == dtype and actual[1].dtype == torch.float32
    assert_matches(actual, reference(q, k, v, grad_out, layout), dtype)


def test_batches_heads_and_any_strides():
    """(L, B, H, D) storage permuted to (B, H, L, D), as GroupedSelfAttention produces, and a
    non-unit last stride (copied to a dense layout by the launcher)."""
    layout = EQUAL
    shape = (layout.total_queries, 2, 3, 32)
    q, k, v = (torch.randn(shape, device=DEVICE).permute(1, 2, 0, 3) for _ in range(3))
    k = k.transpose(-2, -1).contiguous().transpose(-2, -1)  # last stride L
    grad_out = torch.randn(q.shape, device=DEVICE)
    out, lse = kernels.forward(q, k, v, layout)
    grads = kernels.backward(grad_out, q, k, v, out, lse, layout)
    assert_matches((out, lse) + grads, reference(q, k, v, grad_out, layout), torch.float32)


def test_custom_op_runs_the_kernels_with_autograd(monkeypatch):
    """grouped_attention(backend="triton") through the registered custom op and its autograd
    formula, with the op sent to the kernels on this device (on CPU: interpreted). The reference
    math raises, so a kernel failure cannot pass for the fallback."""
    def no_reference(*args, **kwargs):
        raise AssertionError("the op ran the reference math, not the kernels")

    monkeypatch.setattr(attention, "_runs_kernels", lambda q: True)
    monkeypatch.setattr(attention, "reference_forward", no_reference)
    monkeypatch.setattr(attention, "reference_backward", no_reference)
    layout = DINO
    q, k, v = (t.detach().requires_grad_() for t in random_qkv(layout, batch=2, seed=3))
    out = grouped_attention(q, k, v, layout, scale=0.2, backend="triton")
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    expected = reference(q, k, v, grad_out, layout, scale=0.2)
    assert_matches((out, expected[1]) + grads, expected, torch.float32)


# ------------------------------------------------------------------------------------------------
# no leak across groups
# ------------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning",  # the poisoned rows
                            "ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("layout", [QueryLayout(3, 37), DINO, DN_FIRST, DN_NONE], ids=layout_id)
def test_groups_do_not_leak(layout):
    """For every key segment j: NaN in j's keys and values leaves every query that may not see j
    bit-identical (so the kernel never even loads them), and only those queries; a gradient
    flowing into segment i's outputs reaches only i's queries and the keys i sees."""
    q, k, v = random_qkv(layout, seed=4)
    out, lse = kernels.forward(q, k, v, layout)
    mask = layout.dense_mask(DEVICE)
    for start, end in layout.segments:
        k2, v2 = k.clone(), v.clone()
        k2[:, :, start:end] = float("nan")
        v2[:, :, start:end] = float("nan")
        out2, _ = kernels.forward(q, k2, v2, layout)
        blind = ~mask[:, start]  # queries that may not see segment j
        assert torch.equal(out2[:, :, blind], out[:, :, blind])
        assert out2[:, :, ~blind].isnan().all()

    for start, end in layout.segments:
        grad_out = torch.zeros_like(out)
        grad_out[:, :, start:end] = torch.randn_like(grad_out[:, :, start:end])
        grad_q, grad_k, grad_v = kernels.backward(grad_out, q, k, v, out, lse, layout)
        rows = torch.zeros(layout.total_queries, dtype=torch.bool, device=DEVICE)
        rows[start:end] = True
        seen = mask[start]  # keys segment i sees
        # exactly zero where nothing may flow, and a gradient for every query and key that may
        assert (grad_q[:, :, ~rows] == 0).all() and (grad_q[:, :, rows] != 0).any(-1).all()
        for grad in (grad_k, grad_v):
            assert (grad[:, :, ~seen] == 0).all() and (grad[:, :, seen] != 0).any(-1).all()


# ------------------------------------------------------------------------------------------------
# dropout
# ------------------------------------------------------------------------------------------------
def test_dropout_is_a_function_of_the_seed():
    layout = DINO
    q, k, v = random_qkv(layout, seed=5)
    out1, _ = kernels.forward(q, k, v, layout, dropout_p=0.3, seed=11)
    out2, _ = kernels.forward(q, k, v, layout, dropout_p=0.3, seed=11)
    out3, _ = kernels.forward(q, k, v, layout, dropout_p=0.3, seed=12)
    assert torch.equal(out1, out2) and not torch.allclose(out1, out3)
    keep = kernels.dropout_keep_mask(2, 2, layout.total_queries, 0.3, 11, DEVICE)
    assert torch.equal(keep, kernels.dropout_keep_mask(2, 2, layout.total_queries, 0.3, 11,
                                                       DEVICE))
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])


@pytest.mark.parametrize("dropout_p", [0.1, 0.5])
def test_dropout_keep_rate(dropout_p):
    keep = kernels.dropout_keep_mask(4, 4, 100, dropout_p, seed=7, device=DEVICE)
    # 160k draws: the standard deviation of the rate is at most 0.00125
    assert abs(keep.float().mean().item() - (1 - dropout_p)) < 0.006
    # rows and columns are not correlated: per-row rates spread like a binomial
    assert keep.float().mean(-1).std().item() < 3 * ((1 - dropout_p) * dropout_p / 100) ** 0.5


@pytest.mark.parametrize("layout", [TAILS, DINO], ids=layout_id)
def test_dropout_forward_and_backward_match_reference_with_the_kernel_mask(layout):
    """Forward with dropout equals the reference applying the kernel's own keep-mask, and the
    backward (which regenerates the mask) equals autograd through that reference."""
    dropout_p, seed = 0.25, 1234
    q, k, v = random_qkv(layout, batch=2, seed=6)
    grad_out = torch.randn(q.shape, device=DEVICE)
    actual = kernel_forward_backward(q, k, v, grad_out, layout, dropout_p=dropout_p, seed=seed)
    keep = kernels.dropout_keep_mask(*q.shape[:3], dropout_p, seed, DEVICE)
    assert 0 < keep.float().mean() < 1
    expected = reference(q, k, v, grad_out, layout, keep=keep, dropout_p=dropout_p)
    assert_matches(actual, expected, torch.float32)


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
def test_unsupported_inputs_and_bad_buffers():
    """What the kernels take beyond the checks every backend makes (group_detr.kernels, tested
    through grouped_attention in test_attention.py), and the launchers' own output buffers."""
    layout = EQUAL
    q, k, v = (torch.randn(1, 2, layout.total_queries, 32, device=DEVICE) for _ in range(3))
    q48 = torch.randn(1, 2, layout.total_queries, 48, device=DEVICE)
    with pytest.raises(ValueError, match=r"supports head_dim in \(16, 32, 64, 128\), got 48"):
        contract.check_supported(q48)
    with pytest.raises(TypeError, match="supports dtypes .* got torch.float64"):
        contract.check_supported(q.double())
    if not CUDA:
        with pytest.raises(ValueError, match="needs CUDA tensors, got cpu"):
            contract.check_supported(q)
    with pytest.raises(ValueError, match=r"out must be a torch.float32 tensor of shape"):
        kernels.forward(q, k, v, layout, out=torch.empty_like(q)[:, :1])
    with pytest.raises(ValueError, match="lse must be contiguous"):
        kernels.forward(q, k, v, layout, lse=torch.empty(1, 2, 80, device=DEVICE)[..., :74])

    out, lse = kernels.forward(q, k, v, layout)
    with pytest.raises(ValueError, match=r"grad_out must have shape \(1, 2, 74, 32\)"):
        kernels.backward(out[:, :, :-1], q, k, v, out, lse, layout)
    with pytest.raises(TypeError, match="grad_out and out must have q's dtype"):
        kernels.backward(out.half(), q, k, v, out, lse, layout)
    with pytest.raises(ValueError, match=r"lse must have shape \(1, 2, 74\)"):
        kernels.backward(out, q, k, v, out, lse[..., :-1], layout)


@pytest.mark.skipif(CUDA, reason="checks the CPU message of a build without the interpreter")
def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(kernels, "INTERPRETED", False)
    q = torch.randn(1, 1, EQUAL.total_queries, 32)
    with pytest.raises(ValueError, match="needs CUDA tensors, got cpu"):
        kernels.forward(q, q, q, EQUAL)


# ------------------------------------------------------------------------------------------------
# GPU only: compiled kernels, half precision at size, the op and torch.compile
# ------------------------------------------------------------------------------------------------
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", [QueryLayout(11, 300), QueryLayout(11, 300, 200, 10),
                                    QueryLayout(3, 150, 60, 3, "first")], ids=layout_id)
def test_cuda_half_precision_at_size(dtype, layout):
    q, k, v = (torch.randn(2, 8, layout.total_queries, 64, device="cuda", dtype=dtype)
               for _ in range(3))
    grad_out = torch.randn_like(q)
    actual = kernel_forward_backward(q, k, v, grad_out, layout)
    expected = reference(q, k, v, grad_out, layout)
    loose = {torch.float16: dict(atol=1e-2, rtol=1e-2), torch.bfloat16: dict(atol=6e-2, rtol=5e-2)}
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.double(), e, **loose[dtype])


@requires_cuda
def test_cuda_op_and_compile_match_masked_path():
    layout = QueryLayout(11, 300, 200, 10)
    q, k, v = (torch.randn(2, 8, layout.total_queries, 32, device="cuda", requires_grad=True)
               for _ in range(3))
    grad_out = torch.randn_like(q)
    expected = masked_attention(q, k, v, layout)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad_out)
    compiled = torch.compile(lambda q, k, v: grouped_attention(q, k, v, layout, backend="triton"),
                             fullgraph=True)
    for fn in (lambda q, k, v: grouped_attention(q, k, v, layout), compiled):
        out = fn(q, k, v)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
        for a, e in zip(grads, expected_grads):
            torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)


@requires_cuda
@pytest.mark.parametrize("layout", [QueryLayout(11, 300), QueryLayout(11, 300, 200, 10)],
                         ids=layout_id)
def test_cuda_flex_matches_masked_path_values_and_gradients(layout):
    """FlexAttention with the layout's block mask, forward and backward, against the masked
    path (the CPU has no FlexAttention backward in torch 2.13: this is where its gradients are
    tested)."""
    q, k, v = (torch.randn(2, 8, layout.total_queries, 32, device="cuda", requires_grad=True)
               for _ in range(3))
    grad_out = torch.randn_like(q)
    expected = masked_attention(q, k, v, layout)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad_out)
    out = grouped_attention(q, k, v, layout, backend="flex")
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    for a, e in zip(grads, expected_grads):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)
