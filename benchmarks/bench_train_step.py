"""What Group DETR costs per training step: our pieces against the public way, side by side.

    python benchmarks/bench_train_step.py            # small demo model, K in {1, 11, 13} (~5 min, 2 cores)
    python benchmarks/bench_train_step.py --full     # also the paper's Conditional DETR-R50 shape
    python benchmarks/bench_train_step.py --quick    # a few steps, no results file
    python benchmarks/bench_train_step.py --denoising  # DINO's denoising on vs off, per attention backend

For every model size and K, two copies of one randomly initialised Group DETR (same weights, same
optimizer settings) take full training steps -- forward, matching of every decoder layer, loss,
backward, gradient clipping, AdamW step -- on the same random batches, the two configurations
interleaved step by step (so that a noisy neighbour slows both alike):

  public  the way Conditional DETR's GroupDETR branch, LW-DETR and RF-DETR do it:
          * matching: `ReferenceGroupMatcher` (DETR's batch-wide `(B*K*N, sum M)` cost, `.cpu()`,
            scipy per group per image), called once per decoder layer as their criteria do;
          * decoder self-attention: `nn.MultiheadAttention` with a dense `(L, L)` boolean
            `attn_mask` (`QueryLayout.mha_attn_mask()`), built once per step and shared by the
            layers, as their decoders build it once per forward.
  ours    what `group_detr.engine` trains with:
          * matching: `GroupMatcher`, every layer and group of the batch in one solver call
            (the criterion stacks the layers);
          * decoder self-attention: `GroupedSelfAttention` on the device's best backend
            (Triton on CUDA, groups folded into the batch on CPU).

How the switch is made. The model (group_detr/models) has no switch: its decoder layers always
hold a `GroupedSelfAttention`. For "public" this benchmark replaces each decoder layer's
`self_attn` by `DenseMaskSelfAttention`, an `nn.MultiheadAttention` that *shares the very
Parameter objects* of the module it replaces (the two have the same parameter names and shapes),
so the public model starts from bit-identical weights and its optimizer sees the same tensors.
The matcher is swapped on the criterion (`criterion.matcher = PerLayerMatcher(Reference...)`).
Nothing in group_detr/ is modified.

What is reported per (size, K, configuration):
  * median step time (wall clock; on CUDA with a synchronisation before and after the step);
  * the time in matching, in decoder self-attention and in the rest. Matching is timed around
    the matcher call. Self-attention is timed forward *and backward*: identity autograd
    Functions placed on the module's inputs and output record when the forward enters and leaves
    it, and when the gradient reaches its output and leaves through its inputs (CUDA events on a
    GPU, perf_counter on CPU). The rest is the step time minus the two;
  * host synchronisations per step: on CUDA counted with `torch.cuda.set_sync_debug_mode("warn")`
    in one extra, untimed step. On CPU nothing synchronises, so "syncs" is not applicable there;
    instead the Python-level reads of tensor values on the host (`.item()`, `.tolist()`,
    `.cpu()`, `.numpy()`, `bool()/int()/float()` of a tensor, `.nonzero()`) are counted with a
    TorchFunctionMode in that extra step, as an indication of where a GPU run would wait;
  * peak memory of a step, measured in one extra, untimed step: on CUDA `max_memory_allocated()`
    minus the allocation at the step's start; on CPU the peak resident set size during the step
    minus the RSS at its start (Linux: glibc's free lists are returned with malloc_trim, then the
    kernel's high-water mark VmHWM is reset through /proc/self/clear_refs, so the delta is the
    step's own new memory; approximate, since the allocator may still reuse memory it kept).
    Not in the timed steps: trimming makes the next step fault its pages in again.

The R50 shape (`--full`) is meant for a GPU. On a CPU it runs (~1 min a step on 2 cores even at
320x448 px), but the public way's dense-mask attention over K*N = 3300-3900 queries keeps
(B, H, L, L) scores per layer for the backward: ~16 GB at K=11, more at K=13.

Summary: the step-time overhead of K=11 (and 13) over K=1 for each configuration (the price of
Group DETR), and the matcher's extra cost of K=11 over K=1 as a share of the K=11 step (the goal
for ours: below 10%). The first step's loss must agree between the two configurations (same
weights, same batch, same assignment; checked when dropout is 0).

Writes results/train_step-<machine>.json and a stacked-bar chart results/train_step-<machine>.png
(matplotlib), and prints the table (plain and as Markdown for the README).

`--denoising` measures instead what DINO's contrastive denoising (`TrainConfig.denoising_queries`,
the Table 2 sweep's budget DENOISING_QUERIES) adds to our step at the same K, for every attention
backend that can train with a denoising prefix on the device (CPU: masked, and the custom op's
reference math; CUDA: triton, flex, masked): two models per backend, denoising off and on,
interleaved step by step on the same batches. The layout changes with the batch's largest target
count (dynamic groups), so it also reports how many distinct layouts the timed steps ran and the
median step that met a layout for the first time (the mask, block mask or kernel schedule is
built then, and FlexAttention compiles) against the median of the rest (cached). Writes
results/train_step_denoising-<machine>.json.
"""
import argparse
import contextlib
import copy
import ctypes
import dataclasses
import os
import time
import warnings
from collections import Counter
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import common
import group_detr
from group_detr.config import TrainConfig, demo_config, synthetic_preset
from group_detr.data.synthetic import CLASS_NAMES
from group_detr.engine import build_criterion, build_model, build_optimizer
from group_detr.layout import QueryLayout
from group_detr.reference import ReferenceGroupMatcher
from workloads import target_counts

