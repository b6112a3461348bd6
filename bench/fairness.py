"""Fairness of the job queue across API keys, through HTTP against a running service with keys on (run by hand;
prints numbers).

- Scenario F1: key A queues 32 small jobs at once, then key B submits 2. Prints how many of A's jobs were done
  before B's last one (by the jobs' own completion times, `updated` in `GET /queue`), and the same with B's two
  sent under A's key (what first come, first served gives).
- Scenario F3: 16 of a key's jobs at once, then one more of its own at `priority` 5: how many of the 16 were
  done before it (a batch already running is not preempted).
- Scenario F2: 32 jobs at once from 1 key vs the same 32 spread over 4 keys: jobs/s of each (fairness must not
  cost throughput).

Start the service with a keys file of (at least) four plain keys, e.g.
    printf 'k-a\\nk-b\\nk-c\\nk-d\\n' > /tmp/keys.txt && DIFFUSION_API_KEYS_FILE=/tmp/keys.txt make serve
then
    .venv/bin/python bench/fairness.py --keys k-a,k-b,k-c,k-d [--url http://127.0.0.1:8000] [--results bench/RESULTS.md]
"""

import argparse
import asyncio
import time

import httpx


class Fairness:
    def __init__(self, client: httpx.AsyncClient, keys: list[str], body: dict):
        self.client, self.keys, self.body = client, keys, body
        self.seed = 0

    def auth(self, key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    async def submit(self, key: str, **fields) -> str:
        self.seed += 1
        body = {**self.body, "seed": self.seed, **fields}
        answer = await self.client.post("/txt2img", json=body, headers=self.auth(key))
        answer.raise_for_status()
        return answer.json()["job_id"]

    async def submit_many(self, keys: list[str]) -> list[str]:
        return list(await asyncio.gather(*(self.submit(key) for key in keys)))

    async def finished(self, key: str, job_ids: list[str]) -> dict[str, float]:
        """job id -> when it was done (the store's time), once all of `job_ids` of `key` are done."""
        wanted = set(job_ids)
        while True:
            found: dict[str, float] = {}
            cursor = None
            while True:
                params = {"limit": 100, **({"cursor": cursor} if cursor else {})}
                page = (await self.client.get("/queue", params=params, headers=self.auth(key))).json()
                for job in page["jobs"]:
                    if job["job_id"] in wanted:
                        if job["state"] not in ("done", "queued", "processing"):
                            raise RuntimeError(f"job {job['job_id']} ended {job['state']}")
                        if job["state"] == "done":
                            found[job["job_id"]] = job["updated"]
                cursor = page["next_cursor"]
                if not cursor or len(found) == len(wanted):
                    break
            if len(found) == len(wanted):
                return found
            await asyncio.sleep(0.5)

    async def late_key(self, late: str) -> tuple[int, int]:
        """F1: (A's jobs done before B's last, A's jobs done no later than it)."""
        early_key = self.keys[0]
        early = await self.submit_many([early_key] * 32)
        late_ids = await self.submit_many([late] * 2)
        early_done = await self.finished(early_key, early)
        late_done = await self.finished(late, late_ids)
        last = max(late_done.values())
        return sum(t < last for t in early_done.values()), sum(t <= last for t in early_done.values())

    async def priority(self) -> int:
        """F3: how many of the key's 16 jobs were done before its later priority-5 job."""
        key = self.keys[0]
        plain = await self.submit_many([key] * 16)
        urgent = await self.submit(key, priority=5)
        done = await self.finished(key, [*plain, urgent])
        return sum(done[job_id] < done[urgent] for job_id in plain)

    async def throughput(self, keys: list[str]) -> float:
        """F2: jobs/s for 32 jobs sent at once, spread evenly over `keys`."""
        started = time.time()
        spread = [keys[index % len(keys)] for index in range(32)]
        job_ids = await self.submit_many(spread)
        done: dict[str, float] = {}
        for key in keys:
            done.update(
                await self.finished(key, [job_id for job_id, k in zip(job_ids, spread, strict=True) if k == key])
            )
        return 32 / (max(done.values()) - started)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--keys", required=True, help="four API keys, comma-separated")
    parser.add_argument("--model", default="Demo SD1.5")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", help="append the figures to this Markdown file")
    args = parser.parse_args()
    keys = [key.strip() for key in args.keys.split(",") if key.strip()]
    if len(keys) < 4:
        parser.error("--keys needs four keys")
    body = {"prompt": "a lighthouse at dusk", "model": args.model, "steps": args.steps, "width": args.size,
            "height": args.size}  # fmt: skip
    async with httpx.AsyncClient(base_url=args.url, timeout=300, limits=httpx.Limits(max_connections=64)) as client:
        bench = Fairness(client, keys, body)
        await bench.throughput(keys[:1])  # warm: models loaded, pace measured
        lines = [f"{args.model}, {args.size}x{args.size}, {args.steps} steps; {args.repeats} runs each"]
        fair = [await bench.late_key(keys[1]) for _ in range(args.repeats)]
        fcfs = [await bench.late_key(keys[0]) for _ in range(args.repeats)]
        lines.append(f"F1 A's jobs done before B's last (strictly / at the same time or before): "
                     f"{', '.join(f'{a}/{b}' for a, b in fair)} of 32 (must be < 16)")  # fmt: skip
        lines.append(f"F1 same, B's 2 sent under A's key (first come, first served): "
                     f"{', '.join(f'{a}/{b}' for a, b in fcfs)} of 32")  # fmt: skip
        urgent = [await bench.priority() for _ in range(args.repeats)]
        lines.append(f"F3 of 16 waiting jobs, done before the key's later priority-5 job: "
                     f"{', '.join(map(str, urgent))} (must be < 9)")  # fmt: skip
        one = [await bench.throughput(keys[:1]) for _ in range(args.repeats)]
        four = [await bench.throughput(keys[:4]) for _ in range(args.repeats)]
        ratio = (sum(four) / len(four)) / (sum(one) / len(one))
        figures = [", ".join(f"{value:.2f}" for value in run) for run in (one, four)]
        lines.append(f"F2 jobs/s, 32 jobs at once: 1 key {figures[0]}; 4 keys {figures[1]}; 4 keys / 1 key = "
                     f"{ratio:.2f}x (must be >= 0.9)")  # fmt: skip
    print("\n".join(lines))
    if args.results:
        with open(args.results, "a", encoding="utf-8") as results:
            results.write("\n" + "\n".join(f"- {line}" for line in lines) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
