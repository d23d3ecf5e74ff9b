"""Smoke test of bench/bench_cross_entropy.py at the --tiny size: it runs, and its outputs are well formed."""
import csv

import pytest
import torch


BENCH_NAME = "bench_cross_entropy"

CPU_METHODS = {"u2", "torch"}


def _rows(out):
    with open(out / "cross_entropy.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_tiny_run_writes_one_row_per_method(tiny_run):
    rc, out = tiny_run
    assert rc == 0
    rows = _rows(out)
    cpu_rows = [r for r in rows if r["method"] in CPU_METHODS]
    assert sorted(r["method"] for r in cpu_rows) == sorted(CPU_METHODS)
    for column in ("median_s", "p10_s", "p90_s", "rows_per_s", "gflops", "ratio_vs_torch", "loss",
                   "loss_abs_diff_vs_torch", "grad_rel_err_vs_torch", "peak_extra_mib", "naive_nk_bytes",
                   "device", "threads", "torch", "triton", "date", "note"):
        assert column in rows[0], column
    for r in cpu_rows:
        assert (r["K"], r["N"], r["hidden"], r["dtype"]) == ("2000", "37", "64", "float32")
        assert float(r["median_s"]) > 0 and float(r["gflops"]) > 0
        assert float(r["p10_s"]) <= float(r["median_s"]) <= float(r["p90_s"])
        assert int(r["naive_nk_bytes"]) == 37 * 2000 * 4
        assert float(r["peak_extra_mib"]) >= 0
    by_method = {r["method"]: r for r in cpu_rows}
    assert float(by_method["torch"]["ratio_vs_torch"]) == pytest.approx(1.0)
    assert "chunked" in by_method["u2"]["note"]


def test_tiny_run_agrees_with_torch(tiny_run):
    by_method = {r["method"]: r for r in _rows(tiny_run[1])}
    u2_row = by_method["u2"]
    # random logits of unit scale over 2000 classes: the loss is about log(2000)
    assert abs(float(u2_row["loss"]) - 7.6) < 1.0
    assert float(u2_row["loss_abs_diff_vs_torch"]) < 1e-5
    assert float(u2_row["grad_rel_err_vs_torch"]) < 1e-5


def test_tiny_run_writes_png_and_markdown(tiny_run, bench):
    out = tiny_run[1]
    assert (out / "cross_entropy.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    markdown = (out / "cross_entropy.md").read_text()
    assert "| " + " | ".join(bench.TABLE_COLUMNS) + " |" in markdown
    assert "torch" in markdown and "triton" in markdown  # the version stamp
    assert not list(out.glob(".tmp-*"))  # atomic writes leave no temporaries


def test_tiny_run_stdout_and_method_subset(bench, tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--tiny", "--methods", "u2", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    stdout = capsys.readouterr().out
    assert "| method | K | N | h |" in stdout
    if not torch.cuda.is_available():
        assert "GPU part skipped: no CUDA device" in stdout
    rows = _rows(tmp_path)
    assert [r["method"] for r in rows] == ["u2"]
    assert rows[0]["ratio_vs_torch"] == ""  # no baseline measured in this run


def test_default_and_quick_sizes(bench):
    args = bench.parse_args([])
    assert (args.k, args.n, args.hidden, args.gpu_n, args.gpu_hidden) == ([500_000], 512, 1024, 2916, 3584)
    assert bench.parse_args(["--quick"]).k == [50_000]
    with pytest.raises(SystemExit):
        bench.parse_args(["--quick", "--tiny"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--n", "0"])


def test_naive_baseline_is_f_cross_entropy(bench):
    hidden, weight, targets = bench.make_data(5, 11, 3, seed=1)
    expected = torch.nn.functional.cross_entropy(hidden.double() @ weight.double().t(), targets)
    torch.testing.assert_close(bench.naive_cross_entropy(hidden, weight, targets).double(), expected,
                               rtol=1e-6, atol=1e-6)
