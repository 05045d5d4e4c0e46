import contextlib
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # shared workload generators

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _has_pycocotools() -> bool:
    try:
        import pycocotools.coco  # noqa: F401
    except ImportError:
        return False
    return True


# Reading COCO files and COCOeval need pycocotools; the GPU image has none, the package imports without it.
requires_pycocotools = pytest.mark.skipif(not _has_pycocotools(), reason="needs pycocotools")


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny tensors: extra intra-op threads only add synchronisation, and they
    slow the tests down badly when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The builds of the CPU kernels (fused cost, solver scan), by the GROUP_DETR_CPU_SCAN cap that
# selects each: "best" is whatever this CPU runs best (AVX-512, AVX2 or portable).
CPU_BUILDS = ("best", "avx2", "portable")


@contextlib.contextmanager
def cpu_build(build: str):
    """Run the CPU kernels of one of CPU_BUILDS inside the block (an environment variable the
    extension reads at every call)."""
    previous = os.environ.pop("GROUP_DETR_CPU_SCAN", None)
    if build != "best":
        os.environ["GROUP_DETR_CPU_SCAN"] = build
    try:
        yield
    finally:
        os.environ.pop("GROUP_DETR_CPU_SCAN", None)
        if previous is not None:
            os.environ["GROUP_DETR_CPU_SCAN"] = previous


@pytest.fixture(params=CPU_BUILDS)
def each_cpu_build(request):
    """Run a test once with each build of the CPU kernels."""
    with cpu_build(request.param):
        yield request.param
