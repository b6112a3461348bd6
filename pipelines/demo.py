"""Tiny random-weight demo models, written in the real on-disk formats.

No weights can be downloaded here, so the demo and the tests use these. They are built from fixed seeds
(same files, same hashes on every run of the same library versions) and are only ever read back through the
real loaders: `from_pretrained` for diffusers and Hugging Face cache folders, `from_single_file` for the
original-layout checkpoint. Their images are noise; their code paths are the real ones.

Sizes follow SD's geometry where it matters (a 4-level VAE with the usual 8x downsampling) and are tiny
everywhere else, so a 64-128 px, 8-step job takes a fraction of a second on two CPU cores.
"""

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipelines.demo_flow import (
    FLUX_FOLDER,
    FLUX_GGUF_FILE,
    FLUX_LORA_KOHYA,
    FLUX_LORA_PEFT,
    FLUX_SINGLE_FILE,
    SD35_FOLDER,
    SD35_LORA_PEFT,
    SD35_SINGLE_FILE,
    build_flux,
    build_sd35,
    create_demo_flow_loras,
    is_current_generation,
    stamp_generation,
    write_flux_gguf,
    write_flux_single_file,
    write_sd35_single_file,
)
from pipelines.ldm_layout import sd15_single_file_state_dict
from pipelines.tokenizer import write_tokenizer_files

logger = logging.getLogger(__name__)

SD15_FOLDER = "demo-sd15"
SD15_SINGLE_FILE = "demo-sd15-single.safetensors"
SDXL_REPO_ID = "demo/tiny-sdxl-base"
SDXL_CACHE_FOLDER = "models--demo--tiny-sdxl-base"
REFINER_FOLDER = "demo-sdxl-refiner"
SD15_INPAINTING_FILE = "demo-sd15-inpainting.safetensors"  # 9-channel UNet, A1111's single-file layout
# Demo LoRAs, one per file format and key style users meet.
LORA_SD15_KOHYA = "demo-sd15-kohya.safetensors"  # kohya/A1111 keys, UNet + text encoder, with alphas
LORA_SD15_PEFT = "demo-sd15-peft.safetensors"  # diffusers/peft keys, UNet + text encoder
LORA_SDXL_PEFT = "demo-sdxl-peft.safetensors"  # diffusers/peft keys, UNet + both text encoders
LORA_SD15_PT = "demo-sd15-unet-only.pt"  # a pickled (torch.save) kohya state dict, UNet only
UPSCALER_FILE = "demo-esrgan-x4.pth"  # ESRGAN (RRDBNet, Real-ESRGAN key layout), x4

DEMO_LABELS = {
    "Demo SD1.5": SD15_FOLDER,
    "Demo SD1.5 (single file)": "demo-sd15-single",
    "Demo SDXL": SDXL_CACHE_FOLDER,
    "Demo SDXL Refiner": REFINER_FOLDER,
    "Demo SD1.5 Inpainting": "demo-sd15-inpainting",
    "Demo FLUX.1-dev": FLUX_FOLDER,
    "Demo FLUX.1-dev (single file)": "demo-flux-dev-single",
    "Demo FLUX.1-dev (GGUF Q8_0)": "demo-flux-dev-Q8_0",
    "Demo SD 3.5": SD35_FOLDER,
    "Demo SD 3.5 (single file)": "demo-sd35-single",
}

# The noise schedules real SD1.5 and SDXL checkpoints ship with.
SD15_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
)  # fmt: skip
SDXL_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    steps_offset=1, timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False,
)  # fmt: skip


def _tokenizer(work: Path, pad_token: str | None = None):
    from transformers import CLIPTokenizer

    files = work / "tokenizer-files"
    if not files.exists():
        write_tokenizer_files(files)
    extra = {"pad_token": pad_token} if pad_token else {}
    return CLIPTokenizer.from_pretrained(files, model_max_length=77, **extra)


def _text_encoder(tokenizer, seed: int, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer), hidden_size=32,
        intermediate_size=37, num_attention_heads=4, num_hidden_layers=5, projection_dim=32,
        max_position_embeddings=77, hidden_act="gelu",
    )  # fmt: skip
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_class(config).eval()


