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


WORK_PROBE = """
import base64, io, json, sys
from PIL import Image
from deployments.job_service import Libraries
from pipelines import a1111
from pipelines.catalog import check_mode_supported
from pipelines.prepare import prepare_job
from pipelines.schemas import Img2ImgRequest, Txt2ImgRequest
from pipelines.settings import Settings
from pipelines.families import family_of

VAE_OF = {4: "demo-vae-ft", 16: "flux-ae"}  # a VAE of the model's latent channels (read without torch too)
libraries = Libraries.from_settings(Settings.from_env())
models = libraries.catalog.list_models()
loras = libraries.loras.available()
embeddings = libraries.embeddings.available()
buffer = io.BytesIO()
Image.new("RGB", (64, 64), "red").save(buffer, "PNG")
image = base64.b64encode(buffer.getvalue()).decode()
prepared = []
for model in models:
    for kind, request in (
        ("txt2img", Txt2ImgRequest(prompt="ink <lora:demo-sd15-peft:0.5> demo-style", model=model.name, steps=2,
                                   width=64, height=64, vae=VAE_OF[family_of(model.family).latent_channels],
                                   hires={"scale": 2, "upscaler": "demo-x2"})),
        ("img2img", Img2ImgRequest(prompt="a door demo-xl-style", model=model.name, steps=2, width=64, height=64,
                                   image=image, mask=image)),
    ):
        try:
            check_mode_supported(model, kind)
        except Exception:
            continue
        job = prepare_job(request, model, libraries.loras, libraries.catalog, libraries.upscalers, libraries.vaes,
                          libraries.embeddings)
        prepared.append((model.name, kind, [use.lora.name for use in job.loras]))
a1111.memory_report()
print(json.dumps({"models": len(models), "loras": len(loras), "embeddings": len(embeddings), "prepared": prepared,
                  "heavy": [name for name in HEAVY if name in sys.modules]}))
"""


def test_the_ingress_s_checks_on_every_demo_model_import_no_torch(env_settings, tmp_path, monkeypatch):
    """What the ingress does at run time, not only at import: list the models, LoRAs and embeddings with a cold
    cache of file facts (families and hashes read from the files: single-file checkpoints, `.pt` embeddings
    and LoRAs), and prepare txt2img (a LoRA tag, an embedding, a VAE, hires fix) and inpainting jobs on every
    demo model, then A1111's /memory: still no torch."""
    monkeypatch.setenv("DIFFUSION_API_CACHE_DIR", str(tmp_path / "cold-cache"))
    probe = f"HEAVY = {HEAVY!r}\n" + WORK_PROBE
    done = subprocess.run([sys.executable, "-c", probe], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["models"] >= 4 and result["loras"] >= 3 and result["embeddings"] >= 2
    assert ("demo-sd15", "txt2img", ["demo-sd15-peft"]) in [tuple(item) for item in result["prepared"]]
    assert len(result["prepared"]) >= 4
    assert result["heavy"] == [], f"the ingress's work imported {result['heavy']}"
