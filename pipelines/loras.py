"""LoRA files: discovery, family detection, compatibility with a model, and the prompt syntax.

A LoRA is checked against a model before a job is queued, without loading the model: the LoRA's tensors are
normalised to diffusers/peft module names with diffusers' own converters (kohya/A1111 and diffusers/peft
files alike), and every targeted layer must exist in the model with the LoRA's input and output sizes. The
model's layers come from its configs, instantiated on the `meta` device (no weights, no memory). An
incompatible LoRA is skipped with a sentence the user can act on; the job runs with the others.

Two checks, on two sides: the ingress resolves names and checks the family (from metadata, key names and
shapes, read without torch by pipelines/tensor_shapes.py) when it prepares a job; the engine checks every
targeted layer against the model (diffusers' converters need torch) just before it applies the LoRAs. torch is
imported only where a tensor is handled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines import tensor_shapes
from pipelines.catalog import FileFactsCache, ModelEntry, sha256_of_file
from pipelines.errors import DiffusionAPIError
from pipelines.families import FAMILIES, family_label, family_of
from pipelines.limits import LIMITS
from pipelines.names import find_named_file, scan_named_files
from pipelines.settings import Settings
from pipelines.state_dicts import read_state_dict

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

LORA_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# The grammar of a usable tag, for reference: `find_lora_tags` finds exactly its matches, in linear time.
PROMPT_LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?>")
_LORA_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")


class UnknownLoraError(DiffusionAPIError):
    """No LoRA file with that name."""

    status_code = 404


class UnreadableLoraError(DiffusionAPIError):
    """A LoRA file that cannot be read as tensors."""

    status_code = 422


@dataclass(frozen=True)
class LoraFile:
    name: str  # path under the LoRA folder without extension, '/'-separated ("styles/ink")
    path: Path
    family: str  # sd15, sdxl, sd2 or unknown


@dataclass(frozen=True)
class LoraUse:
    """A LoRA a job applies, at a scale."""

    lora: LoraFile
    scale: float
    short_hash: str  # A1111's 12-character hash, for `Lora hashes`

    @property
    def adapter_name(self) -> str:
        # Content-addressed: a changed file is a new adapter; no '.' (peft rejects it).
        return f"lora_{self.short_hash}"


@dataclass
class LoraPlan:
    """What a job does with LoRAs: the prompt without `<lora:...>` tags, the ones applied, and warnings."""

    prompt: str
    uses: list[LoraUse] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# Reading files -------------------------------------------------------------------------------------------------
def read_lora_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a `.safetensors`, `.bin`, `.pt` or `.pth` LoRA (pickles load with `weights_only`)."""
    import torch

    try:
        state = read_state_dict(path)
    except Exception as error:
        raise UnreadableLoraError(f"LoRA '{path.name}' could not be read: {error}", field="loras") from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UnreadableLoraError(f"LoRA '{path.name}' holds no tensor dictionary", field="loras")
    return state


def read_lora_shapes(path: Path) -> dict[str, tensor_shapes.TensorShape]:
    """The names and shapes of a LoRA's tensors, without torch where the format allows (all its family needs)."""
    try:
        state = tensor_shapes.read(path)
    except Exception as error:
        raise UnreadableLoraError(f"LoRA '{path.name}' could not be read: {error}", field="loras") from error
    if state is None:  # a pickle only torch reads
        return read_lora_state_dict(path)
    state = state.get("state_dict", state)
    if not isinstance(state, dict) or not all(isinstance(v, tensor_shapes.TensorShape) for v in state.values()):
        raise UnreadableLoraError(f"LoRA '{path.name}' holds no tensor dictionary", field="loras")
    return state


def lora_short_hash(path: Path) -> str:
    """A1111's LoRA short hash: for `.safetensors` the sha256 of the data after the header ("addnet" hash),
    for other files the sha256 of the whole file; the first 12 hex characters."""
    if path.suffix.lower() != ".safetensors":
        return sha256_of_file(path)[:12]
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        header_size = int.from_bytes(handle.read(8), "little")
        handle.seek(8 + header_size)
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()[:12]


