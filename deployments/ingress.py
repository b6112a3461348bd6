"""The HTTP ingress: validates requests, records jobs, hands them to the family's generator.

A job is accepted only after everything that can be checked without a model is checked (model name, family,
sampler, input image); then it is recorded as `queued` and started detached from the HTTP request, so a
client that disconnects does not cancel it. The ingress awaits the generator's response in a tracked task
and records any failure (exception, dead replica) on the job.
"""

import asyncio
import contextvars
import logging
import pathlib
import time
import uuid
from typing import Annotated

import grpc
from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, RayServeException
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import get_route_path

from deployments.a1111_routes import A1111Routes
from deployments.a1111_routes import router as a1111_router
from deployments.access import (
    AccessMiddleware,
    AccessPolicy,
    AsciiJSONResponse,
    CollapseLeadingSlashes,
    caller,
    error_response,
    is_a1111_path,
    require_json_body,
)
from deployments.contract import IMAGE_CONTENT, IMAGE_ERRORS, documented_errors, documented_methods, install_openapi
from deployments.job_db import describe
from deployments.jobs import LEASE_RENEW_S, PRUNE_BATCH, TERMINAL_STATES, JobsClient, image_fields
from deployments.metrics import FAMILIES, job_store_metrics, service_metrics
from deployments.watch import JOB_EVENT_SCHEMA, KEEPALIVE_S, JobWatcher, change_key, job_summary, sse_event
from deployments.webhooks import WebhookLookupUnavailable, WebhookPolicy, WebhookTargetError
from pipelines.catalog import ModelCatalog, ModelEntry
from pipelines.embeddings import EmbeddingLibrary
from pipelines.errors import DiffusionAPIError, InvalidRequestError, ServiceBusyError, TemporarilyUnavailableError
from pipelines.images import decode_base64_bytes, encode_base64, image_extension
from pipelines.infotext import MIME_TYPES
from pipelines.limits import LIMITS
from pipelines.loras import LoraLibrary
from pipelines.models import check_mode_supported
from pipelines.prepare import PreparedJob, prepare_job
from pipelines.samplers import sampler_names, schedule_type_names
from pipelines.schemas import (
    JOB_ID_PATTERN,
    CancelResponse,
    EmbeddingInfo,
    EmbeddingsResponse,
    HealthResponse,
    HelloResponse,
    Img2ImgRequest,
    LoraInfo,
    LorasResponse,
    ModelAlias,
    ModelAliasesResponse,
    ModelInfo,
    ModelsResponse,
    QueueStatusResponse,
    SamplingMethodsResponse,
    StatusInclude,
    Txt2ImgRequest,
    Txt2ImgResponse,
    UpscalerInfo,
    UpscalersResponse,
    VaeInfo,
    VaesResponse,
)
from pipelines.settings import VERSION, Settings
from pipelines.storage import MissingImageError, OutputStorage
from pipelines.system import gpu_info, health_report
from pipelines.upscalers import LATENT_MODES, RESIZE_MODES, UpscalerLibrary
from pipelines.vaes import VaeLibrary

INPUT_FIELDS = ("image", "mask")  # img2img's input images: stored in the output storage, not in the job record
DECODE_SLOTS = 2  # input images decoded at once per ingress replica (each up to max_input_image_pixels)
RETRY_WARNING = "retried after a worker failure (its generator replica or node was lost)"
RECOVERY_WARNING = "dispatched again after the service restarted or the ingress replica that dispatched it was lost"
MAX_IMAGES = LIMITS.max_batch_size * LIMITS.max_n_iter  # the most images one job makes
PAGE_HTML = (pathlib.Path(__file__).parent / "page" / "index.html").read_text(encoding="utf-8")
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"

logger = logging.getLogger("ray.serve")

app = FastAPI(title="Diffusion API", version=VERSION, description="Stable Diffusion on Ray Serve")


def _replica_access_policy() -> AccessPolicy | None:
    # The policy lives on this replica's Ingress instance (built from its app arguments). Serve may ship the
    # app to the replica by value, so a module global would not be the one __init__ set.
    return getattr(serve.get_replica_context().servable_object, "access", None)


ARRIVING = "diffusion_api_submission_arriving"
SUBMISSION_PATHS = ("/txt2img", "/img2img", "/sdapi/v1/txt2img", "/sdapi/v1/img2img")


