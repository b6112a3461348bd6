"""AUTOMATIC1111 "infotext": the generation parameters as text, written into every image.

Format (A1111 v1.10): the prompt, then `Negative prompt: ...` when there is one, then one line of
`Key: value` pairs joined by ", ". Values containing `,`, `:` or a newline are JSON-quoted. Keys come in
A1111's order (`Steps` first); extra keys follow, then `Version` and `User`.

Where it is stored, as A1111 does it:
- PNG: a `parameters` text chunk (tEXt, or iTXt when the text is not Latin-1);
- JPEG, WebP, AVIF: EXIF UserComment, `UNICODE\\0` + UTF-16BE, in a big-endian EXIF block;
- GIF: the comment extension (UTF-8).
"""

import io
import json
import re
import struct
from collections.abc import Mapping
from typing import Any

import piexif
import piexif.helper
from PIL import Image, PngImagePlugin

from pipelines.errors import BadImageError

# A1111's generation_params order; `extra` keys come after these, then the trailer keys.
A1111_KEY_ORDER = [
    "Steps", "Sampler", "Schedule type", "CFG scale", "Image CFG scale", "Seed", "Face restoration", "Size",
    "Model hash", "Model", "FP8 weight", "Cache FP16 weight for LoRA", "VAE hash", "VAE", "Variation seed",
    "Variation seed strength", "Seed resize from", "Denoising strength", "Conditional mask weight",
    "Clip skip", "ENSD", "Token merging ratio", "Token merging ratio hr", "Init image hash", "RNG", "Tiling",
]  # fmt: skip
TRAILER_KEYS = ["Version", "User"]

_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_IMAGE_SIZE = re.compile(r"^(\d+)x(\d+)$")

FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP", "avif": "AVIF", "gif": "GIF"}
MIME_TYPES = {
    "png": "image/png",
    "jpg": "image/jpeg",
    "webp": "image/webp",
    "avif": "image/avif",
    "gif": "image/gif",
}


def quote(value: str) -> str:
    """A1111's quoting: JSON-quote values that contain a comma, a colon or a newline."""
    if "," not in value and "\n" not in value and ":" not in value:
        return value
    return json.dumps(value, ensure_ascii=False)


def build_infotext(prompt: str, negative_prompt: str, params: Mapping[str, Any]) -> str:
    """The infotext for one image. `params` maps keys to values; None values are left out.

    Known keys take A1111's position whatever their order in `params`; other keys keep their order after
    them; `Version` and `User` come last.
    """
    known = [key for key in A1111_KEY_ORDER if key in params]
    extra = [key for key in params if key not in A1111_KEY_ORDER and key not in TRAILER_KEYS]
    trailer = [key for key in TRAILER_KEYS if key in params]
    items = []
    for key in known + extra + trailer:
        value = params[key]
        if value is None:
            continue
        text = str(value)
        items.append(key if text == key else f"{key}: {quote(text)}")
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{', '.join(items)}".strip()


def parse_infotext(text: str) -> dict[str, str]:
    """Parses an infotext into a dict as A1111's `parse_generation_parameters` does.

    Returns `Prompt`, `Negative prompt` and every `Key: value` pair (strings; JSON-quoted values unquoted;
    `WxH` values also split into `Key-1`/`Key-2`), with A1111's defaults for missing `Clip skip`,
    `Schedule type`, `Hires ...` and `RNG` keys.
    """
    result: dict[str, str] = {}
    prompt, negative_prompt = "", ""
    reading_negative = False
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:  # a parameter line has at least three pairs
        lines.append(last)
        last = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            reading_negative = True
            line = line[16:].strip()
        if reading_negative:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    result["Prompt"] = prompt
    result["Negative prompt"] = negative_prompt
    for key, value in _PARAM.findall(last):
        try:
            if value and value[0] == '"' and value[-1] == '"':
                value = json.loads(value)
        except ValueError:
            pass
        if size := _IMAGE_SIZE.match(value):
            result[f"{key}-1"] = size.group(1)
            result[f"{key}-2"] = size.group(2)
        else:
            result[key] = value
    defaults = {
        "Clip skip": "1",
        "Schedule type": "Automatic",
        "Hires resize-1": "0",
        "Hires resize-2": "0",
        "Hires sampler": "Use same sampler",
        "Hires schedule type": "Use same scheduler",
        "Hires checkpoint": "Use same checkpoint",
        "RNG": "GPU",
    }
    for key, value in defaults.items():
        result.setdefault(key, value)
    if "Hires upscale" in result or "Hires upscaler" in result:
        result.setdefault("Hires prompt", "")
        result.setdefault("Hires negative prompt", "")
    return result


def _exif_user_comment(infotext: str) -> bytes:
    comment = piexif.helper.UserComment.dump(infotext, encoding="unicode")
    return piexif.dump({"Exif": {piexif.ExifIFD.UserComment: comment}})


def encode_image(image: Image.Image, file_type: str, infotext: str | None, quality: int = 85) -> bytes:
    """The image as file bytes in `file_type` (png, jpg, webp, avif, gif), with the infotext embedded."""
    if file_type not in FORMATS:
        raise ValueError(f"unknown file type {file_type!r}; valid: {', '.join(FORMATS)}")
    buffer = io.BytesIO()
    if file_type == "png":
        info = PngImagePlugin.PngInfo()
        if infotext:
            info.add_text("parameters", infotext)  # tEXt, or iTXt (UTF-8) for non-Latin-1 text
        image.save(buffer, format="PNG", pnginfo=info)
    elif file_type == "gif":
        extra = {"comment": infotext.encode("utf-8")} if infotext else {}
        image.convert("RGB").save(buffer, format="GIF", **extra)
    else:
        extra = {"exif": _exif_user_comment(infotext)} if infotext else {}
        image.convert("RGB").save(buffer, format=FORMATS[file_type], quality=quality, **extra)
    return buffer.getvalue()


def read_infotext(image: Image.Image | bytes) -> str | None:
    """The infotext stored in an image (any of the five formats), as A1111 reads it; None if there is none."""
    if isinstance(image, bytes | bytearray):
        try:
            image = Image.open(io.BytesIO(image))
        except Exception as error:  # PIL raises many types for broken files
            raise BadImageError(f"not a readable image ({type(error).__name__})") from error
    info = dict(image.info)
    text = info.get("parameters")
    if "exif" in info:
        try:
            exif = piexif.load(info["exif"])
            comment = exif.get("Exif", {}).get(piexif.ExifIFD.UserComment, b"")
            try:
                decoded = piexif.helper.UserComment.load(comment)
            except ValueError:
                decoded = comment.decode("utf8", errors="ignore")
            text = decoded or text
        except (OSError, ValueError, struct.error):
            pass
    elif "comment" in info:
        comment = info["comment"]
        text = comment.decode("utf8", errors="replace") if isinstance(comment, bytes) else str(comment)
    return text or None
