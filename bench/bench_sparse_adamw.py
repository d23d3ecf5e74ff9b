"""Benchmark the row-sparse optimizer step: u2.SparseRowAdamW vs torch.optim.AdamW (dense) vs
torch.optim.SparseAdam, on a (K, d) table whose gradient touches only the rows of one batch.

The gradient is built once per shape (the rows of N Zipf-distributed ids, summed per unique id)
and every method steps on a fresh copy of the same table: only ``optimizer.step()`` is timed.
Per method: median / p10 / p90 seconds, steps/s, rows touched per step, the ratio to dense AdamW
measured in the same run, and the largest difference of the updated table from AdamW's after one
step (equal: with weight decay 0 AdamW leaves untouched rows where they are).

Writes OUT/sparse_adamw.csv, OUT/sparse_adamw.md (and .png with matplotlib); prints the table.

    python -m unicode2_fast.bench.bench_sparse_adamw              # K = 500K, d = 1152, N = 2916
    python -m unicode2_fast.bench.bench_sparse_adamw --k 50000 --n 729
    python -m unicode2_fast.bench.bench_sparse_adamw --tiny       # smoke test
"""
from __future__ import annotations

import argparse
import gc
from typing import Any, Dict, List, Optional, Sequence

import torch

import unicode2_fast as u2
from unicode2_fast.bench import _common
from unicode2_fast.bench.bench_embedding import BETAS, LR, zipf_batches

METHODS = ("u2", "torch_dense", "torch_sparse")


def make_optimizer(name: str, weight: torch.nn.Parameter) -> torch.optim.Optimizer:
    if name == "u2":
        return u2.SparseRowAdamW([weight], lr=LR, betas=BETAS)
    if name == "torch_dense":
        return torch.optim.AdamW([weight], lr=LR, betas=BETAS, weight_decay=0.0)
    return torch.optim.SparseAdam([weight], lr=LR, betas=BETAS)


def row_sparse_grad(ids: torch.Tensor, k: int, d: int, seed: int) -> torch.Tensor:
    """(K, d) coalesced sparse COO gradient: one random (N, d) upstream gradient summed per id."""
    generator = torch.Generator().manual_seed(seed)
    upstream = torch.randn(ids.shape[0], d, generator=generator)
    unique_ids, inverse = torch.unique(ids, return_inverse=True)
    values = torch.zeros(unique_ids.shape[0], d).index_add_(0, inverse, upstream)
    # unique_ids are sorted and distinct by construction: the gradient is coalesced as built
    return torch.sparse_coo_tensor(unique_ids.unsqueeze(0), values, (k, d), is_coalesced=True, check_invariants=False)


def measure(name: str, init: torch.Tensor, grad: torch.Tensor, repeats: int, warmup: int) -> Dict[str, Any]:
    """Time ``repeats`` steps of method ``name`` on the same gradient; the touched rows after one
    step, and whether every other row kept its initial value."""
    weight = torch.nn.Parameter(init.clone())
    optimizer = make_optimizer(name, weight)
    touched = grad._indices()[0]
    dense_grad = grad.to_dense() if name == "torch_dense" else None

    def step() -> None:
        weight.grad = dense_grad if dense_grad is not None else grad
        optimizer.step()

    step()
    after_one = weight.detach()[touched].clone()
    untouched = torch.ones(init.shape[0], dtype=torch.bool)
    untouched[touched] = False
    others_kept = bool(torch.equal(weight.detach()[untouched], init[untouched]))
    times, _ = _common.time_calls(step, repeats, warmup)
    del weight, optimizer, dense_grad  # free this method's table and state before the next one
    gc.collect()
    return {"times": times, "after_one": after_one, "others_kept": others_kept}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=500_000, help="table rows K")
    parser.add_argument("--d", type=int, default=1152, help="row width d")
    parser.add_argument("--n", type=int, default=2916, help="ids per batch N (2916 = four images)")
    parser.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of the ids")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads for every method")
    parser.add_argument("--seed", type=int, default=0, help="data seed")
    parser.add_argument("--out", default="bench_out", help="output directory")
    parser.add_argument("--tiny", action="store_true", help="K=2000, d=64, N=100, 1 repeat: smoke test")
    args = parser.parse_args(argv)
    if args.tiny:
        args.k, args.d, args.n, args.repeats, args.warmup = 2000, 64, 100, 1, 0
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    ids = zipf_batches(args.k, args.n, 1, args.zipf, args.seed, torch.device("cpu"))[0]
    grad = row_sparse_grad(ids, args.k, args.d, args.seed)
    init = torch.randn(args.k, args.d, generator=torch.Generator().manual_seed(args.seed + 1))
    results = {name: measure(name, init, grad, args.repeats, args.warmup) for name in METHODS}
    del init
    dense = _common.quantiles(results["torch_dense"]["times"])["median_s"]
    rows: List[Dict[str, Any]] = []
    for name, result in results.items():
        q = _common.quantiles(result["times"])
        rows.append({
            "method": name, "K": args.k, "d": args.d, "N": args.n, "rows_touched": int(grad._nnz()), **q,
            "steps_per_s": 1.0 / q["median_s"], "ratio_vs_torch_dense": dense / q["median_s"],
            "max_diff_vs_adamw": float((result["after_one"] - results["torch_dense"]["after_one"]).abs().max()),
            "untouched_rows_kept": result["others_kept"],
        })
    header = "| method | K | d | N | rows touched | median s | steps/s | × torch_dense | max diff vs AdamW (step 1) |"
    lines = [header, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['method']} | {r['K']:,} | {r['d']} | {r['N']:,} | {r['rows_touched']:,} | "
                     f"{r['median_s']:.4g} | {r['steps_per_s']:.3g} | {r['ratio_vs_torch_dense']:.2f}× | "
                     f"{r['max_diff_vs_adamw']:.2e} |")
    _common.write_report(
        args.out, "sparse_adamw", rows, "\n".join(lines), _common.stamp_text(_common.machine_stamp()),
        f"row-sparse optimizer step (K = {args.k:,}, d = {args.d}, N = {args.n:,} Zipf ids)",
        "Only optimizer.step() is timed, on the same gradient for every method. × torch_dense: dense "
        "AdamW's median over this method's. SparseAdam is Adam (no decoupled weight decay), lazy like u2.",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
