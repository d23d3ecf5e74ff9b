"""Feature sources and seeded row sampling for ``u2.build_codebook`` (private core).

A source wraps the build's ``features`` argument -- a tensor / array, a memory-mapped .npy file or
a re-iterable of (m, d) chunks -- and serves it in a fixed grid of row blocks of about
``BLOCK_BYTES`` whatever form it arrives in, so results never depend on the chunking. Every
random choice of a build comes from a bijective hash of (seed, stream, row index): the coarse
sample (the rows with the smallest keys), the per-cell fine samples (:func:`plan_fine_samples`,
gathered by :func:`gather_cells`) and the seeds of the initialisations (:func:`derive_seed`).
A source's fingerprint (sha256 of the shape and of every row, streamed over the block grid, so an
array and an iterable of the same rows agree) ties checkpoints to their data.
"""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
import uuid
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
from tqdm import tqdm

from ._checks import check_finite, check_float, check_matrix, to_tensor

#: features are read and assigned in blocks of about this many bytes (fp32)
BLOCK_BYTES = 64 << 20
#: row keys are hashed this many at a time when sampling an array by index
_KEY_CHUNK_ROWS = 1 << 22

# hash streams: independent keys / seeds for each random choice of a build
_STREAM_COARSE_SAMPLE, _STREAM_FINE_SAMPLE, STREAM_COARSE_INIT, STREAM_CELL_INIT, _STREAM_HOLDOUT = 1, 2, 3, 4, 5
_MASK64 = (1 << 64) - 1


# ----------------------------------------------------------------------------------------------
# seeded hashing: sample keys and derived seeds that depend only on (seed, row index)


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def derive_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed for one purpose, mixed from the user's seed and ``parts``."""
    value = _splitmix64(seed & _MASK64)
    for part in parts:
        value = _splitmix64(value ^ (part & _MASK64))
    return value >> 1


def _row_keys(start: int, stop: int, seed: int, stream: int) -> torch.Tensor:
    """(stop - start,) int64 sample keys of rows [start, stop): unique, uniform, order-preserving
    images of the uint64 hash (the splitmix64 finaliser is a bijection, so no two rows tie)."""
    salt = np.uint64(derive_seed(seed, stream))
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


class _Fingerprint:
    """sha256 of the shape and of every row as fp32, fed block by block in row order (about
    1.3 GB/s here: a small fraction of a build's own passes over the data)."""

    def __init__(self):
        self._digest = hashlib.sha256()

    def add(self, block: torch.Tensor) -> None:
        self._digest.update(block.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())

    def hexdigest(self, n_rows: int, dim: int) -> str:
        digest = self._digest.copy()
        digest.update(f"|{n_rows}x{dim}".encode())
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
        self._fingerprint: Optional[str] = None

    @property
    def fingerprint(self) -> str:
        """sha256 of the shape and every row: read on first use (only checkpointed builds need it)."""
        if self._fingerprint is None:
            digest = _Fingerprint()
            for _, block in self.blocks():
                digest.add(block)
            self._fingerprint = digest.hexdigest(self.n_rows, self.dim)
        return self._fingerprint

    def close(self) -> None:
        """Nothing to release (see _SpilledSource)."""

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
        digest = _Fingerprint()
        with tqdm(desc="scan features", unit=" rows", disable=not progress, leave=False) as bar:
            for start, block in self._blocks(validate=True):
                if sampler is None:
                    sampler = _BottomKeys(sample_capacity, self.dim, self.device)
                keys = _row_keys(start, start + block.shape[0], seed, _STREAM_COARSE_SAMPLE)
                sampler.add(keys, torch.arange(start, start + block.shape[0]), block)
                digest.add(block)
                self.n_rows = start + block.shape[0]
                bar.update(block.shape[0])
        if sampler is None:
            raise ValueError("features yielded no rows: need at least k rows in (m, d) chunks")
        self.fingerprint = digest.hexdigest(self.n_rows, self.dim)
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

    def close(self) -> None:
        """Nothing to release (see _SpilledSource)."""


def open_features(features: Any, device: Optional[torch.device], sample_capacity: int, seed: int,
                  progress: bool, spill_dir: Optional[str] = None) -> Union[_ArraySource, _IterableSource]:
    """The source for ``features`` (see ``u2.build_codebook``), with its kind and dtype checked.
    A one-pass iterator is spilled to ``spill_dir`` (a temporary folder when None): call the
    source's ``close()`` when done (every source has one)."""
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
        return spill(features, spill_dir, torch.device(device) if device else None, progress)
    return _IterableSource(features, torch.device(device) if device else None, sample_capacity, seed, progress)


class _SpilledSource(_ArraySource):
    """The rows of a one-pass iterator, written once to a raw fp32 file and memory-mapped; the
    file (and the folder, when it made one) is removed by :meth:`close`."""

    def __init__(self, data: np.memmap, device: torch.device, path: str, folder: Optional[str]):
        super().__init__(data, device, validate_blocks=False)
        self._path, self._folder = path, folder

    def close(self) -> None:
        self.data = None
        _remove_spill(self._path, self._folder)