CONFIGURATIONS = ("public", "ours")
DENOISING_QUERIES = 12  # the budget of the Table 2 sweep (README): 4 groups at 3 targets
REGIONS = ("matching", "self_attention", "rest")
GROUPS = (1, 11, 13)


# ------------------------------------------------------------------------------------------------
# the two model sizes
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Size:
    """One model size: its TrainConfig (K is set per run), the batch and its random targets."""

    name: str
    config: TrainConfig
    num_classes: int
    batch: int
    image_size: tuple  # (H, W)
    targets: dict  # workloads.target_counts spec without batch/seed
    description: str
    repeats: dict  # default timed steps per configuration, by device type


def small_size() -> Size:
    """`python -m group_detr demo`'s model (small CNN, d=128, 2+3 layers, N=10) on its data shape:
    batches of 8 128-px images with 1..6 objects of the synthetic dataset's 5 classes."""
    config = demo_config()
    data = synthetic_preset(config.synthetic)
    return Size("small", config, len(CLASS_NAMES), config.batch_size,
                (data.image_size,) * 2, {"targets": "uniform", "max_targets": data.max_objects},
                f"demo: small CNN, d={config.hidden_dim}, {config.nheads} heads, "
                f"{config.enc_layers}+{config.dec_layers} layers, N={config.num_queries}, "
                f"batch {config.batch_size} x {data.image_size} px",
                # ~0.1-0.2 s a step on 2 cores: 200 steps keep the medians steady on a busy machine
                {"cpu": 200, "cuda": 100})


def r50_size(image_size=(800, 1088), batch: Optional[int] = None) -> Size:
    """The paper's Conditional DETR-R50: ResNet-50, d=256, 8 heads, 6+6 layers, N=300, 91 classes,
    batch 2 per device at ~800 px; COCO-like target counts (workloads.json's distribution)."""
    config = TrainConfig()
    batch = batch or config.batch_size
    return Size("r50", config, 91, batch, tuple(image_size),
                {"targets": "coco", "max_targets": 100},
                f"Conditional DETR-R50: d={config.hidden_dim}, {config.nheads} heads, "
                f"{config.enc_layers}+{config.dec_layers} layers, N={config.num_queries}, "
                f"batch {batch} x {image_size[0]}x{image_size[1]} px, random weights",
                {"cpu": 5, "cuda": 30})


def make_batches(size: Size, count: int, seed: int, device) -> List:
    """`count` random batches (images, mask, targets), identical for both configurations."""
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    batches = []
    for step in range(count):
        if size.targets["targets"] == "uniform":
            counts = rng.integers(1, size.targets["max_targets"] + 1, size=size.batch).tolist()
        else:
            counts = target_counts({**size.targets, "batch": size.batch, "seed": seed * 1000 + step})
        images = torch.randn(size.batch, 3, *size.image_size, generator=generator)
        mask = torch.zeros(size.batch, *size.image_size, dtype=torch.bool)
        targets = []
        for m in counts:
            centre = torch.rand(m, 2, generator=generator) * 0.8 + 0.1
            wh = torch.rand(m, 2, generator=generator) * 0.4 + 0.02
            targets.append({"labels": torch.randint(size.num_classes, (m,), generator=generator).to(device),
                            "boxes": torch.cat([centre, wh], dim=-1).to(device)})
        batches.append((images.to(device), mask.to(device), targets))
    return batches


# ------------------------------------------------------------------------------------------------
# timed regions
# ------------------------------------------------------------------------------------------------
class RegionTimer:
    """Sums the time spent in named regions of one step.

    On CPU a mark is `time.perf_counter()`; on CUDA a recorded event, so that marking does not
    synchronise (the durations are read after the step's final synchronisation).
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans = []  # (region, start_mark, end_mark)
        self.enabled = True

    def mark(self):
        if not self.enabled:
            return None
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def add(self, region: str, start, end) -> None:
        if self.enabled and start is not None and end is not None:
            self.spans.append((region, start, end))

    def collect(self) -> Dict[str, float]:
        """ms per region since the last collect (call after the step has finished)."""
        totals = {region: 0.0 for region in REGIONS if region != "rest"}
        for region, start, end in self.spans:
            totals[region] += start.elapsed_time(end) if self.cuda else (end - start) * 1e3
        self.spans = []
        return totals


# The region the Python code is in (forward only), for attributing host reads and syncs.
_CURRENT_REGION = ["rest"]


@contextlib.contextmanager
def in_region(name: str):
    _CURRENT_REGION.append(name)
    try:
        yield
    finally:
        _CURRENT_REGION.pop()


class _Span:
    """Marks of one self-attention call: forward enter/leave, backward enter/leave."""

    def __init__(self, timer: RegionTimer):
        self.timer = timer
        self.backward_start = None


class _EnterAttention(torch.autograd.Function):
    """Identity on the attention's inputs. Forward: the attention starts. Backward: the gradient
    has left the attention through its inputs, so the attention's backward is over."""

    @staticmethod
    def forward(ctx, span, *tensors):
        ctx.span = span
        span.forward_start = span.timer.mark()
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        span = ctx.span
        span.timer.add("self_attention", span.backward_start, span.timer.mark())
        return (None,) + grads


