"""Quantizer layers built on ``u2.nearest``: the UniCode^2 cascade and a drop-in VQ layer.

``CascadedQuantizer``: patch features -> id of the nearest codeword of the frozen codebook C1 ->
row of the trainable table C2 (initialised from C1). The search never builds an N x K distance
matrix and the lookup's gradient is row-sparse (``u2.gathered_embedding``), so K = 500K trains
without a dense K x d gradient.

``VectorQuantizer``: the ``(quantized, indices, loss)`` layer of vector-quantize-pytorch's
``VectorQuantize`` (straight-through estimator, commitment loss, EMA codebook, k-means init,
dead-code replacement), with the search done by ``u2.nearest`` and the EMA statistics
accumulated with ``index_add_``: neither an N x K distance matrix nor an N x K one-hot is ever
allocated, which is what makes large codebooks fail there (vector-quantize-pytorch issue #64).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Dict, List, Optional, Tuple, Union

import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from . import _lloyd
from ._checks import check_finite, check_float, check_matrix, check_no_zero_rows, flatten_queries, to_tensor
from ._io import atomic_write, atomic_write_text, load_json
from .codebook import Codebook
from .embedding import gathered_embedding
from .grouped import nearest_grouped
from .nearest import METRICS, nearest

PathLike = Union[str, "os.PathLike[str]"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_FORMAT = "unicode2_fast.cascaded_quantizer"
_VERSION = 1

# C1 @ P is computed this many codeword rows at a time, so a bf16 C1 is never converted whole.
_PROJECTION_ROWS = 1 << 16


def _codebook_matrix(codebook: Any, name: str = "codebook") -> torch.Tensor:
    """A (K, d) float tensor from a tensor / NumPy / CuPy array or a :class:`Codebook` (validated)."""
    if isinstance(codebook, Codebook):
        return codebook.vectors.detach()
    tensor = to_tensor(codebook, name).detach()
    check_matrix(tensor, name)
    check_float(tensor, name)
    if tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise ValueError(f"empty {name}: shape {tuple(tensor.shape)}, need K >= 1 and d >= 1")
    check_finite(tensor, name)
    return tensor


def _check_features(features: Any, dim: int, device: torch.device, name: str) -> Tuple[torch.Tensor, Tuple[int, ...]]:
    """Validate ``features: (..., dim)``; return them as (N, dim) and the leading shape."""
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (..., {dim}), got {type(features).__name__}")
    check_float(features, name)
    flat, lead = flatten_queries(features, dim, name)
    if flat.device != device:
        raise ValueError(f"{name} is on {flat.device} but the codebook is on {device}; move one of them")
    check_finite(flat, name)
    return flat, lead


def _orthonormal_projection(dim: int, out_dim: int, seed: int) -> torch.Tensor:
    """(dim, out_dim) float64 matrix from the QR of a seeded Gaussian matrix.

    out_dim <= dim: orthonormal columns (C1 @ P are the coordinates of C1 projected onto a random
    out_dim-dimensional subspace). out_dim > dim: orthonormal rows (C1 @ P is an isometric
    embedding: every distance and inner product of C1 is kept).
    """
    generator = torch.Generator().manual_seed(seed)
    if out_dim <= dim:
        q, _ = torch.linalg.qr(torch.randn(dim, out_dim, generator=generator, dtype=torch.float64))
        return q
    q, _ = torch.linalg.qr(torch.randn(out_dim, dim, generator=generator, dtype=torch.float64))
    return q.t().contiguous()


# ---------------------------------------------------------------------------------------------
# CascadedQuantizer
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class CascadedQuantizerConfig:
    """What ``config.json`` holds: enough to rebuild the module's shapes and search."""

    codebook_size: int  # K
    dim: int  # d, the dimension of C1 and of the features
    trainable_dim: int  # dimension of C2 (== dim when there is no projection)
    metric: str = "l2"
    projection_seed: int = 0

    def to_dict(self) -> Dict[str, Any]:
        return {"format": _FORMAT, "version": _VERSION, **dataclasses.asdict(self)}


@dataclasses.dataclass
class CascadedQuantizerOutput:
    """Output of :class:`CascadedQuantizer`.

    Attributes:
        embeddings: (..., trainable_dim) rows of C2 for the ids (gradient only to C2, row-sparse).
        indices: (...) int64 id of the nearest C1 codeword.
        distances: (...) float32 distance to it, in the metric's meaning (see ``u2.nearest``).
        counts: (K,) int64 running usage histogram (the module's buffer, not a copy).
        used_codes: 0-dim int64 tensor, number of codes with a nonzero running count.
        batch_used_codes: 0-dim int64 tensor, number of distinct ids in this batch.
        codebook_size: K.

    ``utilization`` and ``batch_utilization`` are Python floats computed when read; reading them is
    the only device synchronisation the forward pass causes.
    """

    embeddings: torch.Tensor
    indices: torch.Tensor
    distances: torch.Tensor
    counts: torch.Tensor
    used_codes: torch.Tensor
    batch_used_codes: torch.Tensor
    codebook_size: int

    @property
    def utilization(self) -> float:
        """Fraction of the K codes used at least once since the last ``reset_usage()``."""
        return int(self.used_codes) / self.codebook_size

    @property
    def batch_utilization(self) -> float:
        """Fraction of the K codes used by this batch."""
        return int(self.batch_used_codes) / self.codebook_size


