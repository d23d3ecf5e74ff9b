"""The understanding side of UniCode^2: visual token ids -> C2 rows -> MLP projector -> Qwen2 LLM.

``UnifiedModel`` computes L_UND, the next-token cross-entropy on the text conditioned on the
visual tokens (and, with a visual head, L_GEN: the K-way prediction of an image's visual tokens
from its prompt, see ``generation_loss``): the LLM gets ``inputs_embeds = [projector(C2[visual_ids]) ; embed(input_ids)]`` and
the visual positions are labelled -100, so only text tokens are scored. The C2 lookup is
``u2.gathered_embedding``: its gradient is row-sparse (train C2 with ``u2.SparseRowAdamW``).

The LLM is ``transformers.Qwen2ForCausalLM`` as is; transformers is imported on first use.
"""
from __future__ import annotations

import inspect
import json
import os
from typing import Any, Dict, Optional, Union

import safetensors.torch
import torch
from torch import nn

from .._io import atomic_write, atomic_write_text, load_json
from ..codebook import Codebook
from ..cross_entropy import large_vocab_cross_entropy
from ..distributed import gather_batch
from ..distributed import large_vocab_cross_entropy as vocab_parallel_cross_entropy
from ..embedding import gathered_embedding

PathLike = Union[str, "os.PathLike[str]"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
LLM_SUBDIR = "llm"
_FORMAT = "unicode2_fast.unified_model"
_VERSION = 1


def _codebook_vectors(codebook: Any) -> torch.Tensor:
    """(K, d) tensor from a Codebook, a path to a codebook .safetensors, or a (K, d) tensor."""
    if isinstance(codebook, (str, os.PathLike)):
        codebook = Codebook.load(codebook)
    if isinstance(codebook, Codebook):
        return codebook.vectors.detach()
    codebook = Codebook(codebook)  # validates shape / dtype / finiteness
    return codebook.vectors.detach()


#: seed of a fresh projector's initialisation (the same on every rank and every run)
PROJECTOR_SEED = 0
#: C2 rows projected at a time when the visual head is initialised
_HEAD_INIT_ROWS = 1 << 14


class UnifiedModel(nn.Module):
    """C2 table -> MLP projector -> Qwen2ForCausalLM (through ``inputs_embeds``).

    Args:
        llm: a ``transformers.Qwen2ForCausalLM`` (any causal LM taking ``inputs_embeds`` works).
        codebook: (K, d) initial value of C2 (a Codebook, a codebook path or a tensor); C2 is a
            float32 copy of C1 (the cascade's initialisation).
        projector_hidden: hidden width of the projector (default: the LLM's hidden size).

    Attributes:
        c2: (K, d) ``nn.Parameter``. projector: Linear(d, h) -> GELU -> Linear(h, h), with h the
        LLM's hidden size. llm: the language model.
    """

    def __init__(self, llm: nn.Module, codebook: Any, projector_hidden: Optional[int] = None) -> None:
        super().__init__()
        vectors = _codebook_vectors(codebook)
        hidden = int(llm.config.hidden_size)
        projector_hidden = hidden if projector_hidden is None else int(projector_hidden)
        self.llm = llm
        self.c2 = nn.Parameter(vectors.to(torch.promote_types(vectors.dtype, torch.float32), copy=True).cpu())
        # a fixed seed, not the global generator: every rank of a distributed job (and every
        # rerun) starts from the same projector, whose gradients are then averaged across ranks
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(PROJECTOR_SEED)
            self.projector = nn.Sequential(
                nn.Linear(vectors.shape[1], projector_hidden), nn.GELU(), nn.Linear(projector_hidden, hidden)
            )
        device = next(llm.parameters()).device
        self.c2.data = self.c2.data.to(device)
        self.projector.to(device)
        # set by training under torchrun: a u2.distributed.VocabParallelEmbedding serving C2's rows
        # (sharded, with their optimizer state) instead of the replicated ``c2``
        self.c2_shards: Optional[nn.Module] = None
        # the visual head (see init_visual_head): None (no head), "untied" or "tied"
        self.visual_head_mode: Optional[str] = None
        self.visual_head: Optional[nn.Parameter] = None
        # set by whole-model training under torchrun: a u2.distributed.VocabParallelEmbedding holding
        # this rank's rows of the (untied) visual head; L_GEN is then the vocab-parallel CE over
        # every rank's rows (see generation_loss)
        self.head_shards: Optional[nn.Module] = None

    @property
    def codebook_size(self) -> int:
        return int(self.c2.shape[0])

    @property
    def code_dim(self) -> int:
        return int(self.c2.shape[1])

    def visual_embeds(self, visual_ids: torch.Tensor) -> torch.Tensor:
        """(B, P) ids -> (B, P, hidden) LLM input embeddings (row-sparse gradient to C2, or to the
        owners of the rows when ``c2_shards`` serves them)."""
        if self.c2_shards is not None:
            return self.projector(self.c2_shards(visual_ids))
        return self.projector(gathered_embedding(visual_ids, self.c2))

    def code_embeddings(self, visual_ids: torch.Tensor) -> torch.Tensor:
        """(B, P) ids -> (B, P, d) C2 rows, E_vis(v): what the mapper maps for the decoder (row-sparse
        gradient to C2, as in ``visual_embeds``)."""
        if self.c2_shards is not None:
            return self.c2_shards(visual_ids)
        return gathered_embedding(visual_ids, self.c2)

    def build_inputs(
        self,
        visual_ids: torch.Tensor,
        input_ids: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """``inputs_embeds`` (B, P+T, h), ``attention_mask`` (B, P+T) and ``labels`` (B, P+T)."""
        if visual_ids.dim() != 2 or input_ids.dim() != 2 or visual_ids.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"visual_ids must be (B, P) and input_ids (B, T) with the same B, got "
                f"{tuple(visual_ids.shape)} and {tuple(input_ids.shape)}"
            )
        # embed_text: a sharded LLM's FSDP forward method (see train._shard_llm); else the table
        embed = getattr(self.llm, "embed_text", None) or self.llm.get_input_embeddings()
        text = embed(input_ids)  # (B, T, h)
        visual = self.visual_embeds(visual_ids).to(text.dtype)  # (B, P, h)
        batch, num_visual = visual_ids.shape
        out = {"inputs_embeds": torch.cat([visual, text], dim=1)}
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        visual_mask = torch.ones((batch, num_visual), dtype=attention_mask.dtype, device=attention_mask.device)
        out["attention_mask"] = torch.cat([visual_mask, attention_mask], dim=1)
        if labels is not None:
            ignore = torch.full((batch, num_visual), -100, dtype=labels.dtype, device=labels.device)
            out["labels"] = torch.cat([ignore, labels], dim=1)
        return out

    def forward(
        self,
        visual_ids: torch.Tensor,
        input_ids: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        *,
        num_items: Optional[float] = None,
    ) -> torch.Tensor:
        """L_UND: the LLM's next-token CE on the text part (visual positions labelled -100).

        ``labels`` defaults to ``input_ids`` (with -100 where ``attention_mask`` is 0).
        ``num_items``: divide the summed token losses by this instead of this batch's own count of
        labelled tokens (data-parallel training: the whole job's count over the world size, so
        that averaging the ranks' gradients gives the token mean over the whole job's batch).
        """
        if labels is None:
            labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, -100)
        inputs = self.build_inputs(visual_ids, input_ids, labels, attention_mask)
        if num_items is None:
            return self.llm(**inputs).loss
        targets = inputs.pop("labels")
        logits = self.llm(**inputs).logits[:, :-1].float()  # position t predicts token t + 1, as the LLM's own loss
        total = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets[:, 1:].reshape(-1),
                                                  ignore_index=-100, reduction="sum")
        return total / num_items

    # -- generation: the visual head and L_GEN --------------------------------------------------

    def init_visual_head(self, tied: bool = False) -> None:
        """Add the head that scores the K visual ids from the LLM's hidden states (L_GEN).

        Untied (default): a (K, h) parameter ``visual_head`` initialised to the projected C2 rows,
        ``projector(C2)`` -- the embeddings the LLM reads for those tokens, so predicting a token
        starts as matching its own input embedding. Tied: no new parameter; every call scores
        against ``projector(C2)`` as it is then (K x d x h multiply-adds per call, and C2 gets a
        dense K x d gradient from L_GEN; not available while C2 is sharded across ranks).
        """
        self.visual_head_mode = "tied" if tied else "untied"
        if tied:
            self.visual_head = None
            return
        with torch.no_grad():
            rows = torch.cat([self.projector(self.c2[start:start + _HEAD_INIT_ROWS])
                              for start in range(0, self.codebook_size, _HEAD_INIT_ROWS)])
        self.visual_head = nn.Parameter(rows.contiguous())

    def visual_head_weight(self) -> torch.Tensor:
        """(K, h) the visual head's classifier (the projected C2 rows when tied)."""
        if self.visual_head_mode is None:
            raise RuntimeError("this model has no visual head: call init_visual_head() first")
        if self.visual_head_mode == "tied":
            if self.c2_shards is not None:
                raise RuntimeError("a tied visual head needs the whole C2 table; it is sharded across the ranks "
                                   "(train with an untied head, or --replicate-c2)")
            return self.projector(self.c2)  # K x d x h per call, and a dense gradient to C2
        return self.visual_head

    def generation_loss(
        self,
        prompt_ids: torch.Tensor,
        visual_ids: torch.Tensor,
        prompt_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """L_GEN = -mean_t log P(v_t | v_<t, prompt) over the K visual ids (B x P terms).

        The sequence is the prompt, then the image's visual tokens (their projected C2 rows); the
        hidden state before visual token t (the last prompt position for t = 0) is scored against
        the visual head with ``u2.large_vocab_cross_entropy`` (never B x P x K logits).

        Args:
            prompt_ids: (B, T) text token ids (right-padded where ``prompt_mask`` is 0: the
                prompt must then be left-padded instead, so that every prompt ends at T - 1).
            visual_ids: (B, P) int64 in [0, K). prompt_mask: optional (B, T) attention mask.
        """
        if prompt_ids.dim() != 2 or visual_ids.dim() != 2 or prompt_ids.shape[0] != visual_ids.shape[0]:
            raise ValueError(f"prompt_ids must be (B, T) and visual_ids (B, P) with the same B, got "
                             f"{tuple(prompt_ids.shape)} and {tuple(visual_ids.shape)}")
        if prompt_mask is not None and bool((prompt_mask[:, -1] == 0).any()):
            raise ValueError("prompts must be left-padded (prompt_mask[:, -1] == 1): the first visual token "
                             "is predicted from the last prompt position")
        embed = getattr(self.llm, "embed_text", None) or self.llm.get_input_embeddings()
        text = embed(prompt_ids)  # (B, T, h)
        visual = self.visual_embeds(visual_ids).to(text.dtype)  # (B, P, h)
        batch, num_prompt = prompt_ids.shape
        num_visual = visual_ids.shape[1]
        if prompt_mask is None:
            prompt_mask = torch.ones_like(prompt_ids)
        mask = torch.cat([prompt_mask, torch.ones((batch, num_visual), dtype=prompt_mask.dtype,
                                                  device=prompt_mask.device)], dim=1)
        out = self.llm(inputs_embeds=torch.cat([text, visual], dim=1), attention_mask=mask, output_hidden_states=True,
                       **_one_text_logit(self.llm))
        hidden = out.hidden_states[-1]  # (B, T + P, h), after the final norm
        predicting = hidden[:, num_prompt - 1:num_prompt - 1 + num_visual]  # position before each visual token
        rows, targets = predicting.reshape(-1, hidden.shape[-1]), visual_ids.reshape(-1)
        if self.head_shards is not None:
            # data-parallel rows, the head sharded by rows: every rank scores the whole job's rows
            # against its shard (one all-gather of the hidden rows), the log-sum-exp combined across
            # ranks: the mean over the whole job's visual tokens, never N x K on a rank
            group = self.head_shards.group
            return vocab_parallel_cross_entropy(gather_batch(rows, group), self.head_shards.weight.to(rows.dtype),
                                                gather_batch(targets, group), self.head_shards.offset, group)
        return large_vocab_cross_entropy(rows, self.visual_head_weight(), targets)

    @torch.no_grad()
    def generate_visual_ids(
        self,
        prompt_ids: torch.Tensor,
        num_tokens: int = 729,
        *,
        prompt_mask: Optional[torch.Tensor] = None,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        guidance_scale: Optional[float] = None,
        uncond_prompt_ids: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """Sample an image's visual token ids after a prompt, one at a time with the LLM's KV cache.

        Each step scores the K ids with the visual head, samples with ``sampling.sample_ids``
        (temperature, top_k, top_p; no sort of all K), and feeds the chosen id's projected C2 row
        back. ``guidance_scale`` (classifier-free guidance): a second, unconditional stream on
        ``uncond_prompt_ids`` (default: the prompt's last token alone) gives logits u and the
        conditional ones c are replaced by u + scale * (c - u).

        Args:
            prompt_ids: (B, T) left-padded prompts (``prompt_mask`` (B, T), 1 on real tokens).
            num_tokens: visual tokens per image (729 for SigLIP's 27 x 27 grid).

        Returns:
            (B, num_tokens) int64 ids in [0, K).
        """
        from .sampling import sample_ids

        if prompt_ids.dim() != 2 or prompt_ids.shape[1] == 0:
            raise ValueError(f"prompt_ids must be (B, T) with T >= 1, got {tuple(prompt_ids.shape)}")
        if not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(f"num_tokens must be a positive int, got {num_tokens!r}")
        head = self.visual_head_weight()
        streams = [self._stream(prompt_ids, prompt_mask)]
        if guidance_scale is not None:
            uncond = prompt_ids[:, -1:] if uncond_prompt_ids is None else uncond_prompt_ids
            streams.append(self._stream(uncond, None))
        out = torch.empty((prompt_ids.shape[0], num_tokens), dtype=torch.int64, device=prompt_ids.device)
        for t in range(num_tokens):
            logits = [stream.hidden @ head.t() for stream in streams]  # (B, K) each
            if guidance_scale is not None:
                logits[0] = logits[1] + guidance_scale * (logits[0] - logits[1])
            ids = sample_ids(logits[0], temperature, top_k, top_p, generator)
            out[:, t] = ids
            if t + 1 < num_tokens:
                embeds = self.visual_embeds(ids.unsqueeze(1))
                for stream in streams:
                    stream.advance(self.llm, embeds)
        return out

    def _stream(self, prompt_ids: torch.Tensor, prompt_mask: Optional[torch.Tensor]) -> "_DecodeStream":
        embed = getattr(self.llm, "embed_text", None) or self.llm.get_input_embeddings()
        mask = torch.ones_like(prompt_ids) if prompt_mask is None else prompt_mask
        if bool((mask[:, -1] == 0).any()):
            raise ValueError("prompts must be left-padded (prompt_mask[:, -1] == 1)")
        stream = _DecodeStream(mask)
        stream.advance(self.llm, embed(prompt_ids))
        return stream

    def losses(self, und: Optional[Dict[str, torch.Tensor]] = None,
               gen: Optional[Dict[str, torch.Tensor]] = None, *, num_items: Optional[float] = None) -> Dict[str, torch.Tensor]:
        """L_UND on the understanding rows and L_GEN on the generation rows of a mixed batch.

        ``und``: {visual_ids, input_ids[, labels, attention_mask]} (image, then text);
        ``gen``: {prompt_ids, visual_ids[, prompt_mask]} (prompt, then image tokens).
        Returns {"loss_und", "loss_gen", "loss"} (the sum; an absent part is left out).
        ``num_items``: L_UND's divisor (see ``forward``).
        """
        if und is None and gen is None:
            raise ValueError("give understanding rows (und), generation rows (gen) or both")
        out: Dict[str, torch.Tensor] = {}
        if und is not None:
            out["loss_und"] = self(und["visual_ids"], und["input_ids"], und.get("labels"), und.get("attention_mask"),
                                   num_items=num_items)
        if gen is not None:
            out["loss_gen"] = self.generation_loss(gen["prompt_ids"], gen["visual_ids"], gen.get("prompt_mask"))
        out["loss"] = sum(out.values())
        return out

    # -- persistence ---------------------------------------------------------------------------

    def save_pretrained(self, save_directory: PathLike, *, save_llm: bool = True, state_dict=None) -> None:
        """Write ``config.json`` + ``model.safetensors`` (projector and C2), each atomically, and
        (``save_llm``) the LLM under ``llm/`` with its own ``save_pretrained``.

        ``state_dict``: optional full LLM state dict (e.g. gathered from FSDP2 shards).
        """
        directory = os.fspath(save_directory)
        os.makedirs(directory, exist_ok=True)
        tensors = {"c2": self.c2.detach()}
        tensors.update({f"projector.{k}": v.detach() for k, v in self.projector.state_dict().items()})
        if self.visual_head is not None:
            tensors["visual_head"] = self.visual_head.detach()
        tensors = {k: v.cpu().contiguous() for k, v in tensors.items()}
        atomic_write(
            os.path.join(directory, WEIGHTS_NAME),
            lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata={"format": _FORMAT}),
        )
        if save_llm:
            kwargs = {} if state_dict is None else {"state_dict": state_dict}
            self.llm.save_pretrained(os.path.join(directory, LLM_SUBDIR), **kwargs)
        config = {
            "format": _FORMAT,
            "version": _VERSION,
            "codebook_size": self.codebook_size,
            "code_dim": self.code_dim,
            "projector_hidden": int(self.projector[0].out_features),
            "hidden_size": int(self.projector[2].out_features),
            "llm": LLM_SUBDIR if save_llm else None,
            "visual_head": self.visual_head_mode,
        }
        text = json.dumps(config, indent=2) + "\n"
        atomic_write_text(os.path.join(directory, CONFIG_NAME), text)

    @classmethod
    def from_pretrained(
        cls,
        path: PathLike,
        codebook: Any = None,
        *,
        llm_path: Optional[PathLike] = None,
        device: Optional[Union[str, torch.device]] = None,
        torch_dtype: Optional[torch.dtype] = None,
        projector_hidden: Optional[int] = None,
    ) -> "UnifiedModel":
        """Load a model.

        ``path`` is either a directory written by :meth:`save_pretrained` (C2, projector and the
        LLM under ``llm/``, or ``llm_path`` when it was saved without the LLM), or a Qwen2 LLM
        directory, in which case ``codebook`` (Codebook, path or tensor) initialises C2 and the
        projector is freshly initialised.

        Raises:
            FileNotFoundError: a missing directory / file.
            ValueError: a foreign or inconsistent saved model; no codebook for a fresh model.
        """
        from transformers import Qwen2ForCausalLM

        directory = os.fspath(path)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"model directory not found: {directory}")
        config = _read_config(os.path.join(directory, CONFIG_NAME))
        kwargs = {} if torch_dtype is None else {"dtype": torch_dtype}
        if config is None:  # a plain LLM
            if codebook is None:
                raise ValueError("a codebook is needed to build a UnifiedModel on a plain LLM directory")
            llm = Qwen2ForCausalLM.from_pretrained(directory, **kwargs)
            if device is not None:
                llm.to(device)
            return cls(llm, codebook, projector_hidden)
        source = llm_path if llm_path is not None else (
            os.path.join(directory, config["llm"]) if config.get("llm") else None)
        if source is None:
            raise ValueError(f"{directory} was saved without its LLM: pass llm_path")
        llm = Qwen2ForCausalLM.from_pretrained(os.fspath(source), **kwargs)
        if device is not None:
            llm.to(device)
        weights_path = os.path.join(directory, WEIGHTS_NAME)
        if not os.path.isfile(weights_path):
            raise FileNotFoundError(f"weights file not found: {weights_path}")
        tensors = safetensors.torch.load_file(weights_path)
        if "c2" not in tensors or tuple(tensors["c2"].shape) != (config["codebook_size"], config["code_dim"]):
            raise ValueError(f"{weights_path}: missing or mis-shaped tensor 'c2'")
        if int(llm.config.hidden_size) != config["hidden_size"]:
            raise ValueError(
                f"LLM hidden size {llm.config.hidden_size} != saved projector output {config['hidden_size']}")
        model = cls(llm, tensors["c2"], config["projector_hidden"])
        projector_state = {k[len("projector."):]: v for k, v in tensors.items() if k.startswith("projector.")}
        model.projector.load_state_dict(projector_state)
        head = config.get("visual_head")
        if head == "tied":
            model.init_visual_head(tied=True)
        elif head == "untied":
            if "visual_head" not in tensors or tuple(tensors["visual_head"].shape) != (config["codebook_size"],
                                                                                      config["hidden_size"]):
                raise ValueError(f"{weights_path}: missing or mis-shaped tensor 'visual_head'")
            model.visual_head_mode = "untied"
            model.visual_head = nn.Parameter(tensors["visual_head"].to(model.c2.device))
        return model


