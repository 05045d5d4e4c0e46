"""PD / MD (group_detr.analysis) on hand-made cases, and a smoke test of bench_convergence's core."""
import json
import math
import os

import pytest
import torch

from group_detr import analysis
from group_detr.engine import demo_config
from group_detr.models.detector import build_group_detr


def test_matching_distance_two_groups():
    # one image, one object: group 0's query sits at (0, 0), group 1's at (0.3, 0.4)
    positions = [torch.tensor([[[0.0, 0.0]], [[0.3, 0.4]]])]
    assert analysis.matching_distance(positions) == pytest.approx(0.5)


def test_matching_distance_three_groups_mean_over_pairs():
    # distances: d01 = 5, d02 = 0, d12 = 5 -> mean over the 6 ordered pairs = 10/3
    positions = [torch.tensor([[[0.0, 0.0]], [[3.0, 4.0]], [[0.0, 0.0]]])]
    assert analysis.matching_distance(positions) == pytest.approx(10 / 3)


def test_matching_distance_averages_objects_and_images_and_skips_unmatched():
    img1 = torch.tensor([[[0.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 2.0]]])  # objects: 1 and 2
    img2 = torch.tensor([[[0.0, 0.0]], [[float("nan"), float("nan")]]])  # unmatched: ignored
    assert analysis.matching_distance([img1, img2]) == pytest.approx(1.5)


def test_matching_distance_is_nan_for_one_group():
    assert math.isnan(analysis.matching_distance([torch.zeros(1, 3, 2)]))


def test_perturbation_distance():
    pos = [torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])]  # K=1, two objects
    pert = [torch.tensor([[[0.0, 1.0], [1.0, 1.0]]])]
    assert analysis.perturbation_distance(pos, pert) == pytest.approx(0.5)


def test_matched_positions_follow_the_matching():
    # K=2 groups of N=2 queries, one object; group 0's query 1 and group 1's query 0 (index 2)
    # predict the object exactly, the others are far off.
    gt = torch.tensor([[0.3, 0.3, 0.2, 0.2]])
    far = torch.tensor([0.8, 0.8, 0.1, 0.1])
    boxes = torch.stack([far, gt[0], gt[0], far])[None]
    logits = torch.full((1, 4, 1), -5.0)
    logits[0, [1, 2], 0] = 5.0
    refs = torch.tensor([[0.9, 0.9], [0.1, 0.2], [0.4, 0.6], [0.5, 0.5]])
    outputs = {"pred_logits": logits, "pred_boxes": boxes, "reference_points": refs}
    targets = [{"labels": torch.tensor([0]), "boxes": gt}]
    positions = analysis._matched_positions(outputs, targets, analysis.make_matcher(2), 2, 2)
    assert torch.equal(positions[0], torch.tensor([[[0.1, 0.2]], [[0.4, 0.6]]]))
    assert analysis.matching_distance(positions) == pytest.approx(0.5)


def _tiny_model(num_groups):
    torch.manual_seed(0)
    model = build_group_detr(3, num_groups=num_groups, num_queries=4, backbone="small", hidden_dim=32, nheads=2,
                             enc_layers=1, dec_layers=2, dim_feedforward=32, dropout=0.0, small_widths=(8, 8, 8, 8))
    return model


def _batch():
    torch.manual_seed(1)
    images = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    targets = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])}]
    return images, mask, targets


def test_query_distances_zero_noise_and_identical_groups():
    images, mask, targets = _batch()
    model = _tiny_model(3)
    with torch.no_grad():  # every group a copy of group 0: the groups give identical matchings
        weight = model.query_embed.weight.view(3, 4, -1)
        weight[1:] = weight[0]
    result = analysis.query_distances(model, images, mask, targets, noise=0.0)
    assert result["PD"] == pytest.approx(0.0, abs=1e-6)
    assert result["MD"] == pytest.approx(0.0, abs=1e-6)
    assert result["num_objects"] == 3
    assert model.training  # the mode is restored


def test_query_distances_random_groups():
    images, mask, targets = _batch()
    model = _tiny_model(3).eval()
    result = analysis.query_distances(model, images, mask, targets, noise=0.1, num_perturbations=2)
    assert 0 <= result["PD"] < 2 ** 0.5 and 0 < result["MD"] < 2 ** 0.5
    assert not model.training
    one = analysis.query_distances(_tiny_model(1), images, mask, targets)
    assert math.isnan(one["MD"]) and one["PD"] >= 0


def test_plot_reference_points(tmp_path):
    path = analysis.plot_reference_points(_tiny_model(3), str(tmp_path / "refs.png"))
    assert os.path.getsize(path) > 0


