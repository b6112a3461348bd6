"""Planning a job's ControlNet units before any model work: each unit's model (of the job's family), its
control map (the preprocessor run on its image, fitted to the job's size) and its settings, as A1111's
ControlNet extension reads them. The maps are made on the ingress (no torch: OpenCV and numpy), so a bad unit
fails at submission and the generator gets the maps ready."""

import hashlib
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from pipelines.annotators import AnnotatorNotInstalledError, is_annotator_module
from pipelines.catalog import ModelEntry
from pipelines.controlnets import ControlNetFile, ControlNetLibrary
from pipelines.errors import InvalidRequestError
from pipelines.families import family_label
from pipelines.images import decode_base64_image, decode_image
from pipelines.ipadapters import ImageEncoderFile, IpAdapterFile
from pipelines.preprocessors import (
    IP_ADAPTER_ALIASES,
    Preprocessor,
    is_ip_adapter_module,
    preprocessor,
    rgb_like_extension,
)
from pipelines.schemas import ControlNetUnit

# The names a job's ControlNet files are stored under (beside img2img's inputs): a unit's image as sent, and the
# map the ControlNet saw (the preprocessor's, fitted to the job's size).
CONTROL_IMAGE = "controlnet.{index}.image"
CONTROL_MAP = "controlnet.{index}.map"


@dataclass(frozen=True, kw_only=True)
class UnitPlan:
    """What every unit has, resolved: its settings as the engine runs them and as the infotext says them."""

    model_title: str  # A1111's `name [hash8]`
    module: str
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

    def infotext(self) -> str:
        """The value of `ControlNet N:` as the extension writes it (its reader splits it back on ', ')."""
        fields = {"Module": self.module, "Model": self.model_title, "Weight": self.weight,
                  "Resize Mode": self.resize_mode, "Processor Res": self.processor_res,
                  "Threshold A": self.threshold_a, "Threshold B": self.threshold_b,
                  "Guidance Start": self.guidance_start, "Guidance End": self.guidance_end,
                  "Pixel Perfect": self.pixel_perfect, "Control Mode": self.control_mode}  # fmt: skip
        # The extension leaves out the sliders a module does not have (-1).
        return ", ".join(f"{key}: {value}" for key, value in fields.items() if value != -1)


@dataclass(frozen=True, kw_only=True)
class ControlPlan(UnitPlan):
    """A ControlNet unit: its model and the control map at the job's size (what the ControlNet sees)."""

    model: ControlNetFile
    image: Image.Image

    def batch_key(self) -> tuple:
        """What must be equal for jobs to share one diffusers call (the maps are per job)."""
        return (str(self.model.path), self.call_settings(), self.control_mode, self.hr_option)


@dataclass(frozen=True, kw_only=True)
class IpAdapterPlan(UnitPlan):
    """An IP-Adapter unit: the adapter, the image encoder its module runs, and the reference images (as sent,
    made RGB; the encoder's processor resizes and crops them)."""

    model: IpAdapterFile
    encoder: ImageEncoderFile
    images: tuple[Image.Image, ...]
    references: str = ""  # a digest of the images' pixels

    def batch_key(self) -> tuple:
        """The reference images are part of it: diffusers' pipelines give every prompt of a call the same image
        features (they repeat what they are given for each), so only jobs with the same references share a call
        (a request's `batch_size` images always do)."""
        return (str(self.model.path), str(self.encoder.path), self.call_settings(), self.hr_option, self.references)


def references_digest(images: list[Image.Image]) -> str:
    digest = hashlib.sha256()
    for image in images:
        digest.update(f"{image.mode}{image.size}".encode())
        digest.update(image.tobytes())
    return digest.hexdigest()[:16]


def control_units(controls: list[UnitPlan]) -> list[int]:
    """The indexes of a job's ControlNet units (IP-Adapter units run apart)."""
    return [index for index, control in enumerate(controls) if isinstance(control, ControlPlan)]


def control_files(controls: list[UnitPlan]) -> set[str]:
    """The model files a job's units load: its ControlNets and its IP-Adapters' image encoders."""
    return {str(control.model.path) if isinstance(control, ControlPlan) else str(control.encoder.path)
            for control in controls}  # fmt: skip


