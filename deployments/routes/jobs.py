"""The native API's jobs: `POST /txt2img`, `/img2img`, and `/queue/{job_id}` (status, cancel, image, events)."""

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import Response, StreamingResponse

from deployments.access import caller, require_json_body
from deployments.contract import (
    IMAGE_CONTENT,
    IMAGE_ERRORS,
    REPLAYED_HEADER,
    IdempotencyKey,
    documented_errors,
    submission_answer,
)
from deployments.services import ServicesDep
from deployments.watch import JOB_EVENT_SCHEMA, sse_event
from pipelines.infotext import MIME_TYPES
from pipelines.limits import LIMITS
from pipelines.schemas import (
    JOB_ID_PATTERN,
    CancelResponse,
    Img2ImgRequest,
    JobListItem,
    JobListResponse,
    JobState,
    QueueStatusResponse,
    StatusInclude,
    Txt2ImgRequest,
    Txt2ImgResponse,
)

router = APIRouter()
JobId = Annotated[str, Path(pattern=JOB_ID_PATTERN, description="The job_id POST /txt2img or /img2img answered")]
JOB_SUBMISSION_ERRORS = (400, 401, 404, 413, 415, 422, 429, 503)
MAX_IMAGES = LIMITS.max_batch_size * LIMITS.max_n_iter  # the most images one job makes
DOORS = {"sdapi": "a1111", "openai": "openai"}  # a job's origin -> the door that took it
CURSOR_PATTERN = r"^[0-9]{1,12}(\.[0-9]{1,12})?_[0-9a-f]{32}$"  # GET /queue's: <created>_<job_id>


def unknown_field_warnings(kind: str, fields: list[str]) -> list[str]:
    """Unknown fields are ignored (as A1111 does), and said so, since a misspelt field would otherwise go
    unnoticed."""
    if not fields:
        return []
    named = ", ".join(repr(name[:60]) for name in fields[:10])
    if len(fields) > 10:
        named += f" and {len(fields) - 10} more"
    hint = "; hires fix ('hires') applies to txt2img only" if kind == "img2img" and "hires" in fields else ""
    return [f"unknown field(s) ignored: {named}{hint}"]


SUBMITTED = submission_answer("The job is recorded as queued (or, replayed, the job of the first submission)")


@router.post("/txt2img", response_model=Txt2ImgResponse,
             responses={**SUBMITTED, **documented_errors(*JOB_SUBMISSION_ERRORS)},
             dependencies=[Depends(require_json_body)])  # fmt: skip
async def txt2img(request: Txt2ImgRequest, http: Request, response: Response, services: ServicesDep,
                  idempotency_key: IdempotencyKey = None) -> Txt2ImgResponse:  # fmt: skip
    return await _submit("txt2img", request, http, response, services, idempotency_key)


@router.post("/img2img", response_model=Txt2ImgResponse,
             responses={**SUBMITTED, **documented_errors(*JOB_SUBMISSION_ERRORS)},
             dependencies=[Depends(require_json_body)])  # fmt: skip
async def img2img(request: Img2ImgRequest, http: Request, response: Response, services: ServicesDep,
                  idempotency_key: IdempotencyKey = None) -> Txt2ImgResponse:  # fmt: skip
    return await _submit("img2img", request, http, response, services, idempotency_key)


async def _submit(kind: str, request: Txt2ImgRequest | Img2ImgRequest, http: Request, response: Response,
                  services: ServicesDep, idempotency_key: str | None) -> Txt2ImgResponse:  # fmt: skip
    warnings = unknown_field_warnings(kind, request.unknown_fields())
    who = caller(http)
    job_id, replayed = await services.jobs.submit_once(idempotency_key, request, kind, request, who.owner,
                                                       warnings=warnings, limits=who.limits,
                                                       hand_over=lambda: services.arrivals.hand_over(http))  # fmt: skip
    if replayed:
        response.headers[REPLAYED_HEADER] = "true"
    return Txt2ImgResponse(job_id=job_id)


