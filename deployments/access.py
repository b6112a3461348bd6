"""Access control for the HTTP ingress: optional API keys (deployments/keys.py), CORS, and the body-size limit.

API keys are off unless configured. When on, every route except `/hello` and the page `/` (it asks for a key
itself) needs `Authorization: Bearer <key>` (or, for A1111 clients, `Basic` credentials with the key as the
password); the caller's key decides whose jobs it sees (its own; an admin's: all) and whether it may change
service-wide state (admins only). CORS origins come from `DIFFUSION_API_CORS_ORIGINS` (comma-separated, `*` for
any) or the app argument `cors_origins`. Bodies are bounded by `max_request_bytes`, by `Content-Length` and, for
chunked bodies, by counting what arrives.
"""

import base64
import binascii
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers, MutableHeaders
from starlette.routing import get_route_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.image_links import LINKS_PATH
from deployments.keys import ANONYMOUS, NOBODY, ApiKey, Caller, load_keys, match_key
from pipelines.errors import DiffusionAPIError, ForbiddenError
from pipelines.limits import LIMITS

OPEN_PATHS = ("/hello", "/")  # the page asks for a key itself when the API answers 401
# Signed image links (`response_format: url` of the OpenAI door): the link's signature is the access, so the
# clients that fetch them later without the caller's key (Open WebUI, LibreChat) get the image.
SIGNED_PATHS_PREFIX = LINKS_PATH + "/"
CORS_METHODS = "GET, POST, DELETE, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type"
CALLER = "diffusion_api_caller"  # where the middleware leaves the request's Caller (scope["state"])


@dataclass
class AccessPolicy:
    keys: list[ApiKey] = field(default_factory=list)
    cors_origins: list[str] = field(default_factory=list)
    max_request_bytes: int = LIMITS.max_request_bytes

    @classmethod
    def from_config(cls, api_keys_file: str | None = None, cors_origins: list[str] | None = None) -> "AccessPolicy":
        """The keys configured (KeysConfigError when something configured yields none) and the CORS origins."""
        origins = cors_origins
        if origins is None:
            origins = [o.strip() for o in os.environ.get("DIFFUSION_API_CORS_ORIGINS", "").split(",") if o.strip()]
        return cls(keys=load_keys(api_keys_file), cors_origins=origins)

    @property
    def keys_on(self) -> bool:
        return bool(self.keys)

    def caller_of(self, authorization: str | None) -> Caller | None:
        """Who the request is: with keys off, the one anonymous caller (any `Authorization` header is ignored:
        clients send `Basic ` even with no credentials); with keys on, the key's caller, or None when the header
        carries no valid key (`Bearer <key>`, or A1111's `Basic base64(user:password)` with the key as the
        password)."""
        if not self.keys:
            return ANONYMOUS
        key = self.key_of(authorization)
        return Caller(owner=key.name, admin=key.admin, keys_on=True, limits=key.limits) if key else None

    def key_of(self, authorization: str | None) -> ApiKey | None:
        if not self.keys:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        offered = token.strip().encode("utf-8", "surrogateescape")
        if scheme.lower() == "basic":
            try:
                offered = base64.b64decode(offered, validate=True).partition(b":")[2]
            except (binascii.Error, ValueError):
                return None
        elif scheme.lower() != "bearer":
            return None
        return match_key(self.keys, offered) if offered else None

    def allowed_origin(self, origin: str | None) -> str | None:
        if not origin or not self.cors_origins:
            return None
        if "*" in self.cors_origins:
            return "*"
        return origin if origin in self.cors_origins else None


def caller(request: Request) -> Caller:
    """The request's caller, as AccessMiddleware found it; a request it did not see is nobody (fail closed)."""
    return request.scope.get("state", {}).get(CALLER, NOBODY)


async def require_admin(request: Request) -> None:
    """Service-wide state (the default model, refreshes, unloads) changes for every caller: admins only."""
    if not caller(request).admin:
        raise ForbiddenError("this changes service-wide state: only an admin key may (admin: true in the keys file)")


A1111_PREFIX = "/sdapi/"
CONTROLNET_PREFIX = "/controlnet/"  # A1111's ControlNet extension's routes: A1111's error body too
OPENAI_PREFIX = "/v1/"
Api = Literal["native", "a1111", "openai"]  # the three doors, each with its own error body


def is_a1111_path(path: str) -> bool:
    return path.startswith(A1111_PREFIX)


def api_of(path: str) -> Api:
    """Which door a path belongs to: its errors are answered in that door's shape."""
    if path.startswith((A1111_PREFIX, CONTROLNET_PREFIX)):
        return "a1111"
    return "openai" if path.startswith(OPENAI_PREFIX) else "native"


# OpenAI's error `type` by status, as its API answers (the SDKs pick their exception class by status).
OPENAI_ERROR_TYPES = {403: "permission_error", 429: "requests"}


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error body; a rate limit is `requests` / `rate_limit_exceeded`, as OpenAI answers."""
    kind = OPENAI_ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param,
                      "code": "rate_limit_exceeded" if status == 429 else code}}  # fmt: skip


def error_response(status: int, message: str, headers: dict | None = None, api: Api = "native",
                   error: str = "HTTPException", field: str | None = None,
                   limit: str | None = None, code: str | None = None) -> JSONResponse:  # fmt: skip
    """The API's error body, whatever the status. On the A1111 API, A1111's own error shape
    `{error, detail, body, errors}` (its clients read `detail`); on the OpenAI door, OpenAI's
    `{"error": {message, type, param, code}}` (`field` is its `param`)."""
    if api == "a1111":
        content = {"error": error, "detail": message, "body": "", "errors": message}
    elif api == "openai":
        content = openai_error(status, message, field, code)
    else:
        content = {"status": "error", "error": message}
        if field:
            content["field"] = field
        if limit:
            content["limit"] = limit
    return AsciiJSONResponse(status_code=status, content=content, headers=headers)


class AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII characters escaped: an error message may quote what the client sent, and a lone
    surrogate (valid in JSON text, not in UTF-8) would make Starlette's UTF-8 rendering fail with a 500."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


class CollapseLeadingSlashes:
    """`//sdapi/v1/txt2img` is `/sdapi/v1/txt2img`: some A1111 clients join a base URL ending in `/` with a
    path starting with one."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and path.startswith("//"):
            scope = {**scope, "path": "/" + path.lstrip("/")}
            if "raw_path" in scope:
                scope["raw_path"] = b"/" + scope["raw_path"].lstrip(b"/")
        await self.app(scope, receive, send)


