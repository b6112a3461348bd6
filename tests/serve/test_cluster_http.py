"""The service on a two-node Ray cluster, as an operator runs it: the job store on PostgreSQL, the images in
storage every node reaches (a `file://` URL), the SD1.5 generator on a second node. Taking that node away in the
middle of a job, or killing the job actor, loses nothing: the job ends `done` with the pixels of a reference run.

A second application (`/cluster`) beside the session's service, with its own store and storage; the session's
Ray cluster (Ray's `ray.cluster_utils.Cluster`) gets a worker node for it, removed again at the end.
"""

import base64
import io
import time

import httpx
import pytest
import ray
from PIL import Image

from deployments.job_client import ACTOR_NAMESPACE, job_actor_name
from tests.serve.conftest import PORT

psycopg = pytest.importorskip("psycopg", reason="the cluster tests need psycopg: pip install 'diffusion-api[postgres]'")

GENERATOR_NODE = "generator_node"  # the worker node's custom resource: only the cluster app's generator asks it
BODY = {"prompt": "a lighthouse on a cliff", "model": "Demo SD1.5", "steps": 60, "width": 256, "height": 256,
        "seed": 11, "fileType": "png"}  # fmt: skip


def _cluster_application(settings, outputs, job_store: str) -> dict:
    """The service's own application, on PostgreSQL and shared storage, its generator pinned to the worker node."""
    on_head = {"num_cpus": 0.01}  # the worker node has no CPU to give: these stay on the head node
    return {
        "name": "cluster",
        "route_prefix": "/cluster",
        "import_path": "deployments.app:build_app",
        "args": {
            "models_dir": str(settings.models_dir),
            "loras_dir": str(settings.loras_dir),
            "vaes_dir": str(settings.vaes_dir),
            "embeddings_dir": str(settings.embeddings_dir),
            "upscalers_dir": str(settings.upscalers_dir),
            "models_config": str(settings.models_config),
            "cache_dir": str(settings.cache_dir),
            "outputs_dir": (outputs / "images").as_uri(),
            "job_store": job_store,
        },
        "deployments": [
            {"name": "Ingress", "num_replicas": 1, "ray_actor_options": on_head},
            {"name": "SD15Generator", "num_replicas": 1, "health_check_period_s": 2,
             "ray_actor_options": {"num_cpus": 0, "resources": {GENERATOR_NODE: 1}}},
            {"name": "SDXLGenerator", "num_replicas": 1, "ray_actor_options": on_head},
            {"name": "Refiner", "num_replicas": 1, "ray_actor_options": on_head},
            *({"name": name, "ray_actor_options": on_head,
               "autoscaling_config": {"min_replicas": 0, "initial_replicas": 0, "max_replicas": 1}}
              for name in ("FluxGenerator", "SD3Generator")),
            {"name": "Upscaler", "num_replicas": 1, "ray_actor_options": on_head},
        ],
    }  # fmt: skip


def _add_generator_node(cluster):
    return cluster.add_node(num_cpus=0, resources={GENERATOR_NODE: 1}, include_dashboard=False,
                            object_store_memory=512 * 2**20)  # fmt: skip


def _generator_node_ids() -> set[str]:
    """The nodes of the cluster app's live SD1.5 generator replicas (from the GCS's actor table)."""
    actors = ray._private.state.actors().values()  # the state API needs the dashboard, which the session skips
    return {
        actor["Address"]["NodeID"]
        for actor in actors
        if actor["State"] == "ALIVE" and actor["Name"].startswith("SERVE_REPLICA::cluster#SD15Generator#")
    }


