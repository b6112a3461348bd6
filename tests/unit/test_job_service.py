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
from deployments.job_records import JobOrder
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
        self.store, self.lose, self.calls, self.orders = store, lose, [], []
        self.incoming = 0  # submissions the ingress has received and not yet queued
        self.release = asyncio.Event()
        if not hold:
            self.release.set()
        self.generate = self

    def options(self, multiplexed_model_id: str):
        self.model = multiplexed_model_id
        return self

    async def remote(self, order: JobOrder, more_coming: int) -> dict:
        self.calls.append((order.job_id, self.model, more_coming))
        self.orders.append(order)
        if self.lose:
            self.lose -= 1
            raise RayActorError()
        self.store.start_many([order.job_id])
        await self.release.wait()
        # As a replica does: the record names the file (never written here), the answer carries its bytes when
        # the caller will wait for them.
        result = {"seed": order.job.seed, "output_paths": [f"{order.job_id}.png"], "file_type": "png"}
        self.store.complete_many([(order.job_id, result, [])])
        if order.return_images:
            return {"job_id": order.job_id, "images": [b"\x89PNG sent back"]}
        return {"job_id": order.job_id}


@pytest.fixture
def make_service(settings, tmp_path):
    def make(generator_options: dict | None = None, max_queued_jobs: int = 8) -> tuple[JobService, FakeGenerator]:
        store = JobStore(str(tmp_path / "jobs.sqlite3"))
        generator = FakeGenerator(store, **(generator_options or {}))
        for family in ("sd15", "sdxl"):  # as a generator replica does: the room it has for jobs
            store.renew_room(f"fake-{family}", family, 8)
        service = JobService(JobsClient.in_process(store), Libraries.from_settings(settings),
                             JobFiles(OutputStorage(tmp_path / "outputs")), {"sd15": generator, "sdxl": generator},
                             WebhookPolicy(), max_queued_jobs=max_queued_jobs, max_attempts=3,
                             stale_job_timeout_s=600, incoming=lambda: generator.incoming)  # fmt: skip
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
        generator.incoming = 2
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


def test_the_generator_gets_what_the_ingress_prepared_and_a_recovered_job_is_prepared_again(make_service, monkeypatch):
    """Each job is prepared once, at submission: the order handed over holds the LoRA files, the cleaned prompt
    and the seed as decided then (the generator re-resolves nothing). A job nobody holds any more is prepared
    again from its stored request, with the seed fixed at submission; one whose LoRA is gone meanwhile ends
    in error naming it, instead of running without it."""

    from deployments import jobs as jobs_module

    monkeypatch.setattr(jobs_module, "LEASE_S", 0.1)

    async def scenario():
        service, generator = make_service()
        job_id, job = await submitted_and_ended(service, prompt="ink <lora:demo-sd15-peft:0.5>", seed=-1)
        (order,) = generator.orders
        assert order.job_id == job_id and order.job.prompt == "ink" and order.images == 1
        assert [(use.lora.name, use.scale) for use in order.job.loras] == [("demo-sd15-peft", 0.5)]
        assert order.job.seed == job.payload["seed"] >= 0  # the random seed, fixed once
        store = service.jobs._local
        store.renew_room("fake-sd15", "sd15", 0)  # no room: the feeder takes nothing while they are set up
        for orphan_id, prompt in (("orphan-ok", "ink <lora:demo-sd15-peft:0.5>"), ("orphan-gone", "<lora:gone>")):
            store.create(orphan_id, "txt2img", tiny(prompt=prompt, model="Demo SD1.5", seed=11).stored_payload(),
                         [], family="sd15")  # fmt: skip
            store.db.execute("UPDATE jobs SET dispatched = ? WHERE job_id = ?", (time.time(), orphan_id))
            store.start_many([orphan_id])  # dispatched and started by a replica that is then lost
        store.renew_room("fake-sd15", "sd15", 8)
        await asyncio.sleep(0.2)  # their leases lapse: nobody holds them
        for orphan in store.claim_orphans():
            await service.dispatcher.queue_again(orphan)  # back in the queue: the feeder prepares them again
        recovered = await asyncio.wait_for(service.wait_until_ended("orphan-ok"), 5)
        assert recovered.state is JobState.done and recovered.attempts == 2
        assert generator.orders[-1].job_id == "orphan-ok" and generator.orders[-1].job.seed == 11
        assert generator.orders[-1].job.loras[0].lora.name == "demo-sd15-peft"
        gone = await asyncio.wait_for(service.wait_until_ended("orphan-gone"), 5)
        assert gone.state is JobState.error and "cannot dispatch it: unknown LoRA 'gone'" in gone.error

    asyncio.run(scenario())


