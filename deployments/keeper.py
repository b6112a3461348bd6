"""The background work of an ingress replica: the job keeper and the webhook deliveries.

Every LEASE_RENEW_S the keeper renews the leases of the jobs and deliveries this replica holds; claims the jobs
nobody holds any more (after a crash of the service, or of the ingress replica that dispatched them) and
puts them back in the fair queue; now and then fails jobs that are held but have stopped progressing for
`stale_job_timeout_s` (jobs this replica still waits on get a heartbeat first, so a long queue is not mistaken
for a stuck worker); delivers webhooks whose delivery nobody holds; runs retention when it is due (one replica
per interval, in a task of its own); and sets the queue-depth gauge.
"""

import asyncio
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable

from deployments.dispatch import Dispatcher
from deployments.job_client import JobsClient
from deployments.jobs import LEASE_RENEW_S, PRUNE_BATCH
from deployments.metrics import FAMILIES, service_metrics
from deployments.webhooks import WebhookPolicy
from pipelines.schemas import JobState

logger = logging.getLogger("ray.serve")


class WebhookDeliveries:
    """POSTs an ended job's final status (the final event's fields: no image bytes) to its callback_url, with
    retries, and records the outcome on the job. A delivery is claimed first, so one replica delivers it; one
    whose replica is lost midway is claimed again by another replica's keeper once its lease runs out."""

    def __init__(self, jobs: JobsClient, policy: WebhookPolicy, final_status: Callable[[str], Awaitable[dict | None]]):
        self.jobs = jobs
        self.policy = policy
        self.final_status = final_status  # job id -> its final status fields (None: not ended, or gone)
        self.held: dict[str, asyncio.Task] = {}  # job id -> its delivery under way here

    def start(self, job_id: str, url: str, claimed: bool) -> None:
        if job_id in self.held:
            return
        delivery = asyncio.create_task(self._deliver(job_id, url, claimed), context=contextvars.Context())
        self.held[job_id] = delivery
        delivery.add_done_callback(lambda _: self.held.pop(job_id, None))

    async def _deliver(self, job_id: str, url: str, claimed: bool) -> None:
        try:
            if not claimed and not await self.jobs.claim_delivery(job_id):
                return
            status = await self.final_status(job_id)
            if status is None:
                return
            await self.jobs.record_webhook(job_id, {"attempts": 0, "status": "delivering"})
            outcome = await self.policy.deliver(url, job_id, status)
            await self.jobs.record_webhook(job_id, outcome)
            service_metrics().webhooks.inc(tags={"status": outcome["status"]})
        except asyncio.CancelledError:
            raise  # the replica is stopping: the delivery's lease runs out and another replica takes it over
        except Exception:
            logger.exception("job %s: delivering its webhook failed here; another attempt follows its lease", job_id)


class JobKeeper:
    def __init__(self, jobs: JobsClient, dispatcher: Dispatcher, deliveries: WebhookDeliveries,
                 stale_job_timeout_s: float):  # fmt: skip
        self.jobs = jobs
        self.dispatcher = dispatcher
        self.deliveries = deliveries
        self.stale_job_timeout_s = stale_job_timeout_s
        self._task: asyncio.Task | None = None
        self._retention: asyncio.Task | None = None

    def start(self) -> None:
        """Starts the keeper if it is not running (from every request and Serve's health checks, so a fresh
        replica takes up the jobs a crash left without waiting for a request)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._keep_forever(), context=contextvars.Context())
        self.dispatcher.keep_feeding()  # jobs waiting in the queue need no submission here to be taken

    async def _keep_forever(self) -> None:
        last_reaped = time.monotonic()
        while True:
            await asyncio.sleep(LEASE_RENEW_S)
            try:
                inflight = list(self.dispatcher.inflight)
                await self.jobs.renew_leases(inflight)
                await self.jobs.renew_deliveries(list(self.deliveries.held))
                if time.monotonic() - last_reaped >= min(30.0, self.stale_job_timeout_s / 3):
                    last_reaped = time.monotonic()
                    await self.jobs.touch_queued(inflight)
                    await self.jobs.reap_stale(self.stale_job_timeout_s)
                for orphan in await self.jobs.claim_orphans():
                    await self.dispatcher.queue_again(orphan)
                for delivery in await self.jobs.claim_lapsed_deliveries():  # ended otherwise, or holder lost
                    self.deliveries.start(delivery.job_id, delivery.callback_url, claimed=True)
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
        active = (JobState.queued, JobState.processing)
        counts = {(family, state): count for family, state, count in await self.jobs.counts_by_family()
                  if state in active}  # fmt: skip
        for family in FAMILIES:
            for state in active:
                tags = {"family": family, "state": state.value}
                service_metrics().queue_depth.set(counts.get((family, state.value), 0), tags=tags)
