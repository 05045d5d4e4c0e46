"""Smoke test of benchmarks/bench_train_step.py: its core on a tiny model for a couple of steps.

Checks the report's structure, that both configurations train (finite losses) and that they
take the same first step: same weights, same batch, same assignment, so the same loss -- which
is what makes the timing comparison fair.
"""
import dataclasses
import json
import math

import pytest
import torch

import bench_train_step as bench
from group_detr.config import demo_config


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: extra intra-op threads only add synchronisation on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_size():
    config = dataclasses.replace(demo_config(), small_widths=(8, 16, 16, 32), hidden_dim=32, nheads=4,
                                 enc_layers=1, dec_layers=2, dim_feedforward=64, num_queries=5, dropout=0.0)
    return bench.Size("tiny", config, num_classes=5, batch=2, image_size=(48, 64),
                      targets={"targets": "uniform", "max_targets": 4}, description="tiny test model",
                      repeats={"cpu": 2, "cuda": 2})


@pytest.fixture(scope="module")
def report():
    return bench.run([tiny_size()], [1, 3], torch.device("cpu"), warmup=1, repeats=2, log=lambda *a, **k: None)


def test_report_structure(report):
    json.loads(json.dumps(report))  # plain JSON types only
    assert report["machine"].startswith("cpu-")
    size = report["sizes"]["tiny"]
    assert set(size["cases"]) == {"1", "3"} and size["repeats"] == 2
    for case in size["cases"].values():
        assert set(case["configurations"]) == set(bench.CONFIGURATIONS)
        for entry in case["configurations"].values():
            assert len(entry["steps_ms"]) == 2
            assert entry["step"]["median_ms"] > 0
            for region in bench.REGIONS:
                assert region in entry and "share" in entry[region]
            # the timed regions are inside the step
            assert entry["matching"]["median_ms"] > 0 and entry["self_attention"]["median_ms"] > 0
            assert entry["matching"]["median_ms"] + entry["self_attention"]["median_ms"] < entry["step"]["median_ms"]
            assert entry["syncs"] is None  # not applicable on CPU
            assert entry["host_reads"] >= 1
    overhead = size["overheads"]["K3_over_K1"]
    assert set(overhead) == set(bench.CONFIGURATIONS)
    assert all(math.isfinite(v) for o in overhead.values() for v in o.values())


def test_both_configurations_train_alike(report):
    for k, case in report["sizes"]["tiny"]["cases"].items():
        public, ours = (case["configurations"][n]["losses"] for n in bench.CONFIGURATIONS)
        assert len(public) == len(ours) == 3  # warmup + repeats
        assert all(math.isfinite(x) for x in public + ours)
        assert case["first_step_loss"]["relative_difference"] < 1e-4, k


def test_public_way_is_what_it_claims(report):
    case = report["sizes"]["tiny"]["cases"]["3"]["configurations"]
    # The reference matcher copies its cost to the host once per decoder layer.
    assert case["public"]["host_reads_by_region"]["matching"].get("cpu") == 2
    trainers = bench.build_trainers(tiny_size(), 3, torch.device("cpu"), seed=0)
    public_attn = trainers["public"].model.transformer.decoder.layers[0].self_attn.inner
    assert isinstance(public_attn, bench.DenseMaskSelfAttention)
    assert isinstance(public_attn.mha, torch.nn.MultiheadAttention)
    assert isinstance(trainers["public"].criterion.matcher.inner, bench.PerLayerMatcher)
    # Both models start from the same weights, and the MHA uses the parameters it replaced.
    ours_state, public_state = trainers["ours"].model.state_dict(), trainers["public"].model.state_dict()
    assert len(ours_state) == len(public_state)
    for (_, a), (_, b) in zip(ours_state.items(), public_state.items()):
        assert torch.equal(a, b)
    # ... and has no parameters of its own: the optimizers see the same number of tensors.
    assert len(list(trainers["public"].model.parameters())) == len(list(trainers["ours"].model.parameters()))


def test_table_and_plot(report, tmp_path, capsys):
    markdown = bench.print_report(report)
    assert markdown.count("\n") == 1 + 4  # header, rule, 2 K x 2 configurations
    assert "public" in capsys.readouterr().out
    pytest.importorskip("matplotlib")
    path = tmp_path / "train_step.png"
    assert bench.plot(report, str(path))
    assert path.stat().st_size > 0


def test_timed_step_stops_at_a_non_finite_loss():
    """A diverged configuration is reported by name, not timed on as if it trained."""

    class FixedLoss:
        def __init__(self, loss):
            self.loss, self.timer = loss, bench.RegionTimer(torch.device("cpu"))

        def step(self, *batch):
            return torch.tensor(self.loss)

    cpu = torch.device("cpu")
    with pytest.raises(FloatingPointError, match="tiny K=3 ours step 4: loss nan"):
        bench.timed_step(FixedLoss(float("nan")), (), seed=0, device=cpu, what="tiny K=3 ours step 4")
    loss, elapsed, regions = bench.timed_step(FixedLoss(2.5), (), seed=0, device=cpu, what="finite")
    assert loss == 2.5 and elapsed >= 0 and set(regions) == {"matching", "self_attention"}


def test_denoising_case_runs_both_settings_per_backend():
    """Table 2's step timing: denoising off and on per CPU backend, on the same batches."""
    result = bench.run_denoising_case(tiny_size(), 3, torch.device("cpu"), warmup=1, repeats=2, seed=0,
                                      log=lambda *a, **k: None)
    assert set(result) == set(bench.denoising_backends(torch.device("cpu")))
    for entry in result.values():
        assert entry["off"]["step"]["median_ms"] > 0 and entry["on"]["step"]["median_ms"] > 0
        assert entry["layouts"] >= 1 and math.isfinite(entry["overhead"])
