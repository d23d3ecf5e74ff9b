"""The command line: every command, its one-line user errors (status 2), Ctrl-C (status 130),
tracebacks for everything else, and outputs that are written all or nothing."""
import ast
import errno
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

import unicode2_fast
from unicode2_fast import cli
from unicode2_fast.codebook import Codebook
from unicode2_fast.cli import tokenize as tokenize_command

PACKAGE = pathlib.Path(unicode2_fast.__file__).parent


def _one_line_error(capsys, argv, *needles, command=None):
    """Run ``argv``: status 2, and stderr exactly one line ``unicode2-fast <command>: error: ...``
    holding every needle; returns that line."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.endswith("\n") and err.count("\n") == 1, err
    command = argv[0] if command is None else command
    prefix = f"unicode2-fast {command}: error: " if command else "unicode2-fast: error: "
    assert err.startswith(prefix), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err.rstrip("\n")


@pytest.fixture()
def features(tmp_path):
    path = tmp_path / "features.npy"
    np.save(path, np.random.default_rng(0).standard_normal((120, 8)).astype(np.float32))
    return str(path)


@pytest.fixture()
def a_file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("not a folder")
    return str(path)


@pytest.fixture()
def read_only(tmp_path, monkeypatch):
    """A folder nobody may write into (as root, where permission bits do not bind, os.access is
    told so: a read-only file system answers the same)."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode, **kw: (
            False if os.path.abspath(path) == str(folder) and mode & os.W_OK else real_access(path, mode, **kw)))
    yield str(folder)
    folder.chmod(0o755)


@pytest.fixture()
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("b.png", "a.png"):
        (folder / name).write_bytes(b"")  # listed by extension; the fake tokenizer never reads them
    return str(folder)


class _FakeTokenizer:
    """Stands in for SiglipTokenizer: ids without a model."""

    @classmethod
    def from_pretrained(cls, siglip_path, codebook, *, device, metric):
        return cls()

    def tokenize(self, paths, batch_size):
        return torch.arange(len(paths) * 4).reshape(len(paths), 4)


@pytest.fixture()
def fake_tokenizer(monkeypatch):
    monkeypatch.setattr(tokenize_command, "SiglipTokenizer", _FakeTokenizer)


def _tokenize_argv(images, out):
    return ["tokenize", images, "--siglip", "model", "--codebook", "c.safetensors", "--out", str(out)]


def _train_argv(tmp_path, out):
    codebook = tmp_path / "c.safetensors"
    codebook.write_bytes(b"")
    return ["train", "--llm", str(tmp_path), "--codebook", str(codebook), "--ids", "ids.npy",
            "--captions", "c.jsonl", "--out", str(out)]


# --------------------------------------------------------------------------------------------
# the commands


