"""Smoke test of bench/bench_kmeans.py at the --tiny size: both modes run and write well-formed CSVs."""
import csv

import pytest
import torch

BENCH_NAME = "bench_kmeans"


def _run(bench, argv):
    threads = torch.get_num_threads()
    try:
        return bench.main(argv)
    finally:
        torch.set_num_threads(threads)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_tiny_comparison_writes_one_row_per_cpu_method(bench, tmp_path):
    assert _run(bench, ["--tiny", "--out", str(tmp_path), "--methods", "u2", "faiss"]) == 0
    all_rows = _rows(tmp_path / "kmeans.csv")
    assert sorted((r["data"], r["method"]) for r in all_rows) == [
        ("photos", "faiss"), ("photos", "u2"), ("synthetic", "faiss"), ("synthetic", "u2")]
    photos = {r["method"]: r for r in all_rows if r["data"] == "photos"}
    assert all(r["d"] == "192" for r in photos.values())  # 8x8x3 patches of real photographs
    assert float(photos["u2"]["mse_ratio_vs_faiss"]) < 1.2
    rows = {r["method"]: r for r in all_rows if r["data"] == "synthetic"}
    assert sorted(rows) == ["faiss", "u2"]
    for column in ("k", "n_coarse", "n_train", "n_test", "d", "niter", "build_s", "heldout_mse", "utilisation",
                   "gmac", "mse_ratio_vs_faiss", "speedup_vs_faiss", "peak_extra_mib", "device", "threads",
                   "torch", "faiss", "date"):
        assert column in rows["u2"], column
    for r in rows.values():
        assert (r["k"], r["n_train"], r["n_test"], r["d"], r["niter"]) == ("64", "4000", "500", "64", "5")
        assert float(r["build_s"]) > 0 and float(r["heldout_mse"]) > 0
        assert 0 < float(r["utilisation"]) <= 1
    assert rows["u2"]["n_coarse"] == "8" and rows["faiss"]["n_coarse"] == ""
    assert float(rows["faiss"]["mse_ratio_vs_faiss"]) == pytest.approx(1.0)
    # the two-stage build lands near single-stage k-means on held-out data
    assert float(rows["u2"]["mse_ratio_vs_faiss"]) < 1.1
    # the two-stage cost model: far fewer multiply-adds than one stage at the same k
    assert float(rows["u2"]["gmac"]) < float(rows["faiss"]["gmac"])
    markdown = (tmp_path / "kmeans.md").read_text()
    assert "| photos | u2 |" in markdown and "| synthetic | u2 |" in markdown


def test_tiny_scaled_streams_and_extrapolates(bench, tmp_path, capsys):
    assert _run(bench, ["--tiny", "--scaled", "--no-progress", "--allocation", "size", "--out", str(tmp_path)]) == 0
    (row,) = _rows(tmp_path / "kmeans_scaled.csv")
    assert (row["m"], row["k"], row["d"]) == ("20000", "500", "64")
    assert int(row["passes"]) == 3  # scan + assignment + one fine batch
    assert float(row["net_build_s"]) > 0 and float(row["peak_rss_gib"]) > 0
    assert float(row["paper_est_s"]) > float(row["net_build_s"])
    out = capsys.readouterr().out
    assert "MAC = niter*min(M, p*n_coarse)*n_coarse*d" in out and "paper:" in out


def test_cost_model_matches_the_paper_numbers(bench):
    # coarse 20*256,000*1,000*1,152 + assign 150M*1,000*1,152 + fine 20*128M*500*1,152
    expected = 20 * 256_000 * 1000 * 1152 + 150_000_000 * 1000 * 1152 + 20 * 128_000_000 * 500 * 1152
    assert bench.two_stage_macs(150_000_000, 500_000, 1000, 1152, 20, 256) == pytest.approx(expected)
    assert bench.one_stage_macs(150_000_000, 500_000, 1152, 20, 256) == pytest.approx(20 * 128_000_000 * 500_000 * 1152)
