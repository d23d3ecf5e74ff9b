"""``unicode2-fast build-codebook``: a codebook by two-stage k-means over a .npy of features."""
from __future__ import annotations

import argparse
import os
import time

from ._errors import UserError, int_at_least
from ._paths import check_out_dir, check_out_file, make_parent, saving

NAME = "build-codebook"
PROG = f"unicode2-fast {NAME}"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        NAME,
        help="build a codebook by two-stage k-means over a .npy of features",
        description="Build a codebook by two-stage k-means over a .npy file of (M, d) features "
                    "(memory-mapped: never loaded whole).",
        epilog=f"example: {PROG} features.npy --k 500000 --n-coarse 1000 --out codebook.safetensors "
               "--checkpoint-dir ckpt",
    )
    parser.add_argument("features", help=".npy file holding an (M, d) float array")
    parser.add_argument("--k", type=int_at_least(1), required=True, help="number of codewords")
    parser.add_argument("--n-coarse", type=int_at_least(1), default=None,
                        help="coarse cells, at most k (default: round(sqrt(k)))")
    parser.add_argument("--out", required=True,
                        help="output codebook (.safetensors); missing parent folders are created")
    parser.add_argument("--niter", type=int_at_least(1), default=20, help="Lloyd iterations per k-means (default 20)")
    parser.add_argument("--seed", type=int_at_least(0), default=0, help="random seed (default 0)")
    parser.add_argument("--max-points-per-centroid", type=int_at_least(1), default=256,
                        help="training rows per centroid at most (default 256)")
    parser.add_argument("--checkpoint-dir", default=None,
                        help="save progress here and rerun to resume; a missing folder is created")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from ..kmeans import build_codebook

    if not os.path.isfile(args.features):
        what = "is a folder, expected a .npy file" if os.path.isdir(args.features) else "file not found"
        raise UserError(f"features {what}: {args.features}")
    if args.n_coarse is not None and args.n_coarse > args.k:
        raise UserError(f"--n-coarse {args.n_coarse} must not exceed --k {args.k}")
    check_out_file(args.out)
    if args.checkpoint_dir is not None:
        check_out_dir(args.checkpoint_dir, "--checkpoint-dir")
    started = time.perf_counter()
    try:
        codebook = build_codebook(
            args.features, args.k, args.n_coarse, niter=args.niter, seed=args.seed,
            max_points_per_centroid=args.max_points_per_centroid, progress=not args.no_progress,
            checkpoint_dir=args.checkpoint_dir,
        )
    except (ValueError, TypeError) as error:
        # every argument is checked above, so these are about the features file or the
        # checkpoints: not a float (M, d) .npy, NaN / Inf rows, k > M, too few distinct rows,
        # a checkpoint of another build
        raise UserError(str(error)) from error
    with saving(args.out):
        make_parent(args.out)
        codebook.save(args.out)
    print(f"wrote {args.out}: {codebook.k} codewords of dim {codebook.dim} in {codebook.meta['n_coarse']} "
          f"coarse cells from {codebook.meta['n_features']} features ({time.perf_counter() - started:.1f} s)")
    return 0
