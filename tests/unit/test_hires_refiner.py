"""Hires fix (latent and external upscalers), the ESRGAN upscaler and the SDXL refiner on the demo models."""

import numpy as np
import pytest
from PIL import Image

from pipelines.errors import UnknownModelError
from pipelines.infotext import parse_infotext
from pipelines.schemas import Img2ImgRequest, Txt2ImgRequest
from pipelines.upscalers import LATENT_MODES, UnknownUpscalerError, hires_size, run_tiled
from tests.unit.test_cli import run_cli
from tests.unit.test_generate import as_base64_png


def request(**fields) -> Txt2ImgRequest:
    base = {"prompt": "a castle on a hill", "steps": 6, "width": 64, "height": 64, "seed": 31}
    return Txt2ImgRequest(**{**base, **fields})


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.float64)


@pytest.mark.parametrize(
    ("scale", "upscaler", "size"),
    [(2.0, "Latent", (128, 192)), (1.5, "Latent (nearest)", (96, 144)), (2.0, "demo-esrgan-x4", (128, 192))],
)
def test_hires_fix_final_size_phases_and_infotext(engine, scale, upscaler, size):
    reports = []
    hires = {"enabled": True, "scale": scale, "upscaler": upscaler, "steps": 6, "denoising_strength": 0.5}
    result = engine.generate(request(height=96, hires=hires), progress=lambda d, t, p: reports.append((d / t, p)))
    assert result.image.size == size == (result.width, result.height)
    phases = list(dict.fromkeys(phase for _, phase in reports))
    assert phases == ["initial generation", "upscaling", "hires pass"]
    values = [value for value, _ in reports]
    assert values == sorted(values) and values[-1] == 1.0
    params = parse_infotext(result.infotext)
    assert params["Size-1"] == "64" and params["Size-2"] == "96"  # the first-pass size, as A1111 writes it
    hires_params = (params["Hires upscale"], params["Hires steps"], params["Hires upscaler"])
    assert hires_params == (f"{scale:g}", "6", upscaler)
    assert params["Denoising strength"] == "0.5"


def test_hires_second_pass_changes_the_upscaled_first_pass(engine):
    plain = engine.generate(request())
    hires = engine.generate(request(hires={"enabled": True, "scale": 2.0, "steps": 6, "denoising_strength": 0.6}))
    resized = plain.image.resize(hires.image.size, Image.Resampling.BILINEAR)
    assert np.abs(pixels(hires.image) - pixels(resized)).mean() > 1.0


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [({"hires": {"enabled": True, "upscaler": "nope"}}, "hires.upscaler", "unknown upscaler 'nope'"),
     ({"model": "Demo SDXL", "refiner_checkpoint": "Demo SD1.5"}, "refiner_checkpoint", "is not an SDXL refiner")],
)  # fmt: skip
def test_unknown_upscalers_and_refiners_are_404(engine, fields, field, message):
    with pytest.raises((UnknownModelError, UnknownUpscalerError), match=message) as raised:
        engine.prepare(request(**fields))
    assert raised.value.field == field and raised.value.status_code == 404


def test_hires_beyond_the_size_limits_is_fitted_with_a_warning(engine):
    job = engine.prepare(request(width=1024, height=512, hires={"enabled": True, "scale": 4}))
    assert (job.hires.width, job.hires.height, job.hires.scale) == (2048, 1024, 2.0)
    assert any("4x would make 4096x2048" in warning and "2048x1024 instead" in warning for warning in job.warnings)


