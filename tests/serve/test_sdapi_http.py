"""The A1111-compatible API (`/sdapi/v1`) against the running service, through the real `webuiapi` client and
with request bodies shaped like Open WebUI's, SillyTavern's and LibreChat's (read from their source)."""

import base64
import io
import json
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import requests
import webuiapi
from PIL import Image

from pipelines.infotext import read_infotext
from tests.serve.conftest import PORT, wait_for_job

FAST = {"steps": 3, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def api(service) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(host="127.0.0.1", port=PORT)


def pixels(image: Image.Image | str) -> np.ndarray:
    if isinstance(image, str):
        image = Image.open(io.BytesIO(base64.b64decode(image)))
    return np.asarray(image.convert("RGB")).astype(np.int16)


def test_webuiapi_lists_models_samplers_schedulers_upscalers_and_loras(api):
    titles = [model["title"] for model in api.get_sd_models()]
    assert any(title.startswith("demo-sd15 [") and title.endswith("]") for title in titles)
    assert api.util_get_current_model() in titles
    assert {"Euler a", "DPM++ 2M", "DPM++ SDE"} <= set(api.util_get_sampler_names())
    assert {"automatic", "karras", "exponential"} <= {item["name"] for item in api.get_schedulers()}
    assert [item["name"] for item in api.get_upscalers()][:3] == ["None", "Lanczos", "Nearest"]
    assert "demo-esrgan-x4" in [item["name"] for item in api.get_upscalers()]
    assert "demo-sd15-kohya" in [item["name"] for item in api.get_loras()]


def test_webuiapi_txt2img_batch_is_one_job_with_consecutive_seeds_and_the_native_pixels(api, client):
    result = api.txt2img(prompt="a red cube", seed=7, batch_size=2, n_iter=2, sampler_name="DPM++ 2M Karras",
                         cfg_scale=6, **FAST)  # fmt: skip
    assert len(result.images) == 4 and all(image.size == (64, 64) for image in result.images)
    info = result.info
    assert info["all_seeds"] == [7, 8, 9, 10] and info["seed"] == 7
    assert info["all_prompts"] == ["a red cube"] * 4 and info["batch_size"] == 2
    assert info["sampler_name"] == "DPM++ 2M" and info["sd_model_name"] == "demo-sd15"
    assert info["sd_model_hash"] and info["job_timestamp"].isdigit()
    for seed, text in zip(info["all_seeds"], info["infotexts"], strict=True):
        assert f"Seed: {seed}," in text
    assert "Schedule type: Karras" in info["infotexts"][0]
    # Each PNG carries its own infotext, as A1111's do.
    assert [image.info.get("parameters") for image in result.images] == info["infotexts"]
    # A real job of the service, visible in /queue with every image.
    job = client.get(f"/queue/{info['job_id']}").json()
    assert job["state"] == "done" and job["seeds"] == [7, 8, 9, 10] and len(job["images"]) == 4
    # The third image is what the native API makes alone for seed 9 (batching keeps each image's pixels).
    native = client.post(
        "/txt2img",
        json={
            "prompt": "a red cube",
            "seed": 9,
            "sampler_name": "DPM++ 2M",
            "scheduler_type": "karras",
            "cfg_scale": 6.0,
            "fileType": "png",
            **FAST,
        },
    )
    alone = wait_for_job(client, native.json()["job_id"])
    assert np.abs(pixels(alone["image"]) - pixels(result.images[2])).max() <= 2


def test_webuiapi_img2img_with_a_data_url_and_png_info(api):
    start = api.txt2img(prompt="a blue ball", seed=3, **FAST).image
    result = api.img2img(images=[start], prompt="a green ball", seed=4, denoising_strength=0.5, **FAST)
    assert len(result.images) == 1 and result.image.size == (64, 64)
    assert result.info["denoising_strength"] == 0.5
    assert result.parameters["init_images"] is None  # not echoed back, as A1111 does
    read = api.png_info(result.image)
    assert read.info == result.info["infotexts"][0]
    assert read.parameters["Prompt"] == "a green ball" and read.parameters["Seed"] == "4"
    assert read.parameters["Denoising strength"] == "0.5" and read.parameters["Size-1"] == "64"


def test_webuiapi_sets_the_service_wide_default_model(api, client):
    original = api.util_get_current_model()
    try:
        api.util_set_model("demo-sd15-single")
        assert api.util_get_current_model().startswith("demo-sd15-single [")
        assert api.txt2img(prompt="x", **FAST).info["sd_model_name"] == "demo-sd15-single"
        # The native API's default too (a request without a model).
        job_id = client.post("/txt2img", json={"prompt": "x", **FAST}).json()["job_id"]
        assert wait_for_job(client, job_id)["payload"]["model"] == "demo-sd15-single"
        # Kept in the job store: the options survive in the database every replica reads.
        assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("demo-sd15-single [")
    finally:
        assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": original}).json() is None
    assert api.util_get_current_model() == original


def test_interrupt_stops_the_callers_sdapi_job_and_leaves_native_jobs_alone(api, client):
    native_id = client.post("/txt2img", json={"prompt": "native", "steps": 12, "width": 128, "height": 128}).json()[
        "job_id"
    ]
    outcome = {}

    def generate() -> None:
        outcome["result"] = api.txt2img(prompt="long", steps=150, width=256, height=256)  # non-200: RuntimeError

    worker = threading.Thread(target=generate)
    worker.start()
    deadline = time.monotonic() + 60
    while api.get_progress()["state"]["job_count"] == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert api.get_progress()["state"]["job_count"] == 1  # the sdapi job only, not the native one
    # A1111's live preview of the running job (its latents decoded cheaply), unless the client skips it.
    while (current := client.get("/sdapi/v1/progress").json()["current_image"]) is None:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    preview = Image.open(io.BytesIO(base64.b64decode(current)))
    assert preview.format == "JPEG" and preview.size == (32, 32)
    skipped = client.get("/sdapi/v1/progress", params={"skip_current_image": True}).json()
    assert skipped["current_image"] is None and skipped["state"]["job_count"] == 1
    assert api.interrupt() == {}
    worker.join(timeout=120)
    interrupted = outcome["result"]  # as A1111: 200, with the images made so far (none here)
    assert interrupted.images == [] and interrupted.info["interrupted"] is True
    assert any(warning.startswith("interrupted") for warning in interrupted.info["warnings"])
    job_id = interrupted.info["job_id"]
    assert client.get(f"/queue/{job_id}").json()["state"] == "cancelled"
    assert wait_for_job(client, native_id)["state"] == "done"
    progress = api.get_progress()
    assert progress["progress"] == 0 and progress["state"]["job_count"] == 0


def test_webuiapi_upscales_through_the_upscaler_deployment(api):
    image = api.txt2img(prompt="x", seed=1, **FAST).image
    lanczos = api.extra_single_image(image=image, upscaler_1="Lanczos", upscaling_resize=2)
    assert lanczos.image.size == (128, 128)
    assert lanczos.image.info.get("parameters") == image.info["parameters"]  # the infotext is kept
    # 12 MiB of pixels from the Upscaler deployment: beyond Ray Serve's default 4 MiB gRPC message limit.
    large = api.extra_single_image(image=image, upscaler_1="Lanczos", resize_mode=1, upscaling_resize_w=2048,
                                   upscaling_resize_h=2048)  # fmt: skip
    assert large.image.size == (2048, 2048)
    esrgan = api.extra_batch_images(images=[image, image], upscaler_1="demo-esrgan-x4", upscaling_resize=3)
    assert [item.size for item in esrgan.images] == [(192, 192), (192, 192)]


def test_open_webui_body_with_an_empty_basic_header(service):
    # Open WebUI: POST options with the model, then a minimal body, with `Authorization: Basic <b64 of "">`
    # (a trailing space that httpx refuses to send; `requests`, as Open WebUI's own stack, sends it).
    base = f"http://127.0.0.1:{PORT}/sdapi/v1"
    headers = {"Authorization": "Basic "}
    assert requests.post(f"{base}/options", json={"sd_model_checkpoint": "demo-sd15"}, headers=headers).json() is None
    body = {"prompt": "a lighthouse", "batch_size": 1, "width": 64, "height": 64, "steps": 3,
            "negative_prompt": "blurry"}  # fmt: skip
    answer = requests.post(f"{base}/txt2img", json=body, headers=headers, timeout=120)
    assert answer.status_code == 200
    data = answer.json()
    info = json.loads(data["info"])
    assert info["negative_prompt"] == "blurry" and len(data["images"]) == 1
    assert Image.open(io.BytesIO(base64.b64decode(data["images"][0]))).format == "PNG"


def test_sillytavern_body_at_a_double_slash_path_with_strings_for_numbers(client):
    body = {
        "prompt": "a castle <lora:demo-sd15-kohya:0.5>", "negative_prompt": "", "sampler_name": "Euler a",
        "scheduler": "Automatic", "steps": "3", "cfg_scale": "7", "width": 64, "height": 64, "restore_faces": False,
        "enable_hr": True, "hr_upscaler": "Latent", "hr_scale": "1.5", "hr_second_pass_steps": 2,
        "denoising_strength": 0.5, "seed": 11, "override_settings": {"CLIP_stop_at_last_layers": 2},
        "override_settings_restore_afterwards": True, "save_images": False, "send_images": True,
        "do_not_save_grid": False, "do_not_save_samples": False, "alwayson_scripts": {},
    }  # fmt: skip
    answer = client.post(
        f"http://127.0.0.1:{PORT}//sdapi/v1/txt2img", json=body, headers={"Authorization": "Basic Og=="}
    )
    assert answer.status_code == 200, answer.text
    info = json.loads(answer.json()["info"])
    text = info["infotexts"][0]
    assert "Hires upscale: 1.5" in text and "Clip skip: 2" in text and "Lora hashes:" in text
    assert Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0]))).size == (96, 96)
    assert info["warnings"] == [] and info["clip_skip"] == 2