class _CountSubmissions:
    """Counts job submissions from the moment they reach this replica, before their bodies are read and
    validated, so that a burst is known while its first job is handed to a generator (which then holds it a
    moment for the others to join its batch). Plain ASGI; the count lives on the replica's Ingress."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        counted = scope["type"] == "http" and scope["method"] == "POST" and get_route_path(scope) in SUBMISSION_PATHS
        ingress = serve.get_replica_context().servable_object if counted else None
        if not hasattr(ingress, "submissions_arriving"):
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        state[ARRIVING] = True  # the route clears it when it hands the job over (see Ingress._submit)
        ingress.submissions_arriving += 1
        try:
            await self.app(scope, receive, send)
        finally:
            if state.pop(ARRIVING, False):  # refused (4xx) before it was handed over
                ingress.submissions_arriving -= 1


app.add_middleware(_CountSubmissions)
app.add_middleware(AccessMiddleware, get_policy=_replica_access_policy)
app.add_middleware(CollapseLeadingSlashes)  # outermost: every check sees the collapsed path
app.include_router(a1111_router)


def _api_keys_on() -> bool:
    try:
        policy = _replica_access_policy()
    except RayServeException:  # outside a replica: the schema read offline, without keys
        return False
    return bool(policy and policy.keys_on)


def _configured_fields() -> dict[str, dict]:
    """`callback_url` as this service's webhook settings allow it (off: null only)."""
    try:
        policy = getattr(serve.get_replica_context().servable_object, "webhooks", None)
    except RayServeException:  # outside a replica: the schema read offline, webhooks off
        policy = None
    return {"callback_url": (policy or WebhookPolicy()).url_schema()}


install_openapi(app, api_keys_on=_api_keys_on, configured_fields=_configured_fields)


def _on_a1111_api(request: Request) -> bool:
    return is_a1111_path(get_route_path(request.scope))


@app.exception_handler(DiffusionAPIError)
async def _domain_error(request: Request, error: DiffusionAPIError) -> JSONResponse:
    a1111 = _on_a1111_api(request)
    if isinstance(error, ServiceBusyError):
        return error_response(error.status_code, error.message, headers={"Retry-After": str(error.retry_after_s)},
                              a1111=a1111)  # fmt: skip
    if error.status_code >= 500:
        logger.error("%s %s failed: %s", request.method, request.url.path, error.message)
    return error_response(error.status_code, error.message, a1111=a1111, error=type(error).__name__,
                          field=error.field)  # fmt: skip


@app.exception_handler(Exception)
async def _unexpected_error(request: Request, error: Exception) -> JSONResponse:
    """A bug still answers JSON (A1111's error body on its paths), never Starlette's plain-text page."""
    logger.error("%s %s failed", request.method, request.url.path, exc_info=error)
    message = f"internal error: {type(error).__name__}: {str(error)[:500]}"
    return error_response(500, message, a1111=_on_a1111_api(request), error=type(error).__name__)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    parts = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"] if part != "body") or "body"
        parts.append(f"{location}: {item['msg']}" + (f" (got {item['input']!r})" if "input" in item else ""))
    message = "; ".join(parts)[:2000]
    if _on_a1111_api(request):
        body = {"error": "RequestValidationError", "detail": jsonable_errors(error), "body": "", "errors": message}
    else:
        body = {"status": "error", "error": message, "detail": jsonable_errors(error)}
    return AsciiJSONResponse(status_code=422, content=body)


def jsonable_errors(error: RequestValidationError) -> list[dict]:
    return [{"loc": list(item["loc"]), "msg": item["msg"], "type": item["type"]} for item in error.errors()]


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    """Starlette's own answers (unknown path, method not allowed) in the API's error shape. A 405 lists in
    `Allow` every method the schema documents for the path: Starlette names only the first matching route's."""
    headers = dict(error.headers or {})
    if error.status_code == 405:
        allowed = documented_methods(request.app, get_route_path(request.scope))
        headers["Allow"] = ", ".join(allowed) if allowed else headers.get("Allow", "")
        message = f"{request.method} is not allowed on {request.url.path}; allowed: {headers['Allow']}"
    elif error.status_code == 404:
        message = f"no such path: {request.url.path} (see /docs)"
    elif error.status_code == 400:
        message = f"the request body cannot be read as JSON: {error.detail}"
    else:
        message = str(error.detail)
    return error_response(error.status_code, message, headers=headers, a1111=_on_a1111_api(request))


JobId = Annotated[str, Path(pattern=JOB_ID_PATTERN, description="The job_id POST /txt2img or /img2img answered")]
JOB_SUBMISSION_ERRORS = (400, 401, 404, 413, 415, 422, 429, 503)


