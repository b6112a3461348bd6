"""Generator deployments: one per model family, each holding several checkpoints.

The checkpoint name is the multiplexed model id, so Serve routes a job to a replica that already has that
checkpoint loaded (the engine's cache holds the pipelines, Serve's multiplexed cache `ModelHandle`s). Jobs
from different requests that can share one diffusers call (same checkpoint and `PreparedJob.batch_key()`) are
gathered by the replica's `JobBatcher` and run as one batch. All image work is `pipelines.ImageEngine`; this
class only places it on a replica, runs torch off the event loop, reports progress to the job store and
writes the results.
"""

import asyncio
import logging
import time
import uuid

from ray import serve

from deployments.batching import JobBatcher
from deployments.generator_config import BatchingConfig, torch_thread_count
from deployments.image_recorder import ImageRecorder
from deployments.job_client import JobsClient
from deployments.job_records import JobOrder
from deployments.jobs import LEASE_RENEW_S
from deployments.metrics import PhaseTimer, observe_phase, service_metrics
from deployments.replica_jobs import CollectedImages, ModelHandle, QueuedJob
from pipelines.catalog import ModelCatalog
from pipelines.errors import DiffusionAPIError
from pipelines.families import family_of
from pipelines.generate import GenerationResult, ImageEngine, RefinedImages
from pipelines.models import LoadedModel
from pipelines.prepare import PreparedJob
from pipelines.previews import set_preview_sink
from pipelines.progress import PHASE_REFINING, PhaseProgress
from pipelines.settings import Settings
from pipelines.speed import SpeedOptions
from pipelines.storage import OutputStorage
from pipelines.system import gpu_info

logger = logging.getLogger("ray.serve")
MODELS_PER_REPLICA = 2  # the engine's budget, and so Serve's multiplexed cache's (see ModelHandle)
PROGRESS_INTERVAL_S = 0.2
HEALTH_CHECK_TIMEOUT_S = 10.0  # the device check's limit (below Serve's own 30 s health check timeout)


