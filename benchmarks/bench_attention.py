"""Grouped self-attention: the Triton kernel vs the two ways DETR codebases do it.

    python benchmarks/bench_attention.py [--device auto|cpu|cuda] [--repeats N] [--quick]

For every attention workload of workloads.json, on identical inputs `(B, H, L, D)`:
  "masked"  dense (L, L) boolean mask + SDPA (the mask built once, outside the timing, as DETR
            codebases build it once per step);
  "folded"  groups folded into the batch + SDPA (only for equal groups: skipped with denoising);
  "triton"  our kernel through `grouped_attention(backend="triton")`, the path users get (CUDA
            only: on a CPU-only machine the reference paths are timed and the kernel is reported
            as not measured).
Each path is timed forward (no grad) and forward+backward; the outputs and gradients of every
path are checked against "masked" before timing. Medians and ratios are printed as a table and
written to results/attention-<device>.json, with a bar chart in results/attention-<device>.png
when matplotlib is installed.

On CPU the batch defaults to 1 and the repeats to 3, which keeps the run to about a minute on
two cores (dense attention over L = 10100 queries is slow there); the JSON records the shapes
actually run.
"""
import argparse
import json
import os
import platform
import re
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from workloads import load_workloads  # noqa: E402

from group_detr.attention import folded_attention, grouped_attention, masked_attention  # noqa: E402
from group_detr.layout import QueryLayout  # noqa: E402

PATHS = ("masked", "folded", "triton")
PASSES = ("fwd", "fwd+bwd")
# relative error ||path - masked|| / ||masked|| allowed per dtype (outputs and gradients)
REL_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ------------------------------------------------------------------------------------------------
# device and workloads
# ------------------------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    """Short machine name for file names: cpu-<cores>core, or the GPU model (h100, h200, a100)."""
    if device.type == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return f"cpu-{cores}core"
    words = torch.cuda.get_device_name(device).lower().replace("nvidia", "").split()
    words = [w for w in words if w not in ("geforce", "tesla")]
    if len(words) > 1 and words[0] in ("rtx", "gtx", "quadro"):  # "rtx 4090" -> "rtx4090"
        words = [words[0] + words[1]] + words[2:]
    return re.sub(r"[^a-z0-9]+", "-", words[0] if words else "cuda")


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:  # Linux: the CPU model
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def layout_of(spec) -> QueryLayout:
    return QueryLayout(num_groups=spec["groups"], queries_per_group=spec["queries_per_group"],
                       num_denoising=spec.get("denoising", 0),
                       denoising_groups=spec.get("denoising_groups", 0))


def inputs(spec, layout, batch, dtype, device):
    """q, k, v `(B, H, L, D)` (leaves that require grad) and grad_out, from the workload seed."""
    generator = torch.Generator().manual_seed(spec.get("seed", 0))
    shape = (batch, spec["heads"], layout.total_queries, spec["head_dim"])
    q, k, v, grad_out = (torch.randn(shape, generator=generator).to(device, dtype)
                         for _ in range(4))
    return [t.requires_grad_() for t in (q, k, v)], grad_out


def path_functions(layout, device, has_triton):
    """name -> f(q, k, v) for the paths that can run this layout on this device."""
    mask = layout.dense_mask(device)
    paths = {"masked": lambda q, k, v: masked_attention(q, k, v, layout, mask=mask)}
    if layout.is_equal_groups:
        paths["folded"] = lambda q, k, v: folded_attention(q, k, v, layout)
    if has_triton:
        paths["triton"] = lambda q, k, v: grouped_attention(q, k, v, layout, backend="triton")
    return paths


# ------------------------------------------------------------------------------------------------
# checking and timing
# ------------------------------------------------------------------------------------------------
def forward_backward(fn, qkv, grad_out):
    out = fn(*qkv)
    return (out,) + torch.autograd.grad(out, qkv, grad_out)


