"""The shared Lloyd loop (unicode2_fast._lloyd): its iterations equal a plain float64 torch Lloyd,
its k-means is on par with faiss.Kmeans, and each empty-cluster policy does what it promises on
data where clusters really empty (a far-away centroid, duplicated rows, fewer distinct rows than k,
NaN / Inf means); plus the compaction of faiss.Kmeans results."""
import functools

import faiss
import numpy as np
import pytest
import torch

import unicode2_fast as u2
from unicode2_fast import _lloyd
from unicode2_fast._faiss import faiss_threads
from unicode2_fast.data import siglip_like


def _blobs(n_blobs=12, d=8, m=600, seed=0):
    """(m, d) rows of well-separated Gaussian blobs."""
    generator = torch.Generator().manual_seed(seed)
    centres = 5.0 * torch.randn(n_blobs, d, generator=generator)
    return centres[torch.arange(m) % n_blobs] + 0.3 * torch.randn(m, d, generator=generator)


def _reference_lloyd(x, centroids, niter):
    """Plain float64 Lloyd, for data where no cluster empties: the centroids, and the mean squared
    distance and ids of the last assignment."""
    # x: (n, d), centroids: (k, d)
    x64, c64 = x.double(), centroids.double()
    for _ in range(niter):
        best, ids = (x64.unsqueeze(1) - c64.unsqueeze(0)).pow(2).sum(dim=2).min(dim=1)  # over (n, k)
        assert torch.bincount(ids, minlength=c64.shape[0]).min() > 0, "the reference expects no empty cluster"
        c64 = torch.stack([x64[ids == j].mean(dim=0) for j in range(c64.shape[0])])
    return c64, float(best.mean()), ids


def _points(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def _mean(rows):
    # rows: (m, d) -> (d,) fp32 mean, summed in float64 as the loop does
    return rows.double().mean(dim=0).float()


def _sorted_rows(rows):
    return sorted(map(tuple, rows.tolist()))


# the loop -------------------------------------------------------------------------------------


def test_iterations_equal_a_float64_reference():
    x = _blobs()
    init = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1))[:8]]
    reported = []
    result = _lloyd.lloyd(x, init, 6, report=lambda iteration, objective: reported.append((iteration, objective)))
    expected, objective, ids = _reference_lloyd(x, init, 6)
    assert result.centroids.dtype == torch.float32 and result.centroids.shape == (8, 8)
    torch.testing.assert_close(result.centroids.double(), expected, rtol=0, atol=1e-5)
    assert result.objective == pytest.approx(objective, rel=1e-5)
    assert torch.equal(result.counts, torch.bincount(ids, minlength=8))
    assert [iteration for iteration, _ in reported] == list(range(6)) and reported[-1][1] == result.objective
    objectives = [value for _, value in reported]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(objectives, objectives[1:])), "Lloyd never raises the objective"


def test_assignment_step_is_pluggable():
    x = _blobs()
    calls = []

    def counting_assign(rows, centroids):
        calls.append(tuple(centroids.shape))
        return u2.nearest(rows, centroids)

    result = _lloyd.lloyd(x, x[:12], 4, assign=counting_assign)
    assert calls == [(12, 8)] * len(calls) and 1 <= len(calls) <= 4  # it may converge before 4
    # the build's FAISS assignments land on the same clusters as the exact default
    assert torch.equal(_lloyd.lloyd(x, x[:12], 4, assign=_lloyd.fast_assign).centroids, result.centroids)


def test_zero_iterations_return_the_initial_centroids():
    x = _blobs(m=50)
    result = _lloyd.lloyd(x, x[:5], 0)
    assert torch.equal(result.centroids, x[:5]) and np.isnan(result.objective)
    assert torch.equal(result.counts, torch.zeros(5, dtype=torch.int64))


