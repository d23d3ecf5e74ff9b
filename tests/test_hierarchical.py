"""u2.HierarchicalIndex: exact mode equals u2.nearest, approximate recall, the grouped Triton kernel
(interpreter) against the torch path, persistence and bad input."""
import os

import numpy as np
import pytest
import torch

import unicode2_fast as u2
from unicode2_fast import _certified, hierarchical
from unicode2_fast.data import siglip_like
from unicode2_fast.kernels import hierarchical as kernel

from reference import assert_nearest_ok

interpret = os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(
    not (interpret or torch.cuda.is_available()), reason="needs CUDA or TRITON_INTERPRET=1"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def clustered():
    # two-level data as in SigLIP features, small d: 48 generator cells, re-clustered by k-means
    return siglip_like(3000, 257, d=32, n_coarse=48, seed=1)


@pytest.fixture(scope="module")
def clustered_index(clustered):
    return u2.HierarchicalIndex.build(clustered.codebook, n_coarse=48, niter=8, seed=0)


def _assert_same_as_nearest(index, x, codebook):
    ids, dists = index.search(x, exact=True)
    ref_ids, ref_dists = u2.nearest(x, codebook)
    assert ids.dtype == torch.int64 and dists.dtype == torch.float32
    assert torch.equal(ids, ref_ids), (ids != ref_ids).nonzero().squeeze(1)[:10].tolist()
    assert torch.equal(dists, ref_dists)


# --- exact mode -------------------------------------------------------------------------------

def test_exact_equals_nearest_on_clustered_data(clustered, clustered_index, monkeypatch):
    calls = []
    real_nearest = hierarchical.nearest
    monkeypatch.setattr(hierarchical, "nearest", lambda *a, **k: calls.append(1) or real_nearest(*a, **k))
    _assert_same_as_nearest(clustered_index, clustered.queries, clustered.codebook)
    assert calls == []  # tight cells: every query is certified by its cell scans, no flat fallback
    assert_nearest_ok(*clustered_index.search(clustered.queries, exact=True), clustered.queries, clustered.codebook,
                      "l2", exact=True, rel_tol=2e-7)


def test_exact_equals_nearest_on_random_data_with_and_without_fallback(monkeypatch):
    g = torch.Generator().manual_seed(3)
    codebook, x = torch.randn(2000, 16, generator=g), torch.randn(131, 16, generator=g)
    index = u2.HierarchicalIndex.build(codebook, n_coarse=24, niter=5)
    _assert_same_as_nearest(index, x, codebook)  # loose bounds: queries finish with u2.nearest
    # rounds run to the end however loose the bounds: every surviving cell is scanned
    monkeypatch.setattr(hierarchical, "FALLBACK_FRACTION", 2.0)
    monkeypatch.setattr(hierarchical, "EXACT_MISSES", 10 ** 9)  # the cells every time, however much they scan
    monkeypatch.setattr(hierarchical, "nearest", None)  # a fallback would now fail loudly
    ids, dists = index.search(x, exact=True)
    ref_ids, ref_dists = u2.nearest(x, codebook)
    assert torch.equal(ids, ref_ids) and torch.equal(dists, ref_dists)


def test_exact_ties_and_near_ties_across_cells():
    # Duplicates of codewords placed in other cells, at higher ids, and copies within 1e-6 (far
    # below the fp32 filter's error bound): exact mode must return u2.nearest's id, the lowest on ties.
    g = torch.Generator().manual_seed(4)
    base = torch.randn(600, 24, generator=g)
    codebook = torch.cat([base, base[:200], base[200:400] + 1e-6 * torch.randn(200, 24, generator=g)])
    coarse_ids = torch.arange(codebook.shape[0]) % 16  # every copy lands in another cell than its original
    centroids = torch.stack([codebook[coarse_ids == c].mean(dim=0) for c in range(16)])
    index = u2.HierarchicalIndex(codebook, centroids, coarse_ids)
    x = torch.cat([base[:400], base[:400] + 1e-3 * torch.randn(400, 24, generator=g)])
    _assert_same_as_nearest(index, x, codebook)
    ids, _ = index.search(base[:200], exact=True)
    assert torch.equal(ids, torch.arange(200))


def test_exact_low_precision_and_float64_inputs(clustered):
    codebook = clustered.codebook.to(torch.bfloat16)
    index = u2.HierarchicalIndex(codebook, clustered.coarse_centroids, clustered.coarse_ids)
    for x in (clustered.queries, clustered.queries.to(torch.float16), clustered.queries.double()):
        _assert_same_as_nearest(index, x, codebook)


def test_exact_candidate_cap_falls_back(monkeypatch):
    # every codeword equidistant from the query: candidates overflow the cap, u2.nearest finishes
    monkeypatch.setattr(_certified, "CANDIDATE_CAP", 8)
    codebook = torch.ones(500, 16)
    codebook[300] = 0.5
    index = u2.HierarchicalIndex(codebook, torch.ones(2, 16), (torch.arange(500) >= 250).long())
    ids, dists = index.search(torch.cat([torch.ones(2, 16), torch.full((1, 16), 0.5)]), exact=True)
    assert ids.tolist() == [0, 0, 300] and dists.tolist() == [0.0, 0.0, 0.0]


def test_exact_query_chunks(clustered, clustered_index, monkeypatch):
    monkeypatch.setattr(hierarchical, "QUERY_CHUNK", 50)
    monkeypatch.setattr(_certified, "RERANK_CHUNK", 7)
    _assert_same_as_nearest(clustered_index, clustered.queries, clustered.codebook)


@pytest.mark.parametrize("n,k,d,n_coarse", [(1, 1, 1, 1), (7, 7, 7, 3), (129, 1153, 33, 17), (5, 300, 1152, 4)])
def test_odd_shapes(n, k, d, n_coarse):
    g = torch.Generator().manual_seed(n + k + d)
    codebook, x = torch.randn(k, d, generator=g), torch.randn(n, d, generator=g)
    index = u2.HierarchicalIndex.build(codebook, n_coarse=n_coarse, niter=3)
    _assert_same_as_nearest(index, x, codebook)
    ids, dists = index.search(x, nprobe=n_coarse)
    assert_nearest_ok(ids, dists, x, codebook, "l2", rel_tol=1e-6)


# --- approximate mode -------------------------------------------------------------------------

def test_full_probe_equals_nearest(clustered, clustered_index):
    ids, dists = clustered_index.search(clustered.queries, nprobe=clustered_index.n_coarse, backend="torch")
    ref_ids, ref_dists = u2.nearest(clustered.queries, clustered.codebook)
    assert torch.equal(ids, ref_ids)
    assert torch.equal(dists, ref_dists)  # distances are recomputed in float64 from the vectors


def test_recall_increases_with_nprobe(clustered, clustered_index):
    ref_ids, _ = u2.nearest(clustered.queries, clustered.codebook)
    recalls = []
    for nprobe in (1, 2, 4, 8, 48):
        ids, dists = clustered_index.search(clustered.queries, nprobe=nprobe)
        true = (clustered.queries.double() - clustered.codebook[ids].double()).pow(2).sum(dim=1)
        assert torch.equal(dists, true.float())  # the returned ids' distances, from float64
        recalls.append(float((ids == ref_ids).double().mean()))
    assert all(a <= b for a, b in zip(recalls, recalls[1:])), recalls
    assert recalls[0] < 1.0 and recalls[-1] == 1.0, recalls
    assert recalls[2] >= 0.9, recalls


def test_default_nprobe_is_capped_by_n_coarse():
    g = torch.Generator().manual_seed(5)
    codebook = torch.randn(300, 8, generator=g)
    index = u2.HierarchicalIndex.build(codebook, n_coarse=4, niter=3)
    ids, _ = index.search(codebook[:20])  # default nprobe 8 > 4 cells: every cell is probed
    assert torch.equal(ids, torch.arange(20))


def test_leading_shape_numpy_and_empty(clustered, clustered_index):
    x = clustered.queries[:24].reshape(2, 3, 4, 32)
    for exact in (False, True):
        ids, dists = clustered_index.search(x, nprobe=4, exact=exact)
        assert ids.shape == (2, 3, 4) and dists.shape == (2, 3, 4)
        ids_np, dists_np = clustered_index.search(x.numpy(), nprobe=4, exact=exact)
        assert isinstance(ids_np, np.ndarray) and ids_np.dtype == np.int64 and dists_np.dtype == np.float32
        assert np.array_equal(ids_np, ids.numpy())
        empty_ids, empty_dists = clustered_index.search(torch.empty(0, 32), exact=exact)
        assert empty_ids.shape == (0,) and empty_dists.shape == (0,)


# --- the grouped Triton kernel ----------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("d,nprobe", [(33, 3), (16, 1), (24, 16)])
def test_triton_kernel_matches_torch_path(d, nprobe):
    # fp32 under the interpreter; d = 33 exercises the zero-padded row layout, an empty cell and
    # cells larger than BLOCK_K / with more queries than BLOCK_Q exercise the tiling
    data = siglip_like(700, 45, d=d, n_coarse=16, seed=d)
    coarse_ids = data.coarse_ids.clone()
    coarse_ids[coarse_ids == 5] = 6  # cell 5 is empty
    index = u2.HierarchicalIndex(data.codebook, data.coarse_centroids, coarse_ids).to(DEVICE)
    x = data.queries.to(DEVICE)
    ids_t, dists_t = index.search(x, nprobe=nprobe, backend="triton")
    ids_c, dists_c = index.to("cpu").search(data.queries, nprobe=nprobe, backend="torch")
    assert torch.equal(ids_t.cpu(), ids_c)
    assert torch.equal(dists_t.cpu(), dists_c)
    probes = index._probe(x.float(), nprobe)
    val_t, pos_t = index._scan_triton(x, probes)
    val_c, pos_c = index._scan_torch(x.float(), probes)
    assert torch.equal(pos_t, pos_c)
    empty = val_c == float("inf")  # probes of the empty cell
    assert torch.equal(val_t == float("inf"), empty) and bool(empty.any()) == (nprobe == 16)
    # both score the whole squared distance in residual form, relative to the cell centroid m: they
    # agree within the fp32 rounding of that form, which scales with ||x - m|| and the cell radius
    val_t, val_c = val_t.double().masked_fill(empty, 0.0), val_c.double().masked_fill(empty, 0.0)
    m = index.coarse_centroids.double().cpu()[probes.cpu()]  # (N, nprobe, d)
    to_cell = (data.queries.double().unsqueeze(1) - m).norm(dim=2)
    radius = index._radius.cpu()[probes.cpu()]
    scale = (to_cell + radius).pow(2).to(val_t.device)
    assert bool(((val_t - val_c).abs() <= 8 * (d + 2) * 2.0 ** -24 * scale + 1e-6).all())


@needs_triton
def test_triton_scan_is_in_residual_form_on_tight_cells_far_from_the_origin():
    # the plain expansion ||c||^2 - 2 <x, c> cancels on such cells (the torch scan returned a
    # farther codeword of the right cell for 21-40% of the queries before it moved to residual form)
    from unicode2_fast import data

    d = data.clustered_codebook(1500, 60, 64, n_families=4, n_cells=20)
    index = u2.HierarchicalIndex.build(d.codebook, n_coarse=20, niter=5).to(DEVICE)
    ids_t, dists_t = index.search(d.queries.to(DEVICE), nprobe=2, backend="triton")
    ids_c, dists_c = index.to("cpu").search(d.queries, nprobe=2, backend="torch")
    assert torch.equal(ids_t.cpu(), ids_c)
    exact, _ = u2.nearest(d.queries, d.codebook)
    assert (ids_c == exact).float().mean() > 0.95


def test_work_items_tile_cells_largest_first():
    cell_offsets = torch.tensor([0, 10, 10, 300, 310], dtype=torch.int64)  # sizes 10, 0, 290, 10
    probes = torch.tensor([[2, 0], [2, 3], [0, 2], [2, 1], [3, 2]], dtype=torch.int64)
    pair_query, pair_slot, item_cell, item_start, item_stop = kernel.work_items(probes, cell_offsets, block_q=2)
    assert item_cell.tolist() == [2, 2, 2, 0, 3, 1]  # largest cell first, equal sizes by cell id
    assert (item_stop - item_start).tolist() == [2, 2, 1, 2, 2, 1]
    assert all(t.dtype == torch.int64 for t in (pair_query, pair_slot, item_cell, item_start, item_stop))
    for cell, start, stop in zip(item_cell.tolist(), item_start.tolist(), item_stop.tolist()):
        slots = pair_slot[start:stop]
        assert bool((probes.reshape(-1)[slots] == cell).all())
        assert torch.equal(pair_query[start:stop], slots // 2)
    # every pair belongs to exactly one item
    covered = torch.cat([torch.arange(a, b) for a, b in zip(item_start.tolist(), item_stop.tolist())])
    assert sorted(covered.tolist()) == list(range(10))


def test_work_items_offsets_past_int32():
    # a cell that starts past 2^31 codewords: offsets and item ranges stay exact in int64
    big = 2 ** 31 + 5
    cell_offsets = torch.tensor([0, big, big + 3], dtype=torch.int64)
    probes = torch.tensor([[1], [0], [1]], dtype=torch.int64)
    _, pair_slot, item_cell, item_start, item_stop = kernel.work_items(probes, cell_offsets, block_q=64)
    assert item_cell.tolist() == [0, 1] and item_start.tolist() == [0, 1] and item_stop.tolist() == [1, 3]
    assert pair_slot.tolist() == [1, 0, 2]


def test_triton_backend_on_cpu_without_interpreter_is_refused(clustered_index, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        clustered_index.search(torch.zeros(1, 32), backend="triton")


# --- construction -----------------------------------------------------------------------------

def test_from_codebook_uses_meta(clustered, tmp_path):
    cb = u2.Codebook(clustered.codebook, meta={"coarse_ids": clustered.coarse_ids,
                                               "coarse_centroids": clustered.coarse_centroids})
    cb.save(tmp_path / "cb.safetensors")
    for codebook in (cb, u2.Codebook.load(tmp_path / "cb.safetensors")):
        index = u2.HierarchicalIndex.from_codebook(codebook)
        assert index.n_coarse == 48 and index.ntotal == 3000 and index.dim == 32
        assert torch.equal(index.coarse_ids, clustered.coarse_ids)
        assert torch.equal(index.coarse_centroids, clustered.coarse_centroids)
        assert int(index.cell_sizes.sum()) == 3000
        _assert_same_as_nearest(index, clustered.queries, clustered.codebook)


def test_build_is_deterministic_and_assigns_nearest_centroid(clustered, clustered_index):
    again = u2.HierarchicalIndex.build(clustered.codebook, n_coarse=48, niter=8, seed=0)
    assert torch.equal(again.coarse_centroids, clustered_index.coarse_centroids)
    assert torch.equal(again.coarse_ids, clustered_index.coarse_ids)
    ref, _ = u2.nearest(clustered.codebook, clustered_index.coarse_centroids)
    assert torch.equal(clustered_index.coarse_ids, ref)
    other = u2.HierarchicalIndex.build(clustered.codebook, n_coarse=48, niter=8, seed=1)
    assert not torch.equal(other.coarse_centroids, clustered_index.coarse_centroids)


def test_build_splits_empty_clusters_and_keeps_exactness():
    # 10 distinct codewords, each repeated: most of the 16 clusters start or end empty
    g = torch.Generator().manual_seed(6)
    codebook = torch.randn(10, 8, generator=g).repeat(30, 1)
    index = u2.HierarchicalIndex.build(codebook, n_coarse=16, niter=4)
    assert index.n_coarse == 16 and int((index.cell_sizes > 0).sum()) <= 10
    x = torch.randn(40, 8, generator=g)
    _assert_same_as_nearest(index, x, codebook)
    ids, _ = index.search(x, nprobe=16)
    assert torch.equal(ids, u2.nearest(x, codebook)[0])


# --- persistence ------------------------------------------------------------------------------

def test_save_load_round_trip(clustered, clustered_index, tmp_path):
    path = tmp_path / "index.safetensors"
    clustered_index.save(path)
    assert not [p for p in tmp_path.iterdir() if p.name != "index.safetensors"]  # no temporaries left
    loaded = u2.HierarchicalIndex.load(path)
    assert (loaded.ntotal, loaded.dim, loaded.n_coarse, loaded.metric) == (3000, 32, 48, "l2")
    assert torch.equal(loaded.coarse_ids, clustered_index.coarse_ids)
    assert torch.equal(loaded.coarse_centroids, clustered_index.coarse_centroids)
    assert torch.equal(loaded._radius, clustered_index._radius)
    for kwargs in (dict(nprobe=2), dict(exact=True)):
        a, b = loaded.search(clustered.queries, **kwargs), clustered_index.search(clustered.queries, **kwargs)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    _assert_same_as_nearest(loaded, clustered.queries, clustered.codebook)  # un-permuted codebook for fallback
    assert torch.equal(loaded._original_codebook(), clustered.codebook)


def test_load_rejects_bad_files(clustered, clustered_index, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        u2.HierarchicalIndex.load(tmp_path / "missing.safetensors")
    with pytest.raises(IsADirectoryError, match="directory"):
        u2.HierarchicalIndex.load(tmp_path)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not safetensors at all" * 10)
    with pytest.raises(ValueError, match="garbage.safetensors: not a valid safetensors file"):
        u2.HierarchicalIndex.load(garbage)
    path = tmp_path / "index.safetensors"
    clustered_index.save(path)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated.safetensors: not a valid safetensors file"):
        u2.HierarchicalIndex.load(truncated)
    foreign = tmp_path / "codebook.safetensors"
    u2.Codebook(clustered.codebook).save(foreign)
    with pytest.raises(ValueError, match="codebook.safetensors is not a unicode2_fast hierarchical index"):
        u2.HierarchicalIndex.load(foreign)


def test_load_rejects_inconsistent_tensors(clustered_index, tmp_path):
    import safetensors.torch

    header = {"format": hierarchical.FORMAT, "version": hierarchical.VERSION, "metric": "l2"}
    good = {
        "codes": clustered_index._codes, "perm": clustered_index._perm,
        "cell_offsets": clustered_index._cell_offsets, "coarse_centroids": clustered_index.coarse_centroids,
    }
    cases = [
        (dict(perm=clustered_index._perm[:-1]), "perm must be"),
        (dict(perm=torch.zeros(3000, dtype=torch.int64)), "not a permutation"),
        (dict(cell_offsets=clustered_index._cell_offsets[:-1]), "cell_offsets must be"),
        (dict(coarse_centroids=torch.zeros(48, 31)), "coarse_centroids has shape"),
        (dict(codes=torch.full((3000, 32), float("nan"))), "non-finite"),
    ]
    for i, (change, match) in enumerate(cases):
        path = tmp_path / f"bad{i}.safetensors"
        tensors = {name: tensor.contiguous() for name, tensor in {**good, **change}.items()}
        safetensors.torch.save_file(tensors, str(path), metadata=header)
        with pytest.raises(ValueError, match=f"bad{i}.safetensors: invalid stored hierarchical index: .*{match}"):
            u2.HierarchicalIndex.load(path)
    path = tmp_path / "incomplete.safetensors"
    safetensors.torch.save_file({"codes": clustered_index._codes}, str(path), metadata=header)
    with pytest.raises(ValueError, match=r"tensors \['perm', 'cell_offsets', 'coarse_centroids'\] are missing"):
        u2.HierarchicalIndex.load(path)


# --- bad input --------------------------------------------------------------------------------

def test_bad_input_names_the_problem(clustered, clustered_index):
    codebook = clustered.codebook
    with pytest.raises(ValueError, match="n_coarse must be in \\[1, 3000\\], got 3001 .*cannot exceed"):
        u2.HierarchicalIndex.build(codebook, n_coarse=3001)
    with pytest.raises(ValueError, match="n_coarse must be in"):
        u2.HierarchicalIndex.build(codebook, n_coarse=0)
    with pytest.raises(ValueError, match="unknown metric 'hamming'"):
        u2.HierarchicalIndex.build(codebook, n_coarse=4, metric="hamming")
    with pytest.raises(ValueError, match="dimension mismatch: x has last dimension 31"):
        clustered_index.search(torch.zeros(3, 31))
    with pytest.raises(ValueError, match="nprobe must be in \\[1, 48\\], got 0"):
        clustered_index.search(clustered.queries, nprobe=0)
    with pytest.raises(ValueError, match="nprobe must be in \\[1, 48\\], got 49 .*n_coarse=48"):
        clustered_index.search(clustered.queries, nprobe=49)
    with pytest.raises(TypeError, match="nprobe must be an int"):
        clustered_index.search(clustered.queries, nprobe=2.0)
    with pytest.raises(ValueError, match="unknown backend"):
        clustered_index.search(clustered.queries, backend="faiss")
    with pytest.raises(ValueError, match="non-finite"):
        clustered_index.search(torch.full((2, 32), float("nan")))
    with pytest.raises(TypeError, match="floating"):
        clustered_index.search(torch.zeros(2, 32, dtype=torch.int32))
    with pytest.raises(ValueError, match="coarse_centroids must be \\(n_coarse >= 1, d=32\\)"):
        u2.HierarchicalIndex(codebook, torch.zeros(4, 16), torch.zeros(3000, dtype=torch.int64))
    with pytest.raises(ValueError, match="coarse_ids must lie in \\[0, n_coarse=4\\)"):
        u2.HierarchicalIndex(codebook, torch.zeros(4, 32), torch.full((3000,), 4))
    with pytest.raises(ValueError, match="coarse_ids must have shape \\(3000,\\)"):
        u2.HierarchicalIndex(codebook, torch.zeros(4, 32), torch.zeros(10, dtype=torch.int64))


def test_from_codebook_without_structure_is_refused(clustered):
    with pytest.raises(ValueError, match=r"no two-stage structure: meta lacks \['coarse_ids', 'coarse_centroids'\]"):
        u2.HierarchicalIndex.from_codebook(u2.Codebook(clustered.codebook))
    with pytest.raises(ValueError, match=r"meta lacks \['coarse_centroids'\]"):
        u2.HierarchicalIndex.from_codebook(u2.Codebook(clustered.codebook, meta={"coarse_ids": clustered.coarse_ids}))
    with pytest.raises(TypeError, match="needs a u2.Codebook"):
        u2.HierarchicalIndex.from_codebook(clustered.codebook)
    bad = u2.Codebook(clustered.codebook, meta={"coarse_ids": clustered.coarse_ids[:10],
                                                "coarse_centroids": clustered.coarse_centroids})
    with pytest.raises(ValueError, match="invalid two-stage structure: coarse_ids must have shape"):
        u2.HierarchicalIndex.from_codebook(bad)


def test_in_place_change_of_the_codebook_is_refused():
    g = torch.Generator().manual_seed(7)
    codebook = torch.randn(200, 8, generator=g)
    index = u2.HierarchicalIndex(codebook, torch.zeros(1, 8), torch.zeros(200, dtype=torch.int64))
    index.search(codebook[:3], exact=True)
    codebook.mul_(2.0)  # the index holds the same storage (one cell: no sorted copy was needed)
    with pytest.raises(ValueError, match="modified in place"):
        index.search(codebook[:3], exact=True)


def test_approximate_scan_has_no_cancellation_on_tight_clusters_far_from_the_origin():
    # the scan scored ||c||^2 - 2 <x, c> in fp32: on tight clusters far from the origin it returned
    # a farther codeword of the right cell for 20-40% of the queries (FAISS's IVF: none)
    from unicode2_fast.data import clustered_codebook

    data = clustered_codebook(20_000, 100, 256)
    index = u2.HierarchicalIndex.build(data.codebook, n_coarse=64)
    exact_ids, _ = u2.nearest(data.queries, data.codebook)
    for nprobe in (1, 4, 64):
        ids, _ = index.search(data.queries, nprobe=nprobe, backend="torch")
        assert torch.equal(ids, exact_ids), nprobe  # every query's exact neighbour lies in its nearest cell


# --- metrics "ip" and "cos" ---------------------------------------------------------------------

def _metric_data(name):
    from unicode2_fast import data

    if name == "clustered":
        d = data.clustered_codebook(4000, 300, 96, n_families=6, n_cells=40)
        return d.codebook, d.queries
    if name == "siglip":
        d = siglip_like(4000, 300, d=64, n_coarse=40, seed=2)
        return d.codebook, d.queries
    g = torch.Generator().manual_seed(8)
    return torch.randn(3000, 48, generator=g), torch.randn(200, 48, generator=g)


@pytest.mark.parametrize("name", ["clustered", "siglip", "gaussian"])
@pytest.mark.parametrize("metric", ["ip", "cos"])
def test_exact_mode_equals_nearest_for_ip_and_cos(name, metric, monkeypatch):
    c, x = _metric_data(name)
    index = u2.HierarchicalIndex.build(c, n_coarse=40, niter=8, metric=metric)
    ids, dists = index.search(x, exact=True)
    ref_ids, ref_dists = u2.nearest(x, c, metric=metric)
    assert torch.equal(ids, ref_ids) and torch.equal(dists, ref_dists)
    assert_nearest_ok(ids, dists, x, c, metric, exact=True, rel_tol=2e-7)
    # every cell scanned to the end (no fallback, the bounds alone): still exact
    monkeypatch.setattr(hierarchical, "FALLBACK_FRACTION", 2.0)
    monkeypatch.setattr(hierarchical, "EXACT_MISSES", 10 ** 9)  # the cells every time, however much they scan
    monkeypatch.setattr(hierarchical, "nearest", None)
    again, _ = index.search(x, exact=True)
    assert torch.equal(again, ref_ids)


@pytest.mark.parametrize("metric", ["ip", "cos"])
def test_ip_and_cos_cells_prune_on_clustered_data(metric, monkeypatch):
    # the Cauchy-Schwarz bound -<x, m> - ||x|| r settles tight cells: far fewer codewords are
    # scanned than the codebook holds, and no query needs the flat fallback
    from unicode2_fast import _cells

    c, x = _metric_data("clustered")
    index = u2.HierarchicalIndex.build(c, n_coarse=40, niter=8, metric=metric)
    scanned = []
    for name, at in (("_scan_ip", 6), ("_scan_l2", 3)):  # cos scans as l2 on the unit sphere
        real = getattr(_cells, name)  # ``at``: the position of the scanned (query, cell) pairs' cells
        monkeypatch.setattr(_cells, name, lambda cells, *a, real=real, at=at: scanned.append(
            int(cells.cell_size[a[at]].sum())) or real(cells, *a))
    monkeypatch.setattr(hierarchical, "nearest", None)  # a fallback would fail loudly
    ids, _ = index.search(x, exact=True)
    assert torch.equal(ids, u2.nearest(x, c, metric=metric)[0])
    assert 0 < sum(scanned) < 0.25 * x.shape[0] * c.shape[0]


@pytest.mark.parametrize("metric", ["ip", "cos"])
def test_ip_and_cos_approximate_search_scanning_every_cell_is_exact(metric, tmp_path):
    c, x = _metric_data("siglip")
    index = u2.HierarchicalIndex.build(c, n_coarse=40, niter=8, metric=metric)
    ids, dists = index.search(x, nprobe=40)
    ref_ids, ref_dists = u2.nearest(x, c, metric=metric)
    assert (ids == ref_ids).float().mean() > 0.99  # fp32 scan: near ties may differ
    assert torch.allclose(dists, ref_dists, rtol=1e-5, atol=1e-5)
    few, _ = index.search(x, nprobe=4)
    assert (few == ref_ids).float().mean() > 0.6
    index.save(tmp_path / "index.safetensors")
    loaded = u2.HierarchicalIndex.load(tmp_path / "index.safetensors")
    assert loaded.metric == metric
    assert torch.equal(loaded.search(x, exact=True)[0], ref_ids)


def test_ip_and_cos_bad_input():
    c, x = _metric_data("gaussian")
    index = u2.HierarchicalIndex.build(c, n_coarse=10, niter=2, metric="cos")
    with pytest.raises(ValueError, match="Triton kernel scans l2"):
        index.search(x, nprobe=2, backend="triton")
    zero = x.clone()
    zero[3] = 0
    with pytest.raises(ValueError, match="zero"):
        index.search(zero, exact=True)
    bad = c.clone()
    bad[7] = 0
    with pytest.raises(ValueError, match="zero"):
        u2.HierarchicalIndex.build(bad, n_coarse=10, metric="cos")
    with pytest.raises(ValueError, match="unknown metric"):
        u2.HierarchicalIndex.build(c, n_coarse=10, metric="l1")


def test_exact_mode_whose_cells_do_not_pay_runs_the_flat_search(monkeypatch):
    # unclustered codewords: the cell scans read most of the codebook before the bounds prune;
    # after EXACT_MISSES such chunks exact mode runs u2.nearest, retrying the cells now and then
    g = torch.Generator().manual_seed(21)
    codebook, x = torch.randn(3000, 32, generator=g), torch.randn(120, 32, generator=g)
    index = u2.HierarchicalIndex.build(codebook, n_coarse=30, niter=5)
    monkeypatch.setattr(hierarchical, "QUERY_CHUNK", 10)
    scans, flat = [], []
    from unicode2_fast import _cells
    real_search, real_nearest = _cells.exact_search, hierarchical.nearest
    monkeypatch.setattr(_cells, "exact_search", lambda *a, **k: scans.append(1) or real_search(*a, **k))
    monkeypatch.setattr(hierarchical, "nearest", lambda rows, *a, **k: flat.append(rows.shape[0]) or real_nearest(rows, *a, **k))
    ids, dists = index.search(x, exact=True)
    ref_ids, ref_dists = u2.nearest(x, codebook)
    assert torch.equal(ids, ref_ids) and torch.equal(dists, ref_dists)
    chunks, every = 12, hierarchical.EXACT_RETRY_EVERY
    tried = hierarchical.EXACT_MISSES + (chunks - hierarchical.EXACT_MISSES) // every
    assert len(scans) == tried  # the first chunk(s), then one in every EXACT_RETRY_EVERY
    assert flat.count(10) >= chunks - tried  # the skipped chunks went whole to u2.nearest
    # a short tail chunk leaves the record as it is
    misses = index._exact_misses
    index.search(x[:3], exact=True)
    assert index._exact_misses == misses
