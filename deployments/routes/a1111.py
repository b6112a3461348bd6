"""The A1111-compatible API, `/sdapi/v1/...`: a router over the same job service as the native API.

Existing A1111 clients (webuiapi, Open WebUI, SillyTavern, LibreChat, ...) work unchanged. Their txt2img and
img2img calls become ordinary jobs (the same validation, queue, generator replicas, batching and job store as
`POST /txt2img`; each has a job id and shows in `/queue/{id}`); the call answers when the images are done, so
many run at once, unlike A1111's one-at-a-time lock. The translation is pipelines/a1111.py.
"""

import asyncio
import logging
import time
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request, Response

from deployments.access import caller, error_response, require_admin, require_json_body
from deployments.contract import REPLAYED_HEADER, IdempotencyKey, documented_a1111_errors, submission_answer
from deployments.job_service import DEFAULT_MODEL_SETTING
from deployments.services import ServicesDep
from pipelines import a1111
from pipelines.a1111_schemas import (
    A1111Img2ImgRequest,
    A1111Txt2ImgRequest,
    Embeddings,
    ExtrasBatchImagesRequest,
    ExtrasBatchImagesResponse,
    ExtrasOptions,
    ExtrasSingleImageRequest,
    ExtrasSingleImageResponse,
    GenerationResponse,
    LatentUpscaleMode,
    Lora,
    Memory,
    PngInfoRequest,
    PngInfoResponse,
    Progress,
    Sampler,
    Scheduler,
    Scripts,
    SdModel,
    SdVae,
    Upscaler,
)
from pipelines.errors import DiffusionAPIError, InvalidRequestError, UnknownModelError
from pipelines.families import FAMILIES
from pipelines.images import decode_base64_bytes, decode_base64_image, encode_base64
from pipelines.infotext import encode_image, read_infotext
from pipelines.limits import LIMITS
from pipelines.modules import ModuleLibrary
from pipelines.schemas import JobState
from pipelines.upscalers import RESIZE_MODES, canonical_latent_name

logger = logging.getLogger("ray.serve")
SERVED_EMBEDDING_FAMILIES = {spec.embedding_family for spec in FAMILIES.values()} - {None}

router = APIRouter(prefix="/sdapi/v1", tags=["A1111-compatible API"])
ORIGIN = "sdapi"
CONTROLNET_SCRIPTS = ("controlnet", "controlnet m2m")
INTERRUPTED_WARNING = (
    "interrupted: the job was cancelled (POST /sdapi/v1/interrupt or skip, or DELETE "
    "/queue/{job_id}) before its images were done"
)
LISTING_ERRORS = documented_a1111_errors(401, 503)
BODY_ERRORS = (400, 401, 413, 415, 422, 503)  # routes that read a JSON body
UPSCALE_ERRORS = documented_a1111_errors(*BODY_ERRORS, 404)
GENERATION_ERRORS = documented_a1111_errors(400, 401, 404, 413, 415, 422, 429, 500, 503)
GENERATED = submission_answer("The images and A1111's `info` (an interrupted call: no images, `info.interrupted`)")
ADMIN_ERRORS = documented_a1111_errors(401, 403, 503)  # service-wide changes: admin keys only


# Generation ----------------------------------------------------------------------------------------------------
@router.post("/txt2img", response_model=GenerationResponse, responses={**GENERATED, **GENERATION_ERRORS},
             dependencies=[Depends(require_json_body)])  # fmt: skip
async def sdapi_txt2img(request: A1111Txt2ImgRequest, http: Request, response: Response, services: ServicesDep,
                        idempotency_key: IdempotencyKey = None):  # fmt: skip
    return await _sdapi_generate(request, http, response, services, idempotency_key)


@router.post("/img2img", response_model=GenerationResponse, responses={**GENERATED, **GENERATION_ERRORS},
             dependencies=[Depends(require_json_body)])  # fmt: skip
async def sdapi_img2img(request: A1111Img2ImgRequest, http: Request, response: Response, services: ServicesDep,
                        idempotency_key: IdempotencyKey = None):  # fmt: skip
    return await _sdapi_generate(request, http, response, services, idempotency_key)


