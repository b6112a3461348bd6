"""Stable Diffusion 3 and 3.5 (Medium, Large, Large Turbo): a rectified-flow MMDiT transformer over 16-channel
latents, with CLIP ViT-L and OpenCLIP ViT-bigG (pooled and hidden) and an optional T5-XXL text encoder (diffusers
runs it without T5 when the folder has none). Ordinary classifier-free guidance with the negative prompt.

Its files: diffusers folders, and Stability's single files (pipelines/sd3_single_file.py) with the text encoders
they lack as module files."""

import json
import math
from pathlib import Path

from pipelines.families.base import FamilyPipelines, ModelFamily
from pipelines.samplers import FLOW_SAMPLERS, FLOW_SCHEDULES

# The published fit of SD3's 16 latent channels to RGB, with its bias.
LATENT_RGB = (
    (-0.0922, -0.0175, 0.0749), (0.0311, 0.0633, 0.0954), (0.1994, 0.0927, 0.0458), (0.0856, 0.0339, 0.0902),
    (0.0587, 0.0272, -0.0496), (-0.0006, 0.1104, 0.0309), (0.0978, 0.0306, 0.0427), (-0.0042, 0.1038, 0.1358),
    (-0.0194, 0.0020, 0.0669), (-0.0488, 0.0130, -0.0268), (0.0922, 0.0988, 0.0951), (-0.0278, 0.0524, -0.0542),
    (0.0332, 0.0456, 0.0895), (-0.0069, -0.0030, -0.0810), (-0.0596, -0.0465, -0.0293), (-0.1448, -0.1463, -0.1189),
)  # fmt: skip
LATENT_RGB_BIAS = (0.2394, 0.2135, 0.1925)

# SD3's pipeline lets the scheduler make its own sigmas (no custom sigmas passed), so Heun runs here too: every
# flow-matching sampler of pipelines/samplers.py.


VAE_DOWNSAMPLING = 8
SAI_PREFIX = "model.diffusion_model."  # Stability's single files put the MMDiT under it (GGUF files do not)
# The parts a Stability-layout file may carry besides the transformer (`sd3.5_large.safetensors` has the VAE;
# `sd3_medium_incl_clips*.safetensors` the text encoders too), by module kind (pipelines/modules.py).
SAI_PARTS = {
    "vae": "first_stage_model.", "clip": "text_encoders.clip_l.", "clip_g": "text_encoders.clip_g.",
    "t5": "text_encoders.t5xxl.",
}  # fmt: skip


def _claims_checkpoint(keys) -> bool:
    """Stability's MMDiT layout (`joint_blocks.N.x_block...`), under `model.diffusion_model.` or alone."""
    return any(key.removeprefix(SAI_PREFIX).startswith("joint_blocks.") for key in keys)


def _carried_modules(keys) -> tuple[str, ...]:
    return tuple(kind for kind, prefix in SAI_PARTS.items() if any(key.startswith(prefix) for key in keys))


def _load_single_file(entry, dtype):
    from pipelines.sd3_single_file import load_sd3_single_file  # torch and diffusers: the engine's side only

    return load_sd3_single_file(entry, dtype)


def _largest_side(path: Path) -> int | None:
    """SD 3's transformer places patches from a learned table `pos_embed_max_size` patches a side (diffusers
    refuses a larger image mid-job): 192 for SD 3.5 Large (3072 px), 384 for Medium. From a folder's transformer
    config, or a single file's table (`pos_embed`, 1 x side² x width) and patch size (`x_embedder.proj`)."""
    if path.is_dir():
        config = json.loads((path / "transformer" / "config.json").read_text())
        # Absent: SD3Transformer2DModel's default (96); null: a sin-cos table made for any size, no limit.
        side, patch = config.get("pos_embed_max_size", 96), config.get("patch_size", 2)
    else:
        from pipelines.catalog import checkpoint_shapes  # the catalog imports this table

        shapes = {key.removeprefix(SAI_PREFIX): value.shape for key, value in checkpoint_shapes(path).items()
                  if hasattr(value, "shape")}  # fmt: skip
        table, projection = shapes.get("pos_embed"), shapes.get("x_embedder.proj.weight")
        side = math.isqrt(table[1]) if table is not None and len(table) == 3 else None
        patch = projection[-1] if projection is not None else 2
    if not isinstance(side, int) or not isinstance(patch, int) or side <= 0 or patch <= 0:
        return None  # a config diffusers cannot load either: the load says so
    return side * patch * VAE_DOWNSAMPLING


def _claims_folder(index: dict, folder: Path) -> bool:
    config = folder / "transformer" / "config.json"
    if not index.get("_class_name", "").startswith("StableDiffusion3") or not config.is_file():
        return False
    return json.loads(config.read_text()).get("_class_name") == "SD3Transformer2DModel"


def claims_lora(shapes: dict, metadata: dict) -> bool:
    """An SD 3 / 3.5 LoRA: its training metadata says so, or kohya's `joint_blocks` keys, or a diffusers
    transformer LoRA with `transformer_blocks` that is not FLUX.1's (pipelines/families/flux.py is asked first)."""
    hints = (metadata.get("ss_base_model_version", "") + " " + metadata.get("modelspec.architecture", "")).lower()
    if "stable-diffusion-v3" in hints or "sd3" in hints:
        return True
    return any("joint_blocks" in key or key.startswith("transformer.transformer_blocks.") for key in shapes)


SD3 = ModelFamily(
    name="sd3",
    label="SD 3.5",
    deployment="SD3Generator",
    pipelines=FamilyPipelines(
        txt2img="StableDiffusion3Pipeline",
        img2img="StableDiffusion3Img2ImgPipeline",
        inpaint="StableDiffusion3InpaintPipeline",
    ),
    native_size=(1024, 1024),
    latent_rgb=LATENT_RGB,
    latent_rgb_bias=LATENT_RGB_BIAS,
    lora_family="sd3",
    embedding_family=None,
    max_batch_size=4,  # SD 3.5 Large in bf16: ~16 GB transformer + ~9.5 GB T5, 4 x 1024x1024 per batch
    max_batch_pixels=4 * 1024 * 1024,
    weights_folder="transformer",
    prompt_encoding="plain",
    samplers=FLOW_SAMPLERS,
    schedules=FLOW_SCHEDULES,
    # Stability's recommended guidance for 3.5 (its model cards: 3.5-4.5), not SD1.5's 7.
    request_defaults={"cfg_scale": 4.5, "sampler_name": "Euler", "scheduler_type": "simple"},
    latent_channels=16,
    sizes_multiple_of=16,  # 8x VAE downsampling, then 2x2 patches
    claims_checkpoint=_claims_checkpoint,
    claims_folder=_claims_folder,
    claims_lora=claims_lora,
    optional_components=("text_encoder_3", "tokenizer_3"),  # without T5-XXL, as diffusers allows
    # Stability's single files carry the VAE, not the text encoders (ComfyUI's text_encoders/clip_l.safetensors,
    # clip_g.safetensors, t5xxl_fp16.safetensors, the same files FLUX.1 uses); without a T5 it runs without one.
    single_file_modules=("vae", "clip", "clip_g", "t5"),
    optional_modules=("t5",),
    module_names={"vae": ("sd3",)},  # sd3_vae.safetensors, sd3.5_vae.safetensors, ...
    carried_modules=_carried_modules,
    single_file_loader=_load_single_file,
    inpainting_checkpoints=False,
    largest_side=_largest_side,
)
