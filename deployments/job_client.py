"""Reaching the job store from the replicas: `JobsClient` (straight to the database where it can, else through
the named job actor) and the actor itself. The store's logic is deployments/jobs.py."""

import asyncio
import hashlib
import logging
import sqlite3
from pathlib import Path

import ray

from deployments.job_changes import PostgresListener
from deployments.job_db import database_errors, describe, is_postgres_url
from deployments.job_queue import QueueView
from deployments.job_records import (
    NO_LIMITS,
    ActiveJob,
    ClaimedJob,
    JobListing,
    JobRecord,
    JobSummary,
    KeyLimits,
    LapsedDelivery,
    Orphan,
    PriorSubmission,
    Refusal,
    TakenAtOnce,
)
from deployments.jobs import JobStore

logger = logging.getLogger("ray.serve")
ACTOR_NAME_PREFIX = "diffusion_api_jobs"
ACTOR_NAMESPACE = "diffusion_api"
# Bump when JobStore's methods change: the actor is detached and outlives redeploys, so a new interface
# gets a new actor (same database) instead of calling methods the old one does not have.
STORE_INTERFACE_VERSION = 13


def same_store(database: str, store_id: str) -> bool:
    """Whether `database` is a file this process can open and is the store with id `store_id` (not another
    node's file that happens to have the same path). Checked read-only, so a foreign file is never changed."""
    path = Path(database)
    if not path.is_file():
        return False
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            row = db.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()
        finally:
            db.close()
    except sqlite3.Error:
        return False
    return row is not None and row[0] == store_id


