"""Smoke test of bench/bench_nearest_data.py at the --tiny size: every real / adversarial case
runs, u2's ids are exact (checked against float64 here), and the Markdown table is written."""
import pytest

from reference import assert_nearest_ok

BENCH_NAME = "bench_nearest_data"


def test_tiny_run_writes_the_table(tiny_run):
    pytest.importorskip("skimage")
    rc, out = tiny_run
    assert rc == 0
    table = (out / "nearest_data.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 13
    assert all(line.split("|")[7].strip().endswith("x") for line in rows)  # a ratio in every row


def test_cases_are_searched_exactly(bench):
    pytest.importorskip("skimage")
    import unicode2_fast as u2

    for name, codebook, queries in bench.cases(0.02):
        ids, dists = u2.nearest(queries, codebook)
        assert_nearest_ok(ids, dists, queries, codebook, "l2", exact=True, rel_tol=2e-7)


@pytest.mark.parametrize("metric", ["ip", "cos"])
def test_tiny_run_with_another_metric(bench, metric, tmp_path):
    # against faiss.IndexFlatIP (normalised rows for cos), into OUT/nearest_data_<metric>.*
    pytest.importorskip("skimage")
    import torch

    threads = torch.get_num_threads()
    try:
        assert bench.main(["--tiny", "--metric", metric, "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    table = (tmp_path / f"nearest_data_{metric}.md").read_text()
    assert f"metric {metric}" in table.splitlines()[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 13 and all(line.split("|")[7].strip().endswith("x") for line in rows)
    assert (tmp_path / f"nearest_data_{metric}.csv").exists()


def test_cos_cases_leave_out_zero_rows_and_are_searched_exactly(bench):
    pytest.importorskip("skimage")
    import unicode2_fast as u2

    for name, codebook, queries in bench.cases(0.02):
        codebook, queries = bench._nonzero_rows(codebook), bench._nonzero_rows(queries)
        assert bool((codebook.norm(dim=1) > 0).all()) and bool((queries.norm(dim=1) > 0).all())
        for metric in ("ip", "cos"):
            ids, dists = u2.nearest(queries, codebook, metric=metric)
            assert_nearest_ok(ids, dists, queries, codebook, metric, rel_tol=1e-9, abs_tol=1e-9)
