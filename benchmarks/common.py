"""What every benchmark needs: timing, the machine's name, the report header, result files, plots.

A benchmark script imports this as `import common` (a script's own directory is on sys.path;
the tests put benchmarks/ there too), never another benchmark:

    device = torch.device("cuda")
    times = common.time_calls(lambda: fn(x), device, repeats=20, warmup=3)    # ms per call
    stats = common.summarise(times)                 # {"median_ms", "p10_ms", "p90_ms", "repeats"}
    report = {"benchmark": "matcher", **common.environment(device), "workloads": {...}}
    common.write_results(report, common.results_path("matcher", report["machine"], quick=args.quick))
    plt = common.pyplot()                           # None (and a message) without matplotlib
    ...
    common.save_figure(fig, path)

Result files are `benchmarks/results/<benchmark>-<machine>[-quick].json` (+ `.png`), where the
machine is `machine_name(device)`: `cpu-<cores>core` or the GPU model (`h100`, `h200`, ...).
"""
import contextlib
import datetime
import json
import os
import platform
import re
import subprocess
import time
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS_DIR = os.path.join(HERE, "results")
KNOWN_GPUS = ("h200", "h100", "a100", "l40s", "a10g", "v100", "t4")


def machine_name(device: torch.device) -> str:
    """`cpu-2core`, `h100`, `h200`, `rtx4090`, ...: the results files are named after the machine."""
    device = torch.device(device)
    if device.type != "cuda":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return f"cpu-{cores}core"
    name = torch.cuda.get_device_name(device).lower()
    for known in KNOWN_GPUS:
        if known in name:
            return known
    words = [w for w in name.replace("nvidia", "").split() if w not in ("geforce", "tesla")]
    if len(words) > 1 and words[0] in ("rtx", "gtx", "quadro"):  # "rtx 4090" -> "rtx4090"
        words = [words[0] + words[1]] + words[2:]
    return re.sub(r"[^a-z0-9]+", "-", words[0] if words else "cuda").strip("-")


def device_description(device: torch.device) -> str:
    """The GPU's name, or the CPU model and torch's intra-op thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    return f"{model}, {torch.get_num_threads()} threads"


def git_commit() -> Optional[str]:
    """The short commit hash of the checkout, or None outside git."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, text=True,
                              capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def environment(device: torch.device) -> Dict:
    """The header every report starts with: machine, device, threads, versions, commit, date, load."""
    device = torch.device(device)
    return {
        "machine": machine_name(device),
        "device": str(device),
        "device_name": device_description(device),
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def time_calls(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 0,
               cuda_events: bool = False) -> List[float]:
    """Milliseconds of each of `repeats` calls of fn(), after `warmup` untimed calls.

    On CUDA the device work is included: by default each call is wall-clock timed up to a
    synchronisation (host overhead counts); with cuda_events=True between two recorded events
    (device time of the call's kernels only).
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        if cuda and cuda_events:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
            continue
        start_s = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start_s) * 1e3)
    return times


def summarise(times_ms: List[float]) -> Dict[str, float]:
    """Median, 10th and 90th percentile of a list of times in ms, and how many there were."""
    return {"median_ms": float(np.median(times_ms)), "p10_ms": float(np.percentile(times_ms, 10)),
            "p90_ms": float(np.percentile(times_ms, 90)), "repeats": len(times_ms)}


def results_path(benchmark: str, machine: str, quick: bool = False, suffix: str = "",
                 directory: str = RESULTS_DIR) -> str:
    """`<directory>/<benchmark>-<machine><suffix>[-quick].json` (machine: `machine_name(device)`)."""
    return os.path.join(directory, f"{benchmark}-{machine}{suffix}{'-quick' if quick else ''}.json")


def write_results(report: Dict, path: str, indent: int = 2) -> str:
    """Write the report as JSON (a temporary file, then a rename: no half-written results)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp_path = f"{path}.tmp-{os.getpid()}"
    with open(tmp_path, "w") as f:
        json.dump(report, f, indent=indent)
    os.replace(tmp_path, path)
    print(f"wrote {path}")
    return path


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a message) when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install group-detr[plot]): no PNG")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str, dpi: int = 110) -> str:
    """tight_layout, save as `path`, close the figure; returns path."""
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    print(f"wrote {path}")
    return path