def detect_lora_family(state: dict, metadata: dict[str, str]) -> str:
    """sd15, sdxl, sd2, flux, sd3 or unknown, from the training metadata, the key names, then the cross-attention
    width."""
    for family in FAMILIES.values():  # families with LoRA rules of their own first (FLUX.1, SD 3.5)
        if family.claims_lora(state, metadata):
            return family.lora_family
    hints = (metadata.get("ss_base_model_version", "") + " " + metadata.get("modelspec.architecture", "")).lower()
    if "xl" in hints:
        return "sdxl"
    if "sd_v2" in hints or "v2-" in hints:
        return "sd2"
    if "sd_v1" in hints or "stable-diffusion-v1" in hints:
        return "sd15"
    keys = list(state)
    if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.", "lora_unet_input_blocks", "lora_unet_label_emb"))
           for k in keys):  # fmt: skip
        return "sdxl"
    # The input width of a cross-attention key/value projection is the text encoder's width.
    for key, tensor in state.items():
        if re.search(r"attn2[._]to_[kv].*(lora_down|lora_A|lora\.down)", key) and tensor.ndim == 2:
            width = tensor.shape[1]
            if width == 768:
                return "sd15"
            if width == 2048:
                return "sdxl"
            if width == 1024:
                return "sd2"
            break
    if any(k.startswith(("lora_te_", "lora_unet_down_blocks", "text_encoder.")) for k in keys):
        return "sd15"
    return "unknown"


# Prompt syntax -------------------------------------------------------------------------------------------------
# Every scanner below runs in time linear in the prompt (no regular expression here can backtrack): a prompt is
# parsed on the HTTP ingress, where a slow parse would stall every other request of the replica.
LORA_TAG_OPEN = "<lora:"
_TAG_PART = re.compile(r"[^:>]*")  # a name or a weight: it stops at the first ':' or '>', never backtracks
# Doubled separators left where tags were removed. The look-behind starts a match only where a whitespace run
# starts (the leftmost start, the one `\s*,\s*(,\s*)+` takes too): without it, each position inside a long run
# of whitespace would re-scan the rest of the run, which is quadratic.
_DOUBLED_COMMAS = re.compile(r"(?<!\s)(?:\s*,){2,}\s*")
_DOUBLED_BLANKS = re.compile(r"[ \t]{2,}")


@dataclass(frozen=True)
class LoraTag:
    """A `<lora:name>` or `<lora:name:weight>` tag of a prompt: `prompt[start:end]`, name and weight as written
    (not stripped; `weight` is None when there is none)."""

    start: int
    end: int
    text: str
    name: str
    weight: str | None


def find_lora_tags(prompt: str) -> list[LoraTag]:
    """The `<lora:name>` / `<lora:name:weight>` tags of a prompt, left to right, in one linear scan. They are the
    matches of `PROMPT_LORA_TAG` (a name of at least one character; neither part holds ':' or '>'), which a
    three-part tag such as `<lora:a:0.5:1>` is not."""
    tags: list[LoraTag] = []
    end_of_text = len(prompt)
    position = 0
    while (start := prompt.find(LORA_TAG_OPEN, position)) >= 0:
        name_start = start + len(LORA_TAG_OPEN)
        name_end = _TAG_PART.match(prompt, name_start).end()
        if name_end == end_of_text:
            break  # no ':' or '>' left: no later tag can close either
        weight = None
        close = name_end
        if prompt[name_end] == ":":
            close = _TAG_PART.match(prompt, name_end + 1).end()
            weight = prompt[name_end + 1 : close]
        if name_end > name_start and close < end_of_text and prompt[close] == ">":
            tags.append(LoraTag(start, close + 1, prompt[start : close + 1], prompt[name_start:name_end], weight))
            position = close + 1
        else:
            position = start + 1  # the name and weight runs end at the next ':': each is scanned at most twice
    return tags


def replace_lora_tags(prompt: str, replace: Callable[[LoraTag], str], tags: list[LoraTag] | None = None) -> str:
    """The prompt with each tag of `find_lora_tags` (or `tags`, found in this prompt) replaced by what
    `replace` returns for it, as `PROMPT_LORA_TAG.sub(replace, prompt)` would."""
    pieces: list[str] = []
    position = 0
    for tag in find_lora_tags(prompt) if tags is None else tags:
        pieces += [prompt[position : tag.start], replace(tag)]
        position = tag.end
    pieces.append(prompt[position:])
    return "".join(pieces)


