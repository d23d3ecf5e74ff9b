"""u2.nearest_grouped: every group's ids are the float64 argmin of that group's codebook (ties to
the lowest index) on every backend, for odd shapes, all dtypes, real-photo and tie-laden data;
the certified CPU path re-searches only what its fp32 pass cannot certify; bad input is refused."""
import numpy as np
import pytest
import torch

import unicode2_fast as u2
from unicode2_fast import _grouped_cpu
from unicode2_fast.data import near_duplicates

from reference import assert_nearest_ok, objective64

METRICS = ("l2", "ip", "cos")


def _data(n, groups, d, k, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, groups, d, generator=g).to(dtype), torch.randn(groups, k, d, generator=g).to(dtype))


def _check_groups(ids, dists, x, codebooks, metric, exact=True, rel_tol=2e-7):
    assert ids.shape == x.shape[:-1] and dists.shape == x.shape[:-1]
    assert ids.dtype == torch.int64 and dists.dtype == torch.float32
    groups, dim = codebooks.shape[0], codebooks.shape[-1]
    flat_x = x.reshape(-1, groups, dim)
    for g in range(groups):
        assert_nearest_ok(ids.reshape(-1, groups)[:, g], dists.reshape(-1, groups)[:, g], flat_x[:, g].float(),
                          codebooks[g].float(), metric, exact=exact, rel_tol=rel_tol)


@pytest.fixture
def researched(monkeypatch):
    """(group, query) pairs handed to the float64 settling step, per call."""
    calls = []
    original = _grouped_cpu.settle

    def counting(x, codebooks, pair_group, pair_row, cand_pair, cand_col, crowded, metric):
        calls.append(pair_group.numel())
        return original(x, codebooks, pair_group, pair_row, cand_pair, cand_col, crowded, metric)

    monkeypatch.setattr(_grouped_cpu, "settle", counting)
    return calls


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("n,groups,d,k", [(1, 1, 1, 1), (7, 3, 129, 300), (129, 8, 16, 1153), (33, 2, 7, 129)])
def test_cpu_matches_float64_per_group(n, groups, d, k, metric):
    x, codebooks = _data(n, groups, d, k, seed=n + k)
    ids, dists = u2.nearest_grouped(x, codebooks, metric)
    _check_groups(ids, dists, x, codebooks, metric)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_are_exact(dtype):
    x, codebooks = _data(40, 4, 24, 200, seed=3, dtype=dtype)
    ids, dists = u2.nearest_grouped(x, codebooks)
    _check_groups(ids, dists, x.double(), codebooks.double(), "l2")


def test_empty_queries_and_leading_shape():
    x, codebooks = _data(0, 3, 8, 20)
    ids, dists = u2.nearest_grouped(x, codebooks)
    assert ids.shape == (0, 3) and dists.shape == (0, 3)
    x, codebooks = _data(24, 3, 8, 20, seed=1)
    ids, _ = u2.nearest_grouped(x.view(2, 3, 4, 3, 8), codebooks)
    assert ids.shape == (2, 3, 4, 3)
    assert torch.equal(ids.reshape(24, 3), u2.nearest_grouped(x, codebooks)[0])


def test_numpy_in_numpy_out_and_codebook_sequences():
    x, codebooks = _data(30, 2, 10, 50, seed=4)
    ids, dists = u2.nearest_grouped(x.numpy(), codebooks.numpy())
    assert isinstance(ids, np.ndarray) and ids.dtype == np.int64 and dists.dtype == np.float32
    expected, _ = u2.nearest_grouped(x, codebooks)
    assert np.array_equal(ids, expected.numpy())
    listed, _ = u2.nearest_grouped(x, [u2.Codebook(codebooks[0]), codebooks[1].numpy()])
    assert torch.equal(listed, expected)


def test_non_contiguous_queries():
    x, codebooks = _data(50, 3, 16, 64, seed=5)
    strided = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, group-major memory
    assert not strided.is_contiguous()
    assert torch.equal(u2.nearest_grouped(strided, codebooks)[0], u2.nearest_grouped(x, codebooks)[0])


