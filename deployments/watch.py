"""Waking the requests that wait on jobs (long polls, Server-Sent Events) when a job changes.

The store is shared by every replica and written by the generators, so a change can come from any node. One
loop per ingress replica reads the summaries of every job someone waits on, in one store query, whatever the
number of clients: a waiting client costs an entry in a dict and an event, not a polling loop of its own, and
the loop stops when nobody waits. It reads as soon as it is told of a change (deployments/job_changes.py: the
dispatch of this replica came back, PostgreSQL's NOTIFY, SQLite's data_version) and otherwise every
FALLBACK_INTERVAL_S, or WATCH_INTERVAL_S where the store cannot tell (SQLite through the job actor).
"""

import asyncio
import contextlib
import contextvars
import json
import logging
from collections.abc import AsyncIterator

from deployments.job_changes import MARKER_CHECK_S, MARKER_READ_GAP_S
from deployments.job_records import JobSummary

logger = logging.getLogger("ray.serve")
WATCH_INTERVAL_S = 0.25  # reading the watched jobs when nothing can tell of their changes
FALLBACK_INTERVAL_S = 1.0  # ... and when something can: a notification lost costs at most this
KEEPALIVE_S = 15.0  # an event stream sends a comment this often when nothing else happens


# One Server-Sent Event of `GET /queue/{id}/events` (Open API 3.1: the media type's schema describes each event).
JOB_EVENT_SCHEMA = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"type": "string", "enum": ["progress", "preview", "done", "error", "cancelled"]},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "description": "progress: {job_id, state, phase, progress, batch_size, attempts, eta_s (null until "
            "known)}; preview (jobs that asked for previews): {job_id, progress, image: a small JPEG in base64}; "
            "done, error, cancelled: the job's final status (the fields of GET /queue/{job_id}) without image "
            "bytes, with image_url",
        },
    },
}


def change_key(summary: JobSummary | None, with_preview: bool = False) -> tuple | None:
    """What a waiting client waits to see change: the state, the phase and the progress (and the preview, for
    an event stream of a job with previews)."""
    if summary is None:
        return None
    return summary.state, summary.phase, summary.progress, summary.preview if with_preview else None


def sse_event(event: str, data: dict) -> str:
    """One Server-Sent Event: its name and one line of JSON."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


class JobWatcher:
    def __init__(self, jobs, interval: float = WATCH_INTERVAL_S, fallback_interval: float = FALLBACK_INTERVAL_S):
        self.jobs = jobs
        self.interval = interval
        self.fallback_interval = fallback_interval
        self._listener = None  # PostgreSQL's change announcements (deployments/job_changes.py)
        self._waiting: dict[str, int] = {}  # job id -> requests waiting on it
        self._latest: dict[str, JobSummary] = {}  # job id -> its summary as last read
        self._changed: dict[str, asyncio.Event] = {}  # job id -> set (and replaced) when its summary changes
        self._loop: asyncio.Task | None = None
        self._read_now = asyncio.Event()  # set by `poke`: the loop reads at once instead of after its interval

    @contextlib.asynccontextmanager
    async def watching(self, job_id: str) -> AsyncIterator[None]:
        """While inside, `job_id` is read by the watch loop (started here when it is not running)."""
        self._waiting[job_id] = self._waiting.get(job_id, 0) + 1
        if self._loop is None or self._loop.done():
            self._loop = asyncio.create_task(self._watch(), context=contextvars.Context())
        try:
            yield
        finally:
            self._waiting[job_id] -= 1
            if not self._waiting[job_id]:
                del self._waiting[job_id]
                self._latest.pop(job_id, None)
                self._changed.pop(job_id, None)

    def poke(self, job_id: str) -> None:
        """A job this replica knows has just changed (its dispatch came back: it ended): its watchers learn it
        now. Other replicas' watchers learn it from the store."""
        if job_id in self._waiting:
            self._read_now.set()

    def _announced(self, job_ids: set[str]) -> None:
        if not job_ids.isdisjoint(self._waiting):
            self._read_now.set()

    def close(self) -> None:
        if self._listener is not None:
            self._listener.stop()

    async def next_change(self, job_id: str, seen: JobSummary | None, timeout: float,
                          with_preview: bool = False) -> JobSummary | None:  # fmt: skip
        """The job's summary as soon as its state, phase or progress (or preview) differs from `seen`; None when
        `timeout` seconds pass first. Call it inside `watching(job_id)`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            latest = self._latest.get(job_id)
            if latest is not None and change_key(latest, with_preview) != change_key(seen, with_preview):
                return latest
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            event = self._changed.setdefault(job_id, asyncio.Event())
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except TimeoutError:
                return None

    async def _watch(self) -> None:
        if self._listener is None:
            self._listener = self.jobs.listen(asyncio.get_running_loop(), self._announced)
        while self._waiting:
            marker = await self._change_marker()  # before the read: a change committed after it moves it
            read_at = asyncio.get_running_loop().time()
            try:
                summaries = await self.jobs.summaries(list(self._waiting))
            except Exception:
                logger.warning("reading the watched jobs failed; trying again", exc_info=True)
                summaries = {}
            for job_id, summary in summaries.items():
                if self._latest.get(job_id) != summary and job_id in self._waiting:
                    self._latest[job_id] = summary
                    event = self._changed.pop(job_id, None)
                    if event is not None:
                        event.set()
            await self._until_told_or_due(marker, read_at)
            self._read_now.clear()

    async def _change_marker(self):
        try:
            return await self.jobs.change_marker()
        except Exception:  # the store is out of reach: the fallback reads will say so
            return None

    async def _until_told_or_due(self, marker, read_at: float) -> None:
        """Waits until a change is announced (a poke, NOTIFY) or the store's change marker moves from `marker`
        (read before the last read of the jobs, at `read_at` on the loop's clock), or else the fallback interval
        passes."""
        loop = asyncio.get_running_loop()
        listening = self._listener is not None and self._listener.connected.is_set()
        deadline = loop.time() + (self.fallback_interval if marker is not None or listening else self.interval)
        while (remaining := deadline - loop.time()) > 0:
            step = min(remaining, MARKER_CHECK_S) if marker is not None else remaining
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._read_now.wait(), step)
                return
            if marker is not None and await self._change_marker() != marker:
                # The marker moves at any commit (other jobs' progress, heartbeats): under load, at most one
                # read per MARKER_READ_GAP_S, unless a poke or a notification asks for one sooner.
                gap = read_at + MARKER_READ_GAP_S - loop.time()
                if gap > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._read_now.wait(), gap)
                return