def _wait(http: httpx.Client, job_id: str, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = http.get(f"/queue/{job_id}").json()
        if status["state"] in ("done", "error", "cancelled"):
            return status
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not end in {timeout}s: {status}")


def _running(http: httpx.Client, job_id: str) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        status = http.get(f"/queue/{job_id}").json()
        if status["state"] == "processing" and status["progress"] > 0:
            return
        assert status["state"] in ("queued", "processing"), status
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never ran: {status}")


def _pixels(status: dict) -> bytes:
    return Image.open(io.BytesIO(base64.b64decode(status["image"]))).tobytes()


def _active_jobs(job_store: str) -> int:
    with psycopg.connect(job_store) as db:
        return db.execute("SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'processing')").fetchone()[0]


@pytest.fixture(scope="module")
def cluster_service(service, settings, demo_root, postgres_server):
    """The `/cluster` application on a worker node of the session's cluster; removed with its node after."""
    name = "cluster_jobs"
    with psycopg.connect(postgres_server, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name}")
        admin.execute(f"CREATE DATABASE {name}")
    job_store = f"{postgres_server.rsplit('/', 1)[0]}/{name}"
    cluster = service["cluster"]
    nodes = [_add_generator_node(cluster)]
    service["deploy"](extra_applications=[_cluster_application(settings, demo_root / "cluster-outputs", job_store)])
    with httpx.Client(base_url=f"http://127.0.0.1:{PORT}/cluster", timeout=60) as http:
        yield {"http": http, "job_store": job_store, "cluster": cluster, "nodes": nodes}
    service["deploy"]()  # the session's service alone again
    for node in nodes:
        if node in cluster.worker_nodes:
            cluster.remove_node(node)


def test_a_job_whose_generator_node_is_removed_ends_done_on_a_replacement_with_the_same_pixels(cluster_service):
    http, cluster = cluster_service["http"], cluster_service["cluster"]
    (node,) = cluster_service["nodes"]
    assert _generator_node_ids() == {node.node_id}  # the generator runs on the second node
    reference = _wait(http, http.post("/txt2img", json=BODY).json()["job_id"])
    assert reference["state"] == "done" and reference["attempts"] == 1

    job_id = http.post("/txt2img", json=BODY).json()["job_id"]
    _running(http, job_id)
    cluster.remove_node(node, allow_graceful=False)  # the node and every process on it die mid-job
    removed = time.monotonic()
    cluster_service["nodes"].append(_add_generator_node(cluster))  # where the replacement replica can go
    status = _wait(http, job_id)
    print(f"job done {time.monotonic() - removed:.1f}s after its node was removed")
    assert status["state"] == "done", status
    assert status["attempts"] == 2
    assert any("retried after a worker failure" in warning for warning in status["warnings"])
    assert _pixels(status) == _pixels(reference)
    assert http.get(f"/queue/{job_id}/image").content == base64.b64decode(status["image"])
    assert _generator_node_ids() == {cluster_service["nodes"][-1].node_id}
    assert _active_jobs(cluster_service["job_store"]) == 0  # nothing stays queued or processing


def test_the_job_actor_killed_on_postgresql_loses_no_record_and_no_job(cluster_service):
    http, job_store = cluster_service["http"], cluster_service["job_store"]
    finished = _wait(http, http.post("/txt2img", json=BODY | {"steps": 4}).json()["job_id"])
    running_id = http.post("/txt2img", json=BODY | {"seed": 12}).json()["job_id"]
    _running(http, running_id)
    actor = ray.get_actor(job_actor_name(job_store), namespace=ACTOR_NAMESPACE)
    ray.kill(actor, no_restart=False)  # it restarts (anywhere): it holds nothing the database does not
    after = http.get(f"/queue/{finished['job_id']}").json()
    assert after["state"] == "done" and after["image"] == finished["image"]
    assert http.get(f"/queue/{finished['job_id']}/image").content == base64.b64decode(finished["image"])
    running = _wait(http, running_id)
    assert running["state"] == "done" and running["attempts"] == 1, running
    assert http.get("/health").json()["queue"]["directory"] == job_store  # no password in this URL to hide
    assert _active_jobs(job_store) == 0
