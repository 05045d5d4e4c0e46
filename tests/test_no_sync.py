"""A training step of our model with validation off: no host synchronisation in the criterion or
the matcher (issue 12, "one owner of validation").

On CPU nothing synchronises, so the test counts what would make a GPU wait: Python-level reads
of tensor values on the host, the calls benchmarks/bench_train_step.py counts (`HOST_READS`), each
attributed to the group_detr function that made it. On CUDA, `torch.cuda.set_sync_debug_mode
("error")` turns any synchronisation into an error (skipped without a GPU).
"""
import os
import sys
from collections import Counter

import pytest
import torch
from torch.overrides import TorchFunctionMode

import group_detr
from group_detr.matcher import GroupMatcher
from group_detr.models import SetCriterion, build_group_detr, default_weight_dict

from bench_train_step import HOST_READS
from conftest import requires_cuda

PACKAGE = os.path.dirname(os.path.abspath(group_detr.__file__))
NUM_CLASSES, NUM_GROUPS, QUERIES, DEC_LAYERS = 4, 3, 5, 2

pytestmark = pytest.mark.usefixtures("one_thread")


class HostReads(TorchFunctionMode):
    """Counts host reads of tensor values by the group_detr function that makes them."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()  # (module file, function, call) -> n

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            frame = sys._getframe(1)
            while frame is not None and not frame.f_code.co_filename.startswith(PACKAGE):
                frame = frame.f_back
            where = ("outside group_detr", "") if frame is None else (
                os.path.relpath(frame.f_code.co_filename, PACKAGE), frame.f_code.co_name)
            self.counts[where + (name,)] += 1
        return func(*args, **(kwargs or {}))


def training_step(device, validate, **matcher_options):
    """Model, criterion (matcher with `validate`, indices kept on the device) and one batch."""
    torch.manual_seed(0)
    model = build_group_detr(NUM_CLASSES, num_groups=NUM_GROUPS, num_queries=QUERIES, backbone="small",
                             hidden_dim=32, nheads=4, enc_layers=1, dec_layers=DEC_LAYERS,
                             dim_feedforward=64, dropout=0.0, small_widths=(8, 16, 16, 32)).to(device).train()
    matcher = GroupMatcher(num_groups=NUM_GROUPS, return_device=True, validate=validate, **matcher_options)
    criterion = SetCriterion(NUM_CLASSES, matcher, default_weight_dict(DEC_LAYERS), queries_per_group=QUERIES)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 64, 64, generator=generator).to(device)
    mask = torch.zeros(2, 64, 64, dtype=torch.bool, device=device)
    targets = [{"labels": torch.tensor([0, 2], device=device),
                "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4]], device=device)},
               {"labels": torch.tensor([3], device=device),
                "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]], device=device)}]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(count=None):
        """forward, criterion (under `count`), backward, optimizer step; returns the loss."""
        outputs = model(images, mask)
        if count is None:
            losses = criterion(outputs, targets)
        else:
            with count:
                losses = criterion(outputs, targets)
        loss = criterion.weighted_sum(losses)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


# On CPU the solver's status is read even with validate=False: it is already on the host, so the
# read is free, and it is the last guard against an ill-formed result (assignment.py). On CUDA
# GroupMatcher does not read it with validate=False (the CUDA test below proves it).
CPU_ONLY_STATUS_CHECK = "_status_on_host"


def test_cpu_step_reads_nothing_on_the_host_inside_criterion_and_matcher():
    step = training_step("cpu", validate=False)
    step()
    reads = HostReads()
    loss = step(reads)
    assert torch.isfinite(loss)
    unexpected = {k: n for k, n in reads.counts.items() if k[1] != CPU_ONLY_STATUS_CHECK}
    assert not unexpected, f"host reads inside the criterion/matcher: {unexpected}"
    status_reads = sum(reads.counts.values())
    # status.cpu() and .numpy(): once in the solve, once in the matcher's check, for the whole step
    assert status_reads <= 4, reads.counts


def test_the_counter_sees_validation():
    """validate=True checks the targets' values once, in the matcher: the counter must see it
    (in Python, as on CUDA: the torch cost; the CPU's one-pass op checks them in C++)."""
    step = training_step("cpu", validate=True, cost_backend="torch")
    reads = HostReads()
    step(reads)
    functions = {function for (_, function, _) in reads.counts}
    assert "check_targets" in functions, reads.counts
    assert not any(path.startswith("models") for (path, _, _) in reads.counts), reads.counts


@requires_cuda
@pytest.mark.skipif(not group_detr.backends()["lsa_cuda"], reason="needs the CUDA solver")
def test_cuda_step_has_no_synchronisation_inside_criterion_and_matcher():
    step = training_step("cuda", validate=False)
    step()  # warm-up: allocator, pinned-memory pool, kernels' first launches
    torch.cuda.synchronize()

    class SyncIsAnError:
        def __enter__(self):
            torch.cuda.set_sync_debug_mode("error")

        def __exit__(self, *exc):
            torch.cuda.set_sync_debug_mode("default")

    loss = step(SyncIsAnError())
    assert torch.isfinite(loss).item()