def test_hires_with_less_than_one_step_runs_one_step(engine):
    hires = {"enabled": True, "scale": 1.5, "steps": 2, "denoising_strength": 0.2}
    steps_run = []
    result = engine.generate(request(hires=hires), progress=lambda done, total, phase: steps_run.append(phase))
    assert steps_run.count("hires pass") == 1
    assert any("hires.steps x hires.denoising_strength = 2 x 0.2" in warning for warning in result.warnings)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [({"model": "Demo SD1.5"}, "'demo-sd15' is SD1.5"),
     ({"model": "Demo SDXL", "steps": 1}, "both need at least one"),
     ({"model": "Demo SDXL", "hires": {"enabled": True}}, "the job ran with hires fix")],
)  # fmt: skip
def test_a_refiner_that_cannot_take_part_is_left_out_with_a_warning(engine, fields, reason):
    job = engine.prepare(request(refiner_checkpoint="Demo SDXL Refiner", **fields))
    assert job.refiner is None
    assert any(warning.startswith("refiner 'demo-sdxl-refiner' not used") and reason in warning
               for warning in job.warnings)  # fmt: skip


def test_hires_is_not_a_field_of_img2img(engine):
    start = as_base64_png(engine.generate(request()).image)
    img2img = Img2ImgRequest(prompt="x", image=start, hires={"enabled": True}, steps=4, width=64, height=64)
    assert img2img.unknown_fields() == ["hires"]
    assert engine.prepare(img2img).hires is None
    assert "hires" not in Img2ImgRequest.model_json_schema()["properties"]


def test_refiner_changes_the_image_and_reports_its_phase(engine):
    base = engine.generate(request(model="Demo SDXL", steps=10))
    reports = []
    refined = engine.generate(request(model="Demo SDXL", steps=10, refiner_checkpoint="Demo SDXL Refiner"),
                              progress=lambda d, t, p: reports.append((d / t, p)))  # fmt: skip
    assert refined.image.size == (64, 64)
    assert np.abs(pixels(refined.image) - pixels(base.image)).mean() > 0.1
    assert list(dict.fromkeys(phase for _, phase in reports)) == ["generation", "refining"]
    params = parse_infotext(refined.infotext)
    assert params["Refiner"].startswith("demo-sdxl-refiner [") and params["Refiner switch at"] == "0.8"


def test_refiner_on_img2img(engine):
    start = as_base64_png(engine.generate(request(model="Demo SDXL")).image)
    fields = {"prompt": "x", "image": start, "model": "Demo SDXL", "steps": 10, "width": 64, "height": 64, "seed": 2,
              "denoising_strength": 0.6}  # fmt: skip
    plain = engine.generate(Img2ImgRequest(**fields))
    refined = engine.generate(Img2ImgRequest(**fields, refiner_checkpoint="Demo SDXL Refiner", refiner_switch_at=0.7))
    assert np.abs(pixels(refined.image) - pixels(plain.image)).mean() > 0.1
    assert parse_infotext(refined.infotext)["Refiner switch at"] == "0.7"


def test_tiled_upscaling_matches_one_pass_and_has_the_native_scale(engine):
    image = engine.generate(request()).image
    model = engine.upscalers.load("demo-esrgan-x4")
    whole = run_tiled(model, image, tile=1024, device=engine.device)
    tiled = run_tiled(model, image, tile=40, device=engine.device)  # 8 px tiles + 16 px margins
    assert whole.size == tiled.size == (256, 256)
    assert np.abs(pixels(whole) - pixels(tiled)).mean() < 1.0
    # The demo model is close to a nearest-neighbour x4: the result resembles its input.
    nearest = image.resize((256, 256), Image.Resampling.NEAREST)
    assert np.abs(pixels(whole) - pixels(nearest)).mean() < 10


def test_latent_modes_and_sizes():
    assert list(LATENT_MODES)[0] == "Latent" and "Latent (bicubic antialiased)" in LATENT_MODES
    assert hires_size(64, 96, 1.5) == (96, 144) and hires_size(100, 60, 1.3) == (128, 80)


def test_upscale_command(env_settings, capsys, tmp_path):
    source = tmp_path / "in.png"
    Image.new("RGB", (40, 30), (200, 40, 40)).save(source)
    output = tmp_path / "out.webp"
    code, out, err = run_cli(capsys, "upscale", str(source), "--upscaler", "demo-esrgan-x4", "--scale", "2",
                             "--output", str(output))  # fmt: skip
    assert code == 0, err
    with Image.open(output) as result:
        assert result.size == (80, 60) and result.format == "WEBP"
        assert abs(np.asarray(result.convert("RGB")).astype(int)[30, 40] - [200, 40, 40]).max() < 30
    code, _, err = run_cli(capsys, "upscale", str(source), "--upscaler", "nope", "--output", str(output))
    assert code == 2 and "unknown upscaler 'nope'" in err


