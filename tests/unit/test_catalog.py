"""Model discovery on the demo models: formats, families, labels, hashes, and names that must not resolve."""

import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from pipelines import catalog as catalog_module
from pipelines.catalog import ModelCatalog
from pipelines.demo import create_demo_models
from pipelines.errors import InvalidNameError, UnknownModelError
from pipelines.settings import Settings


def test_every_demo_format_is_found_with_its_family(catalog):
    found = {(m.name, m.format, m.family) for m in catalog.list_models()}
    assert found == {
        ("demo-sd15", "diffusers", "sd15"),
        ("demo-sd15-single", "single-file", "sd15"),
        ("models--demo--tiny-sdxl-base", "hf-cache", "sdxl"),
        ("demo-sdxl-refiner", "diffusers", "sdxl-refiner"),
        ("demo-sd15-inpainting", "single-file", "sd15"),
        ("demo-flux-dev", "diffusers", "flux"),
        ("demo-flux-dev-single", "single-file", "flux"),
        ("demo-flux-dev-Q8_0", "single-file", "flux"),
        ("demo-sd35", "diffusers", "sd3"),
        ("demo-sd35-single", "single-file", "sd3"),
    }
    assert [m.name for m in catalog.list_models() if m.inpainting] == ["demo-sd15-inpainting"]


def test_labels_come_from_configs_models_yaml(catalog):
    labels = {m.name: m.label for m in catalog.list_models()}
    assert labels["demo-sd15"] == "Demo SD1.5"
    assert labels["models--demo--tiny-sdxl-base"] == "Demo SDXL"
    assert ("Demo SDXL Refiner", "demo-sdxl-refiner") in catalog.aliases()


@pytest.mark.parametrize(
    ("requested", "name"),
    [
        ("demo-sd15", "demo-sd15"),
        ("Demo SD1.5", "demo-sd15"),
        ("demo sd1.5", "demo-sd15"),  # labels are case-insensitive
        ("DEMO SDXL", "models--demo--tiny-sdxl-base"),
        ("demo/tiny-sdxl-base", "models--demo--tiny-sdxl-base"),  # hub id -> HF cache folder
        ("demo-sd15-single.safetensors", "demo-sd15-single"),
        ("demo-sd15-single [d1224c2821]", "demo-sd15-single"),  # A1111 checkpoint title
        (None, "demo-sd15"),  # default_model from configs/models.yaml
        ("  ", "demo-sd15"),
    ],
)
def test_resolve(catalog, requested, name):
    assert catalog.resolve(requested).name == name


def test_names_are_case_sensitive_labels_are_not(catalog):
    with pytest.raises(UnknownModelError):
        catalog.resolve("DEMO-SD15-NOPE")


def test_unknown_model_lists_the_valid_ones(catalog):
    with pytest.raises(UnknownModelError) as raised:
        catalog.resolve("stable-diffusion-v1-5")
    message = str(raised.value)
    assert "stable-diffusion-v1-5" in message
    assert "'demo-sd15' (Demo SD1.5)" in message
    assert raised.value.field == "model"


@pytest.mark.parametrize(
    "requested",
    ["../demo-sd15", "..", "/etc/passwd", "demo-sd15/../../x", "a\x00b", "C:\\models\\x", "a/b/c",
     "..\\..\\x", "~/x", "./demo-sd15"],
)  # fmt: skip
def test_names_cannot_escape_the_models_folder(catalog, requested):
    with pytest.raises(InvalidNameError):
        catalog.resolve(requested)


def test_model_hash_is_a1111_sha256_prefix(catalog):
    single = catalog.resolve("demo-sd15-single")
    expected = hashlib.sha256(single.path.read_bytes()).hexdigest()[:10]
    assert catalog.model_hash(single) == expected
    folder = catalog.resolve("demo-sd15")
    unet_weights = folder.path / "unet" / "diffusion_pytorch_model.safetensors"
    assert catalog.model_hash(folder) == hashlib.sha256(unet_weights.read_bytes()).hexdigest()[:10]


