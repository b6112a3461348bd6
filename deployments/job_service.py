"""The job service: a job's whole life, as both HTTP doors (native and A1111) use it.

Submit (admission: everything that can be checked without a model, then the record, then the dispatch), status,
wait until ended, events, cancel, the image files, the service-wide default model, and the background keeper.
Plain Python: it raises domain errors (pipelines/errors.py) and never builds an HTTP response, so the routers
stay thin and the logic is testable without FastAPI (and, given a fake handle, without Ray).
"""

import asyncio
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from pydantic import BaseModel

from deployments.admission import (
    batch_key_text,
    capped_priority,
    make_cursor,
    read_cursor,
    refusal_error,
    request_fingerprint,
)
from deployments.dispatch import Dispatcher
from deployments.image_links import LINK_SECRET_SETTING
from deployments.job_client import JobsClient
from deployments.job_queue import QueueView
from deployments.job_records import (
    NO_LIMITS,
    ActiveJob,
    JobListing,
    JobOrder,
    JobRecord,
    JobSummary,
    KeyLimits,
    PriorSubmission,
    Refusal,
    TakenAtOnce,
    image_fields,
)
from deployments.job_status import JobFiles, input_field, input_images, without_inputs
from deployments.jobs import IDEMPOTENCY_TTL_S
from deployments.keeper import JobKeeper, WebhookDeliveries
from deployments.keys import Caller
from deployments.metrics import service_metrics
from deployments.watch import KEEPALIVE_S, JobWatcher, change_key
from deployments.webhooks import WebhookLookupUnavailable, WebhookPolicy, WebhookTargetError
from pipelines.catalog import ModelCatalog, ModelEntry, check_mode_supported
from pipelines.control_plan import map_files
from pipelines.controlnets import ControlNetLibrary
from pipelines.embeddings import EmbeddingLibrary
from pipelines.errors import (
    ForbiddenError,
    IdempotencyKeyReusedError,
    InvalidRequestError,
    JobEndedError,
    TemporarilyUnavailableError,
    UnknownJobError,
    UnknownModelError,
)
from pipelines.images import decode_base64_bytes, encode_base64
from pipelines.loras import LoraLibrary
from pipelines.prepare import PreparedJob, prepare_job, unsent_family_defaults
from pipelines.schemas import Img2ImgRequest, JobState, Txt2ImgRequest
from pipelines.settings import Settings
from pipelines.upscalers import UpscalerLibrary
from pipelines.vaes import VaeLibrary

logger = logging.getLogger("ray.serve")
DEFAULT_MODEL_SETTING = "sd_model_checkpoint"
DECODE_SLOTS = 2  # input images decoded at once per ingress replica (each up to max_input_image_pixels)
QUEUE_VIEW_TTL_S = 0.25  # how stale a status's queue_position may be
WAITING_FOR_REPLICA = "waiting_for_replica"  # the phase of a queued job whose family has no replica up (yet)
GenerationRequest = Txt2ImgRequest | Img2ImgRequest


@dataclass
class Libraries:
    """What is installed (checkpoints, LoRAs, upscalers, VAEs, embeddings), read from the folders on each use."""

    catalog: ModelCatalog
    loras: LoraLibrary
    upscalers: UpscalerLibrary  # names only here: the Upscaler deployment runs them
    vaes: VaeLibrary  # names and hashes: the generators load them
    embeddings: EmbeddingLibrary
    controlnets: ControlNetLibrary  # names, families and hashes: the generators load them

    @classmethod
    def from_settings(cls, settings: Settings) -> "Libraries":
        catalog = ModelCatalog(settings)
        return cls(catalog, LoraLibrary(settings, catalog.facts), UpscalerLibrary(settings),
                   VaeLibrary(settings, catalog.facts), EmbeddingLibrary(settings, catalog.facts),
                   ControlNetLibrary(settings, catalog.facts))  # fmt: skip


@dataclass(frozen=True)
class Event:
    """One thing a job's event stream tells: `progress`, `preview`, or its end state with the final status;
    `keepalive` when nothing happened for KEEPALIVE_S."""

    name: str
    data: dict | None = None


class _Replayed(Exception):
    """Inside `submit_once`: the store found the key's earlier submission as this one was recorded."""

    def __init__(self, prior: PriorSubmission):
        super().__init__(prior.job_id)
        self.prior = prior


def _input_files(request: GenerationRequest) -> dict[str, bytes]:
    """The input images' files (img2img's, ControlNet units'), base64 decoded once: preparing reads them, the
    storage keeps them."""
    return {name: decode_base64_bytes(text, input_field(name)) for name, text in input_images(request).items()}


