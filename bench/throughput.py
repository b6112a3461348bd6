"""Serving overhead and throughput through HTTP against a running service (run by hand; prints numbers).

Measures, in one run, on the same model, size and steps (the demo SD1.5, 64x64, 8 steps by default):
- P1: client submit->done minus the job's own `generation_time_sec` (p50), polling every `--poll-ms`;
- P1b: HTTP submit->done (p50) / the same job in plain diffusers in this process (p50);
- P2: 8 jobs sent at once vs the same 8 sent one by one (throughput ratio), with clients that poll every
  `--poll-ms` and again with clients that follow each job's event stream (`GET /queue/{id}/events`: no polling);
- throughput at concurrency 1/2/4/8: jobs/s, submit->done p50/p95, batch sizes the service reported.

.venv/bin/python bench/throughput.py [--url http://127.0.0.1:8000] [--results bench/RESULTS.md]
"""

import argparse
import asyncio
import collections
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import httpx

from pipelines.settings import PROJECT_ROOT


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")


class Bench:
    def __init__(self, client: httpx.AsyncClient, model: str, size: int, steps: int, poll_s: float):
        self.client = client
        self.model = model
        self.size = size
        self.steps = steps
        self.poll_s = poll_s
        self.seed = 0

    async def job(self, follow: str = "poll") -> tuple[float, dict]:
        """Submits one job and polls it (or follows its event stream) to its end; returns (submit->done
        seconds, final status)."""
        self.seed += 1
        body = {"prompt": "a lighthouse at dusk", "model": self.model, "steps": self.steps, "width": self.size,
                "height": self.size, "seed": self.seed}  # fmt: skip
        started = time.perf_counter()
        response = await self.client.post("/txt2img", json=body)
        response.raise_for_status()
        job_id = response.json()["job_id"]
        if follow == "events":
            status = await self.final_event(job_id)
        else:
            while True:
                status = (await self.client.get(f"/queue/{job_id}")).json()
                if status["state"] in ("done", "error", "cancelled"):
                    break
                await asyncio.sleep(self.poll_s)
        if status["state"] != "done":
            raise RuntimeError(f"job {job_id} ended {status['state']}: {status.get('error')}")
        return time.perf_counter() - started, status

    async def final_event(self, job_id: str) -> dict:
        """The final status, as the event stream's last event carries it."""
        event = None
        async with self.client.stream("GET", f"/queue/{job_id}/events") as stream:
            async for line in stream.aiter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event in ("done", "error", "cancelled"):
                    return json.loads(line[6:])
        raise RuntimeError(f"job {job_id}: the event stream ended without a final event")

    async def closed_loop(self, clients: int, seconds: float) -> tuple[list[float], collections.Counter, float]:
        latencies: list[float] = []
        batch_sizes: collections.Counter = collections.Counter()
        stop_at = time.perf_counter() + seconds

        async def client_loop() -> None:
            while time.perf_counter() < stop_at:
                elapsed, status = await self.job()
                latencies.append(elapsed)
                batch_sizes[status.get("batch_size")] += 1

        started = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(clients)))
        return latencies, batch_sizes, time.perf_counter() - started


def plain_diffusers_seconds(model_dir: Path, size: int, steps: int, repeats: int) -> tuple[float, int]:
    """The same job in plain diffusers in this process (p50), with torch's default threads and with one thread
    (faster for tiny models on a small, busy machine); the faster of the two is the floor the service is
    compared with. Returns (seconds, threads)."""
    import torch
    from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler

    pipe = DiffusionPipeline.from_pretrained(model_dir, local_files_only=True)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    pipe.set_progress_bar_config(disable=True)
    medians = {}
    for threads in dict.fromkeys([torch.get_num_threads(), 1]):
        torch.set_num_threads(threads)
        times = []
        for seed in range(repeats + 1):
            started = time.perf_counter()
            pipe("a lighthouse at dusk", negative_prompt="", num_inference_steps=steps, guidance_scale=7.0,
                 width=size, height=size, generator=torch.Generator("cpu").manual_seed(seed))  # fmt: skip
            if seed:  # the first call warms up
                times.append(time.perf_counter() - started)
        medians[threads] = statistics.median(times)
    threads = min(medians, key=medians.get)
    return medians[threads], threads


