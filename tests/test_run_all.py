"""bench/run_all.py at the --tiny size: every op runs in one process and the aggregate is well formed."""
import csv
import importlib

import numpy as np
import pytest
import torch

from unicode2_fast import cli

OPS = ["nearest", "nearest_data", "grouped", "hierarchical", "embedding", "cross_entropy", "kmeans"]


@pytest.fixture(scope="module")
def run_all():
    return importlib.import_module("unicode2_fast.bench.run_all")


def _main(module, argv):
    threads = torch.get_num_threads()  # the benchmarks set the process-wide thread count
    try:
        return module.main(argv)
    finally:
        torch.set_num_threads(threads)


def _results(out):
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tiny_run(run_all, tmp_path_factory):
    out = tmp_path_factory.mktemp("run_all")
    return _main(run_all, ["--tiny", "--out", str(out)]), out


def test_tiny_run_writes_a_row_per_op_and_method(run_all, tiny_run):
    rc, out = tiny_run
    assert rc == 0
    rows = _results(out)
    assert list(dict.fromkeys(r["op"] for r in rows)) == OPS
    assert set(rows[0]) == set(run_all.COLUMNS)
    for r in rows:
        assert float(r["median_s"]) > 0 and float(r["throughput"]) > 0, r
        assert r["torch"] == torch.__version__ and r["date"]
        assert r["data"] == (run_all.BUILT_IN_DATA if r["op"] in ("nearest_data", "grouped") else "synthetic")
    methods = {op: {r["method"] for r in rows if r["op"] == op} for op in OPS}
    assert methods["nearest"] == {"u2", "faiss_flat", "torch_matmul"}
    # real photographs and the stress cases, each timed against FAISS in the same run
    assert methods["nearest_data"] == {"u2", "faiss_flat"}
    settings = [r["setting"] for r in rows if r["op"] == "nearest_data" and r["method"] == "u2"]
    assert sum("photos" in c for c in settings) >= 3 and any("clustered" in c for c in settings)
    assert methods["grouped"] == {"u2.nearest_grouped", "u2.MultiCodebookQuantizer", "G x u2.nearest",
                                  "faiss PQ compute_codes"}
    assert {r["setting"] for r in rows if r["op"] == "grouped"} >= {"gaussian", "near-duplicates + exact ties"}
    assert {"u2_hier", "faiss_ivf", "faiss_hnsw", "u2_flat"} <= methods["hierarchical"]
    assert methods["embedding"] == {"u2", "torch_dense", "torch_sparse"}
    assert methods["kmeans"] == {"u2", "faiss"}
    hnsw = [r for r in rows if r["method"] == "faiss_hnsw"]
    assert [r["setting"] for r in hnsw] == [f"efSearch={ef}" for ef in run_all.HNSW_EF_SEARCH]
    assert all(0.0 <= float(r["recall"]) <= 1.0 for r in rows if r["op"] == "hierarchical")
    # every row names its baseline and the baseline's own row has ratio 1
    for r in rows:
        if r["method"] == r["baseline"]:
            assert float(r["ratio_vs_baseline"]) == pytest.approx(1.0)


def test_tiny_run_writes_markdown_plots_and_per_op_files(tiny_run):
    _, out = tiny_run
    md = (out / "results.md").read_text()
    for op in OPS:
        assert f"\n## {op}: " in md
        assert (out / f"{op}.csv").is_file() and (out / f"{op}.md").is_file() and (out / f"{op}.log").is_file()
    assert "CPU: " in md and f"torch {torch.__version__}" in md  # the machine stamp
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for op in ("nearest", "hierarchical", "embedding", "cross_entropy"):
        assert (out / f"{op}.png").read_bytes()[:4] == b"\x89PNG"


def test_only_runs_the_named_op(run_all, tmp_path, capsys):
    assert _main(run_all, ["--tiny", "--only", "nearest", "--out", str(tmp_path)]) == 0
    assert {r["op"] for r in _results(tmp_path)} == {"nearest"}
    assert not (tmp_path / "hierarchical.csv").exists()
    md = (tmp_path / "results.md").read_text()
    assert "## nearest: " in md and "## hierarchical" not in md
    assert "nearest" in capsys.readouterr().out  # the terminal summary


def test_cuda_without_a_gpu_is_one_line_error(run_all, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert _main(run_all, ["--tiny", "--device", "cuda", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device cuda" in err[0] and "error" in err[0]
    assert not (tmp_path / "out").exists()


def test_features_file_feeds_nearest(run_all, tmp_path, capsys):
    features = np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32)
    np.save(tmp_path / "feats.npy", features)
    out = tmp_path / "out"
    assert _main(run_all, ["--tiny", "--only", "nearest", "--features", str(tmp_path / "feats.npy"),
                           "--out", str(out)]) == 0
    rows = _results(out)
    assert {r["method"] for r in rows} == {"u2", "faiss_flat", "torch_matmul"}
    # tiny asks for N = 37 queries: the first 263 rows are the codebook, the last 37 the queries
    assert {(r["K"], r["N"], r["d"]) for r in rows} == {("263", "37", "16")}
    assert all("feats.npy" in r["data"] for r in rows)
    assert all(float(r["recall"]) == 1.0 for r in rows)
    assert "nearest ran on your data: features feats.npy" in capsys.readouterr().out


def test_bad_features_file_is_one_line_error(run_all, tmp_path, capsys):
    np.save(tmp_path / "ints.npy", np.arange(20).reshape(10, 2))
    for path in (tmp_path / "missing.npy", tmp_path / "ints.npy"):
        assert _main(run_all, ["--tiny", "--features", str(path), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("run_all.py: error: --features")


def test_serving_refuses_a_shape_the_user_data_does_not_have(run_all):
    import types

    module = types.SimpleNamespace(__name__="bench_fake", siglip_like=None)
    queries, codebook = torch.zeros(5, 4), torch.zeros(9, 4)
    with run_all.serving(module, queries, codebook):
        assert module.siglip_like(9, 5, 4, seed=0).codebook is codebook
        with pytest.raises(RuntimeError, match="asked for data of shape"):
            module.siglip_like(10, 5, 4, seed=0)
    assert module.siglip_like is None


def test_cli_bench_help_lists_the_options(capsys):
    assert cli.main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: unicode2-fast bench")
    for option in ("--quick", "--full", "--only", "--features", "--codebook", "--threads", "--device", "--out"):
        assert option in out
    assert "examples:" in out and "unicode2-fast bench --quick" in out
