"""Autoscaling on the job store's queue, on the production config (fake GPUs leave room for one more
replica): the SD1.5 generator grows past its minimum under a queued burst and shrinks back; the Refiner, at
zero replicas while unused, starts one for a job (which says it waits for it) and goes back to zero."""

import base64
import io
import time

from PIL import Image
from ray import serve

from tests.serve.conftest import MAX_QUEUED_JOBS, wait_for_job

LONG_JOB = {"prompt": "load", "model": "Demo SD1.5", "steps": 150, "width": 256, "height": 256}


def running_replicas(deployment: str) -> int:
    status = serve.status().applications["diffusion_api"].deployments[deployment]
    return status.replica_states.get("RUNNING", 0)


def any_replicas(deployment: str) -> int:
    """Replicas in any state (starting, running, stopping)."""
    return sum(serve.status().applications["diffusion_api"].deployments[deployment].replica_states.values())


def wait_for_replicas(deployment: str, wanted, timeout: float = 120, count=running_replicas) -> None:
    deadline = time.monotonic() + timeout
    while not wanted(count(deployment)):
        assert time.monotonic() < deadline, f"{deployment}: {running_replicas(deployment)} replicas: {serve.status()}"
        time.sleep(1)


def refiner_job() -> dict:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 90, 60)).save(buffer, format="PNG")
    return {"prompt": "refined", "model": "Demo SDXL Refiner", "steps": 3, "width": 64, "height": 64, "seed": 4,
            "image": base64.b64encode(buffer.getvalue()).decode(), "denoising_strength": 0.5}  # fmt: skip


def test_sd15_generator_scales_on_its_queue_and_back(client):
    wait_for_replicas("SD15Generator", lambda count: count == 1)
    # More images queued and running than target_images_per_replica (8) for one replica: Serve adds one after
    # upscale_delay_s; the jobs wait in the job store's queue meanwhile.
    job_ids = [
        client.post("/txt2img", json=LONG_JOB | {"seed": seed}).json()["job_id"] for seed in range(MAX_QUEUED_JOBS)
    ]
    try:
        wait_for_replicas("SD15Generator", lambda count: count >= 2)
    finally:
        for job_id in job_ids:
            client.delete(f"/queue/{job_id}")
    states = {wait_for_job(client, job_id, timeout=120)["state"] for job_id in job_ids}
    assert states <= {"cancelled", "done"}
    wait_for_replicas("SD15Generator", lambda count: count == 1)  # the queue is empty: back to its minimum


def test_the_refiner_scales_from_zero_for_a_job_and_back_to_zero(client):
    wait_for_replicas("Refiner", lambda count: count == 0, count=any_replicas)  # unused: none (no GPU held)
    for round_ in range(2):  # the first job after idle, each time
        job_id = client.post("/img2img", json=refiner_job() | {"seed": round_}).json()["job_id"]
        status = client.get(f"/queue/{job_id}").json()
        assert status["state"] == "queued" and status["current_phase"] == "waiting_for_replica", status
        done = wait_for_job(client, job_id, timeout=180)
        assert done["state"] == "done", done
        wait_for_replicas("Refiner", lambda count: count == 0, count=any_replicas)
