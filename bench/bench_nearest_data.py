"""Exact search on data nobody tuned for: u2.nearest vs faiss.IndexFlatL2 on real photographs
(the pictures scikit-image ships), tight clusters, near-duplicates, Gaussian and synthetic data.

Each case: both on the same threads, each warmed first, ``--repeats`` timed runs; prints a
Markdown table (min / median seconds, the FAISS-over-u2 ratio of medians, id agreement with
FAISS; u2's ids are the exact float64 argmin) and writes OUT/nearest_data.md and OUT/nearest_data.csv
(one row per case and method).

    python -m unicode2_fast.bench.bench_nearest_data            # about 2 minutes on 2 cores
    python -m unicode2_fast.bench.bench_nearest_data --repeats 5 --out bench_out
    python -m unicode2_fast.bench.bench_nearest_data --scale 0.5   # the main job's --quick sizes
    python -m unicode2_fast.bench.bench_nearest_data --metric cos  # against faiss.IndexFlatIP (OUT/nearest_data_cos.*)

With ``--metric ip`` / ``cos`` FAISS runs IndexFlatIP (cos: on rows it normalises, the queries
inside the timed call, as a FAISS user does); for cos the all-zero rows (black photograph patches)
are left out of every case, since a zero vector has no cosine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable, List, Optional, Sequence, Tuple

import torch

import unicode2_fast as u2
from unicode2_fast.bench import _common
from unicode2_fast.data import clustered_codebook, near_duplicates, photo_patches, siglip_like

HEADER = ("| data | K | d | N | u2 min / median s | FAISS flat min / median s | u2 / FAISS (median) | ids = FAISS |\n"
          "|---|---|---|---|---|---|---|---|")


def _times(fn: Callable[[], object], repeats: int) -> Tuple[float, float]:
    fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return min(runs), statistics.median(runs)


def cases(scale: float = 1.0) -> List[Tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, codebook (K, d), queries (N, d)) of every case; ``scale`` shrinks K and N (smoke tests)."""
    import faiss

    def size(count: int) -> int:
        return max(8, int(count * scale))

    out = []
    k, n = size(4096), size(8000)
    p = photo_patches(n + k, 8, seed=0)
    out.append((f"photos 8x8x3, codebook = {k:,} sampled patches", p[:k], p[k:]))
    k = size(16384)
    p = photo_patches(n + k, 8, seed=1)
    out.append((f"photos 8x8x3, {k:,} sampled patches", p[:k], p[k:]))
    p = photo_patches(n + k, 16, gray=True, seed=2)
    out.append((f"photos 16x16 grey, {k:,} sampled patches", p[:k], p[k:]))
    k = size(4096)
    kmeans = faiss.Kmeans(192, k, niter=10, seed=0, verbose=False)
    kmeans.train(photo_patches(max(int(60000 * scale), 40 * k), 8, seed=3).numpy())
    out.append((f"photos 8x8x3, codebook = faiss.Kmeans({k:,})", torch.from_numpy(kmeans.centroids),
                photo_patches(n, 8, seed=4)))
    d = clustered_codebook(size(50000), size(2916), 1152)
    out.append(("clustered two-level (450 cells, 40 families)", d.codebook, d.queries))
    d = near_duplicates(size(20000), size(4000), 256)
    out.append(("near-duplicates + exact ties", d.codebook, d.queries))
    g = torch.Generator().manual_seed(0)
    out.append(("gaussian", torch.randn(size(50000), 1152, generator=g), torch.randn(size(729), 1152, generator=g)))
    d = siglip_like(size(50000), size(729), 1152)
    out.append(("synthetic SigLIP-like", d.codebook, d.queries))
    # small codebooks (a VQ layer's 256 .. 1,024 codes): FAISS's scan is short, so u2's fixed
    # per-query work (statistics, certification) weighs most here
    d = siglip_like(size(20000), size(8192), 1152, seed=5)
    for k in (size(256), size(1024)):
        out.append((f"SigLIP-like queries, small codebook of {k:,}", d.codebook[:k].contiguous(), d.queries))
    # tiny codebooks (K x d < 65,536: a VQ layer's codes on short vectors, one sub-codebook of a
    # multi-codebook quantizer, a call of a few hundred queries): FAISS's whole search is a few
    # milliseconds or less, so every fixed cost of u2's shows
    k, n = size(1024), size(8192)
    p = photo_patches(n + k, 4, gray=True, seed=6)
    out.append((f"tiny: photos 4x4 grey, {k:,} sampled patches", p[:k], p[k:]))
    k = size(256)
    p = photo_patches(n + k, 8, seed=7)
    out.append((f"tiny: photos 8x8x3, {k:,} sampled patches", p[:k], p[k:]))
    n = max(8, int(163 * scale))
    out.append((f"tiny: gaussian, 8 codewords, {n:,} queries", torch.randn(8, 64, generator=g),
                torch.randn(n, 64, generator=g)))
    return out


