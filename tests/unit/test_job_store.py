"""The job store's transitions, durability, retention and schema, without Ray: every contract test runs on
both backends (a SQLite file and a real PostgreSQL server)."""

import sqlite3
import time

import pytest

from deployments.job_client import same_store
from deployments.job_db import SCHEMA_VERSION, SchemaError
from deployments.job_records import JobSummary, LapsedDelivery
from deployments.jobs import JobStore
from pipelines.families import FAMILIES
from pipelines.schemas import JobState


def test_transitions_progress_never_goes_back_and_terminal_states_stick(location):
    store = JobStore(location)
    store.create("a", "txt2img", {"prompt": "x"}, ["w1"])
    assert store.get("a").state == "queued"
    store.start_many(["a"])
    store.progress_many(["a"], 50, "generation")
    store.progress_many(["a"], 20, "generation")
    assert store.get("a").progress == 50
    store.complete_many([("a", {"seed": 1}, [])])
    assert not store.fail("a", "late failure")  # a finished job stays finished
    job = store.get("a")
    assert (job.state, job.progress, job.result, job.warnings) == ("done", 100.0, {"seed": 1}, ["w1"])
    assert store.get("missing") is None


def test_records_survive_reopening(location):
    JobStore(location).create("a", "txt2img", {"prompt": "x"}, [])
    JobStore(location).complete_many([("a", {"image": "abc"}, [])])
    assert JobStore(location).get("a").result == {"image": "abc"}


def dispatched(store: JobStore, *job_ids: str) -> None:
    """Marks jobs as the fair queue does when it gives them to a generator (tests/unit/test_fair_queue.py
    covers the queue itself)."""
    for job_id in job_ids:
        store.db.execute("UPDATE jobs SET dispatched = ? WHERE job_id = ?", (time.time(), job_id))


def test_stale_jobs_are_failed_and_old_ones_pruned(location):
    store = JobStore(location, keep_finished_seconds=3600, keep_finished_count=2)
    store.create("stale", "txt2img", {}, [])
    dispatched(store, "stale")
    time.sleep(0.05)
    assert store.reap_stale(0.01) == ["stale"]
    assert "stopped reporting" in store.get("stale").error
    for job_id in ("b", "c", "d"):
        store.create(job_id, "txt2img", {}, [])
        store.complete_many([(job_id, {}, [])])
    store.prune()
    assert store.counts() == {"done": 2}


def test_admission_limit_counts_active_jobs_per_family(location):
    store = JobStore(location)
    assert store.create("a", "txt2img", {}, [], "sdxl", max_active=2)
    assert store.create("b", "txt2img", {}, [], "sdxl", max_active=2)
    refusal = store.create("c", "txt2img", {}, [], "sdxl", max_active=2)
    assert (refusal.limit, refusal.value, refusal.current) == ("max_queued_jobs", 2, 2)
    assert store.create("d", "txt2img", {}, [], "sd15", max_active=2)
    store.complete_many([("a", {}, [])])
    assert store.create("c", "txt2img", {}, [], "sdxl", max_active=2)
    assert store.get("c").state == "queued"


def test_queued_jobs_with_a_heartbeat_are_not_reaped(location):
    store = JobStore(location)
    store.create("waiting", "txt2img", {}, [])
    store.create("orphan", "txt2img", {}, [])
    dispatched(store, "waiting", "orphan")
    time.sleep(0.06)
    assert store.touch_queued(["waiting", "unknown"]) == 1
    assert store.reap_stale(0.05) == ["orphan"]
    assert store.get("waiting").state == "queued"


def test_database_of_the_first_version_gains_the_family_column(tmp_path):
    database = tmp_path / "jobs.sqlite3"
    old = sqlite3.connect(database)
    old.execute(
        "CREATE TABLE jobs (job_id TEXT PRIMARY KEY, kind TEXT NOT NULL, state TEXT NOT NULL, phase TEXT NOT NULL,"
        " progress REAL NOT NULL, created REAL NOT NULL, updated REAL NOT NULL, payload TEXT NOT NULL,"
        " warnings TEXT NOT NULL, result TEXT, error TEXT)"
    )
    old.execute("INSERT INTO jobs VALUES ('old', 'txt2img', 'done', 'done', 100, 1, 1, '{}', '[]', '{}', NULL)")
    old.execute("INSERT INTO jobs VALUES ('running', 'txt2img', 'processing', 'generation', 10, 1, 1, '{}', '[]', "
                "NULL, NULL)")  # fmt: skip
    old.commit()
    old.close()
    store = JobStore(str(database), keep_finished_seconds=10**12)
    assert store.claim_orphans() == []  # the older release's replica may still run it: a minute's grace
    assert (store.get("old").state, store.get("old").attempts) == ("done", 1)
    assert store.create("new", "txt2img", {}, [], "sd15", max_active=1)


