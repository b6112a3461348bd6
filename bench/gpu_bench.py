"""GPU benchmark of the image engine: plain diffusers vs the engine vs the engine with each speed option on (model
CPU offload included: its peak GPU memory is the point; it needs `accelerate`), and with one ControlNet unit or one
IP-Adapter unit (what each costs on the architecture; the IP-Adapter way includes loading the adapter into the UNet
and the ViT-H/14 image encoder's pass, as every such job does).

Builds full-size SD1.5, SDXL, FLUX.1-dev and SD 3.5 Large architectures with random weights (compute does not
depend on the weight values), directly on the device, so no checkpoint and no download is needed. FLUX.1 runs as
Forge runs it (cfg_scale 1, distilled guidance 3.5: one transformer pass per step), SD 3.5 with CFG 4.5; the
UNet-only ways (channels_last, fuse_qkv, eager attention, ControlNet, IP-Adapter) are SD1.5/SDXL's. Imports
`pipelines/` only (no Ray, no FastAPI): it runs on a bare GPU machine with torch + diffusers + transformers and
this checkout (plus the engine's small imports: pydantic, psutil, piexif). `--tiny` runs the demo's tiny models
at 64x64 (on the CPU where there is no GPU, or with `--device cpu`) in about half a minute, so a unit test keeps
it working.

    python bench/gpu_bench.py                                # CUDA, full size, appends to bench/RESULTS.md
    python bench/gpu_bench.py --models sdxl --batches 1 4    # a shorter run
    python bench/gpu_bench.py --models flux sd35 --variants plain engine compile    # the flow models
    python bench/gpu_bench.py --tiny --no-results            # the CPU smoke run of the unit test

Reported per (way, model, batch): seconds per image end to end, it/s of the denoising loop (steps per second
of the whole batch, first step to last, so text encoding and decoding are left out), images per second and
peak memory (GPU: torch.cuda.max_memory_allocated; CPU: the process's peak RSS).
"""

import argparse
import contextlib
import datetime
import gc
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import get_args

STARTED = time.perf_counter()
USER_INDUCTOR_CACHE = os.environ.get("TORCHINDUCTOR_CACHE_DIR")  # read before torch's imports set a default
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # a bare GPU machine runs this from a checkout, with nothing installed

import torch  # noqa: E402  (after the sys.path line above)

try:
    from pipelines.catalog import Family, ModelCatalog, ModelEntry
    from pipelines.demo import SD15_SCHEDULER, SDXL_SCHEDULER, build_sd15, build_sdxl_base
    from pipelines.demo_flow import FLUX_SCHEDULER, T5_SPECIAL_IDS, build_flux, build_sd35, t5_tokenizer
    from pipelines.errors import OutOfMemoryError
    from pipelines.families import family_of
    from pipelines.generate import ImageEngine
    from pipelines.models import LoadedModel, select_device
    from pipelines.schemas import Txt2ImgRequest
    from pipelines.settings import Settings
    from pipelines.speed import CompileMode, SpeedOptions, set_vae_tiling
    from pipelines.tokenizer import write_tokenizer_files
except ModuleNotFoundError as missing:  # the engine needs a few small packages beyond torch/diffusers/transformers
    raise SystemExit(
        f"gpu_bench: {missing}. Besides torch, diffusers, transformers and their dependencies, the engine imports "
        "pydantic, psutil and piexif: pip install pydantic psutil piexif"
    ) from missing

# Random weights give NaN images now and then; converting them to PIL warns, and the warning is noise here.
warnings.filterwarnings("ignore", message="invalid value encountered in cast", category=RuntimeWarning)

CFG_SCALE = 7.0
# The same sampler both ways, so both run exactly `steps` UNet calls (the SD1.5 PNDM default runs steps + 1).
SAMPLER = "Euler"
PROMPTS = (
    "a photo of an astronaut riding a horse on the moon, highly detailed",
    "portrait of a woman, detailed face, sharp focus, studio lighting",
    "a beautiful landscape with mountains and trees, sunset, golden hour",
    "futuristic cityscape with neon lights, cyberpunk, rain, night",
    "a cute cat sitting on a window, soft light, illustration",
    "oil painting of a castle by the sea, clouds, birds",
    "a forest river in winter, snow, cinematic, film grain",
    "colorful flowers in a garden, pastel, digital painting",
)

# Published targets, checked on CUDA (full size only): model -> (size, steps).
TARGET_JOBS = {"sd15": ((512, 512), 30), "sdxl": ((1024, 1024), 30)}
TARGET_SD15_LATENCY = 0.30  # s/image, batch 1, through the engine, bfloat16
TARGET_SDXL_LATENCY = 1.3  # s/image, batch 1
TARGET_SDXL_THROUGHPUT = 1.1  # img/s, best batch

# Published architectures, as plain dicts ------------------------------------------------------------------
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)  # fmt: skip
CLIP_VIT_L = dict(
    hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, projection_dim=768,
    max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu",
)  # fmt: skip
CLIP_BIG_G = dict(
    hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32, projection_dim=1280,
    max_position_embeddings=77, vocab_size=49408, hidden_act="gelu",
)  # fmt: skip
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    act_fn="silu", sample_size=512, scaling_factor=0.18215,
)  # fmt: skip
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)  # fmt: skip
SDXL_VAE = {**SD15_VAE, "scaling_factor": 0.13025, "force_upcast": True}
# FLUX.1-dev: 12 B transformer (19 double + 38 single blocks, 3072 wide), T5-XXL, CLIP-L, a 16-channel VAE.
FLUX_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)  # fmt: skip
T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, vocab_size=32128,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, is_encoder_decoder=False,
              use_cache=False)  # fmt: skip