def test_bench_convergence_core_smoke(tmp_path):
    import bench_convergence
    from group_detr.data.synthetic import write_synthetic_dataset

    data = tmp_path / "data"
    write_synthetic_dataset(str(data), num_train=6, num_val=3, image_size=64, max_objects=2)
    config = demo_config(data_dir=str(data), output_dir=str(tmp_path / "runs"), hidden_dim=32, nheads=2,
                         enc_layers=1, dec_layers=1, dim_feedforward=32, small_widths=(8, 8, 8, 8), num_queries=3,
                         epochs=2, batch_size=3, train_scales=(64,), crop_resize=(64,), crop_size=(48, 64),
                         max_size=80, eval_size=64, num_workers=0, num_threads=1, eval_every=1, print_freq=10**6)
    results = bench_convergence.run_convergence(config, groups=(1, 2), seeds=(0,), analysis_images=2,
                                                log=lambda _: None)
    assert results["groups"] == [1, 2] and len(results["runs"]) == 2
    for run in results["runs"]:
        assert [e["epoch"] for e in run["epochs"]] == [1, 2]
        assert [d["step"] for d in run["distances"]] == [0, 2, 4]
        assert all(0 <= e["AP"] <= 1 or e["AP"] == -1 for e in run["epochs"])
    assert math.isnan(results["runs"][0]["distances"][-1]["MD"])
    assert results["runs"][1]["distances"][-1]["MD"] >= 0
    assert set(results["summary"]) == {"1", "2"} and len(results["summary"]["2"]["AP"]) == 2
    png = bench_convergence.plot(results, str(tmp_path / "convergence.png"))
    assert os.path.getsize(png) > 0


def test_bench_convergence_parallel_runs_give_the_same_results(tmp_path):
    """--jobs runs each (K, seed) in its own process: only the wall time may change."""
    import bench_convergence
    from group_detr.data.synthetic import write_synthetic_dataset

    data = tmp_path / "data"
    write_synthetic_dataset(str(data), num_train=4, num_val=2, image_size=64, max_objects=2)
    config = demo_config(data_dir=str(data), output_dir=str(tmp_path / "runs"), hidden_dim=16, nheads=2,
                         dec_layers=1, dim_feedforward=16, small_widths=(8, 8, 8, 8), num_queries=3,
                         epochs=1, batch_size=2, train_scales=(64,), crop_resize=(64,), crop_size=(48, 64),
                         max_size=80, eval_size=64, num_workers=0, num_threads=1, print_freq=10**6)
    serial = bench_convergence.run_convergence(config, groups=(1, 2), analysis_images=2, log=lambda _: None)
    parallel = bench_convergence.run_convergence(config, groups=(1, 2), analysis_images=2, jobs=2)
    for a, b in zip(serial["runs"], parallel["runs"]):
        assert (a["num_groups"], a["seed"]) == (b["num_groups"], b["seed"])
        assert json.dumps(a["distances"]) == json.dumps(b["distances"])  # NaN-aware (K = 1 has no MD)
        assert [e["loss"] for e in a["epochs"]] == [e["loss"] for e in b["epochs"]]


def test_bench_convergence_overrides():
    import bench_convergence

    assert bench_convergence.parse_overrides(["num_queries=30", "lr=2e-4", "train_scales=96,128",
                                              "max_train_images=100"]) == {
        "num_queries": 30, "lr": 2e-4, "train_scales": (96, 128), "max_train_images": 100}
    for bad in (["seed=1"], ["num_groups=3"], ["no_such_field=1"], ["num_queries"]):
        with pytest.raises(SystemExit, match="FIELD=VALUE"):
            bench_convergence.parse_overrides(bad)


def test_bench_convergence_quick_cli(tmp_path, monkeypatch):
    """`bench_convergence.py --quick`, the CI smoke test of the whole command: data, runs, files."""
    import bench_convergence

    monkeypatch.setattr(bench_convergence, "DEMO_SYNTHETIC",
                        {"num_train": 16, "num_val": 4, "image_size": 64, "max_objects": 2})
    out = tmp_path / "convergence.json"
    results = bench_convergence.main(["--quick", "--data-dir", str(tmp_path / "data"), "--out", str(out),
                                      "--set", f"output_dir={tmp_path / 'runs'}", "max_train_images=16"])
    assert results["quick"] and results["groups"] == [1, 3] and results["config"]["epochs"] == 2
    assert results["jobs"] == min(len(os.sched_getaffinity(0)), 2)
    written = json.loads(out.read_text())
    assert [(r["num_groups"], len(r["epochs"])) for r in written["runs"]] == [(1, 2), (3, 2)]
    assert os.path.getsize(tmp_path / written["png"]) > 0
