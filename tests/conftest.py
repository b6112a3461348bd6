"""Shared fixtures: the demo models are built once per test session into a temporary folder and loaded
through the real loaders; a real PostgreSQL server for the job store's second backend."""

import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from pipelines.catalog import ModelCatalog
from pipelines.demo import (
    create_demo_controlnets,
    create_demo_embeddings,
    create_demo_loras,
    create_demo_models,
    create_demo_upscaler,
    create_demo_vae,
)
from pipelines.demo_adapters import create_demo_annotators, create_demo_ip_adapters
from pipelines.demo_flow import create_demo_modules
from pipelines.settings import PROJECT_ROOT, Settings


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("diffusion-api")
    create_demo_models(root / "stable_diffusion" / "models")
    create_demo_loras(root / "stable_diffusion" / "loras")
    create_demo_upscaler(root / "stable_diffusion" / "upscalers")
    create_demo_vae(root / "stable_diffusion" / "vae")
    create_demo_embeddings(root / "stable_diffusion" / "embeddings")
    create_demo_controlnets(root / "stable_diffusion" / "controlnet")
    create_demo_ip_adapters(root / "stable_diffusion" / "ipadapter", root / "stable_diffusion" / "clip_vision")
    create_demo_annotators(root / "stable_diffusion" / "annotators")
    create_demo_modules(root / "stable_diffusion" / "vae", root / "stable_diffusion" / "text_encoder")
    return root


@pytest.fixture(scope="session")
def settings(demo_root) -> Settings:
    settings = Settings.from_env(root=demo_root)
    # The project's own label file, so tests see the labels a user sees.
    return settings.model_copy(update={"models_config": PROJECT_ROOT / "configs" / "models.yaml"})


@pytest.fixture(scope="session")
def catalog(settings) -> ModelCatalog:
    return ModelCatalog(settings)


@pytest.fixture(scope="session")
def engine(catalog):
    from pipelines.generate import ImageEngine

    return ImageEngine(catalog, device="cpu", max_loaded_models=4)


@pytest.fixture
def env_settings(monkeypatch, settings):
    """Points the CLI (which reads the environment) at the session's demo models."""
    monkeypatch.setenv("DIFFUSION_API_MODELS_DIR", str(settings.models_dir))
    monkeypatch.setenv("DIFFUSION_API_LORAS_DIR", str(settings.loras_dir))
    monkeypatch.setenv("DIFFUSION_API_UPSCALERS_DIR", str(settings.upscalers_dir))
    monkeypatch.setenv("DIFFUSION_API_VAES_DIR", str(settings.vaes_dir))
    monkeypatch.setenv("DIFFUSION_API_EMBEDDINGS_DIR", str(settings.embeddings_dir))
    monkeypatch.setenv("DIFFUSION_API_CONTROLNET_DIR", str(settings.controlnet_dir))
    monkeypatch.setenv("DIFFUSION_API_IPADAPTER_DIR", str(settings.ipadapter_dir))
    monkeypatch.setenv("DIFFUSION_API_CLIP_VISION_DIR", str(settings.clip_vision_dir))
    monkeypatch.setenv("DIFFUSION_API_TEXT_ENCODER_DIR", str(settings.text_encoder_dir))
    monkeypatch.setenv("DIFFUSION_API_ANNOTATORS_DIR", str(settings.annotators_dir))
    monkeypatch.setenv("DIFFUSION_API_CACHE_DIR", str(settings.cache_dir))
    monkeypatch.setenv("DIFFUSION_API_EXTRA_MODELS_DIR", str(settings.extra_models_dir))
    monkeypatch.setenv("DIFFUSION_API_MODELS_CONFIG", str(settings.models_config))
    return settings


def _postgres_bin() -> Path | None:
    """The folder of initdb and pg_ctl: on PATH, or where Debian's postgresql package puts them."""
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parent.parent.name))
    return versions[-1].parent if versions else None


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """A real PostgreSQL server for this session (Debian's `postgresql` package), in a temporary folder and on
    a free port; yields its admin URL. As root, the server runs as the package's `postgres` user."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("PostgreSQL tests need psycopg: pip install 'diffusion-api[postgres]'")
    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL tests need Debian's postgresql package (apt-get install postgresql): no pg_ctl")
    run_as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="pg-", dir="/tmp"))
    if run_as:
        shutil.chown(root, "postgres")
    data = root / "data"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    subprocess.run([*run_as, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                    "--encoding=UTF8", "--no-locale", "--no-sync"], check=True, capture_output=True)  # fmt: skip
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1"
    subprocess.run([*run_as, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w",
                    "-o", options, "start"], check=True, capture_output=True)  # fmt: skip
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*run_as, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A fresh, empty database on the session's PostgreSQL server."""
    import psycopg

    name = f"test_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(postgres_server, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    return f"{postgres_server.rsplit('/', 1)[0]}/{name}"


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request, tmp_path) -> str:
    """Where a test's job store lives: a SQLite file, or a fresh database on the session's PostgreSQL server."""
    if request.param == "postgresql":
        return request.getfixturevalue("postgres_url")
    return str(tmp_path / "jobs.sqlite3")