def _vae(seed: int, scaling_factor: float, latent_channels: int = 4, shift_factor: float | None = None):
    """SD's 4-channel VAE, or with 16 channels and a shift FLUX.1's and SD 3's (which have no quant convs)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    quant_convs = latent_channels == 4
    return AutoencoderKL(
        block_out_channels=[32, 32, 32, 32], in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        layers_per_block=1, norm_num_groups=32, sample_size=128, scaling_factor=scaling_factor,
        shift_factor=shift_factor, use_quant_conv=quant_convs, use_post_quant_conv=quant_convs,
    ).eval()  # fmt: skip


def _sd15_unet(seed: int, in_channels: int = 4):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=in_channels, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), norm_num_groups=32,
    ).eval()  # fmt: skip


def _sdxl_unet(seed: int, cross_attention_dim: int, projection_input_dim: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=projection_input_dim,
        cross_attention_dim=cross_attention_dim, norm_num_groups=1,
    ).eval()  # fmt: skip


def build_sd15(work: Path, seed: int = 15):
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    tokenizer = _tokenizer(work)
    return StableDiffusionPipeline(
        vae=_vae(seed, 0.18215), text_encoder=_text_encoder(tokenizer, seed), tokenizer=tokenizer,
        unet=_sd15_unet(seed), scheduler=PNDMScheduler(**SD15_SCHEDULER), safety_checker=None,
        feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )  # fmt: skip


def build_sd15_inpainting(work: Path, seed: int = 16):
    """An SD1.5 inpainting checkpoint: its UNet also takes the mask and the masked image's latents (9 channels)."""
    from diffusers import PNDMScheduler, StableDiffusionInpaintPipeline

    tokenizer = _tokenizer(work)
    return StableDiffusionInpaintPipeline(
        vae=_vae(seed, 0.18215), text_encoder=_text_encoder(tokenizer, seed), tokenizer=tokenizer,
        unet=_sd15_unet(seed, in_channels=9), scheduler=PNDMScheduler(**SD15_SCHEDULER), safety_checker=None,
        feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )  # fmt: skip


def build_sdxl_base(work: Path, seed: int = 20):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    tokenizer, tokenizer_2 = _tokenizer(work), _tokenizer(work, pad_token="!")
    # text_embeds (32, the projection of text_encoder_2) + 6 time ids x 8 = 80
    return StableDiffusionXLPipeline(
        vae=_vae(seed, 0.13025), text_encoder=_text_encoder(tokenizer, seed),
        text_encoder_2=_text_encoder(tokenizer_2, seed + 1, with_projection=True),
        tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        unet=_sdxl_unet(seed, cross_attention_dim=64, projection_input_dim=80),
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER), image_encoder=None, feature_extractor=None,
    )  # fmt: skip


def build_sdxl_refiner(work: Path, seed: int = 20):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline

    tokenizer_2 = _tokenizer(work, pad_token="!")
    # The refiner shares the base's VAE and second text encoder (same seeds), as the real ones do.
    # text_embeds (32) + 5 time ids (with the aesthetic score) x 8 = 72
    return StableDiffusionXLImg2ImgPipeline(
        vae=_vae(seed, 0.13025), text_encoder=None, tokenizer=None,
        text_encoder_2=_text_encoder(tokenizer_2, seed + 1, with_projection=True),
        tokenizer_2=tokenizer_2,
        unet=_sdxl_unet(seed + 2, cross_attention_dim=32, projection_input_dim=72),
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER), image_encoder=None, feature_extractor=None,
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
    )  # fmt: skip


def _save_pipeline(pipe, directory: Path) -> None:
    pipe.save_pretrained(directory, safe_serialization=True)


