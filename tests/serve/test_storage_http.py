"""Images in the output storage (the suite's is a `file://` URL, as shared storage on a cluster): the job
database keeps their locations, `GET /queue/{id}` still returns them, `GET /queue/{id}/image` streams them."""

import base64
import json
import sqlite3
from pathlib import Path

from tests.serve.conftest import wait_for_job

FAST = {"prompt": "a harbour", "steps": 3, "width": 64, "height": 64, "seed": 8}


def stored_result(database: str, job_id: str) -> dict:
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        (result,) = db.execute("SELECT result FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
    return json.loads(result)


def test_images_live_in_the_storage_and_are_served_by_url_path(client, service):
    job_id = client.post("/txt2img", json={**FAST, "batch_size": 2, "fileType": "png"}).json()["job_id"]
    job = wait_for_job(client, job_id)
    assert job["state"] == "done" and len(job["images"]) == 2
    record = stored_result(service["database"], job_id)
    assert "images" not in record and "image" not in record  # no image bytes in the job database
    for index, location in enumerate(record["output_paths"]):
        assert location.startswith(service["images"].as_uri() + "/")
        served = client.get(f"/queue/{job_id}/image", params={"index": index})
        assert served.status_code == 200 and served.headers["content-type"] == "image/png"
        assert served.content == base64.b64decode(job["images"][index])
        assert served.content == Path(location.removeprefix("file://")).read_bytes()
    assert client.get(f"/queue/{job_id}/image").content == base64.b64decode(job["image"])  # index 0
    beyond = client.get(f"/queue/{job_id}/image", params={"index": 2})
    assert beyond.status_code == 404 and "2 image(s)" in beyond.json()["error"]
    assert client.get(f"/queue/{job_id}/image", params={"index": -1}).status_code == 422


def test_jpeg_images_have_their_type(client):
    job_id = client.post("/txt2img", json={**FAST, "fileType": "jpg"}).json()["job_id"]
    wait_for_job(client, job_id)
    served = client.get(f"/queue/{job_id}/image")
    assert served.headers["content-type"] == "image/jpeg" and served.content[:2] == b"\xff\xd8"


def test_no_image_before_the_end_or_for_an_unknown_job(client):
    job_id = client.post("/txt2img", json={**FAST, "steps": 150, "width": 512, "height": 512}).json()["job_id"]
    early = client.get(f"/queue/{job_id}/image")
    assert early.status_code == 409 and "no image yet" in early.json()["error"]
    assert client.delete(f"/queue/{job_id}").status_code == 200
    cancelled = client.get(f"/queue/{job_id}/image")
    assert cancelled.status_code == 409 and "cancelled" in cancelled.json()["error"]
    unknown = client.get(f"/queue/{'0' * 32}/image")
    assert unknown.status_code == 404


def test_an_image_removed_from_the_storage_is_said_not_hidden(client, service):
    job_id = client.post("/txt2img", json=FAST).json()["job_id"]
    wait_for_job(client, job_id)
    (location,) = stored_result(service["database"], job_id)["output_paths"]
    Path(location.removeprefix("file://")).unlink()
    status = client.get(f"/queue/{job_id}").json()
    assert status["state"] == "done" and status["image"] is None
    assert any("no longer in the output storage" in warning for warning in status["warnings"])
    gone = client.get(f"/queue/{job_id}/image")
    assert gone.status_code == 404 and "no longer in the output storage" in gone.json()["error"]
