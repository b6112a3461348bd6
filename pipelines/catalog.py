"""Model discovery: what checkpoints are installed, their family, labels and A1111 hashes.

Three on-disk formats are found in `stable_diffusion/models/` (and the optional extra `models/` folder):
diffusers folders (`model_index.json`), Hugging Face cache folders (`models--org--name/snapshots/<rev>/`) and
single-file checkpoints (`.safetensors`, `.ckpt`). The family comes from the files themselves (pipeline
class and component configs, or tensor names), never from the name. Hashes and families are cached on disk
by path, size and mtime, so a large checkpoint is hashed once.
"""

import functools
import hashlib
import json
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import yaml

from pipelines.errors import UnknownModelError
from pipelines.families import FAMILIES, FamilyName, family_of
from pipelines.families.base import UnsupportedModelError
from pipelines.limits import LIMITS
from pipelines.names import check_user_name
from pipelines.settings import Settings

Mode = Literal["txt2img", "img2img"]  # what a job does: from a prompt, or from an input image

logger = logging.getLogger(__name__)

Family = FamilyName  # the served families' ids (pipelines/families/)
ModelFormat = Literal["diffusers", "hf-cache", "single-file"]
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".gguf")  # .gguf: GGUF-quantized FLUX.1 transformers
UNET_WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
)
_A1111_TITLE = re.compile(r"^(?P<name>.+?) \[[0-9a-fA-F]{8,10}\]$")


@dataclass(frozen=True)
class ModelEntry:
    """One installed checkpoint."""

    name: str  # folder name, or file name without extension
    label: str  # friendly label from configs/models.yaml, else the name
    family: Family
    format: ModelFormat
    path: Path  # the diffusers folder (the snapshot folder for HF cache) or the checkpoint file
    config_dir: Path | None = None  # single files: local diffusers configs, when present
    inpainting: bool = False  # a 9-channel UNet (image + mask conditioning): an inpainting checkpoint
    modules: tuple[Path, ...] = ()  # a single file's separate VAE and text encoder files (pipelines/modules.py)
    largest_side: int | None = None  # the largest width or height its denoiser can make, where it has a limit

    @property
    def max_size(self) -> int:
        """The largest width or height a job on it may ask: configs/limits.yaml's, or its own where smaller."""
        return min(LIMITS.max_size, self.largest_side or LIMITS.max_size)

    @property
    def hash_file(self) -> Path:
        """The file whose sha256 is the A1111 `Model hash`: the checkpoint, or a folder's UNet weights."""
        if self.format == "single-file":
            return self.path
        folder = self.path / family_of(self.family).weights_folder
        for filename in UNET_WEIGHT_FILES:
            candidate = folder / filename
            if candidate.exists():
                return candidate
        # Large models ship their transformer in shards (FLUX.1-dev, SD 3.5 Large): the first shard, which
        # differs between fine-tunes as the whole file would.
        shards = sorted(folder.glob("diffusion_pytorch_model-*.safetensors")) or sorted(folder.glob("*.safetensors"))
        if shards:
            return shards[0]
        raise FileNotFoundError(f"no model weights in {folder}")


