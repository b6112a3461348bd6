"""SD 3.5 in the engine, on the demo SD 3.5 (a diffusers folder) through the real loaders: its image equals plain
diffusers' StableDiffusion3Pipeline on the same weights, prompt and seed; ordinary CFG with the negative prompt;
its flow-matching samplers (Heun included); a folder without the T5 encoder runs as diffusers runs it; batched
jobs keep their solo pixels; live previews of its 16 latent channels."""

import shutil

import numpy as np
import pytest
import torch

from pipelines.catalog import ModelCatalog
from pipelines.generate import ImageEngine
from pipelines.infotext import parse_infotext
from pipelines.schemas import Txt2ImgRequest
from tests.unit.test_controlnet import pixels

SD35 = {"prompt": "a lighthouse by the sea", "negative_prompt": "blurry", "steps": 4, "width": 64, "height": 64,
        "seed": 5, "model": "Demo SD 3.5", "fileType": "png"}  # fmt: skip


def difference(a, b) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


def plain_pipeline(folder, **components):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_a_job_gives_the_pixels_of_plain_diffusers_sd3_pipeline(engine, settings):
    ours = engine.generate(Txt2ImgRequest(**SD35))
    theirs = plain_pipeline(settings.models_dir / "demo-sd35")(
        prompt="a lighthouse by the sea", negative_prompt="blurry", num_inference_steps=4, width=64, height=64,
        guidance_scale=4.5, generator=torch.Generator("cpu").manual_seed(5),
    ).images[0]  # fmt: skip
    assert np.abs(np.asarray(theirs).astype(int) - pixels(ours)).max() <= 2
    params = parse_infotext(ours.infotext)
    assert (params["Sampler"], params["Schedule type"], params["CFG scale"]) == ("Euler", "Simple", "4.5")
    assert "Distilled CFG Scale" not in params


def test_the_negative_prompt_and_cfg_scale_change_the_image(engine):
    default = engine.generate(Txt2ImgRequest(**SD35))
    assert difference(default, engine.generate(Txt2ImgRequest(**{**SD35, "negative_prompt": "red"}))) > 2
    assert difference(default, engine.generate(Txt2ImgRequest(**SD35, cfg_scale=7))) > 2


@pytest.mark.parametrize("sampler", ["Heun", "DPM++ 2M", "UniPC"])
def test_its_samplers_run(engine, sampler):
    result = engine.generate(Txt2ImgRequest(**SD35, sampler_name=sampler))
    assert parse_infotext(result.infotext)["Sampler"] == sampler


def test_a_folder_without_t5_runs_as_diffusers_runs_it(settings, tmp_path):
    models = tmp_path / "models"
    folder = models / "sd35-no-t5"
    shutil.copytree(settings.models_dir / "demo-sd35", folder)
    shutil.rmtree(folder / "text_encoder_3")  # as users drop the 9 GB T5-XXL; model_index.json still names it
    shutil.rmtree(folder / "tokenizer_3")
    engine = ImageEngine(ModelCatalog(settings.model_copy(update={"models_dir": models})), device="cpu")
    ours = engine.generate(Txt2ImgRequest(**{**SD35, "model": "sd35-no-t5"}))
    theirs = plain_pipeline(settings.models_dir / "demo-sd35", text_encoder_3=None, tokenizer_3=None)(
        prompt="a lighthouse by the sea", negative_prompt="blurry", num_inference_steps=4, width=64, height=64,
        guidance_scale=4.5, generator=torch.Generator("cpu").manual_seed(5),
    ).images[0]  # fmt: skip
    assert np.abs(np.asarray(theirs).astype(int) - pixels(ours)).max() <= 2


def test_two_jobs_batch_and_keep_their_solo_pixels(engine):
    loaded = engine.load("demo-sd35")
    requests = [Txt2ImgRequest(**{**SD35, "seed": seed, "prompt": prompt})
                for seed, prompt in ((7, "a red house"), (8, "a cat in the snow"))]  # fmt: skip
    batched = engine.run(loaded, [engine.prepare(request, loaded.entry) for request in requests])
    assert [result.batch_size for result in batched] == [2, 2]
    for request, result in zip(requests, batched, strict=True):
        assert difference(result, engine.generate(request)) <= 2


def test_previews_read_its_16_latent_channels(engine):
    import pipelines.generate
    from pipelines.previews import PREVIEW_SINK

    previews: list[str] = []
    token = PREVIEW_SINK.set(lambda job_id, jpeg: previews.append(jpeg))
    interval, pipelines.generate.PREVIEW_INTERVAL_S = pipelines.generate.PREVIEW_INTERVAL_S, 0.0
    try:
        loaded = engine.load("demo-sd35")
        job = engine.prepare(Txt2ImgRequest(**{**SD35, "preview": True}), loaded.entry)
        job.job_id = "preview-job"
        engine.run(loaded, [job])
    finally:
        pipelines.generate.PREVIEW_INTERVAL_S = interval
        PREVIEW_SINK.reset(token)
    assert len(previews) >= 3


def test_an_sd35_lora_changes_the_image_and_scale_zero_does_not(engine):
    plain = engine.generate(Txt2ImgRequest(**SD35))
    styled = engine.generate(Txt2ImgRequest(**SD35, loras=["demo-sd35-peft"]))
    assert difference(styled, plain) > 2 and not styled.warnings
    assert difference(engine.generate(Txt2ImgRequest(**SD35, loras=[{"name": "demo-sd35-peft", "scale": 0}])),
                      plain) == 0  # fmt: skip


def test_its_multistep_solvers_run_on_the_models_shift(engine):
    """DPM++ 2M and UniPC name the flow shift `flow_shift`; SD 3.5's scheduler config says `shift: 3.0`."""
    from pipelines.families import family_of
    from pipelines.samplers import build_scheduler, resolve_sampler

    loaded = engine.load("demo-sd35")
    for sampler in ("DPM++ 2M", "UniPC"):
        scheduler = build_scheduler(resolve_sampler(sampler, None, family_of("sd3")), loaded.scheduler_config)
        assert scheduler.config.flow_shift == 3.0
        scheduler.set_timesteps(10)
        euler = build_scheduler(resolve_sampler("Euler", None, family_of("sd3")), loaded.scheduler_config)
        euler.set_timesteps(10)
        assert abs(float(scheduler.sigmas[1]) - float(euler.sigmas[1])) < 0.02  # both shifted: 0.96, not 0.9
