"""u2.nearest on every backend against a float64 reference: odd shapes, dtypes, ties, bad input."""
import os

import numpy as np
import pytest
import torch

import unicode2_fast as u2
from unicode2_fast import _certified, _native, _nearest_cpu
from unicode2_fast.kernels import nearest as nearest_kernel

from reference import assert_nearest_ok, no_zero_rows, objective64

METRICS = ["l2", "ip", "cos"]
# (N, K, d): 1, 7, 129, 1153 and K not a multiple of any block (CODE_BLOCK = 2048, BLOCK_K = 64/128)
SHAPES = [(1, 1, 1), (7, 7, 7), (129, 1153, 33), (5, 2100, 129), (3, 129, 1153), (6, 300, 1152)]
interpret = os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(
    not (interpret or torch.cuda.is_available()), reason="needs CUDA or TRITON_INTERPRET=1"
)


def _data(n, k, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g).to(dtype), torch.randn(k, d, generator=g).to(dtype)


def _torch_same_precision_error(x, codebook, metric, ids):
    """Max error torch itself makes computing the chosen codes' distances in float32."""
    x32, c32 = x.float(), codebook.float()
    if metric == "l2":
        full = x32.pow(2).sum(1, keepdim=True) + c32.pow(2).sum(1) - 2 * x32 @ c32.t()
    elif metric == "ip":
        full = -(x32 @ c32.t())
    else:
        full = 1 - (x32 / x32.norm(dim=1, keepdim=True)) @ (c32 / c32.norm(dim=1, keepdim=True)).t()
    truth = objective64(x, codebook, metric)
    return (full.double() - truth).abs().max().item()


# --- the exact CPU path -----------------------------------------------------------------------

def _need_fbgemm(kind):
    if kind == "fbgemm" and _nearest_cpu.fbgemm_speedup() == 0:
        pytest.skip("this torch build has no working fbgemm dynamic quantized linear")


def test_fbgemm_blocks_give_exact_integer_dot_products():
    # 7-bit activations q + 64 with the range-fixing row: fbgemm's scale is 1 and zero point 0, so
    # its fp32 output is the exact integer product up to 2^24, and within dot_error beyond
    _need_fbgemm("fbgemm")
    g = torch.Generator().manual_seed(7)
    for d in (16, 200, 1152):
        qx = torch.randint(-63, 64, (33, d), generator=g, dtype=torch.int8)
        qc = torch.randint(-127, 128, (300, d), generator=g, dtype=torch.int8)
        qx[0], qx[1], qc[0], qc[1] = 63, -63, 127, -127  # the extremes: |<u, q_c>| up to 127^2 d
        blocks = _nearest_cpu._FbgemmBlocks(qc)
        got = blocks.dots(_nearest_cpu._FbgemmBlocks.activations(qx), 0, 0, 300).double()
        want = qx.double() @ qc.double().t()
        err = (got - want).abs().max().item()
        assert err <= blocks.dot_error[0]
        assert (blocks.dot_error[0] == 0) == (127 * 127 * d < 2 ** 24)
        assert err == 0 or d == 1152





def _saturating_int_mm(a, b):
    """torch._int_mm as oneDNN computes it without VNNI (seen with ONEDNN_MAX_CPU_ISA=AVX2): the s8
    left operand shifted to u8 (+128), pairs of products summed by vpmaddubsw with int16 saturation,
    the shift's compensation subtracted in int32."""
    u, s = a.int() + 128, b.t().int()
    k = u.shape[1] - u.shape[1] % 2
    pairs = (u[:, None, 0:k:2] * s[None, :, 0:k:2] + u[:, None, 1:k:2] * s[None, :, 1:k:2]).clamp(-32768, 32767)
    out = pairs.sum(dim=2)
    if u.shape[1] % 2:
        out += u[:, None, -1] * s[None, :, -1]
    return (out - 128 * s.sum(dim=1)[None, :]).int()


def test_an_inexact_int8_gemm_is_never_used(monkeypatch):
    # the filters' bounds assume exact int32 dot products: an int8 GEMM whose pair sums saturate
    # (a CPU without VNNI) must not be picked, however fast, and a forced int8 filter refuses it
    monkeypatch.setattr(torch, "_int_mm", lambda a, b, out=None: _saturating_int_mm(a, b))
    monkeypatch.setattr(_nearest_cpu, "_INT8_OK", None)
    monkeypatch.setattr(_nearest_cpu, "_INT8_SPEEDUP", None)
    assert not _nearest_cpu.int8_gemm_available()
    assert _nearest_cpu.int8_speedup() == 0.0
    assert _nearest_cpu.choose_filter(4000, 2048, 192) != "int8"
    g = torch.Generator().manual_seed(5)
    x, codebook = torch.randn(300, 64, generator=g), torch.randn(2000, 64, generator=g)
    for kind in ("int8", "int8x2"):
        with pytest.raises(ValueError, match="exact int8 GEMM"):
            _nearest_cpu.nearest_cpu(x, codebook, "l2", kind)
    ids, dists = u2.nearest(x, codebook)
    assert_nearest_ok(ids, dists, x, codebook, "l2", exact=True)
    # (the emulation gives oneDNN's output bit for bit under ONEDNN_MAX_CPU_ISA=AVX2, measured at d = 64,
    # 65, 1040: right only where no pair sum passes 2^15)
    qa = torch.randint(-127, 128, (9, 64), generator=g, dtype=torch.int8)
    want = qa.double() @ qa.double().t()
    got = _saturating_int_mm(qa, qa.t()).double()
    assert not torch.equal(got, want) and float((got == want).double().mean()) > 0.05
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("n,k,d", SHAPES)
@pytest.mark.parametrize("filter_kind", ["fp64", "fp32", "int8", "int8x2", "fbgemm"])
def test_cpu_path_is_exact(n, k, d, metric, filter_kind):
    if filter_kind in ("int8", "int8x2", "fbgemm") and d < _nearest_cpu.MIN_INT8_DIM:
        pytest.skip("int8 filter is used only from MIN_INT8_DIM")
    if filter_kind == "int8x2" and d > _nearest_cpu.MAX_INT8X2_DIM:
        pytest.skip("int8x2 filter is exact in int32 only up to MAX_INT8X2_DIM (tested refusing)")
    _need_fbgemm(filter_kind)
    x, c = _data(n, k, d)
    ids, dists = _nearest_cpu.nearest_cpu(x, c, metric, filter_kind)
    assert_nearest_ok(ids, dists, x, c, metric, exact=True, rel_tol=2e-7)


@pytest.mark.parametrize("filter_kind", ["fp32", "int8", "int8x2", "fbgemm"])
def test_cpu_filter_exact_on_near_ties(filter_kind):
    _need_fbgemm(filter_kind)
    # Hundreds of codewords within the int8 error bound of each other: the certified filter must
    # still return the float64 argmin, not just a near one.
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(8, 96, generator=g)
    c = centers.repeat_interleave(400, dim=0) + 1e-3 * torch.randn(3200, 96, generator=g)
    x = centers[torch.arange(40) % 8] + 1e-3 * torch.randn(40, 96, generator=g)
    for metric in METRICS:
        ids, dists = _nearest_cpu.nearest_cpu(x, c, metric, filter_kind)
        assert_nearest_ok(ids, dists, x, c, metric, exact=True, rel_tol=2e-7)


def test_cpu_degenerate_codebook_falls_back_exactly(monkeypatch):
    # Every codeword equidistant: candidates exceed the cap and the streaming scan takes over.
    monkeypatch.setattr(_certified, "CANDIDATE_CAP", 16)
    c = torch.ones(3000, 32)
    c[2500] = 0.5
    x = torch.cat([torch.ones(2, 32), torch.full((1, 32), 0.5)])
    ids, dists = _nearest_cpu.nearest_cpu(x, c, "l2", "int8")
    assert ids.tolist() == [0, 0, 2500]
    assert dists.tolist() == [0.0, 0.0, 0.0]


