"""Load test: N clients submit tiny jobs and poll them for a fixed time against a running service.

Run by hand (e.g. against `make serve`); prints jobs submitted/completed/failed/lost, submit-to-done p50/p95,
HTTP errors by status and the 5xx count. A 429 (back-pressure: the queue is full) is retried after its
Retry-After and counted.

.venv/bin/python bench/load_test.py --clients 8 --seconds 120 [--url http://127.0.0.1:8000] [--api-key KEY]
"""

import argparse
import asyncio
import collections
import time

import httpx

MODELS = ("Demo SD1.5", "Demo SDXL")


class Tally:
    def __init__(self):
        self.submitted = 0
        self.completed = 0
        self.failed: list[str] = []
        self.cancelled = 0
        self.latencies: list[float] = []
        self.statuses: collections.Counter = collections.Counter()
        self.retries_429 = 0
        self.transport_errors = 0
        self.unfinished: list[str] = []


async def one_job(client: httpx.AsyncClient, tally: Tally, index: int, steps: int, size: int, timeout: float):
    body = {"prompt": f"load test {index}", "model": MODELS[index % len(MODELS)], "steps": steps, "width": size,
            "height": size, "seed": index}  # fmt: skip
    started = time.perf_counter()
    while True:
        response = await client.post("/txt2img", json=body)
        tally.statuses[response.status_code] += 1
        if response.status_code != 429:
            break
        tally.retries_429 += 1
        await asyncio.sleep(float(response.headers.get("Retry-After", "1")))
    if response.status_code != 200:
        tally.failed.append(f"submit {response.status_code}: {response.text[:200]}")
        return
    tally.submitted += 1
    job_id = response.json()["job_id"]
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        await asyncio.sleep(0.05)
        poll = await client.get(f"/queue/{job_id}")
        tally.statuses[poll.status_code] += 1
        if poll.status_code != 200:
            continue
        job = poll.json()
        if job["state"] == "done":
            tally.completed += 1
            tally.latencies.append(time.perf_counter() - started)
            return
        if job["state"] == "error":
            tally.failed.append(f"job {job_id}: {job['error']}")
            return
        if job["state"] == "cancelled":
            tally.cancelled += 1
            return
    tally.unfinished.append(job_id)


async def client_loop(url, headers, tally, client_index, stop_at, steps, size, timeout):
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as client:
        index = client_index * 1_000_000
        while time.perf_counter() < stop_at:
            try:
                await one_job(client, tally, index, steps, size, timeout)
            except httpx.HTTPError as error:
                tally.transport_errors += 1
                tally.failed.append(f"transport: {type(error).__name__}: {error}")
            index += 1


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--job-timeout", type=float, default=300, help="a job not done after this is 'lost'")
    parser.add_argument("--api-key")
    args = parser.parse_args()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    tally = Tally()
    started = time.perf_counter()
    stop_at = started + args.seconds
    await asyncio.gather(*(client_loop(args.url, headers, tally, i, stop_at, args.steps, args.size, args.job_timeout)
                           for i in range(args.clients)))  # fmt: skip
    wall = time.perf_counter() - started
    server_errors = sum(count for status, count in tally.statuses.items() if status >= 500)
    print(f"{args.clients} clients, {args.seconds:.0f} s (wall {wall:.0f} s), {args.size} px, {args.steps} steps, "
          f"models {', '.join(MODELS)}")  # fmt: skip
    print(
        f"jobs submitted {tally.submitted}  completed {tally.completed}  failed {len(tally.failed)}  "
        f"cancelled {tally.cancelled}  lost (not finished in {args.job_timeout:.0f} s) {len(tally.unfinished)}"
    )
    print(f"throughput {tally.completed / wall:.2f} jobs/s")
    print(f"submit->done p50 {percentile(tally.latencies, 0.5):.3f} s  p95 {percentile(tally.latencies, 0.95):.3f} s  "
          f"max {max(tally.latencies, default=float('nan')):.3f} s")  # fmt: skip
    print(
        f"HTTP statuses {dict(sorted(tally.statuses.items()))}  5xx {server_errors}  "
        f"429 retried {tally.retries_429}  transport errors {tally.transport_errors}"
    )
    for line in tally.failed[:10]:
        print(f"  failure: {line}")


if __name__ == "__main__":
    asyncio.run(main())
