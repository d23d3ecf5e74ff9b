"""u2.distributed on 2-3 CPU processes (gloo), spawned by the tests: the sharded search equals
single-process u2.nearest (uneven shards, ties across a shard boundary, every metric), the
row-sparse all-gather moves tensors only, and bad input on one rank raises on every rank
instead of hanging."""
import datetime
import os
import sys
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import unicode2_fast as u2

TIMEOUT = datetime.timedelta(seconds=60)


def _worker(rank, world, rendezvous, body, out_dir, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world, timeout=TIMEOUT)
    try:
        result = body(rank, world, *args)
    except Exception as exc:  # reported to the parent, which asserts on it
        result = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    # the result is on disk: leave without the interpreter's C++ teardown, where gloo's worker
    # threads now and then abort a finished rank ("terminate called without an active
    # exception", SIGABRT, after destroy_process_group; seen on the 2-core CI machine under load)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _run(tmp_path, world, body, *args):
    """Run ``body(rank, world, *args)`` on ``world`` gloo processes; returns each rank's result."""
    rendezvous = tmp_path / "rendezvous"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, world, str(rendezvous), body, str(tmp_path), args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0, f"a rank exited with {p.exitcode} (or hung)"
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _problem(k=1001, n=57, d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    codebook = torch.randn(k, d, generator=g)
    x = torch.randn(n, d, generator=g)
    # ties across a shard boundary: copies of codeword 3 in later shards, queries right on it
    codebook[k * 7 // 10] = codebook[3]
    codebook[k * 2 // 5] = codebook[3]
    x[:5] = codebook[3]
    # near ties: a query halfway between two codewords of different shards
    x[5] = 0.5 * (codebook[10] + codebook[k * 9 // 10])
    return x, codebook


def _sharded_search(rank, world, bounds, metric):
    x, codebook = _problem()
    start, stop = bounds[rank]
    ids, dists = u2.distributed.nearest(x, codebook[start:stop], start, metric=metric)
    return {"ids": ids, "dists": dists}


@pytest.mark.parametrize("metric", ["l2", "ip", "cos"])
def test_sharded_search_equals_single_process(tmp_path, metric):
    bounds = [(0, 400), (400, 410), (410, 1001)]  # uneven, one tiny shard
    results = _run(tmp_path, 3, _sharded_search, bounds, metric)
    x, codebook = _problem()
    expected_ids, expected_dists = u2.nearest(x, codebook, metric)
    for result in results:
        assert "error" not in result, result.get("trace")
        assert torch.equal(result["ids"], expected_ids)
        torch.testing.assert_close(result["dists"], expected_dists, rtol=1e-6, atol=1e-6)
    if metric == "l2":
        assert bool((results[0]["ids"][:5] == 3).all())  # the lowest global id among the copies


def _bad_input(rank, world, case):
    x, codebook = _problem(k=100)
    bounds = u2.distributed.shard_bounds(100, world)
    start, stop = bounds[rank]
    local = codebook[start:stop]
    if case == "nan" and rank == 1:
        local = local.clone()
        local[0, 0] = float("nan")
    if case == "queries" and rank == 1:
        x = x.clone()
        x[3, 2] += 1e-3
    if case == "gap":
        start = start + 1 if rank == 1 else start
    if case == "dim" and rank == 0:
        x, local = x[:, :10], local[:, :10]
    try:
        u2.distributed.nearest(x, local, start)
    except (ValueError, RuntimeError, TypeError) as exc:
        return {"raised": f"{type(exc).__name__}: {exc}"}
    return {"raised": None}


@pytest.mark.parametrize("case,message", [("nan", "NaN|rank\\(s\\) \\[1\\]"), ("queries", "differs between ranks"),
                                          ("gap", "tile"), ("dim", "same queries")])
def test_bad_input_on_one_rank_raises_on_every_rank(tmp_path, case, message):
    import re

    results = _run(tmp_path, 2, _bad_input, case)
    for result in results:
        assert "error" not in result, result.get("trace")
        assert result["raised"] is not None and re.search(message, result["raised"]), result


def _gather_rows(rank, world):
    counts = [3, 0, 5][rank]
    indices = torch.arange(counts, dtype=torch.int64) * 10 + rank
    values = torch.full((counts, 4), float(rank)) + torch.arange(counts).unsqueeze(1)
    return dict(zip(("indices", "values"), u2.distributed.all_gather_rows(indices, values)))


def test_all_gather_rows_concatenates_in_rank_order(tmp_path):
    results = _run(tmp_path, 3, _gather_rows)
    expected_ids = torch.tensor([0, 10, 20, 2, 12, 22, 32, 42])
    for result in results:
        assert torch.equal(result["indices"], expected_ids)
        assert result["values"].shape == (8, 4)
        assert torch.equal(result["values"][3:, 0], torch.tensor([2.0, 3.0, 4.0, 5.0, 6.0]))


def test_needs_a_process_group():
    with pytest.raises(RuntimeError, match="process group"):
        u2.distributed.nearest(torch.zeros(2, 3), torch.zeros(4, 3), 0)


def test_shard_bounds_tile_the_codebook():
    assert u2.distributed.shard_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    with pytest.raises(ValueError):
        u2.distributed.shard_bounds(2, 3)


def _average_grads(rank, world):
    from unicode2_fast import train

    weight = torch.nn.Parameter(torch.zeros(10, 3))
    rows = torch.tensor([[1, 4], [4, 7]][rank])
    weight.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), torch.full((2, 3), float(rank + 1)), (10, 3))
    dense = torch.nn.Parameter(torch.zeros(2))
    dense.grad = torch.full((2,), float(rank + 1))
    train._average_replicated_grads([weight, dense], world)
    return {"sparse": weight.grad.to_dense(), "dense": dense.grad}


def test_row_sparse_gradients_average_across_ranks(tmp_path):
    results = _run(tmp_path, 2, _average_grads)
    expected = torch.zeros(10, 3)
    expected[1], expected[4], expected[7] = 0.5, 1.5, 1.0  # (rank 0's 1 + rank 1's 2) / 2 on the shared row 4
    for result in results:
        assert "error" not in result, result.get("trace")
        assert torch.equal(result["sparse"], expected)
        assert torch.equal(result["dense"], torch.full((2,), 1.5))


def _vocab_parallel(rank, world):
    k, d = 50, 6
    table = torch.randn(k, d, generator=torch.Generator().manual_seed(3))
    emb = u2.distributed.VocabParallelEmbedding(k, d, weight=table)
    opt = u2.SparseRowAdamW([emb.weight], lr=0.1)
    batches = [[torch.tensor([1, 5, 5, 49]), torch.tensor([[5, 30], [2, 2]])],
               [torch.tensor([0, 24, 25]), torch.tensor([[49, 49], [10, 11]])]]
    outputs = []
    for ids in batches[rank]:
        rows = emb(ids)
        outputs.append(rows.detach())
        target = torch.arange(rows.numel(), dtype=torch.float32).reshape(rows.shape) / 10
        ((rows - target) ** 2).mean().backward()  # a per-rank mean loss
        grad = emb.weight.grad
        assert grad.is_sparse
        opt.step()
        opt.zero_grad()
    return {"outputs": outputs, "table": emb.full_weight(), "offset": emb.offset, "rows": emb.weight.shape[0]}


def test_vocab_parallel_embedding_equals_one_process(tmp_path):
    results = _run(tmp_path, 2, _vocab_parallel)
    for result in results:
        assert "error" not in result, result.get("trace")
    assert [(r["offset"], r["rows"]) for r in results] == [(0, 25), (25, 25)]
    # one process: the full table, each step's loss the mean of the two ranks' mean losses
    k, d = 50, 6
    weight = torch.nn.Parameter(torch.randn(k, d, generator=torch.Generator().manual_seed(3)))
    opt = u2.SparseRowAdamW([weight], lr=0.1)
    batches = [[torch.tensor([1, 5, 5, 49]), torch.tensor([[5, 30], [2, 2]])],
               [torch.tensor([0, 24, 25]), torch.tensor([[49, 49], [10, 11]])]]
    for step in range(2):
        loss = 0.0
        for rank in range(2):
            ids = batches[rank][step]
            rows = u2.gathered_embedding(ids.reshape(-1), weight).reshape(*ids.shape, d)
            assert torch.equal(rows.detach(), results[rank]["outputs"][step])  # forward: the same rows
            target = torch.arange(rows.numel(), dtype=torch.float32).reshape(rows.shape) / 10
            loss = loss + ((rows - target) ** 2).mean() / 2
        loss.backward()
        opt.step()
        opt.zero_grad()
    for result in results:
        torch.testing.assert_close(result["table"], weight.detach(), rtol=1e-6, atol=1e-7)


def _vocab_parallel_bad_ids(rank, world):
    emb = u2.distributed.VocabParallelEmbedding(20, 3)
    try:
        emb(torch.tensor([3, 20 if rank == 1 else 4]))
    except (ValueError, RuntimeError) as exc:
        return {"raised": str(exc)}
    return {"raised": None}


def test_vocab_parallel_bad_ids_on_one_rank_raise_everywhere(tmp_path):
    results = _run(tmp_path, 2, _vocab_parallel_bad_ids)
    assert "out of range" in results[1]["raised"]
    assert "rank(s) [1]" in results[0]["raised"]


def _ce_problem():
    g = torch.Generator().manual_seed(5)
    n, h, k = 13, 8, 37
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(k, h, generator=g, dtype=torch.float64)
    bias = torch.randn(k, generator=g, dtype=torch.float64)
    targets = torch.randint(k, (n,), generator=g)
    targets[3] = -100
    targets[4] = k - 1  # the last shard's last class
    return hidden, weight, bias, targets


def _vocab_parallel_ce(rank, world, bounds, reduction):
    hidden, weight, bias, targets = _ce_problem()
    start, stop = bounds[rank]
    hidden = hidden.clone().requires_grad_()
    local_weight = weight[start:stop].clone().requires_grad_()
    local_bias = bias[start:stop].clone().requires_grad_()
    loss = u2.distributed.large_vocab_cross_entropy(hidden, local_weight, targets, start, local_bias=local_bias,
                                                    reduction=reduction, chunk_size=5)
    (loss.sum() if reduction == "none" else loss).backward()
    return {"loss": loss.detach(), "grad_hidden": hidden.grad, "grad_weight": local_weight.grad,
            "grad_bias": local_bias.grad, "start": start, "stop": stop}


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_vocab_parallel_cross_entropy_equals_one_process(tmp_path, reduction):
    bounds = [(0, 10), (10, 11), (11, 37)]
    results = _run(tmp_path, 3, _vocab_parallel_ce, bounds, reduction)
    hidden, weight, bias, targets = _ce_problem()
    hidden.requires_grad_()
    weight.requires_grad_()
    bias.requires_grad_()
    reference = torch.nn.functional.cross_entropy(hidden @ weight.t() + bias, targets, reduction=reduction)
    (reference.sum() if reduction == "none" else reference).backward()
    for result in results:
        assert "error" not in result, result.get("trace")
        torch.testing.assert_close(result["loss"], reference.detach())
        torch.testing.assert_close(result["grad_hidden"], hidden.grad)
        torch.testing.assert_close(result["grad_weight"], weight.grad[result["start"]:result["stop"]])
        torch.testing.assert_close(result["grad_bias"], bias.grad[result["start"]:result["stop"]])


def _vocab_parallel_ce_bad(rank, world):
    hidden, weight, _, targets = _ce_problem()
    start, stop = u2.distributed.shard_bounds(37, world)[rank]
    if rank == 1:
        targets = targets.clone()
        targets[0] = (targets[0] + 1) % 37
    try:
        u2.distributed.large_vocab_cross_entropy(hidden, weight[start:stop], targets, start)
    except ValueError as exc:
        return {"raised": str(exc)}
    return {"raised": None}


def test_vocab_parallel_cross_entropy_refuses_different_targets(tmp_path):
    for result in _run(tmp_path, 2, _vocab_parallel_ce_bad):
        assert result["raised"] is not None and "targets differs between ranks" in result["raised"]


def _save_three(rank, world, directory):
    table = torch.randn(41, 5, generator=torch.Generator().manual_seed(8))
    steps = torch.arange(41, dtype=torch.int64) * 3
    emb = u2.distributed.VocabParallelEmbedding(41, 5, weight=table)
    stop = emb.offset + emb.weight.shape[0]
    u2.distributed.save_sharded(directory, {"weight": emb.weight, "row_step": steps[emb.offset:stop]}, emb.offset,
                                meta={"step": 7})
    return {"files": sorted(os.listdir(directory))}


def _load_two(rank, world, directory):
    emb = u2.distributed.VocabParallelEmbedding.from_sharded(directory)
    rows = u2.distributed.load_sharded(directory, emb.offset, emb.offset + emb.weight.shape[0], ["row_step"])
    return {"weight": emb.weight.detach(), "offset": emb.offset, "row_step": rows["row_step"], "full": emb.full_weight()}


def test_sharded_checkpoint_reshards_onto_another_world_size(tmp_path):
    directory = str(tmp_path / "ckpt")
    (tmp_path / "save").mkdir()
    (tmp_path / "load").mkdir()
    saved = _run(tmp_path / "save", 3, _save_three, directory)
    assert saved[0]["files"] == ["index.json", "shard-00000-of-00003.safetensors", "shard-00001-of-00003.safetensors",
                                 "shard-00002-of-00003.safetensors"]
    loaded = _run(tmp_path / "load", 2, _load_two, directory)
    table = torch.randn(41, 5, generator=torch.Generator().manual_seed(8))
    assert [r["offset"] for r in loaded] == [0, 21]
    for r in loaded:
        assert "error" not in r, r.get("trace")
        stop = r["offset"] + r["weight"].shape[0]
        assert torch.equal(r["weight"], table[r["offset"]:stop])
        assert torch.equal(r["row_step"], torch.arange(41)[r["offset"]:stop] * 3)
        assert torch.equal(r["full"], table)
    # one process reads any rows; an incomplete checkpoint (no index) is refused
    assert torch.equal(u2.distributed.load_sharded(directory, 10, 30)["weight"], table[10:30])
    os.remove(os.path.join(directory, "index.json"))
    with pytest.raises(FileNotFoundError, match="incomplete"):
        u2.distributed.load_sharded(directory)


def _save_reversed(rank, world, directory):
    table = torch.arange(8, dtype=torch.float32).unsqueeze(1).repeat(1, 3)
    offset = 4 if rank == 0 else 0  # rank order is not row order
    u2.distributed.save_sharded(directory, {"w": table[offset:offset + 4]}, offset)
    return {}


def _empty_cross_entropy(rank, world):
    start, stop = u2.distributed.shard_bounds(10, world)[rank]
    loss = u2.distributed.large_vocab_cross_entropy(torch.zeros(0, 4), torch.randn(stop - start, 4),
                                                    torch.zeros(0, dtype=torch.int64), start)
    return {"loss": loss}


def test_shards_load_in_row_order_and_an_empty_batch_is_a_nan_mean(tmp_path):
    directory = str(tmp_path / "ckpt")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _run(tmp_path / "a", 2, _save_reversed, directory)
    loaded = u2.distributed.load_sharded(directory)["w"][:, 0]
    assert torch.equal(loaded, torch.arange(8, dtype=torch.float32))
    for result in _run(tmp_path / "b", 2, _empty_cross_entropy):
        assert "error" not in result, result.get("trace")
        assert torch.isnan(result["loss"])  # as F.cross_entropy's mean over no rows


# -- two-stage k-means over sharded features ------------------------------------------------------


def _kmeans_data(n=3000, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(20, d, generator=g) * 4
    return centres[torch.randint(20, (n,), generator=g)] + torch.randn(n, d, generator=g)


def _sharded_build(rank, world, bounds):
    data = _kmeans_data()
    lo, hi = bounds[rank]
    got = u2.distributed.build_codebook(data[lo:hi], 60, 6, niter=8, seed=3, max_points_per_centroid=8)
    out = {"vectors": got.vectors.clone(), "coarse_ids": got.meta["coarse_ids"], "cell_sizes": got.meta["cell_sizes"],
           "coarse": got.meta["coarse_centroids"]}
    if rank == 0:  # the single-process build, in a process with the same thread count
        ref = u2.build_codebook(data, 60, 6, niter=8, seed=3, max_points_per_centroid=8, allocation="size",
                                progress=False)
        out["ref"] = {"vectors": ref.vectors.clone(), "coarse_ids": ref.meta["coarse_ids"],
                      "cell_sizes": ref.meta["cell_sizes"], "coarse": ref.meta["coarse_centroids"]}
    return out


@pytest.mark.parametrize("bounds", [[(0, 1700), (1700, 3000)], [(0, 400), (400, 2300), (2300, 3000)]])
def test_sharded_kmeans_equals_the_single_process_build(tmp_path, bounds):
    results = _run(tmp_path, len(bounds), _sharded_build, bounds)
    for result in results:
        assert "error" not in result, result.get("trace")
    ref = results[0]["ref"]
    for result in results:  # every rank the same codebook, and the single process's
        assert torch.equal(result["cell_sizes"], ref["cell_sizes"])
        assert torch.equal(result["coarse_ids"], ref["coarse_ids"])
        assert torch.equal(result["coarse"], ref["coarse"])  # bitwise: the same thread count everywhere
        assert torch.equal(result["vectors"], ref["vectors"])


def _bad_kmeans_input(rank, world):
    data = _kmeans_data(200)
    local = data[:100] if rank == 0 else data[100:, :5]  # rank 1: another dimension
    try:
        u2.distributed.build_codebook(local, 10)
    except ValueError as exc:
        return {"raised": str(exc)}
    return {"raised": None}


def test_sharded_kmeans_refuses_mismatched_ranks_on_every_rank(tmp_path):
    results = _run(tmp_path, 2, _bad_kmeans_input)
    assert all(r["raised"] and "differ in dimension" in r["raised"] for r in results), results


# -- a hierarchical index sharded by coarse cell ---------------------------------------------------


def _index_problem():
    data = _kmeans_data(4000, 16, seed=5)
    book = u2.build_codebook(data, 120, 12, niter=6, seed=1, progress=False, allocation="size")
    queries = _kmeans_data(300, 16, seed=6)
    queries[:5] = book.vectors[7]  # exact ties with a codeword (and its cell's other members)
    return book, queries


def _sharded_index(rank, world, metric):
    book, queries = _index_problem()
    index = u2.distributed.ShardedHierarchicalIndex.from_codebook(book, metric=metric)
    out = {}
    for nprobe in (1, 3, 12):
        out[nprobe] = index.search(queries, nprobe)
    out["exact"] = index.search(queries, exact=True)
    out["rows"] = (index.offset, index.rows)
    return out


@pytest.mark.parametrize("metric", ["l2", "ip", "cos"])
def test_sharded_index_equals_one_index(tmp_path, metric):
    results = _run(tmp_path, 3, _sharded_index, metric)
    for result in results:
        assert "error" not in result, result.get("trace")
    book, queries = _index_problem()
    single = u2.HierarchicalIndex.from_codebook(book, metric=metric)
    spans = [r["rows"] for r in results]
    assert spans[0][0] == 0 and all(a[0] + a[1] == b[0] for a, b in zip(spans, spans[1:]))
    cells = book.meta["coarse_ids"]
    for (lo, rows), (hi, _) in zip(spans, spans[1:]):
        assert cells[lo + rows - 1] != cells[hi]  # cut between cells
    for nprobe in (1, 3, 12):
        ids, dists = single.search(queries, nprobe)
        for result in results:  # every rank the single index's answer
            assert torch.equal(result[nprobe][0], ids), (metric, nprobe)
            torch.testing.assert_close(result[nprobe][1], dists)
    ids, dists = u2.nearest(queries, book.vectors, metric=metric)
    for result in results:
        assert torch.equal(result["exact"][0], ids)
        torch.testing.assert_close(result["exact"][1], dists)


def _data_parallel(rank, world):
    g = torch.Generator().manual_seed(11)
    codebook = torch.randn(500, 8, generator=g)
    x = torch.randn(70, 8, generator=g)
    counts = [30, 0, 40][:world]  # uneven, one rank with no queries
    lo = sum(counts[:rank])
    mine = x[lo:lo + counts[rank]]
    local = u2.distributed.nearest_data_parallel(mine, codebook, metric="cos")
    every = u2.distributed.nearest_data_parallel(mine, codebook, metric="cos", gather=True)
    wrong = codebook.clone()
    if rank == 1:
        wrong[3, 0] += 1e-6  # one rank's codebook differs by one value
    try:
        u2.distributed.nearest_data_parallel(mine, wrong)
        raised = None
    except ValueError as exc:
        raised = str(exc)
    return {"local": local, "every": every, "raised": raised, "x": x, "codebook": codebook, "lo": lo, "n": counts[rank]}


def test_data_parallel_search_returns_each_ranks_and_the_whole_jobs_ids(tmp_path):
    results = _run(tmp_path, 3, _data_parallel)
    for result in results:
        assert "error" not in result, result.get("trace")
    ref_ids, ref_dists = u2.nearest(results[0]["x"], results[0]["codebook"], metric="cos")
    for r in results:
        assert torch.equal(r["local"][0], ref_ids[r["lo"]:r["lo"] + r["n"]])
        assert torch.equal(r["every"][0], ref_ids)
        torch.testing.assert_close(r["every"][1], ref_dists)
        assert r["raised"] and "codebook differs between ranks" in r["raised"]


def _failing_cell(rank, world):
    g = torch.Generator().manual_seed(2)
    points = torch.randn(5, 4, generator=g) * 10
    data = points.repeat(40, 1)  # 200 rows, 5 distinct: some cell gets more codewords than distinct rows
    lo, hi = (0, 120) if rank == 0 else (120, 200)
    try:
        u2.distributed.build_codebook(data[lo:hi], 12, 2, niter=3)
    except (ValueError, RuntimeError) as exc:
        return {"raised": f"{type(exc).__name__}: {exc}"}
    return {"raised": None}


def test_a_failing_cell_raises_on_every_rank_instead_of_hanging(tmp_path):
    results = _run(tmp_path, 2, _failing_cell)
    assert all(r["raised"] for r in results), results
    assert any("distinct" in r["raised"] for r in results), results  # the owner's own words


def _tight_cuts(rank, world):
    vectors = torch.arange(12, dtype=torch.float32).unsqueeze(1).repeat(1, 3)
    cells = torch.tensor([0, 1] + [2] * 10)
    book = u2.Codebook(vectors, meta={"coarse_ids": cells, "coarse_centroids": torch.tensor([[0.0] * 3, [1.0] * 3,
                                                                                             [6.5] * 3])})
    index = u2.distributed.ShardedHierarchicalIndex.from_codebook(book)
    return {"span": (index.offset, index.rows), "ids": index.search(vectors + 0.1, 3)[0]}


def test_cell_cuts_leave_every_rank_a_cell(tmp_path):
    results = _run(tmp_path, 3, _tight_cuts)
    for r in results:
        assert "error" not in r, r.get("trace")
    assert [r["span"] for r in results] == [(0, 1), (1, 1), (2, 10)]
    assert all(torch.equal(r["ids"], torch.arange(12)) for r in results)
