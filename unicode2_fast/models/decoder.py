"""Decoding: visual tokens -> images through a frozen diffusers FLUX / SDXL pipeline.

The pipeline is loaded with ``from_pretrained(path)`` without its text encoders: the mapper
(``ConditioningMapper``) supplies the conditioning (``prompt_embeds``, ``pooled_prompt_embeds``)
from the C2 rows of the visual tokens. Paper defaults: 50 steps, guidance 3.5. SDXL's
classifier-free guidance gets zero negative embeddings (what SDXL itself uses for an empty
negative prompt, ``force_zeros_for_empty_prompt``).

    decoder = VisualDecoder.from_pretrained("FLUX.1-dev", mapper)
    images = decoder.decode(c2_rows, height=1024, width=1024, seed=0)     # list of PIL images
    images = decoder.decode_ids(model, visual_ids)                        # ids -> model.c2 rows -> images
"""
from __future__ import annotations

import os
from typing import Any, List, Optional, Union

import torch

from .._io import load_json
from .mapper import ConditioningMapper, conditioning_sizes

PathLike = Union[str, "os.PathLike[str]"]

#: the paper's decoding defaults
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 3.5
_PIPELINES = {"FluxPipeline": "flux", "StableDiffusionXLPipeline": "sdxl"}
#: both pipelines name their two text encoders and tokenizers alike; the mapper replaces them
_NO_TEXT_ENCODERS = dict(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)


def size_multiple_of(path: PathLike) -> int:
    """The multiple an image side must be for the pipeline saved at ``path``, read from its
    configs without loading a model (see ``VisualDecoder.size_multiple``).

    Raises:
        FileNotFoundError: no pipeline (model_index.json) or VAE config there.
        ValueError: a pipeline of another kind.
    """
    path = os.fspath(path)
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        raise FileNotFoundError(f"no diffusers pipeline at {path} (model_index.json not found)")
    kind = _PIPELINES.get(load_json(index).get("_class_name"))
    if kind is None:
        raise ValueError(f"{path} holds no FluxPipeline or StableDiffusionXLPipeline")
    vae = os.path.join(path, "vae", "config.json")
    if not os.path.isfile(vae):
        raise FileNotFoundError(f"no VAE config at {vae}")
    scale = 2 ** (len(load_json(vae).get("block_out_channels", [0] * 4)) - 1)  # diffusers' vae_scale_factor
    return scale * 2 if kind == "flux" else scale


def check_image_size(height: Any, width: Any, multiple: int, kind: str) -> None:
    """ValueError unless both sides are positive multiples of ``multiple``."""
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or isinstance(value, bool) or value < multiple or value % multiple:
            what = f"this {kind} decoder" if kind else "this decoder"
            raise ValueError(f"{name} must be a positive multiple of {multiple} for {what}, got {value!r}")


