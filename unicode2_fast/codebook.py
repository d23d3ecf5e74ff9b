"""A frozen visual codebook: the (K, d) codeword matrix C1 plus the metadata that describes it.

The codebook is stored as a safetensors file: the codewords under the key ``vectors``, every tensor
in ``meta`` under ``meta.<key>``, and the rest of ``meta`` (numbers, strings, lists, dicts) as JSON in
the header's text metadata next to a format tag, so a foreign safetensors file is told apart from
ours. Saving is atomic: a crash or error mid-write never leaves a half-written file at the target.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Union

import safetensors
import safetensors.torch
import torch

from ._cache import per_tensor
from ._checks import array_kind, check_finite, check_float, check_matrix, to_tensor
from ._io import atomic_write

FORMAT = "unicode2_fast.codebook"
VERSION = "1"
_VECTORS_KEY = "vectors"
_META_PREFIX = "meta."

# sq_norms() converts this many elements at a time to float64, so the float64 copy of a 500K x 1152
# codebook (4.6 GB) is never materialised.
_NORM_CHUNK_ELEMENTS = 1 << 24

PathLike = Union[str, "os.PathLike[str]"]


def codebook_matrix(codebook: Any, name: str = "codebook") -> torch.Tensor:
    """The validated (K, d) codeword matrix of a :class:`Codebook` or of a tensor / NumPy / CuPy array.

    The one conversion every op uses. An array is checked to be 2-D, floating point, non-empty
    (K >= 1, d >= 1) and finite; the finiteness scan (576M elements at K = 500K) and, for a
    non-contiguous array, the contiguous copy are cached per tensor version, so repeated calls
    with the same codebook cost nothing. A Codebook was validated when it was made.

    Returns:
        a contiguous (K, d) tensor (the caller's own tensor when it is contiguous).

    Raises:
        TypeError: not an array, or not floating point. ValueError: not 2-D, empty, NaN / Inf.
    """
    if isinstance(codebook, Codebook):
        return codebook.vectors
    tensor = to_tensor(codebook, name)
    check_matrix(tensor, name)
    check_float(tensor, name)
    if tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise ValueError(f"empty codebook: {name} has shape {tuple(tensor.shape)}, need K >= 1 codewords and d >= 1")
    if not tensor.is_contiguous():
        # cached on the caller's tensor, so statistics keyed by tensor identity are built once
        tensor = per_tensor(tensor, ("contiguous",), lambda c: c.contiguous())
    per_tensor(tensor, ("finite",), lambda c: check_finite(c, name))
    return tensor


def _is_array(value: Any) -> bool:
    try:
        array_kind(value)
    except TypeError:
        return False
    return True


def _normalize_meta(meta: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Return a copy of ``meta`` with NumPy / CuPy arrays turned into tensors.

    Raises:
        TypeError: ``meta`` is not a dict, a key is not a string, or a value is neither an array
            nor JSON-serialisable (the message names the key).
    """
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    normalized = {}
    for key, value in meta.items():
        if not isinstance(key, str):
            raise TypeError(f"meta keys must be strings, got {key!r} ({type(key).__name__})")
        if _is_array(value):
            normalized[key] = to_tensor(value, f"meta[{key!r}]")
            continue
        try:
            json.dumps(value)
        except (TypeError, ValueError) as exc:  # ValueError: circular reference
            raise TypeError(
                f"meta[{key!r}] is neither a tensor nor JSON-serialisable "
                f"(got {type(value).__name__}): {exc}"
            ) from exc
        normalized[key] = value
    return normalized


def _tensors_for_file(vectors: torch.Tensor, meta: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The tensors to write: detached, on CPU, contiguous, none sharing memory with another.

    safetensors refuses tensors that share storage (e.g. a meta tensor that is a view of the
    vectors), so the second and later users of a storage get their own copy.
    """
    named = {_VECTORS_KEY: vectors}
    named.update({_META_PREFIX + key: value for key, value in meta.items() if isinstance(value, torch.Tensor)})
    tensors = {}
    seen_storages = set()
    for name, tensor in named.items():
        tensor = tensor.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen_storages:
            tensor = tensor.clone()
        seen_storages.add(storage)
        tensors[name] = tensor
    return tensors


class Codebook:
    """A (K, d) matrix of codewords with metadata, saved to and loaded from safetensors.

    The vectors are kept as given (dtype and device unchanged, made contiguous without copying
    when they already are) and are treated as immutable: derived values such as
    :meth:`sq_norms` are cached. After changing ``vectors`` in place, call :meth:`clear_cache`.

    Args:
        vectors: (K, d) torch tensor, NumPy array or CuPy array of float32 / float16 / bfloat16 /
            float64, K >= 1, d >= 1, all values finite.
        meta: optional dict with string keys. Values are tensors / arrays (e.g.
            ``meta["coarse_ids"]``: (K,) int64, ``meta["coarse_centroids"]``: (n_coarse, d)) or
            JSON-serialisable values (tuples come back from :meth:`load` as lists). The dict is
            copied, with arrays converted to tensors.

    Raises:
        TypeError: ``vectors`` is not an array or not floating point; ``meta`` holds a value that
            is neither a tensor nor JSON-serialisable.
        ValueError: ``vectors`` is not 2-D, is empty, or holds NaN / Inf.
    """

    def __init__(self, vectors: Any, meta: Optional[Dict[str, Any]] = None) -> None:
        self._vectors = codebook_matrix(vectors, "vectors")  # (K, d)
        self._meta = _normalize_meta(meta)
        self._sq_norms_cache: Dict[torch.dtype, torch.Tensor] = {}

    @property
    def vectors(self) -> torch.Tensor:
        """The (K, d) codeword matrix."""
        return self._vectors

    @property
    def meta(self) -> Dict[str, Any]:
        """The metadata dict (tensors and JSON-serialisable values)."""
        return self._meta

    @property
    def k(self) -> int:
        """Number of codewords K."""
        return self._vectors.shape[0]

    @property
    def dim(self) -> int:
        """Codeword dimension d."""
        return self._vectors.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self._vectors.dtype

    @property
    def device(self) -> torch.device:
        return self._vectors.device

    def __len__(self) -> int:
        return self.k

    def __repr__(self) -> str:
        return (
            f"Codebook(k={self.k}, dim={self.dim}, dtype={self.dtype}, device={self.device}, "
            f"meta_keys={list(self._meta)})"
        )

    def to(self, device: Optional[Union[str, torch.device]] = None, dtype: Optional[torch.dtype] = None) -> "Codebook":
        """Return a new Codebook with the vectors moved / cast; ``meta`` is kept as is.

        Raises:
            TypeError: ``dtype`` is not a floating dtype.
            ValueError: the cast overflows to Inf (e.g. values beyond float16's range).
        """
        return Codebook(self._vectors.to(device=device, dtype=dtype), meta=self._meta)

    def sq_norms(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Squared L2 norm of every codeword, ||c_k||^2, on the codebook's device.

        Summed in float64 (in bounded chunks) and then cast, so the norms carry no accumulation
        error of the storage dtype. Cached per dtype: the same tensor is returned on every call
        until :meth:`clear_cache`.

        Returns:
            (K,) tensor of ``dtype``.
        """
        cached = self._sq_norms_cache.get(dtype)
        if cached is not None:
            return cached
        vectors = self._vectors.detach()
        norms = torch.empty(self.k, dtype=torch.float64, device=self.device)  # (K,)
        rows_per_chunk = max(1, _NORM_CHUNK_ELEMENTS // self.dim)
        for start in range(0, self.k, rows_per_chunk):
            chunk = vectors[start : start + rows_per_chunk].to(torch.float64)  # (rows, d)
            norms[start : start + rows_per_chunk] = (chunk * chunk).sum(dim=1)
        result = norms.to(dtype)
        self._sq_norms_cache[dtype] = result
        return result

    def clear_cache(self) -> None:
        """Drop cached derived values; needed only after mutating ``vectors`` in place."""
        self._sq_norms_cache.clear()

    def save(self, path: PathLike) -> None:
        """Write the codebook to ``path`` as safetensors, atomically.

        The file is written to a temporary file in the same directory, flushed to disk, then
        renamed over ``path``; on any error the temporary file is removed and an existing file at
        ``path`` is left untouched.

        Raises:
            TypeError: a ``meta`` value is neither a tensor nor JSON-serialisable.
            OSError: the directory is missing or not writable.
        """
        path = os.fspath(path)
        meta = _normalize_meta(self._meta)
        tensors = _tensors_for_file(self._vectors, meta)
        plain_meta = {key: value for key, value in meta.items() if not isinstance(value, torch.Tensor)}
        header = {"format": FORMAT, "version": VERSION, "meta_json": json.dumps(plain_meta)}

        atomic_write(path, lambda tmp_path: safetensors.torch.save_file(tensors, tmp_path, metadata=header))

    @classmethod
    def load(cls, path: PathLike, device: Optional[Union[str, torch.device]] = None) -> "Codebook":
        """Read a codebook written by :meth:`save`.

        Args:
            path: the safetensors file.
            device: where to put the vectors and the meta tensors (default: CPU).

        Returns:
            The Codebook, with vectors in the dtype they were saved in and ``meta`` as saved.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            IsADirectoryError: ``path`` is a directory.
            ValueError: the file is not valid safetensors (empty, truncated, corrupt), is a
                safetensors file that is not a unicode2_fast codebook, has an unsupported version,
                or holds invalid vectors (not 2-D, not floating point, empty, NaN / Inf). The
                message names the file.
        """
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"codebook file not found: {path}")
        if os.path.isdir(path):
            raise IsADirectoryError(f"codebook path is a directory, expected a .safetensors file: {path}")
        try:
            with safetensors.safe_open(path, framework="pt", device="cpu" if device is None else str(device)) as file:
                header = file.metadata() or {}
                names = list(file.keys())
                # Checked before any tensor is read, so a large foreign file costs only its header.
                if header.get("format") != FORMAT or _VECTORS_KEY not in names:
                    raise ValueError(
                        f"{path} is not a unicode2_fast codebook: a safetensors file, but without "
                        f"format={FORMAT!r} metadata and a {_VECTORS_KEY!r} tensor"
                    )
                if header.get("version") != VERSION:
                    raise ValueError(
                        f"{path}: unsupported codebook version {header.get('version')!r}; "
                        f"this library reads version {VERSION}"
                    )
                vectors = file.get_tensor(_VECTORS_KEY)
                tensor_meta = {
                    name[len(_META_PREFIX) :]: file.get_tensor(name) for name in names if name.startswith(_META_PREFIX)
                }
        except safetensors.SafetensorError as exc:
            raise ValueError(f"{path}: not a valid safetensors file (truncated or corrupt?): {exc}") from exc

        try:
            plain_meta = json.loads(header.get("meta_json", "{}"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: corrupt codebook metadata (meta_json is not valid JSON): {exc}") from exc
        if not isinstance(plain_meta, dict):
            raise ValueError(f"{path}: corrupt codebook metadata (meta_json is not a JSON object)")

        try:
            return cls(vectors, meta={**tensor_meta, **plain_meta})
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: invalid stored codebook: {exc}") from exc

