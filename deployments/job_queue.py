"""The fair queue: jobs wait in the job store until their family's generators have room, and leave it in fair
order, one store transaction at a time, whichever ingress replica asks.

Fair order: round-robin across keys (the key whose job a family took least recently goes next; a key never
served goes first), then, within a key, by the job's `priority` (higher first), then by age. Room: the
generator replicas of a family renew their slots (images they take at once: a batch) in the store every few
seconds; a family's room is its live replicas' slots less the images already dispatched to them. When a family
takes work it takes the batch-compatible jobs of the first job in fair order first (its key's and the next
keys'), so batches still form across keys, then the next jobs in order while room is left.

Also here: each key's own limits at admission (`max_queued_images`, `requests_per_minute`), checked in the
transaction that records the job, so they hold across ingress replicas. Plain SQL on the store's `Database`
(deployments/job_db.py); no Ray.
"""

import heapq
import json
import math
import time
from dataclasses import dataclass

from deployments.job_db import ACTIVE_JOBS, Transaction
from deployments.job_records import ClaimedJob, KeyLimits, QueuePlace, Refusal

ROOM_TTL_S = 10.0  # a generator replica's slots count this long after its last renewal (it renews every 3 s)
THROUGHPUT_WINDOW_S = 300.0  # the family's recent pace (eta_s, Retry-After) is measured over this window
WAITING_SCAN = 2000  # waiting jobs of a family read per claim (the fair order of the first ones is exact)
WAITING = "state = 'queued' AND dispatched IS NULL"  # SQL: in the fair queue, not yet given to a generator
DISPATCHED = f"dispatched IS NOT NULL AND {ACTIVE_JOBS}"  # SQL: given to a generator and not ended


@dataclass(frozen=True)
class Waiting:
    """A job in the fair queue, as the order needs it."""

    job_id: str
    owner: str
    priority: int
    created: float
    images: int
    batch_key: str


def fair_order(waiting: list[Waiting], served: dict[str, float]) -> list[Waiting]:
    """`waiting` in fair order: one job per key in turn, the key least recently served (`served`: key -> when
    the family last took its job; absent: never) first, ties by the key's oldest job; a key's own jobs by
    priority (higher first), then age."""
    queues: dict[str, list[Waiting]] = {}
    for job in sorted(waiting, key=lambda job: (-job.priority, job.created, job.job_id)):
        queues.setdefault(job.owner, []).append(job)
    turns = [(served.get(owner, 0.0), jobs[0].created, owner) for owner, jobs in queues.items()]
    heapq.heapify(turns)
    later = max(served.values(), default=0.0) + 1.0  # a key that just had its turn goes behind every other
    heads = dict.fromkeys(queues, 0)
    order: list[Waiting] = []
    while turns:
        _, oldest, owner = heapq.heappop(turns)
        order.append(queues[owner][heads[owner]])
        heads[owner] += 1
        if heads[owner] < len(queues[owner]):
            heapq.heappush(turns, (later, oldest, owner))
            later += 1.0
    return order


def take_for_room(order: list[Waiting], room: int, dispatched_images: int) -> list[Waiting]:
    """What a family with `room` free images takes from `order`: the first job (alone even if it is larger
    than the room, when nothing is dispatched: it would never fit otherwise; else it waits for room, and so
    does everyone behind it), its batch-mates in order, then the next jobs in order that fit."""
    if not order:
        return []
    first = order[0]
    if first.images > room and dispatched_images > 0:
        return []
    mates = [job for job in order[1:] if job.batch_key == first.batch_key]
    others = [job for job in order[1:] if job.batch_key != first.batch_key]
    taken, used = [first], first.images
    for job in mates + others:
        if used + job.images <= room:
            taken.append(job)
            used += job.images
    return taken


def _waiting(transaction: Transaction, family: str) -> tuple[list[Waiting], dict[str, float]]:
    rows = transaction.execute(
        f"SELECT job_id, owner, priority, created, images, batch_key FROM jobs WHERE family = ? AND {WAITING} "
        f"ORDER BY created LIMIT ?",
        (family, WAITING_SCAN),
    )
    served = dict(transaction.execute("SELECT owner, served FROM queue_turns WHERE family = ?", (family,)))
    return [Waiting(*row) for row in rows], served