def test_cpu_query_chunks_and_blocks(monkeypatch):
    monkeypatch.setattr(_nearest_cpu, "QUERY_CHUNK", 16)
    monkeypatch.setattr(_nearest_cpu, "CODE_BLOCK", 64)
    monkeypatch.setattr(_certified, "RERANK_CHUNK", 8)
    x, c = _data(50, 1000, 40, seed=3)
    for kind in ["int8", "fp32", "fp64"] + (["fbgemm"] if _nearest_cpu.fbgemm_speedup() > 0 else []):
        ids, dists = _nearest_cpu.nearest_cpu(x, c, "l2", kind)
        assert_nearest_ok(ids, dists, x, c, "l2", exact=True, rel_tol=2e-7)


def test_codebook_stats_rebuilt_after_in_place_change():
    x, c = _data(20, 500, 64, seed=4)
    ids_before, _ = u2.nearest(x, c)
    c.mul_(-1.0)
    ids_after, dists_after = u2.nearest(x, c)
    assert_nearest_ok(ids_after, dists_after, x, c, "l2", exact=True, rel_tol=2e-7)
    assert not torch.equal(ids_before, ids_after)


# --- the public function, every backend -------------------------------------------------------

def _backends():
    out = ["torch", "faiss"]
    if interpret or torch.cuda.is_available():
        out.append("triton")
    return out


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("n,k,d", SHAPES)
def test_nearest_backends_vs_float64(n, k, d, metric, backend):
    x, c = _data(n, k, d, seed=n + k + d)
    if backend == "triton" and torch.cuda.is_available():
        x, c = x.cuda(), c.cuda()
    ids, dists = u2.nearest(x, c, metric=metric, backend=backend)
    assert ids.dtype == torch.int64 and dists.dtype == torch.float32
    ids, dists, x, c = ids.cpu(), dists.cpu(), x.cpu(), c.cpu()
    if backend == "torch":
        assert_nearest_ok(ids, dists, x, c, metric, exact=True, rel_tol=2e-7)
    else:
        # fp32 backends: within the error torch makes in fp32 on the same inputs, plus a small eps
        torch_err = _torch_same_precision_error(x, c, metric, ids)
        assert_nearest_ok(ids, dists, x, c, metric, abs_tol=2 * torch_err + 1e-6)


@needs_triton
@pytest.mark.parametrize("metric", METRICS)
def test_triton_fp16_within_torch_error(metric):
    x, c = _data(37, 300, 64, dtype=torch.float16, seed=5)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ids, dists = u2.nearest(x.to(dev), c.to(dev), metric=metric, backend="triton")
    torch_err = _torch_same_precision_error(x, c, metric, ids.cpu())
    assert_nearest_ok(ids.cpu(), dists.cpu(), x, c, metric, abs_tol=2 * torch_err + 1e-6)


@needs_triton
def test_triton_split_reduction_and_int64_offsets(tmp_path):
    # Rows of x and codebook lie more than 2^31 elements apart: a sparse memory-mapped file holds
    # them, so offset arithmetic in int32 would wrap and read the wrong rows (or fault).
    if torch.cuda.is_available():
        pytest.skip("the sparse-file view is a CPU (interpreter) construction")
    d = 16
    row_stride = 2**31 + 32
    storage = np.memmap(tmp_path / "sparse.bin", dtype=np.float16, mode="w+", shape=(row_stride + d,))
    g = torch.Generator().manual_seed(6)
    rows = torch.randn(2, d, generator=g).half()
    storage[:d] = rows[0].numpy()
    storage[row_stride:row_stride + d] = rows[1].numpy()
    big = torch.from_numpy(storage)
    codebook = big.as_strided((2, d), (row_stride, 1))
    x = big.as_strided((2, d), (row_stride, 1))
    ids, dists = nearest_kernel.nearest_triton(x, codebook, "l2")
    assert ids.tolist() == [0, 1]
    assert dists.abs().max().item() < 1e-4  # ||x||^2 + ||c||^2 - 2<x,c> in fp32


def test_reduce_splits_prefers_lowest_index():
    vals = torch.tensor([[1.0, 2.0, 3.0], [1.0, 0.5, 3.0], [0.5, 0.5, 3.0]])
    idx = torch.tensor([[0, 1, 2], [10, 11, 12], [20, 21, 22]])
    best, best_idx = nearest_kernel.reduce_splits(vals, idx)
    assert best.tolist() == [0.5, 0.5, 3.0]
    assert best_idx.tolist() == [20, 11, 2]


def test_choose_splits_fills_the_device():
    # one image (729 queries) on 132 SMs: many splits; a big batch: few
    assert nearest_kernel.choose_splits(729, 500_000, 128, 128, 132) >= 40
    assert nearest_kernel.choose_splits(100_000, 500_000, 128, 128, 132) == 1
    assert nearest_kernel.choose_splits(729, 100, 128, 128, 132) == 1