class _LeaveAttention(torch.autograd.Function):
    """Identity on the attention's output. Forward: the attention is done. Backward: the
    gradient has reached its output, so the attention's backward starts."""

    @staticmethod
    def forward(ctx, span, out):
        ctx.span = span
        span.timer.add("self_attention", span.forward_start, span.timer.mark())
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        ctx.span.backward_start = ctx.span.timer.mark()
        return None, grad


class TimedSelfAttention(nn.Module):
    """Wraps a decoder self-attention module and times its forward and backward.

    The inner module keeps its name (`.inner`), so the two configurations stay comparable; it is
    called exactly as the decoder layer calls `self_attn(q, k, v, layout=...)`.
    """

    def __init__(self, inner: nn.Module, timer: RegionTimer):
        super().__init__()
        self.inner = inner
        self.timer = timer

    def forward(self, query, key, value, **kwargs):
        if not (torch.is_grad_enabled() and self.timer.enabled):
            return self.inner(query, key, value, **kwargs)
        span = _Span(self.timer)
        # Pass each distinct tensor once, so that `key is query` (DETR's q = k) stays true for
        # the inner module, which projects q and k in one matmul then.
        distinct = []
        for t in (query, key, value):
            if not any(t is d for d in distinct):
                distinct.append(t)
        marked = _EnterAttention.apply(span, *distinct)
        lookup = lambda t: marked[next(i for i, d in enumerate(distinct) if t is d)]  # noqa: E731
        with in_region("self_attention"):
            out, weights = self.inner(lookup(query), lookup(key), lookup(value), **kwargs)
        return _LeaveAttention.apply(span, out), weights


class TimedMatcher(nn.Module):
    """Wraps the criterion's matcher and times each call (no gradients flow through it)."""

    def __init__(self, inner: nn.Module, timer: RegionTimer):
        super().__init__()
        self.inner = inner
        self.timer = timer

    def forward(self, *args, **kwargs):
        start = self.timer.mark()
        with in_region("matching"):
            indices = self.inner(*args, **kwargs)
        self.timer.add("matching", start, self.timer.mark())
        return indices


# ------------------------------------------------------------------------------------------------
# the public way
# ------------------------------------------------------------------------------------------------
class MaskCache:
    """The dense mask of a step, built by the first decoder layer and reused by the others (public
    decoders build it once per forward). `clear()` before every step."""

    def __init__(self):
        self.masks = {}

    def clear(self):
        self.masks = {}

    def get(self, layout: QueryLayout, device) -> torch.Tensor:
        key = (layout, str(device))
        if key not in self.masks:
            self.masks[key] = layout.mha_attn_mask(device)
        return self.masks[key]


class DenseMaskSelfAttention(nn.Module):
    """The public decoder self-attention: `nn.MultiheadAttention` + dense `(L, L)` bool attn_mask.

    Built from a `GroupedSelfAttention` and sharing its Parameter objects (in_proj_weight,
    in_proj_bias, out_proj), so the weights are identical and the optimizer updates one tensor.
    Accepts the decoder layer's call `(q, k, v, layout=...)`; layout None means one group (no
    mask), as public code passes no mask with group_detr=1 or in eval.
    """

    def __init__(self, grouped: nn.Module, masks: MaskCache):
        super().__init__()
        self.mha = nn.MultiheadAttention(grouped.embed_dim, grouped.num_heads, dropout=grouped.dropout,
                                         bias=grouped.in_proj_bias is not None,
                                         device=grouped.in_proj_weight.device)
        self.mha.in_proj_weight = grouped.in_proj_weight
        self.mha.in_proj_bias = grouped.in_proj_bias
        self.mha.out_proj = grouped.out_proj
        self.masks = masks

    def forward(self, query, key, value, layout: Optional[QueryLayout] = None):
        attn_mask = None
        if layout is not None and layout.num_segments > 1:
            attn_mask = self.masks.get(layout, query.device)
        return self.mha(query, key, value, attn_mask=attn_mask, need_weights=False)