def _file_key(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


class FileFactsCache:
    """sha256 sums and detected families, keyed by (path, size, mtime), kept in one JSON file."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._data: dict[str, dict] | None = None

    def _load(self) -> dict[str, dict]:
        if self._data is None:
            try:
                self._data = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self._data = {}
        return self._data

    def get(self, file: Path, fact: str, compute) -> str:
        key = _file_key(file)
        with self._lock:
            cached = self._load().get(key, {}).get(fact)
        if cached is not None:
            return cached
        value = compute(file)
        with self._lock:
            self._load().setdefault(key, {})[fact] = value
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.path.with_suffix(".tmp")
                tmp.write_text(json.dumps(self._data, indent=1, sort_keys=True))
                tmp.replace(self.path)
            except OSError as error:  # a read-only folder only costs recomputation
                logger.warning("could not write %s: %s", self.path, error)
        return value


def checkpoint_shapes(path: Path) -> dict:
    """A single-file checkpoint's tensor names and shapes, read without torch where the format allows (the
    ingress resolves models with this module: pipelines/tensor_shapes.py); else loaded with torch."""
    from pipelines import tensor_shapes

    state = tensor_shapes.read(path)
    if state is None:
        import torch

        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return state.get("state_dict", state)


def _served_labels() -> str:
    return ", ".join(family.label for family in FAMILIES.values())


def family_of_checkpoint_keys(keys) -> Family:
    """The family of an original-layout (A1111/CompVis, BFL, ...) checkpoint, from its tensor names (a list, or
    a name -> shape mapping where shapes tell variants apart): the first family of the table that claims it."""
    for family in FAMILIES.values():
        if family.claims_checkpoint(keys):
            return family.name
    has = lambda prefix: any(key.startswith(prefix) for key in keys)  # noqa: E731
    if has("model.diffusion_model.") and has("cond_stage_model.model."):
        raise UnsupportedModelError(f"an SD 2.x checkpoint (OpenCLIP text encoder); supported: {_served_labels()}")
    if not has("model.diffusion_model."):
        raise UnsupportedModelError(f"not a checkpoint of a served family ({_served_labels()}): no tensors it knows")
    raise UnsupportedModelError("unknown text encoder layout")


UNET_INPUT_KEY = "model.diffusion_model.input_blocks.0.0.weight"
INPAINTING_CHANNELS = 9  # 4 latent + 1 mask + 4 masked-image latent channels


def unet_input_channels_of_checkpoint(path: Path) -> int:
    """The UNet's input channels in an original-layout checkpoint (9 for inpainting checkpoints)."""
    state = checkpoint_shapes(path)
    return int(state[UNET_INPUT_KEY].shape[1]) if UNET_INPUT_KEY in state else 4


def unet_input_channels_of_folder(folder: Path) -> int:
    config = folder / "unet" / "config.json"
    return int(json.loads(config.read_text()).get("in_channels", 4)) if config.is_file() else 4


def family_of_diffusers_folder(folder: Path) -> Family:
    """The family of a diffusers folder, from `model_index.json` and its component configs: the first family of
    the table that claims it."""
    index = json.loads((folder / "model_index.json").read_text())
    for family in FAMILIES.values():
        if family.claims_folder(index, folder):
            return family.name
    class_name = index.get("_class_name", "")
    raise UnsupportedModelError(f"pipeline class {class_name!r} is not of a served family ({_served_labels()})")


