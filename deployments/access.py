"""Access control for the HTTP ingress: optional API keys, CORS, and the request-size limit.

API keys are off unless configured (`DIFFUSION_API_KEYS=key1,key2`, or a file with one key per line in
`DIFFUSION_API_KEYS_FILE` or the app argument `api_keys_file`). When on, every route except `/hello` and the
page `/` (it asks for a key itself) needs `Authorization: Bearer <key>` (or, for A1111 clients, `Basic`
credentials with the key as the password); keys are compared in constant time. CORS origins come from
`DIFFUSION_API_CORS_ORIGINS` (comma-separated, `*` for any) or the app argument `cors_origins`.
"""

import base64
import binascii
import hashlib
import hmac
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers, MutableHeaders
from starlette.routing import get_route_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipelines.errors import DiffusionAPIError
from pipelines.limits import LIMITS

OPEN_PATHS = ("/hello", "/")  # the page asks for a key itself when the API answers 401
CORS_METHODS = "GET, POST, DELETE, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type"


@dataclass
class AccessPolicy:
    api_keys: list[bytes] = field(default_factory=list)
    cors_origins: list[str] = field(default_factory=list)
    max_request_bytes: int = LIMITS.max_request_bytes

    @classmethod
    def from_config(cls, api_keys_file: str | None = None, cors_origins: list[str] | None = None) -> "AccessPolicy":
        keys = [key.strip() for key in os.environ.get("DIFFUSION_API_KEYS", "").split(",")]
        keys_file = api_keys_file or os.environ.get("DIFFUSION_API_KEYS_FILE")
        if keys_file:
            lines = Path(keys_file).expanduser().read_text().splitlines()
            keys += [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
        origins = cors_origins
        if origins is None:
            origins = [o.strip() for o in os.environ.get("DIFFUSION_API_CORS_ORIGINS", "").split(",") if o.strip()]
        return cls(api_keys=[key.encode() for key in keys if key], cors_origins=origins)

    def key_is_valid(self, authorization: str | None) -> bool:
        return not self.api_keys or self.key_of(authorization) is not None

    def key_of(self, authorization: str | None) -> bytes | None:
        """The API key an `Authorization` header carries, if it is one of ours: `Bearer <key>`, or A1111's
        `Basic base64(user:password)` with the key as the password (what A1111 clients send). None when keys
        are off: then any header (clients send `Basic ` even with no credentials) is ignored."""
        if not self.api_keys:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        offered = token.strip().encode()
        if scheme.lower() == "basic":
            try:
                offered = base64.b64decode(offered, validate=True).partition(b":")[2]
            except (binascii.Error, ValueError):
                return None
        elif scheme.lower() != "bearer":
            return None
        if not offered:
            return None
        # Compare with every key (no early exit), each comparison in constant time.
        matches = [hmac.compare_digest(offered, key) for key in self.api_keys]
        return self.api_keys[matches.index(True)] if any(matches) else None

    def owner_of(self, authorization: str | None) -> str:
        """Whose job this is, for the A1111 API's progress and interrupt: a fingerprint of the caller's key
        ("" with keys off: every caller is the same one)."""
        key = self.key_of(authorization)
        return hashlib.sha256(key).hexdigest()[:16] if key else ""

    def allowed_origin(self, origin: str | None) -> str | None:
        if not origin or not self.cors_origins:
            return None
        if "*" in self.cors_origins:
            return "*"
        return origin if origin in self.cors_origins else None


A1111_PREFIX = "/sdapi/"


def is_a1111_path(path: str) -> bool:
    return path.startswith(A1111_PREFIX)


def error_response(status: int, message: str, headers: dict | None = None, a1111: bool = False,
                   error: str = "HTTPException", field: str | None = None) -> JSONResponse:  # fmt: skip
    """The API's error body, whatever the status; on the A1111 API (`a1111`), A1111's own error shape
    `{error, detail, body, errors}` (its clients read `detail`)."""
    if a1111:
        content = {"error": error, "detail": message, "body": "", "errors": message}
    else:
        content = {"status": "error", "error": message}
        if field:
            content["field"] = field
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
    """The checks every request passes before its route: CORS preflight, body size, API key. Returns the
    answer that ends the request here (or None to go on) and the CORS headers its response gets."""
    headers = Headers(scope=scope)
    origin = policy.allowed_origin(headers.get("origin"))
    cors = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"} if origin else {}
    if scope["method"] == "OPTIONS" and origin and "access-control-request-method" in headers:
        preflight = {**cors, "Access-Control-Allow-Methods": CORS_METHODS, "Access-Control-Allow-Headers": CORS_HEADERS,
                     "Access-Control-Max-Age": "600"}  # fmt: skip
        return Response(status_code=204, headers=preflight), cors
    length = headers.get("content-length") if scope["method"] in ("POST", "PUT", "PATCH") else None
    if length is not None and (not length.isdigit() or int(length) > policy.max_request_bytes):
        too_large = f"request body is {length} bytes; at most {policy.max_request_bytes} are accepted"
        return error_response(413, too_large, cors, a1111=is_a1111_path(get_route_path(scope))), cors
    path = get_route_path(scope) or "/"
    if path not in OPEN_PATHS and not policy.key_is_valid(headers.get("authorization")):
        refused = {**cors, "WWW-Authenticate": "Bearer"}
        missing_key = "missing or invalid API key: send the header 'Authorization: Bearer <key>'"
        if is_a1111_path(path):
            missing_key += " (or Basic credentials with the key as the password)"
        return error_response(401, missing_key, refused, a1111=is_a1111_path(path)), cors
    return None, cors


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
                a1111=is_a1111_path(get_route_path(scope)),
            )
            await starting(scope, receive, send)
            return
        answer, cors = check_request(policy, scope)
        if answer is not None:
            await answer(scope, receive, send)
            return
        if not cors:
            await self.app(scope, receive, send)
            return

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).update(cors)
            await send(message)

        await self.app(scope, receive, send_with_cors)


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
