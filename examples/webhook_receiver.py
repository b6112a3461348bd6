"""A webhook receiver that checks the service's signature, and prints each job it is told about.

    DIFFUSION_API_WEBHOOK_SECRET=s3cret python examples/webhook_receiver.py --port 8090

The service must allow this host and share the secret (serve config args or the environment):
    DIFFUSION_API_WEBHOOK_ALLOWED_HOSTS=127.0.0.1:8090 DIFFUSION_API_WEBHOOK_SECRET=s3cret make serve
then submit a job with "callback_url": "http://127.0.0.1:8090/". Each call is one JSON line on stdout; a call
whose X-Signature-256 does not match the body is answered 401 and not printed. With --once the receiver exits
after the first verified call: 0 when that job is done, 1 when it failed or was cancelled.

Standard library only.
"""

import argparse
import hashlib
import hmac
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer


def signature_matches(secret: str, body: bytes, header: str) -> bool:
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    # Constant time (no timing hint about the right value); bytes, since a header may hold any character.
    return hmac.compare_digest(expected.encode(), header.encode("utf-8", "surrogateescape"))


class Receiver(HTTPServer):
    """One call at a time (enough for a demo, and the order of the lines is the order of the calls)."""

    def __init__(self, address, secret: str, fail_first: int, once: bool):
        super().__init__(address, Handler)
        self.secret = secret
        self.to_fail = fail_first
        self.once = once
        self.exit_code: int | None = None


class Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if not signature_matches(self.server.secret, body, self.headers.get("X-Signature-256", "")):
            print("refused a call with a wrong signature", file=sys.stderr, flush=True)
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
    args = parser.parse_args()
    secret = os.environ.get("DIFFUSION_API_WEBHOOK_SECRET")
    if not secret:
        print("set DIFFUSION_API_WEBHOOK_SECRET (the service's webhook secret)", file=sys.stderr)
        return 2
    receiver = Receiver((args.host, args.port), secret, args.fail_first, args.once)
    print(f"listening on http://{args.host}:{args.port}/", file=sys.stderr, flush=True)
    with receiver:
        while receiver.exit_code is None:
            receiver.handle_request()
    return receiver.exit_code


if __name__ == "__main__":
    sys.exit(main())