def test_exact_ties_go_to_the_lowest_index_across_blocks(monkeypatch, researched):
    # duplicated codewords in different score blocks (and in the same run of 128), queries on them
    monkeypatch.setattr(_grouped_cpu, "CODE_BLOCK", 256)
    monkeypatch.setattr(_grouped_cpu, "SCORE_ELEMENTS", 4096)
    x, codebooks = _data(60, 2, 12, 900, seed=6)
    for g in range(2):
        codebooks[g, 700] = codebooks[g, 3]
        codebooks[g, 300] = codebooks[g, 3]
        codebooks[g, 5] = codebooks[g, 4] * (1 + 2.0 ** -20)  # distinct, but within fp32 error
    x[:20, :] = codebooks[:, 3].unsqueeze(0) + 1e-3 * torch.randn(20, 2, 12)
    x[20:40, :] = codebooks[:, 4].unsqueeze(0)
    ids, dists = u2.nearest_grouped(x, codebooks)
    _check_groups(ids, dists, x, codebooks, "l2")
    assert bool((ids[:20] == 3).all()) and bool((ids[20:40] == 4).all())
    # exact copies are recognised (no tie to settle); the near copy needs the float64 step
    assert 20 * 2 <= sum(researched) <= 40 * 2


def test_only_uncertain_pairs_are_researched(researched):
    x, codebooks = _data(500, 4, 32, 512, seed=7)
    ids, dists = u2.nearest_grouped(x, codebooks)
    _check_groups(ids, dists, x, codebooks, "l2")
    # Gaussian data has clear winners: the fp32 pass certifies nearly every pair
    assert sum(researched) <= 0.02 * 500 * 4


def test_near_duplicates_and_photo_patches_are_exact(researched):
    dups = [near_duplicates(600, 200, 24, seed=s) for s in range(3)]
    x = torch.stack([d.queries for d in dups], dim=1)
    codebooks = torch.stack([d.codebook for d in dups])
    ids, dists = u2.nearest_grouped(x, codebooks)
    _check_groups(ids, dists, x, codebooks, "l2")
    assert 0 < sum(researched) < 200 * 3
    pytest.importorskip("skimage")
    from unicode2_fast.data import photo_patches

    patches = photo_patches(8 * 300 + 8 * 256, 6, gray=True, seed=1)
    x, codebooks = patches[:2400].view(300, 8, 36), patches[2400:].view(8, 256, 36)
    for metric in METRICS:
        ids, dists = u2.nearest_grouped(x, codebooks, metric)
        # flat patches are exactly parallel: cosine ties whose float64 value depends on the order
        # of operations, so cos is held to the near-tie rule -- and to u2.nearest's own answer
        _check_groups(ids, dists, x, codebooks, metric, exact=metric != "cos", rel_tol=1e-12 if metric == "cos" else 2e-7)
        for g in range(8):
            assert torch.equal(ids[:, g], u2.nearest(x[:, g], codebooks[g], metric)[0]), (metric, g)


def test_rounding_bound_covers_the_fp32_error():
    for scale in (1e-3, 1.0, 1e4):
        x, codebooks = _data(64, 3, 40, 300, seed=8)
        x, codebooks = x * scale + 3 * scale, codebooks * scale + 2 * scale
        for metric in METRICS:
            prep = _grouped_cpu._prepared(codebooks, metric, torch.float32)
            _, first, _, x_norm, _ = _grouped_cpu._top2(x, prep, metric, torch.float32)
            bound = _grouped_cpu._rounding_bound(x_norm, prep, metric)
            for g in range(3):
                # the scan's objective: centred on the group mean m, without the query's own terms
                xg, m = x[:, g].double(), prep.center[g]
                truth = objective64(xg, codebooks[g], metric)
                if metric == "l2":
                    truth = truth - (xg - m).pow(2).sum(dim=1, keepdim=True)
                elif metric == "ip":
                    truth = truth + (xg @ m).unsqueeze(1)
                else:
                    truth = truth - 1.0 + (xg / xg.norm(dim=1, keepdim=True) @ m).unsqueeze(1)
                error = (first[g].double() - truth.min(dim=1).values).abs()
                assert bool((error <= bound[g]).all()), (scale, metric)
                assert bool((bound[g] < 1e-3 * truth.abs().max()).all())  # and it is not vacuous


