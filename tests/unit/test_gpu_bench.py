"""bench/gpu_bench.py stays runnable: its --tiny CPU run (the demo's tiny models) must finish and report every way
of running the jobs, for every model (SD1.5, SDXL, FLUX.1-dev, SD 3.5), with numbers. The full-size run needs a
GPU and is run by hand."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch

from pipelines.settings import PROJECT_ROOT

BENCH = PROJECT_ROOT / "bench" / "gpu_bench.py"
WAYS = [
    "plain diffusers",
    "engine",
    "engine + channels_last",
    "engine + fuse_qkv",
    "engine + compile",
    "engine + eager attention",
    "engine + vae_tiling=always",
    "engine + model CPU offload",
    "engine + all fast",
    "engine + ControlNet",
    "engine + IP-Adapter",
]
MODELS = ["sd15", "sdxl", "flux", "sd35"]
FLOW_MODELS = ("flux", "sd35")  # transformers: the UNet-only ways do not run on them
UNET_ONLY_WAYS = ("engine + channels_last", "engine + fuse_qkv", "engine + eager attention", "engine + ControlNet",
                  "engine + IP-Adapter")  # fmt: skip
NUMBER = re.compile(r"^\d+(\.\d+)?$")


def table_rows(text: str) -> list[list[str]]:
    """The cells of every Markdown table row except headers and separators."""
    rows = []
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith(("| way ", "| vae ")):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, str]:
    """One --tiny run on the CPU, appending to a results file of its own."""
    results = tmp_path_factory.mktemp("gpu-bench") / "RESULTS.md"
    env = {key: value for key, value in os.environ.items() if not key.startswith("DIFFUSION_API_")}
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    completed = subprocess.run(
        [sys.executable, str(BENCH), "--tiny", "--device", "cpu", "--results", str(results)],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, f"stdout:\n{completed.stdout[-4000:]}\nstderr:\n{completed.stderr[-4000:]}"
    return completed, results.read_text()


def test_tiny_run_reports_every_way_and_model_with_numbers(tiny_run):
    completed, _ = tiny_run
    rows = [row for row in table_rows(completed.stdout) if len(row) == 10]
    for model in MODELS:
        for way in WAYS:
            found = [row for row in rows if row[0] == way and row[1] == model]
            if model in FLOW_MODELS and way in UNET_ONLY_WAYS:
                assert found == [], f"{way} / {model}: {found}"
                continue
            assert [row[2] for row in found] == ["1", "2"], f"{way} / {model}: {found}"
            for row in found:
                if way == "engine + compile" and "skipped" in row[9]:
                    continue  # torch.compile takes minutes on a small CPU; the full run keeps it
                s_per_image, its, images_per_s, peak = row[5:9]
                assert all(NUMBER.match(cell) for cell in (s_per_image, its, images_per_s, peak)), row
                assert float(s_per_image) > 0 and float(images_per_s) > 0 and float(peak) > 0, row
    assert "torch.compile skipped" in completed.stdout
    vae_rows = [row for row in table_rows(completed.stdout) if len(row) == 5]
    assert [row[2].split()[0] for row in vae_rows] == ["off", "on"]
    assert all(NUMBER.match(row[3]) and NUMBER.match(row[4]) for row in vae_rows), vae_rows
    assert "not checked (--tiny" in completed.stdout  # the GPU targets are named, not judged, on the CPU


def test_tiny_run_appends_a_dated_table(tiny_run):
    completed, results = tiny_run
    heading = next(line for line in results.splitlines() if line.startswith("## "))
    assert re.match(r"## \d{4}-\d{2}-\d{2} \d{2}:\d{2} gpu_bench — ", heading)
    assert f"torch {torch.__version__}" in heading and "diffusers " in heading
    assert "float32" in heading and "`--tiny`" in heading and "CPUs" in heading
    assert "| way | model | batch | size | steps | s/image | it/s | img/s | peak RSS MiB" in results
    assert table_rows(results) == table_rows(completed.stdout)


@pytest.fixture(scope="module")
def bench_module():
    spec = importlib.util.spec_from_file_location("gpu_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_targets_are_judged_on_cuda_full_size(bench_module):
    """The target check can only run for real on a GPU; its arithmetic is checked here."""
    Row, Report = bench_module.Row, bench_module.Report
    report = Report("peak GPU MiB (max_memory_allocated)")
    report.rows += [
        Row("plain diffusers", "sd15", 1, (512, 512), 30, seconds=0.10),  # not the engine: ignored
        Row("engine", "sd15", 1, (512, 512), 30, seconds=0.40),
        Row("engine + all fast", "sd15", 1, (512, 512), 30, seconds=0.25),
        Row("engine", "sdxl", 1, (1024, 1024), 30, seconds=1.5),
        Row("engine", "sdxl", 4, (1024, 1024), 30, seconds=3.2),  # 1.25 img/s
    ]
    lines = bench_module.check_targets(report, torch.device("cuda"), torch.bfloat16, tiny=False)
    sd15, sdxl, throughput = lines
    assert "defaults 0.400 s not met" in sd15 and "best engine + all fast 0.250 s MET" in sd15
    assert "defaults 1.500 s not met" in sdxl and "best engine 1.500 s not met" in sdxl
    assert "1.25 img/s (engine, batch 4) MET" in throughput
    skipped = bench_module.check_targets(report, torch.device("cpu"), torch.float32, tiny=True)
    assert len(skipped) == 1 and "not checked" in skipped[0]
