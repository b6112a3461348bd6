"""Tiny random-weight flow-matching models, FLUX.1-dev and SD 3.5, for the demo and the tests: as diffusers
folders, as the single files their makers ship (with the VAE and text encoders they lack as module files) and
FLUX.1 as GGUF.

Their geometry is the real one where it matters (16 latent channels, an 8x VAE, 2x2 patches, CLIP + T5 text
encoders, FLUX.1-dev's guidance embedding, SD 3.5's QK norm) and tiny everywhere else, so a 64x64, 4-step job
takes well under a second on two CPU cores. The tokenizers are trained here (pipelines/tokenizer.py): nothing is
downloaded.
"""

from pathlib import Path

import torch

from pipelines.tokenizer import t5_unigram_vocab

FLUX_FOLDER = "demo-flux-dev"
FLUX_SINGLE_FILE = "demo-flux-dev-single.safetensors"  # the same transformer in Black Forest Labs' layout
FLUX_GGUF_FILE = "demo-flux-dev-Q8_0.gguf"  # and GGUF-quantized (Q8_0), as city96's flux1-dev-Q8_0.gguf
SD35_FOLDER = "demo-sd35"
SD35_SINGLE_FILE = "demo-sd35-single.safetensors"  # the same model in Stability's layout: MMDiT + VAE
# The single files' modules, as Forge and ComfyUI users keep them (stable_diffusion/vae/, .../text_encoder/):
# FLUX.1's VAE, and the CLIP-L, CLIP-G and T5 text encoders (FLUX.1 uses CLIP-L and T5; SD 3.5 all three).
MODULE_FILES = ("flux-ae.safetensors", "demo-clip-l.safetensors", "demo-clip-g.safetensors", "demo-t5xxl.safetensors")
# FLUX.1's VAE normalisation and the dev scheduler's shift settings, as the released model_index ships them.
FLUX_VAE_SCALING, FLUX_VAE_SHIFT = 0.3611, 0.1159
FLUX_SCHEDULER = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096,
)  # fmt: skip
TEXT_WIDTH = 32  # the CLIP encoders'
T5_WIDTH = 2 * TEXT_WIDTH  # SD 3.5 pads CLIP-L and CLIP-G side by side to T5's width
# SD 3.5's VAE normalisation and scheduler shift, as its model_index ships them.
SD3_VAE_SCALING, SD3_VAE_SHIFT = 1.5305, 0.0609


# The flow models' demo files are written together: a checkout whose demo files are of an older generation (other
# widths, modules not shared) gets them all rewritten by `make demo-models`, not some kept and some new.
FLOW_DEMO_GENERATION = "3"  # 2: SD 3.5 single file; CLIP-L and T5 shared with FLUX.1; 3: SD 3.5 up to 2048 px
GENERATION_STAMP = ".demo-flow-generation"


def is_current_generation(folder: Path) -> bool:
    stamp = folder / GENERATION_STAMP
    return stamp.is_file() and stamp.read_text().strip() == FLOW_DEMO_GENERATION


def stamp_generation(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / GENERATION_STAMP).write_text(FLOW_DEMO_GENERATION + "\n")


T5_SPECIAL_IDS = dict(pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)  # as T5's own vocabulary


def t5_tokenizer():
    """A T5 tokenizer of the tiny vocabulary trained here (pipelines/tokenizer.py)."""
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=t5_unigram_vocab(), extra_ids=0)


def _t5(seed: int, width: int = T5_WIDTH):
    from transformers import T5Config, T5EncoderModel

    tokenizer = t5_tokenizer()
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
        use_cache=False, **T5_SPECIAL_IDS,
    )  # fmt: skip
    return tokenizer, T5EncoderModel(config).eval()


def shared_text_encoders(work: Path, seed: int = 40):
    """The demo's CLIP-L and T5-XXL, which FLUX.1 and SD 3.5 share as real ones do: (CLIP tokenizer, CLIP-L, T5
    tokenizer, T5). CLIP-L as SD 3's pipeline holds it: with an identity projection (SD 3 takes its pooled output
    unprojected; `clip_l.safetensors` has no projection)."""
    from pipelines.demo import _text_encoder, _tokenizer

    tokenizer = _tokenizer(work)
    tokenizer_t5, t5 = _t5(seed + 1)
    clip_l = _text_encoder(tokenizer, seed, with_projection=True)
    with torch.no_grad():
        clip_l.text_projection.weight.copy_(torch.eye(TEXT_WIDTH))
    return tokenizer, clip_l, tokenizer_t5, t5


