"""A1111 infotext: exact text, quoting, parsing, and embedding in all five formats."""

import io
import json
import random
import re

import piexif
import pytest
from PIL import Image

from pipelines.errors import BadImageError
from pipelines.infotext import (
    FORMATS,
    _parameter_pairs,
    build_infotext,
    encode_image,
    parse_infotext,
    quote,
    read_infotext,
)

PARAMS = {
    "Steps": 25,
    "Sampler": "DPM++ 2M",
    "Schedule type": "Karras",
    "CFG scale": 6.5,
    "Seed": 42,
    "Size": "32x32",
    "Model hash": "31e35c80fc",
    "Model": "sd_xl_base_1.0",
    "Denoising strength": 0.45,
    "Clip skip": 2,
    "Hires prompt": "a cat, 4k",
    "Hires upscale": 2,
    "Hires steps": 10,
    "Hires upscaler": "Latent",
    "Lora hashes": "add_detail: 7c6bad76eb54",
    "Version": "v1.10.1",
}
A1111_LINE = (
    "Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 42, Size: 32x32, "
    "Model hash: 31e35c80fc, Model: sd_xl_base_1.0, Denoising strength: 0.45, Clip skip: 2, "
    'Hires prompt: "a cat, 4k", Hires upscale: 2, Hires steps: 10, Hires upscaler: Latent, '
    'Lora hashes: "add_detail: 7c6bad76eb54", Version: v1.10.1'
)


def test_build_matches_a1111_example_line():
    assert build_infotext("a cat", "", PARAMS) == "a cat\n" + A1111_LINE


def test_known_keys_take_a1111_positions_whatever_the_insertion_order():
    shuffled = dict(reversed(list(PARAMS.items())))
    line = build_infotext("p", "", shuffled).splitlines()[-1]
    assert line.startswith("Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras")
    assert line.endswith("Version: v1.10.1")


def test_negative_prompt_none_values_and_key_equal_value():
    text = build_infotext("p", "ugly", {"Steps": 1, "Seed": None, "Tiling": "Tiling", "CFG scale": 7.0})
    assert text == "p\nNegative prompt: ugly\nSteps: 1, CFG scale: 7.0, Tiling"


@pytest.mark.parametrize(
    ("value", "expected"),
    [("plain", "plain"), ("a, b", '"a, b"'), ("k: v", '"k: v"'), ("a\nb", '"a\\nb"'), ('q"x, y', '"q\\"x, y"'),
     ("日本, 語", '"日本, 語"')],
)  # fmt: skip
def test_quote(value, expected):
    assert quote(value) == expected


def test_parse_as_a1111_does():
    text = "a cat\nsecond line\nNegative prompt: ugly\nmore negative\n" + A1111_LINE
    parsed = parse_infotext(text)
    assert parsed["Prompt"] == "a cat\nsecond line"
    assert parsed["Negative prompt"] == "ugly\nmore negative"
    assert parsed["Steps"] == "25"
    assert parsed["Size-1"] == "32" and parsed["Size-2"] == "32"
    assert parsed["Hires prompt"] == "a cat, 4k"
    assert parsed["Lora hashes"] == "add_detail: 7c6bad76eb54"
    assert parsed["Clip skip"] == "2"
    assert parsed["Schedule type"] == "Karras"


def test_parse_needs_three_pairs_for_a_parameter_line():
    parsed = parse_infotext("a cat\nStyle: one, Mood: two")
    assert parsed["Prompt"] == "a cat\nStyle: one, Mood: two"
    assert "Style" not in parsed
    assert parsed["Clip skip"] == "1"  # A1111's default for a missing key


def test_build_then_parse_round_trip_with_quoting():
    params = {"Steps": 8, "Sampler": "Euler a", "CFG scale": 7.0, "Seed": 1, "Model": "my, model: v2"}
    parsed = parse_infotext(build_infotext("café 日本, ok", "x: y", params))
    assert parsed["Prompt"] == "café 日本, ok"
    assert parsed["Negative prompt"] == "x: y"
    assert parsed["Model"] == "my, model: v2"
    assert parsed["Sampler"] == "Euler a"


TEXT = build_infotext(
    "portrait, café 日本 ✨\nline two",
    'blurry, "bad"',
    {"Steps": 8, "Sampler": "DPM++ 2M", "CFG scale": 7.0, "Seed": 7, "Size": "64x64",
     "Lora hashes": "a: 0123456789ab, b: ba9876543210", "Version": "DiffusionAPI v0.1.0"},
)  # fmt: skip


@pytest.mark.parametrize("file_type", list(FORMATS))
def test_round_trip_every_format(file_type):
    image = Image.new("RGB", (64, 48), (200, 30, 90))
    data = encode_image(image, file_type, TEXT, quality=90)
    reopened = Image.open(io.BytesIO(data))
    assert reopened.format == FORMATS[file_type]
    assert reopened.size == (64, 48)
    assert read_infotext(data) == TEXT
    assert parse_infotext(read_infotext(reopened))["Lora hashes"] == "a: 0123456789ab, b: ba9876543210"


def test_png_uses_text_chunk_for_latin1_and_itxt_otherwise():
    image = Image.new("RGB", (8, 8))
    ascii_png = encode_image(image, "png", "a cat\nSteps: 1, Seed: 2, CFG scale: 3")
    unicode_png = encode_image(image, "png", "日本\nSteps: 1, Seed: 2, CFG scale: 3")
    assert b"tEXtparameters" in ascii_png
    assert b"iTXtparameters" in unicode_png