def _write_hf_cache_layout(snapshot_source: Path, cache_folder: Path, repo_id: str) -> None:
    """Lays a saved pipeline out as the Hugging Face cache does: blobs named by hash, snapshot symlinks."""
    revision = hashlib.sha1(f"{repo_id}@demo".encode()).hexdigest()
    blobs = cache_folder / "blobs"
    snapshot = cache_folder / "snapshots" / revision
    blobs.mkdir(parents=True)
    for source in sorted(p for p in snapshot_source.rglob("*") if p.is_file()):
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
        shutil.copyfile(source, blobs / digest)
        link = snapshot / source.relative_to(snapshot_source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blobs / digest, link.parent))
    (cache_folder / "refs").mkdir()
    (cache_folder / "refs" / "main").write_text(revision)


def _write_single_file_config(pipe, directory: Path) -> None:
    """The diffusers configs and tokenizer a single-file checkpoint needs offline (no weights)."""
    pipe.save_config(directory)  # model_index.json
    pipe.unet.save_config(directory / "unet")
    pipe.vae.save_config(directory / "vae")
    pipe.text_encoder.config.save_pretrained(directory / "text_encoder")
    pipe.tokenizer.save_pretrained(directory / "tokenizer")
    pipe.scheduler.save_pretrained(directory / "scheduler")