class PerLayerMatcher(nn.Module):
    """Public criteria call the matcher once per decoder layer (the last and every aux output).

    Our SetCriterion stacks the layers along the batch and makes one call; for the reference
    matcher that would build one `(L*B*K*N, L*sum M)` batch-wide cost, L times the work of the
    public code, so this splits the stacked call back into one call per layer.
    """

    def __init__(self, matcher: nn.Module, num_layers: int):
        super().__init__()
        self.matcher = matcher
        self.num_layers = num_layers

    def forward(self, outputs, targets, num_groups=None):
        batch = len(targets) // self.num_layers
        indices = []
        for layer in range(self.num_layers):
            part = slice(layer * batch, (layer + 1) * batch)
            indices += self.matcher({k: v[part] for k, v in outputs.items()}, targets[part],
                                    num_groups=num_groups)
        return indices


# ------------------------------------------------------------------------------------------------
# the trainers
# ------------------------------------------------------------------------------------------------
class Trainer:
    """One configuration's model, criterion and optimizer, and its training step."""

    def __init__(self, name: str, model: nn.Module, config: TrainConfig, num_classes: int,
                 timer: RegionTimer, masks: Optional[MaskCache] = None):
        self.name, self.model, self.config, self.timer, self.masks = name, model, config, timer, masks
        self.criterion = build_criterion(config, num_classes)
        if name == "public":
            matcher = self.criterion.matcher
            reference = ReferenceGroupMatcher(matcher.cost_class, matcher.cost_bbox, matcher.cost_giou,
                                              num_groups=config.num_groups, class_cost=matcher.class_cost,
                                              focal_alpha=matcher.focal_alpha, focal_gamma=matcher.focal_gamma)
            self.criterion.matcher = PerLayerMatcher(reference, config.dec_layers)
        self.criterion.matcher = TimedMatcher(self.criterion.matcher, timer)
        self.optimizer = build_optimizer(model, config)
        self.params = [p for p in model.parameters() if p.requires_grad]

    def step(self, images, mask, targets) -> torch.Tensor:
        """One training step as group_detr.engine.train_one_epoch takes it (without its loss
        check, which reads the loss on the host: the caller checks after timing)."""
        if self.masks is not None:
            self.masks.clear()
        outputs = self.model(images, mask, targets)
        self.last_denoising = outputs.get("dn_meta")
        losses = self.criterion(outputs, targets)
        loss = self.criterion.weighted_sum(losses)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.clip_max_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.clip_max_norm)
        self.optimizer.step()
        return loss.detach()


def build_trainers(size: Size, num_groups: int, device: torch.device, seed: int) -> Dict[str, Trainer]:
    """Both configurations from one random initialisation."""
    config = dataclasses.replace(size.config, num_groups=num_groups)
    torch.manual_seed(seed)
    ours_model = build_model(config, size.num_classes).to(device).train()
    public_model = copy.deepcopy(ours_model)
    timers = {name: RegionTimer(device) for name in CONFIGURATIONS}
    masks = MaskCache()
    for layer in public_model.transformer.decoder.layers:
        layer.self_attn = DenseMaskSelfAttention(layer.self_attn, masks)
    for model, name in ((public_model, "public"), (ours_model, "ours")):
        for layer in model.transformer.decoder.layers:
            layer.self_attn = TimedSelfAttention(layer.self_attn, timers[name])
    return {
        "public": Trainer("public", public_model, config, size.num_classes, timers["public"], masks),
        "ours": Trainer("ours", ours_model, config, size.num_classes, timers["ours"]),
    }


