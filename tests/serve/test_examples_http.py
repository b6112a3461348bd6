"""The client examples in examples/ run against the service (the production config, as `make serve` runs it),
each taking its URL from DIFFUSION_API_URL and exiting non-zero when a job fails."""

import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from pipelines.infotext import read_infotext
from pipelines.settings import PROJECT_ROOT
from tests.serve.conftest import PORT

EXAMPLES = PROJECT_ROOT / "examples"


def run_example(tmp_path, *command: str, timeout: float = 300, **env_vars: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DIFFUSION_API_URL": f"http://127.0.0.1:{PORT}", **env_vars}
    return subprocess.run(list(command), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def test_example_usage_generates_watches_and_saves(service, tmp_path):
    done = run_example(tmp_path, sys.executable, str(EXAMPLES / "example_usage.py"), "--steps", "40", "--width",
                       "128", "--height", "192", "--seed", "5", "--out", "fox.png")  # fmt: skip
    assert done.returncode == 0, done.stderr
    image = Image.open(tmp_path / "fox.png")
    assert image.size == (128, 192)
    assert "Seed: 5" in read_infotext(image) and "Seed: 5" in done.stdout
    assert "generation" in done.stderr and "saved fox.png" in done.stderr  # its progress lines


def test_example_usage_exits_non_zero_when_the_service_refuses(service, tmp_path):
    done = run_example(tmp_path, sys.executable, str(EXAMPLES / "example_usage.py"), "--width", "65")
    assert done.returncode != 0 and "422" in done.stderr and "width" in done.stderr


def test_example_img2img_refiner_redraws_with_the_refiner(service, tmp_path):
    done = run_example(tmp_path, sys.executable, str(EXAMPLES / "example_img2img_refiner.py"), "--size", "64",
                       "--steps", "10", "--out", "refined.png")  # fmt: skip
    assert done.returncode == 0, done.stderr
    image = Image.open(tmp_path / "refined.png")
    assert image.size == (64, 64)
    assert "Refiner: " in read_infotext(image) and "Refiner switch at: 0.8" in done.stdout


def test_the_curl_example_watches_the_events_and_fetches_the_image(service, tmp_path):
    if shutil.which("curl") is None:
        pytest.skip("the curl example needs curl (apt-get install curl)")
    done = run_example(tmp_path, "bash", str(EXAMPLES / "curl.sh"), 'a "quoted" lighthouse', "out.png", SIZE="96",
                       STEPS="30")  # fmt: skip
    assert done.returncode == 0, done.stderr
    image = Image.open(tmp_path / "out.png")
    assert image.size == (96, 96) and 'a "quoted" lighthouse' in read_infotext(image)
    assert '"progress"' in done.stderr  # the progress events it printed
    assert "saved out.png" in done.stderr


def test_the_webuiapi_example_runs_through_the_a1111_api(service, tmp_path):
    done = run_example(tmp_path, sys.executable, str(EXAMPLES / "webuiapi_example.py"), "--steps", "4", "--size",
                       "64", "--batch-size", "2")  # fmt: skip
    assert done.returncode == 0, done.stderr
    seeds = [Image.open(tmp_path / f"example_webuiapi-{index}.png") for index in (0, 1)]
    assert [image.size for image in seeds] == [(64, 64), (64, 64)]
    assert "Seed: 7" in done.stdout and "seeds [7, 8]" in done.stderr


def test_the_openai_sdk_example_runs_every_call_of_the_openai_door(service, tmp_path):
    done = run_example(tmp_path, sys.executable, str(EXAMPLES / "openai_sdk.py"), "--steps", "4", "--size",
                       "64x64")  # fmt: skip
    assert done.returncode == 0, done.stderr
    names = ["example_openai-0.png", "example_openai-1.png", "example_openai-url.png", "example_openai-edit.png",
             "example_openai-variation.png", "example_openai-streamed.png"]  # fmt: skip
    assert all(Image.open(tmp_path / name).size == (64, 64) for name in names)
    assert "Seed: 7" in done.stdout
    assert read_infotext(Image.open(tmp_path / "example_openai-url.png")).startswith("a red fox")
    refused = run_example(tmp_path, sys.executable, str(EXAMPLES / "openai_sdk.py"), "--model", "dall-e-3")
    assert refused.returncode == 1 and "model_not_found" in refused.stderr