def create_demo_models(models_dir: Path, overwrite: bool = False) -> list[Path]:
    """Writes every demo model into `models_dir`; returns the paths written. Existing ones are kept
    unless `overwrite` is set."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    models_dir.mkdir(parents=True, exist_ok=True)
    targets = {
        "sd15": models_dir / SD15_FOLDER,
        "single": models_dir / SD15_SINGLE_FILE,
        "sdxl": models_dir / SDXL_CACHE_FOLDER,
        "refiner": models_dir / REFINER_FOLDER,
        "inpainting": models_dir / SD15_INPAINTING_FILE,
        "flux": models_dir / FLUX_FOLDER,
        "flux-single": models_dir / FLUX_SINGLE_FILE,
        "flux-gguf": models_dir / FLUX_GGUF_FILE,  # after the single file: it shares its .configs
        "sd35": models_dir / SD35_FOLDER,
        "sd35-single": models_dir / SD35_SINGLE_FILE,
    }
    written = []
    flow_kinds = ("flux", "flux-single", "flux-gguf", "sd35", "sd35-single")  # one generation (demo_flow.py)
    stale_flow = not is_current_generation(models_dir)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sd15 = flux = sd35 = None
        for kind, target in targets.items():
            if target.exists() and not overwrite and not (stale_flow and kind in flow_kinds):
                logger.info("keeping existing %s", target)
                continue
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            if kind in ("sd15", "single"):
                sd15 = sd15 or build_sd15(work)
            if kind == "sd15":
                _save_pipeline(sd15, target)
            elif kind in ("single", "inpainting"):
                pipe = sd15 if kind == "single" else build_sd15_inpainting(work)
                state = sd15_single_file_state_dict(pipe.unet, pipe.vae, pipe.text_encoder)
                save_file(state, target, metadata={"format": "pt"})
                config_dir = models_dir / ".configs" / target.stem
                shutil.rmtree(config_dir, ignore_errors=True)
                _write_single_file_config(pipe, config_dir)
            elif kind == "sdxl":
                staged = work / "sdxl"
                _save_pipeline(build_sdxl_base(work), staged)
                _write_hf_cache_layout(staged, target, SDXL_REPO_ID)
            elif kind == "refiner":
                _save_pipeline(build_sdxl_refiner(work), target)
            elif kind == "flux":
                flux = flux or build_flux(work)  # one model in three formats
                _save_pipeline(flux, target)
            elif kind == "flux-single":
                flux = flux or build_flux(work)
                write_flux_single_file(flux, models_dir)
            elif kind == "flux-gguf":
                flux = flux or build_flux(work)
                write_flux_gguf(flux, models_dir)
            elif kind == "sd35":
                sd35 = sd35 or build_sd35(work)  # one model in two formats
                _save_pipeline(sd35, target)
            elif kind == "sd35-single":
                sd35 = sd35 or build_sd35(work)
                write_sd35_single_file(sd35, models_dir)
            written.append(target)
            logger.info("wrote %s", target)
    stamp_generation(models_dir)
    return written


# VAE ----------------------------------------------------------------------------------------------------------
DEMO_VAE_FILE = "demo-vae-ft.safetensors"


def create_demo_vae(vaes_dir: Path, overwrite: bool = False) -> list[Path]:
    """An SD1.5-layout VAE with weights of its own (so choosing it changes the image), in A1111's single-file
    layout, as VAE files are shared."""
    from pipelines.ldm_layout import vae_ldm_state_dict

    target = vaes_dir / DEMO_VAE_FILE
    if target.exists() and not overwrite:
        logger.info("keeping existing %s", target)
        return []
    vaes_dir.mkdir(parents=True, exist_ok=True)
    save_file(vae_ldm_state_dict(_vae(seed=77, scaling_factor=0.18215)), target, metadata={"format": "pt"})
    logger.info("wrote %s", target)
    return [target]


# Embeddings ---------------------------------------------------------------------------------------------------
DEMO_SD15_EMBEDDING = "demo-style.pt"  # A1111's .pt layout: string_to_param["*"], two vectors
DEMO_SDXL_EMBEDDING = "demo-xl-style.safetensors"  # SDXL's: clip_l and clip_g
DEMO_TEXT_WIDTH = 32  # the demo text encoders' hidden size (768 / 1280 in real models)


def create_demo_embeddings(embeddings_dir: Path, overwrite: bool = False) -> list[Path]:
    """Textual-inversion embeddings for the demo models in the real formats, with vectors strong enough to
    change the image."""
    generator = torch.Generator().manual_seed(31)
    embeddings_dir.mkdir(parents=True, exist_ok=True)
    written = []
    sd15 = embeddings_dir / DEMO_SD15_EMBEDDING
    if overwrite or not sd15.exists():
        vectors = torch.randn(2, DEMO_TEXT_WIDTH, generator=generator) * 3
        torch.save({"string_to_param": {"*": vectors}, "name": sd15.stem, "step": 100}, sd15)
        written.append(sd15)
    sdxl = embeddings_dir / DEMO_SDXL_EMBEDDING
    if overwrite or not sdxl.exists():
        save_file({"clip_l": torch.randn(1, DEMO_TEXT_WIDTH, generator=generator) * 3,
                   "clip_g": torch.randn(1, DEMO_TEXT_WIDTH, generator=generator) * 3}, sdxl)  # fmt: skip
        written.append(sdxl)
    for path in written:
        logger.info("wrote %s", path)
    return written


# LoRAs ------------------------------------------------------------------------------------------------------
_UNET_LORA_TARGETS = (".attn1.to_q", ".attn1.to_k", ".attn1.to_v", ".attn1.to_out.0",
                      ".attn2.to_q", ".attn2.to_k", ".attn2.to_v", ".attn2.to_out.0")  # fmt: skip
_TEXT_LORA_TARGETS = (".self_attn.q_proj", ".self_attn.k_proj", ".self_attn.v_proj", ".self_attn.out_proj")


def _linear_targets(module: torch.nn.Module, suffixes: tuple[str, ...]) -> list[tuple[str, torch.nn.Linear]]:
    return [
        (name, layer)
        for name, layer in module.named_modules()
        if isinstance(layer, torch.nn.Linear) and name.endswith(suffixes)
    ]


def _text_module_name(name: str) -> str:
    """Names as real LoRA files write them: transformers 5 dropped CLIPTextModel's `text_model.` level."""
    return name if name.startswith("text_model.") else f"text_model.{name}"


def _lora_pair(layer: torch.nn.Linear, rank: int, generator: torch.Generator, strength: float):
    down = torch.randn(rank, layer.in_features, generator=generator) * strength
    up = torch.randn(layer.out_features, rank, generator=generator) * strength
    return down.contiguous(), up.contiguous()


