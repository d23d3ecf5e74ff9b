"""Smoke test of bench/bench_embedding.py at the --tiny size: it runs, and its outputs are well formed."""
import csv

import pytest
import torch


BENCH_NAME = "bench_embedding"

METHODS = {"u2", "torch_dense", "torch_sparse"}
COLUMNS = ("method", "K", "d", "N", "unique_ids", "loss", "min_s", "median_s", "p10_s", "p90_s", "p90_over_p10",
           "steps_per_s", "ratio_vs_dense", "ratio_vs_sparse_adam", "ratio_min_vs_sparse_adam", "grad_bytes", "state_bytes", "grad_state_mib", "peak_extra_mib", "first_step_s",
           "max_abs_diff_vs_dense", "repeats", "device", "threads", "torch", "triton", "date", "note")


def _rows(out):
    with open(out / "embedding.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_tiny_run_writes_one_row_per_method(tiny_run):
    rc, out = tiny_run
    assert rc == 0
    rows = _rows(out)
    assert sorted(r["method"] for r in rows) == sorted(METHODS)
    for column in COLUMNS:
        assert column in rows[0], column
    k, d, n = 2000, 64, 37
    for r in rows:
        assert (r["K"], r["d"], r["N"]) == (str(k), str(d), str(n))
        assert 1 <= float(r["unique_ids"]) < n  # Zipf ids: duplicates in every batch
        assert float(r["min_s"]) <= float(r["p10_s"]) <= float(r["median_s"]) <= float(r["p90_s"])
        assert float(r["p90_over_p10"]) == pytest.approx(float(r["p90_s"]) / float(r["p10_s"]))
        assert r["loss"] == "upstream"
        assert float(r["median_s"]) > 0 and float(r["first_step_s"]) > 0 and r["repeats"] == "3"
        assert float(r["peak_extra_mib"]) >= 0
        # every method keeps two fp32 K x d moments
        assert int(r["state_bytes"]) >= 2 * k * d * 4
    by_method = {r["method"]: r for r in rows}
    assert float(by_method["torch_dense"]["ratio_vs_dense"]) == pytest.approx(1.0)
    assert float(by_method["torch_sparse"]["ratio_vs_sparse_adam"]) == pytest.approx(1.0)
    assert float(by_method["torch_sparse"]["ratio_min_vs_sparse_adam"]) == pytest.approx(1.0)
    assert float(by_method["u2"]["ratio_min_vs_sparse_adam"]) == pytest.approx(
        float(by_method["torch_sparse"]["min_s"]) / float(by_method["u2"]["min_s"]))
    # the dense gradient is K x d; the row-sparse ones hold only the touched rows (+ their ids)
    assert int(by_method["torch_dense"]["grad_bytes"]) == k * d * 4
    assert int(by_method["u2"]["grad_bytes"]) <= n * (d * 4 + 8)
    # step 1 is the same AdamW update for every method (SparseAdam: up to its eps placement)
    assert float(by_method["u2"]["max_abs_diff_vs_dense"]) <= 1e-6
    assert float(by_method["torch_sparse"]["max_abs_diff_vs_dense"]) <= 1e-5


def test_tiny_run_writes_png_and_markdown(tiny_run, bench):
    out = tiny_run[1]
    assert (out / "embedding.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    markdown = (out / "embedding.md").read_text()
    assert "| " + " | ".join(bench.TABLE_COLUMNS) + " |" in markdown
    assert "torch" in markdown and "triton" in markdown  # the version stamp
    assert not list(out.glob(".tmp-*"))  # atomic writes leave no temporaries


def test_method_subset_and_stdout(bench, tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--tiny", "--methods", "u2", "torch_sparse", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    assert "| method | K | d | N |" in capsys.readouterr().out
    rows = _rows(tmp_path)
    assert {r["method"] for r in rows} == {"u2", "torch_sparse"}
    assert all(r["ratio_vs_dense"] == "" and r["max_abs_diff_vs_dense"] == "" for r in rows)


def test_product_loss_and_the_eager_row_update(bench, tmp_path):
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--tiny", "--methods", "u2", "u2_torch", "torch_dense", "--loss", "product",
                           "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = {r["method"]: r for r in _rows(tmp_path)}
    assert set(rows) == {"u2", "u2_torch", "torch_dense"} and all(r["loss"] == "product" for r in rows.values())
    assert "row update: torch" in rows["u2_torch"]["note"]
    # both row updates give step 1's AdamW update
    assert float(rows["u2"]["max_abs_diff_vs_dense"]) <= 1e-6
    assert float(rows["u2_torch"]["max_abs_diff_vs_dense"]) <= 1e-6


def test_zipf_batches_have_hot_ids(bench):
    batches = bench.zipf_batches(1000, 500, 2, 1.0, seed=0, device=torch.device("cpu"))
    assert len(batches) == 2 and all(b.shape == (500,) and b.dtype == torch.int64 for b in batches)
    ids = torch.cat(batches)
    assert int(ids.min()) >= 0 and int(ids.max()) < 1000
    counts = torch.bincount(ids)
    assert int(counts.max()) >= 50  # the hottest id: p ~ 1 / H(1000) ~ 13% of 1000 draws
    assert torch.equal(batches[0], bench.zipf_batches(1000, 500, 2, 1.0, seed=0, device=torch.device("cpu"))[0])


def test_sparse_tensor_bytes(bench):
    sparse = torch.sparse_coo_tensor(torch.tensor([[1, 4]]), torch.ones(2, 3), (6, 3), check_invariants=True)
    assert bench.tensor_bytes(sparse) == 2 * 8 + 6 * 4
    assert bench.tensor_bytes(torch.ones(6, 3)) == 18 * 4
