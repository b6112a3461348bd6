"""The speed option `cpu_offload: model` (diffusers' model CPU offload, for GPUs smaller than the model): every
part of a loaded model gets its offload hook, the jobs of every kind give the pixels they give without it, and
loading a job's LoRAs or IP-Adapter puts the hooks back for the engine's device (diffusers' own loaders put them
back for the default accelerator, which a CPU-only host has not).

This machine has no GPU, so the hooks' device here is the CPU: these tests hold the wiring (hooks, pixels, the
parts a job adds placed where the model runs, the hooks off while weights are loaded and reset after every job),
not the memory saved; `bench/gpu_bench.py --variants engine cpu_offload` measures that on a GPU."""

import numpy as np
import pytest
from PIL import Image

from pipelines.errors import JobCancelledError
from pipelines.generate import ImageEngine
from pipelines.schemas import Img2ImgRequest, Txt2ImgRequest
from pipelines.speed import SpeedOptions
from tests.unit.test_controlnet import as_base64, hint, pixels

BASE = {"prompt": "a lighthouse", "steps": 4, "width": 64, "height": 64, "seed": 5, "fileType": "png"}
IP_ADAPTER_UNIT = {"model": "ip-adapter_demo_sd15", "module": "ip-adapter_clip_sd15", "image": as_base64(hint())}


@pytest.fixture(scope="module")
def offloaded(catalog):
    return ImageEngine(catalog, device="cpu", max_loaded_models=2, speed=SpeedOptions(cpu_offload="model"))


def _hooked(pipe) -> dict[str, str]:
    """Each model part's offload hook and the device it runs the part on."""
    from accelerate.hooks import CpuOffload

    parts = {name: part for name, part in pipe.components.items() if hasattr(part, "parameters")}
    return {name: str(part._hf_hook.execution_device) for name, part in parts.items()
            if isinstance(getattr(part, "_hf_hook", None), CpuOffload)}  # fmt: skip


def test_every_part_of_a_loaded_model_is_offloaded(offloaded):
    loaded = offloaded.load("demo-sd15")
    assert "model CPU offload" in loaded.speed
    assert set(_hooked(loaded.pipe)) == {"text_encoder", "unet", "vae"}
    assert set(_hooked(offloaded.load("demo-flux-dev").pipe)) == {"text_encoder", "text_encoder_2", "transformer",
                                                                   "vae"}  # fmt: skip


@pytest.mark.parametrize(
    "fields",
    [
        {"model": "demo-sd15"},
        {"model": "demo-sd15", "loras": ["demo-sd15-kohya"], "vae": "demo-vae-ft"},
        {"model": "demo-sd15", "controlnet": [{"model": "demo-sd15-canny", "image": as_base64(hint())}]},
        {"model": "demo-sd15", "controlnet": [IP_ADAPTER_UNIT]},
        {"model": "demo-sd15", "hires": {"enabled": True, "scale": 2.0, "steps": 4, "denoising_strength": 0.5}},
        {"model": "Demo SDXL"},
        {"model": "demo-flux-dev", "loras": ["demo-flux-peft"]},
        {"model": "demo-sd35-single"},
    ],
    ids=["sd15", "lora+vae", "controlnet", "ip-adapter", "hires", "sdxl", "flux+lora", "sd35-single"],
)
def test_jobs_give_the_pixels_they_give_without_it(engine, offloaded, fields):
    ours = offloaded.generate(Txt2ImgRequest(**BASE, **fields))
    # The hooks move each part to its execution device per call: the same weights at other memory addresses,
    # which CPU kernels may round differently (SD 3.5's by 1/255 at most), so within 2/255, not always equal.
    difference = np.abs(pixels(ours) - pixels(engine.generate(Txt2ImgRequest(**BASE, **fields))))
    assert difference.max() <= 2 and difference.mean() < 0.1
    assert not ours.warnings  # a LoRA that failed to load would be a warning, not an error
    # the hooks are back after the job's LoRA / IP-Adapter loads, for this engine's device
    assert set(_hooked(offloaded.load(fields["model"]).pipe).values()) == {"cpu:0"}


def test_img2img_and_inpainting_run_offloaded(engine, offloaded):
    image = as_base64(Image.new("RGB", (64, 64), (200, 40, 40)))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    for fields in ({"image": image, "denoising_strength": 0.6},
                   {"image": image, "mask": as_base64(mask), "inpainting_fill": 2}):  # fmt: skip
        request = Img2ImgRequest(**BASE, model="demo-sd15", **fields)
        assert np.array_equal(pixels(offloaded.generate(request)), pixels(engine.generate(request)))


def test_weights_are_loaded_with_the_hooks_off_and_put_back_for_the_engines_device(offloaded, monkeypatch):
    """diffusers' textual-inversion loader would put the hooks back for the text encoder's device, which between
    jobs is the CPU: on a GPU host every later job would run on the CPU. The engine takes them off first."""
    loaded = offloaded.load("demo-sd15")
    device = loaded.pipe._offload_device
    seen = []
    original = loaded.pipe.load_textual_inversion

    def spy(*args, **kwargs):
        seen.append([name for name, part in loaded.pipe.components.items() if hasattr(part, "_hf_hook")])
        return original(*args, **kwargs)

    monkeypatch.setattr(loaded.pipe, "load_textual_inversion", spy)
    result = offloaded.generate(Txt2ImgRequest(**{**BASE, "prompt": "a lighthouse, demo-style"}, model="demo-sd15"))
    assert seen and all(hooked == [] for hooked in seen) and not result.warnings
    assert loaded.pipe._offload_device == device and set(_hooked(loaded.pipe)) == {"text_encoder", "unet", "vae"}


def test_a_job_that_stops_midway_leaves_every_part_offloaded(engine, offloaded, monkeypatch):
    """diffusers offloads only after a call that returns: a cancelled (or out-of-memory) job would leave its
    denoiser on the GPU for the next job to run out of memory beside. The job's scope resets the offload."""
    loaded = offloaded.load("demo-sd15")
    resets = []
    original = loaded.pipe.enable_model_cpu_offload
    monkeypatch.setattr(loaded.pipe, "enable_model_cpu_offload", lambda **kw: (resets.append(kw), original(**kw)))

    def cancel(done, total, phase):
        if done >= 2:
            raise JobCancelledError("cancelled by request")

    with pytest.raises(JobCancelledError):
        offloaded.generate(Txt2ImgRequest(**BASE, model="demo-sd15"), progress=cancel)
    assert resets == [{"device": loaded.pipe._offload_device}]
    assert all(str(next(loaded.pipe.components[name].parameters()).device) == "cpu" for name in _hooked(loaded.pipe))
    after = offloaded.generate(Txt2ImgRequest(**BASE, model="demo-sd15"))
    assert np.array_equal(pixels(after), pixels(engine.generate(Txt2ImgRequest(**BASE, model="demo-sd15"))))


def test_cuda_graph_compile_modes_are_refused_with_offload():
    with pytest.raises(ValueError, match="records CUDA graphs"):
        SpeedOptions(cpu_offload="model", compile=True, compile_mode="reduce-overhead")
    assert SpeedOptions(cpu_offload="model", compile=True).compile_mode == "max-autotune-no-cudagraphs"
