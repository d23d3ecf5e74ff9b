"""Benchmark large-vocabulary cross-entropy (L_GEN): u2.large_vocab_cross_entropy vs plain torch.

Every method runs forward + backward (gradients of hidden and of the classifier weight) of the
mean cross-entropy of ``hidden @ weight.T`` over K classes, on the same synthetic data:

CPU
    u2      ``u2.large_vocab_cross_entropy(hidden, weight, targets)``: backend "auto", the chunked
            torch path (never holds the N x K logits).
    torch   ``F.cross_entropy(hidden @ weight.T, targets)``: the naive baseline that materialises
            the N x K fp32 logits (and autograd keeps them, plus their gradient, for backward).
GPU (only where CUDA is available; bf16 inputs, at --gpu-n rows and --gpu-hidden features)
    u2_triton_bf16  ``backend="triton"``: fused forward kernel, chunked torch backward.
    u2_cce_bf16     ``backend="cce"``: cut_cross_entropy, when installed.
    torch_bf16      the naive baseline in bf16.

Per method and shape: median / p10 / p90 seconds of forward + backward, rows/s, GFLOP/s counted
as the 6 N K h FLOPs of the naive forward + backward (u2 recomputes the logits in backward, 8 N K h,
but is credited with 6), the ratio to the torch baseline of the same device (> 1: faster), the
loss and the hidden gradient's difference from the baseline's, the peak extra memory over the timed
calls (process RSS sampled every 2 ms on the CPU, torch's allocator peak on the GPU) and the bytes
of the N x K fp32 logits the naive version materialises. Both methods allocate the dense K x h
weight gradient (2 GB at K = 500K, h = 1024, fp32): it is in both peaks.

Writes OUT/cross_entropy.csv, OUT/cross_entropy.md and OUT/cross_entropy.png, and prints the table.

    python bench/bench_cross_entropy.py           # CPU: N = 512, K = 500,000, h = 1024
    python bench/bench_cross_entropy.py --quick   # K = 50,000
    python bench/bench_cross_entropy.py --tiny    # smoke test: N = 37, K = 2,000, h = 64
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

import unicode2_fast as u2
from unicode2_fast import cross_entropy
from unicode2_fast.bench import _common

CPU_METHODS = ("u2", "torch")
GPU_METHODS = ("u2_triton_bf16", "u2_cce_bf16", "torch_bf16")
ALL_METHODS = CPU_METHODS + GPU_METHODS

TABLE_COLUMNS = ("method", "K", "N", "h", "median s", "rows/s", "GFLOP/s", "× torch", "loss diff",
                 "grad rel err", "peak extra MiB", "naive N×K MiB")


@dataclass
class Method:
    """A benchmarked method: where it runs, in what dtype, its backend, and its baseline."""

    name: str
    device: str            # "cpu" | "cuda"
    dtype: torch.dtype
    backend: Optional[str]  # u2 backend, None for the naive torch baseline
    torch_ref: str          # the naive method of the same device and dtype


METHODS: Dict[str, Method] = {m.name: m for m in (
    Method("u2", "cpu", torch.float32, "auto", "torch"),
    Method("torch", "cpu", torch.float32, None, "torch"),
    Method("u2_triton_bf16", "cuda", torch.bfloat16, "triton", "torch_bf16"),
    Method("u2_cce_bf16", "cuda", torch.bfloat16, "cce", "torch_bf16"),
    Method("torch_bf16", "cuda", torch.bfloat16, None, "torch_bf16"),
)}


@dataclass
class Measurement:
    """What one method produced at one shape: timings, memory and its answer."""

    times: List[float]
    peak_extra_mib: float
    loss: float
    grad_hidden: torch.Tensor  # (N, h) fp32, CPU
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


def make_data(n: int, k: int, h: int, seed: int = 0):
    """hidden (N, h) ~ N(0, 1), weight (K, h) ~ N(0, 1/h) (logits of unit scale), targets (N,)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(k, h, generator=g).mul_(h ** -0.5)
    targets = torch.randint(0, k, (n,), generator=g)
    return hidden, weight, targets


def naive_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The baseline: materialise the (N, K) logits in the inputs' dtype, then ``F.cross_entropy``."""
    return F.cross_entropy(hidden @ weight.t(), targets)


def _step(loss_fn: Callable[..., torch.Tensor], hidden, weight, targets):
    """One forward + backward; returns the loss and the hidden gradient only, so that the
    K x h weight gradient of one call is freed before the next call allocates its own."""
    loss = loss_fn(hidden, weight, targets)
    grad_hidden, _ = torch.autograd.grad(loss, (hidden, weight))
    return float(loss.detach()), grad_hidden