def _remove_spill(path: str, folder: Optional[str]) -> None:
    """Delete a spill file and the temporary folder made for it (None: a caller's folder, kept)."""
    for remove in (lambda: os.remove(path), lambda: folder and os.rmdir(folder)):
        try:
            remove()
        except OSError:
            pass


def _no_space(folder: str, written: int, needed: int, free: Optional[int] = None) -> OSError:
    where = f"{free:,} bytes free there" if free is not None else "the disk filled up"
    return OSError(
        errno.ENOSPC,
        f"no space in {folder} to spill the features of a one-pass iterator: it needs at least {needed:,} bytes "
        f"(the rows read so far, as fp32) and {where} after {written:,} bytes; free space there, pass "
        f"checkpoint_dir on a larger disk, or pass a list of chunks / a callable that returns a fresh iterator",
    )


def spill(chunks: Iterator[Any], directory: Optional[str], device: Optional[torch.device],
          progress: bool) -> _SpilledSource:
    """Write the (m, d) chunks of a one-pass iterator once to a raw fp32 file in ``directory``
    (a new temporary folder when None) and serve it memory-mapped, so the build can read it as
    often as an array. Every chunk is validated as it arrives; a failure (a bad chunk, a full
    disk, an interruption) removes the partial file before the error propagates."""
    folder = None
    if directory is None:
        folder = directory = tempfile.mkdtemp(prefix="u2-features-")
    else:
        os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f".features-spill-{uuid.uuid4().hex}.f32")
    dim: Optional[int] = None
    n_rows = written = 0
    try:
        with open(path, "wb") as out, tqdm(desc=f"spill features to {directory}", unit=" rows",
                                          disable=not progress, leave=False) as bar:
            for index, chunk in enumerate(chunks):
                name = f"features chunk {index}"
                chunk = to_tensor(chunk, name)
                check_matrix(chunk, name)
                check_float(chunk, name)
                if dim is None:
                    dim = int(chunk.shape[1])
                    device = device or chunk.device
                elif chunk.shape[1] != dim:
                    raise ValueError(f"{name} has dim {chunk.shape[1]} but the chunks before it have dim {dim}")
                first = n_rows
                _check_rows_finite(chunk, lambda bad: f"{first + bad} (row {bad} of chunk {index})")
                data = chunk.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
                free = shutil.disk_usage(directory).free
                if free < len(data):
                    raise _no_space(directory, written, written + len(data), free)
                try:
                    out.write(data)
                except OSError as exc:
                    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                        raise _no_space(directory, written, written + len(data)) from None
                    raise
                written += len(data)
                n_rows += chunk.shape[0]
                bar.update(chunk.shape[0])
            try:
                out.flush()
                os.fsync(out.fileno())
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise _no_space(directory, written, written) from None
                raise
        if dim is None:
            raise ValueError("features yielded no rows: need at least k rows in (m, d) chunks")
        data = np.memmap(path, dtype=np.float32, mode="r", shape=(n_rows, dim)) if n_rows else \
            np.empty((0, dim), np.float32)
    except BaseException:
        _remove_spill(path, folder)
        raise
    return _SpilledSource(data, device, path, folder)


# ----------------------------------------------------------------------------------------------
# held-out rows


def holdout_rows(n_rows: int, size: int, seed: int) -> torch.Tensor:
    """(size,) int64 ascending: the rows with the smallest hold-out keys (kept out of the fine
    training to compare codeword allocations on rows none of them was trained on)."""
    selector = _BottomKeys(size)
    for start in range(0, n_rows, _KEY_CHUNK_ROWS):
        stop = min(n_rows, start + _KEY_CHUNK_ROWS)
        selector.add(_row_keys(start, stop, seed, _STREAM_HOLDOUT), torch.arange(start, stop))
    return selector.result()[0]


def gather_rows(source, rows: torch.Tensor) -> torch.Tensor:
    """(len(rows), d) fp32 on the source's device: the given ascending rows, in one pass."""
    out = torch.empty((rows.shape[0], source.dim), dtype=torch.float32, device=source.device)
    for start, block in source.blocks():
        lo, hi = torch.searchsorted(rows, torch.tensor([start, start + block.shape[0]])).tolist()
        if hi > lo:
            out[lo:hi] = block[(rows[lo:hi] - start).to(block.device)]
    return out


# ----------------------------------------------------------------------------------------------
# fine-stage samples


def plan_fine_samples(coarse_ids: torch.Tensor, n_coarse: int, take: torch.Tensor, seed: int):
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


def gather_cells(source, cells: List[int], plan: Tuple[torch.Tensor, ...],
                 progress: bool) -> Tuple[torch.Tensor, Dict[int, Tuple[int, int]]]:
    """One pass over the features collecting the samples of ``cells`` (``plan``: from
    :func:`plan_fine_samples`).

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
