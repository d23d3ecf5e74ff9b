"""u2.nearest's bf16 scan (unicode2_fast._scan_bf16, the compiled loop in _native): the exact float64
argmin (lowest index on ties) on random, tied, duplicate-heavy and flat-region data at several d,
its candidate lists bounded on real photographs, queries with too many candidates finished by the
other exact paths, and the automatic choice where the CPU or the inputs rule it out."""
import pytest
import torch

import unicode2_fast as u2
from unicode2_fast import _nearest_cpu, _native, _scan_bf16
from unicode2_fast.data import photo_patches, siglip_like

from reference import assert_nearest_ok, objective64

needs_scan = pytest.mark.skipif(not _scan_bf16.available(), reason="no AVX-512 BF16 (or no C compiler) here")


def _argmin64(x, codebook):
    truth = objective64(x, codebook, "l2")
    best, ids = truth.min(dim=1)  # the first minimum: the lowest index
    return ids, best


@needs_scan
@pytest.mark.parametrize("d", [1, 7, 31, 32, 33, 100, 192, 1152])
@pytest.mark.parametrize("data", ["gaussian", "integer ties", "duplicates", "near copies"])
def test_bf16_scan_is_the_float64_argmin(d, data):
    g = torch.Generator().manual_seed(d)
    k, n = 300, 150
    codebook = torch.randn(k, d, generator=g) * 3.0
    x = torch.randn(n, d, generator=g) * 3.0
    if data == "integer ties":  # many exact ties: integer points, exactly representable distances
        codebook, x = codebook.round().clamp(-2, 2), x.round().clamp(-2, 2)
    elif data == "duplicates":  # each row repeated: the lowest of the copies wins
        codebook = codebook[torch.randint(0, 40, (k,), generator=g)]
    elif data == "near copies":  # queries a hair away from codewords: tiny gaps
        x = codebook[torch.randint(0, k, (n,), generator=g)] + 1e-5 * torch.randn(n, d, generator=g)
    ids, dists = _nearest_cpu.nearest_cpu(x, codebook, "l2", "bf16")
    want, best = _argmin64(x, codebook)
    assert torch.equal(ids, want)
    assert torch.allclose(dists.double(), best, rtol=1e-6, atol=1e-30)


