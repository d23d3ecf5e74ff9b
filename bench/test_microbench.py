"""Per-op microbenchmarks: each u2 op against its FAISS / torch baselines, one benchmark group per op.

    pytest bench/ --benchmark-only                       # all groups, about 2-3 minutes on 2 cores
    pytest bench/ --benchmark-only -k nearest            # one op
    U2F_BENCH_SCALE=0.05 pytest bench/ --benchmark-only  # smoke test (K x 0.05)

The methods are those of the bench_*.py scripts (which sweep shapes and write CSV / plots; these
time one modest shape per op). Data is built once per module; index builds, u2's first-call caches
and optimizer-state allocation happen before the timed function. Every benchmark checks its answer
(ids against FAISS's up to near-ties, losses and gradients against torch, step-1 updates against
Adam's closed form, held-out MSE against FAISS k-means), so a broken op fails instead of timing
garbage.
"""
from __future__ import annotations

import itertools
from types import SimpleNamespace
from typing import Callable, Tuple

import pytest
import torch

from unicode2_fast.bench import bench_cross_entropy, bench_embedding, bench_hierarchical, bench_kmeans, bench_nearest

import unicode2_fast as u2
from unicode2_fast.data import siglip_like

SEED = 0
#: two ids count as a near-tie when their float64 squared distances differ by at most this (relative)
TIE_RTOL = 1e-5


def describe(benchmark, k: int, n: int, d: int, **more) -> None:
    benchmark.extra_info.update({"K": k, "N": n, "d": d, **more})


def ids_of(pair) -> torch.Tensor:
    """The (N,) int64 ids of a search result: u2's (ids, dists) or FAISS's (dists, ids) with k = 1."""
    return torch.as_tensor(pair).reshape(-1).long()


def mismatches(ids: torch.Tensor, ref_ids: torch.Tensor, x: torch.Tensor, codebook: torch.Tensor) -> int:
    """How many queries got an id that differs from ``ref_ids`` by more than a near-tie.

    x: (N, d), codebook: (K, d), ids / ref_ids: (N,). Where the ids differ, both codewords' float64
    squared distances to the query are compared: equal within TIE_RTOL is a tie, not an error.
    """
    differ = (ids != ref_ids).nonzero().flatten()
    if differ.numel() == 0:
        return 0
    queries = x[differ].double()
    got = (queries - codebook[ids[differ]].double()).square().sum(dim=1)
    want = (queries - codebook[ref_ids[differ]].double()).square().sum(dim=1)
    return int((~torch.isclose(got, want, rtol=TIE_RTOL, atol=0.0)).sum())


# ----------------------------------------------------------------------------------------------
# nearest: exact nearest codeword


@pytest.fixture(scope="module")
def nearest_case(sizes):
    import faiss

    data = siglip_like(sizes.nearest_k, sizes.nearest_n, sizes.nearest_d, seed=SEED)
    index = faiss.IndexFlatL2(sizes.nearest_d)
    index.add(data.codebook.numpy())
    xs = data.queries.numpy()
    ref_dists, ref_ids = index.search(xs, 1)
    return SimpleNamespace(x=data.queries, codebook=data.codebook, xs=xs, index=index,
                           ref_ids=ids_of(ref_ids), ref_dists=torch.from_numpy(ref_dists[:, 0]))


def _nearest_method(method: str, case) -> Callable[[], Tuple[torch.Tensor, torch.Tensor]]:
    """The timed call of ``method``, returning (ids, dists); its one-time preparation done."""
    if method == "u2":
        u2.nearest(case.x, case.codebook)  # the first call builds the per-codebook statistics u2 caches
        return lambda: u2.nearest(case.x, case.codebook)
    if method == "faiss_flat":
        def search():
            dists, ids = case.index.search(case.xs, 1)
            return ids_of(ids), torch.from_numpy(dists[:, 0])
        return search
    return lambda: bench_nearest.matmul_argmin(case.x, case.codebook)[:2]


@pytest.mark.benchmark(group="nearest")
@pytest.mark.parametrize("method", ["u2", "faiss_flat", "torch_matmul"])
def test_nearest(benchmark, sizes, nearest_case, method):
    case = nearest_case
    describe(benchmark, sizes.nearest_k, sizes.nearest_n, sizes.nearest_d)
    ids, dists = benchmark(_nearest_method(method, case))
    assert mismatches(ids_of(ids), case.ref_ids, case.x, case.codebook) == 0
    torch.testing.assert_close(dists.float(), case.ref_dists, rtol=1e-4, atol=1e-3)


