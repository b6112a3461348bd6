"""The A1111 API and many-image requests through HTTP against a running service (run by hand; prints numbers).

Measures, on the same model, size and steps (the demo SD1.5, 64x64, 8 steps by default):
- S1: a synchronous `POST /sdapi/v1/txt2img` vs the native submit + poll (5 ms) of the same job (p50 seconds);
- S2: 4 A1111 calls at once vs the same 4 one after the other (A1111 itself runs them one at a time);
- S3: one request of `batch_size` 8 vs 8 single-image requests one after the other (seconds for 8 images);
- S4: a native client that submits, follows `/queue/{id}/events` to the final event and fetches the image, vs
  the same job as one A1111 call, measured alternately (p50 of each and their difference in ms).

.venv/bin/python bench/sdapi_bench.py [--url http://127.0.0.1:8000] [--results bench/RESULTS.md]
"""

import argparse
import asyncio
import datetime
import platform
import statistics
import time
from pathlib import Path

import httpx


class Bench:
    def __init__(self, client: httpx.AsyncClient, model: str, size: int, steps: int):
        self.client = client
        self.common = {"prompt": "a lighthouse at dusk", "steps": steps, "width": size, "height": size}
        self.model = model
        self.seed = 0

    def next_seed(self) -> int:
        self.seed += 1
        return self.seed

    async def native(self, batch_size: int = 1) -> float:
        started = time.perf_counter()
        body = {**self.common, "model": self.model, "seed": self.next_seed(), "batch_size": batch_size}
        response = await self.client.post("/txt2img", json=body)
        response.raise_for_status()
        job_id = response.json()["job_id"]
        while (status := (await self.client.get(f"/queue/{job_id}")).json())["state"] not in ("done", "error"):
            await asyncio.sleep(0.005)
        if status["state"] != "done":
            raise RuntimeError(f"job {job_id}: {status['error']}")
        return time.perf_counter() - started

    async def native_events(self) -> float:
        """Submit, follow the event stream to its final event, fetch the image: what an SSE client does."""
        started = time.perf_counter()
        body = {**self.common, "model": self.model, "seed": self.next_seed()}
        response = await self.client.post("/txt2img", json=body)
        response.raise_for_status()
        job_id = response.json()["job_id"]
        async with self.client.stream("GET", f"/queue/{job_id}/events") as stream:
            async for line in stream.aiter_lines():
                if line.startswith("event: ") and line[7:] in ("done", "error", "cancelled"):
                    break
        (await self.client.get(f"/queue/{job_id}/image")).raise_for_status()
        return time.perf_counter() - started

    async def sdapi(self) -> float:
        started = time.perf_counter()
        body = {**self.common, "seed": self.next_seed(), "override_settings": {"sd_model_checkpoint": self.model}}
        response = await self.client.post("/sdapi/v1/txt2img", json=body)
        response.raise_for_status()
        return time.perf_counter() - started


async def measure(url: str, model: str, size: int, steps: int, repeats: int) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        bench = Bench(client, model, size, steps)
        for _ in range(3):  # warm: model loaded, code paths taken
            await bench.native()
            await bench.sdapi()
        native = [await bench.native() for _ in range(repeats)]
        sync = [await bench.sdapi() for _ in range(repeats)]
        started = time.perf_counter()
        for _ in range(4):
            await bench.sdapi()
        sequential_calls = time.perf_counter() - started
        started = time.perf_counter()
        await asyncio.gather(*(bench.sdapi() for _ in range(4)))
        concurrent_calls = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(8):
            await bench.native()
        eight_requests = time.perf_counter() - started
        one_request = await bench.native(batch_size=8)
        events, calls = [], []
        for _ in range(9):  # alternately, so a drift of the machine's speed touches both alike
            events.append(await bench.native_events())
            calls.append(await bench.sdapi())
    return {
        "native submit+poll p50 s": statistics.median(native),
        "sdapi sync call p50 s": statistics.median(sync),
        "4 sdapi calls one by one s": sequential_calls,
        "4 sdapi calls at once s": concurrent_calls,
        "S2 speed-up (one by one / at once)": sequential_calls / concurrent_calls,
        "8 single-image requests s": eight_requests,
        "1 request of batch_size 8 s": one_request,
        "S3 speed-up": eight_requests / one_request,
        "S4 native submit+SSE+image p50 s": statistics.median(events),
        "S4 sdapi sync call p50 s": statistics.median(calls),
        "S4 difference (SSE path - sdapi) ms": 1000 * (statistics.median(events) - statistics.median(calls)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="demo-sd15")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--results", help="append the figures to this markdown file")
    args = parser.parse_args()
    figures = asyncio.run(measure(args.url, args.model, args.size, args.steps, args.repeats))
    lines = [f"| {name} | {value:.3f} |" for name, value in figures.items()]
    title = (f"## {datetime.datetime.now():%Y-%m-%d %H:%M} sdapi_bench: {args.model}, {args.size}x{args.size}, "
             f"{args.steps} steps, {platform.machine()}")  # fmt: skip
    report = "\n".join([title, "", "| figure | value |", "| --- | --- |", *lines, ""])
    print(report)
    if args.results:
        with Path(args.results).open("a") as handle:
            handle.write("\n" + report)


if __name__ == "__main__":
    main()
