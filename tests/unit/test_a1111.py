"""The A1111 API translation (pipelines/a1111.py), Basic credentials, and the job store's parts it uses."""

import base64
import io
import json

import pytest
from PIL import Image

from deployments.access import AccessPolicy
from deployments.job_records import ActiveJob, JobRecord, image_fields
from deployments.jobs import JobStore
from pipelines import a1111
from pipelines.a1111_schemas import A1111Img2ImgRequest, A1111Txt2ImgRequest
from pipelines.errors import DiffusionAPIError
from pipelines.infotext import encode_image
from pipelines.schemas import JobState


def png_base64(infotext: str | None = None) -> str:
    data = encode_image(Image.new("RGB", (16, 16), "red"), "png", infotext)
    return base64.b64encode(data).decode()


def test_numbers_as_strings_nulls_and_unknown_fields_are_accepted():
    request = A1111Txt2ImgRequest(prompt="x", steps="12", cfg_scale="6.5", hr_scale="1.0", seed=None, url="x")
    mapped = a1111.to_native(request, default_model=None)
    assert (mapped.native.steps, mapped.native.cfg_scale, mapped.native.seed) == (12, 6.5, None)
    assert mapped.warnings == ["unknown field(s) ignored: 'url'"]
    assert mapped.native.file_type == "png" and mapped.kind == "txt2img"


@pytest.mark.parametrize(
    ("sampler_name", "sampler_index", "scheduler", "expected"),
    [
        ("DPM++ 2M Karras", "Euler", None, ("DPM++ 2M", "karras")),
        (None, "Euler a", "automatic", ("Euler a", "automatic")),
        ("DPM++ 2M", "Euler", "SGM Uniform", ("DPM++ 2M", "sgm_uniform")),
        ("k_euler", None, "Exponential", ("Euler", "exponential")),
    ],
)
def test_samplers_by_name_or_index_and_schedulers_by_name_or_label(sampler_name, sampler_index, scheduler, expected):
    request = A1111Txt2ImgRequest(sampler_name=sampler_name, sampler_index=sampler_index, scheduler=scheduler)
    native = a1111.to_native(request, None).native
    assert native.sampler_name == expected[0]
    assert native.scheduler_type in (expected[1], None if expected[1] == "automatic" else expected[1])


def test_an_unknown_sampler_is_a_404_as_in_a1111():
    with pytest.raises(a1111.A1111NotFoundError, match="Sampler not found"):
        a1111.to_native(A1111Txt2ImgRequest(sampler_name="Bogus"), None)
    with pytest.raises(a1111.A1111NotFoundError, match="scheduler"):
        a1111.to_native(A1111Txt2ImgRequest(scheduler="bogus"), None)


def test_hires_fields_map_to_the_native_hires_fix():
    request = A1111Txt2ImgRequest(width=64, height=64, steps=10, enable_hr=True, hr_resize_x=128, hr_resize_y=96,
                                  hr_upscaler="None", denoising_strength=0.3)  # fmt: skip
    mapped = a1111.to_native(request, None)
    hires = mapped.native.hires
    assert (hires.enabled, hires.scale, hires.upscaler, hires.steps, hires.denoising_strength) == (
        True, 2.0, "Lanczos", 10, 0.3)  # fmt: skip
    assert "another aspect ratio" in mapped.warnings[0]
    assert a1111.to_native(A1111Txt2ImgRequest(enable_hr=False), None).native.hires is None


