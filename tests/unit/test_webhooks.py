"""Webhook targets (allowed hosts, no private addresses unless listed), name lookups that fail for now or hang,
signing and delivery with retries, against a real HTTP server on this machine and the example receiver."""

import asyncio
import hashlib
import hmac
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from types import SimpleNamespace

import httpx
import pytest

import deployments.webhooks
from deployments.webhooks import (
    MAX_LOOKUPS_PER_DOMAIN,
    SECRET_ENV,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    NameResolver,
    WebhookLookupUnavailable,
    WebhookPolicy,
    WebhookTargetError,
    signature,
)
from pipelines.settings import PROJECT_ROOT

SECRET = "test-secret"


def policy(*hosts: str, delays=(0.05, 0.05)) -> WebhookPolicy:
    return WebhookPolicy.from_config(list(hosts), SECRET, list(delays))


@pytest.fixture(autouse=True)
def fresh_resolver(monkeypatch):
    """Each test its own lookups under way and cached answers."""
    monkeypatch.setattr(deployments.webhooks, "RESOLVER", NameResolver())


@pytest.fixture
def slow_dns(monkeypatch):
    """getaddrinfo that hangs, for names with "slow" in them, until `release` is set (or the test ends), as with
    name servers that do not answer, then gives a public address; other names are looked up as usual. `calls`:
    the names it was asked. Only the slowness is made up: the lookups run as they would."""
    release, calls, real = threading.Event(), [], socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        calls.append(host)
        if "slow" in str(host):
            release.wait(30)
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 0))]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(deployments.webhooks, "RESOLVE_S", 0.3)
    yield SimpleNamespace(release=release, calls=calls)
    release.set()


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


def test_the_secret_is_never_shown(monkeypatch):
    configured = policy("hooks.example.com")
    for shown in (repr(configured), str(configured), f"{configured}", f"{configured!r}", f"{[configured]}"):
        assert SECRET not in shown and "hooks.example.com" in shown
    assert configured == policy("hooks.example.com") != WebhookPolicy.from_config(["hooks.example.com"], "other")


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
     "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/",
     # IPv4-mapped and IPv4-translated: refused whatever IPv4 address they carry, a public one included
     "http://[::ffff:93.184.216.34]/", "http://[::ffff:5db8:d822]/", "http://[::ffff:0:5db8:d822]/",
     "http://[::ffff:0:a9fe:a9fe]/"],
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


def test_a_name_that_does_not_exist_is_refused():
    """.invalid names never exist (RFC 6761): a real lookup, refused (a 422), not "try again later"."""
    try:
        policy("*").check("http://hooks.invalid/")
    except WebhookLookupUnavailable as error:
        pytest.skip(f"this machine's resolver does not answer: {error}")
    except WebhookTargetError as error:
        assert "hooks.invalid cannot be resolved" in str(error)
    else:
        raise AssertionError("hooks.invalid was accepted")


@pytest.mark.parametrize(
    ("code", "raised", "message"),
    [(socket.EAI_AGAIN, WebhookLookupUnavailable, "could not be looked up for now: Temporary failure"),
     (socket.EAI_NONAME, WebhookTargetError, "cannot be resolved"),
     (socket.EAI_FAIL, WebhookTargetError, "cannot be resolved")],
)  # fmt: skip
def test_a_temporary_resolver_failure_is_no_refusal(monkeypatch, code, raised, message):
    """EAI_AGAIN (no answer from the name servers, a SERVFAIL) may pass: WebhookLookupUnavailable (a 503, a
    delivery retried); a name that does not exist stays a WebhookTargetError (a 422)."""
    texts = {socket.EAI_AGAIN: "Temporary failure in name resolution", socket.EAI_NONAME: "Name or service not known",
             socket.EAI_FAIL: "Non-recoverable failure in name resolution"}  # fmt: skip

    def getaddrinfo(*args, **kwargs):  # the resolver's answer as glibc gives it
        raise socket.gaierror(code, texts[code])

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    with pytest.raises(raised, match=message):
        policy("*").check("http://hooks.example.com/")
    with pytest.raises(raised, match=message):
        asyncio.run(policy("*").check_async("http://hooks.example.com/"))
    assert not issubclass(WebhookLookupUnavailable, ValueError)  # so no `except WebhookTargetError` takes it


def test_a_lookup_that_times_out_is_no_refusal(slow_dns):
    with pytest.raises(WebhookLookupUnavailable, match="could not be looked up in 0.3 s"):
        asyncio.run(policy("*").check_async("http://hooks.slow.test/"))
    with pytest.raises(WebhookLookupUnavailable, match="could not be looked up in 0.3 s"):
        policy("*").check("http://hooks.slow.test/")