def _without_projection(clip_l):
    """CLIP-L as FLUX.1 runs it (CLIPTextModel: pooled output, no projection), with the same weights."""
    from transformers import CLIPTextModel

    model = CLIPTextModel(clip_l.config).eval()
    state = {key.removeprefix("text_model."): tensor for key, tensor in clip_l.state_dict().items()}
    model.load_state_dict({key: tensor for key, tensor in state.items() if key in model.state_dict()})
    return model


def build_flux(work: Path, seed: int = 40, guidance: bool = True):
    """A tiny FluxPipeline; `guidance`: dev's guidance embedding (schnell has none)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from pipelines.demo import _vae

    tokenizer, clip_l, tokenizer_2, text_encoder_2 = shared_text_encoders(work, seed)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=T5_WIDTH, pooled_projection_dim=TEXT_WIDTH,
        guidance_embeds=guidance, axes_dims_rope=[4, 6, 6],
    ).eval()  # fmt: skip
    vae = _vae(seed + 2, FLUX_VAE_SCALING, latent_channels=16, shift_factor=FLUX_VAE_SHIFT)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=vae,
        text_encoder=_without_projection(clip_l), tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2, transformer=transformer, image_encoder=None, feature_extractor=None,
    )  # fmt: skip


def build_sd35(work: Path, seed: int = 50):
    """A tiny StableDiffusion3Pipeline with SD 3.5's QK norm and all three text encoders (CLIP-L and T5 the
    demo FLUX.1's)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from pipelines.demo import _text_encoder, _tokenizer, _vae

    tokenizer, clip_l, tokenizer_3, text_encoder_3 = shared_text_encoders(work)
    tokenizer_2 = _tokenizer(work, pad_token="!")
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=T5_WIDTH, caption_projection_dim=32, pooled_projection_dim=2 * TEXT_WIDTH,
        out_channels=16, pos_embed_max_size=128, qk_norm="rms_norm",  # 2048 px a side, as limits.yaml allows
    ).eval()  # fmt: skip
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_vae(seed + 3, SD3_VAE_SCALING, latent_channels=16, shift_factor=SD3_VAE_SHIFT),
        text_encoder=clip_l, tokenizer=tokenizer,
        text_encoder_2=_text_encoder(tokenizer_2, seed + 1, with_projection=True), tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3, transformer=transformer,
    )  # fmt: skip


# LoRAs --------------------------------------------------------------------------------------------------------
FLUX_LORA_PEFT = "demo-flux-peft.safetensors"  # diffusers/peft keys: transformer.<module>.lora_A / lora_B
FLUX_LORA_KOHYA = "demo-flux-kohya.safetensors"  # kohya's FLUX keys: lora_unet_double_blocks_0_img_mlp_0 ...
SD35_LORA_PEFT = "demo-sd35-peft.safetensors"  # diffusers/peft keys on SD 3.5's joint transformer blocks
# kohya (Black Forest Labs' module names) -> diffusers' module, for the layers that map one to one.
_KOHYA_FLUX_LAYERS = {
    "double_blocks_{i}_img_mlp_0": "transformer_blocks.{i}.ff.net.0.proj",
    "double_blocks_{i}_img_mlp_2": "transformer_blocks.{i}.ff.net.2",
    "double_blocks_{i}_txt_mlp_0": "transformer_blocks.{i}.ff_context.net.0.proj",
    "double_blocks_{i}_txt_mlp_2": "transformer_blocks.{i}.ff_context.net.2",
}


