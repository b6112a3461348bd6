"""The job store's two databases behind one small interface, and the schema's versioned migrations.

- SQLite (the embedded default): a file on one node. WAL and its locks let every process of that node use it.
- PostgreSQL (`postgresql://...`): a server every node reaches, so no record depends on a node.

`JobStore` writes its SQL once, in the dialect both accept (`?` parameters, `RETURNING`, `ON CONFLICT`); the
few differences are named here (`greatest`, `json_int`, the float type). Write transactions are serialized the
same way on both (SQLite's BEGIN IMMEDIATE, a PostgreSQL advisory lock), so a check and the write after it are
atomic across every process that uses the store. No Ray here: the store is testable in one process.
"""

import contextlib
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

from pipelines.schemas import JobState

TERMINAL_STATES = (JobState.done, JobState.error, JobState.cancelled)  # a job in one of these has ended
ACTIVE_JOBS = f"state NOT IN ({', '.join(repr(state.value) for state in TERMINAL_STATES)})"  # SQL condition
# Each step brings an older database to the next version; a database is never read by code older than it.
# `{real}` is the dialect's 64-bit float. A column an older release already added is not added again.
MIGRATIONS: list[tuple[str, ...]] = [
    # 1: the first release: jobs, the store's identity
    ("CREATE TABLE IF NOT EXISTS jobs (job_id TEXT PRIMARY KEY, kind TEXT NOT NULL, state TEXT NOT NULL, "
     "phase TEXT NOT NULL, progress {real} NOT NULL, created {real} NOT NULL, updated {real} NOT NULL, "
     "payload TEXT NOT NULL, warnings TEXT NOT NULL, result TEXT, error TEXT)",
     "CREATE INDEX IF NOT EXISTS jobs_state_updated ON jobs (state, updated)"),
    # 2: batching: a job's model family (admission counts per family) and the batch it ran in
    ("ALTER TABLE jobs ADD COLUMN family TEXT NOT NULL DEFAULT ''",
     "ALTER TABLE jobs ADD COLUMN batch_size INTEGER",
     "CREATE INDEX IF NOT EXISTS jobs_family_state ON jobs (family, state)"),
    # 3: the A1111 API: which API took a job and who sent it; settings every replica shares
    ("ALTER TABLE jobs ADD COLUMN origin TEXT NOT NULL DEFAULT ''",
     "ALTER TABLE jobs ADD COLUMN owner TEXT NOT NULL DEFAULT ''",
     "CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)"),
    # 4: no lost job: attempts (dispatches) and the lease of whoever holds an active job. Jobs active at the
    # upgrade may still be running on the older release's replicas (which do not renew leases): they get a
    # minute before anyone may take them over.
    ("ALTER TABLE jobs ADD COLUMN attempts INTEGER NOT NULL DEFAULT 1",
     "ALTER TABLE jobs ADD COLUMN lease_until {real} NOT NULL DEFAULT 0",
     "UPDATE jobs SET lease_until = {now} + 60 WHERE {active}"),
    # 5: live previews (a small JPEG of the image so far) and the outcome of a job's webhook
    ("ALTER TABLE jobs ADD COLUMN preview TEXT",
     "ALTER TABLE jobs ADD COLUMN webhook TEXT"),
    # 6: the webhook's delivery state (pending, delivering, delivered, failed), so an ended job's delivery is
    # claimed by one replica (under the job's lease, free once the job has ended) and again if it is lost
    ("ALTER TABLE jobs ADD COLUMN webhook_state TEXT",
     "CREATE INDEX IF NOT EXISTS jobs_webhook_state ON jobs (webhook_state)"),
    # 7: tenant safety: when a job first started (retention removes a key's never-started cancelled jobs
    # first; older rows: every ended job that made progress counts as started), where its input images are
    # stored (in the output storage, not in the record), retention counted per owner, and its timer shared
    ("ALTER TABLE jobs ADD COLUMN started {real}",
     "UPDATE jobs SET started = created WHERE state <> 'queued' AND NOT (state = 'cancelled' AND progress = 0)",
     "ALTER TABLE jobs ADD COLUMN inputs TEXT",
     "CREATE INDEX IF NOT EXISTS jobs_owner_state ON jobs (owner, state, updated)",
     "INSERT INTO meta (key, value) VALUES ('last_prune', '0') ON CONFLICT (key) DO NOTHING"),
    # 8: submissions that can be retried safely: an owner's Idempotency-Key names its job for a day
    ("CREATE TABLE IF NOT EXISTS idempotency (owner TEXT NOT NULL, idem_key TEXT NOT NULL, "
     "request_hash TEXT NOT NULL, job_id TEXT NOT NULL, created {real} NOT NULL, PRIMARY KEY (owner, idem_key))",
     "CREATE INDEX IF NOT EXISTS idempotency_created ON idempotency (created)"),
    # 9: many callers: jobs wait in the store's fair queue until a generator has room (`dispatched` is when one
    # was claimed for a generator; jobs active at the upgrade count as dispatched), with their images, priority
    # and batch key; each key's last turn per family (round-robin), its request bucket (requests_per_minute),
    # and the generator replicas' room, which they renew every few seconds
    ("ALTER TABLE jobs ADD COLUMN images INTEGER NOT NULL DEFAULT 1",
     "ALTER TABLE jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0",
     "ALTER TABLE jobs ADD COLUMN batch_key TEXT NOT NULL DEFAULT ''",
     "ALTER TABLE jobs ADD COLUMN dispatched {real}",
     "UPDATE jobs SET dispatched = updated WHERE {active}",
     "CREATE INDEX IF NOT EXISTS jobs_family_dispatched ON jobs (family, state, dispatched)",
     "CREATE TABLE IF NOT EXISTS queue_turns (family TEXT NOT NULL, owner TEXT NOT NULL, served {real} NOT NULL, "
     "PRIMARY KEY (family, owner))",
     "CREATE TABLE IF NOT EXISTS request_buckets (owner TEXT PRIMARY KEY, tokens {real} NOT NULL, "
     "updated {real} NOT NULL)",
     "CREATE TABLE IF NOT EXISTS generator_room (replica TEXT PRIMARY KEY, family TEXT NOT NULL, "
     "slots INTEGER NOT NULL, seen {real} NOT NULL)"),
]  # fmt: skip
SCHEMA_VERSION = len(MIGRATIONS)
CHANGES_CHANNEL = "diffusion_api_jobs"  # PostgreSQL's NOTIFY channel of job changes (payload: job ids)
NOTIFY_IDS_PER_PAYLOAD = 200  # 200 x 33 bytes: under the 8000-byte payload limit
POSTGRES_INSTALL_HINT = "pip install 'diffusion-api[postgres]' (psycopg 3)"


