"""A1111's ControlNet extension payload (`alwayson_scripts.controlnet.args`) as native ControlNet units.

Read leniently, as the extension reads what real clients send: the args are unit objects (webuiapi's
`ControlNetUnit.to_dict()`, the Photoshop/GIMP/Krita plugins, Java and Discord clients); a missing `enabled`
means enabled; the legacy names `input_image` (= `image`), `guidance` (= `guidance_end`) and `lowvram`; integers
for `resize_mode`, `control_mode` and `hr_option`, and the extension's older mode names; numbers as strings;
`"image": ""` means none (img2img then uses the init image); an image as `{"image", "mask"}` or a list (the
first is used; an IP-Adapter unit reads them all). A unit without a model, or disabled, is left out; the rest
go to the native validation, whose errors name `controlnet[N]` of the args.
"""

import contextlib
from typing import Any

from pipelines.a1111_schemas import number_from_text
from pipelines.errors import InvalidRequestError
from pipelines.preprocessors import is_ip_adapter_module, preprocessor

RESIZE_MODES = ["Just Resize", "Crop and Resize", "Resize and Fill"]
LEGACY_RESIZE_MODES = {
    "Scale to Fit (Inner Fit)": "Crop and Resize",
    "Inner Fit (Scale to Fit)": "Crop and Resize",
    "Envelope (Outer Fit)": "Resize and Fill",
    "Outer Fit (Shrink to Fit)": "Resize and Fill",
}
CONTROL_MODES = ["Balanced", "My prompt is more important", "ControlNet is more important"]
HR_OPTIONS = ["Both", "Low res only", "High res only"]
NO_MODEL = ("", "none", "None")
NATIVE_FIELDS = ("model", "module", "weight", "guidance_start", "guidance_end", "processor_res", "threshold_a",
                 "threshold_b", "pixel_perfect")  # fmt: skip


# Unit fields that are read above, or that only the extension's UI and batch modes use.
READ_OR_UI_FIELDS = {"enabled", "image", "input_image", "guidance", "mask", "resize_mode", "control_mode", "hr_option",
                     "save_detected_map", "low_vram", "lowvram", "input_mode", "batch_images", "is_ui", "output_dir",
                     "loopback", "guessmode", "use_preview_as_input", "generated_image", "batch_image_dir",
                     "batch_mask_dir", "batch_input_gallery", "batch_mask_gallery", "animatediff_batch"}  # fmt: skip


def _fit_to_sliders(unit: dict, index: int, warnings: list[str]) -> None:
    """As A1111 clients count on: a negative `processor_res` means the default, and thresholds beyond the
    module's sliders are brought into range (webuiapi sends 64 whatever the module), with a warning."""
    if isinstance(unit.get("processor_res"), int | float) and unit["processor_res"] < 0:
        unit["processor_res"] = -1
    try:
        module = preprocessor(unit.get("module", "none"))
    except InvalidRequestError:
        return  # the native validation names it
    for name, slider in zip(("threshold_a", "threshold_b"), (*module.thresholds, None, None), strict=False):
        value = unit.get(name)
        if slider is None or not isinstance(value, int | float) or value < 0:
            continue
        fitted = min(max(value, slider.min), slider.max)
        if fitted != value:
            unit[name] = fitted
            warnings.append(f"ControlNet unit {index}: {name} {value:g} is outside {slider.name}'s "
                            f"{slider.min:g}-{slider.max:g}; {fitted:g} was used")  # fmt: skip


def controlnet_args(scripts: dict[str, Any] | None) -> tuple[Any, dict[str, Any]]:
    """(the ControlNet script's args, None when there is none; the other always-on scripts)."""
    others = dict(scripts or {})
    for name in list(others):
        if name.lower() == "controlnet":
            script = others.pop(name)
            return (script.get("args") if isinstance(script, dict) else script), others
    return None, others


def native_units(args: Any, warnings: list[str]) -> tuple[list[dict], list[bool]]:
    """The enabled units as native `controlnet` entries, and for each whether its map is answered after the
    images (the extension's `save_detected_map`, on by default)."""
    if not isinstance(args, list):
        raise InvalidRequestError("alwayson_scripts.controlnet.args: a list of units, not "
                                  f"{type(args).__name__}", field="alwayson_scripts")  # fmt: skip
    units, save_maps = [], []
    for index, arg in enumerate(args):
        if not isinstance(arg, dict):
            raise InvalidRequestError(f"alwayson_scripts.controlnet.args[{index}]: a unit is an object, not "
                                      f"{type(arg).__name__}", field="alwayson_scripts")  # fmt: skip
        if not _flag(arg.get("enabled", True)):
            continue
        model = arg.get("model")
        if not isinstance(model, str) or model.strip() in NO_MODEL:
            warnings.append(f"ControlNet unit {index} has no model: left out")
            continue
        units.append(_unit(arg, index, warnings))
        save_maps.append(_flag(arg.get("save_detected_map", True)))
    return units, save_maps


def _unit(arg: dict, index: int, warnings: list[str]) -> dict:
    unit = {name: arg[name] for name in NATIVE_FIELDS if arg.get(name) is not None}
    unknown = sorted(name for name in arg if name not in NATIVE_FIELDS and name not in READ_OR_UI_FIELDS)
    if unknown:
        warnings.append(f"ControlNet unit {index}: field(s) not used here: {', '.join(map(repr, unknown[:10]))}")
    if _image(arg.get("mask")) or (isinstance(arg.get("image"), dict) and _image(arg["image"].get("mask"))):
        warnings.append(f"ControlNet unit {index}: its mask is not used here (the whole image is the control)")
    _fit_to_sliders(unit, index, warnings)
    if "guidance_end" not in unit and arg.get("guidance") is not None:  # the extension's legacy name
        unit["guidance_end"] = arg["guidance"]
    for name in ("weight", "guidance_start", "guidance_end", "processor_res", "threshold_a", "threshold_b"):
        if name in unit:
            with contextlib.suppress(ValueError):  # else left for the native validation to name
                unit[name] = number_from_text(unit[name])
    if isinstance(unit.get("pixel_perfect"), str):
        unit["pixel_perfect"] = _flag(unit["pixel_perfect"])
    sent = arg.get("image", arg.get("input_image"))
    if isinstance(sent, list) and len(sent) > 1 and is_ip_adapter_module(str(unit.get("module", ""))):
        references = [found for item in sent if (found := _image(item))]  # an IP-Adapter reads them together
        if references:
            unit["image"] = references
    elif image := _image(sent):
        unit["image"] = image
    for name, choices, legacy in (("resize_mode", RESIZE_MODES, LEGACY_RESIZE_MODES),
                                  ("control_mode", CONTROL_MODES, {}), ("hr_option", HR_OPTIONS, {})):  # fmt: skip
        value = arg.get(name)
        if value is None:
            continue
        value = number_from_text(value) if isinstance(value, str) and value.strip().isdigit() else value
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(choices):
            value = choices[value]
        unit[name] = legacy.get(value, value)
    return unit


def _image(value: Any) -> str | None:
    """The unit's image as base64 text: a string, `{"image": ...}` (its mask is not used), or a list's first."""
    if isinstance(value, list):
        value = value[0] if value else None
    if isinstance(value, dict):
        value = value.get("image")
    return value if isinstance(value, str) and value.strip() else None


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in ("false", "0", "no", "off", "")
    return bool(value)