def unknown_field_warnings(kind: str, fields: list[str]) -> list[str]:
    """Unknown fields are ignored (as A1111 does), and said so, since a misspelt field would otherwise go
    unnoticed."""
    if not fields:
        return []
    named = ", ".join(repr(name[:60]) for name in fields[:10])
    if len(fields) > 10:
        named += f" and {len(fields) - 10} more"
    hint = "; hires fix ('hires') applies to txt2img only" if kind == "img2img" and "hires" in fields else ""
    return [f"unknown field(s) ignored: {named}{hint}"]


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=200)
@serve.ingress(app)
class Ingress(A1111Routes):
    def __init__(self, sd15, sdxl, refiner, settings: dict, job_database: str,
                 job_options: dict | None = None, stale_job_timeout_s: float = 600.0,
                 max_queued_jobs: int = 64, api_keys_file: str | None = None,
                 cors_origins: list[str] | None = None, upscaler=None, max_attempts: int = 3,
                 webhooks: dict | None = None):  # fmt: skip
        self.access = AccessPolicy.from_config(api_keys_file, cors_origins)
        if self.access.keys_on:
            logger.info("API keys are on: %s", ", ".join(key.name + (" (admin)" if key.admin else "")
                                                        for key in self.access.keys))  # fmt: skip
        self.handles = {"sd15": sd15, "sdxl": sdxl, "sdxl-refiner": refiner}
        self.upscaler = upscaler  # the Upscaler deployment (the A1111 API's extras)
        self.settings = Settings(**settings)
        self.catalog = ModelCatalog(self.settings)
        self.loras = LoraLibrary(self.settings, self.catalog.facts)
        self.upscalers = UpscalerLibrary(self.settings)  # names only: the Upscaler deployment runs them
        self.vaes = VaeLibrary(self.settings, self.catalog.facts)  # names and hashes: the generators load them
        self.embeddings = EmbeddingLibrary(self.settings, self.catalog.facts)
        self.storage = OutputStorage(self.settings.outputs_location)
        self.job_database = job_database
        self.jobs = JobsClient(job_database, **(job_options or {}))
        self.stale_job_timeout_s = stale_job_timeout_s
        self.max_queued_jobs = max_queued_jobs
        self.max_attempts = max_attempts  # dispatches of a job whose worker is lost, the first included
        self._inflight: dict[str, asyncio.Task] = {}  # job id -> the task awaiting its generator
        self.submissions_arriving = 0  # job POSTs received and not yet handed to a generator (_CountSubmissions)
        self._reaper: asyncio.Task | None = None
        self._retention: asyncio.Task | None = None
        self.watcher = JobWatcher(self.jobs)  # wakes long polls and event streams when their job changes
        self.webhooks = WebhookPolicy.from_config(**(webhooks or {}))
        self._deliveries: dict[str, asyncio.Task] = {}  # job id -> its webhook delivery under way here
        self.decodes = asyncio.Semaphore(DECODE_SLOTS)  # bounds the memory and CPU that decoding inputs takes

    # The page and the metrics -------------------------------------------------------------------------------
    @app.get("/", response_class=Response, responses={
        200: {"description": "A page to try the service in a browser", "content": {"text/html": {}}},
        **documented_errors(503)})  # fmt: skip
    async def page(self) -> HTMLResponse:
        """One self-contained page (no build step): the listings, a generation form, live progress with
        previews, the image with its infotext, this browser's last jobs."""
        return HTMLResponse(PAGE_HTML, headers={"Cache-Control": "no-cache"})

    @app.get("/metrics", response_class=Response, responses={
        200: {"description": "The job store's counts in Prometheus text format (jobs by state and family)",
              "content": {"text/plain": {"schema": {"type": "string"}}}},
        **documented_errors(401, 503)})  # fmt: skip
    async def metrics(self) -> Response:
        """The whole service's jobs by state and family, for a scrape that needs no Ray service discovery;
        the other metrics (phases, loads, batches, webhooks) come from Ray's metrics port on every node."""
        rows = await self.jobs.counts_by_family()
        return Response(job_store_metrics(rows), media_type=PROMETHEUS_TEXT)

    # Listings --------------------------------------------------------------------------------------------
    @app.get("/hello", response_model=HelloResponse, responses=documented_errors(503))
    async def hello(self) -> HelloResponse:
        return HelloResponse(ok=True)

    @app.get("/health", response_model=HealthResponse, responses=documented_errors(401, 503))
    async def health(self) -> dict:
        counts = await self.jobs.counts()
        replicas = await self.jobs.replica_reports()
        active = counts.get("queued", 0) + counts.get("processing", 0)
        # GPU figures come from the generator replicas (they hold the GPUs); the ingress's own as a fallback.
        gpus = [report["gpu"] for report in replicas]
        gpu = next((g for g in gpus if g.get("cuda_available")), gpus[0] if gpus else None) or gpu_info()
        report = await asyncio.to_thread(
            health_report, self.settings.models_dir, self.settings.loras_dir, self.settings.outputs_dir,
            self.storage, len(self.catalog.list_models()), len(self.loras.available()), active,
            describe(self.job_database), gpu,  # a PostgreSQL URL without its password
        )  # fmt: skip
        report["jobs"] = counts
        report["replicas"] = replicas
        if not replicas:
            report["warnings"].append("no generator replica has reported yet")
            report["status"] = "warning"
        return report

    @app.get("/models", response_model=ModelsResponse, responses=documented_errors(401, 503))
    async def models(self) -> ModelsResponse:
        entries = await asyncio.to_thread(self.catalog.list_models)
        return ModelsResponse(
            models=[ModelInfo(name=e.name, label=e.label, family=e.family, inpainting=e.inpainting) for e in entries]
        )

    @app.get("/models/aliases", response_model=ModelAliasesResponse, responses=documented_errors(401, 503))
    async def model_aliases(self) -> ModelAliasesResponse:
        pairs = await asyncio.to_thread(self.catalog.aliases)
        models = [ModelAlias(name=name, label=label) for label, name in pairs]
        return ModelAliasesResponse(models=models, message=f"{len(models)} model aliases")

    @app.get("/loras", response_model=LorasResponse, responses=documented_errors(401, 503))
    async def list_loras(self) -> LorasResponse:
        found = await asyncio.to_thread(self.loras.available)
        return LorasResponse(loras=[LoraInfo(name=lora.name, scale=1.0, family=lora.family) for lora in found])

    @app.get("/upscalers", response_model=UpscalersResponse, responses=documented_errors(401, 503))
    async def list_upscalers(self) -> UpscalersResponse:
        files = await asyncio.to_thread(self.upscalers.available)
        listed = [UpscalerInfo(name=name, path="internal") for name in (*LATENT_MODES, *RESIZE_MODES)]
        listed += [UpscalerInfo(name=item.name, path=str(item.path)) for item in files]
        return UpscalersResponse(upscalers=listed)

    @app.get("/vaes", response_model=VaesResponse, responses=documented_errors(401, 503))
    async def list_vaes(self) -> VaesResponse:
        found = await asyncio.to_thread(self.vaes.available)
        return VaesResponse(vaes=[VaeInfo(name=vae.name, path=str(vae.path)) for vae in found])

    @app.get("/embeddings", response_model=EmbeddingsResponse, responses=documented_errors(401, 503))
    async def list_embeddings(self) -> EmbeddingsResponse:
        found = await asyncio.to_thread(self.embeddings.available)
        return EmbeddingsResponse(embeddings=[EmbeddingInfo(name=item.name, family=item.family) for item in found])

    @app.get("/sampling_methods", response_model=SamplingMethodsResponse, responses=documented_errors(401, 503))
    async def sampling_methods(self) -> SamplingMethodsResponse:
        return SamplingMethodsResponse(sampling_methods=sampler_names(), scheduler_types=schedule_type_names())

    # Jobs ------------------------------------------------------------------------------------------------
    @app.post("/txt2img", response_model=Txt2ImgResponse, responses=documented_errors(*JOB_SUBMISSION_ERRORS),
              dependencies=[Depends(require_json_body)])  # fmt: skip
    async def txt2img(self, request: Txt2ImgRequest, http: Request) -> Txt2ImgResponse:
        return await self._submit("txt2img", request, http)

    @app.post("/img2img", response_model=Txt2ImgResponse, responses=documented_errors(*JOB_SUBMISSION_ERRORS),
              dependencies=[Depends(require_json_body)])  # fmt: skip
    async def img2img(self, request: Img2ImgRequest, http: Request) -> Txt2ImgResponse:
        return await self._submit("img2img", request, http)

    async def _submit(self, kind: str, request: Txt2ImgRequest | Img2ImgRequest, http: Request) -> Txt2ImgResponse:
        warnings = unknown_field_warnings(kind, request.unknown_fields())
        job_id = await self._submit_job(kind, request, http, warnings, owner=caller(http).owner)
        return Txt2ImgResponse(job_id=job_id)

    async def _submit_job(self, kind: str, request: Txt2ImgRequest | Img2ImgRequest, http: Request,
                          warnings: list[str], origin: str = "", owner: str = "") -> str:  # fmt: skip
        """Checks, records and starts a job (of either API); returns its id once it is recorded as queued."""
        self._start_reaper()
        if request.callback_url is not None:
            try:
                await self.webhooks.check_async(request.callback_url)
            except WebhookTargetError as error:
                raise InvalidRequestError(f"callback_url: {error}", field="callback_url") from None
            except WebhookLookupUnavailable as error:
                raise TemporarilyUnavailableError(f"callback_url: {error}; retry in a few seconds") from None
        default_model = await self.default_model_name() if not (request.model or "").strip() else None
        if kind == "img2img":  # its images are decoded: a bounded number at a time per replica
            async with self.decodes:
                entry, job = await asyncio.to_thread(self._check, kind, request, default_model)
        else:
            entry, job = await asyncio.to_thread(self._check, kind, request, default_model)
        payload = request.stored_payload()
        payload["model"] = entry.name
        payload["seed"] = job.seed  # a random seed is fixed now, so a retried job makes the same image
        job_id = uuid.uuid4().hex
        warnings = job.sampler.warnings + job.warnings + warnings
        record, inputs = payload, {}
        if kind == "img2img":  # the input images are stored once, by reference: never in the record
            record = {key: value for key, value in payload.items() if key not in INPUT_FIELDS}
            inputs = await asyncio.to_thread(self._store_inputs, job_id, payload)
        try:
            created = await self.jobs.create(job_id, kind, record, warnings, entry.family, self.max_queued_jobs,
                                             origin, owner, inputs)  # fmt: skip
        except BaseException:
            await asyncio.to_thread(self._delete_inputs, inputs)
            raise
        if not created:
            await asyncio.to_thread(self._delete_inputs, inputs)
            raise ServiceBusyError(
                f"the {entry.family} generators already have {self.max_queued_jobs} jobs queued or running; "
                f"retry in a few seconds"
            )
        handle = self.handles[entry.family].options(multiplexed_model_id=entry.name)
        # Submissions this replica has received and not yet handed over are a burst: the generator may hold
        # this job a moment for them to join its batch (it never waits for a lone job).
        if http.scope.get("state", {}).pop(ARRIVING, False):
            self.submissions_arriving -= 1
        more_coming = self.submissions_arriving
        self._start_run(job_id, kind, payload, handle, more_coming)
        return job_id

    def _store_inputs(self, job_id: str, payload: dict) -> dict[str, str]:
        """Writes a job's input images (img2img `image`, `mask`) to the output storage; their locations."""
        stored = {}
        try:
            for name in INPUT_FIELDS:
                if payload.get(name):
                    data = decode_base64_bytes(payload[name], name)
                    stored[name] = self.storage.save_input(job_id, name, image_extension(data), data)
        except BaseException:
            self._delete_inputs(stored)
            raise
        return stored

    def _delete_inputs(self, inputs: dict[str, str]) -> None:
        for location in inputs.values():
            self.storage.delete(location)

    def _read_inputs(self, inputs: dict[str, str]) -> dict[str, str]:
        """A job's stored input images, as the base64 its payload had (MissingImageError when one is gone)."""
        return {name: encode_base64(self.storage.read(location)) for name, location in inputs.items()}

    def _start_run(self, job_id: str, kind: str, payload: dict, handle, more_coming: int = 0) -> None:
        # A fresh context detaches the work from this HTTP request: a client disconnect must not cancel it.
        run = self._run(job_id, kind, payload, handle, more_coming)
        task = asyncio.create_task(run, context=contextvars.Context())
        self._inflight[job_id] = task
        task.add_done_callback(lambda _: self._inflight.pop(job_id) if self._inflight.get(job_id) is task else None)

    async def _run(self, job_id: str, kind: str, payload: dict, handle, more_coming: int = 0) -> None:
        """Dispatches a job to its generator deployment until it ends. A job whose generator replica or node
        dies with it is dispatched again (Serve routes it to a live or replacement replica), up to
        `max_attempts` in all; jobs are deterministic (the seed is fixed at submission), so the retry makes the
        image the first attempt would have made, under the same name. When it has ended, its webhook (if it has
        one) is delivered."""
        await self._dispatch(job_id, handle, kind, payload, more_coming)
        await self._count_ended(job_id)
        if payload.get("callback_url"):
            self._start_delivery(job_id, payload["callback_url"], claimed=False)

    async def _dispatch(self, job_id: str, handle, kind: str, payload: dict, more_coming: int) -> None:
        try:
            while True:
                try:
                    await handle.generate.remote(job_id, kind, payload, more_coming)
                    return
                except BackPressureError:
                    # Serve's own queue limit (max_queued_requests) is full: the job stays queued and waits.
                    await asyncio.sleep(1.0)
                except (RayActorError, grpc.aio.AioRpcError) as error:  # the replica (or its node) is gone
                    cause = f"{type(error).__name__}: {error}".splitlines()[0][:300]
                    attempt = await self.jobs.retry(job_id, RETRY_WARNING, self.max_attempts, cause)
                    if attempt is None:  # it ended meanwhile (cancelled, done), or that was its last attempt
                        return
                    logger.warning("job %s: its generator was lost (%s); dispatching attempt %d", job_id, cause,
                                   attempt)  # fmt: skip
                    more_coming = 0
        except BaseException as error:  # includes CancelledError and a dead replica's ActorDiedError
            cause = getattr(error, "cause", None)
            message = getattr(cause, "message", None) or f"{type(error).__name__}: {error}".splitlines()[0]
            await self.jobs.fail(job_id, message)
            if isinstance(error, asyncio.CancelledError):
                raise

    async def _count_ended(self, job_id: str) -> None:
        """The job-outcome metrics, from the ingress that ran the job's last dispatch (each job counted once)."""
        try:
            job = await self.jobs.get(job_id)
            if job is not None and job["state"] in TERMINAL_STATES:
                tags = {"family": job["family"], "state": job["state"]}
                service_metrics().jobs_finished.inc(tags=tags)
                service_metrics().job_seconds.observe(max(0.0, job["updated"] - job["created"]), tags=tags)
        except Exception:  # metrics never fail a job
            logger.warning("recording the metrics of job %s failed", job_id, exc_info=True)

    def _start_delivery(self, job_id: str, url: str, claimed: bool) -> None:
        if job_id in self._deliveries:
            return
        delivery = asyncio.create_task(self._deliver_webhook(job_id, url, claimed), context=contextvars.Context())
        self._deliveries[job_id] = delivery
        delivery.add_done_callback(lambda _: self._deliveries.pop(job_id, None))

    async def _deliver_webhook(self, job_id: str, url: str, claimed: bool) -> None:
        """POSTs the ended job's final status (as the events' final event: no image bytes) to its callback_url,
        with retries, and records the outcome on the job. The delivery is claimed first (`claimed`: the job
        keeper already did), so one replica delivers it; one whose replica is lost midway is claimed again by
        another replica's keeper once its lease runs out (see JobStore.claim_delivery)."""
        try:
            if not claimed and not await self.jobs.claim_delivery(job_id):
                return
            job = await self.jobs.get(job_id)
            if job is None or job["state"] not in TERMINAL_STATES:
                return
            await self.jobs.record_webhook(job_id, {"attempts": 0, "status": "delivering"})
            status = await self._status_fields(job_id, job, with_images=False)
            outcome = await self.webhooks.deliver(url, job_id, status)
            await self.jobs.record_webhook(job_id, outcome)
            service_metrics().webhooks.inc(tags={"status": outcome["status"]})
        except asyncio.CancelledError:
            raise  # the replica is stopping: the delivery's lease runs out and another replica takes it over
        except Exception:
            logger.exception("job %s: delivering its webhook failed here; another attempt follows its lease", job_id)

    async def with_image_bytes(self, result: dict) -> tuple[dict, list[str]]:
        """A finished job's result with its images (base64) read from the output storage, where the job
        database keeps only their locations (records written before the storage held their bytes inline), and
        a warning for each image no longer there (then `images` is left out). An unreachable storage is a
        StorageError (500)."""
        result = image_fields(result)
        if result.get("images") or not result.get("output_paths"):
            return result, []
        staged = result.get("staged_paths") or [None] * len(result["output_paths"])
        found = await asyncio.gather(
            *(
                self._stored_image(path, staged_path)
                for path, staged_path in zip(result["output_paths"], staged, strict=True)
            )
        )
        missing = [f"image {path} is no longer in the output storage" for path, data in
                   zip(result["output_paths"], found, strict=True) if data is None]  # fmt: skip
        if not missing:
            result["images"] = [encode_base64(data) for data in found]
            result["image"] = result["images"][0]
        return result, missing

    async def _stored_image(self, path: str, staged: str | None = None) -> bytes | None:
        try:
            return await asyncio.to_thread(self.storage.read_recorded, path, staged)
        except MissingImageError:
            return None

    @app.get(
        "/queue/{job_id}/image",
        response_class=Response,
        responses={
            200: {"description": "The image file, with its infotext", "content": IMAGE_CONTENT},
            **documented_errors(401, 404, 409, 422, 500, 503, descriptions=IMAGE_ERRORS),
        },
    )
    async def job_image(self, job_id: JobId, http: Request,
                        index: Annotated[int, Query(ge=0, le=MAX_IMAGES - 1)] = 0):  # fmt: skip
        """A finished job's image file (`index`: which of a batch's images, 0 first), streamed from the output
        storage with its content type, so clients and browsers fetch images without reading node paths."""
        job = await self._visible_job(job_id, http)
        if job is None:
            return error_response(404, f"unknown job_id {job_id!r}")
        if job["state"] != "done" or not job["result"]:
            return error_response(409, f"job {job_id} is {job['state']}: it has no image" +
                                  ("" if job["state"] in TERMINAL_STATES else " yet"))  # fmt: skip
        result = image_fields(job["result"])
        paths, inline = result.get("output_paths") or [], result.get("images") or []
        count = max(len(paths), len(inline))
        if index >= count:
            return error_response(404, f"job {job_id} has {count} image(s); index {index} is beyond them")
        if index < len(inline):  # a record from before the output storage: the bytes are in the record
            data = decode_base64_bytes(inline[index], "image")
        else:
            staged = (result.get("staged_paths") or [None] * count)[index]
            data = await asyncio.to_thread(self.storage.read_recorded, paths[index], staged)  # missing: 404
        file_type = result.get("file_type") or "png"
        return Response(
            content=data,
            media_type=MIME_TYPES.get(file_type, "application/octet-stream"),
            headers={"Content-Disposition": f'inline; filename="{job_id}-{index}.{file_type}"'},
        )

    def _check(self, kind: str, request: Txt2ImgRequest | Img2ImgRequest,
               default_model: str | None = None) -> tuple[ModelEntry, PreparedJob]:  # fmt: skip
        """Everything that can be checked before a job exists (in a worker thread: it reads files): the model
        (absent: the service-wide default), the mode, sampler, image, LoRAs (unknown: 4xx; incompatible: a
        warning), hires fix and refiner."""
        entry = self.catalog.resolve(request.model or default_model)
        check_mode_supported(entry, kind)
        return entry, prepare_job(request, entry, self.loras, self.catalog, self.upscalers, self.vaes,
                                  self.embeddings)  # fmt: skip

    def _start_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.create_task(self._reap_forever(), context=contextvars.Context())

    async def _reap_forever(self) -> None:
        """The job keeper, every LEASE_RENEW_S: renews the leases of the jobs this replica dispatches; claims
        the jobs nobody holds any more (after a crash of the service, or of the ingress replica that dispatched
        them) and dispatches them again; now and then fails jobs that are held but have stopped progressing for
        `stale_job_timeout_s` (jobs this replica still waits on get a heartbeat first, so a long queue is not
        mistaken for a stuck worker); and runs retention when it is due (one replica per interval)."""
        last_reaped = time.monotonic()
        while True:
            await asyncio.sleep(LEASE_RENEW_S)
            try:
                inflight = list(self._inflight)
                await self.jobs.renew_leases(inflight)
                await self.jobs.renew_deliveries(list(self._deliveries))
                if time.monotonic() - last_reaped >= min(30.0, self.stale_job_timeout_s / 3):
                    last_reaped = time.monotonic()
                    await self.jobs.touch_queued(inflight)
                    await self.jobs.reap_stale(self.stale_job_timeout_s)
                for orphan in await self.jobs.claim_orphans():
                    await self._dispatch_again(orphan)
                for delivery in await self.jobs.claim_lapsed_deliveries():  # ended otherwise, or holder lost
                    self._start_delivery(delivery["job_id"], delivery["callback_url"], claimed=True)
            except Exception:
                logger.exception("the job keeper failed; it runs again in %.0fs", LEASE_RENEW_S)
            if self._retention is None or self._retention.done():  # its own task: never holds up the leases
                self._retention = asyncio.create_task(self._retain(), context=contextvars.Context())
            try:
                await self._gauge_queues()
            except Exception:
                logger.warning("updating the queue-depth metric failed", exc_info=True)

    async def _retain(self) -> None:
        """Retention on a timer (one replica per interval), so a full disk frees itself without waiting for a
        new job; a backlog goes in bounded steps, each one store call, so other calls run between them."""
        try:
            pruned = step = await self.jobs.prune_if_due() or 0
            while step == PRUNE_BATCH:
                step = await self.jobs.prune()
                pruned += step
            if pruned:
                logger.info("retention removed %d finished job(s)", pruned)
        except Exception:
            logger.warning("retention failed; it runs again later", exc_info=True)

    async def _gauge_queues(self) -> None:
        """The queue-depth gauge: jobs queued and running per family, the whole service's (from the store)."""
        active = {(family, state): count for family, state, count in await self.jobs.counts_by_family()
                  if state in ("queued", "processing")}  # fmt: skip
        for family in FAMILIES:
            for state in ("queued", "processing"):
                service_metrics().queue_depth.set(active.get((family, state), 0), tags={"family": family,
                                                                                        "state": state})  # fmt: skip

    async def _dispatch_again(self, orphan: dict) -> None:
        """Dispatches a job nobody held any more, as a new attempt (failed instead after its last one)."""
        job_id = orphan["job_id"]
        if job_id in self._inflight:  # still this replica's own (its lease lapsed while the store was away)
            return
        cause = "nobody held it any more (the service restarted, or its ingress replica was lost)"
        attempt = await self.jobs.retry(job_id, RECOVERY_WARNING, self.max_attempts, cause)
        if attempt is None:
            return
        handle = self.handles.get(orphan["family"])
        if handle is None:
            await self.jobs.fail(job_id, f"cannot dispatch it again: unknown model family {orphan['family']!r}")
            return
        try:
            payload = {**orphan["payload"], **await asyncio.to_thread(self._read_inputs, orphan["inputs"])}
        except DiffusionAPIError as error:  # an input image gone from the storage, or the storage unreachable
            await self.jobs.fail(job_id, f"cannot dispatch it again: its input image could not be read: "
                                         f"{error.message}")  # fmt: skip
            return
        logger.warning("job %s: %s; dispatching attempt %d", job_id, cause, attempt)
        model = payload.get("model")
        self._start_run(job_id, orphan["kind"], payload, handle.options(multiplexed_model_id=model))

    async def check_health(self) -> None:
        """Serve's health check (every few seconds); it also starts the job keeper on a fresh replica, so jobs
        left by a crash are dispatched again without waiting for a request."""
        self._start_reaper()

    @app.delete("/queue/{job_id}", response_model=CancelResponse,
                responses=documented_errors(401, 404, 409, 422, 503))  # fmt: skip
    async def cancel(self, job_id: JobId, http: Request):
        """Cancels a queued or running job: a queued one never starts, a running one stops at its next step."""
        job = await self._visible_job(job_id, http)
        if job is None:
            return error_response(404, f"unknown job_id {job_id!r}")
        if not await self.jobs.cancel(job_id):
            job = await self.jobs.get(job_id)
            return error_response(409, f"job {job_id} has already ended (state {job['state']!r}); nothing to cancel")
        return CancelResponse(job_id=job_id)

    @app.get("/queue/{job_id}", response_model=QueueStatusResponse,
             responses=documented_errors(401, 404, 422, 500, 503))  # fmt: skip
    async def queue(
        self,
        job_id: JobId,
        http: Request,
        wait_s: Annotated[
            float,
            Query(ge=0, le=30, description="Long poll: answer as soon as the job's state, phase or progress "
                  "changes, or after this many seconds (0: at once). A job that has ended answers at once."),
        ] = 0,
        include: Annotated[
            StatusInclude | None,
            Query(description="`inputs`: the job's `payload` (in any state) with the input images it was sent "
                  "(img2img `image`, `mask`), read back from the output storage; left out otherwise"),
        ] = None,
    ):  # fmt: skip
        self._start_reaper()
        job = await self._visible_job(job_id, http)
        if job is None:
            return error_response(404, f"unknown job_id {job_id!r}")
        if wait_s > 0 and job["state"] not in TERMINAL_STATES:
            async with self.watcher.watching(job_id):
                if await self.watcher.next_change(job_id, job_summary(job), wait_s) is not None:
                    job = await self.jobs.get(job_id) or job
        fields = await self._status_fields(job_id, job, with_images=True)
        if include is StatusInclude.inputs:
            inputs = await asyncio.to_thread(self._read_inputs, job["inputs"])  # missing: 404, unreachable: 500
            fields["payload"] = {**job["payload"], **inputs}
        # Serialized here (pydantic's JSON encoder) rather than re-validated by FastAPI: this is the route
        # clients poll.
        body = QueueStatusResponse.model_validate(fields).model_dump_json()
        return Response(content=body, media_type="application/json")

    async def _visible_job(self, job_id: str, http: Request) -> dict | None:
        """The job's record if the caller may see it (its owner, an admin, anyone with keys off), else None: a
        job of another key answers exactly as an unknown one (404), so its id is not confirmed to exist."""
        job = await self.jobs.get(job_id)
        return job if job is not None and caller(http).may_see(job["owner"]) else None

    async def _status_fields(self, job_id: str, job: dict, with_images: bool) -> dict:
        """A job record as the status fields clients read; `with_images`: the images' bytes (base64) read from
        the output storage, else `image_url` (where `GET /queue/{id}/image` serves them) in their place."""
        fields = {
            "status": "error" if job["state"] == "error" else "success",
            "job_id": job_id,
            "progress": job["progress"],
            "current_phase": job["phase"],
            "state": job["state"],
            "error": job["error"],
            "warnings": job["warnings"],
            "batch_size": job["batch_size"],
            "attempts": job["attempts"],
        }
        if job.get("webhook"):
            fields["webhook"] = job["webhook"]
        if job.get("preview") and job["state"] not in TERMINAL_STATES:
            fields["preview"] = job["preview"]
        if job["state"] == "done" and job["result"]:
            if with_images:
                result, missing = await self.with_image_bytes(job["result"])
            else:
                result, missing = image_fields(job["result"]), []
                for inline in ("image", "images"):
                    result.pop(inline, None)
            fields["image_url"] = f"/queue/{job_id}/image"
            result.pop("staged_paths", None)  # where the attempt wrote them first: the service's own business
            # Input images are not part of the status (`?include=inputs` brings them; records written before
            # inputs were stored apart still hold them).
            payload = {key: value for key, value in job["payload"].items() if key not in INPUT_FIELDS}
            fields.update({**result, "payload": payload})
            fields["warnings"] = job["warnings"] + missing
        return fields

    @app.get(
        "/queue/{job_id}/events",
        response_class=StreamingResponse,
        responses={
            200: {
                "description": "Server-Sent Events: `progress` (state, phase, progress, eta_s, batch_size, "
                "attempts) at each change, then one event named after the end state (`done`, `error`, "
                "`cancelled`) with the final status without image bytes (`image_url` says where the image is), "
                "then the stream ends. A comment line every 15 s keeps idle connections open.",
                "content": {"text/event-stream": {"schema": JOB_EVENT_SCHEMA}},
            },
            **documented_errors(401, 404, 422, 503),
        },
    )
    async def job_events(self, job_id: JobId, http: Request):
        """A job's progress as it happens, pushed: no polling by the client, and none per client here (one
        watch loop per replica wakes every stream of a job when the job changes)."""
        self._start_reaper()
        job = await self._visible_job(job_id, http)
        if job is None:
            return error_response(404, f"unknown job_id {job_id!r}")
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(self._events(job_id, job), media_type="text/event-stream", headers=headers)

    async def _events(self, job_id: str, job: dict):
        loop = asyncio.get_running_loop()
        previews = bool(job["payload"].get("preview"))
        async with self.watcher.watching(job_id):
            summary, sent = job_summary(job), None
            first_seen = (loop.time(), summary["progress"])
            while summary["state"] not in TERMINAL_STATES:
                if change_key(summary) != change_key(sent):
                    elapsed, gained = loop.time() - first_seen[0], summary["progress"] - first_seen[1]
                    eta = round(elapsed * (100.0 - summary["progress"]) / gained, 1) if gained > 0 else None
                    fields = {key: value for key, value in summary.items() if key != "preview"}
                    yield sse_event("progress", {"job_id": job_id, **fields, "eta_s": eta})
                if previews and summary["preview"] and summary["preview"] != (sent or {}).get("preview"):
                    yield sse_event("preview", {"job_id": job_id, "progress": summary["progress"],
                                                "image": summary["preview"]})  # fmt: skip
                sent, changed = summary, None
                while changed is None:
                    changed = await self.watcher.next_change(job_id, summary, KEEPALIVE_S, with_preview=previews)
                    if changed is None:
                        yield ": keep-alive\n\n"
                summary = changed
        final = await self.jobs.get(job_id) or job
        fields = await self._status_fields(job_id, final, with_images=False)
        yield sse_event(final["state"], fields)
