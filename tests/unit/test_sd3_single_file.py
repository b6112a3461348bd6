"""SD 3.5 single files as Stability ships them (`sd3.5_large.safetensors`: the MMDiT and the VAE in Stability's
layout) with the text encoders as module files (CLIP-L, CLIP-G and T5 in text_encoder/, the CLIP-L and T5 shared
with FLUX.1): the demo writer's layout is diffusers' converter's inverse, the single file gives exactly the
folder's pixels, files that carry their text encoders or lack T5 or the VAE load as users have them, and what is
missing or mismatched is said."""

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from pipelines.catalog import ModelCatalog
from pipelines.errors import DiffusionAPIError, InvalidRequestError
from pipelines.generate import ImageEngine
from pipelines.infotext import parse_infotext
from pipelines.modules import ModuleLibrary, kind_of
from pipelines.schemas import Txt2ImgRequest
from pipelines.tensor_shapes import TensorShape
from tests.unit.test_controlnet import pixels

SINGLE = "demo-sd35-single"
BASE = {"prompt": "a lighthouse by the sea", "negative_prompt": "blurry", "steps": 4, "width": 64, "height": 64,
        "seed": 5, "fileType": "png"}  # fmt: skip


def difference(a, b) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


@pytest.mark.parametrize("dual_attention", [(), (0, 1)])
def test_the_demo_layout_is_the_inverse_of_diffusers_converter(dual_attention):
    """With QK norm, and with SD 3.5 Medium's dual-attention blocks: every tensor comes back as it was."""
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    from pipelines.sd3_layout import diffusers_to_sai

    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64, out_channels=16,
        pos_embed_max_size=32, qk_norm="rms_norm", dual_attention_layers=dual_attention,
    )  # fmt: skip
    state = {key: torch.randn_like(tensor) for key, tensor in model.state_dict().items()}
    stability = diffusers_to_sai(state)
    assert "joint_blocks.2.context_block.adaLN_modulation.1.weight" in stability
    assert ("joint_blocks.0.x_block.attn2.qkv.weight" in stability) == bool(dual_attention)
    back = convert_sd3_transformer_checkpoint_to_diffusers({f"model.diffusion_model.{key}": tensor
                                                            for key, tensor in stability.items()})  # fmt: skip
    assert set(back) == set(state) and all(torch.equal(back[key], state[key]) for key in state)


def test_the_single_file_is_listed_with_its_text_encoder_modules(engine, settings):
    entry = engine.catalog.resolve("Demo SD 3.5 (single file)")
    assert (entry.family, entry.format) == ("sd3", "single-file")
    # it carries its VAE; the text encoders come from text_encoder/, CLIP-L and T5 the same files as FLUX.1's
    assert [path.name for path in entry.modules] == ["demo-clip-l.safetensors", "demo-clip-g.safetensors",
                                                      "demo-t5xxl.safetensors"]  # fmt: skip
    kinds = {module.name: module.kind for module in ModuleLibrary(settings).available()}
    assert kinds == {"flux-ae": "vae", "demo-clip-l": "clip", "demo-clip-g": "clip_g", "demo-t5xxl": "t5"}
    flux = engine.catalog.resolve("demo-flux-dev-single")
    assert [path.name for path in flux.modules] == ["flux-ae.safetensors", "demo-clip-l.safetensors",
                                                     "demo-t5xxl.safetensors"]  # fmt: skip


def test_clip_l_and_clip_g_are_told_apart_by_width_then_by_name():
    def clip(width: int) -> dict:
        return {"text_model.embeddings.token_embedding.weight": TensorShape((49408, width))}

    assert kind_of(clip(768)) == "clip" and kind_of(clip(1280)) == "clip_g"
    assert kind_of(clip(768), "clip_g_renamed") == "clip"  # the published widths decide
    assert kind_of(clip(32), "demo-clip-g") == "clip_g" and kind_of(clip(32), "demo-clip-l") == "clip"
    assert kind_of(clip(32), "tiny-clip") is None and kind_of(clip(1024), "clip_l") is None  # SD 2's ViT-H: none


