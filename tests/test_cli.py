"""The command line: kernels report, bench pass-through, errors as one line with status 2."""
import pytest

from unicode2_fast import cli


def test_kernels_report_lists_nearest_for_sm90(capsys):
    assert cli.main(["kernels", "--arch", "90", "--only", "nearest"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("nearest")]
    assert {line.split()[1] for line in lines} == {"bf16", "fp16", "fp32"}
    bf16 = next(line for line in lines if line.split()[1] == "bf16").split()
    assert bf16[2] == "sm_90" and bf16[3] == "yes" and bf16[5] == "0"  # wgmma, no spill bytes


def test_unknown_command_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["frobnicate"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_profile_nearest_writes_a_chrome_trace(tmp_path, capsys):
    import json

    assert cli.main(["profile", "nearest", "--k", "3000", "--n", "20", "--d", "32", "--out", str(tmp_path)]) == 0
    traces = list(tmp_path.glob("trace_nearest_cpu_*.json"))
    assert len(traces) == 1
    names = {event.get("name") for event in json.loads(traces[0].read_text())["traceEvents"]}
    assert {"nearest", "nearest/torch", "nearest/filter_scan"} <= names


def test_profile_cuda_without_gpu_is_one_line_error(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert cli.main(["profile", "nearest", "--device", "cuda"]) == 2
    assert capsys.readouterr().err.startswith("unicode2-fast: error: --device cuda")


def test_build_codebook_command_missing_file_is_one_line(tmp_path, capsys):
    assert cli.main(["build-codebook", str(tmp_path / "nope.npy"), "--k", "4", "--out", str(tmp_path / "c.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "features file not found" in err[0]


def test_tokenize_command_missing_folder_is_one_line(tmp_path, capsys):
    pytest.importorskip("transformers")
    argv = ["tokenize", str(tmp_path / "nope"), "--siglip", str(tmp_path), "--codebook", str(tmp_path / "c.safetensors"),
            "--out", str(tmp_path / "ids.npy")]
    assert cli.main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and "nope" in err[0]


def test_train_command_missing_llm_is_one_line(tmp_path, capsys):
    pytest.importorskip("transformers")
    argv = ["train", "--llm", str(tmp_path / "nope"), "--codebook", str(tmp_path / "c.safetensors"),
            "--ids", str(tmp_path / "ids.npy"), "--captions", str(tmp_path / "c.jsonl"), "--stage", "1",
            "--steps", "1", "--batch-size", "1", "--out", str(tmp_path / "run")]
    assert cli.main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and err[0].startswith("unicode2-fast train: error:")
