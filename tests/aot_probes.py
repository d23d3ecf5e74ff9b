"""Probe kernels for tests/test_compile.py: each ``*_specs()`` returns aot spec dicts that
``compile_isolated("tests/aot_probes.py:<name>_specs")`` compiles in a clean subprocess."""
import triton
import triton.language as tl

STRIDED_SIGNATURE = {"x_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32", "stride": "i64", "BLOCK": "constexpr"}


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


def _spec(name, fn, signature, constexprs, dtype="fp32", num_warps=1, **extra):
    return dict(name=name, dtype=dtype, fn=fn, signature=signature, constexprs=constexprs,
                num_warps=num_warps, num_stages=1, expect_wgmma=False, **extra)


def spilling_specs():
    return [_spec("spilling_softmax", _spilling_softmax, {"x_ptr": "*fp32", "out_ptr": "*fp32", "BLOCK": "constexpr"},
                  {"BLOCK": 16384})]


def strided_specs():
    return [
        _spec("strided_general", _strided_copy, STRIDED_SIGNATURE, {"BLOCK": 1024}, num_warps=4),
        _spec("strided_unit", _strided_copy, STRIDED_SIGNATURE, {"BLOCK": 1024}, num_warps=4,
              runtime_values={"stride": 1, "n": 4096}),
    ]


def bad_runtime_value_specs():
    return [_spec("bad_runtime_value", _strided_copy, STRIDED_SIGNATURE, {"BLOCK": 64}, runtime_values={"x_ptr": 1})]


def broken_specs():
    return [_spec("_broken_kernel", _broken_kernel, {"x_ptr": "*fp16", "BLOCK": "constexpr"}, {"BLOCK": 32}, dtype="fp16")]
