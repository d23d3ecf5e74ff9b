"""The package's structure: layers without import cycles, the CLI on top, no private cross-imports,
and a wheel that carries every subpackage and benchmark (a regular install works, not only -e)."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path
from typing import Dict, List, Set

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: source folder -> the package it installs as (setup.py maps kernels/ and bench/ under ours)
PACKAGE_DIRS = {"unicode2_fast": ROOT / "unicode2_fast", "unicode2_fast.kernels": ROOT / "kernels",
                "unicode2_fast.bench": ROOT / "bench"}
#: private modules shared by the library on purpose (DESIGN.md's "shared private cores")
PRIVATE_CORES = {"_cache", "_checks", "_checkpoints", "_common", "_dispatch", "_errors", "_features", "_io", "_lloyd",
                 "_certified"}
#: benchmark and test scaffolding that pytest, not the package, imports
NOT_MODULES = {"conftest", "test_microbench"}


def _modules() -> Dict[str, Path]:
    """Dotted module name -> file, for every module the wheel installs."""
    modules = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            if "__pycache__" in path.parts or path.stem in NOT_MODULES:
                continue
            relative = path.relative_to(folder).with_suffix("")
            parts = [part for part in relative.parts if part != "__init__"]
            modules[".".join([package, *parts])] = path
    return modules


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str) -> List[ast.AST]:
    """Every import statement of module ``name`` (module level and inside functions)."""
    tree = ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))
    return [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]


def _base(name: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    package = name if _is_package(name) else name.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _edges(name: str) -> Set[str]:
    """The package modules ``name`` imports (a name imported from a package that is a submodule
    counts as that submodule)."""
    targets = set()
    for node in _imports(name):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names if alias.name in MODULES)
            continue
        base = _base(name, node)
        for alias in node.names:
            if f"{base}.{alias.name}" in MODULES:
                targets.add(f"{base}.{alias.name}")
            elif base in MODULES:
                targets.add(base)
    return targets - {name}


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles():
    graph = {name: _edges(name) for name in MODULES}
    assert _cycles(graph) == []


def test_cycle_detection_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_the_cli_is_the_top_layer():
    for name in MODULES:
        if name.startswith("unicode2_fast.cli") or name == "unicode2_fast.__main__":  # python -m: the CLI's door
            continue
        offending = {target for target in _edges(name) if target.startswith("unicode2_fast.cli")}
        assert not offending, f"{name} imports the CLI ({sorted(offending)}): library code must not"


def test_profiling_ranges_are_a_leaf():
    assert {t for t in _edges("unicode2_fast.profiling") if t.startswith("unicode2_fast")} == set()


def test_no_module_imports_another_modules_private_names():
    for name in MODULES:
        for node in _imports(name):
            if not isinstance(node, ast.ImportFrom):
                continue
            base = _base(name, node)
            if not base.startswith("unicode2_fast") or base.rpartition(".")[2] in PRIVATE_CORES:
                continue
            private = [alias.name for alias in node.names
                       if alias.name.startswith("_") and f"{base}.{alias.name}" not in MODULES]
            assert not private, f"{name} imports private {private} from {base}"


def test_every_module_is_under_a_package():
    # a folder of modules without __init__.py would be left out of the wheel by find_packages
    for name, path in MODULES.items():
        if path.name != "__init__.py":
            assert (path.parent / "__init__.py").is_file(), f"{path.parent} has no __init__.py"


def _build_wheel(tmp_path: Path) -> Path:
    """A wheel built from a copy of the checkout's tracked files (the checkout stays untouched)."""
    source = tmp_path / "src"
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: the wheel test builds from the tracked files")
    for relative in filter(None, listed.stdout.decode().split("\0")):
        if (ROOT / relative).is_file():
            (source / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / relative, source / relative)
    for relative in map(str, MODULES.values()):  # new, not yet committed modules of this checkout
        target = source / Path(relative).relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(relative, target)
    out = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(source)], check=True, capture_output=True)
    (wheel,) = out.glob("unicode2_fast-*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    return _build_wheel(tmp_path_factory.mktemp("wheel"))


def test_wheel_holds_every_module_and_bench_script(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {"/".join(name.split(".")) + ("/__init__.py" if _is_package(name) else ".py") for name in MODULES}
    assert expected - names == set()
    for required in ("unicode2_fast/models/__init__.py", "unicode2_fast/cli/__init__.py",
                     "unicode2_fast/kernels/nearest.py", "unicode2_fast/bench/run_all.py",
                     "unicode2_fast/bench/bench_nearest.py", "unicode2_fast/bench/_common.py"):
        assert required in names
    assert not any(name.startswith(("kernels/", "bench/", "tests/")) for name in names)


@pytest.mark.slow
def test_wheel_runs_in_a_fresh_venv(wheel, tmp_path):
    """pip install the wheel into a new venv and run the commands a user runs first.

    The venv gets the test environment's dependencies through a .pth line (nothing is
    downloaded), but not its editable unicode2_fast: only the wheel's copy can be imported.
    """
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    deps = [p for p in sys.path if p.endswith("site-packages")]
    Path(site, "test_deps.pth").write_text("\n".join(deps) + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    run = lambda *args: subprocess.run([str(env_dir / "bin" / "unicode2-fast"), *args], cwd=tmp_path, env=env,  # noqa: E731
                                       capture_output=True, text=True)
    where = subprocess.run([str(python), "-c", "import unicode2_fast, unicode2_fast.models as m; "
                            "from unicode2_fast.models import SiglipTokenizer; print(unicode2_fast.__file__)"],
                           cwd=tmp_path, env=env, check=True, capture_output=True, text=True).stdout
    assert where.startswith(site), where
    for args in (["--help"], ["tokenize", "--help"], ["train", "--help"], ["build-codebook", "--help"]):
        done = run(*args)
        assert done.returncode == 0, (args, done.stderr)
    done = run("bench", "--tiny", "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "out" / "results.csv").is_file()