VAE_16 = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    act_fn="silu", sample_size=1024, use_quant_conv=False, use_post_quant_conv=False,
)  # fmt: skip
FLUX_VAE = {**VAE_16, "scaling_factor": 0.3611, "shift_factor": 0.1159}
# SD 3.5 Large: 8 B MMDiT (38 blocks, 2432 wide, QK norm), CLIP-L and CLIP-G with projections, T5-XXL.
SD35_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64, num_attention_heads=38,
    joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192, qk_norm="rms_norm",
)  # fmt: skip
SD35_VAE = {**VAE_16, "scaling_factor": 1.5305, "shift_factor": 0.0609}
FLOW_FAMILIES = ("flux", "sd3")  # transformer models: no UNet-only speed options, no ControlNet / IP-Adapter here
UNET_ONLY_WAYS = ("channels_last", "fuse_qkv", "eager", "controlnet", "ip_adapter")


@dataclass(frozen=True)
class ModelSpec:
    """One benchmarked model: its family and the job sizes it is timed at."""

    key: str
    family: Family
    size: tuple[int, int]  # width, height of the timed jobs
    second_size: tuple[int, int]  # a second shape, to see whether torch.compile recompiles per size


FULL_MODELS = {
    "sd15": ModelSpec("sd15", "sd15", (512, 512), (768, 512)),
    "sdxl": ModelSpec("sdxl", "sdxl", (1024, 1024), (1152, 896)),
    "flux": ModelSpec("flux", "flux", (1024, 1024), (1152, 896)),
    "sd35": ModelSpec("sd35", "sd3", (1024, 1024), (1152, 896)),
}
TINY_MODELS = {
    "sd15": ModelSpec("sd15", "sd15", (64, 64), (96, 64)),
    "sdxl": ModelSpec("sdxl", "sdxl", (64, 64), (96, 64)),
    "flux": ModelSpec("flux", "flux", (64, 64), (96, 64)),
    "sd35": ModelSpec("sd35", "sd3", (64, 64), (96, 64)),
}


def guidance_of(family: str) -> dict:
    """The request fields of a timed job: SD1.5/SDXL at CFG 7, the flow models at their family's defaults
    (FLUX.1: cfg_scale 1 and distilled guidance 3.5, as Forge runs it; SD 3.5: CFG 4.5)."""
    return {} if family in FLOW_FAMILIES else {"cfg_scale": CFG_SCALE, "sampler_name": SAMPLER}


@dataclass(frozen=True)
class Variant:
    """A way of running the jobs: plain diffusers (`speed` None) or the engine with these speed options."""

    key: str
    way: str
    speed: SpeedOptions | None
    controlnet: bool = False  # one ControlNet unit (module none) on every job: what ControlNet costs
    ip_adapter: bool = False  # one IP-Adapter unit (a plain adapter, a ViT-H/14 encoder) on every job


def variants(compile_mode: str, compile_allowed: bool) -> list[Variant]:
    """Every way the jobs are timed; "all fast" is the options meant to speed things up, together."""
    fast = {"channels_last": True, "fuse_qkv": True, "compile": compile_allowed, "compile_mode": compile_mode}
    return [
        Variant("plain", "plain diffusers", None),
        Variant("engine", "engine", SpeedOptions()),
        Variant("channels_last", "engine + channels_last", SpeedOptions(channels_last=True)),
        Variant("fuse_qkv", "engine + fuse_qkv", SpeedOptions(fuse_qkv=True)),
        Variant("compile", "engine + compile", SpeedOptions(compile=True, compile_mode=compile_mode)),
        Variant("eager", "engine + eager attention", SpeedOptions(attention="eager")),
        Variant("vae_tiling", "engine + vae_tiling=always", SpeedOptions(vae_tiling="always")),
        Variant("cpu_offload", "engine + model CPU offload", SpeedOptions(cpu_offload="model")),
        Variant("all_fast", "engine + all fast", SpeedOptions(**fast)),
        Variant("controlnet", "engine + ControlNet", SpeedOptions(), controlnet=True),
        Variant("ip_adapter", "engine + IP-Adapter", SpeedOptions(), ip_adapter=True),
    ]


VARIANT_KEYS = [variant.key for variant in variants("default", True)]