def test_kmeans_is_on_par_with_faiss():
    data = siglip_like(200, 6000, 32, seed=2).queries
    ours, theirs = [], []
    with faiss_threads(1):  # milliseconds of work: more threads would only wait for the shared cores
        for seed in range(3):
            centroids, mse = _lloyd.kmeans(data, 100, 20, seed=seed, label="test")
            assert centroids.shape == (100, 32) and torch.unique(centroids, dim=0).shape[0] == 100
            ours.append(float(u2.nearest(data, centroids)[1].double().mean()))
            assert ours[-1] <= mse * (1 + 1e-6)  # the last update does not raise the objective
            km = faiss.Kmeans(32, 100, niter=20, seed=seed + 1, max_points_per_centroid=256)
            km.train(data.numpy())
            theirs.append(float(u2.nearest(data, torch.from_numpy(km.centroids))[1].double().mean()))
    print(f"training MSE: _lloyd.kmeans {np.round(ours, 4)}, faiss.Kmeans {np.round(theirs, 4)}")
    assert np.mean(ours) / np.mean(theirs) < 1.03


# the default policy: refill -------------------------------------------------------------------


# cluster A: six rows with mean (0.5, 0), its farthest member (3, 0), then (-1, 0); cluster B: three rows
_TWO_CLUSTERS = _points([0, 0], [1, 0], [-1, 0], [0, 1], [0, -1], [3, 0], [10, 0], [11, 0], [10, 1])


def test_refill_moves_an_emptied_centroid_to_the_largest_clusters_farthest_member():
    x = _TWO_CLUSTERS
    init = _points([0, 0], [10, 0], [100, 100])  # no row is near the third centroid: it empties at once
    result = _lloyd.lloyd(x, init, 1)
    assert result.counts.tolist() == [6, 3, 0]
    assert torch.equal(result.centroids[0], _mean(x[:6])) and torch.equal(result.centroids[1], _mean(x[6:]))
    a64 = x[:6].double()
    assert torch.equal(result.centroids[2], x[int((a64 - a64.mean(dim=0)).pow(2).sum(dim=1).argmax())])
    assert result.centroids[2].tolist() == [3.0, 0.0]
    assert _lloyd.lloyd(x, init, 2).counts.min() > 0  # the refilled centroid now has members


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), 1e300])  # 1e300: finite in fp64 only
def test_refill_drops_nan_and_inf_means(poison):
    x = _TWO_CLUSTERS
    ids = torch.tensor([0] * 6 + [1] * 3)
    means = torch.stack([x[:6].double().mean(dim=0), x[6:].double().mean(dim=0), torch.zeros(2, dtype=torch.float64)])
    means[1, 0] = poison
    counts = torch.tensor([6, 3, 0])
    update = _lloyd.Update(x, ids, means.float(), means, counts, counts == 0, u2.nearest, final=True)
    centroids = _lloyd.refill(update)
    # centroid 1 (not finite in fp32) is dropped and takes the farthest member (3, 0) of cluster 0,
    # the only good one; empty centroid 2 then takes cluster 0's member farthest from both its mean
    # and (3, 0): (-1, 0)
    assert centroids.tolist() == [_mean(x[:6]).tolist(), [3.0, 0.0], [-1.0, 0.0]]


def test_refill_takes_the_farthest_points_of_the_largest_cluster():
    x = _points([0, 0], [1, 0], [3, 0], [10, 0], [10, 1], [20, 0])
    ids = torch.tensor([0, 0, 0, 1, 1, 0])
    centroids = _points([5, 0], [10, 0.5], [float("nan"), 0], [0, 0])
    bad = torch.tensor([False, False, True, True])
    counts = torch.tensor([4, 2, 0, 0])
    used = torch.zeros(6, dtype=torch.bool)
    out = _lloyd._refill(centroids, bad, counts, x, ids, used, u2.nearest)
    # cluster 0 (4 members) is split first at its farthest member (20, 0); its weight halves to
    # 2, tying with cluster 1, so the lower index (0) donates again: the member farthest from both
    # its centroid and (20, 0) is (0, 0)
    assert out[2].tolist() == [20.0, 0.0] and out[3].tolist() == [0.0, 0.0]
    assert torch.equal(out[:2], centroids[:2])
    assert used.tolist() == [True, False, False, False, False, True]