def test_replica_reports_expire(location, monkeypatch):
    import deployments.jobs as jobs

    store = JobStore(location)
    store.report_replica("SD15Generator#a", {"device": "cpu"})
    assert [r["replica"] for r in store.replica_reports()] == ["SD15Generator#a"]
    monkeypatch.setattr(jobs, "REPLICA_REPORT_TTL_S", -1.0)
    assert store.replica_reports() == []


def test_pruning_removes_output_files_of_pruned_jobs_only(location, tmp_path):
    store = JobStore(location, keep_finished_count=1)
    files = {}
    for job_id in ("old", "new"):
        files[job_id] = tmp_path / f"{job_id}.png"
        files[job_id].write_bytes(b"png")
        store.create(job_id, "txt2img", {}, [])
        store.complete_many([(job_id, {"output_path": str(files[job_id])}, [])])
        time.sleep(0.01)
    assert store.prune() == 1
    assert not files["old"].exists() and files["new"].exists()
    assert store.get("old") is None and store.get("new").state == "done"


def test_cancel_only_active_jobs_and_a_cancelled_job_never_starts(location):
    store = JobStore(location)
    store.create("a", "txt2img", {}, [])
    assert store.cancel("a")
    assert not store.start_many(["a"]) and not store.progress_many(["a"], 50, "generation")
    assert store.get("a").state == "cancelled"
    store.create("b", "txt2img", {}, [])
    store.complete_many([("b", {}, [])])
    assert not store.cancel("b")


def test_a_batch_starts_reports_and_finishes_together_and_a_cancelled_job_stays_cancelled(location):
    store = JobStore(location)
    for job_id in ("a", "b", "c"):
        store.create(job_id, "txt2img", {"prompt": job_id}, ["from submission"])
    store.cancel("b")
    assert store.start_many(["a", "b", "c"], "generation", 3) == ["a", "c"]  # b never starts
    assert store.get("a").batch_size == 3 and store.get("a").state == "processing"
    assert store.progress_many(["a", "b", "c"], 40.0, "generation") == ["a", "c"]
    store.cancel("c")
    assert store.progress_many(["a", "c"], 20.0, "generation") == ["a"]  # the generator learns c was cancelled
    assert store.get("a").progress == 40.0  # never backwards
    done = store.complete_many([("a", {"seed": 1, "batch_size": 1}, ["from the run", "from submission"]),
                                ("c", {"seed": 3}, [])])  # fmt: skip
    assert done == [True, False]
    a, c = store.get("a"), store.get("c")
    assert (a.state, a.result, a.warnings) == ("done", {"seed": 1}, ["from submission", "from the run"])
    assert a.batch_size == 1  # it finally ran alone (an out-of-memory batch retried job by job)
    assert (c.state, c.result) == ("cancelled", None)


def test_active_jobs_fail_and_cancel_durably(location):
    database = location
    store = JobStore(database)
    store.create("a", "txt2img", {}, [])
    store.create("b", "txt2img", {}, [])
    store.start_many(["a"])
    assert store.fail("a", "boom") and store.cancel("b")
    reopened = JobStore(database)
    assert (reopened.get("a").state, reopened.get("a").error) == ("error", "boom")
    assert reopened.get("b").state == "cancelled"


def test_two_writers_share_the_admission_limit(location):
    """Replicas write the database directly (JobsClient): the limit holds across connections."""
    database = location
    first, second = JobStore(database), JobStore(database)
    assert first.create("a", "txt2img", {}, [], "sd15", max_active=2)
    assert second.create("b", "txt2img", {}, [], "sd15", max_active=2)
    assert not first.create("c", "txt2img", {}, [], "sd15", max_active=2)
    assert second.start_many(["a"]) == ["a"] and first.get("a").state == "processing"