def test_a_lookup_that_fails_for_now_is_retried(slow_dns):
    """A delivery whose lookup times out tries again after each delay, as after a network error."""
    outcome = deliver(policy("*"), "http://hooks.slow.test/")
    assert outcome["attempts"] == 3 and outcome["status"] == "failed" and outcome["http_status"] is None
    assert outcome["error"].startswith("WebhookLookupUnavailable: host hooks.slow.test could not be looked up")


def test_slow_lookups_hold_up_no_other_check(slow_dns):
    """Lookups that hang, under one domain (one client's many callback URLs, say), take a few threads of their
    own, and past that fail at once; a check of any other name is answered (`localhost`: a real lookup, private)
    rather than waiting behind them."""

    async def run() -> tuple[list, BaseException | None]:
        hanging = [asyncio.create_task(policy("*").check_async(f"http://n{i}.slow.test/")) for i in range(12)]
        await asyncio.sleep(0.05)  # all started, or refused
        refused_at_once = [task.exception() for task in hanging if task.done()]
        try:
            await policy("*").check_async("http://localhost:8080/")
            other = None
        except WebhookTargetError as error:
            other = error
        await asyncio.gather(*hanging, return_exceptions=True)
        return refused_at_once, other

    refused_at_once, other = asyncio.run(run())
    assert "localhost resolves to a private or reserved address" in str(other)
    assert len(refused_at_once) == 12 - MAX_LOOKUPS_PER_DOMAIN
    assert all(isinstance(error, WebhookLookupUnavailable) and "too many" in str(error) for error in refused_at_once)
    assert len([name for name in slow_dns.calls if "slow" in name]) == MAX_LOOKUPS_PER_DOMAIN


def test_lookups_under_way_are_bounded_in_all(slow_dns, monkeypatch):
    monkeypatch.setattr(deployments.webhooks, "RESOLVER", NameResolver(max_lookups=3))
    for i in range(3):  # three domains, one hung lookup each
        with pytest.raises(WebhookLookupUnavailable, match="in 0.3 s"):
            policy("*").check(f"http://hooks.slow{i}.test/")
    started = time.monotonic()
    with pytest.raises(WebhookLookupUnavailable, match="too many name lookups are under way"):
        policy("*").check("http://hooks.slow3.test/")
    assert time.monotonic() - started < 0.2  # at once, not after RESOLVE_S
    assert policy("*").check("http://[2606:4700:4700::1111]/") == "2606:4700:4700::1111"  # no lookup needed
    slow_dns.release.set()
    deadline = time.monotonic() + 5  # the hung lookups end: room again
    while time.monotonic() < deadline and not _answers(policy("*"), "http://hooks.slow3.test/"):
        time.sleep(0.02)
    assert policy("*").check("http://hooks.slow3.test/") == "93.184.216.34"


def _answers(target: WebhookPolicy, url: str) -> bool:
    try:
        return target.check(url) is not None
    except WebhookLookupUnavailable:
        return False


def test_concurrent_lookups_of_one_name_share_one(slow_dns):
    """Checks of one name while its lookup hangs wait for that lookup, even after an earlier wait gave up,
    rather than each taking a thread of its own."""

    async def run() -> list:
        with pytest.raises(WebhookLookupUnavailable):
            await policy("*").check_async("http://one.slow.test/a")
        waiting = [asyncio.create_task(policy("*").check_async("http://one.slow.test/b")) for _ in range(6)]
        await asyncio.sleep(0.05)
        slow_dns.release.set()
        return await asyncio.gather(*waiting)

    assert asyncio.run(run()) == ["93.184.216.34"] * 6
    assert slow_dns.calls.count("one.slow.test") == 1


def test_a_lookup_without_a_thread_fails_for_now_and_is_not_left_under_way(monkeypatch):
    """With no thread to be had (the process at its limit), the lookup is unavailable, and the name can be
    looked up again once threads are back."""
    start = threading.Thread.start

    def no_thread(thread):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", no_thread)
    with pytest.raises(WebhookLookupUnavailable, match="can't start new thread"):
        policy("*").check("http://localhost/")
    monkeypatch.setattr(threading.Thread, "start", start)
    with pytest.raises(WebhookTargetError, match="private or reserved"):
        policy("*").check("http://localhost/")


