"""The `diffusion-api` command line: real runs on the demo models, one-line errors with a non-zero exit."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pipelines.cli import main
from pipelines.infotext import parse_infotext, read_infotext


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_models_lists_label_name_family(env_settings, capsys):
    code, out, _ = run_cli(capsys, "models")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["LABEL", "NAME", "FAMILY"]
    assert any(line.split()[-2:] == ["models--demo--tiny-sdxl-base", "sdxl"] for line in lines)
    assert any(line.startswith("Demo SD1.5 ") and line.split()[-1] == "sd15" for line in lines)


@pytest.mark.parametrize("extension", ["png", "jpg", "webp", "avif", "gif"])
def test_txt2img_writes_the_format_of_the_extension_with_infotext(env_settings, capsys, tmp_path, extension):
    output = tmp_path / f"out.{extension}"
    code, out, err = run_cli(
        capsys, "txt2img", "--model", "Demo SDXL", "--prompt", "a lighthouse, café", "--negative-prompt",
        "fog", "--steps", "4", "--cfg-scale", "5.5", "--width", "64", "--height", "80", "--sampler", "Euler a",
        "--scheduler-type", "automatic", "--seed", "77", "--output", str(output),
    )  # fmt: skip
    assert code == 0, err
    assert "seed 77" in out
    image = Image.open(output)
    assert image.size == (64, 80)
    assert image.format == {"jpg": "JPEG"}.get(extension, extension.upper())
    parsed = parse_infotext(read_infotext(output.read_bytes()))
    assert parsed["Prompt"] == "a lighthouse, café"
    assert parsed["Negative prompt"] == "fog"
    assert (parsed["Steps"], parsed["CFG scale"], parsed["Seed"], parsed["Sampler"]) == (
        "4",
        "5.5",
        "77",
        "Euler a",
    )


def test_img2img_and_infotext_commands(env_settings, capsys, tmp_path):
    source = tmp_path / "in.png"
    Image.new("RGB", (90, 70), (30, 60, 90)).save(source)
    output = tmp_path / "out.png"
    code, _, err = run_cli(
        capsys, "img2img", "--image", str(source), "--prompt", "a painting", "--steps", "6", "--width", "64",
        "--height", "64", "--denoising-strength", "0.5", "--seed", "3", "--output", str(output),
    )  # fmt: skip
    assert code == 0, err
    assert Image.open(output).size == (64, 64)
    code, out, _ = run_cli(capsys, "infotext", str(output))
    assert code == 0
    assert out.startswith("a painting\nSteps: 6, ")
    assert "Denoising strength: 0.5" in out


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["txt2img", "--prompt", "x", "--steps", "0", "--output", "o.png"], "argument --steps"),
        (["txt2img", "--prompt", "x", "--steps", "many", "--output", "o.png"], "argument --steps"),
        (["txt2img", "--prompt", "x", "--width", "65", "--output", "o.png"], "argument --width"),
        (["txt2img", "--prompt", "x", "--sampler", "Euler z", "--output", "o.png"], "argument --sampler"),
        (["txt2img", "--prompt", "x", "--scheduler-type", "cubic", "--output", "o.png"],
         "argument --scheduler-type"),
        (["txt2img", "--prompt", "x", "--model", "nope", "--output", "o.png"], "argument --model"),
        (["txt2img", "--prompt", "x", "--model", "../../etc/passwd", "--output", "o.png"], "argument --model"),
        (["txt2img", "--prompt", "x", "--output", "o.bmp"], "argument --output"),
        (["txt2img", "--output", "o.png"], "--prompt"),
        (["img2img", "--prompt", "x", "--image", "/no/such/file.png", "--output", "o.png"], "argument --image"),
        (["infotext", "/no/such/file.png"], "argument IMAGE"),
        (["serve", "--config", "/no/such/serve.yaml"], "argument --config"),
        (["serve", "--stop-timeout", "0"], "argument --stop-timeout"),
        (["frobnicate"], "invalid choice"),
        ([], "command"),
    ],
)  # fmt: skip
def test_bad_arguments_give_one_line_and_exit_2(env_settings, capsys, tmp_path, argv, expected):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("diffusion-api: error: ")
    assert expected in err
    assert "Traceback" not in err


def test_infotext_of_image_without_metadata(capsys, tmp_path):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    code, _, err = run_cli(capsys, "infotext", str(plain))
    assert code == 2 and "no generation parameters" in err


def test_console_script_entry_point(env_settings):
    script = os.path.join(os.path.dirname(sys.executable), "diffusion-api")
    completed = subprocess.run([script, "txt2img", "--prompt", "x", "--steps", "999", "--output", "o.png"],
                               capture_output=True, text=True, timeout=120)  # fmt: skip
    assert completed.returncode == 2
    assert completed.stderr.strip().startswith("diffusion-api: error: argument --steps")
    assert "Traceback" not in completed.stderr


def test_loras_lists_name_scale_family(env_settings, capsys):
    code, out, _ = run_cli(capsys, "loras")
    assert code == 0
    rows = [line.split() for line in out.splitlines()]
    assert rows[0] == ["NAME", "SCALE", "FAMILY"]
    assert ["demo-sdxl-peft", "1.0", "sdxl"] in rows and ["demo-sd15-unet-only", "1.0", "sd15"] in rows


def test_txt2img_on_flux_with_forges_guidance_flags(env_settings, capsys, tmp_path):
    output = tmp_path / "flux.png"
    code, _, err = run_cli(capsys, "txt2img", "--prompt", "x", "--model", "Demo FLUX.1-dev", "--steps", "3",
                           "--width", "64", "--height", "64", "--distilled-cfg-scale", "5",
                           "--output", str(output))  # fmt: skip
    assert code == 0, err
    params = parse_infotext(read_infotext(output.read_bytes()))
    assert (params["CFG scale"], params["Distilled CFG Scale"], params["Sampler"]) == ("1.0", "5.0", "Euler")
    code, _, err = run_cli(capsys, "txt2img", "--prompt", "x", "--model", "Demo FLUX.1-dev", "--width", "72",
                           "--output", str(output))  # fmt: skip
    assert code == 2 and "--width" in err and "multiple of 16 for FLUX.1" in err


def test_txt2img_with_a_lora_flag(env_settings, capsys, tmp_path):
    output = tmp_path / "lora.png"
    code, out, err = run_cli(capsys, "txt2img", "--prompt", "x", "--steps", "3", "--width", "64", "--height", "64",
                             "--lora", "demo-sd15-kohya:0.7", "--output", str(output))  # fmt: skip
    assert code == 0, err
    assert "Lora hashes" in parse_infotext(read_infotext(output.read_bytes()))
    code, _, err = run_cli(capsys, "txt2img", "--prompt", "x", "--lora", "nope", "--output", str(output))
    assert code == 2 and err.startswith("diffusion-api: error: argument --lora: unknown LoRA 'nope'")


def test_lora_check_one_pair_and_report_file(env_settings, capsys, tmp_path):
    lora = env_settings.loras_dir / "demo-sdxl-peft.safetensors"
    report = tmp_path / "report.txt"
    code, out, err = run_cli(capsys, "lora-check", "--model", "Demo SD1.5", "--lora", str(lora),
                             "--output", str(report))  # fmt: skip
    assert code == 0, err
    assert "Total Tests: 1" in out and "Incompatible: 1" in out and "MODEL: Demo SD1.5" in out
    assert "    Reason: 'demo-sdxl-peft' is an SDXL LoRA; model 'demo-sd15' is SD1.5" in out
    assert report.read_text(encoding="utf-8") == out


def test_lora_check_every_model_and_lora(env_settings, capsys, tmp_path):
    code, out, err = run_cli(capsys, "lora-check", "--lora-dir", str(env_settings.loras_dir))
    assert code == 0, err
    # 10 demo models x 7 demo LoRAs: 3 SD1.5 models x 3 SD1.5 LoRAs, SDXL's, 3 FLUX.1 models x 2, 2 SD 3.5 fit
    assert "Total Tests: 70" in out and "Compatible: 18" in out and "Success Rate: 25.7%" in out
    assert "Demo SDXL Refiner: 0/7 (0.0%)" in out and "Demo FLUX.1-dev: 2/7 (28.6%)" in out
    code, _, err = run_cli(capsys, "lora-check", "--lora-dir", str(tmp_path / "missing"))
    assert code == 2 and "--lora-dir: no such folder" in err


def test_txt2img_reads_emphasis_and_the_tail_of_long_prompts(env_settings, capsys, tmp_path):
    head = ", ".join(["a mountain"] * 40)
    prompts = {"plain": "a fox", "weight_one": "(a fox:1.0)", "weighted": "(a fox:1.6)",
               "lake": f"{head}, a lake", "desert": f"{head}, a desert"}  # fmt: skip
    images = {}
    for name, prompt in prompts.items():
        output = tmp_path / f"{name}.png"
        code, _, err = run_cli(capsys, "txt2img", "--prompt", prompt, "--steps", "4", "--width", "64", "--height",
                               "64", "--seed", "5", "--output", str(output))  # fmt: skip
        assert code == 0 and "tokens" not in err, err
        images[name] = Image.open(output).tobytes()
    assert images["plain"] == images["weight_one"] != images["weighted"]
    assert images["lake"] != images["desert"]
    assert parse_infotext(read_infotext((tmp_path / "weighted.png").read_bytes()))["Prompt"] == "(a fox:1.6)"


def test_vaes_listing_and_txt2img_with_a_vae(env_settings, capsys, tmp_path):
    code, out, _ = run_cli(capsys, "vaes")
    assert code == 0 and out.splitlines()[1].split()[0] == "demo-vae-ft"
    output = tmp_path / "vae.png"
    code, _, err = run_cli(capsys, "txt2img", "--prompt", "a fox", "--steps", "3", "--width", "64", "--height", "64",
                           "--vae", "demo-vae-ft", "--output", str(output))  # fmt: skip
    assert code == 0, err
    assert parse_infotext(read_infotext(output.read_bytes()))["VAE"] == "demo-vae-ft.safetensors"
    code, _, err = run_cli(capsys, "txt2img", "--prompt", "a fox", "--vae", "nope", "--output", str(output))
    assert code != 0 and "unknown vae 'nope'" in err


def test_embeddings_listing(env_settings, capsys):
    code, out, _ = run_cli(capsys, "embeddings")
    assert code == 0
    assert [line.split() for line in out.splitlines()[1:]] == [["demo-style", "sd15"], ["demo-xl-style", "sdxl"]]


def test_txt2img_with_a_controlnet_flag(env_settings, capsys, tmp_path):
    hint = tmp_path / "hint.png"
    Image.new("RGB", (64, 64), "white").save(hint)
    output = tmp_path / "controlled.png"
    code, _, err = run_cli(capsys, "txt2img", "--prompt", "x", "--steps", "3", "--width", "64", "--height", "64",
                           "--controlnet", f"model=demo-sd15-canny,image={hint},module=invert,weight=0.7",
                           "--output", str(output))  # fmt: skip
    assert code == 0, err
    unit = parse_infotext(read_infotext(output.read_bytes()))["ControlNet 0"]
    assert unit.startswith("Module: invert, Model: demo-sd15-canny [") and "Weight: 0.7" in unit
    code, _, err = run_cli(capsys, "txt2img", "--prompt", "x", "--controlnet", f"model=nope,image={hint}",
                           "--output", str(output))  # fmt: skip
    assert code == 2 and err.startswith(
        "diffusion-api: error: argument --controlnet: unknown ControlNet or IP-Adapter model 'nope'"
    )
    code, _, err = run_cli(capsys, "txt2img", "--prompt", "x", "--controlnet", "model", "--output", str(output))
    assert code == 2 and "key=value" in err


def test_txt2img_with_an_ip_adapter_unit_of_two_references(env_settings, capsys, tmp_path):
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    Image.new("RGB", (40, 40), "orange").save(first)
    Image.new("RGB", (40, 40), "navy").save(second)
    outputs = {}
    for name, images in (("one", f"image={first}"), ("two", f"image={first},image={second}")):
        outputs[name] = tmp_path / f"{name}.png"
        unit = f"model=ip-adapter_demo_sd15,module=ip-adapter-auto,{images}"
        code, _, err = run_cli(capsys, "txt2img", "--prompt", "x", "--steps", "3", "--width", "64", "--height", "64",
                               "--seed", "3", "--controlnet", unit, "--output", str(outputs[name]))  # fmt: skip
        assert code == 0, err
    unit = parse_infotext(read_infotext(outputs["two"].read_bytes()))["ControlNet 0"]
    assert unit.startswith("Module: ip-adapter-auto, Model: ip-adapter_demo_sd15 [")
    one, two = (np.asarray(Image.open(path).convert("RGB")).astype(int) for path in outputs.values())
    assert np.abs(one - two).mean() > 0.5  # the second reference was read too