def test_a_replica_opens_the_file_only_when_it_is_the_actors_own_database(tmp_path):
    database = str(tmp_path / "jobs.sqlite3")
    store = JobStore(database)
    assert same_store(database, store.store_id())
    assert JobStore(database).store_id() == store.store_id()  # stable across reopening
    other = str(tmp_path / "other.sqlite3")
    JobStore(other)
    assert not same_store(other, store.store_id())  # another node's file at the same path
    assert not same_store(str(tmp_path / "missing.sqlite3"), store.store_id())


def test_retry_requeues_an_active_job_until_its_last_attempt(location):
    store = JobStore(location)
    store.create("r", "txt2img", {"prompt": "x"}, ["first"])
    store.start_many(["r"])
    store.progress_many(["r"], 40.0, "generation")
    assert store.retry("r", "retried", max_attempts=3, cause="ActorDiedError") == 2
    job = store.get("r")
    assert (job.state, job.progress, job.attempts, job.warnings) == ("queued", 0.0, 2, ["first", "retried"])
    assert store.retry("r", "retried", max_attempts=3, cause="ActorDiedError") == 3
    assert store.get("r").warnings == ["first", "retried"]  # said once
    assert store.retry("r", "retried", max_attempts=3, cause="ActorDiedError: gone") is None
    job = store.get("r")
    assert job.state == "error" and "each of its 3 attempt(s) (last: ActorDiedError: gone)" in job.error
    store.create("c", "txt2img", {"prompt": "x"}, [])
    store.cancel("c")
    assert store.retry("c", "retried", max_attempts=3, cause="x") is None  # a cancelled job is never retried
    assert store.get("c").state == "cancelled" and store.get("c").attempts == 1


def test_jobs_nobody_holds_are_claimed_once_and_held_ones_never(location, monkeypatch):
    from deployments import jobs as jobs_module

    monkeypatch.setattr(jobs_module, "LEASE_S", 0.2)
    store = JobStore(location)
    for job_id in ("held", "orphan", "done"):
        store.create(job_id, "txt2img", {"prompt": job_id, "model": "m"}, [], family="sd15")
    dispatched(store, "held", "orphan", "done")
    store.start_many(["orphan"])
    store.complete_many([("done", {"output_path": "x"}, [])])
    time.sleep(0.3)
    assert store.renew_leases(["held", "done"]) == 1  # ended jobs have no lease to renew
    claimed = store.claim_orphans()
    assert [(job.job_id, job.family) for job in claimed] == [("orphan", "sd15")]
    assert store.claim_orphans() == []  # the claim is a lease of its own: nobody else takes it now
    time.sleep(0.3)
    assert {job.job_id for job in store.claim_orphans()} == {"held", "orphan"}
    # A stuck job (held, no progress) is reaped; one still waiting in the queue is nobody's: left alone.
    store.create("lost", "txt2img", {"prompt": "lost"}, [], family="sd15")
    time.sleep(0.3)
    store.renew_leases(["held"])
    assert store.reap_stale(0.0) == ["held"]
    assert store.get("lost").state == "queued"


def test_an_older_schema_is_migrated_in_place_and_a_newer_one_refused(location):
    store = JobStore(location)
    store.create("kept", "txt2img", {"prompt": "x"}, [], family="sd15")
    # Back to version 3 (before attempts and leases), as a database of that release would be.
    store.db.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'", durable=True)
    if location.startswith("postgresql"):
        store.db.execute("ALTER TABLE jobs DROP COLUMN attempts, DROP COLUMN lease_until", durable=True)
    else:
        for column in ("attempts", "lease_until"):
            store.db.execute(f"ALTER TABLE jobs DROP COLUMN {column}", durable=True)
    upgraded = JobStore(location)
    assert upgraded.db.execute("SELECT value FROM meta WHERE key = 'schema_version'") == [(str(SCHEMA_VERSION),)]
    job = upgraded.get("kept")
    assert (job.state, job.payload, job.attempts) == ("queued", {"prompt": "x"}, 1)
    assert upgraded.retry("kept", "retried", max_attempts=3, cause="x") == 2
    upgraded.db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),),
                        durable=True)  # fmt: skip
    with pytest.raises(SchemaError, match=f"schema version {SCHEMA_VERSION + 1}, newer than this release"):
        JobStore(location)


