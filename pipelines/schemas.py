"""The public API contract: pydantic models for every request and response.

`/openapi.json` is generated from these models, so they say exactly what the service accepts: strict types (a
boolean is not a number, a number is not a string), closed sets as enums built from the tables the code uses
(sampler names, schedule types, file types, latent upscale modes), bounds from configs/limits.yaml. Field
names follow the seed API exactly (including `fileType`). Unknown fields are accepted and ignored, as A1111
does, and each one is named in the job's warnings.
"""

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from pipelines.annotators import ANNOTATOR_ALIASES, ANNOTATORS
from pipelines.catalog import Family
from pipelines.families import ModelFamily
from pipelines.families.base import Guidance
from pipelines.inpaint import InpaintingFill
from pipelines.limits import LIMITS
from pipelines.preprocessors import ALIASES, IP_ADAPTER_ALIASES, IP_ADAPTER_MODULES, PREPROCESSORS
from pipelines.samplers import SAMPLERS, SCHEDULES, accepted_sampler_names, accepted_schedule_types, resolve_sampler
from pipelines.upscalers import LATENT_MODES

FILE_TYPES = ("jpg", "jpeg", "png", "webp", "avif", "gif")  # "jpeg" is read as "jpg"
FileType = Literal["jpg", "png", "webp", "avif", "gif"]


class JobState(StrEnum):
    """A job's state: queued and processing are active; done, error and cancelled are its end."""

    queued = "queued"
    processing = "processing"
    done = "done"
    error = "error"
    cancelled = "cancelled"

    @property
    def ended(self) -> bool:
        return self in ENDED_STATES


ENDED_STATES = frozenset({JobState.done, JobState.error, JobState.cancelled})
JobStateName = Literal[tuple(state.value for state in JobState)]  # the wire form: an inline enum in the schema
MAX_SEED = 2**32 - 1
JOB_ID_PATTERN = "^[0-9a-f]{32}$"  # uuid4().hex
IMAGE_FORMAT = "image-base64"  # a custom string format; tests/schemathesis_hooks.py generates it


class StatusInclude(StrEnum):
    """What `GET /queue/{job_id}?include=` adds to a status (an enum: a closed set, more may come)."""

    inputs = "inputs"


SamplerName = Literal[tuple(accepted_sampler_names())]
ScheduleType = Literal[tuple(accepted_schedule_types())]
RequestFileType = Literal[FILE_TYPES]
LatentUpscaler = Literal[tuple(LATENT_MODES)]


def whole_numbers_as_integers(value: Any) -> Any:
    """JSON Schema counts 30.0 as an integer; strict pydantic would not. (A float field takes the int as it
    is; booleans and strings stay refused.)"""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Name = Annotated[str, StringConstraints(min_length=1, max_length=255)]

SIZE_RULE = "Pixels, a multiple of 8" + (
    f"; width x height at most {LIMITS.max_pixels}" if LIMITS.max_pixels < LIMITS.max_size**2 else ""
)

# Strict types everywhere in the native API; unknown fields are kept aside (`model_extra`) to be named in the
# job's warnings, never used.
REQUEST_CONFIG = ConfigDict(strict=True, extra="allow", populate_by_name=True)