@pytest.mark.parametrize("hop", ["Refiner deployment", "in process"])
def test_the_refiners_warnings_and_embeddings_reach_the_job(settings, tmp_path, hop):
    """The refiner's part of a job runs in the Refiner deployment: what it adds (an embedding it could not load,
    the embeddings it used) comes back with its images. When the refiner's node has lost its copy of the
    embedding the base used, the job says so, and its infotext still lists the embedding (the base used it)."""
    import pickle
    import shutil

    from pipelines.catalog import ModelCatalog
    from pipelines.demo import DEMO_SDXL_EMBEDDING
    from pipelines.generate import ImageEngine
    from pipelines.progress import PHASE_REFINING

    shutil.copy(settings.embeddings_dir / DEMO_SDXL_EMBEDDING, tmp_path)
    engine = ImageEngine(ModelCatalog(settings.model_copy(update={"embeddings_dir": tmp_path})), device="cpu")
    embedding, elsewhere = tmp_path / DEMO_SDXL_EMBEDDING, tmp_path / "elsewhere"
    refined = []

    def refiner(lost_file: bool):
        """A stand-in for the Refiner deployment (on a node without the embedding file when `lost_file`):
        the jobs and latents cross to it pickled, as through a Serve handle, and its result comes back so."""

        def refine(model, jobs, latents, phases):
            if lost_file:
                embedding.rename(elsewhere)
            try:
                if hop == "in process":
                    result = engine._refine_here(model, jobs, latents, phases)
                else:
                    jobs, latents = pickle.loads(pickle.dumps((jobs, latents)))
                    result = engine.refine(engine.load(model), jobs, latents, phases.step(PHASE_REFINING))
                    result = pickle.loads(pickle.dumps(result))
            finally:
                if lost_file:
                    elsewhere.rename(embedding)
            refined.append(result)
            return result

        return refine

    fields = {"model": "Demo SDXL", "prompt": "a castle, demo-xl-style", "refiner_checkpoint": "Demo SDXL Refiner"}
    loaded = engine.load("Demo SDXL")
    job = engine.prepare(request(**fields), loaded.entry)
    ti_hashes = f"demo-xl-style: {engine.embeddings.short_hash(job.embeddings[0])}"
    lost = engine.run(loaded, [job], refine=refiner(lost_file=True))[0]
    [skipped] = refined[0].warnings[0]
    assert skipped.startswith("embedding 'demo-xl-style' was skipped") and refined[0].ti_hashes == [{}]
    assert skipped in lost.warnings
    assert parse_infotext(lost.infotext)["TI hashes"] == ti_hashes

    both = engine.run(loaded, [engine.prepare(request(**fields), loaded.entry)], refine=refiner(lost_file=False))[0]
    assert refined[1].ti_hashes == [{"demo-xl-style": ti_hashes.split(": ")[1]}] and refined[1].warnings == [[]]
    assert not any("embedding" in warning for warning in both.warnings)
    assert parse_infotext(both.infotext)["TI hashes"] == ti_hashes  # named once


def test_the_infotext_lists_the_refiners_embeddings_after_the_bases(engine):
    loaded = engine.load("Demo SDXL")
    job = engine.prepare(request(model="Demo SDXL", prompt="a castle, demo-xl-style"), loaded.entry)
    own = engine.embeddings.short_hash(job.embeddings[0])
    text = engine.infotext(loaded, job, {"refiner-only": "0123456789ab", "demo-xl-style": own})
    assert parse_infotext(text)["TI hashes"] == f"demo-xl-style: {own}, refiner-only: 0123456789ab"
