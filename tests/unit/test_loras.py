"""LoRAs on the demo models: discovery, family detection, the pre-job check, applying them per job with no
leak into the next job, and the compatibility report. Everything loads through diffusers' real LoRA loader."""

import datetime

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pipelines.demo import build_sdxl_base, peft_lora
from pipelines.errors import InvalidNameError
from pipelines.infotext import parse_infotext
from pipelines.lora_check import check_all, format_report
from pipelines.loras import (
    UnknownLoraError,
    UnreadableLoraError,
    detect_lora_family,
    lora_short_hash,
    parse_prompt_loras,
)
from pipelines.prepare import prepare_job
from pipelines.schemas import Img2ImgRequest, Txt2ImgRequest
from tests.unit.test_generate import as_base64_png

SD15_LORAS = ["demo-sd15-kohya", "demo-sd15-peft", "demo-sd15-unet-only"]
FLOW_LORAS = ("demo-flux-peft", "demo-flux-kohya", "demo-sd35-peft")  # FLUX.1 and SD 3.5: not for these


def request(**fields) -> Txt2ImgRequest:
    base = {"prompt": "a lighthouse at dusk", "steps": 6, "width": 64, "height": 64, "seed": 77}
    return Txt2ImgRequest(**{**base, **fields})


def pixels(result) -> np.ndarray:
    return np.asarray(result.image).astype(np.int16)


# Files -----------------------------------------------------------------------------------------------------
def test_demo_loras_are_listed_with_their_family(engine):
    found = {lora.name: lora.family for lora in engine.loras.available()}
    assert found == {"demo-sd15-kohya": "sd15", "demo-sd15-peft": "sd15", "demo-sd15-unet-only": "sd15",
                     "demo-sdxl-peft": "sdxl", "demo-flux-peft": "flux", "demo-flux-kohya": "flux",
                     "demo-sd35-peft": "sd3"}  # fmt: skip


def test_names_resolve_with_or_without_extension_and_never_outside_the_folder(engine):
    library = engine.loras
    assert library.resolve("demo-sd15-kohya.safetensors").name == "demo-sd15-kohya"
    assert library.resolve("DEMO-SD15-PEFT").name == "demo-sd15-peft"
    assert library.resolve("demo-sd15-unet-only.pt").path.suffix == ".pt"
    with pytest.raises(UnknownLoraError, match="installed LoRAs: 'demo-flux-kohya', .*'demo-sd15-kohya'") as raised:
        library.resolve("missing")
    assert raised.value.status_code == 404 and raised.value.field == "loras"
    for bad in ("../demo-sd15-kohya", "/etc/passwd", "a\x00b"):
        with pytest.raises(InvalidNameError):
            library.resolve(bad)


def test_family_comes_from_metadata_names_or_cross_attention_width():
    down = lambda width: torch.zeros(4, width)  # noqa: E731
    key = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"
    assert detect_lora_family({key: down(768)}, {}) == "sd15"
    assert detect_lora_family({key: down(2048)}, {}) == "sdxl"
    assert detect_lora_family({key: down(1024)}, {}) == "sd2"
    assert detect_lora_family({"lora_te2_x.lora_down.weight": down(8)}, {}) == "sdxl"
    assert detect_lora_family({"x": down(8)}, {"ss_base_model_version": "sdxl_base_v1-0"}) == "sdxl"
    assert detect_lora_family({"unet.x.lora_A.weight": down(8)}, {}) == "unknown"


def test_short_hash_ignores_the_header_as_a1111_does(tmp_path, settings):
    tensors = load_file(settings.loras_dir / "demo-sd15-peft.safetensors")
    save_file(tensors, tmp_path / "a.safetensors", metadata={"note": "one"})
    save_file(tensors, tmp_path / "b.safetensors", metadata={"note": "a different, longer header"})
    tensors[next(iter(tensors))] = tensors[next(iter(tensors))] + 1
    save_file(tensors, tmp_path / "c.safetensors", metadata={"note": "one"})
    hashes = [lora_short_hash(tmp_path / f"{name}.safetensors") for name in "abc"]
    assert hashes[0] == hashes[1] != hashes[2] and len(hashes[0]) == 12


def test_prompt_tags_are_removed_and_parsed():
    clean, tags, warnings = parse_prompt_loras("a cat, <lora:ink:0.6>, sitting <lora:demo-sd15-kohya>")
    assert clean == "a cat, sitting" and tags == [("ink", 0.6), ("demo-sd15-kohya", 1.0)] and warnings == []


