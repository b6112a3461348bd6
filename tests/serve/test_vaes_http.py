"""VAE choice and textual-inversion embeddings through HTTP: listings, jobs that use them, A1111's `sd_vae`."""

import base64
import io
import json

from PIL import Image

from pipelines.infotext import parse_infotext
from tests.serve.conftest import wait_for_job

FAST = {"prompt": "a lighthouse", "steps": 4, "width": 64, "height": 64, "seed": 21, "fileType": "png"}


def test_vaes_are_listed_chosen_per_job_and_checked_at_submission(client):
    assert client.get("/vaes").json()["vaes"][0]["name"] == "demo-vae-ft"
    own = wait_for_job(client, client.post("/txt2img", json=FAST).json()["job_id"])
    chosen = wait_for_job(client, client.post("/txt2img", json={**FAST, "vae": "demo-vae-ft"}).json()["job_id"])
    pixels = [Image.open(io.BytesIO(base64.b64decode(job["image"]))).tobytes() for job in (own, chosen)]
    assert pixels[0] != pixels[1]
    assert parse_infotext(chosen["infotext"])["VAE"] == "demo-vae-ft.safetensors"
    unknown = client.post("/txt2img", json={**FAST, "vae": "vae-ft-mse-840000-ema-pruned"})
    assert unknown.status_code == 404 and "demo-vae-ft" in unknown.json()["error"]


def test_a1111_sd_vae_override(client):
    body = {"prompt": "a lighthouse", "steps": 3, "width": 64, "height": 64,
            "override_settings": {"sd_vae": "demo-vae-ft.safetensors"}}  # fmt: skip
    info = json.loads(client.post("/sdapi/v1/txt2img", json=body).json()["info"])
    assert info["sd_vae_name"] == "demo-vae-ft.safetensors" and len(info["sd_vae_hash"]) == 10
    automatic = {**body, "override_settings": {"sd_vae": "Automatic"}}
    assert json.loads(client.post("/sdapi/v1/txt2img", json=automatic).json()["info"])["sd_vae_name"] is None


def test_embeddings_are_listed_and_used_by_name(client):
    listed = client.get("/embeddings").json()["embeddings"]
    assert {"name": "demo-style", "family": "sd15"} in listed
    job_id = client.post("/txt2img", json={**FAST, "prompt": "a lighthouse, demo-style"}).json()["job_id"]
    assert parse_infotext(wait_for_job(client, job_id)["infotext"])["TI hashes"].startswith("demo-style: ")
    foreign = client.post("/txt2img", json={**FAST, "prompt": "a lighthouse, demo-xl-style"}).json()["job_id"]
    assert any("demo-xl-style" in warning for warning in wait_for_job(client, foreign)["warnings"])
