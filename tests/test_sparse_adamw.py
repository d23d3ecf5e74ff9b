"""u2.SparseRowAdamW: identical to torch.optim.AdamW when every row is touched, lazy per-row
semantics otherwise, state_dict round trip, schedulers, the Triton row update vs the torch path."""
import io
import math
import os

import numpy as np
import pytest
import torch

import unicode2_fast as u2
from unicode2_fast import _native
from unicode2_fast import sparse_adamw as optim_module
from unicode2_fast.kernels import sparse_adamw as kernel

interpret = os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(
    not (interpret or torch.cuda.is_available()), reason="needs CUDA or TRITON_INTERPRET=1"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HYPER = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _backends():
    # "native": the compiled CPU loops, where the C compiler works (it does on CI)
    native = ["native"] if DEVICE == "cpu" and _native.available() else []
    return ["torch", *native] + (["triton"] if interpret or torch.cuda.is_available() else [])


def _warmup_cosine(total):
    # the paper's schedule shape: linear warmup then cosine
    return lambda step: min(1.0, (step + 1) / 2) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


class _Model(torch.nn.Module):
    """A C2-like table (sparse grads via u2.gathered_embedding or dense via F.embedding), a dense
    projection and a bias, all in one param group."""

    def __init__(self, table, proj, bias, sparse):
        super().__init__()
        self.table = torch.nn.Parameter(table.clone())
        self.proj = torch.nn.Parameter(proj.clone())
        self.bias = torch.nn.Parameter(bias.clone())
        self.sparse = sparse

    def forward(self, ids):
        rows = u2.gathered_embedding(ids, self.table) if self.sparse else torch.nn.functional.embedding(ids, self.table)
        return rows @ self.proj + self.bias


def _init(k=13, d=7, out=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, d, generator=g), torch.randn(d, out, generator=g), torch.randn(out, generator=g)


def _batches(k, steps, seed=1, all_rows=True, n_extra=20):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        extra = torch.randint(0, k, (n_extra,), generator=g)
        out.append(torch.cat([torch.arange(k), extra]) if all_rows else extra)
    return out


def _train(model, optimizer, batches, scheduler=None, targets_seed=2):
    g = torch.Generator().manual_seed(targets_seed)
    for ids in batches:
        target = torch.randn(ids.shape[0], model.bias.shape[0], generator=g).to(model.bias.device)
        optimizer.zero_grad()
        (model(ids.to(model.bias.device)) - target).pow(2).mean().backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def _params_and_moments(model, optimizer):
    out = []
    for p in model.parameters():
        out += [p.detach(), optimizer.state[p]["exp_avg"], optimizer.state[p]["exp_avg_sq"]]
    return out


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("with_scheduler", [False, True])
def test_all_rows_touched_equals_adamw(backend, with_scheduler):
    table, proj, bias = _init()
    ours = _Model(table, proj, bias, sparse=True).to(DEVICE)
    reference = _Model(table, proj, bias, sparse=False).to(DEVICE)
    opt = u2.SparseRowAdamW(ours.parameters(), backend=backend, **HYPER)
    ref_opt = torch.optim.AdamW(reference.parameters(), **HYPER)
    schedulers = [None, None]
    if with_scheduler:
        schedulers = [torch.optim.lr_scheduler.LambdaLR(o, _warmup_cosine(6)) for o in (opt, ref_opt)]
    batches = _batches(13, 6)
    _train(ours, opt, batches, schedulers[0])
    _train(reference, ref_opt, batches, schedulers[1])
    assert ours.table.grad.is_sparse and not ours.proj.grad.is_sparse
    assert opt.state[ours.table]["row_step"].tolist() == [6] * 13
    pairs = list(zip(_params_and_moments(ours, opt), _params_and_moments(reference, ref_opt)))
    if backend == "torch" and DEVICE == "cpu":
        # the same element-wise ops in the same order: bit for bit
        for mine, theirs in pairs:
            assert torch.equal(mine, theirs)
    else:
        # the kernel rounds 1 - beta^step from float32 log2(beta); the native loop's sqrtf is
        # correctly rounded, torch's vectorised sqrt not always: an ulp here and there
        for mine, theirs in pairs:
            torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-7)
    assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]


