"""Does Group DETR converge faster with more groups?  (the paper's Table 1 and Figures 3-4)

Trains the same model on the same synthetic data, with the same seed and schedule, once for
every K in `--groups` (default 1 2 3 5 7 11) and every seed in `--seeds` (default 0 1 2) through `group_detr.engine.train`, evaluating COCO AP on
the validation split after every epoch; a `ConvergenceRecorder` callback records the paper's
distances (`group_detr.analysis`): PD (eq. 6, nearest-query distance between the groups' query
positions) and MD (eq. 7, distance between the queries of different groups matched to the same
gt object, on a fixed validation batch) at step 0 and after every epoch, and the final query
positions. Writes

    benchmarks/results/convergence-<machine>.json        (--quick: convergence-<machine>-quick.json)
    benchmarks/results/convergence-<machine>.png         AP / AP50 vs epoch per K; Figure 4: PD, MD vs step
    benchmarks/results/convergence-<machine>-query-positions.png   Figure 3: largest K, one colour per group

    python benchmarks/bench_convergence.py                 # default: K = 1 2 3 5 7 11, seeds 0 1 2
    python benchmarks/bench_convergence.py --groups 1 11 --seeds 0   # one seed, two K
    python benchmarks/bench_convergence.py --epochs 7      # the demo's shorter schedule
    python benchmarks/bench_convergence.py --quick         # smoke test, well under 3 minutes
    # the paper's Table 2 in miniature: groups beside DINO's contrastive denoising
    python benchmarks/bench_convergence.py --groups 1 3 --denoising-queries 0 12 \
        --out benchmarks/results/denoising-cpu-2core.json
    # a diagnosis: every run starts from the backbone of a trained detector (a checkpoint of
    # `python -m group_detr demo --num-groups 1 --epochs 12 --seed 100`), at the paper's backbone lr
    python benchmarks/bench_convergence.py --epochs 12 --groups 1 11 --seeds 0 1 \
        --set backbone_weights=runs/pretrain-backbone/checkpoint.pth lr_backbone=1e-5 \
        --out benchmarks/results/convergence-cpu-2core-pretrained-backbone.json

The model is the demo's (`group_detr.config.demo_config`, the easy synthetic preset, written to
data/synthetic-<preset> when missing) trained for the paper's 12 epochs with the lr drop at 11/12
(the demo's earlier 7 epochs left K = 1 at AP 0.19 +- 0.04 over seeds 0, 1,
below a working detector; 12 epochs give it 0.39 +- 0.05); only K and the seed change between
runs. `--denoising-queries` adds a second axis, DINO's contrastive denoising with that budget
(0 = off; `TrainConfig.denoising_queries`), and the summary then also pairs the runs by seed:
each K against K=1 at the same denoising, each denoising budget against none at the same K.
Each run has one intra-op thread and loads its data in its own
process (no worker), and `--jobs` (default: one per core) runs that many at once, largest K
first; every run seeds itself, so `--jobs` changes the wall time and nothing else.
"""
import argparse
import dataclasses
import os
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

import common
from group_detr import analysis
from group_detr.config import TrainConfig, demo_config
from group_detr.data.coco import collate_fn
from group_detr.data.synthetic import ensure_synthetic_dataset
from group_detr.engine import Callback, TrainingRun, build_matcher, train

DEFAULT_GROUPS = (1, 2, 3, 5, 7, 11)
DEFAULT_DENOISING = (0,)
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_EPOCHS = 12  # the paper's schedule (Table 1: 12 epochs); why not the demo's 10: the docstring
DISTANCES = ("PD", "PD_first", "MD", "MD_first")
FINAL_METRICS = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large")  # COCO stats kept per epoch


