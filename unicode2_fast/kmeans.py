"""``u2.build_codebook``: the paper's two-stage k-means over a stream of features (the
``build-codebook`` command lives in ``unicode2_fast.cli.build_codebook``).

The build, for ``k`` codewords in ``n_coarse`` coarse cells over M features of dimension d:

1. Coarse sample: the ``max_points_per_centroid * n_coarse`` rows with the smallest hash keys
   (a bijective hash of (seed, row index), so the sample is a seeded uniform sample that does not
   depend on how the rows arrive: a tensor, a memory-mapped .npy file and any chunking of an
   iterable give the same rows). Arrays are sampled by row index; an iterable is read once for it.
   Feature sources and seeded sampling live in ``_features``.
2. Coarse stage: Lloyd k-means with ``n_coarse`` centroids on that sample (``_lloyd.kmeans``).
3. Assignment pass: every feature goes to its nearest coarse centroid (``u2.nearest``); the coarse
   cell of each row (int32, 4 bytes per row) and the exact cell sizes are kept.
4. Allocation: ``k`` codewords are split over the cells in proportion to their sizes (largest
   remainder, total exactly ``k``, at least one per non-empty cell, at most one per point):
   :func:`allocate_codewords`.
5. Fine stage: per cell, a k-means with its share of codewords on at most
   ``max_points_per_centroid * k_cell`` of its rows (the smallest keys of a second hash). The
   samples of as many cells as fit in ``fine_batch_bytes`` are gathered in one pass over the
   features, so memory stays bounded however large M is.

Lloyd iterations (the coarse stage, and the fine cells on CUDA) run the package's one Lloyd loop
through ``_lloyd.kmeans``: seeded initialisation with k distinct points, assignment by
``u2.nearest`` (the fused Triton kernel on CUDA, FAISS for small k on the CPU), float64 updates,
and a centroid that ends an update empty, NaN / Inf (or, after the last update, duplicated)
refilled by splitting the largest cluster at its farthest member. On the CPU the fine cells run
``faiss.Kmeans`` instead, measured 4x faster per cell (see :func:`_train_cell`), after the same
check for k distinct points and followed by the same compaction.

Memory, apart from the features' own storage: the coarse sample (max_points_per_centroid x
n_coarse x d fp32: 1.2 GB at n_coarse = 1000, d = 1152), 4 bytes per feature row for the coarse
ids (+ about 50 bytes per row while the fine samples are planned, 24 per sampled row after), the
fine-sample batch (``fine_batch_bytes``) and the (k, d) result. The features themselves are read
in blocks of ``_features.BLOCK_BYTES``; an in-memory tensor is never copied whole.

Reproducibility: every random choice is derived from ``seed``, and features are processed in a
fixed grid of row blocks whatever form they arrive in, so the same inputs give bitwise-identical
codebooks on the same machine and thread count. (On CUDA, ``index_add_``'s atomic float64 adds
may differ in their last bits from run to run, which the float32 result almost always absorbs;
``torch.use_deterministic_algorithms(True)`` makes it exact.) With ``checkpoint_dir`` the build
saves its state after the coarse stage, after the assignment pass and after every coarse cell's
fine training (``_checkpoints``), and a rerun resumes where it stopped with the same result as an
uninterrupted build.
"""
from __future__ import annotations

import os
import heapq
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from . import _lloyd
from ._checkpoints import Checkpoints
from ._features import (STREAM_CELL_INIT, STREAM_COARSE_INIT, derive_seed, gather_cells, gather_rows, holdout_rows,
                        open_features, plan_fine_samples)
from .nearest import nearest
from .codebook import Codebook
from .profiling import stage