async def _sdapi_generate(request: A1111Txt2ImgRequest | A1111Img2ImgRequest, http: Request, response: Response,
                          services: ServicesDep, idempotency_key: str | None):  # fmt: skip
    """Submits the job as any other, then waits for it (a client that goes away does not cancel it) and
    answers in A1111's shape. A retry with the same Idempotency-Key waits for the first call's job."""
    jobs = services.jobs
    mapped = await asyncio.to_thread(a1111.to_native, request, await jobs.default_model(), services.libraries.loras,
                                     services.libraries.catalog)  # fmt: skip
    who = caller(http)
    try:
        job_id, replayed = await jobs.submit_once(idempotency_key, request, mapped.kind, mapped.native, who.owner,
                                                  ORIGIN, warnings=mapped.warnings, limits=who.limits,
                                                  hand_over=lambda: services.arrivals.hand_over(http),
                                                  return_images=request.send_images is not False)  # fmt: skip
    except DiffusionAPIError as error:  # a check of the native job: named as this door's field
        raise a1111.in_a1111_terms(error) from None
    if replayed:
        response.headers[REPLAYED_HEADER] = "true"
    job = await jobs.wait_until_ended(job_id)
    if job is None:
        return error_response(500, f"job {job_id} has disappeared (pruned?)", api="a1111")
    if job.state == JobState.error:
        return error_response(500, f"job {job_id} failed: {job.error}", api="a1111", error="GenerationError")
    if job.state == JobState.cancelled:  # as A1111: an interrupted call answers 200 (with no images here)
        info = a1111.generation_info(request, job, {}, [*job.warnings, INTERRUPTED_WARNING], False)
        return GenerationResponse(images=[], parameters=a1111.parameters_echo(request),
                                  info=a1111.json_info({**info, "interrupted": True}))  # fmt: skip
    result, missing = await jobs.images_of(job)
    if missing:
        return error_response(500, f"job {job_id} finished, but {'; '.join(missing)}", api="a1111")
    inpainting = await asyncio.to_thread(_is_inpainting, services, job.payload.get("model"))
    info = a1111.generation_info(request, job, result, list(job.warnings), inpainting)
    images = result.get("images") or [] if request.send_images is not False else []
    if images and any(mapped.save_detected_maps):  # as the extension answers: the units' maps after the images
        maps = await jobs.control_maps(job)
        images = [*images, *(found for found, save in zip(maps, mapped.save_detected_maps, strict=False)
                             if save and found)]  # fmt: skip
    return GenerationResponse(images=images, parameters=a1111.parameters_echo(request), info=a1111.json_info(info))


def _is_inpainting(services: ServicesDep, model: str | None) -> bool:
    """Whether the job's model is an inpainting checkpoint (A1111's `is_using_inpainting_conditioning`)."""
    try:
        return services.libraries.catalog.resolve(model).inpainting
    except DiffusionAPIError:  # uninstalled since
        return False


@router.get("/progress", response_model=Progress, responses=documented_a1111_errors(401, 422, 503))
async def sdapi_progress(http: Request, services: ServicesDep, skip_current_image: bool = False) -> Progress:
    """The caller's running A1111-API jobs (with API keys: those of the caller's key)."""
    jobs = await services.jobs.active_jobs(ORIGIN, caller(http))
    return Progress.model_validate(a1111.progress_report(jobs, time.time(), not skip_current_image))


@router.post("/interrupt", response_model=dict[str, Any], responses=LISTING_ERRORS)
async def sdapi_interrupt(http: Request, services: ServicesDep) -> dict:
    """Cancels the caller's queued and running A1111-API jobs; never native jobs, never other keys' jobs (with
    keys on, an admin's interrupt too stops only the admin's own work)."""
    await services.jobs.cancel_active(ORIGIN, caller(http))
    return {}


@router.post("/skip", response_model=dict[str, Any], responses=LISTING_ERRORS)
async def sdapi_skip(http: Request, services: ServicesDep) -> dict:
    """As `interrupt` (a job's images are made together here, so there is no single image to skip)."""
    return await sdapi_interrupt(http, services)


# Options and the default model ----------------------------------------------------------------------------
@router.get("/options", response_model=dict[str, Any], responses=LISTING_ERRORS)
async def sdapi_get_options(services: ServicesDep) -> dict:
    name = await services.jobs.default_model()
    try:
        default = await asyncio.to_thread(services.libraries.catalog.resolve, name)
    except UnknownModelError:  # no model installed: the options still answer (clients check the connection)
        default = None
    return await asyncio.to_thread(a1111.options, services.libraries.catalog, default)


