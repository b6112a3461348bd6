"""Metrics: the job store's gauges at `GET /metrics`, and the service's own metrics exported by Ray on every
node's metrics port next to Ray Serve's."""

import time

import httpx
import ray
from prometheus_client.parser import text_string_to_metric_families

from tests.serve.conftest import wait_for_job

JOB = {"prompt": "a counted job", "steps": 3, "width": 64, "height": 64, "seed": 2}


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}  # fmt: skip


def test_the_metrics_endpoint_serves_jobs_by_state_and_family(client):
    before = samples(client.get("/metrics").text)
    done = ("diffusion_api_jobs", (("family", "sd15"), ("key", ""), ("state", "done")))  # keys off: key ""
    assert wait_for_job(client, client.post("/txt2img", json=JOB).json()["job_id"])["state"] == "done"
    answer = client.get("/metrics")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    after = samples(answer.text)
    assert after[done] >= before.get(done, 0) + 1
    families = {dict(labels)["family"] for name, labels in after}
    states = {dict(labels)["state"] for name, labels in after}
    assert {"sd15", "sdxl", "sdxl-refiner"} <= families and states == {"queued", "processing", "done", "error",
                                                                        "cancelled"}  # fmt: skip


def test_ray_exports_the_service_metrics_on_the_nodes_metrics_port(client):
    job_id = client.post("/txt2img", json=JOB | {"batch_size": 2}).json()["job_id"]
    assert wait_for_job(client, job_id)["state"] == "done"
    ports = {node["MetricsExportPort"] for node in ray.nodes() if node["Alive"]}
    wanted = {"ray_diffusion_api_jobs_finished", "ray_diffusion_api_job_seconds", "ray_diffusion_api_phase_seconds",
              "ray_diffusion_api_multiplex_requests", "ray_diffusion_api_batch_size",
              "ray_diffusion_api_queue_depth"}  # fmt: skip
    found: dict[str, dict] = {}
    deadline = time.monotonic() + 90  # Ray's agents export every few seconds
    while time.monotonic() < deadline:
        found = {}
        for port in ports:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            for family in text_string_to_metric_families(text):
                if family.name.startswith("ray_diffusion_api_"):
                    found.setdefault(family.name.removesuffix("_total"), {}).update(
                        {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
                    )
        if wanted <= set(found):
            break
        time.sleep(2)
    assert wanted <= set(found), sorted(found)
    finished = [value for (name, labels), value in found["ray_diffusion_api_jobs_finished"].items()
                if ("family", "sd15") in labels and ("state", "done") in labels]  # fmt: skip
    assert finished and max(finished) >= 1
    phases = {dict(labels).get("phase") for name, labels in found["ray_diffusion_api_phase_seconds"]}
    assert {"queued", "generation"} <= phases
    batches = [value for (name, labels), value in found["ray_diffusion_api_batch_size"].items()
               if name.endswith("_count")]  # fmt: skip
    assert batches and max(batches) >= 1
    images = [value for (name, labels), value in found["ray_diffusion_api_batch_size"].items()
              if name.endswith("_sum")]  # fmt: skip
    assert images and all(value == round(value) for value in images)  # whole images: the mean is exact
