"""ControlNet in the engine, on the demo models and ControlNets through the real loaders: a unit with module
`none` gives exactly the pixels of plain diffusers' ControlNet pipeline; weight 0 gives those of no ControlNet;
the A1111 single file is the diffusers folder's ControlNet; img2img units take the init image; batched jobs
keep their solo pixels; bad units are 4xx naming them; the infotext says each unit as the extension does."""

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.controlnets import ControlNetLibrary, detect_controlnet_family
from pipelines.errors import DiffusionAPIError
from pipelines.infotext import parse_infotext
from pipelines.preprocessors import preprocessor
from pipelines.samplers import build_scheduler, resolve_sampler
from pipelines.schemas import Img2ImgRequest, Txt2ImgRequest

BASE = {"prompt": "a lighthouse", "steps": 4, "width": 64, "height": 64, "seed": 5, "model": "demo-sd15",
        "fileType": "png"}  # fmt: skip


def hint(size=(64, 64), box=(16, 16, 48, 48)) -> Image.Image:
    image = Image.new("RGB", size)
    image.paste((255, 255, 255), box)
    return image


def as_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def pixels(result) -> np.ndarray:
    return np.asarray(result.image).astype(int)


def unit(**fields) -> dict:
    return {"model": "demo-sd15-canny", "image": as_base64(hint()), **fields}


def test_the_demo_controlnets_are_listed_with_their_family(settings):
    found = {entry.name: entry.family for entry in ControlNetLibrary(settings).available()}
    assert found == {"demo-sd15-canny": "sd15", "control_demo_sd15_canny": "sd15", "demo-sdxl-canny": "sdxl"}
    assert detect_controlnet_family(settings.controlnet_dir / "control_demo_sd15_canny.safetensors") == "sd15"


def test_a_unit_with_module_none_gives_plain_diffusers_controlnet_pixels(engine, settings):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    ours = engine.generate(Txt2ImgRequest(**BASE, controlnet=[unit()]))
    loaded = engine.load("demo-sd15")
    controlnet = ControlNetModel.from_pretrained(settings.controlnet_dir / "demo-sd15-canny")
    pipe = StableDiffusionControlNetPipeline.from_pipe(loaded.pipe, controlnet=controlnet)
    pipe.scheduler = build_scheduler(resolve_sampler("DPM++ 2M Karras", None), loaded.scheduler_config)
    reference = pipe(prompt=["a lighthouse"], negative_prompt=[""], image=[hint()], num_inference_steps=4,
                     guidance_scale=7.0, width=64, height=64,
                     generator=[torch.Generator("cpu").manual_seed(5)]).images[0]  # fmt: skip
    assert np.array_equal(np.asarray(reference).astype(int), pixels(ours))
    plain = engine.generate(Txt2ImgRequest(**BASE))
    assert np.abs(pixels(plain) - pixels(ours)).mean() > 1  # the control changed the picture


def test_weight_zero_gives_the_pixels_of_no_controlnet(engine):
    plain = engine.generate(Txt2ImgRequest(**BASE))
    zero = engine.generate(Txt2ImgRequest(**BASE, controlnet=[unit(weight=0.0)]))
    assert np.array_equal(pixels(plain), pixels(zero))


def test_the_a1111_single_file_is_the_same_controlnet_as_the_diffusers_folder(engine):
    folder = engine.generate(Txt2ImgRequest(**BASE, controlnet=[unit()]))
    single = engine.generate(Txt2ImgRequest(**BASE, controlnet=[unit(model="control_demo_sd15_canny [bb33f0ec]")]))
    assert np.array_equal(pixels(folder), pixels(single))


