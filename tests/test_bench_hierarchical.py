"""Smoke test of bench/bench_hierarchical.py at the --tiny size: it runs, and its outputs are well formed."""
import csv

import pytest


BENCH_NAME = "bench_hierarchical"

NPROBES = [1, 2, 4, 8, 16]  # the sweep, capped at the tiny index's 16 cells


def _rows(out):
    with open(out / "hierarchical.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_tiny_run_writes_every_method_and_nprobe(tiny_run):
    rc, out = tiny_run
    assert rc == 0
    rows = _rows(out)
    cpu_rows = [r for r in rows if not r["method"].startswith("u2_hier_triton")]
    for method in ("u2_hier", "faiss_ivf", "faiss_ivf_own"):
        assert [int(r["nprobe"]) for r in cpu_rows if r["method"] == method] == NPROBES
    # FAISS's own build (faiss.Kmeans + IndexIVFFlat.add) is timed beside u2's
    own = [r for r in cpu_rows if r["method"] == "faiss_ivf_own"]
    assert all(float(r["build_s"]) > 0 and r["codes_per_query"] == "" for r in own)
    assert all(r["data"] == "synthetic" for r in cpu_rows)
    assert {r["method"] for r in cpu_rows if not r["nprobe"]} == {"u2_exact", "u2_flat", "faiss_flat"}
    for column in ("recall_at_1", "median_s", "p10_s", "p90_s", "queries_per_s", "codes_per_query",
                   "ratio_vs_faiss_ivf", "ratio_vs_u2_flat", "build_s", "n_coarse", "device", "threads",
                   "torch", "faiss", "date", "note"):
        assert column in rows[0], column
    for r in cpu_rows:
        assert (r["K"], r["N"], r["d"], r["n_coarse"]) == ("2000", "37", "64", "16")
        assert float(r["p10_s"]) <= float(r["median_s"]) <= float(r["p90_s"])
        assert float(r["queries_per_s"]) > 0 and 0.0 <= float(r["recall_at_1"]) <= 1.0
    ivf = {int(r["nprobe"]): r for r in cpu_rows if r["method"] == "faiss_ivf"}
    assert all(float(r["ratio_vs_faiss_ivf"]) == pytest.approx(1.0) for r in ivf.values())
    assert float(ivf[16]["codes_per_query"]) == 2000  # every cell probed


def test_tiny_run_recall(tiny_run):
    rows = _rows(tiny_run[1])
    exact = {r["method"]: float(r["recall_at_1"]) for r in rows if not r["nprobe"]}
    assert exact["u2_exact"] == 1.0 and exact["u2_flat"] == 1.0 and exact["faiss_flat"] >= 0.97
    for method in ("u2_hier", "faiss_ivf"):
        recalls = [float(r["recall_at_1"]) for r in rows if r["method"] == method]
        assert all(a <= b + 1e-9 for a, b in zip(recalls, recalls[1:])), (method, recalls)
        assert recalls[-1] >= 0.97  # all cells probed: exact up to fp32 near-ties
    # the same cells and the same probe order: u2 and FAISS find the same codewords
    u2_hier = [float(r["recall_at_1"]) for r in rows if r["method"] == "u2_hier"]
    faiss_ivf = [float(r["recall_at_1"]) for r in rows if r["method"] == "faiss_ivf"]
    assert max(abs(a - b) for a, b in zip(u2_hier, faiss_ivf)) <= 0.03


def test_tiny_run_writes_png_and_markdown(tiny_run, bench):
    out = tiny_run[1]
    assert (out / "hierarchical.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    markdown = (out / "hierarchical.md").read_text()
    assert "| " + " | ".join(bench.TABLE_COLUMNS) + " |" in markdown
    assert "faiss" in markdown and "torch" in markdown  # the version stamp
    assert not list(out.glob(".tmp-*"))


def test_size_presets(bench):
    args = bench.parse_args([])
    assert (args.k, args.n, args.d, args.n_coarse) == (500_000, 2916, 1152, 1000)
    assert bench.parse_args(["--quick"]).k == 50_000
    with pytest.raises(SystemExit):
        bench.parse_args(["--k", "10", "--n-coarse", "11"])


def test_tiny_clustered_data(bench, tmp_path):
    assert bench.main(["--tiny", "--data", "clustered", "--out", str(tmp_path),
                       "--methods", "u2_hier", "u2_exact", "u2_flat", "faiss_ivf_own"]) == 0
    rows = _rows(tmp_path)
    assert {r["data"] for r in rows} == {"clustered"}
    exact = {r["method"]: float(r["recall_at_1"]) for r in rows if not r["nprobe"]}
    assert exact == {"u2_exact": 1.0, "u2_flat": 1.0}


@pytest.mark.parametrize("metric", ["ip", "cos"])
def test_tiny_ip_and_cos(bench, tmp_path, metric):
    # the index, u2.nearest and FAISS (IndexFlatIP, IVF with METRIC_INNER_PRODUCT; unit rows for
    # cos) all search the same metric: the exact methods agree, and IVF on the same cells scanning
    # every cell finds the exact ids too
    assert bench.main(["--tiny", "--metric", metric, "--out", str(tmp_path), "--nprobe", "1", "16",
                       "--methods", "u2_hier", "u2_exact", "u2_flat", "faiss_flat", "faiss_ivf"]) == 0
    rows = _rows(tmp_path)
    assert {r["metric"] for r in rows} == {metric}
    recall = {(r["method"], r["nprobe"]): float(r["recall_at_1"]) for r in rows}
    assert recall[("u2_exact", "")] == recall[("u2_flat", "")] == 1.0
    assert recall[("faiss_flat", "")] >= 0.99
    assert recall[("u2_hier", "16")] >= 0.99 and recall[("faiss_ivf", "16")] >= 0.99
    assert recall[("u2_hier", "1")] == pytest.approx(recall[("faiss_ivf", "1")], abs=0.05)
