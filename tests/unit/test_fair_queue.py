"""The fair queue and the keys' own limits, on a real store (SQLite and PostgreSQL): round-robin across keys,
priority within a key, room from the generators' renewals, batch-mates taken together, the same order for
two writers, and max_queued_images / requests_per_minute refusals."""

import threading
import time

from deployments.job_queue import Waiting, fair_order, take_for_room
from deployments.job_records import KeyLimits
from deployments.jobs import JobStore


def queue(store: JobStore, owner: str, count: int, family: str = "sd15", priority: int = 0, images: int = 1,
          batch_key: str = "k", prefix: str | None = None) -> list[str]:  # fmt: skip
    ids = []
    for index in range(count):
        job_id = f"{prefix or owner}{index}"
        assert store.create(job_id, "txt2img", {"model": "m"}, [], family, owner=owner, images=images,
                            priority=priority, batch_key=batch_key)  # fmt: skip
        ids.append(job_id)
        time.sleep(0.001)  # distinct ages
    return ids


def ids(claimed) -> list[str]:
    return [job.job_id for job in claimed]


def test_keys_take_turns_least_recently_served_first_then_priority_then_age():
    waiting = [Waiting(f"a{i}", "a", 0, float(i), 1, "k") for i in range(4)] + [
        Waiting("b0", "b", 0, 10.0, 1, "k"), Waiting("b1", "b", 5, 11.0, 1, "k")]  # fmt: skip
    assert [job.job_id for job in fair_order(waiting, {})] == ["a0", "b1", "a1", "b0", "a2", "a3"]
    # a was served last: b goes first, and b's priority-5 job before its older one
    assert [job.job_id for job in fair_order(waiting, {"a": 100.0, "b": 50.0})][:3] == ["b1", "a0", "b0"]


def test_what_a_family_takes_for_its_room():
    order = [Waiting("a0", "a", 0, 0.0, 2, "x"), Waiting("b0", "b", 0, 1.0, 1, "y"), Waiting("a1", "a", 0, 2.0, 2, "x")]
    assert [job.job_id for job in take_for_room(order, 4, 0)] == ["a0", "a1"]  # the first job's batch-mates first
    assert [job.job_id for job in take_for_room(order, 5, 0)] == ["a0", "a1", "b0"]
    big = [Waiting("big", "a", 0, 0.0, 16, "x")]
    assert [job.job_id for job in take_for_room(big, 8, 0)] == ["big"]  # alone when nothing runs: it fits never
    assert take_for_room(big, 8, 2) == []  # else it waits for the room (and everyone behind it does)


def test_no_room_no_dispatch_and_room_lapses_with_its_replica(location, monkeypatch):
    from deployments import job_queue

    store = JobStore(location)
    queue(store, "a", 3)
    assert store.claim_next("sd15") is None  # no generator replica is up: the jobs wait (for autoscaling)
    store.renew_room("SD15Generator#1", "sd15", 2)
    assert ids(store.claim_next("sd15")) == ["a0", "a1"]
    assert store.claim_next("sd15") == []  # its room is taken until they end
    store.complete_many([("a0", {}, [])])
    assert ids(store.claim_next("sd15")) == ["a2"]
    assert store.family_demand("sd15") == {"waiting_images": 0, "dispatched_images": 2}
    monkeypatch.setattr(job_queue, "ROOM_TTL_S", 0.0)
    queue(store, "b", 1)
    assert store.claim_next("sd15") is None  # the replica stopped renewing: its room is gone


def test_a_late_key_is_served_before_the_early_keys_backlog(location):
    """The fairness scenario: key A queues 32 jobs, then key B 2; B's go in the next batch, not after A's 32."""
    store = JobStore(location)
    store.renew_room("SD15Generator#1", "sd15", 8)
    a_jobs = queue(store, "a", 32)
    first = ids(store.claim_next("sd15"))
    assert first == a_jobs[:8]
    b_jobs = queue(store, "b", 2)
    assert store.queue_view("sd15").place("b0").position == 0 and store.queue_view("sd15").place("a8").position == 1
    store.complete_many([(job_id, {}, []) for job_id in first])
    second = ids(store.claim_next("sd15"))
    assert second[:4] == ["b0", "a8", "b1", "a9"] and len(second) == 8  # turns: B, A, B, A, then A's
    assert set(b_jobs) <= set(second)


