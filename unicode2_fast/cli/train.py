"""``unicode2-fast train``: understanding training (stage 1 / 2, torchrun-ready), or the whole model
(L_UND + L_GEN + L_CL) through a preset: the paper's stages, or ``tiny`` (everything built offline)."""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import shutil

import numpy as np
import torch

from ..train import read_captions, read_ids, read_manifest
from ._errors import UserError, int_at_least, positive_float
from ._paths import check_out_dir

NAME = "train"
PROG = f"unicode2-fast {NAME}"
PRESETS = ("tiny", "stage1", "stage1.5", "stage2")
#: the tiny preset trains everything at this lr (the stages use the paper's: 1e-3 / 1e-5)
TINY_LR = 3e-3


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        NAME,
        help="train the projector / everything on tokenized images + captions (understanding), or the whole "
             "model with a preset (tiny: built offline, trains on a CPU in seconds)",
        description="Without --preset: understanding training (L_UND): visual ids -> C2 -> projector -> Qwen2; "
                    "stage 1 trains the projector, stage 2 everything; multi-GPU under torchrun. "
                    "With --preset: the whole model, L_UND + L_GEN (visual head over the K ids) + L_CL "
                    "(mapper vs a frozen text encoder), with metrics.jsonl, checkpoints and exact resume.",
        epilog=f"examples: {PROG} --preset tiny --steps 30 --checkpoint-every 15 --out run; "
               f"{PROG} --preset tiny --steps 30 --resume run/checkpoint-15 --out run2; "
               f"{PROG} --llm Qwen2.5-7B --codebook codebook.safetensors --ids ids.npy --captions captions.jsonl "
               "--stage 1 --steps 100 --batch-size 8 --out run1",
    )
    parser.add_argument("--preset", choices=PRESETS, default=None,
                        help="whole-model training: tiny (random tiny SigLIP / Qwen2 / CLIP / FLUX and a synthetic "
                             "shapes data set, all built offline) or the paper's stage1 (projector, head, mapper; "
                             "lr 1e-3), stage1.5 / stage2 (everything, lr 1e-5)")
    parser.add_argument("--llm", help="Qwen2 model directory (with its tokenizer), or a directory written by a "
                                      "previous train run")
    parser.add_argument("--codebook", help="codebook .safetensors (initialises C2)")
    parser.add_argument("--ids", help="(N, P) .npy from `unicode2-fast tokenize`")
    parser.add_argument("--captions", help='JSON lines, one {"text": ...} per row of ids')
    parser.add_argument("--images", help='whole model: a JSON-lines manifest, one {"image": path, "text": caption} '
                                         "per line (paths relative to it), tokenized with --siglip")
    parser.add_argument("--siglip", help="SigLIP vision model directory for --images")
    parser.add_argument("--decoder", help="whole model: the FLUX / SDXL diffusers pipeline the mapper conditions")
    parser.add_argument("--text-encoder", help="whole model: the frozen text encoder of L_CL (default: the "
                                               "decoder's CLIP, its text_encoder / tokenizer folders)")
    parser.add_argument("--stage", type=int, choices=[1, 2], default=None,
                        help="understanding training's stage (default 1)")
    parser.add_argument("--steps", type=int_at_least(1), default=100)
    parser.add_argument("--batch-size", type=int_at_least(1), default=8)
    parser.add_argument("--grad-accum", type=int_at_least(1), default=1, help="micro-batches per step (presets)")
    parser.add_argument("--out", required=True,
                        help="output directory (save_pretrained); missing folders are created")
    parser.add_argument("--lr", type=positive_float, default=None,
                        help=f"peak lr (default: 1e-3 stage 1, 1e-5 stages 1.5 / 2, {TINY_LR:g} tiny)")
    parser.add_argument("--loss-weights", default=None, metavar="UND,GEN,CL",
                        help="weights of L_UND, L_GEN and L_CL (presets; default 1,1,1)")
    parser.add_argument("--checkpoint-every", type=int_at_least(0), default=0,
                        help="presets: write OUT/checkpoint-STEP every this many steps (0: never)")
    parser.add_argument("--resume", default=None, help="presets: continue from a checkpoint folder")
    parser.add_argument("--seed", type=int_at_least(0), default=0)
    parser.add_argument("--log-every", type=int_at_least(0), default=None,
                        help="understanding training: steps between loss lines (default 10; 0: none)")
    parser.add_argument("--no-progress", action="store_true", help="presets: no progress bar")
    parser.add_argument("--llm-dtype", choices=["float32", "bfloat16"], default=None,
                        help="presets: the LLM's parameter dtype (default float32: AdamW's updates at lr 1e-5 "
                             "vanish in bf16 weights; bf16 halves a frozen stage-1 LLM; compute is bf16 autocast "
                             "on CUDA either way)")
    parser.add_argument("--replicate-c2", action="store_true",
                        help="under torchrun, keep C2 replicated on every rank instead of sharding its rows "
                             "(and their optimizer state) across the ranks")


