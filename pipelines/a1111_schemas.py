"""Request and response models of the A1111-compatible API (`/sdapi/v1`), in AUTOMATIC1111 v1.10's shapes.

Lax where the native models are strict, as A1111 (pydantic 1) is: numbers may be sent as numeric strings, most
fields may be null (the default), and any other field is accepted (clients send their own). The schema says so
(`anyOf` number / numeric string / null), so generated clients and the fuzzing test agree with the code.
"""

import math
import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, field_validator

from pipelines.limits import LIMITS
from pipelines.schemas import IMAGE_FORMAT, whole_numbers_as_integers

_NUMBER_PATTERN = r"^\s*[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?\s*$"
_NUMBER = re.compile(_NUMBER_PATTERN)


def number_from_text(value: Any) -> Any:
    if isinstance(value, bool):  # pydantic's lax mode would take true as 1
        raise ValueError("a number is expected, not a boolean")
    """A1111 (pydantic 1) takes numbers written as strings; so do we. Anything else is left to the type."""
    if isinstance(value, str) and _NUMBER.match(value):
        number = float(value)
        if not math.isfinite(number):  # "1e999"
            return value
        return int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _lax(kind: str) -> Any:
    return WithJsonSchema({"anyOf": [{"type": kind}, {"type": "string", "pattern": _NUMBER_PATTERN}, {"type": "null"}]})


LaxInt = Annotated[int | None, BeforeValidator(number_from_text), _lax("integer")]
LaxFloat = Annotated[float | None, BeforeValidator(number_from_text), _lax("number")]
Text = str | None
Flag = bool | None
# The prompts are bounded as the native API's are. The schema shows the bound; `a1111.to_native` checks it
# before it reads any of the text (a 422 that gives the length), so the type stays a plain optional string.
PROMPT_FIELDS = ("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt")
PromptText = Annotated[
    str | None, WithJsonSchema({"anyOf": [{"type": "string", "maxLength": LIMITS.max_prompt_chars}, {"type": "null"}]})
]


class A1111GenerationRequest(BaseModel):
    """The fields of A1111's `StableDiffusionProcessing` API models that this service reads; every other
    field is accepted and ignored. `null` means the default."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    prompt: PromptText = ""
    negative_prompt: PromptText = ""
    styles: list[str] | None = None
    seed: LaxInt = -1
    subseed: LaxInt = -1
    subseed_strength: LaxFloat = 0.0
    sampler_name: Text = None
    sampler_index: Text = "Euler"
    scheduler: Text = None
    batch_size: LaxInt = 1
    n_iter: LaxInt = 1
    steps: LaxInt = 50
    cfg_scale: LaxFloat = 7.0
    distilled_cfg_scale: LaxFloat = None  # Forge's, for FLUX.1 (its guidance embedding)
    width: LaxInt = 512
    height: LaxInt = 512
    restore_faces: Flag = None
    tiling: Flag = None
    denoising_strength: LaxFloat = None
    override_settings: dict[str, Any] | None = None
    refiner_checkpoint: Text = None
    refiner_switch_at: LaxFloat = None
    script_name: Text = None
    alwayson_scripts: dict[str, Any] | None = None
    send_images: Flag = True
    save_images: Flag = False


class A1111Txt2ImgRequest(A1111GenerationRequest):
    enable_hr: Flag = False
    hr_scale: LaxFloat = 2.0
    hr_upscaler: Text = None
    hr_second_pass_steps: LaxInt = 0
    hr_resize_x: LaxInt = 0
    hr_resize_y: LaxInt = 0
    hr_checkpoint_name: Text = None
    hr_sampler_name: Text = None
    hr_scheduler: Text = None
    hr_prompt: PromptText = ""
    hr_negative_prompt: PromptText = ""


class A1111Img2ImgRequest(A1111GenerationRequest):
    init_images: list[str] | None = Field(
        None, description="Input images: base64, with or without a data: URL prefix (the first is used)"
    )
    resize_mode: LaxInt = 0
    mask: Text = None
    mask_blur: LaxInt = None  # both directions; else mask_blur_x / mask_blur_y
    mask_blur_x: LaxInt = 4
    mask_blur_y: LaxInt = 4
    inpainting_fill: LaxInt = 0  # A1111's API defaults differ from its UI's: fill, "Only masked", no padding
    inpaint_full_res: Flag = True
    inpaint_full_res_padding: LaxInt = 0
    inpainting_mask_invert: LaxInt = 0
    include_init_images: Flag = False


class A1111Error(BaseModel):
    """A1111's error body (`modules/api/api.py`): every error answer of `/sdapi/v1`."""

    error: str = Field(..., description="The kind of error, e.g. HTTPException, RequestValidationError")
    detail: str | list[dict[str, Any]] = Field(..., description="What is wrong (422: each invalid field)")
    body: str = ""
    errors: str = Field(..., description="The same, as one line")


