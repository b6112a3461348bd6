"""Signed, expiring links to a job's image files: the OpenAI door's `response_format: url`.

Clients such as Open WebUI and LibreChat download an image URL later, without the caller's API key, so the
link itself is the access, as an object store's presigned URL: it names the job, the image and when it expires,
and carries an HMAC-SHA256 of those under a secret every ingress replica shares (the app argument
`image_link_secret`, else one made once and kept in the job store). Changing the secret revokes every link.
"""

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass

from pipelines.errors import ForbiddenError

LINKS_PATH = "/v1/images/files"
LINK_SECRET_SETTING = "image_link_secret"
LINK_SECRET_ENV = "DIFFUSION_API_IMAGE_LINK_SECRET"  # the app argument's stand-in


def signature(secret: bytes, job_id: str, index: int, expires: int) -> str:
    digest = hmac.new(secret, f"{job_id}/{index}/{expires}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class ImageLinks:
    ttl_s: float  # how long a link works
    public_url: str | None = None  # the service's address as its clients reach it (else the request's own)
    configured_secret: str | None = None  # the app argument `image_link_secret` (else the job store's)

    def url(self, secret: bytes, base_url: str, job_id: str, index: int, file_type: str,
            now: float | None = None) -> str:  # fmt: skip
        """The absolute link to image `index` of the job (`base_url`: the request's, unless `public_url`)."""
        expires = int((now if now is not None else time.time()) + self.ttl_s)
        base = (self.public_url or base_url).rstrip("/")
        signed = signature(secret, job_id, index, expires)
        return f"{base}{LINKS_PATH}/{job_id}/{index}.{file_type}?expires={expires}&signature={signed}"

    @staticmethod
    def check(secret: bytes, job_id: str, index: int, expires: int, signed: str, now: float | None = None) -> None:
        """ForbiddenError unless the link was made here and has not expired."""
        if not hmac.compare_digest(signature(secret, job_id, index, expires), signed):
            raise ForbiddenError("this image link's signature is not valid (not made here, altered, or the "
                                 "service's link secret changed)", field="signature")  # fmt: skip
        if (now if now is not None else time.time()) > expires:
            raise ForbiddenError("this image link has expired; ask for the image again (or GET "
                                 f"/queue/{job_id}/image?index={index} with the API key)", field="expires")  # fmt: skip