def test_a_preprocessor_makes_the_map_and_the_infotext_says_the_unit(engine):
    photo = Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    canny = engine.generate(Txt2ImgRequest(**BASE, controlnet=[unit(image=as_base64(photo), module="canny",
                                                                      threshold_a=50, threshold_b=150)]))  # fmt: skip
    edges = preprocessor("canny").run(photo, -1, 50, 150)
    by_map = engine.generate(Txt2ImgRequest(**BASE, controlnet=[unit(image=as_base64(edges.resize((64, 64))))]))
    assert np.abs(pixels(canny) - pixels(by_map)).max() <= 2  # the map the service made is the one it used
    value = parse_infotext(canny.infotext)["ControlNet 0"]
    assert value == ("Module: canny, Model: demo-sd15-canny [2fa19545], Weight: 1.0, Resize Mode: Crop and Resize, "
                     "Processor Res: 512, Threshold A: 50.0, Threshold B: 150.0, Guidance Start: 0.0, "
                     "Guidance End: 1.0, Pixel Perfect: False, Control Mode: Balanced")  # fmt: skip


def test_an_img2img_unit_without_an_image_takes_the_init_image(engine):
    init = as_base64(hint(box=(8, 8, 40, 56)))
    common = {**BASE, "image": init, "denoising_strength": 0.8}
    implicit = engine.generate(Img2ImgRequest(**common, controlnet=[{"model": "demo-sd15-canny"}]))
    explicit = engine.generate(Img2ImgRequest(**common, controlnet=[{"model": "demo-sd15-canny", "image": init}]))
    plain = engine.generate(Img2ImgRequest(**common))
    assert np.array_equal(pixels(implicit), pixels(explicit)) and not np.array_equal(pixels(plain), pixels(explicit))


def test_jobs_batched_together_keep_their_solo_pixels(engine):
    requests = [Txt2ImgRequest(**{**BASE, "seed": seed}, controlnet=[unit(image=as_base64(hint(box=box)))])
                for seed, box in ((1, (0, 0, 32, 32)), (2, (20, 8, 60, 40)))]  # fmt: skip
    loaded = engine.load("demo-sd15")
    jobs = [engine.prepare(request, loaded.entry) for request in requests]
    assert jobs[0].batch_key() == jobs[1].batch_key()
    batched = engine.run_batch(loaded, jobs)
    solo = [engine.generate(request) for request in requests]
    for together, alone in zip(batched, solo, strict=True):
        assert np.abs(pixels(together) - pixels(alone)).max() <= 2


def test_several_units_and_the_control_modes_change_the_image(engine):
    balanced = pixels(engine.generate(Txt2ImgRequest(**BASE, controlnet=[unit()])))
    for mode in ("My prompt is more important", "ControlNet is more important"):
        moded = pixels(engine.generate(Txt2ImgRequest(**BASE, controlnet=[unit(control_mode=mode)])))
        assert np.abs(moded - balanced).mean() > 0.5, mode
    second = unit(model="control_demo_sd15_canny", image=as_base64(hint(box=(0, 0, 20, 64))))
    two = engine.generate(Txt2ImgRequest(**BASE, controlnet=[unit(), second]))
    assert np.abs(pixels(two) - balanced).mean() > 0.5
    params = parse_infotext(two.infotext)
    assert "ControlNet 0" in params and "ControlNet 1" in params


def test_an_sdxl_controlnet_runs_on_an_sdxl_model(engine):
    sdxl = {**BASE, "model": "Demo SDXL", "sampler_name": "Euler"}
    plain = engine.generate(Txt2ImgRequest(**sdxl))
    controlled = engine.generate(Txt2ImgRequest(**sdxl, controlnet=[unit(model="demo-sdxl-canny")]))
    assert np.abs(pixels(plain) - pixels(controlled)).mean() > 0.5


