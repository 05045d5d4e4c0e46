"""PD / MD (group_detr.analysis, paper eqs. 6-7) on hand-built positions with known answers, on a
tiny model, and a smoke test of bench_convergence's core."""
import json
import math
import os

import pytest
import torch

from conftest import requires_pycocotools
from group_detr import analysis
from group_detr.config import SYNTHETIC_PRESETS, TrainConfig, demo_config, synthetic_preset
from group_detr.engine import build_matcher
from group_detr.models.detector import build_group_detr


def groups_of(*groups):
    """(K, N, 2) from K lists of N (x, y) points."""
    return torch.tensor(groups, dtype=torch.float64)


def brute_force_pd(pos, first_only=False):
    """Eq. 6 written out: for each ordered pair (g, h), g != h, the mean over group g's queries of
    the distance to the closest query of group h; then the mean over the pairs."""
    num_groups = len(pos)
    pairs = [(g, h) for g in range(num_groups) for h in range(num_groups)
             if g != h and (not first_only or 0 in (g, h))]
    total = 0.0
    for g, h in pairs:
        total += sum(min(math.dist(p, q) for q in pos[h]) for p in pos[g]) / len(pos[g])
    return total / len(pairs)


# ----------------------------------------------------------------------------------------------
# PD (eq. 6)


def test_pd_of_two_groups_is_the_papers_formula():
    # N = 2. Group 1: both queries at (0, 0), nearest in group 2 at 0.3 each; group 2: (0, 0.3)
    # and (0, 1), nearest in group 1 at 0.3 and 1.0. Eq. 6: (0.3 + 0.3 + 0.3 + 1.0) / (2N).
    pos = [[(0.0, 0.0), (0.0, 0.0)], [(0.0, 0.3), (0.0, 1.0)]]
    assert analysis.perturbation_distance(groups_of(*pos)) == pytest.approx(1.9 / 4)
    assert analysis.perturbation_distance(groups_of(*pos), first_only=True) == pytest.approx(1.9 / 4)


def test_pd_of_a_shifted_copy_is_the_shift():
    base = [(0.1, 0.1), (0.5, 0.2), (0.9, 0.8), (0.3, 0.7)]  # queries at least 0.3 apart
    shifted = [(x + 0.03, y - 0.04) for x, y in base]
    assert analysis.perturbation_distance(groups_of(base, shifted)) == pytest.approx(0.05)
    assert analysis.perturbation_distance(groups_of(base, base[::-1])) == 0.0  # same set, other order