#: default bytes of fine-stage training samples held at once; the features are read once per batch
FINE_BATCH_BYTES = 2 << 30
#: allocation "distortion": a cell's codewords in proportion to size * (mean squared error)^POWER
DISTORTION_POWER = 0.8
#: allocation "auto": rows held out of the fine training to choose between the two allocations
#: (a 1/HOLDOUT_FRACTION share of the rows, at most HOLDOUT_ROWS)
HOLDOUT_FRACTION = 20
HOLDOUT_ROWS = 16384
#: allocation "auto" picks "distortion" only where its pilot held-out MSE is this much lower
AUTO_MARGIN = 0.01
#: the pilot trains each cell on max_points_per_centroid / PILOT_POINTS_DIVISOR rows per centroid
#: (at least PILOT_MIN_POINTS) for niter / PILOT_NITER_DIVISOR iterations
PILOT_POINTS_DIVISOR = 16
PILOT_MIN_POINTS = 16
PILOT_NITER_DIVISOR = 2
ALLOCATIONS = ("auto", "size", "distortion")


# ----------------------------------------------------------------------------------------------
# the fine k-means of one cell


def _train_cell(x: torch.Tensor, k: int, niter: int, seed: int, label: str,
                report: Optional[Callable[[int, float], None]] = None) -> Tuple[torch.Tensor, float]:
    """The fine k-means of one coarse cell: ``_lloyd.faiss_kmeans`` on the CPU below
    ``_lloyd.FAISS_ASSIGN_MAX_K`` centroids, else ``_lloyd.kmeans`` (on CUDA: Triton assignments).
    Arguments, result and errors as for ``_lloyd.kmeans``."""
    # x: (n, d) fp32
    # On the CPU a fine cell is clustered by faiss.Kmeans rather than by _lloyd.kmeans (below
    # FAISS_ASSIGN_MAX_K centroids; results stay deterministic for a seed on a given machine and
    # thread count). Measured on the 2-core CI machine, one cell of SigLIP-like rows (25,600 x 1152,
    # k = 100, 20 iterations): 0.49 s for faiss.Kmeans, 2.0 s for _lloyd.kmeans with FAISS
    # assignments. Its search ran 2x faster inside FAISS's loop than called per iteration from
    # Python with torch's OpenMP work in between (see _lloyd.SMALL_ASSIGN_MACS), and its fp32 C++
    # update beats our fp64 one. Quality is on par: held-out MSE over 3 seeds on the test set was
    # 1.040x single-stage faiss.Kmeans with FAISS cells and 1.002x with _lloyd.kmeans cells; single
    # cells land in better or worse local minima either way. The coarse stage (~1% of the paper
    # build's multiply-adds) keeps _lloyd.kmeans.
    if x.device.type == "cpu" and k < _lloyd.FAISS_ASSIGN_MAX_K:
        return _lloyd.faiss_kmeans(x, k, niter, seed, label, report)
    return _lloyd.kmeans(x, k, niter, seed, label, report)


# ----------------------------------------------------------------------------------------------
# allocation of codewords to coarse cells