def test_librechat_reads_info_and_splits_images_on_commas(client):
    body = {"prompt": "a tree", "negative_prompt": "", "steps": 3, "width": 64, "height": 64, "url": "x",
            "auth": "y"}  # fmt: skip
    data = client.post("/sdapi/v1/txt2img", json=body).json()
    image = data["images"][0]
    assert "," not in image and not image.startswith("data:")  # LibreChat splits on ',' and decodes the last part
    info = json.loads(data["info"])
    assert info["infotexts"][0].startswith("a tree\n") and info["width"] == 64 and info["height"] == 64
    assert isinstance(info["seed"], int)
    assert info["warnings"] == ["unknown field(s) ignored: 'auth', 'url'"]


def test_errors_are_a1111_json_with_the_reason(client):
    unknown_sampler = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "sampler_name": "Bogus"})
    assert unknown_sampler.status_code == 404
    assert set(unknown_sampler.json()) == {"error", "detail", "body", "errors"}
    assert "Bogus" in unknown_sampler.json()["detail"]
    unknown_model = client.post(
        "/sdapi/v1/txt2img", json={"prompt": "x", "override_settings": {"sd_model_checkpoint": "nope"}}
    )
    assert unknown_model.status_code == 404 and "demo-sd15" in unknown_model.json()["detail"]
    too_many_steps = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": "1000"})
    assert too_many_steps.status_code == 422 and too_many_steps.json()["detail"].startswith("steps:")
    too_large = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "enable_hr": True, "hr_scale": 9})
    assert too_large.status_code == 422 and too_large.json()["detail"].startswith("hr_scale:")
    not_a_number = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": "abc"})
    assert not_a_number.status_code == 422 and not_a_number.json()["error"] == "RequestValidationError"
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope"}).status_code == 404
    no_path = client.get("/sdapi/v1/nothing-here")
    assert no_path.status_code == 404 and no_path.json()["detail"].startswith("no such path")


