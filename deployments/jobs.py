"""The job store: every job's state in a database, behind a named Ray actor.

`JobStore` is a plain class (testable without Ray) with named transitions: `create`, `start_many`,
`progress_many`, `complete_many`, `retry`, `fail`, `cancel`. Records live in a database (deployments/job_db.py):
a SQLite file (in the outputs folder by default) or a PostgreSQL server, so a finished job is still served after
the actor or the whole service restarts; its images are in the output storage, the record says where. Finished
jobs are pruned by age and count; active jobs are held by leases (see LEASE_S). Replicas reach the store through
`JobsClient`: straight to the database where they can (PostgreSQL from any node, a SQLite file from the actor's
node), else through the actor.
"""

import json
import logging
import time
import uuid

import ray

from deployments import job_queue
from deployments.job_db import ACTIVE_JOBS, TERMINAL_STATES, Transaction, database_errors, open_database
from deployments.job_records import (
    NO_LIMITS,
    SUMMARY_FIELDS,
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
from deployments.retention import prune_finished
from pipelines.schemas import JobState
from pipelines.storage import OutputStorage

logger = logging.getLogger("ray.serve")
REPLICA_REPORT_TTL_S = 60.0
# An active job is held by the processes working on it (the ingress replica dispatching it, the generator
# replica queueing or running it), which renew its lease every LEASE_RENEW_S. A job whose lease has run out
# has lost them all (a crash of the service, a dead ingress replica): any ingress replica claims and
# dispatches it again.
LEASE_S = 15.0
LEASE_RENEW_S = 3.0
FAMILY_FULL_RETRY_S = 5  # Retry-After when a family's max_queued_jobs is reached
PRUNE_BATCH = 500  # jobs per retention step: a backlog is removed in bounded steps, other store calls between
IDEMPOTENCY_TTL_S = 24 * 3600.0  # how long an Idempotency-Key names its submission
PRUNE_INTERVAL_S = 60.0  # retention runs this often, from the ingress replicas' job keepers (one of them at a time)
_TERMINAL = ", ".join(f"'{state.value}'" for state in TERMINAL_STATES)
# An owner's use of an Idempotency-Key since a time, if its job still exists: (job id, request fingerprint).
_PRIOR_SUBMISSION = ("SELECT i.job_id, i.request_hash FROM idempotency AS i JOIN jobs ON jobs.job_id = i.job_id "
                     "WHERE i.owner = ? AND i.idem_key = ? AND i.created >= ?")  # fmt: skip
_NO_LIMIT = 2**62  # LIMIT for "all rows" (an OFFSET needs one on SQLite)


class JobStore:
    def __init__(self, database: str, keep_finished_seconds: float = 7 * 86400, keep_finished_count: int = 10000,
                 outputs: str | None = None, prune_interval_s: float = PRUNE_INTERVAL_S):  # fmt: skip
        self.database = database
        self.db = open_database(database)  # the schema brought up to date (or refused: a newer release's)
        self.db.execute("INSERT INTO meta (key, value) VALUES ('store_id', ?) ON CONFLICT (key) DO NOTHING",
                        (uuid.uuid4().hex,), durable=True)  # fmt: skip
        ((self._store_id,),) = self.db.execute("SELECT value FROM meta WHERE key = 'store_id'")
        self._replica_reports: dict[str, dict] = {}
        self.keep_finished_seconds = keep_finished_seconds
        self.keep_finished_count = keep_finished_count
        self.outputs = OutputStorage(outputs) if outputs else None  # where pruned jobs' images are deleted
        self.prune_interval_s = prune_interval_s
        self._last_prune = 0.0

    def _update_many(self, job_ids: list[str], durable: bool = False, **fields) -> list[str]:
        """Updates the jobs among `job_ids` that are still active; returns those it updated."""
        if not job_ids:
            return []
        fields["updated"] = time.time()
        assignments = ", ".join(f"{key} = ?" for key in fields)
        marks = ", ".join("?" * len(job_ids))
        rows = self.db.execute(
            f"UPDATE jobs SET {assignments} WHERE job_id IN ({marks}) AND {ACTIVE_JOBS} RETURNING job_id",
            (*fields.values(), *job_ids),
            durable,
        )
        updated = {row[0] for row in rows}
        return [job_id for job_id in job_ids if job_id in updated]

    def _announce(self, job_ids: list[str]) -> None:
        """Tells the watchers of other processes that these jobs' summaries changed (deployments/job_changes.py);
        a failure to tell costs them only latency (they poll as a fallback), never the write."""
        if job_ids:
            try:
                self.db.announce(job_ids)
            except database_errors():
                logger.warning("announcing a change of jobs %s failed", job_ids[:5], exc_info=True)

    def change_marker(self):
        """A value that changes when any process commits a change to the store (SQLite); None where changes are
        announced to listeners instead (PostgreSQL)."""
        return self.db.change_marker()

    # Transitions -----------------------------------------------------------------------------------------
    def create(self, job_id: str, kind: str, payload: dict, warnings: list[str], family: str = "",
               max_active: int | None = None, origin: str = "", owner: str = "",
               inputs: dict[str, str] | None = None, idempotency: tuple[str, str] | None = None,
               images: int = 1, priority: int = 0, batch_key: str = "", limits: KeyLimits = NO_LIMITS,
               take_at_once: bool = False) -> bool | TakenAtOnce | PriorSubmission | Refusal:  # fmt: skip
        """Records a queued job in the fair queue (deployments/job_queue.py): `images` it makes, its `priority`
        among its owner's jobs, `batch_key` (jobs with equal keys can share a diffusers call). Refuses (returns
        the Refusal) when the owner's `limits` are reached, or `family` already has `max_active` jobs queued or
        running, so callers can answer "busy, retry later" instead of queueing without bound. `origin` is the
        API that took it ("" native, "sdapi" A1111's), `owner` who sent it (its API key's name), `inputs` where
        its input images are stored (payload field -> location in the output storage; the payload lacks them).
        `idempotency`: (Idempotency-Key, the request's fingerprint): when the owner used that key within
        IDEMPOTENCY_TTL_S and its job still exists, nothing is recorded and that submission is returned (in the
        same transaction as the insert, so of two concurrent submissions with one key exactly one is created).
        `take_at_once`: the caller will dispatch the job itself if nobody waits ahead of it and its family has
        room (then TakenAtOnce is returned, and the job is recorded as dispatched)."""
        now = time.time()
        with self.db.transaction(durable=True) as transaction:
            # A create repeated through the job actor (the first one's answer was lost after its commit) answers
            # as the first did, before any limit would count the job against itself.
            recorded = transaction.one("SELECT dispatched FROM jobs WHERE job_id = ?", (job_id,))
            if recorded is not None:
                return TakenAtOnce() if take_at_once and recorded[0] is not None else True
            if idempotency is not None:
                prior = transaction.one(_PRIOR_SUBMISSION, (owner, idempotency[0], now - IDEMPOTENCY_TTL_S))
                if prior is not None:
                    return PriorSubmission(*prior)
            refusal = job_queue.over_queued_images(transaction, owner, limits, images, family, now)
            if refusal is not None:
                return refusal
            if max_active is not None:
                (active,) = transaction.one(
                    "SELECT COUNT(*) FROM jobs WHERE family = ? AND state IN ('queued', 'processing')", (family,)
                )
                if active >= max_active:
                    return Refusal("max_queued_jobs", max_active, active, FAMILY_FULL_RETRY_S)
            refusal = job_queue.take_request_token(transaction, owner, limits, now)  # last: taken only if recorded
            if refusal is not None:
                return refusal
            transaction.execute(
                "INSERT INTO jobs (job_id, kind, state, phase, progress, created, updated, payload, warnings, "
                "result, error, family, origin, owner, lease_until, webhook_state, inputs, images, priority, "
                "batch_key) VALUES (?, ?, 'queued', 'queued', 0, ?, ?, ?, ?, NULL, NULL, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (job_id) DO NOTHING",  # a create repeated through the job actor records it once
                (job_id, kind, now, now, json.dumps(payload), json.dumps(warnings), family, origin, owner,
                 now + LEASE_S, "pending" if payload.get("callback_url") else None,
                 json.dumps(inputs) if inputs else None, images, priority, batch_key),
            )  # fmt: skip
            if idempotency is not None:  # an expired or orphaned use of the key is replaced
                transaction.execute(
                    "INSERT INTO idempotency (owner, idem_key, request_hash, job_id, created) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT (owner, idem_key) DO UPDATE SET request_hash = excluded.request_hash, "
                    "job_id = excluded.job_id, created = excluded.created",
                    (owner, idempotency[0], idempotency[1], job_id, now),
                )
            if take_at_once:
                job = job_queue.Waiting(job_id, owner, priority, now, images, batch_key)
                if job_queue.take_at_once(transaction, family, job, LEASE_S, now):
                    return TakenAtOnce()
        return True

    def prior_submission(self, owner: str, key: str) -> PriorSubmission | None:
        """The owner's submission with this Idempotency-Key within IDEMPOTENCY_TTL_S, if its job still exists."""
        row = self.db.execute(_PRIOR_SUBMISSION, (owner, key, time.time() - IDEMPOTENCY_TTL_S))
        return PriorSubmission(*row[0]) if row else None

    def start_many(self, job_ids: list[str], phase: str = "generation", batch_size: int | None = None) -> list[str]:
        """Marks jobs as running (in one batch of `batch_size`); returns the ones still active, so a job
        cancelled while it waited never starts."""
        if not job_ids:
            return []
        now = time.time()
        marks = ", ".join("?" * len(job_ids))
        rows = self.db.execute(
            f"UPDATE jobs SET state = 'processing', phase = ?, batch_size = ?, updated = ?, "
            f"started = COALESCE(started, ?) WHERE job_id IN ({marks}) AND {ACTIVE_JOBS} RETURNING job_id",
            (phase, batch_size or len(job_ids), now, now, *job_ids),
        )
        started = [job_id for job_id in job_ids if job_id in {row[0] for row in rows}]
        self._announce(started)
        return started

    def progress_many(self, job_ids: list[str], progress: float, phase: str) -> list[str]:
        """Progress in percent for the jobs of a batch; it never goes backwards. Returns the jobs still
        active (the others were cancelled or failed meanwhile)."""
        if not job_ids:
            return []
        marks = ", ".join("?" * len(job_ids))
        rows = self.db.execute(
            f"UPDATE jobs SET state = 'processing', phase = ?, progress = {self.db.greatest}(progress, ?), updated = ? "
            f"WHERE job_id IN ({marks}) AND {ACTIVE_JOBS} RETURNING job_id",
            (phase, min(progress, 99.9), time.time(), *job_ids),
        )
        active = [job_id for job_id in job_ids if job_id in {row[0] for row in rows}]
        self._announce(active)
        return active

    def touch_active(self, job_ids: list[str]) -> int:
        """Heartbeat for started jobs that wait for their turn inside a batch (an out-of-memory batch retried
        job by job), so the stale-job reaper leaves them alone."""
        return len(self._update_many(job_ids))

    def renew_leases(self, job_ids: list[str]) -> int:
        """The holders' heartbeat: the active jobs among `job_ids` stay theirs for another LEASE_S."""
        return self._extend_leases(job_ids, ACTIVE_JOBS)

    def _extend_leases(self, job_ids: list[str], held: str) -> int:
        """Extends to LEASE_S from now the leases of the jobs among `job_ids` that match `held` (SQL)."""
        if not job_ids:
            return 0
        marks = ", ".join("?" * len(job_ids))
        rows = self.db.execute(
            f"UPDATE jobs SET lease_until = {self.db.greatest}(lease_until, ?) WHERE job_id IN ({marks}) "
            f"AND {held} RETURNING job_id",
            (time.time() + LEASE_S, *job_ids),
        )
        return len(rows)

    def claim_orphans(self, limit: int = 16) -> list[Orphan]:
        """Takes up to `limit` dispatched jobs whose lease has run out (nobody holds them any more) for the
        caller, atomically (one caller gets each), to put back in the queue (`retry` with `requeue`). A job
        that has progressed within LEASE_S is not taken even then: its worker is alive (it only failed to renew,
        the store being out of reach, say). The claim counts as an update, so the stale reaper leaves the job
        to its new holder."""
        now = time.time()
        orphaned = f"{job_queue.DISPATCHED} AND lease_until < ? AND updated < ?"
        # Every ingress replica asks every few seconds and the answer is nearly always "none": a plain read
        # answers that without taking the write lock.
        if not self.db.execute(f"SELECT 1 FROM jobs WHERE {orphaned} LIMIT 1", (now, now - LEASE_S)):
            return []
        with self.db.transaction(durable=True) as transaction:
            rows = transaction.execute(
                f"UPDATE jobs SET lease_until = ?, updated = ? WHERE job_id IN (SELECT job_id FROM jobs WHERE "
                f"{orphaned} ORDER BY created LIMIT ?) RETURNING job_id, family",
                (now + LEASE_S, now, now, now - LEASE_S, limit),
            )
        return [Orphan(job_id, family) for job_id, family in rows]

    def touch_queued(self, job_ids: list[str]) -> int:
        """Heartbeat for jobs still waiting for a generator, so the stale-job reaper leaves them alone."""
        if not job_ids:
            return 0
        marks = ", ".join("?" * len(job_ids))
        query = f"UPDATE jobs SET updated = ? WHERE job_id IN ({marks}) AND state = 'queued' RETURNING job_id"
        return len(self.db.execute(query, (time.time(), *job_ids)))

    def complete_many(self, outcomes: list[tuple[str, dict, list[str]]]) -> list[bool]:
        """Records finished jobs (job id, result, warnings the run added) in one transaction; a job that was
        cancelled or failed meanwhile stays as it is (False for it). A result's `batch_size` (the call the job
        finally ran in: 1 after an out-of-memory retry) replaces the one recorded at start."""
        done = []
        now = time.time()
        with self.db.transaction(durable=True) as transaction:
            for job_id, result, warnings in outcomes:
                row = transaction.one(f"SELECT warnings FROM jobs WHERE job_id = ? AND {ACTIVE_JOBS}", (job_id,))
                if row is not None:
                    merged = json.loads(row[0])
                    merged += [w for w in dict.fromkeys(warnings) if w not in merged]
                    result = dict(result)
                    batch_size = result.pop("batch_size", None)  # kept in its column, with the batch it ran in
                    transaction.execute(
                        "UPDATE jobs SET state = 'done', phase = 'done', progress = 100.0, result = ?, "
                        "warnings = ?, batch_size = COALESCE(?, batch_size), updated = ?, preview = NULL "
                        "WHERE job_id = ?",
                        (json.dumps(result), json.dumps(merged), batch_size, now, job_id),
                    )
                done.append(row is not None)
        self._announce([job_id for (job_id, _, _), completed in zip(outcomes, done, strict=True) if completed])
        return done

    def retry(self, job_id: str, warning: str, max_attempts: int, cause: str, requeue: bool = False) -> int | None:
        """Counts another attempt of a job whose worker died (replica or node lost), with `warning` once among
        its warnings; returns the new attempt's number. `requeue`: the job goes back to the fair queue (its
        place kept: its age and priority), for whichever replica takes it next; else its holder dispatches it
        again itself. None when the job has ended meanwhile (done, cancelled: never retried) or has had
        `max_attempts` attempts: then it is failed here, with a message that says so."""
        attempt = self._retry(job_id, warning, max_attempts, cause, requeue)
        self._announce([job_id])
        return attempt

    def _retry(self, job_id: str, warning: str, max_attempts: int, cause: str, requeue: bool) -> int | None:
        now = time.time()
        with self.db.transaction(durable=True) as transaction:
            query = f"SELECT attempts, warnings FROM jobs WHERE job_id = ? AND {ACTIVE_JOBS}"
            row = transaction.one(query, (job_id,))
            if row is None:
                return None
            attempts, warnings = row[0], json.loads(row[1])
            if attempts >= max_attempts:
                error = (f"its worker was lost on each of its {attempts} attempt(s) (last: {cause}); not retried "
                         f"again (max_attempts {max_attempts})")  # fmt: skip
                transaction.execute(
                    "UPDATE jobs SET state = 'error', phase = 'error', error = ?, updated = ? WHERE job_id = ?",
                    (error, now, job_id),
                )
                return None
            if warning not in warnings:
                warnings.append(warning)
            transaction.execute(
                "UPDATE jobs SET state = 'queued', phase = 'queued', progress = 0, attempts = attempts + 1, "
                f"warnings = ?, updated = ?{', dispatched = NULL' if requeue else ''} WHERE job_id = ?",
                (json.dumps(warnings), now, job_id),
            )
            return attempts + 1

    def fail(self, job_id: str, error: str) -> bool:
        failed = self._update_many([job_id], durable=True, state="error", phase="error", error=error, preview=None)
        self._announce(failed)
        return bool(failed)

    def cancel(self, job_id: str) -> bool:
        updated = self._update_many([job_id], durable=True, state="cancelled", phase="cancelled",
                                    error="cancelled by request", preview=None)  # fmt: skip
        self._announce(updated)
        return bool(updated)

    def record_previews(self, previews: dict[str, str]) -> None:
        """The latest preview (a JPEG in base64) of each running job; not durable, like progress."""
        for job_id, preview in previews.items():
            self.db.execute(f"UPDATE jobs SET preview = ? WHERE job_id = ? AND {ACTIVE_JOBS}", (preview, job_id))
        self._announce(list(previews))

    # The fair queue (deployments/job_queue.py) ------------------------------------------------------------
    def claim_next(self, family: str) -> list[ClaimedJob] | None:
        """The family's next jobs in fair order, as many as its generators have room for, for the caller to
        dispatch under a lease; None when no generator replica of the family is up. A plain read first answers
        "nothing waits" without the write lock."""
        if not self.db.execute(f"SELECT 1 FROM jobs WHERE family = ? AND {job_queue.WAITING} LIMIT 1", (family,)):
            return []
        # A plain read of the room first too (the claim reads it again under the lock): a full family is asked
        # on every submission while its generators are busy.
        slots, dispatched = job_queue.family_room(Transaction(self.db.execute), family)
        if slots <= 0:
            return None
        if slots <= dispatched:
            return []
        with self.db.transaction() as transaction:
            return job_queue.claim_next(transaction, family, LEASE_S)

    def fail_waiting(self, family: str, error: str) -> list[str]:
        """Fails the jobs waiting in `family`'s queue (a family no replica serves); returns their ids."""
        rows = self.db.execute(
            f"UPDATE jobs SET state = 'error', phase = 'error', error = ?, updated = ? WHERE family = ? AND "
            f"{job_queue.WAITING} RETURNING job_id",
            (error, time.time(), family),
            durable=True,
        )
        failed = [row[0] for row in rows]
        self._announce(failed)
        return failed

    def waiting_families(self) -> list[str]:
        """The families with jobs waiting in the queue."""
        return [row[0] for row in self.db.execute(f"SELECT DISTINCT family FROM jobs WHERE {job_queue.WAITING}")]

    def queue_view(self, family: str) -> job_queue.QueueView:
        """The family's fair queue as statuses read it (`queue_position`, `eta_s`)."""
        return job_queue.queue_view(Transaction(self.db.execute), family)

    def renew_room(self, replica: str, family: str, slots: int) -> None:
        """A generator replica's heartbeat: it takes `slots` images at once (0: it is stopping)."""
        with self.db.transaction() as transaction:
            job_queue.renew_room(transaction, replica, family, slots)

    def family_demand(self, family: str) -> dict[str, int]:
        """Images waiting for and dispatched to the family's generators (what autoscaling reads)."""
        with self.db.transaction() as transaction:
            return job_queue.family_demand(transaction, family)

    def list_jobs(self, owner: str | None, state: str | None, limit: int,
                  before: tuple[float, str] | None = None) -> list[JobListing]:  # fmt: skip
        """Jobs newest first (of `owner` only, unless None; in `state` only, unless None), `limit` of them,
        those created before `before` (created, job_id: the last of the previous page) when given."""
        query = ("SELECT job_id, kind, state, phase, progress, created, updated, family, origin, owner, images, "
                 "priority, payload FROM jobs WHERE 1 = 1")  # fmt: skip
        parameters: tuple = ()
        if owner is not None:
            query, parameters = query + " AND owner = ?", (*parameters, owner)
        if state is not None:
            query, parameters = query + " AND state = ?", (*parameters, state)
        if before is not None:
            query += " AND (created < ? OR (created = ? AND job_id < ?))"
            parameters = (*parameters, before[0], before[0], before[1])
        rows = self.db.execute(query + " ORDER BY created DESC, job_id DESC LIMIT ?", (*parameters, limit))
        return [JobListing(job_id, kind, JobState(state), phase, progress, created, updated, family, origin, owner,
                           images, priority, json.loads(payload).get("model") or "")
                for job_id, kind, state, phase, progress, created, updated, family, origin, owner, images, priority,
                payload in rows]  # fmt: skip

    def usage(self) -> list[tuple[str, str, str, int, int]]:
        """(family, state, owner, jobs, images) for every family, state and owner that has jobs (`/metrics`)."""
        query = ("SELECT family, state, owner, COUNT(*), COALESCE(SUM(images), 0) FROM jobs "
                 "GROUP BY family, state, owner")  # fmt: skip
        return [(family, state, owner, count, images) for family, state, owner, count, images in self.db.execute(query)]

    # Webhooks: a job with a callback_url is created with its delivery `pending`. Once the job has ended, one
    # ingress replica claims the delivery (`delivering`, under the job's lease, which it renews while it
    # delivers) and records the outcome (`delivered`, `failed`). A delivery whose holder was lost (its lease ran
    # out) is claimed again: every ended job's webhook is delivered at least once.
    def claim_delivery(self, job_id: str) -> bool:
        """Takes an ended job's pending webhook delivery for the caller (one caller gets it)."""
        rows = self.db.execute(
            f"UPDATE jobs SET webhook_state = 'delivering', lease_until = ? WHERE job_id = ? AND state IN "
            f"({_TERMINAL}) AND webhook_state = 'pending' RETURNING job_id",
            (time.time() + LEASE_S, job_id),
            durable=True,
        )
        return bool(rows)

    def claim_lapsed_deliveries(self, limit: int = 16) -> list[LapsedDelivery]:
        """Takes up to `limit` ended jobs' webhook deliveries nobody holds (pending or delivering, their lease
        run out); returns them (job id, callback_url) to deliver."""
        now = time.time()
        lapsed = f"state IN ({_TERMINAL}) AND webhook_state IN ('pending', 'delivering') AND lease_until < ?"
        if not self.db.execute(f"SELECT 1 FROM jobs WHERE {lapsed} LIMIT 1", (now,)):
            return []
        with self.db.transaction(durable=True) as transaction:
            rows = transaction.execute(
                f"UPDATE jobs SET webhook_state = 'delivering', lease_until = ? WHERE job_id IN (SELECT job_id "
                f"FROM jobs WHERE {lapsed} ORDER BY updated LIMIT ?) RETURNING job_id, payload",
                (now + LEASE_S, now, limit),
            )
        return [LapsedDelivery(job_id, json.loads(payload).get("callback_url")) for job_id, payload in rows]

    def renew_deliveries(self, job_ids: list[str]) -> int:
        """The delivering replica's heartbeat: its deliveries stay its own for another LEASE_S."""
        return self._extend_leases(job_ids, "webhook_state = 'delivering'")

    def record_webhook(self, job_id: str, outcome: dict) -> bool:
        """Records how delivering an ended job's final status to its callback_url went (`status`: delivering
        while under way, then delivered or failed)."""
        rows = self.db.execute("UPDATE jobs SET webhook = ?, webhook_state = ? WHERE job_id = ? RETURNING job_id",
                               (json.dumps(outcome), outcome["status"], job_id), durable=True)  # fmt: skip
        return bool(rows)

    # Queries ---------------------------------------------------------------------------------------------
    def get(self, job_id: str) -> JobRecord | None:
        rows = self.db.execute(f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs WHERE job_id = ?", (job_id,))
        if not rows:
            return None
        job = dict(zip(_JOB_COLUMNS, rows[0], strict=True))
        job["state"] = JobState(job["state"])
        job["payload"] = json.loads(job["payload"])
        job["warnings"] = json.loads(job["warnings"])
        job["result"] = json.loads(job["result"]) if job["result"] else None
        job["webhook"] = json.loads(job["webhook"]) if job["webhook"] else None
        job["inputs"] = json.loads(job["inputs"]) if job["inputs"] else {}
        return JobRecord(**job)

    def summaries(self, job_ids: list[str]) -> dict[str, JobSummary]:
        """What clients watching jobs wait on (state, phase, progress, batch size, attempts), for many jobs in
        one read: no payload, result or image locations."""
        if not job_ids:
            return {}
        marks = ", ".join("?" * len(job_ids))
        rows = self.db.execute(
            f"SELECT job_id, {', '.join(SUMMARY_FIELDS)} FROM jobs WHERE job_id IN ({marks})", tuple(job_ids)
        )
        return {job_id: JobSummary(JobState(state), *rest) for job_id, state, *rest in rows}

    def store_id(self) -> str:
        """This database's identity: a replica that opens the file itself checks it is the same database."""
        return self._store_id

    def location(self) -> tuple[str, str]:
        """(store id, Ray node id of this actor): the file may be shared only by processes on this node, since
        SQLite's WAL and locks do not work across hosts (a network volume included)."""
        return self._store_id, ray.get_runtime_context().get_node_id()

    def active_jobs(self, origin: str, owner: str | None = None) -> list[ActiveJob]:
        """The queued and running jobs `origin` took (of `owner` only, unless None), oldest first."""
        steps = self.db.json_int("payload", "steps")
        query = (f"SELECT job_id, state, phase, progress, created, {steps}, preview FROM jobs "
                 f"WHERE {ACTIVE_JOBS} AND origin = ?")  # fmt: skip
        parameters: tuple = (origin,)
        if owner is not None:
            query += " AND owner = ?"
            parameters += (owner,)
        rows = self.db.execute(query + " ORDER BY created", parameters)
        return [ActiveJob(job_id, JobState(state), *rest) for job_id, state, *rest in rows]

    def get_setting(self, key: str) -> str | None:
        rows = self.db.execute("SELECT value FROM settings WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def set_setting(self, key: str, value: str) -> None:
        self.db.execute(
            "INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
            durable=True,
        )

    def setting_or(self, key: str, value: str) -> str:
        """The setting's value; one not set yet is set to `value` first. Two replicas that ask at once get the
        same answer (the first write wins), as a value every replica must share needs."""
        self.db.execute("INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING", (key, value),
                        durable=True)  # fmt: skip
        return self.get_setting(key)

    def counts(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"))

    def counts_by_family(self) -> list[tuple[str, str, int]]:
        """(family, state, jobs) for every family and state that has jobs."""
        rows = self.db.execute("SELECT family, state, COUNT(*) FROM jobs GROUP BY family, state")
        return [(family, state, count) for family, state, count in rows]

    # Replica reports (in memory: replicas send them every few seconds) ------------------------------------
    def report_replica(self, replica: str, report: dict) -> None:
        """Generator replicas report their device, GPU memory and loaded models (the ingress has no GPU)."""
        self._replica_reports[replica] = {**report, "replica": replica, "reported_at": time.time()}

    def replica_reports(self) -> list[dict]:
        cutoff = time.time() - REPLICA_REPORT_TTL_S
        self._replica_reports = {k: v for k, v in self._replica_reports.items() if v["reported_at"] >= cutoff}
        return sorted(self._replica_reports.values(), key=lambda report: report["replica"])

    # Housekeeping ----------------------------------------------------------------------------------------
    def reap_stale(self, timeout_seconds: float) -> list[str]:
        """Fails dispatched jobs that are held (their lease is live) but have not been updated for
        `timeout_seconds`: a worker that is alive and stuck. (Jobs nobody holds are claimed and queued again
        instead; jobs waiting in the queue are nobody's yet.) Returns
        their ids."""
        now = time.time()
        rows = self.db.execute(
            "SELECT job_id FROM jobs WHERE state IN ('queued', 'processing') AND dispatched IS NOT NULL "
            "AND updated < ? AND lease_until >= ?",
            (now - timeout_seconds, now),
        )
        stale = [row[0] for row in rows]
        for job_id in stale:
            self.fail(job_id, f"the worker stopped reporting for {timeout_seconds:.0f}s; the job was abandoned")
        return stale

    def prune_if_due(self) -> int | None:
        """Retention, on the job keepers' timer: at most once per `prune_interval_s` across every process that
        uses the store (the first to claim the interval prunes). Returns how many jobs went, None when not due."""
        now = time.time()
        if now - self._last_prune < self.prune_interval_s:
            return None  # asked again within the interval: not even a read
        self._last_prune = now
        claimed = self.db.execute(
            f"UPDATE meta SET value = ? WHERE key = 'last_prune' AND CAST(value AS {self.db.real}) <= ? RETURNING key",
            (repr(now), now - self.prune_interval_s),
        )
        return self.prune() if claimed else None

    def prune(self, limit: int = PRUNE_BATCH) -> int:
        """Retention's one step (deployments/retention.py): at most `limit` finished jobs that are past the
        retention time or beyond their owner's count, files first. Returns how many went."""
        self.db.execute("DELETE FROM idempotency WHERE created < ?", (time.time() - IDEMPOTENCY_TTL_S,))
        return prune_finished(self.db, self.outputs, self.keep_finished_seconds, self.keep_finished_count, limit)


_JOB_COLUMNS = ("job_id", "kind", "state", "phase", "progress", "created", "updated", "payload", "warnings",
                "result", "error", "batch_size", "attempts", "preview", "webhook", "family", "origin",
                "owner", "inputs", "started", "images", "priority", "dispatched")  # fmt: skip
