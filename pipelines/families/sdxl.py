"""Stable Diffusion XL: the base (a UNet with CLIP ViT-L and OpenCLIP ViT-bigG, trained at 1024x1024) and the
refiner (only the second text encoder and an aesthetic-score conditioning: it continues images, never starts one)."""

import json
from pathlib import Path

from pipelines.families.base import FamilyPipelines, ModelFamily

# The published fit of SDXL's latent channels to RGB.
LATENT_RGB = ((0.3448, 0.4168, 0.4395), (-0.1953, -0.0290, 0.0250), (0.1074, 0.0886, -0.0163),
              (-0.3730, -0.2499, -0.2088))  # fmt: skip


def _has(keys: list[str], prefix: str) -> bool:
    return any(key.startswith(prefix) for key in keys)


def _text_time_unet(folder: Path) -> bool:
    """SDXL's UNets condition on the pooled text and the image's size and crop ("text_time")."""
    config = folder / "unet" / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("addition_embed_type") == "text_time"


def _has_first_text_encoder(index: dict) -> bool:
    return (index.get("text_encoder") or [None, None])[0] is not None


SDXL = ModelFamily(
    name="sdxl",
    label="SDXL",
    deployment="SDXLGenerator",
    pipelines=FamilyPipelines(
        txt2img="StableDiffusionXLPipeline",
        img2img="StableDiffusionXLImg2ImgPipeline",
        inpaint="StableDiffusionXLInpaintPipeline",
        single_file="StableDiffusionXLPipeline",
        controlnet={
            "StableDiffusionXLPipeline": "StableDiffusionXLControlNetPipeline",
            "StableDiffusionXLImg2ImgPipeline": "StableDiffusionXLControlNetImg2ImgPipeline",
            "StableDiffusionXLInpaintPipeline": "StableDiffusionXLControlNetInpaintPipeline",
        },
    ),
    native_size=(1024, 1024),
    latent_rgb=LATENT_RGB,
    lora_family="sdxl",
    embedding_family="sdxl",
    max_batch_size=4,  # 4 images of 1024x1024: the UNet's activations at 128x128 latents are ~4x SD1.5's
    max_batch_pixels=4 * 1024 * 1024,
    claims_checkpoint=lambda keys: _has(keys, "model.diffusion_model.") and _has(keys, "conditioner.embedders.1."),
    claims_folder=lambda index, folder: _text_time_unet(folder) and _has_first_text_encoder(index),
)

SDXL_REFINER = ModelFamily(
    name="sdxl-refiner",
    label="SDXL refiner",
    deployment="Refiner",
    pipelines=FamilyPipelines(
        txt2img=None,
        img2img="StableDiffusionXLImg2ImgPipeline",
        inpaint="StableDiffusionXLInpaintPipeline",
        single_file="StableDiffusionXLImg2ImgPipeline",
    ),
    native_size=(1024, 1024),
    latent_rgb=LATENT_RGB,
    lora_family=None,  # LoRAs are trained for the base
    embedding_family="sdxl",  # its text encoder is the base's second: SDXL embeddings' clip_g
    refines="sdxl",
    max_batch_size=4,
    max_batch_pixels=4 * 1024 * 1024,
    claims_checkpoint=lambda keys: (
        _has(keys, "model.diffusion_model.")
        and _has(keys, "conditioner.embedders.0.model.")
        and not _has(keys, "conditioner.embedders.1.")
    ),
    claims_folder=lambda index, folder: _text_time_unet(folder) and not _has_first_text_encoder(index),
)
