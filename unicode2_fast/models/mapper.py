"""The mapper M_phi of UniCode^2's generation path and its contrastive loss L_CL.

The LLM predicts visual token ids; their C2 rows (B, T, d) are mapped into the conditioning space
of a frozen diffusion decoder: FLUX.1 takes ``prompt_embeds`` (B, T' <= 512, 4096) and
``pooled_prompt_embeds`` (B, 768); SDXL takes ``prompt_embeds`` (B, 77, 2048) and pooled
embeddings (B, 1280) beside its time ids. The sizes are read from the decoder's own config
(``conditioning_sizes``), so a decoder loaded with ``from_pretrained`` fixes them. L_CL is InfoNCE
(``u2.info_nce``: cosine similarity over a temperature, the batch's other prompts as negatives)
between the pooled mapped embedding and a frozen text encoder's embedding of the prompt
(``FrozenTextEncoder``: any transformers encoder, e.g. FLUX's own CLIP text model).

    mapper = ConditioningMapper.for_decoder(FluxTransformer2DModel.load_config(path, subfolder="transformer"), code_dim=1152)
    out = mapper(c2_rows)                                   # out.prompt_embeds, out.pooled_prompt_embeds
    loss = mapper.contrastive_loss(out, text.encode(prompts))
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Optional, Sequence, Union

import safetensors
import safetensors.torch
import torch
from torch import nn

from .._io import atomic_write, atomic_write_text, load_json
from ..cross_entropy import info_nce

PathLike = Union[str, "os.PathLike[str]"]

#: longest prompt_embeds sequence each decoder takes (FLUX's T5 context, SDXL's CLIP context)
MAX_TOKENS = {"flux": 512, "sdxl": 77}
_FORMAT = "unicode2_fast.conditioning_mapper"
_CONFIG, _WEIGHTS = "config.json", "model.safetensors"
#: SDXL appends six time ids (original size, crop, target size) to the pooled text embedding
SDXL_TIME_IDS = 6


def conditioning_sizes(decoder_config: Any) -> Dict[str, Any]:
    """The conditioning a decoder takes, from its config (a diffusers config, or any mapping).

    FLUX (``FluxTransformer2DModel``): ``joint_attention_dim`` per token and
    ``pooled_projection_dim`` pooled; SDXL (``UNet2DConditionModel`` with
    ``addition_embed_type="text_time"``): ``cross_attention_dim`` per token and
    ``projection_class_embeddings_input_dim - 6 * addition_time_embed_dim`` pooled.

    Returns:
        {"decoder": "flux" | "sdxl", "seq_dim", "pooled_dim", "max_tokens"}.

    Raises:
        ValueError: a config of neither kind (the message names the keys looked for).
    """
    config = dict(decoder_config) if not isinstance(decoder_config, dict) else decoder_config
    if "joint_attention_dim" in config and "pooled_projection_dim" in config:
        return {"decoder": "flux", "seq_dim": int(config["joint_attention_dim"]),
                "pooled_dim": int(config["pooled_projection_dim"]), "max_tokens": MAX_TOKENS["flux"]}
    if config.get("addition_embed_type") == "text_time" and "cross_attention_dim" in config:
        cross = config["cross_attention_dim"]
        cross = cross[-1] if isinstance(cross, (list, tuple)) else cross
        pooled = int(config["projection_class_embeddings_input_dim"]) - SDXL_TIME_IDS * int(config["addition_time_embed_dim"])
        if pooled < 1:
            raise ValueError(f"SDXL config with no room for a pooled text embedding (pooled size {pooled})")
        return {"decoder": "sdxl", "seq_dim": int(cross), "pooled_dim": pooled, "max_tokens": MAX_TOKENS["sdxl"]}
    raise ValueError(
        "not a FLUX or SDXL decoder config: expected joint_attention_dim and pooled_projection_dim (FLUX) or "
        f"addition_embed_type='text_time' with cross_attention_dim (SDXL); got keys {sorted(config)[:20]}"
    )


@dataclasses.dataclass
class MapperOutput:
    """The decoder conditioning: ``prompt_embeds`` (B, T', seq_dim), ``pooled_prompt_embeds`` (B, pooled_dim)."""

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor


class ConditioningMapper(nn.Module):
    """M_phi: C2 embeddings (B, T, d) -> a diffusion decoder's (prompt_embeds, pooled_prompt_embeds).

    Args:
        code_dim: d, the C2 row size. seq_dim, pooled_dim: the decoder's per-token and pooled sizes.
        num_queries: None maps token by token (T' = T); an int makes it a resampler: that many
            learned queries cross-attend to the tokens (T' = num_queries), as a decoder with a
            fixed context (SDXL: 77) or a shorter one than the image's 729 tokens (FLUX: <= 512) needs.
        hidden_dim: width inside the mapper (default: seq_dim). num_heads: of the resampler's attention.
        max_tokens: refuse outputs longer than this (the decoder's context), when given.

    Forward: embeddings (B, T, d) and an optional (B, T) bool ``mask`` (True: a real token) ->
    :class:`MapperOutput`. The pooled vector is a linear map of the (masked) mean of the mapped
    sequence z~, so L_CL on it trains every part of the mapper.
    """

    def __init__(self, code_dim: int, seq_dim: int, pooled_dim: int, *, num_queries: Optional[int] = None,
                 hidden_dim: Optional[int] = None, num_heads: int = 8, max_tokens: Optional[int] = None) -> None:
        super().__init__()
        for name, value in (("code_dim", code_dim), ("seq_dim", seq_dim), ("pooled_dim", pooled_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        hidden_dim = seq_dim if hidden_dim is None else int(hidden_dim)
        if num_queries is not None and (num_queries < 1 or (max_tokens is not None and num_queries > max_tokens)):
            raise ValueError(f"num_queries must lie in [1, {max_tokens}] (the decoder's context), got {num_queries}")
        if num_queries is not None and hidden_dim % num_heads:
            raise ValueError(f"hidden_dim = {hidden_dim} is not divisible by num_heads = {num_heads}")
        self.code_dim, self.seq_dim, self.pooled_dim = code_dim, seq_dim, pooled_dim
        self.num_queries, self.max_tokens = num_queries, max_tokens
        self.decoder: Optional[str] = None  # "flux" / "sdxl" when made by for_decoder
        self.token_mlp = nn.Sequential(nn.LayerNorm(code_dim), nn.Linear(code_dim, hidden_dim), nn.GELU(),
                                       nn.Linear(hidden_dim, hidden_dim))
        if num_queries is not None:
            self.queries = nn.Parameter(torch.randn(num_queries, hidden_dim) * hidden_dim ** -0.5)
            self.attention = nn.MultiheadAttention(hidden_dim, num_heads, batch_first=True)
        self.to_sequence = nn.Linear(hidden_dim, seq_dim)
        self.to_pooled = nn.Linear(seq_dim, pooled_dim)

    @classmethod
    def for_decoder(cls, decoder_config: Any, code_dim: int, **kwargs: Any) -> "ConditioningMapper":
        """A mapper sized for the decoder of ``decoder_config`` (see ``conditioning_sizes``); by
        default a resampler with the decoder's full context of queries (FLUX 512, SDXL 77)."""
        sizes = conditioning_sizes(decoder_config)
        kwargs.setdefault("num_queries", sizes["max_tokens"])
        kwargs.setdefault("max_tokens", sizes["max_tokens"])
        mapper = cls(code_dim, sizes["seq_dim"], sizes["pooled_dim"], **kwargs)
        mapper.decoder = sizes["decoder"]
        return mapper

    def forward(self, embeddings: torch.Tensor, mask: Optional[torch.Tensor] = None) -> MapperOutput:
        """Map (B, T, d) C2 embeddings; see the class docstring."""
        if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 3 or embeddings.shape[-1] != self.code_dim:
            raise ValueError(f"embeddings must be (B, T, {self.code_dim}), got "
                             f"{tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__}")
        b, t, _ = embeddings.shape
        if mask is None:
            mask = torch.ones((b, t), dtype=torch.bool, device=embeddings.device)
        if mask.shape != (b, t) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a (B, T) = ({b}, {t}) bool tensor")
        if not bool(mask.any(dim=1).all()):
            raise ValueError("every row needs at least one real token (mask all False in some row)")
        if self.num_queries is None and self.max_tokens is not None and t > self.max_tokens:
            raise ValueError(f"{t} tokens exceed the decoder's context of {self.max_tokens}; use num_queries")
        tokens = self.token_mlp(embeddings.to(self.to_sequence.weight.dtype))  # (B, T, hidden)
        if self.num_queries is not None:
            queries = self.queries.unsqueeze(0).expand(b, -1, -1)
            tokens, _ = self.attention(queries, tokens, tokens, key_padding_mask=~mask, need_weights=False)
            mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        sequence = self.to_sequence(tokens)  # z~: (B, T', seq_dim)
        # the pooled vector summarises the mapped sequence z~ itself, so L_CL trains all of M_phi
        weights = mask.unsqueeze(-1).to(sequence.dtype)
        pooled = (sequence * weights).sum(dim=1) / weights.sum(dim=1)  # masked mean (B, seq_dim)
        return MapperOutput(sequence, self.to_pooled(pooled))

    def config(self) -> Dict[str, Any]:
        """The constructor arguments (what ``save_pretrained`` writes to config.json)."""
        return {"code_dim": self.code_dim, "seq_dim": self.seq_dim, "pooled_dim": self.pooled_dim,
                "num_queries": self.num_queries, "hidden_dim": self.token_mlp[1].out_features,
                "num_heads": self.attention.num_heads if self.num_queries is not None else 8,
                "max_tokens": self.max_tokens, "decoder": self.decoder}

    def save_pretrained(self, save_directory: PathLike) -> None:
        """Write ``config.json`` and ``model.safetensors`` to a directory, each atomically."""
        directory = os.fspath(save_directory)
        os.makedirs(directory, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_write(os.path.join(directory, _WEIGHTS), lambda tmp: safetensors.torch.save_file(
            tensors, tmp, metadata={"format": _FORMAT}))
        atomic_write_text(os.path.join(directory, _CONFIG),
                          json.dumps({"format": _FORMAT, "version": 1, **self.config()}, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: PathLike, device: Optional[Union[str, torch.device]] = None) -> "ConditioningMapper":
        """Load a mapper written by :meth:`save_pretrained`.

        Raises:
            FileNotFoundError: a missing directory or file. ValueError: a foreign or corrupt
            config, or weights that do not fit it.
        """
        directory = os.fspath(directory)
        config_path, weights_path = os.path.join(directory, _CONFIG), os.path.join(directory, _WEIGHTS)
        for path in (config_path, weights_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"missing {os.path.basename(path)} in {directory}")
        config = load_json(config_path)
        if not isinstance(config, dict) or config.get("format") != _FORMAT:
            raise ValueError(f"{config_path} is not a ConditioningMapper config")
        decoder = config.pop("decoder", None)
        for key in ("format", "version"):
            config.pop(key, None)
        mapper = cls(**config)
        mapper.decoder = decoder
        try:
            state = safetensors.torch.load_file(weights_path, device="cpu" if device is None else str(device))
            mapper.load_state_dict(state)
        except (safetensors.SafetensorError, RuntimeError) as exc:
            raise ValueError(f"{weights_path}: weights that do not fit {config_path}: {exc}") from exc
        return mapper.to(device) if device is not None else mapper

    def contrastive_loss(self, output: MapperOutput, text_embeddings: torch.Tensor,
                         temperature: Union[float, torch.Tensor] = 0.07) -> torch.Tensor:
        """L_CL: ``u2.info_nce`` between the pooled mapped embeddings (B, pooled_dim) and the frozen
        text encoder's embeddings of the same prompts (B, pooled_dim)."""
        return info_nce(output.pooled_prompt_embeds, text_embeddings, temperature)


class FrozenTextEncoder(nn.Module):
    """A frozen transformers text encoder giving one embedding per prompt (the target of L_CL).

    ``from_pretrained(path)`` loads the tokenizer and encoder (``AutoModel``: CLIP's text model,
    T5's encoder, ...); nothing trains. ``encode(prompts)`` returns (B, e): the encoder's pooled
    output where it has one (CLIP), else the attention-masked mean of its last hidden states (T5).
    """

    def __init__(self, encoder: nn.Module, tokenizer: Any, max_length: Optional[int] = None) -> None:
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length

    def train(self, mode: bool = True) -> "FrozenTextEncoder":
        """The encoder stays in eval mode (no dropout) whatever its parent module is set to."""
        super().train(mode)
        self.encoder.eval()
        return self

    @classmethod
    def from_pretrained(cls, path: PathLike, *, subfolder: str = "", tokenizer_subfolder: Optional[str] = None,
                        max_length: Optional[int] = None, **kwargs: Any) -> "FrozenTextEncoder":
        """Load from a local directory, or from a diffusers pipeline folder with ``subfolder``
        ("text_encoder": CLIP, with "tokenizer"; "text_encoder_2": T5, with "tokenizer_2"; or name
        the tokenizer's folder with ``tokenizer_subfolder``). T5-family configs load their encoder
        alone (``T5EncoderModel``: ``AutoModel`` would build the encoder-decoder)."""
        import transformers

        path = os.fspath(path)
        encoder_dir = os.path.join(path, subfolder) if subfolder else path
        if tokenizer_subfolder is None and subfolder:
            tokenizer_subfolder = subfolder.replace("text_encoder", "tokenizer")
        tokenizer_dir = os.path.join(path, tokenizer_subfolder) if tokenizer_subfolder else path
        config = transformers.AutoConfig.from_pretrained(encoder_dir)
        loader = transformers.T5EncoderModel if config.model_type in ("t5", "mt5", "umt5") else transformers.AutoModel
        encoder = loader.from_pretrained(encoder_dir, **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
        return cls(encoder, tokenizer, max_length)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B, e) float32 embeddings of ``prompts``, no gradient."""
        if isinstance(prompts, str) or not prompts:
            raise ValueError("prompts must be a non-empty sequence of strings")
        device = next(self.encoder.parameters()).device
        batch = self.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt",
                               **({"max_length": self.max_length} if self.max_length else {})).to(device)
        out = self.encoder(**batch)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            hidden = out.last_hidden_state
            weights = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1)
        return pooled.float()
