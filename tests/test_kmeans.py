"""u2.build_codebook: two-stage k-means that recovers known clusters, allocates exactly k codewords,
repairs empty and NaN centroids, streams .npy files and chunk iterables with the same result as a
tensor, resumes bitwise-identically from checkpoints, and refuses bad inputs; plus the CLI."""
import os

import faiss
import numpy as np
import pytest
import torch

import unicode2_fast as u2
from unicode2_fast import _features, _lloyd, kmeans
from unicode2_fast.codebook import Codebook
from unicode2_fast.data import siglip_like


@pytest.fixture(scope="module", autouse=True)
def single_threaded():
    """Run this module on one torch and one FAISS thread. On the shared 2-core CI machine, with
    other jobs running, every multi-threaded OpenMP region waits for a descheduled thread: the
    same tests took 2 s to 80 s from run to run; single-threaded they take 2-3 s every time.
    Thread count changes no result here beyond what it changes on any machine (BLAS blocking)."""
    threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(faiss_threads)


def _blobs(n_blobs=16, d=32, m=4000, seed=0, spread=5.0, noise=0.3):
    """Equal-sized, well-separated Gaussian blobs: centres (n_blobs, d), labels (m,), x (m, d)."""
    generator = torch.Generator().manual_seed(seed)
    centres = spread * torch.randn(n_blobs, d, generator=generator)
    labels = (torch.arange(m) % n_blobs)[torch.randperm(m, generator=generator)]
    return centres, labels, centres[labels] + noise * torch.randn(m, d, generator=generator)


@pytest.fixture(scope="module")
def clustered():
    """(4000, 16) SigLIP-like features: two-level clusters of unequal sizes."""
    return siglip_like(300, 4000, 16, seed=0).queries


@pytest.fixture(scope="module")
def reference(clustered):
    return u2.build_codebook(clustered, 120, progress=False)


def _assert_same_codebook(actual, expected):
    assert torch.equal(actual.vectors, expected.vectors)
    assert actual.meta.keys() == expected.meta.keys()
    for key, value in expected.meta.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(actual.meta[key], value), key
        else:
            assert actual.meta[key] == value, key


def _mse(x, codebook):
    return float(u2.nearest(x, codebook)[1].double().mean())


# clustering quality ----------------------------------------------------------


@pytest.fixture(params=["faiss", "lloyd"])
def fine_trainer(request, monkeypatch):
    """The per-cell k-means: faiss.Kmeans (the CPU default) or _lloyd.kmeans (what CUDA runs)."""
    if request.param == "lloyd":
        monkeypatch.setattr(kmeans, "_train_cell", _lloyd.kmeans)
    return request.param


def test_recovers_well_separated_blobs(fine_trainer):
    centres, labels, x = _blobs()
    cb = u2.build_codebook(x, 32, progress=False)
    _, centre_dists = u2.nearest(centres, cb)
    # a codeword is the mean of ~125 points of one blob: off its centre by ~0.3^2 * 32 / 125 per blob
    assert float(centre_dists.max()) < 1.0
    ids, _ = u2.nearest(x, cb)
    for code in ids.unique():
        assert labels[ids == code].unique().numel() == 1, "a codeword mixes two blobs"


def test_mse_close_to_single_stage_faiss_kmeans(fine_trainer):
    data = siglip_like(400, 10_000, 32, seed=1).queries
    train, held_out = data[:8000], data[8000:]
    # single runs differ by the local minimum they land in (a few % either way): compare means
    ours, theirs = [], []
    for seed in range(3):
        ours.append(_mse(held_out, u2.build_codebook(train, 100, seed=seed, progress=False)))
        km = faiss.Kmeans(32, 100, niter=20, seed=seed + 1, max_points_per_centroid=256)
        km.train(train.numpy())
        theirs.append(_mse(held_out, torch.from_numpy(km.centroids)))
    ratio = np.mean(ours) / np.mean(theirs)
    print(f"held-out MSE ({fine_trainer} cells): build_codebook {np.round(ours, 4)}, "
          f"faiss.Kmeans {np.round(theirs, 4)}, ratio of means {ratio:.4f}")
    assert ratio < 1.05


# result layout ------------------------------------------------------------------