def transformer_peft_lora(pipe, seed: int, rank: int = 4, strength: float = 0.5) -> dict:
    """A LoRA in diffusers/peft keys on a transformer's attention projections (FLUX.1's or SD 3.5's)."""
    from pipelines.demo import _linear_targets, _lora_pair

    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, layer in _linear_targets(pipe.transformer, ("attn.to_q", "attn.to_k", "attn.to_v")):
        down, up = _lora_pair(layer, rank, generator, strength)
        state[f"transformer.{name}.lora_A.weight"], state[f"transformer.{name}.lora_B.weight"] = down, up
    return state


def flux_kohya_lora(pipe, seed: int, rank: int = 4, strength: float = 0.5) -> dict:
    """A FLUX.1 LoRA in kohya's keys (`lora_unet_double_blocks_N_...` with `lora_down`, `lora_up`, `alpha`), on
    the double blocks' MLPs."""
    from pipelines.demo import _lora_pair

    generator = torch.Generator().manual_seed(seed)
    modules = dict(pipe.transformer.named_modules())
    state = {}
    for index in range(len(pipe.transformer.transformer_blocks)):
        for kohya, diffusers_name in _KOHYA_FLUX_LAYERS.items():
            key = "lora_unet_" + kohya.format(i=index)
            down, up = _lora_pair(modules[diffusers_name.format(i=index)], rank, generator, strength)
            state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = down, up
            state[f"{key}.alpha"] = torch.tensor(float(rank))
    return state


def create_demo_flow_loras(loras_dir: Path, work: Path) -> list[Path]:
    """The demo FLUX.1 LoRAs (for the demo FLUX.1-dev, in the two key styles users meet) and an SD 3.5 one."""
    from safetensors.torch import save_file

    flux = build_flux(work)
    peft, kohya, sd35 = loras_dir / FLUX_LORA_PEFT, loras_dir / FLUX_LORA_KOHYA, loras_dir / SD35_LORA_PEFT
    save_file(transformer_peft_lora(flux, seed=301), peft, metadata={"format": "pt"})
    save_file(flux_kohya_lora(flux, seed=302), kohya,
              metadata={"ss_base_model_version": "flux1", "ss_network_module": "networks.lora_flux"})  # fmt: skip
    save_file(transformer_peft_lora(build_sd35(work), seed=303), sd35, metadata={"format": "pt"})
    return [peft, kohya, sd35]


# The single files and their modules -----------------------------------------------------------------------
def write_flux_single_file(pipe, models_dir: Path) -> Path:
    """The demo FLUX.1-dev's transformer as Black Forest Labs ships `flux1-dev.safetensors`, with the configs and
    tokenizers it needs offline in `.configs/<name>/` (a diffusers folder without weights)."""

    from safetensors.torch import save_file

    from pipelines.flux_layout import diffusers_to_bfl

    target = models_dir / FLUX_SINGLE_FILE
    save_file(diffusers_to_bfl(pipe.transformer.state_dict()), target, metadata={"format": "pt"})
    write_configs(pipe, models_dir / ".configs" / target.stem, encoders=("", "_2"))
    return target


def write_configs(pipe, configs: Path, encoders: tuple[str, ...]) -> None:
    """A transformer pipeline's configs and tokenizers without weights (what a single file needs offline in
    `.configs/<name>/`); `encoders`: the suffixes of its text encoders and tokenizers ("", "_2", ...)."""
    import shutil

    shutil.rmtree(configs, ignore_errors=True)
    pipe.save_config(configs)
    pipe.transformer.save_config(configs / "transformer")
    pipe.vae.save_config(configs / "vae")
    pipe.scheduler.save_pretrained(configs / "scheduler")
    for suffix in encoders:
        getattr(pipe, f"text_encoder{suffix}").config.save_pretrained(configs / f"text_encoder{suffix}")
        getattr(pipe, f"tokenizer{suffix}").save_pretrained(configs / f"tokenizer{suffix}")


