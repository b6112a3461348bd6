"""Generator deployments: one per model family, each holding several checkpoints.

The checkpoint name is the multiplexed model id, so Serve routes a job to a replica that already has that
checkpoint loaded. All image work is `pipelines.ImageEngine`; this class only places it on a replica, runs
torch off the event loop, reports progress to the job actor and writes the result.
"""

import asyncio
import datetime
import logging
import threading
import time
from pathlib import Path

from ray import serve

from deployments.jobs import get_or_create_job_actor
from pipelines.catalog import ModelCatalog
from pipelines.errors import DiffusionAPIError, JobCancelledError
from pipelines.generate import PHASE_REFINING, GenerationResult, ImageEngine, PhaseProgress, PreparedJob
from pipelines.images import encode_base64
from pipelines.infotext import encode_image
from pipelines.schemas import Img2ImgRequest, Txt2ImgRequest
from pipelines.settings import Settings
from pipelines.system import gpu_info

logger = logging.getLogger("ray.serve")
MODELS_PER_REPLICA = 2
PROGRESS_INTERVAL_S = 0.2


class _Generator:
    """Shared body of the per-family deployments."""

    def __init__(self, settings: dict, job_database: str, job_options: dict | None = None, device: str | None = None,
                 upscaler=None, refiner=None):  # fmt: skip
        self.upscaler = upscaler  # handles of the Upscaler and Refiner deployments (hires fix, refiner hand-off)
        self.refiner = refiner
        self.settings = Settings(**settings)
        self.engine = ImageEngine(ModelCatalog(self.settings), device=device, max_loaded_models=MODELS_PER_REPLICA)
        self.jobs = get_or_create_job_actor(job_database, **(job_options or {}))
        context = serve.get_replica_context()
        self.replica_name = f"{context.deployment}#{context.replica_id.unique_id}"
        self._report()

    def _report(self) -> None:
        """Tells the job actor what this replica runs on; `/health` shows it (the ingress has no GPU)."""
        report = {
            "deployment": serve.get_replica_context().deployment,
            "device": str(self.engine.device),
            "dtype": str(self.engine.dtype).removeprefix("torch."),
            "loaded_models": self.engine.loaded_models(),
            "gpu": gpu_info(),
        }
        self.jobs.report_replica.remote(self.replica_name, report)

    @serve.multiplexed(max_num_models_per_replica=MODELS_PER_REPLICA)
    async def get_model(self, model_id: str):
        return await asyncio.to_thread(self.engine.load, model_id)

    async def generate(self, job_id: str, kind: str, request: dict) -> dict:
        """Runs one job to its end and records the outcome on the job; returns the result record."""
        try:
            parsed = Img2ImgRequest(**request) if kind == "img2img" else Txt2ImgRequest(**request)
            loaded = await self.get_model(serve.get_multiplexed_model_id())
            job = await asyncio.to_thread(self.engine.prepare, parsed, loaded.entry)
            if not await self.jobs.start.remote(job_id, PhaseProgress.for_job(job, None).first_phase):
                return {"job_id": job_id, "skipped": "the job was cancelled or has ended before it started"}
            loop = asyncio.get_running_loop()
            cancelled = threading.Event()
            send = self._progress_sender(job_id, loop, cancelled)

            def report(done: int, total: int, phase: str) -> None:
                send(100.0 * done / total, phase, done == total)

            upscale, refine = self._remote_hooks(job_id, loop)
            run = self.engine.run
            result = (await asyncio.to_thread(run, loaded, [job], report, upscale, refine, cancelled.is_set))[0]
            record = self._save(job_id, parsed, result)
            await self.jobs.add_warnings.remote(job_id, result.warnings)
            if not await self.jobs.complete.remote(job_id, record):  # cancelled at the very end: keep no file
                Path(record["output_path"]).unlink(missing_ok=True)
            self._report()
            return {"job_id": job_id, "output_path": record["output_path"]}
        except JobCancelledError:
            logger.info("job %s cancelled", job_id)
            return {"job_id": job_id, "cancelled": True}
        except DiffusionAPIError as error:
            await self.jobs.fail.remote(job_id, error.message)
            raise
        except Exception as error:
            logger.exception("job %s failed", job_id)
            await self.jobs.fail.remote(job_id, f"generation failed: {type(error).__name__}: {error}")
            raise

    def _progress_sender(self, job_id: str, loop: asyncio.AbstractEventLoop, cancelled: threading.Event | None = None):
        """A function for the worker thread that sends progress (percent, phase, final) to the job actor at most
        every PROGRESS_INTERVAL_S, and always the final figure. When the actor answers that the job is no longer
        active (cancelled, or failed by the reaper) it sets `cancelled`."""
        last_sent = [0.0]

        async def send(percent: float, phase: str) -> None:
            if not await self.jobs.progress.remote(job_id, percent, phase) and cancelled is not None:
                cancelled.set()

        def report(percent: float, phase: str, final: bool) -> None:
            now = time.monotonic()
            if final or now - last_sent[0] >= PROGRESS_INTERVAL_S:
                last_sent[0] = now
                asyncio.run_coroutine_threadsafe(send(percent, phase), loop)

        return report

    def _remote_hooks(self, job_id: str, loop: asyncio.AbstractEventLoop):
        """The engine's upscale and refine steps, handed to the Upscaler and Refiner deployments. They are
        called from the worker thread and await the handles on this replica's event loop."""

        def upscale(images, upscaler: str, width: int, height: int):
            call = self.upscaler.upscale.remote(images, upscaler, width, height)
            return asyncio.run_coroutine_threadsafe(_awaited(call), loop).result()

        def refine(model, jobs: list[PreparedJob], latents, phases: PhaseProgress):
            start, end = phases.ranges[PHASE_REFINING]
            handle = self.refiner.options(multiplexed_model_id=model.name)
            call = handle.refine.remote(job_id, jobs, latents.cpu(), (start, end))
            return asyncio.run_coroutine_threadsafe(_awaited(call), loop).result()

        return (upscale if self.upscaler else None), (refine if self.refiner else None)

    def _save(self, job_id: str, request: Txt2ImgRequest, result: GenerationResult) -> dict:
        data = encode_image(result.image, request.file_type, result.infotext, request.jpeg_quality)
        folder = self.settings.outputs_dir / datetime.date.today().isoformat()
        folder.mkdir(parents=True, exist_ok=True)
        path = Path(folder) / f"{job_id}.{request.file_type}"
        path.write_bytes(data)
        return {
            "image": encode_base64(data),
            "output_path": str(path),
            "width": result.width,
            "height": result.height,
            "file_type": request.file_type,
            "jpeg_quality": request.jpeg_quality,
            "generation_time_sec": result.generation_time_sec,
            "memory_before_mb": result.memory_before_mb,
            "memory_after_mb": result.memory_after_mb,
            "seed": result.seed,
            "infotext": result.infotext,
        }

    def check_health(self) -> None:
        """Serve's health check (every few seconds): the replica is healthy while its engine answers; it also
        refreshes this replica's report."""
        self._report()


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=2)
class SD15Generator(_Generator):
    """SD 1.5 checkpoints."""


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=2)
class SDXLGenerator(_Generator):
    """SDXL base checkpoints."""


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=2)
class Refiner(_Generator):
    """SDXL refiner checkpoints: img2img jobs on a refiner model, and the refiner's part of base -> refiner jobs
    (the SDXL generator hands over its latents at `refiner_switch_at`)."""

    async def refine(self, job_id: str, jobs: list[PreparedJob], latents, progress_range: tuple[float, float]):
        loaded = await self.get_model(serve.get_multiplexed_model_id())
        start, end = progress_range
        send = self._progress_sender(job_id, asyncio.get_running_loop())

        def on_step(step: int, total: int) -> None:
            send(100.0 * (start + (end - start) * step / total), PHASE_REFINING, step == total)

        return await asyncio.to_thread(self.engine.refine, loaded, jobs, latents, on_step)


async def _awaited(response):
    return await response