def test_model_clip_skip_refiner_and_sizes_come_from_a1111_fields():
    request = A1111Txt2ImgRequest(
        width=100, height=64, override_settings={"sd_model_checkpoint": "demo [0123456789]",
                                                 "CLIP_stop_at_last_layers": "2", "sd_vae": "Automatic"},
        refiner_checkpoint="refiner", refiner_switch_at=0.7, restore_faces=True,
    )  # fmt: skip
    mapped = a1111.to_native(request, default_model="other")
    native = mapped.native
    assert (native.model, native.clip_skip, native.width) == ("demo [0123456789]", 2, 96)
    assert (native.refiner_checkpoint, native.refiner_switch_at) == ("refiner", 0.7)
    assert "not supported here, ignored: restore_faces" in mapped.warnings
    assert any("width 100" in warning for warning in mapped.warnings)
    assert a1111.to_native(A1111Txt2ImgRequest(), default_model="other").native.model == "other"
    unused = a1111.to_native(A1111Txt2ImgRequest(refiner_checkpoint="r", refiner_switch_at=1.0), None)
    assert unused.native.refiner_checkpoint is None and "refiner" in unused.warnings[0]


def test_img2img_takes_the_first_init_image_and_says_what_it_ignored():
    image = "data:image/png;base64," + png_base64()
    mapped = a1111.to_native(A1111Img2ImgRequest(init_images=[image, image], resize_mode=1), None)
    assert mapped.kind == "img2img" and mapped.native.image == image and mapped.native.denoising_strength == 0.75
    assert "resize_mode" in mapped.warnings[0] and "init_images[1:]" in mapped.warnings[0]
    assert mapped.native.mask is None
    with pytest.raises(DiffusionAPIError, match="init_images"):
        a1111.to_native(A1111Img2ImgRequest(init_images=[]), None)


def test_out_of_limit_values_name_the_a1111_field():
    with pytest.raises(DiffusionAPIError, match="^hr_second_pass_steps:"):
        a1111.to_native(A1111Txt2ImgRequest(enable_hr=True, hr_second_pass_steps=1000), None)
    with pytest.raises(ValueError):
        A1111Txt2ImgRequest(cfg_scale="1e999")
    with pytest.raises(ValueError):
        A1111Txt2ImgRequest(steps=True)
    with pytest.raises(DiffusionAPIError, match="CLIP_stop_at_last_layers"):
        a1111.to_native(A1111Txt2ImgRequest(override_settings={"CLIP_stop_at_last_layers": True}), None)


def test_generation_info_is_a1111_processed_js():
    infotexts = [
        f"a cat\nSteps: 3, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7.0, Seed: {seed}, Size: 64x64, "
        f"Model hash: 0123456789, Model: demo, Clip skip: 2, Version: x"
        for seed in (5, 6)
    ]
    payload = {"width": 64, "height": 64, "sampler_name": "Euler a", "cfg_scale": 7.0, "steps": 3, "batch_size": 2}
    job = JobRecord(job_id="a" * 32, kind="txt2img", state=JobState.done, phase="done", progress=100.0,
                    created=1.7e9, updated=1.7e9, payload=payload, warnings=[])  # fmt: skip
    result = image_fields({"images": ["i1", "i2"], "seeds": [5, 6], "infotexts": infotexts})
    info = a1111.generation_info(A1111Txt2ImgRequest(prompt="a cat", batch_size=2), job, result, ["w"])
    assert info["all_seeds"] == [5, 6] and info["all_prompts"] == ["a cat", "a cat"] and info["seed"] == 5
    assert (info["sd_model_name"], info["sd_model_hash"], info["clip_skip"]) == ("demo", "0123456789", 2)
    assert info["infotexts"] == infotexts and info["index_of_first_image"] == 0 and info["warnings"] == ["w"]
    assert json.loads(a1111.json_info(info)) == info


def test_progress_report_is_idle_with_no_jobs_and_follows_the_running_one():
    idle = a1111.progress_report([], now=100.0)
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0
    jobs = [ActiveJob("a", JobState.processing, "generation", 50.0, 90.0, 20, None),
            ActiveJob("b", JobState.queued, "queued", 0.0, 95.0, 20, None)]  # fmt: skip
    running = a1111.progress_report(jobs, now=100.0)
    assert running["progress"] == 0.5 and running["eta_relative"] == 10.0
    assert running["state"]["job_count"] == 2 and running["state"]["sampling_step"] == 10


