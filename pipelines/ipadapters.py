"""IP-Adapter models and the CLIP image encoders they read reference images with.

- IP-Adapters: `stable_diffusion/ipadapter/`, the files as h94/IP-Adapter ships them (`ip-adapter_sd15.safetensors`,
  `ip-adapter-plus_sd15.bin`, `ip-adapter_sdxl_vit-h.safetensors`, ...): `image_proj.*` and `ip_adapter.*`
  tensors (a `.bin` holds the two as dicts). Their facts are read from the files without torch: the
  family from `modelspec.architecture` metadata where present, else the width the adapter cross-attends to
  (768 SD1.5, 2048 SDXL, 1024 SD 2.x; another, a tiny model's, reads as SD1.5), the kind from the projection
  (a linear `proj`: the encoder's image embedding; a Resampler's `latents` (the "plus" adapters) or the full
  face's MLP: its penultimate hidden states), and the width the adapter expects from the encoder.
- Image encoders: `stable_diffusion/clip_vision/`, as transformers folders (`config.json` + `model.safetensors`,
  h94's `models/image_encoder/`) or single files in transformers' layout (A1111's `clip_h.pth`, `clip_g.pth`;
  ComfyUI's `CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors`). The extension's modules name which one runs:
  `ip-adapter_clip_sd15` / `ip-adapter_clip_h` the ViT-H one, `ip-adapter_clip_sdxl` / `ip-adapter_clip_g` the
  ViT-bigG one; `ip-adapter-auto` picks the one whose width fits the adapter.

The FaceID adapters (they read InsightFace face embeddings, not CLIP's) are not served: listed as unsupported
nowhere, refused by name. torch is imported only to load a model (the ingress plans with this module)."""

from __future__ import annotations

import json
import math
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines import tensor_shapes
from pipelines.catalog import FileFactsCache
from pipelines.errors import InvalidRequestError, ModelLoadError
from pipelines.names import find_named_file, scan_files_and_folders, scan_named_files
from pipelines.preprocessors import IP_ADAPTER_ALIASES, IP_ADAPTER_MODULES
from pipelines.settings import Settings
from pipelines.state_dicts import read_state_dict

if TYPE_CHECKING:
    import torch
    from PIL import Image

IP_ADAPTER_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
ENCODER_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
ENCODER_FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
# How the encoders' files are named where users get them (A1111's extension, h94, ComfyUI), lower case.
ENCODER_NAME_HINTS = {"clip_h": ("clip_h", "vit-h", "vit_h", "image_encoder"), "clip_g": ("clip_g", "bigg", "vit-g")}
# What single files do not say: attention heads and activation, by width (OpenAI's ViT-L/14, open_clip's ViT-H/14
# and ViT-bigG/14); other widths take 64-wide heads (at least one) and transformers' default activation.
KNOWN_VISION_WIDTHS = {1024: (16, "quick_gelu"), 1280: (16, "gelu"), 1664: (16, "gelu")}
_LAYER = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.")


@dataclass(frozen=True)
class IpAdapterFile:
    name: str
    path: Path
    family: str  # sd15, sdxl, sd2; unknown: not an IP-Adapter
    kind: str  # "embeds": reads the image embedding; "hidden": the penultimate hidden states; "faceid"
    image_width: int  # the encoder output width it expects

    @property
    def weights_file(self) -> Path:
        return self.path


@dataclass(frozen=True)
class ImageEncoderFile:
    name: str
    path: Path  # a transformers folder or a single file
    projection_dim: int  # the image embedding's width
    hidden_size: int  # the hidden states' width

    def width_for(self, adapter: IpAdapterFile) -> int:
        return self.hidden_size if adapter.kind == "hidden" else self.projection_dim