class LoraRef(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    name: Name = Field(..., description="LoRA file name, with or without extension (see GET /loras)")
    scale: float = Field(1.0, ge=-LIMITS.max_lora_scale, le=LIMITS.max_lora_scale, description="LoRA strength")


class HiresConfig(BaseModel):
    """A1111's hires fix (txt2img only): the first pass, upscaled by `scale`, then an img2img pass."""

    model_config = ConfigDict(strict=True, extra="allow")

    enabled: bool = False
    scale: float = Field(
        2.0,
        ge=1.0,
        le=LIMITS.max_hires_scale,
        description=f"Upscale factor of the first-pass size. A final size above {LIMITS.max_size} px a side "
        f"or {LIMITS.max_pixels} pixels is reduced to fit, with a warning",
    )
    upscaler: LatentUpscaler | Name = Field(
        "Latent", description="A latent mode or the name of an upscaler model (see GET /upscalers)"
    )
    steps: int = Field(20, ge=1, le=LIMITS.max_steps, description="Steps of the second pass")
    denoising_strength: float = Field(
        0.4, ge=0.0, le=1.0, description="Of the second pass; at least one step always runs (as in A1111)"
    )

    _whole_numbers = field_validator("*", mode="before")(whole_numbers_as_integers)


ControlMode = Literal["Balanced", "My prompt is more important", "ControlNet is more important"]
ControlResizeMode = Literal["Just Resize", "Crop and Resize", "Resize and Fill"]
HiresOption = Literal["Both", "Low res only", "High res only"]
ProcessorResolution = Annotated[int, Field(ge=64, le=LIMITS.max_size)] | Literal[-1]
# Closed sets: the preprocessors that make maps (the weight-needing annotators among them: a 4xx where their
# weights are not installed), and with them the IP-Adapter modules (their image encoder runs with the job).
_MAP_MODULES = tuple(PREPROCESSORS) + tuple(ALIASES) + tuple(ANNOTATORS) + tuple(ANNOTATOR_ALIASES)
PreprocessorModule = Literal[_MAP_MODULES]
ControlNetModule = Literal[_MAP_MODULES + tuple(IP_ADAPTER_MODULES) + tuple(IP_ADAPTER_ALIASES)]
MAX_REFERENCE_IMAGES = 4  # per IP-Adapter unit


UnitImage = Annotated[str, Field(min_length=1, json_schema_extra={"format": IMAGE_FORMAT})]


class ControlNetUnit(BaseModel):
    """One ControlNet unit, with the fields and defaults of A1111's ControlNet extension."""

    model_config = ConfigDict(strict=True, extra="allow")

    model: Name = Field(..., description="A ControlNet model's name or A1111 title (GET /controlnet/models); of the "
                        "job's model family")  # fmt: skip
    module: ControlNetModule = Field("none", description="The preprocessor (GET /controlnet/module_list; the "
                                     "extension's display names too); `none`: `image` is the control map")  # fmt: skip
    image: UnitImage | Annotated[list[UnitImage], Field(min_length=1, max_length=MAX_REFERENCE_IMAGES)] | None = Field(
        None,
        description="The control image, base64 (the formats `image` of img2img takes), or an IP-Adapter's "
        f"reference image(s) (a list: up to {MAX_REFERENCE_IMAGES}, read together); absent on img2img: the init image",
    )  # fmt: skip
    weight: float = Field(1.0, ge=0.0, le=2.0, description="The ControlNet's conditioning scale")
    guidance_start: float = Field(0.0, ge=0.0, le=1.0, description="Of the steps, when the control starts")
    guidance_end: float = Field(1.0, ge=0.0, le=1.0, description="Of the steps, when the control ends")
    control_mode: ControlMode = Field("Balanced", description="See the README's ControlNet section")
    resize_mode: ControlResizeMode = Field("Crop and Resize", description="How the map is fitted to the image's size")
    processor_res: ProcessorResolution = Field(-1, description="The preprocessor's resolution (-1: its default)")
    threshold_a: float = Field(-1.0, allow_inf_nan=False, description="The preprocessor's first slider (-1: default)")
    threshold_b: float = Field(-1.0, allow_inf_nan=False, description="Its second slider (-1: default)")
    pixel_perfect: bool = Field(False, description="The preprocessor's resolution from the image's size")
    hr_option: HiresOption = Field("Both", description="Hires fix: the passes the control applies to")

    _whole_numbers = field_validator("*", mode="before")(whole_numbers_as_integers)

    @field_validator("image", mode="wrap")
    @classmethod
    def _one_error_for_the_image(cls, value, handler):
        """One clear message for a bad `image` (pydantic would report each member of the union apart)."""
        try:
            return handler(value)
        except ValidationError:
            raise ValueError(f"a base64 image (a non-empty string), or for an IP-Adapter unit a list of 1 to "
                             f"{MAX_REFERENCE_IMAGES} of them; got {type(value).__name__}") from None  # fmt: skip


MAX_PRIORITY = 100  # `priority` is -100..100


class GenerationRequest(BaseModel):
    """Fields shared by txt2img and img2img."""

    model_config = REQUEST_CONFIG

    prompt: str = Field(..., max_length=LIMITS.max_prompt_chars, description="Main prompt")
    negative_prompt: str = Field("", max_length=LIMITS.max_prompt_chars)
    steps: int = Field(30, ge=1, le=LIMITS.max_steps, description="Number of inference steps")
    cfg_scale: float = Field(
        7.0, ge=0.0, le=LIMITS.max_cfg_scale,
        description="Classifier-free guidance scale; absent: 7, but 1 on FLUX.1 models (no unconditional pass, the "
        "negative prompt not used; above 1 there: true CFG with it) and 4.5 on SD 3.5",
    )  # fmt: skip
    distilled_cfg_scale: float | None = Field(
        None, ge=0.0, le=LIMITS.max_cfg_scale,
        description="FLUX.1 dev: the guidance embedding (Forge's 'Distilled CFG Scale'); absent: 3.5. No effect on "
        "schnell or on other families",
    )  # fmt: skip
    width: int = Field(512, ge=LIMITS.min_size, le=LIMITS.max_size, multiple_of=8, description=SIZE_RULE)
    height: int = Field(512, ge=LIMITS.min_size, le=LIMITS.max_size, multiple_of=8, description=SIZE_RULE)
    model: str | None = Field(
        None, max_length=255, description="Model name or label (see GET /models); absent or empty: the default"
    )
    sampler_name: SamplerName = Field(
        "DPM++ 2M Karras",
        description="See GET /sampling_methods; absent on FLUX.1 and SD 3.5 models: Euler (their samplers: README)",
    )
    scheduler_type: ScheduleType | None = Field(
        None, description="Schedule type (seed values or A1111 names); absent: the sampler's own"
    )
    file_type: RequestFileType = Field("jpg", alias="fileType", description='Output format ("jpeg" = "jpg")')
    jpeg_quality: int = Field(85, ge=1, le=100, description="Quality for jpg, webp and avif")
    loras: list[LoraRef | Name] = Field(default_factory=list, max_length=LIMITS.max_loras)
    refiner_checkpoint: str | None = Field(
        None,
        max_length=255,
        description="An SDXL refiner model (see GET /models) that finishes an SDXL job; with another base model, "
        "or with hires fix, it is not used and the job says so in its warnings",
    )
    refiner_switch_at: float = Field(
        0.8, gt=0.0, lt=1.0, description="Fraction of the steps after which the refiner takes over"
    )
    seed: int | None = Field(None, ge=-1, le=MAX_SEED, description="-1 or absent: a random seed, reported back")
    clip_skip: int = Field(1, ge=1, le=12, description="A1111 clip skip (1 = use the last layer)")
    vae: str | None = Field(
        None, max_length=255, description="A VAE name (see GET /vaes); absent, 'Automatic' or 'None': the model's own"
    )
    batch_size: int = Field(
        1, ge=1, le=LIMITS.max_batch_size, description="Images per call (as A1111): seeds seed, seed+1, ..."
    )
    n_iter: int = Field(
        1, ge=1, le=LIMITS.max_n_iter, description="Calls per request (as A1111); batch_size x n_iter images in all"
    )
    callback_url: str | None = Field(
        None,
        min_length=1,
        max_length=2048,
        description="Webhook: when the job ends, its final status (no image bytes; image_url) is POSTed here, "
        "signed (X-Signature-Timestamp: unix seconds; X-Signature-256: sha256=HMAC of '<timestamp>.<body>'; "
        "reject old timestamps to stop replays). Only hosts the operator allows (a 422 otherwise)",
    )
    preview: bool = Field(
        False, description="Send `preview` events (a small JPEG of the image so far) on GET /queue/{job_id}/events"
    )
    controlnet: list[ControlNetUnit] = Field(
        default_factory=list, max_length=LIMITS.max_controlnet_units,
        description="ControlNet units (A1111's Multi-ControlNet), applied together",
    )  # fmt: skip
    priority: int = Field(
        0, ge=-MAX_PRIORITY, le=MAX_PRIORITY,
        description="Order among this API key's own waiting jobs (higher first; keys take turns whatever their "
        "jobs' priorities). Above the key's `priority` setting it is lowered to it, with a warning",
    )  # fmt: skip

    _whole_numbers = field_validator("*", mode="before")(whole_numbers_as_integers)

    @field_validator("file_type", mode="after")
    @classmethod
    def _jpeg_is_jpg(cls, value: str) -> str:
        return "jpg" if value == "jpeg" else value

    @model_validator(mode="after")
    def _check_total_pixels(self):
        if self.width * self.height > LIMITS.max_pixels:
            raise ValueError(
                f"width x height is {self.width}x{self.height} = {self.width * self.height} pixels; at most "
                f"{LIMITS.max_pixels} are allowed"
            )
        return self

    def stored_payload(self) -> dict:
        """The request as its job record keeps it: every known field by its API name and no unknown one, top
        level or nested (unknown fields are only named in the warnings: they could carry anything, and the record
        is read back on every poll)."""
        payload = self.model_dump(by_alias=True)
        for name in self.model_extra or {}:  # not `exclude`: an unknown "file_type" would drop "fileType"
            payload.pop(name, None)
        for index, lora in enumerate(self.loras):
            if isinstance(lora, LoraRef):
                for name in lora.model_extra or {}:
                    payload["loras"][index].pop(name, None)
        hires = self.__dict__.get("hires")
        if isinstance(hires, HiresConfig):
            for name in hires.model_extra or {}:
                payload["hires"].pop(name, None)
        for index, unit in enumerate(self.controlnet):
            for name in unit.model_extra or {}:
                payload["controlnet"][index].pop(name, None)
        return payload

    def unknown_fields(self) -> list[str]:
        """The fields this service does not know, top-level first ("cfg", "hires.bogus", "loras[0].weight")."""
        names = sorted(self.model_extra or {})
        for index, lora in enumerate(self.loras):
            if isinstance(lora, LoraRef):
                names += [f"loras[{index}].{name}" for name in sorted(lora.model_extra or {})]
        hires = self.__dict__.get("hires")  # a field of txt2img only
        if isinstance(hires, HiresConfig):
            names += [f"hires.{name}" for name in sorted(hires.model_extra or {})]
        for index, unit in enumerate(self.controlnet):
            names += [f"controlnet[{index}].{name}" for name in sorted(unit.model_extra or {})]
        return names


class Txt2ImgRequest(GenerationRequest):
    hires: HiresConfig | None = None


class Img2ImgRequest(GenerationRequest):
    image: str = Field(
        ...,
        min_length=1,
        json_schema_extra={"format": IMAGE_FORMAT},
        description="Input image: a PNG, JPEG, WebP, AVIF or GIF file (its first frame) in base64, with or "
        f"without a data: URL prefix; at most {LIMITS.max_input_image_pixels} pixels. EXIF orientation is "
        "applied; 16-bit grayscale is scaled to 8 bits",
    )
    denoising_strength: float = Field(0.75, ge=0.0, le=1.0, description="At least one step always runs (as in A1111)")
    mask: str | None = Field(
        None,
        min_length=1,
        json_schema_extra={"format": IMAGE_FORMAT},
        description="Inpainting: a mask image in base64, in the formats `image` takes (white = repaint; an "
        "RGBA file with transparency: its opaque pixels), resized to the image if its size differs. Outside the "
        "blurred mask the result keeps "
        "the input's pixels",
    )
    mask_blur: int = Field(4, ge=0, le=LIMITS.max_mask_blur, description="Pixels of Gaussian blur on the mask's edge")
    inpainting_mask_invert: bool = Field(False, description="Repaint the black part of the mask instead")
    inpainting_fill: InpaintingFill = Field(
        1, description="What the masked area starts from: 0 fill (its surroundings' colours), 1 original, 2 latent "
        "noise, 3 latent nothing (A1111's 'Masked content')",
    )  # fmt: skip
    inpaint_full_res: bool = Field(
        False,
        description="A1111's 'Only masked': repaint the masked region (plus padding) at width x height and paste "
        "it back; the result then has the input image's size",
    )
    inpaint_full_res_padding: int = Field(
        32, ge=0, le=LIMITS.max_size, description="'Only masked': pixels around the mask included in the crop"
    )

    @field_validator("inpainting_fill", mode="before")
    @classmethod
    def _fill_is_not_a_boolean(cls, value: Any) -> Any:
        if isinstance(value, bool):  # Python counts True as 1; JSON does not
            raise ValueError("Input should be 0, 1, 2 or 3, not a boolean")
        return value

    def ignored_mask_fields(self) -> list[str]:
        """Mask settings other than their defaults sent without a mask (they change nothing)."""
        names = ("mask_blur", "inpainting_mask_invert", "inpainting_fill", "inpaint_full_res",
                 "inpaint_full_res_padding")  # fmt: skip
        fields = type(self).model_fields
        return [] if self.mask else [name for name in names if getattr(self, name) != fields[name].default]


class JobListItem(BaseModel):
    """One job of `GET /queue`: what it is and where it stands (its status and images: `GET /queue/{job_id}`)."""

    job_id: str
    kind: Literal["txt2img", "img2img"]
    state: JobStateName
    current_phase: str
    progress: float = Field(..., ge=0.0, le=100.0)
    created: float = Field(..., description="Unix seconds")
    updated: float = Field(..., description="Unix seconds of its last change")
    model: str
    family: str
    door: Literal["native", "a1111", "openai"] = Field(..., description="Which API took it")
    key: str = Field(..., description="The name of the API key that owns it (empty with keys off)")
    images: int = Field(..., ge=1, description="batch_size x n_iter")
    priority: int


class JobListResponse(BaseModel):
    jobs: list[JobListItem] = Field(..., description="Newest first")
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next (older) page; null at the end")


class CancelResponse(BaseModel):
    status: Literal["success"] = "success"
    job_id: str
    state: Literal["cancelled"] = "cancelled"


class Txt2ImgResponse(BaseModel):
    job_id: str
    status: Literal["queued"] = "queued"


class WebhookOutcome(BaseModel):
    attempts: int = Field(..., ge=0, description="POSTs made (retried on network errors, 429 and 5xx)")
    status: Literal["delivering", "delivered", "failed"]
    http_status: int | None = Field(None, description="The receiver's last answer")
    error: str | None = None


class QueueStatusResponse(BaseModel):
    status: Literal["success", "error"] = "success"
    job_id: str
    progress: float = Field(0.0, ge=0.0, le=100.0)
    current_phase: str = "queued"
    state: JobStateName = "queued"
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
    batch_size: int | None = Field(
        None, description="How many images (this job's and other jobs') ran together in this job's diffusers call"
    )
    attempts: int = Field(
        1, ge=1, description="How many times the job was dispatched: more than 1 after its worker was lost"
    )
    priority: int = Field(
        0,
        description="Its order among its API key's own waiting jobs (as recorded: capped by "
        "the key's `priority` setting)",
    )
    queue_position: int | None = Field(
        None,
        ge=0,
        description="While queued: jobs ahead of it in its model family's fair queue (keys take turns, "
        "then priority, then age); 0 once a generator has it",
    )
    eta_s: float | None = Field(
        None,
        ge=0,
        description="While queued: seconds until it is done, at the family's pace of the last 5 minutes "
        "(absent before any job of the family has finished)",
    )
    images: list[str] | None = Field(None, description="Every image of the job, base64 (`image` is the first)")
    image_url: str | None = Field(None, description="Where GET serves the (first) image file (in events and webhooks)")
    webhook: WebhookOutcome | None = Field(None, description="The callback_url delivery, once the job has ended")
    preview: str | None = Field(
        None, description='While the job runs, if it asked for previews ("preview": true): the image so far, a '
        "small JPEG in base64",
    )  # fmt: skip
    output_paths: list[str] | None = None
    seeds: list[int] | None = Field(None, description="Each image's seed: seed, seed+1, ... (as A1111)")
    infotexts: list[str] | None = None
    controlnet_maps: list[str | None] | None = Field(
        None, description="Once done: each ControlNet unit's map (PNG, base64) as the ControlNet saw it (its "
        "preprocessor's, fitted to the image's size), in unit order; null for one no longer in the storage",
    )  # fmt: skip


class ModelInfo(BaseModel):
    name: str
    label: str
    family: Family = Field(..., description="What its jobs take and default to: GET /families")
    inpainting: bool = Field(False, description="An inpainting checkpoint (9-channel UNet); it also does txt2img")
    max_size: int = Field(
        LIMITS.max_size, description="The largest width or height a job on it may ask: configs/limits.yaml's, or "
        "less where the model's own is (SD 3's position table)",
    )  # fmt: skip


class FamilyDefaults(BaseModel):
    """What a job of the family runs with where the request leaves the field out."""

    sampler_name: str
    scheduler_type: str
    cfg_scale: float
    distilled_cfg_scale: float | None = Field(..., description="Families with a guidance embedding (FLUX.1 dev)")


class Size(BaseModel):
    width: int
    height: int


class FamilyInfo(BaseModel):
    """A model family's facts a client needs to build a request for one of its models."""

    name: Family
    label: str
    guidance: Guidance = Field(
        ..., description="cfg: classifier-free guidance with the negative prompt; distilled: a guidance embedding "
        "(distilled_cfg_scale), true CFG and the negative prompt only with cfg_scale above 1 (FLUX.1)",
    )  # fmt: skip
    txt2img: bool = Field(..., description="false: it only continues images (the SDXL refiner)")
    samplers: list[str] = Field(..., description="The sampler_name values its models run (A1111's names)")
    schedule_types: list[str] = Field(..., description="The scheduler_type values its models run")
    defaults: FamilyDefaults
    native_size: Size = Field(..., description="The size it was trained at (the OpenAI door's size auto)")
    sizes_multiple_of: int = Field(..., description="width and height must be multiples of this")
    latent_hires: bool = Field(..., description="false: its hires fix takes a model upscaler or Lanczos, not a "
                               "latent mode (FLUX.1's packed latents)")  # fmt: skip


def family_info(family: ModelFamily) -> FamilyInfo:
    """The family's row as a client needs it: its own sampler and schedule tables where it has them (FLUX.1's and
    SD 3's flow-matching ones), else the shared A1111 tables; the request's defaults with the family's over them,
    as the job runs them (the seed's "DPM++ 2M Karras" is DPM++ 2M with the Karras schedule)."""
    samplers = family.samplers if family.samplers is not None else SAMPLERS
    schedules = family.schedules if family.schedules is not None else SCHEDULES
    fields = Txt2ImgRequest.model_fields
    sent = {name: fields[name].default for name in ("sampler_name", "scheduler_type", "cfg_scale")}
    sent.update(family.request_defaults)
    resolved = resolve_sampler(sent["sampler_name"], sent["scheduler_type"], family)
    schedule = next(key for key, spec in schedules.items() if spec.label == resolved.schedule_label)
    defaults = {"sampler_name": resolved.sampler, "scheduler_type": schedule, "cfg_scale": sent["cfg_scale"]}
    width, height = family.native_size
    return FamilyInfo(
        name=family.name, label=family.label, guidance=family.guidance, txt2img=family.txt2img,
        samplers=list(samplers), schedule_types=list(schedules),
        defaults=FamilyDefaults(**defaults, distilled_cfg_scale=family.distilled_cfg_scale),
        native_size=Size(width=width, height=height), sizes_multiple_of=family.sizes_multiple_of,
        latent_hires=family.latent_layout == "spatial",
    )  # fmt: skip


class FamiliesResponse(BaseModel):
    status: Literal["success", "error"] = "success"
    families: list[FamilyInfo]
    error: str | None = None


class ModelsResponse(BaseModel):
    status: Literal["success", "error"] = "success"
    models: list[ModelInfo]
    error: str | None = None


class LoraInfo(BaseModel):
    name: str = Field(..., description="name to use in 'loras' or <lora:name:weight>")
    scale: float = 1.0
    family: str = Field(..., description="sd15, sdxl, sd2, flux, sd3 or unknown (detected from the tensors)")


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


class VaeInfo(BaseModel):
    name: str = Field(..., description="value for 'vae'")
    path: str


class VaesResponse(BaseModel):
    status: Literal["success", "error"] = "success"
    vaes: list[VaeInfo]
    error: str | None = None


class EmbeddingInfo(BaseModel):
    name: str = Field(..., description="the word that calls it in a prompt")
    family: str = Field(..., description="sd15, sdxl, sd2 or unknown (from the file)")


class EmbeddingsResponse(BaseModel):
    status: Literal["success", "error"] = "success"
    embeddings: list[EmbeddingInfo]
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


class HealthSystem(BaseModel):
    cpu_count: int
    memory_total_gb: float
    memory_available_gb: float
    memory_percent: float
    disk_usage_percent: float


class GpuInfo(BaseModel):
    """Torch's view of the accelerator; the memory figures are there when CUDA is."""

    model_config = ConfigDict(extra="allow")

    cuda_available: bool
    device_name: str
    mps_available: bool | None = None
    cuda_version: str | None = None
    gpu_count: int | None = None
    current_device: int | None = None
    memory_allocated_gb: float | None = None
    memory_reserved_gb: float | None = None


class FolderCount(BaseModel):
    count: int
    directory: str


class QueueInfo(BaseModel):
    active_jobs: int
    directory: str = Field(..., description="The job database")


class OutputsInfo(BaseModel):
    available: bool = Field(..., description="Images can be written to the output storage")
    free_space_gb: float | None = Field(..., description="Free space of a local output folder; null for object storage")
    directory: str = Field(..., description="Where images are stored: a local folder or a URL")


class ReplicaReport(BaseModel):
    """What a generator replica last reported (every few seconds): its device and loaded models."""

    model_config = ConfigDict(extra="allow")

    replica: str
    reported_at: float
    deployment: str | None = None
    device: str | None = None
    dtype: str | None = None
    loaded_models: list[str] = Field(default_factory=list)
    gpu: GpuInfo | None = None


class HealthResponse(BaseModel):
    status: Literal["healthy", "warning"]
    timestamp: float
    version: str
    system: HealthSystem
    gpu: GpuInfo
    models: FolderCount
    loras: FolderCount
    queue: QueueInfo
    outputs: OutputsInfo
    warnings: list[str]
    jobs: dict[JobStateName, int] = Field(..., description="Jobs in the store by state")
    replicas: list[ReplicaReport]


class ValidationIssue(BaseModel):
    loc: list[str | int] = Field(..., description='Where: ["body", "width"], ["path", "job_id"], ...')
    msg: str
    type: str


LimitName = Literal["max_queued_jobs", "max_queued_images", "requests_per_minute"]


class ErrorResponse(BaseModel):
    """The body of every error answer, whatever its status code."""

    status: Literal["error"] = "error"
    error: str = Field(..., description="What is wrong and what is allowed, for people")
    detail: list[ValidationIssue] | None = Field(None, description="422 only: each invalid field")
    field: str | None = Field(None, description="The request field the error is about, where it is about one")
    limit: LimitName | None = Field(
        None, description="429 only: the limit reached (the caller key's `max_queued_images` or "
        "`requests_per_minute`, or the model family's `max_queued_jobs`)",
    )  # fmt: skip
