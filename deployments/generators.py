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
import math
import os
import time
import uuid
import weakref
from dataclasses import dataclass, field

import ray
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from deployments.batching import JobBatcher
from deployments.job_client import JobsClient
from deployments.jobs import LEASE_RENEW_S, PER_IMAGE_FIELDS
from deployments.metrics import PhaseTimer, observe_phase, service_metrics
from pipelines.catalog import ModelCatalog
from pipelines.errors import DiffusionAPIError, JobCancelledError
from pipelines.generate import GenerationResult, ImageEngine, RefinedImages
from pipelines.infotext import encode_image
from pipelines.models import LoadedModel
from pipelines.prepare import PreparedJob
from pipelines.previews import set_preview_sink
from pipelines.progress import PHASE_REFINING, PhaseProgress
from pipelines.schemas import Img2ImgRequest, Txt2ImgRequest
from pipelines.settings import Settings
from pipelines.speed import SpeedOptions
from pipelines.storage import OutputStorage, StorageError
from pipelines.system import gpu_info

logger = logging.getLogger("ray.serve")
MODELS_PER_REPLICA = 2  # the engine's budget, and so Serve's multiplexed cache's (see ModelHandle)
PROGRESS_INTERVAL_S = 0.2
HEALTH_CHECK_TIMEOUT_S = 10.0  # the device check's limit (below Serve's own 30 s health check timeout)
COMPLETE_RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0)  # a store outage of about a minute is waited out


class BatchingConfig(BaseModel):
    """A generator deployment's `user_config` (it can be changed on a running deployment).

    The batch limits are a memory question on a GPU: a batch's activations grow with its total pixels, so a
    batch is capped both in jobs and in output pixels (hires fix: the final size). Each family's defaults
    (below) fit a 24 GB GPU in half precision with VAE slicing; raise them on larger GPUs after measuring with
    bench/gpu_bench.py.
    """

    model_config = ConfigDict(extra="forbid")

    # How long an idle replica waits for batch-mates after a job arrives; 0 turns batching off. Jobs that
    # arrive while a batch runs join the next batch without any added wait.
    batch_wait_ms: float = Field(100.0, ge=0, le=1000)
    max_batch_size: int = Field(8, ge=1, le=64)
    max_batch_pixels: int = Field(8 * 512 * 512, ge=64 * 64)


class ModelHandle:
    """What Serve's multiplexed cache holds for a checkpoint: a weak reference to the engine's load of it, never
    the pipeline. The engine's LRU cache is the one owner of pipelines, with the one budget (MODELS_PER_REPLICA).

    Why this design: Serve routes by the model ids of its own multiplexed cache, and offers no public way to
    be told that the engine evicted one. So Serve's cache, with the engine's budget and every load on the
    replica going through it (the warm-up's are put into it at start), picks what to evict; evicting calls
    `__del__` (Serve's hook for freeing a model), which releases that very pipeline in the engine before the
    next one loads. What Serve routes by is then what is in memory, and no pipeline outlives its eviction in
    a second cache. The engine's own LRU eviction only acts on loads outside Serve's cache; a handle whose
    model it let go loads it again (`current`, `reload`). Python calling `__del__` again when it collects the
    handle is harmless: the engine releases only this load of the model, never a later one.
    """

    def __init__(self, engine: ImageEngine, loaded: LoadedModel):
        self.engine = engine
        self.name = loaded.entry.name
        self._loaded = weakref.ref(loaded)

    def current(self) -> LoadedModel | None:
        """The engine's load of the model; None when the engine let it go on its own (a load outside Serve's
        cache made room): `reload` then."""
        loaded = self._loaded()
        return loaded if loaded is not None and self.engine.holds(loaded) else None

    def reload(self) -> LoadedModel:
        """Loads the model into the engine again (blocking: call it off the event loop)."""
        loaded = self.engine.load(self.name)
        self._loaded = weakref.ref(loaded)
        return loaded

    def __del__(self) -> None:
        loaded = self._loaded()
        if loaded is not None:
            self.engine.release(loaded)


@dataclass
class QueuedJob:
    """One image of a request (`batch_size` x `n_iter` images: `job.image_index` of `job.image_count`) waiting
    in, or running as part of, a batch. It names its model rather than holding the loaded pipeline, so a model
    evicted while the job waits is not kept in memory beside its successor."""

    job_id: str
    request: Txt2ImgRequest
    job: PreparedJob
    model: str
    token: str  # this attempt's own: its files are staged under names no other attempt of the job uses
    arrived: float = field(default_factory=time.monotonic)  # when it reached this replica (queue-time metric)

    @property
    def key(self) -> tuple[str, int]:
        return self.job_id, self.job.image_index


