"""The certified-exact core shared by the flat CPU search and HierarchicalIndex's exact mode.

Both run a cheap, low-precision scan whose every approximate distance carries a rigorous error
bound, keep each (query, codeword) pair that could still be the nearest as a candidate, and
settle the candidates here: float64 distances from the original vectors, the minimum per query
and, among exact ties, the lowest codeword id. Queries with more than CANDIDATE_CAP candidates
(masses of near-equidistant codewords) are flagged so the caller resolves them another way.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

#: unit roundoff of float32 / float64 (half an ulp of 1)
U32 = 2.0 ** -24
U64 = 2.0 ** -53
#: relative margin on fp64 quantities (norms, square roots, sums of d terms): far above their
#: rounding (d * 2^-53 < 1e-12 for d < 10^4), far below anything that changes a decision
GROW64 = 1e-10
#: candidates per query kept before the query is flagged as overflowing
CANDIDATE_CAP = 1024
#: candidate pairs re-ranked at a time (each pair gathers a query and a codeword row) at most ...
RERANK_CHUNK = 16384
#: ... and at most this many bytes per gathered float64 block: temporaries past glibc's 32 MiB
#: mmap threshold are fresh pages every time (page faults: 2.4 ns per element against 0.2 for a
#: 6 MiB block measured on the 2-core CI machine, an order of magnitude on the re-rank)
RERANK_BYTES = 4 << 20


class ieee_fp32_matmul:
    """fp32 matrix products in IEEE fp32 inside the block (``with ieee_fp32_matmul():``), whatever
    the user set.

    The error bounds here assume fp32 rounding; TF32 on CUDA (``allow_tf32``,
    ``set_float32_matmul_precision("high")``) and bf16 on oneDNN CPUs
    (``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``) round far more coarsely. The
    user's settings are restored on exit. ``cuda=False`` (CPU tensors) leaves the CUDA switches,
    which no CPU product reads, alone; a switch already at "ieee" is not written.
    """

    __slots__ = ("cuda", "saved", "precision")

    def __init__(self, cuda: bool = True):
        self.cuda = cuda
        self.saved = []
        self.precision = None

    def __enter__(self) -> None:
        saved = self.saved = []
        mkldnn = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
        # torch >= 2.9: one fp32_precision per backend ("none" inherits the global one)
        backends = (getattr(torch.backends.cuda, "matmul", None), getattr(torch.backends, "cudnn", None), mkldnn)
        try:
            if any(backend is not None and hasattr(backend, "fp32_precision") for backend in backends):
                for backend in backends if self.cuda else (mkldnn,):
                    if backend is not None and hasattr(backend, "fp32_precision"):
                        value = backend.fp32_precision
                        if value != "ieee":
                            saved.append((backend, "fp32_precision", value))
                            backend.fp32_precision = "ieee"
                return
            # torch < 2.9: the legacy switches
            self.precision = torch.get_float32_matmul_precision()
            for backend, name in ((torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32")):
                saved.append((backend, name, getattr(backend, name)))
                setattr(backend, name, False)
            torch.set_float32_matmul_precision("highest")
        except BaseException:  # a switch that refused: the ones already written go back
            self.__exit__()
            raise

    def __exit__(self, *exc) -> None:
        for backend, name, value in self.saved:
            setattr(backend, name, value)
        if self.precision is not None:
            torch.set_float32_matmul_precision(self.precision)
            self.precision = None
        self.saved = []


def sum_rounding(d: int, unit: float) -> float:
    """Relative rounding bound of a d-term sum of products at unit roundoff ``unit``."""
    return 1.01 * (d + 4) * unit


def fp64_slack(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A bound on the fp64 rounding of a sum or difference of ``a`` and ``b`` (and of adding a
    small width to it): a few units in the last place of the larger magnitude."""
    return 4.0 * U64 * (a.abs() + b.abs())


