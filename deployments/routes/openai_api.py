"""The OpenAI-compatible Images API, `/v1/...`: a third door onto the same job service as the native and A1111
APIs, so the `openai` SDKs, LiteLLM, LangChain, Open WebUI and LibreChat generate images here unchanged.

Each call is an ordinary job (the same validation, fair queue, batching, store and retries; its id is in the
`X-Job-Id` header and it shows in `/queue/{id}`); the call answers when the images are done, and a client that
goes away cancels nothing. Errors come in OpenAI's shape with the statuses its SDKs map to their exception
classes (a request it cannot use: 400 naming `param`). The translation is pipelines/openai_images.py; the
signed image links deployments/image_links.py.
"""

import asyncio
import json
import logging
import pathlib
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Form, Path, Query, Request, Response, UploadFile
from fastapi.responses import StreamingResponse
from pydantic import Field

from deployments.access import caller, error_response, openai_error, require_json_body
from deployments.contract import REPLAYED_HEADER, IdempotencyKey, documented_openai_errors, submission_answer
from deployments.image_links import LINKS_PATH, ImageLinks
from deployments.job_records import JobRecord
from deployments.services import Services, ServicesDep
from pipelines import openai_images
from pipelines.catalog import ModelEntry
from pipelines.errors import DiffusionAPIError, InvalidRequestError
from pipelines.families import family_of
from pipelines.images import decode_base64_bytes, encode_base64
from pipelines.infotext import MIME_TYPES
from pipelines.openai_images import (
    OPENAI_NAMES,
    ImageEditFields,
    ImageGenerationRequest,
    ImagesResponse,
    ImageVariationFields,
    ModelList,
    ModelObject,
    Translated,
)
from pipelines.schemas import JOB_ID_PATTERN, JobState

logger = logging.getLogger("ray.serve")
OPENAI_TAG = "OpenAI-compatible API"
MULTIPART = "multipart/form-data"  # edits and variations: forms with files, as the SDKs send them
NO_RETRY = {"x-should-retry": "false"}  # the job has ended: an SDK's retry would submit it again
router = APIRouter(prefix="/v1", tags=[OPENAI_TAG])
ORIGIN = "openai"
JOB_ID_HEADER = "X-Job-Id"
GENERATION_ERRORS = documented_openai_errors(400, 401, 404, 409, 413, 415, 429, 500, 503)
STREAM_CONTENT = {
    "text/event-stream": {
        "schema": {
            "type": "string",
            "description": "`stream: true`: Server-Sent Events `image_generation."
            "partial_image` / `image_edit.partial_image` (b64_json, partial_image_index), then one "
            "`...completed` per image, as OpenAI streams them",
        }  # fmt: skip
    }
}
JOB_ID_HEADER_SCHEMA = {"description": "The job's id (GET /queue/{job_id})",
                        "schema": {"type": "string", "pattern": JOB_ID_PATTERN}}  # fmt: skip
ANSWERED_IMAGES = submission_answer("The images; the job's id is in `X-Job-Id`")
ANSWERED_IMAGES[200]["headers"][JOB_ID_HEADER] = JOB_ID_HEADER_SCHEMA
ANSWERED = submission_answer("The images (or, `stream: true`, their events); the job's id is in `X-Job-Id`")
ANSWERED[200]["content"] = {"application/json": {}, **STREAM_CONTENT}
ANSWERED[200]["headers"][JOB_ID_HEADER] = JOB_ID_HEADER_SCHEMA


class ImageEditForm(ImageEditFields):
    """The edit form with its files, as the SDK sends them (one image as `image`, several as `image[]`)."""

    image: UploadFile | None = Field(None, description="The image to edit (PNG, JPEG or WebP)")
    images: list[UploadFile] | None = Field(None, alias="image[]", description="Several images: the first is "
                                            "edited, a warning names the others")  # fmt: skip
    mask: UploadFile | None = Field(None, description="A PNG of the image's size whose transparent pixels are "
                                    "repainted; absent: the image's own transparent pixels, if it has any")  # fmt: skip


