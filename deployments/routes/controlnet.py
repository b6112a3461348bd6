"""ControlNet's routes: the native listing of the installed models, and A1111's ControlNet extension API
(`/controlnet/...`, in the extension's shapes and its error body), so A1111 clients that look for the
extension find its models, preprocessors and detection here. The preprocessors that need no weights need no
torch: they run on the ingress replica, in a worker thread within its decode slots; the depth annotators' models
run on the Upscaler deployment (pipelines/annotators.py)."""

import asyncio
import io

from fastapi import APIRouter, Depends

from deployments.access import require_json_body
from deployments.contract import documented_a1111_errors
from deployments.services import Services, ServicesDep
from pipelines import preprocessors
from pipelines.annotators import is_annotator_module
from pipelines.controlnet_schemas import (
    ControlNetModelInfo,
    ControlNetModelList,
    ControlNetModelsResponse,
    ControlNetModuleList,
    ControlNetSettings,
    ControlNetVersion,
    ControlTypes,
    DetectRequest,
    DetectResponse,
)
from pipelines.controlnets import ControlNetFile, control_types
from pipelines.errors import InvalidRequestError
from pipelines.images import decode_base64_image, encode_base64
from pipelines.ipadapters import IpAdapterFile
from pipelines.limits import LIMITS

router = APIRouter(prefix="/controlnet", tags=["ControlNet"])
EXTENSION_API_VERSION = 2  # what the extension's `GET /controlnet/version` answers for its API of today
LISTING_ERRORS = documented_a1111_errors(401, 503)


def _titles(services: Services) -> list[tuple[ControlNetFile | IpAdapterFile, str]]:
    """The ControlNets, then the IP-Adapters, with their A1111 titles (the extension lists both together)."""
    library = services.libraries.controlnets
    return [(entry, library.title(entry)) for entry in library.all_models()]


@router.get("/models", response_model=ControlNetModelsResponse, responses=LISTING_ERRORS)
async def models(services: ServicesDep) -> ControlNetModelsResponse:
    """The installed ControlNet models (`stable_diffusion/controlnet/`) and IP-Adapters
    (`stable_diffusion/ipadapter/`) with their family."""
    found = await asyncio.to_thread(_titles, services)
    return ControlNetModelsResponse(models=[
        ControlNetModelInfo(name=entry.name, title=title, family=entry.family,
                            type="ip-adapter" if isinstance(entry, IpAdapterFile) else "controlnet",
                            format="diffusers" if entry.path.is_dir() else "single-file")
        for entry, title in found])  # fmt: skip


@router.get("/version", response_model=ControlNetVersion, responses=LISTING_ERRORS)
async def version() -> ControlNetVersion:
    return ControlNetVersion(version=EXTENSION_API_VERSION)


@router.get("/model_list", response_model=ControlNetModelList, responses=documented_a1111_errors(401, 422, 503))
async def model_list(services: ServicesDep, update: bool = True) -> ControlNetModelList:
    """The models' A1111 titles (`update` is accepted: the folder is read on every call anyway)."""
    return ControlNetModelList(model_list=[title for _, title in await asyncio.to_thread(_titles, services)])


@router.get("/module_list", response_model=ControlNetModuleList, responses=documented_a1111_errors(401, 422, 503))
async def module_list(services: ServicesDep, alias_names: bool = False) -> ControlNetModuleList:
    """The preprocessors (`alias_names`: the extension's display names), with their sliders; the annotators
    that need weights only where they are installed."""
    installed = await asyncio.to_thread(services.libraries.controlnets.annotators.available)
    detail = preprocessors.module_detail(alias_names, annotators=installed)
    return ControlNetModuleList(module_list=list(detail), module_detail=detail)


@router.get("/control_types", response_model=ControlTypes, responses=LISTING_ERRORS)
async def control_types_route(services: ServicesDep) -> ControlTypes:
    titles = [title for _, title in await asyncio.to_thread(_titles, services)]
    installed = await asyncio.to_thread(services.libraries.controlnets.annotators.available)
    modules = [*preprocessors.PREPROCESSORS, *installed, *preprocessors.IP_ADAPTER_MODULES]
    return ControlTypes(control_types=control_types(modules, titles))


@router.get("/settings", response_model=ControlNetSettings, responses=LISTING_ERRORS)
async def settings() -> ControlNetSettings:
    return ControlNetSettings(control_net_unit_count=LIMITS.max_controlnet_units)


@router.post("/detect", response_model=DetectResponse,
             responses=documented_a1111_errors(400, 401, 404, 413, 415, 422, 503),
             dependencies=[Depends(require_json_body)])  # fmt: skip
async def detect(request: DetectRequest, services: ServicesDep) -> DetectResponse:
    """Runs a preprocessor on each image and answers the detected maps, as the extension's detect does. A
    threshold outside the module's slider range is clamped into it (webuiapi sends 64 whatever the module)."""
    name, annotators = request.controlnet_module, services.libraries.controlnets.annotators
    module = annotators.preprocessor(name) if is_annotator_module(name) else preprocessors.preprocessor(name)
    images = request.controlnet_input_images or request.controlnet_images
    if not images:
        raise InvalidRequestError("no image: send them in `controlnet_input_images`", field="controlnet_input_images")
    field = "controlnet_input_images" if request.controlnet_input_images else "controlnet_images"
    maps = [await services.jobs.decoding(_detect, module, image, f"{field}[{index}]", request)
            for index, image in enumerate(images)]  # fmt: skip
    return DetectResponse(images=maps)


def _detect(module: "preprocessors.Preprocessor", image: str, field: str, request: DetectRequest) -> str:
    picture = decode_base64_image(image, field=field, mode=None)  # transparency: over white, as the extension
    threshold_a, threshold_b = (_clamped(module, index, value) for index, value in
                                ((1, request.controlnet_threshold_a), (2, request.controlnet_threshold_b)))  # fmt: skip
    detected = module.run(picture, request.controlnet_processor_res, threshold_a, threshold_b)
    buffer = io.BytesIO()
    detected.save(buffer, format="PNG")
    return encode_base64(buffer.getvalue())


def _clamped(module: "preprocessors.Preprocessor", slot: int, value: float) -> float:
    """A threshold within its slider's range (negative: the default)."""
    if value < 0 or slot > len(module.thresholds):
        return -1
    slider = module.thresholds[slot - 1]
    return min(max(value, slider.min), slider.max)
