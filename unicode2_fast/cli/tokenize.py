"""``unicode2-fast tokenize``: a folder of images -> (N_images, P) codeword ids with SigLIP + a codebook."""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

from ..models.siglip_tokenizer import IMAGE_EXTENSIONS, SiglipTokenizer, list_images
from ..nearest import METRICS
from ._errors import UserError, int_at_least
from ._paths import check_out_file, write_together

NAME = "tokenize"
PROG = f"unicode2-fast {NAME}"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        NAME,
        help="tokenize a folder of images into codeword ids with a SigLIP model",
        description="Visual token ids of every image in a folder: SigLIP patch features, then the "
                    "nearest codeword of each patch. Writes the ids to OUT (.npy, (N_images, P) int64) "
                    "and the image names in row order next to it (OUT with .json): both or neither.",
        epilog=f"example: {PROG} images/ --siglip siglip-so400m-patch14-384 --codebook codebook.safetensors "
               "--out ids.npy",
    )
    parser.add_argument("images_dir", help=f"folder of {'/'.join(IMAGE_EXTENSIONS)} images (read in name order)")
    parser.add_argument("--siglip", required=True, help="SigLIP model directory (with preprocessor_config.json)")
    parser.add_argument("--codebook", required=True, help="codebook .safetensors")
    parser.add_argument("--out", required=True,
                        help="output .npy of (N_images, P) int64 ids, names go to .json next to it; "
                             "missing parent folders are created")
    parser.add_argument("--batch-size", type=int_at_least(1), default=16, help="images per forward pass (default 16)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--metric", choices=list(METRICS), default="l2", help="search metric (default l2)")


def run(args: argparse.Namespace) -> int:
    if not os.path.isdir(args.images_dir):
        raise UserError(f"image folder not found: {args.images_dir}")
    names = list_images(args.images_dir)
    if not names:
        raise UserError(f"no images ({'/'.join(IMAGE_EXTENSIONS)}) in {args.images_dir}")
    names_path = os.path.splitext(args.out)[0] + ".json"
    if os.path.abspath(names_path) == os.path.abspath(args.out):
        raise UserError(f"--out {args.out}: the names go to {names_path}: give the ids another extension (.npy)")
    check_out_file(args.out)
    if os.path.isdir(names_path):
        raise UserError(f"--out {args.out}: its names file {names_path} is a folder")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    paths = [os.path.join(args.images_dir, name) for name in names]
    try:
        tokenizer = SiglipTokenizer.from_pretrained(args.siglip, args.codebook, device=args.device, metric=args.metric)
        ids = tokenizer.tokenize(paths, batch_size=args.batch_size).cpu().numpy()  # (N, P)
    except (FileNotFoundError, IsADirectoryError, ValueError) as error:
        # a missing model / codebook / image, an unreadable one, a codebook of another dim
        raise UserError(str(error)) from error

    def write_ids(tmp_path: str) -> None:
        with open(tmp_path, "wb") as file:  # a file object: np.save(path) would append ".npy"
            np.save(file, ids)

    def write_names(tmp_path: str) -> None:
        with open(tmp_path, "w", encoding="utf-8") as file:
            file.write(json.dumps(names, indent=1))

    write_together({args.out: write_ids, names_path: write_names})
    print(f"wrote {args.out}: {ids.shape[0]} images x {ids.shape[1]} tokens, names in {names_path}")
    return 0
