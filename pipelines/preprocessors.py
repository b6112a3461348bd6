"""ControlNet preprocessors ("annotators") that need no model weights, computed as A1111's ControlNet extension
(Mikubill/sd-webui-controlnet) computes them, so a client gets the same detected map here as from A1111.

Each module works as the extension's does: the image is made 3-channel as its `HWC3` makes it (gray repeated,
transparency composited over white), then - except for `none`, `invert` and `tile_resample`, which keep the
image's size - resized so that its short side is `processor_res` (bicubic when enlarging, area when shrinking),
edge-padded to a multiple of 64, detected, and cropped back: a map has the resized image's size, not a multiple
of 64. `blur_gaussian` crops before it blurs, as the extension does.

Slider names, defaults and ranges are those of the extension's `preprocessor_sliders_config`; a unit that
leaves `processor_res`, `threshold_a` or `threshold_b` negative or None gets the default, as there. Sliders
without a step there are stepped by 1, as its UI steps them. cv2 is imported where a map is computed: the
ingress lists modules and checks names with this module.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from pipelines.errors import InvalidRequestError

RESOLUTION = "Preprocessor Resolution"  # the extension tells the resolution slider from the others by this name
MAX_MAP_PIXELS = 4096 * 4096  # a resized map above this (an extreme aspect ratio at a high resolution) is refused


@dataclass(frozen=True)
class Slider:
    """One slider as the extension's `module_detail` reports it."""

    name: str
    value: float
    min: float
    max: float
    step: float = 1

    def as_json(self) -> dict:
        return {"name": self.name, "value": self.value, "min": self.min, "max": self.max, "step": self.step}


