"""``unicode2-fast bench``: every op's benchmark vs FAISS and torch (``unicode2_fast.bench.run_all``).

run_all owns the options and their --help: its parser is this command's parent, so a mistake is
caught here as one line, and everything after ``bench`` is then handed to ``run_all.main``.
"""
from __future__ import annotations

import argparse

from ._paths import check_out_dir

NAME = "bench"
PROG = "unicode2-fast bench"


def add_parser(subparsers) -> None:
    from ..bench import run_all

    options = run_all.build_parser(PROG)
    subparsers.add_parser(
        NAME,
        parents=[options],
        add_help=False,  # the parent's -h / --help
        help="every benchmark (nearest, nearest_data, hierarchical, embedding, cross_entropy, kmeans) vs FAISS and torch, "
             "with results.csv/.md/.png (options: bench --help)",
        description=options.description + "\nA missing --out folder is created.",
        epilog=options.epilog,
        formatter_class=options.formatter_class,
    )


def run(args: argparse.Namespace) -> int:
    from ..bench import run_all

    check_out_dir(args.out)
    return run_all.main(args.argv, prog=PROG)