# ------------------------------------------------------------------------------------------------
# memory and synchronisation
# ------------------------------------------------------------------------------------------------
class PeakMemory:
    """Peak memory of one step, in MiB above the memory in use when it started."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.method = ("torch.cuda.max_memory_allocated - memory_allocated at step start" if self.cuda
                       else "peak RSS (VmHWM, reset via /proc/self/clear_refs) - RSS at step start, "
                            "after malloc_trim")
        self.available = True
        self._trim = None
        if not self.cuda:
            try:
                self._trim = ctypes.CDLL("libc.so.6").malloc_trim
            except (OSError, AttributeError):
                pass
            self.available = self._reset_hwm() and self._status("VmHWM") is not None
            if not self.available:
                self.method = "not available (needs Linux /proc/self/clear_refs)"

    @staticmethod
    def _status(field: str) -> Optional[float]:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1]) / 1024.0  # kB -> MiB
        except OSError:
            pass
        return None

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # 5: reset the peak RSS to the current RSS (Linux >= 4.0)
            return True
        except OSError:
            return False

    def start(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        elif self.available:
            if self._trim is not None:
                self._trim(0)
            self._reset_hwm()
            self._base = self._status("VmRSS")

    def stop(self) -> Optional[float]:
        if self.cuda:
            return (torch.cuda.max_memory_allocated() - self._base) / 2**20
        if not self.available:
            return None
        return self._status("VmHWM") - self._base


HOST_READS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero"}


class HostReadCounter(TorchFunctionMode):
    """Counts Python-level reads of tensor values on the host (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()  # (region, call) -> count

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.counts[(_CURRENT_REGION[-1], name)] += 1
        return func(*args, **(kwargs or {}))


def by_region(counts: Counter) -> Dict[str, Dict[str, int]]:
    """{(region, call): n} -> {region: {call: n}} for every region."""
    out = {region: {} for region in REGIONS}
    for (region, call), n in sorted(counts.items()):
        out[region][call] = n
    return out


def count_syncs(trainer: Trainer, batch, device: torch.device) -> Dict:
    """One extra, untimed step with the counters on."""
    trainer.timer.enabled = False
    result = {}
    try:
        if device.type == "cuda":
            torch.cuda.synchronize()
            syncs = Counter()

            def record(message, category, filename, lineno, file=None, line=None):
                if "synchroniz" in str(message):
                    syncs[(_CURRENT_REGION[-1], f"{os.path.basename(filename)}:{lineno}")] += 1

            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.showwarning = record
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    trainer.step(*batch)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            result["syncs"] = sum(syncs.values())
            result["syncs_by_region"] = by_region(syncs)
        else:
            result["syncs"] = None  # nothing synchronises on CPU
        counter = HostReadCounter()
        with counter:
            trainer.step(*batch)
        result["host_reads"] = sum(counter.counts.values())
        result["host_reads_by_region"] = by_region(counter.counts)
    finally:
        trainer.timer.enabled = True
    return result


# ------------------------------------------------------------------------------------------------
# the measurement
# ------------------------------------------------------------------------------------------------
def timed_step(trainer: Trainer, batch, seed: int, device: torch.device, what: str):
    """One training step under a fixed dropout seed: (loss, wall ms, region ms).

    Raises FloatingPointError naming `what` when the loss is not finite."""
    torch.manual_seed(seed)  # the same dropout stream for every configuration where they draw alike
    start = time.perf_counter()
    loss_tensor = trainer.step(*batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = (time.perf_counter() - start) * 1e3
    regions = trainer.timer.collect()
    loss = float(loss_tensor)  # after the clock stops: the host read is not the step's
    if not np.isfinite(loss):
        raise FloatingPointError(f"{what}: loss {loss}")
    return loss, elapsed, regions


def run_case(size: Size, num_groups: int, device: torch.device, warmup: int, repeats: int, seed: int,
             log=print) -> Dict:
    """Both configurations at one (size, K): warmup + repeats interleaved steps each."""
    trainers = build_trainers(size, num_groups, device, seed)
    batches = make_batches(size, warmup + repeats + 1, seed + num_groups, device)
    memory = PeakMemory(device)
    records = {name: {"step": [], "matching": [], "self_attention": [], "rest": [], "loss": []}
               for name in CONFIGURATIONS}
    for i in range(warmup + repeats):
        # Alternate the order, so that neither configuration always runs on a warmer cache.
        order = CONFIGURATIONS if i % 2 == 0 else CONFIGURATIONS[::-1]
        for name in order:
            loss, elapsed, regions = timed_step(trainers[name], batches[i], seed + i, device,
                                                f"{size.name} K={num_groups} {name} step {i}")
            rec = records[name]
            rec["loss"].append(loss)
            if i < warmup:
                continue
            rec["step"].append(elapsed)
            rec["matching"].append(regions["matching"])
            rec["self_attention"].append(regions["self_attention"])
            rec["rest"].append(elapsed - regions["matching"] - regions["self_attention"])
        log(f"  {size.name} K={num_groups:2d} step {i + 1}/{warmup + repeats}: "
            + "  ".join(f"{n} {records[n]['loss'][-1]:.4f}" for n in CONFIGURATIONS), flush=True)

    result = {"configurations": {}}
    for name in CONFIGURATIONS:
        rec = records[name]
        step = common.summarise(rec["step"])
        entry = {"step": step, "steps_ms": rec["step"], "losses": rec["loss"]}
        for region in REGIONS:
            entry[region] = common.summarise(rec[region])
            entry[region]["share"] = entry[region]["median_ms"] / step["median_ms"]
        # Memory and synchronisations in extra, untimed steps: their instruments (malloc_trim,
        # the sync warnings, the TorchFunctionMode) would distort the timed ones.
        trainers[name].timer.enabled = False
        memory.start()
        trainers[name].step(*batches[-1])
        entry["peak_memory_mib"] = memory.stop()
        trainers[name].timer.enabled = True
        entry.update(count_syncs(trainers[name], batches[-1], device))
        result["configurations"][name] = entry
    public_losses, our_losses = records["public"]["loss"], records["ours"]["loss"]
    result["first_step_loss"] = {"public": public_losses[0], "ours": our_losses[0],
                                 "relative_difference": abs(public_losses[0] - our_losses[0])
                                 / max(abs(public_losses[0]), 1e-12)}
    result["speedup"] = (result["configurations"]["public"]["step"]["median_ms"]
                         / result["configurations"]["ours"]["step"]["median_ms"])
    result["queries"] = num_groups * size.config.num_queries
    return result


def overheads(cases: Dict[str, Dict]) -> Dict:
    """The price of Group DETR: K over K=1 for each configuration, and the matcher's share."""
    out = {}
    if "1" not in cases:
        return out
    for k in cases:
        if k == "1":
            continue
        for name in CONFIGURATIONS:
            base = cases["1"]["configurations"][name]
            grouped = cases[k]["configurations"][name]
            step_k, step_1 = grouped["step"]["median_ms"], base["step"]["median_ms"]
            match_k, match_1 = grouped["matching"]["median_ms"], base["matching"]["median_ms"]
            out.setdefault(f"K{k}_over_K1", {})[name] = {
                "step_overhead": (step_k - step_1) / step_1,
                "matcher_extra_share_of_step": (match_k - match_1) / step_k,
                "self_attention_extra_share_of_step": (grouped["self_attention"]["median_ms"]
                                                       - base["self_attention"]["median_ms"]) / step_k,
            }
    return out


# ------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------
def table_rows(report: Dict) -> List[List[str]]:
    rows = []
    cuda = report["device"].startswith("cuda")
    sync_label = "syncs (matching/all)" if cuda else "host reads (matching/all)"
    for size_name, size in report["sizes"].items():
        for k, case in size["cases"].items():
            for name in CONFIGURATIONS:
                c = case["configurations"][name]
                counts, total = ((c["syncs_by_region"], c["syncs"]) if cuda
                                 else (c["host_reads_by_region"], c["host_reads"]))
                syncs = f"{sum(counts['matching'].values())}/{total}"
                memory = "-" if c["peak_memory_mib"] is None else f"{c['peak_memory_mib']:.0f}"
                rows.append([size_name, k, name, f"{c['step']['median_ms']:.1f}"]
                            + [f"{c[r]['median_ms']:.1f} ({100 * c[r]['share']:.0f}%)" for r in REGIONS]
                            + [syncs, memory,
                               f"{case['speedup']:.2f}x" if name == "ours" else ""])
    header = ["size", "K", "config", "step ms", "matching ms", "self-attn ms", "rest ms", sync_label,
              "peak MiB", "speed-up"]
    return [header] + rows


def print_report(report: Dict) -> str:
    rows = table_rows(report)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    repeats = ", ".join(f"{n}: {s['repeats']}" for n, s in report["sizes"].items())
    print(f"\n{report['device_name']}: medians over timed training steps per configuration ({repeats})")
    for r in rows:
        print("  ".join(cell.rjust(w) for cell, w in zip(r, widths)))
    lines = []
    for size_name, size in report["sizes"].items():
        for key, per_config in size["overheads"].items():
            for name, o in per_config.items():
                lines.append(f"{size_name} {key.replace('_over_', ' over ')} {name:6s}: step +{100 * o['step_overhead']:.1f}%, "
                             f"extra matching = {100 * o['matcher_extra_share_of_step']:.1f}% of the step, "
                             f"extra self-attention = {100 * o['self_attention_extra_share_of_step']:.1f}%")
    for size_name, size in report["sizes"].items():
        o = size["overheads"].get("K11_over_K1", {}).get("ours")
        if o is not None:
            share = o["matcher_extra_share_of_step"]
            lines.append(f"{size_name} goal (ours): extra matching of K=11 over K=1 < 10% of the K=11 step: "
                         f"{100 * share:.1f}% -> {'met' if share < 0.10 else 'NOT met'}")
    print("\n" + "\n".join(lines))
    markdown = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    markdown += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    print("\nMarkdown:\n" + "\n".join(markdown))
    return "\n".join(markdown)


def plot(report: Dict, path: str) -> bool:
    """Stacked bars of the median step, per size, K and configuration."""
    plt = common.pyplot()
    if plt is None:
        return False
    sizes = list(report["sizes"].items())
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 4.2), squeeze=False)
    colours = {"matching": "#d62728", "self_attention": "#1f77b4", "rest": "#bbbbbb"}
    for ax, (size_name, size) in zip(axes[0], sizes):
        labels, x = [], 0
        for k, case in size["cases"].items():
            for name in CONFIGURATIONS:
                c = case["configurations"][name]
                bottom = 0.0
                for region in REGIONS:
                    value = max(c[region]["median_ms"], 0.0)
                    ax.bar(x, value, bottom=bottom, color=colours[region],
                           label=region.replace("_", "-") if x == 0 else None,
                           hatch="//" if name == "public" else None, edgecolor="white")
                    bottom += value
                ax.text(x, bottom, f"{c['step']['median_ms']:.0f}", ha="center", va="bottom", fontsize=8)
                labels.append(f"K={k}\n{name}")
                x += 1
            x += 0.5
        positions = []
        x = 0
        for _ in size["cases"]:
            positions += [x, x + 1]
            x += 2.5
        ax.set_xticks(positions)
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylabel("median training step (ms)")
        ax.set_title(f"{size_name}: {size['description']}", fontsize=8)
        ax.legend(fontsize=8)
    fig.suptitle(f"Group DETR training step, public way (hatched) vs ours ({report['device_name']})",
                 fontsize=10)
    common.save_figure(fig, path, dpi=120)
    return True


