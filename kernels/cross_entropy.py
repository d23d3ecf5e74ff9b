"""Large-vocabulary cross-entropy forward: logit GEMM + online log-sum-exp, one Triton kernel.

The loss of row i is ``lse_i - logit_i[target_i]`` with ``logits = hidden @ weight.T (+ bias)``.
Each program owns a tile of BLOCK_N rows of ``hidden`` and a contiguous slice of the vocabulary
(a "split"). It walks its slice BLOCK_K classes at a time, computes the BLOCK_N x BLOCK_K logit
tile with ``tl.dot`` (bf16/fp16 on tensor cores -- wgmma on sm_90 -- and fp32 with exact "ieee"
products, fp32 accumulation always), and folds the tile into a running (max, sum of exp) per row.
Rows whose target lies in the split then get the target logit from one gathered weight row each.
The N x K logit matrix is never written: at N = 2916, K = 500,000 that is 5.8 GB of fp32 stores
(and the same again in loads for the softmax) that the fusion removes; the only outputs are three
(n_splits, N) fp32 partials, merged by a tiny log-sum-exp reduction (``combine_splits``).

Splitting the vocabulary keeps the GPU full when N is small (one image is 729 rows: 6 row tiles
of 128 for 132 SMs). The backward pass is not a kernel: ``unicode2_fast.cross_entropy`` recomputes the
logits chunk by chunk with torch GEMMs from the saved per-row log-sum-exp (see there).

All row offsets are int64: the classifier holds K x h = 1.8G elements at K = 500K, h = 3584, and
class x stride passes 2^31 from h = 4295 (the JIT passes a stride below 2^31 as int32).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .nearest import choose_splits, num_sms

#: default tile configs for H100 (sm_90): 128 x 128 x 64 bf16/fp16 tiles feed wgmma with 8 warps
#: (two warpgroups); fp32 with exact products does not use tensor cores and gets smaller tiles that
#: keep the logit tile and its exp in registers without spilling.
DEFAULT_CONFIGS: Dict[str, Dict[str, int]] = {
    "tensor_core": dict(BLOCK_N=128, BLOCK_K=128, BLOCK_H=64, num_warps=8, num_stages=3),
    "fp32": dict(BLOCK_N=64, BLOCK_K=64, BLOCK_H=32, num_warps=4, num_stages=2),
}


@triton.jit
def _ce_forward_kernel(
    h_ptr,            # (N, H) hidden states
    w_ptr,            # (K, H) classifier weight
    b_ptr,            # (K,) fp32 bias (unused unless HAS_BIAS)
    t_ptr,            # (N,) int64 targets; anything outside [0, K) matches no class
    part_max_ptr,     # (n_splits, N) fp32 running max of the split's logits
    part_sum_ptr,     # (n_splits, N) fp32 sum of exp(logit - max) over the split
    part_tgt_ptr,     # (n_splits, N) fp32 target logit when the target is in the split, else 0
    N, K, H,
    stride_hn, stride_hh, stride_wk, stride_wh,
    k_per_split,      # classes per split, a multiple of BLOCK_K
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    mask_n = offs_n < N
    offs_h = tl.arange(0, BLOCK_H).to(tl.int64)
    k_start = pid_s.to(tl.int64) * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)

    run_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_N,), tl.float32)
    h_rows = h_ptr + offs_n[:, None] * stride_hn
    # Column indices inside a tile stay int32 (the tile origin k0 carries the int64 part): int64
    # compares over the whole logit tile cost registers the accumulator needs.
    cols = tl.arange(0, BLOCK_K)
    for k0 in range(k_start, k_end, BLOCK_K):
        n_cols = tl.minimum(k_end - k0, BLOCK_K).to(tl.int32)
        mask_k = cols < n_cols
        w_rows = w_ptr + (k0 + cols.to(tl.int64))[:, None] * stride_wk
        acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        for h0 in range(0, H, BLOCK_H):
            cur_h = h0 + offs_h
            mask_h = cur_h < H
            h_tile = tl.load(h_rows + cur_h[None, :] * stride_hh, mask=mask_n[:, None] & mask_h[None, :], other=0.0)
            w_tile = tl.load(w_rows + cur_h[None, :] * stride_wh, mask=mask_k[:, None] & mask_h[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(h_tile, tl.trans(w_tile), acc, input_precision="ieee")
            else:
                acc = tl.dot(h_tile, tl.trans(w_tile), acc)
        if HAS_BIAS:
            acc += tl.load(b_ptr + k0 + cols, mask=mask_k, other=0.0)[None, :]
        acc = tl.where(mask_k[None, :], acc, float("-inf"))
        # every tile holds at least one class, so new_max is finite and exp(-inf - new_max) = 0
        new_max = tl.maximum(run_max, tl.max(acc, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(acc - new_max[:, None]), axis=1)
        run_max = new_max

    # Target logits of the rows whose target lies in this split: one gathered row of the weight
    # per row, dotted with the hidden row in fp32. Picking them out of the logit tiles instead
    # costs a tile-wide compare per tile and ~70 more registers on sm_90 (compile report).
    target = tl.load(t_ptr + offs_n, mask=mask_n, other=-1)
    in_split = (target >= k_start) & (target < k_end)
    target_rows = w_ptr + tl.where(in_split, target, 0) * stride_wk
    target_acc = tl.zeros((BLOCK_N, BLOCK_H), tl.float32)
    for h0 in range(0, H, BLOCK_H):
        cur_h = h0 + offs_h
        mask_h = cur_h < H
        h_tile = tl.load(h_rows + cur_h[None, :] * stride_hh, mask=mask_n[:, None] & mask_h[None, :], other=0.0)
        w_tile = tl.load(target_rows[:, None] + cur_h[None, :] * stride_wh,
                         mask=in_split[:, None] & mask_h[None, :], other=0.0)
        target_acc += h_tile.to(tl.float32) * w_tile.to(tl.float32)
    target_logit = tl.sum(target_acc, axis=1)
    if HAS_BIAS:
        target_logit += tl.load(b_ptr + target, mask=in_split, other=0.0)

    out = pid_s.to(tl.int64) * N + offs_n
    tl.store(part_max_ptr + out, run_max, mask=mask_n)
    tl.store(part_sum_ptr + out, run_sum, mask=mask_n)
    tl.store(part_tgt_ptr + out, target_logit, mask=mask_n)


def combine_splits(
    part_max: torch.Tensor, part_sum: torch.Tensor, part_tgt: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge (n_splits, N) partials into the per-row log-sum-exp and target logit, both (N,) fp32.

    ``lse = M + log(sum_s sum_s' exp(max_s - M))`` with ``M`` the largest split maximum; a split
    the target is not in contributed a target logit of exactly 0.
    """
    # part_max, part_sum, part_tgt: (S, N)
    row_max = part_max.max(dim=0).values
    lse = row_max + torch.log((part_sum * torch.exp(part_max - row_max.unsqueeze(0))).sum(dim=0))
    return lse, part_tgt.sum(dim=0)


