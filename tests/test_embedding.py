"""u2.gathered_embedding: forward == weight[ids], row-sparse backward on every backend against
torch.nn.Embedding and a float64 reference; odd shapes, duplicates, determinism, bad input."""
import os

import numpy as np
import pytest
import torch

import unicode2_fast as u2
from unicode2_fast import embedding as embedding_module
from unicode2_fast.kernels import embedding as kernel

interpret = os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(
    not (interpret or torch.cuda.is_available()), reason="needs CUDA or TRITON_INTERPRET=1"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (K, d, N): 1, 7, 129, 1153, N = 0, N far above K (many duplicates); the interpreter runs one
# program per (unique id, 128 columns), so the wide shapes keep K small
SHAPES = [(1, 1, 5), (7, 7, 30), (129, 129, 500), (7, 1153, 40), (129, 1, 50), (129, 7, 0), (3, 1152, 20)]


def _backends():
    return ["torch", "triton"] if interpret or torch.cuda.is_available() else ["torch"]


def _zipf_ids(k, n, seed, shape=None):
    # p(id) ~ 1 / (id + 1): a few hot ids repeated many times and a long tail
    g = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, k + 1, dtype=torch.float64)
    ids = torch.multinomial(weights, n, replacement=True, generator=g) if n else torch.empty(0, dtype=torch.int64)
    return ids.reshape(shape) if shape else ids


def _data(k, d, n, dtype=torch.float32, seed=0, shape=None):
    g = torch.Generator().manual_seed(seed + 1)
    weight = torch.randn(k, d, generator=g).to(dtype)
    ids = _zipf_ids(k, n, seed, shape)
    upstream = torch.randn(*ids.shape, d, generator=g).to(dtype)
    return weight, ids, upstream


def _dense_truth(ids, upstream, k):
    """float64 dense weight gradient of weight[ids] with upstream gradient ``upstream``."""
    d = upstream.shape[-1]
    truth = torch.zeros(k, d, dtype=torch.float64)
    return truth.index_add_(0, ids.reshape(-1).cpu(), upstream.reshape(-1, d).double().cpu())


def _u2_grad(weight, ids, upstream, backend):
    w = weight.clone().to(DEVICE).requires_grad_(True)
    out = u2.gathered_embedding(ids.to(DEVICE), w, backend=backend)
    (grad,) = torch.autograd.grad(out, w, upstream.to(DEVICE))
    return out, grad


