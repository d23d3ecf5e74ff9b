"""``u2.gathered_embedding``: ``weight[indices]`` whose weight gradient is row-sparse.

The C2 table of UniCode^2 is K x d = 500K x 1152 (576M parameters) and one training step gathers
a few thousand rows of it. ``torch.nn.functional.embedding`` returns a dense K x d gradient (2.3 GB
of fp32, nearly all zeros) unless ``sparse=True``, and even then its CUDA backward accumulates
with atomics. Here the backward returns a coalesced sparse COO gradient -- sorted unique row ids
and one summed row each -- computed deterministically, and ``u2.SparseRowAdamW`` updates just
those rows.

Backends for the backward (chosen at the forward call):
    "triton"  sorted segment-reduce kernel (kernels/embedding.py): CUDA tensors, or CPU
              tensors under TRITON_INTERPRET=1 (tests);
    "torch"   ``torch.unique`` + ``index_add_`` into fp32 rows: deterministic on the CPU;
    "auto"    Triton for CUDA tensors in fp32/fp16/bf16, torch otherwise.
Both sum duplicates in fp32 (float64 tables in float64) and round once to the table's dtype.
"""
from __future__ import annotations

import weakref
from typing import Any, Optional, Tuple

import torch

from . import _cache, _dispatch
from ._checks import check_float, check_matrix, to_tensor

BACKENDS = _dispatch.backends("embedding")
INDEX_DTYPES = (torch.int32, torch.int64)


def check_indices(indices: torch.Tensor, num_rows: int) -> None:
    """Raise TypeError for non-integer ids and ValueError naming the first id outside [0, K)."""
    if indices.dtype not in INDEX_DTYPES:
        raise TypeError(f"indices must be an int32 or int64 tensor, got dtype {indices.dtype}")
    if indices.numel() == 0:
        return
    lo, hi = torch.aminmax(indices)  # one pass, one device sync on CUDA
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= num_rows:
        bad = lo if lo < 0 else hi
        position = int((indices.reshape(-1) == bad).nonzero()[0, 0])
        why = "negative ids are not allowed (no wrap-around)" if bad < 0 else f"valid ids are 0..{num_rows - 1}"
        raise ValueError(
            f"indices hold id {bad} (flat position {position}), out of range for a table of K = {num_rows} rows: {why}"
        )


def embedding_backward_torch(grad_rows: torch.Tensor, ids: torch.Tensor,
                             weight: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row-sparse gradient of ``weight[ids]`` with torch ops: sorted unique ids and summed rows.

    Args:
        grad_rows: (N, d) upstream gradient; ids: (N,) int64.
        weight: the table, when given (CPU): the sums go into memory reused from its previous
            backward once that gradient is gone (``_cache.reused_buffer``).

    Returns:
        unique_ids (U,) int64 ascending and values (U, d) in ``grad_rows``' dtype, summed in fp32
        (float64 for float64) in the order of the positions: deterministic.
    """
    # grad_rows: (N, d), ids: (N,)
    unique_ids, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    accumulate = torch.promote_types(grad_rows.dtype, torch.float32)
    shape = (unique_ids.shape[0], grad_rows.shape[1])
    if weight is None:
        sums = torch.zeros(shape, dtype=accumulate, device=grad_rows.device)
    else:
        sums = _cache.reused_buffer(weight, "embedding.grad", shape, accumulate).zero_()
    sums.index_add_(0, inverse, grad_rows.to(accumulate))
    return unique_ids, sums.to(grad_rows.dtype)


class _GatheredEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor, backend: str) -> torch.Tensor:
        # ids: (N,) int64, weight: (K, d)
        ctx.save_for_backward(ids)
        ctx.weight_shape = tuple(weight.shape)
        ctx.weight_dtype = weight.dtype
        ctx.backend = backend
        # the table itself (not saved: no version check) keys the reused CPU buffers of the rows
        # and of the gradient; a weak reference, so the graph does not keep a dropped table alive
        ctx.weight_ref = weakref.ref(weight)
        rows = _cache.reused_buffer(weight, "embedding.rows", (ids.shape[0], weight.shape[1]), weight.dtype)
        return torch.index_select(weight, 0, ids, out=rows)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        # grad_out: (N, d)
        if not ctx.needs_input_grad[1]:
            return None, None, None
        (ids,) = ctx.saved_tensors
        grad_rows = grad_out.to(ctx.weight_dtype)
        if ctx.backend == "triton":
            from .kernels import embedding as kernel  # first use: importing the package compiles nothing

            unique_ids, values = kernel.embedding_backward_triton(grad_rows, ids)
        else:
            unique_ids, values = embedding_backward_torch(grad_rows, ids, ctx.weight_ref())
        # unique_ids are sorted and in range by construction: flag the tensor coalesced and skip
        # torch's invariant check (a full pass over the ids)
        grad_weight = torch.sparse_coo_tensor(
            unique_ids.unsqueeze(0), values, ctx.weight_shape, is_coalesced=True, check_invariants=False
        )
        return None, grad_weight, None


def gathered_embedding(indices: Any, weight: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``weight[indices]`` with a row-sparse weight gradient.

    Args:
        indices: ids of any shape, int32 or int64 torch tensor (or NumPy array), on ``weight``'s
            device, each in [0, K).
        weight: (K, d) float table, usually a leaf ``nn.Parameter``.
        backend: "auto" | "triton" | "torch" for the backward (see the module docstring).

    Returns:
        (*indices.shape, d) tensor equal to ``weight[indices]``. Its backward gives ``weight`` a
        coalesced ``torch.sparse_coo`` gradient of shape (K, d): the sorted unique ids (one sparse
        dimension) and their summed gradient rows in ``weight``'s dtype, accumulated in fp32.
        ``indices`` get no gradient. (When autograd stores it in ``weight.grad`` it keeps the
        sorted unique ids but, like ``nn.Embedding(sparse=True)``'s, without the coalesced flag.)
        Pair it with ``u2.SparseRowAdamW`` (or ``torch.optim.SparseAdam``).

    Raises:
        TypeError: non-integer indices, a non-float weight, or backend "triton" for float64.
        ValueError: weight not 2-D, an id outside [0, K) (the message names it and K), devices
            that differ, or an unknown backend.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor (e.g. an nn.Parameter), got {type(weight).__name__}")
    check_matrix(weight, "weight")
    check_float(weight, "weight")
    ids = to_tensor(indices, "indices")
    if ids.device != weight.device:
        raise ValueError(f"indices are on {ids.device} but weight is on {weight.device}; move one of them")
    num_rows = weight.shape[0]
    check_indices(ids, num_rows)
    resolved = _dispatch.resolve("embedding", backend, weight.device, (weight.dtype,))
    lead = tuple(ids.shape)
    rows = _GatheredEmbedding.apply(ids.reshape(-1).to(torch.int64), weight, resolved)
    return rows.reshape(*lead, weight.shape[1])
