"""Tenant safety over HTTP, with API keys on as an operator runs them: a second application of the service
(route prefix /keyed, its own job store and outputs) with a YAML keys file of two callers and an admin.

No key sees, cancels or follows another key's jobs on either door; only the admin changes service-wide state
or reads any job; hostile requests get their 4xx (or a normal job) while `/hello` keeps answering; a job with
the most LoRAs a request may name leaves the next caller's image as it was; one caller's cancelled jobs never
push another's results out of retention; schemathesis runs once with a key.
"""

import base64
import hashlib
import io
import json
import os
import random
import re
import sqlite3
import subprocess
import threading
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image, PngImagePlugin

from pipelines.demo import create_many_sd15_loras
from pipelines.limits import LIMITS
from pipelines.settings import PROJECT_ROOT
from tests.serve.conftest import PORT
from tests.serve.test_schema_fuzz import SYNCHRONOUS_GENERATION, schemathesis_command

KEYS = {"alice": "alice-key-3f9c2b7e", "bob": "bob-key-81d04a6c", "ops": "ops-key-c5e21f90",
        "capped": "capped-key-77a1d0e2", "early": "early-key-19b3c4d5", "late": "late-key-5e6f7a8b"}  # fmt: skip
KEEP_PER_OWNER = 6
# No CPU asked: the session's cluster has given its logical CPUs to the main application (all of them, once the
# scaling test has added SD1.5 replicas), and these replicas only run tiny jobs.
ON_HEAD = {"num_cpus": 0}
TINY = {"prompt": "a lighthouse at dusk", "steps": 3, "width": 64, "height": 64, "seed": 21}
SLOW = {"prompt": "a long one", "steps": 150, "width": 512, "height": 512, "seed": 5}
FUZZ_SECONDS = int(os.environ.get("DIFFUSION_API_KEYED_FUZZ_SECONDS", "60"))


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


def _keys_file(folder) -> str:
    bob_digest = hashlib.sha256(KEYS["bob"].encode()).hexdigest()
    path = folder / "keys.yaml"
    path.write_text(f"""# the keyed application's callers
keys:
  - {{name: alice, key: "{KEYS["alice"]}"}}
  - {{name: bob, sha256: "{bob_digest}"}}
  - {{name: ops, key: "{KEYS["ops"]}", admin: true}}
  - {{name: capped, key: "{KEYS["capped"]}", max_queued_images: 3, requests_per_minute: 6, priority: 2}}
  - {{name: early, key: "{KEYS["early"]}"}}
  - {{name: late, key: "{KEYS["late"]}"}}
""")
    return str(path)


def _keyed_application(settings, folder) -> dict:
    loras = folder / "loras"
    create_many_sd15_loras(loras, LIMITS.max_loras)
    return {
        "name": "keyed",
        "route_prefix": "/keyed",
        "import_path": "deployments.app:build_app",
        "args": {
            "models_dir": str(settings.models_dir),
            "loras_dir": str(loras),
            "vaes_dir": str(settings.vaes_dir),
            "embeddings_dir": str(settings.embeddings_dir),
            "controlnet_dir": str(settings.controlnet_dir),
            "ipadapter_dir": str(settings.ipadapter_dir),
            "clip_vision_dir": str(settings.clip_vision_dir),
            "annotators_dir": str(settings.annotators_dir),
            "text_encoder_dir": str(settings.text_encoder_dir),
            "upscalers_dir": str(settings.upscalers_dir),
            "models_config": str(settings.models_config),
            "cache_dir": str(settings.cache_dir),
            "outputs_dir": str(folder / "images"),
            "job_store": str(folder / "jobs.sqlite3"),
            "api_keys_file": _keys_file(folder),
            "keep_finished_jobs": KEEP_PER_OWNER,
            "retention_interval_s": 1,
        },
        # Only the SD1.5 path runs here; the rest scale from zero if ever asked, so the session's machine holds
        # two more replicas, not seven.
        "deployments": [
            *({"name": name, "num_replicas": 1, "ray_actor_options": ON_HEAD} for name in ("Ingress", "SD15Generator")),
            *(
                {
                    "name": name,
                    "ray_actor_options": ON_HEAD,
                    "autoscaling_config": {"min_replicas": 0, "initial_replicas": 0, "max_replicas": 1},
                }
                for name in ("SDXLGenerator", "Refiner", "FluxGenerator", "SD3Generator", "Upscaler")
            ),
        ],
    }


