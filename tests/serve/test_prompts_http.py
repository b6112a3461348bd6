"""A1111 prompt emphasis and long prompts through HTTP (native and A1111 APIs) on the running service."""

import base64
import io
import json

from PIL import Image

from tests.serve.conftest import wait_for_job

FAST = {"steps": 4, "width": 64, "height": 64, "seed": 8, "fileType": "png"}


def image_of(client, prompt: str) -> bytes:
    """The job's pixels (the PNG files differ anyway: each carries its prompt as written)."""
    job_id = client.post("/txt2img", json={"prompt": prompt, **FAST}).json()["job_id"]
    job = wait_for_job(client, job_id)
    assert job["state"] == "done" and not any("tokens" in warning for warning in job["warnings"]), job
    return Image.open(io.BytesIO(base64.b64decode(job["image"]))).tobytes()


def test_emphasis_and_long_prompts_through_both_apis(client):
    head = ", ".join(["a mountain"] * 40)
    assert image_of(client, "a fox") == image_of(client, "(a fox:1.0)") != image_of(client, "((a fox))")
    assert image_of(client, f"{head}, a lake") != image_of(client, f"{head}, a desert")
    body = {"prompt": "[a fox] BREAK (snow:1.3)", "steps": 4, "width": 64, "height": 64, "seed": 8}
    answer = client.post("/sdapi/v1/txt2img", json=body)
    assert answer.status_code == 200
    assert json.loads(answer.json()["info"])["infotexts"][0].startswith("[a fox] BREAK (snow:1.3)\n")
