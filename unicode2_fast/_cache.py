"""Per-tensor caches: statistics, converted copies and indexes built once per codebook tensor,
and CPU buffers reused from call to call (``reused_buffer``).

Keyed weakly by tensor identity (a dropped codebook frees its entries) and stamped with the
tensor's version counter, so an in-place change of the codebook rebuilds the entry instead of
serving stale statistics.
"""
from __future__ import annotations

import math
import threading
from typing import Any, Callable, Hashable, Tuple

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


# owner tensor -> {role: UntypedStorage}: CPU buffers handed out again once nobody holds them
_BUFFERS: WeakIdKeyDictionary = WeakIdKeyDictionary()
_BUFFERS_LOCK = threading.Lock()
_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)
#: larger buffers are not kept between calls
REUSE_MAX_BYTES = 256 << 20


def reused_buffer(owner: torch.Tensor, role: Hashable, shape: Tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A new contiguous CPU tensor of ``shape`` / ``dtype`` (uninitialised) whose memory is reused.

    Each (owner, role) keeps one storage. When no tensor from an earlier call still holds it
    (its use count is back to the cache's own reference) the same memory is handed out again,
    else a fresh storage replaces it, so a caller never gets memory somebody else still reads.
    Why: a fresh multi-MiB CPU tensor comes straight from mmap whenever glibc has trimmed its
    heap, and every 4 KiB page then faults on first touch (about 10 us each on a VM, so 30 ms
    for a 13 MiB gather output against a 1 ms step). The tensor is not a view: in-place ops
    and autograd treat it as any new tensor. Growing shapes allocate 25% of headroom; a storage
    over twice the request, one in shared memory, or one over REUSE_MAX_BYTES is not reused.
    """
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if owner.device.type != "cpu" or _USE_COUNT is None or nbytes == 0:
        return torch.empty(shape, dtype=dtype, device=owner.device)
    with _BUFFERS_LOCK:
        buffers = _BUFFERS.setdefault(owner, {})
        storage = buffers.get(role)
        # in use elsewhere (a live tensor, or moved to shared memory for another process, which
        # may still read it), too small, or more than twice the request (pickling a result would
        # write the whole storage): a fresh one
        if (storage is None or storage.nbytes() < nbytes or storage.nbytes() > 2 * nbytes
                or storage.is_shared() or _USE_COUNT(storage._cdata) > 1):
            grown = nbytes if storage is None or storage.nbytes() >= nbytes else max(nbytes, storage.nbytes() * 5 // 4)
            storage = torch.UntypedStorage(grown)
            if grown <= REUSE_MAX_BYTES:
                buffers[role] = storage
            else:
                buffers.pop(role, None)  # not held between calls: a one-off huge gather frees its memory
        return torch.empty(0, dtype=dtype).set_(storage, 0, shape)  # contiguous strides