@dataclass
class CollectedImages:
    """The finished images of one job, gathered across the batches they run in; the job is recorded as done
    once all of them are in."""

    count: int
    records: dict[int, dict] = field(default_factory=dict)  # image index -> saved image record
    seconds: float = 0.0  # time in the diffusers calls that made them
    settled: int = 0  # images whose batch has given them an outcome (made, failed, cancelled or skipped)
    recorded: bool = False  # the job store has the job as done with these images

    @property
    def complete(self) -> bool:
        return len(self.records) == self.count

    def result(self) -> tuple[dict, list[str]]:
        """The job's result record (lists of every image's fields; `image` & co. are read from their first
        items) and the warnings its images' runs added."""
        records = [self.records[index] for index in range(self.count)]
        first = records[0]
        warnings = list(dict.fromkeys(w for record in records for w in record["warnings"]))
        per_image = (*PER_IMAGE_FIELDS, "staged_path", "warnings")
        result = {key: value for key, value in first.items() if key not in per_image}
        result.update({plural: [record[single] for record in records]
                       for single, plural in PER_IMAGE_FIELDS.items() if single in first})  # fmt: skip
        result["staged_paths"] = [record["staged_path"] for record in records]
        result["generation_time_sec"] = round(self.seconds, 3)
        result["batch_size"] = max(record["batch_size"] for record in records)
        return result, warnings

    def staged(self) -> dict[str, str]:
        """This attempt's staged files: staged name -> final name."""
        return {record["staged_path"]: record["output_path"] for record in self.records.values()}

    def discard_files(self, storage: OutputStorage) -> None:
        """Deletes this attempt's staged files (never a final name: those may be another attempt's)."""
        for staged in self.staged():
            storage.delete(staged)
        self.records.clear()

    def promote_files(self, storage: OutputStorage) -> None:
        """Moves this attempt's staged files to their final names: the job store recorded this attempt's result."""
        for staged, final in self.staged().items():
            storage.promote(staged, final)


def torch_thread_count(configured: int | None) -> int:
    """torch's CPU threads for this replica (Ray sets OMP_NUM_THREADS=1 in replicas with num_cpus <= 1, which
    would leave torch on one core). A positive number is taken as is; None: the CPUs this replica asked Ray
    for, rounded up; negative numbers count the machine's cores as joblib's n_jobs does: -1 every core,
    -2 every core but one (what the CPU-only local layout uses: the HTTP side and the job store need a core,
    or torch's threads stall at every operation whenever they run)."""
    if configured is not None and configured > 0:
        return configured
    if configured is not None and configured < 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return max(1, cores + 1 + configured)
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    return max(1, math.ceil(cpus))


