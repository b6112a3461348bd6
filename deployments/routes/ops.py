"""Operating the service: the page, `/hello` (open: load balancers probe it), `/health` and `/metrics`."""

import asyncio
import pathlib

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

from deployments.contract import documented_errors
from deployments.metrics import job_store_metrics
from deployments.services import ServicesDep
from pipelines.schemas import HealthResponse, HelloResponse, JobState
from pipelines.system import health_report

NOT_REPORTED_GPU = {"cuda_available": False, "device_name": "unknown: no generator replica has reported yet"}

router = APIRouter()
PAGE_HTML = (pathlib.Path(__file__).parent.parent / "page" / "index.html").read_text(encoding="utf-8")
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


@router.get("/", response_class=Response, responses={
    200: {"description": "A page to try the service in a browser", "content": {"text/html": {}}},
    **documented_errors(503)})  # fmt: skip
async def page() -> HTMLResponse:
    """One self-contained page (no build step): the listings, a generation form, live progress with
    previews, the image with its infotext, this browser's last jobs."""
    return HTMLResponse(PAGE_HTML, headers={"Cache-Control": "no-cache"})


@router.get("/metrics", response_class=Response, responses={
    200: {"description": "The job store's counts in Prometheus text format (jobs by state and family)",
          "content": {"text/plain": {"schema": {"type": "string"}}}},
    **documented_errors(401, 503)})  # fmt: skip
async def metrics(services: ServicesDep) -> Response:
    """The whole service's jobs by state and family, for a scrape that needs no Ray service discovery;
    the other metrics (phases, loads, batches, webhooks) come from Ray's metrics port on every node."""
    return Response(job_store_metrics(await services.jobs.usage()), media_type=PROMETHEUS_TEXT)


@router.get("/hello", response_model=HelloResponse, responses=documented_errors(503))
async def hello() -> HelloResponse:
    return HelloResponse(ok=True)


@router.get("/health", response_model=HealthResponse, responses=documented_errors(401, 503))
async def health(services: ServicesDep) -> dict:
    counts = await services.jobs.counts()
    replicas = await services.jobs.replica_reports()
    active = counts.get(JobState.queued, 0) + counts.get(JobState.processing, 0)
    # GPU figures come from the generator replicas (they hold the GPUs; the ingress imports no torch).
    gpus = [report["gpu"] for report in replicas]
    gpu = next((g for g in gpus if g.get("cuda_available")), gpus[0] if gpus else None) or NOT_REPORTED_GPU
    settings, libraries = services.settings, services.libraries
    report = await asyncio.to_thread(
        health_report, settings.models_dir, settings.loras_dir, settings.outputs_dir, services.storage,
        len(libraries.catalog.list_models()), len(libraries.loras.available()), active, services.store_label, gpu,
    )  # fmt: skip
    report["jobs"] = counts
    report["replicas"] = replicas
    if not replicas:
        report["warnings"].append("no generator replica has reported yet")
        report["status"] = "warning"
    return report
