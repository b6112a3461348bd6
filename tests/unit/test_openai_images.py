"""The OpenAI Images API's translation into native jobs (pipelines/openai_images.py): sizes, qualities, output
formats, the native fields sent beside OpenAI's, and OpenAI's masks (transparent = repaint) as native ones."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from pipelines import openai_images
from pipelines.errors import InvalidRequestError
from pipelines.openai_images import ImageEditFields, ImageGenerationRequest, ImageVariationFields


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decoded(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))


def test_auto_size_is_the_familys_native_size_and_a_size_is_width_by_height():
    request = ImageGenerationRequest(prompt="a cat")
    assert openai_images.generation_job(request, "m", "sd15").native.width == 512
    sdxl = openai_images.generation_job(request, "m", "sdxl").native
    assert (sdxl.width, sdxl.height) == (1024, 1024)
    wide = openai_images.generation_job(ImageGenerationRequest(prompt="a cat", size="768x512"), "m", "sd15")
    assert (wide.native.width, wide.native.height, wide.size) == (768, 512, "768x512")


def test_sizes_outside_the_limits_are_refused_with_a_readable_message():
    for size in ("65x64", "64x4096", "1024", "auto ", "0x0"):
        with pytest.raises(ValueError, match="size must be `WIDTHxHEIGHT`"):
            ImageGenerationRequest(prompt="a cat", size=size)


def test_quality_picks_the_steps_unless_steps_are_sent():
    steps = {q: openai_images.generation_job(ImageGenerationRequest(prompt="x", quality=q), "m", "sd15").native.steps
             for q in ("low", "medium", "auto", "standard", "high", "hd", "xhigh", "max")}  # fmt: skip
    assert steps == {"low": 12, "medium": 24, "auto": 24, "standard": 24, "high": 40, "hd": 40, "xhigh": 50, "max": 60}
    job = openai_images.generation_job(ImageGenerationRequest(prompt="x", quality="hd", steps=3), "m", "sd15")
    assert job.native.steps == 3 and job.quality == "high"


def test_native_fields_beside_openais_reach_the_job_and_unsent_ones_keep_the_native_defaults():
    request = ImageGenerationRequest(prompt="x", n=3, negative_prompt="blurry", seed=7, cfg_scale=4.5,
                                     sampler_name="Euler a", scheduler="Karras", loras=[{"name": "l", "scale": 0.5}],
                                     hires={"enabled": True, "scale": 1.5}, output_format="jpeg",
                                     output_compression=60)  # fmt: skip
    native = openai_images.generation_job(request, "demo-sd15", "sd15").native
    assert (native.batch_size, native.negative_prompt, native.seed, native.cfg_scale) == (3, "blurry", 7, 4.5)
    assert (native.sampler_name, native.scheduler_type, native.model) == ("Euler a", "Karras", "demo-sd15")
    assert native.loras[0].name == "l" and native.hires.enabled and native.hires.scale == 1.5
    assert (native.file_type, native.jpeg_quality) == ("jpg", 60)
    plain = openai_images.generation_job(ImageGenerationRequest(prompt="x"), "m", "sd15").native
    assert (plain.seed, plain.cfg_scale, plain.hires, plain.loras) == (None, 7.0, None, [])


def test_what_is_accepted_but_not_done_here_is_said_in_the_warnings():
    request = ImageGenerationRequest(prompt="x", background="transparent", style="vivid", moderation="low")
    warnings = openai_images.generation_job(request, "m", "sd15").warnings
    assert any("transparent" in warning for warning in warnings) and any("'style'" in w for w in warnings)


def test_a_streamed_call_with_partial_images_asks_the_job_for_previews():
    streamed = ImageGenerationRequest(prompt="x", stream=True, partial_images=2)
    assert openai_images.generation_job(streamed, "m", "sd15").native.preview
    assert not openai_images.generation_job(ImageGenerationRequest(prompt="x", stream=True), "m", "sd15").native.preview


def test_an_openai_mask_repaints_its_transparent_pixels():
    picture = Image.new("RGB", (96, 72), (200, 30, 30))
    mask = Image.new("RGBA", (96, 72), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 8, 40, 32))  # transparent: repaint
    form = ImageEditFields(prompt="a window", size="auto")
    job = openai_images.edit_job(form, png(picture), png(mask), "m", 0)
    native_mask = decoded(job.native.mask)
    assert native_mask[20, 20] == 255 and native_mask[2, 2] == 0 and native_mask[8:32, 16:40].min() == 255
    assert (job.native.width, job.native.height) == (96, 72)
    assert job.native.denoising_strength == openai_images.MASKED_EDIT_STRENGTH


def test_without_a_mask_the_images_own_transparent_pixels_are_repainted_or_the_whole_image_redrawn():
    see_through = Image.new("RGBA", (64, 64), (10, 200, 10, 255))
    see_through.paste((0, 0, 0, 0), (0, 0, 32, 64))
    job = openai_images.edit_job(ImageEditFields(prompt="x"), png(see_through), None, "m", 0)
    assert decoded(job.native.mask)[5, 5] == 255 and decoded(job.native.mask)[5, 50] == 0
    opaque = openai_images.edit_job(ImageEditFields(prompt="x"), png(Image.new("RGB", (32, 32))), None, "m", 2)
    assert opaque.native.mask is None and opaque.native.denoising_strength == openai_images.EDIT_STRENGTH
    assert any("2 more image(s)" in warning for warning in opaque.warnings)


def test_a_mask_of_another_size_is_refused_naming_the_mask():
    with pytest.raises(InvalidRequestError) as refused:
        openai_images.edit_job(ImageEditFields(prompt="x"), png(Image.new("RGB", (32, 32))),
                               png(Image.new("RGBA", (16, 16))), "m", 0)  # fmt: skip
    assert refused.value.field == "mask"


def test_form_fields_arrive_as_text_and_are_read_as_their_types():
    form = ImageEditFields.model_validate({"prompt": "x", "n": "2", "steps": "3", "seed": "9", "mask_blur": "0",
                                           "inpainting_fill": "0", "denoising_strength": "0.5"})  # fmt: skip
    native = openai_images.edit_job(form, png(Image.new("RGB", (72, 80))), None, "m", 0).native
    assert (native.batch_size, native.steps, native.seed, native.mask_blur) == (2, 3, 9, 0)
    assert native.denoising_strength == 0.5 and (native.width, native.height) == (72, 80)


def test_an_input_larger_than_the_limits_is_scaled_into_them_for_auto():
    assert openai_images.snapped_size(100, 90) == (96, 88)
    width, height = openai_images.snapped_size(4000, 3000)
    assert width <= 2048 and width % 8 == 0 and height % 8 == 0 and width * height <= 2048 * 2048


def test_a_variation_is_img2img_with_an_empty_prompt():
    job = openai_images.variation_job(ImageVariationFields(n=2), png(Image.new("RGB", (48, 48), "blue")), "m")
    assert job.kind == "img2img" and job.native.prompt == "" and job.native.batch_size == 2
    assert job.native.denoising_strength == openai_images.VARIATION_STRENGTH


@pytest.mark.parametrize("mode", ["1", "P", "L", "RGB"])
def test_a_mask_without_transparency_is_read_as_the_native_kind_whatever_its_mode(mode):
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # white: repaint
    job = openai_images.edit_job(ImageEditFields(prompt="x"), png(Image.new("RGB", (64, 64))),
                                 png(mask.convert(mode)), "m", 0)  # fmt: skip
    native = decoded(job.native.mask)
    assert native[10, 10] == 255 and native[10, 50] == 0


def test_a_gray_mask_with_alpha_repaints_its_transparent_pixels():
    mask = Image.new("LA", (64, 64), (255, 255))
    mask.paste((0, 0), (32, 0, 64, 64))  # transparent: repaint
    job = openai_images.edit_job(ImageEditFields(prompt="x"), png(Image.new("RGB", (64, 64))), png(mask), "m", 0)
    native = decoded(job.native.mask)
    assert native[10, 50] == 255 and native[10, 10] == 0


def test_openais_nulls_mean_its_defaults():
    request = ImageGenerationRequest(prompt="x", n=None, size=None, quality=None, output_format=None, stream=None)
    job = openai_images.generation_job(request, "m", "sd15")
    assert (job.native.batch_size, job.size, job.native.steps, job.native.file_type) == (1, "512x512", 24, "png")
