"""FLUX.1 and SD 3.5 through the running service, each on its own generator deployment (SD 3.5's starts from
zero replicas when its first job comes). FLUX.1: listed with its family; a native job;
Forge-shaped A1111 payloads (`sampler_name: Euler`, `scheduler: Simple`, `cfg_scale: 1`, `distilled_cfg_scale`)
give the native job's pixels and Forge's infotext, read back by png-info and by webuiapi; two FLUX jobs batch and
keep their solo pixels; a sampler it cannot run is a 422 listing its choices. SD 3.5: a native job and an A1111
call, with the negative prompt used (ordinary CFG) and its infotext."""

import json

import numpy as np
import webuiapi

from pipelines.infotext import parse_infotext
from tests.serve.conftest import PORT, wait_for_job
from tests.serve.test_batching_http import submit, wait_until_processing
from tests.serve.test_controlnet_http import assert_batched_with_solo_pixels, decoded

FLUX = {"prompt": "a lighthouse by the sea", "model": "demo-flux-dev", "steps": 4, "width": 64, "height": 64,
        "fileType": "png"}  # fmt: skip
FLUX_BLOCKER = {**FLUX, "prompt": "busy", "steps": 40, "width": 128, "height": 128, "seed": 1}
FORGE = {"prompt": "a lighthouse by the sea", "sampler_name": "Euler", "scheduler": "Simple", "cfg_scale": 1,
         "distilled_cfg_scale": 3.5, "steps": 4, "width": 64, "height": 64, "seed": 21,
         "override_settings": {"sd_model_checkpoint": "demo-flux-dev"}}  # fmt: skip


def test_the_model_is_listed_with_its_family(client):
    models = {model["name"]: model for model in client.get("/models").json()["models"]}
    assert models["demo-flux-dev"]["family"] == "flux" and models["demo-flux-dev"]["label"] == "Demo FLUX.1-dev"
    titles = [model["title"] for model in client.get("/sdapi/v1/sd-models").json()]
    assert any(title.startswith("demo-flux-dev [") for title in titles)


def test_families_say_what_their_models_take_and_default_to(client):
    """GET /families: a client that picked a model in /models builds its request from its family's row; the
    rows are what the jobs accept (a sampler listed runs, one not listed is refused)."""
    families = {family["name"]: family for family in client.get("/families").json()["families"]}
    assert set(families) == {"sd15", "sdxl", "sdxl-refiner", "flux", "sd3"}
    flux, sd3, sd15 = families["flux"], families["sd3"], families["sd15"]
    assert flux["samplers"] == ["Euler", "DPM++ 2M", "UniPC"] and flux["guidance"] == "distilled"
    assert flux["defaults"] == {"sampler_name": "Euler", "scheduler_type": "simple", "cfg_scale": 1.0,
                                "distilled_cfg_scale": 3.5}  # fmt: skip
    assert (flux["sizes_multiple_of"], flux["native_size"]) == (16, {"width": 1024, "height": 1024})
    assert not flux["latent_hires"] and sd3["latent_hires"] and families["sd15"]["latent_hires"]
    assert sd3["defaults"]["cfg_scale"] == 4.5 and sd3["guidance"] == "cfg" and "Heun" in sd3["samplers"]
    assert sd15["defaults"] == {"sampler_name": "DPM++ 2M", "scheduler_type": "karras", "cfg_scale": 7.0,
                                "distilled_cfg_scale": None}  # fmt: skip
    assert (
        "Euler a" in sd15["samplers"] and "Euler a" not in flux["samplers"] and not families["sdxl-refiner"]["txt2img"]
    )
    job = wait_for_job(client, submit(client, {**FLUX, "sampler_name": flux["samplers"][-1],
                                               "scheduler_type": flux["schedule_types"][-1]}))  # fmt: skip
    assert job["state"] == "done", job
    assert parse_infotext(job["infotext"])["Sampler"] == flux["samplers"][-1]
    models = {model["name"]: model for model in client.get("/models").json()["models"]}
    assert models["demo-sd35"]["max_size"] == models["demo-flux-dev"]["max_size"] == 2048  # limits.yaml's


