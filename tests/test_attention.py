"""grouped_attention reference paths, the custom op (its CPU implementation), dispatch, input
validation and GroupedSelfAttention as a drop-in for nn.MultiheadAttention. CPU only; the Triton
kernels are tested in test_attention_kernels.py."""
import math
import warnings

import pytest
import torch
from torch import nn

import group_detr
from group_detr import attention, kernels
from group_detr.attention import (
    GroupedSelfAttention, dropout_keep_mask_reference, grouped_attention,
    masked_attention, reference_backward, reference_forward, select_backend)
from group_detr.layout import QueryLayout

EQUAL = QueryLayout(num_groups=3, queries_per_group=37)
DENOISING = QueryLayout(num_groups=2, queries_per_group=37, num_denoising=12, denoising_groups=3)
LAYOUTS = [EQUAL, DENOISING, QueryLayout(1, 37),
           QueryLayout(2, 37, 12, 3, denoising_sees="first"),
           QueryLayout(2, 37, 12, 3, denoising_sees="none")]


def qkv(layout, batch=2, heads=3, head_dim=16, dtype=torch.float64, seed=0, grad=False):
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, heads, layout.total_queries, head_dim)
    return [torch.randn(shape, generator=generator, dtype=dtype).requires_grad_(grad)
            for _ in range(3)]


def naive_attention(q, k, v, layout, scale=None):
    """Per-row softmax over exactly the visible keys, written from the definition."""
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    mask = layout.dense_mask()
    out = torch.empty_like(q)
    for i in range(q.shape[2]):
        keys = mask[i].nonzero().flatten()
        weights = torch.softmax(q[:, :, i:i + 1] @ k[:, :, keys].transpose(-2, -1) * scale, -1)
        out[:, :, i] = (weights @ v[:, :, keys]).squeeze(2)
    return out


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("backend", ["masked", "folded", "triton", "auto"])
def test_backends_match_the_definition(layout, backend):
    # inputs that need a gradient keep "auto" off flex, which compiles (tested below)
    q, k, v = qkv(layout, grad=backend == "auto")
    if backend == "folded" and not layout.is_equal_groups:
        with pytest.raises(ValueError, match="'folded' backend needs equal groups"):
            grouped_attention(q, k, v, layout, backend=backend)
        return
    expected = naive_attention(q, k, v, layout, scale=0.3)
    torch.testing.assert_close(grouped_attention(q, k, v, layout, scale=0.3, backend=backend),
                               expected)


@pytest.mark.parametrize("layout", [EQUAL, DENOISING], ids=str)
def test_op_backward_matches_autograd_of_the_masked_path(layout):
    q, k, v = qkv(layout, grad=True)
    grad_out = torch.randn_like(q)
    expected = torch.autograd.grad(masked_attention(q, k, v, layout), (q, k, v), grad_out)
    actual = torch.autograd.grad(grouped_attention(q, k, v, layout, backend="triton"),
                                 (q, k, v), grad_out)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("backend", ["masked", "folded", "triton"])
def test_groups_do_not_leak(backend):
    """Perturbing group g's keys and values changes no output outside group g, and no gradient
    flows from group g's outputs to another group's inputs."""
    layout = QueryLayout(num_groups=3, queries_per_group=37)
    q, k, v = qkv(layout, grad=True)
    out = grouped_attention(q, k, v, layout, backend=backend)
    start, end = layout.segments[1]
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[:, :, start:end] += 5 * torch.randn_like(k2[:, :, start:end])
    v2[:, :, start:end] += 5 * torch.randn_like(v2[:, :, start:end])
    out2 = grouped_attention(q, k2, v2, layout, backend=backend)
    outside = torch.ones(layout.total_queries, dtype=torch.bool)
    outside[start:end] = False
    assert torch.equal(out[:, :, outside], out2[:, :, outside])
    assert not torch.allclose(out[:, :, start:end], out2[:, :, start:end])
    grads = torch.autograd.grad(out[:, :, start:end].sum(), (q, k, v))
    for grad in grads:
        assert grad[:, :, outside].abs().max() == 0
        assert grad[:, :, start:end].abs().max() > 0


