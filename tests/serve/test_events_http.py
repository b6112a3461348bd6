"""Watching a job live: Server-Sent Events (`GET /queue/{id}/events`) and long polls (`?wait_s=N`)."""

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

from tests.serve.conftest import wait_for_job

SLOW = {"prompt": "a watched pot", "steps": 40, "width": 128, "height": 128, "seed": 3, "fileType": "png"}


def read_events(client, job_id: str) -> list[tuple[str, dict]]:
    """Every event of a job's stream, until the service closes it."""
    events, name = [], None
    with client.stream("GET", f"/queue/{job_id}/events", timeout=180) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
    return events


def test_the_event_stream_reports_progress_then_the_final_status_without_image_bytes(client):
    job_id = client.post("/txt2img", json=SLOW).json()["job_id"]
    events = read_events(client, job_id)
    names = [name for name, _ in events]
    assert names[-1] == "done" and set(names[:-1]) == {"progress"} and len(names) >= 3, names
    progress = [data["progress"] for name, data in events if name == "progress"]
    assert progress == sorted(progress) and any(0 < value < 100 for value in progress)
    assert all(data["job_id"] == job_id and data["state"] in ("queued", "processing") for _, data in events[:-1])
    assert any(data["eta_s"] is not None for _, data in events[:-1])
    final = events[-1][1]
    assert final["state"] == "done" and final["seed"] == 3 and final["infotext"]
    assert "image" not in final and "images" not in final
    assert final["image_url"] == f"/queue/{job_id}/image"
    image = client.get(final["image_url"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert image.content == base64.b64decode(client.get(f"/queue/{job_id}").json()["image"])


def test_a_job_that_asks_for_previews_streams_small_jpegs_of_the_image_so_far(client):
    job = SLOW | {"steps": 60, "width": 256, "height": 256, "preview": True}
    job_id = client.post("/txt2img", json=job).json()["job_id"]
    with ThreadPoolExecutor(1) as pool:
        streamed = pool.submit(read_events, client, job_id)
        while (status := client.get(f"/queue/{job_id}").json())["preview"] is None:  # also in the status
            assert status["state"] in ("queued", "processing"), status
            time.sleep(0.1)
        Image.open(io.BytesIO(base64.b64decode(status["preview"]))).verify()
        events = streamed.result(timeout=180)
    previews = [data for name, data in events if name == "preview"]
    assert previews, [name for name, _ in events]
    for data in previews:
        image = Image.open(io.BytesIO(base64.b64decode(data["image"])))
        assert data["job_id"] == job_id and image.format == "JPEG" and image.size == (32, 32)  # 1/8 of the size
    assert [name for name, _ in events][-1] == "done"
    progress = [data["progress"] for name, data in events if name == "progress"]
    assert all(0 < data["progress"] <= 100 and data["progress"] in progress for data in previews)
    assert client.get(f"/queue/{job_id}").json()["preview"] is None  # only while the job runs


def test_a_stream_of_an_ended_job_sends_the_final_event_at_once_and_an_unknown_job_is_a_404(client):
    job_id = client.post("/txt2img", json=SLOW | {"steps": 2}).json()["job_id"]
    wait_for_job(client, job_id)
    assert [name for name, _ in read_events(client, job_id)] == ["done"]
    unknown = client.get(f"/queue/{'0' * 32}/events")
    assert unknown.status_code == 404 and unknown.json()["status"] == "error"
    assert client.get("/queue/not-a-job/events").status_code == 422


def test_a_cancelled_job_ends_its_stream_with_a_cancelled_event(client):
    job_id = client.post("/txt2img", json=SLOW | {"steps": 150, "width": 256, "height": 256}).json()["job_id"]
    client.delete(f"/queue/{job_id}")
    name, final = read_events(client, job_id)[-1]
    assert name == "cancelled" and final["state"] == "cancelled" and final["error"] == "cancelled by request"


def test_a_long_poll_answers_when_the_job_changes_and_at_once_for_an_ended_job(client):
    job_id = client.post("/txt2img", json=SLOW).json()["job_id"]
    first = client.get(f"/queue/{job_id}").json()
    changed = client.get(f"/queue/{job_id}", params={"wait_s": 30}).json()
    key = ("state", "current_phase", "progress")
    assert tuple(changed[k] for k in key) != tuple(first[k] for k in key)
    done = wait_for_job(client, job_id)
    started = time.monotonic()
    again = client.get(f"/queue/{job_id}", params={"wait_s": 30})
    assert again.status_code == 200 and again.json()["image"] == done["image"]
    assert time.monotonic() - started < 25  # an ended job does not wait
    for bad in (31, -1, "soon"):
        refused = client.get(f"/queue/{job_id}", params={"wait_s": bad})
        assert refused.status_code == 422 and "wait_s" in refused.text
