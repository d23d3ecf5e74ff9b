"""Per-tensor caches: statistics, converted copies and indexes built once per codebook tensor.

Keyed weakly by tensor identity (a dropped codebook frees its entries) and stamped with the
tensor's version counter, so an in-place change of the codebook rebuilds the entry instead of
serving stale statistics.
"""
from __future__ import annotations

from typing import Any, Callable, Hashable

import torch
from torch.utils.weak import WeakIdKeyDictionary

# tensor -> {key: (tensor version, value)}
_ENTRIES: WeakIdKeyDictionary = WeakIdKeyDictionary()


def per_tensor(tensor: torch.Tensor, key: Hashable, build: Callable[[torch.Tensor], Any], stamp: Hashable = None) -> Any:
    """``build(tensor)``, computed once per (tensor, key) and rebuilt after an in-place change.

    ``stamp``: a parameter of ``build``; an entry built with another stamp is replaced, so one
    key holds one value at a time whatever the stamps a caller cycles through.
    A value must not hold ``tensor`` itself (a converted copy is fine): the cache would then
    keep its own key alive forever.
    """
    entries = _ENTRIES.setdefault(tensor, {})
    cached = entries.get(key)
    if cached is None or cached[0] != (tensor._version, stamp):
        cached = ((tensor._version, stamp), build(tensor))
        entries[key] = cached
    return cached[1]


def cached(tensor: torch.Tensor, key: Hashable, stamp: Hashable = None) -> Any:
    """The current value of (tensor, key) if one was built (and the tensor not changed since), else None."""
    entry = _ENTRIES.get(tensor, {}).get(key)
    return entry[1] if entry is not None and entry[0] == (tensor._version, stamp) else None
