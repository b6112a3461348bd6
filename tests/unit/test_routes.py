"""The routers and the error table over a real job service, without Serve: the app of deployments/ingress.py
with its services given on `app.state` (what the Serve replica's Ingress builds), a real SQLite store, and the
generator's handle stood in by tests/unit/test_job_service.py's FakeGenerator."""

import hashlib
import logging

import pytest
from fastapi.testclient import TestClient

from deployments.access import AccessPolicy
from deployments.ingress import app
from deployments.job_client import JobsClient
from deployments.job_service import JobService, Libraries
from deployments.job_status import JobFiles
from deployments.jobs import JobStore
from deployments.keys import ApiKey
from deployments.services import Services
from deployments.submissions import Arrivals
from deployments.webhooks import WebhookPolicy
from pipelines.storage import OutputStorage
from tests.unit.test_job_service import FakeGenerator

TINY = {"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64, "seed": 3}


@pytest.fixture
def client(settings, tmp_path):
    store = JobStore(str(tmp_path / "jobs.sqlite3"))
    generator = FakeGenerator(store)
    store.renew_room("fake-sd15", "sd15", 8)  # as a generator replica does: its room for jobs
    storage = OutputStorage(tmp_path / "outputs")
    jobs = JobService(JobsClient.in_process(store), Libraries.from_settings(settings), JobFiles(storage),
                      {"sd15": generator, "sdxl": generator}, WebhookPolicy(), max_queued_jobs=8, max_attempts=3,
                      stale_job_timeout_s=600)  # fmt: skip
    app.state.services = Services(settings, jobs.libraries, jobs, storage, None, "test store", Arrivals())
    keys = [ApiKey(name, admin, hashlib.sha256(name.encode()).digest()) for name, admin in
            (("alice", False), ("bob", False), ("ops", True))]  # fmt: skip
    app.state.access = AccessPolicy(keys=keys)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client
    del app.state.services, app.state.access


def as_(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {name}"}


def test_the_routes_serve_a_job_through_the_job_service(client):
    job_id = client.post("/txt2img", json=TINY, headers=as_("alice")).json()["job_id"]
    status = client.get(f"/queue/{job_id}", params={"wait_s": 5}, headers=as_("alice")).json()
    assert status["state"] in ("processing", "done")
    assert client.get(f"/queue/{job_id}", headers=as_("bob")).status_code == 404
    assert client.get(f"/queue/{job_id}", headers=as_("ops")).status_code == 200
    assert client.get("/models", headers=as_("bob")).json()["models"]
    assert client.post("/sdapi/v1/refresh-loras", headers=as_("bob")).status_code == 403


def test_a_bug_answers_500_with_a_request_id_never_the_exception_text(client, monkeypatch, caplog):
    async def broken(*args, **kwargs):
        raise RuntimeError("database at /srv/secret.sqlite3 said no")

    monkeypatch.setattr(app.state.services.jobs, "status", broken)
    with caplog.at_level(logging.INFO, logger="ray.serve"):
        answer = client.get(f"/queue/{'0' * 32}", headers={**as_("alice"), "X-Request-Id": "req-42"})
        a1111 = client.get("/sdapi/v1/progress", headers=as_("alice"))
        refused = client.get(f"/queue/{'1' * 32}", headers={**as_("bob"), "X-Request-Id": "req-43"})
    assert answer.status_code == 500 and "secret" not in answer.text
    assert answer.json()["error"] == "internal error (request id req-42); the service's log has the details"
    assert a1111.status_code == 200
    failed = [record for record in caplog.records if "req-42" in record.getMessage()]
    assert failed and failed[0].exc_info and "secret.sqlite3" in str(failed[0].exc_info[1])  # in the log only
    assert refused.status_code == 500  # the same broken status route
    monkeypatch.undo()
    with caplog.at_level(logging.INFO, logger="ray.serve"):
        unknown = client.get(f"/queue/{'1' * 32}", headers={**as_("bob"), "X-Request-Id": "req-44"})
    assert unknown.status_code == 404
    assert any("req-44" in record.getMessage() and record.levelno == logging.INFO for record in caplog.records)


def test_an_idempotency_key_replays_over_the_routes_and_a_malformed_one_is_named(client):
    headers = {**as_("alice"), "Idempotency-Key": "route-key-1"}
    first = client.post("/txt2img", json=TINY, headers=headers)
    again = client.post("/txt2img", json=TINY, headers=headers)
    assert first.status_code == again.status_code == 200 and first.json() == again.json()
    assert "Idempotent-Replayed" not in first.headers and again.headers["Idempotent-Replayed"] == "true"
    reused = client.post("/txt2img", json={**TINY, "steps": TINY["steps"] + 1}, headers=headers)
    assert reused.status_code == 422 and reused.json()["field"] == "Idempotency-Key"
    too_long = client.post("/txt2img", json=TINY, headers={**as_("alice"), "Idempotency-Key": "k" * 256})
    assert too_long.status_code == 422 and too_long.json()["error"].startswith("header.Idempotency-Key:")
