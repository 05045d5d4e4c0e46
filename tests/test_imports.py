"""The import graph of group_detr goes one way (ARCHITECTURE.md): no cycles, kernels below attention,
the data room below the models and the engine.

Imports are read from the source (ast), including the ones inside functions: a lazy import that
points back up is still an arrow the wrong way. Also: the package and the model builders import
without pycocotools, and `from group_detr import GroupMatcher` loads no model code.
"""
import ast
import os
import subprocess
import sys
from typing import Dict, Set

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "group_detr"


def package_modules() -> Dict[str, str]:
    """{dotted module name: file path} of every .py file of the package."""
    modules = {}
    for directory, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(directory, name)
            parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def imports_of(module: str, path: str, known: Set[str]) -> Set[str]:
    """The package modules `module` imports anywhere in its source."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    is_package = path.endswith("__init__.py")
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package that holds `module`
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            # `from a.b import c` imports a.b, and a.b.c when c is a module
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            # `import a.b.c` needs a.b.c; resolve to the longest known module prefix
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def import_graph() -> Dict[str, Set[str]]:
    modules = package_modules()
    # The root __init__ imports its exports lazily by name (importlib), so it has no arrows; a
    # subpackage's __init__ importing its submodules does, and a submodule importing its own
    # subpackage back is then a cycle.
    return {m: imports_of(m, p, set(modules)) for m, p in modules.items()}


def find_cycle(graph: Dict[str, Set[str]]):
    """One import cycle as a list of modules, or None."""
    state: Dict[str, int] = {}  # 1 = on the current path, 2 = done
    path = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_graph_reader_sees_lazy_and_relative_imports():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    graph = import_graph()
    assert "group_detr.evaluation" in graph["group_detr.engine"]  # a top-level import
    assert "group_detr.visualize" in graph["group_detr.engine"]  # an import inside a function


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_kernels_import_neither_attention_nor_models():
    graph = import_graph()
    kernels = [m for m in graph if m == f"{PACKAGE}.kernels" or m.startswith(f"{PACKAGE}.kernels.")]
    if not kernels:
        pytest.skip("no group_detr/kernels package in this tree")
    for module in kernels:
        bad = {t for t in graph[module] if t == f"{PACKAGE}.attention" or t.startswith(f"{PACKAGE}.models")}
        assert not bad, f"{module} imports {sorted(bad)}"


def test_lower_rooms_do_not_import_the_training_engine():
    graph = import_graph()
    upper = {f"{PACKAGE}.engine", f"{PACKAGE}.__main__", f"{PACKAGE}.analysis"}
    for module, targets in graph.items():
        if module in upper or module == PACKAGE:
            continue
        assert not targets & upper, f"{module} imports {sorted(targets & upper)}"
    assert not graph[f"{PACKAGE}.config"], "config.py must stay a leaf"


def test_data_imports_only_settings_box_ops_and_distributed():
    graph = import_graph()
    # PACKAGE: `from group_detr import distributed` names the root, whose __init__ imports nothing
    allowed = {PACKAGE, f"{PACKAGE}.config", f"{PACKAGE}.box_ops", f"{PACKAGE}.distributed"}
    data = [m for m in graph if m == f"{PACKAGE}.data" or m.startswith(f"{PACKAGE}.data.")]
    assert f"{PACKAGE}.data.loading" in data
    for module in data:
        bad = {t for t in graph[module] if t not in allowed and not t.startswith(f"{PACKAGE}.data")}
        assert not bad, f"{module} imports {sorted(bad)}"


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_importing_the_package_needs_no_pycocotools():
    # pycocotools made unimportable: the package, the detector and the engine's builders must load
    code = ("import sys; sys.modules['pycocotools'] = None\n"
            "import group_detr\n"
            "from group_detr.engine import build_model, build_criterion\n"
            "from group_detr.config import demo_config\n"
            "model = build_model(demo_config(), 5)\n"
            "print('ok')")
    result = _run(code)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr


def test_group_matcher_imports_no_model_code():
    result = _run("import sys\nfrom group_detr import GroupMatcher\n"
                  "print(sorted(m for m in sys.modules if m.startswith('group_detr')))")
    assert result.returncode == 0, result.stderr
    loaded = result.stdout
    for heavy in ("group_detr.models", "group_detr.attention", "group_detr.engine", "group_detr.data"):
        assert f"'{heavy}" not in loaded, f"{heavy} loaded by `from group_detr import GroupMatcher`: {loaded}"


def test_every_public_name_resolves():
    import group_detr

    for name in group_detr.__all__:
        assert getattr(group_detr, name) is not None
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        group_detr.nope  # noqa: B018