_JOINED: list = []  # non-empty while this command holds the process group it joined


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
        _JOINED.append(True)
    return f"cuda:{local_rank}" if cuda else "cpu"


def _need(args: argparse.Namespace, *names: str) -> None:
    missing = [f"--{name.replace('_', '-')}" for name in names if getattr(args, name) is None]
    if missing:
        what = f"--preset {args.preset}" if args.preset else "understanding training (no --preset)"
        raise UserError(f"{what} needs {', '.join(missing)}")


def _refuse(args: argparse.Namespace, names, why: str) -> None:
    given = [f"--{name.replace('_', '-')}" for name in names if getattr(args, name) not in (None, False)]
    if given:
        raise UserError(f"{', '.join(given)}: {why}")


def run(args: argparse.Namespace) -> int:
    try:
        code = _run(args)
    except BaseException:
        _leave_process_group(wait=False)  # torchrun stops the other ranks when this one fails
        raise
    _leave_process_group(wait=True)
    return code


def _leave_process_group(wait: bool) -> None:
    """Under torchrun: wait for every rank (rank 0 may still be saving), then leave the group.

    A rank that exits while its process group lives on can abort in gloo's or NCCL's teardown
    ("terminate called without an active exception"); destroying the group first avoids that.
    """
    import torch.distributed as dist

    if not (_JOINED and dist.is_initialized()):  # a group the caller made is the caller's to end
        return
    _JOINED.clear()
    if wait:
        dist.barrier()
    dist.destroy_process_group()


def _run(args: argparse.Namespace) -> int:
    check_out_dir(args.out)
    if args.preset is not None:
        _refuse(args, ("stage", "log_every", "replicate_c2"), "for understanding training (no --preset); a preset "
                "sets what trains, logs to metrics.jsonl and shards C2 and the head under torchrun")
        if args.preset == "tiny":
            _refuse(args, ("llm", "codebook", "decoder", "ids", "captions", "images", "siglip", "text_encoder"),
                    "--preset tiny builds all of these itself")
        if args.ids is not None and args.images is not None:
            raise UserError("give the data once: --ids with --captions, or --images with --siglip")
        return _run_preset(args)
    _refuse(args, ("resume", "images", "siglip", "decoder", "text_encoder", "loss_weights", "no_progress", "llm_dtype"),
            "for whole-model training: add --preset")
    if args.checkpoint_every or args.grad_accum != 1:
        raise UserError("--checkpoint-every and --grad-accum are for whole-model training: add --preset")
    _need(args, "llm", "codebook", "ids", "captions")
    args.stage = 1 if args.stage is None else args.stage
    args.log_every = 10 if args.log_every is None else args.log_every
    return _run_understanding(args)


def _run_understanding(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from ..codebook import Codebook
    from ..train import TokenDataset, train

    if not os.path.isdir(args.llm):
        raise UserError(f"LLM directory not found: {args.llm}")
    if not os.path.isfile(args.codebook):
        raise UserError(f"codebook not found: {args.codebook}")
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
    tokenizer, llm_dir = _tokenizer(args.llm)
    try:
        dataset = TokenDataset(ids, captions, tokenizer)
    except ValueError as error:
        raise UserError(str(error)) from error
    device = _init_distributed_from_env()
    model = _load_model(llm_dir, codebook, device)
    if model.codebook_size <= int(ids.max(initial=0)):
        raise UserError(f"the model's C2 has {model.codebook_size} rows but {args.ids} holds id {int(ids.max())}")
    train(model, dataset, stage=args.stage, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
          seed=args.seed, log_every=args.log_every, out_dir=args.out, vocab_parallel_c2=not args.replicate_c2)
    if not dist.is_initialized() or dist.get_rank() == 0:
        tokenizer.save_pretrained(os.path.join(args.out, "llm"))
        print(f"saved {args.out}")
    return 0


def _tokenizer(llm_dir: str):
    from transformers import AutoTokenizer

    tokenizer_dir = os.path.join(llm_dir, "llm") if os.path.isdir(os.path.join(llm_dir, "llm")) else llm_dir
    try:
        return AutoTokenizer.from_pretrained(tokenizer_dir), llm_dir
    except (OSError, ValueError) as error:  # transformers' words for "no usable tokenizer there"
        raise UserError(f"cannot load a tokenizer from {tokenizer_dir}: {error}") from error


def _load_model(path: str, codebook, device: str, dtype=None):
    from ..models.unified import UnifiedModel

    try:
        return UnifiedModel.from_pretrained(path, codebook, device=device, torch_dtype=dtype)
    except (OSError, ValueError) as error:  # no Qwen2 there, or a foreign / inconsistent saved model
        raise UserError(f"cannot load a model from {path}: {error}") from error


def _fingerprint(ids: np.ndarray, captions) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(ids, dtype=np.int64).tobytes())
    for text in captions:
        digest.update(text.encode("utf-8") + b"\0")
    return digest.hexdigest()


