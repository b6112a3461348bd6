"""The A1111-compatible API, `/sdapi/v1/...`, as routes of the ingress (a mixin of `Ingress`).

Existing A1111 clients (webuiapi, Open WebUI, SillyTavern, LibreChat, ...) work unchanged. Their txt2img and
img2img calls become ordinary jobs (the same validation, queue, generator replicas, batching and job store as
`POST /txt2img`; each has a job id and shows in `/queue/{id}`); the call answers when the images are done, so
many run at once, unlike A1111's one-at-a-time lock. The translation is pipelines/a1111.py.
"""

import asyncio
import contextlib
import logging
import time
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request

from deployments.access import caller, error_response, require_admin, require_json_body
from deployments.contract import documented_a1111_errors
from deployments.jobs import TERMINAL_STATES
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
from pipelines.images import decode_base64_bytes, decode_base64_image, encode_base64
from pipelines.infotext import encode_image, read_infotext
from pipelines.limits import LIMITS
from pipelines.upscalers import RESIZE_MODES, canonical_latent_name

logger = logging.getLogger("ray.serve")
router = APIRouter(prefix="/sdapi/v1", tags=["A1111-compatible API"])
DEFAULT_MODEL_SETTING = "sd_model_checkpoint"
ORIGIN = "sdapi"
INTERRUPTED_WARNING = (
    "interrupted: the job was cancelled (POST /sdapi/v1/interrupt or skip, or DELETE "
    "/queue/{job_id}) before its images were done"
)
STORE_RETRIES = 60  # seconds of an unanswering job store before a waiting call gives up (the job goes on)
LISTING_ERRORS = documented_a1111_errors(401, 503)
BODY_ERRORS = (400, 401, 413, 415, 422, 503)  # routes that read a JSON body
UPSCALE_ERRORS = documented_a1111_errors(*BODY_ERRORS, 404)
GENERATION_ERRORS = documented_a1111_errors(400, 401, 404, 413, 415, 422, 429, 500, 503)
ADMIN_ERRORS = documented_a1111_errors(401, 403, 503)  # service-wide changes: admin keys only


