"""ControlNet models users install: `stable_diffusion/controlnet/`, as A1111's single files
(`control_v11p_sd15_canny.safetensors`, `.pth`) or diffusers folders (`config.json` + weights).

The family (SD1.5 or SDXL) is read from the files without torch, as for LoRAs: an SDXL ControlNet has the
text-and-time embedding of its UNet (`add_embedding` / `label_emb`), an SD 2.x one cross-attends to 1024-wide
text. A single file is read into a ControlNet built from the job's own UNet configuration (a ControlNet is its
UNet's encoder), with diffusers' own original-layout conversion, so nothing is fetched from the hub. Loaded
ControlNets are kept in a small per-process cache, within the size of the UNet they run with (`fit_budget`).
torch is imported only to load one (the ingress resolves names with this module and must not load torch).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines import tensor_shapes
from pipelines.annotators import AnnotatorLibrary
from pipelines.catalog import FileFactsCache
from pipelines.devices import execution_device
from pipelines.errors import DiffusionAPIError, InvalidRequestError, ModelLoadError
from pipelines.ipadapters import IpAdapterFile, IpAdapterLibrary
from pipelines.names import find_named_file, scan_files_and_folders
from pipelines.settings import Settings
from pipelines.state_dicts import read_state_dict

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)
CONTROLNET_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
SDXL_KEYS = ("add_embedding.linear_1.weight", "control_model.label_emb.0.0.weight", "label_emb.0.0.weight")
_TITLE = re.compile(r"^(?P<name>.+?)\s+\[(?P<hash>[0-9a-fA-F]{8,10})\]$")  # A1111's `name [hash8]`


def module_bytes(module) -> int:
    """What a torch module's parameters and buffers take in memory."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def legacy_model_hash(path: Path) -> str:
    """A1111's legacy model hash (its ControlNet titles'): the sha256 of the 64 KiB at 1 MiB, first 8 digits."""
    with path.open("rb") as handle:
        handle.seek(0x100000)
        return hashlib.sha256(handle.read(0x10000)).hexdigest()[:8]


class UnknownControlNetError(DiffusionAPIError):
    status_code = 404


@dataclass(frozen=True)
class ControlNetFile:
    name: str  # as listed and requested: the path under the folder, without extension
    path: Path  # the file, or the diffusers folder
    family: str  # sd15, sdxl, sd2 or unknown

    @property
    def weights_file(self) -> Path:
        if self.path.is_file():
            return self.path
        return next(self.path / name for name in DIFFUSERS_WEIGHTS if (self.path / name).exists())


def detect_controlnet_family(path: Path) -> str:
    """sd15, sdxl, sd2 or unknown, from a diffusers folder's config or a file's tensor names and shapes."""
    if path.is_dir():
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            return "unknown"  # a broken folder is not listed
        if not isinstance(config, dict) or config.get("_class_name") != "ControlNetModel":
            return "unknown"  # a UNet's, a VAE's or another model's folder
        if config.get("addition_embed_type") == "text_time":
            return "sdxl"
        return "sd2" if config.get("cross_attention_dim") == 1024 else "sd15"
    try:
        shapes = tensor_shapes.read(path)
    except Exception:  # a truncated or foreign file: not listed
        return "unknown"
    if shapes is None:
        return "unknown"
    shapes = shapes.get("state_dict", shapes)
    if any(key in shapes for key in SDXL_KEYS):
        return "sdxl"
    hint_encoder = ("input_hint_block.0.weight", "controlnet_cond_embedding.conv_in.weight")
    if not any(key.endswith(hint_encoder) for key in shapes):
        return "unknown"  # no ControlNet's hint encoder: another kind of file
    for key, shape in shapes.items():
        if key.endswith("attn2.to_k.weight") and getattr(shape, "ndim", 0) == 2:
            return "sd2" if shape.shape[1] == 1024 else "sd15"
    return "sd15"