class _Generator:
    """Shared body of the per-family deployments."""

    FAMILY = ""  # the model family this deployment serves
    DEFAULT_BATCHING = BatchingConfig()  # SD1.5's: 8 jobs, 8 x 512x512 pixels

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
        self._collected: dict[str, CollectedImages] = {}  # job id -> its finished images, until all are in
        self._lease_keeper: asyncio.Task | None = None
        self._holding: set[str] = set()  # jobs in generate(), from their arrival (model loading included)
        self._discarding: set[asyncio.Task] = set()
        logger.info("%s: torch threads %d, %s", self.replica_name, threads, self.batching)
        self._warm_up(options.get("warmup") or [])
        self._registering: asyncio.Task | None = None
        if self.engine.loaded_models():  # Serve runs the constructor on the replica's event loop
            self._registering = asyncio.get_running_loop().create_task(self._register(self.engine.loaded_models()))
        self._report()

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

    async def generate(self, job_id: str, kind: str, request: dict, more_coming: int = 0) -> dict:
        """Runs one job to its end (its images in batches, with compatible jobs) and records the outcome on
        the job; returns the result record. `more_coming`: how many more jobs the ingress was admitting when it
        sent this one (a burst): this one may wait up to `batch_wait_ms` for them to join its batch."""
        if self._lease_keeper is None or self._lease_keeper.done():
            self._lease_keeper = asyncio.create_task(self._keep_leases())
        self._holding.add(job_id)
        try:
            return await self._generate(job_id, kind, request, more_coming)
        finally:
            self._holding.discard(job_id)

    async def _generate(self, job_id: str, kind: str, request: dict, more_coming: int) -> dict:
        try:
            with self.batcher.expecting():  # batch-mates already waiting may wait for this job to join them
                parsed = Img2ImgRequest(**request) if kind == "img2img" else Txt2ImgRequest(**request)
                model_id = serve.get_multiplexed_model_id()
                outcome = "hit" if model_id in self.engine.loaded_models() else "miss"  # a miss waits for a load
                service_metrics().multiplex.inc(tags={"family": self.FAMILY, "outcome": outcome})
                loaded = await self._loaded_model(model_id)
                job = await asyncio.to_thread(self.engine.prepare, parsed, loaded.entry)
            job.job_id = job_id
            width, height = (job.hires.width, job.hires.height) if job.hires else (job.width, job.height)
            limit = max(1, self.batching.max_batch_pixels // (width * height))
            images = job.per_image(parsed.batch_size * parsed.n_iter)
            self._collected[job_id] = CollectedImages(len(images))
            token = uuid.uuid4().hex[:12]
            units = [((loaded.entry.name, image.batch_key()),
                      QueuedJob(job_id, parsed, image, loaded.entry.name, token)) for image in images]  # fmt: skip
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
        return outcomes[-1]

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
            self._settle(batch)
        if self._reported_models != self.engine.loaded_models():
            self._report()
        return [outcomes[queued.key] for queued in batch]

    def _settle(self, batch: list[QueuedJob]) -> None:
        """Counts the batch's images as settled; a job whose images have all settled is forgotten, its files
        discarded unless it was completed (it failed, or was cancelled, part-way)."""
        for queued in batch:
            collected = self._collected.get(queued.job_id)
            if collected is None:
                continue
            collected.settled += 1
            if collected.settled >= collected.count:
                del self._collected[queued.job_id]
                if not collected.recorded:
                    task = asyncio.get_running_loop().create_task(self._discard(queued.job_id, collected))
                    self._discarding.add(task)
                    task.add_done_callback(self._discarding.discard)

    async def _discard(self, job_id: str, collected: CollectedImages) -> None:
        """Deletes the staged files of a job this replica did not see completed, unless the job store has
        this very attempt's result after all (the store committed, its answer was lost): then they are moved
        to their final names. Another attempt's files are never touched."""
        try:
            job = await self.jobs.get(job_id)
            recorded = set(((job or {}).get("result") or {}).get("staged_paths") or [])
            if job is not None and job["state"] == "done" and recorded & set(collected.staged()):
                await asyncio.to_thread(collected.promote_files, self.storage)
            else:
                await asyncio.to_thread(collected.discard_files, self.storage)
        except Exception:
            logger.exception("discarding the files of job %s failed", job_id)

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
            return [self._save(queued, result) if isinstance(result, GenerationResult) else result
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
        return await self._record(batch, results)

    async def _record(
        self, batch: list[QueuedJob], results: list[dict | BaseException]
    ) -> dict[tuple[str, int], dict | BaseException]:
        """Records each job's outcome: its images are collected until all are in, then the job is done (one
        store transaction for every job the batch completes); a cancelled or failed image ends its job (the
        job's other images are discarded)."""
        outcomes: dict[tuple[str, int], dict | BaseException] = {}
        failures: dict[str, str] = {}
        seconds: dict[str, set[float]] = {}
        for queued, result in zip(batch, results, strict=True):
            if isinstance(result, dict):
                self._collected[queued.job_id].records[queued.job.image_index] = result
                seconds.setdefault(queued.job_id, set()).add(result["generation_time_sec"])
                outcomes[queued.key] = {"job_id": queued.job_id, "output_path": result["output_path"]}
            elif isinstance(result, JobCancelledError):
                logger.info("job %s cancelled", queued.job_id)
                outcomes[queued.key] = {"job_id": queued.job_id, "cancelled": True}
            else:
                failures.setdefault(queued.job_id, result.message if isinstance(result, DiffusionAPIError)
                                    else f"{type(result).__name__}: {result}")  # fmt: skip
                outcomes[queued.key] = result
        for job_id, times in seconds.items():
            self._collected[job_id].seconds += sum(times)  # one figure per diffusers call (OOM retries: several)
        finished = [
            job_id
            for job_id in dict.fromkeys(queued.job_id for queued in batch)
            if job_id not in failures and job_id in self._collected and self._collected[job_id].complete
        ]
        if finished:
            results_and_warnings = [self._collected[job_id].result() for job_id in finished]
            outcomes_to_record = [
                (job_id, result, warnings)
                for job_id, (result, warnings) in zip(finished, results_and_warnings, strict=True)
            ]
            completed = await self._complete(outcomes_to_record)
            for job_id, done in zip(finished, completed, strict=True):
                # Not done: cancelled at the very end, or completed by another attempt (its files stand).
                self._collected[job_id].recorded = done
                if done:
                    try:
                        await asyncio.to_thread(self._collected[job_id].promote_files, self.storage)
                    except DiffusionAPIError as error:  # the storage failed the rename: the staged file is named
                        logger.error("job %s: moving its images to their final names failed: %s", job_id,
                                     error.message)  # fmt: skip
        for job_id, message in failures.items():
            await self.jobs.fail(job_id, message)
        return outcomes

    async def _complete(self, outcomes: list[tuple[str, dict, list[str]]]) -> list[bool]:
        """Records finished jobs, retried through a store outage of about a minute: a transient error must not
        throw away images that are made. After the last retry, the jobs count as not completed here (their
        leases lapse and they are dispatched again, or they are failed by the stale reaper)."""
        for delay in (*COMPLETE_RETRY_DELAYS_S, None):
            try:
                return await self.jobs.complete_many(outcomes)
            except Exception:
                if delay is None:
                    logger.exception("recording jobs %s as done failed; giving up", [job[0] for job in outcomes])
                    return [False] * len(outcomes)
                logger.warning("recording jobs as done failed; retrying in %.1fs", delay, exc_info=True)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

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
            waiting = [job_id for job_id in dict.fromkeys([*batch_ids, *self._collected])
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

    def _save(self, queued: QueuedJob, result: GenerationResult) -> dict | BaseException:
        """Encodes one image with its infotext and writes it to the output storage (in the worker thread, off
        the event loop): the job's first image is `<job id>.<ext>`, the others `<job id>-<index>.<ext>`.
        Returns its record (the image's location, not its bytes: those stay out of the job database), with
        the warnings the run added. A job whose image cannot be written ends in error alone; its batch-mates
        keep theirs."""
        request = queued.request
        try:
            data = encode_image(result.image, request.file_type, result.infotext, request.jpeg_quality)
            staged, final = self.storage.stage(queued.job_id, queued.job.image_index, request.file_type, data,
                                               queued.token)  # fmt: skip
        except (OSError, StorageError) as error:
            logger.exception("job %s: writing its image failed", queued.job_id)
            return DiffusionAPIError(f"the image could not be written: {error}")
        return {
            "output_path": final,
            "staged_path": staged,
            "width": result.width,
            "height": result.height,
            "file_type": request.file_type,
            "jpeg_quality": request.jpeg_quality,
            "generation_time_sec": result.generation_time_sec,
            "memory_before_mb": result.memory_before_mb,
            "memory_after_mb": result.memory_after_mb,
            "seed": result.seed,
            "infotext": result.infotext,
            "batch_size": result.batch_size,
            "warnings": result.warnings,
        }

    async def _keep_leases(self) -> None:
        """Renews the leases of the jobs this replica holds (waiting in its batcher or running), so no ingress
        replica takes a job that is still being worked on for an abandoned one."""
        while True:
            await asyncio.sleep(LEASE_RENEW_S)
            try:
                await self.jobs.renew_leases(list(self._holding | set(self._collected)))
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


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=16)
class SD15Generator(_Generator):
    """SD 1.5 checkpoints. Batches of up to 8 images of 512x512 (2 MP): about 7 GB of activations in half
    precision with SDPA, next to 2 GB of weights."""

    FAMILY = "sd15"


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=8)
class SDXLGenerator(_Generator):
    """SDXL base checkpoints. Batches of up to 4 images of 1024x1024 (4 MP): the UNet's activations at
    128x128 latents are about 4x SD1.5's per image, next to 7 GB of weights."""

    FAMILY = "sdxl"
    DEFAULT_BATCHING = BatchingConfig(max_batch_size=4, max_batch_pixels=4 * 1024 * 1024)


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=8)
class Refiner(_Generator):
    """SDXL refiner checkpoints: img2img jobs on a refiner model, and the refiner's part of base -> refiner jobs
    (the SDXL generator hands over its latents at `refiner_switch_at`)."""

    FAMILY = "sdxl-refiner"
    DEFAULT_BATCHING = BatchingConfig(max_batch_size=4, max_batch_pixels=4 * 1024 * 1024)

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
