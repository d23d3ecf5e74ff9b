"""Ahead-of-time compile report: build every Triton kernel of the project for a CUDA target, no GPU.

``compile_report(arch=90)`` compiles each kernel variant listed by the kernel modules'
``aot_specs()`` with ``triton.compile`` for ``sm_<arch>`` and reads back what the launch-time
compile would produce: the PTX, whether it issues wgmma (Hopper's warpgroup tensor-core MMA),
registers per thread, register-spill traffic and shared memory. It proves the bf16/fp16 builds
that the CPU interpreter cannot run (bf16 ``tl.dot`` is wrong under ``TRITON_INTERPRET=1``) and
catches spills and lost tensor-core paths before anyone gets near an H100.

Registers and spills: the Triton runtime fills ``n_regs`` / ``n_spills`` only when it loads a
binary on a device, so they are read from the cubin itself with the ``cuobjdump`` that Triton
ships: ``--dump-resource-usage`` for registers and stack, the SASS for local-memory traffic.

A kernel module's ``aot_specs()`` returns dicts with
    name, dtype, fn (the ``@triton.jit`` function), signature (param -> "*bf16", "i32", "i64",
    "constexpr"), constexprs (name -> value), num_warps, num_stages, expect_wgmma (on sm_90),
and optionally ``runtime_values``: int params -> the value a representative launch with
contiguous inputs passes. They are specialized the way the JIT specializes them: a value of 1
becomes a constexpr, a multiple of 16 gets ``tt.divisibility = 16``. Pointers always get
``tt.divisibility = 16``, as torch allocations do at launch. Without ``runtime_values`` a
unit stride is compiled as a general stride, which is not the code a contiguous launch runs.

Every compile runs in a fresh Python subprocess with ``TRITON_INTERPRET`` unset: the interpreter
patches ``triton.language`` in place while it runs a kernel (and some Triton versions never undo
it), so a real compile in a process that interpreted a kernel before breaks with errors such as
"'value' object has no attribute 'data'". The subprocess also turns a compiler abort (an LLVM
error for an unsupported arch) into a Python exception instead of killing the caller.

Nothing is cached here beyond Triton's own cache; temporary cubins are removed.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, List, Optional

#: kernel modules of this package that expose ``aot_specs()``; every one must exist
KERNEL_MODULES = ["nearest", "grouped", "hierarchical", "embedding", "sparse_adamw", "cross_entropy"]
#: where the package's specs come from: ``module:function`` returning aot spec dicts
PACKAGE_SPECS = f"{__name__}:kernel_specs"
#: CUDA compute capabilities Triton's NVIDIA backend compiles for (sm_75 Turing .. sm_121)
MIN_ARCH, MAX_ARCH = 75, 121
#: exception types a worker's failure is raised as in the caller (others become RuntimeError)
_WORKER_ERRORS = {error.__name__: error for error in (RuntimeError, ValueError, FileNotFoundError, ModuleNotFoundError)}

_REQUIRED_SPEC_KEYS = (
    "name", "dtype", "fn", "signature", "constexprs", "num_warps", "num_stages", "expect_wgmma",
)
_DIVISIBILITY_16 = [["tt.divisibility", 16]]
# local-memory load/store width by SASS type suffix; no suffix means 32 bits
_LOCAL_ACCESS_BYTES = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}
_LOCAL_ACCESS = re.compile(r"\b(?:STL|LDL)((?:\.[A-Z0-9]+)*)")


def nvidia_tool(name: str) -> Path:
    """Path of a CUDA binary Triton ships (``ptxas``, ``cuobjdump``, ...).

    ``TRITON_<NAME>_PATH`` overrides the copy bundled in ``triton/backends/nvidia/bin``, as it
    does for Triton itself.

    Raises:
        FileNotFoundError: when neither exists.
    """
    import triton

    env_var = f"TRITON_{name.upper().replace('-', '_')}_PATH"
    override = os.environ.get(env_var)
    path = Path(override) if override else Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.is_file():
        raise FileNotFoundError(f"{name} not found at {path}; install a triton wheel that bundles it or set {env_var}")
    return path


def kernel_specs(kernels: Optional[Iterable[str]] = None) -> List[dict]:
    """Every ``aot_specs()`` entry of the package's kernel modules, optionally filtered by name.

    Raises:
        ModuleNotFoundError: a module of KERNEL_MODULES is missing (a deleted kernel fails loudly).
        ValueError: a requested kernel name is not listed by any module.
    """
    specs = []
    for module_name in KERNEL_MODULES:
        specs.extend(importlib.import_module(f"{__package__}.{module_name}").aot_specs())
    return select_specs(specs, kernels)


def select_specs(specs: List[dict], kernels: Optional[Iterable[str]] = None) -> List[dict]:
    """The specs whose name is in ``kernels`` (all when None).

    Raises:
        ValueError: a requested kernel name is not among the specs.
    """
    if kernels is None:
        return specs
    wanted = set(kernels)
    unknown = wanted - {spec["name"] for spec in specs}
    if unknown:
        available = sorted({spec["name"] for spec in specs})
        raise ValueError(f"unknown kernel(s) {sorted(unknown)}; available: {available}")
    return [spec for spec in specs if spec["name"] in wanted]


def _jit_function(fn):
    """The compilable ``JITFunction`` behind ``fn``.

    Under TRITON_INTERPRET=1 (the CPU test set-up) ``@triton.jit`` yields an interpreted function
    that cannot be compiled; the report rebuilds a JITFunction from the same Python source.
    """
    from triton.runtime.jit import JITFunction

    if isinstance(fn, JITFunction):
        return fn
    return JITFunction(fn.fn)


def _specialize(spec: dict):
    """Signature, constexprs (keyed by name) and divisible param indices, as the JIT would build."""
    fn = _jit_function(spec["fn"])
    signature = dict(spec["signature"])
    constexprs = dict(spec["constexprs"])
    divisible = [name for name, ty in signature.items() if ty.startswith("*")]
    for name, value in spec.get("runtime_values", {}).items():
        if signature.get(name, "constexpr") == "constexpr" or signature[name].startswith("*"):
            raise ValueError(
                f"AOT spec {spec['name']!r} ({spec['dtype']}): runtime_values[{name!r}] is not an integer parameter"
            )
        if value == 1:
            signature[name] = "constexpr"
            constexprs[name] = 1
        elif value % 16 == 0:
            divisible.append(name)
    missing = [name for name, ty in signature.items() if ty == "constexpr" and name not in constexprs]
    if missing:
        raise ValueError(f"AOT spec {spec['name']!r} ({spec['dtype']}): constexpr parameter(s) {missing} have no value")
    return signature, constexprs, [fn.arg_names.index(name) for name in divisible]


def _ast_source(fn, signature: dict, constexprs: dict, divisible: List[int]):
    """``ASTSource`` for triton >= 3.3 (constexprs / attrs keyed by argument path) or 3.2."""
    from triton.compiler import ASTSource

    if "constexprs" in inspect.signature(ASTSource.__init__).parameters:
        by_path = {(fn.arg_names.index(name),): value for name, value in constexprs.items()}
        attrs = {(index,): _DIVISIBILITY_16 for index in divisible}
        return ASTSource(fn, signature, constexprs=by_path, attrs=attrs)
    from triton.backends.compiler import AttrsDescriptor  # triton 3.2

    attrs = AttrsDescriptor.from_hints({index: 16 for index in divisible})
    return ASTSource(fn, signature, constants=constexprs, attrs=attrs)


def _resource_usage(cubin: bytes) -> dict:
    """Registers, stack and local-memory (spill) bytes of a cubin's single kernel."""
    cuobjdump = nvidia_tool("cuobjdump")
    with tempfile.TemporaryDirectory(prefix="unicode2_fast_aot_") as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run(
            [str(cuobjdump), "--dump-resource-usage", str(path)], check=True, capture_output=True, text=True
        ).stdout
        sass = subprocess.run([str(cuobjdump), "-sass", str(path)], check=True, capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    if regs is None or stack is None:
        raise RuntimeError(f"could not parse cuobjdump --dump-resource-usage output:\n{usage}")
    # Triton inlines every call, so local memory is register spills: ptxas -v's
    # "spill stores" + "spill loads" are these instructions' byte widths.
    spill_bytes = 0
    for match in _LOCAL_ACCESS.finditer(sass):
        suffixes = match.group(1).split(".")[1:]
        spill_bytes += next((_LOCAL_ACCESS_BYTES[s] for s in suffixes if s in _LOCAL_ACCESS_BYTES), 4)
    return dict(regs=int(regs.group(1)), stack_bytes=int(stack.group(1)), spill_bytes=spill_bytes, sass=sass)


def compile_spec(spec: dict, arch: int = 90) -> dict:
    """Compile one ``aot_specs()`` entry for ``sm_<arch>`` and describe the binary.

    Returns:
        dict with name, dtype, arch, ptx, uses_wgmma (wgmma.mma_async in the PTX and HGMMA in the
        SASS), regs, spill_bytes (local-memory store + load bytes, = ptxas -v spill stores + loads),
        stack_bytes, smem_bytes (dynamic shared memory, Triton's metadata),
        num_warps, num_stages, expect_wgmma (the spec's expectation, on sm_90 only: wgmma is an
        sm_90a instruction), compile_seconds.

    Raises:
        RuntimeError naming the kernel and dtype when compilation fails; ValueError for a bad spec.
    """
    missing = [key for key in _REQUIRED_SPEC_KEYS if key not in spec]
    if missing:
        raise ValueError(f"AOT spec {spec.get('name', '?')!r} ({spec.get('dtype', '?')}) lacks keys {missing}")
    import triton
    from triton.backends.compiler import GPUTarget

    name, dtype = spec["name"], spec["dtype"]
    signature, constexprs, divisible = _specialize(spec)
    start = time.perf_counter()
    try:
        source = _ast_source(_jit_function(spec["fn"]), signature, constexprs, divisible)
        compiled = triton.compile(
            source,
            target=GPUTarget("cuda", arch, 32),
            options=dict(num_warps=spec["num_warps"], num_stages=spec["num_stages"]),
        )
        ptx = compiled.asm["ptx"]
        usage = _resource_usage(compiled.asm["cubin"])
    except Exception as error:
        raise RuntimeError(f"AOT compile of kernel {name!r} ({dtype}) for sm_{arch} failed: {error}") from error
    return dict(
        name=name,
        dtype=dtype,
        arch=arch,
        ptx=ptx,
        uses_wgmma=bool(re.search(r"\bwgmma\.mma_async", ptx)) and "HGMMA" in usage["sass"],
        regs=usage["regs"],
        spill_bytes=usage["spill_bytes"],
        stack_bytes=usage["stack_bytes"],
        smem_bytes=int(compiled.metadata.shared),
        num_warps=spec["num_warps"],
        num_stages=spec["num_stages"],
        expect_wgmma=bool(spec["expect_wgmma"]) and arch == 90,
        compile_seconds=time.perf_counter() - start,
    )


def compile_report(arch: int = 90, kernels: Optional[Iterable[str]] = None) -> List[dict]:
    """Compile every Triton kernel of the project for ``sm_<arch>`` without a GPU.

    Args:
        arch: CUDA compute capability as an int (90 = H100 / sm_90a).
        kernels: kernel names (the specs' ``name``) to compile; all when None.

    Returns:
        one dict per (kernel, dtype) variant, see ``compile_spec``.

    Raises:
        RuntimeError naming the kernel and dtype that failed to compile; FileNotFoundError when
        Triton's bundled CUDA tools are missing; ValueError for an unknown kernel name or an arch
        outside MIN_ARCH..MAX_ARCH; ModuleNotFoundError when a kernel module is missing.
    """
    return compile_isolated(PACKAGE_SPECS, arch, kernels)


def compile_isolated(source: str, arch: int = 90, kernels: Optional[Iterable[str]] = None) -> List[dict]:
    """``compile_spec`` for every spec of ``source``, in a clean subprocess (see the module doc).

    Args:
        source: ``"module:function"`` or ``"path/to/file.py:function"``; the function returns a
            list of aot spec dicts (``kernel_specs``-style; it is called with no arguments).
        arch, kernels: as for :func:`compile_report`.

    Returns and raises: as :func:`compile_report`; a worker that dies (a compiler abort) raises
    RuntimeError with the tail of its stderr.
    """
    if isinstance(arch, bool) or not isinstance(arch, int) or not MIN_ARCH <= arch <= MAX_ARCH:
        raise ValueError(
            f"arch must be a CUDA compute capability between {MIN_ARCH} and {MAX_ARCH} (e.g. 90 for H100), got {arch!r}"
        )
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    # the caller's import path, so the worker finds the same package and spec modules
    env["PYTHONPATH"] = os.pathsep.join(path for path in sys.path if path)
    with tempfile.TemporaryDirectory(prefix="unicode2_fast_aot_") as tmp:
        result_path = Path(tmp) / "rows.json"
        command = [sys.executable, "-m", __name__, "--worker", source, "--arch", str(arch), "--result", str(result_path)]
        if kernels is not None:
            command += ["--only", *kernels]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if not result_path.is_file():
            tail = "\n".join(done.stderr.strip().splitlines()[-5:])
            raise RuntimeError(f"AOT compile for sm_{arch} crashed (exit status {done.returncode}): {tail}")
        result = json.loads(result_path.read_text())
    if "error" in result:
        error = result["error"]
        raise _WORKER_ERRORS.get(error["type"], RuntimeError)(error["message"])
    return result["rows"]


def _load_specs(source: str) -> List[dict]:
    """Call the ``module:function`` or ``file.py:function`` that ``source`` names."""
    where, _, function = source.rpartition(":")
    if not where or not function:
        raise ValueError(f"spec source must be 'module:function' or 'file.py:function', got {source!r}")
    if where.endswith(".py"):
        spec = importlib.util.spec_from_file_location(Path(where).stem, where)
        if spec is None or not Path(where).is_file():
            raise FileNotFoundError(f"spec file {where} not found")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    return getattr(module, function)()


def _worker(argv: Optional[List[str]] = None) -> None:
    """The subprocess side of :func:`compile_isolated`: writes {"rows": [...]} or {"error": ...}."""
    parser = argparse.ArgumentParser(prog=f"python -m {__name__}")
    parser.add_argument("--worker", required=True)
    parser.add_argument("--arch", type=int, required=True)
    parser.add_argument("--result", required=True)
    parser.add_argument("--only", nargs="*")
    args = parser.parse_args(argv)
    try:
        specs = select_specs(_load_specs(args.worker), args.only)
        result = {"rows": [compile_spec(spec, args.arch) for spec in specs]}
    except Exception as error:
        result = {"error": {"type": type(error).__name__, "message": str(error)}}
    tmp_path = f"{args.result}.tmp"
    with open(tmp_path, "w", encoding="utf-8") as file:
        json.dump(result, file)
    os.replace(tmp_path, args.result)


def format_report(rows: List[dict]) -> str:
    """Plain-text table of ``compile_report`` rows; a missing expected wgmma is flagged."""
    header = ("kernel", "dtype", "arch", "wgmma", "regs", "spill B", "smem B", "warps", "stages")
    lines = []
    for row in rows:
        wgmma = "yes" if row["uses_wgmma"] else ("NO (expected)" if row["expect_wgmma"] else "no")
        lines.append((
            row["name"], row["dtype"], f"sm_{row['arch']}", wgmma, str(row["regs"]), str(row["spill_bytes"]),
            str(row["smem_bytes"]), str(row["num_warps"]), str(row["num_stages"]),
        ))
    widths = [max(len(cells[i]) for cells in [header, *lines]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()
                     for cells in [header, *lines])


if __name__ == "__main__":
    _worker()
