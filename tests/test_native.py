"""The compiled CPU row update of SparseRowAdamW (unicode2_fast._native): equal to the torch path
and to torch.optim.AdamW on the touched rows, untouched rows bit for bit, independent of the
thread count, and a clear fallback where no C compiler works."""
import os
import warnings

import pytest
import torch

import unicode2_fast as u2
from unicode2_fast import _dispatch, _native
from unicode2_fast import sparse_adamw as optim_module

needs_native = pytest.mark.skipif(not _native.available(), reason=f"no working C compiler: {_native.failure()}")
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def _state(k, d, seed):
    g = torch.Generator().manual_seed(seed)
    param = torch.randn(k, d, generator=g)
    exp_avg = 0.1 * torch.randn(k, d, generator=g)
    exp_avg_sq = torch.rand(k, d, generator=g) * 1e-2
    row_step = torch.randint(0, 50, (k,), generator=g)
    return param, exp_avg, exp_avg_sq, row_step


def _update(backend, param, exp_avg, exp_avg_sq, row_step, row_ids, grad_rows, **hyper):
    """One row update on copies; returns the new (param, exp_avg, exp_avg_sq)."""
    param, exp_avg, exp_avg_sq, row_step = (t.clone() for t in (param, exp_avg, exp_avg_sq, row_step))
    row_step.index_add_(0, row_ids, torch.ones_like(row_ids))
    update = optim_module._row_adamw_native if backend == "native" else optim_module._row_adamw_torch
    update(param, row_ids, grad_rows, exp_avg, exp_avg_sq, row_step, **hyper)
    return param, exp_avg, exp_avg_sq


@needs_native
@pytest.mark.parametrize("k,d,u", [(1, 1, 1), (40, 7, 13), (300, 1153, 120), (2000, 64, 2000), (5000, 1152, 700)])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_native_row_update_equals_the_torch_path(k, d, u, weight_decay):
    param, exp_avg, exp_avg_sq, row_step = _state(k, d, seed=k + d)
    g = torch.Generator().manual_seed(u)
    row_ids = torch.randperm(k, generator=g)[:u].sort().values
    grad_rows = torch.randn(u, d, generator=g)
    hyper = dict(HYPER, weight_decay=weight_decay)
    native = _update("native", param, exp_avg, exp_avg_sq, row_step, row_ids, grad_rows, **hyper)
    torch_path = _update("torch", param, exp_avg, exp_avg_sq, row_step, row_ids, grad_rows, **hyper)
    untouched = torch.ones(k, dtype=torch.bool)
    untouched[row_ids] = False
    for mine, theirs, before in zip(native, torch_path, (param, exp_avg, exp_avg_sq)):
        assert torch.equal(mine[untouched], before[untouched])
        assert not torch.equal(mine[row_ids], before[row_ids])
        # lerp / addcmul fused as torch's vectorised loop fuses them; torch's Sleef sqrt is not
        # always correctly rounded, sqrtf is: the parameter can be an ulp apart
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-7)


