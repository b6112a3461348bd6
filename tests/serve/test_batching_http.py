"""Cross-request batching through the real service: compatible jobs from separate requests run as one batch,
each gets the image it gets alone, and cancelling one job of a running batch leaves its batch-mates alone."""

import base64
import io
import time

import numpy as np
from PIL import Image

from pipelines.infotext import read_infotext
from tests.serve.conftest import wait_for_job

# A job with another batch key that keeps the SD1.5 generator busy while the jobs under test queue up.
BLOCKER = {"prompt": "busy", "model": "Demo SD1.5", "steps": 40, "width": 128, "height": 128, "seed": 1}
SMALL = {"model": "Demo SD1.5", "steps": 6, "width": 64, "height": 64, "fileType": "png"}


def submit(client, body: dict) -> str:
    response = client.post("/txt2img", json=body)
    assert response.status_code == 200, response.text
    return response.json()["job_id"]


def wait_until_processing(client, job_id: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while client.get(f"/queue/{job_id}").json()["state"] == "queued":
        assert time.monotonic() < deadline, f"job {job_id} never started"
        time.sleep(0.05)


def image_pixels(job: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(job["image"])))).astype(np.float64)


def test_generators_warm_up_their_models_before_taking_traffic(client):
    """The configured warm-up (WARMUP in conftest) ran in each replica's constructor: its models are loaded
    before any job asked for them, and a family's generator warmed only its own family's models."""
    loaded = {report["deployment"]: report["loaded_models"] for report in client.get("/health").json()["replicas"]}
    assert loaded["SD15Generator"] == ["demo-sd15"]
    assert loaded["SDXLGenerator"] == []
    assert loaded.get("Refiner", ["demo-sdxl-refiner"]) == ["demo-sdxl-refiner"]  # when up (it scales to zero)


def test_jobs_queued_together_run_as_one_batch_with_the_pixels_each_gets_alone(client):
    blocker = submit(client, BLOCKER)
    wait_until_processing(client, blocker)
    prompts = {101: "a lighthouse", 102: "a red fox, snow", 103: "", 104: "a mill"}
    bodies = [SMALL | {"prompt": prompt, "seed": seed} for seed, prompt in prompts.items()]
    batched = [wait_for_job(client, job_id) for job_id in [submit(client, body) for body in bodies]]
    assert wait_for_job(client, blocker)["batch_size"] == 1
    assert [job["state"] for job in batched] == ["done"] * 4, batched
    assert [job["batch_size"] for job in batched] == [4, 4, 4, 4]
    for body, job in zip(bodies, batched, strict=True):
        alone = wait_for_job(client, submit(client, body))
        assert alone["batch_size"] == 1
        assert np.abs(image_pixels(job) - image_pixels(alone)).mean() <= 1.0  # <= 1/255 on average
        assert job["infotext"] == alone["infotext"]
        assert read_infotext(base64.b64decode(job["image"])) == job["infotext"]
        assert job["seed"] == body["seed"]


def test_cancelling_one_job_of_a_running_batch_leaves_its_batch_mates_alone(client, service):
    blocker = submit(client, BLOCKER)
    wait_until_processing(client, blocker)
    ids = [submit(client, SMALL | {"prompt": "a slow batch", "steps": 60, "seed": seed}) for seed in (201, 202, 203)]
    wait_until_processing(client, ids[0])  # the blocker is done and the three run as one batch
    assert client.delete(f"/queue/{ids[1]}").status_code == 200
    first, cancelled, last = (wait_for_job(client, job_id, timeout=120) for job_id in ids)
    assert (first["state"], last["state"]) == ("done", "done")
    assert first["batch_size"] == last["batch_size"] == 3
    assert cancelled["state"] == "cancelled" and cancelled["image"] is None and cancelled["progress"] < 100
    assert not list(service["images"].glob(f"*/{ids[1]}.*"))  # its image was discarded, not written
    assert wait_for_job(client, blocker)["state"] == "done"
