"""``unicode2-fast kernels``: the ahead-of-time compile report of every Triton kernel (no GPU)."""
from __future__ import annotations

import argparse

from ..kernels.compile import MAX_ARCH, MIN_ARCH
from ._errors import UserError

NAME = "kernels"


def _arch(text: str) -> int:
    try:
        arch = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if not MIN_ARCH <= arch <= MAX_ARCH:
        raise argparse.ArgumentTypeError(
            f"must be a CUDA compute capability between {MIN_ARCH} and {MAX_ARCH} (e.g. 90 for H100), got {arch}")
    return arch


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        NAME,
        help="compile every Triton kernel ahead of time and report registers, spills, smem, wgmma",
        description="Compile every Triton kernel for a CUDA target without a GPU and print a table.",
        epilog="example: unicode2-fast kernels --arch 90 --only nearest",
    )
    parser.add_argument("--arch", type=_arch, default=90,
                        help=f"CUDA compute capability, {MIN_ARCH}..{MAX_ARCH}, e.g. 90 for H100 (default 90)")
    parser.add_argument("--only", nargs="*", metavar="KERNEL", help="kernel names to compile (default: all)")


def run(args: argparse.Namespace) -> int:
    from ..kernels.compile import compile_report, format_report, kernel_specs

    if args.only:
        # checked here, where an unknown name can only be the user's: compile_report's own
        # ValueErrors would also cover broken kernel specs, which are ours
        available = sorted({spec["name"] for spec in kernel_specs()})
        unknown = sorted(set(args.only) - set(available))
        if unknown:
            raise UserError(f"--only: unknown kernel(s) {', '.join(unknown)}; available: {', '.join(available)}")
    print(format_report(compile_report(arch=args.arch, kernels=args.only or None)))
    return 0
