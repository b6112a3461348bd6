"""The OpenAI Images API's requests and answers, and their translation into native jobs (no HTTP here: the
router is deployments/routes/openai_api.py).

OpenAI's SDKs, LiteLLM, LangChain, Open WebUI's and LibreChat's image tools call `POST /v1/images/generations`
(JSON), `/v1/images/edits` and `/v1/images/variations` (multipart forms). Each call becomes an ordinary
txt2img or img2img job. OpenAI's fields map as the README's "Use it from OpenAI clients" table says (`n` ->
batch_size, `size` -> width x height, `quality` -> steps, `output_format` -> the file type); the native
request's own fields (`negative_prompt`, `seed`, `steps`, `cfg_scale`, `sampler_name`, `scheduler`, `loras`,
`hires`, ...) may be sent beside them, as the SDKs' `extra_body` does, with the same types and bounds as on
`/txt2img` (the models below take those fields' definitions from the native request, so the two never differ).
Unknown fields are a 400 naming them, as OpenAI answers.
"""

import io
import re
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from pipelines.errors import InvalidRequestError
from pipelines.families import family_of
from pipelines.images import decode_image, encode_base64, open_image
from pipelines.limits import LIMITS
from pipelines.schemas import Img2ImgRequest, Txt2ImgRequest, whole_numbers_as_integers

# Sizes: "WxH" with each side a multiple of 8 within the limits (the pattern lists them, so a generated client
# and the schema fuzzer know exactly which strings are valid), or "auto".
_SIDES = "|".join(str(side) for side in range(LIMITS.min_size, LIMITS.max_size + 1, 8))
SIZE_PATTERN = rf"^(auto|({_SIDES})x({_SIDES}))$"
SIZE_DESCRIPTION = (
    f"`WIDTHxHEIGHT` in pixels, each a multiple of 8 in [{LIMITS.min_size}, {LIMITS.max_size}] (width x height "
    f"at most {LIMITS.max_pixels}), or `auto`"
)
# `auto`: the family's native size for generations; the input image's size (snapped) for edits and variations.

Quality = Literal["low", "medium", "high", "xhigh", "max", "auto", "standard", "hd"]
# OpenAI's qualities as denoising steps (a request's own `steps` wins); the answer names the quality it ran.
QUALITY_STEPS: dict[str, tuple[int, str]] = {
    "low": (12, "low"),
    "medium": (24, "medium"),
    "auto": (24, "medium"),
    "standard": (24, "medium"),
    "high": (40, "high"),
    "hd": (40, "high"),
    "xhigh": (50, "xhigh"),
    "max": (60, "max"),
}
OutputFormat = Literal["png", "jpeg", "webp"]
FILE_TYPES = {"png": "png", "jpeg": "jpg", "webp": "webp"}  # OpenAI's output_format -> the native file type
ResponseFormat = Literal["b64_json", "url"]
# An edit with a mask repaints the masked part from scratch (OpenAI's edit); without one, and a variation, keep
# the picture's layout. A request's own `denoising_strength` wins.
EDIT_STRENGTH = 0.75
MASKED_EDIT_STRENGTH = 1.0
VARIATION_STRENGTH = 0.6

# The native fields a request may carry beside OpenAI's (the SDKs' `extra_body`). `scheduler` is the native
# `scheduler_type` under the name A1111 clients use.
COMMON_EXTRAS = ("negative_prompt", "seed", "steps", "cfg_scale", "sampler_name", "clip_skip", "vae", "priority")
JSON_EXTRAS = (*COMMON_EXTRAS, "loras", "refiner_checkpoint", "refiner_switch_at", "callback_url")
IMG2IMG_EXTRAS = ("denoising_strength", "mask_blur", "inpainting_fill", "inpaint_full_res",
                  "inpaint_full_res_padding")  # fmt: skip
RENAMED = {"scheduler": "scheduler_type"}