def relative_error(actual, expected) -> float:
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def check(paths, qkv, grad_out, dtype):
    """Max relative error of each path's out, dQ, dK, dV against "masked"; raises if too big."""
    expected = forward_backward(paths["masked"], qkv, grad_out)
    errors = {}
    for name, fn in paths.items():
        actual = forward_backward(fn, qkv, grad_out)
        errors[name] = max(relative_error(a, e) for a, e in zip(actual, expected))
        if not errors[name] <= REL_TOLERANCE[dtype]:
            raise AssertionError(f"{name} disagrees with masked: relative error {errors[name]:.2e}"
                                 f" > {REL_TOLERANCE[dtype]:.0e}")
    return errors


def timed(run, device, repeats, warmup):
    """Milliseconds of each of `repeats` calls of run(), after `warmup` untimed calls."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            run()
            times.append((time.perf_counter() - start) * 1e3)
    return times


def bench_workload(spec, batch, dtype, device, repeats, warmup, has_triton):
    layout = layout_of(spec)
    qkv, grad_out = inputs(spec, layout, batch, dtype, device)
    paths = path_functions(layout, device, has_triton)
    errors = check(paths, qkv, grad_out, dtype)  # also the first (compile / autotune) calls
    times = {}
    for name, fn in paths.items():
        def forward(fn=fn):
            with torch.no_grad():
                fn(*qkv)
        times[name] = {
            "fwd": timed(forward, device, repeats, warmup),
            "fwd+bwd": timed(lambda fn=fn: forward_backward(fn, qkv, grad_out), device, repeats,
                             warmup),
        }
    medians = {name: {p: statistics.median(t[p]) for p in PASSES} for name, t in times.items()}
    return {
        "spec": spec, "shape": list(qkv[0].shape), "layout": repr(layout),
        "visible_fraction": layout.visible_fraction(), "max_rel_error_vs_masked": errors,
        "times_ms": times, "median_ms": medians, "speedup": speedups(medians),
    }


def speedups(medians):
    """Ratios of medians: each path over "masked", and triton over folded."""
    result = {}
    for p in PASSES:
        base = medians["masked"][p]
        result[p] = {f"{name}_vs_masked": base / m[p] for name, m in medians.items()
                     if name != "masked"}
        if "triton" in medians and "folded" in medians:
            result[p]["triton_vs_folded"] = medians["folded"][p] / medians["triton"][p]
    return result


# ------------------------------------------------------------------------------------------------
# reporting
# ------------------------------------------------------------------------------------------------
def goals(results):
    """The issue's targets on a GPU: cond_detr_k11 fwd+bwd >= 0.8*K x masked and >= folded;
    dino_k11_dn fwd+bwd >= 1.5x masked."""
    checks = []
    if "cond_detr_k11" in results and "triton" in results["cond_detr_k11"]["median_ms"]:
        r = results["cond_detr_k11"]
        need = 0.8 * r["spec"]["groups"]
        got = r["speedup"]["fwd+bwd"]["triton_vs_masked"]
        checks.append((f"cond_detr_k11 fwd+bwd triton vs masked >= {need:.1f}x", got, got >= need))
        got = r["speedup"]["fwd+bwd"]["triton_vs_folded"]
        checks.append(("cond_detr_k11 fwd+bwd triton vs folded >= 1.0x", got, got >= 1.0))
    if "dino_k11_dn" in results and "triton" in results["dino_k11_dn"]["median_ms"]:
        got = results["dino_k11_dn"]["speedup"]["fwd+bwd"]["triton_vs_masked"]
        checks.append(("dino_k11_dn fwd+bwd triton vs masked >= 1.5x", got, got >= 1.5))
    return [{"goal": g, "measured": round(m, 3), "met": bool(ok)} for g, m, ok in checks]


def print_table(results):
    def ms(value):
        return f"{value:10.2f}" if value is not None else f"{'-':>10}"

    def ratio(value):
        return f"{value:8.2f}x" if value is not None else f"{'-':>9}"

    header = (f"{'workload':<15} {'pass':<8} {'shape (B,H,L,D)':<22}"
              + "".join(f"{name + ' ms':>11}" for name in PATHS)
              + f" {'fold/mask':>9} {'trit/mask':>9} {'trit/fold':>9}")
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        for p in PASSES:
            medians, ratios = r["median_ms"], r["speedup"][p]
            print(f"{name:<15} {p:<8} {str(tuple(r['shape'])):<22}"
                  + "".join(" " + ms(medians.get(path, {}).get(p)) for path in PATHS)
                  + " " + ratio(ratios.get("folded_vs_masked"))
                  + " " + ratio(ratios.get("triton_vs_masked"))
                  + " " + ratio(ratios.get("triton_vs_folded")))
    print("medians in ms; ratios are speedups: fold/mask = masked ms / folded ms, "
          "trit/mask = masked ms / triton ms, trit/fold = folded ms / triton ms")


def plot(results, title, path):
    """Bar chart of median times per workload, one panel per pass (log scale)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install group-detr[plot])")
        return None
    names = list(results)
    fig, axes = plt.subplots(1, len(PASSES), figsize=(5 + 2 * len(names), 4.5), squeeze=False)
    width = 0.8 / len(PATHS)
    for ax, p in zip(axes[0], PASSES):
        for i, path_name in enumerate(PATHS):
            xs = [j + (i - (len(PATHS) - 1) / 2) * width for j in range(len(names))]
            ys = [results[n]["median_ms"].get(path_name, {}).get(p) for n in names]
            bars = [(x, y) for x, y in zip(xs, ys) if y is not None]
            if bars:
                ax.bar([x for x, _ in bars], [y for _, y in bars], width, label=path_name)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=20)
        ax.set_yscale("log")
        ax.set_ylabel("median ms (log)")
        ax.set_title(p)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per path and pass (default 20 on CUDA, 3 on CPU)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: batch 1, 1 repeat, results written to *-quick.json")
    parser.add_argument("--batch", type=int, default=None,
                        help="override every workload's batch (default: the workload's on CUDA, "
                             "1 on CPU)")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                        help="default bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--workloads", nargs="*", default=None, help="names (default: all)")
    parser.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    device = torch.device("cuda" if args.device == "cuda" or (
        args.device == "auto" and torch.cuda.is_available()) else "cpu")
    on_cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if on_cuda else torch.float32)
    repeats = 1 if args.quick else (args.repeats or (20 if on_cuda else 3))
    warmup = 3 if on_cuda else 0  # on CPU the checking calls are the warm-up
    batch = 1 if args.quick else (args.batch or (None if on_cuda else 1))

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    has_triton = on_cuda and triton_version is not None
    if not has_triton:
        why = "no CUDA device" if not on_cuda else "triton is not installed"
        print(f"the Triton kernel needs CUDA and triton ({why}): timing the reference paths "
              "only; 'triton' is not measured")

    specs = load_workloads("attention")
    names = args.workloads or list(specs)
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise SystemExit(f"unknown workloads {unknown}; known: {list(specs)}")

    name = device_name(device)
    print(f"device {name} ({device_description(device)}), {dtype}, repeats {repeats}, torch "
          f"{torch.__version__}, triton {triton_version}")
    results = {}
    for workload in names:
        spec = specs[workload]
        results[workload] = bench_workload(spec, batch or spec["batch"], dtype, device, repeats,
                                           warmup, has_triton)
        print(f"  {workload}: done")
    print()
    print_table(results)
    goal_checks = goals(results)
    for g in goal_checks:
        print(f"goal {g['goal']}: {g['measured']}x -> {'met' if g['met'] else 'NOT met'}")

    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, f"attention-{name}" + ("-quick" if args.quick else ""))
    report = {
        "benchmark": "attention", "device": name, "device_description": device_description(device),
        "dtype": str(dtype).replace("torch.", ""), "repeats": repeats, "warmup": warmup,
        "quick": args.quick, "torch": torch.__version__, "triton": triton_version,
        "threads": torch.get_num_threads(),
        "triton_measured": has_triton,
        "note": None if has_triton else "the Triton kernel needs CUDA: only the reference paths "
                                         "were timed",
        "goals": goal_checks, "workloads": results,
    }
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {stem}.json")
    if plot(results, f"grouped self-attention, {name}, {report['dtype']}", stem + ".png"):
        print(f"wrote {stem}.png")
    return report


if __name__ == "__main__":
    main()