@needs_native
def test_native_row_update_is_independent_of_the_thread_count():
    param, exp_avg, exp_avg_sq, row_step = _state(3000, 96, seed=1)
    row_ids = torch.randperm(3000, generator=torch.Generator().manual_seed(2))[:2500]  # unsorted: any unique ids
    grad_rows = torch.randn(2500, 96, generator=torch.Generator().manual_seed(3))
    assert 2500 * 96 >= _native.PARALLEL_ELEMENTS  # the split really runs
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(_update("native", param, exp_avg, exp_avg_sq, row_step, row_ids, grad_rows, **HYPER))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@needs_native
def test_sparse_row_adamw_native_equals_adamw_over_steps_with_unsorted_ids():
    # gradients built by hand with unsorted unique ids (not coalesced): the optimizer must sort
    # them; and u2.gathered_embedding's sorted ones, which it uses as they are
    k, d = 50, 33
    init = torch.randn(k, d, generator=torch.Generator().manual_seed(0))
    ours = torch.nn.Parameter(init.clone())
    reference = torch.nn.Parameter(init.clone())
    opt = u2.SparseRowAdamW([ours], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, backend="native")
    ref_opt = torch.optim.AdamW([reference], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        grad = torch.randn(k, d, generator=g)
        ids = torch.randperm(k, generator=g) if step % 2 else torch.arange(k)
        ours.grad = torch.sparse_coo_tensor(ids.unsqueeze(0), grad[ids], (k, d))
        reference.grad = grad
        opt.step()
        ref_opt.step()
        torch.testing.assert_close(ours.detach(), reference.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(opt.state[ours]["exp_avg_sq"], ref_opt.state[reference]["exp_avg_sq"],
                                   rtol=1e-6, atol=1e-9)


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """_native as on a new process: nothing loaded, nothing failed, an empty cache folder."""
    monkeypatch.setattr(_native, "_library", None)
    monkeypatch.setattr(_native, "_failure", None)
    monkeypatch.setenv("UNICODE2_FAST_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@needs_native
def test_the_library_is_built_once_into_the_cache_folder(fresh_native):
    assert _native.available()
    files = os.listdir(fresh_native)
    assert len(files) == 1 and files[0].startswith("native-") and files[0].endswith(".so")  # no temporary left
    stamp = os.stat(fresh_native / files[0]).st_mtime_ns
    _native._library = None  # a second process finds the file and does not compile again
    assert _native.available()
    assert os.listdir(fresh_native) == files and os.stat(fresh_native / files[0]).st_mtime_ns == stamp


def test_without_a_compiler_the_torch_path_runs_with_one_warning(fresh_native, monkeypatch):
    monkeypatch.setenv("CC", str(fresh_native.parent / "no-such-compiler"))
    with pytest.warns(RuntimeWarning, match="compiled CPU loop.*unavailable"):
        assert not _native.available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        assert not _native.available()
    assert _dispatch.resolve("sparse_adamw", "auto", torch.device("cpu"), (torch.float32,)) == "torch"
    with pytest.raises(ValueError, match="backend='native' is unavailable"):
        _dispatch.resolve("sparse_adamw", "native", torch.device("cpu"), (torch.float32,))
    # the optimizer still works, on the torch path
    weight = torch.nn.Parameter(torch.randn(6, 4))
    reference = torch.nn.Parameter(weight.detach().clone())
    grad = torch.randn(6, 4)
    weight.grad = grad.to_sparse(1)
    reference.grad = grad.clone()
    u2.SparseRowAdamW([weight]).step()
    torch.optim.AdamW([reference], betas=(0.9, 0.95), weight_decay=0.0).step()
    assert torch.equal(weight.detach(), reference.detach())
    assert not list(fresh_native.glob("**/*.so"))


def test_explicit_native_backend_rules():
    with pytest.raises(ValueError, match="pass CPU tensors"):
        _dispatch.resolve("sparse_adamw", "native", torch.device("cuda"), (torch.float32,))
    with pytest.raises(TypeError, match="float32 tables"):
        _dispatch.resolve("sparse_adamw", "native", torch.device("cpu"), (torch.bfloat16,))
    with pytest.raises(ValueError, match="unknown backend 'native'"):
        _dispatch.resolve("embedding", "native", torch.device("cpu"), (torch.float32,))


@needs_native
def test_native_loop_rejects_what_it_cannot_read():
    param, exp_avg, exp_avg_sq, _ = _state(10, 8, seed=0)
    ids = torch.tensor([1, 3])
    args = (torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match="contiguous CPU torch.float32 param"):
        _native.row_adamw_fp32(param.t(), exp_avg, exp_avg_sq, ids, torch.zeros(2, 8), *args,
                               decay=1.0, beta1=0.9, beta2=0.95, eps=1e-8)
    with pytest.raises(ValueError, match="torch.int64 row_ids"):
        _native.row_adamw_fp32(param, exp_avg, exp_avg_sq, ids.int(), torch.zeros(2, 8), *args,
                               decay=1.0, beta1=0.9, beta2=0.95, eps=1e-8)


@needs_native
def test_row_norms_in_float64_without_underflow():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(300, 37, generator=g)
    v[:100] *= 1e-30  # fp32 squares would underflow to 0
    v[100:200] *= 1e30  # and overflow
    want = v.double().norm(dim=1)
    torch.testing.assert_close(_native.row_norms_f64(v), want, rtol=1e-15, atol=0)
    center = torch.randn(37, generator=g, dtype=torch.float64)
    torch.testing.assert_close(_native.row_norms_f64(v, center), (v.double() - center).pow(2).sum(dim=1),
                               rtol=1e-15, atol=0)
    assert _native.row_norms_f64(v.double()) is None  # not fp32: the caller's torch path
    with pytest.raises(ValueError, match="center"):
        _native.row_norms_f64(v, center[:5])


@needs_native
@pytest.mark.parametrize("n, d, k", [(1, 1, 1), (1000, 7, 13), (2000, 129, 5), (25600, 1152, 100)])
@pytest.mark.parametrize("threads", [1, 2])
def test_cluster_sums_are_index_add_bit_for_bit(n, d, k, threads, monkeypatch):
    # Lloyd's centroid update: the same float64 sums as torch's index_add_ (same order of adds),
    # strided rows included, on any thread count
    from unicode2_fast import _cells

    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    g = torch.Generator().manual_seed(n + d)
    wide = torch.randn(n, d + 3, generator=g) * torch.rand(n, 1, generator=g).mul(1e6)
    x = wide[:, 1:d + 1]  # row stride d + 3
    ids = torch.randint(0, k, (n,), generator=g)
    want = torch.zeros(k, d, dtype=torch.float64).index_add_(0, ids, x.double())
    sums = torch.zeros(k, d, dtype=torch.float64)
    assert _native.cluster_sums_f64(x, ids, sums)
    assert torch.equal(sums, want)
    means, counts = _cells.cluster_means(x, ids, k)
    assert torch.equal(counts, torch.bincount(ids, minlength=k))
    assert torch.equal(means, want / counts.clamp_min(1).unsqueeze(1))
    assert not _native.cluster_sums_f64(x.double(), ids, sums)  # float64 rows: the caller's torch path
    with pytest.raises(ValueError, match="ids outside"):
        _native.cluster_sums_f64(x, torch.full((n,), k, dtype=torch.int64), sums)


@needs_native
def test_a_compiler_command_with_arguments(fresh_native, monkeypatch):
    monkeypatch.setenv("CC", "env cc")  # as CC="ccache gcc" would be given
    assert _native.available(), _native.failure()


@needs_native
def test_a_cached_library_that_does_not_load_is_rebuilt(fresh_native):
    import pathlib

    path = pathlib.Path(_native._library_path(_native._compiler()))  # where this machine's build goes
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a library")  # damaged, or built against another glibc
    assert _native.available(), _native.failure()
    assert path.read_bytes()[:4] == b"\x7fELF"


def test_fp64_moments_of_an_fp32_parameter_take_the_torch_path():
    # a state loaded from a float64 run keeps its float64 moments (load_state_dict keeps dtypes)
    weight = torch.nn.Parameter(torch.randn(6, 4))
    opt = u2.SparseRowAdamW([weight], lr=0.1)
    weight.grad = torch.randn(6, 4).to_sparse(1)
    opt.step()
    state = opt.state[weight]
    state["exp_avg"], state["exp_avg_sq"] = state["exp_avg"].double(), state["exp_avg_sq"].double()
    weight.grad = torch.randn(6, 4).to_sparse(1)
    opt.step()  # no error; the float64 moments are updated in float64
    assert state["exp_avg"].dtype == torch.float64 and bool(torch.isfinite(weight).all())


def _keep_reference(v: torch.Tensor, margin: torch.Tensor, offset: torch.Tensor, cap: int, width: int):
    """gemm_keep's contract, block by block of ``width`` columns of the (rows, K) objectives: the
    least value so far, the columns so far within its threshold; None once more than cap were."""
    best = torch.full((v.shape[0],), float("inf"), dtype=torch.float64)
    kept = [torch.zeros(0, dtype=torch.int64)] * v.shape[0]
    for c0 in range(0, v.shape[1], width):
        best = torch.minimum(best, v[:, c0:c0 + width].double().amin(dim=1))
        t = best + margin + 16 * 2.0 ** -53 * (best.abs() + offset.abs() + margin.abs())
        tf = t.float()
        tf = torch.where(tf.double() < t, torch.nextafter(tf, torch.tensor(float("inf"))), tf)
        for i in range(v.shape[0]):
            if kept[i] is not None:
                now = torch.nonzero(v[i, :c0 + width] <= tf[i]).flatten()
                kept[i] = now if now.numel() <= cap else None
    return best, kept


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("fold", ["native-1", "native-2", "torch"])
def test_gemm_keep_folds_blocks_into_the_least_value_and_every_near_column(metric, fold, monkeypatch):
    # the compiled fold on 1 and 2 threads, and the torch fold the flat scan takes without a compiler
    if fold == "torch":
        from unicode2_fast._nearest_cpu import gemm_keep_torch as keep
    else:
        if not _native.available():
            pytest.skip(f"no working C compiler: {_native.failure()}")
        threads = int(fold[-1])
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
        keep = _native.gemm_keep
    g = torch.Generator().manual_seed(0)
    rows, k, cap = 300, 1000, 6
    dots = torch.randn(rows, k, generator=g)
    dots[:, 500:510] = dots[:, 0:1]  # (ip: exact ties of column 0 in a later block, rows past cap)
    sq = torch.rand(k, generator=g) if metric == "l2" else None
    coef = 2.0 if metric == "l2" else 1.0
    v = sq - coef * dots if metric == "l2" else -dots
    # per row: a margin that keeps none, some or (past cap) too many of the runners-up
    margin = torch.rand(rows, generator=g, dtype=torch.float64) * 0.5
    offset = torch.rand(rows, generator=g, dtype=torch.float64) * 100
    best = torch.full((rows,), float("inf"), dtype=torch.float64)
    cand_v, cand_c = torch.empty(rows, cap), torch.empty(rows, cap, dtype=torch.int64)
    count = torch.zeros(rows, dtype=torch.int32)
    for c0 in range(0, k, 333):  # blocks of uneven width, the last one short
        block = dots[:, c0:c0 + 333]
        keep(block, c0, None if sq is None else sq[c0:c0 + 333].contiguous(), coef, margin, offset,
             best, cand_v, cand_c, count)
    ref_best, ref_kept = _keep_reference(v, margin, offset, cap, 333)
    assert torch.equal(best, ref_best)
    assert any(kept is None for kept in ref_kept) and any(kept is not None and kept.numel() > 1 for kept in ref_kept)
    for i, kept in enumerate(ref_kept):
        if kept is None:
            assert count[i] == -1
        else:
            assert count[i] == kept.numel()
            got = torch.sort(cand_c[i, :count[i]]).values
            assert torch.equal(got, kept) and torch.equal(cand_v[i, :count[i]], v[i, cand_c[i, :count[i]]])


@needs_native
def test_gemm_keep_rejects_what_it_cannot_read():
    g = torch.zeros(4, 8)
    state = (torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64),
             torch.zeros(4, dtype=torch.float64), torch.zeros(4, 2), torch.zeros(4, 2, dtype=torch.int64),
             torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="g must be fp32"):
        _native.gemm_keep(g.double(), 0, None, 1.0, *state)
    with pytest.raises(ValueError, match="count must be"):
        _native.gemm_keep(g, 0, None, 1.0, *state[:5], torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="sq must be"):
        _native.gemm_keep(g, 0, torch.zeros(7), 2.0, *state)
