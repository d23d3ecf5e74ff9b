"""Command line: ``unicode2-fast <command>`` (also ``python -m unicode2_fast <command>``).

Commands, one module each:
    kernels          ahead-of-time compile report of every Triton kernel (no GPU needed)
    bench            the main job: every op's benchmark vs FAISS and torch (unicode2_fast.bench.run_all)
    build-codebook   two-stage k-means codebook from a .npy of features
    tokenize         images folder -> codeword ids (.npy) with a SigLIP model and a codebook
    train            understanding training (stage 1 / 2), or the whole model with a preset (tiny: offline)
    generate         prompt -> visual ids -> image, with a model trained by train --preset
    profile          torch-profiler Chrome trace of one op (with NVTX ranges under Nsight)

This package is the only place that parses argv or decides an exit status. A user mistake (bad
argument, missing input, unwritable output) is a :class:`UserError`, raised by the command
modules (which check their inputs, and re-raise the library's ValueError / FileNotFoundError
where bad input is what causes them); :func:`main` prints it as one line,
``unicode2-fast <command>: error: ...``, and returns 2. Ctrl-C returns 130 without a traceback.
Every other exception keeps its traceback. Output folders that are missing are created.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from . import bench, build_codebook, generate, kernels, profile, tokenize, train
from ._errors import OneLineErrorParser, UserError

__all__ = ["UserError", "build_parser", "main"]

PROG = "unicode2-fast"
#: command name -> its module: ``add_parser(subparsers)`` and ``run(args) -> int``
COMMANDS = {module.NAME: module for module in (kernels, bench, build_codebook, tokenize, train, generate, profile)}


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command; its errors (and every command's) raise UserError."""
    parser = OneLineErrorParser(
        prog=PROG,
        description="Fast exact search and tooling for very large visual codebooks.",
        epilog=f"'{PROG} COMMAND --help' lists a command's options.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS.values():
        module.add_parser(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run one command.

    Args:
        argv: the arguments after the program name (default: ``sys.argv[1:]``).

    Returns:
        the command's exit status: 0 on success, 2 after a user mistake (one line on stderr),
        130 after Ctrl-C; ``bench`` also returns 1 when some op failed.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    # the top-level parser has no options but --help, so the first argument names the command
    command = argv[0] if argv and argv[0] in COMMANDS else None
    prog = f"{PROG} {command}" if command else PROG
    try:
        try:
            # argv: the command's own arguments as typed (bench hands them on to run_all)
            args = build_parser().parse_args(argv, argparse.Namespace(argv=argv[1:]))
        except SystemExit as exit_:  # --help was printed; parse errors raise UserError instead
            return int(exit_.code or 0)
        return COMMANDS[args.command].run(args)
    except UserError as error:
        message = " ".join(str(error).split())  # exactly one line, whatever the message holds
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
