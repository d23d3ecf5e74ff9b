"""u2.nearest's direct scan for small codebooks (unicode2_fast._direct, the compiled loop in _native):
the exact float64 argmin (lowest index on ties) on random, tied, duplicate-heavy, near-copy and
photograph data at several d and K, at magnitudes from subnormal to overflowing fp32 squares,
masses of equidistant codewords past its near-tie list, the work it hands to torch's re-rank, and
the automatic choice between it and the other exact paths."""
import faiss
import pytest
import torch

import unicode2_fast as u2
from unicode2_fast import _certified, _direct, _native, _nearest_cpu
from unicode2_fast.data import photo_patches

from reference import assert_nearest_ok, objective64
from reference import no_zero_rows as _no_zero_rows, search_data as _data

needs_native = pytest.mark.skipif(not _native.available(), reason="no C compiler here")


def _argmin64(x, codebook, metric="l2"):
    best, ids = objective64(x, codebook, metric).min(dim=1)  # the first minimum: the lowest index
    return ids, best


@needs_native
@pytest.mark.parametrize("d", [1, 7, 16, 17, 64, 192, 1152])
@pytest.mark.parametrize("k", [1, 8, 100, 1024])
@pytest.mark.parametrize("kind", ["gaussian", "integer ties", "duplicates", "near copies", "queries on codewords"])
def test_direct_scan_is_the_float64_argmin(d, k, kind):
    x, codebook = _data(kind, 61, k, d, seed=d * 7 + k)
    ids, dists = _nearest_cpu.nearest_cpu(x, codebook, "l2", "direct")
    want, best = _argmin64(x, codebook)
    assert torch.equal(ids, want)
    assert torch.equal(dists, best.float())  # the float64 distance, rounded once


@needs_native
@pytest.mark.parametrize("metric", ["ip", "cos"])
@pytest.mark.parametrize("d", [1, 7, 16, 64, 192, 1152])
@pytest.mark.parametrize("k", [1, 8, 100, 1024])
@pytest.mark.parametrize("kind", ["gaussian", "integer ties", "duplicates", "near copies", "queries on codewords"])
def test_direct_dot_scan_is_the_float64_argmin(metric, d, k, kind):
    x, codebook = _data(kind, 61, k, d, seed=d * 5 + k)
    if metric == "cos":
        x, codebook = _no_zero_rows(x), _no_zero_rows(codebook)
    ids, dists = _nearest_cpu.nearest_cpu(x, codebook, metric, "direct")
    # the float64 optimum (exact ties, e.g. parallel integer codewords under cos, may be ranked either
    # way by another float64 evaluation order: within 1e-12 of it) ...
    assert_nearest_ok(ids, dists, x, codebook, metric, rel_tol=1e-12, abs_tol=1e-12)
    if kind == "gaussian":
        assert torch.equal(ids, _argmin64(x, codebook, metric)[0])
    # ... and the very answer of the other exact paths (pair_objective's evaluation, lowest index)
    other_ids, other = _nearest_cpu.nearest_cpu(x, codebook, metric, "fp64")
    assert torch.equal(ids, other_ids) and torch.equal(dists, other)


