"""Webhook targets (allowed hosts, no private addresses unless listed), signing and delivery with retries, against
a real HTTP server on this machine and the example receiver."""

import asyncio
import hashlib
import hmac
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from deployments.webhooks import SECRET_ENV, SIGNATURE_HEADER, WebhookPolicy, WebhookTargetError, signature
from pipelines.settings import PROJECT_ROOT

SECRET = "test-secret"


def policy(*hosts: str, delays=(0.05, 0.05)) -> WebhookPolicy:
    return WebhookPolicy.from_config(list(hosts), SECRET, list(delays))


def test_off_unless_hosts_are_allowed(monkeypatch):
    monkeypatch.delenv("DIFFUSION_API_WEBHOOK_ALLOWED_HOSTS", raising=False)
    off = WebhookPolicy.from_config(None, None)
    assert not off.enabled
    with pytest.raises(WebhookTargetError, match="webhooks are off"):
        off.check("https://example.com/hook")


def test_hosts_without_a_secret_are_refused(monkeypatch):
    monkeypatch.delenv(SECRET_ENV, raising=False)
    with pytest.raises(ValueError, match="no signing secret"):
        WebhookPolicy.from_config(["hooks.example.com"], None)


def test_environment_configures_it(monkeypatch):
    monkeypatch.setenv("DIFFUSION_API_WEBHOOK_ALLOWED_HOSTS", " Hooks.Example.com , 127.0.0.1:9000,")
    monkeypatch.setenv(SECRET_ENV, "from-env")
    configured = WebhookPolicy.from_config(None, None)
    assert configured.allowed_hosts == ("hooks.example.com", "127.0.0.1:9000")
    assert configured.secret == "from-env"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://hooks.example.com/x", "http:// or https://"),
        ("hooks.example.com/x", "http:// or https://"),
        ("https://user:pw@hooks.example.com/x", "no user or password"),
        ("https://other.example.com/x", "host other.example.com:443 is not allowed"),
        ("http://127.0.0.1:9001/", "host 127.0.0.1:9001 is not allowed"),
        ("http://hooks.example.com:99999/", "not a URL"),
    ],
)
def test_targets_outside_the_list_are_refused(url, message):
    with pytest.raises(WebhookTargetError, match=message):
        policy("hooks.example.com", "127.0.0.1:9000").check(url)


def test_listed_hosts_are_allowed_even_when_private():
    allowed = policy("hooks.example.com", "127.0.0.1:9000", "localhost")
    allowed.check("https://HOOKS.example.com/path?q=1")
    allowed.check("http://127.0.0.1:9000/hook")
    allowed.check("http://localhost:1234/")


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1/", "http://10.1.2.3/", "http://169.254.169.254/latest/meta-data/", "http://[::1]:8080/",
     "http://[::ffff:192.168.0.1]/", "http://localhost:8000/", "http://0.0.0.0/",
     # IPv6 forms that carry an IPv4 address (here the metadata address): NAT64, 6to4, IPv4-compatible, Teredo
     "http://[64:ff9b::a9fe:a9fe]/", "http://[2002:a9fe:a9fe::]/", "http://[::a9fe:a9fe]/",
     "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/"],
)  # fmt: skip
def test_wildcard_refuses_private_addresses_without_naming_them(url):
    with pytest.raises(WebhookTargetError, match="resolves to a private or reserved address") as refused:
        policy("*").check(url)
    assert "169.254" not in str(refused.value) or "169.254" in url.split("/")[2]


def test_wildcard_allows_public_addresses_and_pins_them():
    assert policy("*").check("https://93.184.216.34/hook") == "93.184.216.34"
    assert policy("*").check("http://[2606:4700:4700::1111]/") == "2606:4700:4700::1111"
    assert policy("*", "127.0.0.1:9000").check("http://127.0.0.1:9000/") is None  # listed: not pinned


def test_international_names_must_come_in_their_ascii_form():
    with pytest.raises(WebhookTargetError, match="ASCII"):
        policy("*").check("http://faß.example/")


class Recorder(BaseHTTPRequestHandler):
    """Answers the status codes queued in `server.answers` (then 200), recording each call."""

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.calls.append((dict(self.headers), body))
        code = self.server.answers.pop(0) if self.server.answers else 200
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def receiver():
    server = HTTPServer(("127.0.0.1", 0), Recorder)
    server.calls, server.answers = [], []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def deliver(target: WebhookPolicy, url: str, status: dict | None = None) -> dict:
    return asyncio.run(target.deliver(url, "a" * 32, status or {"job_id": "a" * 32, "state": "done"}))


def test_delivery_is_signed(receiver):
    port = receiver.server_address[1]
    outcome = deliver(policy(f"127.0.0.1:{port}"), f"http://127.0.0.1:{port}/hook", {"state": "done", "n": 1})
    assert outcome == {"attempts": 1, "status": "delivered", "http_status": 200, "error": None}
    ((headers, body),) = receiver.calls
    assert json.loads(body) == {"state": "done", "n": 1}
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert headers[SIGNATURE_HEADER] == expected == signature(SECRET, body)
    assert headers["X-Job-Id"] == "a" * 32
    assert headers["Content-Type"] == "application/json"