# Building the pipelines ---------------------------------------------------------------------------------
def on_device(build: Callable[[], torch.nn.Module], device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Initialises a module straight on `device`, so a 2.6 B-parameter UNet never sits in CPU memory."""
    with torch.device(device):
        module = build()
    return module.to(dtype).eval()


def clip_tokenizer(files: Path, pad_token: str | None = None):
    """The project's in-house CLIP tokenizer (trained offline, no download); SDXL's second one pads with '!'."""
    from transformers import CLIPTokenizer

    if not (files / "vocab.json").exists():
        write_tokenizer_files(files)
    extra = {"pad_token": pad_token} if pad_token else {}
    return CLIPTokenizer.from_pretrained(files, model_max_length=77, **extra)


def clip_encoder(config: dict, tokenizer, device: torch.device, dtype: torch.dtype, with_projection: bool = False):
    """A CLIP text encoder of the published size whose special token ids are the tokenizer's."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return on_device(lambda: model_class(CLIPTextConfig(**config, **ids)), device, dtype)


def full_sd15(work: Path, device: torch.device, dtype: torch.dtype):
    """SD1.5 at its published size, random weights."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tokenizer = clip_tokenizer(work / "tokenizer")
    return StableDiffusionPipeline(
        vae=on_device(lambda: AutoencoderKL(**SD15_VAE), device, dtype),
        text_encoder=clip_encoder(CLIP_VIT_L, tokenizer, device, dtype), tokenizer=tokenizer,
        unet=on_device(lambda: UNet2DConditionModel(**SD15_UNET), device, dtype),
        scheduler=PNDMScheduler(**SD15_SCHEDULER), safety_checker=None, feature_extractor=None,
        image_encoder=None, requires_safety_checker=False,
    )  # fmt: skip


def full_sdxl(work: Path, device: torch.device, dtype: torch.dtype):
    """SDXL base at its published size, random weights."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer, tokenizer_2 = clip_tokenizer(work / "tokenizer"), clip_tokenizer(work / "tokenizer", pad_token="!")
    return StableDiffusionXLPipeline(
        vae=on_device(lambda: AutoencoderKL(**SDXL_VAE), device, dtype),
        text_encoder=clip_encoder(CLIP_VIT_L, tokenizer, device, dtype),
        text_encoder_2=clip_encoder(CLIP_BIG_G, tokenizer_2, device, dtype, with_projection=True),
        tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        unet=on_device(lambda: UNet2DConditionModel(**SDXL_UNET), device, dtype),
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER), image_encoder=None, feature_extractor=None,
        add_watermarker=False,
    )  # fmt: skip


def t5_encoder(device: torch.device, dtype: torch.dtype):
    """T5-XXL's encoder at its published size, with T5's special token ids."""
    from transformers import T5Config, T5EncoderModel

    return on_device(lambda: T5EncoderModel(T5Config(**T5_XXL, **T5_SPECIAL_IDS)), device, dtype)


def full_flux(work: Path, device: torch.device, dtype: torch.dtype):
    """FLUX.1-dev at its published size, random weights."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tokenizer = clip_tokenizer(work / "tokenizer")
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        vae=on_device(lambda: AutoencoderKL(**FLUX_VAE), device, dtype),
        text_encoder=clip_encoder(CLIP_VIT_L, tokenizer, device, dtype), tokenizer=tokenizer,
        text_encoder_2=t5_encoder(device, dtype), tokenizer_2=t5_tokenizer(),
        transformer=on_device(lambda: FluxTransformer2DModel(**FLUX_TRANSFORMER), device, dtype),
        image_encoder=None, feature_extractor=None,
    )  # fmt: skip


def full_sd35(work: Path, device: torch.device, dtype: torch.dtype):
    """SD 3.5 Large at its published size, random weights."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    tokenizer, tokenizer_2 = clip_tokenizer(work / "tokenizer"), clip_tokenizer(work / "tokenizer", pad_token="!")
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=on_device(lambda: AutoencoderKL(**SD35_VAE), device, dtype),
        text_encoder=clip_encoder(CLIP_VIT_L, tokenizer, device, dtype, with_projection=True), tokenizer=tokenizer,
        text_encoder_2=clip_encoder(CLIP_BIG_G, tokenizer_2, device, dtype, with_projection=True),
        tokenizer_2=tokenizer_2, text_encoder_3=t5_encoder(device, dtype), tokenizer_3=t5_tokenizer(),
        transformer=on_device(lambda: SD3Transformer2DModel(**SD35_TRANSFORMER), device, dtype),
    )  # fmt: skip


TINY_BUILDERS = {"sd15": build_sd15, "sdxl": build_sdxl_base, "flux": build_flux, "sd35": build_sd35}
FULL_BUILDERS = {"sd15": full_sd15, "sdxl": full_sdxl, "flux": full_flux, "sd35": full_sd35}


def build_pipeline(key: str, tiny: bool, work: Path, device: torch.device, dtype: torch.dtype):
    """A fresh pipeline (speed options change modules in place, so every variant gets its own)."""
    if tiny:  # the demo's tiny models, built on the CPU (they are small)
        pipe = TINY_BUILDERS[key](work / "tiny")
        pipe.to(device=device, dtype=None if dtype == pipe.vae.dtype else dtype)
    else:
        pipe = FULL_BUILDERS[key](work, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_vae(key: str, tiny: bool, work: Path, device: torch.device, dtype: torch.dtype):
    """The model's VAE alone, for the large-decode measurement."""
    if tiny:
        return build_pipeline(key, tiny, work, device, dtype).vae
    from diffusers import AutoencoderKL

    config = {"sd15": SD15_VAE, "sdxl": SDXL_VAE, "flux": FLUX_VAE, "sd35": SD35_VAE}[key]
    return on_device(lambda: AutoencoderKL(**config), device, dtype)


def parameter_count(pipe) -> str:
    """The parameters of the UNet or transformer, text encoders and VAE (shows the full-size models are full
    size)."""
    names = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae")
    modules = [getattr(pipe, name, None) for name in names]
    count = sum(p.numel() for module in modules if module is not None for p in module.parameters())
    return f"{count / 1e9:.2f} B" if count >= 1e8 else f"{count / 1e6:.2f} M"


# Measuring -----------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    """Waits for queued GPU work, so wall-clock times cover the work itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory of one measurement: torch's peak allocation on CUDA, else the process's peak RSS (reset
    through /proc/self/clear_refs on Linux; where that fails, the peak since the process started)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.resettable = device.type == "cuda" or self._reset_rss()
        if device.type == "cuda":
            self.label = "peak GPU MiB (max_memory_allocated)"
        else:
            self.label = "peak RSS MiB (process)" if self.resettable else "peak RSS MiB (process, since start)"

    @staticmethod
    def _reset_rss() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.resettable:
            self._reset_rss()

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.resettable:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


