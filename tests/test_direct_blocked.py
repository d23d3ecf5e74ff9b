"""The direct scan's ip / cos form over blocks of the codebook (unicode2_fast._direct.search_dot_blocked):
the very answer of the other exact paths (pair_objective's float64 objective in torch's order, the
lowest index on ties) on random, tied, duplicate-heavy and photograph data, ties and near ties
split across blocks, the float64 pre-selection of masses of near ties (flat image regions), and
the automatic choice between it and FAISS's certified flat scan."""
import pytest
import torch

from unicode2_fast import _certified, _direct, _native, _nearest_cpu
from unicode2_fast.data import photo_patches

from reference import assert_nearest_ok, no_zero_rows, search_data

needs_native = pytest.mark.skipif(not _native.available(), reason="no C compiler here")


def _data(kind, n, k, d, seed):
    x, codebook = search_data(kind, n, k, d, seed)
    return no_zero_rows(x), no_zero_rows(codebook)


def _blocked(x, codebook, metric):
    return _direct.search_dot_blocked(x, codebook, metric, _nearest_cpu.distinct_codewords)


def _as_dists(obj, metric):
    return (1.0 + obj if metric == "cos" else obj).float()


@needs_native
@pytest.mark.parametrize("metric", ["ip", "cos"])
@pytest.mark.parametrize("d", [7, 64, 192])
@pytest.mark.parametrize("kind", ["gaussian", "integer ties", "duplicates", "near copies", "photographs"])
def test_blocked_scan_is_the_answer_of_the_other_exact_paths(monkeypatch, metric, d, kind):
    monkeypatch.setattr(_direct, "BLOCK_BYTES", 4 * 32 * d)  # blocks of 32 codewords: 32 of them
    assert _direct.block_rows(d) == 32
    if kind == "photographs":  # grey patches, flat regions: near ties across blocks
        side = {7: 3, 64: 8, 192: 14}[d]
        p = photo_patches(1000 + 300, side, gray=True, seed=d)[:, :d]
        p = p[p.norm(dim=1) > 0]
        codebook, x = p[:1000].contiguous(), p[1000:].contiguous()
    else:
        x, codebook = _data(kind, 53, 1000, d, seed=d + len(kind))
    ids, obj = _blocked(x, codebook, metric)
    dists = _as_dists(obj, metric)
    other_ids, other = _nearest_cpu.nearest_cpu(x, codebook, metric, "fp64")
    assert torch.equal(ids, other_ids) and torch.equal(dists, other)
    assert_nearest_ok(ids, dists, x, codebook, metric, rel_tol=1e-12, abs_tol=1e-12)
    # the unblocked scan (one block) returns the same ids and fp32 distances
    one_ids, one_obj = _direct.search_dot(x, codebook, metric, _nearest_cpu.distinct_codewords)
    assert torch.equal(ids, one_ids) and torch.equal(dists, _as_dists(one_obj, metric))


@needs_native
@pytest.mark.parametrize("metric", ["ip", "cos"])
def test_ties_and_near_ties_split_across_blocks(monkeypatch, metric):
    monkeypatch.setattr(_direct, "BLOCK_BYTES", 4 * 16 * 8)  # blocks of 16 codewords
    # 256 corners of a cube, all tied for the axis queries: the lowest index of 16 blocks' winners
    corners = torch.cartesian_prod(*[torch.tensor([-1.0, 1.0])] * 8)
    q = torch.tensor([[1.0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 2.0], [1.0, 1, 0, 0, 0, 0, 0, 0]])
    ids, obj = _blocked(q, corners, metric)
    other_ids, other = _nearest_cpu.nearest_cpu(q, corners, metric, "fp64")
    assert torch.equal(ids, other_ids) and torch.equal(_as_dists(obj, metric), other)
    assert int(ids[0]) == int((corners[:, 0] == 1).nonzero()[0])
    # codewords one fp32 ulp apart in angle, in different blocks: fp32 ranks them at random
    g = torch.Generator().manual_seed(5)
    base = torch.randn(40, 8, generator=g)
    near = base * (1.0 + 2.0 ** -23) + 1e-7 * torch.randn(40, 8, generator=g)
    codebook = torch.cat([base, torch.randn(200, 8, generator=g), near])
    x = base + 1e-3 * torch.randn(40, 8, generator=g)
    ids, obj = _blocked(x, codebook, metric)
    other_ids, other = _nearest_cpu.nearest_cpu(x, codebook, metric, "fp64")
    assert torch.equal(ids, other_ids) and torch.equal(_as_dists(obj, metric), other)


