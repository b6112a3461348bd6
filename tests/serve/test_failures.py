"""Jobs never hang: a failing generator, a killed replica and a restarted job actor all end in a clear state."""

import json
import shutil
import time

import ray

from deployments.jobs import ACTOR_NAMESPACE, job_actor_name
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


def test_killed_generator_replica_fails_the_job_and_serving_continues(client):
    body = {"prompt": "x", "model": "Demo SD1.5", "steps": 150, "width": 256, "height": 256, "seed": 1}
    job_id = client.post("/txt2img", json=body).json()["job_id"]
    deadline = time.monotonic() + 60
    while client.get(f"/queue/{job_id}").json()["progress"] <= 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    for actor in _replica_actors("SD15Generator"):
        ray.kill(actor, no_restart=True)
    job = wait_for_job(client, job_id, timeout=60)
    assert job["state"] == "error"
    assert job["error"]
    # Serve replaces the replica; the next job succeeds.
    next_job = client.post("/txt2img", json={"prompt": "y", "steps": 4, "width": 64, "height": 64}).json()
    assert wait_for_job(client, next_job["job_id"], timeout=120)["state"] == "done"


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


def test_whole_service_restart_keeps_finished_jobs_and_ends_interrupted_ones(client, service):
    from ray import serve

    finished_id = client.post("/txt2img", json={"prompt": "before", "steps": 3, "width": 64, "height": 64}).json()
    finished = wait_for_job(client, finished_id["job_id"])
    body = {"prompt": "interrupted", "steps": 150, "width": 256, "height": 256, "seed": 2}
    running_id = client.post("/txt2img", json=body).json()["job_id"]
    deadline = time.monotonic() + 60
    while client.get(f"/queue/{running_id}").json()["progress"] <= 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    # A crash of the whole service: every replica and the detached job actor die at once (no graceful drain,
    # which would let the running job finish), then the operator deploys again. Only the disk survives.
    for deployment in ("Ingress", "SD15Generator", "SDXLGenerator", "Refiner", "Upscaler"):
        for actor in _replica_actors(deployment):
            ray.kill(actor, no_restart=True)
    ray.kill(ray.get_actor(job_actor_name(service["database"]), namespace=ACTOR_NAMESPACE), no_restart=True)
    serve.delete("diffusion_api")
    service["deploy"](stale_job_timeout_s=15)
    after = client.get(f"/queue/{finished['job_id']}").json()
    assert after["state"] == "done" and after["image"] == finished["image"]
    interrupted = wait_for_job(client, running_id, timeout=90)
    assert interrupted["state"] == "error" and "stopped reporting" in interrupted["error"]
    next_job = client.post("/txt2img", json={"prompt": "after", "steps": 3, "width": 64, "height": 64}).json()
    assert wait_for_job(client, next_job["job_id"], timeout=120)["state"] == "done"