def test_meta_and_layout(clustered, reference, tmp_path):
    cb = reference
    assert isinstance(cb, Codebook) and (cb.k, cb.dim) == (120, 16) and cb.dtype == torch.float32
    assert cb.meta["n_coarse"] == 11 == round(120 ** 0.5)
    assert {key: cb.meta[key] for key in ("k", "niter", "seed", "max_points_per_centroid", "n_features")} == {
        "k": 120, "niter": 20, "seed": 0, "max_points_per_centroid": 256, "n_features": 4000}
    coarse_ids, coarse_centroids = cb.meta["coarse_ids"], cb.meta["coarse_centroids"]
    assert coarse_ids.dtype == torch.int64 and coarse_ids.shape == (120,)
    assert coarse_centroids.dtype == torch.float32 and coarse_centroids.shape == (11, 16)
    assert bool((coarse_ids[1:] >= coarse_ids[:-1]).all()), "codewords are stored sorted by coarse cell"
    assert int(cb.meta["cell_sizes"].sum()) == 4000
    assert torch.unique(cb.vectors, dim=0).shape[0] == 120
    # Voronoi cells are convex and each fine codeword is a mean of (or one of) its cell's points,
    # so the nearest coarse centroid of a codeword is its own cell
    assert torch.equal(u2.nearest(cb.vectors, coarse_centroids)[0], coarse_ids)
    # allocation in proportion to the cell sizes: within one codeword of the quota
    quota = 120 * cb.meta["cell_sizes"].double() / 4000
    assert float((torch.bincount(coarse_ids, minlength=11) - quota).abs().max()) < 1.0 + 1e-9
    cb.save(tmp_path / "cb.safetensors")
    _assert_same_codebook(Codebook.load(tmp_path / "cb.safetensors"), cb)


def test_same_seed_identical_other_seed_differs(clustered, reference):
    _assert_same_codebook(u2.build_codebook(clustered, 120, progress=False), reference)
    other = u2.build_codebook(clustered, 120, seed=1, progress=False)
    assert not torch.equal(other.vectors, reference.vectors)
    assert other.meta["seed"] == 1


def test_npy_chunks_and_dtypes_give_the_tensor_result(clustered, reference, tmp_path, monkeypatch):
    # blocks of 300 rows and fine samples of ~3 cells per pass: many blocks, several gather passes
    monkeypatch.setattr(_features, "BLOCK_BYTES", 300 * 16 * 4)
    expected = u2.build_codebook(clustered, 120, progress=False)
    _assert_same_codebook(expected, reference)  # the block size does not change the result
    path = tmp_path / "features.npy"
    np.save(path, clustered.numpy())
    sizes = [1, 999, 7, 1500, 1493]
    edges = np.cumsum([0] + sizes)
    chunks = [clustered[a:b] if i % 2 else clustered[a:b].numpy() for i, (a, b) in enumerate(zip(edges, edges[1:]))]
    for features in (str(path), path, chunks, lambda: iter(chunks), clustered.double(), clustered.numpy()):
        _assert_same_codebook(u2.build_codebook(features, 120, progress=False), expected)
    _assert_same_codebook(u2.build_codebook(chunks, 120, progress=False, fine_batch_bytes=1200 * 16 * 4), expected)


def test_progress_bars_show_the_objective(clustered, capsys):
    u2.build_codebook(clustered[:1000], 20, niter=3, progress=True)
    err = capsys.readouterr().err
    assert "coarse k-means" in err and "fine k-means" in err and "mse=" in err


# allocation -------------------------------------------------------------------


def test_allocation_is_proportional_with_largest_remainders():
    assert kmeans.allocate_codewords([50, 30, 20], 10).tolist() == [5, 3, 2]
    assert kmeans.allocate_codewords([5, 5, 5], 4).tolist() == [2, 1, 1]  # remainder ties: lowest index
    assert kmeans.allocate_codewords([5, 5, 5], 5).tolist() == [2, 2, 1]
    assert kmeans.allocate_codewords([0, 10, 0, 30], 8).tolist() == [0, 2, 0, 6]


