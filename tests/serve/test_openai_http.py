"""The OpenAI-compatible door with the real `openai` SDK from PyPI against the running service: generate (b64
and signed URLs fetched without a key), edit with a mask, variations, models, streaming partial images, OpenAI's
errors as the SDK's exception classes, and bodies shaped like Open WebUI's and LiteLLM's image calls. Each call
is an ordinary job: it equals the native job with the same fields, pixel for pixel. With API keys on:
tests/serve/test_tenants_http.py."""

import base64
import io
import threading
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image, ImageDraw, ImageFilter

from pipelines.infotext import parse_infotext, read_infotext
from tests.serve.conftest import PORT, wait_for_job

BASE_URL = f"http://127.0.0.1:{PORT}/v1"
FAST = {"steps": 3, "seed": 11}
SIZE = (96, 64)


@pytest.fixture(scope="module")
def sdk(service):
    with openai.OpenAI(base_url=BASE_URL, api_key="any key: keys are off", max_retries=0, timeout=180) as client:
        yield client


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def png_file(image: Image.Image, name: str = "image.png") -> tuple[str, bytes, str]:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return name, buffer.getvalue(), "image/png"


def input_image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(4).integers(0, 256, (SIZE[1], SIZE[0], 3), dtype=np.uint8))


def test_generate_makes_n_images_as_the_native_job_with_the_same_fields(sdk, client):
    raw = sdk.images.with_raw_response.generate(model="Demo SD1.5", prompt="a lighthouse at dusk", n=2, size="64x64",
                                                extra_body={**FAST, "negative_prompt": "fog"})  # fmt: skip
    answer = raw.parse()
    assert len(answer.data) == 2 and answer.size == "64x64" and answer.output_format == "png"
    first, second = (base64.b64decode(image.b64_json) for image in answer.data)
    assert not np.array_equal(pixels(first), pixels(second))  # seeds 11 and 12
    infotext = read_infotext(first)
    params = parse_infotext(infotext)
    assert (params["Steps"], params["Seed"], params["Model"]) == ("3", "11", "demo-sd15")
    assert (params["Size-1"], params["Size-2"]) == ("64", "64")
    assert "Negative prompt: fog" in infotext and answer.data[0].revised_prompt == "a lighthouse at dusk"
    job = client.get(f"/queue/{raw.headers['X-Job-Id']}").json()
    assert job["state"] == "done" and job["batch_size"] == 2
    native = client.post("/txt2img", json={"prompt": "a lighthouse at dusk", "negative_prompt": "fog", "width": 64,
                                           "height": 64, "batch_size": 2, "model": "demo-sd15", "fileType": "png",
                                           **FAST})  # fmt: skip
    done = wait_for_job(client, native.json()["job_id"])
    assert np.array_equal(pixels(base64.b64decode(done["images"][0])), pixels(first))


def test_url_answers_are_links_a_client_fetches_later_without_a_key(sdk):
    by_url = sdk.images.generate(model="demo-sd15", prompt="a red barn", size="64x64", response_format="url",
                                 output_format="jpeg", extra_body=FAST)  # fmt: skip
    (image,) = by_url.data
    assert image.url.startswith(f"{BASE_URL}/images/files/") and image.b64_json is None
    fetched = httpx.get(image.url, timeout=30)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/jpeg"
    assert parse_infotext(read_infotext(fetched.content))["Seed"] == "11"
    tampered = httpx.get(image.url.replace("/0.jpg", "/1.jpg"), timeout=30)
    assert tampered.status_code == 403 and tampered.json()["error"]["type"] == "permission_error"


def test_edit_with_a_mask_repaints_only_its_transparent_part(sdk):
    mask = Image.new("RGBA", SIZE, (0, 0, 0, 255))
    ImageDraw.Draw(mask).ellipse((30, 12, 66, 52), fill=(0, 0, 0, 0))  # transparent: repaint
    answer = sdk.images.edit(image=png_file(input_image()), mask=png_file(mask, "mask.png"), prompt="a window",
                             model="demo-sd15", extra_body=FAST)  # fmt: skip
    (image,) = answer.data
    result, before = pixels(base64.b64decode(image.b64_json)), np.asarray(input_image()).astype(int)
    assert result.shape == before.shape and answer.size == "96x64"
    repainted = np.asarray(
        mask.getchannel("A").point(lambda a: 255 if a < 128 else 0).filter(ImageFilter.GaussianBlur(4))
    )
    kept = repainted == 0
    assert np.array_equal(result[kept], before[kept])
    assert (result[~kept] != before[~kept]).mean() > 0.5


def test_several_images_edit_the_first_and_a_variation_keeps_the_inputs_size(sdk, client):
    raw = sdk.images.with_raw_response.edit(image=[png_file(input_image()), png_file(input_image(), "b.png")],
                                            prompt="a door", extra_body=FAST)  # fmt: skip
    assert len(raw.parse().data) == 1
    warnings = client.get(f"/queue/{raw.headers['X-Job-Id']}").json()["warnings"]
    assert any("1 more image(s)" in warning for warning in warnings), warnings
    varied = sdk.images.create_variation(image=png_file(input_image()), n=2, extra_body=FAST)
    assert len(varied.data) == 2
    assert Image.open(io.BytesIO(base64.b64decode(varied.data[0].b64_json))).size == SIZE