def test_clip_l_goes_in_unprojected_as_in_stabilitys_code(engine):
    """`clip_l.safetensors` has no projection (the demo's neither): SD 3 takes CLIP-L's pooled output as it is."""
    from safetensors import safe_open

    entry = engine.catalog.resolve(SINGLE)
    with safe_open(str(entry.modules[0]), framework="pt") as clip_l:
        assert not any(key.startswith("text_projection") for key in clip_l.keys())  # noqa: SIM118
    projection = engine.load(entry).pipe.text_encoder.text_projection.weight
    assert torch.equal(projection, torch.eye(projection.shape[0]))


def test_the_single_file_gives_the_folders_pixels(engine):
    single = engine.generate(Txt2ImgRequest(**BASE, model=SINGLE))
    folder = engine.generate(Txt2ImgRequest(**BASE, model="demo-sd35"))
    assert difference(single, folder) == 0
    params = parse_infotext(single.infotext)
    assert (params["Module 1"], params["Module 2"], params["Module 3"]) == ("demo-clip-l", "demo-clip-g", "demo-t5xxl")
    assert params["Model"] == SINGLE and params["CFG scale"] == "4.5"
    styled = engine.generate(Txt2ImgRequest(**BASE, model=SINGLE, loras=["demo-sd35-peft"]))
    assert difference(styled, single) > 2 and not styled.warnings


def _copy_single(settings, models):
    models.mkdir(parents=True, exist_ok=True)
    shutil.copy(settings.models_dir / f"{SINGLE}.safetensors", models)
    shutil.copytree(settings.models_dir / ".configs" / SINGLE, models / ".configs" / SINGLE)