def _row_adamw_reference(row0, grads, lr, betas, eps, weight_decay):
    """AdamW on one row alone, fed only the gradients of the steps that touched it."""
    row = torch.nn.Parameter(row0.clone().unsqueeze(0))
    opt = torch.optim.AdamW([row], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    for grad in grads:
        row.grad = grad.unsqueeze(0).clone()
        opt.step()
    return row.detach()[0]


@pytest.mark.parametrize("backend", _backends())
def test_lazy_rows_and_per_row_bias_correction(backend):
    k, d = 10, 6
    g = torch.Generator().manual_seed(3)
    table0 = torch.randn(k, d, generator=g)
    touched = [[1, 3], [3, 5, 5], [1], [3, 8]]  # row 5 twice in one step: its grads add
    weight = torch.nn.Parameter(table0.clone().to(DEVICE))
    opt = u2.SparseRowAdamW([weight], backend=backend, **HYPER)
    row_grads = {row: [] for row in range(k)}
    for step, ids in enumerate(touched):
        upstream = torch.randn(len(ids), d, generator=g)
        opt.zero_grad()
        u2.gathered_embedding(torch.tensor(ids, device=DEVICE), weight).backward(upstream.to(DEVICE))
        state_before = {key: value.clone() for key, value in opt.state[weight].items()}
        weight_before = weight.detach().clone()
        opt.step()
        untouched = torch.tensor(sorted(set(range(k)) - set(ids)), device=DEVICE)
        # untouched rows: parameters, moments and counts bit for bit as they were
        assert torch.equal(weight.detach()[untouched], weight_before[untouched])
        for key, value in opt.state[weight].items():
            if key in state_before:
                assert torch.equal(value[untouched], state_before[key][untouched]), key
        summed = torch.zeros(k, d).index_add_(0, torch.tensor(ids), upstream)
        for row in set(ids):
            row_grads[row].append(summed[row])
    counts = opt.state[weight]["row_step"].cpu()
    assert counts.dtype == torch.int64
    assert counts.tolist() == [len(row_grads[row]) for row in range(k)]
    for row in range(k):
        expected = _row_adamw_reference(table0[row], row_grads[row], HYPER["lr"], HYPER["betas"], HYPER["eps"],
                                        HYPER["weight_decay"]) if row_grads[row] else table0[row]
        torch.testing.assert_close(weight.detach()[row].cpu(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", [b for b in _backends() if b != "native"])  # bf16: native is fp32 only
def test_state_dict_round_trip_continues_identically(backend):
    table, proj, bias = _init(k=11, d=9, out=3, seed=4)
    first = _Model(table, proj, bias, sparse=True).to(DEVICE)
    # a bf16 table: its moments must stay fp32 and its counts int64 through the round trip
    first.table.data = first.table.data.to(torch.bfloat16)
    first.proj.data = first.proj.data.to(torch.bfloat16)
    first.bias.data = first.bias.data.to(torch.bfloat16)
    opt = u2.SparseRowAdamW(first.parameters(), backend=backend, **HYPER)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(6))
    batches = _batches(11, 6, seed=5, all_rows=False, n_extra=6)
    _train(first, opt, batches[:3], scheduler)

    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict(), "sched": scheduler.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    second = _Model(table, proj, bias, sparse=True).to(DEVICE)
    for p in second.parameters():
        p.data = p.data.to(torch.bfloat16)
    second.load_state_dict(saved["model"])
    opt2 = u2.SparseRowAdamW(second.parameters(), backend=backend, **HYPER)
    opt2.load_state_dict(saved["opt"])
    scheduler2 = torch.optim.lr_scheduler.LambdaLR(opt2, _warmup_cosine(6))
    scheduler2.load_state_dict(saved["sched"])
    state = opt2.state[second.table]
    assert state["exp_avg"].dtype == torch.float32 and state["exp_avg_sq"].dtype == torch.float32
    assert state["row_step"].dtype == torch.int64
    assert opt2.state[second.bias]["step"].dtype == torch.float32

    _train(first, opt, batches[3:], scheduler, targets_seed=9)
    _train(second, opt2, batches[3:], scheduler2, targets_seed=9)
    for mine, theirs in zip(_params_and_moments(first, opt), _params_and_moments(second, opt2)):
        assert torch.equal(mine, theirs)
    assert torch.equal(opt.state[first.table]["row_step"], opt2.state[second.table]["row_step"])


def test_accumulated_uncoalesced_grads_are_summed():
    table, _, _ = _init(k=8, d=4, seed=6)
    ours = torch.nn.Parameter(table.clone())
    reference = torch.nn.Parameter(table.clone())
    opt = u2.SparseRowAdamW([ours], **HYPER)
    ref_opt = torch.optim.AdamW([reference], **HYPER)
    g = torch.Generator().manual_seed(7)
    ids_a, ids_b = torch.arange(8), torch.tensor([7, 0, 0, 3, 1, 2, 4, 5, 6])
    up_a, up_b = torch.randn(8, 4, generator=g), torch.randn(9, 4, generator=g)
    for ids, up in ((ids_a, up_a), (ids_b, up_b)):
        u2.gathered_embedding(ids, ours).backward(up)
        torch.nn.functional.embedding(ids, reference).backward(up)
    opt.step()
    ref_opt.step()
    torch.testing.assert_close(ours.detach(), reference.detach(), rtol=1e-6, atol=1e-7)


def test_dense_grad_after_sparse_steps_updates_every_row():
    # once a parameter has per-row state, a dense gradient touches every row: AdamW on all rows
    table, _, _ = _init(k=6, d=3, seed=8)
    weight = torch.nn.Parameter(table.clone())
    opt = u2.SparseRowAdamW([weight], **HYPER)
    u2.gathered_embedding(torch.tensor([1, 4]), weight).sum().backward()
    opt.step()
    before = weight.detach().clone()
    opt.zero_grad()
    weight.grad = torch.ones_like(weight)
    opt.step()
    assert opt.state[weight]["row_step"].tolist() == [1, 2, 1, 1, 2, 1]
    assert not torch.equal(weight.detach()[0], before[0])


def test_sparse_grad_after_dense_steps_keeps_the_count():
    table, _, _ = _init(k=6, d=3, seed=9)
    weight = torch.nn.Parameter(table.clone())
    opt = u2.SparseRowAdamW([weight], **HYPER)
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.embedding(torch.arange(6), weight).sum().backward()
        opt.step()
    opt.zero_grad()
    u2.gathered_embedding(torch.tensor([2]), weight).sum().backward()
    opt.step()
    assert "step" not in opt.state[weight]
    assert opt.state[weight]["row_step"].tolist() == [2, 2, 3, 2, 2, 2]


def test_bf16_param_fp32_moments():
    table, _, _ = _init(k=9, d=16, seed=10)
    ours = torch.nn.Parameter(table.to(torch.bfloat16))
    reference = torch.nn.Parameter(table.to(torch.bfloat16).float())
    opt = u2.SparseRowAdamW([ours], **HYPER)
    ref_opt = torch.optim.AdamW([reference], **HYPER)
    g = torch.Generator().manual_seed(11)
    for _ in range(3):
        up = torch.randn(9, 16, generator=g)
        opt.zero_grad()
        ref_opt.zero_grad()
        u2.gathered_embedding(torch.arange(9), ours).backward(up.to(torch.bfloat16))
        torch.nn.functional.embedding(torch.arange(9), reference).backward(up.to(torch.bfloat16).float())
        opt.step()
        ref_opt.step()
        reference.data = reference.data.to(torch.bfloat16).float()  # the table is stored in bf16
    assert opt.state[ours]["exp_avg"].dtype == torch.float32
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.detach().float(), reference.detach(), rtol=0, atol=0)


# --- the Triton row update against the torch path ----------------------------------------------

def _row_problem(k, d, n_rows, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    param = torch.randn(k, d, generator=g).to(dtype)
    row_ids = torch.randperm(k, generator=g)[:n_rows].sort().values
    grad_rows = torch.randn(n_rows, d, generator=g).to(dtype)
    exp_avg = 0.1 * torch.randn(k, d, generator=g)
    exp_avg_sq = torch.rand(k, d, generator=g)
    row_step = torch.randint(1, 50, (k,), generator=g)
    return param, row_ids, grad_rows, exp_avg, exp_avg_sq, row_step


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("k,d,n_rows", [(1, 1, 1), (7, 7, 3), (129, 129, 50), (20, 1153, 7), (9, 1152, 9)])
def test_triton_row_update_matches_torch_path(k, d, n_rows, dtype):
    problem = _row_problem(k, d, n_rows, dtype, seed=k + d)
    hyper = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.05)
    mine = [t.clone().to(DEVICE) for t in problem]
    theirs = [t.clone() for t in problem]
    kernel.sparse_adamw_triton(*mine, **hyper)
    optim_module._row_adamw_torch(*theirs, **hyper)
    untouched = torch.ones(k, dtype=torch.bool)
    untouched[problem[1]] = False
    for name, a, b, original in zip(("param", "exp_avg", "exp_avg_sq"), (mine[0], mine[3], mine[4]),
                                    (theirs[0], theirs[3], theirs[4]), (problem[0], problem[3], problem[4])):
        a = a.cpu()
        assert torch.equal(a[untouched], original[untouched]), name
        if a.dtype == torch.float16:
            # one fp16 rounding of the same fp32 value, up to an ulp of the fp32 inputs
            torch.testing.assert_close(a.float(), b.float(), rtol=1e-3, atol=1e-3)
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert not torch.equal(a[~untouched], original[~untouched]), name


@needs_triton
def test_triton_row_update_int64_offsets(tmp_path):
    # Two rows of the parameter and of both moments lie more than 2^31 elements apart in sparse
    # memory-mapped files: int32 offset arithmetic would wrap and update the wrong rows.
    if torch.cuda.is_available():
        pytest.skip("the sparse-file view is a CPU (interpreter) construction")
    d = 16
    row_stride = 2**31 + 32

    def far_rows(name, dtype, values):
        storage = np.memmap(tmp_path / name, dtype=dtype, mode="w+", shape=(row_stride + d,))
        storage[:d] = values[0].numpy()
        storage[row_stride:] = values[1].numpy()
        return torch.from_numpy(storage).as_strided((2, d), (row_stride, 1))

    problem = _row_problem(2, d, 2, torch.float16, seed=12)
    param, row_ids, grad_rows, exp_avg, exp_avg_sq, row_step = problem
    hyper = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.05)
    far = [far_rows("p.bin", np.float16, param), far_rows("m.bin", np.float32, exp_avg),
           far_rows("v.bin", np.float32, exp_avg_sq)]
    kernel.sparse_adamw_triton(far[0], row_ids, grad_rows, far[1], far[2], row_step.clone(), **hyper)
    theirs = [t.clone() for t in problem]
    optim_module._row_adamw_torch(*theirs, **hyper)
    torch.testing.assert_close(far[0].float(), theirs[0].float(), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(far[1].clone(), theirs[3], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(far[2].clone(), theirs[4], rtol=1e-6, atol=1e-7)


# --- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1.0), "invalid learning rate"),
    (dict(eps=-1e-8), "invalid epsilon"),
    (dict(betas=(1.0, 0.95)), "invalid betas"),
    (dict(betas=(0.9, -0.1)), "invalid betas"),
    (dict(weight_decay=-0.1), "invalid weight_decay"),
    (dict(backend="cuda"), "unknown backend 'cuda'"),
])
def test_bad_hyper_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        u2.SparseRowAdamW([torch.nn.Parameter(torch.randn(3, 2))], **kwargs)


