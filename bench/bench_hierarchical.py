"""Benchmark hierarchical search: u2.HierarchicalIndex vs FAISS IndexIVFFlat on the same cells, and exact search.

SigLIP-like synthetic data (two-level clusters, d = 1152, fp32; ``--data clustered``: the tight,
close-family stress codebook of ``u2.data.clustered_codebook``): a codebook of K codewords and
N = 2916 held-out queries (four images of 729 patches; drawn around codewords with noise, none of
them a codeword). One index is built per run (``HierarchicalIndex.build``: k-means into n_coarse
cells, build time reported) and FAISS's IVF index is given exactly the same partition: an
``IndexFlatL2`` quantizer holding the index's coarse centroids, ``IndexIVFFlat(quantizer, d,
n_coarse)`` marked trained, the codewords added with their cell ids (``add_preassigned``). Every
method runs with the same thread count, in the same run:

approximate (one row per nprobe in 1, 2, 4, 8, 16, 32, 64, at most n_coarse)
    u2_hier               ``index.search(x, nprobe)``: grouped per-cell BLAS scan (CPU)
    faiss_ivf             ``IndexIVFFlat.search(x, 1)`` with ``nprobe``
    faiss_ivf_own         FAISS's own build (faiss.Kmeans + IndexIVFFlat.add, the build time u2's
                          is compared with) and its search
    u2_hier_triton_bf16   the grouped Triton kernel on bf16 CUDA tensors (only where CUDA is available)
    u2_hier_triton_fp32   the same in fp32
exact
    u2_exact              ``index.search(x, exact=True)``: certified, equal to u2.nearest
    u2_flat               ``u2.nearest(x, codebook)``: the flat exact scan, and the recall reference
    faiss_flat            ``IndexFlatL2.search(x, 1)``

Per row: median / p10 / p90 seconds, queries/s, recall@1 (fraction of ids equal to u2.nearest's,
which is exact), codewords scanned per query (the mean size of the probed cells, summed over
probes), the speed ratio to faiss_ivf at the same nprobe and to u2_flat (> 1: faster), and
one-time build seconds, excluded from the timings.

Writes OUT/hierarchical.csv, OUT/hierarchical.md and OUT/hierarchical.png (recall@1 against
queries/s, log scale, one curve per method) and prints the table.

    python bench/bench_hierarchical.py            # K = 500K, n_coarse = 1000
    python bench/bench_hierarchical.py --quick    # K = 50K, n_coarse = 100
    python bench/bench_hierarchical.py --tiny     # smoke test: K = 2000, d = 64, N = 37
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from tqdm import tqdm

import unicode2_fast as u2
from unicode2_fast.data import clustered_codebook, siglip_like
from unicode2_fast.bench import _common

NPROBES = (1, 2, 4, 8, 16, 32, 64)
APPROX_METHODS = ("u2_hier", "faiss_ivf", "faiss_ivf_own", "u2_hier_triton_bf16", "u2_hier_triton_fp32")
EXACT_METHODS = ("u2_exact", "u2_flat", "faiss_flat")
GPU_METHODS = ("u2_hier_triton_bf16", "u2_hier_triton_fp32")
ALL_METHODS = APPROX_METHODS + EXACT_METHODS

TABLE_COLUMNS = ("method", "nprobe", "recall@1", "median s", "q/s", "codes/query", "× faiss_ivf", "× u2_flat",
                 "build s")


def _time(fn: Callable[[], Any], repeats: int, warmup: int, cuda: bool):
    return _common.time_calls(fn, repeats, warmup, torch.cuda.synchronize if cuda else None)


def _space(v: torch.Tensor, metric: str):
    """The rows as FAISS searches them for ``metric``: unit rows for cos (inner product on the sphere)."""
    v = v.float()
    if metric == "cos":
        v = torch.nn.functional.normalize(v, dim=1)
    return v.contiguous().numpy()


def _faiss_metric(metric: str):
    import faiss

    return faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT


def _quantizer(d: int, metric: str):
    """FAISS's coarse quantizer probing as the index does: l2 for l2 and cos (unit rows), ip for ip."""
    import faiss

    return faiss.IndexFlatIP(d) if metric == "ip" else faiss.IndexFlatL2(d)


def _faiss_ivf(index: "u2.HierarchicalIndex", codebook: torch.Tensor):
    """IndexIVFFlat over exactly the index's cells: its centroids quantize, its cell ids assign."""
    import faiss
    from faiss.contrib.ivf_tools import add_preassigned

    quantizer = _quantizer(index.dim, index.metric)
    quantizer.add(index.coarse_centroids.float().contiguous().numpy())
    ivf = faiss.IndexIVFFlat(quantizer, index.dim, index.n_coarse, _faiss_metric(index.metric))
    ivf.is_trained = True
    add_preassigned(ivf, _space(codebook, index.metric), index.coarse_ids.numpy())
    return ivf, quantizer