def train_cell(x: torch.Tensor, k: int, niter: int, seed: int, label: str) -> torch.Tensor:
    """(k, d) centroids of one coarse cell's training rows, exactly as the build trains them
    (``u2.distributed.build_codebook`` trains its cells with it)."""
    return _train_cell(x, k, niter, seed, label)[0]


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
    allocation: str = "auto",
) -> Codebook:
    """Build a k-codeword codebook by two-stage k-means (the module docstring has the details).

    Args:
        features: the (M, d) training features: a torch tensor / NumPy / CuPy array, a path to a
            .npy file (memory-mapped, read in blocks, never loaded whole), a re-iterable of
            (m, d) chunks (a list, or a callable returning a fresh iterator; read several times,
            it must yield the same rows each time), or a one-pass iterator of chunks (a
            generator straight out of an encoder: written once, as fp32, to a file in
            checkpoint_dir or a temporary folder, memory-mapped, and removed after the build;
            the result equals the array build of the same rows). Any float dtype; trained in fp32.
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
        allocation: how the k codewords are split over the coarse cells. "size": in proportion
            to the cells' row counts. "distortion": to size * (the cell's mean squared distance
            to its coarse centroid)^DISTORTION_POWER, more codewords where the data spread more.
            "auto" (default): a pilot fine stage of both (1/16 of the rows per centroid, half the
            iterations; 1/HOLDOUT_FRACTION of the rows, at most HOLDOUT_ROWS, held out) picks the one with
            the lower held-out MSE (exact nearest codeword; "distortion" must be AUTO_MARGIN
            lower), which is then trained
            as that allocation alone would be: the result equals the build with the winner.
            Measured: on real photo patches "distortion" reached 0.989x single-stage faiss.Kmeans
            MSE where "size" gave 1.042x; on the SigLIP-like synthetic data "size" 1.004x and
            "distortion" 1.091x -- neither wins everywhere, hence "auto".

    Returns:
        Codebook of (k, d) fp32 vectors sorted by coarse cell, with meta: coarse_ids (k,) int64,
        coarse_centroids (n_coarse, d) fp32, cell_sizes (n_coarse,) int64 feature rows per cell,
        n_coarse, k, niter, seed, max_points_per_centroid, n_features.

    Raises:
        FileNotFoundError: a .npy path that does not exist.
        TypeError: non-float features, non-integer parameters.
        OSError: no room to spill a one-pass iterator (the message names the folder and the
            bytes needed; no partial file is left).
        ValueError: features not 2-D, chunks of different dims, NaN / Inf rows (the row is named),
            k > M, n_coarse > k, k < 1, fewer than k distinct points, a checkpoint_dir from a
            build with other parameters or data.
    """
    if allocation not in ALLOCATIONS:
        raise ValueError(f"unknown allocation {allocation!r}; expected one of {ALLOCATIONS}")
    k = _check_count("k", k, 1)
    n_coarse = min(k, max(1, round(k ** 0.5))) if n_coarse is None else _check_count("n_coarse", n_coarse, 1)
    if n_coarse > k:
        raise ValueError(f"n_coarse={n_coarse} must not exceed k={k}")
    niter = _check_count("niter", niter, 1)
    seed = _check_count("seed", seed, 0)
    max_points_per_centroid = _check_count("max_points_per_centroid", max_points_per_centroid, 1)
    fine_batch_bytes = _check_count("fine_batch_bytes", fine_batch_bytes, 1)

    source = open_features(features, device, max_points_per_centroid * n_coarse, seed, progress,
                           spill_dir=None if checkpoint_dir is None else os.fspath(checkpoint_dir))
    try:
        return _build(source, k, n_coarse, niter, seed, max_points_per_centroid, progress, checkpoint_dir,
                      fine_batch_bytes, allocation)
    finally:
        source.close()  # a spilled one-pass iterator's file goes


def _build(source, k: int, n_coarse: int, niter: int, seed: int, max_points_per_centroid: int, progress: bool,
           checkpoint_dir: Optional[str], fine_batch_bytes: int, allocation: str) -> Codebook:
    n_rows, dim = source.n_rows, source.dim
    if n_rows == 0 or dim == 0:
        raise ValueError(f"features has shape ({n_rows}, {dim}): need at least k={k} rows and d >= 1")
    if k > n_rows:
        raise ValueError(f"k={k} exceeds the number of feature rows ({n_rows})")
    n_holdout = min(HOLDOUT_ROWS, n_rows // HOLDOUT_FRACTION) if allocation == "auto" else 0
    if n_holdout and n_rows - n_holdout < 2 * k:
        n_holdout = 0  # too few rows to spare: "size", as before there was a choice
    checkpoints = None
    if checkpoint_dir is not None:  # the fingerprint reads all of an array's rows: only here
        run = {"k": k, "n_coarse": n_coarse, "niter": niter, "seed": seed,
               "max_points_per_centroid": max_points_per_centroid, "n_features": n_rows, "dim": dim,
               "allocation": allocation, "fingerprint": source.fingerprint}
        checkpoints = Checkpoints(checkpoint_dir, run)

    with stage("build_codebook/coarse"):
        coarse_centroids = _coarse_stage(source, checkpoints, n_coarse, niter, seed, max_points_per_centroid, progress)
    with stage("build_codebook/assign"):
        coarse_ids, cell_sizes, cell_sse = _assignment_pass(source, checkpoints, coarse_centroids, progress)

    holdout_mse: Dict[str, float] = {}
    chosen = "size" if allocation == "auto" else allocation
    if n_holdout:
        with stage("build_codebook/choose_allocation"):
            chosen, holdout_mse = _choose_allocation(source, checkpoints, coarse_ids, cell_sizes, cell_sse, k,
                                                     n_holdout, dim, niter, seed, max_points_per_centroid,
                                                     fine_batch_bytes, progress)
    k_cell = _allocation(chosen, cell_sizes, cell_sse, cell_sizes, k)
    trained: Dict[Tuple[int, int], torch.Tensor] = {}  # (cell, codewords) -> centroids
    with stage("build_codebook/fine"):
        _fine_stage(source, checkpoints, {chosen: k_cell}, coarse_ids, cell_sizes, trained, dim, niter, seed,
                    max_points_per_centroid, fine_batch_bytes, progress)
    vectors = _assemble(k_cell, trained, k, dim, source.device)

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
        "allocation": chosen,
        "holdout_rows": n_holdout,
        "holdout_mse": holdout_mse,
    }
    return Codebook(vectors, meta=meta)


