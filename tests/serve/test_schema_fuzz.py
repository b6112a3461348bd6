"""schemathesis, with every check, against the running service's own `/openapi.json`: every operation, valid and
invalid input, as a client generated from the schema would send it.

The run is the operator's command (`schemathesis run URL --checks all --exclude-checks use_after_free`) from the
repository root, so it reads `schemathesis.toml` there (the `image-base64` format, the long poll's time limit).
The one check off: the API's one DELETE cancels a job, which stays readable, and the use-after-free check would
call that a deleted resource still there; it is off on the command line, since `--checks all` there overrides a
check turned off per operation in the toml (a random seed found that it did). No baseline file. Five operations
are left out: the synchronous generation calls, A1111's `POST /sdapi/v1/txt2img` and `/img2img` and OpenAI's
`POST /v1/images/generations`, `/edits` and `/variations`, hold each request until its images are made (minutes
for a large image on the CPU), so a fuzzing run would spend its budget waiting on a few of them; their validation
is the native `/txt2img` and `/img2img` one, fuzzed here, after
translations tested in tests/unit/test_a1111.py, tests/unit/test_openai_images.py and tests/serve/
(test_sdapi_http.py, test_openai_http.py). The seed is random and printed; a failure is replayed with
`DIFFUSION_API_FUZZ_SEED=<seed>`. The time budget fits CI (`DIFFUSION_API_FUZZ_SECONDS`, default 150; the README's
manual run uses 420). Jobs the fuzzing got accepted are cancelled afterwards, and the test waits for the generators
to stop, so they do not hold the CPU for the tests after this one.
"""

import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx

from pipelines.settings import PROJECT_ROOT
from tests.serve.conftest import PORT

BASE_URL = f"http://127.0.0.1:{PORT}"
FUZZ_SECONDS = int(os.environ.get("DIFFUSION_API_FUZZ_SECONDS", "150"))
OPERATIONS = 58  # every route of the API; new endpoints join the count as they land
SYNCHRONOUS_GENERATION = "^(/sdapi/v1/(txt2img|img2img)|/v1/images/(generations|edits|variations))$"  # see above
LEFT_OUT = 5  # the operations SYNCHRONOUS_GENERATION matches


def schemathesis_command() -> str:
    found = Path(sys.executable).parent / "schemathesis"
    return str(found) if found.exists() else shutil.which("schemathesis") or "schemathesis"


def active_jobs(database: str) -> list[str]:
    with sqlite3.connect(database) as db:
        return [row[0] for row in db.execute("SELECT job_id FROM jobs WHERE state IN ('queued', 'processing')")]


def cancel_active_jobs(database: str, timeout: float = 420.0) -> int:
    """Cancels what the fuzzing left queued or running and waits for the generators to stop: a job stops at
    its next step, but a 2048 x 2048 image on the CPU spends minutes in one step or in its VAE decode."""
    cancelled = active_jobs(database)
    for job_id in cancelled:
        httpx.delete(f"{BASE_URL}/queue/{job_id}", timeout=30)
    deadline = time.monotonic() + timeout
    while active_jobs(database) and time.monotonic() < deadline:
        time.sleep(2)
    return len(cancelled)


def test_schemathesis_with_every_check_finds_no_failure(service):
    seed = int(os.environ.get("DIFFUSION_API_FUZZ_SEED") or random.randrange(2**31))
    print(f"schemathesis seed {seed} (replay: DIFFUSION_API_FUZZ_SEED={seed})")
    command = [schemathesis_command(), "run", f"{BASE_URL}/openapi.json", "--checks", "all",
               "--exclude-checks", "use_after_free",
               "--max-time", str(FUZZ_SECONDS), "--seed", str(seed), "--no-color",
               "--exclude-path-regex", SYNCHRONOUS_GENERATION]  # fmt: skip
    options = httpx.get(f"{BASE_URL}/sdapi/v1/options", timeout=30).json()
    try:
        done = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=FUZZ_SECONDS + 600)
    finally:
        cancelled = cancel_active_jobs(service["database"])
        # The fuzzing may have set the service-wide default model: the tests after this one expect the demo's.
        httpx.post(f"{BASE_URL}/sdapi/v1/options", json={"sd_model_checkpoint": options["sd_model_checkpoint"]})
    report = done.stdout + done.stderr
    print(report[-30000:])
    print(f"cancelled {cancelled} job(s) the fuzzing left queued or running")
    assert done.returncode == 0, f"schemathesis found failures (seed {seed}); its report is printed above"
    assert f"{OPERATIONS - LEFT_OUT} selected / {OPERATIONS} total" in report
    # The run really exercised the API (schemathesis also exits non-zero when a phase errors out).
    generated = re.search(r"Test cases:\s*\n?\s*(\d+) generated", report)
    assert generated and int(generated.group(1)) > 500, report[-3000:]