def test_denoising_queries_do_not_leak_into_matching_queries():
    layout = DENOISING
    q, k, v = qkv(layout)
    out = grouped_attention(q, k, v, layout, backend="triton")
    k2, v2 = k.clone(), v.clone()
    k2[:, :, :layout.num_denoising] = torch.randn_like(k2[:, :, :layout.num_denoising])
    v2[:, :, :layout.num_denoising] = torch.randn_like(v2[:, :, :layout.num_denoising])
    out2 = grouped_attention(q, k2, v2, layout, backend="triton")
    matching = slice(layout.num_denoising, None)
    assert torch.equal(out[:, :, matching], out2[:, :, matching])


def test_auto_picks_by_measurement_on_cpu():
    """The CPU rules of select_backend: folded for equal groups; with a denoising prefix flex
    when neither a gradient nor dropout is needed, masked otherwise."""
    q = torch.empty(1, 1, EQUAL.total_queries, 16)
    q_dn = torch.empty(1, 1, DENOISING.total_queries, 16)
    assert select_backend(q, EQUAL) == "folded"
    assert select_backend(q.requires_grad_(), EQUAL) == "folded"
    assert select_backend(q_dn, DENOISING) == "flex"
    assert select_backend(q_dn, DENOISING, needs_grad=True) == "masked"
    assert select_backend(q_dn, DENOISING, dropout_p=0.1) == "masked"
    assert select_backend(q_dn.requires_grad_(), DENOISING) == "masked"
    with torch.no_grad():
        assert select_backend(q_dn, DENOISING) == "flex"
    assert select_backend(q, EQUAL, "masked") == "masked"
    with pytest.raises(ValueError, match="backend must be one of"):
        select_backend(q, EQUAL, "flash")


def test_auto_falls_back_to_masked_where_flex_does_not_compile(monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("InductorError: no C++ compiler (simulated)\nmore lines")

    monkeypatch.setattr(attention, "_flex_failure", None)
    monkeypatch.setattr(attention, "flex_attention", no_compiler)
    layout = DENOISING
    q, k, v = qkv(layout, dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match="FlexAttention does not compile here .*no C\\+\\+ "
                                            "compiler .*using 'masked'"):
        out = grouped_attention(q, k, v, layout)
    torch.testing.assert_close(out, masked_attention(q, k, v, layout))
    assert select_backend(q, layout) == "masked"
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):  # asked for by name: raises
        grouped_attention(q, k, v, layout, backend="flex")


def test_kernel_failure_falls_back_to_the_reference_with_one_warning(monkeypatch):
    """A Triton kernel that fails to compile or launch on the user's GPU (simulated: the inputs
    pass for kernel-ready and the launcher raises) does not end the run: one RuntimeWarning, the
    reference answers (values and gradients), "auto" stops picking "triton", and backends()
    says the kernel is off."""
    calls = []

    class BrokenLaunchers:
        @staticmethod
        def forward(*args, **kwargs):
            calls.append("forward")
            raise RuntimeError("PTXASError: ptxas fatal: out of resources (simulated)")

    monkeypatch.setattr(kernels, "_failure", None)
    monkeypatch.setattr(kernels, "unsupported", lambda q: None)  # as if q were a CUDA tensor
    monkeypatch.setattr(attention, "_triton_kernels", lambda: BrokenLaunchers)
    layout = DENOISING
    q, k, v = qkv(layout, dtype=torch.float32, grad=True)
    assert select_backend(q, layout) == "triton"
    with pytest.warns(RuntimeWarning, match="kernel failed on this machine .*PTXASError.* falls "
                                            "back to the reference"):
        out = grouped_attention(q, k, v, layout, backend="triton")
    assert calls == ["forward"] and "PTXASError" in kernels.failure()
    q2, k2, v2 = (t.detach().requires_grad_() for t in (q, k, v))
    torch.testing.assert_close(out, masked_attention(q2, k2, v2, layout))
    grad_out = torch.randn_like(out)
    for a, e in zip(torch.autograd.grad(out, (q, k, v), grad_out),
                    torch.autograd.grad(masked_attention(q2, k2, v2, layout), (q2, k2, v2),
                                        grad_out)):
        torch.testing.assert_close(a, e)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, no second attempt
        grouped_attention(q, k, v, layout, backend="triton")
    assert calls == ["forward"]
    assert select_backend(q, layout) == "masked"
    assert group_detr.backends()["triton_cuda"] is False


