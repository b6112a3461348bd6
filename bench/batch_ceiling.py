"""The engine's own gain from batching on this machine: 8 jobs one by one vs the same 8 as one batch, in
`ImageEngine` with one torch thread (as the CPU layout's generator runs). The ceiling of throughput.py's P2:
the service cannot batch better than its engine (run by hand; prints numbers).

.venv/bin/python bench/batch_ceiling.py [--model "Demo SD1.5"] [--size 64] [--steps 8] [--rounds 5]
"""

import argparse
import statistics
import time

import torch

from pipelines.catalog import ModelCatalog
from pipelines.generate import ImageEngine
from pipelines.schemas import Txt2ImgRequest
from pipelines.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="Demo SD1.5")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = ImageEngine(ModelCatalog(Settings.from_env()), torch_threads=args.threads)
    loaded = engine.load(args.model)

    def jobs(count: int, seed: int):
        request = {"prompt": "a lighthouse at dusk", "steps": args.steps, "width": args.size, "height": args.size}
        return [engine.prepare(Txt2ImgRequest(**request, seed=seed + index), loaded.entry) for index in range(count)]

    engine.run(loaded, jobs(1, 0))  # warm-up
    engine.run(loaded, jobs(8, 0))
    one_by_one, batched = [], []
    for round_ in range(args.rounds):
        started = time.perf_counter()
        for index in range(8):
            engine.run(loaded, jobs(1, 100 * round_ + index))
        one_by_one.append(time.perf_counter() - started)
        started = time.perf_counter()
        engine.run(loaded, jobs(8, 100 * round_))
        batched.append(time.perf_counter() - started)
    ratio = statistics.median(one_by_one) / statistics.median(batched)
    print(f"{args.model}, {args.size}x{args.size}, {args.steps} steps, {args.threads} thread(s): 8 one by one "
          f"{statistics.median(one_by_one):.3f} s, one batch of 8 {statistics.median(batched):.3f} s (medians of "
          f"{args.rounds}): {ratio:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
