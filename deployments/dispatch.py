"""Handing jobs to the generator deployments, and keeping them handed until they end.

A job is dispatched detached from the HTTP request that created it (a client that disconnects does not cancel
it). Its generator replica or node may die with it: then it is dispatched again (Serve routes it to a live or
replacement replica), up to `max_attempts` in all; jobs are deterministic (the seed is fixed at submission), so
a retry makes the image the first attempt would have made, under the same name. Any other failure ends the job
in `error`. No Ray types leak past this module except the handles it is given, so it is testable with a fake
handle and a real store.
"""

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Awaitable, Callable

import grpc
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError

from deployments.job_records import JobOrder, Orphan
from deployments.job_status import JobFiles
from pipelines.errors import DiffusionAPIError

logger = logging.getLogger("ray.serve")
RETRY_WARNING = "retried after a worker failure (its generator replica or node was lost)"
RECOVERY_WARNING = "dispatched again after the service restarted or the ingress replica that dispatched it was lost"
BACK_PRESSURE_WAIT_S = 1.0
RETURNED_IMAGES_KEEP_S = 60.0  # how long images a generator sent back wait for their caller to take them


class Dispatcher:
    """Runs each job's dispatch in a task of its own (`inflight`: job id -> task); `on_ended(job_id,
    callback_url)` runs when a dispatch is over, however the job ended (metrics, the webhook, waking the job's
    watchers), unless the replica is stopping (then the job's lease runs out and another replica takes it
    over).
    `prepare_again(job_id, kind, payload)` prepares a recorded job that is dispatched again after a restart."""

    def __init__(self, jobs, handles: dict, files: JobFiles, max_attempts: int,
                 on_ended: Callable[[str, str | None], Awaitable[None]],
                 prepare_again: Callable[[str, str, dict], Awaitable[JobOrder]]):  # fmt: skip
        self.jobs = jobs
        self.handles = handles  # family -> the generator deployment's handle
        self.files = files
        self.max_attempts = max_attempts  # dispatches of a job whose worker is lost, the first included
        self.on_ended = on_ended
        self.prepare_again = prepare_again
        self.inflight: dict[str, asyncio.Task] = {}
        self.returned: dict[str, list[bytes]] = {}  # job id -> the images its generator sent back (take_images)

    def start(self, order: JobOrder, family: str, model: str, callback_url: str | None = None,
              more_coming: int = 0) -> None:  # fmt: skip
        """Dispatches a recorded job to `family`'s generators for `model` in a task of its own (it keeps the order
        for retries, not the request: the order's images are decoded once, the request's base64 is not kept).
        `more_coming`: submissions this replica has received and not yet handed over (a burst: the generator may
        hold this job a moment for them to join its batch)."""
        self._track(order.job_id, self._run(order, family, model, callback_url, more_coming))

    def _track(self, job_id: str, work) -> None:
        # A fresh context detaches the work from this HTTP request: a client disconnect must not cancel it.
        task = asyncio.create_task(work, context=contextvars.Context())
        self.inflight[job_id] = task
        task.add_done_callback(lambda _: self.inflight.pop(job_id) if self.inflight.get(job_id) is task else None)

    def take_images(self, job_id: str) -> list[bytes] | None:
        """The encoded images the job's generator sent back with its answer (an order with `return_images`),
        once; None when there are none here (another replica ran its last dispatch, or they have expired)."""
        return self.returned.pop(job_id, None)

    async def wait(self, job_id: str) -> None:
        """Until this replica's dispatch of the job is over (at once if it has none); shielded, so a caller that
        goes away does not cancel the job."""
        task = self.inflight.get(job_id)
        if task is not None:
            with contextlib.suppress(Exception):  # a failure is recorded on the job by the task
                await asyncio.shield(task)

    async def _run(self, order: JobOrder, family: str, model: str, callback_url: str | None,
                   more_coming: int) -> None:  # fmt: skip
        handle = self.handles[family].options(multiplexed_model_id=model)
        await self._dispatch(order, handle, more_coming)  # raises only when it is cancelled
        await self.on_ended(order.job_id, callback_url)

    async def _dispatch(self, order: JobOrder, handle, more_coming: int) -> None:
        job_id = order.job_id
        try:
            while True:
                try:
                    answer = await handle.generate.remote(order, more_coming)
                    if order.return_images and answer.get("images"):
                        self.returned[job_id] = answer["images"]
                        asyncio.get_running_loop().call_later(RETURNED_IMAGES_KEEP_S, self.returned.pop, job_id, None)
                    return
                except BackPressureError:
                    # Serve's own queue limit (max_queued_requests) is full: the job stays queued and waits.
                    await asyncio.sleep(BACK_PRESSURE_WAIT_S)
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

    async def dispatch_again(self, orphan: Orphan) -> None:
        """Dispatches a job nobody held any more, as a new attempt (failed instead after its last one)."""
        if orphan.job_id in self.inflight:  # still this replica's own (its lease lapsed while the store was away)
            return
        cause = "nobody held it any more (the service restarted, or its ingress replica was lost)"
        attempt = await self.jobs.retry(orphan.job_id, RECOVERY_WARNING, self.max_attempts, cause)
        if attempt is None:
            return
        if orphan.family not in self.handles:
            await self.jobs.fail(orphan.job_id, f"cannot dispatch it again: unknown model family {orphan.family!r}")
            return
        logger.warning("job %s: %s; dispatching attempt %d", orphan.job_id, cause, attempt)
        # Its own task from here (in `inflight`, so this replica renews its lease while it is prepared): the
        # keeper goes on with the other orphans and its lease renewals meanwhile.
        self._track(orphan.job_id, self._recover(orphan))

    async def _recover(self, orphan: Orphan) -> None:
        """Prepares a claimed orphan again from its stored request and inputs, then runs its dispatch; a job that
        cannot be prepared again ends in error saying why."""
        model, callback_url = orphan.payload.get("model", ""), orphan.payload.get("callback_url")
        try:
            order = await self._prepare_orphan(orphan)
        except DiffusionAPIError as error:
            await self.jobs.fail(orphan.job_id, f"cannot dispatch it again: {error.message}"[:1000])
            await self.on_ended(orphan.job_id, callback_url)
            return
        await self._run(order, orphan.family, model, callback_url, 0)

    async def _prepare_orphan(self, orphan: Orphan) -> JobOrder:
        try:  # the input images are read back only for this (the order holds them decoded)
            payload = {**orphan.payload, **await asyncio.to_thread(self.files.read_inputs, orphan.inputs)}
        except DiffusionAPIError as error:  # an input image gone from the storage, or the storage unreachable
            raise DiffusionAPIError(f"its input image could not be read: {error.message}") from error
        try:
            return await self.prepare_again(orphan.job_id, orphan.kind, payload)
        except DiffusionAPIError:  # uninstalled since (a LoRA, the model)
            raise
        except Exception as error:  # a request of an older version that no longer validates
            raise DiffusionAPIError(f"{type(error).__name__}: {error}") from error
