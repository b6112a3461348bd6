"""Handing jobs to the generator deployments from the store's fair queue, and keeping them handed until they end.

A submitted job waits in the job store's fair queue (deployments/job_queue.py); each ingress replica's feeder
takes the next jobs in fair order whenever a family's generators have room (woken by a submission here, a
dispatch ending here, or every FEED_INTERVAL_S for what other replicas freed) and dispatches them. A job this
replica queued is dispatched with the order it prepared; one another replica queued (or one queued again after
a restart) is prepared again from its stored request.

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

from deployments.job_records import ClaimedJob, JobOrder, Orphan
from deployments.job_status import JobFiles, payload_with_inputs
from pipelines.errors import DiffusionAPIError
from pipelines.schemas import JobState

logger = logging.getLogger("ray.serve")
RETRY_WARNING = "retried after a worker failure (its generator replica or node was lost)"
RECOVERY_WARNING = "dispatched again after the service restarted or the ingress replica that dispatched it was lost"
BACK_PRESSURE_WAIT_S = 1.0
FEED_INTERVAL_S = 0.5  # the feeder looks at the queue at least this often (room another replica freed)
HELD_SWEEP_S = 30.0  # how often orders held here for jobs another replica took are let go
RETURNED_IMAGES_KEEP_S = 60.0  # how long images a generator sent back wait for their caller to take them


class Dispatcher:
    """Runs each job's dispatch in a task of its own (`inflight`: job id -> task); `on_ended(job_id,
    callback_url)` runs when a dispatch is over, however the job ended (metrics, the webhook, waking the job's
    watchers), unless the replica is stopping (then the job's lease runs out and another replica takes it
    over).
    `prepare_again(job_id, kind, payload, maps)` prepares a recorded job that is dispatched again after a restart
    (`maps`: its ControlNet units' stored maps, name -> PNG bytes, so they are not made again)."""

    def __init__(self, jobs, handles: dict, files: JobFiles, max_attempts: int,
                 on_ended: Callable[[str, str | None], Awaitable[None]],
                 prepare_again: Callable[[str, str, dict, dict[str, bytes]], Awaitable[JobOrder]],
                 incoming: Callable[[], int] = lambda: 0):  # fmt: skip
        self.jobs = jobs
        self.handles = handles  # family -> the generator deployment's handle
        self.files = files
        self.max_attempts = max_attempts  # dispatches of a job whose worker is lost, the first included
        self.on_ended = on_ended
        self.prepare_again = prepare_again
        self.incoming = incoming  # submissions this replica has received and not yet queued (a burst)
        self.inflight: dict[str, asyncio.Task] = {}
        self.returned: dict[str, list[bytes]] = {}  # job id -> the images its generator sent back (take_images)
        self.held: dict[str, tuple[JobOrder, str | None]] = {}  # jobs queued here: their order, callback_url
        self._wake = asyncio.Event()
        self._named: set[str] | None = set()  # the families a wake named (None: look at every family)
        self._feeder: asyncio.Task | None = None
        self._calling_up: dict[str, asyncio.Task] = {}  # family -> a request waiting for its first replica
        self._last_sweep = 0.0

    def queue(self, order: JobOrder, family: str, callback_url: str | None = None) -> None:
        """A job recorded in `family`'s queue by this replica: its order (the images decoded once; the request's
        base64 is not kept) waits here for the feeder to take the job (or another replica's, which prepares it
        again)."""
        self.held[order.job_id] = (order, callback_url)
        self.wake(family)

    def start(self, order: JobOrder, family: str, model: str, callback_url: str | None = None) -> None:
        """Dispatches a job the store gave its generators at once, as it recorded it (`TakenAtOnce`)."""
        self._track(order.job_id, self._run(order, family, model, callback_url, self.incoming()))

    def wake(self, family: str | None = None) -> None:
        """Asks the feeder to look at `family`'s queue now (a job was queued, or room was freed), or at every
        family's (None)."""
        if family is None:
            self._named = None
        elif self._named is not None:
            self._named.add(family)
        self._wake.set()
        self.keep_feeding()

    def keep_feeding(self) -> None:
        """Starts the feeder if it is not running (the job keeper calls this: jobs may wait in the queue after a
        restart, or after their ingress replica was lost, with no submission here to wake it)."""
        if self._feeder is None or self._feeder.done():
            self._feeder = asyncio.create_task(self._feed_forever(), context=contextvars.Context())

    async def _feed_forever(self) -> None:
        loop = asyncio.get_running_loop()
        looked_at_all = loop.time()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), FEED_INTERVAL_S)
            self._wake.clear()
            families, self._named = self._named, set()
            if loop.time() - looked_at_all >= FEED_INTERVAL_S:  # whatever the wakes: room freed elsewhere
                families = None
            if families is None:
                looked_at_all = loop.time()
            try:
                await self.feed(families)
                if self.held and loop.time() - self._last_sweep >= HELD_SWEEP_S:
                    self._last_sweep = loop.time()
                    await self._let_go_of_taken()
            except Exception:
                logger.warning("the queue feeder failed; it looks again in %.1fs", FEED_INTERVAL_S, exc_info=True)
                await asyncio.sleep(FEED_INTERVAL_S)

    async def feed(self, families: set[str] | None = None) -> int:
        """Takes what the queue gives each of `families` (None: every family with waiting jobs) and dispatches
        it; returns how many jobs."""
        dispatched = 0
        for family in families if families is not None else await self.jobs.waiting_families():
            if family not in self.handles:  # a record of a family this service does not serve
                await self.jobs.fail_waiting(family, f"cannot dispatch it: unknown model family {family!r}")
                continue
            claimed = await self.jobs.claim_next(family)
            if claimed is None:  # no replica of the family is up (scaled to zero, or starting)
                self._call_up(family)
                continue
            for index, job in enumerate(claimed):
                more_coming = len(claimed) - index - 1 + self.incoming()  # its batch-mates on their way
                held = self.held.pop(job.job_id, None)
                if held is not None:
                    order, callback_url = held
                    self._track(job.job_id, self._run(order, family, job.payload.get("model", ""), callback_url,
                                                      more_coming))  # fmt: skip
                else:
                    self._track(job.job_id, self._prepare_and_run(job))
            dispatched += len(claimed)
        return dispatched

    def _call_up(self, family: str) -> None:
        """Sends one request to a family that has no replica up, so that Serve starts one (a request waiting at
        a handle is what scales a deployment up from zero); the jobs stay in the queue meanwhile."""
        calling = self._calling_up.get(family)
        if calling is None or calling.done():

            async def call() -> None:
                with contextlib.suppress(Exception):  # a failed call is sent again on the next look
                    await self.handles[family].ready.remote()
                self.wake(family)

            self._calling_up[family] = asyncio.create_task(call(), context=contextvars.Context())

    async def _let_go_of_taken(self) -> None:
        """Orders held here for jobs that are no longer waiting (another replica took them, or they ended)."""
        summaries = await self.jobs.summaries(list(self.held))
        for job_id in list(self.held):
            summary = summaries.get(job_id)
            if summary is None or summary.state != JobState.queued:
                self.held.pop(job_id, None)

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
        self.wake(family)  # its room is free
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

    async def queue_again(self, orphan: Orphan) -> None:
        """Puts a dispatched job nobody held any more back in the queue, as a new attempt (failed instead after
        its last one); whichever replica's feeder takes it prepares it again."""
        if orphan.job_id in self.inflight:  # still this replica's own (its lease lapsed while the store was away)
            return
        cause = "nobody held it any more (the service restarted, or its ingress replica was lost)"
        attempt = await self.jobs.retry(orphan.job_id, RECOVERY_WARNING, self.max_attempts, cause, True)
        if attempt is not None:
            logger.warning("job %s: %s; queued again for attempt %d", orphan.job_id, cause, attempt)
            self.held.pop(orphan.job_id, None)
            self.wake(orphan.family)

    async def _prepare_and_run(self, job: ClaimedJob) -> None:
        """Prepares a job this replica did not queue (or one queued again) from its stored request and inputs,
        then runs its dispatch; a job that cannot be prepared again ends in error saying why."""
        model, callback_url = job.payload.get("model", ""), job.payload.get("callback_url")
        try:
            order = await self._prepare_claimed(job)
        except DiffusionAPIError as error:
            await self.jobs.fail(job.job_id, f"cannot dispatch it: {error.message}"[:1000])
            self.wake(job.family)
            await self.on_ended(job.job_id, callback_url)
            return
        await self._run(order, job.family, model, callback_url, 0)

    async def _prepare_claimed(self, job: ClaimedJob) -> JobOrder:
        try:  # the input images are read back only for this (the order holds them decoded)
            payload = payload_with_inputs(job.payload, await asyncio.to_thread(self.files.read_inputs, job.inputs))
        except DiffusionAPIError as error:  # an input image gone from the storage, or the storage unreachable
            raise DiffusionAPIError(f"its input image could not be read: {error.message}") from error
        maps = await asyncio.to_thread(self.files.read_maps, job.inputs)  # the depth annotator's run at submission
        try:
            return await self.prepare_again(job.job_id, job.kind, payload, maps)
        except DiffusionAPIError:  # uninstalled since (a LoRA, the model)
            raise
        except Exception as error:  # a request of an older version that no longer validates
            raise DiffusionAPIError(f"{type(error).__name__}: {error}") from error