def test_a_native_job_runs_on_the_flux_generator_with_forges_defaults(client):
    job = wait_for_job(client, submit(client, {**FLUX, "seed": 3, "negative_prompt": "blurry"}))
    assert job["state"] == "done", job
    params = parse_infotext(job["infotext"])
    assert params["Sampler"] == "Euler" and params["Schedule type"] == "Simple"
    assert float(params["CFG scale"]) == 1.0 and params["Distilled CFG Scale"] == "3.5"
    assert any("negative_prompt not used" in warning for warning in job["warnings"])
    true_cfg = wait_for_job(client, submit(client, {**FLUX, "seed": 3, "negative_prompt": "blurry", "cfg_scale": 4}))
    assert np.abs(decoded(true_cfg["image"]) - decoded(job["image"])).max() > 2
    bad = client.post("/txt2img", json={**FLUX, "width": 72})
    assert bad.status_code == 422 and bad.json()["field"] == "width" and "multiple of 16" in bad.json()["error"]


def test_a_forge_shaped_payload_gives_the_native_pixels_and_forges_infotext(client):
    answer = client.post("/sdapi/v1/txt2img", json=FORGE)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    info = json.loads(body["info"])
    assert info["cfg_scale"] == 1.0 and info["sampler_name"] == "Euler"
    assert info["extra_generation_params"]["Distilled CFG Scale"] == "3.5"
    assert info["extra_generation_params"]["Schedule type"] == "Simple"
    native = wait_for_job(client, submit(client, {**FLUX, "seed": 21}))
    assert np.abs(decoded(body["images"][0]) - decoded(native["image"])).max() <= 2
    read = client.post("/sdapi/v1/png-info", json={"image": body["images"][0]}).json()
    assert read["info"] == info["infotexts"][0]
    assert read["parameters"]["Distilled CFG Scale"] == "3.5" and read["parameters"]["Schedule type"] == "Simple"
    stronger = client.post("/sdapi/v1/txt2img", json={**FORGE, "distilled_cfg_scale": 7}).json()
    assert np.abs(decoded(stronger["images"][0]) - decoded(body["images"][0])).max() > 2


def test_webuiapi_calls_flux_with_a_forge_payload(service):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=PORT, sampler="Euler", steps=4)
    result = api.txt2img(prompt="a lighthouse by the sea", width=64, height=64, seed=21, cfg_scale=1,
                         scheduler="Simple", override_settings={"sd_model_checkpoint": "demo-flux-dev"})  # fmt: skip
    assert result.image.size == (64, 64)
    assert parse_infotext(result.info["infotexts"][0])["Model"] == "demo-flux-dev"
    assert "Distilled CFG Scale: 3.5" in api.png_info(result.image).info


def test_a_sampler_flux_cannot_run_is_a_422_listing_its_choices(client):
    """A1111 knows 'Euler a'; FLUX.1's flow-matching table does not have it."""
    answer = client.post("/sdapi/v1/txt2img", json={**FORGE, "sampler_name": "Euler a"})
    assert answer.status_code == 422, answer.text
    assert "for FLUX.1 models; valid: Euler, DPM++ 2M, UniPC" in answer.json()["detail"]
    native = client.post("/txt2img", json={**FLUX, "sampler_name": "Euler a"})
    assert native.status_code == 422 and native.json()["field"] == "sampler_name"


def test_the_a1111_door_names_its_own_fields_in_the_familys_refusals(client):
    """The family's checks run on the native job; an A1111 client is told the field it sent: `scheduler`, not
    the native `scheduler_type`; `hr_upscaler`, not `hires.upscaler`."""
    answer = client.post("/sdapi/v1/txt2img", json={**FORGE, "scheduler": "SGM Uniform"})
    assert answer.status_code == 422, answer.text
    detail = answer.json()["detail"]
    assert detail.startswith("unknown scheduler 'sgm_uniform' for FLUX.1 models; valid: Automatic, Simple"), detail
    answer = client.post("/sdapi/v1/txt2img", json={**FORGE, "enable_hr": True, "hr_upscaler": "Latent"})
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"].endswith("choose a model upscaler or Lanczos for hr_upscaler")
    native = client.post("/txt2img", json={**FLUX, "hires": {"enabled": True, "upscaler": "Latent"}})
    assert native.status_code == 422 and native.json()["field"] == "hires.upscaler"


