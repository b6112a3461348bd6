"""The job-status store: one named Ray actor holding every job's state, kept in SQLite.

`JobStore` is a plain class (testable without Ray) with named transitions: `create`, `start`, `progress`,
`complete`, `fail`, `cancel`. Records live in a SQLite file (in the outputs folder by default), so a finished
job, image included, is still served after the actor or the whole service restarts. Finished jobs are pruned
by age and count; a job whose worker stopped reporting is failed by `reap_stale`.
"""

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path

import ray

ACTOR_NAME_PREFIX = "diffusion_api_jobs"
ACTOR_NAMESPACE = "diffusion_api"
# Bump when JobStore's methods change: the actor is detached and outlives redeploys, so a new interface
# gets a new actor (same database) instead of calling methods the old one does not have.
STORE_INTERFACE_VERSION = 2
REPLICA_REPORT_TTL_S = 60.0
TERMINAL_STATES = ("done", "error", "cancelled")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    phase TEXT NOT NULL,
    progress REAL NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    payload TEXT NOT NULL,
    warnings TEXT NOT NULL,
    result TEXT,
    error TEXT,
    family TEXT NOT NULL DEFAULT ''
)
"""


class JobStore:
    def __init__(self, database: str, keep_finished_seconds: float = 7 * 86400, keep_finished_count: int = 10000):
        Path(database).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(database, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        if "family" not in columns:  # a database written by version 1 of this store
            self._db.execute("ALTER TABLE jobs ADD COLUMN family TEXT NOT NULL DEFAULT ''")
        self._lock = threading.Lock()
        self._replica_reports: dict[str, dict] = {}
        self.keep_finished_seconds = keep_finished_seconds
        self.keep_finished_count = keep_finished_count

    def _update(self, job_id: str, only_if_active: bool = True, **fields) -> bool:
        fields["updated"] = time.time()
        assignments = ", ".join(f"{key} = ?" for key in fields)
        condition = " AND state NOT IN ('done', 'error', 'cancelled')" if only_if_active else ""
        with self._lock:
            cursor = self._db.execute(
                f"UPDATE jobs SET {assignments} WHERE job_id = ?{condition}", (*fields.values(), job_id)
            )
        return cursor.rowcount == 1

    # Transitions -----------------------------------------------------------------------------------------
    def create(self, job_id: str, kind: str, payload: dict, warnings: list[str], family: str = "",
               max_active: int | None = None) -> bool:  # fmt: skip
        """Records a queued job. Refuses (returns False) when `family` already has `max_active` jobs queued or
        running, so callers can answer "busy, retry later" instead of queueing without bound."""
        now = time.time()
        with self._lock:
            if max_active is not None:
                (active,) = self._db.execute(
                    "SELECT COUNT(*) FROM jobs WHERE family = ? AND state IN ('queued', 'processing')", (family,)
                ).fetchone()
                if active >= max_active:
                    return False
            self._db.execute(
                "INSERT INTO jobs (job_id, kind, state, phase, progress, created, updated, payload, warnings, "
                "result, error, family) VALUES (?, ?, 'queued', 'queued', 0, ?, ?, ?, ?, NULL, NULL, ?)",
                (job_id, kind, now, now, json.dumps(payload), json.dumps(warnings), family),
            )
        self.prune()
        return True

    def start(self, job_id: str, phase: str = "generation") -> bool:
        return self._update(job_id, state="processing", phase=phase)

    def progress(self, job_id: str, progress: float, phase: str) -> bool:
        """Progress in percent; it never goes backwards."""
        with self._lock:
            row = self._db.execute("SELECT progress FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            return False
        return self._update(job_id, state="processing", phase=phase, progress=max(row[0], min(progress, 99.9)))

    def touch_queued(self, job_ids: list[str]) -> int:
        """Heartbeat for jobs still waiting for a generator, so the stale-job reaper leaves them alone."""
        now = time.time()
        with self._lock:
            return self._db.executemany(
                "UPDATE jobs SET updated = ? WHERE job_id = ? AND state = 'queued'", [(now, j) for j in job_ids]
            ).rowcount

    def add_warnings(self, job_id: str, warnings: list[str]) -> None:
        job = self.get(job_id)
        if job is not None:
            merged = job["warnings"] + [w for w in warnings if w not in job["warnings"]]
            self._update(job_id, only_if_active=False, warnings=json.dumps(merged))

    def complete(self, job_id: str, result: dict) -> bool:
        return self._update(job_id, state="done", phase="done", progress=100.0, result=json.dumps(result))

    def fail(self, job_id: str, error: str) -> bool:
        return self._update(job_id, state="error", phase="error", error=error)

    def cancel(self, job_id: str) -> bool:
        return self._update(job_id, state="cancelled", phase="cancelled", error="cancelled by request")

    # Queries ---------------------------------------------------------------------------------------------
    def get(self, job_id: str) -> dict | None:
        with self._lock:
            row = self._db.execute(
                "SELECT job_id, kind, state, phase, progress, created, updated, payload, warnings, result, error "
                "FROM jobs WHERE job_id = ?",
                (job_id,),
            ).fetchone()
        if row is None:
            return None
        keys = ("job_id", "kind", "state", "phase", "progress", "created", "updated", "payload", "warnings",
                "result", "error")  # fmt: skip
        job = dict(zip(keys, row, strict=True))
        job["payload"] = json.loads(job["payload"])
        job["warnings"] = json.loads(job["warnings"])
        job["result"] = json.loads(job["result"]) if job["result"] else None
        return job

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return dict(rows)

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
        """Fails active jobs that have not been updated for `timeout_seconds`; returns their ids."""
        cutoff = time.time() - timeout_seconds
        with self._lock:
            stale = [
                row[0]
                for row in self._db.execute(
                    "SELECT job_id FROM jobs WHERE state IN ('queued', 'processing') AND updated < ?", (cutoff,)
                )
            ]
        for job_id in stale:
            self.fail(job_id, f"the worker stopped reporting for {timeout_seconds:.0f}s; the job was abandoned")
        return stale

    def prune(self) -> int:
        """Deletes finished jobs older than the retention time or beyond the retention count, with their
        output files; returns how many were removed."""
        cutoff = time.time() - self.keep_finished_seconds
        finished = "state IN ('done', 'error', 'cancelled')"
        with self._lock:
            rows = self._db.execute(
                f"SELECT job_id, result FROM jobs WHERE {finished} AND (updated < ? OR job_id IN (SELECT job_id FROM "
                f"jobs WHERE {finished} ORDER BY updated DESC LIMIT -1 OFFSET ?))",
                (cutoff, self.keep_finished_count),
            ).fetchall()
            self._db.executemany("DELETE FROM jobs WHERE job_id = ?", [(job_id,) for job_id, _ in rows])
        for job_id, result in rows:
            output = (json.loads(result) if result else {}).get("output_path")
            if output and Path(output).stem == job_id:  # only files this service named after the job
                Path(output).unlink(missing_ok=True)
        return len(rows)


def job_actor_name(database: str) -> str:
    """One actor per database file and store interface, so two apps on one cluster never share a store."""
    digest = hashlib.sha1(str(Path(database).resolve()).encode()).hexdigest()[:10]
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
