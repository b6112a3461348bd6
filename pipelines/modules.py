"""Separate model parts, as Forge calls them "modules": the VAE and text-encoder files a single-file FLUX.1
transformer (`flux1-dev.safetensors`, as Black Forest Labs ships it) or SD 3.5 model (`sd3.5_large.safetensors`,
which carries its VAE but not its text encoders) runs with.

They are found where Forge and ComfyUI users keep them: the VAE (`ae.safetensors`) in `stable_diffusion/vae/`,
CLIP-L (`clip_l.safetensors`), CLIP-G (`clip_g.safetensors`) and T5-XXL (`t5xxl_fp16.safetensors`) in
`stable_diffusion/text_encoder/`; FLUX.1 and SD 3.5 share the text encoder files. Each file's kind is read from
its tensor names and shapes, without torch (the ingress lists them). A single file runs with one module of each
kind its family needs and the file lacks (`ModelFamily.single_file_modules`): the ones `configs/models.yaml`
names for it under `modules:`, else the one with the usual name (`PREFERRED_NAMES`, the family's own for VAEs),
else the first of the kind by name.
"""

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipelines import tensor_shapes
from pipelines.catalog import FileFactsCache
from pipelines.families import FAMILIES, ModelFamily
from pipelines.names import scan_named_files
from pipelines.settings import Settings

logger = logging.getLogger(__name__)

ModuleKind = Literal["vae", "clip", "clip_g", "t5"]
KIND_LABELS = {"vae": "16-channel VAE", "clip": "CLIP-L", "clip_g": "CLIP-G", "t5": "T5"}
MODULE_SUFFIXES = (".safetensors",)


@dataclass(frozen=True)
class ModuleFile:
    name: str  # the file name without extension, as Forge's infotext names it (`Module 1: ae`)
    path: Path
    kind: ModuleKind | None  # None: not a module this service reads


CLIP_L_WIDTH, CLIP_G_WIDTH = 768, 1280  # OpenAI CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 (SDXL's and SD 3's second)
CLIP_G_NAMES = ("clip_g", "clip-g", "bigg")  # how a CLIP-G file of another width (a tiny test model) is named
# Where several files of a kind qualify and configs/models.yaml names none, the names the published files have
# win (VAEs differ between families: ModelFamily.module_names has each family's VAE names).
PREFERRED_NAMES = {"clip": ("clip_l",), "clip_g": ("clip_g",), "t5": ("t5xxl",)}


def kind_of(shapes: dict, name: str = "") -> ModuleKind | None:
    """A module's kind from its tensor names and shapes. CLIP-L and CLIP-G have the same layout: their width
    tells them apart (768 and 1280); at any other width, the file's name (`CLIP_G_NAMES`)."""
    conv_in = shapes.get("decoder.conv_in.weight")
    if conv_in is not None and len(conv_in.shape) == 4 and conv_in.shape[1] == 16:
        return "vae"  # a 16-channel autoencoder (FLUX.1's), original or diffusers layout
    if any(key.endswith("SelfAttention.q.weight") for key in shapes):
        return "t5"
    embedding = next((shape for key, shape in shapes.items() if key.endswith("embeddings.token_embedding.weight")),
                     None)  # fmt: skip
    if embedding is None:
        return None
    width = embedding.shape[-1]
    if width == CLIP_G_WIDTH or (width != CLIP_L_WIDTH and any(mark in name.lower() for mark in CLIP_G_NAMES)):
        return "clip_g"
    return "clip"


def kind_of_file(path: Path) -> str:
    """The file's kind, or "" for a file that is none (or cannot be read: a partial download is no module)."""
    try:
        return kind_of(tensor_shapes.read(path) or {}, path.stem) or ""
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
                kind = self.facts.get(path, "module_kind_2", kind_of_file)  # _2: since CLIP-G is a kind
                if kind:
                    found.append(ModuleFile(Path(name).name, path, kind))
        return sorted(found, key=lambda module: module.name.lower())

    def for_family(self, family: ModelFamily, carried: Iterable[str] = (), configured: list[str] | None = None,
                   modules: list[ModuleFile] | None = None) -> tuple[ModuleFile, ...] | str:  # fmt: skip
        """The modules a single file of `family` runs with, in the family's order: one of each kind it needs
        that the file does not carry (`carried`), among `modules` (`available()` when not given); `configured`:
        names from configs/models.yaml, any order. The reason as text when a kind it needs is missing."""
        modules = self.available() if modules is None else modules
        wanted = {Path(name).stem for name in configured or []}  # `ae`, `ae.safetensors` or `sub/ae` alike
        if unknown := sorted(wanted - {module.name for module in modules}):
            return f"configs/models.yaml names modules that are not installed: {', '.join(unknown)}"
        # Another family's VAE (by its usual names) is never chosen unasked: they share a shape, not weights.
        other_vaes = tuple(name for other in FAMILIES.values() if other is not family
                           for name in other.module_names.get("vae", ()))  # fmt: skip
        chosen = []
        for kind in family.single_file_modules:
            if kind in carried:
                continue
            of_kind = [module for module in modules if module.kind == kind]
            named = [module for module in of_kind if module.name in wanted]
            usual = family.module_names.get(kind, PREFERRED_NAMES.get(kind, ()))
            preferred = [module for module in of_kind if module.name.lower().startswith(usual)]
            if kind == "vae":
                of_kind = [module for module in of_kind if not module.name.lower().startswith(other_vaes)]
            if found := named or preferred or of_kind:
                chosen.append(found[0])
            elif kind not in family.optional_modules:
                where = self.folders[0] if kind == "vae" else self.folders[1]
                return f"no {KIND_LABELS[kind]} module file in {where}"
        return tuple(chosen)