def test_an_inpainting_order_crosses_to_a_generator_process_whole(make_service):
    """The order travels through Ray's serializer (cloudpickle) to the generator replica: the decoded input
    image and mask, the inpainting plan and the batch key arrive as they were decided."""
    import io

    from PIL import Image
    from ray import cloudpickle

    from pipelines.images import encode_base64
    from pipelines.schemas import Img2ImgRequest

    def png(color) -> str:
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), color).save(buffer, "PNG")
        return encode_base64(buffer.getvalue())

    async def scenario():
        service, generator = make_service()
        request = Img2ImgRequest(prompt="a door", steps=2, width=64, height=64, seed=5, image=png("red"),
                                 mask=png("white"), denoising_strength=0.6)  # fmt: skip
        job_id = await service.submit("img2img", request, "alice")
        await asyncio.wait_for(service.wait_until_ended(job_id), 5)
        (order,) = generator.orders
        arrived = cloudpickle.loads(cloudpickle.dumps(order))
        assert arrived.job.batch_key() == order.job.batch_key() and arrived.job.inpaint is not None
        assert arrived.job.init_image.size == (64, 64) and arrived.job.init_image.getpixel((0, 0))[:3] == (255, 0, 0)

    asyncio.run(scenario())


def test_images_sent_back_by_the_generator_are_answered_without_reading_the_storage(make_service):
    """The A1111 door waits for its images: the generator sends them back with its answer, and the service
    hands them over as they came (the storage, empty here, is not read); once taken they are gone, and a
    second reader gets the storage's answer (the file is missing: said so, not an error)."""
    from pipelines.images import decode_base64_bytes

    async def scenario():
        service, generator = make_service()
        job_id = await service.submit("txt2img", tiny(), "alice", return_images=True)
        job = await asyncio.wait_for(service.wait_until_ended(job_id), 5)
        assert generator.orders[0].return_images is True
        result, missing = await service.images_of(job)
        assert missing == [] and decode_base64_bytes(result["image"]) == b"\x89PNG sent back"
        result, missing = await service.images_of(job)
        assert "images" not in result and len(missing) == 1

    asyncio.run(scenario())


def test_a_submission_retried_with_its_idempotency_key_gets_the_same_job(make_service):
    """The same key and body: the first job again (after it ended too), never a second; at once from two
    connections: one job; another body: 422 naming the header; another caller's key space is its own."""
    from pipelines.errors import IdempotencyKeyReusedError

    async def scenario():
        service, generator = make_service()
        request = tiny(seed=-1)
        first, replayed = await service.submit_once("retry-1", request, "txt2img", request, "alice")
        assert replayed is False
        await asyncio.wait_for(service.wait_until_ended(first), 5)
        assert await service.submit_once("retry-1", tiny(seed=-1), "txt2img", tiny(seed=-1), "alice") == (first, True)
        both = await asyncio.gather(*(service.submit_once("retry-2", tiny(seed=-1), "txt2img", tiny(seed=-1), "alice")
                                      for _ in range(2)))  # fmt: skip
        assert both[0][0] == both[1][0] and sorted(replayed for _, replayed in both) == [False, True]
        other = tiny(seed=-1, prompt="a different lighthouse")
        with pytest.raises(IdempotencyKeyReusedError, match=f"'retry-1' was used for another request.*{first}") as e:
            await service.submit_once("retry-1", other, "txt2img", other, "alice")
        assert e.value.status_code == 422 and e.value.field == "Idempotency-Key"
        bobs, replayed = await service.submit_once("retry-1", tiny(seed=-1), "txt2img", tiny(seed=-1), "bob")
        assert replayed is False and bobs != first
        for job_id in (both[0][0], bobs):
            await asyncio.wait_for(service.wait_until_ended(job_id), 5)
        assert len(generator.orders) == 3  # first, retry-2 once, bob's
        assert sum((await service.counts()).values()) == 3

    asyncio.run(scenario())


def test_jobs_waiting_in_the_queue_at_a_start_are_taken_without_a_submission(make_service):
    """After a restart (or the loss of the ingress replica that queued them), jobs waiting in the queue are
    nobody's: a fresh replica's keeper starts its feeder, which takes them; one of a family this service has no
    generator for ends in error instead of waiting for ever."""

    async def scenario():
        service, generator = make_service()
        store = service.jobs._local
        store.create("waiting", "txt2img", tiny(model="Demo SD1.5").stored_payload(), [], family="sd15")
        store.create("stranger", "txt2img", tiny().stored_payload(), [], family="flux")
        service.keeper.start()  # what Serve's first health check does on a fresh replica
        waited = await asyncio.wait_for(service.wait_until_ended("waiting"), 5)
        assert waited.state is JobState.done and generator.orders[-1].job_id == "waiting"
        stranger = await asyncio.wait_for(service.wait_until_ended("stranger"), 5)
        assert stranger.state is JobState.error and "unknown model family 'flux'" in stranger.error

    asyncio.run(scenario())
