"""ControlNet annotators that need weights: depth maps from models users put in `stable_diffusion/annotators/`.

Library: **transformers**' depth-estimation models (`AutoModelForDepthEstimation` + `AutoImageProcessor`), not
controlnet_aux (no longer maintained, and it downloads weights by itself). transformers is already here (CLIP),
is well kept, loads Depth Anything (v1 and v2) and MiDaS's DPT from plain folders offline, and those folders
are what the model authors publish on the Hugging Face hub. Each module reads the folder of its name:

| module | folder (a transformers depth-estimation folder) | e.g. |
| --- | --- | --- |
| `depth_anything` | `annotators/depth_anything/` | LiheYoung/depth-anything-small-hf |
| `depth_anything_v2` | `annotators/depth_anything_v2/` | depth-anything/Depth-Anything-V2-Small-hf |
| `depth` (display `depth_midas`) | `annotators/depth_midas/` | Intel/dpt-hybrid-midas |

A module is listed (`GET /controlnet/module_list`) only when its folder holds a model. The maps follow the
extension: the image made RGB and resized with padding to `processor_res` (pipelines/preprocessors.py), the
depth predicted through the folder's image processor (Depth Anything: its 518 px, aspect kept), brought back to
the padded size, scaled min-max to 0-255 and cropped. MiDaS is the one difference from the extension: it feeds
the padded image itself, and transformers' DPT takes square inputs only, so here it reads its processor's size
(384 x 384 for Intel/dpt-hybrid-midas). The models run wherever torch is: in-process for the CLI and the
engine, on the Upscaler deployment for the service (the ingress sends the image there: `runner`)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipelines.errors import DiffusionAPIError, ModelLoadError
from pipelines.preprocessors import RESOLUTION, Preprocessor, Slider, resize_with_pad
from pipelines.settings import Settings

# module -> its folder under the annotators folder
ANNOTATORS: dict[str, str] = {"depth": "depth_midas", "depth_anything": "depth_anything",
                              "depth_anything_v2": "depth_anything_v2"}  # fmt: skip
ANNOTATOR_ALIASES = {"depth_midas": "depth"}  # the extension's display names
WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_RES = Slider(RESOLUTION, 512, 64, 2048)

Runner = Callable[[str, np.ndarray, int], np.ndarray]  # (module, padded RGB image, resolution) -> depth (uint8)


class AnnotatorNotInstalledError(DiffusionAPIError):
    """A 404, as for a model that is not installed: the request is well formed, the weights are not here."""

    status_code = 404


def is_annotator_module(name: str) -> bool:
    return ANNOTATOR_ALIASES.get(name, name) in ANNOTATORS


class AnnotatorLibrary:
    """The installed weight-needing annotators. `runner` (set by the service's ingress) runs the models
    elsewhere; without it they run here, loaded once and kept (2 at most)."""

    def __init__(self, settings: Settings, device: str | None = None, runner: Runner | None = None):
        self.folder = settings.annotators_dir
        self.device = device
        self.runner = runner
        self._loaded: OrderedDict[str, tuple] = OrderedDict()
        self._lock = threading.Lock()

    def folder_of(self, name: str) -> Path:
        return self.folder / ANNOTATORS[ANNOTATOR_ALIASES.get(name, name)]

    def available(self) -> list[str]:
        """The modules whose folder holds a model (its config, its image processor's and weights)."""
        return [name for name in ANNOTATORS
                if (self.folder_of(name) / "config.json").is_file()
                and (self.folder_of(name) / "preprocessor_config.json").is_file()
                and any((self.folder_of(name) / weights).is_file() for weights in WEIGHTS)]  # fmt: skip

    def preprocessor(self, name: str) -> Preprocessor:
        """The module as a preprocessor (the extension's resolution slider); a 4xx when it is not installed."""
        internal = ANNOTATOR_ALIASES.get(name, name)
        if internal not in self.available():
            installed = ", ".join(self.available()) or "none"
            raise AnnotatorNotInstalledError(f"module {name!r} needs its model in {self.folder_of(name)}/ (a "
                                             "transformers depth-estimation folder: README 'ControlNet and "
                                             f"IP-Adapter'); installed annotators: {installed}",
                                             field="module")  # fmt: skip
        return Preprocessor(internal, (_RES,), lambda img, res, _a, _b: self._detect(internal, img, res))

    def _detect(self, name: str, img: np.ndarray, resolution: int) -> np.ndarray:
        padded, crop = resize_with_pad(img, resolution)
        depth = self.runner(name, padded, resolution) if self.runner else self.depth(name, padded)
        return crop(depth)

    def depth(self, name: str, padded: np.ndarray) -> np.ndarray:
        """The depth map of a padded RGB image, as 8-bit gray of its size (near is bright)."""
        import torch

        model, processor = self._model(name)
        parameter = next(model.parameters())
        with torch.inference_mode():
            pixels = processor(images=padded, return_tensors="pt").pixel_values
            predicted = model(pixel_values=pixels.to(parameter.device, parameter.dtype)).predicted_depth
            depth = torch.nn.functional.interpolate(predicted[:, None].float(), size=padded.shape[:2],
                                                    mode="bilinear", align_corners=False)[0, 0]  # fmt: skip
            depth = depth - depth.min()
            depth = depth / depth.max().clamp(min=1e-8) * 255.0
        return depth.cpu().numpy().clip(0, 255).astype(np.uint8)

    def _model(self, name: str):
        with self._lock:
            if name in self._loaded:
                self._loaded.move_to_end(name)
                return self._loaded[name]
            from transformers import AutoImageProcessor, AutoModelForDepthEstimation
            from transformers.utils import logging as transformers_logging

            from pipelines.models import select_device

            folder = self.folder_of(name)
            transformers_logging.disable_progress_bar()
            try:
                device, _ = select_device(self.device)
                model = AutoModelForDepthEstimation.from_pretrained(folder, local_files_only=True).to(device).eval()
                processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
            except Exception as error:
                raise ModelLoadError(f"could not load annotator '{name}' from {folder}: {error}",
                                     field="controlnet") from error  # fmt: skip
            while len(self._loaded) >= 2:
                self._loaded.popitem(last=False)
            self._loaded[name] = (model, processor)
            return self._loaded[name]

    def clear(self) -> None:
        with self._lock:
            self._loaded.clear()