@pytest.fixture(scope="module")
def keyed(service, settings, demo_root):
    folder = demo_root / "keyed"
    folder.mkdir(exist_ok=True)
    try:
        service["deploy"](extra_applications=[_keyed_application(settings, folder)])
        with httpx.Client(base_url=f"http://127.0.0.1:{PORT}/keyed", timeout=60) as http:
            yield {"http": http, "database": str(folder / "jobs.sqlite3"), "folder": folder}
    finally:
        service["deploy"]()  # the session's service alone again, even when the keyed one did not come up


def wait_done(http: httpx.Client, job_id: str, name: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = http.get(f"/queue/{job_id}", headers=auth(name), params={"wait_s": 5}).json()
        if body["state"] in ("done", "error", "cancelled"):
            return body
    raise AssertionError(f"job {job_id} did not end in {timeout}s")


def submit(http: httpx.Client, name: str, body: dict, route: str = "/txt2img") -> str:
    answer = http.post(route, json=body, headers=auth(name))
    assert answer.status_code == 200, answer.text
    return answer.json()["job_id"]


def image_pixels(http: httpx.Client, job_id: str, name: str) -> np.ndarray:
    answer = http.get(f"/queue/{job_id}/image", headers=auth(name))
    assert answer.status_code == 200, answer.text
    return np.asarray(Image.open(io.BytesIO(answer.content)).convert("RGB")).astype(int)


def png_base64(size=(64, 64), text: str | None = None) -> str:
    info = PngImagePlugin.PngInfo()
    if text is not None:
        info.add_text("parameters", text)
    buffer = io.BytesIO()
    Image.new("RGB", size, (90, 140, 200)).save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode()


def test_every_request_needs_a_key_and_admin_routes_need_an_admin(keyed):
    http = keyed["http"]
    assert http.get("/hello").status_code == 200  # open: load balancers probe it
    for path in ("/models", "/families", "/sdapi/v1/sd-models"):
        assert http.get(path).status_code == 401
        assert http.get(path, headers={"Authorization": "Bearer not-a-key"}).status_code == 401
        assert http.get(path, headers=auth("bob")).status_code == 200
    basic = base64.b64encode(f"user:{KEYS['bob']}".encode()).decode()  # A1111 clients' --api-auth form
    assert http.get("/sdapi/v1/progress", headers={"Authorization": f"Basic {basic}"}).status_code == 200
    options = http.get("/sdapi/v1/options", headers=auth("bob")).json()
    for path, body in [("/sdapi/v1/options", {"sd_model_checkpoint": options["sd_model_checkpoint"]}),
                       ("/sdapi/v1/refresh-loras", None), ("/sdapi/v1/refresh-checkpoints", None)]:  # fmt: skip
        refused = http.post(path, json=body, headers=auth("bob"))
        assert refused.status_code == 403, (path, refused.text)
        assert "only an admin key" in refused.json()["detail"]
        assert http.post(path, json=body, headers=auth("ops")).status_code == 200, path


def test_no_key_sees_follows_or_cancels_another_keys_job_on_either_door(keyed):
    http = keyed["http"]
    job_id = submit(http, "alice", {**TINY, "image": png_base64(), "denoising_strength": 0.5}, "/img2img")
    unknown = http.get(f"/queue/{'0' * 32}", headers=auth("bob"))
    for method, path, params in [("GET", f"/queue/{job_id}", {}), ("GET", f"/queue/{job_id}", {"include": "inputs"}),
                                 ("DELETE", f"/queue/{job_id}", {}), ("GET", f"/queue/{job_id}/image", {}),
                                 ("GET", f"/queue/{job_id}/events", {})]:  # fmt: skip
        answer = http.request(method, path, params=params, headers=auth("bob"))
        assert answer.status_code == 404, (method, path, answer.text)
        assert answer.json()["error"] == f"unknown job_id {job_id!r}"  # exactly as for an id that never existed
    assert unknown.status_code == 404
    status = wait_done(http, job_id, "alice")
    assert status["state"] == "done", status  # bob's DELETE did not cancel it
    assert "image" not in status["payload"]  # the input image is stored by reference, not in the status
    with_inputs = http.get(f"/queue/{job_id}", params={"include": "inputs"}, headers=auth("alice")).json()
    assert Image.open(io.BytesIO(base64.b64decode(with_inputs["payload"]["image"]))).size == (64, 64)
    assert http.get(f"/queue/{job_id}", headers=auth("ops")).json()["state"] == "done"  # admins read any job
    assert http.get(f"/queue/{job_id}/image", headers=auth("ops")).status_code == 200


def test_a_retried_submission_with_an_idempotency_key_gets_the_same_job_on_both_doors(keyed):
    """A client whose connection dropped sends its submission again with the same Idempotency-Key: it gets the
    first job (`Idempotent-Replayed: true`), no second one is made; another body under the key is a 422 naming
    it; another key's caller has a key space of its own; a malformed key is a 422. The A1111 door too."""
    http = keyed["http"]
    body = {**TINY, "seed": -1, "prompt": "idempotent lighthouse"}
    first = http.post("/txt2img", json=body, headers={**auth("alice"), "Idempotency-Key": "order-7731"})
    assert first.status_code == 200 and "Idempotent-Replayed" not in first.headers, first.text
    job_id = first.json()["job_id"]
    done = wait_done(http, job_id, "alice")
    again = http.post("/txt2img", json=body, headers={**auth("alice"), "Idempotency-Key": "order-7731"})
    assert again.status_code == 200 and again.json()["job_id"] == job_id
    assert again.headers["Idempotent-Replayed"] == "true"
    assert wait_done(http, job_id, "alice")["seed"] == done["seed"]  # the very job, its random seed fixed once
    changed = http.post(
        "/txt2img", json={**body, "steps": 4}, headers={**auth("alice"), "Idempotency-Key": "order-7731"}
    )
    assert (
        changed.status_code == 422
        and "Idempotency-Key 'order-7731' was used for another request" in changed.json()["error"]
    )
    bobs = http.post("/txt2img", json=body, headers={**auth("bob"), "Idempotency-Key": "order-7731"})
    assert bobs.status_code == 200 and bobs.json()["job_id"] != job_id and "Idempotent-Replayed" not in bobs.headers
    for bad in ("", "x" * 256, "caf\u00e9"):
        answer = http.post("/txt2img", json=body, headers={**auth("alice"), "Idempotency-Key": bad.encode("latin-1")})
        assert answer.status_code == 422 and "Idempotency-Key" in answer.json()["error"], (bad[:10], answer.text)
    call = {"prompt": "an idempotent cat", "steps": 3, "width": 64, "height": 64}
    headers = {**auth("alice"), "Idempotency-Key": "sdapi-call-1"}
    one, two = (http.post("/sdapi/v1/txt2img", json=call, headers=headers) for _ in range(2))
    assert one.status_code == two.status_code == 200, (one.text, two.text)
    assert json.loads(one.json()["info"])["job_id"] == json.loads(two.json()["info"])["job_id"]
    assert two.headers["Idempotent-Replayed"] == "true" and len(two.json()["images"]) == 1
    wait_done(http, bobs.json()["job_id"], "bob")


def test_the_openai_door_takes_the_sdks_bearer_key_and_its_links_work_without_one(keyed):
    """OpenAI's SDK with a key: its job is the caller's own (another key's caller gets a 404 for it), a wrong key
    is the SDK's AuthenticationError, and a `url` answer is fetched by a client that has no key at all."""
    base_url = f"{keyed['http'].base_url}/v1".replace("//v1", "/v1")
    with openai.OpenAI(base_url=base_url, api_key=KEYS["alice"], max_retries=0, timeout=120) as sdk:
        raw = sdk.images.with_raw_response.generate(prompt="a keyed lighthouse", size="64x64", response_format="url",
                                                    extra_body={"steps": 3, "seed": 8})  # fmt: skip
        (image,) = raw.parse().data
        assert {model.id for model in sdk.models.list()} >= {"demo-sd15"}
    job_id = raw.headers["X-Job-Id"]
    assert image.url.startswith(f"{base_url}/images/files/{job_id}/0.png?")
    fetched = httpx.get(image.url, timeout=30)  # no Authorization header
    assert fetched.status_code == 200 and fetched.content == keyed["http"].get(
        f"/queue/{job_id}/image", headers=auth("alice")).content  # fmt: skip
    assert keyed["http"].get(f"/queue/{job_id}", headers=auth("bob")).status_code == 404
    stranger = openai.OpenAI(base_url=base_url, api_key="not-a-key", max_retries=0)
    with stranger, pytest.raises(openai.AuthenticationError) as refused:
        stranger.images.generate(prompt="x", size="64x64")
    assert refused.value.code == "invalid_api_key"
    no_key = httpx.post(f"{base_url}/images/generations", json={"prompt": "x"}, timeout=30)
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"


def test_a1111_progress_and_interrupt_reach_only_the_callers_own_jobs(keyed):
    http = keyed["http"]
    answers = {}
    call = threading.Thread(
        target=lambda: answers.update(
            alice=http.post(
                "/sdapi/v1/txt2img", json={**SLOW, "sampler_name": "Euler"}, headers=auth("alice"), timeout=600
            )
        )
    )
    call.start()
    deadline = time.monotonic() + 120
    while http.get("/sdapi/v1/progress", headers=auth("alice")).json()["progress"] <= 0:
        assert time.monotonic() < deadline, "alice's A1111 job never started"
        time.sleep(0.2)
    seen_by_bob = http.get("/sdapi/v1/progress", headers=auth("bob")).json()
    assert seen_by_bob["progress"] == 0 and seen_by_bob["state"]["job_count"] == 0
    for path in ("/sdapi/v1/interrupt", "/sdapi/v1/skip"):
        assert http.post(path, headers=auth("bob")).status_code == 200
    time.sleep(1)
    assert call.is_alive()  # bob's interrupt did not stop alice's job
    assert http.get("/sdapi/v1/progress", headers=auth("alice")).json()["state"]["job_count"] == 1
    assert http.post("/sdapi/v1/interrupt", headers=auth("alice")).status_code == 200
    call.join(timeout=120)
    interrupted = answers["alice"]
    assert interrupted.status_code == 200, interrupted.text  # as A1111: an interrupted call answers 200
    body = interrupted.json()
    assert body["images"] == [] and '"interrupted": true' in body["info"]


def test_a_job_with_max_loras_loras_leaves_the_next_callers_image_as_it_was(keyed):
    http = keyed["http"]
    names = [lora["name"] for lora in http.get("/loras", headers=auth("bob")).json()["loras"]]
    assert len(names) == LIMITS.max_loras
    baseline = submit(http, "bob", TINY)
    assert wait_done(http, baseline, "bob")["state"] == "done"
    with_loras = submit(http, "alice", {**TINY, "loras": names})
    status = wait_done(http, with_loras, "alice")
    assert status["state"] == "done" and status["warnings"] == [], status
    after = submit(http, "bob", TINY)
    assert wait_done(http, after, "bob")["state"] == "done"
    assert np.abs(image_pixels(http, with_loras, "alice") - image_pixels(http, baseline, "bob")).max() > 0
    assert np.array_equal(image_pixels(http, after, "bob"), image_pixels(http, baseline, "bob"))


def test_forges_module_listing_needs_a_key_and_is_the_same_for_every_key(keyed):
    """GET /sdapi/v1/sd-modules lists installed files (no key's data): behind the key, one answer for all."""
    http = keyed["http"]
    assert http.get("/sdapi/v1/sd-modules").status_code == 401
    alice, bob = (http.get("/sdapi/v1/sd-modules", headers=auth(name)) for name in ("alice", "bob"))
    assert alice.status_code == bob.status_code == 200 and alice.json() == bob.json()
    names = {module["model_name"] for module in alice.json()}
    assert names == {f"{name}.safetensors" for name in ("flux-ae", "demo-clip-l", "demo-clip-g", "demo-t5xxl")}


def test_an_ip_adapter_job_keeps_its_references_to_its_key_and_leaves_the_model_as_it_was(keyed):
    """The reference image is the owner's input: no other key reads it back; and the adapter loaded for the
    job is gone for the next caller's image."""
    http = keyed["http"]
    reference = png_base64((48, 40))
    unit = {"model": "ip-adapter_demo_sd15", "module": "ip-adapter_clip_h", "image": reference}
    baseline = submit(http, "bob", TINY)
    assert wait_done(http, baseline, "bob")["state"] == "done"
    guided = submit(http, "alice", {**TINY, "controlnet": [unit]})
    assert wait_done(http, guided, "alice")["state"] == "done"
    refused = http.get(f"/queue/{guided}", params={"include": "inputs"}, headers=auth("bob"))
    assert refused.status_code == 404
    own = http.get(f"/queue/{guided}", params={"include": "inputs"}, headers=auth("alice")).json()
    assert own["payload"]["controlnet"][0]["image"] == reference
    after = submit(http, "bob", TINY)
    assert wait_done(http, after, "bob")["state"] == "done"
    assert np.abs(image_pixels(http, guided, "alice") - image_pixels(http, baseline, "bob")).max() > 0
    assert np.array_equal(image_pixels(http, after, "bob"), image_pixels(http, baseline, "bob"))


class HelloWatch:
    """Asks `/hello` every 0.2 s in a thread while hostile requests run: each must answer (200, within 10 s),
    which a request holding the ingress's event loop or GIL would prevent."""

    def __init__(self, http: httpx.Client):
        self.http, self.answers, self.failures = http, 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        with httpx.Client(base_url=self.http.base_url, timeout=10) as own:
            while not self._stop.is_set():
                try:
                    status = own.get("/hello").status_code
                    self.answers += 1
                    if status != 200:
                        self.failures.append(status)
                except httpx.HTTPError as error:
                    self.failures.append(repr(error))
                self._stop.wait(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def test_hostile_requests_get_their_answers_while_the_service_keeps_answering(keyed):
    http = keyed["http"]
    lora = http.get("/loras", headers=auth("bob")).json()["loras"][0]["name"]
    with HelloWatch(http) as watch:
        colons = {**TINY, "prompt": "<lora:" + ":" * (LIMITS.max_prompt_chars - 6)}  # backtracked for hours
        answer = http.post("/txt2img", json=colons, headers=auth("alice"))
        assert answer.status_code == 200, answer.text  # not a tag: a normal job
        http.delete(f"/queue/{answer.json()['job_id']}", headers=auth("alice"))

        tags = " ".join(f"<lora:x{index}:1>" for index in range(1200))  # each one listed the folder again
        answer = http.post("/sdapi/v1/txt2img", json={**TINY, "prompt": f"<lora:{lora}:0.5> a cat {tags}"},
                           headers=auth("alice"))  # fmt: skip
        assert answer.status_code == 200, answer.text  # a normal job, as A1111 skips what it cannot use
        warnings = json.loads(answer.json()["info"])["warnings"]
        assert f"1201 <lora:...> tags in the prompt; at most {LIMITS.max_loras} per job" in " ".join(warnings)
        assert f"<lora:{lora}:0.5>" in json.loads(answer.json()["info"])["infotexts"][0]

        too_long = {**TINY, "prompt": "a" * (LIMITS.max_prompt_chars + 1)}
        for path in ("/txt2img", "/sdapi/v1/txt2img"):
            answer = http.post(path, json=too_long, headers=auth("alice"))
            assert answer.status_code == 422 and str(LIMITS.max_prompt_chars) in answer.text, (path, answer.text)

        chunk = "Steps: 4, " + "a" * 200_000  # the infotext parser took ~n^2.5 on this
        answer = http.post("/sdapi/v1/png-info", json={"image": png_base64(text=chunk)}, headers=auth("alice"))
        assert answer.status_code == 200 and answer.json()["info"] == chunk

        buffer = io.BytesIO()
        Image.new("RGB", (64, 64)).save(buffer, format="TIFF")
        tiff = {**TINY, "image": base64.b64encode(buffer.getvalue()).decode()}
        answer = http.post("/img2img", json=tiff, headers=auth("alice"))
        assert answer.status_code == 422 and "PNG, JPEG, WebP, AVIF or GIF" in answer.json()["error"]

        padded = {**TINY, "image": "data:image/png" + ";a=a" * 4_000_000 + ";base64," + png_base64()}
        answer = http.post("/img2img", json=padded, headers=auth("alice"))
        assert answer.status_code == 422 and answer.json()["field"] == "image", answer.text

        def chunked(total: int, size: int = 1 << 20):  # no Content-Length: counted as it arrives
            sent = 0
            while sent < total:
                yield b" " * min(size, total - sent)
                sent += size

        answer = http.post("/txt2img", content=chunked(LIMITS.max_request_bytes + (1 << 20)),
                           headers={**auth("alice"), "Content-Type": "application/json"})  # fmt: skip
        assert answer.status_code == 413, answer.text
    assert watch.failures == [] and watch.answers > 0


def test_one_callers_cancelled_jobs_never_push_out_anothers_results(keyed):
    http = keyed["http"]
    kept = [submit(http, "bob", {**TINY, "seed": seed}) for seed in (31, 32)]
    for job_id in kept:
        assert wait_done(http, job_id, "bob")["state"] == "done"
    storm = []
    for _ in range(KEEP_PER_OWNER * 2):  # submit, then cancel at once: each leaves a finished record
        job_id = submit(http, "alice", {**SLOW, "steps": 20})
        http.delete(f"/queue/{job_id}", headers=auth("alice"))
        storm.append(job_id)
    time.sleep(4)  # a few retention intervals (retention_interval_s: 1)
    left = [job_id for job_id in storm if http.get(f"/queue/{job_id}", headers=auth("alice")).status_code == 200]
    assert len(left) <= KEEP_PER_OWNER  # alice's own beyond her count went
    for job_id in kept:
        assert http.get(f"/queue/{job_id}", headers=auth("bob")).json()["state"] == "done"
        assert http.get(f"/queue/{job_id}/image", headers=auth("bob")).status_code == 200


def active_jobs(database: str) -> list[str]:
    with sqlite3.connect(database) as db:
        return [row[0] for row in db.execute("SELECT job_id FROM jobs WHERE state IN ('queued', 'processing')")]


def test_schemathesis_with_a_key_finds_no_failure(keyed):
    """The contract with keys on (401 and 403 documented where they happen, 404 for other keys' jobs), once,
    with an ordinary caller's key; the keys-off run with every operation is tests/serve/test_schema_fuzz.py."""
    seed = int(os.environ.get("DIFFUSION_API_FUZZ_SEED") or random.randrange(2**31))
    print(f"schemathesis seed {seed} (replay: DIFFUSION_API_FUZZ_SEED={seed})")
    base_url = f"http://127.0.0.1:{PORT}/keyed"
    command = [schemathesis_command(), "run", f"{base_url}/openapi.json", "--checks", "all",
               "--exclude-checks", "use_after_free",  # the one DELETE cancels: tests/serve/test_schema_fuzz.py
               "--header", f"Authorization: Bearer {KEYS['bob']}", "--url", base_url,
               "--max-time", str(FUZZ_SECONDS), "--seed", str(seed), "--no-color",
               "--exclude-path-regex", SYNCHRONOUS_GENERATION]  # fmt: skip
    schema = keyed["http"].get("/openapi.json")
    assert schema.status_code == 401  # the schema too is behind the key
    try:
        done = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=FUZZ_SECONDS + 600)
    finally:
        for job_id in active_jobs(keyed["database"]):
            keyed["http"].delete(f"/queue/{job_id}", headers=auth("ops"))
    report = done.stdout + done.stderr
    print(report[-30000:])
    assert done.returncode == 0, f"schemathesis found failures (seed {seed}); its report is printed above"
    generated = re.search(r"Test cases:\s*\n?\s*(\d+) generated", report)
    assert generated and int(generated.group(1)) > 100, report[-3000:]


def test_a_key_at_its_limits_gets_429_and_no_other_key_does(keyed):
    """`max_queued_images` and `requests_per_minute` are the key's own: beyond them its submissions answer 429
    with Retry-After and a body naming the limit, while another key's same submission is accepted; a job that
    could never fit is a 422; a priority above the key's setting is lowered, with a warning."""
    http = keyed["http"]
    slow = {**SLOW, "steps": 40, "width": 256, "height": 256}
    first = submit(http, "capped", {**slow, "batch_size": 2, "priority": 9})
    status = http.get(f"/queue/{first}", headers=auth("capped")).json()
    assert status["priority"] == 2 and any("priority 9 lowered to 2" in w for w in status["warnings"])
    refused = http.post("/txt2img", json={**slow, "batch_size": 2}, headers=auth("capped"))
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1, refused.text
    assert refused.json()["limit"] == "max_queued_images" and "at most 3" in refused.json()["error"]
    assert http.post("/txt2img", json={**slow, "batch_size": 2}, headers=auth("bob")).status_code == 200
    never = http.post("/txt2img", json={**TINY, "batch_size": 4}, headers=auth("capped"))
    assert never.status_code == 422 and never.json()["field"] == "batch_size", never.text
    assert http.delete(f"/queue/{first}", headers=auth("capped")).status_code == 200
    answers = [http.post("/txt2img", json=TINY, headers=auth("capped")) for _ in range(6)]
    statuses = [answer.status_code for answer in answers]
    assert statuses[0] == 200 and statuses[-1] == 429, statuses  # 6 a minute, the first already taken
    limited = next(answer for answer in answers if answer.status_code == 429)
    assert limited.json()["limit"] in ("requests_per_minute", "max_queued_images")
    rate = [a for a in answers if a.status_code == 429 and a.json()["limit"] == "requests_per_minute"]
    for answer in rate:
        assert 1 <= int(answer.headers["Retry-After"]) <= 10 and "per minute" in answer.json()["error"]
    for _ in range(3):  # meanwhile everyone else is answered as before
        assert http.post("/txt2img", json=TINY, headers=auth("alice")).status_code == 200
    a1111 = http.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "width": 64, "height": 64},
                      headers=auth("capped"))  # fmt: skip
    assert a1111.status_code == 429 and "Retry-After" in a1111.headers  # A1111's door has the same limits


