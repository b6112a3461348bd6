"""Hires fix, external upscalers (through the Upscaler deployment) and the refiner (through the Refiner
deployment) over HTTP on the demo models."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from pipelines.infotext import parse_infotext
from tests.serve.conftest import wait_for_job


def submit(client, path: str = "/txt2img", **fields) -> dict:
    body = {"prompt": "a mill by a river", "steps": 8, "width": 64, "height": 64, "seed": 12, "fileType": "png",
            **fields}  # fmt: skip
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    job = wait_for_job(client, response.json()["job_id"], timeout=120)
    assert job["state"] == "done", job
    return job


def image_of(job: dict) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(job["image"])))


def test_upscalers_are_listed_latent_first(client):
    listed = client.get("/upscalers").json()["upscalers"]
    assert listed[0] == {"name": "Latent", "path": "internal"}
    assert {"name": "Latent (bicubic antialiased)", "path": "internal"} in listed
    assert listed[-1]["name"] == "demo-esrgan-x4" and listed[-1]["path"].endswith("demo-esrgan-x4.pth")


@pytest.mark.parametrize(("scale", "upscaler", "size"),
                         [(2, "Latent", (128, 128)), (1.5, "Latent (antialiased)", (96, 96)),
                          (2, "demo-esrgan-x4", (128, 128))])  # fmt: skip
def test_hires_fix_gives_the_final_size(client, scale, upscaler, size):
    hires = {"enabled": True, "scale": scale, "upscaler": upscaler, "steps": 8, "denoising_strength": 0.5}
    job = submit(client, hires=hires)
    assert (job["width"], job["height"]) == size == image_of(job).size
    assert job["_progress_seen"] == sorted(job["_progress_seen"])
    params = parse_infotext(job["infotext"])
    assert params["Size-1"] == "64" and params["Hires upscaler"] == upscaler


def test_refiner_changes_the_image_on_txt2img_and_img2img(client):
    base = submit(client, model="Demo SDXL", steps=10)
    refined = submit(client, model="Demo SDXL", steps=10, refiner_checkpoint="Demo SDXL Refiner")
    difference = np.abs(np.asarray(image_of(base), float) - np.asarray(image_of(refined), float)).mean()
    assert difference > 0.1
    assert parse_infotext(refined["infotext"])["Refiner"].startswith("demo-sdxl-refiner [")
    img2img = submit(client, "/img2img", model="Demo SDXL", steps=10, image=base["image"], denoising_strength=0.6,
                     refiner_checkpoint="Demo SDXL Refiner", refiner_switch_at=0.7)  # fmt: skip
    assert parse_infotext(img2img["infotext"])["Refiner switch at"] == "0.7"


@pytest.mark.parametrize(
    ("fields", "status", "message"),
    [({"hires": {"enabled": True, "upscaler": "nope"}}, 404, "unknown upscaler 'nope'"),
     ({"hires": {"enabled": True, "scale": 9}}, 422, "hires.scale"),
     ({"model": "Demo SDXL", "refiner_checkpoint": "Demo SD1.5"}, 404, "is not an SDXL refiner"),
     ({"model": "Demo SDXL", "refiner_checkpoint": "nope"}, 404, "unknown refiner_checkpoint 'nope'"),
     ({"model": "Demo SDXL", "refiner_checkpoint": "Demo SDXL Refiner", "refiner_switch_at": 0}, 422,
      "refiner_switch_at")],
)  # fmt: skip
def test_invalid_hires_and_refiner_fields_are_4xx_before_a_job_exists(client, fields, status, message):
    response = client.post("/txt2img", json={"prompt": "x", "width": 64, "height": 64, **fields})
    assert response.status_code == status, response.text
    assert response.json()["status"] == "error" and message in response.json()["error"]


@pytest.mark.parametrize(
    ("fields", "warning"),
    [({"hires": {"enabled": True, "scale": 4}, "width": 1024, "height": 64}, "upscaled 2x to 2048x128 instead"),
     ({"refiner_checkpoint": "Demo SDXL Refiner"}, "refiner 'demo-sdxl-refiner' not used: a refiner continues SDXL"),
     ({"model": "Demo SDXL", "refiner_checkpoint": "Demo SDXL Refiner", "hires": {"enabled": True, "steps": 2}},
      "hires fix and a refiner in one job are not supported")],
)  # fmt: skip
def test_valid_fields_that_cannot_all_apply_run_with_a_warning(client, fields, warning):
    """Each field is within its schema, so the job runs; what could not apply is said in its warnings."""
    job = submit(client, **{"steps": 2, **fields})
    assert any(warning in line for line in job["warnings"]), job["warnings"]


def test_hires_sent_to_img2img_is_ignored_and_said_so(client):
    start = submit(client)["image"]
    job = submit(client, "/img2img", image=start, hires={"enabled": True}, steps=4)
    assert job["width"] == 64
    assert any("unknown field(s) ignored: 'hires'" in line and "txt2img only" in line for line in job["warnings"])
