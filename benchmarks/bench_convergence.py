"""Does Group DETR converge faster with more groups?  (issue 6; the paper's Table 1 / Figure 1)

Trains the same model on the same synthetic data, with the same seed and schedule, once for
every K in `--groups` (default 1 3 11), evaluates COCO AP on the validation split after every
epoch and records the perturbation / matching distances PD and MD (`group_detr.analysis`, the
paper's eqs. 6 and 7) on a fixed validation batch at step 0 and after every epoch. Writes

    benchmarks/results/convergence-<machine>.json        (--quick: convergence-<machine>-quick.json)
    benchmarks/results/convergence-<machine>.png         AP vs epoch per K; PD / MD vs step

    python benchmarks/bench_convergence.py                 # default: K = 1 3 11, one seed
    python benchmarks/bench_convergence.py --seeds 0 1 2   # mean and spread over seeds
    python benchmarks/bench_convergence.py --epochs 12     # the paper's 12-epoch schedule
    python benchmarks/bench_convergence.py --quick         # smoke test, well under 3 minutes
    # a diagnosis: every run starts from the backbone of a trained detector (a checkpoint of
    # `python -m group_detr demo --num-groups 1 --epochs 12 --seed 100`), at the paper's backbone lr
    python benchmarks/bench_convergence.py --epochs 12 --groups 1 11 --seeds 0 1 \
        --set backbone_weights=runs/pretrain-backbone/checkpoint.pth lr_backbone=1e-5 \
        --out benchmarks/results/convergence-cpu-2core-pretrained-backbone.json

The model is the demo preset (`group_detr.engine.demo_config`: small from-scratch CNN, no encoder
layers, 3 decoder layers, d=128, N=10, lr 5e-4 / backbone 2e-4, batch 8) on the demo's synthetic
data (1500 train / 200 val images, 128 px), for 24 epochs with the lr drop after 22 (why 24 and
not the paper's 12: `default_config`); only K and the seed change between runs. Each run has one
intra-op thread and the demo's one data-loader worker, and `--jobs` (default: one per core) runs
that many at once, largest K first; every run seeds itself, so `--jobs` changes the wall time and
nothing else. Measured wall time on the 2-core CPU machine, two runs at a time: 26 min for
the default, 70 min for `--seeds 0 1 2`, 17 s for `--quick`.
"""
import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

from group_detr import analysis  # noqa: E402
from group_detr.data.coco import collate_fn  # noqa: E402
from group_detr.engine import (DEMO_SYNTHETIC, TrainConfig, build_criterion, build_datasets,  # noqa: E402
                               build_loader, build_model, build_optimizer, demo_config,
                               ensure_synthetic_dataset, evaluate, train_one_epoch)

RESULTS_DIR = os.path.join(HERE, "results")
DEFAULT_GROUPS = (1, 3, 11)


def default_config(**overrides) -> TrainConfig:
    """The benchmark's configuration: the demo preset for 24 epochs (lr drop after 22), quiet.

    24, not the paper's 12: at 12 epochs (2256 steps) this from-scratch model ends at 2-3 AP with
    any K, too close to the floor to show a gain of a few points (README, "Does it reproduce the
    paper?"); `--epochs 12` gives the paper's schedule.
    """
    base = demo_config(epochs=24, data_dir=os.path.join(ROOT, "data", "synthetic"), output_dir=os.path.join(ROOT, "runs", "convergence"),
                       num_threads=1, eval_every=1, print_freq=10**9)
    return dataclasses.replace(base, **overrides)


def quick_config(**overrides) -> TrainConfig:
    """A smoke-test configuration: few images, 2 epochs (well under 3 minutes on 2 cores)."""
    return default_config(**{"max_train_images": 96, "max_val_images": 24, "epochs": 2, **overrides})


def _analysis_batch(val_set, num_images: int):
    """A fixed validation batch (the first `num_images` images) for PD / MD."""
    items = [val_set[i] for i in range(min(num_images, len(val_set)))]
    return collate_fn(items)


