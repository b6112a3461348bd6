"""The job store's transitions, durability and retention, without Ray."""

import time

from deployments.jobs import JobStore


def test_transitions_progress_never_goes_back_and_terminal_states_stick(tmp_path):
    store = JobStore(str(tmp_path / "jobs.sqlite3"))
    store.create("a", "txt2img", {"prompt": "x"}, ["w1"])
    assert store.get("a")["state"] == "queued"
    store.start("a")
    store.progress("a", 50, "generation")
    store.progress("a", 20, "generation")
    assert store.get("a")["progress"] == 50
    store.complete("a", {"seed": 1})
    assert not store.fail("a", "late failure")  # a finished job stays finished
    job = store.get("a")
    assert (job["state"], job["progress"], job["result"], job["warnings"]) == ("done", 100.0, {"seed": 1}, ["w1"])
    assert store.get("missing") is None


def test_records_survive_reopening(tmp_path):
    database = str(tmp_path / "jobs.sqlite3")
    JobStore(database).create("a", "txt2img", {"prompt": "x"}, [])
    JobStore(database).complete("a", {"image": "abc"})
    assert JobStore(database).get("a")["result"] == {"image": "abc"}


def test_stale_jobs_are_failed_and_old_ones_pruned(tmp_path):
    store = JobStore(str(tmp_path / "jobs.sqlite3"), keep_finished_seconds=3600, keep_finished_count=2)
    store.create("stale", "txt2img", {}, [])
    time.sleep(0.05)
    assert store.reap_stale(0.01) == ["stale"]
    assert "stopped reporting" in store.get("stale")["error"]
    for job_id in ("b", "c", "d"):
        store.create(job_id, "txt2img", {}, [])
        store.complete(job_id, {})
    store.prune()
    assert store.counts() == {"done": 2}
