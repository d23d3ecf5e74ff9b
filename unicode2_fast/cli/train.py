"""``unicode2-fast train``: stage-1 (projector) / stage-2 (everything) understanding training."""
from __future__ import annotations

import argparse
import os

import torch

from ..train import read_captions, read_ids
from ._errors import UserError, int_at_least, positive_float
from ._paths import check_out_dir

NAME = "train"
PROG = f"unicode2-fast {NAME}"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        NAME,
        help="train the projector (stage 1) or everything (stage 2) on tokenized images + captions",
        description="Understanding training (L_UND): visual ids -> C2 -> projector -> Qwen2 LLM. "
                    "Stage 1 trains the projector, stage 2 everything. Multi-GPU: run under torchrun.",
        epilog=f"example: {PROG} --llm Qwen2.5-7B --codebook codebook.safetensors --ids ids.npy "
               "--captions captions.jsonl --stage 1 --steps 100 --batch-size 8 --out run1",
    )
    parser.add_argument("--llm", required=True, help="Qwen2 model directory (with its tokenizer), or a "
                                                     "directory written by a previous train run")
    parser.add_argument("--codebook", required=True, help="codebook .safetensors (initialises C2)")
    parser.add_argument("--ids", required=True, help="(N, P) .npy from `unicode2-fast tokenize`")
    parser.add_argument("--captions", required=True, help='JSON lines, one {"text": ...} per row of ids')
    parser.add_argument("--stage", type=int, choices=[1, 2], default=1)
    parser.add_argument("--steps", type=int_at_least(1), default=100)
    parser.add_argument("--batch-size", type=int_at_least(1), default=8)
    parser.add_argument("--out", required=True,
                        help="output directory (save_pretrained); missing folders are created")
    parser.add_argument("--lr", type=positive_float, default=None, help="peak lr (default 1e-3 stage 1, 1e-5 stage 2)")
    parser.add_argument("--seed", type=int_at_least(0), default=0)
    parser.add_argument("--log-every", type=int_at_least(0), default=10, help="steps between loss lines (0: none)")
    parser.add_argument("--replicate-c2", action="store_true",
                        help="under torchrun, keep C2 replicated on every rank instead of sharding its rows "
                             "(and their optimizer state) across the ranks")


def _init_distributed_from_env() -> str:
    """Join the process group torchrun describes (WORLD_SIZE > 1) and return this rank's device.

    NCCL with one GPU per rank (LOCAL_RANK) on CUDA machines, gloo on the CPU; a plain run (no
    torchrun) stays single-process.
    """
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return f"cuda:{local_rank}" if cuda else "cpu"


def run(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from ..codebook import Codebook
    from ..train import TokenDataset, train

    if not os.path.isdir(args.llm):
        raise UserError(f"LLM directory not found: {args.llm}")
    if not os.path.isfile(args.codebook):
        raise UserError(f"codebook not found: {args.codebook}")
    check_out_dir(args.out)
    try:
        ids = read_ids(args.ids)
        captions = read_captions(args.captions)
        codebook = Codebook.load(args.codebook)
    except (FileNotFoundError, ValueError) as error:  # a missing or malformed input file, named
        raise UserError(str(error)) from error
    if len(captions) != ids.shape[0]:
        raise UserError(f"{args.ids} has {ids.shape[0]} rows but {args.captions} has {len(captions)} "
                        "captions: they must pair one to one")
    if ids.size and int(ids.max()) >= codebook.k:
        raise UserError(f"codebook too small: it has {codebook.k} codewords but {args.ids} holds id {int(ids.max())}")
    from transformers import AutoTokenizer

    from ..models.unified import UnifiedModel

    llm_dir = args.llm
    tokenizer_dir = os.path.join(llm_dir, "llm") if os.path.isdir(os.path.join(llm_dir, "llm")) else llm_dir
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        dataset = TokenDataset(ids, captions, tokenizer)
    except (OSError, ValueError) as error:  # transformers' words for "no usable tokenizer there"
        raise UserError(f"cannot load a tokenizer from {tokenizer_dir}: {error}") from error
    device = _init_distributed_from_env()
    try:
        model = UnifiedModel.from_pretrained(llm_dir, codebook, device=device)
    except (OSError, ValueError) as error:  # no Qwen2 there, or a foreign / inconsistent saved model
        raise UserError(f"cannot load a model from {llm_dir}: {error}") from error
    if model.codebook_size <= int(ids.max(initial=0)):
        raise UserError(f"the model's C2 has {model.codebook_size} rows but {args.ids} holds id {int(ids.max())}")
    train(model, dataset, stage=args.stage, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
          seed=args.seed, log_every=args.log_every, out_dir=args.out, vocab_parallel_c2=not args.replicate_c2)
    if not dist.is_initialized() or dist.get_rank() == 0:
        tokenizer.save_pretrained(os.path.join(args.out, "llm"))
        print(f"saved {args.out}")
    return 0
