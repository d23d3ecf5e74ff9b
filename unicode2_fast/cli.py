"""Command line: ``unicode2-fast <command>`` (also ``python -m unicode2_fast <command>``).

Commands:
    kernels   ahead-of-time compile report of every Triton kernel (no GPU needed)
    bench     the main job: every op's benchmark vs FAISS and torch (unicode2_fast.bench.run_all), CSV/Markdown/PNG
    build-codebook   two-stage k-means codebook from a .npy of features
    tokenize  images folder -> codeword ids (.npy) with a SigLIP model and a codebook
    train     stage-1 (projector) / stage-2 (all, row-sparse C2) understanding training
    profile   torch-profiler Chrome trace of one op (with NVTX ranges under Nsight)

A user mistake (bad argument, missing file) prints one line on stderr and exits with status 2;
nothing here prints a traceback for those.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


class UserError(Exception):
    """A mistake in the command line or its inputs: reported as one line, exit status 2."""


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise UserError (one line, status 2) instead of printing the
    usage and exiting, for the commands that parse their own options."""

    def error(self, message: str):
        raise UserError(message)


def _cmd_kernels(args: argparse.Namespace) -> int:
    from .kernels.compile import compile_report, format_report

    rows = compile_report(arch=args.arch, kernels=args.only or None)
    print(format_report(rows))
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    from .profiling import profile_nearest

    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available")
    path = profile_nearest(args.out, k=args.k, n=args.n, d=args.d, device=args.device)
    print(f"wrote {path} (open in chrome://tracing or ui.perfetto.dev)")
    return 0


def _cmd_bench(args: argparse.Namespace, rest: List[str]) -> int:
    # bench/run_all.py owns the options (and --help): everything after "bench" goes to it
    from .bench import run_all

    return run_all.main(rest, prog="unicode2-fast bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unicode2-fast",
        description="Fast exact search and tooling for very large visual codebooks.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    kernels = sub.add_parser(
        "kernels",
        help="compile every Triton kernel ahead of time and report registers, spills, smem, wgmma",
        description="Compile every Triton kernel for a CUDA target without a GPU and print a table.",
        epilog="example: unicode2-fast kernels --arch 90",
    )
    kernels.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 for H100 (default 90)")
    kernels.add_argument("--only", nargs="*", help="kernel names to compile (default: all)")
    profile = sub.add_parser(
        "profile",
        help="write a torch-profiler Chrome trace of one op on synthetic data",
        description="Trace one op (u2 stage ranges included) with the torch profiler.",
        epilog="example: unicode2-fast profile nearest --k 50000 --n 729 --out traces",
    )
    profile.add_argument("op", choices=["nearest"], help="the op to profile")
    profile.add_argument("--k", type=int, default=50_000, help="codebook size (default 50000)")
    profile.add_argument("--n", type=int, default=729, help="queries (default 729: one image)")
    profile.add_argument("--d", type=int, default=1152, help="dimension (default 1152)")
    profile.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    profile.add_argument("--out", default="traces", help="output directory (default traces/)")
    sub.add_parser(
        "build-codebook",
        help="build a codebook by two-stage k-means over a .npy of features (options: build-codebook --help)",
        description="Every option after 'build-codebook' is passed to the builder.",
        epilog="example: unicode2-fast build-codebook feats.npy --k 500000 --n-coarse 1000 --out codebook.safetensors",
        add_help=False,
    )
    sub.add_parser(
        "tokenize",
        help="tokenize a folder of images into codeword ids with a SigLIP model (options: tokenize --help)",
        description="Every option after 'tokenize' is passed to the tokenizer.",
        epilog="example: unicode2-fast tokenize images/ --siglip siglip-so400m --codebook c1.safetensors --out ids.npy",
        add_help=False,
    )
    sub.add_parser(
        "train",
        help="train the projector (stage 1) or everything (stage 2) on tokenized images + captions (options: train --help)",
        description="Every option after 'train' is passed to the trainer; run under torchrun for FSDP2.",
        epilog="example: unicode2-fast train --llm qwen2.5-7b --codebook c1.safetensors --ids ids.npy "
               "--captions captions.jsonl --stage 1 --steps 1000 --batch-size 8 --out run1",
        add_help=False,
    )
    sub.add_parser(
        "bench",
        help="every benchmark (nearest, hierarchical, embedding, cross_entropy, build) vs FAISS and torch, "
             "with results.csv/.md/.png (options: bench --help)",
        description="Runs unicode2_fast.bench.run_all; every option after 'bench' is passed to it.",
        epilog="example: unicode2-fast bench --quick --out bench_out",
        add_help=False,
    )
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        if args.command == "bench":
            return _cmd_bench(args, rest)
        if args.command == "build-codebook":
            from .kmeans import cli_main

            return cli_main(rest)
        if args.command == "tokenize":
            from .models import cli_tokenize

            return cli_tokenize(rest)
        if args.command == "train":
            from .train import cli_train

            return cli_train(rest)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        if args.command == "profile":
            return _cmd_profile(args)
        return _cmd_kernels(args)
    except UserError as error:
        print(f"unicode2-fast: error: {error}", file=sys.stderr)
        return 2
