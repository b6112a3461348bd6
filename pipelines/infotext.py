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

from pipelines.images import open_image

# A1111's generation_params order; `extra` keys come after these, then the trailer keys.
A1111_KEY_ORDER = [  # A1111's order, with Forge's "Distilled CFG Scale" (FLUX.1) where Forge writes it
    "Steps", "Sampler", "Schedule type", "CFG scale", "Distilled CFG Scale", "Image CFG scale", "Seed",
    "Face restoration", "Size",
    "Model hash", "Model", "FP8 weight", "Cache FP16 weight for LoRA", "VAE hash", "VAE", "Variation seed",
    "Variation seed strength", "Seed resize from", "Denoising strength", "Conditional mask weight",
    "Clip skip", "ENSD", "Token merging ratio", "Token merging ratio hr", "Init image hash", "RNG", "Tiling",
]  # fmt: skip
TRAILER_KEYS = ["Version", "User"]

# A1111 reads the pairs with `\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)` and `findall`, which is
# quadratic or worse in the line (each start inside a long run of key characters re-scans the run).
# `_parameter_pairs` finds the same pairs in one pass with these pieces, none of which can backtrack.
_KEY_RUN = re.compile(r"[\w \-/]+")
_WORD = re.compile(r"\w")
_SPACES = re.compile(r"\s*")
_QUOTED_BODY = re.compile(r'(?:[^\\"]++|\\.)*+')  # up to an unescaped '"' (or the end)
_IMAGE_SIZE = re.compile(r"^(\d+)x(\d+)$")

FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP", "avif": "AVIF", "gif": "GIF"}
EXIF_IFD = 0x8769  # the Exif sub-IFD, where UserComment lives
USER_COMMENT_TAG = 0x9286
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


def _parameter_pairs(line: str) -> list[tuple[str, str]]:
    """The (key, value) pairs A1111's regex finds in a line without newlines, in time linear in the line.

    A match is a key (a run of word characters, spaces, '-' and '/' that starts with a word character, is at
    least two long and ends right before ':'; leading whitespace is skipped), ':', whitespace, then a value:
    a quoted one (a non-empty body of escapes and characters other than '\\' and '"', closed by '"' that is
    followed by ',' or the end) or else everything up to the next ','. The search goes on after the match.
    A run of key characters that is not followed by ':' holds no key anywhere in it, so it is skipped whole."""
    pairs: list[tuple[str, str]] = []
    end = len(line)
    position = 0
    while (run := _KEY_RUN.search(line, position)) is not None:
        run_start, colon = run.span()
        key_start = _WORD.search(line, run_start, colon - 1) if colon < end and line[colon] == ":" else None
        if key_start is None:
            position = colon  # not a key character: the next run starts after it
            continue
        value_start = _SPACES.match(line, colon + 1).end()
        if line.startswith('"', value_start):
            close = _QUOTED_BODY.match(line, value_start + 1).end()
            if close > value_start + 1 and line.startswith('"', close) and (close + 1 == end or line[close + 1] == ","):
                pairs.append((line[key_start.start() : colon], line[value_start : close + 1]))
                position = close + 2
                continue
        comma = line.find(",", value_start)
        value_end = end if comma < 0 else comma
        pairs.append((line[key_start.start() : colon], line[value_start:value_end]))
        position = value_end + 1
    return pairs


def parse_infotext(text: str) -> dict[str, str]:
    """Parses an infotext into a dict as A1111's `parse_generation_parameters` does.

    Returns `Prompt`, `Negative prompt` and every `Key: value` pair (strings; JSON-quoted values unquoted;
    `WxH` values also split into `Key-1`/`Key-2`), with A1111's defaults for missing `Clip skip`,
    `Schedule type`, `Hires ...` and `RNG` keys.
    """
    result: dict[str, str] = {}
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    reading_negative = False
    *lines, last = text.strip().split("\n")
    pairs = _parameter_pairs(last)
    if len(pairs) < 3:  # a parameter line has at least three pairs
        lines.append(last)
        pairs = []
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            reading_negative = True
            line = line[16:].strip()
        read = negative_lines if reading_negative else prompt_lines
        if read or line:  # A1111 adds a newline before a line only once the text is not empty
            read.append(line)
    result["Prompt"] = "\n".join(prompt_lines)
    result["Negative prompt"] = "\n".join(negative_lines)
    for key, value in pairs:
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
        image = open_image(bytes(image))
    info = dict(image.info)
    text = info.get("parameters")
    if "exif" in info:
        text = _read_exif_user_comment(image) or text
    elif "comment" in info:
        comment = info["comment"]
        text = comment.decode("utf8", errors="replace") if isinstance(comment, bytes) else str(comment)
    return text or None


def _read_exif_user_comment(image: Image.Image) -> str | None:
    """The EXIF UserComment (where A1111 keeps the infotext of JPEG, WebP and AVIF files). Read by Pillow, which
    skips entries that claim more data than the file holds: piexif allocated whatever count a tag declared
    (a 700-byte upload could ask for gigabytes)."""
    try:
        comment = image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT_TAG)
    except (OSError, ValueError, SyntaxError, struct.error, MemoryError):
        return None
    if isinstance(comment, str):
        return comment
    if not isinstance(comment, bytes | bytearray):
        return None
    try:
        return piexif.helper.UserComment.load(bytes(comment))
    except ValueError:
        return bytes(comment).decode("utf8", errors="ignore")
