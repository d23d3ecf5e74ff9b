"""Sampling visual token ids over a K = 500K vocabulary without sorting K per step.

``sample_ids(logits, temperature, top_k, top_p)``: the kept set is the top_k largest logits
(``torch.topk``, O(K)) intersected with the nucleus -- the fewest most likely ids whose probability
(the full softmax over all K, by one log-sum-exp) reaches top_p. The nucleus is found among the
largest candidates only, doubling their number until their probability covers top_p, so a peaked
distribution looks at a few hundred ids, never a sort of all 500K. Ids always lie in [0, K).
"""
from __future__ import annotations

from typing import Optional

import torch

#: ids first examined for the nucleus (doubled until they hold top_p of the probability)
NUCLEUS_CANDIDATES = 1024


def sample_ids(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
               top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One id per row of ``logits`` (B, K), drawn from the temperature-scaled softmax restricted
    to the top_k largest and to the top_p nucleus (each optional). temperature 0 is greedy.

    Raises:
        ValueError: temperature < 0, top_k < 1, top_p outside (0, 1], logits not (B, K) or not finite.
    """
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must be (B, K) with K >= 1, got {tuple(logits.shape)}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1] or be None, got {top_p!r}")
    logits = logits.float()
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("logits hold NaN or Inf")
    k = logits.shape[1]
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=1)  # the first maximum: the lowest id among ties
    scaled = logits / temperature
    lse = torch.logsumexp(scaled, dim=1, keepdim=True)  # the full softmax's normaliser, all K ids
    width = min(k, top_k) if top_k is not None else min(k, NUCLEUS_CANDIDATES)
    while True:
        values, ids = torch.topk(scaled, width, dim=1)  # (B, width), sorted descending
        probs = (values - lse).exp()
        cumulative = probs.cumsum(dim=1)
        covered = top_p is None or bool((cumulative[:, -1] >= top_p).all())
        if covered or width == k or top_k is not None:
            break
        width = min(k, 2 * width)
    keep = torch.ones_like(probs, dtype=torch.bool)
    if top_p is not None:
        # the smallest prefix reaching top_p: an id is kept while the mass before it is < top_p
        keep = (cumulative - probs) < top_p
    weights = torch.where(keep, probs, torch.zeros_like(probs))
    choice = torch.multinomial(weights, 1, generator=generator)  # (B, 1), among the kept ids
    return ids.gather(1, choice).squeeze(1)
