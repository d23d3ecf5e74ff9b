"""Stage-1 / stage-2 understanding training of :class:`~unicode2_fast.models.unified.UnifiedModel`.

Stage 1: the LLM and C2 are frozen; only the projector trains (AdamW, lr 1e-3).
Stage 2: everything trains (lr 1e-5); C2's row-sparse gradient goes to ``u2.SparseRowAdamW``
(only the rows a batch touches change), every other parameter to ``torch.optim.AdamW``.
Both: betas (0.9, 0.95), linear warmup over 3% of the steps then cosine decay to 0
(``torch.optim.lr_scheduler.LambdaLR``); bf16 autocast on CUDA only.

Multi-GPU: run under ``torchrun --nproc_per_node N``. When torch.distributed is initialised with
world size > 1, each decoder layer of the LLM (and then the LLM) is sharded with FSDP2
(``torch.distributed.fsdp.fully_shard``); the projector stays replicated with averaged gradients, and in
stage 2 C2 trains sharded by rows (``u2.distributed.VocabParallelEmbedding``: each rank the
row-sparse gradient and SparseRowAdamW state of its rows; ``vocab_parallel_c2=False`` keeps it
replicated, its sparse gradient averaged with ``u2.distributed.all_gather_rows``: tensors through
collectives, nothing pickled either way); each
rank reads its own slice of every shuffled epoch. The CPU tests run it with two gloo ranks.
The ``unicode2-fast train`` command (``unicode2_fast.cli.train``) joins torchrun's process group.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import types
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .distributed import VocabParallelEmbedding, all_gather_rows, gather_batch
from .sparse_adamw import SparseRowAdamW

PathLike = Union[str, "os.PathLike[str]"]
STAGE_LR = {1: 1e-3, 2: 1e-5}


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


def read_captions(path: PathLike) -> List[str]:
    """The ``"text"`` of every non-empty line of a JSON-lines file.

    Raises:
        FileNotFoundError: no such file. ValueError: a line that is not a JSON object with a
        string "text" (the message names the line).
    """
    texts = []
    for number, record in _json_lines(path, "captions file"):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f'{os.path.basename(path)} line {number}: expected {{"text": "..."}}')
        texts.append(record["text"])
    return texts


def _json_lines(path: PathLike, what: str) -> Iterator[Tuple[int, Any]]:
    """(line number, parsed JSON) of every non-empty line of a JSON-lines file.

    Raises:
        FileNotFoundError: no such file ("{what} not found"). ValueError: a line that is not JSON (named).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{os.path.basename(path)} line {number}: not JSON ({exc})") from exc


def read_manifest(path: PathLike) -> Tuple[List[str], List[str]]:
    """(image paths, captions) of a JSON-lines manifest: one ``{"image": ..., "text": ...}`` per
    non-empty line, image paths relative to the manifest's folder (or absolute).

    Raises:
        FileNotFoundError: no manifest, or an image it names is missing (the line is named).
        ValueError: a line that is not such an object (named).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    images, texts = [], []
    for number, record in _json_lines(path, "manifest"):
        if (not isinstance(record, dict) or not isinstance(record.get("image"), str)
                or not isinstance(record.get("text"), str)):
            raise ValueError(f'{os.path.basename(path)} line {number}: expected {{"image": "...", "text": "..."}}')
        image = os.path.join(folder, record["image"])
        if not os.path.isfile(image):
            raise FileNotFoundError(f"{os.path.basename(path)} line {number}: image not found: {image}")
        images.append(image)
        texts.append(record["text"])
    if not images:
        raise ValueError(f"{path} lists no images")
    return images, texts


def read_ids(path: PathLike) -> np.ndarray:
    """(N, P) int64 visual token ids from a ``.npy`` written by ``unicode2-fast tokenize``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ids file not found: {path}")
    try:
        ids = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {os.path.basename(path)}: {exc}") from exc
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{os.path.basename(path)} must hold a 2-D integer array (N, P), got {ids.dtype} {ids.shape}")
    if ids.size and ids.min() < 0:
        raise ValueError(f"{os.path.basename(path)} holds negative ids")
    return ids.astype(np.int64, copy=False)


