"""General usage: list the models, generate an image while watching its progress live (Server-Sent Events), save
it, and read its parameters back.

    python examples/example_usage.py --prompt "a lighthouse at dusk" --steps 8 --out lighthouse.png

The service's URL comes from DIFFUSION_API_URL (default http://127.0.0.1:8000, what `make serve` starts); an API
key, if the service has keys on, from DIFFUSION_API_KEY. Exits non-zero when the job fails. Needs `requests`.
"""

import argparse
import json
import os
import sys

import requests

URL = os.environ.get("DIFFUSION_API_URL", "http://127.0.0.1:8000").rstrip("/")
HEADERS = {"Authorization": f"Bearer {os.environ['DIFFUSION_API_KEY']}"} if os.environ.get("DIFFUSION_API_KEY") else {}


def check(response: requests.Response) -> dict:
    """The JSON body of a successful answer; otherwise the service's error message, and exit."""
    if not response.ok:
        try:
            reason = response.json().get("error")
        except ValueError:  # not the service's JSON (a proxy's page, say)
            reason = response.text[:300]
        sys.exit(f"{response.request.method} {response.url}: {response.status_code}: {reason}")
    return response.json()


def watch(job_id: str) -> tuple[str, dict]:
    """Follows the job's events until its final one; prints the progress. Returns (end state, final status)."""
    with requests.get(f"{URL}/queue/{job_id}/events", headers=HEADERS, stream=True, timeout=(10, 60)) as stream:
        if not stream.ok:
            check(stream)
        event = None
        for line in stream.iter_lines(decode_unicode=True):
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data = json.loads(line.removeprefix("data: "))
                if event == "progress":
                    eta = f", about {data['eta_s']:.0f} s left" if data["eta_s"] is not None else ""
                    print(f"  {data['state']}: {data['phase']} {data['progress']:.0f}%{eta}", file=sys.stderr)
                elif event in ("done", "error", "cancelled"):
                    return event, data
    sys.exit("the event stream ended without a final event")


def main() -> int:
    parser = argparse.ArgumentParser(description="Generate one image with the Diffusion API")
    parser.add_argument("--prompt", default="a lighthouse on a cliff at sunset, oil painting")
    parser.add_argument("--negative-prompt", default="blurry")
    parser.add_argument("--model", help="a name or label from GET /models (default: the service's default)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--seed", type=int, default=-1)
    parser.add_argument("--out", default="example_usage.png")
    args = parser.parse_args()

    models = check(requests.get(f"{URL}/models", headers=HEADERS, timeout=30))["models"]
    print("models:", ", ".join(f"{model['label']} ({model['family']})" for model in models), file=sys.stderr)

    request = {"prompt": args.prompt, "negative_prompt": args.negative_prompt, "steps": args.steps,
               "width": args.width, "height": args.height, "seed": args.seed, "fileType": "png"}  # fmt: skip
    if args.model:
        request["model"] = args.model
    job_id = check(requests.post(f"{URL}/txt2img", json=request, headers=HEADERS, timeout=30))["job_id"]
    print(f"job {job_id} queued", file=sys.stderr)

    state, status = watch(job_id)
    if state != "done":
        print(f"job {job_id} ended {state}: {status.get('error')}", file=sys.stderr)
        return 1
    image = requests.get(f"{URL}{status['image_url']}", headers=HEADERS, timeout=60)
    image.raise_for_status()
    with open(args.out, "wb") as file:
        file.write(image.content)
    for warning in status["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"saved {args.out} ({status['width']}x{status['height']}, seed {status['seed']}, "
          f"{status['generation_time_sec']:.1f} s)", file=sys.stderr)  # fmt: skip
    print(status["infotext"])  # A1111's parameters, also inside the PNG
    return 0


if __name__ == "__main__":
    sys.exit(main())