def test_pd_of_three_groups_is_the_mean_over_ordered_pairs():
    # d(0,1) = d(1,0) = 0.5, d(0,2) = d(2,0) = 0, d(1,2) = d(2,1) = 0.5
    pos = groups_of([(0.0, 0.0)], [(0.3, 0.4)], [(0.0, 0.0)])
    assert analysis.perturbation_distance(pos) == pytest.approx(2 / 6)
    assert analysis.perturbation_distance(pos, first_only=True) == pytest.approx(0.25)
    torch.testing.assert_close(analysis.nearest_query_distances(pos), torch.tensor(
        [[0.0, 0.5, 0.0], [0.5, 0.0, 0.5], [0.0, 0.5, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize("num_groups,num_queries", [(2, 1), (2, 5), (3, 4), (5, 3), (11, 10)])
def test_pd_matches_the_written_out_formula_on_random_positions(num_groups, num_queries):
    generator = torch.Generator().manual_seed(num_groups * 100 + num_queries)
    pos = torch.rand(num_groups, num_queries, 2, generator=generator, dtype=torch.float64)
    as_lists = pos.tolist()
    assert analysis.perturbation_distance(pos) == pytest.approx(brute_force_pd(as_lists))
    assert analysis.perturbation_distance(pos, first_only=True) == pytest.approx(brute_force_pd(as_lists, True))


def test_pd_is_nan_for_one_group_and_checks_its_input():
    assert math.isnan(analysis.perturbation_distance(torch.rand(1, 5, 2)))
    with pytest.raises(ValueError, match=r"positions must be \(K, N, 2\), got \(2, 5\)"):
        analysis.nearest_query_distances(torch.rand(2, 5))


# ----------------------------------------------------------------------------------------------
# MD (eq. 7)


def test_matching_distance_two_groups():
    # one image, one object: group 0's query sits at (0, 0), group 1's at (0.3, 0.4)
    positions = [torch.tensor([[[0.0, 0.0]], [[0.3, 0.4]]])]
    assert analysis.matching_distance(positions) == pytest.approx(0.5)


def test_matching_distance_three_groups_mean_over_pairs():
    # distances: d01 = 5, d02 = 0, d12 = 5 -> mean over the 6 ordered pairs = 10/3; over the
    # pairs with group 0: (5 + 5 + 0 + 0) / 4
    positions = [torch.tensor([[[0.0, 0.0]], [[3.0, 4.0]], [[0.0, 0.0]]])]
    assert analysis.matching_distance(positions) == pytest.approx(10 / 3)
    assert analysis.matching_distance(positions, first_only=True) == pytest.approx(2.5)


def test_matching_distance_averages_objects_and_images_and_skips_unmatched():
    img1 = torch.tensor([[[0.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 2.0]]])  # objects: 1 and 2
    img2 = torch.tensor([[[0.0, 0.0]], [[float("nan"), float("nan")]]])  # unmatched: ignored
    assert analysis.matching_distance([img1, img2]) == pytest.approx(1.5)


def test_matching_distance_is_nan_for_one_group():
    assert math.isnan(analysis.matching_distance([torch.zeros(1, 3, 2)]))


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
    matcher = build_matcher(TrainConfig(num_groups=2))
    positions = analysis.matched_positions(outputs, targets, matcher, 2, 2)
    assert torch.equal(positions[0], torch.tensor([[[0.1, 0.2]], [[0.4, 0.6]]]))
    assert analysis.matching_distance(positions) == pytest.approx(0.5)


# ----------------------------------------------------------------------------------------------
# on a model


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


def _distances(model):
    images, mask, targets = _batch()
    return analysis.query_distances(model, images, mask, targets, build_matcher(TrainConfig(num_groups=model.num_groups)))


def test_query_distances_of_identical_groups_are_zero():
    model = _tiny_model(3)
    with torch.no_grad():  # every group a copy of group 0: same positions, identical matchings
        weight = model.query_embed.weight.view(3, 4, -1)
        weight[1:] = weight[0]
    result = _distances(model)
    for name in ("PD", "PD_first", "MD", "MD_first"):
        assert result[name] == pytest.approx(0.0, abs=1e-6)
    assert result["num_objects"] == 3
    assert model.training  # the mode is restored


def test_query_distances_of_random_groups():
    model = _tiny_model(3).eval()
    result = _distances(model)
    expected_pd = brute_force_pd(analysis.query_positions(model).tolist())
    assert result["PD"] == pytest.approx(expected_pd) and 0 < result["PD"] < 2 ** 0.5
    assert 0 < result["MD"] < 2 ** 0.5
    assert not model.training
    one = _distances(_tiny_model(1))
    assert math.isnan(one["PD"]) and math.isnan(one["MD"]) and one["num_objects"] == 3


def test_plot_reference_points(tmp_path):
    pytest.importorskip("matplotlib")
    path = analysis.plot_reference_points(analysis.query_positions(_tiny_model(11)), str(tmp_path / "refs.png"))
    assert os.path.getsize(path) > 0
    from PIL import Image

    with Image.open(path) as image:  # a real PNG with colours, not an empty canvas
        assert image.format == "PNG" and len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 11


@requires_pycocotools
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
    one, two = results["runs"]
    assert math.isnan(one["distances"][-1]["MD"]) and math.isnan(one["distances"][-1]["PD"])
    assert two["distances"][-1]["MD"] >= 0
    # PD of the final model is eq. 6 of its stored query positions
    assert two["distances"][-1]["PD"] == pytest.approx(brute_force_pd(two["query_positions"]))
    assert torch.tensor(two["query_positions"]).shape == (2, 3, 2)
    assert set(results["summary"]) == {"1", "2"} and len(results["summary"]["2"]["AP"]) == 2
    assert results["summary"]["2"]["final"]["AP_small"]["n"] == 1 and results["summary"]["2"]["step_time_s"]["mean"] > 0
    with open(tmp_path / "runs" / "K2-seed0" / "log.jsonl") as f:  # the callback's distances reach the run's log
        assert [round(json.loads(line)["PD"], 6) for line in f] == [round(d["PD"], 6) for d in two["distances"][1:]]
    png = bench_convergence.plot(results, str(tmp_path / "convergence.png"))
    assert os.path.getsize(png) > 0
    figure3 = bench_convergence.plot_query_positions(results, str(tmp_path / "positions.png"))
    assert os.path.getsize(figure3) > 0


@requires_pycocotools
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


@requires_pycocotools
def test_bench_convergence_quick_cli(tmp_path, monkeypatch):
    """`bench_convergence.py --quick`, the CI smoke test of the whole command: data, runs, files."""
    import bench_convergence

    preset = demo_config().synthetic
    monkeypatch.setitem(SYNTHETIC_PRESETS, preset,
                        synthetic_preset(preset, num_train=16, num_val=4, image_size=64, max_objects=2))
    out = tmp_path / "convergence.json"
    results = bench_convergence.main(["--quick", "--data-dir", str(tmp_path / "data"), "--out", str(out),
                                      "--set", f"output_dir={tmp_path / 'runs'}", "max_train_images=16"])
    assert results["quick"] and results["groups"] == [1, 3] and results["config"]["epochs"] == 2
    assert results["jobs"] == min(len(os.sched_getaffinity(0)), 2)
    written = json.loads(out.read_text())
    assert [(r["num_groups"], len(r["epochs"])) for r in written["runs"]] == [(1, 2), (3, 2)]
    assert os.path.getsize(tmp_path / written["png"]) > 0
    assert os.path.getsize(tmp_path / written["query_positions_png"]) > 0
