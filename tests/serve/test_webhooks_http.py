"""Webhooks through the service: a job's final status POSTed to its callback_url, signed, retried, and the
outcome on the job; targets the operator did not allow refused at submission. The receiver is the example
(examples/webhook_receiver.py), which checks the signature."""

import json
import os
import socket
import subprocess
import sys
import time

from pipelines.settings import PROJECT_ROOT
from tests.serve.conftest import WEBHOOK_PORT, WEBHOOK_SECRET, wait_for_job

JOB = {"prompt": "a bell", "steps": 4, "width": 64, "height": 64, "seed": 8, "fileType": "png"}
CALLBACK = f"http://127.0.0.1:{WEBHOOK_PORT}/hook"


def start_receiver(*options: str) -> subprocess.Popen:
    env = {**os.environ, "DIFFUSION_API_WEBHOOK_SECRET": WEBHOOK_SECRET}
    script = PROJECT_ROOT / "examples" / "webhook_receiver.py"
    process = subprocess.Popen([sys.executable, str(script), "--port", str(WEBHOOK_PORT), *options], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", WEBHOOK_PORT), timeout=0.2).close()
            return process
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise AssertionError(f"the receiver did not start: {process.communicate()}")


def test_a_finished_job_calls_its_webhook_signed_and_retried(client):
    receiver = start_receiver("--once", "--fail-first", "1")  # the first call gets a 503
    try:
        job_id = client.post("/txt2img", json=JOB | {"callback_url": CALLBACK}).json()["job_id"]
        stdout, stderr = receiver.communicate(timeout=90)
    finally:
        receiver.kill()
    assert receiver.returncode == 0, stderr  # verified, and the job is done
    call = json.loads(stdout)
    assert call == {"verified": True, "job_id": job_id, "state": "done", "image_url": f"/queue/{job_id}/image",
                    "error": None}  # fmt: skip
    deadline = time.monotonic() + 10
    while ((status := client.get(f"/queue/{job_id}").json())["webhook"] or {}).get("status") in (None, "delivering"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert status["webhook"] == {"attempts": 2, "status": "delivered", "http_status": 200, "error": None}
    assert status["payload"]["callback_url"] == CALLBACK


def test_a_webhook_nobody_answers_is_recorded_as_failed(client):
    job_id = client.post("/txt2img", json=JOB | {"callback_url": CALLBACK}).json()["job_id"]  # no receiver
    assert wait_for_job(client, job_id)["state"] == "done"
    deadline = time.monotonic() + 30  # three attempts, 1 s and 2 s apart
    while ((webhook := client.get(f"/queue/{job_id}").json()["webhook"]) or {}).get("status") in (None, "delivering"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert webhook["status"] == "failed" and webhook["attempts"] == 3 and "ConnectError" in webhook["error"]


def test_callback_hosts_the_operator_did_not_allow_are_refused(client):
    for url, reason in [
        ("http://127.0.0.1:1/hook", f"host 127.0.0.1:1 is not allowed; allowed: 127.0.0.1:{WEBHOOK_PORT}"),
        ("http://169.254.169.254/latest", "is not allowed"),
        ("file:///etc/passwd", "an http:// or https:// URL"),
    ]:
        answer = client.post("/txt2img", json=JOB | {"callback_url": url})
        assert answer.status_code == 422, answer.text
        assert answer.json()["error"].startswith("callback_url: ") and reason in answer.json()["error"]
    wrong_type = client.post("/txt2img", json=JOB | {"callback_url": 5})
    assert wrong_type.status_code == 422 and "callback_url" in wrong_type.json()["error"]
