"""CascadedQuantizer and VectorQuantizer: against u2.nearest and manual references.

Shapes are small (K <= 41, d <= 23) so the file runs in seconds on 2 cores.
"""
import json
import os

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

import unicode2_fast as u2
from unicode2_fast.quantizer import CascadedQuantizer, CascadedQuantizerOutput, VectorQuantizer

K, D = 41, 23


def _randn(*shape, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)


def _sparse_optimizer(params, lr):
    """u2.SparseRowAdamW where unicode2_fast.sparse_adamw exists, else torch's own row-sparse Adam."""
    try:
        from unicode2_fast.sparse_adamw import SparseRowAdamW
    except ModuleNotFoundError as exc:
        if exc.name != "unicode2_fast.sparse_adamw":
            raise
        return torch.optim.SparseAdam(params, lr=lr)
    return SparseRowAdamW(params, lr=lr)


# ------------------------------------------------------------------------------------------------
# CascadedQuantizer
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["l2", "ip", "cos"])
def test_cascaded_matches_nearest_and_c2_rows(metric):
    c1 = _randn(K, D)
    features = _randn(3, 5, D, seed=1)
    q = CascadedQuantizer(c1, metric=metric)
    out = q(features)
    assert isinstance(out, CascadedQuantizerOutput)
    ids, dists = u2.nearest(features, c1, metric)
    assert out.indices.dtype == torch.int64 and out.indices.shape == (3, 5)
    assert torch.equal(out.indices, ids)
    assert out.distances.dtype == torch.float32 and torch.equal(out.distances, dists)
    assert out.embeddings.shape == (3, 5, D)
    assert torch.equal(out.embeddings.detach(), q.c2.detach()[ids])
    assert torch.equal(out.embeddings.detach(), c1[ids])  # C2 starts as a copy of C1


def test_cascaded_accepts_codebook_object_and_numpy():
    c1 = _randn(K, D)
    features = _randn(7, D, seed=1)
    from_codebook = CascadedQuantizer(u2.Codebook(c1))(features)
    from_numpy = CascadedQuantizer(c1.numpy())(features)
    assert torch.equal(from_codebook.indices, from_numpy.indices)
    assert torch.equal(from_codebook.embeddings, from_numpy.embeddings)


def test_c1_is_a_buffer_and_c2_a_parameter():
    c1 = _randn(K, D)
    q = CascadedQuantizer(c1)
    assert [name for name, _ in q.named_parameters()] == ["c2"]
    assert "c1" in dict(q.named_buffers()) and "counts" in dict(q.named_buffers())
    assert not q.c1.requires_grad and q.c2.requires_grad
    assert set(q.state_dict()) == {"c1", "c2", "counts"}
    with torch.no_grad():
        q.c2.add_(1.0)
    assert torch.equal(q.c1, c1)  # C2 is a copy, not a view of C1


@pytest.mark.parametrize("trainable_dim", [7, 31])
def test_trainable_dim_projection(trainable_dim):
    c1 = _randn(K, D)
    q = CascadedQuantizer(c1, trainable_dim=trainable_dim)
    p = q.projection.double()
    assert p.shape == (D, trainable_dim)
    eye = torch.eye(min(D, trainable_dim), dtype=torch.float64)
    gram = p.t() @ p if trainable_dim < D else p @ p.t()
    torch.testing.assert_close(gram, eye, atol=1e-6, rtol=0)
    torch.testing.assert_close(q.c2.detach().double(), c1.double() @ p, atol=1e-5, rtol=1e-5)
    if trainable_dim > D:  # orthonormal rows: an isometry, every distance of C1 is kept
        torch.testing.assert_close(torch.cdist(q.c2.detach().double(), q.c2.detach().double()),
                                   torch.cdist(c1.double(), c1.double()), atol=1e-5, rtol=1e-5)
    out = q(_randn(2, 3, D, seed=1))
    assert out.embeddings.shape == (2, 3, trainable_dim)
    assert torch.equal(out.embeddings.detach(), q.c2.detach()[out.indices])
    assert torch.equal(CascadedQuantizer(c1, trainable_dim=trainable_dim).projection, q.projection)  # seeded


