"""Multi-codebook encoding (UniTok's shape: G = 8 sub-codebooks of K = 4096, d = 1152 in chunks of
144): u2.nearest_grouped vs G separate u2.nearest calls vs FAISS's product-quantizer encoding
(``faiss.ProductQuantizer.compute_codes`` with the same sub-codebooks as its centroids), and the
MultiCodebookQuantizer's forward (search + gather) on the same codebooks.

Cases: Gaussian chunks and codebooks; SigLIP-like features (the synthetic generator of
unicode2_fast.data) split into 8 chunks; 12x12 grey patches of the photographs scikit-image ships
(flat sky and background: masses of near-identical patches and near ties); near-duplicate
codewords with exact ties. Every method runs on the same threads, warmed first, ``--repeats``
timed runs interleaved (u2, FAISS, u2, FAISS, ...: a noisy machine slows both alike), min and
median reported, ratios of medians against FAISS taken in the same run. ``ids = FAISS`` is the
share of (query, group) codes equal to FAISS's; u2's ids are the exact float64 argmin, so where
they differ FAISS's fp32 answer is the wrong side of a near tie (``mismatch gap`` is the largest
float64 distance excess of FAISS's code over u2's among them).

    python -m unicode2_fast.bench.bench_grouped                 # about 2 minutes on 2 cores
    python -m unicode2_fast.bench.bench_grouped --n 8192 --repeats 7
    python -m unicode2_fast.bench.bench_grouped --tiny          # smoke test

Writes OUT/grouped.md and OUT/grouped.csv.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

import unicode2_fast as u2
from unicode2_fast.bench import _common
from unicode2_fast.data import near_duplicates, photo_patches, siglip_like

HEADER = ("| data | G x K | d | N | method | min / median s | vs FAISS PQ (median) | ids = FAISS | mismatch gap |\n"
          "|---|---|---|---|---|---|---|---|---|")
METHODS = ("u2.nearest_grouped", "u2.MultiCodebookQuantizer", "G x u2.nearest", "faiss PQ compute_codes")


def cases(n: int, groups: int, k: int, d: int) -> List[Tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, queries (N, G, d/G), codebooks (G, K, d/G)) of every case."""
    sub = d // groups
    g = torch.Generator().manual_seed(0)
    out = [("gaussian", torch.randn(n, groups, sub, generator=g), torch.randn(groups, k, sub, generator=g))]
    data = siglip_like(k, n, d, seed=1)
    # sub-codebook g: chunk g of K SigLIP-like vectors (sampled, as a k-means init would)
    out.append(("SigLIP-like, chunks of sampled vectors", data.queries.view(n, groups, sub).clone(),
                data.codebook.view(k, groups, sub).transpose(0, 1).contiguous()))
    side = int(round(sub ** 0.5))
    if side * side == sub:
        try:
            patches = photo_patches(n * groups + groups * k, side, gray=True, seed=2)
        except ImportError:
            patches = None
        if patches is not None:
            out.append((f"photos {side}x{side} grey, sampled patches", patches[:n * groups].view(n, groups, sub).clone(),
                        patches[n * groups:].view(groups, k, sub).clone()))
    dup = [near_duplicates(k, n, sub, seed=3 + i) for i in range(groups)]
    out.append(("near-duplicates + exact ties", torch.stack([x.queries for x in dup], dim=1),
                torch.stack([x.codebook for x in dup])))
    return out


def _faiss_pq(codebooks: torch.Tensor):
    import faiss

    groups, k, sub = codebooks.shape
    bits = k.bit_length() - 1
    if 1 << bits != k:
        raise ValueError(f"FAISS's product quantizer needs K = 2^bits codewords, got K = {k}")
    pq = faiss.ProductQuantizer(groups * sub, groups, bits)
    faiss.copy_array_to_vector(codebooks.contiguous().numpy().ravel(), pq.centroids)
    return pq


def _unpack(codes: np.ndarray, groups: int, bits: int) -> torch.Tensor:
    """(N, G) ids from FAISS's packed little-endian ``bits``-bit codes."""
    flags = np.unpackbits(codes, axis=1, bitorder="little")[:, :groups * bits].reshape(-1, groups, bits)
    return torch.from_numpy((flags.astype(np.int64) << np.arange(bits)).sum(axis=2))


def _interleaved(fns: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, Tuple[float, float]]:
    for fn in fns.values():
        fn()
    runs: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - start)
    return {name: (min(r), statistics.median(r)) for name, r in runs.items()}


