"""One real Ray cluster and Serve application per test session, on the demo models, reached over HTTP."""

import os
import time

import httpx
import pytest

PORT = int(os.environ.get("DIFFUSION_API_TEST_PORT", "8765"))


@pytest.fixture(scope="session")
def service(demo_root, settings):
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from deployments.app import build_app

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="diffusion_api_tests")
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    app = build_app({
        "models_dir": str(settings.models_dir),
        "outputs_dir": str(demo_root / "outputs"),
        "models_config": str(settings.models_config),
        "device": "cpu",
    })  # fmt: skip
    serve.run(app, name="diffusion_api", route_prefix="/", logging_config={"enable_access_log": False})
    yield {"outputs": demo_root / "outputs"}
    ray.shutdown()


@pytest.fixture(scope="session")
def client(service):
    with httpx.Client(base_url=f"http://127.0.0.1:{PORT}", timeout=60) as http:
        yield http


def wait_for_job(client: httpx.Client, job_id: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        body = client.get(f"/queue/{job_id}").json()
        seen.append(body["progress"])
        if body["state"] in ("done", "error", "cancelled"):
            body["_progress_seen"] = seen
            return body
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s: {body}")
