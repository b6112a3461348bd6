"""The job service without Ray or HTTP: submission, dispatch and retries, waiting, cancelling and who may see
a job, on a real SQLite store and the demo models' files. The generator deployment's handle is a stand-in
(`FakeGenerator`: it records what a generator replica would record, without running the model), since
Serve's handles exist only on a cluster; the HTTP doors over this service are tested in tests/serve/."""

import asyncio
import time

import pytest
from ray.exceptions import RayActorError

from deployments.dispatch import RETRY_WARNING
from deployments.job_client import JobsClient
from deployments.job_service import JobService, Libraries
from deployments.job_status import JobFiles
from deployments.jobs import JobStore
from deployments.keys import ANONYMOUS, Caller
from deployments.webhooks import WebhookPolicy
from pipelines.errors import JobEndedError, ServiceBusyError, UnknownJobError, UnknownModelError
from pipelines.schemas import JobState, Txt2ImgRequest
from pipelines.storage import OutputStorage

ALICE = Caller(owner="alice", admin=False, keys_on=True)
BOB = Caller(owner="bob", admin=False, keys_on=True)
OPS = Caller(owner="ops", admin=True, keys_on=True)


class FakeGenerator:
    """Stands in for a generator deployment's handle: `generate.remote` records the job done in the store (as
    a replica does) after `lose` lost replicas (RayActorError), or holds it until `release` is set."""

    def __init__(self, store: JobStore, lose: int = 0, hold: bool = False):
        self.store, self.lose, self.calls = store, lose, []
        self.release = asyncio.Event()
        if not hold:
            self.release.set()
        self.generate = self

    def options(self, multiplexed_model_id: str):
        self.model = multiplexed_model_id
        return self

    async def remote(self, job_id: str, kind: str, payload: dict, more_coming: int) -> dict:
        self.calls.append((job_id, payload["model"], more_coming))
        if self.lose:
            self.lose -= 1
            raise RayActorError()
        self.store.start_many([job_id])
        await self.release.wait()
        self.store.complete_many([(job_id, {"seed": payload["seed"], "output_paths": []}, [])])
        return {}


@pytest.fixture
def make_service(settings, tmp_path):
    def make(generator_options: dict | None = None, max_queued_jobs: int = 8) -> tuple[JobService, FakeGenerator]:
        store = JobStore(str(tmp_path / "jobs.sqlite3"))
        generator = FakeGenerator(store, **(generator_options or {}))
        service = JobService(JobsClient.in_process(store), Libraries.from_settings(settings),
                             JobFiles(OutputStorage(tmp_path / "outputs")), {"sd15": generator, "sdxl": generator},
                             WebhookPolicy(), max_queued_jobs=max_queued_jobs, max_attempts=3,
                             stale_job_timeout_s=600)  # fmt: skip
        return service, generator

    return make


def tiny(**fields) -> Txt2ImgRequest:
    return Txt2ImgRequest(**{"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64, "seed": 3, **fields})


async def submitted_and_ended(service: JobService, caller: Caller = ALICE, **fields):
    job_id = await service.submit("txt2img", tiny(**fields), caller.owner, hand_over=lambda: 2)
    return job_id, await asyncio.wait_for(service.wait_until_ended(job_id), 5)


def test_a_job_is_recorded_dispatched_and_done_with_what_was_decided_at_submission(make_service):
    async def scenario():
        service, generator = make_service()
        started = time.perf_counter()
        job_id, job = await submitted_and_ended(service, model="Demo SD1.5")
        elapsed = time.perf_counter() - started
        assert job.state is JobState.done and job.attempts == 1 and job.owner == "alice"
        assert generator.calls == [(job_id, job.payload["model"], 2)]  # the burst the route saw travels along
        assert job.payload["seed"] == 3 and job.payload["model"] == generator.model
        status = await service.status(job_id, ALICE)
        assert status["state"] == "done" and status["image_url"] == f"/queue/{job_id}/image"
        return elapsed

    assert asyncio.run(scenario()) < 2.0  # no sleep on the path: the dispatch wakes the waiter


def test_a_lost_generator_is_retried_until_the_last_attempt(make_service):
    async def scenario():
        service, generator = make_service({"lose": 1})
        _, job = await submitted_and_ended(service)
        assert job.state is JobState.done and job.attempts == 2 and RETRY_WARNING in job.warnings
        service, generator = make_service({"lose": 5})
        _, job = await submitted_and_ended(service)
        assert job.state is JobState.error and "each of its 3 attempt(s)" in job.error
        assert len(generator.calls) == 3

    asyncio.run(scenario())


def test_only_the_owner_and_admins_see_or_cancel_a_job(make_service):
    async def scenario():
        service, generator = make_service({"hold": True})
        job_id = await service.submit("txt2img", tiny(), ALICE.owner)
        for call in (service.status(job_id, BOB), service.cancel(job_id, BOB), service.image(job_id, BOB, 0)):
            with pytest.raises(UnknownJobError, match=f"unknown job_id '{job_id}'"):
                await call
        assert (await service.job(job_id, OPS)).owner == "alice"
        assert [job.job_id for job in await service.active_jobs("", ALICE)] == [job_id]
        assert await service.active_jobs("", BOB) == []
        await service.cancel(job_id, ALICE)
        generator.release.set()
        job = await asyncio.wait_for(service.wait_until_ended(job_id), 5)
        assert job.state is JobState.cancelled  # the generator's late completion does not undo it
        with pytest.raises(JobEndedError, match="already ended"):
            await service.cancel(job_id, ANONYMOUS)

    asyncio.run(scenario())


def test_a_full_queue_refuses_and_bad_requests_leave_no_record(make_service):
    async def scenario():
        service, generator = make_service({"hold": True}, max_queued_jobs=1)
        await service.submit("txt2img", tiny(), "alice")
        with pytest.raises(ServiceBusyError, match="already have 1 jobs"):
            await service.submit("txt2img", tiny(), "bob")
        with pytest.raises(UnknownModelError):
            await service.submit("txt2img", tiny(model="no-such-model"), "bob")
        assert sum((await service.counts()).values()) == 1  # only the accepted job has a record
        generator.release.set()

    asyncio.run(scenario())


def test_event_streams_follow_a_job_to_its_end(make_service):
    async def scenario():
        service, generator = make_service({"hold": True})
        job_id = await service.submit("txt2img", tiny(), "alice")
        events = []

        async def follow():
            async for event in service.events(await service.job(job_id, ALICE)):
                events.append(event)

        follower = asyncio.create_task(follow())
        await asyncio.sleep(0.3)
        generator.release.set()
        await asyncio.wait_for(follower, 5)
        assert events[0].name == "progress" and events[-1].name == "done"
        assert events[-1].data["job_id"] == job_id and "image" not in events[-1].data

    asyncio.run(scenario())