def native_fields(model: type[BaseModel], names: tuple[str, ...]) -> dict[str, Any]:
    """The definitions (type, bounds, default, description) of `model`'s fields `names`, for create_model."""
    fields = {name: (model.model_fields[name].annotation, model.model_fields[name]) for name in names}
    for name, native in RENAMED.items():
        fields[name] = (model.model_fields[native].annotation, model.model_fields[native])
    return fields


# OpenAI's SDKs type these as optional and send `null` for "the default", as OpenAI reads it: so does this door
# (the schema says they are nullable; a null never reaches the field's checks).
NULL_MEANS_DEFAULT = ("n", "size", "response_format", "quality", "output_format", "output_compression",
                      "background", "moderation", "stream", "partial_images")  # fmt: skip


class OpenAIFields(BaseModel):
    """What the three calls share, as OpenAI defines it."""

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {name: value for name, value in data.items() if value is not None or name not in NULL_MEANS_DEFAULT}
        return data

    model: str | None = Field(
        None, min_length=1, max_length=255,
        description="A checkpoint's name or label (GET /v1/models); OpenAI's model names only where the operator "
        "made them aliases in configs/models.yaml. Absent: the service's default model",
    )  # fmt: skip
    n: int | None = Field(1, ge=1, le=LIMITS.max_batch_size, description="Images to make (one job, one batch)")
    # The pattern is in the schema; the check is the validator's, whose message a person can read.
    size: str | None = Field("auto", json_schema_extra={"pattern": SIZE_PATTERN}, description=SIZE_DESCRIPTION)
    response_format: ResponseFormat | None = Field(
        "b64_json", description="`url`: signed links to the images that work without an API key until they expire"
    )
    user: str | None = Field(None, max_length=256, description="Accepted; not used (nothing is tracked per user)")

    @field_validator("size")
    @classmethod
    def _check_size(cls, value: str) -> str:
        if not re.fullmatch(SIZE_PATTERN, value):
            raise ValueError(f"size must be {SIZE_DESCRIPTION}")
        if value != "auto":
            width, height = (int(side) for side in value.split("x"))
            if width * height > LIMITS.max_pixels:
                raise ValueError(f"size {value} is {width * height} pixels; at most {LIMITS.max_pixels} are allowed")
        return value

    def dimensions(self, default: tuple[int, int]) -> tuple[int, int]:
        """(width, height) of `size`; `auto`: `default`."""
        if self.size == "auto":
            return default
        width, height = (int(side) for side in self.size.split("x"))
        return width, height


class RenderFields(BaseModel):
    """Generations' and edits' output options."""

    quality: Quality | None = Field("auto", description="Denoising steps: low 12, medium/auto/standard 24, high/hd 40, "
                             "xhigh 50, max 60 (a `steps` field wins)")  # fmt: skip
    output_format: OutputFormat | None = Field("png", description="The image files' format")
    output_compression: int | None = Field(100, ge=0, le=100, description="jpeg and webp quality (0-100)")
    background: Literal["transparent", "opaque", "auto"] | None = Field(
        "auto", description="Images are always opaque here; `transparent` is answered with a warning in the job"
    )
    moderation: Literal["low", "auto"] | None = Field("auto", description="Accepted; this service moderates nothing")
    stream: bool | None = Field(False, description="Server-Sent Events: partial images from the live previews, then "
                                "each image's `completed` event")  # fmt: skip
    partial_images: int | None = Field(0, ge=0, le=3, description="Partial images to stream before the final ones")
    safety_identifier: str | None = Field(None, max_length=256, description="Accepted; echoed back, not used")


STRICT = ConfigDict(strict=True, extra="forbid")
FORM = ConfigDict(extra="forbid", populate_by_name=True)  # form fields arrive as text: read leniently


class _GenerationBase(OpenAIFields, RenderFields):
    model_config = STRICT
    prompt: str = Field(..., min_length=1, max_length=LIMITS.max_prompt_chars, description="What to draw")
    style: Literal["vivid", "natural"] | None = Field(None, description="Accepted, not used (say it in the prompt)")
    complexity: Literal["low", "medium", "high"] | None = Field(None, description="Accepted, not used")

    _whole_numbers = field_validator("*", mode="before")(whole_numbers_as_integers)