@needs_native
@pytest.mark.parametrize("metric", ["ip", "cos"])
def test_direct_dot_scan_near_equal_angles_and_masses_of_ties(metric):
    # codewords at angles that differ by ~1e-7 (fp32 dot products misrank them) and a mass of exact
    # ties past the near-tie list (the +-1 corners of a cube, all at one angle to the axis query)
    g = torch.Generator().manual_seed(11)
    n, per, d = 16, 64, 48
    axis = torch.randn(n, d, generator=g, dtype=torch.float64)
    axis = axis / axis.norm(dim=1, keepdim=True)
    u = torch.randn(n, per, d, generator=g, dtype=torch.float64)
    u -= (u * axis[:, None, :]).sum(dim=2, keepdim=True) * axis[:, None, :]
    u = u / u.norm(dim=2, keepdim=True)
    codebook = (axis[:, None, :] * 0.8 + u * 0.6).reshape(n * per, d).float()  # all at cos 0.8, norm 1
    x = axis.float()
    want, best = _argmin64(x, codebook, metric)
    ids, dists = _nearest_cpu.nearest_cpu(x, codebook, metric, "direct")
    assert torch.equal(ids, want)
    fp32_pick = (x @ codebook.t()).argmax(dim=1)
    assert int((fp32_pick != want).sum()) >= n // 4  # (what a scan that trusted fp32 would return)
    corners = torch.cartesian_prod(*[torch.tensor([-1.0, 1.0])] * 8)  # 128 tied corners per query
    q = torch.tensor([[1.0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 2.0]])
    ids, dists = _nearest_cpu.nearest_cpu(q, corners, metric, "direct")
    other_ids, other = _nearest_cpu.nearest_cpu(q, corners, metric, "fp64")
    assert torch.equal(ids, other_ids) and torch.equal(dists, other)
    assert_nearest_ok(ids, dists, q, corners, metric, rel_tol=1e-12, abs_tol=1e-12)
    assert int(ids[0]) == int((corners[:, 0] == 1).nonzero()[0])  # the lowest of the 128 tied corners
    *_, count, flagged = _native.direct_dot(q, corners, corners.double().norm(dim=1), _native.direct_pack(corners),
                                            corners.norm(dim=1) * 1.001, 1e-5, 1e-12, False)
    assert bool((count == -1).all()) and flagged == 2  # past the near-tie list: every codeword ranked


@needs_native
def test_direct_dot_scan_at_overflowing_sums_and_norms():
    # a partial sum past -FLT_MAX that later terms bring back (the exact optimum: codeword 1), and a
    # zero query against a codeword whose norm bound overflows fp32 (0 x inf in the bound)
    x = torch.full((2, 3), 1e20)
    codebook = torch.tensor([[-1e18, -1e18, -1e18], [-3e18, -3e18, 3.4e18]])
    ids, dists = _nearest_cpu.nearest_cpu(x, codebook, "ip", "direct")
    want, best = _argmin64(x, codebook, "ip")
    assert torch.equal(ids, torch.ones(2, dtype=torch.int64)) and torch.equal(ids, want)
    assert torch.equal(dists, best.float())
    ids, dists = u2.nearest(x, codebook, metric="ip")  # (the public call rescales such magnitudes first)
    assert torch.equal(ids, want) and torch.equal(dists, best.float())
    zero, big = torch.zeros(1, 2), torch.tensor([[3e38, 3e38], [1.0, 0.0]])
    ids, dists = _nearest_cpu.nearest_cpu(zero, big, "ip", "direct")
    assert int(ids[0]) == 0 and float(dists[0]) == 0.0  # every objective is -0: the lowest index


@needs_native
def test_zero_ip_queries_tie_every_codeword_without_a_second_ranking():
    # black photograph patches: <0, c> is exactly 0 for every codeword in any order, so the lowest
    # index wins in the loop itself and torch re-ranks nothing (it re-ranked every codeword before)
    codebook = torch.rand(300, 48, generator=torch.Generator().manual_seed(4))
    x = torch.cat([torch.zeros(5, 48), codebook[:3] + 0.5])
    scanned = codebook.norm(dim=1) * 1.001
    ids, obj, _, count, flagged = _native.direct_dot(x, codebook, codebook.double().norm(dim=1),
                                                     _native.direct_pack(codebook), scanned, 1e-5, 1e-13, False)
    assert torch.equal(ids[:5], torch.zeros(5, dtype=torch.int64)) and bool((count[:5] == 0).all())
    ids, dists = _nearest_cpu.nearest_cpu(x, codebook, "ip", "direct")
    other_ids, other = _nearest_cpu.nearest_cpu(x, codebook, "ip", "fp64")
    assert torch.equal(ids, other_ids) and torch.equal(dists, other)