class JobsClient:
    """The job store as the replicas use it.

    Every replica reads and writes a PostgreSQL store directly. A SQLite file is used directly by replicas on
    the job actor's node that can open the actor's own file (checked by store id): SQLite's WAL and write locks
    make that safe between processes of one host, and it saves an actor call (a few ms) on every step of a job
    and on every status poll; replicas on other nodes (SQLite does not work across hosts, shared volumes
    included) call the actor. Direct calls run in a worker thread. Replica reports live in the actor's memory
    (a cache: replicas send them every few seconds) and always go there.
    """

    def __init__(self, database: str, **options):
        self.database = database
        self.actor = get_or_create_job_actor(database, **options)
        self._options = options
        self._local: JobStore | None = None
        self._checked = False
        self._checking = asyncio.Lock()

    @classmethod
    def in_process(cls, store: JobStore) -> "JobsClient":
        """A client of a store opened in this process, with no job actor: for one-process use (the job
        service's unit tests), where no other process needs to reach the store."""
        client = cls.__new__(cls)
        client.database, client.actor, client._options = store.database, None, {}
        client._local, client._checked, client._checking = store, True, asyncio.Lock()
        return client

    async def _store(self) -> "JobStore | None":
        async with self._checking:
            if self._checked:
                return self._local
            postgres = is_postgres_url(self.database)
            if postgres:  # every process reaches the server: no need to ask the actor where the store is
                store_id, node = "", ""
            else:
                store_id, node = await self.actor.location.remote()  # also waits for the actor to set up the file
            if postgres or node == ray.get_runtime_context().get_node_id():
                try:
                    if postgres or await asyncio.to_thread(same_store, self.database, store_id):
                        self._local = await asyncio.to_thread(JobStore, self.database, **self._options)
                except database_errors():
                    logger.warning("cannot open the job store %s here; using the job actor", describe(self.database))
            # A PostgreSQL server out of reach now is tried again on the next call (this one asks the actor).
            self._checked = self._local is not None or not postgres
            logger.info("job store: %s", describe(self.database) if self._local else "the job actor")
            return self._local

    async def _call(self, method: str, *args):
        store = await self._store()
        if store is not None:
            try:  # off the event loop: a durable commit waits for the disk, a busy file for its lock
                return await asyncio.to_thread(getattr(store, method), *args)
            except database_errors():
                logger.warning("job store %s failed here; asking the job actor", method, exc_info=True)
        return await getattr(self.actor, method).remote(*args)

    async def change_marker(self):
        """The store's change marker (SQLite, opened here: see deployments/job_changes.py); None when this
        process cannot check it cheaply (PostgreSQL announces changes instead; through the job actor, every
        check would be a call)."""
        store = await self._store()
        if store is None or is_postgres_url(self.database):
            return None
        return await asyncio.to_thread(store.change_marker)

    def listen(self, loop: asyncio.AbstractEventLoop, on_change) -> "PostgresListener | None":
        """Starts listening for the store's change announcements (PostgreSQL); None for SQLite."""
        if not is_postgres_url(self.database):
            return None
        return PostgresListener(self.database, loop, on_change)

    async def create(self, job_id: str, kind: str, payload: dict, warnings: list[str], family: str = "",
                     max_active: int | None = None, origin: str = "", owner: str = "",
                     inputs: dict[str, str] | None = None, idempotency: tuple[str, str] | None = None,
                     images: int = 1, priority: int = 0, batch_key: str = "", limits: KeyLimits = NO_LIMITS,
                     take_at_once: bool = False) -> bool | TakenAtOnce | PriorSubmission | Refusal:  # fmt: skip
        return await self._call("create", job_id, kind, payload, warnings, family, max_active, origin, owner, inputs,
                                idempotency, images, priority, batch_key, limits, take_at_once)  # fmt: skip

    async def claim_next(self, family: str) -> list[ClaimedJob] | None:
        return await self._call("claim_next", family)

    async def fail_waiting(self, family: str, error: str) -> list[str]:
        return await self._call("fail_waiting", family, error)

    async def waiting_families(self) -> list[str]:
        return await self._call("waiting_families")

    async def queue_view(self, family: str) -> QueueView:
        return await self._call("queue_view", family)

    async def renew_room(self, replica: str, family: str, slots: int) -> None:
        return await self._call("renew_room", replica, family, slots)

    def withdraw_room(self, replica: str, family: str) -> None:
        """A stopping generator replica's last word, from a synchronous destructor: no room any more (written
        here where the store is open in this process, else sent to the job actor without waiting)."""
        if self._local is not None:
            self._local.renew_room(replica, family, 0)
        elif self.actor is not None:
            self.actor.renew_room.remote(replica, family, 0)

    async def family_demand(self, family: str) -> dict[str, int]:
        return await self._call("family_demand", family)

    async def list_jobs(self, owner: str | None, state: str | None, limit: int,
                        before: tuple[float, str] | None = None) -> list[JobListing]:  # fmt: skip
        return await self._call("list_jobs", owner, state, limit, before)

    async def usage(self) -> list[tuple[str, str, str, int, int]]:
        return await self._call("usage")

    async def prior_submission(self, owner: str, key: str) -> PriorSubmission | None:
        return await self._call("prior_submission", owner, key)

    async def prune_if_due(self) -> int | None:
        return await self._call("prune_if_due")

    async def prune(self) -> int:
        return await self._call("prune")

    async def active_jobs(self, origin: str, owner: str | None = None) -> list[ActiveJob]:
        return await self._call("active_jobs", origin, owner)

    async def get_setting(self, key: str) -> str | None:
        return await self._call("get_setting", key)

    async def set_setting(self, key: str, value: str) -> None:
        return await self._call("set_setting", key, value)

    async def setting_or(self, key: str, value: str) -> str:
        return await self._call("setting_or", key, value)

    async def start_many(self, job_ids: list[str], phase: str, batch_size: int | None = None) -> list[str]:
        return await self._call("start_many", job_ids, phase, batch_size)

    async def progress_many(self, job_ids: list[str], progress: float, phase: str) -> list[str]:
        return await self._call("progress_many", job_ids, progress, phase)

    async def complete_many(self, outcomes: list[tuple[str, dict, list[str]]]) -> list[bool]:
        return await self._call("complete_many", outcomes)

    async def fail(self, job_id: str, error: str) -> bool:
        return await self._call("fail", job_id, error)

    async def retry(self, job_id: str, warning: str, max_attempts: int, cause: str,
                    requeue: bool = False) -> int | None:  # fmt: skip
        return await self._call("retry", job_id, warning, max_attempts, cause, requeue)

    async def cancel(self, job_id: str) -> bool:
        return await self._call("cancel", job_id)

    async def get(self, job_id: str) -> JobRecord | None:
        return await self._call("get", job_id)

    async def record_previews(self, previews: dict[str, str]) -> None:
        return await self._call("record_previews", previews)

    async def claim_delivery(self, job_id: str) -> bool:
        return await self._call("claim_delivery", job_id)

    async def claim_lapsed_deliveries(self, limit: int = 16) -> list[LapsedDelivery]:
        return await self._call("claim_lapsed_deliveries", limit)

    async def renew_deliveries(self, job_ids: list[str]) -> int:
        return await self._call("renew_deliveries", job_ids)

    async def record_webhook(self, job_id: str, outcome: dict) -> bool:
        return await self._call("record_webhook", job_id, outcome)

    async def summaries(self, job_ids: list[str]) -> dict[str, JobSummary]:
        return await self._call("summaries", job_ids)

    async def counts(self) -> dict[str, int]:
        return await self._call("counts")

    async def counts_by_family(self) -> list[tuple[str, str, int]]:
        return await self._call("counts_by_family")

    async def touch_active(self, job_ids: list[str]) -> int:
        return await self._call("touch_active", job_ids)

    async def renew_leases(self, job_ids: list[str]) -> int:
        return await self._call("renew_leases", job_ids)

    async def claim_orphans(self, limit: int = 16) -> list[Orphan]:
        return await self._call("claim_orphans", limit)

    async def touch_queued(self, job_ids: list[str]) -> int:
        return await self._call("touch_queued", job_ids)

    async def reap_stale(self, timeout_seconds: float) -> list[str]:
        return await self._call("reap_stale", timeout_seconds)

    async def replica_reports(self) -> list[dict]:
        if self.actor is None:
            return self._local.replica_reports()
        try:
            return await self.actor.replica_reports.remote()
        except ray.exceptions.RayActorError:  # it could not restart (its store was out of reach): a new one
            self.actor = get_or_create_job_actor(self.database, **self._options)
            return await self.actor.replica_reports.remote()

    def report_replica(self, replica: str, report: dict) -> None:
        self.actor.report_replica.remote(replica, report)


def job_actor_name(database: str) -> str:
    """One actor per database and store interface, so two apps on one cluster never share a store."""
    location = database if is_postgres_url(database) else str(Path(database).resolve())
    digest = hashlib.sha1(location.encode()).hexdigest()[:10]
    return f"{ACTOR_NAME_PREFIX}_v{STORE_INTERFACE_VERSION}_{digest}"


def get_or_create_job_actor(database: str, **options):
    """The one named job-status actor (created by whoever asks first). It restarts on failure and callers'
    calls are retried; its records survive in the database."""
    actor_class = ray.remote(JobStore)
    return actor_class.options(
        name=job_actor_name(database),
        namespace=ACTOR_NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        num_cpus=0,
        max_restarts=-1,
        max_task_retries=-1,
    ).remote(database, **options)