ImageGenerationRequest = create_model(
    "ImageGenerationRequest",
    __base__=_GenerationBase,
    __doc__="`POST /v1/images/generations`: OpenAI's fields, and any native txt2img field beside them.",
    **native_fields(Txt2ImgRequest, (*JSON_EXTRAS, "hires")),
)


def _form_number(value: Any) -> Any:
    """A form's text "1" for a field of numbered choices (`inpainting_fill`: 0-3)."""
    return int(value) if isinstance(value, str) and value.strip().isdigit() else value


class _FormFields(OpenAIFields):
    """Edits' and variations' fields: a multipart form's text."""

    model_config = FORM

    _numbered = field_validator("inpainting_fill", mode="before", check_fields=False)(_form_number)


class _EditBase(_FormFields, RenderFields):
    prompt: str = Field(..., min_length=1, max_length=LIMITS.max_prompt_chars, description="What to draw")
    input_fidelity: Literal["high", "low"] | None = Field(None, description="Accepted, not used")


# The forms' text fields (the router adds the files). LoRAs go in the prompt as `<lora:name:weight>`: a form
# field holds text, not a list of objects.
ImageEditFields = create_model(
    "ImageEditFields",
    __base__=_EditBase,
    __doc__="`POST /v1/images/edits` (multipart): OpenAI's fields, and native img2img fields beside them.",
    **native_fields(Img2ImgRequest, (*COMMON_EXTRAS, *IMG2IMG_EXTRAS)),
)
ImageVariationFields = create_model(
    "ImageVariationFields",
    __base__=_FormFields,
    __doc__="`POST /v1/images/variations` (multipart): img2img of the image with an empty prompt.",
    **native_fields(Img2ImgRequest, (*COMMON_EXTRAS, *IMG2IMG_EXTRAS)),
)


# Answers --------------------------------------------------------------------------------------------------
class ImageData(BaseModel):
    b64_json: str | None = Field(None, description="The image file, base64 (`response_format: b64_json`)")
    url: str | None = Field(None, description="A signed link to the image file (`response_format: url`)")
    revised_prompt: str | None = Field(None, description="The prompt the image was made from (never rewritten)")


class TokenDetails(BaseModel):
    image_tokens: int = 0
    text_tokens: int = 0


class ImageUsage(BaseModel):
    """OpenAI bills by tokens; this service does not. `text_tokens` counts the prompts' words and punctuation
    (an estimate of CLIP's tokens); nothing else is counted."""

    input_tokens: int
    input_tokens_details: TokenDetails
    output_tokens: int = 0
    total_tokens: int


class ImagesResponse(BaseModel):
    created: int = Field(..., description="Unix seconds of the job's creation")
    data: list[ImageData]
    background: Literal["opaque"] = "opaque"
    output_format: OutputFormat = "png"
    quality: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    size: str
    usage: ImageUsage
    safety_identifier: str | None = None


OpenAIErrorType = Literal["invalid_request_error", "permission_error", "requests", "server_error"]


class OpenAIErrorDetail(BaseModel):
    message: str = Field(..., description="What is wrong and what is allowed")
    type: OpenAIErrorType = Field(..., description="`requests`: a rate limit (429), as OpenAI names it")
    param: str | None = Field(..., description="The request parameter the error is about (null: none)")
    code: str | None = Field(..., description="e.g. model_not_found, invalid_value, unknown_parameter, "
                             "missing_required_parameter, invalid_json, invalid_api_key, rate_limit_exceeded "
                             "(null: none)")  # fmt: skip


class OpenAIError(BaseModel):
    """OpenAI's error body: every error answer of `/v1`."""

    error: OpenAIErrorDetail


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(..., description="Unix seconds: when the checkpoint was installed (its file's time)")
    owned_by: str = "diffusion-api"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