def test_refill_spreads_centroids_over_duplicated_rows():
    x = _points([0, 0], [1, 1], [2, 0], [5, 5]).repeat(5, 1)
    # every centroid on the same row: after the first assignment (ties to the lowest index) all
    # rows are in cluster 0 and three clusters are empty; farthest-first never picks a copy twice
    result = _lloyd.lloyd(x, x[:1].repeat(4, 1), 3)
    assert _sorted_rows(result.centroids) == _sorted_rows(x[:4]) and result.objective == 0.0


def test_kmeans_with_exactly_k_distinct_points_and_too_few():
    x = _points([0, 0], [1, 1], [2, 0]).repeat(5, 1)
    centroids, mse = _lloyd.kmeans(x, 3, 5, seed=0, label="test")
    assert _sorted_rows(centroids) == [(0.0, 0.0), (1.0, 1.0), (2.0, 0.0)] and mse == 0.0
    with pytest.raises(ValueError, match="test: only 3 distinct points among its 15 training rows for 4"):
        _lloyd.kmeans(x, 4, 5, seed=0, label="test")
    # the loop itself, started on duplicates, runs out of rows to split: the same ValueError type
    with pytest.raises(ValueError):
        _lloyd.lloyd(x, x[:1].repeat(4, 1), 2)


def test_distinct_row_count():
    x = torch.randn(50, 7, generator=torch.Generator().manual_seed(0))
    assert _lloyd._distinct_row_count(x, 50) == 50
    assert _lloyd._distinct_row_count(torch.cat([x, x, -0.0 * x[:5] + x[:5]]), 10) >= 10
    assert _lloyd._distinct_row_count(torch.cat([x[:3], x[:3], torch.zeros(2, 7), -torch.zeros(1, 7)]), 10) == 4


# faiss.Kmeans results, compacted like the loop's ------------------------------------------------


class _FakeKmeans:
    """Stands in for faiss.Kmeans: returns fixed centroids, one NaN and two equal."""

    def __init__(self, d, k, **kwargs):
        self.k = k

    def train(self, x):
        self.centroids = np.array([[0.0, 0], [5, 5], [np.nan, 1], [5, 5]], dtype=np.float32)[:self.k]
        self.obj = [3.0, 2.0]


def test_faiss_results_are_compacted_like_the_loops(monkeypatch):
    monkeypatch.setattr(faiss, "Kmeans", _FakeKmeans)
    x = _points([0, 0], [1, 0], [5, 5], [6, 5], [9, 9])
    centroids, mse = _lloyd.faiss_kmeans(x, 4, 2, seed=0, label="cell")
    assert mse == 2.0 / 5 and torch.isfinite(centroids).all()
    assert torch.unique(centroids, dim=0).shape[0] == 4
    assert centroids[:2].tolist() == [[0.0, 0.0], [5.0, 5.0]]
    # the NaN row takes (9, 9), the farthest member of the largest cluster ([5, 5]: 3 members); its
    # weight halves to 2, tying with [0, 0], so the duplicate takes [0, 0]'s farthest member (1, 0)
    assert centroids[2:].tolist() == [[9.0, 9.0], [1.0, 0.0]]
    with pytest.raises(ValueError, match="cell: only 2 distinct points among its 6 training rows for 4"):
        _lloyd.faiss_kmeans(_points([0, 0], [5, 5], [-0.0, 0]).repeat(2, 1), 4, 2, seed=0, label="cell")


# the hierarchical index's policy: split_halves ---------------------------------------------------


def _split_reference(mean):
    # mean: (d,) fp64 -> the two halves (mean + delta, mean - delta) along the +-pattern, as fp32
    pattern = torch.ones_like(mean)
    pattern[1::2] = -1.0
    delta = 2.0 ** -10 * pattern * (mean.abs() + 2.0 ** -10)
    return (mean + delta).float(), (mean - delta).float()