def _split_weight_tags(prompt: str) -> list[tuple[int, int]]:
    """Where the prompt has tags with two or more weights (`<lora:name:te:unet>`): the matches of
    `<lora:[^>]*:[^>]*:[^>]*>`, found in one pass. A tag runs to the first '>' after its `<lora:`; when it
    holds fewer than two ':', so does every `<lora:` before that '>', so the scan goes on after it."""
    found: list[tuple[int, int]] = []
    position = 0
    while (start := prompt.find(LORA_TAG_OPEN, position)) >= 0:
        close = prompt.find(">", start + len(LORA_TAG_OPEN))
        if close < 0:
            break
        if prompt.count(":", start + len(LORA_TAG_OPEN), close) >= 2:
            found.append((start, close + 1))
        position = close + 1
    return found


def _without(text: str, spans: list[tuple[int, int]]) -> str:
    pieces, position = [], 0
    for start, end in spans:
        pieces.append(text[position:start])
        position = end
    pieces.append(text[position:])
    return "".join(pieces)


def _tag_names(tags: list[LoraTag]) -> str:
    return ", ".join(repr(name) for name in dict.fromkeys(tag.name.strip() for tag in tags))


def parse_prompt_loras(prompt: str) -> tuple[str, list[tuple[str, float]], list[str]]:
    """Removes A1111's `<lora:name>` / `<lora:name:weight>` tags; returns the clean prompt, the tags and a
    warning for each tag that cannot be used (it is removed and skipped, as the prompt itself is valid text).

    At most `LIMITS.max_loras` tags are read: the ones after them are removed and named in one warning (so are
    the tags with separate weights beyond that many), so a prompt full of tags costs no more than a job may use.
    """
    found: list[tuple[str, float]] = []
    warnings: list[str] = []
    cap = LIMITS.max_loras
    clean = prompt
    if LORA_TAG_OPEN in prompt:
        split = _split_weight_tags(prompt)
        for start, end in split[:cap]:
            warnings.append(f"prompt tag {prompt[start:end]!r} skipped: separate text-encoder/UNet weights are not "
                            "supported; write <lora:name:weight>")  # fmt: skip
        if len(split) > cap:
            warnings.append(f"{len(split) - cap} more prompt tags with separate text-encoder/UNet weights skipped")
        clean = _without(prompt, split)
        tags = find_lora_tags(clean)
        for tag in tags[:cap]:
            name, weight = tag.name.strip(), tag.weight
            try:
                scale = 1.0 if weight is None or not weight.strip() else float(weight)
            except ValueError:
                scale = math.nan
            if not math.isfinite(scale):
                warnings.append(
                    f"prompt tag {tag.text!r} skipped: the weight must be a number, as in <lora:{name}:0.8>"
                )
                continue
            if abs(scale) > LIMITS.max_lora_scale:
                limited = math.copysign(LIMITS.max_lora_scale, scale)
                warnings.append(f"prompt tag {tag.text!r}: the weight is limited to +/-{LIMITS.max_lora_scale:g}; "
                                f"used {limited:g}")  # fmt: skip
                scale = limited
            found.append((name, scale))
        if len(tags) > cap:
            warnings.append(f"{len(tags)} <lora:...> tags in the prompt; at most {cap} per job: skipped the other "
                            f"{len(tags) - cap} ({_tag_names(tags[cap:])})")  # fmt: skip
        clean = _without(clean, [(tag.start, tag.end) for tag in tags])
    clean = _DOUBLED_COMMAS.sub(", ", _DOUBLED_BLANKS.sub(" ", clean)).strip(" ,")
    return clean, found, warnings


def prompt_with_lora_tags(prompt: str, uses: list[LoraUse]) -> str:
    """The prompt as A1111 writes it into infotext: the LoRAs applied as `<lora:name:scale>` tags."""
    tags = " ".join(f"<lora:{use.lora.name}:{use.scale:g}>" for use in uses)
    return f"{prompt} {tags}".strip() if tags else prompt


def lora_hashes_value(uses: list[LoraUse]) -> str | None:
    """A1111's `Lora hashes` value: `name: shorthash, ...` (names without ':' or ',')."""
    if not uses:
        return None
    return ", ".join(f"{use.lora.name.replace(':', '').replace(',', '')}: {use.short_hash}" for use in uses)


# Model layers --------------------------------------------------------------------------------------------------
LayerShapes = dict[str, dict[str, tuple[int, int]]]  # component -> module name -> (in, out)


def _layer_shapes(module: torch.nn.Module) -> dict[str, tuple[int, int]]:
    import torch

    shapes = {}
    for name, layer in module.named_modules():
        if isinstance(layer, torch.nn.Linear):
            shapes[name] = (layer.in_features, layer.out_features)
        elif isinstance(layer, torch.nn.Conv2d):
            shapes[name] = (layer.in_channels, layer.out_channels)
    return shapes