def test_gradient_reaches_only_used_rows_of_c2():
    c1 = _randn(K, D)
    q = CascadedQuantizer(c1)
    features = _randn(4, 6, D, seed=1).requires_grad_(True)
    out = q(features)
    upstream = _randn(4, 6, D, seed=2)
    (out.embeddings * upstream).sum().backward()
    assert features.grad is None  # the search is discrete: no gradient to the features
    assert q.c1.grad is None
    grad = q.c2.grad
    assert grad.is_sparse
    grad = grad.coalesce()
    unique_ids = torch.unique(out.indices)
    assert torch.equal(grad.indices()[0], unique_ids)
    expected = torch.zeros(K, D).index_add_(0, out.indices.reshape(-1), upstream.reshape(-1, D))
    torch.testing.assert_close(grad.to_dense(), expected)


def test_optimizer_step_changes_only_used_rows():
    c1 = _randn(K, D)
    q = CascadedQuantizer(c1)
    optimizer = _sparse_optimizer([q.c2], lr=0.1)
    before = q.c2.detach().clone()
    out = q(_randn(9, D, seed=1))
    out.embeddings.pow(2).sum().backward()
    optimizer.step()
    changed = (q.c2.detach() != before).any(dim=1)
    used = torch.zeros(K, dtype=torch.bool)
    used[out.indices] = True
    assert torch.equal(changed, used)
    assert torch.equal(q.c1, c1)


def test_usage_counts_and_utilization_vs_bincount():
    c1 = _randn(K, D)
    q = CascadedQuantizer(c1).train()
    reference = torch.zeros(K, dtype=torch.int64)
    for seed in range(1, 5):
        features = _randn(2, 4, D, seed=seed)
        out = q(features)
        ids = u2.nearest(features, c1)[0].reshape(-1)
        batch = torch.bincount(ids, minlength=K)
        reference += batch
        assert out.counts.dtype == torch.int64
        assert torch.equal(out.counts, reference)
        assert out.utilization == pytest.approx((reference > 0).double().mean().item())
        assert out.batch_utilization == pytest.approx((batch > 0).double().mean().item())
    q.eval()
    out = q(_randn(8, D, seed=9))
    assert torch.equal(q.counts, reference)  # eval mode leaves the running histogram alone
    assert out.utilization == pytest.approx((reference > 0).double().mean().item())
    assert out.batch_utilization == pytest.approx(torch.unique(out.indices).numel() / K)
    q.reset_usage()
    assert int(q.counts.sum()) == 0 and q(_randn(3, D, seed=4)).utilization == 0.0


def test_custom_index_replaces_nearest():
    c1 = _randn(K, D)

    class FixedIndex:
        calls = 0

        def search(self, x):
            FixedIndex.calls += 1
            n = x.shape[0]
            return torch.arange(n) % 3, torch.full((n,), 0.5)

    out = CascadedQuantizer(c1, index=FixedIndex())(_randn(2, 4, D, seed=1))
    assert FixedIndex.calls == 1
    assert torch.equal(out.indices, (torch.arange(8) % 3).reshape(2, 4))
    assert torch.equal(out.embeddings.detach(), c1[out.indices])
    assert torch.equal(out.distances, torch.full((2, 4), 0.5))
    with pytest.raises(TypeError, match="search"):
        CascadedQuantizer(c1, index=object())

    class OutOfRangeIndex:
        def search(self, x):
            return torch.full((x.shape[0],), K), torch.zeros(x.shape[0])

    with pytest.raises(ValueError, match="out of range"):
        CascadedQuantizer(c1, index=OutOfRangeIndex())(_randn(3, D))


def test_cascaded_dtypes():
    c1 = _randn(K, D, dtype=torch.bfloat16)
    q = CascadedQuantizer(c1)
    assert q.c1.dtype == torch.bfloat16 and q.c2.dtype == torch.float32  # trainable table in fp32
    features = _randn(6, D, seed=1, dtype=torch.bfloat16)
    out = q(features)
    assert torch.equal(out.indices, u2.nearest(features, c1)[0])
    assert torch.equal(out.embeddings.detach(), c1[out.indices].float())


