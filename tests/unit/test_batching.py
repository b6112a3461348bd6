"""Cross-request batching: the replica's JobBatcher (plain asyncio) and the engine's run_batch on the demo
models (every job its own pixels and infotext, per-job cancellation, out-of-memory retried job by job)."""

import asyncio

import numpy as np
import pytest
import torch

from deployments.batching import JobBatcher
from pipelines.errors import JobCancelledError, OutOfMemoryError
from pipelines.generate import GenerationResult
from pipelines.schemas import Txt2ImgRequest

# Batcher ---------------------------------------------------------------------------------------------------


class Recorder:
    """A run_batch that records each batch and holds it until released, so tests decide what overlaps."""

    def __init__(self, hold: bool = False):
        self.batches: list[list] = []
        self.release = asyncio.Event()
        if not hold:
            self.release.set()

    async def __call__(self, items: list) -> list:
        self.batches.append(list(items))
        await self.release.wait()
        return [f"done {item}" for item in items]


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, timeout=10))


def test_jobs_arriving_while_a_batch_runs_form_the_next_batch_by_key_oldest_first():
    async def scenario():
        recorder = Recorder(hold=True)
        batcher = JobBatcher(recorder, max_batch_size=8, wait_s=0.01)
        first = asyncio.create_task(batcher.submit("a", "a1"))
        await asyncio.sleep(0.05)  # a1 runs alone, held
        later = [asyncio.create_task(batcher.submit(key, f"{key}{i}")) for i, key in enumerate("abab", start=2)]
        await asyncio.sleep(0.05)
        recorder.release.set()
        return recorder.batches, await first, await asyncio.gather(*later)

    batches, first, later = run(scenario())
    assert batches == [["a1"], ["a2", "a4"], ["b3", "b5"]]  # same key together, the oldest waiting job's key first
    assert first == "done a1" and later == ["done a2", "done b3", "done a4", "done b5"]


def test_a_lone_job_never_waits_for_the_batch_window():
    async def scenario():
        batcher = JobBatcher(Recorder(), max_batch_size=8, wait_s=30.0)
        return await batcher.submit("a", "only")

    assert run(scenario()) == "done only"  # would time out (10 s) if it waited the 30 s window


def test_a_burst_waits_for_the_jobs_its_sender_announced():
    async def scenario():
        recorder = Recorder()
        batcher = JobBatcher(recorder, max_batch_size=8, wait_s=30.0)
        first = asyncio.create_task(batcher.submit("a", "a1", more_coming=2))
        await asyncio.sleep(0.05)
        assert recorder.batches == []  # waiting for the two announced jobs
        rest = [asyncio.create_task(batcher.submit("a", name)) for name in ("a2", "a3")]
        await asyncio.gather(first, *rest)
        return recorder.batches

    assert run(scenario()) == [["a1", "a2", "a3"]]


def test_a_burst_that_trickles_in_keeps_extending_the_wait_until_its_last_job():
    async def scenario():
        recorder = Recorder()
        batcher = JobBatcher(recorder, max_batch_size=8, wait_s=30.0)
        tasks = []
        for name, announced in (("a1", 1), ("a2", 1), ("a3", 0)):  # each sender knew of one more, then none
            tasks.append(asyncio.create_task(batcher.submit("a", name, more_coming=announced)))
            await asyncio.sleep(0.03)
        await asyncio.gather(*tasks)
        return recorder.batches

    assert run(scenario()) == [["a1", "a2", "a3"]]


def test_jobs_being_prepared_are_waited_for():
    async def scenario():
        recorder = Recorder()
        batcher = JobBatcher(recorder, max_batch_size=8, wait_s=30.0)

        async def prepared_later(name: str):
            with batcher.expecting():
                await asyncio.sleep(0.05)
            return await batcher.submit("a", name)

        late = asyncio.create_task(prepared_later("a2"))
        await asyncio.sleep(0.01)
        first = asyncio.create_task(batcher.submit("a", "a1"))
        await asyncio.gather(first, late)
        return recorder.batches

    assert run(scenario()) == [["a1", "a2"]]


