"""One real Ray cluster per test session, running the production `serve_config.yaml` on the demo models.

The production file asks for GPUs; the cluster declares fake ones (`ray.init(num_gpus=...)`), so the file is
deployed unchanged through the operator's own command (`serve run`), except for the port, the demo paths and a
small job limit. Replicas pick their device with `torch.cuda.is_available()`, so they run on the CPU here.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

from pipelines.cli import SERVE_ENVIRONMENT
from pipelines.settings import PROJECT_ROOT

PORT = int(os.environ.get("DIFFUSION_API_TEST_PORT", "8765"))
MAX_QUEUED_JOBS = 12  # small, so the back-pressure test can fill it; above 4, the SD1.5 autoscaling target
CORS_ORIGIN = "https://app.example"
FAKE_GPUS = 6  # every GPU replica of serve_config.yaml at its minimum size, the ones at zero when asked for, one more
# Compiled models are warmed at replica start; the demo's are not compiled, but the warm-up path is the same.
WARMUP = [{"model": "Demo SD1.5", "width": 64, "height": 64, "steps": 2, "batch_sizes": [1, 2]},
          {"model": "Demo SDXL Refiner", "width": 64, "height": 64, "steps": 2, "batch_sizes": [1]}]  # fmt: skip
WEBHOOK_PORT = PORT + 3  # the only callback host the session's service allows
WEBHOOK_SECRET = "test-webhook-secret"
LOGICAL_CPUS = 8  # serve_config.yaml asks for 6 CPUs at minimum size, 2 more from zero; time-shared here


def patched_production_config(settings, outputs: Path, **arg_overrides) -> dict:
    """serve_config.yaml with this session's folders. Images go to a `file://` URL (the output storage's fsspec
    path, as on a cluster with shared storage); the job database stays in `outputs`."""
    config = yaml.safe_load((PROJECT_ROOT / "serve_config.yaml").read_text())
    config["http_options"] = {**config.get("http_options", {}), "host": "127.0.0.1", "port": PORT}
    config["proxy_location"] = "HeadOnly"  # the session's Ray nodes share this machine, and so its ports
    (application,) = config["applications"]
    for deployment in application["deployments"]:  # the production policy, with delays a test can wait for
        if "autoscaling_config" in deployment:
            deployment["autoscaling_config"].update(upscale_delay_s=2, downscale_delay_s=6, downscale_to_zero_delay_s=6)
    application["args"] = {
        **application.get("args", {}),
        "models_dir": str(settings.models_dir),
        "loras_dir": str(settings.loras_dir),
        "vaes_dir": str(settings.vaes_dir),
        "embeddings_dir": str(settings.embeddings_dir),
        "controlnet_dir": str(settings.controlnet_dir),
        "ipadapter_dir": str(settings.ipadapter_dir),
        "clip_vision_dir": str(settings.clip_vision_dir),
        "text_encoder_dir": str(settings.text_encoder_dir),
        "annotators_dir": str(settings.annotators_dir),
        "upscalers_dir": str(settings.upscalers_dir),
        "outputs_dir": (outputs / "images").as_uri(),
        "job_database": str(outputs / "jobs.sqlite3"),
        "models_config": str(settings.models_config),
        "cache_dir": str(settings.cache_dir),
        "max_queued_jobs": MAX_QUEUED_JOBS,
        "cors_origins": [CORS_ORIGIN],
        "warmup": WARMUP,
        "webhook_allowed_hosts": [f"127.0.0.1:{WEBHOOK_PORT}"],
        "webhook_secret": WEBHOOK_SECRET,
        "webhook_retry_delays_s": [1.0, 2.0],
        **arg_overrides,
    }
    return config


def wait_until_running(app_name: str, timeout: float) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = serve.status().applications.get(app_name)
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status == "DEPLOY_FAILED":
            raise RuntimeError(f"deploying serve_config.yaml failed: {status.message}")
        time.sleep(0.5)
    raise RuntimeError(f"serve_config.yaml was not RUNNING after {timeout}s: {serve.status()}")


def throughput_mode_environment(haproxy: Path) -> dict[str, str]:
    """Ray Serve's high-throughput mode, as `make serve` runs it, with HAProxy's files (in `haproxy`) and ports
    and the replicas' direct ports of this session's own, so the suite runs beside a running service."""
    return {
        **SERVE_ENVIRONMENT,
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(haproxy / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(haproxy / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(haproxy),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(haproxy / "server-state"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(PORT + 1),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(PORT + 2),
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": "32000",
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": "32999",
        "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": "42000",
        "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": "42999",
    }


@pytest.fixture(scope="session")
def service(demo_root, settings):
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    haproxy = Path(tempfile.mkdtemp(prefix="haproxy-", dir="/tmp"))  # short: its socket path has at most 97 chars
    for name, value in throughput_mode_environment(haproxy).items():
        os.environ.setdefault(name, value)  # read by the cluster's processes, started below
    import ray
    from ray.cluster_utils import Cluster

    outputs = demo_root / "outputs"
    # A cluster of Ray's own test kind (nodes are processes of this machine): one head node now; the cluster
    # tests add a second one and take it away.
    cluster = Cluster()
    cluster.add_node(num_cpus=LOGICAL_CPUS, num_gpus=FAKE_GPUS, include_dashboard=False,
                     object_store_memory=2 * 2**30)  # fmt: skip
    ray.init(address=cluster.address, log_to_driver=False, namespace="diffusion_api_tests")
    address = cluster.address

    def deploy(extra_applications: list[dict] | None = None, **arg_overrides) -> None:
        """Deploys the patched production config with the operator's command (`serve run`), with
        `extra_applications` beside it (a later deploy without them removes them)."""
        config = patched_production_config(settings, outputs, **arg_overrides)
        config["applications"] += extra_applications or []
        config_path = demo_root / "serve_config.test.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        serve_cli = Path(sys.executable).parent / "serve"
        env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
        done = subprocess.run([str(serve_cli), "run", "--non-blocking", "-a", address, str(config_path)],
                              cwd=PROJECT_ROOT, env=env, timeout=120, capture_output=True, text=True)  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"serve run failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        for application in config["applications"]:
            wait_until_running(application["name"], timeout=240)

    deploy()
    yield {
        "outputs": outputs,
        "images": outputs / "images",
        "database": str(outputs / "jobs.sqlite3"),
        "deploy": deploy,
        "cluster": cluster,
    }
    ray.shutdown()
    cluster.shutdown()
    shutil.rmtree(haproxy, ignore_errors=True)


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
