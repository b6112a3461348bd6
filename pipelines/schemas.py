"""The public API contract: pydantic models for every request and response.

Field names follow the seed API exactly (including `fileType`), so existing clients keep working; unknown
fields are ignored, as A1111 does. Bounds here are the first line of validation: a request outside them gets
a 422 naming the field before any job exists.
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipelines.catalog import Family
from pipelines.limits import LIMITS

FileType = Literal["jpg", "png", "webp", "avif", "gif"]
JobState = Literal["queued", "processing", "done", "error", "cancelled"]
MAX_SEED = 2**32 - 1


class LoraRef(BaseModel):
    name: str = Field(..., min_length=1, max_length=255, description="LoRA file name, with or without extension")
    scale: float = Field(1.0, ge=-LIMITS.max_lora_scale, le=LIMITS.max_lora_scale, description="LoRA strength")


class HiresConfig(BaseModel):
    enabled: bool = False
    scale: float = Field(2.0, ge=1.0, le=LIMITS.max_hires_scale, description="Upscale factor of the first-pass size")
    upscaler: str = Field("Latent", max_length=255, description='"Latent" (or a variant) or an upscaler name')
    steps: int = Field(20, ge=1, le=LIMITS.max_steps, description="Steps of the second pass")
    denoising_strength: float = Field(0.4, ge=0.0, le=1.0)


class GenerationRequest(BaseModel):
    """Fields shared by txt2img and img2img."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    prompt: str = Field(..., max_length=LIMITS.max_prompt_chars, description="Main prompt")
    negative_prompt: str = Field("", max_length=LIMITS.max_prompt_chars)
    steps: int = Field(30, ge=1, le=LIMITS.max_steps, description="Number of inference steps")
    cfg_scale: float = Field(7.0, ge=0.0, le=LIMITS.max_cfg_scale, description="Classifier-free guidance scale")
    width: int = Field(512, ge=LIMITS.min_size, le=LIMITS.max_size, multiple_of=8)
    height: int = Field(512, ge=LIMITS.min_size, le=LIMITS.max_size, multiple_of=8)
    model: str | None = Field(None, max_length=255, description="Model name or label; default from configs")
    sampler_name: str = Field("DPM++ 2M Karras", max_length=64, description="See GET /sampling_methods")
    scheduler_type: str | None = Field(
        None,
        max_length=64,
        description="Schedule type (seed values or A1111 names); default: the sampler's own",
    )
    file_type: FileType = Field("jpg", alias="fileType", description="Output format")
    jpeg_quality: int = Field(85, ge=1, le=100, description="Quality for jpg, webp and avif")
    loras: list[LoraRef | str] = Field(default_factory=list, max_length=LIMITS.max_loras)
    hires: HiresConfig | None = None
    refiner_checkpoint: str | None = Field(None, max_length=255)
    refiner_switch_at: float = Field(0.8, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=-1, le=MAX_SEED, description="-1 or absent: a random seed, reported back")
    clip_skip: int = Field(1, ge=1, le=12, description="A1111 clip skip (1 = use the last layer)")

    @field_validator("file_type", mode="before")
    @classmethod
    def _normalise_file_type(cls, value):
        if isinstance(value, str):
            value = value.strip().lower().lstrip(".")
            return "jpg" if value == "jpeg" else value
        return value

    @model_validator(mode="after")
    def _check_total_pixels(self):
        if self.width * self.height > LIMITS.max_pixels:
            raise ValueError(
                f"width x height is {self.width}x{self.height} = {self.width * self.height} pixels; at most "
                f"{LIMITS.max_pixels} are allowed"
            )
        return self


class Txt2ImgRequest(GenerationRequest):
    pass


class Img2ImgRequest(GenerationRequest):
    image: str = Field(..., min_length=1, description="Input image: base64, with or without a data: URL prefix")
    denoising_strength: float = Field(0.75, ge=0.0, le=1.0)


class CancelResponse(BaseModel):
    status: Literal["success"] = "success"
    job_id: str
    state: Literal["cancelled"] = "cancelled"


class Txt2ImgResponse(BaseModel):
    job_id: str
    status: Literal["queued"] = "queued"


Img2ImgResponse = Txt2ImgResponse


class QueueStatusResponse(BaseModel):
    status: Literal["success", "error"] = "success"
    job_id: str
    progress: float = Field(0.0, ge=0.0, le=100.0)
    current_phase: str = "queued"
    state: JobState = "queued"
    error: str | None = None
    warnings: list[str] = Field(default_factory=list)
    payload: dict | None = None
    image: str | None = None
    output_path: str | None = None
    width: int | None = None
    height: int | None = None
    file_type: FileType | None = None
    jpeg_quality: int | None = None
    generation_time_sec: float | None = None
    memory_before_mb: float | None = None
    memory_after_mb: float | None = None
    seed: int | None = None
    infotext: str | None = None
    batch_size: int | None = Field(None, description="How many jobs ran together in this job's diffusers call")


class ModelInfo(BaseModel):
    name: str
    label: str
    family: Family


class ModelsResponse(BaseModel):
    status: Literal["success", "error"] = "success"
    models: list[ModelInfo]
    error: str | None = None


class LoraInfo(BaseModel):
    name: str = Field(..., description="name to use in 'loras' or <lora:name:weight>")
    scale: float = 1.0
    family: str = Field(..., description="sd15, sdxl, sd2 or unknown (detected from the tensors)")


class LorasResponse(BaseModel):
    status: Literal["success", "error"] = "success"
    loras: list[LoraInfo]
    error: str | None = None


class UpscalerInfo(BaseModel):
    name: str = Field(..., description="value for 'hires.upscaler'")
    path: str = Field(..., description='"internal" for the latent modes, else the model file')


class UpscalersResponse(BaseModel):
    status: Literal["success", "error"] = "success"
    upscalers: list[UpscalerInfo]
    error: str | None = None


class ModelAlias(BaseModel):
    name: str
    label: str


class ModelAliasesResponse(BaseModel):
    status: Literal["success", "error"] = "success"
    models: list[ModelAlias]
    message: str = ""


class SamplingMethodsResponse(BaseModel):
    status: Literal["success", "error"] = "success"
    sampling_methods: list[str]
    scheduler_types: list[str]
    error: str | None = None


class HelloResponse(BaseModel):
    ok: bool = True


class ErrorResponse(BaseModel):
    status: Literal["error"] = "error"
    error: str