def test_prompt_tags_that_cannot_be_used_are_skipped_with_a_warning():
    clean, tags, warnings = parse_prompt_loras("a cat <lora:ink:strong> <lora:ink:0.5:1.0> <lora:ink:9> <lora:ink:nan>")
    assert clean == "a cat" and tags == [("ink", 4.0)]
    assert warnings == [
        "prompt tag '<lora:ink:0.5:1.0>' skipped: separate text-encoder/UNet weights are not supported; write "
        "<lora:name:weight>",
        "prompt tag '<lora:ink:strong>' skipped: the weight must be a number, as in <lora:ink:0.8>",
        "prompt tag '<lora:ink:9>': the weight is limited to +/-4; used 4",
        "prompt tag '<lora:ink:nan>' skipped: the weight must be a number, as in <lora:ink:0.8>",
    ]


# The pre-job plan ----------------------------------------------------------------------------------------
def test_unknown_lora_fails_before_any_model_work(engine, catalog):
    with pytest.raises(UnknownLoraError, match="'nope'"):
        prepare_job(request(loras=["nope"]), catalog.resolve("Demo SD1.5"), engine.loras)


def test_a_lora_given_twice_is_used_once_with_a_warning(engine, catalog):
    job = prepare_job(request(prompt="x <lora:demo-sd15-peft:0.5>", loras=[{"name": "demo-sd15-peft", "scale": 0.8}]),
                      catalog.resolve("Demo SD1.5"), engine.loras)  # fmt: skip
    assert [(use.lora.name, use.scale) for use in job.loras] == [("demo-sd15-peft", 0.8)]
    assert job.warnings == ["LoRA 'demo-sd15-peft' is given more than once; used once, at its first scale (0.8)"]


def test_lora_of_an_unknown_family_is_checked_against_the_model_layers(tmp_path, settings, engine, catalog):
    # UNet-only peft weights cut for the demo SDXL UNet: no family hint in the file, only the shapes tell.
    state = {k: v for k, v in peft_lora(build_sdxl_base(tmp_path), seed=9).items() if k.startswith("unet.")}
    path = settings.loras_dir / "mystery.safetensors"
    save_file(state, path)
    try:
        assert engine.loras.resolve("mystery").family == "unknown"
        # Preparing (the ingress's side) knows only the family: it keeps the LoRA; the engine checks the layers.
        job = prepare_job(request(loras=["mystery"]), catalog.resolve("Demo SD1.5"), engine.loras)
        assert [use.lora.name for use in job.loras] == ["mystery"] and job.warnings == []
        result = engine.generate(request(loras=["mystery"]))
        (warning,) = [w for w in result.warnings if "mystery" in w]
        assert warning.startswith("LoRA skipped: 'mystery'") and "another architecture" in warning
        assert "Lora hashes" not in result.infotext
        sdxl = engine.generate(request(model="Demo SDXL", loras=["mystery"]))
        assert not [w for w in sdxl.warnings if "mystery" in w] and "mystery" in sdxl.infotext
    finally:
        path.unlink()


def test_an_unreadable_lora_is_refused_before_the_job_and_skipped_if_it_breaks_after(settings, engine, catalog):
    """Not a tensor file: a 422 naming it when the job is prepared (read without torch). A file that breaks
    between submission and run is skipped by the engine with a warning; the job still runs."""
    path = settings.loras_dir / "broken.safetensors"
    path.write_bytes(b"not a safetensors file")
    try:
        with pytest.raises(UnreadableLoraError, match="'broken.safetensors' could not be read") as refused:
            prepare_job(request(loras=["broken"]), catalog.resolve("Demo SD1.5"), engine.loras)
        assert refused.value.status_code == 422 and refused.value.field == "loras"
        good = settings.loras_dir / "breaks-later.safetensors"
        save_file(load_file(settings.loras_dir / "demo-sd15-peft.safetensors"), good)
        job = prepare_job(request(loras=["breaks-later"]), catalog.resolve("Demo SD1.5"), engine.loras)
        good.write_bytes(b"broken since")
        loaded = engine.load("Demo SD1.5")
        (result,) = engine.run(loaded, [job])
        assert any(w.startswith("LoRA skipped:") and "breaks-later" in w for w in result.warnings)
        assert "Lora hashes" not in result.infotext
    finally:
        path.unlink(missing_ok=True)
        (settings.loras_dir / "breaks-later.safetensors").unlink(missing_ok=True)