def test_other_sdapi_endpoints_answer_json(client):
    scripts = {"txt2img": ["controlnet", "controlnet m2m"], "img2img": ["controlnet", "controlnet m2m"]}
    assert client.get("/sdapi/v1/scripts").json() == scripts  # ControlNet, as webuiapi looks for it
    assert set(client.get("/sdapi/v1/embeddings").json()["loaded"]) == {"demo-style", "demo-xl-style"}
    assert client.get("/sdapi/v1/sd-vae").json()[0]["model_name"] == "demo-vae-ft.safetensors"
    assert {"name": "Latent (bicubic antialiased)"} in client.get("/sdapi/v1/latent-upscale-modes").json()
    assert client.get("/sdapi/v1/memory").json()["ram"]["total"] > 0
    assert client.get("/sdapi/v1/cmd-flags").json()["api"] is True
    for path in ("refresh-checkpoints", "refresh-loras"):
        assert client.post(f"/sdapi/v1/{path}").json() is None
    for path in ("unload-checkpoint", "reload-checkpoint", "skip"):
        assert client.post(f"/sdapi/v1/{path}").json() == {}


def test_native_batch_size_and_n_iter(client, service):
    job_id = client.post("/txt2img", json={"prompt": "x", "seed": 20, "batch_size": 3, "n_iter": 2,
                                           "fileType": "png", **FAST}).json()["job_id"]  # fmt: skip
    job = wait_for_job(client, job_id)
    assert job["seeds"] == [20, 21, 22, 23, 24, 25] and job["seed"] == 20
    assert job["image"] == job["images"][0] and job["output_path"] == job["output_paths"][0]
    assert len(set(job["images"])) == 6
    for index, (seed, text) in enumerate(zip(job["seeds"], job["infotexts"], strict=True)):
        stored = client.get(f"/queue/{job_id}/image", params={"index": index}).content
        assert f"Seed: {seed}," in text and read_infotext(stored) == text
    assert Path(job["output_paths"][1]).name == f"{job_id}-1.png"
    with httpx.Client(base_url=f"http://127.0.0.1:{PORT}") as plain:
        refused = plain.post("/txt2img", json={"prompt": "x", "batch_size": 9})
    assert refused.status_code == 422 and "batch_size" in refused.json()["error"]