def codes_per_query(index: "u2.HierarchicalIndex", queries: torch.Tensor, nprobe: int) -> float:
    """Mean number of codewords in the nprobe cells each query probes."""
    x = torch.nn.functional.normalize(queries.float(), dim=1) if index.metric == "cos" else queries.float()
    probes = index._probe(x, nprobe)
    return float(index.cell_sizes[probes].sum(dim=1).double().mean())


def run(args: argparse.Namespace, stamp: Dict[str, Any]) -> List[Dict[str, Any]]:
    import faiss

    if args.data == "clustered":
        data = clustered_codebook(args.k, args.n, args.d, seed=args.seed)
    else:
        data = siglip_like(args.k, args.n, args.d, seed=args.seed)
    codebook, queries = data.codebook, data.queries
    del data
    k, n, d = args.k, args.n, args.d
    cuda = torch.cuda.is_available()
    # the grouped Triton kernel scans l2 cells only
    methods = [m for m in args.methods if m not in GPU_METHODS or (cuda and args.metric == "l2")]
    metric = args.metric
    xs = _space(queries, metric)
    nprobes = [p for p in args.nprobe if p <= args.n_coarse]
    steps = sum(len(nprobes) if m in APPROX_METHODS else 1 for m in methods) + 1
    progress = tqdm(total=steps, desc="hierarchical", file=sys.stderr)

    progress.set_postfix_str("build index")
    # both builds are timed --build-repeats times and reported by their median: the first build of
    # the process also pays one-time costs (the compiled loops' load, first-touch pages), and
    # FAISS's runs after it, warm
    build_times = []
    for _ in range(args.build_repeats):
        index = None  # (the previous build's memory is freed first, as for FAISS's below)
        gc.collect()
        start = time.perf_counter()
        index = u2.HierarchicalIndex.build(codebook, n_coarse=args.n_coarse, niter=args.niter, seed=args.seed,
                                           metric=metric)
        build_times.append(time.perf_counter() - start)
    index_build_s = statistics.median(build_times)
    progress.update()

    results: Dict[tuple, Dict[str, Any]] = {}

    def record(method: str, nprobe: Optional[int], times: List[float], ids: torch.Tensor, build_s: Optional[float],
               note: str = "") -> None:
        results[(method, nprobe)] = dict(times=times, ids=ids.cpu().reshape(-1).long(), build_s=build_s, note=note)
        progress.update()

    def sweep_ivf(method: str, ivf, build_s: float, note: str) -> None:
        """Time a FAISS IVF index at every nprobe of the sweep."""
        for nprobe in nprobes:
            progress.set_postfix_str(f"{method} nprobe={nprobe}")
            ivf.nprobe = nprobe
            times, (_, ids) = _time(lambda: ivf.search(xs, 1), args.repeats, args.warmup, False)
            record(method, nprobe, times, torch.from_numpy(ids[:, 0]), build_s, note)

    # the exact reference first: recall is measured against it
    progress.set_postfix_str("u2_flat")
    flat_codebook = codebook.view_as(codebook)  # own cache entry: the first call pays u2's statistics build
    first_s = _time(lambda: u2.nearest(queries, flat_codebook, metric=metric), 1, 0, False)[0][0]
    times, (exact_ids, _) = _time(lambda: u2.nearest(queries, flat_codebook, metric=metric), args.repeats,
                                  args.warmup, False)
    if "u2_flat" in methods:
        record("u2_flat", None, times, exact_ids, max(0.0, first_s - _common.quantiles(times)["median_s"]),
               "build_s = first call - median")
    if "faiss_flat" in methods:
        progress.set_postfix_str("faiss_flat")
        flat = faiss.IndexFlatL2(d) if metric == "l2" else faiss.IndexFlatIP(d)
        start = time.perf_counter()
        flat.add(_space(codebook, metric))
        build_s = time.perf_counter() - start
        times, (_, ids) = _time(lambda: flat.search(xs, 1), args.repeats, args.warmup, False)
        record("faiss_flat", None, times, torch.from_numpy(ids[:, 0]), build_s)
        del flat
    if "u2_exact" in methods:
        progress.set_postfix_str("u2_exact")
        times, (ids, _) = _time(lambda: index.search(queries, exact=True), args.repeats, args.warmup, False)
        record("u2_exact", None, times, ids, index_build_s, "build_s = k-means + index")

    if "u2_hier" in methods:
        for nprobe in nprobes:
            progress.set_postfix_str(f"u2_hier nprobe={nprobe}")
            times, (ids, _) = _time(lambda: index.search(queries, nprobe=nprobe), args.repeats, args.warmup, False)
            record("u2_hier", nprobe, times, ids, index_build_s, "build_s = k-means + index")
    if "faiss_ivf" in methods:
        start = time.perf_counter()
        ivf, quantizer = _faiss_ivf(index, codebook)
        build_s = time.perf_counter() - start
        sweep_ivf("faiss_ivf", ivf, build_s, "same cells as u2; build_s = add_preassigned only")
        del ivf, quantizer
    if "faiss_ivf_own" in methods:
        # FAISS's own build of the same size: faiss.Kmeans (its default 256 points per centroid)
        # + IndexIVFFlat.add, the figure u2's build time is measured against
        progress.set_postfix_str("faiss_ivf_own build")
        own_times = []
        for _ in range(args.build_repeats):
            ivf = quantizer = kmeans = None  # (the previous build's memory is freed first)
            gc.collect()
            start = time.perf_counter()
            kmeans = faiss.Kmeans(d, index.n_coarse, niter=args.niter, seed=args.seed, verbose=False)
            base = _space(codebook, metric)
            kmeans.train(base)
            quantizer = _quantizer(d, metric)
            quantizer.add(kmeans.centroids)
            ivf = faiss.IndexIVFFlat(quantizer, d, index.n_coarse, _faiss_metric(metric))
            ivf.is_trained = True
            ivf.add(base)
            own_times.append(time.perf_counter() - start)
        sweep_ivf("faiss_ivf_own", ivf, statistics.median(own_times),
                  "FAISS's own cells; build_s = faiss.Kmeans + IndexIVFFlat.add")
        del ivf, quantizer, kmeans
    for method in (m for m in methods if m in GPU_METHODS):
        dtype = torch.bfloat16 if method.endswith("bf16") else torch.float32
        gpu_index = u2.HierarchicalIndex(codebook.to("cuda", dtype), index.coarse_centroids.cuda(),
                                         index.coarse_ids.cuda())
        x = queries.to("cuda", dtype)
        for nprobe in nprobes:
            progress.set_postfix_str(f"{method} nprobe={nprobe}")
            first_s = _time(lambda: gpu_index.search(x, nprobe=nprobe), 1, 0, True)[0][0]
            times, (ids, _) = _time(lambda: gpu_index.search(x, nprobe=nprobe), args.repeats, args.warmup, True)
            record(method, nprobe, times, ids, max(0.0, first_s - _common.quantiles(times)["median_s"]),
                   "build_s = first call - median (includes Triton compile)")
        del gpu_index, x
        torch.cuda.empty_cache()
    progress.close()

    flat = results.get(("u2_flat", None))
    flat_median = _common.quantiles(flat["times"])["median_s"] if flat else None
    scanned = {p: codes_per_query(index, queries, p) for p in nprobes}
    rows = []
    for (method, nprobe), r in results.items():
        q = _common.quantiles(r["times"])
        ivf = results.get(("faiss_ivf", nprobe)) if nprobe is not None else None
        ivf_median = _common.quantiles(ivf["times"])["median_s"] if ivf else None
        on_gpu = method in GPU_METHODS
        rows.append({
            "method": method,
            "nprobe": nprobe,
            "data": args.data, "metric": metric, "K": k, "N": n, "d": d, "n_coarse": index.n_coarse,
            "dtype": "bfloat16" if method.endswith("bf16") else "float32",
            "recall_at_1": float((r["ids"] == exact_ids).double().mean()),
            **q,
            "repeats": len(r["times"]),
            "queries_per_s": n / q["median_s"],
            "codes_per_query": (None if method in ("u2_exact", "faiss_ivf_own") else k) if nprobe is None
            or method == "faiss_ivf_own" else scanned[nprobe],
            "ratio_vs_faiss_ivf": ivf_median / q["median_s"] if ivf_median else None,
            "ratio_vs_u2_flat": flat_median / q["median_s"] if flat_median else None,
            "build_s": r["build_s"],
            "device": stamp["gpu"] if on_gpu else stamp["cpu"],
            "threads": stamp["threads"],
            "torch": stamp["torch"], "faiss": stamp["faiss"], "triton": stamp["triton"], "numpy": stamp["numpy"],
            "date": stamp["date"],
            "note": r["note"],
        })
    del index, codebook, queries
    gc.collect()
    return rows




