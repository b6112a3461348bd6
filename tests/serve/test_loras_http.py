"""LoRAs through the service: listing, applied per job with its warning for a skipped one, no leak into the
next job on the same replica, unknown names refused before a job exists, img2img ignoring them."""

import base64
import io

import numpy as np
from PIL import Image

from pipelines.infotext import parse_infotext
from tests.serve.conftest import wait_for_job


def image_of(job: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(job["image"])))).astype(np.int16)


def run_job(client, **fields) -> dict:
    body = {"prompt": "a harbour", "steps": 5, "width": 64, "height": 64, "seed": 8, "fileType": "png", **fields}
    response = client.post("/txt2img", json=body)
    assert response.status_code == 200, response.text
    job = wait_for_job(client, response.json()["job_id"])
    assert job["state"] == "done", job
    return job


def test_loras_are_listed_with_family(client):
    body = client.get("/loras").json()
    assert body["status"] == "success"
    assert {"name": "demo-sdxl-peft", "scale": 1.0, "family": "sdxl"} in body["loras"]
    assert {"name": "demo-flux-kohya", "scale": 1.0, "family": "flux"} in body["loras"]
    assert len(body["loras"]) == 7


def test_lora_job_applies_compatible_skips_incompatible_and_does_not_leak(client):
    before = run_job(client)
    with_loras = run_job(client, loras=["demo-sdxl-peft", {"name": "demo-sd15-peft", "scale": 0.9}])
    after = run_job(client)
    assert np.abs(image_of(with_loras) - image_of(before)).mean() > 1.0
    assert np.array_equal(image_of(before), image_of(after))
    assert with_loras["warnings"] == [
        "LoRA skipped: 'demo-sdxl-peft' is an SDXL LoRA; model 'demo-sd15' is SD1.5: use it with an SDXL model."
    ]
    params = parse_infotext(with_loras["infotext"])
    assert params["Lora hashes"].startswith("demo-sd15-peft: ") and params["Prompt"].endswith(
        "<lora:demo-sd15-peft:0.9>"
    )
    tagged = run_job(client, prompt="a harbour <lora:demo-sd15-peft:0.9>")
    assert np.array_equal(image_of(tagged), image_of(with_loras))


def test_unknown_lora_is_refused_before_a_job_exists(client):
    response = client.post("/txt2img", json={"prompt": "x", "loras": [{"name": "nope", "scale": 1}]})
    assert response.status_code == 404
    assert "unknown LoRA 'nope'" in response.json()["error"] and "demo-sd15-kohya" in response.json()["error"]
    response = client.post("/txt2img", json={"prompt": "x", "loras": ["../../etc/passwd"]})
    assert response.status_code == 404 and "'loras' must not contain '..'" in response.json()["error"]
    response = client.post("/txt2img", json={"prompt": "x <lora:demo-sd15-kohya:lots>", "steps": 2, "width": 64,
                                             "height": 64})  # fmt: skip
    job = wait_for_job(client, response.json()["job_id"])  # a valid prompt: the tag is skipped, and said so
    assert job["state"] == "done" and any("weight must be a number" in line for line in job["warnings"])


def test_img2img_ignores_loras_with_a_warning(client):
    start = run_job(client)["image"]
    response = client.post("/img2img", json={"prompt": "x", "image": start, "steps": 4, "width": 64, "height": 64,
                                             "loras": ["demo-sd15-kohya"], "fileType": "png"})  # fmt: skip
    job = wait_for_job(client, response.json()["job_id"])
    assert job["state"] == "done"
    assert job["warnings"] == ["LoRAs are not applied to img2img; ignored: 'demo-sd15-kohya'"]
