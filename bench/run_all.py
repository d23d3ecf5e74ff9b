"""Run every benchmark in one process and collect the results: tables, one CSV and plots.

The per-op scripts run in this order, each with the same thread count and output folder:

    nearest         exact nearest codeword: u2 vs FAISS IndexFlatL2 vs plain torch   (bench_nearest.py)
    nearest_data    the same on real photographs, tight clusters, near-duplicates      (bench_nearest_data.py)
    grouped         multi-codebook encoding (UniTok's 8 x 4096): u2.nearest_grouped and
                    MultiCodebookQuantizer vs FAISS's product-quantizer encoding     (bench_grouped.py)
    hierarchical    recall-speed of u2.HierarchicalIndex vs FAISS IndexIVFFlat on the same cells,
                    the exact searches, and FAISS IndexHNSWFlat(d, 32) at efSearch 16/32/64/128 as a
                    graph baseline (timed here, on the same codebook and queries) (bench_hierarchical.py)
    embedding       one C2 training step: row-sparse embedding + optimizer vs torch   (bench_embedding.py)
    cross_entropy   large-vocabulary CE forward + backward vs plain torch             (bench_cross_entropy.py)
    kmeans          codebook build: two-stage u2.build_codebook vs faiss.Kmeans       (bench_kmeans.py)

Sizes: ``--full`` (the default) runs each script at its default sizes (K = 500K for the search,
embedding and CE benchmarks); ``--quick`` runs small sizes chosen to finish in about 1.5 minutes on
2 CPU cores (see QUICK_ARGS); ``--tiny`` is the smoke test (every script's ``--tiny``).

User data. ``--features FILE.npy`` (an (M, d) float array of patch features): the first K rows
are the codebook and the next N rows the queries of nearest and hierarchical, where N is the op's
query count (at most M / 2) and K its codebook size (at most the M - N remaining rows); build
trains on the first rows and measures held-out MSE on the next ones. ``--codebook FILE``
(a u2.Codebook .safetensors): all its codewords are the codebook of nearest and hierarchical;
the queries are then the first N rows of --features, or without it codewords drawn at random
plus Gaussian noise (0.25 x the codebook's per-coordinate std); a large codebook makes even
--quick slow. An op that takes neither (embedding, cross_entropy; kmeans takes no --codebook) runs
on its synthetic data and says so. The per-op scripts are run unchanged: their one
``siglip_like`` call is answered with the user's arrays (see ``serving``).

Outputs in OUT (default bench_out/): each script's own <op>.csv / .md / .png and <op>.log (its
printed output), hierarchical_hnsw.csv, and the aggregate: results.csv (one normalised row per
op x method x setting), results.md (a section per op with its key rows and the machine stamp) and
results.png (2 x 2 panels: nearest throughput, hierarchical recall vs speed, embedding step time,
CE memory). A plain-text summary is printed at the end.

    python bench/run_all.py --quick
    python bench/run_all.py --only nearest hierarchical --features feats.npy --out my_bench
    unicode2-fast bench --codebook c1.safetensors --only nearest --quick
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import math
import os
import sys
import time
import traceback
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

import unicode2_fast as u2
from unicode2_fast.data import SyntheticCodebookData
from unicode2_fast._errors import UserError
from unicode2_fast.bench import _common

OPS = ("nearest", "nearest_data", "grouped", "hierarchical", "embedding", "cross_entropy", "kmeans")
#: what nearest_data and grouped run on (their own cases; they take no --features / --codebook)
BUILT_IN_DATA = "photographs shipped with scikit-image + clustered / near-duplicate / Gaussian / SigLIP-like generators"
#: the ops that bring their own real and adversarial data (CPU only)
BUILT_IN_OPS = ("nearest_data", "grouped")
#: the ops whose data can come from --features / --codebook
FEATURE_OPS = ("nearest", "hierarchical", "kmeans")
CODEBOOK_OPS = ("nearest", "hierarchical")

#: per-op arguments of --quick: about 1.5 minutes in all on 2 cores (hierarchical's HNSW build of
#: 50K x 1152 codewords is the largest part)
QUICK_ARGS: Dict[str, List[str]] = {
    "nearest": ["--quick"],                                   # K = 20K, N = 729, 2 repeats
    "nearest_data": ["--scale", "0.5"],                       # photographs, clusters, ties: K and N / 2
    "grouped": ["--n", "729", "--repeats", "3"],              # G = 8 x K = 4096, d = 1152, one image
    "hierarchical": ["--quick", "--n", "729", "--repeats", "2"],  # K = 50K, n_coarse = 100
    "embedding": ["--quick"],                                 # K = 50K, N = 2916
    "cross_entropy": ["--quick", "--n", "256"],               # K = 50K, N = 256, h = 1024
    "kmeans": ["--k", "1000", "--n-train", "32000", "--n-test", "4000", "--niter", "10"],
}
SIZE_ARGS: Dict[str, Dict[str, List[str]]] = {
    "full": {op: [] for op in OPS},
    "quick": QUICK_ARGS,
    "tiny": {op: ["--tiny"] for op in OPS},
}

HNSW_M = 32
HNSW_EF_SEARCH = (16, 32, 64, 128)
#: a query of --codebook without --features: a random codeword plus this much noise per coordinate,
#: relative to the codebook's per-coordinate std
QUERY_NOISE = 0.25
#: the recall levels at which results.md shows each approximate method's fastest setting
RECALL_LEVELS = (0.9, 0.95, 0.99)

COLUMNS = ("op", "method", "setting", "shape", "K", "N", "d", "dtype", "device", "median_s", "p10_s", "p90_s",
           "throughput", "throughput_unit", "gflops", "recall", "peak_extra_mib", "baseline", "ratio_vs_baseline",
           "build_s", "data", "details", "threads", "torch", "faiss", "triton", "numpy", "python", "date")
SUMMARY_COLUMNS = ("method", "setting", "shape", "median s", "throughput", "GFLOP/s", "recall@1", "× baseline",
                   "peak extra MiB")


# ----------------------------------------------------------------------------------------------
# user data


class UserData:
    """The arrays of --features / --codebook, and how each op's shapes are cut from them."""

    def __init__(self, features_path: Optional[str], codebook_path: Optional[str]):
        self.features_path, self.codebook_path = features_path, codebook_path
        self.features = _load_features(features_path) if features_path else None   # (M, d) memory-mapped
        self.codebook = _load_codebook(codebook_path) if codebook_path else None   # (K, d) fp32
        if self.features is not None and self.codebook is not None and self.features.shape[1] != self.codebook.shape[1]:
            raise UserError(f"--features has d = {self.features.shape[1]} but --codebook has d = "
                            f"{self.codebook.shape[1]}")

    def used_by(self, op: str) -> bool:
        return (self.features is not None and op in FEATURE_OPS) or (self.codebook is not None and op in CODEBOOK_OPS)

    def search_data(self, k: int, n: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor, str]:
        """(codebook (K', d), queries (N', d), description) for an op that asks for K codewords and N queries."""
        if self.codebook is not None:
            codebook = self.codebook
            if self.features is not None:
                queries = _rows(self.features, 0, min(n, self.features.shape[0]), self.features_path)
                source = f"codebook {os.path.basename(self.codebook_path)}, queries: first rows of " \
                         f"{os.path.basename(self.features_path)}"
            else:
                generator = torch.Generator().manual_seed(seed)
                picks = torch.randint(0, codebook.shape[0], (n,), generator=generator)
                noise = QUERY_NOISE * codebook.std(dim=0) if codebook.shape[0] > 1 else torch.ones(codebook.shape[1])
                queries = codebook[picks] + noise * torch.randn(n, codebook.shape[1], generator=generator)
                source = f"codebook {os.path.basename(self.codebook_path)}, queries: codewords + noise"
            return codebook, queries.contiguous(), source
        m = self.features.shape[0]
        n = min(n, m // 2)
        k = min(k, m - n)
        codebook = _rows(self.features, 0, k, self.features_path)
        queries = _rows(self.features, k, k + n, self.features_path)
        return codebook, queries, f"features {os.path.basename(self.features_path)}: rows [0, {k}) codebook, " \
                                  f"[{k}, {k + n}) queries"

    def build_data(self, n_train: int, n_test: int, k: int) -> Tuple[torch.Tensor, int, int, int, str]:
        """(rows (n_train' + n_test', d), n_train', n_test', k', description) for the build benchmark."""
        m = self.features.shape[0]
        n_test = max(1, min(n_test, m // 5))
        n_train = min(n_train, m - n_test)
        k = min(k, n_train)
        rows = _rows(self.features, 0, n_train + n_test, self.features_path)
        return rows, n_train, n_test, k, f"features {os.path.basename(self.features_path)}: rows [0, {n_train}) " \
                                         f"train, [{n_train}, {n_train + n_test}) held out"


def _load_features(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise UserError(f"--features {path}: file not found")
    try:
        features = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as error:
        raise UserError(f"--features {path}: not a readable .npy file ({error})") from None
    if features.ndim != 2 or features.shape[0] < 2 or features.shape[1] < 1:
        raise UserError(f"--features {path}: need an (M, d) array with M >= 2, got shape {features.shape}")
    if not np.issubdtype(features.dtype, np.floating):
        raise UserError(f"--features {path}: need floating-point features, got {features.dtype}")
    return features


def _load_codebook(path: str) -> torch.Tensor:
    try:
        return u2.Codebook.load(path).vectors.float().contiguous()
    except (OSError, ValueError, TypeError) as error:
        raise UserError(f"--codebook: {error}") from None


def _rows(features: np.ndarray, start: int, stop: int, path: str) -> torch.Tensor:
    rows = torch.from_numpy(np.array(features[start:stop], dtype=np.float32))  # a copy: the mmap is read-only
    if not torch.isfinite(rows).all():
        raise UserError(f"--features {path}: rows [{start}, {stop}) contain NaN or Inf")
    return rows


@contextlib.contextmanager
def serving(module: Any, queries: torch.Tensor, codebook: Optional[torch.Tensor] = None) -> Iterator[None]:
    """Within the block, ``module``'s data generator (``siglip_like``) returns the user's arrays.

    The per-op scripts draw their data with one ``siglip_like(k, n_queries, d, seed=...)`` call;
    they are run with exactly the user's K, N and d, and a call asking for other sizes is an error,
    so no synthetic data can slip in unnoticed.
    """
    original = module.siglip_like

    def user_data(k: int, n_queries: int, d: int, *args: Any, **kwargs: Any) -> SyntheticCodebookData:
        expected = (n_queries, d) if codebook is None else (k, n_queries, d)
        given = tuple(queries.shape) if codebook is None else (codebook.shape[0], *queries.shape)
        if expected != given:
            raise RuntimeError(f"{module.__name__} asked for data of shape {expected}, the user data has {given}")
        return SyntheticCodebookData(codebook, queries, None, None)

    module.siglip_like = user_data
    try:
        yield
    finally:
        module.siglip_like = original


# ----------------------------------------------------------------------------------------------
# the FAISS HNSW baseline of the hierarchical benchmark


def hnsw_rows(codebook: torch.Tensor, queries: torch.Tensor, repeats: int, warmup: int,
              stamp: Dict[str, Any]) -> List[Dict[str, Any]]:
    """FAISS IndexHNSWFlat(d, 32) at each efSearch, in bench_hierarchical's row format.

    codebook: (K, d), queries: (N, d), fp32 CPU. recall@1 is measured against u2.nearest (exact);
    codes_per_query is the distance computations per query that FAISS counts (hnsw_stats.ndis).
    """
    import faiss

    k, d = codebook.shape
    n = queries.shape[0]
    xs, cs = queries.numpy(), codebook.numpy()
    progress = tqdm(total=1 + len(HNSW_EF_SEARCH), desc="faiss_hnsw", file=sys.stderr)
    progress.set_postfix_str("exact ids + HNSW build")
    exact_ids, _ = u2.nearest(queries, codebook)
    index = faiss.IndexHNSWFlat(d, HNSW_M)
    start = time.perf_counter()
    index.add(cs)
    build_s = time.perf_counter() - start
    progress.update()
    rows = []
    for ef_search in HNSW_EF_SEARCH:
        progress.set_postfix_str(f"efSearch={ef_search}")
        index.hnsw.efSearch = ef_search
        faiss.cvar.hnsw_stats.reset()
        index.search(xs, 1)
        distances_per_query = faiss.cvar.hnsw_stats.ndis / max(1, n)
        with _common.RssPeak() as memory:
            times, (_, ids) = _common.time_calls(lambda: index.search(xs, 1), repeats, warmup)
        q = _common.quantiles(times)
        rows.append({
            "method": "faiss_hnsw", "nprobe": None, "ef_search": ef_search,
            "K": k, "N": n, "d": d, "n_coarse": None, "dtype": "float32",
            "recall_at_1": float((torch.from_numpy(ids[:, 0]) == exact_ids).double().mean()),
            **q, "repeats": len(times), "queries_per_s": n / q["median_s"],
            "codes_per_query": distances_per_query,
            "peak_extra_mib": memory.extra_mib,
            "build_s": build_s,
            "device": stamp["cpu"], "threads": stamp["threads"], "torch": stamp["torch"], "faiss": stamp["faiss"],
            "triton": stamp["triton"], "numpy": stamp["numpy"], "date": stamp["date"],
            "note": f"IndexHNSWFlat(d, {HNSW_M}), efConstruction {index.hnsw.efConstruction}; "
                    "codes/query = distance computations",
        })
        progress.update()
    progress.close()
    return rows


# ----------------------------------------------------------------------------------------------
# running the ops


def _cpu_methods(op: str, module: Any) -> List[str]:
    """The CPU methods of nearest, hierarchical, cross_entropy or kmeans (embedding takes --device)."""
    if op == "hierarchical":
        return [m for m in module.ALL_METHODS if m not in module.GPU_METHODS]
    if op == "kmeans":
        return [m for m in module.METHODS if not m.endswith(("cuda", "gpu"))]
    return list(module.CPU_METHODS)


def _common_argv(op: str, module: Any, args: argparse.Namespace) -> List[str]:
    argv = ["--threads", str(args.threads), "--out", args.out]
    if op in BUILT_IN_OPS:  # CPU only, its own built-in data
        return argv
    if op == "embedding":
        return argv + ["--device", args.device]
    if args.device == "cpu":
        argv += ["--methods", *_cpu_methods(op, module)]
    return argv


def _user_argv(op: str, module: Any, mode_argv: List[str], user: UserData, seed: int):
    """(argv, queries, codebook or None, description) that run ``op`` at its mode's settings on the user's data."""
    base = module.parse_args(mode_argv)
    if op == "kmeans":
        rows, n_train, n_test, k, source = user.build_data(base.n_train, base.n_test, base.k)
        argv = ["--k", str(k), "--n-train", str(n_train), "--n-test", str(n_test), "--d", str(rows.shape[1]),
                "--niter", str(base.niter)]
        return argv, rows, None, source
    k_wanted = max(base.k) if isinstance(base.k, list) else base.k
    n_wanted = max(base.n) if isinstance(base.n, list) else base.n
    codebook, queries, source = user.search_data(k_wanted, n_wanted, seed)
    k, n, d = codebook.shape[0], queries.shape[0], codebook.shape[1]
    argv = ["--k", str(k), "--n", str(n), "--d", str(d), "--repeats", str(base.repeats), "--warmup", str(base.warmup)]
    if op == "hierarchical":
        # the mode's cell count, fewer cells (about sqrt K) for a codebook smaller than the mode's
        n_coarse = base.n_coarse if k >= base.k else max(1, min(base.n_coarse, round(math.sqrt(k))))
        argv += ["--niter", str(base.niter), "--n-coarse", str(n_coarse)]
    return argv, queries, codebook, source


def run_op(op: str, module: Any, args: argparse.Namespace, user: UserData, stamp: Dict[str, Any]) -> str:
    """Run one op's benchmark into args.out; its printed output goes to OUT/<op>.log.

    Returns the description of its data.
    """
    mode_argv = SIZE_ARGS[args.mode][op]
    source = BUILT_IN_DATA if op in BUILT_IN_OPS else "synthetic"
    queries = codebook = None
    if user.used_by(op):
        size_argv, queries, codebook, source = _user_argv(op, module, mode_argv, user, args.seed)
    else:
        size_argv = mode_argv
    argv = size_argv + _common_argv(op, module, args)
    log_path = os.path.join(args.out, f"{op}.log")
    with open(log_path, "w") as log, contextlib.redirect_stdout(log):
        print(f"$ bench_{op}.py {' '.join(argv)}\ndata: {source}\n", flush=True)
        with serving(module, queries, codebook) if queries is not None else contextlib.nullcontext():
            rc = module.main(argv)
        if rc != 0:
            raise RuntimeError(f"bench_{op}.main returned {rc}")
        if op == "hierarchical":
            run_hnsw(module, argv, codebook, queries, stamp)
    return source


def run_hnsw(module: Any, argv: List[str], codebook: Optional[torch.Tensor], queries: Optional[torch.Tensor],
             stamp: Dict[str, Any]) -> None:
    """The HNSW rows on the codebook and queries the hierarchical benchmark just used."""
    hier = module.parse_args(argv)
    if codebook is None:
        # the same seeded call as bench_hierarchical.run: the same tensors
        data = module.siglip_like(hier.k, hier.n, hier.d, seed=hier.seed)
        codebook, queries = data.codebook, data.queries
        del data
    rows = hnsw_rows(codebook, queries, hier.repeats, hier.warmup, stamp)
    print(module.markdown_table([{**r, "nprobe": r["ef_search"], "ratio_vs_faiss_ivf": None,
                                  "ratio_vs_u2_flat": None} for r in rows]).replace("nprobe", "efSearch"))
    _common.write_csv(rows, os.path.join(hier.out, "hierarchical_hnsw.csv"))


# ----------------------------------------------------------------------------------------------
# aggregation


def _read_csv(path: str) -> List[Dict[str, Any]]:
    """CSV rows with numbers parsed (int where exact, else float) and empty cells as None."""
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            rows.append({key: _parse(value) for key, value in raw.items()})
    return rows


def _parse(value: str) -> Any:
    if value == "":
        return None
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _details(*pairs: Tuple[str, Any, str]) -> str:
    return "; ".join(f"{name} {format(value, spec)}" for name, value, spec in pairs if value is not None)


def _row(op: str, r: Dict[str, Any], **fields: Any) -> Dict[str, Any]:
    """A results.csv row: the common columns from ``r`` where it has them, ``fields`` for the rest."""
    row = {column: None for column in COLUMNS}
    row.update({key: r.get(key) for key in ("method", "K", "N", "d", "dtype", "device", "median_s", "p10_s", "p90_s",
                                            "gflops", "peak_extra_mib", "build_s", "threads", "date")})
    row.update(op=op, **fields)
    if row["ratio_vs_baseline"] is None:  # e.g. faiss_gpu absent: no baseline was measured
        row["baseline"] = None
    return row


def normalise(op: str, rows: List[Dict[str, Any]],
              extra: Optional[List[Dict[str, Any]]] = None) -> List[Dict[str, Any]]:
    """One op's CSV rows as results.csv rows (``extra``: hierarchical's HNSW rows)."""
    out = []
    if op == "nearest":
        for r in rows:
            gpu = r["method"] in ("triton_bf16", "triton_fp32", "torch_cublas_bf16", "torch_cublas_fp32", "faiss_gpu")
            out.append(_row(op, r, setting="", shape=f"K={r['K']} N={r['N']} d={r['d']}",
                            throughput=r["queries_per_s"], throughput_unit="queries/s", recall=r["ids_agree_exact"],
                            baseline="faiss_gpu" if gpu else "faiss_flat", ratio_vs_baseline=r["ratio_vs_faiss"],
                            details=_details(("× torch", r["ratio_vs_torch"], ".3g"),
                                             ("ids = FAISS", r["ids_agree_faiss"], ".4f"),
                                             ("max dist err", r["max_dist_err"], ".3g"))))
    elif op == "nearest_data":
        for r in rows:
            out.append(_row(op, r, setting=r["case"], shape=f"K={r['K']} N={r['N']} d={r['d']}",
                            throughput=r["queries_per_s"], throughput_unit="queries/s",
                            recall=None,  # this benchmark measures agreement with FAISS, not with a float64 scan
                            baseline="faiss_flat", ratio_vs_baseline=r["ratio_vs_faiss"],
                            details=_details(("min s", r["min_s"], ".4g"), ("ids = FAISS", r["ids_agree_faiss"], ".4f"))))
    elif op == "grouped":
        for r in rows:
            out.append(_row(op, r, setting=r["case"], shape=f"G={r['G']} K={r['K']} N={r['N']} d={r['d']}",
                            dtype="float32", device="cpu", median_s=r["median_s"],
                            throughput=r["queries_per_s"], throughput_unit="queries/s",
                            gflops=2.0 * r["N"] * r["K"] * r["d"] / r["median_s"] / 1e9,
                            recall=None,  # agreement with FAISS, not with a float64 scan (u2's is exact)
                            baseline="faiss PQ compute_codes", ratio_vs_baseline=r["ratio_vs_faiss_pq"],
                            details=_details(("min s", r["min_s"], ".4g"), ("ids = FAISS", r["ids_agree_faiss"], ".4f"),
                                             ("mismatch gap", r["mismatch_gap"], ".2g"))))
    elif op == "hierarchical":
        rows = rows + (extra or [])
        median = {(r["method"], r["nprobe"]): r["median_s"] for r in rows if r["method"] != "faiss_hnsw"}
        for r in rows:
            hnsw = r["method"] == "faiss_hnsw"
            if hnsw:
                setting, baseline = f"efSearch={r['ef_search']}", "faiss_flat"
            elif r["nprobe"] is not None:
                setting, baseline = f"nprobe={r['nprobe']}", "faiss_ivf"
            else:
                setting, baseline = "exact", "faiss_flat"
            reference = median.get((baseline, None if baseline == "faiss_flat" else r["nprobe"]))
            flat = median.get(("u2_flat", None))
            codes = r["codes_per_query"]
            out.append(_row(op, r, setting=setting,
                            shape=f"K={r['K']} N={r['N']} d={r['d']}" + ("" if hnsw else f" n_coarse={r['n_coarse']}"),
                            throughput=r["queries_per_s"], throughput_unit="queries/s",
                            # the codewords actually compared: the rate of the scan, not of a full search
                            gflops=2.0 * r["N"] * codes * r["d"] / r["median_s"] / 1e9 if codes and not hnsw else None,
                            recall=r["recall_at_1"], baseline=baseline,
                            ratio_vs_baseline=_ratio(reference, r["median_s"]),
                            details=_details(("codes/query", codes, ",.0f"), ("× u2_flat", _ratio(flat, r["median_s"]), ".3g"))))
    elif op == "embedding":
        for r in rows:
            out.append(_row(op, r, setting=f"{r['unique_ids']:,.0f} unique ids",
                            shape=f"K={r['K']} N={r['N']} d={r['d']}", dtype="float32",
                            throughput=r["steps_per_s"], throughput_unit="steps/s",
                            baseline="torch_dense", ratio_vs_baseline=r["ratio_vs_dense"], build_s=r["first_step_s"],
                            details=_details(("× SparseAdam", r["ratio_vs_sparse_adam"], ".3g"),
                                             ("grad+state MiB", r["grad_state_mib"], ",.1f"),
                                             ("max |Δ| vs dense", r["max_abs_diff_vs_dense"], ".2g"))))
    elif op == "cross_entropy":
        for r in rows:
            out.append(_row(op, r, setting="fwd+bwd", shape=f"K={r['K']} N={r['N']} h={r['hidden']}", d=r["hidden"],
                            throughput=r["rows_per_s"], throughput_unit="rows/s",
                            baseline="torch_bf16" if r["dtype"] == "bfloat16" else "torch",
                            ratio_vs_baseline=r["ratio_vs_torch"],
                            details=_details(("naive N×K MiB", r["naive_nk_bytes"] / _common.MIB, ",.1f"),
                                             ("loss diff", r["loss_abs_diff_vs_torch"], ".2g"),
                                             ("grad rel err", r["grad_rel_err_vs_torch"], ".2g"))))
    elif op == "kmeans":
        for r in rows:
            out.append(_row(op, r, setting=f"niter={r['niter']}",
                            shape=f"k={r['k']} n_train={r['n_train']} d={r['d']}", K=r["k"], N=r["n_train"],
                            dtype="float32", median_s=r["build_s"], throughput=r["n_train"] / r["build_s"],
                            throughput_unit="train rows/s", gflops=2.0 * r["gmac"] / r["build_s"],
                            baseline="faiss", ratio_vs_baseline=r["speedup_vs_faiss"],
                            details=_details(("held-out MSE", r["heldout_mse"], ".5g"),
                                             ("MSE / FAISS", r["mse_ratio_vs_faiss"], ".4f"),
                                             ("utilisation", r["utilisation"], ".4f"))))
    return out


def _ratio(reference: Optional[float], value: float) -> Optional[float]:
    return reference / value if reference else None


def key_rows(op: str, rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The rows results.md shows: all of them, except hierarchical's sweeps, reduced to each
    method's fastest setting at each recall level (and its best recall when it reaches none)."""
    if op != "hierarchical":
        return rows
    keep = [r for r in rows if r["setting"] == "exact"]
    for method in dict.fromkeys(r["method"] for r in rows if r["setting"] != "exact"):
        sweep = [r for r in rows if r["method"] == method]
        chosen = []
        for level in RECALL_LEVELS:
            reaching = [r for r in sweep if r["recall"] >= level]
            if reaching:
                chosen.append(max(reaching, key=lambda r: r["throughput"]))
        if not chosen or max(r["recall"] for r in chosen) < max(r["recall"] for r in sweep):
            chosen.append(max(sweep, key=lambda r: (r["recall"], r["throughput"])))
        keep.extend(dict((id(r), r) for r in sorted(chosen, key=lambda r: r["recall"])).values())
    return keep


def _num(value: Optional[float], spec: str, suffix: str = "") -> str:
    return "–" if value is None else format(value, spec) + suffix


def _throughput(value: Optional[float], unit: str) -> str:
    if value is None:
        return "–"
    return f"{value:,.0f} {unit}" if value >= 100 else f"{value:.3g} {unit}"


def summary_cells(r: Dict[str, Any]) -> List[str]:
    baseline = f" ({r['baseline']})" if r["ratio_vs_baseline"] is not None else ""
    return [
        r["method"], r["setting"] or "–", r["shape"], _num(r["median_s"], ".4g"),
        _throughput(r["throughput"], r["throughput_unit"]),
        _num(r["gflops"], ".1f"), _num(r["recall"], ".4f"), _num(r["ratio_vs_baseline"], ".2f", "×") + baseline,
        _num(r["peak_extra_mib"], ",.1f"),
    ]


TITLES = {
    "nearest": "Exact nearest codeword (u2 vs FAISS IndexFlatL2 vs torch)",
    "nearest_data": "Exact nearest codeword on real photographs and adversarial data (u2 vs FAISS IndexFlatL2)",
    "grouped": "Multi-codebook encoding, G = 8 sub-codebooks (u2.nearest_grouped, MultiCodebookQuantizer, "
               "G x u2.nearest vs FAISS ProductQuantizer.compute_codes)",
    "hierarchical": "Hierarchical search (u2 vs FAISS IVFFlat on the same cells, FAISS HNSW, exact)",
    "embedding": "C2 training step (row-sparse embedding + optimizer vs torch)",
    "cross_entropy": "Large-vocabulary cross-entropy, forward + backward (vs plain torch)",
    "kmeans": "Codebook build (two-stage u2.build_codebook vs faiss.Kmeans)",
}
NOTES = {
    "nearest": "recall@1: ids equal to the exact (float64) nearest codeword. × baseline: FAISS's median time "
               "over the method's (> 1: faster).",
    "nearest_data": "Photographs: patches of the pictures scikit-image ships; clustered, near-duplicates: "
                    "u2.data's stress generators. u2's ids are the exact float64 argmin (FAISS's differ on near "
                    "ties: 'ids = FAISS' in results.csv). × baseline: FAISS's median time over u2's; the worst "
                    "row is the one to read.",
    "grouped": "Same sub-codebooks as FAISS's PQ centroids. u2's ids are the exact float64 argmin per group; "
               "'ids = FAISS' and the float64 distance excess of FAISS's differing codes ('mismatch gap') in "
               "results.csv. × baseline: FAISS PQ's median time over the method's; the worst row is the one to read.",
    "hierarchical": "Each approximate method's fastest setting reaching recall@1 ≥ 0.9 / 0.95 / 0.99 (full sweep: "
                    "hierarchical.md, hierarchical_hnsw.csv). × baseline: faiss_ivf at the same nprobe, or "
                    "faiss_flat for exact search and HNSW. GFLOP/s of the scanned codewords only.",
    "embedding": "One step: gather, backward, optimizer. Setting: distinct ids per step (Zipf). × baseline: "
                 "torch_dense (nn.Embedding + AdamW) median over the method's.",
    "cross_entropy": "Peak extra memory is the process RSS growth; the naive logits size is in results.csv "
                     "(details). × baseline: naive torch.",
    "kmeans": "Median = one build's seconds. GFLOP/s from each method's own multiply-add count. Quality "
             "(held-out MSE, MSE / FAISS, utilisation) in results.csv (details).",
}


def markdown(results: Dict[str, List[Dict[str, Any]]], sources: Dict[str, str], stamp_line: str, mode: str) -> str:
    lines = [f"# unicode2_fast benchmarks ({mode})", "", stamp_line, ""]
    for op, rows in results.items():
        lines += [f"## {op}: {TITLES[op]}", "", f"data: {sources[op]}", "",
                  "| " + " | ".join(SUMMARY_COLUMNS) + " |", "|" + "---|" * len(SUMMARY_COLUMNS)]
        lines += ["| " + " | ".join(summary_cells(r)) + " |" for r in key_rows(op, rows)]
        lines += ["", NOTES[op], f"Full table: {op}.md.", ""]
    if _common.plotting_available():
        lines += ["![results](results.png)", ""]
    return "\n".join(lines)


def text_table(results: Dict[str, List[Dict[str, Any]]]) -> str:
    header = ("op",) + SUMMARY_COLUMNS
    body = [[op] + summary_cells(r) for op, rows in results.items() for r in key_rows(op, rows)]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *body)]
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(cells) for cells in body])


# ----------------------------------------------------------------------------------------------
# the summary figure


def _panel_nearest(ax, rows: List[Dict[str, Any]]) -> None:
    ks = sorted({r["K"] for r in rows})
    ns = sorted({r["N"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    if len(ks) > 1:
        for i, method in enumerate(methods):
            for j, n in enumerate(ns):
                mine = sorted((r for r in rows if r["method"] == method and r["N"] == n), key=lambda r: r["K"])
                ax.plot([r["K"] for r in mine], [r["throughput"] for r in mine], marker="o", color=f"C{i}",
                        linestyle=("-", "--", ":", "-.")[j % 4], label=f"{method}, N={n}")
        ax.set_xscale("log")
        ax.set_xlabel("codebook size K (log scale)")
    else:
        shapes = [(r["method"], r["N"]) for r in rows]
        bars = ax.bar(range(len(rows)), [r["throughput"] for r in rows],
                      color=[f"C{methods.index(m)}" for m, _ in shapes])
        ax.bar_label(bars, labels=[f"{r['throughput']:,.0f}" for r in rows], fontsize=7, padding=2)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([f"{m}\nN={n}" for m, n in shapes], fontsize=7)
        ax.set_xlabel(f"method (K={ks[0]:,})")
    ax.set_yscale("log")
    ax.set_ylabel("queries / s (log, higher is better)")
    ax.set_title(f"exact nearest codeword, d={rows[0]['d']}", fontsize=9)
    if len(ks) > 1:
        ax.legend(fontsize=7)
    else:
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color=f"C{i}", label=method) for i, method in enumerate(methods)], fontsize=7)


def _panel_hierarchical(ax, rows: List[Dict[str, Any]]) -> None:
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        if mine[0]["setting"] == "exact":
            ax.scatter([r["recall"] for r in mine], [r["throughput"] for r in mine], marker="*", s=120,
                       label=f"{method} (exact)", zorder=3)
            continue
        ax.plot([r["recall"] for r in mine], [r["throughput"] for r in mine], marker="o", markersize=4, label=method)
        for r in mine:
            ax.annotate(r["setting"].split("=")[1], (r["recall"], r["throughput"]), textcoords="offset points",
                        xytext=(3, 3), fontsize=6)
    ax.set_yscale("log")
    ax.set_xlabel("recall@1 (labels: nprobe / efSearch)")
    ax.set_ylabel("queries / s (log, higher is better)")
    ax.set_title(f"hierarchical search, {rows[0]['shape']}", fontsize=9)
    ax.legend(fontsize=7)


def _panel_embedding(ax, rows: List[Dict[str, Any]]) -> None:
    ms = [1e3 * r["median_s"] for r in rows]
    whiskers = [[1e3 * (r["median_s"] - r["p10_s"]) for r in rows], [1e3 * (r["p90_s"] - r["median_s"]) for r in rows]]
    bars = ax.bar([r["method"] for r in rows], ms, yerr=whiskers, capsize=4,
                  color=[f"C{i}" for i in range(len(rows))], label="median step (p10–p90)")
    ax.bar_label(bars, labels=[f"{m:.3g} ms" for m in ms], fontsize=7, padding=2)
    ax.set_yscale("log")
    ax.set_xlabel("method")
    ax.set_ylabel("step time, ms (log, lower is better)")
    ax.set_title(f"C2 training step, {rows[0]['shape']}", fontsize=9)
    ax.legend(fontsize=7)


def _panel_cross_entropy(ax, rows: List[Dict[str, Any]]) -> None:
    mib = [max(r["peak_extra_mib"] or 0.0, 1e-3) for r in rows]
    bars = ax.bar(range(len(rows)), mib, color=[f"C{i}" for i in range(len(rows))], label="peak extra memory")
    ax.bar_label(bars, labels=[f"{m:,.0f}" for m in mib], fontsize=7, padding=2)
    naive = [r["N"] * r["K"] * 4 / _common.MIB for r in rows]
    for i, value in enumerate(naive):
        ax.hlines(value, i - 0.4, i + 0.4, colors="k", linestyles="--", label="N×K fp32 logits" if i == 0 else None)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{r['method']}\nK={r['K']:,}, N={r['N']}" for r in rows], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylim(min(mib + naive) / 10, max(mib + naive) * 10)
    ax.set_xlabel("method")
    ax.set_ylabel("peak extra memory, MiB (log, lower is better)")
    ax.set_title(f"large-vocab CE fwd+bwd, h={rows[0]['d']}", fontsize=9)
    ax.legend(fontsize=7)


PANELS = (("nearest", _panel_nearest), ("hierarchical", _panel_hierarchical), ("embedding", _panel_embedding),
          ("cross_entropy", _panel_cross_entropy))


def plot_summary(results: Dict[str, List[Dict[str, Any]]], stamp: Dict[str, Any], mode: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))
    for ax, (op, draw) in zip(axes.flat, PANELS):
        if results.get(op):
            draw(ax, results[op])
            ax.grid(which="both", alpha=0.3)
        else:
            ax.text(0.5, 0.5, f"{op}: not run", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
    device = stamp["cpu"] + (f" + {stamp['gpu']}" if stamp["gpu"] else "")
    fig.suptitle(f"unicode2_fast benchmarks ({mode}) | {device}, {stamp['threads']} CPU threads\n"
                 f"torch {stamp['torch']}, faiss {stamp['faiss']}, triton {stamp['triton']}, numpy {stamp['numpy']}, "
                 f"python {stamp['python']} | {stamp['date']}", fontsize=10)
    fig.tight_layout()
    _common.save_figure(fig, path, dpi=110)


# ----------------------------------------------------------------------------------------------
# driver


EPILOG = """examples:
  unicode2-fast bench --quick                          every op at small sizes (~1.5 min on 2 cores)
  unicode2-fast bench                                  every op at full size (K = 500K): long
  unicode2-fast bench --only nearest hierarchical --features feats.npy
  unicode2-fast bench --codebook c1.safetensors --only nearest --quick --out my_bench
outputs: OUT/results.csv, results.md, results.png, and each op's <op>.csv/.md/.png/.log"""


def build_parser(prog: str = "run_all.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run every benchmark (nearest, nearest_data, grouped, hierarchical, embedding, cross_entropy, kmeans) in one process\n"
                    "and write each op's CSV/Markdown/PNG plus results.csv, results.md and results.png.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="small sizes per op, about 1.5 minutes on 2 cores")
    size.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="each op's default sizes, K = 500K (the default)")
    size.add_argument("--tiny", dest="mode", action="store_const", const="tiny",
                      help="every op's --tiny smoke-test size (seconds)")
    parser.set_defaults(mode="full")
    parser.add_argument("--only", nargs="+", choices=OPS, metavar="OP",
                        help=f"run only these ops (of {', '.join(OPS)}); they run in that order")
    parser.add_argument("--features", metavar="FILE.npy",
                        help="your (M, d) patch features: the first K rows are the codebook and the next N the "
                             "queries of nearest/hierarchical; kmeans trains on them")
    parser.add_argument("--codebook", metavar="FILE",
                        help="a u2.Codebook .safetensors: the codebook of nearest/hierarchical")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="CPU threads for torch and FAISS alike (default: torch's current setting)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="cpu: CPU methods only; cuda: the GPU methods as well "
                             "(default: cuda when available, else cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --codebook queries")
    parser.add_argument("--out", default="bench_out", help="output directory (default bench_out/)")
    return parser


