"""Smoke test of bench/bench_distributed.py at the --tiny size: 1 and 2 gloo processes run the
sharded search, their ids equal single-process u2.nearest (the script raises otherwise), the
sharded k-means builds the single-process codebook, and the table, the bytes per query and the
clearly labelled scaling model are written."""
BENCH_NAME = "bench_distributed"


def test_tiny_run_writes_the_table_and_the_model(tiny_run):
    rc, out = tiny_run
    assert rc == 0
    text = (out / "distributed.md").read_text()
    search = text.split("## C2 training step")[0]
    rows = [line for line in search.splitlines() if line.startswith("| ") and "---" not in line]
    measured = [r for r in rows if r.split("|")[1].strip() in ("1", "2")]
    assert len(measured) == 2 and all(r.split("|")[7].strip() == "True" for r in measured)
    assert "MODEL (not a measurement)" in text
    c2 = text.split("## C2 training step")[1].split("## two-stage")[0]
    steps = [r for r in c2.splitlines() if r.startswith("| ") and r.split("|")[1].strip() in ("1", "2")]
    assert len(steps) == 4 and all(r.split("|")[5].strip() == "True" for r in steps)  # both modes, same table
    kmeans = text.split("## two-stage k-means")[1].split("MODEL")[0]
    built = [r for r in kmeans.splitlines() if r.startswith("| ") and r.split("|")[1].strip() in ("1", "2")]
    assert len(built) == 2 and all(float(r.split("|")[7]) < 1.01 for r in built)  # as good as one process
    assert (out / "distributed.csv").read_text().count("u2.distributed.nearest") == 2


def test_model_counts_the_all_gather_bytes(bench):
    rows = bench.model_rows(500_000, 729, 1152, worlds=(8, 64))
    assert {r["gpus"] for r in rows} == {8, 64}
    for r in rows:
        assert r["bytes_per_query"] == (r["gpus"] - 1) * 16
        assert r["total_s"] == r["compute_s"] + r["comm_s"]
