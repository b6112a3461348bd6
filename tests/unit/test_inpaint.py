"""Inpainting (pipelines/inpaint.py): the mask's preparation, the four kinds of masked content, "Only
masked", inpainting checkpoints (SD1.5 and SDXL), and the promise that outside the blurred mask the result is
the input, pixel for pixel, on every kind of checkpoint."""

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter
from pydantic import ValidationError

from pipelines.catalog import ModelCatalog
from pipelines.errors import BadImageError
from pipelines.generate import ImageEngine
from pipelines.infotext import parse_infotext
from pipelines.inpaint import binary_mask, crop_box, fill_masked, plan_inpainting
from pipelines.schemas import Img2ImgRequest
from tests.unit.test_generate import as_base64_png

WIDTH, HEIGHT = 96, 64
BASE = {"prompt": "a red fox", "steps": 4, "width": WIDTH, "height": HEIGHT, "seed": 5}


def input_image(width: int = WIDTH, height: int = HEIGHT) -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def box_mask(box: tuple[int, int, int, int], size: tuple[int, int] = (WIDTH, HEIGHT)) -> Image.Image:
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return mask


def kept_area(mask: Image.Image, blur: int = 4) -> np.ndarray:
    """Where the blurred mask is zero: the pixels that must come back unchanged."""
    return np.asarray(mask.filter(ImageFilter.GaussianBlur(blur))) == 0


def inpaint(engine, model: str, mask: Image.Image, image: Image.Image | None = None, **fields):
    image = image or input_image()
    request = Img2ImgRequest(**BASE, model=model, image=as_base64_png(image), mask=as_base64_png(mask), **fields)
    return engine.generate(request)


@pytest.mark.parametrize("model", ["demo-sd15", "demo-sd15-inpainting", "models--demo--tiny-sdxl-base"])
def test_outside_the_blurred_mask_the_input_comes_back_exactly(engine, model):
    mask = box_mask((30, 16, 60, 44))
    result = inpaint(engine, model, mask)
    before, after = np.asarray(input_image()), np.asarray(result.image)
    kept = kept_area(mask)
    assert result.image.size == (WIDTH, HEIGHT)
    assert np.array_equal(after[kept], before[kept])
    assert (after[~kept] != before[~kept]).mean() > 0.5  # the masked area was repainted
    params = parse_infotext(result.infotext)
    assert params["Mask blur"] == "4" and params["Model"] == model
    assert "Inpaint area" not in params and "Masked content" not in params  # "original", whole picture


def test_the_masked_content_modes_start_differently_and_are_named_in_the_infotext(engine):
    mask = box_mask((20, 10, 70, 50))
    results = {fill: inpaint(engine, "demo-sd15", mask, inpainting_fill=fill) for fill in (0, 1, 2, 3)}
    images = {fill: np.asarray(result.image) for fill, result in results.items()}
    for fill in (0, 2, 3):
        assert not np.array_equal(images[fill], images[1])
    assert np.array_equal(images[2], np.asarray(inpaint(engine, "demo-sd15", mask, inpainting_fill=2).image))
    named = {fill: parse_infotext(result.infotext).get("Masked content") for fill, result in results.items()}
    assert named == {0: "fill", 1: None, 2: "latent noise", 3: "latent nothing"}


def test_only_masked_repaints_the_crop_and_keeps_the_input_size(engine):
    image = input_image(256, 192)
    mask = box_mask((100, 80, 130, 110), size=(256, 192))
    result = inpaint(engine, "demo-sd15", mask, image=image, inpaint_full_res=True, inpaint_full_res_padding=16)
    assert result.image.size == (256, 192)  # A1111: the crop is pasted back into the input
    before, after = np.asarray(image), np.asarray(result.image)
    kept = kept_area(mask)
    assert np.array_equal(after[kept], before[kept])
    assert (after[~kept] != before[~kept]).mean() > 0.5
    params = parse_infotext(result.infotext)
    assert params["Inpaint area"] == "Only masked" and params["Masked area padding"] == "16"
    assert (params["Size-1"], params["Size-2"]) == (str(WIDTH), str(HEIGHT))  # the crop was repainted at, as A1111


def test_an_inverted_mask_repaints_the_other_part(engine):
    mask = box_mask((0, 0, 47, 63))
    straight = np.asarray(inpaint(engine, "demo-sd15", mask, mask_blur=0).image)
    inverted = np.asarray(inpaint(engine, "demo-sd15", mask, mask_blur=0, inpainting_mask_invert=True).image)
    before = np.asarray(input_image())
    assert np.array_equal(straight[:, 48:], before[:, 48:]) and not np.array_equal(straight[:, :48], before[:, :48])
    assert np.array_equal(inverted[:, :48], before[:, :48]) and not np.array_equal(inverted[:, 48:], before[:, 48:])
    params = parse_infotext(inpaint(engine, "demo-sd15", mask, mask_blur=0, inpainting_mask_invert=True).infotext)
    assert params["Mask mode"] == "Inpaint not masked" and "Mask blur" not in params  # as A1111 writes them


def test_a_batch_of_masked_jobs_gives_each_job_its_own_image(engine):
    masks = [box_mask((10, 10, 40, 40)), box_mask((50, 20, 90, 60))]
    alone = [np.asarray(inpaint(engine, "demo-sd15", mask).image) for mask in masks]
    loaded = engine.load("demo-sd15")
    jobs = [engine.prepare(Img2ImgRequest(**BASE, model="demo-sd15", image=as_base64_png(input_image()),
                                          mask=as_base64_png(mask))) for mask in masks]  # fmt: skip
    batched = [np.asarray(result.image) for result in engine.run(loaded, jobs)]
    for single, together in zip(alone, batched, strict=True):
        assert np.abs(single.astype(int) - together.astype(int)).max() <= 2