@router.post("/options", response_model=None, responses=documented_a1111_errors(*BODY_ERRORS, 403, 404),
             dependencies=[Depends(require_admin), Depends(require_json_body)])  # fmt: skip
async def sdapi_set_options(options: Annotated[dict[str, Any], Body()], services: ServicesDep) -> None:
    """Takes the whole dict GET returned (clients post it back); changes the default model, ignores the rest."""
    wanted = options.get(DEFAULT_MODEL_SETTING)
    if wanted is not None:
        if not isinstance(wanted, str):
            raise InvalidRequestError(f"{DEFAULT_MODEL_SETTING} must be a model title or name", field="options")
        await services.jobs.set_default_model(wanted, DEFAULT_MODEL_SETTING)
    return None


@router.get("/cmd-flags", response_model=dict[str, Any], responses=LISTING_ERRORS)
async def sdapi_cmd_flags() -> dict:
    return a1111.cmd_flags()


# Listings -------------------------------------------------------------------------------------------------
@router.get("/sd-models", response_model=list[SdModel], responses=LISTING_ERRORS)
async def sdapi_sd_models(services: ServicesDep) -> list[dict]:
    return await asyncio.to_thread(a1111.sd_models, services.libraries.catalog)


@router.get("/sd-vae", response_model=list[SdVae], responses=LISTING_ERRORS)
async def sdapi_sd_vae(services: ServicesDep) -> list[dict]:
    found = await asyncio.to_thread(services.libraries.vaes.available)
    return [{"model_name": vae.path.name, "filename": str(vae.path)} for vae in found]


@router.get("/sd-modules", response_model=list[SdVae], responses=LISTING_ERRORS)
async def sdapi_sd_modules(services: ServicesDep) -> list[dict]:
    """Forge's: the separate VAE and text-encoder files FLUX.1 and SD 3.5 single files run with
    (pipelines/modules.py)."""
    library = ModuleLibrary(services.settings, services.libraries.catalog.facts)
    found = await asyncio.to_thread(library.available)
    return [{"model_name": module.path.name, "filename": str(module.path)} for module in found]


@router.get("/samplers", response_model=list[Sampler], responses=LISTING_ERRORS)
async def sdapi_samplers() -> list[dict]:
    return a1111.samplers()


@router.get("/schedulers", response_model=list[Scheduler], responses=LISTING_ERRORS)
async def sdapi_schedulers() -> list[dict]:
    return a1111.schedulers()


@router.get("/upscalers", response_model=list[Upscaler], responses=LISTING_ERRORS)
async def sdapi_upscalers(services: ServicesDep) -> list[dict]:
    return await asyncio.to_thread(a1111.upscalers, services.libraries.upscalers)


@router.get("/latent-upscale-modes", response_model=list[LatentUpscaleMode], responses=LISTING_ERRORS)
async def sdapi_latent_upscale_modes() -> list[dict]:
    return a1111.latent_upscale_modes()


@router.get("/loras", response_model=list[Lora], responses=LISTING_ERRORS)
async def sdapi_loras(services: ServicesDep) -> list[dict]:
    return await asyncio.to_thread(a1111.loras, services.libraries.loras)


@router.get("/embeddings", response_model=Embeddings, responses=LISTING_ERRORS)
async def sdapi_embeddings(services: ServicesDep) -> Embeddings:
    """A1111's shape: the embeddings of a served family as `loaded` (used when a prompt names them), others as
    `skipped`."""
    found = await asyncio.to_thread(services.libraries.embeddings.available)
    listing = {"loaded": {}, "skipped": {}}
    for item in found:
        entry = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "family": item.family}
        listing["loaded" if item.family in SERVED_EMBEDDING_FAMILIES else "skipped"][item.name] = entry
    return Embeddings(**listing)


@router.get("/scripts", response_model=Scripts, responses=LISTING_ERRORS)
async def sdapi_scripts() -> Scripts:
    # ControlNet's always-on script (the extension's name, and `controlnet m2m`, which webuiapi looks for).
    return Scripts(txt2img=list(CONTROLNET_SCRIPTS), img2img=list(CONTROLNET_SCRIPTS))


@router.get("/memory", response_model=Memory, responses=LISTING_ERRORS)
async def sdapi_memory() -> dict:
    return await asyncio.to_thread(a1111.memory_report)


@router.post("/refresh-checkpoints", response_model=None, responses=ADMIN_ERRORS,
             dependencies=[Depends(require_admin)])  # fmt: skip
