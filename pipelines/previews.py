"""Live previews: the image so far, decoded cheaply from the latents while a job denoises.

The decode is a fixed linear map from the latent channels to RGB (A1111's "Approx cheap" idea; the
coefficients are the published fits for each family's autoencoder, in pipelines/families/), one pixel per
latent (a 512x512 job gives a 64x64 preview): a matrix product and a small JPEG, no VAE call, so asking for
previews does not slow a job down.

The engine reports previews to whoever set `PREVIEW_SINK` for the call (the generator deployment sets it in its
worker thread); at most every PREVIEW_INTERVAL_S, for the jobs that asked (`"preview": true`).
"""

import base64
import io
from collections.abc import Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING

import torch
from PIL import Image

if TYPE_CHECKING:
    from pipelines.families import ModelFamily

PREVIEW_INTERVAL_S = 0.5
PREVIEW_JPEG_QUALITY = 70
PreviewSink = Callable[[str, str], None]  # (job id, JPEG in base64)
PREVIEW_SINK: ContextVar[PreviewSink | None] = ContextVar("diffusion_api_preview_sink", default=None)


def latents_to_image(latents: torch.Tensor, latent_rgb: tuple[tuple[float, float, float], ...],
                     bias: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> Image.Image:  # fmt: skip
    """One image's latents (c x h x w) as an RGB image of h x w pixels, through the family's channel -> RGB
    weights and bias (`ModelFamily.latent_rgb`; the result is in [-1, 1])."""
    weights = torch.tensor(latent_rgb, dtype=torch.float32)
    rgb = torch.einsum("chw,cr->hwr", latents[: len(latent_rgb)].detach().float().cpu(), weights)
    rgb = rgb + torch.tensor(bias, dtype=torch.float32)
    pixels = ((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels, "RGB")


def unpack_latents(tokens: torch.Tensor, height: int, width: int, vae_scale_factor: int = 8) -> torch.Tensor:
    """One image's packed latents (FLUX.1's transformer tokens: one per 2x2 latent patch, `c * 4` wide) as
    c x h x w latents, the layout diffusers' `FluxPipeline._unpack_latents` gives the VAE."""
    rows, columns = 2 * (height // (vae_scale_factor * 2)), 2 * (width // (vae_scale_factor * 2))
    channels = tokens.shape[-1] // 4
    patches = tokens.reshape(rows // 2, columns // 2, channels, 2, 2)
    return patches.permute(2, 0, 3, 1, 4).reshape(channels, rows, columns)


def preview_jpeg_base64(latents: torch.Tensor, family: "ModelFamily", width: int = 0, height: int = 0) -> str:
    """A JPEG preview of one image's latents on a model of `family` (`width` x `height`: the call's size,
    which packed latents need to be laid out again)."""
    if family.latent_layout == "packed":
        latents = unpack_latents(latents, height, width)
    buffer = io.BytesIO()
    image = latents_to_image(latents, family.latent_rgb, family.latent_rgb_bias)
    image.save(buffer, format="JPEG", quality=PREVIEW_JPEG_QUALITY)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def set_preview_sink(sink: PreviewSink | None) -> None:
    """Where the engine's calls in this context (a worker thread's) send previews. (A function, so Serve's
    deployment classes that call it do not capture the ContextVar, which cannot be pickled.)"""
    PREVIEW_SINK.set(sink)
