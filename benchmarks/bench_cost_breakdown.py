"""Where GroupMatcher's CPU time goes: its one-pass op's work per workload, timed in parts.

bench_matcher.py times the whole matcher against its assignment. This says why the two differ:
cost_breakdown.cpp runs the op's own per-problem code (csrc/cost/cost_blocks.h's problem_cost,
then the solver's solve_one) on one thread, without torch, on the workloads' inputs, and times

    whole       cost + solve of every (image, group) problem: the op's work on one thread
    cost        the cost tiles alone (logit gather, focal class term, L1 + GIoU)
    class term  the cost with the box weights at 0: the gather and the focal term alone
    gather      the gather alone: the predicted boxes and each query's logits at its image's
                distinct target classes, read from the (B, Q, C) logits
    solve       the solver on the stored tiles alone: the assignment

interleaved, `--repeats` times each, and reports the minimum and median of each (the minimum is
the least disturbed by other work on the machine), the focal term as class term - gather, the
box terms as cost - class term, and the
ratios to the solve: whole / solve is the op's share of GroupMatcher's "/ assignment" ratio, and
(class term + solve) / solve is what that ratio would be were L1 and GIoU free.

    python benchmarks/bench_cost_breakdown.py            # g++ builds the harness (a few seconds)
    python benchmarks/bench_cost_breakdown.py --class-cost focal_logsigmoid

Writes benchmarks/results/cost_breakdown-<machine>.json (-focal_logsigmoid.json for that cost).
"""
import argparse
import ctypes
import hashlib
import os
import shutil
import subprocess

import numpy as np
import torch

import common
from workloads import matcher_inputs, select_workloads

SOURCE = os.path.join(common.HERE, "cost_breakdown.cpp")
CSRC = os.path.join(common.ROOT, "csrc")
PARTS = ("whole", "cost", "class_term", "gather", "solve")
CLASS_COSTS = ("focal", "focal_logsigmoid")
DERIVED = ("focal_term", "box_terms")


def build_harness(build_dir):
    """Compile cost_breakdown.cpp (and the headers it includes) into a shared library, once per
    version of the sources; returns its path."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise SystemExit("bench_cost_breakdown needs a C++20 compiler (g++; or set CXX)")
    digest = hashlib.sha1()
    for path in [SOURCE] + sorted(
            os.path.join(d, f) for d, _, files in os.walk(CSRC) for f in files
            if f.endswith((".h", ".inc"))):
        with open(path, "rb") as f:
            digest.update(f.read())
    library = os.path.join(build_dir, f"cost_breakdown-{digest.hexdigest()[:12]}.so")
    if not os.path.exists(library):
        os.makedirs(build_dir, exist_ok=True)
        subprocess.run([compiler, "-O3", "-std=c++20", "-shared", "-fPIC", f"-I{CSRC}", SOURCE,
                        "-o", library], check=True)
    return library


def load_harness(library):
    lib = ctypes.CDLL(library)
    lib.cost_breakdown.restype = ctypes.c_int
    lib.cost_breakdown.argtypes = ([ctypes.c_void_p] * 5 + [ctypes.c_int64] * 4
                                   + [ctypes.c_char_p, ctypes.c_int64, ctypes.c_void_p])
    return lib


def run_workload(lib, spec, repeats, class_cost="focal"):
    outputs, targets = matcher_inputs(spec)
    arrays = [
        np.ascontiguousarray(outputs["pred_logits"].numpy(), dtype=np.float32),
        np.ascontiguousarray(outputs["pred_boxes"].numpy(), dtype=np.float32),
        np.ascontiguousarray(torch.cat([t["labels"] for t in targets]).numpy(), dtype=np.int64),
        np.ascontiguousarray(torch.cat([t["boxes"] for t in targets]).numpy(), dtype=np.float32),
        np.array([len(t["labels"]) for t in targets], dtype=np.int64),
    ]
    batch, num_queries, num_classes = arrays[0].shape
    times = np.zeros((len(PARTS), repeats))
    failed = lib.cost_breakdown(*(a.ctypes.data for a in arrays), batch, num_queries,
                                num_classes, spec["groups"], class_cost.encode(), repeats,
                                times.ctypes.data)
    if failed:
        raise RuntimeError("the whole pass and the solve of the stored tiles disagree")
    parts = {name: {"min_ms": float(t.min()), "median_ms": float(np.median(t))}
             for name, t in zip(PARTS, times)}
    for stat in ("min_ms", "median_ms"):
        parts.setdefault("focal_term", {})[stat] = parts["class_term"][stat] - parts["gather"][stat]
        parts.setdefault("box_terms", {})[stat] = parts["cost"][stat] - parts["class_term"][stat]
    solve = parts["solve"]["min_ms"]
    return {
        "parts": parts,
        "targets_per_image": arrays[4].tolist(),
        "whole_over_solve": parts["whole"]["min_ms"] / solve,
        "class_term_plus_solve_over_solve": (parts["class_term"]["min_ms"] + solve) / solve,
    }


def print_table(report):
    print(f"\nGroupMatcher's CPU op in parts, class cost {report['class_cost']!r}, one thread, ms "
          f"(min / median over {report['repeats']} interleaved repeats)")
    print(f"{'workload':12s} " + " ".join(f"{p:>15s}" for p in PARTS + DERIVED)
          + f" {'whole/solve':>11s} {'(class+solve)/solve':>19s}")
    for name, r in report["workloads"].items():
        cells = [f"{r['parts'][p]['min_ms']:6.3f} / {r['parts'][p]['median_ms']:6.3f}"
                 for p in PARTS + DERIVED]
        print(f"{name:12s} " + " ".join(f"{c:>15s}" for c in cells)
              + f" {r['whole_over_solve']:10.1f}x {r['class_term_plus_solve_over_solve']:18.1f}x")
    print("class term: gather + focal cost, once per (query, distinct target class); focal term = "
          "class term - gather; box terms = cost - class term (L1 + GIoU per query-target pair); "
          "ratios from the minima")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="*", help="subset of workload names")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--class-cost", default="focal", choices=CLASS_COSTS,
                        help="the focal cost's form (the class and focal terms change with it)")
    parser.add_argument("--build-dir", default=os.path.join(common.ROOT, "build", "bench"))
    parser.add_argument("--quick", action="store_true", help="few repeats, no results file")
    parser.add_argument("--out",
                        help="results file (default results/cost_breakdown-<machine>.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 5
    try:
        workloads = select_workloads("matcher", args.workloads)
    except ValueError as error:
        parser.error(str(error))
    lib = load_harness(build_harness(args.build_dir))
    device = torch.device("cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the harness runs on one thread: the report's header says so
    try:
        report = {"benchmark": "cost_breakdown", **common.environment(device),
                  "repeats": args.repeats, "class_cost": args.class_cost, "workloads": {}}
    finally:
        torch.set_num_threads(threads)
    for name, spec in workloads.items():
        print(f"running {name} ...", flush=True)
        report["workloads"][name] = run_workload(lib, spec, args.repeats, args.class_cost)
    report["load_average_after"] = list(os.getloadavg())
    print_table(report)
    print(f"\n{report['device_name']}; load average before / after: {report['load_average']} / "
          f"{report['load_average_after']}")
    if not args.quick:
        suffix = "" if args.class_cost == "focal" else f"-{args.class_cost}"
        common.write_results(report, args.out or common.results_path(
            "cost_breakdown", report["machine"], suffix=suffix))
    return report


if __name__ == "__main__":
    main()