def test_the_queue_listing_shows_the_callers_own_jobs_newest_first_in_pages(keyed):
    http = keyed["http"]
    mine = [submit(http, "late", {**TINY, "seed": seed}) for seed in range(3)]
    theirs = submit(http, "early", TINY)
    page = http.get("/queue", params={"limit": 2}, headers=auth("late"))
    assert page.status_code == 200, page.text
    body = page.json()
    assert [job["job_id"] for job in body["jobs"]] == mine[::-1][:2] and body["next_cursor"]
    assert {job["key"] for job in body["jobs"]} == {"late"} and body["jobs"][0]["door"] == "native"
    rest = http.get("/queue", params={"limit": 2, "cursor": body["next_cursor"]}, headers=auth("late")).json()
    assert mine[0] in [job["job_id"] for job in rest["jobs"]] and theirs not in str(rest)
    assert http.get("/queue", params={"key": "early"}, headers=auth("late")).status_code == 403
    admin = http.get("/queue", params={"key": "early", "limit": 100}, headers=auth("ops")).json()
    assert theirs in [job["job_id"] for job in admin["jobs"]] and {job["key"] for job in admin["jobs"]} == {"early"}
    everyone = http.get("/queue", params={"limit": 100}, headers=auth("ops")).json()
    assert {"late", "early"} <= {job["key"] for job in everyone["jobs"]}
    for job_id in mine:
        wait_done(http, job_id, "late")
    done = http.get("/queue", params={"state": "done", "limit": 100}, headers=auth("late")).json()
    assert set(mine) <= {job["job_id"] for job in done["jobs"]}
    assert http.get("/queue", params={"cursor": "not-a-cursor"}, headers=auth("late")).status_code == 422
    assert http.get("/queue", params={"state": "lost"}, headers=auth("late")).status_code == 422
    assert http.get("/queue", params={"limit": 101}, headers=auth("late")).status_code == 422