class SchemaError(RuntimeError):
    """The database was written by a newer release: reading it with this one could misread it."""


def is_postgres_url(location: str) -> bool:
    return location.startswith(("postgresql://", "postgres://"))


def _passwords(location: str) -> list[str]:
    """The password(s) a PostgreSQL URL carries: in its user part (`user:password@`, up to the last `@`, so an
    unencoded `@` in it is covered) or as a `password=` parameter; raw and percent-decoded."""
    parts = urlsplit(location)
    user_part = parts.netloc.rpartition("@")[0]
    found = [user_part.partition(":")[2]] if ":" in user_part else []
    found += re.findall(r"(?:^|&)password=([^&]*)", parts.query)
    return [variant for password in found if password for variant in dict.fromkeys((password, unquote(password)))]


def redact(text: str, location: str) -> str:
    """`text` (a message that may quote the URL or a part of it) without the store's password."""
    if not is_postgres_url(location):
        return text
    for password in sorted(_passwords(location), key=len, reverse=True):
        text = text.replace(password, "***")
    return text


def describe(location: str) -> str:
    """A store's location for logs, messages and /health: a URL without its password."""
    return redact(location, location)


def database_errors() -> tuple[type[Exception], ...]:
    """The exceptions a failing database raises (PostgreSQL's only where its driver is installed)."""
    try:
        import psycopg
    except ImportError:
        return (sqlite3.Error,)
    return (sqlite3.Error, psycopg.Error)


