"""``u2.build_codebook``: the paper's two-stage k-means over a stream of features, and the
``build-codebook`` command (:func:`cli_main`).

The build, for ``k`` codewords in ``n_coarse`` coarse cells over M features of dimension d:

1. Coarse sample: the ``max_points_per_centroid * n_coarse`` rows with the smallest hash keys
   (a bijective hash of (seed, row index), so the sample is a seeded uniform sample that does not
   depend on how the rows arrive: a tensor, a memory-mapped .npy file and any chunking of an
   iterable give the same rows). Arrays are sampled by row index; an iterable is read once for it.
2. Coarse stage: Lloyd k-means with ``n_coarse`` centroids on that sample.
3. Assignment pass: every feature goes to its nearest coarse centroid (``u2.nearest``); the coarse
   cell of each row (int32, 4 bytes per row) and the exact cell sizes are kept.
4. Allocation: ``k`` codewords are split over the cells in proportion to their sizes (largest
   remainder, total exactly ``k``, at least one per non-empty cell, at most one per point):
   :func:`allocate_codewords`.
5. Fine stage: per cell, a k-means with its share of codewords on at most
   ``max_points_per_centroid * k_cell`` of its rows (the smallest keys of a second hash). The
   samples of as many cells as fit in ``fine_batch_bytes`` are gathered in one pass over the
   features, so memory stays bounded however large M is.

Lloyd iterations (:func:`_lloyd`: the coarse stage, and the fine cells on CUDA): assignment by
``u2.nearest`` (the fused Triton kernel on CUDA); centroid update by ``index_add_`` in float64;
random-sample initialisation with k distinct points (seeded); a centroid that ends an update
empty, NaN / Inf (or, after the last update, duplicated) is dropped and refilled by splitting the
currently largest cluster at its member farthest from the centroid and from the points already
split off it (deterministic). On the CPU the fine cells run ``faiss.Kmeans`` instead, measured
4x faster per cell (see :func:`_train_cell`), after the same check for k distinct points and
followed by the same compaction (no NaN, no duplicate codewords).

Memory, apart from the features' own storage: the coarse sample (max_points_per_centroid x
n_coarse x d fp32: 1.2 GB at n_coarse = 1000, d = 1152), 4 bytes per feature row for the coarse
ids (+ about 50 bytes per row while the fine samples are planned, 24 per sampled row after), the
fine-sample batch (``fine_batch_bytes``) and the (k, d) result. The features themselves are read in blocks of
``BLOCK_BYTES``; an in-memory tensor is never copied whole.

Reproducibility: every random choice is derived from ``seed``, and features are processed in a
fixed grid of row blocks whatever form they arrive in, so the same inputs give bitwise-identical
codebooks on the same machine and thread count. (On CUDA, ``index_add_``'s atomic float64 adds
may differ in their last bits from run to run, which the float32 result almost always absorbs;
``torch.use_deterministic_algorithms(True)`` makes it exact.) With ``checkpoint_dir`` the build
saves its state after the coarse stage, after the assignment pass and after every coarse cell's
fine training, and a rerun resumes where it stopped with the same result as an uninterrupted
build.
"""
from __future__ import annotations

import contextlib
import hashlib
import heapq
import os
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from ._checks import check_finite, check_float, check_matrix, to_tensor
from ._io import atomic_write
from .codebook import Codebook
from .profiling import stage
from .nearest import nearest

#: features are read and assigned in blocks of about this many bytes (fp32)
BLOCK_BYTES = 64 << 20
#: default bytes of fine-stage training samples held at once; the features are read once per batch
FINE_BATCH_BYTES = 2 << 30
#: On the CPU, Lloyd assignments against fewer centroids than this use u2.nearest's FAISS backend.
#: Measured on this project's 2-core AVX-512 VNNI CI machine, d = 1152, SigLIP-like data, one
#: assignment against a new centroid tensor (k-means never reuses one): FAISS IndexFlatL2 took
#: 0.62 s vs 9.7 s for backend "auto" at K = 224, N = 57,344; 0.83 s vs 3.2 s at K = 2,000; 1.0 s vs
#: 2.6 s at K = 5,000; but 2.0 s vs 1.5 s at K = 20,000. At small K the certified int8 filter keeps
#: many candidates among near-equal clustered centroids and pays its per-codebook set-up every
#: iteration; a k-means assignment does not need certified exactness (a near-tie either way moves
#: the objective by nothing), only determinism, which FAISS has for a fixed thread count. The
#: fine cells of the paper's build (~500 centroids each) and its 1,000 coarse centroids are all
#: far below the crossover. On CUDA, "auto" (the fused Triton kernel) is used at every K.
FAISS_ASSIGN_MAX_K = 16384
#: Below this many multiply-adds (N K d) a CPU assignment runs FAISS on one thread. FAISS and torch
#: each bring their own OpenMP runtime whose idle threads spin after a parallel region; alternating
#: the two every Lloyd iteration made a k = 200, M = 4,000, d = 32 build take 0.5-2.7 s on the
#: 2-core CI machine instead of 0.1 s with one FAISS thread, while the threads save < 1 ms here.
SMALL_ASSIGN_MACS = 1 << 26
#: rows converted to float64 at a time in the centroid update (bounds the fp64 buffer)
_UPDATE_CHUNK_ROWS = 2048
#: row keys are hashed this many at a time when sampling an array by index
_KEY_CHUNK_ROWS = 1 << 22
#: bumped when the checkpoint layout changes, so an old directory is refused, not misread
_CHECKPOINT_FORMAT = 1
#: rows at the start and at the end of the features hashed into the data fingerprint
_FINGERPRINT_ROWS = 8

# hash streams: independent keys / seeds for each random choice of a build
_STREAM_COARSE_SAMPLE, _STREAM_FINE_SAMPLE, _STREAM_COARSE_INIT, _STREAM_CELL_INIT = 1, 2, 3, 4
_MASK64 = (1 << 64) - 1


# ----------------------------------------------------------------------------------------------
# seeded hashing: sample keys and derived seeds that depend only on (seed, row index)


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def _derive_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed for one purpose, mixed from the user's seed and ``parts``."""
    value = _splitmix64(seed & _MASK64)
    for part in parts:
        value = _splitmix64(value ^ (part & _MASK64))
    return value >> 1