def test_element_sparse_grad_is_rejected():
    weight = torch.nn.Parameter(torch.randn(4, 3))
    weight.grad = torch.sparse_coo_tensor(torch.tensor([[0, 2], [1, 1]]), torch.tensor([1.0, 2.0]), (4, 3),
                                          check_invariants=True)
    with pytest.raises(ValueError, match="row-sparse gradients.*sparse_dim=2"):
        u2.SparseRowAdamW([weight]).step()


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    weight = torch.nn.Parameter(torch.randn(4, 3))
    u2.gathered_embedding(torch.tensor([1]), weight).sum().backward()
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        u2.SparseRowAdamW([weight], backend="triton").step()


@pytest.mark.parametrize("bad", [-1, 13, 1 << 40])
@pytest.mark.parametrize("backend", _backends())
def test_row_ids_outside_the_parameter_raise_before_any_change(backend, bad):
    # the Triton path did not bounds-check row ids: an id of K wrote beyond the parameter
    weight = torch.nn.Parameter(torch.randn(13, 7))
    before = weight.detach().clone()
    opt = u2.SparseRowAdamW([weight], lr=0.1, backend=backend)
    weight.grad = torch.sparse_coo_tensor(torch.tensor([[2, bad]]), torch.randn(2, 7), (13, 7),
                                          check_invariants=False)
    with pytest.raises(ValueError, match=r"row ids must lie in \[0, 13\)"):
        opt.step()
    assert torch.equal(weight.detach(), before)
    assert "row_step" not in opt.state[weight] and "exp_avg" not in opt.state[weight]