def test_settings_and_active_job_listing_on_both_backends(location):
    store = JobStore(location)
    assert store.get_setting("sd_model_checkpoint") is None
    store.set_setting("sd_model_checkpoint", "a")
    store.set_setting("sd_model_checkpoint", "b")
    assert JobStore(location).get_setting("sd_model_checkpoint") == "b"
    store.create("s", "txt2img", {"steps": 12}, [], origin="sdapi", owner="k1")
    store.create("n", "txt2img", {"steps": 8}, [])
    assert [(j.job_id, j.steps) for j in store.active_jobs("sdapi")] == [("s", 12)]
    assert store.active_jobs("sdapi", owner="k2") == []


def test_a_job_that_progresses_is_not_taken_over_even_with_its_lease_lapsed(location, monkeypatch):
    from deployments import jobs as jobs_module

    monkeypatch.setattr(jobs_module, "LEASE_S", 0.3)
    store = JobStore(location)
    store.create("alive", "txt2img", {}, [], family="sd15")
    dispatched(store, "alive")
    store.start_many(["alive"])
    for _ in range(4):  # its worker reports progress but cannot renew (the store was out of its reach)
        time.sleep(0.12)
        store.progress_many(["alive"], 10, "generation")
    assert store.claim_orphans() == []
    time.sleep(0.35)  # then it stops reporting too: now nobody holds it
    assert [job.job_id for job in store.claim_orphans()] == ["alive"]
    assert store.reap_stale(0.2) == []  # the claim is an update: the new holder has the job


def test_a_repeated_create_records_the_job_once(location):
    store = JobStore(location)
    assert store.create("once", "txt2img", {"prompt": "x"}, [])
    assert store.create("once", "txt2img", {"prompt": "x"}, [])  # the same call again (through the job actor)
    assert store.counts() == {"queued": 1}


def test_store_locations_in_messages_never_show_the_password():
    from deployments.job_db import describe, redact

    assert describe("postgresql://u:s3cr%zzt@db:5432/jobs") == "postgresql://u:***@db:5432/jobs"
    assert describe("postgresql://u@db/jobs?sslmode=require&password=s3cret") == (
        "postgresql://u@db/jobs?sslmode=require&password=***"
    )
    assert describe("postgresql://u:p@ss@db/jobs") == "postgresql://u:***@db/jobs"  # an unencoded @ in it
    assert redact('invalid percent-encoded token: "a@b"', "postgresql://u:a%40b@db/jobs") == (
        'invalid percent-encoded token: "***"'
    )
    assert describe("/var/lib/diffusion/jobs.sqlite3") == "/var/lib/diffusion/jobs.sqlite3"


def test_summaries_read_what_watchers_wait_on_for_many_jobs_at_once(location):
    store = JobStore(location)
    store.create("a", "txt2img", {"prompt": "x"}, [])
    store.create("b", "txt2img", {"prompt": "y"}, [])
    store.start_many(["a"], "generation", 2)
    store.progress_many(["a"], 25.0, "generation")
    assert store.summaries(["a", "b", "missing"]) == {
        "a": JobSummary(JobState.processing, "generation", 25.0, batch_size=2, attempts=1, preview=None),
        "b": JobSummary(JobState.queued, "queued", 0.0, batch_size=None, attempts=1, preview=None),
    }
    assert store.summaries([]) == {}
    store.record_previews({"a": "AAAA", "b": "BBBB"})
    assert store.summaries(["a"])["a"].preview == "AAAA" and store.get("b").preview == "BBBB"
    store.complete_many([("a", {"seed": 1}, [])])
    store.record_previews({"a": "CCCC"})  # a late preview of an ended job is not recorded
    assert store.get("a").preview is None  # ended: its preview is dropped (its image is the result)