def test_split_halves_gives_an_empty_cluster_half_of_the_largest():
    x = _TWO_CLUSTERS
    # centroid 1 duplicates centroid 0, so it loses every tie and empties at once
    init = _points([0, 0], [0, 0], [10, 0])
    result = _lloyd.lloyd(x, init, 1, repair=_lloyd.split_halves)
    assert result.counts.tolist() == [6, 0, 3]
    plus, minus = _split_reference(x[:6].double().mean(dim=0))
    assert torch.equal(result.centroids[1], plus) and torch.equal(result.centroids[0], minus)
    assert torch.equal(result.centroids[2], _mean(x[6:]))
    assert _lloyd.lloyd(x, init, 2, repair=_lloyd.split_halves).counts.min() > 0  # the halves split cluster A


def test_split_halves_goes_to_the_next_largest_after_a_split():
    # clusters of 6 and 4 rows, two empty centroids: the first halves the 6 (leaving 3), so the
    # second splits the 4
    x = torch.cat([_TWO_CLUSTERS[:6], _points([10, 0], [11, 0], [10, 1], [11, 1])])
    init = _points([0, 0], [10, 0], [100, 100], [-100, -100])
    centroids = _lloyd.lloyd(x, init, 1, repair=_lloyd.split_halves).centroids
    assert torch.equal(centroids[2], _split_reference(x[:6].double().mean(dim=0))[0])
    assert torch.equal(centroids[3], _split_reference(x[6:].double().mean(dim=0))[0])


def test_split_halves_accepts_fewer_distinct_rows_than_centroids():
    x = _points([0, 0], [4, 4]).repeat(10, 1)
    # where the default policy raises (see above), this one keeps going: clusters just stay empty
    result = _lloyd.lloyd(x, x[:1].repeat(5, 1), 4, repair=_lloyd.split_halves)
    assert torch.isfinite(result.centroids).all()
    assert int(result.counts.sum()) == 20 and int((result.counts > 0).sum()) <= 2


# the quantizer's policy: keep_previous, with and without the sphere ------------------------------


def test_keep_previous_leaves_an_unchosen_centroid_where_it_was():
    x = _TWO_CLUSTERS
    init = _points([0, 0], [10, 0], [100, 100])
    result = _lloyd.lloyd(x, init, 3, repair=_lloyd.keep_previous)
    assert result.counts.tolist() == [6, 3, 0]
    assert torch.equal(result.centroids, torch.stack([_mean(x[:6]), _mean(x[6:]), init[2]]))


def test_spherical_keep_previous_equals_a_float64_cosine_reference():
    generator = torch.Generator().manual_seed(3)
    directions = torch.nn.functional.normalize(torch.randn(4, 6, generator=generator), dim=1)
    x = torch.nn.functional.normalize(directions.repeat(25, 1) + 0.2 * torch.randn(100, 6, generator=generator), dim=1)
    init = torch.cat([x[:4], -directions.sum(dim=0, keepdim=True) / directions.sum(dim=0).norm()])  # the last: far from all
    result = _lloyd.lloyd(x, init, 3, assign=functools.partial(u2.nearest, metric="cos"),
                          repair=_lloyd.keep_previous, spherical=True)
    x64, c64 = x.double(), init.double()
    for _ in range(3):
        ids = (x64 @ c64.T).argmax(dim=1)
        for j in range(c64.shape[0]):
            if bool((ids == j).any()):
                c64[j] = torch.nn.functional.normalize(x64[ids == j].sum(dim=0), dim=0)
    assert result.counts[4] == 0 and torch.equal(result.centroids[4], init[4])
    torch.testing.assert_close(result.centroids.double(), c64, rtol=0, atol=1e-6)
    torch.testing.assert_close(result.centroids.norm(dim=1), torch.ones(5))


