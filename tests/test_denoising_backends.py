"""A real training step with DINO's denoising and K = 3 groups gives the same losses and
gradients on every attention backend: masked (the reference), the Triton kernels (under the
Triton interpreter without CUDA) and FlexAttention (forward only on the CPU, where it has no
backward).

TRITON_INTERPRET=1 must be set before triton's first import in the process, as in
tests/test_attention_kernels.py; where triton was imported first, the Triton case skips.
"""
import os
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
CAN_INTERPRET = "triton" not in sys.modules or os.environ.get("TRITON_INTERPRET") == "1"
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from group_detr import attention  # noqa: E402
from group_detr.attention import GroupedSelfAttention  # noqa: E402
from group_detr.matcher import GroupMatcher  # noqa: E402
from group_detr.models import SetCriterion, build_group_detr, default_weight_dict  # noqa: E402

NUM_CLASSES = 4
NUM_GROUPS, QUERIES = 3, 5
# float32 throughout; the kernels sum in another order than SDPA, so values and gradients agree to
# a few float32 ulp of their scale, not bit for bit
RTOL, ATOL = 2e-4, 2e-5

pytestmark = pytest.mark.usefixtures("one_thread")


def model_and_batch(device="cpu"):
    torch.manual_seed(0)
    # head_dim 16: the smallest the kernels take
    model = build_group_detr(NUM_CLASSES, num_groups=NUM_GROUPS, num_queries=QUERIES, backbone="small",
                             hidden_dim=64, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=64, dropout=0.0,
                             small_widths=(8, 16, 16, 32), denoising_queries=6).to(device).train()
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 64, 64, generator=generator).to(device)
    mask = torch.zeros(2, 64, 64, dtype=torch.bool, device=device)
    targets = [{"labels": torch.tensor([0, 2, 1]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4],
                                                                         [0.5, 0.7, 0.2, 0.1]])},
               {"labels": torch.tensor([3]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])}]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    criterion = SetCriterion(NUM_CLASSES, GroupMatcher(), default_weight_dict(2, denoising=True),
                             queries_per_group=QUERIES, denoising=True)
    return model, criterion, images, mask, targets


def set_backend(model, backend):
    for module in model.modules():
        if isinstance(module, GroupedSelfAttention):
            module.backend = backend


def step(model, criterion, images, mask, targets, backend, grad=True):
    """Losses and parameter gradients of one step on `backend` (the same denoising noise)."""
    set_backend(model, backend)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    with torch.set_grad_enabled(grad):
        outputs = model(images, mask, targets)
        assert outputs["dn_meta"]["num_groups"] == 2  # budget 6 // 3 targets
        losses = criterion(outputs, targets)
    if not grad:
        return {k: v.detach() for k, v in losses.items()}, {}
    criterion.weighted_sum(losses).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


def assert_same(got, expected):
    assert set(got) == set(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=RTOL, atol=ATOL, msg=lambda m, key=key: f"{key}: {m}")


def test_the_triton_kernels_train_a_denoising_step_like_the_masked_reference(monkeypatch):
    pytest.importorskip("triton")
    from group_detr.kernels import grouped_attention as launchers
    if not CUDA and not (CAN_INTERPRET and launchers.INTERPRETED):
        pytest.skip("no CUDA, and triton was imported before TRITON_INTERPRET=1 could be set")
    device = "cuda" if CUDA else "cpu"
    model, criterion, images, mask, targets = model_and_batch(device)
    reference_losses, reference_grads = step(model, criterion, images, mask, targets, "masked")
    calls = []
    if not CUDA:  # on CPU tensors the op runs its reference math unless told the kernels run here
        monkeypatch.setattr(attention, "_runs_kernels", lambda q: True)
    forward = launchers.forward
    monkeypatch.setattr(launchers, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    losses, grads = step(model, criterion, images, mask, targets, "triton")
    assert len(calls) == 2  # one kernel forward per decoder layer: the kernels really ran
    assert_same(losses, reference_losses)
    assert_same(grads, reference_grads)
    assert any("denoising" in name for name in grads)  # the denoising parameters learn too


def test_flex_attention_gives_the_masked_losses_of_a_denoising_step():
    model, criterion, images, mask, targets = model_and_batch()
    reference_losses, _ = step(model, criterion, images, mask, targets, "masked", grad=False)
    try:
        losses, _ = step(model, criterion, images, mask, targets, "flex", grad=False)
    except Exception as error:  # noqa: BLE001  (no C++ compiler for inductor, say)
        pytest.skip(f"FlexAttention does not compile here: {type(error).__name__}")
    assert_same(losses, reference_losses)


@pytest.mark.skipif(CUDA, reason="on CUDA the op runs the kernels (the test above)")
def test_the_custom_ops_reference_math_trains_like_masked():
    """On the CPU the "triton" backend's op runs dense reference math: the same step again."""
    model, criterion, images, mask, targets = model_and_batch()
    reference_losses, reference_grads = step(model, criterion, images, mask, targets, "masked")
    losses, grads = step(model, criterion, images, mask, targets, "triton")
    assert_same(losses, reference_losses)
    assert_same(grads, reference_grads)