class VisualDecoder:
    """A frozen FLUX / SDXL pipeline conditioned through a :class:`ConditioningMapper`.

    Args:
        pipeline: a diffusers ``FluxPipeline`` or ``StableDiffusionXLPipeline`` (text encoders may
            be None). mapper: sized for it (checked against the decoder's config).
        num_inference_steps, guidance_scale: defaults of :meth:`decode` (the paper's 50 and 3.5).

    Raises:
        ValueError: another pipeline class, or a mapper whose sizes are not the decoder's.
    """

    def __init__(self, pipeline: Any, mapper: ConditioningMapper, *, num_inference_steps: int = DEFAULT_STEPS,
                 guidance_scale: float = DEFAULT_GUIDANCE) -> None:
        kind = _PIPELINES.get(type(pipeline).__name__)
        if kind is None:
            raise ValueError(f"expected a FluxPipeline or StableDiffusionXLPipeline, got {type(pipeline).__name__}")
        denoiser = pipeline.transformer if kind == "flux" else pipeline.unet
        sizes = conditioning_sizes(denoiser.config)
        if (sizes["seq_dim"], sizes["pooled_dim"]) != (mapper.seq_dim, mapper.pooled_dim):
            raise ValueError(
                f"the mapper gives ({mapper.seq_dim} per token, {mapper.pooled_dim} pooled) but the {kind} decoder "
                f"takes ({sizes['seq_dim']}, {sizes['pooled_dim']}): build the mapper with ConditioningMapper.for_decoder"
            )
        self.pipeline, self.mapper, self.kind = pipeline, mapper, kind
        self.num_inference_steps, self.guidance_scale = num_inference_steps, guidance_scale
        pipeline.set_progress_bar_config(disable=True)

    @classmethod
    def from_pretrained(cls, path: PathLike, mapper: ConditioningMapper, *, torch_dtype: Optional[torch.dtype] = None,
                        device: Optional[Union[str, torch.device]] = None, **kwargs: Any) -> "VisualDecoder":
        """Load the pipeline saved at ``path`` (its ``model_index.json`` names FLUX or SDXL), without
        its text encoders, and pair it with ``mapper``.

        Raises:
            FileNotFoundError: no pipeline directory / model_index.json at ``path``.
            ValueError: a pipeline of another kind, or mismatched sizes.
        """
        import diffusers

        path = os.fspath(path)
        index = os.path.join(path, "model_index.json")
        if not os.path.isfile(index):
            raise FileNotFoundError(f"no diffusers pipeline at {path} (model_index.json not found)")
        name = load_json(index).get("_class_name")
        if name not in _PIPELINES:
            raise ValueError(f"{path} holds a {name}; expected a FluxPipeline or StableDiffusionXLPipeline")
        extra = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
        pipeline = getattr(diffusers, name).from_pretrained(path, **_NO_TEXT_ENCODERS, **extra)
        if device is not None:
            pipeline.to(device)
        return cls(pipeline, mapper, **kwargs)

    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's downsampling, times FLUX's 2 x 2 latent packing."""
        scale = int(getattr(self.pipeline, "vae_scale_factor", 8))
        return scale * 2 if self.kind == "flux" else scale

    def check_size(self, height: int, width: int) -> None:
        """Raise ValueError unless ``height`` x ``width`` is an image size this decoder produces
        as asked (diffusers would silently round it)."""
        check_image_size(height, width, self.size_multiple(), self.kind)

    @torch.no_grad()
    def decode(self, embeddings: torch.Tensor, *, mask: Optional[torch.Tensor] = None, height: int = 1024,
               width: int = 1024, num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
               seed: Optional[int] = None, generator: Optional[torch.Generator] = None, output_type: str = "pil") -> List[Any]:
        """Images of (B, T, d) C2 embeddings (one image per row; ``mask`` as the mapper's).

        ``seed`` (or ``generator``) makes the result reproducible. Returns the pipeline's images
        (PIL by default), B of them, ``height`` x ``width``.
        """
        self.check_size(height, width)
        conditioning = self.mapper(embeddings, mask)
        dtype = self.pipeline.dtype
        prompt = conditioning.prompt_embeds.to(dtype)
        pooled = conditioning.pooled_prompt_embeds.to(dtype)
        if generator is None and seed is not None:
            generator = torch.Generator(device="cpu").manual_seed(seed)
        common = dict(prompt_embeds=prompt, pooled_prompt_embeds=pooled, height=height, width=width,
                      num_inference_steps=num_inference_steps or self.num_inference_steps,
                      guidance_scale=self.guidance_scale if guidance_scale is None else guidance_scale,
                      generator=generator, output_type=output_type)
        if self.kind == "sdxl":
            common.update(negative_prompt_embeds=torch.zeros_like(prompt), negative_pooled_prompt_embeds=torch.zeros_like(pooled))
        return list(self.pipeline(**common).images)

    def decode_ids(self, model: Any, visual_ids: torch.Tensor, **kwargs: Any) -> List[Any]:
        """Images of (B, P) visual token ids: their ``model.c2`` rows through :meth:`decode`."""
        if visual_ids.dim() != 2:
            raise ValueError(f"visual_ids must be (B, P), got {tuple(visual_ids.shape)}")
        if visual_ids.numel() and not (0 <= int(visual_ids.min()) and int(visual_ids.max()) < model.codebook_size):
            raise ValueError(f"visual_ids must lie in [0, {model.codebook_size})")
        return self.decode(model.c2.detach()[visual_ids], **kwargs)
