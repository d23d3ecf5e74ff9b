"""Benchmark one C2 training step: row-sparse embedding + optimizer vs torch's dense and sparse ones.

One step is what the table itself costs in training: zero_grad (set_to_none, as a training loop
does), gather N ids from the trainable K x d table, backward from the gradient the model above
would hand it (a fixed random ``g``, N x d: ``rows.backward(g)``), and the optimizer step. With
``--loss product`` the backward runs instead from the toy loss ``(rows * g).sum()``: its forward
and backward add the same two N x d element-wise passes to every method. Methods, all fp32,
lr 1e-3, betas (0.9, 0.95), no weight decay (SparseAdam has none):

    u2            ``u2.gathered_embedding`` + ``u2.SparseRowAdamW``: row-sparse gradient of the
                  unique ids, lazy AdamW on those rows (backend "auto": Triton on CUDA, the
                  compiled C row update on the CPU).
    u2_torch      the same with ``SparseRowAdamW(backend="torch")``: the eager torch row update.
    torch_dense   ``nn.Embedding`` + ``torch.optim.AdamW``: dense K x d gradient, AdamW over
                  every parameter every step.
    torch_sparse  ``nn.Embedding(sparse=True)`` + ``torch.optim.SparseAdam``: torch's lazy Adam
                  (a global step count for bias correction, no weight decay).

Ids are drawn from a Zipf-like distribution (p(rank r) ~ r^-s over a random permutation of the
K ids), so a step has duplicates and hot ids; every method sees the same pre-drawn batches. The
first step, which allocates the optimizer state (2 x K x d fp32 moments for every method), is
timed separately as ``first_step_s``; then ``--warmup`` untimed and ``--repeats`` timed steps.

Per method: min / median / p10 / p90 step time and p90 / p10, ratios of the medians to
torch_dense and torch_sparse measured in the same run (> 1: faster than the baseline) and of the
fastest steps to torch_sparse's, the bytes held by gradients and optimizer state after a
step, the peak extra memory over all steps (process RSS sampled every 2 ms on the CPU, torch's
allocator peak on the GPU; the table itself is allocated before and not counted), and the largest
difference from torch_dense of the rows updated by the first step (the same update for all three
at step 1, up to SparseAdam's eps placement).

Writes OUT/embedding.csv, OUT/embedding.md and OUT/embedding.png, and prints the table.

    python bench/bench_embedding.py               # K = 500,000, d = 1152, N = 2916
    python bench/bench_embedding.py --quick       # K = 50,000
    python bench/bench_embedding.py --methods u2 torch_sparse --repeats 20
    python bench/bench_embedding.py --loss product   # backward from (rows * g).sum()
"""
from __future__ import annotations

import argparse
import gc
import itertools
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

import unicode2_fast as u2
from unicode2_fast.bench import _common

METHODS = ("u2", "u2_torch", "torch_dense", "torch_sparse")
DEFAULT_METHODS = ("u2", "torch_dense", "torch_sparse")
LOSSES = ("upstream", "product")
LR, BETAS = 1e-3, (0.9, 0.95)
#: distinct id batches cycled through the steps (drawn once, before any timing)
N_BATCHES = 8

TABLE_COLUMNS = ("method", "K", "d", "N", "unique ids", "min ms", "median ms", "p10 ms", "p90 ms", "p90/p10",
                 "× dense", "× SparseAdam", "× SparseAdam (min)", "grad+state MiB", "peak extra MiB", "first step s",
                 "max |Δ| vs dense")