def _check(args: argparse.Namespace) -> None:
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    if args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")


def main(argv: Optional[Sequence[str]] = None, prog: str = "run_all.py") -> int:
    """Run the selected ops, aggregate, plot and print the summary.

    Returns 0 when every op ran, 1 when some failed (the others still run and are reported), and
    2 for a user mistake (one line on stderr).
    """
    parser = build_parser(prog)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    name = parser.prog
    try:
        _check(args)
        user = UserData(args.features, args.codebook)
    except UserError as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        return 2

    import faiss

    ops = [op for op in OPS if op in (args.only or OPS)]
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    stamp = _common.machine_stamp()
    for op in ops:
        unused = [flag for flag, given, takers in (("--features", args.features, FEATURE_OPS),
                                                   ("--codebook", args.codebook, CODEBOOK_OPS))
                  if given and op not in takers]
        if unused:
            print(f"note: {op} does not take {' / '.join(unused)}: it runs on its synthetic data")

    results: Dict[str, List[Dict[str, Any]]] = {}
    sources: Dict[str, str] = {}
    failed: List[str] = []
    overall = tqdm(ops, desc=f"bench ({args.mode})", unit="op", file=sys.stderr)
    for op in overall:
        overall.set_postfix_str(op)
        module = importlib.import_module(f"{__package__}.bench_{op}")
        start = time.perf_counter()
        try:
            sources[op] = run_op(op, module, args, user, stamp)
        except UserError as error:
            overall.close()
            print(f"{name}: error: {error}", file=sys.stderr)
            return 2
        except Exception as error:  # one op's failure must not lose the others' results
            with open(os.path.join(args.out, f"{op}.log"), "a") as log:
                traceback.print_exc(file=log)
            tqdm.write(f"{op}: FAILED ({type(error).__name__}: {error}); traceback in "
                       f"{os.path.join(args.out, op + '.log')}", file=sys.stderr)
            failed.append(op)
            continue
        tqdm.write(f"{op}: {time.perf_counter() - start:.1f} s, data: {sources[op]}", file=sys.stderr)
        extra = _read_csv(os.path.join(args.out, "hierarchical_hnsw.csv")) if op == "hierarchical" else None
        rows = normalise(op, _read_csv(os.path.join(args.out, f"{op}.csv")), extra)
        results[op] = [{**row, "data": sources[op]} for row in rows]
    overall.close()

    for rows in results.values():
        for row in rows:
            row.update({key: stamp[key] for key in ("torch", "faiss", "triton", "numpy", "python")})
            row["date"] = row["date"] or stamp["date"]
    stamp_line = (f"CPU: {stamp['cpu']} ({stamp['cores']} cores, {args.threads} threads)"
                  + (f" | GPU: {stamp['gpu']}" if stamp["gpu"] else "")
                  + f" | torch {stamp['torch']}, faiss {stamp['faiss']}, triton {stamp['triton']}, "
                    f"numpy {stamp['numpy']}, python {stamp['python']} | {stamp['date']}")
    written = []
    if results:
        _common.write_csv([row for rows in results.values() for row in rows], os.path.join(args.out, "results.csv"))
        _common.write_text(markdown(results, sources, stamp_line, args.mode), os.path.join(args.out, "results.md"))
        written = ["results.csv", "results.md"]
        if _common.plotting_available():
            plot_summary(results, stamp, args.mode, os.path.join(args.out, "results.png"))
            written.append("results.png")
        else:
            print(_common.NO_PLOT_NOTE)
        print()
        print(text_table(results))
        for op, source in sources.items():
            if user.used_by(op):
                print(f"{op} ran on your data: {source}")
    print()
    print(stamp_line)
    if written:
        print(f"wrote {', '.join(os.path.join(args.out, name) for name in written)} (+ per-op files)")
    if failed:
        print(f"{name}: {len(failed)} op(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