def test_batch_limits_and_a_zero_wait_turns_batching_off():
    async def scenario(wait_s: float, limits: list[int]):
        recorder = Recorder(hold=True)
        batcher = JobBatcher(recorder, max_batch_size=3, wait_s=wait_s)
        blocker = asyncio.create_task(batcher.submit("x", "x0"))
        await asyncio.sleep(0.05)
        jobs = [asyncio.create_task(batcher.submit("a", f"a{i}", limit)) for i, limit in enumerate(limits)]
        await asyncio.sleep(0.05)
        recorder.release.set()
        await asyncio.gather(blocker, *jobs)
        return [len(batch) for batch in recorder.batches[1:]]

    assert run(scenario(0.01, [8, 8, 8, 8, 8])) == [3, 2]  # max_batch_size caps an asked-for limit of 8
    assert run(scenario(0.01, [2, 2, 2])) == [2, 1]  # a pixel-based limit of 2
    assert run(scenario(0.0, [8, 8, 8])) == [1, 1, 1]


def test_a_failed_batch_fails_its_own_jobs_only_and_the_next_batch_runs():
    async def scenario():
        calls = []

        async def flaky(items):
            calls.append(items)
            if "bad" in items:
                raise RuntimeError("broken batch")
            return [f"done {item}" for item in items]

        batcher = JobBatcher(flaky, max_batch_size=8, wait_s=0.0)
        bad = asyncio.create_task(batcher.submit("a", "bad"))
        good = asyncio.create_task(batcher.submit("b", "good"))
        results = await asyncio.gather(bad, good, return_exceptions=True)
        return results

    bad, good = run(scenario())
    assert isinstance(bad, RuntimeError) and good == "done good"


def test_a_waiting_job_whose_caller_stops_waiting_still_runs():
    async def scenario():
        recorder = Recorder(hold=True)
        batcher = JobBatcher(recorder, max_batch_size=8, wait_s=0.0)
        running = asyncio.create_task(batcher.submit("x", "x0"))
        await asyncio.sleep(0.05)
        withdrawn = asyncio.create_task(batcher.submit("a", "a1"))
        await asyncio.sleep(0.01)
        withdrawn.cancel()
        await asyncio.sleep(0.01)
        recorder.release.set()
        await running
        await asyncio.sleep(0.05)
        return recorder.batches

    assert run(scenario()) == [["x0"], ["a1"]]


def test_with_batching_off_the_images_of_one_request_still_share_a_call():
    async def scenario():
        recorder = Recorder(hold=False)
        batcher = JobBatcher(recorder, max_batch_size=8, wait_s=0.0)
        one = asyncio.create_task(batcher.submit_many([("k", "a0"), ("k", "a1"), ("k", "a2")], limit=2))
        other = asyncio.create_task(batcher.submit("k", "b0"))
        await asyncio.gather(one, other)
        return recorder.batches

    assert run(scenario()) == [["a0", "a1"], ["a2"], ["b0"]]


# Engine ----------------------------------------------------------------------------------------------------


def tiny(**fields) -> Txt2ImgRequest:
    return Txt2ImgRequest(**{"prompt": "a red fox in the snow", "steps": 6, "width": 64, "height": 64, **fields})


def pixels(result: GenerationResult) -> np.ndarray:
    return np.asarray(result.image).astype(np.float64)


