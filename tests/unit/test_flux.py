"""FLUX.1 in the engine, on the demo FLUX.1-dev (a diffusers folder) through the real loaders: its image equals
plain diffusers' FluxPipeline on the same weights, prompt and seed; guidance as Forge defines it (cfg_scale 1:
the negative prompt changes nothing; above 1: true CFG, it does; distilled_cfg_scale changes the image); its
flow-matching samplers; img2img and inpainting; batched jobs keep their solo pixels; Forge's infotext read back;
live previews from packed latents; what it cannot run is a clear 4xx."""

import numpy as np
import pytest
import torch

from pipelines.errors import DiffusionAPIError
from pipelines.families import family_of
from pipelines.infotext import parse_infotext
from pipelines.previews import unpack_latents
from pipelines.schemas import Img2ImgRequest, Txt2ImgRequest
from tests.unit.test_controlnet import as_base64, pixels

FLUX = {"prompt": "a lighthouse by the sea", "steps": 4, "width": 64, "height": 64, "seed": 5,
        "model": "Demo FLUX.1-dev", "fileType": "png"}  # fmt: skip


def difference(a, b) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


def test_a_job_gives_the_pixels_of_plain_diffusers_flux_pipeline(engine, settings):
    from diffusers import FluxPipeline

    ours = engine.generate(Txt2ImgRequest(**FLUX))
    pipe = FluxPipeline.from_pretrained(settings.models_dir / "demo-flux-dev", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompt="a lighthouse by the sea", num_inference_steps=4, width=64, height=64, guidance_scale=3.5,
                  generator=torch.Generator("cpu").manual_seed(5)).images[0]  # fmt: skip
    assert np.abs(np.asarray(theirs).astype(int) - pixels(ours)).max() <= 2
    params = parse_infotext(ours.infotext)
    assert params["Sampler"] == "Euler" and params["Schedule type"] == "Simple"
    assert float(params["CFG scale"]) == 1.0 and float(params["Distilled CFG Scale"]) == 3.5
    assert params["Model"] == "demo-flux-dev"
    assert "CFG scale: 1.0, Distilled CFG Scale: 3.5, Seed: 5" in ours.infotext  # Forge's order


def test_cfg_scale_1_ignores_the_negative_prompt_and_true_cfg_uses_it(engine):
    plain = engine.generate(Txt2ImgRequest(**FLUX))
    with_negative = engine.generate(Txt2ImgRequest(**FLUX, negative_prompt="blurry, low quality"))
    assert difference(plain, with_negative) == 0
    assert any("negative_prompt not used" in warning for warning in with_negative.warnings)
    true_cfg = engine.generate(Txt2ImgRequest(**FLUX, cfg_scale=4, negative_prompt="blurry, low quality"))
    true_cfg_other = engine.generate(Txt2ImgRequest(**FLUX, cfg_scale=4, negative_prompt="red"))
    assert difference(true_cfg, plain) > 2 and difference(true_cfg, true_cfg_other) > 2
    assert not any("negative_prompt" in warning for warning in true_cfg.warnings)


def test_distilled_cfg_scale_changes_the_image_on_dev(engine):
    default = engine.generate(Txt2ImgRequest(**FLUX))
    stronger = engine.generate(Txt2ImgRequest(**FLUX, distilled_cfg_scale=6.0))
    assert difference(default, stronger) > 2
    assert parse_infotext(stronger.infotext)["Distilled CFG Scale"] == "6.0"
    same = engine.generate(Txt2ImgRequest(**FLUX, distilled_cfg_scale=3.5))
    assert difference(default, same) == 0


@pytest.mark.parametrize(("sampler", "schedule"), [("DPM++ 2M", None), ("UniPC", None), ("Euler", "Beta")])
def test_the_flow_matching_samplers_run_and_are_named(engine, sampler, schedule):
    result = engine.generate(Txt2ImgRequest(**FLUX, sampler_name=sampler, scheduler_type=schedule))
    params = parse_infotext(result.infotext)
    assert params["Sampler"] == sampler and params["Schedule type"] == (schedule or "Simple")
    assert difference(result, engine.generate(Txt2ImgRequest(**FLUX))) > 0


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [({"sampler_name": "Euler a"}, "sampler_name", "for FLUX.1 models; valid: Euler, DPM++ 2M, UniPC"),
     ({"scheduler_type": "sgm_uniform"}, "scheduler_type", "valid: Automatic, Simple, Karras"),
     ({"width": 72}, "width", "multiple of 16 for FLUX.1"),
     ({"hires": {"enabled": True, "upscaler": "Latent"}}, "hires.upscaler", "latent hires fix cannot run on FLUX.1"),
     ({"controlnet": [{"model": "demo-sd15-canny", "module": "none", "image": "AAAA"}]}, "controlnet[0]", "")],
)  # fmt: skip
def test_what_flux_cannot_run_is_a_4xx_naming_the_field(engine, fields, field, words):
    with pytest.raises(DiffusionAPIError) as raised:
        engine.generate(Txt2ImgRequest(**{**FLUX, **fields}))
    assert raised.value.status_code // 100 == 4 and raised.value.field.startswith(field), raised.value.message
    assert words in raised.value.message


