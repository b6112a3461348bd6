"""Webhooks: when a job that carries `callback_url` ends, its final status is POSTed there, signed.

Off unless the operator allows callback hosts (`webhook_allowed_hosts` / DIFFUSION_API_WEBHOOK_ALLOWED_HOSTS) and
gives a signing secret (`webhook_secret` / DIFFUSION_API_WEBHOOK_SECRET). A target is checked when the job is
submitted (a 422 naming `callback_url`) and again before each delivery (a name may resolve elsewhere by then):
a host listed by name (or `host:port`) is allowed wherever it points, so an operator can allow a receiver inside
the cluster on purpose; with `*`, any other host is allowed only if every address it resolves to is public, so a
job cannot make the service call into the cluster's private network or a cloud metadata endpoint.

Each attempt is signed with a timestamp, so a captured call cannot be replayed later: `X-Signature-Timestamp` is
the attempt's Unix time in whole seconds (decimal ASCII) and `X-Signature-256` is `sha256=` and the hex
HMAC-SHA256, under the secret, of the bytes `f"{timestamp}.".encode() + body` (the raw body as sent). Receivers
refuse a timestamp too far from their clock (examples/webhook_receiver.py: 5 minutes either way).

Name lookups (`*` only: listed hosts are not looked up to be checked) use the system's getaddrinfo, so they see
what the rest of the system sees (/etc/hosts, resolv.conf's search domains and options, nsswitch), which an async
DNS library (aiodns/c-ares, dnspython) would not all honour. getaddrinfo cannot be cancelled, and a lookup whose
name servers do not answer holds its thread for as long as resolv.conf's timeouts and attempts allow, so a job
must not be able to tie up threads others need: each lookup runs in a thread of its own (no shared pool to
exhaust), concurrent lookups of one name share one thread, an answer is kept LOOKUP_CACHE_S (a check made again
within them connects to the address the first one checked), and past MAX_LOOKUPS lookups under way in all, or
MAX_LOOKUPS_PER_DOMAIN under one domain (a name's last two labels: one slow domain's names, however many, share
it), a new one fails at once rather than waiting behind hung ones. A lookup that fails for the moment (no answer
in RESOLVE_S, a temporary resolver failure, too many under way) is WebhookLookupUnavailable, not a refusal: the
submission is answered 503 and a delivery tries again; a name that does not exist is a WebhookTargetError.
"""

import asyncio
import concurrent.futures
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx

logger = logging.getLogger("ray.serve")
ALLOWED_HOSTS_ENV = "DIFFUSION_API_WEBHOOK_ALLOWED_HOSTS"
SECRET_ENV = "DIFFUSION_API_WEBHOOK_SECRET"
SIGNATURE_HEADER = "X-Signature-256"
TIMESTAMP_HEADER = "X-Signature-Timestamp"
DEFAULT_RETRY_DELAYS_S = (15.0, 45.0)  # 3 attempts over about a minute
ATTEMPT_TIMEOUT_S = 10.0  # one POST, connection to answer
RESOLVE_S = 5.0  # a check waits this long for a name's addresses (the lookup itself may go on)
LOOKUP_CACHE_S = 5.0  # an answer is kept this long: retries and a burst of jobs with one callback host share it
MAX_LOOKUPS = 64  # lookups under way at once, in all: each holds a thread until getaddrinfo returns
MAX_LOOKUPS_PER_DOMAIN = 4  # ... and of names under one domain, so one slow domain cannot take them all
MAX_CACHED = 1024  # answers kept at most (names, with their addresses): the cache's memory stays small
# getaddrinfo's failures that say "not now" rather than "no such name": the resolver did not answer or failed
# for the moment (EAI_AGAIN), or this host ran short of memory or file descriptors.
TRANSIENT_LOOKUP_ERRORS = frozenset({socket.EAI_AGAIN, socket.EAI_MEMORY, socket.EAI_SYSTEM})
MAX_URL_CHARS = 2048
PORT_NUMBER = r"(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4})"


class WebhookTargetError(ValueError):
    """A callback_url this service will not call; the message says why and what is allowed."""


