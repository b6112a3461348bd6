"""Counting job submissions from the moment they reach a replica, before their bodies are read and validated,
so that a burst is known while its first job is handed to a generator (which then holds it a moment for the
others to join its batch; it never waits for a lone job)."""

from collections.abc import Callable

from fastapi import Request
from starlette.routing import get_route_path
from starlette.types import ASGIApp, Receive, Scope, Send

ARRIVING = "diffusion_api_submission_arriving"  # in a counted request's scope state until it is handed over
SUBMISSION_PATHS = ("/txt2img", "/img2img", "/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/v1/images/generations",
                    "/v1/images/edits", "/v1/images/variations")  # fmt: skip


class Arrivals:
    """Submissions this replica has received and not yet handed to a generator."""

    def __init__(self):
        self.count = 0

    def hand_over(self, request: Request) -> int:
        """The request's job is being dispatched: it stops counting; how many others are still on their way."""
        if request.scope.get("state", {}).pop(ARRIVING, False):
            self.count -= 1
        return self.count


class CountSubmissions:
    """Plain ASGI middleware; `get_arrivals` gives the replica's Arrivals (None: not counting)."""

    def __init__(self, app: ASGIApp, get_arrivals: Callable[[], Arrivals | None]):
        self.app = app
        self.get_arrivals = get_arrivals

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        counted = scope["type"] == "http" and scope["method"] == "POST" and get_route_path(scope) in SUBMISSION_PATHS
        arrivals = self.get_arrivals() if counted else None
        if arrivals is None:
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        state[ARRIVING] = True  # the route clears it when it hands the job over (Arrivals.hand_over)
        arrivals.count += 1
        try:
            await self.app(scope, receive, send)
        finally:
            if state.pop(ARRIVING, False):  # refused (4xx) before it was handed over
                arrivals.count -= 1
