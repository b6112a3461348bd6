"""Planning a job's ControlNet units before any model work: each unit's model (of the job's family), its
control map (the preprocessor run on its image, fitted to the job's size) and its settings, as A1111's
ControlNet extension reads them. The maps are made on the ingress (no torch: OpenCV and numpy), so a bad unit
fails at submission and the generator gets the maps ready."""

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from pipelines.catalog import ModelEntry
from pipelines.controlnets import ControlNetFile, ControlNetLibrary
from pipelines.errors import DiffusionAPIError, InvalidRequestError
from pipelines.images import decode_base64_image, decode_image
from pipelines.preprocessors import Preprocessor, preprocessor
from pipelines.schemas import ControlNetUnit

FAMILY_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL", "sd2": "SD 2.x", "sdxl-refiner": "SDXL refiner"}
# The names a job's ControlNet files are stored under (beside img2img's inputs): a unit's image as sent, and the
# map the ControlNet saw (the preprocessor's, fitted to the job's size).
CONTROL_IMAGE = "controlnet.{index}.image"
CONTROL_MAP = "controlnet.{index}.map"


@dataclass(frozen=True)
class ControlPlan:
    """One unit, resolved: what the engine runs and what the infotext says of it."""

    model: ControlNetFile
    model_title: str  # A1111's `name [hash8]`
    module: str
    image: Image.Image  # the control map at the job's size: what the ControlNet sees
    weight: float
    guidance_start: float
    guidance_end: float
    control_mode: str
    resize_mode: str
    processor_res: int
    threshold_a: float
    threshold_b: float
    pixel_perfect: bool
    hr_option: str
    applies: bool = True  # False: its guidance window holds no step (it runs at weight 0)

    def call_settings(self) -> tuple[float, float, float]:
        """(weight, guidance start, guidance end) for diffusers, which refuses an empty window: a unit that
        applies to no step runs at weight 0 (the pixels of no ControlNet)."""
        return (self.weight, self.guidance_start, self.guidance_end) if self.applies else (0.0, 0.0, 1.0)

    def batch_key(self) -> tuple:
        """What must be equal for jobs to share one diffusers call (the maps are per job)."""
        return (str(self.model.path), self.call_settings(), self.control_mode, self.hr_option)

    def infotext(self) -> str:
        """The value of `ControlNet N:` as the extension writes it (its reader splits it back on ', ')."""
        fields = {"Module": self.module, "Model": self.model_title, "Weight": self.weight,
                  "Resize Mode": self.resize_mode, "Processor Res": self.processor_res,
                  "Threshold A": self.threshold_a, "Threshold B": self.threshold_b,
                  "Guidance Start": self.guidance_start, "Guidance End": self.guidance_end,
                  "Pixel Perfect": self.pixel_perfect, "Control Mode": self.control_mode}  # fmt: skip
        # The extension leaves out the sliders a module does not have (-1).
        return ", ".join(f"{key}: {value}" for key, value in fields.items() if value != -1)


def map_files(controls: list[ControlPlan]) -> dict[str, bytes]:
    """The units' maps (as the ControlNet sees them) as PNG files, by the names the job stores them under."""
    files = {}
    for index, control in enumerate(controls):
        buffer = io.BytesIO()
        control.image.save(buffer, format="PNG")
        files[CONTROL_MAP.format(index=index)] = buffer.getvalue()
    return files


def pixel_perfect_resolution(image: Image.Image, width: int, height: int, resize_mode: str) -> int:
    """The extension's "Pixel Perfect": the preprocessor resolution at which the map has the image's own
    detail at the job's size (the short side scaled as the resize mode fits the image)."""
    raw_width, raw_height = image.size
    scales = (height / raw_height, width / raw_width)
    scale = min(scales) if resize_mode == "Resize and Fill" else max(scales)
    return int(round(scale * min(raw_width, raw_height)))


def fit_map(control_map: Image.Image, width: int, height: int, resize_mode: str) -> Image.Image:
    """The map at the job's size: stretched (Just Resize), covering and centre-cropped (Crop and Resize), or
    inside and padded with black (Resize and Fill)."""
    method = Image.Resampling.LANCZOS
    if resize_mode == "Just Resize":
        return control_map.resize((width, height), method)
    if resize_mode == "Crop and Resize":
        return ImageOps.fit(control_map, (width, height), method)
    return ImageOps.pad(control_map, (width, height), method, color=_border_median(control_map))


def _border_median(image: Image.Image) -> tuple[int, ...]:
    """The median colour of an image's border: what A1111's "Resize and Fill" pads a map with."""
    pixels = np.asarray(image.convert("RGB"))
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    return tuple(int(value) for value in np.median(border, axis=0))