def test_an_inpainting_checkpoint_also_does_txt2img_img2img_and_hires_fix(engine):
    from pipelines.schemas import Txt2ImgRequest

    txt2img = engine.generate(Txt2ImgRequest(**BASE, model="demo-sd15-inpainting"))
    assert txt2img.image.size == (WIDTH, HEIGHT) and np.asarray(txt2img.image).std() > 0
    hires = {"enabled": True, "scale": 1.5, "steps": 2}
    for upscaler in ("Latent", "Lanczos"):
        upscaled = engine.generate(
            Txt2ImgRequest(**BASE, model="demo-sd15-inpainting", hires=hires | {"upscaler": upscaler})
        )
        assert upscaled.image.size == (144, 96)
    img2img = engine.generate(Img2ImgRequest(**BASE, model="demo-sd15-inpainting", image=as_base64_png(input_image())))
    assert img2img.image.size == (WIDTH, HEIGHT)


def test_an_sdxl_inpainting_folder_is_detected_and_inpaints(settings, tmp_path):
    from diffusers import StableDiffusionXLInpaintPipeline, UNet2DConditionModel

    from pipelines.demo import build_sdxl_base

    base = build_sdxl_base(tmp_path)
    unet = UNet2DConditionModel.from_config({**base.unet.config, "in_channels": 9})
    pipe = StableDiffusionXLInpaintPipeline(**{**base.components, "unet": unet})
    models = tmp_path / "models"
    pipe.save_pretrained(models / "tiny-sdxl-inpainting")
    index = json.loads((models / "tiny-sdxl-inpainting" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLInpaintPipeline"
    catalog = ModelCatalog(settings.model_copy(update={"models_dir": models, "extra_models_dir": models}))
    [entry] = catalog.list_models()
    assert (entry.family, entry.inpainting) == ("sdxl", True)
    engine = ImageEngine(catalog, device="cpu")
    mask = box_mask((30, 16, 60, 44))
    result = inpaint(engine, "tiny-sdxl-inpainting", mask)
    kept = kept_area(mask)
    assert np.array_equal(np.asarray(result.image)[kept], np.asarray(input_image())[kept])
    # txt2img runs every step from pure noise (diffusers' SDXL inpainting default strength would skip one)
    unet_calls = []
    hook = engine.load("tiny-sdxl-inpainting").pipe.unet.register_forward_hook(lambda *_: unet_calls.append(1))
    try:
        from pipelines.schemas import Txt2ImgRequest

        engine.generate(Txt2ImgRequest(**BASE, model="tiny-sdxl-inpainting"))
    finally:
        hook.remove()
    assert len(unet_calls) == BASE["steps"]


def test_mask_preparation():
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgba.putpixel((2, 3), (0, 0, 0, 255))  # black but opaque: A1111 reads the alpha of a drawn mask
    assert np.argwhere(np.asarray(binary_mask(rgba))).tolist() == [[3, 2]]
    gray = Image.new("L", (4, 1))
    gray.putdata([0, 128, 129, 255])
    assert list(binary_mask(gray).getdata()) == [0, 0, 255, 255]


def test_crop_box_keeps_the_aspect_ratio_and_stays_inside_the_image():
    mask = box_mask((100, 40, 110, 50), size=(200, 100))
    x1, y1, x2, y2 = crop_box(mask, 4, 64, 32)
    assert (x2 - x1) == 2 * (y2 - y1) and x1 <= 96 and x2 >= 115 and y1 <= 36 and y2 >= 55
    corner = crop_box(box_mask((0, 0, 5, 5), size=(200, 100)), 0, 32, 64)
    assert corner[0] == 0 and corner[1] == 0 and corner[2] * 2 == corner[3]
    assert crop_box(Image.new("L", (10, 10)), 4, 64, 64) is None


def test_fill_paints_the_masked_area_with_the_colours_around_it():
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    ImageDraw.Draw(image).rectangle((24, 24, 40, 40), fill=(0, 0, 255))
    mask = box_mask((24, 24, 40, 40), size=(64, 64))
    filled = np.asarray(fill_masked(image, mask)).astype(int)
    assert np.abs(filled[32, 32] - (200, 30, 30)).max() < 30  # the blue square became the red around it
    assert filled[0, 0].tolist() == [200, 30, 30]


def test_an_empty_mask_or_a_mask_of_another_size_is_said():
    warnings: list[str] = []
    plan_inpainting(input_image(), Image.new("L", (48, 32)), WIDTH, HEIGHT, blur=4, invert=False, fill=1,
                    full_res=True, padding=32, warnings=warnings)  # fmt: skip
    assert "48x32" in warnings[0] and "no white pixel" in warnings[1]


def test_bad_mask_fields_are_refused_and_unused_ones_are_said(engine):
    image = as_base64_png(input_image())
    for field, value in [("inpainting_fill", 4), ("inpainting_fill", True), ("mask_blur", -1), ("mask", "")]:
        with pytest.raises(ValidationError, match=field):
            Img2ImgRequest(**BASE, image=image, **{field: value})
    with pytest.raises(BadImageError, match="'mask'"):
        engine.prepare(Img2ImgRequest(**BASE, image=image, mask="bm90IGFuIGltYWdl"))
    job = engine.prepare(Img2ImgRequest(**BASE, image=image, inpaint_full_res=True, mask_blur=2))
    assert job.inpaint is None and "mask_blur, inpaint_full_res ignored" in job.warnings[0]
    defaults = Img2ImgRequest(**BASE, image=image, mask_blur=4, inpainting_fill=1)  # clients that send them all
    assert engine.prepare(defaults).warnings == []
