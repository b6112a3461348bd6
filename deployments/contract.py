"""What `/openapi.json` says beyond each route's own models: every error answer an operation can give (one
body shape for all of them, with their headers) and, when API keys are on, the bearer security scheme.

Clients are generated from this schema and gateways validate against it, so an answer that is not listed
here is a bug; the schemathesis test (tests/serve/test_schema_fuzz.py) checks every operation against it.
"""

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import FastAPI, Header
from fastapi.openapi.utils import get_openapi
from starlette.routing import compile_path

from deployments.access import OPEN_PATHS, OPENAI_PREFIX, SIGNED_PATHS_PREFIX
from pipelines.a1111_schemas import A1111Error
from pipelines.infotext import MIME_TYPES
from pipelines.openai_images import OpenAIError
from pipelines.schemas import ErrorResponse

ERROR_DESCRIPTIONS = {
    400: "The request body cannot be decoded as text (malformed JSON text is a 422)",
    401: "API keys are on and the request has no valid `Authorization: Bearer <key>` header",
    403: "API keys are on and the caller's key is not an admin key: only admins change service-wide state",
    404: "An unknown job (a job of another API key answers the same), or an unknown model, LoRA, upscaler or "
    "refiner (the message lists the installed ones)",
    409: "The job has already ended: there is nothing to cancel",
    413: "The request body is larger than `max_request_bytes` (configs/limits.yaml)",
    415: "The request body is not JSON: send `Content-Type: application/json`",
    422: "Malformed JSON, or a field missing, of the wrong type or out of range; `detail` names each one (on "
    "submissions also: an `Idempotency-Key` already used for another request)",
    429: "A limit is reached (`limit` names it): the caller key's `max_queued_images` (images queued or running) "
    "or `requests_per_minute` (keys file), or this model family's queue (`max_queued_jobs`); retry after "
    "`Retry-After` seconds",
    500: "The output storage could not be read, or the service failed unexpectedly; the message says why",
    503: "The service is starting, or a `callback_url` host's name could not be looked up in time; retry after "
    "`Retry-After` seconds",
}

# GET /queue/{job_id}/image: the file in its own type, and what its error statuses mean there.
IMAGE_CONTENT = {
    mime: {"schema": {"type": "string", "format": "binary"}} for mime in dict.fromkeys(MIME_TYPES.values())
}
IMAGE_ERRORS = {
    **ERROR_DESCRIPTIONS,
    404: "An unknown job (or one of another API key), an `index` beyond the job's images, or an image no longer in "
    "the output storage",
    409: "The job has not finished, or it ended without an image (error, cancelled)",
}

_RETRY_AFTER = {
    "Retry-After": {"description": "Seconds to wait before retrying", "required": True, "schema": {"type": "integer"}}
}
ERROR_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"description": "`Bearer`", "required": True, "schema": {"type": "string"}}},
    429: _RETRY_AFTER,
    503: _RETRY_AFTER,
}


# Submissions that can be retried safely: `Idempotency-Key` on the four generation calls.
IdempotencyKey = Annotated[
    str,  # optional (the routes default it to None); a header is never null, so the schema says string only
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        pattern=r"^[\x20-\x7e]+$",
        json_schema_extra={"format": "idempotency-key"},  # a client's own fresh key per submission
        description="Makes a retried submission safe: the same key from the same caller with the same body "
        "within 24 h answers the first submission's job (`Idempotent-Replayed: true`) instead of making a second "
        "one; the same key with another body is a 422. 1-255 printable ASCII characters, scoped per API key.",
    ),
]
REPLAYED_HEADER = "Idempotent-Replayed"


def submission_answer(description: str) -> dict[int | str, dict[str, Any]]:
    """The 200 answer of a generation call, with the header a replayed submission carries."""
    header = {"description": "`true` when this answers an earlier submission with the same Idempotency-Key",
              "schema": {"type": "string", "enum": ["true"]}}  # fmt: skip
    return {200: {"description": description, "headers": {REPLAYED_HEADER: header}}}


def documented_errors(
    *status_codes: int, model: type = ErrorResponse, descriptions: dict[int, str] = ERROR_DESCRIPTIONS
) -> dict[int | str, dict[str, Any]]:
    """The `responses` of a route: each status code with the error model, its description and headers."""
    responses: dict[int | str, dict[str, Any]] = {}
    for code in status_codes:
        responses[code] = {"model": model, "description": descriptions[code]}
        if code in ERROR_HEADERS:
            responses[code]["headers"] = ERROR_HEADERS[code]
    return responses


