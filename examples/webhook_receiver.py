"""A webhook receiver that checks the service's signature, and prints each job it is told about.

    DIFFUSION_API_WEBHOOK_SECRET=s3cret python examples/webhook_receiver.py --port 8090

The service must allow this host and share the secret (serve config args or the environment):
    DIFFUSION_API_WEBHOOK_ALLOWED_HOSTS=127.0.0.1:8090 DIFFUSION_API_WEBHOOK_SECRET=s3cret make serve
then submit a job with "callback_url": "http://127.0.0.1:8090/". Each call is one JSON line on stdout. A call is
answered 401 and not printed unless its X-Signature-256 is `sha256=` and the hex HMAC-SHA256, under the secret, of
`{X-Signature-Timestamp}.` and the raw body, and that timestamp (Unix seconds) is within --tolerance-s of this
host's clock (5 minutes by default, either way): a captured call cannot be replayed later. (Within the tolerance
it can: a receiver that must not act twice remembers the (X-Job-Id, X-Signature-Timestamp) pairs it has seen.)
With --once the receiver exits after the first verified call: 0 when that job is done, 1 when it failed or was
cancelled.

Standard library only.
"""

import argparse
import hashlib
import hmac
import json
import os
import re
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

TOLERANCE_S = 300.0


def signature_matches(secret: str, timestamp: str, body: bytes, header: str) -> bool:
    """Whether `header` signs `timestamp` (as sent) and `body` under `secret`."""
    signed = timestamp.encode() + b"." + body
    expected = "sha256=" + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    # Constant time (no timing hint about the right value); bytes, since a header may hold any character.
    return hmac.compare_digest(expected.encode(), header.encode("utf-8", "surrogateescape"))


def refusal(secret: str, body: bytes, timestamp: str | None, header: str | None, now: float,
            tolerance_s: float = TOLERANCE_S) -> str | None:  # fmt: skip
    """Why a call is refused (None: it is the service's, and recent)."""
    if not timestamp or not re.fullmatch(r"[0-9]{1,12}", timestamp):  # ASCII digits: the form that was signed
        return "a missing or malformed X-Signature-Timestamp"
    if not signature_matches(secret, timestamp, body, header or ""):
        return "a wrong signature"
    age = now - int(timestamp)
    if abs(age) > tolerance_s:  # checked once signed: a forger cannot move it
        return f"a timestamp {abs(age):.0f} s in the {'past' if age > 0 else 'future'} (more than {tolerance_s:g} s)"
    return None


class Receiver(HTTPServer):
    """One call at a time (enough for a demo, and the order of the lines is the order of the calls)."""

    def __init__(self, address, secret: str, fail_first: int, once: bool, tolerance_s: float = TOLERANCE_S):
        super().__init__(address, Handler)
        self.secret = secret
        self.to_fail = fail_first
        self.once = once
        self.tolerance_s = tolerance_s
        self.exit_code: int | None = None


class Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        reason = refusal(self.server.secret, body, self.headers.get("X-Signature-Timestamp"),
                         self.headers.get("X-Signature-256"), time.time(), self.server.tolerance_s)  # fmt: skip
        if reason:
            print(f"refused a call with {reason}", file=sys.stderr, flush=True)
            self._answer(401)
            return
        if self.server.to_fail > 0:  # --fail-first: watch the service retry
            self.server.to_fail -= 1
            self._answer(503)
            return
        status = json.loads(body)
        print(json.dumps({"verified": True, "job_id": self.headers.get("X-Job-Id"), "state": status["state"],
                          "image_url": status.get("image_url"), "error": status.get("error")}), flush=True)  # fmt: skip
        self._answer(200)
        if self.server.once and self.server.exit_code is None:
            self.server.exit_code = 0 if status["state"] == "done" else 1

    def _answer(self, code: int) -> None:
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:  # quiet: stdout is the job lines
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--once", action="store_true", help="exit after the first verified call (0: job done)")
    parser.add_argument("--fail-first", type=int, default=0, help="answer 503 to the first N verified calls")
    parser.add_argument("--tolerance-s", type=float, default=TOLERANCE_S,
                        help="refuse a call signed further than this from now (seconds)")  # fmt: skip
    args = parser.parse_args()
    secret = os.environ.get("DIFFUSION_API_WEBHOOK_SECRET")
    if not secret:
        print("set DIFFUSION_API_WEBHOOK_SECRET (the service's webhook secret)", file=sys.stderr)
        return 2
    receiver = Receiver((args.host, args.port), secret, args.fail_first, args.once, args.tolerance_s)
    print(f"listening on http://{args.host}:{args.port}/", file=sys.stderr, flush=True)
    with receiver:
        while receiver.exit_code is None:
            receiver.handle_request()
    return receiver.exit_code


if __name__ == "__main__":
    sys.exit(main())