def test_hires_fix_applies_the_control_to_the_passes_the_unit_names(engine):
    hires = {**BASE, "hires": {"enabled": True, "scale": 1.5, "steps": 2, "denoising_strength": 0.6}}
    results = {option: pixels(engine.generate(Txt2ImgRequest(**hires, controlnet=[unit(hr_option=option)])))
               for option in ("Both", "Low res only", "High res only")}  # fmt: skip
    assert results["Both"].shape == (96, 96, 3)
    assert not np.array_equal(results["Both"], results["Low res only"])
    assert not np.array_equal(results["Both"], results["High res only"])


@pytest.mark.parametrize(
    ("units", "field", "status"),
    [
        ([{"model": "demo-sdxl-canny", "image": "x"}], "controlnet[0].model", 422),  # another family
        ([{"model": "no-such-controlnet"}], "controlnet[0].model", 404),
        ([{"model": "demo-sd15-canny"}], "controlnet[0].image", 422),  # txt2img needs an image
        ([{"model": "demo-sd15-canny", "image": "bm90IGFuIGltYWdl"}], "controlnet[0].image", 422),
        ([{"model": "demo-sd15-canny", "module": "canny", "threshold_a": 999, "image": as_base64(hint())}],
         "controlnet[0].threshold_a", 422),
    ],
)  # fmt: skip
def test_a_unit_that_cannot_run_is_a_4xx_naming_it(engine, units, field, status):
    with pytest.raises(DiffusionAPIError) as refused:
        engine.prepare(Txt2ImgRequest(**BASE, controlnet=units))
    assert (refused.value.field, refused.value.status_code) == (field, status), refused.value.message
    if field == "controlnet[0].model" and status == 422:
        assert (
            "installed SD1.5 ControlNets and IP-Adapters: 'control_demo_sd15_canny', 'demo-sd15-canny'"
            in refused.value.message
        )


@pytest.mark.parametrize("model", ["demo-sd15", "demo-sd15-inpainting"])
def test_inpainting_with_a_unit_repaints_the_mask_under_control_and_keeps_the_rest(engine, model):
    from PIL import ImageDraw, ImageFilter

    init = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).ellipse((16, 16, 48, 48), fill=255)
    common = {**BASE, "model": model, "image": as_base64(init), "mask": as_base64(mask), "denoising_strength": 0.9}
    plain = pixels(engine.generate(Img2ImgRequest(**common)))
    controlled = pixels(
        engine.generate(Img2ImgRequest(**common, controlnet=[unit(image=as_base64(hint(box=(10, 10, 54, 30))))]))
    )
    kept = np.asarray(mask.filter(ImageFilter.GaussianBlur(4))) == 0
    assert np.array_equal(controlled[kept], np.asarray(init).astype(int)[kept])
    assert np.abs(controlled - plain)[~kept].mean() > 1


def test_loras_still_apply_under_control(engine):
    with_lora = engine.generate(
        Txt2ImgRequest(**{**BASE, "prompt": "a cat <lora:demo-sd15-kohya:1>"}, controlnet=[unit()])
    )
    without = engine.generate(Txt2ImgRequest(**{**BASE, "prompt": "a cat"}, controlnet=[unit()]))
    assert with_lora.warnings == [] and np.abs(pixels(with_lora) - pixels(without)).mean() > 0.5


def test_the_modules_are_a_closed_set_in_the_schema():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="'canny'"):
        Txt2ImgRequest(**BASE, controlnet=[unit(module="depth_zoe")])
    assert Txt2ImgRequest(**BASE, controlnet=[unit(module="invert (from white bg & black line)")]).controlnet


def test_a_high_res_only_unit_applies_when_there_is_no_hires_fix_and_an_empty_window_warns(engine):
    plain = pixels(engine.generate(Txt2ImgRequest(**BASE)))
    high_only = engine.generate(Txt2ImgRequest(**BASE, controlnet=[unit(hr_option="High res only")]))
    assert np.abs(pixels(high_only) - plain).mean() > 1  # as A1111: no hires fix, every unit applies
    empty = engine.generate(Txt2ImgRequest(**BASE, controlnet=[unit(guidance_start=0.8, guidance_end=0.2)]))
    assert any("applies to no step" in warning for warning in empty.warnings)