def test_allocation_gives_every_nonempty_cell_one_and_respects_capacity():
    # tiny cells get one codeword each, taken from the cell most above its quota
    assert kmeans.allocate_codewords([1, 1, 98], 3).tolist() == [1, 1, 1]
    assert kmeans.allocate_codewords([10_000, 50, 1, 1, 0, 3000], 100).tolist() == [75, 1, 1, 1, 0, 22]
    # never more codewords than points: the excess goes to the cells most below their quota
    assert kmeans.allocate_codewords([100, 3, 3], 104).tolist() == [98, 3, 3]
    assert kmeans.allocate_codewords([100, 50, 50], 60, capacity=[10, 50, 50]).tolist() == [10, 25, 25]


def test_allocation_invariants_on_random_skewed_sizes():
    generator = np.random.default_rng(0)
    for _ in range(200):
        cells = int(generator.integers(1, 40))
        sizes = (generator.pareto(1.0, cells) * generator.integers(1, 50)).astype(np.int64)
        sizes[generator.random(cells) < 0.2] = 0
        if sizes.sum() == 0:
            sizes[0] = 1
        nonempty = int((sizes > 0).sum())
        k = int(generator.integers(nonempty, sizes.sum() + 1))
        alloc = kmeans.allocate_codewords(sizes.tolist(), k).numpy()
        assert alloc.sum() == k
        assert (alloc[sizes > 0] >= 1).all() and (alloc[sizes == 0] == 0).all()
        assert (alloc <= sizes).all()


def test_allocation_errors():
    with pytest.raises(ValueError, match="smaller than the number of non-empty cells"):
        kmeans.allocate_codewords([5, 5, 5], 2)
    with pytest.raises(ValueError, match="more than the cells can hold"):
        kmeans.allocate_codewords([2, 3, 0], 6)


# repairs: empty clusters, NaN / Inf centroids, duplicates ------------------------


def test_empty_clusters_are_split(monkeypatch):
    monkeypatch.setattr(kmeans, "_train_cell", _lloyd.kmeans)
    centres, _, x = _blobs()
    refills = []
    refill = _lloyd._refill

    def spy(centroids, bad, *args):
        refills.append(int(bad.sum()))
        return refill(centroids, bad, *args)

    # every centroid starts on the same point: all but one cluster are empty after the first pass
    monkeypatch.setattr(_lloyd, "_init_centroids", lambda x, k, generator: x[:1].repeat(k, 1))
    monkeypatch.setattr(_lloyd, "_refill", spy)
    cb = u2.build_codebook(x, 32, progress=False)
    assert refills and max(refills) >= 20
    assert torch.isfinite(cb.vectors).all() and torch.unique(cb.vectors, dim=0).shape[0] == 32
    # farthest-first splitting still finds every blob
    assert float(u2.nearest(centres, cb)[1].max()) < 1.0


