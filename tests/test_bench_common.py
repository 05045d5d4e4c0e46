"""benchmarks/common.py: the timing, naming and result-writing helpers every benchmark shares."""
import json
import os

import pytest
import torch

import common


def test_machine_name_and_results_path():
    cores = len(os.sched_getaffinity(0))
    assert common.machine_name(torch.device("cpu")) == f"cpu-{cores}core"
    assert common.results_path("matcher", "cpu-2core") == os.path.join(common.RESULTS_DIR, "matcher-cpu-2core.json")
    assert common.results_path("convergence", "h200", quick=True, suffix="-12-epochs").endswith(
        "convergence-h200-12-epochs-quick.json")


def test_machine_name_of_gpus(monkeypatch):
    for reported, expected in (("NVIDIA H200", "h200"), ("NVIDIA H100 80GB HBM3", "h100"),
                               ("NVIDIA GeForce RTX 4090", "rtx4090"), ("Tesla P100-PCIE-16GB", "p100-pcie-16gb")):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=reported: name)
        assert common.machine_name(torch.device("cuda")) == expected


def test_time_calls_and_summarise():
    calls = []
    times = common.time_calls(lambda: calls.append(1), torch.device("cpu"), repeats=5, warmup=2)
    assert len(calls) == 7 and len(times) == 5 and all(t >= 0 for t in times)
    stats = common.summarise([1.0, 2.0, 3.0, 4.0, 100.0])
    assert stats["median_ms"] == 3.0 and stats["repeats"] == 5 and stats["p10_ms"] < stats["p90_ms"]


def test_environment_and_write_results(tmp_path, capsys):
    env = common.environment(torch.device("cpu"))
    assert env["machine"] == common.machine_name(torch.device("cpu")) and env["threads"] >= 1
    assert {"torch", "python"} <= set(env["versions"]) and env["date"].endswith("+00:00")
    path = common.write_results({"benchmark": "x", **env}, str(tmp_path / "sub" / "x-cpu.json"))
    assert json.loads(open(path).read())["machine"] == env["machine"]
    assert os.listdir(tmp_path / "sub") == ["x-cpu.json"]  # no temporary file left
    assert f"wrote {path}" in capsys.readouterr().out


def test_save_figure(tmp_path):
    plt = common.pyplot()
    if plt is None:
        pytest.skip("matplotlib is not installed")
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = common.save_figure(fig, str(tmp_path / "fig.png"))
    assert os.path.getsize(path) > 0
