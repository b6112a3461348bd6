"""API keys with names and an admin flag (deployments/keys.py), what a caller may see and do, and bodies
bounded however they are sent. Over HTTP with keys on: tests/serve/test_tenants_http.py."""

import hashlib

import pytest
from fastapi import Depends, FastAPI, Request
from fastapi.testclient import TestClient

from deployments.access import AccessMiddleware, AccessPolicy, caller, error_response, require_admin
from deployments.keys import KEYS_ENV, KEYS_FILE_ENV, KeysConfigError, fingerprint, load_keys
from pipelines.errors import DiffusionAPIError


@pytest.fixture(autouse=True)
def no_keys_in_environment(monkeypatch):
    monkeypatch.delenv(KEYS_ENV, raising=False)
    monkeypatch.delenv(KEYS_FILE_ENV, raising=False)


def keys_file(tmp_path, text: str) -> str:
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    return str(path)


def test_a_yaml_keys_file_names_keys_keeps_only_digests_and_marks_admins(tmp_path):
    ops_digest = hashlib.sha256(b"ops-secret").hexdigest()
    keys = load_keys(
        keys_file(
            tmp_path,
            f"""
keys:
  - {{name: alice, key: alice-secret}}
  - name: ops
    sha256: "{ops_digest}"
    admin: true
""",
        )
    )
    assert [(key.name, key.admin) for key in keys] == [("alice", False), ("ops", True)]
    assert keys[0].digest == hashlib.sha256(b"alice-secret").digest()
    assert "alice-secret" not in repr(keys) and ops_digest not in repr(keys)
    policy = AccessPolicy(keys=keys)
    assert policy.caller_of("Bearer alice-secret").owner == "alice"
    ops = policy.caller_of("Bearer ops-secret")
    assert ops.owner == "ops" and ops.admin
    assert policy.caller_of("Bearer " + ops_digest) is None  # the digest is not a key
    assert policy.caller_of("Bearer alice-secretX") is None and policy.caller_of(None) is None


def test_plain_keys_from_the_environment_and_a_file_are_ordinary_callers(tmp_path, monkeypatch):
    monkeypatch.setenv(KEYS_ENV, "env-key, second-key")
    plain = tmp_path / "keys"
    plain.write_text("# operators\nfile-key\n\n")
    keys = load_keys(str(plain))
    assert [key.name for key in keys] == [fingerprint(hashlib.sha256(k).digest())
                                          for k in (b"env-key", b"second-key", b"file-key")]  # fmt: skip
    assert not any(key.admin for key in keys)
    bom = tmp_path / "bom-keys"
    bom.write_text("\ufefffirst-key\n", encoding="utf-8")
    monkeypatch.delenv(KEYS_ENV)
    assert load_keys(str(bom))[0].digest == hashlib.sha256(b"first-key").digest()  # an editor's BOM is not the key
    monkeypatch.setenv(KEYS_ENV, "env-key, second-key")
    alice, bob = (AccessPolicy(keys=keys).caller_of(f"Bearer {key}") for key in ("env-key", "file-key"))
    assert alice.owner != bob.owner and not alice.may_see(bob.owner) and alice.may_see(alice.owner)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("keys:\n  - {name: alice}\n", "entry 1 ('alice')"),
        ("keys:\n  - {name: alice, key: a, sha256: '" + "0" * 64 + "'}\n", "exactly one of 'key' and 'sha256'"),
        ("keys:\n  - {name: alice, key: a}\n  - {name: bob, sha256: abc}\n", "entry 2 ('bob')"),
        ("keys:\n  - {name: alice, key: a, admin: 'yes'}\n", "admin"),
        ("keys:\n  - {name: 'has space', key: a}\n", "name"),
        ("keys:\n  - {name: alice, key: a, colour: red}\n", "colour"),
        ("keys:\n  - just-a-string\n", "entry 1 must be a mapping"),
        ("keys: []\n", "non-empty list"),
        ("keys:\n  - {name: alice, key: a}\nadmins: [alice]\n", "admins"),
        ("keys:\n  - {name: alice, key: a}\n  - {name: alice, key: b}\n", "'alice' is given twice"),
        ("keys:\n  - {name: alice, key: a}\n  - {name: bob, key: a}\n", "named 'bob' is given twice"),
        ("- name: alice\n  key: a\n- name: ops\n  key: o\n  admin: true\n", "a mapping with 'keys:'"),
        ("alice-key\nadmin: true\n", "line 2 looks like YAML"),
        ("# nothing but a comment\n\n", "holds no key"),
        ("", "holds no key"),
    ],
)
def test_a_keys_file_that_cannot_be_used_stops_the_deploy_naming_the_entry(tmp_path, text, named):
    with pytest.raises(KeysConfigError, match=named.replace("(", r"\(").replace(")", r"\)")):
        load_keys(keys_file(tmp_path, text))