def ip_adapter_units(controls: list[UnitPlan]) -> list[int]:
    return [index for index, control in enumerate(controls) if isinstance(control, IpAdapterPlan)]


def map_files(controls: list[UnitPlan]) -> dict[str, bytes]:
    """The ControlNet units' maps (as the ControlNet sees them) as PNG files, by the names the job stores them
    under (an IP-Adapter unit has no map)."""
    files = {}
    for index, control in enumerate(controls):
        if not isinstance(control, ControlPlan):
            continue
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


def unit_image_name(index: int, position: int = 0) -> str:
    """The name a unit's image is stored under: `controlnet.N.image`, and `controlnet.N.image.K` for an
    IP-Adapter unit's further reference images."""
    name = CONTROL_IMAGE.format(index=index)
    return name if position == 0 else f"{name}.{position}"


def unit_images(unit: ControlNetUnit) -> list[str]:
    """A unit's images as sent (base64): none, one, or (IP-Adapter) several."""
    if unit.image is None:
        return []
    return [unit.image] if isinstance(unit.image, str) else list(unit.image)


def plan_controls(units: list[ControlNetUnit], model: ModelEntry | None, library: ControlNetLibrary | None,
                  width: int, height: int, init_image: Image.Image | None, input_bytes: dict[str, bytes],
                  warnings: list[str]) -> list[UnitPlan]:  # fmt: skip
    """Each unit resolved and its map made; a unit that cannot run is a 4xx naming it. `init_image`: img2img's
    input as the job runs it (resized, or cropped for "Only masked"): the image of a unit without one."""
    if units and library is None:
        raise InvalidRequestError("ControlNet needs the ControlNet folder; none is configured here", field="controlnet")
    plans: list[UnitPlan] = []
    for index, unit in enumerate(units):
        sent = [(input_bytes.get(unit_image_name(index, position)), text)
                for position, text in enumerate(unit_images(unit))]  # fmt: skip
        stored_map = input_bytes.get(CONTROL_MAP.format(index=index))  # a job prepared again: the map made then
        plans.append(
            _plan(unit, f"controlnet[{index}]", model, library, width, height, init_image, sent, warnings, stored_map)
        )
    return plans


def _decode(sent: list[tuple[bytes | None, str]], field: str) -> list[Image.Image]:
    """A unit's images: the bytes the ingress decoded already, else the base64 sent (transparency is composited
    over white later, as the extension does)."""
    images = []
    for position, (raw, text) in enumerate(sent):
        place = f"{field}.image" + (f"[{position}]" if len(sent) > 1 else "")
        images.append(decode_image(raw, field=place, mode=None) if raw is not None
                      else decode_base64_image(text, field=place, mode=None))  # fmt: skip
    return images


def _check_family(entry: ControlNetFile | IpAdapterFile, field: str, model: ModelEntry | None,
                  library: ControlNetLibrary) -> None:  # fmt: skip
    if model is None or entry.family == model.family:
        return
    kind = "IP-Adapter" if isinstance(entry, IpAdapterFile) else "ControlNet"
    fitting = [item.name for item in library.all_models() if item.family == model.family]
    family, wanted = family_label(entry.family), family_label(model.family)
    raise InvalidRequestError(
        f"{field}.model: {kind} '{entry.name}' is for {family} models and model '{model.name}' is {wanted}; "
        f"installed {wanted} ControlNets and IP-Adapters: {', '.join(map(repr, fitting)) or 'none'}",
        field=f"{field}.model",
    )