def test_nan_and_inf_centroids_are_dropped_and_refilled(monkeypatch):
    monkeypatch.setattr(kmeans, "_train_cell", _lloyd.kmeans)
    centres, _, x = _blobs()
    update = _lloyd._update_centroids
    poisoned = []

    def poison_first_update_per_k(x, ids, k):
        centroids, counts = update(x, ids, k)
        if k not in poisoned:  # the coarse stage (k = 6) and the first cell of each size
            poisoned.append(k)
            centroids[0] = float("nan")
            centroids[-1, 0] = 1e300  # finite in float64, Inf once cast to float32
            if k > 6:
                centroids[k // 2, 3] = float("inf")
        return centroids, counts

    monkeypatch.setattr(_lloyd, "_update_centroids", poison_first_update_per_k)
    cb = u2.build_codebook(x, 32, progress=False)
    # k = 1: the only centroid is dropped (refilled from its former members); k = 10: three of ten
    assert poisoned[0] == 6 and 1 in poisoned and 10 in poisoned
    assert torch.isfinite(cb.vectors).all() and torch.unique(cb.vectors, dim=0).shape[0] == 32
    assert float(u2.nearest(centres, cb)[1].max()) < 1.0


# checkpoints --------------------------------------------------------------------


def test_resume_after_interruption_is_bitwise_identical(clustered, reference, tmp_path, monkeypatch):
    lloyd, train_cell = _lloyd.kmeans, kmeans._train_cell
    trained = []

    def interrupt_at_the_third_cell(x, k, niter, seed, label, report=None):
        if len(trained) == 3:
            raise KeyboardInterrupt("simulated interruption")
        trained.append(label)
        return train_cell(x, k, niter, seed, label, report)

    def spy(function):
        return lambda *args: trained.append(args[4]) or function(*args)

    # every cell training an uninterrupted build does (the pilot of allocation "auto", then the
    # chosen allocation's fine stage)
    monkeypatch.setattr(kmeans, "_train_cell", spy(train_cell))
    u2.build_codebook(clustered, 120, progress=False)
    all_cells = list(trained)
    assert len(all_cells) > 3
    trained.clear()

    monkeypatch.setattr(_lloyd, "kmeans", spy(lloyd))
    monkeypatch.setattr(kmeans, "_train_cell", interrupt_at_the_third_cell)
    with pytest.raises(KeyboardInterrupt):
        u2.build_codebook(clustered, 120, progress=False, checkpoint_dir=tmp_path)
    assert trained == ["coarse stage"] + all_cells[:2]
    saved = sorted(os.listdir(tmp_path))
    assert saved[:2] == ["assign.pt", "coarse.pt"] and len(saved) == 4  # two cells saved

    trained.clear()
    monkeypatch.setattr(kmeans, "_train_cell", spy(train_cell))
    # another fine batch size changes which cells are gathered together, not the result
    resumed = u2.build_codebook(clustered, 120, progress=False, checkpoint_dir=tmp_path,
                                fine_batch_bytes=500 * 16 * 4)
    assert sorted(trained) == sorted(all_cells[2:])  # no coarse stage, no cell twice
    _assert_same_codebook(resumed, reference)
    trained.clear()
    _assert_same_codebook(u2.build_codebook(clustered, 120, progress=False, checkpoint_dir=tmp_path), reference)
    assert trained == []
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


@pytest.mark.parametrize("change", ["k", "seed", "n_coarse", "data"])
def test_resume_with_other_parameters_or_data_raises(clustered, tmp_path, change):
    u2.build_codebook(clustered[:1000], 30, niter=2, progress=False, checkpoint_dir=tmp_path)
    kwargs = {"k": 30, "niter": 2, "seed": 0, "n_coarse": None}
    features = clustered[:1000]
    if change == "data":
        features = features.clone()
        features[-1] += 1.0
    else:
        kwargs[change] = {"k": 31, "seed": 1, "n_coarse": 4}[change]
    with pytest.raises(ValueError, match="holds a build with other parameters or data"):
        u2.build_codebook(features, progress=False, checkpoint_dir=tmp_path, **kwargs)


def test_corrupt_checkpoint_is_reported(clustered, tmp_path):
    (tmp_path / "coarse.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="coarse.pt: unreadable checkpoint"):
        u2.build_codebook(clustered[:1000], 30, niter=2, progress=False, checkpoint_dir=tmp_path)


# bad inputs --------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, match", [
    ({"k": 4001}, ValueError, r"k=4001 exceeds the number of feature rows \(4000\)"),
    ({"k": 10, "n_coarse": 11}, ValueError, "n_coarse=11 must not exceed k=10"),
    ({"k": 0}, ValueError, "k must be >= 1"),
    ({"k": 2.5}, TypeError, "k must be an integer"),
    ({"k": 10, "niter": 0}, ValueError, "niter must be >= 1"),
    ({"k": 10, "max_points_per_centroid": 0}, ValueError, "max_points_per_centroid must be >= 1"),
])
def test_bad_parameters(clustered, kwargs, error, match):
    with pytest.raises(error, match=match):
        u2.build_codebook(clustered, progress=False, **kwargs)


def test_bad_features(clustered, tmp_path):
    x = clustered[:200]
    with pytest.raises(ValueError, match="2-D"):
        u2.build_codebook(x[0], 2, progress=False)
    with pytest.raises(TypeError, match="floating"):
        u2.build_codebook(torch.ones(100, 4, dtype=torch.int32), 2, progress=False)
    with pytest.raises(ValueError, match="chunk 1 has dim 15 but the chunks before it have dim 16"):
        u2.build_codebook([x[:100], x[100:, :15]], 2, progress=False)
    with pytest.raises(TypeError, match="features must be an"):
        u2.build_codebook(42, 2, progress=False)
    with pytest.raises(ValueError, match="yielded no rows"):
        u2.build_codebook([], 2, progress=False)
    passes = []

    def shrinking():
        passes.append(1)
        return iter([x if len(passes) == 1 else x[:150]])

    with pytest.raises(ValueError, match="must yield the same chunks every time"):
        u2.build_codebook(shrinking, 2, progress=False)
    duplicated = x[:10].repeat(40, 1)
    with pytest.raises(ValueError, match="distinct points"):
        u2.build_codebook(duplicated, 20, progress=False)