def _row_keys(start: int, stop: int, seed: int, stream: int) -> torch.Tensor:
    """(stop - start,) int64 sample keys of rows [start, stop): unique, uniform, order-preserving
    images of the uint64 hash (the splitmix64 finaliser is a bijection, so no two rows tie)."""
    salt = np.uint64(_derive_seed(seed, stream))
    value = np.arange(start, stop, dtype=np.uint64) ^ salt
    value = value + np.uint64(0x9E3779B97F4A7C15)  # uint64 array arithmetic wraps, as intended
    value = (value ^ (value >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    value = (value ^ (value >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    value = value ^ (value >> np.uint64(31))
    # flipping the top bit maps uint64 order onto int64 order
    return torch.from_numpy((value ^ np.uint64(1 << 63)).view(np.int64))


class _BottomKeys:
    """The ``capacity`` rows with the smallest keys seen so far, fed block by block.

    Keys are unique, so the kept set does not depend on the order or grouping of the blocks.
    With ``dim``, the rows themselves are kept too (an iterable cannot be read by index later);
    a kept row is written once into a free or evicted slot, never moved. The buffers grow with
    the rows kept, so a capacity far above the number of rows costs nothing.
    """

    def __init__(self, capacity: int, dim: Optional[int] = None, device: Optional[torch.device] = None):
        self.capacity = capacity
        self.filled = 0
        self.keys = torch.empty(0, dtype=torch.int64)
        self.row_ids = torch.empty(0, dtype=torch.int64)
        self.rows = None if dim is None else torch.empty((0, dim), dtype=torch.float32, device=device)
        self._max_key: Optional[int] = None

    def _reserve(self, size: int) -> None:
        if self.keys.shape[0] >= size:
            return
        size = min(self.capacity, max(size, 2 * self.keys.shape[0]))
        for name in ("keys", "row_ids", "rows"):
            old = getattr(self, name)
            if old is not None:
                new = old.new_empty((size,) + tuple(old.shape[1:]))
                new[:self.filled] = old[:self.filled]
                setattr(self, name, new)

    def add(self, keys: torch.Tensor, row_ids: torch.Tensor, rows: Optional[torch.Tensor] = None) -> None:
        # keys, row_ids: (m,) int64 on the CPU; rows: (m, d) fp32
        if self._max_key is not None and self.filled == self.capacity:
            below = keys < self._max_key
            keys, row_ids = keys[below], row_ids[below]
            rows = None if rows is None else rows[below.to(rows.device)]
        if keys.numel() == 0:
            return
        total = self.filled + keys.numel()
        self._reserve(min(total, self.capacity))
        if total <= self.capacity:
            slots = torch.arange(self.filled, total)
        else:
            all_keys = torch.cat([self.keys[:self.filled], keys])
            kept = torch.zeros(total, dtype=torch.bool)
            kept[torch.topk(all_keys, self.capacity, largest=False, sorted=False).indices] = True
            new = kept[self.filled:].nonzero().squeeze(1)
            evicted = (~kept[:self.filled]).nonzero().squeeze(1)
            slots = torch.cat([evicted, torch.arange(self.filled, self.capacity)])
            keys, row_ids = keys[new], row_ids[new]
            rows = None if rows is None else rows[new.to(rows.device)]
        self.keys[slots] = keys
        self.row_ids[slots] = row_ids
        if self.rows is not None:
            self.rows[slots.to(self.rows.device)] = rows
        self.filled = min(total, self.capacity)
        self._max_key = int(self.keys[:self.filled].max())

    def result(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The kept row ids in ascending order, and the kept rows in that order."""
        order = torch.argsort(self.row_ids[:self.filled])
        rows = None if self.rows is None else self.rows[order.to(self.rows.device)]
        return self.row_ids[order], rows


# ----------------------------------------------------------------------------------------------
# feature sources: tensors / arrays, memory-mapped .npy files, re-iterable chunk streams


def _block_rows(dim: int) -> int:
    return max(1, BLOCK_BYTES // (4 * max(1, dim)))


def _fingerprint(n_rows: int, dim: int, head: torch.Tensor, tail: torch.Tensor) -> str:
    """sha256 of the shape and of the first and last rows (as fp32)."""
    digest = hashlib.sha256(f"{n_rows}x{dim}".encode())
    for rows in (head, tail):
        digest.update(rows.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _check_rows_finite(block: torch.Tensor, describe_row: Callable[[int], str]) -> None:
    """ValueError naming the first row of ``block: (m, d)`` that holds NaN or Inf;
    ``describe_row(i)`` says which feature row block row i is."""
    try:
        check_finite(block, "features")
    except ValueError:
        bad = int((~torch.isfinite(block)).any(dim=1).nonzero()[0, 0])
        raise ValueError(
            f"features row {describe_row(bad)} holds NaN or Inf; drop or clean those rows before clustering"
        ) from None


class _ArraySource:
    """An (M, d) torch tensor, NumPy array or read-only NumPy memmap, read by row ranges and indices."""

    def __init__(self, data: Any, device: torch.device, validate_blocks: bool):
        self.data = data
        self.device = device
        self.n_rows, self.dim = int(data.shape[0]), int(data.shape[1])
        self.validate_blocks = validate_blocks
        n_edge = min(self.n_rows, _FINGERPRINT_ROWS)
        self.fingerprint = _fingerprint(self.n_rows, self.dim, self._rows(0, n_edge),
                                        self._rows(self.n_rows - n_edge, self.n_rows))

    def _rows(self, start: int, stop: int) -> torch.Tensor:
        part = self.data[start:stop]
        if isinstance(part, np.ndarray):
            part = torch.from_numpy(np.array(part))  # a copy: memmap pages are read-only
        return part.detach().to(self.device, torch.float32)

    def blocks(self) -> Iterator[Tuple[int, torch.Tensor]]:
        """(first row, (m, d) fp32 block on the device) over the fixed block grid."""
        step = _block_rows(self.dim)
        for start in range(0, self.n_rows, step):
            block = self._rows(start, min(self.n_rows, start + step))
            if self.validate_blocks:
                _check_rows_finite(block, lambda bad: str(start + bad))
            yield start, block

    def coarse_sample(self, size: int, seed: int) -> torch.Tensor:
        """(size, d) fp32: the ``size`` rows with the smallest coarse-sample keys, by row index."""
        selector = _BottomKeys(size)
        for start in range(0, self.n_rows, _KEY_CHUNK_ROWS):
            stop = min(self.n_rows, start + _KEY_CHUNK_ROWS)
            selector.add(_row_keys(start, stop, seed, _STREAM_COARSE_SAMPLE), torch.arange(start, stop))
        row_ids, _ = selector.result()
        if isinstance(self.data, np.ndarray):  # a memmap reads only the pages of these rows
            rows = torch.from_numpy(np.ascontiguousarray(self.data[row_ids.numpy()]))
        else:
            rows = self.data[row_ids.to(self.data.device)]
        rows = rows.detach().to(self.device, torch.float32)
        if self.validate_blocks:  # caught here, before the coarse stage, when the sample holds it
            _check_rows_finite(rows, lambda bad: str(int(row_ids[bad])))
        return rows


class _IterableSource:
    """Re-iterable (m, d) chunks: a list / tuple / re-iterable object, or a callable returning a
    fresh iterator. Read once at construction (row count, validation, fingerprint, coarse
    sample), then once per later pass; every pass must yield the same rows."""

    def __init__(self, chunks: Any, device: Optional[torch.device], sample_capacity: int, seed: int, progress: bool):
        self._open = chunks if callable(chunks) else (lambda: iter(chunks))
        self.device = device
        self.dim: Optional[int] = None
        self.n_rows = 0
        sampler: Optional[_BottomKeys] = None
        head: List[torch.Tensor] = []
        tail: Optional[torch.Tensor] = None
        with tqdm(desc="scan features", unit=" rows", disable=not progress, leave=False) as bar:
            for start, block in self._blocks(validate=True):
                if sampler is None:
                    sampler = _BottomKeys(sample_capacity, self.dim, self.device)
                keys = _row_keys(start, start + block.shape[0], seed, _STREAM_COARSE_SAMPLE)
                sampler.add(keys, torch.arange(start, start + block.shape[0]), block)
                if sum(h.shape[0] for h in head) < _FINGERPRINT_ROWS:
                    head.append(block[:_FINGERPRINT_ROWS])
                last = block[-_FINGERPRINT_ROWS:]
                tail = last if tail is None else torch.cat([tail, last])[-_FINGERPRINT_ROWS:]
                self.n_rows = start + block.shape[0]
                bar.update(block.shape[0])
        if sampler is None:
            raise ValueError("features yielded no rows: need at least k rows in (m, d) chunks")
        self.fingerprint = _fingerprint(self.n_rows, self.dim, torch.cat(head)[:_FINGERPRINT_ROWS], tail)
        self._sample = sampler.result()[1]

    def _chunks(self) -> Iterator[torch.Tensor]:
        iterator = self._open()
        for index, chunk in enumerate(iterator):
            name = f"features chunk {index}"
            chunk = to_tensor(chunk, name)
            check_matrix(chunk, name)
            check_float(chunk, name)
            if self.dim is None:
                self.dim = int(chunk.shape[1])
                self.device = self.device or chunk.device
            elif chunk.shape[1] != self.dim:
                raise ValueError(f"{name} has dim {chunk.shape[1]} but the chunks before it have dim {self.dim}")
            yield index, chunk

    def _blocks(self, validate: bool) -> Iterator[Tuple[int, torch.Tensor]]:
        """Regroup the chunks into the fixed block grid, so results never depend on chunking."""
        pending: List[torch.Tensor] = []
        pending_rows = start = 0
        for index, chunk in self._chunks():
            if validate:
                first = start + pending_rows
                _check_rows_finite(chunk, lambda bad: f"{first + bad} (row {bad} of chunk {index})")
            chunk = chunk.detach().to(self.device, torch.float32)
            step = _block_rows(self.dim)
            while chunk.shape[0]:
                take = min(step - pending_rows, chunk.shape[0])
                pending.append(chunk[:take])
                chunk = chunk[take:]
                pending_rows += take
                if pending_rows == step:
                    yield start, torch.cat(pending)
                    start, pending, pending_rows = start + step, [], 0
        if pending_rows:
            yield start, torch.cat(pending)

    def blocks(self) -> Iterator[Tuple[int, torch.Tensor]]:
        rows = 0
        for start, block in self._blocks(validate=False):
            rows = start + block.shape[0]
            if rows > self.n_rows:
                break
            yield start, block
        if rows != self.n_rows:
            raise ValueError(
                f"the features iterable yielded {'more' if rows > self.n_rows else 'fewer'} rows on a later pass "
                f"than the {self.n_rows} of its first: it must yield the same chunks every time"
            )

    def coarse_sample(self, size: int, seed: int) -> torch.Tensor:
        return self._sample[:size]


def _open_features(features: Any, device: Optional[torch.device], sample_capacity: int, seed: int,
                   progress: bool):
    """The source for ``features`` (see :func:`build_codebook`), with its kind and dtype checked."""
    if isinstance(features, (str, os.PathLike)):
        path = os.fspath(features)
        if not os.path.exists(path):
            raise FileNotFoundError(f"features file not found: {path}")
        if os.path.isdir(path):
            raise IsADirectoryError(f"features path is a directory, expected a .npy file: {path}")
        try:
            data = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise ValueError(f"{path}: not a .npy array file ({exc})") from None
        if not isinstance(data, np.ndarray):  # an .npz archive
            data.close()
            raise ValueError(f"{path}: an .npz archive, expected a single .npy array of shape (M, d)")
        # dtype checked on an empty array of the same dtype: no page of the file is read
        check_float(to_tensor(np.empty((0, 1), data.dtype), "features"), "features")
        if data.ndim != 2:
            raise ValueError(f"features must be a 2-D (rows, dim) array, got shape {data.shape} from {path}")
        return _ArraySource(data, torch.device(device or "cpu"), validate_blocks=True)
    if isinstance(features, (torch.Tensor, np.ndarray)) or type(features).__module__.split(".")[0] == "cupy":
        tensor = to_tensor(features, "features")
        check_matrix(tensor, "features")
        check_float(tensor, "features")
        check_finite(tensor, "features")
        return _ArraySource(tensor, torch.device(device) if device else tensor.device, validate_blocks=False)
    if callable(features) or isinstance(features, (list, tuple)):
        return _IterableSource(features, torch.device(device) if device else None, sample_capacity, seed, progress)
    try:
        one_shot = iter(features) is features
    except TypeError:
        raise TypeError(
            f"features must be an (M, d) tensor / array, a .npy path or an iterable of (m, d) chunks, "
            f"got {type(features).__name__}"
        ) from None
    if one_shot:
        raise TypeError(
            "features is a one-shot iterator, but the build reads the features several times: pass a list "
            "of chunks or a callable that returns a fresh iterator"
        )
    return _IterableSource(features, torch.device(device) if device else None, sample_capacity, seed, progress)


# ----------------------------------------------------------------------------------------------
# Lloyd k-means


@contextlib.contextmanager
def _faiss_threads(n_threads: int) -> Iterator[None]:
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n_threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _assign(x: torch.Tensor, centroids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of every row: ids (n,) int64, squared distances (n,) float32."""
    # x: (n, d) fp32, centroids: (k, d) fp32 on the same device
    if x.device.type != "cpu" or centroids.shape[0] >= FAISS_ASSIGN_MAX_K:
        return nearest(x, centroids)
    if x.shape[0] * centroids.shape[0] * x.shape[1] >= SMALL_ASSIGN_MACS:
        return nearest(x, centroids, backend="faiss")
    with _faiss_threads(1):
        return nearest(x, centroids, backend="faiss")


def _init_centroids(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """(k, d): the first k distinct rows of a seeded random permutation of ``x: (n, d)``.

    Raises:
        ValueError: ``x`` holds fewer than k distinct rows (message completed by the caller).
    """
    n = x.shape[0]
    order = torch.randperm(n, generator=generator)
    take = min(n, k)
    while True:
        candidates = x[order[:take].to(x.device)]
        _, first = _distinct_rows(candidates)
        if first.numel() >= k or take == n:
            break
        take = min(n, 2 * take)
    if first.numel() < k:
        raise _TooFewDistinct(first.numel())
    return candidates[first.sort().values[:k]].contiguous()


class _TooFewDistinct(ValueError):
    """Fewer distinct training points than centroids (``n_distinct`` when it is known)."""

    def __init__(self, n_distinct: Optional[int] = None):
        super().__init__(n_distinct)
        self.n_distinct = n_distinct


def _update_centroids(x: torch.Tensor, ids: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Means of the clusters, summed in float64: centroids (k, d) fp64 (0 for an empty cluster)
    and member counts (k,) int64."""
    # x: (n, d) fp32, ids: (n,) int64
    sums = torch.zeros((k, x.shape[1]), dtype=torch.float64, device=x.device)
    # one fp64 staging buffer, refilled per chunk: a fresh fp64 copy per chunk cost 2.5x the time
    # (page faults of the new allocation) at n = 25,600, d = 1152
    staging = torch.empty((min(_UPDATE_CHUNK_ROWS, x.shape[0]), x.shape[1]), dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[0], _UPDATE_CHUNK_ROWS):
        part = staging[:min(_UPDATE_CHUNK_ROWS, x.shape[0] - start)]
        part.copy_(x[start:start + part.shape[0]])
        sums.index_add_(0, ids[start:start + part.shape[0]], part)
    counts = torch.bincount(ids, minlength=k)
    return sums / counts.clamp_min(1).unsqueeze(1), counts


def _distinct_rows(rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Groups of equal rows of ``rows: (n, d)``: the group of each row (n,) and the position of
    each group's first row (G,), both int64."""
    _, inverse = torch.unique(rows, dim=0, return_inverse=True)
    positions = torch.arange(rows.shape[0], device=rows.device)
    first = torch.full((int(inverse.max()) + 1,), rows.shape[0], device=rows.device)
    return inverse, first.scatter_reduce_(0, inverse, positions, reduce="amin")


def _distinct_row_count(x: torch.Tensor, enough: int) -> int:
    """The number of distinct rows of ``x: (n, d)`` fp32, or any count >= ``enough`` once that
    many are certain.

    Fast path: an exact integer hash of each row's bits (wrapping int64 arithmetic, so equal rows
    always hash equal); distinct hashes prove distinct rows. Only when fewer than ``enough``
    hashes differ (few distinct rows, or a collision) are the rows compared exactly.
    """
    weights = torch.randint(-(2 ** 62), 2 ** 62, (x.shape[1],), generator=torch.Generator().manual_seed(0))
    weights = weights.to(x.device)
    hashes = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    for start in range(0, x.shape[0], _UPDATE_CHUNK_ROWS):
        rows = x[start:start + _UPDATE_CHUNK_ROWS] + 0.0  # -0.0 -> +0.0: the same point
        hashes[start:start + rows.shape[0]] = (rows.view(torch.int32).long() * weights).sum(dim=1)
    count = torch.unique(hashes).numel()
    return count if count >= enough else _distinct_rows(x)[1].numel()


def _duplicate_rows(rows: torch.Tensor) -> torch.Tensor:
    """(n,) bool: the rows of ``rows: (n, d)`` equal to an earlier row."""
    if rows.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool, device=rows.device)
    inverse, first = _distinct_rows(rows)
    return first[inverse] != torch.arange(rows.shape[0], device=rows.device)


def _refill(centroids: torch.Tensor, bad: torch.Tensor, counts: torch.Tensor, x: torch.Tensor,
            ids: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """Replace the ``bad`` rows of ``centroids`` by splitting the largest clusters.

    Each bad centroid, in index order, becomes a member of the currently largest good cluster
    (ties to the lowest index): the member farthest from that cluster's centroid and from the
    members already taken from it in this call (farthest-first, ties to the lowest row), so
    repeated splits of one cluster spread over it instead of piling into its far end. A split
    halves the cluster's size for the choice of the next donor, so splits also spread over the
    large clusters. A cluster whose unused members all sit on its centroid cannot donate. When no
    cluster can, the unused members of the dropped clusters are the candidates instead, farthest
    from the good centroids first.

    centroids: (k, d) fp32; bad: (k,) bool; counts: (k,) int64 members of the last assignment
    ``ids: (n,)`` of ``x: (n, d)``; used: (n,) bool rows already taken (updated in place).

    Raises:
        _TooFewDistinct: nothing left to split (fewer distinct points than centroids).
    """
    centroids = centroids.clone()
    weight = counts.clone()
    good = ~bad
    exhausted = bad | (counts == 0)
    # donor -> (its unused members, squared distance of each to the nearest of the donor's
    # centroid and the points taken from it so far)
    reach: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
    for cluster in bad.nonzero().squeeze(1).tolist():
        point = None
        while not bool(exhausted.all()):
            donor = int(torch.where(exhausted, -1, weight).argmax())
            if donor not in reach:
                members = ((ids == donor) & ~used).nonzero().squeeze(1)
                reach[donor] = (members, (x[members].double() - centroids[donor].double()).pow(2).sum(dim=1))
            members, gap = reach[donor]
            if gap.numel() and float(gap.max()) > 0:
                point = int(members[int(gap.argmax())])
                to_point = (x[members].double() - x[point].double()).pow(2).sum(dim=1)
                reach[donor] = (members, torch.minimum(gap, to_point))
                weight[donor] -= weight[donor] // 2
                break
            exhausted[donor] = True
        if point is None:
            point = _farthest_orphan(centroids, good, bad, x, ids, used)
        centroids[cluster] = x[point]
        used[point] = True
        good[cluster] = True
    return centroids


def _farthest_orphan(centroids: torch.Tensor, good: torch.Tensor, bad: torch.Tensor, x: torch.Tensor,
                     ids: torch.Tensor, used: torch.Tensor) -> int:
    """The unused member of a dropped cluster farthest from every good centroid (must be > 0);
    the first one when no centroid is good."""
    orphans = (bad[ids] & ~used).nonzero().squeeze(1)
    if orphans.numel() and not bool(good.any()):
        return int(orphans[0])
    if orphans.numel():
        _, dists = _assign(x[orphans], centroids[good].contiguous())
        best = int(dists.argmax())
        if float(dists[best]) > 0:
            return int(orphans[best])
    raise _TooFewDistinct()


def _repair(centroids: torch.Tensor, bad: torch.Tensor, counts: torch.Tensor, x: torch.Tensor,
            ids: torch.Tensor, final: bool) -> torch.Tensor:
    """Refill the ``bad`` centroids (:func:`_refill`); when ``final``, duplicated centroids too,
    until all k are distinct. Arguments as for :func:`_refill`."""
    bad = bad.clone()
    used = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    if final:
        good = (~bad).nonzero().squeeze(1)
        bad[good[_duplicate_rows(centroids[good])]] = True
    while bool(bad.any()):
        centroids = _refill(centroids, bad, counts, x, ids, used)
        # a refilled centroid is a data point that could equal another centroid
        bad = _duplicate_rows(centroids) if final else torch.zeros_like(bad)
    return centroids


@contextlib.contextmanager
def _too_few_distinct_is_value_error(label: str, n_rows: int, k: int) -> Iterator[None]:
    try:
        yield
    except _TooFewDistinct as exc:
        found = "fewer" if exc.n_distinct is None else f"only {exc.n_distinct}"
        raise ValueError(
            f"{label}: {found} distinct points among its {n_rows} training rows for {k} centroids; "
            "the features hold too few distinct points (deduplicate them or lower k)"
        ) from None


def _lloyd(x: torch.Tensor, k: int, niter: int, seed: int, label: str,
           report: Optional[Callable[[int, float], None]] = None) -> Tuple[torch.Tensor, float]:
    """Lloyd k-means of ``x: (n, d)`` fp32 with k centroids.

    Returns:
        (k, d) fp32 distinct, finite centroids and the mean squared error of the last assignment.

    Raises:
        ValueError: fewer than k distinct rows in ``x`` (``label`` says which stage / cell).
    """
    with _too_few_distinct_is_value_error(label, x.shape[0], k):
        centroids = _init_centroids(x, k, torch.Generator().manual_seed(seed))
        mse = float("nan")
        for iteration in range(niter):
            ids, dists = _assign(x, centroids)
            mse = float(dists.double().mean())
            if report is not None:
                report(iteration, mse)
            new, counts = _update_centroids(x, ids, k)
            new = new.float()  # the fp32 cast can overflow: check finiteness after it
            bad = (counts == 0) | ~torch.isfinite(new).all(dim=1)
            # the last update must leave k distinct codewords
            centroids = _repair(new, bad, counts, x, ids, final=iteration == niter - 1)
    return centroids, mse


def _faiss_kmeans(x: torch.Tensor, k: int, niter: int, seed: int, label: str,
                  report: Optional[Callable[[int, float], None]] = None) -> Tuple[torch.Tensor, float]:
    """``faiss.Kmeans`` on ``x: (n, d)`` fp32 CPU rows, then compacted like :func:`_lloyd`'s result.

    FAISS initialises from k random rows, splits empty clusters itself and makes no NaN from
    finite data, but can return equal centroids when rows repeat: those are refilled.
    ``report`` gets the objective of every iteration once training is done.
    """
    import faiss

    n, d = x.shape
    # FAISS would split clusters of repeated rows into perturbed copies instead of failing
    n_distinct = _distinct_row_count(x, k)
    if n_distinct < k:
        with _too_few_distinct_is_value_error(label, n, k):
            raise _TooFewDistinct(n_distinct)
    km = faiss.Kmeans(d, k, niter=niter, seed=seed % (2 ** 31 - 1), max_points_per_centroid=n,
                      min_points_per_centroid=1, verbose=False)
    with _faiss_threads(1) if n * k * d < SMALL_ASSIGN_MACS else contextlib.nullcontext():
        km.train(x.contiguous().numpy())
    centroids = torch.from_numpy(km.centroids).clone()
    for iteration, objective in enumerate(km.obj):
        if report is not None:
            report(iteration, float(objective) / n)
    bad = ~torch.isfinite(centroids).all(dim=1)
    if bool(bad.any()) or bool(_duplicate_rows(centroids).any()):
        with _too_few_distinct_is_value_error(label, n, k):
            ids, _ = _assign(x, torch.where(bad.unsqueeze(1), 0.0, centroids))
            centroids = _repair(centroids, bad, torch.bincount(ids, minlength=k), x, ids, final=True)
    return centroids, float(km.obj[-1]) / n


def _train_cell(x: torch.Tensor, k: int, niter: int, seed: int, label: str,
                report: Optional[Callable[[int, float], None]] = None) -> Tuple[torch.Tensor, float]:
    """The fine k-means of one coarse cell: :func:`_faiss_kmeans` on the CPU below
    FAISS_ASSIGN_MAX_K centroids, else :func:`_lloyd` (on CUDA: Triton assignments)."""
    # On the CPU a fine cell is clustered by faiss.Kmeans rather than by _lloyd (below
    # FAISS_ASSIGN_MAX_K centroids; results stay deterministic for a seed on a given machine and
    # thread count). Measured on the 2-core CI machine, one cell of SigLIP-like rows (25,600 x 1152,
    # k = 100, 20 iterations): 0.49 s for faiss.Kmeans, 2.0 s for _lloyd with FAISS assignments. Its
    # search ran 2x faster inside FAISS's loop than called per iteration from Python with torch's
    # OpenMP work in between (see SMALL_ASSIGN_MACS), and its fp32 C++ update beats our fp64 one.
    # Quality is on par: held-out MSE over 3 seeds on the test set was 1.040x single-stage
    # faiss.Kmeans with FAISS cells and 1.002x with _lloyd cells; single cells land in better or worse
    # local minima either way. The coarse stage (~1% of the paper build's multiply-adds) keeps _lloyd.
    if x.device.type == "cpu" and k < FAISS_ASSIGN_MAX_K:
        return _faiss_kmeans(x, k, niter, seed, label, report)
    return _lloyd(x, k, niter, seed, label, report)


# ----------------------------------------------------------------------------------------------
# allocation of codewords to coarse cells


def allocate_codewords(cell_sizes: Sequence[int], k: int, capacity: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Split k codewords over coarse cells in proportion to their sizes.

    Largest-remainder rounding of the quotas ``k * size / total`` (exact integer arithmetic, ties to
    the lower cell index), then: every non-empty cell gets at least one codeword (taken back one
    at a time from the cell most above its quota), and no cell more than its capacity (the excess
    is handed out one at a time to the cell most below its quota). Empty cells get none.

    Args:
        cell_sizes: (n_coarse,) non-negative point counts.
        k: total number of codewords.
        capacity: (n_coarse,) most codewords a cell may get (default: its size).

    Returns:
        (n_coarse,) int64 codewords per cell, summing to exactly k.

    Raises:
        ValueError: k is smaller than the number of non-empty cells, or larger than the total
            capacity of the non-empty cells; a negative size.
    """
    sizes = [int(s) for s in cell_sizes]
    limits = sizes if capacity is None else [int(c) for c in capacity]
    if len(limits) != len(sizes):
        raise ValueError(f"capacity has {len(limits)} entries but there are {len(sizes)} cells")
    if any(s < 0 for s in sizes):
        raise ValueError("cell sizes must be non-negative")
    limits = [limit if size else 0 for limit, size in zip(limits, sizes)]
    nonempty = [c for c, s in enumerate(sizes) if s > 0]
    if k < len(nonempty):
        raise ValueError(f"k={k} is smaller than the number of non-empty cells ({len(nonempty)}): "
                         "every non-empty cell needs at least one codeword")
    if any(limits[c] < 1 for c in nonempty):
        raise ValueError("every non-empty cell needs a capacity of at least one codeword")
    if sum(limits) < k:
        raise ValueError(f"k={k} is more than the cells can hold ({sum(limits)} points)")
    total = sum(sizes)
    alloc = [k * s // total for s in sizes]
    remainders = [k * s % total for s in sizes]
    short = k - sum(alloc)
    for c in sorted(range(len(sizes)), key=lambda c: (-remainders[c], c))[:short]:
        alloc[c] += 1

    # over-representation of a cell: alloc/k - size/total, scaled by k * total to stay integral
    def over(c: int) -> int:
        return alloc[c] * total - k * sizes[c]

    starved = [c for c in nonempty if alloc[c] == 0]
    if starved:
        for c in starved:
            alloc[c] = 1
        heap = [(-over(c), c) for c in nonempty if alloc[c] > 1]
        heapq.heapify(heap)
        for _ in starved:
            _, c = heapq.heappop(heap)
            alloc[c] -= 1
            if alloc[c] > 1:
                heapq.heappush(heap, (-over(c), c))
    excess = sum(max(0, a - limit) for a, limit in zip(alloc, limits))
    if excess:
        alloc = [min(a, limit) for a, limit in zip(alloc, limits)]
        heap = [(over(c), c) for c in nonempty if alloc[c] < limits[c]]
        heapq.heapify(heap)
        for _ in range(excess):
            _, c = heapq.heappop(heap)
            alloc[c] += 1
            if alloc[c] < limits[c]:
                heapq.heappush(heap, (over(c), c))
    return torch.tensor(alloc, dtype=torch.int64)


# ----------------------------------------------------------------------------------------------
# fine-stage samples


def _plan_fine_samples(coarse_ids: torch.Tensor, n_coarse: int, take: torch.Tensor, seed: int):
    """Which rows train each cell: the ``take[c]`` rows of cell c with the smallest fine keys.

    Sample positions are cell-major (cell 0's rows first), by key within a cell.

    Returns:
        rows (S,) int64 ascending; pos (S,) int64 the sample position of each of those rows and
        cell (S,) int64 its cell; offsets (n_coarse + 1,) int64 where cell c's positions start.
    """
    # coarse_ids: (M,) int32; take: (n_coarse,) int64
    n_rows = coarse_ids.shape[0]
    cell_bits = max(1, (n_coarse - 1).bit_length())
    key_bits = 63 - cell_bits
    # one int64 sort key per row: cell in the high bits, the top bits of the row's key below;
    # equal truncated keys fall back to row order (stable sort), so ties are deterministic
    composite = torch.empty(n_rows, dtype=torch.int64)
    for start in range(0, n_rows, _KEY_CHUNK_ROWS):
        stop = min(n_rows, start + _KEY_CHUNK_ROWS)
        keys = _row_keys(start, stop, seed, _STREAM_FINE_SAMPLE)
        unsigned = (keys.numpy().view(np.uint64) ^ np.uint64(1 << 63)) >> np.uint64(64 - key_bits)
        composite[start:stop] = (coarse_ids[start:stop].long() << key_bits) | torch.from_numpy(unsigned.view(np.int64))
    sorted_keys, order = torch.sort(composite, stable=True)
    del composite
    cells = sorted_keys >> key_bits
    del sorted_keys
    sizes = torch.bincount(coarse_ids.long(), minlength=n_coarse)
    starts = torch.cumsum(sizes, 0) - sizes
    keep = (torch.arange(n_rows) - starts[cells]) < take[cells]
    rows, cells = order[keep], cells[keep]
    del order, keep
    rows, pos = torch.sort(rows)
    offsets = torch.zeros(n_coarse + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(take, 0)
    return rows, pos, cells[pos], offsets


def _gather_cells(source, cells: List[int], plan: Tuple[torch.Tensor, ...],
                  progress: bool) -> Tuple[torch.Tensor, Dict[int, Tuple[int, int]]]:
    """One pass over the features collecting the samples of ``cells`` (``plan``: from
    :func:`_plan_fine_samples`).

    Returns:
        the (S_group, d) fp32 samples, cells in the given order, and each cell's (start, stop)
        rows in it.
    """
    rows, pos, sample_cell, offsets = plan
    n_coarse = offsets.shape[0] - 1
    local_start = torch.zeros(n_coarse, dtype=torch.int64)
    in_group = torch.zeros(n_coarse, dtype=torch.bool)
    spans: Dict[int, Tuple[int, int]] = {}
    filled = 0
    for cell in cells:
        size = int(offsets[cell + 1] - offsets[cell])
        spans[cell] = (filled, filled + size)
        local_start[cell] = filled
        in_group[cell] = True
        filled += size
    samples = torch.empty((filled, source.dim), dtype=torch.float32, device=source.device)
    with tqdm(total=source.n_rows, desc=f"gather cells {cells[0]}-{cells[-1]}", unit=" rows",
              disable=not progress, leave=False) as bar:
        for start, block in source.blocks():
            lo, hi = torch.searchsorted(rows, torch.tensor([start, start + block.shape[0]])).tolist()
            cell = sample_cell[lo:hi]
            mine = in_group[cell]
            where = pos[lo:hi][mine] - offsets[cell[mine]] + local_start[cell[mine]]
            samples[where.to(samples.device)] = block[(rows[lo:hi][mine] - start).to(block.device)]
            bar.update(block.shape[0])
    return samples, spans


# ----------------------------------------------------------------------------------------------
# checkpoints


class _Checkpoints:
    """State files of one build in ``directory``, each tagged with the build's parameters."""

    def __init__(self, directory: str, run: Dict[str, Any]):
        self.directory = os.fspath(directory)
        self.run = run
        os.makedirs(self.directory, exist_ok=True)

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, f"{name}.pt")

    def load(self, name: str) -> Optional[Dict[str, Any]]:
        path = self._path(name)
        if not os.path.exists(path):
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch.load raises many types for a damaged file
            raise ValueError(f"{path}: unreadable checkpoint ({exc}); delete it to redo that step") from None
        saved = state.get("run", {}) if isinstance(state, dict) else {}
        if saved != self.run:
            changed = [("features: other data (their shape or first / last rows differ)" if key == "fingerprint"
                        else f"{key}: {saved.get(key)!r} there, {self.run.get(key)!r} now")
                       for key in sorted(set(saved) | set(self.run)) if saved.get(key) != self.run.get(key)]
            raise ValueError(
                f"checkpoint_dir {self.directory} holds a build with other parameters or data "
                f"({'; '.join(changed)}); resume with the same arguments and features, or use an empty directory"
            )
        return state

    def save(self, name: str, state: Dict[str, Any]) -> None:
        """Write atomically: a temporary file in the same directory, then one rename."""
        atomic_write(self._path(name), lambda tmp_path: torch.save({**state, "run": self.run}, tmp_path))


# ----------------------------------------------------------------------------------------------
# the build


def _check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def build_codebook(
    features: Any,
    k: int,
    n_coarse: Optional[int] = None,
    *,
    niter: int = 20,
    seed: int = 0,
    max_points_per_centroid: int = 256,
    progress: bool = True,
    checkpoint_dir: Optional[str] = None,
    device: Optional[str] = None,
    fine_batch_bytes: int = FINE_BATCH_BYTES,
) -> Codebook:
    """Build a k-codeword codebook by two-stage k-means (the module docstring has the details).

    Args:
        features: the (M, d) training features: a torch tensor / NumPy / CuPy array, a path to a
            .npy file (memory-mapped, read in blocks, never loaded whole), or a re-iterable of
            (m, d) chunks (a list, or a callable returning a fresh iterator; read several times,
            it must yield the same rows each time). Any float dtype; trained in fp32.
        k: number of codewords, 1 <= k <= M.
        n_coarse: number of coarse cells, 1 <= n_coarse <= k (default round(sqrt(k))).
        niter: Lloyd iterations of every k-means (coarse and per cell).
        seed: all sampling and initialisation derive from it.
        max_points_per_centroid: training rows per centroid at most, in both stages.
        progress: show tqdm bars with the mean squared error of each iteration.
        checkpoint_dir: save state here and resume from it (see the module docstring).
        device: where to compute (default: the features' device; CPU for .npy files).
        fine_batch_bytes: fp32 bytes of fine-stage samples held at once (a cell larger than this
            is still gathered whole); each batch of cells costs one read of the features.

    Returns:
        Codebook of (k, d) fp32 vectors sorted by coarse cell, with meta: coarse_ids (k,) int64,
        coarse_centroids (n_coarse, d) fp32, cell_sizes (n_coarse,) int64 feature rows per cell,
        n_coarse, k, niter, seed, max_points_per_centroid, n_features.

    Raises:
        FileNotFoundError: a .npy path that does not exist.
        TypeError: non-float features, a one-shot iterator, non-integer parameters.
        ValueError: features not 2-D, chunks of different dims, NaN / Inf rows (the row is named),
            k > M, n_coarse > k, k < 1, fewer than k distinct points, a checkpoint_dir from a
            build with other parameters or data.
    """
    k = _check_count("k", k, 1)
    n_coarse = min(k, max(1, round(k ** 0.5))) if n_coarse is None else _check_count("n_coarse", n_coarse, 1)
    if n_coarse > k:
        raise ValueError(f"n_coarse={n_coarse} must not exceed k={k}")
    niter = _check_count("niter", niter, 1)
    seed = _check_count("seed", seed, 0)
    max_points_per_centroid = _check_count("max_points_per_centroid", max_points_per_centroid, 1)
    fine_batch_bytes = _check_count("fine_batch_bytes", fine_batch_bytes, 1)

    source = _open_features(features, device, max_points_per_centroid * n_coarse, seed, progress)
    n_rows, dim = source.n_rows, source.dim
    if n_rows == 0 or dim == 0:
        raise ValueError(f"features has shape ({n_rows}, {dim}): need at least k={k} rows and d >= 1")
    if k > n_rows:
        raise ValueError(f"k={k} exceeds the number of feature rows ({n_rows})")
    run = {"format": _CHECKPOINT_FORMAT, "k": k, "n_coarse": n_coarse, "niter": niter, "seed": seed,
           "max_points_per_centroid": max_points_per_centroid, "n_features": n_rows, "dim": dim,
           "fingerprint": source.fingerprint}
    checkpoints = _Checkpoints(checkpoint_dir, run) if checkpoint_dir is not None else None

    with stage("build_codebook/coarse"):
        coarse_centroids = _coarse_stage(source, checkpoints, n_coarse, niter, seed, max_points_per_centroid, progress)
    with stage("build_codebook/assign"):
        coarse_ids, cell_sizes = _assignment_pass(source, checkpoints, coarse_centroids, progress)

    k_cell = allocate_codewords(cell_sizes, k)
    take = torch.minimum(cell_sizes, max_points_per_centroid * k_cell)
    cell_start = torch.cumsum(k_cell, 0) - k_cell
    vectors = torch.empty((k, dim), dtype=torch.float32, device=source.device)
    todo = []
    for cell in k_cell.nonzero().squeeze(1).tolist():
        state = checkpoints.load(f"fine_cell_{cell}") if checkpoints else None
        if state is None:
            todo.append(cell)
        else:
            vectors[int(cell_start[cell]):int(cell_start[cell] + k_cell[cell])] = state["centroids"].to(vectors.device)
    with stage("build_codebook/fine"):
        _fine_stage(source, checkpoints, todo, coarse_ids, k_cell, take, cell_start, vectors, niter, seed,
                    fine_batch_bytes, progress)

    meta = {
        "coarse_ids": torch.repeat_interleave(torch.arange(n_coarse), k_cell),
        "coarse_centroids": coarse_centroids.cpu(),
        "cell_sizes": cell_sizes,
        "n_coarse": n_coarse,
        "k": k,
        "niter": niter,
        "seed": seed,
        "max_points_per_centroid": max_points_per_centroid,
        "n_features": n_rows,
    }
    return Codebook(vectors, meta=meta)


def _coarse_stage(source, checkpoints: Optional[_Checkpoints], n_coarse: int, niter: int, seed: int,
                  max_points_per_centroid: int, progress: bool) -> torch.Tensor:
    """(n_coarse, d) fp32 coarse centroids, trained on the coarse sample or loaded."""
    state = checkpoints.load("coarse") if checkpoints else None
    if state is not None:
        return state["coarse_centroids"].to(source.device)
    sample = source.coarse_sample(min(source.n_rows, max_points_per_centroid * n_coarse), seed)
    with tqdm(total=niter, desc=f"coarse k-means ({n_coarse} on {sample.shape[0]} rows)",
              disable=not progress) as bar:
        def report(iteration: int, mse: float) -> None:
            bar.set_postfix(mse=f"{mse:.5g}", refresh=False)
            bar.update()

        centroids, _ = _lloyd(sample, n_coarse, niter, _derive_seed(seed, _STREAM_COARSE_INIT),
                              "coarse stage", report)
    if checkpoints:
        checkpoints.save("coarse", {"coarse_centroids": centroids.cpu()})
    return centroids


def _assignment_pass(source, checkpoints: Optional[_Checkpoints], coarse_centroids: torch.Tensor,
                     progress: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Coarse cell of every feature row (M,) int32 and the cell sizes (n_coarse,) int64."""
    state = checkpoints.load("assign") if checkpoints else None
    if state is not None:
        return state["coarse_ids"], state["cell_sizes"]
    n_coarse = coarse_centroids.shape[0]
    coarse_ids = torch.empty(source.n_rows, dtype=torch.int32)
    squared_error = 0.0
    with tqdm(total=source.n_rows, desc="assign to coarse cells", unit=" rows", disable=not progress) as bar:
        for start, block in source.blocks():
            ids, dists = _assign(block, coarse_centroids)
            coarse_ids[start:start + block.shape[0]] = ids.to("cpu", torch.int32)
            squared_error += float(dists.double().sum())
            bar.update(block.shape[0])
            bar.set_postfix(mse=f"{squared_error / (start + block.shape[0]):.5g}", refresh=False)
    cell_sizes = torch.bincount(coarse_ids.long(), minlength=n_coarse)
    if checkpoints:
        checkpoints.save("assign", {"coarse_ids": coarse_ids, "cell_sizes": cell_sizes})
    return coarse_ids, cell_sizes


def _fine_stage(source, checkpoints: Optional[_Checkpoints], todo: List[int], coarse_ids: torch.Tensor,
                k_cell: torch.Tensor, take: torch.Tensor, cell_start: torch.Tensor, vectors: torch.Tensor,
                niter: int, seed: int, fine_batch_bytes: int, progress: bool) -> None:
    """Train the cells in ``todo`` and write their centroids into ``vectors`` (and checkpoints)."""
    k = vectors.shape[0]
    done = k - int(k_cell[todo].sum()) if todo else k
    with tqdm(total=k, initial=done, desc="fine k-means", unit=" codewords", disable=not progress) as bar:
        if not todo:
            return
        plan = _plan_fine_samples(coarse_ids, k_cell.shape[0], take, seed)
        batch_rows = max(1, fine_batch_bytes // (4 * source.dim))
        batches: List[List[int]] = [[]]
        filled = 0
        for cell in todo:
            if batches[-1] and filled + int(take[cell]) > batch_rows:
                batches.append([])
                filled = 0
            batches[-1].append(cell)
            filled += int(take[cell])
        for batch in batches:
            samples, spans = _gather_cells(source, batch, plan, progress)
            for cell_in_batch in batch:
                lo, hi = spans[cell_in_batch]
                n_codes = int(k_cell[cell_in_batch])

                def report(iteration: int, mse: float, cell: int = cell_in_batch) -> None:
                    bar.set_postfix(cell=cell, iter=iteration, mse=f"{mse:.5g}", refresh=False)

                centroids, _ = _train_cell(samples[lo:hi], n_codes, niter,
                                           _derive_seed(seed, _STREAM_CELL_INIT, cell_in_batch),
                                           f"coarse cell {cell_in_batch}", report)
                first = int(cell_start[cell_in_batch])
                vectors[first:first + n_codes] = centroids
                if checkpoints:
                    checkpoints.save(f"fine_cell_{cell_in_batch}", {"centroids": centroids.cpu()})
                bar.update(n_codes)
            del samples


# ----------------------------------------------------------------------------------------------
# command line


def cli_main(argv: Optional[Sequence[str]] = None) -> int:
    """``unicode2-fast build-codebook FEATURES.npy --k K --out CODEBOOK.safetensors [...]``.

    Args:
        argv: the arguments after ``build-codebook`` (default: ``sys.argv[1:]``).

    Returns:
        0 on success; 2 after a user mistake (bad argument, missing or invalid features file,
        unwritable output), reported as one line on stderr.
    """
    from .cli import OneLineErrorParser, UserError

    prog = "unicode2-fast build-codebook"
    parser = OneLineErrorParser(
        prog=prog,
        description="Build a codebook by two-stage k-means over a .npy file of (M, d) features "
                    "(memory-mapped: never loaded whole).",
        epilog=f"example: {prog} features.npy --k 500000 --n-coarse 1000 --out codebook.safetensors "
               "--checkpoint-dir ckpt",
    )
    parser.add_argument("features", help=".npy file holding an (M, d) float array")
    parser.add_argument("--k", type=int, required=True, help="number of codewords")
    parser.add_argument("--n-coarse", type=int, default=None, help="coarse cells (default: round(sqrt(k)))")
    parser.add_argument("--out", required=True, help="output codebook (.safetensors)")
    parser.add_argument("--niter", type=int, default=20, help="Lloyd iterations per k-means (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--max-points-per-centroid", type=int, default=256,
                        help="training rows per centroid at most (default 256)")
    parser.add_argument("--checkpoint-dir", default=None, help="save progress here; rerun to resume")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["build-codebook"]:  # accept the whole command line too
        argv = argv[1:]
    try:
        args = parser.parse_args(argv)
        out_dir = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(out_dir):
            raise UserError(f"output directory does not exist: {out_dir}")
        started = time.perf_counter()
        codebook = build_codebook(
            args.features, args.k, args.n_coarse, niter=args.niter, seed=args.seed,
            max_points_per_centroid=args.max_points_per_centroid, progress=not args.no_progress,
            checkpoint_dir=args.checkpoint_dir,
        )
        codebook.save(args.out)
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)
    except (UserError, FileNotFoundError, IsADirectoryError, PermissionError, ValueError, TypeError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {codebook.k} codewords of dim {codebook.dim} in {codebook.meta['n_coarse']} "
          f"coarse cells from {codebook.meta['n_features']} features ({time.perf_counter() - started:.1f} s)")
    return 0
