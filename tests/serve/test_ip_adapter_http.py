"""IP-Adapter through the running service: the real `webuiapi` client's IP-Adapter unit (module
`ip-adapter_clip_sd15`, as A1111 clients send it) end to end, the adapters in the extension's listings, native
units with one and several reference images (stored apart and read back), bad units as 4xx naming them, and
two jobs of one reference batched together keeping their solo pixels."""

import numpy as np
import webuiapi

from pipelines.infotext import parse_infotext
from tests.serve.conftest import PORT, wait_for_job
from tests.serve.test_batching_http import BLOCKER, submit, wait_until_processing
from tests.serve.test_controlnet_http import FAST, as_base64, assert_batched_with_solo_pixels, decoded, photo

ADAPTER = "ip-adapter_demo_sd15"


def unit(**fields) -> dict:
    return {"model": ADAPTER, "module": "ip-adapter_clip_sd15", "image": as_base64(photo(11)), **fields}


def test_webuiapi_sends_an_ip_adapter_unit_and_the_reference_changes_the_image(service):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=PORT)
    titles = api.controlnet_model_list()
    title = next(title for title in titles if title.startswith(f"{ADAPTER} ["))
    assert "ip-adapter_clip_sd15" in api.controlnet_module_list()
    common = {"prompt": "a lighthouse", "steps": 4, "width": 64, "height": 64, "seed": 9}
    reference = webuiapi.ControlNetUnit(image=photo(11), module="ip-adapter_clip_sd15", model=title, weight=0.9)
    other = webuiapi.ControlNetUnit(image=photo(12), module="ip-adapter_clip_sd15", model=title, weight=0.9)
    guided, plain, second = (api.txt2img(**common, controlnet_units=units) for units in ([reference], [], [other]))
    assert len(guided.images) == 1  # an IP-Adapter unit has no detected map to append
    picture, without, another = (
        np.asarray(result.image.convert("RGB")).astype(int) for result in (guided, plain, second)
    )
    assert np.abs(picture - without).mean() > 1 and np.abs(picture - another).mean() > 0.5
    params = parse_infotext(guided.info["infotexts"][0])
    assert params["ControlNet 0"].startswith(f"Module: ip-adapter_clip_sd15, Model: {title}, Weight: 0.9")
    zero = webuiapi.ControlNetUnit(image=photo(11), module="ip-adapter_clip_sd15", model=title, weight=0.0)
    assert np.array_equal(np.asarray(api.txt2img(**common, controlnet_units=[zero]).image.convert("RGB")), without)


def test_the_listings_name_the_adapters(client):
    models = {model["name"]: model for model in client.get("/controlnet/models").json()["models"]}
    assert models[ADAPTER]["type"] == "ip-adapter" and models[ADAPTER]["family"] == "sd15"
    assert models["demo-sd15-canny"]["type"] == "controlnet"
    types = client.get("/controlnet/control_types").json()["control_types"]
    assert any(title.startswith(ADAPTER) for title in types["IP-Adapter"]["model_list"])
    assert types["IP-Adapter"]["default_option"] == "ip-adapter_clip_sd15"
    detect = client.post("/controlnet/detect", json={"controlnet_module": "ip-adapter_clip_sd15",
                                                     "controlnet_input_images": [as_base64(photo())]})  # fmt: skip
    assert detect.status_code == 422  # it makes no map: the encoder runs with the job


def test_native_units_with_several_references_come_back_as_sent(client):
    references = [as_base64(photo(11)), as_base64(photo(13))]
    job = wait_for_job(client, submit(client, {**FAST, "seed": 4, "controlnet": [unit(image=references)]}))
    one = wait_for_job(client, submit(client, {**FAST, "seed": 4, "controlnet": [unit()]}))
    assert job["state"] == one["state"] == "done", job
    assert np.abs(decoded(job["image"]) - decoded(one["image"])).mean() > 0.5
    assert job["controlnet_maps"] == [None]  # no map for an IP-Adapter unit
    with_inputs = client.get(f"/queue/{job['job_id']}", params={"include": "inputs"}).json()
    assert with_inputs["payload"]["controlnet"][0]["image"] == references  # stored apart, read back in order


def test_bad_ip_adapter_units_are_4xx_naming_the_unit(client):
    def refused(units: list[dict]) -> dict:
        answer = client.post("/txt2img", json={**FAST, "controlnet": units})
        assert 400 <= answer.status_code < 500, answer.text
        return answer.json()

    assert refused([unit(module="canny")])["field"] == "controlnet[0].module"
    assert refused([unit(module="ip-adapter_clip_sdxl")])["field"] == "controlnet[0].module"  # no clip_g encoder
    several = refused([{"model": "demo-sd15-canny", "image": [as_base64(photo()), as_base64(photo(4))]}])
    assert several["field"] == "controlnet[0].image" and "IP-Adapter" in several["error"]
    other_family = client.post("/txt2img", json={**FAST, "model": "Demo SDXL", "controlnet": [unit()]})
    assert other_family.status_code == 422 and other_family.json()["field"] == "controlnet[0].model"
    bad_image = refused([unit(image=[as_base64(photo()), "bm90IGFuIGltYWdl"])])
    assert bad_image["field"] == "controlnet[0].image[1]"


def test_two_jobs_of_one_reference_batch_and_keep_their_solo_pixels(client):
    blocker = submit(client, BLOCKER)
    wait_until_processing(client, blocker)
    assert_batched_with_solo_pixels(
        client, blocker, [{**FAST, "seed": seed, "controlnet": [unit()]} for seed in (21, 22)]
    )


def test_a_bad_image_field_is_one_clear_422(client):
    for image in ("", [], [as_base64(photo())] * 5, 3):
        answer = client.post("/txt2img", json={**FAST, "controlnet": [unit(image=image)]})
        assert answer.status_code == 422, answer.text
        assert (
            "a base64 image (a non-empty string), or for an IP-Adapter unit a list of 1 to 4" in answer.json()["error"]
        )
