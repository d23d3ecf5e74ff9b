"""Ahead-of-time compile report: every kernel builds for sm_90 with no GPU, tensor cores where
expected, no register spills. Needs only the ptxas / cuobjdump that the triton wheel bundles."""
import os
import re
from pathlib import Path

import pytest

from unicode2_fast.kernels import compile as aot

ARCH = 90
PROBES = str(Path(__file__).with_name("aot_probes.py"))
#: every (kernel, dtype) variant the package ships: deleting a kernel or a dtype fails here
EXPECTED_VARIANTS = {
    ("nearest", "bf16"), ("nearest", "fp16"), ("nearest", "fp32"),
    ("nearest_grouped", "bf16"), ("nearest_grouped", "fp16"), ("nearest_grouped", "fp32"),
    ("hierarchical", "bf16"), ("hierarchical", "fp32"),
    ("embedding_backward", "bf16"), ("embedding_backward", "fp16"), ("embedding_backward", "fp32"),
    ("sparse_adamw", "bf16"), ("sparse_adamw", "fp32"),
    ("cross_entropy", "bf16"), ("cross_entropy", "fp16"), ("cross_entropy", "fp32"),
}


def _probe(name):
    return f"{PROBES}:{name}_specs"


@pytest.fixture(scope="module")
def report():
    try:
        aot.nvidia_tool("ptxas")
    except FileNotFoundError as error:
        pytest.skip(f"no bundled ptxas: {error}")
    rows = aot.compile_report(arch=ARCH)
    return {(row["name"], row["dtype"]): row for row in rows}


def test_report_covers_every_kernel_and_dtype(report):
    assert set(report) == EXPECTED_VARIANTS


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
    (row,) = aot.compile_isolated(_probe("spilling"), ARCH)
    assert row["spill_bytes"] > 0 and row["stack_bytes"] > 0
    assert row["regs"] <= 255 and not row["uses_wgmma"]


def test_runtime_values_specialize_like_the_jit(report):
    general, unit = aot.compile_isolated(_probe("strided"), ARCH)
    # stride == 1 becomes a constexpr (one parameter fewer) and n % 16 == 0 lets loads vectorize
    n_params = [len(re.findall(r"\.param \.\w+ \w+_param_\d+", row["ptx"])) for row in (general, unit)]
    assert n_params[1] == n_params[0] - 1
    assert "ld.global.v4" in unit["ptx"] and "ld.global.v4" not in general["ptx"]


def test_bad_runtime_value_is_rejected():
    with pytest.raises(ValueError, match="runtime_values"):
        aot.compile_isolated(_probe("bad_runtime_value"), ARCH)


def test_compile_failure_names_kernel_and_dtype(report):
    with pytest.raises(RuntimeError, match=r"'_broken_kernel' \(fp16\)"):
        aot.compile_isolated(_probe("broken"), ARCH)


def test_kernel_filter_after_interpreting_a_kernel(report):
    # a real compile in a process that just ran a kernel in Triton's interpreter failed with
    # "'value' object has no attribute 'data'" before the compile moved to a clean subprocess
    import torch

    import unicode2_fast as u2

    if os.environ.get("TRITON_INTERPRET") == "1":
        u2.nearest(torch.randn(5, 16), torch.randn(7, 16), backend="triton")
    rows = aot.compile_report(arch=ARCH, kernels=["nearest"])
    assert {row["name"] for row in rows} == {"nearest"}
    assert next(row for row in rows if row["dtype"] == "bf16")["uses_wgmma"]
    with pytest.raises(ValueError, match="unknown kernel"):
        aot.compile_report(arch=ARCH, kernels=["no_such_kernel"])


@pytest.mark.parametrize("arch", [7, -5, 0, 1000, "90", True])
def test_bad_arch_is_a_clear_error(arch):
    with pytest.raises(ValueError, match="compute capability"):
        aot.compile_report(arch=arch)


def test_missing_kernel_module_raises(monkeypatch):
    monkeypatch.setattr(aot, "KERNEL_MODULES", [*aot.KERNEL_MODULES, "no_such_kernel_module"])
    with pytest.raises(ModuleNotFoundError, match="no_such_kernel_module"):
        aot.kernel_specs()


def test_import_error_inside_a_kernel_module_is_not_skipped(monkeypatch):
    real_import = aot.importlib.import_module

    def import_module(name, *args):
        if name.endswith(".nearest"):
            raise ModuleNotFoundError("No module named 'some_dependency'", name="some_dependency")
        return real_import(name, *args)

    monkeypatch.setattr(aot.importlib, "import_module", import_module)
    with pytest.raises(ModuleNotFoundError, match="some_dependency"):
        aot.kernel_specs()