def test_concurrent_sdapi_calls_share_one_batch_with_a_batch_size_request(api, client):
    # A native job keeps an SD1.5 generator busy; three A1111 calls are accepted meanwhile (each holds its
    # HTTP request) and run batched: as one call of 1 + 1 + 2 images when one replica serves SD1.5, and at
    # least the two images of the batch_size request together (earlier tests may have scaled SD1.5 up).
    blocker = client.post("/txt2img", json={"prompt": "busy", "steps": 40, "width": 128, "height": 128, "seed": 1})
    blocker_id = blocker.json()["job_id"]
    deadline = time.monotonic() + 60
    while client.get(f"/queue/{blocker_id}").json()["state"] == "queued" and time.monotonic() < deadline:
        time.sleep(0.05)
    results: dict[int, webuiapi.WebUIApiResult] = {}

    def call(seed: int, batch_size: int) -> None:
        results[seed] = api.txt2img(prompt="together", seed=seed, batch_size=batch_size, **FAST)

    threads = [threading.Thread(target=call, args=args) for args in ((301, 1), (302, 1), (303, 2))]
    for thread in threads:
        thread.start()
    seen = 0
    while any(thread.is_alive() for thread in threads) and time.monotonic() < deadline:
        seen = max(seen, api.get_progress()["state"]["job_count"])
        time.sleep(0.02)
    assert seen == 3  # all three were in the service at once
    for thread in threads:
        thread.join(timeout=120)
    assert [len(results[seed].images) for seed in (301, 302, 303)] == [1, 1, 2]
    assert results[303].info["all_seeds"] == [303, 304]
    jobs = [client.get(f"/queue/{results[seed].info['job_id']}").json() for seed in (301, 302, 303)]
    assert [job["state"] for job in jobs] == ["done"] * 3
    assert jobs[2]["batch_size"] >= 2 and all(job["batch_size"] >= 1 for job in jobs)
    assert wait_for_job(client, blocker_id)["batch_size"] == 1