class WebhookLookupUnavailable(Exception):
    """A callback host's name could not be looked up now (no answer in time, a temporary resolver failure, too
    many lookups under way): not a WebhookTargetError, since the same URL may be accepted a moment later. At
    submission it is a 503 with Retry-After; in a delivery it is retried like a network error."""


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The X-Signature-256 header's value: `sha256=` and the hex HMAC-SHA256 of `{timestamp}.` and the raw body,
    so the timestamp (X-Signature-Timestamp) cannot be changed on a captured call to replay it later."""
    return "sha256=" + hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def _port(parts) -> int:
    return parts.port or (443 if parts.scheme == "https" else 80)


@dataclass(frozen=True)
class WebhookPolicy:
    allowed_hosts: tuple[str, ...] = ()  # lower-case host names or host:port; "*": any public host
    secret: str = field(default="", repr=False)  # never in a log line or an error that shows the policy
    retry_delays_s: tuple[float, ...] = DEFAULT_RETRY_DELAYS_S

    @classmethod
    def from_config(cls, allowed_hosts: list[str] | None, secret: str | None,
                    retry_delays_s: list[float] | None = None) -> "WebhookPolicy":  # fmt: skip
        """The app arguments, else the environment. Allowing hosts without a secret is refused (receivers
        could not tell the service's calls from anyone's)."""
        if allowed_hosts is None:
            allowed_hosts = os.environ.get(ALLOWED_HOSTS_ENV, "").split(",")
        hosts = tuple(dict.fromkeys(host.strip().lower() for host in allowed_hosts if host.strip()))
        secret = secret if secret is not None else os.environ.get(SECRET_ENV, "")
        if hosts and not secret:
            raise ValueError(f"webhooks: callback hosts are allowed ({', '.join(hosts)}) but no signing secret is "
                             f"set: give webhook_secret or {SECRET_ENV}")  # fmt: skip
        delays = tuple(retry_delays_s) if retry_delays_s is not None else DEFAULT_RETRY_DELAYS_S
        return cls(allowed_hosts=hosts, secret=secret or "", retry_delays_s=delays)

    @property
    def enabled(self) -> bool:
        return bool(self.allowed_hosts)

    @property
    def listed_pattern(self) -> str | None:
        """A regular expression of the URLs on the listed hosts (`*` aside), exactly those `check` accepts by
        the list: /openapi.json gives it as `callback_url`'s pattern, so clients (and the fuzzer) know what is
        allowed."""
        alternatives = []
        for entry in self.allowed_hosts:
            host, _, port = entry.rpartition(":") if re.fullmatch(r".+:[0-9]{1,5}", entry) else (entry, "", "")
            if not host or entry == "*":
                continue
            host = _any_case(re.escape(host))  # schemes and host names are case-insensitive
            if not port:
                alternatives.append(rf"{_any_case('http')}[sS]?://{host}(?::{PORT_NUMBER})?")
                continue
            alternatives.append(rf"{_any_case('http')}[sS]?://{host}:{int(port)}")
            if int(port) in (80, 443):  # the scheme's own port may go unwritten
                alternatives.append(rf"{_any_case('http' if int(port) == 80 else 'https')}://{host}")
        if not alternatives:
            return None
        # The path: printable ASCII; the end: a lookahead, since `$` also matches before a final newline.
        return rf"^(?:{'|'.join(alternatives)})(?:[/?#][!-~]*)?(?![\s\S])"

    def url_schema(self) -> dict:
        """`callback_url`'s schema as this service configures it."""
        if not self.enabled:
            return {"type": "null", "description": "Webhooks are off on this service (no callback host allowed)"}
        listed = {"type": "string", "maxLength": MAX_URL_CHARS, "pattern": self.listed_pattern}
        if "*" not in self.allowed_hosts:
            return {"anyOf": [listed, {"type": "null"}], "default": None,
                    "description": f"Webhook URL on an allowed host: {', '.join(self.allowed_hosts)}"}  # fmt: skip
        anywhere = {"type": "string", "maxLength": MAX_URL_CHARS, "pattern": f"^{_any_case('http')}[sS]?://",
                    "description": "A host every address of which is public"}  # fmt: skip
        return {"anyOf": [anywhere, {"type": "null"}], "default": None,
                "description": f"Webhook URL on a public host or one of: {', '.join(self.allowed_hosts)}"}  # fmt: skip

    def check(self, url: str) -> str | None:
        """Raises WebhookTargetError unless this service may POST to `url`. Returns None for a listed host, and
        for a host only `*` allows, the public address it resolved to: the delivery connects to that address
        (a name that resolves again, to a private address, between the check and the call gains nothing).
        Raises WebhookLookupUnavailable when the name cannot be looked up now. Blocks for the lookup (up to
        RESOLVE_S): in a coroutine, `check_async`."""
        host = self._host_to_look_up(url)
        return None if host is None else _only_public(host, RESOLVER.resolve_blocking(host))

    async def check_async(self, url: str) -> str | None:
        """`check`, waiting for the name lookup without blocking the event loop."""
        host = self._host_to_look_up(url)
        return None if host is None else _only_public(host, await RESOLVER.resolve(host))

    def _host_to_look_up(self, url: str) -> str | None:
        """`check` up to the name lookup: None for a listed host, else the host `*` allows if it is public."""
        if not self.enabled:
            raise WebhookTargetError(f"webhooks are off on this service (the operator allows no callback host: "
                                     f"{ALLOWED_HOSTS_ENV})")  # fmt: skip
        if len(url) > MAX_URL_CHARS:
            raise WebhookTargetError(f"at most {MAX_URL_CHARS} characters")
        listed = self.listed_pattern
        if listed and re.search(listed, url):
            return None
        try:
            parts = urlsplit(url)
            port = _port(parts)
            httpx.URL(url)
        except (ValueError, httpx.InvalidURL) as error:
            raise WebhookTargetError(f"not a URL: {error}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise WebhookTargetError("an http:// or https:// URL with a host")
        if parts.username or parts.password:
            raise WebhookTargetError("no user or password in the URL (the request is signed instead)")
        host = parts.hostname.lower()
        if "*" not in self.allowed_hosts:
            raise WebhookTargetError(f"host {host}:{port} is not allowed; allowed: {', '.join(self.allowed_hosts)}")
        if not host.isascii() or not re.fullmatch(r"[a-z0-9.:\-\[\]]+", host):
            # Python and httpx encode international names differently (IDNA 2003 / 2008): the checked name
            # must be the one called.
            raise WebhookTargetError(f"host {host!r}: give an international name in its ASCII (xn--) form")
        return host

    async def deliver(self, url: str, job_id: str, status: dict) -> dict:
        """POSTs `status` to `url` until a 2xx, retrying network errors, name lookups that failed for now, 5xx
        and 429 after each of `retry_delays_s`; any other answer ends it. Each attempt is signed with its own
        timestamp, has ATTEMPT_TIMEOUT_S in all and reads no answer body. Returns the outcome recorded on the
        job: attempts, status (`delivered` or `failed`), the last HTTP status and error."""
        body = json.dumps(status, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", "X-Job-Id": job_id, "User-Agent": "diffusion-api-webhook"}
        outcome: dict = {"attempts": 0, "status": "failed", "http_status": None, "error": None}
        async with httpx.AsyncClient(timeout=ATTEMPT_TIMEOUT_S, follow_redirects=False, trust_env=False) as http:
            for delay in (0.0, *self.retry_delays_s):
                await asyncio.sleep(delay)
                outcome["attempts"] += 1
                try:
                    pinned = await self.check_async(url)  # again: a name may point elsewhere by now
                    timestamp = int(time.time())
                    signed = {**headers, TIMESTAMP_HEADER: str(timestamp),
                              SIGNATURE_HEADER: signature(self.secret, timestamp, body)}  # fmt: skip
                    code = await asyncio.wait_for(self._post(http, url, pinned, body, signed), ATTEMPT_TIMEOUT_S)
                except WebhookTargetError as error:
                    outcome.update(http_status=None, error=f"callback_url refused: {error}")
                    break
                except (httpx.TransportError, TimeoutError, WebhookLookupUnavailable) as error:  # try again
                    outcome.update(http_status=None, error=f"{type(error).__name__}: {error}"[:300])
                    continue
                except Exception as error:  # a URL httpx cannot send, say: trying again would not help
                    outcome.update(http_status=None, error=f"{type(error).__name__}: {error}"[:300])
                    break
                outcome["http_status"] = code
                if 200 <= code < 300:
                    outcome.update(status="delivered", error=None)
                    break
                outcome["error"] = f"the receiver answered {code}"
                if code < 500 and code != 429:
                    break  # the receiver refused it: sending it again would not change that
        if outcome["status"] != "delivered":
            logger.warning("job %s: webhook to %s failed after %d attempt(s): %s", job_id, url,
                           outcome["attempts"], outcome["error"])  # fmt: skip
        return outcome

    @staticmethod
    async def _post(http: httpx.AsyncClient, url: str, pinned: str | None, body: bytes, headers: dict) -> int:
        """One POST; its status code. `pinned`: the checked address to connect to instead of resolving the
        name again (the Host header and TLS keep the name)."""
        target = httpx.URL(url)
        extensions = {}
        if pinned is not None:
            headers = {**headers, "Host": target.netloc.decode("ascii")}
            if target.scheme == "https":
                extensions["sni_hostname"] = target.host  # also the name the certificate is checked against
            target = target.copy_with(host=pinned)
        async with http.stream("POST", target, content=body, headers=headers, extensions=extensions) as answer:
            return answer.status_code  # the body is never read: a receiver cannot make it large or slow


def _getaddrinfo(host: str) -> list[str]:
    """The addresses of `host` as the system resolves it. A name that does not exist (or has no address) is a
    WebhookTargetError; a failure that may pass is WebhookLookupUnavailable."""
    try:
        return [info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)]
    except socket.gaierror as error:
        if error.errno in TRANSIENT_LOOKUP_ERRORS:
            raise WebhookLookupUnavailable(f"host {host} could not be looked up for now: {error.strerror}") from None
        raise WebhookTargetError(f"host {host} cannot be resolved: {error}") from None
    except (OSError, UnicodeError) as error:  # UnicodeError: a label too long for IDNA, say
        raise WebhookTargetError(f"host {host} cannot be resolved: {error}") from None


class NameResolver:
    """getaddrinfo lookups that hold nothing another job needs (see the module's docstring): a thread each,
    one per name under way, answers kept `cache_s`, and a bound on those under way (in all and per domain)
    past which a lookup fails at once. `lookup`: the blocking function that resolves a name (getaddrinfo)."""

    def __init__(self, lookup: Callable[[str], list[str]] = _getaddrinfo, max_lookups: int = MAX_LOOKUPS,
                 max_per_domain: int = MAX_LOOKUPS_PER_DOMAIN, cache_s: float = LOOKUP_CACHE_S):  # fmt: skip
        self._lookup = lookup
        self._max_lookups, self._max_per_domain, self._cache_s = max_lookups, max_per_domain, cache_s
        self._lock = threading.Lock()  # the state below: event loops and lookup threads all change it
        self._under_way: dict[str, concurrent.futures.Future] = {}  # name -> its lookup
        self._per_domain: dict[str, int] = {}
        self._cache: dict[str, tuple[float, list[str]]] = {}  # name -> (when it expires, its addresses)

    async def resolve(self, host: str) -> list[str]:
        """`host`'s addresses, waiting RESOLVE_S at most (then WebhookLookupUnavailable; the lookup goes on,
        and a later call for the name waits for that one rather than starting another)."""
        lookup = self._start(host)
        try:
            # The lookup's future is running: a wait given up (a timeout, a cancelled job) does not cancel it.
            return await asyncio.wait_for(asyncio.wrap_future(lookup), RESOLVE_S)
        except TimeoutError:
            raise WebhookLookupUnavailable(f"host {host} could not be looked up in {RESOLVE_S:g} s") from None

    def resolve_blocking(self, host: str) -> list[str]:
        """`resolve` for a caller that may block."""
        try:
            return self._start(host).result(timeout=RESOLVE_S)
        except TimeoutError:
            raise WebhookLookupUnavailable(f"host {host} could not be looked up in {RESOLVE_S:g} s") from None

    def _start(self, host: str) -> concurrent.futures.Future:
        """The lookup of `host`: done already for an address or a cached answer, else the one under way, else a
        new one in a thread of its own, unless too many are under way (WebhookLookupUnavailable)."""
        answer: concurrent.futures.Future = concurrent.futures.Future()
        try:
            answer.set_result([str(ipaddress.ip_address(host))])  # an address: nothing to look up
            return answer
        except ValueError:
            pass
        domain = ".".join(host.rstrip(".").split(".")[-2:])
        with self._lock:
            expires, addresses = self._cache.get(host, (0.0, []))
            if time.monotonic() < expires:
                answer.set_result(list(addresses))
                return answer
            if host in self._under_way:
                return self._under_way[host]
            if len(self._under_way) >= self._max_lookups or self._per_domain.get(domain, 0) >= self._max_per_domain:
                raise WebhookLookupUnavailable(f"host {host} cannot be looked up now: too many name lookups are "
                                               f"under way (slow name servers?)")  # fmt: skip
            answer.set_running_or_notify_cancel()  # from now on, cancel() cannot stop it for the others
            self._under_way[host] = answer
            self._per_domain[domain] = self._per_domain.get(domain, 0) + 1
        # A daemon thread, not a pool's: one that hangs holds only itself, and does not hold up the exit.
        try:
            threading.Thread(target=self._run, args=(host, domain, answer), name="webhook-dns", daemon=True).start()
        except RuntimeError as error:  # no thread to be had: the name must not stay "under way" for ever
            self._finish(host, domain, None)
            answer.set_exception(WebhookLookupUnavailable(f"host {host} cannot be looked up now: {error}"))
        return answer

    def _run(self, host: str, domain: str, answer: concurrent.futures.Future) -> None:
        addresses, failure = None, None
        try:
            addresses = self._lookup(host)
        except BaseException as error:  # the waiters get it (a WebhookTargetError or WebhookLookupUnavailable)
            failure = error
        self._finish(host, domain, addresses)
        if failure is not None:
            answer.set_exception(failure)
        else:
            answer.set_result(addresses)

    def _finish(self, host: str, domain: str, addresses: list[str] | None) -> None:
        """A lookup is no longer under way; its answer, if it has one, is cached."""
        with self._lock:
            del self._under_way[host]
            self._per_domain[domain] -= 1
            if not self._per_domain[domain]:
                del self._per_domain[domain]
            if addresses is not None:
                self._remember(host, addresses)

    def _remember(self, host: str, addresses: list[str]) -> None:
        """Caches an answer (the lock held), dropping expired ones, then the oldest, past MAX_CACHED."""
        now = time.monotonic()
        if len(self._cache) >= MAX_CACHED:
            self._cache = {name: entry for name, entry in self._cache.items() if entry[0] > now}
            while len(self._cache) >= MAX_CACHED:
                del self._cache[next(iter(self._cache))]
        self._cache.pop(host, None)  # re-inserted: the order is the order of expiry
        self._cache[host] = (now + self._cache_s, list(addresses))


RESOLVER = NameResolver()


def _any_case(text: str) -> str:
    """`text` as a pattern that ignores the case of its letters (JSON Schema patterns take no flags)."""
    return "".join(f"[{char.lower()}{char.upper()}]" if char.isalpha() else char for char in text)


def _only_public(host: str, addresses: list[str]) -> str:
    """The address to connect to, if every address of `host` is public; else a WebhookTargetError."""
    if not addresses or not all(_is_public(address) for address in addresses):
        # The addresses are not named: the answer would map the cluster's private names for anyone.
        raise WebhookTargetError(f"host {host} resolves to a private or reserved address; only hosts listed "
                                 f"by name in {ALLOWED_HOSTS_ENV} may be")  # fmt: skip
    return addresses[0]


# IPv6 ranges that carry an IPv4 address (NAT64, 6to4, Teredo, IPv4-compatible, IPv4-mapped, IPv4-translated):
# they may lead to any IPv4 address, a private one included, so they are refused outright. A mapped address is
# not judged by the IPv4 address it carries: the system's dual stack decides where it goes, not this check.
IPV4_CARRYING = tuple(ipaddress.ip_network(network) for network in
                      ("64:ff9b::/96", "64:ff9b:1::/48", "2002::/16", "2001::/32", "::/96", "::ffff:0:0/96",
                       "::ffff:0:0:0/96"))  # fmt: skip


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and any(ip in network for network in IPV4_CARRYING):
        return False
    return ip.is_global and not ip.is_multicast