def test_two_flux_jobs_batch_and_keep_their_solo_pixels(client):
    blocker = submit(client, FLUX_BLOCKER)
    wait_until_processing(client, blocker)
    bodies = [{**FLUX, "seed": 31, "prompt": "a red house"}, {**FLUX, "seed": 32, "prompt": "a cat in the snow"}]
    assert_batched_with_solo_pixels(client, blocker, bodies)


def test_sd35_jobs_through_both_doors(client):
    native = {**FLUX, "model": "demo-sd35", "seed": 41, "negative_prompt": "blurry"}
    job = wait_for_job(client, submit(client, native), timeout=180)  # its replica starts from zero first
    assert job["state"] == "done", job
    params = parse_infotext(job["infotext"])
    assert (params["Sampler"], params["Schedule type"], params["CFG scale"]) == ("Euler", "Simple", "4.5")
    assert params["Model"] == "demo-sd35" and not job["warnings"]
    answer = client.post("/sdapi/v1/txt2img", json={"prompt": FLUX["prompt"], "negative_prompt": "red", "steps": 4,
                                                    "width": 64, "height": 64, "seed": 41, "cfg_scale": 4.5,
                                                    "override_settings": {"sd_model_checkpoint": "Demo SD 3.5"}},
                         timeout=180)  # fmt: skip
    assert answer.status_code == 200, answer.text
    assert np.abs(decoded(answer.json()["images"][0]) - decoded(job["image"])).max() > 2  # another negative prompt
    models = {model["name"]: model["family"] for model in client.get("/models").json()["models"]}
    assert models["demo-sd35"] == models["demo-sd35-single"] == "sd3"
    # Stability's single-file layout with the text encoders as modules: the folder's pixels, Module N infotext
    single = client.post("/sdapi/v1/txt2img", json={
        "prompt": FLUX["prompt"], "negative_prompt": "blurry", "steps": 4, "width": 64, "height": 64, "seed": 41,
        "override_settings": {"sd_model_checkpoint": "Demo SD 3.5 (single file)"}}, timeout=180)  # fmt: skip
    assert single.status_code == 200, single.text
    assert np.abs(decoded(single.json()["images"][0]) - decoded(job["image"])).max() == 0
    params = parse_infotext(json.loads(single.json()["info"])["infotexts"][0])
    assert (params["Model"], params["Module 2"], params["CFG scale"]) == ("demo-sd35-single", "demo-clip-g", "4.5")


def test_the_single_file_with_forges_modules_through_the_a1111_door(client):
    """Black Forest Labs' layout with separate modules, as Forge clients name them (full paths work)."""
    listed = client.get("/sdapi/v1/sd-modules").json()
    names = {module["model_name"] for module in listed}
    assert names == {f"{name}.safetensors" for name in ("flux-ae", "demo-clip-l", "demo-clip-g", "demo-t5xxl")}
    modules = [module for module in listed if module["model_name"] != "demo-clip-g.safetensors"]  # SD 3.5's
    forge = {**FORGE, "override_settings": {"sd_model_checkpoint": "demo-flux-dev-single",
                                            "forge_additional_modules": [m["filename"] for m in modules]}}  # fmt: skip
    answer = client.post("/sdapi/v1/txt2img", json=forge)
    assert answer.status_code == 200, answer.text
    folder = client.post("/sdapi/v1/txt2img", json=FORGE).json()  # the same weights as a diffusers folder
    assert np.abs(decoded(answer.json()["images"][0]) - decoded(folder["images"][0])).max() == 0
    params = parse_infotext(json.loads(answer.json()["info"])["infotexts"][0])
    assert (params["Module 1"], params["Module 2"], params["Module 3"]) == ("flux-ae", "demo-clip-l", "demo-t5xxl")
    other = {**forge, "override_settings": {**forge["override_settings"], "forge_additional_modules": ["ae"]}}
    refused = client.post("/sdapi/v1/txt2img", json=other)
    assert refused.status_code == 422 and "not the modules model 'demo-flux-dev-single' runs with" in refused.text
