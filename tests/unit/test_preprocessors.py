"""The model-free ControlNet preprocessors on real pixels: what each detects, the extension's resizing rule, slider
defaults and ranges, names and aliases, and the `module_detail` listing."""

import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipelines.errors import InvalidRequestError
from pipelines.preprocessors import ALIASES, IP_ADAPTER_MODULES, PREPROCESSORS, module_detail, preprocessor

RESIZING = ["canny", "threshold", "lineart_standard", "scribble_xdog", "blur_gaussian"]


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    array = np.asarray(image)
    assert array.dtype == np.uint8
    return array


def white_square_on_black(size: int = 512) -> Image.Image:
    image = Image.new("RGB", (size, size), "black")
    ImageDraw.Draw(image).rectangle([size // 4, size // 4, 3 * size // 4 - 1, 3 * size // 4 - 1], fill="white")
    return image


def black_lines_on_white(size: int = 512) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(image).rectangle([128, 128, 383, 383], outline="black", width=3)
    return image


def near(mask: np.ndarray, y0: int, y1: int, x0: int, x1: int, margin: int = 3) -> np.ndarray:
    """The pixels of `mask` within `margin` of the rectangle's border [y0, y1) x [x0, x1)."""
    ys, xs = np.nonzero(mask)
    inside_outer = (ys >= y0 - margin) & (ys < y1 + margin) & (xs >= x0 - margin) & (xs < x1 + margin)
    inside_inner = (ys >= y0 + margin) & (ys < y1 - margin) & (xs >= x0 + margin) & (xs < x1 - margin)
    return inside_outer & ~inside_inner


def test_canny_finds_the_squares_border_and_nothing_in_flat_areas():
    edges = pixels(preprocessor("canny").run(white_square_on_black()))
    assert edges.shape == (512, 512, 3)
    assert (edges[:, :, 0] == edges[:, :, 1]).all() and (edges[:, :, 1] == edges[:, :, 2]).all()
    mask = edges[:, :, 0] > 0
    assert set(np.unique(edges)) == {0, 255}
    assert near(mask, 128, 384, 128, 384).all() and mask.sum() > 4 * 250  # every edge pixel is on the border
    assert not mask[:100].any() and not mask[200:300, 200:300].any()
    # At 512 a 512x512 image is neither resized nor padded: exactly OpenCV's Canny at the default 100/200.
    assert np.array_equal(mask, cv2.Canny(np.asarray(white_square_on_black()), 100, 200) > 0)


def test_higher_canny_thresholds_find_fewer_edges():
    image = Image.new("RGB", (512, 512), "black")
    draw = ImageDraw.Draw(image)
    for x, level in ((40, 20), (200, 45), (360, 255)):  # borders of gradient 80, 180 and 1020 (more at corners)
        draw.rectangle([x, 180, x + 100, 330], fill=(level, level, level))
    canny = preprocessor("canny")
    thresholds = ((30, 60), (100, 150), (200, 255))
    counts = [(pixels(canny.run(image, 512, low, high))[:, :, 0] > 0).sum() for low, high in thresholds]
    assert counts[0] > counts[1] > counts[2] > 0


@pytest.mark.parametrize("name", RESIZING)
@pytest.mark.parametrize(
    ("size", "res", "expected"),
    [((300, 200), 256, (384, 256)), ((300, 200), 512, (768, 512)), ((1000, 600), 512, (853, 512))],
)
def test_the_short_side_becomes_processor_res_and_the_padding_is_cropped_off(name, size, res, expected):
    # 1000x600 at 512: 853.33 wide, not a multiple of 64 - the map is cropped back from the padded 896.
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    assert preprocessor(name).run(image, processor_res=res).size == expected


@pytest.mark.parametrize("name", ["none", "invert", "tile_resample"])
def test_none_invert_and_tile_resample_keep_the_images_size(name):
    image = Image.new("RGB", (37, 23), (10, 20, 30))
    assert preprocessor(name).run(image, processor_res=256).size == (37, 23)


def test_the_extension_shrinks_with_area_and_enlarges_with_bicubic_interpolation():
    rgb = np.random.default_rng(2).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    for res, interpolation, size in ((150, cv2.INTER_AREA, (200, 150)), (600, cv2.INTER_CUBIC, (800, 600))):
        resized = cv2.resize(rgb, size, interpolation=interpolation)
        expected = np.where(resized.min(axis=2) > 100, 255, 0)
        got = pixels(preprocessor("threshold").run(Image.fromarray(rgb), res, threshold_a=100))
        assert np.array_equal(got[:, :, 0], expected)


def test_invert_is_255_minus_each_value():
    rgb = np.random.default_rng(3).integers(0, 256, (23, 37, 3), dtype=np.uint8)
    assert np.array_equal(
        pixels(preprocessor("invert (from white bg & black line)").run(Image.fromarray(rgb))), 255 - rgb
    )


def test_threshold_binarizes_the_darkest_channel():
    rgb = np.zeros((512, 512, 3), dtype=np.uint8)
    rgb[:256] = (200, 200, 200)
    rgb[256:] = (200, 100, 200)  # its darkest channel is below 127
    at_default = pixels(preprocessor("threshold").run(Image.fromarray(rgb)))
    assert (at_default[:256] == 255).all() and (at_default[256:] == 0).all()
    assert (pixels(preprocessor("threshold").run(Image.fromarray(rgb), threshold_a=99))[256:] == 255).all()
    assert (pixels(preprocessor("threshold").run(Image.fromarray(rgb), threshold_a=200)) == 0).all()


def test_tile_resample_keeps_the_image_below_a_rate_of_1_1_and_downsamples_above():
    rgb = np.random.default_rng(4).integers(0, 256, (201, 301, 3), dtype=np.uint8)
    tile = preprocessor("tile_resample")
    for rate in (-1, 1.0, 1.09):
        assert np.array_equal(pixels(tile.run(Image.fromarray(rgb), threshold_a=rate)), rgb)
    assert tile.run(Image.fromarray(rgb), threshold_a=2.0).size == (150, 100)
    downsampled = pixels(tile.run(Image.fromarray(rgb), threshold_a=1.5))
    assert np.array_equal(downsampled, cv2.resize(rgb, (200, 134), interpolation=cv2.INTER_AREA))


def test_blur_gaussian_smooths_more_with_a_larger_sigma():
    noise = Image.fromarray(np.random.default_rng(5).integers(0, 256, (512, 512, 3), dtype=np.uint8))
    variances = [
        pixels(preprocessor("blur_gaussian").run(noise, threshold_a=sigma)).astype(float).var() for sigma in (1, 9)
    ]
    assert np.asarray(noise).astype(float).var() > 4 * variances[0] > 4 * variances[1]


def test_lineart_standard_draws_the_dark_lines_light_on_black():
    art = pixels(preprocessor("lineart_standard (from white bg & black line)").run(black_lines_on_white()))[:, :, 0]
    assert (art[:100] == 0).all() and (art[200:300, 200:300] == 0).all()  # flat areas: black
    lines = art > 64
    # The median line pixel is scaled to 127: the line itself is about that bright, its halo fainter.
    assert near(lines, 128, 384, 128, 384).all() and art[128:131, 150:360].min() >= 120


def test_scribble_xdog_marks_edges_white_on_black():
    for image in (black_lines_on_white(), white_square_on_black()):
        scribble = pixels(preprocessor("scribble_xdog").run(image))[:, :, 0]
        assert set(np.unique(scribble)) == {0, 255}
        marked = scribble == 255
        assert (marked.mean() < 0.1) and not marked[:100].any() and not marked[200:300, 200:300].any()
        assert near(marked, 128, 384, 128, 384, margin=12).all() and marked[120:136, 200:300].any(axis=0).all()


def test_every_map_is_8_bit_rgb_whatever_the_input_mode():
    gray = Image.new("L", (64, 64), 90)
    assert (pixels(preprocessor("none").run(gray)) == 90).all()
    half_transparent = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    half_transparent.paste((255, 0, 0, 255), (0, 0, 32, 64))
    composited = pixels(preprocessor("none").run(half_transparent))  # over white, as the extension's HWC3
    assert (composited[:, :32] == (255, 0, 0)).all() and (composited[:, 32:] == 255).all()
    for name in PREPROCESSORS:
        assert preprocessor(name).run(Image.new("LA", (80, 70)), processor_res=64).mode == "RGB"


def test_aliases_resolve_and_names_are_exact():
    assert ALIASES["invert (from white bg & black line)"] == "invert"
    assert preprocessor("lineart_standard (from white bg & black line)") is PREPROCESSORS["lineart_standard"]
    assert all(preprocessor(alias).name == name for alias, name in ALIASES.items())
    assert list(PREPROCESSORS) == ["none", "canny", "scribble_xdog", "threshold", "lineart_standard", "tile_resample",
                                   "invert", "blur_gaussian"]  # fmt: skip


@pytest.mark.parametrize("name", ["depth_midas", "Canny", ""])
def test_an_unknown_module_names_the_available_ones(name):
    with pytest.raises(InvalidRequestError) as caught:
        preprocessor(name)
    assert caught.value.field == "module"
    assert "canny" in caught.value.message and "invert (from white bg & black line)" in caught.value.message


@pytest.mark.parametrize(
    ("name", "values", "field"),
    [
        ("canny", {"threshold_a": 0}, "threshold_a"),
        ("canny", {"threshold_b": 256}, "threshold_b"),
        ("canny", {"processor_res": 32}, "processor_res"),
        ("threshold", {"processor_res": 4096}, "processor_res"),
        ("tile_resample", {"threshold_a": 8.5}, "threshold_a"),
        ("blur_gaussian", {"threshold_a": float("nan")}, "threshold_a"),
    ],
)
def test_an_out_of_range_slider_is_an_invalid_request_naming_it(name, values, field):
    with pytest.raises(InvalidRequestError) as caught:
        preprocessor(name).run(Image.new("RGB", (64, 64)), **values)
    assert caught.value.field == field and field in caught.value.message


def test_negative_or_missing_values_take_the_defaults_and_unused_sliders_are_ignored():
    square = white_square_on_black(256)
    default = pixels(preprocessor("canny").run(square))
    assert np.array_equal(default, pixels(preprocessor("canny").run(square, None, None, None)))
    assert np.array_equal(default, pixels(preprocessor("canny").run(square, 512, 100, 200)))
    assert default.shape == (512, 512, 3)
    # invert and tile_resample have no resolution slider (invert none at all): a client's 64s change nothing.
    assert preprocessor("invert").run(square, 64, 64, 64).size == (256, 256)
    assert preprocessor("tile_resample").run(square, 8192, 2, 9999).size == (128, 128)


def test_module_detail_has_the_extensions_shape():
    detail = module_detail()
    assert list(detail) == [*PREPROCESSORS, *IP_ADAPTER_MODULES]  # the IP-Adapter modules: no sliders
    assert detail["ip-adapter_clip_sd15"] == {"model_free": False, "sliders": []}
    assert "ip-adapter_clip_h" in module_detail(alias_names=True)
    assert all(set(entry) == {"model_free", "sliders"} and entry["model_free"] is False for entry in detail.values())
    assert detail["none"]["sliders"] == [] and detail["invert"]["sliders"] == []
    assert detail["canny"]["sliders"] == [
        {"name": "Preprocessor Resolution", "value": 512, "min": 64, "max": 2048, "step": 1},
        {"name": "Canny Low Threshold", "value": 100, "min": 1, "max": 255, "step": 1},
        {"name": "Canny High Threshold", "value": 200, "min": 1, "max": 255, "step": 1},
    ]
    assert detail["tile_resample"]["sliders"] == [
        None,  # no resolution slider: the rate stays in threshold_a's place
        {"name": "Down Sampling Rate", "value": 1.0, "min": 1.0, "max": 8.0, "step": 0.01},
    ]
    assert detail["blur_gaussian"]["sliders"][1] == {"name": "Sigma", "value": 9.0, "min": 0.01, "max": 64.0, "step": 1}
    assert detail["scribble_xdog"]["sliders"][1]["value"] == 32
    assert detail["threshold"]["sliders"][1] == {"name": "Binarization Threshold", "value": 127, "min": 0, "max": 255,
                                                 "step": 1}  # fmt: skip
    by_display_name = module_detail(alias_names=True)
    assert "invert (from white bg & black line)" in by_display_name and "invert" not in by_display_name
    assert by_display_name["lineart_standard (from white bg & black line)"] == detail["lineart_standard"]