def test_op_gradcheck_float64_with_dropout():
    layout = QueryLayout(2, 5, num_denoising=4, denoising_groups=2)
    q, k, v = qkv(layout, batch=1, heads=2, head_dim=4, grad=True)
    seed = torch.tensor(1234)
    op = torch.ops.group_detr.grouped_attention_fwd

    def attention(q, k, v):  # a fixed seed, so every evaluation drops the same entries
        return op(q, k, v, seed, 2, 5, 4, 2, "all", 0.25, 0.7)[0]

    assert torch.autograd.gradcheck(attention, (q, k, v))


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_opcheck(dropout_p):
    layout = DENOISING
    q, k, v = qkv(layout, dtype=torch.float32, grad=True)
    seed = torch.tensor(7)
    torch.library.opcheck(torch.ops.group_detr.grouped_attention_fwd.default,
                          (q, k, v, seed, 2, 37, 12, 3, "all", dropout_p, 0.25))
    out, lse = torch.ops.group_detr.grouped_attention_fwd(
        q, k, v, seed, 2, 37, 12, 3, "all", dropout_p, 0.25)
    torch.library.opcheck(
        torch.ops.group_detr.grouped_attention_bwd.default,
        (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), seed,
         2, 37, 12, 3, "all", dropout_p, 0.25))


def test_compile_fullgraph_forward_and_backward():
    """One graph through the custom op, its fake and its autograd formula. aot_eager traces
    exactly what inductor would get (the op is opaque to inductor) without inductor's C++
    compile, which took 17 s of this test with a cold cache; inductor with the Triton kernel is
    tested on CUDA in test_attention_kernels.py."""
    layout = DENOISING
    q, k, v = qkv(layout, dtype=torch.float32, grad=True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def attention(q, k, v):
        return grouped_attention(q, k, v, layout, backend="triton")

    out = attention(q, k, v)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    q2, k2, v2 = (t.detach().requires_grad_() for t in (q, k, v))
    expected = masked_attention(q2, k2, v2, layout)
    expected_grads = torch.autograd.grad(expected.square().sum(), (q2, k2, v2))
    torch.testing.assert_close(out, expected)
    for a, e in zip(grads, expected_grads):
        torch.testing.assert_close(a, e)


def test_reference_dropout_is_a_function_of_the_seed():
    layout = EQUAL
    q, k, v = qkv(layout)
    out1, _ = reference_forward(q, k, v, layout, 0.3, 0.25, seed=11)
    out2, _ = reference_forward(q, k, v, layout, 0.3, 0.25, seed=11)
    out3, _ = reference_forward(q, k, v, layout, 0.3, 0.25, seed=12)
    assert torch.equal(out1, out2) and not torch.allclose(out1, out3)
    keep = dropout_keep_mask_reference((4, 3, 100, 100), 0.3, seed=5, device="cpu")
    assert abs(keep.float().mean().item() - 0.7) < 0.01  # 120k draws: std 0.0013
    # backward regenerates the forward's mask: gradients match autograd through forward
    q, k, v = qkv(layout, grad=True)
    out, lse = reference_forward(q, k, v, layout, 0.3, 0.25, seed=11)
    grad_out = torch.randn_like(out)
    expected = torch.autograd.grad(out, (q, k, v), grad_out)
    actual = reference_backward(grad_out, q, k, v, lse.detach(), layout, 0.3, 0.25, seed=11)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e)


def test_grouped_attention_dropout_in_expectation():
    """Inverted dropout keeps the expected output: averaging many dropped outputs approaches
    the output without dropout."""
    layout = QueryLayout(2, 5)
    q, k, v = qkv(layout, batch=1, heads=1, head_dim=4)
    torch.manual_seed(0)
    # 2000 draws in one call: every batch entry gets its own dropout mask
    runs = grouped_attention(*(t.expand(2000, -1, -1, -1) for t in (q, k, v)), layout,
                             dropout_p=0.5, backend="triton")
    assert not torch.equal(runs[0], runs[1])
    torch.testing.assert_close(runs.mean(0), grouped_attention(q, k, v, layout)[0],
                               atol=0.08, rtol=0)


