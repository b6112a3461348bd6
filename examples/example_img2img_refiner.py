"""Img2img with the SDXL refiner: make (or read) a picture, then redraw it with an SDXL model whose last steps the
refiner takes over, and compare.

    python examples/example_img2img_refiner.py --image photo.png --prompt "a watercolour of the same scene"
    python examples/example_img2img_refiner.py            # without --image: a txt2img picture first

The models default to the first SDXL and SDXL refiner checkpoints GET /models lists (on `make serve`: the demo
ones). The service's URL comes from DIFFUSION_API_URL (default http://127.0.0.1:8000); an API key, if the
service has keys on, from DIFFUSION_API_KEY. Exits non-zero when a job fails. Needs `requests`.
"""

import argparse
import base64
import os
import sys
import time

import requests

URL = os.environ.get("DIFFUSION_API_URL", "http://127.0.0.1:8000").rstrip("/")
HEADERS = {"Authorization": f"Bearer {os.environ['DIFFUSION_API_KEY']}"} if os.environ.get("DIFFUSION_API_KEY") else {}


def check(response: requests.Response) -> dict:
    if not response.ok:
        try:
            reason = response.json().get("error")
        except ValueError:  # not the service's JSON (a proxy's page, say)
            reason = response.text[:300]
        sys.exit(f"{response.request.method} {response.url}: {response.status_code}: {reason}")
    return response.json()


def run(kind: str, request: dict) -> dict:
    """Submits a job and long-polls it (`wait_s`: the service answers as soon as it changes) to its end."""
    job_id = check(requests.post(f"{URL}/{kind}", json=request, headers=HEADERS, timeout=30))["job_id"]
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = check(requests.get(f"{URL}/queue/{job_id}", params={"wait_s": 20}, headers=HEADERS, timeout=60))
        print(f"  {kind} {job_id[:8]}: {status['current_phase']} {status['progress']:.0f}%", file=sys.stderr)
        if status["state"] == "done":
            return status
        if status["state"] in ("error", "cancelled"):
            sys.exit(f"{kind} job {job_id} ended {status['state']}: {status['error']}")
    sys.exit(f"{kind} job {job_id} did not end in 10 minutes")


def first_of(models: list[dict], family: str) -> str:
    for model in models:
        if model["family"] == family:
            return model["name"]
    sys.exit(f"no {family} model is installed (GET /models)")


def main() -> int:
    parser = argparse.ArgumentParser(description="Img2img with an SDXL model and its refiner")
    parser.add_argument("--image", help="the input picture (PNG, JPEG, WebP...); default: one made by txt2img")
    parser.add_argument("--prompt", default="a watercolour of a harbour at dawn, soft light")
    parser.add_argument("--model", help="an SDXL model (default: the first listed)")
    parser.add_argument("--refiner", help="an SDXL refiner (default: the first listed)")
    parser.add_argument("--size", type=int, default=1024, help="width and height")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--denoising-strength", type=float, default=0.6)
    parser.add_argument("--switch-at", type=float, default=0.8, help="fraction of the steps before the refiner")
    parser.add_argument("--out", default="example_img2img_refiner.png")
    args = parser.parse_args()

    models = check(requests.get(f"{URL}/models", headers=HEADERS, timeout=30))["models"]
    model = args.model or first_of(models, "sdxl")
    refiner = args.refiner or first_of(models, "sdxl-refiner")
    common = {"model": model, "width": args.size, "height": args.size, "steps": args.steps, "seed": 42,
              "fileType": "png"}  # fmt: skip

    if args.image:
        with open(args.image, "rb") as file:
            picture = base64.b64encode(file.read()).decode()
    else:
        picture = run("txt2img", {**common, "prompt": "a harbour at dawn, photo"})["image"]

    redraw = {**common, "prompt": args.prompt, "image": picture, "denoising_strength": args.denoising_strength}
    plain = run("img2img", redraw)
    refined = run("img2img", {**redraw, "refiner_checkpoint": refiner, "refiner_switch_at": args.switch_at})
    for warning in refined["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    with open(args.out, "wb") as file:
        file.write(base64.b64decode(refined["image"]))
    print(f"saved {args.out}; without the refiner it took {plain['generation_time_sec']:.1f} s, with it "
          f"{refined['generation_time_sec']:.1f} s", file=sys.stderr)  # fmt: skip
    print(refined["infotext"])  # names the refiner and its switch point, as A1111 does
    return 0


if __name__ == "__main__":
    sys.exit(main())
