"""The OpenAI-compatible Images API, `/v1/...`: a third door onto the same job service as the native and A1111
APIs, so the `openai` SDKs, LiteLLM, LangChain, Open WebUI and LibreChat generate images here unchanged.

Each call is an ordinary job (the same validation, fair queue, batching, store and retries; its id is in the
`X-Job-Id` header and it shows in `/queue/{id}`); the call answers when the images are done, and a client that
goes away cancels nothing. Errors come in OpenAI's shape with the statuses its SDKs map to their exception
classes (a request it cannot use: 400 naming `param`). The translation is pipelines/openai_images.py; the
signed image links deployments/image_links.py.
"""

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Form, Path, Query, Request, Response, UploadFile
from fastapi.responses import StreamingResponse
from pydantic import Field

from deployments.access import caller, error_response, require_json_body
from deployments.contract import REPLAYED_HEADER, IdempotencyKey, documented_openai_errors, submission_answer
from deployments.image_links import LINKS_PATH, ImageLinks
from deployments.job_records import JobRecord
from deployments.services import Services, ServicesDep
from pipelines import openai_images
from pipelines.errors import InvalidRequestError
from pipelines.images import decode_base64_bytes
from pipelines.infotext import MIME_TYPES
from pipelines.openai_images import (
    ImageEditFields,
    ImageGenerationRequest,
    ImagesResponse,
    ImageVariationFields,
    ModelList,
    ModelObject,
    Translated,
)
from pipelines.schemas import JOB_ID_PATTERN, JobState

OPENAI_TAG = "OpenAI-compatible API"
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


# Generation ----------------------------------------------------------------------------------------------------
@router.post("/images/generations", response_model=ImagesResponse, response_model_exclude_none=True,
             responses={**ANSWERED, **GENERATION_ERRORS}, dependencies=[Depends(require_json_body)])  # fmt: skip
async def generations(request: ImageGenerationRequest, http: Request, response: Response, services: ServicesDep,
                      idempotency_key: IdempotencyKey = None):  # fmt: skip
    """Makes `n` images from the prompt (txt2img), answered when they are done."""
    entry = await asyncio.to_thread(services.libraries.catalog.resolve, request.model)
    translated = openai_images.generation_job(request, entry.name, entry.family)
    return await _run(translated, request, "image_generation", http, response, services, idempotency_key)


@router.post("/images/edits", response_model=ImagesResponse, response_model_exclude_none=True,
             responses={**ANSWERED, **GENERATION_ERRORS})  # fmt: skip
async def edits(form: Annotated[ImageEditForm, Form()], http: Request, response: Response, services: ServicesDep,
                idempotency_key: IdempotencyKey = None):  # fmt: skip
    """Redraws the image from the prompt: inpainting where the mask is transparent (outside it the image's
    pixels come back), or the whole image without a mask."""
    files = [file for file in ([form.image] if form.image else []) + list(form.images or []) if file is not None]
    if not files:
        raise InvalidRequestError("image: send the image to edit as a file (`image`, or `image[]`)", field="image")
    image = await files[0].read()
    mask = await form.mask.read() if form.mask is not None else None
    entry = await asyncio.to_thread(services.libraries.catalog.resolve, form.model)
    translated = await asyncio.to_thread(openai_images.edit_job, form, image, mask, entry.name, len(files) - 1)
    return await _run(translated, form, "image_edit", http, response, services, idempotency_key)


@router.post("/images/variations", response_model=ImagesResponse, response_model_exclude_none=True,
             responses={**ANSWERED_IMAGES, **GENERATION_ERRORS})  # fmt: skip
async def variations(form: Annotated[ImageVariationForm, Form()], http: Request, response: Response,
                     services: ServicesDep, idempotency_key: IdempotencyKey = None):  # fmt: skip
    """Variations of the image: img2img with an empty prompt at the strength the README names."""
    image = await form.image.read()
    entry = await asyncio.to_thread(services.libraries.catalog.resolve, form.model)
    translated = await asyncio.to_thread(openai_images.variation_job, form, image, entry.name)
    return await _run(translated, form, "image_generation", http, response, services, idempotency_key)


