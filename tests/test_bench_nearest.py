"""Smoke test of bench/bench_nearest.py at the --tiny size: it runs, and its outputs are well formed."""
import csv
import importlib

import pytest
import torch


BENCH_NAME = "bench_nearest"

CPU_METHODS = {"u2", "faiss_flat", "torch_matmul"}


def _rows(out):
    with open(out / "nearest.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_tiny_run_writes_one_row_per_method(tiny_run):
    rc, out = tiny_run
    assert rc == 0
    rows = _rows(out)
    cpu_rows = [r for r in rows if r["method"] in CPU_METHODS]
    assert sorted(r["method"] for r in cpu_rows) == sorted(CPU_METHODS)
    for column in ("median_s", "p10_s", "p90_s", "queries_per_s", "gflops", "ratio_vs_faiss", "ratio_vs_torch",
                   "ids_agree_faiss", "ids_agree_exact", "max_dist_err", "peak_extra_mib", "naive_nk_bytes",
                   "device", "threads", "torch", "faiss", "date", "note"):
        assert column in rows[0], column
    for r in cpu_rows:
        assert (r["K"], r["N"], r["d"]) == ("2000", "37", "64")
        assert float(r["median_s"]) > 0 and float(r["gflops"]) > 0
        assert float(r["p10_s"]) <= float(r["median_s"]) <= float(r["p90_s"])
        assert int(r["naive_nk_bytes"]) == 37 * 2000 * 4
        assert float(r["peak_extra_mib"]) >= 0
    by_method = {r["method"]: r for r in cpu_rows}
    assert float(by_method["faiss_flat"]["ratio_vs_faiss"]) == pytest.approx(1.0)
    assert float(by_method["torch_matmul"]["ratio_vs_torch"]) == pytest.approx(1.0)
    assert float(by_method["faiss_flat"]["build_s"]) >= 0 and float(by_method["u2"]["build_s"]) >= 0


def test_tiny_run_ids_agree(tiny_run):
    # well-separated synthetic data: every method finds the same codeword for every query
    by_method = {r["method"]: r for r in _rows(tiny_run[1])}
    u2_row = by_method["u2"]
    assert float(u2_row["ids_agree_faiss"]) >= 0.99
    assert float(u2_row["ids_agree_exact"]) == 1.0
    assert float(u2_row["max_dist_err"]) == 0.0
    for name in ("faiss_flat", "torch_matmul"):
        assert float(by_method[name]["ids_agree_exact"]) >= 0.99
        assert float(by_method[name]["max_dist_err"]) < 1e-2


def test_tiny_run_writes_png_and_markdown(tiny_run, bench):
    out = tiny_run[1]
    assert (out / "nearest.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    markdown = (out / "nearest.md").read_text()
    assert "| " + " | ".join(bench.TABLE_COLUMNS) + " |" in markdown
    assert "faiss" in markdown and "torch" in markdown  # the version stamp
    assert not list(out.glob(".tmp-*"))  # atomic writes leave no temporaries


def test_tiny_run_stdout(bench, tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--tiny", "--methods", "u2", "faiss_flat", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    stdout = capsys.readouterr().out
    assert "| method | K | N |" in stdout
    if not torch.cuda.is_available():
        assert "GPU part skipped: no CUDA device" in stdout
    assert {r["method"] for r in _rows(tmp_path)} == {"u2", "faiss_flat"}


def test_matmul_argmin_chunks_and_keeps_lowest_index(bench):
    # chunks of 3 codewords over K = 8; codewords 2 and 6 tie exactly: the lower index wins
    codebook = torch.tensor([[5.0, 0], [0, 5], [1, 1], [4, 4], [-3, 0], [0, -3], [1, 1], [9, 9]])
    x = torch.tensor([[1.0, 1.0], [0.0, -2.5]])
    ids, dists, chunk = bench.matmul_argmin(x, codebook, max_score_bytes=3 * 4 * x.shape[0])
    assert chunk == 3
    assert ids.tolist() == [2, 5]
    assert dists.tolist() == pytest.approx([0.0, 0.25])


def test_write_csv_is_atomic_and_fills_missing(bench, tmp_path):
    _common = bench._common
    path = tmp_path / "rows.csv"
    _common.write_csv([{"a": 1, "b": None}, {"a": 2, "c": "x"}], str(path))
    with open(path, newline="") as f:
        assert list(csv.DictReader(f)) == [{"a": "1", "b": "", "c": ""}, {"a": "2", "b": "", "c": "x"}]
    assert [p.name for p in tmp_path.iterdir()] == ["rows.csv"]


def test_gpu_peak_table():
    common = importlib.import_module("unicode2_fast.bench._common")
    assert common.gpu_peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.0
    assert common.gpu_peak_tflops("NVIDIA H100 PCIe", "float32") == 51.0
    assert common.gpu_peak_tflops("NVIDIA H200", "float16") == 989.0
    assert common.gpu_peak_tflops(None, "bfloat16") is None
    assert common.gpu_peak_tflops("Some GPU", "bfloat16") is None


def test_cpu_rows_have_no_peak_share(tiny_run):
    rc, out = tiny_run
    assert all(r["pct_of_peak"] == "" for r in _rows(out))