def model_layer_shapes(entry: ModelEntry) -> LayerShapes | None:
    """The Linear/Conv layers of a model's UNet (or transformer) and text encoders, from its configs on the
    `meta` device. None when the configs are not on disk (a single-file checkpoint without `.configs/`)."""
    import diffusers
    import torch
    import transformers

    root = entry.config_dir if entry.format == "single-file" else entry.path
    denoiser = family_of(entry.family).weights_folder  # "unet", or "transformer" (FLUX.1, SD 3.5)
    if root is None or not (root / denoiser / "config.json").exists():
        return None
    shapes: LayerShapes = {}
    with torch.device("meta"):
        config = json.loads((root / denoiser / "config.json").read_text())
        model_class = getattr(diffusers, config.get("_class_name") or "UNet2DConditionModel")
        shapes[denoiser] = _layer_shapes(model_class.from_config(model_class.load_config(root / denoiser)))
        for component in ("text_encoder", "text_encoder_2"):
            config_file = root / component / "config.json"
            if not config_file.exists():
                continue
            config = json.loads(config_file.read_text())
            class_name = (config.get("architectures") or ["CLIPTextModel"])[0]
            model_class = getattr(transformers, class_name)
            shapes[component] = _layer_shapes(model_class(model_class.config_class.from_dict(config)))
    return shapes


def lora_layer_shapes(state: dict[str, torch.Tensor], family: str) -> LayerShapes:
    """The layers a LoRA targets and the (in, out) sizes it expects, in diffusers/peft module names,
    converted with diffusers' own key converters (the ones `load_lora_weights` uses)."""
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    normalized = _lora_loader_class(family).lora_state_dict(dict(state))
    if isinstance(normalized, tuple):  # SD1.5/SDXL's loaders answer (state dict, network alphas)
        normalized = normalized[0]
    targets: LayerShapes = {}
    for component in _LORA_COMPONENTS:
        part = {k.removeprefix(f"{component}."): v for k, v in normalized.items() if k.startswith(f"{component}.")}
        if not part:
            continue
        if component == "unet":
            part = convert_unet_state_dict_to_peft(part)
        elif component != "transformer":  # a transformer's LoRA comes back from `lora_state_dict` in peft keys
            part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
        layers: dict[str, list[int]] = {}
        for key, tensor in part.items():
            match = re.match(r"^(.*)\.lora_([AB])(?:\.[^.]+)?\.weight$", key)
            if match is None:
                continue
            sizes = layers.setdefault(match.group(1), [0, 0])
            if match.group(2) == "A":
                sizes[0] = tensor.shape[1]
            else:
                sizes[1] = tensor.shape[0]
        targets[component] = {name: (sizes[0], sizes[1]) for name, sizes in layers.items()}
    return targets


def _lora_loader_class(family: str):
    """The diffusers pipeline class whose `lora_state_dict` reads LoRAs for models of `family` (its txt2img
    pipeline; the img2img one for a family without txt2img)."""
    import diffusers

    pipelines = family_of(family).pipelines
    return getattr(diffusers, pipelines.txt2img or pipelines.img2img)


def _find_layer(layers: dict[str, tuple[int, int]], name: str) -> tuple[int, int] | None:
    # transformers 5 flattened CLIPTextModel (no `text_model.` level); LoRA files still use both forms.
    for candidate in (name, name.removeprefix("text_model."), f"text_model.{name}"):
        if candidate in layers:
            return layers[candidate]
    return None


