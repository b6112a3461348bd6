"""VAE choice (pipelines/vaes.py): listing, lookup, the three on-disk formats, pixels and infotext."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipelines.catalog import ModelCatalog
from pipelines.demo import DEMO_VAE_FILE
from pipelines.generate import ImageEngine
from pipelines.infotext import parse_infotext
from pipelines.schemas import Img2ImgRequest, Txt2ImgRequest
from pipelines.vaes import UnknownVaeError, VaeLibrary
from tests.unit.test_generate import as_base64_png

BASE = {"prompt": "a red fox", "steps": 4, "width": 64, "height": 64, "seed": 11}


def pixels(result) -> np.ndarray:
    return np.asarray(result.image).astype(np.int16)


def test_the_library_lists_and_resolves_vaes(settings):
    library = VaeLibrary(settings)
    # The demo FLUX.1 VAE (a module of its single file) is listed too: on SD models it is a 422 naming `vae`.
    assert [(vae.name, vae.path.name) for vae in library.available()] == [
        ("demo-vae-ft", DEMO_VAE_FILE),
        ("flux-ae", "flux-ae.safetensors"),
    ]
    assert library.resolve("demo-vae-ft") == library.resolve(DEMO_VAE_FILE) == library.resolve("DEMO-VAE-FT")
    assert library.resolve("Automatic") is None and library.resolve("None") is None and library.resolve(None) is None
    with pytest.raises(UnknownVaeError, match="demo-vae-ft") as error:
        library.resolve("vae-ft-mse-840000-ema-pruned")
    assert error.value.status_code == 404


def test_a_chosen_vae_changes_the_image_and_never_leaks_into_the_next_job(engine):
    own = engine.generate(Txt2ImgRequest(**BASE))
    chosen = engine.generate(Txt2ImgRequest(**BASE, vae="demo-vae-ft"))
    after = engine.generate(Txt2ImgRequest(**BASE))
    automatic = engine.generate(Txt2ImgRequest(**BASE, vae="Automatic"))
    assert not np.array_equal(pixels(own), pixels(chosen))
    assert np.array_equal(pixels(own), pixels(after)) and np.array_equal(pixels(own), pixels(automatic))
    params = parse_infotext(chosen.infotext)
    assert params["VAE"] == DEMO_VAE_FILE and len(params["VAE hash"]) == 10
    assert "VAE" not in parse_infotext(own.infotext)
    line = chosen.infotext.splitlines()[-1]
    assert line.index("Model: ") < line.index("VAE hash: ") < line.index("VAE: ") < line.index("RNG: ")


def test_img2img_and_hires_fix_use_the_chosen_vae(engine):
    start = as_base64_png(engine.generate(Txt2ImgRequest(**BASE)).image)
    own = engine.generate(Img2ImgRequest(**BASE, image=start, denoising_strength=0.5))
    chosen = engine.generate(Img2ImgRequest(**BASE, image=start, denoising_strength=0.5, vae="demo-vae-ft"))
    assert not np.array_equal(pixels(own), pixels(chosen))
    hires = {"enabled": True, "scale": 1.5, "steps": 2, "upscaler": "Lanczos"}
    upscaled = engine.generate(Txt2ImgRequest(**BASE, hires=hires, vae="demo-vae-ft"))
    assert upscaled.image.size == (96, 96) and parse_infotext(upscaled.infotext)["VAE"] == DEMO_VAE_FILE


def test_pt_files_and_diffusers_folders_give_the_same_vae(settings, tmp_path):
    state = load_file(str(settings.vaes_dir / DEMO_VAE_FILE))
    torch.save(state, tmp_path / "as-pt.pt")
    engine = ImageEngine(ModelCatalog(settings.model_copy(update={"vaes_dir": tmp_path})), device="cpu")
    loaded = engine.load("Demo SD1.5")
    vae = engine.vaes.load(engine.vaes.resolve("as-pt"), loaded.pipe.vae)
    vae.save_pretrained(tmp_path / "as-folder")
    assert [item.name for item in engine.vaes.available()] == ["as-folder", "as-pt"]
    from_pt = engine.generate(Txt2ImgRequest(**BASE, vae="as-pt"))
    from_folder = engine.generate(Txt2ImgRequest(**BASE, vae="as-folder"))
    assert np.array_equal(pixels(from_pt), pixels(from_folder))
