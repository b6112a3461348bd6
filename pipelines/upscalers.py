"""Upscalers: A1111's latent modes and Real-ESRGAN-class models loaded with spandrel.

spandrel (the loader ComfyUI and chaiNNer use) detects the architecture from the weights (ESRGAN, Real-ESRGAN,
Real-ESRGAN Compact, SwinIR, HAT, ...), so any such `.pth`/`.safetensors` file in the upscaler folder works.
Inference is tiled, so memory stays bounded for large images; the model's native scale (x2, x4) is followed
by a resize to the requested size.

torch is imported where a tensor is made, not at module level: the ingress checks upscaler names with this
module and must not load torch (3.5 s and ~560 MB per ingress replica).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from pipelines.errors import DiffusionAPIError, InvalidRequestError
from pipelines.names import find_named_file, scan_named_files
from pipelines.settings import Settings

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

UPSCALER_SUFFIXES = (".pth", ".safetensors")
# A1111's latent upscale modes: name -> (torch interpolate mode, antialias)
LATENT_MODES: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
# A1111's upscalers that are a plain image resize (no model file)
RESIZE_MODES: dict[str, Image.Resampling] = {"Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}
DEFAULT_TILE = 256
TILE_OVERLAP = 16


class UnknownUpscalerError(DiffusionAPIError):
    status_code = 404


@dataclass(frozen=True)
class UpscalerFile:
    name: str
    path: Path


_LATENT_NAMES = {name.lower(): name for name in LATENT_MODES}


def canonical_latent_name(name: str) -> str | None:
    """A latent upscaler's name as A1111 spells it (from any case), or None for an external upscaler."""
    return _LATENT_NAMES.get(name.strip().lower())


def canonical_resize_name(name: str) -> str | None:
    """A plain-resize upscaler's name as A1111 spells it (`Lanczos`, `Nearest`, any case), else None."""
    return {mode.lower(): mode for mode in RESIZE_MODES}.get(name.strip().lower())


def latent_mode(name: str) -> tuple[str, bool] | None:
    """The interpolation of a latent upscaler name (any case), or None for an external upscaler."""
    canonical = canonical_latent_name(name)
    return LATENT_MODES[canonical] if canonical else None


def upscale_latents(latents: torch.Tensor, height: int, width: int, mode: tuple[str, bool]) -> torch.Tensor:
    """Latents resized to the latent size of `height` x `width` pixels (a factor-8 VAE)."""
    import torch

    interpolation, antialias = mode
    size = (height // 8, width // 8)
    if interpolation in ("nearest", "nearest-exact"):
        return torch.nn.functional.interpolate(latents, size=size, mode=interpolation)
    return torch.nn.functional.interpolate(latents, size=size, mode=interpolation, antialias=antialias)


def hires_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """The final hires-fix size: the first-pass size times `scale`, rounded to a multiple of 8."""
    return max(8, round(width * scale / 8) * 8), max(8, round(height * scale / 8) * 8)


class UpscalerLibrary:
    """The upscaler files, looked up by name; loaded models are cached (a small LRU)."""

    def __init__(self, settings: Settings, device: torch.device | None = None, max_loaded: int = 2):
        self.folder = settings.upscalers_dir
        self.allow_external_links = settings.allow_external_links
        self._device = device
        self.max_loaded = max_loaded
        self._loaded: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def device(self) -> torch.device:
        import torch

        return self._device or torch.device("cpu")

    def available(self) -> list[UpscalerFile]:
        files = scan_named_files(self.folder, UPSCALER_SUFFIXES, self.allow_external_links)
        return [UpscalerFile(name=name, path=path) for name, path in files]

    def resolve(self, requested: str, field: str = "hires.upscaler") -> UpscalerFile:
        files = scan_named_files(self.folder, UPSCALER_SUFFIXES, self.allow_external_links)
        found = find_named_file(requested, files, UPSCALER_SUFFIXES, field, "upscaler")
        if found is not None:
            return UpscalerFile(name=found[0], path=found[1])
        names = ", ".join(repr(n) for n in [*LATENT_MODES, *RESIZE_MODES, *(name for name, _ in files)])
        raise UnknownUpscalerError(f"unknown upscaler {requested!r}; available: {names}", field=field)

    def check(self, requested: str, field: str = "hires.upscaler") -> str:
        """The canonical name of a latent mode, a plain resize or an upscaler file; raises a 4xx error for
        unknown names."""
        built_in = canonical_latent_name(requested) or canonical_resize_name(requested)
        return built_in or self.resolve(requested, field).name

    def load(self, requested: str):
        """The spandrel model descriptor of an upscaler file (cached)."""
        item = self.resolve(requested)
        with self._lock:
            model = self._loaded.get(item.name)
            if model is not None:
                self._loaded.move_to_end(item.name)
                return model
            from spandrel import ImageModelDescriptor, ModelLoader

            try:
                model = ModelLoader(device=self.device).load_from_file(str(item.path))
            except Exception as error:
                raise DiffusionAPIError(
                    f"could not load upscaler '{item.name}': {error}", field="hires.upscaler"
                ) from error
            if not isinstance(model, ImageModelDescriptor):
                raise InvalidRequestError(f"'{item.name}' is not an image upscaler model", field="hires.upscaler")
            model.eval()
            while len(self._loaded) >= self.max_loaded:
                self._loaded.popitem(last=False)
            self._loaded[item.name] = model
            return model

    def upscale(self, image: Image.Image, requested: str, width: int, height: int, tile: int = DEFAULT_TILE):
        """`image` upscaled by the named model (tiled), then resized to exactly `width` x `height`; a plain
        resize (`Lanczos`, `Nearest`) needs no model."""
        if resize := canonical_resize_name(requested):
            return image.convert("RGB").resize((width, height), RESIZE_MODES[resize])
        model = self.load(requested)
        with self._lock:  # one image at a time per library: bounded memory
            upscaled = run_tiled(model, image.convert("RGB"), tile, self.device)
        if upscaled.size != (width, height):
            upscaled = upscaled.resize((width, height), Image.Resampling.LANCZOS)
        return upscaled


def run_tiled(model, image: Image.Image, tile: int, device: torch.device) -> Image.Image:
    """Runs an upscaler over overlapping tiles and stitches the centres, so memory depends on the tile size,
    not the image size."""
    import torch

    scale = model.scale
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).unsqueeze(0)
    _, _, height, width = array.shape
    output = torch.zeros(1, 3, height * scale, width * scale)
    step = max(tile - 2 * TILE_OVERLAP, 8)
    with torch.inference_mode():
        for top in range(0, height, step):
            for left in range(0, width, step):
                # The tile with a margin of TILE_OVERLAP on each side (clipped at the borders).
                y0, x0 = max(top - TILE_OVERLAP, 0), max(left - TILE_OVERLAP, 0)
                y1, x1 = min(top + step + TILE_OVERLAP, height), min(left + step + TILE_OVERLAP, width)
                result = model(array[:, :, y0:y1, x0:x1].to(device)).float().cpu()
                # Keep only the part that belongs to this tile (drop the margins).
                inner_y0, inner_x0 = (top - y0) * scale, (left - x0) * scale
                inner_h = (min(top + step, height) - top) * scale
                inner_w = (min(left + step, width) - left) * scale
                output[:, :, top * scale : top * scale + inner_h, left * scale : left * scale + inner_w] = result[
                    :, :, inner_y0 : inner_y0 + inner_h, inner_x0 : inner_x0 + inner_w
                ]
    pixels = (output.clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(pixels)