class JobService:
    def __init__(self, jobs: JobsClient, libraries: Libraries, files: JobFiles, handles: dict,
                 webhooks: WebhookPolicy, max_queued_jobs: int, max_attempts: int,
                 stale_job_timeout_s: float, incoming: Callable[[], int] = lambda: 0):  # fmt: skip
        self.jobs = jobs
        self.libraries = libraries
        self.files = files
        self.webhooks = webhooks
        self.max_queued_jobs = max_queued_jobs
        self.watcher = JobWatcher(jobs)  # wakes long polls and event streams when their job changes
        self.dispatcher = Dispatcher(jobs, handles, files, max_attempts, on_ended=self._ended,
                                     prepare_again=self._prepare_again, incoming=incoming)  # fmt: skip
        self.deliveries = WebhookDeliveries(jobs, webhooks, self._final_status)
        self.keeper = JobKeeper(jobs, self.dispatcher, self.deliveries, stale_job_timeout_s)
        self.decodes = asyncio.Semaphore(DECODE_SLOTS)  # bounds the memory and CPU that decoding inputs takes
        self._queue_views: dict[str, tuple[float, QueueView]] = {}  # family -> (read at, its fair queue)
        self._link_secret: bytes | None = None

    # Submission --------------------------------------------------------------------------------------------
    async def submit(self, kind: str, request: GenerationRequest, owner: str, origin: str = "",
                     warnings: list[str] | None = None, hand_over: Callable[[], int] | None = None,
                     return_images: bool = False, idempotency: tuple[str, str] | None = None,
                     limits: KeyLimits = NO_LIMITS) -> str:  # fmt: skip
        """Checks and records a job in the fair queue, from which it is dispatched when its turn comes; its id
        once it is recorded as queued (`idempotency`: see `submit_once`; _Replayed when that key already names
        a job). A 4xx-kind domain error for anything wrong with it (before any record exists);
        LimitReachedError (429) when the owner's `limits` or its family's queue are full.
        `hand_over()`, called as the job is queued, stops counting it among the submissions on their way.
        `return_images`: the caller will wait for the images (`images_of`): the generator sends them back."""
        self.keeper.start()
        images = request.batch_size * request.n_iter
        if limits.max_queued_images is not None and images > limits.max_queued_images:  # would never pass
            raise InvalidRequestError(f"batch_size x n_iter: this job makes {images} images and this API key may have "
                                      f"at most {limits.max_queued_images} queued (max_queued_images)",
                                      field="batch_size")  # fmt: skip
        if request.callback_url is not None:
            await self._check_callback(request.callback_url)
        default_model = await self.default_model() if not (request.model or "").strip() else None
        input_files: dict[str, bytes] = {}
        if input_images(request):  # its images are decoded (once): a bounded number at a time per replica
            async with self.decodes:
                input_files = await asyncio.to_thread(_input_files, request)
                entry, job = await asyncio.to_thread(self._check, kind, request, default_model, input_files)
        else:
            entry, job = await asyncio.to_thread(self._check, kind, request, default_model)
        if job.controls:  # the maps the ControlNets see, stored with the inputs; the job keeps only its own
            input_files.update(await asyncio.to_thread(map_files, job.controls))
        payload = request.stored_payload()
        payload.update(unsent_family_defaults(request, entry.family))  # as prepared: FLUX.1's cfg_scale 1, ...
        payload["model"] = entry.name
        payload["seed"] = job.seed  # a random seed is fixed now, so a retried job makes the same image
        job_id = uuid.uuid4().hex
        priority, priority_warnings = capped_priority(request, limits)
        payload["priority"] = priority
        warnings = job.sampler.warnings + job.warnings + (warnings or []) + priority_warnings
        record, inputs = payload, {}
        if input_files:  # the input images are stored once, by reference: never in the record
            record = without_inputs(payload)
            inputs = await asyncio.to_thread(self.files.store_inputs, job_id, input_files)
        try:
            created = await self.jobs.create(job_id, kind, record, warnings, entry.family, self.max_queued_jobs,
                                             origin, owner, inputs, idempotency, images,
                                             priority, batch_key_text(entry.name, job), limits,
                                             take_at_once=True)  # fmt: skip
        except BaseException:
            await asyncio.to_thread(self.files.delete_inputs, inputs)
            raise
        if isinstance(created, PriorSubmission):  # a concurrent submission with the same key was first
            await asyncio.to_thread(self.files.delete_inputs, inputs)
            raise _Replayed(created)
        if isinstance(created, Refusal):
            await asyncio.to_thread(self.files.delete_inputs, inputs)
            raise refusal_error(created, entry.family)
        if hand_over is not None:
            hand_over()
        order = JobOrder.of(job_id, job, request, return_images)
        if isinstance(created, TakenAtOnce):  # nobody waited ahead of it and its generators had room
            self.dispatcher.start(order, entry.family, entry.name, request.callback_url)
        else:
            self.dispatcher.queue(order, entry.family, request.callback_url)
        return job_id

    async def decoding(self, work: Callable, *args):
        """`work(*args)` (decoding input images) in a worker thread, within this replica's decode slots: a burst
        of large uploads takes a bounded share of its memory and CPU."""
        async with self.decodes:
            return await asyncio.to_thread(work, *args)

    async def submit_once(self, idempotency_key: str | None, sent: BaseModel, kind: str, request: GenerationRequest,
                          owner: str, origin: str = "", **options) -> tuple[str, bool]:  # fmt: skip
        """`submit`, safe to retry: the owner's first submission with `idempotency_key` in IDEMPOTENCY_TTL_S
        makes a job; a later one with the same request (`sent`: the door's request as the client sent it) gets
        that job again, whatever its state, without a second one. Returns (job id, replayed); without a key,
        a plain `submit`. The key with another request is IdempotencyKeyReusedError (422)."""
        if idempotency_key is None:
            return await self.submit(kind, request, owner, origin, **options), False
        fingerprint = await asyncio.to_thread(request_fingerprint, origin, kind, sent)  # an image may be megabytes
        prior = await self.jobs.prior_submission(owner, idempotency_key)
        if prior is None:
            try:
                job_id = await self.submit(kind, request, owner, origin, idempotency=(idempotency_key, fingerprint),
                                           **options)  # fmt: skip
                return job_id, False
            except _Replayed as replayed:
                prior = replayed.prior
        if prior.request_hash != fingerprint:
            raise IdempotencyKeyReusedError(
                f"Idempotency-Key {idempotency_key!r} was used for another request within the last "
                f"{IDEMPOTENCY_TTL_S / 3600:g} h (job {prior.job_id}); send a new key with a new request",
                field="Idempotency-Key",
            )
        return prior.job_id, True

    async def _check_callback(self, url: str) -> None:
        try:
            await self.webhooks.check_async(url)
        except WebhookTargetError as error:
            raise InvalidRequestError(f"callback_url: {error}", field="callback_url") from None
        except WebhookLookupUnavailable as error:
            raise TemporarilyUnavailableError(f"callback_url: {error}; retry in a few seconds") from None

    def _check(self, kind: str, request: GenerationRequest, default_model: str | None,
               input_files: dict[str, bytes] | None = None) -> tuple[ModelEntry, PreparedJob]:  # fmt: skip
        """Everything that can be checked before a job exists (in a worker thread: it reads files): the model
        (absent: the service-wide default), the mode, sampler, image, LoRAs (unknown: 4xx; incompatible: a
        warning), hires fix and refiner."""
        found = self.libraries
        entry = found.catalog.resolve(request.model or default_model)
        check_mode_supported(entry, kind)
        return entry, prepare_job(request, entry, found.loras, found.catalog, found.upscalers, found.vaes,
                                  found.embeddings, input_files, found.controlnets)  # fmt: skip

    async def _prepare_again(self, job_id: str, kind: str, payload: dict, maps: dict[str, bytes]) -> JobOrder:
        """The order of a recorded job dispatched again (after a restart or a lost ingress replica), prepared
        from its stored request and inputs as at submission, with the seed fixed then, and its ControlNet units'
        maps as made then (`maps`: none is made again, so a depth unit needs no Upscaler now)."""
        request = Img2ImgRequest(**payload) if kind == "img2img" else Txt2ImgRequest(**payload)
        async with self.decodes:
            _, job = await asyncio.to_thread(self._check, kind, request, payload.get("model"), maps)
        return JobOrder.of(job_id, job, request)

    async def _ended(self, job_id: str, callback_url: str | None) -> None:
        """A dispatch of this replica's is over: the job has ended (or was taken over). Its watchers are woken
        now, its outcome counted (by the replica that ran its last dispatch: each job once), its webhook sent."""
        self.watcher.poke(job_id)
        try:
            job = await self.jobs.get(job_id)
            if job is not None and job.ended:
                tags = {"family": job.family, "state": job.state.value}
                service_metrics().jobs_finished.inc(tags=tags)
                service_metrics().job_seconds.observe(max(0.0, job.updated - job.created), tags=tags)
        except Exception:  # metrics never fail a job
            logger.warning("recording the metrics of job %s failed", job_id, exc_info=True)
        if callback_url:
            self.deliveries.start(job_id, callback_url, claimed=False)

    # Reading jobs ------------------------------------------------------------------------------------------
    async def job(self, job_id: str, caller: Caller) -> JobRecord:
        """The job's record if the caller may see it (its owner, an admin, anyone with keys off); a job of another
        key is UnknownJobError exactly as an unknown one, so its id is not confirmed to exist."""
        job = await self.jobs.get(job_id)
        if job is None or not caller.may_see(job.owner):
            raise UnknownJobError(f"unknown job_id {job_id!r}")
        return job

    async def status(self, job_id: str, caller: Caller, wait_s: float = 0, with_inputs: bool = False) -> dict:
        """The status fields; `wait_s`: a long poll, answered as soon as the state, phase or progress changes."""
        self.keeper.start()
        job = await self.job(job_id, caller)
        if wait_s > 0 and not job.ended:
            async with self.watcher.watching(job_id):
                if await self.watcher.next_change(job_id, job.summary(), wait_s) is not None:
                    job = await self.jobs.get(job_id) or job
        fields = await self.files.status(job, with_images=True, with_inputs=with_inputs)
        if job.state == JobState.queued:
            fields.update(await self._queue_fields(job))
        return fields

    async def _queue_fields(self, job: JobRecord) -> dict:
        """A queued job's place in its family's fair queue and its expected wait (the queue read at most every
        QUEUE_VIEW_TTL_S per family on this replica: many clients poll queued jobs)."""
        now = time.monotonic()
        read_at, view = self._queue_views.get(job.family, (0.0, None))
        if view is None or now - read_at > QUEUE_VIEW_TTL_S:
            view = await self.jobs.queue_view(job.family)
            self._queue_views[job.family] = (now, view)
        place = view.place(job.job_id)
        fields = {"queue_position": place.position, "eta_s": place.eta_s(job.images)}
        if job.dispatched is None and place.slots == 0:
            fields["current_phase"] = WAITING_FOR_REPLICA
        return fields

    async def wait_until_ended(self, job_id: str) -> JobRecord | None:
        """The job's record once it has ended (None if it has gone: pruned). This replica's own dispatch usually
        ends it; otherwise (another replica finishes it, or the stale reaper) its watchers hear of the end. A job
        store that stops answering is retried for a minute before the error is raised (the job goes on)."""
        await self.dispatcher.wait(job_id)
        unanswered = 0
        async with self.watcher.watching(job_id):
            while True:
                try:
                    job = await self.jobs.get(job_id)
                    unanswered = 0
                except Exception:
                    unanswered += 1
                    if unanswered > 60:
                        raise
                    logger.warning("job store did not answer for job %s; retrying", job_id, exc_info=True)
                    await asyncio.sleep(1.0)
                    continue
                if job is None or job.ended:
                    return job
                await self.watcher.next_change(job_id, job.summary(), KEEPALIVE_S)

    async def events(self, job: JobRecord) -> AsyncIterator[Event]:
        """A visible job's progress as it happens (see `job` for the check), then its end with the final status
        (no image bytes). One watch loop per replica wakes every stream of a job when the job changes."""
        loop = asyncio.get_running_loop()
        previews = bool(job.payload.get("preview"))
        job_id = job.job_id
        async with self.watcher.watching(job_id):
            summary: JobSummary = job.summary()
            sent: JobSummary | None = None
            first_seen = (loop.time(), summary.progress)
            while not summary.state.ended:
                if change_key(summary) != change_key(sent):
                    elapsed, gained = loop.time() - first_seen[0], summary.progress - first_seen[1]
                    eta = round(elapsed * (100.0 - summary.progress) / gained, 1) if gained > 0 else None
                    yield Event("progress", {"job_id": job_id, **summary.fields(), "eta_s": eta})
                if previews and summary.preview and summary.preview != (sent.preview if sent else None):
                    yield Event("preview", {"job_id": job_id, "progress": summary.progress, "image": summary.preview})
                sent, changed = summary, None
                while changed is None:
                    changed = await self.watcher.next_change(job_id, summary, KEEPALIVE_S, with_preview=previews)
                    if changed is None:
                        yield Event("keepalive")
                summary = changed
        final = await self.jobs.get(job_id) or job
        yield Event(final.state.value, await self.files.status(final, with_images=False))

    async def _final_status(self, job_id: str) -> dict | None:
        job = await self.jobs.get(job_id)
        if job is None or not job.ended:
            return None
        return await self.files.status(job, with_images=False)

    async def image(self, job_id: str, caller: Caller, index: int) -> tuple[bytes, str]:
        """One image file of a visible job and its file type (see JobFiles.image for the errors)."""
        return await self.files.image(await self.job(job_id, caller), index)

    async def linked_image(self, job_id: str, index: int) -> tuple[bytes, str]:
        """One image file of a job, for a signed link (the link is the access: no caller is checked here)."""
        job = await self.jobs.get(job_id)
        if job is None:
            raise UnknownJobError(f"unknown job_id {job_id!r} (pruned?)")
        return await self.files.image(job, index)

    async def link_secret(self, configured: str | None) -> bytes:
        """The secret that signs image links: `configured` (the app argument), else the one every replica shares
        in the job store, made by the first replica that needs it."""
        if configured:
            return configured.encode()
        if self._link_secret is None:
            self._link_secret = (await self.jobs.setting_or(LINK_SECRET_SETTING, secrets.token_hex(32))).encode()
        return self._link_secret

    async def control_maps(self, job: JobRecord) -> list[str | None]:
        """The job's ControlNet units' maps (PNG, base64) as the ControlNets saw them, in unit order."""
        return await asyncio.to_thread(self.files.control_maps, job)

    async def images_of(self, job: JobRecord) -> tuple[dict, list[str]]:
        """A finished job's result with its images' bytes (base64), and a warning for each one missing. The
        images its generator sent back to this replica are used as they came; others are read from the storage."""
        returned = self.dispatcher.take_images(job.job_id)
        if returned is not None and job.state == JobState.done and job.result:
            result = image_fields(job.result)
            if len(returned) == len(result.get("output_paths") or []):
                result["images"] = [encode_base64(data) for data in returned]
                result["image"] = result["images"][0]
                return result, []
        return await self.files.with_image_bytes(job.result or {})

    # Changing jobs -----------------------------------------------------------------------------------------
    async def cancel(self, job_id: str, caller: Caller) -> None:
        """Cancels a visible job: a queued one never starts, a running one stops at its next step;
        JobEndedError when it has already ended."""
        await self.job(job_id, caller)
        if not await self.jobs.cancel(job_id):
            job = await self.jobs.get(job_id)
            state = job.state.value if job else "pruned"
            raise JobEndedError(f"job {job_id} has already ended (state {state!r}); nothing to cancel")

    async def list_jobs(self, caller: Caller, state: JobState | None, limit: int, cursor: str | None,
                        key: str | None) -> tuple[list[JobListing], str | None]:  # fmt: skip
        """The caller's jobs newest first (an admin's, or anyone's with keys off: every key's, or `key`'s only),
        a page of `limit` after `cursor`; returns them and the next page's cursor (None: no more)."""
        if key is not None and caller.keys_on and not caller.admin and key != caller.owner:
            raise ForbiddenError("only an admin key may list another API key's jobs (leave out 'key')")
        owner = key if key is not None else (None if caller.admin or not caller.keys_on else caller.owner)
        jobs = await self.jobs.list_jobs(owner, state.value if state else None, limit + 1, read_cursor(cursor))
        more = len(jobs) > limit
        jobs = jobs[:limit]
        return jobs, (make_cursor(jobs[-1]) if more else None)

    async def active_jobs(self, origin: str, caller: Caller) -> list[ActiveJob]:
        """The caller's queued and running jobs of one door (with keys off: everyone's), oldest first."""
        return await self.jobs.active_jobs(origin, caller.owner if caller.keys_on else None)

    async def cancel_active(self, origin: str, caller: Caller) -> int:
        """Cancels the caller's active jobs of one door (never another door's, never another key's)."""
        jobs = await self.active_jobs(origin, caller)
        for job in jobs:
            await self.jobs.cancel(job.job_id)
        return len(jobs)

    # The default model -------------------------------------------------------------------------------------
    async def default_model(self) -> str | None:
        """The service-wide default model (kept in the job store, so every ingress replica shares it and it
        survives restarts); None when never set or no longer installed."""
        name = await self.jobs.get_setting(DEFAULT_MODEL_SETTING)
        if name is None:
            return None
        try:
            return (await asyncio.to_thread(self.libraries.catalog.resolve, name)).name
        except UnknownModelError:
            return None

    async def set_default_model(self, wanted: str, field: str) -> None:
        entry = await asyncio.to_thread(self.libraries.catalog.resolve, wanted, field)
        await self.jobs.set_setting(DEFAULT_MODEL_SETTING, entry.name)

    # The service's figures ---------------------------------------------------------------------------------
    async def counts(self) -> dict[str, int]:
        return await self.jobs.counts()

    async def usage(self) -> list[tuple[str, str, str, int, int]]:
        return await self.jobs.usage()

    async def replica_reports(self) -> list[dict]:
        return await self.jobs.replica_reports()
