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
from typing import Any, Dict, Optional, Tuple, Union

import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from . import _lloyd
from ._checks import check_finite, check_float, check_matrix, check_no_zero_rows, flatten_queries, to_tensor
from ._io import atomic_write, atomic_write_text
from .codebook import Codebook
from .embedding import gathered_embedding
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
    try:
        with open(path, encoding="utf-8") as file:
            raw = json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from exc
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
# VectorQuantizer
# ---------------------------------------------------------------------------------------------


class VectorQuantizer(nn.Module):
    """Drop-in for vector-quantize-pytorch's ``VectorQuantize``: ``quantized, indices, loss = vq(x)``.

    Args:
        dim: feature dimension d.
        codebook_size: number of codes K.
        codebook: optional (K, d) initial codebook (tensor / array / :class:`u2.Codebook`, copied
            to float32). Default: seeded Kaiming-uniform init, U(-sqrt(6/d), sqrt(6/d)).
        metric: "l2", or "cos": x and the codes are l2-normalised, the search, the loss and the EMA
            work on unit vectors, and ``quantized`` is the unit code vector.
        commitment_weight: beta in ``loss = beta * mse(x, sg(q))``.
        freeze_codebook: keep the codebook fixed (a buffer), VQGAN-LC style.
        ema_decay: if given (0 < decay < 1), the codebook is a buffer updated in training mode by
            exponential moving averages of the per-code cluster size and embedding sum, with
            Laplace smoothing (VQ-VAE-2 / vector-quantize-pytorch):
                cluster_size <- decay * cluster_size + (1 - decay) * n_k
                embed_avg    <- decay * embed_avg    + (1 - decay) * sum_{i: id_i = k} x_i
                n = sum(cluster_size); smoothed_k = (cluster_size_k + eps) / (n + K * eps) * n
                codebook_k   <- embed_avg_k / smoothed_k        ("cos": normalised instead)
            starting from cluster_size = 1 and embed_avg = the initial codebook.
            Without ema_decay and not frozen, the codebook is an ``nn.Parameter`` learned by
            gradient through the codebook loss ``mse(q, sg(x))``, added to the loss.
        eps: Laplace smoothing constant (> 0).
        kmeans_init: on the first batch seen in training mode, set the codebook to the result of
            ``kmeans_iters`` Lloyd iterations over that batch (assignment by ``u2.nearest``,
            initial centroids sampled from the batch, with replacement when it has fewer than K
            vectors). A persistent ``initted`` buffer records that it happened.
        kmeans_iters: Lloyd iterations of ``kmeans_init``.
        threshold_ema_dead_code: with EMA, after each update, codes whose EMA cluster size is below
            this are re-seeded with random vectors of the batch (seeded generator); their
            cluster size is reset to the threshold and embed_avg to vector * threshold.
        sparse_grad: look the learned codebook up with ``u2.gathered_embedding`` so its gradient
            is row-sparse (use ``u2.SparseRowAdamW``); default is a dense gradient as in
            ``VectorQuantize``, which any optimizer accepts.
        channel_last: False means x is (B, d, N) (as in ``VectorQuantize``).
        accept_image_fmap: x is an image feature map (B, d, H, W); indices come back (B, H, W).
        seed: seed of the random draws (initial codebook, k-means sampling, dead-code re-seeding);
            draw i uses a generator seeded from (seed, i). The draw counter is not saved.

    Forward: x (..., d) -> (quantized, indices, loss): quantized has x's shape and dtype and its
    value is the chosen code (cast to x's dtype), with the straight-through gradient of
    ``x + sg(q - x)`` (d quantized / d x is the identity; with "cos", w.r.t. the normalised x).
    indices: int64, x's leading shape. loss: 0-dim float32 tensor (``VectorQuantize`` returns shape
    (1,)), computed in eval mode too. Codebook updates (EMA, k-means init, dead codes) happen only
    in training mode.

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
        super().__init__()
        for name, value in (("dim", dim), ("codebook_size", codebook_size), ("kmeans_iters", kmeans_iters)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if metric not in ("l2", "cos"):
            raise ValueError(f"unknown metric {metric!r}; VectorQuantizer supports 'l2' and 'cos'")
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
        self.codebook_size = codebook_size
        self.metric = metric
        self.commitment_weight = float(commitment_weight)
        self.freeze_codebook = freeze_codebook
        self.ema_decay = ema_decay
        self.eps = eps
        self.kmeans_init = kmeans_init
        self.kmeans_iters = kmeans_iters
        self.threshold_ema_dead_code = threshold_ema_dead_code
        self.sparse_grad = sparse_grad
        self.channel_last = channel_last
        self.accept_image_fmap = accept_image_fmap
        self.seed = seed
        self._draws = 0  # random draws so far: each one gets its own generator seeded from (seed, draws)

        if codebook is None:
            bound = math.sqrt(6.0 / dim)
            generator = self._next_generator(torch.device("cpu"))
            init = torch.rand(codebook_size, dim, generator=generator) * (2 * bound) - bound
        else:
            init = _codebook_matrix(codebook).detach().to(torch.float32, copy=True)
            if tuple(init.shape) != (codebook_size, dim):
                raise ValueError(
                    f"codebook has shape {tuple(init.shape)}, expected (codebook_size, dim) = {(codebook_size, dim)}"
                )
        if metric == "cos":
            check_no_zero_rows(init, "codebook")
            init = F.normalize(init, dim=1)

        if self.learnable_codebook:
            self.codebook = nn.Parameter(init)
        else:
            self.register_buffer("codebook", init)
        if ema_decay is not None:
            self.register_buffer("cluster_size", torch.ones(codebook_size, dtype=torch.float32, device=init.device))
            self.register_buffer("embed_avg", init.clone())
        if kmeans_init:
            self.register_buffer("initted", torch.tensor(False, device=init.device))

    @property
    def learnable_codebook(self) -> bool:
        """True when the codebook is an ``nn.Parameter`` trained by gradient (not frozen, no EMA)."""
        return not self.freeze_codebook and self.ema_decay is None

    def extra_repr(self) -> str:
        mode = "frozen" if self.freeze_codebook else ("ema" if self.ema_decay is not None else "learned")
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, metric={self.metric!r}, codebook={mode}, "
            f"commitment_weight={self.commitment_weight}"
        )

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

    def _to_channel_last(self, x: torch.Tensor) -> torch.Tensor:
        if self.accept_image_fmap:
            if x.dim() != 4:
                raise ValueError(f"accept_image_fmap=True expects x of shape (B, dim, H, W), got {tuple(x.shape)}")
            return x.permute(0, 2, 3, 1)
        if not self.channel_last:
            if x.dim() < 2:
                raise ValueError(f"channel_last=False expects x of shape (B, dim, ...), got {tuple(x.shape)}")
            return x.movedim(1, -1)
        return x

    def _from_channel_last(self, x: torch.Tensor) -> torch.Tensor:
        if self.accept_image_fmap:
            return x.permute(0, 3, 1, 2)
        if not self.channel_last:
            return x.movedim(-1, 1)
        return x

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantize ``x``; see the class docstring for shapes and semantics."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        check_float(x, "x")
        x_last = self._to_channel_last(x)  # (..., d)
        flat, lead = _check_features(x_last, self.dim, self.codebook.device, "x")  # (N, d)
        if self.metric == "cos":
            check_no_zero_rows(flat.detach(), "x")
            flat = F.normalize(flat, dim=1)

        if self.training and self.kmeans_init and not bool(self.initted):
            self._kmeans_init(flat.detach().float())
        with torch.no_grad():
            ids, _ = nearest(flat.detach(), self.codebook, self.metric)  # (N,)
        if self.learnable_codebook and self.sparse_grad:
            codes = gathered_embedding(ids, self.codebook)
        else:
            codes = F.embedding(ids, self.codebook)  # (N, d) float32
        if self.metric == "cos":
            codes = F.normalize(codes, dim=1)

        x32 = flat.float()
        if flat.shape[0] == 0:
            loss = x32.sum() + codes.sum()  # mse of nothing is NaN; keep the graph, value 0
        else:
            loss = self.commitment_weight * F.mse_loss(x32, codes.detach())
            if self.learnable_codebook:
                loss = loss + F.mse_loss(codes, x32.detach())

        if self.training and self.ema_decay is not None:
            with torch.no_grad():
                self._ema_update(x32.detach(), ids)
                if self.threshold_ema_dead_code > 0:
                    self._replace_dead_codes(x32.detach())

        # straight-through estimator x + sg(q - x), written so the value is exactly q
        quantized = codes.detach().to(flat.dtype) + (flat - flat.detach())
        quantized = self._from_channel_last(quantized.reshape(x_last.shape))
        return quantized, ids.reshape(lead), loss

    @torch.no_grad()
    def _ema_update(self, x: torch.Tensor, ids: torch.Tensor) -> None:
        # x: (N, d) float32 (unit rows with "cos"); ids: (N,). Only (K,) temporaries: the
        # K x d statistics are updated in place, the batch sums scattered in with index_add_.
        decay = self.ema_decay
        batch_counts = torch.zeros_like(self.cluster_size).index_add_(0, ids, torch.ones_like(ids, dtype=torch.float32))
        self.cluster_size.mul_(decay).add_(batch_counts, alpha=1.0 - decay)
        self.embed_avg.mul_(decay).index_add_(0, ids, x, alpha=1.0 - decay)
        if self.metric == "cos":
            # the positive per-row smoothing factor does not change a direction: just normalise.
            # A row of embed_avg that underflowed to zero (a code unused for very long) keeps its
            # previous direction instead of becoming a zero vector, which cosine cannot search.
            norms = torch.linalg.vector_norm(self.embed_avg, dim=1)  # (K,)
            alive = norms > 0
            scale = torch.where(alive, 1.0 / norms.clamp_min(torch.finfo(norms.dtype).tiny), 0.0)
            self.codebook.mul_((~alive).unsqueeze(1)).addcmul_(self.embed_avg, scale.unsqueeze(1))
        else:
            total = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.eps) / (total + self.codebook_size * self.eps) * total
            torch.div(self.embed_avg, smoothed.unsqueeze(1), out=self.codebook)

    @torch.no_grad()
    def _replace_dead_codes(self, x: torch.Tensor) -> None:
        # x: (N, d) float32 batch vectors (unit rows with "cos")
        dead = (self.cluster_size < self.threshold_ema_dead_code).nonzero().squeeze(1)  # (n_dead,)
        if dead.numel() == 0 or x.shape[0] == 0:
            return
        samples = self._sample_rows(x, dead.numel())
        self.codebook[dead] = samples
        self.embed_avg[dead] = samples * self.threshold_ema_dead_code
        self.cluster_size[dead] = self.threshold_ema_dead_code

    @torch.no_grad()
    def _kmeans_init(self, x: torch.Tensor) -> None:
        # x: (N, d) float32 (unit rows with "cos"). The shared Lloyd loop with u2.nearest in this
        # layer's metric. keep_previous, not the default refill: a batch may hold fewer distinct
        # vectors than codes, and a code no vector chose keeps its sampled value.
        if x.shape[0] == 0:
            return
        result = _lloyd.lloyd(x, self._sample_rows(x, self.codebook_size), self.kmeans_iters,
                              assign=functools.partial(nearest, metric=self.metric),
                              repair=_lloyd.keep_previous, spherical=self.metric == "cos")
        self.codebook.copy_(result.centroids)
        if self.ema_decay is not None:
            # a code no batch vector chose gets weight 1, like a freshly initialised code
            self.cluster_size.copy_(result.counts.clamp_min(1))
            self.embed_avg.copy_(result.centroids * self.cluster_size.unsqueeze(1))
        self.initted.fill_(True)

