"""API keys: who a caller is (a key's name) and what it may do (admins change service-wide state).

Keys come from `DIFFUSION_API_KEYS` (comma-separated) and a keys file (`DIFFUSION_API_KEYS_FILE` or the app
argument `api_keys_file`). The file is either one key per line (`#` comments) or YAML:

    keys:
      - {name: alice, key: "a-long-random-secret"}
      - {name: ops, sha256: "<hex SHA-256 of the key>", admin: true}   # the secret stays out of the file
      - {name: batch, key: "...", max_queued_images: 64, requests_per_minute: 30, priority: 10}

Per-key settings (absent: no limit of that kind): `max_queued_images` (images queued or running at once),
`requests_per_minute` (job submissions, a token bucket), `priority` (the highest `priority` its jobs may ask
for). Beyond a limit the key's submissions answer 429 with Retry-After; other keys' answers do not change.

A key given in plain (the environment, a one-per-line file) is an ordinary caller named after its fingerprint
(the first 16 hex digits of its SHA-256). Keys are kept only as SHA-256 digests and compared in constant time.
Anything configured that yields no key (an empty variable, an empty or unreadable file, a malformed entry) is
an error that stops the deploy: authentication never silently turns off.
"""

import hashlib
import hmac
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from deployments.job_records import NO_LIMITS, KeyLimits
from pipelines.schemas import MAX_PRIORITY

KEYS_ENV = "DIFFUSION_API_KEYS"
KEYS_FILE_ENV = "DIFFUSION_API_KEYS_FILE"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$"  # shown in metrics and logs: no spaces, no quotes


class KeysConfigError(ValueError):
    """The configured keys cannot be used; the message names the source and the entry."""


@dataclass(frozen=True)
class ApiKey:
    """One caller: its name (the owner of its jobs), whether it is an admin, and its key's SHA-256 (never the
    key itself; not shown by repr)."""

    name: str
    admin: bool = False
    digest: bytes = field(default=b"", repr=False)
    limits: KeyLimits = NO_LIMITS


@dataclass(frozen=True)
class Caller:
    """Who sent a request, as routes see it: `owner` of the jobs it creates ("" with keys off, when every
    caller is the same one), whether it may change service-wide state, and whether keys are on at all."""

    owner: str = ""
    admin: bool = False
    keys_on: bool = True
    limits: KeyLimits = NO_LIMITS  # the key's own (keys file), checked when it submits a job

    def may_see(self, job_owner: str) -> bool:
        """A job is visible to its owner and to admins; with keys off, to everyone."""
        if not self.keys_on or self.admin:
            return True
        return bool(self.owner) and hmac.compare_digest(self.owner.encode(), job_owner.encode())


ANONYMOUS = Caller(owner="", admin=True, keys_on=False)  # keys off: the one caller, who may do everything
NOBODY = Caller(owner="", admin=False, keys_on=True)  # no caller was established: may see and change nothing


class KeyEntry(BaseModel):
    """One entry of a YAML keys file."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(..., pattern=NAME_PATTERN)
    key: str | None = Field(None, min_length=1)
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    admin: bool = False
    max_queued_images: int | None = Field(None, ge=1)
    requests_per_minute: int | None = Field(None, ge=1)
    priority: int | None = Field(None, ge=-MAX_PRIORITY, le=MAX_PRIORITY)

    @model_validator(mode="after")
    def _one_secret(self):
        if (self.key is None) == (self.sha256 is None):
            raise ValueError("give exactly one of 'key' and 'sha256'")
        return self


def fingerprint(digest: bytes) -> str:
    """A plain key's name: the first 16 hex digits of its SHA-256."""
    return digest.hex()[:16]


def _plain(key: str) -> ApiKey:
    digest = hashlib.sha256(key.encode()).digest()
    return ApiKey(name=fingerprint(digest), digest=digest)


def _from_env(value: str) -> list[ApiKey]:
    keys = [key.strip() for key in value.split(",") if key.strip()]
    if not keys:
        raise KeysConfigError(f"{KEYS_ENV} is set but holds no key; unset it to run without API keys")
    return [_plain(key) for key in keys]


