"""Textual-inversion embeddings (pipelines/embeddings.py) on the demo models: files, family, pixels, infotext."""

import json
import subprocess
import sys

import numpy as np

from pipelines.embeddings import EmbeddingLibrary, read_vectors
from pipelines.infotext import parse_infotext
from pipelines.schemas import Txt2ImgRequest
from pipelines.settings import PROJECT_ROOT

BASE = {"steps": 4, "width": 64, "height": 64, "seed": 17}


def pixels(result) -> np.ndarray:
    return np.asarray(result.image).astype(np.int16)


def test_the_library_reads_both_formats_and_their_families(settings):
    found = {item.name: item for item in EmbeddingLibrary(settings).available()}
    assert {name: item.family for name, item in found.items()} == {"demo-style": "sd15", "demo-xl-style": "sdxl"}
    assert read_vectors(found["demo-style"].path)["clip_l"].shape[0] == 2  # two vectors, A1111's .pt layout
    assert set(read_vectors(found["demo-xl-style"].path)) == {"clip_l", "clip_g"}


def test_an_embedding_named_in_a_prompt_changes_the_image_and_is_unloaded_after(engine):
    plain = engine.generate(Txt2ImgRequest(prompt="a fox in the snow", **BASE))
    styled = engine.generate(Txt2ImgRequest(prompt="a fox in the snow, Demo-Style", **BASE))
    negative = engine.generate(Txt2ImgRequest(prompt="a fox in the snow", negative_prompt="demo-style", **BASE))
    after = engine.generate(Txt2ImgRequest(prompt="a fox in the snow", **BASE))
    assert not np.array_equal(pixels(plain), pixels(styled))
    assert not np.array_equal(pixels(plain), pixels(negative))
    assert np.array_equal(pixels(plain), pixels(after))
    assert engine.load("Demo SD1.5").pipe.tokenizer.added_tokens_encoder.keys().isdisjoint({"<ti-demo-style>"})
    params = parse_infotext(styled.infotext)
    assert params["TI hashes"].startswith("demo-style: ") and len(params["TI hashes"].split(": ")[1]) == 12
    assert params["Prompt"] == "a fox in the snow, Demo-Style"  # as written


def test_weighted_embeddings_and_sdxl_files(engine):
    styled = engine.generate(Txt2ImgRequest(prompt="a fox, demo-style", **BASE))
    stronger = engine.generate(Txt2ImgRequest(prompt="a fox, (demo-style:1.4)", **BASE))
    assert not np.array_equal(pixels(styled), pixels(stronger))
    plain_xl = engine.generate(Txt2ImgRequest(prompt="a fox", model="Demo SDXL", **BASE))
    styled_xl = engine.generate(Txt2ImgRequest(prompt="a fox demo-xl-style", model="Demo SDXL", **BASE))
    assert not np.array_equal(pixels(plain_xl), pixels(styled_xl))
    assert "demo-xl-style: " in parse_infotext(styled_xl.infotext)["TI hashes"]


def test_an_embedding_of_the_other_family_is_skipped_with_a_warning_not_read_as_text(engine):
    result = engine.generate(Txt2ImgRequest(prompt="a fox demo-xl-style", **BASE))
    without = engine.generate(Txt2ImgRequest(prompt="a fox", **BASE))
    assert any("'demo-xl-style' is for sdxl models" in warning for warning in result.warnings)
    assert np.array_equal(pixels(result), pixels(without))  # the name is removed, not encoded as words
    assert "TI hashes" not in parse_infotext(result.infotext)


def test_a_batch_mate_that_names_no_embedding_keeps_its_pixels(engine):
    loaded = engine.load("Demo SD1.5")
    jobs = [engine.prepare(Txt2ImgRequest(prompt="a fox, demo-style", **BASE), loaded.entry),
            engine.prepare(Txt2ImgRequest(prompt="a harbour", **{**BASE, "seed": 5}), loaded.entry)]  # fmt: skip
    batched = engine.run(loaded, jobs)
    alone = engine.generate(Txt2ImgRequest(prompt="a harbour", **{**BASE, "seed": 5}))
    assert np.abs(pixels(batched[1]) - pixels(alone)).max() <= 2
    assert "TI hashes" not in parse_infotext(batched[1].infotext)


def test_an_embedding_of_another_width_is_skipped_with_its_reason(engine, settings, tmp_path):
    import torch

    from pipelines.catalog import ModelCatalog
    from pipelines.generate import ImageEngine

    torch.save({"string_to_param": {"*": torch.ones(1, 768)}}, tmp_path / "wide.pt")
    (tmp_path / "broken.safetensors").write_bytes(b"not a file")
    other = ImageEngine(ModelCatalog(settings.model_copy(update={"embeddings_dir": tmp_path})), device="cpu")
    assert {item.name: item.family for item in other.embeddings.available()} == {"broken": "unknown", "wide": "sd15"}
    result = other.generate(Txt2ImgRequest(prompt="a fox wide", **BASE))
    plain = other.generate(Txt2ImgRequest(prompt="a fox", **BASE))
    assert any("'wide' was skipped: its vectors are 768 wide" in warning for warning in result.warnings)
    assert np.array_equal(pixels(result), pixels(plain))  # the name was dropped, not read as a word
    assert "TI hashes" not in parse_infotext(result.infotext)


def test_a_weight_of_minus_one_is_a_weight_not_a_break():
    from pipelines.prompts import parse_emphasis

    spans = parse_emphasis("a (cat:-1) BREAK b")
    expected = [("a ", 1.0, False), ("cat", -1.0, False), ("", 1.0, False), ("BREAK", -1.0, True), ("b", 1.0, False)]
    assert [(span.text, span.weight, span.is_break) for span in spans] == expected


def test_the_family_is_read_from_shapes_without_torch(tmp_path):
    """The ingress lists embeddings and checks prompts: the shapes come from the files' headers and pickles,
    never by running torch (a fresh interpreter reads both demo formats and has not imported it)."""
    from pipelines.demo import create_demo_embeddings
    from pipelines.embeddings import read_shapes

    create_demo_embeddings(tmp_path)
    for path in sorted(tmp_path.iterdir()):
        expected = {key: tuple(tensor.shape) for key, tensor in read_vectors(path).items()}
        assert {key: shape.shape for key, shape in read_shapes(path).items()} == expected
    probe = (
        "import sys, json; from pathlib import Path; from pipelines.embeddings import read_shapes; "
        f"folder = Path({str(tmp_path)!r}); "
        "shapes = {p.name: {k: v.shape for k, v in read_shapes(p).items()} for p in folder.iterdir()}; "
        "print(json.dumps(['torch' in sys.modules, sorted(shapes)]))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=PROJECT_ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    torch_loaded, names = json.loads(done.stdout)
    assert torch_loaded is False and len(names) == len(list(tmp_path.iterdir())) >= 2