def _mismatch_gap(x: torch.Tensor, codebooks: torch.Tensor, ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """Largest float64 distance excess of ``theirs`` over ``ours`` where the ids differ (0 if none)."""
    rows, cols = (ours != theirs).nonzero(as_tuple=True)
    if rows.numel() == 0:
        return 0.0
    xq = x[rows, cols].double()
    mine = (xq - codebooks[cols, ours[rows, cols]].double()).pow(2).sum(dim=1)
    other = (xq - codebooks[cols, theirs[rows, cols]].double()).pow(2).sum(dim=1)
    return float((other - mine).max())


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2916, help="queries (default: 4 images x 729 patches)")
    parser.add_argument("--groups", type=int, default=8, help="sub-codebooks G")
    parser.add_argument("--k", type=int, default=4096, help="codewords per sub-codebook (a power of two)")
    parser.add_argument("--d", type=int, default=1152, help="full dimension (a multiple of G)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per method and case")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads for every method")
    parser.add_argument("--out", default="bench_out", help="output directory")
    parser.add_argument("--tiny", action="store_true", help="N = 64, K = 256, 1 repeat: smoke test")
    args = parser.parse_args(argv)
    if args.tiny:
        args.n, args.k, args.repeats = 64, 256, 1
    if args.d % args.groups or args.repeats < 1 or args.n < 1 or args.k < 2 or args.k & (args.k - 1):
        parser.error("need d a multiple of G, K a power of two >= 2, N >= 1 and --repeats >= 1")
    import faiss

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    stamp = _common.machine_stamp()
    lines, rows = [HEADER], []
    print(HEADER, flush=True)
    bits = args.k.bit_length() - 1
    for name, x, codebooks in cases(args.n, args.groups, args.k, args.d):
        groups, k, sub = codebooks.shape
        pq = _faiss_pq(codebooks)
        flat = x.reshape(x.shape[0], -1).contiguous().numpy()
        mcq = u2.MultiCodebookQuantizer(args.d, num_codebooks=groups, codebook_size=k, codebook=codebooks,
                                        freeze_codebook=True).eval()
        per_group = [codebooks[g] for g in range(groups)]
        x_full = x.reshape(x.shape[0], -1)
        fns = {
            "u2.nearest_grouped": lambda: u2.nearest_grouped(x, codebooks),
            "u2.MultiCodebookQuantizer": lambda: mcq(x_full),
            "G x u2.nearest": lambda: [u2.nearest(x[:, g], per_group[g]) for g in range(groups)],
            "faiss PQ compute_codes": lambda: pq.compute_codes(flat),
        }
        with torch.no_grad():
            times = _interleaved(fns, args.repeats)
            ids, _ = u2.nearest_grouped(x, codebooks)
            _, mcq_ids, _ = mcq(x_full)
        if not torch.equal(mcq_ids, ids):
            raise RuntimeError(f"{name}: MultiCodebookQuantizer's ids differ from nearest_grouped's")
        theirs = _unpack(pq.compute_codes(flat), groups, bits)
        agree = float((ids == theirs).double().mean())
        gap = _mismatch_gap(x, codebooks, ids, theirs)
        if gap < 0:
            raise RuntimeError(f"{name}: FAISS found a strictly nearer codeword than u2 ({gap:.3g})")
        f_med = times["faiss PQ compute_codes"][1]
        for method in METHODS:
            best, median = times[method]
            ours = method != "faiss PQ compute_codes"
            line = (f"| {name} | {groups} x {k:,} | {args.d} | {x.shape[0]:,} | {method} | {best:.3f} / {median:.3f} | "
                    f"{f_med / median:.2f}x | {f'{agree:.5f}' if ours else '1'} | {f'{gap:.2g}' if ours else '-'} |")
            lines.append(line)
            print(line, flush=True)
            rows.append({"case": name, "method": method, "G": groups, "K": k, "d": args.d, "N": x.shape[0],
                         "min_s": best, "median_s": median, "queries_per_s": x.shape[0] / median,
                         "ratio_vs_faiss_pq": f_med / median, "ids_agree_faiss": agree if ours else 1.0,
                         "mismatch_gap": gap if ours else 0.0, "threads": args.threads, "date": stamp["date"]})
    text = _common.stamp_text(stamp)
    os.makedirs(args.out, exist_ok=True)
    _common.write_text("# multi-codebook encoding vs FAISS PQ\n\n" + "\n".join(lines) + f"\n\n{text}\n",
                       os.path.join(args.out, "grouped.md"))
    _common.write_csv(rows, os.path.join(args.out, "grouped.csv"))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