# ------------------------------------------------------------------------------------------------
# FlexAttention ("flex")
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compiled_flex():
    """Skip where this torch cannot compile FlexAttention (no C++ compiler for inductor's CPU
    template, or a torch without it); the first compile takes 30-80 s on the 2-core CPU."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    layout = QueryLayout(2, 5)
    q = torch.randn(1, 1, layout.total_queries, 16)
    try:
        attention.flex_attention(q, q, q, layout)
    except Exception as exc:  # noqa: BLE001  (whatever the compiler stack raises)
        pytest.skip(f"torch.compile cannot compile FlexAttention here: {type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}")


@pytest.mark.slow
@pytest.mark.parametrize("layout", [EQUAL, DENOISING,
                                    QueryLayout(2, 37, 12, 3, denoising_sees="first")], ids=str)
def test_flex_matches_the_definition(compiled_flex, layout):
    """Compiled FlexAttention with the layout's block mask equals the per-row definition (values;
    its gradients on the CPU do not exist in torch 2.13, see below, and are tested on CUDA)."""
    q, k, v = qkv(layout, dtype=torch.float32, grad=True)
    with torch.no_grad():
        out = grouped_attention(q, k, v, layout, scale=0.3, backend="flex")
        auto = grouped_attention(q, k, v, layout, scale=0.3)  # flex for a denoising prefix
    expected = naive_attention(*(t.detach().double() for t in (q, k, v)), layout, scale=0.3)
    torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(auto.double(), expected, atol=2e-6, rtol=1e-5)


def test_flex_block_mask_is_the_layout_cached_and_sparse():
    """The block mask's mask_mod is the layout's dense mask, it is built once per (layout,
    device), and for K equal groups it skips all but about 1/K of the blocks."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    layout = QueryLayout(11, 300)
    block_mask = attention.flex_block_mask(layout, torch.device("cpu"))
    assert block_mask is attention.flex_block_mask(layout, torch.device("cpu"))
    # 128-wide blocks do not align with groups of 300: flex visits 16.5% of the pairs, 1.8x the
    # 1/K that are visible (our kernel cuts its tiles at the groups and visits exactly 1/K)
    visited = 1 - block_mask.sparsity() / 100
    assert layout.visible_fraction() < visited < 2 * layout.visible_fraction()
    for layout in LAYOUTS:
        length = layout.total_queries
        dense = flex.create_mask(layout.mask_mod(), None, None, length, length, device="cpu")
        assert torch.equal(dense[0, 0], layout.dense_mask())


def test_flex_bad_inputs():
    layout = EQUAL
    q, k, v = qkv(layout, dtype=torch.float32, grad=True)
    with pytest.raises(ValueError, match="'flex' backend has no attention dropout"):
        grouped_attention(q, k, v, layout, dropout_p=0.1, backend="flex")
    with pytest.raises(NotImplementedError, match="'flex' backend has no backward on the CPU"):
        grouped_attention(q, k, v, layout, backend="flex")