@needs_native
@pytest.mark.parametrize("metric", ["ip", "cos"])
def test_blocked_scan_past_the_direct_scans_limit(metric):
    # K > MAX_K: nearest_cpu's forced "direct" takes the blocked scan (it refused before)
    g = torch.Generator().manual_seed(2)
    p = photo_patches(_direct.MAX_K + 700 + 400, 8, seed=3)
    p = p[p.norm(dim=1) > 0]
    codebook, x = p[:_direct.MAX_K + 700].contiguous(), p[_direct.MAX_K + 700:].contiguous()
    x = torch.cat([x, torch.randn(50, x.shape[1], generator=g)])
    ids, dists = _nearest_cpu.nearest_cpu(x, codebook, metric, "direct")
    other_ids, other = _nearest_cpu.nearest_cpu(x, codebook, metric, "fp64")
    assert torch.equal(ids, other_ids) and torch.equal(dists, other)
    assert_nearest_ok(ids, dists, x, codebook, metric, rel_tol=1e-12, abs_tol=1e-12)
    half_ids, half = _nearest_cpu.nearest_cpu(x.half(), codebook.half(), metric, "direct")
    ref_ids, ref = _nearest_cpu.nearest_cpu(x.half().float(), codebook.half().float(), metric, "fp64")
    assert torch.equal(half_ids, ref_ids) and torch.equal(half, ref)


@needs_native
def test_flat_regions_rank_only_their_near_ties_in_torch(monkeypatch):
    # grey 16x16 photograph patches: flat regions normalise to nearly one unit row, so some queries
    # have more near ties than the loop lists (count -1). Torch ranks only the codewords the float64
    # GEMM pre-selects for them (it ranked every codeword of the block before: 74% of a 2.7 s search)
    pairs, masses = [], []
    original, original_mass = _certified.pair_objective, _direct._mass_pairs

    def counting(x, codebook, rows, cols, *args, **kwargs):
        pairs.append(rows.numel())
        return original(x, codebook, rows, cols, *args, **kwargs)

    def counting_mass(x, rows, queries, metric):
        masses.append(queries.numel())
        return original_mass(x, rows, queries, metric)

    monkeypatch.setattr("unicode2_fast._direct.pair_objective", counting)
    monkeypatch.setattr(_direct, "_mass_pairs", counting_mass)
    p = photo_patches(3000 + 1000, 16, gray=True, seed=2)
    p = p[p.norm(dim=1) > 0]
    codebook, x = p[:3000].contiguous(), p[3000:].contiguous()
    ids, obj = _blocked(x, codebook, "cos")
    assert sum(masses) > 0  # such queries occur
    # every ranked pair: a near tie, the pre-selected masses, or a winner's final objective
    assert sum(pairs) <= 0.02 * x.shape[0] * codebook.shape[0]
    other_ids, other = _nearest_cpu.nearest_cpu(x, codebook, "cos", "fp64")
    assert torch.equal(ids, other_ids) and torch.equal(_as_dists(obj, "cos"), other)


@needs_native
@pytest.mark.parametrize("metric", ["ip", "cos"])
def test_mass_pairs_keep_the_torch_order_winner(metric):
    # objectives equal in exact arithmetic that float64 evaluations rank by their last bits: cos,
    # 200 constant rows of distinct levels against constant queries (cos exactly 1); ip, 200
    # permutations of one vector against constant queries (equal dot products). The GEMM's least
    # value is often not torch's winner; the pre-selection within 4 dev keeps torch's winner
    g = torch.Generator().manual_seed(3)
    d = 96
    if metric == "cos":
        tied = (torch.rand(200, generator=g) * 0.9 + 0.05)[:, None].expand(200, d)
    else:
        v = torch.randn(d, generator=g)
        tied = torch.stack([v[torch.randperm(d, generator=g)] for _ in range(200)])
    others = torch.rand(300, d, generator=g) - 2.0  # (negative: farther from the queries)
    codebook = torch.cat([others, tied]).contiguous()
    x = (torch.rand(20, 1, generator=g) + 0.5).expand(20, d).contiguous()
    queries = torch.arange(20)
    rows, cols = _direct._mass_pairs(x, codebook, queries, metric)
    every_row = queries.repeat_interleave(codebook.shape[0])
    every_col = torch.arange(codebook.shape[0]).repeat(20)
    obj, _ = _certified.pair_objective(x, codebook, every_row, every_col, metric, torch.float64)
    winner, _ = _certified.lowest_of_min(20, every_row, every_col, obj)
    kept = set(zip(rows.tolist(), cols.tolist()))
    assert all((q, int(w)) in kept for q, w in enumerate(winner))
    assert len(kept) <= 20 * 200  # never the 300 others
    gemm = -(x.double() @ codebook.double().t())
    if metric == "cos":
        gemm = gemm / (x.double().norm(dim=1, keepdim=True) * codebook.double().norm(dim=1))
    assert int((gemm.argmin(dim=1) != winner).sum()) >= 1  # (a pre-selection of the GEMM's minimum alone would miss)