def _coarse_stage(source, checkpoints: Optional[Checkpoints], n_coarse: int, niter: int, seed: int,
                  max_points_per_centroid: int, progress: bool) -> torch.Tensor:
    """(n_coarse, d) fp32 coarse centroids, trained on the coarse sample or loaded."""
    state = checkpoints.load("coarse", {"coarse_centroids": ((n_coarse, source.dim), torch.float32)}) \
        if checkpoints else None
    if state is not None:
        return state["coarse_centroids"].to(source.device)
    sample = source.coarse_sample(min(source.n_rows, max_points_per_centroid * n_coarse), seed)
    with tqdm(total=niter, desc=f"coarse k-means ({n_coarse} on {sample.shape[0]} rows)",
              disable=not progress) as bar:
        def report(iteration: int, mse: float) -> None:
            bar.set_postfix(mse=f"{mse:.5g}", refresh=False)
            bar.update()

        centroids, _ = _lloyd.kmeans(sample, n_coarse, niter, derive_seed(seed, STREAM_COARSE_INIT),
                                     "coarse stage", report)
    if checkpoints:
        checkpoints.save("coarse", {"coarse_centroids": centroids.cpu()})
    return centroids


def _assignment_pass(source, checkpoints: Optional[Checkpoints], coarse_centroids: torch.Tensor,
                     progress: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Coarse cell of every feature row (M,) int32, the cell sizes (n_coarse,) int64 and each
    cell's sum of squared distances to its centroid (n_coarse,) float64."""
    n_coarse = coarse_centroids.shape[0]
    state = checkpoints.load("assign", {"coarse_ids": ((source.n_rows,), torch.int32),
                                        "cell_sizes": ((n_coarse,), torch.int64),
                                        "cell_sse": ((n_coarse,), torch.float64)}) if checkpoints else None
    if state is not None:
        ids = state["coarse_ids"]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n_coarse
                            or not torch.equal(torch.bincount(ids.long(), minlength=n_coarse), state["cell_sizes"])):
            raise ValueError(f"{checkpoints.path('assign')}: damaged checkpoint (its cell ids lie outside "
                             f"[0, {n_coarse}) or disagree with its cell sizes); delete it to redo that step")
        return state["coarse_ids"], state["cell_sizes"], state["cell_sse"]
    coarse_ids = torch.empty(source.n_rows, dtype=torch.int32)
    cell_sse = torch.zeros(n_coarse, dtype=torch.float64)
    squared_error = 0.0
    with tqdm(total=source.n_rows, desc="assign to coarse cells", unit=" rows", disable=not progress) as bar:
        for start, block in source.blocks():
            ids, dists = _lloyd.fast_assign(block, coarse_centroids)
            ids, dists = ids.to("cpu", torch.int64), dists.to("cpu", torch.float64)
            coarse_ids[start:start + block.shape[0]] = ids.to(torch.int32)
            cell_sse.index_add_(0, ids, dists)
            squared_error += float(dists.sum())
            bar.update(block.shape[0])
            bar.set_postfix(mse=f"{squared_error / (start + block.shape[0]):.5g}", refresh=False)
    cell_sizes = torch.bincount(coarse_ids.long(), minlength=n_coarse)
    if checkpoints:
        checkpoints.save("assign", {"coarse_ids": coarse_ids, "cell_sizes": cell_sizes, "cell_sse": cell_sse})
    return coarse_ids, cell_sizes, cell_sse