def test_hash_is_computed_once_and_recomputed_when_the_file_changes(tmp_path, monkeypatch):
    models = tmp_path / "models"
    models.mkdir()
    checkpoint = models / "tiny.safetensors"
    save_file({"model.diffusion_model.x": torch.zeros(2), "cond_stage_model.transformer.y": torch.zeros(2)},
              checkpoint)  # fmt: skip
    settings = Settings.from_env(root=tmp_path).model_copy(update={"models_dir": models})
    calls = []
    real = catalog_module.sha256_of_file
    monkeypatch.setattr(catalog_module, "sha256_of_file", lambda p: calls.append(p) or real(p))
    entry = ModelCatalog(settings).resolve("tiny")
    first = ModelCatalog(settings).model_hash(entry)
    assert ModelCatalog(settings).model_hash(entry) == first  # a new catalog reads the on-disk cache
    assert len(calls) == 1
    save_file({"model.diffusion_model.x": torch.ones(2), "cond_stage_model.transformer.y": torch.zeros(2)},
              checkpoint)  # fmt: skip
    os.utime(checkpoint, ns=(1, 1))
    assert ModelCatalog(settings).model_hash(ModelCatalog(settings).resolve("tiny")) != first
    assert len(calls) == 2


def test_family_detection_of_single_file_key_layouts(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    layouts = {
        "xl.safetensors": ["model.diffusion_model.a", "conditioner.embedders.0.transformer.b",
                           "conditioner.embedders.1.model.c"],
        "refiner.safetensors": ["model.diffusion_model.a", "conditioner.embedders.0.model.c"],
        "v15.safetensors": ["model.diffusion_model.a", "cond_stage_model.transformer.text_model.b"],
        "v2.safetensors": ["model.diffusion_model.a", "cond_stage_model.model.b"],  # SD2: unsupported
        "vae.safetensors": ["encoder.conv_in.weight"],  # not a checkpoint
    }  # fmt: skip
    for filename, keys in layouts.items():
        save_file({key: torch.zeros(1) for key in keys}, models / filename)
    (models / "notes.txt").write_text("not a model")
    (models / "empty-folder").mkdir()
    settings = Settings.from_env(root=tmp_path).model_copy(update={"models_dir": models})
    found = {m.name: m.family for m in ModelCatalog(settings).list_models()}
    assert found == {"xl": "sdxl", "refiner": "sdxl-refiner", "v15": "sd15"}


def test_extra_models_dir_is_scanned(tmp_path):
    extra = tmp_path / "models"
    extra.mkdir()
    save_file({"model.diffusion_model.a": torch.zeros(1), "cond_stage_model.transformer.b": torch.zeros(1)},
              extra / "extra-one.safetensors")  # fmt: skip
    settings = Settings.from_env(root=tmp_path)
    assert settings.extra_models_dir == extra
    assert [m.name for m in ModelCatalog(settings).list_models()] == ["extra-one"]


def test_no_models_gives_a_clear_error(tmp_path):
    with pytest.raises(UnknownModelError, match="demo-models"):
        ModelCatalog(Settings.from_env(root=tmp_path)).resolve(None)


def test_hf_cache_layout_is_real(settings):
    folder = settings.models_dir / "models--demo--tiny-sdxl-base"
    revision = (folder / "refs" / "main").read_text()
    snapshot = folder / "snapshots" / revision
    unet = snapshot / "unet" / "diffusion_pytorch_model.safetensors"
    assert unet.is_symlink()
    blob = unet.resolve()
    assert blob.parent == (folder / "blobs").resolve()
    assert blob.name == hashlib.sha256(blob.read_bytes()).hexdigest()
    assert json.loads((snapshot / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"


def test_demo_models_are_deterministic(settings, tmp_path):
    create_demo_models(tmp_path)

    def digests(root):
        return {
            str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }

    first, second = digests(settings.models_dir), digests(tmp_path)
    assert first == second
    assert len(first) > 40


def test_demo_models_keep_existing_unless_forced(settings):
    assert create_demo_models(settings.models_dir) == []