class ControlNetLibrary:
    def __init__(self, settings: Settings, facts: FileFactsCache | None = None, max_loaded: int = 4):
        self.folder = settings.controlnet_dir
        self.allow_external_links = settings.allow_external_links
        self.facts = facts or FileFactsCache(settings.cache_dir / "file_facts.json")
        self.max_loaded = max_loaded
        self.ip_adapters = IpAdapterLibrary(settings, self.facts)
        self.annotators = AnnotatorLibrary(settings)  # the depth annotators' weights (runner: where they run)
        self._loaded: OrderedDict[tuple, torch.nn.Module] = OrderedDict()
        self._lock = threading.Lock()

    def _entries(self) -> list[tuple[str, Path]]:
        return scan_files_and_folders(self.folder, CONTROLNET_SUFFIXES, DIFFUSERS_WEIGHTS, self.allow_external_links)

    def _family(self, path: Path) -> str:
        key = path.resolve() / "config.json" if path.is_dir() else path.resolve()
        return self.facts.get(key, "controlnet_family", lambda _: detect_controlnet_family(path))

    def available(self) -> list[ControlNetFile]:
        """Every ControlNet installed, with its family (files that are no ControlNet are left out)."""
        found = [ControlNetFile(name, path, self._family(path)) for name, path in self._entries()]
        return [entry for entry in found if entry.family != "unknown"]

    def all_models(self) -> list[ControlNetFile | IpAdapterFile]:
        """What a unit's `model` can name: the ControlNets, then the IP-Adapters (the extension lists both)."""
        return [*self.available(), *self.ip_adapters.available()]

    def resolve(self, requested: str, field: str = "model") -> ControlNetFile | IpAdapterFile:
        """A ControlNet, else an IP-Adapter, by name (with or without extension) or A1111 title (`name [hash]`)."""
        wanted = title["name"] if (title := _TITLE.match(requested.strip())) else requested
        found = find_named_file(wanted, self._entries(), CONTROLNET_SUFFIXES, field, "ControlNet")
        if found is not None and self._family(found[1]) != "unknown":
            name, path = found
            return ControlNetFile(name, path, self._family(path))
        adapter = self.ip_adapters.find(wanted, field)
        if adapter is not None:
            return adapter
        if found is not None:  # neither a ControlNet nor an IP-Adapter
            raise InvalidRequestError(f"{field}: {found[0]!r} in {self.folder} is neither a ControlNet nor an "
                                      "IP-Adapter this service can read", field=field)  # fmt: skip
        names = ", ".join(repr(entry.name) for entry in self.all_models())
        empty = f"none (the folders {self.folder} and {self.ip_adapters.folder} are empty)"
        raise UnknownControlNetError(f"unknown ControlNet or IP-Adapter model {requested!r}; installed: "
                                     f"{names or empty}", field=field)  # fmt: skip

    def short_hash(self, entry: ControlNetFile | IpAdapterFile) -> str:
        """The hash in A1111's ControlNet titles: its legacy model hash (the sha256 of 64 KiB read at 1 MiB), so
        the titles equal A1111's; reading it costs nothing even for multi-GB files."""
        return self.facts.get(entry.weights_file.resolve(), "legacy_hash", legacy_model_hash)

    def clear(self) -> None:
        """Forgets the loaded ControlNets (out of memory: they are read again when next asked for)."""
        with self._lock:
            self._loaded.clear()
        self.ip_adapters.clear()
        self.annotators.clear()

    def title(self, entry: ControlNetFile | IpAdapterFile) -> str:
        return f"{entry.name} [{self.short_hash(entry)}]"

    def load(self, entry: ControlNetFile, unet: torch.nn.Module) -> torch.nn.Module:
        """The ControlNet as a diffusers ControlNetModel on the device and in the precision of `unet` (the
        job's model's UNet, whose configuration a single file is read into); cached."""
        # One ControlNet per family's UNet shape (an inpainting checkpoint's 9-channel UNet included: a ControlNet
        # always takes the 4 latent channels).
        device = execution_device(unet)  # the GPU with model CPU offload, where the UNet waits on the CPU
        key = (str(entry.path), entry.weights_file.stat().st_mtime_ns, device, unet.dtype,
               unet.config.cross_attention_dim, unet.config.addition_embed_type)  # fmt: skip
        with self._lock:
            if key in self._loaded:
                self._loaded.move_to_end(key)
                return self._loaded[key]
            try:
                loaded = self._read(entry, unet)
            except Exception as error:  # a user's file: unreadable, another layout, another architecture
                message = f"could not load ControlNet '{entry.name}': {error}"
                raise ModelLoadError(message, field="controlnet") from error
            loaded = loaded.to(device=device, dtype=unet.dtype).eval()
            while len(self._loaded) >= self.max_loaded:
                self._loaded.popitem(last=False)
            self._loaded[key] = loaded
            return loaded

    def fit_budget(self, limit_bytes: int, keep: set[str] = frozenset()) -> None:
        """Keeps the control models held here (ControlNets, then IP-Adapter image encoders) within `limit_bytes`
        (the engine passes the job's UNet's size), dropping the least recently used, but never those of the
        files in `keep` (the running job's own). With the engine's budget of loaded models, a replica holds its
        pipelines plus at most one UNet's worth of control models (more only while one job needs more)."""
        with self._lock:
            held = [(key, module_bytes(model)) for key, model in self._loaded.items()]
        encoders = self.ip_adapters.encoder_sizes()
        total = sum(size for _, size in held) + sum(size for _, size in encoders)
        for key, size in held:  # least recently used first
            if total <= limit_bytes:
                return
            if key[0] not in keep:
                with self._lock:
                    if self._loaded.pop(key, None) is not None:
                        total -= size
        for key, size in encoders:
            if total <= limit_bytes:
                return
            if key[0] not in keep and self.ip_adapters.drop_encoder(key):
                total -= size

    def held(self) -> list[str]:
        """The files of the ControlNets and image encoders held now, least recently used first."""
        with self._lock:
            controlnets = [key[0] for key in self._loaded]
        return controlnets + [key[0] for key, _ in self.ip_adapters.encoder_sizes()]

    @staticmethod
    def _read(entry: ControlNetFile, unet: torch.nn.Module) -> torch.nn.Module:
        from diffusers import ControlNetModel
        from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

        if entry.path.is_dir():
            return ControlNetModel.from_pretrained(entry.path, local_files_only=True)
        state = read_state_dict(entry.path)
        # A job's IP-Adapter, loaded into the UNet for the job, marks its config (`ip_image_proj`); the ControlNet
        # is built from the UNet's own configuration (the caller holds the model's lock: nothing else reads it).
        adapted = unet.config.encoder_hid_dim_type == "ip_image_proj"
        if adapted:
            unet.config.encoder_hid_dim_type = None
        try:
            model = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
        finally:
            if adapted:
                unet.config.encoder_hid_dim_type = "ip_image_proj"
        if model.config.in_channels != 4:  # an inpainting checkpoint's UNet: a ControlNet takes the latents only
            model = ControlNetModel.from_config({**model.config, "in_channels": 4})
        converted = convert_controlnet_checkpoint(state, dict(model.config))
        missing, unexpected = model.load_state_dict(converted, strict=False)
        if missing:
            raise ValueError(f"{len(missing)} weights missing (e.g. {missing[0]}): not a ControlNet for this model")
        if unexpected:
            logger.warning("ControlNet %s: %d unexpected weights ignored", entry.name, len(unexpected))
        return model