# ----------------------------------------------------------------------------------------------
# hierarchical: nprobe cells of a two-level index, FAISS IVF on the same cells, certified exact


@pytest.fixture(scope="module")
def hierarchical_case(sizes):
    data = siglip_like(sizes.hier_k, sizes.hier_n, sizes.hier_d, n_coarse=sizes.hier_n_coarse, seed=SEED)
    # the generator's own coarse clusters are the cells: search speed does not depend on how the
    # cells were found, and skipping HierarchicalIndex.build's k-means keeps the set-up short
    index = u2.HierarchicalIndex(data.codebook, data.coarse_centroids, data.coarse_ids)
    ivf, quantizer = bench_hierarchical._faiss_ivf(index, data.codebook)
    ivf.nprobe = sizes.hier_nprobe
    xs = data.queries.numpy()
    exact_ids, _ = u2.nearest(data.queries, data.codebook)
    return SimpleNamespace(x=data.queries, codebook=data.codebook, xs=xs, index=index, ivf=ivf,
                           quantizer=quantizer, ivf_ids=ids_of(ivf.search(xs, 1)[1]), exact_ids=ids_of(exact_ids))


def _hierarchical_method(method: str, case, nprobe: int) -> Callable[[], torch.Tensor]:
    """The timed call of ``method``, returning the (N,) ids; its first call done."""
    if method == "faiss_ivf":
        return lambda: ids_of(case.ivf.search(case.xs, 1)[1])
    kwargs = {"exact": True} if method == "u2_exact" else {"nprobe": nprobe}
    case.index.search(case.x, **kwargs)
    return lambda: ids_of(case.index.search(case.x, **kwargs)[0])


@pytest.mark.benchmark(group="hierarchical")
@pytest.mark.parametrize("method", ["u2_hier", "faiss_ivf", "u2_exact"])
def test_hierarchical(benchmark, sizes, hierarchical_case, method):
    case = hierarchical_case
    nprobe = None if method == "u2_exact" else sizes.hier_nprobe
    describe(benchmark, sizes.hier_k, sizes.hier_n, sizes.hier_d, n_coarse=sizes.hier_n_coarse, nprobe=nprobe)
    ids = benchmark(_hierarchical_method(method, case, sizes.hier_nprobe))
    benchmark.extra_info["recall_at_1"] = float((ids == case.exact_ids).double().mean())
    # approximate methods answer as FAISS IVF does on the same cells, the exact one as u2.nearest
    ref_ids = case.exact_ids if method == "u2_exact" else case.ivf_ids
    assert mismatches(ids, ref_ids, case.x, case.codebook) == 0


# ----------------------------------------------------------------------------------------------
# embedding step: gather rows, backward, optimizer step on a (K, d) table


@pytest.fixture(scope="module")
def embedding_case(sizes):
    batches = bench_embedding.zipf_batches(sizes.emb_k, sizes.emb_n, bench_embedding.N_BATCHES, 1.0, SEED,
                                           torch.device("cpu"))
    generator = torch.Generator().manual_seed(SEED + 1)
    init = 0.02 * torch.randn(sizes.emb_k, sizes.emb_d, generator=generator)
    g = torch.randn(sizes.emb_n, sizes.emb_d, generator=generator)
    unique_ids = sum(int(torch.unique(ids).numel()) for ids in batches) / len(batches)
    return SimpleNamespace(batches=batches, init=init, g=g, unique_ids=unique_ids)


def check_adam_step_one(weight: torch.Tensor, case) -> None:
    """After one step on batches[0], the table is Adam's first update: ``-lr * sign(grad)`` on the
    touched rows (where |grad| dwarfs eps, whose placement differs between methods), untouched
    rows bit-for-bit unchanged."""
    grad = torch.zeros_like(case.init).index_add_(0, case.batches[0], case.g)
    expected = case.init - bench_embedding.LR * torch.sign(grad)
    touched = torch.zeros(case.init.shape[0], dtype=torch.bool)
    touched[case.batches[0]] = True
    changed = (weight != case.init).any(dim=1)
    assert not changed[~touched].any(), "rows outside the batch were updated"
    clear = grad[touched].abs() > 1e-3
    torch.testing.assert_close(weight[touched][clear], expected[touched][clear], rtol=0.0,
                               atol=1e-3 * bench_embedding.LR)


