"""VAE files users choose per job (A1111's `sd_vae`): `stable_diffusion/vae/`, in A1111's single-file layout
(`.safetensors`, `.pt`, `.ckpt`) or as diffusers folders.

A single file is converted with diffusers' own LDM-to-diffusers VAE conversion into a VAE built from the
model's own VAE configuration (the architecture SD1.5 and SDXL VAEs share; the model's scaling factor), so
nothing is fetched from the hub. Loaded VAEs are kept in a small per-process cache. torch is imported only to
load one (the ingress resolves VAE names with this module and must not load torch).
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines import tensor_shapes
from pipelines.catalog import FileFactsCache, sha256_of_file
from pipelines.devices import execution_device
from pipelines.errors import DiffusionAPIError, ModelLoadError
from pipelines.names import find_named_file, scan_files_and_folders
from pipelines.settings import Settings
from pipelines.state_dicts import read_state_dict

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)
VAE_SUFFIXES = (".safetensors", ".pt", ".ckpt")
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
AUTOMATIC_NAMES = ("", "automatic", "none")  # the model's own VAE (A1111's "Automatic" and "None")


class UnknownVaeError(DiffusionAPIError):
    status_code = 404


@dataclass(frozen=True)
class VaeFile:
    name: str  # as listed and requested: the path under the folder, without extension
    path: Path  # the file, or the diffusers folder

    @property
    def weights_file(self) -> Path:
        if self.path.is_file():
            return self.path
        return next(self.path / name for name in DIFFUSERS_WEIGHTS if (self.path / name).exists())

    @property
    def infotext_name(self) -> str:
        """A1111's `VAE:` value: the file's name (with its extension), or the folder's."""
        return self.path.name


def is_automatic(requested: str | None) -> bool:
    return requested is None or requested.strip().lower() in AUTOMATIC_NAMES


class VaeLibrary:
    def __init__(self, settings: Settings, facts: FileFactsCache | None = None, max_loaded: int = 2):
        self.folder = settings.vaes_dir
        self.allow_external_links = settings.allow_external_links
        self.facts = facts or FileFactsCache(settings.cache_dir / "file_facts.json")
        self.max_loaded = max_loaded
        self._loaded: OrderedDict[tuple, torch.nn.Module] = OrderedDict()
        self._lock = threading.Lock()

    def _entries(self) -> list[tuple[str, Path]]:
        return scan_files_and_folders(self.folder, VAE_SUFFIXES, DIFFUSERS_WEIGHTS, self.allow_external_links)

    def available(self) -> list[VaeFile]:
        return [VaeFile(name, path) for name, path in self._entries()]

    def resolve(self, requested: str | None, field: str = "vae") -> VaeFile | None:
        """The VAE a request names; None for the model's own ("Automatic", "None" or absent)."""
        if is_automatic(requested):
            return None
        entries = self._entries()
        found = find_named_file(requested, entries, VAE_SUFFIXES, field, "VAE")
        if found is None:
            names = ", ".join(repr(name) for name, _ in entries) or f"none (the folder {self.folder} is empty)"
            raise UnknownVaeError(f"unknown vae {requested!r}; installed VAEs: {names} (or 'Automatic')", field=field)
        return VaeFile(*found)

    def short_hash(self, vae: VaeFile) -> str:
        """A1111's `VAE hash`: the first 10 hex digits of the file's sha256."""
        return self.facts.get(vae.weights_file.resolve(), "sha256", sha256_of_file)[:10]

    def latent_channels(self, vae: VaeFile) -> int | None:
        """Its latent channels (4 for SD1.5/SDXL VAEs, 16 for FLUX.1's and SD 3.5's), from the folder's config or
        the file's tensor shapes, read without torch; None when they cannot be read (its load then says why)."""

        def read(weights: Path) -> str:
            try:
                if vae.path.is_dir():
                    return str(json.loads((vae.path / "config.json").read_text()).get("latent_channels", ""))
                shapes = tensor_shapes.read(weights) or {}
                conv_in = shapes.get("decoder.conv_in.weight") or shapes.get("first_stage_model.decoder.conv_in.weight")
                return str(conv_in.shape[1]) if conv_in is not None else ""
            except (OSError, ValueError, KeyError, IndexError):
                return ""

        value = self.facts.get(vae.weights_file.resolve(), "vae_latent_channels", read)
        return int(value) if value else None

    def load(self, vae: VaeFile, like: torch.nn.Module) -> torch.nn.Module:
        """The VAE as a diffusers AutoencoderKL on the device and in the precision of `like` (the model's own
        VAE, whose configuration a single file is read into); cached."""
        device = execution_device(like)  # the GPU with model CPU offload, where the model's VAE waits on the CPU
        key = (str(vae.path), vae.path.stat().st_mtime_ns, device, like.dtype, like.config.scaling_factor)
        with self._lock:
            if key in self._loaded:
                self._loaded.move_to_end(key)
                # where the model runs: with model CPU offload, diffusers moved it to the CPU after its last call
                return self._loaded[key].to(device=device)
            try:
                loaded = self._read(vae, like)
            except Exception as error:  # a user's file: unreadable, pickled classes, another layout
                raise ModelLoadError(f"could not load VAE '{vae.name}': {error}", field="vae") from error
            loaded = loaded.to(device=device, dtype=like.dtype).eval()
            while len(self._loaded) >= self.max_loaded:
                self._loaded.popitem(last=False)
            self._loaded[key] = loaded
            return loaded

    @staticmethod
    def _read(vae: VaeFile, like: torch.nn.Module) -> torch.nn.Module:
        from diffusers import AutoencoderKL
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        if vae.path.is_dir():
            return AutoencoderKL.from_pretrained(vae.path)
        state = read_state_dict(vae.path)
        config = dict(like.config)
        model = AutoencoderKL.from_config(config)
        converted = convert_ldm_vae_checkpoint(state, config)
        missing, unexpected = model.load_state_dict(converted, strict=False)
        if missing:
            raise ValueError(f"{len(missing)} VAE weights missing (e.g. {missing[0]}): not a VAE of this layout")
        if unexpected:
            logger.warning("VAE %s: %d unexpected weights ignored", vae.name, len(unexpected))
        return model
