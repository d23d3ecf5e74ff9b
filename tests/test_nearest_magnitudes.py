"""u2.nearest at extreme magnitudes: every backend and metric gives the float64 argmin (ids always
in [0, K)) or, where a distance does not fit the float32 dists, a clear error -- never id K,
inf distances or FAISS's -1."""
import math

import pytest
import torch

import unicode2_fast as u2

from reference import assert_nearest_ok, objective64

FP32_MAGNITUDES = [1e-30, 1e-20, 1e-10, 1.0, 1e10, 1e20, 1e30]
FP64_MAGNITUDES = [1e-300, 1e-150, 1e-30, 1.0, 1e30, 1e150, 1e300]
FP32_MAX = torch.finfo(torch.float32).max


def _reference(x, c, metric):
    """(x', c', power): both scaled exactly by one power of two into range, and the power of two
    that turns their float64 objective into the original one."""
    largest = max(x.abs().max().item(), c.abs().max().item())
    exponent = math.frexp(largest)[1]
    xs = torch.ldexp(x.double(), torch.tensor(-exponent))
    cs = torch.ldexp(c.double(), torch.tensor(-exponent))
    return xs, cs, 0 if metric == "cos" else 2 * exponent


def _unscale(values, power):
    return torch.ldexp(values.double(), torch.tensor(power))


def _check(x, c, metric, backend, exact):
    xs, cs, power = _reference(x, c, metric)
    true_min = _unscale(objective64(xs, cs, metric).min(dim=1).values.abs().max(), power).item()
    if true_min > FP32_MAX:
        with pytest.raises(ValueError, match="float32 range of dists"):
            u2.nearest(x, c, metric=metric, backend=backend)
        return
    ids, dists = u2.nearest(x, c, metric=metric, backend=backend)
    _assert_matches(ids, dists, xs, cs, power, metric, exact)


def _assert_matches(ids, dists, xs, cs, power, metric, exact):
    """ids: the float64 argmin of the scaled inputs (near-ties allowed unless exact); dists: the
    float32 rounding of the chosen codes' true distances (0 where those underflow float32)."""
    assert bool(((ids >= 0) & (ids < cs.shape[0])).all())
    assert bool(torch.isfinite(dists).all())
    chosen = objective64(xs, cs, metric).gather(1, ids.reshape(-1, 1)).squeeze(1)
    assert_nearest_ok(ids, chosen, xs, cs, metric, exact=exact, rel_tol=0.0 if exact else 2e-5)
    expected = _unscale(chosen, power).float()
    # absolute slack: rounding of the distances' terms (2^power scale), or float32 underflow
    atol = max(torch.finfo(torch.float32).tiny, _unscale(torch.tensor(2e-5), power).item())
    assert torch.allclose(dists.double(), expected.double(), rtol=2e-5, atol=atol), (dists[:4], expected[:4])


def _data(n, k, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)


@pytest.mark.parametrize("metric", ["l2", "ip", "cos"])
@pytest.mark.parametrize("magnitude", FP32_MAGNITUDES)
@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_fp32_magnitudes(backend, magnitude, metric):
    x, c = _data(23, 300, 24, 0)
    _check(x * magnitude, c * magnitude, metric, backend, exact=backend == "torch")


@pytest.mark.parametrize("metric", ["l2", "ip", "cos"])
@pytest.mark.parametrize("magnitude", FP64_MAGNITUDES)
@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_fp64_magnitudes(backend, magnitude, metric):
    x, c = _data(23, 300, 24, 1)
    _check(x.double() * magnitude, c.double() * magnitude, metric, backend, exact=backend == "torch")