# Applying them ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("model", "lora"), [*[("Demo SD1.5", name) for name in SD15_LORAS],
                                             ("Demo SDXL", "demo-sdxl-peft")])  # fmt: skip
def test_compatible_lora_changes_the_image_and_is_written_to_infotext(engine, model, lora):
    base = engine.generate(request(model=model))
    with_lora = engine.generate(request(model=model, loras=[{"name": lora, "scale": 0.8}]))
    assert np.abs(pixels(with_lora) - pixels(base)).mean() > 1.0
    assert with_lora.warnings == []
    params = parse_infotext(with_lora.infotext)
    short_hash = engine.loras.short_hash(engine.loras.resolve(lora))
    assert params["Lora hashes"] == f"{lora}: {short_hash}"
    assert params["Prompt"] == f"a lighthouse at dusk <lora:{lora}:0.8>"


def test_scale_zero_equals_no_lora(engine):
    base = engine.generate(request())
    zero = engine.generate(request(loras=[{"name": "demo-sd15-kohya", "scale": 0.0}]))
    assert np.array_equal(pixels(base), pixels(zero))


def test_bare_name_object_and_prompt_tag_give_the_same_image(engine):
    bare = engine.generate(request(loras=["demo-sd15-peft"]))
    as_object = engine.generate(request(loras=[{"name": "demo-sd15-peft", "scale": 1.0}]))
    tagged = engine.generate(request(prompt="a lighthouse at dusk <lora:demo-sd15-peft:1>"))
    assert np.array_equal(pixels(bare), pixels(as_object))
    assert np.array_equal(pixels(bare), pixels(tagged))
    assert bare.infotext == tagged.infotext


def test_incompatible_lora_is_skipped_with_a_warning_and_the_compatible_one_still_applies(engine):
    only_compatible = engine.generate(request(loras=["demo-sd15-kohya"]))
    mixed = engine.generate(request(loras=["demo-sdxl-peft", "demo-sd15-kohya"]))
    assert np.array_equal(pixels(only_compatible), pixels(mixed))
    assert mixed.warnings == [
        "LoRA skipped: 'demo-sdxl-peft' is an SDXL LoRA; model 'demo-sd15' is SD1.5: use it with an SDXL model."
    ]
    assert "demo-sdxl-peft" not in mixed.infotext


def test_no_lora_leaks_into_the_next_job_even_after_cache_eviction(engine):
    before = engine.generate(request())
    loaded = engine.load("Demo SD1.5")
    with loaded.lock:
        for name in list(loaded.adapters):
            loaded.unload_adapter(name)
    loaded.MAX_CACHED_ADAPTERS = 2  # force evictions while cycling through three LoRAs
    try:
        for name in [*SD15_LORAS, "demo-sd15-kohya"]:
            engine.generate(request(loras=[{"name": name, "scale": 1.5}]))
            after = engine.generate(request())
            assert np.array_equal(pixels(before), pixels(after)), f"{name} leaked into the next job"
        assert len(loaded.adapters) <= 2
    finally:
        del loaded.MAX_CACHED_ADAPTERS


def test_img2img_ignores_loras_and_says_so(engine):
    start = engine.generate(request(seed=3)).image
    fields = {"prompt": "a lighthouse", "image": as_base64_png(start), "steps": 8, "width": 64, "height": 64,
              "seed": 5, "denoising_strength": 0.5}  # fmt: skip
    plain = engine.generate(Img2ImgRequest(**fields))
    with_lora = engine.generate(Img2ImgRequest(**fields, loras=["demo-sd15-kohya"]))
    assert np.array_equal(pixels(plain), pixels(with_lora))
    assert with_lora.warnings == ["LoRAs are not applied to img2img; ignored: 'demo-sd15-kohya'"]
    assert "Lora hashes" not in with_lora.infotext


