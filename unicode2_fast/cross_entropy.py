"""Losses of the generation side: large-vocabulary cross-entropy (L_GEN) and InfoNCE (L_CL).

``large_vocab_cross_entropy`` is ``F.cross_entropy(hidden @ classifier_weight.T + bias, targets)``
over a vocabulary of K = 500,000 visual tokens without ever holding the N x K logits: at N = 2916,
K = 500K those are 5.8 GB in fp32, and autograd would keep them, plus their gradient, for the
backward pass. Every backend computes the loss of each non-ignored row and saves only
(hidden, weight, bias, targets, per-row log-sum-exp) for the backward pass.

Backends:
    "torch"   chunked over the vocabulary (``chunk_size`` rows of the weight at a time): per chunk
              an (N, chunk) logit block in fp32 (float64 for float64 inputs) folded into a running
              max and sum of exp per row, picking up the target logit when the target is in the
              chunk. Runs on any device; the CPU path of "auto". On the CPU, when gradients are
              needed (and no chunk_size is forced), it instead chunks over rows: a (K, rows) block
              of at most ROW_CHUNK_BYTES holds a chunk's full softmax, whose gradients are computed
              right away and scaled in backward -- 6 N K h FLOPs like materialised logits, not the
              8 N K h of forward + recomputing backward.
    "triton"  the fused forward kernel of ``unicode2_fast.kernels.cross_entropy`` (logit tiles in
              registers, online log-sum-exp, no logits in memory); CUDA tensors, or CPU tensors
              under TRITON_INTERPRET=1 (tests).
    "cce"     ``cut_cross_entropy.linear_cross_entropy`` (apple/ml-cross-entropy) with gradient
              filtering off (``filter_eps=None``: exact gradients); CUDA only, when installed.
    "auto"    "cce" for CUDA tensors when cut_cross_entropy is importable, else "triton" on CUDA
              and "torch" on the CPU.

The backward pass of the "torch" and "triton" backends is the same chunked torch recomputation
(on the GPU too: there is no backward kernel yet): per chunk, ``P = exp(logits - lse)`` minus one
at the target, scaled by the upstream gradient, then ``grad_hidden += P @ W_chunk``,
``grad_weight[chunk] = P.T @ hidden`` and ``grad_bias[chunk] = P.sum(0)``. The weight gradient is
dense (the classifier is the LLM's output head, trained densely) and allocated once, in the
weight's dtype; no gradient is computed for an input that does not require one. On CUDA those
GEMMs run in fp32 (TF32 when ``torch.backends.cuda.matmul.allow_tf32`` is set).

Ignored rows (``targets == ignore_index``) are dropped before any GEMM, so they cost nothing.
Reductions match ``F.cross_entropy``: "mean" averages over non-ignored rows and, like torch, gives
NaN when every row is ignored (the gradients are then zero); "sum" gives 0 there; "none" gives 0
for ignored rows. The loss is computed in fp32 for bf16/fp16 inputs and returned in the input
dtype, as torch returns it in the logits' dtype.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import _dispatch
from ._checks import check_finite, check_float, check_matrix

REDUCTIONS = ("mean", "sum", "none")
BACKENDS = _dispatch.backends("cross_entropy")

#: the chunked torch path holds one (N, chunk) fp32 logit block of at most this many bytes ...
CHUNK_BYTES = 128 << 20
#: ... with chunks of this many classes at least and at most (GEMMs this wide run near peak)
MIN_CHUNK, MAX_CHUNK = 1024, 32768
#: the CPU training path (gradients computed with the loss) holds one (K, rows) block of this size
#: (256 rows at K = 500K: fewer rows make the GEMMs inefficient; 128 rows measured 0.93x torch)
ROW_CHUNK_BYTES = 512 << 20


def default_chunk_size(n_rows: int, n_classes: int) -> int:
    """Classes per chunk of the torch path: an (n_rows, chunk) fp32 block within CHUNK_BYTES."""
    chunk = CHUNK_BYTES // (4 * max(1, n_rows))
    return int(max(1, min(n_classes, MAX_CHUNK, max(MIN_CHUNK, chunk))))


# ----------------------------------------------------------------------------------------------
# the chunked torch computation


def _chunk_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], start: int, stop: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(N, stop - start) logits of classes [start, stop) in hidden's dtype, and that weight chunk."""
    # hidden: (N, h) in the compute dtype; weight: (K, h); bias: (K,)
    weight_chunk = weight[start:stop].to(hidden.dtype)
    if bias is None:
        return hidden @ weight_chunk.t(), weight_chunk
    return torch.addmm(bias[start:stop].to(hidden.dtype), hidden, weight_chunk.t()), weight_chunk