def default_config(**overrides) -> TrainConfig:
    """The benchmark's configuration: the demo's model and data, DEFAULT_EPOCHS epochs, one
    thread per run, quiet."""
    demo = demo_config(**{k: v for k, v in overrides.items() if k == "synthetic"})  # data_dir follows the preset
    base = dataclasses.replace(demo, epochs=DEFAULT_EPOCHS, num_threads=1, num_workers=0, data_dir=os.path.join(common.ROOT, demo.data_dir),
                               output_dir=os.path.join(common.ROOT, "runs", "convergence"),
                               eval_every=1, print_freq=10**9, resume=False)
    return dataclasses.replace(base, **overrides)


def quick_config(**overrides) -> TrainConfig:
    """A smoke-test configuration: few images, 2 epochs (well under 3 minutes on 2 cores)."""
    return default_config(**{"max_train_images": 96, "max_val_images": 24, "epochs": 2, **overrides})


class ConvergenceRecorder(Callback):
    """Collects one run's curves from `engine.train`: AP per epoch (train evaluates every epoch,
    eval_every=1) and PD / MD (`group_detr.analysis`) on a fixed validation batch at step 0 and
    after every epoch; at the end the query positions (for Figure 3)."""

    def __init__(self, analysis_images: int, log: Callable[[str], None]):
        self.analysis_images, self.log = analysis_images, log
        self.record: Dict = {}

    def _distances(self, run: TrainingRun, step: int) -> Dict:
        d = analysis.query_distances(run.model, self.images, self.mask, self.targets, self.matcher)
        return {"step": step, **{name: d[name] for name in DISTANCES}}

    def on_train_start(self, run: TrainingRun) -> None:
        val_set = run.val_set
        items = [val_set[i] for i in range(min(self.analysis_images, len(val_set)))]
        images, mask, self.targets = collate_fn(items)
        self.images, self.mask = images.to(run.device), mask.to(run.device)
        self.matcher = build_matcher(run.config)
        self.start = time.time()
        self.record = {"num_groups": run.config.num_groups, "denoising_queries": run.config.denoising_queries,
                       "seed": run.config.seed,
                       "steps_per_epoch": run.steps_per_epoch, "epochs": [], "distances": [self._distances(run, 0)]}

    def on_epoch_end(self, run: TrainingRun, record: Dict) -> None:
        distances = self._distances(run, record["step"])
        self.record["distances"].append(distances)
        self.record["epochs"].append({
            "epoch": record["epoch"], "step": record["step"], "train_time_s": record["epoch_time_s"],
            # NaN on the epochs train() does not evaluate (eval_every > 1)
            **{name: record.get(f"val_{name}", float("nan")) for name in FINAL_METRICS},
            **{name: record.get(f"train_{name}") for name in ("loss", "loss_bbox", "loss_giou", "loss_ce",
                                                             "loss_ce_dn", "loss_bbox_dn", "loss_giou_dn",
                                                             "denoising_layouts")
               if f"train_{name}" in record}})
        record.update({name: distances[name] for name in DISTANCES})  # into the run's log.jsonl too
        ap = self.record["epochs"][-1]
        self.log(f"{run_label(run.config.num_groups, run.config.denoising_queries)} seed {run.config.seed} epoch {record['epoch']}/{run.config.epochs}: "
                 f"AP {ap['AP']:.3f} AP50 {ap['AP50']:.3f}  PD {distances['PD']:.4f} MD {distances['MD']:.4f}  "
                 f"({time.time() - self.start:.0f} s)")

    def on_train_end(self, run: TrainingRun, result: Dict) -> None:
        self.record["wall_s"] = round(time.time() - self.start, 1)
        self.record["query_positions"] = analysis.query_positions(run.model).tolist()


def train_and_measure(config: TrainConfig, analysis_images: int = 16, log: Callable[[str], None] = print) -> Dict:
    """Train one (K, seed) run with `engine.train`; returns its ConvergenceRecorder record."""
    recorder = ConvergenceRecorder(analysis_images, log)
    train(config, log=lambda _: None, callbacks=[recorder])
    return recorder.record


def run_label(num_groups: int, denoising_queries: int) -> str:
    """"K=3", or "K=3 dn=12" with denoising: a run's name in the summary, the plots and the logs."""
    return f"K={num_groups}" + (f" dn={denoising_queries}" if denoising_queries else "")