class ImageVariationForm(ImageVariationFields):
    image: UploadFile = Field(..., description="The image to vary (PNG, JPEG or WebP)")


OpenAIRequest = ImageGenerationRequest | ImageEditForm | ImageVariationForm


# Generation ----------------------------------------------------------------------------------------------------
@router.post("/images/generations", response_model=ImagesResponse, response_model_exclude_none=True,
             responses={**ANSWERED, **GENERATION_ERRORS}, dependencies=[Depends(require_json_body)])  # fmt: skip
async def generations(request: ImageGenerationRequest, http: Request, response: Response, services: ServicesDep,
                      idempotency_key: IdempotencyKey = None):  # fmt: skip
    """Makes `n` images from the prompt (txt2img), answered when they are done."""
    entry = await _model(services, request.model)
    translated = openai_images.generation_job(request, entry.name, entry.family)
    return await _run(translated, request, "image_generation", http, response, services, idempotency_key)


@router.post("/images/edits", response_model=ImagesResponse, response_model_exclude_none=True,
             responses={**ANSWERED, **GENERATION_ERRORS})  # fmt: skip
async def edits(form: Annotated[ImageEditForm, Form(media_type=MULTIPART)], http: Request, response: Response,
                services: ServicesDep, idempotency_key: IdempotencyKey = None):  # fmt: skip
    """Redraws the image from the prompt: inpainting where the mask is transparent (outside it the image's
    pixels come back), or the whole image without a mask."""
    files = [file for file in ([form.image] if form.image else []) + list(form.images or []) if file is not None]
    if not files:
        raise InvalidRequestError("image: send the image to edit as a file (`image`, or `image[]`)", field="image")
    image = await files[0].read()
    mask = await form.mask.read() if form.mask is not None else None
    entry = await _model(services, form.model)
    translated = await services.jobs.decoding(openai_images.edit_job, form, image, mask, entry.name, len(files) - 1,
                                              family_of(entry.family).sizes_multiple_of)  # fmt: skip
    return await _run(translated, form, "image_edit", http, response, services, idempotency_key)


@router.post("/images/variations", response_model=ImagesResponse, response_model_exclude_none=True,
             responses={**ANSWERED_IMAGES, **GENERATION_ERRORS})  # fmt: skip
async def variations(form: Annotated[ImageVariationForm, Form(media_type=MULTIPART)], http: Request,
                     response: Response, services: ServicesDep, idempotency_key: IdempotencyKey = None):  # fmt: skip
    """Variations of the image: img2img with an empty prompt at the strength the README names."""
    image = await form.image.read()
    entry = await _model(services, form.model)
    translated = await services.jobs.decoding(openai_images.variation_job, form, image, entry.name,
                                              family_of(entry.family).sizes_multiple_of)  # fmt: skip
    return await _run(translated, form, "image_generation", http, response, services, idempotency_key)


async def _model(services: Services, requested: str | None) -> ModelEntry:
    """The checkpoint a call names; none: the service-wide default model, as on the other doors."""
    wanted = requested or await services.jobs.default_model()
    return await asyncio.to_thread(services.libraries.catalog.resolve, wanted)


