"""Stable Diffusion 1.x (and its fine-tunes): a UNet with one CLIP ViT-L text encoder, trained at 512x512."""

import json
from pathlib import Path

from pipelines.families.base import FamilyPipelines, ModelFamily

# The published fit of SD1.5's latent channels to RGB (A1111's "Approx cheap" previews).
LATENT_RGB = ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473))


def _claims_checkpoint(keys: list[str]) -> bool:
    """A1111/CompVis layout: a UNet and `cond_stage_model.transformer.` (SD 2.x has `cond_stage_model.model.`)."""
    has = lambda prefix: any(key.startswith(prefix) for key in keys)  # noqa: E731
    return has("model.diffusion_model.") and has("cond_stage_model.transformer.")


def _claims_folder(index: dict, folder: Path) -> bool:
    class_name = index.get("_class_name", "")
    unet_config = folder / "unet" / "config.json"
    if not unet_config.is_file() or json.loads(unet_config.read_text()).get("addition_embed_type") == "text_time":
        return False
    return class_name.startswith("StableDiffusion") and "XL" not in class_name


SD15 = ModelFamily(
    name="sd15",
    label="SD1.5",
    deployment="SD15Generator",
    pipelines=FamilyPipelines(
        txt2img="StableDiffusionPipeline",
        img2img="StableDiffusionImg2ImgPipeline",
        inpaint="StableDiffusionInpaintPipeline",
        single_file="StableDiffusionPipeline",
        controlnet={
            "StableDiffusionPipeline": "StableDiffusionControlNetPipeline",
            "StableDiffusionImg2ImgPipeline": "StableDiffusionControlNetImg2ImgPipeline",
            "StableDiffusionInpaintPipeline": "StableDiffusionControlNetInpaintPipeline",
        },
    ),
    native_size=(512, 512),
    latent_rgb=LATENT_RGB,
    lora_family="sd15",
    embedding_family="sd15",
    max_batch_size=8,  # 8 images of 512x512 (2 MP): about 7 GB of activations in half precision, next to 2 GB
    max_batch_pixels=8 * 512 * 512,
    claims_checkpoint=_claims_checkpoint,
    claims_folder=_claims_folder,
)