def markdown_table(rows: Sequence[Dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["method"], _common.fmt(r["nprobe"], "d"), f"{r['recall_at_1']:.4f}", f"{r['median_s']:.4g}",
            f"{r['queries_per_s']:,.0f}", _common.fmt(r["codes_per_query"], ",.0f"),
            _common.fmt(r["ratio_vs_faiss_ivf"], ".2f", "×"), _common.fmt(r["ratio_vs_u2_flat"], ".2f", "×"),
            _common.fmt(r["build_s"], ".3g"),
        ]) + " |")
    return "\n".join(lines)




def plot(rows: Sequence[Dict[str, Any]], stamp: Dict[str, Any], path: str) -> None:
    """recall@1 (x) against queries/s (log y): a curve per nprobe sweep, a marker per exact method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        xs = [r["recall_at_1"] for r in mine]
        ys = [r["queries_per_s"] for r in mine]
        if mine[0]["nprobe"] is None:
            ax.scatter(xs, ys, marker="*", s=140, label=method, zorder=3)
            continue
        ax.plot(xs, ys, marker="o", label=method)
        for r in mine:
            ax.annotate(str(r["nprobe"]), (r["recall_at_1"], r["queries_per_s"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("recall@1 (ids equal to the exact nearest codeword)")
    ax.set_ylabel("queries / s (log scale, higher is better)")
    r0 = rows[0]
    device = stamp["cpu"] + (f" + {stamp['gpu']}" if stamp["gpu"] else "")
    ax.set_title(
        f"hierarchical search, K={r0['K']:,}, d={r0['d']}, N={r0['N']:,}, n_coarse={r0['n_coarse']} "
        f"(labels: nprobe), {stamp['threads']} CPU threads\n{device}\n"
        f"torch {stamp['torch']}, faiss {stamp['faiss']}, triton {stamp['triton']}, {stamp['date']}",
        fontsize=8,
    )
    ax.legend(fontsize=8)
    ax.grid(which="both", alpha=0.3)
    fig.tight_layout()
    _common.save_figure(fig, path)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=500_000, help="codebook size K")
    parser.add_argument("--n", type=int, default=2916, help="held-out queries N (2916 = four images)")
    parser.add_argument("--d", type=int, default=1152, help="feature dimension")
    parser.add_argument("--n-coarse", type=int, default=None, help="cells (default: K / 500, at most 1000)")
    parser.add_argument("--niter", type=int, default=20, help="k-means iterations of the index build")
    parser.add_argument("--nprobe", type=int, nargs="+", default=list(NPROBES), help="nprobe sweep")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per method and nprobe")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before the timed ones")
    parser.add_argument("--build-repeats", type=int, default=3,
                        help="timed builds of u2's index and of FAISS's own IVF index (build s: their median)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="CPU threads for torch and FAISS alike (default: torch's current setting)")
    parser.add_argument("--methods", nargs="+", choices=ALL_METHODS, default=list(ALL_METHODS),
                        help="subset of methods (u2_flat always runs: it is the recall reference)")
    parser.add_argument("--out", default="bench_out", help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="synthetic data and k-means seed")
    parser.add_argument("--metric", choices=("l2", "ip", "cos"), default="l2",
                        help="the index's metric (FAISS: IndexFlatIP / IVF with METRIC_INNER_PRODUCT for ip, "
                             "the same on unit rows for cos); the Triton methods run for l2 only")
    parser.add_argument("--data", choices=("synthetic", "clustered"), default="synthetic",
                        help="SigLIP-like codebook, or the clustered two-level stress codebook (tight cells in "
                             "close families, decaying spectrum)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="K=50000, n_coarse=100")
    size.add_argument("--tiny", action="store_true", help="K=2000, d=64, N=37, n_coarse=16, repeats 1: smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.k = 50_000
    if args.tiny:
        args.k, args.n, args.d, args.n_coarse, args.repeats, args.niter, args.build_repeats = 2000, 37, 64, 16, 1, 5, 1
    if args.n_coarse is None:
        args.n_coarse = max(1, min(1000, args.k // 500))
    counts = (args.k, args.n, args.d, args.repeats, args.build_repeats, args.threads, args.n_coarse, *args.nprobe)
    if min(counts) < 1 or args.warmup < 0:
        parser.error("need K, N, d, n_coarse, nprobe, repeats, build-repeats, threads >= 1 and warmup >= 0")
    if args.n_coarse > args.k:
        parser.error(f"--n-coarse {args.n_coarse} exceeds K = {args.k}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    import faiss

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    if not torch.cuda.is_available():
        print("GPU part skipped: no CUDA device")
    stamp = _common.machine_stamp()
    rows = run(args, stamp)

    table = markdown_table(rows)
    _common.write_report(
        args.out, "hierarchical", rows, table, _common.stamp_text(stamp),
        f"hierarchical search (K = {args.k:,}, d = {args.d}, N = {args.n:,}, n_coarse = {args.n_coarse}, fp32)",
        "recall@1: ids equal to u2.nearest (exact). codes/query: codewords in the probed cells. "
        "× faiss_ivf: FAISS IndexIVFFlat on the same cells at the same nprobe, its median over this "
        "method's (> 1: faster); × u2_flat likewise against the flat exact scan. build s: one-time "
        f"preparation, excluded from the timings (u2's index and faiss_ivf_own: the median of "
        f"{args.build_repeats} builds).",
        lambda path: plot(rows, stamp, path),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
