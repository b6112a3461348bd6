"""Inpainting's diffusers call: what an inpainting pipeline needs besides the usual arguments.

Split from pipelines/inpaint.py (mask planning and the paste back, pure PIL) because it needs torch: only the
engine (pipelines/generate.py) imports it, never the request schemas or the ingress replica.
"""

import inspect

import torch
from PIL import Image

from pipelines.inpaint import GRAY, InpaintPlan


def is_inpaint_pipeline(pipe) -> bool:
    return "mask_image" in inspect.signature(pipe.__call__).parameters


def inpaint_arguments(pipe, plans: list[InpaintPlan | None], seeds: list[int], arguments: dict) -> dict:
    """What an inpainting pipeline needs besides the usual arguments: each job's mask, where a job without one
    (txt2img, img2img or the hires pass on an inpainting checkpoint) repaints everything, as A1111 does; a
    gray image to condition on for txt2img; and A1111's start latents for "latent noise" / "latent nothing"."""
    width, height = arguments["width"], arguments["height"]
    count = len(plans)
    masks = [plan.mask if plan else Image.new("L", (width, height), 255) for plan in plans]
    image = arguments.get("image")
    extra: dict = {"mask_image": masks}
    if image is None:  # txt2img: from pure noise (SDXL's inpainting pipeline defaults to 0.9999, one step less)
        extra.update(image=[Image.new("RGB", (width, height), GRAY)] * count, strength=1.0)
    elif isinstance(image, torch.Tensor):  # latents (a latent hires pass): no pixels to mask
        blank = torch.zeros(1, 3, height, width, device=pipe._execution_device, dtype=pipe.vae.dtype)
        extra["masked_image_latents"] = _encode(pipe, blank, seeds[:1]).repeat(count, 1, 1, 1)
    fill = plans[0].fill if plans[0] else 1  # one fill per batch (PreparedJob.batch_key)
    if fill in (2, 3) and not isinstance(image, torch.Tensor):
        extra.update(_masked_content_latents(pipe, extra.get("image", image), masks, seeds, fill, width, height))
    return extra


def _masked_content_latents(pipe, images, masks, seeds: list[int], fill: int, width: int, height: int) -> dict:
    """A1111's "latent noise" (2) and "latent nothing" (3): the input's latents with the masked area replaced
    by fresh noise or by zeros; the masked image is encoded here too, as the pipeline cannot derive it from
    latents."""
    from diffusers.utils.torch_utils import randn_tensor

    pixels = pipe.image_processor.preprocess(images, height=height, width=width)
    device = pipe._execution_device  # the GPU with model CPU offload too (diffusers' own pipelines use it)
    pixels = pixels.to(device, pipe.vae.dtype)
    mask = pipe.mask_processor.preprocess(masks, height=height, width=width).to(device, pipe.vae.dtype)
    latents = _encode(pipe, pixels, seeds)
    latent_mask = torch.nn.functional.interpolate(mask, size=latents.shape[-2:]).round()
    if fill == 2:  # A1111 draws it from the job's seed
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        replacement = randn_tensor(latents.shape, generator=generators, device=latents.device, dtype=latents.dtype)
    else:
        replacement = torch.zeros_like(latents)
    return {
        "image": latents * (1 - latent_mask) + replacement * latent_mask,
        "masked_image_latents": _encode(pipe, pixels * (mask < 0.5), seeds),
    }


def _encode(pipe, pixels: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """Pixels in [-1, 1] -> the scaled latents the pipeline works on (its own VAE encoding)."""
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    with torch.no_grad():  # not inference_mode: offload hooks move the VAE's weights here (generate.py says why)
        return pipe._encode_vae_image(pixels, generator=generators)