@needs_native
@pytest.mark.parametrize("metric", ["ip", "cos"])
def test_direct_dot_scan_in_query_chunks(monkeypatch, metric):
    # chunks of more than 1,024 queries write their near-tie lists into a buffer kept between calls
    monkeypatch.setattr(_direct, "CHUNK", 1200)
    x, codebook = _data("integer ties", 2500, 90, 12, seed=6)
    x, codebook = _no_zero_rows(x), _no_zero_rows(codebook)
    for _ in range(2):
        ids, dists = _nearest_cpu.nearest_cpu(x, codebook, metric, "direct")
        other_ids, other = _nearest_cpu.nearest_cpu(x, codebook, metric, "fp64")
        assert torch.equal(ids, other_ids) and torch.equal(dists, other)


@needs_native
@pytest.mark.parametrize("metric", ["l2", "ip", "cos"])
@pytest.mark.parametrize("d", [16, 1152])
def test_direct_scan_at_its_largest_codebook(metric, d):
    x, codebook = _data("duplicates", 61, _direct.MAX_K, d, seed=d)
    ids, dists = _nearest_cpu.nearest_cpu(x, codebook, metric, "direct")
    other_ids, other = _nearest_cpu.nearest_cpu(x, codebook, metric, "fp64")
    assert torch.equal(ids, other_ids) and torch.equal(dists, other)
    assert_nearest_ok(ids, dists, x, codebook, metric, rel_tol=1e-12, abs_tol=1e-12)


@needs_native
def test_direct_scan_in_query_chunks(monkeypatch):
    # beyond CHUNK queries the near-tie lists are written chunk by chunk into a reused buffer
    monkeypatch.setattr(_direct, "CHUNK", 50)
    for kind in ("integer ties", "duplicates", "gaussian"):
        x, codebook = _data(kind, 237, 90, 12, seed=5)
        for _ in range(2):  # (a second call, with the buffer kept between calls)
            ids, dists = _nearest_cpu.nearest_cpu(x, codebook, "l2", "direct")
            want, best = _argmin64(x, codebook)
            assert torch.equal(ids, want)
            assert torch.equal(dists, best.float())


@needs_native
@pytest.mark.parametrize("scale_x, scale_c", [(1e-30, 1e-30), (1e-42, 1e-42), (1e18, 1e18), (1e18, 1e-18),
                                              (3e37, 3e37), (1e-20, 1.0)])
def test_direct_scan_at_extreme_magnitudes(scale_x, scale_c):
    # subnormal differences and squares (the bound's absolute term), squares past fp32's range
    # (an overflowed minimum keeps every codeword): still the float64 argmin of the raw inputs
    g = torch.Generator().manual_seed(1)
    codebook = (torch.randn(40, 24, generator=g) * scale_c).float()
    x = (torch.randn(33, 24, generator=g) * scale_x).float()
    x[:5] = codebook[:5]  # exact hits
    ids, dists = _nearest_cpu.nearest_cpu(x, codebook, "l2", "direct")
    want, best = _argmin64(x, codebook)
    assert torch.equal(ids, want)
    assert torch.equal(dists, best.float())