def test_nan_rows_are_named(clustered, tmp_path):
    x = clustered[:2000].clone()
    x[1017, 3] = float("nan")
    with pytest.raises(ValueError, match="first in row 1017"):
        u2.build_codebook(x, 10, progress=False)
    with pytest.raises(ValueError, match=r"features row 1017 \(row 17 of chunk 1\) holds NaN or Inf"):
        u2.build_codebook([x[:1000], x[1000:]], 10, progress=False)
    path = tmp_path / "nan.npy"
    np.save(path, x.numpy())
    with pytest.raises(ValueError, match="features row 1017 holds NaN or Inf"):
        u2.build_codebook(path, 10, progress=False)


def test_bad_npy_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="features file not found"):
        u2.build_codebook(tmp_path / "missing.npy", 2, progress=False)
    np.save(tmp_path / "ints.npy", np.ones((10, 4), dtype=np.int64))
    with pytest.raises(TypeError, match="floating"):
        u2.build_codebook(tmp_path / "ints.npy", 2, progress=False)
    np.save(tmp_path / "cube.npy", np.ones((2, 3, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="2-D"):
        u2.build_codebook(tmp_path / "cube.npy", 2, progress=False)
    (tmp_path / "text.npy").write_text("not numpy")
    with pytest.raises(ValueError, match="not a .npy array file"):
        u2.build_codebook(tmp_path / "text.npy", 2, progress=False)


def test_resume_refuses_features_changed_in_the_middle(tmp_path):
    # the fingerprint covered only the shape and the first and last 8 rows: rows changed in the
    # middle of a .npy file brought the old codebook back
    g = torch.Generator().manual_seed(11)
    features = torch.randn(20000, 8, generator=g)
    path = tmp_path / "features.npy"
    np.save(path, features.numpy())
    u2.build_codebook(str(path), 40, niter=2, progress=False, checkpoint_dir=tmp_path / "ckpt")
    changed = features.clone()
    changed[5000:15000] += 0.5
    np.save(path, changed.numpy())
    with pytest.raises(ValueError, match="features: other data"):
        u2.build_codebook(str(path), 40, niter=2, progress=False, checkpoint_dir=tmp_path / "ckpt")
    # the same rows as an iterable of other chunks fingerprint like the array
    chunks = [changed[i:i + 3001] for i in range(0, 20000, 3001)]
    fresh = u2.build_codebook(str(path), 40, niter=2, progress=False, checkpoint_dir=tmp_path / "ckpt2")
    again = u2.build_codebook(chunks, 40, niter=2, progress=False, checkpoint_dir=tmp_path / "ckpt2")
    assert torch.equal(fresh.vectors, again.vectors)


def _checkpointed_build(features, directory):
    # n_coarse=5 on these rows: cells of 4, 3, 7, 12 and 4 codewords (two of one size, others not)
    return u2.build_codebook(features, 30, niter=2, n_coarse=5, progress=False, checkpoint_dir=directory)


@pytest.mark.parametrize("damage", ["other cell, other size", "other cell, same size", "random bytes",
                                    "coarse over assign", "assign ids out of range"])
def test_resume_validates_each_checkpoint(clustered, tmp_path, damage):
    features = clustered[:1500]
    reference = _checkpointed_build(features, tmp_path)
    cells = sorted(tmp_path.glob("fine_cell_*.pt"))
    sizes = {p: torch.load(p, weights_only=True)["centroids"].shape[0] for p in cells}
    if damage.startswith("other cell"):
        same = damage.endswith("same size")
        pairs = [(a, b) for a in cells for b in cells if a != b and (sizes[a] == sizes[b]) == same]
        assert pairs, "the build should have cells of equal and of different sizes"
        source, target = pairs[0]
        target.write_bytes(source.read_bytes())
        match = "holds the state of step 'fine_cell_"
    elif damage == "random bytes":
        cells[0].write_bytes(os.urandom(4096))
        match = r"unreadable checkpoint \([^\n]*\); delete it"
    elif damage == "coarse over assign":
        (tmp_path / "assign.pt").write_bytes((tmp_path / "coarse.pt").read_bytes())
        match = "holds the state of step 'coarse', not 'assign'"
    else:
        state = torch.load(tmp_path / "assign.pt", weights_only=True)
        state["coarse_ids"][0] = 7
        torch.save(state, tmp_path / "assign.pt")
        match = "damaged checkpoint"
    with pytest.raises(ValueError, match=match) as info:
        _checkpointed_build(features, tmp_path)
    assert "\n" not in str(info.value)
    # deleting the damaged file redoes that step and gives the same codebook
    for path in list(tmp_path.glob("*.pt")):
        try:
            _checkpointed_build(features, tmp_path)
            break
        except ValueError as exc:
            os.remove(str(exc).split(":")[0])
    torch.testing.assert_close(_checkpointed_build(features, tmp_path).vectors, reference.vectors, rtol=0, atol=0)


# one-pass iterators -------------------------------------------------------------


def test_generator_equals_the_array_build(clustered, reference, tmp_path, monkeypatch):
    # a generator straight out of an encoder is spilled once and memory-mapped
    monkeypatch.setattr(_features.tempfile, "tempdir", str(tmp_path))
    pulled = []

    def encoder():
        for start in range(0, clustered.shape[0], 333):
            pulled.append(start)
            yield clustered[start:start + 333].double().numpy()  # any float dtype, any array kind

    built = u2.build_codebook(encoder(), 120, progress=False)
    _assert_same_codebook(built, reference)
    assert len(pulled) == len(range(0, clustered.shape[0], 333))  # one pass
    assert list(tmp_path.iterdir()) == []  # the spill file and its folder are gone


def test_generator_with_checkpoint_dir_spills_there_and_resumes(clustered, reference, tmp_path):
    chunks = lambda: (clustered[i:i + 1000] for i in range(0, clustered.shape[0], 1000))  # noqa: E731
    _assert_same_codebook(u2.build_codebook(chunks(), 120, progress=False, checkpoint_dir=tmp_path), reference)
    assert not [p for p in os.listdir(tmp_path) if "spill" in p]
    _assert_same_codebook(u2.build_codebook(chunks(), 120, progress=False, checkpoint_dir=tmp_path), reference)


def test_generator_bad_chunk_leaves_no_spill_file(clustered, tmp_path):
    def chunks():
        yield clustered[:100]
        bad = clustered[100:200].clone()
        bad[7, 3] = float("nan")
        yield bad
    with pytest.raises(ValueError, match=r"row 107 \(row 7 of chunk 1\)"):
        u2.build_codebook(chunks(), 4, progress=False, checkpoint_dir=tmp_path)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("how", ["free space", "write error"])
def test_generator_on_a_full_disk(clustered, tmp_path, monkeypatch, how):
    chunks = (clustered[i:i + 500] for i in range(0, 2000, 500))
    bytes_per_chunk = 500 * clustered.shape[1] * 4
    if how == "free space":
        real = _features.shutil.disk_usage
        def disk_usage(path):  # room for one and a half chunks
            used = sum(os.path.getsize(os.path.join(path, name)) for name in os.listdir(path))
            return real(path)._replace(free=max(0, bytes_per_chunk * 3 // 2 - used))
        monkeypatch.setattr(_features.shutil, "disk_usage", disk_usage)
    else:
        import builtins
        import errno
        real_open = builtins.open

        class Full:
            def __init__(self, f):
                self.f, self.n = f, 0

            def write(self, data):
                self.n += 1
                if self.n == 2:
                    raise OSError(errno.ENOSPC, "No space left on device")
                return self.f.write(data)

            def __getattr__(self, name):
                return getattr(self.f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return self.f.__exit__(*exc)

        monkeypatch.setattr(builtins, "open", lambda p, *a, **k: Full(real_open(p, *a, **k))
                            if str(p).endswith(".f32") else real_open(p, *a, **k))
    with pytest.raises(OSError, match=f"no space in {tmp_path} .* at least {2 * bytes_per_chunk:,} bytes"):
        u2.build_codebook(chunks, 8, progress=False, checkpoint_dir=tmp_path)
    assert os.listdir(tmp_path) == []
