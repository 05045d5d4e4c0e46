"""Matcher benchmark: the batched solver and GroupMatcher against the public way, side by side.

For every matcher workload of workloads.json (the same inputs for every contender):

(a) assignment only, from the same per-image per-group cost:
    - ours: `group_detr.linear_sum_assignment`, all B*K problems in one call;
    - scipy, DETR style: what public Group DETR code runs after its cost is built: the
      batch-wide cost split per group and per image, one scipy call each, results turned into
      int64 tensors;
    - scipy, numpy loop: the cheapest possible scipy loop over the padded problems;
    - lapx's batch solvers (`pip install lapx`, extra `[bench]`), the fastest of them per
      workload, and torch-linear-assignment, when installed;
(b) the whole matcher, from the model's outputs to DETR's index lists: `GroupMatcher` (its CPU
    default: cost and solve per problem in one op, `group_detr::group_match`), the same fused cost
    in two steps (the padded `(B, K*N, M_max)` cost tensor, then the batched solver: the path
    GroupMatcher takes on CUDA, with masks or a chosen scipy solver), `GroupMatcher(cost_backend=
    "torch")` (the torch reference cost) and `ReferenceGroupMatcher` (public Group DETR:
    batch-wide cost, host copy, scipy), with GroupMatcher's time over its own assignment time;
    and, as a floor, one pass over the logits (`logits.sum()`): no cost computed from them can
    take less.

Every contender's answer is checked (identical assignments to scipy for ours, equal total cost
for the others) before it is timed. Prints a table of medians and ratios and writes
benchmarks/results/matcher-<machine>.json.

    python benchmarks/bench_matcher.py                 # CPU, all workloads
    python benchmarks/bench_matcher.py --device cuda   # GPU: ours on the device vs the host paths
    python benchmarks/bench_matcher.py --class-cost focal_logsigmoid   # RF-DETR's class cost
"""
import argparse
import os

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment as scipy_lsa

import common
import group_detr
from group_detr import GroupMatcher, _ext, linear_sum_assignment
from group_detr.match_cost import CLASS_COSTS
from group_detr.reference import ReferenceGroupMatcher
from workloads import matcher_inputs, select_workloads


def timed(fn, device, repeats, warmup):
    """Median, 10th and 90th percentile wall time of fn() in ms (device work included)."""
    return common.summarise(common.time_calls(fn, device, repeats, warmup))


def totals(cost_np, matched):
    """Total cost per problem of a `(P, T)` matched-query array."""
    out = np.zeros(cost_np.shape[0])
    for p in range(cost_np.shape[0]):
        cols = np.nonzero(matched[p] >= 0)[0]
        out[p] = cost_np[p, matched[p, cols], cols].sum()
    return out


# ---------------------------------------------------------------- the contenders (assignment)

def scipy_detr_style(flat_cost, sizes, num_groups, queries_per_group):
    """Public Group DETR after the cost: `(B, K*N, sum M)` split per group and image, scipy each."""
    cost = flat_cost.cpu()
    indices = []
    for cost_g in cost.split(queries_per_group, dim=1):
        indices.append([scipy_lsa(c[i]) for i, c in enumerate(cost_g.split(sizes, -1))])
    return [
        [(torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64))
         for i, j in group]
        for group in indices
    ]


def scipy_numpy_loop(cost_np, counts):
    matched = np.full(cost_np.shape[::2], -1, dtype=np.int64)
    for p, m in enumerate(counts):
        if m:
            rows, cols = scipy_lsa(cost_np[p, :, :m])
            matched[p, cols] = rows
    return matched


def lapx_solvers():
    try:
        import lap
    except ImportError:
        return {}
    return {
        name: getattr(lap, name)
        for name in ("lapjvr_batch", "lapjvx_batch", "lapjvs_batch")
        if hasattr(lap, name)
    }


