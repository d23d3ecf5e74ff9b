"""Prompt -> visual ids -> image: a trained run folder as one text-to-image pipeline.

A run folder (what ``unicode2-fast train --preset ...`` writes, and each of its checkpoints) is
the UnifiedModel's ``save_pretrained`` layout (``config.json``, ``model.safetensors`` with C2, the
projector and the visual head, the LLM and its tokenizer under ``llm/``) plus ``mapper/`` (the
ConditioningMapper) and ``unicode2_run.json``, which names the decoder pipeline (a folder inside
the run, or an absolute path to a FLUX / SDXL pipeline) and the visual tokens per image.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .._io import atomic_write_text, load_json
from ..train import left_pad

PathLike = Union[str, "os.PathLike[str]"]
RUN_CONFIG = "unicode2_run.json"
_FORMAT = "unicode2_fast.run"


def save_run_config(directory: PathLike, *, tokens_per_image: int, decoder: str, text_encoder: Optional[str] = None,
                    **extra: Any) -> None:
    """Write ``unicode2_run.json`` (atomically). ``decoder`` / ``text_encoder``: a folder name
    inside ``directory`` or an absolute path."""
    config = {"format": _FORMAT, "version": 1, "tokens_per_image": int(tokens_per_image), "decoder": decoder,
              "text_encoder": text_encoder, **extra}
    atomic_write_text(os.path.join(os.fspath(directory), RUN_CONFIG), json.dumps(config, indent=2) + "\n")


def read_run_config(directory: PathLike) -> Dict[str, Any]:
    """The run config of a run folder, its paths resolved.

    Raises:
        FileNotFoundError: no such folder, or no ``unicode2_run.json`` in it.
        ValueError: a file that is not a run config.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"model folder not found: {directory}")
    path = os.path.join(directory, RUN_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} is not a trained run: no {RUN_CONFIG} (train it with "
                                "`unicode2-fast train --preset ...`)")
    config = load_json(path)
    if not isinstance(config, dict) or config.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a unicode2_fast run config")
    for key in ("decoder", "text_encoder"):
        if config.get(key):
            config[key] = os.path.join(directory, config[key])  # absolute paths stay as they are
    return config


class TextToImage:
    """UnifiedModel (visual head) + mapper + decoder: ``generate(prompts)`` -> PIL images.

    Args:
        model: a UnifiedModel with a visual head. tokenizer: the LLM's tokenizer.
        decoder: a VisualDecoder (holding the mapper). tokens_per_image: visual ids per image.
    """

    def __init__(self, model: Any, tokenizer: Any, decoder: Any, tokens_per_image: int) -> None:
        if getattr(model, "visual_head_mode", None) is None:
            raise ValueError("the model has no visual head: it was not trained for generation")
        self.model, self.tokenizer, self.decoder = model.eval(), tokenizer, decoder
        self.tokens_per_image = int(tokens_per_image)

    @classmethod
    def from_pretrained(cls, path: PathLike, *, device: Optional[Union[str, torch.device]] = None,
                        num_inference_steps: Optional[int] = None) -> "TextToImage":
        """Load a run folder (see the module docstring).

        Raises:
            FileNotFoundError: a missing run folder or part. ValueError: a foreign or inconsistent one.
        """
        from transformers import AutoTokenizer

        from .decoder import VisualDecoder
        from .mapper import ConditioningMapper
        from .unified import LLM_SUBDIR, UnifiedModel

        directory = os.fspath(path)
        config = read_run_config(directory)
        model = UnifiedModel.from_pretrained(directory, device=device)
        tokenizer = AutoTokenizer.from_pretrained(os.path.join(directory, LLM_SUBDIR))
        mapper = ConditioningMapper.from_pretrained(os.path.join(directory, "mapper"), device=device)
        kwargs = {} if num_inference_steps is None else {"num_inference_steps": num_inference_steps}
        decoder = VisualDecoder.from_pretrained(config["decoder"], mapper, device=device, **kwargs)
        return cls(model, tokenizer, decoder, config["tokens_per_image"])

    def prompt_ids(self, prompts: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Left-padded (B, T) prompt ids and mask, as the model was trained on (no EOS)."""
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ValueError("prompts must be a non-empty sequence of non-empty strings")
        rows = [list(self.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
        if not all(rows):
            raise ValueError(f"the tokenizer gives no tokens for prompt {prompts[[bool(r) for r in rows].index(False)]!r}")
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        ids, mask = left_pad(rows, int(pad or 0))
        device = self.model.c2.device
        return ids.to(device), mask.to(device)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], *, height: int, width: int, num_inference_steps: Optional[int] = None,
                 seed: int = 0, temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 guidance_scale: Optional[float] = None) -> List[Any]:
        """Images for ``prompts``: sample the visual ids (seeded), decode their C2 rows (seeded).

        Raises:
            ValueError: an image size the decoder cannot produce (checked first), bad prompts.
        """
        self.decoder.check_size(height, width)
        ids, mask = self.prompt_ids(prompts)
        generator = torch.Generator(device=ids.device).manual_seed(seed)
        visual = self.model.generate_visual_ids(ids, self.tokens_per_image, prompt_mask=mask, temperature=temperature,
                                                top_k=top_k, top_p=top_p, guidance_scale=guidance_scale,
                                                generator=generator)
        return self.decoder.decode_ids(self.model, visual, height=height, width=width,
                                       num_inference_steps=num_inference_steps, seed=seed)
