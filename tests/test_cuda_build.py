"""The CUDA build, checked without a GPU.

(a) nvcc compiles the solver kernel (csrc/lsa/lsa_cuda_kernel.cuh, torch-free) alone, with
    setup.py's own nvcc flags and -Werror, for every architecture setup.py builds by default;
    ptxas's report (-Xptxas -v) of each kernel instantiation is held against limits: registers,
    stack frame, spill stores and loads, static shared memory. Skipped where no toolkit is found.
(b) the dynamic shared memory one warp needs (lsa::warp_workspace_bytes, compiled here with the
    host compiler) for each matcher workload of benchmarks/workloads.json, against each target's
    shared memory per block: a full block of 4 warps must fit, so that no benchmark shape falls
    back to global scratch.
(c) where torch has CUDA and group_detr._C was built against it (GROUP_DETR_EXPECT_CUDA_BUILD=1
    turns the skip into a failure: scripts/ci_cuda_build.sh and gpu_check.sh set it):
    batched_lsa has its CUDA kernel registered, the library holds sm_80 and sm_90 machine code
    and PTX for the newest architecture, and the built kernels meet the limits of (a)
    (cuobjdump --dump-resource-usage).
(d) the wheel scripts/ci_cuda_build.sh builds from that build (GROUP_DETR_CUDA_WHEEL): its
    extension needs libcudart by soname only (no RPATH/RUNPATH into the build machine's
    toolkit), holds the same machine code and PTX, and imported from the unpacked wheel outside
    the tree with no CUDA_HOME, CUDA_PATH or LD_LIBRARY_PATH it registers its CUDA kernel with
    the libcudart of torch's runtime package loaded.
"""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

from conftest import ROOT

_spec = importlib.util.spec_from_file_location("group_detr_setup", os.path.join(ROOT, "setup.py"))
setup_py = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(setup_py)  # functions and flags only: setup() runs under __main__

CSRC = os.path.join(ROOT, "csrc")
CUDA_HOME = setup_py.find_cuda_home()
NVCC = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None


def find_cuobjdump():
    """The toolkit's cuobjdump, else one on the PATH, else the copy the Triton wheel ships."""
    candidates = [os.path.join(CUDA_HOME, "bin", "cuobjdump")] if CUDA_HOME else []
    candidates.append(shutil.which("cuobjdump"))
    triton = importlib.util.find_spec("triton")
    if triton is not None and triton.submodule_search_locations:
        candidates += [os.path.join(p, "backends", "nvidia", "bin", "cuobjdump")
                       for p in triton.submodule_search_locations]
    return next((c for c in candidates if c and os.path.isfile(c)), None)


CUOBJDUMP = find_cuobjdump()
# "8.0;9.0+PTX" -> ["80", "90"], and the architecture whose PTX is embedded.
ARCHS = [a.split("+")[0].replace(".", "") for a in setup_py.DEFAULT_ARCH_LIST.split(";")]
PTX_ARCHS = [a.split("+")[0].replace(".", "") for a in setup_py.DEFAULT_ARCH_LIST.split(";")
             if a.endswith("+PTX")]

# Limits of the solver kernel, per instantiation (float, double) and architecture. 128
# registers: above it fewer than 16 warps of 128-thread blocks fit an SM's 64K registers (the
# kernel uses 94 today). No stack frame and no spills: per-lane state is meant to stay in
# registers, everything per problem lives in dynamic shared memory (or global scratch) that
# plan_launch sizes, hence no static shared memory either.
MAX_REGISTERS = 128
# Shared memory per block with opt-in, bytes: A100 (sm_80) 163 KB, H100/H200 (sm_90) 227 KB.
SHARED_PER_BLOCK_OPTIN = {"80": 163 * 1024, "90": 227 * 1024}
WARPS_PER_BLOCK = 4  # plan_launch's largest block
# cuobjdump's SHARED of an sm_90 kernel includes the 1 KB per block that Hopper reserves for the
# system (a kernel with no shared memory at all shows 1024 there); ptxas -v leaves it out.
RESERVED_SHARED = {"80": 0, "90": 1024}

