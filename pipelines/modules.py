"""Separate model parts, as Forge calls them "modules": the VAE and text-encoder files a single-file FLUX.1
transformer (`flux1-dev.safetensors`, as Black Forest Labs ships it) or SD 3.5 model (`sd3.5_large.safetensors`,
which carries its VAE but not its text encoders) runs with.

They are found where Forge and ComfyUI users keep them: the VAE (`ae.safetensors`) in `stable_diffusion/vae/`,
CLIP-L (`clip_l.safetensors`), CLIP-G (`clip_g.safetensors`) and T5-XXL (`t5xxl_fp16.safetensors`) in
`stable_diffusion/text_encoder/`; FLUX.1 and SD 3.5 share the text encoder files. Each file's kind is read from
its tensor names and shapes, without torch (the ingress lists them). A single file runs with one module of each
kind its family needs and the file lacks (`ModelFamily.single_file_modules`): the ones `configs/models.yaml`
names for it under `modules:`, else the one with the usual name (`PREFERRED_NAMES`), else the first of the kind
by name; a VAE only by the family's own usual names (`ModelFamily.module_names`) or the config.
"""

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipelines import tensor_shapes
from pipelines.catalog import FileFactsCache
from pipelines.families import ModelFamily
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
# How a CLIP file narrower than CLIP-L (a tiny test model) says which it is; a wider one of another width (SD 2's
# ViT-H, 1024) is not a module these families run.
CLIP_NAMES = {"clip": ("clip_l", "clip-l"), "clip_g": ("clip_g", "clip-g", "bigg")}
# Where several files of a kind qualify and configs/models.yaml names none, the names the published files have
# win (VAEs differ between families: ModelFamily.module_names has each family's VAE names, and a VAE is only
# taken by them or by the config).
PREFERRED_NAMES = {"clip": ("clip_l",), "clip_g": ("clip_g",), "t5": ("t5xxl",)}


def module_stem(name: str) -> str:
    """A module named as configs/models.yaml or a Forge client names it (`ae`, `ae.safetensors`, a path, a
    Windows path) as its file's name without the extension: dots inside a name stay (`sd3.5_vae`)."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    for suffix in MODULE_SUFFIXES:
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return base


def kind_of(shapes: dict, name: str = "") -> ModuleKind | None:
    """A module's kind from its tensor names and shapes. CLIP-L and CLIP-G have the same layout: their width
    tells them apart (768 and 1280); below those, the file's name (`CLIP_NAMES`)."""
    conv_in = shapes.get("decoder.conv_in.weight")
    if conv_in is not None and len(conv_in.shape) == 4 and conv_in.shape[1] == 16:
        return "vae"  # a 16-channel autoencoder (FLUX.1's or SD 3's), original or diffusers layout
    if any(key.endswith("SelfAttention.q.weight") for key in shapes):
        return "t5"
    embedding = next((shape for key, shape in shapes.items() if key.endswith("embeddings.token_embedding.weight")),
                     None)  # fmt: skip
    if embedding is None:
        return None
    width = embedding.shape[-1]
    if width in (CLIP_L_WIDTH, CLIP_G_WIDTH):
        return "clip" if width == CLIP_L_WIDTH else "clip_g"
    if width > CLIP_L_WIDTH:  # SD 2's ViT-H (1024) and other encoders these families do not run
        return None
    lowered = name.lower()
    return next((kind for kind, marks in CLIP_NAMES.items() if any(mark in lowered for mark in marks)), None)


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
                # by name too: at widths other than the published ones, the name decides (two links to one file)
                kind = self.facts.get(path, f"module_kind_3:{path.stem}", kind_of_file)
                if kind:
                    found.append(ModuleFile(Path(name).name, path, kind))
        return sorted(found, key=lambda module: module.name.lower())

    def for_family(self, family: ModelFamily, carried: Iterable[str] = (), configured: list[str] | None = None,
                   modules: list[ModuleFile] | None = None) -> tuple[ModuleFile, ...] | str:  # fmt: skip
        """The modules a single file of `family` runs with, in the family's order, among `modules` (`available()`
        when not given); the reason as text when a kind it needs is missing.

        `configured` (names from configs/models.yaml, any order) wins, also over a part the file carries
        (`carried`), and is then the whole set of optional kinds: SD 3.5 runs without T5 unless it is named.
        Otherwise a kind the file lacks is the one with its usual name, else the first of the kind by name; but a
        VAE only by the family's usual names, since FLUX.1's and SD 3's have one shape and other weights."""
        modules = self.available() if modules is None else modules
        wanted = {module_stem(name) for name in configured or []}
        if unknown := sorted(wanted - {module.name for module in modules}):
            return f"configs/models.yaml names modules that are not installed: {', '.join(unknown)}"
        chosen = []
        for kind in family.single_file_modules:
            of_kind = [module for module in modules if module.kind == kind]
            named = [module for module in of_kind if module.name in wanted]
            usual = family.module_names.get(kind, PREFERRED_NAMES.get(kind, ()))
            preferred = [module for module in of_kind if module.name.lower().startswith(usual)]
            if named:
                chosen.append(named[0])
            elif kind in carried or (kind in family.optional_modules and configured is not None):
                continue
            elif found := preferred or ([] if kind == "vae" else of_kind):
                chosen.append(found[0])
            elif kind not in family.optional_modules:
                return self._missing(family, kind, of_kind)
        return tuple(chosen)

    def _missing(self, family: ModelFamily, kind: str, of_kind: list[ModuleFile]) -> str:
        where = self.folders[0] if kind == "vae" else self.folders[1]
        if kind != "vae" or not of_kind:
            return f"no {KIND_LABELS[kind]} module file in {where}"
        names = " or ".join(f"{name}*" for name in family.module_names.get("vae", ()))
        return (f"no {family.label} VAE in {where}: a 16-channel VAE is taken only by its usual name ({names}) or "
                f"when configs/models.yaml names it under 'modules:' ({', '.join(m.name for m in of_kind)} found, not "
                f"taken: FLUX.1's and SD 3's VAEs share a shape, not weights)")  # fmt: skip