@needs_scan
@pytest.mark.parametrize("d, packed", [(1, 2), (7, 8), (16, 16), (31, 32), (33, 34), (192, 192)])
def test_rows_are_padded_to_an_even_length_only(d, packed):
    # the loop's work is panels x (packed / 2) steps: padding to 32 doubled it at d = 16
    g = torch.Generator().manual_seed(d)
    codebook, x = torch.randn(70, d, generator=g), torch.randn(9, d, generator=g)
    book = _scan_bf16.ScanCodebook(codebook, None)
    rows = _scan_bf16.PackedRows(x, book.center)
    assert book.dp == packed and rows.q.shape == (12, packed)
    assert book.panels.shape == (2, packed // 2, 64)
    assert torch.equal(rows.q[:9, :d].view(torch.bfloat16).float(), (x - book.center).bfloat16().float())
    assert bool((rows.q[:, d:] == 0).all()) and bool((rows.q[9:] == 0).all())


@needs_scan
def test_bf16_scan_on_flat_photograph_regions_and_masses_of_ties(monkeypatch):
    # sampled patches of photographs (flat regions: many near-equidistant codewords) and a mass of
    # equidistant codewords (the corners of a cube around each query) beyond the candidate cap
    p = photo_patches(3000, 8, seed=0)
    codebook, x = p[:2000].contiguous(), p[2000:].contiguous()
    ids, dists = _nearest_cpu.nearest_cpu(x, codebook, "l2", "bf16")
    assert_nearest_ok(ids, dists, x, codebook, "l2", exact=True)
    d = 8
    corners = torch.tensor([[(i >> b) & 1 for b in range(d)] for i in range(2 ** d)], dtype=torch.float32) * 2 - 1
    codebook = torch.cat([corners, corners * 3.0])  # 256 codewords at distance d, 256 farther
    x = torch.zeros(5, d)
    rest_sizes = []
    search = _scan_bf16.search

    def counted(*args, **kwargs):
        result = search(*args, **kwargs)
        rest_sizes.append(result[2].numel())
        return result

    monkeypatch.setattr(_scan_bf16, "search", counted)
    ids, dists = _nearest_cpu.nearest_cpu(x, codebook, "l2", "bf16")
    assert rest_sizes == [5]  # 256 ties > SCAN_CAP: every query went on to the other paths
    assert torch.equal(ids, torch.zeros(5, dtype=torch.int64))
    assert torch.equal(dists, torch.full((5,), float(d)))


def _candidates(x, codebook, book, cap=_scan_bf16.SCAN_CAP):
    """The compiled scan's candidate lists for ``x`` with the production bound factors."""
    rows = _scan_bf16.PackedRows(x, book.center)
    n = x.shape[0]
    cand = torch.empty(n, cap, dtype=torch.int32)
    lo = torch.empty(n, cap)
    count = torch.empty(n, dtype=torch.int32)
    _native.bf16_scan_l2(rows.q, n, book.panels, book.csq, book.pw, book.qw, book.sw, rows.aq, rows.rq, cand, lo, count)
    return cand, count


@needs_scan
def test_bf16_scan_keeps_few_candidates_on_real_and_synthetic_data():
    # the work the float64 re-rank does: candidates per query (not time)
    data = siglip_like(2000, 1024, 1152, seed=3)
    cases = [(data.codebook[:256].contiguous(), data.queries, 8.0, 0.0)]
    p = photo_patches(5000, 8, seed=4)
    cases.append((p[:4096].contiguous(), p[4096:].contiguous(), 40.0, 0.3))
    for codebook, x, mean_limit, rest_limit in cases:
        book = _scan_bf16.ScanCodebook(codebook, _nearest_cpu.first_of_duplicates(codebook))
        cand, count = _candidates(x, codebook, book)
        kept = count[count >= 0].double()
        assert (count < 0).double().mean() <= rest_limit
        assert kept.mean() <= mean_limit
        # every candidate list holds the exact nearest (distinct-row ids map back to codebook rows)
        want, _ = _argmin64(x, codebook)
        rows = (count > 0).nonzero().squeeze(1)
        for i in rows[:200].tolist():
            kept_ids = cand[i, :int(count[i])].long()
            kept_ids = kept_ids if book.ids is None else book.ids[kept_ids]
            assert int(want[i]) in kept_ids.tolist()


@needs_scan
def test_near_ties_from_summation_order_follow_the_float64_objective():
    # two codewords of the same coordinates in another order: their exact distances to 0 are
    # equal, their float64 sums differ in the last bit, and which is smaller depends on the order
    # of the sum; the scan must rank them as every other exact path (and the reference) does
    g = torch.Generator().manual_seed(8)
    mismatches = flips = 0
    for trial in range(20):
        base = torch.randn(16, generator=g) * 2.0 ** torch.randint(-20, 2, (16,), generator=g).float()
        pair = torch.stack([base, base[torch.randperm(16, generator=g)]])
        far = torch.randn(1000, 16, generator=g) * 10 + 50
        codebook = torch.cat([pair, far]).contiguous()
        x = torch.zeros(3, 16)
        want, _ = _argmin64(x, codebook)
        for kind in ("bf16", None):
            ids, _ = _nearest_cpu.nearest_cpu(x, codebook, "l2", kind)
            mismatches += int((ids != want).sum())
        # the compiled loop's own order, without the near-tie re-rank (margin 1): where it picks
        # the other codeword, the test has exercised the re-rank
        cand = torch.tensor([[0, 1]], dtype=torch.int32).repeat(3, 1)
        count = torch.full((3,), 2, dtype=torch.int32)
        own, dist, near = torch.empty(3, dtype=torch.int64), torch.empty(3, dtype=torch.float64), torch.empty(3, dtype=torch.int8)
        _native.rerank_l2_f64(x, codebook, None, cand, count, own, dist, near, 1.0)
        flips += int(own[0] != want[0])
    assert mismatches == 0
    assert flips > 0  # (the C order disagreed with torch's on some pairs)


@needs_scan
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bf16_scan_on_low_precision_and_strided_inputs(dtype):
    g = torch.Generator().manual_seed(9)
    codebook = torch.randn(700, 96, generator=g).to(dtype)
    x = torch.randn(90, 192, generator=g)[:, ::2].to(dtype)  # strided queries
    ids, dists = _nearest_cpu.nearest_cpu(x, codebook, "l2", "bf16")
    want, best = _argmin64(x.float(), codebook.float())
    assert torch.equal(ids, want)
    assert torch.allclose(dists.double(), best, rtol=1e-6)


@needs_scan
def test_bf16_scan_in_several_chunks_and_with_compacted_candidate_lists(monkeypatch):
    # chunks of 12 queries; a candidate cap of 4 that the panels fill and empty again: three equal
    # codewords in each of three panels, nearer panel by panel (the list is compacted as the bound
    # falls), and the queries' exact nearest are the last panel's
    monkeypatch.setattr(_scan_bf16, "SCAN_CHUNK", 12)
    monkeypatch.setattr(_scan_bf16, "SCAN_CAP", 4)
    d = 8
    codebook = torch.full((192, d), 100.0)
    for panel, radius in enumerate((10.0, 5.0, 1.0)):
        for j in range(3):
            codebook[64 * panel + 10 + j] = 0.0
            codebook[64 * panel + 10 + j, j] = radius
    x = torch.zeros(40, d)
    rests = []
    search = _scan_bf16.search
    monkeypatch.setattr(_scan_bf16, "search", lambda *a, **kw: (lambda r: rests.append(r[2].numel()) or r)(search(*a, **kw)))
    ids, dists = _nearest_cpu.nearest_cpu(x, codebook, "l2", "bf16")
    assert rests == [0]  # no query overflowed its four slots
    assert torch.equal(ids, torch.full((40,), 128 + 10))  # the lowest of the three ties at radius 1
    assert torch.equal(dists, torch.ones(40))
    g = torch.Generator().manual_seed(10)
    codebook, x = torch.randn(300, 40, generator=g), torch.randn(100, 40, generator=g)
    ids, _ = _nearest_cpu.nearest_cpu(x, codebook, "l2", "bf16")
    assert torch.equal(ids, _argmin64(x, codebook)[0])


@needs_scan
def test_bf16_scan_candidates_are_ascending_and_unique():
    g = torch.Generator().manual_seed(5)
    codebook = torch.randn(500, 64, generator=g)
    x = torch.randn(60, 64, generator=g)
    book = _scan_bf16.ScanCodebook(codebook, None)
    n = x.shape[0]
    q = torch.empty(n, book.dp, dtype=torch.int16)
    norm, resid = torch.empty(n, dtype=torch.float64), torch.empty(n, dtype=torch.float64)
    _native.bf16_pack_rows(x, book.center, q, norm, resid)
    cand = torch.empty(n, 16, dtype=torch.int32)
    lo = torch.empty(n, 16)
    count = torch.empty(n, dtype=torch.int32)
    # a huge bound (every pair within it): each list overflows its cap of 16
    big = torch.full((n,), 1e30)
    _native.bf16_scan_l2(q, n, book.panels, book.csq, book.pw, book.qw, book.sw, big, big, cand, lo, count)
    assert bool((count == -1).all())
    zero = torch.zeros(n)
    _native.bf16_scan_l2(q, n, book.panels, book.csq, book.pw, book.qw, book.sw, zero, zero, cand, lo, count)
    assert bool((count >= 1).all())
    for i in range(n):
        row = cand[i, :int(count[i])]
        assert bool((row[1:] > row[:-1]).all())


@needs_scan
def test_bf16_pack_rows_rounds_to_nearest_even_and_measures_the_error():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(10, 37, generator=g) * 100
    center = torch.randn(37, generator=g)
    out = torch.empty(12, 64, dtype=torch.int16)
    norm, resid = torch.empty(12, dtype=torch.float64), torch.empty(12, dtype=torch.float64)
    _native.bf16_pack_rows(x, center, out, norm, resid)
    shifted = x - center
    want = shifted.bfloat16().view(torch.int16)  # torch rounds to nearest even
    assert torch.equal(out[:10, :37], want)
    assert bool((out[:10, 37:] == 0).all()) and bool((out[10:] == 0).all())
    assert torch.allclose(norm[:10], shifted.double().norm(dim=1), rtol=1e-12)
    back = out[:10, :37].view(torch.bfloat16).double()
    assert torch.allclose(resid[:10], (shifted.double() - back).norm(dim=1), rtol=1e-12)


@needs_scan
def test_automatic_choice_takes_the_scan_for_small_l2_codebooks(monkeypatch):
    data = siglip_like(2000, 600, 256, seed=1)
    calls = []
    search = _scan_bf16.search
    monkeypatch.setattr(_scan_bf16, "search", lambda *a, **kw: calls.append(a[1].shape) or search(*a, **kw))
    ids, dists = u2.nearest(data.queries, data.codebook[:512])
    assert calls == [(512, 256)]
    assert_nearest_ok(ids, dists, data.queries, data.codebook[:512], "l2", exact=True)
    calls.clear()
    for metric in ("ip", "cos"):  # other metrics, float64 rows: not the scan
        u2.nearest(data.queries, data.codebook[:512], metric=metric)
    u2.nearest(data.queries.double(), data.codebook[:512].double())
    assert calls == []
    # tiny codebooks (64 x 16: the fp64 filter ran them at 0.05-0.3x FAISS) take the direct scan
    # (tests/test_direct.py) where it does less work, the bf16 scan where that does
    tiny_x, tiny_c = data.queries[:, :16].contiguous(), data.codebook[:64, :16].contiguous()
    ids, dists = u2.nearest(tiny_x, tiny_c)
    assert calls == []
    assert_nearest_ok(ids, dists, tiny_x, tiny_c, "l2", exact=True)
    many_x, small_c = data.queries.repeat(40, 1), data.codebook[:64]  # 24,000 queries at d = 256: the
    ids, dists = u2.nearest(many_x, small_c)  # bf16 scan's faster dot products pay for its fixed cost
    assert calls == [(64, 256)]
    assert_nearest_ok(ids[:600], dists[:600], data.queries, small_c, "l2", exact=True)


def test_without_the_bf16_instructions_the_other_paths_search(monkeypatch):
    monkeypatch.setattr(_scan_bf16, "available", lambda: False)
    data = siglip_like(2000, 300, 128, seed=2)
    ids, dists = u2.nearest(data.queries, data.codebook[:1024])
    assert_nearest_ok(ids, dists, data.queries, data.codebook[:1024], "l2", exact=True)
    with pytest.raises(ValueError, match="bf16 scan"):
        _nearest_cpu.nearest_cpu(data.queries, data.codebook[:1024], "l2", "bf16")


@needs_scan
def test_bf16_scan_refuses_inputs_it_cannot_bound_and_the_search_stays_exact():
    g = torch.Generator().manual_seed(7)
    codebook = torch.randn(400, 48, generator=g)
    for scale in (1e-15, 1e15):  # norms beyond 2^+-40: the other paths take them, still exact
        c, x = codebook * scale, torch.randn(50, 48, generator=g) * scale
        assert not _scan_bf16.ScanCodebook(c, None).usable
        ids, dists = _nearest_cpu.nearest_cpu(x, c, "l2")
        assert_nearest_ok(ids, dists, x, c, "l2", exact=True)
    # a usable codebook, queries out of range: the chunk goes to the other paths
    x = torch.randn(50, 48, generator=g) * 1e15
    assert _scan_bf16.search(x, codebook, _scan_bf16.ScanCodebook(codebook, None)) is None
    ids, dists = _nearest_cpu.nearest_cpu(x, codebook, "l2", "bf16")
    assert_nearest_ok(ids, dists, x, codebook, "l2", exact=True)
    with pytest.raises(ValueError, match="bf16 scan"):
        _nearest_cpu.nearest_cpu(torch.randn(5, 48), codebook, "ip", "bf16")


@needs_scan
def test_native_scan_checks_its_arguments():
    book = _scan_bf16.ScanCodebook(torch.randn(70, 40), None)
    q = torch.zeros(6, book.dp, dtype=torch.int16)
    ok = dict(cand=torch.empty(5, 4, dtype=torch.int32), cand_lo=torch.empty(5, 4), count=torch.empty(5, dtype=torch.int32))
    aq = torch.zeros(5)
    with pytest.raises(ValueError, match="inconsistent"):
        _native.bf16_scan_l2(q[:5], 5, book.panels, book.csq, book.pw, book.qw, book.sw, aq, aq, **ok)  # 5 rows: not a tile
    with pytest.raises(ValueError, match="int16"):
        _native.bf16_scan_l2(q.int(), 5, book.panels, book.csq, book.pw, book.qw, book.sw, aq, aq, **ok)
    with pytest.raises(ValueError, match="inconsistent"):
        _native.rerank_l2_f64(torch.zeros(5, 40), torch.zeros(3, 41), None, ok["cand"], ok["count"],
                              torch.empty(5, dtype=torch.int64), torch.empty(5, dtype=torch.float64),
                              torch.empty(5, dtype=torch.int8), 1.0)


@needs_scan
def test_queries_far_beyond_the_codebook_go_to_the_other_paths(monkeypatch):
    # ||x - m|| over 2^20 times every ||c - m||: float64's rounding of the distances could pass the
    # bf16 bound, so such queries are finished by the other exact paths
    g = torch.Generator().manual_seed(11)
    codebook = torch.randn(500, 32, generator=g) * 1e-3
    x = torch.cat([torch.randn(20, 32, generator=g) * 1e4, torch.randn(20, 32, generator=g) * 1e-3])
    rests = []
    search = _scan_bf16.search
    monkeypatch.setattr(_scan_bf16, "search", lambda *a, **kw: (lambda r: rests.append(r[2].tolist()) or r)(search(*a, **kw)))
    ids, dists = _nearest_cpu.nearest_cpu(x, codebook, "l2", "bf16")
    assert rests == [list(range(20))]
    assert torch.equal(ids, _argmin64(x, codebook)[0])
    assert_nearest_ok(ids, dists, x, codebook, "l2", exact=True)


@needs_scan
def test_returned_distances_equal_the_torch_order_objective():
    # the winner's float64 sum is re-ranked in torch's order wherever another order could round
    # it to another fp32 distance: distances bit for bit those of the other exact paths
    g = torch.Generator().manual_seed(12)
    codebook, x = torch.randn(2000, 100, generator=g), torch.randn(3000, 100, generator=g)
    ids, dists = _nearest_cpu.nearest_cpu(x, codebook, "l2", "bf16")
    truth = objective64(x, codebook, "l2")
    assert torch.equal(ids, truth.argmin(dim=1))
    assert torch.equal(dists, truth.gather(1, ids.unsqueeze(1)).squeeze(1).float())
