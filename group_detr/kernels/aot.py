"""Ahead-of-time compilation of the Triton kernels for GPUs this machine does not have.

Triton compiles for any NVIDIA target offline (its wheel ships ptxas), so a CPU machine can prove
what a GPU would otherwise show on the first call: that every configuration the launcher picks
compiles for sm_80 (A100) and sm_90 (H100 / H200), fits the target's shared memory and does not
spill registers. The launches are the launchers' own: `forward` / `backward` run on CPU tensors
with the launch point recorded instead of launched, then Triton's own binder turns each recorded
call into the signature, constants and specialisation it would compile, and `triton.compile`
compiles it for the target. Its `ptxas -v` log gives registers, stack frame and spills.

Used by tests/test_kernel_aot.py and scripts/kernel_resources.py. Every compile runs in a worker
process started without TRITON_INTERPRET (the interpreter replaces the kernels at import, and the
kernel tests switch it on in theirs), so this module imports neither Triton nor the kernels at
the top.
"""
import concurrent.futures
import contextlib
import io
import multiprocessing
import os
import re
import subprocess
import tempfile
import time
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from group_detr.kernels import DTYPES, HEAD_DIMS
from group_detr.layout import QueryLayout

# compute capability -> the most dynamic shared memory one block may use (bytes)
TARGETS = {80: 163 * 1024, 90: 227 * 1024}
# a DINO-style layout with several tiles per group and tails: the recorded launches specialise
# their integer arguments (strides, L) the way a training run's do (none is 1, few are % 16)
AOT_LAYOUT = QueryLayout(num_groups=3, queries_per_group=150, num_denoising=60,
                         denoising_groups=3)
AOT_BATCH, AOT_HEADS = 2, 8

Key = Tuple[int, torch.dtype, bool, int]  # head_dim, dtype, has_dropout, capability


def keys(head_dims: Iterable[int] = HEAD_DIMS, dtypes: Iterable[torch.dtype] = DTYPES,
         capabilities: Iterable[int] = tuple(TARGETS)) -> List[Key]:
    """Every (head_dim, dtype, has_dropout, capability) the launchers can meet."""
    return [(d, t, p, c) for c in capabilities for t in dtypes for d in head_dims
            for p in (False, True)]


def recorded_launches(head_dim: int, dtype: torch.dtype, has_dropout: bool):
    """[(name, args, constants)] of one forward and backward, as the launchers build them for
    q `(AOT_BATCH, AOT_HEADS, L, head_dim)` on a GPU, recorded instead of launched."""
    from group_detr.kernels import grouped_attention as launchers

    recorded = []
    saved = launchers._launch, launchers._check_device
    launchers._launch = lambda name, grid, args, constants, device: recorded.append(
        (name, args, constants))
    launchers._check_device = lambda q: None
    try:
        shape = (AOT_BATCH, AOT_HEADS, AOT_LAYOUT.total_queries, head_dim)
        q, k, v = (torch.zeros(shape, dtype=dtype) for _ in range(3))
        dropout_p = 0.1 if has_dropout else 0.0
        out, lse = launchers.forward(q, k, v, AOT_LAYOUT, dropout_p=dropout_p, seed=1)
        launchers.backward(out, q, k, v, out, lse, AOT_LAYOUT, dropout_p=dropout_p, seed=1)
    finally:
        launchers._launch, launchers._check_device = saved
    return recorded


def _ptxas_path(capability: int) -> str:
    """The ptxas Triton itself runs for this target (Triton 3.9 picks one per architecture;
    Triton 3.6 has one)."""
    from triton.backends.nvidia import compiler as nvidia

    if hasattr(nvidia, "get_ptxas"):
        return nvidia.get_ptxas(capability).path
    return nvidia._path_to_binary("ptxas")[0]


def _ptxas_resources(log: str, ptx: str, capability: int) -> Dict[str, int]:
    """registers, stack frame and spill bytes of the kernel, from the `ptxas -v` log Triton
    printed while compiling, or (a cache hit, no log) from running the same ptxas on the PTX."""
    if "registers" not in log:
        arch = "sm_90a" if capability == 90 else f"sm_{capability}"  # what Triton targets
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "kernel.ptx")
            with open(path, "w") as f:
                f.write(ptx)
            log = subprocess.run([_ptxas_path(capability), "-v", f"--gpu-name={arch}", path,
                                  "-o", os.path.join(tmp, "kernel.cubin")],
                                 capture_output=True, text=True, check=True).stderr

    def number(pattern):
        match = re.search(pattern, log)
        return int(match.group(1)) if match else 0

    return {"registers": number(r"Used (\d+) registers"),
            "stack_bytes": number(r"(\d+) bytes stack frame"),
            "spill_store_bytes": number(r"(\d+) bytes spill stores"),
            "spill_load_bytes": number(r"(\d+) bytes spill loads")}