@pytest.mark.parametrize("scale", [1e12, 1e-30])
def test_extreme_magnitudes_give_valid_exact_ids(scale):
    x, codebooks = _data(50, 2, 16, 40, seed=9)
    ids, dists = u2.nearest_grouped(x * scale, codebooks * scale)
    # the argmin is scale-free; distances of 1e-60 are below float32's range and come back 0
    unscaled = dists.double() / scale ** 2 if scale > 1 else u2.nearest_grouped(x, codebooks)[1]
    _check_groups(ids, unscaled.float(), x, codebooks, "l2", rel_tol=1e-6)
    ids64, _ = u2.nearest_grouped((x * scale).double(), (codebooks * scale).double())
    assert torch.equal(ids64, ids)


def test_faiss_backend_agrees_up_to_near_ties():
    x, codebooks = _data(80, 4, 20, 100, seed=10)
    ids, dists = u2.nearest_grouped(x, codebooks, backend="faiss")
    _check_groups(ids, dists, x, codebooks, "l2", exact=False, rel_tol=1e-5)


@pytest.mark.parametrize("metric", METRICS)
def test_triton_kernel_under_the_interpreter(metric, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, codebooks = _data(37, 3, 19, 300, seed=11)
    x[:5, 1] = codebooks[1, 7]  # exact hits
    codebooks[1, 200] = codebooks[1, 7]  # a tie across blocks and splits: lowest index
    ids, dists = u2.nearest_grouped(x, codebooks, metric, backend="triton")
    _check_groups(ids, dists, x, codebooks, metric, exact=False, rel_tol=1e-5)
    assert bool((ids[:5, 1] == 7).all())
    half, _ = u2.nearest_grouped(x.half(), codebooks.half(), metric, backend="triton")
    _check_groups(half, u2.nearest_grouped(x.half(), codebooks.half(), metric)[1], x.half().float(),
                  codebooks.half().float(), metric, exact=False, rel_tol=2e-3)


def test_bad_input_is_refused():
    x, codebooks = _data(5, 2, 4, 6)
    with pytest.raises(ValueError, match=r"\(\.\.\., G, d\)"):
        u2.nearest_grouped(x[:, :1], codebooks)
    with pytest.raises(ValueError, match=r"\(\.\.\., G, d\)"):
        u2.nearest_grouped(x[..., :3], codebooks)
    with pytest.raises(ValueError, match="codebooks must be a"):
        u2.nearest_grouped(x, codebooks[0])
    with pytest.raises(ValueError, match="same K and d"):
        u2.nearest_grouped(x, [codebooks[0], codebooks[1, :5]])
    with pytest.raises(ValueError, match="empty"):
        u2.nearest_grouped(x, codebooks[:, :0])
    with pytest.raises(ValueError, match="empty sequence"):
        u2.nearest_grouped(x, [])
    bad = codebooks.clone()
    bad[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN|Inf|finite"):
        u2.nearest_grouped(x, bad)
    bad_x = x.clone()
    bad_x[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN|Inf|finite"):
        u2.nearest_grouped(bad_x, codebooks)
    with pytest.raises(TypeError):
        u2.nearest_grouped(x.long(), codebooks)
    with pytest.raises(ValueError, match="metric"):
        u2.nearest_grouped(x, codebooks, "hamming")
    with pytest.raises(ValueError, match="backend"):
        u2.nearest_grouped(x, codebooks, backend="cuvs")
    zero = x.clone()
    zero[1, 1] = 0.0
    with pytest.raises(ValueError, match="zero"):
        u2.nearest_grouped(zero, codebooks, "cos")


def test_a_mass_of_equidistant_codewords_is_capped_and_still_exact(monkeypatch):
    # black patches against a unit-norm codebook: every codeword is within the bound of every other
    from unicode2_fast import _certified

    monkeypatch.setattr(_certified, "CANDIDATE_CAP", 64)
    seen = []
    original = _grouped_cpu.settle

    def counting(x, codebooks, pair_group, pair_row, cand_pair, cand_col, crowded, metric):
        seen.append((pair_group.numel(), cand_pair.numel(), int(crowded.sum())))
        return original(x, codebooks, pair_group, pair_row, cand_pair, cand_col, crowded, metric)

    monkeypatch.setattr(_grouped_cpu, "settle", counting)
    v = torch.nn.functional.normalize(torch.randn(2, 300, 8, generator=torch.Generator().manual_seed(12)), dim=-1)
    codebooks = torch.cat([v, -v], dim=1)
    x = torch.zeros(40, 2, 8)
    ids, dists = u2.nearest_grouped(x, codebooks)
    _check_groups(ids, dists, x, codebooks, "l2")
    pairs, candidates, crowded = seen[0]
    assert pairs == 80 and crowded == 80 and candidates == 0  # nothing piled up: all went to the float64 scan


def test_triton_ids_are_row_major():
    x, codebooks = _data(5, 3, 16, 40, seed=13)
    ids, dists = u2.nearest_grouped(x, codebooks, backend="triton")
    assert ids.is_contiguous() and dists.is_contiguous()


@pytest.mark.parametrize("metric", METRICS)
def test_fast_int8_machine_searches_group_by_group_with_cached_statistics(metric, monkeypatch):
    # where the int8 GEMM is fast, each group goes to u2.nearest's certified int8 engine (one call
    # per group, on per-group copies built once), and the ids stay the float64 argmin
    from unicode2_fast import _nearest_cpu

    monkeypatch.setattr(_nearest_cpu, "choose_filter", lambda n, k, d: "int8")
    monkeypatch.setattr(_nearest_cpu, "SCAN_MAX_K", 0)  # (on AVX-512 BF16 CPUs the bf16 scan would take l2)
    monkeypatch.setattr(_nearest_cpu._direct, "MAX_K", 0)  # (and the direct scan these small l2 codebooks)
    built, searched = [], []
    real_stats, real_cpu = _nearest_cpu._CodebookStats, _nearest_cpu.nearest_cpu
    monkeypatch.setattr(_nearest_cpu, "_CodebookStats", lambda *a: built.append(1) or real_stats(*a))
    monkeypatch.setattr(_nearest_cpu, "nearest_cpu", lambda xq, c, m, *a: searched.append(c) or real_cpu(xq, c, m, *a))
    x, codebooks = _data(300, 4, 48, 700, seed=11)
    for _ in range(2):
        ids, dists = u2.nearest_grouped(x, codebooks, metric)
        _check_groups(ids, dists, x, codebooks, metric)
    assert len(searched) == 8 and all(searched[g] is searched[g + 4] for g in range(4))
    assert len(built) == 4  # one int8 statistics per group, reused by the second call
    # an in-place change of the codebooks rebuilds the copies: the answer follows the change
    codebooks[1, 5] = x[0, 1]
    ids, dists = u2.nearest_grouped(x, codebooks, metric)
    _check_groups(ids, dists, x, codebooks, metric)
    if metric != "ip":  # (ip: a longer codeword can beat the query itself)
        assert int(ids[0, 1]) == 5


def test_slow_int8_machine_keeps_the_batched_fp32_scan(monkeypatch, researched):
    from unicode2_fast import _nearest_cpu

    monkeypatch.setattr(_nearest_cpu, "choose_filter", lambda n, k, d: "flat")
    monkeypatch.setattr(_nearest_cpu, "nearest_cpu", lambda *a: pytest.fail("the batched scan should run"))
    x, codebooks = _data(300, 4, 48, 700, seed=12)
    ids, dists = u2.nearest_grouped(x, codebooks)
    _check_groups(ids, dists, x, codebooks, "l2")
