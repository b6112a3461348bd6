"""A1111's ControlNet extension payload (`alwayson_scripts.controlnet.args`) as native ControlNet units.

Read leniently, as the extension reads what real clients send: the args are unit objects (webuiapi's
`ControlNetUnit.to_dict()`, the Photoshop/GIMP/Krita plugins, Java and Discord clients); a missing `enabled`
means enabled; the legacy names `input_image` (= `image`), `guidance` (= `guidance_end`) and `lowvram`; integers
for `resize_mode`, `control_mode` and `hr_option`, and the extension's older mode names; numbers as strings;
`"image": ""` means none (img2img then uses the init image); an image as `{"image", "mask"}` or a list (the
first is used). A unit without a model, or disabled, is left out; the rest go to the native validation, whose
errors name `controlnet[N]` of the args.
"""

import contextlib
from typing import Any

from pipelines.a1111_schemas import number_from_text
from pipelines.errors import InvalidRequestError

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


def controlnet_args(scripts: dict[str, Any] | None) -> tuple[list[Any] | None, dict[str, Any]]:
    """(the ControlNet script's args or None, the other always-on scripts)."""
    others = dict(scripts or {})
    for name in list(others):
        if name.lower() == "controlnet":
            script = others.pop(name)
            args = script.get("args") if isinstance(script, dict) else script
            return (args if isinstance(args, list) else None), others
    return None, others


def native_units(args: list[Any], warnings: list[str]) -> tuple[list[dict], bool]:
    """The enabled units as native `controlnet` entries, and whether their detected maps are to be answered
    (the extension's `save_detected_map`, on unless every unit turns it off)."""
    units, save_maps = [], False
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
        units.append(_unit(arg, index))
        save_maps = save_maps or _flag(arg.get("save_detected_map", True))
    return units, save_maps


def _unit(arg: dict, index: int) -> dict:
    unit = {name: arg[name] for name in NATIVE_FIELDS if arg.get(name) is not None}
    if "guidance_end" not in unit and arg.get("guidance") is not None:  # the extension's legacy name
        unit["guidance_end"] = arg["guidance"]
    for name in ("weight", "guidance_start", "guidance_end", "processor_res", "threshold_a", "threshold_b"):
        if name in unit:
            with contextlib.suppress(ValueError):  # else left for the native validation to name
                unit[name] = number_from_text(unit[name])
    if isinstance(unit.get("pixel_perfect"), str):
        unit["pixel_perfect"] = _flag(unit["pixel_perfect"])
    image = _image(arg.get("image", arg.get("input_image")))
    if image:
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
