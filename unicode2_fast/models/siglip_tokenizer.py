"""Image -> visual token ids: frozen SigLIP patch features, then the nearest codeword of each patch.

The vision tower is ``transformers.SiglipVisionModel`` as is (no CLS token: every one of the
(image_size / patch_size)^2 outputs is a patch, 729 for so400m-patch14-384); the search is
:func:`unicode2_fast.nearest`. transformers and PIL are imported on first use, never at import.
"""
from __future__ import annotations

import os
from typing import Any, List, Sequence, Union

import torch

from ..codebook import Codebook
from ..nearest import METRICS, nearest

PathLike = Union[str, "os.PathLike[str]"]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def load_image(image: Any):
    """A PIL image in RGB from a PIL image or a path.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the file is not a readable image (the message names it).
    """
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = os.fspath(image)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as opened:
            return opened.convert("RGB")  # convert() reads the pixels, so truncated files fail here
    except (OSError, SyntaxError, ValueError) as exc:  # PIL reports corrupt data as any of these
        raise ValueError(f"cannot read image {os.path.basename(path)}: {exc}") from exc


def _check_codebook_dim(codebook: Any, hidden_size: int) -> None:
    dim = codebook.dim if isinstance(codebook, Codebook) else int(codebook.shape[-1])
    if dim != hidden_size:
        raise ValueError(
            f"codebook dim {dim} does not match the SigLIP hidden size {hidden_size}: "
            "the codebook must be built from this model's patch features"
        )


class SiglipTokenizer:
    """Frozen SigLIP vision tower + codebook: ``tokenize(images)`` gives (B, P) codeword ids.

    Args:
        vision_model: a ``transformers.SiglipVisionModel`` (put in eval mode, gradients off).
        image_processor: its image processor (resizes to the model's image size, normalises).
        codebook: a :class:`Codebook` or a (K, d) tensor / array with d = the model's hidden size;
            moved to the model's device, dtype kept.
        metric: "l2", "ip" or "cos", as in :func:`unicode2_fast.nearest`.

    Raises:
        ValueError: the codebook dim differs from the hidden size, the processor's output size is
            not the model's image size, or an unknown metric.
    """

    def __init__(self, vision_model: Any, image_processor: Any, codebook: Any, metric: str = "l2") -> None:
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
        config = vision_model.config
        self.vision_model = vision_model.eval().requires_grad_(False)
        self.image_processor = image_processor
        self.metric = metric
        self.image_size = int(config.image_size)
        self.num_patches = (self.image_size // int(config.patch_size)) ** 2
        self.hidden_size = int(config.hidden_size)
        param = next(vision_model.parameters())
        self.device, self.dtype = param.device, param.dtype
        if not isinstance(codebook, Codebook):
            codebook = Codebook(codebook)
        _check_codebook_dim(codebook, self.hidden_size)
        self.codebook = codebook.to(device=self.device)
        size = getattr(image_processor, "size", None) or {}
        processed = (size.get("height"), size.get("width"))
        if None not in processed and processed != (self.image_size, self.image_size):
            raise ValueError(
                f"the image processor resizes to {processed[0]}x{processed[1]} but the model expects "
                f"{self.image_size}x{self.image_size}"
            )

    @classmethod
    def from_pretrained(
        cls,
        siglip_path: PathLike,
        codebook: Union[PathLike, Codebook, Any],
        *,
        device: Union[str, torch.device] = "cpu",
        dtype: torch.dtype = torch.float32,
        metric: str = "l2",
    ) -> "SiglipTokenizer":
        """Load the vision tower and image processor from a local directory, and the codebook.

        Args:
            siglip_path: a directory saved by ``save_pretrained`` (a SiglipVisionModel or a full
                SiglipModel checkpoint) holding ``preprocessor_config.json``.
            codebook: a codebook ``.safetensors`` path, a :class:`Codebook` or a (K, d) tensor.
            device, dtype: where and in which dtype the vision tower runs.
            metric: search metric.

        Raises:
            FileNotFoundError: the model directory, its preprocessor config or the codebook file
                is missing.
            ValueError: an unreadable model or codebook, or the codebook dim differs from the
                hidden size.
        """
        from transformers import AutoImageProcessor, SiglipVisionConfig, SiglipVisionModel

        path = os.fspath(siglip_path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"SigLIP model directory not found: {path}")
        if not os.path.isfile(os.path.join(path, "preprocessor_config.json")):
            raise FileNotFoundError(
                f"{path} has no preprocessor_config.json: save the SigLIP image processor there too "
                "(image_processor.save_pretrained(path))"
            )
        if isinstance(codebook, (str, os.PathLike)):
            codebook = Codebook.load(codebook)
        try:
            config = SiglipVisionConfig.from_pretrained(path)
            # checked before the weights load: a mismatch costs no model load
            _check_codebook_dim(codebook, config.hidden_size)
            vision_model = SiglipVisionModel.from_pretrained(path, config=config)
        except OSError as exc:
            raise ValueError(f"cannot load a SigLIP vision model from {path}: {exc}") from exc
        vision_model = vision_model.to(device=device, dtype=dtype)
        image_processor = AutoImageProcessor.from_pretrained(path)
        return cls(vision_model, image_processor, codebook, metric=metric)

    def pixel_values(self, images: Sequence[Any]) -> torch.Tensor:
        """(B, 3, H, W) model inputs, on the model's device and in its dtype."""
        pil_images = [load_image(image) for image in images]
        pixels = self.image_processor(images=pil_images, return_tensors="pt")["pixel_values"]
        return pixels.to(device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def features(self, images: Sequence[Any], batch_size: int = 16) -> torch.Tensor:
        """Patch features of every image.

        Args:
            images: PIL images or paths.
            batch_size: images per forward pass.

        Returns:
            (B, P, d) last hidden states, P = (image_size / patch_size)^2, in the model's dtype.

        Raises:
            FileNotFoundError / ValueError: a missing or unreadable image (named).
        """
        images = list(images)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not images:
            return torch.empty(0, self.num_patches, self.hidden_size, device=self.device, dtype=self.dtype)
        chunks = []
        for start in range(0, len(images), batch_size):
            hidden = self.vision_model(pixel_values=self.pixel_values(images[start : start + batch_size]))
            patches = hidden.last_hidden_state  # (b, P, d)
            if patches.shape[1] != self.num_patches:
                raise ValueError(
                    f"the vision model returned {patches.shape[1]} tokens per image, expected "
                    f"{self.num_patches} patches ((image_size / patch_size)^2, no CLS token)"
                )
            chunks.append(patches)
        return torch.cat(chunks)

    @torch.no_grad()
    def tokenize(self, images: Sequence[Any], batch_size: int = 16) -> torch.Tensor:
        """Codeword id of every patch of every image.

        Args:
            images: PIL images or paths.
            batch_size: images per forward pass and search.

        Returns:
            (B, P) int64 ids on the model's device.
        """
        images = list(images)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        chunks = [torch.empty(0, self.num_patches, dtype=torch.int64, device=self.device)]
        for start in range(0, len(images), batch_size):
            patches = self.features(images[start : start + batch_size], batch_size=batch_size)  # (b, P, d)
            ids, _ = nearest(patches, self.codebook, metric=self.metric)
            chunks.append(ids)
        return torch.cat(chunks)


def list_images(folder: PathLike) -> List[str]:
    """Names of the image files in ``folder`` (jpg, jpeg, png, webp, bmp), sorted."""
    return sorted(
        name for name in os.listdir(folder)
        if name.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, name))
    )
