"""The one table from exceptions to HTTP answers, for every router.

Domain errors (pipelines/errors.py) carry their status and a message the caller can act on; on A1111's paths
the body is A1111's `{error, detail, body, errors}`, elsewhere `{"status": "error", "error", "field"}`. A bug
answers 500 with "internal error" and the request's id (Serve's `x-request-id`, also in the log line with the
traceback), never the exception's text. 4xx answers are logged at info with the request id.
"""

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import get_route_path

from deployments.access import Api, AsciiJSONResponse, api_of, error_response
from deployments.contract import documented_methods
from pipelines.errors import DiffusionAPIError, InvalidNameError, ServiceBusyError, UnknownModelError

logger = logging.getLogger("ray.serve")
REQUEST_ID_HEADER = "x-request-id"  # set by Serve's proxy (HAProxy or its own) on every request


def request_id(request: Request) -> str:
    return request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex


def _api(request: Request) -> Api:
    return api_of(get_route_path(request.scope))


def _status_on(api: Api, status: int) -> int:
    """OpenAI answers a request it cannot use with 400 (its SDKs raise BadRequestError), where the other doors
    answer 422."""
    return 400 if api == "openai" and status == 422 else status


def _refused(request: Request, status: int, message: str) -> None:
    logger.info("%s %s answered %d (request %s): %s", request.method, request.url.path, status,
                request_id(request), message[:300])  # fmt: skip


async def domain_error(request: Request, error: DiffusionAPIError) -> JSONResponse:
    api = _api(request)
    status = _status_on(api, error.status_code)
    if status >= 500:
        logger.error("%s %s failed (request %s): %s", request.method, request.url.path, request_id(request),
                     error.message)  # fmt: skip
    else:
        _refused(request, status, error.message)
    if isinstance(error, ServiceBusyError):
        return error_response(status, error.message, headers={"Retry-After": str(error.retry_after_s)},
                              api=api, limit=getattr(error, "limit", None))  # fmt: skip
    unknown_model = isinstance(error, UnknownModelError) or (
        isinstance(error, InvalidNameError) and error.field == "model"
    )
    code = "model_not_found" if unknown_model else None
    return error_response(status, error.message, api=api, error=type(error).__name__, field=error.field,
                          code=code)  # fmt: skip


async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
    """A bug still answers JSON (A1111's error body on its paths), never Starlette's plain-text page, and never
    the exception's text: it may name files, hosts or other callers' values. The log has it, by request id."""
    rid = request_id(request)
    logger.error("%s %s failed (request %s)", request.method, request.url.path, rid, exc_info=error)
    message = f"internal error (request id {rid}); the service's log has the details"
    return error_response(500, message, headers={"X-Request-ID": rid}, api=_api(request), error="InternalError")


def jsonable_errors(error: RequestValidationError) -> list[dict]:
    return [{"loc": list(item["loc"]), "msg": item["msg"], "type": item["type"]} for item in error.errors()]


def _location(item: dict, leave_out: tuple[str, ...] = ("body",)) -> str:
    return ".".join(str(part) for part in item["loc"] if part not in leave_out) or "body"


# OpenAI's error codes for the kinds of invalid parameter.
OPENAI_VALIDATION_CODES = {"missing": "missing_required_parameter", "extra_forbidden": "unknown_parameter"}


async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    api = _api(request)
    parts = []
    for item in error.errors():
        # A missing field's "input" is the whole body (on the OpenAI door's forms: its files' descriptions too).
        echo = "input" in item and not (api == "openai" and item["type"] == "missing")
        parts.append(f"{_location(item)}: {item['msg']}" + (f" (got {item['input']!r})" if echo else ""))
    message = "; ".join(parts)[:2000]
    _refused(request, _status_on(api, 422), message)
    if api == "openai":  # OpenAI names one parameter: the first one wrong
        first = error.errors()[0] if error.errors() else {"loc": (), "type": ""}
        if first["type"] == "json_invalid":  # its location is a character offset, not a parameter
            return error_response(400, message, api=api, code="invalid_json")
        code = OPENAI_VALIDATION_CODES.get(first["type"], "invalid_value")
        param = _location(first, leave_out=("body", "query", "path", "header"))
        return error_response(400, message, api=api, field=param, code=code)
    if api == "a1111":
        body = {"error": "RequestValidationError", "detail": jsonable_errors(error), "body": "", "errors": message}
    else:
        body = {"status": "error", "error": message, "detail": jsonable_errors(error)}
    return AsciiJSONResponse(status_code=422, content=body)


async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    """Starlette's own answers (unknown path, method not allowed) in the API's error shape. A 405 lists in
    `Allow` every method the schema documents for the path: Starlette names only the first matching route's."""
    headers = dict(error.headers or {})
    if error.status_code == 405:
        allowed = documented_methods(request.app, get_route_path(request.scope))
        headers["Allow"] = ", ".join(allowed) if allowed else headers.get("Allow", "")
        message = f"{request.method} is not allowed on {request.url.path}; allowed: {headers['Allow']}"
    elif error.status_code == 404:
        message = f"no such path: {request.url.path} (see /docs)"
    elif error.status_code == 400:
        message = f"the request body cannot be read as JSON: {error.detail}"
    else:
        message = str(error.detail)
    _refused(request, error.status_code, message)
    return error_response(_status_on(_api(request), error.status_code), message, headers=headers, api=_api(request))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(DiffusionAPIError, domain_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected_error)