def lapx_per_image(solver, cost_np, counts, num_groups, threads):
    """lapx batch solvers need equal shapes: one batch call per image (its K groups)."""
    matched = np.full(cost_np.shape[::2], -1, dtype=np.int64)
    for b in range(cost_np.shape[0] // num_groups):
        m = counts[b * num_groups]
        if m == 0:
            continue
        block = np.ascontiguousarray(cost_np[b * num_groups:(b + 1) * num_groups, :, :m])
        result = solver(block, extend_cost=True, return_cost=False, n_threads=threads)
        matched[b * num_groups:(b + 1) * num_groups, :m] = _lapx_rows(result, m)
    return matched


def lapx_padded(solver, padded_np, counts, threads):
    """One batch call over all problems, padding columns at a constant cost: a constant column
    can take any query, so the real columns' optimum is unchanged (ties may break otherwise)."""
    result = solver(padded_np, extend_cost=True, return_cost=False, n_threads=threads)
    matched = _lapx_rows(result, padded_np.shape[2])
    matched[np.arange(padded_np.shape[2])[None, :] >= np.asarray(counts)[:, None]] = -1
    return matched


def _lapx_rows(result, num_cols):
    """lapx batch output `(rows per problem, cols per problem)` -> (K, m) query per target."""
    rows_list, cols_list = result
    out = np.full((len(rows_list), num_cols), -1, dtype=np.int64)
    for k, (rows, cols) in enumerate(zip(rows_list, cols_list)):
        out[k, np.asarray(cols)] = np.asarray(rows)
    return out


def torch_linear_assignment_solver():
    try:
        from torch_linear_assignment import batch_linear_assignment
    except ImportError:
        return None
    return batch_linear_assignment


def tla_per_image(solve, cost, counts, num_groups):
    """torch-linear-assignment wants workers as rows: (K, m, N) per image; returns row->col."""
    matched = torch.full(cost.shape[::2], -1, dtype=torch.int64, device=cost.device)
    for b in range(cost.shape[0] // num_groups):
        m = counts[b * num_groups]
        if m == 0:
            continue
        block = cost[b * num_groups:(b + 1) * num_groups, :, :m].transpose(1, 2).contiguous()
        matched[b * num_groups:(b + 1) * num_groups, :m] = solve(block)
    return matched


# ------------------------------------------------------------------------------ the workloads

def run_workload(name, spec, device, repeats, warmup, threads, class_cost="focal"):
    outputs, targets = matcher_inputs(spec, device)
    num_groups, queries_per_group = spec["groups"], spec["queries_per_group"]
    matcher = GroupMatcher(num_groups=num_groups, class_cost=class_cost)
    reference = ReferenceGroupMatcher(num_groups=num_groups, class_cost=class_cost)

    padded, sizes = matcher.cost_matrix(outputs, targets)
    batch, _, max_targets = padded.shape
    cost = padded.reshape(batch * num_groups, queries_per_group, max_targets).contiguous()
    counts = [m for m in sizes for _ in range(num_groups)]
    counts_t = torch.tensor(counts, dtype=torch.int64, device=device)
    cost_np = cost.double().cpu().numpy()
    # DETR's batch-wide layout of the very same numbers: image b's targets are columns
    # offset_b..offset_b+M_b of every image's row block (only the diagonal blocks are read).
    flat = torch.cat([padded[:, :, :m] for m in sizes], dim=-1).cpu()

    # Check every contender before timing it.
    expected = scipy_numpy_loop(cost_np, counts)
    expected_totals = totals(cost_np, expected)
    ours = linear_sum_assignment(cost, counts_t).cpu().numpy()
    assert np.array_equal(ours, expected), f"{name}: ours differs from scipy"
    detr = scipy_detr_style(flat, sizes, num_groups, queries_per_group)
    for g in range(num_groups):
        for b, (rows, cols) in enumerate(detr[g]):
            p = b * num_groups + g
            assert np.array_equal(expected[p, cols.numpy()], rows.numpy()), name

    cpu = torch.device("cpu")
    results = {}
    results["ours"] = timed(lambda: linear_sum_assignment(cost, counts_t), device, repeats, warmup)
    results["scipy_detr_style"] = timed(
        lambda: scipy_detr_style(flat, sizes, num_groups, queries_per_group), cpu,
        max(3, repeats // 4), 1)
    results["scipy_numpy_loop"] = timed(
        lambda: scipy_numpy_loop(cost_np, counts), cpu, max(3, repeats // 4), 1)

    # lapx at its best: each batch solver, called per image or once on a constant-padded batch
    # (the padding is prepared outside the timed region).
    padded_np = cost_np.copy()
    pad_columns = np.arange(max_targets)[None, :] >= np.asarray(counts)[:, None]
    padded_np[np.broadcast_to(pad_columns[:, None, :], padded_np.shape)] = 0.0
    best_lapx = None
    for solver_name, solver in lapx_solvers().items():
        for mode, run in (
            ("per image", lambda solver=solver: lapx_per_image(solver, cost_np, counts, num_groups, threads)),
            ("padded batch", lambda solver=solver: lapx_padded(solver, padded_np, counts, threads)),
        ):
            if not np.allclose(totals(cost_np, run()), expected_totals, rtol=1e-9, atol=1e-6):
                print(f"  {name}: lapx {solver_name} ({mode}) disagrees with scipy; not timed")
                continue
            t = timed(run, cpu, repeats, warmup)
            t["solver"] = f"{solver_name}, {mode}"
            if best_lapx is None or t["median_ms"] < best_lapx["median_ms"]:
                best_lapx = t
    if best_lapx is not None:
        results["lapx_best"] = best_lapx

    tla = torch_linear_assignment_solver()
    if tla is not None:
        got = tla_per_image(tla, cost, counts, num_groups).cpu().numpy()
        if np.allclose(totals(cost_np, got), expected_totals, rtol=1e-6, atol=1e-4):
            results["torch_linear_assignment"] = timed(
                lambda: tla_per_image(tla, cost, counts, num_groups), device, repeats, warmup)
        else:
            print(f"  {name}: torch-linear-assignment disagrees with scipy; not timed")

    # (b) the whole matcher, from the model's outputs to DETR's index lists.
    # The fused cost differs from torch's in the last float32 bits: the optimum is checked by
    # its total under the reference cost (tests/test_match_cost.py checks the indices).
    torch_cost_matcher = GroupMatcher(num_groups=num_groups, class_cost=class_cost,
                                      cost_backend="torch")
    ref_idx = reference(outputs, targets)
    for contender in (matcher, torch_cost_matcher):
        idx = contender(outputs, targets)
        got = group_totals(padded, idx, num_groups, queries_per_group)
        want = group_totals(padded, ref_idx, num_groups, queries_per_group)
        assert np.allclose(got, want, rtol=1e-6, atol=1e-4), (
            f"{name}: GroupMatcher (cost {contender.cost_backend}) and the reference disagree")
    def two_steps():
        padded_cost, counts = matcher.cost_matrix(outputs, targets)
        return matcher.assign(padded_cost, counts)

    matcher_results = {
        "ours": timed(lambda: matcher(outputs, targets), device, repeats, warmup),
        "ours_two_steps": timed(two_steps, device, repeats, warmup),
        "ours_cost_tensor": timed(lambda: matcher.cost_matrix(outputs, targets), device, repeats,
                                  warmup),
        "ours_torch_cost": timed(lambda: torch_cost_matcher(outputs, targets), device, repeats,
                                 warmup),
        "reference": timed(lambda: reference(outputs, targets), device, max(3, repeats // 4), 1),
        # Not a matcher: one pass over the logits (torch's sum, vectorised, all threads), the
        # least time any cost computed from them can take on this machine.
        "logits_read": timed(lambda: outputs["pred_logits"].sum(), device, repeats, warmup),
    }

    ours_ms = results["ours"]["median_ms"]
    matcher_ms = matcher_results["ours"]["median_ms"]
    return {
        "problems": int(cost.shape[0]),
        "cost_shape": list(cost.shape),
        "targets_per_image": sizes,
        "assignment": results,
        "assignment_speedup": {k: v["median_ms"] / ours_ms for k, v in results.items()
                               if k != "ours"},
        "matcher": matcher_results,
        "matcher_speedup": matcher_results["reference"]["median_ms"] / matcher_ms,
        "matcher_speedup_over_torch_cost": matcher_results["ours_torch_cost"]["median_ms"]
        / matcher_ms,
        "matcher_over_assignment": matcher_ms / ours_ms,
        # The ratio a matcher that only read its logits once and then solved would reach.
        "logits_read_plus_assignment_over_assignment":
            (matcher_results["logits_read"]["median_ms"] + ours_ms) / ours_ms,
    }


def group_totals(cost, indices, num_groups, queries_per_group):
    """Total cost per (image, group) of DETR index lists under the padded `(B, K*N, M)` cost."""
    totals = np.zeros((len(indices), num_groups))
    for b, (q, t) in enumerate(indices):
        q, t = q.cpu(), t.cpu()
        values = cost[b].cpu().double()[q, t]
        np.add.at(totals[b], (q // queries_per_group).numpy(), values.numpy())
    return totals


def print_table(report):
    cols = ["ours", "scipy_detr_style", "scipy_numpy_loop", "lapx_best", "torch_linear_assignment"]
    head = f"{'workload':12s} {'problems':>8s} " + " ".join(f"{c:>24s}" for c in cols)
    print("\nassignment only, median ms (speed-up of ours over each)")
    print(head)
    for name, r in report["workloads"].items():
        cells = []
        for c in cols:
            t = r["assignment"].get(c)
            if t is None:
                cells.append(f"{'-':>24s}")
            elif c == "ours":
                cells.append(f"{t['median_ms']:24.3f}")
            else:
                cells.append(f"{t['median_ms']:12.3f} ({r['assignment_speedup'][c]:6.1f}x)  ")
        print(f"{name:12s} {r['problems']:8d} " + " ".join(cells))
    print(f"\nwhole matcher (cost + assignment + DETR index lists), class cost "
          f"{report.get('class_cost', 'focal')!r}, median ms; GroupMatcher's speed-up over each, "
          "and its time over its own assignment time")
    print(f"{'workload':12s} {'GroupMatcher':>12s} {'two steps':>10s} {'torch cost':>18s} "
          f"{'reference':>18s} {'/ assignment':>12s} {'logits read':>11s} {'floor':>6s}")
    for name, r in report["workloads"].items():
        m = r["matcher"]
        print(f"{name:12s} {m['ours']['median_ms']:12.3f} {m['ours_two_steps']['median_ms']:10.3f} "
              f"{m['ours_torch_cost']['median_ms']:10.3f} ({r['matcher_speedup_over_torch_cost']:4.1f}x) "
              f"{m['reference']['median_ms']:10.3f} ({r['matcher_speedup']:4.1f}x) "
              f"{r['matcher_over_assignment']:11.1f}x {m['logits_read']['median_ms']:11.3f} "
              f"{r['logits_read_plus_assignment_over_assignment']:5.1f}x")
    print("two steps: the fused cost as a padded tensor, then the solver (GroupMatcher's path on "
          "CUDA or with masks)")
    print("floor: (one pass over the logits + the assignment) / the assignment, the ratio a matcher "
          "reaches if its cost costs no more than reading its input once")
    lapx = [r["assignment"]["lapx_best"].get("solver") for r in report["workloads"].values()
            if "lapx_best" in r["assignment"]]
    if lapx:
        print(f"\nlapx_best: the fastest of lapx's batch solvers per workload ({', '.join(lapx)}), "
              f"{report['threads']} threads")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--workloads", nargs="*", help="subset of workload names")
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="threads for our CPU solver and lapx (default: torch's)")
    parser.add_argument("--class-cost", default="focal", choices=CLASS_COSTS,
                        help="every matcher's class cost (default focal)")
    parser.add_argument("--quick", action="store_true", help="few repeats, no results file")
    parser.add_argument("--out", help="results file (default results/matcher-<machine>.json; "
                                      "-<class cost> added for another class cost)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA device")
    torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats, args.warmup = 5, 1
    try:
        workloads = select_workloads("matcher", args.workloads)
    except ValueError as error:
        parser.error(str(error))

    report = {
        "benchmark": "matcher",
        **common.environment(device),
        "cpu_count": os.cpu_count(),
        "backends": group_detr.backends(),
        "cpu_scan": _ext.lsa_cpu_scan(),
        "cost_isa": _ext.match_cost_isa(),
        "class_cost": args.class_cost,
        "workloads": {},
    }
    try:
        import scipy
        report["versions"]["scipy"] = scipy.__version__
        import lap
        report["versions"]["lapx"] = getattr(lap, "__version__", "?")
    except ImportError:
        pass
    if not lapx_solvers():
        print("lapx is not installed (pip install lapx): its column is left out")
    if torch_linear_assignment_solver() is None:
        print("torch-linear-assignment is not installed: its column is left out")
    for name, spec in workloads.items():
        print(f"running {name} ...", flush=True)
        report["workloads"][name] = run_workload(name, spec, device, args.repeats,
                                                 args.warmup, args.threads, args.class_cost)
    report["load_average_after"] = list(os.getloadavg())
    print_table(report)
    print(f"\nsolver scan {report['cpu_scan']}, cost kernel {report['cost_isa']} "
          f"({report['device_name']}); load average before / after: {report['load_average']} / "
          f"{report['load_average_after']}")
    if not args.quick:
        suffix = "" if args.class_cost == "focal" else f"-{args.class_cost}"
        common.write_results(report, args.out or common.results_path("matcher", report["machine"],
                                                                     suffix=suffix))
    return report


if __name__ == "__main__":
    main()