@pytest.mark.parametrize("file_type", ["jpg", "webp", "avif"])
def test_exif_user_comment_is_unicode_utf16be_big_endian(file_type):
    data = encode_image(Image.new("RGB", (8, 8)), file_type, "日本\nSteps: 1, Seed: 2, CFG scale: 3")
    exif_bytes = Image.open(io.BytesIO(data)).info["exif"]
    assert b"MM\x00\x2a" in exif_bytes[:16]
    comment = piexif.load(exif_bytes)["Exif"][piexif.ExifIFD.UserComment]
    assert comment.startswith(b"UNICODE\x00")
    assert comment[8:].decode("utf-16-be") == "日本\nSteps: 1, Seed: 2, CFG scale: 3"


def test_gif_comment_is_utf8():
    data = encode_image(Image.new("RGB", (8, 8)), "gif", "日本\nSteps: 1, Seed: 2, CFG scale: 3")
    assert Image.open(io.BytesIO(data)).info["comment"].decode("utf-8").startswith("日本")


def test_image_without_metadata_and_non_image():
    plain = io.BytesIO()
    Image.new("RGB", (8, 8)).save(plain, format="PNG")
    assert read_infotext(plain.getvalue()) is None
    with pytest.raises(BadImageError):
        read_infotext(b"not an image")


def test_parse_reads_json_quoted_multiline_value():
    text = build_infotext("p", "", {"Steps": 1, "Seed": 2, "Hires prompt": "a\nb, c"})
    assert parse_infotext(text)["Hires prompt"] == json.loads('"a\\nb, c"')


# The parameter line: the linear tokenizer against the regex it replaces ---------------------------------
# The regex this module used (as A1111 does), with `findall`: the reference on realistic lines. It is
# quadratic or worse on long runs of key characters, so it only ever sees short texts here.
REFERENCE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
REALISTIC_LINES = [
    A1111_LINE,
    "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x768, Model hash: 6ce0161689, Model: v1-5",
    'Steps: 30, Lora hashes: "a: 1, b: 2", TI hashes: "easynegative: c74b4e810b03", Version: v1.10.1',
    'Steps: 1, Hires prompt: "a \\"cat\\", 4k: yes", Seed: 2, Wildcard prompt: "x:y, z", CFG scale: 5',
    "Steps: 1, Seed resize from: -1x-1, Token merging ratio hr: 0.5, ADetailer model/2nd: face_yolov8n.pt, "
    "Noise multiplier-x: 1, Schedule type: Karras",
    "masterpiece, (cat:1.2), style: anime",  # a prompt line with colons: two pairs, so not parameters
    "masterpiece, (cat:1.2), style: anime, 8k: yes",  # three pairs: A1111 reads it as parameters
    "Steps: 1, Seed: 2, CFG scale: 3,",  # trailing commas
    ", , Steps: 1,, Seed: 2 ,CFG scale: 3, ,",
    'Steps: 1, Prompt: "a, b, Seed: 2, Size: 8x8',  # a quote never closed
    'Steps: 1, Empty: "", Seed: 2, Quote then text: "a" b, CFG scale: 3',
    "Steps: 1, Modèle: café, 日本 語: 値, Seed: 2",
    "Steps:\t1,\tSeed:  2 , CFG scale :3, Sampler:Euler",
    'Steps: 1, Back: "ends with \\\\", Seed: 2, Odd: "\\\\\\"", X: y',
    "Steps: 1, a: single letter keys are no keys, Seed: 2, Size: 512x768x2, Size2: 64x",
    "Steps: 1, Seed: 2, CFG scale: 3, RNG: CPU, Emphasis: No norm, Module 1: sdxl_vae, Tiling",
]


@pytest.mark.parametrize("line", REALISTIC_LINES)
def test_parameter_pairs_are_what_the_reference_regex_finds(line):
    assert _parameter_pairs(line) == REFERENCE_PARAM.findall(line)


def test_parameter_pairs_match_the_reference_on_random_short_lines():
    pieces = ["a", "bc", "Steps", ":", ": ", ",", ", ", '"', '\\"', "\\", " ", "-", "/", "_", "1", "\t", "é", "x"]
    generator = random.Random(11)
    for _ in range(20000):
        line = "".join(generator.choice(pieces) for _ in range(generator.randint(0, 24)))
        assert _parameter_pairs(line) == REFERENCE_PARAM.findall(line), line


def test_parse_of_realistic_infotexts():
    text = "a cat: cute\n\n  sitting, (fur:1.2)\nNegative prompt:\n\nugly, blurry\n" + REALISTIC_LINES[2]
    parsed = parse_infotext(text)
    assert parsed["Prompt"] == "a cat: cute\n\nsitting, (fur:1.2)"
    assert parsed["Negative prompt"] == "ugly, blurry"  # empty lines before any text are dropped, as A1111 does
    assert parsed["Lora hashes"] == "a: 1, b: 2" and parsed["TI hashes"] == "easynegative: c74b4e810b03"
    sized = parse_infotext("p\n" + REALISTIC_LINES[1])
    assert (sized["Size-1"], sized["Size-2"], sized["Sampler"]) == ("512", "768", "Euler a")
    prompt_only = parse_infotext("p\n" + REALISTIC_LINES[5])
    assert prompt_only["Prompt"] == "p\n" + REALISTIC_LINES[5] and "style" not in prompt_only
    as_parameters = parse_infotext("p\n" + REALISTIC_LINES[6])
    assert as_parameters["Prompt"] == "p" and (as_parameters["cat"], as_parameters["8k"]) == ("1.2)", "yes")
    quoted = parse_infotext("p\n" + REALISTIC_LINES[3])
    assert quoted["Hires prompt"] == 'a "cat", 4k: yes' and quoted["Wildcard prompt"] == "x:y, z"