@dataclass
class Measurement:
    """What one method produced: step timings, memory and its first-step update of the touched rows."""

    times: List[float]
    first_step_s: float
    peak_extra_mib: float
    grad_bytes: int
    state_bytes: int
    first_rows: torch.Tensor   # (U0, d) rows of the first batch's unique ids after step 1, CPU
    notes: List[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# data and methods


def zipf_batches(k: int, n: int, count: int, exponent: float, seed: int, device: torch.device) -> List[torch.Tensor]:
    """``count`` batches of ``n`` int64 ids in [0, k): p(rank r) ~ r^-exponent over a random
    permutation of the ids, so hot ids are scattered over the table."""
    generator = torch.Generator().manual_seed(seed)
    weights = torch.arange(1, k + 1, dtype=torch.float64).pow_(-exponent)
    id_of_rank = torch.randperm(k, generator=generator)
    return [id_of_rank[torch.multinomial(weights, n, replacement=True, generator=generator)].to(device)
            for _ in range(count)]


def build_method(name: str, init: torch.Tensor) -> Tuple[torch.nn.Parameter, torch.optim.Optimizer, Callable]:
    """(table parameter, optimizer, forward(ids) -> (N, d) rows) for ``name``, from a copy of ``init``."""
    if name in ("u2", "u2_torch"):
        weight = torch.nn.Parameter(init.clone())
        backend = "torch" if name == "u2_torch" else "auto"
        optimizer = u2.SparseRowAdamW([weight], lr=LR, betas=BETAS, backend=backend)
        return weight, optimizer, lambda ids: u2.gathered_embedding(ids, weight)
    embedding = torch.nn.Embedding.from_pretrained(init.clone(), freeze=False, sparse=name == "torch_sparse")
    if name == "torch_dense":
        optimizer = torch.optim.AdamW(embedding.parameters(), lr=LR, betas=BETAS, weight_decay=0.0)
    else:
        optimizer = torch.optim.SparseAdam(list(embedding.parameters()), lr=LR, betas=BETAS)
    return embedding.weight, optimizer, embedding


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds: indices + values for a sparse COO tensor."""
    if t.is_sparse:
        return tensor_bytes(t._indices()) + tensor_bytes(t._values())
    return t.numel() * t.element_size()


def held_bytes(weight: torch.nn.Parameter, optimizer: torch.optim.Optimizer) -> Tuple[int, int]:
    """(gradient bytes, optimizer-state bytes) held right after a step."""
    grad = tensor_bytes(weight.grad) if weight.grad is not None else 0
    state = sum(tensor_bytes(v) for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    return grad, state


def run_method(name: str, init: torch.Tensor, batches: List[torch.Tensor], g: torch.Tensor,
               repeats: int, warmup: int, loss: str = "upstream") -> Measurement:
    cuda = init.is_cuda
    sync = torch.cuda.synchronize if cuda else None
    memory = _common.CudaPeak() if cuda else _common.RssPeak()
    weight, optimizer, forward = build_method(name, init)
    calls = itertools.count()

    def train_step() -> None:
        ids = batches[next(calls) % len(batches)]
        optimizer.zero_grad(set_to_none=True)
        rows = forward(ids)
        if loss == "product":
            (rows * g).sum().backward()
        else:
            rows.backward(g)
        optimizer.step()

    with memory:
        first, _ = _common.time_calls(train_step, 1, 0, sync)
        first_rows = weight.detach()[torch.unique(batches[0])].float().cpu()
        times, _ = _common.time_calls(train_step, repeats, warmup, sync)
    grad_bytes, state_bytes = held_bytes(weight, optimizer)
    notes = []
    if name == "torch_sparse":
        notes.append("SparseAdam: global step count, eps outside the bias-corrected root")
    if name == "u2" and cuda:
        notes.append("Triton kernels (first step includes their compilation)")
    if name.startswith("u2"):
        notes.append(f"row update: {optimizer.backend_for(weight)}")
    del weight, optimizer, forward
    return Measurement(times, first[0], memory.extra_mib, grad_bytes, state_bytes, first_rows, notes)


# ----------------------------------------------------------------------------------------------
# results


def result_rows(results: Dict[str, Measurement], k: int, d: int, n: int, unique_ids: float,
                device: str, stamp: Dict[str, Any], loss: str = "upstream") -> List[Dict[str, Any]]:
    """One CSV row per measured method."""
    medians = {name: _common.quantiles(m.times)["median_s"] for name, m in results.items()}
    sparse_min = min(results["torch_sparse"].times) if "torch_sparse" in results else None
    dense = results.get("torch_dense")
    rows = []
    for name, m in results.items():
        q = _common.quantiles(m.times)
        rows.append({
            "method": name,
            "K": k, "d": d, "N": n,
            "unique_ids": unique_ids,
            "loss": loss,
            "min_s": min(m.times), "median_s": q["median_s"], "p10_s": q["p10_s"], "p90_s": q["p90_s"],
            "p90_over_p10": q["p90_s"] / q["p10_s"],
            "steps_per_s": 1.0 / q["median_s"],
            "ratio_vs_dense": medians["torch_dense"] / q["median_s"] if "torch_dense" in medians else None,
            "ratio_vs_sparse_adam": medians["torch_sparse"] / q["median_s"] if "torch_sparse" in medians else None,
            "ratio_min_vs_sparse_adam": sparse_min / min(m.times) if sparse_min is not None else None,
            "grad_bytes": m.grad_bytes,
            "state_bytes": m.state_bytes,
            "grad_state_mib": (m.grad_bytes + m.state_bytes) / _common.MIB,
            "peak_extra_mib": m.peak_extra_mib,
            "first_step_s": m.first_step_s,
            "max_abs_diff_vs_dense": float((m.first_rows - dense.first_rows).abs().max()) if dense else None,
            "repeats": len(m.times),
            "device": stamp["gpu"] if device == "cuda" else stamp["cpu"],
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
            r["method"], f"{r['K']:,}", str(r["d"]), f"{r['N']:,}", f"{r['unique_ids']:,.0f}",
            f"{1e3 * r['min_s']:.3g}", f"{1e3 * r['median_s']:.3g}", f"{1e3 * r['p10_s']:.3g}",
            f"{1e3 * r['p90_s']:.3g}", f"{r['p90_over_p10']:.2f}",
            _common.fmt(r["ratio_vs_dense"], ".2f", "×"), _common.fmt(r["ratio_vs_sparse_adam"], ".2f", "×"),
            _common.fmt(r["ratio_min_vs_sparse_adam"], ".2f", "×"),
            f"{r['grad_state_mib']:,.1f}", f"{r['peak_extra_mib']:,.1f}", f"{r['first_step_s']:.3g}",
            _common.fmt(r["max_abs_diff_vs_dense"], ".2g"),
        ]) + " |")
    return "\n".join(lines)




def plot(rows: Sequence[Dict[str, Any]], stamp: Dict[str, Any], device: str, path: str) -> None:
    """Two panels per method: median step time with p10-p90 whiskers, and gradient + state memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    medians = [1e3 * r["median_s"] for r in rows]
    whiskers = [[1e3 * (r["median_s"] - r["p10_s"]) for r in rows], [1e3 * (r["p90_s"] - r["median_s"]) for r in rows]]
    colors = [f"C{i}" for i in range(len(rows))]
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(10, 4.6))
    bars = ax_time.bar(names, medians, yerr=whiskers, capsize=4, color=colors)
    ax_time.bar_label(bars, labels=[f"{m:.3g} ms" for m in medians], fontsize=8, padding=2)
    ax_time.set_yscale("log")
    ax_time.set_ylabel("step time, ms (log scale, lower is better)")
    ax_time.set_title("median step (p10-p90)", fontsize=9)
    mib = [r["grad_state_mib"] for r in rows]
    bars = ax_mem.bar(names, mib, color=colors)
    ax_mem.bar_label(bars, labels=[f"{m:,.0f}" if m >= 10 else f"{m:.2g}" for m in mib], fontsize=8, padding=2)
    ax_mem.set_ylabel("gradient + optimizer state, MiB")
    ax_mem.set_title("memory held after a step", fontsize=9)
    for ax in (ax_time, ax_mem):
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.tick_params(axis="x", labelsize=8)
    where = stamp["gpu"] if device == "cuda" else f"{stamp['cpu']}, {stamp['threads']} threads"
    r0 = rows[0]
    fig.suptitle(
        f"C2 training step: K={r0['K']:,}, d={r0['d']}, N={r0['N']:,} Zipf ids ({r0['unique_ids']:,.0f} unique), fp32\n"
        f"{where} | torch {stamp['torch']}, triton {stamp['triton']}, {stamp['date']}",
        fontsize=9,
    )
    fig.tight_layout()
    _common.save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# driver


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=500_000, help="table rows K")
    parser.add_argument("--d", type=int, default=1152, help="row dimension d")
    parser.add_argument("--n", type=int, default=2916, help="ids per step (2916 = 4 images x 729 patches)")
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent s of the id distribution")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after the first one")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="CPU threads for torch (default: torch's current setting)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: CUDA when available, else the CPU")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(DEFAULT_METHODS),
                        help=f"methods to run (default: {' '.join(DEFAULT_METHODS)})")
    parser.add_argument("--loss", choices=LOSSES, default="upstream",
                        help="upstream: rows.backward(g), the table's own cost; product: (rows * g).sum().backward()")
    parser.add_argument("--out", default="bench_out", help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="data seed")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="K=50,000 (d=1152, N=2916)")
    size.add_argument("--tiny", action="store_true", help="K=2000, d=64, N=37, repeats 3: smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.k = 50_000
    if args.tiny:
        args.k, args.d, args.n, args.repeats = 2000, 64, 37, 3
    if min(args.k, args.d, args.n, args.repeats, args.threads) < 1 or args.warmup < 0 or args.zipf <= 0:
        parser.error("need K, d, N, repeats, threads >= 1, warmup >= 0 and zipf > 0")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    stamp = _common.machine_stamp()

    batches = zipf_batches(args.k, args.n, N_BATCHES, args.zipf, args.seed, device)
    unique_ids = sum(int(torch.unique(ids).numel()) for ids in batches) / len(batches)
    generator = torch.Generator().manual_seed(args.seed + 1)
    init = (0.02 * torch.randn(args.k, args.d, generator=generator)).to(device)
    g = torch.randn(args.n, args.d, generator=generator).to(device)

    results: Dict[str, Measurement] = {}
    for name in args.methods:
        print(f"{name}: K={args.k:,} d={args.d} N={args.n:,} on {args.device}", file=sys.stderr)
        results[name] = run_method(name, init, batches, g, args.repeats, args.warmup, args.loss)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    del init, g, batches

    rows = result_rows(results, args.k, args.d, args.n, unique_ids, args.device, stamp, args.loss)
    table = markdown_table(rows)
    _common.write_report(
        args.out, "embedding", rows, table, _common.stamp_text(stamp, ("torch", "triton", "numpy", "python")),
        f"C2 training step: gathered embedding + optimizer (K = {args.k:,}, d = {args.d}, N = {args.n:,}, "
        f"Zipf s = {args.zipf:g}, fp32, {args.device}, backward from "
        f"{'the upstream gradient' if args.loss == 'upstream' else '(rows * g).sum()'})",
        "× dense / × SparseAdam: the baseline's median step over this method's (> 1: faster); (min): the "
        "fastest steps' ratio. grad+state: "
        "bytes held by the table's gradient and the optimizer state after a step. first step: allocates the "
        "optimizer state, excluded from the timings. max |Δ| vs dense: rows updated by step 1 against torch_dense.",
        lambda path: plot(rows, stamp, args.device, path),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