@pytest.mark.parametrize("policy", ["refill", "split_halves"])
def test_lloyd_stops_at_a_fixed_point_with_the_result_of_every_iteration(policy, monkeypatch):
    # an assignment equal to the last one (whose means became the centroids unchanged) repeats
    # forever: stopping there gives exactly the centroids of running all iterations, in fewer assignments
    x = _blobs()
    repair = getattr(_lloyd, policy)
    calls = []

    def counting_assign(rows, centroids):
        calls.append(1)
        return u2.nearest(rows, centroids)

    early = _lloyd.lloyd(x, x[:12], 30, assign=counting_assign, repair=repair)
    stopped_after = len(calls)
    assert stopped_after < 30
    real_equal = torch.equal
    monkeypatch.setattr(torch, "equal", lambda a, b: False)  # no fixed point is ever seen
    full = _lloyd.lloyd(x, x[:12], 30, assign=counting_assign, repair=repair)
    monkeypatch.undo()
    assert len(calls) == stopped_after + 30
    assert real_equal(early.centroids, full.centroids) and real_equal(early.counts, full.counts)
    assert early.objective == full.objective


def _exact_ids(x, centroids):
    return torch.cdist(x.double(), centroids.double()).argmin(dim=1)


def _assignment_rows(clustered):
    """(6000, 256) fp32 training rows: the clustered stress codebook or SigLIP-like ones."""
    if clustered:
        data = u2.data.clustered_codebook(6000, 10, 256, n_families=4, n_cells=30)
    else:
        data = siglip_like(6000, 10, 256, seed=3)
    return data.codebook.float().contiguous()


@pytest.mark.parametrize("clustered", [False, True])
def test_bf16_assignment_is_the_exact_one_where_it_certifies(clustered, monkeypatch):
    x = _assignment_rows(clustered)
    centroids = x[torch.randperm(6000, generator=torch.Generator().manual_seed(0))[:40]].contiguous()
    centroids = centroids + 0.01 * torch.randn(centroids.shape, generator=torch.Generator().manual_seed(1))
    sent = []
    real = _lloyd.fast_assign
    monkeypatch.setattr(_lloyd, "fast_assign", lambda rows, c: sent.append(rows.shape[0]) or real(rows, c))
    assign = _lloyd.Bf16Assign(x)
    ids, dists = assign(x, centroids)
    exact = _exact_ids(x, centroids)
    certified = torch.ones(x.shape[0], dtype=torch.bool)
    certified[assign.redo] = False
    # every certified row is the exact argmin; the others went to FAISS's fp32 scan, as before
    assert bool((ids[certified] == exact[certified]).all())
    assert sent == ([assign.ambiguous] if assign.ambiguous else []) and assign.redo.numel() == assign.ambiguous
    assert 0 < int(certified.sum())
    # certified rows' distances are the bf16 ones: within the bound the certificate used
    truth = (x.double() - centroids.double()[ids]).pow(2).sum(dim=1)
    shifted = centroids - assign.center
    bound = 2 * 2.0 ** -6 * assign.row_norm * float(shifted.norm(dim=1).max())
    assert bool(((dists.double() - truth).abs()[certified] <= bound[certified] + 1e-5).all())


def test_bf16_assignment_certifies_little_on_ties_and_then_rests(monkeypatch):
    x = torch.randn(3000, 64, generator=torch.Generator().manual_seed(0))
    centroids = torch.zeros(8, 64)  # every centroid ties: nothing can be certified
    calls = []
    real = _lloyd.fast_assign
    monkeypatch.setattr(_lloyd, "fast_assign", lambda rows, c: calls.append(rows.shape[0]) or real(rows, c))
    assign = _lloyd.Bf16Assign(x)
    for _ in range(8):
        ids, _ = assign(x, centroids)
        assert bool((ids == 0).all())  # the lowest index of the ties, as FAISS gives
    # two misses, then the bf16 scan is tried only on every BF16_RETRY_EVERY-th call
    assert calls[:2] == [3000, 3000] and len(calls) == 8
    assert assign.calls == 8