async def _run(translated: Translated, request: OpenAIRequest, event_prefix: str, http: Request, response: Response,
               services: Services, idempotency_key: str | None):  # fmt: skip
    """Submits the job as any other, then answers with its images, or streams them (`stream: true`)."""
    who = caller(http)
    jobs = services.jobs
    streamed = bool(getattr(request, "stream", False))
    native = translated.native
    with_bytes = streamed or request.response_format == "b64_json"  # a `url` answer needs no image bytes here
    try:
        job_id, replayed = await jobs.submit_once(idempotency_key, native, translated.kind, native, who.owner, ORIGIN,
                                                  warnings=translated.warnings, limits=who.limits,
                                                  hand_over=lambda: services.arrivals.hand_over(http),
                                                  return_images=with_bytes)  # fmt: skip
    except DiffusionAPIError as error:  # a check of the native job: named as this door's parameter
        error.field = OPENAI_NAMES.get(error.field, error.field)
        raise
    headers = {JOB_ID_HEADER: job_id, **({REPLAYED_HEADER: "true"} if replayed else {})}
    if streamed:
        job = await jobs.job(job_id, who)
        stream = _events(job, translated, request, event_prefix, services)
        headers.update({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
    response.headers.update(headers)
    job = await jobs.wait_until_ended(job_id)
    outcome = await _images(job, job_id, with_bytes, services)
    if isinstance(outcome, tuple):
        return error_response(*outcome, headers={**headers, **NO_RETRY}, api="openai")
    return ImagesResponse(
        created=int(job.created),
        data=await _image_data(job, outcome, request, str(http.base_url), services),
        output_format=getattr(request, "output_format", "png"),
        quality=translated.quality,
        size=translated.size,
        usage=_usage(job),
        safety_identifier=getattr(request, "safety_identifier", None) or request.user,
    )


async def _images(job: JobRecord | None, job_id: str, with_bytes: bool, services: Services) -> dict | tuple[int, str]:
    """A finished job's result (with its images' bytes, `with_bytes`), or the status and message of a job that
    ended without them."""
    if job is None:
        return 500, f"job {job_id} has disappeared (pruned?)"
    if job.state == JobState.error:
        return 500, f"job {job_id} failed: {job.error}"
    if job.state == JobState.cancelled:
        return 409, f"job {job_id} was cancelled (DELETE /queue/{job_id}) before its images were done"
    if not with_bytes:
        return job.result or {}
    result, missing = await services.jobs.images_of(job)
    return (500, f"job {job_id} finished, but {'; '.join(missing)}") if missing else result


async def _image_data(job: JobRecord, result: dict, request: OpenAIRequest, base_url: str,
                      services: Services) -> list[dict]:  # fmt: skip
    """Each image as `b64_json`, or as a signed link (`response_format: url`)."""
    prompt = job.payload.get("prompt", "")
    if request.response_format == "b64_json":
        return [{"b64_json": image, "revised_prompt": prompt} for image in result.get("images") or []]
    secret = await services.jobs.link_secret(services.links.configured_secret)
    file_type = result.get("file_type") or "png"
    count = len(result.get("output_paths") or [])
    return [{"url": services.links.url(secret, base_url, job.job_id, index, file_type), "revised_prompt": prompt}
            for index in range(count)]  # fmt: skip


def _usage(job: JobRecord) -> dict:
    tokens = openai_images.estimated_tokens(job.payload.get("prompt", ""), job.payload.get("negative_prompt", ""))
    return {"input_tokens": tokens, "input_tokens_details": {"text_tokens": tokens, "image_tokens": 0},
            "output_tokens": 0, "total_tokens": tokens}  # fmt: skip


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def _events(job: JobRecord, translated: Translated, request: OpenAIRequest, event_prefix: str,
                  services: Services) -> AsyncIterator[str]:  # fmt: skip
    """OpenAI's image stream: `partial_images` partial images from the live previews, spread over the job's
    progress (the k-th once it is past k/(partial_images+1)), then one `completed` event per image; a job that
    ends without images ends the stream with an `error` event. A client that goes away cancels nothing."""
    width, height = translated.native.width, translated.native.height
    common = {"background": "opaque", "output_format": request.output_format, "quality": translated.quality,
              "size": translated.size}  # fmt: skip
    sent = 0
    async for event in services.jobs.events(job):
        if event.name == "keepalive":
            yield ": keep-alive\n\n"
        elif event.name == "preview" and sent < request.partial_images:
            if event.data["progress"] < 100.0 * (sent + 1) / (request.partial_images + 1):
                continue
            try:
                preview = decode_base64_bytes(event.data["image"], "preview")
                image = await asyncio.to_thread(openai_images.partial_image, preview, width, height,
                                                request.output_format)  # fmt: skip
            except Exception:  # a partial image is a nicety: the stream goes on without it
                logger.warning("a preview of job %s could not be made a partial image", job.job_id, exc_info=True)
                continue
            yield _sse(f"{event_prefix}.partial_image", {
                "type": f"{event_prefix}.partial_image", "b64_json": encode_base64(image),
                "partial_image_index": sent, "created_at": int(time.time()), **common})  # fmt: skip
            sent += 1
    final = await services.jobs.wait_until_ended(job.job_id)
    outcome = await _images(final, job.job_id, True, services)
    if isinstance(outcome, tuple):
        status, message = outcome
        yield _sse("error", {"type": "error", "error": openai_error(status, message)["error"]})
        return
    usage = _usage(final)
    for image in outcome.get("images") or []:
        yield _sse(f"{event_prefix}.completed", {"type": f"{event_prefix}.completed", "b64_json": image,
                                                 "created_at": int(time.time()), "usage": usage, **common})  # fmt: skip


# Models ------------------------------------------------------------------------------------------------------
@router.get("/models", response_model=ModelList, responses=documented_openai_errors(401, 503))
async def list_models(services: ServicesDep) -> ModelList:
    """The installed checkpoints, by name (what `model` takes)."""

    def listed() -> list[ModelObject]:  # a worker thread: it reads the folders and each file's time
        entries = services.libraries.catalog.list_models()
        return [ModelObject(id=entry.name, created=_installed_at(entry.path)) for entry in entries]

    return ModelList(data=await asyncio.to_thread(listed))


@router.get("/models/{model_id:path}", response_model=ModelObject,
            responses=documented_openai_errors(400, 401, 404, 503))  # fmt: skip
async def get_model(model_id: Annotated[str, Path(min_length=1, max_length=255)], services: ServicesDep) -> ModelObject:
    """One model by name, label or alias (configs/models.yaml); an unknown one is a 404 `model_not_found`."""
    entry = await asyncio.to_thread(services.libraries.catalog.resolve, model_id)
    return ModelObject(id=model_id, created=await asyncio.to_thread(_installed_at, entry.path))


def _installed_at(path: pathlib.Path) -> int:
    try:
        return int(path.stat().st_mtime)
    except OSError:
        return 0


# Signed image links ------------------------------------------------------------------------------------------
@router.get(
    f"{LINKS_PATH.removeprefix('/v1')}/{{job_id}}/{{name}}",
    response_class=Response,
    responses={
        200: {"description": "The image file, with its infotext", "content": {
            mime: {"schema": {"type": "string", "format": "binary"}} for mime in dict.fromkeys(MIME_TYPES.values())}},
        **documented_openai_errors(400, 403, 404, 500, 503),
    },
)  # fmt: skip
async def linked_image(
    job_id: Annotated[str, Path(pattern=JOB_ID_PATTERN)],
    name: Annotated[str, Path(pattern=r"^[0-9]{1,3}\.[a-z]{3,4}$", description="`<index>.<extension>`")],
    expires: Annotated[int, Query(ge=0, le=2**40, description="Unix seconds the link works until")],
    signature: Annotated[str, Query(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")],
    services: ServicesDep,
):  # fmt: skip
    """An image of a `response_format: url` answer: the signed link is the access (no API key needed) until
    it expires (the app argument `image_link_ttl_s`)."""
    index = int(name.split(".", 1)[0])
    secret = await services.jobs.link_secret(services.links.configured_secret)
    ImageLinks.check(secret, job_id, index, expires, signature)
    data, file_type = await services.jobs.linked_image(job_id, index)
    cached = max(0, min(3600, expires - int(time.time())))  # never beyond the link's own life
    return Response(content=data, media_type=MIME_TYPES.get(file_type, "application/octet-stream"),
                    headers={"Cache-Control": f"private, max-age={cached}"})  # fmt: skip