class CascadedQuantizer(nn.Module):
    """UniCode^2's cascade: nearest codeword of the frozen C1, embedding from the trainable C2.

    Args:
        codebook: (K, d) tensor / NumPy array or a :class:`u2.Codebook`: C1. Registered as a buffer
            (``self.c1``, never a parameter, never updated; kept in its dtype and device).
        trainable_dim: dimension of C2. None or d: C2 is a copy of C1. Otherwise C2 = C1 @ P with
            P = ``self.projection`` (d, trainable_dim), a fixed buffer from the QR of a Gaussian
            matrix seeded by ``projection_seed``: orthonormal columns when trainable_dim < d (C2
            holds C1's coordinates in a random subspace), orthonormal rows when trainable_dim > d
            (C2 keeps every distance of C1).
        metric: "l2", "ip" or "cos", the search metric on C1 (see ``u2.nearest``).
        index: optional object with ``search(x) -> (ids, dists)`` for (N, d) queries, e.g. a
            ``u2.HierarchicalIndex`` over C1, used instead of the exact ``u2.nearest``. It is not
            saved by :meth:`save_pretrained`; pass it again to :meth:`from_pretrained`.
        projection_seed: seed of P.

    Attributes:
        c1: (K, d) buffer. c2: (K, trainable_dim) ``nn.Parameter``, float32 (float64 if C1 is
        float64). projection: (d, trainable_dim) buffer or None. counts: (K,) int64 buffer, the
        running usage histogram; it is updated only in training mode (``model.train()``), so
        evaluation batches do not change utilisation; :meth:`reset_usage` zeroes it.

    Forward: ``features`` (..., d) float tensor -> :class:`CascadedQuantizerOutput`. The search
    runs without autograd (ids are discrete): no gradient reaches ``features``; ``embeddings``
    carries gradient only to C2, as a row-sparse COO gradient holding the batch's distinct ids,
    so train C2 with ``u2.SparseRowAdamW`` or ``torch.optim.SparseAdam``.

    Raises (construction): TypeError / ValueError for an invalid codebook (not 2-D, not float,
    empty, NaN/Inf), an unknown metric, trainable_dim < 1, or an ``index`` without ``search``.
    """

    def __init__(
        self,
        codebook: Union[Codebook, Any],
        trainable_dim: Optional[int] = None,
        *,
        metric: str = "l2",
        index: Any = None,
        projection_seed: int = 0,
    ) -> None:
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
        c1 = _codebook_matrix(codebook)
        k, d = c1.shape
        if trainable_dim is None:
            trainable_dim = d
        if not isinstance(trainable_dim, int) or isinstance(trainable_dim, bool) or trainable_dim < 1:
            raise ValueError(f"trainable_dim must be a positive int or None, got {trainable_dim!r}")
        c2_dtype = torch.promote_types(c1.dtype, torch.float32)
        if trainable_dim == d:
            projection = None
            c2 = c1.to(c2_dtype, copy=True)
        else:
            projection = _orthonormal_projection(d, trainable_dim, projection_seed).to(c1.device, c2_dtype)
            c2 = torch.empty((k, trainable_dim), dtype=c2_dtype, device=c1.device)
            for start in range(0, k, _PROJECTION_ROWS):
                c2[start:start + _PROJECTION_ROWS] = c1[start:start + _PROJECTION_ROWS].to(c2_dtype) @ projection
        config = CascadedQuantizerConfig(k, d, trainable_dim, metric, projection_seed)
        self._setup(config, c1, c2, projection, torch.zeros(k, dtype=torch.int64, device=c1.device), index)

    def _setup(self, config, c1, c2, projection, counts, index) -> None:
        # shared by __init__ and from_pretrained (which must not recompute C1 @ P)
        super().__init__()
        if index is not None and not callable(getattr(index, "search", None)):
            raise TypeError(f"index must have a search(x) -> (ids, dists) method, got {type(index).__name__}")
        self.config = config
        self.index = index
        self.register_buffer("c1", c1.contiguous())
        self.c2 = nn.Parameter(c2)
        self.register_buffer("projection", projection)
        self.register_buffer("counts", counts)

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def dim(self) -> int:
        return self.config.dim

    @property
    def trainable_dim(self) -> int:
        return self.config.trainable_dim

    @property
    def metric(self) -> str:
        return self.config.metric

    def extra_repr(self) -> str:
        return (
            f"codebook_size={self.codebook_size}, dim={self.dim}, trainable_dim={self.trainable_dim}, "
            f"metric={self.metric!r}, index={type(self.index).__name__ if self.index is not None else None}"
        )

    def reset_usage(self) -> None:
        """Zero the running usage histogram ``counts`` (and so ``utilization``)."""
        self.counts.zero_()

    def forward(self, features: torch.Tensor) -> CascadedQuantizerOutput:
        """Quantize ``features`` (..., d) against C1 and look the ids up in C2.

        Raises:
            TypeError: ``features`` is not a floating torch tensor.
            ValueError: last dimension != d, NaN/Inf values, device differs from C1's.
        """
        flat, lead = _check_features(features, self.dim, self.c1.device, "features")  # (N, d)
        with torch.no_grad():
            flat = flat.detach()
            if self.index is None:
                ids, dists = nearest(flat, self.c1, self.metric)
            else:
                ids, dists = self.index.search(flat)
                ids = torch.as_tensor(ids, device=flat.device).long().reshape(-1)
                dists = torch.as_tensor(dists, device=flat.device).float().reshape(-1)
        embeddings = gathered_embedding(ids, self.c2)  # (N, trainable_dim); checks ids are in [0, K)
        with torch.no_grad():
            batch_counts = torch.zeros_like(self.counts).index_add_(0, ids, torch.ones_like(ids))  # (K,)
            if self.training:
                self.counts += batch_counts
            used = (self.counts > 0).sum()
            batch_used = (batch_counts > 0).sum()
        return CascadedQuantizerOutput(
            embeddings=embeddings.reshape(*lead, self.trainable_dim),
            indices=ids.reshape(lead),
            distances=dists.reshape(lead),
            counts=self.counts,
            used_codes=used,
            batch_used_codes=batch_used,
            codebook_size=self.codebook_size,
        )

    # -- persistence ---------------------------------------------------------------------------

    def save_pretrained(self, save_directory: PathLike) -> None:
        """Write ``config.json`` and ``model.safetensors`` (c1, c2, projection, counts) to a directory.

        The directory is created if needed; each file is written atomically (temporary file, fsync,
        rename), so an interrupted save never leaves a half-written file. ``index`` is not saved.
        """
        save_directory = os.fspath(save_directory)
        os.makedirs(save_directory, exist_ok=True)
        tensors = {"c1": self.c1, "c2": self.c2, "counts": self.counts}
        if self.projection is not None:
            tensors["projection"] = self.projection
        tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        atomic_write(
            os.path.join(save_directory, WEIGHTS_NAME),
            lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata={"format": _FORMAT}),
        )
        text = json.dumps(self.config.to_dict(), indent=2) + "\n"
        atomic_write_text(os.path.join(save_directory, CONFIG_NAME), text)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_directory: PathLike,
        *,
        index: Any = None,
        device: Optional[Union[str, torch.device]] = None,
    ) -> "CascadedQuantizer":
        """Load a quantizer written by :meth:`save_pretrained`.

        Args:
            pretrained_directory: the directory holding ``config.json`` and ``model.safetensors``.
            index: optional search index, as in the constructor.
            device: where to put the tensors (default: CPU).

        Raises:
            FileNotFoundError: the directory or one of the two files is missing.
            NotADirectoryError: the path is a file.
            ValueError: a corrupt or foreign config / weights file, a missing tensor, or a tensor
                whose shape or dtype does not match the config (the message names file and tensor).
        """
        directory = os.fspath(pretrained_directory)
        if not os.path.exists(directory):
            raise FileNotFoundError(f"CascadedQuantizer directory not found: {directory}")
        if not os.path.isdir(directory):
            raise NotADirectoryError(f"expected a directory written by save_pretrained, got a file: {directory}")
        config = _read_config(os.path.join(directory, CONFIG_NAME))
        tensors = _read_weights(os.path.join(directory, WEIGHTS_NAME), config, device)
        module = cls.__new__(cls)
        module._setup(config, tensors["c1"], tensors["c2"], tensors.get("projection"), tensors["counts"], index)
        return module


def _read_config(path: str) -> CascadedQuantizerConfig:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing {CONFIG_NAME}: {path}")
    raw = load_json(path)
    if not isinstance(raw, dict) or raw.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a CascadedQuantizer config (no format={_FORMAT!r})")
    if raw.get("version") != _VERSION:
        raise ValueError(f"{path}: unsupported version {raw.get('version')!r}; this library reads version {_VERSION}")
    fields = {f.name: f for f in dataclasses.fields(CascadedQuantizerConfig)}
    missing = [name for name, f in fields.items() if f.default is dataclasses.MISSING and name not in raw]
    if missing:
        raise ValueError(f"{path}: missing config keys {missing}")
    values = {name: raw[name] for name in fields if name in raw}
    if values["metric"] not in METRICS:
        raise ValueError(f"{path}: unknown metric {values['metric']!r}; expected one of {METRICS}")
    for name in ("codebook_size", "dim", "trainable_dim"):
        if not isinstance(values[name], int) or isinstance(values[name], bool) or values[name] < 1:
            raise ValueError(f"{path}: {name} must be a positive integer, got {values[name]!r}")
    return CascadedQuantizerConfig(**values)