class SqliteDatabase:
    real = "REAL"
    greatest = "MAX"

    def __init__(self, path: str):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # Progress, starts and heartbeats are written without waiting for the disk (they survive a crash of
        # this process, not a power cut); the transitions a client relies on (accepted, done, failed,
        # cancelled) are written `durable`, which syncs the log and everything before it.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._lock = threading.Lock()
        self._own_changes = 0

    @staticmethod
    def json_int(column: str, key: str) -> str:
        return f"json_extract({column}, '$.{key}')"

    def announce(self, job_ids: list[str]) -> None:
        """Counts a change this connection made to jobs' summaries (other connections' show in data_version)."""
        with self._lock:
            self._own_changes += 1

    def change_marker(self) -> tuple[int, int]:
        """A value that differs once any process has committed a change to the file (SQLite's
        `PRAGMA data_version`, which counts other connections' commits) or this one announced one: the cheap
        check that tells a watcher when reading its jobs is worth it."""
        with self._lock:
            (version,) = self._db.execute("PRAGMA data_version").fetchone()
            return version, self._own_changes

    def execute(self, sql: str, parameters=(), durable: bool = False) -> list[tuple]:
        """Runs one statement; returns its rows (read before the transaction ends, as SQLite requires)."""
        if durable:
            with self.transaction(durable=True) as transaction:
                return transaction.execute(sql, parameters)
        with self._lock:
            return self._db.execute(sql, parameters).fetchall()

    def executemany(self, sql: str, rows: list[tuple]) -> None:
        with self._lock:
            self._db.executemany(sql, rows)

    @contextlib.contextmanager
    def transaction(self, durable: bool = False) -> Iterator["Transaction"]:
        """One write transaction, taken at once (BEGIN IMMEDIATE: the file's write lock)."""
        with self._lock:
            if durable:
                self._db.execute("PRAGMA synchronous=FULL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield Transaction(lambda sql, parameters=(): self._db.execute(sql, parameters).fetchall())
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
            finally:
                if durable:
                    self._db.execute("PRAGMA synchronous=NORMAL")

    def columns(self, transaction: "Transaction", table: str) -> set[str]:
        return {row[1] for row in transaction.execute(f"PRAGMA table_info({table})")}


class PostgresDatabase:
    real = "DOUBLE PRECISION"
    greatest = "GREATEST"
    # Every write transaction of every process takes this transaction-level lock first (the SQLite file's
    # write lock, here): the store's transactions are short, and a count-then-insert stays exact.
    LOCK_KEY = 0x6A6F6273  # "jobs"

    def __init__(self, url: str):
        try:
            import psycopg
        except ImportError as error:
            raise RuntimeError(f"job store {describe(url)} is PostgreSQL: {POSTGRES_INSTALL_HINT}") from error
        self._psycopg = psycopg
        self.url = url
        self._lock = threading.Lock()
        self._connection = None
        with self._lock:
            self._connect()

    def _connect(self):
        """The connection, opened again after the server dropped it (a restart, a failover)."""
        if self._connection is None or self._connection.closed or self._connection.broken:
            # Keepalives and timeouts: a connection that dies silently (a dropped route, a failed-over server)
            # fails a call within about half a minute instead of holding this process's store calls for the
            # kernel's retransmission time (about 15 minutes).
            connection = self._psycopg.connect(
                self.url, autocommit=True, connect_timeout=10, keepalives=1, keepalives_idle=10,
                keepalives_interval=5, keepalives_count=3, tcp_user_timeout=30000,
                options="-c statement_timeout=30000",
            )  # fmt: skip
            # As with SQLite, progress and heartbeats do not wait for the server's disk; `durable` ones do.
            connection.execute("SET synchronous_commit = off")
            self._connection = connection
        return self._connection

    @staticmethod
    def json_int(column: str, key: str) -> str:
        return f"CAST(CAST({column} AS JSON) ->> '{key}' AS INTEGER)"

    def announce(self, job_ids: list[str]) -> None:
        """Tells every listener (deployments/job_changes.py) which jobs' summaries changed: NOTIFY on
        CHANGES_CHANNEL, the ids comma-separated, in chunks under PostgreSQL's 8000-byte payload limit."""
        with self._lock:
            connection = self._connect()
            for start in range(0, len(job_ids), NOTIFY_IDS_PER_PAYLOAD):
                chunk = ",".join(job_ids[start : start + NOTIFY_IDS_PER_PAYLOAD])
                connection.execute("SELECT pg_notify(%s, %s)", (CHANGES_CHANNEL, chunk))

    def change_marker(self) -> None:
        return None  # listeners are told (LISTEN/NOTIFY): nothing to poll

    @staticmethod
    def _sql(sql: str) -> str:
        return sql.replace("?", "%s")  # the store's SQL has no other `?` and no `%`

    def _run(self, connection, sql: str, parameters=()) -> list[tuple]:
        cursor = connection.execute(self._sql(sql), parameters)
        return cursor.fetchall() if cursor.description else []

    def execute(self, sql: str, parameters=(), durable: bool = False) -> list[tuple]:
        if durable:
            with self.transaction(durable=True) as transaction:
                return transaction.execute(sql, parameters)
        with self._lock:
            return self._run(self._connect(), sql, parameters)

    def executemany(self, sql: str, rows: list[tuple]) -> None:
        with self._lock, self._connect().cursor() as cursor:
            cursor.executemany(self._sql(sql), rows)

    @contextlib.contextmanager
    def transaction(self, durable: bool = False) -> Iterator["Transaction"]:
        with self._lock:
            connection = self._connect()
            with connection.transaction():
                connection.execute("SELECT pg_advisory_xact_lock(%s)", (self.LOCK_KEY,))
                if durable:
                    connection.execute("SET LOCAL synchronous_commit = on")
                yield Transaction(lambda sql, parameters=(): self._run(connection, sql, parameters))

    def columns(self, transaction: "Transaction", table: str) -> set[str]:
        query = ("SELECT column_name FROM information_schema.columns "
                 "WHERE table_schema = current_schema() AND table_name = ?")  # fmt: skip
        return {row[0] for row in transaction.execute(query, (table,))}


class Transaction:
    """Statements inside one write transaction (or plain reads, given the database's `execute`): `execute`
    returns the rows, `one` the first or None."""

    def __init__(self, run):
        self._run = run

    def execute(self, sql: str, parameters=()) -> list[tuple]:
        return self._run(sql, parameters)

    def one(self, sql: str, parameters=()) -> tuple | None:
        rows = self.execute(sql, parameters)
        return rows[0] if rows else None


Database = SqliteDatabase | PostgresDatabase


def open_database(location: str) -> Database:
    """The database at `location` (a SQLite path or a postgresql:// URL), its schema brought up to date."""
    database = PostgresDatabase(location) if is_postgres_url(location) else SqliteDatabase(location)
    migrate(database, location)
    return database


def migrate(database: Database, location: str) -> None:
    """Brings the schema to SCHEMA_VERSION, in one transaction (so two processes starting at once migrate it
    once). A database from before versioning is read by its columns; a newer one is refused."""
    with database.transaction(durable=True) as transaction:
        transaction.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        row = transaction.one("SELECT value FROM meta WHERE key = 'schema_version'")
        version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise SchemaError(
                f"the job store {describe(location)} has schema version {version}, newer than this release's "
                f"{SCHEMA_VERSION}: run the release that wrote it (or a newer one)"
            )
        for number, statements in enumerate(MIGRATIONS, start=1):
            if number <= version:
                continue
            for statement in statements:
                statement = statement.format(real=database.real, now=repr(time.time()), active=ACTIVE_JOBS)
                if statement.startswith("ALTER TABLE jobs ADD COLUMN "):
                    column = statement.split()[5]
                    if column in database.columns(transaction, "jobs"):  # added by a release before versioning
                        continue
                transaction.execute(statement)
        if version != SCHEMA_VERSION:
            transaction.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (str(SCHEMA_VERSION),),
            )
