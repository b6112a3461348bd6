"""Decoding the images users send (base64, with or without a data: URL prefix)."""

import base64
import binascii
import io
import re
import warnings

from PIL import Image

from pipelines.errors import BadImageError
from pipelines.limits import LIMITS

MAX_INPUT_PIXELS = LIMITS.max_input_image_pixels
_DATA_URL = re.compile(r"^data:[\w/+.-]*(;[\w=.-]+)*;base64,", re.IGNORECASE)


def decode_base64_bytes(data: str, field: str = "image") -> bytes:
    """The bytes of base64 text, with or without a data: URL prefix; invalid base64 is a BadImageError."""
    text = re.sub(r"\s+", "", _DATA_URL.sub("", data.strip(), count=1))
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise BadImageError(f"'{field}' is not valid base64: {error}", field=field) from error


def decode_base64_image(
    data: str, field: str = "image", max_pixels: int = MAX_INPUT_PIXELS, mode: str | None = "RGB"
) -> Image.Image:
    """An image (in `mode`; None: as stored) from base64 text. Anything that is not a complete, reasonably
    sized image is a BadImageError naming the field."""
    raw = decode_base64_bytes(data, field)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
            width, height = image.size
            if width * height > max_pixels:
                raise BadImageError(
                    f"'{field}' is {width}x{height}; at most {max_pixels} pixels are accepted", field=field
                )
            image.load()
    except BadImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise BadImageError(f"'{field}' is too large to decode safely: {error}", field=field) from error
    except Image.UnidentifiedImageError as error:
        raise BadImageError(f"'{field}' is not an image in a format Pillow reads", field=field) from error
    except Exception as error:  # PIL raises many types for broken files
        raise BadImageError(f"'{field}' is not a readable image ({error})", field=field) from error
    if mode is None:
        return image if image.mode in ("RGBA", "L", "RGB") else image.convert("RGBA")
    return image.convert(mode)


def encode_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
