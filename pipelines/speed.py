"""Speed options of the image engine, applied to every pipeline it loads.

Each option is one that `bench/gpu_bench.py` times (plain diffusers vs the engine vs the engine with the
option on). Defaults are what is safe everywhere: options that change results slightly (VAE tiling), cost
minutes at start (torch.compile) or are marked experimental by diffusers (fused QKV) are off until an
operator turns them on for their GPU, with bench/RESULTS.md as the evidence. Precision (`dtype`) is chosen
by `select_device`: bfloat16 on GPUs that have it, else float16; float32 on the CPU.

Set them with the app argument `speed` (serve configs) or environment variables (`DIFFUSION_API_ATTENTION`,
`DIFFUSION_API_CHANNELS_LAST`, `DIFFUSION_API_FUSE_QKV`, `DIFFUSION_API_COMPILE`, `DIFFUSION_API_COMPILE_MODE`,
`DIFFUSION_API_VAE_TILING`, `DIFFUSION_API_VAE_SLICING`, `DIFFUSION_API_CPU_OFFLOAD`); the app argument wins.
"""

import logging
import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

logger = logging.getLogger(__name__)

CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
_ENV = {
    "attention": "DIFFUSION_API_ATTENTION",
    "channels_last": "DIFFUSION_API_CHANNELS_LAST",
    "fuse_qkv": "DIFFUSION_API_FUSE_QKV",
    "compile": "DIFFUSION_API_COMPILE",
    "compile_mode": "DIFFUSION_API_COMPILE_MODE",
    "vae_tiling": "DIFFUSION_API_VAE_TILING",
    "vae_slicing": "DIFFUSION_API_VAE_SLICING",
    "cpu_offload": "DIFFUSION_API_CPU_OFFLOAD",
}


class SpeedOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # torch's scaled_dot_product_attention (flash / memory-efficient kernels on GPUs), or diffusers' plain
    # attention ("eager": slower, more memory; there for comparison).
    attention: Literal["sdpa", "eager"] = "sdpa"
    # UNet and VAE weights in channels-last layout (faster convolutions on tensor cores).
    channels_last: bool = False
    # One matmul for q, k and v (diffusers' fuse_qkv_projections). Jobs with LoRAs run unfused, since the
    # fused weights do not carry the LoRA.
    fuse_qkv: bool = False
    # torch.compile of the UNet; compiled at replica start by the `warmup` jobs, recompiled per new shape.
    compile: bool = False
    compile_mode: CompileMode = "max-autotune-no-cudagraphs"
    # Decode in tiles: "auto" when an output has more than `vae_tiling_min_pixels` (large hires outputs),
    # which bounds the decoder's memory; tiles are blended, so pixels differ slightly from a whole decode
    # (hence off by default: a seed gives the same image with or without it).
    vae_tiling: Literal["auto", "always", "never"] = "never"
    vae_tiling_min_pixels: int = Field(1536 * 1024, ge=64 * 64)
    # Decode a batch one image at a time: a batch's decode needs one image's memory (same pixels).
    vae_slicing: bool = True
    # For GPUs smaller than the model: diffusers' model CPU offload keeps the model's parts (text encoders,
    # denoiser, VAE) in CPU memory and moves each to the GPU while it runs, so the GPU holds the largest part
    # rather than all of them (FLUX.1-dev in bf16: its 24 GB transformer rather than 34 GB; a Q8_0 GGUF one: 12
    # GB), plus the ControlNets and IP-Adapter encoders a job uses. Same pixels; each job pays the copies over
    # PCIe. Loaded models then wait in CPU memory; after every job each part is back there (pipelines/devices.py).
    cpu_offload: Literal["never", "model"] = "never"

    @model_validator(mode="after")
    def _offload_without_cuda_graphs(self) -> "SpeedOptions":
        if self.cpu_offload == "model" and self.compile and self.compile_mode in ("reduce-overhead", "max-autotune"):
            raise ValueError(f"speed.compile_mode {self.compile_mode!r} records CUDA graphs, whose weight addresses "
                             "model CPU offload changes every job: use 'max-autotune-no-cudagraphs' or 'default' "
                             "with cpu_offload 'model'")  # fmt: skip
        return self

    @classmethod
    def from_env(cls, overrides: dict | None = None) -> "SpeedOptions":
        values = {}
        for name, variable in _ENV.items():
            raw = os.environ.get(variable)
            if raw is not None and raw != "":
                kind = cls.model_fields[name].annotation
                values[name] = raw.strip().lower() in ("1", "true", "yes", "on") if kind is bool else raw.strip()
        return cls(**{**values, **(overrides or {})})


def apply_speed_options(pipe, options: SpeedOptions, device=None) -> list[str]:
    """Applies the load-time options to a freshly loaded pipeline (loaded on the CPU when `cpu_offload` is on,
    for `device`); returns the names of those applied."""
    import torch

    applied = []
    unet = getattr(pipe, "unet", None)
    if options.attention == "eager":
        from diffusers.models.attention_processor import AttnProcessor

        for module in (unet, pipe.vae):
            if module is not None:
                module.set_attn_processor(AttnProcessor())
        applied.append("eager attention")
    if options.channels_last:
        for module in (unet, pipe.vae):
            if module is not None:
                module.to(memory_format=torch.channels_last)
        applied.append("channels_last")
    if options.fuse_qkv and options.attention == "sdpa" and unet is not None:
        pipe.fuse_qkv_projections(unet=True, vae=True)
        applied.append("fused QKV")
    if options.vae_slicing:
        pipe.vae.enable_slicing()
        applied.append("VAE slicing")
    denoiser = unet if unet is not None else getattr(pipe, "transformer", None)  # FLUX.1's transformer
    if options.compile and denoiser is not None:
        denoiser.compile(mode=options.compile_mode)
        applied.append(f"torch.compile ({options.compile_mode})")
    if options.cpu_offload == "model":
        pipe.enable_model_cpu_offload(device=device)  # device None: diffusers' default accelerator
        applied.append("model CPU offload")
    return applied


def set_vae_tiling(pipe, options: SpeedOptions, width: int, height: int) -> bool:
    """Turns tiled decoding on or off for an output of `width` x `height`; returns whether it is on."""
    tiled = options.vae_tiling == "always" or (
        options.vae_tiling == "auto" and width * height > options.vae_tiling_min_pixels
    )
    if tiled:
        pipe.vae.enable_tiling()
    else:
        pipe.vae.disable_tiling()
    return tiled


def set_qkv_fused(pipe, fused: bool) -> None:
    """Switches the UNet between its fused and separate q/k/v projections (both keep their weights), so a job
    with LoRAs, which patch the separate ones, runs unfused."""
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    unet = pipe.unet
    if getattr(unet, "original_attn_processors", None) is None:
        return  # never fused
    if fused:
        unet.set_attn_processor(FusedAttnProcessor2_0())
    else:
        unet.set_attn_processor(unet.original_attn_processors)