def slider_values_used(module: Preprocessor, resolution: int, threshold_a: float,
                threshold_b: float) -> tuple[int, float, float]:  # fmt: skip
    """The slider values the map was made with (a default where the unit left -1; -1 for sliders the module
    does not have), for the infotext."""
    res = (resolution if resolution > 0 else int(module.resolution.value)) if module.resolution else -1
    sliders = (*module.thresholds, None, None)
    a, b = ((given if given >= 0 else slider.value) if slider else -1
            for slider, given in zip(sliders[:2], (threshold_a, threshold_b), strict=True))  # fmt: skip
    return res, float(a), float(b)


def plan_controls(units: list[ControlNetUnit], model: ModelEntry | None, library: ControlNetLibrary | None,
                  width: int, height: int, init_image: Image.Image | None, input_bytes: dict[str, bytes],
                  warnings: list[str]) -> list[ControlPlan]:  # fmt: skip
    """Each unit resolved and its map made; a unit that cannot run is a 4xx naming it. `init_image`: img2img's
    input as the job runs it (resized, or cropped for "Only masked"): the map of a unit without an image."""
    if units and library is None:
        raise InvalidRequestError("ControlNet needs the ControlNet folder; none is configured here", field="controlnet")
    return [_plan(unit, f"controlnet[{index}]", model, library, width, height, init_image,
                  input_bytes.get(CONTROL_IMAGE.format(index=index)), warnings)
            for index, unit in enumerate(units)]  # fmt: skip


def _plan(unit: ControlNetUnit, field: str, model: ModelEntry | None, library: ControlNetLibrary, width: int,
          height: int, init_image: Image.Image | None, raw: bytes | None,
          warnings: list[str]) -> ControlPlan:  # fmt: skip
    entry = library.resolve(unit.model, field=f"{field}.model")
    if model is not None and entry.family != model.family:
        fitting = [item.name for item in library.available() if item.family == model.family]
        raise InvalidRequestError(
            f"{field}.model: ControlNet '{entry.name}' is for {FAMILY_NAMES.get(entry.family, entry.family)} models "
            f"and model '{model.name}' is {FAMILY_NAMES.get(model.family, model.family)}; installed "
            f"{FAMILY_NAMES.get(model.family, model.family)} ControlNets: {', '.join(map(repr, fitting)) or 'none'}",
            field=f"{field}.model",
        )
    try:
        module = preprocessor(unit.module)
    except DiffusionAPIError as error:
        raise InvalidRequestError(f"{field}: {error.message}", field=f"{field}.module") from None
    resize_mode = unit.resize_mode
    if raw is not None:
        image = decode_image(raw, field=f"{field}.image", mode=None)  # transparency: over white, as the extension
    elif unit.image:
        image = decode_base64_image(unit.image, field=f"{field}.image", mode=None)
    elif init_image is not None:
        image, resize_mode = init_image, "Just Resize"  # img2img: the input as the job runs it, as the extension
    else:
        raise InvalidRequestError(f"{field}.image: a txt2img unit needs an image (or a map, with module 'none')",
                                  field=f"{field}.image")  # fmt: skip
    resolution = unit.processor_res
    if unit.pixel_perfect:
        resolution = max(64, min(2048, pixel_perfect_resolution(image, width, height, unit.resize_mode)))
    try:
        detected = module.run(image, resolution, unit.threshold_a, unit.threshold_b)
    except DiffusionAPIError as error:  # a slider out of its range: named as the unit's field
        raise InvalidRequestError(f"{field}.{error.message}", field=f"{field}.{error.field}") from None
    slider_values = slider_values_used(module, resolution, unit.threshold_a, unit.threshold_b)
    applies = unit.guidance_start < unit.guidance_end
    if not applies:
        warnings.append(f"{field}: guidance_start {unit.guidance_start:g} is not before guidance_end "
                        f"{unit.guidance_end:g}: the unit applies to no step")  # fmt: skip
    return ControlPlan(
        model=entry, model_title=library.title(entry), module=module.name,
        image=fit_map(detected.convert("RGB"), width, height, resize_mode), weight=unit.weight,
        guidance_start=unit.guidance_start, guidance_end=unit.guidance_end, control_mode=unit.control_mode,
        resize_mode=unit.resize_mode, processor_res=slider_values[0], threshold_a=slider_values[1],
        threshold_b=slider_values[2], pixel_perfect=unit.pixel_perfect, hr_option=unit.hr_option, applies=applies,
    )  # fmt: skip
