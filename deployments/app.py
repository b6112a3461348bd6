"""The application builder: binds the deployment graph from config args (`import_path: deployments.app:build_app`)."""

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from ray.serve import Application

from deployments.generators import Refiner, SD15Generator, SDXLGenerator
from deployments.ingress import Ingress
from deployments.upscaler import Upscaler
from pipelines.settings import Settings


class AppArgs(BaseModel):
    """Arguments from the config's `args:`; paths default to the environment / repository layout. A misspelt
    argument is an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid")
    models_dir: str | None = None
    loras_dir: str | None = None
    upscalers_dir: str | None = None
    outputs_dir: str | None = None
    models_config: str | None = None
    cache_dir: str | None = None  # hashes and detected families of model files
    job_database: str | None = None  # default: <outputs_dir>/jobs.sqlite3
    device: str | None = None  # default: CUDA when present, else CPU
    # A job with no progress report (and no ingress still waiting on it) for this long is marked failed.
    stale_job_timeout_s: float = Field(600.0, gt=0)
    # Per model family, queued + running, across the service; beyond it POST answers 503 with Retry-After.
    max_queued_jobs: int = Field(64, ge=1)
    # Access: a file of API keys (one per line; also DIFFUSION_API_KEYS / DIFFUSION_API_KEYS_FILE) and CORS origins.
    api_keys_file: str | None = None
    cors_origins: list[str] | None = None
    # Finished job records older than this are pruned, and at most this many are kept.
    keep_finished_jobs_s: float = Field(7 * 86400, ge=0)
    keep_finished_jobs: int = Field(10000, ge=0)


def build_app(args: dict | None = None) -> Application:
    parsed = AppArgs(**(args or {}))
    settings = Settings.from_env()
    overrides = {
        key: Path(value).expanduser().resolve()
        for key in ("models_dir", "loras_dir", "upscalers_dir", "outputs_dir", "models_config", "cache_dir")
        if (value := getattr(parsed, key))
    }
    settings = settings.model_copy(update=overrides)
    database = parsed.job_database or str(settings.outputs_dir / "jobs.sqlite3")
    plain = settings.model_dump(mode="json")
    job_options = {
        "keep_finished_seconds": parsed.keep_finished_jobs_s,
        "keep_finished_count": parsed.keep_finished_jobs,
    }
    generator_args = {"settings": plain, "job_database": database, "job_options": job_options, "device": parsed.device}
    upscaler = Upscaler.bind(settings=plain, device=parsed.device)
    refiner = Refiner.bind(**generator_args)
    return Ingress.bind(
        SD15Generator.bind(**generator_args, upscaler=upscaler),
        SDXLGenerator.bind(**generator_args, upscaler=upscaler, refiner=refiner),
        refiner,
        settings=plain,
        job_database=database,
        job_options=job_options,
        stale_job_timeout_s=parsed.stale_job_timeout_s,
        max_queued_jobs=parsed.max_queued_jobs,
        api_keys_file=parsed.api_keys_file,
        cors_origins=parsed.cors_origins,
    )


app = build_app()