# The report ------------------------------------------------------------------------------------------------
def test_report_for_the_demo_models_loads_every_pair(engine, catalog):
    models = [catalog.resolve("Demo SD1.5"), catalog.resolve("Demo SDXL")]
    results = check_all(engine, models, engine.loras.available())
    verdicts = {(r.model.name, r.lora.name): r.compatible for r in results}
    assert verdicts == {
        **{("demo-sd15", name): True for name in SD15_LORAS},
        ("demo-sd15", "demo-sdxl-peft"): False,
        **{("models--demo--tiny-sdxl-base", name): False for name in SD15_LORAS},
        ("models--demo--tiny-sdxl-base", "demo-sdxl-peft"): True,
        **{(model, name): False for model in ("demo-sd15", "models--demo--tiny-sdxl-base") for name in FLOW_LORAS},
    }
    report = format_report(results, now=datetime.datetime(2026, 1, 2, 3, 4, 5))
    assert report.startswith("=" * 80 + "\nCOMPREHENSIVE LoRA COMPATIBILITY REPORT\n" + "=" * 80)
    for line in ("Generated: 2026-01-02 03:04:05", "Total Tests: 14", "Compatible: 4", "Incompatible: 10",
                 "Success Rate: 28.6%", "Demo SD1.5: 3/7 (42.9%)", "MODEL: Demo SDXL", "✓ COMPATIBLE LoRAs:",
                 "✗ INCOMPATIBLE LoRAs:",
                 "    Reason: 'demo-sd15-kohya' is an SD1.5 LoRA; model 'models--demo--tiny-sdxl-base' is SDXL: use it "
                 "with an SD1.5 model"):  # fmt: skip
        assert line in report.splitlines()
    # The models are left as they were: the next job has no LoRA in it.
    assert all(not engine.load(model).adapters for model in models)


# A job with the most LoRAs a request may name, and jobs that fail: the model is left as it was found -------
@pytest.fixture(scope="module")
def many_loras_engine(settings, tmp_path_factory):
    """An engine whose LoRA folder holds `max_loras` SD1.5 LoRAs: more than the adapter cache keeps."""
    from pipelines.catalog import ModelCatalog
    from pipelines.demo import create_many_sd15_loras
    from pipelines.generate import ImageEngine
    from pipelines.limits import LIMITS

    folder = tmp_path_factory.mktemp("many-loras")
    create_many_sd15_loras(folder, LIMITS.max_loras)
    return ImageEngine(ModelCatalog(settings.model_copy(update={"loras_dir": folder})), device="cpu")


def test_a_job_with_max_loras_loras_keeps_them_all_and_leaves_no_lora_on_for_the_next_job(many_loras_engine):
    from pipelines.limits import LIMITS

    engine = many_loras_engine
    names = [lora.name for lora in engine.loras.available()]
    assert len(names) == LIMITS.max_loras > engine.load("Demo SD1.5").MAX_CACHED_ADAPTERS
    baseline = engine.generate(request())
    with_all = engine.generate(request(loras=names))
    assert with_all.warnings == []  # none evicted by its own batch-mates, none skipped
    assert f"<lora:{names[-1]}:1>" in with_all.infotext
    assert np.abs(pixels(with_all) - pixels(baseline)).max() > 0  # the LoRAs did apply
    after = engine.generate(request())
    assert np.array_equal(pixels(after), pixels(baseline)), "a LoRA stayed on after the job"
    # The same again: adapters now cached (and some evicted) must not change the result either.
    assert np.array_equal(pixels(engine.generate(request(loras=names))), pixels(with_all))
    assert np.array_equal(pixels(engine.generate(request())), pixels(baseline))


def test_a_job_that_fails_midway_leaves_no_lora_scheduler_or_vae_change_behind(many_loras_engine):
    engine = many_loras_engine
    loaded = engine.load("Demo SD1.5")
    baseline = engine.generate(request(sampler_name="Euler"))
    own_scheduler, own_vae = loaded.pipe.scheduler, loaded.pipe.vae
    names = [lora.name for lora in engine.loras.available()][:3]
    vae = engine.vaes.available()[0].name
    failing = engine.prepare(request(loras=names, vae=vae, sampler_name="DPM++ 2M Karras",
                                     hires={"enabled": True, "scale": 2.0, "upscaler": "Lanczos"}))  # fmt: skip

    def broken_upscaler(images, upscaler, width, height):  # fails between the two passes of hires fix
        raise RuntimeError("the upscaler is gone")

    with pytest.raises(RuntimeError, match="the upscaler is gone"):
        engine.run(loaded, [failing], upscale=broken_upscaler)
    assert loaded.pipe.scheduler is own_scheduler and loaded.pipe.vae is own_vae
    after = engine.generate(request(sampler_name="Euler"))
    assert np.array_equal(pixels(after), pixels(baseline)), "the failed job changed the next job's image"
    assert after.infotext == baseline.infotext
