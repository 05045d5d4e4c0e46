"""Resource table of the Triton attention kernels, compiled ahead of time for sm_80 and sm_90.

    python scripts/kernel_resources.py [--processes 2] [--candidates] [--head-dims 64 128]
                                       [--dtypes bfloat16 float32] [--out PATH]

Compiles every configuration the launcher picks (group_detr.kernels.grouped_attention
.launch_config) for every head_dim, dtype and dropout setting, for sm_80 (A100) and sm_90
(H100 / H200), on this machine without a GPU (group_detr.kernels.aot), and prints registers,
stack frame, spill bytes and shared memory per kernel and configuration. `--candidates` also
compiles 12 candidate configurations per kernel (inner block 16/32/64 x warps 4/8 x stages 1/2;
about 12x longer, so narrow it with --head-dims / --dtypes), the grid the launcher's choices were
picked from (written to kernel_resources-aot-candidates.json). Writes
benchmarks/results/kernel_resources-aot.json (a generated file: rerun, never edit).
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout without installing

from group_detr.kernels import DTYPES, HEAD_DIMS, aot  # noqa: E402

CANDIDATES = [(block, warps, stages) for block in (16, 32, 64) for warps in (4, 8)
              for stages in (1, 2)]


def print_table(rows):
    header = (f"{'kernel':<10} {'target':<6} {'dtype':<9} {'D':>4} {'drop':<5} {'block':>5} "
              f"{'warps':>5} {'stages':>6} {'regs':>5} {'stack':>6} {'spill st':>8} "
              f"{'spill ld':>8} {'smem KB':>8} {'compile s':>9} chosen")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['kernel']:<10} {r['target']:<6} {r['dtype']:<9} {r['head_dim']:>4} "
              f"{str(r['dropout']):<5} {r['block']:>5} {r['num_warps']:>5} {r['num_stages']:>6} "
              f"{r['registers']:>5} {r['stack_bytes']:>6} {r['spill_store_bytes']:>8} "
              f"{r['spill_load_bytes']:>8} {r['shared_bytes'] / 1024:>8.1f} "
              f"{r['compile_s']:>9.1f} {'*' if r['chosen'] else ''}")


def summary(rows):
    """Per target and dtype: the launcher's choices, their worst registers / shared memory /
    spills, and how many candidate configurations spill."""
    result = {}
    for r in rows:
        group = result.setdefault(f"{r['target']} {r['dtype']}", {
            "chosen": 0, "chosen_spilling": 0, "chosen_max_registers": 0,
            "chosen_max_shared_bytes": 0, "candidates": 0, "candidates_spilling": 0,
            "candidates_over_shared_limit": 0})
        spills = r["spill_store_bytes"] + r["spill_load_bytes"] > 0
        if r["chosen"]:
            group["chosen"] += 1
            group["chosen_spilling"] += spills
            group["chosen_max_registers"] = max(group["chosen_max_registers"], r["registers"])
            group["chosen_max_shared_bytes"] = max(group["chosen_max_shared_bytes"],
                                                   r["shared_bytes"])
        else:
            group["candidates"] += 1
            group["candidates_spilling"] += spills
            group["candidates_over_shared_limit"] += r["shared_bytes"] > r["shared_limit_bytes"]
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2, help="parallel compile workers")
    parser.add_argument("--candidates", action="store_true",
                        help="also compile 12 candidate configurations per kernel")
    parser.add_argument("--head-dims", type=int, nargs="*", default=list(HEAD_DIMS))
    parser.add_argument("--dtypes", nargs="*", default=[str(t)[6:] for t in DTYPES])
    parser.add_argument("--out", default=None, help="default benchmarks/results/"
                        "kernel_resources-aot.json (-aot-candidates.json with --candidates)")
    args = parser.parse_args(argv)
    import torch
    import triton
    from group_detr.kernels.grouped_attention import LaunchConfig

    configs = [LaunchConfig(*c) for c in CANDIDATES] if args.candidates else None
    if args.out is None:
        args.out = os.path.join(ROOT, "benchmarks", "results", "kernel_resources-aot"
                                + ("-candidates" if configs else "") + ".json")
    keys = aot.keys(args.head_dims, [getattr(torch, name) for name in args.dtypes])
    start = time.perf_counter()
    rows = aot.compile_all(keys, processes=args.processes, configs=configs)
    seconds = time.perf_counter() - start
    if configs:  # a candidate equal to the launcher's choice is listed once, as chosen
        seen, unique = set(), []
        for r in sorted(rows, key=lambda r: not r["chosen"]):
            key = tuple(r[k] for k in ("kernel", "head_dim", "dtype", "dropout", "target",
                                       "block", "num_warps", "num_stages"))
            if key not in seen:
                seen.add(key)
                unique.append(r)
        rows = unique
    rows.sort(key=lambda r: (r["target"], r["dtype"], r["head_dim"], r["dropout"], r["kernel"],
                             not r["chosen"], r["block"], r["num_warps"], r["num_stages"]))
    print_table(rows)
    found = aot.problems(rows)
    print(f"\n{len(rows)} compiles in {seconds:.0f} s with {args.processes} processes; "
          f"problems in the launcher's choices: {len(found)}")
    for line in found:
        print("  " + line)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip() or None
    except OSError:
        commit = None
    report = {
        "benchmark": "kernel_resources", "generated_by": "scripts/kernel_resources.py",
        "triton": triton.__version__, "python": platform.python_version(), "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average": list(os.getloadavg()), "processes": args.processes,
        "wall_s": round(seconds, 1), "candidates": bool(configs),
        "aot_shape": {"batch": aot.AOT_BATCH, "heads": aot.AOT_HEADS,
                      "layout": repr(aot.AOT_LAYOUT)},
        "shared_limit_bytes": {f"sm_{c}": limit for c, limit in aot.TARGETS.items()},
        "problems": found, "summary": summary(rows), "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