async def run(args) -> list[str]:
    lines = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    async with httpx.AsyncClient(base_url=args.url, timeout=120) as client:
        bench = Bench(client, args.model, args.size, args.steps, args.poll_ms / 1000)
        await bench.job()  # loads the model on a replica
        # P1 / P1b: sequential jobs.
        totals, overheads = [], []
        for _ in range(args.jobs):
            elapsed, status = await bench.job()
            totals.append(elapsed)
            overheads.append(elapsed - status["generation_time_sec"])
        # P2: 8 one by one, then 8 at once (alternating, --rounds), polling and following the event streams.
        p2 = {}
        for follow in ("poll", "events"):
            one_by_one, at_once, at_once_batches = [], [], collections.Counter()
            for _ in range(args.rounds):
                started = time.perf_counter()
                for _ in range(8):
                    await bench.job(follow)
                one_by_one.append(time.perf_counter() - started)
                # Eight open connections first, so the eight jobs really leave at once (not one per handshake).
                await asyncio.gather(*(client.get("/hello") for _ in range(8)))
                started = time.perf_counter()
                results = await asyncio.gather(*(bench.job(follow) for _ in range(8)))
                at_once.append(time.perf_counter() - started)
                at_once_batches.update(status.get("batch_size") for _, status in results)
            p2[follow] = (one_by_one, at_once, at_once_batches)
        levels = []
        for clients in args.concurrency:
            latencies, batch_sizes, wall = await bench.closed_loop(clients, args.seconds)
            levels.append((clients, len(latencies) / wall, latencies, batch_sizes))

    plain, threads = (
        plain_diffusers_seconds(Path(args.model_dir), args.size, args.steps, args.jobs) if args.model_dir else (None, 0)
    )
    say(f"### {datetime.date.today().isoformat()}: {args.model}, {args.size}x{args.size}, {args.steps} steps, "
        f"polling every {args.poll_ms:g} ms, {platform.node()} ({platform.machine()}, "
        f"{__import__('os').cpu_count()} cores)")  # fmt: skip
    say()
    say("| figure | value |")
    say("| --- | --- |")
    p1 = f"{1000 * statistics.median(overheads):.1f} ms (p95 {1000 * percentile(overheads, 0.95):.1f} ms)"
    say(f"| P1: submit->done minus generation_time_sec, p50 ({args.jobs} jobs) | {p1} |")
    say(f"| submit->done, p50 | {1000 * statistics.median(totals):.1f} ms |")
    if plain is not None:
        say(f"| plain diffusers in one process, p50 ({threads} torch thread(s), the faster) | {1000 * plain:.1f} ms |")
        say(f"| P1b: HTTP submit->done / plain diffusers | {statistics.median(totals) / plain:.2f}x |")
    for follow, (one_by_one, at_once, at_once_batches) in p2.items() if args.rounds else ():
        how = f"polling every {args.poll_ms:g} ms" if follow == "poll" else "following the event streams"
        ratio = statistics.median(one_by_one) / statistics.median(at_once)
        sizes = dict(sorted(at_once_batches.items(), key=str))
        say(f"| P2: 8 at once vs 8 one by one, {how} (median of {args.rounds}) | {ratio:.2f}x "
            f"({statistics.median(at_once):.3f} s vs {statistics.median(one_by_one):.3f} s; best "
            f"{min(one_by_one) / min(at_once):.2f}x; batch sizes {sizes}) |")  # fmt: skip
    say()
    if levels:
        say("| concurrency | jobs/s | submit->done p50 | p95 | batch sizes seen (jobs) |")
        say("| --- | --- | --- | --- | --- |")
    for clients, rate, latencies, batch_sizes in levels:
        sizes = dict(sorted(batch_sizes.items(), key=str))
        say(f"| {clients} | {rate:.2f} | {1000 * percentile(latencies, 0.5):.0f} ms | "
            f"{1000 * percentile(latencies, 0.95):.0f} ms | {sizes} |")  # fmt: skip
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="Demo SD1.5")
    parser.add_argument(
        "--model-dir",
        default=str(PROJECT_ROOT / "stable_diffusion" / "models" / "demo-sd15"),
        help="the same model as a diffusers folder, for the plain-diffusers figure ('' to skip)",
    )
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--poll-ms", type=float, default=5.0)
    parser.add_argument("--jobs", type=int, default=30, help="sequential jobs for P1/P1b")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of P2")
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 2, 4, 8])
    parser.add_argument("--seconds", type=float, default=15, help="per concurrency level")
    parser.add_argument("--results", help="append the tables to this Markdown file (e.g. bench/RESULTS.md)")
    args = parser.parse_args()
    lines = asyncio.run(run(args))
    if args.results:
        with open(args.results, "a") as results:
            results.write("\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
