"""Submit-to-done latency of tiny jobs against a running service (run by hand; prints numbers).

.venv/bin/python bench/submit_to_done.py [--url http://127.0.0.1:8000] [--jobs 20] [--model "Demo SD1.5"]
"""

import argparse
import statistics
import time

import httpx


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--model", default="Demo SD1.5")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    totals, pipeline = [], []
    with httpx.Client(base_url=args.url, timeout=60) as client:
        for index in range(args.jobs + 1):
            body = {"prompt": "a cat", "model": args.model, "steps": args.steps, "width": args.size,
                    "height": args.size, "seed": index}  # fmt: skip
            started = time.perf_counter()
            job_id = client.post("/txt2img", json=body).raise_for_status().json()["job_id"]
            while (job := client.get(f"/queue/{job_id}").json())["state"] not in ("done", "error"):
                time.sleep(0.01)
            elapsed = time.perf_counter() - started
            if job["state"] != "done":
                print(f"job {job_id} failed: {job['error']}")
            elif index:  # the first job loads the model
                totals.append(elapsed)
                pipeline.append(job["generation_time_sec"])
    print(f"{len(totals)} jobs, {args.model}, {args.size}px, {args.steps} steps")
    print(f"submit->done  p50 {statistics.median(totals):.3f}s  min {min(totals):.3f}s  max {max(totals):.3f}s")
    print(f"pipeline      p50 {statistics.median(pipeline):.3f}s  (generation_time_sec)")
    print(f"overhead      p50 {statistics.median(totals) - statistics.median(pipeline):.3f}s")


if __name__ == "__main__":
    main()
