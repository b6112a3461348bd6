"""The OpenAI door against a running service, with the real `openai` SDK (run by hand; prints numbers).

On the same model, size and steps (the demo SD1.5, 64x64, 8 steps by default), measured alternately so a drift
of the machine's speed touches each alike:
- O1: one `images.generate` call (b64_json) vs the same job as one A1111 call (`POST /sdapi/v1/txt2img`), p50
  of each and their difference in ms: what the third door's translation and answer cost;
- O2: `response_format: url` plus fetching the signed link (what Open WebUI does) vs b64_json, p50 difference;
- O3: 4 SDK calls at once vs the same 4 one after the other (each call is a job: they batch and overlap).

.venv/bin/python bench/openai_bench.py [--url http://127.0.0.1:8000] [--results bench/RESULTS.md]
"""

import argparse
import asyncio
import datetime
import platform
import statistics
import time
from pathlib import Path

import httpx
import openai


class Bench:
    def __init__(self, url: str, model: str, size: int, steps: int):
        self.sdk = openai.AsyncOpenAI(base_url=f"{url.rstrip('/')}/v1", api_key="bench", max_retries=0, timeout=600)
        self.http = httpx.AsyncClient(base_url=url, timeout=600)
        self.model, self.size, self.steps = model, size, steps
        self.seed = 0

    def next_seed(self) -> int:
        self.seed += 1
        return self.seed

    async def generate(self, response_format: str = "b64_json") -> float:
        started = time.perf_counter()
        answer = await self.sdk.images.generate(model=self.model, prompt="a lighthouse at dusk",
                                                size=f"{self.size}x{self.size}", response_format=response_format,
                                                extra_body={"steps": self.steps, "seed": self.next_seed()})  # fmt: skip
        if response_format == "url":
            (await self.http.get(answer.data[0].url)).raise_for_status()
        return time.perf_counter() - started

    async def sdapi(self) -> float:
        started = time.perf_counter()
        body = {"prompt": "a lighthouse at dusk", "steps": self.steps, "width": self.size, "height": self.size,
                "seed": self.next_seed(), "override_settings": {"sd_model_checkpoint": self.model}}  # fmt: skip
        (await self.http.post("/sdapi/v1/txt2img", json=body)).raise_for_status()
        return time.perf_counter() - started


async def measure(url: str, model: str, size: int, steps: int, repeats: int) -> dict[str, float]:
    bench = Bench(url, model, size, steps)
    for _ in range(3):  # warm: model loaded, code paths taken
        await bench.generate()
        await bench.sdapi()
    calls, a1111, linked = [], [], []
    for _ in range(repeats):
        calls.append(await bench.generate())
        a1111.append(await bench.sdapi())
        linked.append(await bench.generate("url"))
    started = time.perf_counter()
    for _ in range(4):
        await bench.generate()
    one_by_one = time.perf_counter() - started
    started = time.perf_counter()
    await asyncio.gather(*(bench.generate() for _ in range(4)))
    at_once = time.perf_counter() - started
    await bench.sdk.close()
    await bench.http.aclose()
    return {
        "O1 images.generate p50 s": statistics.median(calls),
        "O1 sdapi txt2img p50 s": statistics.median(a1111),
        "O1 difference (openai - sdapi) ms": 1000 * (statistics.median(calls) - statistics.median(a1111)),
        "O2 url + fetch p50 s": statistics.median(linked),
        "O2 difference (url + fetch - b64_json) ms": 1000 * (statistics.median(linked) - statistics.median(calls)),
        "O3 4 calls one by one s": one_by_one,
        "O3 4 calls at once s": at_once,
        "O3 speed-up": one_by_one / at_once,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="demo-sd15")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--results", help="append the figures to this markdown file")
    args = parser.parse_args()
    figures = asyncio.run(measure(args.url, args.model, args.size, args.steps, args.repeats))
    lines = [f"| {name} | {value:.3f} |" for name, value in figures.items()]
    title = (f"## {datetime.datetime.now():%Y-%m-%d %H:%M} openai_bench: {args.model}, {args.size}x{args.size}, "
             f"{args.steps} steps, {platform.machine()}")  # fmt: skip
    report = "\n".join([title, "", "| figure | value |", "| --- | --- |", *lines, ""])
    print(report)
    if args.results:
        with Path(args.results).open("a") as handle:
            handle.write("\n" + report)


if __name__ == "__main__":
    main()