def _from_file(location: str) -> list[ApiKey]:
    path = Path(location).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise KeysConfigError(f"API keys file {path}: cannot be read: {error}") from None
    text = text.removeprefix("\ufeff")  # an editor's byte-order mark is not part of the first key
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError:
        document = None  # not YAML: a file of plain keys (a key may hold characters YAML reads otherwise)
    if isinstance(document, dict):
        return _yaml_keys(path, document)
    if isinstance(document, list):  # the entries without `keys:` above them: never read as plain keys
        raise KeysConfigError(f"API keys file {path}: a YAML keys file is a mapping with 'keys:' and its list "
                              f"under it (keys: [{{name, key | sha256, admin}}])")  # fmt: skip
    lines = [line.strip() for line in text.splitlines()]
    keys = [line for line in lines if line and not line.startswith("#")]
    if not keys:
        raise KeysConfigError(f"API keys file {path} holds no key (it is empty or only comments)")
    for number, line in enumerate(lines, start=1):
        if line in keys and (": " in line or line.startswith(("- ", "{"))):
            raise KeysConfigError(f"API keys file {path}: line {number} looks like YAML, not a plain key; a YAML "
                                  f"keys file starts with 'keys:'")  # fmt: skip
    return [_plain(key) for key in keys]


def _yaml_keys(path: Path, document: dict) -> list[ApiKey]:
    unknown = sorted(str(name) for name in document if name != "keys")
    if unknown:
        raise KeysConfigError(f"API keys file {path}: unknown top-level field(s) {', '.join(unknown)}; "
                              f"expected only 'keys'")  # fmt: skip
    entries = document.get("keys")
    if not isinstance(entries, list) or not entries:
        raise KeysConfigError(f"API keys file {path}: 'keys' must be a non-empty list of "
                              f"{{name, key | sha256, admin}}")  # fmt: skip
    keys = []
    for index, raw in enumerate(entries):
        label = f"entry {index + 1}" + (f" ({raw['name']!r})" if isinstance(raw, dict) and "name" in raw else "")
        if not isinstance(raw, dict):
            raise KeysConfigError(f"API keys file {path}: {label} must be a mapping {{name, key | sha256, admin}}")
        try:
            entry = KeyEntry.model_validate(raw)
        except ValidationError as error:
            reasons = "; ".join(f"{'.'.join(map(str, item['loc'])) or 'entry'}: {item['msg']}"
                                for item in error.errors())  # fmt: skip
            raise KeysConfigError(f"API keys file {path}: {label}: {reasons}") from None
        digest = bytes.fromhex(entry.sha256) if entry.sha256 else hashlib.sha256(entry.key.encode()).digest()
        limits = KeyLimits(entry.max_queued_images, entry.requests_per_minute, entry.priority)
        keys.append(ApiKey(name=entry.name, admin=entry.admin, digest=digest, limits=limits))
    return keys


def load_keys(api_keys_file: str | None = None) -> list[ApiKey]:
    """Every configured key: the environment's, then the file's (app argument first, else the environment).
    None configured: an empty list (keys off). Names and keys must be unique."""
    keys: list[ApiKey] = []
    if (value := os.environ.get(KEYS_ENV)) is not None:
        keys += _from_env(value)
    location = api_keys_file or os.environ.get(KEYS_FILE_ENV)
    if location is not None:
        if not str(location).strip():
            raise KeysConfigError(f"{KEYS_FILE_ENV} / api_keys_file is set but empty; unset it to run without keys")
        keys += _from_file(location)
    names: dict[str, ApiKey] = {}
    digests: set[bytes] = set()
    for key in keys:
        if key.name in names:
            raise KeysConfigError(f"API keys: the name {key.name!r} is given twice (names own jobs: one per key)")
        if key.digest in digests:
            raise KeysConfigError(f"API keys: the key named {key.name!r} is given twice")
        names[key.name] = key
        digests.add(key.digest)
    return keys


def match_key(keys: list[ApiKey], offered: bytes) -> ApiKey | None:
    """The key `offered` is, if any: its SHA-256 compared with every key's (no early exit), each in constant
    time."""
    digest = hashlib.sha256(offered).digest()
    found = None
    for key in keys:
        if hmac.compare_digest(digest, key.digest):
            found = key
    return found