def test_png_info_reads_the_infotext_and_parses_it():
    text = "a dog\nNegative prompt: ugly\nSteps: 5, Sampler: Euler, CFG scale: 7.0, Seed: 1, Size: 32x48"
    read = a1111.png_info("data:image/png;base64," + png_base64(text))
    assert read["info"] == text and read["parameters"]["Negative prompt"] == "ugly"
    assert (read["parameters"]["Size-1"], read["parameters"]["Size-2"]) == ("32", "48")
    with pytest.raises(DiffusionAPIError):
        a1111.png_info("not base64!")


def test_basic_credentials_carry_the_api_key_and_are_ignored_with_keys_off(monkeypatch):
    monkeypatch.setenv("DIFFUSION_API_KEYS", "secret-key")
    monkeypatch.delenv("DIFFUSION_API_KEYS_FILE", raising=False)
    policy = AccessPolicy.from_config()
    basic = "Basic " + base64.b64encode(b"anyone:secret-key").decode()
    assert policy.caller_of(basic) is not None and policy.caller_of("Bearer secret-key") is not None
    assert policy.caller_of("Basic " + base64.b64encode(b"anyone:wrong").decode()) is None
    assert policy.caller_of("Basic Og==") is None and policy.caller_of("Basic !!") is None
    assert policy.caller_of(basic).owner == policy.caller_of("Bearer secret-key").owner != ""
    open_policy = AccessPolicy()
    assert open_policy.caller_of("Basic ").owner == open_policy.caller_of("Basic Og==").owner == ""


def test_job_store_keeps_settings_and_lists_active_jobs_by_origin_and_owner(tmp_path):
    store = JobStore(str(tmp_path / "jobs.sqlite3"))
    store.create("a" * 32, "txt2img", {"steps": 4}, [], "sd15", None, "sdapi", "k1")
    store.create("b" * 32, "txt2img", {"steps": 4}, [], "sd15", None, "sdapi", "k2")
    store.create("c" * 32, "txt2img", {"steps": 4}, [], "sd15")
    assert [job.job_id for job in store.active_jobs("sdapi")] == ["a" * 32, "b" * 32]
    assert [job.job_id for job in store.active_jobs("sdapi", "k2")] == ["b" * 32]
    store.cancel("b" * 32)
    assert store.active_jobs("sdapi", "k2") == [] and store.active_jobs("sdapi", "k1")[0].steps == 4
    store.set_setting("sd_model_checkpoint", "demo")
    assert JobStore(str(tmp_path / "jobs.sqlite3")).get_setting("sd_model_checkpoint") == "demo"


def test_pruning_removes_every_image_file_of_a_job(tmp_path):
    store = JobStore(str(tmp_path / "jobs.sqlite3"), keep_finished_count=0)
    job_id = "d" * 32
    paths = [tmp_path / f"{job_id}.png", tmp_path / f"{job_id}-1.png"]
    for path in paths:
        path.write_bytes(b"x")
    store.create(job_id, "txt2img", {}, [])
    store.complete_many([(job_id, {"output_paths": [str(path) for path in paths], "images": ["a", "b"]}, [])])
    assert store.prune() == 1 and not any(path.exists() for path in paths)


def test_extras_size_by_scale_or_to_a_size():
    image = Image.new("RGB", (40, 30))
    assert a1111.extras_size(image, 0, 2.0, 0, 0) == (80, 60)
    assert a1111.extras_size(image, 1, 2.0, 64, 48) == (64, 48)
    with pytest.raises(DiffusionAPIError):
        a1111.extras_size(image, 0, 0.0, 0, 0)


def test_images_decode_from_png_info_items():
    data = io.BytesIO()
    Image.new("RGB", (8, 8)).save(data, format="PNG")
    read = a1111.png_info(base64.b64encode(data.getvalue()).decode())
    assert read == {"info": "", "items": {}, "parameters": {}}