def _read_weights(path: str, config: CascadedQuantizerConfig, device) -> Dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing {WEIGHTS_NAME}: {path}")
    k, d, t = config.codebook_size, config.dim, config.trainable_dim
    expected = {"c1": (k, d), "c2": (k, t), "counts": (k,)}
    if t != d:
        expected["projection"] = (d, t)
    try:
        with safetensors.safe_open(path, framework="pt", device="cpu" if device is None else str(device)) as file:
            names = set(file.keys())
            missing = sorted(set(expected) - names)
            if missing:
                raise ValueError(f"{path}: missing tensors {missing} (found {sorted(names)})")
            for name, shape in expected.items():
                found = tuple(file.get_slice(name).get_shape())
                if found != shape:
                    raise ValueError(
                        f"{path}: tensor {name!r} has shape {found}, but {CONFIG_NAME} says {shape} "
                        f"(K={k}, d={d}, trainable_dim={t})"
                    )
            tensors = {name: file.get_tensor(name) for name in expected}
    except safetensors.SafetensorError as exc:
        raise ValueError(f"{path}: not a valid safetensors file (truncated or corrupt?): {exc}") from exc
    if tensors["counts"].dtype != torch.int64:
        raise ValueError(f"{path}: tensor 'counts' must be int64, got {tensors['counts'].dtype}")
    for name in ("c1", "c2", "projection"):
        if name in tensors:
            try:
                check_float(tensors[name], name)
                check_finite(tensors[name], name)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{path}: invalid tensor {name!r}: {exc}") from exc
    return tensors


# ---------------------------------------------------------------------------------------------
# codebook updates shared by every quantizer layer
# ---------------------------------------------------------------------------------------------
# Every function takes the layer's tensors as G stacked codebooks -- codebook (G, K, d),
# cluster_size (G, K), embed_avg (G, K, d); VectorQuantizer passes its (K, d) tensors as G = 1
# views -- and updates them in place. Only (G, K)-sized temporaries: batch statistics are
# scattered in with index_add_, never through an N x K one-hot.


