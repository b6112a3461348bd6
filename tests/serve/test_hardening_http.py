"""Cancellation, request-size limit, CORS and an ingress replica killed mid-job, through the real service."""

import time

import ray

from tests.serve.conftest import CORS_ORIGIN, wait_for_job
from tests.serve.test_failures import _replica_actors

LONG_JOB = {"prompt": "a slow one", "steps": 150, "width": 256, "height": 256, "seed": 5}


def wait_for_progress(client, job_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/queue/{job_id}").json()
        if body["progress"] > 0 or body["state"] not in ("queued", "processing"):
            return body
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} made no progress")


def test_running_job_is_cancelled_and_stops(client):
    job_id = client.post("/txt2img", json=LONG_JOB).json()["job_id"]
    assert wait_for_progress(client, job_id)["state"] == "processing"
    cancelled = client.delete(f"/queue/{job_id}")
    assert cancelled.status_code == 200 and cancelled.json() == {"status": "success", "job_id": job_id,
                                                                 "state": "cancelled"}  # fmt: skip
    # The generator stops at its next step: a short job right after gets the replica within seconds.
    started = time.monotonic()
    quick = client.post("/txt2img", json={"prompt": "next", "steps": 3, "width": 64, "height": 64}).json()
    assert wait_for_job(client, quick["job_id"], timeout=60)["state"] == "done"
    assert time.monotonic() - started < 20
    final = client.get(f"/queue/{job_id}").json()
    assert final["state"] == "cancelled" and final["image"] is None and final["progress"] < 100
    assert client.delete(f"/queue/{job_id}").status_code == 409


def test_job_cancelled_right_after_submission_never_runs(client):
    job_id = client.post("/txt2img", json=LONG_JOB | {"model": "Demo SDXL"}).json()["job_id"]
    assert client.delete(f"/queue/{job_id}").status_code == 200
    time.sleep(1.0)
    final = client.get(f"/queue/{job_id}").json()
    assert final["state"] == "cancelled" and final["image"] is None


def test_cancel_unknown_or_finished_job(client):
    assert client.delete(f"/queue/{'f' * 32}").status_code == 404
    job_id = client.post("/txt2img", json={"prompt": "x", "steps": 2, "width": 64, "height": 64}).json()["job_id"]
    assert wait_for_job(client, job_id)["state"] == "done"
    response = client.delete(f"/queue/{job_id}")
    assert response.status_code == 409 and "already ended" in response.json()["error"]


def test_oversized_body_is_413_and_cors_preflight_is_answered(client):
    huge = client.post("/txt2img", content=b"{" + b" " * (33 * 2**20) + b"}",
                       headers={"Content-Type": "application/json"})  # fmt: skip
    assert huge.status_code == 413 and "at most" in huge.json()["error"]
    preflight = client.options("/txt2img", headers={"Origin": CORS_ORIGIN, "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 204 and preflight.headers["Access-Control-Allow-Origin"] == CORS_ORIGIN
    assert client.get("/hello", headers={"Origin": CORS_ORIGIN}).headers["Access-Control-Allow-Origin"] == CORS_ORIGIN
    assert "Access-Control-Allow-Origin" not in client.get("/hello", headers={"Origin": "https://x.example"}).headers


def test_killed_ingress_replicas_lose_no_job(client):
    job_id = client.post("/txt2img", json=LONG_JOB | {"steps": 40}).json()["job_id"]
    wait_for_progress(client, job_id)
    for actor in _replica_actors("Ingress"):
        ray.kill(actor, no_restart=True)
    # Serve replaces the ingress replicas; the generator finishes the job and records it itself.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            body = client.get(f"/queue/{job_id}", timeout=5).json()
            if body["state"] in ("done", "error", "cancelled"):
                break
        except Exception:
            pass
        time.sleep(0.5)
    assert body["state"] == "done", body
    assert client.get("/hello").status_code == 200
