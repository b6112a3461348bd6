"""IP-Adapter in the engine, on the demo model, adapters and image encoder through the real loaders: a unit
gives exactly the pixels of plain diffusers' own IP-Adapter path (`load_ip_adapter` + `ip_adapter_image`);
scale 0 gives the plain pixels and a reference image changes them; the plus adapter (hidden states) runs;
several reference images; batched jobs with different references keep their solo pixels; the model is as
loaded after the job; bad units are 4xx naming them; the infotext says each unit as the extension does."""

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.controlnets import ControlNetLibrary
from pipelines.errors import DiffusionAPIError
from pipelines.infotext import parse_infotext
from pipelines.ipadapters import IpAdapterLibrary, single_file_config
from pipelines.samplers import build_scheduler, resolve_sampler
from pipelines.schemas import Img2ImgRequest, Txt2ImgRequest
from tests.unit.test_controlnet import as_base64, pixels

BASE = {"prompt": "a lighthouse", "steps": 4, "width": 64, "height": 64, "seed": 5, "model": "demo-sd15",
        "fileType": "png"}  # fmt: skip
PLAIN, PLUS = "ip-adapter_demo_sd15", "ip-adapter-plus_demo_sd15"


def reference(seed: int = 1, size=(48, 40)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def unit(**fields) -> dict:
    return {"model": PLAIN, "module": "ip-adapter_clip_sd15", "image": as_base64(reference()), **fields}


def test_the_demo_ip_adapters_are_listed_with_the_controlnets(settings):
    library = ControlNetLibrary(settings)
    found = {entry.name: (entry.family, entry.kind) for entry in library.ip_adapters.available()}
    assert found == {PLAIN: ("sd15", "embeds"), PLUS: ("sd15", "hidden")}
    assert {PLAIN, PLUS} <= {entry.name for entry in library.all_models()}
    assert [encoder.name for encoder in library.ip_adapters.encoders()] == ["clip_h"]


def test_a_unit_gives_the_pixels_of_diffusers_own_ip_adapter_path(engine, settings):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPVisionModelWithProjection

    ours = engine.generate(Txt2ImgRequest(**BASE, controlnet=[unit(weight=0.8)]))
    loaded = engine.load("demo-sd15")
    pipe = StableDiffusionPipeline.from_pretrained(settings.models_dir / "demo-sd15", safety_checker=None)
    pipe.image_encoder = CLIPVisionModelWithProjection.from_pretrained(settings.clip_vision_dir / "clip_h")
    pipe.load_ip_adapter(str(settings.ipadapter_dir), subfolder="", weight_name=f"{PLAIN}.safetensors",
                         image_encoder_folder=None, local_files_only=True)  # fmt: skip
    pipe.set_ip_adapter_scale(0.8)
    pipe.scheduler = build_scheduler(resolve_sampler("DPM++ 2M Karras", None), loaded.scheduler_config)
    theirs = pipe(prompt=["a lighthouse"], negative_prompt=[""], ip_adapter_image=[reference()], num_inference_steps=4,
                  guidance_scale=7.0, width=64, height=64,
                  generator=[torch.Generator("cpu").manual_seed(5)]).images[0]  # fmt: skip
    assert np.abs(np.asarray(theirs).astype(int) - pixels(ours)).max() <= 1
    plain = engine.generate(Txt2ImgRequest(**BASE))
    assert np.abs(pixels(plain) - pixels(ours)).mean() > 1  # the reference changed the picture


def test_scale_zero_gives_the_plain_pixels_and_a_reference_changes_them(engine):
    plain = pixels(engine.generate(Txt2ImgRequest(**BASE)))
    assert np.array_equal(plain, pixels(engine.generate(Txt2ImgRequest(**BASE, controlnet=[unit(weight=0.0)]))))
    first = pixels(engine.generate(Txt2ImgRequest(**BASE, controlnet=[unit()])))
    other = pixels(engine.generate(Txt2ImgRequest(**BASE, controlnet=[unit(image=as_base64(reference(7)))])))
    assert np.abs(first - plain).mean() > 1 and np.abs(first - other).mean() > 0.5
    # Nothing of the job stays on the model: the next plain job has the plain pixels again.
    assert np.array_equal(plain, pixels(engine.generate(Txt2ImgRequest(**BASE))))


def test_the_plus_adapter_and_several_references(engine):
    plain = pixels(engine.generate(Txt2ImgRequest(**BASE)))
    plus = pixels(engine.generate(Txt2ImgRequest(**BASE, controlnet=[unit(model=PLUS, module="ip-adapter-auto")])))
    assert np.abs(plus - plain).mean() > 1
    one = pixels(engine.generate(Txt2ImgRequest(**BASE, controlnet=[unit()])))
    two = engine.generate(Txt2ImgRequest(**BASE, controlnet=[unit(image=[as_base64(reference()),
                                                                         as_base64(reference(9))])]))  # fmt: skip
    assert np.abs(pixels(two) - one).mean() > 0.5


def test_the_guidance_window_and_img2img(engine):
    whole = pixels(engine.generate(Txt2ImgRequest(**BASE, controlnet=[unit()])))
    plain = pixels(engine.generate(Txt2ImgRequest(**BASE)))
    late = pixels(engine.generate(Txt2ImgRequest(**BASE, controlnet=[unit(guidance_start=0.5)])))
    assert not np.array_equal(late, whole) and not np.array_equal(late, plain)
    init = as_base64(reference(3, (64, 64)))
    common = {**BASE, "image": init, "denoising_strength": 0.8}
    implicit = engine.generate(Img2ImgRequest(**common, controlnet=[{"model": PLAIN, "module": "ip-adapter_clip_h"}]))
    explicit = engine.generate(Img2ImgRequest(**common, controlnet=[unit(image=init)]))
    assert np.array_equal(pixels(implicit), pixels(explicit))


def test_jobs_with_the_same_reference_batch_and_keep_their_solo_pixels(engine):
    requests = [Txt2ImgRequest(**{**BASE, "seed": seed}, controlnet=[unit()]) for seed in (1, 2)]
    loaded = engine.load("demo-sd15")
    jobs = [engine.prepare(request, loaded.entry) for request in requests]
    other = engine.prepare(Txt2ImgRequest(**BASE, controlnet=[unit(image=as_base64(reference(2)))]), loaded.entry)
    assert jobs[0].batch_key() == jobs[1].batch_key() != other.batch_key()  # diffusers shares one reference
    batched = engine.run_batch(loaded, jobs)
    solo = [engine.generate(request) for request in requests]
    for together, alone in zip(batched, solo, strict=True):
        assert np.abs(pixels(together) - pixels(alone)).max() <= 2


def test_an_ip_adapter_with_a_controlnet_and_the_infotext(engine):
    edges = Image.new("RGB", (64, 64))
    edges.paste((255, 255, 255), (16, 16, 48, 48))
    control = {"model": "demo-sd15-canny", "image": as_base64(edges)}
    both = engine.generate(Txt2ImgRequest(**BASE, controlnet=[control, unit()]))
    only_control = engine.generate(Txt2ImgRequest(**BASE, controlnet=[control]))
    assert np.abs(pixels(both) - pixels(only_control)).mean() > 0.5
    parsed = parse_infotext(both.infotext)
    hash8 = parsed["ControlNet 1"].split("[")[1][:8]
    assert parsed["ControlNet 1"] == (f"Module: ip-adapter_clip_sd15, Model: {PLAIN} [{hash8}], Weight: 1.0, "
                                      "Resize Mode: Crop and Resize, Guidance Start: 0.0, Guidance End: 1.0, "
                                      "Pixel Perfect: False, Control Mode: Balanced")  # fmt: skip


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"module": "canny"}, "controlnet[0].module", "needs a ControlNet model"),
        ({"model": "demo-sd15-canny"}, "controlnet[0].module", "needs an IP-Adapter model"),
        ({"module": "ip-adapter_clip_sdxl"}, "controlnet[0].module", "needs a clip_g encoder"),
        ({"model": "nope"}, "controlnet[0].model", "installed: "),
    ],
)
def test_bad_units_are_4xx_naming_the_unit(engine, fields, field, words):
    with pytest.raises(DiffusionAPIError) as caught:
        engine.prepare(Txt2ImgRequest(**BASE, controlnet=[unit(**fields)]))
    assert 400 <= caught.value.status_code < 500 and caught.value.field == field and words in caught.value.message