def cross_entropy_forward_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row log-sum-exp of ``hidden @ weight.T (+ bias)`` and the target logits, fused.

    Args:
        hidden: (N, h) fp32 / fp16 / bf16, any strides.
        weight: (K, h), same dtype and device as ``hidden``, any strides.
        targets: (N,) int64 class ids; an id outside [0, K) (an ignored row) gets target logit 0.
        bias: optional (K,) bias, any float dtype (read as fp32).

    Returns:
        lse (N,) fp32 and target_logit (N,) fp32. The row loss is ``lse - target_logit``.

    Raises:
        ValueError / TypeError for shape, dtype or device problems.
    """
    # hidden: (N, h), weight: (K, h), targets: (N,), bias: (K,)
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"hidden and weight must be 2-D, got shapes {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"dimension mismatch: hidden has dim {hidden.shape[1]}, weight has dim {weight.shape[1]}")
    if hidden.dtype != weight.dtype or hidden.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(
            "triton backend needs hidden and weight of one dtype among float32/float16/bfloat16, "
            f"got {hidden.dtype} and {weight.dtype}"
        )
    if targets.shape != (hidden.shape[0],) or targets.dtype != torch.int64:
        raise ValueError(f"targets must be ({hidden.shape[0]},) int64, got {tuple(targets.shape)} {targets.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    for name, tensor in (("weight", weight), ("targets", targets), ("bias", bias)):
        if tensor is not None and tensor.device != hidden.device:
            raise ValueError(f"hidden is on {hidden.device} but {name} is on {tensor.device}")
    if weight.shape[0] == 0:
        raise ValueError("empty classifier (K = 0)")
    n, h = hidden.shape
    k = weight.shape[0]

    lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
    if n == 0:
        return lse, torch.empty(0, dtype=torch.float32, device=hidden.device)
    ieee = hidden.dtype == torch.float32
    cfg = DEFAULT_CONFIGS["fp32" if ieee else "tensor_core"]
    n_splits = choose_splits(n, k, cfg["BLOCK_N"], cfg["BLOCK_K"], num_sms(hidden.device))
    k_per_split = triton.cdiv(triton.cdiv(k, n_splits), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
    n_splits = triton.cdiv(k, k_per_split)  # no empty split

    part_max = torch.empty((n_splits, n), dtype=torch.float32, device=hidden.device)
    part_sum = torch.empty_like(part_max)
    part_tgt = torch.empty_like(part_max)
    bias32 = bias.float().contiguous() if bias is not None else part_max  # any fp32 pointer when unused
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), n_splits)
    _ce_forward_kernel[grid](
        hidden, weight, bias32, targets, part_max, part_sum, part_tgt, n, k, h,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), k_per_split,
        HAS_BIAS=bias is not None, IEEE=ieee,
        BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], BLOCK_H=cfg["BLOCK_H"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return combine_splits(part_max, part_sum, part_tgt)


def aot_specs() -> List[dict]:
    """Signatures the ahead-of-time compile report builds this kernel with, one per dtype."""
    n, k, h, h100_sms = 2916, 500_000, 3584, 132
    specs = []
    for dtype in ("bf16", "fp16", "fp32"):
        cfg = DEFAULT_CONFIGS["fp32" if dtype == "fp32" else "tensor_core"]
        n_splits = choose_splits(n, k, cfg["BLOCK_N"], cfg["BLOCK_K"], h100_sms)
        k_per_split = triton.cdiv(triton.cdiv(k, n_splits), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
        specs.append(
            dict(
                name="cross_entropy",
                dtype=dtype,
                fn=_ce_forward_kernel,
                signature={
                    "h_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "b_ptr": "*fp32", "t_ptr": "*i64",
                    "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32", "part_tgt_ptr": "*fp32",
                    "N": "i32", "K": "i32", "H": "i32",
                    "stride_hn": "i64", "stride_hh": "i64", "stride_wk": "i64", "stride_wh": "i64",
                    "k_per_split": "i32",
                    "HAS_BIAS": "constexpr", "IEEE": "constexpr",
                    "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "BLOCK_H": "constexpr",
                },
                # the bias-free build is the LLM head (Qwen2.5's lm_head has no bias)
                constexprs=dict(
                    HAS_BIAS=False, IEEE=dtype == "fp32",
                    BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], BLOCK_H=cfg["BLOCK_H"],
                ),
                # L_GEN at scale on an H100, contiguous: N = 2916 visual tokens, K = 500K classes,
                # h = 3584 (Qwen2.5-7B)
                runtime_values=dict(
                    N=n, K=k, H=h, stride_hn=h, stride_hh=1, stride_wk=h, stride_wh=1, k_per_split=k_per_split,
                ),
                num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"],
                expect_wgmma=dtype != "fp32",
            )
        )
    return specs