def test_without_a_t5_module_it_runs_without_t5_as_diffusers_does(settings, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    _copy_single(settings, tmp_path / "models")
    encoders = tmp_path / "text_encoder"
    encoders.mkdir()
    for name in ("demo-clip-l", "demo-clip-g"):
        shutil.copy(settings.text_encoder_dir / f"{name}.safetensors", encoders)
    catalog = ModelCatalog(settings.model_copy(update={"models_dir": tmp_path / "models",
                                                        "text_encoder_dir": encoders}))  # fmt: skip
    assert [path.name for path in catalog.resolve(SINGLE).modules] == ["demo-clip-l.safetensors",
                                                                        "demo-clip-g.safetensors"]  # fmt: skip
    ours = ImageEngine(catalog, device="cpu").generate(Txt2ImgRequest(**BASE, model=SINGLE))
    plain = StableDiffusion3Pipeline.from_pretrained(settings.models_dir / "demo-sd35", local_files_only=True,
                                                     text_encoder_3=None, tokenizer_3=None)  # fmt: skip
    plain.set_progress_bar_config(disable=True)
    theirs = plain(prompt=BASE["prompt"], negative_prompt="blurry", num_inference_steps=4, width=64, height=64,
                   guidance_scale=4.5, generator=torch.Generator("cpu").manual_seed(5)).images[0]  # fmt: skip
    assert np.abs(np.asarray(theirs).astype(int) - pixels(ours)).max() <= 2
    assert "Module 3" not in parse_infotext(ours.infotext)


def test_a_file_that_carries_its_text_encoders_uses_its_own(engine, settings, tmp_path):
    """`sd3_medium_incl_clips_t5xxlfp8.safetensors`: the encoders under `text_encoders.<name>.transformer.`."""
    from safetensors.torch import load_file, save_file

    models = tmp_path / "models"
    _copy_single(settings, models)
    state = load_file(models / f"{SINGLE}.safetensors")
    for prefix, name in (("clip_l", "demo-clip-l"), ("clip_g", "demo-clip-g"), ("t5xxl", "demo-t5xxl")):
        for key, tensor in load_file(settings.text_encoder_dir / f"{name}.safetensors").items():
            state[f"text_encoders.{prefix}.transformer.{key}"] = tensor
    save_file(state, models / f"{SINGLE}.safetensors")
    empty = tmp_path / "no-modules"
    catalog = ModelCatalog(settings.model_copy(update={"models_dir": models, "text_encoder_dir": empty,
                                                        "vaes_dir": empty}))  # fmt: skip
    assert catalog.resolve(SINGLE).modules == ()
    ours = ImageEngine(catalog, device="cpu").generate(Txt2ImgRequest(**BASE, model=SINGLE))
    # Equal weights read from another file lie at other memory alignments, which CPU
    # kernels round differently: within 2/255, not always 0.
    assert difference(ours, engine.generate(Txt2ImgRequest(**BASE, model="demo-sd35"))) <= 2
    assert "Module 1" not in parse_infotext(ours.infotext)


def test_a_transformer_alone_takes_an_sd3_vae_module_never_flux(settings, tmp_path, caplog):
    """A transformer-only file (ComfyUI's diffusion_models/, GGUF) needs a VAE module: FLUX.1's `ae` has SD 3's
    shape but not its weights, so it is not chosen unasked; an `sd3*` VAE file is."""
    from safetensors.torch import load_file, save_file

    from pipelines.ldm_layout import VAE_PREFIX

    models = tmp_path / "models"
    _copy_single(settings, models)
    state = load_file(models / f"{SINGLE}.safetensors")
    vae = {key.removeprefix(VAE_PREFIX): tensor for key, tensor in state.items() if key.startswith(VAE_PREFIX)}
    save_file({key: tensor for key, tensor in state.items() if not key.startswith(VAE_PREFIX)},
              models / f"{SINGLE}.safetensors")  # fmt: skip
    vaes = tmp_path / "vae"
    vaes.mkdir()
    shutil.copy(settings.vaes_dir / "flux-ae.safetensors", vaes)
    catalog = ModelCatalog(settings.model_copy(update={"models_dir": models, "vaes_dir": vaes}))
    with pytest.raises(DiffusionAPIError) as raised:
        catalog.resolve(SINGLE)
    assert raised.value.status_code == 404 and f"no SD 3.5 VAE in {vaes}" in raised.value.message
    assert "flux-ae found, not taken" in raised.value.message
    save_file(vae, vaes / "sd3.5_vae.safetensors")
    catalog = ModelCatalog(settings.model_copy(update={"models_dir": models, "vaes_dir": vaes}))
    assert catalog.resolve(SINGLE).modules[0].name == "sd3.5_vae.safetensors"
    ours = ImageEngine(catalog, device="cpu").generate(Txt2ImgRequest(**BASE, model=SINGLE))
    assert parse_infotext(ours.infotext)["Module 1"] == "sd3.5_vae"
    folder = ImageEngine(ModelCatalog(settings), device="cpu").generate(Txt2ImgRequest(**BASE, model="demo-sd35"))
    assert difference(ours, folder) == 0


def test_a_gguf_transformer_loads_quantized_with_an_sd3_vae_module(settings, tmp_path):
    """city96-style `sd3.5_large-Q8_0.gguf`: Stability's names without the prefix, no VAE; diffusers' GGUF layers."""
    from safetensors.torch import load_file, save_file

    from pipelines.demo_flow import write_gguf
    from pipelines.families.sd3 import SAI_PREFIX
    from pipelines.ldm_layout import VAE_PREFIX

    models, vaes = tmp_path / "models", tmp_path / "vae"
    models.mkdir()
    vaes.mkdir()
    state = load_file(settings.models_dir / f"{SINGLE}.safetensors")
    write_gguf({key.removeprefix(SAI_PREFIX): tensor for key, tensor in state.items() if key.startswith(SAI_PREFIX)},
               models / "sd35-Q8_0.gguf", arch="sd3")  # fmt: skip
    shutil.copytree(settings.models_dir / ".configs" / SINGLE, models / ".configs" / "sd35-Q8_0")
    save_file({key.removeprefix(VAE_PREFIX): tensor for key, tensor in state.items() if key.startswith(VAE_PREFIX)},
              vaes / "sd3_vae.safetensors")  # fmt: skip
    shutil.copy(settings.vaes_dir / "flux-ae.safetensors", vaes)  # FLUX.1's, not chosen
    engine = ImageEngine(ModelCatalog(settings.model_copy(update={"models_dir": models, "vaes_dir": vaes})),
                         device="cpu")  # fmt: skip
    entry = engine.catalog.resolve("sd35-Q8_0")
    assert entry.family == "sd3"
    assert [path.stem for path in entry.modules] == ["sd3_vae", "demo-clip-l", "demo-clip-g", "demo-t5xxl"]
    quantized = engine.generate(Txt2ImgRequest(**BASE, model="sd35-Q8_0"))
    layer = engine.load(entry).pipe.transformer.transformer_blocks[0].attn.to_q
    assert type(layer).__name__ == "GGUFLinear"
    folder = ImageEngine(ModelCatalog(settings), device="cpu").generate(Txt2ImgRequest(**BASE, model="demo-sd35"))
    assert difference(quantized, folder) <= 4  # Q8_0: near the full weights
    styled = engine.generate(Txt2ImgRequest(**BASE, model="sd35-Q8_0", loras=["demo-sd35-peft"]))
    assert difference(styled, quantized) > 2 and not styled.warnings


def test_configs_models_yaml_picks_modules_by_name_overrides_carried_parts_and_leaves_t5_out(settings, tmp_path):
    """`modules:` names (dots inside a name are kept: `sd3.5_vae`) win over the VAE the file carries, and a list
    that does not name a T5 runs without one, though one is installed; a VAE with no usual name is not taken."""
    from safetensors.torch import load_file, save_file

    from pipelines.ldm_layout import VAE_PREFIX

    vaes = tmp_path / "vae"
    vaes.mkdir()
    state = load_file(settings.models_dir / f"{SINGLE}.safetensors")
    save_file({key.removeprefix(VAE_PREFIX): tensor for key, tensor in state.items() if key.startswith(VAE_PREFIX)},
              vaes / "sd3.5_vae.safetensors")  # fmt: skip
    config = tmp_path / "models.yaml"
    config.write_text(f"modules:\n  {SINGLE}: [sd3.5_vae, demo-clip-g.safetensors, demo-clip-l]\n")
    catalog = ModelCatalog(settings.model_copy(update={"vaes_dir": vaes, "models_config": config}))
    assert [path.name for path in catalog.resolve(SINGLE).modules] == [
        "sd3.5_vae.safetensors", "demo-clip-l.safetensors", "demo-clip-g.safetensors"]  # fmt: skip
    ours = ImageEngine(catalog, device="cpu").generate(Txt2ImgRequest(**BASE, model=SINGLE))
    assert parse_infotext(ours.infotext)["Module 1"] == "sd3.5_vae" and "Module 4" not in ours.infotext
    assert ImageEngine(catalog, device="cpu").load(SINGLE).pipe.text_encoder_3 is None
    # FLUX.1's single file: a 16-channel VAE without an `ae`/`flux` name is not taken for it
    unnamed = tmp_path / "vae-unnamed"
    unnamed.mkdir()
    shutil.copy(settings.vaes_dir / "flux-ae.safetensors", unnamed / "diffusion_pytorch_model.safetensors")
    catalog = ModelCatalog(settings.model_copy(update={"vaes_dir": unnamed}))
    with pytest.raises(DiffusionAPIError, match=r"no FLUX.1 VAE in .*usual name \(ae\* or flux\*\)"):
        catalog.resolve("demo-flux-dev-single")


def test_a_forge_module_subset_is_answered_with_the_whole_set(catalog):
    from pipelines import a1111
    from pipelines.a1111_schemas import A1111Txt2ImgRequest

    request = A1111Txt2ImgRequest(prompt="x", width=64, height=64, override_settings={
        "sd_model_checkpoint": SINGLE, "forge_additional_modules": ["C:\\forge\\text_encoder\\demo-clip-l.safetensors",
                                                                   "demo-clip-g"]})  # fmt: skip
    mapped = a1111.to_native(request, None, catalog=catalog)
    assert any("runs with its whole module set, demo-t5xxl too" in warning for warning in mapped.warnings)


def test_configs_of_another_variant_or_missing_say_what_does_not_match(engine, settings, tmp_path):
    from pipelines.models import load_pipeline

    entry = engine.catalog.resolve(SINGLE)
    configs = tmp_path / "configs"
    shutil.copytree(settings.models_dir / ".configs" / SINGLE, configs)
    config = configs / "transformer" / "config.json"
    config.write_text(config.read_text().replace('"num_layers": 2', '"num_layers": 3'))
    with pytest.raises(DiffusionAPIError, match=r"does not match its configs .* missing \(e.g. transformer_blocks"):
        load_pipeline(replace(entry, config_dir=configs), torch.device("cpu"), torch.float32)
    shutil.rmtree(configs / "tokenizer_3")
    with pytest.raises(DiffusionAPIError, match="lacks tokenizer_3"):
        load_pipeline(replace(entry, config_dir=configs), torch.device("cpu"), torch.float32)
    with pytest.raises(DiffusionAPIError, match="needs its diffusers configs and tokenizers"):
        load_pipeline(replace(entry, config_dir=None), torch.device("cpu"), torch.float32)


def test_sizes_beyond_the_transformers_position_table_are_refused_when_the_job_is_prepared(engine, settings, tmp_path):
    """SD 3's transformer places patches from a table `pos_embed_max_size` patches a side (192 for 3.5 Large:
    3072 px): a larger image is refused naming the field before it queues, not by diffusers mid-job; a hires
    scale is fitted to it. The demo's table covers what configs/limits.yaml allows."""
    from safetensors.torch import load_file, save_file

    assert engine.catalog.resolve("demo-sd35").largest_side == engine.catalog.resolve(SINGLE).largest_side == 2048
    models = tmp_path / "models"
    _copy_single(settings, models)
    state = load_file(models / f"{SINGLE}.safetensors")
    width = state["model.diffusion_model.pos_embed"].shape[-1]
    state["model.diffusion_model.pos_embed"] = torch.zeros(1, 16 * 16, width)  # 16 patches of 2x2 latents a side
    save_file(state, models / f"{SINGLE}.safetensors")
    folder = models / "sd35-small-table"
    shutil.copytree(settings.models_dir / "demo-sd35", folder)
    config = json.loads((folder / "transformer" / "config.json").read_text())
    (folder / "transformer" / "config.json").write_text(json.dumps({**config, "pos_embed_max_size": 20}))
    unsaid = models / "sd35-default-table"  # no pos_embed_max_size: SD3Transformer2DModel's default, 96
    shutil.copytree(folder, unsaid)
    (unsaid / "transformer" / "config.json").write_text(json.dumps(
        {key: value for key, value in config.items() if key != "pos_embed_max_size"}))  # fmt: skip
    catalog = ModelCatalog(settings.model_copy(update={"models_dir": models}))
    assert catalog.resolve("sd35-default-table").largest_side == 1536
    for name, largest in ((SINGLE, 256), ("sd35-small-table", 320)):
        entry = catalog.resolve(name)
        assert entry.largest_side == largest
        assert engine.prepare(Txt2ImgRequest(**{**BASE, "width": largest, "height": 64}), entry).width == largest
        with pytest.raises(InvalidRequestError) as refused:
            engine.prepare(Txt2ImgRequest(**{**BASE, "width": 64, "height": largest + 16}), entry)
        assert (refused.value.field, refused.value.status_code) == ("height", 422)
        assert f"height {largest + 16} is above the {largest} px a side model '{name}' can make" in str(refused.value)
        # A hires scale is fitted to the model's limit, as to limits.yaml's, with a warning.
        hires = engine.prepare(Txt2ImgRequest(**{**BASE, "width": largest // 2, "height": 64,
                                                 "hires": {"enabled": True, "scale": 4.0}}), entry)  # fmt: skip
        assert (hires.hires.width, hires.hires.height) == (largest, 128)
        assert f"(model '{name}' makes at most {largest} px a side); upscaled 2x" in " ".join(hires.warnings)