def _nonzero_rows(v: torch.Tensor) -> torch.Tensor:
    return v[(v != 0).any(dim=1)].contiguous()


def _faiss_index(codebook: torch.Tensor, metric: str):
    """(index, search(queries) -> (distances, ids))): IndexFlatL2, or IndexFlatIP on normalised rows
    for cos (the queries normalised inside each search, as a FAISS user does)."""
    import faiss

    rows = codebook.numpy().copy()
    if metric == "cos":
        faiss.normalize_L2(rows)
    index = faiss.IndexFlatL2(rows.shape[1]) if metric == "l2" else faiss.IndexFlatIP(rows.shape[1])
    index.add(rows)

    def search(queries: torch.Tensor):
        q = queries.numpy()
        if metric == "cos":
            q = q.copy()
            faiss.normalize_L2(q)
        return index.search(q, 1)
    return index, search


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method and case")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads for every method")
    parser.add_argument("--out", default="bench_out", help="output directory")
    parser.add_argument("--scale", type=float, default=1.0, help="K and N times this (the main job's --quick: 0.5)")
    parser.add_argument("--tiny", action="store_true", help="K and N x 0.02, 1 repeat: smoke test")
    parser.add_argument("--metric", choices=("l2", "ip", "cos"), default="l2",
                        help="l2 against IndexFlatL2 (the default), ip / cos against IndexFlatIP")
    args = parser.parse_args(argv)
    if args.tiny:
        args.repeats, args.scale = 1, 0.02
    if not 0 < args.scale <= 1 or args.repeats < 1:
        parser.error("--scale must lie in (0, 1] and --repeats be at least 1")
    import faiss

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    lines = [HEADER]
    rows = []
    stamp = _common.machine_stamp()
    print(HEADER, flush=True)
    metric = args.metric
    for name, codebook, queries in cases(args.scale):
        if metric == "cos":  # (a zero vector has no cosine)
            codebook, queries = _nonzero_rows(codebook), _nonzero_rows(queries)
        index, faiss_search = _faiss_index(codebook, metric)
        f_min, f_med = _times(lambda: faiss_search(queries), args.repeats)
        u_min, u_med = _times(lambda: u2.nearest(queries, codebook, metric=metric), args.repeats)
        ids, _ = u2.nearest(queries, codebook, metric=metric)
        assert bool(((ids >= 0) & (ids < codebook.shape[0])).all()), name
        agree = float((ids == torch.from_numpy(faiss_search(queries)[1][:, 0])).double().mean())
        line = (f"| {name} | {codebook.shape[0]:,} | {codebook.shape[1]} | {queries.shape[0]:,} | "
                f"{u_min:.3g} / {u_med:.3g} | {f_min:.3g} / {f_med:.3g} | {f_med / u_med:.2f}x | {agree:.4f} |")
        lines.append(line)
        print(line, flush=True)
        k, d, n = codebook.shape[0], codebook.shape[1], queries.shape[0]
        for method, best, median in (("u2", u_min, u_med), ("faiss_flat", f_min, f_med)):
            rows.append({"method": method, "case": name, "K": k, "N": n, "d": d, "dtype": "float32", "device": "cpu",
                         "min_s": best, "median_s": median, "queries_per_s": n / median,
                         "gflops": 2.0 * n * k * d / median / 1e9, "ratio_vs_faiss": f_med / median,
                         "ids_agree_faiss": agree if method == "u2" else 1.0, "threads": args.threads,
                         "metric": metric,
                         "date": stamp["date"]})
    text = _common.stamp_text(stamp)
    os.makedirs(args.out, exist_ok=True)
    stem = "nearest_data" if metric == "l2" else f"nearest_data_{metric}"
    title = "# exact search on real and adversarial data" + ("" if metric == "l2" else f", metric {metric}")
    _common.write_text(title + "\n\n" + "\n".join(lines) + f"\n\n{text}\n", os.path.join(args.out, f"{stem}.md"))
    _common.write_csv(rows, os.path.join(args.out, f"{stem}.csv"))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
