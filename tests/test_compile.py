"""Ahead-of-time compile report: every kernel builds for sm_90 with no GPU, tensor cores where
expected, no register spills. Needs only the ptxas / cuobjdump that the triton wheel bundles."""
import re

import pytest
import triton
import triton.language as tl

try:
    from unicode2_fast.kernels import compile as aot
except ImportError:  # package not installed: kernels/ imported from the repository root
    from kernels import compile as aot

ARCH = 90


@pytest.fixture(scope="module")
def report():
    try:
        aot.nvidia_tool("ptxas")
    except FileNotFoundError as error:
        pytest.skip(f"no bundled ptxas: {error}")
    rows = aot.compile_report(arch=ARCH)
    return {(row["name"], row["dtype"]): row for row in rows}


@triton.jit
def _spilling_softmax(x_ptr, out_ptr, BLOCK: tl.constexpr):
    # one warp holding BLOCK fp32 values live across two reductions: far past 255 registers
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    e = tl.exp(x - tl.max(x, axis=0))
    tl.store(out_ptr + offs, e / tl.sum(e, axis=0))


@triton.jit
def _strided_copy(x_ptr, out_ptr, n, stride, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs * stride, mask=mask), mask=mask)


@triton.jit
def _broken_kernel(x_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs) + tl.arange(0, 2 * BLOCK))  # shapes do not broadcast


def _spec(fn, signature, constexprs, dtype="fp32", num_warps=1, **extra):
    return dict(name=fn.__name__, dtype=dtype, fn=fn, signature=signature, constexprs=constexprs,
                num_warps=num_warps, num_stages=1, expect_wgmma=False, **extra)


def test_nearest_is_built_for_every_dtype(report):
    assert {dtype for name, dtype in report if name == "nearest"} == {"bf16", "fp16", "fp32"}


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_nearest_half_precision_uses_wgmma(report, dtype):
    row = report[("nearest", dtype)]
    assert "wgmma" in row["ptx"]
    assert row["uses_wgmma"] and row["expect_wgmma"]


def test_nearest_fp32_ieee_does_not_use_wgmma(report):
    row = report[("nearest", "fp32")]
    assert not row["uses_wgmma"] and not row["expect_wgmma"]


def test_every_kernel_fits_registers_without_spills(report):
    for key, row in report.items():
        assert row["spill_bytes"] == 0, f"{key} spills {row['spill_bytes']} bytes\n{aot.format_report([row])}"
        assert 0 < row["regs"] <= 255, key
        # tensor-core kernels stage their tiles in shared memory; element-wise ones need none
        assert row["smem_bytes"] > 0 or not row["expect_wgmma"], key
        assert row["uses_wgmma"] == row["expect_wgmma"], key


def test_ptx_targets_sm90(report):
    for key, row in report.items():
        assert ".target sm_90a" in row["ptx"] or ".target sm_90" in row["ptx"], key
        assert row["arch"] == ARCH


def test_format_report_lists_every_row(report):
    rows = list(report.values())
    text = aot.format_report(rows)
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["kernel", "dtype", "arch", "wgmma"]
    assert len(lines) == 1 + len(rows)
    assert any(line.split()[:2] == ["nearest", "bf16"] and "yes" in line.split() for line in lines)
    missing = dict(rows[0], uses_wgmma=False, expect_wgmma=True)
    assert "NO (expected)" in aot.format_report([missing])


def test_spills_are_detected(report):
    # the zero-spill check above is only worth something if a spilling kernel reads non-zero
    spec = _spec(_spilling_softmax, {"x_ptr": "*fp32", "out_ptr": "*fp32", "BLOCK": "constexpr"}, {"BLOCK": 16384})
    row = aot.compile_spec(spec, ARCH)
    assert row["spill_bytes"] > 0 and row["stack_bytes"] > 0
    assert row["regs"] <= 255 and not row["uses_wgmma"]


def test_runtime_values_specialize_like_the_jit(report):
    signature = {"x_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32", "stride": "i64", "BLOCK": "constexpr"}
    general = aot.compile_spec(_spec(_strided_copy, signature, {"BLOCK": 1024}, num_warps=4), ARCH)
    unit = aot.compile_spec(
        _spec(_strided_copy, signature, {"BLOCK": 1024}, num_warps=4, runtime_values={"stride": 1, "n": 4096}), ARCH
    )
    # stride == 1 becomes a constexpr (one parameter fewer) and n % 16 == 0 lets loads vectorize
    n_params = [len(re.findall(r"\.param \.\w+ \w+_param_\d+", row["ptx"])) for row in (general, unit)]
    assert n_params[1] == n_params[0] - 1
    assert "ld.global.v4" in unit["ptx"] and "ld.global.v4" not in general["ptx"]


def test_bad_runtime_value_is_rejected():
    signature = {"x_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32", "stride": "i64", "BLOCK": "constexpr"}
    with pytest.raises(ValueError, match="runtime_values"):
        aot.compile_spec(_spec(_strided_copy, signature, {"BLOCK": 64}, runtime_values={"x_ptr": 1}), ARCH)


def test_compile_failure_names_kernel_and_dtype(report):
    spec = _spec(_broken_kernel, {"x_ptr": "*fp16", "BLOCK": "constexpr"}, {"BLOCK": 32}, dtype="fp16")
    with pytest.raises(RuntimeError, match=r"'_broken_kernel' \(fp16\)"):
        aot.compile_spec(spec, ARCH)


def test_kernel_filter(report):
    assert {row["name"] for row in aot.compile_report(arch=ARCH, kernels=["nearest"])} == {"nearest"}
    with pytest.raises(ValueError, match="unknown kernel"):
        aot.compile_report(arch=ARCH, kernels=["no_such_kernel"])


def test_import_error_inside_a_kernel_module_is_not_skipped(monkeypatch):
    real_import = aot.importlib.import_module

    def import_module(name, *args):
        if name.endswith(".nearest"):
            raise ModuleNotFoundError("No module named 'some_dependency'", name="some_dependency")
        return real_import(name, *args)

    monkeypatch.setattr(aot.importlib, "import_module", import_module)
    with pytest.raises(ModuleNotFoundError, match="some_dependency"):
        aot.kernel_specs()
