"""Grouped self-attention: the Triton kernel vs FlexAttention and the two ways DETR codebases do it.

    python benchmarks/bench_attention.py [--device auto|cpu|cuda] [--repeats N] [--quick]
                                         [--paths masked folded flex triton]

For every attention workload of workloads.json, on identical inputs `(B, H, L, D)`:
  "masked"  dense (L, L) boolean mask + SDPA (the mask built once, outside the timing, as DETR
            codebases build it once per step);
  "folded"  groups folded into the batch + SDPA (only for equal groups: skipped with denoising);
  "flex"    torch's FlexAttention, compiled, with the layout's block mask (the block mask built
            once, outside the timing; the first call, which compiles, is timed apart as
            first_call_s). torch 2.13 has no FlexAttention backward on the CPU: there only its
            forward is timed, and the JSON says so;
  "triton"  our kernel through `grouped_attention(backend="triton")`, the path users get (CUDA
            only: on a CPU-only machine the reference paths are timed and the kernel is reported
            as not measured).
Each path is timed forward (no grad) and forward+backward; the outputs and gradients of every
path are checked against "masked" before timing (those are the first, compiling calls). Medians
and ratios are printed as a table and written to results/attention-<device>.json, with a bar
chart in results/attention-<device>.png when matplotlib is installed.

On CPU the batch defaults to 1 and the repeats to 3, which keeps the reference paths to about a
minute on two cores (dense attention over L = 10100 queries is slow there) and flex's compiles
(one per shape) to a few more; the JSON records the shapes actually run.
"""
import argparse
import os
import statistics
import time

import torch

import common
from workloads import select_workloads

from group_detr.attention import (flex_attention, flex_block_mask, folded_attention,
                                  grouped_attention, masked_attention)
from group_detr.layout import QueryLayout

PATHS = ("masked", "folded", "flex", "triton")
PASSES = ("fwd", "fwd+bwd")
# speedup columns: (numerator path, denominator path) -> denominator ms / numerator ms
RATIOS = (("folded", "masked"), ("flex", "masked"), ("triton", "masked"), ("triton", "folded"),
          ("triton", "flex"), ("flex", "folded"))
# relative error ||path - masked|| / ||masked|| allowed per dtype (outputs and gradients)
REL_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ------------------------------------------------------------------------------------------------
# workloads
# ------------------------------------------------------------------------------------------------
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


def path_functions(layout, device, has_triton, wanted=PATHS):
    """name -> f(q, k, v) for the paths of `wanted` that can run this layout on this device."""
    mask = layout.dense_mask(device)
    paths = {"masked": lambda q, k, v: masked_attention(q, k, v, layout, mask=mask)}
    if layout.is_equal_groups:
        paths["folded"] = lambda q, k, v: folded_attention(q, k, v, layout)
    flex_block_mask(layout, device)  # built (and cached) outside the timing, like the mask
    paths["flex"] = lambda q, k, v: flex_attention(q, k, v, layout)
    if has_triton:
        paths["triton"] = lambda q, k, v: grouped_attention(q, k, v, layout, backend="triton")
    return {name: fn for name, fn in paths.items() if name in wanted or name == "masked"}


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
    """Each path's max relative error of out, dQ, dK, dV against "masked" (raises if too big),
    the seconds of its first call (compile / autotune), and the paths that have no backward here
    (FlexAttention on the CPU in torch 2.13) with the reason."""
    expected = forward_backward(paths["masked"], qkv, grad_out)
    errors, first_call_s, no_backward = {}, {}, {}
    for name, fn in paths.items():
        start = time.perf_counter()
        with torch.no_grad():
            out = fn(*qkv)
        first_call_s[name] = time.perf_counter() - start
        try:
            actual = forward_backward(fn, qkv, grad_out)
        except NotImplementedError as exc:
            no_backward[name] = str(exc).splitlines()[0]
            actual = (out,)
        errors[name] = max(relative_error(a, e) for a, e in zip(actual, expected))
        if not errors[name] <= REL_TOLERANCE[dtype]:
            raise AssertionError(f"{name} disagrees with masked: relative error {errors[name]:.2e}"
                                 f" > {REL_TOLERANCE[dtype]:.0e}")
    return errors, first_call_s, no_backward


def bench_workload(spec, batch, dtype, device, repeats, warmup, has_triton, wanted):
    layout = layout_of(spec)
    qkv, grad_out = inputs(spec, layout, batch, dtype, device)
    paths = path_functions(layout, device, has_triton, wanted)
    errors, first_call_s, no_backward = check(paths, qkv, grad_out, dtype)
    times = {}
    for name, fn in paths.items():
        def forward(fn=fn):
            with torch.no_grad():
                fn(*qkv)
        times[name] = {"fwd": common.time_calls(forward, device, repeats, warmup,
                                                cuda_events=True)}
        if name not in no_backward:
            times[name]["fwd+bwd"] = common.time_calls(
                lambda fn=fn: forward_backward(fn, qkv, grad_out), device, repeats, warmup,
                cuda_events=True)
    medians = {name: {p: statistics.median(t[p]) for p in t} for name, t in times.items()}
    return {
        "spec": spec, "shape": list(qkv[0].shape), "layout": repr(layout),
        "visible_fraction": layout.visible_fraction(), "max_rel_error_vs_masked": errors,
        "first_call_s": first_call_s, "no_backward": no_backward,
        "times_ms": times, "median_ms": medians, "speedup": speedups(medians),
    }


