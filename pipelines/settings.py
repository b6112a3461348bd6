"""Paths and defaults, from environment variables with defaults that need no configuring for the demo."""

import os
from pathlib import Path

from pydantic import BaseModel

PROJECT_ROOT = Path(__file__).resolve().parent.parent
VERSION = "0.1.0"


def _env_path(name: str, default: Path) -> Path:
    value = os.environ.get(name)
    return Path(value).expanduser().resolve() if value else default


class Settings(BaseModel):
    """Where things live. Every path can be overridden with a `DIFFUSION_API_*` environment variable."""

    models_dir: Path
    extra_models_dir: Path  # optional second folder (the seed's `models/`); ignored when missing
    loras_dir: Path
    upscalers_dir: Path
    vaes_dir: Path
    embeddings_dir: Path
    controlnet_dir: Path  # ControlNet models (A1111 single files and diffusers folders)
    ipadapter_dir: Path  # IP-Adapter models (h94's files)
    clip_vision_dir: Path  # the CLIP image encoders IP-Adapters read reference images with
    annotators_dir: Path  # the weights of the ControlNet annotators that need them (depth)
    text_encoder_dir: Path  # text encoders as separate files (CLIP-L, CLIP-G, T5 of FLUX.1 and SD 3.5 single files)
    outputs_dir: Path  # local things the service keeps by default: the job database, images unless outputs_url
    # Images in storage every node reaches (an fsspec URL: s3://bucket/prefix, file:///mnt/shared/...), given as
    # `outputs_dir` (app argument or DIFFUSION_API_OUTPUTS_DIR); None: images go in outputs_dir.
    outputs_url: str | None = None
    cache_dir: Path  # hashes and family detection results, keyed by file mtime
    models_config: Path  # configs/models.yaml: labels, default model
    # Symlinks in the model/LoRA/upscaler folders that point outside them are skipped unless this is on
    # (DIFFUSION_API_ALLOW_EXTERNAL_LINKS=1), so nothing outside the configured folders is ever read by name.
    allow_external_links: bool = False

    @classmethod
    def from_env(cls, root: Path | None = None) -> "Settings":
        root = _env_path("DIFFUSION_API_HOME", root or PROJECT_ROOT)
        sd = root / "stable_diffusion"
        outputs = os.environ.get("DIFFUSION_API_OUTPUTS_DIR", "")
        outputs_url = outputs if "://" in outputs else None  # then the local things stay in root/outputs
        return cls(
            models_dir=_env_path("DIFFUSION_API_MODELS_DIR", sd / "models"),
            extra_models_dir=_env_path("DIFFUSION_API_EXTRA_MODELS_DIR", root / "models"),
            loras_dir=_env_path("DIFFUSION_API_LORAS_DIR", sd / "loras"),
            upscalers_dir=_env_path("DIFFUSION_API_UPSCALERS_DIR", sd / "upscalers"),
            vaes_dir=_env_path("DIFFUSION_API_VAES_DIR", sd / "vae"),
            embeddings_dir=_env_path("DIFFUSION_API_EMBEDDINGS_DIR", sd / "embeddings"),
            controlnet_dir=_env_path("DIFFUSION_API_CONTROLNET_DIR", sd / "controlnet"),
            ipadapter_dir=_env_path("DIFFUSION_API_IPADAPTER_DIR", sd / "ipadapter"),
            clip_vision_dir=_env_path("DIFFUSION_API_CLIP_VISION_DIR", sd / "clip_vision"),
            annotators_dir=_env_path("DIFFUSION_API_ANNOTATORS_DIR", sd / "annotators"),
            text_encoder_dir=_env_path("DIFFUSION_API_TEXT_ENCODER_DIR", sd / "text_encoder"),
            outputs_dir=root / "outputs" if outputs_url else _env_path("DIFFUSION_API_OUTPUTS_DIR", root / "outputs"),
            outputs_url=outputs_url,
            cache_dir=_env_path("DIFFUSION_API_CACHE_DIR", sd / ".cache"),
            models_config=_env_path("DIFFUSION_API_MODELS_CONFIG", root / "configs" / "models.yaml"),
            allow_external_links=os.environ.get("DIFFUSION_API_ALLOW_EXTERNAL_LINKS", "") in ("1", "true", "yes"),
        )

    @property
    def outputs_location(self) -> str:
        """Where images are stored: the URL when one is configured, else the local folder."""
        return self.outputs_url or str(self.outputs_dir)