# Translation ----------------------------------------------------------------------------------------------
class Translated(BaseModel):
    """A call as the native job it becomes, with what the answer reports of it."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    kind: Literal["txt2img", "img2img"]
    native: Txt2ImgRequest | Img2ImgRequest
    warnings: list[str]
    quality: str | None = None  # the quality it ran at (generations and edits)
    size: str


def estimated_tokens(*texts: str) -> int:
    """Words and punctuation marks: close to CLIP's token count for English prompts."""
    return sum(len(re.findall(r"\w+|[^\w\s]", text)) for text in texts)


def _extras(request: BaseModel, names: tuple[str, ...]) -> dict[str, Any]:
    """The native fields the client sent (only those: the native defaults apply to the rest)."""
    sent = request.model_fields_set
    values = {RENAMED.get(name, name): getattr(request, name) for name in (*names, *RENAMED) if name in sent}
    if isinstance(values.get("hires"), BaseModel):
        values["hires"] = values["hires"].model_dump(exclude_unset=True)
    if "loras" in values:
        values["loras"] = [lora.model_dump() if isinstance(lora, BaseModel) else lora for lora in values["loras"]]
    return values


def _render_options(request: Any, warnings: list[str]) -> tuple[dict[str, Any], str]:
    """The native output fields of OpenAI's render options, and the quality the answer names."""
    steps, quality = QUALITY_STEPS[request.quality]
    if request.background == "transparent":
        warnings.append("background 'transparent' is not supported here: the images are opaque")
    options = {"steps": steps, "file_type": FILE_TYPES[request.output_format],
               "jpeg_quality": max(1, request.output_compression),
               "preview": bool(request.stream and request.partial_images)}  # fmt: skip
    return options, quality


# Native field names as this door's parameters, for the errors that name one.
OPENAI_NAMES = {"width": "size", "height": "size", "batch_size": "n", "n_iter": "n", "file_type": "output_format",
                "scheduler_type": "scheduler"}  # fmt: skip


def _native(model: type[BaseModel], fields: dict[str, Any]) -> Txt2ImgRequest | Img2ImgRequest:
    """The native request; a value it refuses (a rule across fields) is a 400 naming OpenAI's parameter."""
    try:
        return model(**fields)
    except ValidationError as error:
        first = error.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else "body"
        name = OPENAI_NAMES.get(name, name)
        raise InvalidRequestError(f"{name}: {first['msg']}", field=name) from None


def generation_job(request: ImageGenerationRequest, model: str, family: str) -> Translated:
    """`POST /v1/images/generations` as a txt2img job of the checkpoint `model` (of `family`)."""
    warnings = [f"'{name}' is accepted and not used here" for name in ("style", "complexity")
                if getattr(request, name) is not None]  # fmt: skip
    options, quality = _render_options(request, warnings)
    width, height = request.dimensions(family_of(family).native_size)
    fields = {"prompt": request.prompt, "model": model, "width": width, "height": height, "batch_size": request.n,
              **options, **_extras(request, (*JSON_EXTRAS, "hires"))}  # fmt: skip
    native = _native(Txt2ImgRequest, fields)
    return Translated(kind="txt2img", native=native, warnings=warnings, quality=quality, size=f"{width}x{height}")


