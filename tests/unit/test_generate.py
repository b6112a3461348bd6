"""txt2img and img2img on the demo models, through the real loaders, asserting on real pixels."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from pipelines.errors import BadImageError, InvalidRequestError, UnknownModelError
from pipelines.generate import ImageEngine
from pipelines.infotext import encode_image, parse_infotext, read_infotext
from pipelines.prepare import prepare_job
from pipelines.samplers import sampler_names
from pipelines.schemas import Img2ImgRequest, Txt2ImgRequest


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def tiny(**fields) -> Txt2ImgRequest:
    base = {"prompt": "a red fox in the snow", "steps": 6, "width": 64, "height": 64, "seed": 1234}
    return Txt2ImgRequest(**{**base, **fields})


def as_base64_png(image: Image.Image, data_url: bool = False) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    text = base64.b64encode(buffer.getvalue()).decode()
    return f"data:image/png;base64,{text}" if data_url else text


@pytest.mark.parametrize(
    ("model", "width", "height"),
    [("Demo SD1.5", 64, 96), ("Demo SD1.5 (single file)", 128, 64), ("Demo SDXL", 96, 64)],
)
def test_txt2img_size_and_infotext(engine, catalog, model, width, height):
    result = engine.generate(tiny(model=model, width=width, height=height, negative_prompt="blurry"))
    assert result.image.size == (width, height) == (result.width, result.height)
    assert pixels(result.image).std() > 0  # not a blank image
    entry = catalog.resolve(model)
    parsed = parse_infotext(result.infotext)
    assert parsed["Prompt"] == "a red fox in the snow"
    assert parsed["Negative prompt"] == "blurry"
    assert (parsed["Size-1"], parsed["Size-2"]) == (str(width), str(height))
    assert parsed["Model hash"] == catalog.model_hash(entry) == result.model_hash
    assert parsed["Model"] == entry.name
    assert parsed["Seed"] == "1234"
    assert (parsed["Sampler"], parsed["Schedule type"]) == ("DPM++ 2M", "Karras")
    assert result.infotext.splitlines()[-1].startswith("Steps: 6, Sampler: DPM++ 2M")
    assert result.generation_time_sec > 0 and result.memory_before_mb > 0 and result.memory_after_mb > 0


def test_same_seed_same_pixels_other_seed_other_pixels(engine):
    first = pixels(engine.generate(tiny()).image)
    again = pixels(engine.generate(tiny()).image)
    other = pixels(engine.generate(tiny(seed=1235)).image)
    assert np.array_equal(first, again)
    assert np.abs(first - other).mean() > 1


def test_determinism_across_engines(catalog, engine):
    fresh = ImageEngine(catalog, device="cpu")
    assert np.array_equal(pixels(fresh.generate(tiny()).image), pixels(engine.generate(tiny()).image))


def test_single_file_checkpoint_gives_the_folder_models_pixels(engine):
    # The single file holds the same weights as the diffusers folder, in the original key layout.
    folder = engine.generate(tiny(model="demo-sd15")).image
    single = engine.generate(tiny(model="demo-sd15-single")).image
    assert np.array_equal(pixels(folder), pixels(single))


@pytest.mark.parametrize("seed", [None, -1])
def test_random_seed_is_reported_and_reproduces(engine, seed):
    result = engine.generate(tiny(seed=seed))
    assert 0 <= result.seed < 2**32
    assert parse_infotext(result.infotext)["Seed"] == str(result.seed)
    assert np.array_equal(pixels(engine.generate(tiny(seed=result.seed)).image), pixels(result.image))


@pytest.mark.parametrize("sampler", sampler_names())
def test_every_sampler_runs(engine, sampler):
    result = engine.generate(tiny(sampler_name=sampler, steps=3))
    assert result.image.size == (64, 64)
    assert np.isfinite(pixels(result.image)).all() and pixels(result.image).std() > 0
    assert parse_infotext(result.infotext)["Sampler"] in sampler


def test_samplers_differ(engine):
    euler = pixels(engine.generate(tiny(sampler_name="Euler")).image)
    ddim = pixels(engine.generate(tiny(sampler_name="DDIM")).image)
    assert not np.array_equal(euler, ddim)  # random tiny weights: the samplers' outputs differ slightly


def test_sampler_approximation_reaches_the_job_warnings(engine):
    result = engine.generate(tiny(sampler_name="DPM fast", steps=3))
    assert any("DPM fast" in warning for warning in result.warnings)


def test_progress_reports_every_step_and_never_goes_back(engine):
    seen = []
    engine.generate(tiny(steps=5), progress=lambda done, total, phase: seen.append((done / total, phase)))
    assert seen == [(step / 5, "generation") for step in range(1, 6)]  # one report per step, overall fraction


@pytest.mark.parametrize("model", ["Demo SD1.5", "Demo SDXL"])
def test_clip_skip_changes_the_image_and_is_recorded(engine, model):
    base = engine.generate(tiny(model=model))
    skipped = engine.generate(tiny(model=model, clip_skip=2))
    assert not np.array_equal(pixels(base.image), pixels(skipped.image))
    assert parse_infotext(skipped.infotext)["Clip skip"] == "2"
    assert "Clip skip" not in base.infotext


@pytest.mark.parametrize("model", ["Demo SD1.5", "Demo SDXL", "Demo SDXL Refiner"])
def test_img2img_resizes_input_and_changes_pixels(engine, model):
    source = Image.new("RGB", (100, 80), (20, 160, 40))
    request = Img2ImgRequest(prompt="a forest", model=model, image=as_base64_png(source, data_url=True),
                             steps=8, denoising_strength=0.5, width=64, height=72, seed=3)  # fmt: skip
    result = engine.generate(request)
    assert result.image.size == (64, 72)
    resized = pixels(source.resize((64, 72)))
    assert np.abs(pixels(result.image) - resized).mean() > 1
    parsed = parse_infotext(result.infotext)
    assert parsed["Denoising strength"] == "0.5"


def test_img2img_strength_sets_the_steps_run_and_the_result(engine):
    source = Image.new("RGB", (64, 64), (200, 200, 200))

    def run(strength):
        seen = []
        request = Img2ImgRequest(prompt="x", image=as_base64_png(source), steps=10,
                                 denoising_strength=strength, width=64, height=64, seed=9)  # fmt: skip
        image = engine.generate(request, progress=lambda done, total, phase: seen.append(done)).image
        return pixels(image), len(seen)  # one progress report per step run

    weak, weak_steps = run(0.3)
    strong, strong_steps = run(0.9)
    assert (weak_steps, strong_steps) == (3, 9)  # int(steps x strength), as A1111 runs img2img
    assert not np.array_equal(weak, strong)


def test_img2img_plain_and_data_url_base64_give_the_same_image(engine):
    source = Image.new("RGB", (64, 64), (10, 90, 200))
    results = [
        engine.generate(
            Img2ImgRequest(prompt="x", image=as_base64_png(source, data_url=flag), steps=4, width=64, height=64, seed=5)
        ).image  # fmt: skip
        for flag in (False, True)
    ]
    assert np.array_equal(pixels(results[0]), pixels(results[1]))


def test_img2img_with_less_than_one_step_runs_one_step_with_a_warning(engine):
    source = Image.new("RGB", (64, 64), (200, 60, 60))
    steps_run = []
    request = Img2ImgRequest(prompt="x", image=as_base64_png(source), steps=3, denoising_strength=0.3, width=64,
                             height=64, seed=4)  # fmt: skip
    result = engine.generate(request, progress=lambda done, total, phase: steps_run.append(done))
    assert len(steps_run) == 1  # int(3 x 0.3) = 0 steps: A1111 runs one at the lowest noise level
    assert any("steps x denoising_strength = 3 x 0.3 is less than one step" in w for w in result.warnings)
    one_step = engine.generate(request.model_copy(update={"denoising_strength": 0.34}))  # int(3 x 0.34) = 1
    assert np.array_equal(pixels(result.image), pixels(one_step.image))


@pytest.mark.parametrize(
    "data",
    ["not base64!!", base64.b64encode(b"plain text, not an image").decode(),
     "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n truncated").decode()],
)  # fmt: skip
def test_bad_input_images_are_rejected(data):
    with pytest.raises(BadImageError) as raised:
        prepare_job(Img2ImgRequest(prompt="x", image=data))
    assert raised.value.field == "image"


def test_refiner_cannot_do_txt2img(engine):
    with pytest.raises(UnknownModelError, match="SDXL refiner, not a txt2img model"):
        engine.generate(tiny(model="Demo SDXL Refiner"))


@pytest.mark.parametrize(
    ("fields", "field"),
    [({"hires": {"enabled": True}}, "hires"), ({"refiner_checkpoint": "Demo SDXL Refiner"}, "refiner_checkpoint")],
)  # fmt: skip
def test_features_of_later_versions_are_refused_not_ignored(fields, field):
    with pytest.raises(InvalidRequestError) as raised:
        prepare_job(tiny(**fields))
    assert raised.value.field == field


def test_batch_gives_each_job_its_own_seed_image(engine):
    loaded = engine.load("Demo SD1.5")
    jobs = [prepare_job(tiny(seed=11)), prepare_job(tiny(seed=12, prompt="a blue car"))]
    batch = engine.run(loaded, jobs)
    singles = [engine.generate(tiny(seed=11)), engine.generate(tiny(seed=12, prompt="a blue car"))]
    for batched, single in zip(batch, singles, strict=True):
        assert batched.seed == single.seed
        assert np.abs(pixels(batched.image) - pixels(single.image)).max() <= 2  # batched matmuls round apart


def test_incompatible_jobs_are_not_batched(engine):
    with pytest.raises(ValueError, match="share"):
        engine.run(engine.load("Demo SD1.5"), [prepare_job(tiny()), prepare_job(tiny(steps=7))])


def test_lru_cache_reuses_and_evicts(catalog):
    small = ImageEngine(catalog, device="cpu", max_loaded_models=1)
    first = small.load("Demo SD1.5")
    assert small.load("demo-sd15") is first  # reused, not reloaded
    small.load("Demo SDXL")
    assert small.loaded_models() == ["models--demo--tiny-sdxl-base"]
    assert small.load("Demo SD1.5") is not first


def test_generated_image_keeps_its_infotext_in_every_format(engine):
    result = engine.generate(tiny(prompt="café, 日本: test"))
    for file_type in ("png", "jpg", "webp", "avif", "gif"):
        text = read_infotext(encode_image(result.image, file_type, result.infotext))
        assert text == result.infotext
        assert parse_infotext(text)["Prompt"] == "café, 日本: test"


def test_clip_skip_beyond_the_encoders_layers_uses_its_first_layer_with_a_warning(engine):
    layers = engine.load("Demo SD1.5").pipe.text_encoder.config.num_hidden_layers
    deepest = engine.generate(tiny(clip_skip=layers))
    beyond = engine.generate(tiny(clip_skip=12))
    assert np.array_equal(pixels(beyond.image), pixels(deepest.image))
    assert beyond.warnings == [f"clip_skip 12 is more than the text encoder's {layers} layers; used {layers}"]
    assert parse_infotext(beyond.infotext)["Clip skip"] == str(layers)


@pytest.mark.parametrize("model", ["Demo SD1.5", "Demo SDXL"])
def test_previews_are_small_jpegs_of_the_latents_and_change_nothing(engine, model, monkeypatch):
    import pipelines.generate
    from pipelines.previews import PREVIEW_SINK

    monkeypatch.setattr(pipelines.generate, "PREVIEW_INTERVAL_S", 0.0)  # every step (the service: every 0.5 s)
    plain = engine.generate(tiny(model=model, width=128, height=64))
    seen: list[tuple[str, Image.Image]] = []
    token = PREVIEW_SINK.set(lambda job_id, data: seen.append((job_id, Image.open(io.BytesIO(base64.b64decode(data))))))
    try:
        previewed = engine.generate(tiny(model=model, width=128, height=64, preview=True))
        unasked = engine.generate(tiny(model=model, width=128, height=64))  # preview false: no call
    finally:
        PREVIEW_SINK.reset(token)
    assert np.array_equal(pixels(previewed.image), pixels(plain.image)) and len(seen) == 6
    assert all(image.format == "JPEG" and image.size == (16, 8) for _, image in seen)  # one pixel per latent
    assert np.abs(pixels(seen[0][1]) - pixels(seen[-1][1])).mean() > 0  # the image so far changes
    assert np.array_equal(pixels(unasked.image), pixels(plain.image))


def test_the_cheap_decode_maps_latent_channels_to_colours():
    import torch

    from pipelines.families.sd15 import SD15
    from pipelines.previews import latents_to_image

    latents = torch.zeros(4, 2, 3)
    assert np.asarray(latents_to_image(latents, SD15.latent_rgb)).tolist() == [[[127, 127, 127]] * 3] * 2  # grey
    latents[0] = 1.0  # SD1.5's first channel is mostly brightness
    first = np.asarray(latents_to_image(latents, SD15.latent_rgb))
    assert first.shape == (2, 3, 3) and (first > 150).all()
    latents[3] = 3.0  # its last channel pulls towards dark blue-less
    assert (np.asarray(latents_to_image(latents, SD15.latent_rgb)) < first).all()


def test_the_device_check_passes_on_the_cpu_and_raises_on_a_faulted_gpu(engine, monkeypatch):
    import torch

    engine.check_health()  # the CPU computes

    def faulted_gpu(*args, **kwargs):
        """A stand-in for torch on a GPU after a fault: CUDA errors are sticky, every later call raises them."""
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch, "ones", faulted_gpu)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        engine.check_health()


def test_one_entry_point_for_txt2img_and_img2img(engine):
    assert not hasattr(ImageEngine, "txt2img") and not hasattr(ImageEngine, "img2img")  # one method, not three
    start = engine.generate(tiny())
    changed = engine.generate(Img2ImgRequest(prompt="a blue fox", image=as_base64_png(start.image), steps=6,
                                             width=64, height=64, seed=5, denoising_strength=0.5))  # fmt: skip
    assert parse_infotext(changed.infotext)["Denoising strength"] == "0.5"
    assert "Denoising strength" not in parse_infotext(start.infotext)