def test_training_assign_uses_bf16_only_where_it_is_fast(monkeypatch):
    x = torch.randn(40000, 64)
    monkeypatch.setattr(_lloyd._scan_bf16, "available", lambda: False)  # no AVX-512 BF16
    monkeypatch.setattr(_lloyd, "bf16_speedup", lambda: 1.0)
    assert _lloyd.training_assign(x, 100) is _lloyd.fast_assign
    monkeypatch.setattr(_lloyd, "bf16_speedup", lambda: 4.0)
    assert isinstance(_lloyd.training_assign(x, 100), _lloyd.Bf16Assign)
    assert _lloyd.training_assign(x.double(), 100) is _lloyd.fast_assign
    assert _lloyd.training_assign(x[:10], 100) is _lloyd.fast_assign  # too small to pay
    monkeypatch.setattr(_lloyd._scan_bf16, "available", lambda: True)  # with it: the exact scan
    assert isinstance(_lloyd.training_assign(x, 100), _lloyd.ScanAssign)
    assert _lloyd.training_assign(x.double(), 100) is _lloyd.fast_assign
    assert _lloyd.training_assign(x[:10], 100) is _lloyd.fast_assign


needs_scan = pytest.mark.skipif(not _lloyd._scan_bf16.available(), reason="no AVX-512 BF16 (or no C compiler) here")


def _argmin64(x, centroids):
    from reference import objective64
    return objective64(x, centroids, "l2").argmin(dim=1)  # torch's float64 sums; the first minimum


@needs_scan
@pytest.mark.parametrize("clustered", [False, True])
def test_scan_assignment_is_the_exact_one_every_call(clustered, monkeypatch):
    x = _assignment_rows(clustered)
    sent = []
    real = _lloyd.fast_assign
    monkeypatch.setattr(_lloyd, "fast_assign", lambda rows, c: sent.append(rows.shape[0]) or real(rows, c))
    monkeypatch.setattr(_lloyd._scan_bf16, "SCAN_CHUNK", 1200)  # five chunks of the packed rows
    assign = _lloyd.ScanAssign(x)
    g = torch.Generator().manual_seed(0)
    centroids = x[torch.randperm(6000, generator=g)[:40]].contiguous()
    for step in range(3):  # new centroids every call, the rows packed once
        centroids = centroids + 0.01 * torch.randn(centroids.shape, generator=g)
        ids, dists = assign(x, centroids)
        assert torch.equal(ids, _argmin64(x, centroids))
        truth = (x.double() - centroids.double()[ids]).pow(2).sum(dim=1)
        assert torch.allclose(dists.double(), truth, rtol=1e-6)
        assert sum(sent) == 0  # every row settled by the scan itself
    # the rows changed in place: packed again, not the stale bf16 rows
    x[:3000] = x[3000:].flip(0)
    ids, _ = assign(x, centroids)
    assert torch.equal(ids, _argmin64(x, centroids)) and sum(sent) == 0
    # other rows than the packed ones: the plain assignment
    other = x[:100].clone()
    ids, _ = assign(other, centroids)
    assert sent[-1] == 100 and torch.equal(ids, _argmin64(other, centroids))


@needs_scan
def test_scan_assignment_hands_masses_of_tied_centroids_on():
    x = torch.randn(3000, 64, generator=torch.Generator().manual_seed(0))
    centroids = torch.zeros(200, 64)  # every centroid ties: more candidates than the scan keeps
    assign = _lloyd.ScanAssign(x)
    ids, dists = assign(x, centroids)
    assert bool((ids == 0).all()) and assign.rest == 3000
    assert torch.allclose(dists.double(), x.double().pow(2).sum(dim=1), rtol=1e-6)


@pytest.mark.parametrize("scale", [1e-30, 1e15])
def test_bf16_assignment_is_exact_at_extreme_magnitudes(scale):
    data = siglip_like(3000, 10, 64, seed=4)
    x = (data.codebook.double() * scale).float().contiguous()
    centroids = x[:: 75].contiguous() * 1.001
    assign = _lloyd.Bf16Assign(x)
    ids, _ = assign(x, centroids)
    certified = torch.ones(x.shape[0], dtype=torch.bool)
    certified[assign.redo] = False
    exact = _exact_ids(x, centroids)
    assert bool((ids[certified] == exact[certified]).all())