def incompatibility(lora: LoraFile, targets: LayerShapes, entry: ModelEntry, model: LayerShapes | None) -> str | None:
    """Why `lora` cannot be applied to the model, in a sentence a user can act on; None when it fits."""
    family = family_of(entry.family)
    if family.lora_family is None:
        takers = [spec.label for spec in FAMILIES.values() if spec.lora_family is not None]
        return (
            f"'{lora.name}' cannot be applied to model '{entry.name}': it is an {family.label}; LoRAs apply to "
            f"{', '.join(takers[:-1])} and {takers[-1]} base models"
        )
    if lora.family != "unknown" and lora.family != family.lora_family:
        lora_label = family_label(lora.family)
        article = "a" if lora_label.startswith("FLUX") else "an"  # an SD1.5, an SDXL, an SD 2.x, a FLUX.1
        return (
            f"'{lora.name}' is {article} {lora_label} LoRA; model '{entry.name}' is {family.label}: "
            f"use it with {article} {lora_label} model"
        )
    if not any(targets.values()):
        return f"'{lora.name}' holds no LoRA weights this service can read (kohya/A1111 or diffusers/peft keys)"
    if model is None:
        return None  # only the family could be checked
    for component, layers in targets.items():
        model_layers = model.get(component)
        if model_layers is None:
            return f"'{lora.name}' has weights for a {component} that model '{entry.name}' ({family.label}) lacks"
        for name, (lora_in, lora_out) in sorted(layers.items()):
            found = _find_layer(model_layers, name)
            if found is None:
                return (
                    f"'{lora.name}' targets layer {component}.{name}, which model '{entry.name}' ({family.label}) "
                    f"does not have: it was made for a different architecture"
                )
            if (lora_in and lora_in != found[0]) or (lora_out and lora_out != found[1]):
                return (
                    f"'{lora.name}' does not fit model '{entry.name}' ({family.label}): layer {component}.{name} is "
                    f"{found[0]}->{found[1]}, the LoRA expects {lora_in}->{lora_out}; it was made for another "
                    f"architecture"
                )
    return None


