"""Smoke test of bench/bench_sparse_adamw.py at the --tiny size: every method steps, the CSV is
well formed, and u2's table after one step equals dense AdamW's (weight decay 0)."""
import csv

BENCH_NAME = "bench_sparse_adamw"


def test_tiny_run_writes_a_row_per_method(tiny_run):
    rc, out = tiny_run
    assert rc == 0
    with open(out / "sparse_adamw.csv", newline="") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"u2", "torch_dense", "torch_sparse"}
    for r in rows.values():
        assert float(r["median_s"]) > 0 and 0 < int(r["rows_touched"]) <= 100
    assert float(rows["u2"]["max_diff_vs_adamw"]) <= 1e-6
    assert all(r["untouched_rows_kept"] == "True" for r in rows.values())
    assert float(rows["torch_dense"]["ratio_vs_torch_dense"]) == 1.0