def _flat(shapes: dict, prefix: str = "") -> dict:
    """A `.bin`'s `{"image_proj": {...}, "ip_adapter": {...}}` as the flat names of the `.safetensors` files."""
    flat = {}
    for key, value in shapes.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def ip_adapter_facts(path: Path) -> dict:
    """{family, kind, image_width} from the tensor shapes; family "unknown" for a file that is no IP-Adapter."""
    unknown = {"family": "unknown", "kind": "", "image_width": 0}
    try:
        shapes = tensor_shapes.read(path)
    except Exception:  # a truncated or foreign file: not listed
        return unknown
    if not shapes:
        return unknown
    shapes = _flat(shapes)
    keys = [key for key in shapes if key.startswith("ip_adapter.") and key.endswith("to_k_ip.weight")]
    if not keys:
        return unknown
    family = _family_from_metadata(path) or {2048: "sdxl", 1024: "sd2"}.get(shapes[keys[0]].shape[1], "sd15")
    if any("lora" in key for key in shapes if key.startswith("ip_adapter.")) or any(
        "perceiver_resampler" in key or "proj_model" in key for key in shapes
    ):
        return {"family": family, "kind": "faceid", "image_width": 0}
    if "image_proj.latents" in shapes and "image_proj.proj_in.weight" in shapes:  # a Resampler: "plus"
        return {"family": family, "kind": "hidden", "image_width": shapes["image_proj.proj_in.weight"].shape[1]}
    if "image_proj.proj.3.weight" in shapes:  # full face: an MLP over the hidden states (diffusers feeds them)
        return {"family": family, "kind": "hidden", "image_width": shapes["image_proj.proj.0.weight"].shape[1]}
    if "image_proj.proj.0.weight" in shapes:  # an MLP and a norm without the full face's: FaceID portrait
        return {"family": family, "kind": "faceid", "image_width": 0}
    if "image_proj.proj.weight" in shapes and shapes["image_proj.proj.weight"].ndim == 2:  # linear: plain
        return {"family": family, "kind": "embeds", "image_width": shapes["image_proj.proj.weight"].shape[1]}
    return unknown


def _family_from_metadata(path: Path) -> str | None:
    """The family a `.safetensors` file says it is for (`modelspec.architecture`, as sd-scripts writes it)."""
    try:
        architecture = tensor_shapes.metadata(path).get("modelspec.architecture", "").lower()
    except Exception:
        return None
    if "xl" in architecture:
        return "sdxl"
    if "v2" in architecture:
        return "sd2"
    return "sd15" if "v1" in architecture else None


def encoder_facts(path: Path) -> dict | None:
    """{projection_dim, hidden_size} of a CLIP vision encoder (folder config or single-file shapes); None when
    it is none."""
    if path.is_dir():
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            return None
        config = config.get("vision_config", config) if isinstance(config, dict) else {}
        if not isinstance(config, dict) or "hidden_size" not in config:
            return None
        return {"projection_dim": int(config.get("projection_dim", 512)), "hidden_size": int(config["hidden_size"])}
    try:
        shapes = tensor_shapes.read(path)
    except Exception:
        return None
    shapes = _flat(shapes or {})
    projection = shapes.get("visual_projection.weight")
    if projection is None or getattr(projection, "ndim", 0) != 2:
        return None
    return {"projection_dim": projection.shape[0], "hidden_size": projection.shape[1]}