class A1111Routes:
    """Routes of the A1111 API; `Ingress` provides the catalog, libraries, job store and job submission."""

    # Generation ----------------------------------------------------------------------------------------------
    @router.post("/txt2img", response_model=GenerationResponse, responses=GENERATION_ERRORS,
                 dependencies=[Depends(require_json_body)])  # fmt: skip
    async def sdapi_txt2img(self, request: A1111Txt2ImgRequest, http: Request):
        return await self._sdapi_generate(request, http)

    @router.post("/img2img", response_model=GenerationResponse, responses=GENERATION_ERRORS,
                 dependencies=[Depends(require_json_body)])  # fmt: skip
    async def sdapi_img2img(self, request: A1111Img2ImgRequest, http: Request):
        return await self._sdapi_generate(request, http)

    async def _sdapi_generate(self, request: A1111Txt2ImgRequest | A1111Img2ImgRequest, http: Request):
        """Submits the job as any other, then waits for it (shielded: a client that goes away does not cancel
        it) and answers in A1111's shape."""
        mapped = await asyncio.to_thread(a1111.to_native, request, await self.default_model_name(), self.loras)
        job_id = await self._submit_job(mapped.kind, mapped.native, http, mapped.warnings, ORIGIN, caller(http).owner)
        job = await self._ended_job(job_id)
        if job is None:
            return error_response(500, f"job {job_id} has disappeared (pruned?)", a1111=True)
        if job["state"] == "error":
            return error_response(500, f"job {job_id} failed: {job['error']}", a1111=True, error="GenerationError")
        if job["state"] == "cancelled":  # as A1111: an interrupted call answers 200 (with no images here)
            info = a1111.generation_info(request, job, {}, [*job["warnings"], INTERRUPTED_WARNING], False)
            return GenerationResponse(images=[], parameters=a1111.parameters_echo(request),
                                      info=a1111.json_info({**info, "interrupted": True}))  # fmt: skip
        result, missing = await self.with_image_bytes(job["result"] or {})
        if missing:
            return error_response(500, f"job {job_id} finished, but {'; '.join(missing)}", a1111=True)
        images = result.get("images") or []
        inpainting = await asyncio.to_thread(self._is_inpainting, job)
        info = a1111.generation_info(request, job, result, list(job["warnings"]), inpainting)
        send = request.send_images is not False
        return GenerationResponse(images=images if send else [], parameters=a1111.parameters_echo(request),
                                  info=a1111.json_info(info))  # fmt: skip

    def _is_inpainting(self, job: dict) -> bool:
        """Whether the job's model is an inpainting checkpoint (A1111's `is_using_inpainting_conditioning`)."""
        try:
            return self.catalog.resolve(job["payload"].get("model")).inpainting
        except DiffusionAPIError:  # uninstalled since
            return False

    async def _ended_job(self, job_id: str) -> dict | None:
        """The job's record once it has ended. The task this replica started usually ends it (shielded: a
        client that goes away does not cancel the job); otherwise (a job another replica finishes, or the
        stale-job reaper) the record is polled. A job store that does not answer is retried for a minute."""
        task = self._inflight.get(job_id)
        if task is not None:
            with contextlib.suppress(Exception):  # a failure is recorded on the job by the task
                await asyncio.shield(task)
        unanswered = 0
        while True:
            try:
                job = await self.jobs.get(job_id)
            except Exception:
                unanswered += 1
                if unanswered > STORE_RETRIES:
                    raise
                logger.warning("job store did not answer for job %s; retrying", job_id, exc_info=True)
                await asyncio.sleep(1.0)
                continue
            if job is None or job["state"] in TERMINAL_STATES:
                return job
            await asyncio.sleep(0.25)

    @router.get("/progress", response_model=Progress, responses=documented_a1111_errors(401, 422, 503))
    async def sdapi_progress(self, http: Request, skip_current_image: bool = False) -> Progress:
        """The caller's running A1111-API jobs (with API keys: those of the caller's key)."""
        jobs = await self.jobs.active_jobs(ORIGIN, self._owner_filter(http))
        return Progress.model_validate(a1111.progress_report(jobs, time.time(), not skip_current_image))

    @router.post("/interrupt", response_model=dict[str, Any], responses=LISTING_ERRORS)
    async def sdapi_interrupt(self, http: Request) -> dict:
        """Cancels the caller's queued and running A1111-API jobs; never native jobs, never other keys' jobs."""
        for job in await self.jobs.active_jobs(ORIGIN, self._owner_filter(http)):
            await self.jobs.cancel(job["job_id"])
        return {}

    @router.post("/skip", response_model=dict[str, Any], responses=LISTING_ERRORS)
    async def sdapi_skip(self, http: Request) -> dict:
        """As `interrupt` (a job's images are made together here, so there is no single image to skip)."""
        return await self.sdapi_interrupt(http)

    @staticmethod
    def _owner_filter(http: Request) -> str | None:
        """The caller's own jobs (with keys on, an admin's too: interrupt stops only one's own work)."""
        found = caller(http)
        return found.owner if found.keys_on else None

    # Options and the default model --------------------------------------------------------------------------
    async def default_model_name(self) -> str | None:
        """The service-wide default model set through `POST /sdapi/v1/options` (kept in the job store, so every
        ingress replica shares it and it survives restarts); None when never set or no longer installed."""
        name = await self.jobs.get_setting(DEFAULT_MODEL_SETTING)
        if name is None:
            return None
        try:
            return (await asyncio.to_thread(self.catalog.resolve, name)).name
        except UnknownModelError:
            return None

    @router.get("/options", response_model=dict[str, Any], responses=LISTING_ERRORS)
    async def sdapi_get_options(self) -> dict:
        name = await self.default_model_name()
        try:
            default = await asyncio.to_thread(self.catalog.resolve, name)
        except UnknownModelError:  # no model installed: the options still answer (clients check the connection)
            default = None
        return await asyncio.to_thread(a1111.options, self.catalog, default)

    @router.post("/options", response_model=None, responses=documented_a1111_errors(*BODY_ERRORS, 403, 404),
                 dependencies=[Depends(require_admin), Depends(require_json_body)])  # fmt: skip
    async def sdapi_set_options(self, options: Annotated[dict[str, Any], Body()]) -> None:
        """Takes the whole dict GET returned (clients post it back); changes the default model, ignores the rest."""
        wanted = options.get(DEFAULT_MODEL_SETTING)
        if wanted is not None:
            if not isinstance(wanted, str):
                raise InvalidRequestError(f"{DEFAULT_MODEL_SETTING} must be a model title or name", field="options")
            entry = await asyncio.to_thread(self.catalog.resolve, wanted, DEFAULT_MODEL_SETTING)
            await self.jobs.set_setting(DEFAULT_MODEL_SETTING, entry.name)
        return None

    @router.get("/cmd-flags", response_model=dict[str, Any], responses=LISTING_ERRORS)
    async def sdapi_cmd_flags(self) -> dict:
        return a1111.cmd_flags()

    # Listings -------------------------------------------------------------------------------------------------
    @router.get("/sd-models", response_model=list[SdModel], responses=LISTING_ERRORS)
    async def sdapi_sd_models(self) -> list[dict]:
        return await asyncio.to_thread(a1111.sd_models, self.catalog)

    @router.get("/sd-vae", response_model=list[SdVae], responses=LISTING_ERRORS)
    async def sdapi_sd_vae(self) -> list[dict]:
        found = await asyncio.to_thread(self.vaes.available)
        return [{"model_name": vae.path.name, "filename": str(vae.path)} for vae in found]

    @router.get("/samplers", response_model=list[Sampler], responses=LISTING_ERRORS)
    async def sdapi_samplers(self) -> list[dict]:
        return a1111.samplers()

    @router.get("/schedulers", response_model=list[Scheduler], responses=LISTING_ERRORS)
    async def sdapi_schedulers(self) -> list[dict]:
        return a1111.schedulers()

    @router.get("/upscalers", response_model=list[Upscaler], responses=LISTING_ERRORS)
    async def sdapi_upscalers(self) -> list[dict]:
        return await asyncio.to_thread(a1111.upscalers, self.upscalers)

    @router.get("/latent-upscale-modes", response_model=list[LatentUpscaleMode], responses=LISTING_ERRORS)
    async def sdapi_latent_upscale_modes(self) -> list[dict]:
        return a1111.latent_upscale_modes()

    @router.get("/loras", response_model=list[Lora], responses=LISTING_ERRORS)
    async def sdapi_loras(self) -> list[dict]:
        return await asyncio.to_thread(a1111.loras, self.loras)

    @router.get("/embeddings", response_model=Embeddings, responses=LISTING_ERRORS)
    async def sdapi_embeddings(self) -> Embeddings:
        """A1111's shape: the SD1.5 and SDXL embeddings as `loaded` (used when a prompt names them), others as
        `skipped`."""
        found = await asyncio.to_thread(self.embeddings.available)
        listing = {"loaded": {}, "skipped": {}}
        for item in found:
            entry = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "family": item.family}
            listing["loaded" if item.family in ("sd15", "sdxl") else "skipped"][item.name] = entry
        return Embeddings(**listing)

    @router.get("/scripts", response_model=Scripts, responses=LISTING_ERRORS)
    async def sdapi_scripts(self) -> Scripts:
        return Scripts()  # no scripts: webuiapi then adds no alwayson_scripts of its own

    @router.get("/memory", response_model=Memory, responses=LISTING_ERRORS)
    async def sdapi_memory(self) -> dict:
        return await asyncio.to_thread(a1111.memory_report)

    @router.post("/refresh-checkpoints", response_model=None, responses=ADMIN_ERRORS,
                 dependencies=[Depends(require_admin)])  # fmt: skip
    async def sdapi_refresh_checkpoints(self) -> None:
        """Model folders are read on every listing and request; there is nothing to refresh."""
        return None

    @router.post("/refresh-loras", response_model=None, responses=ADMIN_ERRORS,
                 dependencies=[Depends(require_admin)])  # fmt: skip
    async def sdapi_refresh_loras(self) -> None:
        return None

    @router.post("/unload-checkpoint", response_model=dict[str, Any], responses=ADMIN_ERRORS,
                 dependencies=[Depends(require_admin)])  # fmt: skip
    async def sdapi_unload_checkpoint(self) -> dict:
        """Generator replicas load and evict models themselves (by use); accepted and ignored."""
        return {}

    @router.post("/reload-checkpoint", response_model=dict[str, Any], responses=ADMIN_ERRORS,
                 dependencies=[Depends(require_admin)])  # fmt: skip
    async def sdapi_reload_checkpoint(self) -> dict:
        return {}

    # Images ---------------------------------------------------------------------------------------------------
    @router.post("/png-info", response_model=PngInfoResponse, responses=documented_a1111_errors(*BODY_ERRORS),
                 dependencies=[Depends(require_json_body)])  # fmt: skip
    async def sdapi_png_info(self, request: PngInfoRequest) -> dict:
        async with self.decodes:  # a bounded number of uploaded images are opened at once
            return await asyncio.to_thread(a1111.png_info, request.image)

    @router.post("/extra-single-image", response_model=ExtrasSingleImageResponse,
                 responses=UPSCALE_ERRORS, dependencies=[Depends(require_json_body)])  # fmt: skip
    async def sdapi_extra_single_image(self, request: ExtrasSingleImageRequest) -> ExtrasSingleImageResponse:
        (image,) = await self._upscale_images(request, [(request.image, "image")])
        return ExtrasSingleImageResponse(html_info="", image=image)

    @router.post("/extra-batch-images", response_model=ExtrasBatchImagesResponse,
                 responses=UPSCALE_ERRORS, dependencies=[Depends(require_json_body)])  # fmt: skip
    async def sdapi_extra_batch_images(self, request: ExtrasBatchImagesRequest) -> ExtrasBatchImagesResponse:
        sources = [(item.data, f"imageList[{index}].data") for index, item in enumerate(request.imageList)]
        return ExtrasBatchImagesResponse(html_info="", images=await self._upscale_images(request, sources))

    async def _upscale_images(self, options: ExtrasOptions, sources: list[tuple[str, str]]) -> list[str]:
        """Each image upscaled by `upscaler_1` on the Upscaler deployment, as PNG base64 keeping its infotext."""
        name = options.upscaler_1 or "None"
        if canonical_latent_name(name):
            raise InvalidRequestError(f"upscaler_1 {name!r} is a latent mode (hires fix only)", field="upscaler_1")
        name = "Lanczos" if name.strip().lower() == "none" else await asyncio.to_thread(
            self.upscalers.check, name, "upscaler_1")  # fmt: skip
        results = []
        for data, field in sources:
            async with self.decodes:
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
            (upscaled,) = await self.upscaler.upscale.remote([image], name, width, height)
            infotext = await asyncio.to_thread(read_infotext, decode_base64_bytes(data, field))
            encoded = await asyncio.to_thread(encode_image, upscaled, "png", infotext)
            results.append(encode_base64(encoded))
        return results
