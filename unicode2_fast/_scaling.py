"""Power-of-two rescaling of search inputs whose magnitudes would overflow or underflow fp32.

Every search backend computes in fp32 at some stage (filters, GEMMs, FAISS), where squares of
very large entries overflow and of very small ones underflow, and the rounding bounds of the exact
CPU paths assume neither. The nearest codeword does not change when both sides are scaled by the
same positive factor, and a power of two scales exactly: ``u2.nearest`` and ``u2.nearest_grouped``
scale, search, and scale the distances back.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from . import _dispatch
from ._cache import per_tensor

#: inputs whose largest magnitude is outside 2^-SAFE_EXPONENT .. 2^SAFE_EXPONENT are first scaled
#: by a power of two (see rescale_exponent)
SAFE_EXPONENT = 20


def rescale_exponent(x: torch.Tensor, codebook: torch.Tensor, x_absmax: Optional[float] = None) -> int:
    """``e`` such that x / 2^e and codebook / 2^e have their largest magnitude in [0.5, 1), or 0
    when the inputs already lie within 2^-SAFE_EXPONENT .. 2^SAFE_EXPONENT. ``x_absmax``: x's
    largest magnitude when the caller already has it.
    """
    # x: (N, d), codebook: (K, d) -- or any shapes: only their largest magnitudes matter
    largest = max(absmax(x) if x_absmax is None else x_absmax, per_tensor(codebook, ("absmax",), absmax))
    if largest == 0.0:
        return 0
    exponent = math.frexp(largest)[1]
    return exponent if abs(exponent) > SAFE_EXPONENT else 0


def absmax(t: torch.Tensor) -> float:
    """Largest magnitude of ``t`` (0.0 when empty)."""
    if t.numel() == 0:
        return 0.0
    lo, hi = torch.aminmax(t)
    return max(abs(float(lo)), abs(float(hi)))


def rescaled(x: torch.Tensor, codebook: torch.Tensor, exponent: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """x / 2^exponent and codebook / 2^exponent, exactly (float64 inputs stay float64, others are
    scaled in float32, whose range holds every fp16 / bf16 / fp32 value scaled this way)."""
    dtype = _dispatch.torch_dtype(x, codebook)
    x = torch.ldexp(x.to(dtype), torch.tensor(-exponent, dtype=torch.int32))
    # one scaled copy per codebook, replaced when another exponent is needed
    codebook = per_tensor(codebook, ("rescaled",),
                          lambda c: torch.ldexp(c.to(dtype), torch.tensor(-exponent, dtype=torch.int32)),
                          stamp=(exponent, dtype))
    return x, codebook


def rows_rescaled(t: torch.Tensor) -> torch.Tensor:
    """``t: (..., d)`` with each row scaled by a power of two into [0.5, 1) absmax where a row's
    largest magnitude lies outside 2^-SAFE_EXPONENT .. 2^SAFE_EXPONENT (else ``t`` itself)."""
    if t.numel() == 0:
        return t
    _, exponents = torch.frexp(t.abs().amax(dim=-1))
    if int(exponents.abs().max()) <= SAFE_EXPONENT:
        return t
    t = t.to(_dispatch.torch_dtype(t))
    return torch.ldexp(t, -exponents.to(torch.int32).unsqueeze(-1))


def unscaled_dists(dists: torch.Tensor, exponent: int, metric: str) -> torch.Tensor:
    """The distances of the original inputs from those of the rescaled ones.

    Raises:
        ValueError: a distance exceeds the float32 range that dists are returned in.
    """
    if metric == "cos":
        return dists
    # both sides were scaled by 2^-exponent: squared distances and inner products by 2^-2*exponent
    scaled = torch.ldexp(dists.double(), torch.tensor(2 * exponent, dtype=torch.int32))
    if scaled.numel() and float(scaled.abs().max()) > torch.finfo(torch.float32).max:
        what = "squared L2 distances" if metric == "l2" else "inner products"
        raise ValueError(
            f"{what} exceed the float32 range of dists ({torch.finfo(torch.float32).max:.3g}): the largest is "
            f"{float(scaled.abs().max()):.3g}; scale x and the codebook down (their entries reach 2^{exponent})"
        )
    return scaled.float()


def in_range(x: torch.Tensor, codebook: torch.Tensor, metric: str,
             x_absmax: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """(x, codebook, exponent) ready for a search: for "cos" every row scaled by its own power of
    two (cosine ignores each row's scale), then both sides by a common one where their magnitudes
    leave the safe range (``exponent``, 0 when none; ``unscaled_dists`` undoes it on the result).
    Any shapes with the vector dimension last; ``x_absmax``: x's largest magnitude if known.
    """
    if metric == "cos":
        x = rows_rescaled(x)
        # cached only as a copy (or None): a cached codebook itself would keep its key alive
        scaled = per_tensor(codebook, ("rows_rescaled",), lambda c: r if (r := rows_rescaled(c)) is not c else None)
        codebook = codebook if scaled is None else scaled
        x_absmax = None  # the rows were just rescaled
    exponent = rescale_exponent(x, codebook, x_absmax)
    if exponent:
        x, codebook = rescaled(x, codebook, exponent)
    return x, codebook, exponent
