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


def test_missing_bench_script_is_one_line_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli, "_REPO_BENCH", tmp_path)
    assert cli.main(["bench", "--tiny"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("unicode2-fast: error: benchmark script")
