"""Autoscaling still works with batching: under load the production config's SD1.5 generator grows past its
minimum (fake GPUs leave room for one more replica), and the jobs that caused it are all accounted for."""

import time

from ray import serve

from tests.serve.conftest import MAX_QUEUED_JOBS, wait_for_job

LONG_JOB = {"prompt": "load", "model": "Demo SD1.5", "steps": 150, "width": 256, "height": 256}


def running_replicas(deployment: str) -> int:
    status = serve.status().applications["diffusion_api"].deployments[deployment]
    return status.replica_states.get("RUNNING", 0)


def test_sd15_generator_scales_past_its_minimum_under_load(client):
    assert running_replicas("SD15Generator") == 1
    # More jobs in flight than target_ongoing_requests (4) per replica: Serve adds a replica after
    # upscale_delay_s (10 s); the jobs queue on the first replica meanwhile.
    job_ids = [
        client.post("/txt2img", json=LONG_JOB | {"seed": seed}).json()["job_id"] for seed in range(MAX_QUEUED_JOBS)
    ]
    try:
        deadline = time.monotonic() + 120
        while running_replicas("SD15Generator") < 2:
            assert time.monotonic() < deadline, f"no second SD1.5 replica: {serve.status()}"
            time.sleep(1)
    finally:
        for job_id in job_ids:
            client.delete(f"/queue/{job_id}")
    states = {wait_for_job(client, job_id, timeout=120)["state"] for job_id in job_ids}
    assert states <= {"cancelled", "done"}
