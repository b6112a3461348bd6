"""Engine-level hardening: cancellation stops at a step, out-of-memory becomes a clear error and the engine
keeps serving, request limits come from configs/limits.yaml, and the access policy (API keys, CORS, size)."""

import numpy as np
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import ValidationError

from deployments.access import AccessMiddleware, AccessPolicy
from deployments.contract import documented_errors, install_openapi
from pipelines.errors import JobCancelledError, OutOfMemoryError
from pipelines.limits import LIMITS, Limits, load_limits
from pipelines.schemas import Txt2ImgRequest


def request(**fields) -> Txt2ImgRequest:
    return Txt2ImgRequest(**{"prompt": "a bridge", "steps": 6, "width": 64, "height": 64, "seed": 4, **fields})


def test_cancelled_job_stops_at_the_next_step_and_leaves_no_trace(engine):
    before = engine.generate(request(loras=["demo-sd15-kohya"]))
    steps = []
    loaded = engine.load("Demo SD1.5")
    job = engine.prepare(request(loras=["demo-sd15-kohya"]), loaded.entry)
    with pytest.raises(JobCancelledError):
        engine.run(loaded, [job], progress=lambda d, t, p: steps.append(d), is_cancelled=lambda: len(steps) >= 2)
    assert len(steps) == 2  # steps 3..6 never ran
    plain = engine.generate(request())
    assert not np.array_equal(np.asarray(plain.image), np.asarray(before.image))  # the LoRA is off again
    assert np.array_equal(
        np.asarray(engine.generate(request(loras=["demo-sd15-kohya"])).image), np.asarray(before.image)
    )


class FakeGpuOutOfMemory:
    """Stands in for a CUDA out-of-memory error (no GPU here): a pipeline call that raises what torch raises."""

    def __init__(self, pipe):
        self.pipe = pipe

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_is_a_clear_error_and_the_engine_keeps_serving(engine, monkeypatch):
    loaded = engine.load("Demo SD1.5")
    monkeypatch.setattr(loaded, "pipe", FakeGpuOutOfMemory(loaded.pipe))
    with pytest.raises(OutOfMemoryError, match="out of GPU memory at 64x64.*try a smaller size"):
        engine.generate(request())
    monkeypatch.undo()
    assert engine.generate(request()).image.size == (64, 64)


def test_limits_come_from_the_config_and_bound_the_schema(tmp_path, monkeypatch):
    assert load_limits() == LIMITS and LIMITS.max_steps == 150 and LIMITS.max_loras == 8
    custom = tmp_path / "limits.yaml"
    custom.write_text("max_steps: 40\n")
    assert load_limits(custom).max_steps == 40
    custom.write_text("max_stepz: 40\n")
    with pytest.raises(SystemExit, match="max_stepz"):
        load_limits(custom)
    assert LIMITS.max_pixels == LIMITS.max_size**2  # by default the per-side bounds say it all
    assert request(width=2048, height=2048).width == 2048
    monkeypatch.setattr(LIMITS, "max_pixels", 1536 * 1536)  # an operator's tighter pixel budget still holds
    with pytest.raises(ValidationError, match="at most 2359296"):
        request(width=2048, height=2048)
    with pytest.raises(ValidationError, match="loras"):
        request(loras=[f"x{i}" for i in range(LIMITS.max_loras + 1)])
    assert Limits() == load_limits()  # the file's values are the defaults


def app_with(policy: AccessPolicy) -> TestClient:
    app = FastAPI()
    app.add_middleware(AccessMiddleware, get_policy=lambda: policy)

    @app.get("/hello")
    async def hello():
        return {"ok": True}

    @app.post("/txt2img")
    async def submit():
        return {"job_id": "x"}

    return TestClient(app)