def run(sizes: List[Size], groups, device: torch.device, warmup: int = 2, repeats: Optional[int] = None,
        seed: int = 0, log=print) -> Dict:
    """The benchmark's core: every size and K, both configurations. Returns the report dict.

    repeats: timed steps per configuration (default: the size's own, by device type).
    """
    report = {
        "benchmark": "train_step",
        **common.environment(device),
        "backends": group_detr.backends(),
        "warmup": warmup,
        "configurations": {
            "public": "ReferenceGroupMatcher once per decoder layer (batch-wide cost, .cpu(), scipy per "
                      "group per image) + nn.MultiheadAttention with a dense (L, L) attn_mask built once per step",
            "ours": "GroupMatcher (all layers, groups and images in one solver call) + GroupedSelfAttention "
                    "(backend auto)",
        },
        "memory_method": PeakMemory(device).method,
        "sync_method": ("torch.cuda.set_sync_debug_mode('warn') warnings in one extra step" if device.type == "cuda"
                        else "not applicable on CPU (syncs = null); host_reads counts .item/.tolist/.cpu/.numpy/"
                             "bool/int/float/nonzero calls in one extra step"),
        "sizes": {},
    }
    for size in sizes:
        cases = {}
        size_repeats = repeats or size.repeats[device.type]
        for k in groups:
            log(f"{size.name}, K={k} ...", flush=True)
            cases[str(k)] = run_case(size, k, device, warmup, size_repeats, seed, log)
            cases[str(k)]["attention_backend"] = {"public": "nn.MultiheadAttention + dense mask",
                                                   "ours": _our_backend(size, k, device)}
        report["sizes"][size.name] = {"description": size.description, "batch": size.batch,
                                      "image_size": list(size.image_size), "num_classes": size.num_classes,
                                      "repeats": size_repeats,
                                      "queries_per_group": size.config.num_queries,
                                      "dec_layers": size.config.dec_layers, "dropout": size.config.dropout,
                                      "cases": cases, "overheads": overheads(cases)}
    return report


