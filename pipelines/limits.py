"""Request limits, read once from `configs/limits.yaml` (or the file in `DIFFUSION_API_LIMITS`).

The request schemas take their bounds from here, so `/docs` shows the limits in force and every request
outside them is a 4xx naming the field, the value and what is allowed.
"""

import os
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipelines.settings import PROJECT_ROOT


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_size: int = Field(64, ge=8, multiple_of=8)  # width/height in pixels (multiples of 8)
    max_size: int = Field(2048, ge=64, multiple_of=8)
    # width x height, and the hires-fix final size. At max_size squared (the default) it adds nothing to the
    # per-side bounds; below, it is a rule JSON Schema cannot state, so /openapi.json only describes it.
    max_pixels: int = Field(2048 * 2048, ge=64 * 64)
    max_steps: int = Field(150, ge=1)
    max_cfg_scale: float = Field(30.0, gt=0)
    max_prompt_chars: int = Field(20000, ge=1)
    max_loras: int = Field(8, ge=0)
    max_lora_scale: float = Field(4.0, gt=0)  # scales are allowed in [-max, +max]
    max_hires_scale: float = Field(4.0, ge=1.0)
    max_batch_size: int = Field(8, ge=1, le=64)  # `batch_size`: images per call of one request
    max_n_iter: int = Field(4, ge=1)  # `n_iter`: calls per request (the job record holds every image)
    max_mask_blur: int = Field(64, ge=0)  # `mask_blur` in pixels
    max_input_image_pixels: int = Field(4096 * 4096, ge=64 * 64)  # img2img input, before resizing
    max_request_bytes: int = Field(32 * 2**20, ge=1024)  # larger request bodies get 413
    max_controlnet_units: int = Field(3, ge=0, le=10)  # ControlNet units per job (A1111's "Multi-ControlNet")


def load_limits(path: Path | None = None) -> Limits:
    path = path or Path(os.environ.get("DIFFUSION_API_LIMITS") or PROJECT_ROOT / "configs" / "limits.yaml")
    if not path.exists():
        return Limits()
    try:
        data = yaml.safe_load(path.read_text()) or {}
        return Limits(**data)
    except (yaml.YAMLError, TypeError, ValidationError) as error:
        raise SystemExit(f"invalid limits file {path}: {error}") from error


LIMITS = load_limits()
