"""Benchmark codebook construction: u2.build_codebook (two-stage k-means) vs faiss.Kmeans (one stage).

Comparison mode (default). On SigLIP-like synthetic features (d = 1152; a training set and a
held-out set drawn from the same two-level cluster structure) and on overlapping 8x8x3 patches of
the photographs scikit-image ships (d = 192; ``--data`` picks either) both methods build k codewords from
the same training rows, with the same niter, seed, max_points_per_centroid (FAISS subsamples to
max_points_per_centroid * k rows, u2 to that many per centroid in each stage) and thread count:

    u2        ``u2.build_codebook(train, k, niter=..., seed=..., max_points_per_centroid=...)``
    faiss     ``faiss.Kmeans(d, k, niter=..., seed=..., max_points_per_centroid=...).train(train)``
    u2_cuda   u2 with the training rows on the GPU (assignments by the Triton kernel), where CUDA is
    faiss_gpu ``faiss.Kmeans(..., gpu=True)``, where faiss has GPU support

Per method: build seconds, quantisation MSE on the held-out rows (each assigned to its nearest
codeword by ``u2.nearest``, exact), the ratio of that MSE to FAISS's, utilisation (fraction of the
codewords that the held-out assignment uses), the multiply-adds the method's Lloyd iterations
perform (cost model below) and the peak extra resident memory (sampled every 2 ms).

Scaled mode (``--scaled``). Streams M features (default 2M x 1152 fp32 = 9.2 GB), generated chunk by
chunk from a fixed set of SigLIP-like cluster centres and never held in memory at once, into
``u2.build_codebook`` with k = 50,000, then reports the build time, the time spent generating
the stream (measured on one pass, times the number of passes the build made), the peak RSS, and
an extrapolation to the paper's build (k = 500,000, n_coarse = 1,000, M = 150M, d = 1152):

    MAC(M, k, n_coarse) = niter * min(M, p * n_coarse) * n_coarse * d     coarse Lloyd
                        + M * n_coarse * d                                 assignment pass
                        + niter * min(M, p * k) * (k / n_coarse) * d       fine Lloyd, all cells
    (p = max_points_per_centroid; cells taken as equal-sized)
    t(paper) = (build s - stream generation s) * MAC(paper) / MAC(measured)

i.e. the measured rate of multiply-adds, on the same machine, carried over to the paper's
multiply-add count (reading the paper's 690 GB of features from disk is extra). Peak memory is
extrapolated with the build's memory model: coarse sample (p * n_coarse * d * 4 B) + coarse cell
ids (4 B per feature) + the fine-sample plan (~50 B per feature, transient) + one fine batch
(fine_batch_bytes) + the codebook (k * d * 4 B).

Writes OUT/kmeans.csv and OUT/kmeans.md (OUT/kmeans_scaled.csv / .md with --scaled); prints the table.

    python bench/bench_kmeans.py                   # k = 10,000, 256K training rows, d = 1152
    python bench/bench_kmeans.py --quick           # k = 2,000, 64K training rows, niter 10
    python bench/bench_kmeans.py --scaled          # stream 2M x 1152 -> k = 50,000
    python bench/bench_kmeans.py --scaled --m 5000000 --k 100000
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch

import unicode2_fast as u2
from unicode2_fast import kmeans
from unicode2_fast.data import photo_patches, siglip_like
from unicode2_fast.bench import _common

METHODS = ("u2", "faiss", "u2_cuda", "faiss_gpu")
GIB = 1024 ** 3

#: the paper's build, the target of the --scaled extrapolation
PAPER = {"m": 150_000_000, "k": 500_000, "n_coarse": 1000, "d": 1152}

TABLE_COLUMNS = ("data", "method", "k", "n_train", "d", "build s", "FAISS / method speed", "held-out MSE",
                 "MSE / FAISS", "utilisation", "GMAC", "peak extra MiB")
#: --data choices: SigLIP-like synthetic features, 8x8x3 patches of the photographs scikit-image ships
DATA = ("synthetic", "photos")
SCALED_COLUMNS = ("M", "k", "n_coarse", "d", "build s", "stream s", "net s", "passes", "peak RSS GiB",
                  "model GiB", "paper: est. h", "paper: est. GiB")


# ----------------------------------------------------------------------------------------------
# cost and memory models


def default_n_coarse(k: int) -> int:
    return min(k, max(1, round(k ** 0.5)))


def two_stage_macs(m: int, k: int, n_coarse: int, d: int, niter: int, max_ppc: int) -> float:
    """Multiply-adds of build_codebook's distance computations (see the module docstring)."""
    coarse = niter * min(m, max_ppc * n_coarse) * n_coarse * d
    assign = m * n_coarse * d
    fine = niter * min(m, max_ppc * k) * (k / n_coarse) * d
    return float(coarse + assign + fine)