def test_every_autotune_config_gets_its_own_whole_tile_splits():
    # the autotuned launch sizes the K-splits per config (grid_splits) and its partial buffers for
    # the config with the most; every config's splits are whole BLOCK_K tiles, none empty
    for n, k, sms in ((729, 500_000, 132), (2916, 50_000, 132), (7, 1153, 4), (100_000, 500_000, 132)):
        for config in nearest_kernel._autotune_configs():
            bn, bk = config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"]
            splits = nearest_kernel.grid_splits(n, k, bn, bk, sms)
            per_split = -(-(-(-k // splits)) // bk) * bk
            assert splits >= 1 and (splits - 1) * per_split < k <= splits * per_split
            assert splits <= nearest_kernel.choose_splits(n, k, bn, bk, sms)
    # the tile sizes change the split count (one sizing for all configs fitted one of them only):
    # one image of queries in 64-row tiles wants half the splits of 128-row tiles, 256-row twice
    counts = {c.kwargs["BLOCK_N"]: nearest_kernel.grid_splits(729, 500_000, c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], 132)
              for c in nearest_kernel._autotune_configs()}
    assert counts[64] < counts[128] < counts[256]


@needs_triton
@pytest.mark.parametrize("splits", [1, 3, 7])
def test_kernel_takes_its_k_slice_from_the_grid(splits):
    # k_per_split = 0 (the autotuned launch): each program derives its slice from the grid's split
    # count; slots beyond the grid stay +inf and the reduction keeps the lowest tied index
    if torch.cuda.is_available():
        pytest.skip("an interpreter-sized launch")
    g = torch.Generator().manual_seed(9)
    k, d, n = 300, 24, 10
    c = torch.randn(1, k, d, generator=g)
    x = torch.randn(1, n, d, generator=g)
    c[0, [150, 5, 299]] = x[0, 2]  # one query's exact match in three splits
    cstat = nearest_kernel.codebook_stat(c, "l2")
    part_val = torch.full((8, 1, n), float("inf"))
    part_idx = torch.zeros((8, 1, n), dtype=torch.int64)
    grid = (-(-n // 16), splits, 1)
    nearest_kernel._nearest_kernel[grid](
        x, c, cstat, part_val, part_idx, n, k, d, 1, x.stride(0), x.stride(1), x.stride(2),
        c.stride(0), c.stride(1), c.stride(2), cstat.stride(0), 0,
        METRIC=nearest_kernel.METRIC_L2, IEEE=True, BLOCK_N=16, BLOCK_K=32, BLOCK_D=16)
    assert bool(torch.isinf(part_val[splits:]).all())
    _, ids = nearest_kernel.reduce_splits(part_val, part_idx)
    truth = objective64(x[0], c[0], "l2")
    assert ids[0, 2] == 5
    clear = (truth.sort(dim=1).values[:, 1] - truth.min(dim=1).values) > 1e-3 * truth.min(dim=1).values.abs().clamp_min(1)
    assert torch.equal(ids[0][clear], truth.argmin(dim=1)[clear])


@pytest.mark.parametrize("backend", _backends())
def test_ties_go_to_lowest_index(backend):
    g = torch.Generator().manual_seed(7)
    base = torch.randn(10, 64, generator=g)
    c = torch.cat([base, base, base, base])  # every codeword four times, 300 apart... 10 apart
    x = base[[3, 5, 9]]
    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    for metric in METRICS:
        ids, _ = u2.nearest(x.to(dev), c.to(dev), metric=metric, backend=backend)
        assert ids.cpu().tolist() == [3, 5, 9], (backend, metric)


@needs_triton
def test_triton_ties_across_blocks_and_splits():
    g = torch.Generator().manual_seed(8)
    base = torch.randn(5, 32, generator=g)
    c = torch.randn(2000, 32, generator=g) * 10
    c[[7, 700, 1500, 1999]] = base[0]  # the same codeword in several blocks and splits
    x = base[:1]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ids, _ = u2.nearest(x.to(dev), c.to(dev), backend="triton")
    assert ids.tolist() == [7]


# --- input kinds and shapes -------------------------------------------------------------------

def test_leading_dims_and_empty():
    x, c = _data(24, 50, 8)
    ids, dists = u2.nearest(x.reshape(2, 3, 4, 8), c)
    assert ids.shape == (2, 3, 4) and dists.shape == (2, 3, 4)
    flat_ids, _ = u2.nearest(x, c)
    assert torch.equal(ids.reshape(-1), flat_ids)
    ids0, dists0 = u2.nearest(torch.empty(0, 8), c)
    assert ids0.shape == (0,) and dists0.shape == (0,) and ids0.dtype == torch.int64
    ids00, _ = u2.nearest(torch.empty(3, 0, 8), c)
    assert ids00.shape == (3, 0)


def test_numpy_in_numpy_out():
    x, c = _data(9, 40, 16)
    ids, dists = u2.nearest(x.numpy(), c.numpy())
    assert isinstance(ids, np.ndarray) and ids.dtype == np.int64
    assert isinstance(dists, np.ndarray) and dists.dtype == np.float32
    t_ids, _ = u2.nearest(x, c)
    assert np.array_equal(ids, t_ids.numpy())


def test_codebook_object_and_low_precision_inputs():
    x, c = _data(11, 200, 48)
    cb = u2.Codebook(c)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        xd, cd = x.to(dtype), c.to(dtype)
        ids, dists = u2.nearest(xd, u2.Codebook(cd))
        assert_nearest_ok(ids, dists, xd, cd, "l2", exact=True, rel_tol=2e-7)
    ids, _ = u2.nearest(x, cb)
    assert torch.equal(ids, u2.nearest(x, c)[0])


def test_non_contiguous_inputs_are_handled():
    x, c = _data(13, 70, 24)
    xt = x.t().contiguous().t()  # same values, column-major
    ct = c.t().contiguous().t()
    assert not xt.is_contiguous() and not ct.is_contiguous()
    for backend in _backends():
        ids, dists = u2.nearest(xt, ct, backend=backend)
        ref_ids, _ = u2.nearest(x, c, backend=backend)
        assert torch.equal(ids.cpu(), ref_ids.cpu())


# --- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda x, c: (x.clone().index_fill_(0, torch.tensor([2]), float("nan")), c), ValueError, "x contains non-finite"),
        (lambda x, c: (x, c.clone().index_fill_(0, torch.tensor([1]), float("inf"))), ValueError, "codebook contains non-finite"),
        (lambda x, c: (x[:, :5], c), ValueError, "dimension mismatch"),
        (lambda x, c: (x.long(), c), TypeError, "x must be a floating"),
        (lambda x, c: (x, c.int()), TypeError, "codebook must be a floating"),
        (lambda x, c: (x, c[:0]), ValueError, "empty codebook"),
        (lambda x, c: (x, c[0]), ValueError, "codebook must be a 2-D"),
        (lambda x, c: (x.to("meta"), c), ValueError, "is on meta"),
        (lambda x, c: ([1.0, 2.0], c), TypeError, "expected a torch.Tensor"),
    ],
)
def test_bad_input_names_the_problem(make, exc, match):
    x, c = _data(4, 10, 8)
    bx, bc = make(x, c)
    with pytest.raises(exc, match=match):
        u2.nearest(bx, bc)


def test_unknown_metric_backend_and_zero_vector_cos():
    x, c = _data(4, 10, 8)
    with pytest.raises(ValueError, match="unknown metric 'l1'"):
        u2.nearest(x, c, metric="l1")
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        u2.nearest(x, c, backend="gpu")
    c0 = c.clone()
    c0[3] = 0
    with pytest.raises(ValueError, match="codebook row 3 is the zero vector"):
        u2.nearest(x, c0, metric="cos")


def test_triton_backend_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, c = _data(4, 10, 8)
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        u2.nearest(x, c, backend="triton")


def test_non_contiguous_codebook_copy_is_cached():
    from unicode2_fast.codebook import codebook_matrix

    x, c = _data(5, 300, 32)
    ct = c.t().contiguous().t()
    assert codebook_matrix(ct) is codebook_matrix(ct)
    ct.mul_(2.0)  # an in-place change of the caller's tensor makes a fresh copy
    refreshed = codebook_matrix(ct)
    assert torch.equal(refreshed, c * 2.0)
    ids, dists = u2.nearest(x, ct)
    assert_nearest_ok(ids, dists, x, c * 2.0, "l2", exact=True, rel_tol=2e-7)


# data nobody tuned for: the flat path, duplicates, and a filter that stops pruning -------------

def _real_or_adversarial(name):
    from unicode2_fast import data

    if name == "photos":
        pytest.importorskip("skimage")
        patches = data.photo_patches(1200 + 600, patch=4, seed=0)  # d = 48: flat regions, overlaps
        return patches[:1200], patches[1200:]
    if name == "clustered":
        d = data.clustered_codebook(3000, 300, 96, n_families=6, n_cells=40)
        return d.codebook, d.queries
    d = data.near_duplicates(2000, 400, 32)
    return d.codebook, d.queries


@pytest.mark.parametrize("name", ["photos", "clustered", "duplicates"])
@pytest.mark.parametrize("kind", ["flat", "int8", "int8x2", "fbgemm", "fp32", "fp64"])
def test_exact_on_real_and_adversarial_data(name, kind):
    _need_fbgemm(kind)
    c, x = _real_or_adversarial(name)
    if kind in ("int8", "int8x2", "fbgemm") and c.shape[1] < _nearest_cpu.MIN_INT8_DIM:
        pytest.skip("int8 filter needs d >= 16")
    ids, dists = _nearest_cpu.nearest_cpu(x, c, "l2", kind)
    assert_nearest_ok(ids, dists, x, c, "l2", exact=True, rel_tol=2e-7)


def _flat_scan_blocks(monkeypatch):
    """(rows, first column, columns) of every GEMM block the flat scan folds (_native.gemm_keep,
    or its torch twin without a C compiler)."""
    blocks = []
    for owner, name in ((_native, "gemm_keep"), (_nearest_cpu, "gemm_keep_torch")):
        def keep(g, col0, *args, _real=getattr(owner, name)):
            blocks.append((g.shape[0], col0, g.shape[1]))
            return _real(g, col0, *args)

        monkeypatch.setattr(owner, name, keep)
    return blocks


@pytest.mark.parametrize("name", ["photos", "clustered", "duplicates"])
@pytest.mark.parametrize("metric", ["l2", "ip", "cos"])
def test_flat_scan_without_the_compiled_fold_gives_the_same_answer(name, metric, monkeypatch):
    # no C compiler: the flat scan folds its GEMM blocks in torch (gemm_keep_torch), same result
    c, x = _real_or_adversarial(name)
    if metric == "cos":
        c, x = no_zero_rows(c), no_zero_rows(x)
    ids, dists = _nearest_cpu.nearest_cpu(x, c, metric, "flat")
    monkeypatch.setattr(_native, "available", lambda: False)
    compiled = []
    monkeypatch.setattr(_native, "gemm_keep", lambda *a: compiled.append(1))
    torch_blocks = []
    real = _nearest_cpu.gemm_keep_torch
    monkeypatch.setattr(_nearest_cpu, "gemm_keep_torch", lambda g, *a: torch_blocks.append(g.shape) or real(g, *a))
    ids_t, dists_t = _nearest_cpu.nearest_cpu(x, c, metric, "flat")
    assert torch_blocks and not compiled and torch.equal(ids_t, ids) and torch.equal(dists_t, dists)
    assert_nearest_ok(ids_t, dists_t, x, c, metric, exact=True, rel_tol=2e-7)


@pytest.mark.parametrize("metric", ["l2", "ip", "cos"])
def test_flat_path_scans_each_duplicate_once_and_keeps_the_lowest_id(metric, monkeypatch):
    c, x = _real_or_adversarial("duplicates")
    blocks = _flat_scan_blocks(monkeypatch)
    ids, dists = _nearest_cpu.nearest_cpu(x, c, metric, "flat")
    assert_nearest_ok(ids, dists, x, c, metric, exact=True, rel_tol=2e-7)
    # the codewords the flat scan's GEMM read: one copy of each distinct row
    assert blocks and max(col0 + cols for _, col0, cols in blocks) == torch.unique(c, dim=0).shape[0] < c.shape[0]


def test_filter_that_stops_pruning_hands_the_chunk_to_the_flat_path(monkeypatch):
    # tight clusters: masses of codewords within the int8 error bound of every query; the scan gives up
    # after PRUNE_CHECK_BLOCKS blocks instead of re-checking most of the codebook
    c, x = _real_or_adversarial("clustered")
    monkeypatch.setattr(_nearest_cpu, "CODE_BLOCK", 128)
    monkeypatch.setattr(_nearest_cpu, "PRUNE_LIMIT", 8)  # (this small case keeps 8-16 per block)
    blocks = []
    real_gemm = _nearest_cpu._filter_gemm
    monkeypatch.setattr(_nearest_cpu, "_filter_gemm", lambda *a: blocks.append(1) or real_gemm(*a))
    flat_rows = []
    real_flat = _nearest_cpu._flat_search
    monkeypatch.setattr(_nearest_cpu, "_flat_search", lambda xq, *a: flat_rows.append(xq.shape[0]) or real_flat(xq, *a))
    ids, dists = _nearest_cpu.nearest_cpu(x, c, "l2", "int8")
    assert_nearest_ok(ids, dists, x, c, "l2", exact=True, rel_tol=2e-7)
    assert flat_rows == [x.shape[0]]
    assert len(blocks) == _nearest_cpu.PRUNE_CHECK_BLOCKS < -(-c.shape[0] // 128)


def test_filter_choice_follows_the_measured_int8_rate(monkeypatch):
    monkeypatch.setattr(_nearest_cpu, "int8_speedup", lambda: 0.05)  # an AVX2-only CPU
    monkeypatch.setattr(_nearest_cpu, "fbgemm_speedup", lambda: 0.0)  # ... without fbgemm
    assert _nearest_cpu.choose_filter(729, 500_000, 1152) == "flat"
    monkeypatch.setattr(_nearest_cpu, "fbgemm_speedup", lambda: 1.6)  # fbgemm's 7-bit AVX2 kernels
    assert _nearest_cpu.choose_filter(729, 500_000, 1152) == "fbgemm"
    assert _nearest_cpu.choose_filter(8000, 16384, 192) == "flat"  # too few products per row to pay
    monkeypatch.setattr(_nearest_cpu, "int8_speedup", lambda: 3.5)  # AVX-512 VNNI
    assert _nearest_cpu.choose_filter(729, 500_000, 1152) == "int8"
    assert _nearest_cpu.choose_filter(729, 100, 64) == "fp32"  # tiny codebooks: the fp32 filter


@pytest.mark.parametrize("metric", ["l2", "ip", "cos"])
def test_a_searched_codebook_is_freed_with_its_caches(metric):
    # per-codebook caches must hold copies, never the codebook itself (that would keep it alive)
    import gc
    import weakref

    codebook = torch.randn(3000, 32)
    ref = weakref.ref(codebook)
    for backend in ("torch", "faiss"):
        u2.nearest(torch.randn(5, 32), codebook, metric=metric, backend=backend)
    del codebook
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("backend", ["auto", "torch", "faiss"])
@pytest.mark.parametrize("metric", ["l2", "ip", "cos"])
def test_inputs_that_require_grad_are_searched_detached(backend, metric):
    # the faiss backend raised "Can't call numpy() on Tensor that requires grad"
    g = torch.Generator().manual_seed(5)
    x = torch.randn(30, 16, generator=g, requires_grad=True)
    codebook = torch.nn.Parameter(torch.randn(200, 16, generator=g))
    ids, dists = u2.nearest(x, codebook, metric=metric, backend=backend)
    assert not dists.requires_grad and not ids.requires_grad
    x64, c64 = x.detach().double(), codebook.detach().double()
    if metric == "l2":
        obj = torch.cdist(x64, c64).pow(2)
    elif metric == "ip":
        obj = -(x64 @ c64.T)
    else:
        obj = 1 - torch.nn.functional.normalize(x64, dim=1) @ torch.nn.functional.normalize(c64, dim=1).T
    assert torch.equal(ids, obj.argmin(dim=1))
    assert x.grad is None and codebook.grad is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cached_fp32_copy_of_the_codebook_is_announced_once(monkeypatch, dtype):
    # a bf16 codebook searched with fp32 queries silently kept an fp32 copy twice its size
    monkeypatch.setattr(_nearest_cpu, "COPY_WARN_BYTES", 1 << 16)
    g = torch.Generator().manual_seed(6)
    codebook = torch.randn(2000, 32, generator=g).to(dtype)
    x = torch.randn(50, 32, generator=g)
    with pytest.warns(UserWarning, match=r"keeps a float32 copy of this \(2000, 32\) torch\.(bfloat16|float32) codebook"):
        ids, _ = _nearest_cpu._flat_search(x, codebook, "l2")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # cached: the second search says nothing
        again, _ = _nearest_cpu._flat_search(x, codebook, "l2")
    assert torch.equal(ids, again)
    assert torch.equal(ids, torch.cdist(x.double(), codebook.double()).argmin(dim=1))


def _reduced_precision_settings():
    """(set, read) of the user's reduced-precision fp32 matmul switches on this torch."""
    mkldnn = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    if mkldnn is not None and hasattr(mkldnn, "fp32_precision"):
        def apply():
            torch.backends.cuda.matmul.fp32_precision = "tf32"
            mkldnn.fp32_precision = "bf16"

        def read():
            return torch.backends.cuda.matmul.fp32_precision, mkldnn.fp32_precision
        return apply, read, ("tf32", "bf16")

    def apply_legacy():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.set_float32_matmul_precision("medium")

    def read_legacy():
        return torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()
    return apply_legacy, read_legacy, (True, "medium")


def test_certified_search_runs_ieee_fp32_whatever_the_user_set(monkeypatch):
    # the certified GEMMs assume fp32 rounding: TF32 / bf16 matmuls must be off inside the call,
    # and the user's choice back afterwards
    from unicode2_fast import _certified

    apply, read, expected = _reduced_precision_settings()
    seen = []
    real = _nearest_cpu.nearest_cpu

    def spy(*args, **kwargs):
        seen.append(read())
        return real(*args, **kwargs)

    monkeypatch.setattr(_nearest_cpu, "nearest_cpu", spy)
    before = read()
    try:
        apply()
        g = torch.Generator().manual_seed(7)
        codebook, x = torch.randn(3000, 64, generator=g), torch.randn(40, 64, generator=g)
        ids, _ = u2.nearest(x, codebook)
        assert read() == expected  # restored
        with _certified.ieee_fp32_matmul():
            inside = read()
    finally:
        if isinstance(before[0], str):
            torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision = before
        else:
            torch.backends.cuda.matmul.allow_tf32 = before[0]
            torch.set_float32_matmul_precision(before[1])
    if isinstance(before[0], str):
        # a CPU search sets the CPU's (oneDNN) switch and leaves CUDA's, which no CPU product reads
        assert seen and all(s == (expected[0], inside[1]) for s in seen)
    else:  # torch < 2.9: the legacy switches, all of them
        assert seen and all(s == inside for s in seen)
    assert inside != expected and all(v in ("ieee", False, "highest") for v in inside)
    assert torch.equal(ids, torch.cdist(x.double(), codebook.double()).argmin(dim=1))


@pytest.mark.parametrize("metric", ["l2", "ip", "cos"])
def test_flat_path_settles_what_its_scan_cannot_by_one_threshold_scan(metric, monkeypatch):
    # tight clusters: the flat scan's candidate lists overflow for almost every query; each query
    # is scanned by it at most once (a second round on a few hundred queries ran at a fraction of
    # the GEMM's speed), the rest settle in the threshold scan, block by block, and the result is
    # the float64 argmin
    c, x = _real_or_adversarial("clustered")
    monkeypatch.setattr(_nearest_cpu, "THRESHOLD_BLOCK", 256)
    monkeypatch.setattr(_nearest_cpu, "THRESHOLD_ROWS", 64)
    blocks = _flat_scan_blocks(monkeypatch)
    fp64_rows = []
    real_scan = _nearest_cpu.exact_scan
    monkeypatch.setattr(_nearest_cpu, "exact_scan", lambda xq, *a: fp64_rows.append(xq.shape[0]) or real_scan(xq, *a))
    ids, dists = _nearest_cpu.nearest_cpu(x, c, metric, "flat")
    assert_nearest_ok(ids, dists, x, c, metric, exact=True, rel_tol=2e-7)
    # each query is scanned once by the flat GEMM (col0 0: the start of its one pass over the codebook)
    assert sum(rows for rows, col0, _ in blocks if col0 == 0) <= x.shape[0] and not fp64_rows


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_flat_scan_hands_rows_past_its_candidate_cap_to_the_threshold_scan(metric, monkeypatch):
    # photographs: flat regions keep several codewords within the bound; with a cap of 2 the flat
    # scan settles only the other rows, the threshold scan the rest, each row once, exactly
    c, x = _real_or_adversarial("photos")
    monkeypatch.setattr(_nearest_cpu, "FLAT_CAP", 2)
    settled = []  # rows of each float64 re-rank: the flat scan's first, then the threshold scan's
    real = _nearest_cpu._near_pairs
    monkeypatch.setattr(_nearest_cpu, "_near_pairs", lambda xq, cb, rows, *a: settled.append(rows) or real(xq, cb, rows, *a))
    ids, dists = _nearest_cpu.nearest_cpu(x, c, metric, "flat")
    assert_nearest_ok(ids, dists, x, c, metric, exact=True, rel_tol=2e-7)
    assert len(settled) >= 2 and 0 < settled[0].numel() < x.shape[0]
    every = torch.sort(torch.cat(settled)).values
    assert torch.equal(every, torch.arange(x.shape[0]))


def test_flat_path_hands_masses_of_equidistant_codewords_to_the_float64_scan(monkeypatch):
    # more than THRESHOLD_CAP candidates for a query: it is finished by the streaming float64
    # scan, only it, and exactly
    c, x = _real_or_adversarial("clustered")
    monkeypatch.setattr(_nearest_cpu, "FLAT_CAP", 0)  # certifies nothing: every query is thresholded
    monkeypatch.setattr(_nearest_cpu, "THRESHOLD_CAP", 1)
    fp64_rows = []
    real_scan = _nearest_cpu.exact_scan
    monkeypatch.setattr(_nearest_cpu, "exact_scan", lambda xq, *a: fp64_rows.append(xq.shape[0]) or real_scan(xq, *a))
    ids, dists = _nearest_cpu.nearest_cpu(x, c, "l2", "flat")
    assert_nearest_ok(ids, dists, x, c, "l2", exact=True, rel_tol=2e-7)
    assert fp64_rows and 0 < sum(fp64_rows) < x.shape[0]


def _tight_clusters():
    """Cells 1000x tighter than data.clustered_codebook's: every codeword of a query's cell lies
    within the fp32 flat scan's error bound (it certifies almost nothing)."""
    from unicode2_fast import data

    d = data.clustered_codebook(4000, 600, 128, n_families=6, n_cells=40)
    own = d.coarse_centroids[d.coarse_ids]
    near = torch.cdist(d.queries, d.coarse_centroids).argmin(dim=1)
    return (own + (d.codebook - own) * 1e-3,
            d.coarse_centroids[near] + (d.queries - d.coarse_centroids[near]) * 1e-3)


def _route_small_codebooks_to_cells(monkeypatch):
    monkeypatch.setattr(_nearest_cpu, "CELLS_MIN_K", 1000)
    calls = []
    real = _nearest_cpu._cells.exact_search
    monkeypatch.setattr(_nearest_cpu._cells, "exact_search", lambda cells, xq, *a: calls.append(xq.shape[0]) or real(cells, xq, *a))
    return calls


def _first_search_of_tight_clusters(monkeypatch, metric):
    """(codebook, queries, cell-scan call sizes, ids) of a first flat-path search of tight
    clusters: exact, and most queries went to the cell scan."""
    c, x = _tight_clusters()
    calls = _route_small_codebooks_to_cells(monkeypatch)
    ids, dists = _nearest_cpu.nearest_cpu(x, c, metric, "flat")
    assert_nearest_ok(ids, dists, x, c, metric, exact=True, rel_tol=2e-7)
    assert _nearest_cpu.FLAT_FAIL_SHARE * x.shape[0] < sum(calls) <= x.shape[0]
    return c, x, calls, ids


def test_clustered_codebook_goes_to_the_cell_scan_and_stays_exact(monkeypatch):
    # tight clusters fail the flat path's first round almost everywhere; a partition of the
    # codebook is built once and the cell scan settles those queries
    c, x, calls, ids = _first_search_of_tight_clusters(monkeypatch, "l2")
    first = sum(calls)
    cells = _cache_entry(c)
    assert cells is not None and cells.n_cells == round(c.shape[0] ** 0.5)
    # cached: a second call reuses the partition, with any number of queries, and sends every
    # query to it (no FAISS round first); so does the automatic choice (no filter scan tried first)
    ids2, _ = _nearest_cpu.nearest_cpu(x[:300], c, "l2", "flat")
    assert torch.equal(ids2, ids[:300]) and _cache_entry(c) is cells
    assert sum(calls) == first + 300
    monkeypatch.setattr(_nearest_cpu, "choose_filter", lambda n, k, d: "fbgemm")
    ids3, _ = _nearest_cpu.nearest_cpu(x[:50], c, "l2")
    assert torch.equal(ids3, ids[:50]) and sum(calls) == first + 350


def _cache_entry(codebook, metric="l2"):
    from unicode2_fast import _cache
    return _cache.cached(codebook, ("cells", metric))


def test_clustered_cos_codebook_goes_to_the_cell_scan_of_its_unit_rows(monkeypatch):
    # cos is l2 on the unit sphere: tight clusters fail the flat scan there too, and the partition
    # of the unit codewords settles them exactly (0.75x FAISS before, on the clustered benchmark)
    c, x, calls, ids = _first_search_of_tight_clusters(monkeypatch, "cos")
    first = sum(calls)
    cells = _cache_entry(c, "cos")
    assert cells is not None and _cache_entry(c) is None
    # the cells hold unit rows
    rows, _ = cells.residuals()
    assert torch.allclose((rows.double() + cells.centroids.double()[cells.cell_of_pos]).norm(dim=1),
                          torch.ones(c.shape[0], dtype=torch.float64), atol=1e-5)
    # later searches of the codebook (the automatic choice included) go to the cells directly
    ids2, _ = _nearest_cpu.nearest_cpu(x[:300], c, "cos")
    assert torch.equal(ids2, ids[:300]) and sum(calls) == first + 300


@pytest.mark.parametrize("metric", ["l2", "cos"])
def test_cells_that_hand_back_their_queries_are_not_used_again(metric, monkeypatch):
    # a cell scan that reads most of the codebook or hands the queries back (flat image regions
    # under cos: unit rows all alike) did not pay: later chunks take the other paths
    c, x = _tight_clusters()
    calls = _route_small_codebooks_to_cells(monkeypatch)
    monkeypatch.setattr(_nearest_cpu, "CELLS_FALLBACK_FRACTION", 0.0)  # every query left goes back
    fell = []
    real_blocked = _nearest_cpu._direct.search_dot_blocked
    monkeypatch.setattr(_nearest_cpu._direct, "search_dot_blocked", lambda xq, *a: fell.append(xq.shape[0]) or real_blocked(xq, *a))
    monkeypatch.setattr(_nearest_cpu, "CELLS_MAX_WORK", 0.5)
    ids, dists = _nearest_cpu.nearest_cpu(x, c, metric, "flat")
    assert_nearest_ok(ids, dists, x, c, metric, exact=True, rel_tol=2e-7)
    first = sum(calls)
    # cos: the queries handed back took the blocked direct scan
    assert first > 0 and (sum(fell) > 0) == (metric == "cos")
    assert _nearest_cpu._cells_built(c, metric)  # (these cells paid: under half the pairs read)
    monkeypatch.setattr(_nearest_cpu, "CELLS_MAX_WORK", 0.0)
    _nearest_cpu.nearest_cpu(x, c, metric, "flat")
    first = sum(calls)
    assert not _nearest_cpu._cells_built(c, metric)
    ids2, _ = _nearest_cpu.nearest_cpu(x, c, metric, "flat")
    assert torch.equal(ids2, ids) and sum(calls) == first


def test_cell_scan_hands_unpruned_queries_to_the_flat_path(monkeypatch):
    c, x = _tight_clusters()
    calls = _route_small_codebooks_to_cells(monkeypatch)
    monkeypatch.setattr(_nearest_cpu, "CELLS_FALLBACK_FRACTION", 0.0)  # every query left is "unpruned"
    flat_rows = []
    real_flat = _nearest_cpu._flat_search
    monkeypatch.setattr(_nearest_cpu, "_flat_search",
                        lambda xq, *a, **kw: flat_rows.append((xq.shape[0], kw.get("cells_ok", True))) or real_flat(xq, *a, **kw))
    ids, dists = _nearest_cpu.nearest_cpu(x, c, "l2", "flat")
    assert_nearest_ok(ids, dists, x, c, "l2", exact=True, rel_tol=2e-7)
    # (queries whose cells all pruned within the first rounds are settled before the check)
    assert calls and flat_rows[0] == (x.shape[0], True) and 0 < sum(n for n, ok in flat_rows if not ok) <= sum(calls)


def test_cell_partition_cache_does_not_keep_the_codebook_alive(monkeypatch):
    import gc
    import weakref

    c, x = _tight_clusters()
    _route_small_codebooks_to_cells(monkeypatch)
    _nearest_cpu.nearest_cpu(x, c, "l2", "flat")
    assert _cache_entry(c) is not None
    ref = weakref.ref(c)
    del c
    gc.collect()
    assert ref() is None


def test_automatic_filter_that_keeps_failing_is_skipped_and_retried(monkeypatch):
    # Gaussian-like queries keep too many codewords within the filter's bound: after FILTER_MISSES
    # chunks in a row the automatic choice stops paying for the attempt, and tries again every
    # FILTER_RETRY_EVERY-th chunk; results stay exact throughout
    c, x = _real_or_adversarial("clustered")
    c = c.clone()
    monkeypatch.setattr(_nearest_cpu, "choose_filter", lambda n, k, d: "int8")
    monkeypatch.setattr(_nearest_cpu, "SCAN_MAX_K", 0)  # the filter engine's own choice, past the bf16 scan
    monkeypatch.setattr("unicode2_fast._direct.MAX_K", 0)  # ... and past the direct scan
    monkeypatch.setattr(_nearest_cpu, "QUERY_CHUNK", 10)
    monkeypatch.setattr(_nearest_cpu, "CODE_BLOCK", 128)
    monkeypatch.setattr(_nearest_cpu, "PRUNE_LIMIT", 0)  # no chunk prunes
    tried = []
    real = _nearest_cpu._search_chunk
    monkeypatch.setattr(_nearest_cpu, "_search_chunk", lambda xq, *a: tried.append(a[-1]) or real(xq, *a))
    xs = x[:200]
    ids, dists = _nearest_cpu.nearest_cpu(xs, c, "l2")
    assert_nearest_ok(ids, dists, xs, c, "l2", exact=True, rel_tol=2e-7)
    chunks = 20
    misses, every = _nearest_cpu.FILTER_MISSES, _nearest_cpu.FILTER_RETRY_EVERY
    # the two-level filter is tried where the int8 one fails, and keeps its own record
    assert tried.count("int8") == tried.count("int8x2") == misses + (chunks - misses) // every
    assert len(tried) == 2 * tried.count("int8")
    # a forced kind is always tried, alone
    tried.clear()
    _nearest_cpu.nearest_cpu(xs, c, "l2", "int8")
    assert tried == ["int8"] * chunks


# the band search of the flat path (l2 codebooks with a dominant direction: photographs) ----------

def _photo_band_case(monkeypatch, patch=4, k=1500, n=900):
    pytest.importorskip("skimage")
    from unicode2_fast import data

    patches = data.photo_patches(k + n, patch=patch, seed=3)
    monkeypatch.setattr(_nearest_cpu, "BAND_MIN_K", 256)
    monkeypatch.setattr(_nearest_cpu, "BAND_ROWS", 64)
    monkeypatch.setattr(_nearest_cpu, "THRESHOLD_BLOCK", 128)  # several blocks per band
    monkeypatch.setattr(_nearest_cpu, "BAND_MAX_WORK", 0.6)  # these small cases: bands of ~45%
    plans = []
    real_plan = _nearest_cpu._BandIndex.plan

    def plan(self, *args):
        blocks, work = real_plan(self, *args)
        plans.append((blocks, work))
        return blocks, work

    monkeypatch.setattr(_nearest_cpu._BandIndex, "plan", plan)
    return patches[:k].clone(), patches[k:].clone(), plans


def _argmin64(x, c):
    """Float64 argmin of the squared distances, summed directly (no norm expansion); lowest index on ties."""
    out = []
    for block in x.double().split(64):
        out.append((block.unsqueeze(1) - c.double().unsqueeze(0)).pow(2).sum(dim=2).argmin(dim=1))
    return torch.cat(out)


@pytest.mark.parametrize("patch", [4, 8])
def test_band_search_on_photographs_scans_a_fraction_and_is_exact(patch, monkeypatch):
    c, x, plans = _photo_band_case(monkeypatch, patch)
    knn_calls = _flat_scan_blocks(monkeypatch)
    ids, dists = _nearest_cpu.nearest_cpu(x, c, "l2", "flat")
    assert torch.equal(ids, _argmin64(x, c))
    assert_nearest_ok(ids, dists, x, c, "l2", exact=True, rel_tol=2e-7)
    # the band was taken (no flat scan round) and scanned well under the full codebook
    (blocks, work), = plans
    assert not knn_calls and work < 0.6
    rows = torch.cat([r for r, _, _ in blocks])
    assert torch.equal(torch.sort(rows).values, torch.arange(x.shape[0]))  # every query once
    scanned = sum((hi - lo) * r.numel() for r, lo, hi in blocks)
    scanned_rows = _nearest_cpu.cached(c, ("band",)).proj.numel()  # distinct codewords
    assert scanned == pytest.approx(work * x.shape[0] * scanned_rows)


def test_band_search_every_band_holds_the_nearest_codeword(monkeypatch):
    # the band rule itself: the exact nearest codeword of each query lies inside its block's band
    c, x, plans = _photo_band_case(monkeypatch)
    ids, _ = _nearest_cpu.nearest_cpu(x, c, "l2", "flat")
    (blocks, _), = plans
    view = _nearest_cpu.cached(c, ("band",))
    flat = _nearest_cpu.cached(c, ("flat", "l2"))
    scanned_row = torch.arange(c.shape[0]) if flat.ids is None else torch.searchsorted(flat.ids, _first_copy(c, ids))
    position = torch.argsort(view.perm)[scanned_row]  # scanned row -> sorted position
    for rows, lo, hi in blocks:
        assert bool(((position[rows] >= lo) & (position[rows] < hi)).all())


def _first_copy(c, ids):
    """The lowest index holding the same vector as c[ids] (the row the flat path scans)."""
    same = (c.unsqueeze(0) == c[ids].unsqueeze(1)).all(dim=2)
    return same.int().argmax(dim=1)


def test_band_search_keeps_ties_and_masses_exact(monkeypatch):
    # duplicated codewords (lowest id wins) and masses past THRESHOLD_CAP (the float64 scan)
    c, x, plans = _photo_band_case(monkeypatch)
    c = torch.cat([c, c[:300]])  # exact duplicates of the first 300 rows, at higher ids
    x = torch.cat([x, c[:50]])  # queries equal to codewords: distance 0, two copies each
    monkeypatch.setattr(_nearest_cpu, "THRESHOLD_CAP", 2)
    fp64_rows = []
    real_scan = _nearest_cpu.exact_scan
    monkeypatch.setattr(_nearest_cpu, "exact_scan", lambda xq, *a: fp64_rows.append(xq.shape[0]) or real_scan(xq, *a))
    ids, dists = _nearest_cpu.nearest_cpu(x, c, "l2", "flat")
    assert plans and plans[0][1] < 0.6
    assert torch.equal(ids, _argmin64(x, c)) and bool((ids[-50:] == torch.arange(50)).all())
    assert fp64_rows  # some queries had more than 2 candidates


def test_band_search_is_skipped_where_bands_span_the_codebook(monkeypatch):
    # gaussian data has no dominant direction: the plan's work is near the full scan, the chunk
    # takes the top-k path, and after BAND_MISSES such chunks the band is not even planned
    g = torch.Generator().manual_seed(0)
    c, x = torch.randn(1500, 48, generator=g), torch.randn(900, 48, generator=g)
    monkeypatch.setattr(_nearest_cpu, "BAND_MIN_K", 256)
    monkeypatch.setattr(_nearest_cpu, "FLAT_QUERY_CHUNK", 300)
    works = []
    real_plan = _nearest_cpu._BandIndex.plan
    monkeypatch.setattr(_nearest_cpu._BandIndex, "plan",
                        lambda self, *a: (lambda r: works.append(r[1]) or r)(real_plan(self, *a)))
    ids, dists = _nearest_cpu.nearest_cpu(x, c, "l2", "flat")
    assert torch.equal(ids, _argmin64(x, c))
    assert len(works) == _nearest_cpu.BAND_MISSES and min(works) > _nearest_cpu.BAND_MAX_WORK
    assert _nearest_cpu.cached(c, ("band",)).vectors is None  # no sorted copy was made


# the two-level int8 filter and the group-minima extraction -------------------------------------

def _photos(k, n, patch=4, seed=0):
    pytest.importorskip("skimage")
    from unicode2_fast import data

    p = data.photo_patches(k + n, patch=patch, seed=seed)
    return p[:k], p[k:]


@pytest.mark.parametrize("metric", ["l2", "ip", "cos"])
def test_two_level_rows_and_their_error_bound(metric):
    # the int8x2 statistics describe each row exactly: |<x, c> - s_x s_c (X2_BASE <q1x, q1c> +
    # <q1x, q2c> + <q2x, q1c>) / X2_BASE| stays within filt_norm_x * res_c + res_x * norm_c +
    # lo_x * lo_c, and that bound is ~2^-13 of ||x|| ||c||, where the int8 one is ~2^-6
    c, x = _photos(300, 200)
    c, x = c[c.norm(dim=1) > 0.1], x[x.norm(dim=1) > 0.1]  # (black patches: no direction for cos)
    center = c.double().mean(dim=0).float() if metric == "l2" else None
    qs = _nearest_cpu._row_stats(x, "int8x2", metric == "cos", center)
    cs = _nearest_cpu._row_stats(c, "int8x2c", metric == "cos", center)
    x64, c64 = x.double(), c.double()
    if center is not None:
        x64, c64 = x64 - center.double(), c64 - center.double()
    if metric == "cos":
        x64, c64 = x64 / x64.norm(dim=1, keepdim=True), c64 / c64.norm(dim=1, keepdim=True)
    true = x64 @ c64.t()
    base = _nearest_cpu.X2_BASE
    combined = (base * (qs.filt.double() @ cs.filt.double().t()) + qs.filt2.double() @ cs.filt2.double().t())
    approx = qs.scale.double().unsqueeze(1) * cs.scale.double() * combined / base
    bound = (qs.filt_norm.unsqueeze(1) * cs.res_norm + qs.res_norm.unsqueeze(1) * cs.norm
             + qs.lo_norm.unsqueeze(1) * cs.lo_norm)
    assert bool(((approx - true).abs() <= bound).all())
    scale = qs.norm.unsqueeze(1) * cs.norm
    assert (bound / scale).median().item() < 2.0 ** -11
    one = _nearest_cpu._row_stats(x, "int8", metric == "cos", center)
    one_c = _nearest_cpu._row_stats(c, "int8", metric == "cos", center)
    one_bound = one.filt_norm.unsqueeze(1) * one_c.res_norm + one.res_norm.unsqueeze(1) * one_c.norm
    assert (one_bound / bound).median().item() > 32


def test_two_level_filter_prunes_photographs_where_int8_gives_up(monkeypatch):
    # work count: on photographs (flat regions within the int8 bound) the one-level filter stops
    # after its first block, the two-level one keeps a few candidates per query and is exact
    c, x = _photos(4096, 600, patch=8)
    kept = []
    real_add = _nearest_cpu.CandidateStore.add
    monkeypatch.setattr(_nearest_cpu.CandidateStore, "add", lambda self, r, *a: kept.append(r.numel()) or real_add(self, r, *a))
    assert _nearest_cpu._search_chunk(x, c, _nearest_cpu.codebook_stats(c, "int8", "l2"), "l2", "int8") is None
    kept.clear()
    ids, obj = _nearest_cpu._search_chunk(x, c, _nearest_cpu.codebook_stats(c, "int8x2", "l2"), "l2", "int8x2")
    assert sum(kept) < 16 * x.shape[0]  # of 4096 codewords per query
    want = _nearest_cpu.exact_scan(x, c, "l2")[0]
    assert torch.equal(ids, want)


def test_automatic_choice_takes_the_two_level_filter_on_photographs(monkeypatch):
    monkeypatch.setattr(_nearest_cpu, "choose_filter", lambda n, k, d: "int8")
    monkeypatch.setattr(_nearest_cpu, "SCAN_MAX_K", 0)  # the filter engine's own choice, past the bf16 scan
    monkeypatch.setattr("unicode2_fast._direct.MAX_K", 0)  # ... and past the direct scan
    monkeypatch.setattr(_nearest_cpu, "QUERY_CHUNK", 200)
    c, x = _photos(4096, 600, patch=8, seed=1)
    c = c.clone()
    tried, flat = [], []
    real = _nearest_cpu._search_chunk
    monkeypatch.setattr(_nearest_cpu, "_search_chunk", lambda xq, *a: tried.append(a[-1]) or real(xq, *a))
    real_flat = _nearest_cpu._flat_search
    monkeypatch.setattr(_nearest_cpu, "_flat_search", lambda xq, *a, **kw: flat.append(xq.shape[0]) or real_flat(xq, *a, **kw))
    ids, dists = _nearest_cpu.nearest_cpu(x, c, "l2")
    assert_nearest_ok(ids, dists, x, c, "l2", exact=True, rel_tol=2e-7)
    assert tried == ["int8", "int8x2"] * 2 + ["int8x2"]  # int8 fails twice, then is skipped
    assert sum(flat) < x.shape[0] // 10  # only queries past the candidate cap


@pytest.mark.parametrize("make", [
    lambda: (torch.randn(5, 1040), torch.randn(50, 1040)),
    lambda: (torch.randn(5, 64, dtype=torch.float64), torch.randn(50, 64)),
])
def test_two_level_filter_refuses_what_int32_or_its_statistics_cannot_hold(make):
    x, c = make()
    with pytest.raises(ValueError, match="int8x2"):
        _nearest_cpu.nearest_cpu(x, c, "l2", "int8x2")
    # the automatic choice never takes it there, and stays exact
    ids, dists = _nearest_cpu.nearest_cpu(x, c, "l2")
    assert_nearest_ok(ids, dists, x, c, "l2", exact=True, rel_tol=2e-7)


@pytest.mark.parametrize("width", [64, 100, 127, 130, 1])
def test_group_minima_find_every_entry_below_the_threshold(width):
    g = torch.Generator().manual_seed(width)
    approx = torch.randn(37, width, generator=g)
    approx[3] = 0.5  # a row of exact ties
    thresh = torch.quantile(approx, 0.1, dim=1) if width > 1 else approx[:, 0]
    active = torch.ones(37, dtype=torch.bool)
    active[5] = False
    groups = _nearest_cpu._GroupMinima(approx)
    assert torch.equal(groups.minima.amin(dim=1), approx.amin(dim=1))
    rows, cols = groups.below(thresh, active)
    want = ((approx <= thresh.unsqueeze(1)) & active.unsqueeze(1)).nonzero()
    got = torch.stack([rows, cols], dim=1)
    assert torch.equal(got[torch.argsort(got[:, 0] * width + got[:, 1])], want)


@pytest.mark.parametrize("kind", ["int8", "int8x2", "fp32"])
def test_filter_scans_each_exact_duplicate_once_and_keeps_the_lowest_id(kind):
    g = torch.Generator().manual_seed(5)
    base = torch.randn(300, 40, generator=g)
    c = torch.cat([base, base[:100], base[:50]])[torch.randperm(450, generator=g)]
    stats = _nearest_cpu.codebook_stats(c, kind, "l2")
    assert stats.stats.norm.shape[0] == torch.unique(c, dim=0).shape[0] == 300
    x = torch.cat([c[:60] + 1e-4 * torch.randn(60, 40, generator=g), c[:60]])
    for metric in ("l2", "ip", "cos"):
        ids, dists = _nearest_cpu.nearest_cpu(x, c, metric, kind)
        assert_nearest_ok(ids, dists, x, c, metric, exact=True, rel_tol=2e-7)
        want = _nearest_cpu.exact_scan(x, c, metric)[0]
        assert torch.equal(ids, want)  # lowest id among the copies


def test_deferred_block_with_masses_of_candidates_goes_to_the_flat_search(monkeypatch):
    # 600 distinct codewords within the filter's bound of every query: the block's smallest 32 are
    # measured, the rest re-checked against the final bound, and a query with more than
    # DEFERRED_CAP of them is settled by the flat search, exactly
    g = torch.Generator().manual_seed(6)
    center = torch.randn(64, generator=g)
    c = torch.cat([center + 1e-6 * torch.randn(600, 64, generator=g), torch.randn(400, 64, generator=g)])
    x = torch.cat([center + 1e-6 * torch.randn(10, 64, generator=g), torch.randn(400, 64, generator=g)])
    monkeypatch.setattr(_nearest_cpu, "CODE_BLOCK", 256)
    flat = []
    real_flat = _nearest_cpu._flat_search
    monkeypatch.setattr(_nearest_cpu, "_flat_search", lambda xq, *a, **kw: flat.append(xq.shape[0]) or real_flat(xq, *a, **kw))
    ids, dists = _nearest_cpu.nearest_cpu(x, c, "l2", "int8x2")
    assert torch.equal(ids, _nearest_cpu.exact_scan(x, c, "l2")[0])
    assert flat == [10]


def test_duplicate_detection_runs_once_per_codebook_for_every_path(monkeypatch):
    # the int8, int8x2 and flat paths all scan the distinct rows: one hash of the codebook serves them
    hashes = []
    real = _nearest_cpu.first_of_duplicates
    monkeypatch.setattr(_nearest_cpu, "first_of_duplicates", lambda c: hashes.append(1) or real(c))
    g = torch.Generator().manual_seed(8)
    c = torch.randn(500, 40, generator=g)
    c = torch.cat([c, c[:50]])
    x = torch.randn(60, 40, generator=g)
    for kind in ("int8", "int8x2", "flat"):
        ids, dists = _nearest_cpu.nearest_cpu(x, c, "l2", kind)
        assert_nearest_ok(ids, dists, x, c, "l2", exact=True, rel_tol=2e-7)
    assert len(hashes) == 1
    c.add_(0.0)  # an in-place change: the codebook is hashed again
    _nearest_cpu.nearest_cpu(x, c, "l2", "int8")
    assert len(hashes) == 2


@pytest.mark.skipif(not _nearest_cpu.native_epilogue(), reason="no working C compiler for the native epilogue")
@pytest.mark.parametrize("lo", [False, True])
@pytest.mark.parametrize("l2", [False, True])
def test_native_filter_epilogue_matches_the_torch_passes(lo, l2):
    from unicode2_fast import _native

    g = torch.Generator().manual_seed(3)
    m, w = 37, 2 * _nearest_cpu.GROUP_WIDTH + 5  # a short last group
    hi = torch.randint(-2 ** 20, 2 ** 20, (m, w), generator=g, dtype=torch.int32)
    low = torch.randint(-2 ** 12, 2 ** 12, (m, w), generator=g, dtype=torch.int32) if lo else None
    cscale, neg = torch.rand(w, generator=g) * 1e-3, -torch.rand(m, generator=g)
    csq = torch.rand(w, generator=g) * 10 if l2 else None
    approx = torch.empty(m, w)
    minima = torch.empty(m, 3)
    _native.filter_epilogue(hi, low, _nearest_cpu.X2_BASE, cscale, csq, neg, approx, minima, _nearest_cpu.GROUP_WIDTH)
    dots = hi.clone() if low is None else low.clone().add_(hi, alpha=_nearest_cpu.X2_BASE)
    want = dots.float().mul_(cscale)
    want = torch.addcmul(csq, want, neg.unsqueeze(1)) if l2 else want.mul_(neg.unsqueeze(1))
    torch.testing.assert_close(approx, want, rtol=2 ** -22, atol=0)  # an fp32 rounding apart at most
    groups = _nearest_cpu._GroupMinima(approx)  # the torch group minima of the C values
    assert torch.equal(minima, groups.minima)


@pytest.mark.parametrize("name", ["photos", "clustered", "duplicates"])
@pytest.mark.parametrize("kind", ["int8", "int8x2"])
@pytest.mark.parametrize("metric", METRICS)
def test_filter_is_exact_with_and_without_the_native_epilogue(name, kind, metric, monkeypatch):
    if name == "photos" and metric == "cos":
        pytest.skip("black patches: zero rows have no cosine (u2.nearest refuses them)")
    c, x = _real_or_adversarial(name)
    results = []
    for native in (False, True):
        monkeypatch.setattr(_nearest_cpu, "native_epilogue", lambda: native)
        ids, dists = _nearest_cpu.nearest_cpu(x, c, metric, kind)
        assert_nearest_ok(ids, dists, x, c, metric, exact=True, rel_tol=2e-7)
        results.append((ids, dists))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_zero_row_check_names_the_first_zero_row_in_bounded_chunks(dtype, monkeypatch):
    # cos refuses zero rows; the check reads fp32 rows by their float64 norms (one compiled pass)
    # and other dtypes in chunks of rows, never an (R, d) bool temporary of the whole codebook
    from unicode2_fast import _checks

    monkeypatch.setattr(_checks, "ZERO_CHECK_ELEMENTS", 64)  # 4 rows of 16 per chunk
    compared = []
    real_eq = torch.Tensor.__eq__
    monkeypatch.setattr(torch.Tensor, "__eq__", lambda a, b: compared.append(a.numel()) or real_eq(a, b))
    rows = torch.randn(23, 16, dtype=torch.float64).to(dtype)
    rows[9, 3] = 2.0 ** -149 if dtype == torch.float32 else rows[9, 3]  # a subnormal alone: not zero
    rows[9, :3], rows[9, 4:] = 0, 0
    _checks.check_no_zero_rows(rows, "codebook")
    rows[13], rows[17] = 0, 0
    with pytest.raises(ValueError, match="codebook row 13 is the zero vector"):
        _checks.check_no_zero_rows(rows, "codebook")
    with pytest.raises(ValueError, match="row 13 is the zero vector"):
        u2.nearest(rows[:2].float(), rows.float(), metric="cos")
    wide = torch.ones(23, 32, dtype=dtype)
    wide[:, ::2] = rows  # a strided view (every other column): read in chunks, not copied whole
    with pytest.raises(ValueError, match="codebook row 13 is the zero vector"):
        _checks.check_no_zero_rows(wide[:, ::2], "codebook")
    assert max(compared, default=0) <= 64