# The extension's control types (its UI's filter), for this service's preprocessors: type -> (its preprocessors,
# the word the names of its models hold, the default preprocessor). "All" lists everything.
CONTROL_TYPES: dict[str, tuple[tuple[str, ...], str, str]] = {
    "Canny": (("canny", "invert"), "canny", "canny"),
    "Lineart": (("lineart_standard", "invert"), "lineart", "lineart_standard"),
    "Scribble/Sketch": (("scribble_xdog", "invert"), "scribble", "scribble_xdog"),
    "Tile/Blur": (("tile_resample", "blur_gaussian"), "tile", "tile_resample"),
    "Depth": (("depth_anything", "depth_anything_v2", "depth"), "depth", "depth_anything"),
    "IP-Adapter": (
        ("ip-adapter_clip_sd15", "ip-adapter_clip_sdxl", "ip-adapter_clip_sdxl_plus_vith", "ip-adapter-auto"),
        "ip-adapter",
        "ip-adapter_clip_sd15",
    ),
}


def control_types(modules: list[str], titles: list[str]) -> dict[str, dict]:
    """The extension's `GET /controlnet/control_types`: each type's preprocessors and models, and defaults."""
    types = {"All": {"module_list": modules, "model_list": titles, "default_option": "none", "default_model": "None"}}
    for name, (preprocessors, word, default) in CONTROL_TYPES.items():
        models = [title for title in titles if word in title.lower()]
        offered = [module for module in preprocessors if module in modules]  # weight-needing ones when installed
        types[name] = {"module_list": ["none", *offered], "model_list": models,
                       "default_option": default if default in offered else "none",
                       "default_model": models[0] if models else "None"}  # fmt: skip
    return types