def denoising_backends(device: torch.device) -> List[str]:
    """The attention backends that train with a denoising prefix on `device`: on the CPU
    FlexAttention has no backward and the Triton kernels do not run (the custom op computes the
    dense reference there), so masked and that op."""
    if device.type == "cuda":
        return ["triton", "flex", "masked"]
    return ["masked", "triton"]


def run_denoising_case(size: Size, num_groups: int, device: torch.device, warmup: int, repeats: int,
                       seed: int, log=print) -> Dict:
    """Denoising off vs on at one K, per backend: interleaved steps on the same batches."""
    batches = make_batches(size, warmup + repeats, seed + num_groups, device)
    result = {}
    for backend in denoising_backends(device):
        trainers, records = {}, {}
        for dn in ("off", "on"):
            config = dataclasses.replace(size.config, num_groups=num_groups, attention_backend=backend,
                                         denoising_queries=DENOISING_QUERIES if dn == "on" else 0)
            torch.manual_seed(seed)
            model = build_model(config, size.num_classes).to(device).train()
            timer = RegionTimer(device)
            for layer in model.transformer.decoder.layers:
                layer.self_attn = TimedSelfAttention(layer.self_attn, timer)
            trainers[dn] = Trainer("ours", model, config, size.num_classes, timer)
            records[dn] = {"step": [], "self_attention": [], "new_layout": []}
        seen = set()
        for i in range(warmup + repeats):
            for dn in (("off", "on") if i % 2 == 0 else ("on", "off")):
                trainer = trainers[dn]
                _, elapsed, regions = timed_step(trainer, batches[i], seed + i, device,
                                                 f"K={num_groups} {backend} denoising {dn} step {i}")
                meta = trainer.last_denoising
                layout = None if meta is None else (meta["num_groups"], meta["group_size"])
                new = dn == "on" and layout not in seen
                seen.add(layout if dn == "on" else None)
                if i < warmup:
                    continue
                records[dn]["step"].append(elapsed)
                records[dn]["self_attention"].append(regions["self_attention"])
                records[dn]["new_layout"].append(new)
        entry = {dn: {"step": common.summarise(rec["step"]),
                      "self_attention": common.summarise(rec["self_attention"])}
                 for dn, rec in records.items()}
        on = records["on"]
        fresh = [t for t, new in zip(on["step"], on["new_layout"]) if new]
        cached = [t for t, new in zip(on["step"], on["new_layout"]) if not new]
        entry["layouts"] = len(seen - {None})
        entry["first_layout_step"] = common.summarise(fresh) if fresh else None
        entry["cached_layout_step"] = common.summarise(cached) if cached else None
        entry["overhead"] = entry["on"]["step"]["median_ms"] / entry["off"]["step"]["median_ms"] - 1
        result[backend] = entry
        log(f"  K={num_groups} {backend}: denoising off {entry['off']['step']['median_ms']:.1f} ms, "
            f"on {entry['on']['step']['median_ms']:.1f} ms (+{100 * entry['overhead']:.0f}%), "
            f"{entry['layouts']} layouts", flush=True)
    return result