class StepClock:
    """Times the denoising loop from the end of its first step to the end of its last, so it/s leaves out text
    encoding and VAE decoding. Synchronises only at those two steps."""

    def __init__(self, device: torch.device):
        self.device = device
        self.ticks = 0
        self.first = self.last = 0.0

    def tick(self, final: bool) -> None:
        self.ticks += 1
        if self.ticks == 1 or final:
            synchronize(self.device)
            now = time.perf_counter()
            self.first = now if self.ticks == 1 else self.first
            self.last = now if final else self.last

    def steps_per_second(self) -> float | None:
        if self.ticks < 2 or self.last <= self.first:
            return None
        return (self.ticks - 1) / (self.last - self.first)


Job = Callable[[StepClock], None]


def timed(job: Job, device: torch.device) -> tuple[float, float | None]:
    """One call: (seconds end to end, denoising steps per second)."""
    clock = StepClock(device)
    synchronize(device)
    started = time.perf_counter()
    job(clock)
    synchronize(device)
    return time.perf_counter() - started, clock.steps_per_second()


@dataclass
class Measurement:
    seconds: float  # median of the timed calls, for the whole batch
    steps_per_second: float | None
    peak_mb: float
    warmup_seconds: list[float]  # the untimed first calls (torch.compile compiles in the first)


def measure(job: Job, device: torch.device, memory: PeakMemory, warmup: int, repeats: int) -> Measurement:
    """Warm-up calls, then the median of `repeats` timed calls and their peak memory."""
    warm = [timed(job, device)[0] for _ in range(warmup)]
    memory.reset()
    runs = [timed(job, device) for _ in range(max(repeats, 1))]
    rates = [rate for _, rate in runs if rate is not None]
    return Measurement(
        seconds=statistics.median(seconds for seconds, _ in runs),
        steps_per_second=statistics.median(rates) if rates else None,
        peak_mb=memory.peak_mb(),
        warmup_seconds=warm,
    )


def plain_job(pipe, family: str, batch: int, size: tuple[int, int], steps: int) -> Job:
    """The pipeline called directly, as a diffusers user would, with the engine's sampler and guidance: Euler and
    CFG 7 with an empty negative prompt on SD1.5/SDXL; the model's own flow-matching Euler on FLUX.1 (distilled
    guidance 3.5, no negative pass) and SD 3.5 (CFG 4.5)."""
    from diffusers import EulerDiscreteScheduler

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    if family == "flux":
        guidance = {"guidance_scale": family_of("flux").distilled_cfg_scale}
    elif family == "sd3":
        guidance = {"guidance_scale": family_of("sd3").request_defaults["cfg_scale"], "negative_prompt": [""] * batch}
    else:
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        guidance = {"guidance_scale": CFG_SCALE, "negative_prompt": [""] * batch}

    def run(clock: StepClock) -> None:
        def on_step_end(pipeline, step_index, timestep, callback_kwargs):
            clock.tick(step_index + 1 >= pipeline.num_timesteps)
            return callback_kwargs

        pipe(prompt=prompts, num_inference_steps=steps, width=size[0], height=size[1], **guidance,
             generator=[torch.Generator("cpu").manual_seed(s) for s in range(batch)],
             callback_on_step_end=on_step_end)  # fmt: skip

    return run


def engine_job(engine: ImageEngine, loaded: LoadedModel, batch: int, size: tuple[int, int], steps: int,
               controlnet: str | None = None, ip_adapter: str | None = None) -> Job:  # fmt: skip
    """The engine as the service runs it: one request per image, prepared, then run as one batch (with one
    ControlNet unit of the model `controlnet`, a map of the job's size, or one IP-Adapter unit of `ip_adapter`
    with a reference image, when given)."""
    units = [{"model": controlnet, "image": hint_map(size)}] if controlnet else []
    if ip_adapter:
        units.append({"model": ip_adapter, "module": "ip-adapter_clip_h", "image": hint_map((224, 224))})

    def run(clock: StepClock) -> None:
        requests = [
            Txt2ImgRequest(
                prompt=PROMPTS[i % len(PROMPTS)],
                steps=steps,
                width=size[0],
                height=size[1],
                seed=i,
                controlnet=units,
                **guidance_of(loaded.entry.family),
            )  # fmt: skip
            for i in range(batch)
        ]
        jobs = [engine.prepare(request, loaded.entry) for request in requests]
        engine.run(loaded, jobs, progress=lambda done, total, _phase: clock.tick(done >= total))

    return run


