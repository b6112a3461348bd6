"""Jobs never hang and are not lost: a failing generator ends in a clear error, a killed generator replica is
retried (up to max_attempts) with the same image, a restarted job actor or service keeps its records."""

import base64
import io
import json
import shutil
import time
from pathlib import Path

import ray
from PIL import Image

from deployments.job_client import ACTOR_NAMESPACE, job_actor_name
from pipelines.families import FAMILIES
from tests.serve.conftest import wait_for_job


def test_model_that_fails_to_load_ends_the_job_in_error(client, settings):
    broken = settings.models_dir / "broken-sd15"
    shutil.copytree(settings.models_dir / "demo-sd15", broken)
    try:
        (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
        submitted = client.post("/txt2img", json={"prompt": "x", "model": "broken-sd15", "steps": 2,
                                                   "width": 64, "height": 64})  # fmt: skip
        assert submitted.status_code == 200
        job = wait_for_job(client, submitted.json()["job_id"])
        assert job["state"] == "error"
        assert job["status"] == "error"
        assert "could not load model 'broken-sd15'" in job["error"]
    finally:
        shutil.rmtree(broken)


def _replica_actors(deployment: str) -> list:
    names = ray.util.list_named_actors(all_namespaces=True)
    return [
        ray.get_actor(item["name"], namespace=item["namespace"])
        for item in names
        if item["name"].startswith("SERVE_REPLICA::") and f"#{deployment}#" in item["name"]
    ]


def _running(client, job_id: str, attempt: int) -> dict:
    """Waits until the job's `attempt`-th dispatch is generating (progress above 0)."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        status = client.get(f"/queue/{job_id}").json()
        if status["state"] == "processing" and status["progress"] > 0 and status["attempts"] == attempt:
            return status
        assert status["state"] in ("queued", "processing"), status
        time.sleep(0.05)
    raise AssertionError(f"attempt {attempt} of job {job_id} never ran: {status}")


def _kill_generators(deployment: str = "SD15Generator") -> None:
    for actor in _replica_actors(deployment):
        ray.kill(actor, no_restart=True)


def test_a_job_whose_generator_replica_dies_is_retried_and_makes_the_same_image(client):
    body = {"prompt": "x", "model": "Demo SD1.5", "steps": 60, "width": 256, "height": 256, "fileType": "png"}
    job_id = client.post("/txt2img", json=body).json()["job_id"]  # a random seed: fixed at submission
    _running(client, job_id, attempt=1)
    _kill_generators()
    job = wait_for_job(client, job_id, timeout=240)
    assert job["state"] == "done" and job["attempts"] == 2, job
    assert "retried after a worker failure (its generator replica or node was lost)" in job["warnings"]
    # The same request with the job's seed, run once: the same pixels (and the same file name: no second file).
    reference = wait_for_job(client, client.post("/txt2img", json={**body, "seed": job["seed"]}).json()["job_id"])
    assert reference["attempts"] == 1
    pixels = [Image.open(io.BytesIO(base64.b64decode(j["image"]))).tobytes() for j in (job, reference)]
    assert pixels[0] == pixels[1]
    assert len(list(Path(job["output_path"].removeprefix("file://")).parent.glob(f"{job_id}*"))) == 1


def test_a_job_that_loses_its_worker_every_time_ends_in_error_after_max_attempts(client):
    body = {"prompt": "y", "model": "Demo SD1.5", "steps": 150, "width": 256, "height": 256, "seed": 4}
    job_id = client.post("/txt2img", json=body).json()["job_id"]
    for attempt in (1, 2, 3):  # max_attempts is 3 by default
        _running(client, job_id, attempt)
        _kill_generators()
    job = wait_for_job(client, job_id, timeout=120)
    assert job["state"] == "error" and job["attempts"] == 3, job
    assert "lost on each of its 3 attempt(s)" in job["error"] and "max_attempts 3" in job["error"]
    # Serve replaces the replicas; the next job succeeds.
    next_job = client.post("/txt2img", json={"prompt": "y", "steps": 4, "width": 64, "height": 64}).json()
    assert wait_for_job(client, next_job["job_id"], timeout=180)["state"] == "done"


def test_a_cancelled_job_is_not_retried_when_its_worker_dies(client):
    body = {"prompt": "z", "model": "Demo SD1.5", "steps": 150, "width": 256, "height": 256, "seed": 5}
    job_id = client.post("/txt2img", json=body).json()["job_id"]
    _running(client, job_id, attempt=1)
    assert client.delete(f"/queue/{job_id}").status_code == 200
    _kill_generators()
    time.sleep(3)
    job = client.get(f"/queue/{job_id}").json()
    assert job["state"] == "cancelled" and job["attempts"] == 1


def test_finished_job_survives_a_job_actor_restart(client, service):
    job_id = client.post("/txt2img", json={"prompt": "keep me", "steps": 3, "width": 64, "height": 64}).json()["job_id"]
    before = wait_for_job(client, job_id)
    assert before["state"] == "done"
    actor = ray.get_actor(job_actor_name(service["database"]), namespace=ACTOR_NAMESPACE)
    ray.kill(actor, no_restart=False)  # the actor restarts and reopens its database
    deadline = time.monotonic() + 60
    while True:
        response = client.get(f"/queue/{job_id}")
        if response.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    after = response.json()
    assert after["state"] == "done"
    assert after["image"] == before["image"]
    assert json.dumps(after["payload"]) == json.dumps(before["payload"])


def test_full_queue_answers_429_with_retry_after_and_accepted_jobs_all_finish(client):
    from tests.serve.conftest import MAX_QUEUED_JOBS

    body = {"prompt": "busy", "model": "Demo SDXL", "steps": 40, "width": 128, "height": 128}
    responses = [client.post("/txt2img", json=body) for _ in range(MAX_QUEUED_JOBS + 3)]
    accepted = [r.json()["job_id"] for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert len(accepted) == MAX_QUEUED_JOBS and len(refused) == 3
    assert refused[0].headers["Retry-After"] == "5"
    assert refused[0].json()["status"] == "error" and "retry" in refused[0].json()["error"]
    assert "sdxl" in refused[0].json()["error"]
    # SD1.5 has its own limit: a busy SDXL queue does not block it.
    other = client.post("/txt2img", json={"prompt": "x", "steps": 2, "width": 64, "height": 64})
    assert other.status_code == 200
    for job_id in [*accepted, other.json()["job_id"]]:
        assert wait_for_job(client, job_id, timeout=180)["state"] == "done"
    assert client.post("/txt2img", json=body | {"steps": 2}).status_code == 200


def _depth_photo() -> str:
    import numpy as np

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_whole_service_crash_keeps_finished_jobs_and_finishes_interrupted_ones(client, service):
    from ray import serve

    finished_id = client.post("/txt2img", json={"prompt": "before", "steps": 3, "width": 64, "height": 64}).json()
    finished = wait_for_job(client, finished_id["job_id"])
    body = {"prompt": "interrupted", "steps": 60, "width": 256, "height": 256, "seed": 2, "fileType": "png",
            # prepared again after the crash: its map is the one stored at submission (not made again)
            "controlnet": [{"model": "demo-sd15-canny", "module": "depth_anything", "processor_res": 64,
                            "image": _depth_photo()}]}  # fmt: skip
    running_id = client.post("/txt2img", json=body).json()["job_id"]
    _running(client, running_id, attempt=1)
    # A crash of the whole service: every replica and the detached job actor die at once (no graceful drain,
    # which would let the running job finish), then the operator deploys again. Only the disk survives.
    for deployment in ("Ingress", "Upscaler", *(family.deployment for family in FAMILIES.values())):
        for actor in _replica_actors(deployment):
            ray.kill(actor, no_restart=True)
    ray.kill(ray.get_actor(job_actor_name(service["database"]), namespace=ACTOR_NAMESPACE), no_restart=True)
    serve.delete("diffusion_api")
    crashed = time.monotonic()
    service["deploy"]()
    after = client.get(f"/queue/{finished['job_id']}").json()
    assert after["state"] == "done" and after["image"] == finished["image"]
    # Nobody holds the interrupted job any more: once its lease runs out, the new service dispatches it again.
    interrupted = wait_for_job(client, running_id, timeout=240)
    print(f"interrupted job done {time.monotonic() - crashed:.1f}s after the crash")
    assert interrupted["state"] == "done" and interrupted["attempts"] == 2, interrupted
    assert any("dispatched again after the service restarted" in warning for warning in interrupted["warnings"])
    reference = wait_for_job(client, client.post("/txt2img", json=body).json()["job_id"])
    pixels = [Image.open(io.BytesIO(base64.b64decode(j["image"]))).tobytes() for j in (interrupted, reference)]
    assert pixels[0] == pixels[1]