A1111_ERROR_DESCRIPTIONS = {
    **ERROR_DESCRIPTIONS,
    401: "API keys are on and the request has neither `Authorization: Bearer <key>` nor Basic credentials with "
    "a key as the password",
    404: "An unknown model, sampler, scheduler or upscaler (as A1111 answers); the message lists what exists",
    422: "A value outside this service's limits, or of a type A1111 would refuse too; `detail` says which",
    500: "The generation failed, or the service failed unexpectedly (A1111's error body; `detail` says why)",
}


def documented_a1111_errors(*status_codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses` of an A1111-API route: A1111's error body `{error, detail, body, errors}`."""
    return documented_errors(*status_codes, model=A1111Error, descriptions=A1111_ERROR_DESCRIPTIONS)


OPENAI_ERROR_DESCRIPTIONS = {
    **ERROR_DESCRIPTIONS,
    400: "A parameter missing, unknown, of the wrong type or out of range, or a body that is not JSON (a form "
    "for edits and variations); `error.param` names it, `error.code` says which (OpenAI's answer: its SDKs "
    "raise BadRequestError)",
    401: "API keys are on and the request has no valid `Authorization: Bearer <key>` header (`invalid_api_key`)",
    403: "A signed image link that is not valid or has expired",
    404: "An unknown model (`model_not_found`; OpenAI's model names only as aliases in configs/models.yaml), or an "
    "image no longer in the job store or the output storage",
    409: "The job was cancelled (DELETE /queue/{job_id}) before its images were done",
    429: "A limit is reached (the message names it: the caller key's `max_queued_images` or `requests_per_minute`, "
    "or this model family's `max_queued_jobs`); `code` is `rate_limit_exceeded`; retry after `Retry-After` seconds",
    500: "The generation failed, or the service failed unexpectedly; the message says why",
}
# A job that ended without its images answers with this header: OpenAI's SDKs retry 409 and 5xx answers by
# default, which would submit the job again (a cancelled one, or one already tried `max_attempts` times).
NO_RETRY_HEADER = {"x-should-retry": {"description": "`false`: the SDK must not retry (the job has ended)",
                                      "schema": {"type": "string", "enum": ["false"]}}}  # fmt: skip


def documented_openai_errors(*status_codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses` of an OpenAI-door route: OpenAI's error body `{"error": {message, type, param, code}}`."""
    responses = documented_errors(*status_codes, model=OpenAIError, descriptions=OPENAI_ERROR_DESCRIPTIONS)
    for code in (409, 500):
        if code in responses:
            responses[code]["headers"] = {**responses[code].get("headers", {}), **NO_RETRY_HEADER}
    return responses


def documented_methods(app: FastAPI, path: str) -> list[str]:
    """The methods /openapi.json documents for the path template `path` matches (`/queue/<id>` -> DELETE, GET)."""
    for template, operations in app.openapi()["paths"].items():
        pattern, _, _ = compile_path(template)
        if pattern.match(path):
            return sorted(method.upper() for method in operations)
    return []


def install_openapi(app: FastAPI, api_keys_on: Callable[[], bool],
                    configured_fields: Callable[[], dict[str, dict]] = dict) -> None:  # fmt: skip
    """Builds the schema on its first request in each replica (where the access policy is known). With API
    keys on, every operation but the open ones (`/hello`, the page) declares the bearer scheme; with keys off it
    declares none, since none is checked. `configured_fields`: request fields whose schema depends on the
    service's configuration (field name -> its schema), put in every request model that has the field."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for path, operations in schema["paths"].items():
            if path.startswith(OPENAI_PREFIX):  # FastAPI's own 422: that door answers 400 instead, as OpenAI does
                for operation in operations.values():
                    operation["responses"].pop("422", None)
        for name, field_schema in configured_fields().items():
            for model in schema.get("components", {}).get("schemas", {}).values():
                if name in model.get("properties", {}):
                    model["properties"][name] = {"title": model["properties"][name].get("title"), **field_schema}
        if api_keys_on():
            schema.setdefault("components", {})["securitySchemes"] = {
                "apiKey": {"type": "http", "scheme": "bearer", "description": "One of the service's API keys"}
            }
            for path, operations in schema["paths"].items():
                if path not in OPEN_PATHS and not path.startswith(SIGNED_PATHS_PREFIX):
                    for operation in operations.values():
                        operation["security"] = [{"apiKey": []}]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