def _hwc3(image: Image.Image) -> np.ndarray:
    """The image as 8-bit RGB, as the extension's HWC3 makes it from the decoded array: a gray image repeated to
    3 channels, an image with transparency composited over white (its colour times alpha plus white times the
    rest, truncated to 8 bits). Palette and other modes are converted by Pillow first (the extension would read
    a palette image's indices as gray)."""
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = np.asarray(image.convert("RGBA"))
        alpha = rgba[:, :, 3:4].astype(np.float32) / 255.0
        composite = rgba[:, :, :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
        return composite.clip(0, 255).astype(np.uint8)
    return np.asarray(image.convert("RGB"))


def rgb_like_extension(image: Image.Image) -> Image.Image:
    """The image as the extension's modules read it (`_hwc3`), as a Pillow image."""
    return Image.fromarray(_hwc3(image))


def resize_with_pad(img: np.ndarray, resolution: int) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """The extension's `resize_image_with_pad`: short side to `resolution` (each side rounded half to even),
    then edge padding to multiples of 64. Returns the padded image and the crop back to the resized size."""
    import cv2

    height, width = img.shape[:2]
    k = float(resolution) / float(min(height, width))
    target_h, target_w = round(height * k), round(width * k)
    if target_h * target_w > MAX_MAP_PIXELS:
        raise InvalidRequestError(
            f"processor_res {resolution} would make a {target_w}x{target_h} map from this {width}x{height} image; "
            f"at most {MAX_MAP_PIXELS} pixels are allowed",
            field="processor_res",
        )
    resized = cv2.resize(img, (target_w, target_h), interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
    padded = np.pad(resized, [[0, -target_h % 64], [0, -target_w % 64], [0, 0]], mode="edge")
    return padded, lambda x: x[:target_h, :target_w]


def _canny(img: np.ndarray, res: int, low: float, high: float) -> np.ndarray:
    import cv2

    padded, crop = resize_with_pad(img, res)
    return crop(cv2.Canny(padded, int(low), int(high)))  # on all 3 channels: the strongest gradient wins


def _threshold(img: np.ndarray, res: int, level: float, _: float) -> np.ndarray:
    padded, crop = resize_with_pad(img, res)
    return crop(np.where(padded.min(axis=2) > level, 255, 0).astype(np.uint8))


def _scribble_xdog(img: np.ndarray, res: int, level: float, _: float) -> np.ndarray:
    """Difference of Gaussians (sigma 0.5 and 5): white where the darker side of an edge is strong enough."""
    import cv2

    padded, crop = resize_with_pad(img, res)
    x = padded.astype(np.float32)
    difference = cv2.GaussianBlur(x, (0, 0), 5.0) - cv2.GaussianBlur(x, (0, 0), 0.5)
    dog = (255 - difference.min(axis=2)).clip(0, 255).astype(np.uint8)
    # The extension doubles `255 - dog` in uint8, which wraps past 255: strengths of 128 and above wrap around.
    strength = (2 * (255 - dog.astype(np.int32))) % 256
    return crop(np.where(strength > level, 255, 0).astype(np.uint8))


def _lineart_standard(img: np.ndarray, res: int, _a: float, _b: float) -> np.ndarray:
    """How much darker each pixel is than its Gaussian (sigma 6) surround, scaled so that the median line
    pixel (of those above 8) maps to 127: white lines on black from dark lines on a light background."""
    import cv2

    padded, crop = resize_with_pad(img, res)
    x = padded.astype(np.float32)
    intensity = (cv2.GaussianBlur(x, (0, 0), 6.0) - x).min(axis=2).clip(0, 255)
    lines = intensity[intensity > 8]
    intensity /= max(16, np.median(lines)) if lines.size else 16  # the median of the padded map, as there
    intensity *= 127
    return crop(intensity.clip(0, 255).astype(np.uint8))


def _blur_gaussian(img: np.ndarray, res: int, sigma: float, _: float) -> np.ndarray:
    import cv2

    padded, crop = resize_with_pad(img, res)
    return cv2.GaussianBlur(np.ascontiguousarray(crop(padded)), (0, 0), float(sigma))


def _tile_resample(img: np.ndarray, _: int, rate: float, __: float) -> np.ndarray:
    """Down-sampling by `rate` (area interpolation); below 1.1 the image is used as it is."""
    import cv2

    if rate < 1.1:
        return img
    height, width = img.shape[:2]
    size = (max(1, int(width / rate)), max(1, int(height / rate)))
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA)


@dataclass(frozen=True)
class Preprocessor:
    """A model-free ControlNet preprocessor: its internal name, its sliders (in the extension's order: the
    resolution slider first where it has one, then those of `threshold_a` and `threshold_b`), and the map."""

    name: str
    sliders: tuple[Slider, ...]
    detect: Callable[[np.ndarray, int, float, float], np.ndarray] = field(repr=False, compare=False)

    @property
    def resolution(self) -> Slider | None:
        return next((slider for slider in self.sliders if slider.name == RESOLUTION), None)

    @property
    def thresholds(self) -> tuple[Slider, ...]:
        return tuple(slider for slider in self.sliders if slider.name != RESOLUTION)

    def run(
        self, image: Image.Image, processor_res: int = -1, threshold_a: float = -1, threshold_b: float = -1
    ) -> Image.Image:
        """The detected map of `image`, always 8-bit RGB. A slider value outside its range is an
        InvalidRequestError naming the field; values of sliders the module does not have are ignored, as the
        extension ignores them."""
        if image.width == 0 or image.height == 0:
            raise InvalidRequestError("the image is empty", field="image")
        res = int(_slider_value(self.name, self.resolution, processor_res, "processor_res"))
        thresholds = (*self.thresholds, None, None)
        a = _slider_value(self.name, thresholds[0], threshold_a, "threshold_a")
        b = _slider_value(self.name, thresholds[1], threshold_b, "threshold_b")
        result = self.detect(_hwc3(image), res, a, b)
        if result.ndim == 2:
            result = np.repeat(result[:, :, None], 3, axis=2)
        return Image.fromarray(np.ascontiguousarray(result))  # (H, W, 3) uint8: mode "RGB"


def _slider_value(module: str, slider: Slider | None, given: float | None, name: str) -> float:
    if slider is None:
        return -1.0
    if given is None or given < 0:  # the extension's "use the default" (NaN is not below 0: it fails the range)
        return float(slider.value)
    if not slider.min <= given <= slider.max:
        raise InvalidRequestError(
            f"{name} must be between {slider.min:g} and {slider.max:g} for the {module} preprocessor "
            f"({slider.name}); got {given!r}",
            field=name,
        )
    return float(given)


_RES = Slider(RESOLUTION, 512, 64, 2048)


def _identity(img: np.ndarray, _: int, __: float, ___: float) -> np.ndarray:
    return img


# The extension's order of modules (its `cn_preprocessor_modules`), internal names.
PREPROCESSORS: dict[str, Preprocessor] = {
    p.name: p
    for p in (
        Preprocessor("none", (), _identity),
        Preprocessor(
            "canny",
            (_RES, Slider("Canny Low Threshold", 100, 1, 255), Slider("Canny High Threshold", 200, 1, 255)),
            _canny,
        ),
        Preprocessor("scribble_xdog", (_RES, Slider("XDoG Threshold", 32, 1, 64)), _scribble_xdog),
        Preprocessor("threshold", (_RES, Slider("Binarization Threshold", 127, 0, 255)), _threshold),
        Preprocessor("lineart_standard", (_RES,), _lineart_standard),  # the UI's default resolution slider
        Preprocessor("tile_resample", (Slider("Down Sampling Rate", 1.0, 1.0, 8.0, 0.01),), _tile_resample),
        Preprocessor("invert", (), lambda img, _res, _a, _b: 255 - img),
        Preprocessor("blur_gaussian", (_RES, Slider("Sigma", 9.0, 0.01, 64.0)), _blur_gaussian),
    )
}

# The extension's display names (its `preprocessor_aliases`) -> internal name.
ALIASES: dict[str, str] = {
    "invert (from white bg & black line)": "invert",
    "lineart_standard (from white bg & black line)": "lineart_standard",
}
_DISPLAY_NAMES = {internal: alias for alias, internal in ALIASES.items()}

# The extension's IP-Adapter preprocessors -> the image encoder each runs (None: the one that fits the adapter).
IP_ADAPTER_MODULES: dict[str, str | None] = {
    "ip-adapter_clip_sd15": "clip_h",
    "ip-adapter_clip_sdxl": "clip_g",
    "ip-adapter_clip_sdxl_plus_vith": "clip_h",
    "ip-adapter-auto": None,
}
IP_ADAPTER_ALIASES = {"ip-adapter_clip_h": "ip-adapter_clip_sd15", "ip-adapter_clip_g": "ip-adapter_clip_sdxl"}


def is_ip_adapter_module(name: str) -> bool:
    return IP_ADAPTER_ALIASES.get(name, name) in IP_ADAPTER_MODULES


def preprocessor(name: str) -> Preprocessor:
    """The preprocessor by internal or display name. Names are case-sensitive, as in the extension."""
    found = PREPROCESSORS.get(ALIASES.get(name, name))
    if found is None and is_ip_adapter_module(name):
        raise InvalidRequestError(f"module {name!r} runs an IP-Adapter's image encoder (on the generator, with the "
                                  "job); it makes no map", field="module")  # fmt: skip
    if found is None:
        available = ", ".join([*PREPROCESSORS, *(repr(alias) for alias in ALIASES)])
        raise InvalidRequestError(f"unknown ControlNet module {name!r}; available: {available}", field="module")
    return found


def module_detail(alias_names: bool = False, annotators: list[str] | None = None) -> dict:
    """`GET /controlnet/module_list`'s `module_detail`: {module: {"model_free", "sliders"}}. `model_free` is
    the extension's "needs no ControlNet model" (only the reference and revision modules): False for all of
    these. A module without a resolution slider but with others reports None in its place (tile_resample), so
    that the sliders stay in the positions of processor_res, threshold_a and threshold_b."""
    detail = {}
    for name, p in PREPROCESSORS.items():
        placeholder = [None] if p.resolution is None and p.thresholds else []
        key = _DISPLAY_NAMES.get(name, name) if alias_names else name
        detail[key] = {"model_free": False, "sliders": placeholder + [slider.as_json() for slider in p.sliders]}
    for name in annotators or []:  # the installed weight-needing ones (pipelines/annotators.py): a resolution
        detail["depth_midas" if alias_names and name == "depth" else name] = {
            "model_free": False,
            "sliders": [_RES.as_json()],
        }
    labels = {internal: alias for alias, internal in IP_ADAPTER_ALIASES.items()}
    for name in IP_ADAPTER_MODULES:  # the image encoder runs with the job: no sliders
        detail[labels.get(name, name) if alias_names else name] = {"model_free": False, "sliders": []}
    return detail
