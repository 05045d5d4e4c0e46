"""The Triton kernels compiled ahead of time for sm_80 and sm_90 on a machine without a GPU, and
the launcher's first call (no autotuning, nothing benchmarked under a graph capture).

The compile test covers every configuration the launcher can pick: one per kernel, head_dim,
dtype, dropout setting and target (group_detr.kernels.grouped_attention.launch_config): 168
compiles in 2 worker processes, 163 s on the 2-core machine at load average 2 (7-12 min at load
9-13). scripts/kernel_resources.py prints the same table and writes
benchmarks/results/kernel_resources-aot.json.
"""
import importlib
import importlib.util
import json
import os

import pytest
import torch

from group_detr.kernels import DTYPES, HEAD_DIMS, aot

# triton is imported by the tests, not at collection: test_attention_kernels.py must be the first
# to import it in the process (it switches the interpreter on before)
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="needs triton (pip install triton)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE = os.path.join(ROOT, "benchmarks", "results", "kernel_resources-aot.json")
KERNELS_PER_KEY = {False: {"fwd", "dkdv", "dq", "preprocess"}, True: {"fwd", "dkdv", "dq"}}


def _key_of(row):
    return (row["head_dim"], row["dtype"], row["dropout"], row["target"])


@pytest.mark.slow
def test_every_launcher_configuration_compiles_for_sm80_and_sm90_without_spills():
    """Compile error, shared memory over the target's limit (sm_80 163 KB, sm_90 227 KB) or a
    register spill in any bfloat16 / float16 configuration the launcher picks fails the test
    (float32 may spill a little: the resource table says where)."""
    pytest.importorskip("triton.backends.nvidia")
    rows = aot.compile_all(aot.keys(), processes=2)
    assert aot.problems(rows) == []
    compiled = {}
    for row in rows:
        assert row["chosen"] and row["registers"] > 0
        compiled.setdefault(_key_of(row), set()).add(row["kernel"])
    expected = {(d, str(t).replace("torch.", ""), p, f"sm_{c}"): KERNELS_PER_KEY[p]
                for d, t, p, c in aot.keys()}
    assert compiled == expected


def test_committed_resource_table_is_the_launchers_choices():
    """The generated table is current: its chosen rows are exactly what launch_config picks now,
    for every key, and it records no problem."""
    launchers = importlib.import_module("group_detr.kernels.grouped_attention")
    with open(TABLE) as f:
        table = json.load(f)
    assert table["problems"] == []
    chosen = [r for r in table["rows"] if r["chosen"]]
    seen = set()
    for row in chosen:
        config = launchers.launch_config(
            row["kernel"], row["head_dim"], getattr(torch, row["dtype"]), row["dropout"],
            divmod(int(row["target"][3:]), 10))
        assert (row["block"], row["num_warps"], row["num_stages"]) == (
            config.block, config.num_warps, config.num_stages), row
        if row["dtype"] != "float32":
            assert row["spill_store_bytes"] == row["spill_load_bytes"] == 0, row
        assert row["shared_bytes"] <= row["shared_limit_bytes"], row
        seen.add(_key_of(row) + (row["kernel"],))
    assert seen == {(d, str(t).replace("torch.", ""), p, f"sm_{c}", kernel)
                    for d, t, p, c in aot.keys() for kernel in KERNELS_PER_KEY[p]}


class _RecordingKernel:
    """Stands in for a JIT kernel: records `kernel[grid](*args, **kwargs)` instead of compiling."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, kwargs))


@pytest.mark.parametrize("capability", [(8, 0), (9, 0)])
def test_first_call_under_graph_capture_launches_the_committed_config(monkeypatch, capability):
    """On a GPU the launcher's first call compiles one configuration and launches it: no
    autotuner (which benchmarks every candidate inside the call, breaking a CUDA-graph capture
    or a compiled region), whatever the capture state. Simulated on the CPU: a CUDA device of
    `capability` inside a graph capture, with recording kernels."""
    triton = importlib.import_module("triton")
    launchers = importlib.import_module("group_detr.kernels.grouped_attention")
    assert not any(isinstance(kernel, triton.runtime.Autotuner)
                   for kernel, _ in launchers._KERNELS.values())
    recording = {name: (_RecordingKernel(), inner)
                 for name, (_, inner) in launchers._KERNELS.items()}
    monkeypatch.setattr(launchers, "_KERNELS", recording)
    monkeypatch.setattr(launchers, "INTERPRETED", False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    cuda = torch.device("cuda")
    for dtype in DTYPES:
        for head_dim in HEAD_DIMS:
            for name, (kernel, inner) in recording.items():
                q = torch.zeros(1, dtype=dtype)
                constants = dict(HEAD_DIM=head_dim, HAS_DROPOUT=True)
                launchers._launch(name, (1, 1), (q,), constants, cuda)
                config = launchers.launch_config(name, head_dim, dtype, True, capability)
                grid, kwargs = kernel.calls[-1]
                assert kwargs["num_warps"] == config.num_warps
                assert kwargs["num_stages"] == config.num_stages
                if inner:
                    assert kwargs[inner] == config.block
