"""Benchmark exact nearest-codeword search: u2.nearest vs FAISS IndexFlatL2 vs plain torch.

For every codebook size K and query count N (d = 1152, SigLIP-like synthetic data, fp32, the same
thread count for every method) it times:

CPU
    u2            ``u2.nearest(x, codebook)``: backend "auto", the certified exact CPU path.
    faiss_flat    ``faiss.IndexFlatL2(d)``; ``index.search(x, 1)``.
    torch_matmul  ``x @ codebook.T`` (+ norms) then argmin: the naive baseline that materialises the
                  N x K matrix (in K-chunks of at most 4 GiB, marked "chunked K").
GPU (only where CUDA is available)
    triton_bf16 / triton_fp32              ``u2.nearest(..., backend="triton")`` on CUDA tensors.
    torch_cublas_bf16 / torch_cublas_fp32  matmul + argmin on the GPU, chunked like torch_matmul.
    faiss_gpu                              ``faiss.GpuIndexFlatL2`` when faiss has GPU support.

One-time preparation is timed as ``build_s`` and kept out of the search timings: FAISS's
``index.add``, and u2's first call, which builds the per-codebook statistics it caches (for the
Triton backend the first call also compiles the kernel). u2 has no separate preparation call, so
its ``build_s`` is the first call's time minus the median search time. Every (K, N) shape starts
from empty caches, so each row reports its own build.

Per method and shape: median / p10 / p90 seconds, queries/s, GFLOP/s (2 N K d per search),
ratios to FAISS and to plain torch measured in the same run (> 1: faster than the baseline),
agreement of the ids with FAISS and with u2 (which is exact; FAISS and torch may pick another id on
a near-tie), the largest distance difference from u2's, and the peak extra memory of the search
(process RSS sampled every 2 ms on the CPU, torch's allocator peak on the GPU).

Writes OUT/nearest.csv, OUT/nearest.md and OUT/nearest.png, and prints the table.

    python bench/bench_nearest.py                 # K = 50K, 500K; N = 729, 2916
    python bench/bench_nearest.py --quick         # K = 20K, N = 729: well under a minute
    python bench/bench_nearest.py --k 100000 --n 729 --methods u2 faiss_flat
"""
from __future__ import annotations

import argparse
import gc
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from tqdm import tqdm

import unicode2_fast as u2
from unicode2_fast.data import siglip_like
from unicode2_fast.bench import _common

CPU_METHODS = ("u2", "faiss_flat", "torch_matmul")
GPU_METHODS = ("triton_bf16", "triton_fp32", "torch_cublas_bf16", "torch_cublas_fp32", "faiss_gpu")
ALL_METHODS = CPU_METHODS + GPU_METHODS

#: the naive baselines materialise at most this many bytes of fp32 scores at once
NAIVE_SCORE_BYTES = 4 << 30

TABLE_COLUMNS = ("method", "K", "N", "median s", "q/s", "GFLOP/s", "× FAISS", "× torch",
                 "ids = FAISS", "ids = exact", "peak extra MiB", "build s")


@dataclass
class Method:
    """A benchmarked method: where it runs, in what dtype, and which baselines it is compared to."""

    name: str
    device: str          # "cpu" | "cuda"
    dtype: torch.dtype
    faiss_ref: str       # the FAISS method of the same device
    torch_ref: str       # the plain-torch method of the same device and dtype


METHODS: Dict[str, Method] = {m.name: m for m in (
    Method("u2", "cpu", torch.float32, "faiss_flat", "torch_matmul"),
    Method("faiss_flat", "cpu", torch.float32, "faiss_flat", "torch_matmul"),
    Method("torch_matmul", "cpu", torch.float32, "faiss_flat", "torch_matmul"),
    Method("triton_bf16", "cuda", torch.bfloat16, "faiss_gpu", "torch_cublas_bf16"),
    Method("triton_fp32", "cuda", torch.float32, "faiss_gpu", "torch_cublas_fp32"),
    Method("torch_cublas_bf16", "cuda", torch.bfloat16, "faiss_gpu", "torch_cublas_bf16"),
    Method("torch_cublas_fp32", "cuda", torch.float32, "faiss_gpu", "torch_cublas_fp32"),
    Method("faiss_gpu", "cuda", torch.float32, "faiss_gpu", "torch_cublas_fp32"),
)}