def test_configured_but_empty_keys_never_mean_keys_off(tmp_path, monkeypatch):
    with pytest.raises(KeysConfigError, match="cannot be read"):
        load_keys(str(tmp_path / "missing.yaml"))
    monkeypatch.setenv(KEYS_ENV, " , ")
    with pytest.raises(KeysConfigError, match=f"{KEYS_ENV} is set but holds no key"):
        load_keys()
    monkeypatch.delenv(KEYS_ENV)
    monkeypatch.setenv(KEYS_FILE_ENV, " ")
    with pytest.raises(KeysConfigError, match="set but empty"):
        load_keys()
    monkeypatch.delenv(KEYS_FILE_ENV)
    assert load_keys() == []  # nothing configured: keys off


def guarded_app(policy: AccessPolicy) -> TestClient:
    app = FastAPI()
    app.add_middleware(AccessMiddleware, get_policy=lambda: policy)
    app.add_exception_handler(DiffusionAPIError, lambda _, error: error_response(error.status_code, error.message))

    @app.post("/echo")
    async def echo(request: Request):
        return {"bytes": len(await request.body()), "owner": caller(request).owner}

    @app.post("/refresh", dependencies=[Depends(require_admin)])
    async def refresh():
        return {"ok": True}

    return TestClient(app)


def test_a_request_the_middleware_did_not_see_is_nobody():
    from deployments.keys import NOBODY

    assert not NOBODY.admin and not NOBODY.may_see("") and not NOBODY.may_see("alice")


def test_service_wide_changes_are_for_admin_keys_only(tmp_path):
    policy = AccessPolicy.from_config(keys_file(tmp_path, "keys:\n  - {name: alice, key: a}\n"
                                                          "  - {name: ops, key: o, admin: true}\n"))  # fmt: skip
    client = guarded_app(policy)
    refused = client.post("/refresh", headers={"Authorization": "Bearer a"})
    assert refused.status_code == 403 and "only an admin key" in refused.json()["error"]
    assert client.post("/refresh", headers={"Authorization": "Bearer o"}).json() == {"ok": True}
    assert client.post("/refresh").status_code == 401
    assert guarded_app(AccessPolicy()).post("/refresh").status_code == 200  # keys off: one caller, it may


def test_a_chunked_body_is_counted_and_refused_past_the_limit():
    policy = AccessPolicy(max_request_bytes=1000)
    client = guarded_app(policy)

    def chunks(total: int, size: int = 300):
        for start in range(0, total, size):
            yield b"x" * min(size, total - start)

    within = client.post("/echo", content=chunks(1000))  # a generator body is sent chunked, without a length
    assert within.status_code == 200 and within.json()["bytes"] == 1000
    refused = client.post("/echo", content=chunks(5000))
    assert refused.status_code == 413 and "at most 1000" in refused.json()["error"]
    declared = client.post("/echo", content=b"x" * 1001)
    assert declared.status_code == 413