def _label(run: Dict) -> str:
    return run_label(run["num_groups"], run.get("denoising_queries", 0))


def _mean_spread(values: Sequence[float]) -> Dict:
    values = [v for v in values if v == v]  # drop NaN
    if not values:
        return {"mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def summarise(runs: List[Dict]) -> Dict:
    """Per configuration (`run_label`: K, and the denoising budget where not 0) over seeds:
    "AP" / "AP50" per epoch, "final" COCO metrics, "final_<distance>" and "step_time_s"
    (training time per optimizer step), each as mean / std / min / max / n. Keys are str(K)
    when no run has denoising (the format of the committed Table 1 results), labels otherwise."""
    summary = {}
    with_denoising = any(r.get("denoising_queries", 0) for r in runs)
    configs = sorted({(r.get("denoising_queries", 0), r["num_groups"]) for r in runs})
    for dn, k in configs:
        mine = [r for r in runs if r["num_groups"] == k and r.get("denoising_queries", 0) == dn]
        epochs = min(len(r["epochs"]) for r in mine)
        entry = {metric: [_mean_spread([r["epochs"][e][metric] for r in mine]) for e in range(epochs)]
                 for metric in ("AP", "AP50")}
        entry["final"] = {metric: _mean_spread([r["epochs"][-1].get(metric, float("nan")) for r in mine])
                          for metric in FINAL_METRICS}
        for name in DISTANCES:
            entry[f"final_{name}"] = _mean_spread([r["distances"][-1][name] for r in mine])
        entry["step_time_s"] = _mean_spread([e["train_time_s"] / r["steps_per_epoch"] for r in mine
                                             for e in r["epochs"]])
        summary[run_label(k, dn) if with_denoising else str(k)] = entry
    return summary


def paired_gains(runs: List[Dict]) -> Dict:
    """Final-AP differences paired by seed between configurations that differ in one factor:
    "K=3 - K=1" at every denoising budget, "dn=12 - dn=0" at every K. Each: the per-seed
    differences, their mean / std / min / max, and in how many seeds the first is ahead."""
    final = {(r["num_groups"], r.get("denoising_queries", 0), r["seed"]): r["epochs"][-1]["AP"] for r in runs}
    groups = sorted({k for k, _, _ in final})
    budgets = sorted({dn for _, dn, _ in final})
    seeds = sorted({s for _, _, s in final})
    pairs = [((k, dn), (groups[0], dn), f"{run_label(k, dn)} - {run_label(groups[0], dn)}")
             for dn in budgets for k in groups[1:]]
    pairs += [((k, dn), (k, budgets[0]), f"{run_label(k, dn)} - {run_label(k, budgets[0])}")
              for k in groups for dn in budgets[1:]]
    gains = {}
    for (k_a, dn_a), (k_b, dn_b), name in pairs:
        differences = {str(s): final[(k_a, dn_a, s)] - final[(k_b, dn_b, s)] for s in seeds
                       if (k_a, dn_a, s) in final and (k_b, dn_b, s) in final}
        if differences:
            gains[name] = {"per_seed": differences, **_mean_spread(list(differences.values())),
                           "ahead": sum(d > 0 for d in differences.values())}
    return gains


def _train_and_measure_job(config: TrainConfig, analysis_images: int) -> Dict:
    return train_and_measure(config, analysis_images=analysis_images, log=lambda line: print(line, flush=True))


def run_convergence(config: TrainConfig, groups: Sequence[int] = DEFAULT_GROUPS, seeds: Sequence[int] = (0,),
                    analysis_images: int = 16, log: Callable[[str], None] = print, jobs: int = 1,
                    denoising: Sequence[int] = DEFAULT_DENOISING) -> Dict:
    """The benchmark's core: every (seed, K, denoising budget) run with everything else fixed;
    returns the results dict."""
    run_configs = [dataclasses.replace(config, num_groups=int(k), seed=int(seed), denoising_queries=int(dn),
                                       output_dir=os.path.join(config.output_dir,
                                                               f"K{k}" + (f"-dn{dn}" if dn else "") + f"-seed{seed}"))
                   for seed in seeds for dn in denoising for k in groups]
    if jobs <= 1:
        runs = [train_and_measure(c, analysis_images=analysis_images, log=log) for c in run_configs]
    else:
        # Each run seeds itself and owns its process, so running several at once changes the wall
        # time only, not a single number of the results.
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # Largest K first: its runs take longest, so the pool's last minutes are not one long run alone.
        order = sorted(range(len(run_configs)),
                       key=lambda i: (-run_configs[i].num_groups, -run_configs[i].denoising_queries))
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {i: pool.submit(_train_and_measure_job, run_configs[i], analysis_images) for i in order}
            runs = [futures[i].result() for i in range(len(run_configs))]
    varied = ("num_groups", "seed", "output_dir", "denoising_queries")
    fixed = {k: v for k, v in dataclasses.asdict(config).items() if k not in varied}
    results = {"groups": [int(k) for k in groups], "seeds": [int(s) for s in seeds],
               "config": {k: list(v) if isinstance(v, tuple) else v for k, v in fixed.items()},
               "runs": runs, "summary": summarise(runs)}
    if any(denoising):
        results["denoising_queries"] = [int(dn) for dn in denoising]
    if len(runs) > 1:
        results["paired_gains"] = paired_gains(runs)
    return results


def plot(results: Dict, path: str) -> Optional[str]:
    """AP and AP50 per epoch per K (mean, and the seed spread as a band); paper Figure 4: PD and
    MD against the training step for every K > 1 (first seed)."""
    plt = common.pyplot()
    if plt is None:
        return None
    fig, (ax_ap, ax_ap50, ax_dist) = plt.subplots(1, 3, figsize=(15, 4.2))
    for k, summary in results["summary"].items():
        epochs = list(range(1, len(summary["AP"]) + 1))
        for ax, metric in ((ax_ap, "AP"), (ax_ap50, "AP50")):
            mean = [s["mean"] for s in summary[metric]]
            std = [s["std"] for s in summary[metric]]
            line, = ax.plot(epochs, mean, marker="o", label=k if k.startswith("K=") else f"K={k}")
            if len(results["seeds"]) > 1:
                ax.fill_between(epochs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                color=line.get_color(), alpha=0.2)
    for run in results["runs"]:
        if run["seed"] != results["seeds"][0] or run["num_groups"] < 2:
            continue  # PD and MD need two groups
        steps = [d["step"] for d in run["distances"]]
        line, = ax_dist.plot(steps, [d["MD"] for d in run["distances"]], marker="o", label=f"MD {_label(run)}")
        ax_dist.plot(steps, [d["PD"] for d in run["distances"]], color=line.get_color(), linestyle="--",
                     marker=".", label=f"PD {_label(run)}")
    for ax, title in ((ax_ap, "COCO AP vs epoch"), (ax_ap50, "AP50 vs epoch")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.legend()
        ax.grid(alpha=0.3)
    ax_dist.set_xlabel("training step")
    ax_dist.set_ylabel("distance (normalised image coordinates)")
    ax_dist.set_title(f"Figure 4: MD (eq. 7) and PD (eq. 6), seed {results['seeds'][0]}")
    ax_dist.legend(fontsize=7)
    ax_dist.grid(alpha=0.3)
    return common.save_figure(fig, path)


def plot_query_positions(results: Dict, path: str) -> Optional[str]:
    """Paper Figure 3: the query positions of every group of the trained model with the largest
    K (first seed), one colour per group."""
    if common.pyplot() is None:
        return None
    run = max((r for r in results["runs"] if r["seed"] == results["seeds"][0]), key=lambda r: r["num_groups"])
    positions = torch.tensor(run["query_positions"])
    title = (f"query positions after training, K={run['num_groups']}, N={positions.shape[1]}, "
             f"seed {run['seed']}")
    return analysis.plot_reference_points(positions, path, title=title)


def parse_overrides(items: Sequence[str]) -> Dict:
    """`["num_queries=30", "lr=2e-4"]` -> {"num_queries": 30, "lr": 2e-4}, typed like TrainConfig."""
    defaults = default_config()
    overrides = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not hasattr(defaults, name) or name in ("num_groups", "seed", "denoising_queries"):
            raise SystemExit(f"--set expects FIELD=VALUE with a TrainConfig field other than num_groups, "
                             f"seed and denoising_queries (use --groups / --seeds / --denoising-queries), "
                             f"got {item!r}")
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, nargs="+", default=list(DEFAULT_GROUPS), help="values of K")
    parser.add_argument("--denoising-queries", type=int, nargs="+", default=list(DEFAULT_DENOISING),
                        help="denoising budgets (TrainConfig.denoising_queries; 0 = off)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS),
                        help="seeds (mean and spread over them)")
    parser.add_argument("--epochs", type=int, default=None, help="override the schedule's epochs")
    parser.add_argument("--data-dir", default=None, help="synthetic dataset (written there if missing)")
    parser.add_argument("--analysis-images", type=int, default=16, help="validation images for PD / MD")
    parser.add_argument("--set", metavar="FIELD=VALUE", nargs="+", default=[],
                        help="override TrainConfig fields of the default configuration, e.g. "
                             "--set num_queries=30 lr=2e-4 (for diagnosis runs; write them with --out)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="runs at once, one process each (same results, less wall time; each run "
                             "takes one core: one intra-op thread, data loaded in the same process); "
                             "default: one per core, at most one per run")
    parser.add_argument("--quick", action="store_true", help="smoke test: few images, 2 epochs, K = 1 3, seed 0")
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
        seeds = args.seeds if args.seeds != list(DEFAULT_SEEDS) else [0]
        analysis_images = min(args.analysis_images, 8)
    else:
        config = default_config(**overrides)
        groups, seeds, analysis_images = args.groups, args.seeds, args.analysis_images
    ensure_synthetic_dataset(config.data_dir, config.synthetic)
    machine = common.machine_name(torch.device("cpu"))
    out = args.out or common.results_path("convergence", machine, quick=args.quick)
    start = time.time()
    denoising = args.denoising_queries
    jobs = args.jobs or min(len(os.sched_getaffinity(0)), len(groups) * len(seeds) * len(denoising))
    results = run_convergence(config, groups, seeds, analysis_images, jobs=jobs, denoising=denoising)
    results.update({**common.environment(torch.device("cpu")), "quick": args.quick, "jobs": jobs,
                    "wall_s": round(time.time() - start, 1)})
    stem = os.path.splitext(out)[0]
    png, positions_png = plot(results, stem + ".png"), plot_query_positions(results, stem + "-query-positions.png")
    results["png"] = png and os.path.basename(png)
    results["query_positions_png"] = positions_png and os.path.basename(positions_png)
    common.write_results(results, out, indent=1)
    print(f"\nfinal epoch, mean over {len(seeds)} seed(s):")
    for k, s in results["summary"].items():
        final = s["final"]
        print(f"  {k if k.startswith('K=') else 'K=' + k:>10}: AP {final['AP']['mean']:.3f} (std {final['AP']['std']:.3f})  "
              f"AP50 {final['AP50']['mean']:.3f}  AP_s/m/l {final['AP_small']['mean']:.3f}/"
              f"{final['AP_medium']['mean']:.3f}/{final['AP_large']['mean']:.3f}  "
              f"PD {s['final_PD']['mean']:.4f}  MD {s['final_MD']['mean']:.4f}  "
              f"step {s['step_time_s']['mean'] * 1e3:.0f} ms")
    for name, gain in results.get("paired_gains", {}).items():
        print(f"  {name}: {gain['mean']:+.3f} (std {gain['std']:.3f}, ahead in {gain['ahead']}/{gain['n']} seeds)")
    print(f"done in {results['wall_s']:.0f} s")
    return results


if __name__ == "__main__":
    main()