# Results -------------------------------------------------------------------------------------------------
@dataclass
class Row:
    way: str
    model: str
    batch: int
    size: tuple[int, int]
    steps: int
    seconds: float | None = None  # the whole batch, median
    steps_per_second: float | None = None
    peak_mb: float | None = None
    note: str = ""

    def cells(self) -> list[str]:
        """The Markdown table cells; a row without a time says why in its note."""
        size = f"{self.size[0]}x{self.size[1]}"
        if self.seconds is None:
            numbers = ["-"] * 4
        else:
            its = f"{self.steps_per_second:.2f}" if self.steps_per_second else "-"
            numbers = [f"{self.seconds / self.batch:.3f}", its, f"{self.batch / self.seconds:.2f}",
                       f"{self.peak_mb:.0f}"]  # fmt: skip
        return [self.way, self.model, str(self.batch), size, str(self.steps), *numbers, self.note]


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


@dataclass
class Report:
    """Everything measured, printed at the end and appended to RESULTS.md."""

    memory_label: str
    rows: list[Row] = field(default_factory=list)
    vae_rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    built: set[str] = field(default_factory=set)  # models whose size is noted already

    def add(self, row: Row) -> None:
        self.rows.append(row)
        cells = row.cells()
        print(f"  {row.model:5} {row.way:28} b{row.batch}: s/image {cells[5]}, it/s {cells[6]}, img/s {cells[7]}, "
              f"{self.memory_label} {cells[8]} {row.note}".rstrip(), flush=True)  # fmt: skip

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  {text}", flush=True)

    def lines(self) -> list[str]:
        header = ["way", "model", "batch", "size", "steps", "s/image", "it/s", "img/s", self.memory_label, "note"]
        lines = markdown_table(header, [row.cells() for row in self.rows])
        if self.vae_rows:
            lines += ["", "VAE decode of one large image (hires outputs):", ""]
            lines += markdown_table(["vae", "image", "tiling", "s", self.memory_label], self.vae_rows)
        if self.notes:
            lines += [""] + [f"- {note}" for note in self.notes]
        return lines


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"


