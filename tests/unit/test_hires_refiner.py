"""Hires fix (latent and external upscalers), the ESRGAN upscaler and the SDXL refiner on the demo models."""

import numpy as np
import pytest
from PIL import Image

from pipelines.errors import InvalidRequestError
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
    result = engine.txt2img(request(height=96, hires=hires), progress=lambda d, t, p: reports.append((d / t, p)))
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
    plain = engine.txt2img(request())
    hires = engine.txt2img(request(hires={"enabled": True, "scale": 2.0, "steps": 6, "denoising_strength": 0.6}))
    resized = plain.image.resize(hires.image.size, Image.Resampling.BILINEAR)
    assert np.abs(pixels(hires.image) - pixels(resized)).mean() > 1.0


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [({"hires": {"enabled": True, "upscaler": "nope"}}, "hires.upscaler", "unknown upscaler 'nope'"),
     ({"hires": {"enabled": True, "scale": 4}, "width": 1024}, "hires.scale", "sides up to 2048 px"),
     ({"hires": {"enabled": True, "steps": 2, "denoising_strength": 0.2}}, "hires.denoising_strength", "at least one"),
     ({"model": "Demo SD1.5", "refiner_checkpoint": "Demo SDXL Refiner"}, "refiner_checkpoint",
      "model 'demo-sd15' is SD1.5"),
     ({"model": "Demo SDXL", "refiner_checkpoint": "Demo SD1.5"}, "refiner_checkpoint", "is not an SDXL refiner"),
     ({"model": "Demo SDXL", "refiner_checkpoint": "Demo SDXL Refiner", "refiner_switch_at": 1.0}, "refiner_switch_at",
      "both need at least one"),
     ({"model": "Demo SDXL", "refiner_checkpoint": "Demo SDXL Refiner", "hires": {"enabled": True}},
      "refiner_checkpoint", "not supported")],
)  # fmt: skip
def test_invalid_hires_and_refiner_requests_are_refused(engine, fields, field, message):
    with pytest.raises((InvalidRequestError, UnknownUpscalerError), match=message) as raised:
        engine.prepare(request(**fields))
    assert raised.value.field == field and 400 <= raised.value.status_code < 500


def test_hires_is_refused_on_img2img(engine):
    start = as_base64_png(engine.txt2img(request()).image)
    with pytest.raises(InvalidRequestError, match="txt2img only"):
        engine.prepare(Img2ImgRequest(prompt="x", image=start, hires={"enabled": True}))


def test_refiner_changes_the_image_and_reports_its_phase(engine):
    base = engine.txt2img(request(model="Demo SDXL", steps=10))
    reports = []
    refined = engine.txt2img(request(model="Demo SDXL", steps=10, refiner_checkpoint="Demo SDXL Refiner"),
                             progress=lambda d, t, p: reports.append((d / t, p)))  # fmt: skip
    assert refined.image.size == (64, 64)
    assert np.abs(pixels(refined.image) - pixels(base.image)).mean() > 0.1
    assert list(dict.fromkeys(phase for _, phase in reports)) == ["generation", "refining"]
    params = parse_infotext(refined.infotext)
    assert params["Refiner"].startswith("demo-sdxl-refiner [") and params["Refiner switch at"] == "0.8"


def test_refiner_on_img2img(engine):
    start = as_base64_png(engine.txt2img(request(model="Demo SDXL")).image)
    fields = {"prompt": "x", "image": start, "model": "Demo SDXL", "steps": 10, "width": 64, "height": 64, "seed": 2,
              "denoising_strength": 0.6}  # fmt: skip
    plain = engine.img2img(Img2ImgRequest(**fields))
    refined = engine.img2img(Img2ImgRequest(**fields, refiner_checkpoint="Demo SDXL Refiner", refiner_switch_at=0.7))
    assert np.abs(pixels(refined.image) - pixels(plain.image)).mean() > 0.1
    assert parse_infotext(refined.infotext)["Refiner switch at"] == "0.7"


def test_tiled_upscaling_matches_one_pass_and_has_the_native_scale(engine):
    image = engine.txt2img(request()).image
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
