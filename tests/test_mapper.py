"""The generation-side mapper M_phi and L_CL: decoder sizes read from real diffusers configs (a tiny
FLUX transformer built offline, SDXL's published UNet sizes), shapes and masking of the mapping,
L_CL equal to u2.info_nce on the pooled output, a few training steps that lower it, and a frozen
transformers text encoder (a tiny random CLIP text model saved and loaded with from_pretrained)."""
import pytest
import torch

import unicode2_fast as u2
from unicode2_fast.models import ConditioningMapper, FrozenTextEncoder, conditioning_sizes

SDXL_UNET = {"cross_attention_dim": 2048, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
             "projection_class_embeddings_input_dim": 2816}


def test_sizes_from_a_tiny_flux_transformer_and_sdxl_config():
    diffusers = pytest.importorskip("diffusers")
    flux = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=24,
                                            pooled_projection_dim=12, axes_dims_rope=(2, 2, 4))
    assert conditioning_sizes(flux.config) == {"decoder": "flux", "seq_dim": 24, "pooled_dim": 12, "max_tokens": 512}
    assert conditioning_sizes(SDXL_UNET) == {"decoder": "sdxl", "seq_dim": 2048, "pooled_dim": 1280, "max_tokens": 77}
    with pytest.raises(ValueError, match="not a FLUX or SDXL"):
        conditioning_sizes({"cross_attention_dim": 768})


def test_resampler_shapes_and_masking():
    torch.manual_seed(0)
    mapper = ConditioningMapper.for_decoder({"joint_attention_dim": 32, "pooled_projection_dim": 12}, code_dim=16,
                                            num_queries=6, num_heads=4)
    assert mapper.decoder == "flux"
    x = torch.randn(3, 9, 16)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 5:] = False
    out = mapper(x, mask)
    assert out.prompt_embeds.shape == (3, 6, 32) and out.pooled_prompt_embeds.shape == (3, 12)
    changed = x.clone()
    changed[1, 5:] = 100.0  # padding: must not change row 1's output
    again = mapper(changed, mask)
    torch.testing.assert_close(again.prompt_embeds[1], out.prompt_embeds[1])
    torch.testing.assert_close(again.pooled_prompt_embeds[1], out.pooled_prompt_embeds[1])
    per_token = ConditioningMapper(16, 32, 12)
    assert per_token(x).prompt_embeds.shape == (3, 9, 32)
    with pytest.raises(ValueError, match="context"):
        ConditioningMapper.for_decoder(SDXL_UNET, code_dim=16, num_queries=78)
    with pytest.raises(ValueError, match=r"\(B, T, 16\)"):
        mapper(torch.randn(3, 9, 15))
    with pytest.raises(ValueError, match="at least one real token"):
        mapper(x, torch.zeros(3, 9, dtype=torch.bool))


def test_contrastive_loss_is_info_nce_and_training_lowers_it():
    torch.manual_seed(1)
    mapper = ConditioningMapper(8, 16, 10, num_queries=4, num_heads=2)
    codes = torch.randn(6, 5, 8)
    text = torch.randn(6, 10)
    out = mapper(codes)
    torch.testing.assert_close(mapper.contrastive_loss(out, text, 0.1), u2.info_nce(out.pooled_prompt_embeds, text, 0.1))
    opt = torch.optim.AdamW(mapper.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    first = None
    for _ in range(60):
        loss = mapper.contrastive_loss(mapper(codes), text, 0.1)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first


def test_frozen_text_encoder_from_a_saved_tiny_clip(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[PAD]", "[UNK]", "a", "red", "cat", "dog", "on", "the", "mat"]
    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]")
    config = transformers.CLIPTextConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                                         pad_token_id=0, eos_token_id=1, bos_token_id=1)
    torch.manual_seed(0)
    transformers.CLIPTextModel(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    text = FrozenTextEncoder.from_pretrained(tmp_path)
    embeddings = text.encode(["a red cat", "the dog on the mat"])
    assert embeddings.shape == (2, 16) and not embeddings.requires_grad
    assert not any(p.requires_grad for p in text.encoder.parameters())
    mapper = ConditioningMapper(8, 12, 16, num_queries=3, num_heads=2)
    loss = mapper.contrastive_loss(mapper(torch.randn(2, 4, 8)), embeddings)
    loss.backward()
    assert all(p.grad is not None for p in mapper.parameters())
    with pytest.raises(ValueError, match="non-empty"):
        text.encode("a cat")


def test_frozen_text_encoder_loads_a_t5_encoder_and_stays_in_eval(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "</s>", "<unk>", "a", "red", "cat"]
    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>",
                                                     unk_token="<unk>")
    config = transformers.T5Config(vocab_size=len(words), d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                                   dropout_rate=0.5)
    torch.manual_seed(0)
    transformers.T5EncoderModel(config).save_pretrained(tmp_path / "text_encoder_2")
    tokenizer.save_pretrained(tmp_path / "tokenizer_2")
    text = FrozenTextEncoder.from_pretrained(tmp_path, subfolder="text_encoder_2")
    assert type(text.encoder).__name__ == "T5EncoderModel"
    wrapper = torch.nn.Sequential(text).train()  # a parent in training mode: the encoder stays frozen in eval
    assert not text.encoder.training
    first, second = text.encode(["a red cat", "a cat"]), text.encode(["a red cat", "a cat"])
    assert first.shape == (2, 16) and torch.equal(first, second)  # no dropout
    del wrapper


def test_mapper_round_trips_through_save_pretrained(tmp_path):
    torch.manual_seed(3)
    mapper = ConditioningMapper.for_decoder(SDXL_UNET, code_dim=8, num_queries=5, hidden_dim=16, num_heads=2)
    mapper.save_pretrained(tmp_path / "m")
    loaded = ConditioningMapper.from_pretrained(tmp_path / "m")
    assert loaded.decoder == "sdxl" and loaded.config() == mapper.config()
    x = torch.randn(2, 7, 8)
    torch.testing.assert_close(loaded(x).prompt_embeds, mapper(x).prompt_embeds)
    per_token = ConditioningMapper(8, 12, 6)
    per_token.save_pretrained(tmp_path / "p")
    assert ConditioningMapper.from_pretrained(tmp_path / "p").num_queries is None
    (tmp_path / "p" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="do not fit"):
        ConditioningMapper.from_pretrained(tmp_path / "p")
    with pytest.raises(FileNotFoundError, match="config.json"):
        ConditioningMapper.from_pretrained(tmp_path / "missing")
