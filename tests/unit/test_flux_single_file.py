"""A FLUX.1 single file as Black Forest Labs ships it (the transformer alone, in its key layout) with its modules
as separate files (VAE in vae/, CLIP-L and T5 in text_encoder/, as Forge keeps them): the layout converter agrees
with diffusers' own on a full-size state dict, the demo single file gives exactly the pixels of the same weights
as a diffusers folder, Forge's `Module N` infotext, and what is missing or mismatched is said."""

import shutil

import numpy as np
import pytest
import torch

from pipelines import a1111
from pipelines.a1111_schemas import A1111Txt2ImgRequest
from pipelines.catalog import ModelCatalog
from pipelines.errors import DiffusionAPIError
from pipelines.flux_layout import bfl_to_diffusers, diffusers_to_bfl
from pipelines.infotext import parse_infotext
from pipelines.modules import ModuleLibrary
from pipelines.schemas import Txt2ImgRequest
from tests.unit.test_controlnet import pixels

BASE = {"prompt": "a lighthouse by the sea", "steps": 4, "width": 64, "height": 64, "seed": 5}
SINGLE = "demo-flux-dev-single"


def test_the_layout_converter_agrees_with_diffusers_on_a_full_size_transformer():
    """diffusers' converter takes FLUX.1's width (3072) as given, so it can only be compared at full size: on the
    meta device, names and shapes; the tiny demo's round trip checks the values."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    config = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                  axes_dims_rope=(16, 56, 56))  # fmt: skip
    with torch.device("meta"):
        full = FluxTransformer2DModel(**config).state_dict()
        bfl = diffusers_to_bfl(full)
        ours = bfl_to_diffusers(dict(bfl))
        theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    assert set(ours) == set(theirs) == set(full)
    assert all(ours[key].shape == theirs[key].shape == full[key].shape for key in full)
    assert "double_blocks.0.img_attn.qkv.weight" in bfl and "single_blocks.1.linear1.weight" in bfl


def test_the_layout_converter_gives_diffusers_values_at_full_width():
    """The values too, where diffusers' converter can run (FLUX.1's 3072 width; one block of each kind; bytes
    rather than floats, as the conversion only moves tensors): a mistake both directions of ours shared would show."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    config = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                  axes_dims_rope=(16, 56, 56))  # fmt: skip
    with torch.device("meta"):
        shapes = {key: tensor.shape for key, tensor in FluxTransformer2DModel(**config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    full = {key: torch.randint(0, 255, shape, dtype=torch.uint8, generator=generator) for key, shape in shapes.items()}
    theirs = convert_flux_transformer_checkpoint_to_diffusers(diffusers_to_bfl(full))
    assert set(theirs) == set(full) and all(torch.equal(theirs[key], full[key]) for key in full)


def test_the_demo_single_file_round_trips_and_is_listed_with_its_modules(engine, settings):
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    # from the folder itself: the engine's loaded model may hold LoRA layers (peft renames them) by now
    folder = FluxTransformer2DModel.from_pretrained(settings.models_dir / "demo-flux-dev" / "transformer").state_dict()
    stored = load_file(settings.models_dir / f"{SINGLE}.safetensors")
    back = bfl_to_diffusers(stored)
    assert set(back) == set(folder) and all(torch.equal(back[key], folder[key]) for key in folder)
    entry = engine.catalog.resolve("Demo FLUX.1-dev (single file)")
    assert (entry.family, entry.format) == ("flux", "single-file")
    assert [path.name for path in entry.modules] == ["flux-ae.safetensors", "demo-clip-l.safetensors",
                                                      "demo-t5xxl.safetensors"]  # fmt: skip
    kinds = {module.name: module.kind for module in ModuleLibrary(settings).available()}
    # the SD VAE is no module; CLIP-G is SD 3.5's
    assert kinds == {"flux-ae": "vae", "demo-clip-l": "clip", "demo-clip-g": "clip_g", "demo-t5xxl": "t5"}


def test_the_single_file_gives_the_folders_pixels_and_forges_module_infotext(engine):
    single = engine.generate(Txt2ImgRequest(**BASE, model=SINGLE))
    folder = engine.generate(Txt2ImgRequest(**BASE, model="demo-flux-dev"))
    assert np.abs(pixels(single) - pixels(folder)).max() == 0
    params = parse_infotext(single.infotext)
    assert (params["Module 1"], params["Module 2"], params["Module 3"]) == ("flux-ae", "demo-clip-l", "demo-t5xxl")
    assert params["Model"] == SINGLE and params["Model hash"] == engine.catalog.model_hash(
        engine.catalog.resolve(SINGLE)
    )


def test_a_single_file_without_its_modules_is_skipped_naming_what_is_missing(settings, tmp_path, caplog):
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(settings.models_dir / f"{SINGLE}.safetensors", models)
    shutil.copytree(settings.models_dir / ".configs" / SINGLE, models / ".configs" / SINGLE)
    lonely = settings.model_copy(update={"models_dir": models, "text_encoder_dir": tmp_path / "none"})
    catalog = ModelCatalog(lonely)
    assert catalog.list_models() == []
    why = f"a FLUX.1 transformer without its modules: no CLIP-L module file in {tmp_path / 'none'}"
    assert why in caplog.text
    with pytest.raises(DiffusionAPIError) as raised:  # asked for, it is not "unknown": the answer says why
        catalog.resolve(SINGLE)
    assert raised.value.status_code == 404 and f"'{SINGLE}' is installed but skipped: {why}" in raised.value.message


def test_forges_additional_modules_are_checked_against_the_models(catalog):
    def mapped(modules, model=SINGLE):
        request = A1111Txt2ImgRequest(prompt="x", width=64, height=64, override_settings={
            "sd_model_checkpoint": model, "forge_additional_modules": modules})  # fmt: skip
        return a1111.to_native(request, None, catalog=catalog)

    assert mapped(["flux-ae", "demo-clip-l.safetensors", "/forge/models/text_encoder/demo-t5xxl.safetensors"])
    with pytest.raises(DiffusionAPIError) as raised:
        mapped(["ae.safetensors", "demo-clip-l"])
    assert raised.value.status_code == 422 and raised.value.field == "override_settings.forge_additional_modules"
    assert "'ae' are not the modules model 'demo-flux-dev-single' runs with" in raised.value.message
    folder = mapped(["flux-ae"], model="demo-flux-dev")
    assert "forge_additional_modules ignored: model 'demo-flux-dev' carries its own VAE" in " ".join(folder.warnings)
    with pytest.raises(DiffusionAPIError, match="a list of module file names"):
        mapped("flux-ae")


def test_a_gguf_transformer_loads_quantized_and_generates_near_the_full_weights(engine):
    """city96-style GGUF (Q8_0 matrices, BFL names) through diffusers' GGUF support: the layers stay quantized."""
    entry = engine.catalog.resolve("Demo FLUX.1-dev (GGUF Q8_0)")
    assert (entry.family, entry.format, entry.path.suffix) == ("flux", "single-file", ".gguf")
    quantized = engine.generate(Txt2ImgRequest(**BASE, model=entry.name))
    loaded = engine.load(entry)
    assert type(loaded.pipe.transformer.transformer_blocks[0].attn.to_q).__name__ == "GGUFLinear"
    full = engine.generate(Txt2ImgRequest(**BASE, model="demo-flux-dev"))
    assert 0 < np.abs(pixels(quantized) - pixels(full)).max() <= 4  # Q8_0: near, not equal
    assert parse_infotext(quantized.infotext)["Model"] == "demo-flux-dev-Q8_0"
    styled = engine.generate(Txt2ImgRequest(**BASE, model=entry.name, loras=["demo-flux-peft"]))  # on GGUF layers
    assert np.abs(pixels(styled) - pixels(quantized)).max() > 2 and not styled.warnings


def test_configs_of_another_variant_or_missing_say_what_does_not_match(engine, settings, tmp_path):
    """A schnell-shaped configs folder for a dev file: named mismatch, not an index error; a missing tokenizer:
    named before any weight is read; a scaled-fp8 file: refused by name."""
    from safetensors.torch import load_file, save_file

    from pipelines.flux_single_file import load_transformer
    from pipelines.models import load_pipeline

    configs = tmp_path / "configs"
    shutil.copytree(settings.models_dir / ".configs" / SINGLE, configs)
    config = configs / "transformer" / "config.json"
    config.write_text(config.read_text().replace('"guidance_embeds": true', '"guidance_embeds": false'))
    with pytest.raises(DiffusionAPIError, match="does not match its configs .* not in the configs .*guidance"):
        load_transformer(settings.models_dir / f"{SINGLE}.safetensors", configs, torch.float32)
    shutil.rmtree(configs / "tokenizer_2")
    entry = engine.catalog.resolve(SINGLE)
    from dataclasses import replace

    with pytest.raises(DiffusionAPIError, match="lacks tokenizer_2"):
        load_pipeline(replace(entry, config_dir=configs), torch.device("cpu"), torch.float32)
    scaled = tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors"
    save_file({**load_file(entry.modules[2]), "scaled_fp8": torch.zeros(1)}, scaled)
    with pytest.raises(DiffusionAPIError, match="'scaled fp8' file"):
        load_pipeline(replace(entry, modules=(*entry.modules[:2], scaled)), torch.device("cpu"), torch.float32)


def test_other_black_forest_labs_layouts_are_refused_by_name():
    from pipelines.catalog import UnsupportedModelError, family_of_checkpoint_keys
    from pipelines.tensor_shapes import TensorShape

    dev = {"img_in.weight": TensorShape((3072, 64)), "vector_in.in_layer.weight": TensorShape((3072, 768)),
           "double_blocks.0.img_mod.lin.weight": TensorShape((18432, 3072))}  # fmt: skip
    assert family_of_checkpoint_keys(dev) == "flux"
    assert family_of_checkpoint_keys({f"model.diffusion_model.{key}": shape for key, shape in dev.items()}) == "flux"
    with pytest.raises(UnsupportedModelError, match="384 input channels \\(Fill, Canny or Depth\\)"):
        family_of_checkpoint_keys({**dev, "img_in.weight": TensorShape((3072, 384))})
    with pytest.raises(UnsupportedModelError, match="not FLUX.1 \\(FLUX.2 or Chroma\\)"):
        family_of_checkpoint_keys({key: shape for key, shape in dev.items() if not key.startswith("vector_in")})