def test_models_list_the_checkpoints_and_retrieve_finds_a_label(sdk):
    ids = {model.id for model in sdk.models.list()}
    assert {"demo-sd15", "models--demo--tiny-sdxl-base"} <= ids
    assert sdk.models.retrieve("Demo SD1.5").id == "Demo SD1.5"
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.models.retrieve("gpt-image-1")
    assert missing.value.code == "model_not_found"


def test_streaming_sends_partial_images_from_the_previews_then_the_images(sdk):
    stream = sdk.images.generate(model="demo-sd15", prompt="a slow sunrise", size="256x256", stream=True,
                                 partial_images=2, extra_body={"steps": 60, "seed": 5})  # fmt: skip
    events = list(stream)
    kinds = [event.type for event in events]
    assert kinds[-1] == "image_generation.completed" and kinds.count("image_generation.completed") == 1
    partial = [event for event in events if event.type == "image_generation.partial_image"]
    assert 1 <= len(partial) <= 2 and [event.partial_image_index for event in partial] == list(range(len(partial)))
    assert Image.open(io.BytesIO(base64.b64decode(partial[0].b64_json))).size == (256, 256)
    final = base64.b64decode(events[-1].b64_json)
    assert parse_infotext(read_infotext(final))["Steps"] == "60"


def test_bad_requests_are_the_sdks_exceptions_with_the_services_message(sdk):
    with pytest.raises(openai.BadRequestError) as bad_size:
        sdk.images.generate(prompt="x", size="1000x10")
    assert bad_size.value.param == "size" and "multiple of 8" in bad_size.value.message
    with pytest.raises(openai.BadRequestError) as bad_n:
        sdk.images.generate(prompt="x", n=99)
    assert bad_n.value.param == "n"
    with pytest.raises(openai.NotFoundError) as unknown:
        sdk.images.generate(prompt="x", model="dall-e-3")
    assert unknown.value.code == "model_not_found" and "demo-sd15" in unknown.value.message
    with pytest.raises(openai.BadRequestError) as unknown_sampler:
        sdk.images.generate(prompt="x", size="64x64", extra_body={"sampler_name": "Warp Drive"})
    assert unknown_sampler.value.param == "sampler_name"
    with pytest.raises(openai.BadRequestError) as no_image:
        sdk.images.edit(image=("x.png", b"not an image", "image/png"), prompt="x")
    assert no_image.value.param == "image"


def test_open_webui_and_litellm_shaped_bodies_get_images(client):
    open_webui = {
        "model": "Demo SD1.5",
        "prompt": "a cat on a mat",
        "n": 1,
        "size": "64x64",
        "response_format": "b64_json",
        "steps": 3,
    }  # fmt: skip (IMAGES_OPENAI_API_PARAMS: steps)
    litellm = {"model": "demo-sd15", "prompt": "a dog", "n": 1, "size": "64x64", "quality": "low",
               "style": "natural", "user": "user-7", "response_format": "b64_json"}  # fmt: skip
    for body in (open_webui, litellm):
        answer = client.post("/v1/images/generations", json=body, headers={"Authorization": "Bearer sk-anything"},
                             timeout=180)  # fmt: skip
        assert answer.status_code == 200, answer.text
        image = Image.open(io.BytesIO(base64.b64decode(answer.json()["data"][0]["b64_json"])))
        assert image.size == (64, 64)
    assert parse_infotext(read_infotext(base64.b64decode(answer.json()["data"][0]["b64_json"])))["Steps"] == "12"


def test_a_call_whose_job_is_cancelled_is_a_conflict_the_sdk_does_not_retry(client):
    """The SDK retries 409 and 5xx answers twice by default; a job that has ended says `x-should-retry: false`,
    so a cancelled job is not submitted again behind the canceller's back."""
    started, outcome = time.time(), {}

    def call(sdk: openai.OpenAI) -> None:
        try:
            sdk.images.generate(model="demo-sd15", prompt="a cancelled one", size="512x512",
                                extra_body={"steps": 150, "seed": 9})  # fmt: skip
        except openai.APIStatusError as error:
            outcome["error"] = error

    def openai_jobs() -> list[dict]:
        jobs = client.get("/queue", params={"limit": 100}).json()["jobs"]
        return [job for job in jobs if job["door"] == "openai" and job["created"] >= started]

    with openai.OpenAI(base_url=BASE_URL, api_key="x", timeout=180) as retrying:  # the SDK's default retries
        caller = threading.Thread(target=call, args=(retrying,))
        caller.start()
        deadline = time.monotonic() + 60
        while not openai_jobs() and time.monotonic() < deadline:
            time.sleep(0.1)
        (job,) = openai_jobs()
        assert client.delete(f"/queue/{job['job_id']}").status_code == 200
        caller.join(120)
    error = outcome["error"]
    assert isinstance(error, openai.ConflictError) and error.response.headers["x-should-retry"] == "false"
    assert error.response.headers["X-Job-Id"] == job["job_id"] and "cancelled" in error.message
    assert [item["job_id"] for item in openai_jobs()] == [job["job_id"]]  # no second job