class GenerationResponse(BaseModel):
    images: list[str] = Field(..., description="PNG files, raw base64 (no data: prefix), infotext embedded")
    parameters: dict[str, Any] = Field(..., description="The request as received, with its defaults")
    info: str = Field(..., description="A JSON object as a string: A1111's Processed.js(), plus job_id and warnings")


class SdModel(BaseModel):
    title: str = Field(..., description="name [hash]: the value for sd_model_checkpoint")
    model_name: str
    hash: str = Field(..., description="The first 10 hex digits of the sha256")
    sha256: str
    filename: str
    config: str | None = None


class SdVae(BaseModel):
    model_name: str
    filename: str


class Sampler(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, str]


class Scheduler(BaseModel):
    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float = -1
    need_inner_model: bool = False


class Upscaler(BaseModel):
    name: str
    model_name: str | None = None
    model_path: str | None = None
    model_url: str | None = None
    scale: float = 4


class LatentUpscaleMode(BaseModel):
    name: str


class Lora(BaseModel):
    name: str
    alias: str
    path: str
    metadata: dict[str, Any]


class Embeddings(BaseModel):
    loaded: dict[str, Any] = Field(default_factory=dict)
    skipped: dict[str, Any] = Field(default_factory=dict)


class Scripts(BaseModel):
    txt2img: list[str] = Field(default_factory=list)
    img2img: list[str] = Field(default_factory=list)


class ProgressState(BaseModel):
    skipped: bool
    interrupted: bool
    stopping_generation: bool
    job: str
    job_count: int
    job_timestamp: str
    job_no: int
    sampling_step: int
    sampling_steps: int


class Progress(BaseModel):
    progress: float = Field(..., ge=0, le=1)
    eta_relative: float
    state: ProgressState
    current_image: str | None = None
    textinfo: str | None = None


class PngInfoRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    image: str = Field(..., min_length=1, json_schema_extra={"format": IMAGE_FORMAT},
                       description="An image file in base64, with or without a data: URL prefix")  # fmt: skip


class PngInfoResponse(BaseModel):
    info: str = Field(..., description="The infotext the image carries (empty when none)")
    items: dict[str, Any]
    parameters: dict[str, Any] = Field(..., description="The infotext parsed as A1111 does")


class ExtrasOptions(BaseModel):
    """A1111's extras (upscaling) fields; face restoration and the second upscaler are not available. Typed
    as A1111's clients send them (numbers as numbers), with this service's bounds."""

    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)

    resize_mode: int = Field(0, ge=0, le=1, description="0: by upscaling_resize; 1: to upscaling_resize_w x _h")
    upscaling_resize: float = Field(2.0, gt=0, le=8)
    upscaling_resize_w: int = Field(512, ge=1, le=4096)
    upscaling_resize_h: int = Field(512, ge=1, le=4096)
    upscaler_1: str | None = Field("None", max_length=255, description="See GET /sdapi/v1/upscalers")
    upscaler_2: str | None = "None"
    extras_upscaler_2_visibility: float = Field(0.0, ge=0, le=1)
    gfpgan_visibility: float = Field(0.0, ge=0, le=1)
    codeformer_visibility: float = Field(0.0, ge=0, le=1)

    _whole_numbers = field_validator("*", mode="before")(whole_numbers_as_integers)


class ExtrasSingleImageRequest(ExtrasOptions):
    image: str = Field(..., min_length=1, json_schema_extra={"format": IMAGE_FORMAT},
                       description="An image file in base64, with or without a data: URL prefix")  # fmt: skip


class ExtrasImage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    data: str = Field(..., min_length=1, json_schema_extra={"format": IMAGE_FORMAT},
                      description="An image file in base64, with or without a data: URL prefix")  # fmt: skip
    name: str = ""


class ExtrasBatchImagesRequest(ExtrasOptions):
    imageList: list[ExtrasImage] = Field(default_factory=list, max_length=LIMITS.max_batch_size)  # noqa: N815


class ExtrasSingleImageResponse(BaseModel):
    html_info: str
    image: str = Field(..., description="PNG, raw base64")


class ExtrasBatchImagesResponse(BaseModel):
    html_info: str
    images: list[str]


class Memory(BaseModel):
    ram: dict[str, float]
    cuda: dict[str, Any]
