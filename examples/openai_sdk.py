"""The service through OpenAI's own Python SDK: its Images API (`/v1`) is served here, so code written for
OpenAI runs unchanged with another base URL.

    pip install openai
    python examples/openai_sdk.py --prompt "a red fox in the snow"

It lists the models, generates two images (with native fields beside OpenAI's, through `extra_body`), fetches
one more as a signed URL, edits the first image inside a mask, makes a variation, and streams a generation's
partial images. The service's URL comes from DIFFUSION_API_URL (default http://127.0.0.1:8000); an API key, if
the service has keys on, from DIFFUSION_API_KEY. Exits non-zero when a call fails.
"""

import argparse
import base64
import io
import os
import sys
import urllib.request

import openai
from PIL import Image, ImageDraw


def save(b64_json: str, path: str) -> Image.Image:
    with open(path, "wb") as file:
        file.write(base64.b64decode(b64_json))
    return Image.open(path)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description="Generate with the openai SDK against the Diffusion API")
    parser.add_argument("--prompt", default="a red fox in the snow, detailed")
    parser.add_argument("--model", default="Demo SD1.5", help="a checkpoint's name or label (GET /v1/models)")
    parser.add_argument("--size", default="512x512")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default="example_openai")
    args = parser.parse_args()

    base_url = os.environ.get("DIFFUSION_API_URL", "http://127.0.0.1:8000").rstrip("/") + "/v1"
    client = openai.OpenAI(base_url=base_url, api_key=os.environ.get("DIFFUSION_API_KEY") or "keys-are-off")
    native = {"negative_prompt": "blurry", "steps": args.steps, "seed": 7}  # any /txt2img field, as extra_body
    try:
        print("models:", ", ".join(model.id for model in client.models.list()), file=sys.stderr)
        generated = client.images.with_raw_response.generate(model=args.model, prompt=args.prompt, n=2,
                                                             size=args.size, extra_body=native)  # fmt: skip
        print(f"job {generated.headers['X-Job-Id']} (GET /queue/{{job_id}})", file=sys.stderr)
        saved = [save(image.b64_json, f"{args.out}-{index}.png") for index, image in enumerate(generated.parse().data)]
        first = saved[0]
        linked = client.images.generate(model=args.model, prompt=args.prompt, size=args.size,
                                        response_format="url", extra_body=native)  # fmt: skip
        with urllib.request.urlopen(linked.data[0].url) as answer, open(f"{args.out}-url.png", "wb") as file:
            file.write(answer.read())  # a signed link: no API key needed

        mask = Image.new("RGBA", first.size, (0, 0, 0, 255))  # OpenAI's masks: transparent = repaint
        width, height = first.size
        ImageDraw.Draw(mask).ellipse((width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=(0, 0, 0, 0))
        edited = client.images.edit(model=args.model, image=("fox.png", png_bytes(first), "image/png"),
                                    mask=("mask.png", png_bytes(mask), "image/png"), prompt="a snowy owl",
                                    extra_body=native)  # fmt: skip
        save(edited.data[0].b64_json, f"{args.out}-edit.png")
        varied = client.images.create_variation(model=args.model, image=("fox.png", png_bytes(first), "image/png"),
                                                extra_body=native)  # fmt: skip
        save(varied.data[0].b64_json, f"{args.out}-variation.png")

        partials = 0
        for event in client.images.generate(model=args.model, prompt=args.prompt, size=args.size, stream=True,
                                            partial_images=2, extra_body=native):  # fmt: skip
            if event.type == "image_generation.partial_image":
                save(event.b64_json, f"{args.out}-partial-{event.partial_image_index}.png")
                partials += 1
            elif event.type == "image_generation.completed":
                save(event.b64_json, f"{args.out}-streamed.png")
    except openai.APIError as error:  # the service's message, in OpenAI's error shape
        status = getattr(error, "status_code", "no answer")
        print(f"call failed ({status}, {error.code or error.type}): {error.message}", file=sys.stderr)
        return 1
    print(f"saved {args.out}-*.png (2 generated, 1 by URL, an edit, a variation, {partials} partial image(s) and "
          "the streamed one)", file=sys.stderr)  # fmt: skip
    print(first.info.get("parameters", ""))  # the A1111 infotext every image carries
    return 0


if __name__ == "__main__":
    sys.exit(main())