def left_pad(rows: Sequence[Sequence[int]], pad: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(B, T) int64 ids of token lists left-padded with ``pad`` (every row ends at T - 1, where a
    prompt's continuation is predicted) and the (B, T) mask, 1 on real tokens."""
    length = max(len(row) for row in rows)
    ids = torch.full((len(rows), length), int(pad), dtype=torch.int64)
    mask = torch.zeros((len(rows), length), dtype=torch.int64)
    for i, row in enumerate(rows):
        ids[i, length - len(row):] = torch.tensor(list(row), dtype=torch.int64)
        mask[i, length - len(row):] = 1
    return ids, mask


class TokenDataset(torch.utils.data.Dataset):
    """Rows of visual ids (N, P) paired with captions; tokenised once, EOS appended.

    Args:
        ids: path to ``ids.npy`` or an (N, P) integer array.
        captions: path to ``captions.jsonl`` (one ``{"text": ...}`` per row) or a list of strings.
        tokenizer: a transformers tokenizer (its pad token, else EOS, pads; EOS ends each caption).
        max_length: optional cap on the caption tokens (EOS included).

    Raises:
        ValueError: the numbers of id rows and captions differ; the tokenizer has no pad/EOS token.
    """

    def __init__(self, ids: Any, captions: Any, tokenizer: Any, max_length: Optional[int] = None) -> None:
        self.ids = read_ids(ids) if isinstance(ids, (str, os.PathLike)) else np.asarray(ids, dtype=np.int64)
        texts = read_captions(captions) if isinstance(captions, (str, os.PathLike)) else list(captions)
        if self.ids.ndim != 2:
            raise ValueError(f"ids must be (N, P), got shape {self.ids.shape}")
        if len(texts) != self.ids.shape[0]:
            raise ValueError(f"{self.ids.shape[0]} rows of ids but {len(texts)} captions: they must pair one to one")
        eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        if pad is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token")
        self.pad_token_id = int(pad)
        self.eos_token_id = None if eos is None else int(eos)
        self.captions = texts
        self.tokens: List[List[int]] = []
        for text in texts:
            tokens = list(tokenizer(text, add_special_tokens=False)["input_ids"])
            if eos is not None:
                tokens.append(int(eos))
            if max_length is not None:
                tokens = tokens[:max_length]
            self.tokens.append(tokens or [self.pad_token_id])

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def __getitem__(self, index: int) -> Dict[str, Any]:
        return {"visual_ids": torch.from_numpy(self.ids[index].copy()), "input_ids": self.tokens[index]}

    def collate(self, rows: Sequence[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        """Right-pad ``input_ids``; ``attention_mask`` 0 and ``labels`` -100 on padding."""
        length = max(len(row["input_ids"]) for row in rows)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.int64)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.int64)
        for i, row in enumerate(rows):
            input_ids[i, :len(row["input_ids"])] = torch.tensor(row["input_ids"], dtype=torch.int64)
            attention_mask[i, :len(row["input_ids"])] = 1
        return {
            "visual_ids": torch.stack([row["visual_ids"] for row in rows]),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": input_ids.masked_fill(attention_mask == 0, -100),
        }

    def collate_generation(self, rows: Sequence[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        """Generation rows (L_GEN): the caption as the prompt (its EOS dropped), left-padded so that
        every prompt ends where the first visual token is predicted; ``prompt_mask`` 0 on padding."""
        prompts = [row["input_ids"][:-1] if len(row["input_ids"]) > 1 and row["input_ids"][-1] == self.eos_token_id
                   else row["input_ids"] for row in rows]
        prompt_ids, prompt_mask = left_pad(prompts, self.pad_token_id)
        return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
                "visual_ids": torch.stack([row["visual_ids"] for row in rows])}


# ---------------------------------------------------------------------------------------------
# schedule, optimizers, distributed
# ---------------------------------------------------------------------------------------------


def warmup_cosine(total_steps: int, warmup_ratio: float = 0.03) -> Callable[[int], float]:
    """LR multiplier for ``LambdaLR``: linear warmup over ceil(ratio * total) steps, then cosine.

    step s < w: (s + 1) / w; else 0.5 * (1 + cos(pi * (s - w) / (total - w))).
    """
    warmup = int(math.ceil(warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _world() -> Tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _shard_llm(llm: torch.nn.Module) -> None:
    """FSDP2: shard each decoder layer, then the rest of the LLM."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import fully_shard
        except ImportError as exc:
            raise RuntimeError(
                "multi-process training needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.4)"
            ) from exc
    layers = getattr(getattr(llm, "model", None), "layers", None)
    if layers is None:
        raise RuntimeError("cannot find the LLM's decoder layers (llm.model.layers) to shard")
    for layer in layers:
        fully_shard(layer)
    fully_shard(llm)
    # The text embedding is looked up outside the LLM's forward (to build inputs_embeds): an FSDP
    # forward method on the root gathers the embedding weight for that call.
    from torch.distributed.fsdp import register_fsdp_forward_method

    llm.embed_text = types.MethodType(lambda self, input_ids: self.get_input_embeddings()(input_ids), llm)
    register_fsdp_forward_method(llm, "embed_text")


def _average_replicated_grads(params: Sequence[torch.nn.Parameter], world: int) -> None:
    """Average the gradients of replicated parameters across ranks (sparse: gather touched rows)."""
    import torch.distributed as dist

    for param in params:
        grad = param.grad
        if grad is None:
            continue
        if grad.is_sparse:
            # every rank's touched rows through tensor collectives (no pickling); summed by coalesce
            grad = grad.coalesce()
            indices, values = all_gather_rows(grad.indices()[0], grad.values())
            param.grad = torch.sparse_coo_tensor(indices.unsqueeze(0), values / world, param.shape).coalesce()
        else:
            dist.all_reduce(grad)
            grad.div_(world)


def _batches(n: int, batch_size: int, seed: int, shuffle: bool, rank: int, world: int, min_rows: int = 1,
             whole_job: bool = False):
    """Endless stream of index lists: a (seeded) permutation per epoch, this rank's slice of it
    (an epoch's last batch is skipped when it has fewer than ``min_rows`` rows). ``whole_job``:
    each epoch cut to a multiple of ``world`` rows, so that the ranks' batches together are one
    process's batch of ``world x batch_size`` (the epoch's last ``n % world`` rows wait for the
    next epoch's shuffle)."""
    epoch = 0
    while True:
        if shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        else:
            order = list(range(n))
        if whole_job and world > 1:
            order = order[:len(order) - len(order) % world] or order
        order = order[rank::world] or order[:1]
        for start in range(0, len(order), batch_size):
            if len(order[start:start + batch_size]) >= min(min_rows, len(order)):
                yield order[start:start + batch_size]
        epoch += 1


# ---------------------------------------------------------------------------------------------
# training loop
# ---------------------------------------------------------------------------------------------


def train(
    model: Any,
    dataset: TokenDataset,
    *,
    stage: int = 1,
    steps: int,
    batch_size: int,
    lr: Optional[float] = None,
    warmup_ratio: float = 0.03,
    betas: Tuple[float, float] = (0.9, 0.95),
    weight_decay: float = 0.0,
    seed: int = 0,
    log_every: int = 0,
    out_dir: Optional[PathLike] = None,
    shuffle: bool = True,
    log: Optional[Callable[[str], None]] = None,
    vocab_parallel_c2: bool = True,
) -> List[float]:
    """Train ``model`` (a UnifiedModel) on ``dataset`` for ``steps`` optimizer steps.

    Args:
        stage: 1 (projector only; LLM and C2 frozen) or 2 (all; C2 by ``SparseRowAdamW``).
        lr: peak learning rate (default 1e-3 for stage 1, 1e-5 for stage 2).
        warmup_ratio: fraction of the steps with linear warmup, then cosine decay to 0.
        log_every: print the loss every this many steps (0: never); ``log`` replaces ``print``.
        out_dir: if given, ``model.save_pretrained(out_dir)`` at the end (rank 0).
        shuffle: reshuffle (seeded) each epoch; False iterates rows in order.
        vocab_parallel_c2: with world size > 1 in stage 2, C2 trains sharded by rows across the
            ranks (``u2.distributed.VocabParallelEmbedding``: each rank the gradient and
            SparseRowAdamW state of its rows only); False keeps it replicated with averaged
            row-sparse gradients. Both give the same updates; the full table is gathered back
            into ``model.c2`` at the end.

    Returns:
        the loss of every step (as computed before that step's update).

    Raises:
        ValueError: bad stage / steps / batch_size / lr.
    """
    if stage not in STAGE_LR:
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    lr = STAGE_LR[stage] if lr is None else float(lr)
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if len(dataset) == 0:
        raise ValueError("the dataset is empty")
    torch.manual_seed(seed)
    rank, world = _world()
    device = model.c2.device

    model.train()
    model.llm.requires_grad_(stage == 2)
    model.c2.requires_grad_(stage == 2)
    model.projector.requires_grad_(True)
    if world > 1:
        _shard_llm(model.llm)

    dense_params = [p for p in model.projector.parameters()]
    if stage == 2:
        dense_params += [p for p in model.llm.parameters() if p.requires_grad]
    optimizers = [torch.optim.AdamW(dense_params, lr=lr, betas=betas, weight_decay=weight_decay)]
    sharded_c2 = world > 1 and stage == 2 and vocab_parallel_c2
    if sharded_c2:
        model.c2_shards = VocabParallelEmbedding(model.codebook_size, model.code_dim, weight=model.c2.detach())
        model.c2.requires_grad_(False)
    if stage == 2:
        c2_rows = model.c2_shards.weight if sharded_c2 else model.c2
        optimizers.append(SparseRowAdamW([c2_rows], lr=lr, betas=betas, weight_decay=weight_decay))
    factor = warmup_cosine(steps, warmup_ratio)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, factor) for opt in optimizers]
    replicated = list(model.projector.parameters()) + ([model.c2] if stage == 2 and not sharded_c2 else [])

    use_autocast = device.type == "cuda"
    losses: List[float] = []
    stream = _batches(len(dataset), batch_size, seed, shuffle, rank, world)
    for step in range(steps):
        batch = dataset.collate([dataset[i] for i in next(stream)])
        batch = {k: v.to(device) for k, v in batch.items()}
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_autocast):
            loss = model(batch["visual_ids"], batch["input_ids"], batch["labels"], batch["attention_mask"])
        loss.backward()
        if world > 1:
            _average_replicated_grads(replicated, world)
        for opt in optimizers:
            opt.step()
        for sched in schedulers:
            sched.step()
        losses.append(float(loss.detach()))
        if log_every and rank == 0 and (step % log_every == 0 or step == steps - 1):
            (log or print)(f"step {step + 1}/{steps} loss {losses[-1]:.4f} lr {schedulers[0].get_last_lr()[0]:.3e}")

    if sharded_c2:  # every rank takes part in the gather; C2 is whole (and replicated) again
        with torch.no_grad():
            model.c2.copy_(model.c2_shards.full_weight().to(model.c2.device))
        model.c2_shards = None
        model.c2.requires_grad_(True)
    if out_dir is not None:
        if world > 1:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(model.llm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if rank == 0:
                model.save_pretrained(out_dir, state_dict=full)
        else:
            model.save_pretrained(out_dir)
    return losses


# ---------------------------------------------------------------------------------------------
# the whole model: L_UND + L_GEN + L_CL, checkpoints, exact resume
# ---------------------------------------------------------------------------------------------

#: the paper's stages: what trains and the peak lr (AdamW betas (0.9, 0.95), 3% warmup, cosine)
STAGES = {"stage1": ("new", 1e-3), "stage1.5": ("all", 1e-5), "stage2": ("all", 1e-5)}
LOSS_NAMES = ("loss_und", "loss_gen", "loss_cl")
TRAINER_STATE = "trainer_state.pt"
METRICS_FILE = "metrics.jsonl"
MAPPER_SUBDIR = "mapper"


def _grad_norms(groups: Dict[str, List[torch.nn.Parameter]], replicated: Sequence[str], world: int,
                device: torch.device) -> Dict[str, float]:
    """The gradient norm of each parameter group, over the whole job: the shards' parts (FSDP's
    DTensor shards, the row shards of C2 and the head) add up across ranks; a replicated group
    (the same averaged gradient on every rank) counts once."""
    import torch.distributed as dist

    squares = torch.zeros(len(groups), dtype=torch.float64, device=device)
    for i, (name, params) in enumerate(groups.items()):
        for param in params:
            grad = param.grad
            if grad is None:
                continue
            if grad.is_sparse:
                grad = grad.coalesce().values()
            elif hasattr(grad, "to_local"):
                grad = grad.to_local()
            squares[i] += grad.detach().double().pow(2).sum().to(device)
        if world > 1 and name in replicated:
            squares[i] /= world
    if world > 1:
        dist.all_reduce(squares)
    return {name: float(v) for name, v in zip(groups, squares.sqrt().tolist())}


def _keep_metrics(path: str, last_step: int) -> None:
    """Drop the records after ``last_step`` from a metrics file (a rerun or resume in the same
    folder continues it instead of appending a second history)."""
    if not os.path.isfile(path):
        return
    lines = []
    with open(path, encoding="utf-8") as file:
        for line in file:
            try:
                record = json.loads(line)
            except ValueError:  # a line torn by a kill mid-append: the step is rerun anyway
                continue
            if isinstance(record, dict) and record.get("step", 0) <= last_step:
                lines.append(line if line.endswith("\n") else line + "\n")
    from ._io import atomic_write_text

    atomic_write_text(path, "".join(lines))


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step}"


def train_unified(
    model: Any,
    dataset: TokenDataset,
    *,
    steps: int,
    batch_size: int,
    mapper: Any = None,
    text_encoder: Any = None,
    trainable: str = "all",
    lr: float = 1e-5,
    grad_accum: int = 1,
    loss_weights: Optional[Dict[str, float]] = None,
    temperature: float = 0.07,
    warmup_ratio: float = 0.03,
    betas: Tuple[float, float] = (0.9, 0.95),
    weight_decay: float = 0.0,
    seed: int = 0,
    out_dir: Optional[PathLike] = None,
    checkpoint_every: int = 0,
    resume_from: Optional[PathLike] = None,
    save_extra: Optional[Callable[[str], None]] = None,
    progress: bool = True,
) -> List[Dict[str, float]]:
    """Train the whole model on image-caption rows: L_UND (image, then caption), L_GEN (caption
    as the prompt, then the image's visual ids) and L_CL (InfoNCE between the mapper's pooled
    output on the image's C2 rows and the frozen text encoder's embedding of the caption).

    Every row of a batch serves all three losses; the step minimises their weighted sum.

    Args:
        model: a UnifiedModel with a visual head (``init_visual_head``).
        dataset: a TokenDataset (visual ids + captions).
        mapper, text_encoder: a ConditioningMapper and a FrozenTextEncoder, both or neither (no L_CL).
        trainable: "new" (stage 1: projector, visual head and mapper; LLM and C2 frozen) or "all"
            (stages 1.5 / 2: also the LLM, and C2 through ``u2.SparseRowAdamW``).
        grad_accum: micro-batches of ``batch_size`` rows per optimizer step (losses averaged).
        loss_weights: {"loss_und", "loss_gen", "loss_cl"} -> weight (default 1 each).
        out_dir: metrics.jsonl (one JSON object per step, appended as it happens), checkpoints
            and the final model (``model.save_pretrained`` + ``mapper/`` + ``save_extra(out_dir)``).
        checkpoint_every: every this many steps (0: never) write ``out_dir/checkpoint-STEP``: the
            same layout plus ``trainer_state.pt`` (optimizers, schedules, step, RNG), assembled in
            a temporary folder and renamed into place.
        resume_from: a checkpoint folder: the caller loads the model and mapper from it, this
            restores the rest and continues at the next step -- the same losses as the
            uninterrupted run (same data order, optimizer moments and schedule).

    Returns:
        the metrics of every step run here: {"step", "loss", "loss_und", "loss_gen"[, "loss_cl"], "lr",
        "grad_norm" (per parameter group: llm, c2, visual_head, projector, mapper), "seconds"}.

    Under torchrun (torch.distributed initialised, world size > 1): FSDP2 shards the LLM's
    layers; C2 and the visual head are sharded by rows (``u2.distributed.VocabParallelEmbedding``:
    each rank its rows and their optimizer state; L_GEN by ``u2.distributed.large_vocab_cross_entropy``
    over every rank's rows); projector and mapper stay replicated, their gradients averaged; each
    rank reads its slice of every epoch, so the job's batch is world x batch_size rows and the
    losses are those of one process on that batch: L_UND divides by the job's token count, L_CL
    and L_GEN run over the job's rows (gathered). Rank 0 writes the metrics and the final model
    (the shards gathered back). Checkpoints and resume run in one process only, for now.

    Raises:
        ValueError: bad arguments; a checkpoint written by a run with other settings (steps, batch
            size, accumulation, seed, trainable set, lr, loss weights, schedule); no visual head;
            checkpoints or a tied head under torchrun.
    """
    import shutil
    import time

    import torch.distributed as dist
    from tqdm import tqdm

    if steps < 1 or batch_size < 1 or grad_accum < 1:
        raise ValueError(f"steps, batch_size and grad_accum must be >= 1, got {steps}, {batch_size}, {grad_accum}")
    if trainable not in ("new", "all"):
        raise ValueError(f"trainable must be 'new' or 'all', got {trainable!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if (mapper is None) != (text_encoder is None):
        raise ValueError("L_CL needs both a mapper and a text encoder (or neither)")
    if getattr(model, "visual_head_mode", None) is None:
        raise ValueError("the model has no visual head for L_GEN: call model.init_visual_head() first")
    if model.visual_head_mode == "tied" and trainable == "all":
        raise ValueError("a tied visual head gives C2 a dense gradient; train C2 with an untied head")
    if len(dataset) == 0:
        raise ValueError("the dataset is empty")
    weights = {name: 1.0 for name in LOSS_NAMES}
    if loss_weights:
        unknown = set(loss_weights) - set(LOSS_NAMES)
        if unknown:
            raise ValueError(f"unknown loss weights {sorted(unknown)}; expected {LOSS_NAMES}")
        weights.update({k: float(v) for k, v in loss_weights.items()})
        if not all(math.isfinite(v) and v >= 0 for v in weights.values()) or not sum(weights.values()) > 0:
            raise ValueError(f"loss weights must be finite, >= 0 and not all 0, got {weights}")
    if mapper is None:
        weights.pop("loss_cl")
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0, got {checkpoint_every}")
    if (checkpoint_every or resume_from is not None) and out_dir is None:
        raise ValueError("checkpoints need an out_dir")
    rank, world = _world()
    sharded = world > 1
    if sharded and (checkpoint_every or resume_from is not None):
        raise ValueError("checkpoints and resume of whole-model training under torchrun are not built yet: "
                         "run without checkpoint_every / resume_from (or in one process)")
    if sharded and model.visual_head_mode == "tied":
        raise ValueError("under torchrun the visual head is sharded by rows: it must be untied")
    device = model.c2.device

    model.train()
    model.llm.requires_grad_(trainable == "all")
    model.c2.requires_grad_(trainable == "all")
    head = model.visual_head
    if sharded:
        # FSDP2 on the LLM; C2 and the visual head sharded by rows (each rank its rows and their
        # optimizer state); projector and mapper replicated, their gradients averaged
        _shard_llm(model.llm)
        model.c2_shards = VocabParallelEmbedding(model.codebook_size, model.code_dim, weight=model.c2.detach())
        model.c2_shards.weight.requires_grad_(trainable == "all")
        model.c2.requires_grad_(False)
        model.head_shards = VocabParallelEmbedding(model.codebook_size, head.shape[1], weight=head.detach())
        head.requires_grad_(False)
        head = model.head_shards.weight
    dense = list(model.projector.parameters())
    replicated = list(model.projector.parameters())
    if head is not None:
        head.requires_grad_(True)
        dense.append(head)
    if mapper is not None:
        mapper.train()
        mapper.requires_grad_(True)
        dense += list(mapper.parameters())
        replicated += list(mapper.parameters())
    if trainable == "all":
        dense += [p for p in model.llm.parameters() if p.requires_grad]
    optimizers = [torch.optim.AdamW(dense, lr=lr, betas=betas, weight_decay=weight_decay)]
    norm_groups = {"llm": list(model.llm.parameters()), "c2": [model.c2_shards.weight if sharded else model.c2],
                   "visual_head": [head] if head is not None else [], "projector": list(model.projector.parameters()),
                   "mapper": list(mapper.parameters()) if mapper is not None else []}
    if trainable == "all":
        c2_rows = model.c2_shards.weight if sharded else model.c2
        optimizers.append(SparseRowAdamW([c2_rows], lr=lr, betas=betas, weight_decay=weight_decay))
    factor = warmup_cosine(steps, warmup_ratio)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, factor) for opt in optimizers]
    # what a resumed run must share with the one that wrote the checkpoint (the saved optimizer
    # state would silently override a new lr; the rest changes the losses)
    run_key = {"steps": steps, "batch_size": batch_size, "grad_accum": grad_accum, "seed": seed, "trainable": trainable,
               "lr": lr, "loss_weights": weights, "temperature": float(temperature), "warmup_ratio": warmup_ratio,
               "betas": list(betas), "weight_decay": weight_decay}

    start = 0
    if resume_from is not None:
        state_path = os.path.join(os.fspath(resume_from), TRAINER_STATE)
        if not os.path.isfile(state_path):
            raise FileNotFoundError(f"not a checkpoint (no {TRAINER_STATE}): {resume_from}")
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        differs = {k: (state["run"].get(k), v) for k, v in run_key.items() if state["run"].get(k) != v}
        if differs:
            raise ValueError("the checkpoint was written by a run with other settings (saved, given): "
                             + ", ".join(f"{k} {a!r} vs {b!r}" for k, (a, b) in differs.items()))
        for opt, saved in zip(optimizers, state["optimizers"]):
            opt.load_state_dict(saved)
        for sched, saved in zip(schedulers, state["schedulers"]):
            sched.load_state_dict(saved)
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        start = int(state["step"])
    else:
        torch.manual_seed(seed)

    out = None if out_dir is None else os.fspath(out_dir)
    if out is not None:
        if resume_from is not None:
            checkpoint_dir = os.path.abspath(os.fspath(resume_from))
            if os.path.abspath(out) == checkpoint_dir or os.path.abspath(out).startswith(checkpoint_dir + os.sep):
                raise ValueError(f"out_dir {out} is (inside) the checkpoint being resumed: write the run to its "
                                 "parent or elsewhere")
        stale = [name for name in os.listdir(out) if name.startswith("checkpoint-")] if os.path.isdir(out) else []
        later = [n for n in stale if not n[len("checkpoint-"):].isdigit() or int(n[len("checkpoint-"):]) > start]
        if later:
            raise ValueError(f"{out} already holds {', '.join(sorted(later))} from another run: write to an empty folder"
                             " (or resume from its checkpoint)")
        os.makedirs(out, exist_ok=True)
        if rank == 0:
            _keep_metrics(os.path.join(out, METRICS_FILE), start)
    # InfoNCE needs two rows: an epoch's one-row remainder is skipped when L_CL is on
    # (under torchrun each rank its slice of every epoch, the job's batch being world x batch_size)
    if sharded and len(dataset) < world:
        raise ValueError(f"{len(dataset)} rows for {world} ranks: every rank needs rows of its own")
    stream = _batches(len(dataset), batch_size, seed, True, rank, world,
                      min_rows=2 if mapper is not None and not sharded else 1, whole_job=True)
    for _ in range(start * grad_accum):  # the data the steps before the checkpoint consumed
        next(stream)

    def save(directory: str, with_state: bool, step: int, llm_state: Any = None) -> None:
        model.save_pretrained(directory, state_dict=llm_state)
        if mapper is not None:
            mapper.save_pretrained(os.path.join(directory, MAPPER_SUBDIR))
        if save_extra is not None:
            save_extra(directory)
        if with_state:
            torch.save({"run": run_key, "step": step, "rng": torch.get_rng_state(),
                        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                        "optimizers": [opt.state_dict() for opt in optimizers],
                        "schedulers": [sched.state_dict() for sched in schedulers]},
                       os.path.join(directory, TRAINER_STATE))

    def checkpoint(step: int) -> None:
        final = os.path.join(out, checkpoint_name(step))
        tmp, old = final + ".tmp", final + ".old"
        for path in (tmp, old):
            shutil.rmtree(path, ignore_errors=True)
        save(tmp, True, step)
        if os.path.exists(final):
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)

    history: List[Dict[str, float]] = []
    bar = tqdm(total=steps, initial=start, desc="train", unit="step", disable=not progress or rank != 0)
    for step in range(start, steps):
        began = time.perf_counter()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        sums = {name: 0.0 for name in weights}
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
        for _ in range(grad_accum):
            index = next(stream)
            rows = [dataset[i] for i in index]
            und = {k: v.to(device) for k, v in dataset.collate(rows).items()}
            gen = {k: v.to(device) for k, v in dataset.collate_generation(rows).items()}
            # L_UND: summed token losses over the job's count of caption tokens (per rank: its sum
            # over count / world, so the averaged gradients are the job's token mean)
            count = (und["labels"] != -100).sum().to(torch.float64)
            if sharded:
                dist.all_reduce(count)
            with autocast:
                parts = model.losses(und, gen, num_items=float(count) / world)
                parts.pop("loss")
                if mapper is not None:
                    mapped = mapper(model.code_embeddings(gen["visual_ids"]))
                    text = text_encoder.encode([dataset.captions[i] for i in index]).to(device)
                    if sharded:  # InfoNCE over the whole job's pairs, as one process would see them
                        mapped = dataclasses.replace(mapped, pooled_prompt_embeds=gather_batch(mapped.pooled_prompt_embeds))
                        text = gather_batch(text)
                    parts["loss_cl"] = mapper.contrastive_loss(mapped, text, temperature)
            total = sum(weights[name] * parts[name] for name in weights) / grad_accum
            total.backward()
            for name in weights:
                sums[name] += float(parts[name].detach()) / grad_accum
        if sharded:
            _average_replicated_grads(replicated, world)
            # the job's losses: L_UND's per-rank parts add up; L_GEN and L_CL are the same on every rank
            values = torch.tensor([sums[name] for name in weights], dtype=torch.float64, device=count.device)
            dist.all_reduce(values)
            sums = {name: float(v) / world for name, v in zip(weights, values.tolist())}
        grad_norm = _grad_norms(norm_groups, ("projector", "mapper"), world, count.device)
        for opt in optimizers:
            opt.step()
        lr_now = schedulers[0].get_last_lr()[0]
        for sched in schedulers:
            sched.step()
        record = {"step": step + 1, "loss": sum(weights[n] * sums[n] for n in weights), **sums, "lr": lr_now,
                  "grad_norm": grad_norm, "seconds": time.perf_counter() - began}
        history.append(record)
        if out is not None and rank == 0:
            with open(os.path.join(out, METRICS_FILE), "a", encoding="utf-8") as file:
                file.write(json.dumps(record) + "\n")
        bar.update(1)
        bar.set_postfix({k.replace("loss_", ""): f"{v:.3f}" for k, v in sums.items()})
        if out is not None and checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            checkpoint(step + 1)
    bar.close()
    llm_state = None
    if sharded:  # every rank takes part in the gathers; the model is whole (and replicated) again
        with torch.no_grad():
            model.c2.copy_(model.c2_shards.full_weight().to(model.c2.device))
            model.visual_head.copy_(model.head_shards.full_weight().to(model.visual_head.device))
        model.c2_shards = model.head_shards = None
        model.visual_head.requires_grad_(True)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        llm_state = get_model_state_dict(model.llm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if out is not None and rank == 0:
        save(out, False, steps, llm_state)
        stale_state = os.path.join(out, TRAINER_STATE)
        if os.path.exists(stale_state):  # the final model is not a checkpoint to resume
            os.remove(stale_state)
    return history