def _one_text_logit(llm: nn.Module) -> Dict[str, int]:
    """Keyword that keeps the LLM's text head to one position (its logits are unused here: the
    visual head scores the hidden states), where the LLM takes one: not B x L x V text logits."""
    parameters = inspect.signature(llm.forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in parameters:
            return {name: 1}
    return {}


class _DecodeStream:
    """One sequence batch being decoded: its attention mask, KV cache and last hidden state."""

    def __init__(self, mask: torch.Tensor) -> None:
        self.mask = mask
        self.cache = None
        self.hidden: Optional[torch.Tensor] = None  # (B, h) after the final norm, at the last position
        self._cache_key: Optional[str] = None  # the LLM's name for the KV cache, found on the first call
        self._extra: Dict[str, int] = {}

    def advance(self, llm: nn.Module, embeds: torch.Tensor) -> None:
        """Feed ``embeds`` (B, n, h) (the prompt first, then one visual token per step)."""
        if self.cache is not None:
            ones = torch.ones((self.mask.shape[0], embeds.shape[1]), dtype=self.mask.dtype, device=self.mask.device)
            self.mask = torch.cat([self.mask, ones], dim=1)
        if self._cache_key is None:  # once per stream: the signature does not change between tokens
            # transformers 5 names the KV cache "cache"; earlier versions "past_key_values"
            self._cache_key = "cache" if "cache" in inspect.signature(llm.forward).parameters else "past_key_values"
            self._extra = _one_text_logit(llm)
        out = llm(inputs_embeds=embeds.to(llm.get_input_embeddings().weight.dtype), attention_mask=self.mask,
                  use_cache=True, output_hidden_states=True, **{self._cache_key: self.cache}, **self._extra)
        cache = getattr(out, "cache", None)
        self.cache = cache if cache is not None else out.past_key_values
        self.hidden = out.hidden_states[-1][:, -1]


def _read_config(path: str) -> Optional[Dict[str, Any]]:
    """The saved UnifiedModel config, or None when ``path`` is a plain (LLM) config."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config not found: {path}")
    try:
        config = load_json(path)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    if not isinstance(config, dict) or config.get("format") != _FORMAT:
        return None
    if config.get("version") != _VERSION:
        raise ValueError(f"{path}: unsupported version {config.get('version')!r}")
    return config
