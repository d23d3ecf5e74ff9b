"""Decoding through tiny diffusers pipelines built offline: a FLUX transformer and an SDXL UNet,
each saved and loaded with from_pretrained without text encoders, conditioned only through the
mapper; images of the requested size, reproducible from a seed; a mapper of the wrong width is
refused."""
import numpy as np
import pytest
import torch

from unicode2_fast.models import ConditioningMapper
from unicode2_fast.models.decoder import VisualDecoder

diffusers = pytest.importorskip("diffusers")


def _flux(tmp_path):
    torch.manual_seed(0)
    transformer = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                                   pooled_projection_dim=24, axes_dims_rope=[4, 4, 8])
    vae = diffusers.AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,),
                                  layers_per_block=1, latent_channels=1, norm_num_groups=1, use_quant_conv=False,
                                  use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    pipe = diffusers.FluxPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                                  tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.save_pretrained(tmp_path / "flux")
    return tmp_path / "flux", transformer.config


def _sdxl(tmp_path):
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80, cross_attention_dim=16,
        norm_num_groups=4)
    vae = diffusers.AutoencoderKL(block_out_channels=[8, 8], in_channels=3, out_channels=3,
                                  down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                                  latent_channels=4, norm_num_groups=4, sample_size=32)
    pipe = diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                               tokenizer_2=None, unet=unet, scheduler=diffusers.EulerDiscreteScheduler())
    pipe.save_pretrained(tmp_path / "sdxl")
    return tmp_path / "sdxl", unet.config


@pytest.mark.parametrize("build", [_flux, _sdxl])
def test_decode_images_from_c2_embeddings(tmp_path, build):
    path, config = build(tmp_path)
    torch.manual_seed(1)
    mapper = ConditioningMapper.for_decoder(config, code_dim=12, num_queries=8, num_heads=2)
    decoder = VisualDecoder.from_pretrained(path, mapper, num_inference_steps=2)
    embeddings = torch.randn(2, 9, 12)
    images = decoder.decode(embeddings, height=32, width=32, seed=0)
    assert len(images) == 2 and all(image.size == (32, 32) for image in images)
    again = decoder.decode(embeddings, height=32, width=32, seed=0)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, again))  # seeded: same pixels
    wrong = ConditioningMapper(12, mapper.seq_dim + 1, mapper.pooled_dim, num_queries=8, num_heads=1)
    with pytest.raises(ValueError, match="for_decoder"):
        VisualDecoder.from_pretrained(path, wrong)


def test_missing_or_foreign_pipeline_is_refused(tmp_path):
    mapper = ConditioningMapper(4, 8, 8)
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        VisualDecoder.from_pretrained(tmp_path, mapper)