def test_a_late_key_is_served_before_the_early_keys_backlog(keyed):
    """The fairness scenario over HTTP: key `early` queues 32 jobs at once, then key `late` submits 2; `late`'s
    jobs are done before `early`'s 16th is (first come, first served would make them wait for all 32), and
    while they wait their status says where they stand."""
    from concurrent.futures import ThreadPoolExecutor

    http = keyed["http"]
    job = {**TINY, "steps": 12, "width": 128, "height": 128}
    with ThreadPoolExecutor(8) as pool:
        early = list(pool.map(lambda seed: submit(http, "early", {**job, "seed": seed}), range(32)))
    late = [submit(http, "late", {**job, "seed": 100 + index}) for index in range(2)]
    waiting = http.get(f"/queue/{late[1]}", headers=auth("late")).json()
    if waiting["state"] == "queued":
        assert waiting["queue_position"] is not None and waiting["queue_position"] <= 3, waiting
    for job_id in late:
        assert wait_done(http, job_id, "late")["state"] == "done"

    def early_active() -> int:
        listed = [http.get("/queue", params={"state": state, "limit": 100}, headers=auth("early")).json()["jobs"]
                  for state in ("queued", "processing")]  # fmt: skip
        return len([item for jobs in listed for item in jobs if item["job_id"] in early])

    finished_before = 32 - early_active()  # at most this many of early's jobs were done when late's last was
    assert finished_before < 16, finished_before
    deadline = time.monotonic() + 180
    while early_active() and time.monotonic() < deadline:  # they all end (done ones are pruned: 6 kept per key)
        time.sleep(1)
    assert early_active() == 0


def test_metrics_count_jobs_and_images_by_key_name_never_by_key(keyed):
    http = keyed["http"]
    job_id = submit(http, "bob", {**TINY, "batch_size": 2})
    assert wait_done(http, job_id, "bob")["state"] == "done"
    from prometheus_client.parser import text_string_to_metric_families

    text = http.get("/metrics", headers=auth("bob")).text
    found = {(family.name, sample.labels["state"], sample.labels["family"], sample.labels["key"]): sample.value
             for family in text_string_to_metric_families(text) for sample in family.samples}  # fmt: skip
    assert found[("diffusion_api_images", "done", "sd15", "bob")] >= 2  # images made
    assert found[("diffusion_api_jobs", "done", "sd15", "bob")] >= 1
    assert not any(secret in text for secret in KEYS.values())  # names only