def heading(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> str:
    import diffusers

    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    dtype_name = str(dtype).removeprefix("torch.")
    tiny = " — `--tiny`" if args.tiny else ""
    return (f"## {stamp} gpu_bench — {machine_name(device)} ({device.type}) — torch {torch.__version__}, "
            f"diffusers {diffusers.__version__} — {dtype_name}{tiny}")  # fmt: skip


def check_targets(report: Report, device: torch.device, dtype: torch.dtype, tiny: bool) -> list[str]:
    """The published targets against the engine rows: the engine as configured by default, and its best
    variant (the speed options are the engine's own settings)."""
    if device.type != "cuda" or tiny:
        return [f"Targets (SD1.5 512x512 30 steps <= {TARGET_SD15_LATENCY} s/image, SDXL 1024x1024 30 steps <= "
                f"{TARGET_SDXL_LATENCY} s/image, SDXL >= {TARGET_SDXL_THROUGHPUT} img/s): not checked "
                f"({'--tiny' if tiny else device.type}; they are for a GPU at full size)."]  # fmt: skip
    lines = []
    if dtype != torch.bfloat16:
        lines.append(f"Note: the targets are for bfloat16; this run is {str(dtype).removeprefix('torch.')}.")

    def engine_rows(model: str) -> list[Row]:
        size, steps = TARGET_JOBS[model]
        return [row for row in report.rows if row.model == model and row.way.startswith("engine")
                and row.size == size and row.steps == steps and row.seconds]  # fmt: skip

    def verdict(met: bool) -> str:
        return "MET" if met else "not met"

    for model, limit, label in (("sd15", TARGET_SD15_LATENCY, "SD1.5 512x512 30 steps"),
                                ("sdxl", TARGET_SDXL_LATENCY, "SDXL 1024x1024 30 steps")):  # fmt: skip
        single = [row for row in engine_rows(model) if row.batch == 1]
        if not single:
            lines.append(f"Target {label} <= {limit} s/image: not measured (needs batch 1, {TARGET_JOBS[model][1]} "
                         "steps, engine variants).")  # fmt: skip
            continue
        default = next((row for row in single if row.way == "engine"), None)
        best = min(single, key=lambda row: row.seconds)
        text = f"Target {label} <= {limit} s/image (batch 1, engine): "
        if default is not None:
            text += f"defaults {default.seconds:.3f} s {verdict(default.seconds <= limit)}; "
        lines.append(text + f"best {best.way} {best.seconds:.3f} s {verdict(best.seconds <= limit)}.")
    for model, label in (("flux", "FLUX.1-dev"), ("sd35", "SD 3.5 Large")):
        single = [row for row in report.rows if row.model == model and row.way == "engine" and row.batch == 1
                  and row.size == (1024, 1024) and row.seconds]  # fmt: skip
        if single:
            published = " (published: about 3-4 s on an H100 in bf16 at 28 steps)" if model == "flux" else ""
            lines.append(f"{label} 1024x1024 {single[0].steps} steps, batch 1, engine: {single[0].seconds:.3f} "
                         f"s/image{published}.")  # fmt: skip
    batched = engine_rows("sdxl")
    if batched:
        best = max(batched, key=lambda row: row.batch / row.seconds)
        throughput = best.batch / best.seconds
        lines.append(f"Target SDXL throughput >= {TARGET_SDXL_THROUGHPUT} img/s: best {throughput:.2f} img/s "
                     f"({best.way}, batch {best.batch}) {verdict(throughput >= TARGET_SDXL_THROUGHPUT)}.")  # fmt: skip
    else:
        lines.append(f"Target SDXL throughput >= {TARGET_SDXL_THROUGHPUT} img/s: not measured.")
    return lines


def write_results(path: Path, title: str, details: list[str], lines: list[str]) -> None:
    """Appends one dated section; creates the file with a title when it is new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", encoding="utf-8") as results:
        if new:
            results.write("# Benchmark results\n")
        results.write("\n" + "\n".join([title, "", *details, "", *lines]) + "\n")


# The benchmark -------------------------------------------------------------------------------------------
@dataclass
class Setup:
    tiny: bool
    work: Path
    device: torch.device
    dtype: torch.dtype
    steps: int
    batches: list[int]
    warmup: int
    repeats: int
    memory: PeakMemory
    compile_cache: str  # how warm torch.compile's on-disk cache is, for the first-call times


def free_memory(setup: Setup, compiled: bool) -> None:
    """Drops what a variant left behind, so the next starts from the same memory. Skipped for the tiny models
    on the CPU, where a full garbage collection costs more than the models."""
    if compiled:
        torch._dynamo.reset()
    if setup.device.type == "cuda" or not setup.tiny:
        gc.collect()
    if setup.device.type == "cuda":
        torch.cuda.empty_cache()


def hint_map(size: tuple[int, int]) -> str:
    """A control map of the job's size (a white square on black), base64."""
    import base64
    import io

    from PIL import Image

    image = Image.new("RGB", size)
    image.paste((255, 255, 255), (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def write_controlnet(setup: Setup, spec: ModelSpec, unet) -> str:
    """A random-weight ControlNet of the model's UNet (its encoder's shape: what real ones are), saved where the
    engine's ControlNet folder is, in the run's precision; its name."""
    from diffusers import ControlNetModel

    name = f"bench-{spec.key}-controlnet"
    folder = setup.work / "engine-home" / "stable_diffusion" / "controlnet" / name
    if not folder.exists():
        ControlNetModel.from_unet(unet).to(dtype=setup.dtype).save_pretrained(folder, safe_serialization=True)
    return name


# ViT-H/14 (open_clip's laion2B), the image encoder of the SD1.5 and the SDXL `_vit-h` IP-Adapters.
VIT_H = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, image_size=224,
             patch_size=14, projection_dim=1024, hidden_act="gelu")  # fmt: skip


def write_ip_adapter(setup: Setup, spec: ModelSpec, unet) -> str:
    """A random-weight IP-Adapter for the model's UNet (h94's plain layout) and a ViT-H/14 image encoder (the
    demo's tiny one with --tiny), where the engine's folders are; the adapter's name."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from pipelines.demo_adapters import ENCODER_CONFIG, flat_state_dict, plain_ip_adapter

    home = setup.work / "engine-home" / "stable_diffusion"
    config = ENCODER_CONFIG if setup.tiny else VIT_H
    encoder = home / "clip_vision" / "clip_h"
    if not encoder.exists():
        with torch.device(setup.device):
            model = CLIPVisionModelWithProjection(CLIPVisionConfig(**config))
        model.to(dtype=setup.dtype).save_pretrained(encoder, safe_serialization=True)
    name = f"bench-{spec.key}-ip-adapter"
    target = home / "ipadapter" / f"{name}.safetensors"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        architecture = (
            "stable-diffusion-xl-v1-base/ip-adapter" if spec.family == "sdxl" else "stable-diffusion-v1/ip-adapter"
        )  # the tiny SDXL's width alone would read as SD1.5
        state = flat_state_dict(plain_ip_adapter(unet, config["projection_dim"], seed=7))
        save_file({key: value.to(setup.dtype) for key, value in state.items()}, target,
                  metadata={"modelspec.architecture": architecture})  # fmt: skip
    return name


def new_engine(setup: Setup, speed: SpeedOptions) -> ImageEngine:
    settings = Settings.from_env(root=setup.work / "engine-home")  # a home with no models, LoRAs or upscalers
    return ImageEngine(ModelCatalog(settings), device=str(setup.device),
                       dtype=str(setup.dtype).removeprefix("torch."), speed=speed)  # fmt: skip


def bench_variant(setup: Setup, spec: ModelSpec, variant: Variant, report: Report) -> None:
    """Times one way on one model at every batch size, on a pipeline of its own."""
    started = time.perf_counter()
    pipe = build_pipeline(spec.key, setup.tiny, setup.work, setup.device, setup.dtype)
    if spec.key not in report.built:
        report.built.add(spec.key)
        report.note(f"{spec.key}: {parameter_count(pipe)} parameters (UNet or transformer, text encoders, VAE), "
                    f"built in {time.perf_counter() - started:.1f} s")  # fmt: skip
    engine = loaded = None
    if variant.speed is not None:
        engine = new_engine(setup, variant.speed)
        entry = ModelEntry(f"bench-{spec.key}", f"bench-{spec.key}", spec.family, "diffusers",
                           setup.work / f"bench-{spec.key}")  # fmt: skip
        loaded = engine.adopt(entry, pipe)
    controlnet = write_controlnet(setup, spec, pipe.unet) if variant.controlnet else None
    ip_adapter = write_ip_adapter(setup, spec, pipe.unet) if variant.ip_adapter else None

    def job_for(batch: int, size: tuple[int, int]) -> Job:
        if engine is None:
            return plain_job(pipe, spec.family, batch, size, setup.steps)
        return engine_job(engine, loaded, batch, size, setup.steps, controlnet, ip_adapter)

    compiled = variant.speed is not None and variant.speed.compile
    applied = ", ".join(loaded.speed) if loaded is not None else "diffusers defaults"
    first_calls = []
    for batch in setup.batches:
        row = Row(variant.way, spec.key, batch, spec.size, setup.steps, note=applied)
        try:
            result = measure(job_for(batch, spec.size), setup.device, setup.memory, setup.warmup, setup.repeats)
        except (torch.cuda.OutOfMemoryError, OutOfMemoryError):
            row.note = "out of memory"
            report.add(row)
            free_memory(setup, compiled=False)
            break  # larger batches will not fit either
        row.seconds, row.steps_per_second, row.peak_mb = result.seconds, result.steps_per_second, result.peak_mb
        report.add(row)
        if result.warmup_seconds:
            first_calls.append(f"b{batch} {result.warmup_seconds[0]:.1f} s")
    if compiled and first_calls:
        report.note(compile_probe(setup, spec, variant, job_for, first_calls))
    if engine is not None:
        engine.unload(loaded.entry.name)


def compile_probe(setup: Setup, spec: ModelSpec, variant: Variant, job_for, first_calls: list[str]) -> str:
    """torch.compile's cost: the first call per batch size (compile included), then two calls at a second
    size: a first call much slower than the second means it compiled again for that size."""
    size = spec.second_size
    first, _ = timed(job_for(1, size), setup.device)
    second, _ = timed(job_for(1, size), setup.device)
    recompiled = "recompiled for the new size" if first > 2 * second + 0.5 else "no recompile seen"
    return (f"torch.compile ({variant.way}, {spec.key}, {variant.speed.compile_mode}, {setup.compile_cache}): "
            f"first call at "
            f"{spec.size[0]}x{spec.size[1]} per batch: {', '.join(first_calls)}; at {size[0]}x{size[1]} b1: first "
            f"{first:.1f} s, second {second:.2f} s ({recompiled}).")  # fmt: skip


def bench_vae(setup: Setup, key: str, size: int, report: Report) -> None:
    """One large decode with tiling off and with the engine's automatic tiling: time and peak memory."""
    vae = build_vae(key, setup.tiny, setup.work, setup.device, setup.dtype)
    holder = SimpleNamespace(vae=vae)  # set_vae_tiling takes a pipeline; it only touches `.vae`
    generator = torch.Generator("cpu").manual_seed(0)
    channels = vae.config.latent_channels
    latent = torch.randn(1, channels, size // 8, size // 8, generator=generator).to(setup.device, setup.dtype)
    default = SpeedOptions()
    auto = "tiles" if size * size > default.vae_tiling_min_pixels else "does not tile"
    report.note(f"VAE decode at {size}x{size}: the engine's default vae_tiling={default.vae_tiling} {auto} there "
                f"(threshold {default.vae_tiling_min_pixels} pixels).")  # fmt: skip
    for mode in ("never", "always"):
        tiled = set_vae_tiling(holder, SpeedOptions(vae_tiling=mode), size, size)

        def decode(clock: StepClock) -> None:
            with torch.inference_mode():
                vae.decode(latent / vae.config.scaling_factor)

        label = f"{'on' if tiled else 'off'} (vae_tiling={mode})"
        try:
            result = measure(decode, setup.device, setup.memory, setup.warmup, setup.repeats)
        except torch.cuda.OutOfMemoryError:
            report.vae_rows.append([key, f"{size}x{size}", label, "out of memory", "-"])
            free_memory(setup, compiled=False)
            continue
        report.vae_rows.append([key, f"{size}x{size}", label, f"{result.seconds:.3f}", f"{result.peak_mb:.0f}"])
        print(f"  vae {key} {size}x{size} tiling {label}: {result.seconds:.3f} s, {setup.memory.label} "
              f"{result.peak_mb:.0f}", flush=True)  # fmt: skip


def cold_compile_cache(directory: Path) -> contextlib.AbstractContextManager:
    """torch.compile's on-disk caches in a fresh folder, so its first calls show the whole compile, as on a fresh
    machine (a warm cache from an earlier run would hide most of it)."""
    try:
        from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir
    except ImportError:  # an internal helper; where it moved, the variable alone does most of it
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory)
        return contextlib.nullcontext()
    return temporary_cache_dir(str(directory))


def quiet_libraries() -> None:
    """The engine's logging levels (it sets them when constructed; the first pipeline is built before)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the demo's tiny models at 64x64, a few steps (CPU)")
    parser.add_argument("--models", nargs="+", choices=list(FULL_MODELS), default=list(FULL_MODELS))
    parser.add_argument("--batches", nargs="+", type=int, help="batch sizes (default 1 2 4 8; --tiny: 1 2)")
    parser.add_argument("--steps", type=int, help="denoising steps (default 30; --tiny: 3)")
    parser.add_argument("--repeats", type=int, help="timed calls per measurement, median taken (3; --tiny: 1)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before each measurement")
    parser.add_argument("--variants", nargs="+", choices=VARIANT_KEYS, default=VARIANT_KEYS)
    parser.add_argument("--compile-mode", default=SpeedOptions().compile_mode, choices=list(get_args(CompileMode)))
    parser.add_argument(
        "--compile-on-cpu", action="store_true", help="with --tiny on a CPU, run torch.compile too (minutes per shape)"
    )
    parser.add_argument("--no-vae", action="store_true", help="skip the large VAE decode")
    parser.add_argument("--device", help="e.g. cuda, cuda:1, cpu (default: CUDA when present)")
    parser.add_argument("--dtype", help="e.g. bfloat16, float16, float32 (default: what the engine picks)")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md")
    parser.add_argument("--no-results", action="store_true", help="print only; append nothing")
    args = parser.parse_args(argv)
    args.batches = args.batches or ([1, 2] if args.tiny else [1, 2, 4, 8])
    args.steps = args.steps or (3 if args.tiny else 30)
    args.repeats = args.repeats or (1 if args.tiny else 3)
    return args


def bench_all(args: argparse.Namespace, setup: Setup, chosen: list[Variant], skip_compile: bool) -> Report:
    """Every chosen way on every chosen model, then the large VAE decode. A failing way is recorded and the run
    goes on, so one broken option does not cost the rest of a long GPU run."""
    report = Report(setup.memory.label)
    if skip_compile:
        report.note("torch.compile skipped: --tiny on the CPU (inductor takes minutes per shape on a small CPU; "
                    "--compile-on-cpu runs it); 'all fast' is channels_last + fuse_qkv there.")  # fmt: skip
    specs = TINY_MODELS if args.tiny else FULL_MODELS
    for key in args.models:
        spec = specs[key]
        for variant in chosen:
            if spec.family in FLOW_FAMILIES and variant.key in UNET_ONLY_WAYS:
                continue  # a UNet's option, or a unit these families do not run
            if variant.key == "compile" and skip_compile:
                for batch in args.batches:
                    report.add(Row(variant.way, key, batch, spec.size, args.steps, note="skipped on CPU (--tiny)"))
                continue
            try:
                bench_variant(setup, spec, variant, report)
            except Exception as error:
                traceback.print_exc()
                report.failures.append(f"{variant.way} on {key}: {type(error).__name__}: {error}")
                report.add(Row(variant.way, key, 0, spec.size, args.steps, note=f"failed: {type(error).__name__}"))
            free_memory(setup, compiled=variant.speed is not None and variant.speed.compile)
    if not args.no_vae:
        key = "sdxl" if "sdxl" in args.models else args.models[0]  # SDXL's: the hires-fix decode
        try:
            bench_vae(setup, key, 256 if args.tiny else 2048, report)
        except Exception as error:
            traceback.print_exc()
            report.failures.append(f"VAE decode ({key}): {type(error).__name__}: {error}")
        free_memory(setup, compiled=False)
    return report


def run_details(args: argparse.Namespace, argv: list[str] | None) -> list[str]:
    """How the figures were taken, for the results file."""
    command = " ".join(["python bench/gpu_bench.py", *(argv if argv is not None else sys.argv[1:])])
    details = [
        f"`{command}`: {args.steps} steps, sampler {SAMPLER}, CFG {CFG_SCALE:g} (FLUX.1: cfg 1 and distilled 3.5, "
        f"SD 3.5: CFG 4.5), batches "
        f"{' '.join(map(str, args.batches))}, {args.warmup} warm-up + median of {args.repeats} timed call(s); random "
        "weights. s/image and img/s are end to end; it/s is the denoising loop (steps per second of the whole batch)."
    ]
    if args.tiny:
        details.append("Tiny demo models: these figures show that the benchmark runs, not how fast anything is.")
    return details


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    device, dtype = select_device(args.device, args.dtype)
    skip_compile = args.tiny and device.type == "cpu" and not args.compile_on_cpu
    chosen = [v for v in variants(args.compile_mode, not skip_compile) if v.key in args.variants]
    title = heading(args, device, dtype)
    print(title, flush=True)
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu-bench-")))
        if any(v.speed is not None and v.speed.compile for v in chosen) and USER_INDUCTOR_CACHE is None:
            stack.enter_context(cold_compile_cache(tmp / "inductor"))
        cache = f"inductor cache {USER_INDUCTOR_CACHE}" if USER_INDUCTOR_CACHE else "cold inductor cache"
        setup = Setup(args.tiny, tmp, device, dtype, args.steps, args.batches, args.warmup, args.repeats,
                      PeakMemory(device), cache)  # fmt: skip
        report = bench_all(args, setup, chosen, skip_compile)
    details = run_details(args, argv)
    lines = report.lines() + [""] + check_targets(report, device, dtype, args.tiny)
    if report.failures:
        lines += ["", "Failures:"] + [f"- {failure}" for failure in report.failures]
    print("\n" + "\n".join([title, "", *details, "", *lines]))
    if not args.no_results:
        write_results(args.results, title, details, lines)
        print(f"\nappended to {args.results}")
    print(f"finished in {time.perf_counter() - STARTED:.1f} s (imports included)")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
