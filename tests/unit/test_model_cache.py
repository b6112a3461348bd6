"""One model cache per generator replica: the engine's LRU cache owns the pipelines, and Serve's multiplexed
cache, which the replica's model ids for routing come from, holds handles that keep none alive. Run with the
real demo models and the real `@serve.multiplexed` wrapper, without Ray: stand-ins for the replica context
and for the controller client that the wrapper pushes the replica's model ids to. Also the replica's health
check, with stand-ins for a lost and a hung GPU."""

import asyncio
import gc
import threading
import time
import weakref
from types import SimpleNamespace

import pytest
import ray.serve.context
import ray.serve.multiplex

import deployments.generators as generators
from deployments.generators import MODELS_PER_REPLICA, SD15Generator
from pipelines.generate import ImageEngine

A, B, C = "demo-sd15", "demo-sd15-single", "demo-sd15-inpainting"


def alive(pipelines: dict[str, weakref.ref]) -> list[str]:
    gc.collect()
    return sorted(name for name, pipe in pipelines.items() if pipe() is not None)


@pytest.fixture
def routing(monkeypatch) -> list[list[str]]:
    """What a Serve replica has around it: its replica context, and the controller client that Serve's
    multiplexed cache pushes the replica's model ids to (what routing uses). Returns the ids pushed."""
    pushed: list[list[str]] = []
    client = SimpleNamespace(record_request_routing_info=lambda info: pushed.append(sorted(info.multiplexed_model_ids)))
    context = SimpleNamespace(app_name="test", deployment="SD15Generator", replica_id="r1", replica_tag="r1")
    monkeypatch.setattr(ray.serve.context, "_INTERNAL_REPLICA_CONTEXT", context)
    monkeypatch.setattr(ray.serve.multiplex, "_get_global_client", lambda: client)
    return pushed


def generator_on(engine: ImageEngine):
    """An SD1.5 generator replica's model path alone: its engine, without the job store and Serve replica its
    constructor needs."""
    generator = object.__new__(SD15Generator.func_or_class)
    generator.engine = engine
    generator.replica_name = "SD15Generator#test"
    return generator


async def reported(pushed: list[list[str]], expected: list[str]) -> list[str]:
    """The model ids last pushed for routing, once they are `expected` (Serve pushes every 0.1 s)."""
    deadline = time.monotonic() + 5
    while (not pushed or pushed[-1] != expected) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return pushed[-1] if pushed else []


def test_the_engine_keeps_two_pipelines_in_lru_order(catalog):
    engine = ImageEngine(catalog, device="cpu", max_loaded_models=2)
    pipelines = {}
    for name in (A, B, A, C):
        pipelines[name] = weakref.ref(engine.load(name).pipe)
    assert engine.loaded_models() == [A, C]
    assert alive(pipelines) == [A, C]


def test_a_replica_keeps_its_budget_of_pipelines_and_routes_by_what_it_holds(catalog, routing):
    """Serve's cache in front of the engine's: loading A, B, A, C left three pipelines alive on a replica
    budgeted for two (Serve's eviction of B freed nothing, the engine's of A neither) and Serve routing by
    other models than the ones loaded."""
    assert MODELS_PER_REPLICA == 2
    engine = ImageEngine(catalog, device="cpu", max_loaded_models=MODELS_PER_REPLICA)
    generator = generator_on(engine)

    async def load_in_turn() -> tuple[dict[str, weakref.ref], list[str]]:
        pipelines = {}
        for name in (A, B, A, C):
            loaded = await generator._loaded_model(name)
            assert loaded.entry.name == name
            pipelines[name] = weakref.ref(loaded.pipe)
            del loaded  # as a job ends
        return pipelines, await reported(routing, [A, C])

    pipelines, routed = asyncio.run(load_in_turn())
    assert alive(pipelines) == [A, C]
    assert sorted(engine.loaded_models()) == routed == [A, C]


def test_warmed_up_models_are_routed_to_and_a_model_the_engine_let_go_is_loaded_again(catalog, routing):
    engine = ImageEngine(catalog, device="cpu", max_loaded_models=MODELS_PER_REPLICA)
    generator = generator_on(engine)
    engine.load(A)  # the constructor's warm-up, before Serve's cache exists

    async def run() -> tuple[list[str], dict[str, weakref.ref], list[str]]:
        await generator._register(engine.loaded_models())
        warm = await reported(routing, [A])
        engine.load(B)  # outside Serve's cache as well, and A is still in the budget
        engine.load(C)  # the engine lets A go on its own
        again = await generator._loaded_model(A)  # Serve's handle for A finds it gone and loads it again
        pipelines = {A: weakref.ref(again.pipe)}
        del again
        return warm, pipelines, engine.loaded_models()

    warm, pipelines, loaded = asyncio.run(run())
    assert warm == [A]
    assert loaded == [C, A] and alive(pipelines) == [A]  # never more than the budget


def test_the_health_check_runs_the_device_check_on_a_worker_thread(engine, monkeypatch):
    generator = generator_on(engine)
    reports = []
    generator._report = lambda: reports.append(engine.loaded_models())
    asyncio.run(generator.check_health())  # the CPU computes
    assert len(reports) == 1

    class LostGpu:
        """A stand-in for an engine whose GPU is gone: its device check raises, as torch does."""

        def check_health(self) -> None:
            raise RuntimeError("CUDA error: no CUDA-capable device is detected")

    generator.engine = LostGpu()
    with pytest.raises(RuntimeError, match="no CUDA-capable device"):
        asyncio.run(generator.check_health())

    released = threading.Event()

    class HungGpu:
        """A stand-in for a GPU (or worker threads) that no longer answers: the device check never ends."""

        def check_health(self) -> None:
            released.wait(5)

    generator.engine = HungGpu()
    monkeypatch.setattr(generators, "HEALTH_CHECK_TIMEOUT_S", 0.1)

    async def hung() -> None:
        try:
            await generator.check_health()
        finally:
            released.set()

    with pytest.raises(RuntimeError, match="did not end within 0.1 s"):
        asyncio.run(hung())
    assert len(reports) == 1  # an unhealthy replica does not report itself as fine