@pytest.mark.benchmark(group="embedding_step")
@pytest.mark.parametrize("method", ["u2", "torch_sparse", "torch_dense"])
def test_embedding_step(benchmark, sizes, embedding_case, method):
    case = embedding_case
    describe(benchmark, sizes.emb_k, sizes.emb_n, sizes.emb_d, unique_ids=case.unique_ids)
    weight, optimizer, forward = bench_embedding.build_method(method, case.init)
    calls = itertools.count()

    def train_step() -> None:
        ids = case.batches[next(calls) % len(case.batches)]
        optimizer.zero_grad(set_to_none=True)
        (forward(ids) * case.g).sum().backward()
        optimizer.step()

    train_step()  # the first step allocates the optimizer state: kept out of the timings
    check_adam_step_one(weight.detach(), case)
    benchmark(train_step)
    assert torch.isfinite(weight.detach()).all()


# ----------------------------------------------------------------------------------------------
# cross-entropy: forward + backward over a large vocabulary


@pytest.fixture(scope="module")
def cross_entropy_case(sizes):
    hidden, weight, targets = bench_cross_entropy.make_data(sizes.ce_n, sizes.ce_k, sizes.ce_h, seed=SEED)
    hidden.requires_grad_()
    weight.requires_grad_()
    ref_loss, ref_grad = bench_cross_entropy._step(bench_cross_entropy.naive_cross_entropy, hidden, weight, targets)
    return SimpleNamespace(hidden=hidden, weight=weight, targets=targets, ref_loss=ref_loss, ref_grad=ref_grad)


@pytest.mark.benchmark(group="cross_entropy")
@pytest.mark.parametrize("method", ["u2", "torch"])
def test_cross_entropy(benchmark, sizes, cross_entropy_case, method):
    case = cross_entropy_case
    describe(benchmark, sizes.ce_k, sizes.ce_n, sizes.ce_h)
    loss_fn = u2.large_vocab_cross_entropy if method == "u2" else bench_cross_entropy.naive_cross_entropy

    def step():
        return bench_cross_entropy._step(loss_fn, case.hidden, case.weight, case.targets)

    step()  # first call outside the timings
    loss, grad_hidden = benchmark(step)
    assert loss == pytest.approx(case.ref_loss, rel=1e-5)
    torch.testing.assert_close(grad_hidden, case.ref_grad, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# build: a k-codeword codebook from training features


@pytest.fixture(scope="module")
def build_case(sizes):
    n_test = 2000
    args = bench_kmeans.parse_args([
        "--k", str(sizes.build_k), "--n-train", str(sizes.build_n), "--n-test", str(n_test),
        "--d", str(sizes.build_d), "--niter", str(sizes.build_niter), "--seed", str(SEED),
    ])
    # twice as many true fine clusters as codewords, as in bench_kmeans: no codebook fits exactly
    data = siglip_like(2 * args.k, args.n_train + n_test, args.d, seed=SEED).queries
    train, held_out = data[:args.n_train].contiguous(), data[args.n_train:].contiguous()
    case = SimpleNamespace(args=args, train=train, held_out=held_out)
    case.faiss_mse = heldout_mse(bench_kmeans.run_faiss(train, args), case)
    return case


def heldout_mse(centroids: torch.Tensor, case) -> float:
    """Mean squared distance of the held-out rows to their nearest centroid (u2.nearest, exact)."""
    _, dists = u2.nearest(case.held_out, centroids.float().contiguous())
    return float(dists.double().mean())


@pytest.mark.benchmark(group="build")
@pytest.mark.parametrize("method", ["u2", "faiss"])
def test_build(benchmark, sizes, build_case, method):
    case = build_case
    describe(benchmark, sizes.build_k, sizes.build_n, sizes.build_d, niter=sizes.build_niter)
    run = bench_kmeans.run_u2 if method == "u2" else bench_kmeans.run_faiss
    centroids = benchmark(run, case.train, case.args)
    assert centroids.shape == (sizes.build_k, sizes.build_d)
    mse = heldout_mse(centroids, case)
    benchmark.extra_info.update({"heldout_mse": mse, "mse_ratio_vs_faiss": mse / case.faiss_mse})
    # two-stage k-means trades a little quantisation error for speed; garbage would be far off
    assert mse <= 1.10 * case.faiss_mse
