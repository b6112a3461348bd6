"""The ingress replica validates and routes; the GPUs are elsewhere: importing its modules must not import torch
or the libraries built on it (3.5 s and ~560 MB per ingress replica)."""

import json
import subprocess
import sys

from pipelines.settings import PROJECT_ROOT

# The Ingress deployment's module (it imports its routers, job service and the rest) and the ingress-side
# modules besides. deployments/app.py, which binds the generators, is not among them: the ingress never
# imports deployments/generators.py or deployments/upscaler.py.
INGRESS_MODULES = [
    "deployments.ingress",
    "deployments.access",
    "deployments.contract",
    "deployments.jobs",
    "deployments.job_db",
    "deployments.watch",
    "deployments.webhooks",
    "deployments.metrics",
    "deployments.keys",
    "pipelines.schemas",
    "pipelines.a1111_schemas",
    "pipelines.prepare",
    "pipelines.a1111",
]
HEAVY = ["torch", "diffusers", "transformers", "spandrel", "peft", "accelerate"]
ENGINE_SIDE = ["deployments.generators", "deployments.upscaler"]  # they import torch
PROBE = f"""
import json, sys, time
started = time.perf_counter()
for name in {INGRESS_MODULES!r}:
    __import__(name)
seconds = time.perf_counter() - started
print(json.dumps({{"seconds": seconds, "heavy": [name for name in {HEAVY + ENGINE_SIDE!r} if name in sys.modules]}}))
"""


def test_the_ingress_modules_import_no_torch_diffusers_or_transformers():
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"ingress modules imported in {result['seconds']:.2f}s")
    assert result["heavy"] == [], f"the ingress imports {result['heavy']}: {import_chain(result['heavy'][0])}"


def import_chain(module: str) -> str:
    """Who imports `module` first: `importer -> ... -> module`, from `python -X importtime` (its lines are in
    post-order, nested by indentation)."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", PROBE], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    entries = []
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2 and "cumulative" not in line:
            name = line.split("|")[2]
            entries.append((len(name) - len(name.lstrip()), name.strip()))
    for index, (depth, name) in enumerate(entries):
        if name == module:
            chain = [name]
            for outer_depth, outer in entries[index + 1 :]:
                if outer_depth < depth:
                    chain.append(outer)
                    depth = outer_depth
            return " -> ".join(reversed(chain))
    return f"(no chain found for {module})"
