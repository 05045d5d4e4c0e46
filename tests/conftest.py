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