@pytest.mark.parametrize("metric", ["l2", "ip", "cos"])
@pytest.mark.parametrize("magnitude", [1e-30, 1.0, 1e30])
def test_triton_magnitudes(magnitude, metric, monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, c = _data(9, 70, 32, 2)
    x, c = (x * magnitude).to(device), (c * magnitude).to(device)
    xs, cs, power = _reference(x.cpu(), c.cpu(), metric)
    true_min = _unscale(objective64(xs, cs, metric).min(dim=1).values.abs().max(), power).item()
    if true_min > FP32_MAX:
        with pytest.raises(ValueError, match="float32 range of dists"):
            u2.nearest(x, c, metric=metric, backend="triton")
        return
    ids, dists = u2.nearest(x, c, metric=metric, backend="triton")
    _assert_matches(ids.cpu(), dists.cpu(), xs, cs, power, metric, exact=False)


@pytest.mark.parametrize("x_scale, c_scale", [(1e12, 1.0), (1.0, 1e12), (1e-12, 1.0), (1e20, 1e-20)])
@pytest.mark.parametrize("filter_kind", ["bf16", "int8", "int8x2", "fbgemm", "fp32", "fp64"])
def test_queries_far_from_the_codebook(x_scale, c_scale, filter_kind, monkeypatch):
    # the landed code returned id K for 50 of 200 rows of randn * 1e12 against randn (K = 5000):
    # pair-space bounds lost to fp64 rounding when ||x||^2 dwarfs the codebook's spread
    from unicode2_fast import _nearest_cpu, _scan_bf16

    if filter_kind == "fbgemm" and _nearest_cpu.fbgemm_speedup() == 0:
        pytest.skip("no working fbgemm dynamic quantized linear")
    if filter_kind == "bf16":  # the automatic choice's bf16 scan (l2, K <= SCAN_MAX_K)
        if not _scan_bf16.available():
            pytest.skip("no AVX-512 BF16 here")
    else:  # the filter engine, past the scan
        monkeypatch.setattr(_nearest_cpu, "SCAN_MAX_K", 0)
        monkeypatch.setattr(_nearest_cpu, "choose_filter", lambda n, k, d: filter_kind)
    x, c = _data(200, 5000, 128, 3)
    _check(x * x_scale, c * c_scale, "l2", "torch", exact=True)


@pytest.mark.parametrize("metric", ["l2", "cos"])
def test_issue_examples(metric):
    x = torch.tensor([[1e12, 0.0]])
    c = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    ids, dists = u2.nearest(x, c)
    assert ids.tolist() == [1] and dists.item() == pytest.approx(1e24, rel=1e-6)
    tiny = torch.tensor([[1e-30, 0.0], [0.0, 1e-30]])
    assert u2.nearest(torch.tensor([[1e-30, 0.0]]), tiny, metric=metric)[0].tolist() == [0]
    assert u2.nearest(torch.tensor([[1e-30, 2e-30]]), torch.eye(2), metric="cos")[0].tolist() == [1]



@pytest.mark.parametrize("scale", [1e-19, 1e-21, 1e-24])
@pytest.mark.parametrize("filter_kind", ["int8", "int8x2", "fp32"])
def test_tiny_codewords_against_large_queries_keep_their_bounds(scale, filter_kind):
    # the largest magnitude (the queries') is in range, so nothing is rescaled; fp32 squares of the
    # codewords' quantisation residuals and norms underflow, and a bound that underflows let the
    # int8x2 filter discard the nearest codeword (160 of 400 wrong at 1e-19)
    from unicode2_fast import _nearest_cpu

    torch.manual_seed(1)
    c = torch.randn(4096, 32) * scale
    x = torch.randint(-127, 128, (400, 32)).float()
    x[:, 0] = 127  # exactly quantisable queries
    best = (-(x.double() @ c.double().t())).argmin(dim=1)
    near = torch.stack([c[best[i]] + scale * 2.0 ** -(12 + i % 12) * torch.randn(32) for i in range(400)])
    c = torch.cat([c, near])  # near ties at every depth of the filter's bound
    want = (-(x.double() @ c.double().t())).argmin(dim=1)
    ids, _ = _nearest_cpu.nearest_cpu(x, c, "ip", filter_kind)
    assert torch.equal(ids, want)


@pytest.mark.parametrize("filter_kind", ["int8", "int8x2"])
def test_row_whose_quantisation_scale_underflows(filter_kind):
    # absmax / 127 == 0 in fp32 for a row of 1e-44: it is kept unscaled, not turned into NaN
    from unicode2_fast import _nearest_cpu

    x, c = _data(20, 300, 32, 7)
    c[5] = 0.0
    c[5, 0] = 1e-44
    for metric in ("ip", "l2"):
        ids, _ = _nearest_cpu.nearest_cpu(x, c, metric, filter_kind)
        want = objective64(x, c, metric).argmin(dim=1)
        assert torch.equal(ids, want)