def test_a_webhook_delivery_is_claimed_once_and_again_when_its_holder_is_lost(location):
    store = JobStore(location)
    store.create("a", "txt2img", {"prompt": "x", "callback_url": "https://hooks.example/x"}, [])
    store.create("b", "txt2img", {"prompt": "x"}, [])  # no webhook
    assert not store.claim_delivery("a")  # not ended yet
    store.complete_many([("a", {"seed": 1}, [])])
    store.complete_many([("b", {"seed": 1}, [])])
    assert store.claim_delivery("a") and not store.claim_delivery("a") and not store.claim_delivery("b")
    assert store.claim_lapsed_deliveries() == []  # its holder's lease is live
    assert store.renew_deliveries(["a", "b"]) == 1
    store.db.execute("UPDATE jobs SET lease_until = 0 WHERE job_id = 'a'")  # the holder was lost
    assert store.claim_lapsed_deliveries() == [LapsedDelivery("a", "https://hooks.example/x")]
    assert store.claim_lapsed_deliveries() == []  # one claimer only
    store.record_webhook("a", {"attempts": 1, "status": "delivered", "http_status": 200, "error": None})
    store.db.execute("UPDATE jobs SET lease_until = 0 WHERE job_id = 'a'")
    assert store.claim_lapsed_deliveries() == [] and not store.claim_delivery("a")  # delivered: done with


def test_a_job_that_ended_without_its_ingress_gets_its_webhook_from_the_keeper(location):
    store = JobStore(location)
    store.create("c", "txt2img", {"prompt": "x", "callback_url": "https://hooks.example/c"}, [])
    store.fail("c", "the worker stopped reporting")  # failed by the stale reaper, say: nobody delivers it
    store.db.execute("UPDATE jobs SET lease_until = 0 WHERE job_id = 'c'")
    assert store.claim_lapsed_deliveries() == [LapsedDelivery("c", "https://hooks.example/c")]


def test_webhook_outcomes_are_recorded_on_ended_jobs(location):
    store = JobStore(location)
    store.create("a", "txt2img", {"prompt": "x", "callback_url": "https://hooks.example/x"}, [])
    assert store.get("a").webhook is None
    store.complete_many([("a", {"seed": 1}, [])])
    assert store.record_webhook("a", {"attempts": 0, "status": "delivering"})
    outcome = {"attempts": 2, "status": "delivered", "http_status": 200, "error": None}
    assert store.record_webhook("a", outcome)
    assert JobStore(location).get("a").webhook == outcome  # durable: another process reads it
    assert not store.record_webhook("missing", outcome)


def test_job_counts_by_family_feed_the_metrics_endpoint(location):
    from prometheus_client.parser import text_string_to_metric_families

    from deployments.metrics import job_store_metrics

    store = JobStore(location)
    store.create("a", "txt2img", {"prompt": "x"}, [], "sd15", owner="alice", images=4)
    store.create("b", "txt2img", {"prompt": "x"}, [], "sd15", owner="bob", images=2)
    store.create("c", "txt2img", {"prompt": "x"}, [], "sdxl", owner="alice")
    store.complete_many([("a", {"seed": 1}, [])])
    store.cancel("c")
    assert sorted(store.counts_by_family()) == [("sd15", "done", 1), ("sd15", "queued", 1), ("sdxl", "cancelled", 1)]
    jobs, images = text_string_to_metric_families(job_store_metrics(store.usage()).decode())
    assert (jobs.name, images.name, jobs.type) == ("diffusion_api_jobs", "diffusion_api_images", "gauge")
    counted = {(s.labels["family"], s.labels["state"], s.labels["key"]): s.value for s in jobs.samples}
    made = {(s.labels["family"], s.labels["state"], s.labels["key"]): s.value for s in images.samples}
    assert counted[("sd15", "done", "alice")] == 1 and made[("sd15", "done", "alice")] == 4  # images made
    assert counted[("sd15", "queued", "bob")] == 1 and made[("sd15", "queued", "bob")] == 2  # images queued
    assert counted[("sdxl", "cancelled", "alice")] == 1 and counted[("sd15", "queued", "alice")] == 0
    assert len(counted) == len(FAMILIES) * 5 * 2  # every family and state, for each key with jobs