@needs_native
def test_automatic_choice_times_both_paths_and_keeps_the_faster(monkeypatch):
    # a fake clock: the flat path costs 1 unit a call, the blocked scan 2 (also when the flat path
    # hands it its uncertified queries), so the choice is deterministic here
    flat_calls, blocked_calls, now = [], [], [0.0]
    original_flat, original_blocked = _nearest_cpu._flat_search, _direct.search_dot_blocked

    def flat(x, *args, **kwargs):
        flat_calls.append(x.shape[0])
        now[0] += 1.0
        return original_flat(x, *args, **kwargs)

    def blocked(x, *args, **kwargs):
        blocked_calls.append(x.shape[0])
        now[0] += 2.0
        return original_blocked(x, *args, **kwargs)

    monkeypatch.setattr(_nearest_cpu, "_flat_search", flat)
    monkeypatch.setattr(_direct, "search_dot_blocked", blocked)
    monkeypatch.setattr(_nearest_cpu, "_clock", lambda: now[0])
    monkeypatch.setattr(_nearest_cpu, "choose_filter", lambda n, k, d: "flat")
    # Gaussian rows: the fp32 flat scan certifies them all; flat (1) beats blocked (2) and stays
    g = torch.Generator().manual_seed(0)
    codebook, x = torch.randn(5000, 64, generator=g), torch.randn(300, 64, generator=g)
    want_ids, want = _nearest_cpu.nearest_cpu(x, codebook, "cos", "fp64")
    for _ in range(4):
        ids, dists = _nearest_cpu.nearest_cpu(x, codebook, "cos")
        assert torch.equal(ids, want_ids) and torch.equal(dists, want)
    assert flat_calls == [300] * 3 and blocked_calls == [300]  # flat, blocked, then flat
    # flat grey patches: a third of the queries fail FAISS's certificate and go on to the blocked
    # scan (flat 1 + 2 > 2), so after one chunk each the codebook's chunks take the blocked scan
    flat_calls.clear(), blocked_calls.clear()
    p = photo_patches(5000 + 1000, 16, gray=True, seed=2)
    p = p[p.norm(dim=1) > 0]
    codebook, x = p[:5000].contiguous(), p[5000:].contiguous()
    want_ids, want = _nearest_cpu.nearest_cpu(x, codebook, "cos", "fp64")
    for _ in range(3):
        ids, dists = _nearest_cpu.nearest_cpu(x, codebook, "cos")
        assert torch.equal(ids, want_ids) and torch.equal(dists, want)
    n = x.shape[0]
    assert flat_calls == [n] and 0.25 * n < blocked_calls[0] < n and blocked_calls[1:] == [n, n]


def test_dot_paths_retry_the_slower_path_now_and_then():
    paths = _nearest_cpu._DotPaths()
    picks = []
    for _ in range(2 * _nearest_cpu.FILTER_RETRY_EVERY):
        path = picks.append(paths.pick()) or picks[-1]
        paths.record(path, 3.0 if path == "flat" else 1.0, 100)
    assert picks[:2] == ["flat", "blocked"]
    assert picks.count("flat") == 1 + 2  # its first chunk, then every FILTER_RETRY_EVERY-th


@needs_native
@pytest.mark.parametrize("block", [16, 4096])
def test_constant_rows_tie_in_exact_arithmetic_and_torch_orders_them(monkeypatch, block):
    # 300 constant rows (flat image regions): every one at cos exactly 1 to a constant query, so the
    # float64 evaluations differ only in their last bits and each order ranks them otherwise. The
    # answer is torch's order's (pair_objective), found among the GEMM's pre-selected near ties
    monkeypatch.setattr(_direct, "BLOCK_BYTES", 4 * block * 64)
    g = torch.Generator().manual_seed(8)
    levels = torch.rand(300, generator=g) * 0.9 + 0.05
    codebook = torch.cat([levels[:, None].expand(300, 64), torch.rand(200, 64, generator=g)])
    codebook = codebook[torch.randperm(500, generator=g)].contiguous()
    x = torch.cat([torch.rand(12, 1, generator=g).expand(12, 64), torch.rand(12, 64, generator=g)]).contiguous()
    ids, obj = _blocked(x, codebook, "cos")
    other_ids, other = _nearest_cpu.nearest_cpu(x, codebook, "cos", "fp64")
    assert torch.equal(ids, other_ids) and torch.equal(_as_dists(obj, "cos"), other)
    ids, dists = _nearest_cpu.nearest_cpu(x, codebook, "cos", "direct")
    assert torch.equal(ids, other_ids) and torch.equal(dists, other)
