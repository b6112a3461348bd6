"""Teaches schemathesis the string formats of the API it cannot know, so that it does not count a refusal of
what the format rules out as a refused valid request. `schemathesis.toml` in the repository root loads this
file, so a plain `schemathesis run` from there uses it too.

- `image-base64`: a base64-encoded image file (PNG, JPEG or WebP), with or without a `data:image/...;base64,`
  prefix. Without it, schemathesis would fill `image` with base64 of random text, which is base64 but no image.
- `idempotency-key`: the `Idempotency-Key` header, a key a client makes for one submission (printable ASCII).
  A key used again with another body is a 422 by design, which only the history of earlier requests decides;
  a fuzzer reusing its short strings (`0`, 255 zeros: the coverage phase's boundaries, which no format
  changes) across unrelated bodies would be reported as refused valid data. So a valid key is sent as it was
  generated on its first use, and replaced by a fresh random one when it comes again with another body, as a
  client makes a new key for a new request (the replay itself is tested in tests/serve/). Invalid
  keys, and every negative case (a missing `Authorization`, say), are sent as they are: their refusals are what
  the negative checks expect.
"""

import base64
import io
import json
import re
import uuid

import schemathesis
from hypothesis import strategies as st
from PIL import Image

IMAGE_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


def _encoded_image(width: int, height: int, colour: tuple[int, int, int], file_format: str, as_data_url: bool) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format=file_format)
    text = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"data:{IMAGE_FORMATS[file_format]};base64,{text}" if as_data_url else text


IMAGE_BASE64 = st.builds(
    _encoded_image,
    width=st.integers(1, 96),
    height=st.integers(1, 96),
    colour=st.tuples(*[st.integers(0, 255)] * 3),
    file_format=st.sampled_from(sorted(IMAGE_FORMATS)),
    as_data_url=st.booleans(),
)

schemathesis.openapi.format("image-base64", IMAGE_BASE64)
schemathesis.openapi.format("idempotency-key", st.uuids().map(lambda key: f"key-{key.hex}"))
VALID_KEY = re.compile(r"[\x20-\x7e]{1,255}")
KEY_USES: dict[str, str] = {}  # key -> the first request it was sent with (operation, caller, body)


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    key = (case.headers or {}).get("Idempotency-Key")
    if not isinstance(key, str) or not VALID_KEY.fullmatch(key):
        return
    if case.meta is None or not case.meta.generation.mode.is_positive:
        return  # only a valid request's refusal counts against the service; a negative case is left as made
    use = json.dumps([case.method, case.path, case.headers.get("Authorization"), case.body], sort_keys=True,
                     default=str)  # fmt: skip
    if KEY_USES.setdefault(key, use) != use:
        fresh = (uuid.uuid4().hex * 8)[: max(len(key), 32)]  # 32 random hex digits at least, at most 255 in all
        KEY_USES[fresh] = use
        case.headers["Idempotency-Key"] = fresh