def test_img2img_and_inpainting_keep_what_they_should(engine):
    from PIL import Image

    first = engine.generate(Txt2ImgRequest(**FLUX))
    start = first.image
    redrawn = engine.generate(Img2ImgRequest(**FLUX, image=as_base64(start), denoising_strength=0.5))
    assert redrawn.image.size == (64, 64) and difference(redrawn, first) > 0
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 32))
    inpainted = engine.generate(Img2ImgRequest(**FLUX, image=as_base64(start), mask=as_base64(mask),
                                               denoising_strength=0.9, mask_blur=0))  # fmt: skip
    ours, original = pixels(inpainted), np.asarray(start).astype(int)
    assert np.abs(ours[40:, 40:] - original[40:, 40:]).max() <= 1  # outside the mask: the input's pixels
    assert np.abs(ours[:24, :24] - original[:24, :24]).max() > 2  # inside: repainted


def test_two_jobs_batch_and_keep_their_solo_pixels(engine):
    loaded = engine.load("demo-flux-dev")
    requests = [Txt2ImgRequest(**{**FLUX, "seed": seed, "prompt": prompt})
                for seed, prompt in ((7, "a red house"), (8, "a cat in the snow"))]  # fmt: skip
    jobs = [engine.prepare(request, loaded.entry) for request in requests]
    assert jobs[0].batch_key() == jobs[1].batch_key()
    batched = engine.run(loaded, jobs)
    assert [result.batch_size for result in batched] == [2, 2]
    for request, result in zip(requests, batched, strict=True):
        assert difference(result, engine.generate(request)) <= 2


def test_previews_unpack_the_transformers_tokens_as_diffusers_does(engine):
    from diffusers import FluxPipeline

    latents = torch.randn(1, 16, 8, 12)
    packed = FluxPipeline._pack_latents(latents, 1, 16, 8, 12)
    assert torch.equal(unpack_latents(packed[0], height=64, width=96), latents[0])
    assert torch.equal(FluxPipeline._unpack_latents(packed, 64, 96, 8)[0], latents[0])
    previews: list[str] = []
    from pipelines.previews import PREVIEW_SINK

    token = PREVIEW_SINK.set(lambda job_id, jpeg: previews.append(jpeg))
    try:
        loaded = engine.load("demo-flux-dev")
        job = engine.prepare(Txt2ImgRequest(**{**FLUX, "steps": 8, "preview": True}), loaded.entry)
        job.job_id = "preview-job"
        import pipelines.generate

        interval, pipelines.generate.PREVIEW_INTERVAL_S = pipelines.generate.PREVIEW_INTERVAL_S, 0.0
        try:
            engine.run(loaded, [job])
        finally:
            pipelines.generate.PREVIEW_INTERVAL_S = interval
    finally:
        PREVIEW_SINK.reset(token)
    assert previews  # 8x8 JPEGs, one pixel per latent
    assert family_of("flux").latent_layout == "packed" and len(family_of("flux").latent_rgb) == 16


def test_hires_fix_with_an_image_upscaler_runs_both_passes(engine):
    result = engine.generate(Txt2ImgRequest(**FLUX, hires={"enabled": True, "upscaler": "Lanczos", "scale": 2.0,
                                                           "steps": 2, "denoising_strength": 0.5}))  # fmt: skip
    assert result.image.size == (128, 128)
    params = parse_infotext(result.infotext)
    assert params["Hires upscaler"] == "Lanczos" and params["Distilled CFG Scale"] == "3.5"


@pytest.mark.parametrize("lora", ["demo-flux-peft", "demo-flux-kohya"])
def test_a_flux_lora_changes_the_image_and_scale_zero_does_not(engine, lora):
    """diffusers/peft keys and kohya's FLUX keys; the model is as loaded after the job."""
    plain = engine.generate(Txt2ImgRequest(**FLUX))
    styled = engine.generate(Txt2ImgRequest(**FLUX, loras=[lora]))
    assert difference(styled, plain) > 2 and not styled.warnings
    assert parse_infotext(styled.infotext)["Lora hashes"].startswith(f"{lora}: ")
    assert difference(engine.generate(Txt2ImgRequest(**FLUX, loras=[{"name": lora, "scale": 0}])), plain) == 0
    assert difference(engine.generate(Txt2ImgRequest(**FLUX)), plain) == 0