async def _run(translated: Translated, request, events: str, http: Request, response: Response,
               services: ServicesDep, idempotency_key: str | None):  # fmt: skip
    """Submits the job as any other, then answers with its images, or streams them (`stream: true`)."""
    who = caller(http)
    jobs = services.jobs
    job_id, replayed = await jobs.submit_once(idempotency_key, translated.native, translated.kind, translated.native,
                                              who.owner, ORIGIN, warnings=translated.warnings, limits=who.limits,
                                              hand_over=lambda: services.arrivals.hand_over(http),
                                              return_images=True)  # fmt: skip
    headers = {JOB_ID_HEADER: job_id, **({REPLAYED_HEADER: "true"} if replayed else {})}
    if getattr(request, "stream", False):
        job = await jobs.job(job_id, who)
        stream = _events(job, translated, request, events, str(http.base_url), services)
        headers.update({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
    response.headers.update(headers)
    job = await jobs.wait_until_ended(job_id)
    failure = _failure(job, job_id)
    if failure is not None:
        return error_response(*failure, headers=headers, api="openai")
    result, missing = await jobs.images_of(job)
    if missing:
        return error_response(500, f"job {job_id} finished, but {'; '.join(missing)}", headers, api="openai")
    return await _answer(job, result, translated, request, str(http.base_url), services)


def _failure(job: JobRecord | None, job_id: str) -> tuple[int, str] | None:
    """The error status and message of a job that did not end with images."""
    if job is None:
        return 500, f"job {job_id} has disappeared (pruned?)"
    if job.state == JobState.error:
        return 500, f"job {job_id} failed: {job.error}"
    if job.state == JobState.cancelled:
        return 409, f"job {job_id} was cancelled (DELETE /queue/{job_id}) before its images were done"
    return None


async def _image_data(job: JobRecord, result: dict, request, base_url: str, services: Services) -> list[dict]:
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


async def _answer(job: JobRecord, result: dict, translated: Translated, request, base_url: str,
                  services: Services) -> ImagesResponse:  # fmt: skip
    return ImagesResponse(
        created=int(job.created),
        data=await _image_data(job, result, request, base_url, services),
        output_format=getattr(request, "output_format", "png"),
        quality=translated.quality,
        size=translated.size,
        usage=_usage(job),
        safety_identifier=getattr(request, "safety_identifier", None) or request.user,
    )


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def _events(job: JobRecord, translated: Translated, request, kind: str, base_url: str,
                  services: Services) -> AsyncIterator[str]:  # fmt: skip
    """OpenAI's image stream: up to `partial_images` partial images from the live previews as they come, then
    one `completed` event per image; a job that fails ends the stream with an `error` event."""
    width, height = translated.native.width, translated.native.height
    common = {"background": "opaque", "output_format": request.output_format, "quality": translated.quality,
              "size": translated.size}  # fmt: skip
    sent = 0
    async for event in services.jobs.events(job):
        if event.name == "keepalive":
            yield ": keep-alive\n\n"
        elif event.name == "preview" and sent < request.partial_images:
            preview = decode_base64_bytes(event.data["image"], "preview")
            image = await asyncio.to_thread(openai_images.partial_image, preview, width, height, request.output_format)
            yield _sse(f"{kind}.partial_image", {"type": f"{kind}.partial_image", "b64_json": _b64(image),
                                                 "partial_image_index": sent, "created_at": int(time.time()),
                                                 **common})  # fmt: skip
            sent += 1
    final = await services.jobs.wait_until_ended(job.job_id)
    failure = _failure(final, job.job_id)
    if failure is None:
        result, missing = await services.jobs.images_of(final)
        failure = (500, f"job {job.job_id} finished, but {'; '.join(missing)}") if missing else None
    if failure is not None:
        status, message = failure
        kind_of_error = "server_error" if status >= 500 else "invalid_request_error"
        yield _sse("error", {"type": "error", "error": {"message": message, "type": kind_of_error, "param": None,
                                                        "code": None}})  # fmt: skip
        return
    usage = _usage(final)
    for image in result.get("images") or []:
        yield _sse(f"{kind}.completed", {"type": f"{kind}.completed", "b64_json": image, "created_at": int(time.time()),
                                         "usage": usage, **common})  # fmt: skip


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# Models ------------------------------------------------------------------------------------------------------
@router.get("/models", response_model=ModelList, responses=documented_openai_errors(401, 503))
async def list_models(services: ServicesDep) -> ModelList:
    """The installed checkpoints, by name (what `model` takes)."""
    entries = await asyncio.to_thread(services.libraries.catalog.list_models)
    return ModelList(data=[ModelObject(id=entry.name, created=_installed_at(entry.path)) for entry in entries])


@router.get("/models/{model_id:path}", response_model=ModelObject,
            responses=documented_openai_errors(400, 401, 404, 503))  # fmt: skip
async def get_model(model_id: Annotated[str, Path(min_length=1, max_length=255)], services: ServicesDep) -> ModelObject:
    """One model by name, label or alias (configs/models.yaml); an unknown one is a 404 `model_not_found`."""
    entry = await asyncio.to_thread(services.libraries.catalog.resolve, model_id)
    return ModelObject(id=model_id, created=_installed_at(entry.path))


def _installed_at(path) -> int:
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
    return Response(content=data, media_type=MIME_TYPES.get(file_type, "application/octet-stream"),
                    headers={"Cache-Control": "private, max-age=3600"})  # fmt: skip