def test_api_keys_guard_every_route_but_hello(monkeypatch, tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text("# operators\nfile-key\n")
    monkeypatch.setenv("DIFFUSION_API_KEYS", "env-key")
    policy = AccessPolicy.from_config(api_keys_file=str(keys_file))
    client = app_with(policy)
    assert client.get("/hello").status_code == 200
    refused = client.post("/txt2img")
    assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Bearer"
    assert "Authorization: Bearer" in refused.json()["error"]
    assert client.post("/txt2img", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.post("/txt2img", headers={"Authorization": "Basic env-key"}).status_code == 401
    for key in ("env-key", "file-key"):
        assert client.post("/txt2img", headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_no_keys_configured_means_open_and_cors_and_size_limits(monkeypatch):
    monkeypatch.delenv("DIFFUSION_API_KEYS", raising=False)
    monkeypatch.delenv("DIFFUSION_API_KEYS_FILE", raising=False)
    policy = AccessPolicy.from_config(cors_origins=["https://app.example"])
    policy.max_request_bytes = 1000
    client = app_with(policy)
    assert client.post("/txt2img").status_code == 200
    preflight = client.options("/txt2img", headers={"Origin": "https://app.example",
                                                    "Access-Control-Request-Method": "POST"})  # fmt: skip
    assert preflight.status_code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://app.example"
    other = client.post("/txt2img", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers
    too_big = client.post("/txt2img", content=b"x" * 1001)
    assert too_big.status_code == 413 and "at most 1000" in too_big.json()["error"]


def test_names_never_reach_outside_their_folders_even_through_symlinks(settings, tmp_path):
    from pipelines.catalog import ModelCatalog
    from pipelines.errors import InvalidNameError, UnknownModelError
    from pipelines.loras import LoraLibrary, UnknownLoraError
    from pipelines.prepare import prepare_job
    from pipelines.upscalers import UnknownUpscalerError, UpscalerLibrary

    outside = tmp_path / "outside"
    outside.mkdir()
    links = {
        settings.models_dir / "linked-model": settings.models_dir / "demo-sd15",  # inside: allowed
        settings.models_dir / "escaped-model": outside / "model",
        settings.loras_dir / "escaped-lora.safetensors": outside / "lora.safetensors",
        settings.upscalers_dir / "escaped-upscaler.pth": outside / "upscaler.pth",
    }
    import shutil

    shutil.copytree(settings.models_dir / "demo-sd15", outside / "model")
    shutil.copy(settings.loras_dir / "demo-sd15-peft.safetensors", outside / "lora.safetensors")
    shutil.copy(settings.upscalers_dir / "demo-esrgan-x4.pth", outside / "upscaler.pth")
    for link, target in links.items():
        link.symlink_to(target)
    try:
        catalog, loras, upscalers = ModelCatalog(settings), LoraLibrary(settings), UpscalerLibrary(settings)
        names = [entry.name for entry in catalog.list_models()]
        assert "linked-model" in names and "escaped-model" not in names
        with pytest.raises(UnknownModelError):
            catalog.resolve("escaped-model")
        with pytest.raises(UnknownModelError):
            catalog.resolve("escaped-model", field="refiner_checkpoint")
        with pytest.raises(UnknownLoraError):
            loras.resolve("escaped-lora")
        with pytest.raises(UnknownUpscalerError):
            upscalers.resolve("escaped-upscaler")
        for bad in ("../outside/model", "/etc/passwd", "demo-sd15\x00", "..\\x"):
            with pytest.raises(InvalidNameError):
                catalog.resolve(bad)
        with pytest.raises(InvalidNameError):
            prepare_job(request(hires={"enabled": True, "upscaler": "../../outside/upscaler"}), None, loras, catalog,
                        upscalers)  # fmt: skip
        opened = settings.model_copy(update={"allow_external_links": True})
        assert "escaped-lora" in [lora.name for lora in LoraLibrary(opened).available()]
    finally:
        for link in links:
            link.unlink()


@pytest.mark.parametrize("keys_on", [True, False])
def test_the_schema_declares_bearer_keys_exactly_when_they_are_on(keys_on):
    app = FastAPI()

    @app.get("/hello")
    async def hello():
        return {"ok": True}

    @app.get("/models", responses=documented_errors(401, 503))
    async def models():
        return {"models": []}

    install_openapi(app, api_keys_on=lambda: keys_on)
    schema = TestClient(app).get("/openapi.json").json()
    assert ("securitySchemes" in schema.get("components", {})) is keys_on
    assert "security" not in schema["paths"]["/hello"]["get"]
    assert schema["paths"]["/models"]["get"].get("security") == ([{"apiKey": []}] if keys_on else None)
    assert schema["paths"]["/models"]["get"]["responses"]["401"]["headers"]["WWW-Authenticate"]["required"]


def test_a_job_record_keeps_known_fields_only_however_deep_the_unknown_ones_are():
    sent = request(junk="x" * 1000, loras=[{"name": "demo-sd15-kohya", "scale": 0.5, "blob": "y" * 1000}],
                   hires={"scale": 2, "extra": ["z"] * 100})  # fmt: skip
    stored = sent.stored_payload()
    assert "junk" not in stored and stored["loras"] == [{"name": "demo-sd15-kohya", "scale": 0.5}]
    assert "extra" not in stored["hires"] and stored["hires"]["scale"] == 2
    assert sorted(sent.unknown_fields()) == ["hires.extra", "junk", "loras[0].blob"]
    assert Txt2ImgRequest.model_validate(stored).stored_payload() == stored  # what is stored reads back the same