def test_server_errors_are_retried_then_delivered(receiver):
    port = receiver.server_address[1]
    receiver.answers = [503, 429]
    outcome = deliver(policy(f"127.0.0.1:{port}"), f"http://127.0.0.1:{port}/")
    assert outcome == {"attempts": 3, "status": "delivered", "http_status": 200, "error": None}
    assert len({body for _, body in receiver.calls}) == 1  # the same body each time


def test_retries_end_in_failure(receiver):
    port = receiver.server_address[1]
    receiver.answers = [500, 502, 500, 500]
    outcome = deliver(policy(f"127.0.0.1:{port}"), f"http://127.0.0.1:{port}/")
    assert outcome == {"attempts": 3, "status": "failed", "http_status": 500,
                       "error": "the receiver answered 500"}  # fmt: skip


def test_a_refusal_is_not_retried(receiver):
    port = receiver.server_address[1]
    receiver.answers = [404]
    outcome = deliver(policy(f"127.0.0.1:{port}"), f"http://127.0.0.1:{port}/")
    assert outcome["attempts"] == 1 and outcome["status"] == "failed" and outcome["http_status"] == 404


def test_a_pinned_delivery_connects_to_the_checked_address_and_keeps_the_name(receiver):
    """With `*`, the delivery goes to the address the check resolved, not to a second lookup of the name."""
    import httpx

    port = receiver.server_address[1]

    async def post() -> int:
        async with httpx.AsyncClient() as http:
            return await WebhookPolicy._post(http, f"http://hooks.invalid:{port}/x", "127.0.0.1", b"{}", {})

    assert asyncio.run(post()) == 200  # hooks.invalid resolves nowhere: the pinned address was used
    ((headers, _),) = receiver.calls
    assert headers["Host"] == f"hooks.invalid:{port}"


def test_a_receiver_that_never_answers_times_the_attempt_out(monkeypatch):
    import deployments.webhooks

    monkeypatch.setattr(deployments.webhooks, "ATTEMPT_TIMEOUT_S", 0.5)
    with socket.socket() as silent:  # accepts connections (the backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        started = time.monotonic()
        outcome = deliver(policy(f"127.0.0.1:{port}"), f"http://127.0.0.1:{port}/")
    assert outcome["attempts"] == 3 and outcome["status"] == "failed" and time.monotonic() - started < 10
    assert "Timeout" in outcome["error"]


def test_network_errors_are_retried():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    outcome = deliver(policy(f"127.0.0.1:{port}"), f"http://127.0.0.1:{port}/")
    assert outcome["attempts"] == 3 and outcome["status"] == "failed" and outcome["http_status"] is None
    assert "ConnectError" in outcome["error"]


def test_the_example_receiver_verifies_the_signature():
    """examples/webhook_receiver.py accepts the service's signed call and refuses a forged one."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, SECRET_ENV: SECRET}
    script = PROJECT_ROOT / "examples" / "webhook_receiver.py"
    process = subprocess.Popen([sys.executable, str(script), "--port", str(port), "--once"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        forged = WebhookPolicy.from_config([f"127.0.0.1:{port}"], "wrong-secret", [])
        assert deliver(forged, f"http://127.0.0.1:{port}/")["http_status"] == 401
        outcome = deliver(policy(f"127.0.0.1:{port}"), f"http://127.0.0.1:{port}/", {"state": "error", "error": "x"})
        assert outcome["status"] == "delivered"
        stdout, stderr = process.communicate(timeout=10)
    finally:
        process.kill()
    assert process.returncode == 1  # the job it was told about failed
    assert json.loads(stdout) == {"verified": True, "job_id": "a" * 32, "state": "error", "image_url": None,
                                  "error": "x"}  # fmt: skip
    assert "wrong signature" in stderr


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:9000/hook", "https://127.0.0.1:9000", "http://127.0.0.1:90000/", "http://127.0.0.1/",
     "https://hooks.example.com:8443/a?b#c", "http://hooks.example.com:99999/", "https://tls.example/x",
     "http://tls.example/x", "http://127.0.0.1:9000@evil.example/", "http://127.0.0.1:9000/a b",
     "https://HOOKS.example.com/", "http://127.0.0.1:9000\\@evil.example/", "ftp://127.0.0.1:9000/",
     "HTTPS://Tls.Example/", "http://127.0.0.1:9000/\n", "http://127.0.0.1:9000/a\x7f", "http://127.0.0.1:9000/\x1c",
     "http://127.0.0.1:9000/%20ok?a=\"b\"&c={d}|e^f`g"],
)  # fmt: skip
def test_the_schema_pattern_accepts_exactly_what_the_service_accepts(url):
    """/openapi.json gives callback_url this pattern: a URL it matches is accepted, any other refused."""
    import re

    configured = policy("127.0.0.1:9000", "hooks.example.com", "tls.example:443")
    schema = configured.url_schema()["anyOf"][0]
    try:
        configured.check(url)
        accepted = True
    except WebhookTargetError:
        accepted = False
    assert accepted == bool(re.search(schema["pattern"], url)), url


def test_the_schema_says_when_webhooks_are_off(monkeypatch):
    monkeypatch.delenv("DIFFUSION_API_WEBHOOK_ALLOWED_HOSTS", raising=False)
    assert WebhookPolicy.from_config(None, None).url_schema()["type"] == "null"
    assert policy("*").url_schema()["anyOf"][0]["pattern"] == "^[hH][tT][tT][pP][sS]?://"