class _Generator:
    """Shared body of the per-family deployments."""

    FAMILY = ""  # the model family this deployment serves (pipelines/families/)
    DEFAULT_BATCHING = BatchingConfig()  # the family's own limits: see `family_batching`

    def __init__(self, settings: dict, job_database: str, job_options: dict | None = None, device: str | None = None,
                 upscaler=None, refiner=None, engine_options: dict | None = None):  # fmt: skip
        self.upscaler = upscaler  # handles of the Upscaler and Refiner deployments (hires fix, refiner hand-off)
        self.refiner = refiner
        self.settings = Settings(**settings)
        self.storage = OutputStorage(self.settings.outputs_location)
        options = dict(engine_options or {})
        threads = torch_thread_count(options.get("torch_threads"))
        self.engine = ImageEngine(ModelCatalog(self.settings), device=device, dtype=options.get("dtype"),
                                  max_loaded_models=MODELS_PER_REPLICA, torch_threads=threads,
                                  speed=SpeedOptions.from_env(options.get("speed")))  # fmt: skip
        self.jobs = JobsClient(job_database, **(job_options or {}))
        self.batching = self.DEFAULT_BATCHING
        self.batcher = JobBatcher(self._run_batch, self.batching.max_batch_size, self.batching.batch_wait_ms / 1000)
        context = serve.get_replica_context()
        self.replica_name = f"{context.deployment}#{context.replica_id.unique_id}"
        self._reported_models: list[str] | None = None
        self.recorder = ImageRecorder(self.jobs, self.storage)
        self._lease_keeper: asyncio.Task | None = None
        self._holding: set[str] = set()  # jobs in generate(), from their arrival (model loading included)
        logger.info("%s: torch threads %d, %s", self.replica_name, threads, self.batching)
        self._warm_up(options.get("warmup") or [])
        self._registering: asyncio.Task | None = None
        if self.engine.loaded_models():  # Serve runs the constructor on the replica's event loop
            self._registering = asyncio.get_running_loop().create_task(self._register(self.engine.loaded_models()))
        self._report()
        # From here on the fair queue gives this family work for this replica too (deployments/job_queue.py).
        self._room_keeper = asyncio.get_running_loop().create_task(self._keep_room())

    def _warm_up(self, jobs: list[dict]) -> None:
        """Runs the configured warm-up jobs of this deployment's family before the replica takes traffic (Serve
        health-checks a replica only once its constructor has returned)."""
        for job in jobs:
            entry = self.engine.catalog.resolve(job["model"], field="warmup.model")
            if entry.family == self.FAMILY:
                seconds = self.engine.warm_up(entry.name, job["width"], job["height"], job["steps"],
                                              job["batch_sizes"])  # fmt: skip
                logger.info("%s: warmed up %s in %.1fs (%s)", self.replica_name, entry.name, seconds, job)

    def reconfigure(self, user_config: dict) -> None:
        """Serve passes the deployment's `user_config` (batching); omitted keys keep the family's defaults."""
        self.batching = self.DEFAULT_BATCHING.model_copy(update=BatchingConfig(**user_config).model_dump(
            exclude_unset=True))  # fmt: skip
        self.batcher.configure(self.batching.max_batch_size, self.batching.batch_wait_ms / 1000)
        logger.info("%s: %s", self.replica_name, self.batching)

    def _report(self) -> None:
        """Tells the job actor what this replica runs on; `/health` shows it (the ingress has no GPU)."""
        self._reported_models = self.engine.loaded_models()
        report = {
            "deployment": serve.get_replica_context().deployment,
            "device": str(self.engine.device),
            "dtype": str(self.engine.dtype).removeprefix("torch."),
            "loaded_models": self._reported_models,
            "gpu": gpu_info(),
            "batching": self.batching.model_dump(),
        }
        self.jobs.report_replica(self.replica_name, report)

    @serve.multiplexed(max_num_models_per_replica=MODELS_PER_REPLICA)
    async def get_model(self, model_id: str) -> ModelHandle:
        """Serve calls this only for a model its multiplexed cache does not hold, after evicting (and so
        releasing) its least recently used one when it is full. Use `_loaded_model`."""
        started = time.monotonic()
        cached = model_id in self.engine.loaded_models()  # the warm-up's models, when they are registered
        loaded = await asyncio.to_thread(self.engine.load, model_id)
        if not cached:
            service_metrics().model_load_seconds.observe(time.monotonic() - started, tags={"family": self.FAMILY})
        return ModelHandle(self.engine, loaded)

    async def _loaded_model(self, model_id: str) -> LoadedModel:
        """The engine's loaded model, asked for through Serve's multiplexed cache so that Serve knows (and
        routes by) what this replica holds. The caller's reference keeps it alive for its job only."""
        handle = await self.get_model(model_id)
        loaded = handle.current()
        return loaded if loaded is not None else await asyncio.to_thread(handle.reload)

    async def _register(self, names: list[str]) -> None:
        """Puts models loaded before Serve's multiplexed cache existed (the warm-up's) into it, so Serve routes
        their jobs here."""
        for name in names:
            try:
                await self.get_model(name)
            except Exception:
                logger.exception("%s: registering the warmed-up model %s failed", self.replica_name, name)

    async def generate(self, order: JobOrder, more_coming: int = 0) -> dict:
        """Runs one job, as the ingress prepared it, to its end (its images in batches, with compatible jobs)
        and records the outcome on the job; returns {"job_id"}, with the encoded `images` in order when the
        order asks for them (the ingress answers with them without reading them back from the storage).
        `more_coming`: how many more jobs the ingress was admitting when it sent this one (a burst): this one
        may wait up to `batch_wait_ms` for them to join its batch."""
        if self._lease_keeper is None or self._lease_keeper.done():
            self._lease_keeper = asyncio.create_task(self._keep_leases())
        self._holding.add(order.job_id)
        try:
            return await self._generate(order, more_coming)
        finally:
            self._holding.discard(order.job_id)

    async def _generate(self, order: JobOrder, more_coming: int) -> dict:
        job_id, job = order.job_id, order.job
        try:
            with self.batcher.expecting():  # batch-mates already waiting may wait for this job to join them
                model_id = serve.get_multiplexed_model_id()
                outcome = "hit" if model_id in self.engine.loaded_models() else "miss"  # a miss waits for a load
                service_metrics().multiplex.inc(tags={"family": self.FAMILY, "outcome": outcome})
                loaded = await self._loaded_model(model_id)
            job.job_id = job_id
            width, height = (job.hires.width, job.hires.height) if job.hires else (job.width, job.height)
            limit = max(1, self.batching.max_batch_pixels // (width * height))
            images = job.per_image(order.images)
            self.recorder.collected[job_id] = CollectedImages(len(images))
            token = uuid.uuid4().hex[:12]
            units = [((loaded.entry.name, image.batch_key()),
                      QueuedJob(order, image, loaded.entry.name, token)) for image in images]  # fmt: skip
            outcomes = await self.batcher.submit_many(units, limit, more_coming)
        except DiffusionAPIError as error:
            await self.jobs.fail(job_id, error.message)
            raise
        except Exception as error:
            logger.exception("job %s failed", job_id)
            await self.jobs.fail(job_id, f"generation failed: {type(error).__name__}: {error}")
            raise
        for outcome in outcomes:
            if isinstance(outcome, BaseException):  # already recorded on the job by its batch
                raise outcome
        if order.return_images and all("data" in outcome for outcome in outcomes):
            return {"job_id": job_id, "images": [outcome["data"] for outcome in outcomes]}
        return {"job_id": job_id}

    async def _run_batch(self, batch: list[QueuedJob]) -> list[dict | BaseException]:
        """Runs one batch: starts its jobs (one cancelled while it waited is left out: it never starts), runs
        the rest in one diffusers call off the event loop, writes each image and records each job's outcome."""
        job_ids = list(dict.fromkeys(queued.job_id for queued in batch))
        phase = PhaseProgress.for_job(batch[0].job, None).first_phase
        started = set(await self.jobs.start_many(job_ids, phase, len(batch)))
        skipped = {"skipped": "the job was cancelled or has ended before it started"}
        outcomes: dict[tuple[str, int], dict | BaseException] = {
            queued.key: {"job_id": queued.job_id, **skipped} for queued in batch if queued.job_id not in started
        }
        running = [queued for queued in batch if queued.job_id in started]
        now = time.monotonic()
        for queued in running:
            observe_phase(self.FAMILY, "queued", now - queued.arrived)
        if running:
            service_metrics().batch_size.observe(len(running), tags={"family": self.FAMILY})
        try:
            if running:
                outcomes.update(await self._run_started(running))
        finally:
            self.recorder.settle(batch)
        if self._reported_models != self.engine.loaded_models():
            self._report()
        return [outcomes[queued.key] for queued in batch]

    async def _run_started(self, batch: list[QueuedJob]) -> dict[tuple[str, int], dict | BaseException]:
        loop = asyncio.get_running_loop()
        job_ids = list(dict.fromkeys(queued.job_id for queued in batch))
        loaded = await self._loaded_model(batch[0].model)
        cancelled: set[str] = set()  # filled from the job store's replies; read by the worker thread
        timer = PhaseTimer(self.FAMILY)
        progress = self._progress_sender(loop, job_ids, cancelled, timer)
        upscale, refine = self._remote_hooks(loop, timer)
        logger.info("batch of %d on %s: %s", len(batch), batch[0].model, " ".join(job_ids))

        def generate_and_save() -> list[dict | BaseException]:
            set_preview_sink(self._preview_sender(loop))  # this worker thread's context only
            results = self.engine.run_batch(loaded, [queued.job for queued in batch], progress, upscale, refine,
                                            lambda job: job.job_id in cancelled)  # fmt: skip
            return [self.recorder.save(queued, result) if isinstance(result, GenerationResult) else result
                    for queued, result in zip(batch, results, strict=True)]  # fmt: skip

        try:
            results = await asyncio.to_thread(generate_and_save)
        except Exception as error:  # a bug or a broken model: every job of the batch ends in error
            timer.stop()
            logger.exception("batch %s failed", job_ids)
            message = error.message if isinstance(error, DiffusionAPIError) else (
                f"generation failed: {type(error).__name__}: {error}")  # fmt: skip
            await asyncio.gather(*(self.jobs.fail(job_id, message) for job_id in job_ids))
            return {queued.key: error for queued in batch}
        timer.stop()
        return await self.recorder.record(batch, results)

    def _progress_sender(self, loop: asyncio.AbstractEventLoop, batch_ids: list[str], cancelled: set[str],
                         timer: PhaseTimer | None = None):  # fmt: skip
        """A function for the worker thread that sends progress (images of the running call, done, total,
        phase) to the job store at most every PROGRESS_INTERVAL_S, and always the final figure. A job of several
        images counts the ones made before this call. Jobs the store reports as no longer active (cancelled, or
        failed by the reaper) are added to `cancelled`. Jobs of the batch that wait for their turn (an
        out-of-memory batch retried job by job), and jobs with images waiting for a later batch, get a heartbeat
        with it."""
        last_sent = [0.0]

        async def send(percents: dict[str, float], phase: str) -> None:
            by_percent: dict[float, list[str]] = {}
            for job_id, percent in percents.items():
                by_percent.setdefault(percent, []).append(job_id)
            active = set()
            for percent, job_ids in by_percent.items():
                active.update(await self.jobs.progress_many(job_ids, percent, phase))
            cancelled.update(set(percents) - active)
            # Batch-mates waiting for their turn, and started jobs whose other images wait for a later batch.
            waiting = [job_id for job_id in dict.fromkeys([*batch_ids, *self.recorder.collected])
                       if job_id not in percents and job_id not in cancelled]  # fmt: skip
            if waiting:
                await self.jobs.touch_active(waiting)

        def report(jobs: list[PreparedJob], done: int, total: int, phase: str) -> None:
            if timer is not None:
                timer.enter(phase)
            now = time.monotonic()
            if done == total or now - last_sent[0] >= PROGRESS_INTERVAL_S:
                last_sent[0] = now
                images: dict[str, list[PreparedJob]] = {}
                for job in jobs:
                    images.setdefault(job.job_id, []).append(job)
                percents = {
                    job_id: round(100.0 * (mine[0].image_index + len(mine) * done / total) / mine[0].image_count, 2)
                    for job_id, mine in images.items()
                }
                asyncio.run_coroutine_threadsafe(send(percents, phase), loop)

        return report

    def _preview_sender(self, loop: asyncio.AbstractEventLoop):
        """A function for the worker thread that records a job's latest preview in the job store."""

        def send(job_id: str, preview: str) -> None:
            asyncio.run_coroutine_threadsafe(self.jobs.record_previews({job_id: preview}), loop)

        return send

    def _remote_hooks(self, loop: asyncio.AbstractEventLoop, timer: PhaseTimer):
        """The engine's upscale and refine steps, handed to the Upscaler and Refiner deployments. They are
        called from the worker thread and await the handles on this replica's event loop. The Refiner gives
        back `RefinedImages`: its images with the warnings and embeddings of its part, for the job's warnings
        and infotext."""

        async def call_upscaler(images, upscaler: str, width: int, height: int):
            return await self.upscaler.upscale.remote(images, upscaler, width, height)

        async def call_refiner(model, jobs: list[PreparedJob], latents, phases: PhaseProgress):
            handle = self.refiner.options(multiplexed_model_id=model.name)
            return await handle.refine.remote(jobs, latents, phases.ranges[PHASE_REFINING])

        # Handles are called on the event loop (Serve's router may run on it), never from the worker thread.
        def upscale(images, upscaler: str, width: int, height: int):
            return asyncio.run_coroutine_threadsafe(call_upscaler(images, upscaler, width, height), loop).result()

        def refine(model, jobs: list[PreparedJob], latents, phases: PhaseProgress):
            timer.enter(PHASE_REFINING)  # the hand-off and the Refiner deployment's steps
            return asyncio.run_coroutine_threadsafe(call_refiner(model, jobs, latents.cpu(), phases), loop).result()

        return (upscale if self.upscaler else None), (refine if self.refiner else None)

    async def _keep_room(self) -> None:
        """Renews this replica's room in the job store every LEASE_RENEW_S: a batch of its family's images,
        which the fair queue counts while the renewals go on (a lost replica's room lapses by itself)."""
        while True:
            try:
                await self.jobs.renew_room(self.replica_name, self.FAMILY, self.batching.max_batch_size)
            except Exception:
                logger.warning("%s: renewing its room in the job store failed", self.replica_name, exc_info=True)
            await asyncio.sleep(LEASE_RENEW_S)

    def __del__(self) -> None:
        """Serve's graceful shutdown (after the replica's requests have drained): its room is withdrawn at once,
        so the fair queue counts it no longer (a lost replica's room lapses by itself). Synchronous, since the
        garbage collector calls it too."""
        keeper = getattr(self, "_room_keeper", None)
        if keeper is None:  # the constructor did not get that far
            return
        keeper.cancel()
        try:
            self.jobs.withdraw_room(self.replica_name, self.FAMILY)
        except Exception:
            logger.warning("%s: withdrawing its room from the job store failed", self.replica_name, exc_info=True)

    async def ready(self) -> bool:
        """What the ingress sends a family with no replica up: answered once one is (Serve starts a replica
        for a request waiting at a handle, deployments/autoscaling.py)."""
        return True

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metrics (deployments/autoscaling.py): the family's images waiting in the
        fair queue and dispatched to its replicas, from the job store (every replica reports the same figures)."""
        return {name: float(value) for name, value in (await self.jobs.family_demand(self.FAMILY)).items()}

    async def _keep_leases(self) -> None:
        """Renews the leases of the jobs this replica holds (waiting in its batcher or running), so no ingress
        replica takes a job that is still being worked on for an abandoned one."""
        while True:
            await asyncio.sleep(LEASE_RENEW_S)
            try:
                await self.jobs.renew_leases(list(self._holding | set(self.recorder.collected)))
            except Exception:
                logger.exception("renewing job leases failed")

    async def check_health(self) -> None:
        """Serve's health check (every few seconds): the replica is unhealthy when its device no longer computes
        (a lost GPU, a sticky CUDA error: `ImageEngine.check_health` raises), or when the worker threads that
        run its torch work take none (the check runs on one of them and must end within HEALTH_CHECK_TIMEOUT_S).
        It also refreshes this replica's report."""
        try:
            await asyncio.wait_for(asyncio.to_thread(self.engine.check_health), HEALTH_CHECK_TIMEOUT_S)
        except TimeoutError as error:
            raise RuntimeError(f"the device check did not end within {HEALTH_CHECK_TIMEOUT_S:g} s: the device or "
                               "this replica's worker threads are stuck") from error  # fmt: skip
        self._report()


def family_batching(family: str) -> BatchingConfig:
    """A family's default batching limits, from its table row (pipelines/families/)."""
    spec = family_of(family)
    return BatchingConfig(max_batch_size=spec.max_batch_size, max_batch_pixels=spec.max_batch_pixels)


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=16)
class SD15Generator(_Generator):
    """SD 1.5 checkpoints."""

    FAMILY = "sd15"
    DEFAULT_BATCHING = family_batching(FAMILY)


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=8)
class SDXLGenerator(_Generator):
    """SDXL base checkpoints."""

    FAMILY = "sdxl"
    DEFAULT_BATCHING = family_batching(FAMILY)


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=8)
class Refiner(_Generator):
    """SDXL refiner checkpoints: img2img jobs on a refiner model, and the refiner's part of base -> refiner jobs
    (the SDXL generator hands over its latents at `refiner_switch_at`)."""

    FAMILY = "sdxl-refiner"
    DEFAULT_BATCHING = family_batching(FAMILY)

    async def refine(self, jobs: list[PreparedJob], latents, progress_range: tuple[float, float]) -> RefinedImages:
        """The refiner's steps for a batch the SDXL generator started (its jobs are already running): the images,
        with the warnings and embeddings of this part, which the SDXL generator adds to its jobs' warnings and
        infotext."""
        loaded = await self._loaded_model(serve.get_multiplexed_model_id())
        start, end = progress_range
        send = self._progress_sender(asyncio.get_running_loop(), [job.job_id for job in jobs], set())

        def on_step(step: int, total: int) -> None:
            send(jobs, round(1000 * (start + (end - start) * step / total)), 1000, PHASE_REFINING)

        sink = self._preview_sender(asyncio.get_running_loop())

        def refine_with_previews():
            set_preview_sink(sink)
            return self.engine.refine(loaded, jobs, latents, on_step)

        return await asyncio.to_thread(refine_with_previews)


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=8)
class FluxGenerator(_Generator):
    """FLUX.1 checkpoints (dev, schnell and their fine-tunes)."""

    FAMILY = "flux"
    DEFAULT_BATCHING = family_batching(FAMILY)


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=8)
class SD3Generator(_Generator):
    """SD 3 / 3.5 checkpoints (Medium, Large, Large Turbo)."""

    FAMILY = "sd3"
    DEFAULT_BATCHING = family_batching(FAMILY)


# Family -> its generator deployment: every family of pipelines/families/ has one, named `ModelFamily.deployment`.
GENERATORS = {
    deployment.func_or_class.FAMILY: deployment
    for deployment in (SD15Generator, SDXLGenerator, Refiner, FluxGenerator, SD3Generator)
}
