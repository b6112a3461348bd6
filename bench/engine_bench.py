"""Times the image engine on the demo models (run by hand; prints numbers, asserts nothing).

.venv/bin/python bench/engine_bench.py [--repeats 5] [--steps 8]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from pipelines.catalog import ModelCatalog
from pipelines.demo import create_demo_models
from pipelines.generate import ImageEngine
from pipelines.settings import PROJECT_ROOT, Settings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    from pipelines.schemas import Txt2ImgRequest

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        create_demo_models(Path(tmp) / "stable_diffusion" / "models")
        print(f"demo models written in {time.perf_counter() - started:.2f}s")
        settings = Settings.from_env(root=Path(tmp)).model_copy(
            update={"models_config": PROJECT_ROOT / "configs" / "models.yaml"}
        )
        engine = ImageEngine(ModelCatalog(settings), device=args.device, max_loaded_models=4)
        print(f"device {engine.device}, dtype {engine.dtype}")
        for model in ("Demo SD1.5", "Demo SD1.5 (single file)", "Demo SDXL"):
            started = time.perf_counter()
            engine.load(model)
            print(f"{model}: load {time.perf_counter() - started:.3f}s")
            for size in (64, 128):
                times = []
                for repeat in range(args.repeats + 1):
                    request = Txt2ImgRequest(prompt="a cat", model=model, steps=args.steps, width=size, height=size,
                                             seed=repeat)  # fmt: skip
                    started = time.perf_counter()
                    engine.generate(request)
                    if repeat:  # the first run warms up
                        times.append(time.perf_counter() - started)
                print(f"  txt2img {size}px {args.steps} steps: min {min(times):.3f}s "
                      f"median {statistics.median(times):.3f}s")  # fmt: skip


if __name__ == "__main__":
    main()