def one_stage_macs(m: int, k: int, d: int, niter: int, max_ppc: int) -> float:
    """Multiply-adds of single-stage Lloyd k-means (FAISS) on min(m, max_ppc * k) rows."""
    return float(niter * min(m, max_ppc * k) * k * d)


def build_memory_bytes(m: int, k: int, n_coarse: int, d: int, max_ppc: int, fine_batch_bytes: int) -> float:
    """build_codebook's peak memory model, features excluded (see the module docstring)."""
    coarse_sample = min(m, max_ppc * n_coarse) * d * 4
    fine_batch = min(fine_batch_bytes, min(m, max_ppc * k) * d * 4)
    return float(coarse_sample + 4 * m + 50 * m + fine_batch + k * d * 4)


# ----------------------------------------------------------------------------------------------
# comparison mode


def run_u2(train: torch.Tensor, args: argparse.Namespace):
    return u2.build_codebook(train, args.k, niter=args.niter, seed=args.seed,
                             max_points_per_centroid=args.max_points_per_centroid, progress=False,
                             allocation=args.allocation).vectors


def run_faiss(train: torch.Tensor, args: argparse.Namespace, gpu: bool = False):
    import faiss

    km = faiss.Kmeans(train.shape[1], args.k, niter=args.niter, seed=args.seed,
                      max_points_per_centroid=args.max_points_per_centroid, gpu=gpu, verbose=False)
    km.train(train.numpy())
    return torch.from_numpy(km.centroids)


def _faiss_has_gpu() -> bool:
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _features(kind: str, args: argparse.Namespace) -> torch.Tensor:
    """(n_train + n_test, d) rows of one data source, in a seeded random order."""
    if kind == "photos":
        # overlapping 8x8x3 patches (d = 192) of real photographs: flat regions, textures, edges
        data = photo_patches(args.n_train + args.n_test, 8, seed=args.seed)
    else:
        # twice as many true fine clusters as codewords: the codebook cannot simply land on them
        data = siglip_like(2 * args.k, args.n_train + args.n_test, args.d, seed=args.seed).queries
    order = torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(args.seed))
    return data[order]


def compare_rows(args: argparse.Namespace, stamp: Dict[str, Any], kind: str = "synthetic") -> List[Dict[str, Any]]:
    n_coarse = default_n_coarse(args.k)
    data = _features(kind, args)
    train, held_out = data[:args.n_train].contiguous(), data[args.n_train:].contiguous()
    d = data.shape[1]
    del data
    runners: Dict[str, Callable[[], torch.Tensor]] = {
        "u2": lambda: run_u2(train, args),
        "faiss": lambda: run_faiss(train, args),
        "u2_cuda": lambda: run_u2(train.cuda(), args).cpu(),
        "faiss_gpu": lambda: run_faiss(train, args, gpu=True),
    }
    macs = {
        "u2": two_stage_macs(args.n_train, args.k, n_coarse, d, args.niter, args.max_points_per_centroid),
        "faiss": one_stage_macs(args.n_train, args.k, d, args.niter, args.max_points_per_centroid),
    }
    results: Dict[str, Dict[str, Any]] = {}
    for name in args.methods:
        with _common.RssPeak() as memory:
            start = time.perf_counter()
            centroids = runners[name]()
            build_s = time.perf_counter() - start
        ids, dists = u2.nearest(held_out, centroids.float().contiguous())
        results[name] = {
            "build_s": build_s,
            "heldout_mse": float(dists.double().mean()),
            "utilisation": ids.unique().numel() / args.k,
            "peak_extra_mib": None if name.endswith(("cuda", "gpu")) else memory.extra_mib,
            "gmac": macs["u2" if name.startswith("u2") else "faiss"] / 1e9,
        }
    faiss_mse = (results.get("faiss") or results.get("faiss_gpu") or {}).get("heldout_mse")
    faiss_s = (results.get("faiss") or {}).get("build_s")
    rows = []
    for name, r in results.items():
        on_gpu = name.endswith(("cuda", "gpu"))
        rows.append({
            "data": kind,
            "method": name,
            "k": args.k,
            "n_coarse": n_coarse if name.startswith("u2") else None,
            "n_train": args.n_train,
            "n_test": args.n_test,
            "d": d,
            "niter": args.niter,
            "max_points_per_centroid": args.max_points_per_centroid,
            **r,
            "mse_ratio_vs_faiss": r["heldout_mse"] / faiss_mse if faiss_mse else None,
            "speedup_vs_faiss": faiss_s / r["build_s"] if faiss_s and not on_gpu else None,
            "device": stamp["gpu"] if on_gpu else stamp["cpu"],
            "threads": stamp["threads"],
            "torch": stamp["torch"],
            "faiss": stamp["faiss"],
            "numpy": stamp["numpy"],
            "date": stamp["date"],
            "note": "GPU memory not sampled" if on_gpu else "",
        })
    return rows




