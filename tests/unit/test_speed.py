"""The engine's speed options change how fast an image is made, not which image: each option on the demo
models gives the default engine's pixels, LoRAs still apply with fused QKV projections, and warm-up loads."""

import numpy as np
import pytest

from pipelines.generate import ImageEngine
from pipelines.schemas import Txt2ImgRequest
from pipelines.speed import SpeedOptions


def tiny(**fields) -> Txt2ImgRequest:
    base = {"prompt": "a red fox in the snow", "steps": 6, "width": 64, "height": 64, "seed": 77}
    return Txt2ImgRequest(**{**base, **fields})


def pixels(result) -> np.ndarray:
    return np.asarray(result.image).astype(np.float64)


@pytest.mark.parametrize(
    ("options", "applied"),
    [({"channels_last": True}, "channels_last"), ({"fuse_qkv": True}, "fused QKV"),
     ({"attention": "eager"}, "eager attention"), ({"vae_tiling": "always"}, None), ({"vae_slicing": False}, None)],
)  # fmt: skip
def test_each_speed_option_gives_the_default_pixels(catalog, engine, options, applied):
    fast = ImageEngine(catalog, device="cpu", speed=SpeedOptions(**options))
    for model in ("Demo SD1.5", "Demo SDXL"):
        assert (
            np.abs(pixels(fast.generate(tiny(model=model))) - pixels(engine.generate(tiny(model=model)))).mean() <= 1.0
        )
    if applied:  # load-time options are reported (VAE tiling is chosen per call, by output size)
        assert applied in fast.load("Demo SD1.5").speed


def test_loras_apply_with_fused_qkv_and_leave_no_trace(catalog, engine):
    fused = ImageEngine(catalog, device="cpu", speed=SpeedOptions(fuse_qkv=True))
    with_lora = tiny(loras=["demo-sd15-peft"])
    assert "fused QKV" in fused.load("Demo SD1.5").speed
    assert np.abs(pixels(fused.generate(with_lora)) - pixels(engine.generate(with_lora))).mean() <= 1.0
    assert np.abs(pixels(fused.generate(tiny())) - pixels(engine.generate(tiny()))).mean() <= 1.0


def test_speed_options_come_from_the_environment_and_arguments_win(monkeypatch):
    monkeypatch.setenv("DIFFUSION_API_CHANNELS_LAST", "1")
    monkeypatch.setenv("DIFFUSION_API_VAE_TILING", "always")
    options = SpeedOptions.from_env({"vae_tiling": "never"})
    assert options.channels_last and options.vae_tiling == "never" and not options.compile


def test_warm_up_loads_the_model_and_runs_each_batch_size(catalog):
    warm = ImageEngine(catalog, device="cpu")
    assert warm.warm_up("Demo SDXL Refiner", 64, 64, 2, [1, 2]) > 0  # a refiner warms up with img2img
    assert warm.loaded_models() == ["demo-sdxl-refiner"]