def _weights(text) -> dict:
    if text is None:
        return {}
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 3 or not all(math.isfinite(v) and v >= 0 for v in values) or not sum(values) > 0:
        raise UserError(f"--loss-weights takes three finite, non-negative numbers UND,GEN,CL (not all 0), got {text!r}")
    return dict(zip(("loss_und", "loss_gen", "loss_cl"), values))


def _run_preset(args: argparse.Namespace) -> int:
    from ..codebook import Codebook
    from ..models import ConditioningMapper, FrozenTextEncoder, SiglipTokenizer
    from ..models.pipeline import read_run_config, save_run_config
    from ..models.unified import LLM_SUBDIR, UnifiedModel
    from ..train import MAPPER_SUBDIR, STAGES, TokenDataset, train_unified

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and (args.checkpoint_every or args.resume is not None):
        raise UserError("--checkpoint-every and --resume run in one process only, for now: under torchrun the whole "
                        "model trains without checkpoints")
    weights = _weights(args.loss_weights)
    if args.resume is not None and (os.path.abspath(args.out) + os.sep).startswith(os.path.abspath(args.resume) + os.sep):
        raise UserError(f"--out {args.out} is (inside) the checkpoint being resumed: write the run to its parent "
                        "or elsewhere")
    if args.resume is not None and not os.path.isdir(args.resume):
        raise UserError(f"--resume {args.resume}: checkpoint folder not found")
    tiny = args.preset == "tiny"
    device = _init_distributed_from_env()  # under torchrun: this rank's device, the process group joined
    rank = dist.get_rank() if dist.is_initialized() else 0
    if tiny:
        from ..models.tiny import build_tiny_assets, tiny_paths

        root = os.path.join(args.out, "assets")
        error = None
        if rank == 0:  # one rank builds the tiny parts; the others read them
            try:
                build_tiny_assets(root, seed=args.seed)
            except (OSError, ValueError) as exc:
                error = UserError(f"cannot build the tiny parts in {root}: {exc}")
        if dist.is_initialized():
            from ..distributed import check_all

            check_all(error, what="tiny preset build")  # every rank stops together, none waits
        elif error is not None:
            raise error
        assets = tiny_paths(root)
        args.llm, args.codebook, args.decoder = assets["llm"], assets["codebook"], assets["decoder"]
        args.images, args.siglip = os.path.join(assets["images"], "captions.jsonl"), assets["siglip"]
        args.text_encoder = args.text_encoder or assets["text_encoder"]
    else:
        _need(args, "llm", "codebook", "decoder")
        if args.ids is None and args.images is None:
            raise UserError(f"--preset {args.preset} needs the data: --ids with --captions, or --images with --siglip")
    trainable, stage_lr = ("all", TINY_LR) if tiny else STAGES[args.preset]
    lr = args.lr or stage_lr
    try:
        codebook = Codebook.load(args.codebook)
        if args.images is not None:
            _need(args, "siglip")
            images, captions = read_manifest(args.images)
            ids = SiglipTokenizer.from_pretrained(args.siglip, codebook).tokenize(images).cpu().numpy()
        else:
            _need(args, "ids", "captions")
            ids, captions = read_ids(args.ids), read_captions(args.captions)
    except (FileNotFoundError, ValueError) as error:
        raise UserError(str(error)) from error
    if len(captions) != ids.shape[0]:
        raise UserError(f"{ids.shape[0]} rows of ids but {len(captions)} captions: they must pair one to one")
    fingerprint = _fingerprint(ids, captions)

    source = args.resume if args.resume is not None else args.llm
    tokenizer, _ = _tokenizer(source)
    try:
        dataset = TokenDataset(ids, captions, tokenizer)
    except ValueError as error:
        raise UserError(str(error)) from error
    decoder_config = _decoder_config(args.decoder)
    llm_dtype = getattr(torch, args.llm_dtype or "float32")
    if args.resume is not None:
        try:
            saved = read_run_config(args.resume)
            model = UnifiedModel.from_pretrained(args.resume, device=device, torch_dtype=llm_dtype)
            mapper = ConditioningMapper.from_pretrained(os.path.join(args.resume, MAPPER_SUBDIR), device=device)
        except (OSError, ValueError) as error:
            raise UserError(f"cannot resume from {args.resume}: {error}") from error
        if saved.get("data") != fingerprint:
            raise UserError(f"the data differs from the data {args.resume} was trained on: resume needs the same rows")
    else:
        model = _load_model(args.llm, codebook, device, llm_dtype)
        if model.visual_head_mode is None:
            model.init_visual_head()
        torch.manual_seed(args.seed)
        kwargs = dict(num_queries=8, num_heads=2) if tiny else {}
        mapper = ConditioningMapper.for_decoder(decoder_config, code_dim=model.code_dim, **kwargs).to(device)
    if ids.size and int(ids.max()) >= model.codebook_size:
        raise UserError(f"the model's C2 has {model.codebook_size} rows but the data holds id {int(ids.max())}")
    try:
        if args.text_encoder is not None:
            text_encoder = FrozenTextEncoder.from_pretrained(args.text_encoder)
        else:  # the decoder's own CLIP whose pooled output it takes: FLUX's CLIP-L, SDXL's second (bigG)
            sub = "text_encoder" if "joint_attention_dim" in decoder_config else "text_encoder_2"
            text_encoder = FrozenTextEncoder.from_pretrained(args.decoder, subfolder=sub)
        text_encoder.to(device)
        width = int(text_encoder.encode(captions[:1]).shape[1])
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load the text encoder: {error}") from error
    if width != mapper.pooled_dim:
        raise UserError(f"the text encoder gives {width}-d embeddings but L_CL compares them with the decoder's "
                        f"{mapper.pooled_dim}-d pooled conditioning: pick the encoder of that width (--text-encoder)")
    if args.resume is not None:
        now = {"preset": args.preset, "decoder": None if tiny else os.path.abspath(args.decoder),
               "text_encoder": None if tiny or args.text_encoder is None else os.path.abspath(args.text_encoder)}
        was = {k: saved.get(k) for k in now}
        if tiny:  # the tiny parts are rebuilt, seeded, with the data fingerprint checked above
            was["decoder"] = was["text_encoder"] = None
        elif was["decoder"] is not None:
            was["decoder"] = os.path.abspath(was["decoder"])
        differs = [f"{k} {was[k]!r} vs {now[k]!r}" for k in now if was[k] != now[k]]
        if differs:
            raise UserError(f"{args.resume} was trained with other settings (saved, given): {', '.join(differs)}")

    decoder_in_run = tiny  # a tiny decoder travels with the run; a real one is referred to by path
    decoder_path = os.path.abspath(args.decoder)

    def save_extra(directory: str) -> None:
        tokenizer.save_pretrained(os.path.join(directory, LLM_SUBDIR))
        if decoder_in_run:
            target = os.path.join(directory, "decoder")
            if os.path.abspath(target) != decoder_path:
                shutil.rmtree(target, ignore_errors=True)
                shutil.copytree(decoder_path, target)
        save_run_config(directory, tokens_per_image=int(ids.shape[1]),
                        decoder="decoder" if decoder_in_run else decoder_path,
                        text_encoder=None if tiny or not args.text_encoder else os.path.abspath(args.text_encoder),
                        preset=args.preset, data=fingerprint, seed=args.seed)

    try:
        train_unified(model, dataset, steps=args.steps, batch_size=args.batch_size, mapper=mapper,
                      text_encoder=text_encoder, trainable=trainable, lr=lr, grad_accum=args.grad_accum,
                      loss_weights=weights, seed=args.seed, out_dir=args.out, checkpoint_every=args.checkpoint_every,
                      resume_from=args.resume, save_extra=save_extra, progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as error:
        raise UserError(str(error)) from error
    if rank == 0:
        print(f"saved {args.out}")
    return 0


def _decoder_config(path: str):
    """The denoiser config (FLUX transformer / SDXL UNet) of a diffusers pipeline folder."""
    import json

    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        raise UserError(f"--decoder {path}: no diffusers pipeline there (model_index.json not found)")
    with open(index, encoding="utf-8") as file:
        names = json.load(file)
    sub = "transformer" if "transformer" in names else "unet"
    config = os.path.join(path, sub, "config.json")
    if not os.path.isfile(config):
        raise UserError(f"--decoder {path}: no {sub}/config.json")
    with open(config, encoding="utf-8") as file:
        return json.load(file)
