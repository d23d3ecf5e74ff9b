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
