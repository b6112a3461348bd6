"""The application builder: binds the deployment graph from config args (`import_path: deployments.app:build_app`)."""

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field
from ray.serve import Application

from deployments.access import AccessPolicy
from deployments.generators import GENERATORS
from deployments.image_links import LINK_SECRET_ENV
from deployments.ingress import Ingress
from deployments.job_db import describe, is_postgres_url, open_database, redact
from deployments.upscaler import Upscaler
from deployments.webhooks import WebhookPolicy
from pipelines.families import FAMILIES
from pipelines.settings import Settings
from pipelines.speed import SpeedOptions
from pipelines.storage import OutputStorage, is_url


class WarmupJob(BaseModel):
    """Throwaway jobs a generator runs at replica start, before it takes traffic (torch.compile compiles per
    shape): the first user job of this model, size and batch size does not pay for it."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(..., min_length=1)
    width: int = Field(512, ge=64, le=2048, multiple_of=8)
    height: int = Field(512, ge=64, le=2048, multiple_of=8)
    steps: int = Field(2, ge=1, le=150)
    batch_sizes: list[int] = Field([1], min_length=1)


class AppArgs(BaseModel):
    """Arguments from the config's `args:`; paths default to the environment / repository layout. A misspelt
    argument is an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid")
    models_dir: str | None = None
    loras_dir: str | None = None
    upscalers_dir: str | None = None
    vaes_dir: str | None = None
    embeddings_dir: str | None = None
    controlnet_dir: str | None = None
    ipadapter_dir: str | None = None
    clip_vision_dir: str | None = None
    text_encoder_dir: str | None = None
    annotators_dir: str | None = None
    outputs_dir: str | None = None  # a local folder, or an fsspec URL for the images (s3://..., file:///...)
    models_config: str | None = None
    cache_dir: str | None = None  # hashes and detected families of model files
    # The job store: a SQLite file (default <outputs_dir>/jobs.sqlite3; also DIFFUSION_API_JOB_STORE) or a
    # postgresql:// URL, the store a cluster needs (no record on any one node). `job_database`: its older name.
    job_store: str | None = None
    job_database: str | None = None
    device: str | None = None  # default: CUDA when present, else CPU
    # A job with no progress report (and no ingress still waiting on it) for this long is marked failed.
    stale_job_timeout_s: float = Field(600.0, gt=0)
    # Per model family, queued + running, across the service; beyond it POST answers 429 with Retry-After.
    max_queued_jobs: int = Field(64, ge=1)
    # Dispatches of a job whose generator replica or node is lost mid-job (the first included).
    max_attempts: int = Field(3, ge=1, le=10)
    # Access: a file of API keys (one per line, or YAML with names and admins: README "Access"; also
    # DIFFUSION_API_KEYS / DIFFUSION_API_KEYS_FILE) and CORS origins.
    api_keys_file: str | None = None
    cors_origins: list[str] | None = None
    # Finished job records older than this are pruned, and at most this many are kept per owner (API key);
    # retention runs every retention_interval_s.
    keep_finished_jobs_s: float = Field(7 * 86400, ge=0)
    keep_finished_jobs: int = Field(10000, ge=0)
    retention_interval_s: float = Field(60.0, gt=0, le=86400)
    # Engine: torch's CPU threads per replica (default: the CPUs the replica asked for, rounded up; -1: every
    # core; -2: every core but one), precision (default: bfloat16 on GPUs that have it, else float16; float32 on
    # the CPU) and the speed options of pipelines/speed.py (attention, channels_last, fuse_qkv, compile, ...).
    torch_threads: int | None = Field(None, ge=-64, le=1024)
    dtype: Literal["float16", "bfloat16", "float32"] | None = None
    speed: SpeedOptions | None = None
    # Webhooks (a job's callback_url): the hosts they may call (host names or host:port; "*": any public host;
    # also DIFFUSION_API_WEBHOOK_ALLOWED_HOSTS), the signing secret (also DIFFUSION_API_WEBHOOK_SECRET) and the
    # waits before the retries of a failed delivery. Off unless hosts are allowed.
    webhook_allowed_hosts: list[str] | None = None
    webhook_secret: str | None = None
    webhook_retry_delays_s: list[Annotated[float, Field(ge=0, le=3600)]] = Field([15.0, 45.0], max_length=10)
    # The OpenAI door's `response_format: url` links: how long they work, the address clients reach the service
    # at (default: the request's own; set it behind a proxy), and the secret that signs them (default: one made
    # once and kept in the job store; also DIFFUSION_API_IMAGE_LINK_SECRET).
    image_link_ttl_s: float = Field(3600.0, gt=0, le=7 * 86400)
    public_url: str | None = Field(None, pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$")
    image_link_secret: str | None = Field(None, min_length=16)
    # Jobs each generator runs at start for the models of its family (an unknown model stops the deploy).
    warmup: list[WarmupJob] = Field(default_factory=list)


def job_store_location(parsed: AppArgs, settings: Settings) -> str:
    """The job store's path or URL. A PostgreSQL store is reached (and its schema checked) here, so a wrong URL,
    a server that is down or a missing driver stops the deploy with the reason instead of failing every job."""
    if parsed.job_store and parsed.job_database and parsed.job_store != parsed.job_database:
        raise ValueError("give the job store once: job_store and job_database (its older name) differ")
    location = parsed.job_store or parsed.job_database or os.environ.get("DIFFUSION_API_JOB_STORE")
    if not location:
        return str(settings.outputs_dir / "jobs.sqlite3")
    if not is_postgres_url(location):
        if "://" in location:
            raise ValueError(f"job_store {location!r}: a SQLite file path or a postgresql:// URL")
        return str(Path(location).expanduser().resolve())
    try:
        open_database(location)
    except Exception as error:  # the driver's errors name the host and the reason (and may quote the URL)
        raise ValueError(f"job_store {describe(location)}: cannot use it: {redact(str(error), location)}") from None
    return location


def build_app(args: dict | None = None) -> Application:
    parsed = AppArgs(**(args or {}))
    settings = Settings.from_env()
    overrides = {
        key: Path(value).expanduser().resolve()
        for key in (
            "models_dir",
            "loras_dir",
            "upscalers_dir",
            "vaes_dir",
            "embeddings_dir",
            "controlnet_dir",
            "ipadapter_dir",
            "clip_vision_dir",
            "annotators_dir",
            "text_encoder_dir",
            "outputs_dir",
            "models_config",
            "cache_dir",
        )
        if (value := getattr(parsed, key))
    }
    if parsed.outputs_dir and is_url(parsed.outputs_dir):  # images in shared storage; local things stay local
        overrides.pop("outputs_dir")
        overrides["outputs_url"] = parsed.outputs_dir
    settings = settings.model_copy(update=overrides)
    OutputStorage(settings.outputs_location)  # an unknown protocol or a missing package stops the deploy here
    database = job_store_location(parsed, settings)
    plain = settings.model_dump(mode="json")
    job_options = {
        "keep_finished_seconds": parsed.keep_finished_jobs_s,
        "keep_finished_count": parsed.keep_finished_jobs,
        "outputs": settings.outputs_location,
        "prune_interval_s": parsed.retention_interval_s,
    }
    engine_options = {
        "torch_threads": parsed.torch_threads,
        "dtype": parsed.dtype,
        "speed": parsed.speed.model_dump(exclude_unset=True) if parsed.speed else None,
        "warmup": [job.model_dump() for job in parsed.warmup],
    }
    webhooks = {"allowed_hosts": parsed.webhook_allowed_hosts, "secret": parsed.webhook_secret,
                "retry_delays_s": parsed.webhook_retry_delays_s}  # fmt: skip
    WebhookPolicy.from_config(**webhooks)  # hosts allowed without a secret stop the deploy here
    AccessPolicy.from_config(parsed.api_keys_file, parsed.cors_origins)  # so do keys configured but unusable
    link_secret = parsed.image_link_secret or os.environ.get(LINK_SECRET_ENV)
    if link_secret is not None and len(link_secret) < 16:
        raise ValueError(f"image_link_secret ({LINK_SECRET_ENV}): at least 16 characters, not {len(link_secret)}")
    generator_args = {"settings": plain, "job_database": database, "job_options": job_options, "device": parsed.device,
                      "engine_options": engine_options}  # fmt: skip
    upscaler = Upscaler.bind(settings=plain, device=parsed.device, torch_threads=parsed.torch_threads)
    return Ingress.bind(
        generators=bind_generators(generator_args, upscaler),
        settings=plain,
        job_database=database,
        job_options=job_options,
        stale_job_timeout_s=parsed.stale_job_timeout_s,
        max_queued_jobs=parsed.max_queued_jobs,
        max_attempts=parsed.max_attempts,
        api_keys_file=parsed.api_keys_file,
        cors_origins=parsed.cors_origins,
        upscaler=upscaler,
        webhooks=webhooks,
        image_links={
            "ttl_s": parsed.image_link_ttl_s,
            "public_url": parsed.public_url,
            "configured_secret": parsed.image_link_secret or os.environ.get(LINK_SECRET_ENV),
        },
    )


def bind_generators(generator_args: dict, upscaler) -> dict:
    """One generator deployment per family of the table (pipelines/families/), keyed by family. Families that
    start images get the Upscaler (hires fix); a family a refiner continues gets that refiner's deployment."""
    refiners = {spec.refines: GENERATORS[name].bind(**generator_args) for name, spec in FAMILIES.items()
                if spec.refines}  # fmt: skip
    generators = {}
    for name, spec in FAMILIES.items():
        if spec.refines:
            generators[name] = refiners[spec.refines]
            continue
        extra = {"upscaler": upscaler} if spec.txt2img else {}
        if name in refiners:
            extra["refiner"] = refiners[name]
        generators[name] = GENERATORS[name].bind(**generator_args, **extra)
    return generators


app = build_app()