def compile_key(key: Key, configs: Optional[list] = None) -> List[dict]:
    """Compile the launches of `key` for its target, each with the launcher's configuration
    (or, with `configs` [LaunchConfig], with each of those): one resource row per compile."""
    os.environ.pop("TRITON_INTERPRET", None)  # before triton's first import in this worker
    saved = os.environ.get("TRITON_CACHE_DIR")
    # a cold cache: every compile runs ptxas with Triton's own options and logs what it used
    with tempfile.TemporaryDirectory(prefix="group-detr-aot-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        try:
            return _compile_key(key, configs)
        finally:
            if saved is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = saved


def _compile_key(key: Key, configs: Optional[list]) -> List[dict]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    from group_detr.kernels import grouped_attention as launchers

    head_dim, dtype, has_dropout, capability = key
    triton.knobs.nvidia.dump_ptxas_log = True
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    rows = []
    for name, args, constants in recorded_launches(head_dim, dtype, has_dropout):
        if name == "preprocess" and has_dropout:
            continue  # no dropout argument: compiled with the key without dropout
        kernel, inner = launchers._KERNELS[name]
        chosen = launchers.launch_config(name, head_dim, dtype, has_dropout,
                                         (capability // 10, capability % 10))
        for config in (configs if configs and name != "preprocess" else [chosen]):
            options = dict(constants, num_warps=config.num_warps, num_stages=config.num_stages)
            if inner:
                options[inner] = config.block
            binder = create_function_from_signature(kernel.signature, kernel.params, backend)
            bound, specialization, parsed = binder(*args, **options)
            opts, signature, constexprs, attrs = kernel._pack_args(
                backend, options, bound, specialization, parsed)
            start = time.perf_counter()
            log = io.StringIO()
            with contextlib.redirect_stdout(log):  # Triton prints ptxas -v here (no cache hit)
                compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                                          target=target, options=opts.__dict__)
            seconds = time.perf_counter() - start
            rows.append({
                "kernel": name, "head_dim": head_dim, "dtype": str(dtype).replace("torch.", ""),
                "dropout": has_dropout, "target": f"sm_{capability}", "block": config.block,
                "num_warps": config.num_warps, "num_stages": config.num_stages,
                "chosen": config == chosen,
                "shared_bytes": int(compiled.metadata.shared),
                "shared_limit_bytes": TARGETS[capability],
                **_ptxas_resources(log.getvalue(), compiled.asm["ptx"], capability),
                "compile_s": round(seconds, 2),
            })
    return rows


def compile_all(keys_to_compile: List[Key], processes: int = 2, configs=None) -> List[dict]:
    """`compile_key` over keys in `processes` fresh worker processes (spawned: no inherited
    Triton state), rows in key order."""
    context = multiprocessing.get_context("spawn")
    interpret = os.environ.pop("TRITON_INTERPRET", None)  # the workers inherit the environment
    try:
        with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context) as pool:
            results = list(pool.map(compile_key, keys_to_compile,
                                    [configs] * len(keys_to_compile)))
    finally:
        if interpret is not None:
            os.environ["TRITON_INTERPRET"] = interpret
    return [row for rows in results for row in rows]


def problems(rows: List[dict]) -> List[str]:
    """What the launcher must never meet: shared memory over the target's limit, and register
    spills in a half-precision configuration it picks (float32 may spill: it is reported)."""
    found = []
    for row in rows:
        where = (f"{row['kernel']} D={row['head_dim']} {row['dtype']} dropout={row['dropout']} "
                 f"{row['target']} block={row['block']} warps={row['num_warps']} "
                 f"stages={row['num_stages']}")
        if row["shared_bytes"] > row["shared_limit_bytes"]:
            found.append(f"{where}: {row['shared_bytes']} B shared > {row['shared_limit_bytes']}")
        spills = row["spill_store_bytes"] + row["spill_load_bytes"]
        if row["chosen"] and spills and row["dtype"] != "float32":
            found.append(f"{where}: spills {spills} B, stack {row['stack_bytes']} B")
    return found
