"""The one backend resolver every op uses: the same rules for nearest, hierarchical, embedding,
sparse_adamw and cross_entropy (it only reads the device type, so CUDA cases run on the CPU)."""
import pytest
import torch

from unicode2_fast import _dispatch, _native

CUDA = torch.device("cuda")
CPU = torch.device("cpu")
OPS = sorted(_dispatch.OP_BACKENDS)


@pytest.mark.parametrize("op", OPS)
def test_auto_sends_float64_on_cuda_to_torch(op):
    assert _dispatch.resolve(op, "auto", CUDA, (torch.float64,)) == "torch"
    assert _dispatch.resolve(op, "auto", CUDA, (torch.float32, torch.float64)) == "torch"


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_auto_picks_a_kernel_on_cuda_and_torch_on_cpu(op, dtype, monkeypatch):
    monkeypatch.setattr(_dispatch, "cce_available", lambda: False)
    assert _dispatch.resolve(op, "auto", CUDA, (dtype,)) == "triton"
    native = "native" in _dispatch.OP_BACKENDS[op] and dtype == torch.float32
    monkeypatch.setattr(_native, "available", lambda: True)
    assert _dispatch.resolve(op, "auto", CPU, (dtype,)) == ("native" if native else "torch")
    monkeypatch.setattr(_native, "available", lambda: False)
    assert _dispatch.resolve(op, "auto", CPU, (dtype,)) == "torch"


def test_auto_prefers_cce_for_cross_entropy_when_installed(monkeypatch):
    monkeypatch.setattr(_dispatch, "cce_available", lambda: True)
    assert _dispatch.resolve("cross_entropy", "auto", CUDA, (torch.bfloat16,)) == "cce"
    assert _dispatch.resolve("nearest", "auto", CUDA, (torch.bfloat16,)) == "triton"


@pytest.mark.parametrize("op", OPS)
def test_explicit_triton_rules(op, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        _dispatch.resolve(op, "triton", CPU, (torch.float32,))
    with pytest.raises(TypeError, match="float64 input needs backend='torch'"):
        _dispatch.resolve(op, "triton", CUDA, (torch.float64,))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _dispatch.resolve(op, "triton", CPU, (torch.float32,)) == "triton"


@pytest.mark.parametrize("op", OPS)
def test_unknown_backend_names_the_choices(op):
    with pytest.raises(ValueError, match=r"unknown backend 'bogus'; expected one of"):
        _dispatch.resolve(op, "bogus", CPU, (torch.float32,))


def test_op_specific_backends():
    assert _dispatch.resolve("nearest", "faiss", CPU, (torch.float64,)) == "faiss"
    with pytest.raises(ValueError, match="CPU indexes"):
        _dispatch.resolve("nearest", "faiss", CUDA, (torch.float32,))
    with pytest.raises(ValueError, match="unknown backend 'faiss'"):
        _dispatch.resolve("embedding", "faiss", CPU, (torch.float32,))
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        _dispatch.resolve("cross_entropy", "cce", CPU, (torch.float32,))


def test_dtype_promotion():
    assert _dispatch.kernel_dtype(torch.bfloat16, torch.float16) == torch.float32
    assert _dispatch.kernel_dtype(torch.bfloat16, torch.bfloat16) == torch.bfloat16
    assert _dispatch.kernel_dtype(torch.float16, torch.float32) == torch.float32
    assert _dispatch.torch_dtype(torch.zeros(1, dtype=torch.bfloat16), None) == torch.float32
    assert _dispatch.torch_dtype(torch.zeros(1), torch.zeros(1, dtype=torch.float64)) == torch.float64