def test_kernels_report_lists_nearest_for_sm90(capsys):
    assert cli.main(["kernels", "--arch", "90", "--only", "nearest"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("nearest")]
    assert {line.split()[1] for line in lines} == {"bf16", "fp16", "fp32"}
    bf16 = next(line for line in lines if line.split()[1] == "bf16").split()
    assert bf16[2] == "sm_90" and bf16[3] == "yes" and bf16[5] == "0"  # wgmma, no spill bytes


def test_profile_nearest_writes_a_chrome_trace_in_a_new_folder(tmp_path, capsys):
    out = tmp_path / "new" / "traces"  # missing folders are created
    assert cli.main(["profile", "nearest", "--k", "3000", "--n", "20", "--d", "32", "--out", str(out)]) == 0
    traces = list(out.glob("trace_nearest_cpu_*.json"))
    assert len(traces) == 1 and sorted(os.listdir(out)) == [traces[0].name]  # no temporary file left
    names = {event.get("name") for event in json.loads(traces[0].read_text())["traceEvents"]}
    assert {"nearest", "nearest/torch"} <= names
    # a filter, the flat path, the bf16 or the direct scan
    assert names & {"nearest/filter_scan", "nearest/flat", "nearest/bf16_scan", "nearest/direct"}
    assert "wrote" in capsys.readouterr().out


def test_build_codebook_writes_a_loadable_codebook_in_a_new_folder(features, tmp_path, capsys):
    out = tmp_path / "new" / "cb.safetensors"
    argv = ["build-codebook", features, "--k", "12", "--n-coarse", "3", "--niter", "4", "--out", str(out),
            "--no-progress", "--checkpoint-dir", str(tmp_path / "ckpt")]
    assert cli.main(argv) == 0
    codebook = Codebook.load(out)
    assert (codebook.k, codebook.dim, codebook.meta["n_coarse"], codebook.meta["niter"]) == (12, 8, 3, 4)
    assert codebook.meta["n_features"] == 120 and os.listdir(tmp_path / "ckpt")
    assert "wrote" in capsys.readouterr().out


def test_tokenize_writes_ids_and_names_in_a_new_folder(images, fake_tokenizer, tmp_path, capsys):
    out = tmp_path / "new" / "ids.npy"
    assert cli.main(_tokenize_argv(images, out)) == 0
    np.testing.assert_array_equal(np.load(out), np.arange(8).reshape(2, 4))
    assert json.loads((tmp_path / "new" / "ids.json").read_text()) == ["a.png", "b.png"]
    assert sorted(os.listdir(out.parent)) == ["ids.json", "ids.npy"]  # no temporary files left
    assert "wrote" in capsys.readouterr().out


def test_bench_hands_everything_after_bench_to_run_all(monkeypatch, tmp_path):
    from unicode2_fast.bench import run_all

    seen = []
    monkeypatch.setattr(run_all, "main", lambda argv, prog: seen.append((argv, prog)) or 0)
    argv = ["--tiny", "--only", "nearest", "--out", str(tmp_path / "new" / "out")]
    assert cli.main(["bench", *argv]) == 0
    assert seen == [(argv, "unicode2-fast bench")]


@pytest.mark.parametrize("command", ["build-codebook", "tokenize", "train", "profile", "bench"])
def test_help_of_every_command_says_missing_folders_are_created(command, capsys):
    argv = [command, "--help"] if command != "profile" else [command, "nearest", "--help"]
    assert cli.main(argv) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert out.startswith(f"usage: unicode2-fast {command}") and "created" in out


def test_top_level_help_and_python_dash_m():
    done = subprocess.run([sys.executable, "-m", "unicode2_fast", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    for command in cli.COMMANDS:
        assert command in done.stdout


# --------------------------------------------------------------------------------------------
# user mistakes: one line, status 2, nothing written


def test_unknown_and_missing_command_are_one_line(capsys):
    _one_line_error(capsys, ["frobnicate"], "invalid choice", "frobnicate", command="")
    _one_line_error(capsys, [], "required", command="")


@pytest.mark.parametrize("argv, needles", [
    (["build-codebook", "{features}", "--out", "{tmp}/cb.safetensors"], ["the following arguments are required: --k"]),
    (["build-codebook", "{features}", "--k", "five", "--out", "{tmp}/cb.safetensors"], ["--k", "invalid int value"]),
    (["build-codebook", "{features}", "--k", "0", "--out", "{tmp}/cb.safetensors"], ["--k", "must be >= 1, got 0"]),
    (["build-codebook", "{features}", "--k", "4", "--bogus", "--out", "{tmp}/cb.safetensors"],
     ["unrecognized arguments: --bogus"]),
    (["tokenize", "{tmp}", "--siglip", "m", "--out", "{tmp}/ids.npy"], ["required: --codebook"]),
    (["tokenize", "{tmp}", "--siglip", "m", "--codebook", "c", "--out", "o", "--batch-size", "0"],
     ["--batch-size", "must be >= 1"]),
    (["train", "--llm", "x"], ["required"]),
    (["train", "--llm", "x", "--codebook", "c", "--ids", "i", "--captions", "c", "--out", "o", "--steps", "0"],
     ["--steps", "must be >= 1, got 0"]),
    (["train", "--llm", "x", "--codebook", "c", "--ids", "i", "--captions", "c", "--out", "o", "--lr", "-1"],
     ["--lr", "must be > 0"]),
    (["profile", "nearest", "--k", "-5"], ["--k", "must be >= 1, got -5"]),
    (["profile", "nearest", "--k", "0"], ["--k", "must be >= 1, got 0"]),
    (["profile", "nearest", "--d", "0"], ["--d", "must be >= 1, got 0"]),
    (["profile", "nearest", "--n", "-1"], ["--n", "must be >= 1, got -1"]),
    (["profile", "everything"], ["invalid choice: 'everything'"]),
    (["kernels", "--arch", "-5"], ["--arch", "between 75 and 121", "got -5"]),
    (["kernels", "--arch", "7"], ["--arch", "between 75 and 121", "got 7"]),
    (["kernels", "--arch", "sm90"], ["--arch", "invalid int value"]),
    (["kernels", "--only", "bogus"], ["--only", "unknown kernel(s) bogus", "available:", "nearest"]),
    (["kernels", "extra"], ["unrecognized arguments: extra"]),
    (["bench", "--only", "bogus"], ["--only", "invalid choice: 'bogus'"]),
    (["bench", "--bogus"], ["unrecognized arguments: --bogus"]),
])
def test_argument_mistakes_are_one_line(argv, needles, features, tmp_path, capsys):
    argv = [arg.format(features=features, tmp=tmp_path) for arg in argv]
    _one_line_error(capsys, argv, *needles)
    assert not (tmp_path / "cb.safetensors").exists() and not (tmp_path / "ids.npy").exists()


def test_build_codebook_input_mistakes_are_one_line(features, tmp_path, capsys):
    out = str(tmp_path / "cb.safetensors")
    _one_line_error(capsys, ["build-codebook", str(tmp_path / "missing.npy"), "--k", "4", "--out", out],
                    "features file not found", "missing.npy")
    _one_line_error(capsys, ["build-codebook", str(tmp_path), "--k", "4", "--out", out], "is a folder")
    _one_line_error(capsys, ["build-codebook", features, "--k", "500", "--out", out, "--no-progress"],
                    "k=500 exceeds the number of feature rows (120)")
    _one_line_error(capsys, ["build-codebook", features, "--k", "4", "--n-coarse", "5", "--out", out],
                    "--n-coarse 5 must not exceed --k 4")
    np.save(tmp_path / "ints.npy", np.arange(40).reshape(20, 2))
    _one_line_error(capsys, ["build-codebook", str(tmp_path / "ints.npy"), "--k", "4", "--out", out, "--no-progress"],
                    "float")
    assert not os.path.exists(out)


def test_build_codebook_checkpoint_dir_that_is_a_file(features, a_file, tmp_path, capsys):
    out = tmp_path / "cb.safetensors"
    _one_line_error(capsys, ["build-codebook", features, "--k", "4", "--out", str(out), "--checkpoint-dir", a_file],
                    f"--checkpoint-dir {a_file}: exists and is not a folder")
    assert not out.exists()


def test_tokenize_out_that_is_a_folder(images, fake_tokenizer, tmp_path, capsys):
    _one_line_error(capsys, _tokenize_argv(images, tmp_path), f"--out {tmp_path}: is a folder")
    _one_line_error(capsys, _tokenize_argv(images, tmp_path / "ids.json"), "the names go to", "another extension")
    (tmp_path / "ids.json").mkdir()  # the names file's place is taken by a folder
    _one_line_error(capsys, _tokenize_argv(images, tmp_path / "ids.npy"), "names file", "ids.json", "is a folder")
    assert not (tmp_path / "ids.npy").exists()


def test_train_out_that_is_a_file(a_file, tmp_path, capsys):
    _one_line_error(capsys, _train_argv(tmp_path, a_file), f"--out {a_file}: exists and is not a folder")


def test_bench_out_below_a_file(a_file, monkeypatch, capsys):
    from unicode2_fast.bench import run_all

    monkeypatch.setattr(run_all, "main", lambda argv, prog: pytest.fail("run_all must not start"))
    _one_line_error(capsys, ["bench", "--tiny", "--out", f"{a_file}/sub"], f"--out {a_file}/sub", "is not a folder")


def test_out_below_a_file_for_every_file_output(features, images, fake_tokenizer, a_file, tmp_path, capsys):
    _one_line_error(capsys, ["build-codebook", features, "--k", "4", "--out", f"{a_file}/cb.safetensors"],
                    "is not a folder")
    _one_line_error(capsys, _tokenize_argv(images, f"{a_file}/ids.npy"), "is not a folder")
    _one_line_error(capsys, ["profile", "nearest", "--out", f"{a_file}/traces"], "is not a folder")


def test_read_only_out_folders_are_refused_up_front(features, images, fake_tokenizer, read_only, tmp_path,
                                                    monkeypatch, capsys):
    from unicode2_fast.bench import run_all

    monkeypatch.setattr(run_all, "main", lambda argv, prog: pytest.fail("run_all must not start"))
    needle = f"folder {read_only} is not writable"
    _one_line_error(capsys, ["build-codebook", features, "--k", "4", "--out", f"{read_only}/cb.safetensors"], needle)
    _one_line_error(capsys, ["build-codebook", features, "--k", "4", "--out", str(tmp_path / "cb.safetensors"),
                             "--checkpoint-dir", f"{read_only}/ckpt"], needle)
    _one_line_error(capsys, _tokenize_argv(images, f"{read_only}/new/ids.npy"), needle)
    _one_line_error(capsys, _train_argv(tmp_path, f"{read_only}/run"), needle)
    _one_line_error(capsys, ["profile", "nearest", "--out", read_only], needle)
    _one_line_error(capsys, ["bench", "--out", f"{read_only}/out"], needle)
    assert os.listdir(read_only) == [] and not (tmp_path / "cb.safetensors").exists()


def test_profile_cuda_without_gpu_is_one_line_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    _one_line_error(capsys, ["profile", "nearest", "--device", "cuda"], "--device cuda")


def test_tokenize_and_train_missing_inputs_are_one_line(tmp_path, capsys):
    _one_line_error(capsys, _tokenize_argv(str(tmp_path / "nope"), tmp_path / "ids.npy"), "image folder not found", "nope")
    _one_line_error(capsys, ["train", "--llm", str(tmp_path / "nope"), "--codebook", "c", "--ids", "i",
                             "--captions", "c", "--out", str(tmp_path / "run")], "LLM directory not found")
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------
# failed saves: the target is named, nothing partial is left


def test_tokenize_writes_ids_and_names_all_or_nothing(images, fake_tokenizer, tmp_path, monkeypatch, capsys):
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith(".json"):
            raise OSError(errno.ENOSPC, "No space left on device", src)  # the error names the temp file
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    line = _one_line_error(capsys, _tokenize_argv(images, tmp_path / "ids.npy"),
                           f"cannot write {tmp_path / 'ids.json'}: No space left on device")
    assert ".tmp" not in line
    assert sorted(os.listdir(tmp_path)) == ["images"]  # neither ids.npy nor a temporary file


def test_tokenize_interrupted_while_writing_leaves_nothing(images, fake_tokenizer, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dumps", interrupted)  # while the names file is written
    assert cli.main(_tokenize_argv(images, tmp_path / "ids.npy")) == 130
    assert "Traceback" not in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["images"]


def test_a_failed_codebook_save_names_the_target(features, tmp_path, monkeypatch, capsys):
    from unicode2_fast import _io

    def replace(src, dst):
        raise PermissionError(errno.EACCES, "Permission denied", src)

    monkeypatch.setattr(_io.os, "replace", replace)
    out = tmp_path / "cb.safetensors"
    line = _one_line_error(capsys, ["build-codebook", features, "--k", "4", "--out", str(out), "--no-progress"],
                           f"cannot write {out}: Permission denied")
    assert ".tmp" not in line
    assert sorted(os.listdir(tmp_path)) == ["features.npy"]


# --------------------------------------------------------------------------------------------
# Ctrl-C and real errors


_VALID_ARGV = {
    "kernels": ["kernels"],
    "bench": ["bench", "--tiny"],
    "build-codebook": ["build-codebook", "f.npy", "--k", "4", "--out", "c.safetensors"],
    "tokenize": ["tokenize", "images", "--siglip", "m", "--codebook", "c", "--out", "ids.npy"],
    "train": ["train", "--llm", "l", "--codebook", "c", "--ids", "i", "--captions", "c", "--out", "o"],
    "generate": ["generate", "--model", "m", "--prompt", "a cat", "--out", "img.png"],
    "profile": ["profile", "nearest"],
}


@pytest.mark.parametrize("command", sorted(_VALID_ARGV))
def test_ctrl_c_is_status_130_without_traceback(command, monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    assert set(_VALID_ARGV) == set(cli.COMMANDS)
    monkeypatch.setattr(cli.COMMANDS[command], "run", interrupted)
    assert cli.main(_VALID_ARGV[command]) == 130
    err = capsys.readouterr().err
    assert err == f"unicode2-fast {command}: interrupted\n"


def test_ctrl_c_during_a_build_is_130_and_writes_nothing(features, tmp_path, monkeypatch, capsys):
    from unicode2_fast import kmeans

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(kmeans, "build_codebook", interrupted)
    assert cli.main(["build-codebook", features, "--k", "4", "--out", str(tmp_path / "cb.safetensors")]) == 130
    assert "Traceback" not in capsys.readouterr().err and not (tmp_path / "cb.safetensors").exists()


def test_other_exceptions_keep_their_traceback(monkeypatch, tmp_path):
    from unicode2_fast.cli import profile as profile_command
    from unicode2_fast.kernels import compile as compile_module

    def broken(*args, **kwargs):
        raise RuntimeError("a bug, not a user mistake")

    monkeypatch.setattr(compile_module, "compile_report", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["kernels"])

    def value_error(*args, **kwargs):
        raise ValueError("a library ValueError nobody expected")

    monkeypatch.setattr(profile_command, "profile_nearest", value_error)
    with pytest.raises(ValueError, match="nobody expected"):  # no longer shown as a user error
        cli.main(["profile", "nearest", "--out", str(tmp_path)])


# --------------------------------------------------------------------------------------------
# layering


def absolute_imports(path, package):
    """The absolute name of every module (and imported name) an import statement of ``path``
    names; ``package``: the parts of the package holding the module, e.g. ["unicode2_fast", "models"]."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            prefix = ".".join(base + ([node.module] if node.module else []))
            yield prefix
            yield from (f"{prefix}.{alias.name}" for alias in node.names)


def test_no_library_module_imports_the_cli():
    checked = 0
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] in ("cli", "__main__.py"):
            continue
        package = ["unicode2_fast", *relative.parts[:-1]]
        for name in absolute_imports(path, package):
            assert not (name + ".").startswith("unicode2_fast.cli."), f"{relative} imports {name}"
        checked += 1
    assert checked > 10