def test_a_mask_is_inpainting_with_a1111s_api_defaults():
    image = "data:image/png;base64," + png_base64()
    mapped = a1111.to_native(A1111Img2ImgRequest(init_images=[image], mask=image), None)
    native = mapped.native
    assert native.mask == image and not mapped.warnings
    # A1111's API (not its UI) defaults: fill, "Only masked", no padding, blur 4
    assert (native.mask_blur, native.inpainting_fill, native.inpaint_full_res, native.inpaint_full_res_padding,
            native.inpainting_mask_invert) == (4, 0, True, 0, False)  # fmt: skip
    sent = A1111Img2ImgRequest(init_images=[image], mask=image, mask_blur="8", inpainting_fill=1,
                               inpaint_full_res=0, inpaint_full_res_padding=32, inpainting_mask_invert=1)  # fmt: skip
    native = a1111.to_native(sent, None).native
    assert (native.mask_blur, native.inpainting_fill, native.inpaint_full_res, native.inpaint_full_res_padding,
            native.inpainting_mask_invert) == (8, 1, False, 32, True)  # fmt: skip
    uneven = a1111.to_native(A1111Img2ImgRequest(init_images=[image], mask=image, mask_blur_x=2, mask_blur_y=6), None)
    assert uneven.native.mask_blur == 6 and "mask_blur_x 2 and mask_blur_y 6 differ" in uneven.warnings[0]
    with pytest.raises(DiffusionAPIError, match="^inpainting_fill:"):
        a1111.to_native(A1111Img2ImgRequest(init_images=[image], mask=image, inpainting_fill=7), None)


@pytest.mark.parametrize(
    ("model", "field"),
    [(A1111Txt2ImgRequest, "prompt"), (A1111Txt2ImgRequest, "negative_prompt"), (A1111Txt2ImgRequest, "hr_prompt"),
     (A1111Txt2ImgRequest, "hr_negative_prompt"), (A1111Img2ImgRequest, "prompt")],
)  # fmt: skip
def test_prompts_have_the_native_length_limit_checked_before_any_parsing(model, field, monkeypatch):
    from pipelines.errors import InvalidRequestError
    from pipelines.limits import LIMITS

    limit = LIMITS.max_prompt_chars
    assert model.model_json_schema()["properties"][field]["anyOf"][0] == {"type": "string", "maxLength": limit}
    monkeypatch.setattr(a1111, "find_lora_tags", lambda prompt: pytest.fail("the prompt was parsed"))
    with pytest.raises(InvalidRequestError) as raised:
        a1111.to_native(model(**{field: "<lora:" * limit}), None)  # far above the limit: refused unread
    assert raised.value.status_code == 422 and raised.value.field == field
    assert raised.value.message == f"{field}: {6 * limit} characters; at most {limit} are accepted"
    monkeypatch.undo()
    at_limit = {field: "a" * limit, "init_images": ["x"]} if model is A1111Img2ImgRequest else {field: "a" * limit}
    assert a1111.to_native(model(**at_limit), None).native is not None


def test_a_forge_call_on_flux_snaps_sizes_to_16_and_leaves_unsent_fields_to_the_family(catalog):
    overrides = {"sd_model_checkpoint": "Demo FLUX.1-dev"}
    mapped = a1111.to_native(A1111Txt2ImgRequest(prompt="x", sampler_name="DPM++ 2M", width=1000, height=520,
                                                 override_settings=overrides), None, catalog=catalog)  # fmt: skip
    native = mapped.native
    assert (native.width, native.height) == (992, 512)
    assert "width 1000 is not a multiple of 16 (or below 64); used 992" in mapped.warnings
    assert native.scheduler_type is None and "cfg_scale" not in native.model_fields_set
    sd15 = a1111.to_native(A1111Txt2ImgRequest(prompt="x", width=1000, cfg_scale=None), "demo-sd15", catalog=catalog)
    assert sd15.native.width == 1000 and sd15.native.cfg_scale == 7.0  # null cfg_scale: the family's (SD: 7)