def speedups(medians):
    """Per pass, "<a>_vs_<b>" = b's median / a's median for each pair of RATIOS both measured."""
    return {p: {f"{a}_vs_{b}": medians[b][p] / medians[a][p] for a, b in RATIOS
                if p in medians.get(a, {}) and p in medians.get(b, {})}
            for p in PASSES}


# ------------------------------------------------------------------------------------------------
# reporting
# ------------------------------------------------------------------------------------------------
def goals(results):
    """The issue's targets on a GPU: cond_detr_k11 fwd+bwd >= 0.8*K x masked and >= folded;
    dino_k11_dn fwd+bwd >= 1.5x masked; and on every workload triton at least flex's speed (its
    strongest peer)."""
    checks = []

    def ratio(name, p, key):
        return results.get(name, {}).get("speedup", {}).get(p, {}).get(key)

    got = ratio("cond_detr_k11", "fwd+bwd", "triton_vs_masked")
    if got is not None:
        need = 0.8 * results["cond_detr_k11"]["spec"]["groups"]
        checks.append((f"cond_detr_k11 fwd+bwd triton vs masked >= {need:.1f}x", got, got >= need))
    got = ratio("cond_detr_k11", "fwd+bwd", "triton_vs_folded")
    if got is not None:
        checks.append(("cond_detr_k11 fwd+bwd triton vs folded >= 1.0x", got, got >= 1.0))
    got = ratio("dino_k11_dn", "fwd+bwd", "triton_vs_masked")
    if got is not None:
        checks.append(("dino_k11_dn fwd+bwd triton vs masked >= 1.5x", got, got >= 1.5))
    for name in results:
        for p in PASSES:
            got = ratio(name, p, "triton_vs_flex")
            if got is not None:
                checks.append((f"{name} {p} triton vs flex >= 1.0x", got, got >= 1.0))
    return [{"goal": g, "measured": round(m, 3), "met": bool(ok)} for g, m, ok in checks]


def print_table(results):
    def ms(value):
        return f"{value:10.2f}" if value is not None else f"{'-':>10}"

    def ratio(value):
        return f"{value:8.2f}x" if value is not None else f"{'-':>9}"

    header = (f"{'workload':<15} {'pass':<8} {'shape (B,H,L,D)':<22}"
              + "".join(f"{name + ' ms':>11}" for name in PATHS)
              + "".join(f" {a[:4] + '/' + b[:4]:>9}" for a, b in RATIOS))
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        for p in PASSES:
            medians, ratios = r["median_ms"], r["speedup"][p]
            print(f"{name:<15} {p:<8} {str(tuple(r['shape'])):<22}"
                  + "".join(" " + ms(medians.get(path, {}).get(p)) for path in PATHS)
                  + "".join(" " + ratio(ratios.get(f"{a}_vs_{b}")) for a, b in RATIOS))
    print("medians in ms; ratios are speedups: a/b = b's ms / a's ms (> 1: a is faster)")
    for name, r in results.items():
        compiles = ", ".join(f"{path} {s:.1f} s" for path, s in r["first_call_s"].items())
        print(f"first calls (compile / autotune included) {name}: {compiles}")
        for path, why in r["no_backward"].items():
            print(f"  {path} has no backward here: {why}")


def plot(results, title, path):
    """Bar chart of median times per workload, one panel per pass (log scale)."""
    plt = common.pyplot()
    if plt is None:
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
    return common.save_figure(fig, path)


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
    parser.add_argument("--paths", nargs="*", default=list(PATHS), choices=PATHS,
                        help="contenders (masked always runs: it is the reference)")
    parser.add_argument("--out-dir", default=common.RESULTS_DIR)
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

    try:
        specs = select_workloads("attention", args.workloads)
    except ValueError as error:
        raise SystemExit(str(error)) from None

    environment = common.environment(device)
    name = environment["machine"]
    print(f"device {name} ({environment['device_name']}), {dtype}, repeats {repeats}, torch "
          f"{torch.__version__}, triton {triton_version}, load {environment['load_average']}")
    results = {}
    for workload, spec in specs.items():
        results[workload] = bench_workload(spec, batch or spec["batch"], dtype, device, repeats,
                                           warmup, has_triton, args.paths)
        print(f"  {workload}: done")
    print()
    print_table(results)
    goal_checks = goals(results)
    for g in goal_checks:
        print(f"goal {g['goal']}: {g['measured']}x -> {'met' if g['met'] else 'NOT met'}")

    path = common.results_path("attention", name, quick=args.quick, directory=args.out_dir)
    report = {
        "benchmark": "attention", **environment, "device": name,
        "device_description": environment["device_name"],
        "dtype": str(dtype).replace("torch.", ""), "repeats": repeats, "warmup": warmup,
        "quick": args.quick, "torch": torch.__version__, "triton": triton_version,
        "paths": ["masked"] + [p for p in args.paths if p != "masked"],
        "triton_measured": has_triton,
        "note": None if has_triton else "the Triton kernel needs CUDA: only the reference paths "
                                         "and flex were timed",
        "load_average_after": list(os.getloadavg()),
        "goals": goal_checks, "workloads": results,
    }
    common.write_results(report, path, indent=1)
    plot(results, f"grouped self-attention, {name}, {report['dtype']}",
         path[:-len(".json")] + ".png")
    return report


if __name__ == "__main__":
    main()