async def sdapi_refresh_checkpoints() -> None:
    """Model folders are read on every listing and request; there is nothing to refresh."""
    return None


@router.post("/refresh-loras", response_model=None, responses=ADMIN_ERRORS,
             dependencies=[Depends(require_admin)])  # fmt: skip
async def sdapi_refresh_loras() -> None:
    return None


@router.post("/unload-checkpoint", response_model=dict[str, Any], responses=ADMIN_ERRORS,
             dependencies=[Depends(require_admin)])  # fmt: skip
async def sdapi_unload_checkpoint() -> dict:
    """Generator replicas load and evict models themselves (by use); accepted and ignored."""
    return {}


@router.post("/reload-checkpoint", response_model=dict[str, Any], responses=ADMIN_ERRORS,
             dependencies=[Depends(require_admin)])  # fmt: skip
async def sdapi_reload_checkpoint() -> dict:
    return {}


# Images ---------------------------------------------------------------------------------------------------
@router.post("/png-info", response_model=PngInfoResponse, responses=documented_a1111_errors(*BODY_ERRORS),
             dependencies=[Depends(require_json_body)])  # fmt: skip
async def sdapi_png_info(request: PngInfoRequest, services: ServicesDep) -> dict:
    async with services.jobs.decodes:  # a bounded number of uploaded images are opened at once
        return await asyncio.to_thread(a1111.png_info, request.image)


@router.post("/extra-single-image", response_model=ExtrasSingleImageResponse,
             responses=UPSCALE_ERRORS, dependencies=[Depends(require_json_body)])  # fmt: skip
async def sdapi_extra_single_image(
    request: ExtrasSingleImageRequest, services: ServicesDep
) -> ExtrasSingleImageResponse:
    (image,) = await _upscale_images(request, [(request.image, "image")], services)
    return ExtrasSingleImageResponse(html_info="", image=image)


@router.post("/extra-batch-images", response_model=ExtrasBatchImagesResponse,
             responses=UPSCALE_ERRORS, dependencies=[Depends(require_json_body)])  # fmt: skip
async def sdapi_extra_batch_images(
    request: ExtrasBatchImagesRequest, services: ServicesDep
) -> ExtrasBatchImagesResponse:
    sources = [(item.data, f"imageList[{index}].data") for index, item in enumerate(request.imageList)]
    return ExtrasBatchImagesResponse(html_info="", images=await _upscale_images(request, sources, services))


async def _upscale_images(options: ExtrasOptions, sources: list[tuple[str, str]],
                          services: ServicesDep) -> list[str]:  # fmt: skip
    """Each image upscaled by `upscaler_1` on the Upscaler deployment, as PNG base64 keeping its infotext."""
    name = options.upscaler_1 or "None"
    if canonical_latent_name(name):
        raise InvalidRequestError(f"upscaler_1 {name!r} is a latent mode (hires fix only)", field="upscaler_1")
    name = "Lanczos" if name.strip().lower() == "none" else await asyncio.to_thread(
        services.libraries.upscalers.check, name, "upscaler_1")  # fmt: skip
    results = []
    for data, field in sources:
        async with services.jobs.decodes:
            image = await asyncio.to_thread(decode_base64_image, data, field)
        width, height = a1111.extras_size(image, options.resize_mode, options.upscaling_resize,
                                          options.upscaling_resize_w, options.upscaling_resize_h)  # fmt: skip
        if name not in RESIZE_MODES and image.width * image.height > a1111.MAX_MODEL_UPSCALE_INPUT_PIXELS:
            raise InvalidRequestError(
                f"{field} is {image.width}x{image.height}; upscaler models take at most "
                f"{a1111.MAX_MODEL_UPSCALE_INPUT_PIXELS} pixels (they upscale the whole image up to 4x first); "
                f"use Lanczos or a smaller image",
                field=field,
            )
        if width * height > LIMITS.max_input_image_pixels:
            raise InvalidRequestError(
                f"{field}: upscaled to {width}x{height}, above the {LIMITS.max_input_image_pixels} pixels "
                f"allowed; use a smaller upscaling_resize",
                field="upscaling_resize",
            )
        (upscaled,) = await services.upscaler.upscale.remote([image], name, width, height)
        infotext = await asyncio.to_thread(read_infotext, decode_base64_bytes(data, field))
        encoded = await asyncio.to_thread(encode_image, upscaled, "png", infotext)
        results.append(encode_base64(encoded))
    return results
