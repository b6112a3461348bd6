"""Cross-request batching on a generator replica: jobs that can share one diffusers call run as one batch.

Why not `@serve.batch`: it groups calls by method and multiplexed model id only, so a batch would mix jobs
of different sizes, steps or samplers and would have to be split and run piece by piece inside one call,
which makes jobs wait for each other's unrelated work. Here every job carries its batch key (checkpoint +
`PreparedJob.batch_key()`), and the replica's single runner, each time the device is free, takes the oldest
waiting job and every waiting job with the same key (up to the batch limit). So:
- jobs that arrive while a batch runs form the next batch without any added wait;
- a job that arrives at an idle replica waits for batch-mates only while other jobs are on their way (being
  prepared on this replica, or announced by the ingress that is admitting a burst), and at most `wait_s`
  (0 turns batching off); a lone job never waits;
- jobs with different keys never share a batch, and the oldest job always goes next (first come, first served);
- the images of one request (`batch_size` x `n_iter`, submitted together) share calls even with batching off.

Plain asyncio, no Ray: the generator deployment owns one `JobBatcher` and gives it the function that runs
a batch.
"""

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Waiting:
    key: Hashable
    item: Any
    limit: int  # the largest batch this job may join (it depends on the image size)
    more_coming: int  # how many more jobs its sender was sending when it sent this one (a burst)
    sequence: int  # submissions before it
    group: int  # its `submit_many` call: the images of one request batch together even with batching off
    arrived: float = field(default_factory=time.monotonic)
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class JobBatcher:
    """Gathers submitted items into batches of equal keys and runs them one batch at a time.

    `run_batch(items)` returns one outcome per item, in order; `submit` returns the item's outcome (or raises
    what `run_batch` raised for its whole batch).
    """

    def __init__(self, run_batch: Callable[[list[Any]], Awaitable[list[Any]]], max_batch_size: int = 8,
                 wait_s: float = 0.005):  # fmt: skip
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self._waiting: list[_Waiting] = []
        self._incoming = 0  # jobs on their way (being prepared), announced with `expecting`
        self._submitted = 0
        self._arrival = asyncio.Event()
        self._runner: asyncio.Task | None = None

    def configure(self, max_batch_size: int, wait_s: float) -> None:
        self.max_batch_size = max(1, max_batch_size)
        self.wait_s = max(0.0, wait_s)

    @contextlib.contextmanager
    def expecting(self):
        """Announces a job that is being prepared and will be submitted soon (or fail): a batch that could
        take it waits for it, up to `wait_s`. A replica with nothing on its way starts a lone job at once."""
        self._incoming += 1
        try:
            yield
        finally:
            self._incoming -= 1
            self._arrival.set()

    async def submit(self, key: Hashable, item: Any, limit: int | None = None, more_coming: int = 0) -> Any:
        """Queues `item` under `key`; `limit` caps the size of the batch it may run in (default and upper
        bound: `max_batch_size`); `more_coming`: how many more jobs the sender is sending right now."""
        (outcome,) = await self.submit_many([(key, item)], limit, more_coming)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def submit_many(self, items: list[tuple[Hashable, Any]], limit: int | None = None,
                          more_coming: int = 0) -> list[Any]:  # fmt: skip
        """Queues several (key, item) pairs at once, in order (the images of one request, which batch together
        up to `limit`); returns their outcomes in order, an exception that ended an item's batch in its place."""
        limit = max(1, min(limit or self.max_batch_size, self.max_batch_size))
        queued = []
        group = self._submitted
        for key, item in items:
            queued.append(_Waiting(key, item, limit, more_coming, self._submitted, group))
            self._submitted += 1
        self._waiting.extend(queued)
        self._arrival.set()
        if self._runner is None or self._runner.done():
            self._runner = asyncio.get_running_loop().create_task(self._run_forever())
        # Shielded: a caller that stops waiting (its ingress replica died, say) does not withdraw its items;
        # they run and their outcomes are recorded by `run_batch`, so the job is not lost.
        return await asyncio.shield(asyncio.gather(*(waiting.future for waiting in queued), return_exceptions=True))

    async def _run_forever(self) -> None:
        while self._waiting:
            batch = await self._next_batch()
            if not batch:  # its first job was withdrawn while it waited for batch-mates
                continue
            try:
                outcomes = await self.run_batch([waiting.item for waiting in batch])
            except Exception as error:
                for waiting in batch:
                    if not waiting.future.done():
                        waiting.future.set_exception(error)
                continue
            for waiting, outcome in zip(batch, outcomes, strict=True):
                if not waiting.future.done():
                    waiting.future.set_result(outcome)

    async def _next_batch(self) -> list[_Waiting]:
        """The oldest waiting job and its batch-mates. While more jobs are on their way (being prepared here,
        or announced by the sender of a waiting job: each announcement counts from its own job, so a burst
        that trickles in keeps extending it), it waits for them, up to `wait_s` after the oldest job's
        arrival."""
        first = self._waiting[0]
        deadline = first.arrived + self.wait_s
        while (
            (
                self._incoming > 0
                or self._submitted - 1 < max((w.sequence + w.more_coming for w in self._waiting), default=-1)
            )
            and len(self._mates(first)) < first.limit
            and (remaining := deadline - time.monotonic()) > 0
        ):
            self._arrival.clear()
            try:
                await asyncio.wait_for(self._arrival.wait(), remaining)
            except TimeoutError:
                break
        mates = self._mates(first)
        if self.wait_s <= 0:  # batching off: only the images of one request share a call
            mates = [waiting for waiting in mates if waiting.group == first.group]
        batch = mates[: first.limit]
        for waiting in batch:
            self._waiting.remove(waiting)
        return batch

    def _mates(self, first: _Waiting) -> list[_Waiting]:
        return [waiting for waiting in self._waiting if waiting.key == first.key]