def check_request(policy: AccessPolicy, scope: Scope) -> tuple[Response | None, dict[str, str]]:
    """The checks every request passes before its route: CORS preflight, declared body size, API key. Returns
    the answer that ends the request here (or None to go on) and the CORS headers its response gets; the
    request's Caller is left in its scope's state."""
    headers = Headers(scope=scope)
    origin = policy.allowed_origin(headers.get("origin"))
    cors = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"} if origin else {}
    if scope["method"] == "OPTIONS" and origin and "access-control-request-method" in headers:
        preflight = {**cors, "Access-Control-Allow-Methods": CORS_METHODS, "Access-Control-Allow-Headers": CORS_HEADERS,
                     "Access-Control-Max-Age": "600"}  # fmt: skip
        return Response(status_code=204, headers=preflight), cors
    length = headers.get("content-length") if scope["method"] in ("POST", "PUT", "PATCH") else None
    if length is not None and (not length.isdigit() or int(length) > policy.max_request_bytes):
        return too_large(policy, scope, cors, f"request body is {length} bytes"), cors
    path = get_route_path(scope) or "/"
    found = policy.caller_of(headers.get("authorization"))
    if found is None and path not in OPEN_PATHS and not path.startswith(SIGNED_PATHS_PREFIX):
        refused = {**cors, "WWW-Authenticate": "Bearer"}
        missing_key = "missing or invalid API key: send the header 'Authorization: Bearer <key>'"
        if is_a1111_path(path):
            missing_key += " (or Basic credentials with the key as the password)"
        return error_response(401, missing_key, refused, api=api_of(path), code="invalid_api_key"), cors
    scope.setdefault("state", {})[CALLER] = found or NOBODY
    return None, cors


def too_large(policy: AccessPolicy, scope: Scope, cors: dict[str, str], what: str) -> Response:
    message = f"{what}; at most {policy.max_request_bytes} are accepted"
    return error_response(413, message, {**cors, "Connection": "close"}, api=api_of(get_route_path(scope)))


async def bounded_body(receive: Receive, limit: int) -> tuple[list[Message], bool]:
    """Reads a body sent without `Content-Length` (chunked) up to `limit` bytes, counting what arrives: the
    messages read, and False as soon as it is over the limit (the rest is never read)."""
    messages: list[Message] = []
    total = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":  # the client went away
            return messages, True
        total += len(message.get("body", b""))
        if total > limit:
            return messages, False
        if not message.get("more_body", False):
            return messages, True


def is_json(content_type: str) -> bool:
    """application/json, or any application/*+json, whatever its parameters (charset)."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or (media_type.startswith("application/") and media_type.endswith("+json"))


class AccessMiddleware:
    """Applies `check_request` to every HTTP request. Plain ASGI rather than Starlette's BaseHTTPMiddleware,
    which costs an extra task and stream per request (measurable on every status poll).

    `get_policy` returns the policy in force, or None while there is none yet: then the request is refused
    with 503 (fail closed)."""

    def __init__(self, app: ASGIApp, get_policy: Callable[[], AccessPolicy | None]):
        self.app = app
        self.get_policy = get_policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        policy = self.get_policy()
        if policy is None:
            starting = error_response(
                503,
                "the service is starting; retry in a few seconds",
                headers={"Retry-After": "2"},
                api=api_of(get_route_path(scope)),
            )
            await starting(scope, receive, send)
            return
        answer, cors = check_request(policy, scope)
        if answer is not None:
            await answer(scope, receive, send)
            return
        has_body = scope["method"] in ("POST", "PUT", "PATCH")
        headers = Headers(scope=scope)
        # Chunked framing wins over a Content-Length sent with it (RFC 9112), so such a body is counted too.
        if has_body and ("content-length" not in headers or "transfer-encoding" in headers):
            # Chunked: the size is known only by counting. Read up to the limit, then hand the route what was
            # read (Starlette reads whole bodies anyway).
            messages, within = await bounded_body(receive, policy.max_request_bytes)
            if not within:
                await too_large(policy, scope, cors, "request body is larger")(scope, receive, send)
                return
            receive = _replay(messages, receive)
        if not cors:
            await self.app(scope, receive, send)
            return

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).update(cors)
            await send(message)

        await self.app(scope, receive, send_with_cors)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A `receive` that gives `messages` first, then whatever the client sends next (its disconnect)."""
    pending = list(messages)

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed


class UnsupportedMediaTypeError(DiffusionAPIError):
    status_code = 415


async def require_json_body(request: Request) -> None:
    """Job bodies are JSON: another content type is a 415 that says so (FastAPI alone would answer a 422
    about a missing object). A body without a content type is read as JSON."""
    content_type = request.headers.get("content-type")
    if content_type is not None and not is_json(content_type):
        raise UnsupportedMediaTypeError(
            f"the request body must be JSON (Content-Type: application/json), not {content_type[:100]!r}"
        )
