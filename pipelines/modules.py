"""Separate model parts, as Forge calls them "modules": the VAE and text-encoder files a single-file FLUX.1
transformer (`flux1-dev.safetensors`, as Black Forest Labs ships it) runs with.

They are found where Forge users keep them: the VAE (`ae.safetensors`) in `stable_diffusion/vae/`, CLIP-L
(`clip_l.safetensors`) and T5-XXL (`t5xxl_fp16.safetensors`) in `stable_diffusion/text_encoder/`. Each file's
kind is read from its tensor names and shapes, without torch (the ingress lists them): a 16-channel VAE, a CLIP
text encoder, a T5 encoder. A FLUX.1 single file runs with one of each: the ones `configs/models.yaml` names
for it under `modules:`, else the first of each kind by name.
"""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipelines import tensor_shapes
from pipelines.catalog import FileFactsCache
from pipelines.names import scan_named_files
from pipelines.settings import Settings

logger = logging.getLogger(__name__)

ModuleKind = Literal["vae", "clip", "t5"]
FLUX_MODULE_KINDS: tuple[ModuleKind, ...] = ("vae", "clip", "t5")  # in the order a FLUX.1 pipeline takes them
MODULE_SUFFIXES = (".safetensors",)


@dataclass(frozen=True)
class ModuleFile:
    name: str  # the file name without extension, as Forge's infotext names it (`Module 1: ae`)
    path: Path
    kind: ModuleKind | None  # None: not a module this service reads


CLIP_G_WIDTH = 1280  # OpenCLIP ViT-bigG (SDXL's and SD 3's second encoder): not FLUX.1's CLIP-L
# Where several files of a kind qualify and configs/models.yaml names none, the names Forge's files have win.
PREFERRED_NAMES = {"vae": ("ae", "flux"), "clip": ("clip_l",), "t5": ("t5xxl",)}


def kind_of(shapes: dict) -> ModuleKind | None:
    """A module's kind from its tensor names and shapes."""
    conv_in = shapes.get("decoder.conv_in.weight")
    if conv_in is not None and len(conv_in.shape) == 4 and conv_in.shape[1] == 16:
        return "vae"  # a 16-channel autoencoder (FLUX.1's), original or diffusers layout
    if any(key.endswith("SelfAttention.q.weight") for key in shapes):
        return "t5"
    embedding = next((shape for key, shape in shapes.items() if key.endswith("embeddings.token_embedding.weight")),
                     None)  # fmt: skip
    if embedding is not None and embedding.shape[-1] != CLIP_G_WIDTH:
        return "clip"
    return None


def _kind_of_file(path: Path) -> str:
    """The file's kind, or "" for a file that is none (or cannot be read: a partial download is no module)."""
    try:
        return kind_of(tensor_shapes.read(path) or {}) or ""
    except Exception as error:  # safetensors raises its own error type for a truncated or foreign file
        logger.warning("module file %s skipped: %s", path, error)
        return ""


class ModuleLibrary:
    def __init__(self, settings: Settings, facts: FileFactsCache | None = None):
        self.folders = (settings.vaes_dir, settings.text_encoder_dir)
        self.allow_external_links = settings.allow_external_links
        self.facts = facts or FileFactsCache(settings.cache_dir / "file_facts.json")

    def available(self) -> list[ModuleFile]:
        """Every module file of a kind this service reads, by name."""
        found = []
        for folder in self.folders:
            for name, path in scan_named_files(folder, MODULE_SUFFIXES, self.allow_external_links):
                kind = self.facts.get(path, "module_kind", _kind_of_file)
                if kind:
                    found.append(ModuleFile(Path(name).name, path, kind))
        return sorted(found, key=lambda module: module.name.lower())

    def for_flux(self, configured: list[str] | None = None,
                 modules: list[ModuleFile] | None = None) -> tuple[ModuleFile, ...] | str:  # fmt: skip
        """The VAE, CLIP and T5 a FLUX.1 single file runs with (`configured`: names from configs/models.yaml,
        any order), among `modules` (`available()` when not given); the reason as text when one is missing."""
        modules = self.available() if modules is None else modules
        wanted = {Path(name).stem for name in configured or []}  # `ae`, `ae.safetensors` or `sub/ae` alike
        if unknown := sorted(wanted - {module.name for module in modules}):
            return f"configs/models.yaml names modules that are not installed: {', '.join(unknown)}"
        chosen = []
        for kind in FLUX_MODULE_KINDS:
            of_kind = [module for module in modules if module.kind == kind]
            named = [module for module in of_kind if module.name in wanted]
            preferred = [module for module in of_kind if module.name.lower().startswith(PREFERRED_NAMES[kind])]
            if not of_kind:
                where = self.folders[0] if kind == "vae" else self.folders[1]
                return f"no {'16-channel VAE' if kind == 'vae' else kind.upper()} module file in {where}"
            chosen.append((named or preferred or of_kind)[0])
        return tuple(chosen)
