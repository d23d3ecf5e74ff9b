"""Sharded exact search: u2.distributed.nearest on 1 and 2 CPU processes (gloo) against
single-process u2.nearest, with the bytes each rank receives per query, the C2 training step
replicated vs vocab-parallel (u2.distributed.VocabParallelEmbedding), the sharded two-stage
k-means (u2.distributed.build_codebook against u2.build_codebook, the same codebook required),
and a scaling *model* (not a measurement) for 8 / 64 / 128 H100s.

The codebook (synthetic SigLIP-like, seeded) is written once to a temporary .npy; each rank
memory-maps its near-equal row range (``u2.distributed.shard_bounds``) and copies it into RAM,
so no rank ever holds the whole codebook. Every world size gets the same total thread count
(threads // world per rank). Times are rank 0's wall clock per call, between barriers, after
one warm-up call; ids are compared with the single-process search (they must be identical).

    python -m unicode2_fast.bench.bench_distributed              # K = 500K: about 3 minutes on 2 cores
    python -m unicode2_fast.bench.bench_distributed --k 100000 --worlds 1 2
    python -m unicode2_fast.bench.bench_distributed --tiny

Writes OUT/distributed.md and OUT/distributed.csv.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import shutil
import statistics
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

import unicode2_fast as u2
from unicode2_fast.bench import _common
from unicode2_fast.data import siglip_like

#: per-query payload of the result all-gather: a float64 objective and an int64 id per rank
BYTES_PER_QUERY_PER_RANK = 16
#: the scaling model's assumptions (H100 SXM): sustained bf16 GEMM rate of the fused kernel, and
#: per-GPU bandwidth / per-step latency of NVLink 4 within a node and NDR InfiniBand across nodes
MODEL_TFLOPS = 600.0
MODEL_LINKS = {"NVLink (8 GPUs / node)": (450e9, 5e-6), "InfiniBand NDR (400 Gb/s per GPU)": (50e9, 10e-6)}


@contextlib.contextmanager
def _gloo(rank: int, world: int, rendezvous: str, threads: int, minutes: int):
    """A spawned worker's set-up and teardown: its thread count, then the gloo group it joins
    (``minutes``: the collectives' timeout), destroyed on the way out whatever happened."""
    import torch.distributed as dist

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=minutes))
    try:
        yield dist
    finally:
        dist.destroy_process_group()


def _worker(rank: int, world: int, rendezvous: str, directory: str, threads: int, repeats: int, result_path: str):
    with _gloo(rank, world, rendezvous, threads, 10) as dist:
        codebook = np.load(os.path.join(directory, "codebook.npy"), mmap_mode="r")
        queries = torch.from_numpy(np.load(os.path.join(directory, "queries.npy")))
        start, stop = u2.distributed.shard_bounds(codebook.shape[0], world)[rank]
        shard = torch.from_numpy(np.array(codebook[start:stop]))  # this rank's rows, copied into RAM
        u2.distributed.nearest(queries, shard, start)  # warm-up: per-codebook statistics, caches
        times = []
        ids = None
        for _ in range(repeats):
            dist.barrier()
            began = time.perf_counter()
            ids, _ = u2.distributed.nearest(queries, shard, start)
            times.append(time.perf_counter() - began)
        if rank == 0:
            torch.save({"times": times, "ids": ids}, result_path)


