"""Row-sparse AdamW step: update only the rows of a K x d table that the step's gradient touches.

A dense AdamW step over the C2 table (K = 500K, d = 1152: 576M parameters) reads and writes the
parameters, both moments and a dense gradient every step -- about 16 GB of fp32 traffic -- even
though one step's ids touch at most a few thousand rows. This kernel reads and writes only the
touched rows: one program per (touched row, d-tile) loads the parameter, moment and gradient
tiles, applies decoupled weight decay and the AdamW moment and parameter updates in fp32 and
writes them back. Rows are unique (the gradient is coalesced), so no two programs write the same
element and there are no atomics.

Bias correction is per row: ``row_step[row]`` counts the steps that touched that row (the
launcher's caller increments it before the launch), so a row first touched at global step 1000
gets the bias correction of its own first step. ``1 - beta ** step`` is computed in float64, as
``torch.optim.AdamW`` does on the host, from ``log2(beta)``. Moments are fp32 whatever the
parameter dtype; bf16/fp16 parameters are updated in fp32 and rounded once.

The element-wise order of operations follows ``torch.optim.AdamW`` (single-tensor path):
lerp for the first moment, ``v * beta2 + (1 - beta2) * g * g``, ``sqrt(v) / sqrt(bc2) + eps``,
``p + (-step_size * m) / denom`` with IEEE-rounded sqrt and division.

Offsets are int64: ``row * stride`` reaches 576M at K = 500K, d = 1152 and passes 2^31 for
larger tables or padded row strides.
"""
from __future__ import annotations

import math
from typing import Dict, List

import torch
import triton
import triton.language as tl

#: H100 (sm_90): 256 columns with 2 warps is 4 fp32 values (one 16-byte access) per thread and
#: array; the kernel is purely bandwidth-bound and a small tile gives many programs per touched row.
DEFAULT_CONFIG: Dict[str, int] = dict(BLOCK_D=256, num_warps=2, num_stages=1)

PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _sparse_adamw_kernel(
    param_ptr,        # (K, D) parameters, updated in place
    grad_ptr,         # (U, D) gradient rows of the touched rows
    row_ids_ptr,      # (U,) int64 touched rows, unique
    exp_avg_ptr,      # (K, D) fp32 first moments, updated in place
    exp_avg_sq_ptr,   # (K, D) fp32 second moments (same strides as exp_avg), updated in place
    row_step_ptr,     # (K,) int64 per-row step counts, already counting this step
    D,
    stride_pk, stride_pd, stride_gu, stride_gd, stride_mk, stride_md,
    lr, one_minus_beta1, beta2, one_minus_beta2, log2_beta1, log2_beta2, eps, decay,
    BLOCK_D: tl.constexpr,
):
    pid_u = tl.program_id(0)
    pid_d = tl.program_id(1)
    row = tl.load(row_ids_ptr + pid_u)
    offs_d = pid_d.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    mask = offs_d < D

    step = tl.load(row_step_ptr + row).to(tl.float64)
    bias_correction1 = 1.0 - tl.exp2(step * log2_beta1)
    bias_correction2 = 1.0 - tl.exp2(step * log2_beta2)
    step_size = (lr / bias_correction1).to(tl.float32)
    bias_correction2_sqrt = tl.sqrt(bias_correction2).to(tl.float32)

    p_ptrs = param_ptr + row * stride_pk + offs_d * stride_pd
    m_ptrs = exp_avg_ptr + row * stride_mk + offs_d * stride_md
    v_ptrs = exp_avg_sq_ptr + row * stride_mk + offs_d * stride_md
    p = tl.load(p_ptrs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(grad_ptr + pid_u.to(tl.int64) * stride_gu + offs_d * stride_gd, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptrs, mask=mask, other=0.0)
    v = tl.load(v_ptrs, mask=mask, other=0.0)

    p = p * decay
    # torch's lerp: the form that is exact at the nearer end of the interpolation
    if one_minus_beta1 < 0.5:
        m = m + one_minus_beta1 * (g - m)
    else:
        m = g - (g - m) * (1.0 - one_minus_beta1)
    v = v * beta2 + (one_minus_beta2 * g) * g
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    p = p + tl.div_rn(-step_size * m, denom)

    tl.store(p_ptrs, p.to(param_ptr.dtype.element_ty), mask=mask)
    tl.store(m_ptrs, m, mask=mask)
    tl.store(v_ptrs, v, mask=mask)


def sparse_adamw_triton(
    param: torch.Tensor,
    row_ids: torch.Tensor,
    grad_rows: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    row_step: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step on the rows ``row_ids`` of ``param``, in place, with the Triton kernel.

    Args:
        param: (K, d) fp32 / fp16 / bf16 parameters, unit column stride not required.
        row_ids: (U,) int64 unique rows touched by this step's gradient.
        grad_rows: (U, d) their gradient rows, any float dtype the kernel loads (fp32/fp16/bf16).
        exp_avg, exp_avg_sq: (K, d) fp32 moments with identical strides.
        row_step: (K,) int64 per-row step counts, already incremented for the rows of this step.
        lr, beta1, beta2, eps, weight_decay: AdamW hyper-parameters (decoupled weight decay).

    Raises:
        ValueError / TypeError for shape, dtype, stride or device problems.
    """
    # param: (K, d), row_ids: (U,), grad_rows: (U, d), exp_avg / exp_avg_sq: (K, d), row_step: (K,)
    if param.dim() != 2 or grad_rows.dim() != 2 or row_ids.dim() != 1:
        raise ValueError(
            f"expected param (K, d), row_ids (U,), grad_rows (U, d), got {tuple(param.shape)}, "
            f"{tuple(row_ids.shape)}, {tuple(grad_rows.shape)}"
        )
    k, d = param.shape
    if grad_rows.shape != (row_ids.shape[0], d):
        raise ValueError(f"grad_rows must have shape ({row_ids.shape[0]}, {d}), got {tuple(grad_rows.shape)}")
    if exp_avg.shape != (k, d) or exp_avg_sq.shape != (k, d) or row_step.shape != (k,):
        raise ValueError("moments must have the parameter's shape (K, d) and row_step shape (K,)")
    if param.dtype not in PARAM_DTYPES or grad_rows.dtype not in PARAM_DTYPES:
        raise TypeError(
            f"triton backend needs float32/float16/bfloat16 params and grads, got {param.dtype} and {grad_rows.dtype}"
        )
    if exp_avg.dtype != torch.float32 or exp_avg_sq.dtype != torch.float32:
        raise TypeError("moments must be float32")
    if row_ids.dtype != torch.int64 or row_step.dtype != torch.int64:
        raise TypeError("row_ids and row_step must be int64")
    if exp_avg.stride() != exp_avg_sq.stride():
        raise ValueError(f"exp_avg and exp_avg_sq must share strides, got {exp_avg.stride()} and {exp_avg_sq.stride()}")
    devices = {t.device for t in (param, row_ids, grad_rows, exp_avg, exp_avg_sq, row_step)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    n_rows = row_ids.shape[0]
    if n_rows:
        # the kernel's loads and stores are masked only against d: an id outside [0, K) would
        # write beyond the parameter (on a GPU, into whatever lies there)
        low, high = (int(v) for v in torch.aminmax(row_ids))
        if low < 0 or high >= k:
            raise ValueError(f"row_ids must lie in [0, {k}) (the parameter's rows), got ids from {low} to {high}")
    if n_rows == 0 or d == 0:
        return

    cfg = DEFAULT_CONFIG
    grid = (n_rows, triton.cdiv(d, cfg["BLOCK_D"]))
    _sparse_adamw_kernel[grid](
        param, grad_rows, row_ids, exp_avg, exp_avg_sq, row_step, d,
        param.stride(0), param.stride(1), grad_rows.stride(0), grad_rows.stride(1),
        exp_avg.stride(0), exp_avg.stride(1),
        float(lr), 1.0 - beta1, beta2, 1.0 - beta2, math.log2(beta1) if beta1 > 0 else -math.inf,
        math.log2(beta2) if beta2 > 0 else -math.inf, eps, 1.0 - lr * weight_decay,
        BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def aot_specs() -> List[dict]:
    """Signatures the ahead-of-time compile report builds this kernel with: fp32 and bf16 params."""
    cfg = DEFAULT_CONFIG
    specs = []
    for dtype in ("fp32", "bf16"):
        specs.append(
            dict(
                name="sparse_adamw",
                dtype=dtype,
                fn=_sparse_adamw_kernel,
                signature={
                    "param_ptr": f"*{dtype}", "grad_ptr": f"*{dtype}", "row_ids_ptr": "*i64",
                    "exp_avg_ptr": "*fp32", "exp_avg_sq_ptr": "*fp32", "row_step_ptr": "*i64",
                    "D": "i32",
                    "stride_pk": "i64", "stride_pd": "i64", "stride_gu": "i64", "stride_gd": "i64",
                    "stride_mk": "i64", "stride_md": "i64",
                    "lr": "fp32", "one_minus_beta1": "fp32", "beta2": "fp32", "one_minus_beta2": "fp32",
                    "log2_beta1": "fp32", "log2_beta2": "fp32", "eps": "fp32", "decay": "fp32",
                    "BLOCK_D": "constexpr",
                },
                constexprs=dict(BLOCK_D=cfg["BLOCK_D"]),
                # the (500K, 1152) C2 table and a coalesced (U, 1152) gradient, all contiguous
                runtime_values=dict(
                    D=1152, stride_pk=1152, stride_pd=1, stride_gu=1152, stride_gd=1, stride_mk=1152, stride_md=1,
                ),
                num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"],
                expect_wgmma=False,
            )
        )
    return specs