def test_an_sdxl_job_refuses_the_sd15_adapter(engine):
    with pytest.raises(DiffusionAPIError) as caught:
        engine.prepare(Txt2ImgRequest(**{**BASE, "model": "Demo SDXL"}, controlnet=[unit()]))
    assert caught.value.field == "controlnet[0].model" and "IP-Adapter" in caught.value.message


def test_an_encoder_of_another_width_is_refused_naming_the_module(settings, tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from pipelines.demo_adapters import ENCODER_CONFIG

    CLIPVisionModelWithProjection(CLIPVisionConfig(**{**ENCODER_CONFIG, "projection_dim": 16})).save_pretrained(
        tmp_path / "clip_g"
    )
    library = IpAdapterLibrary(settings.model_copy(update={"clip_vision_dir": tmp_path,
                                                           "cache_dir": tmp_path / "cache"}))  # fmt: skip
    adapter = next(item for item in library.available() if item.name == PLAIN)
    with pytest.raises(DiffusionAPIError) as caught:
        library.encoder_for(adapter, "ip-adapter_clip_g", field="controlnet[0].module")
    assert caught.value.field == "controlnet[0].module" and "reads 24-wide image features" in caught.value.message
    with pytest.raises(DiffusionAPIError, match="an encoder 24 wide"):
        library.encoder_for(adapter, "ip-adapter-auto", field="controlnet[0].module")


def test_a_single_file_encoder_reads_as_the_folder(settings, tmp_path):
    """A1111's `clip_h.pth` layout: one file of transformers' tensors, its config read from the shapes."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionModelWithProjection

    folder = CLIPVisionModelWithProjection.from_pretrained(settings.clip_vision_dir / "clip_h").eval()
    state = {key: value.contiguous() for key, value in folder.state_dict().items()}
    config = single_file_config(state)
    assert config["image_size"] == folder.config.image_size and config["num_hidden_layers"] == 2
    target = tmp_path / "clip_vision"
    target.mkdir()
    save_file(state, target / "clip_h.safetensors")
    library = IpAdapterLibrary(settings.model_copy(update={"clip_vision_dir": target,
                                                           "cache_dir": tmp_path / "cache"}))  # fmt: skip
    (encoder,) = library.encoders()
    adapter = next(item for item in library.available() if item.name == PLAIN)
    folder_library = IpAdapterLibrary(settings)
    (folder_encoder,) = folder_library.encoders()
    images = [reference()]
    single = library.encode(encoder, adapter, images, torch.device("cpu"), torch.float32)[0]
    same = folder_library.encode(folder_encoder, adapter, images, torch.device("cpu"), torch.float32)[0]
    assert torch.equal(single, same)


def test_control_models_are_cached_within_the_unets_size(engine):
    """ControlNets and image encoders stay loaded only within the budget the engine gives them (the job's UNet's
    size): beyond it the least recently used go, never the running job's own."""
    from pipelines.controlnets import module_bytes

    edges = Image.new("RGB", (64, 64))
    library = engine.controlnets
    library.clear()
    engine.generate(Txt2ImgRequest(**BASE, controlnet=[{"model": "demo-sd15-canny", "image": as_base64(edges)}]))
    (first,) = library._loaded.values()
    engine.generate(Txt2ImgRequest(**BASE, controlnet=[{"model": "control_demo_sd15_canny", "image": as_base64(edges)},
                                                       unit()]))  # fmt: skip
    unet = engine.load("demo-sd15").pipe.unet
    held = library.held()
    (second,) = library._loaded.values()
    ((encoder, _),) = library.ip_adapters._encoders.values()
    # Both ControlNets and the encoder would not fit in the tiny UNet's size: the least recent one was dropped.
    assert sum(map(module_bytes, (first, second, encoder))) > module_bytes(unet)
    assert [path.rsplit("/", 1)[-1] for path in held] == ["control_demo_sd15_canny.safetensors", "clip_h"]
    assert module_bytes(second) + module_bytes(encoder) <= module_bytes(unet)
    library.fit_budget(0, keep=set(held))  # a running job's own models stay, whatever the budget
    assert library.held() == held
    library.fit_budget(0)
    assert library.held() == []


def test_an_ip_adapter_with_a_lora_hires_fix_and_previews_and_the_model_after(engine):
    plain = pixels(engine.generate(Txt2ImgRequest(**BASE)))
    guided = pixels(engine.generate(Txt2ImgRequest(**BASE, controlnet=[unit()])))
    with_lora = engine.generate(Txt2ImgRequest(**BASE, controlnet=[unit()], loras=["demo-sd15-peft"], preview=True))
    assert with_lora.warnings == [] and np.abs(pixels(with_lora) - guided).mean() > 0.5
    hires = {**BASE, "hires": {"enabled": True, "scale": 1.5, "steps": 2, "denoising_strength": 0.6}}
    both, low = (pixels(engine.generate(Txt2ImgRequest(**hires, controlnet=[unit(hr_option=option)])))
                 for option in ("Both", "Low res only"))  # fmt: skip
    assert both.shape == (96, 96, 3) and not np.array_equal(both, low)
    assert np.array_equal(plain, pixels(engine.generate(Txt2ImgRequest(**BASE))))  # nothing stayed on the model


def test_an_sdxl_ip_adapter_and_the_refiner(engine, tmp_path, monkeypatch):
    """An SDXL adapter (written here for the demo SDXL's UNet; its family from the file's modelspec metadata),
    through the SDXL pipelines, with the refiner finishing the job (the base part is guided)."""
    from safetensors.torch import save_file

    from pipelines.demo_adapters import ENCODER_CONFIG, flat_state_dict, plain_ip_adapter

    unet = engine.load("Demo SDXL").pipe.unet
    state = flat_state_dict(plain_ip_adapter(unet, ENCODER_CONFIG["projection_dim"], seed=8))
    save_file(state, tmp_path / "ip-adapter_demo_sdxl.safetensors",
              metadata={"modelspec.architecture": "stable-diffusion-xl-v1-base/ip-adapter"})  # fmt: skip
    monkeypatch.setattr(engine.controlnets.ip_adapters, "folder", tmp_path)
    sdxl = {**BASE, "model": "Demo SDXL", "sampler_name": "Euler"}
    sdxl_unit = unit(model="ip-adapter_demo_sdxl", module="ip-adapter-auto")
    plain = pixels(engine.generate(Txt2ImgRequest(**sdxl)))
    guided = pixels(engine.generate(Txt2ImgRequest(**sdxl, controlnet=[sdxl_unit])))
    assert np.abs(guided - plain).mean() > 1
    refined = engine.generate(Txt2ImgRequest(**sdxl, controlnet=[sdxl_unit], refiner_checkpoint="Demo SDXL Refiner",
                                             refiner_switch_at=0.5))  # fmt: skip
    assert "Refiner" in refined.parameters and not np.array_equal(pixels(refined), guided)
    assert np.array_equal(plain, pixels(engine.generate(Txt2ImgRequest(**sdxl))))


def test_ip_adapters_in_the_controlnet_folder_as_a1111_keeps_them(settings, tmp_path):
    import shutil

    controlnet = tmp_path / "controlnet"
    shutil.copytree(settings.controlnet_dir, controlnet)
    shutil.copy(settings.ipadapter_dir / f"{PLAIN}.safetensors", controlnet / "ip-adapter_in_controlnet.safetensors")
    (controlnet / "notes.bin").write_bytes(b"not a model")
    library = ControlNetLibrary(settings.model_copy(update={"controlnet_dir": controlnet,
                                                            "cache_dir": tmp_path / "cache"}))  # fmt: skip
    found = library.resolve("ip-adapter_in_controlnet")
    assert found.kind == "embeds" and found in library.ip_adapters.available()
    assert "ip-adapter_in_controlnet" not in {entry.name for entry in library.available()}  # not a ControlNet
    with pytest.raises(DiffusionAPIError, match="neither a ControlNet nor an IP-Adapter"):
        library.resolve("notes")


def test_the_kinds_read_from_the_files(tmp_path):
    """Full-face adapters read the hidden states (an MLP ending in a norm, `proj.3`); FaceID ones (InsightFace
    embeddings) are refused."""
    from safetensors.torch import save_file

    from pipelines.ipadapters import ip_adapter_facts

    zeros = torch.zeros
    layers = {"ip_adapter.1.to_k_ip.weight": zeros(320, 768), "ip_adapter.1.to_v_ip.weight": zeros(320, 768)}
    files = {
        "full_face": {"image_proj.proj.0.weight": zeros(1280, 1280), "image_proj.proj.2.weight": zeros(768, 1280),
                      "image_proj.proj.3.weight": zeros(768)},
        "faceid_portrait": {"image_proj.proj.0.weight": zeros(1024, 512), "image_proj.proj.2.weight": zeros(3072, 1024),
                            "image_proj.norm.weight": zeros(768)},
        "faceid": {"image_proj.proj.weight": zeros(3072, 512), "ip_adapter.1.to_k_lora.down.weight": zeros(4, 320)},
    }  # fmt: skip
    kinds = {}
    for name, tensors in files.items():
        save_file({**layers, **tensors}, tmp_path / f"{name}.safetensors")
        kinds[name] = ip_adapter_facts(tmp_path / f"{name}.safetensors")
    assert kinds["full_face"] == {"family": "sd15", "kind": "hidden", "image_width": 1280}
    assert kinds["faceid_portrait"]["kind"] == kinds["faceid"]["kind"] == "faceid"


def test_an_ip_adapter_with_a_lora_on_a_model_with_fused_qkv(catalog):
    """A LoRA unfuses the QKV projections, which sets the attention processors anew: the IP-Adapter is loaded
    after it, and both come off after the job (the fused processors back)."""
    from pipelines.generate import ImageEngine
    from pipelines.speed import SpeedOptions

    engine = ImageEngine(catalog, device="cpu", max_loaded_models=1, speed=SpeedOptions(fuse_qkv=True))
    plain = pixels(engine.generate(Txt2ImgRequest(**BASE)))
    processors = {
        name: type(processor) for name, processor in engine.load("demo-sd15").pipe.unet.attn_processors.items()
    }
    both = engine.generate(Txt2ImgRequest(**BASE, controlnet=[unit(model=PLUS, module="ip-adapter-auto")],
                                          loras=["demo-sd15-peft"]))  # fmt: skip
    assert both.warnings == [] and np.abs(pixels(both) - plain).mean() > 1
    after = engine.load("demo-sd15").pipe.unet.attn_processors
    assert {name: type(processor) for name, processor in after.items()} == processors
    assert np.array_equal(plain, pixels(engine.generate(Txt2ImgRequest(**BASE))))