# The library ---------------------------------------------------------------------------------------------------
class LoraLibrary:
    """The LoRA files in the LoRA folder: listing, lookup by name, family, hash and compatibility (cached)."""

    def __init__(self, settings: Settings, facts: FileFactsCache | None = None):
        self.folder = settings.loras_dir
        self.allow_external_links = settings.allow_external_links
        self.facts = facts or FileFactsCache(settings.cache_dir / "file_facts.json")
        self._lock = threading.Lock()
        self._targets: dict[tuple[str, str], LayerShapes] = {}
        self._model_layers: dict[tuple, LayerShapes | None] = {}

    def _files(self) -> list[tuple[str, Path]]:
        return scan_named_files(self.folder, LORA_SUFFIXES, self.allow_external_links)

    def available(self) -> list[LoraFile]:
        return [LoraFile(name=name, path=path, family=self.family(path)) for name, path in self._files()]

    def file(self, path: Path) -> LoraFile:
        """A LoRA file given by path (the command-line tools accept files outside the folder)."""
        return LoraFile(name=path.stem, path=path, family=self.family(path))

    def family(self, path: Path) -> str:
        def detect(file: Path) -> str:
            try:
                return detect_lora_family(read_lora_shapes(file), tensor_shapes.metadata(file))
            except UnreadableLoraError as error:
                logger.warning("%s", error.message)
                return "unknown"

        return self.facts.get(path, "lora_family", detect)

    def short_hash(self, lora: LoraFile) -> str:
        return self.facts.get(lora.path, "lora_short_hash", lora_short_hash)

    def listing(self) -> list[tuple[str, Path]]:
        """The folder's LoRA files as (name, path), from one scan: give it to `resolve` to look up all the
        names of one request against one scan of the folder (a scan per name would cost a request with many
        names a scan each)."""
        return self._files()

    def resolve(self, requested: str, field: str = "loras", files: list[tuple[str, Path]] | None = None) -> LoraFile:
        """By name (with or without extension, with its subfolder or, when unique, without it), among `files`
        (a `listing()`) or, when None, a fresh scan of the folder."""
        files = self._files() if files is None else files
        found = find_named_file(requested, files, LORA_SUFFIXES, field, "LoRA")
        if found is not None:
            name, path = found
            return LoraFile(name=name, path=path, family=self.family(path))  # only the match needs its family
        names = ", ".join(repr(name) for name, _ in files) or f"none (the folder {self.folder} is empty)"
        raise UnknownLoraError(f"unknown LoRA {requested!r}; installed LoRAs: {names}", field=field)

    def targets(self, lora: LoraFile, family: str) -> LayerShapes:
        stat = lora.path.stat()
        key = (f"{lora.path}|{stat.st_size}|{stat.st_mtime_ns}", _lora_loader_class(family).__name__)
        with self._lock:
            cached = self._targets.get(key)
        if cached is None:
            try:
                cached = lora_layer_shapes(read_lora_state_dict(lora.path), family)
            except UnreadableLoraError:
                raise
            except Exception as error:  # diffusers' converters reject keys they do not know
                logger.info("LoRA %s: keys not understood: %s", lora.name, error)
                cached = {}
            with self._lock:
                self._targets[key] = cached
        return cached

    def model_layers(self, entry: ModelEntry) -> LayerShapes | None:
        key = (entry.name, str(entry.path), entry.path.stat().st_mtime_ns)
        with self._lock:
            if key in self._model_layers:
                return self._model_layers[key]
        layers = model_layer_shapes(entry)
        with self._lock:
            self._model_layers[key] = layers
        return layers

    def family_problem(self, lora: LoraFile, entry: ModelEntry) -> str | None:
        """Why `lora`'s family rules out the model (None when the family does not): the ingress's check."""
        fits = family_of(entry.family).lora_family
        if fits is None or (lora.family != "unknown" and lora.family != fits):
            return incompatibility(lora, {}, entry, None)
        return None

    def check(self, lora: LoraFile, entry: ModelEntry) -> str | None:
        """Why `lora` cannot be used with the model (None when it can): its family, then every layer it targets
        (engine side: diffusers' converters)."""
        problem = self.family_problem(lora, entry)
        if problem is not None:
            return problem
        return incompatibility(lora, self.targets(lora, entry.family), entry, self.model_layers(entry))

    def unreadable(self, lora: LoraFile) -> str | None:
        """Why the file cannot be read as a LoRA's tensors (None when it can), read without torch where the
        format allows and cached per file: the ingress's check, a 422 before the job exists."""

        def problem(file: Path) -> str:
            try:
                read_lora_shapes(file)
            except UnreadableLoraError as error:
                return error.message
            return ""

        return self.facts.get(lora.path, "lora_unreadable", problem) or None

    def usable(self, uses: list[LoraUse], entry: ModelEntry) -> tuple[list[LoraUse], list[str]]:
        """The uses whose LoRA fits the model layer by layer, and a warning for each one that does not (the
        engine's check, just before the LoRAs are applied; the results are cached per file and model). A file
        that has become unreadable since the job was accepted is skipped the same way."""
        kept, warnings = [], []
        for use in uses:
            try:
                reason = self.check(use.lora, entry)
            except DiffusionAPIError as error:
                reason = error.message.rstrip(".")
            if reason is None:
                kept.append(use)
            else:
                warnings.append(f"LoRA skipped: {reason}.")
        return kept, warnings

    def plan(self, requested: list, prompt: str, entry: ModelEntry | None, mode: str) -> LoraPlan:
        """Resolves a job's LoRAs (the `loras` field and prompt tags), checks each one's family against the
        model and returns the ones to apply. Unknown names are errors; LoRAs of another family are skipped with
        a warning (and ones whose layers do not fit the model, by the engine: `usable`)."""
        clean_prompt, tagged, tag_warnings = parse_prompt_loras(prompt)
        wanted: list[tuple[str, float]] = [
            (item, 1.0) if isinstance(item, str) else (item.name, item.scale) for item in requested
        ] + tagged
        plan = LoraPlan(prompt=clean_prompt, warnings=tag_warnings)
        if not wanted:
            return plan
        if len(wanted) > LIMITS.max_loras:
            dropped = ", ".join(repr(name) for name, _ in wanted[LIMITS.max_loras :])
            plan.warnings.append(f"{len(wanted)} LoRAs requested ('loras' plus <lora:...> tags); at most "
                                 f"{LIMITS.max_loras} per job: skipped {dropped}")  # fmt: skip
            wanted = wanted[: LIMITS.max_loras]
        resolved: dict[Path, tuple[LoraFile, float]] = {}
        files = self.listing()  # one scan of the folder for all the names
        for name, scale in wanted:
            lora = self.resolve(name, files=files)
            if lora.path in resolved:
                first_scale = resolved[lora.path][1]
                plan.warnings.append(f"LoRA '{lora.name}' is given more than once; used once, at its first scale "
                                     f"({first_scale:g})")  # fmt: skip
                continue
            resolved[lora.path] = (lora, scale)
        if mode == "img2img":
            names = ", ".join(f"'{lora.name}'" for lora, _ in resolved.values())
            plan.warnings.append(f"LoRAs are not applied to img2img; ignored: {names}")
            return plan
        for lora, _ in resolved.values():
            if problem := self.unreadable(lora):
                raise UnreadableLoraError(problem, field="loras")
        for lora, scale in resolved.values():  # the layers are checked by the engine, against the loaded model
            reason = self.family_problem(lora, entry) if entry is not None else None
            if reason is not None:
                plan.warnings.append(f"LoRA skipped: {reason}.")
                continue
            plan.uses.append(LoraUse(lora=lora, scale=scale, short_hash=self.short_hash(lora)))
        return plan
