"""ControlNet through the running service: the real `webuiapi` client's ControlNet calls (its units on txt2img,
the extension's listing and detect routes), the native `controlnet` units with their detected maps, bad units
as 4xx naming them, and two ControlNet jobs batched together keeping their solo pixels."""

import base64
import io

import httpx
import numpy as np
import webuiapi
from PIL import Image

from pipelines.infotext import parse_infotext
from pipelines.preprocessors import preprocessor
from tests.serve.conftest import PORT, wait_for_job
from tests.serve.test_batching_http import BLOCKER, submit, wait_until_processing

CANNY_TITLE = "demo-sd15-canny [2fa19545]"
FAST = {"prompt": "a lighthouse", "model": "demo-sd15", "steps": 4, "width": 64, "height": 64, "fileType": "png"}


def photo(seed: int = 3, size=(64, 64)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def as_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def decoded(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB")).astype(int)


def test_webuiapi_finds_the_extension_and_its_units_control_the_image(service):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=PORT)
    assert api.has_controlnet  # it looked for `controlnet m2m` in /sdapi/v1/scripts
    assert CANNY_TITLE in api.controlnet_model_list() and api.controlnet_version() == 2
    assert {"none", "canny", "invert", "tile_resample"} <= set(api.controlnet_module_list())
    unit = webuiapi.ControlNetUnit(image=photo(), module="canny", model=CANNY_TITLE, processor_res=64,
                                   threshold_a=80, threshold_b=160)  # fmt: skip
    common = {"prompt": "a lighthouse", "steps": 4, "width": 64, "height": 64, "seed": 9}
    controlled = api.txt2img(**common, controlnet_units=[unit])
    plain = api.txt2img(**common)
    assert len(controlled.images) == 2  # the image, then the unit's detected map (as the extension answers)
    edges = np.asarray(preprocessor("canny").run(photo(), 64, 80, 160))
    assert np.array_equal(np.asarray(controlled.images[1].convert("RGB")), edges)
    picture, without = (np.asarray(result.image.convert("RGB")).astype(int) for result in (controlled, plain))
    assert np.abs(picture - without).mean() > 1
    params = parse_infotext(controlled.info["infotexts"][0])
    assert params["ControlNet 0"].startswith(f"Module: canny, Model: {CANNY_TITLE}, Weight: 1.0")
    assert controlled.info["extra_generation_params"]["ControlNet 0"] == params["ControlNet 0"]
    detected = api.controlnet_detect([photo()], module="canny", processor_res=64, threshold_a=80, threshold_b=160)
    assert np.array_equal(np.asarray(detected.images[0].convert("RGB")), edges)


def test_detect_answers_each_images_map_in_the_extensions_shape(client):
    body = {"controlnet_module": "invert", "controlnet_input_images": [as_base64(photo()), as_base64(photo(4))]}
    answer = client.post("/controlnet/detect", json=body)
    assert answer.status_code == 200 and answer.json()["info"] == "Success"
    maps = [decoded(image) for image in answer.json()["images"]]
    assert np.array_equal(maps[0], 255 - np.asarray(photo()).astype(int)) and len(maps) == 2
    webuiapi_default = {"controlnet_module": "tile_resample", "controlnet_threshold_a": 64,
                        "controlnet_images": [as_base64(photo(size=(64, 48)))]}  # fmt: skip
    clamped = client.post("/controlnet/detect", json=webuiapi_default)  # 64 is clamped to the slider's 8
    assert clamped.status_code == 200 and Image.open(
        io.BytesIO(base64.b64decode(clamped.json()["images"][0]))
    ).size == (8, 6)
    unknown = client.post("/controlnet/detect", json={"controlnet_module": "depth_zoe",
                                                      "controlnet_input_images": [as_base64(photo())]})  # fmt: skip
    assert unknown.status_code == 422 and "depth_zoe" in unknown.json()["errors"]
    assert client.post("/controlnet/detect", json={"controlnet_module": "canny"}).status_code == 422
    for wrong in ({"controlnet_threshold_a": True}, {"controlnet_threshold_b": "64"}, {"low_vram": 1}):
        refused = client.post("/controlnet/detect", json={**webuiapi_default, **wrong})  # the schema's types, strictly
        assert refused.status_code == 422 and next(iter(wrong)) in refused.text, refused.text
    types = client.get("/controlnet/control_types").json()["control_types"]
    assert (
        CANNY_TITLE in types["Canny"]["model_list"] and types["Canny"]["default_model"] in types["Canny"]["model_list"]
    )
    assert types["All"]["default_option"] == "none" and types["Canny"]["default_option"] == "canny"
    models = {model["name"]: model for model in client.get("/controlnet/models").json()["models"]}
    assert (
        models["demo-sdxl-canny"]["family"] == "sdxl" and models["control_demo_sd15_canny"]["format"] == "single-file"
    )
    assert client.get("/controlnet/settings").json() == {"control_net_unit_count": 3}


def test_a_native_unit_controls_the_job_and_its_detected_map_comes_back(client):
    unit = {"model": "demo-sd15-canny", "module": "canny", "image": as_base64(photo()), "processor_res": 64}
    job = wait_for_job(client, submit(client, {**FAST, "seed": 4, "controlnet": [unit]}))
    plain = wait_for_job(client, submit(client, {**FAST, "seed": 4}))
    assert job["state"] == "done" and np.abs(decoded(job["image"]) - decoded(plain["image"])).mean() > 1
    (detected,) = job["controlnet_maps"]
    assert np.array_equal(decoded(detected), np.asarray(preprocessor("canny").run(photo(), 64)).astype(int))
    assert "image" not in job["payload"]["controlnet"][0] or job["payload"]["controlnet"][0]["image"] is None
    with_inputs = client.get(f"/queue/{job['job_id']}", params={"include": "inputs"}).json()
    assert "payload" in with_inputs, with_inputs
    assert with_inputs["payload"]["controlnet"][0]["image"] == unit["image"]  # stored apart, read back
    assert parse_infotext(job["infotext"])["ControlNet 0"].startswith("Module: canny, Model: demo-sd15-canny [")


def test_a_unit_that_cannot_run_is_refused_at_submission_naming_it(client):
    other_family = client.post("/txt2img", json={**FAST, "controlnet": [{"model": "demo-sdxl-canny",
                                                                         "image": as_base64(photo())}]})  # fmt: skip
    assert other_family.status_code == 422 and other_family.json()["field"] == "controlnet[0].model"
    assert "'control_demo_sd15_canny', 'demo-sd15-canny'" in other_family.json()["error"]
    unknown = client.post("/txt2img", json={**FAST, "controlnet": [{"model": "nope", "image": as_base64(photo())}]})
    assert unknown.status_code == 404 and "demo-sd15-canny" in unknown.json()["error"]
    too_many = client.post("/txt2img", json={**FAST, "controlnet": [{"model": "demo-sd15-canny"}] * 4})
    assert too_many.status_code == 422


def test_two_controlnet_jobs_queued_together_batch_and_keep_their_solo_pixels(client):
    blocker = submit(client, BLOCKER)
    wait_until_processing(client, blocker)
    bodies = [{**FAST, "seed": seed, "controlnet": [{"model": "demo-sd15-canny", "image": as_base64(photo(seed))}]}
              for seed in (21, 22)]  # fmt: skip
    assert_batched_with_solo_pixels(client, blocker, bodies)


def assert_batched_with_solo_pixels(client, blocker: str, bodies: list[dict]) -> None:
    """Jobs queued together behind `blocker` ran as one batch, and each has the pixels it has alone."""
    batched = [wait_for_job(client, job_id) for job_id in [submit(client, body) for body in bodies]]
    wait_for_job(client, blocker)
    assert [job["batch_size"] for job in batched] == [len(bodies)] * len(bodies), batched
    for body, job in zip(bodies, batched, strict=True):
        alone = wait_for_job(client, submit(client, body))
        assert alone["batch_size"] == 1
        assert np.abs(decoded(job["image"]) - decoded(alone["image"])).max() <= 2


def test_the_keyless_routes_answer_a1111s_error_body(service):
    answer = httpx.get(f"http://127.0.0.1:{PORT}/controlnet/model_list", params={"update": "maybe"}, timeout=30)
    assert answer.status_code == 422 and answer.json()["error"] == "RequestValidationError"


def test_a_depth_annotator_runs_on_the_upscaler_and_its_map_controls_the_job(client, settings):
    """The ingress runs no torch: `depth_anything` (installed by the demo) runs on the Upscaler deployment, for
    detect and for a unit, and gives the map the module makes in-process."""
    from pipelines.annotators import AnnotatorLibrary

    assert "depth_anything" in client.get("/controlnet/module_list").json()["module_list"]
    assert "depth_anything_v2" not in client.get("/controlnet/module_list").json()["module_list"]  # not installed
    here = np.asarray(AnnotatorLibrary(settings, device="cpu").preprocessor("depth_anything").run(photo(), 64))
    detected = client.post("/controlnet/detect", json={"controlnet_module": "depth_anything",
                                                       "controlnet_processor_res": 64,
                                                       "controlnet_input_images": [as_base64(photo())]})  # fmt: skip
    assert detected.status_code == 200, detected.text
    assert np.abs(decoded(detected.json()["images"][0]) - here).max() <= 1
    unit = {"model": "demo-sd15-canny", "module": "depth_anything", "image": as_base64(photo()), "processor_res": 64}
    job = wait_for_job(client, submit(client, {**FAST, "seed": 4, "controlnet": [unit]}))
    assert job["state"] == "done", job
    assert np.abs(decoded(job["controlnet_maps"][0]) - here).max() <= 1
    missing = client.post("/txt2img", json={**FAST, "controlnet": [{**unit, "module": "depth_anything_v2"}]})
    assert missing.status_code == 404 and missing.json()["field"] == "controlnet[0].module"
    assert "depth_anything_v2" in missing.json()["error"]