def two_units(model: str = "demo-sd15-canny", **fields) -> list[dict]:
    return [unit(model=model, **fields), unit(model=model, image=as_base64(hint(box=(0, 0, 20, 64))), **fields)]


@pytest.mark.parametrize("kind", ["img2img", "inpainting", "sdxl", "hires"])
def test_several_units_run_on_every_pipeline_and_batch_with_their_solo_pixels(engine, kind):
    from PIL import ImageDraw

    fields = dict(BASE)
    model_cls = Txt2ImgRequest
    if kind in ("img2img", "inpainting"):
        model_cls = Img2ImgRequest
        fields.update(image=as_base64(hint(box=(4, 4, 60, 30))), denoising_strength=0.8)
        if kind == "inpainting":
            mask = Image.new("L", (64, 64), 0)
            ImageDraw.Draw(mask).rectangle((10, 10, 50, 50), fill=255)
            fields["mask"] = as_base64(mask)
    if kind == "sdxl":
        fields.update(model="Demo SDXL", sampler_name="Euler")
    units = two_units("demo-sdxl-canny" if kind == "sdxl" else "demo-sd15-canny")
    if kind == "hires":
        fields["hires"] = {"enabled": True, "scale": 1.5, "steps": 2, "denoising_strength": 0.6}
    requests = [model_cls(**{**fields, "seed": seed}, controlnet=units) for seed in (7, 8)]
    loaded = engine.load(requests[0].model)
    batched = engine.run_batch(loaded, [engine.prepare(request, loaded.entry) for request in requests])
    for request, together in zip(requests, batched, strict=True):
        assert np.abs(pixels(together) - pixels(engine.generate(request))).max() <= 2
    plain = engine.generate(model_cls(**{**fields, "seed": 7}))
    assert np.abs(pixels(batched[0]) - pixels(plain)).mean() > 0.5


def test_one_controlnet_in_two_units_keeps_each_units_mode_to_itself(engine):
    """Two units of one cached ControlNet: "My prompt is more important" on one must scale only that unit."""
    shared = [unit(control_mode="My prompt is more important"), unit(image=as_base64(hint(box=(0, 0, 20, 64))))]
    separate = [shared[0], {**shared[1], "model": "control_demo_sd15_canny"}]  # the same weights, another file
    one_model = engine.generate(Txt2ImgRequest(**BASE, controlnet=shared))
    two_models = engine.generate(Txt2ImgRequest(**BASE, controlnet=separate))
    assert np.array_equal(pixels(one_model), pixels(two_models))
    again = engine.generate(Txt2ImgRequest(**BASE, controlnet=[unit()]))  # no hook left on the cached model
    assert np.array_equal(pixels(again), pixels(engine.generate(Txt2ImgRequest(**BASE, controlnet=[unit()]))))
    balanced = engine.generate(Txt2ImgRequest(**BASE, controlnet=[unit(model="control_demo_sd15_canny")]))
    assert np.array_equal(pixels(again), pixels(balanced))


def test_controlnets_refused_with_latent_masked_content_or_a_latent_hires_fix_on_an_inpainting_checkpoint(engine):
    mask = as_base64(hint())
    with pytest.raises(DiffusionAPIError) as latent_fill:
        engine.prepare(Img2ImgRequest(**BASE, image=mask, mask=mask, inpainting_fill=2, controlnet=[unit()]))
    assert latent_fill.value.field == "inpainting_fill"
    hires = {"enabled": True, "scale": 1.5, "upscaler": "Latent"}
    with pytest.raises(DiffusionAPIError) as latent_hires:
        engine.prepare(Txt2ImgRequest(**{**BASE, "model": "demo-sd15-inpainting"}, hires=hires, controlnet=[unit()]))
    assert latent_hires.value.field == "hires.upscaler"