def _assert_sparse_rows(grad, ids, k, d, dtype):
    assert grad.is_sparse and grad.is_coalesced()
    assert grad.shape == (k, d) and grad.sparse_dim() == 1 and grad.dense_dim() == 1
    assert grad.dtype == dtype
    unique = torch.unique(ids.reshape(-1).cpu())
    assert torch.equal(grad._indices()[0].cpu(), unique)
    assert grad._values().shape == (unique.numel(), d)  # U x d values, never a K x d dense block


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("k,d,n", SHAPES)
def test_matches_nn_embedding(k, d, n, backend):
    weight, ids, upstream = _data(k, d, n, seed=k + d + n)
    out, grad = _u2_grad(weight, ids, upstream, backend)
    assert torch.equal(out.cpu(), weight[ids])
    _assert_sparse_rows(grad, ids, k, d, torch.float32)

    reference = torch.nn.Embedding.from_pretrained(weight.clone(), freeze=False)
    reference(ids).backward(upstream)
    truth = _dense_truth(ids, upstream, k)
    # fp32 backends: within the error torch's own fp32 backward makes, plus a small eps
    torch_err = (reference.weight.grad.double() - truth).abs().max().item()
    ours = grad.to_dense().cpu().double()
    assert (ours - truth).abs().max().item() <= 2 * torch_err + 1e-5
    torch.testing.assert_close(grad.to_dense().cpu(), reference.weight.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", _backends())
def test_leading_index_dims_and_int32(backend):
    weight, ids, upstream = _data(20, 9, 24, seed=3, shape=(2, 3, 4))
    for index in (ids, ids.to(torch.int32)):
        out, grad = _u2_grad(weight, index, upstream, backend)
        assert out.shape == (2, 3, 4, 9)
        assert torch.equal(out.cpu(), weight[ids])
        _assert_sparse_rows(grad, ids, 20, 9, torch.float32)
        truth = _dense_truth(ids, upstream, 20)
        torch.testing.assert_close(grad.to_dense().cpu().double(), truth, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", _backends())
def test_empty_indices(backend):
    weight, _, _ = _data(5, 3, 0)
    w = weight.clone().to(DEVICE).requires_grad_(True)
    ids = torch.empty(2, 0, dtype=torch.int64, device=DEVICE)
    out = u2.gathered_embedding(ids, w, backend=backend)
    assert out.shape == (2, 0, 3)
    out.sum().backward()
    assert w.grad.is_sparse and w.grad._nnz() == 0 and w.grad.shape == (5, 3)


@pytest.mark.parametrize("backend", _backends())
def test_deterministic_bitwise(backend):
    # 600 gathers of 40 rows: the hottest id repeats ~130 times, the fp32 sums depend on the order
    weight, ids, upstream = _data(40, 257, 600, seed=11)
    grads = [_u2_grad(weight, ids, upstream, backend)[1] for _ in range(2)]
    assert torch.equal(grads[0]._indices(), grads[1]._indices())
    assert torch.equal(grads[0]._values(), grads[1]._values())


@pytest.mark.parametrize("backend", _backends())
def test_grad_accumulates_over_two_backward_calls(backend):
    weight, ids_a, up_a = _data(50, 17, 60, seed=4)
    _, ids_b, up_b = _data(50, 17, 45, seed=5)
    w = torch.nn.Parameter(weight.clone().to(DEVICE))
    u2.gathered_embedding(ids_a.to(DEVICE), w, backend=backend).backward(up_a.to(DEVICE))
    u2.gathered_embedding(ids_b.to(DEVICE), w, backend=backend).backward(up_b.to(DEVICE))
    assert w.grad.is_sparse
    truth = _dense_truth(ids_a, up_a, 50) + _dense_truth(ids_b, up_b, 50)
    torch.testing.assert_close(w.grad.to_dense().cpu().double(), truth, rtol=1e-6, atol=1e-5)
    # the accumulated grad coalesces to exactly the union of the ids
    union = torch.unique(torch.cat([ids_a, ids_b]))
    assert torch.equal(w.grad.coalesce()._indices()[0].cpu(), union)


@pytest.mark.parametrize("backend", _backends())
def test_gradient_flows_to_other_inputs(backend):
    # the rows feed further computation; the table gets a sparse grad, the other input a dense one
    weight, ids, _ = _data(30, 8, 25, seed=6)
    w = torch.nn.Parameter(weight.clone().to(DEVICE))
    scale = torch.randn(8, device=DEVICE, requires_grad=True)
    (u2.gathered_embedding(ids.to(DEVICE), w, backend=backend) * scale).pow(2).sum().backward()
    w_ref = torch.nn.Parameter(weight.clone().to(DEVICE))
    scale_ref = scale.detach().clone().requires_grad_(True)
    (torch.nn.functional.embedding(ids.to(DEVICE), w_ref) * scale_ref).pow(2).sum().backward()
    torch.testing.assert_close(w.grad.to_dense(), w_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scale.grad, scale_ref.grad, rtol=1e-5, atol=1e-4)


def test_bf16_table_accumulates_in_fp32():
    # 300 copies of one id: bf16 accumulation would lose most of the sum, fp32 accumulation
    # rounds once, so the result is the float64 sum rounded to bf16 (within one bf16 step)
    weight, _, _ = _data(4, 16, 0, dtype=torch.bfloat16)
    ids = torch.full((300,), 2)
    g = torch.Generator().manual_seed(7)
    upstream = (torch.rand(300, 16, generator=g) + 0.5).to(torch.bfloat16)
    w = weight.clone().requires_grad_(True)
    out = u2.gathered_embedding(ids, w)
    assert out.dtype == torch.bfloat16
    out.backward(upstream)
    assert w.grad.dtype == torch.bfloat16
    truth = upstream.double().sum(dim=0)
    ours = w.grad.to_dense()[2].double()
    assert ((ours - truth).abs() / truth).max().item() <= 2.0 ** -8


@needs_triton
def test_triton_fp16_within_torch_error():
    # the kernel sums fp16 rows in fp32 and rounds once: no worse than torch's fp16 backward
    weight, ids, upstream = _data(37, 200, 300, dtype=torch.float16, seed=8)
    unique_ids, values = kernel.embedding_backward_triton(upstream.to(DEVICE), ids.to(DEVICE))
    assert values.dtype == torch.float16
    truth = _dense_truth(ids, upstream, 37)[unique_ids.cpu()]
    reference = torch.nn.Embedding.from_pretrained(weight.clone(), freeze=False)
    reference(ids).backward(upstream)
    torch_err = (reference.weight.grad.double()[unique_ids.cpu()] - truth).abs().max().item()
    assert (values.cpu().double() - truth).abs().max().item() <= torch_err + 1e-3


@needs_triton
def test_triton_matches_torch_path_strided_upstream():
    # a non-contiguous upstream gradient (every other column of a wider buffer)
    weight, ids, _ = _data(60, 70, 200, seed=9)
    wide = torch.randn(200, 140)
    upstream = wide[:, ::2]
    ids_t, values_t = kernel.embedding_backward_triton(upstream.to(DEVICE), ids.to(DEVICE))
    ids_r, values_r = embedding_module.embedding_backward_torch(upstream, ids)
    assert torch.equal(ids_t.cpu(), ids_r)
    torch.testing.assert_close(values_t.cpu(), values_r, rtol=1e-6, atol=1e-5)


@needs_triton
def test_triton_int64_offsets(tmp_path):
    # Upstream rows lie more than 2^31 elements apart in a sparse memory-mapped file: offset
    # arithmetic in int32 would wrap and read the wrong rows (or fault).
    if torch.cuda.is_available():
        pytest.skip("the sparse-file view is a CPU (interpreter) construction")
    d = 16
    row_stride = 2**31 + 32
    storage = np.memmap(tmp_path / "sparse.bin", dtype=np.float16, mode="w+", shape=(2 * row_stride + d,))
    rows = torch.arange(3 * d, dtype=torch.float16).reshape(3, d)
    for i in range(3):
        storage[i * row_stride:i * row_stride + d] = rows[i].numpy()
    upstream = torch.from_numpy(storage).as_strided((3, d), (row_stride, 1))
    unique_ids, values = kernel.embedding_backward_triton(upstream, torch.tensor([5, 2, 5]))
    assert unique_ids.tolist() == [2, 5]
    assert torch.equal(values, torch.stack([rows[1], rows[0] + rows[2]]))


def test_sorted_segments_are_stable():
    ids = torch.tensor([4, 1, 4, 0, 1, 4])
    unique_ids, order, seg_offsets = kernel.sorted_segments(ids)
    assert unique_ids.tolist() == [0, 1, 4]
    assert order.tolist() == [3, 1, 4, 0, 2, 5]  # equal ids keep their original order
    assert seg_offsets.tolist() == [0, 1, 3, 6]


def test_numpy_indices_and_no_grad_table():
    weight, ids, _ = _data(10, 4, 12, seed=10)
    out = u2.gathered_embedding(ids.numpy(), weight)
    assert torch.equal(out, weight[ids])
    assert not out.requires_grad


# --- bad input ---------------------------------------------------------------------------------

def test_out_of_range_id_names_it_and_k():
    w = torch.randn(5, 3, requires_grad=True)
    with pytest.raises(ValueError, match=r"id 7 \(flat position 2\).*K = 5"):
        u2.gathered_embedding(torch.tensor([0, 4, 7]), w)
    with pytest.raises(ValueError, match=r"id 5 .*K = 5 rows: valid ids are 0\.\.4"):
        u2.gathered_embedding(torch.tensor([[5]]), w)


def test_negative_id_names_it():
    w = torch.randn(5, 3, requires_grad=True)
    with pytest.raises(ValueError, match=r"id -1 \(flat position 1\).*K = 5.*negative"):
        u2.gathered_embedding(torch.tensor([2, -1]), w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool, torch.int16])
def test_non_integer_or_narrow_ids_raise_type_error(dtype):
    w = torch.randn(5, 3, requires_grad=True)
    with pytest.raises(TypeError, match="indices must be an int32 or int64 tensor"):
        u2.gathered_embedding(torch.tensor([0, 1]).to(dtype), w)


def test_bad_weight():
    with pytest.raises(ValueError, match="weight must be a 2-D"):
        u2.gathered_embedding(torch.tensor([0]), torch.randn(5))
    with pytest.raises(TypeError, match="weight must be a floating tensor"):
        u2.gathered_embedding(torch.tensor([0]), torch.ones(5, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        u2.gathered_embedding(torch.tensor([0]), np.ones((5, 3), dtype=np.float32))


def test_bad_backend():
    w = torch.randn(5, 3, requires_grad=True)
    with pytest.raises(ValueError, match="unknown backend 'faiss'"):
        u2.gathered_embedding(torch.tensor([0]), w, backend="faiss")
    if interpret or torch.cuda.is_available():
        with pytest.raises(TypeError, match="float64"):
            u2.gathered_embedding(torch.tensor([0]), w.double().to(DEVICE), backend="triton")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        u2.gathered_embedding(torch.tensor([0]), torch.randn(5, 3, requires_grad=True), backend="triton")


def test_cpu_rows_and_gradient_memory_is_reused_only_once_released():
    # the gather output and the gradient sums come from buffers kept per table: handed out
    # again once the previous tensors are gone, never while somebody still holds them
    weight = torch.nn.Parameter(torch.randn(50, 16))
    ids = torch.tensor([3, 7, 3, 40])
    upstream = torch.randn(4, 16)
    rows = u2.gathered_embedding(ids, weight)
    first_rows = rows.data_ptr()
    rows.backward(upstream)
    first_grad = weight.grad._values().data_ptr()
    kept = u2.gathered_embedding(ids, weight)  # the first rows are still alive: fresh memory
    assert kept.data_ptr() != first_rows and torch.equal(rows, kept)
    kept_rows = kept.data_ptr()  # the buffer kept from now on
    del rows, kept
    weight.grad = None
    again = u2.gathered_embedding(torch.tensor([1, 2, 1, 9]), weight)
    assert again.data_ptr() == kept_rows  # released: reused
    assert torch.equal(again, weight.detach()[[1, 2, 1, 9]])
    again.mul_(2.0)  # not a view: in-place ops work as on any tensor
    again.backward(upstream)
    assert weight.grad._values().data_ptr() == first_grad
    reference = torch.zeros(50, 16)
    reference.index_add_(0, torch.tensor([1, 2, 1, 9]), 2.0 * upstream)
    torch.testing.assert_close(weight.grad.to_dense(), reference)
    # a gradient still held (accumulating a second backward) is never overwritten
    u2.gathered_embedding(torch.tensor([1, 2, 1, 9]), weight).backward(upstream)
    torch.testing.assert_close(weight.grad.to_dense(), 1.5 * reference)


def test_reused_memory_is_never_shared_memory_nor_far_larger_than_asked():
    from unicode2_fast import _cache

    weight = torch.randn(10, 4)
    a = _cache.reused_buffer(weight, "t", (100, 4), torch.float32)
    a.share_memory_()  # sent to another process, which may still read it after we drop ours
    shared = a.data_ptr()
    del a
    b = _cache.reused_buffer(weight, "t", (100, 4), torch.float32)
    assert not b.untyped_storage().is_shared() and b.data_ptr() != shared
    del b
    small = _cache.reused_buffer(weight, "t", (10, 4), torch.float32)  # 1/10 of the kept storage
    assert small.untyped_storage().nbytes() == 10 * 4 * 4
    del small
    big = _cache.reused_buffer(weight, "huge", (1, _cache.REUSE_MAX_BYTES // 4 + 1), torch.float32)
    del big
    assert "huge" not in _cache._BUFFERS[weight]  # a one-off huge request is not kept
