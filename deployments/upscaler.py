"""The upscaler deployment: the image models that are not diffusion. Real-ESRGAN-class upscalers (spandrel),
used by hires fix with an external upscaler and A1111's extras, and the ControlNet annotators that need
weights (depth), which the ingress (no torch there) sends the images to.

They run here rather than in the generators so that their models and memory live on their own replica (on a
GPU shared with the refiner in serve_config.yaml), and several generators share it.
"""

import asyncio

import numpy as np
import torch
from PIL import Image
from ray import serve

from deployments.generator_config import torch_thread_count
from pipelines.annotators import AnnotatorLibrary
from pipelines.models import select_device
from pipelines.settings import Settings
from pipelines.upscalers import UpscalerLibrary


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=2)
class Upscaler:
    def __init__(self, settings: dict, device: str | None = None, torch_threads: int | None = None):
        torch.set_num_threads(torch_thread_count(torch_threads))
        self.library = UpscalerLibrary(Settings(**settings), device=select_device(device)[0])
        self.annotators = AnnotatorLibrary(Settings(**settings), device=device)

    async def upscale(self, images: list[Image.Image], upscaler: str, width: int, height: int) -> list[Image.Image]:
        """Each image upscaled by the named model (tiled) and resized to exactly `width` x `height`."""
        return await asyncio.to_thread(lambda: [self.library.upscale(i, upscaler, width, height) for i in images])

    async def annotate(self, module: str, padded: np.ndarray, resolution: int) -> np.ndarray:
        """An annotator's map of an image already resized and padded as the extension does (8-bit gray)."""
        return await asyncio.to_thread(self.annotators.depth, module, padded)

    def check_health(self) -> None:
        self.library.available()