@dataclass
class Measurement:
    """What one method produced at one (K, N): timings, build, memory and its answer."""

    times: List[float]
    peak_extra_mib: Optional[float]
    ids: torch.Tensor     # (N,) int64, CPU
    dists: torch.Tensor   # (N,) float32, CPU
    build_s: Optional[float] = None
    notes: List[str] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return _common.quantiles(self.times)["median_s"]


@dataclass
class Config:
    repeats: int
    warmup: int


# ----------------------------------------------------------------------------------------------
# the methods


def matmul_argmin(x: torch.Tensor, codebook: torch.Tensor, max_score_bytes: int = NAIVE_SCORE_BYTES):
    """Plain torch nearest codeword: ``||c||^2 - 2 x c^T`` for a K-chunk at a time, then argmin.

    x: (N, d), codebook: (K, d), same dtype and device. Each chunk's (N, chunk) fp32 score matrix is
    materialised -- that is what this baseline measures; chunks are as large as fit in
    ``max_score_bytes``. Low-precision inputs are multiplied with fp32 output so the argmin is not
    decided by bf16 rounding of the scores.

    Returns:
        ids (N,) int64, squared L2 distances (N,) float32, and the chunk size in codewords.
    """
    n, k = x.shape[0], codebook.shape[0]
    chunk = max(1, min(k, max_score_bytes // (4 * max(1, n))))
    best = torch.full((n,), float("inf"), device=x.device)
    best_ids = torch.zeros(n, dtype=torch.int64, device=x.device)
    for start in range(0, k, chunk):
        codes = codebook[start:start + chunk]
        codes_sq = torch.linalg.vector_norm(codes, dim=1, dtype=torch.float32).square_()
        if x.dtype == torch.float32:
            scores = torch.addmm(codes_sq.unsqueeze(0), x, codes.t(), alpha=-2.0)
        else:
            scores = torch.mm(x, codes.t(), out_dtype=torch.float32).mul_(-2.0).add_(codes_sq)
        val, idx = scores.min(dim=1)
        del scores
        better = val < best  # strict: an equal later chunk keeps the lower index
        best = torch.where(better, val, best)
        best_ids = torch.where(better, idx + start, best_ids)
    x_sq = torch.linalg.vector_norm(x, dim=1, dtype=torch.float32).square_()
    return best_ids, (best + x_sq).clamp_min_(0.0), chunk


def _measure(fn: Callable[[], Any], cfg: Config, cuda: bool):
    """Warmup + timed calls of ``fn`` with the peak extra memory over all of them."""
    memory = _common.CudaPeak() if cuda else _common.RssPeak()
    with memory:
        times, result = _common.time_calls(fn, cfg.repeats, cfg.warmup, torch.cuda.synchronize if cuda else None)
    return times, memory.extra_mib, result


def _first_call_s(fn: Callable[[], Any], cuda: bool) -> float:
    times, _ = _common.time_calls(fn, 1, 0, torch.cuda.synchronize if cuda else None)
    return times[0]


def run_u2(x: torch.Tensor, codebook: torch.Tensor, cfg: Config, backend: str = "auto") -> Measurement:
    # A new tensor object over the same storage: u2 caches its per-codebook statistics by tensor
    # object, so this shape starts from an empty cache and its first call pays the build.
    codebook = codebook.view_as(codebook)
    cuda = x.is_cuda
    first_s = _first_call_s(lambda: u2.nearest(x, codebook, backend=backend), cuda)
    times, peak, (ids, dists) = _measure(lambda: u2.nearest(x, codebook, backend=backend), cfg, cuda)
    build_s = max(0.0, first_s - _common.quantiles(times)["median_s"])
    notes = ["build_s = first call - median (includes Triton compile)" if cuda else "build_s = first call - median"]
    return Measurement(times, peak, ids.cpu(), dists.float().cpu(), build_s, notes)


def run_faiss_flat(x: torch.Tensor, codebook: torch.Tensor, cfg: Config) -> Measurement:
    import faiss

    xs, cs = x.numpy(), codebook.numpy()
    index = faiss.IndexFlatL2(cs.shape[1])
    start = time.perf_counter()
    index.add(cs)
    build_s = time.perf_counter() - start
    times, peak, (dists, ids) = _measure(lambda: index.search(xs, 1), cfg, cuda=False)
    del index
    return Measurement(times, peak, torch.from_numpy(ids[:, 0]).long(), torch.from_numpy(dists[:, 0]).float(), build_s)


def run_faiss_gpu(x: torch.Tensor, codebook: torch.Tensor, cfg: Config) -> Measurement:
    import faiss
    import faiss.contrib.torch_utils  # noqa: F401  (lets GPU indexes take CUDA tensors directly)

    resources = faiss.StandardGpuResources()
    index = faiss.GpuIndexFlatL2(resources, codebook.shape[1])
    build_s = _first_call_s(lambda: index.add(codebook), cuda=True)
    times, _, (dists, ids) = _measure(lambda: index.search(x, 1), cfg, cuda=True)
    del index, resources
    return Measurement(times, None, ids[:, 0].long().cpu(), dists[:, 0].float().cpu(), build_s,
                       ["FAISS GPU memory is outside torch's allocator: not measured"])


def run_matmul(x: torch.Tensor, codebook: torch.Tensor, cfg: Config) -> Measurement:
    times, peak, (ids, dists, chunk) = _measure(lambda: matmul_argmin(x, codebook), cfg, x.is_cuda)
    notes = [f"chunked K ({chunk} codewords per chunk)"] if chunk < codebook.shape[0] else []
    return Measurement(times, peak, ids.cpu(), dists.cpu(), None, notes)


RUNNERS: Dict[str, Callable[[torch.Tensor, torch.Tensor, Config], Measurement]] = {
    "u2": run_u2,
    "faiss_flat": run_faiss_flat,
    "torch_matmul": run_matmul,
    "triton_bf16": lambda x, c, cfg: run_u2(x, c, cfg, backend="triton"),
    "triton_fp32": lambda x, c, cfg: run_u2(x, c, cfg, backend="triton"),
    "torch_cublas_bf16": run_matmul,
    "torch_cublas_fp32": run_matmul,
    "faiss_gpu": run_faiss_gpu,
}


def _faiss_has_gpu() -> bool:
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


# ----------------------------------------------------------------------------------------------
# results


def _agree(ids: torch.Tensor, ref: Optional[Measurement]) -> Optional[float]:
    if ref is None or ids.numel() == 0:
        return None
    return float((ids == ref.ids).double().mean())


def shape_rows(results: Dict[str, Measurement], k: int, n: int, d: int, stamp: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One CSV row per method measured at this (K, N)."""
    rows = []
    exact = results.get("u2")
    # FAISS CPU and GPU both compute in fp32: either serves as the FAISS answer for id agreement
    faiss_ids = results.get("faiss_flat") or results.get("faiss_gpu")
    for name, m in results.items():
        method = METHODS[name]
        q = _common.quantiles(m.times)
        faiss_ref, torch_ref = results.get(method.faiss_ref), results.get(method.torch_ref)
        gflops = 2.0 * n * k * d / q["median_s"] / 1e9
        notes = list(m.notes)
        if method.dtype != torch.float32:
            notes.append(f"{str(method.dtype).replace('torch.', '')} inputs are rounded: ids/dists compared with fp32 u2")
        rows.append({
            "method": name,
            "K": k,
            "N": n,
            "d": d,
            "dtype": str(method.dtype).replace("torch.", ""),
            "build_s": m.build_s,
            **q,
            "repeats": len(m.times),
            "queries_per_s": n / q["median_s"],
            "gflops": gflops,
            "tflops": gflops / 1e3,
            # share of the data-sheet peak, GPU rows only (the CPU path's int8 rate has no such figure)
            "pct_of_peak": (100.0 * gflops / 1e3 / peak
                            if name in GPU_METHODS and (peak := _common.gpu_peak_tflops(stamp["gpu"], str(method.dtype).replace("torch.", "")))
                            else None),
            "ratio_vs_faiss": faiss_ref.median_s / q["median_s"] if faiss_ref else None,
            "ratio_vs_torch": torch_ref.median_s / q["median_s"] if torch_ref else None,
            "ids_agree_faiss": _agree(m.ids, faiss_ids),
            "ids_agree_exact": _agree(m.ids, exact),
            "max_dist_err": float((m.dists.double() - exact.dists.double()).abs().max()) if exact and n else None,
            "peak_extra_mib": m.peak_extra_mib,
            "naive_nk_bytes": n * k * 4,
            "device": stamp["gpu"] if method.device == "cuda" else stamp["cpu"],
            "threads": stamp["threads"],
            "torch": stamp["torch"],
            "faiss": stamp["faiss"],
            "triton": stamp["triton"],
            "numpy": stamp["numpy"],
            "date": stamp["date"],
            "note": "; ".join(notes),
        })
    return rows




def markdown_table(rows: Sequence[Dict[str, Any]]) -> str:
    """The results as a Markdown table; GPU rows give TFLOP/s instead of GFLOP/s."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for r in rows:
        on_gpu = METHODS[r["method"]].device == "cuda"
        lines.append("| " + " | ".join([
            r["method"], f"{r['K']:,}", f"{r['N']:,}",
            f"{r['median_s']:.4g}", f"{r['queries_per_s']:,.0f}",
            (f"{r['tflops']:.1f} T" + (f" ({r['pct_of_peak']:.0f}% of peak)" if r["pct_of_peak"] is not None else "")) if on_gpu else f"{r['gflops']:.1f}",
            _common.fmt(r["ratio_vs_faiss"], ".2f", "×"), _common.fmt(r["ratio_vs_torch"], ".2f", "×"),
            _common.fmt(r["ids_agree_faiss"], ".4f"), _common.fmt(r["ids_agree_exact"], ".4f"),
            _common.fmt(r["peak_extra_mib"], ".1f"), _common.fmt(r["build_s"], ".3g"),
        ]) + " |")
    return "\n".join(lines)






def plot(rows: Sequence[Dict[str, Any]], stamp: Dict[str, Any], path: str) -> None:
    """Grouped bars of queries/s (log scale) per method, one group per (K, N)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys((r["K"], r["N"]) for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    qps = {(r["method"], r["K"], r["N"]): r["queries_per_s"] for r in rows}
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(shapes) * max(1, len(methods)) / 3), 4.8))
    for i, name in enumerate(methods):
        xs = [j + (i - (len(methods) - 1) / 2) * width for j, shape in enumerate(shapes) if (name, *shape) in qps]
        ys = [qps[(name, *shape)] for shape in shapes if (name, *shape) in qps]
        bars = ax.bar(xs, ys, width, label=name, hatch="//" if METHODS[name].device == "cuda" else None)
        ax.bar_label(bars, labels=[f"{y:,.0f}" for y in ys], fontsize=7, rotation=90, padding=2)
    ax.set_xticks(range(len(shapes)))
    ax.set_xticklabels([f"K={_common.short_count(k)}\nN={n}" for k, n in shapes])
    ax.set_yscale("log")
    # bars start a decade below the slowest so their heights compare, with headroom for the labels
    ax.set_ylim(10 ** math.floor(math.log10(min(qps.values())) - 1), 10 ** (math.log10(max(qps.values())) + 0.6))
    ax.set_xlabel("codebook size K, queries N")
    ax.set_ylabel("queries / s (log scale, higher is better)")
    device = stamp["cpu"] + (f" + {stamp['gpu']}" if stamp["gpu"] else "")
    ax.set_title(
        f"exact nearest codeword, d={rows[0]['d']}, {stamp['threads']} CPU threads\n{device}\n"
        f"torch {stamp['torch']}, faiss {stamp['faiss']}, triton {stamp['triton']}, {stamp['date']}",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    _common.save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# driver


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, nargs="+", default=[50_000, 500_000], help="codebook sizes K")
    parser.add_argument("--n", type=int, nargs="+", default=[729, 2916], help="query counts N (729 = one image)")
    parser.add_argument("--d", type=int, default=1152, help="feature dimension")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per method and shape")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before the timed ones")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="CPU threads for torch and FAISS alike (default: torch's current setting)")
    parser.add_argument("--out", default="bench_out", help="output directory")
    parser.add_argument("--methods", nargs="+", choices=ALL_METHODS, default=list(ALL_METHODS),
                        help="subset of methods (GPU ones run only where CUDA is available)")
    parser.add_argument("--seed", type=int, default=0, help="synthetic data seed")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="K=20000, N=729, repeats 2: well under a minute")
    size.add_argument("--tiny", action="store_true", help="K=2000, N=37, d=64, repeats 1: smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.k, args.n, args.repeats = [20_000], [729], 2
    if args.tiny:
        args.k, args.n, args.d, args.repeats = [2000], [37], 64, 1
    if min(args.k) < 1 or min(args.n) < 1 or args.d < 1 or args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("need K, N, d, repeats, threads >= 1 and warmup >= 0")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    import faiss

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    cfg = Config(args.repeats, args.warmup)

    cpu_methods = [m for m in args.methods if METHODS[m].device == "cpu"]
    gpu_methods: List[str] = []
    if not torch.cuda.is_available():
        print("GPU part skipped: no CUDA device")
    else:
        gpu_methods = [m for m in args.methods if METHODS[m].device == "cuda"]
        if "faiss_gpu" in gpu_methods and not _faiss_has_gpu():
            print("faiss_gpu skipped: this faiss build has no GPU support")
            gpu_methods.remove("faiss_gpu")
    stamp = _common.machine_stamp()

    rows: List[Dict[str, Any]] = []
    methods = cpu_methods + gpu_methods
    progress = tqdm(total=len(args.k) * len(args.n) * len(methods), desc="nearest", file=sys.stderr)
    for k in args.k:
        # one data set per K: the most queries needed, sliced per N
        data = siglip_like(k, max(args.n), args.d, seed=args.seed)
        codebook, queries = data.codebook, data.queries
        del data
        on_gpu: Dict[torch.dtype, torch.Tensor] = {}  # codebook copies per dtype, made once per K
        for n in args.n:
            results: Dict[str, Measurement] = {}
            for name in methods:
                progress.set_postfix_str(f"K={_common.short_count(k)} N={n} {name}")
                method = METHODS[name]
                if method.device == "cuda":
                    if method.dtype not in on_gpu:
                        on_gpu[method.dtype] = codebook.to("cuda", method.dtype)
                    x, cb = queries[:n].to("cuda", method.dtype), on_gpu[method.dtype]
                else:
                    x, cb = queries[:n], codebook
                results[name] = RUNNERS[name](x, cb, cfg)
                del x, cb
                gc.collect()
                progress.update()
            rows.extend(shape_rows(results, k, n, args.d, stamp))
            del results
        # free this K's tensors before the next K's are made (500K x 1152 fp32 is 2.3 GB)
        del codebook, queries, on_gpu
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    progress.close()

    table = markdown_table(rows)
    _common.write_report(
        args.out, "nearest", rows, table, _common.stamp_text(stamp),
        f"exact nearest codeword (d = {args.d}, fp32 unless noted)",
        "× FAISS / × torch: the baseline's median over this method's (> 1: faster). ids = exact: "
        "agreement with u2, which is exact. build s: one-time preparation, excluded from the timings.",
        lambda path: plot(rows, stamp, path),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