def kohya_lora(pipe, seed: int, rank: int = 4, strength: float = 0.4, text_encoder: bool = True) -> dict:
    """An SD1.5 LoRA with kohya/A1111 keys: `lora_unet_<module>`/`lora_te_<module>` with `lora_down`,
    `lora_up` and `alpha`."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    modules = [("lora_unet_", name, layer) for name, layer in _linear_targets(pipe.unet, _UNET_LORA_TARGETS)]
    if text_encoder:
        modules += [
            ("lora_te_", _text_module_name(name), layer)
            for name, layer in _linear_targets(pipe.text_encoder, _TEXT_LORA_TARGETS)
        ]
    for prefix, name, layer in modules:
        key = prefix + name.replace(".", "_")
        down, up = _lora_pair(layer, rank, generator, strength)
        state[f"{key}.lora_down.weight"] = down
        state[f"{key}.lora_up.weight"] = up
        state[f"{key}.alpha"] = torch.tensor(float(rank) / 2)
    return state


def peft_lora(pipe, seed: int, rank: int = 4, strength: float = 0.4) -> dict:
    """A LoRA with diffusers/peft keys (`unet.<module>.lora_A.weight`, `text_encoder[_2].<module>...`)."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    components = [("unet", pipe.unet, _UNET_LORA_TARGETS)]
    components += [(name, getattr(pipe, name), _TEXT_LORA_TARGETS)
                   for name in ("text_encoder", "text_encoder_2") if getattr(pipe, name, None) is not None]  # fmt: skip
    for component, module, targets in components:
        for name, layer in _linear_targets(module, targets):
            module_name = name if component == "unet" else _text_module_name(name)
            down, up = _lora_pair(layer, rank, generator, strength)
            state[f"{component}.{module_name}.lora_A.weight"] = down
            state[f"{component}.{module_name}.lora_B.weight"] = up
    return state


def create_demo_loras(loras_dir: Path, overwrite: bool = False) -> list[Path]:
    """Writes the demo LoRAs (for the demo SD1.5 and SDXL models) into `loras_dir`."""
    loras_dir.mkdir(parents=True, exist_ok=True)
    targets = [loras_dir / name for name in (LORA_SD15_KOHYA, LORA_SD15_PEFT, LORA_SDXL_PEFT, LORA_SD15_PT,
                                             FLUX_LORA_PEFT, FLUX_LORA_KOHYA, SD35_LORA_PEFT)]  # fmt: skip
    if all(target.exists() for target in targets) and not overwrite:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        create_demo_flow_loras(loras_dir, work)
        sd15, sdxl = build_sd15(work), build_sdxl_base(work)
        kohya_metadata = {"ss_base_model_version": "sd_v1", "ss_network_module": "networks.lora"}
        save_file(kohya_lora(sd15, seed=101), targets[0], metadata=kohya_metadata)
        save_file(peft_lora(sd15, seed=102), targets[1], metadata={"format": "pt"})
        save_file(peft_lora(sdxl, seed=103), targets[2], metadata={"format": "pt"})
        torch.save(kohya_lora(sd15, seed=104, rank=2, text_encoder=False), targets[3])
    for target in targets:
        logger.info("wrote %s", target)
    return targets


def create_many_sd15_loras(loras_dir: Path, count: int, prefix: str = "demo-sd15-many") -> list[Path]:
    """`count` distinct SD1.5 LoRAs (kohya keys, each its own seed): what a job with the most LoRAs a request
    may name (`max_loras`) needs, for the tests of the adapter cache."""
    loras_dir.mkdir(parents=True, exist_ok=True)
    targets = [loras_dir / f"{prefix}-{index}.safetensors" for index in range(count)]
    with tempfile.TemporaryDirectory() as tmp:
        sd15 = build_sd15(Path(tmp))
        metadata = {"ss_base_model_version": "sd_v1", "ss_network_module": "networks.lora"}
        for index, target in enumerate(targets):
            save_file(kohya_lora(sd15, seed=200 + index, strength=0.3), target, metadata=metadata)
    return targets