@router.get("/queue", response_model=JobListResponse, responses=documented_errors(401, 403, 422, 503))
async def list_jobs(
    http: Request,
    services: ServicesDep,
    state: Annotated[JobState | None, Query(description="Only jobs in this state")] = None,
    limit: Annotated[int, Query(ge=1, le=100, description="Jobs per page")] = 20,
    cursor: Annotated[str | None, Query(pattern=CURSOR_PATTERN, max_length=64, description="The `next_cursor` of "
                                        "the previous page (`<created>_<job_id>`: the jobs created before it)")] = None,
    key: Annotated[str | None, Query(min_length=1, max_length=64, description="Admins: only the jobs of the API "
                                     "key with this name (others may name only their own key)")] = None,
) -> JobListResponse:  # fmt: skip
    """The caller's jobs, newest first, a page at a time (an admin key's: every key's jobs)."""
    jobs, next_cursor = await services.jobs.list_jobs(caller(http), state, limit, cursor, key)
    items = [JobListItem(job_id=job.job_id, kind=job.kind, state=job.state.value, current_phase=job.phase,
                         progress=job.progress, created=job.created, updated=job.updated, model=job.model,
                         family=job.family, door=DOORS.get(job.origin, "native"), key=job.owner,
                         images=job.images, priority=job.priority) for job in jobs]  # fmt: skip
    return JobListResponse(jobs=items, next_cursor=next_cursor)


@router.delete("/queue/{job_id}", response_model=CancelResponse, responses=documented_errors(401, 404, 409, 422, 503))
async def cancel(job_id: JobId, http: Request, services: ServicesDep) -> CancelResponse:
    """Cancels a queued or running job: a queued one never starts, a running one stops at its next step."""
    await services.jobs.cancel(job_id, caller(http))
    return CancelResponse(job_id=job_id)


@router.get("/queue/{job_id}", response_model=QueueStatusResponse, responses=documented_errors(401, 404, 422, 500, 503))
async def queue(
    job_id: JobId,
    http: Request,
    services: ServicesDep,
    wait_s: Annotated[
        float,
        Query(ge=0, le=30, description="Long poll: answer as soon as the job's state, phase or progress "
              "changes, or after this many seconds (0: at once). A job that has ended answers at once."),
    ] = 0,
    include: Annotated[
        StatusInclude | None,
        Query(description="`inputs`: the job's `payload` (in any state) with the input images it was sent "
              "(img2img `image`, `mask`), read back from the output storage; left out otherwise"),
    ] = None,
):  # fmt: skip
    fields = await services.jobs.status(job_id, caller(http), wait_s, with_inputs=include is StatusInclude.inputs)
    # Serialized here (pydantic's JSON encoder) rather than re-validated by FastAPI: this is the route clients poll.
    body = QueueStatusResponse.model_validate(fields).model_dump_json()
    return Response(content=body, media_type="application/json")


@router.get(
    "/queue/{job_id}/image",
    response_class=Response,
    responses={
        200: {"description": "The image file, with its infotext", "content": IMAGE_CONTENT},
        **documented_errors(401, 404, 409, 422, 500, 503, descriptions=IMAGE_ERRORS),
    },
)
async def job_image(job_id: JobId, http: Request, services: ServicesDep,
                    index: Annotated[int, Query(ge=0, le=MAX_IMAGES - 1)] = 0):  # fmt: skip
    """A finished job's image file (`index`: which of a batch's images, 0 first), streamed from the output
    storage with its content type, so clients and browsers fetch images without reading node paths."""
    data, file_type = await services.jobs.image(job_id, caller(http), index)
    return Response(
        content=data,
        media_type=MIME_TYPES.get(file_type, "application/octet-stream"),
        headers={"Content-Disposition": f'inline; filename="{job_id}-{index}.{file_type}"'},
    )


@router.get(
    "/queue/{job_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "Server-Sent Events: `progress` (state, phase, progress, eta_s, batch_size, "
            "attempts) at each change, then one event named after the end state (`done`, `error`, "
            "`cancelled`) with the final status without image bytes (`image_url` says where the image is), "
            "then the stream ends. A comment line every 15 s keeps idle connections open.",
            "content": {"text/event-stream": {"schema": JOB_EVENT_SCHEMA}},
        },
        **documented_errors(401, 404, 422, 503),
    },
)
async def job_events(job_id: JobId, http: Request, services: ServicesDep):
    """A job's progress as it happens, pushed: no polling by the client, and none per client here (one
    watch loop per replica wakes every stream of a job when the job changes)."""
    services.jobs.keeper.start()
    job = await services.jobs.job(job_id, caller(http))  # checked before the stream starts: a 404 is a 404

    async def stream():
        async for event in services.jobs.events(job):
            yield ": keep-alive\n\n" if event.name == "keepalive" else sse_event(event.name, event.data)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)
