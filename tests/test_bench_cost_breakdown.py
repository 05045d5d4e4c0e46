"""benchmarks/bench_cost_breakdown.py: the op's per-problem code built without torch, in parts."""
import shutil

import pytest

import bench_cost_breakdown

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    build_dir = str(tmp_path_factory.mktemp("harness"))
    return bench_cost_breakdown.main(["--quick", "--workloads", "coco_k11", "dino_k1_900",
                                      "--build-dir", build_dir])


def test_report_structure(report):
    assert report["benchmark"] == "cost_breakdown" and report["threads"] == 1
    assert list(report["workloads"]) == ["coco_k11", "dino_k1_900"]
    for result in report["workloads"].values():
        parts = result["parts"]
        assert set(parts) == {"whole", "cost", "class_term", "gather", "solve", "focal_term",
                              "box_terms"}
        for stat in ("min_ms", "median_ms"):
            assert all(parts[p][stat] > 0 for p in bench_cost_breakdown.PARTS)
            assert parts["focal_term"][stat] == pytest.approx(
                parts["class_term"][stat] - parts["gather"][stat])
            assert parts["box_terms"][stat] == pytest.approx(
                parts["cost"][stat] - parts["class_term"][stat])
        assert result["whole_over_solve"] == pytest.approx(
            parts["whole"]["min_ms"] / parts["solve"]["min_ms"])


def test_the_library_is_built_once_per_source_version(tmp_path):
    first = bench_cost_breakdown.build_harness(str(tmp_path))
    assert bench_cost_breakdown.build_harness(str(tmp_path)) == first
    assert len(list(tmp_path.iterdir())) == 1


def test_unknown_workload_is_an_error(capsys):
    with pytest.raises(SystemExit):
        bench_cost_breakdown.main(["--quick", "--workloads", "nope"])
    assert "unknown workloads ['nope']" in capsys.readouterr().err