def family_room(transaction: Transaction, family: str, now: float | None = None) -> tuple[int, int]:
    """(the family's live slots, the images dispatched to its generators and not ended)."""
    now = time.time() if now is None else now
    ((slots,),) = transaction.execute(
        "SELECT COALESCE(SUM(slots), 0) FROM generator_room WHERE family = ? AND seen >= ?", (family, now - ROOM_TTL_S)
    )
    return int(slots), _images(transaction, family, DISPATCHED)


def _images(transaction: Transaction, family: str, condition: str) -> int:
    """The images of the family's jobs that match `condition` (SQL)."""
    ((images,),) = transaction.execute(
        f"SELECT COALESCE(SUM(images), 0) FROM jobs WHERE family = ? AND {condition}", (family,)
    )
    return int(images)


def _dispatch(transaction: Transaction, family: str, taken: list[Waiting], lease_s: float, now: float) -> list[tuple]:
    """Marks waiting jobs as given to the family's generators (under a lease of `lease_s`) and moves their keys'
    turns, in the order they were served; returns (job_id, kind, payload, inputs) of those still waiting."""
    marks = ", ".join("?" * len(taken))
    rows = transaction.execute(
        f"UPDATE jobs SET dispatched = ?, lease_until = ?, updated = ? WHERE job_id IN ({marks}) AND {WAITING} "
        f"RETURNING job_id, kind, payload, inputs",
        (now, now + lease_s, now, *(job.job_id for job in taken)),
    )
    for step, owner in enumerate(dict.fromkeys(job.owner for job in taken)):
        transaction.execute(
            "INSERT INTO queue_turns (family, owner, served) VALUES (?, ?, ?) "
            "ON CONFLICT (family, owner) DO UPDATE SET served = excluded.served",
            (family, owner, now + step * 1e-6),
        )
    return rows


def claim_next(transaction: Transaction, family: str, lease_s: float) -> list[ClaimedJob] | None:
    """Takes the family's next jobs in fair order, as many as its generators have room for, for the caller to
    dispatch (under a lease of `lease_s`), and moves their keys' turns; None when the family has no generator
    replica up at all (its jobs wait for one to start). One transaction (the store's write lock): two replicas
    asking at once never take the same job or more than the room."""
    now = time.time()
    slots, dispatched = family_room(transaction, family, now)
    if slots <= 0:
        return None
    waiting, served = _waiting(transaction, family)
    taken = take_for_room(fair_order(waiting, served), slots - dispatched, dispatched)
    if not taken:
        return []
    rows = _dispatch(transaction, family, taken, lease_s, now)
    found = {job_id: (kind, payload, inputs) for job_id, kind, payload, inputs in rows}
    return [ClaimedJob(job.job_id, found[job.job_id][0], json.loads(found[job.job_id][1]), family,
                       json.loads(found[job.job_id][2]) if found[job.job_id][2] else {})
            for job in taken if job.job_id in found]  # fmt: skip


def take_at_once(transaction: Transaction, family: str, job: Waiting, lease_s: float, now: float) -> bool:
    """Gives a job that was just recorded straight to its family's generators when no other job waits and they
    have room for it (what `claim_next` would do next, by the same rule), marking it dispatched; False leaves
    it waiting."""
    slots, dispatched = family_room(transaction, family, now)
    if slots <= 0 or not take_for_room([job], slots - dispatched, dispatched):
        return False
    if transaction.one(f"SELECT 1 FROM jobs WHERE family = ? AND {WAITING} AND job_id <> ? LIMIT 1",
                       (family, job.job_id)):  # fmt: skip
        return False
    return bool(_dispatch(transaction, family, [job], lease_s, now))


def images_per_s(transaction: Transaction, family: str, now: float) -> float | None:
    """The family's recent pace: images of jobs done in the last THROUGHPUT_WINDOW_S over the time since the
    first of them started (None: none finished)."""
    row = transaction.one(
        "SELECT COALESCE(SUM(images), 0), MIN(started) FROM jobs WHERE family = ? AND state = 'done' AND updated >= ?",
        (family, now - THROUGHPUT_WINDOW_S),
    )
    if row is None or not row[0] or row[1] is None:
        return None
    return row[0] / max(1.0, now - row[1])


