"""What live previews cost: the cheap latent decode alone (per preview, per image size), and a whole demo job
with and without `"preview": true` in the engine (every step previewed, the worst case; the service previews at
most every 0.5 s).

    .venv/bin/python bench/preview_bench.py            # prints a table; --append adds it to bench/RESULTS.md
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import pipelines.generate
from pipelines.catalog import ModelCatalog
from pipelines.demo import create_demo_models
from pipelines.families.sd15 import SD15
from pipelines.generate import ImageEngine
from pipelines.previews import PREVIEW_SINK, preview_jpeg_base64
from pipelines.schemas import Txt2ImgRequest
from pipelines.settings import PROJECT_ROOT, Settings


def timed(function, repeats: int) -> float:
    """Median seconds of `repeats` calls."""
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--append", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()
    rows = []
    for size in (512, 1024, 2048):
        latents = torch.randn(4, size // 8, size // 8)
        seconds = timed(lambda latents=latents: preview_jpeg_base64(latents, SD15), 50)
        data = preview_jpeg_base64(latents, SD15)
        rows.append((f"decode + JPEG of one {size}x{size} image's latents", f"{seconds * 1000:.2f} ms",
                     f"{len(data)} base64 chars"))  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        create_demo_models(Path(tmp) / "stable_diffusion" / "models")
        settings = Settings.from_env(root=Path(tmp)).model_copy(
            update={"models_config": PROJECT_ROOT / "configs" / "models.yaml"}
        )
        engine = ImageEngine(ModelCatalog(settings), device="cpu", max_loaded_models=2)
        request = {"prompt": "a lighthouse", "steps": 20, "width": 256, "height": 256, "seed": 1}
        engine.generate(Txt2ImgRequest(**request))  # load and warm
        plain = timed(lambda: engine.generate(Txt2ImgRequest(**request)), 5)
        token = PREVIEW_SINK.set(lambda job_id, data: None)
        interval, pipelines.generate.PREVIEW_INTERVAL_S = pipelines.generate.PREVIEW_INTERVAL_S, 0.0
        try:
            previewed = timed(lambda: engine.generate(Txt2ImgRequest(**request, preview=True)), 5)
        finally:
            pipelines.generate.PREVIEW_INTERVAL_S = interval
            PREVIEW_SINK.reset(token)
        rows.append(("demo SD1.5 job, 256x256, 20 steps, no preview", f"{plain * 1000:.0f} ms", "median of 5"))
        rows.append(("the same, a preview at every step", f"{previewed * 1000:.0f} ms",
                     f"{(previewed / plain - 1) * 100:+.1f} %"))  # fmt: skip
    table = "| figure | value | note |\n| --- | --- | --- |\n" + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    print(table)
    if args.append:
        with open("bench/RESULTS.md", "a") as results:
            results.write(f"\n## {time.strftime('%Y-%m-%d')}: live previews (bench/preview_bench.py, CPU)\n\n")
            results.write(table + "\n")


if __name__ == "__main__":
    main()