def compare_table(rows: Sequence[Dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["data"], r["method"], f"{r['k']:,}", f"{r['n_train']:,}", str(r["d"]), f"{r['build_s']:.3g}",
            _common.fmt(r["speedup_vs_faiss"], ".2f", "x"),
            f"{r['heldout_mse']:.5g}", _common.fmt(r["mse_ratio_vs_faiss"], ".4f"), f"{r['utilisation']:.4f}",
            f"{r['gmac']:.4g}", _common.fmt(r["peak_extra_mib"], ".1f"),
        ]) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# scaled mode


class FeatureStream:
    """M SigLIP-like features generated chunk by chunk: a callable returning a fresh iterator.

    Only the cluster centres (``n_centres`` x d) live in memory; chunk i is drawn with its own seeded
    generator, so every pass yields the same rows. ``passes`` counts the iterators handed out.
    """

    def __init__(self, m: int, d: int, n_centres: int, chunk_rows: int, seed: int):
        self.m, self.d, self.chunk_rows, self.seed = m, d, chunk_rows, seed
        self.centres = siglip_like(n_centres, 0, d, seed=seed).codebook
        self.noise = 0.25  # siglip_like's default spread of a feature around its fine centre
        self.passes = 0

    def __call__(self) -> Iterator[torch.Tensor]:
        self.passes += 1
        return self._chunks()

    def _chunks(self) -> Iterator[torch.Tensor]:
        for index, start in enumerate(range(0, self.m, self.chunk_rows)):
            rows = min(self.chunk_rows, self.m - start)
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index + 1)
            picks = torch.randint(0, self.centres.shape[0], (rows,), generator=generator)
            yield self.centres[picks] + self.noise * torch.randn(rows, self.d, generator=generator)


def scaled_rows(args: argparse.Namespace, stamp: Dict[str, Any]) -> List[Dict[str, Any]]:
    n_coarse = default_n_coarse(args.k)
    stream = FeatureStream(args.m, args.d, 2 * args.k, args.chunk_rows, args.seed)
    start = time.perf_counter()
    for _ in stream():
        pass
    stream_pass_s = time.perf_counter() - start
    stream.passes = 0
    with _common.RssPeak() as memory:
        start = time.perf_counter()
        cb = u2.build_codebook(stream, args.k, niter=args.niter, seed=args.seed,
                               max_points_per_centroid=args.max_points_per_centroid,
                               fine_batch_bytes=args.fine_batch_bytes, progress=not args.no_progress,
                               allocation=args.allocation)
        build_s = time.perf_counter() - start
    net_s = max(1e-9, build_s - stream.passes * stream_pass_s)
    measured_macs = two_stage_macs(args.m, args.k, n_coarse, args.d, args.niter, args.max_points_per_centroid)
    paper_macs = two_stage_macs(PAPER["m"], PAPER["k"], PAPER["n_coarse"], PAPER["d"], args.niter,
                                args.max_points_per_centroid)
    model = build_memory_bytes(args.m, args.k, n_coarse, args.d, args.max_points_per_centroid, args.fine_batch_bytes)
    paper_model = build_memory_bytes(PAPER["m"], PAPER["k"], PAPER["n_coarse"], PAPER["d"],
                                     args.max_points_per_centroid, args.fine_batch_bytes)
    return [{
        "m": args.m,
        "k": cb.k,
        "n_coarse": cb.meta["n_coarse"],
        "d": args.d,
        "niter": args.niter,
        "max_points_per_centroid": args.max_points_per_centroid,
        "fine_batch_bytes": args.fine_batch_bytes,
        "build_s": build_s,
        "stream_pass_s": stream_pass_s,
        "passes": stream.passes,
        "net_build_s": net_s,
        "peak_rss_gib": memory.peak / GIB,
        "peak_extra_gib": memory.extra_mib / 1024,
        "model_gib": model / GIB,
        "gmac": measured_macs / 1e9,
        "gmac_per_s": measured_macs / net_s / 1e9,
        "paper_gmac": paper_macs / 1e9,
        "paper_est_s": net_s * paper_macs / measured_macs,
        "paper_model_gib": paper_model / GIB,
        "device": stamp["device"],
        "threads": stamp["threads"],
        "torch": stamp["torch"],
        "faiss": stamp["faiss"],
        "date": stamp["date"],
    }]