class CandidateStore:
    """Candidates of one chunk of ``n`` queries: (query row, codeword column, lower bound)."""

    def __init__(self, n: int, device: torch.device):
        self.overflow = torch.zeros(n, dtype=torch.bool, device=device)  # more than CANDIDATE_CAP
        self._count = torch.zeros(n, dtype=torch.int64, device=device)
        self._rows: List[torch.Tensor] = []
        self._cols: List[torch.Tensor] = []
        self._lower: List[torch.Tensor] = []

    def admit(self, rows: torch.Tensor) -> torch.Tensor:
        """Count new candidates of ``rows``; flag the queries past the cap. Returns the mask of
        the entries whose query is not flagged (the rest need no distance computed)."""
        self._count.index_add_(0, rows, torch.ones_like(rows))
        self.overflow |= self._count > CANDIDATE_CAP
        return ~self.overflow[rows]

    def add(self, rows: torch.Tensor, cols: torch.Tensor, lower: torch.Tensor) -> None:
        """Record candidates and a lower bound on each one's true objective."""
        self._rows.append(rows)
        self._cols.append(cols)
        self._lower.append(lower)

    def surviving(self, upper: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The candidates whose lower bound does not exceed their query's final upper bound,
        of queries not flagged: (rows, cols, lower)."""
        device = self.overflow.device
        if not self._rows:
            empty = torch.empty(0, dtype=torch.int64, device=device)
            return empty, empty, torch.empty(0, dtype=torch.float64, device=device)
        rows, cols, lower = torch.cat(self._rows), torch.cat(self._cols), torch.cat(self._lower)
        keep = (lower <= upper[rows]) & ~self.overflow[rows]
        return rows[keep], cols[keep], lower[keep]


def pair_objective(x: torch.Tensor, codebook: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, metric: str,
                   dtype: Optional[torch.dtype] = None, gamma: float = 0.0, x_norm: Optional[torch.Tensor] = None,
                   c_norm: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Objective of the (row, col) pairs from the original vectors, and a bound on its rounding.

    l2: ``||x - c||^2`` (difference, square, row sum); ip: ``-<x, c>``; cos: ``-cos(x, c)``,
    computed in ``dtype`` (default: x's) in chunks of RERANK_CHUNK pairs (fewer at large d), so equal pairs get
    bit-identical objectives on every caller and ties resolve identically. ``gamma``: relative
    rounding bound of a d-term sum in that precision (0 for float64, whose rounding is far below
    any bound used here); ``x_norm`` / ``c_norm``: fp64 row-norm bounds for the ip error term.

    Returns:
        (objective, error bound), both float64, shape (pairs,).
    """
    dtype = dtype or x.dtype
    out = torch.empty(rows.shape[0], dtype=dtype, device=x.device)
    step = max(1, min(RERANK_CHUNK, RERANK_BYTES // (8 * max(1, x.shape[1]))))
    for start in range(0, rows.shape[0], step):
        xv = x.index_select(0, rows[start:start + step]).to(dtype)
        cv = codebook.index_select(0, cols[start:start + step]).to(dtype)
        if metric == "l2":
            val = xv.sub_(cv).pow_(2).sum(dim=1)
        elif metric == "ip":
            val = torch.linalg.vecdot(xv, cv).neg_()
        else:
            val = torch.linalg.vecdot(xv, cv).div_(xv.norm(dim=1).mul_(cv.norm(dim=1))).neg_()
        out[start:start + step] = val
    out = out.double()
    if gamma == 0.0:
        return out, torch.zeros_like(out)
    if metric == "l2":
        err = gamma * out.abs()  # the summed terms are the squares themselves
    elif metric == "ip":
        err = gamma * x_norm[rows] * c_norm[cols]
    else:
        err = torch.full_like(out, 4.0 * gamma)  # dot and both norms, each within gamma
    return out, err


def lowest_of_min(n: int, rows: torch.Tensor, ids: torch.Tensor, obj: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per query row, the minimum objective and, among exact ties, the lowest id.

    Rows without any pair get (-1, inf): the caller resolves them (overflowing queries); the
    public search refuses to return an id outside [0, K).
    """
    best = torch.full((n,), math.inf, dtype=torch.float64, device=obj.device)
    best = best.scatter_reduce(0, rows, obj, reduce="amin")
    tie = obj == best[rows]
    sentinel = torch.iinfo(torch.int64).max
    best_id = torch.full((n,), sentinel, dtype=torch.int64, device=obj.device).scatter_reduce(
        0, rows[tie], ids[tie], reduce="amin")
    return best_id.masked_fill_(best_id == sentinel, -1), best
