"""The models of the ControlNet routes: the native listing (`GET /controlnet/models`) and A1111's ControlNet
extension API (`/controlnet/version`, `model_list`, `module_list`, `control_types`, `settings`, `detect`), in
the extension's shapes, which A1111 clients (webuiapi's `controlnet_*` calls, the Photoshop, GIMP and Krita
plugins) read."""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipelines.schemas import IMAGE_FORMAT, PreprocessorModule, ProcessorResolution

MAX_DETECT_IMAGES = 8  # images per `POST /controlnet/detect`


class ControlNetModelInfo(BaseModel):
    name: str = Field(..., description="What a unit's `model` takes (the A1111 title works too)")
    title: str = Field(..., description="A1111's `name [hash8]`")
    family: Literal["sd15", "sdxl", "sd2"] = Field(..., description="The base model family it was trained for")
    type: Literal["controlnet", "ip-adapter"] = Field(..., description="A ControlNet, or an IP-Adapter (its unit "
                                                      "takes an ip-adapter_clip_* module)")  # fmt: skip
    format: Literal["single-file", "diffusers"]


class ControlNetModelsResponse(BaseModel):
    status: Literal["success"] = "success"
    models: list[ControlNetModelInfo]


class ControlNetVersion(BaseModel):
    version: int = Field(..., description="The extension API version this service answers as")


class ControlNetModelList(BaseModel):
    model_list: list[str] = Field(..., description="The installed ControlNet models' `name [hash8]` titles")


class Slider(BaseModel):
    name: str
    value: float
    min: float
    max: float
    step: float


class ModuleDetail(BaseModel):
    model_free: bool = Field(..., description="Whether the preprocessor is used without a ControlNet model")
    sliders: list[Slider | None]


class ControlNetModuleList(BaseModel):
    module_list: list[str]
    module_detail: dict[str, ModuleDetail]


class ControlType(BaseModel):
    module_list: list[str]
    model_list: list[str]
    default_option: str
    default_model: str


class ControlTypes(BaseModel):
    control_types: dict[str, ControlType]


class ControlNetSettings(BaseModel):
    control_net_unit_count: int = Field(..., description="Units per job (configs/limits.yaml `max_controlnet_units`)")


DetectImage = Annotated[str, Field(min_length=1, json_schema_extra={"format": IMAGE_FORMAT})]


class DetectRequest(BaseModel):
    """The extension's detect body; webuiapi sends the images as `controlnet_images`, which is read too (one
    of the two lists has the images)."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"anyOf": [
        {"required": ["controlnet_input_images"], "properties": {"controlnet_input_images": {"minItems": 1}}},
        {"required": ["controlnet_images"], "properties": {"controlnet_images": {"minItems": 1}}},
    ]})  # fmt: skip
    controlnet_module: PreprocessorModule = Field(
        "none", description="GET /controlnet/module_list (the IP-Adapter modules make no map)"
    )
    controlnet_input_images: list[DetectImage] = Field(default_factory=list, max_length=MAX_DETECT_IMAGES)
    controlnet_images: list[DetectImage] = Field(
        default_factory=list, max_length=MAX_DETECT_IMAGES, description="webuiapi's name for `controlnet_input_images`"
    )
    controlnet_processor_res: ProcessorResolution = Field(-1, description="-1: the module's default (512)")
    # Strict: the schema says number (an integer is one), so `true` or "64" is a 422, not a threshold of 1 or 64.
    controlnet_threshold_a: float = Field(-1, strict=True, allow_inf_nan=False, description="-1: the module's "
                                          "default; clamped to the slider's range, as the extension does")  # fmt: skip
    controlnet_threshold_b: float = Field(-1, strict=True, allow_inf_nan=False,
                                          description="As `controlnet_threshold_a`")  # fmt: skip
    controlnet_masks: list[DetectImage] = Field(default_factory=list, max_length=MAX_DETECT_IMAGES,
                                                description="Accepted; no preprocessor here takes a mask")  # fmt: skip
    low_vram: bool = Field(False, strict=True)


class DetectResponse(BaseModel):
    images: list[str] = Field(..., description="One detected map per input image: PNG, raw base64")
    info: Literal["Success"] = "Success"
