"""Watchers learn of a job's change from the store as it happens, whichever process wrote it: SQLite's
data_version, PostgreSQL's LISTEN/NOTIFY. The watcher's fallback polling is set to a minute here, so only
the store telling it can explain an answer within seconds."""

import asyncio
import time

from deployments.job_client import JobsClient
from deployments.jobs import JobStore
from deployments.watch import JobWatcher

NEVER_S = 60.0


def test_another_process_s_progress_and_end_wake_the_watcher_at_once(location):
    watcher_side = JobStore(location)  # the ingress replica's connection
    generator_side = JobStore(location)  # another process's: its writes come from another connection
    job_id = f"job-{time.time_ns()}"
    generator_side.create(job_id, "txt2img", {"prompt": "p", "model": "m"}, [], family="sd15")

    async def scenario() -> list[float]:
        watcher = JobWatcher(JobsClient.in_process(watcher_side), interval=NEVER_S, fallback_interval=NEVER_S)
        waited = []
        try:
            async with watcher.watching(job_id):
                seen = await watcher.next_change(job_id, None, 5)  # the first read
                assert seen is not None and seen.state.value == "queued"
                await asyncio.sleep(0.3)  # the loop is waiting for news now
                for write in (lambda: generator_side.start_many([job_id]),
                              lambda: generator_side.progress_many([job_id], 40.0, "generation"),
                              lambda: generator_side.complete_many([(job_id, {"output_path": "x"}, [])])):  # fmt: skip
                    started = time.monotonic()
                    await asyncio.to_thread(write)
                    changed = await watcher.next_change(job_id, seen, 10)
                    waited.append(time.monotonic() - started)
                    assert changed is not None, "the watcher was not told"
                    seen = changed
                assert seen.state.value == "done"
        finally:
            watcher.close()
        return waited

    waited = asyncio.run(scenario())
    backend = "postgresql" if location.startswith("postgres") else "sqlite"
    print(f"{backend}: told after {', '.join(f'{seconds * 1000:.0f} ms' for seconds in waited)}")
    assert max(waited) < 5.0  # not the minute-long fallback
