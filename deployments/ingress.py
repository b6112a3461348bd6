"""The HTTP ingress, as the composition root: the FastAPI app (its routers, middleware, error table and
schema) and the Serve deployment that builds the services the routers use.

A request passes, outermost first: CollapseLeadingSlashes (`//sdapi/...`), AccessMiddleware (CORS, body size,
API key: the caller), CountSubmissions (a burst a generator may batch), then its router. The routers are by
resource (deployments/routes/); they call the job service (deployments/job_service.py), which owns a job's
life from its submission to its end, and never the store.
"""

import asyncio
import logging

from fastapi import FastAPI
from ray import serve
from ray.serve.exceptions import RayServeException

from deployments.access import AccessMiddleware, AccessPolicy, CollapseLeadingSlashes
from deployments.contract import install_openapi
from deployments.http_errors import install_error_handlers
from deployments.image_links import ImageLinks
from deployments.job_client import JobsClient
from deployments.job_db import describe
from deployments.job_service import JobService, Libraries
from deployments.job_status import JobFiles
from deployments.routes import a1111, controlnet, jobs, listings, openai_api, ops
from deployments.services import Services
from deployments.submissions import Arrivals, CountSubmissions
from deployments.webhooks import WebhookPolicy
from pipelines.errors import DiffusionAPIError, TemporarilyUnavailableError
from pipelines.settings import VERSION, Settings
from pipelines.storage import OutputStorage

logger = logging.getLogger("ray.serve")

app = FastAPI(title="Diffusion API", version=VERSION, description="Stable Diffusion on Ray Serve")


def _replica_attribute(name: str):
    """An attribute of this replica's Ingress (built from its app arguments), or one given to the app itself
    (`app.state`: an app served without Serve, as the unit tests do); None before it is built, or offline.
    Serve may ship the app to the replica by value, so a module global would not be the one set."""
    given = getattr(app.state, name, None)
    if given is not None:
        return given
    try:
        return getattr(serve.get_replica_context().servable_object, name, None)
    except RayServeException:  # outside a replica: the schema read offline
        return None


def _access_policy() -> AccessPolicy | None:
    return _replica_attribute("access")


def _arrivals() -> Arrivals | None:
    services = _replica_attribute("services")
    return services.arrivals if services is not None else None


def _api_keys_on() -> bool:
    policy = _access_policy()
    return bool(policy and policy.keys_on)


def _configured_fields() -> dict[str, dict]:
    """`callback_url` as this service's webhook settings allow it (off: null only)."""
    services = _replica_attribute("services")
    policy = services.jobs.webhooks if services is not None else WebhookPolicy()
    return {"callback_url": policy.url_schema()}


app.add_middleware(CountSubmissions, get_arrivals=_arrivals)
app.add_middleware(AccessMiddleware, get_policy=_access_policy)
app.add_middleware(CollapseLeadingSlashes)  # outermost: every check sees the collapsed path
install_error_handlers(app)
for router in (ops.router, listings.router, jobs.router, a1111.router, controlnet.router, openai_api.router):
    app.include_router(router)
install_openapi(app, api_keys_on=_api_keys_on, configured_fields=_configured_fields)


ANNOTATE_TIMEOUT_S = 120.0  # the Upscaler's replica is always up; a first call loads the annotator's model


def remote_annotator(upscaler, loop: asyncio.AbstractEventLoop | None):
    """Runs an annotator's model on the Upscaler deployment. It is called from a worker thread (the submission's
    checks run in one) and awaits the handle on the replica's event loop, as handles must be called (Serve's
    router may run on that loop). The Upscaler's own errors (a model that does not load) come back as they
    are; one that cannot answer in time is a 503 to retry."""

    async def call(module: str, padded, resolution: int):
        return await upscaler.annotate.remote(module, padded, resolution)

    def run(module: str, padded, resolution: int):
        if upscaler is None or loop is None:
            raise TemporarilyUnavailableError(f"the {module} annotator runs on the Upscaler deployment, which this "
                                              "service has none of", field="controlnet")  # fmt: skip
        answer = asyncio.run_coroutine_threadsafe(call(module, padded, resolution), loop)
        try:
            return answer.result(ANNOTATE_TIMEOUT_S)
        except Exception as error:
            answer.cancel()
            cause = getattr(error, "cause", error)  # Ray wraps what the replica raised
            if isinstance(cause, DiffusionAPIError):
                raise cause from None
            logger.warning("annotator %s on the Upscaler deployment failed: %r", module, error)
            raise TemporarilyUnavailableError(f"the {module} annotator could not run just now "
                                              f"({type(error).__name__}); retry in a few seconds",
                                              field="controlnet") from None  # fmt: skip

    return run


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=200)
@serve.ingress(app)
class Ingress:
    def __init__(self, generators: dict, settings: dict, job_database: str,
                 job_options: dict | None = None, stale_job_timeout_s: float = 600.0,
                 max_queued_jobs: int = 64, api_keys_file: str | None = None,
                 cors_origins: list[str] | None = None, upscaler=None, max_attempts: int = 3,
                 webhooks: dict | None = None, image_links: dict | None = None):  # fmt: skip
        self.access = AccessPolicy.from_config(api_keys_file, cors_origins)
        if self.access.keys_on:
            logger.info("API keys are on: %s", ", ".join(key.name + (" (admin)" if key.admin else "")
                                                        for key in self.access.keys))  # fmt: skip
        settings = Settings(**settings)
        storage = OutputStorage(settings.outputs_location)
        libraries = Libraries.from_settings(settings)
        # The ingress runs no torch: the annotators' models run on the Upscaler. Serve runs a replica's
        # constructor on its event loop, the one its requests run on.
        libraries.controlnets.annotators.runner = remote_annotator(upscaler, _running_loop())
        arrivals = Arrivals()
        job_service = JobService(
            JobsClient(job_database, **(job_options or {})),
            libraries,
            JobFiles(storage),
            handles=generators,  # family -> its generator deployment's handle
            webhooks=WebhookPolicy.from_config(**(webhooks or {})),
            max_queued_jobs=max_queued_jobs,
            max_attempts=max_attempts,
            stale_job_timeout_s=stale_job_timeout_s,
            incoming=lambda: arrivals.count,
        )
        self.services = Services(settings, libraries, job_service, storage, upscaler, describe(job_database),
                                 arrivals, ImageLinks(**(image_links or {"ttl_s": 3600.0})))  # fmt: skip

    async def check_health(self) -> None:
        """Serve's health check (every few seconds); it also starts the job keeper on a fresh replica, so jobs
        left by a crash are dispatched again without waiting for a request."""
        self.services.jobs.keeper.start()