def run_method(method: Method, hidden, weight, targets, cfg: Config) -> Measurement:
    cuda = method.device == "cuda"
    if method.backend is None:
        loss_fn = naive_cross_entropy
    else:
        loss_fn = lambda h, w, t: u2.large_vocab_cross_entropy(h, w, t, backend=method.backend)  # noqa: E731
    hidden = hidden.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    memory = _common.CudaPeak() if cuda else _common.RssPeak()
    with memory:
        times, (loss, grad_hidden) = _common.time_calls(
            lambda: _step(loss_fn, hidden, weight, targets), cfg.repeats, cfg.warmup,
            torch.cuda.synchronize if cuda else None,
        )
    chunk = cross_entropy.default_chunk_size(hidden.shape[0], weight.shape[0])
    notes = {
        "auto": [f"chunked over {chunk} classes at a time"],
        "triton": [f"fused forward kernel; backward chunked over {chunk} classes"],
        "cce": ["cut_cross_entropy, exact gradients (filter_eps=None)"],
    }.get(method.backend, [])
    return Measurement(times, memory.extra_mib, loss, grad_hidden.float().cpu(), notes)


# ----------------------------------------------------------------------------------------------
# results


def shape_rows(results: Dict[str, Measurement], k: int, n: int, h: int, stamp: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One CSV row per method measured at this (K, N, h)."""
    rows = []
    for name, m in results.items():
        method = METHODS[name]
        q = _common.quantiles(m.times)
        ref = results.get(method.torch_ref)
        grad_err = None
        if ref is not None and m.grad_hidden.numel():
            scale = ref.grad_hidden.abs().max().item() or 1.0
            grad_err = (m.grad_hidden - ref.grad_hidden).abs().max().item() / scale
        rows.append({
            "method": name,
            "K": k,
            "N": n,
            "hidden": h,
            "dtype": str(method.dtype).replace("torch.", ""),
            **q,
            "repeats": len(m.times),
            "rows_per_s": n / q["median_s"],
            "gflops": 6.0 * n * k * h / q["median_s"] / 1e9,
            "ratio_vs_torch": ref.median_s / q["median_s"] if ref else None,
            "loss": m.loss,
            "loss_abs_diff_vs_torch": abs(m.loss - ref.loss) if ref else None,
            "grad_rel_err_vs_torch": grad_err,
            "peak_extra_mib": m.peak_extra_mib,
            "naive_nk_bytes": n * k * 4,
            "device": stamp["gpu"] if method.device == "cuda" else stamp["cpu"],
            "threads": stamp["threads"],
            "torch": stamp["torch"],
            "triton": stamp["triton"],
            "numpy": stamp["numpy"],
            "date": stamp["date"],
            "note": "; ".join(m.notes),
        })
    return rows




def markdown_table(rows: Sequence[Dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["method"], f"{r['K']:,}", f"{r['N']:,}", f"{r['hidden']:,}",
            f"{r['median_s']:.4g}", f"{r['rows_per_s']:,.0f}", f"{r['gflops']:.1f}",
            _common.fmt(r["ratio_vs_torch"], ".2f", "×"), _common.fmt(r["loss_abs_diff_vs_torch"], ".2g"),
            _common.fmt(r["grad_rel_err_vs_torch"], ".2g"), _common.fmt(r["peak_extra_mib"], ".1f"),
            f"{r['naive_nk_bytes'] / _common.MIB:,.1f}",
        ]) + " |")
    return "\n".join(lines)






def plot(rows: Sequence[Dict[str, Any]], stamp: Dict[str, Any], path: str) -> None:
    """Two panels per (K, N, h) group: forward + backward time, and peak extra memory against the
    N x K logits the naive version materialises."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys((r["K"], r["N"], r["hidden"]) for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by_key = {(r["method"], r["K"], r["N"], r["hidden"]): r for r in rows}
    width = 0.8 / len(methods)
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(max(9.0, 3.0 * len(shapes) * max(1, len(methods)) / 2), 4.8))
    for i, name in enumerate(methods):
        present = [(j, by_key[(name, *shape)]) for j, shape in enumerate(shapes) if (name, *shape) in by_key]
        xs = [j + (i - (len(methods) - 1) / 2) * width for j, _ in present]
        hatch = "//" if METHODS[name].device == "cuda" else None
        times = [r["median_s"] for _, r in present]
        bars = ax_time.bar(xs, times, width, label=name, hatch=hatch)
        ax_time.bar_label(bars, labels=[f"{t:.3g}" for t in times], fontsize=7, rotation=90, padding=2)
        mems = [max(r["peak_extra_mib"], 1e-3) for _, r in present]
        bars = ax_mem.bar(xs, mems, width, label=name, hatch=hatch)
        ax_mem.bar_label(bars, labels=[f"{m:,.0f}" for m in mems], fontsize=7, rotation=90, padding=2)
    for j, shape in enumerate(shapes):
        naive_mib = shape[1] * shape[0] * 4 / _common.MIB
        ax_mem.hlines(naive_mib, j - 0.45, j + 0.45, colors="k", linestyles="--",
                      label="N×K fp32 logits" if j == 0 else None)
    labels = [f"K={_common.short_count(k)}\nN={n}, h={h}" for k, n, h in shapes]
    for ax in (ax_time, ax_mem):
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(labels)
        ax.set_yscale("log")
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax_time.set_ylabel("forward + backward, median s (log, lower is better)")
    ax_mem.set_ylabel("peak extra memory, MiB (log, lower is better)")
    # a decade of headroom above the tallest bar for its label
    ax_time.set_ylim(min(r["median_s"] for r in rows) / 10, max(r["median_s"] for r in rows) * 10)
    mem_values = [max(r["peak_extra_mib"], 1e-3) for r in rows] + [s[1] * s[0] * 4 / _common.MIB for s in shapes]
    ax_mem.set_ylim(min(mem_values) / 10, max(mem_values) * 10)
    device = stamp["cpu"] + (f" + {stamp['gpu']}" if stamp["gpu"] else "")
    fig.suptitle(
        f"large-vocabulary cross-entropy (forward + backward), {stamp['threads']} CPU threads\n{device}\n"
        f"torch {stamp['torch']}, triton {stamp['triton']}, {stamp['date']}",
        fontsize=9,
    )
    fig.tight_layout()
    _common.save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# driver


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, nargs="+", default=[500_000], help="vocabulary sizes K")
    parser.add_argument("--n", type=int, default=512, help="rows (tokens) on the CPU")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size on the CPU")
    parser.add_argument("--gpu-n", type=int, default=2916, help="rows on the GPU (4 images x 729 tokens)")
    parser.add_argument("--gpu-hidden", type=int, default=3584, help="hidden size on the GPU (Qwen2.5-7B)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per method and shape")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before the timed ones")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="CPU threads (default: torch's current setting)")
    parser.add_argument("--out", default="bench_out", help="output directory")
    parser.add_argument("--methods", nargs="+", choices=ALL_METHODS, default=list(ALL_METHODS),
                        help="subset of methods (GPU ones run only where CUDA is available)")
    parser.add_argument("--seed", type=int, default=0, help="synthetic data seed")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="K=50000")
    size.add_argument("--tiny", action="store_true", help="K=2000, N=37, h=64 (GPU alike), repeats 1: smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.k = [50_000]
    if args.tiny:
        args.k, args.n, args.hidden, args.gpu_n, args.gpu_hidden, args.repeats = [2000], 37, 64, 37, 64, 1
    sizes = args.k + [args.n, args.hidden, args.gpu_n, args.gpu_hidden, args.repeats, args.threads]
    if min(sizes) < 1 or args.warmup < 0:
        parser.error("need K, N, hidden, repeats, threads >= 1 and warmup >= 0")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = Config(args.repeats, args.warmup)

    cpu_methods = [m for m in args.methods if METHODS[m].device == "cpu"]
    gpu_methods: List[str] = []
    if not torch.cuda.is_available():
        print("GPU part skipped: no CUDA device")
    else:
        gpu_methods = [m for m in args.methods if METHODS[m].device == "cuda"]
        if "u2_cce_bf16" in gpu_methods and importlib.util.find_spec("cut_cross_entropy") is None:
            print("u2_cce_bf16 skipped: cut_cross_entropy is not installed")
            gpu_methods.remove("u2_cce_bf16")
    stamp = _common.machine_stamp()

    groups = [(cpu_methods, args.n, args.hidden), (gpu_methods, args.gpu_n, args.gpu_hidden)]
    rows: List[Dict[str, Any]] = []
    progress = tqdm(total=len(args.k) * (len(cpu_methods) + len(gpu_methods)), desc="cross_entropy", file=sys.stderr)
    for k in args.k:
        for methods, n, h in groups:
            if not methods:
                continue
            hidden, weight, targets = make_data(n, k, h, seed=args.seed)
            results: Dict[str, Measurement] = {}
            for name in methods:
                progress.set_postfix_str(f"K={_common.short_count(k)} N={n} h={h} {name}")
                method = METHODS[name]
                if method.device == "cuda":
                    data = (hidden.to("cuda", method.dtype), weight.to("cuda", method.dtype), targets.to("cuda"))
                else:
                    data = (hidden, weight, targets)
                results[name] = run_method(method, *data, cfg)
                del data
                gc.collect()
                if method.device == "cuda":
                    torch.cuda.empty_cache()
                progress.update()
            rows.extend(shape_rows(results, k, n, h, stamp))
            # free this shape's tensors before the next are made (500K x 3584 fp32 is 7 GB)
            del hidden, weight, targets, results
            gc.collect()
    progress.close()

    table = markdown_table(rows)
    _common.write_report(
        args.out, "cross_entropy", rows, table, _common.stamp_text(stamp, ("torch", "triton", "numpy", "python")),
        "large-vocabulary cross-entropy, forward + backward (mean loss)",
        "× torch: the naive baseline's median over this method's (> 1: faster). loss diff / grad rel err: "
        "against the baseline's loss and hidden gradient. naive N×K MiB: the fp32 logits the baseline "
        "materialises (autograd keeps them and their gradient). Both methods allocate the dense K×h "
        "weight gradient.",
        lambda path: plot(rows, stamp, path),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