def _flat_ids(ids: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """(N, G) per-group ids -> (N * G,) rows of the flattened (G * K, ...) tables."""
    return (ids + torch.arange(ids.shape[1], device=ids.device) * codebook_size).reshape(-1)


@torch.no_grad()
def _ema_step(codebook: torch.Tensor, cluster_size: torch.Tensor, embed_avg: torch.Tensor, x: torch.Tensor,
              ids: torch.Tensor, decay: float, eps: float, spherical: bool) -> None:
    """One exponential-moving-average codebook update (VQ-VAE-2 / vector-quantize-pytorch).

    x: (N, G, d) float32 vectors (unit rows when ``spherical``), ids: (N, G). Per group:
    cluster_size <- decay * cluster_size + (1 - decay) * n_k; embed_avg <- decay * embed_avg +
    (1 - decay) * sum of the vectors of code k; codebook = embed_avg / Laplace-smoothed size
    (spherical: embed_avg normalised; a row that underflowed to zero keeps its direction).
    """
    groups, k, d = codebook.shape
    rows = _flat_ids(ids, k)
    sizes, sums, table = cluster_size.view(-1), embed_avg.view(-1, d), codebook.view(-1, d)
    batch_counts = torch.zeros_like(sizes).index_add_(0, rows, torch.ones_like(rows, dtype=sizes.dtype))
    sizes.mul_(decay).add_(batch_counts, alpha=1.0 - decay)
    sums.mul_(decay).index_add_(0, rows, x.reshape(-1, d), alpha=1.0 - decay)
    if spherical:
        # the positive per-row smoothing factor does not change a direction: just normalise
        norms = torch.linalg.vector_norm(sums, dim=1)  # (G * K,)
        alive = norms > 0
        scale = torch.where(alive, 1.0 / norms.clamp_min(torch.finfo(norms.dtype).tiny), 0.0)
        table.mul_((~alive).unsqueeze(1)).addcmul_(sums, scale.unsqueeze(1))
    else:
        torch.div(embed_avg, _smoothed_sizes(cluster_size, eps).unsqueeze(-1), out=codebook)


def _smoothed_sizes(cluster_size: torch.Tensor, eps: float) -> torch.Tensor:
    """(G, K) Laplace-smoothed cluster sizes: (size + eps) / (n + K eps) * n, n = the group's total."""
    total = cluster_size.sum(dim=-1, keepdim=True)
    return (cluster_size + eps) / (total + cluster_size.shape[-1] * eps) * total


@torch.no_grad()
def _replace_dead(codebook: torch.Tensor, cluster_size: torch.Tensor, embed_avg: torch.Tensor, x: torch.Tensor,
                  threshold: float, sample: Any) -> None:
    """Re-seed the codes whose EMA cluster size is below ``threshold`` with vectors of the batch:
    ``sample(rows (n, d), count)`` draws them for each group that has dead codes; their cluster
    size becomes the threshold and embed_avg vector * threshold. x: (N, G, d)."""
    if x.shape[0] == 0:
        return
    dead = cluster_size < threshold  # (G, K)
    for group in dead.any(dim=1).nonzero().squeeze(1).tolist():
        codes = dead[group].nonzero().squeeze(1)
        samples = sample(x[:, group], codes.numel())
        codebook[group, codes] = samples
        embed_avg[group, codes] = samples * threshold
        cluster_size[group, codes] = threshold


def _alignment_rows(index: Any, codebook_size: int, n_targets: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(codebook rows, target rows) of an alignment ``index``: None (row k to target row k),
    a (K,) table of target rows with -1 for rows left alone, or a pair of (m,) row tensors."""
    if index is None:
        if n_targets != codebook_size:
            raise ValueError(f"without an index the target table needs K = {codebook_size} rows, got {n_targets}")
        rows = torch.arange(codebook_size, device=device)
        return rows, rows
    if isinstance(index, (tuple, list)):
        if len(index) != 2:
            raise ValueError("index as a pair must be (codebook_rows, target_rows)")
        rows, targets = (torch.as_tensor(i, device=device) for i in index)
        if rows.shape != targets.shape or rows.dim() != 1:
            raise ValueError(f"codebook_rows and target_rows must be 1-D of one length, got {tuple(rows.shape)} and {tuple(targets.shape)}")
    else:
        table = torch.as_tensor(index, device=device)
        if table.shape != (codebook_size,):
            raise ValueError(f"an index table must have shape (K,) = ({codebook_size},), got {tuple(table.shape)}")
        rows = (table >= 0).nonzero().squeeze(1)
        targets = table[rows]
        if bool((table < -1).any()):
            raise ValueError("an index table holds target rows >= 0, or -1 for codewords left alone")
    for name, values, bound in (("codebook row", rows, codebook_size), ("target row", targets, n_targets)):
        if values.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise TypeError(f"{name}s must be integers, got {values.dtype}")
        if values.numel() and not (0 <= int(values.min()) and int(values.max()) < bound):
            raise ValueError(f"a {name} is outside [0, {bound}): min {int(values.min())}, max {int(values.max())}")
    rows, targets = rows.long(), targets.long()
    if rows.unique().numel() != rows.numel():
        raise ValueError("a codebook row appears twice in the index: its alignment target would be ambiguous")
    return rows, targets


@torch.no_grad()
def _align(codebook: torch.Tensor, target: Any, index: Any, decay: float, spherical: bool,
           cluster_size: Optional[torch.Tensor] = None, embed_avg: Optional[torch.Tensor] = None,
           eps: float = 1e-5) -> torch.Tensor:
    """UniCode's language alignment, in place: C[rows] <- decay * C[rows] + (1 - decay) * T[targets].

    codebook: (K, d); target: (V, d) tensor or an ``nn.Embedding`` (its weight, never modified).
    Only the indexed rows are read and written. ``spherical``: the new rows are normalised. With
    EMA statistics (cluster_size (K,), embed_avg (K, d)), embed_avg of those rows is set to the new
    codeword times its smoothed cluster size, so the next EMA step moves on from the aligned
    codeword instead of restoring the old one. Returns the codebook rows that changed.
    """
    if isinstance(target, nn.Embedding):
        target = target.weight
    target = to_tensor(target, "target_embeddings").detach()
    check_matrix(target, "target_embeddings")
    check_float(target, "target_embeddings")
    if target.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"target_embeddings have dimension {target.shape[1]} but the codebook has {codebook.shape[1]}; "
            "project one into the other's space first"
        )
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be a number in [0, 1], got {decay!r}")
    rows, targets = _alignment_rows(index, codebook.shape[0], target.shape[0], codebook.device)
    if rows.numel() == 0:
        return rows
    picked = target.index_select(0, targets.to(target.device)).to(codebook.device, codebook.dtype)
    check_finite(picked, "target_embeddings")
    new = codebook.index_select(0, rows).mul_(decay).add_(picked, alpha=1.0 - decay)
    if spherical:
        check_no_zero_rows(new, "aligned codewords")
        new = F.normalize(new, dim=1)
    codebook.index_copy_(0, rows, new)
    if embed_avg is not None:
        weight = cluster_size.index_select(0, rows) if spherical else \
            _smoothed_sizes(cluster_size.unsqueeze(0), eps)[0].index_select(0, rows)
        embed_avg.index_copy_(0, rows, new * weight.unsqueeze(1))
    return rows


# ---------------------------------------------------------------------------------------------
# VectorQuantizer and MultiCodebookQuantizer: one layer, G = 1 or G sub-codebooks
# ---------------------------------------------------------------------------------------------

_VQ_OPTIONS_DOC = """
        metric: "l2", or "cos": vectors (each chunk, with sub-codebooks) and codes are
            l2-normalised; search, loss and EMA work on unit vectors; ``quantized`` is the unit code.
        commitment_weight: beta in ``loss = beta * mse(x, sg(q))``.
        freeze_codebook: keep the codebook fixed (a buffer), VQGAN-LC style.
        ema_decay: if given (0 < decay < 1), the codebook is a buffer updated in training mode by
            exponential moving averages of the per-code cluster size and embedding sum, with
            Laplace smoothing (VQ-VAE-2 / vector-quantize-pytorch):
                cluster_size <- decay * cluster_size + (1 - decay) * n_k
                embed_avg    <- decay * embed_avg    + (1 - decay) * sum_{i: id_i = k} x_i
                n = sum(cluster_size); smoothed_k = (cluster_size_k + eps) / (n + K * eps) * n
                codebook_k   <- embed_avg_k / smoothed_k        ("cos": normalised instead)
            starting from cluster_size = 1 and embed_avg = the initial codebook (per sub-codebook).
            Without ema_decay and not frozen, the codebook is an ``nn.Parameter`` learned by
            gradient through the codebook loss ``mse(q, sg(x))``, added to the loss.
        eps: Laplace smoothing constant (> 0).
        kmeans_init: on the first batch seen in training mode, set each codebook to the result of
            ``kmeans_iters`` Lloyd iterations over that batch (assignment by ``u2.nearest``,
            initial centroids sampled from the batch, with replacement when it has fewer than K
            vectors). A persistent ``initted`` buffer records that it happened.
        kmeans_iters: Lloyd iterations of ``kmeans_init``.
        threshold_ema_dead_code: with EMA, after each update, codes whose EMA cluster size is below
            this are re-seeded with random vectors of the batch (seeded generator); their
            cluster size is reset to the threshold and embed_avg to vector * threshold.
        channel_last: False means x is (B, dim, N) (as in ``VectorQuantize``).
        accept_image_fmap: x is an image feature map (B, dim, H, W); indices come back (B, H, W, ...).
        seed: seed of the random draws (initial codebook, k-means sampling, dead-code re-seeding);
            draw i uses a generator seeded from (seed, i). The draw counter is not saved.
"""


def _to_channel_last(x: torch.Tensor, channel_last: bool, accept_image_fmap: bool) -> torch.Tensor:
    """x in the layers' (..., dim) layout, from (B, dim, H, W) or (B, dim, ...) when asked."""
    if accept_image_fmap:
        if x.dim() != 4:
            raise ValueError(f"accept_image_fmap=True expects x of shape (B, dim, H, W), got {tuple(x.shape)}")
        return x.permute(0, 2, 3, 1)
    if not channel_last:
        if x.dim() < 2:
            raise ValueError(f"channel_last=False expects x of shape (B, dim, ...), got {tuple(x.shape)}")
        return x.movedim(1, -1)
    return x


def _from_channel_last(x: torch.Tensor, channel_last: bool, accept_image_fmap: bool) -> torch.Tensor:
    """The inverse of :func:`_to_channel_last`."""
    if accept_image_fmap:
        return x.permute(0, 3, 1, 2)
    if not channel_last:
        return x.movedim(-1, 1)
    return x


class _SeededDraws:
    """Random draws from generators seeded by (seed, draw number): reproducible from the seed."""

    seed: int
    _draws: int

    def _next_generator(self, device: torch.device) -> torch.Generator:
        generator = torch.Generator(device=device)
        generator.manual_seed(self.seed * 1_000_003 + self._draws)
        self._draws += 1
        return generator

    def _sample_rows(self, x: torch.Tensor, count: int) -> torch.Tensor:
        """``count`` rows of ``x`` (N, d), distinct when N >= count, else drawn with replacement."""
        generator = self._next_generator(x.device)
        n = x.shape[0]
        if n >= count:
            pick = torch.randperm(n, generator=generator, device=x.device)[:count]
        else:
            pick = torch.randint(n, (count,), generator=generator, device=x.device)
        return x[pick]

    def _initial_codebook(self, shape: Tuple[int, ...], codebook: Any, metric: str) -> torch.Tensor:
        """float32 codebook of ``shape``: a copy of ``codebook`` (validated), or seeded uniform
        U(-sqrt(6/d), sqrt(6/d)) (one draw); unit rows for "cos"."""
        if codebook is None:
            bound = math.sqrt(6.0 / shape[-1])
            init = torch.rand(shape, generator=self._next_generator(torch.device("cpu"))) * (2 * bound) - bound
        else:
            init = to_tensor(codebook.vectors if isinstance(codebook, Codebook) else codebook, "codebook")
            init = init.detach().to(torch.float32, copy=True)
            if tuple(init.shape) != shape:
                raise ValueError(f"codebook has shape {tuple(init.shape)}, expected {shape}")
            check_finite(init, "codebook")
        if metric == "cos":
            check_no_zero_rows(init.reshape(-1, shape[-1]), "codebook")
            init = F.normalize(init, dim=-1)
        return init


class _CodebookQuantizer(_SeededDraws, nn.Module):
    """The layer behind VectorQuantizer (G = 1) and MultiCodebookQuantizer (G sub-codebooks):
    options, codebook state, k-means init, EMA and dead codes, usage, the straight-through forward.

    Subclasses keep their tensors in their own shapes and give ``_grouped`` (the (G, K, ...) view
    the shared updates work on), ``_search`` and ``_lookup``.
    """

    def __init__(self, dim: int, num_codebooks: int, codebook_size: int, codebook: Any, *, metric: str,
                 commitment_weight: float, freeze_codebook: bool, ema_decay: Optional[float], eps: float,
                 kmeans_init: bool, kmeans_iters: int, threshold_ema_dead_code: float, channel_last: bool,
                 accept_image_fmap: bool, seed: int, shape: Tuple[int, ...]) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("codebook_size", codebook_size), ("kmeans_iters", kmeans_iters),
                            ("num_codebooks", num_codebooks)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if dim % num_codebooks:
            raise ValueError(f"dim = {dim} is not divisible by num_codebooks = {num_codebooks}")
        if metric not in ("l2", "cos"):
            raise ValueError(f"unknown metric {metric!r}; {type(self).__name__} supports 'l2' and 'cos'")
        if not (math.isfinite(commitment_weight) and commitment_weight >= 0):
            raise ValueError(f"commitment_weight must be finite and >= 0, got {commitment_weight!r}")
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or None, got {ema_decay!r}")
        if ema_decay is not None and freeze_codebook:
            raise ValueError("freeze_codebook=True and ema_decay are exclusive: a frozen codebook has no EMA updates")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        if threshold_ema_dead_code < 0:
            raise ValueError(f"threshold_ema_dead_code must be >= 0, got {threshold_ema_dead_code!r}")
        if threshold_ema_dead_code > 0 and ema_decay is None:
            raise ValueError("threshold_ema_dead_code needs ema_decay: dead codes are found from EMA cluster sizes")
        if codebook is not None and kmeans_init:
            raise ValueError("pass either codebook= or kmeans_init=True, not both")

        self.dim = dim
        self.num_codebooks = num_codebooks
        self.codebook_dim = dim // num_codebooks
        self.codebook_size = codebook_size
        self.metric = metric
        self.commitment_weight = float(commitment_weight)
        self.freeze_codebook = freeze_codebook
        self.ema_decay = ema_decay
        self.eps = eps
        self.kmeans_init = kmeans_init
        self.kmeans_iters = kmeans_iters
        self.threshold_ema_dead_code = threshold_ema_dead_code
        self.channel_last = channel_last
        self.accept_image_fmap = accept_image_fmap
        self.seed = seed
        self._draws = 0  # random draws so far: each one gets its own generator seeded from (seed, draws)

        init = self._initial_codebook(shape, codebook, metric)
        if self.learnable_codebook:
            self.codebook = nn.Parameter(init)
        else:
            self.register_buffer("codebook", init)
        if ema_decay is not None:
            self.register_buffer("cluster_size", torch.ones(shape[:-1], dtype=torch.float32, device=init.device))
            self.register_buffer("embed_avg", init.clone())
        if kmeans_init:
            self.register_buffer("initted", torch.tensor(False, device=init.device))
        self.register_buffer("counts", torch.zeros(shape[:-1], dtype=torch.int64, device=init.device))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # state dicts saved before the usage histogram existed load with zero counts
        state_dict.setdefault(prefix + "counts", torch.zeros_like(self.counts))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # -- what a subclass provides ---------------------------------------------------------------

    def _grouped(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` -- the codebook, cluster_size, embed_avg or counts -- as the (G, K[, d]) view the
        shared updates work on (VectorQuantizer's (K, d) tensors become G = 1 views)."""
        if t.dim() == self.counts.dim():
            return t.view(self.num_codebooks, self.codebook_size)
        return t.view(self.num_codebooks, self.codebook_size, t.shape[-1])

    def _search(self, chunks: torch.Tensor) -> torch.Tensor:
        """(N, G) int64 ids of (N, G, d) chunks (no gradient)."""
        raise NotImplementedError

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """(N, G, d) codes of (N, G) ids, with the codebook's gradient when it is learned."""
        raise NotImplementedError

    # -- shared behaviour -----------------------------------------------------------------------

    @property
    def learnable_codebook(self) -> bool:
        """True when the codebook is an ``nn.Parameter`` trained by gradient (not frozen, no EMA)."""
        return not self.freeze_codebook and self.ema_decay is None

    def extra_repr(self) -> str:
        mode = "frozen" if self.freeze_codebook else ("ema" if self.ema_decay is not None else "learned")
        groups = f"num_codebooks={self.num_codebooks}, " if self.num_codebooks > 1 else ""
        return (
            f"dim={self.dim}, {groups}codebook_size={self.codebook_size}, metric={self.metric!r}, codebook={mode}, "
            f"commitment_weight={self.commitment_weight}"
        )

    def reset_usage(self) -> None:
        """Zero the running usage histogram ``counts`` (and so ``utilization``)."""
        self.counts.zero_()

    def _used_fraction(self) -> torch.Tensor:
        """(G,) float64 fraction of each sub-codebook's codes used since the last reset_usage()."""
        return (self._grouped(self.counts) > 0).double().mean(dim=1)

    def _quantize(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Tuple[int, ...]]:
        """(quantized in x's layout, ids (N, G), loss, leading shape of the vectors)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        check_float(x, "x")
        x_last = _to_channel_last(x, self.channel_last, self.accept_image_fmap)  # (..., dim)
        flat, lead = _check_features(x_last, self.dim, self.codebook.device, "x")  # (N, dim)
        chunks = flat.reshape(flat.shape[0], self.num_codebooks, self.codebook_dim)  # (N, G, d)
        if self.metric == "cos":
            check_no_zero_rows(chunks.detach().reshape(-1, self.codebook_dim), "x" if self.num_codebooks == 1 else "x chunks")
            chunks = F.normalize(chunks, dim=-1)

        if self.training and self.kmeans_init and not bool(self.initted):
            self._kmeans_init(chunks.detach().float())
        with torch.no_grad():
            ids = self._search(chunks.detach())  # (N, G)
        codes = self._lookup(ids)  # (N, G, d) float32
        if self.metric == "cos":
            codes = F.normalize(codes, dim=-1)

        x32 = chunks.float()
        if chunks.shape[0] == 0:
            loss = x32.sum() + codes.sum()  # mse of nothing is NaN; keep the graph, value 0
        else:
            loss = self.commitment_weight * F.mse_loss(x32, codes.detach())
            if self.learnable_codebook:
                loss = loss + F.mse_loss(codes, x32.detach())

        if self.training:
            with torch.no_grad():
                self._grouped(self.counts).view(-1).index_add_(0, _flat_ids(ids, self.codebook_size),
                                                               torch.ones_like(ids).reshape(-1))
                if self.ema_decay is not None:
                    grouped = (self._grouped(self.codebook), self._grouped(self.cluster_size), self._grouped(self.embed_avg))
                    _ema_step(*grouped, x32.detach(), ids, self.ema_decay, self.eps, self.metric == "cos")
                    if self.threshold_ema_dead_code > 0:
                        _replace_dead(*grouped, x32.detach(), self.threshold_ema_dead_code, self._sample_rows)

        # straight-through estimator x + sg(q - x), written so the value is exactly q
        quantized = codes.detach().to(chunks.dtype) + (chunks - chunks.detach())
        quantized = _from_channel_last(quantized.reshape(x_last.shape), self.channel_last, self.accept_image_fmap)
        return quantized, ids, loss, lead

    @torch.no_grad()
    def _kmeans_init(self, x: torch.Tensor) -> None:
        # x: (N, G, d) float32 (unit rows with "cos"). Per sub-codebook, the shared Lloyd loop with
        # u2.nearest in this layer's metric. keep_previous, not the default refill: a batch may hold
        # fewer distinct vectors than codes, and a code no vector chose keeps its sampled value.
        if x.shape[0] == 0:
            return
        codebook = self._grouped(self.codebook)
        for group in range(self.num_codebooks):
            rows = x[:, group].contiguous()
            result = _lloyd.lloyd(rows, self._sample_rows(rows, self.codebook_size), self.kmeans_iters,
                                  assign=functools.partial(nearest, metric=self.metric),
                                  repair=_lloyd.keep_previous, spherical=self.metric == "cos")
            codebook[group].copy_(result.centroids)
            if self.ema_decay is not None:
                # a code no batch vector chose gets weight 1, like a freshly initialised code
                sizes = self._grouped(self.cluster_size)[group]
                sizes.copy_(result.counts.clamp_min(1))
                self._grouped(self.embed_avg)[group].copy_(result.centroids * sizes.unsqueeze(1))
        self.initted.fill_(True)


class VectorQuantizer(_CodebookQuantizer):
    """Drop-in for vector-quantize-pytorch's ``VectorQuantize``: ``quantized, indices, loss = vq(x)``.

    Args:
        dim: feature dimension d.
        codebook_size: number of codes K.
        codebook: optional (K, d) initial codebook (tensor / array / :class:`u2.Codebook`, copied
            to float32). Default: seeded Kaiming-uniform init, U(-sqrt(6/d), sqrt(6/d)).
{options}
        sparse_grad: look the learned codebook up with ``u2.gathered_embedding`` so its gradient
            is row-sparse (use ``u2.SparseRowAdamW``); default is a dense gradient as in
            ``VectorQuantize``, which any optimizer accepts.

    Forward: x (..., d) -> (quantized, indices, loss): quantized has x's shape and dtype and its
    value is the chosen code (cast to x's dtype), with the straight-through gradient of
    ``x + sg(q - x)`` (d quantized / d x is the identity; with "cos", w.r.t. the normalised x).
    indices: int64, x's leading shape. loss: 0-dim float32 tensor (``VectorQuantize`` returns shape
    (1,)), computed in eval mode too. Codebook updates (EMA, k-means init, dead codes) and the
    usage histogram ``counts`` (K,) (``utilization``: fraction of codes used) change only in
    training mode. :meth:`align_` is UniCode's language alignment of the codebook.

    Raises:
        ValueError / TypeError: invalid options (EMA with a frozen codebook, a dead-code threshold
        without EMA, ``codebook`` together with ``kmeans_init``, bad shapes) or invalid inputs
        (wrong last dimension, NaN/Inf, zero vectors with "cos").
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        codebook: Any = None,
        metric: str = "l2",
        commitment_weight: float = 0.25,
        freeze_codebook: bool = False,
        ema_decay: Optional[float] = None,
        eps: float = 1e-5,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        threshold_ema_dead_code: float = 0.0,
        sparse_grad: bool = False,
        channel_last: bool = True,
        accept_image_fmap: bool = False,
        seed: int = 0,
    ) -> None:
        if isinstance(dim, int) and isinstance(codebook_size, int):
            shape = (codebook_size, dim)
        else:
            shape = (1, 1)  # the base class rejects the bad sizes
        super().__init__(dim, 1, codebook_size, codebook, metric=metric, commitment_weight=commitment_weight,
                         freeze_codebook=freeze_codebook, ema_decay=ema_decay, eps=eps, kmeans_init=kmeans_init,
                         kmeans_iters=kmeans_iters, threshold_ema_dead_code=threshold_ema_dead_code,
                         channel_last=channel_last, accept_image_fmap=accept_image_fmap, seed=seed, shape=shape)
        self.sparse_grad = sparse_grad

    @property
    def utilization(self) -> float:
        """Fraction of the K codes used in training batches since the last ``reset_usage()``."""
        return float(self._used_fraction()[0])

    def _search(self, chunks: torch.Tensor) -> torch.Tensor:
        return nearest(chunks[:, 0], self.codebook, self.metric)[0].unsqueeze(1)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if self.learnable_codebook and self.sparse_grad:
            return gathered_embedding(ids[:, 0], self.codebook).unsqueeze(1)
        return F.embedding(ids[:, 0], self.codebook).unsqueeze(1)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantize ``x``; see the class docstring for shapes and semantics."""
        quantized, ids, loss, lead = self._quantize(x)
        return quantized, ids.reshape(lead), loss

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """(..., d) codes of int64 ``indices`` (...) (unit vectors with "cos")."""
        codes = F.embedding(_check_indices(indices, self.codebook_size), self.codebook)
        return F.normalize(codes, dim=-1) if self.metric == "cos" else codes

    def align_(self, target_embeddings: Any, index: Any = None, decay: float = 0.99) -> torch.Tensor:
        """UniCode's language alignment: C[k] <- decay * C[k] + (1 - decay) * T[index[k]].

        Args:
            target_embeddings: (V, d) frozen table, e.g. the LLM's token embeddings (a tensor or
                an ``nn.Embedding``; never modified).
            index: None (T has K rows, row k aligns to row k), a (K,) int tensor of target rows
                with -1 for codes left alone, or a pair (codebook_rows (m,), target_rows (m,)):
                only those rows are read and written (row-sparse).
            decay: lambda in [0, 1].

        With EMA the statistics follow (embed_avg = new codeword x smoothed cluster size), so the
        next EMA step continues from the aligned codeword. With "cos" the new rows are normalised.
        Returns the (m,) codebook rows that changed. Raises ValueError / TypeError on a dimension
        mismatch, a row out of range or repeated, a decay outside [0, 1] or non-finite targets.
        """
        ema = self.ema_decay is not None
        # detach(), not .data: it shares the version counter, so the search's per-codebook caches
        # (filters, norms, FAISS index) see the change and are rebuilt
        return _align(self.codebook.detach(), target_embeddings, index, decay, self.metric == "cos",
                      self.cluster_size if ema else None, self.embed_avg if ema else None, self.eps)


class MultiCodebookQuantizer(_CodebookQuantizer):
    """UniTok's multi-codebook quantization: ``quantized, indices, loss = mcq(x)``.

    Each vector is split into ``num_codebooks`` = G chunks of dim / G; chunk g is quantized
    against its own sub-codebook g (all G searched in one ``u2.nearest_grouped`` call) and the
    codes are concatenated: a vocabulary of K^G combinations from G x K stored codes. The layer of
    vector-quantize-pytorch's ``VectorQuantize(heads=G, separate_codebook_per_head=True)``.

    Args:
        dim: feature dimension (a multiple of num_codebooks).
        num_codebooks: G (UniTok: 8).
        codebook_size: K per sub-codebook (UniTok: 4096).
        codebook: optional (G, K, dim / G) initial sub-codebooks. Default: seeded uniform init,
            U(-sqrt(6 G / dim), sqrt(6 G / dim)).
{options}

    Forward: x (..., dim) -> (quantized, indices, loss): quantized has x's shape and dtype (the
    concatenated codes, straight-through gradient), indices (..., G) int64 (indices[..., g]
    indexes sub-codebook g), loss a 0-dim float32 tensor (mean over all chunks). ``utilization``
    is a (G,) tensor: the fraction of each sub-codebook's codes used in training batches since
    the last ``reset_usage()`` (``counts``: (G, K)). Attributes: codebook (G, K, dim / G);
    with EMA, cluster_size (G, K) and embed_avg (G, K, dim / G).

    Raises:
        ValueError / TypeError: as VectorQuantizer, and dim not divisible by num_codebooks.
    """

    def __init__(
        self,
        dim: int,
        num_codebooks: int = 8,
        codebook_size: int = 4096,
        *,
        codebook: Any = None,
        metric: str = "l2",
        commitment_weight: float = 0.25,
        freeze_codebook: bool = False,
        ema_decay: Optional[float] = None,
        eps: float = 1e-5,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        threshold_ema_dead_code: float = 0.0,
        channel_last: bool = True,
        accept_image_fmap: bool = False,
        seed: int = 0,
    ) -> None:
        valid = all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (dim, num_codebooks, codebook_size))
        shape = (num_codebooks, codebook_size, dim // num_codebooks) if valid and dim % num_codebooks == 0 else (1, 1, 1)
        super().__init__(dim, num_codebooks, codebook_size, codebook, metric=metric, commitment_weight=commitment_weight,
                         freeze_codebook=freeze_codebook, ema_decay=ema_decay, eps=eps, kmeans_init=kmeans_init,
                         kmeans_iters=kmeans_iters, threshold_ema_dead_code=threshold_ema_dead_code,
                         channel_last=channel_last, accept_image_fmap=accept_image_fmap, seed=seed, shape=shape)

    @property
    def utilization(self) -> torch.Tensor:
        """(G,) float64: fraction of each sub-codebook's codes used since the last ``reset_usage()``."""
        return self._used_fraction()

    def _search(self, chunks: torch.Tensor) -> torch.Tensor:
        return nearest_grouped(chunks, self.codebook, self.metric)[0]

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        groups = torch.arange(self.num_codebooks, device=ids.device)
        return self.codebook[groups, ids]  # (N, G, d): a dense codebook gradient when learned

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantize ``x``; see the class docstring for shapes and semantics."""
        quantized, ids, loss, lead = self._quantize(x)
        return quantized, ids.reshape(*lead, self.num_codebooks), loss

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """(..., dim) concatenated codes of int64 ``indices`` (..., G)."""
        if indices.dim() < 1 or indices.shape[-1] != self.num_codebooks:
            raise ValueError(f"indices must have shape (..., {self.num_codebooks}), got {tuple(indices.shape)}")
        ids = _check_indices(indices, self.codebook_size).reshape(-1, self.num_codebooks)
        codes = self._lookup(ids)
        if self.metric == "cos":
            codes = F.normalize(codes, dim=-1)
        return codes.reshape(*indices.shape[:-1], self.dim)


VectorQuantizer.__doc__ = VectorQuantizer.__doc__.replace("{options}\n", _VQ_OPTIONS_DOC.lstrip("\n"))
MultiCodebookQuantizer.__doc__ = MultiCodebookQuantizer.__doc__.replace("{options}\n", _VQ_OPTIONS_DOC.lstrip("\n"))


def _check_indices(indices: Any, codebook_size: int) -> torch.Tensor:
    if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"indices must be an int64 / int32 tensor, got {getattr(indices, 'dtype', type(indices).__name__)}")
    if indices.numel() and not (0 <= int(indices.min()) and int(indices.max()) < codebook_size):
        raise ValueError(f"indices must lie in [0, {codebook_size}), got min {int(indices.min())}, max {int(indices.max())}")
    return indices.long()


# ---------------------------------------------------------------------------------------------
# ResidualQuantizer
# ---------------------------------------------------------------------------------------------


class ResidualQuantizer(nn.Module):
    """Residual (stacked) quantization, UniCode v1 / SoundStream / vector-quantize-pytorch's ``ResidualVQ``:
    depth i quantizes what depths 0 .. i-1 left, ``quantized, indices, losses = rq(x)``.

    Args:
        dim: feature dimension d.
        depth: number of quantizers (code maps per vector).
        codebook_size: K per depth; each depth is a :class:`VectorQuantizer` searched with
            ``u2.nearest``, so K = 500K per depth needs no N x K memory.
        shared_codebook: one codebook (one VectorQuantizer) used at every depth.
        codebooks: optional (depth, K, d) initial codebooks ((1, K, d) or (K, d) when shared).
        metric, commitment_weight, freeze_codebook, ema_decay, eps, kmeans_init, kmeans_iters,
        threshold_ema_dead_code, sparse_grad: as :class:`VectorQuantizer`, for every depth
        (metric "l2" only: a residual is not a unit vector). Depth i draws from seed + i.
        channel_last, accept_image_fmap: the layout of x, as VectorQuantizer.

    Forward: x (..., d) -> (quantized, indices, losses): quantized is the sum of the depths' codes
    (x's dtype) with the straight-through gradient of ``x + sg(sum q - x)``; indices (..., depth)
    int64; losses (depth,) float32, each depth's commitment (+ codebook) loss on its residual --
    sum them for the training loss, as with ``ResidualVQ``. :meth:`decode` sums the codes of
    given indices.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        codebook_size: int,
        *,
        shared_codebook: bool = False,
        codebooks: Any = None,
        metric: str = "l2",
        commitment_weight: float = 0.25,
        freeze_codebook: bool = False,
        ema_decay: Optional[float] = None,
        eps: float = 1e-5,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        threshold_ema_dead_code: float = 0.0,
        sparse_grad: bool = False,
        channel_last: bool = True,
        accept_image_fmap: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
            raise ValueError(f"depth must be a positive int, got {depth!r}")
        if metric != "l2":
            raise ValueError(f"ResidualQuantizer supports metric 'l2' only (a residual is not a unit vector), got {metric!r}")
        stored = 1 if shared_codebook else depth
        init: List[Any] = [None] * stored
        if codebooks is not None:
            table = to_tensor(codebooks.vectors if isinstance(codebooks, Codebook) else codebooks, "codebooks").detach()
            if shared_codebook and table.dim() == 2:
                table = table.unsqueeze(0)
            if table.dim() != 3 or table.shape[0] != stored:
                raise ValueError(f"codebooks must have shape ({stored}, K, d), got {tuple(table.shape)}")
            init = list(table.unbind(0))
        self.dim = dim
        self.depth = depth
        self.codebook_size = codebook_size
        self.shared_codebook = shared_codebook
        self.channel_last = channel_last
        self.accept_image_fmap = accept_image_fmap
        self.layers = nn.ModuleList(
            VectorQuantizer(dim, codebook_size, codebook=init[i], metric=metric, commitment_weight=commitment_weight,
                            freeze_codebook=freeze_codebook, ema_decay=ema_decay, eps=eps, kmeans_init=kmeans_init,
                            kmeans_iters=kmeans_iters, threshold_ema_dead_code=threshold_ema_dead_code,
                            sparse_grad=sparse_grad, seed=seed + i)
            for i in range(stored)
        )

    def extra_repr(self) -> str:
        return f"dim={self.dim}, depth={self.depth}, codebook_size={self.codebook_size}, shared_codebook={self.shared_codebook}"

    def _layer(self, depth: int) -> VectorQuantizer:
        return self.layers[0 if self.shared_codebook else depth]

    @property
    def codebooks(self) -> torch.Tensor:
        """(depth, K, d) codebooks (a stacked copy; with shared_codebook the one codebook repeated)."""
        return torch.stack([self._layer(i).codebook.detach() for i in range(self.depth)])

    @property
    def utilization(self) -> torch.Tensor:
        """(depth,) float64: fraction of each depth's codes used in training batches since the last
        ``reset_usage()`` ((1,) with shared_codebook: the one codebook, counted at every depth)."""
        return torch.tensor([layer.utilization for layer in self.layers], dtype=torch.float64)

    def reset_usage(self) -> None:
        """Zero every depth's usage histogram."""
        for layer in self.layers:
            layer.reset_usage()

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantize ``x`` depth by depth; see the class docstring for shapes and semantics."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        check_float(x, "x")
        layout = _to_channel_last(x, self.channel_last, self.accept_image_fmap)  # (..., d)
        flat, lead = _check_features(layout, self.dim, self.layers[0].codebook.device, "x")  # (N, d)
        residual = flat
        total = torch.zeros_like(flat, dtype=torch.float32)
        all_ids, losses = [], []
        for i in range(self.depth):
            quantized, ids, loss = self._layer(i)(residual)
            total = total + quantized.detach().float()
            residual = residual - quantized.detach()
            all_ids.append(ids)
            losses.append(loss)
        out = total.to(flat.dtype) + (flat - flat.detach())  # value: the sum of codes; gradient: identity
        out = _from_channel_last(out.reshape(layout.shape), self.channel_last, self.accept_image_fmap)
        return out, torch.stack(all_ids, dim=-1).reshape(*lead, self.depth), torch.stack(losses)

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """(..., d) sum of the codes of int64 ``indices`` (..., depth)."""
        if indices.dim() < 1 or indices.shape[-1] != self.depth:
            raise ValueError(f"indices must have shape (..., {self.depth}), got {tuple(indices.shape)}")
        return sum(self._layer(i).decode(indices[..., i]) for i in range(self.depth))


# ---------------------------------------------------------------------------------------------
# EMACodebook
# ---------------------------------------------------------------------------------------------


class EMACodebook(_SeededDraws, nn.Module):
    """A (K, d) codebook kept by exponential moving averages, with UniCode's language alignment.

    The state a VQ-VAE-style EMA codebook needs, on its own: ``weight`` (K, d), ``cluster_size``
    (K,) and ``embed_avg`` (K, d), all buffers (no gradient). :meth:`search` finds the nearest
    codes (``u2.nearest``), :meth:`update_` makes one EMA step from a batch, :meth:`align_` pulls
    rows toward a frozen LLM embedding table (C' = lambda C + (1 - lambda) C_L, UniCode v1), and
    :meth:`replace_dead_codes_` re-seeds rarely used codes.

    Args:
        codebook_size: K. dim: d.
        codebook: optional (K, d) initial codebook (copied to float32); default seeded uniform
            U(-sqrt(6/d), sqrt(6/d)).
        decay: EMA decay of :meth:`update_`, in (0, 1).
        eps: Laplace smoothing constant (> 0).
        metric: "l2" or "cos" (unit codewords; updates and alignment renormalise).
        seed: seed of the initial codebook and of dead-code re-seeding.
    """

    def __init__(self, codebook_size: int, dim: int, *, codebook: Any = None, decay: float = 0.99, eps: float = 1e-5,
                 metric: str = "l2", seed: int = 0) -> None:
        super().__init__()
        for name, value in (("codebook_size", codebook_size), ("dim", dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        if metric not in ("l2", "cos"):
            raise ValueError(f"unknown metric {metric!r}; EMACodebook supports 'l2' and 'cos'")
        self.codebook_size, self.dim, self.decay, self.eps, self.metric = codebook_size, dim, float(decay), eps, metric
        self.seed, self._draws = seed, 0
        weight = self._initial_codebook((codebook_size, dim), codebook, metric)
        self.register_buffer("weight", weight)
        self.register_buffer("cluster_size", torch.ones(codebook_size, dtype=torch.float32, device=weight.device))
        self.register_buffer("embed_avg", weight.clone())

    def extra_repr(self) -> str:
        return f"codebook_size={self.codebook_size}, dim={self.dim}, decay={self.decay}, metric={self.metric!r}"

    def _prepared(self, x: Any) -> torch.Tensor:
        flat, _ = _check_features(x, self.dim, self.weight.device, "x")
        flat = flat.detach().float()
        if self.metric == "cos":
            check_no_zero_rows(flat, "x")
            flat = F.normalize(flat, dim=1)
        return flat

    @torch.no_grad()
    def search(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(ids, codes) of the nearest codewords of ``x`` (..., d): ids (...) int64, codes (..., d)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        ids, _ = nearest(x.detach(), self.weight, self.metric)
        return ids, F.embedding(ids, self.weight)

    @torch.no_grad()
    def update_(self, x: torch.Tensor, ids: Optional[torch.Tensor] = None) -> None:
        """One EMA step from the vectors ``x`` (..., d) assigned to ``ids`` (...) (searched when None)."""
        flat = self._prepared(x)
        if ids is None:
            ids, _ = nearest(flat, self.weight, self.metric)
        ids = _check_indices(ids, self.codebook_size).reshape(-1)
        if ids.shape[0] != flat.shape[0]:
            raise ValueError(f"{ids.shape[0]} ids for {flat.shape[0]} vectors")
        _ema_step(self.weight.unsqueeze(0), self.cluster_size.unsqueeze(0), self.embed_avg.unsqueeze(0),
                  flat.unsqueeze(1), ids.unsqueeze(1), self.decay, self.eps, self.metric == "cos")

    @torch.no_grad()
    def replace_dead_codes_(self, x: torch.Tensor, threshold: float) -> int:
        """Re-seed the codes whose cluster size is below ``threshold`` with random vectors of ``x``
        (..., d); returns how many were replaced."""
        flat = self._prepared(x)
        dead = int((self.cluster_size < threshold).sum())

        _replace_dead(self.weight.unsqueeze(0), self.cluster_size.unsqueeze(0), self.embed_avg.unsqueeze(0),
                      flat.unsqueeze(1), threshold, self._sample_rows)
        return dead if flat.shape[0] else 0

    def align_(self, target_embeddings: Any, index: Any = None, decay: float = 0.99) -> torch.Tensor:
        """UniCode's language alignment C[k] <- decay * C[k] + (1 - decay) * T[index[k]]; the
        arguments and return are those of :meth:`VectorQuantizer.align_`."""
        return _align(self.weight, target_embeddings, index, decay, self.metric == "cos",
                      self.cluster_size, self.embed_avg, self.eps)
