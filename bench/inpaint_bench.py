"""Engine time of img2img with and without a mask (run by hand; prints numbers, no service needed).

On the demo SD1.5 checkpoint and the demo SD1.5 inpainting checkpoint, 128x128, 8 steps: plain img2img, a
mask with "original" content over the whole picture, "latent noise", and "fill" + "Only masked" (crop,
repaint at full size, paste back). Median and minimum of `--runs` runs after one warm-up run each.

.venv/bin/python bench/inpaint_bench.py [--runs 15]
"""

import argparse
import base64
import io
import statistics
import time

import numpy as np
from PIL import Image, ImageDraw

from pipelines.catalog import ModelCatalog
from pipelines.generate import ImageEngine
from pipelines.schemas import Img2ImgRequest
from pipelines.settings import Settings

CASES = {
    "img2img (no mask)": {},
    "mask, original, whole picture": {"inpainting_fill": 1},
    "mask, latent noise": {"inpainting_fill": 2},
    "mask, fill, only masked (pad 32)": {"inpainting_fill": 0, "inpaint_full_res": True},
}


def as_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    engine = ImageEngine(ModelCatalog(Settings.from_env()), device="cpu")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8))
    mask = Image.new("L", (128, 128))
    ImageDraw.Draw(mask).ellipse((40, 40, 88, 88), fill=255)
    base = {"prompt": "a door", "steps": 8, "width": 128, "height": 128, "seed": 1, "image": as_base64(image)}
    print("| model | case | median ms | min ms |\n| --- | --- | --- | --- |")
    for model in ("demo-sd15", "demo-sd15-inpainting"):
        for name, fields in CASES.items():
            masked = {"mask": as_base64(mask), **fields} if fields else {}
            request = Img2ImgRequest(**base, **masked, model=model)
            engine.generate(request)
            times = []
            for _ in range(args.runs):
                started = time.perf_counter()
                engine.generate(request)
                times.append(time.perf_counter() - started)
            print(f"| {model} | {name} | {statistics.median(times) * 1000:.1f} | {min(times) * 1000:.1f} |")


if __name__ == "__main__":
    main()
