"""FLUX.1 (dev, schnell and their fine-tunes): a rectified-flow transformer over 16-channel latents packed in
2x2 patches, with CLIP ViT-L (pooled) and T5-XXL text encoders.

Guidance as Forge defines it: dev is guidance-distilled, so `distilled_cfg_scale` (default 3.5) is the
guidance embedding and `cfg_scale` 1 means no unconditional pass (the negative prompt is not used); `cfg_scale`
above 1 adds true classifier-free guidance with the negative prompt (diffusers' `true_cfg_scale`). schnell has
no guidance embedding: `distilled_cfg_scale` does nothing there. dev and schnell are told apart by the
transformer's config (`guidance_embeds`).
"""

import json
from collections.abc import Mapping
from pathlib import Path

from pipelines.families.base import FamilyPipelines, ModelFamily, UnsupportedModelError
from pipelines.samplers import FLOW_SAMPLERS, FLOW_SCHEDULES

# The published fit of FLUX.1's 16 latent channels to RGB, with its bias (the latents as the transformer
# sees them: shifted and scaled).
LATENT_RGB = (
    (-0.0346, 0.0244, 0.0681), (0.0034, 0.0210, 0.0687), (0.0275, -0.0668, -0.0433), (-0.0174, 0.0160, 0.0617),
    (0.0859, 0.0721, 0.0329), (0.0004, 0.0383, 0.0115), (0.0405, 0.0861, 0.0915), (-0.0236, -0.0185, -0.0259),
    (-0.0245, 0.0250, 0.1180), (0.1008, 0.0755, -0.0421), (-0.0515, 0.0201, 0.0011), (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749), (-0.1264, -0.0522, -0.1103), (-0.0280, -0.0881, -0.0499), (-0.1262, -0.0982, -0.0778),
)  # fmt: skip
LATENT_RGB_BIAS = (-0.0329, -0.0718, -0.0851)

# diffusers' FluxPipeline passes its own sigmas and the resolution-dependent shift `mu` to the scheduler; Heun
# (FlowMatchHeunDiscreteScheduler) takes no custom sigmas, so it is not FLUX.1's.
SAMPLERS = {name: spec for name, spec in FLOW_SAMPLERS.items() if name != "Heun"}


PIPELINE_CLASSES = ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline")


def _claims_folder(index: dict, folder: Path) -> bool:
    """A diffusers FLUX.1 text-to-image folder: `FluxPipeline` (or its img2img / inpainting class) with a
    FluxTransformer2DModel of 64 input channels. FLUX.1 Fill, Canny, Depth and Kontext (other pipelines, wider
    inputs) are not claimed, so they are skipped with a warning naming their class."""
    config = folder / "transformer" / "config.json"
    if index.get("_class_name") not in PIPELINE_CLASSES or not config.is_file():
        return False
    transformer = json.loads(config.read_text())
    return transformer.get("_class_name") == "FluxTransformer2DModel" and transformer.get("in_channels") == 64


FLUX_WIDTH = 3072  # the transformer's inner width (24 heads x 128)
# Key names only FLUX.1 LoRAs have: kohya's (`lora_unet_double_blocks_0_...`), Black Forest Labs' / ComfyUI's
# (`diffusion_model.double_blocks.0...`) and diffusers' (`transformer.single_transformer_blocks.0...`).
LORA_KEY_MARKS = ("double_blocks", "single_blocks", "single_transformer_blocks")


def claims_lora(shapes: dict, metadata: dict) -> bool:
    """A FLUX.1 LoRA: its training metadata says so, or its key names (double/single blocks), or a diffusers
    transformer LoRA whose attention is FLUX.1's width."""
    hints = (metadata.get("ss_base_model_version", "") + " " + metadata.get("modelspec.architecture", "")).lower()
    if "flux" in hints:
        return True
    if any(mark in key for key in shapes for mark in LORA_KEY_MARKS):
        return True
    for key, tensor in shapes.items():
        if key.startswith("transformer.transformer_blocks.") and ".attn.to_q.lora_A" in key:
            return tuple(tensor.shape)[-1] == FLUX_WIDTH
    return False


BFL_PREFIX = "model.diffusion_model."  # ComfyUI's full checkpoints put the transformer under it


def is_bfl_layout(keys) -> bool:
    """Black Forest Labs' layout (`double_blocks.N...`), alone or under ComfyUI's `model.diffusion_model.`."""
    return any(key.removeprefix(BFL_PREFIX).startswith("double_blocks.") for key in keys)


def _claims_checkpoint(keys) -> bool:
    """A FLUX.1 text-to-image transformer in BFL's layout. Other models of that layout are told apart and
    refused by name: FLUX.2 and Chroma (no pooled-text modulation), and FLUX.1 Fill, Canny and Depth (their
    `img_in` takes the image condition too: 384 or 128 inputs, not 64), which other pipelines run."""
    if not is_bfl_layout(keys):
        return False
    names = {key.removeprefix(BFL_PREFIX) for key in keys}
    if "vector_in.in_layer.weight" not in names or "double_blocks.0.img_mod.lin.weight" not in names:
        raise UnsupportedModelError("a Black Forest Labs-layout transformer that is not FLUX.1 (FLUX.2 or Chroma)")
    img_in = next((shape for key, shape in keys.items() if key.removeprefix(BFL_PREFIX) == "img_in.weight"),
                  None) if isinstance(keys, Mapping) else None  # fmt: skip
    if img_in is not None and img_in.shape[-1] != 64:
        raise UnsupportedModelError(
            f"a FLUX.1 variant with {img_in.shape[-1]} input channels (Fill, Canny or "
            "Depth), which this service does not run; FLUX.1 text-to-image files have 64"
        )
    return True


def _load_single_file(entry, dtype):
    from pipelines.flux_single_file import load_flux_single_file  # torch and diffusers: the engine's side only

    return load_flux_single_file(entry, dtype)


FLUX = ModelFamily(
    name="flux",
    label="FLUX.1",
    deployment="FluxGenerator",
    pipelines=FamilyPipelines(
        txt2img="FluxPipeline",
        img2img="FluxImg2ImgPipeline",
        inpaint="FluxInpaintPipeline",
    ),
    native_size=(1024, 1024),
    latent_rgb=LATENT_RGB,
    latent_rgb_bias=LATENT_RGB_BIAS,
    lora_family="flux",
    embedding_family=None,  # no textual inversion for T5
    max_batch_size=4,  # 4 images of 1024x1024 next to ~33 GB of bf16 weights (transformer + T5) on an 80 GB GPU
    max_batch_pixels=4 * 1024 * 1024,
    weights_folder="transformer",
    guidance="distilled",
    prompt_encoding="plain",
    latent_layout="packed",
    samplers=SAMPLERS,
    schedules=FLOW_SCHEDULES,
    request_defaults={"cfg_scale": 1.0, "sampler_name": "Euler", "scheduler_type": "simple"},
    distilled_cfg_scale=3.5,
    latent_channels=16,
    sizes_multiple_of=16,  # 8x VAE downsampling, then 2x2 patches
    claims_checkpoint=_claims_checkpoint,
    claims_folder=_claims_folder,
    claims_lora=claims_lora,
    single_file_modules=("vae", "clip", "t5"),
    module_names={"vae": ("ae", "flux")},  # Black Forest Labs' `ae.safetensors`
    single_file_loader=_load_single_file,
    inpainting_checkpoints=False,
)
