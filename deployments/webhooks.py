"""Webhooks: when a job that carries `callback_url` ends, its final status is POSTed there, signed.

Off unless the operator allows callback hosts (`webhook_allowed_hosts` / DIFFUSION_API_WEBHOOK_ALLOWED_HOSTS) and
gives a signing secret (`webhook_secret` / DIFFUSION_API_WEBHOOK_SECRET). A target is checked when the job is
submitted (a 422 naming `callback_url`) and again before each delivery (a name may resolve elsewhere by then):
a host listed by name (or `host:port`) is allowed wherever it points, so an operator can allow a receiver inside
the cluster on purpose; with `*`, any other host is allowed only if every address it resolves to is public, so a
job cannot make the service call into the cluster's private network or a cloud metadata endpoint.
"""

import asyncio
import functools
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

logger = logging.getLogger("ray.serve")
ALLOWED_HOSTS_ENV = "DIFFUSION_API_WEBHOOK_ALLOWED_HOSTS"
SECRET_ENV = "DIFFUSION_API_WEBHOOK_SECRET"
SIGNATURE_HEADER = "X-Signature-256"
DEFAULT_RETRY_DELAYS_S = (15.0, 45.0)  # 3 attempts over about a minute
ATTEMPT_TIMEOUT_S = 10.0  # one POST, connection to answer
RESOLVE_S = 5.0
MAX_URL_CHARS = 2048
PORT_NUMBER = r"(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4})"


class WebhookTargetError(ValueError):
    """A callback_url this service will not call; the message says why and what is allowed."""


def signature(secret: str, body: bytes) -> str:
    """The X-Signature-256 header's value: `sha256=` and the hex HMAC-SHA256 of the raw body (GitHub's form)."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _port(parts) -> int:
    return parts.port or (443 if parts.scheme == "https" else 80)


@dataclass(frozen=True)
class WebhookPolicy:
    allowed_hosts: tuple[str, ...] = ()  # lower-case host names or host:port; "*": any public host
    secret: str = ""
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
        (a name that resolves again, to a private address, between the check and the call gains nothing)."""
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
        try:
            addresses = [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]
        except (OSError, UnicodeError) as error:
            raise WebhookTargetError(f"host {host} cannot be resolved: {error}") from None
        if not addresses or not all(_is_public(address) for address in addresses):
            # The addresses are not named: the answer would map the cluster's private names for anyone.
            raise WebhookTargetError(f"host {host} resolves to a private or reserved address; only hosts listed "
                                     f"by name in {ALLOWED_HOSTS_ENV} may be")  # fmt: skip
        return addresses[0]

    async def check_async(self, url: str) -> str | None:
        """`check`, its name lookup in threads of its own and limited in time (a slow resolver must not hold
        the threads the service's other work runs in)."""
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.run_in_executor(_resolver_threads(), self.check, url), RESOLVE_S)
        except TimeoutError:
            raise WebhookTargetError(f"its host could not be resolved in {RESOLVE_S:.0f} s") from None

    async def deliver(self, url: str, job_id: str, status: dict) -> dict:
        """POSTs `status` to `url` until a 2xx, retrying network errors, 5xx and 429 after each of
        `retry_delays_s`; any other answer ends it. Each attempt has ATTEMPT_TIMEOUT_S in all and reads no
        answer body. Returns the outcome recorded on the job: attempts, status (`delivered` or `failed`), the
        last HTTP status and error."""
        body = json.dumps(status, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", "X-Job-Id": job_id,
                   SIGNATURE_HEADER: signature(self.secret, body), "User-Agent": "diffusion-api-webhook"}  # fmt: skip
        outcome: dict = {"attempts": 0, "status": "failed", "http_status": None, "error": None}
        async with httpx.AsyncClient(timeout=ATTEMPT_TIMEOUT_S, follow_redirects=False, trust_env=False) as http:
            for delay in (0.0, *self.retry_delays_s):
                await asyncio.sleep(delay)
                outcome["attempts"] += 1
                try:
                    pinned = await self.check_async(url)  # again: a name may point elsewhere by now
                    code = await asyncio.wait_for(self._post(http, url, pinned, body, headers), ATTEMPT_TIMEOUT_S)
                except WebhookTargetError as error:
                    outcome.update(http_status=None, error=f"callback_url refused: {error}")
                    break
                except (httpx.TransportError, TimeoutError) as error:  # connection, time, protocol: try again
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


@functools.cache
def _resolver_threads() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=4, thread_name_prefix="webhook-dns")


def _any_case(text: str) -> str:
    """`text` as a pattern that ignores the case of its letters (JSON Schema patterns take no flags)."""
    return "".join(f"[{char.lower()}{char.upper()}]" if char.isalpha() else char for char in text)


# IPv6 ranges that carry an IPv4 address (NAT64, 6to4, Teredo, IPv4-compatible): they may lead to any IPv4
# address, a private one included, so they are refused outright.
IPV4_CARRYING = tuple(ipaddress.ip_network(network) for network in
                      ("64:ff9b::/96", "64:ff9b:1::/48", "2002::/16", "2001::/32", "::/96"))  # fmt: skip


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        elif any(ip in network for network in IPV4_CARRYING):
            return False
    return ip.is_global and not ip.is_multicast