@needs_triton
def test_triton_kernel_checks_row_ids():
    param, grads = torch.randn(10, 4), torch.randn(2, 4)
    moments = [torch.zeros(10, 4), torch.zeros(10, 4)]
    with pytest.raises(ValueError, match=r"row_ids must lie in \[0, 10\)"):
        kernel.sparse_adamw_triton(param, torch.tensor([3, 10]), grads, *moments, torch.ones(10, dtype=torch.int64),
                                   lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)


def test_an_empty_sparse_gradient_changes_nothing():
    # a rank of a row-sharded table whose rows no id of the step touched gets an empty gradient
    weight = torch.nn.Parameter(torch.randn(6, 3))
    before = weight.detach().clone()
    opt = u2.SparseRowAdamW([weight], lr=0.1)
    weight.grad = torch.sparse_coo_tensor(torch.empty((1, 0), dtype=torch.int64), torch.empty(0, 3), (6, 3))
    opt.step()
    assert torch.equal(weight.detach(), before)
    weight.grad = torch.sparse_coo_tensor(torch.tensor([[2]]), torch.ones(1, 3), (6, 3))
    opt.step()
    assert not torch.equal(weight.detach()[2], before[2]) and torch.equal(weight.detach()[[0, 1, 3, 4, 5]], before[[0, 1, 3, 4, 5]])
