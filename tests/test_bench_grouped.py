"""Smoke test of bench/bench_grouped.py at the --tiny size: every case runs, u2's ids are the exact
float64 argmin per group (checked here), FAISS's PQ codes are decoded correctly, and the table
with a ratio against FAISS in every row is written."""
import importlib.util

import torch

from reference import objective64

BENCH_NAME = "bench_grouped"


def test_tiny_run_writes_the_table(tiny_run):
    rc, out = tiny_run
    assert rc == 0
    table = (out / "grouped.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    n_cases = 4 if importlib.util.find_spec("skimage") else 3  # the photographs need scikit-image
    assert len(rows) == 4 * n_cases  # four methods per case
    assert all(line.split("|")[7].strip().endswith("x") for line in rows)


def test_cases_are_searched_exactly_and_faiss_codes_decode(bench):
    import unicode2_fast as u2

    for name, x, codebooks in bench.cases(40, 4, 64, 48):
        ids, _ = u2.nearest_grouped(x, codebooks)
        for g in range(codebooks.shape[0]):
            assert torch.equal(ids[:, g], objective64(x[:, g], codebooks[g], "l2").min(dim=1).indices), name
        pq = bench._faiss_pq(codebooks)
        theirs = bench._unpack(pq.compute_codes(x.reshape(x.shape[0], -1).numpy()), 4, 6)
        assert bench._mismatch_gap(x, codebooks, ids, theirs) >= 0.0, name  # FAISS is never strictly nearer
        assert float((theirs == ids).double().mean()) > 0.5, name  # the unpacking reads FAISS's codes
