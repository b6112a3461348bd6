"""Shared fixtures: the demo models are built once per test session into a temporary folder and loaded
through the real loaders."""

from pathlib import Path

import pytest

from pipelines.catalog import ModelCatalog
from pipelines.demo import (
    create_demo_embeddings,
    create_demo_loras,
    create_demo_models,
    create_demo_upscaler,
    create_demo_vae,
)
from pipelines.settings import PROJECT_ROOT, Settings


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("diffusion-api")
    create_demo_models(root / "stable_diffusion" / "models")
    create_demo_loras(root / "stable_diffusion" / "loras")
    create_demo_upscaler(root / "stable_diffusion" / "upscalers")
    create_demo_vae(root / "stable_diffusion" / "vae")
    create_demo_embeddings(root / "stable_diffusion" / "embeddings")
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
    monkeypatch.setenv("DIFFUSION_API_CACHE_DIR", str(settings.cache_dir))
    monkeypatch.setenv("DIFFUSION_API_EXTRA_MODELS_DIR", str(settings.extra_models_dir))
    monkeypatch.setenv("DIFFUSION_API_MODELS_CONFIG", str(settings.models_config))
    return settings