def scaled_table(rows: Sequence[Dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(SCALED_COLUMNS) + " |", "|" + "---|" * len(SCALED_COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join([
            f"{r['m']:,}", f"{r['k']:,}", f"{r['n_coarse']:,}", str(r["d"]), f"{r['build_s']:.1f}",
            f"{r['passes'] * r['stream_pass_s']:.1f}", f"{r['net_build_s']:.1f}", str(r["passes"]),
            f"{r['peak_rss_gib']:.2f}", f"{r['model_gib']:.2f}", f"{r['paper_est_s'] / 3600:.3g}",
            f"{r['paper_model_gib']:.1f}",
        ]) + " |")
    return "\n".join(lines)


def extrapolation_text(row: Dict[str, Any], niter: int, max_ppc: int) -> str:
    return (
        f"Extrapolation to the paper's build (M = {PAPER['m']:,}, k = {PAPER['k']:,}, "
        f"n_coarse = {PAPER['n_coarse']:,}, d = {PAPER['d']}, niter = {niter}, p = {max_ppc}):\n"
        "  MAC = niter*min(M, p*n_coarse)*n_coarse*d + M*n_coarse*d + niter*min(M, p*k)*(k/n_coarse)*d\n"
        f"  measured: {row['gmac']:.4g} GMAC in {row['net_build_s']:.3g} s net of stream generation "
        f"({row['gmac_per_s']:.4g} GMAC/s)\n"
        f"  paper:    {row['paper_gmac']:.4g} GMAC -> {row['net_build_s']:.3g} s x "
        f"{row['paper_gmac'] / row['gmac']:,.1f} = {row['paper_est_s'] / 3600:.3g} h on this machine "
        "(plus reading the features: one pass for the assignment, one per fine batch)\n"
        "  memory model (features excluded) = p*n_coarse*d*4 + 4*M + ~50*M (transient) + fine batch + k*d*4 B: "
        f"{row['model_gib']:.2f} GiB here (measured peak RSS {row['peak_rss_gib']:.2f} GiB), "
        f"{row['paper_model_gib']:.1f} GiB for the paper's build"
    )


# ----------------------------------------------------------------------------------------------
# driver


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=None, help="codewords (default 10000; 50000 with --scaled)")
    parser.add_argument("--n-train", type=int, default=256_000, help="training rows (comparison mode)")
    parser.add_argument("--n-test", type=int, default=20_000, help="held-out rows (comparison mode)")
    parser.add_argument("--m", type=int, default=2_000_000, help="streamed rows (--scaled)")
    parser.add_argument("--d", type=int, default=1152, help="feature dimension")
    parser.add_argument("--niter", type=int, default=20, help="Lloyd iterations (both methods)")
    parser.add_argument("--max-points-per-centroid", type=int, default=256, help="training rows per centroid at most")
    parser.add_argument("--chunk-rows", type=int, default=16384, help="rows per streamed chunk (--scaled)")
    parser.add_argument("--fine-batch-bytes", type=int, default=kmeans.FINE_BATCH_BYTES,
                        help="build_codebook's fine-sample batch (--scaled)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="CPU threads for torch and FAISS alike (default: torch's current setting)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="comparison-mode methods (GPU ones run only where CUDA / faiss GPU is available)")
    parser.add_argument("--seed", type=int, default=0, help="data and k-means seed")
    parser.add_argument("--data", nargs="+", choices=DATA, default=list(DATA),
                        help="comparison data: synthetic SigLIP-like features and/or photo patches (scikit-image)")
    parser.add_argument("--allocation", choices=kmeans.ALLOCATIONS, default="auto",
                        help="u2.build_codebook's allocation of codewords to cells")
    parser.add_argument("--out", default="bench_out", help="output directory")
    parser.add_argument("--scaled", action="store_true", help="stream M features into a k = 50,000 build")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars in --scaled")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="k=2000, 64K training rows, niter 10 (--scaled: M=200K, k=5000)")
    size.add_argument("--tiny", action="store_true",
                      help="k=64, 4000 training rows, d=64, niter 5 (--scaled: M=20K, k=500, d=64): smoke test")
    args = parser.parse_args(argv)
    if args.k is None:
        args.k = 50_000 if args.scaled else 10_000
    if args.quick:
        if args.scaled:
            args.m, args.k = 200_000, 5000
        else:
            args.k, args.n_train, args.n_test, args.niter = 2000, 64_000, 8000, 10
    if args.tiny:
        args.d, args.niter = 64, 5
        if args.scaled:
            args.m, args.k, args.chunk_rows = 20_000, 500, 3000
        else:
            args.k, args.n_train, args.n_test = 64, 4000, 500
    if min(args.k, args.n_train, args.n_test, args.m, args.d, args.niter, args.max_points_per_centroid,
           args.chunk_rows, args.fine_batch_bytes, args.threads) < 1:
        parser.error("every size, count and thread number must be >= 1")
    if args.k > (args.m if args.scaled else args.n_train):
        parser.error("k must not exceed the number of training rows")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    import faiss

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    stamp = _common.machine_stamp()
    stamp_line = (f"CPU: {stamp['cpu']} ({stamp['cores']} cores, {stamp['threads']} threads)"
                  + (f" | GPU: {stamp['gpu']}" if stamp["gpu"] else "")
                  + f" | torch {stamp['torch']}, faiss {stamp['faiss']}, numpy {stamp['numpy']}, "
                    f"python {stamp['python']} | {stamp['date']}")
    os.makedirs(args.out, exist_ok=True)

    if args.scaled:
        rows = scaled_rows(args, stamp)
        table = scaled_table(rows)
        notes = extrapolation_text(rows[0], args.niter, args.max_points_per_centroid)
        name = "kmeans_scaled"
        title = f"streamed build_codebook (d = {args.d}, {args.m:,} features generated chunk by chunk)"
    else:
        if not torch.cuda.is_available():
            args.methods = [m for m in args.methods if m not in ("u2_cuda", "faiss_gpu")]
        elif "faiss_gpu" in args.methods and not _faiss_has_gpu():
            print("faiss_gpu skipped: this faiss build has no GPU support")
            args.methods.remove("faiss_gpu")
        rows = [row for kind in args.data for row in compare_rows(args, stamp, kind)]
        table = compare_table(rows)
        notes = (f"Same training rows ({args.n_train:,}), niter = {args.niter}, seed = {args.seed}, "
                 f"max_points_per_centroid = {args.max_points_per_centroid} and {args.threads} threads for every "
                 "method. Held-out MSE: mean squared distance of the held-out rows to their nearest codeword "
                 "(u2.nearest, exact). Utilisation: fraction of codewords the held-out rows use. GMAC: the "
                 "Lloyd iterations' multiply-adds by the cost model in bench_kmeans.py's docstring.")
        name = "kmeans"
        title = ("codebook build: " + ", ".join({"synthetic": f"SigLIP-like synthetic features (d = {args.d})",
                                                  "photos": "8x8x3 patches of real photographs (d = 192)"}[kind]
                                                 for kind in args.data))
    print(table)
    print()
    print(notes)
    print(stamp_line)
    _common.write_csv(rows, os.path.join(args.out, f"{name}.csv"))
    _common.write_text(f"# {title}\n\n{table}\n\n{notes}\n\n{stamp_line}\n", os.path.join(args.out, f"{name}.md"))
    print(f"wrote {os.path.join(args.out, name + '.csv')}, {os.path.join(args.out, name + '.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
