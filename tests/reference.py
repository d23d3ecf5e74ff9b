"""Float64 references and the argmin acceptance rule shared by the search tests."""
import torch


def objective64(x: torch.Tensor, codebook: torch.Tensor, metric: str) -> torch.Tensor:
    """(N, K) float64 distances in the public meaning: squared L2, -<x, c>, 1 - cos."""
    x64, c64 = x.double(), codebook.double()
    if metric == "l2":
        return (x64.unsqueeze(1) - c64.unsqueeze(0)).pow(2).sum(dim=2)
    if metric == "ip":
        return -(x64 @ c64.t())
    xn = x64 / x64.norm(dim=1, keepdim=True)
    cn = c64 / c64.norm(dim=1, keepdim=True)
    return 1.0 - xn @ cn.t()


def assert_nearest_ok(ids, dists, x, codebook, metric, *, rel_tol=0.0, abs_tol=0.0, exact=False):
    """Check (ids, dists) against the float64 truth.

    ``exact``: ids must equal the float64 argmin with ties to the lowest index. Otherwise a chosen
    id may differ only on a near-tie: its true distance must be within ``tol`` of the minimum,
    where tol = abs_tol + rel_tol * scale (scale: the magnitude of the distances involved).
    dists must match the true distance of the chosen id within the same tolerance.
    """
    ids = torch.as_tensor(ids).reshape(-1)
    dists = torch.as_tensor(dists).reshape(-1).double()
    d = x.shape[-1]
    truth = objective64(x.reshape(-1, d), codebook, metric)
    assert ids.dtype == torch.int64
    assert ids.shape[0] == truth.shape[0]
    if truth.shape[0] == 0:
        return
    best, best_idx = truth.min(dim=1)  # torch's min returns the first minimum: the lowest index
    chosen = truth.gather(1, ids.unsqueeze(1)).squeeze(1)
    if metric == "l2":
        scale = (x.reshape(-1, d).double().pow(2).sum(dim=1) + codebook.double().pow(2).sum(dim=1).max())
    elif metric == "ip":
        scale = x.reshape(-1, d).double().norm(dim=1) * codebook.double().norm(dim=1).max()
    else:
        scale = torch.ones_like(best)
    tol = abs_tol + rel_tol * scale
    if exact:
        assert torch.equal(ids, best_idx), f"ids differ from the float64 argmin at rows {(ids != best_idx).nonzero().squeeze(1)[:10].tolist()}"
    else:
        gap_ok = chosen - best <= tol
        assert bool(gap_ok.all()), f"chosen codes are not (near-)nearest at rows {(~gap_ok).nonzero().squeeze(1)[:10].tolist()}"
        clear = (truth - best.unsqueeze(1) > tol.unsqueeze(1)).sum(dim=1) == truth.shape[1] - 1
        assert torch.equal(ids[clear], best_idx[clear]), "ids differ where the nearest code is clear"
    err = (dists - chosen).abs()
    assert bool((err <= tol + 1e-6 * scale).all()), f"dists off by up to {err.max().item():.3g}"


def no_zero_rows(v):
    """cos takes no zero vector: such rows get a 1 in their first column."""
    v = v.clone()
    v[(v == 0).all(dim=1), 0] = 1.0
    return v


def search_data(kind, n, k, d, seed):
    """(queries, codebook) of one of the search tests' kinds: "gaussian", "integer ties", "duplicates",
    "near copies", "queries on codewords"."""
    g = torch.Generator().manual_seed(seed)
    codebook = torch.randn(k, d, generator=g) * 3.0
    x = torch.randn(n, d, generator=g) * 3.0
    if kind == "integer ties":  # many exact ties: integer points, exactly representable distances
        codebook, x = codebook.round().clamp(-2, 2), x.round().clamp(-2, 2)
    elif kind == "duplicates":  # each row repeated: the lowest of the copies wins
        codebook = codebook[torch.randint(0, max(1, k // 4), (k,), generator=g)]
    elif kind == "near copies":  # queries a hair away from codewords: tiny gaps
        x = codebook[torch.randint(0, k, (n,), generator=g)] + 1e-5 * torch.randn(n, d, generator=g)
    elif kind == "queries on codewords":  # distance exactly 0, and duplicates of it
        x = codebook[torch.randint(0, k, (n,), generator=g)]
    return x, codebook