def _target_columns(targets: torch.Tensor, start: int, stop: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Whether each row's target is in [start, stop), and its column there (clamped when not)."""
    in_chunk = (targets >= start) & (targets < stop)
    return in_chunk, (targets - start).clamp_(0, stop - start - 1).unsqueeze(1)


def lse_and_target_torch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row log-sum-exp of the logits and the target logit, chunked over the vocabulary.

    Args:
        hidden: (N, h); weight: (K, h); targets: (N,) int64 in [0, K); bias: optional (K,).
        chunk_size: classes per chunk (``default_chunk_size`` when None).

    Returns:
        lse (N,) and target_logit (N,), in fp32 (float64 for float64 inputs).
    """
    # hidden: (N, h), weight: (K, h), targets: (N,), bias: (K,)
    dtype = _dispatch.torch_dtype(hidden, weight, bias)
    n, k = hidden.shape[0], weight.shape[0]
    chunk_size = chunk_size or default_chunk_size(n, k)
    hidden = hidden.to(dtype)
    run_max = torch.full((n,), float("-inf"), dtype=dtype, device=hidden.device)
    run_sum = torch.zeros(n, dtype=dtype, device=hidden.device)
    target_logit = torch.zeros(n, dtype=dtype, device=hidden.device)
    for start in range(0, k, chunk_size):
        stop = min(start + chunk_size, k)
        logits, _ = _chunk_logits(hidden, weight, bias, start, stop)
        in_chunk, column = _target_columns(targets, start, stop)
        target_logit = torch.where(in_chunk, logits.gather(1, column).squeeze(1), target_logit)
        new_max = torch.maximum(run_max, logits.amax(dim=1))
        # exp(-inf - finite) = 0 on the first chunk; the logit block is reused in place
        run_sum = run_sum * torch.exp(run_max - new_max) + logits.sub_(new_max.unsqueeze(1)).exp_().sum(dim=1)
        run_max = new_max
    return run_max + torch.log(run_sum), target_logit


def cross_entropy_backward_torch(
    grad_rows: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
    need_hidden: bool = True,
    need_weight: bool = True,
    need_bias: bool = True,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of ``sum_i grad_rows[i] * loss_i`` by chunked recomputation of the logits.

    ``d loss_i / d logit_ij = softmax_ij - [j == target_i]``: each chunk's logits are recomputed
    from the saved ``lse``, turned into that gradient in place and multiplied out; nothing N x K
    is held.

    Args:
        grad_rows: (N,) upstream gradient of each row's loss.
        hidden, weight, targets, bias: as for ``lse_and_target_torch``; lse: (N,) its result.
        need_*: which gradients to compute.

    Returns:
        (grad_hidden, grad_weight, grad_bias), each in its input's dtype, None where not needed.
    """
    # grad_rows, targets, lse: (N,), hidden: (N, h), weight: (K, h), bias: (K,)
    dtype = lse.dtype
    n, k = hidden.shape[0], weight.shape[0]
    chunk_size = chunk_size or default_chunk_size(n, k)
    hidden_c = hidden.to(dtype)
    scale = grad_rows.to(dtype).unsqueeze(1)
    lse = lse.unsqueeze(1)
    grad_hidden = torch.zeros_like(hidden_c) if need_hidden else None
    grad_weight = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_weight else None
    grad_bias = torch.empty_like(bias, memory_format=torch.contiguous_format) if need_bias else None
    for start in range(0, k, chunk_size):
        stop = min(start + chunk_size, k)
        logits, weight_chunk = _chunk_logits(hidden_c, weight, bias, start, stop)
        grad_logits = logits.sub_(lse).exp_()
        in_chunk, column = _target_columns(targets, start, stop)
        grad_logits.scatter_add_(1, column, -in_chunk.to(dtype).unsqueeze(1))
        grad_logits.mul_(scale)
        if need_hidden:
            grad_hidden.addmm_(grad_logits, weight_chunk)
        if need_weight:
            if grad_weight.dtype == dtype:
                torch.mm(grad_logits.t(), hidden_c, out=grad_weight[start:stop])
            else:
                grad_weight[start:stop] = grad_logits.t() @ hidden_c
        if need_bias:
            grad_bias[start:stop] = grad_logits.sum(dim=0)
    if grad_hidden is not None:
        grad_hidden = grad_hidden.to(hidden.dtype)
    return grad_hidden, grad_weight, grad_bias


def loss_and_unit_grads_torch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor],
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    row_chunk_bytes: Optional[int] = None,
):
    """Per-row losses and the gradients for a unit upstream gradient, in one pass over the rows.

    Chunked over rows instead of the vocabulary: a chunk of rows sees all K logits at once
    (at most ``row_chunk_bytes``), so its softmax is final and its gradient contributions are
    computed right away -- 6 N K h FLOPs in all, the same as materialising the logits, instead of
    the 8 N K h of a forward + recomputing backward. Used on the CPU when gradients are needed.

    Returns:
        (row_losses (N,), grad_hidden (N, h) or None, grad_weight (K, h) or None,
        grad_bias (K,) or None): the gradients of ``row_losses.sum()``; all in the compute dtype,
        which must be the dtype of hidden and weight.
    """
    # hidden: (N, h), weight: (K, h), targets: (N,), bias: (K,)
    n, k = hidden.shape[0], weight.shape[0]
    rows_per_chunk = max(1, (row_chunk_bytes or ROW_CHUNK_BYTES) // (hidden.element_size() * k))
    losses = hidden.new_empty(n)
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    grad_weight = torch.zeros_like(weight, memory_format=torch.contiguous_format) if need_weight else None
    grad_bias = torch.zeros_like(bias) if need_bias else None
    block = hidden.new_empty(k * min(n, rows_per_chunk))
    for start in range(0, n, rows_per_chunk):
        stop = min(n, start + rows_per_chunk)
        rows = hidden[start:stop]
        # (K, R) layout: the K-tall GEMMs run faster than (R, K) ones on CPU BLAS (measured
        # 9.7 s vs 10.7 s for N = 512, K = 500K, h = 1024), and softmax runs down the columns.
        # One buffer serves every chunk: a fresh 256 MB block per chunk costs page faults.
        logits_t = block[: k * (stop - start)].view(k, stop - start)
        if bias is None:
            torch.mm(weight, rows.t(), out=logits_t)
        else:
            torch.addmm(bias.unsqueeze(1), weight, rows.t(), out=logits_t)
        target_row = targets[start:stop].unsqueeze(0)
        target_logit = logits_t.gather(0, target_row).squeeze(0)
        # softmax in place (torch.logsumexp would allocate another (K, R) block)
        col_max = logits_t.amax(dim=0)
        probs_t = logits_t.sub_(col_max).exp_()
        col_sum = probs_t.sum(dim=0)
        probs_t.div_(col_sum)
        losses[start:stop] = col_max + torch.log(col_sum) - target_logit
        probs_t.scatter_add_(0, target_row, probs_t.new_full(target_row.shape, -1.0))  # softmax - onehot
        if need_hidden:
            torch.mm(probs_t.t(), weight, out=grad_hidden[start:stop])
        if need_weight:
            grad_weight.addmm_(probs_t, rows)
        if need_bias:
            grad_bias += probs_t.sum(dim=1)
    return losses, grad_hidden, grad_weight, grad_bias


class _RowCrossEntropy(torch.autograd.Function):
    """Per-row losses ``lse_i - logit_i[target_i]`` of rows whose targets are all valid."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, backend):
        # hidden: (M, h), weight: (K, h), bias: (K,) or None, targets: (M,) in [0, K)
        need = ctx.needs_input_grad[:3]
        ctx.unit_grads = None
        ctx.chunk_size = chunk_size
        # autocast off: under a bf16 autocast region the chunk GEMMs would produce bf16 logits
        with torch.autocast(hidden.device.type, enabled=False):
            dtype = _dispatch.torch_dtype(hidden, weight, bias)
            if (backend == "torch" and hidden.device.type == "cpu" and any(need) and chunk_size is None
                    and hidden.dtype == dtype and weight.dtype == dtype and (bias is None or bias.dtype == dtype)):
                losses, *unit_grads = loss_and_unit_grads_torch(hidden, weight, targets, bias, *need)
                ctx.unit_grads = unit_grads
                ctx.save_for_backward(hidden, weight, bias, targets, None)
                return losses
            if backend == "triton":
                lse, target_logit = _lse_and_target_triton(hidden, weight, targets, bias)
            else:
                lse, target_logit = lse_and_target_torch(hidden, weight, targets, bias, chunk_size)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        return lse - target_logit

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_rows):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        if ctx.unit_grads is not None:
            grad_hidden, grad_weight, grad_bias = ctx.unit_grads
            ctx.unit_grads = None
            # grad_hidden scales row by row; the weight and bias sums factor out only for a
            # uniform upstream gradient (reductions "mean" and "sum")
            uniform = bool((grad_rows == grad_rows[0]).all()) if grad_rows.numel() else True
            if uniform or not (need_weight or need_bias):
                scale = grad_rows[0].to(hidden.dtype) if grad_rows.numel() else hidden.new_zeros(())
                return (
                    grad_hidden.mul_(grad_rows.to(hidden.dtype).unsqueeze(1)) if need_hidden else None,
                    grad_weight.mul_(scale) if need_weight else None,
                    grad_bias.mul_(scale) if need_bias else None,
                    None, None, None,
                )
        if lse is None:
            # the fused forward saved unit gradients instead of lse, and they are spent: per-row
            # upstream weights, or a second backward through a retained graph. Recompute lse.
            with torch.autocast(hidden.device.type, enabled=False):
                lse = lse_and_target_torch(hidden, weight, targets, bias)[0]
        with torch.autocast(hidden.device.type, enabled=False):
            grads = cross_entropy_backward_torch(
                grad_rows, hidden, weight, targets, lse, bias, ctx.chunk_size,
                need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias,
            )
        return (*grads, None, None, None)


def _lse_and_target_triton(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor]:
    from .kernels import cross_entropy as kernel  # imported on first use: importing the package compiles nothing

    if hidden.dtype != weight.dtype:
        # converts the (large) weight only for mixed inputs
        common = _dispatch.kernel_dtype(hidden.dtype, weight.dtype)
        hidden, weight = hidden.to(common), weight.to(common)
    return kernel.cross_entropy_forward_triton(hidden, weight, targets.contiguous(), bias)


def _row_losses_cce(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    from cut_cross_entropy import linear_cross_entropy

    # bias is passed only when given: releases before 25.x have no bias argument
    extra = {} if bias is None else {"bias": bias}
    return linear_cross_entropy(hidden, weight, targets, reduction="none", filter_eps=None, **extra).float()


# ----------------------------------------------------------------------------------------------
# public API


def _check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__module__}.{type(t).__name__}")


def large_vocab_cross_entropy(
    hidden: torch.Tensor,
    classifier_weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    bias: Optional[torch.Tensor] = None,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """``F.cross_entropy(hidden @ classifier_weight.T + bias, targets)`` without the N x K logits.

    Args:
        hidden: (..., h) float tensor (the LLM's last hidden states).
        classifier_weight: (K, h) float tensor (the output head over the visual vocabulary).
        targets: (...) integer class ids in [0, K), or ``ignore_index`` for rows without a loss.
        ignore_index: target value of the rows to ignore (may also be a valid class id).
        reduction: "mean" (over non-ignored rows), "sum" or "none" (shape ``targets.shape``).
        bias: optional (K,) float tensor added to the logits.
        backend: "auto" | "torch" | "triton" | "cce" (see the module docstring).
        chunk_size: classes per chunk of the torch computation (forward of the "torch" backend,
            backward of "torch" and "triton"); default: as many as keep an (N, chunk) fp32 block
            within ``CHUNK_BYTES``, between ``MIN_CHUNK`` and ``MAX_CHUNK``.

    Returns:
        the loss in the result dtype of hidden and classifier_weight (computed in fp32, float64
        for float64 inputs): a scalar, or a tensor shaped like ``targets`` for "none". "mean" over
        zero non-ignored rows is NaN, as for ``F.cross_entropy``; its gradients are zero.

    Raises:
        TypeError: non-tensor inputs, non-float hidden/weight/bias, non-integer targets.
        ValueError: shape or dimension mismatch, empty vocabulary, tensors on different devices,
            NaN/Inf in an input, a target outside [0, K) that is not ``ignore_index``, an unknown
            reduction or backend, a backend the device cannot run, or a loss beyond the range of
            the result dtype (fp16: 65504).
    """
    # hidden: (..., h), classifier_weight: (K, h), targets: (...), bias: (K,)
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")
    for name, tensor in (("hidden", hidden), ("classifier_weight", classifier_weight), ("targets", targets)):
        _check_tensor(tensor, name)
    check_float(hidden, "hidden")
    check_float(classifier_weight, "classifier_weight")
    check_matrix(classifier_weight, "classifier_weight")
    k, dim = classifier_weight.shape
    if k == 0:
        raise ValueError("classifier_weight is empty: the vocabulary has K = 0 classes")
    if hidden.dim() == 0 or hidden.shape[-1] != dim:
        raise ValueError(
            f"dimension mismatch: hidden has shape {tuple(hidden.shape)} but classifier_weight has dim {dim}"
        )
    if targets.dtype == torch.bool or targets.is_floating_point() or targets.is_complex():
        raise TypeError(f"targets must hold integer class ids, got dtype {targets.dtype}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets has shape {tuple(targets.shape)} but hidden has leading shape {tuple(hidden.shape[:-1])}"
        )
    if bias is not None:
        _check_tensor(bias, "bias")
        check_float(bias, "bias")
        if tuple(bias.shape) != (k,):
            raise ValueError(f"bias must have shape ({k},), got {tuple(bias.shape)}")
    for name, tensor in (("classifier_weight", classifier_weight), ("targets", targets), ("bias", bias)):
        if tensor is not None and tensor.device != hidden.device:
            raise ValueError(f"hidden is on {hidden.device} but {name} is on {tensor.device}; move one of them")
    resolved = _dispatch.resolve("cross_entropy", backend, hidden.device, (hidden.dtype, classifier_weight.dtype))
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    hidden_2d = hidden.reshape(-1, dim)
    check_finite(hidden_2d, "hidden")
    targets_1d = targets.reshape(-1).long()
    valid = targets_1d != ignore_index
    bad = valid & ((targets_1d < 0) | (targets_1d >= k))
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"targets[{first}] (flattened) = {int(targets_1d[first])} is outside [0, {k}) and is not "
            f"ignore_index ({ignore_index}); {int(bad.sum())} such target(s)"
        )
    n_valid = int(valid.sum())
    all_valid = n_valid == targets_1d.shape[0]
    # Ignored rows are dropped before any GEMM (in L_GEN most positions are text, not visual tokens).
    valid_rows = None if all_valid else valid.nonzero().squeeze(1)
    rows_hidden = hidden_2d if all_valid else hidden_2d[valid_rows]
    rows_targets = targets_1d if all_valid else targets_1d[valid_rows]

    if resolved == "cce":
        row_losses = _row_losses_cce(rows_hidden, classifier_weight, rows_targets, bias)
    else:
        row_losses = _RowCrossEntropy.apply(rows_hidden, classifier_weight, bias, rows_targets, chunk_size, resolved)
    if not bool(torch.isfinite(row_losses.detach()).all()):
        # weight and bias are checked only here: a scan of a 500K x h head on every call costs
        # a tenth of the forward pass, and a non-finite input always shows up in the loss
        check_finite(classifier_weight, "classifier_weight")
        if bias is not None:
            check_finite(bias.unsqueeze(0), "bias")
        raise ValueError("the logits overflow: hidden @ classifier_weight.T has values beyond the float range")

    out_dtype = torch.promote_types(hidden.dtype, classifier_weight.dtype)
    if reduction == "none":
        if all_valid:
            return _in_range(row_losses, out_dtype).reshape(targets.shape)
        full = row_losses.new_zeros(targets_1d.shape[0]).index_put((valid_rows,), row_losses)
        return _in_range(full, out_dtype).reshape(targets.shape)
    total = row_losses.sum()
    if reduction == "mean":
        total = total / n_valid  # 0 / 0 = NaN when every row is ignored, as in F.cross_entropy
    return _in_range(total, out_dtype)


def _in_range(loss: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``loss`` (computed in fp32 or float64) cast to ``dtype``.

    Raises:
        ValueError: a finite loss beyond the range of ``dtype`` (fp16 tops out at 65504), which
            the cast would turn into inf.
    """
    if loss.dtype == dtype or not loss.is_floating_point():
        return loss
    limit = torch.finfo(dtype).max
    finite = loss.detach()[torch.isfinite(loss.detach())]
    if finite.numel() and float(finite.abs().max()) > limit:
        raise ValueError(
            f"the cross-entropy loss {float(finite.abs().max()):.6g} exceeds the {dtype} range ({limit:.6g}): "
            f"pass float32 hidden states or classifier_weight to get it in float32"
        )
    return loss.to(dtype)


def info_nce(
    a: torch.Tensor,
    b: torch.Tensor,
    temperature: Union[float, torch.Tensor] = 0.07,
    symmetric: bool = True,
) -> torch.Tensor:
    """Contrastive InfoNCE between paired rows of ``a`` and ``b`` (the mapper loss L_CL).

    Rows are L2-normalised; logits are the cosine similarities over ``temperature``; row i of
    ``a`` and row i of ``b`` are the positive pair, every other row of the batch a negative.
    A zero row normalises to zero (all its similarities are 0).

    Args:
        a: (B, e) float tensor (e.g. mapped C2 embeddings).
        b: (B, e) float tensor (e.g. the frozen text encoder's embeddings).
        temperature: > 0, a float or a 0-dim tensor (a learnable temperature gets its gradient).
        symmetric: average of the a -> b and b -> a cross-entropies (CLIP's loss); only a -> b
            when False.

    Returns:
        scalar loss, mean over the batch, in the result dtype of a and b (computed in fp32,
        float64 for float64 inputs).

    Raises:
        TypeError: non-tensor or non-float inputs.
        ValueError: shapes that are not both (B, e) with the same B and e, an empty batch,
            NaN/Inf in an input, or a temperature that is not a finite positive number.
    """
    # a: (B, e), b: (B, e)
    _check_tensor(a, "a")
    _check_tensor(b, "b")
    check_float(a, "a")
    check_float(b, "b")
    check_matrix(a, "a")
    check_matrix(b, "b")
    if a.shape != b.shape:
        raise ValueError(
            f"a and b must be paired (B, e) tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.shape[0] == 0:
        raise ValueError("info_nce needs at least one pair (B = 0)")
    if a.device != b.device:
        raise ValueError(f"a is on {a.device} but b is on {b.device}; move one of them")
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"temperature must be a scalar, got shape {tuple(temperature.shape)}")
        temperature_value = float(temperature.detach())
    elif isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
        temperature_value = float(temperature)
    else:
        raise TypeError(f"temperature must be a float or a scalar tensor, got {type(temperature).__name__}")
    if not (temperature_value > 0 and temperature_value != float("inf")):
        raise ValueError(f"temperature must be a finite positive number, got {temperature_value}")
    check_finite(a, "a")
    check_finite(b, "b")

    dtype = _dispatch.torch_dtype(a, b)
    a_unit = F.normalize(a.to(dtype), dim=1)
    b_unit = F.normalize(b.to(dtype), dim=1)
    logits = (a_unit @ b_unit.t()) / temperature
    labels = torch.arange(a.shape[0], device=a.device)
    loss = F.cross_entropy(logits, labels)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(logits.t(), labels))
    return loss.to(torch.promote_types(a.dtype, b.dtype))