def train_and_measure(config: TrainConfig, analysis_images: int = 16, noise: float = 0.1,
                      log: Callable[[str], None] = print) -> Dict:
    """Train one (K, seed) run; AP after every epoch, PD/MD at step 0 and after every epoch."""
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.seed)
    import random

    random.seed(config.seed)
    train_set, val_set = build_datasets(config)
    num_classes = train_set.num_classes
    device = torch.device("cpu")
    model = build_model(config, num_classes).to(device)
    criterion = build_criterion(config, num_classes)
    optimizer = build_optimizer(model, config)
    train_loader = build_loader(train_set, config, train=True)
    val_loader = build_loader(val_set, config, train=False)
    steps_per_epoch = len(train_loader)
    total_steps = config.epochs * steps_per_epoch
    drop_step = max(1, int(round(total_steps * config.lr_drop_fraction)))
    lr_scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[drop_step], gamma=0.1)
    images, mask, targets = _analysis_batch(val_set, analysis_images)
    matcher = analysis.make_matcher(config.num_groups, config.set_cost_class, config.set_cost_bbox,
                                    config.set_cost_giou, config.focal_alpha)

    def distances(step: int) -> Dict:
        d = analysis.query_distances(model, images, mask, targets, matcher=matcher, noise=noise, seed=config.seed)
        return {"step": step, "PD": d["PD"], "MD": d["MD"]}

    record = {"num_groups": config.num_groups, "seed": config.seed, "steps_per_epoch": steps_per_epoch,
              "epochs": [], "distances": [distances(0)]}
    start = time.time()
    for epoch in range(config.epochs):
        epoch_start = time.time()
        losses = train_one_epoch(model, criterion, train_loader, optimizer, lr_scheduler, device, epoch, config)
        train_time = time.time() - epoch_start
        stats, _, _ = evaluate(model, val_loader, val_set, device)
        step = (epoch + 1) * steps_per_epoch
        record["distances"].append(distances(step))
        record["epochs"].append({"epoch": epoch + 1, "step": step, "train_time_s": round(train_time, 2),
                                 "AP": stats["AP"], "AP50": stats["AP50"], "AP75": stats["AP75"],
                                 "loss": losses.get("loss"), "loss_bbox": losses.get("loss_bbox"),
                                 "loss_giou": losses.get("loss_giou"), "loss_ce": losses.get("loss_ce")})
        dist = record["distances"][-1]
        log(f"K={config.num_groups:>2} seed {config.seed} epoch {epoch + 1}/{config.epochs}: "
            f"AP {stats['AP']:.3f} AP50 {stats['AP50']:.3f}  PD {dist['PD']:.4f} MD {dist['MD']:.4f}  "
            f"({time.time() - start:.0f} s)")
    record["wall_s"] = round(time.time() - start, 1)
    analysis_png = os.path.join(config.output_dir, f"reference-points-K{config.num_groups}-seed{config.seed}.png")
    os.makedirs(config.output_dir, exist_ok=True)
    record["reference_points_png"] = os.path.relpath(analysis.plot_reference_points(model, analysis_png), ROOT)
    return record


def _mean_spread(values: Sequence[float]) -> Dict:
    values = [v for v in values if v == v]  # drop NaN
    if not values:
        return {"mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def summarise(runs: List[Dict]) -> Dict:
    """{K: {"AP": [per-epoch mean/spread], "AP50": [...], "final": ...}} over seeds."""
    summary = {}
    for k in sorted({r["num_groups"] for r in runs}):
        mine = [r for r in runs if r["num_groups"] == k]
        epochs = min(len(r["epochs"]) for r in mine)
        summary[str(k)] = {
            metric: [_mean_spread([r["epochs"][e][metric] for r in mine]) for e in range(epochs)]
            for metric in ("AP", "AP50")
        }
        summary[str(k)]["final_PD"] = _mean_spread([r["distances"][-1]["PD"] for r in mine])
        summary[str(k)]["final_MD"] = _mean_spread([r["distances"][-1]["MD"] for r in mine])
    return summary


def _train_and_measure_job(config: TrainConfig, analysis_images: int) -> Dict:
    return train_and_measure(config, analysis_images=analysis_images, log=lambda line: print(line, flush=True))


def run_convergence(config: TrainConfig, groups: Sequence[int] = DEFAULT_GROUPS, seeds: Sequence[int] = (0,),
                    analysis_images: int = 16, log: Callable[[str], None] = print, jobs: int = 1) -> Dict:
    """The benchmark's core: every (seed, K) run with everything else fixed; returns the results dict."""
    run_configs = [dataclasses.replace(config, num_groups=int(k), seed=int(seed),
                                       output_dir=os.path.join(config.output_dir, f"K{k}-seed{seed}"))
                   for seed in seeds for k in groups]
    if jobs <= 1:
        runs = [train_and_measure(c, analysis_images=analysis_images, log=log) for c in run_configs]
    else:
        # Each run seeds itself and owns its process, so running several at once changes the wall
        # time only, not a single number of the results.
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # Largest K first: its runs take longest, so the pool's last minutes are not one long run alone.
        order = sorted(range(len(run_configs)), key=lambda i: -run_configs[i].num_groups)
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {i: pool.submit(_train_and_measure_job, run_configs[i], analysis_images) for i in order}
            runs = [futures[i].result() for i in range(len(run_configs))]
    fixed = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("num_groups", "seed", "output_dir")}
    return {"groups": [int(k) for k in groups], "seeds": [int(s) for s in seeds],
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in fixed.items()},
            "runs": runs, "summary": summarise(runs)}