# Upscaler -------------------------------------------------------------------------------------------------
def esrgan_state_dict(seed: int = 4, features: int = 16, blocks: int = 1, scale: int = 4) -> dict:
    """A tiny x4 ESRGAN (RRDBNet) in Real-ESRGAN's key layout (`conv_first`, `body.N.rdbM.convK`, `conv_up1`...).

    spandrel fixes the growth channels at 32. The weights are an identity path (the input's RGB carried through
    every 3x3 conv's centre tap, the dense blocks near zero) plus small noise, so the output is a recognisable,
    slightly textured nearest-neighbour x4 of the input rather than black.
    """
    generator = torch.Generator().manual_seed(seed)
    growth = 32
    state: dict[str, torch.Tensor] = {}

    def conv(name: str, channels_in: int, channels_out: int, identity: bool) -> None:
        weight = torch.randn(channels_out, channels_in, 3, 3, generator=generator) * 0.002
        if identity:
            for channel in range(min(channels_in, channels_out)):
                weight[channel, channel, 1, 1] += 1.0
        state[f"{name}.weight"] = weight
        state[f"{name}.bias"] = torch.zeros(channels_out)

    conv("conv_first", 3, features, identity=True)
    for block in range(blocks):
        for dense in (1, 2, 3):
            for index in range(5):
                out = growth if index < 4 else features
                conv(f"body.{block}.rdb{dense}.conv{index + 1}", features + index * growth, out, identity=False)
    conv("conv_body", features, features, identity=False)
    for name in ["conv_up1", "conv_up2"][: {2: 1, 4: 2}[scale]] + ["conv_hr"]:
        conv(name, features, features, identity=True)
    conv("conv_last", features, 3, identity=True)
    return state


def create_demo_upscaler(upscalers_dir: Path, overwrite: bool = False) -> list[Path]:
    """Writes the demo ESRGAN x4 upscaler (a pickled state dict, as ESRGAN `.pth` files are)."""
    target = upscalers_dir / UPSCALER_FILE
    if target.exists() and not overwrite:
        return []
    upscalers_dir.mkdir(parents=True, exist_ok=True)
    torch.save(esrgan_state_dict(), target)
    logger.info("wrote %s", target)
    return [target]


# ControlNet ---------------------------------------------------------------------------------------------------
CONTROLNET_SD15_FOLDER = "demo-sd15-canny"  # a diffusers folder
CONTROLNET_SD15_FILE = "control_demo_sd15_canny.safetensors"  # A1111's single-file layout (`control_model.*`)
CONTROLNET_SDXL_FOLDER = "demo-sdxl-canny"


def _demo_controlnet(unet, seed: int):
    """A ControlNet of the demo UNet's shape. A trained ControlNet starts from zero convolutions; these get small
    random ones instead, so that a demo control image changes the picture (what the tests look for)."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet)  # the hint encoder of real ControlNets: (16, 32, 96, 256)
    with torch.no_grad():
        for zero_conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            zero_conv.weight.normal_(0.0, 0.3)
            zero_conv.bias.normal_(0.0, 0.05)
    return controlnet.eval()


def create_demo_controlnets(controlnet_dir: Path, overwrite: bool = False) -> list[Path]:
    """A tiny SD1.5 ControlNet (as a diffusers folder and as an A1111 single file, the same weights) and a tiny
    SDXL one, for the demo models' UNets."""
    from pipelines.ldm_layout import controlnet_ldm_state_dict

    controlnet_dir.mkdir(parents=True, exist_ok=True)
    targets = {"sd15": controlnet_dir / CONTROLNET_SD15_FOLDER, "single": controlnet_dir / CONTROLNET_SD15_FILE,
               "sdxl": controlnet_dir / CONTROLNET_SDXL_FOLDER}  # fmt: skip
    written = []
    sd15 = None
    for kind, target in targets.items():
        if target.exists() and not overwrite:
            continue
        shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
        if kind in ("sd15", "single"):
            sd15 = sd15 or _demo_controlnet(_sd15_unet(15), seed=31)
        if kind == "sd15":
            sd15.save_pretrained(target, safe_serialization=True)
        elif kind == "single":
            save_file(controlnet_ldm_state_dict(sd15), target, metadata={"format": "pt"})
        else:
            unet = _sdxl_unet(20, cross_attention_dim=64, projection_input_dim=80)
            _demo_controlnet(unet, seed=32).save_pretrained(target, safe_serialization=True)
        written.append(target)
        logger.info("wrote %s", target)
    return written