# ------------------------------------------------------------------------------------------------
# input validation
# ------------------------------------------------------------------------------------------------
def test_bad_inputs():
    layout = EQUAL
    q, k, v = qkv(layout, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"q.shape\[2\] \(L\) is 110 but the layout has 111"):
        grouped_attention(q[:, :, :-1], k[:, :, :-1], v[:, :, :-1], layout)
    with pytest.raises(ValueError, match="must have the same shape"):
        grouped_attention(q, k[:, :2], v, layout)
    with pytest.raises(TypeError, match="same dtype"):
        grouped_attention(q, k.double(), v, layout)
    with pytest.raises(ValueError, match="same device"):
        grouped_attention(q, k.to("meta"), v, layout)
    with pytest.raises(ValueError, match=r"shape \(B, H, L, D\)"):
        grouped_attention(q[0], k[0], v[0], layout)
    with pytest.raises(TypeError, match="floating-point"):
        grouped_attention(q.long(), k.long(), v.long(), layout)
    with pytest.raises(TypeError, match="layout must be a QueryLayout"):
        grouped_attention(q, k, v, 3)
    with pytest.raises(ValueError, match="dropout_p must be a float in"):
        grouped_attention(q, k, v, layout, dropout_p=1.0)
    with pytest.raises(ValueError, match="scale must be a positive float"):
        grouped_attention(q, k, v, layout, scale=-1.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        grouped_attention(q, k, v, layout, backend="dense")


# ------------------------------------------------------------------------------------------------
# GroupedSelfAttention
# ------------------------------------------------------------------------------------------------
def make_pair(embed_dim=32, num_heads=4, bias=True, batch_first=False, **kwargs):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(embed_dim, num_heads, bias=bias, batch_first=batch_first)
    ours = GroupedSelfAttention(embed_dim, num_heads, bias=bias, batch_first=batch_first,
                                **kwargs)
    ours.load_state_dict(mha.state_dict())  # strict: the parameter names must be the same
    if bias:  # MHA initialises biases to zero; make them count
        with torch.no_grad():
            for module in (mha, ours):
                torch.manual_seed(1)
                module.in_proj_bias.normal_()
                module.out_proj.bias.normal_()
    return mha, ours


def test_state_dict_keys_match_multihead_attention():
    mha = nn.MultiheadAttention(32, 4)
    ours = GroupedSelfAttention(32, 4)
    assert mha.state_dict().keys() == ours.state_dict().keys()
    assert {k: v.shape for k, v in mha.state_dict().items()} == \
        {k: v.shape for k, v in ours.state_dict().items()}
    assert GroupedSelfAttention(32, 4, bias=False).state_dict().keys() == \
        nn.MultiheadAttention(32, 4, bias=False).state_dict().keys()


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("same_qk", [True, False])
def test_one_group_equals_multihead_attention(batch_first, bias, same_qk):
    mha, ours = make_pair(bias=bias, batch_first=batch_first)
    mha.eval(), ours.eval()
    shape = (2, 37, 32) if batch_first else (37, 2, 32)
    tgt, pos = torch.randn(shape), torch.randn(shape)
    query = tgt + pos
    key = query if same_qk else query + 0.5
    expected = mha(query, key, tgt, need_weights=False)[0]
    out, weights = ours(query, key, tgt)
    assert weights is None and out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # and the gradients with respect to the shared parameters
    grad = torch.randn_like(out)
    expected_grads = torch.autograd.grad(expected, list(mha.parameters()), grad)
    grads = torch.autograd.grad(out, list(ours.parameters()), grad)
    for a, e in zip(grads, expected_grads):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["auto", "masked", "triton"])
def test_groups_equal_multihead_attention_per_group(backend):
    mha, ours = make_pair(backend=backend)
    layout = QueryLayout(num_groups=3, queries_per_group=37)
    x = torch.randn(layout.total_queries, 2, 32)
    out, _ = ours(x, x, x, layout=layout)
    for start, end in layout.segments:
        group = x[start:end]
        torch.testing.assert_close(out[start:end], mha(group, group, group)[0],
                                   atol=1e-5, rtol=1e-5)


def test_denoising_layout_equals_multihead_attention_with_dino_mask():
    mha, ours = make_pair()
    layout = DENOISING
    x = torch.randn(layout.total_queries, 2, 32)
    expected = mha(x, x, x, attn_mask=layout.mha_attn_mask())[0]
    torch.testing.assert_close(ours(x, x, x, layout=layout)[0], expected, atol=1e-5, rtol=1e-5)


def test_dropout_only_in_training():
    _, ours = make_pair(dropout=0.5)
    x = torch.randn(20, 2, 32)
    ours.eval()
    assert torch.equal(ours(x, x, x)[0], ours(x, x, x)[0])
    ours.train()
    assert not torch.equal(ours(x, x, x)[0], ours(x, x, x)[0])


def test_module_unsupported_arguments_and_bad_shapes():
    _, ours = make_pair()
    x = torch.randn(37, 2, 32)
    with pytest.raises(NotImplementedError, match="key_padding_mask"):
        ours(x, x, x, key_padding_mask=torch.zeros(2, 37, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="instead of attn_mask"):
        ours(x, x, x, attn_mask=torch.zeros(37, 37, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="need_weights=False"):
        ours(x, x, x, need_weights=True)
    with pytest.raises(ValueError, match="but the layout has 36 queries"):
        ours(x, x, x, layout=QueryLayout(2, 18))
    with pytest.raises(ValueError, match=r"must have shape \(L, B, E\) with E=32"):
        ours(x[..., :16], x, x)
    with pytest.raises(ValueError, match="same shape"):
        ours(x, x[:30], x[:30])
    with pytest.raises(ValueError, match="positive multiple of num_heads"):
        GroupedSelfAttention(30, 4)
    with pytest.raises(ValueError, match="backend must be one of"):
        GroupedSelfAttention(32, 4, backend="cuda")