def write_gguf(state: dict, target: Path, arch: str) -> Path:
    """A transformer's tensors as a GGUF file, quantized as the published ones (city96's) are: Q8_0 for the
    matrices whose rows are whole 32-value blocks, 16-bit floats for the other matrices, 32-bit for the vectors."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    writer = GGUFWriter(str(target), arch=arch)
    for name, tensor in state.items():
        values = tensor.float().numpy()
        if values.ndim == 2 and values.shape[-1] % 32 == 0:
            packed = quantize(values, GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, values.astype(np.float16) if values.ndim > 1 else values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def write_flux_gguf(pipe, models_dir: Path) -> Path:
    """The demo FLUX.1-dev's transformer as a Q8_0 GGUF file in Black Forest Labs' names, with the same
    `.configs/` as the single file."""
    import shutil

    from pipelines.flux_layout import diffusers_to_bfl

    target = write_gguf(diffusers_to_bfl(pipe.transformer.state_dict()), models_dir / FLUX_GGUF_FILE, arch="flux")
    configs = models_dir / ".configs"
    shutil.rmtree(configs / target.stem, ignore_errors=True)
    shutil.copytree(configs / Path(FLUX_SINGLE_FILE).stem, configs / target.stem)
    return target


def write_sd35_single_file(pipe, models_dir: Path) -> Path:
    """The demo SD 3.5 as Stability ships `sd3.5_large.safetensors`: the MMDiT under `model.diffusion_model.` and
    the VAE under `first_stage_model.`, in their original layouts; the text encoders are the module files. With
    the configs and tokenizers it needs offline in `.configs/<name>/`."""

    from safetensors.torch import save_file

    from pipelines.families.sd3 import SAI_PREFIX
    from pipelines.ldm_layout import VAE_PREFIX, vae_ldm_state_dict
    from pipelines.sd3_layout import diffusers_to_sai

    target = models_dir / SD35_SINGLE_FILE
    transformer = diffusers_to_sai(pipe.transformer.state_dict())
    state = {f"{SAI_PREFIX}{key}": tensor for key, tensor in transformer.items()}
    state |= {VAE_PREFIX + key: tensor for key, tensor in vae_ldm_state_dict(pipe.vae).items()}
    save_file(state, target, metadata={"format": "pt"})
    write_configs(pipe, models_dir / ".configs" / target.stem, encoders=("", "_2", "_3"))
    return target


def _clip_file_state(model, projection: bool) -> dict:
    """A CLIP text encoder as `clip_l.safetensors` (`text_model.` keys) and `clip_g.safetensors` (with its
    projection too) hold it."""
    state = {key if key.startswith(("text_model.", "text_projection")) else f"text_model.{key}": tensor.contiguous()
             for key, tensor in model.state_dict().items()}  # fmt: skip
    return state if projection else {key: tensor for key, tensor in state.items() if not key.startswith("text_proj")}


def create_demo_modules(vaes_dir: Path, text_encoder_dir: Path, overwrite: bool = False) -> list[Path]:
    """The module files the demo single files run with: the demo FLUX.1-dev's VAE (original layout, as
    `ae.safetensors`), the CLIP-L and T5 that FLUX.1 and SD 3.5 share (as `clip_l.safetensors` and
    `t5xxl_fp16.safetensors`) and SD 3.5's CLIP-G (as `clip_g.safetensors`)."""
    import tempfile

    from safetensors.torch import save_file

    from pipelines.ldm_layout import vae_ldm_state_dict

    vae = vaes_dir / MODULE_FILES[0]
    clip_l, clip_g, t5 = (text_encoder_dir / name for name in MODULE_FILES[1:])
    current = is_current_generation(text_encoder_dir)
    if all(path.exists() for path in (vae, clip_l, clip_g, t5)) and current and not overwrite:
        return []
    vaes_dir.mkdir(parents=True, exist_ok=True)
    text_encoder_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        sd35 = build_sd35(Path(tmp))
        flux_vae = build_flux(Path(tmp)).vae
    save_file(vae_ldm_state_dict(flux_vae), vae)
    save_file(_clip_file_state(sd35.text_encoder, projection=False), clip_l)
    save_file(_clip_file_state(sd35.text_encoder_2, projection=True), clip_g)
    t5_state = {
        key: tensor.contiguous()
        for key, tensor in sd35.text_encoder_3.state_dict().items()
        if key != "encoder.embed_tokens.weight"
    }  # tied to `shared.weight`, as the published file has it
    save_file(t5_state, t5)
    stamp_generation(text_encoder_dir)
    return [vae, clip_l, clip_g, t5]