def _plan(unit: ControlNetUnit, field: str, model: ModelEntry | None, library: ControlNetLibrary, width: int,
          height: int, init_image: Image.Image | None, sent: list[tuple[bytes | None, str]],
          warnings: list[str], stored_map: bytes | None = None) -> UnitPlan:  # fmt: skip
    entry = library.resolve(unit.model, field=f"{field}.model")
    _check_family(entry, field, model, library)
    ip_module = is_ip_adapter_module(unit.module)
    if isinstance(entry, IpAdapterFile) != ip_module:
        wanted = ("an IP-Adapter model (its module runs the image encoder)" if ip_module
                  else "a ControlNet model (an IP-Adapter takes an ip-adapter_clip_* module)")  # fmt: skip
        raise InvalidRequestError(f"{field}.module: module '{unit.module}' needs {wanted}; '{entry.name}' is "
                                  f"{'an IP-Adapter' if isinstance(entry, IpAdapterFile) else 'a ControlNet'}",
                                  field=f"{field}.module")  # fmt: skip
    applies = unit.guidance_start < unit.guidance_end
    if not applies:
        warnings.append(f"{field}: guidance_start {unit.guidance_start:g} is not before guidance_end "
                        f"{unit.guidance_end:g}: the unit applies to no step")  # fmt: skip
    common = dict(model_title=library.title(entry), weight=unit.weight, guidance_start=unit.guidance_start,
                  guidance_end=unit.guidance_end, control_mode=unit.control_mode, resize_mode=unit.resize_mode,
                  pixel_perfect=unit.pixel_perfect, hr_option=unit.hr_option, applies=applies)  # fmt: skip
    images = _decode(sent, field)
    if not images and init_image is not None:
        images = [init_image]  # img2img: the input as the job runs it, as the extension
    if not images:
        raise InvalidRequestError(f"{field}.image: a txt2img unit needs an image (a reference image for an "
                                  "IP-Adapter, or a map with module 'none')", field=f"{field}.image")  # fmt: skip
    if isinstance(entry, IpAdapterFile):
        encoder = library.ip_adapters.encoder_for(entry, unit.module, field=f"{field}.module")
        references = tuple(map(rgb_like_extension, images))
        return IpAdapterPlan(model=entry, encoder=encoder, images=references, references=references_digest(references),
                             module=IP_ADAPTER_ALIASES.get(unit.module, unit.module), processor_res=-1,
                             threshold_a=-1, threshold_b=-1, **common)  # fmt: skip
    if len(images) > 1:
        raise InvalidRequestError(f"{field}.image: several images are for IP-Adapter units; a ControlNet takes "
                                  "one control image", field=f"{field}.image")  # fmt: skip
    return _control_plan(
        unit, field, entry, images[0], width, height, init_image is images[0], common, library, stored_map
    )


def _control_plan(unit: ControlNetUnit, field: str, entry: ControlNetFile, image: Image.Image, width: int,
                  height: int, from_init_image: bool, common: dict, library: ControlNetLibrary,
                  stored_map: bytes | None = None) -> ControlPlan:  # fmt: skip
    try:
        module = library.annotators.preprocessor(unit.module) if is_annotator_module(unit.module) \
            else preprocessor(unit.module)  # fmt: skip
    except (InvalidRequestError, AnnotatorNotInstalledError) as error:  # named as the unit's field, same status
        raise type(error)(f"{field}: {error.message}", field=f"{field}.module") from None
    resize_mode = "Just Resize" if from_init_image else unit.resize_mode  # the init image has the job's size
    resolution = unit.processor_res
    if unit.pixel_perfect:
        resolution = max(64, min(2048, pixel_perfect_resolution(image, width, height, unit.resize_mode)))
    slider_values = slider_values_used(module, resolution, unit.threshold_a, unit.threshold_b)
    if stored_map is not None:  # made when the job was submitted, fitted to its size already
        control_map = decode_image(stored_map, field=f"{field}.image").convert("RGB")
    else:
        try:
            detected = module.run(image, resolution, unit.threshold_a, unit.threshold_b)
        except InvalidRequestError as error:  # a slider out of its range: named as the unit's field
            raise InvalidRequestError(f"{field}.{error.message}", field=f"{field}.{error.field}") from None
        control_map = fit_map(detected.convert("RGB"), width, height, resize_mode)
    return ControlPlan(
        model=entry, module=module.name, image=control_map,
        processor_res=slider_values[0], threshold_a=slider_values[1], threshold_b=slider_values[2], **common,
    )  # fmt: skip
