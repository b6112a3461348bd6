"""The upscaler deployment: Real-ESRGAN-class models (spandrel), used by hires fix with an external upscaler.

Upscaling runs here rather than in the generators so that its model and memory live on their own replica
(on a GPU shared with the refiner in serve_config.yaml), and several generators share it.
"""

import asyncio

import torch
from PIL import Image
from ray import serve

from deployments.generator_config import torch_thread_count
from pipelines.models import select_device
from pipelines.settings import Settings
from pipelines.upscalers import UpscalerLibrary


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=2)
class Upscaler:
    def __init__(self, settings: dict, device: str | None = None, torch_threads: int | None = None):
        torch.set_num_threads(torch_thread_count(torch_threads))
        self.library = UpscalerLibrary(Settings(**settings), device=select_device(device)[0])

    async def upscale(self, images: list[Image.Image], upscaler: str, width: int, height: int) -> list[Image.Image]:
        """Each image upscaled by the named model (tiled) and resized to exactly `width` x `height`."""
        return await asyncio.to_thread(lambda: [self.library.upscale(i, upscaler, width, height) for i in images])

    def check_health(self) -> None:
        self.library.available()