def _hf_snapshot(cache_folder: Path) -> Path | None:
    """The snapshot `refs/main` points at, else the newest one."""
    snapshots = cache_folder / "snapshots"
    ref = cache_folder / "refs" / "main"
    if ref.is_file():
        candidate = snapshots / ref.read_text().strip()
        if (candidate / "model_index.json").exists():
            return candidate
    found = [p for p in snapshots.glob("*") if (p / "model_index.json").exists()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


class ModelCatalog:
    """Lists and resolves the installed checkpoints. Cheap to call often: scans are small, facts cached."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.facts = FileFactsCache(settings.cache_dir / "file_facts.json")
        self._parsed_config: tuple[tuple[int, int], dict] | None = None
        self._skipped: dict[str, str] = {}  # models found and skipped by the last scans: name -> why

    # Configuration ---------------------------------------------------------------------------------------
    def _config(self) -> dict:
        """configs/models.yaml, parsed again only when the file changes (parsing YAML costs milliseconds, and
        every request resolves its model)."""
        try:
            stat = self.settings.models_config.stat()
        except FileNotFoundError:
            return {}
        version = (stat.st_mtime_ns, stat.st_size)
        if self._parsed_config is None or self._parsed_config[0] != version:
            data = yaml.safe_load(self.settings.models_config.read_text()) or {}
            self._parsed_config = (version, data if isinstance(data, dict) else {})
        return self._parsed_config[1]

    def configured_aliases(self) -> dict[str, str]:
        """label -> name, as written in configs/models.yaml."""
        aliases = self._config().get("aliases") or {}
        return {str(label): str(name) for label, name in aliases.items()}

    # Discovery ---------------------------------------------------------------------------------------------
    def _model_dirs(self) -> list[Path]:
        dirs = [self.settings.models_dir, self.settings.extra_models_dir]
        return [d for d in dict.fromkeys(dirs) if d.is_dir()]

    def _scan_one(self, path: Path, modules: Callable[[], list]) -> ModelEntry | None:
        """The model at `path` (named as found; the label is set by the caller), or None if it is none.
        `modules()`: the installed module files (pipelines/modules.py), read once per scan when first asked."""
        folder = _hf_snapshot(path) if path.is_dir() and path.name.startswith("models--") else path
        if folder is not None and folder.is_dir() and (folder / "model_index.json").exists():
            unet_config = folder / "unet" / "config.json"
            family = self.facts.get(folder / "model_index.json", "family", lambda _: family_of_diffusers_folder(folder))
            channels = 4
            if family_of(family).inpainting_checkpoints:
                channels = self.facts.get(unet_config, "unet_in_channels",
                                          lambda _: unet_input_channels_of_folder(folder))  # fmt: skip
            model_format: ModelFormat = "hf-cache" if folder != path else "diffusers"
            return self._with_largest_side(ModelEntry(path.name, path.name, family, model_format, folder,
                                                      inpainting=channels == INPAINTING_CHANNELS))  # fmt: skip
        if path.is_file() and path.suffix.lower() in SINGLE_FILE_SUFFIXES:
            family = self.facts.get(path, "family", lambda p: family_of_checkpoint_keys(checkpoint_shapes(p)))
            channels = 4
            if family_of(family).inpainting_checkpoints:
                channels = self.facts.get(path, "unet_in_channels", unet_input_channels_of_checkpoint)
            config_dir = path.parent / ".configs" / path.stem
            return self._with_largest_side(ModelEntry(
                path.stem, path.stem, family, "single-file", path, config_dir if config_dir.is_dir() else None,
                channels == INPAINTING_CHANNELS, self._modules_of(path, family, modules),
            ))  # fmt: skip
        return None

    def _with_largest_side(self, entry: ModelEntry) -> ModelEntry:
        """The entry with its family's size limit read from its files (cached in the file facts)."""
        family = family_of(entry.family)
        if family.largest_side is None:
            return entry
        # A fact of the folder's denoiser config (as `unet_in_channels` of unet/config.json), or of the file.
        source = entry.path / family.weights_folder / "config.json" if entry.path.is_dir() else entry.path
        if not source.is_file():
            return entry  # a folder without it does not load: the load says so
        side = self.facts.get(source, "largest_side", lambda _: str(family.largest_side(entry.path) or ""))
        return replace(entry, largest_side=int(side)) if side else entry

    def _modules_of(self, path: Path, family: str, modules: Callable[[], list]) -> tuple[Path, ...]:
        """The separate VAE and text-encoder files the single file at `path` runs with (FLUX.1's transformer
        alone, as Black Forest Labs ships it; SD 3.5's without its text encoders); `configs/models.yaml`
        `modules: {name: [ae, clip_l, ...]}` picks them where several of a kind are installed."""
        name = path.stem
        if not family_of(family).single_file_modules:
            return ()
        table = self._config().get("modules") or {}
        configured = table.get(name) if isinstance(table, dict) else None
        valid = isinstance(configured, list) and all(isinstance(item, str) for item in configured)
        if configured is not None and not valid:
            raise UnsupportedModelError(f"configs/models.yaml modules.{name}: a list of module file names, "
                                        f"not {configured!r}")  # fmt: skip
        carried_by = family_of(family).carried_modules
        carried = self.facts.get(path, "carried_modules", lambda p: ",".join(carried_by(checkpoint_shapes(p))))
        found = self._module_library().for_family(family_of(family), carried.split(","), configured, modules())
        if isinstance(found, str):
            raise UnsupportedModelError(f"a {family_of(family).label} transformer without its modules: {found}")
        return tuple(module.path for module in found)

    def _module_library(self):
        from pipelines.modules import ModuleLibrary  # imported here: it imports this module (FileFactsCache)

        return ModuleLibrary(self.settings, self.facts)

    def list_models(self) -> list[ModelEntry]:
        """Every usable checkpoint, sorted by name. Unreadable or unsupported ones are logged and skipped."""
        labels_by_name: dict[str, str] = {}
        for label, name in self.configured_aliases().items():
            labels_by_name.setdefault(name, label)
        entries: dict[str, ModelEntry] = {}
        modules = functools.cache(lambda: self._module_library().available())  # for single files that need modules
        for directory in self._model_dirs():
            root = directory.resolve()
            for path in sorted(directory.iterdir()):
                if path.name.startswith("."):
                    continue
                if not self.settings.allow_external_links and not path.resolve().is_relative_to(root):
                    logger.warning("skipping %s: it links outside %s (DIFFUSION_API_ALLOW_EXTERNAL_LINKS=1 allows it)",
                                   path, directory)  # fmt: skip
                    continue
                try:
                    found = self._scan_one(path, modules)
                except UnsupportedModelError as error:
                    logger.warning("skipping %s: %s", path, error)
                    self._skipped[path.stem if path.is_file() else path.name] = str(error)
                    continue
                except (OSError, ValueError, RuntimeError) as error:
                    logger.warning("skipping unreadable model %s: %s", path, error)
                    continue
                if found is None:
                    continue
                if found.name in entries:
                    logger.warning("ignoring %s: a model named %r was found first", path, found.name)
                    continue
                entries[found.name] = replace(found, label=labels_by_name.get(found.name, found.name))
        return sorted(entries.values(), key=lambda e: e.name.lower())

    def aliases(self) -> list[tuple[str, str]]:
        """(label, name) pairs from the config whose model is installed."""
        installed = {entry.name for entry in self.list_models()}
        return [(label, name) for label, name in self.configured_aliases().items() if name in installed]

    # Resolution --------------------------------------------------------------------------------------------
    def default_model(self, family: Family | None = None) -> ModelEntry:
        models = self.list_models()
        if not models:
            raise UnknownModelError(
                f"no models installed in {self.settings.models_dir}; run 'make demo-models' or add checkpoints",
                field="model",
            )
        configured = self._config().get("default_model")
        if configured:
            try:
                entry = self.resolve(str(configured))
                if family is None or entry.family == family:
                    return entry
            except UnknownModelError:
                logger.warning("default_model %r from %s is not installed", configured, self.settings.models_config)
        wanted = [family] if family else [name for name, spec in FAMILIES.items() if spec.txt2img]
        for name in wanted:  # the table's order: SD1.5 first, as the seed API's default
            for entry in models:
                if entry.family == name:
                    return entry
        return models[0]

    def resolve(self, requested: str | None, field: str = "model") -> ModelEntry:
        """A model by name (folder or file name, with or without extension), label (any case), hub id
        (`org/name` -> `models--org--name`) or A1111 title (`name [hash]`). None -> the default model."""
        if requested is None or not requested.strip():
            return self.default_model()
        wanted = check_user_name(requested, field, allow_one_slash=True)
        models = self.list_models()
        by_name = {entry.name: entry for entry in models}
        candidates = [wanted]
        if title := _A1111_TITLE.match(wanted):
            candidates.append(title["name"])
        for candidate in list(candidates):
            stem = Path(candidate).stem if Path(candidate).suffix.lower() in SINGLE_FILE_SUFFIXES else None
            if stem:
                candidates.append(stem)
            if "/" in candidate:
                candidates.append("models--" + candidate.replace("/", "--"))
        for candidate in candidates:
            if candidate in by_name:
                return by_name[candidate]
        by_label = {entry.label.lower(): entry for entry in models}
        for label, name in self.configured_aliases().items():
            if name in by_name:
                by_label.setdefault(label.lower(), by_name[name])
        for candidate in candidates:
            if candidate.lower() in by_label:
                return by_label[candidate.lower()]
        choices = ", ".join(f"'{e.name}' ({e.label})" if e.label != e.name else f"'{e.name}'" for e in models)
        for candidate in candidates:
            if candidate in self._skipped:  # installed, but not usable: say why rather than "unknown"
                raise UnknownModelError(f"{field} {requested!r} is installed but skipped: {self._skipped[candidate]}",
                                        field=field)  # fmt: skip
        raise UnknownModelError(
            f"unknown {field} {requested!r}; installed models: {choices or 'none'}",
            field=field,
        )

    # Hashes ------------------------------------------------------------------------------------------------
    def sha256(self, entry: ModelEntry) -> str:
        return self.facts.get(entry.hash_file.resolve(), "sha256", sha256_of_file)

    def model_hash(self, entry: ModelEntry) -> str:
        """A1111's `Model hash`: the first 10 hex digits of the checkpoint's sha256."""
        return self.sha256(entry)[:10]


def check_mode_supported(entry: ModelEntry, mode: Mode) -> None:
    """A family without a txt2img pipeline (the SDXL refiner) only continues images."""
    family = family_of(entry.family)
    if mode == "txt2img" and not family.txt2img:
        raise UnknownModelError(
            f"model '{entry.name}' is an {family.label}, not a txt2img model: use it for img2img or as "
            "'refiner_checkpoint'",
            field="model",
        )
