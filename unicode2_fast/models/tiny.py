"""The tiny, offline configuration of the whole model (``unicode2-fast train --preset tiny``).

Random tiny versions of every pretrained part, built from configs (no download), saved with
their own ``save_pretrained`` so the run loads them through the same ``from_pretrained`` paths
as the real models: a SigLIP vision tower (32 px images, 8 px patches: 16 visual tokens per
image), a Qwen2 LLM, a CLIP text encoder (the target of L_CL) and a FLUX pipeline without text
encoders (the decoder), plus a synthetic image-caption set (coloured shapes on white, captions
naming them) written as a folder of PNGs with a JSON-lines manifest, and a word-level tokenizer
shared by the LLM and the text encoder. The codebook is built by two-stage k-means over the
tiny SigLIP's patch features of those images.

Real sizes (what the README's configuration table names): SigLIP so400m (d = 1152, 729
tokens), Qwen2.5-7B, FLUX.1-dev's T5 / CLIP text encoders and transformer, or SDXL-base-1.0.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Sequence, Tuple, Union

import numpy as np
import torch

PathLike = Union[str, "os.PathLike[str]"]

SHAPES = ("square", "circle", "triangle", "cross")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SIZES = ("small", "big")
SPECIAL = ("[PAD]", "[UNK]", "[EOS]")
WORDS = ("a", *SIZES, *COLOURS, *SHAPES)
IMAGE_SIZE = 32
PATCH_SIZE = 8
#: the tiny LLM / SigLIP / CLIP widths; FLUX's pooled projection = the CLIP width (L_CL compares them)
LLM_HIDDEN, VISION_HIDDEN, TEXT_HIDDEN, FLUX_CONTEXT = 32, 32, 24, 32


def draw_shape(shape: str, colour: str, size: int = IMAGE_SIZE, *, centre: Tuple[float, float] = (0.5, 0.5),
               radius: float = 0.3) -> np.ndarray:
    """(size, size, 3) uint8: one filled ``shape`` of ``colour`` on white.

    ``centre`` (x, y) and ``radius`` are fractions of the image side.
    """
    if shape not in SHAPES or colour not in COLOURS:
        raise ValueError(f"unknown shape or colour {shape!r} / {colour!r}; shapes {SHAPES}, colours {tuple(COLOURS)}")
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    dx, dy = xx - centre[0], yy - centre[1]
    if shape == "square":
        inside = (np.abs(dx) <= radius) & (np.abs(dy) <= radius)
    elif shape == "circle":
        inside = dx ** 2 + dy ** 2 <= radius ** 2
    elif shape == "triangle":  # apex up
        inside = (dy <= radius) & (dy >= -radius) & (np.abs(dx) <= (dy + radius) / 2)
    else:
        arm = radius / 3
        inside = ((np.abs(dx) <= radius) & (np.abs(dy) <= arm)) | ((np.abs(dy) <= radius) & (np.abs(dx) <= arm))
    image = np.full((size, size, 3), 255, dtype=np.uint8)
    image[inside] = COLOURS[colour]
    return image


def shapes_dataset(n: int, size: int = IMAGE_SIZE, seed: int = 0) -> Tuple[List[np.ndarray], List[str]]:
    """``n`` images (uint8 arrays) and their captions ("a big red circle"; every third one without
    the size): every size, colour and shape in turn, at seeded jittered positions."""
    rng = np.random.default_rng(seed)
    images, captions = [], []
    combos = [(s, c, k) for s in SIZES for c in COLOURS for k in SHAPES]
    for i in range(n):
        scale, colour, shape = combos[i % len(combos)]
        radius = 0.32 if scale == "big" else 0.18
        centre = tuple(0.5 + rng.uniform(-0.45, 0.45, size=2) * (0.5 - radius))
        images.append(draw_shape(shape, colour, size, centre=centre, radius=radius))
        # every third caption leaves the size out: prompts of two lengths, so batches are left-padded
        captions.append(f"a {colour} {shape}" if i % 3 == 2 else f"a {scale} {colour} {shape}")
    return images, captions


def word_tokenizer(words: Sequence[str] = WORDS) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` over ``words`` ([PAD] 0, [UNK] 1, [EOS] 2, then the words)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate([*SPECIAL, *words])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]",
                                                eos_token="[EOS]")


def _image_processor_class() -> Any:
    import transformers

    # the PIL processor needs no torchvision; older transformers have only SiglipImageProcessor
    return getattr(transformers, "SiglipImageProcessorPil", None) or transformers.SiglipImageProcessor


def build_flux_pipeline(directory: PathLike, seed: int = 0) -> None:
    """Save a tiny random FluxPipeline (no text encoders) to ``directory``."""
    import diffusers

    torch.manual_seed(seed)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=FLUX_CONTEXT, pooled_projection_dim=TEXT_HIDDEN, axes_dims_rope=[4, 4, 8])
    vae = diffusers.AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,),
                                  layers_per_block=1, latent_channels=1, norm_num_groups=1, use_quant_conv=False,
                                  use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    pipe = diffusers.FluxPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                                  tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.save_pretrained(os.fspath(directory))


def tiny_paths(root: PathLike) -> Dict[str, str]:
    """Where ``build_tiny_assets(root)`` puts each part."""
    root = os.fspath(root)
    paths = {name: os.path.join(root, name) for name in ("siglip", "llm", "text_encoder", "decoder", "images")}
    paths["codebook"] = os.path.join(root, "codebook.safetensors")
    return paths


def build_tiny_assets(root: PathLike, *, n_images: int = 64, codebook_size: int = 64, seed: int = 0) -> Dict[str, str]:
    """Write every tiny part under ``root`` and return their paths.

    ``siglip/`` (vision tower + image processor), ``llm/`` (Qwen2 + tokenizer), ``text_encoder/``
    (CLIP text model + tokenizer), ``decoder/`` (FluxPipeline), ``images/`` (PNGs and
    ``captions.jsonl``: one {"image", "text"} per line) and ``codebook.safetensors`` (two-stage
    k-means over the images' SigLIP patch features).
    """
    import transformers
    from PIL import Image

    from ..kmeans import build_codebook
    from .siglip_tokenizer import SiglipTokenizer

    paths = tiny_paths(root)
    tokenizer = word_tokenizer()
    vocab = len(tokenizer)

    torch.manual_seed(seed)
    vision = transformers.SiglipVisionConfig(hidden_size=VISION_HIDDEN, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
                                             num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    transformers.SiglipVisionModel(vision).save_pretrained(paths["siglip"])
    _image_processor_class()(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(paths["siglip"])

    torch.manual_seed(seed + 1)
    llm = transformers.Qwen2Config(vocab_size=vocab, hidden_size=LLM_HIDDEN, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                   max_position_embeddings=64, pad_token_id=0, eos_token_id=2, bos_token_id=2,
                                   tie_word_embeddings=False)
    transformers.Qwen2ForCausalLM(llm).save_pretrained(paths["llm"])
    tokenizer.save_pretrained(paths["llm"])

    torch.manual_seed(seed + 2)
    text = transformers.CLIPTextConfig(vocab_size=vocab, hidden_size=TEXT_HIDDEN, intermediate_size=48,
                                       num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                                       pad_token_id=0, eos_token_id=2, bos_token_id=2)
    transformers.CLIPTextModel(text).save_pretrained(paths["text_encoder"])
    tokenizer.save_pretrained(paths["text_encoder"])

    build_flux_pipeline(paths["decoder"], seed + 3)

    images, captions = shapes_dataset(n_images, seed=seed)
    os.makedirs(paths["images"], exist_ok=True)
    lines = []
    for i, (pixels, caption) in enumerate(zip(images, captions)):
        name = f"{i:04d}.png"
        Image.fromarray(pixels).save(os.path.join(paths["images"], name))
        lines.append(json.dumps({"image": name, "text": caption}) + "\n")
    with open(os.path.join(paths["images"], "captions.jsonl"), "w", encoding="utf-8") as file:
        file.writelines(lines)

    siglip = SiglipTokenizer(transformers.SiglipVisionModel.from_pretrained(paths["siglip"]),
                             _image_processor_class()(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
                             torch.zeros(1, VISION_HIDDEN))
    features = siglip.features([_pil(p) for p in images]).reshape(-1, VISION_HIDDEN)
    build_codebook(features, codebook_size, seed=seed, progress=False).save(paths["codebook"])
    return paths


def _pil(pixels: np.ndarray) -> Any:
    from PIL import Image

    return Image.fromarray(pixels)