@needs_native
@pytest.mark.parametrize("metric", ["l2", "ip", "cos"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_direct_scan_takes_half_precision_rows(dtype, metric):
    # fp16 / bf16 rows widen to fp32 exactly: the float64 argmin of the half-precision values
    x, codebook = _data("near copies", 200, 300, 48, seed=9)
    x, codebook = x.to(dtype), codebook.to(dtype)
    assert _direct.takes(x, codebook, metric)
    ids, dists = _nearest_cpu.nearest_cpu(x, codebook, metric, "direct")
    assert_nearest_ok(ids, dists, x.float(), codebook.float(), metric, rel_tol=1e-12, abs_tol=1e-12)
    other_ids, other = _nearest_cpu.nearest_cpu(x.float(), codebook.float(), metric, "fp64")
    assert torch.equal(ids, other_ids) and torch.equal(dists, other)
    ids, _ = u2.nearest(x, codebook, metric=metric)
    assert torch.equal(ids, other_ids)


@needs_native
def test_a_codeword_whose_fp32_sum_overflows_stays_a_candidate():
    # the minimum's fp32 sum is finite but the limit passes fp32's range: a codeword whose own sum
    # overflowed (its exact distance 3.40282356780e38, just below the finite one's) must stay in
    f = float.fromhex
    codebook = torch.tensor([[f("0x1.ffffc2p+63"), f("0x1.f5e67ep+54")],  # the finite fp32 sum, farther
                             [f("0x1.fffffep+63"), f("0x1.3988e2p+52")]])  # the overflowing sum, nearer
    x = torch.zeros(3, 2)
    s32 = ((x[:1] - codebook) ** 2).sum(dim=1)
    assert bool(torch.isinf(s32[1])) and bool(torch.isfinite(s32[0]))  # (the case as described)
    ids, dists = _nearest_cpu.nearest_cpu(x, codebook, "l2", "direct")
    want, best = _argmin64(x, codebook)
    assert torch.equal(want, torch.ones(3, dtype=torch.int64)) and torch.equal(ids, want)
    assert torch.equal(dists, best.float())


@needs_native
def test_fp32_misorders_near_equidistant_codewords_and_the_certificate_keeps_them():
    # each query is the centre of 64 codewords on a sphere of radius 3 (equal in float64 before the
    # fp32 rounding of the codewords, so their distances differ by ~1e-7 relative): plain fp32 sums
    # pick a wrong one in most rows (a scan that trusted them, or a bound too tight, fails here);
    # the certified scan returns the float64 argmin of every row
    g = torch.Generator().manual_seed(8)
    n, per, d = 16, 64, 48
    centres = torch.randn(n, d, generator=g, dtype=torch.float64)
    u = torch.randn(n, per, d, generator=g, dtype=torch.float64)
    codebook = (centres[:, None, :] + 3.0 * u / u.norm(dim=2, keepdim=True)).reshape(n * per, d).float()
    x = centres.float()
    want, best = _argmin64(x, codebook)
    fp32_pick = ((x[:, None, :] - codebook[None]) ** 2).sum(dim=2).argmin(dim=1)
    assert int((fp32_pick != want).sum()) >= n // 4
    ids, dists = _nearest_cpu.nearest_cpu(x, codebook, "l2", "direct")
    assert torch.equal(ids, want)
    assert torch.equal(dists, best.float())


@needs_native
def test_masses_of_equidistant_codewords_past_the_near_list():
    # each query at the centre of a cube whose 2^7 = 128 corners are codewords: 128 exact ties,
    # more than the loop lists (DIRECT_NEAR_CAP), so torch ranks every codeword: the lowest wins
    d = 7
    corners = torch.cartesian_prod(*[torch.tensor([-1.0, 1.0])] * d)
    centres = (torch.randn(5, d, generator=torch.Generator().manual_seed(2)) * 100).round()  # far apart
    codebook = (centres[:, None, :] + corners[None]).reshape(-1, d)[torch.randperm(5 * 128, generator=torch.Generator().manual_seed(3))]
    x = torch.cat([centres, centres + 0.25])
    ids, dists = _nearest_cpu.nearest_cpu(x, codebook, "l2", "direct")
    want, best = _argmin64(x, codebook)
    assert torch.equal(ids, want)
    assert torch.equal(dists, best.float())
    _, _, near, count, flagged = _native.direct_l2(x, codebook, _native.direct_pack(codebook), 1.0 + 1e-12)
    assert bool((count[:5] == -1).all())  # the centres: more ties than listed
    assert flagged == int((count != 0).sum())


@needs_native
def test_only_near_ties_reach_torch_and_only_their_candidates(monkeypatch):
    # the certificate is relative to the distance itself: on photograph patches (flat regions,
    # near-duplicates) few queries need torch's order, and those only for their near candidates
    pairs = []
    original = _certified.pair_objective

    def counting(x, codebook, rows, cols, *args, **kwargs):
        pairs.append(rows.numel())
        return original(x, codebook, rows, cols, *args, **kwargs)

    monkeypatch.setattr("unicode2_fast._direct.pair_objective", counting)
    p = photo_patches(4096 + 256, 8, seed=5)
    codebook, x = p[:256].contiguous(), p[256:].contiguous()
    ids, dists = _nearest_cpu.nearest_cpu(x, codebook, "l2", "direct")
    assert_nearest_ok(ids, dists, x, codebook, "l2", exact=True)
    assert sum(pairs) <= 0.01 * x.shape[0] * codebook.shape[0]


@needs_native
def test_direct_scan_strided_rows_and_faiss_agreement():
    g = torch.Generator().manual_seed(3)
    codebook = torch.randn(64, 40, generator=g)
    x = torch.randn(300, 80, generator=g)[:, ::2]  # column stride 2
    ids, dists = u2.nearest(x, codebook)
    index = faiss.IndexFlatL2(40)
    index.add(codebook.numpy())
    fd, fi = index.search(x.contiguous().numpy(), 1)
    # well-separated Gaussian data: FAISS's fp32 answer is the exact one
    assert torch.equal(ids, torch.from_numpy(fi[:, 0]).long())
    assert torch.allclose(dists, torch.from_numpy(fd[:, 0]), rtol=1e-5)


@needs_native
def test_automatic_choice_takes_the_direct_scan_for_small_problems(monkeypatch):
    calls = []
    original = _direct.search
    monkeypatch.setattr(_direct, "search", lambda *a: calls.append(a[1].shape) or original(*a))
    g = torch.Generator().manual_seed(4)
    tiny_x, tiny_c = torch.randn(81, 64, generator=g), torch.randn(8, 64, generator=g)
    ids, dists = u2.nearest(tiny_x, tiny_c)
    assert_nearest_ok(ids, dists, tiny_x, tiny_c, "l2", exact=True)
    assert calls == [(8, 64)]
    for args in [(torch.randn(5, 64), torch.randn(_direct.MAX_K + 1, 64)),  # beyond MAX_K
                 (torch.randn(5, 64).double(), torch.randn(8, 64).double())]:  # float64: the other paths
        u2.nearest(*args)
    assert calls == [(8, 64)]
    dot_calls = []
    real_dot = _direct.search_dot
    monkeypatch.setattr(_direct, "search_dot", lambda *a: dot_calls.append(a[2]) or real_dot(*a))
    for metric in ("ip", "cos"):
        ids, dists = u2.nearest(tiny_x, tiny_c, metric=metric)
        assert_nearest_ok(ids, dists, tiny_x, tiny_c, metric, exact=True)
    assert dot_calls == ["ip", "cos"]
    big_x = torch.randn(20000, 192, generator=g)
    book = torch.randn(512, 192)
    assert not _direct.fits(big_x, book, "l2", lambda: True)  # the bf16 scan's faster dot products win
    assert _direct.fits(big_x, book, "l2", lambda: False)  # where it would not run, the direct scan
    assert _direct.fits(tiny_x, tiny_c, "l2", lambda: pytest.fail("not asked"))


@needs_native
def test_forced_direct_scan_refuses_what_it_cannot_take():
    for x, codebook, metric in [(torch.randn(3, 8).double(), torch.randn(_direct.MAX_K + 1, 8), "ip"),
                                (torch.randn(3, 8), torch.randn(_direct.MAX_K + 1, 8), "l2"),
                                (torch.randn(3, 8).double(), torch.randn(5, 8).double(), "l2"),
                                (torch.randn(3, 8).double(), torch.randn(5, 8), "l2")]:
        with pytest.raises(ValueError, match="direct scan takes"):
            _nearest_cpu.nearest_cpu(x, codebook, metric, "direct")
