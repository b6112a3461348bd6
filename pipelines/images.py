"""Decoding the images users send (base64, with or without a data: URL prefix)."""

import base64
import binascii
import io
import re
import warnings

import numpy as np
from PIL import Image, ImageOps

from pipelines.errors import BadImageError
from pipelines.limits import LIMITS

MAX_INPUT_PIXELS = LIMITS.max_input_image_pixels
# The formats this service writes are the ones it reads: each decoder is one more parser of hostile bytes, and
# Pillow would otherwise try every plugin it has (TIFF, PSD, EPS through Ghostscript, ...) on an upload.
INPUT_FORMATS = ("PNG", "JPEG", "WEBP", "AVIF", "GIF")
EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "AVIF": "avif", "GIF": "gif"}
ACCEPTED = "PNG, JPEG, WebP, AVIF or GIF"
# A data: URL's header ("data:image/png;base64,") is short; only its first characters are searched, so a
# megabyte of ";a=a" parameters costs nothing.
_DATA_URL_HEAD = 256
_DATA_URL = re.compile(r"^data:[\w/+.-]*(;[\w=.-]+)*;base64,", re.IGNORECASE)
_SIXTEEN_BIT_GRAY = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def decode_base64_bytes(data: str, field: str = "image") -> bytes:
    """The bytes of base64 text, with or without a data: URL prefix; invalid base64 is a BadImageError."""
    text = data.strip()
    if prefix := _DATA_URL.match(text[:_DATA_URL_HEAD]):
        text = text[prefix.end() :]
    text = re.sub(r"\s+", "", text)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise BadImageError(f"'{field}' is not valid base64: {error}", field=field) from error


def open_image(raw: bytes, field: str = "image") -> Image.Image:
    """The image in `raw`, opened (not decoded yet) if it is one of the INPUT_FORMATS; else a BadImageError."""
    try:
        return Image.open(io.BytesIO(raw), formats=INPUT_FORMATS)
    except Image.UnidentifiedImageError as error:
        raise BadImageError(f"'{field}' is not a {ACCEPTED} image", field=field) from error
    except Exception as error:  # PIL raises many types for broken files
        raise BadImageError(f"'{field}' is not a readable image ({type(error).__name__})", field=field) from error


def image_extension(raw: bytes) -> str:
    """The file extension of an accepted image's bytes ("bin" for anything else), for storing it as sent."""
    try:
        with open_image(raw) as image:
            return EXTENSIONS.get(image.format or "", "bin")
    except BadImageError:
        return "bin"


def decode_base64_image(
    data: str, field: str = "image", max_pixels: int = MAX_INPUT_PIXELS, mode: str | None = "RGB"
) -> Image.Image:
    """An image (in `mode`; None: as stored) from base64 text, turned upright as its EXIF orientation says.
    Anything that is not a complete, reasonably sized image in an accepted format is a BadImageError naming
    the field."""
    return decode_image(decode_base64_bytes(data, field), field, max_pixels, mode)


def decode_image(
    raw: bytes, field: str = "image", max_pixels: int = MAX_INPUT_PIXELS, mode: str | None = "RGB"
) -> Image.Image:
    """As `decode_base64_image`, from the file's bytes (for a caller that has decoded the base64 already)."""
    image = open_image(raw, field)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            width, height = image.size
            if width * height > max_pixels:
                raise BadImageError(
                    f"'{field}' is {width}x{height}; at most {max_pixels} pixels are accepted", field=field
                )
            image.load()
            image = ImageOps.exif_transpose(image)
    except BadImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise BadImageError(f"'{field}' is too large to decode safely: {error}", field=field) from error
    except Exception as error:  # PIL raises many types for broken files
        raise BadImageError(f"'{field}' is not a readable image ({error})", field=field) from error
    if image.mode in _SIXTEEN_BIT_GRAY:
        image = eight_bit_gray(image)
    if mode is None:
        return image if image.mode in ("RGBA", "L", "RGB") else image.convert("RGBA")
    return image.convert(mode)


def eight_bit_gray(image: Image.Image) -> Image.Image:
    """A 16-bit grayscale image (a depth map, a 16-bit PNG mask) as 8-bit "L", scaled. Pillow's own convert
    clips every value above 255 to white, which turns a whole 16-bit mask into "repaint everything"."""
    values = np.asarray(image, dtype=np.uint32)
    return Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8))  # 2-D uint8: mode "L"


def encode_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