@pytest.mark.parametrize(
    ("model", "sampler"),
    [("Demo SD1.5", "DPM++ 2M Karras"), ("Demo SD1.5", "Euler a"), ("Demo SD1.5", "DPM++ 2M SDE"),
     ("Demo SD1.5", "DPM++ SDE"), ("Demo SDXL", "Euler")],
)  # fmt: skip
def test_a_batched_job_gets_the_pixels_and_infotext_it_gets_alone(engine, model, sampler):
    requests = [tiny(model=model, sampler_name=sampler, seed=seed, prompt=prompt, negative_prompt=negative)
                for seed, prompt, negative in ((7, "a lighthouse", ""), (8, "a red fox, snow, " * 6, "blurry"),
                                               (9, "", "text"))]  # fmt: skip
    loaded = engine.load(model)
    jobs = [engine.prepare(request, loaded.entry) for request in requests]
    if len({job.batch_key() for job in jobs}) > 1:  # this sampler's noise is not per image: it never batches
        assert sampler == "DPM++ SDE"
        return
    batch = engine.run_batch(loaded, jobs)
    for request, batched in zip(requests, batch, strict=True):
        alone = engine.generate(request)
        assert np.abs(pixels(batched) - pixels(alone)).mean() <= 1.0  # <= 1/255 on average
        assert batched.infotext == alone.infotext and batched.seed == request.seed
        assert (batched.batch_size, alone.batch_size) == (3, 1)


def test_a_cancelled_job_is_discarded_while_its_batch_mates_run_on(engine):
    loaded = engine.load("Demo SD1.5")
    jobs = [engine.prepare(tiny(seed=seed), loaded.entry) for seed in (1, 2, 3)]
    for job, name in zip(jobs, "abc", strict=True):
        job.job_id = name
    seen: list[tuple[list[str], int]] = []

    def progress(group, done, total, phase):
        seen.append(([job.job_id for job in group], done))

    outcomes = engine.run_batch(loaded, jobs, progress, is_cancelled=lambda job: job.job_id == "b" and len(seen) > 1)
    assert isinstance(outcomes[1], JobCancelledError)
    assert seen[-1] == (["a", "b", "c"], 1000)  # the batch ran to its end for a and c
    for outcome, seed in ((outcomes[0], 1), (outcomes[2], 3)):
        assert np.abs(pixels(outcome) - pixels(engine.generate(tiny(seed=seed)))).mean() <= 1.0


def test_a_batch_whose_jobs_are_all_cancelled_stops_at_the_next_step(engine):
    loaded = engine.load("Demo SD1.5")
    jobs = [engine.prepare(tiny(seed=seed, steps=20), loaded.entry) for seed in (1, 2)]
    steps = []
    outcomes = engine.run_batch(loaded, jobs, lambda group, done, total, phase: steps.append(done),
                                is_cancelled=lambda job: len(steps) >= 2)  # fmt: skip
    assert all(isinstance(outcome, JobCancelledError) for outcome in outcomes)
    assert len(steps) == 2  # steps 3..20 never ran


class OutOfMemoryForBatches:
    """Stands in for a GPU that runs out of memory for batches of more than `fits` images (no GPU here): a
    pipeline call that raises what torch raises."""

    def __init__(self, pipe, fits: int):
        self.pipe = pipe
        self.fits = fits

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __setattr__(self, name, value):  # a job sets the pipeline's scheduler: it must reach the real one
        if name in ("pipe", "fits"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.pipe, name, value)

    def __call__(self, *args, **kwargs):
        if len(kwargs.get("prompt") or kwargs.get("prompt_embeds")) > self.fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return self.pipe(*args, **kwargs)


def test_an_out_of_memory_batch_retries_its_jobs_one_by_one(engine, monkeypatch):
    loaded = engine.load("Demo SD1.5")
    expected = [engine.generate(tiny(seed=seed)) for seed in (4, 5)]
    monkeypatch.setattr(loaded, "pipe", OutOfMemoryForBatches(loaded.pipe, fits=1))
    outcomes = engine.run_batch(loaded, [engine.prepare(tiny(seed=seed), loaded.entry) for seed in (4, 5)])
    for outcome, alone in zip(outcomes, expected, strict=True):
        assert isinstance(outcome, GenerationResult) and outcome.batch_size == 1  # each ran alone in the end
        assert np.abs(pixels(outcome) - pixels(alone)).mean() <= 1.0
    monkeypatch.setattr(loaded, "pipe", OutOfMemoryForBatches(loaded.pipe.pipe, fits=0))
    (alone,) = engine.run_batch(loaded, [engine.prepare(tiny(seed=6), loaded.entry)])
    assert isinstance(alone, OutOfMemoryError) and "try a smaller size" in alone.message
