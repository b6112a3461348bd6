"""The depth annotators (pipelines/annotators.py) on real transformers models: the demo's tiny Depth Anything
folder and a tiny DPT written here for MiDaS. Listed only when installed; the map has the extension's size
(short side at processor_res, not padded), is 8-bit gray (scaled over the padded image, as the extension's), and
follows the image; a job's
unit uses exactly the map the module makes; a missing model is a 4xx naming the module."""

import numpy as np
import pytest
from PIL import Image

from pipelines.annotators import AnnotatorLibrary
from pipelines.errors import DiffusionAPIError
from pipelines.schemas import Txt2ImgRequest

BASE = {"prompt": "a lighthouse", "steps": 4, "width": 64, "height": 64, "seed": 5, "model": "demo-sd15",
        "fileType": "png"}  # fmt: skip


def gradient(size=(100, 80)) -> Image.Image:
    ramp = np.linspace(0, 255, size[0], dtype=np.float32)[None, :, None].repeat(size[1], 0).repeat(3, 2)
    noise = np.random.default_rng(2).normal(0, 20, ramp.shape)
    return Image.fromarray((ramp + noise).clip(0, 255).astype(np.uint8))


def test_only_installed_annotators_are_offered(settings, tmp_path):
    assert AnnotatorLibrary(settings).available() == ["depth_anything"]
    empty = AnnotatorLibrary(settings.model_copy(update={"annotators_dir": tmp_path}))
    assert empty.available() == []
    with pytest.raises(DiffusionAPIError) as refused:
        empty.preprocessor("depth_anything")
    assert refused.value.status_code == 404 and "depth_anything" in refused.value.message


def test_a_depth_anything_map_has_the_extensions_size_and_range(settings):
    module = AnnotatorLibrary(settings, device="cpu").preprocessor("depth_anything")
    depth = module.run(gradient(), 64)
    assert depth.size == (80, 64) and depth.mode == "RGB"  # short side 80 -> 64, the 64-padding cropped off
    pixels = np.asarray(depth)
    assert pixels.max() > pixels.min() and (pixels[..., 0] == pixels[..., 2]).all()  # gray, 0-255 over the padding
    assert np.array_equal(pixels, np.asarray(module.run(gradient(), 64)))  # the same image, the same map
    assert not np.array_equal(pixels, np.asarray(module.run(gradient().transpose(Image.FLIP_LEFT_RIGHT), 64)))


def test_midas_runs_through_its_folders_processor(settings, tmp_path):
    """MiDaS's DPT (transformers' takes square inputs: its processor's size), the map at the extension's size."""
    import torch
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    config = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=48, image_size=64,
                       patch_size=8, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 32, 32],
                       fusion_hidden_size=16, reassemble_factors=[4, 2, 1, 0.5])  # fmt: skip
    torch.manual_seed(3)
    DPTForDepthEstimation(config).eval().save_pretrained(tmp_path / "depth_midas")
    DPTImageProcessor(size={"height": 64, "width": 64}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(
        tmp_path / "depth_midas"
    )
    library = AnnotatorLibrary(settings.model_copy(update={"annotators_dir": tmp_path}), device="cpu")
    assert library.available() == ["depth"]
    depth = np.asarray(library.preprocessor("depth_midas").run(gradient(), 64))
    assert depth.shape == (64, 80, 3) and depth.max() > depth.min()


def test_a_unit_with_a_depth_module_uses_the_modules_map(engine, settings):
    photo = gradient((64, 64))
    depth = AnnotatorLibrary(settings, device="cpu").preprocessor("depth_anything").run(photo, 64)

    def unit(image: Image.Image, module: str) -> dict:
        import base64
        import io

        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return {"model": "demo-sd15-canny", "module": module, "image": base64.b64encode(buffer.getvalue()).decode(),
                "processor_res": 64}  # fmt: skip

    by_module = engine.generate(Txt2ImgRequest(**BASE, controlnet=[unit(photo, "depth_anything")]))
    by_map = engine.generate(Txt2ImgRequest(**BASE, controlnet=[unit(depth, "none")]))
    assert np.array_equal(np.asarray(by_module.image), np.asarray(by_map.image))
    assert "Module: depth_anything, Model: demo-sd15-canny [" in by_module.infotext


def test_a_job_prepared_again_uses_its_stored_map_and_needs_no_annotator_run(engine, settings):
    """A job dispatched again after a restart is prepared from its record: its unit's map as stored at
    submission is used (the depth model, on the Upscaler in the service, need not answer again)."""
    import base64
    import io

    from pipelines.control_plan import map_files
    from pipelines.errors import TemporarilyUnavailableError

    buffer = io.BytesIO()
    gradient((64, 64)).save(buffer, format="PNG")
    unit = {"model": "demo-sd15-canny", "module": "depth_anything", "processor_res": 64,
            "image": base64.b64encode(buffer.getvalue()).decode()}  # fmt: skip
    request = Txt2ImgRequest(**BASE, controlnet=[unit])
    first = engine.prepare(request)
    stored = map_files(first.controls)
    assert list(stored) == ["controlnet.0.map"]

    def unavailable(*_):
        raise TemporarilyUnavailableError("the Upscaler is restarting")

    annotators = engine.controlnets.annotators
    annotators.runner = unavailable
    try:
        with pytest.raises(TemporarilyUnavailableError):
            engine.prepare(request)
        from pipelines.prepare import prepare_job

        again = prepare_job(request, engine.catalog.resolve("demo-sd15"), engine.loras, engine.catalog,
                            engine.upscalers, engine.vaes, engine.embeddings, stored, engine.controlnets)  # fmt: skip
    finally:
        annotators.runner = None
    assert np.array_equal(np.asarray(again.controls[0].image), np.asarray(first.controls[0].image))
    assert again.controls[0].infotext() == first.controls[0].infotext()
