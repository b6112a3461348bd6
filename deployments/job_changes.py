"""Being told that jobs changed in the store, from any process: what lets a watcher answer as it happens.

A job's progress and end are written to the store by a generator replica, on any node; the ingress replica
whose client follows the job (an event stream, a long poll, a webhook) must learn it. The replica that
dispatched the job learns its end from the dispatch itself (`JobWatcher.poke`); every other change comes
through the store:

- PostgreSQL: the store NOTIFYs `CHANGES_CHANNEL` with the changed job ids after each write
  (`JobStore._announce`); `PostgresListener` LISTENs on a connection of its own, in a thread.
- SQLite (one host): `PRAGMA data_version` changes whenever another connection commits; a watcher checks it
  every `MARKER_CHECK_S` (a pragma, no table read) and reads its jobs only when it moved (at most once per
  `MARKER_READ_GAP_S`: it moves at every commit, of any job).

Either way, the watcher still reads its jobs every `FALLBACK_INTERVAL_S`: a lost notification (a dropped
listening connection, a replica on another node that reaches SQLite through the job actor) costs latency,
never a missed end.
"""

import asyncio
import logging
import threading
from collections.abc import Callable

from deployments.job_db import CHANGES_CHANNEL

logger = logging.getLogger("ray.serve")
MARKER_CHECK_S = 0.02
MARKER_READ_GAP_S = 0.05  # reads the marker triggers are at least this far apart (it moves at every commit)
LISTEN_RECONNECT_S = 1.0


class PostgresListener:
    """LISTEN on the store's channel in a daemon thread; `on_change(job_ids)` runs on `loop` for each
    notification. It reconnects after a dropped connection (the watcher's polling covers the gap)."""

    def __init__(self, url: str, loop: asyncio.AbstractEventLoop, on_change: Callable[[set[str]], None]):
        self.url = url
        self.loop = loop
        self.on_change = on_change
        self.connected = threading.Event()  # set while a LISTEN connection is open
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="job-changes", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()

    def _listen(self) -> None:
        import psycopg

        failures = 0
        while not self._stopping.is_set():
            try:
                connection = psycopg.connect(self.url, autocommit=True, connect_timeout=10, keepalives=1,
                                             keepalives_idle=10, keepalives_interval=5, keepalives_count=3)  # fmt: skip
                with connection:
                    connection.execute(f"LISTEN {CHANGES_CHANNEL}")
                    self.connected.set()
                    failures = 0
                    while not self._stopping.is_set():
                        for notice in connection.notifies(timeout=1.0):
                            self._tell(set(filter(None, notice.payload.split(","))))
            except _LoopClosed:
                return  # the replica is shutting down
            except Exception:  # a restart, a failover, a network cut: listen again soon
                failures += 1
                if not self._stopping.is_set():  # said once per outage, not every second
                    (logger.warning if failures == 1 else logger.debug)(
                        "listening for job changes failed; reconnecting every %.0fs (the watchers poll meanwhile)",
                        LISTEN_RECONNECT_S, exc_info=failures == 1)  # fmt: skip
            finally:
                self.connected.clear()
            self._stopping.wait(LISTEN_RECONNECT_S)

    def _tell(self, job_ids: set[str]) -> None:
        if self.loop.is_closed():
            raise _LoopClosed
        try:
            self.loop.call_soon_threadsafe(self.on_change, job_ids)
        except RuntimeError as error:  # closed between the check and the call
            raise _LoopClosed from error


class _LoopClosed(Exception):
    """The event loop the listener reports to has closed: the listener stops."""