def test_an_answer_is_kept_a_few_seconds(monkeypatch):
    """Retries and jobs with one callback host within `cache_s` reuse the answer (and so the pinned address)."""
    calls = []

    def lookup(host: str) -> list[str]:
        calls.append(host)
        return ["93.184.216.34", "93.184.216.35"] if len(calls) == 1 else ["93.184.216.36"]

    monkeypatch.setattr(deployments.webhooks, "RESOLVER", NameResolver(lookup, cache_s=0.3))
    assert policy("*").check("http://hooks.example.com/") == "93.184.216.34"
    assert asyncio.run(policy("*").check_async("http://hooks.example.com:8443/x")) == "93.184.216.34"
    assert calls == ["hooks.example.com"]
    time.sleep(0.35)
    assert policy("*").check("http://hooks.example.com/") == "93.184.216.36"
    assert calls == ["hooks.example.com"] * 2


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
    """The signature covers the attempt's timestamp, then a dot, then the raw body."""
    port = receiver.server_address[1]
    before = int(time.time())
    outcome = deliver(policy(f"127.0.0.1:{port}"), f"http://127.0.0.1:{port}/hook", {"state": "done", "n": 1})
    assert outcome == {"attempts": 1, "status": "delivered", "http_status": 200, "error": None}
    ((headers, body),) = receiver.calls
    assert json.loads(body) == {"state": "done", "n": 1}
    timestamp = headers[TIMESTAMP_HEADER]
    assert timestamp.isascii() and timestamp.isdigit() and before <= int(timestamp) <= time.time()
    expected = "sha256=" + hmac.new(SECRET.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    assert headers[SIGNATURE_HEADER] == expected == signature(SECRET, int(timestamp), body)
    assert signature(SECRET, int(timestamp) - 1, body) != expected  # the timestamp cannot be changed
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


def receiver_module():
    spec = importlib.util.spec_from_file_location("webhook_receiver", PROJECT_ROOT / "examples" / "webhook_receiver.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_example_receiver_refuses_old_future_and_unsigned_timestamps():
    refusal = receiver_module().refusal
    body, now = b'{"state":"done"}', 1_800_000_000.0

    def call(timestamp, signed_timestamp=None, secret=SECRET) -> str | None:
        signed = signature(secret, signed_timestamp if signed_timestamp is not None else int(timestamp), body)
        return refusal(SECRET, body, str(timestamp), signed, now)

    assert call(int(now)) is None
    assert call(int(now) - 300) is None and call(int(now) + 300) is None  # 5 minutes either way
    assert call(int(now) + 301) == "a timestamp 301 s in the future (more than 300 s)"
    assert call(int(now) - 301) == "a timestamp 301 s in the past (more than 300 s)"
    assert call(int(now), signed_timestamp=int(now) - 3600) == "a wrong signature"  # moved to replay it
    assert call(int(now), secret="wrong") == "a wrong signature"
    old_form = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()  # the body alone
    assert refusal(SECRET, body, str(int(now)), old_form, now) == "a wrong signature"
    for missing in (None, "", "１８００００００００", "1800000000.5", " 1800000000"):
        assert "missing or malformed" in refusal(SECRET, body, missing, signature(SECRET, int(now), body), now)
    assert refusal(SECRET, body, str(int(now)), None, now) == "a wrong signature"


def test_the_example_receiver_verifies_the_signature():
    """examples/webhook_receiver.py accepts the service's signed call and refuses a forged one, one replayed
    later (here 200 s, past --tolerance-s 120) and one without a timestamp."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, SECRET_ENV: SECRET}
    script = PROJECT_ROOT / "examples" / "webhook_receiver.py"
    process = subprocess.Popen([sys.executable, str(script), "--port", str(port), "--once", "--tolerance-s", "120"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
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
        body, then = b'{"state":"done"}', int(time.time()) - 200
        replayed = {TIMESTAMP_HEADER: str(then), SIGNATURE_HEADER: signature(SECRET, then, body)}
        assert httpx.post(f"http://127.0.0.1:{port}/", content=body, headers=replayed).status_code == 401
        unstamped = {SIGNATURE_HEADER: "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()}
        assert httpx.post(f"http://127.0.0.1:{port}/", content=body, headers=unstamped).status_code == 401
        outcome = deliver(policy(f"127.0.0.1:{port}"), f"http://127.0.0.1:{port}/", {"state": "error", "error": "x"})
        assert outcome["status"] == "delivered"
        stdout, stderr = process.communicate(timeout=10)
    finally:
        process.kill()
    assert process.returncode == 1  # the job it was told about failed
    assert json.loads(stdout) == {"verified": True, "job_id": "a" * 32, "state": "error", "image_url": None,
                                  "error": "x"}  # fmt: skip
    assert "wrong signature" in stderr
    assert re.search(r"refused a call with a timestamp 20[0-9] s in the past \(more than 120 s\)", stderr)
    assert "missing or malformed X-Signature-Timestamp" in stderr


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