def _exit_after(worker, *args) -> None:
    """A spawned rank: ``worker(*args)``, then leave without the interpreter's C++ teardown, where
    gloo's threads now and then abort a finished rank ("terminate called without an active
    exception", SIGABRT, after destroy_process_group: seen on the 2-core CI machine under load; the
    tests' ranks leave the same way). Exit code 1, with the traceback printed, if the worker raised."""
    import sys
    import traceback

    code = 0
    try:
        worker(*args)
    except BaseException:  # the parent sees the exit code and raises
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _spawn(worker, world: int, directory: str, threads: int, arg: object, name: str, what: str) -> Dict[str, object]:
    """Run ``worker(rank, world, rendezvous, directory, threads_per_rank, arg, result_path)`` on
    ``world`` spawned gloo processes; rank 0's saved result, with the threads each rank had."""
    import torch.multiprocessing as mp

    rendezvous = os.path.join(directory, f"rendezvous-{name}-{world}")
    result_path = os.path.join(directory, f"{name}-{world}.pt")
    ctx = mp.get_context("spawn")
    per_rank = max(1, threads // world)
    procs = [ctx.Process(target=_exit_after, args=(worker, r, world, rendezvous, directory, per_rank, arg, result_path))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"a rank of the {world}-process {what} failed (exit codes {[p.exitcode for p in procs]})")
    result = torch.load(result_path, weights_only=False)
    result["threads_per_rank"] = per_rank
    return result


def run_world(world: int, directory: str, threads: int, repeats: int) -> Dict[str, object]:
    """Times and ids of one sharded search on ``world`` spawned gloo processes."""
    return _spawn(_worker, world, directory, threads, repeats, "search", "search")


def _kmeans_worker(rank: int, world: int, rendezvous: str, directory: str, threads: int, params: Dict[str, int],
                   result_path: str):
    with _gloo(rank, world, rendezvous, threads, 30) as dist:
        features = np.load(os.path.join(directory, "features.npy"), mmap_mode="r")
        start, stop = u2.distributed.shard_bounds(features.shape[0], world)[rank]
        local = torch.from_numpy(np.array(features[start:stop]))  # this rank's rows only
        dist.barrier()
        began = time.perf_counter()
        book = u2.distributed.build_codebook(local, params["k"], params["n_coarse"], niter=params["niter"], seed=0)
        seconds = time.perf_counter() - began
        if rank == 0:
            torch.save({"seconds": seconds, "vectors": book.vectors}, result_path)


def run_kmeans(world: int, directory: str, threads: int, params: Dict[str, int]) -> Dict[str, object]:
    """Time and codebook of u2.distributed.build_codebook on ``world`` spawned gloo processes."""
    return _spawn(_kmeans_worker, world, directory, threads, params, "kmeans", "k-means")


def _c2_worker(rank: int, world: int, rendezvous: str, directory: str, threads: int, params: Dict[str, int],
               result_path: str):
    """Timed C2 steps (lookup, backward, SparseRowAdamW) replicated or vocab-parallel, each rank its own ids."""
    from unicode2_fast.bench.bench_embedding import zipf_batches

    with _gloo(rank, world, rendezvous, threads, 30) as dist:
        k, d, n, steps = params["k"], params["d"], params["n"], params["steps"]
        table = torch.randn(k, d, generator=torch.Generator().manual_seed(0))
        batches = zipf_batches(k, n, steps + 1, 1.0, 100 + rank, torch.device("cpu"))  # each rank its own ids
        grads = torch.randn(n, d, generator=torch.Generator().manual_seed(200 + rank))
        out = {}
        for mode in ("replicated", "vocab-parallel"):
            if mode == "replicated":
                weight = torch.nn.Parameter(table.clone())
                lookup = lambda ids: u2.gathered_embedding(ids, weight)  # noqa: E731
            else:
                emb = u2.distributed.VocabParallelEmbedding(k, d, weight=table)
                weight, lookup = emb.weight, emb
            opt = u2.SparseRowAdamW([weight], lr=1e-3)
            times = []
            for step, ids in enumerate(batches):
                dist.barrier()
                began = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                (lookup(ids) * grads).sum().backward()
                if mode == "replicated":  # the replicated table's row-sparse gradient, averaged
                    grad = weight.grad.coalesce()
                    idx, rows = u2.distributed.all_gather_rows(grad.indices()[0], grad.values())
                    weight.grad = torch.sparse_coo_tensor(idx.unsqueeze(0), rows / world, weight.shape).coalesce()
                opt.step()
                if step:  # the first step allocates the moments: left out
                    times.append(time.perf_counter() - began)
            final = weight.detach() if mode == "replicated" else emb.full_weight()
            out[mode] = {"times": times, "table": final.clone() if rank == 0 else None,
                         "bytes": weight.numel() * 4 * 3}  # the table and its two AdamW moments on this rank
            del weight, opt
        if rank == 0:
            torch.save(out, result_path)


def run_c2(world: int, directory: str, threads: int, params: Dict[str, int]) -> Dict[str, object]:
    """Times and final tables of the C2 step, both modes, on ``world`` spawned gloo processes."""
    return _spawn(_c2_worker, world, directory, threads, params, "c2", "C2 step")


def _c2_table(args: argparse.Namespace, directory: str, rows: List[Dict[str, object]]) -> List[str]:
    params = {"k": args.c2_k, "d": args.d, "n": args.c2_n, "steps": args.repeats * 3}
    lines = [f"## C2 training step, K = {args.c2_k:,}, d = {args.d}, N = {args.c2_n} Zipf ids per rank "
             "(lookup, backward, SparseRowAdamW)", "",
             "| processes | C2 | min / median ms per step | table + moments per rank | tables equal |", "|---|---|---|---|---|"]
    for world in args.worlds:
        result = run_c2(world, directory, args.threads, params)
        same = bool(torch.allclose(result["replicated"]["table"], result["vocab-parallel"]["table"], rtol=1e-5,
                                   atol=1e-6))
        for mode in ("replicated", "vocab-parallel"):
            t = result[mode]["times"]
            lines.append(f"| {world} | {mode} | {1e3 * min(t):.1f} / {1e3 * statistics.median(t):.1f} | "
                         f"{result[mode]['bytes'] / 2**20:,.1f} MiB | {same} |")
            rows.append({"method": f"C2 step {mode}", "world": world, "min_s": min(t), "median_s": statistics.median(t),
                         "bytes_per_rank": result[mode]["bytes"], "ids_identical": same})
    return lines + [""]


def model_rows(k: int, n: int, d: int, worlds: Sequence[int] = (8, 64, 128)) -> List[Dict[str, object]]:
    """The scaling model: per search of N queries, each GPU scans K / W codewords at MODEL_TFLOPS
    and receives W x N x 16 bytes in a ring all-gather (W - 1 steps of the link's latency)."""
    rows = []
    for world in worlds:
        compute = 2.0 * n * (k / world) * d / (MODEL_TFLOPS * 1e12)
        received = (world - 1) * n * BYTES_PER_QUERY_PER_RANK
        for link, (bandwidth, latency) in MODEL_LINKS.items():
            if world <= 8 or "NVLink" not in link:
                comm = received / bandwidth + (world - 1) * latency
                rows.append({"gpus": world, "link": link, "compute_s": compute, "bytes_per_query": received / n,
                             "comm_s": comm, "total_s": compute + comm})
    return rows


def _kmeans_table(args: argparse.Namespace, directory: str, rows: List[Dict[str, object]]) -> List[str]:
    """u2.build_codebook (allocation "size") in one process vs u2.distributed.build_codebook on each
    world size, the same rows and seed: time and whether the codebooks are identical."""
    data = siglip_like(args.kmeans_rows, 1, args.kmeans_d, seed=1).codebook  # SigLIP-like feature rows
    np.save(os.path.join(directory, "features.npy"), data.numpy())
    k = args.kmeans_k
    params = {"k": k, "n_coarse": max(1, round(k ** 0.5)), "niter": 20}
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    single = u2.build_codebook(data, k, params["n_coarse"], niter=params["niter"], seed=0, allocation="size",
                               progress=False).vectors
    single_s = time.perf_counter() - began
    def mse(vectors: torch.Tensor) -> float:
        return float(u2.nearest(data, vectors)[1].double().mean())

    single_mse = mse(single)
    lines = [f"## two-stage k-means, {args.kmeans_rows:,} x {args.kmeans_d} SigLIP-like rows -> k = {k:,} "
             f"({params['n_coarse']} cells, {params['niter']} iterations)", "",
             "| processes | threads per rank | seconds | vs one process | identical to one process's | "
             "max abs difference | quantisation MSE vs one process's |", "|---|---|---|---|---|---|---|",
             f"| u2.build_codebook (one process) | {args.threads} | {single_s:.2f} | 1.00x | - | - | 1.0000 |"]
    rows.append({"method": "u2.build_codebook", "world": 1, "threads_per_rank": args.threads, "min_s": single_s,
                 "median_s": single_s, "ratio_vs_single": 1.0, "ids_identical": True})
    for world in args.worlds:
        result = run_kmeans(world, directory, args.threads, params)
        same = bool(torch.equal(result["vectors"], single))
        gap = float((result["vectors"] - single).abs().max())
        ratio = mse(result["vectors"]) / single_mse
        lines.append(f"| {world} | {result['threads_per_rank']} | {result['seconds']:.2f} | "
                     f"{single_s / result['seconds']:.2f}x | {same} | {gap:.2e} | {ratio:.4f} |")
        rows.append({"method": "u2.distributed.build_codebook", "world": world,
                     "threads_per_rank": result["threads_per_rank"], "min_s": result["seconds"],
                     "median_s": result["seconds"], "ratio_vs_single": single_s / result["seconds"],
                     "ids_identical": same, "max_abs_difference": gap, "mse_ratio": ratio})
    lines += ["", "Identical where each rank runs the single process's thread count; with fewer threads per rank "
              "the fp32 / fp64 sums run in another order, and k-means carries such last-bit differences on "
              "(the MSE column shows what they cost)."]
    return lines + [""]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=500_000, help="codewords (the whole codebook, all shards)")
    parser.add_argument("--n", type=int, default=729, help="queries (one image)")
    parser.add_argument("--d", type=int, default=1152)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2], help="process counts to run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="total threads, split over ranks")
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--c2-k", type=int, default=200_000, help="C2 rows of the training-step comparison (0: skip)")
    parser.add_argument("--c2-n", type=int, default=2916, help="ids per rank and step (4 images of 729)")
    parser.add_argument("--kmeans-rows", type=int, default=60_000, help="features of the sharded k-means (0: skip it)")
    parser.add_argument("--kmeans-d", type=int, default=128)
    parser.add_argument("--kmeans-k", type=int, default=2048)
    parser.add_argument("--tiny", action="store_true",
                        help="K = 4000, N = 64, d = 64, 1 repeat; k-means 3000 x 16 to k = 64: smoke test")
    args = parser.parse_args(argv)
    if args.tiny:
        args.k, args.n, args.d, args.repeats = 4000, 64, 64, 1
        args.kmeans_rows, args.kmeans_d, args.kmeans_k = 3000, 16, 64
        args.c2_k, args.c2_n = 2000, 64
    if min(args.worlds) < 1 or args.k < max(args.worlds) or args.repeats < 1:
        parser.error("need world sizes >= 1, K >= the largest world size and --repeats >= 1")

    stamp = _common.machine_stamp()
    directory = tempfile.mkdtemp(prefix="u2-bench-distributed-")
    try:
        data = siglip_like(args.k, args.n, args.d, seed=0)
        np.save(os.path.join(directory, "codebook.npy"), data.codebook.numpy())
        np.save(os.path.join(directory, "queries.npy"), data.queries.numpy())
        torch.set_num_threads(args.threads)
        u2.nearest(data.queries, data.codebook)  # warm-up
        times, (expected, _) = _common.time_calls(lambda: u2.nearest(data.queries, data.codebook), args.repeats)
        single = statistics.median(times)
        del data
        lines = ["| processes | threads per rank | min / median s | queries/s | vs single-process u2.nearest | "
                 "bytes received per query per rank | ids = u2.nearest |", "|---|---|---|---|---|---|---|"]
        rows = [{"method": "u2.nearest", "world": 1, "threads_per_rank": args.threads, "min_s": min(times),
                 "median_s": single, "queries_per_s": args.n / single, "ratio_vs_single": 1.0,
                 "bytes_per_query": 0, "ids_identical": True}]
        lines.append(f"| u2.nearest (one process) | {args.threads} | {min(times):.3f} / {single:.3f} | "
                     f"{args.n / single:,.0f} | 1.00x | 0 | - |")
        for world in args.worlds:
            result = run_world(world, directory, args.threads, args.repeats)
            median = statistics.median(result["times"])
            same = bool(torch.equal(result["ids"], expected))
            received = (world - 1) * BYTES_PER_QUERY_PER_RANK
            rows.append({"method": "u2.distributed.nearest", "world": world, "threads_per_rank": result["threads_per_rank"],
                         "min_s": min(result["times"]), "median_s": median, "queries_per_s": args.n / median,
                         "ratio_vs_single": single / median, "bytes_per_query": received, "ids_identical": same})
            lines.append(f"| {world} | {result['threads_per_rank']} | {min(result['times']):.3f} / {median:.3f} | "
                         f"{args.n / median:,.0f} | {single / median:.2f}x | {received} | {same} |")
            if not same:
                raise RuntimeError(f"the {world}-process search returned ids that differ from u2.nearest")
        c2_lines = _c2_table(args, directory, rows) if args.c2_k else []
        kmeans_lines = []
        if args.kmeans_rows:
            kmeans_lines = _kmeans_table(args, directory, rows)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    model = model_rows(args.k, args.n, args.d)
    model_lines = ["| GPUs | link | compute s | bytes received per query | communication s | total s |",
                   "|---|---|---|---|---|---|"]
    model_lines += [f"| {r['gpus']} | {r['link']} | {r['compute_s']:.2e} | {r['bytes_per_query']:,.0f} | "
                    f"{r['comm_s']:.2e} | {r['total_s']:.2e} |" for r in model]
    title = f"# sharded exact search, K = {args.k:,}, N = {args.n}, d = {args.d}"
    text = "\n".join([title, "", *lines, "", *c2_lines, *kmeans_lines, f"MODEL (not a measurement): H100 at {MODEL_TFLOPS:.0f} TFLOP/s sustained, "
                      "ring all-gather of 16 bytes per query per rank", "", *model_lines, "", _common.stamp_text(stamp), ""])
    print(text)
    os.makedirs(args.out, exist_ok=True)
    _common.write_text(text, os.path.join(args.out, "distributed.md"))
    _common.write_csv(rows, os.path.join(args.out, "distributed.csv"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
