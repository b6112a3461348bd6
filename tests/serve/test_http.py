"""End-to-end through HTTP against a real Serve application on the demo models."""

import base64
import io
from pathlib import Path

import pytest
from PIL import Image

from pipelines.infotext import parse_infotext, read_infotext
from tests.serve.conftest import wait_for_job


def test_hello_and_health(client):
    assert client.get("/hello").json() == {"ok": True}
    health = client.get("/health").json()
    assert health["status"] in ("healthy", "warning")
    assert health["models"]["count"] == 10
    assert health["system"]["cpu_count"] >= 1 and health["system"]["memory_total_gb"] > 0
    assert "cuda_available" in health["gpu"] and health["outputs"]["free_space_gb"] > 0
    # GPU figures come from the generator replicas, which report their device and loaded models.
    deployments = {replica["deployment"] for replica in health["replicas"]}
    assert {"SD15Generator", "SDXLGenerator"} <= deployments  # the Refiner is at zero replicas while unused
    assert all(replica["device"] == "cpu" and "loaded_models" in replica for replica in health["replicas"])


def test_listings(client):
    models = client.get("/models").json()
    assert {"name": "demo-sd15", "label": "Demo SD1.5", "family": "sd15", "inpainting": False,
            "max_size": 2048} in models["models"]  # fmt: skip
    aliases = client.get("/models/aliases").json()
    assert {"name": "models--demo--tiny-sdxl-base", "label": "Demo SDXL"} in aliases["models"]
    methods = client.get("/sampling_methods").json()
    assert "DPM++ 2M Karras" in methods["sampling_methods"] and "karras" in methods["scheduler_types"]
    assert client.get("/upscalers").json()["upscalers"][0] == {"name": "Latent", "path": "internal"}
    assert client.get("/loras").json()["status"] == "success"


@pytest.mark.parametrize(("model", "file_type", "pil_format"),
                         [("Demo SD1.5", "jpg", "JPEG"), ("Demo SDXL", "png", "PNG")])  # fmt: skip
def test_txt2img_job_reaches_done_with_every_field(client, model, file_type, pil_format):
    body = {"prompt": "a lighthouse, café", "model": model, "steps": 6, "width": 64, "height": 96, "seed": 21,
            "fileType": file_type}  # fmt: skip
    submitted = client.post("/txt2img", json=body)
    assert submitted.status_code == 200
    assert submitted.json()["status"] == "queued"
    job = wait_for_job(client, submitted.json()["job_id"])
    assert job["state"] == "done", job
    assert job["progress"] == 100 and job["current_phase"] == "done"
    assert job["_progress_seen"] == sorted(job["_progress_seen"])  # never backwards
    assert (job["width"], job["height"], job["file_type"], job["seed"]) == (64, 96, file_type, 21)
    assert job["generation_time_sec"] > 0 and job["memory_before_mb"] > 0 and job["memory_after_mb"] > 0
    assert job["payload"]["prompt"] == "a lighthouse, café" and isinstance(job["warnings"], list)
    data = base64.b64decode(job["image"])
    image = Image.open(io.BytesIO(data))
    assert image.format == pil_format and image.size == (64, 96)
    assert job["output_path"].startswith("file:///")  # the suite's output storage is a file:// URL
    assert Path(job["output_path"].removeprefix("file://")).read_bytes() == data
    assert parse_infotext(read_infotext(data))["Seed"] == "21"


def test_img2img_job(client):
    buffer = io.BytesIO()
    Image.new("RGB", (80, 80), (0, 120, 255)).save(buffer, format="PNG")
    image = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    submitted = client.post("/img2img", json={"prompt": "sea", "image": image, "steps": 8, "width": 64,
                                               "height": 64, "denoising_strength": 0.5, "seed": 4})  # fmt: skip
    job = wait_for_job(client, submitted.json()["job_id"])
    assert job["state"] == "done", job
    assert "Denoising strength: 0.5" in job["infotext"]


@pytest.mark.parametrize(
    ("path", "body", "status", "expected"),
    [
        ("/txt2img", {"prompt": "x", "model": "nope"}, 404, "unknown model 'nope'"),
        ("/txt2img", {"prompt": "x", "model": "../etc"}, 404, "'model' must not contain '..'"),
        ("/txt2img", {"prompt": "x", "steps": 0}, 422, "steps"),
        ("/txt2img", {"prompt": "x", "width": 65}, 422, "width"),
        ("/txt2img", {"prompt": "x", "sampler_name": "Euler z"}, 422, "sampler_name"),
        ("/txt2img", {"prompt": "x", "fileType": "bmp"}, 422, "fileType"),
        ("/txt2img", {"prompt": "x", "model": "Demo SDXL Refiner"}, 404, "not a txt2img model"),
        ("/txt2img", {"prompt": "x", "seed": False}, 422, "seed: Input should be a valid integer"),
        ("/txt2img", {"prompt": "x", "steps": "8"}, 422, "steps: Input should be a valid integer"),
        ("/txt2img", {"prompt": "x", "hires": {"enabled": 1}}, 422, "hires.enabled"),
        ("/txt2img", {"prompt": "x", "sampler_name": "euler a"}, 422, "sampler_name"),
        ("/img2img", {"prompt": "x", "image": "not base64!"}, 422, "'image'"),
        ("/txt2img", {}, 422, "prompt"),
    ],
)
def test_bad_requests_get_clear_4xx(client, path, body, status, expected):
    response = client.post(path, json=body)
    assert response.status_code == status, response.text
    assert response.json()["status"] == "error"
    assert expected in response.json()["error"]


def test_unknown_job_is_404_and_a_malformed_id_422(client):
    response = client.get(f"/queue/{'0' * 32}")
    assert response.status_code == 404
    assert response.json() == {"status": "error", "error": f"unknown job_id '{'0' * 32}'"}
    malformed = client.get("/queue/does-not-exist")
    assert malformed.status_code == 422 and "job_id" in malformed.json()["error"]


def test_openapi_shows_the_real_contract(client):
    schema = client.get("/openapi.json").json()
    request = schema["components"]["schemas"]["Txt2ImgRequest"]["properties"]
    assert {"prompt", "fileType", "sampler_name", "scheduler_type", "refiner_switch_at", "seed"} <= set(request)
    assert "/queue/{job_id}" in schema["paths"] and "/img2img" in schema["paths"]
    assert client.get("/docs").status_code == 200