def single_file_config(state: dict) -> dict:
    """A CLIPVisionConfig for a single file in transformers' layout, from its shapes (heads and activation by
    width: the file does not hold them)."""
    patch = state["vision_model.embeddings.patch_embedding.weight"]
    positions = state["vision_model.embeddings.position_embedding.weight"].shape[0]
    hidden, patch_size = patch.shape[0], patch.shape[-1]
    heads, activation = KNOWN_VISION_WIDTHS.get(hidden, (max(1, hidden // 64), "quick_gelu"))
    return {
        "hidden_size": hidden,
        "patch_size": patch_size,
        "image_size": int(round(math.sqrt(positions - 1))) * patch_size,
        "num_hidden_layers": 1 + max(int(match[1]) for key in state if (match := _LAYER.match(key))),
        "intermediate_size": state["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        "projection_dim": state["visual_projection.weight"].shape[0],
        "num_attention_heads": heads,
        "hidden_act": activation,
    }


class IpAdapterLibrary:
    """The installed IP-Adapters and image encoders; the loaded ones in small per-process caches."""

    def __init__(self, settings: Settings, facts: FileFactsCache | None = None, max_loaded: int = 4):
        self.folder = settings.ipadapter_dir
        self.controlnet_folder = settings.controlnet_dir
        self.encoders_folder = settings.clip_vision_dir
        self.allow_external_links = settings.allow_external_links
        self.facts = facts or FileFactsCache(settings.cache_dir / "file_facts.json")
        self.max_loaded = max_loaded
        self._states: OrderedDict[tuple, dict] = OrderedDict()
        self._encoders: OrderedDict[tuple, tuple] = OrderedDict()
        self._lock = threading.Lock()

    # Adapters ----------------------------------------------------------------------------------------------
    def _entries(self) -> list[tuple[str, Path]]:
        """The IP-Adapter folder's files, then the ControlNet folder's IP-Adapters (where A1111's extension
        keeps them: `models/ControlNet/ip-adapter_sd15.safetensors`)."""
        own = scan_named_files(self.folder, IP_ADAPTER_SUFFIXES, self.allow_external_links)
        names = {name for name, _ in own}
        beside = [(name, path) for name, path in
                  scan_named_files(self.controlnet_folder, IP_ADAPTER_SUFFIXES, self.allow_external_links)
                  if name not in names and self._facts(path)["family"] != "unknown"]  # fmt: skip
        return own + beside

    def _facts(self, path: Path) -> dict:
        return self.facts.get(path.resolve(), "ip_adapter", ip_adapter_facts)

    def _entry(self, name: str, path: Path) -> IpAdapterFile:
        facts = self._facts(path)
        return IpAdapterFile(name, path, facts["family"], facts["kind"], facts["image_width"])

    def available(self) -> list[IpAdapterFile]:
        """The IP-Adapters this service runs (FaceID ones and foreign files left out)."""
        found = [self._entry(name, path) for name, path in self._entries()]
        return [entry for entry in found if entry.family != "unknown" and entry.kind != "faceid"]

    def find(self, wanted: str, field: str) -> IpAdapterFile | None:
        found = find_named_file(wanted, self._entries(), IP_ADAPTER_SUFFIXES, field, "IP-Adapter")
        if found is None:
            return None
        entry = self._entry(*found)
        if entry.family == "unknown":
            raise InvalidRequestError(f"{field}: '{entry.name}' in the IP-Adapter folder is no IP-Adapter (it has "
                                      "no image_proj / ip_adapter weights)", field=field)  # fmt: skip
        if entry.kind == "faceid":
            raise InvalidRequestError(f"{field}: '{entry.name}' is a FaceID IP-Adapter, which reads InsightFace "
                                      "face embeddings; this service runs the CLIP ones", field=field)  # fmt: skip
        return entry

    # Encoders ----------------------------------------------------------------------------------------------
    def encoders(self) -> list[ImageEncoderFile]:
        found = []
        for name, path in scan_files_and_folders(self.encoders_folder, ENCODER_SUFFIXES, ENCODER_FOLDER_WEIGHTS,
                                                 self.allow_external_links):  # fmt: skip
            key = path.resolve() / "config.json" if path.is_dir() else path.resolve()
            facts = self.facts.get(key, "clip_vision", lambda _, p=path: encoder_facts(p) or {})
            if facts:
                found.append(ImageEncoderFile(name, path, facts["projection_dim"], facts["hidden_size"]))
        return found

    def encoder_for(self, adapter: IpAdapterFile, module: str, field: str) -> ImageEncoderFile:
        """The image encoder a unit runs: the module's (clip_h or clip_g by its file's name), or for
        `ip-adapter-auto` the one whose width the adapter expects; a 4xx naming the module when none fits."""
        module = IP_ADAPTER_ALIASES.get(module, module)
        wanted = IP_ADAPTER_MODULES[module]
        encoders = self.encoders()
        if wanted is None:
            candidates = [item for item in encoders if item.width_for(adapter) == adapter.image_width]
        else:
            candidates = [item for item in encoders
                          if any(hint in item.name.lower() for hint in ENCODER_NAME_HINTS[wanted])]  # fmt: skip
        installed = ", ".join(repr(item.name) for item in encoders) or f"none (the folder {self.encoders_folder})"
        if not candidates:
            what = (
                f"a {wanted} encoder (a file or folder named {wanted})"
                if wanted
                else f"an encoder {adapter.image_width} wide"
            )
            raise InvalidRequestError(f"{field}: module '{module}' needs {what} in the image encoder folder for "
                                      f"IP-Adapter '{adapter.name}'; installed: {installed}", field=field)  # fmt: skip
        fitting = [item for item in candidates if item.width_for(adapter) == adapter.image_width]
        if not fitting:
            raise InvalidRequestError(
                f"{field}: IP-Adapter '{adapter.name}' reads {adapter.image_width}-wide image features and module "
                f"'{module}' runs encoder '{candidates[0].name}' ({candidates[0].width_for(adapter)} wide); pick "
                f"the module of its encoder (or ip-adapter-auto); installed encoders: {installed}", field=field,
            )  # fmt: skip
        return fitting[0]

    # Loading (engine side) ---------------------------------------------------------------------------------
    def clear(self) -> None:
        with self._lock:
            self._states.clear()
            self._encoders.clear()

    def state_dict(self, entry: IpAdapterFile) -> dict:
        """The adapter's tensors as diffusers' `load_ip_adapter` takes them: {"image_proj": ..., "ip_adapter":
        ...}, on the CPU; cached (read once per file version)."""
        try:
            key = (str(entry.path), entry.path.stat().st_mtime_ns)
        except OSError as error:  # removed since the job was submitted
            raise ModelLoadError(f"could not read IP-Adapter '{entry.name}': {error}", field="controlnet") from error
        with self._lock:
            if key in self._states:
                self._states.move_to_end(key)
                return self._states[key]
            try:
                flat = _flat(read_state_dict(entry.path))
            except Exception as error:
                raise ModelLoadError(
                    f"could not read IP-Adapter '{entry.name}': {error}", field="controlnet"
                ) from error
            state: dict[str, dict] = {"image_proj": {}, "ip_adapter": {}}
            for name, tensor in flat.items():
                group, _, rest = name.partition(".")
                if group in state:
                    state[group][rest] = tensor
            while len(self._states) >= self.max_loaded:
                self._states.popitem(last=False)
            self._states[key] = state
            return state

    def encoder(self, entry: ImageEncoderFile, device: torch.device, dtype: torch.dtype):
        """(CLIPVisionModelWithProjection, CLIPImageProcessor) on the device; cached."""
        key = (str(entry.path), _mtime(entry.path), device, dtype)
        with self._lock:
            if key in self._encoders:
                self._encoders.move_to_end(key)
                return self._encoders[key]
            try:
                loaded = _load_encoder(entry.path)
            except Exception as error:
                message = f"could not load image encoder '{entry.name}': {error}"
                raise ModelLoadError(message, field="controlnet") from error
            model = loaded[0].to(device=device, dtype=dtype).eval()
            while len(self._encoders) >= 2:
                self._encoders.popitem(last=False)
            self._encoders[key] = (model, loaded[1])
            return self._encoders[key]

    def encoder_sizes(self) -> list[tuple[tuple, int]]:
        """(cache key, bytes) of the loaded encoders, least recently used first."""
        from pipelines.controlnets import module_bytes

        with self._lock:
            return [(key, module_bytes(model)) for key, (model, _) in self._encoders.items()]

    def drop_encoder(self, key: tuple) -> bool:
        with self._lock:
            return self._encoders.pop(key, None) is not None

    def encode(self, entry: ImageEncoderFile, adapter: IpAdapterFile, images: list[Image.Image],
               device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(the reference images' features, the unconditional ones) as the adapter reads them, as diffusers'
        `encode_image` makes them: the image embeddings and zeros, or (plus adapters) the penultimate hidden
        states of the images and of a black image."""
        import torch

        model, processor = self.encoder(entry, device, dtype)
        pixels = processor(images=[image.convert("RGB") for image in images], return_tensors="pt").pixel_values
        pixels = pixels.to(device=device, dtype=dtype)
        with torch.inference_mode():
            if adapter.kind == "hidden":
                positive = model(pixels, output_hidden_states=True).hidden_states[-2]
                negative = model(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
            else:
                positive = model(pixels).image_embeds
                negative = torch.zeros_like(positive)
        return positive, negative


def _mtime(path: Path) -> int:
    weights = next((path / name for name in ENCODER_FOLDER_WEIGHTS if (path / name).exists()), path)
    return weights.stat().st_mtime_ns


def _load_encoder(path: Path):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    if path.is_dir():
        model = CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True)
        size = model.config.image_size
        if (path / "preprocessor_config.json").exists():
            return model, CLIPImageProcessor.from_pretrained(path, local_files_only=True)
    else:
        state = _flat(read_state_dict(path))
        state = {key: value for key, value in state.items() if key.startswith(("vision_model.", "visual_projection."))}
        config = CLIPVisionConfig(**single_file_config(state))
        model = CLIPVisionModelWithProjection(config)
        missing, _ = model.load_state_dict(state, strict=False)
        missing = [key for key in missing if not key.endswith("position_ids")]
        if missing:
            raise ValueError(f"{len(missing)} weights missing (e.g. {missing[0]}): not a CLIP vision model")
        size = config.image_size
    # As diffusers' IP-Adapter loader makes its feature extractor: CLIP's resize, centre crop and normalisation.
    return model, CLIPImageProcessor(size=size, crop_size=size)
