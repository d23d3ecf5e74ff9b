"""``unicode2-fast generate``: prompt -> visual ids (the LLM's visual head) -> image (mapper + decoder)."""
from __future__ import annotations

import argparse

from ._errors import UserError, int_at_least, positive_float
from ._paths import check_out_file, write_together

NAME = "generate"
PROG = f"unicode2-fast {NAME}"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        NAME,
        help="generate an image from a prompt with a model trained by `train --preset ...`",
        description="The LLM samples the image's visual ids after the prompt (KV cache, temperature / top-k / "
                    "top-p, optional classifier-free guidance); their C2 rows go through the mapper into the "
                    "frozen FLUX / SDXL decoder. The same seed gives the same pixels.",
        epilog=f'example: {PROG} --model run --prompt "a big red square" --height 64 --width 64 --steps 4 '
               "--seed 0 --out img.png",
    )
    parser.add_argument("--model", required=True, help="a run folder written by `unicode2-fast train --preset ...`")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--height", type=int_at_least(1), default=1024)
    parser.add_argument("--width", type=int_at_least(1), default=1024)
    parser.add_argument("--steps", type=int_at_least(1), default=None, help="decoder steps (default: the paper's 50)")
    parser.add_argument("--seed", type=int_at_least(0), default=0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int_at_least(1), default=None)
    parser.add_argument("--top-p", type=positive_float, default=None)
    parser.add_argument("--guidance", type=positive_float, default=None,
                        help="classifier-free guidance scale on the visual ids (default: none)")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..models.decoder import check_image_size, size_multiple_of
    from ..models.pipeline import TextToImage, read_run_config

    check_out_file(args.out)
    if not args.out.lower().endswith(".png"):
        raise UserError(f"--out {args.out}: the image is written as PNG; name it .png")
    if args.temperature < 0:
        raise UserError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_p is not None and args.top_p > 1:
        raise UserError(f"--top-p must lie in (0, 1], got {args.top_p}")
    if not args.prompt.strip():
        raise UserError("--prompt is empty")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        config = read_run_config(args.model)  # the size is checked from the configs, before any model loads
        check_image_size(args.height, args.width, size_multiple_of(config["decoder"]), "")
        pipeline = TextToImage.from_pretrained(args.model, device=device)
        pipeline.decoder.check_size(args.height, args.width)  # before any sampling
        image = pipeline.generate([args.prompt], height=args.height, width=args.width, num_inference_steps=args.steps,
                                  seed=args.seed, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                  guidance_scale=args.guidance)[0]
    except (FileNotFoundError, ValueError) as error:
        raise UserError(str(error)) from error
    write_together({args.out: lambda tmp: image.save(tmp, format="PNG")})
    print(f"wrote {args.out} ({image.size[0]} x {image.size[1]})")
    return 0