def test_retention_counts_each_owners_jobs_and_drops_never_started_cancellations_first(location, tmp_path):
    store = JobStore(location, keep_finished_count=3)
    for index in range(3):  # bob's results, made first: the oldest in the store
        store.create(f"bob-{index}", "txt2img", {}, [], owner="bob")
        store.start_many([f"bob-{index}"])
        store.complete_many([(f"bob-{index}", {}, [])])
    store.create("alice-done", "txt2img", {}, [], owner="alice")
    store.start_many(["alice-done"])
    store.complete_many([("alice-done", {}, [])])
    store.create("alice-stopped", "txt2img", {}, [], owner="alice")  # started, then cancelled: it ran
    store.start_many(["alice-stopped"])
    store.cancel("alice-stopped")
    for index in range(10):  # then alice submits and cancels ten jobs that never start
        store.create(f"alice-cancelled-{index}", "txt2img", {}, [], owner="alice")
        store.cancel(f"alice-cancelled-{index}")
    assert store.prune() == 9
    kept = {job_id for job_id in ["alice-done", "alice-stopped", *(f"bob-{i}" for i in range(3))]
            if store.get(job_id) is not None}  # fmt: skip
    assert kept == {"alice-done", "alice-stopped", "bob-0", "bob-1", "bob-2"}  # bob's untouched by alice's
    assert [store.get(f"alice-cancelled-{i}") is not None for i in range(10)] == [False] * 9 + [True]


def test_retention_runs_once_per_interval_across_every_store_on_the_database(location, tmp_path):
    first, second = (JobStore(location, keep_finished_count=1, prune_interval_s=60) for _ in range(2))
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for job_id in ("old", "new"):
        image = inputs / f"{job_id}-image.png"
        image.write_bytes(b"png")
        first.create(job_id, "img2img", {}, [], inputs={"image": str(image)})
        first.complete_many([(job_id, {}, [])])
        time.sleep(0.01)
    assert first.prune_if_due() == 1  # the first keeper to ask claims the interval
    assert second.prune_if_due() is None  # another replica's keeper: already done for this interval
    assert first.prune_if_due() is None  # asked again at once: not due
    assert first.get("old") is None and not (inputs / "old-image.png").exists()
    assert (inputs / "new-image.png").exists()
    assert first.get("new").inputs == {"image": str(inputs / "new-image.png")}


def test_an_idempotency_key_names_one_job_per_owner_for_a_day(location, monkeypatch):
    from deployments import jobs as jobs_module
    from deployments.job_records import PriorSubmission

    store = JobStore(location)
    payload = {"prompt": "p", "model": "m"}
    assert store.create("first", "txt2img", payload, [], "sd15", owner="alice", idempotency=("k-1", "h1")) is True
    again = store.create("second", "txt2img", payload, [], "sd15", owner="alice", idempotency=("k-1", "h1"))
    assert again == PriorSubmission("first", "h1") and store.get("second") is None  # nothing recorded twice
    assert store.prior_submission("alice", "k-1") == PriorSubmission("first", "h1")
    assert store.prior_submission("bob", "k-1") is None  # scoped per owner
    assert store.create("bobs", "txt2img", payload, [], "sd15", owner="bob", idempotency=("k-1", "h9")) is True
    monkeypatch.setattr(jobs_module, "IDEMPOTENCY_TTL_S", 0.0)  # a day later: the key is free again
    time.sleep(0.01)
    assert store.prior_submission("alice", "k-1") is None
    assert store.create("third", "txt2img", payload, [], "sd15", owner="alice", idempotency=("k-1", "h2")) is True
    monkeypatch.setattr(jobs_module, "IDEMPOTENCY_TTL_S", 3600.0)
    assert store.prior_submission("alice", "k-1") == PriorSubmission("third", "h2")


def test_a_listing_pages_newest_first_by_owner_and_state(location):
    from deployments.admission import make_cursor, read_cursor

    store = JobStore(location)
    for index in range(5):
        store.create(f"{index:032x}", "txt2img", {"model": "m"}, [], "sd15", owner="alice" if index != 2 else "bob")
        time.sleep(0.002)
    store.complete_many([(f"{0:032x}", {}, [])])
    first = store.list_jobs("alice", None, 2)
    assert [job.job_id[-1] for job in first] == ["4", "3"] and first[0].model == "m" and first[0].owner == "alice"
    cursor = make_cursor(first[-1])
    rest = store.list_jobs("alice", None, 10, read_cursor(cursor))
    assert [job.job_id[-1] for job in rest] == ["1", "0"]  # bob's job is not alice's
    assert [job.job_id[-1] for job in store.list_jobs(None, "done", 10)] == ["0"]
    assert len(store.list_jobs(None, None, 10)) == 5  # an admin's view: every key's
