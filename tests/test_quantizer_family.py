"""The quantizer family of UniTok / UniCode: MultiCodebookQuantizer, ResidualQuantizer, EMACodebook
(and VectorQuantizer.align_), each against a float64 / hand-computed reference and, where it is
installed, against vector-quantize-pytorch's own layers with the same frozen codebooks; a tiny
autoencoder trains with either layer to >= 90% use of every codebook."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import unicode2_fast as u2

from reference import objective64


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _argmin64(x, codebook, metric="l2"):
    return objective64(x, codebook, metric).min(dim=1).indices


# ------------------------------------------------------------------------------------------------
# MultiCodebookQuantizer
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["l2", "cos"])
def test_mcq_frozen_codes_loss_and_straight_through(metric):
    groups, k, dim = 4, 37, 28
    codebooks = _randn(groups, k, dim // groups)
    mcq = u2.MultiCodebookQuantizer(dim, groups, k, codebook=codebooks, metric=metric, freeze_codebook=True,
                                    commitment_weight=0.3)
    x = _randn(3, 5, dim, seed=1).requires_grad_()
    quantized, indices, loss = mcq(x)
    assert indices.shape == (3, 5, groups) and indices.dtype == torch.int64
    chunks = x.detach().reshape(15, groups, dim // groups)
    ref_books = F.normalize(codebooks, dim=-1) if metric == "cos" else codebooks
    if metric == "cos":
        chunks = F.normalize(chunks, dim=-1)
    for g in range(groups):
        assert torch.equal(indices.reshape(15, groups)[:, g], _argmin64(chunks[:, g], ref_books[g], metric))
    codes = torch.stack([ref_books[g][indices.reshape(15, groups)[:, g]] for g in range(groups)], dim=1)
    torch.testing.assert_close(quantized.detach(), codes.reshape(3, 5, dim))
    torch.testing.assert_close(loss, 0.3 * F.mse_loss(chunks, codes))
    quantized.sum().backward()
    if metric == "l2":
        torch.testing.assert_close(x.grad, torch.ones_like(x))  # straight-through: identity


def test_mcq_learned_codebook_gets_the_codebook_loss_gradient():
    groups, k, dim = 2, 9, 8
    mcq = u2.MultiCodebookQuantizer(dim, groups, k, codebook=_randn(groups, k, 4), commitment_weight=0.0)
    x = _randn(20, dim, seed=2)
    _, indices, loss = mcq(x)
    loss.backward()
    reference = mcq.codebook.detach().clone().requires_grad_()
    codes = reference[torch.arange(groups), indices]
    F.mse_loss(codes, x.view(20, groups, 4)).backward()
    torch.testing.assert_close(mcq.codebook.grad, reference.grad)


def test_mcq_ema_update_matches_manual_computation_per_group():
    groups, k, sub, decay, eps = 3, 5, 4, 0.8, 1e-5
    init = _randn(groups, k, sub)
    mcq = u2.MultiCodebookQuantizer(groups * sub, groups, k, codebook=init, ema_decay=decay, eps=eps).train()
    assert list(mcq.parameters()) == []
    x = _randn(17, groups * sub, seed=3)
    _, indices, _ = mcq(x)
    chunks = x.view(17, groups, sub).double()
    for g in range(groups):
        onehot = F.one_hot(indices[:, g], k).double()
        size = decay * 1.0 + (1 - decay) * onehot.sum(0)
        avg = decay * init[g].double() + (1 - decay) * onehot.t() @ chunks[:, g]
        n = size.sum()
        expected = avg / ((size + eps) / (n + k * eps) * n).unsqueeze(1)
        torch.testing.assert_close(mcq.cluster_size[g].double(), size)
        torch.testing.assert_close(mcq.codebook[g].double(), expected)


def test_mcq_utilization_per_sub_codebook():
    groups, k = 3, 16
    mcq = u2.MultiCodebookQuantizer(12, groups, k, freeze_codebook=True).train()
    x = _randn(40, 12, seed=4)
    _, indices, _ = mcq(x)
    expected = torch.tensor([indices[:, g].unique().numel() / k for g in range(groups)], dtype=torch.float64)
    assert torch.equal(mcq.utilization, expected)
    counts = torch.stack([torch.bincount(indices[:, g], minlength=k) for g in range(groups)])
    assert torch.equal(mcq.counts, counts)
    mcq.eval()(x + 5.0)
    assert torch.equal(mcq.counts, counts)  # eval leaves usage alone
    mcq.reset_usage()
    assert float(mcq.utilization.sum()) == 0.0


def test_mcq_kmeans_init_and_dead_codes_work_per_group():
    groups, k, sub = 2, 4, 3
    centers = _randn(groups, k, sub, seed=5) * 10
    pick = torch.randint(k, (64, groups), generator=torch.Generator().manual_seed(6))
    x = (centers[torch.arange(groups), pick] + 0.05 * _randn(64, groups, sub, seed=7)).reshape(64, -1)
    mcq = u2.MultiCodebookQuantizer(groups * sub, groups, k, kmeans_init=True, ema_decay=0.9).train()
    mcq(x)
    assert bool(mcq.initted)
    before = mcq.codebook.clone()
    for g in range(groups):  # Lloyd's fixed point per sub-codebook: each code is the mean of its chunks
        chunks = x.view(64, groups, sub)[:, g]
        ids = u2.nearest(chunks, before[g])[0]
        for code in ids.unique():
            torch.testing.assert_close(before[g, code], chunks[ids == code].mean(dim=0), rtol=0, atol=1e-4)
    mcq = u2.MultiCodebookQuantizer(groups * sub, groups, k, ema_decay=0.5, threshold_ema_dead_code=0.9,
                                    codebook=torch.full((groups, k, sub), 100.0) + _randn(groups, k, sub)).train()
    mcq(x)  # all vectors pick one far-away code; the others fall below the threshold: re-seeded
    for g in range(groups):
        chunks = x.view(64, groups, sub)[:, g]
        reseeded = mcq.cluster_size[g] == 0.9
        assert int(reseeded.sum()) == k - 1
        assert bool((torch.cdist(mcq.codebook[g][reseeded], chunks).min(dim=1).values == 0).all())


def test_mcq_decode_image_fmap_and_errors():
    mcq = u2.MultiCodebookQuantizer(12, 3, 10, freeze_codebook=True, accept_image_fmap=True)
    fmap = _randn(2, 12, 4, 5, seed=8)
    quantized, indices, _ = mcq(fmap)
    assert indices.shape == (2, 4, 5, 3) and quantized.shape == fmap.shape
    torch.testing.assert_close(mcq.decode(indices), quantized.permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match="divisible"):
        u2.MultiCodebookQuantizer(10, 3, 4)
    with pytest.raises(ValueError, match="shape"):
        u2.MultiCodebookQuantizer(12, 3, 4, codebook=torch.zeros(3, 4, 5))
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\)"):
        mcq.decode(indices[..., :2])
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        mcq.decode(torch.full((2, 3), 10))


def test_mcq_matches_vector_quantize_pytorch_multi_head():
    vqp = pytest.importorskip("vector_quantize_pytorch")
    groups, k, dim = 4, 64, 32
    codebooks = _randn(groups, k, dim // groups, seed=9)
    theirs = vqp.VectorQuantize(dim=dim, codebook_size=k, heads=groups, separate_codebook_per_head=True,
                                codebook_dim=dim // groups, freeze_codebook=True).eval()
    theirs._codebook.embed.data.copy_(codebooks)
    ours = u2.MultiCodebookQuantizer(dim, groups, k, codebook=codebooks, freeze_codebook=True).eval()
    x = _randn(2, 50, dim, seed=10)
    with torch.no_grad():
        q_theirs, ids_theirs, _ = theirs(x)
        q_ours, ids_ours, _ = ours(x)
    assert torch.equal(ids_ours, ids_theirs.long())
    torch.testing.assert_close(q_ours, q_theirs)


# ------------------------------------------------------------------------------------------------
# ResidualQuantizer
# ------------------------------------------------------------------------------------------------


def test_rq_depths_quantize_residuals():
    depth, k, d = 3, 23, 6
    codebooks = _randn(depth, k, d, seed=11) * torch.tensor([1.0, 0.3, 0.1]).view(depth, 1, 1)
    rq = u2.ResidualQuantizer(d, depth, k, codebooks=codebooks, freeze_codebook=True, commitment_weight=0.5)
    x = _randn(4, 7, d, seed=12).requires_grad_()
    quantized, indices, losses = rq(x)
    assert indices.shape == (4, 7, depth) and losses.shape == (depth,)
    residual = x.detach().reshape(28, d).double()
    total = torch.zeros_like(residual)
    for i in range(depth):
        ids = _argmin64(residual, codebooks[i])
        assert torch.equal(indices.reshape(28, depth)[:, i], ids)
        code = codebooks[i].double()[ids]
        torch.testing.assert_close(losses[i].double(), 0.5 * F.mse_loss(residual, code), rtol=1e-5, atol=1e-7)
        total += code
        residual = residual - code
    torch.testing.assert_close(quantized.detach().double().reshape(28, d), total, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rq.decode(indices).double(), quantized.detach().double(), rtol=1e-6, atol=1e-6)
    quantized.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))  # x + sg(sum q - x): identity


def test_rq_at_a_large_codebook_per_depth():
    depth, k, d = 2, 120_000, 4  # N x K distances would be 64 x 120K per depth: never built
    codebooks = _randn(depth, k, d, seed=30) * torch.tensor([1.0, 0.2]).view(depth, 1, 1)
    rq = u2.ResidualQuantizer(d, depth, k, codebooks=codebooks, freeze_codebook=True).train()
    x = _randn(64, d, seed=31)
    _, indices, _ = rq(x)
    residual = x
    for i in range(depth):
        expected, _ = u2.nearest(residual, codebooks[i])
        assert torch.equal(indices[:, i], expected)
        residual = residual - codebooks[i][expected]
    expected_use = torch.tensor([indices[:, i].unique().numel() / k for i in range(depth)], dtype=torch.float64)
    assert torch.equal(rq.utilization, expected_use)


def test_rq_shared_codebook_is_one_codebook():
    rq = u2.ResidualQuantizer(5, 4, 11, shared_codebook=True)
    assert len(rq.layers) == 1 and sum(p.numel() for p in rq.parameters()) == 11 * 5
    _, indices, losses = rq(_randn(9, 5, seed=13))
    assert indices.shape == (9, 4) and losses.shape == (4,)
    assert torch.equal(rq.codebooks[0], rq.codebooks[3])
    with pytest.raises(ValueError, match="l2"):
        u2.ResidualQuantizer(5, 2, 4, metric="cos")
    with pytest.raises(ValueError, match=r"\(2, K, d\)"):
        u2.ResidualQuantizer(5, 2, 4, codebooks=torch.zeros(3, 4, 5))


def test_rq_matches_vector_quantize_pytorch_residual_vq():
    vqp = pytest.importorskip("vector_quantize_pytorch")
    depth, k, d = 3, 32, 16
    codebooks = _randn(depth, k, d, seed=14) * torch.tensor([1.0, 0.5, 0.25]).view(depth, 1, 1)
    theirs = vqp.ResidualVQ(dim=d, num_quantizers=depth, codebook_size=k, freeze_codebook=True).eval()
    for i, layer in enumerate(theirs.layers):
        layer._codebook.embed.data.copy_(codebooks[i:i + 1])
    ours = u2.ResidualQuantizer(d, depth, k, codebooks=codebooks, freeze_codebook=True).eval()
    x = _randn(2, 40, d, seed=15)
    with torch.no_grad():
        q_theirs, ids_theirs, _ = theirs(x)
        q_ours, ids_ours, _ = ours(x)
    assert torch.equal(ids_ours, ids_theirs.long())
    torch.testing.assert_close(q_ours, q_theirs, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# EMACodebook and language alignment
# ------------------------------------------------------------------------------------------------


def test_ema_codebook_update_matches_vector_quantizer():
    init = _randn(6, 4, seed=16)
    book = u2.EMACodebook(6, 4, codebook=init, decay=0.7)
    vq = u2.VectorQuantizer(4, 6, codebook=init, ema_decay=0.7).train()
    x = _randn(25, 4, seed=17)
    ids, codes = book.search(x)
    torch.testing.assert_close(codes, init[ids])
    book.update_(x, ids)
    vq(x)
    assert torch.equal(book.weight, vq.codebook) and torch.equal(book.cluster_size, vq.cluster_size)


def test_align_hand_computed_rows_and_untouched_rest():
    k, d, v = 8, 5, 20
    init, table = _randn(k, d, seed=18), _randn(v, d, seed=19)
    book = u2.EMACodebook(k, d, codebook=init, decay=0.9)
    book.cluster_size.copy_(torch.arange(1.0, k + 1))
    book.embed_avg.copy_(init * book.cluster_size.unsqueeze(1))
    changed = book.align_(table, (torch.tensor([1, 6]), torch.tensor([17, 3])), decay=0.75)
    assert changed.tolist() == [1, 6]
    expected = init.clone()
    expected[1] = 0.75 * init[1] + 0.25 * table[17]
    expected[6] = 0.75 * init[6] + 0.25 * table[3]
    torch.testing.assert_close(book.weight, expected)
    assert torch.equal(book.weight[[0, 2, 3, 4, 5, 7]], init[[0, 2, 3, 4, 5, 7]])  # row-sparse: bitwise untouched
    # the EMA statistics describe the aligned codewords: embed_avg / smoothed size == codebook
    n, eps = book.cluster_size.sum(), book.eps
    smoothed = (book.cluster_size + eps) / (n + k * eps) * n
    torch.testing.assert_close((book.embed_avg / smoothed.unsqueeze(1))[[1, 6]], book.weight[[1, 6]])
    # the index-table form, -1 leaves a row alone; nn.Embedding targets work too
    table_index = torch.full((k,), -1)
    table_index[2] = 5
    before = book.weight.clone()
    book.align_(nn.Embedding.from_pretrained(table), table_index, decay=0.5)
    torch.testing.assert_close(book.weight[2], 0.5 * before[2] + 0.5 * table[5])
    assert torch.equal(book.weight[[0, 1, 3, 4, 5, 6, 7]], before[[0, 1, 3, 4, 5, 6, 7]])


def test_vector_quantizer_align_and_cos_renormalises():
    vq = u2.VectorQuantizer(3, 4, codebook=_randn(4, 3, seed=20), metric="cos", freeze_codebook=True)
    target = _randn(4, 3, seed=21)
    before = vq.codebook.clone()
    vq.align_(target, decay=0.6)
    torch.testing.assert_close(vq.codebook, F.normalize(0.6 * before + 0.4 * target, dim=1))


def test_align_errors_name_the_problem():
    book = u2.EMACodebook(4, 3)
    with pytest.raises(ValueError, match="dimension"):
        book.align_(torch.zeros(4, 5))
    with pytest.raises(ValueError, match="K = 4 rows"):
        book.align_(torch.zeros(6, 3))
    with pytest.raises(ValueError, match="twice"):
        book.align_(torch.zeros(6, 3), (torch.tensor([1, 1]), torch.tensor([0, 2])))
    with pytest.raises(ValueError, match="outside"):
        book.align_(torch.zeros(6, 3), (torch.tensor([1]), torch.tensor([6])))
    with pytest.raises(ValueError, match="decay"):
        book.align_(torch.zeros(4, 3), decay=1.5)
    with pytest.raises(ValueError, match="NaN|Inf|finite"):
        book.align_(torch.full((4, 3), float("nan")))


def test_replace_dead_codes_reseeds_from_the_batch():
    book = u2.EMACodebook(5, 2, codebook=torch.full((5, 2), 50.0) + _randn(5, 2, seed=22), decay=0.5)
    x = _randn(30, 2, seed=23)
    book.update_(x)
    assert book.replace_dead_codes_(x, threshold=0.9) >= 4
    assert bool((torch.cdist(book.weight, x).min(dim=1).values == 0).any())


# ------------------------------------------------------------------------------------------------
# a vector-quantize-pytorch-style training loop (the README example)
# ------------------------------------------------------------------------------------------------


def _mixture(n, dim, centers, seed):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(centers, dim, generator=torch.Generator().manual_seed(100)) * 2
    return means[torch.randint(centers, (n,), generator=g)] + 0.3 * torch.randn(n, dim, generator=g)


@pytest.mark.parametrize("kind", ["multi", "residual"])
def test_tiny_autoencoder_trains_and_uses_every_codebook(kind):
    torch.manual_seed(0)
    dim, hidden = 16, 32
    if kind == "multi":
        quantizer = u2.MultiCodebookQuantizer(hidden, num_codebooks=4, codebook_size=32, ema_decay=0.8,
                                              kmeans_init=True, threshold_ema_dead_code=1.0)
    else:
        quantizer = u2.ResidualQuantizer(hidden, depth=3, codebook_size=32, ema_decay=0.8, kmeans_init=True,
                                         threshold_ema_dead_code=1.0)
    encoder, decoder = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
    opt = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=3e-3)
    data = _mixture(4096, dim, 64, seed=1)
    first = None
    for step in range(150):
        x = data[torch.randint(4096, (256,))]
        quantized, indices, loss = quantizer(encoder(x))
        recon = F.mse_loss(decoder(quantized), x)
        (recon + loss.sum()).backward()
        opt.step()
        opt.zero_grad()
        first = recon.item() if first is None else first
    assert recon.item() < 0.5 * first
    quantizer.reset_usage()
    with torch.no_grad():
        quantizer(encoder(data))  # training mode: the usage histogram counts this pass
    usage = quantizer.utilization
    assert usage.shape == ((4,) if kind == "multi" else (3,))
    assert float(usage.min()) >= 0.9, usage


def test_align_then_search_uses_the_aligned_codebook():
    vq = u2.VectorQuantizer(8, 64, freeze_codebook=True).eval()
    x = _randn(256, 8, seed=40)
    vq(x)  # the search's per-codebook caches are built here
    target = _randn(64, 8, seed=41)
    vq.align_(target, decay=0.0)  # C <- T: the search must follow
    _, indices, _ = vq(x)
    assert torch.equal(indices, _argmin64(x, target))


def test_state_dicts_from_before_the_usage_histogram_still_load():
    vq = u2.VectorQuantizer(4, 6, ema_decay=0.9)
    old = {k: v for k, v in vq.state_dict().items() if k != "counts"}
    restored = u2.VectorQuantizer(4, 6, ema_decay=0.9)
    restored.load_state_dict(old)  # strict
    assert int(restored.counts.sum()) == 0
