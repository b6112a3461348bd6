"""Inpainting through HTTP: the native `/img2img` mask fields, the inpainting checkpoint in `/models`, and
A1111 clients (the real `webuiapi`) sending a mask to `/sdapi/v1/img2img`."""

import base64
import io

import numpy as np
import webuiapi
from PIL import Image, ImageDraw, ImageFilter

from pipelines.infotext import parse_infotext
from tests.serve.conftest import PORT, wait_for_job

SIZE = (96, 64)
FAST = {"prompt": "a window", "steps": 4, "width": SIZE[0], "height": SIZE[1], "seed": 3, "fileType": "png"}


def input_image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(1).integers(0, 256, (SIZE[1], SIZE[0], 3), dtype=np.uint8))


def mask_image() -> Image.Image:
    mask = Image.new("L", SIZE, 0)
    ImageDraw.Draw(mask).ellipse((30, 12, 66, 52), fill=255)
    return mask


def as_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def decoded(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB"))


def kept(blur: int = 4) -> np.ndarray:
    return np.asarray(mask_image().filter(ImageFilter.GaussianBlur(blur))) == 0


def test_models_say_which_checkpoint_is_for_inpainting(client):
    models = {model["name"]: model for model in client.get("/models").json()["models"]}
    assert models["demo-sd15-inpainting"]["inpainting"] is True and models["demo-sd15"]["inpainting"] is False


def test_a_masked_img2img_job_keeps_every_pixel_outside_the_blurred_mask(client):
    body = {**FAST, "image": as_base64(input_image()), "mask": as_base64(mask_image()), "inpainting_fill": 2}
    for model in ("demo-sd15", "demo-sd15-inpainting"):
        job = wait_for_job(client, client.post("/img2img", json={**body, "model": model}).json()["job_id"])
        assert job["state"] == "done", job
        result, before = decoded(job["image"]), np.asarray(input_image())
        assert np.array_equal(result[kept()], before[kept()])
        assert (result[~kept()] != before[~kept()]).mean() > 0.5
        params = parse_infotext(job["infotext"])
        assert (params["Mask blur"], params["Masked content"], params["Model"]) == ("4", "latent noise", model)


def test_bad_mask_fields_are_4xx_naming_the_field(client):
    body = {**FAST, "image": as_base64(input_image())}
    for field, value in [("inpainting_fill", 5), ("mask_blur", 1000), ("inpaint_full_res", "yes")]:
        answer = client.post("/img2img", json={**body, "mask": as_base64(mask_image()), field: value})
        assert answer.status_code == 422 and answer.json()["detail"][0]["loc"] == ["body", field], answer.text
    broken = client.post("/img2img", json={**body, "mask": "bm90IGFuIGltYWdl"})
    assert broken.status_code == 422 and "'mask'" in broken.json()["error"]


def test_webuiapi_inpaints_with_a1111s_defaults(service):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=PORT)
    result = api.img2img(images=[input_image()], mask_image=mask_image(), prompt="a window", steps=4, seed=3,
                         width=SIZE[0], height=SIZE[1], denoising_strength=0.9,
                         override_settings={"sd_model_checkpoint": "demo-sd15-inpainting"})  # fmt: skip
    result_pixels = np.asarray(result.image.convert("RGB"))
    assert result.image.size == SIZE
    assert np.array_equal(result_pixels[kept()], np.asarray(input_image())[kept()])
    info = result.info
    assert info["is_using_inpainting_conditioning"] is True and info["warnings"] == []
    # webuiapi sends A1111's API defaults: "Only masked" with no padding, masked content "fill"
    assert info["extra_generation_params"]["Inpaint area"] == "Only masked"
    assert info["extra_generation_params"]["Masked content"] == "fill"
    assert parse_infotext(info["infotexts"][0])["Masked area padding"] == "0"
