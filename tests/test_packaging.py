"""The release's single sources of truth: one version, the licence, and an sdist that holds
everything a build from it needs."""
import importlib.metadata
import inspect
import os
import subprocess
import sys
import tarfile

import pytest

import group_detr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_version_is_the_package_metadata_and_the_changelog_lists_it():
    assert group_detr.__version__ == importlib.metadata.version("group-detr")
    with open(os.path.join(ROOT, "CHANGELOG.md")) as f:
        assert f"## {group_detr.__version__} (" in f.read()


def test_license_file_matches_the_declared_licence():
    assert importlib.metadata.metadata("group-detr")["License-Expression"] == "Apache-2.0"
    with open(os.path.join(ROOT, "LICENSE")) as f:
        text = f.read()
    assert text.startswith("Apache License\nVersion 2.0, January 2004")


def test_public_api_ships_type_information():
    assert os.path.isfile(os.path.join(os.path.dirname(group_detr.__file__), "py.typed"))


def unannotated(fn, qualname):
    """The parameters (and the return) of a function that have no annotation."""
    sig = inspect.signature(fn)
    missing = [f"{qualname}({name})" for name, p in sig.parameters.items()
               if name not in ("self", "cls") and p.annotation is inspect.Parameter.empty]
    if sig.return_annotation is inspect.Signature.empty and fn.__name__ != "__init__":
        missing.append(f"{qualname} -> ?")
    return missing


def public_callables(obj, name):
    """A public function, or a public class's constructor and its public methods defined in
    group_detr (nn.Module's own methods are torch's)."""
    if inspect.isfunction(obj):
        return [(obj, name)]
    found = []
    for attr, value in vars(obj).items():
        if attr == "__init__" or not attr.startswith("_"):
            fn = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
            if inspect.isfunction(fn):
                found.append((fn, f"{name}.{attr}"))
            elif isinstance(value, property) and value.fget is not None:
                found.append((value.fget, f"{name}.{attr}"))
    return found


def test_public_api_is_fully_annotated():
    """Every parameter and return of every name in group_detr.__all__ (functions, and the
    classes' constructors, public methods and properties) carries a type annotation."""
    missing = []
    for name in group_detr.__all__:
        for fn, qualname in public_callables(getattr(group_detr, name), name):
            missing += unannotated(fn, qualname)
    assert not missing, missing


def test_the_annotation_check_finds_a_gap():
    def typed(x: int) -> int:
        return x

    def untyped(x, y: int):
        return x

    assert unannotated(typed, "typed") == []
    assert unannotated(untyped, "untyped") == ["untyped(x)", "untyped -> ?"]


@pytest.mark.skipif(not os.path.isdir(os.path.join(ROOT, ".git")), reason="needs the git checkout")
def test_sdist_holds_every_tracked_source_the_build_reads(tmp_path):
    # build_sdist runs setup.py's configuration but compiles nothing (a few seconds)
    code = ("import sys, setuptools.build_meta as b; "
            "print(b.build_sdist(sys.argv[1]))")
    name = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout.strip().splitlines()[-1]
    with tarfile.open(tmp_path / name) as sdist:
        members = {m.split("/", 1)[1] for m in sdist.getnames() if "/" in m}
    tracked = subprocess.run(["git", "ls-files", "csrc", "group_detr", "setup.py", "pyproject.toml",
                              "LICENSE", "README.md", "CHANGELOG.md"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout.split()
    missing = sorted(set(tracked) - members)
    assert not missing, f"the sdist lacks {missing}"
    assert "group_detr/py.typed" in members