def snapped_size(width: int, height: int, multiple: int = 8) -> tuple[int, int]:
    """An input image's size as an output size: scaled down into the limits, each side a multiple of 8 (of the
    model family's `sizes_multiple_of`: 16 for FLUX.1 and SD 3.5)."""
    scale = min(1.0, LIMITS.max_size / max(width, height), (LIMITS.max_pixels / (width * height)) ** 0.5)
    return tuple(max(LIMITS.min_size, int(side * scale) // multiple * multiple) for side in (width, height))  # type: ignore[return-value]


def _alpha(raw: bytes, field: str) -> tuple[Image.Image, Image.Image | None]:
    """The image in `raw` and its alpha channel, if it has transparent pixels (None otherwise). Whether it has
    one is read from the file before any conversion: decoding turns palette and 1-bit images into RGBA."""
    with open_image(raw, field) as opened:
        transparent = opened.has_transparency_data
    image = decode_image(raw, field, mode=None)
    if not transparent:
        return image, None
    alpha = image.convert("RGBA").getchannel("A")
    return image, (alpha if alpha.getextrema()[0] < 255 else None)


def repaint_where_transparent(alpha: Image.Image) -> Image.Image:
    """OpenAI's mask (transparent = repaint) as the native one (white = repaint)."""
    return alpha.point(lambda value: 255 if value < 128 else 0)


def _png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return encode_base64(buffer.getvalue())


def edit_job(request: ImageEditFields, image: bytes, mask: bytes | None, model: str, extra_images: int,
             multiple: int = 8) -> Translated:  # fmt: skip
    """`POST /v1/images/edits` as an img2img job: inpainting where the mask (or the image's own alpha) is
    transparent, else the whole image redrawn at EDIT_STRENGTH."""
    warnings = ["'input_fidelity' is accepted and not used here"] if request.input_fidelity is not None else []
    if extra_images:
        warnings.append(f"{extra_images} more image(s) sent in image[] were not used: an edit takes one image")
    options, quality = _render_options(request, warnings)
    picture, picture_alpha = _alpha(image, "image")
    native_mask = None
    if mask is not None:
        opened, mask_alpha = _alpha(mask, "mask")
        if opened.size != picture.size:
            raise InvalidRequestError(f"mask is {opened.size[0]}x{opened.size[1]}; it must have the image's size "
                                      f"({picture.size[0]}x{picture.size[1]})", field="mask")  # fmt: skip
        # Transparent pixels: OpenAI's mask. None (an opaque or alpha-less file): the native kind, white = repaint.
        native_mask = repaint_where_transparent(mask_alpha) if mask_alpha is not None else opened.convert("L")
    elif picture_alpha is not None and picture_alpha.getextrema()[0] < 128:
        native_mask = repaint_where_transparent(picture_alpha)  # as OpenAI: no mask, the image's transparent part
    width, height = request.dimensions(snapped_size(*picture.size, multiple))
    strength = MASKED_EDIT_STRENGTH if native_mask is not None else EDIT_STRENGTH
    fields = {"prompt": request.prompt, "model": model, "width": width, "height": height, "batch_size": request.n,
              "image": _png_base64(picture.convert("RGB")), "denoising_strength": strength, **options,
              **_extras(request, (*COMMON_EXTRAS, *IMG2IMG_EXTRAS))}  # fmt: skip
    if native_mask is not None:
        fields["mask"] = _png_base64(native_mask)
    native = _native(Img2ImgRequest, fields)
    return Translated(kind="img2img", native=native, warnings=warnings, quality=quality, size=f"{width}x{height}")


def variation_job(request: ImageVariationFields, image: bytes, model: str, multiple: int = 8) -> Translated:
    """`POST /v1/images/variations` as img2img of the image with an empty prompt at VARIATION_STRENGTH."""
    picture = decode_image(image, "image")
    width, height = request.dimensions(snapped_size(*picture.size, multiple))
    fields = {"prompt": "", "model": model, "width": width, "height": height, "batch_size": request.n,
              "image": _png_base64(picture), "denoising_strength": VARIATION_STRENGTH, "file_type": "png",
              **_extras(request, (*COMMON_EXTRAS, *IMG2IMG_EXTRAS))}  # fmt: skip
    native = _native(Img2ImgRequest, fields)
    return Translated(kind="img2img", native=native, warnings=[], size=f"{width}x{height}")


def partial_image(preview: bytes, width: int, height: int, output_format: str) -> bytes:
    """A live preview (a small JPEG of the latents) as a partial image: the job's size, in its format."""
    with Image.open(io.BytesIO(preview)) as small:
        image = small.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format={"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[output_format])
    return buffer.getvalue()
