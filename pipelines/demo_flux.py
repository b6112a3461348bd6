"""A tiny random-weight FLUX.1-dev, in the diffusers folder layout, for the demo and the tests.

Its geometry is FLUX.1's where it matters (16 latent channels packed in 2x2 patches, an 8x VAE, CLIP + T5 text
encoders, a guidance embedding as dev has) and tiny everywhere else, so a 64x64, 4-step job takes well under a
second on two CPU cores. The tokenizers are trained here (pipelines/tokenizer.py): nothing is downloaded.
"""

from pathlib import Path

import torch

from pipelines.tokenizer import t5_unigram_vocab

FLUX_FOLDER = "demo-flux-dev"
# FLUX.1's VAE normalisation and the dev scheduler's shift settings, as the released model_index ships them.
FLUX_VAE_SCALING, FLUX_VAE_SHIFT = 0.3611, 0.1159
FLUX_SCHEDULER = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096,
)  # fmt: skip
TEXT_WIDTH = 32


def _t5(seed: int):
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    tokenizer = T5Tokenizer(vocab=t5_unigram_vocab(), extra_ids=0)
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=TEXT_WIDTH, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0, is_encoder_decoder=False, use_cache=False,
    )  # fmt: skip
    return tokenizer, T5EncoderModel(config).eval()


def build_flux(work: Path, seed: int = 40, guidance: bool = True):
    """A tiny FluxPipeline; `guidance`: dev's guidance embedding (schnell has none)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from pipelines.demo import _text_encoder, _tokenizer

    tokenizer = _tokenizer(work)
    tokenizer_2, text_encoder_2 = _t5(seed + 1)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=TEXT_WIDTH, pooled_projection_dim=TEXT_WIDTH,
        guidance_embeds=guidance, axes_dims_rope=[4, 6, 6],
    ).eval()  # fmt: skip
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(
        block_out_channels=[32, 32, 32, 32], in_channels=3, out_channels=3, latent_channels=16,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=1,
        norm_num_groups=32, sample_size=128, scaling_factor=FLUX_VAE_SCALING, shift_factor=FLUX_VAE_SHIFT,
        use_quant_conv=False, use_post_quant_conv=False,
    ).eval()  # fmt: skip
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=vae,
        text_encoder=_text_encoder(tokenizer, seed), tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2, transformer=transformer, image_encoder=None, feature_extractor=None,
    )  # fmt: skip