def test_loras_of_another_family_are_skipped_with_a_warning_naming_both(engine):
    result = engine.generate(Txt2ImgRequest(**FLUX, loras=["demo-sd15-kohya", "demo-sd35-peft"]))
    assert "'demo-sd15-kohya' is an SD1.5 LoRA; model 'demo-flux-dev' is FLUX.1" in " ".join(result.warnings)
    assert "'demo-sd35-peft' is an SD 3.5 LoRA; model 'demo-flux-dev' is FLUX.1" in " ".join(result.warnings)
    sd15 = engine.generate(Txt2ImgRequest(**{**FLUX, "model": "demo-sd15", "width": 64}, loras=["demo-flux-peft"]))
    assert "'demo-flux-peft' is a FLUX.1 LoRA; model 'demo-sd15' is SD1.5: use it with a FLUX.1 model" in (
        " ".join(sd15.warnings)
    )


def test_schnell_has_no_guidance_embedding_so_distilled_cfg_scale_does_nothing(settings, tmp_path):
    """dev and schnell are told apart by the transformer's config, not the name."""
    from pipelines.catalog import ModelCatalog
    from pipelines.demo_flow import build_flux
    from pipelines.generate import ImageEngine

    models = tmp_path / "models"
    build_flux(tmp_path / "work", guidance=False).save_pretrained(models / "my-flux-fine-tune")
    engine = ImageEngine(ModelCatalog(settings.model_copy(update={"models_dir": models})), device="cpu")
    fields = {**FLUX, "model": "my-flux-fine-tune"}
    default = engine.generate(Txt2ImgRequest(**fields))
    assert difference(default, engine.generate(Txt2ImgRequest(**fields, distilled_cfg_scale=7))) == 0
    assert "Distilled CFG Scale" not in parse_infotext(default.infotext)
    assert engine.catalog.resolve("my-flux-fine-tune").family == "flux"


def test_what_a1111_syntax_flux_does_not_run_is_said_and_not_written(engine):
    """BREAK leaves a space, emphasis is removed, clip skip is not applied: each says so, none is in the
    infotext as if it had run."""
    joined = engine.generate(Txt2ImgRequest(**{**FLUX, "prompt": "a red house BREAK a cat"}, clip_skip=2))
    spaced = engine.generate(Txt2ImgRequest(**{**FLUX, "prompt": "a red house   a cat"}))
    assert difference(joined, spaced) == 0  # not "a red housea cat"
    assert any("emphasis and BREAK are not applied on FLUX.1" in warning for warning in joined.warnings)
    assert any("clip_skip is not applied on FLUX.1" in warning for warning in joined.warnings)
    assert "Clip skip" not in joined.infotext


def test_hires_sizes_are_fitted_to_16_and_a_vae_of_another_family_is_a_422(engine):
    result = engine.generate(Txt2ImgRequest(**FLUX, hires={"enabled": True, "upscaler": "Lanczos", "scale": 1.1,
                                                           "steps": 2}))  # fmt: skip
    assert result.image.size == (64, 64) and any("hires size 72x72 made 64x64" in w for w in result.warnings)
    with pytest.raises(DiffusionAPIError) as raised:
        engine.generate(Txt2ImgRequest(**FLUX, vae="demo-vae-ft"))
    assert raised.value.status_code == 422 and raised.value.field == "vae"
    assert "4 latent channels and FLUX.1 models 16" in raised.value.message


def test_a_sharded_transformer_is_hashed_and_listed(settings, tmp_path):
    """FLUX.1-dev and SD 3.5 Large ship their transformers in shards."""
    import shutil

    from pipelines.catalog import ModelCatalog

    models = tmp_path / "models"
    shutil.copytree(settings.models_dir / "demo-flux-dev", models / "sharded-flux")
    transformer = models / "sharded-flux" / "transformer"
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(transformer)
    (transformer / "diffusion_pytorch_model.safetensors").unlink()
    model.save_pretrained(transformer, max_shard_size="20KB")
    assert len(list(transformer.glob("diffusion_pytorch_model-*.safetensors"))) > 1
    catalog = ModelCatalog(settings.model_copy(update={"models_dir": models}))
    entry = catalog.resolve("sharded-flux")
    assert entry.hash_file.name.startswith("diffusion_pytorch_model-00001-of-")
    assert len(catalog.model_hash(entry)) == 10
