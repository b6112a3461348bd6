"""The images callers upload: only the formats the service writes are decoded, a photo's EXIF orientation
is applied, 16-bit grayscale keeps its shades, and a data: URL header costs nothing however it is padded."""

import base64
import io
import time

import numpy as np
import pytest
from PIL import Image

from pipelines.a1111 import png_info
from pipelines.errors import BadImageError
from pipelines.images import decode_base64_bytes, decode_base64_image, image_extension
from pipelines.infotext import encode_image, read_infotext


def encoded(image: Image.Image, file_format: str, **options) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=file_format, **options)
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize("file_format", ["TIFF", "BMP", "ICO", "PPM"])
def test_formats_the_service_does_not_write_are_refused_by_name(file_format):
    upload = encoded(Image.new("RGB", (16, 16), "red"), file_format)
    with pytest.raises(BadImageError, match="'image' is not a PNG, JPEG, WebP, AVIF or GIF image"):
        decode_base64_image(upload)
    with pytest.raises(BadImageError, match="not a PNG, JPEG"):
        png_info(upload)
    assert image_extension(base64.b64decode(upload)) == "bin"


@pytest.mark.parametrize(("file_format", "extension"), [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp"),
                                                        ("GIF", "gif"), ("AVIF", "avif")])  # fmt: skip
def test_the_accepted_formats_decode_and_keep_their_infotext(file_format, extension):
    image = Image.new("RGB", (32, 24), (200, 40, 40))
    infotext = "a red square\nSteps: 4, Sampler: Euler, Seed: 7"
    upload = base64.b64encode(encode_image(image, extension, infotext)).decode()
    decoded = decode_base64_image(upload)
    assert decoded.size == (32, 24) and decoded.mode == "RGB"
    assert image_extension(base64.b64decode(upload)) == extension
    assert read_infotext(base64.b64decode(upload)) == infotext
    assert png_info(upload)["parameters"]["Seed"] == "7"  # a string, as A1111 parses it


def test_a_photo_is_turned_upright_as_its_exif_orientation_says():
    photo = Image.new("RGB", (40, 20), "white")
    photo.paste((255, 0, 0), (0, 0, 10, 20))  # red on the left edge as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned; show it rotated 90 degrees clockwise
    upright = decode_base64_image(encoded(photo, "JPEG", exif=exif.tobytes(), quality=95))
    assert upright.size == (20, 40)
    top = np.asarray(upright)[:5].mean(axis=(0, 1))
    assert top[0] > 200 and top[1] < 80  # the stored left edge is now on top


def test_sixteen_bit_grayscale_keeps_its_shades():
    depth = np.array([[0, 1000, 32768, 65535]] * 4, dtype=np.uint16)
    upload = encoded(Image.fromarray(depth), "PNG")  # a 16-bit PNG ("I;16")
    mask = decode_base64_image(upload, field="mask", mode=None)
    assert mask.mode == "L"
    assert np.asarray(mask)[0].tolist() == [0, 3, 128, 255]  # Pillow's convert would clip 1000 and up to 255
    assert np.asarray(decode_base64_image(upload))[0, :, 0].tolist() == [0, 3, 128, 255]


def test_a_data_url_header_is_read_from_its_first_characters_only():
    png = base64.b64decode(encoded(Image.new("RGB", (8, 8)), "PNG"))
    assert decode_base64_bytes("data:image/png;base64," + base64.b64encode(png).decode()) == png
    padded = "data:image/png" + ";a=a" * 2_000_000 + ";base64," + base64.b64encode(png).decode()
    started = time.perf_counter()
    with pytest.raises(BadImageError, match="not valid base64"):
        decode_base64_bytes(padded)
    assert time.perf_counter() - started < 1.0  # a backtracking match over 8 MB took seconds


def hostile_exif(count: int) -> bytes:
    """EXIF whose UserComment claims `count` LONG values (4 bytes each) that the file does not hold."""
    import struct

    ifd0 = struct.pack("<H", 1) + struct.pack("<HHII", 0x8769, 4, 1, 26) + struct.pack("<I", 0)  # -> Exif IFD
    exif_ifd = struct.pack("<H", 1) + struct.pack("<HHII", 0x9286, 4, count, 0) + struct.pack("<I", 0)
    return b"Exif\x00\x00" + b"II*\x00" + struct.pack("<I", 8) + ifd0 + exif_ifd


@pytest.mark.parametrize("count", [0x4000000, 0xFFFFFFFF])
def test_an_exif_entry_claiming_more_data_than_the_file_holds_costs_nothing(count):
    upload = encoded(Image.new("RGB", (16, 16)), "JPEG", exif=hostile_exif(count))
    started = time.perf_counter()
    assert read_infotext(base64.b64decode(upload)) is None  # piexif allocated count x 4 bytes (or MemoryError)
    assert png_info(upload)["info"] == ""
    assert time.perf_counter() - started < 1.0
