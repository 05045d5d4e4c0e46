"""Builds group_detr._C: the batched linear-assignment op (C++ always, CUDA where possible).

CUDA is compiled only where torch itself was built with CUDA and a CUDA toolkit is found, so the
CPU-only torch used in CI builds the C++ extension alone. The toolkit is found without the user's
help (CUDA_HOME, else where the `nvcc` on the PATH really lives, else /usr/local/cuda), and the
CUDA runtime library is also taken from a CUDA torch's own runtime package when the toolkit has
none (a pip-installed nvcc, say).
"""
import glob
import os
import re
import shutil
import subprocess

ROOT = os.path.dirname(os.path.abspath(__file__))
# Ampere and Hopper machine code, plus Hopper PTX that the driver compiles for newer GPUs.
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
# No --use_fast_math (nor -ftz/-prec-div flags): the solver must do IEEE double arithmetic
# exactly as the CPU solver does, so that assignments are identical. (tests/test_cuda_build.py
# compiles the kernel with these very flags.)
NVCC_FLAGS = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]


def _is_toolkit(folder):
    return bool(folder) and os.path.isfile(os.path.join(folder, "include", "cuda_runtime.h"))


def _nvcc_toolkit():
    """The toolkit of the `nvcc` on the PATH, or None. nvcc itself says where it lives (`TOP` in
    its dry run), which sees through symbolic links and wrapper scripts outside the toolkit: from
    a wrapper in /usr/local/bin torch would guess /usr/local, where no libcudart is."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        dry_run = subprocess.run([nvcc, "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                                 capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        dry_run = None
    if dry_run is not None:
        match = re.search(r"^#\$ TOP=(.+)$", dry_run.stdout + dry_run.stderr, re.MULTILINE)
        top = os.path.realpath(match.group(1).strip()) if match else None
        if _is_toolkit(top):
            return top
    resolved = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return resolved if _is_toolkit(resolved) else None


def find_cuda_home():
    """CUDA_HOME / CUDA_PATH if set, else the toolkit of the nvcc on the PATH, else
    /usr/local/cuda (or the newest /usr/local/cuda-*); None without a toolkit."""
    for name in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(name):
            return os.environ[name]
    candidates = [_nvcc_toolkit(), "/usr/local/cuda"]
    candidates += sorted(glob.glob("/usr/local/cuda-*"), key=_version_key, reverse=True)
    return next((c for c in candidates if _is_toolkit(c)), None)


def _version_key(path):
    return [int(n) for n in re.findall(r"\d+", os.path.basename(path))]


def cudart_link_dir(cuda_home, build_dir=None):
    """A folder to add to the linker's search path for the `-lcudart` that torch's CUDAExtension
    passes, or None when the toolkit's own lib64/lib has libcudart.so.

    A CUDA torch's runtime package (nvidia/cu13/lib, or nvidia/cuda_runtime/lib for CUDA 12)
    ships only the versioned libcudart.so.N, which `-lcudart` does not find: build_dir/cudart
    gets a libcudart.so link to it. At run time the extension uses the libcudart that torch has
    already loaded (same soname)."""
    for lib in ("lib64", "lib"):
        if os.path.isfile(os.path.join(cuda_home, lib, "libcudart.so")):
            return None
    import torch

    try:
        import nvidia  # a namespace package, present with a pip CUDA torch
    except ImportError:
        return None
    major = (torch.version.cuda or "").split(".")[0]
    for base in nvidia.__path__:
        for folder in (os.path.join(base, f"cu{major}", "lib"),
                       os.path.join(base, "cuda_runtime", "lib")):
            versioned = sorted(glob.glob(os.path.join(folder, f"libcudart.so.{major}*")))
            if versioned:
                link_dir = os.path.join(build_dir or os.path.join(ROOT, "build"), "cudart")
                os.makedirs(link_dir, exist_ok=True)
                link = os.path.join(link_dir, "libcudart.so")
                if os.path.lexists(link):
                    os.remove(link)
                os.symlink(versioned[0], link)
                return link_dir
    return None


def with_cuda():
    """Whether to build the CUDA solver; settles CUDA_HOME for torch.utils.cpp_extension."""
    import torch

    if os.environ.get("GROUP_DETR_FORCE_CPU", "0") == "1" or not torch.version.cuda:
        return False
    cuda_home = find_cuda_home()
    if cuda_home is None:
        return False
    # Before torch.utils.cpp_extension is imported: it reads CUDA_HOME once, at import.
    os.environ["CUDA_HOME"] = cuda_home
    return True


def extensions(cpp_extension, cuda):
    sources = ["csrc/lsa/lsa.cpp", "csrc/lsa/lsa_cpu.cpp", "csrc/cost/match_cost_cpu.cpp",
               "csrc/cost/group_match_cpu.cpp"]
    # -std=c++20: torch's own c10/ATen headers need it from torch 2.14 on (std::strong_ordering,
    # `requires`). -fopenmp: at::parallel_for is inline OpenMP code compiled into this extension;
    # without the flag it silently runs on one thread. -fno-wrapv undoes the -fwrapv that
    # Python's own compiler flags add: with it the solver ran 14% slower (measured, dino_k1_900).
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-fno-wrapv"]
    define_macros = []
    ext_class = cpp_extension.CppExtension
    extra = {"cxx": cxx}
    library_dirs = []
    if cuda:
        ext_class = cpp_extension.CUDAExtension
        sources.append("csrc/lsa/lsa_cuda.cu")
        define_macros.append(("GROUP_DETR_WITH_CUDA", None))
        # TORCH_CUDA_ARCH_LIST is honoured by cpp_extension.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
        extra["nvcc"] = NVCC_FLAGS
        link_dir = cudart_link_dir(os.environ["CUDA_HOME"])
        if link_dir is not None:
            library_dirs.append(link_dir)
    return [
        ext_class(
            "group_detr._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            library_dirs=library_dirs,
            define_macros=define_macros,
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
        )
    ]


# Only under __main__ (pip's setuptools backend runs this file so too): tests and scripts import
# this file for find_cuda_home() and the flags, with neither torch nor setuptools needed.
if __name__ == "__main__":
    from setuptools import setup

    cuda = with_cuda()
    from torch.utils import cpp_extension  # after with_cuda() has settled CUDA_HOME

    setup(
        ext_modules=extensions(cpp_extension, cuda),
        cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    )