@pytest.mark.parametrize("trainable_dim", [None, 9])
def test_save_and_load_round_trip(tmp_path, trainable_dim):
    c1 = _randn(K, D)
    q = CascadedQuantizer(c1, trainable_dim=trainable_dim, metric="cos")
    with torch.no_grad():
        q.c2.mul_(2.0)
    q(_randn(6, D, seed=1))  # some usage counts
    q.save_pretrained(tmp_path / "model")
    assert sorted(os.listdir(tmp_path / "model")) == ["config.json", "model.safetensors"]  # no temp files
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert (config["codebook_size"], config["dim"], config["metric"]) == (K, D, "cos")
    assert config["trainable_dim"] == (trainable_dim or D)

    loaded = CascadedQuantizer.from_pretrained(tmp_path / "model")
    for name, tensor in q.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert [name for name, _ in loaded.named_parameters()] == ["c2"]
    features = _randn(3, 5, D, seed=2)
    expected, actual = q(features), loaded(features)
    assert torch.equal(actual.indices, expected.indices)
    assert torch.equal(actual.embeddings, expected.embeddings)
    assert torch.equal(actual.counts, expected.counts)


def test_from_pretrained_errors(tmp_path):
    q = CascadedQuantizer(_randn(K, D), trainable_dim=5)
    with pytest.raises(FileNotFoundError, match="not found"):
        CascadedQuantizer.from_pretrained(tmp_path / "absent")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        CascadedQuantizer.from_pretrained(tmp_path / "file")

    directory = tmp_path / "model"
    q.save_pretrained(directory)
    config_text = (directory / "config.json").read_text()
    weights = safetensors.torch.load_file(directory / "model.safetensors")

    os.remove(directory / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        CascadedQuantizer.from_pretrained(directory)
    shape_wrong = dict(weights, c2=torch.zeros(K, 6))
    safetensors.torch.save_file(shape_wrong, directory / "model.safetensors")
    with pytest.raises(ValueError, match="'c2' has shape"):
        CascadedQuantizer.from_pretrained(directory)
    no_projection = {name: t for name, t in weights.items() if name != "projection"}
    safetensors.torch.save_file(no_projection, directory / "model.safetensors")
    with pytest.raises(ValueError, match="missing tensors"):
        CascadedQuantizer.from_pretrained(directory)
    (directory / "model.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(ValueError, match="safetensors"):
        CascadedQuantizer.from_pretrained(directory)
    safetensors.torch.save_file(weights, directory / "model.safetensors")

    (directory / "config.json").write_text(config_text.replace(f'"codebook_size": {K}', '"codebook_size": 40'))
    with pytest.raises(ValueError, match="'c1' has shape"):
        CascadedQuantizer.from_pretrained(directory)
    (directory / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        CascadedQuantizer.from_pretrained(directory)
    (directory / "config.json").write_text('{"dim": 3}')
    with pytest.raises(ValueError, match="not a CascadedQuantizer config"):
        CascadedQuantizer.from_pretrained(directory)
    os.remove(directory / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        CascadedQuantizer.from_pretrained(directory)


def test_cascaded_bad_inputs():
    c1 = _randn(K, D)
    q = CascadedQuantizer(c1)
    with pytest.raises(ValueError, match="dimension mismatch: features has last dimension 22"):
        q(_randn(4, D - 1))
    bad = _randn(4, D)
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="features contains non-finite values .*row 2"):
        q(bad)
    with pytest.raises(TypeError, match="floating"):
        q(torch.ones(4, D, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        q(np.zeros((4, D), dtype=np.float32))
    with pytest.raises(ValueError, match="scalar"):
        q(torch.tensor(1.0))
    with pytest.raises(ValueError, match="unknown metric"):
        CascadedQuantizer(c1, metric="dot")
    with pytest.raises(ValueError, match="trainable_dim"):
        CascadedQuantizer(c1, trainable_dim=0)
    nan_codebook = c1.clone()
    nan_codebook[5, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        CascadedQuantizer(nan_codebook)
    with pytest.raises(ValueError, match="2-D"):
        CascadedQuantizer(c1[0])
    assert q(_randn(0, D)).embeddings.shape == (0, D)


# ------------------------------------------------------------------------------------------------
# VectorQuantizer
# ------------------------------------------------------------------------------------------------


def test_vq_straight_through_gradient_is_identity():
    vq = VectorQuantizer(D, K)
    x = _randn(2, 5, D, seed=1).requires_grad_(True)
    quantized, indices, _ = vq(x)
    assert quantized.shape == x.shape and indices.shape == (2, 5) and indices.dtype == torch.int64
    assert torch.equal(quantized.detach(), vq.codebook.detach()[indices])
    upstream = _randn(2, 5, D, seed=2)
    quantized.backward(upstream)
    assert torch.equal(x.grad, upstream)
    assert vq.codebook.grad is None  # the quantized output alone sends nothing to the codebook


def test_vq_indices_match_nearest():
    codebook = _randn(K, D)
    vq = VectorQuantizer(D, K, codebook=codebook)
    x = _randn(3, 7, D, seed=1)
    _, indices, _ = vq(x)
    assert torch.equal(indices, u2.nearest(x, codebook)[0])


def test_vq_loss_values_and_codebook_gradient():
    codebook = _randn(K, D)
    x = _randn(4, 6, D, seed=1).requires_grad_(True)
    q = codebook[u2.nearest(x.detach(), codebook)[0]]
    mse = (x.detach() - q).pow(2).mean()

    learned = VectorQuantizer(D, K, codebook=codebook, commitment_weight=0.3)
    _, indices, loss = learned(x)
    assert loss.shape == () and loss.dtype == torch.float32
    torch.testing.assert_close(loss.detach(), 0.3 * mse + mse)
    loss.backward()
    torch.testing.assert_close(x.grad, 0.3 * 2 * (x.detach() - q) / x.numel())
    rows_with_grad = (learned.codebook.grad != 0).any(dim=1)
    assert torch.equal(rows_with_grad.nonzero().squeeze(1), torch.unique(indices))

    frozen = VectorQuantizer(D, K, codebook=codebook, freeze_codebook=True)
    torch.testing.assert_close(frozen(x)[2].detach(), 0.25 * mse)


def test_vq_sparse_grad_option():
    vq = VectorQuantizer(D, K, codebook=_randn(K, D), sparse_grad=True)
    _, indices, loss = vq(_randn(10, D, seed=1))
    loss.backward()
    grad = vq.codebook.grad
    assert grad.is_sparse and torch.equal(grad.coalesce().indices()[0], torch.unique(indices))


def test_vq_frozen_codebook_unchanged_after_step():
    codebook = _randn(K, D)
    encoder = torch.nn.Linear(D, D)
    vq = VectorQuantizer(D, K, codebook=codebook, freeze_codebook=True)
    assert list(vq.parameters()) == [] and "codebook" in dict(vq.named_buffers())
    optimizer = torch.optim.AdamW(list(encoder.parameters()) + list(vq.parameters()), lr=0.1)
    before = [p.detach().clone() for p in encoder.parameters()]
    for seed in range(3):
        quantized, _, loss = vq(encoder(_randn(8, D, seed=seed)))
        (loss + quantized.pow(2).mean()).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(vq.codebook, codebook)
    assert any(not torch.equal(p, b) for p, b in zip(encoder.parameters(), before))


def _manual_ema(codebook, cluster_size, embed_avg, x, decay, eps):
    ids = ((x.double().unsqueeze(1) - codebook.double().unsqueeze(0)) ** 2).sum(-1).argmin(1)
    onehot = F.one_hot(ids, codebook.shape[0]).double()  # (N, K)
    cluster_size = decay * cluster_size.double() + (1 - decay) * onehot.sum(0)
    embed_avg = decay * embed_avg.double() + (1 - decay) * onehot.t() @ x.double()
    n = cluster_size.sum()
    smoothed = (cluster_size + eps) / (n + codebook.shape[0] * eps) * n
    return ids, cluster_size, embed_avg, embed_avg / smoothed.unsqueeze(1)


def test_vq_ema_update_matches_manual_computation():
    k, d, decay, eps = 5, 3, 0.8, 1e-5
    codebook = _randn(k, d)
    x = _randn(2, 6, d, seed=1)
    vq = VectorQuantizer(d, k, codebook=codebook, ema_decay=decay, eps=eps)
    assert list(vq.parameters()) == []
    flat = x.reshape(-1, d)
    ids, cluster_size, embed_avg, expected = _manual_ema(codebook, torch.ones(k), codebook, flat, decay, eps)
    _, indices, loss = vq.train()(x)
    assert torch.equal(indices.reshape(-1), ids)
    assert loss.shape == ()
    torch.testing.assert_close(vq.cluster_size.double(), cluster_size)
    torch.testing.assert_close(vq.embed_avg.double(), embed_avg)
    torch.testing.assert_close(vq.codebook.double(), expected)
    # a second step starts from the updated statistics
    x2 = _randn(7, d, seed=2)
    _, cluster_size, embed_avg, expected = _manual_ema(vq.codebook, vq.cluster_size, vq.embed_avg, x2, decay, eps)
    vq(x2)
    torch.testing.assert_close(vq.codebook.double(), expected)
    frozen_state = {name: t.clone() for name, t in vq.state_dict().items()}
    vq.eval()(x2)
    for name, tensor in vq.state_dict().items():
        assert torch.equal(tensor, frozen_state[name]), name  # eval: no EMA update


def test_vq_kmeans_init_on_first_training_batch_only():
    k, d = 4, 5
    centers = _randn(k, d) * 10
    x = (centers.repeat(8, 1) + 0.1 * _randn(32, d, seed=1)).reshape(4, 8, d)
    vq = VectorQuantizer(d, k, kmeans_init=True, freeze_codebook=True)
    initial = vq.codebook.clone()
    vq.eval()(x)
    assert torch.equal(vq.codebook, initial) and not bool(vq.initted)  # eval does not initialise
    _, _, loss_train = vq.train()(x)
    assert bool(vq.initted) and not torch.equal(vq.codebook, initial)
    after_init = vq.codebook.clone()
    # each centroid sits at (near) the mean of the batch vectors now assigned to it
    ids = u2.nearest(x, after_init)[0].reshape(-1)
    flat = x.reshape(-1, d)
    for code in torch.unique(ids):
        assert torch.cdist(after_init[code:code + 1], flat[ids == code].mean(0, keepdim=True)).item() < 1.0
    initial_loss = VectorQuantizer(d, k, codebook=initial, freeze_codebook=True)(x)[2]
    assert loss_train < initial_loss
    vq(x + 1.0)
    assert torch.equal(vq.codebook, after_init)  # the second batch does not re-initialise
    restored = VectorQuantizer(d, k, kmeans_init=True, freeze_codebook=True)
    restored.load_state_dict(vq.state_dict())
    restored.train()(x + 1.0)
    assert torch.equal(restored.codebook, after_init)  # a loaded, initialised layer stays so


def test_vq_kmeans_init_sets_ema_statistics():
    k, d = 3, 4
    x = _randn(30, d, seed=1)
    vq = VectorQuantizer(d, k, kmeans_init=True, ema_decay=0.9).train()
    vq(x)
    assert bool(vq.initted)
    assert vq.cluster_size.sum() > k  # cluster sizes now count the batch, not the initial ones


def test_vq_dead_code_replacement_replaces_exactly_the_dead_codes():
    k, d, decay, threshold = 6, 4, 0.5, 0.6
    codebook = _randn(k, d)
    codebook[2:] += 100.0  # codes 2..5 are far from every batch vector: never chosen
    x = _randn(10, d, seed=1)
    vq = VectorQuantizer(d, k, codebook=codebook, ema_decay=decay, threshold_ema_dead_code=threshold).train()
    ids, cluster_size, embed_avg, expected = _manual_ema(codebook, torch.ones(k), codebook, x, decay, vq.eps)
    assert set(ids.tolist()) == {0, 1}
    dead = cluster_size < threshold
    assert dead.tolist() == [False, False, True, True, True, True]
    vq(x)
    changed_from_ema = ~torch.isclose(vq.codebook.double(), expected).all(dim=1)
    assert torch.equal(changed_from_ema, dead)
    torch.testing.assert_close(vq.codebook[~dead].double(), expected[~dead])
    new_rows = vq.codebook[dead]
    match = (new_rows.unsqueeze(1) == x.unsqueeze(0)).all(dim=2)  # (n_dead, N)
    assert bool(match.any(dim=1).all())  # each re-seeded code is a batch vector
    assert len({int(i) for i in match.float().argmax(dim=1)}) == int(dead.sum())  # distinct ones
    assert torch.equal(vq.cluster_size[dead], torch.full((4,), threshold))
    torch.testing.assert_close(vq.embed_avg[dead], new_rows * threshold)
    # deterministic: the same seed re-seeds the same codes
    again = VectorQuantizer(d, k, codebook=codebook, ema_decay=decay, threshold_ema_dead_code=threshold).train()
    again(x)
    assert torch.equal(again.codebook, vq.codebook)


def test_vq_cos_metric():
    codebook = _randn(K, D)
    x = _randn(2, 9, D, seed=1).requires_grad_(True)
    vq = VectorQuantizer(D, K, codebook=codebook, metric="cos")
    quantized, indices, loss = vq(x)
    assert torch.equal(indices, u2.nearest(x.detach(), codebook, "cos")[0])
    unit = F.normalize(codebook, dim=1)
    torch.testing.assert_close(quantized.detach(), unit[indices])
    xn = F.normalize(x.detach(), dim=-1)
    mse = (xn - unit[indices]).pow(2).mean()
    torch.testing.assert_close(loss.detach(), 0.25 * mse + mse)

    ema = VectorQuantizer(D, K, codebook=codebook, metric="cos", ema_decay=0.7).train()
    ema(x.detach())
    torch.testing.assert_close(ema.codebook.norm(dim=1), torch.ones(K))
    zero = x.detach().clone()
    zero[0, 3] = 0.0
    with pytest.raises(ValueError, match="zero vector"):
        vq(zero)


def test_vq_leading_dims_and_layouts():
    codebook = _randn(K, D)
    x = _randn(2, 3, 4, D, seed=1)
    reference = u2.nearest(x, codebook)[0]
    quantized, indices, _ = VectorQuantizer(D, K, codebook=codebook)(x)
    assert quantized.shape == x.shape and torch.equal(indices, reference)

    channel_first = x.reshape(2, 12, D).transpose(1, 2)  # (B, dim, N)
    quantized, indices, _ = VectorQuantizer(D, K, codebook=codebook, channel_last=False)(channel_first)
    assert quantized.shape == channel_first.shape and torch.equal(indices, reference.reshape(2, 12))
    assert torch.equal(quantized.transpose(1, 2), codebook[indices])

    fmap = x.permute(0, 3, 1, 2)  # (B, dim, H, W)
    quantized, indices, _ = VectorQuantizer(D, K, codebook=codebook, accept_image_fmap=True)(fmap)
    assert quantized.shape == fmap.shape and torch.equal(indices, reference)

    quantized, indices, loss = VectorQuantizer(D, K)(_randn(0, D))
    assert quantized.shape == (0, D) and indices.shape == (0,) and float(loss.detach()) == 0.0


def test_vq_bad_options_and_inputs():
    with pytest.raises(ValueError, match="exclusive"):
        VectorQuantizer(D, K, freeze_codebook=True, ema_decay=0.9)
    with pytest.raises(ValueError, match="needs ema_decay"):
        VectorQuantizer(D, K, threshold_ema_dead_code=1.0)
    with pytest.raises(ValueError, match="not both"):
        VectorQuantizer(D, K, codebook=_randn(K, D), kmeans_init=True)
    with pytest.raises(ValueError, match="unknown metric"):
        VectorQuantizer(D, K, metric="ip")
    with pytest.raises(ValueError, match="expected"):
        VectorQuantizer(D, K, codebook=_randn(K, D + 1))
    with pytest.raises(ValueError, match="ema_decay"):
        VectorQuantizer(D, K, ema_decay=1.0)
    vq = VectorQuantizer(D, K)
    with pytest.raises(ValueError, match="dimension mismatch"):
        vq(_randn(3, D + 1))
    bad = _randn(3, D)
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        vq(bad)


def test_vq_large_codebook_without_dense_distance_matrix():
    # K far above the batch: the EMA path only scatters the batch into the (K, d) statistics
    k, d = 20_000, 16
    vq = VectorQuantizer(d, k, ema_decay=0.99, threshold_ema_dead_code=0.5).train()
    x = _randn(64, d, seed=1)
    _, indices, _ = vq(x)
    assert indices.shape == (64,) and int(indices.max()) < k
    assert torch.isfinite(vq.codebook).all()