def _allocation(name: str, train_sizes: torch.Tensor, cell_sse: torch.Tensor, cell_sizes: torch.Tensor,
                k: int) -> torch.Tensor:
    """(n_coarse,) codewords per cell under allocation ``name`` (see ``build_codebook``)."""
    if name == "size":
        return allocate_codewords(train_sizes, k)
    sizes = cell_sizes.double()
    mean_sse = torch.where(cell_sizes > 0, cell_sse.clamp(min=0) / sizes.clamp(min=1), 0.0)
    weight = sizes * mean_sse.pow(DISTORTION_POWER)
    # integral weights for allocate_codewords' exact arithmetic; every cell with training rows
    # keeps a positive weight (a cell of identical rows still needs its one codeword)
    scale = (2.0 ** 50) / max(float(weight.sum()), 1e-300)
    weights = (weight * scale).round().long().clamp(min=1) * (train_sizes > 0)
    return allocate_codewords(weights.tolist(), k, capacity=train_sizes.tolist())


def _choose_allocation(source, checkpoints: Optional[Checkpoints], coarse_ids: torch.Tensor, cell_sizes: torch.Tensor,
                       cell_sse: torch.Tensor, k: int, n_holdout: int, dim: int, niter: int, seed: int,
                       max_points_per_centroid: int, fine_batch_bytes: int,
                       progress: bool) -> Tuple[str, Dict[str, float]]:
    """Allocation "auto": a pilot fine stage of both allocations (PILOT_* fewer training rows per
    centroid and iterations, the held-out rows left out), scored by the exact held-out MSE; "distortion"
    wins only by more than AUTO_MARGIN. Returns the winner and the held-out MSE of each."""
    n_coarse = cell_sizes.shape[0]
    held = holdout_rows(source.n_rows, n_holdout, seed)
    train_ids = coarse_ids.clone()
    train_ids[held] = n_coarse  # a virtual cell that trains nothing
    train_sizes = torch.bincount(train_ids.long(), minlength=n_coarse + 1)[:n_coarse]
    allocations = {name: _allocation(name, train_sizes, cell_sse, cell_sizes, k) for name in ("size", "distortion")}
    trained: Dict[Tuple[int, int], torch.Tensor] = {}
    _fine_stage(source, checkpoints, allocations, train_ids, train_sizes, trained, dim,
                max(1, niter // PILOT_NITER_DIVISOR), seed,
                min(max_points_per_centroid, max(PILOT_MIN_POINTS, max_points_per_centroid // PILOT_POINTS_DIVISOR)),
                fine_batch_bytes, progress, name="pilot_cell")
    rows = gather_rows(source, held)
    mse = {name: float(nearest(rows, _assemble(k_cell, trained, k, dim, source.device))[1].double().mean())
           for name, k_cell in allocations.items()}
    # "distortion" must win clearly: a pilot's small differences are noise (local minima)
    return ("distortion" if mse["distortion"] < (1.0 - AUTO_MARGIN) * mse["size"] else "size"), mse


def _assemble(k_cell: torch.Tensor, trained: Dict[Tuple[int, int], torch.Tensor], k: int, dim: int,
              device: torch.device) -> torch.Tensor:
    """(k, d) codebook of the cells' centroids in cell order for the allocation ``k_cell``."""
    vectors = torch.empty((k, dim), dtype=torch.float32, device=device)
    start = 0
    for cell in k_cell.nonzero().squeeze(1).tolist():
        n_codes = int(k_cell[cell])
        vectors[start:start + n_codes] = trained[(cell, n_codes)].to(device)
        start += n_codes
    return vectors


def _fine_stage(source, checkpoints: Optional[Checkpoints], allocations: Dict[str, torch.Tensor],
                train_ids: torch.Tensor, train_sizes: torch.Tensor, trained: Dict[Tuple[int, int], torch.Tensor],
                dim: int, niter: int, seed: int, max_points_per_centroid: int, fine_batch_bytes: int,
                progress: bool, name: str = "fine_cell") -> None:
    """Fine k-means of every (cell, codeword count) the allocations ask for, each once, into
    ``trained`` (loaded from checkpoints where saved). A cell's training rows are the
    ``max_points_per_centroid * count`` of its rows with the smallest fine keys; ``train_ids``
    may hold a virtual cell n_coarse (held-out rows) that trains nothing."""
    n_coarse = train_sizes.shape[0]
    wanted = sorted({(cell, int(k_cell[cell])) for k_cell in allocations.values()
                     for cell in k_cell.nonzero().squeeze(1).tolist()})
    todo = []
    for cell, n_codes in wanted:
        state = checkpoints.load(f"{name}_{cell}_k{n_codes}", {"centroids": ((n_codes, dim), torch.float32)}) \
            if checkpoints else None
        if state is None:
            todo.append((cell, n_codes))
        else:
            trained[(cell, n_codes)] = state["centroids"]
    total = sum(n for _, n in wanted)
    with tqdm(total=total, initial=total - sum(n for _, n in todo),
              desc="fine k-means" if name == "fine_cell" else "pilot fine k-means (choosing the allocation)",
              unit=" codewords",
              disable=not progress) as bar:
        # one sample plan per take vector: a cell trained at two counts draws two sample sizes
        # (the smaller one the prefix of the larger, by key), so group the work by count rank
        rounds: List[List[Tuple[int, int]]] = []
        rank_in_cell: Dict[int, int] = {}
        for cell, n_codes in todo:  # sorted: a cell's counts come in ascending order
            rank = rank_in_cell[cell] = rank_in_cell.get(cell, -1) + 1
            while len(rounds) <= rank:
                rounds.append([])
            rounds[rank].append((cell, n_codes))
        for work in rounds:
            take = torch.zeros(n_coarse + 1, dtype=torch.int64)
            for cell, n_codes in work:
                take[cell] = min(int(train_sizes[cell]), max_points_per_centroid * n_codes)
            plan = plan_fine_samples(train_ids, n_coarse + 1, take, seed)
            batch_rows = max(1, fine_batch_bytes // (4 * source.dim))
            batches: List[List[Tuple[int, int]]] = [[]]
            filled = 0
            for item in work:
                if batches[-1] and filled + int(take[item[0]]) > batch_rows:
                    batches.append([])
                    filled = 0
                batches[-1].append(item)
                filled += int(take[item[0]])
            for batch in batches:
                samples, spans = gather_cells(source, [cell for cell, _ in batch], plan, progress)
                for cell, n_codes in batch:
                    lo, hi = spans[cell]

                    def report(iteration: int, mse: float, cell: int = cell) -> None:
                        bar.set_postfix(cell=cell, iter=iteration, mse=f"{mse:.5g}", refresh=False)

                    centroids, _ = _train_cell(samples[lo:hi], n_codes, niter, derive_seed(seed, STREAM_CELL_INIT, cell),
                                               f"coarse cell {cell}", report)
                    trained[(cell, n_codes)] = centroids
                    if checkpoints:
                        checkpoints.save(f"{name}_{cell}_k{n_codes}", {"centroids": centroids.cpu()})
                    bar.update(n_codes)
                del samples