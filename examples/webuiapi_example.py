"""The service through webuiapi, the A1111 client library: it speaks A1111's API (`/sdapi/v1`), which this
service serves, so scripts written for A1111 run unchanged.

    pip install webuiapi
    python examples/webuiapi_example.py --prompt "a red fox in the snow"

The service's URL comes from DIFFUSION_API_URL (default http://127.0.0.1:8000); an API key, if the service has
keys on, from DIFFUSION_API_KEY (sent as A1111's basic-auth password). Exits non-zero when generation fails.
"""

import argparse
import os
import sys
from urllib.parse import urlsplit

import webuiapi


def main() -> int:
    parser = argparse.ArgumentParser(description="Generate with webuiapi against the Diffusion API")
    parser.add_argument("--prompt", default="a red fox in the snow, detailed")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--out", default="example_webuiapi")
    args = parser.parse_args()

    url = urlsplit(os.environ.get("DIFFUSION_API_URL", "http://127.0.0.1:8000"))
    api = webuiapi.WebUIApi(host=url.hostname, port=url.port or (443 if url.scheme == "https" else 80),
                            use_https=url.scheme == "https")  # fmt: skip
    if os.environ.get("DIFFUSION_API_KEY"):
        api.set_auth("api", os.environ["DIFFUSION_API_KEY"])

    print("models:", ", ".join(model["title"] for model in api.get_sd_models()), file=sys.stderr)
    print("samplers:", len(api.get_samplers()), file=sys.stderr)
    try:
        result = api.txt2img(prompt=args.prompt, negative_prompt="blurry", steps=args.steps, width=args.size,
                             height=args.size, batch_size=args.batch_size, sampler_name="DPM++ 2M",
                             scheduler="Karras", seed=7)  # fmt: skip
    except RuntimeError as error:  # webuiapi raises it for a non-200 answer: (status, body)
        print(f"generation failed: {error}", file=sys.stderr)
        return 1
    for index, image in enumerate(result.images):
        image.save(f"{args.out}-{index}.png")
    print(f"saved {len(result.images)} image(s) as {args.out}-N.png, seeds {result.info['all_seeds']}", file=sys.stderr)
    print(result.info["infotexts"][0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