needs_nvcc = pytest.mark.skipif(NVCC is None or not os.path.exists(NVCC),
                                reason="no CUDA toolkit (nvcc) found")


def parse_ptxas(report: str) -> dict:
    """ptxas -v's report -> {(arch, kernel): {registers, stack, spill_stores, spill_loads, smem}}."""
    usage = {}
    current = None
    for line in report.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for 'sm_(\d+)'", line)
        if m:
            current = (m.group(2), m.group(1))
            usage[current] = {"smem": 0}
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      line)
        if m:
            usage[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                                  spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            usage[current]["registers"] = int(m.group(1))
            m = re.search(r"(\d+) bytes smem", line)
            usage[current]["smem"] = int(m.group(1)) if m else 0
    return usage


@pytest.fixture(scope="module")
def ptxas_usage(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kernel")
    source = tmp / "kernel_only.cu"
    source.write_text(
        "#define GROUP_DETR_INSTANTIATE_LSA_KERNEL\n#include \"lsa/lsa_cuda_kernel.cuh\"\n"
    )
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    cmd = [NVCC, *setup_py.NVCC_FLAGS, "-I", CSRC, *gencode, "-Werror", "all-warnings",
           "-Xptxas", "-v", "-c", str(source), "-o", str(tmp / "kernel_only.o")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    return parse_ptxas(result.stdout + result.stderr)


def check_limits(name, usage):
    assert usage["registers"] <= MAX_REGISTERS, (name, usage)
    assert usage["stack"] == 0, (name, usage)
    assert usage["spill_stores"] == 0 and usage["spill_loads"] == 0, (name, usage)
    assert usage["smem"] == 0, (name, usage)


@needs_nvcc
@pytest.mark.parametrize("dtype", ["float", "double"])
@pytest.mark.parametrize("arch", ARCHS)
def test_kernel_resources_within_limits(ptxas_usage, arch, dtype):
    # Itanium mangling of batched_lsa_kernel<float> / <double>: ...IfEE... / ...IdEE...
    kernels = {k: u for (a, k), u in ptxas_usage.items()
               if a == arch and "batched_lsa_kernel" in k and f"I{dtype[0]}EE" in k}
    assert len(kernels) == 1, sorted(ptxas_usage)
    (name, usage), = kernels.items()
    print(f"sm_{arch} {dtype}: {usage}")
    check_limits(name, usage)


def test_parse_ptxas_report():
    report = (
        "ptxas info    : Compiling entry function '_Z1kIfEvv' for 'sm_90'\n"
        "ptxas info    : Function properties for _Z1kIfEvv\n"
        "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 96 registers, used 1 barriers, 256 bytes smem, 400 bytes cmem[0]\n"
    )
    usage = parse_ptxas(report)
    assert usage == {("90", "_Z1kIfEvv"): {"registers": 96, "stack": 8, "spill_stores": 4,
                                           "spill_loads": 4, "smem": 256}}
    with pytest.raises(AssertionError):
        check_limits("_Z1kIfEvv", usage[("90", "_Z1kIfEvv")])


# --- the toolkit and the CUDA runtime, found without the user's help ----------------------------

@needs_nvcc
@pytest.mark.parametrize("how", ["wrapper", "symlink"])
def test_cuda_home_behind_a_wrapper_or_link(tmp_path, monkeypatch, how):
    """An nvcc on the PATH that is a wrapper script (or a link) outside the toolkit: torch would
    take its parent folder for CUDA_HOME; setup.py asks nvcc where it lives."""
    toolkit = os.path.realpath(CUDA_HOME)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    nvcc = bin_dir / "nvcc"
    if how == "wrapper":
        nvcc.write_text(f'#!/bin/sh\nexec "{os.path.join(toolkit, "bin", "nvcc")}" "$@"\n')
        nvcc.chmod(0o755)
    else:
        nvcc.symlink_to(os.path.join(toolkit, "bin", "nvcc"))
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert os.path.realpath(setup_py.find_cuda_home()) == toolkit


def test_cuda_home_from_the_environment_wins(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    assert setup_py.find_cuda_home() == str(tmp_path)


@pytest.mark.skipif(not torch.version.cuda or importlib.util.find_spec("nvidia") is None,
                    reason="needs a pip CUDA torch (its nvidia runtime package)")
def test_cudart_from_torch_runtime_package_links(tmp_path):
    """A toolkit without runtime libraries (pip's nvcc, say): `-lcudart` is served from the CUDA
    torch's own runtime package, and a program linked so runs."""
    toolkit = tmp_path / "toolkit"
    (toolkit / "include").mkdir(parents=True)
    link_dir = setup_py.cudart_link_dir(str(toolkit), str(tmp_path / "build"))
    assert link_dir is not None
    target = os.path.realpath(os.path.join(link_dir, "libcudart.so"))
    major = torch.version.cuda.split(".")[0]
    assert re.fullmatch(rf"libcudart\.so\.{major}(\.\d+)*", os.path.basename(target)), target
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        pytest.skip("no C compiler")
    (tmp_path / "version.c").write_text(
        "#include <stdio.h>\nint cudaRuntimeGetVersion(int*);\n"
        "int main(void) { int v = 0; int err = cudaRuntimeGetVersion(&v);"
        ' printf("%d %d\\n", err, v); return err; }\n')
    subprocess.run([compiler, str(tmp_path / "version.c"), "-L", link_dir, "-lcudart",
                    "-o", str(tmp_path / "version")], check=True, timeout=120)
    run = subprocess.run([str(tmp_path / "version")], capture_output=True, text=True,
                         env={**os.environ, "LD_LIBRARY_PATH": os.path.dirname(target)})
    assert run.returncode == 0, run
    err, version = map(int, run.stdout.split())
    assert version // 1000 == int(major), run.stdout


@needs_nvcc
def test_toolkit_with_its_own_cudart_needs_no_link_dir():
    if not any(os.path.isfile(os.path.join(CUDA_HOME, lib, "libcudart.so"))
               for lib in ("lib64", "lib")):
        pytest.skip("this toolkit has no libcudart.so of its own")
    assert setup_py.cudart_link_dir(CUDA_HOME) is None


# --- (b) shared memory per problem-size class -------------------------------------------------

def matcher_size_classes():
    with open(os.path.join(ROOT, "benchmarks", "workloads.json")) as f:
        workloads = json.load(f)["matcher"]
    classes = {}
    for name, w in workloads.items():
        targets = w.get("fixed_targets", w.get("max_targets"))
        classes[name] = (w["queries_per_group"], targets)
    return classes


@pytest.fixture(scope="module")
def workspace_bytes(tmp_path_factory):
    """lsa::warp_workspace_bytes(max_rows, max_cols) for each size class, from the header."""
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        pytest.skip("no C++ compiler")
    classes = matcher_size_classes()
    tmp = tmp_path_factory.mktemp("workspace")
    calls = "".join(
        f'  std::printf("{name} %lld\\n", (long long)group_detr::lsa::warp_workspace_bytes('
        f"{min(q, t)}, {max(q, t)}));\n" for name, (q, t) in classes.items())
    (tmp / "sizes.cpp").write_text(
        '#include <cstdio>\n#include "lsa/warp_scan.h"\nint main() {\n' + calls + "}\n")
    subprocess.run([compiler, "-std=c++20", "-I", CSRC, str(tmp / "sizes.cpp"),
                    "-o", str(tmp / "sizes")], check=True, timeout=300)
    output = subprocess.run([str(tmp / "sizes")], capture_output=True, text=True, check=True)
    return {name: int(n) for name, n in (line.split() for line in output.stdout.splitlines())}


@pytest.mark.parametrize("arch", sorted(SHARED_PER_BLOCK_OPTIN))
def test_benchmark_problems_fit_shared_memory(workspace_bytes, arch):
    assert set(workspace_bytes) == set(matcher_size_classes())
    for name, per_warp in workspace_bytes.items():
        assert 0 < per_warp and WARPS_PER_BLOCK * per_warp <= SHARED_PER_BLOCK_OPTIN[arch], (
            name, per_warp, arch)


# --- (c) the built extension ------------------------------------------------------------------

def _built_library():
    import group_detr._ext as ext
    return ext._C.__file__ if ext._C is not None else None


EXPECT_CUDA_BUILD = os.environ.get("GROUP_DETR_EXPECT_CUDA_BUILD", "0") == "1"
requires_cuda_build = pytest.mark.skipif(
    not EXPECT_CUDA_BUILD and not (torch.version.cuda and CUDA_HOME
                                   and os.environ.get("GROUP_DETR_FORCE_CPU", "0") != "1"),
    reason="torch without CUDA, no CUDA toolkit or GROUP_DETR_FORCE_CPU=1: no CUDA build",
)


@requires_cuda_build
def test_built_extension_registers_cuda_kernel():
    assert _built_library() is not None, "group_detr._C is not built"
    assert torch.version.cuda, "GROUP_DETR_EXPECT_CUDA_BUILD=1 needs a CUDA build of torch"
    assert torch._C._dispatch_has_kernel_for_dispatch_key("group_detr::batched_lsa", "CUDA")


def _cuobjdump(*args, library=None):
    if CUOBJDUMP is None:
        pytest.skip("cuobjdump not found")
    result = subprocess.run([CUOBJDUMP, *args, library or _built_library()], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def check_cubins_and_ptx(library=None):
    """sm_80 and sm_90 machine code and the newest architecture's PTX in the library."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST", setup_py.DEFAULT_ARCH_LIST) != \
            setup_py.DEFAULT_ARCH_LIST:
        pytest.skip("built for a TORCH_CUDA_ARCH_LIST of the user's")
    elf = _cuobjdump("--list-elf", library=library)
    for arch in ARCHS:
        assert f".sm_{arch}." in elf, elf
    ptx = _cuobjdump("--list-ptx", library=library)
    for arch in PTX_ARCHS:
        assert f".sm_{arch}." in ptx, ptx
    assert len(ptx.splitlines()) >= len(PTX_ARCHS)


@requires_cuda_build
def test_built_extension_holds_cubins_and_ptx():
    check_cubins_and_ptx()


def parse_resource_usage(report: str) -> dict:
    """cuobjdump --dump-resource-usage -> {(arch, kernel): {"REG": .., "STACK": .., ...}}: an
    "arch = sm_90" header per cubin, then "Function <name>:" and a line "REG:94 STACK:0 ..."."""
    usage, arch, function = {}, None, None
    for line in report.splitlines():
        m = re.search(r"arch = sm_(\d+)", line)
        if m:
            arch = m.group(1)
        m = re.match(r"\s*Function (\S+):\s*$", line)
        if m:
            function = m.group(1)
        elif function is not None:
            usage[(arch, function)] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}
            function = None
    return usage


@requires_cuda_build
def test_built_kernel_resources_within_limits():
    usage = parse_resource_usage(_cuobjdump("--dump-resource-usage"))
    kernels = {key: u for key, u in usage.items() if "batched_lsa_kernel" in key[1]}
    assert {arch for arch, _ in kernels} == set(ARCHS), usage
    assert len(kernels) == 2 * len(ARCHS), kernels  # float and double per architecture
    for (arch, name), u in kernels.items():
        print(f"built sm_{arch} {name}: {u}")
        check_limits(name, {"registers": u["REG"], "stack": u["STACK"], "spill_stores": u["LOCAL"],
                            "spill_loads": u["LOCAL"],
                            "smem": u["SHARED"] - RESERVED_SHARED.get(arch, 0)})


# --- (d) the CUDA wheel, as a user installs it ------------------------------------------------
# scripts/ci_cuda_build.sh builds a wheel from the CUDA build and sets GROUP_DETR_CUDA_WHEEL.

CUDA_WHEEL = os.environ.get("GROUP_DETR_CUDA_WHEEL")
requires_cuda_wheel = pytest.mark.skipif(
    not CUDA_WHEEL, reason="GROUP_DETR_CUDA_WHEEL is not set (scripts/ci_cuda_build.sh sets it)")


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory):
    """The wheel unpacked as pip installs it: a site folder of its own, no source tree."""
    site = tmp_path_factory.mktemp("wheel_site")
    with zipfile.ZipFile(CUDA_WHEEL) as wheel:
        wheel.extractall(site)
    return site


def wheel_library(site):
    libraries = sorted((site / "group_detr").glob("_C*.so"))
    assert len(libraries) == 1, libraries
    return str(libraries[0])


def readelf_dynamic(library) -> dict:
    """NEEDED, RPATH and RUNPATH entries of a shared library's dynamic section (readelf -d)."""
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf not found")
    out = subprocess.run([readelf, "-d", library], capture_output=True, text=True, check=True,
                         timeout=60).stdout
    entries = {"NEEDED": [], "RPATH": [], "RUNPATH": []}
    for tag, value in re.findall(r"\((NEEDED|RPATH|RUNPATH)\)\s+[^\[]*\[([^\]]*)\]", out):
        entries[tag].append(value)
    return entries


def test_parse_readelf_dynamic(monkeypatch):
    report = ("Dynamic section at offset 0x1 contains 3 entries:\n"
              "  Tag        Type                         Name/Value\n"
              " 0x0000000000000001 (NEEDED)             Shared library: [libcudart.so.13]\n"
              " 0x0000000000000001 (NEEDED)             Shared library: [libc10.so]\n"
              " 0x000000000000001d (RUNPATH)            Library runpath: [$ORIGIN/../torch/lib]\n")
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/readelf")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, report))
    assert readelf_dynamic("x.so") == {"NEEDED": ["libcudart.so.13", "libc10.so"], "RPATH": [],
                                       "RUNPATH": ["$ORIGIN/../torch/lib"]}


@requires_cuda_wheel
def test_wheel_library_needs_cudart_by_name_only(wheel_site):
    """The wheel's extension asks for libcudart by its soname and carries no search path of the
    build machine (its toolkit's lib64 is not on a user's machine): the libcudart it gets is the
    one the CUDA torch has loaded already."""
    dynamic = readelf_dynamic(wheel_library(wheel_site))
    major = torch.version.cuda.split(".")[0]
    assert any(re.fullmatch(rf"libcudart\.so\.{major}", n) for n in dynamic["NEEDED"]), dynamic
    assert not any(os.path.isabs(n) for n in dynamic["NEEDED"]), dynamic
    for paths in dynamic["RPATH"] + dynamic["RUNPATH"]:
        for entry in paths.split(":"):
            assert entry.startswith("$ORIGIN"), dynamic


@requires_cuda_wheel
def test_wheel_holds_cubins_and_ptx(wheel_site):
    check_cubins_and_ptx(wheel_library(wheel_site))


@requires_cuda_wheel
def test_wheel_loads_without_cuda_home(wheel_site, tmp_path):
    """From outside the tree, with no CUDA_HOME, CUDA_PATH or LD_LIBRARY_PATH: the wheel's
    group_detr imports, registers its CUDA kernel, and the process's libcudart is torch's
    (its runtime package in site-packages), not the toolkit's."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("CUDA_HOME", "CUDA_PATH", "LD_LIBRARY_PATH", "PYTHONPATH")}
    env["PYTHONPATH"] = str(wheel_site)
    code = (
        "import torch, group_detr, group_detr._ext as ext\n"
        "assert ext._C is not None, 'group_detr._C did not load'\n"
        "print(group_detr.__file__)\n"
        "print(torch._C._dispatch_has_kernel_for_dispatch_key('group_detr::batched_lsa', 'CUDA'))\n"
        "import json\n"
        "print(json.dumps(sorted({l.split()[-1] for l in open('/proc/self/maps') if 'libcudart' in l})))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    module_file, has_kernel, cudart = run.stdout.splitlines()[-3:]
    assert module_file.startswith(str(wheel_site)), module_file
    assert has_kernel == "True"
    cudart = json.loads(cudart)
    torch_site = os.path.dirname(os.path.dirname(torch.__file__))
    assert cudart and all(os.path.realpath(p).startswith(os.path.realpath(torch_site))
                          for p in cudart), (cudart, torch_site)
    if CUDA_HOME:
        assert not any(os.path.realpath(p).startswith(os.path.realpath(CUDA_HOME))
                       for p in cudart), cudart