def test_priority_overtakes_within_a_key_only(location):
    store = JobStore(location)
    store.renew_room("SD15Generator#1", "sd15", 4)
    queue(store, "a", 16)
    queue(store, "a", 1, priority=5, prefix="urgent")
    assert ids(store.claim_next("sd15"))[0] == "urgent0"
    view = store.queue_view("sd15")
    assert view.place("a3").position == 0 and view.place("a15").position == 12
    assert view.place("a15").images_ahead == 12 and view.images_per_s is None  # nothing finished yet


def test_two_writers_never_take_the_same_job_or_more_than_the_room(location):
    first, second = JobStore(location), JobStore(location)
    first.renew_room("SD15Generator#1", "sd15", 6)
    queue(first, "a", 10)
    queue(first, "b", 10)
    taken: list[list[str]] = []

    def claim(store):
        for _ in range(5):
            taken.append(ids(store.claim_next("sd15")))

    threads = [threading.Thread(target=claim, args=(store,)) for store in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = [job_id for claim in taken for job_id in claim]
    assert len(everything) == len(set(everything)) == 6
    assert sorted(everything) == ["a0", "a1", "a2", "b0", "b1", "b2"]  # turns held across the two


def test_a_keys_queued_images_and_request_rate_are_its_own(location, monkeypatch):
    store = JobStore(location)
    limits = KeyLimits(max_queued_images=5)
    assert store.create("a1", "txt2img", {}, [], "sd15", owner="a", images=4, limits=limits)
    refusal = store.create("a2", "txt2img", {}, [], "sd15", owner="a", images=2, limits=limits)
    assert (refusal.limit, refusal.value, refusal.current) == ("max_queued_images", 5, 4) and refusal.retry_after_s >= 1
    assert store.create("b1", "txt2img", {}, [], "sd15", owner="b", images=5, limits=limits)  # another key's own
    store.complete_many([("a1", {}, [])])
    assert store.create("a2", "txt2img", {}, [], "sd15", owner="a", images=2, limits=limits)

    rate = KeyLimits(requests_per_minute=2)
    assert store.create("r1", "txt2img", {}, [], "sd15", owner="r", limits=rate)
    assert store.create("r2", "txt2img", {}, [], "sd15", owner="r", limits=rate)
    refusal = store.create("r3", "txt2img", {}, [], "sd15", owner="r", limits=rate)
    assert refusal.limit == "requests_per_minute" and 1 <= refusal.retry_after_s <= 30  # a token every 30 s
    assert store.get("r3") is None
    assert store.create("s1", "txt2img", {}, [], "sd15", owner="s", limits=rate)  # another key's bucket
    store.db.execute("UPDATE request_buckets SET updated = updated - 30 WHERE owner = 'r'")  # 30 s later
    assert store.create("r3", "txt2img", {}, [], "sd15", owner="r", limits=rate)


def test_a_job_nobody_waits_ahead_of_goes_to_a_generator_with_room_at_once(location):
    from deployments.job_records import TakenAtOnce

    store = JobStore(location)
    assert store.create("x0", "txt2img", {}, [], "sd15", owner="a", take_at_once=True) is True  # no replica up
    store.renew_room("SD15Generator#1", "sd15", 2)
    assert store.create("x1", "txt2img", {}, [], "sd15", owner="b", take_at_once=True) is True  # x0 waits first
    assert ids(store.claim_next("sd15")) == ["x0", "x1"]
    store.complete_many([("x0", {}, []), ("x1", {}, [])])
    assert isinstance(store.create("x2", "txt2img", {}, [], "sd15", owner="a", take_at_once=True), TakenAtOnce)
    assert store.get("x2").dispatched is not None and store.claim_next("sd15") == []
    assert store.create("x3", "txt2img", {}, [], "sd15", owner="a", images=2, take_at_once=True) is True  # no room


def test_a_repeated_create_answers_as_the_first_and_never_counts_the_job_against_itself(location):
    from deployments.job_records import TakenAtOnce

    store = JobStore(location)
    store.renew_room("SD15Generator#1", "sd15", 4)
    limits = KeyLimits(max_queued_images=4, requests_per_minute=2)
    first = store.create("r", "txt2img", {}, [], "sd15", owner="a", images=4, limits=limits, take_at_once=True)
    again = store.create("r", "txt2img", {}, [], "sd15", owner="a", images=4, limits=limits, take_at_once=True)
    assert isinstance(first, TakenAtOnce) and isinstance(again, TakenAtOnce)  # not a Refusal of its own images
    store.complete_many([("r", {}, [])])
    assert store.create("s", "txt2img", {}, [], "sd15", owner="a", limits=limits)  # the repeat took no token
    assert store.create("t", "txt2img", {}, [], "sd15", owner="a", limits=limits).limit == "requests_per_minute"