def denoising_table(report: Dict) -> str:
    """Markdown: one row per (K, backend)."""
    header = ["K", "backend", "dn off step ms", "dn on step ms", "overhead", "self-attn off / on ms",
              "layouts", "first-layout / cached step ms"]
    rows = []
    for k, case in report["cases"].items():
        for backend, e in case.items():
            first = e["first_layout_step"]["median_ms"] if e["first_layout_step"] else float("nan")
            cached = e["cached_layout_step"]["median_ms"] if e["cached_layout_step"] else float("nan")
            rows.append([k, backend, f"{e['off']['step']['median_ms']:.1f}", f"{e['on']['step']['median_ms']:.1f}",
                         f"+{100 * e['overhead']:.0f}%",
                         f"{e['off']['self_attention']['median_ms']:.1f} / {e['on']['self_attention']['median_ms']:.1f}",
                         str(e["layouts"]), f"{first:.1f} / {cached:.1f}"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def run_denoising(size: Size, groups, device: torch.device, warmup: int, repeats: int, seed: int,
                  log=print) -> Dict:
    """The `--denoising` report: every K of `groups`, every backend of `denoising_backends`."""
    report = {"benchmark": "train_step_denoising", **common.environment(device), "backends": group_detr.backends(),
              "size": size.description, "denoising_queries": DENOISING_QUERIES, "warmup": warmup,
              "repeats": repeats, "cases": {}}
    for k in groups:
        log(f"{size.name}, K={k}, denoising off vs on ...", flush=True)
        report["cases"][str(k)] = run_denoising_case(size, k, device, warmup, repeats, seed, log)
    report["markdown_table"] = denoising_table(report)
    return report


def _our_backend(size: Size, num_groups: int, device: torch.device) -> str:
    from group_detr.attention import select_backend
    layout = QueryLayout(num_groups=num_groups, queries_per_group=size.config.num_queries)
    head_dim = size.config.hidden_dim // size.config.nheads
    q = torch.empty(1, 1, layout.total_queries, head_dim, device=device)
    return select_backend(q, layout, "auto")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    parser.add_argument("--full", action="store_true", help="also the paper's Conditional DETR-R50 shape")
    parser.add_argument("--sizes", nargs="+", choices=("small", "r50"), help="default: small (+ r50 with --full)")
    parser.add_argument("--groups", type=int, nargs="+", default=list(GROUPS))
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per configuration (default 2)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed steps per configuration (default: small 200 on CPU / 100 on CUDA, "
                             "r50 5 / 30)")
    parser.add_argument("--image-size", type=int, nargs=2, default=(800, 1088), metavar=("H", "W"),
                        help="r50 input size")
    parser.add_argument("--r50-batch", type=int, default=None, help="r50 batch (default: the paper's 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="3 timed steps, no results file")
    parser.add_argument("--denoising", action="store_true",
                        help="denoising on vs off per attention backend, small size (default K = 3)")
    parser.add_argument("--out", help="results JSON (default results/train_step-<machine>.json)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.sizes or (["small", "r50"] if args.full else ["small"])
    sizes = [small_size() if n == "small" else r50_size(args.image_size, args.r50_batch) for n in names]
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    repeats = args.repeats or (3 if args.quick else None)

    started = time.perf_counter()
    if args.denoising:
        groups = args.groups if args.groups != list(GROUPS) else [3]
        report = run_denoising(small_size(), groups, device, warmup, repeats or 100, args.seed)
        report["wall_time_s"] = time.perf_counter() - started
        print("\n" + report["markdown_table"] + f"\n\nwall time {report['wall_time_s']:.0f} s")
        if not args.quick:
            common.write_results(report, args.out or common.results_path("train_step_denoising", report["machine"]))
        return report
    report = run(sizes, args.groups, device, warmup, repeats, args.seed)
    report["wall_time_s"] = time.perf_counter() - started
    report["markdown_table"] = print_report(report)
    for size_name, size in report["sizes"].items():
        for k, case in size["cases"].items():
            diff = case["first_step_loss"]["relative_difference"]
            if size["dropout"] == 0 and diff > 1e-3:
                print(f"WARNING: {size_name} K={k}: the first-step losses differ by {diff:.2e} (relative)")
    print(f"\nwall time {report['wall_time_s']:.0f} s")
    if not args.quick:
        out = common.write_results(report, args.out or common.results_path("train_step", report["machine"]))
        plot(report, os.path.splitext(out)[0] + ".png")
    return report


if __name__ == "__main__":
    main()