@dataclass(frozen=True)
class QueueView:
    """A family's fair queue as a status reads it: the waiting jobs in fair order (id, images), the family's
    recent pace (images/s) and its generators' room now (0: no replica is up)."""

    order: list[tuple[str, int]]
    images_per_s: float | None
    slots: int

    def place(self, job_id: str) -> QueuePlace:
        """Where the job stands: jobs and images ahead of it (none once it has been given to a generator)."""
        ahead = 0
        for position, (waiting_id, images) in enumerate(self.order):
            if waiting_id == job_id:
                return QueuePlace(position, ahead, self.images_per_s, self.slots)
            ahead += images
        return QueuePlace(0, 0, self.images_per_s, self.slots)


def queue_view(transaction: Transaction, family: str) -> QueueView:
    """The family's fair queue now (plain reads: a status poll never takes the write lock)."""
    now = time.time()
    waiting, served = _waiting(transaction, family)
    slots, _ = family_room(transaction, family, now)
    order = [(job.job_id, job.images) for job in fair_order(waiting, served)]
    return QueueView(order, images_per_s(transaction, family, now), slots)


def renew_room(transaction: Transaction, replica: str, family: str, slots: int) -> None:
    """A generator replica's heartbeat: it takes `slots` images at once (0: it is stopping)."""
    transaction.execute(
        "INSERT INTO generator_room (replica, family, slots, seen) VALUES (?, ?, ?, ?) ON CONFLICT (replica) "
        "DO UPDATE SET family = excluded.family, slots = excluded.slots, seen = excluded.seen",
        (replica, family, slots, time.time()),
    )
    transaction.execute("DELETE FROM generator_room WHERE seen < ?", (time.time() - 3600,))


def family_demand(transaction: Transaction, family: str) -> dict[str, int]:
    """What autoscaling reads: images waiting in the queue and images dispatched (queued on or running in a
    generator) for the family."""
    return {"waiting_images": _images(transaction, family, WAITING),
            "dispatched_images": _images(transaction, family, DISPATCHED)}  # fmt: skip


def over_queued_images(transaction: Transaction, owner: str, limits: KeyLimits, images: int, family: str,
                       now: float) -> Refusal | None:  # fmt: skip
    """The key's `max_queued_images` with one more job of `images` images (None: within it)."""
    if limits.max_queued_images is None:
        return None
    ((queued,),) = transaction.execute(
        f"SELECT COALESCE(SUM(images), 0) FROM jobs WHERE owner = ? AND {ACTIVE_JOBS}", (owner,)
    )
    if queued + images <= limits.max_queued_images:
        return None
    pace = images_per_s(transaction, family, now)
    excess = queued + images - limits.max_queued_images
    wait = math.ceil(excess / pace) if pace else 10
    return Refusal("max_queued_images", limits.max_queued_images, int(queued), max(1, min(wait, 3600)))


def take_request_token(transaction: Transaction, owner: str, limits: KeyLimits, now: float) -> Refusal | None:
    """The key's `requests_per_minute`: a token bucket of that size, refilled at that rate; takes one token
    for a job about to be recorded (None), or says when the next one is there."""
    if limits.requests_per_minute is None:
        return None
    size, rate = float(limits.requests_per_minute), limits.requests_per_minute / 60.0
    row = transaction.one("SELECT tokens, updated FROM request_buckets WHERE owner = ?", (owner,))
    tokens = size if row is None else min(size, row[0] + max(0.0, now - row[1]) * rate)
    if tokens < 1.0:
        return Refusal("requests_per_minute", limits.requests_per_minute, limits.requests_per_minute,
                       max(1, math.ceil((1.0 - tokens) / rate)))  # fmt: skip
    transaction.execute(
        "INSERT INTO request_buckets (owner, tokens, updated) VALUES (?, ?, ?) ON CONFLICT (owner) "
        "DO UPDATE SET tokens = excluded.tokens, updated = excluded.updated",
        (owner, tokens - 1.0, now),
    )
    return None