def plot(results: Dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ap, ax_ap50, ax_dist) = plt.subplots(1, 3, figsize=(14, 4))
    for k, summary in results["summary"].items():
        epochs = list(range(1, len(summary["AP"]) + 1))
        for ax, metric in ((ax_ap, "AP"), (ax_ap50, "AP50")):
            mean = [s["mean"] for s in summary[metric]]
            std = [s["std"] for s in summary[metric]]
            line, = ax.plot(epochs, mean, marker="o", label=f"K={k}")
            if len(results["seeds"]) > 1:
                ax.fill_between(epochs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                color=line.get_color(), alpha=0.2)
    for run in results["runs"]:
        if run["seed"] != results["seeds"][0]:
            continue
        steps = [d["step"] for d in run["distances"]]
        line, = ax_dist.plot(steps, [d["PD"] for d in run["distances"]], linestyle="--", marker=".",
                             label=f"PD K={run['num_groups']}")
        if run["num_groups"] > 1:
            ax_dist.plot(steps, [d["MD"] for d in run["distances"]], color=line.get_color(), marker="o",
                         label=f"MD K={run['num_groups']}")
    for ax, title in ((ax_ap, "COCO AP vs epoch"), (ax_ap50, "AP50 vs epoch")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.legend()
        ax.grid(alpha=0.3)
    ax_dist.set_xlabel("training step")
    ax_dist.set_title(f"PD / MD (seed {results['seeds'][0]})")
    ax_dist.legend(fontsize=7)
    ax_dist.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_overrides(items: Sequence[str]) -> Dict:
    """`["num_queries=30", "lr=2e-4"]` -> {"num_queries": 30, "lr": 2e-4}, typed like TrainConfig."""
    defaults = default_config()
    overrides = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not hasattr(defaults, name) or name in ("num_groups", "seed"):
            raise SystemExit(f"--set expects FIELD=VALUE with a TrainConfig field other than "
                             f"num_groups and seed (use --groups / --seeds), got {item!r}")
        current = getattr(defaults, name)
        if isinstance(current, bool):
            value = text.lower() in ("1", "true", "yes")
        elif isinstance(current, tuple):
            value = tuple(type(current[0])(v) for v in text.split(",")) if current else tuple(text.split(","))
        elif current is None:  # an Optional field: a number if it reads as one
            value = text
            for kind in (int, float):
                try:
                    value = kind(text)
                    break
                except ValueError:
                    pass
        else:
            value = type(current)(text)
        overrides[name] = value
    return overrides


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    from bench_matcher import machine_name

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, nargs="+", default=list(DEFAULT_GROUPS), help="values of K")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (mean and spread over them)")
    parser.add_argument("--epochs", type=int, default=None, help="override the schedule's epochs")
    parser.add_argument("--data-dir", default=None, help="synthetic dataset (written there if missing)")
    parser.add_argument("--analysis-images", type=int, default=16, help="validation images for PD / MD")
    parser.add_argument("--set", metavar="FIELD=VALUE", nargs="+", default=[],
                        help="override TrainConfig fields of the default configuration, e.g. "
                             "--set num_queries=30 lr=2e-4 (for diagnosis runs; write them with --out)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="runs at once, one process each (same results, less wall time; each run "
                             "takes about one core: its one intra-op thread and its data-loader worker); "
                             "default: one per core, at most one per run")
    parser.add_argument("--quick", action="store_true", help="smoke test: few images, 2 epochs, K = 1 3")
    parser.add_argument("--out", default=None, help="results json (default benchmarks/results/convergence-<machine>.json)")
    args = parser.parse_args(argv)

    overrides = parse_overrides(args.set)
    if args.data_dir:
        overrides["data_dir"] = args.data_dir
    if args.epochs:
        overrides["epochs"] = args.epochs
    if args.quick:
        config = quick_config(**overrides)
        groups = args.groups if args.groups != list(DEFAULT_GROUPS) else [1, 3]
        analysis_images = min(args.analysis_images, 8)
    else:
        config = default_config(**overrides)
        groups, analysis_images = args.groups, args.analysis_images
    ensure_synthetic_dataset(config.data_dir, **DEMO_SYNTHETIC)
    machine = machine_name(torch.device("cpu"))
    out = args.out or os.path.join(RESULTS_DIR, f"convergence-{machine}{'-quick' if args.quick else ''}.json")
    start = time.time()
    jobs = args.jobs or min(len(os.sched_getaffinity(0)), len(groups) * len(args.seeds))
    results = run_convergence(config, groups, args.seeds, analysis_images, jobs=jobs)
    results.update({"machine": machine, "quick": args.quick, "jobs": jobs, "wall_s": round(time.time() - start, 1),
                    "torch": torch.__version__})
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    results["png"] = os.path.basename(plot(results, os.path.splitext(out)[0] + ".png"))
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nfinal epoch, mean over {len(args.seeds)} seed(s):")
    for k, s in results["summary"].items():
        print(f"  K={k:>2}: AP {s['AP'][-1]['mean']:.3f} (std {s['AP'][-1]['std']:.3f})  "
              f"AP50 {s['AP50'][-1]['mean']:.3f}  PD {s['final_PD']['mean']:.4f}  MD {s['final_MD']['mean']:.4f}")
    print(f"wrote {out} and its .png in {results['wall_s']:.0f} s")
    return results


if __name__ == "__main__":
    main()
